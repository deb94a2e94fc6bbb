//! The agent's spans of a run, in the job's trace: the assignment's traceparent names the task's span,
//! and the agent's spans (fetching the artifacts, running the model, creating its sessions) are its
//! children. They go back with the run's result, and the coordinator exports them: an edge agent needs
//! no route to a collector.

use std::time::{SystemTime, UNIX_EPOCH};

use fleetbench_proto::v1::{AgentSpan, RunReport};

/// The trace context of one run; inert when the assignment carried none.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    trace_id: String,
    parent: String,
}

fn hex_ok(s: &str, len: usize) -> bool {
    s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit()) && s.bytes().any(|b| b != b'0')
}

fn unix_ns(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i64)
}

fn new_span_id() -> String {
    format!("{:016x}", rand::random::<u64>().max(1))
}

impl Trace {
    /// Reads a W3C traceparent (`00-TRACE-SPAN-FLAGS`); anything else gives an inert trace.
    pub fn from_traceparent(tp: &str) -> Self {
        let parts: Vec<&str> = tp.split('-').collect();
        match parts.as_slice() {
            [_, trace, span, _] if hex_ok(trace, 32) && hex_ok(span, 16) => Self {
                trace_id: trace.to_ascii_lowercase(),
                parent: span.to_ascii_lowercase(),
            },
            _ => Self::default(),
        }
    }

    /// The trace id, empty when inert (for log lines).
    pub fn trace_id(&self) -> &str {
        &self.trace_id
    }

    /// A span starting now, under the task's span.
    pub fn start(&self, name: &str) -> Open {
        Open {
            name: name.to_string(),
            span_id: new_span_id(),
            parent: self.parent.clone(),
            start: SystemTime::now(),
            live: !self.trace_id.is_empty(),
            attributes: Default::default(),
        }
    }

    /// The run's span, ending now, with what the run did, and its session creation under it (the
    /// runner opens its sessions first).
    pub fn run_spans(&self, mut run: Open, report: &RunReport) -> Vec<AgentSpan> {
        let session = Open {
            name: "fleetbench.agent.session_create".into(),
            span_id: new_span_id(),
            parent: run.span_id.clone(),
            start: run.start,
            live: run.live,
            attributes: Default::default(),
        };
        let session_end = run.start + std::time::Duration::from_nanos(report.session_create_ns);
        for (k, v) in [
            ("fleetbench.queries", report.queries.to_string()),
            ("fleetbench.samples", report.samples.to_string()),
            ("fleetbench.timed_ns", report.elapsed_ns.to_string()),
        ] {
            run.attributes.insert(k.into(), v);
        }
        if let Some(a) = report.accuracy {
            run.attributes
                .insert("fleetbench.accuracy".into(), a.to_string());
        }
        session
            .finish(session_end, "")
            .into_iter()
            .chain(run.end())
            .collect()
    }
}

/// A span in progress.
#[derive(Debug)]
pub struct Open {
    name: String,
    span_id: String,
    parent: String,
    start: SystemTime,
    live: bool,
    attributes: std::collections::HashMap<String, String>,
}

impl Open {
    fn finish(self, end: SystemTime, error: &str) -> Option<AgentSpan> {
        self.live.then(|| AgentSpan {
            name: self.name,
            span_id: self.span_id,
            parent_span_id: self.parent,
            start_unix_ns: unix_ns(self.start),
            end_unix_ns: unix_ns(end),
            attributes: self.attributes,
            error: error.to_string(),
        })
    }

    /// Ends it now; None when the trace is inert.
    pub fn end(self) -> Option<AgentSpan> {
        self.finish(SystemTime::now(), "")
    }

    /// Ends it now as failed, with the reason.
    pub fn end_with_error(self, error: &str) -> Option<AgentSpan> {
        self.finish(SystemTime::now(), error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_traceparent_gives_the_parent_of_the_agents_spans() {
        let t = Trace::from_traceparent("00-0123456789abcdef0123456789abcdef-00f067aa0ba902b7-01");
        assert_eq!(t.trace_id(), "0123456789abcdef0123456789abcdef");
        let s = t.start("fleetbench.agent.fetch").end().unwrap();
        assert_eq!(s.parent_span_id, "00f067aa0ba902b7");
        assert_eq!(s.span_id.len(), 16);
        assert!(s.end_unix_ns >= s.start_unix_ns);
        let report = RunReport {
            queries: 3,
            session_create_ns: 1_000,
            ..Default::default()
        };
        let run = t.start("fleetbench.agent.run");
        let run_id = run.span_id.clone();
        let spans = t.run_spans(run, &report);
        assert_eq!(spans.len(), 2);
        assert_eq!(
            spans[0].parent_span_id, run_id,
            "session creation is under the run"
        );
        assert_eq!(spans[1].attributes["fleetbench.queries"], "3");
    }

    #[test]
    fn without_a_traceparent_no_span_is_made() {
        for tp in [
            "",
            "garbage",
            "00-0000-1111-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
        ] {
            assert!(
                Trace::from_traceparent(tp).start("x").end().is_none(),
                "{tp}"
            );
        }
    }
}
