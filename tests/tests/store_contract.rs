//! One contract suite for the `Store`, run against both backends: SQLite (a temporary file) and
//! Postgres (a fresh database on FLEETBENCH_TEST_POSTGRES_URL, default
//! postgres://postgres@127.0.0.1:5432/postgres). When no Postgres answers, the Postgres tests fail and
//! say so; they never skip.

use std::collections::HashSet;
use std::sync::Arc;

use fleetbench_common::labels::parse_labels;
use fleetbench_common::sha256_hex;
use fleetbench_coordinator::Error;
use fleetbench_coordinator::domain::{Inventory, JobSpec, RunConfig, RunSummary, Variant, Window};
use fleetbench_coordinator::store::{
    self, AgentRegistration, FinishedRun, HeartbeatRecord, LeaseRequest, NewJob, NewTask, RunState,
    Store, VariantInsert, WindowOutcome,
};
use fleetbench_tests::PgDb;

/// A whole blob, read a chunk at a time.
async fn read_all(s: &dyn Store, sha256: &str) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let part = s
            .read_blob(sha256, out.len() as u64, store::sql::BLOB_CHUNK_BYTES)
            .await
            .unwrap();
        if part.is_empty() {
            return out;
        }
        out.extend(part);
    }
}

fn inventory(host: &str) -> Inventory {
    Inventory {
        hostname: host.into(),
        host_id: host.into(),
        cpu_brand: "Test CPU".into(),
        cpu_set: vec![0],
        ..Default::default()
    }
}

fn variant(model: &str, name: &str, sha: &str) -> Variant {
    Variant {
        model: model.into(),
        variant: name.into(),
        artifact_sha256: sha.into(),
        size_bytes: 10,
        ..Default::default()
    }
}

