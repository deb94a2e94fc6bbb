//! Limits on what one job may ask of an agent. A value beyond a limit is refused at submit, naming the
//! setting and the limit, before any agent could take it: an edge box handed `--concurrency 100000` or
//! a tensor of a billion values would never finish, and the next good job would never run.

use crate::config::CoordinatorConfig;
use crate::domain::{RunConfig, Variant};
use crate::error::{Error, Result};

fn over<T: std::fmt::Display + PartialOrd>(
    field: &str,
    value: T,
    limit: T,
    setting: &str,
) -> Result<()> {
    if value > limit {
        return Err(Error::InvalidArgument(format!(
            "{field}: {value} is above the coordinator's limit of {limit} (setting {setting})"
        )));
    }
    Ok(())
}

/// Checks one expanded configuration against the coordinator's limits.
pub fn check(c: &RunConfig, l: &CoordinatorConfig) -> Result<()> {
    over(
        "concurrency",
        c.concurrency,
        l.max_concurrency,
        "max_concurrency",
    )?;
    over(
        "batch_size",
        c.batch_size,
        l.max_batch_size,
        "max_batch_size",
    )?;
    over(
        "iterations",
        c.iterations,
        l.max_iterations,
        "max_iterations",
    )?;
    over(
        "min_queries",
        c.min_queries,
        l.max_iterations,
        "max_iterations",
    )?;
    let secs = |ms: u64| ms as f64 / 1e3;
    for (field, ms) in [
        ("duration_s", c.duration_ms),
        ("min_duration_s", c.min_duration_ms),
        ("max_duration_s", c.max_duration_ms),
    ] {
        over(
            field,
            secs(ms),
            secs(l.max_run_duration_ms),
            "max_run_duration_ms",
        )?;
    }
    over(
        "warmup",
        c.warmup_iterations,
        l.max_warmup_iterations,
        "max_warmup_iterations",
    )?;
    over(
        "target_qps",
        c.target_qps,
        l.max_target_qps,
        "max_target_qps",
    )?;
    over(
        "max_outstanding",
        c.max_outstanding,
        l.max_queries_outstanding,
        "max_queries_outstanding",
    )?;
    if let Some(g) = &c.generate {
        over(
            "request_rate",
            g.request_rate,
            l.max_target_qps,
            "max_target_qps",
        )?;
        // A call holds batch x (prompt + output) tokens at most, in its ids and its mask.
        let batch = u64::from(c.batch_size.max(1));
        let tokens = u64::from(g.prompt_tokens.max) + u64::from(g.output_tokens.max);
        over(
            "prompt_tokens + output_tokens",
            batch.saturating_mul(tokens),
            l.max_input_elements,
            "max_input_elements",
        )?;
    }
    Ok(())
}

/// Checks that no input of `variant` would hold more values per query than the limit, with the
/// configuration's batch size and shapes.
pub fn check_inputs(v: &Variant, c: &RunConfig, l: &CoordinatorConfig) -> Result<()> {
    for input in &v.inputs {
        let dims: Vec<u64> = match c.shapes.iter().find(|s| s.name == input.name) {
            Some(s) => s.dims.iter().map(|d| (*d).max(1) as u64).collect(),
            None => input
                .dims
                .iter()
                .enumerate()
                .map(|(axis, d)| match (axis, *d) {
                    (0, d) if d < 0 => c.batch_size.max(1) as u64,
                    (_, d) => d.max(1) as u64,
                })
                .collect(),
        };
        let values = dims
            .iter()
            .try_fold(1u64, |acc, d| acc.checked_mul(*d))
            .unwrap_or(u64::MAX);
        if values > l.max_input_elements {
            let shape: Vec<String> = dims.iter().map(|d| d.to_string()).collect();
            return Err(Error::InvalidArgument(format!(
                "shape: input '{}' of {}/{} would hold {values} values per query ({}), above the \
                 coordinator's limit of {} (setting max_input_elements)",
                input.name,
                v.model,
                v.variant,
                shape.join("x"),
                l.max_input_elements
            )));
        }
    }
    Ok(())
}
