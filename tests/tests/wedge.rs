//! Daemons that never wedge: each defect found in review, reproduced through the real coordinator and
//! agent, and shown fixed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use fleetbench_agent::runner::{ModelRunner, OrtRunner, PreparedTask, RunError};
use fleetbench_cli::commands::jobs;
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_proto::v1::{RunReport, TelemetryWindow};
use fleetbench_tests::*;

fn digits(iterations: i64) -> JobArgs {
    JobArgs {
        model: Some("digits".into()),
        variants: vec!["fp32".into()],
        iterations: Some(iterations),
        warmup: Some(10),
        skip_accuracy: true,
        ..Default::default()
    }
}

/// Panics on its first run, then runs for real.
struct PanicsOnce {
    inner: OrtRunner,
    runs: AtomicUsize,
}

impl ModelRunner for PanicsOnce {
    fn run(
        &self,
        task: &PreparedTask,
        emit: &mut dyn FnMut(TelemetryWindow),
        cancel: &AtomicBool,
    ) -> Result<RunReport, RunError> {
        if self.runs.fetch_add(1, Ordering::SeqCst) == 0 {
            panic!("attempt to subtract with overflow");
        }
        self.inner.run(task, emit, cancel)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_runner_that_panics_fails_its_run_with_the_reason_and_frees_the_agent() {
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let client = coord.client().await;
    let config = coord.agent("solo", &[], dir.path());
    let runtime = fleetbench_runtime::load(Some(&config.ort_lib)).unwrap();
    let _agent = TestAgent::start_with_runner(
        config,
        Arc::new(PanicsOnce {
            inner: OrtRunner {
                runtime,
                huge_pages: true,
            },
            runs: AtomicUsize::new(0),
        }),
    );
    wait_online(&client, 1).await;
    push_digits(&client).await;
    let first = jobs::submit(&client, &digits(100)).await.unwrap();
    let s = wait_job(&client, &first, Duration::from_secs(60)).await;
    assert_eq!(s.state, "failed");
    let task = &job_detail(&client, &first).await.tasks[0];
    assert!(
        task.error.contains("panicked") && task.error.contains("subtract with overflow"),
        "the run fails with the reason: {task:?}"
    );
    // The agent is free: the next job runs on it.
    let second = jobs::submit(&client, &digits(100)).await.unwrap();
    let s = wait_job(&client, &second, Duration::from_secs(60)).await;
    assert_eq!(
        s.state,
        "succeeded",
        "{:?}",
        job_detail(&client, &second).await
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn job_parameters_beyond_the_limits_are_refused_naming_setting_and_limit() {
    let fleet = SoloFleet::start().await;
    push_digits(&fleet.client).await;
    let cases: Vec<(JobArgs, &str)> = vec![
        (
            JobArgs {
                scenario: Some("offline".into()),
                concurrency: vec![100_000],
                ..digits(100)
            },
            "concurrency: 100000 is above the coordinator's limit of 256 (setting max_concurrency)",
        ),
        (
            digits(1_000_000_000_000_000),
            "iterations: 1000000000000000 is above the coordinator's limit of 100000000 (setting max_iterations)",
        ),
        (
            JobArgs {
                batch_size: vec![1_000_000],
                ..digits(100)
            },
            "batch_size: 1000000 is above the coordinator's limit of 4096",
        ),
        (
            JobArgs {
                iterations: None,
                duration_s: Some(1e7),
                ..digits(100)
            },
            "duration_s: 10000000 is above the coordinator's limit of 86400 (setting max_run_duration_ms)",
        ),
        (
            JobArgs {
                warmup: Some(1_000_000_000),
                ..digits(100)
            },
            "setting max_warmup_iterations",
        ),
        (
            JobArgs {
                scenario: Some("server".into()),
                target_qps: Some(1e9),
                ..digits(100)
            },
            "setting max_target_qps",
        ),
        (
            JobArgs {
                batch_size: vec![4096],
                ..digits(100)
            },
            "",
        ),
    ];
    for (args, needle) in cases {
        let r = jobs::submit(&fleet.client, &args).await;
        if needle.is_empty() {
            // A batch of 4096 rows of 64 values is within the limits.
            let id = r.expect("within the limits");
            let s = wait_job(&fleet.client, &id, Duration::from_secs(120)).await;
            assert_eq!(s.state, "succeeded");
            continue;
        }
        let e = r.unwrap_err().to_string();
        assert!(e.contains(needle), "{e}");
    }
    // And after all that, a good job runs.
    let id = jobs::submit(&fleet.client, &digits(100)).await.unwrap();
    let s = wait_job(&fleet.client, &id, Duration::from_secs(60)).await;
    assert_eq!(s.state, "succeeded");
}

mod protocol {
    use super::*;
    use fleetbench_proto::v1::agent_message::Body as Out;
    use fleetbench_proto::v1::coordinator_message::Body as In;
    use fleetbench_proto::v1::{RunResult, WindowBatch};

    /// Collects the window acks the coordinator sends, by (run, seq) -> discarded.
    async fn acks(agent: &mut FakeAgent, want: usize) -> std::collections::BTreeMap<u64, bool> {
        let mut out = std::collections::BTreeMap::new();
        while out.len() < want {
            match agent.next(Duration::from_secs(20)).await {
                Some(In::WindowAck(a)) => {
                    out.insert(a.seq, a.discarded);
                }
                Some(In::WindowAcks(b)) => {
                    for a in b.acks {
                        out.insert(a.seq, a.discarded);
                    }
                }
                Some(_) => {}
                None => panic!("acks stopped coming: {out:?}"),
            }
        }
        out
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_malformed_window_and_a_window_for_another_agents_run_are_refused_alone() {
        let dir = tempfile::tempdir().unwrap();
        let coord = TestCoordinator::sqlite(dir.path(), |c| c.lease_timeout_ms = 10_000).await;
        let client = coord.client().await;
        let mut a =
            FakeAgent::connect(&coord.url, &coord.tokens.join, "fake-a", &[("who", "a")]).await;
        let mut b =
            FakeAgent::connect(&coord.url, &coord.tokens.join, "fake-b", &[("who", "b")]).await;
        wait_online(&client, 2).await;
        push_digits(&client).await;
        let job = JobArgs {
            selector: vec!["who=a".into()],
            ..digits(100)
        };
        let id = jobs::submit(&client, &job).await.unwrap();
        let task = a.assignment().await;
        let mut corrupt = fake_window(&task.run_id, 1, 5);
        corrupt.latency_histogram = b"not a histogram at all".to_vec();
        a.send(Out::WindowBatch(WindowBatch {
            windows: vec![
                fake_window(&task.run_id, 0, 5),
                corrupt,
                fake_window(&task.run_id, 2, 5),
            ],
        }))
        .await;
        let got = acks(&mut a, 3).await;
        assert_eq!(
            got.into_iter().collect::<Vec<_>>(),
            vec![(0, false), (1, true), (2, false)],
            "the corrupt window is refused, the rest of its batch stored"
        );
        // Agent b sends a window for a's run: discarded, and a's run is not touched.
        b.send(Out::Window(fake_window(&task.run_id, 3, 50))).await;
        assert_eq!(acks(&mut b, 1).await.get(&3), Some(&true));
        let store = fleetbench_coordinator::store::open(&coord.database)
            .await
            .unwrap();
        let ctx = store.run_context(&task.run_id).await.unwrap().unwrap();
        assert_eq!(
            ctx.windows.iter().map(|w| w.seq).collect::<Vec<_>>(),
            vec![0, 2]
        );
        assert_eq!(ctx.state, "running", "b could not end a's run");
        // a reports three windows sent: the coordinator holds two, so the run fails and says why.
        a.send(Out::Result(RunResult {
            run_id: task.run_id.clone(),
            window_count: 3,
            error: String::new(),
            report: Some(Default::default()),
            ..Default::default()
        }))
        .await;
        let s = wait_job(&client, &id, Duration::from_secs(30)).await;
        assert_eq!(s.state, "failed");
        let t = &job_detail(&client, &id).await.tasks[0];
        assert!(t.error.contains("holds 2 of the 3"), "{t:?}");
        // Ingest goes on for everyone: a job on b runs.
        let id = jobs::submit(
            &client,
            &JobArgs {
                selector: vec!["who=b".into()],
                ..digits(100)
            },
        )
        .await
        .unwrap();
        let task = b.assignment().await;
        b.send(Out::Window(fake_window(&task.run_id, 0, 100))).await;
        acks(&mut b, 1).await;
        b.send(Out::Result(RunResult {
            run_id: task.run_id.clone(),
            window_count: 1,
            report: Some(fleetbench_proto::v1::RunReport {
                queries: 100,
                samples: 100,
                elapsed_ns: 1_000_000,
                ..Default::default()
            }),
            ..Default::default()
        }))
        .await;
        assert_eq!(
            wait_job(&client, &id, Duration::from_secs(30)).await.state,
            "succeeded"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_session_whose_lease_expired_is_closed_not_offered_the_next_task() {
        let dir = tempfile::tempdir().unwrap();
        let coord = TestCoordinator::sqlite(dir.path(), |c| c.lease_timeout_ms = 1000).await;
        let client = coord.client().await;
        // A half-open agent: connected, but it never heartbeats nor answers.
        let mut ghost = FakeAgent::connect(&coord.url, &coord.tokens.join, "ghost", &[]).await;
        wait_online(&client, 1).await;
        push_digits(&client).await;
        let id = jobs::submit(&client, &digits(100)).await.unwrap();
        let first = ghost.assignment().await;
        // Its lease expires: the coordinator closes the session instead of handing it the task again.
        let mut assignments = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let closed = loop {
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            match tokio::time::timeout(left, ghost.inbound.message()).await {
                Ok(Ok(Some(m))) => {
                    if matches!(m.body, Some(In::Assignment(_))) {
                        assignments += 1;
                    }
                }
                Ok(_) => break true,
                Err(_) => break false,
            }
        };
        assert!(closed, "the session was closed when its lease expired");
        assert_eq!(assignments, 0, "the ghost was not offered the task again");
        let t = &job_detail(&client, &id).await.tasks[0];
        assert_eq!(t.state, "pending", "{t:?}");
        assert_ne!(t.attempt, 0);
        let _ = first;
    }

    /// A coordinator whose leases outlast the test, with the digits model and a fake agent "leaving"
    /// in pool=shared.
    async fn leaving_agent(
        dir: &std::path::Path,
    ) -> (TestCoordinator, fleetbench_cli::client::Client, FakeAgent) {
        let coord = TestCoordinator::sqlite(dir, |c| c.lease_timeout_ms = 120_000).await;
        let client = coord.client().await;
        push_digits(&client).await;
        let leaving = FakeAgent::connect(
            &coord.url,
            &coord.tokens.join,
            "leaving",
            &[("pool", "shared")],
        )
        .await;
        (coord, client, leaving)
    }

    /// CI, stop 26: between acknowledging a run handed back by a stopping agent and that agent
    /// hanging up, the coordinator marked the session idle and offered it the very task it had just
    /// put back; the agent, stopping, never ran it, and the task sat "running" until its lease
    /// expired. This fake agent hands its run back and stays connected, which widens that moment
    /// to the whole test.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_session_that_handed_its_run_back_while_stopping_is_offered_nothing_more() {
        let dir = tempfile::tempdir().unwrap();
        let (coord, client, mut leaving) = leaving_agent(dir.path()).await;
        let shared = [("pool", "shared")];
        wait_online(&client, 1).await;
        let job = JobArgs {
            selector: vec!["pool=shared".into()],
            ..digits(100)
        };
        let id = jobs::submit(&client, &job).await.unwrap();
        let task = leaving.assignment().await;
        // A heartbeat just before the hand-back and one after it: neither may mark the agent
        // connected again (a task expanded for a connected agent waits for it).
        let beat = || {
            Out::Heartbeat(fleetbench_proto::v1::Heartbeat {
                current_run_id: task.run_id.clone(),
            })
        };
        leaving.send(beat()).await;
        leaving
            .send(Out::Result(RunResult {
                run_id: task.run_id.clone(),
                cancelled: true,
                agent_stopping: true,
                report: Some(Default::default()),
                ..Default::default()
            }))
            .await;
        leaving.send(beat()).await;
        loop {
            match leaving.next(Duration::from_secs(20)).await {
                Some(In::ResultAck(a)) if a.run_id == task.run_id => {
                    assert!(!a.discarded, "{a:?}");
                    break;
                }
                Some(In::Assignment(a)) => {
                    panic!("offered {a:?} before its hand-back was acknowledged")
                }
                Some(_) => {}
                None => panic!("the hand-back was not acknowledged"),
            }
        }
        // A peer on the same pool joins: the task is its, and the leaving session, still open,
        // gets nothing meanwhile.
        let mut peer = FakeAgent::connect(&coord.url, &coord.tokens.join, "peer", &shared).await;
        let again = loop {
            tokio::select! {
                a = peer.assignment() => break a,
                m = leaving.next(Duration::from_secs(30)) => match m {
                    Some(In::Assignment(a)) => panic!(
                        "the stopping agent was offered {} (attempt {}) after handing it back",
                        a.task_id, a.attempt
                    ),
                    Some(_) => {}
                    None => panic!("the leaving session ended or went quiet before the peer got the task"),
                },
            }
        };
        assert_eq!(again.task_id, task.task_id);
        let t = &job_detail(&client, &id).await.tasks[0];
        assert_eq!((t.state.as_str(), t.attempt), ("running", 1), "{t:?}");
        assert_eq!(t.agent, "peer", "{t:?}");
    }

    /// An idle agent that is stopping says so with a result for no run: acknowledged, it shows
    /// offline at once, and a job submitted before it hangs up is neither expanded for it nor offered
    /// to it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn an_idle_agent_that_says_it_is_stopping_is_offered_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let (coord, client, mut leaving) = leaving_agent(dir.path()).await;
        let shared = [("pool", "shared")];
        let mut peer = FakeAgent::connect(&coord.url, &coord.tokens.join, "peer", &shared).await;
        wait_online(&client, 2).await;
        leaving
            .send(Out::Result(RunResult {
                agent_stopping: true,
                ..Default::default()
            }))
            .await;
        match leaving.next(Duration::from_secs(20)).await {
            Some(In::ResultAck(a)) => {
                assert!(a.run_id.is_empty() && !a.discarded, "{a:?}")
            }
            other => panic!("the stopping notice was not acknowledged: {other:?}"),
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let agents = list_agents(&client).await;
            let shown = agents.iter().find(|a| a.name == "leaving").expect("listed");
            if !shown.online {
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the stopping agent still shows online: {shown:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let job = JobArgs {
            selector: vec!["pool=shared".into()],
            ..digits(100)
        };
        let id = jobs::submit(&client, &job).await.unwrap();
        let offered = tokio::select! {
            a = peer.assignment() => a,
            m = leaving.next(Duration::from_secs(30)) => panic!("the stopping agent got {m:?}"),
        };
        let tasks = job_detail(&client, &id).await.tasks;
        assert_eq!(tasks.len(), 1, "expanded for the peer alone: {tasks:?}");
        assert_eq!(tasks[0].task_id, offered.task_id);
        assert_eq!(tasks[0].agent, "peer", "{tasks:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_stopped_by_sigterm_hands_its_task_back_at_once() {
    let dir = tempfile::tempdir().unwrap();
    // A lease timeout far longer than the test: the task can only move by being handed back.
    let coord = TestCoordinator::sqlite(dir.path(), |c| c.lease_timeout_ms = 120_000).await;
    let client = coord.client().await;
    let log = dir.path().join("leaving.log");
    let mut leaving = std::process::Command::new(built_bin("fleetbench-agent"))
        .args(["--coordinator", &coord.url, "--name", "leaving"])
        .env("FLEETBENCH_JOIN_TOKEN", &coord.tokens.join)
        .args(["--label", "pool=shared", "--host-id", "host-leaving"])
        .arg("--state-dir")
        .arg(dir.path().join("leaving"))
        .arg("--ort-lib")
        .arg(ort_lib())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_online(&client, 1).await;
    push_digits(&client).await;
    let id = jobs::submit(
        &client,
        &JobArgs {
            iterations: None,
            duration_s: Some(4.0),
            window_ms: Some(200),
            ..digits(0)
        },
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let t = &job_detail(&client, &id).await.tasks[0];
        if t.state == "running" && t.progress_queries > 0 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{t:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SAFETY: signalling a child this test started.
    unsafe {
        libc::kill(leaving.id() as i32, libc::SIGTERM);
    }
    let status = leaving.wait().unwrap();
    assert!(status.success(), "{status:?}");
    let t = &job_detail(&client, &id).await.tasks[0];
    assert_eq!(
        (t.state.as_str(), t.attempt),
        ("pending", 0),
        "back in the queue at once, the attempt not counted: {t:?}\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    // A peer takes it and runs it to the end.
    let mut peer = coord.agent("peer", &["pool=shared"], dir.path());
    peer.host_id = "host-peer".into();
    let _peer = TestAgent::start(peer);
    let s = wait_job(&client, &id, Duration::from_secs(60)).await;
    assert_eq!(s.state, "succeeded");
    let t = &job_detail(&client, &id).await.tasks[0];
    assert_eq!((t.agent.as_str(), t.attempt), ("peer", 1), "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_database_read_error_while_an_agent_reconnects_does_not_cancel_its_run() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = test_config(&format!(
        "sqlite://{}",
        dir.path().join("fleet.db").display()
    ));
    config.lease_timeout_ms = 30_000;
    let (coord, store) = TestCoordinator::faulty(config).await;
    let relay = Relay::start(coord.addr).await;
    let client = coord.client().await;
    let _agent = TestAgent::start(agent_config(
        &relay.url(),
        &coord.tokens.join,
        "solo",
        &[],
        dir.path(),
    ));
    wait_online(&client, 1).await;
    push_digits(&client).await;
    let id = jobs::submit(
        &client,
        &JobArgs {
            iterations: None,
            duration_s: Some(4.0),
            window_ms: Some(200),
            ..digits(0)
        },
    )
    .await
    .unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while job_detail(&client, &id).await.tasks[0].progress_queries == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The agent's link drops; when it comes back, the store cannot say which run the agent holds.
    store.fail_active_run.store(true, Ordering::SeqCst);
    relay.cut();
    relay.restore();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while store.failed_calls.load(Ordering::SeqCst) < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the agent did not try to reconnect"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    store.fail_active_run.store(false, Ordering::SeqCst);
    let s = wait_job(&client, &id, Duration::from_secs(60)).await;
    let t = &job_detail(&client, &id).await.tasks[0];
    assert_eq!(
        (s.state.as_str(), t.state.as_str(), t.attempt),
        ("succeeded", "succeeded", 1),
        "the healthy run went on: {t:?}"
    );
    assert!(
        t.run.as_ref().is_some_and(|r| r.duration_ms >= 4000.0),
        "{t:?}"
    );
}

/// An agent that left is not marked connected again by a heartbeat its session queued before it left.
/// Before the fix, the session's end wrote "disconnected" at once, and a heartbeat batch still on its
/// way wrote "connected" after it: the agent looked online for a lease timeout, jobs submitted then were
/// expanded for it and waited for it for ever (seen as a bad-inputs run that never ended in CI).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_heartbeat_recorded_after_its_agent_left_does_not_bring_it_back_online() {
    use fleetbench_proto::v1::{Heartbeat, agent_message::Body};
    let dir = tempfile::tempdir().unwrap();
    let config = test_config(&format!(
        "sqlite://{}",
        dir.path().join("fleet.db").display()
    ));
    let (coord, store) = TestCoordinator::faulty(config).await;
    let client = coord.client().await;
    let fake = FakeAgent::connect(&coord.url, &coord.tokens.join, "leaving", &[]).await;
    wait_online(&client, 1).await;

    let mut calls = store.heartbeat_calls.subscribe();
    let mut disconnects = store.disconnects.subscribe();
    let held = store.heartbeat_gate.write().await;
    let entered = calls.borrow().0;
    fake.send(Body::Heartbeat(Heartbeat::default())).await;
    calls.wait_for(|(n, _)| *n > entered).await.unwrap(); // its batch is in the store, held
    drop(fake); // the agent leaves
    // Before the fix "disconnected" was written now, ahead of the held heartbeat; with it, that waits
    // behind the heartbeat, so this wait ends only by its bound.
    let _ = tokio::time::timeout(Duration::from_secs(1), disconnects.wait_for(|n| *n > 0)).await;
    drop(held);
    calls.wait_for(|(n, done)| done >= n).await.unwrap();
    disconnects.wait_for(|n| *n > 0).await.unwrap();
    let agents = store.inner.list_agents().await.unwrap();
    assert_eq!(agents.len(), 1);
    assert!(
        !agents[0].connected,
        "the agent left, yet a heartbeat recorded after it marked it connected"
    );
    let listed = client
        .fleet()
        .list_agents(fleetbench_proto::v1::ListAgentsRequest {})
        .await
        .unwrap()
        .into_inner()
        .agents;
    assert!(!listed[0].online, "`agents list` shows it online");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_open_health_watch_does_not_hold_the_coordinator_from_stopping() {
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |_| {}).await;
    let channel = tonic::transport::Endpoint::from_shared(coord.url.clone())
        .unwrap()
        .connect()
        .await
        .unwrap();
    // A load balancer watching the server's health, as gRPC clients do.
    let mut watch = HealthClient::new(channel)
        .watch(HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(watch.message().await.unwrap().is_some());
    // Stopping ends the watch and the server; before the fix the open stream held graceful shutdown
    // for ever.
    tokio::time::timeout(Duration::from_secs(20), coord.stop())
        .await
        .expect("the coordinator stopped although a health watch was open");
    let ended = tokio::time::timeout(Duration::from_secs(5), async {
        while let Ok(Some(_)) = watch.message().await {}
    })
    .await;
    assert!(ended.is_ok(), "the watch stream ended");
}
