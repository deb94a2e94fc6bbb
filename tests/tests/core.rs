//! The core path end to end: a coordinator on 127.0.0.1:0 with a temporary SQLite file, agents running
//! the real ONNX Runtime runner on the bundled digits model, jobs, what was stored, the ranking; and the
//! bad inputs and failures the core must survive.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fleetbench_cli::commands::{jobs, models};
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_proto::v1::{
    JobSpec, RankRequest, RunConfig, RunReport, SubmitJobRequest, TelemetryWindow,
};
use fleetbench_tests::*;

fn job(model: &str, iterations: i64) -> JobArgs {
    JobArgs {
        model: Some(model.into()),
        variants: vec!["all".into()],
        iterations: Some(iterations),
        warmup: Some(20),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_agents_benchmark_the_digits_model_end_to_end_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    benchmark_digits_end_to_end(&coord, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_agents_benchmark_the_digits_model_end_to_end_on_postgres() {
    let dir = tempfile::tempdir().unwrap();
    let db = PgDb::create().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let coord = TestCoordinator::serve(test_config(&db.url), listener).await;
    benchmark_digits_end_to_end(&coord, dir.path()).await;
}

/// Two agents (an edge one on one core, a cloud one on all), the digits model and its int8 variant, a
/// job, and assertions on what was stored and on the ranking.
async fn benchmark_digits_end_to_end(coord: &TestCoordinator, dir: &std::path::Path) {
    let client = coord.client().await;
    let mut edge = coord.agent("edge-1", &["tier=edge", "cost_per_hour=0.05"], dir);
    edge.cpus = "0".into();
    let _edge = TestAgent::start(edge);
    let _cloud =
        TestAgent::start(coord.agent("cloud-1", &["tier=cloud", "cost_per_hour=0.2"], dir));
    wait_online(&client, 2).await;
    push_digits(&client).await;

    let iterations = 400;
    let id = jobs::submit(&client, &job("digits", iterations))
        .await
        .unwrap();
    let summary = wait_job(&client, &id, Duration::from_secs(120)).await;
    assert_eq!(summary.state, "succeeded", "{summary:?}");
    assert_eq!(summary.tasks_total, 4);

    let detail = job_detail(&client, &id).await;
    let pairs: BTreeSet<(String, String)> = detail
        .tasks
        .iter()
        .map(|t| (t.variant.clone(), t.agent.clone()))
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("fp32", "edge-1"),
        ("fp32", "cloud-1"),
        ("int8", "edge-1"),
        ("int8", "cloud-1"),
    ]
    .iter()
    .map(|(v, a)| (v.to_string(), a.to_string()))
    .collect();
    assert_eq!(pairs, expected, "one run per (variant, agent)");

    let store = fleetbench_coordinator::store::open(&coord.database)
        .await
        .unwrap();
    for t in &detail.tasks {
        let run = t
            .run
            .as_ref()
            .unwrap_or_else(|| panic!("task {} has no run: {t:?}", t.task_id));
        assert_eq!(
            run.queries, iterations as u64,
            "inference count equals what was asked"
        );
        assert_eq!(
            run.samples, iterations as u64,
            "batch 1: one sample per query"
        );
        let l = run.latency.unwrap();
        assert!(
            l.p50_ms > 0.0 && l.p50_ms <= l.p90_ms && l.p90_ms <= l.p99_ms && l.p99_ms <= l.max_ms,
            "{l:?}"
        );
        let acc = run.accuracy.expect("the digits model has an eval set");
        let python = python_accuracy(&t.variant);
        assert!(
            (acc - python).abs() <= 0.01,
            "{}: accuracy {acc} vs {python} measured in Python",
            t.variant
        );
        // What was stored: every window of the run, their queries adding up to the run's.
        let ctx = store.run_context(&run.run_id).await.unwrap().unwrap();
        assert_eq!(ctx.state, "succeeded");
        assert_eq!(ctx.windows.len() as u64, run.windows);
        assert_eq!(
            ctx.windows.iter().map(|w| w.queries).sum::<u64>(),
            iterations as u64
        );
        let seqs: Vec<u64> = ctx.windows.iter().map(|w| w.seq).collect();
        assert_eq!(
            seqs,
            (0..seqs.len() as u64).collect::<Vec<_>>(),
            "windows without gaps"
        );
        assert!(run.throughput_per_s > 0.0 && run.cost_per_hour.is_some());
    }

    let ranking = client
        .rankings()
        .rank(RankRequest {
            model: "digits".into(),
            objective: "p99".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ranking.rows.len(), 4, "{ranking:?}");
    let platforms: BTreeSet<&str> = ranking
        .rows
        .iter()
        .map(|r| r.platform_id.as_str())
        .collect();
    assert_eq!(platforms.len(), 2, "the two agents are two platforms");
    assert!(
        ranking
            .rows
            .iter()
            .any(|r| r.platform.starts_with("tier=edge") && r.platform.ends_with("1 core"))
    );
    assert!(
        ranking
            .rows
            .iter()
            .any(|r| r.platform.starts_with("tier=cloud"))
    );
    // Groups sorted by p99 (each led by its lowest p99); within a tie (intervals that overlap the
    // leader's), cost decides.
    let mut leaders: Vec<(u32, f64)> = Vec::new();
    for (i, r) in ranking.rows.iter().enumerate() {
        let p99 = r.latency.as_ref().unwrap().p99_ms;
        match leaders.last_mut() {
            Some((rank, best)) if *rank == r.rank => {
                let before = &ranking.rows[i - 1];
                assert!(r.tied && before.tied, "{r:?}");
                assert!(
                    before.cost_per_million <= r.cost_per_million,
                    "a tie goes by cost: {r:?}"
                );
                *best = best.min(p99);
            }
            _ => {
                assert_eq!(
                    r.rank as usize,
                    i + 1,
                    "a new group is ranked by its position"
                );
                leaders.push((r.rank, p99));
            }
        }
    }
    assert!(
        leaders.windows(2).all(|w| w[0].1 <= w[1].1),
        "sorted by p99: {leaders:?}"
    );
    for r in &ranking.rows {
        let cpm = r.cost_per_million.expect("both agents have a cost");
        let cph = if r.platform.starts_with("tier=edge") {
            0.05
        } else {
            0.2
        };
        assert!((cpm - cph / (r.throughput_per_s * 3600.0) * 1e6).abs() < 1e-9);
        assert!(r.accuracy.is_some() && r.accuracy_delta_pts.is_some());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_a_clear_error_and_nothing_stored_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    let _agent = TestAgent::start(coord.agent("solo", &["tier=edge"], dir.path()));
    wait_online(&client, 1).await;

    // A file that is not ONNX.
    let text = dir.path().join("notes.onnx");
    std::fs::write(&text, "this is a text file, not a model\n").unwrap();
    let err = models::push(&client, &text, "digits", None, None, None, None)
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("not an ONNX model"), "{err}");
    let listed = list_variants(&client, "").await;
    assert!(listed.is_empty(), "nothing registered: {listed:?}");

    push_digits(&client).await;
    // Another file under an existing variant name is refused; the stored one stays.
    let err = models::push(
        &client,
        &models("digits/digits-int8.onnx"),
        "digits",
        Some("fp32"),
        None,
        None,
        None,
    )
    .await
    .unwrap_err()
    .to_string();
    assert!(err.contains("already exists"), "{err}");
    let listed = list_variants(&client, "digits").await;
    let fp32 = listed.iter().find(|v| v.variant == "fp32").unwrap();
    assert_eq!(
        fp32.size_bytes,
        std::fs::metadata(models("digits/digits-fp32.onnx"))
            .unwrap()
            .len()
    );

    // Unknown model, unknown variant, a selector that matches nobody.
    let err = jobs::submit(&client, &job("nope", 10))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("unknown model 'nope'"), "{err}");
    let mut a = job("digits", 10);
    a.variants = vec!["int4".into()];
    let err = jobs::submit(&client, &a).await.unwrap_err().to_string();
    assert!(
        err.contains("no variant 'int4'") && err.contains("fp32"),
        "{err}"
    );
    let mut a = job("digits", 10);
    a.selector = vec!["tier=gpu".into()];
    let err = jobs::submit(&client, &a).await.unwrap_err().to_string();
    assert!(
        err.contains("selector") && err.contains("matches no online agent"),
        "{err}"
    );

    // Zero or negative iterations: refused by the CLI, and by the coordinator for any other client.
    for n in [0, -3] {
        let err = jobs::submit(&client, &job("digits", n))
            .await
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("iterations"), "{err}");
    }
    let raw = JobSpec {
        model: "digits".into(),
        config: Some(RunConfig::default()),
        ..Default::default()
    };
    let status = client
        .jobs()
        .submit_job(SubmitJobRequest { spec: Some(raw) })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("iterations"), "{status:?}");

    // A symbolic dimension left unset is refused naming the input; set, every element type runs.
    models::push(
        &client,
        &models("testdata/multi-input.onnx"),
        "multi",
        None,
        None,
        None,
        None,
    )
    .await
    .unwrap();
    let err = jobs::submit(&client, &job("multi", 20))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("'f32'") && err.contains("'seq'") && err.contains("--shape f32="),
        "{err}"
    );
    let mut a = job("multi", 20);
    a.shape = vec!["f32=1x7".into()];
    let id = jobs::submit(&client, &a).await.unwrap();
    let s = wait_job(&client, &id, Duration::from_secs(60)).await;
    assert_eq!(s.state, "succeeded", "{:?}", job_detail(&client, &id).await);

    // A task that fails on the agent is marked failed with its reason; the agent takes the next task.
    models::push(
        &client,
        &models("testdata/unsupported-op.onnx"),
        "digits",
        Some("broken"),
        None,
        None,
        None,
    )
    .await
    .unwrap();
    let id = jobs::submit(&client, &job("digits", 50)).await.unwrap();
    let s = wait_job(&client, &id, Duration::from_secs(60)).await;
    assert_eq!(s.state, "failed");
    let detail = job_detail(&client, &id).await;
    let broken = detail.tasks.iter().find(|t| t.variant == "broken").unwrap();
    assert_eq!(broken.state, "failed");
    assert!(
        broken.error.contains("cannot load") && broken.error.contains("NoSuchOp"),
        "{}",
        broken.error
    );
    for t in detail.tasks.iter().filter(|t| t.variant != "broken") {
        assert_eq!(t.state, "succeeded", "{t:?}");
        assert_eq!(t.agent, "solo");
    }
    wait_online(&client, 1).await;
}

