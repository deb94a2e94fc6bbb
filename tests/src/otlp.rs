//! An OTLP receiver for tests, on the official protobuf definitions (`opentelemetry-proto`): gRPC
//! (`MetricsService`, `TraceService`) or http/protobuf (`POST /v1/metrics`, `/v1/traces`), keeping every
//! request it got; and collectors that are down or hang.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric::Data;
use prost::Message;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// What a receiver got.
#[derive(Default, Debug)]
pub struct Received {
    /// Metrics requests, in arrival order.
    pub metrics: Vec<ExportMetricsServiceRequest>,
    /// Trace requests, in arrival order.
    pub traces: Vec<ExportTraceServiceRequest>,
}

#[derive(Clone)]
struct Sink {
    got: Arc<Mutex<Received>>,
    changed: Arc<watch::Sender<u64>>,
}

impl Sink {
    fn new() -> Self {
        Self {
            got: Default::default(),
            changed: Arc::new(watch::channel(0).0),
        }
    }
    fn push(&self, f: impl FnOnce(&mut Received)) {
        f(&mut self.got.lock().unwrap());
        self.changed.send_modify(|v| *v += 1);
    }
}

#[tonic::async_trait]
impl MetricsService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let r = request.into_inner();
        self.push(|g| g.metrics.push(r));
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl TraceService for Sink {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let r = request.into_inner();
        self.push(|g| g.traces.push(r));
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// A receiver running in the test's runtime.
pub struct OtlpReceiver {
    /// Where it listens.
    pub addr: SocketAddr,
    sink: Sink,
    task: tokio::task::JoinHandle<()>,
}

impl OtlpReceiver {
    /// A gRPC receiver on 127.0.0.1:0.
    pub async fn grpc() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = Sink::new();
        let router = tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(sink.clone()))
            .add_service(TraceServiceServer::new(sink.clone()));
        let task = tokio::spawn(async move {
            let incoming = tonic::transport::server::TcpIncoming::from(listener);
            let _ = router.serve_with_incoming(incoming).await;
        });
        Self { addr, sink, task }
    }

    /// An http/protobuf receiver on 127.0.0.1:0.
    pub async fn http() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let sink = Sink::new();
        let app = axum::Router::new()
            .route(
                "/v1/metrics",
                post_to::<_, ExportMetricsServiceResponse>(
                    &sink,
                    |g, r: ExportMetricsServiceRequest| g.metrics.push(r),
                ),
            )
            .route(
                "/v1/traces",
                post_to::<_, ExportTraceServiceResponse>(
                    &sink,
                    |g, r: ExportTraceServiceRequest| g.traces.push(r),
                ),
            );
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, sink, task }
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Waits until `done` holds of what it got, or `timeout` passes; false then.
    pub async fn wait_for(&self, timeout: Duration, done: impl Fn(&Received) -> bool) -> bool {
        let mut rx = self.sink.changed.subscribe();
        let wait = async {
            loop {
                if done(&self.sink.got.lock().unwrap()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    /// Runs `f` on what it got.
    pub fn with<T>(&self, f: impl FnOnce(&Received) -> T) -> T {
        f(&self.sink.got.lock().unwrap())
    }
}

impl Drop for OtlpReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A `POST` route that decodes one OTLP request message, keeps it with `keep` and answers with an
/// empty (successful) response.
fn post_to<Req, Res>(sink: &Sink, keep: fn(&mut Received, Req)) -> axum::routing::MethodRouter
where
    Req: Message + Default + Send + 'static,
    Res: Message + Default + 'static,
{
    let sink = sink.clone();
    axum::routing::post(
        move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                check_protobuf(&headers)?;
                let r = Req::decode(body)
                    .map_err(|e| (axum::http::StatusCode::BAD_REQUEST, e.to_string()))?;
                sink.push(|g| keep(g, r));
                Ok::<_, (axum::http::StatusCode, String)>(Res::default().encode_to_vec())
            }
        },
    )
}

fn check_protobuf(headers: &axum::http::HeaderMap) -> Result<(), (axum::http::StatusCode, String)> {
    let ct = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if ct != "application/x-protobuf" {
        return Err((
            axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
            format!("content type {ct}"),
        ));
    }
    Ok(())
}

/// A collector that accepts connections and never answers.
pub struct HungCollector {
    /// Where it listens.
    pub addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl HungCollector {
    /// Listens on 127.0.0.1:0, holding every connection open in silence.
    pub async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let task = tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((s, _)) = listener.accept().await {
                held.push(s);
            }
        });
        Self { addr, task }
    }
}

