//! Agent sessions and task leasing. Each connected agent has one session; an idle session is offered the
//! next eligible task (same platform, preferably expanded for this very agent, never while another agent
//! of its host runs one). A task whose agent goes silent past the lease timeout returns to the queue.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetbench_common::now_ms;
use fleetbench_proto::v1::{
    CancelRun, CoordinatorMessage, TaskAssignment, coordinator_message::Body,
};
use tokio::sync::{Notify, mpsc};
use tracing::{debug, info, warn};

use crate::Coordinator;
use crate::error::Result;
use crate::store::LeaseRequest;

/// Outbound half of an agent's session.
pub type SessionTx = mpsc::Sender<Result<CoordinatorMessage, tonic::Status>>;

/// One connected agent.
#[derive(Clone)]
struct Session {
    id: u64,
    tx: SessionTx,
    platform_id: String,
    host_id: String,
    busy_run: Option<String>,
}

/// Sessions of the agents connected to this coordinator.
pub struct Hub {
    sessions: Mutex<HashMap<String, Session>>,
    next_id: AtomicU64,
    wake: Notify,
}

impl Default for Hub {
    fn default() -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            wake: Notify::new(),
        }
    }
}

/// Builds a message.
pub fn msg(body: Body) -> CoordinatorMessage {
    CoordinatorMessage { body: Some(body) }
}

/// A CancelRun message.
pub fn cancel_msg(run_id: &str, reason: &str) -> CoordinatorMessage {
    msg(Body::Cancel(CancelRun {
        run_id: run_id.to_string(),
        reason: reason.to_string(),
    }))
}

impl Hub {
    /// Wakes the scheduler loop.
    pub fn kick(&self) {
        self.wake.notify_one();
    }

    /// Adds a session (replacing an older one of the same agent); returns its id.
    pub fn attach(
        &self,
        agent_id: &str,
        tx: SessionTx,
        platform_id: &str,
        host_id: &str,
        busy_run: Option<String>,
    ) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            id,
            tx,
            platform_id: platform_id.to_string(),
            host_id: host_id.to_string(),
            busy_run,
        };
        self.sessions
            .lock()
            .expect("hub lock")
            .insert(agent_id.to_string(), session);
        self.kick();
        id
    }

    /// Removes a session if it is still the agent's current one; returns whether it was.
    pub fn detach(&self, agent_id: &str, session_id: u64) -> bool {
        let mut sessions = self.sessions.lock().expect("hub lock");
        if sessions.get(agent_id).is_some_and(|s| s.id == session_id) {
            sessions.remove(agent_id);
            true
        } else {
            false
        }
    }

    /// Marks an agent idle if it was running `run_id`.
    pub fn run_ended(&self, agent_id: &str, run_id: &str) {
        if let Some(s) = self.sessions.lock().expect("hub lock").get_mut(agent_id)
            && s.busy_run.as_deref() == Some(run_id)
        {
            s.busy_run = None;
        }
        self.kick();
    }

    /// Sends a message to an agent connected here; false when it is not connected here.
    pub fn send(&self, agent_id: &str, m: CoordinatorMessage) -> bool {
        let tx = self
            .sessions
            .lock()
            .expect("hub lock")
            .get(agent_id)
            .map(|s| s.tx.clone());
        match tx {
            Some(tx) => tx.try_send(Ok(m)).is_ok(),
            None => false,
        }
    }

    /// Drops every session (the server is stopping).
    pub fn close_all(&self) {
        self.sessions.lock().expect("hub lock").clear();
    }

    /// Number of connected agents.
    pub fn connected(&self) -> usize {
        self.sessions.lock().expect("hub lock").len()
    }

    fn idle(&self) -> Vec<(String, Session)> {
        let sessions = self.sessions.lock().expect("hub lock");
        let mut idle: Vec<_> = sessions
            .iter()
            .filter(|(_, s)| s.busy_run.is_none())
            .map(|(k, s)| (k.clone(), s.clone()))
            .collect();
        idle.sort_by(|a, b| a.0.cmp(&b.0));
        idle
    }

    fn set_busy(&self, agent_id: &str, session_id: u64, run_id: &str) -> bool {
        match self.sessions.lock().expect("hub lock").get_mut(agent_id) {
            Some(s) if s.id == session_id && s.busy_run.is_none() => {
                s.busy_run = Some(run_id.to_string());
                true
            }
            _ => false,
        }
    }
}

