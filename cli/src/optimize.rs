//! `fleetbench models optimize` and `optimize-file`: runs a recipe of the Rust optimizer on a model,
//! calibrates int8-static with ONNX Runtime over a calibration set, and checks that the result loads
//! and runs in ONNX Runtime before anything is stored or written.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use fleetbench_agent::runner::{data, eval, inputs};
use fleetbench_common::proto::onnx::ModelProto;
use fleetbench_optimizer::{Calibration, CalibrationMethod, Outcome, RangeCollector, Recipe};
use ort::session::Session;

/// Options shared by both commands.
#[derive(Debug, Clone, clap::Args)]
pub struct RecipeArgs {
    /// fp16, int8-dynamic, int8-static, int8-weight-only or prune.
    #[arg(long)]
    pub recipe: String,
    /// prune: fraction of weights (or, with --structured, of neurons/channels) removed, in [0, 1).
    #[arg(long)]
    pub sparsity: Option<f64>,
    /// prune: remove whole neurons/channels and shrink the shapes.
    #[arg(long)]
    pub structured: bool,
    /// int8-static: calibration inputs (.npy for a single input, .npz by input name); default: the
    /// model's eval inputs.
    #[arg(long)]
    pub calibration: Option<std::path::PathBuf>,
    /// int8-static: minmax (default) or percentile.
    #[arg(long)]
    pub calibration_method: Option<String>,
    /// int8-static with --calibration-method percentile: the percentile (default 99.99).
    #[arg(long)]
    pub percentile: Option<f64>,
    /// fp16: which ops compute in fp16: cpu (those with fp16 kernels on ONNX Runtime's CPU provider,
    /// the default) or all (for GPU providers).
    #[arg(long)]
    pub fp16_ops: Option<String>,
}

impl RecipeArgs {
    /// The recipe these options describe.
    pub fn recipe(&self) -> Result<Recipe> {
        Ok(Recipe::parse(
            &self.recipe,
            self.sparsity,
            self.structured,
            self.calibration_method.as_deref(),
            self.percentile,
            self.fp16_ops.as_deref(),
        )?)
    }
}

fn runtime() -> Result<&'static fleetbench_agent::runtime::Runtime> {
    fleetbench_agent::runtime::load(None).map_err(|e| anyhow!("{e}"))
}

fn session(bytes: &[u8]) -> Result<Session> {
    let rt = runtime()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    Session::builder(&rt.env)
        .map_err(|e| anyhow!("{e}"))?
        .with_intra_threads(threads)
        .map_err(|e| anyhow!("{e}"))?
        .commit_from_memory(bytes)
        .map_err(|e| anyhow!("{e}"))
}

/// Runs the model over a calibration set and reads the ranges int8-static needs.
pub fn calibrate(
    model: &ModelProto,
    data_path: &Path,
    method: CalibrationMethod,
) -> Result<Calibration> {
    let (augmented, pairs) = fleetbench_optimizer::calibration_model(model)?;
    let mut s = session(&prost::Message::encode_to_vec(&augmented))
        .context("cannot load the model for calibration into ONNX Runtime")?;
    let specs = inputs::input_specs(&s).map_err(|e| anyhow!("{e}"))?;
    let first = specs.first().map(|s| s.name.clone()).unwrap_or_default();
    let arrays = data::read_arrays(data_path, &first)
        .map_err(|e| anyhow!("calibration set {}: {e}", data_path.display()))?;
    let what = format!("calibration set {}", data_path.display());
    let rows = eval::check_rows(&what, &specs, &arrays).map_err(|e| anyhow!("{e}"))?;
    let mut collector = RangeCollector::new(method);
    for (_, n, values) in
        eval::batches(&specs, &arrays, rows).map_err(|e| anyhow!("{what}: {e}"))?
    {
        let views: Vec<ort::session::SessionInputValue<'_>> =
            values.iter().map(Into::into).collect();
        let outputs = s
            .run(views.as_slice())
            .map_err(|e| anyhow!("{what}: the model failed on it: {e}"))?;
        for (tensor, out) in &pairs {
            let v = outputs[out.as_str()]
                .try_extract_array::<f32>()
                .map_err(|e| anyhow!("calibration: tensor '{tensor}' is not float32: {e}"))?;
            match v.as_slice() {
                Some(contiguous) => collector.observe(tensor, contiguous),
                None => collector.observe(tensor, &v.iter().copied().collect::<Vec<_>>()),
            }
        }
        collector.add_samples(n as u64);
    }
    Ok(collector.finish()?)
}

/// Applies the recipe and checks that ONNX Runtime loads the result and runs it on one batch of
/// seeded inputs. Nothing half-done comes out: an error leaves no output.
pub fn optimize(
    model: &[u8],
    args: &RecipeArgs,
    calibration_default: Option<&Path>,
) -> Result<Outcome> {
    let recipe = args.recipe()?;
    if args.calibration.is_some() && !recipe.needs_calibration() {
        bail!(
            "--calibration: does not apply to recipe '{}'",
            recipe.name()
        );
    }
    let decoded = fleetbench_optimizer::decode(model)?;
    let calibration = if let Recipe::Int8Static { method } = &recipe {
        let path = args
            .calibration
            .as_deref()
            .or(calibration_default)
            .ok_or_else(|| anyhow!("--calibration: int8-static needs a calibration set (the model has no eval inputs to use instead)"))?;
        Some(calibrate(&decoded, path, *method)?)
    } else {
        None
    };
    let outcome = fleetbench_optimizer::optimize(
        &decoded,
        model.len() as u64,
        &recipe,
        calibration.as_ref(),
    )?;
    verify(&outcome.encode()).with_context(|| {
        format!(
            "the {} variant does not run in ONNX Runtime; nothing was stored",
            recipe.name()
        )
    })?;
    Ok(outcome)
}

/// Loads a model and runs it once on seeded inputs (symbolic dims set to 1).
pub fn verify(bytes: &[u8]) -> Result<()> {
    let mut s = session(bytes)?;
    let specs = inputs::input_specs(&s).map_err(|e| anyhow!("{e}"))?;
    let config = fleetbench_proto::v1::RunConfig::default();
    let values = inputs::build_inputs(&specs, &config, 1, None, 1).map_err(|e| anyhow!("{e}"))?;
    let views: Vec<ort::session::SessionInputValue<'_>> = values.iter().map(Into::into).collect();
    s.run(views.as_slice()).map_err(|e| anyhow!("{e}"))?;
    Ok(())
}

/// Lineage record stored with the variant.
pub fn recipe_json(recipe: &Recipe, outcome: &Outcome, base_sha: &str) -> String {
    serde_json::json!({
        "recipe": recipe,
        "tool": fleetbench_optimizer::TOOL,
        "base_sha256": base_sha,
        "rewritten": outcome.report.rewritten.len(),
        "skipped": outcome.report.skipped,
        "notes": outcome.report.notes,
    })
    .to_string()
}
