//! Load patterns. Each drives queries through a session and records latencies into the recorder.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use fleetbench_common::hist::is_stable;
use fleetbench_proto::v1::RunConfig;
use ort::session::{Session, SessionInputValue};
use ort::value::DynValue;

use super::RunError;
use super::recorder::Recorder;

/// When a timed phase ends.
#[derive(Debug, Clone, Copy)]
pub struct StopRule {
    /// Exact number of queries (0: bounded by time instead).
    pub iterations: u64,
    /// Planned duration (0: none).
    pub duration: Duration,
    /// Hard limit (0: none).
    pub max_duration: Duration,
    /// Stop once valid and stable.
    pub early_stop: bool,
    /// Minimum queries for validity.
    pub min_queries: u64,
    /// Minimum duration for validity.
    pub min_duration: Duration,
    /// Stability window count.
    pub stability_windows: usize,
    /// Stability max/min ratio.
    pub stability_ratio: f64,
}

impl StopRule {
    /// From a configuration.
    pub fn from_config(c: &RunConfig) -> Self {
        Self {
            iterations: c.iterations,
            duration: Duration::from_millis(c.duration_ms),
            max_duration: Duration::from_millis(c.max_duration_ms),
            early_stop: c.early_stop,
            min_queries: c.min_queries,
            min_duration: Duration::from_millis(c.min_duration_ms),
            stability_windows: c.stability_windows as usize,
            stability_ratio: c.stability_ratio,
        }
    }

    /// True when the run should stop after `queries` at `elapsed`.
    pub fn done(&self, queries: u64, elapsed: Duration, rec: &Recorder<'_>) -> bool {
        if self.iterations > 0 {
            return queries >= self.iterations;
        }
        if !self.max_duration.is_zero() && elapsed >= self.max_duration {
            return true;
        }
        if self.early_stop
            && queries >= self.min_queries
            && elapsed >= self.min_duration
            && is_stable(
                &rec.window_throughput,
                self.stability_windows,
                self.stability_ratio,
            )
            && is_stable(
                &rec.window_p99,
                self.stability_windows,
                self.stability_ratio,
            )
        {
            return true;
        }
        !self.duration.is_zero() && elapsed >= self.duration
    }
}

/// Runs untimed queries.
pub fn warm_up(
    session: &mut Session,
    views: &[SessionInputValue<'_>],
    n: u64,
    cancel: &AtomicBool,
) -> Result<(), RunError> {
    for _ in 0..n {
        if cancel.load(Ordering::Relaxed) {
            return Err(RunError::Cancelled);
        }
        session.run(views)?;
    }
    Ok(())
}

/// Single-stream: one query at a time, the next issued when the previous completes.
pub fn single_stream(
    session: &mut Session,
    values: &[DynValue],
    c: &RunConfig,
    rec: &mut Recorder<'_>,
    cancel: &AtomicBool,
) -> Result<serde_json::Value, RunError> {
    let views: Vec<SessionInputValue<'_>> = values.iter().map(Into::into).collect();
    warm_up(session, &views, c.warmup_iterations, cancel)?;
    let rule = StopRule::from_config(c);
    rec.restart();
    loop {
        if cancel.load(Ordering::Relaxed) {
            return Err(RunError::Cancelled);
        }
        let start = Instant::now();
        drop(session.run(views.as_slice())?);
        let end = Instant::now();
        rec.record(end.duration_since(start).as_nanos() as u64, end);
        if rule.done(rec.queries, end.duration_since(rec.t0), rec) {
            break;
        }
    }
    Ok(serde_json::json!({ "scenario": "single-stream" }))
}
