//! Output helpers: tables for people, JSON for programs.

use comfy_table::presets::UTF8_FULL_CONDENSED;
use comfy_table::{ContentArrangement, Table};

/// How a command prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    /// Aligned table.
    #[default]
    Table,
    /// JSON.
    Json,
}

/// A table with the project's style.
pub fn table(header: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_FULL_CONDENSED)
        .set_content_arrangement(ContentArrangement::Dynamic)
        .set_header(header);
    t
}

/// Milliseconds with sensible precision (µs resolution below 10 ms).
pub fn ms(v: f64) -> String {
    if v < 10.0 {
        format!("{v:.3}")
    } else if v < 1000.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.0}")
    }
}

/// A number of samples per second.
pub fn rate(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

/// Accuracy as a percentage, or a dash.
pub fn pct(v: Option<f64>) -> String {
    v.map(|a| format!("{:.2} %", a * 100.0))
        .unwrap_or_else(|| "-".into())
}

/// Bytes as KiB/MiB/GiB.
pub fn bytes(b: u64) -> String {
    let b = b as f64;
    if b >= (1u64 << 30) as f64 {
        format!("{:.1} GiB", b / (1u64 << 30) as f64)
    } else if b >= (1 << 20) as f64 {
        format!("{:.1} MiB", b / (1 << 20) as f64)
    } else {
        format!("{:.0} KiB", b / 1024.0)
    }
}

/// A cost with three significant digits, or a dash.
pub fn cost(v: Option<f64>) -> String {
    match v {
        Some(c) if c > 0.0 => {
            let digits = (2 - c.log10().floor() as i32).max(0) as usize;
            format!("{c:.digits$}")
        }
        Some(c) => format!("{c}"),
        None => "-".into(),
    }
}

/// The header of the token-figure columns of a generate run or row.
pub const TOKEN_HEADER: &[&str] = &[
    "TTFT P50 ms",
    "TTFT P99 ms",
    "TPOT P50 ms",
    "TPOT P99 ms",
    "TOKENS/S",
    "REQ/S",
    "GOODPUT/S",
    "COST/1M TOK",
];

/// The token-figure cells of a generate run or row, in [`TOKEN_HEADER`]'s order.
pub fn token_cells(g: &fleetbench_proto::v1::GenerationStats) -> Vec<String> {
    let ttft = g.ttft.unwrap_or_default();
    let tpot = g.tpot.unwrap_or_default();
    vec![
        ms(ttft.p50_ms),
        ms(ttft.p99_ms),
        ms(tpot.p50_ms),
        ms(tpot.p99_ms),
        rate(g.output_tokens_per_s),
        rate(g.requests_per_s),
        rate(g.goodput_per_s),
        cost(g.cost_per_million_tokens),
    ]
}

/// Prints a value as pretty JSON.
pub fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Short id for tables.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}
