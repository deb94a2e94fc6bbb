//! Run configuration: names of scenarios and optimization levels, defaults, validation (errors name the
//! field), and the expansion of sweeps into one configuration per task.

use crate::domain::{GraphOptimization, InputShape, JobSpec, RunConfig, Scenario, Sweep};

/// Default cap on the number of tasks one job may expand into.
pub const DEFAULT_MAX_TASKS: usize = 256;

/// A configuration error, naming the offending field.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("{field}: {message}")]
pub struct ConfigError {
    /// Field name as the CLI and job files spell it.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

impl ConfigError {
    /// A new error for `field`.
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            field: field.to_string(),
            message: message.into(),
        }
    }

    /// The same error for a field nested in `parent`, e.g. `config.scenario`.
    pub fn within(self, parent: &str) -> Self {
        Self {
            field: format!("{parent}.{}", self.field),
            message: self.message,
        }
    }
}

/// Scenario by CLI name.
pub fn parse_scenario(s: &str) -> Result<Scenario, ConfigError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "single-stream" | "singlestream" | "single_stream" => Ok(Scenario::SingleStream),
        "offline" => Ok(Scenario::Offline),
        "server" => Ok(Scenario::Server),
        "max-qps" | "maxqps" | "max_qps" => Ok(Scenario::MaxQps),
        other => Err(ConfigError::new(
            "scenario",
            format!(
                "unknown scenario '{other}' (expected single-stream, offline, server or max-qps)"
            ),
        )),
    }
}

/// CLI name of a scenario.
pub fn scenario_name(s: Scenario) -> &'static str {
    match s {
        Scenario::SingleStream => "single-stream",
        Scenario::Offline => "offline",
        Scenario::Server => "server",
        Scenario::MaxQps => "max-qps",
    }
}

/// Graph optimization level by CLI name.
pub fn parse_graph_optimization(s: &str) -> Result<GraphOptimization, ConfigError> {
    match s.trim().to_ascii_lowercase().as_str() {
        "disabled" | "disable" | "none" | "0" => Ok(GraphOptimization::Disabled),
        "basic" | "1" => Ok(GraphOptimization::Basic),
        "extended" | "2" => Ok(GraphOptimization::Extended),
        "all" | "3" | "99" => Ok(GraphOptimization::All),
        other => Err(ConfigError::new(
            "graph_optimization",
            format!("unknown level '{other}' (expected disabled, basic, extended or all)"),
        )),
    }
}

/// CLI name of a graph optimization level.
pub fn graph_optimization_name(g: GraphOptimization) -> &'static str {
    match g {
        GraphOptimization::All => "all",
        GraphOptimization::Disabled => "disabled",
        GraphOptimization::Basic => "basic",
        GraphOptimization::Extended => "extended",
    }
}

/// Execution providers fleetbench knows how to ask for.
pub const EXECUTION_PROVIDERS: &[&str] =
    &["cpu", "cuda", "tensorrt", "openvino", "rocm", "xnnpack"];

/// Normalizes and checks an execution provider name.
pub fn parse_execution_provider(s: &str) -> Result<String, ConfigError> {
    let p = s.trim().to_ascii_lowercase();
    let p = p
        .strip_suffix("executionprovider")
        .unwrap_or(&p)
        .to_string();
    if p.is_empty() {
        return Ok("cpu".to_string());
    }
    if EXECUTION_PROVIDERS.contains(&p.as_str()) {
        Ok(p)
    } else {
        Err(ConfigError::new(
            "execution_provider",
            format!(
                "unknown execution provider '{s}' (expected one of {})",
                EXECUTION_PROVIDERS.join(", ")
            ),
        ))
    }
}

/// Parses `NAME=1x3x224x224` into a shape for one input.
pub fn parse_input_shape(s: &str) -> Result<InputShape, ConfigError> {
    let (name, dims) = s.split_once('=').ok_or_else(|| {
        ConfigError::new(
            "shape",
            format!("'{s}' is not of the form NAME=1x3x224x224"),
        )
    })?;
    let dims = dims
        .split(['x', 'X', ','])
        .map(|d| match d.trim().parse::<i64>() {
            Ok(v) if v > 0 => Ok(v),
            _ => Err(ConfigError::new(
                "shape",
                format!("'{s}': dimension '{d}' is not a positive integer"),
            )),
        })
        .collect::<Result<Vec<_>, _>>()?;
    if name.trim().is_empty() {
        return Err(ConfigError::new("shape", format!("'{s}' names no input")));
    }
    Ok(InputShape {
        name: name.trim().to_string(),
        dims,
    })
}

