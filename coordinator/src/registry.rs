//! The registry of agents connected to this coordinator process, and the messages the coordinator
//! sends them. Each connected agent has one session with an outbound link; the registry knows which
//! sessions are idle and which run they hold. It knows nothing of gRPC: a link is a channel of
//! messages, and the session edge ([`crate::session`]) puts it on the wire.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use fleetbench_proto::v1::{
    CancelRun, CoordinatorMessage, ResultAck, TaskAssignment, WindowAck, WindowAckBatch,
    coordinator_message::Body,
};
use tokio::sync::{Notify, mpsc};

use crate::domain::Variant;
use crate::store::Lease;

/// Messages queued per session before senders wait.
const LINK_CAPACITY: usize = 4096;

/// How long a message the agent waits for (an acknowledgement) may wait for room on a full link. A
/// session that does not drain its link for this long is closed: the agent reconnects and resends
/// what was not acknowledged, so nothing is lost, and one stuck session cannot stall ingest.
const DELIVER_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Default)]
struct Closing {
    closed: AtomicBool,
    notify: Notify,
}

/// The outbound half of an agent's session.
#[derive(Clone)]
pub struct AgentLink {
    tx: mpsc::Sender<CoordinatorMessage>,
    closing: Arc<Closing>,
    deliver_timeout: Duration,
}

/// The receiving half, which the session edge puts on the wire.
pub struct LinkReceiver {
    rx: mpsc::Receiver<CoordinatorMessage>,
    closing: Arc<Closing>,
}

impl AgentLink {
    /// A new link and its receiving half.
    pub fn new() -> (AgentLink, LinkReceiver) {
        Self::with(LINK_CAPACITY, DELIVER_TIMEOUT)
    }

    /// A link of `capacity` messages whose deliveries wait at most `deliver_timeout`.
    pub fn with(capacity: usize, deliver_timeout: Duration) -> (AgentLink, LinkReceiver) {
        let (tx, rx) = mpsc::channel(capacity);
        let closing = Arc::new(Closing::default());
        (
            AgentLink {
                tx,
                closing: closing.clone(),
                deliver_timeout,
            },
            LinkReceiver { rx, closing },
        )
    }

    /// Queues a message that may be lost without harm (it is sent again later, like a cancellation
    /// that every heartbeat repeats); false when it was not queued.
    pub fn try_send(&self, m: CoordinatorMessage) -> bool {
        !self.is_closed() && self.tx.try_send(m).is_ok()
    }

    /// Queues a message the agent waits for, waiting for room; a link that stays full is closed (see
    /// [`DELIVER_TIMEOUT`]). False when the session is gone: the agent resends on its next session.
    pub async fn deliver(&self, m: CoordinatorMessage) -> bool {
        if self.is_closed() {
            return false;
        }
        match self.tx.send_timeout(m, self.deliver_timeout).await {
            Ok(()) => true,
            Err(mpsc::error::SendTimeoutError::Timeout(_)) => {
                tracing::warn!(
                    timeout_ms = self.deliver_timeout.as_millis() as u64,
                    "An agent session did not take its acknowledgements in time; closing it so the agent reconnects and resends."
                );
                self.close();
                false
            }
            Err(mpsc::error::SendTimeoutError::Closed(_)) => false,
        }
    }

    /// Ends the session: its stream to the agent ends, and the agent reconnects.
    pub fn close(&self) {
        self.closing.closed.store(true, Ordering::SeqCst);
        self.closing.notify.notify_waiters();
    }

    /// True once the link was closed or its session went away.
    pub fn is_closed(&self) -> bool {
        self.closing.closed.load(Ordering::SeqCst) || self.tx.is_closed()
    }

    /// Resolves once the link is closed (by [`AgentLink::close`]).
    pub async fn closed(&self) {
        loop {
            let notified = self.closing.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.closing.closed.load(Ordering::SeqCst) {
                return;
            }
            notified.await;
        }
    }

