//! Decoding speed of fleetbench's generation loop (the runtime's `decoder::generate`: prefill, then one
//! call per token with the present KV tensors moved into the next call's past) beside a plain Python
//! onnxruntime greedy loop on the same model, prompt, output length and threads, pinned to the same
//! cores. Each implementation is a process of its own (this binary with `--serve` for fleetbench's
//! loop), started under `taskset` and driven alike; they take turns run by run, each round in the next
//! of all orders (12 runs cycle the six orders of three twice), with the core left idle between runs,
//! so the machine's drift in speed and one run's after-effects hit them all alike. Median of `--runs`
//! runs after one warm-up run each, and each peer's tokens/s against fleetbench's as the median of the
//! per-round ratios with a distribution-free 95 % interval. It also prints fleetbench's own time per
//! output token outside ONNX Runtime's Run.
//!
//!     cargo bench -p fleetbench-tests --bench generate -- [--size tiny|gpt2-small] [--prompt 128]
//!         [--output 64] [--threads 1] [--runs 12] [--cpus 0] [--alone]
//!
//! `--alone` times fleetbench's loop without the peers (to profile it).
//!
//! `--size gpt2-small` writes the GPT-2-small-shaped decoder (`models/make_llm.py`, seeded random
//! weights, ~500 MB, git-ignored) on first use; `--model PATH` benchmarks another decoder file (an
//! int4 variant, say). onnxruntime-genai runs beside them when `.venv-genai` holds it
//! (`python3 -m venv .venv-genai && .venv-genai/bin/pip install onnxruntime-genai onnx`;
//! `scripts/genai_greedy.py` writes its genai_config.json); its wheel brings its own ONNX Runtime,
//! whose version the table names.

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, Stdio};

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

/// Every order of 0..n, lexicographically.
fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut out = Vec::new();
    for first in 0..n {
        for rest in permutations(n - 1) {
            let mut p = vec![first];
            p.extend(rest.into_iter().map(|x| if x >= first { x + 1 } else { x }));
            out.push(p);
        }
    }
    out
}

