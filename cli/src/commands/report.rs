//! `fleetbench report MODEL [--job ID …] -o report.html`: one self-contained file with the
//! recommendation, the ranking with its ties, charts drawn with `plotters` to inline SVG (latency CDF,
//! accuracy against cost with the Pareto front, throughput across batch sizes and concurrency, TTFT
//! and TPOT for generate runs), and every run's validity and reproducibility record. No script, font
//! or style is fetched: the file opens offline. `--format md|csv|json` write the same data as text.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use clap::{Args, ValueEnum};
use fleetbench_proto::v1::{GetJobRequest, JobDetail, ListJobsRequest, RankRow};
use plotters::prelude::*;
use serde::Serialize;

use super::rank::{self, RankArgs, RankJson};
use super::recommend::{self, RecommendArgs, Recommendation};
use crate::client::Client;
use crate::output;

/// Report options.
#[derive(Debug, Args)]
pub struct ReportArgs {
    /// Model name.
    pub model: String,
    /// Jobs to report (repeatable; id or prefix); without one, every job of the model, its runs pooled.
    #[arg(long)]
    pub job: Vec<String>,
    /// Where to write the report.
    #[arg(short = 'o', long)]
    pub out: PathBuf,
    /// File format.
    #[arg(long, value_enum, default_value_t = ReportFormat::Html)]
    pub format: ReportFormat,
    /// The recommendation keeps only rows with at least this top-1 accuracy, as a fraction (0.97).
    #[arg(long)]
    pub min_accuracy: Option<f64>,
}

/// Report file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub enum ReportFormat {
    /// One self-contained HTML page with SVG charts.
    #[default]
    Html,
    /// Markdown tables.
    Md,
    /// The ranking rows, one per line.
    Csv,
    /// Everything, as JSON.
    Json,
}

/// One job's part of the report (or all jobs pooled).
#[derive(Debug, Serialize)]
pub struct Section {
    /// Job id; empty when all jobs of the model are pooled.
    pub job: String,
    /// The recommendation by cost (under `--min-accuracy`); absent when none, with `no_recommendation`
    /// saying why.
    pub recommendation: Option<Recommendation>,
    /// Why there is no recommendation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_recommendation: Option<String>,
    /// Ranking by p99, ties grouped.
    pub rows: Vec<RankJson>,
    /// The note under a ranking with ties.
    pub tie_note: Option<String>,
    #[serde(skip)]
    raw: Vec<RankRow>,
}

impl Section {
    /// The recommendation's sentence, or why there is none.
    fn answer(&self) -> std::result::Result<&str, &str> {
        match (&self.recommendation, &self.no_recommendation) {
            (Some(r), _) => Ok(&r.reason),
            (None, why) => Err(why.as_deref().unwrap_or("-")),
        }
    }
}

/// One run's validity and reproducibility record.
#[derive(Debug, Serialize)]
pub struct RunRecord {
    /// Job id.
    pub job: String,
    /// Run id.
    pub run: String,
    /// Agent that ran it.
    pub agent: String,
    /// Variant.
    pub variant: String,
    /// Configuration label.
    pub config: String,
    /// VALID or INVALID.
    pub valid: bool,
    /// Why INVALID.
    pub invalid_reason: String,
    /// The reproducibility record (agent, runtime, providers, options), as stored.
    pub record: serde_json::Value,
}

/// Everything a report shows.
#[derive(Debug, Serialize)]
pub struct Report {
    /// Model.
    pub model: String,
    /// When the report was made, RFC 3339.
    pub generated_at: String,
    /// One section per job, or one for all jobs pooled.
    pub sections: Vec<Section>,
    /// The runs behind the sections.
    pub runs: Vec<RunRecord>,
}

