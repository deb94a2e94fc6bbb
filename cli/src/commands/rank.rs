//! `fleetbench rank`: which platform and variant to deploy a model on.

use anyhow::Result;
use clap::Args;
use fleetbench_proto::v1::{RankRequest, RankResponse, RankRow};
use serde::Serialize;

use crate::client::Client;
use crate::output::{self, Format};

/// Rank options.
#[derive(Debug, Args)]
pub struct RankArgs {
    /// Model name.
    pub model: String,
    /// What to optimise: p50, p90, p95, p99, throughput, cost or accuracy; for generate runs also
    /// tokens-per-s, ttft-p99, tpot-p99 or goodput (cost is then per million output tokens).
    #[arg(long, default_value = "p99")]
    pub objective: String,
    /// Only rows with p99 at most this many milliseconds.
    #[arg(long)]
    pub max_p99_ms: Option<f64>,
    /// Only rows with at least this many samples per second.
    #[arg(long)]
    pub min_throughput: Option<f64>,
    /// Only rows whose accuracy is at most this many points below the base variant on the same platform.
    #[arg(long)]
    pub max_accuracy_drop: Option<f64>,
    /// Only rows with at least this top-1 accuracy, as a fraction (0.97).
    #[arg(long)]
    pub min_accuracy: Option<f64>,
    /// Only rows whose peak RSS is at most this many MiB.
    #[arg(long)]
    pub max_rss_mb: Option<f64>,
    /// Include INVALID runs.
    #[arg(long)]
    pub include_invalid: bool,
    /// Keep only the best configuration of each (platform, variant).
    #[arg(long)]
    pub best_config: bool,
    /// Only runs of this job.
    #[arg(long)]
    pub job: Option<String>,
    /// Show each row's runs in time order, with change points of their medians (CUSUM).
    #[arg(long)]
    pub history: bool,
    /// Rank by end-to-end time for a client at this network target: `coordinator`, or a probe target
    /// the agents measure (`fleetbench-agent --probe NAME=HOST:PORT`). Each row's latency gets one
    /// request's network time added (RTT + bytes over the measured throughput, the median over the
    /// row's agents); --max-p99-ms then limits the end-to-end p99. Latency objectives only.
    #[arg(long)]
    pub client: Option<String>,
    /// With --client: bytes of one request, client to platform.
    #[arg(long, default_value_t = 0, requires = "client")]
    pub payload_bytes: u64,
    /// With --client: bytes of one response, platform to client.
    #[arg(long, default_value_t = 0, requires = "client")]
    pub response_bytes: u64,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Format,
}

impl RankArgs {
    /// The defaults of `rank MODEL`: by p99, valid runs only, a table.
    pub fn for_model(model: &str) -> Self {
        RankArgs {
            model: model.to_string(),
            objective: "p99".into(),
            max_p99_ms: None,
            min_throughput: None,
            max_accuracy_drop: None,
            min_accuracy: None,
            max_rss_mb: None,
            include_invalid: false,
            best_config: false,
            job: None,
            history: false,
            client: None,
            payload_bytes: 0,
            response_bytes: 0,
            output: Format::Table,
        }
    }
}

