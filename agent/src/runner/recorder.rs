//! Telemetry windows: every query's latency goes into the current window's HDR histogram; a window
//! closes once both its time length and its minimum query count are reached, and is sent with the
//! resource figures sampled over it.

use std::time::{Duration, Instant};

use fleetbench_common::hist::{self, LatencyHistogram};
use fleetbench_proto::v1::{GenerationWindow, TelemetryWindow};

use super::scenario::RequestTiming;
use crate::sampler::Sampler;

/// Token figures of generate requests: per window (sent with it) and over the run.
pub struct TokenRecorder {
    /// SLO bounds in ns: time to first token, time per output token, end to end; 0 = not a term.
    slo_ns: [u64; 3],
    ttft: LatencyHistogram,
    tpot: LatencyHistogram,
    itl: LatencyHistogram,
    prompt_tokens: u64,
    output_tokens: u64,
    good: u64,
    /// TTFT of the whole run.
    pub total_ttft: LatencyHistogram,
    /// TPOT of the whole run.
    pub total_tpot: LatencyHistogram,
    /// Prompt tokens of the whole run.
    pub total_prompt_tokens: u64,
    /// Output tokens of the whole run.
    pub total_output_tokens: u64,
    /// Requests of the whole run that met every SLO term.
    pub total_good: u64,
}

impl TokenRecorder {
    /// A recorder judging requests by SLO bounds in ms (0: not a term).
    pub fn new(slo_ttft_ms: f64, slo_tpot_ms: f64, slo_e2e_ms: f64) -> Self {
        let ns = |ms: f64| (ms.max(0.0) * 1e6).round() as u64;
        Self {
            slo_ns: [ns(slo_ttft_ms), ns(slo_tpot_ms), ns(slo_e2e_ms)],
            ttft: hist::new_histogram(),
            tpot: hist::new_histogram(),
            itl: hist::new_histogram(),
            prompt_tokens: 0,
            output_tokens: 0,
            good: 0,
            total_ttft: hist::new_histogram(),
            total_tpot: hist::new_histogram(),
            total_prompt_tokens: 0,
            total_output_tokens: 0,
            total_good: 0,
        }
    }

    fn record(&mut self, t: &RequestTiming, e2e_ns: u64) {
        let Some(&first) = t.token_ready_ns.first() else {
            return;
        };
        let ttft = (t.lead_ns + first).min(e2e_ns);
        hist::record_ns(&mut self.ttft, ttft);
        hist::record_ns(&mut self.total_ttft, ttft);
        let n = t.token_ready_ns.len() as u64;
        // TPOT = (E2E - TTFT) / (tokens - 1); a request of one token has none.
        let tpot = (n > 1).then(|| e2e_ns.saturating_sub(ttft) / (n - 1));
        if let Some(tpot) = tpot {
            hist::record_ns(&mut self.tpot, tpot);
            hist::record_ns(&mut self.total_tpot, tpot);
        }
        for gap in t.token_ready_ns.windows(2) {
            hist::record_ns(&mut self.itl, gap[1].saturating_sub(gap[0]));
        }
        let within = |bound: u64, v: Option<u64>| bound == 0 || v.is_none_or(|v| v <= bound);
        let good = within(self.slo_ns[0], Some(ttft))
            && within(self.slo_ns[1], tpot)
            && within(self.slo_ns[2], Some(e2e_ns));
        self.prompt_tokens += u64::from(t.prompt_tokens);
        self.output_tokens += n;
        self.good += u64::from(good);
        self.total_prompt_tokens += u64::from(t.prompt_tokens);
        self.total_output_tokens += n;
        self.total_good += u64::from(good);
    }

    fn take_window(&mut self) -> GenerationWindow {
        let encode = |h: &mut LatencyHistogram| {
            let bytes = if h.is_empty() {
                Vec::new()
            } else {
                hist::encode(h)
            };
            h.reset();
            bytes
        };
        let w = GenerationWindow {
            ttft_histogram: encode(&mut self.ttft),
            tpot_histogram: encode(&mut self.tpot),
            itl_histogram: encode(&mut self.itl),
            prompt_tokens: self.prompt_tokens,
            output_tokens: self.output_tokens,
            good_requests: self.good,
        };
        self.prompt_tokens = 0;
        self.output_tokens = 0;
        self.good = 0;
        w
    }
}

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
    /// Generate runs: the token figures.
    pub tokens: Option<TokenRecorder>,
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
            tokens: None,
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

    /// Records the token figures of one generate request that took `e2e_ns` end to end; call it
    /// before [`Recorder::record`] for the same request, which may close the window.
    pub fn record_request(&mut self, t: &RequestTiming, e2e_ns: u64) {
        if let Some(tokens) = self.tokens.as_mut() {
            tokens.record(t, e2e_ns);
        }
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
            generation: self.tokens.as_mut().map(TokenRecorder::take_window),
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
