//! Which runs may be pooled into one ranking row: those that did the same work the same way. The key
//! holds everything that changes the work — scenario and its parameters, batch, streams, threads,
//! graph optimization, execution provider, input shapes, input data, warm-up, outstanding cap, latency
//! bound — and the reproducibility record that changes how it ran: agent and ONNX Runtime versions and
//! the providers that actually ran the graph, and whether its memory was on huge pages. How long a run lasted, its seed and its stopping rules do
//! not change the work, so runs that differ only there pool.
//!
//! Runs stored before the key existed carry `legacy:` and their old configuration label: they pool
//! only with each other, and rankings say so.

use std::collections::BTreeMap;

use fleetbench_common::config::{
    config_label, graph_optimization_name, scenario_name, slo_label, token_lengths_label,
};
use serde::{Deserialize, Serialize};

use crate::domain::{RunConfig, Scenario};

/// Prefix of the keys the migration gave runs stored before keys existed.
pub const LEGACY_PREFIX: &str = "legacy:";

/// What makes two runs comparable.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct PoolKey {
    /// Scenario name.
    pub scenario: String,
    /// Samples per query.
    pub batch_size: u32,
    /// Streams issuing queries (1 for single-stream).
    pub streams: u32,
    /// Intra-op threads per session.
    pub intra_op_threads: u32,
    /// Graph optimization level.
    pub graph_optimization: String,
    /// Execution provider asked for.
    pub execution_provider: String,
    /// Input shapes given, `name=1x3x224x224`, sorted.
    pub shapes: Vec<String>,
    /// sha256 of the input data; empty for seeded random inputs.
    pub input_data_sha256: String,
    /// Untimed queries before the timed phase.
    pub warmup_iterations: u64,
    /// Target QPS (server scenario; 0 otherwise).
    pub target_qps_milli: u64,
    /// Latency bound in microseconds (server and max-qps; 0 otherwise).
    pub latency_bound_us: u64,
    /// Outstanding-query cap (server and max-qps; 0 otherwise).
    pub max_outstanding: u32,
    /// fleetbench-agent version.
    pub agent_version: String,
    /// ONNX Runtime version.
    pub ort_version: String,
    /// Execution providers that ran the graph's nodes, sorted.
    pub providers_used: Vec<String>,
    /// Generate scenario: prompt and output lengths, request rate (or `max`) and outstanding cap,
    /// sampling and SLO, e.g. `p128 o64 rate=2 out=1024 greedy slo=ttft_ms=500`; empty (and not stored) otherwise,
    /// so keys of other scenarios read as before.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub generate: String,
    /// Whether ONNX Runtime's memory was on transparent huge pages (the agent's `huge_pages`; the
    /// record's `memory.huge_pages`): it moves decode speed by several percent. Not stored when false,
    /// so keys of runs without it read as before.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub huge_pages: bool,
}

fn generate_key(c: &RunConfig) -> String {
    let Some(g) = c
        .generate
        .as_ref()
        .filter(|_| c.scenario == Scenario::Generate)
    else {
        return String::new();
    };
    let mut s = format!(
        "p{} o{}",
        token_lengths_label(&g.prompt_tokens),
        token_lengths_label(&g.output_tokens)
    );
    if g.request_rate > 0.0 {
        s.push_str(&format!(
            " rate={} out={}",
            g.request_rate, c.max_outstanding
        ));
    }
    if g.max_rate {
        s.push_str(&format!(" rate=max out={}", c.max_outstanding));
    }
    if g.temperature > 0.0 {
        s.push_str(&format!(" temp={} top_k={}", g.temperature, g.top_k));
    } else {
        s.push_str(" greedy");
    }
    if g.has_slo() {
        s.push_str(&format!(" slo={}", slo_label(g)));
    }
    s
}