fn window(run: &str, seq: u64, queries: u64) -> Window {
    Window {
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
    s.upsert_platform("plat", "tier=edge, Test CPU, 1 core", &inventory(host))
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
        replica: "r1".into(),
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
    let aa = sha256_hex(&blob);
    let bb = sha256_hex(b"other");
    s.put_blob(&aa, &blob).await.unwrap();
    s.put_blob(&aa, &blob).await.unwrap();
    assert_eq!(s.blob_size(&aa).await.unwrap(), Some(blob.len() as u64));
    assert_eq!(read_all(&*s, &aa).await, blob);
    // Reads from any offset, across chunk boundaries, and nothing past the end.
    let at = store::sql::BLOB_CHUNK_BYTES as u64 - 10;
    let part = s.read_blob(&aa, at, 100).await.unwrap();
    assert!(
        !part.is_empty() && part.len() <= 100,
        "a read returns up to what was asked"
    );
    assert_eq!(part, &blob[at as usize..at as usize + part.len()]);
    assert!(
        s.read_blob(&aa, blob.len() as u64, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.blob_size(&sha256_hex(b"missing"))
            .await
            .unwrap()
            .is_none()
    );
    s.put_blob(&bb, b"other").await.unwrap();
    // Variants: created once, refused under another artifact, nothing lost.
    assert_eq!(
        s.insert_variant(&variant("m", "fp32", &aa)).await.unwrap(),
        VariantInsert::Created
    );
    assert_eq!(
        s.insert_variant(&variant("m", "fp32", &aa)).await.unwrap(),
        VariantInsert::Unchanged
    );
    assert!(matches!(
        s.insert_variant(&variant("m", "fp32", &bb)).await,
        Err(Error::AlreadyExists(_))
    ));
    assert_eq!(
        s.list_variants(Some("m")).await.unwrap()[0].artifact_sha256,
        aa
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
        s.heartbeats(&beats, now + 1, now + 60_000, "r1")
            .await
            .unwrap(),
        vec![Some(true), Some(false), None]
    );

    // Windows: stored once, duplicates recognised (in one batch too), inactive runs refused, and a
    // window for a run leased to another agent discarded.
    let from_a = |seq, q| (a.clone(), window(&la.run_id, seq, q));
    let out = s
        .store_windows(
            &[
                from_a(0, 4),
                from_a(1, 6),
                from_a(1, 6),
                (a.clone(), window("ghost", 0, 1)),
                (c.clone(), window(&la.run_id, 7, 100)),
            ],
            now,
        )
        .await
        .unwrap()
        .outcomes;
    assert_eq!(
        out,
        vec![
            WindowOutcome::Stored,
            WindowOutcome::Stored,
            WindowOutcome::Duplicate,
            WindowOutcome::Inactive,
            WindowOutcome::Foreign,
        ]
    );
    let out = s
        .store_windows(&[from_a(1, 6), from_a(2, 5)], now)
        .await
        .unwrap()
        .outcomes;
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
        pool_key: "{}".into(),
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
    let expired = s.expire_leases(now + 10_000, 3, "r1", 5_000).await.unwrap();
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
        .release_run(&again.run_id, "agent restarted", now + 10_002, 2, false)
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

    tokens(s.as_ref(), now).await;
}

/// Agent credentials: replaced whole, renewed by an offered secret that becomes the only one once
/// promoted, and only while it is the one on offer.
async fn tokens(s: &dyn Store, now: i64) {
    let row = store::TokenRecord {
        id: "0123456789abcdef".into(),
        name: "agent:a1".into(),
        role: "agent".into(),
        secret_sha256: "old".into(),
        agent_id: "a1".into(),
        uses_left: -1,
        created_at: now,
        expires_at: now + 1000,
        revoked_at: 0,
        last_used_at: 0,
        next_secret_sha256: String::new(),
    };
    s.replace_agent_credential(&row).await.unwrap();
    s.offer_token_secret(&row.id, "new").await.unwrap();
    let offered = s.get_token(&row.id).await.unwrap().unwrap();
    assert_eq!(
        (
            offered.secret_sha256.as_str(),
            offered.next_secret_sha256.as_str()
        ),
        ("old", "new")
    );
    let promote = |secret: &'static str, at: i64| {
        s.promote_token_secret("0123456789abcdef", secret, now + 5000, at)
    };
    assert!(!promote("other", now).await.unwrap());
    // Not once the credential has expired.
    assert!(!promote("new", now + 1000).await.unwrap());
    assert!(promote("new", now).await.unwrap());
    let renewed = s.get_token(&row.id).await.unwrap().unwrap();
    assert_eq!(renewed.secret_sha256, "new");
    assert_eq!(renewed.next_secret_sha256, "");
    assert_eq!(renewed.expires_at, now + 5000);
    // Promoting twice, or an empty offer, does nothing.
    assert!(!promote("new", now).await.unwrap());
    assert!(!promote("", now).await.unwrap());
    // Not once it was revoked.
    s.offer_token_secret(&row.id, "newer").await.unwrap();
    assert_eq!(s.revoke_agent_credentials("a1", now).await.unwrap(), 1);
    assert!(!promote("newer", now).await.unwrap());
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

/// The last tasks of many jobs finish at the same moment, while heartbeats renew their leases and
/// lease expiry releases the ones whose leases ran out: every job still ends, and no statement fails
/// (a deadlock would). On Postgres under READ COMMITTED, two finishes that recompute a job's state
/// without locking its row each see the other's task still running, and the job stays `running`.
async fn concurrent_last_finishes(s: Arc<dyn Store>) {
    let now = 7_000_000;
    let jobs = 24;
    let mut agents = Vec::new();
    for i in 0..2 * jobs {
        let host = format!("finish-host-{i}");
        agents.push((
            register(&*s, &format!("finisher-{i}"), &host, now).await,
            host,
        ));
    }
    for j in 0..jobs {
        let pair: Vec<(&str, &str)> = agents[2 * j..2 * j + 2]
            .iter()
            .map(|(a, h)| (a.as_str(), h.as_str()))
            .collect();
        s.create_job(&job(&format!("f1{j:08x}"), &pair, 1), now)
            .await
            .unwrap();
    }
    let mut leases = Vec::new();
    for (agent, host) in &agents {
        let lease = s
            .lease_task(&lease_req(agent, host, now), now)
            .await
            .unwrap()
            .expect("each agent gets the task expanded for it");
        leases.push((agent.clone(), lease));
    }
    // A third of the runs expire (their lease ran out); the rest finish. All at once.
    let barrier = Arc::new(tokio::sync::Barrier::new(leases.len() + 2));
    let mut handles = Vec::new();
    for (i, (_, lease)) in leases.iter().enumerate() {
        let (s, barrier, run_id) = (s.clone(), barrier.clone(), lease.run_id.clone());
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            if i % 3 == 2 {
                s.release_run(&run_id, "lost", now + 1, 1, false)
                    .await
                    .map(|_| ())
            } else {
                let done = FinishedRun {
                    run_id: run_id.clone(),
                    state: RunState::Succeeded,
                    summary: Some(RunSummary {
                        run_id,
                        valid: true,
                        queries: 10,
                        ..Default::default()
                    }),
                    histogram: vec![],
                    error: String::new(),
                    config_key: "single-stream b1".into(),
                    pool_key: "{}".into(),
                };
                s.finish_run(&done, now + 1).await
            }
        }));
    }
    let beats: Vec<HeartbeatRecord> = leases
        .iter()
        .map(|(agent, lease)| HeartbeatRecord {
            agent_id: agent.clone(),
            run_id: Some(lease.run_id.clone()),
        })
        .collect();
    for _ in 0..2 {
        let (s, barrier, beats) = (s.clone(), barrier.clone(), beats.clone());
        handles.push(tokio::spawn(async move {
            barrier.wait().await;
            s.heartbeats(&beats, now + 1, now + 5_000, "r1")
                .await
                .map(|_| ())
        }));
    }
    for h in handles {
        h.await
            .unwrap()
            .expect("no statement fails under contention");
    }
    for j in 0..jobs {
        let (summary, _) = s.get_job(&format!("f1{j:08x}")).await.unwrap();
        assert!(
            matches!(summary.state.as_str(), "succeeded" | "failed"),
            "job {j} stayed {} with every task finished: {summary:?}",
            summary.state
        );
    }
}

