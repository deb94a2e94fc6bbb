//! From stored telemetry windows to measurements. Ingest hands each stored window to [`Recorder`]
//! without waiting; a task of its own looks up the run's labels (once per run), adds the window's HDR
//! histograms to the 1-2-5 histograms of [`super::hist`] and records the rest on instruments bound to
//! the run's attributes.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{BoundCounter, BoundGauge, Counter, Gauge, Meter};
use tokio::sync::mpsc;

use super::hist::{self, Histograms};
use crate::context::Context;
use crate::domain::Window;

/// Instruments fed from windows.
#[derive(Clone)]
pub struct WindowInstruments {
    /// The latency, TTFT and TPOT histograms, aggregated outside the SDK.
    pub histograms: Arc<Histograms>,
    queries: Counter<u64>,
    samples: Counter<u64>,
    cpu: Gauge<f64>,
    rss: Gauge<u64>,
    rss_peak: Gauge<u64>,
    tokens: Counter<u64>,
    requests_good: Counter<u64>,
    accuracy: Gauge<f64>,
}

impl WindowInstruments {
    /// The instruments, on `meter` and in `histograms`.
    pub fn new(meter: &Meter, histograms: Arc<Histograms>) -> Self {
        Self {
            histograms,
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
    /// A window was stored, with its latencies already in the exported buckets when ingest counted
    /// them (else they are counted from the window).
    Stored(Window, Option<Box<hist::Counts>>),
    /// A run ended, with its accuracy when it measured one: its series are no longer needed here.
    RunEnded {
        /// The run.
        run_id: String,
        /// Its top-1 accuracy.
        accuracy: Option<f64>,
    },
}

/// The sending side: never waits, and does nothing when metrics go nowhere.
#[derive(Clone)]
pub struct Recorder {
    tx: Option<mpsc::Sender<Event>>,
}

/// How many events may wait for the recorder.
const QUEUE: usize = 65_536;

/// How long the recorder sleeps after each batch. Senders do not wake it (it is not waiting while it
/// sleeps), so at any load it wakes at most this often instead of once per window; measurements reach
/// the instruments this much later.
const BATCH_EVERY: std::time::Duration = std::time::Duration::from_millis(100);

impl Recorder {
    /// A recorder and the receiver its task reads; one that drops everything when `enabled` is false.
    pub fn new(enabled: bool) -> (Self, mpsc::Receiver<Event>) {
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self {
                tx: enabled.then_some(tx),
            },
            rx,
        )
    }

    /// Hands a stored window over; false when the recorder is behind (the window stays stored, its
    /// measurements are dropped and counted).
    pub fn stored(&self, w: Window, latency: Option<Box<hist::Counts>>) -> bool {
        self.tx
            .as_ref()
            .is_none_or(|tx| tx.try_send(Event::Stored(w, latency)).is_ok())
    }

    /// Says a run ended, with the accuracy it measured.
    pub fn run_ended(&self, run_id: &str, accuracy: Option<f64>) {
        if let Some(tx) = &self.tx {
            let _ = tx.try_send(Event::RunEnded {
                run_id: run_id.to_string(),
                accuracy,
            });
        }
    }
}

/// Instruments bound to one run's attributes.
struct Series {
    latency: hist::Series,
    queries: BoundCounter<u64>,
    samples: BoundCounter<u64>,
    cpu_user: BoundGauge<f64>,
    cpu_system: BoundGauge<f64>,
    rss: BoundGauge<u64>,
    rss_peak: BoundGauge<u64>,
    ttft: hist::Series,
    tpot: hist::Series,
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
            latency: i.histograms.latency.bind(attrs),
            queries: i.queries.bind(attrs),
            samples: i.samples.bind(attrs),
            cpu_user: i.cpu.bind(&with("cpu.mode", "user")),
            cpu_system: i.cpu.bind(&with("cpu.mode", "system")),
            rss: i.rss.bind(attrs),
            rss_peak: i.rss_peak.bind(attrs),
            ttft: i.histograms.ttft.bind(attrs),
            tpot: i.histograms.tpot.bind(attrs),
            tokens_in: i.tokens.bind(&with("gen_ai.token.type", "input")),
            tokens_out: i.tokens.bind(&with("gen_ai.token.type", "output")),
            good: i.requests_good.bind(attrs),
            accuracy: i.accuracy.bind(attrs),
        }
    }

    fn record(&self, w: &Window, latency: Option<&hist::Counts>) {
        self.queries.add(w.queries);
        self.samples.add(w.samples);
        match latency {
            Some(c) => self.latency.add(c),
            None => self.latency.add_hdr(&w.latency_histogram),
        }
        if let Some(r) = &w.resources {
            self.cpu_user.record(r.process_cpu_user_pct / 100.0);
            self.cpu_system.record(r.process_cpu_system_pct / 100.0);
            self.rss.record(r.rss_mean_bytes);
            self.rss_peak.record(r.rss_peak_bytes);
        }
        if let Some(g) = &w.generation {
            self.ttft.add_hdr(&g.ttft_histogram);
            self.tpot.add_hdr(&g.tpot_histogram);
            self.tokens_in.add(g.prompt_tokens);
            self.tokens_out.add(g.output_tokens);
            self.good.add(g.good_requests);
        }
    }
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
    let mut batch = Vec::with_capacity(1024);
    while rx.recv_many(&mut batch, QUEUE).await > 0 {
        for event in batch.drain(..) {
            record(&ctx, &mut runs, &mut configs, event).await;
        }
        tokio::time::sleep(BATCH_EVERY).await;
    }
}

/// Records one event.
async fn record(
    ctx: &Context,
    runs: &mut HashMap<String, Option<Series>>,
    configs: &mut ConfigLabels,
    event: Event,
) {
    let (w, latency) = match event {
        Event::Stored(w, latency) => (w, latency),
        Event::RunEnded { run_id, accuracy } => {
            if let (Some(Some(s)), Some(a)) = (runs.remove(&run_id), accuracy) {
                s.accuracy.record(a);
            }
            return;
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
                return;
            }
        };
        runs.insert(w.run_id.clone(), series);
    }
    if let Some(Some(s)) = runs.get(&w.run_id) {
        s.record(&w, latency.as_deref());
    }
}
