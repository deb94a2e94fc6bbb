//! `fleetbench-simulate`: a load harness that plays a fleet of agents without ONNX Runtime. Each
//! simulated agent has its own gRPC connection; it registers, heartbeats, takes a task and streams
//! synthetic telemetry windows at a set rate (each as large as a real one: an HDR histogram of 1,000
//! latencies spread over two decades, plus the resource fields), then reports its result. The harness
//! prints sustained ingest, acknowledgement latency, windows sent vs stored, and the coordinator's CPU
//! and RSS, and ends with one JSON line.
//!
//! Without --coordinator it starts `fleetbench-coordinator` itself (next to this binary) on
//! --database (default: a temporary SQLite file), so it can read that process's CPU and RSS.

use std::collections::HashMap;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, Result, bail};
use clap::Parser;
use fleetbench_common::hist;
use fleetbench_proto::onnx as pb;
use fleetbench_proto::v1::agent_service_client::AgentServiceClient;
use fleetbench_proto::v1::{
    AgentMessage, Heartbeat, Inventory, ListAgentsRequest, RegisterRequest, RegisterVariantRequest,
    ResourceSample, RunReport, RunResult, SessionHello, TelemetryWindow, WindowBatch,
    agent_message, coordinator_message,
};
use prost::Message;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::Mutex;

