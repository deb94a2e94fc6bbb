//! `fleetbench jobs`: submit, list, show, watch, cancel.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Result;
use clap::Subcommand;
use fleetbench_common::config::{DEFAULT_MAX_TASKS, config_label, scenario_name};
use fleetbench_common::convert::scenario_from_wire;
use fleetbench_common::domain::RunConfig;
use fleetbench_proto::v1::{
    CancelJobRequest, GetJobRequest, JobDetail, JobSummary, ListJobsRequest, RunSummary,
    SubmitJobRequest, TaskInfo,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Serialize;

use crate::client::Client;
use crate::jobspec::JobArgs;
use crate::output::{self, Format};

/// Job commands.
#[derive(Debug, Subcommand)]
pub enum JobsCmd {
    /// Submit a benchmark job; prints its id.
    Submit {
        /// TOML job file (keys as the flags, with underscores); flags override it.
        #[arg(short = 'f', long = "file")]
        file: Option<PathBuf>,
        /// Watch the job until it ends.
        #[arg(long)]
        watch: bool,
        #[command(flatten)]
        args: Box<JobArgs>,
    },
    /// List jobs, newest first.
    List {
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Format,
    },
    /// Show a job, its tasks and their runs.
    Show {
        /// Job id (a unique prefix is enough).
        job: String,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Format,
    },
    /// Follow a job's progress until it ends.
    Watch {
        /// Job id (a unique prefix is enough).
        job: String,
    },
    /// Cancel a job: pending tasks are dropped and running ones stopped.
    Cancel {
        /// Job id (a unique prefix is enough).
        job: String,
    },
    /// Delete a finished job with its tasks, runs and telemetry (rankings change); cancel a queued or
    /// running job first.
    Delete {
        /// Job id (a unique prefix is enough).
        job: String,
    },
}

/// Runs a job command.
pub async fn run(client: &Client, cmd: JobsCmd) -> Result<()> {
    match cmd {
        JobsCmd::Submit {
            file,
            watch: follow,
            args,
        } => {
            let args = match file {
                Some(f) => args.over(JobArgs::from_file(&f)?),
                None => *args,
            };
            let id = submit(client, &args).await?;
            outln!("{id}");
            if follow {
                let summary = watch(client, &id, true).await?;
                if summary.state != "succeeded" {
                    anyhow::bail!("job {} ended {}", output::short(&id), summary.state);
                }
            }
            Ok(())
        }
        JobsCmd::List { limit, output } => {
            let jobs = client
                .jobs()
                .list_jobs(ListJobsRequest { limit })
                .await
                .map_err(|s| client.error(s, "listing jobs"))?
                .into_inner()
                .jobs;
            match output {
                Format::Json => output::print_json(&jobs),
                Format::Table => {
                    let mut t = output::table(&[
                        "JOB", "MODEL", "NAME", "STATE", "TASKS", "DONE", "FAILED", "CREATED",
                    ]);
                    for j in &jobs {
                        t.add_row(vec![
                            output::short(&j.job_id).to_string(),
                            j.model.clone(),
                            j.name.clone(),
                            j.state.clone(),
                            j.tasks_total.to_string(),
                            j.tasks_succeeded.to_string(),
                            j.tasks_failed.to_string(),
                            format_time(j.created_at_ms),
                        ]);
                    }
                    outln!("{t}");
                    Ok(())
                }
            }
        }
        JobsCmd::Show { job, output } => {
            let detail = client
                .jobs()
                .get_job(GetJobRequest {
                    job_id: job.clone(),
                })
                .await
                .map_err(|s| client.error(s, "showing the job"))?
                .into_inner();
            match output {
                Format::Json => output::print_json(&JobJson::from(&detail)),
                Format::Table => {
                    print_detail(&detail);
                    Ok(())
                }
            }
        }
        JobsCmd::Watch { job } => {
            let summary = watch(client, &job, true).await?;
            outln!("job {} {}", output::short(&summary.job_id), summary.state);
            Ok(())
        }
        JobsCmd::Cancel { job } => {
            let s = client
                .jobs()
                .cancel_job(CancelJobRequest { job_id: job })
                .await
                .map_err(|s| client.error(s, "cancelling the job"))?
                .into_inner();
            outln!("job {} {}", output::short(&s.job_id), s.state);
            Ok(())
        }
        JobsCmd::Delete { job } => {
            let d = client
                .jobs()
                .delete_job(fleetbench_proto::v1::DeleteJobRequest { job_id: job })
                .await
                .map_err(|s| client.error(s, "deleting the job"))?
                .into_inner();
            outln!(
                "deleted job {} and its {} runs",
                output::short(&d.job_id),
                d.runs
            );
            Ok(())
        }
    }
}

/// Builds the spec, uploads input data, submits; returns the job id.
pub async fn submit(client: &Client, args: &JobArgs) -> Result<String> {
    let mut spec = args.to_spec(DEFAULT_MAX_TASKS)?;
    if let Some(path) = &args.input_data {
        // Read it here first: a file that is not .npz/.npy data is refused before anything is sent.
        fleetbench_runtime::data::read_arrays(path, "input")
            .map_err(|e| anyhow::anyhow!("input_data: {e}"))?;
        spec.config.input_data_sha256 = client.upload(path).await?.sha256;
    }
    let resp = client
        .jobs()
        .submit_job(SubmitJobRequest {
            spec: Some((&spec).into()),
        })
        .await
        .map_err(|s| client.error(s, "submitting the job"))?
        .into_inner();
    Ok(resp.job_id)
}

/// The label of a configuration as the coordinator sent it (or what is wrong with it).
pub fn label(c: Option<&fleetbench_proto::v1::RunConfig>) -> String {
    match c.cloned().map(RunConfig::try_from) {
        Some(Ok(c)) => config_label(&c),
        Some(Err(e)) => format!("({e})"),
        None => String::new(),
    }
}

pub fn format_time(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let secs = (fleetbench_common::now_ms() - ms).max(0) / 1000;
    if secs < 120 {
        format!("{secs}s ago")
    } else if secs < 7200 {
        format!("{}m ago", secs / 60)
    } else {
        format!("{}h ago", secs / 3600)
    }
}

fn task_line(t: &TaskInfo) -> String {
    let cfg = label(t.config.as_ref());
    let who = if t.agent.is_empty() {
        &t.target_agent
    } else {
        &t.agent
    };
    let mut s = format!(
        "{} {} on {} [{}]: {}",
        output::short(&t.task_id),
        t.variant,
        who,
        cfg,
        t.state
    );
    if let Some(g) = t.run.as_ref().and_then(|r| r.generation.as_ref()) {
        s.push_str(&format!(
            " (TTFT p99 {}, TPOT p99 {}, {} tokens/s",
            output::ms(g.ttft.unwrap_or_default().p99_ms),
            output::ms(g.tpot.unwrap_or_default().p99_ms),
            output::rate(g.output_tokens_per_s),
        ));
    }
    if let Some(r) = t.run.as_ref().filter(|r| r.generation.is_some()) {
        s.push_str(&if r.valid {
            ")".to_string()
        } else {
            format!(", INVALID: {})", r.invalid_reason)
        });
    } else if let Some(r) = &t.run {
        let lat = r.latency.unwrap_or_default();
        s.push_str(&format!(
            " (p50 {}, p99 {}, {} samples/s, accuracy {}{})",
            output::ms(lat.p50_ms),
            output::ms(lat.p99_ms),
            output::rate(r.throughput_per_s),
            output::pct(r.accuracy),
            if r.valid {
                String::new()
            } else {
                format!(", INVALID: {}", r.invalid_reason)
            }
        ));
    }
    if !t.error.is_empty() {
        s.push_str(&format!(": {}", t.error));
    }
    s
}

/// Follows a job until it ends, with progress bars on a terminal and one line per task change otherwise.
pub async fn watch(client: &Client, job: &str, show: bool) -> Result<JobSummary> {
    let mut stream = client
        .jobs()
        .watch_job(GetJobRequest {
            job_id: job.to_string(),
        })
        .await
        .map_err(|s| client.error(s, "watching the job"))?
        .into_inner();
    let tty = show && std::io::stderr().is_terminal();
    let multi = MultiProgress::with_draw_target(if tty {
        ProgressDrawTarget::stderr()
    } else {
        ProgressDrawTarget::hidden()
    });
    let overall = multi.add(ProgressBar::new(0));
    overall.set_style(
        ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} tasks {msg}")
            .expect("template")
            .progress_chars("=> "),
    );
    overall.set_prefix("job");
    let style = ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")
        .expect("template")
        .progress_chars("=> ");
    let mut bars: HashMap<String, ProgressBar> = HashMap::new();
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut last = None;
    while let Some(p) = stream
        .message()
        .await
        .map_err(|s| client.error(s, "watching the job"))?
    {
        let Some(summary) = p.summary.clone() else {
            continue;
        };
        overall.set_length(summary.tasks_total as u64);
        overall.set_position(
            (summary.tasks_succeeded + summary.tasks_failed + summary.tasks_cancelled) as u64,
        );
        overall.set_message(summary.state.clone());
        for t in &p.tasks {
            if seen.get(&t.task_id) != Some(&t.state) {
                seen.insert(t.task_id.clone(), t.state.clone());
                if show && t.state != "pending" {
                    let line = task_line(t);
                    if tty {
                        multi.println(line)?;
                    } else {
                        eprintln!("{line}");
                    }
                }
            }
            if !tty {
                continue;
            }
            match t.state.as_str() {
                "running" => {
                    let bar = bars.entry(t.task_id.clone()).or_insert_with(|| {
                        let b = multi.add(ProgressBar::new(t.target_queries.max(1)));
                        b.set_style(style.clone());
                        b.set_prefix(output::short(&t.task_id).to_string());
                        b.set_message(format!("{} on {}", t.variant, t.agent));
                        b
                    });
                    if t.target_queries > 0 {
                        bar.set_position(t.progress_queries.min(t.target_queries));
                    } else {
                        bar.set_length(t.progress_queries.max(1));
                        bar.set_position(t.progress_queries);
                    }
                }
                _ => {
                    if let Some(b) = bars.remove(&t.task_id) {
                        b.finish_and_clear();
                    }
                }
            }
        }
        last = Some(summary);
    }
    for (_, b) in bars {
        b.finish_and_clear();
    }
    overall.finish_and_clear();
    last.ok_or_else(|| anyhow::anyhow!("the coordinator sent no progress for job {job}"))
}

