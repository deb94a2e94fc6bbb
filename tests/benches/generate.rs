//! Decoding speed of fleetbench's generation loop (the runtime's `decoder::generate`: prefill, then one
//! call per token with the present KV tensors moved into the next call's past) beside a plain Python
//! onnxruntime greedy loop on the same model, prompt, output length and threads, pinned to the same
//! cores. Median of `--runs` runs after one warm-up run each.
//!
//!     cargo bench -p fleetbench-tests --bench generate -- [--size tiny|gpt2-small] [--prompt 128]
//!         [--output 64] [--threads 1] [--runs 5] [--cpus 0]
//!
//! `--size gpt2-small` writes the GPT-2-small-shaped decoder (`models/make_llm.py`, seeded random
//! weights, ~500 MB, git-ignored) on first use; `--model PATH` benchmarks another decoder file (an
//! int4 variant, say). onnxruntime-genai runs beside them when `.venv-genai` holds it
//! (`python3 -m venv .venv-genai && .venv-genai/bin/pip install onnxruntime-genai onnx`;
//! `scripts/genai_greedy.py` writes its genai_config.json); its wheel brings its own ONNX Runtime,
//! whose version the table names.

use std::path::{Path, PathBuf};
use std::process::Command;

use fleetbench_runtime::decoder::{DecoderIo, generate};

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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// TTFT (ms), TPOT (ms) and output tokens/s of one request.
fn figures(token_ready_ns: &[u64]) -> (f64, f64, f64) {
    let ttft = token_ready_ns[0] as f64 / 1e6;
    let e2e = *token_ready_ns.last().unwrap() as f64 / 1e6;
    let n = token_ready_ns.len();
    let tpot = if n > 1 {
        (e2e - ttft) / (n - 1) as f64
    } else {
        0.0
    };
    (ttft, tpot, n as f64 / (e2e / 1e3))
}

fn pin(cpus: &str) {
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for c in cpus.split(',') {
        let c: usize = c
            .trim()
            .parse()
            .expect("--cpus: a comma-separated list of CPU numbers");
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: a valid cpu_set_t for this thread (pid 0), before ONNX Runtime starts its threads.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
    assert_eq!(rc, 0, "sched_setaffinity");
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let size = arg(&args, "--size", "tiny");
    let prompt_len: usize = arg(&args, "--prompt", "128").parse().unwrap();
    let output: usize = arg(&args, "--output", "64").parse().unwrap();
    let threads: usize = arg(&args, "--threads", "1").parse().unwrap();
    let runs: usize = arg(&args, "--runs", "5").parse().unwrap();
    let cpus = arg(&args, "--cpus", "0");
    let model = match (arg(&args, "--model", ""), size.as_str()) {
        (m, _) if !m.is_empty() => PathBuf::from(m),
        (_, "tiny") => repo().join("models/llm/tiny-llama.onnx"),
        (_, "gpt2-small") => repo().join("models/llm-large/gpt2-small-llama.onnx"),
        (_, other) => panic!("--size: '{other}' is not tiny or gpt2-small"),
    };
    if !model.exists() {
        let ok = Command::new(python())
            .arg(repo().join("models/make_llm.py"))
            .args(["--size", &size])
            .status()
            .expect("run models/make_llm.py");
        assert!(ok.success(), "models/make_llm.py --size {size} failed");
    }
    pin(&cpus);
    let rt = fleetbench_runtime::load(None)
        .expect("load ONNX Runtime (run `eval \"$(scripts/dev.sh env)\"`)");
    let mut session = ort::session::Session::builder(&rt.env)
        .unwrap()
        .with_intra_threads(threads)
        .unwrap()
        .with_inter_threads(1)
        .unwrap()
        .commit_from_file(&model)
        .unwrap();
    let io = DecoderIo::detect(&session).unwrap();
    let vocab = io.vocab.unwrap_or(512);
    let prompt: Vec<i64> = (0..prompt_len as i64)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    let mut ours = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..=runs {
        let g = generate(&mut session, &io, &prompt, output).unwrap();
        assert_eq!(g.tokens.len(), output);
        if run > 0 {
            let (a, b, c) = figures(&g.token_ready_ns);
            ours.0.push(a);
            ours.1.push(b);
            ours.2.push(c);
        }
    }
    drop(session);
    // The Python loops, pinned to the same cores.
    let peer = |python: &Path, script: &str| -> Option<serde_json::Value> {
        let out = Command::new("taskset")
            .args(["-c", &cpus])
            .arg(python)
            .arg(repo().join("scripts").join(script))
            .arg(&model)
            .args([
                "--prompt",
                &prompt_len.to_string(),
                "--output",
                &output.to_string(),
            ])
            .args([
                "--threads",
                &threads.to_string(),
                "--runs",
                &runs.to_string(),
            ])
            .output()
            .unwrap_or_else(|e| panic!("run scripts/{script}: {e}"));
        if !out.status.success() {
            eprintln!(
                "scripts/{script}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(serde_json::from_slice(&out.stdout).expect("its JSON"))
    };
    let py = peer(&python(), "ort_greedy.py").expect("the onnxruntime Python loop runs");
    let genai_python = repo().join(".venv-genai/bin/python");
    let genai = genai_python
        .exists()
        .then(|| peer(&genai_python, "genai_greedy.py"))
        .flatten();
    let col = |v: &serde_json::Value, k: &str| -> Vec<f64> {
        v[k].as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    println!(
        "{} ({} layers, KV {} B/token), prompt {prompt_len}, output {output}, {threads} thread(s) on CPU {cpus}, median of {runs} runs after a warm-up",
        model.file_name().unwrap().to_string_lossy(),
        io.layers(),
        io.kv_bytes_per_token()
    );
    println!(
        "{:<28} {:>10} {:>10} {:>12}",
        "", "TTFT ms", "TPOT ms", "tokens/s"
    );
    println!(
        "{:<28} {:>10.2} {:>10.3} {:>12.1}",
        format!("fleetbench (onnxruntime {})", rt.version),
        median(ours.0.clone()),
        median(ours.1.clone()),
        median(ours.2.clone())
    );
    let mut peers = vec![(
        format!(
            "onnxruntime {} Python loop",
            py["onnxruntime_version"].as_str().unwrap_or("?")
        ),
        &py,
    )];
    if let Some(g) = &genai {
        peers.push((
            format!(
                "onnxruntime-genai {}",
                g["genai_version"].as_str().unwrap_or("?")
            ),
            g,
        ));
    }
    for (name, v) in &peers {
        println!(
            "{:<28} {:>10.2} {:>10.3} {:>12.1}",
            name,
            median(col(v, "ttft_ms")),
            median(col(v, "tpot_ms")),
            median(col(v, "tokens_per_s"))
        );
    }
    let ours = median(ours.2);
    for (name, v) in &peers {
        println!(
            "fleetbench vs {name}: {:+.1} % tokens/s",
            (ours / median(col(v, "tokens_per_s")) - 1.0) * 100.0
        );
    }
    if genai.is_none() {
        println!(
            "(onnxruntime-genai not compared: no .venv-genai with it, or it could not load the model)"
        );
    }
}
