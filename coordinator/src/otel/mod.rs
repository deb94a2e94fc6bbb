//! Observability: the coordinator's metrics, exported over OTLP (http/protobuf or gRPC) and served
//! as Prometheus text on `/metrics`, from one set of OpenTelemetry instruments.
//!
//! - [`Instruments`] are the instruments; every metric's name, unit and attributes are listed in the
//!   README ("Observability").
//! - [`windows`] turns each stored telemetry window into measurements, in a task of its own fed after
//!   the window is durably stored, so export never sits on the ingest path.
//! - [`export`] builds the OTLP exporters; a collector that is down or hangs costs an export thread
//!   its timeout and nothing else (metrics are cumulative: the next export carries what one lost).
//! - [`prom`] serves `/metrics` from a reader collected at each scrape.

pub mod export;
pub mod hist;
pub mod prom;
pub mod traces;
pub mod windows;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter, MeterProvider as _};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{ManualReader, SdkMeterProvider};

use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};

pub use export::OtlpSettings;

/// The meter (and instrumentation scope) of the coordinator's metrics.
pub const METER: &str = "fleetbench-coordinator";

/// Bucket bounds of latency histograms, seconds: 1-2-5 steps from 1 µs to 10 s.
pub fn latency_bounds() -> Vec<f64> {
    let mut b: Vec<f64> = (-6..=0)
        .flat_map(|exp| {
            // Parsed from decimal, so 5e-6 is the float nearest 0.000005 (no accumulated error).
            [1, 2, 5].map(|m| format!("{m}e{exp}").parse().expect("a float"))
        })
        .collect();
    b.push(10.0);
    b
}

/// The coordinator's own instruments (the window instruments live in [`windows::WindowInstruments`]).
#[derive(Clone)]
pub struct Instruments {
    /// Windows that reached ingest, by `outcome`.
    pub windows: Counter<u64>,
    /// From a window's arrival to its acknowledgement, seconds.
    pub ack: Histogram<f64>,
    /// Database operations, seconds, by `db.operation.name` and `outcome`.
    pub store: Histogram<f64>,
    /// Database operations that failed, by `db.operation.name` and `error.type`.
    pub store_errors: Counter<u64>,
    /// Leases that ran out, by `outcome` (requeued or failed).
    pub leases_expired: Counter<u64>,
    /// Artifact bytes moved, by `direction` (received from clients, sent to agents and clients).
    pub transfer: Counter<u64>,
    /// OTLP exports that failed, by `signal`.
    pub export_failures: Counter<u64>,
    /// Windows whose measurements were not recorded because the recorder was behind.
    pub dropped: Counter<u64>,
}

impl Instruments {
    fn new(meter: &Meter) -> Self {
        Self {
            windows: meter
                .u64_counter("fleetbench.ingest.windows")
                .with_unit("{window}")
                .with_description("Telemetry windows that reached ingest, by outcome.")
                .build(),
            ack: meter
                .f64_histogram("fleetbench.ingest.ack.duration")
                .with_unit("s")
                .with_description(
                    "From a window's arrival to its acknowledgement, after it is stored.",
                )
                .with_boundaries(latency_bounds())
                .build(),
            store: meter
                .f64_histogram("db.client.operation.duration")
                .with_unit("s")
                .with_description("Duration of the coordinator's database operations.")
                .with_boundaries(latency_bounds())
                .build(),
            store_errors: meter
                .u64_counter("fleetbench.store.errors")
                .with_unit("{error}")
                .with_description("Database operations that failed.")
                .build(),
            leases_expired: meter
                .u64_counter("fleetbench.leases.expired")
                .with_unit("{lease}")
                .with_description("Task leases that ran out, requeued or failed for good.")
                .build(),
            transfer: meter
                .u64_counter("fleetbench.transfer.bytes")
                .with_unit("By")
                .with_description(
                    "Artifact bytes received from clients and sent to agents and clients.",
                )
                .build(),
            export_failures: meter
                .u64_counter("fleetbench.otlp.export.failures")
                .with_unit("{export}")
                .with_description("OTLP exports that failed, by signal.")
                .build(),
            dropped: meter
                .u64_counter("fleetbench.telemetry.dropped")
                .with_unit("{window}")
                .with_description(
                    "Stored windows whose measurements were not recorded: the recorder was behind.",
                )
                .build(),
        }
    }

    /// Times one database operation: its duration, and its failure when it fails.
    pub async fn store_op<T>(
        &self,
        operation: &'static str,
        op: impl std::future::Future<Output = Result<T>>,
    ) -> Result<T> {
        let start = std::time::Instant::now();
        let out = op.await;
        let outcome = if out.is_ok() { "ok" } else { "error" };
        self.store.record(
            start.elapsed().as_secs_f64(),
            &[
                KeyValue::new("db.operation.name", operation),
                KeyValue::new("outcome", outcome),
            ],
        );
        if let Err(e) = &out {
            self.store_errors.add(
                1,
                &[
                    KeyValue::new("db.operation.name", operation),
                    KeyValue::new("error.type", e.kind()),
                ],
            );
        }
        out
    }
}

