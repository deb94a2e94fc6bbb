//! One contract suite for the `Store`, run against both backends: SQLite (a temporary file) and
//! Postgres (a fresh database on FLEETBENCH_TEST_POSTGRES_URL, default
//! postgres://postgres@127.0.0.1:5432/postgres). When no Postgres answers, the Postgres tests fail and
//! say so; they never skip.

use std::collections::HashSet;
use std::sync::Arc;

use fleetbench_common::labels::parse_labels;
use fleetbench_coordinator::Error;
use fleetbench_coordinator::store::{
    self, AgentRegistration, FinishedRun, HeartbeatRecord, LeaseRequest, NewJob, NewTask, RunState,
    Store, VariantInsert, WindowOutcome,
};
use fleetbench_proto::v1::{
    Inventory, JobSpec, ModelVariant, RunConfig, RunSummary, TelemetryWindow,
};
use fleetbench_tests::PgDb;

fn inventory(host: &str) -> Inventory {
    Inventory {
        hostname: host.into(),
        host_id: host.into(),
        cpu_brand: "Test CPU".into(),
        cpu_set: vec![0],
        ..Default::default()
    }
}

fn variant(model: &str, name: &str, sha: &str) -> ModelVariant {
    ModelVariant {
        model: model.into(),
        variant: name.into(),
        artifact_sha256: sha.into(),
        size_bytes: 10,
        ..Default::default()
    }
}

fn window(run: &str, seq: u64, queries: u64) -> TelemetryWindow {
    TelemetryWindow {
        run_id: run.into(),
        seq,
        queries,
        samples: queries,
        end_offset_ns: seq + 1,
        ..Default::default()
    }
}

async fn register(s: &dyn Store, name: &str, host: &str, now: i64) -> String {
    let labels = parse_labels(&["tier=edge"]).unwrap();
    s.upsert_platform("plat", "tier=edge, Test CPU, 1 core", b"")
        .await
        .unwrap();
    let reg = AgentRegistration {
        agent_id: None,
        name: name.into(),
        labels,
        inventory: inventory(host),
        platform_id: "plat".into(),
        platform_name: "tier=edge, Test CPU, 1 core".into(),
        alive_since: now - 10_000,
    };
    let id = s.register_agent(&reg, now).await.unwrap();
    s.set_connected(&id, true, now).await.unwrap();
    id
}

fn lease_req(agent: &str, host: &str, now: i64) -> LeaseRequest {
    LeaseRequest {
        agent_id: agent.into(),
        platform_id: "plat".into(),
        host_id: host.into(),
        run_id: uuid::Uuid::new_v4().simple().to_string(),
        lease_until: now + 5_000,
        alive_since: now - 10_000,
    }
}

fn job(id: &str, agents: &[(&str, &str)], per_agent: usize) -> NewJob {
    let mut tasks = Vec::new();
    for (agent, host) in agents {
        for _ in 0..per_agent {
            tasks.push(NewTask {
                id: uuid::Uuid::new_v4().simple().to_string(),
                seq: tasks.len() as i64,
                variant: "fp32".into(),
                platform_id: "plat".into(),
                host_id: host.to_string(),
                target_agent_id: agent.to_string(),
                config: RunConfig {
                    iterations: 10,
                    ..Default::default()
                },
            });
        }
    }
    NewJob {
        id: id.into(),
        spec: JobSpec {
            model: "m".into(),
            ..Default::default()
        },
        tasks,
    }
}

