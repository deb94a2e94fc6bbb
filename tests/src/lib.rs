//! Support for fleetbench's end-to-end tests: a coordinator served in-process on 127.0.0.1:0 with a
//! temporary database, agents running the real ONNX Runtime runner (in-process, or as separate
//! processes), and the CLI's own client code to drive them.

use std::path::{Path, PathBuf};
use std::time::Duration;

use fleetbench_agent::AgentConfig;
use fleetbench_cli::client::Client;
use fleetbench_coordinator::CoordinatorConfig;
use fleetbench_proto::v1::{GetJobRequest, JobDetail, JobSummary, ListAgentsRequest};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub mod otlp;
pub mod prometheus;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// A bundled model file, e.g. `models("digits/digits-fp32.onnx")`.
pub fn models(rel: &str) -> PathBuf {
    repo().join("models").join(rel)
}

/// The ONNX Runtime library the agents load: ORT_DYLIB_PATH, else the one `scripts/dev.sh setup` put in .venv.
pub fn ort_lib() -> PathBuf {
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return PathBuf::from(p);
    }
    fleetbench_cli::commands::quickstart::find_ort_lib_in(&repo()).unwrap_or_else(|e| {
        panic!("these tests run real ONNX Runtime: {e:#}. Run them with `scripts/dev.sh test`.")
    })
}

/// A coordinator served in this process.
pub struct TestCoordinator {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    /// Bound address.
    pub addr: std::net::SocketAddr,
    /// Database URL.
    pub database: String,
    /// The CA certificate clients trust, when it serves TLS (then `url` is `https://`).
    pub ca_cert: Option<PathBuf>,
    /// An admin token and an agent join token of its database.
    pub tokens: Tokens,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<JoinHandle<fleetbench_coordinator::Result<()>>>,
}

/// Tokens a test uses, made in the coordinator's database as `fleetbench admin tokens create` would.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    /// An admin token (`fbt1...`).
    pub admin: String,
    /// An agent join token (`fbjoin1:...`).
    pub join: String,
}

impl Tokens {
    /// A new admin token and join token in `store`, under fresh names.
    pub async fn make(store: &dyn fleetbench_coordinator::store::Store) -> Tokens {
        use fleetbench_coordinator::auth::{Role, create_token};
        let tag = uuid::Uuid::new_v4().simple().to_string();
        let (_, admin) = create_token(store, "", &format!("test-admin-{tag}"), Role::Admin, 0, 0)
            .await
            .expect("make an admin token");
        let (_, join) = create_token(
            store,
            "",
            &format!("test-join-{tag}"),
            Role::AgentJoin,
            0,
            0,
        )
        .await
        .expect("make a join token");
        Tokens {
            admin: admin.expose().to_string(),
            join: join.expose().to_string(),
        }
    }

    /// Tokens made in the database at `database` (the schema is migrated first if need be).
    pub async fn made_in(database: &str) -> Tokens {
        let store = fleetbench_coordinator::store::open(database)
            .await
            .expect("open the database to make tokens");
        Tokens::make(store.as_ref()).await
    }

    /// A CLI client of `url` with the admin token.
    pub async fn client(&self, url: &str) -> Client {
        Client::connect(url, Some(&self.admin))
            .await
            .expect("connect to the coordinator")
    }
}

/// A raw agent-service client of `url` (plain http) whose calls carry `token`: a join token
/// (`fbjoin1:...`, its inner token is sent) or an agent's credential.
pub async fn agent_client(
    url: &str,
    token: &str,
) -> fleetbench_proto::v1::agent_service_client::AgentServiceClient<fleetbench_proto::connect::Authed>
{
    let channel = tonic::transport::Endpoint::from_shared(url.to_string())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    agent_client_on(channel, token)
}

/// As [`agent_client`], on an open channel.
pub fn agent_client_on(
    channel: tonic::transport::Channel,
    token: &str,
) -> fleetbench_proto::v1::agent_service_client::AgentServiceClient<fleetbench_proto::connect::Authed>
{
    let token = match fleetbench_common::token::JoinToken::parse(token) {
        Ok(j) => j.token.to_secret_string().expose().to_string(),
        Err(_) => token.to_string(),
    };
    let bearer = fleetbench_proto::connect::Bearer::new(Some(&token)).expect("a token");
    fleetbench_proto::v1::agent_service_client::AgentServiceClient::with_interceptor(
        channel, bearer,
    )
}

/// A binary built beside the tests (`fleetbench`, `fleetbench-agent`, `fleetbench-coordinator`).
pub fn built_bin(name: &str) -> PathBuf {
    let path = std::env::current_exe()
        .expect("test binary path")
        .parent()
        .and_then(|d| d.parent())
        .map(|d| d.join(name))
        .expect("target dir");
    assert!(
        path.exists(),
        "{} is missing: build the binaries first (cargo build --release --bins, or scripts/dev.sh test)",
        path.display()
    );
    path
}

/// The registration of a fake agent `name` on a host of its own, asking for `agent_id` (empty: none).
pub fn fake_registration(name: &str, agent_id: &str) -> fleetbench_proto::v1::RegisterRequest {
    fleetbench_proto::v1::RegisterRequest {
        agent_id: agent_id.into(),
        name: name.into(),
        inventory: Some(fleetbench_proto::v1::Inventory {
            hostname: name.into(),
            host_id: format!("host-of-{name}"),
            cpu_brand: "Fake CPU".into(),
            cpu_set: vec![0],
            ..Default::default()
        }),
        protocol_version: fleetbench_common::protocol::PROTOCOL_VERSION,
        ..Default::default()
    }
}

/// The fleet as `agents list` shows it.
pub async fn list_agents(client: &Client) -> Vec<fleetbench_proto::v1::AgentInfo> {
    client
        .fleet()
        .list_agents(ListAgentsRequest {})
        .await
        .expect("list agents")
        .into_inner()
        .agents
}

/// A well-formed join token no coordinator knows, for agents whose coordinator is a stand-in.
pub fn unknown_join_token() -> String {
    fleetbench_common::token::JoinToken {
        ca_sha256: String::new(),
        token: fleetbench_common::token::Token::mint(),
    }
    .to_secret_string()
    .expose()
    .to_string()
}

/// Settings suited to tests: short leases and ticks.
pub fn test_config(database: &str) -> CoordinatorConfig {
    CoordinatorConfig {
        listen: "127.0.0.1:0".into(),
        database: database.to_string(),
        heartbeat_interval_ms: 200,
        lease_timeout_ms: 2000,
        scheduler_tick_ms: 100,
        // Tests fire requests faster than any person; the limits have a test of their own.
        max_requests_per_second_per_token: 0,
        max_uploads_per_token: 0,
        ..Default::default()
    }
}

