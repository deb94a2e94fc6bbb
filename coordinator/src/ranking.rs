//! Rankings: for a model, pool the successful runs of each (platform, variant, pooling key — see
//! [`crate::pooling`]), merge their histograms exactly, derive throughput, accuracy (and its change
//! against the base variant on the same platform and configuration) and cost per million samples,
//! filter by constraints, and sort by the objective.

use std::collections::{BTreeMap, HashMap};

use fleetbench_common::network::{self, NetworkPath};
use fleetbench_common::{changepoint, hist, intervals};

use crate::context::Context;
use crate::domain::{
    HistoryPoint, HostSpread, NetworkTime, NoisyHost, RankQuery, RankRow, Ranking, RunSpread,
    Variant,
};
use crate::error::{Error, Result};
use crate::generation::TokenTotals;
use crate::pooling;
use crate::store::StoredRun;

/// What rows are sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Objective {
    /// Median latency, lowest first.
    P50,
    /// 90th percentile latency, lowest first.
    P90,
    /// 95th percentile latency, lowest first.
    P95,
    /// 99th percentile latency, lowest first.
    P99,
    /// Samples per second, highest first.
    Throughput,
    /// Cost per million samples, lowest first (rows without cost last).
    Cost,
    /// Accuracy, highest first.
    Accuracy,
    /// Generate runs: output tokens per second, highest first.
    TokensPerS,
    /// Generate runs: p99 time to first token, lowest first.
    TtftP99,
    /// Generate runs: p99 time per output token, lowest first.
    TpotP99,
    /// Generate runs: requests per second that met the SLO, highest first.
    Goodput,
}

impl Objective {
    /// Parses an objective name; empty means p99.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s.trim().to_ascii_lowercase().as_str() {
            "" | "p99" => Objective::P99,
            "p50" | "latency" => Objective::P50,
            "p90" => Objective::P90,
            "p95" => Objective::P95,
            "throughput" | "qps" => Objective::Throughput,
            "cost" => Objective::Cost,
            "accuracy" => Objective::Accuracy,
            "tokens-per-s" | "tokens" | "tokens/s" => Objective::TokensPerS,
            "ttft-p99" | "ttft" => Objective::TtftP99,
            "tpot-p99" | "tpot" => Objective::TpotP99,
            "goodput" => Objective::Goodput,
            other => {
                return Err(Error::InvalidArgument(format!(
                    "objective: unknown objective '{other}' (expected p50, p90, p95, p99, throughput, cost, accuracy, \
                     or for generate runs tokens-per-s, ttft-p99, tpot-p99, goodput)"
                )));
            }
        })
    }

    /// Name as shown.
    pub fn name(self) -> &'static str {
        match self {
            Objective::P50 => "p50",
            Objective::P90 => "p90",
            Objective::P95 => "p95",
            Objective::P99 => "p99",
            Objective::Throughput => "throughput",
            Objective::Cost => "cost",
            Objective::Accuracy => "accuracy",
            Objective::TokensPerS => "tokens-per-s",
            Objective::TtftP99 => "ttft-p99",
            Objective::TpotP99 => "tpot-p99",
            Objective::Goodput => "goodput",
        }
    }

    /// Sort key: smaller is better.
    fn key(self, row: &RankRow) -> f64 {
        let lat = row.latency;
        let net = row.network.as_ref().map_or(0.0, |n| n.network_ms);
        match self {
            Objective::P50 => lat.p50_ms + net,
            Objective::P90 => lat.p90_ms + net,
            Objective::P95 => lat.p95_ms + net,
            Objective::P99 => lat.p99_ms + net,
            Objective::Throughput => -row.throughput_per_s,
            // A generate row costs per million output tokens; rows without a cost sort last.
            Objective::Cost => match &row.generation {
                Some(g) => g.cost_per_million_tokens,
                None => row.cost_per_million,
            }
            .unwrap_or(f64::INFINITY),
            Objective::Accuracy => -row.accuracy.unwrap_or(f64::NEG_INFINITY),
            // Rows without token figures sort after every generate row.
            Objective::TokensPerS => row
                .generation
                .as_ref()
                .map_or(f64::INFINITY, |g| -g.output_tokens_per_s),
            Objective::TtftP99 => row
                .generation
                .as_ref()
                .map_or(f64::INFINITY, |g| g.ttft.p99_ms),
            Objective::TpotP99 => row
                .generation
                .as_ref()
                .map_or(f64::INFINITY, |g| g.tpot.p99_ms),
            Objective::Goodput => row
                .generation
                .as_ref()
                .map_or(f64::INFINITY, |g| -g.goodput_per_s),
        }
    }
}

impl Objective {
    /// Whether the objective is a latency percentile (what a client's network time adds to).
    fn is_latency(self) -> bool {
        matches!(
            self,
            Objective::P50 | Objective::P90 | Objective::P95 | Objective::P99
        )
    }
}

/// One request's network time from `req.client` to the agents that ran `runs`: the median over those
/// agents of their measured round trip and throughputs (agents without a successful measurement of
/// that path are left out); None when none has one.
fn network_time(
    runs: &[&StoredRun],
    paths: &HashMap<String, NetworkPath>,
    req: &RankQuery,
) -> Option<NetworkTime> {
    let mut agents: Vec<&str> = runs.iter().map(|r| r.summary.agent.as_str()).collect();
    agents.sort_unstable();
    agents.dedup();
    let measured: Vec<&NetworkPath> = agents.iter().filter_map(|a| paths.get(*a)).collect();
    if measured.is_empty() {
        return None;
    }
    let median = |f: fn(&NetworkPath) -> f64| {
        changepoint::median(&measured.iter().map(|p| f(p)).collect::<Vec<_>>())
    };
    let (rtt_ms, down, up) = (
        median(|p| p.rtt_ms),
        median(|p| p.down_bytes_per_s),
        median(|p| p.up_bytes_per_s),
    );
    Some(NetworkTime {
        client: req.client.clone(),
        network_ms: network::request_time_ms(
            rtt_ms,
            down,
            up,
            req.request_bytes,
            req.response_bytes,
        )?,
        rtt_ms,
        down_bytes_per_s: down,
        up_bytes_per_s: up,
        agents: measured.len() as u32,
    })
}

