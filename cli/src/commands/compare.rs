//! `fleetbench compare BASELINE CANDIDATE`: a release gate. Each side is a finished job or a JSON file
//! saved with `rank --output json`. Rows are matched by platform (its readable name: labels, CPU,
//! cores, accelerators; the platform id also hashes the ONNX Runtime version), variant and workload
//! (what the runs did, without the agent and ONNX Runtime versions or the providers that ran the
//! graph, since those are what a candidate usually changes), and each metric gets a verdict:
//! improved, regressed, or no change beyond noise. A baseline row the candidate lacks (its runs
//! failed, were INVALID or never ran) counts as a regression unless `--allow-missing`.
//!
//! Noise, stated: each side's figure carries its 95 % interval from inside its runs, and a run-to-run
//! spread: the coefficient of variation of the pooled runs' figures, never below `--noise-floor`
//! (with one run the floor alone), divided by √runs. The change is beyond noise when it exceeds
//! `z₉₅·√(seᵦ² + se꜀² + rᵦ² + r꜀²)`, all relative to the baseline figure; it counts when it also exceeds
//! `--threshold`. Exit 0 when nothing regressed, 1 on a regression, 2 on errors.

use std::collections::BTreeMap;

use anyhow::{Context, Result, bail};
use clap::Args;
use fleetbench_common::intervals::Z95;
use fleetbench_proto::v1::GetJobRequest;
use serde::{Deserialize, Serialize};

use super::rank::{self, RankArgs, RankJson, Spread};
use crate::client::Client;
use crate::output::{self, Format};

/// Compare options.
#[derive(Debug, Args)]
pub struct CompareArgs {
    /// The baseline: a job id (or prefix), or a file saved with `fleetbench rank --output json`.
    pub baseline: String,
    /// The candidate, in the same forms.
    pub candidate: String,
    /// Smallest change that counts, percent of the baseline (`5%` or `5`).
    #[arg(long, default_value = "5%", value_parser = parse_percent)]
    pub threshold: f64,
    /// Smallest run-to-run coefficient of variation assumed for one run, percent; used alone when a
    /// row has one run, and as a minimum when repeated runs measured less.
    #[arg(long, default_value = "5%", value_parser = parse_percent)]
    pub noise_floor: f64,
    /// Metrics judged, comma-separated: p50, p99, throughput.
    #[arg(long, value_delimiter = ',', default_value = "p50,p99,throughput")]
    pub metrics: Vec<Metric>,
    /// Include INVALID runs of jobs.
    #[arg(long)]
    pub include_invalid: bool,
    /// List baseline rows the candidate lacks without failing the gate.
    #[arg(long)]
    pub allow_missing: bool,
    /// Output format.
    #[arg(long, value_enum, default_value_t)]
    pub output: Format,
}

/// A metric compare judges.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Metric {
    /// Median latency, lower is better.
    P50,
    /// 99th percentile latency, lower is better.
    P99,
    /// Samples per second, higher is better.
    Throughput,
}

impl Metric {
    fn name(self) -> &'static str {
        match self {
            Metric::P50 => "p50",
            Metric::P99 => "p99",
            Metric::Throughput => "throughput",
        }
    }

    /// The figure, its 95 % interval and its runs' coefficient of variation.
    fn of(self, r: &Row) -> (f64, Option<[f64; 2]>, Option<f64>) {
        match self {
            Metric::P50 => (r.p50_ms, Some(r.p50_ci_ms), r.spread.map(|s| s.p50_cv)),
            Metric::P99 => (r.p99_ms, Some(r.p99_ci_ms), r.spread.map(|s| s.p99_cv)),
            Metric::Throughput => (
                r.throughput_per_s,
                r.throughput_ci_per_s,
                r.spread.map(|s| s.throughput_cv),
            ),
        }
    }

    fn show(self, v: f64) -> String {
        match self {
            Metric::Throughput => format!("{}/s", output::rate(v)),
            _ => output::ms(v),
        }
    }
}

/// Parses `5%`, `5` or `2.5 %` as a fraction (0.05).
pub fn parse_percent(s: &str) -> std::result::Result<f64, String> {
    let t = s.trim().trim_end_matches('%').trim();
    match t.parse::<f64>() {
        Ok(v) if v.is_finite() && v >= 0.0 => Ok(v / 100.0),
        _ => Err(format!("'{s}' is not a percentage; give e.g. 5% or 2.5")),
    }
}