impl PoolKey {
    /// The key of a run with effective configuration `c` and reproducibility record `record_json`.
    pub fn of(c: &RunConfig, record_json: &str) -> PoolKey {
        let record: serde_json::Value = serde_json::from_str(record_json).unwrap_or_default();
        let text = |k: &str| {
            record
                .get(k)
                .and_then(|v| v.as_str())
                .unwrap_or("?")
                .to_string()
        };
        let mut providers_used: Vec<String> = record
            .get("providers_used")
            .and_then(|u| u.as_object())
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        providers_used.sort();
        let mut shapes: Vec<String> = c
            .shapes
            .iter()
            .map(|s| {
                let dims: Vec<String> = s.dims.iter().map(|d| d.to_string()).collect();
                format!("{}={}", s.name, dims.join("x"))
            })
            .collect();
        shapes.sort();
        let loaded = matches!(c.scenario, Scenario::Server | Scenario::MaxQps);
        PoolKey {
            scenario: scenario_name(c.scenario).to_string(),
            batch_size: c.batch_size.max(1),
            streams: match c.scenario {
                Scenario::SingleStream => 1,
                _ => c.concurrency.max(1),
            },
            intra_op_threads: c.intra_op_threads,
            graph_optimization: graph_optimization_name(c.graph_optimization).to_string(),
            execution_provider: if c.execution_provider.is_empty() {
                "cpu".into()
            } else {
                c.execution_provider.clone()
            },
            shapes,
            input_data_sha256: c.input_data_sha256.clone(),
            warmup_iterations: c.warmup_iterations,
            target_qps_milli: if c.scenario == Scenario::Server {
                (c.target_qps * 1000.0).round() as u64
            } else {
                0
            },
            latency_bound_us: if loaded {
                (c.latency_bound_ms * 1000.0).round() as u64
            } else {
                0
            },
            max_outstanding: if loaded { c.max_outstanding } else { 0 },
            agent_version: text("agent_version"),
            ort_version: text("ort_version"),
            providers_used,
            generate: generate_key(c),
            huge_pages: record
                .pointer("/memory/huge_pages")
                .and_then(|v| v.as_bool())
                .unwrap_or(false),
        }
    }

    /// The stored form: canonical JSON (fields in declaration order).
    pub fn encode(&self) -> String {
        serde_json::to_string(self).expect("a pool key serializes")
    }

    /// Reads a stored key; None for a legacy key (or one that does not parse).
    pub fn decode(stored: &str) -> Option<PoolKey> {
        if is_legacy(stored) {
            return None;
        }
        serde_json::from_str(stored).ok()
    }

    /// The parts a configuration label does not already show, by name, as shown in a label.
    fn extras(&self) -> BTreeMap<&'static str, String> {
        let mut m = BTreeMap::new();
        m.insert(
            "shape",
            if self.shapes.is_empty() {
                "model's".into()
            } else {
                self.shapes.join(",")
            },
        );
        m.insert(
            "input",
            if self.input_data_sha256.is_empty() {
                "random".into()
            } else {
                self.input_data_sha256[..12.min(self.input_data_sha256.len())].to_string()
            },
        );
        m.insert("warmup", self.warmup_iterations.to_string());
        m.insert("max-outstanding", self.max_outstanding.to_string());
        m.insert(
            "bound",
            format!("{}ms", self.latency_bound_us as f64 / 1000.0),
        );
        m.insert("agent", self.agent_version.clone());
        m.insert("ort", self.ort_version.clone());
        m.insert(
            "pages",
            if self.huge_pages { "huge" } else { "small" }.into(),
        );
        m.insert(
            "slo",
            self.generate
                .split(" slo=")
                .nth(1)
                .unwrap_or("none")
                .to_string(),
        );
        m.insert(
            "ran-on",
            self.providers_used
                .iter()
                .map(|p| p.trim_end_matches("ExecutionProvider"))
                .collect::<Vec<_>>()
                .join("+"),
        );
        m
    }
}

/// True for the key the migration gave a run stored before keys existed.
pub fn is_legacy(stored: &str) -> bool {
    stored.starts_with(LEGACY_PREFIX)
}

/// The configuration label of a run (the same words `jobs show` uses).
pub fn base_label(c: &RunConfig) -> String {
    config_label(c)
}