/// A ranking row as printed by `--output json`.
#[derive(Debug, Serialize)]
pub struct RankJson {
    /// 1-based rank; tied rows share their group leader's.
    pub rank: u32,
    /// The row's 95 % interval of the objective overlaps its group leader's (p50, p99, throughput, cost
    /// and accuracy objectives).
    pub tied: bool,
    /// Readable platform name.
    pub platform: String,
    /// Platform id.
    pub platform_id: String,
    /// Variant name.
    pub variant: String,
    /// Configuration label.
    pub config: String,
    /// Median latency.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 95th percentile.
    pub p95_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// 95 % CI of p50.
    pub p50_ci_ms: [f64; 2],
    /// 95 % CI of p99.
    pub p99_ci_ms: [f64; 2],
    /// 95 % CI of p90 (zeros from a coordinator that predates it).
    pub p90_ci_ms: [f64; 2],
    /// 95 % CI of p95.
    pub p95_ci_ms: [f64; 2],
    /// Samples per second.
    pub throughput_per_s: f64,
    /// 95 % interval of the throughput (bootstrap over windows, pooled by run time).
    pub throughput_ci_per_s: Option<[f64; 2]>,
    /// Top-1 accuracy in [0, 1].
    pub accuracy: Option<f64>,
    /// 95 % Wilson interval of the accuracy.
    pub accuracy_ci: Option<[f64; 2]>,
    /// Accuracy minus the base variant's on the same platform, points.
    pub accuracy_delta_pts: Option<f64>,
    /// Top-1 agreement with the base variant's outputs on the same platform.
    pub agreement: Option<f64>,
    /// Cosine similarity to the base variant's outputs on the same platform.
    pub fidelity_cosine: Option<f64>,
    /// Cost per million samples.
    pub cost_per_million: Option<f64>,
    /// 95 % interval of the cost per million, from the throughput interval.
    pub cost_ci: Option<[f64; 2]>,
    /// Runs pooled.
    pub runs: u32,
    /// With more than one run pooled: the coefficients of variation of the runs' p50, p99 and
    /// throughput.
    pub spread: Option<Spread>,
    /// With more than one agent: how many, and the coefficients of variation of their mean p50 and
    /// throughput.
    pub hosts: Option<fleetbench_proto::v1::HostSpread>,
    /// Agents whose figures stand apart from their peers' or whose runs were disturbed.
    pub noisy_hosts: Vec<fleetbench_proto::v1::NoisyHost>,
    /// With `--history`: the runs in time order, change points marked.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<fleetbench_proto::v1::HistoryPoint>,
    /// Their ids.
    pub run_ids: Vec<String>,
    /// Peak RSS, bytes.
    pub rss_peak_bytes: u64,
    /// Artifact size, bytes.
    pub size_bytes: u64,
    /// Comparable record (runtime version, provider).
    pub record: String,
    /// The runs were stored before fleetbench kept a full pooling key: they pool only with each other.
    pub legacy: bool,
    /// What the pooled runs share (the work and how it ran); a string for legacy rows.
    pub pool: serde_json::Value,
    /// Generate runs: TTFT, TPOT and ITL (ms), tokens and requests per second, goodput, KV-cache bytes
    /// per token and cost per million output tokens; null otherwise.
    pub generation: Option<fleetbench_proto::v1::GenerationStats>,
    /// With `--client`: one request's network time to this row's platform (ms, bytes/s) and the
    /// end-to-end latencies ranked by; null without a client, or when none of the row's agents
    /// measured the client's path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<fleetbench_proto::v1::NetworkTime>,
}

/// How much the pooled runs of a row differ (coefficients of variation).
#[derive(Debug, Clone, Copy, Serialize, serde::Deserialize, PartialEq)]
pub struct Spread {
    /// Of the runs' medians.
    pub p50_cv: f64,
    /// Of the runs' 99th percentiles.
    pub p99_cv: f64,
    /// Of the runs' throughputs.
    pub throughput_cv: f64,
}

/// An interval as a pair.
pub fn pair(i: Option<fleetbench_proto::v1::Interval>) -> Option<[f64; 2]> {
    i.map(|i| [i.low, i.high])
}

