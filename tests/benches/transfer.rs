//! Moving large models: push and download speed, and memory, beside the disk's own ceiling.
//!
//!     cargo build --release --workspace --bins
//!     cargo bench -p fleetbench-tests --bench transfer [-- --sizes 1024,4096] [--dir PATH]
//!
//! For each size it writes a model with external data (`models/make_large_model.py`, seeded random
//! weights in 16 MiB files), then with real processes: a coordinator on SQLite, the `fleetbench` CLI
//! pushing the set, and two agents downloading it at once for a job (each then runs it once). Meanwhile
//! `fleetbench-simulate` keeps 20 simulated agents streaming telemetry windows, so the figures show
//! whether heartbeats and acknowledgements keep going during transfers. Printed: MB/s of the push and
//! of each download; peak RSS of the CLI, of the coordinator (growth over its idle RSS) and of each
//! agent while it downloads (growth over its RSS before the task); the ack p99 of the simulated agents
//! and whether any lease expired; and the ceiling, `dd` of the same number of bytes with
//! `conv=fsync` after dropping the page cache.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn bin(name: &str) -> PathBuf {
    repo().join("target/release").join(name)
}

fn python() -> PathBuf {
    std::env::var_os("FLEETBENCH_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv/bin/python"))
}

/// A field of /proc/PID/status in bytes (VmRSS, VmHWM).
fn proc_kb(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse::<u64>().ok())
        .unwrap_or(0)
        * 1024
}

fn mb(bytes: u64) -> f64 {
    bytes as f64 / 1e6
}