/// One rate of a generate run's summary and its interval.
type RateOf = fn(&crate::domain::GenerationSummary) -> (f64, Option<(f64, f64)>);

fn mean(values: impl Iterator<Item = f64>) -> Option<f64> {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    (n > 0).then(|| sum / n as f64)
}

/// Pools runs into one row.
fn pool(runs: &[&StoredRun], size_bytes: u64) -> Result<RankRow> {
    let mut merged = hist::new_histogram();
    for r in runs {
        hist::merge(&mut merged, &hist::decode(&r.histogram)?)?;
    }
    let samples: u64 = runs.iter().map(|r| r.summary.samples).sum();
    let seconds: f64 = runs.iter().map(|r| r.summary.duration_ms / 1e3).sum();
    let throughput = if seconds > 0.0 {
        samples as f64 / seconds
    } else {
        0.0
    };
    let accuracy = mean(runs.iter().filter_map(|r| r.summary.accuracy));
    let fidelity: Vec<fleetbench_common::quality::Fidelity> = runs
        .iter()
        .filter_map(|r| {
            serde_json::from_str::<fleetbench_common::quality::Quality>(&r.summary.quality_json)
                .ok()?
                .fidelity
        })
        .collect();
    let agreement = mean(fidelity.iter().filter_map(|f| f.top1_agreement));
    let fidelity_cosine = mean(fidelity.iter().map(|f| f.cosine));
    let cost_per_hour = mean(runs.iter().filter_map(|r| r.summary.cost_per_hour));
    let per_million = |thr: f64| {
        cost_per_hour
            .filter(|_| thr > 0.0)
            .map(|c| c / (thr * 3600.0) * 1e6)
    };
    let cost_per_million = per_million(throughput);
    let throughput_ci = intervals::pool_throughput(
        &runs
            .iter()
            .map(|r| {
                let s = &r.summary;
                (
                    s.throughput_per_s,
                    s.throughput_ci_per_s,
                    s.duration_ms / 1e3,
                )
            })
            .collect::<Vec<_>>(),
    );
    // Cost falls as throughput rises: the interval's ends swap.
    let cost_ci = throughput_ci.and_then(|(lo, hi)| Some((per_million(hi)?, per_million(lo)?)));
    // The pooled runs evaluate the same rows: the evidence is one evaluation's, not their sum.
    let evaluated = runs
        .iter()
        .filter_map(|r| {
            serde_json::from_str::<fleetbench_common::quality::Quality>(&r.summary.quality_json)
                .ok()?
                .classification
                .map(|c| c.samples)
        })
        .min()
        .unwrap_or(0);
    let accuracy_ci = accuracy.and_then(|a| intervals::wilson(a, evaluated));
    let per_run =
        |f: fn(&StoredRun) -> f64| intervals::cv(&runs.iter().map(|r| f(r)).collect::<Vec<_>>());
    let spread = match (
        per_run(|r| r.summary.latency.p50_ms),
        per_run(|r| r.summary.latency.p99_ms),
        per_run(|r| r.summary.throughput_per_s),
    ) {
        (Some(p50_cv), Some(p99_cv), Some(throughput_cv)) => Some(RunSpread {
            p50_cv,
            p99_cv,
            throughput_cv,
        }),
        _ => None,
    };
    let (hosts, noisy_hosts) = fleet_figures(runs);
    let first = runs[0];
    let generation = if runs.iter().any(|r| r.summary.generation.is_some()) {
        let mut totals = TokenTotals::default();
        for g in runs.iter().filter_map(|r| r.summary.generation.as_ref()) {
            totals.add(&g.histograms)?;
        }
        let requests: u64 = runs.iter().map(|r| r.summary.queries).sum();
        let kv = runs
            .iter()
            .filter_map(|r| r.summary.generation.as_ref())
            .map(|g| g.kv_bytes_per_token)
            .max()
            .unwrap_or(0);
        let mut g = totals.summary(requests, seconds, kv, cost_per_hour);
        let pooled = |rate: RateOf| {
            intervals::pool_throughput(
                &runs
                    .iter()
                    .map(|r| {
                        let (v, ci) = r.summary.generation.as_ref().map_or((0.0, None), rate);
                        (v, ci, r.summary.duration_ms / 1e3)
                    })
                    .collect::<Vec<_>>(),
            )
        };
        g.output_tokens_ci_per_s = pooled(|g| (g.output_tokens_per_s, g.output_tokens_ci_per_s));
        g.goodput_ci_per_s = pooled(|g| (g.goodput_per_s, g.goodput_ci_per_s));
        Some(g)
    } else {
        None
    };
    Ok(RankRow {
        rank: 0,
        tied: false,
        platform_id: first.platform_id.clone(),
        platform: first.platform_name.clone(),
        variant: first.variant.clone(),
        config: first.config_key.clone(),
        latency: hist::stats(&merged).to_ms(),
        throughput_per_s: throughput,
        throughput_ci,
        accuracy,
        accuracy_ci,
        cost_ci,
        spread,
        hosts,
        noisy_hosts,
        history: Vec::new(),
        accuracy_delta_pts: None,
        agreement,
        fidelity_cosine,
        cost_per_million,
        runs: runs.len() as u32,
        run_ids: runs.iter().map(|r| r.run_id.clone()).collect(),
        rss_peak_bytes: runs
            .iter()
            .map(|r| r.summary.resources.rss_peak_bytes)
            .max()
            .unwrap_or(0),
        size_bytes,
        run_config: first.summary.config.clone(),
        record_key: record_key(&first.summary.record_json),
        legacy: pooling::is_legacy(&first.pool_key),
        pool_key: first.pool_key.clone(),
        generation,
        network: None,
    })
}

