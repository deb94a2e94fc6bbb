//! Traces: one per job. Its ids come from the job's and runs' ids (the trace id *is* the job id; a
//! span id is a hash of what it stands for), so any replica, before or after a restart, adds spans to
//! a job's trace without storing trace context:
//!
//! - `fleetbench.job.submit` (root): validation and expansion into tasks;
//! - `fleetbench.task` per run: from the lease to the stored result, on the agent that ran it;
//! - the agent's spans (`fleetbench.agent.fetch`, `fleetbench.agent.run`, …), children of the task's
//!   span, whose context the agent got in its assignment; they come back with the run's result over
//!   the agent's session (an edge agent may not reach a collector) and are exported from here;
//! - `fleetbench.summary`: the coordinator turning the run's windows into its figures.
//!
//! Spans are built whole (ids, times, attributes) and handed to a batch processor with the OTLP span
//! exporter; nothing waits on export.

use std::borrow::Cow;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::metrics::Counter;
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, SpanData, SpanEvents, SpanExporter, SpanLinks,
    SpanProcessor,
};
use sha2::{Digest, Sha256};

use super::export::{Counted, OtlpSettings};
use crate::domain::AgentSpan;
use crate::error::Result;

/// The trace id of a job: its id, which is 32 hex digits.
pub fn trace_id_of(job_id: &str) -> Option<TraceId> {
    (job_id.len() == 32)
        .then(|| TraceId::from_hex(job_id).ok())
        .flatten()
        .filter(|t| *t != TraceId::INVALID)
}

/// The span id of `what` named `id` (a hash, never zero).
pub fn span_id_of(what: &str, id: &str) -> SpanId {
    let h = Sha256::new()
        .chain_update(what.as_bytes())
        .chain_update([0])
        .chain_update(id.as_bytes())
        .finalize();
    let n = u64::from_be_bytes(h[..8].try_into().expect("8 bytes"));
    SpanId::from(n.max(1))
}

/// The W3C traceparent an agent gets with a run: the task's span in the job's trace.
pub fn traceparent(job_id: &str, run_id: &str) -> String {
    match trace_id_of(job_id) {
        Some(t) => format!("00-{t}-{}-01", span_id_of("task", run_id)),
        None => String::new(),
    }
}

/// A finished run, as its task span describes it.
pub struct FinishedTask<'a> {
    /// Job id.
    pub job_id: &'a str,
    /// Task id.
    pub task_id: &'a str,
    /// Run id.
    pub run_id: &'a str,
    /// Agent name.
    pub agent: &'a str,
    /// Platform id.
    pub platform_id: &'a str,
    /// Variant.
    pub variant: &'a str,
    /// When the lease began, Unix ms.
    pub leased_at_ms: i64,
    /// Final state.
    pub state: &'a str,
    /// Why it failed; empty when it did not.
    pub error: &'a str,
    /// The agent's spans.
    pub agent_spans: &'a [AgentSpan],
    /// When summarising began.
    pub summary_started: SystemTime,
}

fn at_ms(ms: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64)
}

fn at_ns(ns: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_nanos(ns.max(0) as u64)
}

/// Where spans go; off when no collector is configured.
pub struct Traces {
    processor: Option<BatchSpanProcessor>,
    scope: InstrumentationScope,
}

impl Traces {
    /// Spans exported to the collector `settings` name, with `resource`; failures counted into
    /// `failures`.
    pub fn new(
        settings: Option<&OtlpSettings>,
        resource: &Resource,
        failures: Arc<OnceLock<Counter<u64>>>,
    ) -> Result<Self> {
        let scope = InstrumentationScope::builder("fleetbench-coordinator")
            .with_version(env!("CARGO_PKG_VERSION"))
            .build();
        let Some(settings) = settings else {
            return Ok(Self {
                processor: None,
                scope,
            });
        };
        let exporter = super::export::span_exporter(settings, failures)?;
        // Spans go out on the metrics' interval; a queue of 65,536 holds about a minute of a busy
        // fleet's spans while a collector is away (beyond it spans are dropped, never waited for).
        let config = BatchConfigBuilder::default()
            .with_scheduled_delay(Duration::from_millis(settings.interval_ms))
            .with_max_queue_size(65_536)
            .build();
        let mut processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(config)
            .build();
        processor.set_resource(resource);
        Ok(Self {
            processor: Some(processor),
            scope,
        })
    }

