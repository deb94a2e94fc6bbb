//! The agent's link to its coordinators: registration, one bidirectional session, heartbeats, task
//! execution, telemetry with acknowledgements, and reconnection with backoff. Windows stay in memory
//! until acknowledged and are sent again after a reconnect, so a coordinator restart (or a switch to
//! another replica) loses nothing; a run goes on while the link is down.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use fleetbench_common::domain::{Inventory, RunConfig};
use fleetbench_common::labels::Labels;
use fleetbench_common::token::{JoinToken, Secret};
use fleetbench_proto::connect::{Authed, Bearer};
use fleetbench_proto::v1::agent_service_client::AgentServiceClient;
use fleetbench_proto::v1::model_service_client::ModelServiceClient;
use fleetbench_proto::v1::{
    AgentMessage, Heartbeat, RegisterRequest, RunResult, SessionHello, TaskAssignment,
    TelemetryWindow, WindowBatch, agent_message, coordinator_message,
};
use tokio::sync::mpsc;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::cache::Cache;
use crate::error::{AgentError, Result};
use crate::runner::{ModelRunner, PreparedTask, RunError};

/// What the uplink needs to know about this agent.
#[derive(Clone)]
pub struct Identity {
    /// Name.
    pub name: String,
    /// Labels.
    pub labels: Labels,
    /// Inventory.
    pub inventory: Inventory,
    /// State directory (agent id, cache).
    pub state_dir: PathBuf,
    /// Size budget of the artifact cache, bytes (0: only the free disk limits it).
    pub cache_max_bytes: u64,
    /// The coordinator's CA certificate (PEM), for https:// addresses.
    pub ca_pem: Option<String>,
    /// The join token (`fbjoin1:...`), for an agent without a credential yet.
    pub join_token: Option<JoinToken>,
    /// Network measurements.
    pub network: crate::config::NetworkSettings,
}

/// A network measurement in progress; dropping it stops it.
struct Probing(tokio::task::JoinHandle<Vec<fleetbench_common::network::NetworkPath>>);

