//! `/metrics`: the same instruments as OTLP export, collected at each scrape and written as
//! OpenMetrics text by `prometheus-client`, under the names the OpenTelemetry Collector's Prometheus
//! exporter gives them (dots to underscores, a unit suffix, `_total` on counters), so the dashboards
//! query one set of names whichever way the figures reach Prometheus.

use std::sync::{Arc, Weak};
use std::time::Duration;

use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::reader::MetricReader;
use opentelemetry_sdk::metrics::{InstrumentKind, ManualReader, Pipeline, Temporality};
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use tokio::net::TcpListener;

use super::hist::Histograms;
use crate::error::{Error, Result};

/// A reader the provider and the scrape handler share.
#[derive(Debug)]
pub struct SharedReader(pub Arc<ManualReader>);

impl MetricReader for SharedReader {
    fn register_pipeline(&self, pipeline: Weak<Pipeline>) {
        self.0.register_pipeline(pipeline)
    }
    fn collect(&self, rm: &mut ResourceMetrics) -> OTelSdkResult {
        self.0.collect(rm)
    }
    fn force_flush(&self) -> OTelSdkResult {
        self.0.force_flush()
    }
    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.0.shutdown_with_timeout(timeout)
    }
    fn temporality(&self, kind: InstrumentKind) -> Temporality {
        self.0.temporality(kind)
    }
}

/// One metric family, owned, ready to encode.
#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: MetricType,
    points: Vec<Point>,
}

#[derive(Debug)]
struct Point {
    labels: Vec<(String, String)>,
    value: f64,
    /// Histograms: sum, count, and (upper bound, count in that bucket) with +Inf last.
    histogram: Option<HistogramPoint>,
}

/// A histogram's sum, count, and (upper bound, count in that bucket) with +Inf last.
type HistogramPoint = (f64, u64, Vec<(f64, u64)>);

/// The Prometheus name of an OpenTelemetry metric, as the Collector's Prometheus exporter writes it
/// (without `_total`, which the encoder adds to counters).
pub fn prometheus_name(name: &str, unit: &str, kind: MetricType) -> String {
    let mut out = sanitize(name);
    let suffix = match unit {
        "s" => Some("seconds"),
        "ms" => Some("milliseconds"),
        "By" => Some("bytes"),
        "1" if matches!(kind, MetricType::Gauge) => Some("ratio"),
        _ => None,
    };
    if let Some(s) = suffix
        && !out.ends_with(&format!("_{s}"))
    {
        out.push('_');
        out.push_str(s);
    }
    out
}

/// A metric or label name with every character Prometheus does not allow turned into `_`.
pub fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn labels<'a>(attrs: impl Iterator<Item = &'a opentelemetry::KeyValue>) -> Vec<(String, String)> {
    let mut l: Vec<(String, String)> = attrs
        .map(|kv| (sanitize(kv.key.as_str()), kv.value.as_str().into_owned()))
        .collect();
    l.sort();
    l
}

fn family<T: AsF64>(name: &str, unit: &str, help: &str, data: &MetricData<T>) -> Option<Family> {
    let (kind, points) = match data {
        MetricData::Gauge(g) => (
            MetricType::Gauge,
            g.data_points()
                .map(|p| Point {
                    labels: labels(p.attributes()),
                    value: p.value().f(),
                    histogram: None,
                })
                .collect(),
        ),
        MetricData::Sum(s) => (
            if s.is_monotonic() {
                MetricType::Counter
            } else {
                MetricType::Gauge
            },
            s.data_points()
                .map(|p| Point {
                    labels: labels(p.attributes()),
                    value: p.value().f(),
                    histogram: None,
                })
                .collect(),
        ),
        MetricData::Histogram(h) => (
            MetricType::Histogram,
            h.data_points()
                .map(|p| {
                    let bounds = p.bounds().chain(std::iter::once(f64::INFINITY));
                    Point {
                        labels: labels(p.attributes()),
                        value: 0.0,
                        histogram: Some((
                            p.sum().f(),
                            p.count(),
                            bounds.zip(p.bucket_counts()).collect(),
                        )),
                    }
                })
                .collect(),
        ),
        MetricData::ExponentialHistogram(_) => return None,
    };
    Some(Family {
        name: prometheus_name(name, unit, kind),
        help: help.to_string(),
        kind,
        points,
    })
}

/// A scrape's families, encoded by `prometheus-client`.
#[derive(Debug)]
struct Scrape {
    families: Vec<Family>,
    target: Vec<(String, String)>,
}