/// Logs of the in-process coordinators and agents on stderr, when RUST_LOG asks for them (run a test
/// with `RUST_LOG=info … --nocapture` to follow it).
pub fn init_logs() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        if let Ok(filter) = tracing_subscriber::EnvFilter::try_from_default_env() {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(filter)
                .with_test_writer()
                .try_init();
        }
    });
}

impl TestCoordinator {
    /// Serves `config` on `listener` (so a test can restart on the same port).
    pub async fn serve(config: CoordinatorConfig, listener: TcpListener) -> Self {
        init_logs();
        let tokens = {
            let data_dir = fleetbench_coordinator::tls::data_dir_of(&config);
            let store =
                fleetbench_coordinator::store::open_with(&config.database, data_dir.as_deref())
                    .await
                    .expect("open the database to make tokens");
            Tokens::make(store.as_ref()).await
        };
        let addr = listener.local_addr().expect("bound");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let database = config.database.clone();
        let ca_cert = fleetbench_coordinator::tls::data_dir_of(&config)
            .map(|d| fleetbench_coordinator::tls::TlsFiles::under(&d).ca_cert())
            .filter(|p| p.exists());
        let handle = tokio::spawn(fleetbench_coordinator::serve(config, listener, async {
            let _ = rx.await;
        }));
        let scheme = if ca_cert.is_some() { "https" } else { "http" };
        let url = format!("{scheme}://{addr}");
        // The listener is bound before serve starts, so connections queue until it accepts.
        Self {
            url,
            addr,
            database,
            ca_cert,
            tokens,
            stop: Some(tx),
            handle: Some(handle),
        }
    }

    /// Starts a coordinator on 127.0.0.1:0 with a fresh SQLite file in `dir`.
    pub async fn sqlite(dir: &Path, tweak: impl FnOnce(&mut CoordinatorConfig)) -> Self {
        let mut config = test_config(&format!("sqlite://{}", dir.join("fleet.db").display()));
        tweak(&mut config);
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        Self::serve(config, listener).await
    }

    /// Stops it and waits until it has.
    pub async fn stop(mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            h.await
                .expect("coordinator task")
                .expect("coordinator ran cleanly");
        }
    }

    /// Starts a coordinator with TLS on 127.0.0.1:0 with a fresh SQLite file in `dir`, after making
    /// its CA and server certificate in `dir/tls` as `fleetbench-coordinator init` does.
    pub async fn sqlite_tls(dir: &Path, tweak: impl FnOnce(&mut CoordinatorConfig)) -> Self {
        use fleetbench_coordinator::tls;
        tls::init(&tls::TlsFiles::under(dir), &[]).expect("make the test CA");
        Self::sqlite(dir, |c| {
            c.data_dir = dir.display().to_string();
            tweak(c)
        })
        .await
    }

    /// A CLI client connected to it (over TLS when it serves TLS), with the admin token.
    pub async fn client(&self) -> Client {
        Client::connect_with(&self.url, self.ca_cert.as_deref(), Some(&self.tokens.admin))
            .await
            .expect("connect to the test coordinator")
    }

    /// Settings for an in-process agent of this coordinator, with its join token (and CA).
    pub fn agent(&self, name: &str, labels: &[&str], state_dir: &Path) -> AgentConfig {
        let mut c = agent_config(&self.url, &self.tokens.join, name, labels, state_dir);
        c.ca_cert = self.ca_cert.clone().unwrap_or_default();
        c
    }
}

impl Drop for TestCoordinator {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

/// An agent running in this process on the real ONNX Runtime runner.
pub struct TestAgent {
    /// Its name.
    pub name: String,
    stop: tokio::sync::watch::Sender<bool>,
    handle: Option<JoinHandle<fleetbench_agent::Result<()>>>,
}

/// Settings for an in-process agent of the coordinator at `url`, joining with `join`.
pub fn agent_config(
    url: &str,
    join: &str,
    name: &str,
    labels: &[&str],
    state_dir: &Path,
) -> AgentConfig {
    AgentConfig {
        coordinator: vec![url.to_string()],
        join_token: fleetbench_common::token::Secret::new(join),
        name: name.to_string(),
        labels: labels.iter().map(|s| s.to_string()).collect(),
        state_dir: state_dir.join(name),
        ort_lib: ort_lib(),
        max_backoff_ms: 500,
        ..Default::default()
    }
}

impl TestAgent {
    /// Starts an agent with `config`.
    pub fn start(config: AgentConfig) -> Self {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let name = config.name.clone();
        let handle = tokio::spawn(fleetbench_agent::run(config, rx));
        Self {
            name,
            stop,
            handle: Some(handle),
        }
    }

    /// Starts an agent with a given runner.
    pub fn start_with_runner(
        config: AgentConfig,
        runner: std::sync::Arc<dyn fleetbench_agent::runner::ModelRunner>,
    ) -> Self {
        Self::start_with(config, Some(runner), Default::default())
    }

    /// Starts an agent on the real runner (or `runner`), counting its link's activity in `stats`.
    pub fn start_with(
        config: AgentConfig,
        runner: Option<std::sync::Arc<dyn fleetbench_agent::runner::ModelRunner>>,
        stats: std::sync::Arc<fleetbench_agent::uplink::UplinkStats>,
    ) -> Self {
        let (stop, rx) = tokio::sync::watch::channel(false);
        let name = config.name.clone();
        let runtime = fleetbench_runtime::load(Some(&config.ort_lib)).expect("ONNX Runtime loads");
        let runner = runner.unwrap_or_else(|| {
            std::sync::Arc::new(fleetbench_agent::runner::OrtRunner {
                runtime,
                huge_pages: config.huge_pages,
            })
        });
        let handle = tokio::spawn(fleetbench_agent::run_with_runner(
            config, runner, runtime, stats, rx,
        ));
        Self {
            name,
            stop,
            handle: Some(handle),
        }
    }

    /// Makes the agent vanish without a word, as a crashed or cut-off agent does: its link is dropped
    /// mid-whatever, nothing is cancelled or reported.
    pub fn vanish(mut self) {
        if let Some(h) = self.handle.take() {
            h.abort();
        }
    }

    /// Stops the agent's link (a run in progress is cancelled) and waits for it.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(h) = self.handle.take() {
            h.await.expect("agent task").expect("agent ran cleanly");
        }
    }
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