/// Fills unset fields with fleetbench's defaults.
pub fn with_defaults(mut c: RunConfig) -> RunConfig {
    if c.batch_size == 0 {
        c.batch_size = 1;
    }
    if c.execution_provider.is_empty() {
        c.execution_provider = "cpu".to_string();
    }
    if c.window_ms == 0 {
        c.window_ms = 1000;
    }
    if c.seed == 0 {
        c.seed = 42;
    }
    if c.concurrency == 0 {
        c.concurrency = 1;
    }
    if c.stability_ratio == 0.0 {
        c.stability_ratio = 1.10;
    }
    if c.stability_windows == 0 {
        c.stability_windows = 3;
    }
    if c.max_outstanding == 0 {
        c.max_outstanding = 1024;
    }
    if c.sample_ms == 0 {
        c.sample_ms = 250;
    }
    c
}

/// Checks a configuration; the error names the field.
pub fn validate(c: &RunConfig) -> Result<(), ConfigError> {
    let scenario = c.scenario;
    if c.batch_size == 0 {
        return Err(ConfigError::new("batch_size", "must be at least 1"));
    }
    parse_execution_provider(&c.execution_provider)?;
    if c.iterations == 0
        && c.duration_ms == 0
        && c.max_duration_ms == 0
        && c.min_duration_ms == 0
        && c.min_queries == 0
        && scenario != Scenario::MaxQps
    {
        return Err(ConfigError::new(
            "iterations",
            "must be > 0 (or give a duration or minimums)",
        ));
    }
    // Conflicts a run could never resolve: refused now, naming both settings.
    if c.iterations > 0 && c.min_queries > c.iterations {
        return Err(ConfigError::new(
            "min_queries",
            format!(
                "{} is more than iterations {}: a run of exactly {} queries can never be VALID",
                c.min_queries, c.iterations, c.iterations
            ),
        ));
    }
    if c.max_duration_ms > 0 && c.duration_ms > c.max_duration_ms {
        return Err(ConfigError::new(
            "duration_s",
            format!(
                "{} s is longer than max_duration_s {} s, which caps it",
                c.duration_ms as f64 / 1e3,
                c.max_duration_ms as f64 / 1e3
            ),
        ));
    }
    if c.window_ms < 10 {
        return Err(ConfigError::new(
            "window_ms",
            format!("must be at least 10 ms (got {})", c.window_ms),
        ));
    }
    if !c.target_qps.is_finite() || c.target_qps < 0.0 {
        return Err(ConfigError::new(
            "target_qps",
            format!("must be > 0 (got {})", c.target_qps),
        ));
    }
    if !c.latency_bound_ms.is_finite() || c.latency_bound_ms < 0.0 {
        return Err(ConfigError::new(
            "latency_bound_ms",
            format!("must be > 0 (got {})", c.latency_bound_ms),
        ));
    }
    match scenario {
        Scenario::Server if c.target_qps <= 0.0 => {
            return Err(ConfigError::new(
                "target_qps",
                "the server scenario needs a target QPS > 0",
            ));
        }
        Scenario::MaxQps if c.latency_bound_ms <= 0.0 => {
            return Err(ConfigError::new(
                "latency_bound_ms",
                "the max-qps scenario needs a latency bound > 0",
            ));
        }
        _ => {}
    }
    if c.stability_ratio < 1.0 {
        return Err(ConfigError::new(
            "stability_ratio",
            format!("must be >= 1.0 (got {})", c.stability_ratio),
        ));
    }
    if c.max_duration_ms > 0 && c.min_duration_ms > c.max_duration_ms {
        return Err(ConfigError::new(
            "min_duration_s",
            "is longer than max_duration_s",
        ));
    }
    for s in &c.shapes {
        if s.dims.iter().any(|d| *d <= 0) {
            return Err(ConfigError::new(
                "shape",
                format!("input '{}': dimensions must be positive", s.name),
            ));
        }
    }
    Ok(())
}

/// Expands a job's base configuration and sweep into one configuration per combination, in a stable
/// order, refusing more than `max_tasks_per_variant_agent` combinations.
pub fn expand_sweep(
    base: &RunConfig,
    sw: &Sweep,
    max: usize,
) -> Result<Vec<RunConfig>, ConfigError> {
    fn or_base<T: Clone>(v: &[T], base: T) -> Vec<T> {
        if v.is_empty() { vec![base] } else { v.to_vec() }
    }
    let batches = or_base(&sw.batch_sizes, base.batch_size);
    let concurrency = or_base(&sw.concurrency, base.concurrency);
    let threads = or_base(&sw.intra_op_threads, base.intra_op_threads);
    let opts = or_base(&sw.graph_optimizations, base.graph_optimization);
    let eps = or_base(&sw.execution_providers, base.execution_provider.clone());
    let total = batches.len() * concurrency.len() * threads.len() * opts.len() * eps.len();
    if total > max {
        return Err(ConfigError::new(
            "sweep",
            format!("{total} combinations exceed the cap of {max} tasks; sweep fewer values"),
        ));
    }
    let mut out = Vec::with_capacity(total);
    for ep in &eps {
        for &opt in &opts {
            for &t in &threads {
                for &b in &batches {
                    for &cc in &concurrency {
                        let mut c = base.clone();
                        c.batch_size = b;
                        c.concurrency = cc;
                        c.intra_op_threads = t;
                        c.graph_optimization = opt;
                        c.execution_provider = parse_execution_provider(ep)?;
                        let c = with_defaults(c);
                        validate(&c)?;
                        out.push(c);
                    }
                }
            }
        }
    }
    Ok(out)
}

