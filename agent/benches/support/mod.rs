//! Shared by the agent's benchmarks: the runtime, the bundled model, and a task runner that returns
//! the merged latency histogram of a run.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;

use fleetbench_agent::runner::{ModelRunner, OrtRunner, PreparedTask};
use fleetbench_common::domain::RunConfig;
use fleetbench_common::hist::{self, LatencyHistogram};
use fleetbench_proto::v1::{ModelVariant, RunReport, TaskAssignment};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The bundled fp32 digits model.
pub fn digits() -> PathBuf {
    repo().join("models/digits/digits-fp32.onnx")
}

/// The runtime (ORT_DYLIB_PATH, or the one in .venv).
pub fn runner() -> OrtRunner {
    let lib = std::env::var_os("ORT_DYLIB_PATH")
        .map(PathBuf::from)
        .or_else(|| fleetbench_runtime::load::find_in_venv(&repo()))
        .expect("set ORT_DYLIB_PATH or run `scripts/dev.sh setup` first");
    OrtRunner {
        runtime: fleetbench_runtime::load(Some(&lib)).expect("ONNX Runtime loads"),
        huge_pages: true,
    }
}

/// Python with onnxruntime (FLEETBENCH_PYTHON, else .venv/bin/python).
pub fn python() -> PathBuf {
    std::env::var_os("FLEETBENCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"))
}

/// Runs `model` with `config` through the agent's runner; returns the report and the merged histogram
/// of its windows (what the coordinator would store).
pub fn run(
    runner: &OrtRunner,
    model: &Path,
    config: RunConfig,
) -> (RunReport, LatencyHistogram, usize) {
    let task = PreparedTask {
        pins: Default::default(),
        assignment: TaskAssignment {
            task_id: "bench".into(),
            run_id: uuid_like(),
            job_id: "bench".into(),
            attempt: 1,
            variant: Some(ModelVariant::default()),
            config: Some((&config).into()),
            base_artifact_sha256: String::new(),
            traceparent: String::new(),
        },
        config,
        model_path: model.to_path_buf(),
        eval: None,
        base_model_path: None,
        input_data: None,
        cpus: fleetbench_agent::inventory::affinity(),
        host_id: "bench".into(),
    };
    let mut merged = hist::new_histogram();
    let mut windows = 0;
    let mut emit = |w: fleetbench_proto::v1::TelemetryWindow| {
        hist::merge(&mut merged, &hist::decode(&w.latency_histogram).unwrap()).unwrap();
        windows += 1;
    };
    let report = match runner.run(&task, &mut emit, &AtomicBool::new(false)) {
        Ok(r) => r,
        Err(e) => panic!("run failed: {e:?}"),
    };
    (report, merged, windows)
}

fn uuid_like() -> String {
    format!(
        "{:032x}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    )
}

/// Value of `--name VALUE` among the bench's arguments.
pub fn arg(name: &str) -> Option<String> {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

/// Median of a few numbers.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}
