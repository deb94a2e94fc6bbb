//! `fleetbench models optimize` and `optimize-file`: runs a recipe of the Rust optimizer on a model,
//! calibrates int8-static with ONNX Runtime over a calibration set, and checks that the result loads
//! and runs in ONNX Runtime before anything is stored or written.

use std::path::Path;

use anyhow::{Context, Result, anyhow, bail};
use fleetbench_common::domain::InputShape;
use fleetbench_common::proto::onnx::ModelProto;
use fleetbench_optimizer::{Calibration, CalibrationMethod, Outcome, RangeCollector, Recipe};
use fleetbench_runtime::{batches, data, inputs};
use ort::session::Session;

/// Options shared by both commands.
#[derive(Debug, Clone, clap::Args)]
pub struct RecipeArgs {
    /// fp16, int8-dynamic, int8-static, int8-weight-only, int4-weight-only or prune.
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
    /// int4-weight-only: weights per block along K: 16, 32 (default), 64, 128 or 256.
    #[arg(long)]
    pub block_size: Option<u32>,
    /// int4-weight-only: symmetric blocks (no zero points) instead of min/max with zero points.
    #[arg(long)]
    pub symmetric: bool,
    /// int4-weight-only: MatMulNBits' accuracy_level (0 unset: float compute; 4: int8 compute).
    #[arg(long)]
    pub accuracy_level: Option<u32>,
    /// Concrete shape of an input with symbolic dimensions for the check run, NAME=1x3x224x224;
    /// repeatable. Without it, symbolic dimensions are 1 (and the report says so).
    #[arg(long = "shape")]
    pub shape: Vec<String>,
}

impl RecipeArgs {
    /// Recipe `name` with every option at its default.
    pub fn named(name: &str) -> Self {
        RecipeArgs {
            recipe: name.into(),
            sparsity: None,
            structured: false,
            calibration: None,
            calibration_method: None,
            percentile: None,
            fp16_ops: None,
            block_size: None,
            symmetric: false,
            accuracy_level: None,
            shape: Vec::new(),
        }
    }

    /// The recipe these options describe.
    pub fn recipe(&self) -> Result<Recipe> {
        Ok(Recipe::parse(
            &self.recipe,
            self.sparsity,
            self.structured,
            self.calibration_method.as_deref(),
            self.percentile,
            self.fp16_ops.as_deref(),
            fleetbench_optimizer::Int4Options {
                block_size: self.block_size,
                symmetric: self.symmetric,
                accuracy_level: self.accuracy_level,
            },
        )?)
    }
}

fn runtime() -> Result<&'static fleetbench_runtime::Runtime> {
    fleetbench_runtime::load(None).map_err(|e| anyhow!("{e}"))
}

fn builder() -> Result<ort::session::builder::SessionBuilder> {
    let rt = runtime()?;
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    Session::builder(&rt.env)
        .map_err(|e| anyhow!("{e}"))?
        .with_intra_threads(threads)
        .map_err(|e| anyhow!("{e}"))
}

fn session(bytes: &[u8]) -> Result<Session> {
    builder()?
        .commit_from_memory(bytes)
        .map_err(|e| anyhow!("{e}"))
}

/// Models whose encoding is larger than this are handed to ONNX Runtime as files with external data
/// (protobuf cannot hold 2 GiB).
const IN_MEMORY_LIMIT: usize = 1 << 30;

/// A session of a model held in memory: from its bytes when it is small, else from a temporary copy
/// written with external data.
fn session_for(model: &mut ModelProto) -> Result<Session> {
    if prost::Message::encoded_len(model) < IN_MEMORY_LIMIT {
        return session(&prost::Message::encode_to_vec(model));
    }
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("model.onnx");
    fleetbench_optimizer::external::save(model, &path, true)?;
    builder()?
        .commit_from_file(&path)
        .map_err(|e| anyhow!("{e}"))
}

/// Runs the model over a calibration set and reads the ranges int8-static needs.
pub fn calibrate(
    model: &ModelProto,
    data_path: &Path,
    method: CalibrationMethod,
) -> Result<Calibration> {
    let (mut augmented, pairs) = fleetbench_optimizer::calibration_model(model)?;
    let mut s = session_for(&mut augmented)
        .context("cannot load the model for calibration into ONNX Runtime")?;
    let specs = inputs::input_specs(&s).map_err(|e| anyhow!("{e}"))?;
    let first = specs.first().map(|s| s.name.clone()).unwrap_or_default();
    let arrays = data::read_arrays(data_path, &first)
        .map_err(|e| anyhow!("calibration set {}: {e}", data_path.display()))?;
    let what = format!("calibration set {}", data_path.display());
    let rows = batches::check_rows(&what, &specs, &arrays).map_err(|e| anyhow!("{e}"))?;
    let mut collector = RangeCollector::new(method);
    for (_, n, values) in
        batches::batches(&specs, &arrays, rows).map_err(|e| anyhow!("{what}: {e}"))?
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
    let decoded = fleetbench_optimizer::decode(model)?;
    let mut outcome = apply(&decoded, model.len() as u64, args, calibration_default)?;
    check(&mut outcome, args)?;
    Ok(outcome)
}