/// How the agents that ran a row differ: the spread of their mean p50 and throughput, and the agents
/// that stand apart from their peers ([`changepoint::outliers`]) or whose runs were disturbed (steal,
/// throttling). Ratios are to the median of the other agents.
fn fleet_figures(runs: &[&StoredRun]) -> (Option<HostSpread>, Vec<NoisyHost>) {
    let mut by_agent: BTreeMap<&str, Vec<&StoredRun>> = BTreeMap::new();
    for r in runs {
        by_agent
            .entry(r.summary.agent.as_str())
            .or_default()
            .push(r);
    }
    let agents: Vec<&str> = by_agent.keys().copied().collect();
    let per_agent = |f: fn(&StoredRun) -> f64| -> Vec<f64> {
        by_agent
            .values()
            .map(|rs| rs.iter().map(|r| f(r)).sum::<f64>() / rs.len() as f64)
            .collect()
    };
    let p50 = per_agent(|r| r.summary.latency.p50_ms);
    let thr = per_agent(|r| r.summary.throughput_per_s);
    let hosts = match (intervals::cv(&p50), intervals::cv(&thr)) {
        (Some(p50_cv), Some(throughput_cv)) => Some(HostSpread {
            agents: agents.len() as u32,
            p50_cv,
            throughput_cv,
        }),
        _ => None,
    };
    let (p50_out, thr_out) = (changepoint::outliers(&p50), changepoint::outliers(&thr));
    let (p50_ratio, thr_ratio) = (
        changepoint::peer_ratios(&p50),
        changepoint::peer_ratios(&thr),
    );
    let mut noisy = Vec::new();
    for (i, agent) in agents.iter().enumerate() {
        let mut why = Vec::new();
        if let Some(x) = p50_out[i] {
            why.push(format!("p50 {x:.2}× its peers' median"));
        }
        if let Some(x) = thr_out[i] {
            why.push(format!("throughput {x:.2}× its peers' median"));
        }
        let mut flags: Vec<&str> = by_agent[agent]
            .iter()
            .flat_map(|r| r.summary.resources.flags.iter().map(String::as_str))
            .collect();
        flags.sort_unstable();
        flags.dedup();
        if !flags.is_empty() {
            why.push(format!("its runs were disturbed: {}", flags.join(", ")));
        }
        if !why.is_empty() {
            noisy.push(NoisyHost {
                agent: agent.to_string(),
                p50_ratio: p50_ratio[i],
                throughput_ratio: thr_ratio[i],
                reason: why.join("; "),
            });
        }
    }
    (hosts, noisy)
}

/// Smallest change of level, relative, that a history reports.
pub const HISTORY_MIN_SHIFT: f64 = 0.10;

/// A row's runs in the order they started, with the starts of new levels of their medians marked.
fn history(runs: &[&StoredRun]) -> Vec<HistoryPoint> {
    let mut points: Vec<HistoryPoint> = runs
        .iter()
        .map(|r| HistoryPoint {
            run_id: r.run_id.clone(),
            started_at_ms: r.summary.started_at_ms,
            agent: r.summary.agent.clone(),
            p50_ms: r.summary.latency.p50_ms,
            p99_ms: r.summary.latency.p99_ms,
            throughput_per_s: r.summary.throughput_per_s,
            change_point: false,
        })
        .collect();
    points.sort_by(|a, b| {
        a.started_at_ms
            .cmp(&b.started_at_ms)
            .then(a.run_id.cmp(&b.run_id))
    });
    let p50: Vec<f64> = points.iter().map(|p| p.p50_ms).collect();
    for i in changepoint::change_points(&p50, HISTORY_MIN_SHIFT) {
        points[i].change_point = true;
    }
    points
}

/// The part of a reproducibility record that decides whether runs are comparable: agent and runtime
/// versions, the provider asked for, and the providers that actually ran the nodes.
pub fn record_key(record_json: &str) -> String {
    let v: serde_json::Value = serde_json::from_str(record_json).unwrap_or_default();
    let s = |k: &str| v.get(k).and_then(|x| x.as_str()).unwrap_or("?").to_string();
    let used: Vec<String> = v
        .get("providers_used")
        .and_then(|u| u.as_object())
        .map(|m| {
            m.keys()
                .map(|k| k.trim_end_matches("ExecutionProvider").to_string())
                .collect()
        })
        .unwrap_or_default();
    format!(
        "agent {} ort {} ep {} ran on {}",
        s("agent_version"),
        s("ort_version"),
        s("execution_provider"),
        if used.is_empty() {
            "?".to_string()
        } else {
            used.join("+")
        }
    )
}

/// Ranks a model's platforms and variants.
pub async fn rank(coord: &Context, req: RankQuery) -> Result<Ranking> {
    let variants = coord.store.list_variants(Some(&req.model)).await?;
    if variants.is_empty() {
        return Err(Error::NotFound(format!(
            "model: unknown model '{}'",
            req.model
        )));
    }
    let job = if req.job_id.is_empty() {
        None
    } else {
        Some(coord.store.resolve_job_id(&req.job_id).await?)
    };
    let runs = coord
        .store
        .runs_for_model(&req.model, job.as_deref())
        .await?;
    let paths = if req.client.is_empty() {
        HashMap::new()
    } else {
        client_paths(&coord.store.list_agents().await?, &req.client)?
    };
    rank_runs_over(&runs, &variants, &req, &paths)
}

/// Each agent's successful measurement of the path to `client`, by agent name; an error naming the
/// targets the fleet has measured when no agent ever measured `client`.
pub fn client_paths(
    agents: &[crate::store::AgentRecord],
    client: &str,
) -> Result<HashMap<String, NetworkPath>> {
    network::check_target_name(client)
        .map_err(|e| Error::InvalidArgument(format!("client: {e}")))?;
    if !agents
        .iter()
        .any(|a| a.network.iter().any(|p| p.target == client))
    {
        let mut known: Vec<&str> = agents
            .iter()
            .flat_map(|a| a.network.iter().map(|p| p.target.as_str()))
            .collect();
        known.sort_unstable();
        known.dedup();
        return Err(Error::InvalidArgument(format!(
            "client: no agent has measured a path to '{client}' (measured: {}); name a probe target \
             given to agents with --probe NAME=HOST:PORT, or 'coordinator'",
            if known.is_empty() {
                "none yet".to_string()
            } else {
                known.join(", ")
            }
        )));
    }
    Ok(agents
        .iter()
        .filter_map(|a| {
            let p = a.network.iter().find(|p| p.target == client && p.ok())?;
            Some((a.name.clone(), p.clone()))
        })
        .collect())
}

/// Ranks stored runs: pools those of one (platform, variant, pooling key), compares each row's
/// accuracy with the base variant's row of the same platform and key, filters and sorts.
pub fn rank_runs(runs: &[StoredRun], variants: &[Variant], req: &RankQuery) -> Result<Ranking> {
    rank_runs_over(runs, variants, req, &HashMap::new())
}

