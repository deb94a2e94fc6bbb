//! `fleetbench models`: push artifacts and variants, list them with their lineage.

use std::path::PathBuf;

use anyhow::{Result, bail};
use clap::Subcommand;
use fleetbench_proto::v1::{ListModelsRequest, ModelVariant, RegisterVariantRequest};

use crate::client::Client;
use crate::output::{self, Format};

/// Model commands.
#[derive(Debug, Subcommand)]
pub enum ModelsCmd {
    /// Upload an ONNX file as a model variant (the first variant of a model is its base).
    Push {
        /// ONNX file.
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
        /// Eval inputs (.npy, or .npz by input name).
        #[arg(long)]
        eval_inputs: Option<PathBuf>,
        /// Eval labels (.npy).
        #[arg(long)]
        eval_labels: Option<PathBuf>,
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
            if eval_inputs.is_some() != eval_labels.is_some() {
                bail!("--eval-inputs and --eval-labels go together");
            }
            let v = push(
                client,
                &file,
                &name,
                variant.as_deref(),
                variant_of.as_deref(),
                technique.as_deref(),
                eval_inputs.as_deref().zip(eval_labels.as_deref()),
            )
            .await?;
            match output {
                Format::Json => output::print_json(&v)?,
                Format::Table => println!(
                    "pushed {}/{} ({}, sha256 {}){}",
                    v.model,
                    v.variant,
                    output::bytes(v.size_bytes),
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
                    println!("{}", variant_table(&variants));
                    Ok(())
                }
            }
        }
    }
}

/// Uploads a file (and an eval set) and registers the variant.
pub async fn push(
    client: &Client,
    file: &std::path::Path,
    model: &str,
    variant: Option<&str>,
    variant_of: Option<&str>,
    technique: Option<&str>,
    eval: Option<(&std::path::Path, &std::path::Path)>,
) -> Result<ModelVariant> {
    let artifact = client.upload(file).await?;
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
        artifact_sha256: artifact.sha256,
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
