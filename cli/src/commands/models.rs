//! `fleetbench models`: push artifacts and variants, list them with their lineage.

use std::path::PathBuf;

use anyhow::{Context, Result, bail};
use clap::Subcommand;
use fleetbench_proto::v1::{
    DeleteVariantRequest, ListModelsRequest, ModelVariant, RegisterVariantRequest,
};

use crate::client::Client;
use crate::output::{self, Format};

/// Model commands.
#[derive(Debug, Subcommand)]
pub enum ModelsCmd {
    /// Upload an ONNX model as a model variant (the first variant of a model is its base), with every
    /// external-data file its initializers reference. A push cut in the middle resumes from what the
    /// coordinator holds when it is run again.
    Push {
        /// ONNX file (its external-data files are found from it, relative to its folder).
        file: PathBuf,
        /// Model name.
        #[arg(long)]
        name: String,
        /// Variant name (default: from the weights' type: fp32, fp16, int8).
        #[arg(long)]
        variant: Option<String>,
        /// Variant this one derives from (default: the model's base).
        #[arg(long)]
        variant_of: Option<String>,
        /// How it was derived: quantized, pruned, distilled ...
        #[arg(long)]
        technique: Option<String>,
        /// Eval inputs (.npy, or .npz by input name), or an ONNX test_data_set folder (or a folder of
        /// test_data_set_* folders) whose output_0.pb files are the reference outputs.
        #[arg(long)]
        eval_inputs: Option<PathBuf>,
        /// Eval labels (.npy): class labels, regression targets, or reference outputs of the output's
        /// full shape.
        #[arg(long)]
        eval_labels: Option<PathBuf>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Format,
    },
    /// Make a variant with a recipe of fleetbench's optimizer (quantization, pruning) from a stored
    /// variant, check that it runs in ONNX Runtime, and store it with its lineage.
    Optimize {
        /// Model name.
        model: String,
        #[command(flatten)]
        recipe: crate::optimize::RecipeArgs,
        /// Variant to start from (default: the model's base); chain recipes by starting from a variant
        /// an earlier recipe made.
        #[arg(long)]
        from: Option<String>,
        /// Name of the new variant (default: from the recipe, e.g. int8-dynamic, pruned-s50).
        #[arg(long)]
        name: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Format,
    },
    /// Apply a recipe to a local ONNX file, offline (no coordinator), and write the result.
    OptimizeFile {
        /// ONNX file to read.
        input: PathBuf,
        /// ONNX file to write.
        output_file: PathBuf,
        #[command(flatten)]
        recipe: crate::optimize::RecipeArgs,
        /// Output format of the report.
        #[arg(long, value_enum, default_value_t)]
        output: Format,
    },
    /// Delete a model (every variant) or one variant, with their runs; the blobs nothing references
    /// any more are collected. Refused while a queued or running job uses them.
    Delete {
        /// MODEL or MODEL/VARIANT.
        target: String,
        /// Also delete the variants derived from it (required when there are any).
        #[arg(long)]
        recursive: bool,
        /// Only say what would be deleted.
        #[arg(long)]
        dry_run: bool,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Format,
    },
    /// List models and variants.
    List {
        /// Only this model.
        #[arg(long)]
        model: Option<String>,
        /// Output format.
        #[arg(long, value_enum, default_value_t)]
        output: Format,
    },
}

