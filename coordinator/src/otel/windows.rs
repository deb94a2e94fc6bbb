//! From stored telemetry windows to measurements. Ingest hands each stored window to [`Recorder`]
//! without waiting; a task of its own looks up the run's labels (once per run), re-buckets the
//! window's HDR histograms and records them on instruments bound to the run's attributes.
//!
//! Re-bucketing: each recorded HDR bucket's count is recorded at that bucket's midpoint. HDR buckets
//! here are at most 0.1 % wide (3 significant digits), so a count lands in a neighbouring 1-2-5 bucket
//! only when its latency was within 0.1 % of the edge between them; counts and sums are exact to that
//! precision.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{
    BoundCounter, BoundGauge, BoundHistogram, Counter, Gauge, Histogram, Meter,
};
use tokio::sync::mpsc;

use super::latency_bounds;
use crate::context::Context;
use crate::domain::Window;

/// Instruments fed from windows.
#[derive(Clone)]
pub struct WindowInstruments {
    latency: Histogram<f64>,
    queries: Counter<u64>,
    samples: Counter<u64>,
    cpu: Gauge<f64>,
    rss: Gauge<u64>,
    rss_peak: Gauge<u64>,
    ttft: Histogram<f64>,
    tpot: Histogram<f64>,
    tokens: Counter<u64>,
    requests_good: Counter<u64>,
    accuracy: Gauge<f64>,
}

impl WindowInstruments {
    /// The instruments, on `meter`.
    pub fn new(meter: &Meter) -> Self {
        let seconds = |name: &'static str, description: &'static str| {
            meter
                .f64_histogram(name)
                .with_unit("s")
                .with_description(description)
                .with_boundaries(latency_bounds())
                .build()
        };
        Self {
            latency: seconds(
                "fleetbench.inference.latency",
                "Latency of one query (one call of the model, or one request of a generate run from \
                 arrival to last token).",
            ),
            queries: meter
                .u64_counter("fleetbench.inference.queries")
                .with_unit("{query}")
                .with_description("Queries completed.")
                .build(),
            samples: meter
                .u64_counter("fleetbench.inference.samples")
                .with_unit("{sample}")
                .with_description("Samples completed (queries times batch size).")
                .build(),
            cpu: meter
                .f64_gauge("process.cpu.utilization")
                .with_unit("1")
                .with_description(
                    "CPU time of the agent process running the model during its last window, as a \
                     fraction of one CPU, by cpu.mode.",
                )
                .build(),
            rss: meter
                .u64_gauge("process.memory.usage")
                .with_unit("By")
                .with_description("Mean resident set size of the agent process during its last window.")
                .build(),
            rss_peak: meter
                .u64_gauge("fleetbench.process.memory.peak")
                .with_unit("By")
                .with_description("Peak resident set size of the agent process during its last window.")
                .build(),
            ttft: seconds(
                "gen_ai.server.time_to_first_token",
                "Time to first token of a generate request.",
            ),
            tpot: seconds(
                "gen_ai.server.time_per_output_token",
                "Time per output token after the first, of a generate request.",
            ),
            tokens: meter
                .u64_counter("fleetbench.generation.tokens")
                .with_unit("{token}")
                .with_description("Tokens of completed generate requests, by gen_ai.token.type (input or output).")
                .build(),
            requests_good: meter
                .u64_counter("fleetbench.generation.requests.good")
                .with_unit("{request}")
                .with_description("Generate requests that met every SLO term of their run.")
                .build(),
            accuracy: meter
                .f64_gauge("fleetbench.run.accuracy")
                .with_unit("1")
                .with_description("Top-1 accuracy of the last finished run on the eval set.")
                .build(),
        }
    }
}

/// What the recorder is told. Windows are nearly every event, so they are kept inline (no allocation
/// per window).
#[allow(clippy::large_enum_variant)]
pub enum Event {
    /// A window was stored.
    Stored(Window),
    /// A run ended, with its accuracy when it measured one: its series are no longer needed here.
    RunEnded {
        /// The run.
        run_id: String,
        /// Its top-1 accuracy.
        accuracy: Option<f64>,
    },
}

/// The sending side: never waits.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Event>,
}

/// How many events may wait for the recorder.
const QUEUE: usize = 65_536;

impl Recorder {
    /// A recorder and the receiver its task reads.
    pub fn new() -> (Self, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (Self { tx }, rx)
    }

    /// Hands a stored window over; false when the recorder is behind (the window stays stored, its
    /// measurements are dropped and counted).
    pub fn stored(&self, w: Window) -> bool {
        self.tx.try_send(Event::Stored(w)).is_ok()
    }

    /// Says a run ended, with the accuracy it measured.
    pub fn run_ended(&self, run_id: &str, accuracy: Option<f64>) {
        let _ = self.tx.try_send(Event::RunEnded {
            run_id: run_id.to_string(),
            accuracy,
        });
    }
}

/// Instruments bound to one run's attributes.
struct Series {
    latency: BoundHistogram<f64>,
    queries: BoundCounter<u64>,
    samples: BoundCounter<u64>,
    cpu_user: BoundGauge<f64>,
    cpu_system: BoundGauge<f64>,
    rss: BoundGauge<u64>,
    rss_peak: BoundGauge<u64>,
    ttft: BoundHistogram<f64>,
    tpot: BoundHistogram<f64>,
    tokens_in: BoundCounter<u64>,
    tokens_out: BoundCounter<u64>,
    good: BoundCounter<u64>,
    accuracy: BoundGauge<f64>,
}

