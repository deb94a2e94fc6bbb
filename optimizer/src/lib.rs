//! fleetbench's model optimizer: rewrites an ONNX graph (onnx.proto through prost, no Python) into a
//! smaller or faster variant.
//!
//! Recipes: `fp16`, `int8-dynamic`, `int8-static` (QDQ, calibrated), `int8-weight-only` (per-channel),
//! `int4-weight-only` (block-wise 4-bit MatMul weights as ONNX Runtime's MatMulNBits) and `prune` (unstructured magnitude pruning, or structured pruning that removes whole neurons or
//! channels and shrinks the shapes). Each works on a copy: it either returns a whole rewritten model
//! with a report of what it rewrote and what it skipped (node, op, reason), or fails whole. Nodes a
//! recipe does not apply to are left as they are; nodes it applies to but cannot rewrite are skipped
//! by the rules documented on each recipe; a recipe that rewrites nothing fails.

pub mod calibrate;
pub mod external;
mod fp16;
pub mod graph;
mod prune;
mod quant;

use std::collections::HashMap;

use fleetbench_common::proto::onnx::{ModelProto, NodeProto};
use serde::{Deserialize, Serialize};

pub use calibrate::{CalibrationMethod, RangeCollector, calibration_model};
pub use fp16::{CPU_FP16_OPS, Fp16Ops};
pub use quant::{INT4_BLOCK_SIZES, Int4Params};

/// This tool, as recorded in every variant's lineage.
pub const TOOL: &str = concat!("fleetbench-optimizer ", env!("CARGO_PKG_VERSION"));

/// Why a model could not be optimized.
#[derive(Debug, thiserror::Error)]
pub enum OptError {
    /// The bytes are not an ONNX model.
    #[error("not an ONNX model: {0}")]
    NotOnnx(String),
    /// A node the recipe must rewrite and cannot.
    #[error("node '{node}' (op {op}): {reason}")]
    Node {
        /// The node's name (or position).
        node: String,
        /// Its op type.
        op: String,
        /// Why.
        reason: String,
    },
    /// A recipe parameter out of range.
    #[error("{field}: {reason}")]
    Param {
        /// The parameter.
        field: &'static str,
        /// What is wrong.
        reason: String,
    },
    /// Calibration data that does not fit the model.
    #[error("calibration: {0}")]
    Calibration(String),
    /// The model as a whole does not suit the recipe.
    #[error("{0}")]
    Model(String),
}

/// A recipe with its parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "recipe", rename_all = "kebab-case")]
pub enum Recipe {
    /// Weights in half precision; nodes whose op has an fp16 kernel compute in fp16, the others in
    /// fp32 behind casts.
    Fp16 {
        /// Which ops compute in fp16.
        ops: Fp16Ops,
    },
    /// MatMul/Gemm/Conv with int8 weights and activations quantized at run time.
    Int8Dynamic,
    /// QDQ with calibrated activation ranges.
    Int8Static {
        /// How ranges are read from the calibration data.
        method: CalibrationMethod,
    },
    /// Per-channel int8 weights, float compute.
    Int8WeightOnly,
    /// Block-wise 4-bit MatMul weights as ONNX Runtime's MatMulNBits.
    Int4WeightOnly(quant::Int4Params),
    /// Magnitude pruning.
    Prune {
        /// Fraction of weights (unstructured) or of neurons/channels (structured) removed, in [0, 1).
        sparsity: f64,
        /// Remove whole neurons/channels and shrink the shapes.
        structured: bool,
    },
}