async fn contract(s: Arc<dyn Store>) {
    let now = 1_000_000;
    // Blobs: chunked, reassembled, idempotent.
    let blob: Vec<u8> = (0..(2 * store::sql::BLOB_CHUNK_BYTES + 1234))
        .map(|i| (i % 251) as u8)
        .collect();
    s.put_blob("aa", &blob).await.unwrap();
    s.put_blob("aa", &blob).await.unwrap();
    let (size, chunks) = s.blob_meta("aa").await.unwrap().unwrap();
    assert_eq!((size, chunks), (blob.len() as u64, 3));
    let mut back = Vec::new();
    for i in 0..chunks {
        back.extend(s.blob_chunk("aa", i).await.unwrap());
    }
    assert_eq!(back, blob);
    assert!(s.blob_meta("missing").await.unwrap().is_none());
    s.put_blob("bb", b"other").await.unwrap();

    // Variants: created once, refused under another artifact, nothing lost.
    assert_eq!(
        s.insert_variant(&variant("m", "fp32", "aa")).await.unwrap(),
        VariantInsert::Created
    );
    assert_eq!(
        s.insert_variant(&variant("m", "fp32", "aa")).await.unwrap(),
        VariantInsert::Unchanged
    );
    assert!(matches!(
        s.insert_variant(&variant("m", "fp32", "bb")).await,
        Err(Error::AlreadyExists(_))
    ));
    assert_eq!(
        s.list_variants(Some("m")).await.unwrap()[0].artifact_sha256,
        "aa"
    );

    // Agents: ids survive re-registration; an online name cannot be taken.
    let a = register(&*s, "a", "host-1", now).await;
    s.set_connected(&a, false, now).await.unwrap();
    let again = register(&*s, "a", "host-1", now).await;
    assert_eq!(a, again, "an offline-then-back name keeps its identity");
    let b = register(&*s, "b", "host-1", now).await;
    let c = register(&*s, "c", "host-2", now).await;
    let taken = s
        .register_agent(
            &AgentRegistration {
                agent_id: Some("someone-else".into()),
                name: "b".into(),
                labels: Default::default(),
                inventory: inventory("host-9"),
                platform_id: "plat".into(),
                platform_name: "x".into(),
                alive_since: now - 10_000,
            },
            now,
        )
        .await;
    assert!(matches!(taken, Err(Error::AlreadyExists(_))), "{taken:?}");
    assert_eq!(s.list_agents().await.unwrap().len(), 3);

    // Jobs and leases: one task per agent at a time, one agent per host at a time.
    s.create_job(
        &job(
            "feedbeef01",
            &[(&a, "host-1"), (&b, "host-1"), (&c, "host-2")],
            2,
        ),
        now,
    )
    .await
    .unwrap();
    assert_eq!(s.resolve_job_id("feedbe").await.unwrap(), "feedbeef01");
    assert!(matches!(
        s.resolve_job_id("0000").await,
        Err(Error::NotFound(_))
    ));
    let la = s
        .lease_task(&lease_req(&a, "host-1", now), now)
        .await
        .unwrap()
        .expect("a gets its task");
    assert!(
        s.lease_task(&lease_req(&b, "host-1", now), now)
            .await
            .unwrap()
            .is_none(),
        "host-1 is busy"
    );
    let lc = s
        .lease_task(&lease_req(&c, "host-2", now), now)
        .await
        .unwrap()
        .expect("c's host is free");
    assert_eq!(
        s.active_run_of_agent(&a).await.unwrap().as_deref(),
        Some(la.run_id.as_str())
    );
    let (summary, _) = s.get_job("feedbeef01").await.unwrap();
    assert_eq!(
        (
            summary.state.as_str(),
            summary.tasks_running,
            summary.tasks_pending
        ),
        ("running", 2, 4)
    );

    // Heartbeats extend live leases and say which runs are gone.
    let beats = [
        HeartbeatRecord {
            agent_id: a.clone(),
            run_id: Some(la.run_id.clone()),
        },
        HeartbeatRecord {
            agent_id: b.clone(),
            run_id: Some("nope".into()),
        },
        HeartbeatRecord {
            agent_id: c.clone(),
            run_id: None,
        },
    ];
    assert_eq!(
        s.heartbeats(&beats, now + 1, now + 60_000).await.unwrap(),
        vec![Some(true), Some(false), None]
    );

    // Windows: stored once, duplicates recognised, inactive runs refused.
    let out = s
        .store_windows(
            &[
                window(&la.run_id, 0, 4),
                window(&la.run_id, 1, 6),
                window("ghost", 0, 1),
            ],
            now,
        )
        .await
        .unwrap();
    assert_eq!(
        out,
        vec![
            WindowOutcome::Stored,
            WindowOutcome::Stored,
            WindowOutcome::Inactive
        ]
    );
    let out = s
        .store_windows(&[window(&la.run_id, 1, 6), window(&la.run_id, 2, 5)], now)
        .await
        .unwrap();
    assert_eq!(out, vec![WindowOutcome::Duplicate, WindowOutcome::Stored]);
    let ctx = s.run_context(&la.run_id).await.unwrap().unwrap();
    assert_eq!(ctx.windows.iter().map(|w| w.queries).sum::<u64>(), 15);
    let tasks = s.job_tasks("feedbeef01").await.unwrap();
    assert_eq!(tasks.iter().map(|t| t.progress_queries).sum::<u64>(), 15);

    // Finishing a run settles its task; finishing twice changes nothing.
    let done = FinishedRun {
        run_id: la.run_id.clone(),
        state: RunState::Succeeded,
        summary: Some(RunSummary {
            run_id: la.run_id.clone(),
            valid: true,
            queries: 15,
            ..Default::default()
        }),
        histogram: vec![],
        error: String::new(),
        config_key: "single-stream b1".into(),
    };
    s.finish_run(&done, now + 2).await.unwrap();
    s.finish_run(&done, now + 3).await.unwrap();
    assert!(s.active_run_of_agent(&a).await.unwrap().is_none());
    assert_eq!(s.runs_for_model("m", None).await.unwrap().len(), 1);
    assert_eq!(
        s.runs_for_model("m", Some("feedbeef01")).await.unwrap()[0]
            .summary
            .queries,
        15
    );

    // Expired leases go back to the queue; the next lease is a new attempt.
    let expired = s.expire_leases(now + 10_000, 3).await.unwrap();
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].run_id, lc.run_id);
    assert!(expired[0].requeued);
    assert!(s.run_context(&lc.run_id).await.unwrap().unwrap().state == "abandoned");
    let again = s
        .lease_task(&lease_req(&c, "host-2", now + 10_001), now + 10_001)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (again.task_id.as_str(), again.attempt),
        (lc.task_id.as_str(), 2)
    );

    // Releasing a run at once (its agent restarted) behaves the same; attempts run out into failure.
    let r = s
        .release_run(&again.run_id, "agent restarted", now + 10_002, 2)
        .await
        .unwrap()
        .unwrap();
    assert!(!r.requeued, "attempt 2 of 2 fails for good");
    let t = s
        .job_tasks("feedbeef01")
        .await
        .unwrap()
        .into_iter()
        .find(|t| t.task_id == lc.task_id)
        .unwrap();
    assert_eq!(t.state, "failed");
    assert!(t.error.contains("agent restarted"), "{}", t.error);

    // Cancelling: pending tasks end, running runs are listed for their agents.
    let lb = s
        .lease_task(&lease_req(&b, "host-1", now + 10_003), now + 10_003)
        .await
        .unwrap()
        .unwrap();
    let running = s.cancel_job("feedbeef01", now + 10_004).await.unwrap();
    assert_eq!(running, vec![(lb.run_id.clone(), b.clone())]);
    let (summary, _) = s.get_job("feedbeef01").await.unwrap();
    assert_eq!(summary.state, "cancelled");
    assert_eq!(summary.tasks_pending, 0);
    assert!(matches!(
        s.cancel_job("feedbeef01", now).await,
        Err(Error::FailedPrecondition(_))
    ));
    assert!(
        s.lease_task(&lease_req(&c, "host-2", now + 10_005), now + 10_005)
            .await
            .unwrap()
            .is_none()
    );
}