fn print_detail(d: &JobDetail) {
    let s = d.summary.clone().unwrap_or_default();
    outln!(
        "job {}  model {}  state {}  tasks {} ({} succeeded, {} failed, {} cancelled, {} pending, {} running)",
        s.job_id,
        s.model,
        s.state,
        s.tasks_total,
        s.tasks_succeeded,
        s.tasks_failed,
        s.tasks_cancelled,
        s.tasks_pending,
        s.tasks_running
    );
    if !s.trace_id.is_empty() {
        outln!(
            "trace {} (in the coordinator's OTLP backend: Jaeger, Tempo, ...)",
            s.trace_id
        );
    }
    let mut t = output::table(&[
        "TASK",
        "VARIANT",
        "AGENT",
        "CONFIG",
        "STATE",
        "VALID",
        "P50",
        "P90",
        "P99",
        "SAMPLES/S",
        "ACCURACY",
        "CPU %",
        "RSS PEAK",
        "NOTE",
    ]);
    for task in &d.tasks {
        let cfg = label(task.config.as_ref());
        let mut row = vec![
            output::short(&task.task_id).to_string(),
            task.variant.clone(),
            if task.agent.is_empty() {
                task.target_agent.clone()
            } else {
                task.agent.clone()
            },
            cfg,
            task.state.clone(),
        ];
        match &task.run {
            Some(r) => {
                let lat = r.latency.unwrap_or_default();
                let res = r.resources.clone().unwrap_or_default();
                row.extend([
                    if r.valid {
                        "VALID".into()
                    } else {
                        "INVALID".into()
                    },
                    output::ms(lat.p50_ms),
                    output::ms(lat.p90_ms),
                    output::ms(lat.p99_ms),
                    output::rate(r.throughput_per_s),
                    output::pct(r.accuracy),
                    format!("{:.0}", res.cpu_user_pct + res.cpu_system_pct),
                    output::bytes(res.rss_peak_bytes),
                    if r.valid {
                        res.flags.join("; ")
                    } else {
                        r.invalid_reason.clone()
                    },
                ]);
            }
            None => row.extend([
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                task.error.clone(),
            ]),
        }
        t.add_row(row);
    }
    outln!("{t}");
    let generated: Vec<(&TaskInfo, &fleetbench_proto::v1::GenerationStats)> = d
        .tasks
        .iter()
        .filter_map(|t| Some((t, t.run.as_ref()?.generation.as_ref()?)))
        .collect();
    if !generated.is_empty() {
        let mut header = vec!["TASK", "VARIANT", "AGENT"];
        header.extend_from_slice(output::TOKEN_HEADER);
        header.extend(["ITL P99", "E2E P99", "KV/TOKEN"]);
        let mut t = output::table(&header);
        for (task, g) in generated {
            let mut row = vec![
                output::short(&task.task_id).to_string(),
                task.variant.clone(),
                task.agent.clone(),
            ];
            row.extend(output::token_cells(g));
            row.push(output::ms(g.itl.unwrap_or_default().p99_ms));
            row.push(output::ms(
                task.run
                    .as_ref()
                    .and_then(|r| r.latency)
                    .unwrap_or_default()
                    .p99_ms,
            ));
            row.push(output::bytes(g.kv_bytes_per_token));
            t.add_row(row);
        }
        outln!("generated tokens (latencies per request; E2E is each request's whole latency)");
        outln!("{t}");
    }
}