/// Labels for rows: each row's base label, plus every key part whose value is not the same across
/// all the rows, so a row says what sets it apart from its neighbours. Legacy rows keep their label.
pub fn labels(rows: &[(String, &str)]) -> Vec<String> {
    let keys: Vec<Option<PoolKey>> = rows.iter().map(|(_, k)| PoolKey::decode(k)).collect();
    let extras: Vec<Option<BTreeMap<&'static str, String>>> = keys
        .iter()
        .map(|k| k.as_ref().map(PoolKey::extras))
        .collect();
    let mut differing: Vec<&'static str> = Vec::new();
    if let Some(first) = extras.iter().flatten().next() {
        for name in first.keys() {
            let mut values = extras.iter().flatten().map(|e| &e[name]);
            let v0 = values.next();
            if values.any(|v| Some(v) != v0) {
                differing.push(name);
            }
        }
    }
    rows.iter()
        .zip(&extras)
        .map(|((base, _), extra)| match extra {
            Some(e) => {
                let mut label = base.clone();
                for name in &differing {
                    label.push_str(&format!(" {name}={}", e[name]));
                }
                label
            }
            None => base.clone(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::InputShape;

    fn record() -> String {
        serde_json::json!({
            "agent_version": "0.2.0",
            "ort_version": "1.31.1",
            "providers_used": {"CPUExecutionProvider": 3},
        })
        .to_string()
    }

    fn shaped(side: i64) -> RunConfig {
        RunConfig {
            batch_size: 1,
            shapes: vec![InputShape {
                name: "x".into(),
                dims: vec![1, 3, side, side],
            }],
            ..Default::default()
        }
    }

    #[test]
    fn what_changes_the_work_is_in_the_key_and_what_does_not_is_not() {
        let a = PoolKey::of(&shaped(160), &record());
        assert_ne!(a, PoolKey::of(&shaped(480), &record()));
        let mut longer = shaped(160);
        longer.duration_ms = 60_000;
        longer.seed = 9;
        longer.min_queries = 5000;
        assert_eq!(
            a,
            PoolKey::of(&longer, &record()),
            "length and seed do not change the work"
        );
        let mut warm = shaped(160);
        warm.warmup_iterations = 500;
        assert_ne!(a, PoolKey::of(&warm, &record()));
        let mut data = shaped(160);
        data.input_data_sha256 = "ab".repeat(32);
        assert_ne!(a, PoolKey::of(&data, &record()));
        let other_runtime = record().replace("1.31.1", "1.30.0");
        assert_ne!(a, PoolKey::of(&shaped(160), &other_runtime));
        let fell_back = serde_json::json!({
            "agent_version": "0.2.0", "ort_version": "1.31.1",
            "providers_used": {"CPUExecutionProvider": 1, "CUDAExecutionProvider": 2},
        })
        .to_string();
        assert_ne!(a, PoolKey::of(&shaped(160), &fell_back));
        assert_eq!(PoolKey::decode(&a.encode()), Some(a));
        assert_eq!(PoolKey::decode("legacy:single-stream b1"), None);
    }

    #[test]
    fn runs_on_huge_pages_pool_apart_and_older_keys_read_as_before() {
        let small = PoolKey::of(&shaped(160), &record());
        let on = |huge: bool| {
            let mut r: serde_json::Value = serde_json::from_str(&record()).unwrap();
            r["memory"] =
                serde_json::json!({"transparent_huge_pages": "madvise", "huge_pages": huge});
            PoolKey::of(&shaped(160), &r.to_string())
        };
        assert!(on(true).huge_pages);
        assert_ne!(small, on(true));
        assert_eq!(small, on(false), "a record without memory is small pages");
        // Keys of runs on small pages encode as keys did before the field existed.
        assert!(!small.encode().contains("huge_pages"), "{}", small.encode());
        assert_eq!(PoolKey::decode(&on(true).encode()), Some(on(true)));
        let rows = [
            ("single-stream b1".to_string(), small.encode()),
            ("single-stream b1".to_string(), on(true).encode()),
        ];
        let l = labels(
            &rows
                .iter()
                .map(|(a, b)| (a.clone(), b.as_str()))
                .collect::<Vec<_>>(),
        );
        assert_eq!(l[0], "single-stream b1 pages=small");
        assert_eq!(l[1], "single-stream b1 pages=huge");
    }

    #[test]
    fn labels_show_what_differs_from_the_neighbours() {
        let small = PoolKey::of(&shaped(160), &record()).encode();
        let big = PoolKey::of(&shaped(480), &record()).encode();
        let rows = vec![
            ("single-stream b1".to_string(), small.as_str()),
            ("single-stream b1".to_string(), big.as_str()),
            ("single-stream b1".to_string(), "legacy:single-stream b1"),
        ];
        let l = labels(&rows);
        assert_eq!(l[0], "single-stream b1 shape=x=1x3x160x160");
        assert_eq!(l[1], "single-stream b1 shape=x=1x3x480x480");
        assert_eq!(l[2], "single-stream b1");
    }
}
