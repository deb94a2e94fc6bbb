//! The session protocol: an agent's one bidirectional stream. [`open`] checks the agent's hello,
//! settles the run it says it holds against the one the store says it holds, and attaches the session
//! to the registry; [`serve`] then routes its inbound messages — heartbeats to the heartbeat batcher,
//! windows and results (converted to domain types) to ingest — until the agent hangs up, and detaches
//! it. This is the edge where gRPC's stream meets the domain.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use fleetbench_common::network::NetworkPath;
use fleetbench_common::now_ms;
use fleetbench_proto::v1::{AgentMessage, SessionHello, agent_message::Body as In};
use tracing::{debug, info, warn};

use crate::auth;
use crate::context::{Context, stopped};
use crate::domain::{RunResult, Window};
use crate::error::{Error, Result};
use crate::heartbeat::{self, HeartbeatHandle, HeartbeatItem, Kind};
use crate::ingest::{IngestHandle, IngestItem, check_window};
use crate::registry::{self, Ack, AgentLink};
use crate::store::{AgentRecord, HeartbeatRecord};

/// Where a session's inbound messages go.
#[derive(Clone)]
pub struct Queues {
    /// The ingest writer.
    pub ingest: IngestHandle,
    /// The heartbeat batcher.
    pub heartbeats: HeartbeatHandle,
}

/// A session attached to the registry, ready to be served.
pub struct Opened {
    agent: AgentRecord,
    session_id: u64,
    link: AgentLink,
    /// The agent said it is stopping; its heartbeats are no longer recorded.
    leaving: std::sync::atomic::AtomicBool,
}

/// Opens a session for the agent named in `hello`, with `link` as its outbound half. An unknown agent
/// is refused; a run the agent reports that is no longer active is cancelled on the link; a run the
/// store holds for it that the agent no longer has (it restarted) goes back to the queue.
pub async fn open(ctx: &Context, hello: SessionHello, link: AgentLink) -> Result<Opened> {
    let agent_id = hello.agent_id.clone();
    let agent =
        ctx.store.get_agent(&agent_id).await?.ok_or_else(|| {
            Error::NotFound(format!("unknown agent id {agent_id}; register first"))
        })?;
    let now = now_ms();
    let reported = (!hello.current_run_id.is_empty()).then(|| hello.current_run_id.clone());
    // A read error is not "no active run": that would cancel a healthy run. The agent retries.
    let active = ctx.store.active_run_of_agent(&agent_id).await?;
    let busy = match (&reported, &active) {
        (Some(r), Some(a)) if r == a => Some(r.clone()),
        _ => None,
    };
    if let (Some(r), None) = (&reported, &busy) {
        let _ = link.try_send(registry::cancel(
            r,
            "the run is no longer active (lease expired or job cancelled)",
        ));
    }
    if let (Some(a), None) = (&active, &busy) {
        let released = ctx
            .store
            .release_run(
                a,
                &format!("agent '{}' restarted and lost the run", agent.name),
                now,
                ctx.config.max_attempts,
                false,
            )
            .await;
        if let Err(e) = released {
            warn!(error = %e, run = %a, "Could not release a lost run; its lease will expire instead.");
        }
    }
    if let Err(e) = ctx.store.set_connected(&agent_id, true, now).await {
        warn!(error = %e, agent = %agent_id, "Could not mark the agent connected.");
    }
    let session_id = ctx.registry.attach(
        &agent_id,
        link.clone(),
        &agent.platform_id,
        &agent.host_id,
        busy.clone(),
    );
    info!(agent = %agent.name, resumed_run = ?busy, "Agent session opened.");
    ctx.changed();
    Ok(Opened {
        agent,
        session_id,
        link,
        leaving: Default::default(),
    })
}

/// A result as the domain takes it; a malformed report becomes the run's failure reason (a stopping
/// agent's still hands the task back).
fn result(r: fleetbench_proto::v1::RunResult) -> RunResult {
    let (run_id, window_count, agent_stopping) =
        (r.run_id.clone(), r.window_count, r.agent_stopping);
    RunResult::try_from(r).unwrap_or_else(|e| RunResult {
        run_id,
        window_count,
        agent_stopping,
        error: format!("the agent sent a malformed result: {e}"),
        ..Default::default()
    })
}