/// `jobs show --output json`: the job with one flat record per run.
#[derive(Serialize)]
pub struct JobJson {
    /// Job id.
    pub job_id: String,
    /// Model.
    pub model: String,
    /// State.
    pub state: String,
    /// Counts.
    pub summary: JobSummary,
    /// Tasks with their runs.
    pub tasks: Vec<TaskJson>,
}

/// One task and its run, flattened.
#[derive(Serialize)]
pub struct TaskJson {
    /// Task id.
    pub task_id: String,
    /// Variant.
    pub variant: String,
    /// Agent that ran it.
    pub agent: String,
    /// Platform.
    pub platform: String,
    /// Task state.
    pub state: String,
    /// Failure reason.
    pub error: String,
    /// Attempts.
    pub attempt: u32,
    /// Configuration label.
    pub config_label: String,
    /// Scenario.
    pub scenario: String,
    /// Run figures (null until the task succeeds).
    pub run: Option<RunJson>,
}

/// A run's figures.
#[derive(Serialize)]
pub struct RunJson {
    /// Run id.
    pub run_id: String,
    /// VALID?
    pub valid: bool,
    /// Why INVALID.
    pub invalid_reason: String,
    /// Stable over the last windows?
    pub stable: bool,
    /// Median latency.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 97th percentile.
    pub p97_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Mean.
    pub mean_ms: f64,
    /// Standard deviation.
    pub stddev_ms: f64,
    /// Minimum.
    pub min_ms: f64,
    /// Maximum.
    pub max_ms: f64,
    /// 95 % CI of p50.
    pub p50_ci_ms: [f64; 2],
    /// 95 % CI of p99.
    pub p99_ci_ms: [f64; 2],
    /// Samples per second.
    pub throughput_per_s: f64,
    /// Timed queries.
    pub queries: u64,
    /// Timed samples.
    pub samples: u64,
    /// Timed duration.
    pub duration_ms: f64,
    /// Windows stored.
    pub windows: u64,
    /// Top-1 accuracy.
    pub accuracy: Option<f64>,
    /// Session creation.
    pub session_create_ms: f64,
    /// First inference.
    pub first_inference_ms: f64,
    /// Late queries (server).
    pub late_queries: u64,
    /// Dropped queries (server).
    pub dropped_queries: u64,
    /// Configuration as run.
    pub config: Option<fleetbench_proto::v1::RunConfig>,
    /// Resource summary.
    pub resources: Option<fleetbench_proto::v1::ResourceSummary>,
    /// Reproducibility record.
    pub record: serde_json::Value,
    /// Scenario details.
    pub scenario_details: serde_json::Value,
    /// Generate runs: TTFT, TPOT and ITL (ms), tokens and requests per second, goodput, KV-cache bytes
    /// per token and cost per million output tokens; null otherwise.
    pub generation: Option<fleetbench_proto::v1::GenerationStats>,
}