impl Series {
    fn bind(i: &WindowInstruments, attrs: &[KeyValue]) -> Self {
        let with = |k: &'static str, v: &'static str| {
            let mut a = attrs.to_vec();
            a.push(KeyValue::new(k, v));
            a
        };
        Self {
            latency: i.latency.bind(attrs),
            queries: i.queries.bind(attrs),
            samples: i.samples.bind(attrs),
            cpu_user: i.cpu.bind(&with("cpu.mode", "user")),
            cpu_system: i.cpu.bind(&with("cpu.mode", "system")),
            rss: i.rss.bind(attrs),
            rss_peak: i.rss_peak.bind(attrs),
            ttft: i.ttft.bind(attrs),
            tpot: i.tpot.bind(attrs),
            tokens_in: i.tokens.bind(&with("gen_ai.token.type", "input")),
            tokens_out: i.tokens.bind(&with("gen_ai.token.type", "output")),
            good: i.requests_good.bind(attrs),
            accuracy: i.accuracy.bind(attrs),
        }
    }

    fn record(&self, w: &Window) {
        self.queries.add(w.queries);
        self.samples.add(w.samples);
        rebucket(&w.latency_histogram, |v| self.latency.record(v));
        if let Some(r) = &w.resources {
            self.cpu_user.record(r.process_cpu_user_pct / 100.0);
            self.cpu_system.record(r.process_cpu_system_pct / 100.0);
            self.rss.record(r.rss_mean_bytes);
            self.rss_peak.record(r.rss_peak_bytes);
        }
        if let Some(g) = &w.generation {
            rebucket(&g.ttft_histogram, |v| self.ttft.record(v));
            rebucket(&g.tpot_histogram, |v| self.tpot.record(v));
            self.tokens_in.add(g.prompt_tokens);
            self.tokens_out.add(g.output_tokens);
            self.good.add(g.good_requests);
        }
    }
}

/// Calls `record` once per value in an HDR histogram (ns), in seconds, at its bucket's midpoint. The
/// encoding is read directly (no counts array is built), so the cost is the records themselves.
pub fn rebucket(hdr: &[u8], mut record: impl FnMut(f64)) {
    let _ = fleetbench_common::hist::for_each_recorded(hdr, |midpoint_ns, count| {
        let seconds = midpoint_ns as f64 / 1e9;
        for _ in 0..count {
            record(seconds);
        }
    });
}

/// Configuration labels seen so far, up to a cap; later ones become `other`.
struct ConfigLabels {
    seen: HashSet<String>,
    max: usize,
}

impl ConfigLabels {
    fn label(&mut self, label: String) -> String {
        if self.seen.contains(&label) {
            return label;
        }
        if self.seen.len() < self.max {
            self.seen.insert(label.clone());
            return label;
        }
        "other".to_string()
    }
}

/// Most runs whose series are kept at once; beyond it the cache starts again (series rebind).
const MAX_RUNS: usize = 4096;

/// The recorder task: records each stored window on its run's series until the channel closes.
pub async fn run(ctx: Arc<Context>, mut rx: mpsc::Receiver<Event>) {
    let mut runs: HashMap<String, Option<Series>> = HashMap::new();
    let mut configs = ConfigLabels {
        seen: HashSet::new(),
        max: ctx.config.metrics_max_configs,
    };
    while let Some(event) = rx.recv().await {
        let w = match event {
            Event::Stored(w) => w,
            Event::RunEnded { run_id, accuracy } => {
                if let (Some(Some(s)), Some(a)) = (runs.remove(&run_id), accuracy) {
                    s.accuracy.record(a);
                }
                continue;
            }
        };
        if !runs.contains_key(&w.run_id) {
            if runs.len() >= MAX_RUNS {
                runs.clear();
            }
            let labels = ctx
                .telemetry
                .inst
                .store_op("run_labels", ctx.store.run_labels(&w.run_id))
                .await;
            let series = match labels {
                Ok(Some(l)) => {
                    let attrs = [
                        KeyValue::new("model", l.model),
                        KeyValue::new("variant", l.variant),
                        KeyValue::new("platform", l.platform),
                        KeyValue::new("agent", l.agent),
                        KeyValue::new("scenario", l.scenario),
                        KeyValue::new("config", configs.label(l.config)),
                    ];
                    Some(Series::bind(&ctx.telemetry.windows, &attrs))
                }
                Ok(None) => None,
                Err(e) => {
                    tracing::debug!(run = %w.run_id, error = %e, "Could not read a run's labels; its window is not measured.");
                    ctx.telemetry.inst.dropped.add(1, &[]);
                    continue;
                }
            };
            runs.insert(w.run_id.clone(), series);
        }
        if let Some(Some(s)) = runs.get(&w.run_id) {
            s.record(&w);
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn rebucketing_keeps_every_count_and_the_sum_within_hdr_precision() {
        let mut h = fleetbench_common::hist::new_histogram();
        let values = [
            1_000u64, 1_999, 2_000, 2_001, 4_999_000, 5_000_000, 7_777_777,
        ];
        for v in values {
            h.record_n(v, 3).unwrap();
        }
        let bytes = fleetbench_common::hist::encode(&h);
        let mut seen = Vec::new();
        super::rebucket(&bytes, |s| seen.push(s));
        assert_eq!(seen.len(), values.len() * 3);
        let sum: f64 = seen.iter().sum();
        let want: f64 = values.iter().map(|&v| v as f64 * 3.0 / 1e9).sum();
        assert!((sum - want).abs() / want < 1e-3, "{sum} vs {want}");
        // Values below 2048 ns are exact in HDR, so the 1-2-5 edges at 1 and 2 µs are kept.
        assert_eq!(seen.iter().filter(|&&s| s <= 2e-6).count(), 9);
    }
}