/// Gathers a report's data from the coordinator.
pub async fn gather(client: &Client, a: &ReportArgs) -> Result<Report> {
    let jobs: Vec<Option<String>> = if a.job.is_empty() {
        vec![None]
    } else {
        a.job.iter().cloned().map(Some).collect()
    };
    let mut sections = Vec::new();
    let mut details: Vec<JobDetail> = Vec::new();
    for job in &jobs {
        let job_id = match job {
            Some(j) => {
                let d = client
                    .jobs()
                    .get_job(GetJobRequest { job_id: j.clone() })
                    .await
                    .map_err(|s| client.error(s, &format!("looking up job '{j}'")))?
                    .into_inner();
                let id = d.summary.clone().unwrap_or_default().job_id;
                details.push(d);
                Some(id)
            }
            None => None,
        };
        let resp = rank::fetch(
            client,
            &RankArgs {
                job: job_id.clone(),
                ..RankArgs::for_model(&a.model)
            },
        )
        .await?;
        let recommendation = recommend::fetch(
            client,
            &RecommendArgs {
                model: a.model.clone(),
                objective: "cost".into(),
                max_p99_ms: None,
                min_accuracy: a.min_accuracy,
                max_accuracy_drop: None,
                min_throughput: None,
                job: job_id.clone(),
                output: output::Format::Json,
            },
        )
        .await;
        sections.push(Section {
            job: job_id.unwrap_or_default(),
            no_recommendation: recommendation.as_ref().err().map(|e| format!("{e:#}")),
            recommendation: recommendation.ok(),
            rows: resp.rows.iter().map(RankJson::from).collect(),
            tie_note: rank::tie_note(&resp),
            raw: resp.rows,
        });
    }
    if a.job.is_empty() {
        let listed = client
            .jobs()
            .list_jobs(ListJobsRequest { limit: 1000 })
            .await
            .map_err(|s| client.error(s, "listing jobs"))?
            .into_inner()
            .jobs;
        for j in listed.iter().filter(|j| j.model == a.model) {
            let d = client
                .jobs()
                .get_job(GetJobRequest {
                    job_id: j.job_id.clone(),
                })
                .await
                .map_err(|s| client.error(s, "reading a job"))?
                .into_inner();
            details.push(d);
        }
    }
    if sections.iter().all(|s| s.rows.is_empty()) {
        anyhow::bail!(
            "no finished VALID runs of '{}'{} to report; run a job first (fleetbench jobs submit --model {})",
            a.model,
            if a.job.is_empty() {
                String::new()
            } else {
                format!(" in job(s) {}", a.job.join(", "))
            },
            a.model
        );
    }
    let mut runs = Vec::new();
    for d in &details {
        let job = d.summary.clone().unwrap_or_default().job_id;
        for t in &d.tasks {
            let Some(r) = &t.run else { continue };
            runs.push(RunRecord {
                job: job.clone(),
                run: r.run_id.clone(),
                agent: r.agent.clone(),
                variant: r.variant.clone(),
                config: super::jobs::label(r.config.as_ref()),
                valid: r.valid,
                invalid_reason: r.invalid_reason.clone(),
                record: serde_json::from_str(&r.record_json).unwrap_or_default(),
            });
        }
    }
    Ok(Report {
        model: a.model.clone(),
        generated_at: humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string(),
        sections,
        runs,
    })
}

