//! Pruning. Unstructured: in every MatMul/Gemm/Conv weight, the given fraction of weights with the
//! smallest magnitude is set to zero (shapes unchanged; the file compresses, the runtime does not get
//! faster). Structured: whole neurons (MatMul/Gemm output columns) or channels (Conv filters) are
//! removed and the shapes shrink, so the model computes less.
//!
//! Structured rule: a producer (MatMul, Gemm or Conv with a constant weight, Conv with group 1) is
//! pruned when its output flows, through single-consumer channel-wise nodes (Add/Sub/Mul/Div by a
//! per-channel or scalar constant, Relu, LeakyRelu, Sigmoid, Tanh, Clip, Elu, Softplus, HardSigmoid,
//! Identity, Dropout, BatchNormalization), only into consumers that read it as their data input
//! (MatMul, Gemm with transA=0, Conv with group 1) with constant weights. Anything else (a graph
//! output, a Concat, a Reshape, a residual Add of two activations) leaves the producer as it is and is
//! reported. Channels are ranked by the product of their incoming and outgoing weights' L2 norms.

use std::collections::HashMap;

use fleetbench_common::proto::onnx::{GraphProto, ModelProto, NodeProto};

use crate::graph::{self, Names, attr_i, dtype, op};
use crate::quant::drop_unused_initializers;
use crate::{OptError, Report};

const WEIGHTED: &[&str] = &["MatMul", "Gemm", "Conv"];

fn const_weight<'a>(
    g: &'a GraphProto,
    inits: &HashMap<String, usize>,
    n: &NodeProto,
) -> Option<&'a fleetbench_common::proto::onnx::TensorProto> {
    let w = &g.initializer[*inits.get(n.input.get(1)?)?];
    (w.data_type == Some(dtype::FLOAT)).then_some(w)
}

/// Unstructured magnitude pruning, per weight tensor.
pub fn unstructured(
    model: &mut ModelProto,
    sparsity: f64,
    report: &mut Report,
) -> Result<(), OptError> {
    let g = graph::graph_mut(model)?;
    let inits = graph::initializers(g);
    let mut zeroed = 0usize;
    let mut total = 0usize;
    let mut done: Vec<usize> = Vec::new();
    for (i, n) in g.node.iter().enumerate() {
        if !WEIGHTED.contains(&op(n)) {
            continue;
        }
        let Some(&wi) = n.input.get(1).and_then(|w| inits.get(w)) else {
            report.skip(n, i, "the weight is not a constant initializer");
            continue;
        };
        if g.initializer[wi].data_type != Some(dtype::FLOAT) {
            report.skip(n, i, "the weight is not float32");
            continue;
        }
        if !done.contains(&wi) {
            done.push(wi);
        }
        report.rewrote(n, i);
    }
    for wi in done {
        let t = &g.initializer[wi];
        let mut v = graph::f32_values(t).map_err(|reason| {
            OptError::Model(format!(
                "weight '{}': {reason}",
                t.name.as_deref().unwrap_or("")
            ))
        })?;
        let k = ((v.len() as f64) * sparsity).floor() as usize;
        if k > 0 {
            let mut mags: Vec<f32> = v.iter().map(|x| x.abs()).collect();
            let (_, threshold, _) = mags.select_nth_unstable_by(k - 1, |a, b| a.total_cmp(b));
            let threshold = *threshold;
            // Exactly k zeros: values below the threshold, then ties at it until k.
            let mut left = k;
            for x in v.iter_mut() {
                if x.abs() < threshold && left > 0 {
                    *x = 0.0;
                    left -= 1;
                }
            }
            for x in v.iter_mut() {
                if left == 0 {
                    break;
                }
                if x.abs() == threshold && *x != 0.0 {
                    *x = 0.0;
                    left -= 1;
                }
            }
        }
        zeroed += v.iter().filter(|x| **x == 0.0).count();
        total += v.len();
        let name = t.name.clone().unwrap_or_default();
        let dims = t.dims.clone();
        g.initializer[wi] = graph::f32_tensor(&name, &dims, &v);
        report.weights_changed += 1;
    }
    if total > 0 {
        report.notes.push(format!(
            "{zeroed} of {total} weights are zero ({:.1} %)",
            100.0 * zeroed as f64 / total as f64
        ));
    }
    Ok(())
}

/// Where a pruned channel set must be applied.
enum Edit {
    /// Select along `axis` of the initializer read by node `node` at input `input`.
    Select {
        node: usize,
        input: usize,
        axis: usize,
    },
}