impl From<&RankRow> for RankJson {
    fn from(r: &RankRow) -> Self {
        let l = r.latency.unwrap_or_default();
        RankJson {
            rank: r.rank,
            tied: r.tied,
            platform: r.platform.clone(),
            platform_id: r.platform_id.clone(),
            variant: r.variant.clone(),
            config: r.config.clone(),
            p50_ms: l.p50_ms,
            p90_ms: l.p90_ms,
            p95_ms: l.p95_ms,
            p99_ms: l.p99_ms,
            p999_ms: l.p999_ms,
            p50_ci_ms: [l.p50_ci_low_ms, l.p50_ci_high_ms],
            p99_ci_ms: [l.p99_ci_low_ms, l.p99_ci_high_ms],
            p90_ci_ms: [l.p90_ci_low_ms, l.p90_ci_high_ms],
            p95_ci_ms: [l.p95_ci_low_ms, l.p95_ci_high_ms],
            throughput_per_s: r.throughput_per_s,
            throughput_ci_per_s: pair(r.throughput_ci_per_s),
            accuracy: r.accuracy,
            accuracy_ci: pair(r.accuracy_ci),
            accuracy_delta_pts: r.accuracy_delta_pts,
            agreement: r.agreement,
            fidelity_cosine: r.fidelity_cosine,
            cost_per_million: r.cost_per_million,
            cost_ci: pair(r.cost_ci),
            runs: r.runs,
            spread: r.spread.map(|s| Spread {
                p50_cv: s.p50_cv,
                p99_cv: s.p99_cv,
                throughput_cv: s.throughput_cv,
            }),
            hosts: r.hosts,
            noisy_hosts: r.noisy_hosts.clone(),
            history: r.history.clone(),
            run_ids: r.run_ids.clone(),
            rss_peak_bytes: r.rss_peak_bytes,
            size_bytes: r.size_bytes,
            record: r.record_key.clone(),
            legacy: r.legacy,
            pool: serde_json::from_str(&r.pool_key)
                .unwrap_or_else(|_| serde_json::Value::String(r.pool_key.clone())),
            generation: r.generation,
            network: r.network.clone(),
        }
    }
}

/// Asks the coordinator for a ranking.
pub async fn fetch(client: &Client, a: &RankArgs) -> Result<RankResponse> {
    let req = RankRequest {
        model: a.model.clone(),
        objective: a.objective.clone(),
        max_p99_ms: a.max_p99_ms,
        min_throughput: a.min_throughput,
        max_accuracy_drop: a.max_accuracy_drop,
        max_rss_bytes: a.max_rss_mb.map(|m| (m * 1024.0 * 1024.0) as u64),
        min_accuracy: a.min_accuracy,
        include_invalid: a.include_invalid,
        best_config_only: a.best_config,
        job_id: a.job.clone().unwrap_or_default(),
        history: a.history,
        client: a.client.clone().unwrap_or_default(),
        request_bytes: a.payload_bytes,
        response_bytes: a.response_bytes,
    };
    let mut resp = client
        .rankings()
        .rank(req)
        .await
        .map_err(|s| client.error(s, "ranking"))?
        .into_inner();
    // A coordinator from before `min_accuracy` ignores it: the floor holds here all the same.
    if let Some(m) = a.min_accuracy {
        resp.rows.retain(|r| r.accuracy.is_some_and(|acc| acc >= m));
    }
    Ok(resp)
}

/// A ranking of generate rows: token figures instead of single-call latency and accuracy.
pub fn token_table(resp: &RankResponse) -> comfy_table::Table {
    let mut header = vec!["#", "PLATFORM", "VARIANT", "CONFIG"];
    header.extend_from_slice(output::TOKEN_HEADER);
    header.extend(["KV/TOKEN", "RUNS"]);
    let mut t = output::table(&header);
    for r in &resp.rows {
        let g = r.generation.unwrap_or_default();
        let mut row = vec![
            rank_cell(r),
            r.platform.clone(),
            r.variant.clone(),
            r.config.clone(),
        ];
        row.extend(output::token_cells(&g));
        row.push(output::bytes(g.kv_bytes_per_token));
        row.push(r.runs.to_string());
        t.add_row(row);
    }
    t
}

