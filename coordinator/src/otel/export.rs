//! OTLP export: where it goes and over what, and the exporters that count their failures.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::metrics::Counter;
use opentelemetry_http::{Bytes, HttpClient, HttpError, Request, Response};
use opentelemetry_otlp::{
    Protocol, RetryPolicy, WithExportConfig, WithHttpConfig, WithTonicConfig,
};
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::InstrumentationScope;
use opentelemetry_proto::tonic::metrics::v1::ScopeMetrics;
use opentelemetry_sdk::error::{OTelSdkError, OTelSdkResult};
use opentelemetry_sdk::metrics::Temporality;
use opentelemetry_sdk::metrics::data::ResourceMetrics;
use opentelemetry_sdk::metrics::exporter::PushMetricExporter;
use tracing::warn;

use super::hist::Histograms;
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

/// The runtime the exporters' requests run on: the one they are built in.
fn runtime() -> Result<tokio::runtime::Handle> {
    tokio::runtime::Handle::try_current()
        .map_err(|_| Error::Internal("OTLP export must be set up inside the Tokio runtime".into()))
}

fn on_tokio(timeout: Duration) -> Result<OnTokio> {
    Ok(OnTokio {
        client: opentelemetry_http::hyper::HyperClient::with_default_connector(timeout, None),
        runtime: runtime()?,
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
/// instruments exist) and logging each (one per export interval at most). Each export carries the
/// SDK's metrics and `histograms` in one request.
pub fn metric_exporter(
    settings: &OtlpSettings,
    histograms: Arc<Histograms>,
    failures: Arc<OnceLock<Counter<u64>>>,
) -> Result<Counted<MetricExporter>> {
    let timeout = Duration::from_millis(settings.timeout_ms);
    let runtime = runtime()?;
    let headers = otlp_headers("OTEL_EXPORTER_OTLP_METRICS_HEADERS")?;
    let transport = match settings.protocol {
        OtlpProtocol::HttpProtobuf => {
            let (setting, url) = metrics_endpoint(settings, "/v1/metrics", "http://localhost:4318");
            let uri: http::Uri = url.parse().map_err(|e| {
                Error::InvalidArgument(format!("{setting}: '{url}' is not a URL ({e})"))
            })?;
            let mut map = http::HeaderMap::new();
            for (k, v) in headers {
                map.insert(k, v);
            }
            Transport::Http {
                client: opentelemetry_http::hyper::HyperClient::with_default_connector(
                    timeout, None,
                ),
                uri,
                headers: map,
            }
        }
        OtlpProtocol::Grpc => {
            let (setting, url) = metrics_endpoint(settings, "", "http://localhost:4317");
            let channel = {
                let _guard = runtime.enter();
                tonic::transport::Channel::from_shared(url.clone())
                    .map_err(|e| {
                        Error::InvalidArgument(format!("{setting}: '{url}' is not a URL ({e})"))
                    })?
                    .timeout(timeout)
                    .connect_lazy()
            };
            let mut metadata = tonic::metadata::MetadataMap::new();
            for (k, v) in headers {
                let key = tonic::metadata::MetadataKey::from_bytes(k.as_str().as_bytes())
                    .map_err(|e| Error::InvalidArgument(format!("OTLP header '{k}': {e}")))?;
                let value = tonic::metadata::MetadataValue::try_from(v.as_bytes())
                    .map_err(|e| Error::InvalidArgument(format!("OTLP header '{k}': {e}")))?;
                metadata.insert(key, value);
            }
            Transport::Grpc {
                client: MetricsServiceClient::new(channel),
                metadata,
            }
        }
    };
    Ok(Counted {
        inner: MetricExporter {
            transport,
            runtime,
            timeout,
            histograms,
        },
        failures,
        signal: "metrics",
    })
}

/// Where metrics go, and the setting that said so: the configured base (with `path` over HTTP),
/// else `OTEL_EXPORTER_OTLP_METRICS_ENDPOINT` as it is, else `OTEL_EXPORTER_OTLP_ENDPOINT` (with
/// `path`), else `default` (with `path`): the OTLP exporter specification's order.
fn metrics_endpoint(settings: &OtlpSettings, path: &str, default: &str) -> (&'static str, String) {
    if let Some(base) = &settings.endpoint {
        return ("otlp_endpoint", format!("{base}{path}"));
    }
    if let Some(url) = env("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT") {
        return ("OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", url);
    }
    if let Some(url) = env("OTEL_EXPORTER_OTLP_ENDPOINT") {
        return (
            "OTEL_EXPORTER_OTLP_ENDPOINT",
            format!("{}{path}", url.trim_end_matches('/')),
        );
    }
    ("otlp_endpoint", format!("{default}{path}"))
}

/// The headers to send: `signal_var` when set, else `OTEL_EXPORTER_OTLP_HEADERS`; each a
/// comma-separated `key=value` list with percent-encoded values. A pair that is not a valid header
/// is refused, naming the variable.
fn otlp_headers(signal_var: &str) -> Result<Vec<(http::HeaderName, http::HeaderValue)>> {
    let Some((var, list)) = env(signal_var)
        .map(|v| (signal_var.to_string(), v))
        .or_else(|| {
            env("OTEL_EXPORTER_OTLP_HEADERS").map(|v| ("OTEL_EXPORTER_OTLP_HEADERS".into(), v))
        })
    else {
        return Ok(Vec::new());
    };
    parse_headers(&list).map_err(|e| Error::InvalidArgument(format!("{var}: {e}")))
}

fn parse_headers(
    list: &str,
) -> std::result::Result<Vec<(http::HeaderName, http::HeaderValue)>, String> {
    list.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair
                .split_once('=')
                .ok_or_else(|| format!("'{pair}' is not key=value"))?;
            let value = percent_encoding::percent_decode_str(v.trim())
                .decode_utf8()
                .map_err(|e| {
                    format!(
                        "the value of '{}' is not UTF-8 once decoded ({e})",
                        k.trim()
                    )
                })?;
            let name = http::HeaderName::from_bytes(k.trim().as_bytes())
                .map_err(|e| format!("'{}' is not a header name ({e})", k.trim()))?;
            let value = http::HeaderValue::from_str(&value)
                .map_err(|e| format!("the value of '{}' is not a header value ({e})", k.trim()))?;
            Ok((name, value))
        })
        .collect()
}

/// One per exporter, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Transport {
    Http {
        client: opentelemetry_http::hyper::HyperClient,
        uri: http::Uri,
        headers: http::HeaderMap,
    },
    Grpc {
        client: MetricsServiceClient<tonic::transport::Channel>,
        metadata: tonic::metadata::MetadataMap,
    },
}