/// Runs `report`.
pub async fn run(client: &Client, a: ReportArgs) -> Result<()> {
    let report = gather(client, &a).await?;
    let text = match a.format {
        ReportFormat::Html => html(&report)?,
        ReportFormat::Md => markdown(&report),
        ReportFormat::Csv => csv(&report),
        ReportFormat::Json => serde_json::to_string_pretty(&report)?,
    };
    std::fs::write(&a.out, text).with_context(|| format!("writing {}", a.out.display()))?;
    outln!(
        "wrote {} ({} section(s), {} run(s))",
        a.out.display(),
        report.sections.len(),
        report.runs.len()
    );
    Ok(())
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn rank_cell(r: &RankJson) -> String {
    if r.tied {
        format!("={}", r.rank)
    } else {
        r.rank.to_string()
    }
}

fn row_name(r: &RankRow) -> String {
    format!("{} · {} · {}", r.platform, r.variant, r.config)
}

/// Ranking table cells: header and one row of text per ranking row.
fn ranking_cells(rows: &[RankJson]) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let header = vec![
        "#",
        "PLATFORM",
        "VARIANT",
        "CONFIG",
        "P50",
        "P99",
        "P99 95 % CI",
        "SAMPLES/S",
        "ACCURACY",
        "COST/1M",
        "RUNS",
    ];
    let cells = rows
        .iter()
        .map(|r| {
            vec![
                rank_cell(r),
                r.platform.clone(),
                r.variant.clone(),
                r.config.clone(),
                output::ms(r.p50_ms),
                output::ms(r.p99_ms),
                format!(
                    "{} – {}",
                    output::ms(r.p99_ci_ms[0]),
                    output::ms(r.p99_ci_ms[1])
                ),
                output::rate(r.throughput_per_s),
                output::pct(r.accuracy),
                output::cost(r.cost_per_million),
                r.runs.to_string(),
            ]
        })
        .collect();
    (header, cells)
}

fn run_cells(runs: &[RunRecord]) -> (Vec<&'static str>, Vec<Vec<String>>) {
    let header = vec![
        "JOB", "RUN", "AGENT", "VARIANT", "CONFIG", "VALIDITY", "RECORD",
    ];
    let cells = runs
        .iter()
        .map(|r| {
            let s = |k: &str| r.record.get(k).and_then(|v| v.as_str()).unwrap_or("?");
            vec![
                output::short(&r.job).to_string(),
                output::short(&r.run).to_string(),
                r.agent.clone(),
                r.variant.clone(),
                r.config.clone(),
                if r.valid {
                    "VALID".to_string()
                } else {
                    format!("INVALID: {}", r.invalid_reason)
                },
                format!(
                    "agent {} · ORT {} · {}",
                    s("agent_version"),
                    s("ort_version"),
                    s("execution_provider")
                ),
            ]
        })
        .collect();
    (header, cells)
}

fn html_table(out: &mut String, header: &[&str], cells: &[Vec<String>]) {
    out.push_str("<table><thead><tr>");
    for h in header {
        let _ = write!(out, "<th>{}</th>", esc(h));
    }
    out.push_str("</tr></thead><tbody>");
    for row in cells {
        out.push_str("<tr>");
        for c in row {
            let _ = write!(out, "<td>{}</td>", esc(c));
        }
        out.push_str("</tr>");
    }
    out.push_str("</tbody></table>");
}

/// A chart: its title, a sentence on what it shows, the SVG, and how many data points it drew.
struct Chart {
    id: &'static str,
    title: String,
    caption: String,
    svg: String,
    points: usize,
}

type Plot<'a> = DrawingArea<SVGBackend<'a>, plotters::coord::Shift>;

fn plot_err<E: std::fmt::Debug>(e: E) -> anyhow::Error {
    anyhow!("drawing a chart: {e:?}")
}

fn svg(draw: impl FnOnce(&Plot) -> Result<()>) -> Result<String> {
    let mut s = String::new();
    {
        let root = SVGBackend::with_string(&mut s, (760, 420)).into_drawing_area();
        root.fill(&WHITE).map_err(plot_err)?;
        draw(&root)?;
        root.present().map_err(plot_err)?;
    }
    Ok(s)
}

fn bounds(values: impl Iterator<Item = f64>) -> Option<(f64, f64)> {
    let (lo, hi) = values
        .filter(|v| v.is_finite())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(v), h.max(v))
        });
    (lo.is_finite() && hi.is_finite()).then_some((lo, hi))
}