impl Collector for Scrape {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        if !self.target.is_empty() {
            let mut e =
                encoder.encode_descriptor("target", "Target metadata", None, MetricType::Info)?;
            e.encode_info(&self.target)?;
        }
        for f in &self.families {
            let mut e = encoder.encode_descriptor(&f.name, &f.help, None, f.kind)?;
            for p in &f.points {
                let mut m = e.encode_family(&p.labels)?;
                match (&p.histogram, f.kind) {
                    (Some((sum, count, buckets)), _) => {
                        m.encode_histogram::<NoLabelSet>(*sum, *count, buckets, None)?
                    }
                    (None, MetricType::Counter) => {
                        m.encode_counter::<NoLabelSet, _, f64>(&p.value, None)?
                    }
                    (None, _) => m.encode_gauge(&p.value)?,
                }
            }
        }
        Ok(())
    }
}

/// The families of the window histograms that have values.
fn histogram_families(histograms: &Histograms) -> Vec<Family> {
    histograms
        .all()
        .iter()
        .filter_map(|h| {
            let points: Vec<Point> = h
                .snapshot()
                .into_iter()
                .map(|(attrs, b)| {
                    let bounds = h
                        .bounds()
                        .iter()
                        .copied()
                        .chain(std::iter::once(f64::INFINITY));
                    Point {
                        labels: labels(attrs.iter()),
                        value: 0.0,
                        histogram: Some((b.sum, b.count, bounds.zip(b.counts).collect())),
                    }
                })
                .collect();
            (!points.is_empty()).then(|| Family {
                name: prometheus_name(h.name, h.unit, MetricType::Histogram),
                help: h.description.to_string(),
                kind: MetricType::Histogram,
                points,
            })
        })
        .collect()
}

/// Collects `reader` and the window `histograms` and writes the result as OpenMetrics text,
/// `resource` as `target_info`.
pub fn collect_text(
    reader: &ManualReader,
    histograms: &Histograms,
    resource: &[(String, String)],
) -> Result<String> {
    let mut rm = ResourceMetrics::default();
    reader
        .collect(&mut rm)
        .map_err(|e| Error::Internal(format!("collecting metrics: {e}")))?;
    let mut families = Vec::new();
    for scope in rm.scope_metrics() {
        for m in scope.metrics() {
            let f = match m.data() {
                AggregatedMetrics::F64(d) => family(m.name(), m.unit(), m.description(), d),
                AggregatedMetrics::U64(d) => family(m.name(), m.unit(), m.description(), d),
                AggregatedMetrics::I64(d) => family(m.name(), m.unit(), m.description(), d),
            };
            families.extend(f);
        }
    }
    families.extend(histogram_families(histograms));
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Scrape {
        families,
        target: resource
            .iter()
            .map(|(k, v)| (sanitize(k), v.clone()))
            .collect(),
    }));
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &registry)
        .map_err(|e| Error::Internal(format!("encoding metrics: {e}")))?;
    Ok(text)
}

/// A value Prometheus writes as a float.
trait AsF64: Copy {
    fn f(self) -> f64;
}

impl AsF64 for f64 {
    fn f(self) -> f64 {
        self
    }
}

impl AsF64 for u64 {
    fn f(self) -> f64 {
        self as f64
    }
}

impl AsF64 for i64 {
    fn f(self) -> f64 {
        self as f64
    }
}

/// The OpenMetrics content type.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Serves `/metrics` from `telemetry` on `listener` until `stop` turns true.
pub async fn serve(
    telemetry: Arc<super::Telemetry>,
    listener: TcpListener,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    use axum::http::{StatusCode, header};
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let telemetry = telemetry.clone();
            async move {
                match tokio::task::spawn_blocking(move || telemetry.prometheus_text()).await {
                    Ok(Some(Ok(text))) => {
                        (StatusCode::OK, [(header::CONTENT_TYPE, CONTENT_TYPE)], text)
                    }
                    Ok(Some(Err(e))) => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        [(header::CONTENT_TYPE, "text/plain")],
                        e.to_string(),
                    ),
                    _ => (
                        StatusCode::INTERNAL_SERVER_ERROR,
                        [(header::CONTENT_TYPE, "text/plain")],
                        "metrics are not collected".to_string(),
                    ),
                }
            }
        }),
    );
    let shutdown = async move { crate::context::stopped(&mut stop).await };
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
    {
        tracing::warn!(error = %e, "The /metrics server stopped.");
    }
}