/// Structured pruning; see the module's rules.
pub fn structured(
    model: &mut ModelProto,
    sparsity: f64,
    report: &mut Report,
) -> Result<(), OptError> {
    let g = graph::graph_mut(model)?;
    let mut names = Names::of(g);
    let outputs = graph::graph_outputs(g);
    let producers: Vec<usize> = (0..g.node.len())
        .filter(|i| WEIGHTED.contains(&op(&g.node[*i])))
        .collect();
    let mut shrunk = Vec::new();
    for p in producers {
        // Re-read the graph each time: an earlier step may have changed this node's weights.
        let inits = graph::initializers(g);
        let consumers = graph::consumers(g);
        let n = &g.node[p];
        let Some(w) = const_weight(g, &inits, n) else {
            report.skip(n, p, "the weight is not a constant float initializer");
            continue;
        };
        let (out_axis, ok) = match op(n) {
            "MatMul" => (1, w.dims.len() == 2),
            "Gemm" => (
                if attr_i(n, "transB").unwrap_or(0) != 0 {
                    0
                } else {
                    1
                },
                w.dims.len() == 2 && attr_i(n, "transA").unwrap_or(0) == 0,
            ),
            _ => (0, attr_i(n, "group").unwrap_or(1) == 1 && w.dims.len() >= 3),
        };
        if !ok {
            report.skip(
                n,
                p,
                "only 2-D MatMul/Gemm weights and group-1 Conv are pruned",
            );
            continue;
        }
        let m = w.dims[out_axis] as usize;
        let mut edits = vec![Edit::Select {
            node: p,
            input: 1,
            axis: out_axis,
        }];
        // Gemm's C / Conv's bias, one value per output channel.
        if let Some(b) = n.input.get(2).filter(|b| !b.is_empty()) {
            match inits.get(b).map(|i| &g.initializer[*i]) {
                Some(bt) if bt.dims.len() == 1 && bt.dims[0] as usize == m => {
                    edits.push(Edit::Select {
                        node: p,
                        input: 2,
                        axis: 0,
                    })
                }
                _ => {
                    report.skip(
                        n,
                        p,
                        "its bias is not a constant of one value per output channel",
                    );
                    continue;
                }
            }
        }
        // Follow the channels to the nodes that consume them.
        let mut cur = n.output[0].clone();
        let mut blocked: Option<String> = None;
        let mut ends: Vec<(usize, usize)> = Vec::new();
        loop {
            if outputs.contains(&cur) {
                blocked = Some(format!("its channels reach the graph output '{cur}'"));
                break;
            }
            let cs = consumers.get(&cur).cloned().unwrap_or_default();
            if cs.is_empty() {
                blocked = Some(format!("tensor '{cur}' has no consumer"));
                break;
            }
            let c0 = &g.node[cs[0]];
            if cs.len() == 1 && !WEIGHTED.contains(&op(c0)) {
                match channelwise(g, &inits, c0, cs[0], &cur, m) {
                    Ok(mut e) => {
                        edits.append(&mut e);
                        cur = c0.output[0].clone();
                        continue;
                    }
                    Err(why) => {
                        blocked = Some(why);
                        break;
                    }
                }
            }
            for &ci in &cs {
                let c = &g.node[ci];
                let w_ok = const_weight(g, &inits, c);
                let axis = match (op(c), w_ok) {
                    ("MatMul", Some(cw))
                        if c.input[0] == cur && cw.dims.len() == 2 && cw.dims[0] as usize == m =>
                    {
                        Some(0)
                    }
                    ("Gemm", Some(cw))
                        if c.input[0] == cur
                            && attr_i(c, "transA").unwrap_or(0) == 0
                            && cw.dims.len() == 2 =>
                    {
                        let a = if attr_i(c, "transB").unwrap_or(0) != 0 {
                            1
                        } else {
                            0
                        };
                        (cw.dims[a] as usize == m).then_some(a)
                    }
                    ("Conv", Some(cw))
                        if c.input[0] == cur
                            && cw.dims.len() >= 3
                            && cw.dims[1] as usize == m
                            && attr_i(c, "group").unwrap_or(1) == 1 =>
                    {
                        Some(1)
                    }
                    _ => None,
                };
                match axis {
                    Some(a) => ends.push((ci, a)),
                    None => {
                        blocked = Some(format!(
                            "its channels flow into {} '{}', which cannot shrink its input",
                            op(c),
                            graph::node_label(c, ci)
                        ));
                        break;
                    }
                }
            }
            break;
        }
        if let Some(why) = blocked {
            report.skip(n, p, &why);
            continue;
        }
        for (ci, a) in &ends {
            edits.push(Edit::Select {
                node: *ci,
                input: 1,
                axis: *a,
            });
        }
        // Rank channels: ‖incoming‖ × Σ ‖outgoing‖.
        let wv = graph::node_f32(n, p, w, "weight")?;
        let mut score = vec![0f64; m];
        let norms = |v: &[f32], dims: &[i64], axis: usize| -> Vec<f64> {
            let mut s = vec![0f64; dims[axis] as usize];
            for (i, x) in v.iter().enumerate() {
                s[crate::quant::channel_of(i, dims, axis)] += (*x as f64) * (*x as f64);
            }
            s.into_iter().map(f64::sqrt).collect()
        };
        let inc = norms(&wv, &w.dims, out_axis);
        let mut out_norm = vec![0f64; m];
        for (ci, a) in &ends {
            let cw = const_weight(g, &inits, &g.node[*ci]).expect("checked");
            let cv = graph::node_f32(&g.node[*ci], *ci, cw, "weight")?;
            for (k, v) in norms(&cv, &cw.dims, *a).into_iter().enumerate() {
                out_norm[k] += v;
            }
        }
        for k in 0..m {
            score[k] = inc[k] * out_norm[k].max(f64::MIN_POSITIVE);
        }
        let keep_n = (((m as f64) * (1.0 - sparsity)).round() as usize).clamp(1, m);
        if keep_n == m {
            report.skip(
                n,
                p,
                &format!("{m} channels at sparsity {sparsity} leave none to remove"),
            );
            continue;
        }
        let mut order: Vec<usize> = (0..m).collect();
        order.sort_by(|a, b| score[*b].total_cmp(&score[*a]).then(a.cmp(b)));
        let mut keep: Vec<usize> = order[..keep_n].to_vec();
        keep.sort_unstable();
        let label = graph::node_label(n, p);
        apply(g, &edits, &keep, &mut names)?;
        report.rewrote(&g.node[p], p);
        report.weights_changed += edits.len();
        shrunk.push(format!("{label}: {m} → {keep_n}"));
    }
    drop_unused_initializers(g);
    if !shrunk.is_empty() {
        report
            .notes
            .push(format!("channels kept: {}", shrunk.join(", ")));
    }
    Ok(())
}

