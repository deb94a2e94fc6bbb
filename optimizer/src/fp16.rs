//! fp16: float weights stored in half precision; nodes whose op has an fp16 kernel compute in fp16,
//! the others stay in fp32 behind Cast nodes; casts at the graph's inputs and outputs keep its
//! interface in float32.
//!
//! Which ops have fp16 kernels depends on the execution provider. [`CPU_FP16_OPS`] was probed on ONNX
//! Runtime 1.31.1's CPU provider (x86_64) by `models/probe_fp16_ops.py`: a node of any other op given
//! fp16 tensors gets Casts to float inserted by the runtime itself, so those are kept in fp32 here.
//! `--fp16-ops all` converts every op, for providers with fp16 kernels throughout (CUDA, TensorRT).
//! Rules: nodes outside the default ONNX domain and Constant/ConstantOfShape stay in fp32; a graph
//! with control flow (subgraphs) is refused whole.

use std::collections::{HashMap, HashSet};

use fleetbench_common::proto::onnx::{ModelProto, NodeProto};
use serde::{Deserialize, Serialize};

use crate::graph::{self, Names, dtype, op};
use crate::{OptError, Report};

/// Ops with real fp16 kernels on ONNX Runtime 1.31.1's CPU execution provider (x86_64), probed by
/// `models/probe_fp16_ops.py`.
pub const CPU_FP16_OPS: &[&str] = &[
    "Clip",
    "Concat",
    "Expand",
    "Flatten",
    "Gather",
    "Identity",
    "LayerNormalization",
    "Max",
    "Min",
    "Reshape",
    "Round",
    "Slice",
    "Split",
    "Transpose",
    "Unsqueeze",
];

/// Which ops compute in fp16.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Fp16Ops {
    /// Those with fp16 kernels on the CPU provider.
    Cpu,
    /// Every op of the default domain.
    All,
}

fn custom_domain(n: &NodeProto) -> Option<&str> {
    n.domain
        .as_deref()
        .filter(|d| !d.is_empty() && *d != "ai.onnx")
}

fn computes_fp16(n: &NodeProto, ops: Fp16Ops) -> bool {
    if custom_domain(n).is_some() {
        return false;
    }
    match op(n) {
        "Cast" | "Constant" | "ConstantOfShape" => false,
        o => ops == Fp16Ops::All || CPU_FP16_OPS.contains(&o),
    }
}

/// Converts the model; see the module's rules.
pub fn convert(model: &mut ModelProto, ops: Fp16Ops, report: &mut Report) -> Result<(), OptError> {
    let g = graph::graph_mut(model)?;
    for (i, n) in g.node.iter().enumerate() {
        if n.attribute
            .iter()
            .any(|a| a.g.is_some() || !a.graphs.is_empty())
        {
            return Err(graph::node_error(
                n,
                i,
                "fp16 does not rewrite control flow with subgraphs",
            ));
        }
    }
    let types = graph::elem_types(g);
    let is_float = |t: &str| types.get(t) == Some(&dtype::FLOAT);
    let mut names = Names::of(g);
    // Tensors that hold fp16 after the rewrite.
    let mut half: HashSet<String> = HashSet::new();
    for t in g.initializer.iter_mut() {
        if t.data_type != Some(dtype::FLOAT) {
            continue;
        }
        let v = graph::f32_values(t).map_err(|reason| {
            OptError::Model(format!(
                "initializer '{}': {reason}",
                t.name.as_deref().unwrap_or("")
            ))
        })?;
        let name = t.name.clone().unwrap_or_default();
        *t = graph::f16_tensor(&name, &t.dims, &v);
        half.insert(name);
        report.weights_changed += 1;
    }
    // Graph inputs that only declared initializers (old IR) follow their type.
    for v in g.input.iter_mut() {
        if v.name.as_ref().is_some_and(|n| half.contains(n)) {
            graph::set_value_elem_type(v, dtype::FLOAT16);
        }
    }
    let mut casts: HashMap<(String, bool), String> = HashMap::new();
    let old = std::mem::take(&mut g.node);
    for (i, mut n) in old.into_iter().enumerate() {
        if let Some(domain) = custom_domain(&n) {
            report.skip(
                &n,
                i,
                &format!("op of domain '{domain}': kept in fp32 (its fp16 kernels are unknown)"),
            );
        }
        let fp16 = computes_fp16(&n, ops) && n.input.iter().chain(&n.output).any(|t| is_float(t));
        // Cast takes either precision as it is.
        if op(&n) != "Cast" {
            for input in n.input.iter_mut() {
                if input.is_empty() || !is_float(input) {
                    continue;
                }
                let is_half = half.contains(input.as_str());
                if is_half == fp16 {
                    continue;
                }
                let key = (input.clone(), fp16);
                let cast = match casts.get(&key) {
                    Some(c) => c.clone(),
                    None => {
                        let c = names.fresh(&format!(
                            "{}_{}",
                            input.replace(['/', ':'], "_"),
                            if fp16 { "fp16" } else { "fp32" }
                        ));
                        g.node.push(graph::cast(
                            names.fresh(&format!("{c}_cast")),
                            input,
                            &c,
                            if fp16 { dtype::FLOAT16 } else { dtype::FLOAT },
                        ));
                        casts.insert(key, c.clone());
                        c
                    }
                };
                *input = cast;
            }
        }
        if fp16 {
            for out in &n.output {
                if is_float(out) {
                    half.insert(out.clone());
                }
            }
            report.rewrote(&n, i);
        } else if op(&n) == "Cast" && graph::attr_i(&n, "to") == Some(dtype::FLOAT16 as i64) {
            for out in &n.output {
                half.insert(out.clone());
            }
        }
        g.node.push(n);
    }
    if report.rewritten.is_empty() && ops == Fp16Ops::Cpu {
        report.notes.push(
            "no node computes in fp16: the ops of this model have no fp16 kernels on ONNX Runtime's CPU \
             provider, so the weights are stored in fp16 and widened for fp32 compute \
             (use --fp16-ops all for providers with fp16 kernels)"
                .into(),
        );
    }
    // Graph outputs stay float32.
    let outputs: Vec<String> = g.output.iter().filter_map(|o| o.name.clone()).collect();
    for out in outputs {
        if !half.contains(&out) {
            continue;
        }
        let inner = names.fresh(&format!("{}_fp16", out.replace(['/', ':'], "_")));
        for n in g.node.iter_mut() {
            for t in n.output.iter_mut().chain(n.input.iter_mut()) {
                if *t == out {
                    *t = inner.clone();
                }
            }
        }
        g.node.push(graph::cast(
            names.fresh(&format!("{out}_cast")),
            &inner,
            &out,
            dtype::FLOAT,
        ));
    }
    Ok(())
}