/// A runner that never finishes on its own: it waits for cancellation (or for the test to let it go).
struct StuckRunner {
    started: Arc<AtomicBool>,
    release: Arc<AtomicBool>,
}

impl fleetbench_agent::runner::ModelRunner for StuckRunner {
    fn run(
        &self,
        _task: &fleetbench_agent::runner::PreparedTask,
        _emit: &mut dyn FnMut(TelemetryWindow),
        cancel: &AtomicBool,
    ) -> Result<RunReport, fleetbench_agent::runner::RunError> {
        self.started.store(true, Ordering::SeqCst);
        while !cancel.load(Ordering::Relaxed) && !self.release.load(Ordering::Relaxed) {
            std::thread::park_timeout(Duration::from_millis(5));
        }
        Err(fleetbench_agent::runner::RunError::Cancelled)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_silent_agents_task_returns_to_the_queue_and_a_peer_runs_it() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |c| c.lease_timeout_ms = 1000).await;
    let client = coord.client().await;
    // Two agents of one platform on two hosts; "a" hangs on whatever it gets.
    let mut a = coord.agent("a", &["tier=edge"], dir.path());
    a.host_id = "host-a".into();
    let mut b = coord.agent("b", &["tier=edge"], dir.path());
    b.host_id = "host-b".into();
    let started = Arc::new(AtomicBool::new(false));
    let release = Arc::new(AtomicBool::new(false));
    let stuck = TestAgent::start_with_runner(
        a,
        Arc::new(StuckRunner {
            started: started.clone(),
            release: release.clone(),
        }),
    );
    let _b = TestAgent::start(b);
    wait_online(&client, 2).await;
    push_digits(&client).await;
    let mut args = job("digits", 100);
    args.variants = vec!["fp32".into()];
    let id = jobs::submit(&client, &args).await.unwrap();