/// Latency CDF of each row, from its stored percentiles (min, p50, p90, p95, p97, p99, p99.9, max).
fn cdf_chart(rows: &[RankRow]) -> Result<Option<Chart>> {
    let curves: Vec<(String, Vec<(f64, f64)>)> = rows
        .iter()
        .filter_map(|r| {
            let l = r.latency?;
            let pts = [
                (l.min_ms, 0.0),
                (l.p50_ms, 0.5),
                (l.p90_ms, 0.9),
                (l.p95_ms, 0.95),
                (l.p97_ms, 0.97),
                (l.p99_ms, 0.99),
                (l.p999_ms, 0.999),
                (l.max_ms, 1.0),
            ];
            let pts: Vec<(f64, f64)> = pts.into_iter().filter(|p| p.0 > 0.0).collect();
            (pts.len() >= 2).then(|| (row_name(r), pts))
        })
        .collect();
    let Some((lo, hi)) = bounds(curves.iter().flat_map(|c| c.1.iter().map(|p| p.0))) else {
        return Ok(None);
    };
    let hi = if hi > lo { hi } else { lo * 2.0 };
    let points = curves.iter().map(|c| c.1.len()).sum();
    let svg = svg(|root| {
        let mut chart = ChartBuilder::on(root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((lo * 0.9..hi * 1.1).log_scale(), 0.0..1.0)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("latency (log scale)")
            .y_desc("fraction of queries")
            .x_label_formatter(&|v| output::ms(*v))
            .draw()
            .map_err(plot_err)?;
        for (i, (name, pts)) in curves.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        Ok(())
    })?;
    Ok(Some(Chart {
        id: "cdf",
        title: "Latency CDF".into(),
        caption: "Each line is one platform, variant and configuration, drawn through its pooled \
                  percentiles (min, p50, p90, p95, p97, p99, p99.9, max)."
            .into(),
        svg,
        points,
    }))
}

/// Accuracy against cost per million, the Pareto front (p99 × accuracy × cost) marked.
fn pareto_chart(rows: &[RankRow]) -> Result<Option<Chart>> {
    let cost = |r: &RankRow| {
        r.generation
            .map_or(r.cost_per_million, |g| g.cost_per_million_tokens)
    };
    let idx: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].accuracy.is_some() && cost(&rows[i]).is_some_and(|c| c > 0.0))
        .collect();
    if idx.is_empty() {
        return Ok(None);
    }
    let sub: Vec<RankRow> = idx.iter().map(|&i| rows[i].clone()).collect();
    let front = recommend::pareto(&sub);
    let pts: Vec<(f64, f64, bool, String)> = sub
        .iter()
        .enumerate()
        .map(|(i, r)| {
            (
                cost(r).unwrap_or_default(),
                r.accuracy.unwrap_or_default() * 100.0,
                front.contains(&i),
                row_name(r),
            )
        })
        .collect();
    let (clo, chi) = bounds(pts.iter().map(|p| p.0)).unwrap_or((1.0, 2.0));
    let (alo, ahi) = bounds(pts.iter().map(|p| p.1)).unwrap_or((0.0, 100.0));
    let (alo, ahi) = ((alo - 2.0).max(0.0), (ahi + 2.0).min(100.5));
    let svg = svg(|root| {
        let mut chart = ChartBuilder::on(root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((clo * 0.8..chi * 1.25).log_scale(), alo..ahi)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("cost per million (log scale)")
            .y_desc("accuracy (%)")
            .x_label_formatter(&|v| output::cost(Some(*v)))
            .y_label_formatter(&|v| format!("{v:.1}"))
            .draw()
            .map_err(plot_err)?;
        let mut line: Vec<(f64, f64)> = pts.iter().filter(|p| p.2).map(|p| (p.0, p.1)).collect();
        line.sort_by(|a, b| a.0.total_cmp(&b.0));
        chart
            .draw_series(LineSeries::new(line, RED.stroke_width(1)))
            .map_err(plot_err)?
            .label("Pareto front (p99 × accuracy × cost)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED));
        chart
            .draw_series(pts.iter().map(|p| {
                let style = if p.2 { RED.filled() } else { BLUE.filled() };
                Circle::new((p.0, p.1), if p.2 { 6 } else { 4 }, style)
            }))
            .map_err(plot_err)?;
        chart
            .draw_series(pts.iter().filter(|p| p.2).enumerate().map(|(i, p)| {
                // Front points are named; labels step down so neighbours do not overprint.
                Text::new(
                    format!("  {}", p.3),
                    (p.0, p.1 - (ahi - alo) * 0.04 * i as f64),
                    ("sans-serif", 11).into_font(),
                )
            }))
            .map_err(plot_err)?;
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        Ok(())
    })?;
    Ok(Some(Chart {
        id: "pareto",
        title: "Accuracy against cost".into(),
        caption:
            "Each point is a row with an accuracy and a cost (agents labelled cost_per_hour); \
                  red points are on the Pareto front: no other row is at least as good on p99, \
                  accuracy and cost and better on one."
                .into(),
        svg,
        points: pts.len(),
    }))
}

/// Throughput against batch size or concurrency, where the runs swept it.
fn sweep_chart(rows: &[RankRow], concurrency: bool) -> Result<Option<Chart>> {
    let x = |r: &RankRow| {
        let c = r.run_config.clone().unwrap_or_default();
        f64::from(
            if concurrency {
                c.concurrency
            } else {
                c.batch_size
            }
            .max(1),
        )
    };
    // One line per platform, variant and everything else the runs did: the pooling key without the
    // swept dimension, so a batch × threads sweep draws a line per thread count.
    let swept = if concurrency { "streams" } else { "batch_size" };
    let mut lines: BTreeMap<(String, String), Vec<(f64, f64)>> = BTreeMap::new();
    for r in rows.iter().filter(|r| r.generation.is_none()) {
        let rest = match serde_json::from_str::<serde_json::Value>(&r.pool_key) {
            Ok(serde_json::Value::Object(mut m)) => {
                m.remove(swept);
                serde_json::Value::Object(m).to_string()
            }
            _ => r.pool_key.clone(),
        };
        lines
            .entry((format!("{} · {}", r.platform, r.variant), rest))
            .or_default()
            .push((x(r), r.throughput_per_s));
    }
    lines.retain(|_, pts| {
        pts.sort_by(|a, b| a.0.total_cmp(&b.0));
        pts.dedup_by(|a, b| a.0 == b.0);
        pts.len() >= 2
    });
    // Lines that share a platform and variant are told apart by a number.
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    let lines: Vec<(String, Vec<(f64, f64)>)> = lines
        .into_iter()
        .map(|((name, _), pts)| {
            let n = seen.entry(name.clone()).or_default();
            *n += 1;
            (
                if *n > 1 {
                    format!("{name} ({n})")
                } else {
                    name
                },
                pts,
            )
        })
        .collect();
    if lines.is_empty() {
        return Ok(None);
    }
    let (xlo, xhi) = bounds(lines.iter().flat_map(|l| &l.1).map(|p| p.0)).unwrap_or((1.0, 2.0));
    let (_, yhi) = bounds(lines.iter().flat_map(|l| &l.1).map(|p| p.1)).unwrap_or((0.0, 1.0));
    let what = if concurrency {
        "concurrency (streams)"
    } else {
        "batch size"
    };
    let points = lines.iter().map(|l| l.1.len()).sum();
    let svg = svg(|root| {
        let mut chart = ChartBuilder::on(root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((xlo..xhi * 1.05).log_scale(), 0.0..yhi * 1.1)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc(format!("{what} (log scale)"))
            .y_desc("samples per second")
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| output::rate(*v))
            .draw()
            .map_err(plot_err)?;
        for (i, (name, pts)) in lines.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))
                .map_err(plot_err)?
                .label(name.clone())
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
                .map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        Ok(())
    })?;
    Ok(Some(Chart {
        id: if concurrency { "concurrency" } else { "batch" },
        title: format!("Throughput against {what}"),
        caption: format!("One line per platform and variant whose runs swept the {what}."),
        svg,
        points,
    }))
}