/// Hands a window to ingest, or refuses it at once when it is malformed (acknowledged as discarded,
/// logged and counted); false when the coordinator is shutting down.
async fn window(
    ctx: &Context,
    queues: &Queues,
    s: &Opened,
    w: fleetbench_proto::v1::TelemetryWindow,
) -> bool {
    let window = Window::from(w);
    let mut latency = ctx
        .telemetry
        .enabled()
        .then(|| Box::new(ctx.telemetry.windows.histograms.latency.counts()));
    let checked = check_window(&window, |ns, n| {
        if let Some(c) = &mut latency {
            c.add(ns, n)
        }
    });
    if let Some(why) = checked {
        ctx.stats.bad_windows.fetch_add(1, Ordering::Relaxed);
        ctx.telemetry
            .inst
            .windows
            .add(1, &[opentelemetry::KeyValue::new("outcome", "malformed")]);
        warn!(agent = %s.agent.name, run = %window.run_id, seq = window.seq, reason = %why, "Refused a malformed telemetry window.");
        s.link
            .deliver(registry::window_acks(vec![Ack {
                run_id: window.run_id,
                seq: window.seq,
                discarded: true,
            }]))
            .await;
        return true;
    }
    queues
        .ingest
        .send(IngestItem::Window {
            window,
            agent_id: s.agent.id.clone(),
            reply: s.link.clone(),
            received: std::time::Instant::now(),
            latency,
        })
        .await
        .is_ok()
}

/// Routes one inbound message; false when the coordinator is shutting down.
async fn route(ctx: &Context, queues: &Queues, s: &Opened, message: AgentMessage) -> bool {
    match message.body {
        Some(In::Heartbeat(_)) if s.leaving.load(Ordering::Relaxed) => true,
        Some(In::Heartbeat(hb)) => {
            let item = HeartbeatItem {
                record: HeartbeatRecord {
                    agent_id: s.agent.id.clone(),
                    run_id: (!hb.current_run_id.is_empty()).then_some(hb.current_run_id),
                },
                reply: s.link.clone(),
                kind: Kind::Beat,
            };
            // Liveness is idempotent: when the batcher is backed up (a slow database), drop the
            // heartbeat rather than stall the session.
            !matches!(
                queues.heartbeats.try_send(item),
                Err(tokio::sync::mpsc::error::TrySendError::Closed(_))
            )
        }
        Some(In::WindowBatch(batch)) => {
            for w in batch.windows {
                if !window(ctx, queues, s, w).await {
                    return false;
                }
            }
            true
        }
        Some(In::Window(w)) => window(ctx, queues, s, w).await,
        Some(In::Result(r)) => {
            let result = result(r);
            if result.agent_stopping && !s.leaving.swap(true, Ordering::Relaxed) {
                leaving(ctx, queues, s).await;
            }
            queues
                .ingest
                .send(IngestItem::Result {
                    result: Box::new(result),
                    agent_id: s.agent.id.clone(),
                    reply: s.link.clone(),
                })
                .await
                .is_ok()
        }
        Some(In::Network(report)) => {
            network(ctx, s, report).await;
            true
        }
        Some(In::Hello(_)) | None => true,
    }
}

/// The agent said it is stopping: its session is offered nothing more from now on (the scheduler
/// may otherwise lease it the very task it is handing back, in the moment between the
/// acknowledgement and its hang-up), and it is marked disconnected behind the heartbeats it queued.
async fn leaving(ctx: &Context, queues: &Queues, s: &Opened) {
    if !ctx.registry.leaving(&s.agent.id, &s.link) {
        return;
    }
    info!(agent = %s.agent.name, "The agent is stopping; its session is offered no more tasks.");
    mark(ctx, queues, s, Kind::Leaving).await;
}