/// A distribution-free interval for the median of `v` with at least 95 % coverage: the order statistics
/// x(k) and x(n+1-k) for the largest k with P(Binomial(n, 1/2) <= k - 1) <= 2.5 % (the whole range
/// when n is too small for that).
fn median_interval(mut v: Vec<f64>) -> (f64, f64) {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    let pmf = |i: usize| -> f64 {
        let ln_choose: f64 = (1..=i).map(|j| ((n + 1 - j) as f64 / j as f64).ln()).sum();
        (ln_choose - n as f64 * std::f64::consts::LN_2).exp()
    };
    // P(Binomial <= k - 1) for the current k.
    let (mut k, mut cdf) = (1, pmf(0));
    while k < n / 2 && cdf + pmf(k) <= 0.025 {
        cdf += pmf(k);
        k += 1;
    }
    (v[k - 1], v[n - k])
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

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.iter().any(|a| a == "--serve") {
        return serve(&args);
    }
    let size = arg(&args, "--size", "tiny");
    let prompt_len: usize = arg(&args, "--prompt", "128").parse().unwrap();
    let output: usize = arg(&args, "--output", "64").parse().unwrap();
    let threads: usize = arg(&args, "--threads", "1").parse().unwrap();
    let runs: usize = arg(&args, "--runs", "12").parse().unwrap();
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
    let flags: Vec<String> = vec![
        model.to_string_lossy().into_owned(),
        "--prompt".into(),
        prompt_len.to_string(),
        "--output".into(),
        output.to_string(),
        "--threads".into(),
        threads.to_string(),
        "--serve".into(),
    ];
    let script = |name: &str| repo().join("scripts").join(name);
    // Every implementation is a process of its own, pinned to the same cores and driven alike.
    let exe = std::env::current_exe().unwrap();
    let ours = Peer::spawn(&exe, &[], &flags, &cpus).expect("fleetbench's loop runs");
    let mut peers = vec![ours];
    let alone = args.iter().any(|a| a == "--alone");
    if !alone {
        peers.push(
            Peer::spawn(&python(), &[script("ort_greedy.py")], &flags, &cpus)
                .expect("the onnxruntime Python loop runs"),
        );
    }
    let genai_python = repo().join(".venv-genai/bin/python");
    if !alone
        && genai_python.exists()
        && let Some(p) = Peer::spawn(&genai_python, &[script("genai_greedy.py")], &flags, &cpus)
    {
        peers.push(p);
    }
    // Round r runs every implementation once, in the order of the r-th of all orders (cycling), so
    // each follows each other equally often and drift in the machine's speed hits them all alike;
    // round 0 warms up.
    let n = peers.len();
    let orders = permutations(n);
    let mut figures_of: Vec<Vec<(f64, f64, f64)>> = vec![Vec::new(); n];
    // fleetbench's TPOT less its time inside ONNX Runtime's Run, per output token (ms).
    let mut outside_run = Vec::new();
    for round in 0..=runs {
        for &which in &orders[round % orders.len()] {
            let v = peers[which].run();
            let f = |k: &str| v[k].as_f64().unwrap();
            if round > 0 {
                figures_of[which].push((f("ttft_ms"), f("tpot_ms"), f("tokens_per_s")));
                if let Some(o) = v["outside_run_ms"].as_f64() {
                    outside_run.push(o);
                }
            }
        }
    }
    let hello = &peers[0].hello;
    println!(
        "{} ({} layers, KV {} B/token), prompt {prompt_len}, output {output}, {threads} thread(s) on CPU {cpus}, median of {runs} interleaved runs after a warm-up",
        model.file_name().unwrap().to_string_lossy(),
        hello["layers"],
        hello["kv_bytes_per_token"]
    );
    println!(
        "{:<46} {:>10} {:>10} {:>10}",
        "", "TTFT ms", "TPOT ms", "tokens/s"
    );
    let medians: Vec<(f64, f64, f64)> = figures_of
        .iter()
        .map(|f| {
            (
                median(f.iter().map(|x| x.0).collect()),
                median(f.iter().map(|x| x.1).collect()),
                median(f.iter().map(|x| x.2).collect()),
            )
        })
        .collect();
    for (p, m) in peers.iter().zip(&medians) {
        println!("{:<46} {:>10.2} {:>10.3} {:>10.1}", p.name, m.0, m.1, m.2);
    }

    if !outside_run.is_empty() {
        let o = median(outside_run);
        println!(
            "fleetbench's loop outside ONNX Runtime's Run: {o:.3} ms per output token ({:.2} % of its TPOT)",
            o / medians[0].1 * 100.0
        );
    }
    // Paired by round: the same stretch of machine time for both, so drift cancels.
    for k in 1..n {
        let ratios: Vec<f64> = figures_of[0]
            .iter()
            .zip(&figures_of[k])
            .map(|(a, b)| (a.2 / b.2 - 1.0) * 100.0)
            .collect();
        let (lo, hi) = median_interval(ratios.clone());
        println!(
            "fleetbench vs {}: {:+.1} % tokens/s (median of {} paired runs; 95 % interval {:+.1} to {:+.1} %)",
            peers[k].name,
            median(ratios.clone()),
            ratios.len(),
            lo,
            hi
        );
    }
    if !alone && n < 3 {
        println!(
            "(onnxruntime-genai not compared: no .venv-genai with it, or it could not load the model)"
        );
    }
}