/// Checks a single-consumer node between producer and consumers; returns the edits it needs.
fn channelwise(
    g: &GraphProto,
    inits: &HashMap<String, usize>,
    c: &NodeProto,
    ci: usize,
    cur: &str,
    m: usize,
) -> Result<Vec<Edit>, String> {
    let label = || format!("{} '{}'", op(c), graph::node_label(c, ci));
    match op(c) {
        "Relu" | "LeakyRelu" | "Sigmoid" | "Tanh" | "Elu" | "Softplus" | "HardSigmoid"
        | "Identity" => Ok(vec![]),
        "Clip" => {
            // min/max are scalars.
            Ok(vec![])
        }
        "Dropout" if c.output.len() < 2 || c.output[1].is_empty() => Ok(vec![]),
        "Add" | "Sub" | "Mul" | "Div" => {
            let (k, other) = match c.input.iter().position(|i| i == cur) {
                Some(0) => (1, &c.input[1]),
                Some(_) => (0, &c.input[0]),
                None => return Err(format!("{} does not read the channels", label())),
            };
            let Some(&oi) = inits.get(other) else {
                return Err(format!(
                    "its channels meet another activation in {}",
                    label()
                ));
            };
            let t = &g.initializer[oi];
            if graph::numel(&t.dims) == 1 {
                return Ok(vec![]);
            }
            let axes: Vec<usize> = (0..t.dims.len()).filter(|a| t.dims[*a] != 1).collect();
            if axes.len() == 1 && t.dims[axes[0]] as usize == m && t.data_type == Some(dtype::FLOAT)
            {
                Ok(vec![Edit::Select {
                    node: ci,
                    input: k,
                    axis: axes[0],
                }])
            } else {
                Err(format!(
                    "{} has a constant of shape {:?} that is not per channel",
                    label(),
                    t.dims
                ))
            }
        }
        "BatchNormalization"
            if c.output.len() == 1 || c.output[1..].iter().all(String::is_empty) =>
        {
            let mut e = Vec::new();
            for k in 1..5 {
                match c.input.get(k).and_then(|x| inits.get(x)) {
                    Some(&ti) if g.initializer[ti].dims == [m as i64] => e.push(Edit::Select {
                        node: ci,
                        input: k,
                        axis: 0,
                    }),
                    _ => {
                        return Err(format!(
                            "{} has parameters that are not per-channel constants",
                            label()
                        ));
                    }
                }
            }
            Ok(e)
        }
        _ => Err(format!(
            "its channels flow into {}, which cannot shrink",
            label()
        )),
    }
}

/// Writes the selected channels of each edited initializer to a new initializer.
fn apply(
    g: &mut GraphProto,
    edits: &[Edit],
    keep: &[usize],
    names: &mut Names,
) -> Result<(), OptError> {
    for Edit::Select { node, input, axis } in edits {
        let inits = graph::initializers(g);
        let name = g.node[*node].input[*input].clone();
        let t = &g.initializer[inits[&name]];
        let v = graph::node_f32(&g.node[*node], *node, t, "input")?;
        let dims = t.dims.clone();
        let outer: usize = dims[..*axis].iter().map(|d| *d as usize).product();
        let inner: usize = dims[axis + 1..].iter().map(|d| *d as usize).product();
        let len = dims[*axis] as usize;
        let mut out = Vec::with_capacity(outer * keep.len() * inner);
        for o in 0..outer {
            for &k in keep {
                let start = (o * len + k) * inner;
                out.extend_from_slice(&v[start..start + inner]);
            }
        }
        let mut new_dims = dims;
        new_dims[*axis] = keep.len() as i64;
        let new_name = names.fresh(&format!("{}_pruned", name.replace(['/', ':'], "_")));
        g.initializer
            .push(graph::f32_tensor(&new_name, &new_dims, &out));
        g.node[*node].input[*input] = new_name;
    }
    Ok(())
}