/// The fields of a ranking row that compare reads, as `rank --output json` writes them.
#[derive(Debug, Clone, Deserialize)]
pub struct Row {
    /// Readable platform name.
    pub platform: String,
    /// Platform id.
    #[serde(default)]
    pub platform_id: String,
    /// Variant.
    pub variant: String,
    /// Configuration label.
    #[serde(default)]
    pub config: String,
    /// Median, ms.
    pub p50_ms: f64,
    /// 99th percentile, ms.
    pub p99_ms: f64,
    /// 95 % CI of p50, ms.
    pub p50_ci_ms: [f64; 2],
    /// 95 % CI of p99, ms.
    pub p99_ci_ms: [f64; 2],
    /// Samples per second.
    pub throughput_per_s: f64,
    /// Its 95 % CI.
    #[serde(default)]
    pub throughput_ci_per_s: Option<[f64; 2]>,
    /// Runs pooled.
    #[serde(default = "one")]
    pub runs: u32,
    /// Spread of the pooled runs.
    #[serde(default)]
    pub spread: Option<Spread>,
    /// The pooling key.
    #[serde(default)]
    pub pool: serde_json::Value,
}

fn one() -> u32 {
    1
}

impl Row {
    /// What makes rows of two rankings the same measurement: platform, variant and the work, without
    /// the versions, providers and page size that ran it (an upgrade that changes them is what a
    /// comparison is for).
    fn key(&self) -> (String, String, String) {
        let work = match &self.pool {
            serde_json::Value::Object(m) => {
                let mut m = m.clone();
                for k in [
                    "agent_version",
                    "ort_version",
                    "providers_used",
                    "huge_pages",
                ] {
                    m.remove(k);
                }
                serde_json::Value::Object(m).to_string()
            }
            other => other.to_string(),
        };
        // Two platforms of one ranking that read the same carry ` #<id prefix>`; the name without it
        // is the identity that survives a runtime upgrade.
        let platform = match self.platform.rsplit_once(" #") {
            Some((name, id)) if id.len() == 6 && id.bytes().all(|b| b.is_ascii_hexdigit()) => name,
            _ => self.platform.as_str(),
        };
        (platform.to_string(), self.variant.clone(), work)
    }
}

impl TryFrom<&RankJson> for Row {
    type Error = anyhow::Error;

    fn try_from(r: &RankJson) -> Result<Self> {
        // Both shapes are the same JSON; going through it keeps one definition of the fields.
        Ok(serde_json::from_value(serde_json::to_value(r)?)?)
    }
}

/// What happened to one metric of one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Better by more than the threshold and the noise.
    Improved,
    /// Worse by more than the threshold and the noise.
    Regressed,
    /// Within the threshold or the noise.
    NoChange,
}

impl Verdict {
    fn text(self) -> &'static str {
        match self {
            Verdict::Improved => "improved",
            Verdict::Regressed => "REGRESSED",
            Verdict::NoChange => "no change beyond noise",
        }
    }
}

/// One metric of one matched row.
#[derive(Debug, Clone, Serialize)]
pub struct Change {
    /// Platform name.
    pub platform: String,
    /// Variant.
    pub variant: String,
    /// Configuration label (the baseline's).
    pub config: String,
    /// Metric.
    pub metric: Metric,
    /// Baseline figure (ms, or samples/s for throughput).
    pub baseline: f64,
    /// Candidate figure.
    pub candidate: f64,
    /// (candidate − baseline) / baseline.
    pub change: f64,
    /// Relative change the noise alone could make (95 %), as a fraction of the baseline.
    pub noise: f64,
    /// The verdict.
    pub verdict: Verdict,
}

/// One side's squared standard error of a metric relative to `base` (the baseline's figure): inside
/// its runs (the interval's half-width / z) and between runs (CV, at least `floor`, over √runs).
fn side_error(metric: Metric, row: &Row, base: f64, floor: f64) -> f64 {
    let (v, ci, cv) = metric.of(row);
    let inside = match ci {
        Some([lo, hi]) if base > 0.0 && hi >= lo => (hi - lo) / (2.0 * Z95 * base),
        _ => 0.0,
    };
    // The run-to-run CV is relative to the side's own figure; scaled to the baseline's.
    let scale = if base > 0.0 { v / base } else { 1.0 };
    let between = scale * cv.unwrap_or(0.0).max(floor) / f64::from(row.runs.max(1)).sqrt();
    inside.powi(2) + between.powi(2)
}

