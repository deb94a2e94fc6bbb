//! A coordinator others can reach: TLS with the coordinator's own CA (made as `init` makes it), the
//! CLI and the agent verifying it, and the standard health and reflection services asked by grpcio's
//! own Python clients. Real TLS on 127.0.0.1:0.

use std::time::Duration;

use fleetbench_cli::client::Client;
use fleetbench_cli::commands::jobs;
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_proto::v1::ListAgentsRequest;
use fleetbench_tests::*;

async fn list(client: &Client) -> Result<usize, String> {
    client
        .fleet()
        .list_agents(ListAgentsRequest {})
        .await
        .map(|r| r.into_inner().agents.len())
        .map_err(|s| format!("{:#}", client.error(s, "list agents")))
}

/// Asks the coordinator with tests/py/grpc_probe.py; returns its output lines.
fn probe(addr: std::net::SocketAddr, ca: &std::path::Path, args: &[&str]) -> Vec<String> {
    let out = std::process::Command::new(python())
        .arg(repo().join("tests/py/grpc_probe.py"))
        .arg(format!("localhost:{}", addr.port()))
        .arg(ca)
        .args(args)
        .output()
        .expect("run tests/py/grpc_probe.py");
    assert!(
        out.status.success(),
        "grpc_probe.py {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_cli_and_an_agent_work_over_tls_and_wrong_trust_is_refused_clearly() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite_tls(dir.path(), |_| {}).await;
    assert!(coord.url.starts_with("https://"), "{}", coord.url);
    let ca = coord.ca_cert.clone().unwrap();

    // The CLI, trusting the CA.
    let client = coord.client().await;
    assert_eq!(list(&client).await, Ok(0));

    // Plaintext to a TLS port.
    let plain = Client::connect(&format!("http://{}", coord.addr), Some(&coord.tokens.admin))
        .await
        .unwrap();
    let e = list(&plain).await.unwrap_err();
    assert!(e.contains("https://"), "{e}");
    println!("plaintext to TLS: {e}");
    // https:// without the CA.
    let e = Client::connect_with(&coord.url, None, Some(&coord.tokens.admin))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("--ca-cert"), "{e}");
    println!("https without a CA: {e}");
    // A CA that did not sign the server's certificate.
    let other = tempfile::tempdir().unwrap();
    let files = fleetbench_coordinator::tls::TlsFiles::under(other.path());
    fleetbench_coordinator::tls::init(&files, &[]).unwrap();
    let wrong = Client::connect_with(
        &coord.url,
        Some(&files.ca_cert()),
        Some(&coord.tokens.admin),
    )
    .await
    .unwrap();
    let e = list(&wrong).await.unwrap_err();
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    println!("another CA: {e}");
    // A file that is not a certificate.
    let e = Client::connect_with(&coord.url, Some(&files.ca_key()), Some(&coord.tokens.admin))
        .await
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a PEM certificate"), "{e}");

    // An agent verifying the coordinator runs a job end to end.
    let mut config = coord.agent("tls-agent", &[], dir.path());
    config.ca_cert = ca.clone();
    let _agent = TestAgent::start(config);
    wait_online(&client, 1).await;
    push_digits(&client).await;
    let id = jobs::submit(
        &client,
        &JobArgs {
            model: Some("digits".into()),
            variants: vec!["fp32".into()],
            iterations: Some(50),
            warmup: Some(5),
            skip_accuracy: true,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(
        wait_job(&client, &id, Duration::from_secs(60)).await.state,
        "succeeded"
    );

    // An agent given https:// without the CA refuses to start, naming the setting.
    let config = fleetbench_agent::AgentConfig {
        coordinator: vec![coord.url.clone()],
        ..Default::default()
    };
    let e = config.validate().unwrap_err().to_string();
    assert!(e.contains("ca_cert"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_and_reflection_answer_generic_clients_and_health_follows_the_database() {
    let dir = tempfile::tempdir().unwrap();
    let files = fleetbench_coordinator::tls::TlsFiles::under(dir.path());
    fleetbench_coordinator::tls::init(&files, &[]).unwrap();
    let mut config = test_config(&format!(
        "sqlite://{}",
        dir.path().join("fleet.db").display()
    ));
    config.data_dir = dir.path().display().to_string();
    let (coord, store) = TestCoordinator::faulty(config).await;
    let ca = files.ca_cert();
    let addr = coord.addr;
    let ask = move |args: Vec<&'static str>| {
        let ca = ca.clone();
        tokio::task::spawn_blocking(move || probe(addr, &ca, &args))
    };
    // Health answers without credentials, for the server and for each service.
    let status = |service: &'static str| ask(vec!["health", service]);
    let wait_for = |want: &'static str, service: &'static str| async move {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let got = status(service).await.unwrap();
            if got == [want] {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "health of '{service}' stayed {got:?}, not {want}"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    wait_for("SERVING", "").await;
    wait_for("SERVING", "fleetbench.v1.JobService").await;
    // Reflection lists fleetbench's services and the standard ones.
    let services = ask(vec!["services"]).await.unwrap();
    for s in [
        "fleetbench.v1.AgentService",
        "fleetbench.v1.ModelService",
        "fleetbench.v1.JobService",
        "fleetbench.v1.FleetService",
        "fleetbench.v1.RankingService",
        "grpc.health.v1.Health",
    ] {
        assert!(services.iter().any(|x| x == s), "{s} not in {services:?}");
    }
    // The database stops answering: NOT_SERVING; it answers again: SERVING.
    store
        .fail_ping
        .store(true, std::sync::atomic::Ordering::SeqCst);
    wait_for("NOT_SERVING", "").await;
    wait_for("NOT_SERVING", "fleetbench.v1.ModelService").await;
    store
        .fail_ping
        .store(false, std::sync::atomic::Ordering::SeqCst);
    wait_for("SERVING", "").await;
}

/// SHA-256 of a DER certificate, hex.
fn sha256_hex(der: &[u8]) -> String {
    fleetbench_common::sha256_hex(der)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_holding_only_a_join_token_finds_the_ca_it_pins_and_a_wrong_pin_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite_tls(dir.path(), |_| {}).await;
    let client = coord.client().await;
    let ca_pem = std::fs::read_to_string(coord.ca_cert.as_ref().unwrap()).unwrap();
    let fingerprint = fleetbench_common::token::ca_fingerprint(&ca_pem).unwrap();
    let mut join = fleetbench_common::token::JoinToken::parse(&coord.tokens.join).unwrap();
    join.ca_sha256 = fingerprint.clone();
    let pinned = join.to_secret_string().expose().to_string();

    // The coordinator presents its CA beside its own certificate; a pin of another CA finds nothing
    // and the error says what was presented.
    let chain = fleetbench_proto::connect::presented_chain(&coord.url)
        .await
        .unwrap();
    assert_eq!(chain.len(), 2);
    assert_eq!(sha256_hex(&chain[1]), fingerprint);
    let other = "ab".repeat(32);
    let e = fleetbench_proto::connect::fetch_pinned_ca(&coord.url, &other)
        .await
        .unwrap_err();
    assert!(
        matches!(&e, fleetbench_proto::connect::PinError::NotPinned(m) if m.contains(&other) && m.contains(&fingerprint)),
        "{e}"
    );
    println!("a wrong pin: {e}");
    // Plain TCP that is not TLS: a clear error, not a hang.
    let e = fleetbench_proto::connect::presented_chain(&format!(
        "https://{}",
        not_tls_listener().await
    ))
    .await
    .unwrap_err();
    assert!(e.contains("TLS"), "{e}");

    // An agent with the pinned join token and no --ca-cert joins over verified TLS and keeps the CA.
    let config = agent_config(&coord.url, &pinned, "pinned", &[], dir.path());
    let state = config.state_dir.clone();
    assert!(config.ca_cert.as_os_str().is_empty());
    config.validate().unwrap();
    let _agent = TestAgent::start(config);
    wait_online(&client, 1).await;
    let kept = std::fs::read_to_string(fleetbench_agent::uplink::pinned_ca_file(&state)).unwrap();
    assert_eq!(
        fleetbench_common::token::ca_fingerprint(&kept).unwrap(),
        fingerprint
    );
    // Later starts go by the kept CA; a join token pinning another CA is refused at start.
    join.ca_sha256 = other;
    let config = agent_config(
        &coord.url,
        join.to_secret_string().expose(),
        "pinned",
        &[],
        dir.path(),
    );
    let (_tx, rx) = tokio::sync::watch::channel(false);
    let e = fleetbench_agent::run(config, rx)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("pins the CA certificate"), "{e}");
}

/// An address where something listens that is not a TLS server (it accepts and closes).
async fn not_tls_listener() -> std::net::SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            drop(s);
        }
    });
    addr
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_server_certificate_is_renewed_before_it_expires_without_a_restart() {
    use fleetbench_coordinator::tls;
    let dir = tempfile::tempdir().unwrap();
    let files = tls::TlsFiles::under(dir.path());
    tls::init(&files, &[]).unwrap();
    // A certificate with ten minutes left of its seventy.
    let names = vec!["localhost".to_string(), "127.0.0.1".to_string()];
    tls::issue_server(&files, &names, time::Duration::minutes(10)).unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |c| {
        c.data_dir = dir.path().display().to_string();
        c.tls_reload_interval_ms = 100;
    })
    .await;
    let client = coord.client().await;
    let now = || time::OffsetDateTime::now_utc().unix_timestamp();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let renewed = loop {
        let chain = fleetbench_proto::connect::presented_chain(&coord.url)
            .await
            .unwrap();
        let info = tls::cert_info(&chain[0]).unwrap();
        if info.not_after - now() > 300 * 86_400 {
            break info;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "never renewed: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(renewed.names, names);
    // The client that connected before still works, and a new one verifies the new certificate.
    assert_eq!(list(&client).await, Ok(0));
    assert_eq!(list(&coord.client().await).await, Ok(0));
}

/// Runs the real `fleetbench-agent` against `url` with `join` (a join token) and no CA file, until its
/// log says `phrase`; returns the log. The agent is stopped before this returns.
async fn agent_logs_until(
    url: &str,
    join: &fleetbench_common::token::JoinToken,
    state: &std::path::Path,
    phrase: &str,
) -> String {
    let log_path = state.with_extension("log");
    let mut agent = std::process::Command::new(built_bin("fleetbench-agent"))
        .args(["--coordinator", url, "--name", "pinned"])
        .arg("--state-dir")
        .arg(state)
        .arg("--ort-lib")
        .arg(ort_lib())
        .env("FLEETBENCH_JOIN_TOKEN", join.to_secret_string().expose())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let log = loop {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        if log.contains(phrase) {
            break log;
        }
        if std::time::Instant::now() >= deadline || agent.try_wait().unwrap().is_some() {
            let _ = agent.kill();
            panic!("the agent never logged '{phrase}': {log}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let _ = agent.kill();
    let _ = agent.wait();
    log
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_whose_join_token_pins_another_ca_refuses_the_server_and_logs_why() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite_tls(dir.path(), |_| {}).await;
    let mut join = fleetbench_common::token::JoinToken::parse(&coord.tokens.join).unwrap();
    join.ca_sha256 = "cd".repeat(32);
    let state = dir.path().join("agent-state");
    let log = agent_logs_until(
        &coord.url,
        &join,
        &state,
        "not the coordinator the join token pins",
    )
    .await;
    // It says what it saw, it kept no CA, and it never joined.
    let ca_pem = std::fs::read_to_string(coord.ca_cert.as_ref().unwrap()).unwrap();
    let real = fleetbench_common::token::ca_fingerprint(&ca_pem).unwrap();
    assert!(
        log.contains(&real) && log.contains(&"cd".repeat(32)),
        "{log}"
    );
    assert!(!fleetbench_agent::uplink::pinned_ca_file(&state).exists());
    assert_eq!(list(&coord.client().await).await, Ok(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_sending_the_pinned_ca_beside_a_certificate_it_did_not_sign_gets_nothing() {
    use fleetbench_coordinator::tls;
    let dir = tempfile::tempdir().unwrap();
    // The fleet's real CA; its certificate is public, so anyone can send it along.
    let real = tls::TlsFiles::under(&dir.path().join("real"));
    let real_fp = tls::init(&real, &[]).unwrap().ca_fingerprint;
    // A rogue server: a certificate of its own CA, with the real CA's certificate after it.
    let rogue_dir = dir.path().join("rogue");
    let rogue = tls::TlsFiles::under(&rogue_dir);
    tls::init(&rogue, &[]).unwrap();
    let chain = rogue_dir.join("chain.pem");
    std::fs::write(
        &chain,
        std::fs::read_to_string(rogue.server_cert()).unwrap()
            + &std::fs::read_to_string(real.ca_cert()).unwrap(),
    )
    .unwrap();
    let coord = TestCoordinator::sqlite(&rogue_dir, |c| {
        c.tls_cert = chain.display().to_string();
        c.tls_key = rogue.server_key().display().to_string();
    })
    .await;
    let presented = fleetbench_proto::connect::presented_chain(&coord.url)
        .await
        .unwrap();
    assert_eq!(
        sha256_hex(&presented[1]),
        real_fp,
        "the rogue sends the real CA"
    );
    // An agent pinning the real CA finds it in the chain, then verifies the server against it, and
    // the server's certificate fails that: it never registers, so its join token never leaves.
    let mut join = fleetbench_common::token::JoinToken::parse(&coord.tokens.join).unwrap();
    join.ca_sha256 = real_fp.clone();
    let state = dir.path().join("agent-state");
    let log = agent_logs_until(&coord.url, &join, &state, "invalid peer certificate").await;
    assert!(!log.contains("Joined the fleet"), "{log}");
    let kept = std::fs::read_to_string(fleetbench_agent::uplink::pinned_ca_file(&state)).unwrap();
    assert_eq!(
        fleetbench_common::token::ca_fingerprint(&kept).unwrap(),
        real_fp
    );
    assert_eq!(list(&coord.client().await).await, Ok(0));
}