/// Simulate a fleet of agents against a coordinator.
#[derive(Debug, Parser)]
#[command(name = "fleetbench-simulate", version)]
struct Args {
    /// Coordinator to load; without it the harness starts one and measures it.
    #[arg(long)]
    coordinator: Option<String>,
    /// PID of --coordinator, to read its CPU and RSS.
    #[arg(long)]
    coordinator_pid: Option<u32>,
    /// Database of the coordinator the harness starts (default: a temporary SQLite file).
    #[arg(long)]
    database: Option<String>,
    /// Simulated agents, each with its own connection.
    #[arg(long, default_value_t = 100)]
    agents: usize,
    /// Telemetry windows per second per agent.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// How long each agent streams, seconds.
    #[arg(long, default_value_t = 30)]
    duration_s: u64,
    /// Latencies per synthetic window histogram.
    #[arg(long, default_value_t = 1000)]
    window_latencies: usize,
    /// Heartbeat period, milliseconds.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Windows per message (agents batch windows they have ready, as a backlog after a reconnect).
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Serve the coordinator the harness starts with TLS (a CA and certificate made as `init` makes
    /// them), to measure what TLS costs.
    #[arg(long)]
    tls: bool,
    /// CA certificate of an https:// --coordinator.
    #[arg(long)]
    ca_cert: Option<std::path::PathBuf>,
    /// Admin (or submitter) token of --coordinator, to push the model and submit the job.
    #[arg(long, env = "FLEETBENCH_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Join token of --coordinator, for the simulated agents.
    #[arg(long, env = "FLEETBENCH_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// Have the coordinator the harness starts export metrics and traces over OTLP (http/protobuf,
    /// every --otlp-interval-ms) to a sink the harness runs, to measure what export costs.
    #[arg(long)]
    otlp: bool,
    /// Export interval with --otlp, milliseconds.
    #[arg(long, default_value_t = 1000)]
    otlp_interval_ms: u64,
}

/// An OTLP http/protobuf endpoint that accepts every export and counts requests and bytes.
async fn otlp_sink() -> Result<(std::net::SocketAddr, Arc<(AtomicU64, AtomicU64)>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let seen = Arc::new((AtomicU64::new(0), AtomicU64::new(0)));
    let counts = seen.clone();
    let app = axum::Router::new().route(
        "/{*signal}",
        axum::routing::post(move |body: axum::body::Bytes| {
            let counts = counts.clone();
            async move {
                counts.0.fetch_add(1, Ordering::Relaxed);
                counts.1.fetch_add(body.len() as u64, Ordering::Relaxed);
                // An empty Export*ServiceResponse: full success.
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Ok((addr, seen))
}

struct Stats {
    sent: AtomicU64,
    acked: AtomicU64,
    discarded: AtomicU64,
    results: AtomicU64,
    /// Per-agent acknowledgement latency histograms, merged at the end.
    ack_latency: Mutex<hist::LatencyHistogram>,
    /// The same, for windows sent in the middle of each agent's run (20 % to 80 %).
    ack_latency_steady: Mutex<hist::LatencyHistogram>,
}

/// A one-node ONNX model (Identity), so the harness needs no files.
fn tiny_model() -> Vec<u8> {
    let tensor = |name: &str| pb::ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(pb::TypeProto {
            value: Some(pb::type_proto::Value::TensorType(pb::type_proto::Tensor {
                elem_type: Some(1),
                shape: Some(pb::TensorShapeProto {
                    dim: vec![pb::tensor_shape_proto::Dimension {
                        value: Some(pb::tensor_shape_proto::dimension::Value::DimValue(1)),
                        ..Default::default()
                    }],
                }),
            })),
            ..Default::default()
        }),
        ..Default::default()
    };
    let model = pb::ModelProto {
        ir_version: Some(8),
        opset_import: vec![pb::OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(17),
        }],
        producer_name: Some("fleetbench-simulate".into()),
        graph: Some(pb::GraphProto {
            name: Some("identity".into()),
            node: vec![pb::NodeProto {
                input: vec!["x".into()],
                output: vec!["y".into()],
                op_type: Some("Identity".into()),
                ..Default::default()
            }],
            input: vec![tensor("x")],
            output: vec![tensor("y")],
            ..Default::default()
        }),
        ..Default::default()
    };
    model.encode_to_vec()
}

/// Synthetic window histograms: `n` latencies log-uniform over 100 µs .. 10 ms.
fn synthetic_histograms(count: usize, n: usize) -> Vec<Vec<u8>> {
    let mut rng = StdRng::seed_from_u64(1);
    (0..count)
        .map(|_| {
            let mut h = hist::new_histogram();
            for _ in 0..n {
                let exp: f64 = rng.random_range(5.0..7.0); // 10^5 ns .. 10^7 ns
                hist::record_ns(&mut h, 10f64.powf(exp) as u64);
            }
            hist::encode(&h)
        })
        .collect()
}

fn raise_nofile() {
    // SAFETY: reading and raising this process's own file-descriptor limit.
    unsafe {
        let mut lim: libc::rlimit = std::mem::zeroed();
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// (steal, total) jiffies of the whole machine.
fn machine_steal() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    (v.get(7).copied().unwrap_or(0), v.iter().take(8).sum())
}

/// (CPU seconds, RSS bytes) of a process.
fn proc_usage(pid: u32) -> Option<(f64, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // SAFETY: sysconf is always safe to call.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let cpu = (f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?) / ticks;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss_kb = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse::<u64>()
        .ok()?;
    Some((cpu, rss_kb * 1024))
}

struct Spawned {
    child: Child,
    _dir: tempfile::TempDir,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What the harness connects with.
struct Target {
    url: String,
    ca: Option<std::path::PathBuf>,
    token: Option<String>,
    join: Option<String>,
}

/// Starts a coordinator; returns how to reach it and the process. It makes its first admin and join
/// tokens in its data directory, which the harness reads.
fn spawn_coordinator(
    database: Option<&str>,
    tls: bool,
    extra: &[String],
) -> Result<(Target, Spawned)> {
    let dir = tempfile::tempdir()?;
    let exe = std::env::current_exe()?;
    let bin = exe
        .parent()
        .map(|d| d.join("fleetbench-coordinator"))
        .unwrap_or_default();
    if !bin.exists() {
        bail!(
            "{} not found; build all binaries (cargo build --release)",
            bin.display()
        );
    }
    let db = database
        .map(str::to_string)
        .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("fleet.db").display()));
    let addr_file = dir.path().join("addr");
    let log = std::fs::File::create(dir.path().join("coordinator.log"))?;
    let ca = if tls {
        let status = Command::new(&bin)
            .arg("init")
            .arg("--data-dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("fleetbench-coordinator init failed");
        }
        Some(dir.path().join("tls").join("ca.pem"))
    } else {
        None
    };
    let child = Command::new(bin)
        .arg("--data-dir")
        .arg(dir.path())
        .args([
            "--listen",
            "127.0.0.1:0",
            "--lease-timeout-ms",
            "60000",
            "--max-tasks-per-job",
            "100000",
        ])
        .arg("--database")
        .arg(&db)
        .arg("--addr-file")
        .arg(&addr_file)
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()?;
    let spawned = Spawned { child, _dir: dir };
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && !a.trim().is_empty()
        {
            let scheme = if ca.is_some() { "https" } else { "http" };
            let read = |f: &str| {
                std::fs::read_to_string(spawned._dir.path().join(f))
                    .map(|s| s.trim().to_string())
                    .with_context(|| format!("the coordinator did not write {f}"))
            };
            let target = Target {
                url: format!("{scheme}://{}", a.trim()),
                ca,
                token: Some(read("admin.token")?),
                join: Some(read("join.token")?),
            };
            return Ok((target, spawned));
        }
        if Instant::now() > deadline {
            bail!(
                "the coordinator did not start (database {})",
                fleetbench_common::redact::url(&db)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[allow(clippy::too_many_arguments)]
async fn agent(
    i: usize,
    url: String,
    ca_pem: Option<Arc<String>>,
    join: Arc<String>,
    stats: Arc<Stats>,
    histograms: Arc<Vec<Vec<u8>>>,
    rate: f64,
    batch: usize,
    heartbeat: Duration,
    ready: Arc<tokio::sync::Barrier>,
    gate: Arc<tokio::sync::Semaphore>,
) -> Result<()> {
    // At most a few dozen agents connect at once, as a fleet coming up would.
    let permit = gate.acquire_owned().await?;
    let channel = fleetbench_proto::connect::endpoint(&url, ca_pem.as_deref().map(|s| s.as_str()))
        .map_err(anyhow::Error::msg)?
        .tcp_nodelay(true)
        .connect()
        .await?;
    let bearer =
        |t: &str| fleetbench_proto::connect::Bearer::new(Some(t)).map_err(anyhow::Error::msg);
    let mut client = AgentServiceClient::with_interceptor(channel.clone(), bearer(&join)?);
    let reg = client
        .register(RegisterRequest {
            protocol_version: fleetbench_common::protocol::PROTOCOL_VERSION,
            agent_id: String::new(),
            name: format!("sim-{i:05}"),
            labels: HashMap::from([("sim".to_string(), "1".to_string())]),
            inventory: Some(Inventory {
                hostname: format!("sim-{i}"),
                host_id: format!("sim-host-{i}"),
                cpu_brand: "Simulated CPU".into(),
                cpu_set: vec![0],
                memory_bytes: 1 << 30,
                ort_version: "simulated".into(),
                execution_providers: vec!["CPUExecutionProvider".into()],
                agent_version: fleetbench_common::VERSION.into(),
                ..Default::default()
            }),
        })
        .await?
        .into_inner();
    let mut client = AgentServiceClient::with_interceptor(channel, bearer(&reg.agent_credential)?);
    let (tx, rx) = tokio::sync::mpsc::channel::<AgentMessage>(1024);
    let msg = |b| AgentMessage { body: Some(b) };
    tx.send(msg(agent_message::Body::Hello(SessionHello {
        agent_id: reg.agent_id.clone(),
        current_run_id: String::new(),
    })))
    .await?;
    let mut inbound = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    drop(permit);
    ready.wait().await;

    let mut beat = tokio::time::interval(heartbeat);
    let mut current: Option<(String, u64, Instant, Instant)> = None; // run, next seq, started, ends
    let mut tick = tokio::time::interval(Duration::from_secs_f64(batch as f64 / rate));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut in_flight: HashMap<u64, Instant> = HashMap::new();
    let mut latencies = hist::new_histogram();
    let mut steady = hist::new_histogram();
    let mut result_sent = false;
    let mut rng = StdRng::seed_from_u64(i as u64);
    loop {
        tokio::select! {
            m = inbound.message() => {
                let Some(m) = m? else { bail!("agent {i}: the coordinator closed the session") };
                match m.body {
                    Some(coordinator_message::Body::Assignment(a)) => {
                        let secs = a.config.as_ref().map(|c| c.duration_ms).unwrap_or(10_000) as f64 / 1e3;
                        let now = Instant::now();
                        current = Some((a.run_id, 0, now, now + Duration::from_secs_f64(secs)));
                        tick.reset();
                    }
                    Some(body @ (coordinator_message::Body::WindowAck(_) | coordinator_message::Body::WindowAcks(_))) => {
                        let acks = match body {
                            coordinator_message::Body::WindowAck(ack) => vec![ack],
                            coordinator_message::Body::WindowAcks(batch) => batch.acks,
                            _ => unreachable!("matched above"),
                        };
                        for ack in acks {
                            let Some(sent) = in_flight.remove(&ack.seq) else { continue };
                            let l = sent.elapsed().as_nanos() as u64;
                            hist::record_ns(&mut latencies, l);
                            // The steady part: the middle three fifths of the run.
                            if let Some((_, _, start, end)) = &current {
                                let (a, b) = (*start + (*end - *start) / 5, *start + (*end - *start) * 4 / 5);
                                if sent >= a && sent <= b {
                                    hist::record_ns(&mut steady, l);
                                }
                            }
                            let counter = if ack.discarded { &stats.discarded } else { &stats.acked };
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                    Some(coordinator_message::Body::ResultAck(_)) => {
                        stats.results.fetch_add(1, Ordering::Relaxed);
                        hist::merge(&mut *stats.ack_latency.lock().await, &latencies)?;
                        hist::merge(&mut *stats.ack_latency_steady.lock().await, &steady)?;
                        return Ok(());
                    }
                    _ => {}
                }
            }
            _ = beat.tick() => {
                let run = current.as_ref().map(|c| c.0.clone()).unwrap_or_default();
                tx.send(msg(agent_message::Body::Heartbeat(Heartbeat { current_run_id: run }))).await?;
            }
            _ = tick.tick(), if current.is_some() && !result_sent => {
                let (run, seq, started, ends) = current.as_mut().expect("guarded");
                let now = Instant::now();
                if now >= *ends {
                    if in_flight.is_empty() {
                        let elapsed = (now - *started).as_nanos() as u64;
                        let result = RunResult {
                            run_id: run.clone(),
                            window_count: *seq,
                            report: Some(RunReport { queries: *seq * 1000, samples: *seq * 1000, elapsed_ns: elapsed, record_json: "{}".into(), ..Default::default() }),
                            ..Default::default()
                        };
                        tx.send(msg(agent_message::Body::Result(result))).await?;
                        result_sent = true;
                    }
                    continue;
                }
                let mut windows = Vec::with_capacity(batch);
                for _ in 0..batch {
                let window = TelemetryWindow {
                    run_id: run.clone(),
                    seq: *seq,
                    start_offset_ns: (now - *started).as_nanos() as u64,
                    end_offset_ns: (now - *started).as_nanos() as u64 + (1e9 / rate) as u64,
                    queries: 1000,
                    samples: 1000,
                    latency_histogram: histograms[rng.random_range(0..histograms.len())].clone(),
                    resources: Some(ResourceSample {
                        process_cpu_user_pct: 95.0,
                        process_cpu_system_pct: 3.0,
                        rss_mean_bytes: 200 << 20,
                        rss_peak_bytes: 210 << 20,
                        system_memory_used_bytes: 4 << 30,
                        load_average_1m: 1.0,
                        cpu_frequency_mhz: 2000.0,
                        cpu_steal_pct: 0.0,
                        gpu_utilization_pct: -1.0,
                        gpu_memory_used_bytes: 0,
                        samples: 4,
                    }),
                    closed_at_ms: fleetbench_common::now_ms(),
                    ..Default::default()
                };
                in_flight.insert(*seq, now);
                *seq += 1;
                stats.sent.fetch_add(1, Ordering::Relaxed);
                windows.push(window);
                }
                let body = if windows.len() == 1 {
                    agent_message::Body::Window(windows.pop().expect("one"))
                } else {
                    agent_message::Body::WindowBatch(WindowBatch { windows })
                };
                tx.send(msg(body)).await?;
            }
        }
    }
}

#[tokio::main]
async fn main() -> Result<()> {
    let a = Args::parse();
    if a.agents == 0 || a.rate <= 0.0 || a.duration_s == 0 {
        bail!("--agents, --rate and --duration-s must be > 0");
    }
    raise_nofile();
    if a.otlp && a.coordinator.is_some() {
        bail!(
            "--otlp applies to the coordinator the harness starts; configure --coordinator's own export"
        );
    }
    let sink = if a.otlp {
        Some(otlp_sink().await?)
    } else {
        None
    };
    let (target, spawned) = match &a.coordinator {
        Some(u) => (
            Target {
                url: u.clone(),
                ca: a.ca_cert.clone(),
                token: a.token.clone(),
                join: a.join_token.clone(),
            },
            None,
        ),
        None => {
            let mut extra = Vec::new();
            if let Some((addr, _)) = &sink {
                extra.extend([
                    "--otlp-endpoint".to_string(),
                    format!("http://{addr}"),
                    format!("--otlp-interval-ms={}", a.otlp_interval_ms),
                ]);
            }
            let (t, s) = spawn_coordinator(a.database.as_deref(), a.tls, &extra)?;
            (t, Some(s))
        }
    };
    let Target {
        url,
        ca,
        token,
        join,
    } = target;
    let join = fleetbench_common::token::JoinToken::parse(
        join.as_deref()
            .context("--join-token (or FLEETBENCH_JOIN_TOKEN) is needed with --coordinator")?,
    )
    .map_err(anyhow::Error::msg)?;
    let join = Arc::new(join.token.to_secret_string().expose().to_string());
    let pid = a.coordinator_pid.or(spawned.as_ref().map(|s| s.child.id()));
    let client =
        fleetbench_cli::client::Client::connect_with(&url, ca.as_deref(), token.as_deref()).await?;
    let ca_pem = ca
        .as_deref()
        .map(fleetbench_proto::connect::read_ca)
        .transpose()
        .map_err(anyhow::Error::msg)?
        .map(Arc::new);
    eprintln!(
        "coordinator {url}; {} agents x {} windows/s for {} s",
        a.agents, a.rate, a.duration_s
    );

    // The model every task "runs".
    let blob = std::env::temp_dir().join(format!("fleetbench-sim-{}.onnx", std::process::id()));
    std::fs::write(&blob, tiny_model())?;
    let artifact = client.upload(&blob).await?;
    let _ = std::fs::remove_file(&blob);
    let _ = client
        .models()
        .register_variant(RegisterVariantRequest {
            model: "sim".into(),
            variant: "base".into(),
            artifact_sha256: artifact.sha256,
            ..Default::default()
        })
        .await;

    let stats = Arc::new(Stats {
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        discarded: AtomicU64::new(0),
        results: AtomicU64::new(0),
        ack_latency: Mutex::new(hist::new_histogram()),
        ack_latency_steady: Mutex::new(hist::new_histogram()),
    });
    let histograms = Arc::new(synthetic_histograms(16, a.window_latencies));
    let window_bytes = histograms.iter().map(Vec::len).sum::<usize>() / histograms.len();
    let ready = Arc::new(tokio::sync::Barrier::new(a.agents + 1));
    let mut handles = Vec::with_capacity(a.agents);
    let gate = Arc::new(tokio::sync::Semaphore::new(64));
    for i in 0..a.agents {
        let (url, stats, histograms, ready, gate) = (
            url.clone(),
            stats.clone(),
            histograms.clone(),
            ready.clone(),
            gate.clone(),
        );
        let (rate, hb) = (a.rate, Duration::from_millis(a.heartbeat_ms));
        handles.push(tokio::spawn(agent(
            i,
            url,
            ca_pem.clone(),
            join.clone(),
            stats,
            histograms,
            rate,
            a.batch.max(1),
            hb,
            ready,
            gate,
        )));
    }
    let wait = tokio::time::timeout(Duration::from_secs(300), ready.wait()).await;
    if wait.is_err() {
        bail!("the simulated agents did not all connect within 5 minutes");
    }
    // Sessions are open; wait until the coordinator counts every agent online.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let agents = client
            .fleet()
            .list_agents(ListAgentsRequest {})
            .await?
            .into_inner()
            .agents;
        let online = agents
            .iter()
            .filter(|x| x.online && x.name.starts_with("sim-"))
            .count();
        if online >= a.agents {
            eprintln!("{online} agents online; submitting the job");
            break;
        }
        if Instant::now() > deadline {
            bail!("only {online} of {} simulated agents came online", a.agents);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    let before = pid.and_then(proc_usage);
    let job = fleetbench_cli::commands::jobs::submit(
        &client,
        &fleetbench_cli::jobspec::JobArgs {
            model: Some("sim".into()),
            selector: vec!["sim=1".into()],
            duration_s: Some(a.duration_s as f64),
            skip_accuracy: true,
            ..Default::default()
        },
    )
    .await?;
    let started = Instant::now();
    // One sample a second: (seconds since submit, windows acked, coordinator CPU s, RSS bytes, steal).
    let samples = Arc::new(std::sync::Mutex::new(
        Vec::<(f64, u64, f64, u64, (u64, u64))>::new(),
    ));
    let progress = {
        let (stats, samples) = (stats.clone(), samples.clone());
        tokio::spawn(async move {
            let mut last = 0;
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let acked = stats.acked.load(Ordering::Relaxed);
                let (cpu, rss) = pid.and_then(proc_usage).unwrap_or((0.0, 0));
                let t = started.elapsed().as_secs_f64();
                samples
                    .lock()
                    .expect("samples")
                    .push((t, acked, cpu, rss, machine_steal()));
                eprint!(
                    "\r{t:>6.0} s  acked {acked:>10}  {:>7} windows/s  coordinator rss {:>7.1} MB ",
                    acked - last,
                    rss as f64 / 1e6
                );
                last = acked;
            }
        })
    };
    let mut failures = 0;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(a.duration_s + 300);
    for h in handles {
        match tokio::time::timeout_at(deadline, h)
            .await
            .unwrap_or_else(|_| Ok(Err(anyhow::anyhow!("agent did not finish in time"))))
        {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                failures += 1;
                if failures <= 3 {
                    eprintln!("\nagent error: {e:#}");
                }
            }
            Err(e) => eprintln!("\nagent task: {e}"),
        }
    }
    let wall = started.elapsed().as_secs_f64();
    let after = pid.and_then(proc_usage);
    progress.abort();
    let summary = fleetbench_cli::commands::jobs::watch(&client, &job, false).await?;
    let detail = client
        .jobs()
        .get_job(fleetbench_proto::v1::GetJobRequest {
            job_id: job.clone(),
        })
        .await?
        .into_inner();
    let stored: u64 = detail
        .tasks
        .iter()
        .filter_map(|t| t.run.as_ref())
        .map(|r| r.windows)
        .sum();
    let sent = stats.sent.load(Ordering::Relaxed);
    let acked = stats.acked.load(Ordering::Relaxed);
    let ack = stats.ack_latency.lock().await;
    let ack_steady = stats.ack_latency_steady.lock().await;
    // Steady state: the middle of the streaming period (from 20 % to 80 % of --duration-s), away from
    // start-up and from the result processing at the end.
    let samples = samples.lock().expect("samples").clone();
    let span = a.duration_s as f64;
    let steady: Vec<_> = samples
        .iter()
        .filter(|s| s.0 >= 0.2 * span && s.0 <= 0.8 * span)
        .collect();
    let steal = match (steady.first(), steady.last()) {
        (Some(f), Some(l)) if l.4.1 > f.4.1 => {
            Some(100.0 * (l.4.0 - f.4.0) as f64 / (l.4.1 - f.4.1) as f64)
        }
        _ => None,
    };
    let (ingest, cpu_per_window, rss) = match (steady.first(), steady.last()) {
        (Some(f), Some(l)) if l.0 > f.0 && l.1 > f.1 => {
            let mut rss: Vec<u64> = steady.iter().map(|s| s.3).collect();
            rss.sort_unstable();
            (
                (l.1 - f.1) as f64 / (l.0 - f.0),
                (pid.is_some()).then(|| (l.2 - f.2) * 1e6 / (l.1 - f.1) as f64),
                (pid.is_some()).then(|| rss[rss.len() / 2]),
            )
        }
        _ => (acked as f64 / wall, None, after.map(|a| a.1)),
    };
    let cpu = match (before, after) {
        (Some(b), Some(a)) => Some(a.0 - b.0),
        _ => None,
    };
    let report = serde_json::json!({
        "backend": url_backend(a.database.as_deref(), a.coordinator.is_some()),
        "agents": a.agents,
        "rate_per_agent": a.rate,
        "windows_per_message": a.batch.max(1),
        "duration_s": a.duration_s,
        "window_bytes": window_bytes,
        "windows_sent": sent,
        "windows_acked": acked,
        "windows_stored": stored,
        "windows_discarded": stats.discarded.load(Ordering::Relaxed),
        "results_acked": stats.results.load(Ordering::Relaxed),
        "job_state": summary.state,
        "agent_failures": failures,
        "ingest_windows_per_s": ingest,
        "offered_windows_per_s": a.agents as f64 * a.rate,
        "ack_latency_steady_ms": {
            "p50": ack_steady.value_at_quantile(0.5) as f64 / 1e6,
            "p99": ack_steady.value_at_quantile(0.99) as f64 / 1e6,
            "max": ack_steady.max() as f64 / 1e6,
        },
        "ack_latency_ms": {
            "p50": ack.value_at_quantile(0.5) as f64 / 1e6,
            "p99": ack.value_at_quantile(0.99) as f64 / 1e6,
            "max": ack.max() as f64 / 1e6,
        },
        "coordinator_cpu_s_total": cpu,
        "coordinator_cpu_us_per_window": cpu_per_window,
        "coordinator_rss_mb": rss.map(|r| r as f64 / 1e6),
        "rss_budget_mb": 50.0 + 0.1 * a.agents as f64,
        "machine_cpu_steal_pct": steal,
        "otlp_exports": sink.as_ref().map(|(_, c)| c.0.load(Ordering::Relaxed)),
        "otlp_bytes": sink.as_ref().map(|(_, c)| c.1.load(Ordering::Relaxed)),
    });
    eprintln!();
    println!("{report}");
    drop(spawned);
    Ok(())
}

fn url_backend(db: Option<&str>, external: bool) -> &'static str {
    match (db, external) {
        (_, true) => "external",
        (Some(d), _) if d.starts_with("postgres") => "postgres",
        _ => "sqlite",
    }
}
