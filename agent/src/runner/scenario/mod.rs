//! Load patterns, after MLPerf LoadGen's scenarios. Each drives queries through one or more
//! [`QueryExec`]s (an ONNX Runtime session with its inputs, or a test double) and records every
//! query's latency in the [`Recorder`].
//!
//! - single-stream: one query at a time; the next is issued when the previous completes.
//! - offline: `concurrency` sessions on their own threads, each issuing as fast as it can.
//! - server: Poisson arrivals at a target QPS from a schedule generated in advance from a seed, issued
//!   by a dedicated thread with sub-millisecond precision; a query's latency runs from its *scheduled*
//!   time, so a model that falls behind cannot hide its queueing (no coordinated omission). Queries that
//!   would exceed `max_outstanding` are dropped and counted.
//! - max-qps: bisection over short server runs for the highest QPS whose p99 meets the latency bound,
//!   then a server run at that QPS whose windows are the run's telemetry.
//!
//! Layout: [`stop`] (when a timed phase ends), [`collect`] (workers' events into the recorder),
//! [`offline`], [`server`] (schedule and issuer), [`max_qps`]; single-stream and warm-up live here.

mod collect;
mod max_qps;
mod offline;
mod server;
mod stop;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use fleetbench_common::domain::RunConfig;
use ort::session::{Session, SessionInputValue};
use ort::value::DynValue;
use serde_json::json;

use super::RunError;
use super::recorder::Recorder;

pub use max_qps::{Found, Target, final_config, find_rate, max_qps};
pub use offline::offline;
pub use server::{ServerStats, poisson_schedule, server, server_run};
pub use stop::StopRule;

/// One query's worth of work.
pub trait QueryExec: Send {
    /// Runs one query to completion.
    fn run(&mut self) -> Result<(), RunError>;

    /// Runs one query; a generate query also returns, for each of its requests (one, or a static
    /// batch), when each of its tokens was ready.
    fn run_request(&mut self) -> Result<Vec<RequestTiming>, RunError> {
        self.run().map(|()| Vec::new())
    }
}

/// When the tokens of one generate request were ready.
#[derive(Debug, Clone, Default)]
pub struct RequestTiming {
    /// Prompt tokens of the request.
    pub prompt_tokens: u32,
    /// Nanoseconds from the start of the request's first call to each output token.
    pub token_ready_ns: Vec<u64>,
    /// Nanoseconds from the request's reference time (its scheduled arrival in an open loop) to the
    /// start of its first call: the time it waited. TTFT counts it.
    pub lead_ns: u64,
}

/// An ONNX Runtime session with the inputs of one query.
pub struct OrtQuery<'a> {
    /// The session.
    pub session: &'a mut Session,
    /// Its inputs, in the session's input order.
    pub values: &'a [DynValue],
}

impl QueryExec for OrtQuery<'_> {
    #[inline]
    fn run(&mut self) -> Result<(), RunError> {
        let views: Vec<SessionInputValue<'_>> = self.values.iter().map(Into::into).collect();
        drop(self.session.run(views.as_slice())?);
        Ok(())
    }
}

pub(crate) fn check(cancel: &AtomicBool) -> Result<(), RunError> {
    if cancel.load(Ordering::Relaxed) {
        Err(RunError::Cancelled)
    } else {
        Ok(())
    }
}

/// Runs `n` untimed queries on each executor.
pub fn warm_up(
    execs: &mut [Box<dyn QueryExec + '_>],
    n: u64,
    cancel: &AtomicBool,
) -> Result<(), RunError> {
    for q in execs.iter_mut() {
        for _ in 0..n {
            check(cancel)?;
            q.run()?;
        }
    }
    Ok(())
}

/// Single-stream: one query at a time.
pub fn single_stream(
    q: &mut dyn QueryExec,
    c: &RunConfig,
    rec: &mut Recorder<'_>,
    cancel: &AtomicBool,
) -> Result<serde_json::Value, RunError> {
    let rule = StopRule::from_config(c);
    rec.restart();
    loop {
        check(cancel)?;
        let start = Instant::now();
        q.run()?;
        let end = Instant::now();
        rec.record(end.duration_since(start).as_nanos() as u64, end);
        if rule.done_for(rec, end) {
            break;
        }
    }
    Ok(json!({ "scenario": "single-stream" }))
}

#[cfg(test)]
pub(crate) mod testing {
    use std::time::Duration;

    use super::{QueryExec, RunError};

    /// A model that takes a fixed time per query. It sleeps rather than spins, so that tests running
    /// side by side on a small machine do not starve each other.
    pub struct Fixed(pub Duration);

    impl QueryExec for Fixed {
        fn run(&mut self) -> Result<(), RunError> {
            std::thread::sleep(self.0);
            Ok(())
        }
    }

    /// Timing tests take turns.
    static TIMING: std::sync::Mutex<()> = std::sync::Mutex::new(());

    /// Holds the timing lock for the test's duration.
    pub fn timing() -> std::sync::MutexGuard<'static, ()> {
        TIMING.lock().unwrap_or_else(|e| e.into_inner())
    }
}