/// Runs the scheduler until `shutdown` fires: on every kick or tick, expires leases and offers work to
/// idle sessions.
pub async fn run(coord: Arc<Coordinator>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let tick = Duration::from_millis(coord.config.scheduler_tick_ms.max(10));
    loop {
        tokio::select! {
            _ = coord.hub.wake.notified() => {}
            _ = tokio::time::sleep(tick) => {}
            _ = shutdown.changed() => return,
        }
        if let Err(e) = schedule_once(&coord).await {
            coord.store_trouble();
            warn!(error = %e, "Scheduling pass failed; retrying on the next tick.");
        }
    }
}

/// One pass: expire leases, then lease tasks to idle sessions.
pub async fn schedule_once(coord: &Coordinator) -> Result<()> {
    let now = now_ms();
    // Heartbeats could not renew leases while the database was away: leases expire only once it has
    // worked for a whole lease timeout again, so that an outage does not requeue running tasks.
    let expired = if coord.store_settled(now) {
        coord
            .store
            .expire_leases(now, coord.config.max_attempts)
            .await?
    } else {
        Vec::new()
    };
    for e in &expired {
        info!(task = %e.task_id, run = %e.run_id, requeued = e.requeued, "Lease expired; the agent went silent.");
        coord
            .hub
            .send(&e.agent_id, cancel_msg(&e.run_id, "lease expired"));
        coord.hub.run_ended(&e.agent_id, &e.run_id);
    }
    let mut leased_any = !expired.is_empty();
    for (agent_id, session) in coord.hub.idle() {
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let req = LeaseRequest {
            agent_id: agent_id.clone(),
            platform_id: session.platform_id.clone(),
            host_id: session.host_id.clone(),
            run_id: run_id.clone(),
            lease_until: now + coord.config.lease_timeout_ms as i64,
            alive_since: now - coord.config.lease_timeout_ms as i64,
        };
        let Some(lease) = coord.store.lease_task(&req, now).await? else {
            continue;
        };
        leased_any = true;
        let variants = coord.store.list_variants(Some(&lease.model)).await?;
        let variant = variants
            .iter()
            .find(|v| v.variant == lease.variant)
            .cloned();
        // The lineage's root, for fidelity.
        let mut root = variant.as_ref();
        for _ in 0..variants.len() {
            match root.and_then(|r| {
                variants
                    .iter()
                    .find(|v| !r.variant_of.is_empty() && v.variant == r.variant_of)
            }) {
                Some(parent) => root = Some(parent),
                None => break,
            }
        }
        let base_artifact_sha256 = match (root, variant.as_ref()) {
            (Some(r), Some(v)) if r.variant != v.variant => r.artifact_sha256.clone(),
            _ => String::new(),
        };
        let assignment = TaskAssignment {
            base_artifact_sha256,
            task_id: lease.task_id.clone(),
            run_id: lease.run_id.clone(),
            job_id: lease.job_id.clone(),
            attempt: lease.attempt,
            variant,
            config: Some(lease.config.clone()),
        };
        if !coord.hub.set_busy(&agent_id, session.id, &run_id)
            || session
                .tx
                .try_send(Ok(msg(Body::Assignment(assignment))))
                .is_err()
        {
            // The session went away between the snapshot and the lease: give the task back now.
            coord
                .store
                .release_run(
                    &run_id,
                    "agent disconnected before the task reached it",
                    now,
                    coord.config.max_attempts + 1,
                )
                .await?;
            coord.hub.run_ended(&agent_id, &run_id);
            continue;
        }
        info!(agent = %agent_id, task = %lease.task_id, run = %run_id, variant = %lease.variant, attempt = lease.attempt, "Task leased.");
    }
    if leased_any {
        coord.changes.send_modify(|v| *v = v.wrapping_add(1));
    }
    debug!(connected = coord.hub.connected(), "Scheduling pass done.");
    Ok(())
}

