//! `fleetbench quickstart`: the whole path on one machine. A coordinator on a SQLite file and two
//! agents, each its own process and pinned differently (an "edge" agent on one core, a "cloud" agent on
//! all cores, each with an hourly cost), benchmark the bundled digits model and its variants; the
//! ranking is printed at the end.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Args;

use super::{jobs, models, rank};
use crate::client::Client;
use crate::jobspec::JobArgs;
use crate::output::Format;

/// Quickstart options.
#[derive(Debug, Args)]
pub struct QuickstartArgs {
    /// Working directory for the database, agent state and logs (recreated on every run).
    #[arg(long, default_value = ".fleetbench/quickstart")]
    pub dir: PathBuf,
    /// Directory of the bundled models.
    #[arg(long, default_value = "models")]
    pub models: PathBuf,
    /// ONNX Runtime library (default: $ORT_DYLIB_PATH, else the one scripts/dev.sh installs in .venv).
    #[arg(long)]
    pub ort_lib: Option<PathBuf>,
    /// Timed queries per run; without it each run uses the quick profile: it stops as soon as it is
    /// VALID (at least 1.5 s and 2000 queries) and stable over its last three 0.5 s windows, or at 20 s.
    #[arg(long)]
    pub iterations: Option<i64>,
    /// Hourly cost of the edge agent.
    #[arg(long, default_value_t = 0.05)]
    pub edge_cost: f64,
    /// Hourly cost of the cloud agent.
    #[arg(long, default_value_t = 0.20)]
    pub cloud_cost: f64,
}

/// Child processes, stopped (SIGTERM, then SIGKILL) when dropped.
struct Fleet {
    children: Vec<(String, Child)>,
}

impl Fleet {
    /// Starts `cmd` with its output in `log`; `secrets` go in its environment (not its arguments,
    /// which `ps` shows).
    fn spawn(
        &mut self,
        name: &str,
        mut cmd: Command,
        log: &Path,
        secrets: &[(&str, &str)],
    ) -> Result<()> {
        let file = std::fs::File::create(log)
            .with_context(|| format!("cannot start {name}: cannot create {}", log.display()))?;
        // The local fleet is set up by its flags alone: settings exported for a real fleet
        // (FLEETBENCH_CA_CERT, FLEETBENCH_COORDINATOR …) must not reach it.
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("FLEETBENCH_") {
                cmd.env_remove(&key);
            }
        }
        cmd.envs(secrets.iter().copied());
        let child = cmd
            .stdin(Stdio::null())
            .stdout(file.try_clone()?)
            .stderr(file)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        self.children.push((name.to_string(), child));
        Ok(())
    }

    fn check_alive(&mut self, dir: &Path) -> Result<()> {
        for (name, child) in &mut self.children {
            if let Some(status) = child.try_wait()? {
                let log =
                    std::fs::read_to_string(dir.join(format!("{name}.log"))).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                bail!(
                    "{name} exited ({status}); last lines of its log:\n{}",
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                );
            }
        }
        Ok(())
    }
}