/// `--serve MODEL`: fleetbench's side as a process like the Python peers (see scripts/ort_greedy.py):
/// one line naming it once the model is loaded, then one greedy run per stdin line, its figures on
/// one line.
fn serve(args: &[String]) {
    let model = &args[1];
    let prompt_len: usize = arg(args, "--prompt", "128").parse().unwrap();
    let output: usize = arg(args, "--output", "64").parse().unwrap();
    let threads: usize = arg(args, "--threads", "1").parse().unwrap();
    let rt = fleetbench_runtime::load(None)
        .expect("load ONNX Runtime (run `eval \"$(scripts/dev.sh env)\"`)");
    let mut session = ort::session::Session::builder(&rt.env)
        .unwrap()
        .with_intra_threads(threads)
        .unwrap()
        .with_inter_threads(1)
        .unwrap()
        .commit_from_file(model)
        .unwrap();
    let io = DecoderIo::detect(&session).unwrap();
    let vocab = io.vocab.unwrap_or(512);
    let prompt: Vec<i64> = (0..prompt_len as i64)
        .map(|i| (i * 7919 + 13) % vocab)
        .collect();
    println!(
        "{}",
        serde_json::json!({
            "name": format!("fleetbench (onnxruntime {})", rt.version),
            "layers": io.layers(),
            "kv_bytes_per_token": io.kv_bytes_per_token(),
        })
    );
    for _ in std::io::stdin().lines() {
        let g = generate(&mut session, &io, &prompt, output).unwrap();
        assert_eq!(g.tokens.len(), output);
        let (ttft, tpot, tps) = figures(&g.token_ready_ns);
        let outside =
            (output > 1).then(|| tpot - g.decode_run_ns as f64 / 1e6 / (output - 1) as f64);
        println!(
            "{}",
            serde_json::json!({"ttft_ms": ttft, "tpot_ms": tpot, "tokens_per_s": tps,
                               "outside_run_ms": outside})
        );
    }
}

/// One implementation in a process of its own, pinned to the benchmark's cores, that runs once per
/// request (`--serve`).
struct Peer {
    name: String,
    hello: serde_json::Value,
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Peer {
    /// Starts `program` with `pre` then `flags` under taskset; `None` when it exits before saying
    /// hello (it says why on stderr).
    fn spawn(program: &Path, pre: &[PathBuf], flags: &[String], cpus: &str) -> Option<Peer> {
        let mut child = Command::new("taskset")
            .args(["-c", cpus])
            .arg(program)
            .args(pre)
            .args(flags)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("run {}: {e}", program.display()));
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let Ok(hello) = serde_json::from_str::<serde_json::Value>(&line) else {
            let _ = child.wait();
            return None;
        };
        let name = if let Some(v) = hello["name"].as_str() {
            v.to_string()
        } else if let Some(v) = hello["onnxruntime_version"].as_str() {
            format!("onnxruntime {v} Python loop")
        } else {
            format!(
                "onnxruntime-genai {}",
                hello["genai_version"].as_str().unwrap_or("?")
            )
        };
        Some(Peer {
            name,
            hello,
            child,
            stdout,
        })
    }

    /// The figures of one run, as the implementation printed them. Returns once the process has used
    /// no CPU for 20 ms: work done after replying (freeing buffers, by the process or by the kernel
    /// on its behalf) would otherwise share the pinned core with the next implementation's run. In
    /// measurements without this pause, whichever implementation followed onnxruntime-genai ran
    /// 4-6 % slower.
    fn run(&mut self) -> serde_json::Value {
        writeln!(self.child.stdin.as_mut().unwrap(), "run").unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        let mut last = self.cpu_ms();
        loop {
            std::thread::sleep(std::time::Duration::from_millis(20));
            let now = self.cpu_ms();
            if now == last {
                break;
            }
            last = now;
        }
        serde_json::from_str(&line)
            .unwrap_or_else(|_| panic!("{} failed a run (its stderr says why)", self.name))
    }

    /// The process's user and system CPU time so far, in ms (all its threads).
    fn cpu_ms(&self) -> f64 {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap();
        // Fields after the command name (which may hold spaces) start at its closing parenthesis.
        let rest: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
        let ticks: f64 = rest[11].parse::<f64>().unwrap() + rest[12].parse::<f64>().unwrap();
        // SAFETY: sysconf has no preconditions.
        ticks * 1e3 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
    }
}