impl Recipe {
    /// Builds a recipe from its command-line name and options, checking them.
    pub fn parse(
        name: &str,
        sparsity: Option<f64>,
        structured: bool,
        method: Option<&str>,
        percentile: Option<f64>,
        fp16_ops: Option<&str>,
        int4: Int4Options,
    ) -> Result<Recipe, OptError> {
        let only = |field: &'static str, set: bool, recipe: &str| {
            if set {
                Err(OptError::Param {
                    field,
                    reason: format!("does not apply to recipe '{recipe}'"),
                })
            } else {
                Ok(())
            }
        };
        if name != "prune" {
            only("--sparsity", sparsity.is_some(), name)?;
            only("--structured", structured, name)?;
        }
        if name != "int8-static" {
            only("--calibration-method", method.is_some(), name)?;
            only("--percentile", percentile.is_some(), name)?;
        }
        if name != "fp16" {
            only("--fp16-ops", fp16_ops.is_some(), name)?;
        }
        if name != "int4-weight-only" {
            only("--block-size", int4.block_size.is_some(), name)?;
            only("--symmetric", int4.symmetric, name)?;
            only("--accuracy-level", int4.accuracy_level.is_some(), name)?;
        }
        Ok(match name {
            "fp16" => Recipe::Fp16 {
                ops: match fp16_ops.unwrap_or("cpu") {
                    "cpu" => Fp16Ops::Cpu,
                    "all" => Fp16Ops::All,
                    other => {
                        return Err(OptError::Param {
                            field: "--fp16-ops",
                            reason: format!("unknown value '{other}' (expected cpu or all)"),
                        });
                    }
                },
            },
            "int8-dynamic" => Recipe::Int8Dynamic,
            "int8-weight-only" => Recipe::Int8WeightOnly,
            "int4-weight-only" => Recipe::Int4WeightOnly(Int4Params {
                block_size: int4.block_size.unwrap_or(32),
                symmetric: int4.symmetric,
                accuracy_level: int4.accuracy_level.unwrap_or(0),
            }),
            "int8-static" => Recipe::Int8Static {
                method: CalibrationMethod::parse(method.unwrap_or("minmax"), percentile)?,
            },
            "prune" => {
                let s = sparsity.ok_or(OptError::Param {
                    field: "--sparsity",
                    reason: "recipe 'prune' needs a sparsity in [0, 1)".into(),
                })?;
                if !(0.0..1.0).contains(&s) {
                    return Err(OptError::Param {
                        field: "--sparsity",
                        reason: format!("{s} is outside [0, 1)"),
                    });
                }
                Recipe::Prune {
                    sparsity: s,
                    structured,
                }
            }
            other => {
                return Err(OptError::Param {
                    field: "--recipe",
                    reason: format!(
                        "unknown recipe '{other}' (expected fp16, int8-dynamic, int8-static, int8-weight-only, int4-weight-only or prune)"
                    ),
                });
            }
        })
    }

    /// The recipe's name.
    pub fn name(&self) -> &'static str {
        match self {
            Recipe::Fp16 { .. } => "fp16",
            Recipe::Int8Dynamic => "int8-dynamic",
            Recipe::Int8Static { .. } => "int8-static",
            Recipe::Int8WeightOnly => "int8-weight-only",
            Recipe::Int4WeightOnly(_) => "int4-weight-only",
            Recipe::Prune { .. } => "prune",
        }
    }

    /// The technique it stands for in a variant's lineage.
    pub fn technique(&self) -> &'static str {
        match self {
            Recipe::Prune { .. } => "pruned",
            _ => "quantized",
        }
    }

    /// A default name for the variant it makes.
    pub fn default_variant(&self) -> String {
        match self {
            Recipe::Prune {
                sparsity,
                structured,
            } => format!(
                "pruned{}{:.0}",
                if *structured { "-s" } else { "-" },
                sparsity * 100.0
            ),
            Recipe::Int8WeightOnly => "int8-wo".into(),
            Recipe::Int4WeightOnly(p) => format!(
                "int4-b{}{}",
                p.block_size,
                if p.symmetric { "-sym" } else { "" }
            ),
            r => r.name().into(),
        }
    }

    /// Whether the recipe needs calibration ranges.
    pub fn needs_calibration(&self) -> bool {
        matches!(self, Recipe::Int8Static { .. })
    }
}

/// The command line's int4-weight-only options (each refused with another recipe).
#[derive(Debug, Clone, Copy, Default)]
pub struct Int4Options {
    /// `--block-size`.
    pub block_size: Option<u32>,
    /// `--symmetric`.
    pub symmetric: bool,
    /// `--accuracy-level`.
    pub accuracy_level: Option<u32>,
}

/// Calibrated (min, max) ranges of activation tensors.
#[derive(Debug, Clone, Default)]
pub struct Calibration {
    /// By tensor name.
    pub ranges: HashMap<String, (f32, f32)>,
    /// Calibration samples seen.
    pub samples: u64,
}

/// A node a recipe skipped, and why.
#[derive(Debug, Clone, Serialize)]
pub struct Skipped {
    /// Node name (or position).
    pub node: String,
    /// Op type.
    pub op: String,
    /// Why it was left as it was.
    pub reason: String,
}

