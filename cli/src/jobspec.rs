//! Job options shared by `jobs submit` flags and TOML job files (`-f job.toml`, same names with
//! underscores; lists or single values). Flags override the file.

use std::path::PathBuf;

use anyhow::{Result, bail};
use fleetbench_common::config::{
    DEFAULT_OUTPUT_TOKENS, DEFAULT_PROMPT_TOKENS, parse_execution_provider,
    parse_graph_optimization, parse_input_shape, parse_scenario, parse_slo, parse_token_lengths,
    validate_job_spec,
};
use fleetbench_common::domain::{
    GenerateConfig, JobSpec, RunConfig, Scenario, Sweep, TokenLengths,
};
use fleetbench_common::labels::parse_labels;
use serde::{Deserialize, Deserializer};

/// Accepts `x = 8` as well as `x = [1, 8]` in job files.
fn one_or_many<'de, D, T>(d: D) -> std::result::Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany<T> {
        One(T),
        Many(Vec<T>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(v) => vec![v],
        OneOrMany::Many(v) => v,
    })
}

/// Accepts `output_tokens = 64` as well as `output_tokens = "uniform:32-64"` in job files.
fn string_or_number<'de, D>(d: D) -> std::result::Result<Option<String>, D::Error>
where
    D: Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum StringOrNumber {
        Text(String),
        Int(i64),
        Float(f64),
    }
    Ok(Option::<StringOrNumber>::deserialize(d)?.map(|v| match v {
        StringOrNumber::Text(s) => s,
        StringOrNumber::Int(i) => i.to_string(),
        StringOrNumber::Float(f) => f.to_string(),
    }))
}

