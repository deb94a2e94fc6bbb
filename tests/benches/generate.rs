//! Decoding speed of fleetbench's generation loop (the runtime's `decoder::generate`: prefill, then one
//! call per token with the present KV tensors moved into the next call's past) beside a plain Python
//! onnxruntime greedy loop on the same model, prompt, output length and threads, pinned to the same
//! cores. Each implementation is a process of its own (this binary with `--serve` for fleetbench's
//! loop), started under `taskset` and driven alike. fleetbench's loop runs twice: as the agent runs it,
//! with ONNX Runtime's memory moved onto transparent huge pages once the model is loaded, where the
//! kernel has them (the agent's `huge_pages`, `fleetbench_runtime::memory`), and with small pages, as
//! the Python peers get them. (`--peer-env GLIBC_TUNABLES=glibc.malloc.hugetlb=1` asks glibc to give
//! the peers huge pages, which glibc 2.36 does in only some processes.) They take turns run by run, each round in the next
//! of all orders, with the core left idle between runs, so the machine's drift in speed and one run's
//! after-effects hit them all alike. Where a process's memory lands moves its speed by a few percent
//! for its whole life, so `--processes` sets of fresh processes each do `--runs` rounds after a
//! warm-up round (the defaults, 4 and 6, cycle the 24 orders of four implementations once in all).
//! The table holds the medians over all runs; each peer's tokens/s against fleetbench's is the median
//! per set of the per-round ratios, and the median of those. It also prints fleetbench's own time per
//! output token outside ONNX Runtime's Run.
//!
//!     cargo bench -p fleetbench-tests --bench generate -- [--size tiny|gpt2-small] [--prompt 128]
//!         [--output 64] [--threads 1] [--runs 6] [--processes 4] [--cpus 0] [--alone]
//!         [--peer-env VAR=VALUE]...
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
use fleetbench_runtime::memory;

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
    let runs: usize = arg(&args, "--runs", "6").parse().unwrap();
    let processes: usize = arg(&args, "--processes", "4").parse().unwrap();
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
    let exe = std::env::current_exe().unwrap();
    let alone = args.iter().any(|a| a == "--alone");
    let genai_python = repo().join(".venv-genai/bin/python");
    // Every implementation is a process of its own, pinned to the same cores and driven alike. Where
    // a process's memory lands moves its speed by a few percent for as long as it lives, so the
    // process is the unit of the comparison: each of `--processes` sets starts every implementation
    // afresh.
    // `--peer-env VAR=VALUE` (repeatable): environment of the Python peers, e.g.
    // GLIBC_TUNABLES=glibc.malloc.hugetlb=1 to give them huge pages too.
    let peer_env: Vec<(String, String)> = args
        .windows(2)
        .filter(|w| w[0] == "--peer-env")
        .map(|w| {
            let (k, v) = w[1].split_once('=').expect("--peer-env VAR=VALUE");
            (k.to_string(), v.to_string())
        })
        .collect();
    let small_pages: Vec<String> = flags
        .iter()
        .cloned()
        .chain(["--small-pages".to_string()])
        .collect();
    let start_set = || {
        // fleetbench's loop as the agent runs it (huge pages where the kernel has them), and with
        // small pages, as the Python peers get them unless --peer-env says otherwise.
        let mut peers =
            vec![Peer::spawn(&exe, &[], &flags, &cpus, &[]).expect("fleetbench's loop runs")];
        if !alone {
            peers.push(
                Peer::spawn(&exe, &[], &small_pages, &cpus, &[]).expect("fleetbench's loop runs"),
            );
            peers.push(
                Peer::spawn(
                    &python(),
                    &[script("ort_greedy.py")],
                    &flags,
                    &cpus,
                    &peer_env,
                )
                .expect("the onnxruntime Python loop runs"),
            );
        }
        if !alone
            && genai_python.exists()
            && let Some(p) = Peer::spawn(
                &genai_python,
                &[script("genai_greedy.py")],
                &flags,
                &cpus,
                &peer_env,
            )
        {
            peers.push(p);
        }
        peers
    };
    let mut peers = Vec::new();
    let mut figures_of: Vec<Vec<(f64, f64, f64)>> = Vec::new();
    // Per process set, each peer's tokens/s against fleetbench's, paired by round (%).
    let mut set_ratios: Vec<Vec<f64>> = Vec::new();
    // fleetbench's TPOT less its time inside ONNX Runtime's Run, per output token (ms).
    let mut outside_run = Vec::new();
    // Per process set, fleetbench's memory on huge pages after its last run (MiB): where the kernel
    // found no free huge pages, a set runs on small pages whatever it asked for.
    let mut huge_mb = vec![0.0; processes];
    for set in 0..processes {
        drop(peers);
        peers = start_set();
        let n = peers.len();
        figures_of.resize(n, Vec::new());
        set_ratios.resize(n, Vec::new());
        let from = figures_of[0].len();
        // Round r runs every implementation once, in the r-th of all orders (cycling), so each
        // follows each other equally often and drift in the machine's speed hits them all alike;
        // round 0 warms up.
        let orders = permutations(n);
        for round in 0..=runs {
            // Sets go on through the orders where the last one stopped.
            for &which in &orders[(set * runs + round) % orders.len()] {
                let v = peers[which].run();
                let f = |k: &str| v[k].as_f64().unwrap();
                if round > 0 {
                    figures_of[which].push((f("ttft_ms"), f("tpot_ms"), f("tokens_per_s")));
                    if let Some(o) = v["outside_run_ms"].as_f64().filter(|_| which == 0) {
                        outside_run.push(o);
                    }
                    if let Some(b) = v["anon_huge_pages_bytes"].as_f64().filter(|_| which == 0) {
                        huge_mb[set] = b / (1 << 20) as f64;
                    }
                }
            }
        }
        for k in 1..n {
            let ratios: Vec<f64> = figures_of[0][from..]
                .iter()
                .zip(&figures_of[k][from..])
                .map(|(a, b)| (a.2 / b.2 - 1.0) * 100.0)
                .collect();
            set_ratios[k].push(median(ratios));
        }
    }
    let n = peers.len();
    let hello = &peers[0].hello;
    println!(
        "{} ({} layers, KV {} B/token), prompt {prompt_len}, output {output}, {threads} thread(s) on CPU {cpus}, median of {} interleaved runs ({processes} process sets of {runs} after a warm-up)",
        model.file_name().unwrap().to_string_lossy(),
        hello["layers"],
        hello["kv_bytes_per_token"],
        processes * runs,
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
    let per_set: Vec<String> = huge_mb.iter().map(|m| format!("{m:.0}")).collect();
    println!(
        "{}: MiB on huge pages per process set: {}",
        peers[0].name,
        per_set.join(", ")
    );
    // Paired by round within a process set (the same stretch of machine time, so drift cancels); one
    // median per set, then the median over sets.
    for k in 1..n {
        let per_set: Vec<String> = set_ratios[k].iter().map(|r| format!("{r:+.1}")).collect();
        println!(
            "fleetbench vs {}: {:+.1} % tokens/s (median over {processes} process sets: {} %)",
            peers[k].name,
            median(set_ratios[k].clone()),
            per_set.join(", ")
        );
    }
    if !alone
        && !peers
            .iter()
            .any(|p| p.name.starts_with("onnxruntime-genai"))
    {
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
    // As the agent does (its `huge_pages` setting), unless --small-pages.
    let huge = !args.iter().any(|a| a == "--small-pages")
        && memory::kernel_has_huge_pages(memory::thp_mode().as_deref());
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
    if huge {
        // As the agent: once the session is loaded and has run.
        generate(&mut session, &io, &prompt, 2).unwrap();
        let done = memory::back_with_huge_pages();
        if let Some(note) = done.note {
            eprintln!("huge pages: {note}");
        }
    }
    println!(
        "{}",
        serde_json::json!({
            "name": format!(
                "fleetbench (onnxruntime {}, {} pages)",
                rt.version,
                if huge { "huge" } else { "small" }
            ),
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
                               "outside_run_ms": outside,
                               "anon_huge_pages_bytes": memory::MemoryState::now().anon_huge_pages_bytes})
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
    fn spawn(
        program: &Path,
        pre: &[PathBuf],
        flags: &[String],
        cpus: &str,
        env: &[(String, String)],
    ) -> Option<Peer> {
        let mut child = Command::new("taskset")
            .envs(env.iter().map(|(k, v)| (k, v)))
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
        let mut name = if let Some(v) = hello["name"].as_str() {
            v.to_string()
        } else if let Some(v) = hello["onnxruntime_version"].as_str() {
            format!("onnxruntime {v} Python loop")
        } else {
            format!(
                "onnxruntime-genai {}",
                hello["genai_version"].as_str().unwrap_or("?")
            )
        };
        for (k, v) in env {
            name.push_str(&format!(" [{k}={v}]"));
        }
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
