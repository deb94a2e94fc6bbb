//! fleetbench's `int4-weight-only` recipe against onnxruntime's own `MatMulNBitsQuantizer` on the same
//! decoder: the recipe runs here (fleetbench's optimizer, in Rust), then `scripts/int4_compare.py`
//! quantizes the same base with onnxruntime's quantizer and measures both — size, MatMulNBits nodes,
//! fidelity to the base with teacher forcing (next-token top-1 agreement and logits cosine over one
//! seeded sequence), and greedy TTFT, TPOT and tokens/s (median of `--runs` runs after a warm-up, the
//! onnxruntime Python loop of `scripts/ort_greedy.py`, pinned to `--cpus`).
//!
//!     cargo bench -p fleetbench-tests --bench int4 -- [--size gpt2-small|tiny] [--block-size 32]
//!         [--symmetric] [--prompt 128] [--output 64] [--threads 1] [--runs 5] [--cpus 0]
//!
//! The quantizer needs `onnx-ir` (in requirements.txt). gpt2-small's random weights make its greedy
//! choice the input token at every position, so its agreement says little; tiny-llama's is the
//! meaningful fidelity figure.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use fleetbench_optimizer::{Int4Params, Recipe};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn python() -> PathBuf {
    std::env::var_os("FLEETBENCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"))
}

fn arg(args: &[String], name: &str, default: &str) -> String {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .cloned()
        .unwrap_or_else(|| default.to_string())
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let size = arg(&args, "--size", "gpt2-small");
    let block_size: u32 = arg(&args, "--block-size", "32").parse().unwrap();
    let symmetric = args.iter().any(|a| a == "--symmetric");
    let cpus = arg(&args, "--cpus", "0");
    let (base, out) = match size.as_str() {
        "tiny" => (
            repo().join("models/llm/tiny-llama.onnx"),
            std::env::temp_dir().join("tiny-llama-fleetbench-int4.onnx"),
        ),
        "gpt2-small" => (
            repo().join("models/llm-large/gpt2-small-llama.onnx"),
            repo().join("models/llm-large/gpt2-small-llama-fleetbench-int4.onnx"),
        ),
        other => panic!("--size: '{other}' is not tiny or gpt2-small"),
    };
    if !base.exists() {
        let ok = Command::new(python())
            .arg(repo().join("models/make_llm.py"))
            .args(["--size", &size])
            .status()
            .expect("run models/make_llm.py");
        assert!(ok.success(), "models/make_llm.py --size {size} failed");
    }
    let bytes = std::fs::read(&base).unwrap();
    let model = fleetbench_optimizer::decode(&bytes).unwrap();
    let recipe = Recipe::Int4WeightOnly(Int4Params {
        block_size,
        symmetric,
        accuracy_level: 0,
    });
    let t = Instant::now();
    let outcome =
        fleetbench_optimizer::optimize(&model, bytes.len() as u64, &recipe, None).unwrap();
    let quantize_s = t.elapsed().as_secs_f64();
    std::fs::write(&out, outcome.encode()).unwrap();
    drop((bytes, model));
    let mut cmd = Command::new("taskset");
    cmd.args(["-c", &cpus])
        .arg(python())
        .arg(repo().join("scripts/int4_compare.py"))
        .arg(&base)
        .arg(&out)
        .args(["--block-size", &block_size.to_string()]);
    if symmetric {
        cmd.arg("--symmetric");
    }
    for flag in ["--prompt", "--output", "--threads", "--runs"] {
        if let Some(i) = args.iter().position(|a| a == flag) {
            cmd.arg(flag).arg(&args[i + 1]);
        }
    }
    let res = cmd.output().expect("run scripts/int4_compare.py");
    assert!(
        res.status.success(),
        "scripts/int4_compare.py: {}",
        String::from_utf8_lossy(&res.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&res.stdout).expect("its JSON");
    let c = &v["config"];
    println!(
        "{} int4 (block {block_size}, {}), prompt {}, output {}, {} thread(s) on CPU {cpus}, onnxruntime {}, median of {} runs; \
         fidelity over {} teacher-forced tokens",
        base.file_name().unwrap().to_string_lossy(),
        if symmetric {
            "symmetric"
        } else {
            "zero points"
        },
        c["prompt"],
        c["output"],
        c["threads"],
        c["onnxruntime"].as_str().unwrap_or("?"),
        c["runs"],
        c["tokens"]
    );
    println!(
        "fleetbench's recipe took {quantize_s:.1} s; it rewrote {} MatMul and skipped {}",
        outcome.report.rewritten.len(),
        outcome.report.skipped.len()
    );
    println!(
        "{:<28} {:>12} {:>6} {:>8} {:>8} {:>9} {:>9} {:>10}",
        "", "bytes", "NBits", "top-1", "cosine", "TTFT ms", "TPOT ms", "tokens/s"
    );
    let f = |x: &serde_json::Value| x.as_f64().unwrap_or(f64::NAN);
    for (name, key) in [
        ("fp32 base", "base"),
        ("fleetbench int4-weight-only", "fleetbench"),
        ("ORT MatMulNBitsQuantizer", "ort"),
    ] {
        let r = &v[key];
        println!(
            "{:<28} {:>12} {:>6} {:>8} {:>8} {:>9.2} {:>9.3} {:>10.1}",
            name,
            r["bytes"].as_u64().unwrap_or(0),
            r["matmulnbits_nodes"]
                .as_u64()
                .map_or("-".into(), |n| n.to_string()),
            r["fidelity"]["top1_agreement"]
                .as_f64()
                .map_or("-".into(), |a| format!("{a:.4}")),
            r["fidelity"]["cosine"]
                .as_f64()
                .map_or("-".into(), |a| format!("{a:.5}")),
            f(&r["ttft_ms"]),
            f(&r["tpot_ms"]),
            f(&r["tokens_per_s"]),
        );
    }
}
