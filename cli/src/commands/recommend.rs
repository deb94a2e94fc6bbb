//! `fleetbench recommend`: one answer (deploy this variant on this platform), the figures that
//! decided it, and the alternatives that are not worse on every count (the Pareto set of latency,
//! accuracy and cost).

use anyhow::{Result, bail};
use clap::Args;
use fleetbench_proto::v1::{RankResponse, RankRow};
use serde::Serialize;

use super::rank::{self, RankArgs, RankJson};
use crate::client::Client;
use crate::output::{self, Format};

/// Recommend options.
#[derive(Debug, Args)]
pub struct RecommendArgs {
    /// Model name.
    pub model: String,
    /// What decides among the rows that meet the constraints: cost, p99, throughput, or for
    /// generate runs tokens-per-s (any objective `rank` takes).
    #[arg(long, default_value = "cost")]
    pub objective: String,
    /// Only rows with p99 at most this many milliseconds.
    #[arg(long)]
    pub max_p99_ms: Option<f64>,
    /// Only rows with at least this top-1 accuracy, as a fraction (0.97).
    #[arg(long)]
    pub min_accuracy: Option<f64>,
    /// Only rows whose accuracy is at most this many points below the base variant's.
    #[arg(long)]
    pub max_accuracy_drop: Option<f64>,
    /// Only rows with at least this many samples per second.
    #[arg(long)]
    pub min_throughput: Option<f64>,
    /// Only runs of this job.
    #[arg(long)]
    pub job: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Format,
}

/// A recommendation as `--output json` prints it.
#[derive(Debug, Serialize)]
pub struct Recommendation {
    /// The model.
    pub model: String,
    /// What decided among the rows that met the constraints.
    pub objective: String,
    /// The constraints, as given.
    pub constraints: serde_json::Value,
    /// The answer in a sentence.
    pub reason: String,
    /// The row recommended.
    pub recommendation: RankJson,
    /// The rows that met the constraints and are not worse than another on p99, accuracy and cost
    /// all at once (the recommended row among them when it is one).
    pub pareto: Vec<RankJson>,
    /// Rows measured (valid runs).
    pub rows_measured: usize,
    /// Rows that met the constraints.
    pub rows_meeting: usize,
}

/// A row's cost per million: samples, or output tokens for generate rows; None when unknown.
fn cost(r: &RankRow) -> Option<f64> {
    match &r.generation {
        Some(g) => g.cost_per_million_tokens,
        None => r.cost_per_million,
    }
}

fn p99(r: &RankRow) -> f64 {
    r.latency.unwrap_or_default().p99_ms
}

/// Indices of the rows no other row beats on p99 (lower), accuracy (higher) and cost (lower) at once
/// while being at least as good on all three. Unknown accuracy counts as worst, unknown cost as
/// highest.
pub fn pareto(rows: &[RankRow]) -> Vec<usize> {
    let key = |r: &RankRow| {
        (
            p99(r),
            -r.accuracy.unwrap_or(f64::NEG_INFINITY),
            cost(r).unwrap_or(f64::INFINITY),
        )
    };
    (0..rows.len())
        .filter(|&i| {
            let a = key(&rows[i]);
            !rows.iter().enumerate().any(|(j, other)| {
                let b = key(other);
                j != i
                    && b.0 <= a.0
                    && b.1 <= a.1
                    && b.2 <= a.2
                    && (b.0 < a.0 || b.1 < a.1 || b.2 < a.2)
            })
        })
        .collect()
}

fn constraints_text(a: &RecommendArgs) -> String {
    let mut c = Vec::new();
    if let Some(m) = a.max_p99_ms {
        c.push(format!("p99 ≤ {}", output::ms(m)));
    }
    if let Some(m) = a.min_accuracy {
        c.push(format!("accuracy ≥ {}", output::pct(Some(m))));
    }
    if let Some(m) = a.max_accuracy_drop {
        c.push(format!(
            "accuracy at most {m} points below the base variant's"
        ));
    }
    if let Some(m) = a.min_throughput {
        c.push(format!("at least {} samples/s", output::rate(m)));
    }
    if c.is_empty() {
        "no constraint".into()
    } else {
        c.join(" and ")
    }
}

