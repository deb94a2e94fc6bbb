//! Several coordinator replicas on one Postgres database: agents on either, jobs watched and cancelled
//! from either, and a replica killed mid-job without any task running twice or any window lost.

use std::sync::Arc;
use std::time::Duration;

use fleetbench_cli::commands::jobs;
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_proto::v1::{CancelJobRequest, GetJobRequest};
use fleetbench_tests::*;

fn long_job(iterations: i64) -> JobArgs {
    JobArgs {
        model: Some("digits".into()),
        variants: vec!["all".into()],
        iterations: Some(iterations),
        warmup: Some(20),
        window_ms: Some(100),
        skip_accuracy: true,
        ..Default::default()
    }
}

/// An agent on `host` that knows both replicas, trying `first` first.
fn agent(
    tokens: &Tokens,
    name: &str,
    host: &str,
    first: &str,
    second: &str,
    dir: &std::path::Path,
) -> fleetbench_agent::AgentConfig {
    let mut c = agent_config(first, &tokens.join, name, &["tier=edge"], dir);
    c.coordinator = vec![first.to_string(), second.to_string()];
    c.host_id = host.into();
    c.max_backoff_ms = 300;
    c
}

async fn wait_until<F: std::future::Future<Output = bool>>(
    what: &str,
    mut cond: impl FnMut() -> F,
) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting until {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replica_dies_mid_job_and_every_task_still_runs_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let db = PgDb::create().await;
    let mut a = CoordinatorProcess::start(&db.url, dir.path(), "replica-a");
    let b = CoordinatorProcess::start(&db.url, dir.path(), "replica-b");
    let tokens = Tokens::made_in(&db.url).await;
    let via_a = tokens.client(&a.url).await;
    let via_b = tokens.client(&b.url).await;
    // One agent starts on each replica.
    let stats = Arc::new(fleetbench_agent::uplink::UplinkStats::default());
    let _on_a = TestAgent::start_with(
        agent(&tokens, "on-a", "host-a", &a.url, &b.url, dir.path()),
        None,
        stats.clone(),
    );
    let _on_b = TestAgent::start(agent(&tokens, "on-b", "host-b", &b.url, &a.url, dir.path()));
    wait_online(&via_b, 2).await;
    push_digits(&via_a).await;
    let iterations = 40_000;
    let id = jobs::submit(&via_b, &long_job(iterations)).await.unwrap();

    // Once the agent connected to A is streaming a task, A dies.
    wait_until("the agent on replica A streams telemetry", || {
        let stats = stats.clone();
        async move {
            stats
                .windows_acked
                .load(std::sync::atomic::Ordering::Relaxed)
                >= 3
        }
    })
    .await;
    a.kill();

    let s = wait_job(&via_b, &id, Duration::from_secs(180)).await;
    assert_eq!(s.state, "succeeded", "{:?}", job_detail(&via_b, &id).await);
    assert!(
        stats.sessions.load(std::sync::atomic::Ordering::Relaxed) >= 2,
        "the agent moved to replica B"
    );
    let store = fleetbench_coordinator::store::open(&db.url).await.unwrap();
    let detail = job_detail(&via_b, &id).await;
    assert_eq!(detail.tasks.len(), 4);
    for t in &detail.tasks {
        assert_eq!(t.attempt, 1, "no task ran twice: {t:?}");
        let run = t.run.as_ref().unwrap();
        assert_eq!(run.queries, iterations as u64);
        let ctx = store.run_context(&run.run_id).await.unwrap().unwrap();
        let queries: u64 = ctx.windows.iter().map(|w| w.queries).sum();
        assert_eq!(
            queries, iterations as u64,
            "every window stored exactly once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn jobs_are_watched_and_cancelled_from_any_replica() {
    let dir = tempfile::tempdir().unwrap();
    let db = PgDb::create().await;
    let a = CoordinatorProcess::start(&db.url, dir.path(), "replica-a");
    let b = CoordinatorProcess::start(&db.url, dir.path(), "replica-b");
    let tokens = Tokens::made_in(&db.url).await;
    let via_a = tokens.client(&a.url).await;
    let via_b = tokens.client(&b.url).await;
    let _agent = TestAgent::start(agent(&tokens, "solo", "host-1", &a.url, &b.url, dir.path()));
    wait_online(&via_b, 1).await;
    push_digits(&via_b).await;
    let mut args = long_job(0);
    args.iterations = None;
    args.duration_s = Some(120.0);
    let id = jobs::submit(&via_a, &args).await.unwrap();
    // B sees the task running on the agent connected to A.
    wait_until("replica B sees a running task", || {
        let (via_b, id) = (via_b.clone(), id.clone());
        async move {
            let d = via_b
                .jobs()
                .get_job(GetJobRequest { job_id: id })
                .await
                .unwrap()
                .into_inner();
            d.tasks
                .iter()
                .any(|t| t.state == "running" && t.progress_queries > 0)
        }
    })
    .await;
    let watcher = tokio::spawn({
        let (via_b, id) = (via_b.clone(), id.clone());
        async move { jobs::watch(&via_b, &id, false).await }
    });
    // Cancelled through B; the agent, connected to A, stops well before its two minutes.
    via_b
        .jobs()
        .cancel_job(CancelJobRequest { job_id: id.clone() })
        .await
        .unwrap();
    let summary = tokio::time::timeout(Duration::from_secs(30), watcher)
        .await
        .expect("the watch ends")
        .unwrap()
        .unwrap();
    assert_eq!(summary.state, "cancelled");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let d = via_a
            .jobs()
            .get_job(GetJobRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if d.tasks.iter().all(|t| t.state == "cancelled") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the tasks were not all cancelled: {:?}",
            d.tasks
                .iter()
                .map(|t| (&t.variant, &t.state, &t.error))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_holding_only_the_join_token_fails_over_between_tls_replicas_of_one_ca() {
    use fleetbench_coordinator::tls;
    let dir = tempfile::tempdir().unwrap();
    let db = PgDb::create().await;
    // The first replica's CA, copied to the second, whose `init` keeps it (README: Replicas).
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    let first = tls::init(&tls::TlsFiles::under(&dir_a), &[]).unwrap();
    let (files_a, files_b) = (tls::TlsFiles::under(&dir_a), tls::TlsFiles::under(&dir_b));
    std::fs::create_dir_all(&files_b.dir).unwrap();
    std::fs::copy(files_a.ca_cert(), files_b.ca_cert()).unwrap();
    std::fs::copy(files_a.ca_key(), files_b.ca_key()).unwrap();
    let second = tls::init(&files_b, &[]).unwrap();
    assert!(!second.new_ca);
    assert_eq!(second.ca_fingerprint, first.ca_fingerprint);
    let replica = |d: &std::path::Path| {
        let mut c = test_config(&db.url);
        c.data_dir = d.display().to_string();
        c.lease_timeout_ms = 4_000;
        c
    };
    let bind = || async { tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap() };
    let a = TestCoordinator::serve(replica(&dir_a), bind().await).await;
    let b = TestCoordinator::serve(replica(&dir_b), bind().await).await;
    assert!(a.url.starts_with("https://") && b.url.starts_with("https://"));

    // The agent has no CA file: only the join token, pinning the CA by its hash.
    let mut join = fleetbench_common::token::JoinToken::parse(&a.tokens.join).unwrap();
    join.ca_sha256 = first.ca_fingerprint.clone();
    let mut config = agent_config(
        &a.url,
        join.to_secret_string().expose(),
        "roamer",
        &[],
        dir.path(),
    );
    config.coordinator = vec![a.url.clone(), b.url.clone()];
    config.max_backoff_ms = 300;
    let stats = Arc::new(fleetbench_agent::uplink::UplinkStats::default());
    let _agent = TestAgent::start_with(config, None, stats.clone());
    let via_a = a.client().await;
    wait_online(&via_a, 1).await;
    push_digits(&via_a).await;

    // A goes away; the agent verifies B against the same CA and carries on there.
    a.stop().await;
    wait_until("the agent opened a session on replica B", || {
        let stats = stats.clone();
        async move { stats.sessions.load(std::sync::atomic::Ordering::Relaxed) >= 2 }
    })
    .await;
    let via_b = b.client().await;
    let id = jobs::submit(
        &via_b,
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
    let s = wait_job(&via_b, &id, Duration::from_secs(60)).await;
    assert_eq!(s.state, "succeeded", "{:?}", job_detail(&via_b, &id).await);
}