/// Judges one metric of a matched pair of rows.
pub fn judge(metric: Metric, base: &Row, cand: &Row, threshold: f64, floor: f64) -> Change {
    let (b, _, _) = metric.of(base);
    let (c, _, _) = metric.of(cand);
    let change = if b > 0.0 { (c - b) / b } else { 0.0 };
    let worse = match metric {
        Metric::Throughput => -change,
        _ => change,
    };
    let noise =
        Z95 * (side_error(metric, base, b, floor) + side_error(metric, cand, b, floor)).sqrt();
    let verdict = if worse.abs() <= threshold.max(noise) {
        Verdict::NoChange
    } else if worse > 0.0 {
        Verdict::Regressed
    } else {
        Verdict::Improved
    };
    Change {
        platform: base.platform.clone(),
        variant: base.variant.clone(),
        config: base.config.clone(),
        metric,
        baseline: b,
        candidate: c,
        change,
        noise,
        verdict,
    }
}

/// The comparison of two rankings.
#[derive(Debug, Serialize)]
pub struct Comparison {
    /// Judged changes.
    pub changes: Vec<Change>,
    /// Rows only the baseline has (`platform variant config`): the candidate has no VALID run of them.
    /// They fail the gate unless `--allow-missing`.
    pub only_in_baseline: Vec<String>,
    /// Rows only the candidate has.
    pub only_in_candidate: Vec<String>,
    /// Threshold, fraction.
    pub threshold: f64,
    /// Noise floor, fraction.
    pub noise_floor: f64,
    /// Some metric regressed, or (without `--allow-missing`) a baseline row is missing.
    pub regressed: bool,
}

fn keyed(side: &str, rows: Vec<Row>) -> Result<BTreeMap<(String, String, String), Row>> {
    let mut out = BTreeMap::new();
    for r in rows {
        let label = format!("{} {} {}", r.platform, r.variant, r.config);
        if out.insert(r.key(), r).is_some() {
            bail!(
                "{side}: two rows of '{label}' did the same work with different agent or ONNX Runtime \
                 versions; compare one job, or a ranking of one job, per side"
            );
        }
    }
    Ok(out)
}

/// Matches the rows of two rankings and judges each metric.
pub fn compare(
    base: Vec<Row>,
    cand: Vec<Row>,
    metrics: &[Metric],
    threshold: f64,
    floor: f64,
    allow_missing: bool,
) -> Result<Comparison> {
    let base = keyed("baseline", base)?;
    let mut cand = keyed("candidate", cand)?;
    let mut changes = Vec::new();
    let mut only_in_baseline = Vec::new();
    for (key, b) in &base {
        match cand.remove(key) {
            Some(c) => changes.extend(metrics.iter().map(|&m| judge(m, b, &c, threshold, floor))),
            None => only_in_baseline.push(format!("{} {} {}", b.platform, b.variant, b.config)),
        }
    }
    let only_in_candidate: Vec<String> = cand
        .values()
        .map(|c| format!("{} {} {}", c.platform, c.variant, c.config))
        .collect();
    if changes.is_empty() {
        bail!(
            "no row of the candidate did the same work on the same platform as a row of the baseline \
             (baseline: {} rows, candidate: {} rows)",
            base.len(),
            only_in_candidate.len()
        );
    }
    let regressed = changes.iter().any(|c| c.verdict == Verdict::Regressed)
        || (!allow_missing && !only_in_baseline.is_empty());
    Ok(Comparison {
        changes,
        only_in_baseline,
        only_in_candidate,
        threshold,
        noise_floor: floor,
        regressed,
    })
}

/// Reads one side: a file saved with `rank --output json`, or a job's ranking.
async fn side(client: &Client, name: &str, what: &str, include_invalid: bool) -> Result<Vec<Row>> {
    let path = std::path::Path::new(what);
    if path.is_file() {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("{name}: reading {}", path.display()))?;
        return serde_json::from_str::<Vec<Row>>(&text).with_context(|| {
            format!(
                "{name}: {} is not a ranking saved with `fleetbench rank --output json`",
                path.display()
            )
        });
    }
    let job = client
        .jobs()
        .get_job(GetJobRequest {
            job_id: what.to_string(),
        })
        .await
        .map_err(|s| {
            client.error(
                s,
                &format!("{name}: no file '{what}', and looking up a job"),
            )
        })?
        .into_inner();
    let summary = job.summary.unwrap_or_default();
    if !matches!(summary.state.as_str(), "succeeded" | "failed" | "cancelled") {
        bail!(
            "{name}: job {} is {}; compare it once it has finished (fleetbench jobs watch {})",
            output::short(&summary.job_id),
            summary.state,
            output::short(&summary.job_id)
        );
    }
    let args = RankArgs {
        include_invalid,
        job: Some(summary.job_id.clone()),
        ..RankArgs::for_model(&summary.model)
    };
    let rows = rank::fetch(client, &args).await?.rows;
    if rows.is_empty() {
        bail!(
            "{name}: job {} has no finished {}runs to compare",
            output::short(&summary.job_id),
            if include_invalid { "" } else { "VALID " }
        );
    }
    rows.iter()
        .map(|r| Row::try_from(&RankJson::from(r)))
        .collect()
}