    /// True when both are links of one session.
    pub fn same(&self, other: &AgentLink) -> bool {
        self.tx.same_channel(&other.tx)
    }
}

impl LinkReceiver {
    /// The messages, ending when the link is closed.
    pub fn into_stream(self) -> impl futures::Stream<Item = CoordinatorMessage> + Send + 'static {
        let LinkReceiver { rx, closing } = self;
        futures::stream::unfold((rx, closing), |(mut rx, closing)| async move {
            let next = {
                let notified = closing.notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if closing.closed.load(Ordering::SeqCst) {
                    return None;
                }
                tokio::select! {
                    m = rx.recv() => m,
                    _ = notified => None,
                }
            };
            next.map(|m| (m, (rx, closing)))
        })
    }
}

/// One window's acknowledgement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// Run id.
    pub run_id: String,
    /// Window sequence number.
    pub seq: u64,
    /// True when the window was not stored because its run is no longer active.
    pub discarded: bool,
}

fn msg(body: Body) -> CoordinatorMessage {
    CoordinatorMessage { body: Some(body) }
}

/// Tells an agent to stop a run.
pub fn cancel(run_id: &str, reason: &str) -> CoordinatorMessage {
    msg(Body::Cancel(CancelRun {
        run_id: run_id.to_string(),
        reason: reason.to_string(),
    }))
}

/// Acknowledges windows: one as itself, several as one batch.
pub fn window_acks(mut acks: Vec<Ack>) -> CoordinatorMessage {
    let wire = |a: Ack| WindowAck {
        run_id: a.run_id,
        seq: a.seq,
        discarded: a.discarded,
    };
    if acks.len() == 1 {
        msg(Body::WindowAck(wire(acks.pop().expect("one ack"))))
    } else {
        msg(Body::WindowAcks(WindowAckBatch {
            acks: acks.into_iter().map(wire).collect(),
        }))
    }
}

/// Acknowledges a run's result (or says why it was refused).
pub fn result_ack(run_id: &str, discarded: bool, reason: &str) -> CoordinatorMessage {
    msg(Body::ResultAck(ResultAck {
        run_id: run_id.to_string(),
        discarded,
        reason: reason.to_string(),
    }))
}

/// Hands a leased task to its agent, with the base variant's artifact for fidelity when it has one.
pub fn assignment(
    lease: &Lease,
    variant: Option<&Variant>,
    base_sha256: &str,
) -> CoordinatorMessage {
    msg(Body::Assignment(TaskAssignment {
        base_artifact_sha256: base_sha256.to_string(),
        task_id: lease.task_id.clone(),
        run_id: lease.run_id.clone(),
        job_id: lease.job_id.clone(),
        attempt: lease.attempt,
        variant: variant.map(Into::into),
        config: Some((&lease.config).into()),
        traceparent: crate::otel::traces::traceparent(&lease.job_id, &lease.run_id),
    }))
}

/// One connected agent.
#[derive(Clone)]
struct Session {
    id: u64,
    link: AgentLink,
    platform_id: String,
    host_id: String,
    busy_run: Option<String>,
    /// The agent said it is stopping (it handed its run back): it hangs up once acknowledged and is
    /// offered nothing more on this session.
    leaving: bool,
}

/// An idle session, as the scheduler sees it.
#[derive(Clone)]
pub struct IdleSession {
    /// Agent id.
    pub agent_id: String,
    /// Session id (changes when the agent reconnects).
    pub session_id: u64,
    /// Where to send its assignment.
    pub link: AgentLink,
    /// The agent's platform.
    pub platform_id: String,
    /// The agent's host.
    pub host_id: String,
}

/// Sessions of the agents connected to this coordinator.
pub struct Registry {
    sessions: Mutex<HashMap<String, Session>>,
    next_id: AtomicU64,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
        }
    }
}