/// The ranking as a table.
pub fn table(resp: &RankResponse) -> comfy_table::Table {
    if !resp.rows.is_empty() && resp.rows.iter().all(|r| r.generation.is_some()) {
        return token_table(resp);
    }
    if resp.rows.iter().any(|r| r.network.is_some()) {
        return network_table(resp);
    }
    let mut t = output::table(&[
        "#",
        "PLATFORM",
        "VARIANT",
        "CONFIG",
        "P50",
        "P90",
        "P99",
        "SAMPLES/S",
        "ACCURACY",
        "Δ ACC",
        "AGREE",
        "SIZE",
        "COST/1M",
        "RUNS",
    ]);
    for r in &resp.rows {
        let l = r.latency.unwrap_or_default();
        t.add_row(vec![
            rank_cell(r),
            r.platform.clone(),
            r.variant.clone(),
            if r.legacy {
                format!("{} †", r.config)
            } else {
                r.config.clone()
            },
            output::ms(l.p50_ms),
            output::ms(l.p90_ms),
            output::ms(l.p99_ms),
            output::rate(r.throughput_per_s),
            output::pct(r.accuracy),
            r.accuracy_delta_pts
                .map(|d| format!("{d:+.2}"))
                .unwrap_or_else(|| "-".into()),
            output::pct(r.agreement),
            output::bytes(r.size_bytes),
            output::cost(r.cost_per_million),
            r.runs.to_string(),
        ]);
    }
    t
}

/// A ranking for a client: each row's network time and end-to-end latencies.
pub fn network_table(resp: &RankResponse) -> comfy_table::Table {
    let mut t = output::table(&[
        "#", "PLATFORM", "VARIANT", "CONFIG", "E2E P50", "E2E P99", "NETWORK", "RTT", "DOWN", "UP",
        "P50", "P99", "COST/1M",
    ]);
    for r in &resp.rows {
        let l = r.latency.unwrap_or_default();
        let mut row = vec![
            rank_cell(r),
            r.platform.clone(),
            r.variant.clone(),
            r.config.clone(),
        ];
        match &r.network {
            Some(n) => row.extend([
                output::ms(n.e2e_p50_ms),
                output::ms(n.e2e_p99_ms),
                output::ms(n.network_ms),
                output::ms(n.rtt_ms),
                fleetbench_common::network::format_rate(n.down_bytes_per_s),
                fleetbench_common::network::format_rate(n.up_bytes_per_s),
            ]),
            None => row.extend(["no path", "-", "-", "-", "-", "-"].map(String::from)),
        }
        row.extend([
            output::ms(l.p50_ms),
            output::ms(l.p99_ms),
            output::cost(r.cost_per_million),
        ]);
        t.add_row(row);
    }
    t
}

/// The note under a ranking for a client.
pub fn network_note(resp: &RankResponse, a: &RankArgs) -> Option<String> {
    let client = a.client.as_deref()?;
    let unmeasured = resp.rows.iter().filter(|r| r.network.is_none()).count();
    let mut note = format!(
        "E2E = latency + one request's network time from '{client}': RTT + {} request bytes over DOWN \
         + {} response bytes over UP, as the row's agents measured them (median over agents) between \
         tasks.",
        a.payload_bytes, a.response_bytes
    );
    if unmeasured > 0 {
        note.push_str(&format!(
            " {unmeasured} row(s) say 'no path': none of their agents has measured '{client}' (an agent \
             older than protocol 6, one without --probe {client}=HOST:PORT, or an unreachable target; \
             see `fleetbench agents list`); they are listed last."
        ));
    }
    Some(note)
}

/// A row's rank as shown: `=1` for rows tied with others.
fn rank_cell(r: &fleetbench_proto::v1::RankRow) -> String {
    if r.tied {
        format!("={}", r.rank)
    } else {
        r.rank.to_string()
    }
}