/// Drops the page cache when allowed (root); says whether it could.
fn drop_caches() -> bool {
    let _ = Command::new("sync").status();
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// `dd` of `mib` MiB with conv=fsync into `dir`: MB/s.
fn dd_ceiling(dir: &Path, mib: u64) -> f64 {
    let out = dir.join("dd.bin");
    drop_caches();
    let t = Instant::now();
    let status = Command::new("dd")
        .args(["if=/dev/zero", "bs=1M", "conv=fsync"])
        .arg(format!("of={}", out.display()))
        .arg(format!("count={mib}"))
        .stderr(Stdio::null())
        .status()
        .expect("dd");
    assert!(status.success());
    let s = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(out);
    mb(mib << 20) / s
}

/// Runs a child to its end; returns (seconds, peak RSS bytes, stderr). The child is reaped by wait4,
/// which also gives its own peak RSS (std's wait does not).
#[allow(clippy::zombie_processes)]
fn run_measured(cmd: &mut Command) -> (f64, u64, String) {
    let t = Instant::now();
    let child = cmd
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let pid = child.id() as libc::pid_t;
    let mut status = 0;
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child with valid out-pointers.
    unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    let s = t.elapsed().as_secs_f64();
    let mut err = String::new();
    if let Some(mut e) = child.stderr {
        use std::io::Read;
        let _ = e.read_to_string(&mut err);
    }
    assert!(
        libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
        "{cmd:?}: {err}"
    );
    (s, usage.ru_maxrss as u64 * 1024, err)
}

struct Agent {
    child: Child,
    log: PathBuf,
}

fn spawn_agent(url: &str, name: &str, dir: &Path, ort: &str) -> Agent {
    let log = dir.join(format!("{name}.log"));
    let child = Command::new(bin("fleetbench-agent"))
        .args(["--coordinator", url, "--name", name, "--host-id"])
        .arg(format!("bench-{name}"))
        .arg("--state-dir")
        .arg(dir.join(name))
        .args(["--ort-lib", ort, "--label", "bench=1"])
        .env("RUST_LOG", "info")
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    Agent { child, log }
}

/// The `mb_per_s` of an agent's "Artifact set fetched." line, when it has one.
fn fetched(log: &Path) -> Option<f64> {
    let text = std::fs::read_to_string(log).ok()?;
    let line = text.lines().find(|l| l.contains("Artifact set fetched."))?;
    let at = line.find("mb_per_s=")? + "mb_per_s=".len();
    let v: String = line[at..]
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    v.parse().ok()
}

fn cli(url: &str) -> Command {
    let mut c = Command::new(bin("fleetbench"));
    c.args(["--coordinator", url]);
    c
}

fn bench(root: &Path, mib: u64, ort: &str) {
    let dir = root.join(format!("{mib}mib"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let model_dir = dir.join("model");
    let status = Command::new(python())
        .arg(repo().join("models/make_large_model.py"))
        .arg(&model_dir)
        .args(["--mib", &mib.to_string()])
        .status()
        .expect("python");
    assert!(status.success());
    let ceiling = dd_ceiling(&dir, mib);

    let addr_file = dir.join("addr");
    std::fs::create_dir_all(dir.join("db")).unwrap();
    let mut coord = Command::new(bin("fleetbench-coordinator"))
        .args(["--listen", "127.0.0.1:0", "--addr-file"])
        .arg(&addr_file)
        .arg("--database")
        .arg(format!("sqlite://{}", dir.join("db/fleet.db").display()))
        .stderr(std::fs::File::create(dir.join("coordinator.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let url = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && !a.trim().is_empty()
        {
            break format!("http://{}", a.trim());
        }
        assert!(Instant::now() < deadline, "the coordinator did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    let coord_pid = coord.id();
    std::thread::sleep(Duration::from_millis(300));
    let coord_idle = proc_kb(coord_pid, "VmRSS");

    // Background load: simulated agents streaming windows through the transfers.
    let sim = Command::new(bin("fleetbench-simulate"))
        .args([
            "--coordinator",
            &url,
            "--coordinator-pid",
            &coord_pid.to_string(),
        ])
        .args([
            "--agents",
            "20",
            "--rate",
            "2",
            "--duration-s",
            &(30 + mib / 20).to_string(),
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();

    let model = model_dir.join("model.onnx");
    // The push reads the model from disk, as a user's would.
    drop_caches();
    let (push_s, cli_rss, _) = run_measured(
        cli(&url)
            .args(["models", "push"])
            .arg(&model)
            .args(["--name", "large"]),
    );
    let set_bytes: u64 = walk(&model_dir).iter().sum();

    let a = spawn_agent(&url, "a", &dir, ort);
    let b = spawn_agent(&url, "b", &dir, ort);
    std::thread::sleep(Duration::from_secs(2));
    let before = [a.child.id(), b.child.id()].map(|p| proc_kb(p, "VmRSS"));
    let submitted = cli(&url)
        .args([
            "jobs",
            "submit",
            "--model",
            "large",
            "--iterations",
            "1",
            "--skip-accuracy",
        ])
        .args(["--selector", "bench=1"])
        .output()
        .unwrap();
    assert!(submitted.status.success(), "{submitted:?}");
    let job = String::from_utf8_lossy(&submitted.stdout)
        .trim()
        .to_string();
    // Download peaks: sampled until each agent's log says its set arrived.
    let mut peaks = [0u64; 2];
    let mut rates = [None, None];
    let t = Instant::now();
    while rates.iter().any(Option::is_none) && t.elapsed() < Duration::from_secs(600) {
        for (i, ag) in [&a, &b].iter().enumerate() {
            if rates[i].is_none() {
                peaks[i] = peaks[i].max(proc_kb(ag.child.id(), "VmRSS"));
                rates[i] = fetched(&ag.log);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let coord_peak = proc_kb(coord_pid, "VmHWM");
    let _ = cli(&url).args(["jobs", "watch", &job]).output();
    let sim_out = sim.wait_with_output().unwrap();
    let sim_json: serde_json::Value = String::from_utf8_lossy(&sim_out.stdout)
        .split(['\r', '\n'])
        .rfind(|l| l.starts_with('{'))
        .and_then(|l| serde_json::from_str(l).ok())
        .unwrap_or_default();
    let jobs = cli(&url)
        .args(["jobs", "list", "--output", "json"])
        .output()
        .unwrap();
    let jobs: serde_json::Value = serde_json::from_slice(&jobs.stdout).unwrap_or_default();
    for mut c in [a.child, b.child] {
        let _ = c.kill();
        let _ = c.wait();
    }
    let _ = coord.kill();
    let _ = coord.wait();

    println!(
        "set of {} MiB ({} bytes in {} files)",
        mib,
        set_bytes,
        walk(&model_dir).len()
    );
    println!(
        "  ceiling: dd conv=fsync                      {:>8.1} MB/s",
        ceiling
    );
    println!(
        "  push (CLI -> coordinator)                   {:>8.1} MB/s  {:>5.0} % of ceiling   CLI peak RSS {:.1} MB",
        mb(set_bytes) / push_s,
        100.0 * mb(set_bytes) / push_s / ceiling,
        mb(cli_rss)
    );
    for (i, name) in ["a", "b"].iter().enumerate() {
        let r = rates[i].unwrap_or(0.0);
        println!(
            "  download to agent {name} (two at once)          {:>8.1} MB/s  {:>5.0} % of ceiling   agent RSS while downloading {:.1} MB (+{:.1} MB)",
            r,
            100.0 * r / ceiling,
            mb(peaks[i]),
            mb(peaks[i].saturating_sub(before[i]))
        );
    }
    println!(
        "  coordinator RSS idle {:.1} MB, peak {:.1} MB (+{:.1} MB)",
        mb(coord_idle),
        mb(coord_peak),
        mb(coord_peak.saturating_sub(coord_idle))
    );
    println!(
        "  meanwhile 20 simulated agents: windows sent {} stored {}, ack p99 {} ms (steady {} ms), agent failures {}",
        sim_json["windows_sent"],
        sim_json["windows_stored"],
        sim_json["ack_latency_ms"]["p99"],
        sim_json["ack_latency_steady_ms"]["p99"],
        sim_json["agent_failures"]
    );
    let attempts: Vec<String> = jobs
        .as_array()
        .map(|a| {
            a.iter()
                .map(|j| format!("{} {}", j["model"], j["state"]))
                .collect()
        })
        .unwrap_or_default();
    println!("  jobs: {}", attempts.join(", "));
    let _ = std::fs::remove_dir_all(&dir);
}

/// Sizes of the files under `dir`.
fn walk(dir: &Path) -> Vec<u64> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p.metadata().unwrap().len());
        }
    }
    out
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |k: &str| {
        args.iter()
            .position(|a| a == k)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let sizes: Vec<u64> = arg("--sizes")
        .unwrap_or_else(|| "1024,4096".into())
        .split(',')
        .map(|s| s.trim().parse().expect("--sizes: MiB, comma-separated"))
        .collect();
    let root = arg("--dir")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join("target/bench-transfer"));
    let ort =
        std::env::var("ORT_DYLIB_PATH").expect("ORT_DYLIB_PATH (eval \"$(scripts/dev.sh env)\")");
    for b in [
        "fleetbench",
        "fleetbench-agent",
        "fleetbench-coordinator",
        "fleetbench-simulate",
    ] {
        assert!(
            bin(b).exists(),
            "{b} is not built: cargo build --release --workspace --bins"
        );
    }
    println!(
        "page cache dropped before dd and the push: {}",
        drop_caches()
    );
    for mib in sizes {
        bench(&root, mib, &ort);
    }
}