/// What to benchmark and how. Every field is a flag of `jobs submit` and a key of a job file.
#[derive(Debug, Clone, Default, clap::Args, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct JobArgs {
    /// Model name.
    #[arg(long)]
    pub model: Option<String>,
    /// Variants to run: names separated by commas, or "all".
    #[arg(long, value_delimiter = ',')]
    #[serde(deserialize_with = "one_or_many")]
    pub variants: Vec<String>,
    /// Agents to run on: label key=value; repeatable; all must match.
    #[arg(long = "selector", value_delimiter = ',')]
    #[serde(deserialize_with = "one_or_many")]
    pub selector: Vec<String>,
    /// A name for the job.
    #[arg(long)]
    pub name: Option<String>,
    /// single-stream, offline, server, max-qps or generate.
    #[arg(long)]
    pub scenario: Option<String>,
    /// Generate: prompt tokens per request, a count (128) or uniform:MIN-MAX drawn per request
    /// (default 128).
    #[arg(long)]
    #[serde(deserialize_with = "string_or_number")]
    pub prompt_tokens: Option<String>,
    /// Generate: output tokens per request, a count (64) or uniform:MIN-MAX; every request makes
    /// exactly this many (default 64).
    #[arg(long)]
    #[serde(deserialize_with = "string_or_number")]
    pub output_tokens: Option<String>,
    /// Generate: open loop at this many requests per second (seeded Poisson arrivals; TTFT and E2E
    /// from each request's scheduled arrival), or `max`: the highest rate whose p99s meet --slo,
    /// found by bisection. Without it, a closed loop of --concurrency streams.
    #[arg(long, allow_hyphen_values = true)]
    #[serde(deserialize_with = "string_or_number")]
    pub request_rate: Option<String>,
    /// Generate: sampling temperature (default 0: greedy).
    #[arg(long, allow_hyphen_values = true)]
    pub temperature: Option<f64>,
    /// Generate: sample among the k most likely tokens (with --temperature).
    #[arg(long)]
    pub top_k: Option<u32>,
    /// Generate: service-level objective as p99 bounds, e.g. ttft_ms=500,tpot_ms=50[,e2e_ms=2000];
    /// goodput counts the requests that meet every term, and a run is VALID only when the p99s do.
    #[arg(long)]
    pub slo: Option<String>,
    /// Exact number of timed queries per run. Without it a run lasts until --duration-s (if given),
    /// --min-duration-s and --min-queries all hold, capped by --max-duration-s; with none of these,
    /// it is 1000 queries.
    #[arg(long, allow_hyphen_values = true)]
    pub iterations: Option<i64>,
    /// Timed phase length in seconds, instead of an iteration count.
    #[arg(long, allow_hyphen_values = true)]
    pub duration_s: Option<f64>,
    /// Samples per query; several values sweep (e.g. 1,8,32).
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    #[serde(deserialize_with = "one_or_many")]
    pub batch_size: Vec<i64>,
    /// Concurrent sessions (offline scenario); several values sweep.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    #[serde(deserialize_with = "one_or_many")]
    pub concurrency: Vec<i64>,
    /// Intra-op threads (0 = all CPUs of the agent); several values sweep.
    #[arg(long, value_delimiter = ',', allow_hyphen_values = true)]
    #[serde(deserialize_with = "one_or_many")]
    pub threads: Vec<i64>,
    /// Graph optimization level: disabled, basic, extended, all; several values sweep.
    #[arg(long, value_delimiter = ',')]
    #[serde(deserialize_with = "one_or_many")]
    pub graph_opt: Vec<String>,
    /// Execution provider: cpu, cuda, tensorrt, openvino, rocm, xnnpack; several values sweep.
    #[arg(long = "ep", value_delimiter = ',')]
    #[serde(deserialize_with = "one_or_many", alias = "execution_provider")]
    pub ep: Vec<String>,
    /// Untimed warm-up queries before each run (default 100).
    #[arg(long)]
    pub warmup: Option<u64>,
    /// Seed for random inputs and arrival schedules.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Concrete shape of an input with symbolic dimensions, NAME=1x3x224x224; repeatable.
    #[arg(long = "shape")]
    #[serde(deserialize_with = "one_or_many", alias = "shapes")]
    pub shape: Vec<String>,
    /// Real inputs: a .npz mapping input names to arrays (instead of random data).
    #[arg(long)]
    pub input_data: Option<PathBuf>,
    /// Telemetry window length, milliseconds (default 1000).
    #[arg(long)]
    pub window_ms: Option<u32>,
    /// Minimum queries per telemetry window.
    #[arg(long)]
    pub window_min_queries: Option<u32>,
    /// Target queries per second (server scenario).
    #[arg(long, allow_hyphen_values = true)]
    pub target_qps: Option<f64>,
    /// Latency bound in milliseconds (server pass/fail, max-qps search).
    #[arg(long, allow_hyphen_values = true)]
    pub latency_bound_ms: Option<f64>,
    /// Minimum timed duration for a VALID run, seconds.
    #[arg(long, allow_hyphen_values = true)]
    pub min_duration_s: Option<f64>,
    /// Minimum timed queries for a VALID run.
    #[arg(long)]
    pub min_queries: Option<u64>,
    /// Maximum timed duration, seconds: a run still going then stops, and is INVALID when its minimums
    /// did not hold by then.
    #[arg(long, allow_hyphen_values = true)]
    pub max_duration_s: Option<f64>,
    /// Stop as soon as the run is VALID and stable (time-bounded runs).
    #[arg(long)]
    #[serde(default)]
    pub early_stop: bool,
    /// Stability threshold: max/min over the last windows (default 1.10).
    #[arg(long)]
    pub stability_ratio: Option<f64>,
    /// Most outstanding queries in the server scenario before new ones are dropped.
    #[arg(long)]
    pub max_outstanding: Option<u32>,
    /// Skip the accuracy pass.
    #[arg(long)]
    #[serde(default)]
    pub skip_accuracy: bool,
}

fn pick<T>(flag: Option<T>, file: Option<T>) -> Option<T> {
    flag.or(file)
}

fn pick_vec<T>(flag: Vec<T>, file: Vec<T>) -> Vec<T> {
    if flag.is_empty() { file } else { flag }
}

fn seconds_to_ms(field: &str, v: Option<f64>) -> Result<u64> {
    match v {
        None => Ok(0),
        Some(s) if s.is_finite() && s > 0.0 => Ok((s * 1000.0).round() as u64),
        Some(s) => bail!("{field}: must be > 0 seconds (got {s})"),
    }
}

fn positive_list(field: &str, values: &[i64], allow_zero: bool) -> Result<Vec<u32>> {
    values
        .iter()
        .map(|v| {
            if *v < 0 || (*v == 0 && !allow_zero) || *v > u32::MAX as i64 {
                bail!(
                    "{field}: must be {} (got {v})",
                    if allow_zero { ">= 0" } else { "> 0" }
                )
            }
            Ok(*v as u32)
        })
        .collect()
}