/// Short readable label of a configuration, e.g. `single-stream b1 t2 all cpu`.
pub fn config_label(c: &RunConfig) -> String {
    let scenario = c.scenario;
    let mut s = format!("{} b{}", scenario_name(scenario), c.batch_size.max(1));
    if c.concurrency > 1 {
        s.push_str(&format!(" c{}", c.concurrency));
    }
    if c.intra_op_threads > 0 {
        s.push_str(&format!(" t{}", c.intra_op_threads));
    }
    let opt = c.graph_optimization;
    if opt != GraphOptimization::All {
        s.push_str(&format!(" opt={}", graph_optimization_name(opt)));
    }
    if !c.execution_provider.is_empty() && c.execution_provider != "cpu" {
        s.push_str(&format!(" {}", c.execution_provider));
    }
    if scenario == Scenario::Server {
        s.push_str(&format!(" {}qps", c.target_qps));
    }
    s
}

/// Checks the parts of a job spec that need no database: model name, variants, configuration, sweep.
pub fn validate_job_spec(spec: &JobSpec, max_tasks: usize) -> Result<Vec<RunConfig>, ConfigError> {
    if spec.model.trim().is_empty() {
        return Err(ConfigError::new("model", "is required"));
    }
    let base = with_defaults(spec.config.clone());
    validate(&base)?;
    expand_sweep(&base, &spec.sweep, max_tasks)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> RunConfig {
        with_defaults(RunConfig {
            iterations: 100,
            ..Default::default()
        })
    }

    #[test]
    fn defaults_validate() {
        validate(&base()).unwrap();
    }

    #[test]
    fn errors_name_the_field() {
        let mut c = base();
        c.iterations = 0;
        assert_eq!(validate(&c).unwrap_err().field, "iterations");
        let mut c = base();
        c.scenario = Scenario::Server;
        assert_eq!(validate(&c).unwrap_err().field, "target_qps");
        c.target_qps = -3.0;
        assert_eq!(validate(&c).unwrap_err().field, "target_qps");
        let mut c = base();
        c.scenario = Scenario::MaxQps;
        assert_eq!(validate(&c).unwrap_err().field, "latency_bound_ms");
        c.latency_bound_ms = -1.0;
        assert_eq!(validate(&c).unwrap_err().field, "latency_bound_ms");
        assert_eq!(parse_scenario("burst").unwrap_err().field, "scenario");
        assert_eq!(
            parse_execution_provider("tpu").unwrap_err().field,
            "execution_provider"
        );
        assert_eq!(parse_input_shape("x=1x0").unwrap_err().field, "shape");
        assert_eq!(parse_input_shape("x").unwrap_err().field, "shape");
    }

    #[test]
    fn conflicts_a_run_cannot_resolve_name_both_settings() {
        let mut c = base();
        c.iterations = 100;
        c.min_queries = 500;
        let e = validate(&c).unwrap_err();
        assert_eq!(e.field, "min_queries");
        assert!(e.message.contains("iterations 100"), "{e}");
        let mut c = base();
        c.iterations = 0;
        c.duration_ms = 10_000;
        c.max_duration_ms = 5_000;
        let e = validate(&c).unwrap_err();
        assert!(
            e.to_string().starts_with("duration_s") && e.message.contains("max_duration_s"),
            "{e}"
        );
        // Minimums alone bound a run.
        let mut c = base();
        c.iterations = 0;
        c.min_duration_ms = 3_000;
        validate(&c).unwrap();
    }

    #[test]
    fn sweeps_expand_to_every_combination_and_respect_the_cap() {
        let sweep = Sweep {
            batch_sizes: vec![1, 8, 32],
            intra_op_threads: vec![1, 2],
            ..Default::default()
        };
        let all = expand_sweep(&base(), &sweep, 256).unwrap();
        assert_eq!(all.len(), 6);
        let mut pairs: Vec<_> = all
            .iter()
            .map(|c| (c.batch_size, c.intra_op_threads))
            .collect();
        pairs.dedup();
        assert_eq!(pairs.len(), 6);
        let err = expand_sweep(&base(), &sweep, 5).unwrap_err();
        assert_eq!(err.field, "sweep");
        assert!(err.message.contains("6 combinations"), "{err}");
    }

    #[test]
    fn shapes_parse() {
        let s = parse_input_shape("pixel_values=1x3x224x224").unwrap();
        assert_eq!(s.name, "pixel_values");
        assert_eq!(s.dims, vec![1, 3, 224, 224]);
    }
}