/// The answer from `all` (every valid row) and `meeting` (the rows the coordinator kept under the
/// constraints, in the objective's order, ties grouped among them): the first.
pub fn recommend(
    a: &RecommendArgs,
    all: &RankResponse,
    meeting: &RankResponse,
) -> Result<Recommendation> {
    if let Some(m) = a.min_accuracy
        && !(m > 0.0 && m <= 1.0)
    {
        bail!("--min-accuracy: {m} is not a fraction; give e.g. 0.97 for 97 %");
    }
    let rows: Vec<RankRow> = meeting
        .rows
        .iter()
        .filter(|r| {
            a.min_accuracy
                .is_none_or(|m| r.accuracy.is_some_and(|acc| acc >= m))
        })
        .cloned()
        .collect();
    let constraints = constraints_text(a);
    let Some(best) = rows.first() else {
        let best_p99 = all.rows.iter().map(p99).fold(f64::INFINITY, f64::min);
        let best_acc = all
            .rows
            .iter()
            .filter_map(|r| r.accuracy)
            .fold(f64::NAN, f64::max);
        if all.rows.is_empty() {
            bail!(
                "no valid runs of '{}' to recommend from; run a job first (fleetbench jobs submit --model {})",
                a.model,
                a.model
            );
        }
        bail!(
            "no row of '{}' meets {constraints}: of {} rows measured, the lowest p99 is {} and the \
             highest accuracy {}; relax a constraint or measure more variants or platforms",
            a.model,
            all.rows.len(),
            output::ms(best_p99),
            output::pct((!best_acc.is_nan()).then_some(best_acc)),
        );
    };
    let unit = if best.generation.is_some() {
        "output tokens"
    } else {
        "samples"
    };
    let mut reason = format!(
        "Deploy {} on {} ({}): p99 {}, {} samples/s, accuracy {}, cost {} per million {unit}. It is \
         the best by {} of the {} of {} rows that meet {constraints}",
        best.variant,
        best.platform,
        best.config,
        output::ms(p99(best)),
        output::rate(best.throughput_per_s),
        output::pct(best.accuracy),
        output::cost(cost(best)),
        meeting.objective,
        rows.len(),
        all.rows.len(),
    );
    let others = rows
        .iter()
        .filter(|r| r.tied && r.rank == best.rank)
        .count()
        .saturating_sub(1);
    if best.tied && others > 0 {
        reason.push_str(&format!(
            "; {others} other row(s) tie with it on {} (95 % intervals overlap), and it costs least",
            meeting.objective
        ));
    }
    if meeting.objective == "cost" && cost(best).is_none() {
        reason.push_str(" (no row has a cost: give agents a cost_per_hour label to rank by cost)");
    }
    reason.push('.');
    let front = pareto(&rows);
    Ok(Recommendation {
        model: a.model.clone(),
        objective: meeting.objective.clone(),
        constraints: serde_json::json!({
            "max_p99_ms": a.max_p99_ms,
            "min_accuracy": a.min_accuracy,
            "max_accuracy_drop": a.max_accuracy_drop,
            "min_throughput": a.min_throughput,
        }),
        reason,
        recommendation: RankJson::from(best),
        pareto: front.iter().map(|&i| RankJson::from(&rows[i])).collect(),
        rows_measured: all.rows.len(),
        rows_meeting: rows.len(),
    })
}

/// Asks the coordinator and recommends.
pub async fn fetch(client: &Client, a: &RecommendArgs) -> Result<Recommendation> {
    let base = RankArgs {
        objective: a.objective.clone(),
        job: a.job.clone(),
        ..RankArgs::for_model(&a.model)
    };
    let all = rank::fetch(client, &base).await?;
    let meeting = rank::fetch(
        client,
        &RankArgs {
            max_p99_ms: a.max_p99_ms,
            min_throughput: a.min_throughput,
            max_accuracy_drop: a.max_accuracy_drop,
            min_accuracy: a.min_accuracy,
            ..base
        },
    )
    .await?;
    recommend(a, &all, &meeting)
}