/// Serves one agent session until the agent hangs up: attaches it to the hub, resumes or releases the
/// run the agent reports, routes heartbeats, windows and results, and detaches at the end.
pub async fn serve_session(
    coord: Arc<Coordinator>,
    hello: fleetbench_proto::v1::SessionHello,
    mut inbound: tonic::Streaming<fleetbench_proto::v1::AgentMessage>,
    tx: SessionTx,
) {
    use fleetbench_proto::v1::agent_message::Body as In;

    let agent_id = hello.agent_id.clone();
    let agent = match coord.store.get_agent(&agent_id).await {
        Ok(Some(a)) => a,
        Ok(None) => {
            let _ = tx
                .send(Err(tonic::Status::not_found(format!(
                    "unknown agent id {agent_id}; register first"
                ))))
                .await;
            return;
        }
        Err(e) => {
            let _ = tx.send(Err(e.into())).await;
            return;
        }
    };
    let now = now_ms();
    let reported = (!hello.current_run_id.is_empty()).then(|| hello.current_run_id.clone());
    let active = coord
        .store
        .active_run_of_agent(&agent_id)
        .await
        .ok()
        .flatten();
    let busy = match (&reported, &active) {
        (Some(r), Some(a)) if r == a => Some(r.clone()),
        _ => None,
    };
    if let (Some(r), None) = (&reported, &busy) {
        let _ = tx.try_send(Ok(cancel_msg(
            r,
            "the run is no longer active (lease expired or job cancelled)",
        )));
    }
    if let (Some(a), None) = (&active, &busy) {
        // The agent came back without the run it held (it restarted): give the task back now.
        let released = coord
            .store
            .release_run(
                a,
                &format!("agent '{}' restarted and lost the run", agent.name),
                now,
                coord.config.max_attempts,
            )
            .await;
        if let Err(e) = released {
            warn!(error = %e, run = %a, "Could not release a lost run; its lease will expire instead.");
        }
    }
    if let Err(e) = coord.store.set_connected(&agent_id, true, now).await {
        warn!(error = %e, agent = %agent_id, "Could not mark the agent connected.");
    }
    let session_id = coord.hub.attach(
        &agent_id,
        tx.clone(),
        &agent.platform_id,
        &agent.host_id,
        busy.clone(),
    );
    info!(agent = %agent.name, resumed_run = ?busy, "Agent session opened.");
    coord.changed();

    let mut stopping = coord.stopping.clone();
    loop {
        let next = tokio::select! {
            m = inbound.message() => m,
            _ = crate::stopped(&mut stopping) => break,
        };
        let message = match next {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                debug!(agent = %agent.name, error = %e, "Agent stream ended with an error.");
                break;
            }
        };
        let sent = match message.body {
            Some(In::Heartbeat(hb)) => {
                let record = crate::store::HeartbeatRecord {
                    agent_id: agent_id.clone(),
                    run_id: (!hb.current_run_id.is_empty()).then_some(hb.current_run_id),
                };
                // Liveness is idempotent: when the batcher is backed up (a slow database), drop
                // the heartbeat rather than stall the session.
                let item = crate::ingest::HeartbeatItem {
                    record,
                    reply: tx.clone(),
                };
                !matches!(
                    coord.heartbeats.try_send(item),
                    Err(tokio::sync::mpsc::error::TrySendError::Closed(_))
                )
            }
            Some(In::WindowBatch(batch)) => {
                let mut ok = true;
                for window in batch.windows {
                    let item = crate::ingest::IngestItem::Window {
                        window,
                        reply: tx.clone(),
                    };
                    if coord.ingest.send(item).await.is_err() {
                        ok = false;
                        break;
                    }
                }
                ok
            }
            Some(In::Window(window)) => coord
                .ingest
                .send(crate::ingest::IngestItem::Window {
                    window,
                    reply: tx.clone(),
                })
                .await
                .is_ok(),
            Some(In::Result(result)) => coord
                .ingest
                .send(crate::ingest::IngestItem::Result {
                    result: Box::new(result),
                    agent_id: agent_id.clone(),
                    reply: tx.clone(),
                })
                .await
                .is_ok(),
            Some(In::Hello(_)) | None => true,
        };
        if !sent {
            break; // shutting down
        }
    }
    if coord.hub.detach(&agent_id, session_id) {
        if let Err(e) = coord.store.set_connected(&agent_id, false, now_ms()).await {
            warn!(error = %e, agent = %agent_id, "Could not mark the agent disconnected.");
        }
        info!(agent = %agent.name, "Agent session closed.");
        coord.changed();
    }
}