impl Registry {
    /// Adds a session (replacing an older one of the same agent); returns its id.
    pub fn attach(
        &self,
        agent_id: &str,
        link: AgentLink,
        platform_id: &str,
        host_id: &str,
        busy_run: Option<String>,
    ) -> u64 {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let session = Session {
            id,
            link,
            platform_id: platform_id.to_string(),
            host_id: host_id.to_string(),
            busy_run,
            leaving: false,
        };
        self.sessions
            .lock()
            .expect("registry lock")
            .insert(agent_id.to_string(), session);
        id
    }

    /// Removes a session if it is still the agent's current one; returns whether it was.
    pub fn detach(&self, agent_id: &str, session_id: u64) -> bool {
        let mut sessions = self.sessions.lock().expect("registry lock");
        if sessions.get(agent_id).is_some_and(|s| s.id == session_id) {
            sessions.remove(agent_id);
            true
        } else {
            false
        }
    }

    /// Marks an agent idle if it was running `run_id`.
    pub fn run_ended(&self, agent_id: &str, run_id: &str) {
        if let Some(s) = self
            .sessions
            .lock()
            .expect("registry lock")
            .get_mut(agent_id)
            && s.busy_run.as_deref() == Some(run_id)
        {
            s.busy_run = None;
        }
    }

    /// Marks the agent's session on `link` as leaving: its operator stopped the agent, which says so
    /// with its last result (or with a result for no run when it was idle) and hangs up once that is
    /// acknowledged. A leaving session is never idle again, so nothing (the task it hands back
    /// included) is offered to it in the moment before it goes; a new session of the agent starts
    /// afresh. False when `link` is no longer the agent's session here.
    pub fn leaving(&self, agent_id: &str, link: &AgentLink) -> bool {
        match self
            .sessions
            .lock()
            .expect("registry lock")
            .get_mut(agent_id)
        {
            Some(s) if s.link.same(link) => {
                s.leaving = true;
                true
            }
            _ => false,
        }
    }

    /// Whether the agent's session on `link` is its current one here and leaving.
    pub fn is_leaving(&self, agent_id: &str, link: &AgentLink) -> bool {
        self.sessions
            .lock()
            .expect("registry lock")
            .get(agent_id)
            .is_some_and(|s| s.leaving && s.link.same(link))
    }

    /// Sends a message to an agent connected here, if there is room; false when it is not connected
    /// here.
    pub fn send(&self, agent_id: &str, m: CoordinatorMessage) -> bool {
        let link = self
            .sessions
            .lock()
            .expect("registry lock")
            .get(agent_id)
            .map(|s| s.link.clone());
        match link {
            Some(link) => link.try_send(m),
            None => false,
        }
    }

    /// Closes an agent's session here (its lease expired: a half-open connection must not be offered
    /// the next task); the agent reconnects if it is alive.
    pub fn close(&self, agent_id: &str) {
        if let Some(s) = self.sessions.lock().expect("registry lock").get(agent_id) {
            s.link.close();
        }
    }

    /// Closes every session (the server is stopping).
    pub fn close_all(&self) {
        for (_, s) in self.sessions.lock().expect("registry lock").drain() {
            s.link.close();
        }
    }

    /// Whether the agent has a session here.
    pub fn is_attached(&self, agent_id: &str) -> bool {
        self.sessions
            .lock()
            .expect("registry lock")
            .contains_key(agent_id)
    }

    /// Number of connected agents.
    pub fn connected(&self) -> usize {
        self.sessions.lock().expect("registry lock").len()
    }

    /// Idle sessions, by agent id.
    pub fn idle(&self) -> Vec<IdleSession> {
        let sessions = self.sessions.lock().expect("registry lock");
        let mut idle: Vec<IdleSession> = sessions
            .iter()
            .filter(|(_, s)| s.busy_run.is_none() && !s.leaving && !s.link.is_closed())
            .map(|(k, s)| IdleSession {
                agent_id: k.clone(),
                session_id: s.id,
                link: s.link.clone(),
                platform_id: s.platform_id.clone(),
                host_id: s.host_id.clone(),
            })
            .collect();
        idle.sort_by(|a, b| a.agent_id.cmp(&b.agent_id));
        idle
    }