/// What [`optimize_file`] wrote.
#[derive(Debug)]
pub struct Written {
    /// What the recipe did (`size_after` counts every file written).
    pub report: fleetbench_optimizer::Report,
    /// The files, the model first.
    pub files: Vec<std::path::PathBuf>,
}

/// [`optimize`] from a model file to another. A model with external data is read with it (from its
/// folder), and the result is written in the same form: its large initializers in `<output>.data`
/// beside it. The result is checked in ONNX Runtime before anything is written.
pub fn optimize_file(
    input: &Path,
    output: &Path,
    args: &RecipeArgs,
    calibration_default: Option<&Path>,
) -> Result<Written> {
    let bytes = std::fs::read(input).with_context(|| format!("cannot read {}", input.display()))?;
    let mut decoded = fleetbench_optimizer::decode(&bytes)?;
    let external = fleetbench_optimizer::external::has_external(&decoded);
    let mut size_before = bytes.len() as u64;
    drop(bytes);
    if external {
        let dir = input.parent().unwrap_or(Path::new("."));
        fleetbench_optimizer::external::load(&mut decoded, dir)?;
        size_before = crate::transfer::collect(input)?.set.total_bytes();
    }
    let mut outcome = apply(&decoded, size_before, args, calibration_default)?;
    drop(decoded);
    check(&mut outcome, args)?;
    let external = external || prost::Message::encoded_len(&outcome.model) >= IN_MEMORY_LIMIT;
    let files = fleetbench_optimizer::external::save(&mut outcome.model, output, external)?;
    let mut report = outcome.report;
    report.size_after = files
        .iter()
        .map(|f| std::fs::metadata(f).map_or(0, |m| m.len()))
        .sum();
    Ok(Written { report, files })
}

/// Runs the recipe (with its calibration pass).
fn apply(
    decoded: &ModelProto,
    size_before: u64,
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
    let calibration = if let Recipe::Int8Static { method } = &recipe {
        let path = args
            .calibration
            .as_deref()
            .or(calibration_default)
            .ok_or_else(|| anyhow!("--calibration: int8-static needs a calibration set (the model has no eval inputs to use instead)"))?;
        Some(calibrate(decoded, path, *method)?)
    } else {
        None
    };
    Ok(fleetbench_optimizer::optimize(
        decoded,
        size_before,
        &recipe,
        calibration.as_ref(),
    )?)
}

/// Runs the result once in ONNX Runtime; its notes join the report.
fn check(outcome: &mut Outcome, args: &RecipeArgs) -> Result<()> {
    let shapes = args
        .shape
        .iter()
        .map(|s| fleetbench_common::config::parse_input_shape(s))
        .collect::<Result<Vec<_>, _>>()?;
    let name = args.recipe()?.name();
    let s = session_for(&mut outcome.model).with_context(|| {
        format!("the {name} variant does not load in ONNX Runtime; nothing was stored")
    })?;
    let notes = run_once(s, &shapes).with_context(|| {
        format!("the {name} variant does not run in ONNX Runtime; nothing was stored")
    })?;
    outcome.report.notes.extend(notes);
    Ok(())
}

/// Runs a session once on seeded inputs of the given shapes. A symbolic dimension no shape sets is
/// 1, and a note says so. Returns the notes.
fn run_once(mut s: Session, shapes: &[InputShape]) -> Result<Vec<String>> {
    let specs = inputs::input_specs(&s).map_err(|e| anyhow!("{e}"))?;
    let mut shapes = shapes.to_vec();
    let mut notes = Vec::new();
    for spec in &specs {
        if shapes.iter().any(|s| s.name == spec.name) {
            continue;
        }
        let symbolic: Vec<String> = spec
            .dims
            .iter()
            .enumerate()
            .skip(1)
            .filter(|(_, d)| **d < 0)
            .map(|(axis, _)| {
                let sym = spec.symbols.get(axis).filter(|s| !s.is_empty());
                format!("'{}' (axis {axis})", sym.map(String::as_str).unwrap_or("?"))
            })
            .collect();
        if symbolic.is_empty() {
            continue;
        }
        let dims: Vec<i64> = spec
            .dims
            .iter()
            .map(|d| if *d < 0 { 1 } else { *d })
            .collect();
        notes.push(format!(
            "the check run set input '{}' dimension {} to 1 (shape {}); give --shape {}=... to check another size",
            spec.name,
            symbolic.join(", "),
            dims.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x"),
            spec.name
        ));
        shapes.push(InputShape {
            name: spec.name.clone(),
            dims,
        });
    }
    let values = inputs::build_inputs(&specs, &shapes, 1, None, 1).map_err(|e| anyhow!("{e}"))?;
    let views: Vec<ort::session::SessionInputValue<'_>> = values.iter().map(Into::into).collect();
    s.run(views.as_slice()).map_err(|e| anyhow!("{e}"))?;
    Ok(notes)
}

/// Lineage record stored with the variant.
pub fn recipe_json(
    recipe: &Recipe,
    report: &fleetbench_optimizer::Report,
    base_sha: &str,
) -> String {
    serde_json::json!({
        "recipe": recipe,
        "tool": fleetbench_optimizer::TOOL,
        "base_sha256": base_sha,
        "rewritten": report.rewritten.len(),
        "skipped": report.skipped,
        "notes": report.notes,
    })
    .to_string()
}