/// Fleet figures read from the database every `metrics_refresh_ms`, for the observable gauges.
#[derive(Debug, Default, Clone)]
pub struct FleetSnapshot {
    /// Agents online, by platform name.
    pub agents_online: Vec<(String, u64)>,
    /// Tasks, by state.
    pub tasks: Vec<(String, u64)>,
}

/// Metrics of one coordinator process: the meter provider, its readers and its instruments.
pub struct Telemetry {
    provider: SdkMeterProvider,
    /// Collected at each `/metrics` scrape; None when `/metrics` is not served.
    scrape: Option<Arc<ManualReader>>,
    meter: Meter,
    /// The coordinator's instruments.
    pub inst: Instruments,
    /// The window instruments.
    pub windows: windows::WindowInstruments,
    /// What the fleet gauges report.
    pub fleet: Arc<std::sync::RwLock<FleetSnapshot>>,
    /// Where OTLP goes, when it does.
    pub otlp: Option<OtlpSettings>,
    /// Spans of jobs.
    pub traces: traces::Traces,
    /// Resource attributes, also written to `/metrics` as `target_info`.
    resource: Vec<(String, String)>,
}

impl Telemetry {
    /// Metrics for the coordinator replica `instance`: exported when `config` names a collector (or
    /// the OTEL_EXPORTER_OTLP_* variables do), collected for `/metrics` when it is served. Call it
    /// inside the Tokio runtime: the exporters' clients run on it.
    pub fn new(config: &CoordinatorConfig, instance: &str) -> Result<Self> {
        let otlp = OtlpSettings::from_config(config)?;
        let resource_attrs = vec![
            (
                "service.name".to_string(),
                "fleetbench-coordinator".to_string(),
            ),
            ("service.instance.id".to_string(), instance.to_string()),
            (
                "service.version".to_string(),
                env!("CARGO_PKG_VERSION").to_string(),
            ),
        ];
        let resource = Resource::builder_empty()
            .with_attributes(
                resource_attrs
                    .iter()
                    .map(|(k, v)| KeyValue::new(k.clone(), v.clone())),
            )
            .build();
        let failures = Arc::new(std::sync::OnceLock::<Counter<u64>>::new());
        let traces = traces::Traces::new(otlp.as_ref(), &resource, failures.clone())?;
        let mut builder = SdkMeterProvider::builder().with_resource(resource);
        let histograms = Arc::new(hist::Histograms::default());
        if let Some(o) = &otlp {
            let exporter = export::metric_exporter(o, histograms.clone(), failures.clone())?;
            builder = builder.with_reader(
                opentelemetry_sdk::metrics::PeriodicReader::builder(exporter)
                    .with_interval(Duration::from_millis(o.interval_ms))
                    .build(),
            );
        }
        let scrape = (!config.metrics_listen.is_empty()).then(|| Arc::new(ManualReader::default()));
        if let Some(r) = &scrape {
            builder = builder.with_reader(prom::SharedReader(r.clone()));
        }
        let provider = builder.build();
        let meter = provider.meter(METER);
        let inst = Instruments::new(&meter);
        let _ = failures.set(inst.export_failures.clone());
        // Counters of rare events start at 0, so their series exist (and dashboards show 0, not "no
        // data") before the first event.
        for outcome in ["requeued", "failed"] {
            inst.leases_expired
                .add(0, &[KeyValue::new("outcome", outcome)]);
        }
        inst.export_failures
            .add(0, &[KeyValue::new("signal", "metrics")]);
        inst.dropped.add(0, &[]);
        let windows = windows::WindowInstruments::new(&meter, histograms);
        let telemetry = Self {
            provider,
            scrape,
            meter,
            inst,
            windows,
            fleet: Default::default(),
            otlp,
            traces,
            resource: resource_attrs,
        };
        telemetry.register_fleet_gauges();
        Ok(telemetry)
    }

    /// Metrics that go nowhere (a context built without a server, in tests).
    pub fn off() -> Self {
        let provider = SdkMeterProvider::builder().build();
        let meter = provider.meter(METER);
        Self {
            inst: Instruments::new(&meter),
            windows: windows::WindowInstruments::new(&meter, Default::default()),
            provider,
            scrape: None,
            meter,
            fleet: Default::default(),
            otlp: None,
            traces: traces::Traces::off(),
            resource: Vec::new(),
        }
    }

    fn register_fleet_gauges(&self) {
        let fleet = self.fleet.clone();
        self.meter
            .u64_observable_gauge("fleetbench.agents.online")
            .with_unit("{agent}")
            .with_description(
                "Agents online (connected and heard from within the lease timeout), by platform.",
            )
            .with_callback(move |o| {
                let f = fleet.read().expect("fleet snapshot");
                for (platform, n) in &f.agents_online {
                    o.observe(*n, &[KeyValue::new("platform", platform.clone())]);
                }
            })
            .build();
        let fleet = self.fleet.clone();
        self.meter
            .u64_observable_gauge("fleetbench.tasks")
            .with_unit("{task}")
            .with_description("Tasks of all jobs, by state.")
            .with_callback(move |o| {
                let f = fleet.read().expect("fleet snapshot");
                for (state, n) in &f.tasks {
                    o.observe(*n, &[KeyValue::new("state", state.clone())]);
                }
            })
            .build();
    }