/// [`rank_runs`] for a client at `req.client`, whose path to each agent (by name) is in `paths`: the
/// latency objectives then rank by end-to-end time, latency plus one request's network time; rows
/// none of whose agents measured the path rank after every measured row.
pub fn rank_runs_over(
    runs: &[StoredRun],
    variants: &[Variant],
    req: &RankQuery,
    paths: &HashMap<String, NetworkPath>,
) -> Result<Ranking> {
    let objective = Objective::parse(&req.objective)?;
    let client = !req.client.is_empty();
    if client && !objective.is_latency() {
        return Err(Error::InvalidArgument(format!(
            "client: a client's network time adds to latency; rank by p50, p90, p95 or p99 with it \
             (the objective is {})",
            objective.name()
        )));
    }
    if !client && (req.request_bytes > 0 || req.response_bytes > 0) {
        return Err(Error::InvalidArgument(
            "payload_bytes: request and response sizes need a client (--client NAME) whose network \
             path they cross"
                .into(),
        ));
    }
    if let Some(m) = req.min_accuracy
        && !(m > 0.0 && m <= 1.0)
    {
        return Err(Error::InvalidArgument(format!(
            "min_accuracy: {m} is not a fraction; give e.g. 0.97 for 97 %"
        )));
    }
    let runs: Vec<&StoredRun> = runs
        .iter()
        .filter(|r| req.include_invalid || r.summary.valid)
        .collect();
    let mut groups: BTreeMap<(String, String, String), Vec<&StoredRun>> = BTreeMap::new();
    for r in &runs {
        groups
            .entry((r.platform_id.clone(), r.variant.clone(), r.pool_key.clone()))
            .or_default()
            .push(r);
    }
    let size = |variant: &str| {
        variants
            .iter()
            .find(|v| v.variant == variant)
            .map(|v| v.size_bytes)
            .unwrap_or(0)
    };
    let mut rows = groups
        .values()
        .map(|g| {
            let mut row = pool(g, size(&g[0].variant))?;
            if client {
                row.network = network_time(g, paths, req);
            }
            if req.history {
                row.history = history(g);
            }
            Ok(row)
        })
        .collect::<Result<Vec<_>>>()?;

    // Accuracy change against the base variant on the same platform and configuration.
    if let Some(base) = variants.iter().find(|v| v.variant_of.is_empty()) {
        let base_acc: HashMap<(String, String), f64> = rows
            .iter()
            .filter(|r| r.variant == base.variant)
            .filter_map(|r| Some(((r.platform_id.clone(), r.pool_key.clone()), r.accuracy?)))
            .collect();
        for row in &mut rows {
            let key = (row.platform_id.clone(), row.pool_key.clone());
            if let (Some(a), Some(b)) = (row.accuracy, base_acc.get(&key)) {
                row.accuracy_delta_pts = Some((a - b) * 100.0);
            }
        }
    }

    // Two platforms that read the same get their id appended.
    let mut by_name: HashMap<String, Vec<String>> = HashMap::new();
    for row in &rows {
        let ids = by_name.entry(row.platform.clone()).or_default();
        if !ids.contains(&row.platform_id) {
            ids.push(row.platform_id.clone());
        }
    }
    for row in &mut rows {
        if by_name.get(&row.platform).is_some_and(|ids| ids.len() > 1) {
            row.platform = format!(
                "{} #{}",
                row.platform,
                &row.platform_id[..6.min(row.platform_id.len())]
            );
        }
    }

    rows.retain(|row| {
        let lat = row.latency;
        // With a client, the limit is on what the client sees.
        let net = row.network.as_ref().map_or(0.0, |n| n.network_ms);
        req.max_p99_ms.is_none_or(|m| lat.p99_ms + net <= m)
            && req.min_throughput.is_none_or(|m| row.throughput_per_s >= m)
            && req.max_rss_bytes.is_none_or(|m| row.rss_peak_bytes <= m)
            && req
                .max_accuracy_drop
                .is_none_or(|m| row.accuracy_delta_pts.is_some_and(|d| -d <= m))
            && req
                .min_accuracy
                .is_none_or(|m| row.accuracy.is_some_and(|a| a >= m))
    });
    // Each row's label says what sets it apart from the others listed.
    let labels = pooling::labels(
        &rows
            .iter()
            .map(|r| (r.config.clone(), r.pool_key.as_str()))
            .collect::<Vec<_>>(),
    );
    for (row, label) in rows.iter_mut().zip(labels) {
        row.config = label;
    }
    // With a client, rows without a measured path go after every measured row.
    let key = |r: &RankRow| match (client, &r.network) {
        (true, None) => f64::INFINITY,
        _ => objective.key(r),
    };
    rows.sort_by(|a, b| {
        key(a)
            .partial_cmp(&key(b))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then_with(|| a.platform.cmp(&b.platform))
            .then_with(|| a.variant.cmp(&b.variant))
            .then_with(|| a.config.cmp(&b.config))
    });
    if req.best_config_only {
        let mut seen = std::collections::HashSet::new();
        rows.retain(|r| seen.insert((r.platform_id.clone(), r.variant.clone())));
    }
    let rows = tie(rows, objective);
    Ok(Ranking {
        rows,
        objective: objective.name().to_string(),
    })
}

