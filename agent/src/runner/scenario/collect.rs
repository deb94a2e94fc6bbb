//! Result collection: workers run queries and report each as an event; one recording thread drains
//! the events into the recorder and decides when the phase stops.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fleetbench_common::hist;

use super::{QueryExec, RequestTiming, StopRule, check};
use crate::runner::RunError;
use crate::runner::recorder::Recorder;

/// A finished query, as workers report it to the recording thread.
pub(crate) enum Event {
    Done {
        /// Latency from the query's reference time (its start, or its scheduled time).
        latency: Duration,
        /// Server: how late the query was issued.
        issue_delay: Option<Duration>,
        /// Time spent executing, from the moment a worker started it.
        service: Duration,
        end: Instant,
        /// Generate: when each request's tokens were ready (empty for other scenarios).
        generation: Vec<RequestTiming>,
    },
    Dropped,
    Failed(RunError),
}

/// Runs one query on a worker. Its latency counts from `scheduled` (server: no coordinated
/// omission) or, without one, from its start.
pub(crate) fn execute(
    q: &mut (dyn QueryExec + '_),
    scheduled: Option<Instant>,
    issue_delay: Option<Duration>,
) -> Event {
    let start = Instant::now();
    match q.run_request() {
        Ok(generation) => {
            let end = Instant::now();
            let reference = scheduled.unwrap_or(start);
            Event::Done {
                latency: end - reference,
                issue_delay,
                service: end - start,
                end,
                generation: generation
                    .into_iter()
                    .map(|mut g| {
                        g.lead_ns = start.saturating_duration_since(reference).as_nanos() as u64;
                        g
                    })
                    .collect(),
            }
        }
        Err(e) => Event::Failed(e),
    }
}

/// Receives worker events until every worker is done; sets `stop` when the rule says so. It wakes
/// every couple of milliseconds and drains what arrived, rather than waking per query, so that the
/// recording thread does not compete with the workers and the issuer for CPU.
pub(crate) fn collect(
    rx: &crossbeam_channel::Receiver<Event>,
    rec: &mut Recorder<'_>,
    rule: &StopRule,
    stop: &AtomicBool,
    cancel: &AtomicBool,
    mut service: Option<&mut hist::LatencyHistogram>,
) -> Option<RunError> {
    let mut failure = None;
    let tick = Duration::from_millis(2);
    loop {
        std::thread::sleep(tick);
        let disconnected = loop {
            match rx.try_recv() {
                Ok(Event::Done {
                    latency,
                    issue_delay,
                    service: s,
                    end,
                    generation,
                }) => {
                    if let Some(d) = issue_delay {
                        rec.record_issue_delay(d.as_nanos() as u64);
                    }
                    if let Some(h) = service.as_deref_mut() {
                        hist::record_ns(h, s.as_nanos() as u64);
                    }
                    if generation.len() > 1 {
                        // A batch's requests end when their own last token is ready: each is
                        // recorded with its own end-to-end latency, where it completed.
                        let last =
                            |g: &RequestTiming| g.token_ready_ns.last().copied().unwrap_or(0);
                        let batch_end = generation.iter().map(last).max().unwrap_or(0);
                        for g in &generation {
                            let early = Duration::from_nanos(batch_end - last(g));
                            let e2e = latency.saturating_sub(early).as_nanos() as u64;
                            rec.record_request(g, e2e);
                            rec.record(e2e, end - early);
                        }
                    } else {
                        if let Some(g) = generation.first() {
                            rec.record_request(g, latency.as_nanos() as u64);
                        }
                        rec.record(latency.as_nanos() as u64, end);
                    }
                    if !stop.load(Ordering::Relaxed) && rule.done_for(rec, end) {
                        stop.store(true, Ordering::Relaxed);
                    }
                }
                Ok(Event::Dropped) => rec.record_drop(),
                Ok(Event::Failed(e)) => {
                    failure.get_or_insert(e);
                    stop.store(true, Ordering::Relaxed);
                }
                Err(crossbeam_channel::TryRecvError::Empty) => break false,
                Err(crossbeam_channel::TryRecvError::Disconnected) => break true,
            }
        };
        if disconnected {
            return failure;
        }
        let now = Instant::now();
        rec.maybe_close(now);
        if cancel.load(Ordering::Relaxed) || rule.done_for(rec, now) {
            stop.store(true, Ordering::Relaxed);
        }
    }
}

pub(crate) fn finish_or(failure: Option<RunError>, cancel: &AtomicBool) -> Result<(), RunError> {
    check(cancel)?;
    match failure {
        Some(e) => Err(e),
        None => Ok(()),
    }
}