/// What a recipe did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Nodes rewritten.
    pub rewritten: Vec<String>,
    /// Nodes skipped with the reason.
    pub skipped: Vec<Skipped>,
    /// Weight tensors converted (fp16) or pruned.
    pub weights_changed: usize,
    /// Other facts worth knowing (achieved sparsity, shapes shrunk, ...).
    pub notes: Vec<String>,
    /// Serialized size before, bytes.
    pub size_before: u64,
    /// Serialized size after, bytes.
    pub size_after: u64,
}

impl Report {
    pub(crate) fn skip(&mut self, n: &NodeProto, index: usize, reason: &str) {
        self.skipped.push(Skipped {
            node: graph::node_label(n, index),
            op: graph::op(n).to_string(),
            reason: reason.to_string(),
        });
    }

    pub(crate) fn rewrote(&mut self, n: &NodeProto, index: usize) {
        self.rewritten.push(graph::node_label(n, index));
    }
}

/// A rewritten model and its report.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The new model.
    pub model: ModelProto,
    /// What was done.
    pub report: Report,
}

impl Outcome {
    /// The model's bytes.
    pub fn encode(&self) -> Vec<u8> {
        prost::Message::encode_to_vec(&self.model)
    }
}

/// Decodes and checks a model.
pub fn decode(bytes: &[u8]) -> Result<ModelProto, OptError> {
    use fleetbench_common::onnx::OnnxError;
    fleetbench_common::onnx::decode_model(bytes).map_err(|e| {
        OptError::NotOnnx(match e {
            OnnxError::Decode(m) => m,
            OnnxError::Incomplete(m) => m.to_string(),
        })
    })
}

/// Applies a recipe to a model ([`decode`]d from a file of `size_before` bytes). `calibration` is
/// required by int8-static (see [`calibration_model`] and [`RangeCollector`]).
pub fn optimize(
    original: &ModelProto,
    size_before: u64,
    recipe: &Recipe,
    calibration: Option<&Calibration>,
) -> Result<Outcome, OptError> {
    let mut model = original.clone();
    let mut report = Report {
        size_before,
        notes: graph::fold_constants(&mut model)?,
        ..Default::default()
    };
    match recipe {
        Recipe::Fp16 { ops } => fp16::convert(&mut model, *ops, &mut report)?,
        Recipe::Int8Dynamic => quant::int8_dynamic(&mut model, &mut report)?,
        Recipe::Int8WeightOnly => quant::int8_weight_only(&mut model, &mut report)?,
        Recipe::Int4WeightOnly(p) => quant::int4_weight_only(&mut model, *p, &mut report)?,
        Recipe::Int8Static { .. } => {
            let cal = calibration.ok_or_else(|| {
                OptError::Calibration("int8-static needs calibration data".into())
            })?;
            quant::int8_static(&mut model, cal, &mut report)?
        }
        Recipe::Prune {
            sparsity,
            structured: false,
        } => prune::unstructured(&mut model, *sparsity, &mut report)?,
        Recipe::Prune {
            sparsity,
            structured: true,
        } => prune::structured(&mut model, *sparsity, &mut report)?,
    }
    if report.rewritten.is_empty() && report.weights_changed == 0 {
        let why: Vec<String> = report
            .skipped
            .iter()
            .map(|s| format!("node '{}' (op {}): {}", s.node, s.op, s.reason))
            .collect();
        return Err(OptError::Model(format!(
            "recipe '{}' found nothing to rewrite in this model{}",
            recipe.name(),
            if why.is_empty() {
                " (no MatMul, Gemm or Conv with constant float weights)".to_string()
            } else {
                format!(": {}", why.join("; "))
            }
        )));
    }
    if let Some(g) = model.graph.as_mut() {
        // Shapes and types of intermediate tensors may have changed; the runtime infers them again.
        g.value_info.clear();
    }
    let mut producer = format!("{} ({})", TOOL, recipe.name());
    if let Some(p) = original.producer_name.as_deref().filter(|p| !p.is_empty()) {
        producer = format!("{producer} from {p}");
    }
    model.producer_name = Some(producer);
    report.size_after = graph::encoded_len(&model) as u64;
    Ok(Outcome { model, report })
}