/// A row's 95 % confidence interval of the objective in the objective's sort order (smaller is
/// better), where fleetbench has one: order statistics of the pooled histogram for p50, p90, p95 and
/// p99 (and of the pooled TTFT and TPOT histograms for their p99), the pooled bootstrap for throughput,
/// output tokens/s and goodput and the costs that follow from them, Wilson for accuracy. A client's network time shifts latency.
fn interval(objective: Objective, row: &RankRow) -> Option<(f64, f64)> {
    let l = &row.latency;
    let negate = |(lo, hi): (f64, f64)| (-hi, -lo);
    // A client's network time shifts a latency interval (the measured time is taken as exact).
    let net = row.network.as_ref().map_or(0.0, |n| n.network_ms);
    let ci = match objective {
        Objective::P50 => (l.p50_ci_low_ms + net, l.p50_ci_high_ms + net),
        Objective::P99 => (l.p99_ci_low_ms + net, l.p99_ci_high_ms + net),
        Objective::P90 => (l.p90_ci_low_ms + net, l.p90_ci_high_ms + net),
        Objective::P95 => (l.p95_ci_low_ms + net, l.p95_ci_high_ms + net),
        // Generate rows: order statistics of the pooled TTFT and TPOT histograms.
        Objective::TtftP99 => {
            let t = &row.generation.as_ref()?.ttft;
            (t.p99_ci_low_ms, t.p99_ci_high_ms)
        }
        Objective::TpotP99 => {
            let t = &row.generation.as_ref()?.tpot;
            (t.p99_ci_low_ms, t.p99_ci_high_ms)
        }
        Objective::Throughput => negate(row.throughput_ci?),
        Objective::Accuracy => negate(row.accuracy_ci?),
        Objective::Cost if row.generation.is_none() => row.cost_ci?,
        // Generate rows: the tokens' interval, and the cost per million tokens that follows from it
        // (cost · tokens/s is constant, so the ends swap).
        Objective::TokensPerS => negate(row.generation.as_ref()?.output_tokens_ci_per_s?),
        Objective::Goodput => negate(row.generation.as_ref()?.goodput_ci_per_s?),
        Objective::Cost => {
            let g = row.generation.as_ref()?;
            let (lo, hi) = g.output_tokens_ci_per_s?;
            let k = g.cost_per_million_tokens? * g.output_tokens_per_s;
            (k / hi, k / lo)
        }
    };
    (ci.0.is_finite() && ci.1.is_finite() && ci.0 <= ci.1 && (ci.0 != 0.0 || ci.1 != 0.0))
        .then_some(ci)
}

