//! The fault suite: real processes, faults placed by a seeded random schedule (the seed is printed;
//! `FLEETBENCH_FAULT_SEED=N` replays a run), and after each fault the same questions: did every job
//! end, and is every acknowledged window stored exactly once — seqs 0..n with no gap and no duplicate,
//! their queries summing to the run's total?

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use fleetbench_agent::uplink::UplinkStats;
use fleetbench_cli::client::Client;
use fleetbench_cli::commands::jobs;
use fleetbench_cli::jobspec::JobArgs;
use fleetbench_proto::v1::{JobDetail, RankRequest};
use fleetbench_tests::*;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The seed of this run's fault schedule: FLEETBENCH_FAULT_SEED, else a fresh one. Printed, so a
/// failing run can be replayed.
fn seed(test: &str) -> StdRng {
    let seed = std::env::var("FLEETBENCH_FAULT_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    println!("{test}: fault schedule seed {seed} (replay with FLEETBENCH_FAULT_SEED={seed})");
    StdRng::seed_from_u64(seed)
}

/// A duration-bounded job over the digits model with short windows.
fn streaming_job(seconds: f64) -> JobArgs {
    JobArgs {
        model: Some("digits".into()),
        variants: vec!["fp32".into()],
        iterations: None,
        duration_s: Some(seconds),
        warmup: Some(10),
        window_ms: Some(100),
        skip_accuracy: true,
        ..Default::default()
    }
}

/// What the suite checks of every run of a job, and reports.
#[derive(Debug, Default)]
struct Tally {
    runs: usize,
    windows: u64,
    lost: u64,
    duplicated: u64,
}

/// Checks every succeeded run of `detail` against the store: windows 0..n, no gap, no duplicate,
/// their queries adding up to the run's total.
async fn tally(database: &str, detail: &JobDetail) -> Tally {
    let store = fleetbench_coordinator::store::open(database).await.unwrap();
    let mut t = Tally::default();
    for task in &detail.tasks {
        let Some(run) = &task.run else { continue };
        let ctx = store.run_context(&run.run_id).await.unwrap().unwrap();
        let seqs: Vec<u64> = ctx.windows.iter().map(|w| w.seq).collect();
        let n = seqs.iter().copied().max().map(|m| m + 1).unwrap_or(0);
        let distinct: std::collections::BTreeSet<u64> = seqs.iter().copied().collect();
        t.runs += 1;
        t.windows += seqs.len() as u64;
        t.lost += n - distinct.len() as u64;
        t.duplicated += (seqs.len() - distinct.len()) as u64;
        assert_eq!(
            ctx.windows.iter().map(|w| w.queries).sum::<u64>(),
            run.queries,
            "the stored windows of run {} hold every query it reported",
            run.run_id
        );
        assert_eq!(run.windows, n, "the summary counts every window");
    }
    t
}

async fn wait_progress(client: &Client, job: &str) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let d = job_detail(client, job).await;
        if d.tasks.iter().any(|t| t.progress_queries > 0) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "no progress: {d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The coordinator process is SIGKILLed five times while a job streams, and started again on the same
/// database; its agents reach it through a relay whose address survives the restarts.
async fn coordinator_killed_five_times(database: &str, dir: &Path, test: &str) {
    let mut rng = seed(test);
    let mut coord = CoordinatorProcess::start(database, dir, "coordinator-0");
    let relay = Relay::start(coord.addr()).await;
    let tokens = Tokens::made_in(database).await;
    let client = tokens.client(&relay.url()).await;
    let mut agents = Vec::new();
    for name in ["left", "right"] {
        let mut c = agent_config(&relay.url(), &tokens.join, name, &[], dir);
        c.host_id = format!("host-{name}");
        agents.push(TestAgent::start(c));
    }
    wait_online(&client, 2).await;
    push_digits(&client).await;
    let id = jobs::submit(&client, &streaming_job(6.0)).await.unwrap();
    wait_progress(&client, &id).await;
    let kills = 5;
    for i in 1..=kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(200..900))).await;
        coord.kill();
        coord = CoordinatorProcess::start(database, dir, &format!("coordinator-{i}"));
        relay.set_upstream(coord.addr());
    }
    let s = wait_job(&client, &id, Duration::from_secs(120)).await;
    let detail = job_detail(&client, &id).await;
    let t = tally(database, &detail).await;
    println!(
        "{test}: faults injected {kills}, jobs ended 1 of 1 ({}), runs {}, windows stored {}, lost {}, duplicated {}",
        s.state, t.runs, t.windows, t.lost, t.duplicated
    );
    assert_eq!(s.state, "succeeded", "{detail:?}");
    assert_eq!((t.lost, t.duplicated), (0, 0));
    assert_eq!(t.runs, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_coordinator_sigkilled_five_times_on_sqlite_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("fleet.db").display());
    coordinator_killed_five_times(&db, dir.path(), "sqlite coordinator kills").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_coordinator_sigkilled_five_times_on_postgres_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let pg = PgDb::create().await;
    coordinator_killed_five_times(&pg.url, dir.path(), "postgres coordinator kills").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_sigkilled_mid_task_is_replaced_by_a_peer_and_its_run_left_out() {
    let mut rng = seed("agent kill");
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |c| c.lease_timeout_ms = 1500).await;
    let client = coord.client().await;
    let spawn = |name: &str| {
        std::process::Command::new(built_bin("fleetbench-agent"))
            .args(["--coordinator", &coord.url, "--name", name])
            .env("FLEETBENCH_JOIN_TOKEN", &coord.tokens.join)
            .args(["--label", "pool=same"])
            .arg("--host-id")
            .arg(format!("host-{name}"))
            .arg("--state-dir")
            .arg(dir.path().join(name))
            .arg("--ort-lib")
            .arg(ort_lib())
            .stderr(std::fs::File::create(dir.path().join(format!("{name}.log"))).unwrap())
            .spawn()
            .unwrap()
    };
    let mut victim = spawn("victim");
    let mut peer = spawn("peer");
    wait_online(&client, 2).await;
    push_digits(&client).await;
    let id = jobs::submit(&client, &streaming_job(2.0)).await.unwrap();
    // Once the victim's task streams, it dies at a seeded moment.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let victim_run = loop {
        let d = job_detail(&client, &id).await;
        if let Some(t) = d
            .tasks
            .iter()
            .find(|t| t.agent == "victim" && t.state == "running" && t.progress_queries > 0)
        {
            break t.task_id.clone();
        }
        assert!(tokio::time::Instant::now() < deadline, "{d:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..500))).await;
    victim.kill().unwrap();
    victim.wait().unwrap();
    let s = wait_job(&client, &id, Duration::from_secs(90)).await;
    let detail = job_detail(&client, &id).await;
    let _ = peer.kill();
    let _ = peer.wait();
    assert_eq!(s.state, "succeeded", "{detail:?}");
    let moved = detail
        .tasks
        .iter()
        .find(|t| t.task_id == victim_run)
        .unwrap();
    assert_eq!(
        (moved.agent.as_str(), moved.attempt),
        ("peer", 2),
        "a peer re-ran it: {moved:?}"
    );
    // The dead run is marked and left out of rankings.
    let store = fleetbench_coordinator::store::open(&coord.database)
        .await
        .unwrap();
    let rows = client
        .rankings()
        .rank(RankRequest {
            model: "digits".into(),
            include_invalid: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .rows;
    let ranked: Vec<&String> = rows.iter().flat_map(|r| &r.run_ids).collect();
    assert_eq!(
        ranked.len(),
        2,
        "two runs ranked, the dead one left out: {rows:?}"
    );
    for r in &ranked {
        let ctx = store.run_context(r).await.unwrap().unwrap();
        assert_eq!(ctx.state, "succeeded");
    }
    let t = tally(&coord.database, &detail).await;
    println!(
        "agent kill: faults injected 1, jobs ended 1 of 1, windows lost {}, duplicated {}",
        t.lost, t.duplicated
    );
    assert_eq!((t.lost, t.duplicated), (0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_agent_cut_off_for_thirty_seconds_goes_on_and_its_backlog_is_acknowledged() {
    let mut rng = seed("agent cut");
    let cut_s: u64 = std::env::var("FLEETBENCH_FAULT_CUT_S")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::sqlite(dir.path(), |c| {
        c.lease_timeout_ms = (cut_s + 30) * 1000;
    })
    .await;
    let relay = Relay::start(coord.addr).await;
    let client = coord.client().await;
    let stats = Arc::new(UplinkStats::default());
    let _agent = TestAgent::start_with(
        agent_config(&relay.url(), &coord.tokens.join, "remote", &[], dir.path()),
        None,
        stats.clone(),
    );
    wait_online(&client, 1).await;
    push_digits(&client).await;
    let mut job = streaming_job(cut_s as f64 + 4.0);
    job.window_ms = Some(500);
    let id = jobs::submit(&client, &job).await.unwrap();
    wait_progress(&client, &id).await;
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..1000))).await;
    relay.cut();
    let acked_at_cut = stats.windows_acked.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(cut_s)).await;
    let sent_during = stats.windows_sent.load(Ordering::SeqCst);
    assert!(
        sent_during >= acked_at_cut + cut_s,
        "the run went on while cut off"
    );
    assert!(stats.windows_acked.load(Ordering::SeqCst) <= acked_at_cut + 1);
    relay.restore();
    let s = wait_job(&client, &id, Duration::from_secs(60)).await;
    let detail = job_detail(&client, &id).await;
    assert_eq!(s.state, "succeeded", "{detail:?}");
    assert_eq!(
        detail.tasks[0].attempt, 1,
        "the cut did not requeue the task"
    );
    assert_eq!(
        stats.windows_acked.load(Ordering::SeqCst),
        stats.windows_sent.load(Ordering::SeqCst),
        "the backlog was acknowledged after the cut"
    );
    let t = tally(&coord.database, &detail).await;
    println!(
        "agent cut: faults injected 1 ({cut_s} s), jobs ended 1 of 1, windows {} (sent during the cut {}), lost {}, duplicated {}",
        t.windows,
        sent_during - acked_at_cut,
        t.lost,
        t.duplicated
    );
    assert_eq!((t.lost, t.duplicated), (0, 0));
}

/// A Postgres server of the test's own (never the shared one), on a Unix socket in a temporary
/// folder: initdb, pg_ctl start and stop, as the `postgres` user (initdb refuses root).
struct OwnPostgres {
    dir: tempfile::TempDir,
    bin: std::path::PathBuf,
}

impl OwnPostgres {
    fn as_postgres(&self, tool: &str, args: &[&str]) -> std::process::Output {
        let mut cmd = if unsafe { libc::geteuid() } == 0 {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(tool));
            c
        } else {
            std::process::Command::new(self.bin.join(tool))
        };
        cmd.args(args)
            .output()
            .unwrap_or_else(|e| panic!("{tool}: {e}"))
    }

    fn start() -> OwnPostgres {
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .ok()
            .and_then(|d| {
                let mut v: Vec<_> = d.flatten().map(|e| e.path().join("bin")).collect();
                v.sort();
                v.pop()
            })
            .filter(|b| b.join("initdb").exists())
            .expect("PostgreSQL's initdb and pg_ctl (Debian's postgresql package; scripts/ensure-postgres.sh installs it)");
        let dir = tempfile::tempdir().unwrap();
        if unsafe { libc::geteuid() } == 0 {
            let out = std::process::Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path())
                .output()
                .unwrap();
            assert!(out.status.success());
        }
        let pg = OwnPostgres { dir, bin };
        let data = pg.data();
        let out = pg.as_postgres(
            "initdb",
            &["-D", &data, "-A", "trust", "-U", "postgres", "--no-sync"],
        );
        assert!(
            out.status.success(),
            "initdb: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg.ctl("start");
        pg
    }

    fn data(&self) -> String {
        self.dir.path().join("data").display().to_string()
    }

    fn ctl(&self, action: &str) {
        let opts = format!(
            "-c listen_addresses='' -k {} -p 5499 -c fsync=off",
            self.dir.path().display()
        );
        let log = self.dir.path().join("server.log").display().to_string();
        let out = match action {
            "start" => self.as_postgres(
                "pg_ctl",
                &["-D", &self.data(), "-o", &opts, "-l", &log, "-w", "start"],
            ),
            _ => self.as_postgres("pg_ctl", &["-D", &self.data(), "-m", "fast", "-w", "stop"]),
        };
        assert!(
            out.status.success(),
            "pg_ctl {action}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn url(&self) -> String {
        format!(
            "postgres://postgres@localhost/postgres?host={}&port=5499",
            self.dir.path().display()
        )
    }
}

impl Drop for OwnPostgres {
    fn drop(&mut self) {
        let _ = self.as_postgres(
            "pg_ctl",
            &["-D", &self.data(), "-m", "immediate", "-w", "stop"],
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_stopped_and_started_mid_job_loses_nothing_and_service_resumes() {
    let mut rng = seed("postgres restart");
    let pg = OwnPostgres::start();
    let dir = tempfile::tempdir().unwrap();
    let coord = TestCoordinator::serve(
        test_config(&pg.url()),
        tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
    )
    .await;
    let client = coord.client().await;
    let stats = Arc::new(UplinkStats::default());
    let _agent = TestAgent::start_with(coord.agent("solo", &[], dir.path()), None, stats.clone());
    wait_online(&client, 1).await;
    push_digits(&client).await;
    let id = jobs::submit(&client, &streaming_job(6.0)).await.unwrap();
    wait_progress(&client, &id).await;
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..800))).await;
    pg.ctl("stop");
    let acked = stats.windows_acked.load(Ordering::SeqCst);
    // While it is away: a clear error for a request that needs it, no acknowledgements, the run goes on.
    let e = client
        .jobs()
        .list_jobs(fleetbench_proto::v1::ListJobsRequest::default())
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unavailable, "{e:?}");
    assert!(e.message().contains("database"), "{e:?}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stats.windows_sent.load(Ordering::SeqCst) < acked + 10 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(stats.windows_acked.load(Ordering::SeqCst) <= acked + 1);
    pg.ctl("start");
    let s = wait_job(&client, &id, Duration::from_secs(90)).await;
    let detail = job_detail(&client, &id).await;
    assert_eq!(s.state, "succeeded", "{detail:?}");
    let t = tally(&pg.url(), &detail).await;
    println!(
        "postgres restart: faults injected 1, jobs ended 1 of 1, windows {}, lost {}, duplicated {}",
        t.windows, t.lost, t.duplicated
    );
    assert_eq!((t.lost, t.duplicated), (0, 0));
    assert_eq!(
        stats.windows_acked.load(Ordering::SeqCst),
        stats.windows_sent.load(Ordering::SeqCst)
    );
    coord.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_on_a_full_disk_fails_clearly_loses_nothing_and_resumes_when_space_returns() {
    let mut rng = seed("full disk");
    let dir = tempfile::tempdir().unwrap();
    let small = dir.path().join("small");
    std::fs::create_dir_all(&small).unwrap();
    let addr_file = dir.path().join("addr");
    let log_path = dir.path().join("coordinator.log");
    let bin = built_bin("fleetbench-coordinator");
    // The coordinator in a mount namespace of its own, its database on a 12 MiB tmpfs. When it stops,
    // the shell copies the database out (the tmpfs goes with the namespace).
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let pid_file = dir.path().join("coordinator.pid");
    let script = format!(
        "mount -t tmpfs -o size=12m tmpfs {small} || exit 1; \
         {bin} --listen 127.0.0.1:0 --database sqlite://{small}/fleet.db --addr-file {addr} \
         --lease-timeout-ms 60000 & echo $! > {pid}; wait; cp {small}/fleet.db* {out}/",
        small = small.display(),
        bin = bin.display(),
        addr = addr_file.display(),
        pid = pid_file.display(),
        out = out.display()
    );
    let ns = NamespacedCoordinator::start(&script, &addr_file, &pid_file, &log_path);
    // What the coordinator sees as SMALL, seen from here.
    let inside = ns.inside(&small);
    let url = ns.url.clone();
    let read = |f: &str| std::fs::read_to_string(inside.join(f)).unwrap();
    let tokens = Tokens {
        admin: read("admin.token"),
        join: read("join.token"),
    };
    let client = tokens.client(&url).await;
    let stats = Arc::new(UplinkStats::default());
    let _agent = TestAgent::start_with(
        agent_config(&url, &tokens.join, "solo", &[], dir.path()),
        None,
        stats.clone(),
    );
    wait_online(&client, 1).await;
    push_digits(&client).await;
    let id = jobs::submit(&client, &streaming_job(6.0)).await.unwrap();
    wait_progress(&client, &id).await;
    tokio::time::sleep(Duration::from_millis(rng.random_range(0..500))).await;
    // Fill the disk.
    let filler = inside.join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).unwrap();
        let block = vec![0u8; 64 << 10];
        while f.write_all(&block).is_ok() {}
        let _ = f.sync_all();
    }
    let sent_at_full = stats.windows_sent.load(Ordering::SeqCst);
    // A write that needs new space (more than SQLite's write-ahead log already holds) gets a clear
    // error, and the log says what is wrong. Windows may still be stored in the log's existing space:
    // whatever is acknowledged must be there at the end.
    let blob = dir.path().join("more.bin");
    std::fs::write(&blob, vec![7u8; 4 << 20]).unwrap();
    let e = client.upload(&blob).await.unwrap_err().to_string();
    assert!(e.contains("no space left"), "{e}");
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        log.contains("full"),
        "the coordinator's log names the problem:\n{log}"
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while stats.windows_sent.load(Ordering::SeqCst) < sent_at_full + 10 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the run stopped while the disk was full"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let held =
        stats.windows_sent.load(Ordering::SeqCst) - stats.windows_acked.load(Ordering::SeqCst);
    // Space returns: the service resumes by itself.
    std::fs::remove_file(&filler).unwrap();
    let watch = jobs::watch(&client, &id, false);
    let Ok(s) = tokio::time::timeout(Duration::from_secs(90), watch).await else {
        let log = std::fs::read_to_string(&log_path).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "the job did not end after space returned; the coordinator's log ends:\n{}",
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    };
    let s = s.unwrap();
    let detail = job_detail(&client, &id).await;
    assert_eq!(s.state, "succeeded", "{detail:?}");
    // The coordinator stops cleanly and the shell copies its database out.
    ns.stop();
    let db = format!("sqlite://{}", out.join("fleet.db").display());
    let t = tally(&db, &detail).await;
    println!(
        "full disk: faults injected 1, jobs ended 1 of 1, windows {}, unacknowledged while full {}, lost {}, duplicated {}",
        t.windows, held, t.lost, t.duplicated
    );
    assert_eq!((t.lost, t.duplicated), (0, 0));
}
