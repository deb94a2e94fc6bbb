//! Telemetry windows: every query's latency goes into the current window's HDR histogram; a window
//! closes once both its time length and its minimum query count are reached, and is sent with the
//! resource figures sampled over it.

use std::time::{Duration, Instant};

use fleetbench_common::hist::{self, LatencyHistogram};
use fleetbench_proto::v1::TelemetryWindow;

use crate::sampler::Sampler;

/// Collects latencies into windows and hands closed windows to `emit`.
pub struct Recorder<'a> {
    run_id: String,
    /// Start of the timed phase.
    pub t0: Instant,
    window_len: Duration,
    window_min_queries: u64,
    batch: u64,
    seq: u64,
    window_start: Duration,
    window: LatencyHistogram,
    window_queries: u64,
    window_late: u64,
    window_dropped: u64,
    window_delay: LatencyHistogram,
    /// All latencies of the run so far.
    pub total: LatencyHistogram,
    /// Queries completed so far.
    pub queries: u64,
    /// Queries issued late (server scenario).
    pub late: u64,
    /// Queries dropped (server scenario).
    pub dropped: u64,
    /// Throughput (samples/s) of each closed window.
    pub window_throughput: Vec<f64>,
    /// p99 (ns) of each closed window.
    pub window_p99: Vec<f64>,
    total_delay: LatencyHistogram,
    sampler: Option<Sampler>,
    emit: &'a mut dyn FnMut(TelemetryWindow),
}

impl<'a> Recorder<'a> {
    /// Starts the timed phase now.
    pub fn new(
        run_id: &str,
        window_len: Duration,
        window_min_queries: u64,
        batch: u64,
        sampler: Option<Sampler>,
        emit: &'a mut dyn FnMut(TelemetryWindow),
    ) -> Self {
        Self {
            run_id: run_id.to_string(),
            t0: Instant::now(),
            window_len,
            window_min_queries,
            batch,
            seq: 0,
            window_start: Duration::ZERO,
            window: hist::new_histogram(),
            window_queries: 0,
            window_late: 0,
            window_dropped: 0,
            window_delay: hist::new_histogram(),
            total: hist::new_histogram(),
            queries: 0,
            late: 0,
            dropped: 0,
            window_throughput: Vec::new(),
            window_p99: Vec::new(),
            total_delay: hist::new_histogram(),
            sampler,
            emit,
        }
    }

    /// Restarts the clock (after setup that should not count).
    pub fn restart(&mut self) {
        self.t0 = Instant::now();
        if let Some(s) = self.sampler.as_mut() {
            let _ = s.take();
        }
    }

    /// Issue delays of the whole run (server scenario).
    pub fn issue_delays(&self) -> &LatencyHistogram {
        &self.total_delay
    }

    /// Records one completed query; closes the window when due.
    #[inline]
    pub fn record(&mut self, latency_ns: u64, now: Instant) {
        hist::record_ns(&mut self.window, latency_ns);
        hist::record_ns(&mut self.total, latency_ns);
        self.window_queries += 1;
        self.queries += 1;
        self.maybe_close(now);
    }

    /// Records how late a query was issued (server scenario); late beyond 1 ms counts as late.
    pub fn record_issue_delay(&mut self, delay_ns: u64) {
        hist::record_ns(&mut self.window_delay, delay_ns);
        hist::record_ns(&mut self.total_delay, delay_ns);
        if delay_ns > 1_000_000 {
            self.window_late += 1;
            self.late += 1;
        }
    }

    /// Counts a dropped query (server scenario).
    pub fn record_drop(&mut self) {
        self.window_dropped += 1;
        self.dropped += 1;
    }

    /// True when the current window holds nothing yet (one has just closed, or none has opened).
    pub fn at_window_boundary(&self) -> bool {
        self.window_queries == 0 && self.window_dropped == 0
    }

    /// Closes the window if its time and count are both reached.
    #[inline]
    pub fn maybe_close(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.t0);
        // Workers' events can arrive out of order: a query that ended before the window opened
        // belongs to it all the same, and never makes time run backwards.
        if elapsed.saturating_sub(self.window_start) >= self.window_len
            && self.window_queries >= self.window_min_queries
        {
            self.close(elapsed);
        }
    }

    /// Closes the current window at `elapsed` if it holds anything.
    pub fn close(&mut self, elapsed: Duration) {
        if self.window_queries == 0 && self.window_dropped == 0 {
            return;
        }
        let elapsed = elapsed.max(self.window_start);
        let secs = (elapsed - self.window_start).as_secs_f64();
        if secs > 0.0 && self.window_queries > 0 {
            self.window_throughput
                .push(self.window_queries as f64 * self.batch as f64 / secs);
            self.window_p99
                .push(self.window.value_at_quantile(0.99) as f64);
        }
        let w = TelemetryWindow {
            run_id: self.run_id.clone(),
            seq: self.seq,
            start_offset_ns: self.window_start.as_nanos() as u64,
            end_offset_ns: elapsed.as_nanos() as u64,
            queries: self.window_queries,
            samples: self.window_queries * self.batch,
            latency_histogram: hist::encode(&self.window),
            resources: self.sampler.as_mut().map(Sampler::take),
            late_queries: self.window_late,
            dropped_queries: self.window_dropped,
            issue_delay_histogram: if self.window_delay.is_empty() {
                Vec::new()
            } else {
                hist::encode(&self.window_delay)
            },
            closed_at_ms: fleetbench_common::now_ms(),
        };
        (self.emit)(w);
        self.seq += 1;
        self.window_start = elapsed;
        self.window.reset();
        self.window_delay.reset();
        self.window_queries = 0;
        self.window_late = 0;
        self.window_dropped = 0;
    }

    /// Closes the last window; returns (windows sent, timed-phase duration).
    pub fn finish(&mut self) -> (u64, Duration) {
        let elapsed = self.t0.elapsed();
        self.close(elapsed);
        (self.seq, elapsed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_that_arrive_out_of_order_neither_panic_nor_run_time_backwards() {
        let mut windows = Vec::new();
        let mut emit = |w: TelemetryWindow| windows.push(w);
        let mut rec = Recorder::new("r", Duration::from_millis(10), 0, 1, None, &mut emit);
        let t0 = rec.t0;
        rec.record(1_000, t0 + Duration::from_millis(30));
        // A worker's event that ended earlier than the window just closed.
        rec.record(1_000, t0 + Duration::from_millis(5));
        rec.close(Duration::from_millis(20));
        rec.record(1_000, t0 + Duration::from_millis(50));
        rec.finish();
        drop(rec);
        assert_eq!(windows.iter().map(|w| w.queries).sum::<u64>(), 3);
        for pair in windows.windows(2) {
            assert!(
                pair[0].end_offset_ns <= pair[1].start_offset_ns,
                "{windows:?}"
            );
        }
        for w in &windows {
            assert!(w.start_offset_ns <= w.end_offset_ns, "{w:?}");
        }
    }
}