/// The note under a table with tied rows.
pub fn tie_note(resp: &RankResponse) -> Option<String> {
    resp.rows.iter().any(|r| r.tied).then(|| {
        let method = match resp.objective.as_str() {
            "throughput" => "a bootstrap over each run's windows",
            "cost" => "the throughput's (for generate rows the tokens') bootstrap interval",
            "accuracy" => "Wilson intervals over the rows evaluated",
            "ttft-p99" => "order statistics of the pooled time-to-first-token histogram",
            "tokens-per-s" | "goodput" => "a bootstrap over each run's windows",
            "tpot-p99" => "order statistics of the pooled time-per-output-token histogram",
            _ => "order statistics of the pooled histogram",
        };
        format!(
            "=N: tied. These rows' 95 % confidence intervals of the {} ({method}) overlap their \
             group's first row's, so the measurements cannot tell them apart; tied rows are listed by \
             cost per million, lowest first.",
            resp.objective
        )
    })
}

/// The lines under a table with noisy hosts.
pub fn noisy_notes(resp: &RankResponse) -> Vec<String> {
    resp.rows
        .iter()
        .flat_map(|r| {
            r.noisy_hosts.iter().map(move |n| {
                format!(
                    "! noisy host {} on {} · {} · {}: {} (rule: beyond 3 scaled MADs and 20 % of its \
                     peers' median, or runs with CPU steal or throttling)",
                    n.agent, r.platform, r.variant, r.config, n.reason
                )
            })
        })
        .collect()
}

/// Each row's runs in time order, a `◆` where a new level of the medians starts.
pub fn history_tables(resp: &RankResponse) -> String {
    let mut out = String::new();
    for r in &resp.rows {
        out.push_str(&format!(
            "\nhistory of {} · {} · {} ({} runs)\n",
            r.platform,
            r.variant,
            r.config,
            r.history.len()
        ));
        let mut t = output::table(&["", "STARTED", "RUN", "AGENT", "P50", "P99", "SAMPLES/S"]);
        for h in &r.history {
            t.add_row(vec![
                if h.change_point { "◆" } else { "" }.to_string(),
                super::jobs::format_time(h.started_at_ms),
                output::short(&h.run_id).to_string(),
                h.agent.clone(),
                output::ms(h.p50_ms),
                output::ms(h.p99_ms),
                output::rate(h.throughput_per_s),
            ]);
        }
        out.push_str(&t.to_string());
        out.push('\n');
    }
    out.push_str(
        "◆: a new level of the runs' medians starts here (CUSUM of deviations from the mean, 95 % by \
         1,000 seeded shuffles, binary segmentation; shifts under 10 % are not marked).",
    );
    out
}

/// The note under a table with legacy rows.
pub fn legacy_note(resp: &RankResponse) -> Option<&'static str> {
    resp.rows.iter().any(|r| r.legacy).then_some(
        "† runs stored before fleetbench recorded everything that changes the work (shapes, input data, \
         warm-up, outstanding cap, latency bound, runtime and providers): they pool only with each other.",
    )
}

/// Runs `rank`.
pub async fn run(client: &Client, a: RankArgs) -> Result<()> {
    let resp = fetch(client, &a).await?;
    match a.output {
        Format::Json => {
            output::print_json(&resp.rows.iter().map(RankJson::from).collect::<Vec<_>>())
        }
        Format::Table => {
            if resp.rows.is_empty() {
                outln!(
                    "no finished runs of '{}' match (see `fleetbench jobs list`)",
                    a.model
                );
            } else {
                outln!(
                    "ranking of '{}' by {} (best first)",
                    a.model,
                    resp.objective
                );
                // With a client every row shows its network time, or that it has none.
                if a.client.is_some() {
                    outln!("{}", network_table(&resp));
                } else {
                    outln!("{}", table(&resp));
                }
                if let Some(note) = network_note(&resp, &a) {
                    outln!("{note}");
                }
                if let Some(note) = tie_note(&resp) {
                    outln!("{note}");
                }
                if let Some(note) = legacy_note(&resp) {
                    outln!("{note}");
                }
                for note in noisy_notes(&resp) {
                    outln!("{note}");
                }
                if a.history {
                    outln!("{}", history_tables(&resp));
                }
            }
            Ok(())
        }
    }
}