/// Marks the session's agent disconnected through the heartbeat batcher, behind the heartbeats this
/// session queued: one flushed after a direct write would mark the agent connected again, and jobs
/// would be expanded for it.
async fn mark(ctx: &Context, queues: &Queues, s: &Opened, kind: Kind) {
    let mark = HeartbeatItem {
        record: HeartbeatRecord {
            agent_id: s.agent.id.clone(),
            run_id: None,
        },
        reply: s.link.clone(),
        kind,
    };
    if queues.heartbeats.send(mark).await.is_err() {
        heartbeat::mark_disconnected(ctx, &s.agent.id).await;
    }
}

/// Stores an agent's network measurements; a malformed report is logged and dropped (the agent's
/// earlier measurements stay).
async fn network(ctx: &Context, s: &Opened, report: fleetbench_proto::v1::NetworkReport) {
    let paths: Vec<NetworkPath> = report.paths.into_iter().map(Into::into).collect();
    if let Err(why) = fleetbench_common::network::check_report(&paths) {
        warn!(agent = %s.agent.name, reason = %why, "Refused a malformed network report.");
        return;
    }
    match ctx.store.set_network(&s.agent.id, &paths).await {
        Ok(()) => {
            debug!(agent = %s.agent.name, paths = paths.len(), "Stored network measurements.")
        }
        Err(e) => warn!(agent = %s.agent.name, error = %e, "Could not store network measurements."),
    }
}

/// How often an open session checks that the agent's credential still stands (a revocation made
/// through another replica closes it within this).
pub const CREDENTIAL_CHECK: std::time::Duration = std::time::Duration::from_secs(2);

/// Why an agent's credential no longer holds its session, if it does not.
async fn credential_ends_session(ctx: &Context, token_id: &str) -> Option<&'static str> {
    let now = now_ms();
    match ctx.store.get_token(token_id).await {
        Ok(Some(t)) if t.revoked_at > 0 => {
            Some("The agent's credential was revoked; closing its session.")
        }
        Ok(Some(t)) if t.expires_at > 0 && now >= t.expires_at => {
            Some("The agent's credential expired; closing its session.")
        }
        // The agent renews when it registers: it reconnects at once and resumes its run.
        Ok(Some(t))
            if t.next_secret_sha256.is_empty()
                && auth::renewal_due(&t, ctx.config.agent_credential_ttl_ms, now) =>
        {
            Some(
                "The agent's credential is due for renewal; closing its session so it reconnects and renews.",
            )
        }
        Ok(Some(_)) => None,
        Ok(None) => Some("The agent's credential was removed; closing its session."),
        // A database error keeps the session: an outage must not drop the fleet.
        Err(_) => None,
    }
}

/// Serves an opened session until the agent hangs up, the coordinator stops or the agent's
/// credential (`token_id`) is revoked, then detaches it.
pub async fn serve(
    ctx: Arc<Context>,
    queues: Queues,
    session: Opened,
    token_id: String,
    mut inbound: tonic::Streaming<AgentMessage>,
) {
    let mut stopping = ctx.stopping.clone();
    // Often enough that a short-lived credential is renewed well before it expires.
    let ttl = ctx.config.agent_credential_ttl_ms;
    let every = if ttl == 0 {
        CREDENTIAL_CHECK
    } else {
        CREDENTIAL_CHECK.min(std::time::Duration::from_millis(ttl / 8))
    };
    let mut check = tokio::time::interval(every);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let next = tokio::select! {
            m = inbound.message() => m,
            _ = stopped(&mut stopping) => break,
            _ = session.link.closed() => break,
            _ = check.tick() => {
                let Some(why) = credential_ends_session(&ctx, &token_id).await else {
                    continue;
                };
                info!(agent = %session.agent.name, "{why}");
                break;
            }
        };
        let message = match next {
            Ok(Some(m)) => m,
            Ok(None) => break,
            Err(e) => {
                debug!(agent = %session.agent.name, error = %e, "Agent stream ended with an error.");
                break;
            }
        };
        if !route(&ctx, &queues, &session, message).await {
            break; // shutting down
        }
    }
    if ctx.registry.detach(&session.agent.id, session.session_id) {
        info!(agent = %session.agent.name, "Agent session closed.");
        mark(&ctx, &queues, &session, Kind::Closed).await;
    }
}