impl JobArgs {
    /// Reads a TOML job file.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| anyhow::anyhow!("cannot read job file {}: {e}", path.display()))?;
        toml::from_str(&text).map_err(|e| anyhow::anyhow!("job file {}: {e}", path.display()))
    }

    /// These flags over a file's values.
    pub fn over(self, file: JobArgs) -> JobArgs {
        JobArgs {
            model: pick(self.model, file.model),
            variants: pick_vec(self.variants, file.variants),
            selector: pick_vec(self.selector, file.selector),
            name: pick(self.name, file.name),
            scenario: pick(self.scenario, file.scenario),
            prompt_tokens: pick(self.prompt_tokens, file.prompt_tokens),
            output_tokens: pick(self.output_tokens, file.output_tokens),
            request_rate: pick(self.request_rate, file.request_rate),
            temperature: pick(self.temperature, file.temperature),
            top_k: pick(self.top_k, file.top_k),
            slo: pick(self.slo, file.slo),
            iterations: pick(self.iterations, file.iterations),
            duration_s: pick(self.duration_s, file.duration_s),
            batch_size: pick_vec(self.batch_size, file.batch_size),
            concurrency: pick_vec(self.concurrency, file.concurrency),
            threads: pick_vec(self.threads, file.threads),
            graph_opt: pick_vec(self.graph_opt, file.graph_opt),
            ep: pick_vec(self.ep, file.ep),
            warmup: pick(self.warmup, file.warmup),
            seed: pick(self.seed, file.seed),
            shape: pick_vec(self.shape, file.shape),
            input_data: pick(self.input_data, file.input_data),
            window_ms: pick(self.window_ms, file.window_ms),
            window_min_queries: pick(self.window_min_queries, file.window_min_queries),
            target_qps: pick(self.target_qps, file.target_qps),
            latency_bound_ms: pick(self.latency_bound_ms, file.latency_bound_ms),
            min_duration_s: pick(self.min_duration_s, file.min_duration_s),
            min_queries: pick(self.min_queries, file.min_queries),
            max_duration_s: pick(self.max_duration_s, file.max_duration_s),
            early_stop: self.early_stop || file.early_stop,
            stability_ratio: pick(self.stability_ratio, file.stability_ratio),
            max_outstanding: pick(self.max_outstanding, file.max_outstanding),
            skip_accuracy: self.skip_accuracy || file.skip_accuracy,
        }
    }

    /// The generate scenario's parameters, or None for another scenario (refusing its flags there).
    fn generate_config(&self, scenario: Scenario) -> Result<Option<GenerateConfig>> {
        let given = [
            ("prompt_tokens", self.prompt_tokens.is_some()),
            ("output_tokens", self.output_tokens.is_some()),
            ("request_rate", self.request_rate.is_some()),
            ("temperature", self.temperature.is_some()),
            ("top_k", self.top_k.is_some()),
            ("slo", self.slo.is_some()),
        ];
        if scenario != Scenario::Generate {
            if let Some((name, _)) = given.iter().find(|(_, set)| *set) {
                bail!("{name}: belongs to --scenario generate");
            }
            return Ok(None);
        }
        let lengths = |field: &str, v: &Option<String>, default: u32| match v {
            Some(s) => parse_token_lengths(field, s),
            None => Ok(TokenLengths::fixed(default)),
        };
        let mut g = GenerateConfig {
            prompt_tokens: lengths("prompt_tokens", &self.prompt_tokens, DEFAULT_PROMPT_TOKENS)?,
            output_tokens: lengths("output_tokens", &self.output_tokens, DEFAULT_OUTPUT_TOKENS)?,
            request_rate: match self.request_rate.as_deref().map(str::trim) {
                None | Some("max") => 0.0,
                Some(r) => match r.parse::<f64>() {
                    Ok(v) if v.is_finite() && v > 0.0 => v,
                    _ => bail!("request_rate: must be > 0 requests/s, or max (got {r})"),
                },
            },
            max_rate: self.request_rate.as_deref().map(str::trim) == Some("max"),
            temperature: self.temperature.unwrap_or(0.0),
            top_k: self.top_k.unwrap_or(0),
            ..Default::default()
        };
        if let Some(slo) = &self.slo {
            parse_slo(slo, &mut g)?;
        }
        Ok(Some(g))
    }

    /// The job spec (without uploaded input data), validated with the coordinator's rules.
    pub fn to_spec(&self, max_tasks: usize) -> Result<JobSpec> {
        let Some(model) = self.model.clone().filter(|m| !m.trim().is_empty()) else {
            bail!("model: --model is required (or `model = \"...\"` in the job file)");
        };
        let scenario = match &self.scenario {
            Some(s) => parse_scenario(s)?,
            None => Scenario::SingleStream,
        };
        let iterations = match self.iterations {
            Some(n) if n <= 0 => bail!("iterations: must be > 0 (got {n})"),
            Some(n) => n as u64,
            None => 0,
        };
        let duration_ms = seconds_to_ms("duration_s", self.duration_s)?;
        let max_duration_ms = seconds_to_ms("max_duration_s", self.max_duration_s)?;
        let min_duration_ms = seconds_to_ms("min_duration_s", self.min_duration_s)?;
        let generate = self.generate_config(scenario)?;
        let batches = positive_list("batch_size", &self.batch_size, false)?;
        // Without an exact count, the duration and the minimums decide how long a run lasts; with
        // none of them, a run is 1000 queries (100 requests when generating).
        let iterations = if iterations == 0
            && duration_ms == 0
            && min_duration_ms == 0
            && self.min_queries.unwrap_or(0) == 0
            && scenario != Scenario::MaxQps
        {
            if generate.is_some() {
                // Whole static batches of every batch size swept.
                let lcm = batches.iter().fold(1u64, |l, &b| {
                    let b = u64::from(b.max(1));
                    let gcd = |mut a: u64, mut b: u64| {
                        while b != 0 {
                            (a, b) = (b, a % b);
                        }
                        a
                    };
                    l / gcd(l, b) * b
                });
                100u64.div_ceil(lcm) * lcm
            } else {
                1000
            }
        } else {
            iterations
        };
        let concurrency = positive_list("concurrency", &self.concurrency, false)?;
        let threads = positive_list("threads", &self.threads, true)?;
        let opts = self
            .graph_opt
            .iter()
            .map(|g| parse_graph_optimization(g))
            .collect::<Result<Vec<_>, _>>()?;
        let eps = self
            .ep
            .iter()
            .map(|e| parse_execution_provider(e))
            .collect::<Result<Vec<_>, _>>()?;
        let shapes = self
            .shape
            .iter()
            .map(|s| parse_input_shape(s))
            .collect::<Result<Vec<_>, _>>()?;
        let selector =
            parse_labels(&self.selector).map_err(|e| anyhow::anyhow!("selector: {e}"))?;
        let config = RunConfig {
            batch_size: batches.first().copied().unwrap_or(1),
            intra_op_threads: threads.first().copied().unwrap_or(0),
            graph_optimization: opts.first().copied().unwrap_or_default(),
            execution_provider: eps.first().cloned().unwrap_or_default(),
            iterations,
            duration_ms,
            warmup_iterations: self
                .warmup
                .unwrap_or(if generate.is_some() { 2 } else { 100 }),
            seed: self.seed.unwrap_or(0),
            shapes,
            input_data_sha256: String::new(),
            window_ms: self.window_ms.unwrap_or(0),
            window_min_queries: self.window_min_queries.unwrap_or(0),
            scenario,
            concurrency: concurrency.first().copied().unwrap_or(0),
            target_qps: self.target_qps.unwrap_or(0.0),
            latency_bound_ms: self.latency_bound_ms.unwrap_or(0.0),
            min_duration_ms,
            min_queries: self.min_queries.unwrap_or(0),
            max_duration_ms,
            early_stop: self.early_stop,
            stability_ratio: self.stability_ratio.unwrap_or(0.0),
            stability_windows: 0,
            max_outstanding: self.max_outstanding.unwrap_or(0),
            skip_accuracy: self.skip_accuracy,
            sample_ms: 0,
            generate,
        };
        if let Some(g) = &config.generate
            && g.open_loop()
            && concurrency.len() > 1
        {
            bail!(
                "concurrency: an open loop's load is its --request-rate; --concurrency only caps the streams \
                 serving it, so sweep one or the other, not both"
            );
        }
        if config.generate.is_some() && config.target_qps > 0.0 {
            bail!(
                "target_qps: the generate scenario's load is --request-rate (requests per second), not --target-qps"
            );
        }
        let many = |n: usize| n > 1;
        let sweep = Sweep {
            batch_sizes: if many(batches.len()) { batches } else { vec![] },
            concurrency: if many(concurrency.len()) {
                concurrency
            } else {
                vec![]
            },
            intra_op_threads: if many(threads.len()) { threads } else { vec![] },
            graph_optimizations: if many(opts.len()) { opts } else { vec![] },
            execution_providers: if many(eps.len()) { eps } else { vec![] },
        };
        let spec = JobSpec {
            model,
            variants: self.variants.clone(),
            selector,
            config,
            sweep,
            name: self.name.clone().unwrap_or_default(),
        };
        validate_job_spec(&spec, max_tasks)?;
        Ok(spec)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(model: &str) -> JobArgs {
        JobArgs {
            model: Some(model.into()),
            ..Default::default()
        }
    }

    #[test]
    fn defaults_and_sweeps() {
        let mut a = args("digits");
        a.batch_size = vec![1, 8];
        let spec = a.to_spec(256).unwrap();
        assert_eq!(spec.config.iterations, 1000);
        assert_eq!(spec.sweep.batch_sizes, vec![1, 8]);
    }

    #[test]
    fn bad_values_are_named() {
        let mut a = args("digits");
        a.iterations = Some(-5);
        assert!(
            a.to_spec(256)
                .unwrap_err()
                .to_string()
                .starts_with("iterations")
        );
        let mut a = args("digits");
        a.iterations = Some(0);
        assert!(
            a.to_spec(256)
                .unwrap_err()
                .to_string()
                .starts_with("iterations")
        );
        let mut a = args("digits");
        a.scenario = Some("burst".into());
        assert!(
            a.to_spec(256)
                .unwrap_err()
                .to_string()
                .starts_with("scenario")
        );
        let mut a = args("digits");
        a.scenario = Some("server".into());
        a.target_qps = Some(0.0);
        assert!(
            a.to_spec(256)
                .unwrap_err()
                .to_string()
                .starts_with("target_qps")
        );
        let mut a = args("digits");
        a.batch_size = vec![0];
        assert!(
            a.to_spec(256)
                .unwrap_err()
                .to_string()
                .starts_with("batch_size")
        );
        assert!(
            JobArgs::default()
                .to_spec(256)
                .unwrap_err()
                .to_string()
                .starts_with("model")
        );
    }

    #[test]
    fn generate_flags_parse_and_bad_ones_are_named() {
        let mut a = args("tiny-llama");
        a.scenario = Some("generate".into());
        a.prompt_tokens = Some("uniform:32-256".into());
        a.slo = Some("ttft_ms=500,tpot_ms=50".into());
        a.request_rate = Some("2".into());
        let spec = a.to_spec(256).unwrap();
        let g = spec.config.generate.clone().unwrap();
        assert_eq!((g.prompt_tokens.min, g.prompt_tokens.max), (32, 256));
        assert_eq!((g.output_tokens.min, g.output_tokens.max), (64, 64));
        assert_eq!(
            (g.slo_ttft_ms, g.slo_tpot_ms, g.slo_e2e_ms),
            (500.0, 50.0, 0.0)
        );
        assert_eq!(spec.config.iterations, 100);
        let field = |a: JobArgs| a.to_spec(256).unwrap_err().to_string();
        let generate = || {
            let mut a = args("tiny-llama");
            a.scenario = Some("generate".into());
            a
        };
        let mut a = generate();
        a.output_tokens = Some("0".into());
        assert!(field(a).starts_with("output_tokens: must be at least 1"));
        let mut a = generate();
        a.prompt_tokens = Some("uniform:64-8".into());
        assert!(field(a).starts_with("prompt_tokens"));
        let mut a = generate();
        a.slo = Some("ttft_ms=500,latency=3".into());
        let e = field(a);
        assert!(e.starts_with("slo: unknown term 'latency'"), "{e}");
        let mut a = generate();
        a.slo = Some("ttft_ms=fast".into());
        assert!(field(a).starts_with("slo"));
        let mut a = generate();
        a.request_rate = Some("2".into());
        a.concurrency = vec![1, 4];
        assert!(field(a).starts_with("concurrency"));
        let mut a = generate();
        a.batch_size = vec![4];
        a.request_rate = Some("2".into());
        assert!(field(a).starts_with("batch_size: static batches of 4 run in the closed loop"));
        let mut a = generate();
        a.batch_size = vec![3];
        a.iterations = Some(100);
        assert!(field(a).starts_with("iterations: 100 requests do not fill whole batches of 3"));
        // Without --iterations, the default fills whole batches of every size swept.
        let mut a = generate();
        a.batch_size = vec![3, 4];
        assert_eq!(a.to_spec(256).unwrap().config.iterations, 108);
        let mut a = generate();
        a.batch_size = vec![1, 4];
        assert_eq!(a.to_spec(256).unwrap().sweep.batch_sizes, vec![1, 4]);
        let mut a = generate();
        a.top_k = Some(40);
        assert!(field(a).starts_with("top_k"));
        let mut a = generate();
        a.request_rate = Some("max".into());
        assert!(field(a).starts_with("slo: max-rate searches"));
        let mut a = generate();
        a.request_rate = Some("fast".into());
        assert!(field(a).starts_with("request_rate"));
        let mut a = generate();
        a.request_rate = Some("max".into());
        a.slo = Some("ttft_ms=500".into());
        let g = a.to_spec(256).unwrap().config.generate.unwrap();
        assert!(g.max_rate && g.request_rate == 0.0);
        let mut a = args("digits");
        a.output_tokens = Some("64".into());
        assert!(field(a).starts_with("output_tokens: belongs to --scenario generate"));
    }

    #[test]
    fn job_files_give_token_counts_and_rates_as_numbers_or_strings() {
        let file: JobArgs = toml::from_str(
            "model = \"tiny-llama\"\nscenario = \"generate\"\noutput_tokens = 64\nprompt_tokens = \"uniform:8-32\"\nrequest_rate = 2.5\n",
        )
        .unwrap();
        let g = file.to_spec(256).unwrap().config.generate.unwrap();
        assert_eq!(
            (g.output_tokens.min, g.prompt_tokens.max, g.request_rate),
            (64, 32, 2.5)
        );
    }

    #[test]
    fn job_files_accept_single_values_and_lists_and_flags_win() {
        let file: JobArgs = toml::from_str(
            "model = \"digits\"\nvariants = \"all\"\nbatch_size = [1, 8]\nthreads = 1\nselector = \"tier=edge\"\niterations = 500\n",
        )
        .unwrap();
        let flags = JobArgs {
            iterations: Some(700),
            ..Default::default()
        };
        let merged = flags.over(file);
        let spec = merged.to_spec(256).unwrap();
        assert_eq!(spec.config.iterations, 700);
        assert_eq!(spec.config.intra_op_threads, 1);
        assert_eq!(spec.selector.get("tier").map(String::as_str), Some("edge"));
        assert!(toml::from_str::<JobArgs>("modle = \"x\"").is_err());
    }
}