/// Numbers rows sorted by `objective`. The first row leads a group; every later row whose 95 %
/// interval overlaps the leader's joins it (they cannot be told apart), shares its rank and is marked
/// tied; within a group rows go by cost (rows without one last), then by the objective. The next row
/// left leads the next group, ranked by its position. Rows without an interval of the objective
/// (runs stored before their rates' intervals were kept) rank one by one.
fn tie(rows: Vec<RankRow>, objective: Objective) -> Vec<RankRow> {
    let mut left: std::collections::VecDeque<RankRow> = rows.into();
    let mut out = Vec::with_capacity(left.len());
    while let Some(leader) = left.pop_front() {
        let rank = out.len() as u32 + 1;
        let mut group = Vec::new();
        if let Some((lo, hi)) = interval(objective, &leader) {
            let (tied, rest): (Vec<RankRow>, Vec<RankRow>) = left
                .into_iter()
                .partition(|r| interval(objective, r).is_some_and(|(l, h)| l <= hi && h >= lo));
            left = rest.into();
            group = tied;
        }
        group.push(leader);
        let cost = |r: &RankRow| {
            r.generation
                .as_ref()
                .map_or(r.cost_per_million, |g| g.cost_per_million_tokens)
                .unwrap_or(f64::INFINITY)
        };
        if group.len() > 1 {
            group.sort_by(|a, b| {
                cost(a)
                    .total_cmp(&cost(b))
                    .then_with(|| objective.key(a).total_cmp(&objective.key(b)))
            });
        }
        let tied = group.len() > 1;
        for mut r in group {
            r.rank = rank;
            r.tied = tied;
            out.push(r);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{RunConfig, RunSummary};
    use crate::pooling::PoolKey;

    fn run(id: &str, variant: &str, warmup: u64, accuracy: f64) -> StoredRun {
        let config = RunConfig {
            batch_size: 1,
            warmup_iterations: warmup,
            ..Default::default()
        };
        let mut h = hist::new_histogram();
        hist::record_ns(&mut h, 1000);
        StoredRun {
            run_id: id.into(),
            job_id: "j".into(),
            platform_id: "p".into(),
            platform_name: "edge".into(),
            variant: variant.into(),
            config_key: "single-stream b1".into(),
            pool_key: PoolKey::of(&config, "{}").encode(),
            summary: RunSummary {
                valid: true,
                accuracy: Some(accuracy),
                samples: 10,
                duration_ms: 1.0,
                config,
                ..Default::default()
            },
            histogram: hist::encode(&h),
        }
    }

    /// A run on `platform` of `n` latencies spread evenly over ±5 % of `ms`, at `cost` per hour.
    fn timed(platform: &str, ms: f64, n: u64, cost: Option<f64>) -> StoredRun {
        let mut r = run(platform, "fp32", 0, 0.9);
        let mut h = hist::new_histogram();
        for i in 0..n {
            let f = 0.95 + 0.1 * i as f64 / n as f64;
            hist::record_ns(&mut h, (ms * 1e6 * f) as u64);
        }
        r.histogram = hist::encode(&h);
        r.platform_id = platform.into();
        r.platform_name = platform.into();
        r.summary.samples = n;
        r.summary.duration_ms = 1000.0;
        r.summary.cost_per_hour = cost;
        r
    }

    fn ranked(runs: &[StoredRun], objective: &str) -> Vec<(String, u32, bool)> {
        let q = RankQuery {
            objective: objective.into(),
            ..Default::default()
        };
        rank_runs(runs, &variants(), &q)
            .unwrap()
            .rows
            .into_iter()
            .map(|r| (r.platform, r.rank, r.tied))
            .collect()
    }

    #[test]
    fn rows_whose_intervals_overlap_the_leaders_tie_and_go_by_cost() {
        // 40 latencies each: the p50 intervals of 1.00 and 1.01 ms overlap; 3 ms is far away.
        let runs = vec![
            timed("a", 1.00, 40, Some(2.0)),
            timed("b", 1.01, 40, Some(1.0)),
            timed("c", 3.00, 40, Some(0.5)),
        ];
        let got = ranked(&runs, "p50");
        assert_eq!(
            got,
            [
                ("b".to_string(), 1, true),
                ("a".to_string(), 1, true),
                ("c".to_string(), 3, false)
            ],
            "b is cheaper, so it leads the tie although its p50 is higher"
        );
        // Throughput has no interval here: rows rank one by one.
        assert!(ranked(&runs, "throughput").iter().all(|r| !r.2));
    }

    #[test]
    fn throughput_cost_and_accuracy_tie_by_their_intervals() {
        let with = |p: &str, thr: f64, ci: (f64, f64), cost: f64, acc: f64, evaluated: u64| {
            let mut r = timed(p, 1.0, 40, Some(cost));
            r.summary.samples = thr as u64;
            r.summary.throughput_per_s = thr;
            r.summary.throughput_ci_per_s = Some(ci);
            r.summary.accuracy = Some(acc);
            r.summary.quality_json = format!(
                r#"{{"classification":{{"samples":{evaluated},"top1":{acc},"k":1,"macro_precision":0,"macro_recall":0,"macro_f1":0,"per_class":[]}}}}"#
            );
            r
        };
        // a and b overlap in throughput; c is far below. Accuracy: 90 % vs 91 % of 100 rows overlap,
        // 50 % of 10,000 does not.
        let runs = vec![
            with("a", 1000.0, (950.0, 1050.0), 2.0, 0.90, 100),
            with("b", 980.0, (940.0, 1020.0), 1.0, 0.91, 100),
            with("c", 500.0, (490.0, 510.0), 0.1, 0.50, 10_000),
        ];
        let want = [
            ("b".to_string(), 1, true),
            ("a".to_string(), 1, true),
            ("c".to_string(), 3, false),
        ];
        assert_eq!(ranked(&runs, "throughput"), want);
        assert_eq!(ranked(&runs, "accuracy"), want);
        // Cost per million: c is cheapest by far; a (0.556) and b (0.283) do not overlap.
        assert!(
            ranked(&runs, "cost").iter().all(|r| !r.2),
            "{:?}",
            ranked(&runs, "cost")
        );
        let rows = rank_runs(&runs, &variants(), &RankQuery::default())
            .unwrap()
            .rows;
        let b = rows.iter().find(|r| r.platform == "b").unwrap();
        let (lo, hi) = b.cost_ci.unwrap();
        assert!(lo < b.cost_per_million.unwrap() && b.cost_per_million.unwrap() < hi);
        let (lo, hi) = b.accuracy_ci.unwrap();
        assert!(
            lo < 0.91 && 0.91 < hi && hi - lo > 0.1,
            "Wilson over 100 rows: {lo}..{hi}"
        );
    }

    #[test]
    fn pooled_runs_report_their_spread() {
        let mut a = timed("a", 1.0, 40, None);
        a.summary.latency.p50_ms = 1.0;
        a.summary.latency.p99_ms = 2.0;
        a.summary.throughput_per_s = 100.0;
        let mut b = a.clone();
        b.run_id = "b".into();
        b.summary.latency.p50_ms = 1.2;
        b.summary.throughput_per_s = 80.0;
        let rows = rank_runs(&[a.clone(), b], &variants(), &RankQuery::default())
            .unwrap()
            .rows;
        let s = rows[0].spread.expect("two runs have a spread");
        assert!(
            s.p50_cv > 0.1 && s.p99_cv == 0.0 && s.throughput_cv > 0.1,
            "{s:?}"
        );
        let one = rank_runs(&[a], &variants(), &RankQuery::default())
            .unwrap()
            .rows;
        assert!(one[0].spread.is_none());
    }

    /// A run by `agent` at `p50` ms, `at` ms after the epoch.
    fn by(agent: &str, p50: f64, at: i64) -> StoredRun {
        let mut r = timed("p", p50, 40, None);
        r.run_id = format!("{agent}-{at}");
        r.summary.agent = agent.into();
        r.summary.latency.p50_ms = p50;
        r.summary.throughput_per_s = 1000.0 / p50;
        r.summary.started_at_ms = at;
        r
    }

    #[test]
    fn one_of_three_hosts_slowed_twofold_is_flagged_and_the_spread_shows() {
        let runs = vec![
            by("a", 1.0, 1),
            by("b", 1.03, 2),
            by("c", 2.0, 3),
            by("a", 1.01, 4),
        ];
        let rows = rank_runs(&runs, &variants(), &RankQuery::default())
            .unwrap()
            .rows;
        let row = &rows[0];
        let hosts = row.hosts.unwrap();
        assert_eq!(hosts.agents, 3);
        assert!(hosts.p50_cv > 0.3, "{hosts:?}");
        assert_eq!(row.noisy_hosts.len(), 1, "{:?}", row.noisy_hosts);
        let n = &row.noisy_hosts[0];
        assert_eq!(n.agent, "c");
        assert!((n.p50_ratio - 2.0 / 1.025).abs() < 0.05, "{n:?}");
        assert!(
            n.reason.contains("p50 1.9") && n.reason.contains("throughput 0.5"),
            "{n:?}"
        );
        // Three hosts alike: nobody is flagged; a disturbed run flags its host all the same.
        let mut calm = vec![by("a", 1.0, 1), by("b", 1.03, 2), by("c", 1.05, 3)];
        assert!(
            rank_runs(&calm, &variants(), &RankQuery::default())
                .unwrap()
                .rows[0]
                .noisy_hosts
                .is_empty()
        );
        calm[1].summary.resources.flags = vec!["cpu steal 12 %".into()];
        let rows = rank_runs(&calm, &variants(), &RankQuery::default())
            .unwrap()
            .rows;
        assert_eq!(rows[0].noisy_hosts.len(), 1);
        assert!(
            rows[0].noisy_hosts[0]
                .reason
                .contains("disturbed: cpu steal")
        );
    }

    #[test]
    fn history_lists_runs_in_time_order_and_marks_a_step() {
        // Ten runs at 1 ms, then ten at 1.5 ms, given out of order.
        let mut runs: Vec<StoredRun> = (0..20)
            .map(|i| {
                by(
                    "a",
                    if i < 10 { 1.0 } else { 1.5 } + 0.01 * (i % 3) as f64,
                    i,
                )
            })
            .collect();
        runs.reverse();
        let q = RankQuery {
            history: true,
            ..Default::default()
        };
        let rows = rank_runs(&runs, &variants(), &q).unwrap().rows;
        let h = &rows[0].history;
        assert_eq!(h.len(), 20);
        assert!(
            h.windows(2)
                .all(|w| w[0].started_at_ms < w[1].started_at_ms)
        );
        let marked: Vec<usize> = (0..20).filter(|&i| h[i].change_point).collect();
        assert_eq!(marked, [10], "{h:?}");
        let flat: Vec<StoredRun> = (0..20)
            .map(|i| by("a", 1.0 + 0.01 * (i % 3) as f64, i))
            .collect();
        let rows = rank_runs(&flat, &variants(), &q).unwrap().rows;
        assert!(rows[0].history.iter().all(|p| !p.change_point));
        // Without asking, no history travels.
        assert!(
            rank_runs(&flat, &variants(), &RankQuery::default())
                .unwrap()
                .rows[0]
                .history
                .is_empty()
        );
    }

    #[test]
    fn an_accuracy_floor_applies_before_ties_are_grouped() {
        let mut a = timed("a", 1.00, 40, Some(0.5));
        a.summary.accuracy = Some(0.90);
        let mut b = timed("b", 1.01, 40, Some(2.0));
        b.summary.accuracy = Some(0.97);
        let runs = vec![a, b];
        let q = RankQuery {
            objective: "p50".into(),
            min_accuracy: Some(0.95),
            ..Default::default()
        };
        let rows = rank_runs(&runs, &variants(), &q).unwrap().rows;
        assert_eq!(rows.len(), 1);
        assert!(
            rows[0].platform == "b" && rows[0].rank == 1 && !rows[0].tied,
            "b is not tied with a row that was left out: {rows:?}"
        );
        let q = RankQuery {
            min_accuracy: Some(97.0),
            ..q
        };
        let e = rank_runs(&runs, &variants(), &q).unwrap_err().to_string();
        assert!(e.contains("min_accuracy: 97 is not a fraction"), "{e}");
    }

    #[test]
    fn rows_whose_intervals_do_not_overlap_rank_apart() {
        // 20,000 latencies each: p99 intervals are narrow, and 1.00 vs 1.05 ms are told apart.
        let runs = vec![
            timed("a", 1.00, 20_000, Some(2.0)),
            timed("b", 1.05, 20_000, Some(1.0)),
        ];
        assert_eq!(
            ranked(&runs, "p99"),
            [("a".to_string(), 1, false), ("b".to_string(), 2, false)]
        );
    }

    fn variants() -> Vec<Variant> {
        vec![
            Variant {
                variant: "fp32".into(),
                ..Default::default()
            },
            Variant {
                variant: "int8".into(),
                variant_of: "fp32".into(),
                ..Default::default()
            },
        ]
    }

    #[test]
    fn different_work_makes_different_rows_and_accuracy_is_compared_within_a_configuration() {
        let runs = vec![
            run("a", "fp32", 100, 0.90),
            run("b", "fp32", 300, 0.80),
            run("c", "int8", 100, 0.85),
            run("d", "int8", 300, 0.80),
        ];
        let ranking = rank_runs(&runs, &variants(), &RankQuery::default()).unwrap();
        assert_eq!(ranking.rows.len(), 4, "{:?}", ranking.rows);
        let int8_300 = ranking
            .rows
            .iter()
            .find(|r| r.variant == "int8" && r.config.contains("warmup=300"))
            .expect("the warm-up shows in the label");
        assert!(
            (int8_300.accuracy_delta_pts.unwrap() - 0.0).abs() < 1e-9,
            "against fp32 with the same warm-up (0.80), not the first fp32 run found (0.90): {int8_300:?}"
        );
        let int8_100 = ranking
            .rows
            .iter()
            .find(|r| r.variant == "int8" && r.config.contains("warmup=100"))
            .unwrap();
        assert!((int8_100.accuracy_delta_pts.unwrap() + 5.0).abs() < 1e-9);
        // Runs of the same work pool.
        let pooled = rank_runs(
            &[run("a", "fp32", 100, 0.9), run("e", "fp32", 100, 0.9)],
            &variants(),
            &RankQuery::default(),
        )
        .unwrap();
        assert_eq!(pooled.rows.len(), 1);
        assert_eq!(pooled.rows[0].runs, 2);
        assert_eq!(pooled.rows[0].config, "single-stream b1");
    }

    fn path(rtt_ms: f64, bytes_per_s: f64) -> NetworkPath {
        NetworkPath {
            target: "office".into(),
            rtt_ms,
            rtt_min_ms: rtt_ms,
            up_bytes_per_s: bytes_per_s,
            down_bytes_per_s: bytes_per_s,
            ..Default::default()
        }
    }

    /// Runs on three platforms, each by one agent of its name: far is fastest, then near; "lost"
    /// has no measured path.
    fn sited() -> (Vec<StoredRun>, HashMap<String, NetworkPath>) {
        let mut runs = vec![
            timed("near", 1.0, 200, None),
            timed("far", 0.5, 200, None),
            timed("lost", 0.2, 200, None),
        ];
        for r in &mut runs {
            r.summary.agent = r.platform_name.clone();
        }
        let paths = HashMap::from([
            ("near".to_string(), path(2.0, 1e7)),
            ("far".to_string(), path(100.0, 1e6)),
        ]);
        (runs, paths)
    }

    fn order(rows: &[RankRow]) -> Vec<&str> {
        rows.iter().map(|r| r.platform.as_str()).collect()
    }

    #[test]
    fn a_clients_network_time_moves_the_ranking_and_unmeasured_rows_go_last() {
        let (runs, paths) = sited();
        let plain = rank_runs_over(&runs, &variants(), &RankQuery::default(), &paths).unwrap();
        assert_eq!(order(&plain.rows), ["lost", "far", "near"]);
        assert!(plain.rows.iter().all(|r| r.network.is_none()));
        let q = RankQuery {
            client: "office".into(),
            request_bytes: 50_000,
            ..Default::default()
        };
        let rows = rank_runs_over(&runs, &variants(), &q, &paths).unwrap().rows;
        assert_eq!(order(&rows), ["near", "far", "lost"]);
        let far = rows[1].network.as_ref().unwrap();
        // 100 ms + 50 kB at 1 MB/s.
        assert!((far.network_ms - 150.0).abs() < 1e-9, "{far:?}");
        assert_eq!(far.agents, 1);
        assert!(rows[2].network.is_none());
        // The interval that ties rows moves with the network time: far's p99 interval is shifted.
        let (lo, _) = interval(Objective::P99, &rows[1]).unwrap();
        assert!(lo > 150.0, "{lo}");
    }

    #[test]
    fn a_p99_limit_with_a_client_holds_for_end_to_end_time() {
        let (runs, paths) = sited();
        let q = RankQuery {
            client: "office".into(),
            max_p99_ms: Some(50.0),
            ..Default::default()
        };
        let rows = rank_runs_over(&runs, &variants(), &q, &paths).unwrap().rows;
        assert_eq!(
            order(&rows),
            ["near", "lost"],
            "far's 100 ms round trip is over the limit"
        );
    }

    #[test]
    fn a_client_needs_a_latency_objective_and_bytes_need_a_client() {
        let (runs, paths) = sited();
        let q = RankQuery {
            client: "office".into(),
            objective: "throughput".into(),
            ..Default::default()
        };
        let e = rank_runs_over(&runs, &variants(), &q, &paths).unwrap_err();
        assert!(e.to_string().contains("adds to latency"), "{e}");
        let q = RankQuery {
            request_bytes: 10,
            ..Default::default()
        };
        let e = rank_runs_over(&runs, &variants(), &q, &paths).unwrap_err();
        assert!(e.to_string().contains("need a client"), "{e}");
    }

    #[test]
    fn an_unmeasured_client_is_refused_naming_the_measured_targets() {
        let agent = |name: &str, targets: &[&str]| crate::store::AgentRecord {
            id: name.into(),
            name: name.into(),
            platform_id: String::new(),
            platform_name: String::new(),
            host_id: String::new(),
            labels: Default::default(),
            inventory: Default::default(),
            connected: true,
            last_seen_at: 0,
            current_task_id: None,
            network: targets
                .iter()
                .map(|t| NetworkPath {
                    target: t.to_string(),
                    ..path(1.0, 1e6)
                })
                .collect(),
        };
        let agents = [
            agent("a", &["coordinator", "hq"]),
            agent("b", &["coordinator"]),
        ];
        let e = client_paths(&agents, "office").unwrap_err().to_string();
        assert!(
            e.contains("'office'") && e.contains("measured: coordinator, hq"),
            "{e}"
        );
        let hq = client_paths(&agents, "hq").unwrap();
        assert_eq!(hq.keys().collect::<Vec<_>>(), ["a"]);
        let e = client_paths(&agents, "bad name").unwrap_err().to_string();
        assert!(e.contains("client:"), "{e}");
        // A failed measurement is not a path.
        let mut failed = agent("c", &["vpn"]);
        failed.network[0].error = "cannot connect".into();
        assert!(client_paths(&[failed], "vpn").unwrap().is_empty());
    }

    #[test]
    fn p90_and_p95_tie_by_their_own_intervals() {
        let runs = vec![
            timed("a", 1.00, 400, Some(2.0)),
            timed("b", 1.001, 400, Some(1.0)),
            timed("c", 3.0, 400, None),
        ];
        for objective in ["p90", "p95"] {
            let rows = ranked(&runs, objective);
            assert_eq!(
                rows,
                [
                    ("b".to_string(), 1, true),
                    ("a".to_string(), 1, true),
                    ("c".to_string(), 3, false)
                ],
                "{objective}"
            );
        }
    }

    #[test]
    fn ttft_and_tpot_p99_tie_by_order_statistics_of_their_histograms() {
        // Generate runs whose TTFT (and TPOT) lie evenly over ±5 % of `ms`.
        let generate = |platform: &str, ms: f64| {
            let mut r = timed(platform, 1.0, 400, None);
            let mut h = hist::new_histogram();
            for i in 0..400 {
                hist::record_ns(&mut h, (ms * 1e6 * (0.95 + 0.1 * i as f64 / 400.0)) as u64);
            }
            let bytes = hist::encode(&h);
            r.summary.generation = Some(crate::domain::GenerationSummary {
                histograms: crate::domain::WindowGeneration {
                    ttft_histogram: bytes.clone(),
                    tpot_histogram: bytes.clone(),
                    itl_histogram: bytes,
                    ..Default::default()
                },
                ..Default::default()
            });
            r
        };
        let runs = vec![
            generate("a", 10.0),
            generate("b", 10.01),
            generate("c", 30.0),
        ];
        for objective in ["ttft-p99", "tpot-p99"] {
            let rows = ranked(&runs, objective);
            assert_eq!(
                rows.iter().map(|r| (r.1, r.2)).collect::<Vec<_>>(),
                [(1, true), (1, true), (3, false)],
                "{objective}: {rows:?}"
            );
            assert_eq!(rows[2].0, "c");
        }
    }

    #[test]
    fn tokens_per_s_and_goodput_tie_by_their_pooled_bootstrap_intervals() {
        let generate = |platform: &str, tps: f64, ci: (f64, f64), cost: Option<f64>| {
            let mut r = timed(platform, 1.0, 100, None);
            r.summary.generation = Some(crate::domain::GenerationSummary {
                output_tokens_per_s: tps,
                output_tokens_ci_per_s: Some(ci),
                goodput_per_s: tps / 10.0,
                goodput_ci_per_s: Some((ci.0 / 10.0, ci.1 / 10.0)),
                // One second of it (timed() runs last 1 s): the pooled rates read these.
                histograms: crate::domain::WindowGeneration {
                    output_tokens: tps as u64,
                    good_requests: (tps / 10.0) as u64,
                    ..Default::default()
                },
                ..Default::default()
            });
            r.summary.cost_per_hour = cost;
            r
        };
        let runs = vec![
            generate("a", 100.0, (95.0, 105.0), Some(2.0)),
            generate("b", 98.0, (93.0, 103.0), Some(1.0)),
            generate("c", 50.0, (48.0, 52.0), Some(1.0)),
        ];
        // By cost per million tokens b is far ahead; a (2/h at 100 tokens/s) and c (1/h at 50) cost
        // the same, and their intervals, carried from the tokens', overlap.
        let by_cost = ranked(&runs, "cost");
        assert_eq!(
            by_cost,
            [
                ("b".to_string(), 1, false),
                ("c".to_string(), 2, true),
                ("a".to_string(), 2, true)
            ]
        );
        // The leader is the faster a; b's interval overlaps it and b is cheaper, so it goes first.
        for objective in ["tokens-per-s", "goodput"] {
            let rows = ranked(&runs, objective);
            assert_eq!(
                rows,
                [
                    ("b".to_string(), 1, true),
                    ("a".to_string(), 1, true),
                    ("c".to_string(), 3, false)
                ],
                "{objective}"
            );
        }
    }
}