impl Drop for Probing {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Counters of the link's activity, for operators and tests.
#[derive(Debug, Default)]
pub struct UplinkStats {
    /// Sessions opened (1 + reconnections).
    pub sessions: AtomicU64,
    /// Windows produced by the runner and sent.
    pub windows_sent: AtomicU64,
    /// Windows sent again after a reconnect.
    pub windows_resent: AtomicU64,
    /// Windows acknowledged by the coordinator.
    pub windows_acked: AtomicU64,
}

/// What the runner thread reports.
enum RunnerEvent {
    Window(TelemetryWindow),
    Finished(RunResult),
}

struct Current {
    run_id: String,
    cancel: Arc<AtomicBool>,
}

/// The uplink's memory across connections.
struct State {
    agent_id: Option<String>,
    /// This agent's own credential, once it has joined (kept in the state directory).
    credential: Option<Secret>,
    /// What every call carries, shared by the clients of all sessions and tasks: a renewed credential
    /// reaches a download that started under the old one.
    bearer: Bearer,
    /// The coordinator's CA certificate as the join token's pin found it (kept in the state directory).
    pinned_ca: Option<String>,
    current: Option<Current>,
    unacked: BTreeMap<(String, u64), TelemetryWindow>,
    result: Option<RunResult>,
    events_tx: mpsc::UnboundedSender<RunnerEvent>,
    events_rx: mpsc::UnboundedReceiver<RunnerEvent>,
    stats: Arc<UplinkStats>,
}

impl State {
    fn acked(&mut self, run_id: String, seq: u64) {
        if self.unacked.remove(&(run_id, seq)).is_some() {
            self.stats.windows_acked.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn absorb(&mut self, ev: RunnerEvent) -> AgentMessage {
        match ev {
            RunnerEvent::Window(w) => {
                self.stats.windows_sent.fetch_add(1, Ordering::Relaxed);
                self.unacked.insert((w.run_id.clone(), w.seq), w.clone());
                message(agent_message::Body::Window(w))
            }
            RunnerEvent::Finished(r) => {
                self.result = Some(r.clone());
                message(agent_message::Body::Result(r))
            }
        }
    }
}

fn message(body: agent_message::Body) -> AgentMessage {
    AgentMessage { body: Some(body) }
}

/// Deadline of a unary call (and of opening the session); streams have idle timeouts instead.
const UNARY_DEADLINE: Duration = Duration::from_secs(10);

/// Windows per message when resending a backlog.
const REPLAY_BATCH: usize = 64;

/// One window as itself, several as a batch.
fn batch_message(mut windows: Vec<TelemetryWindow>) -> AgentMessage {
    if windows.len() == 1 {
        message(agent_message::Body::Window(
            windows.pop().expect("one window"),
        ))
    } else {
        message(agent_message::Body::WindowBatch(WindowBatch { windows }))
    }
}

fn id_file(state_dir: &Path) -> PathBuf {
    state_dir.join("agent-id")
}

fn credential_file(state_dir: &Path) -> PathBuf {
    state_dir.join("credential")
}

/// The coordinator's CA certificate found through the join token's pin.
pub fn pinned_ca_file(state_dir: &Path) -> PathBuf {
    state_dir.join("ca.pem")
}

/// The CA certificate to verify an `https://` coordinator against: the one configured, else the one
/// the join token's pin found earlier, else the one the coordinator presents whose SHA-256 the join
/// token pins (then kept in the state directory for later starts).
async fn coordinator_ca(
    endpoint: &str,
    identity: &Identity,
    state: &mut State,
) -> Result<Option<String>> {
    if !endpoint.starts_with("https://") {
        return Ok(None);
    }
    if let Some(pem) = identity.ca_pem.as_ref().or(state.pinned_ca.as_ref()) {
        return Ok(Some(pem.clone()));
    }
    let pin = identity
        .join_token
        .as_ref()
        .map(|j| j.ca_sha256.clone())
        .filter(|p| !p.is_empty())
        .ok_or_else(|| {
            AgentError::Config(format!(
                "ca_cert: {endpoint} is served with TLS; give the coordinator's CA certificate \
                 (--ca-cert), or a join token that pins it"
            ))
        })?;
    let der = fleetbench_proto::connect::fetch_pinned_ca(endpoint, &pin)
        .await
        .map_err(|e| match e {
            fleetbench_proto::connect::PinError::Unreachable(m) => AgentError::Io(m),
            fleetbench_proto::connect::PinError::NotPinned(m) => AgentError::Untrusted(m),
        })?;
    let pem = fleetbench_common::token::certificate_pem(&der);
    let path = pinned_ca_file(&identity.state_dir);
    let tmp = identity.state_dir.join("ca.pem.tmp");
    std::fs::write(&tmp, &pem)
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| AgentError::Io(format!("cannot save {}: {e}", path.display())))?;
    info!(coordinator = %endpoint, ca_sha256 = %pin, file = %path.display(), "Found the CA certificate the join token pins; the coordinator is verified against it from now on.");
    state.pinned_ca = Some(pem.clone());
    Ok(Some(pem))
}

/// Writes the agent's credential, readable by its owner only, replacing any earlier one atomically.
fn save_credential(state_dir: &Path, credential: &Secret) -> Result<()> {
    use std::io::Write as _;
    let path = credential_file(state_dir);
    let tmp = state_dir.join("credential.tmp");
    let _ = std::fs::remove_file(&tmp);
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create_new(true);
    std::os::unix::fs::OpenOptionsExt::mode(&mut opts, 0o600);
    opts.open(&tmp)
        .and_then(|mut f| {
            f.write_all(credential.expose().as_bytes())?;
            f.sync_all()
        })
        .and_then(|_| std::fs::rename(&tmp, &path))
        .map_err(|e| {
            AgentError::Io(format!(
                "cannot save the credential {}: {e}",
                path.display()
            ))
        })
}

/// The CA certificate an earlier start found through the join token's pin, if any; refused when the
/// join token now pins another one.
fn pinned_ca(identity: &Identity) -> Result<Option<String>> {
    let path = pinned_ca_file(&identity.state_dir);
    let Ok(pem) = std::fs::read_to_string(&path) else {
        return Ok(None);
    };
    let have = fleetbench_common::token::ca_fingerprint(&pem)
        .map_err(|e| AgentError::Config(format!("{}: {e}", path.display())))?;
    match &identity.join_token {
        Some(j) if !j.ca_sha256.is_empty() && j.ca_sha256 != have => {
            Err(AgentError::Config(format!(
                "join_token: it pins the CA certificate with SHA-256 {}, but {} (found through an \
             earlier join token) has {have}: remove it if this agent now joins another coordinator",
                j.ca_sha256,
                path.display()
            )))
        }
        _ => Ok(Some(pem)),
    }
}

/// Why a session ended.
enum SessionEnd {
    Shutdown,
    Lost(String),
}

/// Connects to the coordinators in turn and serves sessions until `shutdown` fires.
pub async fn run(
    endpoints: Vec<String>,
    identity: Identity,
    runner: Arc<dyn ModelRunner>,
    max_backoff: Duration,
    stats: Arc<UplinkStats>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> Result<()> {
    std::fs::create_dir_all(&identity.state_dir).map_err(|e| {
        AgentError::Io(format!(
            "cannot create state dir {}: {e}",
            identity.state_dir.display()
        ))
    })?;
    let cache = Cache::new(identity.state_dir.join("cache"), identity.cache_max_bytes)?;
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    let mut state = State {
        agent_id: std::fs::read_to_string(id_file(&identity.state_dir))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty()),
        credential: std::fs::read_to_string(credential_file(&identity.state_dir))
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .map(Secret::new),
        pinned_ca: pinned_ca(&identity)?,
        bearer: Bearer::default(),
        current: None,
        unacked: BTreeMap::new(),
        result: None,
        events_tx,
        events_rx,
        stats,
    };
    let mut backoff = Duration::from_millis(200);
    let mut i = 0usize;
    loop {
        if *shutdown.borrow() {
            break;
        }
        let endpoint = &endpoints[i % endpoints.len()];
        match session(
            endpoint,
            &identity,
            &mut state,
            &runner,
            &cache,
            &mut shutdown,
        )
        .await
        {
            Ok(SessionEnd::Shutdown) => break,
            Ok(SessionEnd::Lost(reason)) => {
                warn!(coordinator = %endpoint, %reason, "Lost the coordinator; reconnecting.");
                backoff = Duration::from_millis(200);
            }
            Err(AgentError::Protocol(why)) => {
                // Retrying soon will not help; one of the two must be upgraded first.
                backoff = max_backoff;
                tracing::error!(coordinator = %endpoint, reason = %why, "The coordinator and this agent speak incompatible protocols.");
            }
            Err(AgentError::Untrusted(why)) => {
                // Someone else answers at that address, or the join token is another fleet's: an
                // operator must look. Nothing was sent to it.
                backoff = max_backoff;
                tracing::error!(coordinator = %endpoint, reason = %why, "Refusing this server: it is not the coordinator the join token pins.");
            }
            Err(AgentError::Refused(why)) => {
                // Retrying soon will not help either: an operator must act (a new join token, or a
                // revoked agent's credential removed from the state directory).
                backoff = max_backoff;
                tracing::error!(coordinator = %endpoint, reason = %why, "The coordinator refused this agent's credentials.");
            }
            Err(e) => {
                warn!(
                    coordinator = %endpoint,
                    error = %e,
                    retry_in_ms = backoff.as_millis() as u64,
                    "Coordinator unreachable; retrying with backoff."
                );
            }
        }
        // Wait out the backoff (with jitter, so a restarted coordinator is not hit by every agent in
        // the same instant), still collecting what the runner produces.
        let jittered = backoff.mul_f64(rand::random_range(0.5..1.5));
        let until = tokio::time::Instant::now() + jittered;
        loop {
            tokio::select! {
                _ = tokio::time::sleep_until(until) => break,
                ev = state.events_rx.recv() => if let Some(ev) = ev { state.absorb(ev); },
                _ = shutdown.changed() => break,
            }
        }
        backoff = (backoff * 2).min(max_backoff);
        i += 1;
    }
    if let Some(c) = &state.current {
        c.cancel.store(true, Ordering::Relaxed);
    }
    info!("Agent stopped.");
    Ok(())
}

async fn connect(endpoint: &str, ca_pem: Option<&str>) -> Result<Channel> {
    Ok(fleetbench_proto::connect::endpoint(endpoint, ca_pem)
        .map_err(AgentError::Config)?
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true)
        .http2_adaptive_window(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20))
        .keep_alive_while_idle(true)
        .connect()
        .await?)
}