    /// Sends `assignment` of `run_id` to the agent's session and marks it busy, if that is still the
    /// agent's current, idle session and it is not leaving. One hold of the lock: a session marked
    /// leaving meanwhile gets nothing, and one marked after has the assignment queued ahead of the
    /// acknowledgement that lets its agent go, so the agent reads it and hands it back.
    pub fn assign(
        &self,
        agent_id: &str,
        session_id: u64,
        run_id: &str,
        assignment: CoordinatorMessage,
    ) -> bool {
        match self
            .sessions
            .lock()
            .expect("registry lock")
            .get_mut(agent_id)
        {
            Some(s) if s.id == session_id && s.busy_run.is_none() && !s.leaving => {
                let sent = s.link.try_send(assignment);
                if sent {
                    s.busy_run = Some(run_id.to_string());
                }
                sent
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test]
    async fn a_leaving_session_is_not_idle_and_is_assigned_nothing() {
        let registry = Registry::default();
        let (link, rx) = AgentLink::new();
        let mut stream = Box::pin(rx.into_stream());
        let session = registry.attach("a", link.clone(), "p", "h", None);
        assert_eq!(registry.idle().len(), 1);
        // A link that is not the agent's session marks nothing.
        let (other, _rx) = AgentLink::new();
        assert!(!registry.leaving("a", &other));
        assert!(registry.leaving("a", &link));
        assert!(registry.is_leaving("a", &link));
        assert!(registry.idle().is_empty(), "a leaving session is not idle");
        assert!(!registry.assign("a", session, "r1", cancel("x", "offer")));
        // A new session of the agent starts afresh.
        let (fresh, fresh_rx) = AgentLink::new();
        let mut fresh_stream = Box::pin(fresh_rx.into_stream());
        let again = registry.attach("a", fresh.clone(), "p", "h", None);
        assert!(!registry.is_leaving("a", &fresh));
        assert!(
            !registry.is_leaving("a", &link),
            "the old link is no longer the session"
        );
        assert!(registry.assign("a", again, "r2", cancel("y", "offer")));
        assert!(registry.idle().is_empty(), "busy with r2");
        assert!(
            fresh_stream.next().await.is_some(),
            "the assignment was queued"
        );
        drop(link);
        assert!(
            stream.next().await.is_none(),
            "nothing was queued for the leaving session"
        );
    }

    #[tokio::test]
    async fn an_ack_waits_for_room_and_a_stuck_session_is_closed_not_skipped() {
        let (link, rx) = AgentLink::with(2, Duration::from_millis(100));
        let mut stream = Box::pin(rx.into_stream());
        assert!(link.deliver(cancel("r", "x")).await);
        assert!(link.deliver(cancel("r", "y")).await);
        // Full: the next ack waits, and once the session takes one it goes through.
        let waiting = {
            let link = link.clone();
            tokio::spawn(async move { link.deliver(result_ack("r", false, "")).await })
        };
        assert!(stream.next().await.is_some());
        assert!(waiting.await.unwrap(), "delivered once there was room");
        // A session that takes nothing: the delivery gives up and closes the session, whose stream
        // then ends, so the agent reconnects and resends what was not acknowledged.
        assert!(link.deliver(cancel("r", "z")).await || link.is_closed());
        assert!(!link.deliver(result_ack("r", false, "")).await);
        assert!(link.is_closed());
        let rest: Vec<_> = stream.collect().await;
        assert!(rest.len() <= 2, "the stream ends: {}", rest.len());
        assert!(!link.try_send(cancel("r", "late")));
    }
}
