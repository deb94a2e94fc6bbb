//! OTLP export: where it goes and over what, and the exporters that count their failures.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{
    Protocol, RetryPolicy, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use tracing::warn;

use crate::config::CoordinatorConfig;
use crate::error::{Error, Result};

/// The OTLP transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OtlpProtocol {
    /// Protobuf over HTTP (`POST /v1/metrics`, `/v1/traces`), the OTLP default; port 4318 by custom.
    HttpProtobuf,
    /// gRPC; port 4317 by custom.
    Grpc,
}

/// Where OTLP export goes.
#[derive(Debug, Clone, PartialEq)]
pub struct OtlpSettings {
    /// The collector's base address; None when only the OTEL_EXPORTER_OTLP_* variables name it (the
    /// exporter reads them itself, with their per-signal forms).
    pub endpoint: Option<String>,
    /// The transport.
    pub protocol: OtlpProtocol,
    /// Export interval, ms.
    pub interval_ms: u64,
    /// Export timeout, ms.
    pub timeout_ms: u64,
}

/// The standard variables that name a collector.
const ENDPOINT_VARS: [&str; 3] = [
    "OTEL_EXPORTER_OTLP_ENDPOINT",
    "OTEL_EXPORTER_OTLP_METRICS_ENDPOINT",
    "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
];

fn env(name: &str) -> Option<String> {
    std::env::var(name).ok().filter(|v| !v.trim().is_empty())
}

impl OtlpSettings {
    /// The export `config` asks for, None when it asks for none; an endpoint or protocol that cannot
    /// work is refused, naming the setting.
    pub fn from_config(config: &CoordinatorConfig) -> Result<Option<Self>> {
        let (protocol_setting, protocol_name) = if !config.otlp_protocol.is_empty() {
            ("otlp_protocol", config.otlp_protocol.clone())
        } else if let Some(p) = env("OTEL_EXPORTER_OTLP_PROTOCOL") {
            ("OTEL_EXPORTER_OTLP_PROTOCOL", p)
        } else {
            ("otlp_protocol", "http/protobuf".to_string())
        };
        let protocol = match protocol_name.trim() {
            "http/protobuf" | "http" => OtlpProtocol::HttpProtobuf,
            "grpc" => OtlpProtocol::Grpc,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "{protocol_setting}: '{other}' is not an OTLP protocol fleetbench exports over; \
                     use http/protobuf or grpc"
                )));
            }
        };
        let endpoint = if config.otlp_endpoint.is_empty() {
            if !ENDPOINT_VARS.iter().any(|v| env(v).is_some()) {
                return Ok(None);
            }
            for var in ENDPOINT_VARS {
                if let Some(url) = env(var) {
                    check_endpoint(var, &url)?;
                }
            }
            None
        } else {
            check_endpoint("otlp_endpoint", &config.otlp_endpoint)?;
            Some(config.otlp_endpoint.trim_end_matches('/').to_string())
        };
        Ok(Some(Self {
            endpoint,
            protocol,
            interval_ms: config.otlp_interval_ms,
            timeout_ms: config.otlp_timeout_ms,
        }))
    }

    /// The address one signal's exports go to: `BASE/v1/metrics` over HTTP, the base over gRPC.
    fn signal_endpoint(&self, path: &str) -> Option<String> {
        let base = self.endpoint.as_ref()?;
        Some(match self.protocol {
            OtlpProtocol::HttpProtobuf => format!("{base}{path}"),
            OtlpProtocol::Grpc => base.clone(),
        })
    }
}

fn check_endpoint(setting: &str, url: &str) -> Result<()> {
    let uri: http::Uri = url.parse().map_err(|e| {
        Error::InvalidArgument(format!(
            "{setting}: '{url}' is not a URL ({e}); give e.g. http://collector:4318"
        ))
    })?;
    match uri.scheme_str() {
        Some("http") if uri.host().is_some() => Ok(()),
        Some("https") => Err(Error::InvalidArgument(format!(
            "{setting}: '{url}': TLS to a collector is not built into fleetbench; export to a \
             collector on the same host or network over http:// and let it forward over TLS"
        ))),
        _ => Err(Error::InvalidArgument(format!(
            "{setting}: '{url}' must be an http:// URL with a host, e.g. http://collector:4318"
        ))),
    }
}

/// Hyper's client needs the Tokio runtime, and the SDK's export threads are not in it: requests go
/// to the runtime the exporter was built in.
#[derive(Debug, Clone)]
struct OnTokio {
    client: opentelemetry_http::hyper::HyperClient,
    runtime: tokio::runtime::Handle,
}

