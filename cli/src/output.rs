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

/// A duration given in milliseconds, in the unit that suits its size (µs below 1 ms, s from 1 s)
/// with three significant digits: `2.13 µs`, `15.2 ms`, `1.20 s`. JSON keeps raw numbers.
pub fn ms(v: f64) -> String {
    if !v.is_finite() || v <= 0.0 {
        return format!("{v} ms");
    }
    // Rounded to three significant digits before the unit is chosen, so 0.9996 ms reads 1.00 ms,
    // not 1000 µs.
    let scale = 10f64.powf(2.0 - v.log10().floor());
    let v = (v * scale).round() / scale;
    let (value, unit) = if v < 1.0 {
        (v * 1e3, "µs")
    } else if v < 1e3 {
        (v, "ms")
    } else {
        (v / 1e3, "s")
    };
    let digits = (2 - (value * (1.0 + 1e-9)).log10().floor() as i32).clamp(0, 2) as usize;
    format!("{value:.digits$} {unit}")
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
    "TTFT P50",
    "TTFT P99",
    "TPOT P50",
    "TPOT P99",
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
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Writes to standard output; what `outln!` calls. The CLI prints through this rather than
/// `println!` so that the process can leave SIGPIPE ignored, Rust's default, and still end as other
/// Unix tools do when its reader goes away (`fleetbench rank … | head -1`): by SIGPIPE, with no
/// panic and no exit status 101 that a script would misread.
///
/// SIGPIPE stays ignored because the CLI's own sockets need it: hyper and rustls write with
/// `writev`, which (unlike `send`) has no `MSG_NOSIGNAL`, so with SIGPIPE's default action a TLS
/// close_notify written after the coordinator has gone killed the whole process (seen in CI: the
/// quickstart ended by SIGPIPE after printing its last line, while it stopped the coordinator).
pub fn write_stdout(args: std::fmt::Arguments<'_>) {
    use std::io::Write;
    if let Err(e) = std::io::stdout().lock().write_fmt(args) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            end_by_sigpipe();
        }
        panic!("failed printing to stdout: {e}");
    }
}

/// Ends the process by SIGPIPE, as a Unix tool whose output pipe was closed ends.
fn end_by_sigpipe() -> ! {
    // SAFETY: restoring a signal's default action and raising it; the process ends here.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::raise(libc::SIGPIPE);
    }
    // Not reached: SIGPIPE's default action ends the process. 128 + 13 is what a shell would show.
    std::process::exit(141)
}

/// Short id for tables.
pub fn short(id: &str) -> &str {
    &id[..id.len().min(8)]
}

#[cfg(test)]
mod tests {
    #[test]
    fn durations_take_the_unit_that_suits_them_with_three_significant_digits() {
        assert_eq!(super::ms(0.002), "2.00 µs");
        assert_eq!(super::ms(0.0213), "21.3 µs");
        assert_eq!(super::ms(0.5), "500 µs");
        assert_eq!(super::ms(1.5234), "1.52 ms");
        assert_eq!(super::ms(15.24), "15.2 ms");
        assert_eq!(super::ms(152.4), "152 ms");
        assert_eq!(super::ms(1200.0), "1.20 s");
        assert_eq!(super::ms(0.0), "0 ms");
        assert_eq!(super::ms(0.9996), "1.00 ms");
        assert_eq!(super::ms(999.6), "1.00 s");
        assert_eq!(super::ms(0.999), "999 µs");
    }

    #[test]
    fn costs_keep_three_significant_digits() {
        assert_eq!(super::cost(Some(0.0000123)), "0.0000123");
        assert_eq!(super::cost(Some(12.345)), "12.3");
        assert_eq!(super::cost(None), "-");
    }
}