/// TTFT against TPOT (p50 and p99) of generate rows.
fn token_chart(rows: &[RankRow]) -> Result<Option<Chart>> {
    // (row, (TTFT, TPOT) at p50, at p99)
    type Point = (String, (f64, f64), (f64, f64));
    let pts: Vec<Point> = rows
        .iter()
        .filter_map(|r| {
            let g = r.generation?;
            let (t, p) = (g.ttft?, g.tpot?);
            Some((row_name(r), (t.p50_ms, p.p50_ms), (t.p99_ms, p.p99_ms)))
        })
        .filter(|p| p.1.0 > 0.0 && p.2.0 > 0.0)
        .collect();
    if pts.is_empty() {
        return Ok(None);
    }
    let all = || pts.iter().flat_map(|p| [p.1, p.2]);
    let (xlo, xhi) = bounds(all().map(|p| p.0)).unwrap_or((1.0, 2.0));
    let (_, yhi) = bounds(all().map(|p| p.1)).unwrap_or((0.0, 1.0));
    let svg = svg(|root| {
        let mut chart = ChartBuilder::on(root)
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d((xlo * 0.8..xhi * 1.25).log_scale(), 0.0..yhi * 1.2)
            .map_err(plot_err)?;
        chart
            .configure_mesh()
            .x_desc("time to first token (log scale)")
            .y_desc("time per output token")
            .x_label_formatter(&|v| output::ms(*v))
            .y_label_formatter(&|v| output::ms(*v))
            .draw()
            .map_err(plot_err)?;
        for (i, (name, p50, p99)) in pts.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new([*p50, *p99], color.stroke_width(1)))
                .map_err(plot_err)?
                .label(format!("{name} (dot p50, square p99)"))
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], color));
            chart
                .draw_series([Circle::new(*p50, 5, color.filled())])
                .map_err(plot_err)?;
            chart
                .draw_series([Rectangle::new(
                    [(p99.0 * 0.97, p99.1 * 0.97), (p99.0 * 1.03, p99.1 * 1.03)],
                    color.filled(),
                )])
                .map_err(plot_err)?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(plot_err)?;
        Ok(())
    })?;
    Ok(Some(Chart {
        id: "tokens",
        title: "Generation: TTFT and TPOT".into(),
        caption: "Each generate row's time to first token against its time per output token, at \
                  p50 (dot) and p99 (square)."
            .into(),
        svg,
        points: pts.len() * 2,
    }))
}

