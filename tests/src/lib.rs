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
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<JoinHandle<fleetbench_coordinator::Result<()>>>,
}

/// Settings suited to tests: short leases and ticks.
pub fn test_config(database: &str) -> CoordinatorConfig {
    CoordinatorConfig {
        listen: "127.0.0.1:0".into(),
        database: database.to_string(),
        heartbeat_interval_ms: 200,
        lease_timeout_ms: 2000,
        scheduler_tick_ms: 100,
        ..Default::default()
    }
}

impl TestCoordinator {
    /// Serves `config` on `listener` (so a test can restart on the same port).
    pub async fn serve(config: CoordinatorConfig, listener: TcpListener) -> Self {
        let addr = listener.local_addr().expect("bound");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let database = config.database.clone();
        let handle = tokio::spawn(fleetbench_coordinator::serve(config, listener, async {
            let _ = rx.await;
        }));
        let url = format!("http://{addr}");
        // The listener is bound before serve starts, so connections queue until it accepts.
        Self {
            url,
            addr,
            database,
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

    /// A CLI client connected to it.
    pub async fn client(&self) -> Client {
        Client::connect(&self.url)
            .await
            .expect("connect to the test coordinator")
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

/// Settings for an in-process agent.
pub fn agent_config(url: &str, name: &str, labels: &[&str], state_dir: &Path) -> AgentConfig {
    AgentConfig {
        coordinator: vec![url.to_string()],
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
        let runtime =
            fleetbench_agent::runtime::load(Some(&config.ort_lib)).expect("ONNX Runtime loads");
        let runner = runner.unwrap_or_else(|| {
            std::sync::Arc::new(fleetbench_agent::runner::OrtRunner { runtime })
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
    tokio::time::timeout(
        timeout,
        fleetbench_cli::commands::jobs::watch(client, job, false),
    )
    .await
    .unwrap_or_else(|_| panic!("job {job} did not end within {timeout:?}"))
    .expect("watch the job")
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
        sqlx::Executor::execute(&mut conn, format!("CREATE DATABASE {name}").as_str())
            .await
            .expect("create database");
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
        let url = format!("{base}/{name}");
        PgDb { admin, name, url }
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
        let exe = std::env::current_exe().expect("test binary path");
        let bin = exe
            .parent()
            .and_then(|d| d.parent())
            .map(|d| d.join("fleetbench-coordinator"))
            .expect("target dir");
        assert!(
            bin.exists(),
            "{} is missing: build the binaries first (cargo build --release --bins, or scripts/dev.sh test)",
            bin.display()
        );
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
        let python = std::env::var_os("FLEETBENCH_PYTHON")
            .map(PathBuf::from)
            .unwrap_or_else(|| repo().join(".venv/bin/python"));
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
    let python = std::env::var_os("FLEETBENCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"));
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
        let agent = TestAgent::start(agent_config(&coord.url, "solo", &[], dir.path()));
        wait_online(&client, 1).await;
        SoloFleet {
            _agent: agent,
            client,
            coord,
            dir,
        }
    }
}