/// Many agents leasing at once: no task is leased twice, and no host runs two tasks.
async fn concurrent_leases(s: Arc<dyn Store>) {
    let now = 5_000_000;
    let mut agents = Vec::new();
    for i in 0..12 {
        let host = format!("host-{}", i % 4);
        agents.push((register(&*s, &format!("agent-{i}"), &host, now).await, host));
    }
    let pairs: Vec<(&str, &str)> = agents
        .iter()
        .map(|(a, h)| (a.as_str(), h.as_str()))
        .collect();
    s.create_job(&job("c0ffee02", &pairs, 3), now)
        .await
        .unwrap();
    let mut handles = Vec::new();
    for (agent, host) in agents.clone() {
        let s = s.clone();
        handles.push(tokio::spawn(async move {
            s.lease_task(&lease_req(&agent, &host, now), now)
                .await
                .unwrap()
        }));
    }
    let mut leased = Vec::new();
    for h in handles {
        if let Some(l) = h.await.unwrap() {
            leased.push(l);
        }
    }
    let tasks: HashSet<&str> = leased.iter().map(|l| l.task_id.as_str()).collect();
    assert_eq!(tasks.len(), leased.len(), "no task leased twice");
    assert_eq!(leased.len(), 4, "exactly one task per host");
}

async fn sqlite() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let s = store::open(&format!(
        "sqlite://{}",
        dir.path().join("fleet.db").display()
    ))
    .await
    .unwrap();
    (s, dir)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_meets_the_contract() {
    let (s, _dir) = sqlite().await;
    assert_eq!(s.backend(), "sqlite");
    contract(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_leases_safely_under_concurrency() {
    let (s, _dir) = sqlite().await;
    concurrent_leases(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_meets_the_contract() {
    let db = PgDb::create().await;
    let s = store::open(&db.url).await.unwrap();
    assert_eq!(s.backend(), "postgres");
    contract(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_leases_safely_under_concurrency() {
    let db = PgDb::create().await;
    concurrent_leases(store::open(&db.url).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn migrations_are_idempotent_and_data_survives_reopening() {
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("fleet.db").display());
    store::open(&url)
        .await
        .unwrap()
        .put_blob("cc", b"kept")
        .await
        .unwrap();
    let s = store::open(&url).await.unwrap();
    assert_eq!(s.blob_meta("cc").await.unwrap(), Some((4, 1)));
    let db = PgDb::create().await;
    store::open(&db.url)
        .await
        .unwrap()
        .put_blob("cc", b"kept")
        .await
        .unwrap();
    assert_eq!(
        store::open(&db.url)
            .await
            .unwrap()
            .blob_meta("cc")
            .await
            .unwrap(),
        Some((4, 1))
    );
}