impl From<&RunSummary> for RunJson {
    fn from(r: &RunSummary) -> Self {
        let l = r.latency.unwrap_or_default();
        RunJson {
            run_id: r.run_id.clone(),
            valid: r.valid,
            invalid_reason: r.invalid_reason.clone(),
            stable: r.stable,
            p50_ms: l.p50_ms,
            p90_ms: l.p90_ms,
            p95_ms: l.p95_ms,
            p97_ms: l.p97_ms,
            p99_ms: l.p99_ms,
            p999_ms: l.p999_ms,
            mean_ms: l.mean_ms,
            stddev_ms: l.stddev_ms,
            min_ms: l.min_ms,
            max_ms: l.max_ms,
            p50_ci_ms: [l.p50_ci_low_ms, l.p50_ci_high_ms],
            p99_ci_ms: [l.p99_ci_low_ms, l.p99_ci_high_ms],
            throughput_per_s: r.throughput_per_s,
            queries: r.queries,
            samples: r.samples,
            duration_ms: r.duration_ms,
            windows: r.windows,
            accuracy: r.accuracy,
            session_create_ms: r.session_create_ms,
            first_inference_ms: r.first_inference_ms,
            late_queries: r.late_queries,
            dropped_queries: r.dropped_queries,
            config: r.config.clone(),
            resources: r.resources.clone(),
            record: serde_json::from_str(&r.record_json).unwrap_or_default(),
            scenario_details: serde_json::from_str(&r.scenario_json).unwrap_or_default(),
            generation: r.generation,
        }
    }
}

