//! `fleetbench-otel-overhead`: what OTLP export costs the coordinator. It runs the load harness
//! (`fleetbench-simulate`, beside this binary) at one offered load with export off and on, the two
//! side by side (two harnesses, two coordinators, started together), so that the machine's drift in
//! speed, which on a shared VM moves a run's CPU figures by 20 % from one minute to the next, falls on
//! both alike. It prints the median over the pairs of the coordinator's CPU time per window and of the
//! steady-state acknowledgement p99, and the median of the pairs' own changes (the steadier figure).
//!
//! `fleetbench-otel-overhead --runs 5 -- --agents 50 --rate 4 --duration-s 20`
//! (arguments after `--` go to every harness run).

use std::process::Command;

use anyhow::{Context, Result, bail};
use clap::Parser;

/// Measure the coordinator's cost of OTLP export with the load harness.
#[derive(Debug, Parser)]
#[command(name = "fleetbench-otel-overhead", version)]
struct Args {
    /// Pairs of runs, one with export off and one with it on, side by side.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Arguments for every `fleetbench-simulate` run.
    #[arg(last = true)]
    harness: Vec<String>,
}

/// The figures of one harness run.
#[derive(Debug, Clone, Copy)]
struct Figures {
    cpu_us_per_window: f64,
    ack_p99_ms: f64,
    ingest_per_s: f64,
}

/// Starts one harness run.
fn start(bin: &std::path::Path, args: &[String], otlp: bool) -> Result<std::process::Child> {
    let mut cmd = Command::new(bin);
    cmd.args(args)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if otlp {
        cmd.arg("--otlp");
    }
    cmd.spawn().context("run fleetbench-simulate")
}

/// The figures of a finished harness run.
fn finish(child: std::process::Child, otlp: bool) -> Result<Figures> {
    let out = child
        .wait_with_output()
        .context("wait for fleetbench-simulate")?;
    if !out.status.success() {
        bail!(
            "fleetbench-simulate failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.trim_start().starts_with('{'))
        .context("fleetbench-simulate printed no JSON line")?;
    let v: serde_json::Value = serde_json::from_str(line)?;
    if v["windows_stored"] != v["windows_sent"] {
        bail!("a run lost windows: {line}");
    }
    if otlp && v["otlp_exports"].as_u64().unwrap_or(0) == 0 {
        bail!("export was on, but the sink got no export: {line}");
    }
    let f = |p: &[&str]| -> Result<f64> {
        let mut x = &v;
        for k in p {
            x = &x[*k];
        }
        x.as_f64()
            .with_context(|| format!("no {} in {line}", p.join(".")))
    };
    Ok(Figures {
        cpu_us_per_window: f(&["coordinator_cpu_us_per_window"])?,
        ack_p99_ms: f(&["ack_latency_steady_ms", "p99"])?,
        ingest_per_s: f(&["ingest_windows_per_s"])?,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn main() -> Result<()> {
    let a = Args::parse();
    if a.runs == 0 {
        bail!("--runs must be > 0");
    }
    let bin = std::env::current_exe()?
        .parent()
        .map(|d| d.join("fleetbench-simulate"))
        .unwrap_or_default();
    if !bin.exists() {
        bail!(
            "{} not found; build the tools (cargo build --release -p fleetbench-tools)",
            bin.display()
        );
    }
    let (mut off, mut on) = (Vec::new(), Vec::new());
    for i in 0..a.runs {
        let children = [
            (false, start(&bin, &a.harness, false)?),
            (true, start(&bin, &a.harness, true)?),
        ];
        for (otlp, child) in children {
            let f = finish(child, otlp)?;
            eprintln!(
                "run {} export {:<3}: {:.1} µs CPU/window, ack p99 {:.2} ms, {:.0} windows/s",
                i + 1,
                if otlp { "on" } else { "off" },
                f.cpu_us_per_window,
                f.ack_p99_ms,
                f.ingest_per_s
            );
            if otlp { &mut on } else { &mut off }.push(f);
        }
    }
    let m = |v: &[Figures], g: fn(&Figures) -> f64| median(v.iter().map(g).collect());
    let cpu = (
        m(&off, |f| f.cpu_us_per_window),
        m(&on, |f| f.cpu_us_per_window),
    );
    let ack = (m(&off, |f| f.ack_p99_ms), m(&on, |f| f.ack_p99_ms));
    let pct = |(a, b): (f64, f64)| 100.0 * (b - a) / a;
    let paired = |g: fn(&Figures) -> f64| {
        median(
            off.iter()
                .zip(&on)
                .map(|(x, y)| pct((g(x), g(y))))
                .collect(),
        )
    };
    let cpu_paired = paired(|f| f.cpu_us_per_window);
    let ack_paired = paired(|f| f.ack_p99_ms);
    println!(
        "median of {} runs each: coordinator CPU per window {:.1} µs off, {:.1} µs on ({:+.1} %); \
         ack p99 {:.2} ms off, {:.2} ms on ({:+.1} %)",
        a.runs,
        cpu.0,
        cpu.1,
        pct(cpu),
        ack.0,
        ack.1,
        pct(ack)
    );
    println!(
        "median of the {} pairs' changes: CPU per window {cpu_paired:+.1} %, ack p99 {ack_paired:+.1} %",
        a.runs
    );
    println!(
        "{}",
        serde_json::json!({
            "runs": a.runs,
            "cpu_us_per_window": {"off": cpu.0, "on": cpu.1, "change_pct": pct(cpu), "paired_change_pct": cpu_paired},
            "ack_p99_ms": {"off": ack.0, "on": ack.1, "change_pct": pct(ack), "paired_change_pct": ack_paired},
        })
    );
    Ok(())
}