impl Drop for HungCollector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An address where nothing listens (bound, then closed).
pub async fn down_address() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// One data point of an exported metric, flattened.
#[derive(Debug, Clone, PartialEq)]
pub struct Point {
    /// Metric name.
    pub name: String,
    /// Unit.
    pub unit: String,
    /// Attributes, as strings.
    pub attrs: BTreeMap<String, String>,
    /// Sum or gauge value; a histogram's sum.
    pub value: f64,
    /// A histogram's count.
    pub count: Option<u64>,
    /// A histogram's bucket bounds.
    pub bounds: Vec<f64>,
    /// True for a monotonic cumulative sum.
    pub counter: bool,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        other => format!("{other:?}"),
    }
}

/// Attributes as a map of strings.
pub fn attrs(kv: &[KeyValue]) -> BTreeMap<String, String> {
    kv.iter().map(|k| (k.key.clone(), text(&k.value))).collect()
}

/// Every data point of one request, with its resource's attributes.
pub fn points(r: &ExportMetricsServiceRequest) -> (BTreeMap<String, String>, Vec<Point>) {
    use opentelemetry_proto::tonic::metrics::v1::number_data_point::Value;
    let num = |v: &Option<Value>| match v {
        Some(Value::AsDouble(d)) => *d,
        Some(Value::AsInt(i)) => *i as f64,
        None => f64::NAN,
    };
    let mut resource = BTreeMap::new();
    let mut out = Vec::new();
    for rm in &r.resource_metrics {
        if let Some(res) = &rm.resource {
            resource.extend(attrs(&res.attributes));
        }
        for sm in &rm.scope_metrics {
            for m in &sm.metrics {
                let base = |a: &[KeyValue]| Point {
                    name: m.name.clone(),
                    unit: m.unit.clone(),
                    attrs: attrs(a),
                    value: 0.0,
                    count: None,
                    bounds: Vec::new(),
                    counter: false,
                };
                match &m.data {
                    Some(Data::Sum(s)) => out.extend(s.data_points.iter().map(|p| Point {
                        value: num(&p.value),
                        counter: s.is_monotonic,
                        ..base(&p.attributes)
                    })),
                    Some(Data::Gauge(g)) => out.extend(g.data_points.iter().map(|p| Point {
                        value: num(&p.value),
                        ..base(&p.attributes)
                    })),
                    Some(Data::Histogram(h)) => out.extend(h.data_points.iter().map(|p| Point {
                        value: p.sum.unwrap_or(f64::NAN),
                        count: Some(p.count),
                        bounds: p.explicit_bounds.clone(),
                        ..base(&p.attributes)
                    })),
                    _ => {}
                }
            }
        }
    }
    (resource, out)
}

/// One exported span, flattened.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    /// Name.
    pub name: String,
    /// Trace id, hex.
    pub trace_id: String,
    /// Span id, hex.
    pub span_id: String,
    /// Parent span id, hex; empty for a root.
    pub parent_span_id: String,
    /// Attributes.
    pub attrs: BTreeMap<String, String>,
}

/// Every span received.
pub fn spans(r: &Received) -> Vec<SpanRecord> {
    let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
    r.traces
        .iter()
        .flat_map(|t| &t.resource_spans)
        .flat_map(|rs| &rs.scope_spans)
        .flat_map(|ss| &ss.spans)
        .map(|s| SpanRecord {
            name: s.name.clone(),
            trace_id: hex(&s.trace_id),
            span_id: hex(&s.span_id),
            parent_span_id: hex(&s.parent_span_id),
            attrs: attrs(&s.attributes),
        })
        .collect()
}