fn charts(rows: &[RankRow]) -> Result<Vec<Chart>> {
    Ok([
        cdf_chart(rows)?,
        pareto_chart(rows)?,
        sweep_chart(rows, false)?,
        sweep_chart(rows, true)?,
        token_chart(rows)?,
    ]
    .into_iter()
    .flatten()
    .collect())
}

const STYLE: &str = "body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}\
table{border-collapse:collapse;margin:1em 0;font-size:13px}th,td{border:1px solid #ccc;padding:3px 8px;\
text-align:left}th{background:#f3f3f3}.answer{font-size:1.15em;background:#eef6ee;padding:.8em;\
border-left:4px solid #3a3}.none{background:#fbeeee;border-left-color:#a33}figure{margin:1.5em 0}\
figcaption{color:#555;font-size:13px}.note{color:#555;font-size:13px}";

/// The report as one HTML page: inline style and SVG, no script, nothing fetched.
pub fn html(r: &Report) -> Result<String> {
    let mut out = String::new();
    let _ = write!(
        out,
        "<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\">\
         <meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; style-src 'unsafe-inline'; img-src data:\">\
         <title>fleetbench report: {m}</title><style>{STYLE}</style></head><body>\
         <h1>fleetbench report: {m}</h1><p class=\"note\">Generated {t} by fleetbench {v}. Latencies in \
         adaptive units; intervals are 95 %; costs per million samples (output tokens for generate rows).</p>",
        m = esc(&r.model),
        t = esc(&r.generated_at),
        v = fleetbench_common::VERSION
    );
    for s in &r.sections {
        let _ = write!(
            out,
            "<section><h2>{}</h2>",
            if s.job.is_empty() {
                "All jobs, runs pooled".to_string()
            } else {
                format!("Job {}", esc(output::short(&s.job)))
            }
        );
        match s.answer() {
            Ok(rec) => {
                let _ = write!(out, "<p class=\"answer\">{}</p>", esc(rec));
            }
            Err(e) => {
                let _ = write!(
                    out,
                    "<p class=\"answer none\">No recommendation: {}</p>",
                    esc(e)
                );
            }
        }
        out.push_str("<h3>Ranking by p99</h3>");
        let (h, c) = ranking_cells(&s.rows);
        html_table(&mut out, &h, &c);
        if let Some(n) = &s.tie_note {
            let _ = write!(out, "<p class=\"note\">{}</p>", esc(n));
        }
        for chart in charts(&s.raw)? {
            let _ = write!(
                out,
                "<figure class=\"chart\" data-chart=\"{}\" data-points=\"{}\"><h3>{}</h3>{}<figcaption>{}</figcaption></figure>",
                chart.id,
                chart.points,
                esc(&chart.title),
                chart.svg,
                esc(&chart.caption)
            );
        }
        out.push_str("</section>");
    }
    out.push_str("<section><h2>Runs: validity and reproducibility</h2>");
    let (h, c) = run_cells(&r.runs);
    html_table(&mut out, &h, &c);
    out.push_str("</section></body></html>\n");
    Ok(out)
}