    // Once "a" holds its task, it goes silent (no goodbye: a stopped agent would hand the task back
    // at once).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !started.load(Ordering::SeqCst) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "agent a never started its task"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    stuck.vanish();

    let s = wait_job(&client, &id, Duration::from_secs(60)).await;
    assert_eq!(s.state, "succeeded");
    let detail = job_detail(&client, &id).await;
    assert_eq!(detail.tasks.len(), 2);
    for t in &detail.tasks {
        assert_eq!(t.agent, "b", "b ran its own task and a's: {t:?}");
        assert_eq!(t.run.as_ref().unwrap().queries, 100);
    }
    let moved = detail.tasks.iter().find(|t| t.target_agent == "a").unwrap();
    assert_eq!(moved.attempt, 2, "the second attempt ran on b");
    // The vanished agent's runner thread would otherwise outlive the test's runtime.
    release.store(true, Ordering::Relaxed);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_coordinator_restart_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("fleet.db").display());
    let coord = TestCoordinator::serve(
        test_config(&db),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await;
    // The agent reaches the coordinator through a relay whose address outlives the restart.
    let relay = Relay::start(coord.addr).await;
    let client = coord.client().await;
    let _agent = TestAgent::start(agent_config(
        &relay.url(),
        &coord.tokens.join,
        "solo",
        &["tier=edge"],
        dir.path(),
    ));
    wait_online(&client, 1).await;
    push_digits(&client).await;
    let mut args = job("digits", 30_000);
    args.window_ms = Some(100);
    let id = jobs::submit(&client, &args).await.unwrap();

    // Wait until the first task has stored telemetry, then restart the coordinator under it.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let d = job_detail(&client, &id).await;
        if d.tasks
            .iter()
            .any(|t| t.state == "running" && t.progress_queries > 0)
        {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress: {d:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    coord.stop().await;
    let coord = TestCoordinator::serve(
        test_config(&db),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await;
    relay.set_upstream(coord.addr);
    let client = coord.client().await;

    let s = wait_job(&client, &id, Duration::from_secs(120)).await;
    assert_eq!(s.state, "succeeded");
    let store = fleetbench_coordinator::store::open(&db).await.unwrap();
    for t in &job_detail(&client, &id).await.tasks {
        assert_eq!(t.attempt, 1, "no task ran twice: {t:?}");
        let run = t.run.as_ref().unwrap();
        assert_eq!(run.queries, 30_000);
        let ctx = store.run_context(&run.run_id).await.unwrap().unwrap();
        assert_eq!(
            ctx.windows.iter().map(|w| w.queries).sum::<u64>(),
            30_000,
            "every window stored exactly once"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_retries_an_unreachable_coordinator_until_it_answers() {
    let dir = tempfile::tempdir().unwrap();
    // Something that accepts connections and hangs up, standing in for a coordinator that is down,
    // behind a relay whose address the agent keeps.
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = Relay::start(fake.local_addr().unwrap()).await;
    // The join token is made in the database the coordinator will serve.
    let database = format!("sqlite://{}", dir.path().join("fleet.db").display());
    let tokens = Tokens::made_in(&database).await;
    let _agent = TestAgent::start(agent_config(
        &relay.url(),
        &tokens.join,
        "patient",
        &[],
        dir.path(),
    ));
    for _ in 0..2 {
        let (sock, _) = tokio::time::timeout(Duration::from_secs(30), fake.accept())
            .await
            .expect("the agent retries")
            .unwrap();
        drop(sock);
    }
    let coord = TestCoordinator::serve(
        test_config(&database),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await;
    relay.set_upstream(coord.addr);
    let client = coord.client().await;
    wait_online(&client, 1).await;
}