/// Exports the SDK's metrics and the window histograms in one OTLP request, over the transport the
/// settings name, on the Tokio runtime (the SDK's export thread is outside it), each export bounded
/// by the timeout. No retries: metrics are cumulative, so the next export carries what one lost.
pub struct MetricExporter {
    transport: Transport,
    runtime: tokio::runtime::Handle,
    timeout: Duration,
    histograms: Arc<Histograms>,
}

impl std::fmt::Debug for MetricExporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("MetricExporter")
    }
}

impl MetricExporter {
    /// The request for `metrics`: the SDK's, with the window histograms added to the coordinator's
    /// scope.
    fn request(&self, metrics: &ResourceMetrics) -> ExportMetricsServiceRequest {
        let mut req = ExportMetricsServiceRequest::from(metrics);
        let extra = self.histograms.to_otlp();
        if extra.is_empty() {
            return req;
        }
        let rm = &mut req.resource_metrics[0];
        let ours = rm
            .scope_metrics
            .iter_mut()
            .find(|s| s.scope.as_ref().is_some_and(|sc| sc.name == super::METER));
        match ours {
            Some(scope) => scope.metrics.extend(extra),
            None => rm.scope_metrics.push(ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: super::METER.to_string(),
                    ..Default::default()
                }),
                metrics: extra,
                schema_url: String::new(),
            }),
        }
        req
    }
}

impl PushMetricExporter for MetricExporter {
    async fn export(&self, metrics: &ResourceMetrics) -> OTelSdkResult {
        let req = self.request(metrics);
        let timeout = self.timeout;
        let sent = match &self.transport {
            Transport::Http {
                client,
                uri,
                headers,
            } => {
                let mut request = Request::post(uri.clone())
                    .header(http::header::CONTENT_TYPE, "application/x-protobuf")
                    .body(Bytes::from(prost::Message::encode_to_vec(&req)))
                    .map_err(|e| OTelSdkError::InternalFailure(e.to_string()))?;
                request.headers_mut().extend(headers.clone());
                let client = client.clone();
                self.runtime.spawn(async move {
                    let response = tokio::time::timeout(timeout, client.send_bytes(request))
                        .await
                        .map_err(|_| format!("no answer within {timeout:?}"))?
                        .map_err(|e| e.to_string())?;
                    if response.status().is_success() {
                        Ok(())
                    } else {
                        Err(format!("the collector answered {}", response.status()))
                    }
                })
            }
            Transport::Grpc { client, metadata } => {
                let mut client = client.clone();
                let request =
                    tonic::Request::from_parts(metadata.clone(), tonic::Extensions::default(), req);
                self.runtime.spawn(async move {
                    tokio::time::timeout(timeout, client.export(request))
                        .await
                        .map_err(|_| format!("no answer within {timeout:?}"))?
                        .map(|_| ())
                        .map_err(|s| format!("{}: {}", s.code(), s.message()))
                })
            }
        };
        match sent.await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(OTelSdkError::InternalFailure(e)),
            Err(e) => Err(OTelSdkError::InternalFailure(e.to_string())),
        }
    }

    fn force_flush(&self) -> OTelSdkResult {
        Ok(())
    }

    fn shutdown_with_timeout(&self, _timeout: Duration) -> OTelSdkResult {
        Ok(())
    }

    fn temporality(&self) -> Temporality {
        Temporality::Cumulative
    }
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

#[cfg(test)]
mod tests {
    #[test]
    fn otlp_headers_are_key_value_pairs_with_percent_encoded_values() {
        let h = super::parse_headers("api-key=a%20b%2Cc , x-tenant = t1,").unwrap();
        let h: Vec<(String, String)> = h
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        assert_eq!(
            h,
            [
                ("api-key".to_string(), "a b,c".to_string()),
                ("x-tenant".to_string(), "t1".to_string())
            ]
        );
        let e = super::parse_headers("api-key").unwrap_err();
        assert!(e.contains("'api-key' is not key=value"), "{e}");
        let e = super::parse_headers("bad key=v").unwrap_err();
        assert!(e.contains("'bad key' is not a header name"), "{e}");
    }

    #[test]
    fn a_configured_endpoint_gets_the_signal_path_over_http_only() {
        let s = super::OtlpSettings {
            endpoint: Some("http://c:4318".into()),
            protocol: super::OtlpProtocol::HttpProtobuf,
            interval_ms: 1,
            timeout_ms: 1,
        };
        assert_eq!(
            super::metrics_endpoint(&s, "/v1/metrics", "http://localhost:4318").1,
            "http://c:4318/v1/metrics"
        );
        assert_eq!(
            super::metrics_endpoint(&s, "", "http://localhost:4317").1,
            "http://c:4318"
        );
    }
}