    /// True when metrics go somewhere (OTLP or `/metrics`).
    pub fn enabled(&self) -> bool {
        self.otlp.is_some() || self.scrape.is_some()
    }

    /// The metrics as Prometheus (OpenMetrics) text; None when `/metrics` is not served.
    pub fn prometheus_text(&self) -> Option<Result<String>> {
        let reader = self.scrape.as_ref()?;
        Some(prom::collect_text(
            reader,
            &self.windows.histograms,
            &self.resource,
        ))
    }

    /// Exports what is pending and stops the exporters, waiting at most the OTLP timeout (a hung
    /// collector does not hold up shutdown).
    pub async fn shutdown(self: &Arc<Self>) {
        let this = self.clone();
        let wait = Duration::from_millis(self.otlp.as_ref().map_or(1000, |o| o.timeout_ms) + 1000);
        // Blocking calls that end the SDK's export threads: spans first, then metrics.
        let done = tokio::task::spawn_blocking(move || {
            if let Err(e) = this.traces.shutdown(wait) {
                tracing::debug!(error = %e, "Span export did not shut down cleanly.");
            }
            this.provider.shutdown_with_timeout(wait)
        });
        if tokio::time::timeout(2 * wait + Duration::from_secs(1), done)
            .await
            .is_err()
        {
            tracing::warn!(
                "OTLP export did not finish in time at shutdown; pending figures were dropped."
            );
        }
    }
}

/// Reads the fleet gauges' figures from the database every `metrics_refresh_ms` until `stop`, when
/// metrics go anywhere. A state or platform seen once keeps being reported (as 0 when empty), so a
/// gauge falls to zero instead of freezing at its last value.
pub async fn refresh_fleet(
    ctx: Arc<crate::context::Context>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    if !ctx.telemetry.enabled() {
        return;
    }
    let every = Duration::from_millis(ctx.config.metrics_refresh_ms);
    let mut known_states: std::collections::BTreeSet<String> = Default::default();
    let mut known_platforms: std::collections::BTreeSet<String> = Default::default();
    loop {
        let inst = &ctx.telemetry.inst;
        let agents = inst.store_op("list_agents", ctx.store.list_agents()).await;
        let tasks = inst.store_op("task_counts", ctx.store.task_counts()).await;
        let now = fleetbench_common::now_ms();
        {
            let mut f = ctx.telemetry.fleet.write().expect("fleet snapshot");
            if let Ok(agents) = agents {
                let mut online: std::collections::BTreeMap<String, u64> = Default::default();
                for a in &agents {
                    known_platforms.insert(a.platform_name.clone());
                    if crate::fleet::is_online(&ctx, a, now) {
                        *online.entry(a.platform_name.clone()).or_default() += 1;
                    }
                }
                f.agents_online = known_platforms
                    .iter()
                    .map(|p| (p.clone(), online.get(p).copied().unwrap_or(0)))
                    .collect();
            }
            if let Ok(tasks) = tasks {
                known_states.extend(tasks.iter().map(|(s, _)| s.clone()));
                f.tasks = known_states
                    .iter()
                    .map(|s| {
                        let n = tasks.iter().find(|(t, _)| t == s).map_or(0, |(_, n)| *n);
                        (s.clone(), n)
                    })
                    .collect();
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            _ = crate::context::stopped(&mut stop) => return,
        }
    }
}

impl Error {
    /// A short name of the error's kind, for the `error.type` attribute.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::NotFound(_) => "not_found",
            Error::InvalidArgument(_) => "invalid_argument",
            Error::AlreadyExists(_) => "already_exists",
            Error::FailedPrecondition(_) => "failed_precondition",
            Error::Unavailable(_) => "unavailable",
            Error::Database(_) => "database",
            Error::Migrate(_) => "migrate",
            Error::ResourceExhausted(_) => "resource_exhausted",
            Error::Storage(_) => "storage",
            Error::Corrupt(_) => "corrupt",
            Error::Unauthenticated(_) => "unauthenticated",
            Error::PermissionDenied(_) => "permission_denied",
            Error::Internal(_) => "internal",
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn latency_buckets_step_1_2_5_from_a_microsecond_to_ten_seconds() {
        let b = super::latency_bounds();
        assert_eq!(b.first(), Some(&1e-6));
        assert_eq!(b.last(), Some(&10.0));
        assert_eq!(b.len(), 22);
        for v in [2e-6, 5e-6, 1e-5, 5e-5, 2e-4, 5e-3, 1.0] {
            assert!(b.contains(&v), "{v} in {b:?}");
        }
        assert!(b.windows(2).all(|w| w[0] < w[1]));
    }
}
