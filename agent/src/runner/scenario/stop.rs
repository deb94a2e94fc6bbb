//! When a timed phase ends, as in MLPerf LoadGen, where the minimums decide how long a run lasts:
//! `iterations` is an exact count; without it the phase lasts until the planned duration (if any), the
//! minimum duration and the minimum query count all hold — or, with early stop, as soon as the
//! minimums hold and the last windows are stable — capped by the maximum duration.

use std::time::{Duration, Instant};

use fleetbench_common::domain::RunConfig;
use fleetbench_common::hist::is_stable;

use crate::runner::recorder::Recorder;

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
    /// Queries (generate: requests) one call of an executor completes: a static batch's size.
    pub per_call: u64,
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
            per_call: if c.scenario == fleetbench_common::domain::Scenario::Generate {
                u64::from(c.batch_size.max(1))
            } else {
                1
            },
        }
    }

    /// True when the run should stop after `queries` at `elapsed`, given the windows so far.
    pub fn done(
        &self,
        queries: u64,
        elapsed: Duration,
        window_throughput: &[f64],
        window_p99: &[f64],
    ) -> bool {
        if !self.max_duration.is_zero() && elapsed >= self.max_duration {
            return true;
        }
        if self.iterations > 0 {
            return queries >= self.iterations;
        }
        if queries < self.min_queries.max(1) || elapsed < self.min_duration {
            return false;
        }
        if self.early_stop
            && is_stable(
                window_throughput,
                self.stability_windows,
                self.stability_ratio,
            )
            && is_stable(window_p99, self.stability_windows, self.stability_ratio)
        {
            return true;
        }
        elapsed >= self.duration
    }

    /// As [`StopRule::done`], for a recorder. Early stop is decided only where a window has just
    /// closed: stability is judged on whole windows, and a stop in mid-window would leave a short
    /// last window that the coordinator, judging the same windows, could find unstable.
    pub(crate) fn done_for(&self, rec: &Recorder<'_>, now: Instant) -> bool {
        let rule = if rec.at_window_boundary() {
            *self
        } else {
            StopRule {
                early_stop: false,
                ..*self
            }
        };
        rule.done(
            rec.queries,
            now.saturating_duration_since(rec.t0),
            &rec.window_throughput,
            &rec.window_p99,
        )
    }
}

#[cfg(test)]
mod tests {
    use fleetbench_proto::v1::TelemetryWindow;

    use super::*;

    #[test]
    fn stop_rules() {
        let c = RunConfig {
            iterations: 10,
            ..Default::default()
        };
        let r = StopRule::from_config(&c);
        assert!(!r.done(9, Duration::from_secs(100), &[], &[]));
        assert!(r.done(10, Duration::ZERO, &[], &[]));
        let c = RunConfig {
            duration_ms: 10_000,
            early_stop: true,
            min_queries: 100,
            min_duration_ms: 1000,
            stability_windows: 3,
            stability_ratio: 1.1,
            ..Default::default()
        };
        let r = StopRule::from_config(&c);
        let stable = [100.0, 101.0, 102.0];
        assert!(
            !r.done(50, Duration::from_secs(2), &stable, &stable),
            "too few queries"
        );
        assert!(
            !r.done(500, Duration::from_millis(500), &stable, &stable),
            "too short"
        );
        assert!(
            !r.done(500, Duration::from_secs(2), &[100.0, 150.0, 100.0], &stable),
            "unstable"
        );
        assert!(
            r.done(500, Duration::from_secs(2), &stable, &stable),
            "valid and stable"
        );
        assert!(
            r.done(500, Duration::from_secs(10), &[], &[]),
            "planned duration reached"
        );
        assert!(
            !r.done(1, Duration::from_secs(10), &[], &[]),
            "planned duration reached, but not the minimum query count"
        );
        let hard = StopRule::from_config(&RunConfig {
            iterations: 1_000_000,
            max_duration_ms: 100,
            ..Default::default()
        });
        assert!(
            hard.done(5, Duration::from_millis(150), &[], &[]),
            "max duration caps iterations"
        );
        // The minimums lengthen a run: a planned 2 s with a 10 s minimum lasts 10 s, and then until
        // 1000 queries completed.
        let lengthened = StopRule::from_config(&RunConfig {
            duration_ms: 2_000,
            min_duration_ms: 10_000,
            min_queries: 1000,
            ..Default::default()
        });
        assert!(!lengthened.done(5000, Duration::from_secs(5), &[], &[]));
        assert!(!lengthened.done(999, Duration::from_secs(11), &[], &[]));
        assert!(lengthened.done(1000, Duration::from_secs(11), &[], &[]));
        let minimums_only = StopRule::from_config(&RunConfig {
            min_duration_ms: 3_000,
            ..Default::default()
        });
        assert!(!minimums_only.done(100_000, Duration::from_millis(14), &[], &[]));
        assert!(minimums_only.done(100_000, Duration::from_secs(3), &[], &[]));
    }

    #[test]
    fn early_stop_waits_for_the_window_to_close_so_no_short_window_follows() {
        let rule = StopRule::from_config(&RunConfig {
            duration_ms: 10_000,
            early_stop: true,
            min_queries: 10,
            min_duration_ms: 35,
            stability_windows: 3,
            stability_ratio: 1.1,
            ..Default::default()
        });
        let mut sent = Vec::new();
        let mut emit = |w: TelemetryWindow| sent.push(w);
        let mut rec = Recorder::new("r", Duration::from_millis(10), 0, 1, None, &mut emit);
        let t0 = rec.t0;
        let mut stopped_at = None;
        // One query every millisecond, all alike: three whole, stable windows by 30 ms; the
        // minimum duration holds from 35 ms, in the middle of the fourth window.
        for ms in 1..=100u64 {
            let now = t0 + Duration::from_millis(ms);
            rec.record(100_000, now);
            if rule.done_for(&rec, now) {
                stopped_at = Some(ms);
                break;
            }
        }
        assert_eq!(
            stopped_at,
            Some(40),
            "early stop is decided when a window closes, not mid-window"
        );
        rec.close(Duration::from_millis(40));
        drop(rec);
        assert_eq!(sent.len(), 4);
        assert!(
            sent.iter().all(|w| w.queries == 10),
            "no short last window: {:?}",
            sent.iter().map(|w| w.queries).collect::<Vec<_>>()
        );
    }
}
