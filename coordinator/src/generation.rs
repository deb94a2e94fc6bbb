//! Token figures of generate runs: the windows' TTFT, TPOT and ITL histograms merged exactly (for a
//! run, or for the runs pooled into a ranking row), token and request rates over the timed phase,
//! goodput, cost per million output tokens, and the SLO verdict (MLPerf's rule: the p99s must meet
//! every term).

use fleetbench_common::hist::{self, LatencyHistogram};

use crate::domain::{GenerateConfig, GenerationSummary, WindowGeneration};
use crate::error::Result;

/// Sums of token figures, merged from windows or from run summaries.
pub struct TokenTotals {
    ttft: LatencyHistogram,
    tpot: LatencyHistogram,
    itl: LatencyHistogram,
    prompt_tokens: u64,
    output_tokens: u64,
    good_requests: u64,
}

impl Default for TokenTotals {
    fn default() -> Self {
        Self {
            ttft: hist::new_histogram(),
            tpot: hist::new_histogram(),
            itl: hist::new_histogram(),
            prompt_tokens: 0,
            output_tokens: 0,
            good_requests: 0,
        }
    }
}

fn merge_bytes(into: &mut LatencyHistogram, bytes: &[u8]) -> Result<()> {
    if !bytes.is_empty() {
        hist::merge(into, &hist::decode(bytes)?)?;
    }
    Ok(())
}

impl TokenTotals {
    /// Adds one window's (or one run's merged) figures.
    pub fn add(&mut self, g: &WindowGeneration) -> Result<()> {
        merge_bytes(&mut self.ttft, &g.ttft_histogram)?;
        merge_bytes(&mut self.tpot, &g.tpot_histogram)?;
        merge_bytes(&mut self.itl, &g.itl_histogram)?;
        self.prompt_tokens += g.prompt_tokens;
        self.output_tokens += g.output_tokens;
        self.good_requests += g.good_requests;
        Ok(())
    }

    /// The summary of `requests` completed over `seconds`, with the KV bytes per token and the
    /// platform's hourly cost.
    pub fn summary(
        &self,
        requests: u64,
        seconds: f64,
        kv_bytes_per_token: u64,
        cost_per_hour: Option<f64>,
    ) -> GenerationSummary {
        let rate = |n: u64| {
            if seconds > 0.0 {
                n as f64 / seconds
            } else {
                0.0
            }
        };
        let output_tokens_per_s = rate(self.output_tokens);
        let encode = |h: &LatencyHistogram| {
            if h.is_empty() {
                Vec::new()
            } else {
                hist::encode(h)
            }
        };
        GenerationSummary {
            ttft: hist::stats(&self.ttft).to_ms(),
            tpot: hist::stats(&self.tpot).to_ms(),
            itl: hist::stats(&self.itl).to_ms(),
            requests,
            prompt_tokens: self.prompt_tokens,
            output_tokens: self.output_tokens,
            output_tokens_per_s,
            prompt_tokens_per_s: rate(self.prompt_tokens),
            requests_per_s: rate(requests),
            goodput_per_s: rate(self.good_requests),
            good_requests: self.good_requests,
            kv_bytes_per_token,
            cost_per_million_tokens: cost_per_hour
                .filter(|_| output_tokens_per_s > 0.0)
                .map(|c| c / (output_tokens_per_s * 3600.0) * 1e6),
            histograms: WindowGeneration {
                ttft_histogram: encode(&self.ttft),
                tpot_histogram: encode(&self.tpot),
                itl_histogram: encode(&self.itl),
                prompt_tokens: self.prompt_tokens,
                output_tokens: self.output_tokens,
                good_requests: self.good_requests,
            },
            output_tokens_ci_per_s: None,
            goodput_ci_per_s: None,
        }
    }
}

/// The SLO terms whose p99 a run missed, as reasons; empty when it met them all (or has no SLO).
pub fn slo_misses(g: &GenerateConfig, s: &GenerationSummary, e2e_p99_ms: f64) -> Vec<String> {
    [
        ("ttft", s.ttft.p99_ms, g.slo_ttft_ms),
        ("tpot", s.tpot.p99_ms, g.slo_tpot_ms),
        ("e2e", e2e_p99_ms, g.slo_e2e_ms),
    ]
    .iter()
    .filter(|(_, p99, bound)| *bound > 0.0 && p99 > bound)
    .map(|(name, p99, bound)| format!("p99 {name} {p99:.3} ms > SLO {bound} ms"))
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn window(ttft_ms: &[u64], tpot_ms: &[u64], good: u64) -> WindowGeneration {
        let h = |v: &[u64]| {
            let mut h = hist::new_histogram();
            for ms in v {
                hist::record_ns(&mut h, ms * 1_000_000);
            }
            hist::encode(&h)
        };
        WindowGeneration {
            ttft_histogram: h(ttft_ms),
            tpot_histogram: h(tpot_ms),
            itl_histogram: h(tpot_ms),
            prompt_tokens: 100 * ttft_ms.len() as u64,
            output_tokens: 10 * ttft_ms.len() as u64,
            good_requests: good,
        }
    }

    #[test]
    fn windows_merge_exactly_and_rates_and_cost_follow_the_tokens() {
        let mut t = TokenTotals::default();
        t.add(&window(&[10, 20], &[2, 3], 2)).unwrap();
        t.add(&window(&[400], &[90], 0)).unwrap();
        let s = t.summary(3, 2.0, 4096, Some(3.6));
        assert_eq!((s.requests, s.output_tokens, s.prompt_tokens), (3, 30, 300));
        assert!((s.output_tokens_per_s - 15.0).abs() < 1e-9);
        assert!((s.goodput_per_s - 1.0).abs() < 1e-9);
        assert!((s.ttft.max_ms - 400.0).abs() < 1.0, "{:?}", s.ttft);
        // 3.6 per hour at 15 tokens/s: 3.6 / 54000 tokens * 1e6.
        assert!((s.cost_per_million_tokens.unwrap() - 3.6 / 54_000.0 * 1e6).abs() < 1e-6);
        // Pooling the run's own histograms again gives the same figures.
        let mut again = TokenTotals::default();
        again.add(&s.histograms).unwrap();
        assert_eq!(again.summary(3, 2.0, 4096, Some(3.6)), s);
    }

    #[test]
    fn the_slo_is_judged_on_the_p99s_of_its_terms() {
        let mut t = TokenTotals::default();
        t.add(&window(&[10, 20, 400], &[2, 3, 90], 2)).unwrap();
        let s = t.summary(3, 1.0, 0, None);
        let slo = |ttft, tpot, e2e| GenerateConfig {
            slo_ttft_ms: ttft,
            slo_tpot_ms: tpot,
            slo_e2e_ms: e2e,
            ..Default::default()
        };
        assert!(slo_misses(&slo(0.0, 0.0, 0.0), &s, 1e9).is_empty());
        assert!(slo_misses(&slo(500.0, 100.0, 0.0), &s, 1e9).is_empty());
        let m = slo_misses(&slo(100.0, 50.0, 600.0), &s, 700.0);
        assert_eq!(m.len(), 3, "{m:?}");
        assert!(
            m[0].starts_with("p99 ttft") && m[0].contains("> SLO 100 ms"),
            "{m:?}"
        );
    }
}