async fn session(
    endpoint: &str,
    identity: &Identity,
    state: &mut State,
    runner: &Arc<dyn ModelRunner>,
    cache: &Cache,
    shutdown: &mut tokio::sync::watch::Receiver<bool>,
) -> Result<SessionEnd> {
    let ca = coordinator_ca(endpoint, identity, state).await?;
    let channel = connect(endpoint, ca.as_deref()).await?;
    // Its own credential once it has one; the join token only before. A refused credential never
    // falls back to the join token: that would undo an operator's revocation.
    let joining = state.credential.is_none();
    let token = match (&state.credential, &identity.join_token) {
        (Some(c), _) => c.clone(),
        (None, Some(j)) => j.token.to_secret_string(),
        (None, None) => {
            return Err(AgentError::Config(format!(
                "join_token: this agent has no credential yet ({} is missing); give it a join token \
                 (--join-token or FLEETBENCH_JOIN_TOKEN; `fleetbench-coordinator init` prints one)",
                credential_file(&identity.state_dir).display()
            )));
        }
    };
    state
        .bearer
        .set(Some(token.expose()))
        .map_err(AgentError::Config)?;
    let bearer = state.bearer.clone();
    let mut client = AgentServiceClient::with_interceptor(channel.clone(), bearer.clone());
    let mut register = tonic::Request::new(RegisterRequest {
        agent_id: state.agent_id.clone().unwrap_or_default(),
        name: identity.name.clone(),
        labels: identity
            .labels
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
        inventory: Some((&identity.inventory).into()),
        protocol_version: fleetbench_common::protocol::PROTOCOL_VERSION,
    });
    register.set_timeout(UNARY_DEADLINE);
    let reg = client
        .register(register)
        .await
        .map_err(|s| {
            if s.code() == tonic::Code::FailedPrecondition
                && s.message().starts_with("protocol_version")
            {
                AgentError::Protocol(s.message().to_string())
            } else if matches!(
                s.code(),
                tonic::Code::Unauthenticated | tonic::Code::PermissionDenied
            ) {
                AgentError::Refused(if joining {
                    format!("the join token was refused: {}", s.message())
                } else {
                    format!(
                        "this agent's credential was refused: {} (if it was revoked, remove {} and \
                         start the agent with a new join token)",
                        s.message(),
                        credential_file(&identity.state_dir).display()
                    )
                })
            } else {
                AgentError::Coordinator(s)
            }
        })?
        .into_inner();
    if let Some(why) = fleetbench_common::protocol::refuse_coordinator(reg.protocol_version) {
        return Err(AgentError::Protocol(why));
    }
    if !reg.agent_credential.is_empty() {
        let credential = Secret::new(reg.agent_credential.clone());
        match save_credential(&identity.state_dir, &credential) {
            Ok(()) => {
                if joining {
                    info!(agent_id = %reg.agent_id, "Joined the fleet; this agent's credential is kept in its state directory.");
                } else {
                    info!(agent_id = %reg.agent_id, "Renewed this agent's credential (kept in its state directory).");
                }
                // The session and downloads go with the agent's own credential, never the join token.
                bearer
                    .set(Some(credential.expose()))
                    .map_err(AgentError::Config)?;
                state.credential = Some(credential);
            }
            // A renewal that cannot be kept is declined: the old credential works until it is used.
            Err(e) if !joining => {
                warn!(error = %e, "Could not keep the renewed credential; going on with the current one.");
            }
            Err(e) => return Err(e),
        }
    }
    if state.agent_id.as_deref() != Some(reg.agent_id.as_str()) {
        std::fs::write(id_file(&identity.state_dir), &reg.agent_id)
            .map_err(|e| AgentError::Io(format!("cannot save the agent id: {e}")))?;
        state.agent_id = Some(reg.agent_id.clone());
    }
    let (out_tx, out_rx) = mpsc::channel::<AgentMessage>(4096);
    let current_run_id = state
        .current
        .as_ref()
        .map(|c| c.run_id.clone())
        .unwrap_or_default();
    out_tx
        .send(message(agent_message::Body::Hello(SessionHello {
            agent_id: reg.agent_id.clone(),
            current_run_id,
        })))
        .await
        .map_err(|_| AgentError::Io("session closed".into()))?;
    let mut inbound = tokio::time::timeout(
        UNARY_DEADLINE,
        client.session(tokio_stream::wrappers::ReceiverStream::new(out_rx)),
    )
    .await
    .map_err(|_| AgentError::Io("the coordinator did not open the session within 10 s".into()))??
    .into_inner();
    info!(coordinator = %endpoint, agent_id = %reg.agent_id, platform = %reg.platform_name, "Connected.");
    state.stats.sessions.fetch_add(1, Ordering::Relaxed);

    // Send again what was not acknowledged on the previous connection, in batches.
    let windows: Vec<TelemetryWindow> = state.unacked.values().cloned().collect();
    state
        .stats
        .windows_resent
        .fetch_add(windows.len() as u64, Ordering::Relaxed);
    let replay: Vec<AgentMessage> = windows
        .chunks(REPLAY_BATCH)
        .map(|c| batch_message(c.to_vec()))
        .chain(
            state
                .result
                .clone()
                .map(|r| message(agent_message::Body::Result(r))),
        )
        .collect();
    if !replay.is_empty() {
        info!(
            messages = replay.len(),
            "Resending unacknowledged telemetry."
        );
    }
    for m in replay {
        if out_tx.send(m).await.is_err() {
            return Ok(SessionEnd::Lost("session closed while resending".into()));
        }
    }

    let mut heartbeat = tokio::time::interval(Duration::from_millis(
        reg.heartbeat_interval_ms.max(50) as u64,
    ));
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Network measurements: the first now (at registration), then every interval, and only while no
    // task runs; a task that arrives stops one in progress, which starts again after the task.
    let probe_every = identity.network.interval.filter(|_| {
        fleetbench_common::protocol::stated(reg.protocol_version)
            >= fleetbench_common::protocol::NETWORK_PROBES
    });
    let mut next_probe = tokio::time::Instant::now();
    let mut probing: Option<Probing> = None;
    loop {
        let may_probe = probe_every.is_some() && probing.is_none() && state.current.is_none();
        tokio::select! {
            _ = tokio::time::sleep_until(next_probe), if may_probe => {
                let (client, address, settings) = (client.clone(), endpoint.to_string(), identity.network.clone());
                probing = Some(Probing(tokio::spawn(async move {
                    crate::netprobe::all(client, &address, &settings).await
                })));
            }
            paths = async { (&mut probing.as_mut().expect("probing").0).await }, if probing.is_some() => {
                probing = None;
                next_probe = tokio::time::Instant::now() + probe_every.unwrap_or(Duration::MAX / 4);
                if let Ok(paths) = paths {
                    for p in &paths {
                        if p.ok() {
                            info!(target = %p.target, rtt_ms = p.rtt_ms, up_bytes_per_s = p.up_bytes_per_s as u64, down_bytes_per_s = p.down_bytes_per_s as u64, "Measured a network path.");
                        } else {
                            warn!(target = %p.target, address = %p.address, error = %p.error, "Could not measure a network path.");
                        }
                    }
                    let report = fleetbench_proto::v1::NetworkReport { paths: paths.iter().map(Into::into).collect() };
                    if out_tx.send(message(agent_message::Body::Network(report))).await.is_err() {
                        return Ok(SessionEnd::Lost("session closed".into()));
                    }
                }
            }
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok(SessionEnd::Lost("the coordinator closed the session".into())),
                    Err(e) => return Ok(SessionEnd::Lost(e.to_string())),
                };
                match msg.body {
                    Some(coordinator_message::Body::Assignment(a)) => {
                        if let Err(e) = fleetbench_common::ids::check("run_id", &a.run_id)
                            .and_then(|_| fleetbench_common::ids::check("task_id", &a.task_id))
                        {
                            warn!(error = %e, "Ignored an assignment with a malformed id.");
                            continue;
                        }
                        if let Some(c) = &state.current {
                            warn!(busy_with = %c.run_id, offered = %a.run_id, "Offered a task while busy; refusing it.");
                            let refusal = RunResult { run_id: a.run_id.clone(), error: format!("agent is busy with run {}", c.run_id), ..Default::default() };
                            let _ = out_tx.send(message(agent_message::Body::Result(refusal))).await;
                            continue;
                        }
                        if probing.take().is_some() {
                            // Never measure during a task; measure again after it.
                            next_probe = tokio::time::Instant::now();
                        }
                        let cancel = Arc::new(AtomicBool::new(false));
                        state.current = Some(Current { run_id: a.run_id.clone(), cancel: cancel.clone() });
                        start_task(a, identity, runner.clone(), cache.clone(), ModelServiceClient::with_interceptor(channel.clone(), bearer.clone()), cancel, state.events_tx.clone());
                    }
                    Some(coordinator_message::Body::Cancel(c)) => {
                        if let Some(cur) = state.current.as_ref().filter(|cur| cur.run_id == c.run_id) {
                            info!(run = %c.run_id, reason = %c.reason, "Cancelling the run.");
                            cur.cancel.store(true, Ordering::Relaxed);
                        }
                    }
                    Some(coordinator_message::Body::WindowAck(ack)) => state.acked(ack.run_id, ack.seq),
                    Some(coordinator_message::Body::WindowAcks(batch)) => {
                        for ack in batch.acks {
                            state.acked(ack.run_id, ack.seq);
                        }
                    }
                    Some(coordinator_message::Body::ResultAck(ack))
                        if state.result.as_ref().is_some_and(|r| r.run_id == ack.run_id) =>
                    {
                        if ack.discarded {
                            warn!(run = %ack.run_id, reason = %ack.reason, "The coordinator refused the result.");
                        } else {
                            info!(run = %ack.run_id, "Result stored.");
                        }
                        state.result = None;
                        state.unacked.retain(|(run, _), _| run != &ack.run_id);
                        if state.current.as_ref().is_some_and(|c| c.run_id == ack.run_id) {
                            state.current = None;
                        }
                    }
                    Some(coordinator_message::Body::ResultAck(_)) => {}
                    None => {}
                }
            }
            ev = state.events_rx.recv() => {
                // Whatever else the runner has ready goes along: windows in one batch, then the result.
                let mut windows = Vec::new();
                let mut others = Vec::new();
                let mut next = ev;
                while let Some(ev) = next {
                    match state.absorb(ev) {
                        AgentMessage { body: Some(agent_message::Body::Window(w)) } => windows.push(w),
                        m => others.push(m),
                    }
                    next = state.events_rx.try_recv().ok();
                }
                let batch = (!windows.is_empty()).then(|| batch_message(windows));
                for m in batch.into_iter().chain(others) {
                    if out_tx.send(m).await.is_err() {
                        return Ok(SessionEnd::Lost("session closed".into()));
                    }
                }
            }
            _ = heartbeat.tick() => {
                let current_run_id = state.current.as_ref().map(|c| c.run_id.clone()).unwrap_or_default();
                if out_tx.send(message(agent_message::Body::Heartbeat(Heartbeat { current_run_id }))).await.is_err() {
                    return Ok(SessionEnd::Lost("session closed".into()));
                }
            }
            _ = shutdown.changed() => {
                stop_gracefully(state, &out_tx, &mut inbound).await;
                return Ok(SessionEnd::Shutdown);
            }
        }
    }
}