    /// Off: spans go nowhere.
    pub fn off() -> Self {
        Self {
            processor: None,
            scope: InstrumentationScope::builder("fleetbench-coordinator").build(),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &self,
        trace: TraceId,
        span: SpanId,
        parent: SpanId,
        name: impl Into<Cow<'static, str>>,
        kind: SpanKind,
        start: SystemTime,
        end: SystemTime,
        attributes: Vec<KeyValue>,
        error: &str,
    ) {
        let Some(p) = &self.processor else { return };
        p.on_end(SpanData {
            span_context: SpanContext::new(
                trace,
                span,
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: parent,
            parent_span_is_remote: false,
            span_kind: kind,
            name: name.into(),
            start_time: start,
            end_time: end.max(start),
            attributes,
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status: if error.is_empty() {
                Status::Ok
            } else {
                Status::error(error.to_string())
            },
            instrumentation_scope: self.scope.clone(),
        });
    }

    /// A job was submitted: the root span, from `started` to now.
    pub fn job_submitted(&self, job_id: &str, model: &str, tasks: u32, started: SystemTime) {
        let Some(trace) = trace_id_of(job_id) else {
            return;
        };
        self.emit(
            trace,
            span_id_of("job", job_id),
            SpanId::INVALID,
            "fleetbench.job.submit",
            SpanKind::Server,
            started,
            SystemTime::now(),
            vec![
                KeyValue::new("fleetbench.job.id", job_id.to_string()),
                KeyValue::new("fleetbench.model", model.to_string()),
                KeyValue::new("fleetbench.tasks", tasks as i64),
            ],
            "",
        );
    }

    /// A run ended: its task span, the agent's spans under it, and the summary span.
    pub fn task_finished(&self, t: &FinishedTask) {
        let Some(trace) = trace_id_of(t.job_id) else {
            return;
        };
        let task_span = span_id_of("task", t.run_id);
        let now = SystemTime::now();
        self.emit(
            trace,
            task_span,
            span_id_of("job", t.job_id),
            "fleetbench.task",
            SpanKind::Internal,
            at_ms(t.leased_at_ms),
            now,
            vec![
                KeyValue::new("fleetbench.task.id", t.task_id.to_string()),
                KeyValue::new("fleetbench.run.id", t.run_id.to_string()),
                KeyValue::new("fleetbench.agent", t.agent.to_string()),
                KeyValue::new("fleetbench.platform.id", t.platform_id.to_string()),
                KeyValue::new("fleetbench.variant", t.variant.to_string()),
                KeyValue::new("fleetbench.run.state", t.state.to_string()),
            ],
            t.error,
        );
        for s in t.agent_spans {
            let mut attributes: Vec<KeyValue> = s
                .attributes
                .iter()
                .map(|(k, v)| KeyValue::new(k.clone(), v.clone()))
                .collect();
            attributes.push(KeyValue::new("fleetbench.agent", t.agent.to_string()));
            self.emit(
                trace,
                SpanId::from(s.span_id),
                SpanId::from(s.parent_span_id),
                s.name.clone(),
                SpanKind::Internal,
                at_ns(s.start_unix_ns),
                at_ns(s.end_unix_ns),
                attributes,
                &s.error,
            );
        }
        self.emit(
            trace,
            span_id_of("summary", t.run_id),
            task_span,
            "fleetbench.summary",
            SpanKind::Internal,
            t.summary_started,
            now,
            vec![KeyValue::new("fleetbench.run.id", t.run_id.to_string())],
            "",
        );
    }

    /// Exports what is pending and stops, within `timeout`.
    pub fn shutdown(&self, timeout: Duration) -> OTelSdkResult {
        match &self.processor {
            Some(p) => p.shutdown_with_timeout(timeout),
            None => Ok(()),
        }
    }
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let r = self.inner.export(batch).await;
        if let Err(e) = &r {
            self.failed(e);
        }
        r
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_jobs_trace_id_is_its_id_and_span_ids_are_stable() {
        let job = "0123456789abcdef0123456789abcdef";
        assert_eq!(trace_id_of(job).unwrap().to_string(), job);
        assert_eq!(trace_id_of("not-a-job-id"), None);
        assert_eq!(span_id_of("task", "r1"), span_id_of("task", "r1"));
        assert_ne!(span_id_of("task", "r1"), span_id_of("summary", "r1"));
        let tp = traceparent(job, "r1");
        assert_eq!(tp, format!("00-{job}-{}-01", span_id_of("task", "r1")));
    }
}