fn md_table(out: &mut String, header: &[&str], cells: &[Vec<String>]) {
    let cell = |s: &str| s.replace('|', "\\|");
    let _ = writeln!(out, "| {} |", header.join(" | "));
    let _ = writeln!(out, "|{}", " --- |".repeat(header.len()));
    for row in cells {
        let _ = writeln!(
            out,
            "| {} |",
            row.iter().map(|c| cell(c)).collect::<Vec<_>>().join(" | ")
        );
    }
    out.push('\n');
}

/// The report as Markdown (no charts).
pub fn markdown(r: &Report) -> String {
    let mut out = format!(
        "# fleetbench report: {}\n\nGenerated {} by fleetbench {}.\n\n",
        r.model,
        r.generated_at,
        fleetbench_common::VERSION
    );
    for s in &r.sections {
        let _ = writeln!(
            out,
            "## {}\n",
            if s.job.is_empty() {
                "All jobs, runs pooled".to_string()
            } else {
                format!("Job {}", output::short(&s.job))
            }
        );
        match s.answer() {
            Ok(rec) => {
                let _ = writeln!(out, "**{rec}**\n");
            }
            Err(e) => {
                let _ = writeln!(out, "No recommendation: {e}\n");
            }
        }
        let (h, c) = ranking_cells(&s.rows);
        md_table(&mut out, &h, &c);
        if let Some(n) = &s.tie_note {
            let _ = writeln!(out, "{n}\n");
        }
    }
    out.push_str("## Runs: validity and reproducibility\n\n");
    let (h, c) = run_cells(&r.runs);
    md_table(&mut out, &h, &c);
    out
}