fn pct(v: f64) -> String {
    format!("{:+.1} %", v * 100.0)
}

/// Runs `compare`; `Ok(true)` when something regressed.
pub async fn run(client: &Client, a: CompareArgs) -> Result<bool> {
    if a.metrics.is_empty() {
        bail!("metrics: name at least one of p50, p99, throughput");
    }
    let base = side(client, "baseline", &a.baseline, a.include_invalid).await?;
    let cand = side(client, "candidate", &a.candidate, a.include_invalid).await?;
    let cmp = compare(
        base,
        cand,
        &a.metrics,
        a.threshold,
        a.noise_floor,
        a.allow_missing,
    )?;
    match a.output {
        Format::Json => output::print_json(&cmp)?,
        Format::Table => {
            let mut t = output::table(&[
                "PLATFORM",
                "VARIANT",
                "CONFIG",
                "METRIC",
                "BASELINE",
                "CANDIDATE",
                "CHANGE",
                "NOISE",
                "VERDICT",
            ]);
            for c in &cmp.changes {
                t.add_row(vec![
                    c.platform.clone(),
                    c.variant.clone(),
                    c.config.clone(),
                    c.metric.name().to_string(),
                    c.metric.show(c.baseline),
                    c.metric.show(c.candidate),
                    pct(c.change),
                    format!("±{:.1} %", c.noise * 100.0),
                    c.verdict.text().to_string(),
                ]);
            }
            outln!("{t}");
            if !cmp.only_in_baseline.is_empty() {
                outln!(
                    "{} in the baseline, with no VALID run in the candidate: {}",
                    if a.allow_missing {
                        "listed only (--allow-missing)"
                    } else {
                        "MISSING (fails the gate; --allow-missing lists them only)"
                    },
                    cmp.only_in_baseline.join("; ")
                );
            }
            if !cmp.only_in_candidate.is_empty() {
                outln!(
                    "only in the candidate (not judged): {}",
                    cmp.only_in_candidate.join("; ")
                );
            }
            let count = |v: Verdict| cmp.changes.iter().filter(|c| c.verdict == v).count();
            outln!(
                "{} regressed, {} missing, {} improved, {} no change beyond noise (threshold {:.1} %; noise: each \
                 side's 95 % interval and its run-to-run spread, at least {:.1} % per run)",
                count(Verdict::Regressed),
                cmp.only_in_baseline.len(),
                count(Verdict::Improved),
                count(Verdict::NoChange),
                a.threshold * 100.0,
                a.noise_floor * 100.0
            );
        }
    }
    Ok(cmp.regressed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(p50: f64, ci: f64, runs: u32, spread: Option<f64>) -> Row {
        Row {
            platform: "edge".into(),
            platform_id: "p1".into(),
            variant: "fp32".into(),
            config: "single-stream".into(),
            p50_ms: p50,
            p99_ms: p50 * 2.0,
            p50_ci_ms: [p50 * (1.0 - ci), p50 * (1.0 + ci)],
            p99_ci_ms: [p50 * 2.0 * (1.0 - ci), p50 * 2.0 * (1.0 + ci)],
            throughput_per_s: 1000.0 / p50,
            throughput_ci_per_s: Some([1000.0 / p50 * (1.0 - ci), 1000.0 / p50 * (1.0 + ci)]),
            runs,
            spread: spread.map(|cv| Spread {
                p50_cv: cv,
                p99_cv: cv,
                throughput_cv: cv,
            }),
            pool: serde_json::json!({"scenario": "single-stream", "ort_version": "1.31.1"}),
        }
    }

    #[test]
    fn a_doubling_regresses_and_a_wobble_does_not() {
        let base = row(1.0, 0.01, 1, None);
        let all = [Metric::P50, Metric::P99, Metric::Throughput];
        let doubled = compare(
            vec![base.clone()],
            vec![row(2.0, 0.01, 1, None)],
            &all,
            0.05,
            0.05,
            false,
        )
        .unwrap();
        assert!(doubled.regressed);
        assert!(
            doubled
                .changes
                .iter()
                .all(|c| c.verdict == Verdict::Regressed),
            "{doubled:?}"
        );
        let halved = compare(
            vec![base.clone()],
            vec![row(0.5, 0.01, 1, None)],
            &all,
            0.05,
            0.05,
            false,
        )
        .unwrap();
        assert!(!halved.regressed);
        assert!(
            halved
                .changes
                .iter()
                .all(|c| c.verdict == Verdict::Improved)
        );
        // +8 % is beyond the threshold, but one run each side with a 5 % floor is ±14.5 % of noise
        // (the candidate's share scaled to the baseline).
        let wobble = compare(
            vec![base.clone()],
            vec![row(1.08, 0.01, 1, None)],
            &all,
            0.05,
            0.05,
            false,
        )
        .unwrap();
        assert!(!wobble.regressed, "{wobble:?}");
        assert!(
            (wobble.changes[0].noise - 0.145).abs() < 0.002,
            "{:?}",
            wobble.changes[0]
        );
        // Ten runs a side that agree within 1 % narrow the noise: +8 % is then a regression.
        let tight = compare(
            vec![row(1.0, 0.01, 10, Some(0.01))],
            vec![row(1.08, 0.01, 10, Some(0.01))],
            &[Metric::P50],
            0.05,
            0.01,
            false,
        )
        .unwrap();
        assert!(tight.regressed, "{tight:?}");
        // ... but not beyond a 10 % threshold.
        let lenient = compare(
            vec![row(1.0, 0.01, 10, Some(0.01))],
            vec![row(1.08, 0.01, 10, Some(0.01))],
            &[Metric::P50],
            0.10,
            0.01,
            false,
        )
        .unwrap();
        assert!(!lenient.regressed);
        // Runs that spread widely widen the noise even above the floor.
        let spread = compare(
            vec![row(1.0, 0.01, 2, Some(0.3))],
            vec![row(1.3, 0.01, 2, Some(0.3))],
            &[Metric::P50],
            0.05,
            0.01,
            false,
        )
        .unwrap();
        assert!(!spread.regressed, "{spread:?}");
    }

    #[test]
    fn rows_match_on_the_work_not_on_the_runtime_version() {
        let base = row(1.0, 0.01, 1, None);
        // A newer runtime changes the platform id (it hashes the ORT version) and the pooling key's
        // versions; the row still matches.
        let mut newer = row(1.0, 0.01, 1, None);
        newer.pool["ort_version"] = "1.32.0".into();
        // An agent that now puts ONNX Runtime's memory on huge pages still matches: the change is
        // what the comparison measures.
        newer.pool["huge_pages"] = true.into();
        newer.platform_id = "p9".into();
        newer.platform = "edge #a1b2c3".into();
        let mut other_platform = row(1.0, 0.01, 1, None);
        other_platform.platform = "cloud".into();
        let cmp = compare(
            vec![base.clone()],
            vec![newer, other_platform],
            &[Metric::P50],
            0.05,
            0.05,
            false,
        )
        .unwrap();
        assert_eq!(cmp.changes.len(), 1);
        assert_eq!(cmp.only_in_candidate.len(), 1);
        let mut batch = row(1.0, 0.01, 1, None);
        batch.pool["scenario"] = "offline".into();
        let refused = |b: Vec<Row>, c: Vec<Row>| {
            compare(b, c, &[Metric::P50], 0.05, 0.05, false)
                .unwrap_err()
                .to_string()
        };
        let e = refused(vec![base.clone()], vec![batch]);
        assert!(
            e.contains("no row of the candidate did the same work"),
            "{e}"
        );
        let e = refused(vec![base.clone(), base], vec![]);
        assert!(e.contains("baseline: two rows"), "{e}");
    }

    #[test]
    fn a_baseline_row_the_candidate_lacks_fails_the_gate_unless_allowed() {
        let mut int8 = row(1.0, 0.01, 1, None);
        int8.variant = "int8".into();
        let base = vec![row(1.0, 0.01, 1, None), int8];
        let cand = vec![row(1.0, 0.01, 1, None)];
        let strict = compare(
            base.clone(),
            cand.clone(),
            &[Metric::P50],
            0.05,
            0.05,
            false,
        )
        .unwrap();
        assert!(
            strict.regressed && strict.only_in_baseline.len() == 1,
            "{strict:?}"
        );
        let allowed = compare(base, cand, &[Metric::P50], 0.05, 0.05, true).unwrap();
        assert!(!allowed.regressed);
    }

    #[test]
    fn percentages_parse_with_or_without_the_sign() {
        assert_eq!(parse_percent("5%"), Ok(0.05));
        assert_eq!(parse_percent(" 2.5 % "), Ok(0.025));
        assert!(
            parse_percent("five")
                .unwrap_err()
                .contains("'five' is not a percentage")
        );
        assert!(parse_percent("-1").is_err());
    }
}