/// On SIGTERM: tells the coordinator the agent is leaving, so that its session is offered nothing
/// more, and hands back what it holds, so each task goes back to the queue at once instead of after
/// a lease timeout, its attempt not counted. A run in progress is cancelled and its result sent marked
/// `agent_stopping` (or without its result when the runner does not stop within 10 s; a run that
/// completed meanwhile is sent as it is); an agent that hands nothing back (idle, or its last result
/// not yet acknowledged) sends a result for no run so marked. A task offered before the coordinator
/// took note is handed back the same way. Waits 5 s at most for the acknowledgements.
async fn stop_gracefully(
    state: &mut State,
    out_tx: &mpsc::Sender<AgentMessage>,
    inbound: &mut tonic::Streaming<fleetbench_proto::v1::CoordinatorMessage>,
) {
    // The results whose acknowledgement the agent waits for, by run id ("": the leaving notice).
    let mut waiting = std::collections::BTreeSet::new();
    let running = state
        .current
        .as_ref()
        .filter(|c| state.result.as_ref().is_none_or(|r| r.run_id != c.run_id))
        .map(|c| (c.run_id.clone(), c.cancel.clone()));
    let mut handed_back = false;
    if let Some((run_id, cancel)) = running {
        info!(run = %run_id, "Stopping: cancelling the run and telling the coordinator.");
        cancel.store(true, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let result = loop {
            tokio::select! {
                ev = state.events_rx.recv() => match ev {
                    Some(RunnerEvent::Finished(r)) if r.run_id == run_id => break Some(r),
                    Some(ev) => { state.absorb(ev); }
                    None => break None,
                },
                _ = tokio::time::sleep_until(deadline) => break None,
            }
        };
        let result = match result {
            // It completed before it saw the cancellation: a result like any other.
            Some(result)
                if result.report.is_some() && result.error.is_empty() && !result.cancelled =>
            {
                info!(run = %run_id, "The run completed as the agent stopped; sending its result.");
                result
            }
            Some(result) => {
                handed_back = true;
                RunResult {
                    agent_stopping: true,
                    ..result
                }
            }
            None => {
                warn!(run = %run_id, "The runner did not stop within 10 s; handing the task back without its result.");
                handed_back = true;
                RunResult {
                    run_id: run_id.clone(),
                    cancelled: true,
                    agent_stopping: true,
                    ..Default::default()
                }
            }
        };
        if out_tx
            .send(message(agent_message::Body::Result(result)))
            .await
            .is_err()
        {
            return;
        }
        waiting.insert(run_id);
    } else if let Some(r) = &state.result {
        // Finished; its result is on its way: its acknowledgement ends the run here.
        waiting.insert(r.run_id.clone());
    }
    if !handed_back {
        let notice = RunResult {
            agent_stopping: true,
            ..Default::default()
        };
        if out_tx
            .send(message(agent_message::Body::Result(notice)))
            .await
            .is_err()
        {
            return;
        }
        waiting.insert(String::new());
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while !waiting.is_empty() {
        tokio::select! {
            m = inbound.message() => match m {
                Ok(Some(m)) => match m.body {
                    Some(coordinator_message::Body::ResultAck(ack)) if waiting.remove(&ack.run_id) => {
                        let ours = state.current.as_ref().is_some_and(|c| c.run_id == ack.run_id);
                        if ours && handed_back {
                            info!(run = %ack.run_id, "The coordinator put the task back in the queue.");
                        }
                        if ours {
                            state.current = None;
                            state.result = None;
                        }
                    }
                    Some(coordinator_message::Body::Assignment(a)) => {
                        info!(run = %a.run_id, task = %a.task_id, "Offered a task while stopping; handing it back.");
                        let back = RunResult { run_id: a.run_id.clone(), cancelled: true, agent_stopping: true, ..Default::default() };
                        if out_tx.send(message(agent_message::Body::Result(back))).await.is_err() {
                            return;
                        }
                        waiting.insert(a.run_id);
                    }
                    _ => {}
                },
                _ => return,
            },
            _ = tokio::time::sleep_until(deadline) => {
                warn!(waiting = ?waiting, "The coordinator did not acknowledge within 5 s; leases expire instead.");
                return;
            }
        }
    }
}

/// Fetches a task's files, then runs it on a blocking thread; reports through `events`.
fn start_task(
    a: TaskAssignment,
    identity: &Identity,
    runner: Arc<dyn ModelRunner>,
    cache: Cache,
    mut models: ModelServiceClient<Authed>,
    cancel: Arc<AtomicBool>,
    events: mpsc::UnboundedSender<RunnerEvent>,
) {
    let cpus = identity.inventory.cpu_set.clone();
    let host_id = identity.inventory.host_id.clone();
    tokio::spawn(async move {
        let run_id = a.run_id.clone();
        let trace = crate::spans::Trace::from_traceparent(&a.traceparent);
        info!(run = %run_id, job = %a.job_id, trace_id = %trace.trace_id(), task = %a.task_id, variant = ?a.variant.as_ref().map(|v| &v.variant), "Task received.");
        let fetch = trace.start("fleetbench.agent.fetch");
        let prepared = prepare(&a, &mut models, &cache, cpus, host_id).await;
        let task = match prepared {
            Ok(t) => t,
            Err(e) => {
                let _ = events.send(RunnerEvent::Finished(RunResult {
                    run_id,
                    error: e.to_string(),
                    spans: fetch.end_with_error(&e.to_string()).into_iter().collect(),
                    ..Default::default()
                }));
                return;
            }
        };
        let fetched = fetch.end();
        let windows = Arc::new(AtomicU64::new(0));
        let (sent, failed_events) = (windows.clone(), events.clone());
        let result = tokio::task::spawn_blocking(move || {
            let mut emit = |w: TelemetryWindow| {
                sent.fetch_add(1, Ordering::Relaxed);
                let _ = events.send(RunnerEvent::Window(w));
            };
            let run_span = trace.start("fleetbench.agent.run");
            let outcome = runner.run(&task, &mut emit, &cancel);
            let mut result = RunResult {
                run_id: task.assignment.run_id.clone(),
                window_count: sent.load(Ordering::Relaxed),
                ..Default::default()
            };
            result.spans.extend(fetched);
            match outcome {
                Ok(report) => {
                    result.spans.extend(trace.run_spans(run_span, &report));
                    result.report = Some(report);
                }
                Err(RunError::Cancelled) => {
                    result.cancelled = true;
                    result.spans.extend(run_span.end_with_error("cancelled"));
                }
                Err(RunError::Failed(reason)) => {
                    warn!(run = %result.run_id, %reason, "Run failed.");
                    result.spans.extend(run_span.end_with_error(&reason));
                    result.error = reason;
                }
            }
            let _ = events.send(RunnerEvent::Finished(result));
        })
        .await;
        if let Err(e) = result {
            // A runner that panics ends its run as failed, with the reason, and frees the agent.
            let reason = match e.try_into_panic() {
                Ok(payload) => panic_message(&payload),
                Err(e) => e.to_string(),
            };
            tracing::error!(run = %run_id, %reason, "The runner panicked; the run ends as failed.");
            let _ = failed_events.send(RunnerEvent::Finished(RunResult {
                run_id,
                window_count: windows.load(Ordering::Relaxed),
                error: format!("the agent's runner panicked: {reason}"),
                ..Default::default()
            }));
        }
    });
}

/// The message of a panic's payload.
fn panic_message(payload: &Box<dyn std::any::Any + Send>) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

async fn prepare(
    a: &TaskAssignment,
    models: &mut ModelServiceClient<Authed>,
    cache: &Cache,
    cpus: Vec<u32>,
    host_id: String,
) -> Result<PreparedTask> {
    let variant = a
        .variant
        .as_ref()
        .ok_or_else(|| AgentError::Task("the assignment names no model variant".into()))?;
    let config = a
        .config
        .clone()
        .ok_or_else(|| AgentError::Task("the assignment has no configuration".into()))?;
    let config = RunConfig::try_from(config)
        .map_err(|e| AgentError::Task(format!("the assignment's configuration: {e}")))?;
    let fetch = |what: &'static str, e: AgentError| {
        AgentError::Task(format!("cannot fetch the {what}: {e}"))
    };
    let mut pins = Vec::new();
    let model = cache
        .fetch_set(models, &variant.artifact_sha256)
        .await
        .map_err(|e| fetch("model artifact", e))?;
    let model_path = model.path.clone();
    pins.push(model.pin);
    let mut blob = async |sha: &str, what: &'static str| -> Result<PathBuf> {
        let f = cache
            .fetch_blob(models, sha)
            .await
            .map_err(|e| fetch(what, e))?;
        pins.push(f.pin);
        Ok(f.path)
    };
    let eval = if !config.skip_accuracy
        && !variant.eval_inputs_sha256.is_empty()
        && !variant.eval_labels_sha256.is_empty()
    {
        let x = blob(&variant.eval_inputs_sha256, "eval inputs").await?;
        let y = blob(&variant.eval_labels_sha256, "eval labels").await?;
        Some((x, y))
    } else {
        None
    };
    let input_data = if config.input_data_sha256.is_empty() {
        None
    } else {
        Some(blob(&config.input_data_sha256, "input data").await?)
    };
    let base_model_path = if config.skip_accuracy || a.base_artifact_sha256.is_empty() {
        None
    } else {
        let base = cache
            .fetch_set(models, &a.base_artifact_sha256)
            .await
            .map_err(|e| fetch("base model artifact", e))?;
        pins.push(base.pin);
        Some(base.path)
    };
    Ok(PreparedTask {
        assignment: a.clone(),
        config,
        model_path,
        eval,
        base_model_path,
        input_data,
        cpus,
        host_id,
        pins: std::sync::Arc::new(pins),
    })
}