#[cfg(test)]
mod parsing_outside_text {
    use proptest::prelude::*;

    use super::JobArgs;

    const KEYS: &[&str] = &[
        "model",
        "variants",
        "selector",
        "scenario",
        "iterations",
        "duration_s",
        "batch_size",
        "concurrency",
        "threads",
        "graph_opt",
        "ep",
        "warmup",
        "seed",
        "shape",
        "window_ms",
        "target_qps",
        "latency_bound_ms",
        "min_duration_s",
        "min_queries",
        "max_duration_s",
        "early_stop",
        "stability_ratio",
        "max_outstanding",
        "skip_accuracy",
    ];

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            any::<i64>().prop_map(|v| v.to_string()),
            any::<f64>().prop_map(|v| format!("{v:?}")),
            "[a-z0-9=x,. -]{0,12}".prop_map(|s| format!("{s:?}")),
            proptest::collection::vec(any::<i32>(), 0..4).prop_map(|v| format!("{v:?}")),
            any::<bool>().prop_map(|b| b.to_string()),
        ]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        /// Any text as a job file: an error or a spec, never a panic.
        #[test]
        fn any_text_parses_or_fails_cleanly(text in "\\PC{0,200}") {
            if let Ok(a) = toml::from_str::<JobArgs>(&text) {
                let _ = a.to_spec(256);
            }
        }

        /// Job files of real keys with values of any type and size: the same.
        #[test]
        fn real_keys_with_any_values_parse_or_fail_cleanly(
            entries in proptest::collection::vec((0..KEYS.len(), value()), 0..10),
        ) {
            let mut text = String::new();
            let mut seen = std::collections::HashSet::new();
            for (k, v) in entries {
                if seen.insert(k) {
                    text.push_str(&format!("{} = {v}\n", KEYS[k]));
                }
            }
            if let Ok(a) = toml::from_str::<JobArgs>(&text) {
                let _ = a.to_spec(256);
            }
        }
    }
}