#[async_trait::async_trait]
impl HttpClient for OnTokio {
    async fn send_bytes(
        &self,
        request: Request<Bytes>,
    ) -> std::result::Result<Response<Bytes>, HttpError> {
        let client = self.client.clone();
        self.runtime
            .spawn(async move { client.send_bytes(request).await })
            .await?
    }
}

fn on_tokio(timeout: Duration) -> Result<OnTokio> {
    Ok(OnTokio {
        client: opentelemetry_http::hyper::HyperClient::with_default_connector(timeout, None),
        runtime: tokio::runtime::Handle::try_current().map_err(|_| {
            Error::Internal("OTLP export must be set up inside the Tokio runtime".into())
        })?,
    })
}

/// The span exporter `settings` describe, counting and logging its failures.
pub fn span_exporter(
    settings: &OtlpSettings,
    failures: Arc<OnceLock<Counter<u64>>>,
) -> Result<Counted<opentelemetry_otlp::SpanExporter>> {
    let timeout = Duration::from_millis(settings.timeout_ms);
    let built = match settings.protocol {
        OtlpProtocol::HttpProtobuf => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_http_client(on_tokio(timeout)?)
                .with_retry_policy(RetryPolicy::disabled())
                .with_timeout(timeout);
            if let Some(url) = settings.signal_endpoint("/v1/traces") {
                b = b.with_endpoint(url);
            }
            b.build()
        }
        OtlpProtocol::Grpc => {
            let mut b = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_retry_policy(RetryPolicy::disabled())
                .with_timeout(timeout);
            if let Some(url) = settings.signal_endpoint("/v1/traces") {
                b = b.with_endpoint(url);
            }
            b.build()
        }
    };
    let inner = built.map_err(|e| Error::InvalidArgument(format!("otlp_endpoint: {e}")))?;
    Ok(Counted {
        inner,
        failures,
        signal: "traces",
    })
}

/// The metrics exporter `settings` describe, counting its failures into `failures` (set once the
/// instruments exist) and logging each (one per export interval at most).
pub fn metric_exporter(
    settings: &OtlpSettings,
    failures: Arc<OnceLock<Counter<u64>>>,
) -> Result<Counted<opentelemetry_otlp::MetricExporter>> {
    let timeout = Duration::from_millis(settings.timeout_ms);
    let built = match settings.protocol {
        OtlpProtocol::HttpProtobuf => {
            let client = OnTokio {
                client: opentelemetry_http::hyper::HyperClient::with_default_connector(
                    timeout, None,
                ),
                runtime: tokio::runtime::Handle::try_current().map_err(|_| {
                    Error::Internal("OTLP export must be set up inside the Tokio runtime".into())
                })?,
            };
            let mut b = opentelemetry_otlp::MetricExporter::builder()
                .with_http()
                .with_protocol(Protocol::HttpBinary)
                .with_http_client(client)
                .with_retry_policy(RetryPolicy::disabled())
                .with_timeout(timeout);
            if let Some(url) = settings.signal_endpoint("/v1/metrics") {
                b = b.with_endpoint(url);
            }
            b.with_temporality(Temporality::Cumulative).build()
        }
        OtlpProtocol::Grpc => {
            let mut b = opentelemetry_otlp::MetricExporter::builder()
                .with_tonic()
                .with_retry_policy(RetryPolicy::disabled())
                .with_timeout(timeout);
            if let Some(url) = settings.signal_endpoint("/v1/metrics") {
                b = b.with_endpoint(url);
            }
            b.with_temporality(Temporality::Cumulative).build()
        }
    };
    let inner = built.map_err(|e| Error::InvalidArgument(format!("otlp_endpoint: {e}")))?;
    Ok(Counted {
        inner,
        failures,
        signal: "metrics",
    })
}

/// An exporter whose failed exports are counted and logged.
#[derive(Debug)]
pub struct Counted<E> {
    pub(super) inner: E,
    failures: Arc<OnceLock<Counter<u64>>>,
    signal: &'static str,
}

impl<E> Counted<E> {
    pub(super) fn failed(&self, e: &dyn std::fmt::Display) {
        if let Some(c) = self.failures.get() {
            c.add(1, &[KeyValue::new("signal", self.signal)]);
        }
        warn!(signal = self.signal, error = %e, "OTLP export failed; the next export carries these figures.");
    }
}

impl<E: PushMetricExporter> PushMetricExporter for Counted<E> {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let r = self.inner.export(metrics).await;
        if let Err(e) = &r {
            self.failed(e);
        }
        r
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn temporality(&self) -> Temporality {
        self.inner.temporality()
    }
}