/// Runs a model command.
pub async fn run(client: &Client, cmd: ModelsCmd) -> Result<()> {
    match cmd {
        ModelsCmd::Push {
            file,
            name,
            variant,
            variant_of,
            technique,
            eval_inputs,
            eval_labels,
            output,
        } => {
            let folder = eval_inputs.as_ref().is_some_and(|p| p.is_dir());
            if folder && eval_labels.is_some() {
                bail!("--eval-labels: a test_data_set folder brings its own reference outputs");
            }
            if !folder && eval_inputs.is_some() != eval_labels.is_some() {
                bail!("--eval-inputs and --eval-labels go together");
            }
            let v = push(
                client,
                &file,
                &name,
                variant.as_deref(),
                variant_of.as_deref(),
                technique.as_deref(),
                // A folder stands for both (its outputs are the reference).
                eval_inputs
                    .as_deref()
                    .map(|x| (x, eval_labels.as_deref().unwrap_or(x))),
            )
            .await?;
            match output {
                Format::Json => output::print_json(&v)?,
                Format::Table => outln!(
                    "pushed {}/{} ({}{}, sha256 {}){}",
                    v.model,
                    v.variant,
                    output::bytes(v.size_bytes),
                    if v.file_count > 1 {
                        format!(" in {} files", v.file_count)
                    } else {
                        String::new()
                    },
                    output::short(&v.artifact_sha256),
                    if v.variant_of.is_empty() {
                        String::new()
                    } else {
                        format!(", variant of {}", v.variant_of)
                    }
                ),
            }
            Ok(())
        }
        ModelsCmd::Optimize {
            model,
            recipe,
            from,
            name,
            output,
        } => {
            let v = optimize(client, &model, &recipe, from.as_deref(), name.as_deref()).await?;
            match output {
                Format::Json => output::print_json(&v)?,
                Format::Table => outln!(
                    "optimized {}/{} ({}, {} of {}): {}",
                    v.variant.model,
                    v.variant.variant,
                    output::bytes(v.variant.size_bytes),
                    v.variant.technique,
                    v.variant.variant_of,
                    summary(&v.report)
                ),
            }
            Ok(())
        }
        ModelsCmd::OptimizeFile {
            input,
            output_file,
            recipe,
            output,
        } => {
            let written = crate::optimize::optimize_file(&input, &output_file, &recipe, None)
                .with_context(|| format!("{}", input.display()))?;
            match output {
                Format::Json => output::print_json(&serde_json::json!({
                    "input": input,
                    "output": output_file,
                    "files": written.files,
                    "recipe": recipe.recipe()?,
                    "size_bytes": written.report.size_after,
                    "report": written.report,
                }))?,
                Format::Table => outln!(
                    "wrote {} ({}{}, from {}): {}",
                    output_file.display(),
                    output::bytes(written.report.size_after),
                    if written.files.len() > 1 {
                        format!(" in {} files", written.files.len())
                    } else {
                        String::new()
                    },
                    output::bytes(written.report.size_before),
                    summary(&written.report)
                ),
            }
            Ok(())
        }
        ModelsCmd::Delete {
            target,
            recursive,
            dry_run,
            output,
        } => {
            let (model, variant) = match target.split_once('/') {
                Some((m, v)) => (m.to_string(), v.to_string()),
                None => (target.clone(), String::new()),
            };
            if model.is_empty() || (target.contains('/') && variant.is_empty()) {
                bail!("'{target}': give MODEL or MODEL/VARIANT");
            }
            let d = client
                .models()
                .delete_variant(DeleteVariantRequest {
                    model,
                    variant,
                    recursive,
                    dry_run,
                })
                .await
                .map_err(|s| client.error(s, &format!("deleting {target}")))?
                .into_inner();
            match output {
                Format::Json => output::print_json(&d)?,
                Format::Table => outln!(
                    "{} {} ({}); {} run(s){}, {} of blobs {}",
                    if dry_run { "would delete" } else { "deleted" },
                    d.variants.join(", "),
                    if d.variants.len() == 1 {
                        "1 variant".to_string()
                    } else {
                        format!("{} variants", d.variants.len())
                    },
                    d.runs,
                    match d.jobs {
                        0 => String::new(),
                        1 => " and 1 job left without tasks".to_string(),
                        n => format!(" and {n} jobs left without tasks"),
                    },
                    output::bytes(d.bytes_freed),
                    if dry_run { "to free" } else { "freed" },
                ),
            }
            Ok(())
        }
        ModelsCmd::List { model, output } => {
            let variants = client
                .models()
                .list_models(ListModelsRequest {
                    model: model.unwrap_or_default(),
                })
                .await
                .map_err(|s| client.error(s, "listing models"))?
                .into_inner()
                .variants;
            match output {
                Format::Json => output::print_json(&variants),
                Format::Table => {
                    outln!("{}", variant_table(&variants));
                    Ok(())
                }
            }
        }
    }
}

/// A variant made by `models optimize`, with the optimizer's report.
#[derive(Debug, serde::Serialize)]
pub struct Optimized {
    /// The stored variant.
    pub variant: ModelVariant,
    /// What the recipe did.
    pub report: fleetbench_optimizer::Report,
}

