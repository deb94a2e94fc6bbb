//! Run configuration: names of scenarios and optimization levels, defaults, validation (errors name the
//! field), and the expansion of sweeps into one configuration per task.

use crate::domain::{
    GenerateConfig, GraphOptimization, InputShape, JobSpec, RunConfig, Scenario, Sweep,
    TokenLengths,
};

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
        "generate" => Ok(Scenario::Generate),
        other => Err(ConfigError::new(
            "scenario",
            format!(
                "unknown scenario '{other}' (expected single-stream, offline, server, max-qps or generate)"
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
        Scenario::Generate => "generate",
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

/// Prompt tokens of a generate run when none are given.
pub const DEFAULT_PROMPT_TOKENS: u32 = 128;
/// Output tokens of a generate run when none are given.
pub const DEFAULT_OUTPUT_TOKENS: u32 = 64;

/// Parses token lengths for `field`: `128` (fixed) or `uniform:32-256` (drawn per request, seeded).
pub fn parse_token_lengths(field: &str, s: &str) -> Result<TokenLengths, ConfigError> {
    let t = s.trim();
    let bad = |why: &str| {
        ConfigError::new(
            field,
            format!(
                "'{s}' {why} (expected a count such as 64, or uniform:MIN-MAX such as uniform:32-256)"
            ),
        )
    };
    let count = |v: &str| {
        v.trim()
            .parse::<u32>()
            .map_err(|_| bad("is not a token count"))
    };
    let lengths = match t.strip_prefix("uniform:") {
        Some(range) => {
            let (lo, hi) = range.split_once('-').ok_or_else(|| bad("has no range"))?;
            TokenLengths {
                min: count(lo)?,
                max: count(hi)?,
            }
        }
        None => TokenLengths::fixed(count(t)?),
    };
    check_token_lengths(field, &lengths)?;
    Ok(lengths)
}

/// Readable form of token lengths: `64` or `uniform:32-256`.
pub fn token_lengths_label(t: &TokenLengths) -> String {
    if t.min == t.max {
        t.min.to_string()
    } else {
        format!("uniform:{}-{}", t.min, t.max)
    }
}

fn check_token_lengths(field: &str, t: &TokenLengths) -> Result<(), ConfigError> {
    if t.min == 0 {
        return Err(ConfigError::new(
            field,
            "must be at least 1 token (got 0)".to_string(),
        ));
    }
    if t.max < t.min {
        return Err(ConfigError::new(
            field,
            format!("range {}-{} runs backwards", t.min, t.max),
        ));
    }
    Ok(())
}

/// The SLO terms fleetbench knows, as `--slo` spells them.
pub const SLO_TERMS: &[&str] = &["ttft_ms", "tpot_ms", "e2e_ms"];

/// Parses `ttft_ms=500,tpot_ms=50[,e2e_ms=…]` into `g`'s SLO; each term is a p99 bound in ms.
pub fn parse_slo(s: &str, g: &mut GenerateConfig) -> Result<(), ConfigError> {
    for term in s.split(',').map(str::trim).filter(|t| !t.is_empty()) {
        let (name, value) = term.split_once('=').ok_or_else(|| {
            ConfigError::new(
                "slo",
                format!("'{term}' is not NAME=MS (terms: {})", SLO_TERMS.join(", ")),
            )
        })?;
        let ms: f64 = value
            .trim()
            .parse()
            .ok()
            .filter(|v: &f64| v.is_finite() && *v > 0.0)
            .ok_or_else(|| {
                ConfigError::new(
                    "slo",
                    format!("'{term}': '{value}' is not a positive number of milliseconds"),
                )
            })?;
        match name.trim().to_ascii_lowercase().as_str() {
            "ttft_ms" | "ttft" => g.slo_ttft_ms = ms,
            "tpot_ms" | "tpot" => g.slo_tpot_ms = ms,
            "e2e_ms" | "e2e" => g.slo_e2e_ms = ms,
            other => {
                return Err(ConfigError::new(
                    "slo",
                    format!("unknown term '{other}' (terms: {})", SLO_TERMS.join(", ")),
                ));
            }
        }
    }
    if !g.has_slo() {
        return Err(ConfigError::new("slo", format!("'{s}' sets no term")));
    }
    Ok(())
}

/// Readable form of an SLO, e.g. `ttft_ms=500,tpot_ms=50`; empty without one.
pub fn slo_label(g: &GenerateConfig) -> String {
    [
        ("ttft_ms", g.slo_ttft_ms),
        ("tpot_ms", g.slo_tpot_ms),
        ("e2e_ms", g.slo_e2e_ms),
    ]
    .iter()
    .filter(|(_, v)| *v > 0.0)
    .map(|(n, v)| format!("{n}={v}"))
    .collect::<Vec<_>>()
    .join(",")
}

fn validate_generate(c: &RunConfig) -> Result<(), ConfigError> {
    let Some(g) = &c.generate else {
        return Ok(());
    };
    if c.scenario != Scenario::Generate {
        return Err(ConfigError::new(
            "generate",
            format!(
                "prompt and output tokens, request rate, sampling and SLO belong to the generate scenario, not {}",
                scenario_name(c.scenario)
            ),
        ));
    }
    check_token_lengths("prompt_tokens", &g.prompt_tokens)?;
    check_token_lengths("output_tokens", &g.output_tokens)?;
    if !g.request_rate.is_finite() || g.request_rate < 0.0 {
        return Err(ConfigError::new(
            "request_rate",
            format!("must be > 0 requests/s (got {})", g.request_rate),
        ));
    }
    if !g.temperature.is_finite() || g.temperature < 0.0 {
        return Err(ConfigError::new(
            "temperature",
            format!("must be >= 0 (got {}); 0 picks greedily", g.temperature),
        ));
    }
    if g.top_k > 0 && g.temperature == 0.0 {
        return Err(ConfigError::new(
            "top_k",
            "samples only with a temperature > 0 (greedy decoding takes the top token)",
        ));
    }
    for (name, v) in [
        ("slo.ttft_ms", g.slo_ttft_ms),
        ("slo.tpot_ms", g.slo_tpot_ms),
        ("slo.e2e_ms", g.slo_e2e_ms),
    ] {
        if !v.is_finite() || v < 0.0 {
            return Err(ConfigError::new(name, format!("must be > 0 ms (got {v})")));
        }
    }
    if g.max_rate && g.request_rate > 0.0 {
        return Err(ConfigError::new(
            "request_rate",
            format!(
                "max-rate searches the rate; a request rate of {} as well conflicts with it",
                g.request_rate
            ),
        ));
    }
    if g.max_rate && g.slo_ttft_ms <= 0.0 && g.slo_tpot_ms <= 0.0 && g.slo_e2e_ms <= 0.0 {
        return Err(ConfigError::new(
            "slo",
            "max-rate searches the highest rate that meets an SLO: give --slo (e.g. ttft_ms=500,tpot_ms=50)",
        ));
    }
    if c.batch_size > 1 && g.open_loop() {
        return Err(ConfigError::new(
            "batch_size",
            format!(
                "static batches of {} run in the closed loop (--concurrency); the open loop (--request-rate) \
                 issues requests one by one",
                c.batch_size
            ),
        ));
    }
    if c.batch_size > 1 && !c.iterations.is_multiple_of(u64::from(c.batch_size)) {
        return Err(ConfigError::new(
            "iterations",
            format!(
                "{} requests do not fill whole batches of {}: give a multiple of the batch size",
                c.iterations, c.batch_size
            ),
        ));
    }
    if g.open_loop() && c.latency_bound_ms > 0.0 {
        return Err(ConfigError::new(
            "latency_bound_ms",
            "a generate run is judged by --slo (ttft_ms, tpot_ms, e2e_ms), not by a latency bound",
        ));
    }
    Ok(())
}

/// Why `g`'s longest request does not fit a model of `max_positions` positions, or None.
pub fn position_limit_error(g: &GenerateConfig, max_positions: Option<i64>) -> Option<String> {
    let max = max_positions?;
    let longest = i64::from(g.prompt_tokens.max) + i64::from(g.output_tokens.max);
    (longest > max).then(|| {
        format!(
            "prompt_tokens + output_tokens: up to {} + {} = {longest} tokens exceed the model's {max} positions \
             (max_position_embeddings)",
            g.prompt_tokens.max, g.output_tokens.max
        )
    })
}

/// Why a model with these declared inputs and outputs cannot run the generate scenario, naming what
/// did not match; None when it has `input_ids`, `logits`, and a `present.{i}.key/value` output for
/// every `past_key_values.{i}.key/value` input (or no cache at all).
pub fn decoder_io_error(
    inputs: &[crate::domain::TensorInfo],
    outputs: &[crate::domain::TensorInfo],
) -> Option<String> {
    let has_in = |n: &str| inputs.iter().any(|i| i.name == n);
    let has_out = |n: &str| outputs.iter().any(|o| o.name == n);
    let names = |v: &[crate::domain::TensorInfo]| {
        v.iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut problems = Vec::new();
    if !has_in("input_ids") {
        problems.push(format!("no input 'input_ids' (inputs: {})", names(inputs)));
    }
    if !has_out("logits") {
        problems.push(format!("no output 'logits' (outputs: {})", names(outputs)));
    }
    for i in inputs {
        if let Some(rest) = i.name.strip_prefix("past_key_values.") {
            let present = format!("present.{rest}");
            if !has_out(&present) {
                problems.push(format!("input '{}' has no output '{present}'", i.name));
            }
        }
    }
    (!problems.is_empty()).then(|| {
        format!(
            "not a decoder in the Optimum/onnxruntime-genai convention: {}",
            problems.join("; ")
        )
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
    if c.scenario == Scenario::Generate && c.generate.is_none() {
        c.generate = Some(GenerateConfig {
            prompt_tokens: TokenLengths::fixed(DEFAULT_PROMPT_TOKENS),
            output_tokens: TokenLengths::fixed(DEFAULT_OUTPUT_TOKENS),
            ..Default::default()
        });
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
    validate_generate(c)?;
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
    if let Some(g) = c
        .generate
        .as_ref()
        .filter(|_| scenario == Scenario::Generate)
    {
        s.push_str(&format!(
            " p{} o{}",
            token_lengths_label(&g.prompt_tokens),
            token_lengths_label(&g.output_tokens)
        ));
        if g.request_rate > 0.0 {
            s.push_str(&format!(" {}rps", g.request_rate));
        }
        if g.max_rate {
            s.push_str(" max-rate");
        }
        if g.temperature > 0.0 {
            s.push_str(&format!(" temp={}", g.temperature));
            if g.top_k > 0 {
                s.push_str(&format!(" top{}", g.top_k));
            }
        }
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
    fn a_decoder_without_logits_or_with_unpaired_caches_is_named() {
        let t = |n: &str| crate::domain::TensorInfo {
            name: n.into(),
            ..Default::default()
        };
        let inputs = [
            t("input_ids"),
            t("attention_mask"),
            t("past_key_values.0.key"),
            t("past_key_values.0.value"),
        ];
        let good = [t("logits"), t("present.0.key"), t("present.0.value")];
        assert_eq!(decoder_io_error(&inputs, &good), None);
        let e = decoder_io_error(&inputs, &[t("scores"), t("present.0.key")]).unwrap();
        assert!(
            e.contains("no output 'logits' (outputs: scores, present.0.key)"),
            "{e}"
        );
        assert!(
            e.contains("input 'past_key_values.0.value' has no output 'present.0.value'"),
            "{e}"
        );
        assert!(!e.contains("past_key_values.0.key'"), "{e}");
    }

    #[test]
    fn token_lengths_and_slos_parse_and_bad_ones_name_the_setting() {
        assert_eq!(
            parse_token_lengths("output_tokens", "64").unwrap(),
            TokenLengths::fixed(64)
        );
        assert_eq!(
            parse_token_lengths("prompt_tokens", "uniform:32-256").unwrap(),
            TokenLengths { min: 32, max: 256 }
        );
        for bad in ["0", "-3", "uniform:9", "uniform:0-4", "many"] {
            assert_eq!(
                parse_token_lengths("prompt_tokens", bad).unwrap_err().field,
                "prompt_tokens",
                "{bad}"
            );
        }
        let mut g = GenerateConfig::default();
        parse_slo("ttft_ms=500, tpot_ms=50", &mut g).unwrap();
        assert_eq!((g.slo_ttft_ms, g.slo_tpot_ms), (500.0, 50.0));
        assert_eq!(slo_label(&g), "ttft_ms=500,tpot_ms=50");
        for bad in ["ttft=", "speed=3", "ttft_ms=-1", "", "tpot_ms"] {
            let e = parse_slo(bad, &mut GenerateConfig::default()).unwrap_err();
            assert_eq!(e.field, "slo", "{bad}: {e}");
        }
        // Generate settings on another scenario are refused, naming the scenario.
        let mut c = base();
        c.generate = Some(GenerateConfig::default());
        assert_eq!(validate(&c).unwrap_err().field, "generate");
        let mut c = base();
        c.scenario = Scenario::Generate;
        let c = with_defaults(c);
        validate(&c).unwrap();
        assert_eq!(config_label(&c), "generate b1 p128 o64");
    }

    #[test]
    fn shapes_parse() {
        let s = parse_input_shape("pixel_values=1x3x224x224").unwrap();
        assert_eq!(s.name, "pixel_values");
        assert_eq!(s.dims, vec![1, 3, 224, 224]);
    }
}