/// Waits until `n` agents are online (polls the fleet list; fails after 30 s).
pub async fn wait_online(client: &Client, n: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let agents = client
            .fleet()
            .list_agents(ListAgentsRequest {})
            .await
            .expect("list agents")
            .into_inner()
            .agents;
        if agents.iter().filter(|a| a.online).count() >= n {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{n} agents did not come online: {agents:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Follows a job with the WatchJob stream until it ends (fails after `timeout`).
pub async fn wait_job(client: &Client, job: &str, timeout: Duration) -> JobSummary {
    let ended = tokio::time::timeout(
        timeout,
        fleetbench_cli::commands::jobs::watch(client, job, false),
    )
    .await;
    match ended {
        Ok(summary) => summary.expect("watch the job"),
        Err(_) => {
            // Say where it stands, so a failure in CI can be understood from its output alone.
            let detail = client
                .jobs()
                .get_job(GetJobRequest {
                    job_id: job.to_string(),
                })
                .await
                .map(|r| format!("{:#?}", r.into_inner().tasks))
                .unwrap_or_else(|e| format!("(its detail could not be read: {e})"));
            let agents = client
                .fleet()
                .list_agents(ListAgentsRequest {})
                .await
                .map(|r| format!("{:#?}", r.into_inner().agents))
                .unwrap_or_else(|e| format!("(agents could not be listed: {e})"));
            panic!("job {job} did not end within {timeout:?}\ntasks: {detail}\nagents: {agents}")
        }
    }
}

/// The job with its tasks and runs.
pub async fn job_detail(client: &Client, job: &str) -> JobDetail {
    client
        .jobs()
        .get_job(GetJobRequest {
            job_id: job.to_string(),
        })
        .await
        .expect("get job")
        .into_inner()
}

/// Pushes the digits model (fp32 with its eval set) and its int8 variant.
pub async fn push_digits(client: &Client) {
    use fleetbench_cli::commands::models::push;
    let d = |f: &str| models(&format!("digits/{f}"));
    push(
        client,
        &d("digits-fp32.onnx"),
        "digits",
        None,
        None,
        None,
        Some((&d("eval-inputs.npy"), &d("eval-labels.npy"))),
    )
    .await
    .expect("push fp32");
    push(
        client,
        &d("digits-int8.onnx"),
        "digits",
        Some("int8"),
        None,
        None,
        None,
    )
    .await
    .expect("push int8");
}

/// Pushes the bundled decoder as model `tiny-llama` (its base, fp32), with a token eval set
/// (inputs, labels) when given.
pub async fn push_tiny_llama(
    client: &fleetbench_cli::client::Client,
    eval: Option<(&std::path::Path, &std::path::Path)>,
) {
    fleetbench_cli::commands::models::push(
        client,
        &models("llm/tiny-llama.onnx"),
        "tiny-llama",
        None,
        None,
        None,
        eval,
    )
    .await
    .expect("push the decoder");
}

/// Top-1 accuracy of a variant as the models script measured it in Python (models/digits/metadata.json).
pub fn python_accuracy(variant: &str) -> f64 {
    let meta: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(models("digits/metadata.json")).expect("metadata.json"),
    )
    .expect("json");
    meta["variants"][variant]["accuracy"]
        .as_f64()
        .expect("accuracy in metadata.json")
}

/// A throwaway Postgres database on FLEETBENCH_TEST_POSTGRES_URL (default
/// postgres://postgres@127.0.0.1:5432/postgres), dropped at the end. Without a reachable server the test
/// fails and says so; it never skips.
pub struct PgDb {
    admin: String,
    name: String,
    /// URL of the new database.
    pub url: String,
}

impl PgDb {
    /// Creates a fresh database.
    pub async fn create() -> PgDb {
        Self::create_with("").await
    }

    /// Creates a fresh database with `options` after CREATE DATABASE (e.g. a locale).
    pub async fn create_with(options: &str) -> PgDb {
        let admin = std::env::var("FLEETBENCH_TEST_POSTGRES_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
        let name = format!("fleetbench_test_{}", uuid::Uuid::new_v4().simple());
        sqlx::any::install_default_drivers();
        let mut conn = <sqlx::AnyConnection as sqlx::Connection>::connect(&admin).await.unwrap_or_else(|e| {
            panic!(
                "Postgres tests need a server: cannot connect to {} ({e}). Start one (scripts/ensure-postgres.sh) \
                 or set FLEETBENCH_TEST_POSTGRES_URL.",
                fleetbench_coordinator::store::redact_url(&admin)
            )
        });
        sqlx::Executor::execute(
            &mut conn,
            format!("CREATE DATABASE {name} {options}").as_str(),
        )
        .await
        .expect("create database");
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        let url = format!("{base}/{name}");
        PgDb { admin, name, url }
    }

    /// Host and port of the server behind the database's URL.
    pub fn server_addr(&self) -> std::net::SocketAddr {
        let (_, rest) = self.url.split_once('@').expect("url has a user");
        let hostport = rest.split('/').next().unwrap_or("127.0.0.1:5432");
        let hostport = if hostport.contains(':') {
            hostport.to_string()
        } else {
            format!("{hostport}:5432")
        };
        let hostport = hostport.replace("localhost", "127.0.0.1");
        std::net::ToSocketAddrs::to_socket_addrs(&hostport)
            .ok()
            .and_then(|mut a| a.next())
            .unwrap_or_else(|| panic!("cannot resolve the Postgres server {hostport}"))
    }

    /// The database's URL with its host and port replaced (to go through a proxy).
    pub fn url_via(&self, addr: std::net::SocketAddr) -> String {
        let (scheme_user, rest) = self.url.split_once('@').expect("url has a user");
        let path = rest.split_once('/').map(|(_, p)| p).unwrap_or("");
        format!("{scheme_user}@{addr}/{path}")
    }
}

impl Drop for PgDb {
    fn drop(&mut self) {
        let (admin, name) = (self.admin.clone(), self.name.clone());
        // Drop cannot await: a thread with its own runtime drops the database.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                if let Ok(mut conn) =
                    <sqlx::AnyConnection as sqlx::Connection>::connect(&admin).await
                {
                    let sql = format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)");
                    let _ = sqlx::Executor::execute(&mut conn, sql.as_str()).await;
                }
            });
        })
        .join();
    }
}

/// A coordinator process (the real binary), for tests that kill one.
pub struct CoordinatorProcess {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    child: std::process::Child,
}