fn summary(r: &fleetbench_optimizer::Report) -> String {
    let mut s = format!(
        "{} nodes rewritten, {} skipped, {} weight tensors changed",
        r.rewritten.len(),
        r.skipped.len(),
        r.weights_changed
    );
    for k in &r.skipped {
        s.push_str(&format!(
            "\n  skipped '{}' ({}): {}",
            k.node, k.op, k.reason
        ));
    }
    for n in &r.notes {
        s.push_str(&format!("\n  {n}"));
    }
    s
}

/// Makes a variant of a stored model with a recipe and stores it with its lineage.
pub async fn optimize(
    client: &Client,
    model: &str,
    args: &crate::optimize::RecipeArgs,
    from: Option<&str>,
    name: Option<&str>,
) -> Result<Optimized> {
    let recipe = args.recipe()?;
    let variants = client
        .models()
        .list_models(ListModelsRequest {
            model: model.to_string(),
        })
        .await
        .map_err(|s| client.error(s, "listing models"))?
        .into_inner()
        .variants;
    if variants.is_empty() {
        bail!("model '{model}' does not exist; push it first");
    }
    let source = match from {
        Some(f) => variants
            .iter()
            .find(|v| v.variant == f)
            .ok_or_else(|| anyhow::anyhow!("--from: model '{model}' has no variant '{f}'"))?,
        None => variants
            .iter()
            .find(|v| v.variant_of.is_empty())
            .unwrap_or(&variants[0]),
    };
    let is_base = source.variant_of.is_empty();
    let new_name = match name {
        Some(n) => n.to_string(),
        None if is_base => recipe.default_variant(),
        None => format!("{}-{}", source.variant, recipe.default_variant()),
    };
    if variants.iter().any(|v| v.variant == new_name) {
        bail!("model '{model}' already has a variant '{new_name}'; choose another with --name");
    }
    let dir = tempfile::tempdir()?;
    let (source_model, _) =
        crate::transfer::fetch_set(client, &source.artifact_sha256, &dir.path().join("source"))
            .await?;
    let calibration_default = if recipe.needs_calibration()
        && args.calibration.is_none()
        && !source.eval_inputs_sha256.is_empty()
    {
        let p = dir.path().join("calibration.data");
        crate::transfer::download_to(client, &source.eval_inputs_sha256, &p).await?;
        // .npz is a zip archive; the readers go by the extension.
        let mut magic = [0u8; 4];
        std::io::Read::read_exact(&mut std::fs::File::open(&p)?, &mut magic)?;
        let named = p.with_extension(if &magic == b"PK\x03\x04" {
            "npz"
        } else {
            "npy"
        });
        std::fs::rename(&p, &named)?;
        Some(named)
    } else {
        None
    };
    let out = dir.path().join("variant").join(
        source_model
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| "model.onnx".into()),
    );
    std::fs::create_dir_all(out.parent().expect("a folder"))?;
    let written = tokio::task::block_in_place(|| {
        crate::optimize::optimize_file(&source_model, &out, args, calibration_default.as_deref())
    })
    .with_context(|| format!("{model}/{}: recipe {}", source.variant, recipe.name()))?;
    let local = crate::transfer::collect(&out)?;
    crate::transfer::push_set(client, &local).await?;
    let artifact_sha256 = local.sha256.clone();
    let req = RegisterVariantRequest {
        model: model.to_string(),
        variant: new_name,
        artifact_sha256,
        variant_of: source.variant.clone(),
        technique: recipe.technique().to_string(),
        recipe_json: crate::optimize::recipe_json(
            &recipe,
            &written.report,
            &source.artifact_sha256,
        ),
        eval_inputs_sha256: String::new(),
        eval_labels_sha256: String::new(),
    };
    let variant = client
        .models()
        .register_variant(req)
        .await
        .map_err(|s| client.error(s, "storing the optimized variant"))?
        .into_inner();
    Ok(Optimized {
        variant,
        report: written.report,
    })
}

