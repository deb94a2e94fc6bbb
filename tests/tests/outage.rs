//! Postgres going away mid-run: the coordinator keeps its agents connected, withholds
//! acknowledgements until it can store again, and loses nothing.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fleetbench_agent::uplink::UplinkStats;
use fleetbench_cli::commands::jobs;
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_tests::*;
use tokio::net::TcpListener;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_going_away_mid_run_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = PgDb::create().await;
    // In front of the server FLEETBENCH_TEST_POSTGRES_URL names, whatever its address.
    let proxy = Relay::start(db.server_addr()).await;
    let coord = TestCoordinator::serve(
        test_config(&db.url_via(proxy.addr)),
        TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await;
    let client = coord.client().await;
    let stats = Arc::new(UplinkStats::default());
    let _agent = TestAgent::start_with(coord.agent("solo", &[], dir.path()), None, stats.clone());
    wait_online(&client, 1).await;
    push_digits(&client).await;
    // A run by duration, so that it outlasts the outage whatever the machine's speed: 100 ms windows for
    // 10 s, of which about 3 s pass with the database away.
    let args = JobArgs {
        model: Some("digits".into()),
        variants: vec!["fp32".into()],
        duration_s: Some(10.0),
        warmup: Some(20),
        window_ms: Some(100),
        skip_accuracy: true,
        ..Default::default()
    };
    let id = jobs::submit(&client, &args).await.unwrap();
    let acked = || stats.windows_acked.load(Ordering::SeqCst);
    let sent = || stats.windows_sent.load(Ordering::SeqCst);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while acked() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no telemetry acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    // The database goes away: windows keep coming, acknowledgements stop.
    proxy.cut();
    let acked_at_cut = acked();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while sent() < acked_at_cut + 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run stopped producing windows"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(
        acked() <= acked_at_cut + 1,
        "windows are not acknowledged while they cannot be stored"
    );
    // The outage outlasts the lease timeout (2 s in tests): 30 more windows of 100 ms. The task must not
    // be handed out again for it.
    while sent() < acked_at_cut + 30 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run stopped producing windows"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(acked() <= acked_at_cut + 1);
    proxy.restore();

    let s = wait_job(&client, &id, Duration::from_secs(120)).await;
    assert_eq!(
        s.state,
        "succeeded",
        "{:?}",
        job_detail(&client, &id).await.tasks
    );
    assert_eq!(
        stats.sessions.load(Ordering::SeqCst),
        1,
        "the agent stayed connected throughout"
    );
    assert_eq!(acked(), sent(), "every window was acknowledged in the end");
    let detail = job_detail(&client, &id).await;
    let t = &detail.tasks[0];
    assert_eq!(t.attempt, 1, "the outage did not requeue the task");
    let run = t.run.as_ref().unwrap();
    let store = fleetbench_coordinator::store::open(&db.url).await.unwrap();
    let ctx = store.run_context(&run.run_id).await.unwrap().unwrap();
    let seqs: Vec<u64> = ctx.windows.iter().map(|w| w.seq).collect();
    assert_eq!(
        seqs,
        (0..sent()).collect::<Vec<_>>(),
        "every window sent is stored exactly once, in sequence"
    );
    assert!(run.queries > 0);
    assert_eq!(
        ctx.windows.iter().map(|w| w.queries).sum::<u64>(),
        run.queries,
        "the stored windows hold every query the run reported"
    );
}