/// Lease expiry decided from the database: a lease renewed by another replica expires only once that
/// replica has reached the database since the lease ran out and has been healthy for a lease timeout,
/// or has been gone for three lease timeouts.
async fn replica_leases(s: Arc<dyn Store>) {
    let t0 = 9_000_000;
    let lease_timeout = 5_000;
    let agent = register(&*s, "replica-agent", "replica-host", t0).await;
    s.create_job(&job("ab12", &[(&agent, "replica-host")], 1), t0)
        .await
        .unwrap();
    let mut req = lease_req(&agent, "replica-host", t0);
    req.replica = "r2".into();
    s.lease_task(&req, t0).await.unwrap().expect("leased by r2");
    s.replica_seen("r2", t0, 0).await.unwrap();
    let expire = |now: i64| {
        let s = s.clone();
        async move {
            s.expire_leases(now, 3, "r1", lease_timeout)
                .await
                .unwrap()
                .len()
        }
    };
    // r2 has not reached the database since the lease ran out (it may be cut off): r1 waits.
    assert_eq!(expire(t0 + 10_000).await, 0);
    // r2 is back but had trouble a moment ago: its heartbeats may not have caught up yet.
    s.replica_seen("r2", t0 + 9_000, t0 + 8_000).await.unwrap();
    assert_eq!(expire(t0 + 10_000).await, 0);
    // r2 reaches the database and has been healthy: the agent itself is silent.
    s.replica_seen("r2", t0 + 9_000, 0).await.unwrap();
    assert_eq!(expire(t0 + 10_000).await, 1);
    // A replica gone for three lease timeouts no longer holds its leases.
    let mut req = lease_req(&agent, "replica-host", t0 + 20_000);
    req.replica = "r3".into();
    s.lease_task(&req, t0 + 20_000)
        .await
        .unwrap()
        .expect("leased again by r3");
    s.replica_seen("r3", t0 + 20_000, 0).await.unwrap();
    assert_eq!(expire(t0 + 30_000).await, 0);
    assert_eq!(expire(t0 + 20_000 + 3 * lease_timeout + 1).await, 1);
    // An assignment that never reached its agent (or an agent its operator stopped) hands the task
    // back without counting the attempt.
    let t1 = t0 + 50_000;
    let before = s.job_tasks("ab12").await.unwrap()[0].attempt;
    let lease = s
        .lease_task(&lease_req(&agent, "replica-host", t1), t1)
        .await
        .unwrap()
        .expect("leased");
    assert_eq!(lease.attempt, before + 1);
    let back = s
        .release_run(&lease.run_id, "never delivered", t1, 3, true)
        .await
        .unwrap()
        .unwrap();
    assert!(back.requeued);
    let task = &s.job_tasks("ab12").await.unwrap()[0];
    assert_eq!((task.state.as_str(), task.attempt), ("pending", before));
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
async fn sqlite_store_ends_every_job_when_last_tasks_finish_at_once() {
    let (s, _dir) = sqlite().await;
    concurrent_last_finishes(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_ends_every_job_when_last_tasks_finish_at_once() {
    let db = PgDb::create().await;
    concurrent_last_finishes(store::open(&db.url).await.unwrap()).await;
}

/// Listings sort bytewise on both backends (Postgres would sort by its locale's collation).
async fn bytewise_listings(s: Arc<dyn Store>) {
    for name in ["c-agent", "B-agent", "a-agent"] {
        register(&*s, name, name, 1_000).await;
    }
    let names: Vec<String> = s
        .list_agents()
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.name)
        .collect();
    assert_eq!(names, ["B-agent", "a-agent", "c-agent"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listings_sort_the_same_on_both_backends() {
    let (s, _dir) = sqlite().await;
    bytewise_listings(s).await;
    // A database with an ICU English collation, where 'a' < 'B' < 'c'.
    let db = PgDb::create_with(
        "LOCALE_PROVIDER icu ICU_LOCALE 'en-US' LOCALE 'C.UTF-8' TEMPLATE template0",
    )
    .await;
    bytewise_listings(store::open(&db.url).await.unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_store_decides_lease_expiry_from_the_replicas_health() {
    let (s, _dir) = sqlite().await;
    replica_leases(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_store_decides_lease_expiry_from_the_replicas_health() {
    let db = PgDb::create().await;
    replica_leases(store::open(&db.url).await.unwrap()).await;
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
    let cc = sha256_hex(b"kept");
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("fleet.db").display());
    store::open(&url)
        .await
        .unwrap()
        .put_blob(&cc, b"kept")
        .await
        .unwrap();
    let s = store::open(&url).await.unwrap();
    assert_eq!(read_all(&*s, &cc).await, b"kept");
    let db = PgDb::create().await;
    store::open(&db.url)
        .await
        .unwrap()
        .put_blob(&cc, b"kept")
        .await
        .unwrap();
    let s = store::open(&db.url).await.unwrap();
    assert_eq!(read_all(&*s, &cc).await, b"kept");
}

/// Stages, artifact sets, uploads, claims and deletions: the large-model half of the contract.
async fn artifacts_contract(s: Arc<dyn Store>) {
    use fleetbench_common::artifact::{ArtifactFile, ArtifactSet};
    use fleetbench_coordinator::store::Upload;
    let chunk = store::sql::BLOB_CHUNK_BYTES;
    let bytes: Vec<u8> = (0..(chunk + chunk / 2)).map(|i| (i % 253) as u8).collect();
    let sha = sha256_hex(&bytes);

    // A stage holds whole chunks for a resume; a short last chunk is sent again.
    s.stage_chunk("up-t-1", 0, &bytes[..chunk]).await.unwrap();
    s.stage_chunk("up-t-1", chunk as u64, &bytes[chunk..])
        .await
        .unwrap();
    assert_eq!(s.staged_len("up-t-1").await.unwrap(), chunk as u64);
    assert_eq!(s.read_staged("up-t-1", 5, 10).await.unwrap(), &bytes[5..15]);
    let gap = s
        .stage_chunk("up-t-1", 3 * chunk as u64, &bytes[..chunk])
        .await;
    assert!(matches!(gap, Err(Error::FailedPrecondition(_))), "{gap:?}");
    // Continuing from the last whole chunk replaces what followed it.
    s.stage_chunk("up-t-1", chunk as u64, &bytes[chunk..])
        .await
        .unwrap();
    s.commit_staged("up-t-1", &sha, bytes.len() as u64)
        .await
        .unwrap();
    assert_eq!(read_all(&*s, &sha).await, bytes);
    assert_eq!(
        s.staged_len("up-t-1").await.unwrap(),
        0,
        "the stage is gone"
    );
    s.discard_staged("up-t-1").await.unwrap();
    s.stage_chunk("up-t-2", 0, b"x").await.unwrap();
    s.discard_staged("up-t-2").await.unwrap();
    assert_eq!(s.staged_len("up-t-2").await.unwrap(), 0);

    // Two commits of the same bytes at once (two clients pushing one model) both succeed, once.
    let same: Vec<u8> = vec![9u8; chunk + 10];
    let same_sha = sha256_hex(&same);
    let (x, y) = tokio::join!(s.put_blob(&same_sha, &same), s.put_blob(&same_sha, &same));
    x.unwrap();
    y.unwrap();
    assert_eq!(read_all(&*s, &same_sha).await, same);

    // Sets.
    let small = sha256_hex(b"model");
    s.put_blob(&small, b"model").await.unwrap();
    let set = ArtifactSet {
        model_path: "m.onnx".into(),
        files: vec![
            ArtifactFile {
                path: "m.onnx".into(),
                size_bytes: 5,
                sha256: small.clone(),
            },
            ArtifactFile {
                path: "weights/w.bin".into(),
                size_bytes: bytes.len() as u64,
                sha256: sha.clone(),
            },
        ],
    }
    .normalised()
    .unwrap();
    let set_sha = set.id();
    s.put_blob(&set_sha, set.manifest().as_bytes())
        .await
        .unwrap();
    s.put_set(&set_sha, &set, 1).await.unwrap();
    s.put_set(&set_sha, &set, 2).await.unwrap();
    assert_eq!(s.get_set(&set_sha).await.unwrap(), Some(set.clone()));
    assert_eq!(s.get_set(&small).await.unwrap(), None);

    // Uploads: recorded once per id, touched, found stale, forgotten.
    let up = Upload {
        id: "u1".into(),
        owner: "cli-a".into(),
        set_sha256: set_sha.clone(),
        set: set.clone(),
        created_at: 10,
        updated_at: 10,
    };
    assert_eq!(s.put_upload(&up).await.unwrap(), up);
    let touched = s
        .put_upload(&Upload {
            updated_at: 50,
            owner: "ignored".into(),
            ..up.clone()
        })
        .await
        .unwrap();
    assert_eq!((touched.owner.as_str(), touched.updated_at), ("cli-a", 50));
    assert!(s.stale_uploads(40).await.unwrap().is_empty());
    assert_eq!(s.stale_uploads(60).await.unwrap()[0].id, "u1");
    s.delete_upload("u1").await.unwrap();
    assert!(s.get_upload("u1").await.unwrap().is_none());

    // Claims: one holder at a time until the claim runs out.
    assert!(s.claim("upkeep", "r1", 100, 200).await.unwrap());
    assert!(!s.claim("upkeep", "r2", 150, 250).await.unwrap());
    assert!(s.claim("upkeep", "r1", 150, 300).await.unwrap());
    assert!(s.claim("upkeep", "r2", 301, 400).await.unwrap());

    // Deletion: refused while a job uses the variant, then everything it alone used goes.
    let mut v = variant("big", "fp32", &set_sha);
    v.size_bytes = set.total_bytes();
    s.insert_variant(&v).await.unwrap();
    let now = 2_000_000;
    let agent = register(&*s, "x", "host-x", now).await;
    let mut j = job("dead01", &[(&agent, "host-x")], 1);
    j.spec.model = "big".into();
    s.create_job(&j, now).await.unwrap();
    let busy = s.delete_variants("big", &["fp32".into()], false).await;
    assert!(
        matches!(&busy, Err(Error::FailedPrecondition(m)) if m.contains("dead01")),
        "{busy:?}"
    );
    let busy = s.delete_job("dead01").await;
    assert!(
        matches!(busy, Err(Error::FailedPrecondition(_))),
        "{busy:?}"
    );
    assert_eq!(
        read_all(&*s, &sha).await,
        bytes,
        "a refusal changes nothing"
    );
    // Cancelled while its task runs: the run goes on until the agent stops it, so still refused.
    let lease = s
        .lease_task(&lease_req(&agent, "host-x", now), now)
        .await
        .unwrap()
        .expect("the task is leased");
    s.cancel_job("dead01", now + 1).await.unwrap();
    let busy = s.delete_variants("big", &["fp32".into()], false).await;
    assert!(
        matches!(&busy, Err(Error::FailedPrecondition(m)) if m.contains("dead01")),
        "a task still running keeps its variant: {busy:?}"
    );
    let mut stopped = FinishedRun::failed(&lease.run_id, String::new());
    stopped.state = RunState::Cancelled;
    s.finish_run(&stopped, now + 2).await.unwrap();
    let dry = s
        .delete_variants("big", &["fp32".into()], true)
        .await
        .unwrap();
    assert_eq!(dry.variants, vec!["big/fp32".to_string()]);
    assert!(
        s.blob_size(&sha).await.unwrap().is_some(),
        "a dry run deletes nothing"
    );
    let done = s
        .delete_variants("big", &["fp32".into()], false)
        .await
        .unwrap();
    assert_eq!((done.jobs, done.bytes_freed), (1, dry.bytes_freed));
    assert_eq!(
        done.bytes_freed,
        set.total_bytes() + set.manifest().len() as u64
    );
    for gone in [&sha, &small, &set_sha] {
        assert!(
            s.blob_size(gone).await.unwrap().is_none(),
            "{gone} collected"
        );
    }
    assert!(s.get_set(&set_sha).await.unwrap().is_none());
    assert!(s.list_variants(Some("big")).await.unwrap().is_empty());
    assert!(matches!(
        s.resolve_job_id("dead01").await,
        Err(Error::NotFound(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_store_meets_the_artifacts_contract() {
    let (s, _dir) = sqlite().await;
    artifacts_contract(s).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_store_meets_the_artifacts_contract() {
    let db = PgDb::create().await;
    artifacts_contract(store::open(&db.url).await.unwrap()).await;
}