/// Pushes a model with its external-data files as one artifact set (and an eval set: inputs and
/// labels, or a test_data_set folder twice) and registers the variant.
pub async fn push(
    client: &Client,
    file: &std::path::Path,
    model: &str,
    variant: Option<&str>,
    variant_of: Option<&str>,
    technique: Option<&str>,
    eval: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<ModelVariant> {
    let local = crate::transfer::collect(file)?;
    crate::transfer::push_set(client, &local).await?;
    // A test_data_set folder becomes an .npz of inputs and an .npy of reference outputs.
    let converted = tempfile::tempdir()?;
    let eval_files;
    let eval = match eval {
        Some((dir, _)) if dir.is_dir() => {
            let info = fleetbench_common::onnx::inspect_file(file)
                .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))?;
            let inputs: Vec<(String, String)> = info
                .inputs
                .iter()
                .map(|i| (i.name.clone(), i.element_type.clone()))
                .collect();
            eval_files = crate::testdata::convert(dir, &inputs, converted.path())
                .with_context(|| format!("--eval-inputs {}", dir.display()))?;
            Some((eval_files.0.as_path(), eval_files.1.as_path()))
        }
        other => other,
    };
    let (x, y) = match eval {
        Some((x, y)) => (
            client.upload(x).await?.sha256,
            client.upload(y).await?.sha256,
        ),
        None => (String::new(), String::new()),
    };
    let req = RegisterVariantRequest {
        model: model.to_string(),
        variant: variant.unwrap_or_default().to_string(),
        artifact_sha256: local.sha256,
        variant_of: variant_of.unwrap_or_default().to_string(),
        technique: technique.unwrap_or_default().to_string(),
        recipe_json: String::new(),
        eval_inputs_sha256: x,
        eval_labels_sha256: y,
    };
    Ok(client
        .models()
        .register_variant(req)
        .await
        .map_err(|s| client.error(s, &format!("pushing {}", file.display())))?
        .into_inner())
}

/// Variants as a table, children indented under the variant they derive from.
pub fn variant_table(variants: &[ModelVariant]) -> comfy_table::Table {
    let mut t = output::table(&[
        "MODEL",
        "VARIANT",
        "TECHNIQUE",
        "SIZE",
        "FILES",
        "INPUTS",
        "EVAL SET",
        "SHA256",
    ]);
    fn walk<'a>(
        all: &'a [ModelVariant],
        model: &str,
        parent: &str,
        depth: usize,
        out: &mut Vec<(usize, &'a ModelVariant)>,
    ) {
        for v in all
            .iter()
            .filter(|v| v.model == model && v.variant_of == parent)
        {
            out.push((depth, v));
            walk(all, model, &v.variant, depth + 1, out);
        }
    }
    let mut models: Vec<&str> = variants.iter().map(|v| v.model.as_str()).collect();
    models.dedup();
    for m in models {
        let mut rows = Vec::new();
        walk(variants, m, "", 0, &mut rows);
        // Variants whose parent is missing still show.
        for v in variants.iter().filter(|v| v.model == m) {
            if !rows.iter().any(|(_, r)| std::ptr::eq(*r, v)) {
                rows.push((0, v));
            }
        }
        for (depth, v) in rows {
            let inputs: Vec<String> = v
                .inputs
                .iter()
                .map(|i| {
                    let dims: Vec<String> = i
                        .dims
                        .iter()
                        .zip(i.dim_names.iter().chain(std::iter::repeat(&String::new())))
                        .map(|(d, n)| {
                            if *d < 0 {
                                if n.is_empty() { "?".into() } else { n.clone() }
                            } else {
                                d.to_string()
                            }
                        })
                        .collect();
                    format!("{} {}[{}]", i.name, i.element_type, dims.join(","))
                })
                .collect();
            let name = if depth == 0 {
                v.variant.clone()
            } else {
                format!("{}└ {}", "  ".repeat(depth - 1), v.variant)
            };
            t.add_row(vec![
                v.model.clone(),
                name,
                if v.technique.is_empty() {
                    "-".into()
                } else {
                    v.technique.clone()
                },
                output::bytes(v.size_bytes),
                v.file_count.max(1).to_string(),
                inputs.join("; "),
                if v.eval_labels_sha256.is_empty() {
                    "-".into()
                } else {
                    "yes".into()
                },
                output::short(&v.artifact_sha256).to_string(),
            ]);
        }
    }
    t
}