/// The ranking rows as CSV, raw SI-free numbers (milliseconds, samples per second).
pub fn csv(r: &Report) -> String {
    let q = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
    let num = |v: Option<f64>| v.map(|v| v.to_string()).unwrap_or_default();
    let mut out = String::from(
        "job,rank,tied,platform,variant,config,p50_ms,p99_ms,p99_ci_low_ms,p99_ci_high_ms,\
         throughput_per_s,accuracy,cost_per_million,runs\n",
    );
    for s in &r.sections {
        for row in &s.rows {
            let _ = writeln!(
                out,
                "{},{},{},{},{},{},{},{},{},{},{},{},{},{}",
                q(&s.job),
                row.rank,
                row.tied,
                q(&row.platform),
                q(&row.variant),
                q(&row.config),
                row.p50_ms,
                row.p99_ms,
                row.p99_ci_ms[0],
                row.p99_ci_ms[1],
                row.throughput_per_s,
                num(row.accuracy),
                num(row.cost_per_million),
                row.runs
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use fleetbench_proto::v1::{GenerationStats, LatencyStats, RunConfig};

    fn lat(p50: f64) -> LatencyStats {
        LatencyStats {
            min_ms: p50 * 0.5,
            p50_ms: p50,
            p90_ms: p50 * 1.5,
            p95_ms: p50 * 1.7,
            p97_ms: p50 * 1.8,
            p99_ms: p50 * 2.0,
            p999_ms: p50 * 3.0,
            max_ms: p50 * 4.0,
            ..Default::default()
        }
    }

    fn row(variant: &str, batch: u32, p50: f64, generate: bool) -> RankRow {
        RankRow {
            platform: "edge".into(),
            variant: variant.into(),
            config: format!("b{batch}"),
            latency: Some(lat(p50)),
            throughput_per_s: f64::from(batch) * 1000.0 / p50,
            accuracy: Some(0.9),
            cost_per_million: Some(p50),
            run_config: Some(RunConfig {
                batch_size: batch,
                ..Default::default()
            }),
            generation: generate.then(|| GenerationStats {
                ttft: Some(lat(20.0)),
                tpot: Some(lat(5.0)),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    #[test]
    fn each_chart_appears_when_its_data_exists_and_draws_it() {
        let single = [row("fp32", 1, 1.0, false), row("int8", 1, 0.5, false)];
        let ids = |rows: &[RankRow]| {
            charts(rows)
                .unwrap()
                .iter()
                .map(|c| c.id)
                .collect::<Vec<_>>()
        };
        assert_eq!(
            ids(&single),
            ["cdf", "pareto"],
            "no sweep, no generate rows"
        );
        let sweep = [
            row("fp32", 1, 1.0, false),
            row("fp32", 8, 4.0, false),
            row("fp32", 32, 12.0, false),
        ];
        assert_eq!(ids(&sweep), ["cdf", "pareto", "batch"]);
        let generate = [row("fp32", 1, 100.0, true)];
        let got = charts(&generate).unwrap();
        assert!(got.iter().any(|c| c.id == "tokens" && c.points == 2));
        for c in &got {
            assert!(c.svg.contains("<polyline"), "{} draws lines", c.id);
        }
        // The batch chart's line runs through its three points.
        let batch = charts(&sweep)
            .unwrap()
            .into_iter()
            .find(|c| c.id == "batch")
            .unwrap();
        assert_eq!(batch.points, 3);
        assert!(batch.svg.matches("<circle").count() >= 3);
    }

    #[test]
    fn the_page_escapes_names_and_fetches_nothing() {
        let mut r = row("<script>alert(1)</script>", 1, 1.0, false);
        r.platform = "a & b".into();
        let report = Report {
            model: "m\"x".into(),
            generated_at: "now".into(),
            sections: vec![Section {
                job: String::new(),
                recommendation: None,
                no_recommendation: Some("none".into()),
                rows: vec![RankJson::from(&r)],
                tie_note: None,
                raw: vec![r],
            }],
            runs: vec![],
        };
        let page = html(&report).unwrap();
        assert!(!page.contains("<script>"), "names are escaped");
        assert!(page.contains("a &amp; b") && page.contains("m&quot;x"));
        assert!(
            page.contains("default-src 'none'"),
            "the page may fetch nothing"
        );
        let md = markdown(&report);
        assert!(md.contains("No recommendation: none"));
        assert_eq!(csv(&report).lines().count(), 2);
    }
}