impl CoordinatorProcess {
    /// Starts `fleetbench-coordinator` from the build directory on `database`.
    // The child moves into Self, whose Drop kills and waits for it.
    #[allow(clippy::zombie_processes)]
    pub fn start(database: &str, dir: &Path, name: &str) -> Self {
        let bin = built_bin("fleetbench-coordinator");
        let addr_file = dir.join(format!("{name}.addr"));
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).expect("log file");
        let mut child = std::process::Command::new(bin)
            .args([
                "--listen",
                "127.0.0.1:0",
                "--lease-timeout-ms",
                "4000",
                "--heartbeat-interval-ms",
                "300",
            ])
            .arg("--database")
            .arg(database)
            .arg("--addr-file")
            .arg(&addr_file)
            .stdout(std::process::Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start the coordinator");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(a) = std::fs::read_to_string(&addr_file)
                && !a.trim().is_empty()
            {
                return Self {
                    url: format!("http://{}", a.trim()),
                    child,
                };
            }
            if std::time::Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("coordinator {name} did not start; see {}", dir.display());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address it listens on.
    pub fn addr(&self) -> std::net::SocketAddr {
        self.url
            .trim_start_matches("http://")
            .parse()
            .expect("an address")
    }

    /// SIGKILL: no goodbye to anyone.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for CoordinatorProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A convolutional model under models/conv/ (squeezenet, shufflenet), materialised by
/// models/make_conv_models.py on first use (`scripts/dev.sh setup` runs it too).
pub fn conv_model(name: &str) -> PathBuf {
    let path = models(&format!("conv/{name}.onnx"));
    if !path.exists() {
        let python = python();
        let status = std::process::Command::new(&python)
            .arg(models("make_conv_models.py"))
            .status()
            .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
        assert!(status.success(), "models/make_conv_models.py failed");
    }
    path
}

/// The variants the coordinator lists for `model` (every model's when empty).
pub async fn list_variants(
    client: &Client,
    model: &str,
) -> Vec<fleetbench_proto::v1::ModelVariant> {
    client
        .models()
        .list_models(fleetbench_proto::v1::ListModelsRequest {
            model: model.to_string(),
        })
        .await
        .expect("list models")
        .into_inner()
        .variants
}

/// A test case folder (model.onnx, test_data_set_*) of the onnx package's backend test data, e.g.
/// `pytorch-converted/test_Conv2d`, from the Python environment `scripts/dev.sh setup` made.
pub fn onnx_test_case(case: &str) -> PathBuf {
    let python = python();
    let out = std::process::Command::new(&python)
        .args([
            "-c",
            "import onnx, os; print(os.path.dirname(onnx.__file__))",
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", python.display()));
    assert!(out.status.success(), "the onnx package is not importable");
    let root = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let dir = root.join("backend/test/data").join(case);
    assert!(
        dir.join("model.onnx").exists(),
        "{} is missing",
        dir.display()
    );
    dir
}

/// A coordinator on a temporary SQLite file with one in-process agent, "solo", online.
pub struct SoloFleet {
    _agent: TestAgent,
    /// The CLI's client, connected.
    pub client: Client,
    /// The coordinator.
    pub coord: TestCoordinator,
    /// Its temporary folder (dropped last).
    pub dir: tempfile::TempDir,
}

impl SoloFleet {
    /// Starts it and waits until the agent is online.
    pub async fn start() -> SoloFleet {
        let dir = tempfile::tempdir().expect("temporary folder");
        let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
        let client = coord.client().await;
        let agent = TestAgent::start(coord.agent("solo", &[], dir.path()));
        wait_online(&client, 1).await;
        SoloFleet {
            _agent: agent,
            client,
            coord,
            dir,
        }
    }
}

/// The Python the tests use for the onnx package (FLEETBENCH_PYTHON, else .venv/bin/python).
pub fn python() -> PathBuf {
    std::env::var_os("FLEETBENCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"))
}

/// A classifier written the way TensorFlow and Paddle exporters often write one (by
/// models/make_exported_style_model.py): weights in `Constant` nodes, or with `initializers_as_inputs`
/// initializers also listed as graph inputs (IR 3), and an input `x: [N, 3, H, W]` with symbolic height
/// and width. Written into `dir`; returns its path.
pub fn exported_style_model(dir: &Path, initializers_as_inputs: bool) -> PathBuf {
    let out = dir.join(format!("exported-{initializers_as_inputs}.onnx"));
    let mut cmd = std::process::Command::new(python());
    cmd.arg(models("make_exported_style_model.py")).arg(&out);
    if initializers_as_inputs {
        cmd.arg("--initializers-as-inputs");
    }
    let status = cmd
        .stdout(std::process::Stdio::null())
        .status()
        .expect("run make_exported_style_model.py");
    assert!(
        status.success(),
        "models/make_exported_style_model.py failed"
    );
    out
}

/// A TCP relay the test controls, in front of a server: its address stays the same while the server
/// behind it changes (a restarted coordinator on a new port), and it can be cut (existing connections
/// reset, new ones refused) and restored. Tests never release a port to bind it again.
pub struct Relay {
    /// The address clients connect to.
    pub addr: std::net::SocketAddr,
    upstream: Arc<std::sync::Mutex<std::net::SocketAddr>>,
    up: Arc<std::sync::atomic::AtomicBool>,
    conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>>,
}

use std::sync::Arc;

impl Relay {
    /// A relay to `upstream` on 127.0.0.1:0.
    pub async fn start(upstream: std::net::SocketAddr) -> Relay {
        use std::sync::atomic::Ordering;
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("bound");
        let up = Arc::new(std::sync::atomic::AtomicBool::new(true));
        let upstream = Arc::new(std::sync::Mutex::new(upstream));
        let conns: Arc<std::sync::Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let (up2, conns2, upstream2) = (up.clone(), conns.clone(), upstream.clone());
        tokio::spawn(async move {
            loop {
                let Ok((mut inbound, _)) = listener.accept().await else {
                    return;
                };
                let _ = inbound.set_nodelay(true);
                if !up2.load(Ordering::SeqCst) {
                    drop(inbound);
                    continue;
                }
                let target = *upstream2.lock().unwrap();
                let task = tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(target).await {
                        let _ = outbound.set_nodelay(true);
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
                let mut conns = conns2.lock().unwrap();
                conns.retain(|c| !c.is_finished());
                conns.push(task);
            }
        });
        Relay {
            addr,
            upstream,
            up,
            conns,
        }
    }

    /// `http://ADDR` of the relay.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// New connections go to `upstream` from now on.
    pub fn set_upstream(&self, upstream: std::net::SocketAddr) {
        *self.upstream.lock().unwrap() = upstream;
    }

    /// Resets every connection and refuses new ones.
    pub fn cut(&self) {
        self.up.store(false, std::sync::atomic::Ordering::SeqCst);
        for c in self.conns.lock().unwrap().drain(..) {
            c.abort();
        }
    }

    /// Accepts connections again.
    pub fn restore(&self) {
        self.up.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

/// An agent that speaks the protocol by hand, for tests that send what a real agent never would.
pub struct FakeAgent {
    /// Its id.
    pub id: String,
    /// The credential it was issued when it joined.
    pub credential: String,
    tx: tokio::sync::mpsc::Sender<fleetbench_proto::v1::AgentMessage>,
    /// What the coordinator sends it.
    pub inbound: tonic::Streaming<fleetbench_proto::v1::CoordinatorMessage>,
}

impl FakeAgent {
    /// Registers `name` with `labels` on its own host and opens a session.
    pub async fn connect(url: &str, join: &str, name: &str, labels: &[(&str, &str)]) -> FakeAgent {
        use fleetbench_proto::v1::{AgentMessage, SessionHello, agent_message};
        let channel = tonic::transport::Endpoint::from_shared(url.to_string())
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut client = agent_client_on(channel.clone(), join);
        let mut registration = fake_registration(name, "");
        registration.labels = labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let reg = client
            .register(registration)
            .await
            .expect("register")
            .into_inner();
        let mut client = agent_client_on(channel, &reg.agent_credential);
        let credential = reg.agent_credential.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(1024);
        tx.send(AgentMessage {
            body: Some(agent_message::Body::Hello(SessionHello {
                agent_id: reg.agent_id.clone(),
                current_run_id: String::new(),
            })),
        })
        .await
        .unwrap();
        let inbound = client
            .session(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("session")
            .into_inner();
        FakeAgent {
            id: reg.agent_id,
            credential,
            tx,
            inbound,
        }
    }

    /// Sends one message.
    pub async fn send(&self, body: fleetbench_proto::v1::agent_message::Body) {
        self.tx
            .send(fleetbench_proto::v1::AgentMessage { body: Some(body) })
            .await
            .expect("the session is open");
    }

    /// The next message from the coordinator, if one comes within `timeout` and the session lasts.
    pub async fn next(
        &mut self,
        timeout: Duration,
    ) -> Option<fleetbench_proto::v1::coordinator_message::Body> {
        match tokio::time::timeout(timeout, self.inbound.message()).await {
            Ok(Ok(Some(m))) => m.body,
            _ => None,
        }
    }

    /// Heartbeats for `run_id` every 200 ms (keeping its lease) until the returned handle is dropped.
    pub fn keep_lease(&self, run_id: &str) -> KeepLease {
        let (tx, run_id) = (self.tx.clone(), run_id.to_string());
        KeepLease(tokio::spawn(async move {
            loop {
                let beat = fleetbench_proto::v1::AgentMessage {
                    body: Some(fleetbench_proto::v1::agent_message::Body::Heartbeat(
                        fleetbench_proto::v1::Heartbeat {
                            current_run_id: run_id.clone(),
                        },
                    )),
                };
                if tx.send(beat).await.is_err() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }))
    }

    /// Waits for a task assignment (skipping other messages).
    pub async fn assignment(&mut self) -> fleetbench_proto::v1::TaskAssignment {
        use fleetbench_proto::v1::coordinator_message::Body;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match self.next(left).await {
                Some(Body::Assignment(a)) => return a,
                Some(_) => continue,
                None => panic!("no assignment came"),
            }
        }
    }
}

/// Heartbeats of a [`FakeAgent`]; they stop when this is dropped.
pub struct KeepLease(JoinHandle<()>);

impl Drop for KeepLease {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A window of `queries` latencies of 1 µs each, as an agent would send it.
pub fn fake_window(run_id: &str, seq: u64, queries: u64) -> fleetbench_proto::v1::TelemetryWindow {
    let mut h = fleetbench_common::hist::new_histogram();
    for _ in 0..queries {
        fleetbench_common::hist::record_ns(&mut h, 1_000);
    }
    fleetbench_proto::v1::TelemetryWindow {
        run_id: run_id.into(),
        seq,
        start_offset_ns: seq * 1_000_000,
        end_offset_ns: (seq + 1) * 1_000_000,
        queries,
        samples: queries,
        latency_histogram: fleetbench_common::hist::encode(&h),
        closed_at_ms: fleetbench_common::now_ms(),
        ..Default::default()
    }
}

/// A store that passes every call to the real one, except that reading an agent's active run fails
/// while `fail_active_run` is set: a database read error at the moment an agent reconnects.
pub struct FaultyStore {
    /// The real store.
    pub inner: Arc<dyn fleetbench_coordinator::store::Store>,
    /// While true, `active_run_of_agent` fails as a lost connection would.
    pub fail_active_run: std::sync::atomic::AtomicBool,
    /// How many calls failed so.
    pub failed_calls: std::sync::atomic::AtomicU64,
    /// While true, staging upload bytes fails as a full disk does.
    pub fail_staging: std::sync::atomic::AtomicBool,
    /// Heartbeat batches wait for a read lock of this: a test holds the write lock to hold them.
    pub heartbeat_gate: tokio::sync::RwLock<()>,
    /// Heartbeat batches that reached the store, and those that were recorded.
    pub heartbeat_calls: tokio::sync::watch::Sender<(u64, u64)>,
    /// Times an agent was marked disconnected.
    pub disconnects: tokio::sync::watch::Sender<u64>,
    /// While true, `ping` fails as an unreachable database does.
    pub fail_ping: std::sync::atomic::AtomicBool,
}

impl FaultyStore {
    /// A store that passes everything to `inner` until a fault is switched on.
    pub fn over(inner: Arc<dyn fleetbench_coordinator::store::Store>) -> Self {
        FaultyStore {
            inner,
            fail_active_run: Default::default(),
            failed_calls: Default::default(),
            fail_staging: Default::default(),
            heartbeat_gate: Default::default(),
            heartbeat_calls: tokio::sync::watch::Sender::new((0, 0)),
            disconnects: tokio::sync::watch::Sender::new(0),
            fail_ping: Default::default(),
        }
    }
}

mod faulty {
    use fleetbench_coordinator::Result;
    use fleetbench_coordinator::domain::*;
    use fleetbench_coordinator::store::*;

    use super::FaultyStore;

    #[async_trait::async_trait]
    impl BlobStore for FaultyStore {
        async fn blob_size(&self, sha256: &str) -> Result<Option<u64>> {
            self.inner.blob_size(sha256).await
        }
        async fn read_blob(&self, sha256: &str, offset: u64, max_len: usize) -> Result<Vec<u8>> {
            self.inner.read_blob(sha256, offset, max_len).await
        }
        async fn staged_len(&self, stage: &str) -> Result<u64> {
            self.inner.staged_len(stage).await
        }
        async fn read_staged(&self, stage: &str, offset: u64, max_len: usize) -> Result<Vec<u8>> {
            self.inner.read_staged(stage, offset, max_len).await
        }
        async fn stage_chunk(&self, stage: &str, offset: u64, data: &[u8]) -> Result<()> {
            if self.fail_staging.load(std::sync::atomic::Ordering::SeqCst) {
                self.failed_calls
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return Err(fleetbench_coordinator::Error::io(
                    "staging",
                    std::io::Error::from_raw_os_error(libc::ENOSPC),
                ));
            }
            self.inner.stage_chunk(stage, offset, data).await
        }
        async fn commit_staged(&self, stage: &str, sha256: &str, size: u64) -> Result<()> {
            self.inner.commit_staged(stage, sha256, size).await
        }
        async fn discard_staged(&self, stage: &str) -> Result<()> {
            self.inner.discard_staged(stage).await
        }
        fn free_bytes(&self) -> Option<u64> {
            self.inner.free_bytes()
        }
    }

    #[async_trait::async_trait]
    impl ArtifactStore for FaultyStore {
        async fn put_set(
            &self,
            sha256: &str,
            set: &fleetbench_common::artifact::ArtifactSet,
            now: i64,
        ) -> Result<()> {
            self.inner.put_set(sha256, set, now).await
        }
        async fn get_set(
            &self,
            sha256: &str,
        ) -> Result<Option<fleetbench_common::artifact::ArtifactSet>> {
            self.inner.get_set(sha256).await
        }
        async fn put_upload(&self, upload: &Upload) -> Result<Upload> {
            self.inner.put_upload(upload).await
        }
        async fn get_upload(&self, id: &str) -> Result<Option<Upload>> {
            self.inner.get_upload(id).await
        }
        async fn delete_upload(&self, id: &str) -> Result<()> {
            self.inner.delete_upload(id).await
        }
        async fn stale_uploads(&self, before: i64) -> Result<Vec<Upload>> {
            self.inner.stale_uploads(before).await
        }
    }

    #[async_trait::async_trait]
    impl VariantStore for FaultyStore {
        async fn insert_variant(&self, v: &Variant) -> Result<VariantInsert> {
            self.inner.insert_variant(v).await
        }
        async fn list_variants(&self, model: Option<&str>) -> Result<Vec<Variant>> {
            self.inner.list_variants(model).await
        }
        async fn delete_variants(
            &self,
            model: &str,
            variants: &[String],
            dry_run: bool,
        ) -> Result<Deletion> {
            self.inner.delete_variants(model, variants, dry_run).await
        }
    }

    #[async_trait::async_trait]
    impl AgentStore for FaultyStore {
        async fn upsert_platform(&self, id: &str, name: &str, d: &Inventory) -> Result<()> {
            self.inner.upsert_platform(id, name, d).await
        }
        async fn register_agent(&self, reg: &AgentRegistration, now: i64) -> Result<String> {
            self.inner.register_agent(reg, now).await
        }
        async fn get_agent(&self, agent_id: &str) -> Result<Option<AgentRecord>> {
            self.inner.get_agent(agent_id).await
        }
        async fn list_agents(&self) -> Result<Vec<AgentRecord>> {
            self.inner.list_agents().await
        }
        async fn set_connected(&self, agent_id: &str, connected: bool, now: i64) -> Result<()> {
            let r = self.inner.set_connected(agent_id, connected, now).await;
            if !connected {
                self.disconnects.send_modify(|n| *n += 1);
            }
            r
        }
        async fn set_network(
            &self,
            agent_id: &str,
            paths: &[fleetbench_common::network::NetworkPath],
        ) -> Result<()> {
            self.inner.set_network(agent_id, paths).await
        }
    }

    #[async_trait::async_trait]
    impl JobStore for FaultyStore {
        async fn create_job(&self, job: &NewJob, now: i64) -> Result<()> {
            self.inner.create_job(job, now).await
        }
        async fn resolve_job_id(&self, id: &str) -> Result<String> {
            self.inner.resolve_job_id(id).await
        }
        async fn list_jobs(&self, limit: u32) -> Result<Vec<JobSummary>> {
            self.inner.list_jobs(limit).await
        }
        async fn task_counts(&self) -> Result<Vec<(String, u64)>> {
            self.inner.task_counts().await
        }
        async fn get_job(&self, job_id: &str) -> Result<(JobSummary, JobSpec)> {
            self.inner.get_job(job_id).await
        }
        async fn job_tasks(&self, job_id: &str) -> Result<Vec<TaskInfo>> {
            self.inner.job_tasks(job_id).await
        }
        async fn cancel_job(&self, job_id: &str, now: i64) -> Result<Vec<(String, String)>> {
            self.inner.cancel_job(job_id, now).await
        }
        async fn delete_job(&self, job_id: &str) -> Result<u64> {
            self.inner.delete_job(job_id).await
        }
    }

    #[async_trait::async_trait]
    impl LeaseStore for FaultyStore {
        async fn lease_task(&self, req: &LeaseRequest, now: i64) -> Result<Option<Lease>> {
            self.inner.lease_task(req, now).await
        }
        async fn active_lease_of_agent(&self, agent_id: &str) -> Result<Option<Lease>> {
            self.inner.active_lease_of_agent(agent_id).await
        }
        async fn active_run_of_agent(&self, agent_id: &str) -> Result<Option<String>> {
            if self
                .fail_active_run
                .load(std::sync::atomic::Ordering::SeqCst)
            {
                self.failed_calls
                    .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                return Err(fleetbench_coordinator::Error::Database(sqlx::Error::Io(
                    std::io::Error::other("connection reset by peer"),
                )));
            }
            self.inner.active_run_of_agent(agent_id).await
        }
        async fn replica_seen(&self, replica: &str, now: i64, trouble_at: i64) -> Result<()> {
            self.inner.replica_seen(replica, now, trouble_at).await
        }
        async fn expire_leases(
            &self,
            now: i64,
            max_attempts: u32,
            replica: &str,
            lease_timeout_ms: i64,
        ) -> Result<Vec<ExpiredLease>> {
            self.inner
                .expire_leases(now, max_attempts, replica, lease_timeout_ms)
                .await
        }
        async fn release_run(
            &self,
            run_id: &str,
            reason: &str,
            now: i64,
            max_attempts: u32,
            refund: bool,
        ) -> Result<Option<ExpiredLease>> {
            self.inner
                .release_run(run_id, reason, now, max_attempts, refund)
                .await
        }
        async fn heartbeats(
            &self,
            beats: &[HeartbeatRecord],
            now: i64,
            lease_until: i64,
            replica: &str,
        ) -> Result<Vec<Option<bool>>> {
            self.heartbeat_calls.send_modify(|(n, _)| *n += 1);
            let _held = self.heartbeat_gate.read().await;
            let r = self
                .inner
                .heartbeats(beats, now, lease_until, replica)
                .await;
            self.heartbeat_calls.send_modify(|(_, n)| *n += 1);
            r
        }
    }

    #[async_trait::async_trait]
    impl TelemetryStore for FaultyStore {
        async fn store_windows(
            &self,
            windows: &[(String, Window)],
            now: i64,
        ) -> Result<StoredWindows> {
            self.inner.store_windows(windows, now).await
        }
        async fn run_context(&self, run_id: &str) -> Result<Option<RunContext>> {
            self.inner.run_context(run_id).await
        }
        async fn run_labels(
            &self,
            run_id: &str,
        ) -> Result<Option<fleetbench_coordinator::store::RunLabels>> {
            self.inner.run_labels(run_id).await
        }
        async fn finish_run(&self, run: &FinishedRun, now: i64) -> Result<()> {
            self.inner.finish_run(run, now).await
        }
        async fn runs_for_model(&self, model: &str, job: Option<&str>) -> Result<Vec<StoredRun>> {
            self.inner.runs_for_model(model, job).await
        }
        async fn drop_windows(&self, finished_before: i64, limit: u32) -> Result<u64> {
            self.inner.drop_windows(finished_before, limit).await
        }
        async fn window_count(&self, run_id: &str) -> Result<u64> {
            self.inner.window_count(run_id).await
        }
        async fn claim(&self, name: &str, holder: &str, now: i64, until: i64) -> Result<bool> {
            self.inner.claim(name, holder, now, until).await
        }
    }

    #[async_trait::async_trait]
    impl TokenStore for FaultyStore {
        async fn insert_token(&self, t: &TokenRecord) -> Result<()> {
            self.inner.insert_token(t).await
        }
        async fn get_token(&self, id: &str) -> Result<Option<TokenRecord>> {
            self.inner.get_token(id).await
        }
        async fn token_by_name(&self, name: &str) -> Result<Option<TokenRecord>> {
            self.inner.token_by_name(name).await
        }
        async fn list_tokens(&self) -> Result<Vec<TokenRecord>> {
            self.inner.list_tokens().await
        }
        async fn revoke_token(&self, id: &str, now: i64) -> Result<()> {
            self.inner.revoke_token(id, now).await
        }
        async fn set_token_secret(&self, id: &str, secret_sha256: &str) -> Result<()> {
            self.inner.set_token_secret(id, secret_sha256).await
        }
        async fn use_token(&self, id: &str, now: i64, consume: bool) -> Result<bool> {
            self.inner.use_token(id, now, consume).await
        }
        async fn replace_agent_credential(&self, t: &TokenRecord) -> Result<()> {
            self.inner.replace_agent_credential(t).await
        }
        async fn offer_token_secret(&self, id: &str, next_sha256: &str) -> Result<()> {
            self.inner.offer_token_secret(id, next_sha256).await
        }
        async fn promote_token_secret(
            &self,
            id: &str,
            next_sha256: &str,
            expires_at: i64,
            now: i64,
        ) -> Result<bool> {
            self.inner
                .promote_token_secret(id, next_sha256, expires_at, now)
                .await
        }
        async fn revoke_agent_credentials(&self, agent_id: &str, now: i64) -> Result<u64> {
            self.inner.revoke_agent_credentials(agent_id, now).await
        }
    }

    #[async_trait::async_trait]
    impl Store for FaultyStore {
        fn backend(&self) -> &'static str {
            self.inner.backend()
        }
        async fn ping(&self) -> Result<()> {
            if self.fail_ping.load(std::sync::atomic::Ordering::SeqCst) {
                return Err(fleetbench_coordinator::Error::Database(
                    sqlx::Error::PoolTimedOut,
                ));
            }
            self.inner.ping().await
        }
    }
}

impl TestCoordinator {
    /// Serves `config` on 127.0.0.1:0 over its database wrapped in a [`FaultyStore`], which the test
    /// drives.
    pub async fn faulty(config: CoordinatorConfig) -> (Self, Arc<FaultyStore>) {
        let real = fleetbench_coordinator::store::open(&config.database)
            .await
            .expect("open the database");
        let store = Arc::new(FaultyStore::over(real));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind 127.0.0.1:0");
        let coord = Self::serve_store(config, store.clone(), listener).await;
        (coord, store)
    }

    /// Serves `config` with a given store (a double) on `listener`.
    pub async fn serve_store(
        config: CoordinatorConfig,
        store: Arc<dyn fleetbench_coordinator::store::Store>,
        listener: TcpListener,
    ) -> Self {
        init_logs();
        let addr = listener.local_addr().expect("bound");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let database = config.database.clone();
        let tokens = Tokens::make(store.as_ref()).await;
        let handle = tokio::spawn(fleetbench_coordinator::serve_with_store(
            config,
            store,
            listener,
            async {
                let _ = rx.await;
            },
        ));
        Self {
            url: format!("http://{addr}"),
            addr,
            database,
            ca_cert: None,
            tokens,
            stop: Some(tx),
            handle: Some(handle),
        }
    }
}

/// A coordinator started by a shell script in a mount namespace of its own, so that the script can
/// mount a small tmpfs only it sees (a disk that fills up). The script must start the coordinator with
/// `--addr-file ADDR` in the background and write its pid to `PID`, then `wait`.
pub struct NamespacedCoordinator {
    /// The shell (`unshare … sh -c SCRIPT`).
    pub shell: std::process::Child,
    /// `http://ADDR` of the coordinator.
    pub url: String,
    /// The coordinator's pid.
    pub pid: i32,
}

impl NamespacedCoordinator {
    /// Runs `script`, waiting until the coordinator wrote `addr_file` and `pid_file`; its stderr goes
    /// to `log`.
    pub fn start(script: &str, addr_file: &Path, pid_file: &Path, log: &Path) -> Self {
        let mut shell = std::process::Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c", script])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(log).expect("create the log"))
            .spawn()
            .expect("unshare (util-linux) and root are needed for a private tmpfs");
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let addr = loop {
            if let Ok(a) = std::fs::read_to_string(addr_file)
                && !a.trim().is_empty()
            {
                break a.trim().to_string();
            }
            assert!(
                std::time::Instant::now() < deadline && shell.try_wait().unwrap().is_none(),
                "the coordinator did not start: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        let pid = std::fs::read_to_string(pid_file)
            .expect("the pid file")
            .trim()
            .parse()
            .expect("a pid");
        NamespacedCoordinator {
            shell,
            url: format!("http://{addr}"),
            pid,
        }
    }

    /// Stops the coordinator (SIGTERM) and waits for the shell; what the script does after `wait`
    /// (copying files out of the tmpfs) is done when this returns.
    pub fn stop(mut self) {
        // SAFETY: kill has no memory-safety preconditions; the pid is the coordinator this started.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        let _ = self.shell.wait();
    }

    /// `path` inside the coordinator's mount namespace, seen from here.
    pub fn inside(&self, path: &Path) -> PathBuf {
        Path::new(&format!("/proc/{}/root", self.pid)).join(path.strip_prefix("/").unwrap_or(path))
    }
}

impl Drop for NamespacedCoordinator {
    fn drop(&mut self) {
        // A test that failed leaves no coordinator behind.
        if self.shell.try_wait().ok().flatten().is_none() {
            // SAFETY: as in stop().
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
            let _ = self.shell.wait();
        }
    }
}

/// A child process, killed and reaped when dropped.
pub struct Killed(pub std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `command` (the real `fleetbench-agent`, or something that runs it) with what every agent of these
/// tests takes: `coordinator` (`coord`'s address, or a path to it), `name`, its state in `dir/NAME`,
/// the runtime, `coord`'s join token, and its log in `dir/NAME.log`. Flags of its own follow.
pub fn agent_command(
    mut command: std::process::Command,
    coordinator: &str,
    name: &str,
    coord: &TestCoordinator,
    dir: &Path,
) -> std::process::Command {
    command
        .args(["--coordinator", coordinator, "--name", name])
        .arg("--state-dir")
        .arg(dir.join(name))
        .arg("--ort-lib")
        .arg(ort_lib())
        .env("FLEETBENCH_JOIN_TOKEN", &coord.tokens.join)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{name}.log"))).unwrap());
    command
}

/// The real `fleetbench-agent` as `name`, pinned to CPU `cpu` with taskset (its platform then has
/// one core), joining `coord`; its log goes to `dir/NAME.log`.
pub fn pinned_agent(coord: &TestCoordinator, name: &str, cpu: u32, dir: &Path) -> Killed {
    let mut taskset = std::process::Command::new("taskset");
    taskset
        .args(["-c", &cpu.to_string()])
        .arg(built_bin("fleetbench-agent"));
    Killed(
        agent_command(taskset, &coord.url, name, coord, dir)
            .spawn()
            .expect("taskset (util-linux) and the agent binary"),
    )
}

/// A process that keeps CPU `cpu` busy until dropped.
pub fn cpu_burner(cpu: u32) -> Killed {
    Killed(
        std::process::Command::new("taskset")
            .args(["-c", &cpu.to_string(), "sh", "-c", "while :; do :; done"])
            .spawn()
            .expect("taskset and sh"),
    )
}

/// A link with a propagation delay and a rate limit, as a TCP proxy on `listen`:0 in front of
/// `upstream` (`tc netem` is not available on every kernel). Bytes each way are held `delay` after
/// they are read and leave no faster than `rate` bytes per second (serialisation, then
/// propagation), so a round trip through it takes 2 × `delay` and a transfer of N bytes N / `rate`
/// more.
pub struct SlowLink {
    /// The address clients connect to.
    pub addr: std::net::SocketAddr,
    task: JoinHandle<()>,
}

impl SlowLink {
    /// Starts the link.
    pub async fn start(
        listen: std::net::IpAddr,
        upstream: std::net::SocketAddr,
        delay: Duration,
        rate: Option<f64>,
    ) -> SlowLink {
        let listener = TcpListener::bind((listen, 0)).await.expect("bind the link");
        let addr = listener.local_addr().expect("bound");
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(upstream).await else {
                        return;
                    };
                    let _ = (inbound.set_nodelay(true), outbound.set_nodelay(true));
                    let (ir, iw) = inbound.into_split();
                    let (or, ow) = outbound.into_split();
                    tokio::join!(
                        Self::pump(ir, ow, delay, rate),
                        Self::pump(or, iw, delay, rate)
                    );
                });
            }
        });
        SlowLink { addr, task }
    }

    async fn pump(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        delay: Duration,
        rate: Option<f64>,
    ) {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let (tx, mut rx) =
            tokio::sync::mpsc::unbounded_channel::<(tokio::time::Instant, Vec<u8>)>();
        let read = async move {
            let mut buf = vec![0u8; 16 * 1024];
            let mut free = tokio::time::Instant::now();
            while let Ok(n @ 1..) = from.read(&mut buf).await {
                let start = free.max(tokio::time::Instant::now());
                free =
                    start + rate.map_or(Duration::ZERO, |r| Duration::from_secs_f64(n as f64 / r));
                if tx.send((free + delay, buf[..n].to_vec())).is_err() {
                    break;
                }
            }
        };
        let write = async move {
            while let Some((due, data)) = rx.recv().await {
                tokio::time::sleep_until(due).await;
                if to.write_all(&data).await.is_err() {
                    return;
                }
            }
            let _ = to.shutdown().await;
        };
        tokio::join!(read, write);
    }
}

impl Drop for SlowLink {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A network namespace joined to this one by a veth pair, removed when dropped: processes started
/// in it (`command`) reach this namespace only at `host_ip`.
pub struct Netns {
    /// Its name.
    pub name: String,
    /// The address of this namespace's end of the pair.
    pub host_ip: std::net::Ipv4Addr,
    veth: String,
}

impl Netns {
    /// Creates one; needs root (CI runs as root), and says so when it cannot.
    pub fn create() -> Netns {
        let pid = std::process::id();
        let name = format!("fbns{pid}");
        let veth = format!("fbh{pid}");
        let peer = format!("fbp{pid}");
        let (a, b) = ((pid % 250) as u8, ((pid / 250) % 64) as u8 * 4);
        let host_ip = std::net::Ipv4Addr::new(10, 231, a, b + 1);
        let ns_ip = std::net::Ipv4Addr::new(10, 231, a, b + 2);
        let ns = Netns {
            name: name.clone(),
            host_ip,
            veth: veth.clone(),
        };
        let host = host_ip.to_string() + "/30";
        let inner = ns_ip.to_string() + "/30";
        for cmd in [
            vec!["netns", "add", &name],
            vec!["link", "add", &veth, "type", "veth", "peer", "name", &peer],
            vec!["link", "set", &peer, "netns", &name],
            vec!["addr", "add", &host, "dev", &veth],
            vec!["link", "set", &veth, "up"],
            vec!["-n", &name, "addr", "add", &inner, "dev", &peer],
            vec!["-n", &name, "link", "set", &peer, "up"],
            vec!["-n", &name, "link", "set", "lo", "up"],
        ] {
            let out = std::process::Command::new("ip")
                .args(&cmd)
                .output()
                .expect("the ip command (iproute2)");
            assert!(
                out.status.success(),
                "`ip {}` failed: {} (network namespaces need root; CI runs as root)",
                cmd.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        ns
    }

    /// `program` to run inside the namespace.
    pub fn command(&self, program: &Path) -> std::process::Command {
        let mut c = std::process::Command::new("ip");
        c.args(["netns", "exec", &self.name]).arg(program);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.veth])
            .output();
        let _ = std::process::Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// The real `fleetbench-agent probe-server` on `listen` (port 0 for any), and the address it
/// printed.
pub fn probe_server(listen: &str) -> (Killed, std::net::SocketAddr) {
    use std::io::BufRead;
    let mut child = std::process::Command::new(built_bin("fleetbench-agent"))
        .args(["probe-server", "--listen", listen])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the probe server");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("stdout"))
        .read_line(&mut line)
        .expect("read its address");
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .unwrap_or_else(|| panic!("the probe server printed '{line}'"))
        .parse()
        .expect("an address");
    (Killed(child), addr)
}
