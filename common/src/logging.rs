//! Log output of the daemons: text for people, or JSON lines (one object per event, with the fields
//! of the spans it happened in) for log pipelines.

use std::str::FromStr;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// Human-readable lines (colours only on a terminal).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, `fields` and `spans`.
    Json,
}

impl FromStr for LogFormat {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "text" => Ok(LogFormat::Text),
            "json" => Ok(LogFormat::Json),
            other => Err(format!("log format '{other}': use text or json")),
        }
    }
}

/// Installs the global subscriber writing to stderr, filtered by RUST_LOG or else `default_filter`.
pub fn init(format: LogFormat, default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| default_filter.into());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        // Colours only on a terminal: a log file or the journal gets plain text.
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        LogFormat::Json => builder
            .json()
            .with_current_span(true)
            .with_span_list(true)
            .init(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_format_parses_or_names_the_choices() {
        assert_eq!("json".parse(), Ok(super::LogFormat::Json));
        assert_eq!("text".parse(), Ok(super::LogFormat::Text));
        let err = "yaml".parse::<super::LogFormat>().unwrap_err();
        assert!(err.contains("text or json"), "{err}");
    }
}