impl Drop for Fleet {
    fn drop(&mut self) {
        for (_, child) in &mut self.children {
            // SAFETY: sending SIGTERM to a child we started.
            unsafe {
                libc::kill(child.id() as i32, libc::SIGTERM);
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for (_, child) in &mut self.children {
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The sibling binary `name` (next to this executable).
fn sibling(name: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe()?;
    let path = exe
        .parent()
        .map(|d| d.join(name))
        .unwrap_or_else(|| PathBuf::from(name));
    if !path.exists() {
        bail!(
            "{} not found next to {}; build all binaries first (cargo build --release)",
            name,
            exe.display()
        );
    }
    Ok(path)
}

/// Finds the ONNX Runtime library: flag, ORT_DYLIB_PATH, or .venv's onnxruntime wheel.
pub fn find_ort_lib(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    find_ort_lib_in(Path::new("."))
}

/// The library of the onnxruntime wheel installed in `root/.venv` (by `scripts/dev.sh setup`).
pub fn find_ort_lib_in(root: &Path) -> Result<PathBuf> {
    fleetbench_runtime::load::find_in_venv(root).ok_or_else(|| {
        anyhow::anyhow!(
            "ONNX Runtime library not found: set ORT_DYLIB_PATH or --ort-lib, or run `scripts/dev.sh quickstart`, \
             which installs onnxruntime==1.31.1 into .venv"
        )
    })
}

fn wait_for_file(path: &Path, fleet: &mut Fleet, dir: &Path, timeout: Duration) -> Result<String> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(s) = std::fs::read_to_string(path)
            && !s.trim().is_empty()
        {
            return Ok(s.trim().to_string());
        }
        fleet.check_alive(dir)?;
        if Instant::now() > deadline {
            bail!("{} did not appear within {timeout:?}", path.display());
        }
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Runs the quickstart.
pub async fn run(a: QuickstartArgs) -> Result<()> {
    let started = Instant::now();
    let coordinator_bin = sibling("fleetbench-coordinator")?;
    let agent_bin = sibling("fleetbench-agent")?;
    let ort_lib = find_ort_lib(a.ort_lib.as_deref())?;
    let ort_lib = std::fs::canonicalize(&ort_lib)
        .with_context(|| format!("ONNX Runtime library {} not found", ort_lib.display()))?;
    let digits = a.models.join("digits");
    for f in [
        "digits-fp32.onnx",
        "digits-int8.onnx",
        "eval-inputs.npy",
        "eval-labels.npy",
    ] {
        if !digits.join(f).exists() {
            bail!(
                "bundled model file {} is missing (run from the repository root, or pass --models)",
                digits.join(f).display()
            );
        }
    }
    if a.dir.exists() {
        std::fs::remove_dir_all(&a.dir)
            .with_context(|| format!("cannot clear {}", a.dir.display()))?;
    }
    std::fs::create_dir_all(&a.dir)?;
    let dir = std::fs::canonicalize(&a.dir)?;

    let mut fleet = Fleet {
        children: Vec::new(),
    };
    let addr_file = dir.join("coordinator.addr");
    let database = format!("sqlite://{}", dir.join("fleet.db").display());
    // Secure as a real fleet is: `init` makes the CA, the server certificate and the first tokens.
    let init = Command::new(&coordinator_bin)
        .arg("init")
        .arg("--data-dir")
        .arg(&dir)
        .arg("--database")
        .arg(&database)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("cannot run fleetbench-coordinator init")?;
    if !init.status.success() {
        bail!(
            "fleetbench-coordinator init failed: {}",
            String::from_utf8_lossy(&init.stderr).trim()
        );
    }
    let read = |name: &str| {
        std::fs::read_to_string(dir.join(name))
            .map(|s| s.trim().to_string())
            .with_context(|| format!("init did not write {}", dir.join(name).display()))
    };
    let (admin_token, join_token) = (read("admin.token")?, read("join.token")?);
    let ca_cert = dir.join("tls").join("ca.pem");
    let mut cmd = Command::new(&coordinator_bin);
    cmd.args(["--listen", "127.0.0.1:0", "--lease-timeout-ms", "10000"])
        .arg("--database")
        .arg(&database)
        .arg("--data-dir")
        .arg(&dir)
        .arg("--addr-file")
        .arg(&addr_file);
    fleet.spawn("coordinator", cmd, &dir.join("coordinator.log"), &[])?;
    let addr = wait_for_file(&addr_file, &mut fleet, &dir, Duration::from_secs(30))?;
    let url = format!("https://{addr}");
    eprintln!(
        "coordinator listening on {url} with TLS and tokens (SQLite at {}; CA {}, admin token in {})",
        dir.join("fleet.db").display(),
        ca_cert.display(),
        dir.join("admin.token").display()
    );

    let cpus = {
        let n = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        (0..n).collect::<Vec<_>>()
    };
    let all = format!("{}-{}", cpus[0], cpus[cpus.len() - 1]);
    let agents = [
        ("edge-1", "tier=edge", a.edge_cost, cpus[0].to_string()),
        ("cloud-1", "tier=cloud", a.cloud_cost, all),
    ];
    for (name, tier, cost, cpu_list) in &agents {
        let mut cmd = Command::new(&agent_bin);
        cmd.args(["--coordinator", &url, "--name", name, "--label", tier])
            .arg("--label")
            .arg(format!("cost_per_hour={cost}"))
            .args(["--cpus", cpu_list])
            .arg("--state-dir")
            .arg(dir.join(name))
            .arg("--ort-lib")
            .arg(&ort_lib)
            .arg("--ca-cert")
            .arg(&ca_cert);
        fleet.spawn(
            name,
            cmd,
            &dir.join(format!("{name}.log")),
            &[("FLEETBENCH_JOIN_TOKEN", join_token.as_str())],
        )?;
        eprintln!("agent {name} started ({tier}, cpus {cpu_list}, cost_per_hour={cost})");
    }
    let client = Client::connect_with(&url, Some(&ca_cert), Some(&admin_token)).await?;
    let wait = jobs::wait_for_agents(&client, agents.len(), Duration::from_secs(60));
    tokio::select! {
        r = wait => r?,
        _ = async { loop { tokio::time::sleep(Duration::from_millis(200)).await; if fleet.check_alive(&dir).is_err() { break; } } } => {
            fleet.check_alive(&dir)?;
        }
    }

    let fp32 = models::push(
        &client,
        &digits.join("digits-fp32.onnx"),
        "digits",
        Some("fp32"),
        None,
        None,
        Some((
            &digits.join("eval-inputs.npy"),
            &digits.join("eval-labels.npy"),
        )),
    )
    .await?;
    eprintln!("pushed digits/{} ({} bytes)", fp32.variant, fp32.size_bytes);
    // The three ways to shrink a model, side by side: a distilled student (trained by the models
    // script from the teacher's soft labels), and quantized and pruned variants made here by
    // fleetbench's optimizer.
    let student = models::push(
        &client,
        &digits.join("digits-student.onnx"),
        "digits",
        Some("student"),
        Some("fp32"),
        Some("distilled"),
        None,
    )
    .await?;
    eprintln!(
        "pushed digits/{} ({} bytes, {} from {})",
        student.variant, student.size_bytes, student.technique, student.variant_of
    );
    fleetbench_runtime::load(Some(&ort_lib)).map_err(|e| anyhow::anyhow!("{e}"))?;
    for (recipe, sparsity) in [("int8-dynamic", None), ("prune", Some(0.5))] {
        let args = crate::optimize::RecipeArgs {
            sparsity,
            structured: sparsity.is_some(),
            ..crate::optimize::RecipeArgs::named(recipe)
        };
        let v = models::optimize(&client, "digits", &args, None, None).await?;
        eprintln!(
            "optimized digits/{} ({} bytes, {} from {}, {} nodes rewritten)",
            v.variant.variant,
            v.variant.size_bytes,
            v.variant.technique,
            v.variant.variant_of,
            v.report.rewritten.len()
        );
    }

    let mut args = JobArgs {
        model: Some("digits".into()),
        variants: vec!["all".into()],
        name: Some("quickstart".into()),
        warmup: Some(200),
        window_ms: Some(500),
        ..Default::default()
    };
    match a.iterations {
        Some(n) => args.iterations = Some(n),
        None => {
            args.duration_s = Some(20.0);
            args.min_duration_s = Some(1.5);
            args.min_queries = Some(2000);
            args.early_stop = true;
        }
    }
    let job = jobs::submit(&client, &args).await?;
    eprintln!("job {job} submitted");
    let summary = jobs::watch(&client, &job, true).await?;
    eprintln!(
        "job {} {} in {:.1}s",
        &job[..8],
        summary.state,
        started.elapsed().as_secs_f64()
    );

    let rank_args = rank::RankArgs {
        job: Some(job.clone()),
        ..rank::RankArgs::for_model("digits")
    };
    let resp = rank::fetch(&client, &rank_args).await?;
    outln!("ranking of 'digits' by p99 latency (best first):");
    outln!("{}", rank::table(&resp));
    if let Some(note) = rank::tie_note(&resp) {
        outln!("{note}");
    }
    // One answer: the cheapest row that keeps at least 95 % accuracy.
    let advice = super::recommend::RecommendArgs {
        model: "digits".into(),
        objective: "cost".into(),
        max_p99_ms: None,
        min_accuracy: Some(0.95),
        max_accuracy_drop: None,
        min_throughput: None,
        job: Some(job.clone()),
        output: Format::Table,
    };
    match super::recommend::fetch(&client, &advice).await {
        Ok(r) => outln!(
            "recommendation (fleetbench recommend digits --min-accuracy 0.95):\n{}",
            r.reason
        ),
        Err(e) => outln!("recommendation: {e:#}"),
    }
    if summary.state != "succeeded" {
        bail!(
            "job {job} ended {}; see `fleetbench jobs show {job}` and the logs in {}",
            summary.state,
            dir.display()
        );
    }
    // The same answer, with charts and every run's record, as a page to share.
    super::report::run(
        &client,
        super::report::ReportArgs {
            model: "digits".into(),
            job: vec![job.clone()],
            out: dir.join("report.html"),
            format: super::report::ReportFormat::Html,
            min_accuracy: Some(0.95),
        },
    )
    .await
    .context("writing the report")?;

    // A generative model: the bundled Llama-style decoder (random weights), tokens per platform.
    let llm = a.models.join("llm").join("tiny-llama.onnx");
    let pushed = models::push(&client, &llm, "tiny-llama", Some("fp32"), None, None, None)
        .await
        .with_context(|| format!("bundled decoder {}", llm.display()))?;
    eprintln!(
        "pushed tiny-llama/{} ({} bytes)",
        pushed.variant, pushed.size_bytes
    );
    let gen_args = JobArgs {
        model: Some("tiny-llama".into()),
        variants: vec!["all".into()],
        name: Some("quickstart-generate".into()),
        scenario: Some("generate".into()),
        prompt_tokens: Some("128".into()),
        output_tokens: Some("64".into()),
        iterations: Some(a.iterations.map_or(40, |n| n.clamp(1, 40))),
        warmup: Some(2),
        window_ms: Some(500),
        ..Default::default()
    };
    let gen_job = jobs::submit(&client, &gen_args).await?;
    eprintln!("job {gen_job} submitted (generate: prompt 128, output 64 tokens, closed loop)");
    let gen_summary = jobs::watch(&client, &gen_job, true).await?;
    let resp = rank::fetch(
        &client,
        &rank::RankArgs {
            model: "tiny-llama".into(),
            objective: "tokens-per-s".into(),
            job: Some(gen_job.clone()),
            ..rank::RankArgs::for_model("tiny-llama")
        },
    )
    .await?;
    outln!("ranking of 'tiny-llama' by output tokens per second (best first):");
    outln!("{}", rank::table(&resp));
    if gen_summary.state != "succeeded" {
        bail!(
            "job {gen_job} ended {}; see `fleetbench jobs show {gen_job}` and the logs in {}",
            gen_summary.state,
            dir.display()
        );
    }
    eprintln!(
        "quickstart finished in {:.1}s; logs and database in {}",
        started.elapsed().as_secs_f64(),
        dir.display()
    );
    Ok(())
}