/// Runs `recommend`.
pub async fn run(client: &Client, a: RecommendArgs) -> Result<()> {
    let r = fetch(client, &a).await?;
    match a.output {
        Format::Json => output::print_json(&r),
        Format::Table => {
            outln!("{}", r.reason);
            outln!(
                "Alternatives not worse on every count (p99, accuracy, cost), {} of {} rows meeting \
                 the constraints:",
                r.pareto.len(),
                r.rows_meeting
            );
            let mut t = output::table(&[
                "",
                "PLATFORM",
                "VARIANT",
                "CONFIG",
                "P99",
                "SAMPLES/S",
                "ACCURACY",
                "COST/1M",
            ]);
            for p in &r.pareto {
                let chosen = p.platform_id == r.recommendation.platform_id
                    && p.variant == r.recommendation.variant
                    && p.config == r.recommendation.config;
                t.add_row(vec![
                    if chosen { "→".into() } else { String::new() },
                    p.platform.clone(),
                    p.variant.clone(),
                    p.config.clone(),
                    output::ms(p.p99_ms),
                    output::rate(p.throughput_per_s),
                    output::pct(p.accuracy),
                    output::cost(
                        p.generation
                            .as_ref()
                            .map_or(p.cost_per_million, |g| g.cost_per_million_tokens),
                    ),
                ]);
            }
            outln!("{t}");
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetbench_proto::v1::LatencyStats;

    fn row(platform: &str, variant: &str, p99: f64, acc: f64, cost: f64) -> RankRow {
        RankRow {
            platform: platform.into(),
            platform_id: platform.into(),
            variant: variant.into(),
            config: "single-stream b1".into(),
            latency: Some(LatencyStats {
                p99_ms: p99,
                ..Default::default()
            }),
            accuracy: Some(acc),
            cost_per_million: Some(cost),
            throughput_per_s: 1000.0,
            ..Default::default()
        }
    }

    fn args() -> RecommendArgs {
        RecommendArgs {
            model: "m".into(),
            objective: "p99".into(),
            max_p99_ms: None,
            min_accuracy: Some(0.95),
            max_accuracy_drop: None,
            min_throughput: None,
            job: None,
            output: Format::Json,
        }
    }

    #[test]
    fn the_fastest_row_below_the_accuracy_floor_is_passed_over() {
        let rows = vec![
            row("edge", "pruned", 1.0, 0.90, 0.1),
            row("edge", "fp32", 2.0, 0.97, 0.2),
            row("cloud", "fp32", 3.0, 0.97, 0.8),
        ];
        let resp = RankResponse {
            rows,
            objective: "p99".into(),
        };
        let r = recommend(&args(), &resp, &resp).unwrap();
        assert_eq!(r.recommendation.variant, "fp32");
        assert_eq!(r.recommendation.platform, "edge");
        assert_eq!(r.rows_meeting, 2);
        assert!(r.reason.contains("accuracy ≥ 95.00 %"), "{}", r.reason);
        // cloud fp32 is slower and dearer at the same accuracy: dominated.
        assert_eq!(r.pareto.len(), 1, "{:?}", r.pareto);
    }

    #[test]
    fn the_pareto_set_keeps_every_trade_off() {
        let rows = vec![
            row("a", "fast", 1.0, 0.90, 1.0),
            row("b", "accurate", 3.0, 0.99, 1.0),
            row("c", "cheap", 5.0, 0.90, 0.1),
            row("d", "worse", 5.0, 0.90, 1.0),
        ];
        assert_eq!(pareto(&rows), [0, 1, 2]);
    }

    #[test]
    fn nothing_meets_the_constraints_names_them_and_the_best_figures() {
        let resp = RankResponse {
            rows: vec![row("edge", "fp32", 2.0, 0.93, 0.2)],
            objective: "p99".into(),
        };
        let e = recommend(&args(), &resp, &resp).unwrap_err().to_string();
        assert!(
            e.contains("meets accuracy ≥ 95.00 %") && e.contains("highest accuracy 93.00 %"),
            "{e}"
        );
        let mut bad = args();
        bad.min_accuracy = Some(97.0);
        let e = recommend(&bad, &resp, &resp).unwrap_err().to_string();
        assert!(e.contains("--min-accuracy: 97 is not a fraction"), "{e}");
    }
}