impl From<&JobDetail> for JobJson {
    fn from(d: &JobDetail) -> Self {
        let s = d.summary.clone().unwrap_or_default();
        JobJson {
            job_id: s.job_id.clone(),
            model: s.model.clone(),
            state: s.state.clone(),
            summary: s,
            tasks: d
                .tasks
                .iter()
                .map(|t| TaskJson {
                    task_id: t.task_id.clone(),
                    variant: t.variant.clone(),
                    agent: if t.agent.is_empty() {
                        t.target_agent.clone()
                    } else {
                        t.agent.clone()
                    },
                    platform: t.platform_name.clone(),
                    state: t.state.clone(),
                    error: t.error.clone(),
                    attempt: t.attempt,
                    config_label: label(t.config.as_ref()),
                    scenario: t
                        .config
                        .as_ref()
                        .map(|c| {
                            scenario_from_wire("scenario", c.scenario)
                                .map(|s| scenario_name(s).to_string())
                                .unwrap_or_else(|e| e.to_string())
                        })
                        .unwrap_or_default(),
                    run: t.run.as_ref().map(RunJson::from),
                })
                .collect(),
        }
    }
}

/// Polls until `cond` holds for the agent list, or fails after `timeout`.
pub async fn wait_for_agents(client: &Client, online: usize, timeout: Duration) -> Result<()> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let agents = client
            .fleet()
            .list_agents(fleetbench_proto::v1::ListAgentsRequest {})
            .await
            .map_err(|s| client.error(s, "listing agents"))?
            .into_inner()
            .agents;
        if agents.iter().filter(|a| a.online).count() >= online {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            anyhow::bail!(
                "only {} of {online} agents came online within {timeout:?}",
                agents.iter().filter(|a| a.online).count()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
