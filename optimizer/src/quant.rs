//! Quantization recipes: int8 dynamic (MatMulInteger / ConvInteger with activations quantized at run
//! time), int8 static in QDQ form (calibrated activation ranges), int8 weight-only (per-channel).
//!
//! The nodes these recipes rewrite are MatMul, Gemm and Conv whose weight is a constant float32
//! initializer. Every other node is left as it is; a MatMul/Gemm/Conv that cannot be rewritten is
//! skipped and listed in the report with the reason.

use std::collections::HashMap;

use fleetbench_common::proto::onnx::{GraphProto, ModelProto, NodeProto, TensorProto};

use crate::graph::{self, Names, attr_f, attr_i, dtype, node, op};
use crate::{Calibration, OptError, Report};

/// Which kind of weighted node, and where its output channels are in the weight.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    MatMul,
    Gemm { trans_b: bool },
    Conv,
}

/// A node a quantization recipe may rewrite.
#[derive(Debug, Clone)]
struct Target {
    index: usize,
    kind: Kind,
    act: String,
    weight: String,
    bias: Option<String>,
}

impl Kind {
    /// Axis of the weight that holds output channels.
    fn channel_axis(self) -> usize {
        match self {
            Kind::MatMul | Kind::Gemm { trans_b: false } => 1,
            Kind::Gemm { trans_b: true } | Kind::Conv => 0,
        }
    }
}

/// Channel index of flat element `i` of a tensor with `dims`, along `axis`.
pub(crate) fn channel_of(i: usize, dims: &[i64], axis: usize) -> usize {
    let inner: usize = dims[axis + 1..].iter().map(|d| *d as usize).product();
    (i / inner) % dims[axis] as usize
}

/// Symmetric int8 quantization (zero point 0, range ±127), per channel along `axis` or per tensor.
pub(crate) fn quantize_symmetric(
    w: &[f32],
    dims: &[i64],
    axis: Option<usize>,
) -> (Vec<i8>, Vec<f32>) {
    let channels = axis.map(|a| dims[a] as usize).unwrap_or(1);
    let mut max = vec![0f32; channels];
    for (i, v) in w.iter().enumerate() {
        let c = axis.map(|a| channel_of(i, dims, a)).unwrap_or(0);
        max[c] = max[c].max(v.abs());
    }
    let scales: Vec<f32> = max
        .iter()
        .map(|m| if *m > 0.0 { m / 127.0 } else { 1.0 })
        .collect();
    let q = w
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let c = axis.map(|a| channel_of(i, dims, a)).unwrap_or(0);
            (v / scales[c]).round().clamp(-127.0, 127.0) as i8
        })
        .collect();
    (q, scales)
}

/// Asymmetric uint8 parameters for a real range (which always includes 0, so that 0 is exact).
pub(crate) fn uint8_params(lo: f32, hi: f32) -> (f32, u8) {
    let (lo, hi) = (lo.min(0.0), hi.max(0.0));
    if hi - lo <= f32::EPSILON {
        return (1.0, 0);
    }
    let scale = (hi - lo) / 255.0;
    let zp = (-lo / scale).round().clamp(0.0, 255.0) as u8;
    (scale, zp)
}

/// Finds the weighted nodes of the graph; those that do not qualify are recorded as skipped.
fn targets(g: &GraphProto, report: &mut Report) -> Vec<Target> {
    let inits = graph::initializers(g);
    let mut out = Vec::new();
    for (index, n) in g.node.iter().enumerate() {
        let kind = match op(n) {
            "MatMul" => Kind::MatMul,
            "Gemm" => Kind::Gemm {
                trans_b: attr_i(n, "transB").unwrap_or(0) != 0,
            },
            "Conv" => Kind::Conv,
            _ => continue,
        };
        if !n.domain.as_deref().unwrap_or("").is_empty() {
            continue;
        }
        let skip = |report: &mut Report, reason: &str| report.skip(n, index, reason);
        let (Some(act), Some(weight)) = (n.input.first(), n.input.get(1)) else {
            skip(report, "missing inputs");
            continue;
        };
        let Some(&wi) = inits.get(weight) else {
            skip(report, "the weight is not a constant initializer");
            continue;
        };
        let w = &g.initializer[wi];
        if w.data_type != Some(dtype::FLOAT) {
            skip(report, "the weight is not float32");
            continue;
        }
        let rank_ok = match kind {
            Kind::MatMul | Kind::Gemm { .. } => w.dims.len() == 2,
            Kind::Conv => w.dims.len() >= 3,
        };
        if !rank_ok {
            skip(
                report,
                &format!("weight of shape {:?} is not supported", w.dims),
            );
            continue;
        }
        if inits.contains_key(act) {
            skip(report, "the activation input is a constant");
            continue;
        }
        if matches!(kind, Kind::Gemm { .. }) && attr_i(n, "transA").unwrap_or(0) != 0 {
            skip(report, "Gemm with transA=1 is not supported");
            continue;
        }
        let bias = n.input.get(2).filter(|b| !b.is_empty()).cloned();
        out.push(Target {
            index,
            kind,
            act: act.clone(),
            weight: weight.clone(),
            bias,
        });
    }
    out
}

fn weight_values(
    g: &GraphProto,
    name: &str,
    n: &NodeProto,
    index: usize,
) -> Result<(Vec<f32>, Vec<i64>), OptError> {
    let t = g
        .initializer
        .iter()
        .find(|t| t.name.as_deref() == Some(name))
        .expect("target weight is an initializer");
    let v = graph::node_f32(n, index, t, "weight")?;
    Ok((v, t.dims.clone()))
}

/// Replaces the graph's node list: each original node is preceded by the nodes `before` maps to it and
/// replaced by what `replace` maps to it (or kept).
fn splice(
    g: &mut GraphProto,
    mut before: HashMap<usize, Vec<NodeProto>>,
    mut replace: HashMap<usize, Vec<NodeProto>>,
    new_inits: Vec<TensorProto>,
) {
    let old = std::mem::take(&mut g.node);
    for (i, n) in old.into_iter().enumerate() {
        if let Some(pre) = before.remove(&i) {
            g.node.extend(pre);
        }
        match replace.remove(&i) {
            Some(r) => g.node.extend(r),
            None => g.node.push(n),
        }
    }
    g.initializer.extend(new_inits);
    drop_unused_initializers(g);
}

/// Removes initializers no node reads any more (the float weights that were replaced), and graph
/// inputs that only declared them.
pub(crate) fn drop_unused_initializers(g: &mut GraphProto) {
    let used: std::collections::HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(g.output.iter().filter_map(|o| o.name.clone()))
        .collect();
    let removed: std::collections::HashSet<String> = g
        .initializer
        .iter()
        .filter_map(|t| t.name.clone())
        .filter(|n| !used.contains(n))
        .collect();
    g.initializer
        .retain(|t| t.name.as_ref().is_none_or(|n| !removed.contains(n)));
    g.input
        .retain(|v| v.name.as_ref().is_none_or(|n| !removed.contains(n)));
}

/// int8 dynamic: weights quantized ahead of time (symmetric int8 per tensor, as ONNX Runtime's
/// `quantize_dynamic` does by default), activations quantized at run time by DynamicQuantizeLinear.
pub fn int8_dynamic(model: &mut ModelProto, report: &mut Report) -> Result<(), OptError> {
    let opset = graph::opset(model);
    if opset < 11 {
        // Raising the opset in place could change what the model's other nodes mean.
        return Err(OptError::Model(format!(
            "int8-dynamic needs opset 11 or later (DynamicQuantizeLinear); the model has opset {opset}: \
             convert it first (e.g. onnx.version_converter), or use int8-weight-only"
        )));
    }
    let g = graph::graph_mut(model)?;
    let found = targets(g, report);
    let mut names = Names::of(g);
    let mut before: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut replace = HashMap::new();
    let mut inits = Vec::new();
    // One DynamicQuantizeLinear per activation tensor, shared by its consumers.
    let mut dq: HashMap<String, [String; 3]> = HashMap::new();
    let inits_index = graph::initializers(g);
    for t in &found {
        let n = &g.node[t.index];
        if let Kind::Gemm { .. } = t.kind {
            let alpha = attr_f(n, "alpha").unwrap_or(1.0);
            let beta = attr_f(n, "beta").unwrap_or(1.0);
            if t.bias
                .as_ref()
                .is_some_and(|b| !inits_index.contains_key(b))
                && beta != 1.0
            {
                report.skip(
                    n,
                    t.index,
                    "Gemm with beta != 1 and a computed C is not supported",
                );
                continue;
            }
            if alpha != 1.0 {
                report.skip(n, t.index, "Gemm with alpha != 1 is not supported");
                continue;
            }
        }
        let (w, dims) = weight_values(g, &t.weight, n, t.index)?;
        let base = t.weight.replace(['/', ':'], "_");
        // Gemm's B goes in as [K, N] whatever transB says.
        let (w, dims) = match t.kind {
            Kind::Gemm { trans_b: true } => {
                let (rows, cols) = (dims[0] as usize, dims[1] as usize);
                let mut tr = vec![0f32; w.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        tr[c * rows + r] = w[r * cols + c];
                    }
                }
                (tr, vec![dims[1], dims[0]])
            }
            _ => (w, dims),
        };
        let (q, scales) = quantize_symmetric(&w, &dims, None);
        let wq = names.fresh(&format!("{base}_quantized"));
        let ws = names.fresh(&format!("{base}_scale"));
        let wz = names.fresh(&format!("{base}_zero_point"));
        inits.push(graph::i8_tensor(&wq, &dims, &q));
        inits.push(graph::f32_tensor(&ws, &[], &scales));
        inits.push(graph::i8_tensor(&wz, &[], &[0]));
        let pre = before.entry(t.index).or_default();
        let [xq, xs, xz] = dq
            .entry(t.act.clone())
            .or_insert_with(|| {
                let a = t.act.replace(['/', ':'], "_");
                let outs = [
                    names.fresh(&format!("{a}_quantized")),
                    names.fresh(&format!("{a}_scale")),
                    names.fresh(&format!("{a}_zero_point")),
                ];
                pre.push(node(
                    "DynamicQuantizeLinear",
                    names.fresh(&format!("{a}_QuantizeLinear")),
                    &[&t.act],
                    &[&outs[0], &outs[1], &outs[2]],
                ));
                outs
            })
            .clone();
        let label = n
            .name
            .clone()
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| base.clone());
        let out = n.output[0].clone();
        let y32 = names.fresh(&format!("{out}_int32"));
        let yf = names.fresh(&format!("{out}_float"));
        let sc = names.fresh(&format!("{out}_scale"));
        let mut nodes = Vec::new();
        let mut integer = match t.kind {
            Kind::Conv => {
                let mut c = node(
                    "ConvInteger",
                    names.fresh(&format!("{label}_quant")),
                    &[&xq, &wq, &xz, &wz],
                    &[&y32],
                );
                c.attribute = n.attribute.clone();
                c
            }
            _ => node(
                "MatMulInteger",
                names.fresh(&format!("{label}_quant")),
                &[&xq, &wq, &xz, &wz],
                &[&y32],
            ),
        };
        integer.doc_string = n.doc_string.clone();
        nodes.push(integer);
        nodes.push(graph::cast(
            names.fresh(&format!("{label}_cast")),
            &y32,
            &yf,
            dtype::FLOAT,
        ));
        nodes.push(node(
            "Mul",
            names.fresh(&format!("{label}_scales_mul")),
            &[&xs, &ws],
            &[&sc],
        ));
        match &t.bias {
            None => nodes.push(node(
                "Mul",
                names.fresh(&format!("{label}_output_scale_mul")),
                &[&yf, &sc],
                &[&out],
            )),
            Some(b) => {
                let scaled = names.fresh(&format!("{out}_scaled"));
                nodes.push(node(
                    "Mul",
                    names.fresh(&format!("{label}_output_scale_mul")),
                    &[&yf, &sc],
                    &[&scaled],
                ));
                let bias_in = match (t.kind, inits_index.get(b)) {
                    // Conv's bias [M] broadcasts over [N, M, H, W] once reshaped to [M, 1, 1].
                    (Kind::Conv, Some(&bi)) => {
                        let bt = &g.initializer[bi];
                        let v = graph::node_f32(n, t.index, bt, "bias")?;
                        let mut shape = vec![v.len() as i64];
                        shape.extend(std::iter::repeat_n(1, dims.len() - 2));
                        let name = names.fresh(&format!("{b}_reshaped"));
                        inits.push(graph::f32_tensor(&name, &shape, &v));
                        name
                    }
                    (Kind::Conv, None) => {
                        return Err(graph::node_error(
                            n,
                            t.index,
                            "a computed Conv bias is not supported",
                        ));
                    }
                    (_, Some(&bi)) => {
                        let beta = attr_f(n, "beta").unwrap_or(1.0);
                        if beta == 1.0 {
                            b.clone()
                        } else {
                            let bt = &g.initializer[bi];
                            let v: Vec<f32> = graph::node_f32(n, t.index, bt, "C")?
                                .iter()
                                .map(|x| x * beta)
                                .collect();
                            let name = names.fresh(&format!("{b}_beta"));
                            inits.push(graph::f32_tensor(&name, &bt.dims, &v));
                            name
                        }
                    }
                    (_, None) => b.clone(),
                };
                nodes.push(node(
                    "Add",
                    names.fresh(&format!("{label}_bias_add")),
                    &[&scaled, &bias_in],
                    &[&out],
                ));
            }
        }
        replace.insert(t.index, nodes);
        report.rewrote(n, t.index);
    }
    splice(g, before, replace, inits);
    Ok(())
}

/// Tensors whose ranges int8-static needs: the activation input and the output of every weighted node.
pub fn calibration_tensors(model: &ModelProto) -> Vec<String> {
    let Some(g) = model.graph.as_ref() else {
        return Vec::new();
    };
    let mut scratch = Report::default();
    let mut out: Vec<String> = Vec::new();
    for t in targets(g, &mut scratch) {
        for name in [&t.act, &g.node[t.index].output[0]] {
            if !out.contains(name) {
                out.push(name.clone());
            }
        }
    }
    out
}

/// Adds a DequantizeLinear of `weight` (per channel when the opset allows it) and returns its output.
#[allow(clippy::too_many_arguments)]
fn dequantized_weight(
    g: &GraphProto,
    t: &Target,
    per_channel: bool,
    names: &mut Names,
    inits: &mut Vec<TensorProto>,
    pre: &mut Vec<NodeProto>,
) -> Result<(String, Vec<f32>), OptError> {
    let n = &g.node[t.index];
    let (w, dims) = weight_values(g, &t.weight, n, t.index)?;
    let axis = t.kind.channel_axis();
    let (q, scales) = quantize_symmetric(&w, &dims, per_channel.then_some(axis));
    let base = t.weight.replace(['/', ':'], "_");
    let wq = names.fresh(&format!("{base}_quantized"));
    let ws = names.fresh(&format!("{base}_scale"));
    let wz = names.fresh(&format!("{base}_zero_point"));
    let wd = names.fresh(&format!("{base}_DequantizeLinear_Output"));
    inits.push(graph::i8_tensor(&wq, &dims, &q));
    if per_channel {
        inits.push(graph::f32_tensor(&ws, &[scales.len() as i64], &scales));
        inits.push(graph::i8_tensor(
            &wz,
            &[scales.len() as i64],
            &vec![0; scales.len()],
        ));
    } else {
        inits.push(graph::f32_tensor(&ws, &[], &scales));
        inits.push(graph::i8_tensor(&wz, &[], &[0]));
    }
    let mut d = node(
        "DequantizeLinear",
        names.fresh(&format!("{base}_DequantizeLinear")),
        &[&wq, &ws, &wz],
        &[&wd],
    );
    if per_channel {
        d.attribute.push(graph::int_attr("axis", axis as i64));
    }
    pre.push(d);
    Ok((wd, scales))
}

/// int8 weight-only: per-channel symmetric int8 weights, widened in the graph by Cast and a Mul by
/// the channel scales; compute stays float. The artifact shrinks about 4x; ONNX Runtime folds the
/// widening into float weights when it loads the model (it does not fold DequantizeLinear, which would
/// run on every inference), so speed is the float model's. Needs opset 7.
pub fn int8_weight_only(model: &mut ModelProto, report: &mut Report) -> Result<(), OptError> {
    let opset = graph::opset(model);
    if opset < 7 {
        return Err(OptError::Model(format!(
            "int8-weight-only needs opset 7 or later (Mul with broadcasting); the model has opset {opset}: \
             convert it first (e.g. onnx.version_converter)"
        )));
    }
    let g = graph::graph_mut(model)?;
    let found = targets(g, report);
    let mut names = Names::of(g);
    let mut before: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut replace = HashMap::new();
    let mut inits = Vec::new();
    for t in &found {
        let n = &g.node[t.index];
        let (w, dims) = weight_values(g, &t.weight, n, t.index)?;
        let axis = t.kind.channel_axis();
        let (q, scales) = quantize_symmetric(&w, &dims, Some(axis));
        let base = t.weight.replace(['/', ':'], "_");
        let wq = names.fresh(&format!("{base}_int8"));
        let ws = names.fresh(&format!("{base}_scale"));
        let wf = names.fresh(&format!("{base}_widened"));
        let wd = names.fresh(&format!("{base}_dequantized"));
        // Scales shaped to broadcast along the channel axis.
        let mut sdims = vec![1i64; dims.len() - axis];
        sdims[0] = scales.len() as i64;
        inits.push(graph::i8_tensor(&wq, &dims, &q));
        inits.push(graph::f32_tensor(&ws, &sdims, &scales));
        let pre = before.entry(t.index).or_default();
        pre.push(graph::cast(
            names.fresh(&format!("{base}_widen")),
            &wq,
            &wf,
            dtype::FLOAT,
        ));
        pre.push(node(
            "Mul",
            names.fresh(&format!("{base}_rescale")),
            &[&wf, &ws],
            &[&wd],
        ));
        let mut new = n.clone();
        new.input[1] = wd;
        replace.insert(t.index, vec![new]);
        report.rewrote(n, t.index);
    }
    splice(g, before, replace, inits);
    Ok(())
}

/// int8 static, QDQ form: QuantizeLinear/DequantizeLinear pairs (uint8, calibrated ranges) on each
/// weighted node's activation input and output, per-channel int8 weights, int32 biases; ONNX Runtime
/// fuses these into QLinearConv / QLinearMatMul and runs them in int8.
pub fn int8_static(
    model: &mut ModelProto,
    calibration: &Calibration,
    report: &mut Report,
) -> Result<(), OptError> {
    let opset = graph::opset(model);
    if opset < 10 {
        return Err(OptError::Model(format!(
            "int8-static needs opset 10 or later (QuantizeLinear); the model has opset {opset}"
        )));
    }
    let per_channel = opset >= 13;
    if !per_channel {
        report
            .notes
            .push(format!("opset {opset} < 13: weights quantized per tensor"));
    }
    let g = graph::graph_mut(model)?;
    let found = targets(g, report);
    let inits_index = graph::initializers(g);
    let mut names = Names::of(g);
    let mut before: HashMap<usize, Vec<NodeProto>> = HashMap::new();
    let mut replace = HashMap::new();
    let mut inits = Vec::new();
    // One QDQ pair per activation tensor: (dequantized name, scale).
    let mut qdq: HashMap<String, (String, f32)> = HashMap::new();
    let qdq_pair = |tensor: &str,
                    input: &str,
                    output: &str,
                    names: &mut Names,
                    inits: &mut Vec<TensorProto>,
                    nodes: &mut Vec<NodeProto>|
     -> Option<f32> {
        let (lo, hi) = *calibration.ranges.get(tensor)?;
        let (scale, zp) = uint8_params(lo, hi);
        let base = tensor.replace(['/', ':'], "_");
        let s = names.fresh(&format!("{base}_scale"));
        let z = names.fresh(&format!("{base}_zero_point"));
        let q = names.fresh(&format!("{base}_QuantizeLinear_Output"));
        inits.push(graph::f32_tensor(&s, &[], &[scale]));
        inits.push(graph::u8_tensor(&z, &[], &[zp]));
        nodes.push(node(
            "QuantizeLinear",
            names.fresh(&format!("{base}_QuantizeLinear")),
            &[input, &s, &z],
            &[&q],
        ));
        nodes.push(node(
            "DequantizeLinear",
            names.fresh(&format!("{base}_DequantizeLinear")),
            &[&q, &s, &z],
            &[output],
        ));
        Some(scale)
    };
    for t in &found {
        let n = &g.node[t.index];
        let out = n.output[0].clone();
        if !calibration.ranges.contains_key(&t.act) || !calibration.ranges.contains_key(&out) {
            report.skip(n, t.index, "no calibrated range for its input or output");
            continue;
        }
        let mut pre = Vec::new();
        let (act_dq, act_scale) = match qdq.get(&t.act) {
            Some(v) => v.clone(),
            None => {
                let dqn = names.fresh(&format!(
                    "{}_DequantizeLinear_Output",
                    t.act.replace(['/', ':'], "_")
                ));
                let scale = qdq_pair(&t.act, &t.act, &dqn, &mut names, &mut inits, &mut pre)
                    .expect("range checked");
                qdq.insert(t.act.clone(), (dqn.clone(), scale));
                (dqn, scale)
            }
        };
        let (wd, wscales) =
            dequantized_weight(g, t, per_channel, &mut names, &mut inits, &mut pre)?;
        let mut new = n.clone();
        new.input[0] = act_dq;
        new.input[1] = wd;
        // A 1-D bias of one value per output channel goes in as int32 at scale act × weight.
        if let Some(b) = &t.bias
            && let Some(&bi) = inits_index.get(b)
        {
            let bt = &g.initializer[bi];
            let channels =
                g.initializer[inits_index[&t.weight]].dims[t.kind.channel_axis()] as usize;
            let beta = attr_f(n, "beta").unwrap_or(1.0);
            if bt.dims.len() == 1 && bt.dims[0] as usize == channels && beta == 1.0 {
                let v = graph::node_f32(n, t.index, bt, "bias")?;
                let scales: Vec<f32> = (0..channels)
                    .map(|c| act_scale * wscales[if wscales.len() == 1 { 0 } else { c }])
                    .collect();
                let q: Vec<i32> = v
                    .iter()
                    .zip(&scales)
                    .map(|(x, s)| (x / s).round().clamp(i32::MIN as f32, i32::MAX as f32) as i32)
                    .collect();
                let base = b.replace(['/', ':'], "_");
                let bq = names.fresh(&format!("{base}_quantized"));
                let bs = names.fresh(&format!("{base}_scale"));
                let bz = names.fresh(&format!("{base}_zero_point"));
                let bd = names.fresh(&format!("{base}_DequantizeLinear_Output"));
                inits.push(graph::i32_tensor(&bq, &[channels as i64], &q));
                let mut d = node(
                    "DequantizeLinear",
                    names.fresh(&format!("{base}_DequantizeLinear")),
                    &[&bq, &bs, &bz],
                    &[&bd],
                );
                if per_channel {
                    inits.push(graph::f32_tensor(&bs, &[channels as i64], &scales));
                    inits.push(graph::i32_tensor(
                        &bz,
                        &[channels as i64],
                        &vec![0; channels],
                    ));
                    d.attribute.push(graph::int_attr("axis", 0));
                } else {
                    inits.push(graph::f32_tensor(&bs, &[], &scales[..1]));
                    inits.push(graph::i32_tensor(&bz, &[], &[0]));
                }
                new.input[2] = bd;
                pre.push(d);
            }
        }
        // The output is quantized too, so that the runtime can fuse DQ → op → Q into one int8 kernel.
        let raw = names.fresh(&format!("{}_before_quant", out.replace(['/', ':'], "_")));
        new.output[0] = raw.clone();
        let mut post = vec![new];
        let scale =
            qdq_pair(&out, &raw, &out, &mut names, &mut inits, &mut post).expect("range checked");
        // A later node reading this output takes the dequantized tensor as it is.
        qdq.insert(out.clone(), (out.clone(), scale));
        before.insert(t.index, pre);
        replace.insert(t.index, post);
        report.rewrote(n, t.index);
    }
    splice(g, before, replace, inits);
    Ok(())
}

/// Parameters of int4 weight-only quantization.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Int4Params {
    /// Weights per block along K: 16, 32, 64, 128 or 256.
    pub block_size: u32,
    /// Symmetric blocks (zero point 8, no zero-point tensor) rather than min/max with zero points.
    pub symmetric: bool,
    /// MatMulNBits' `accuracy_level`: 0 (unset: float compute) or 1-4 (4: activations in int8).
    pub accuracy_level: u32,
}

/// Block sizes MatMulNBits takes.
pub const INT4_BLOCK_SIZES: &[u32] = &[16, 32, 64, 128, 256];

/// One column's blocks quantized to 4 bits: (packed bytes, scales, zero points), as ONNX Runtime's
/// `quantize_matmul_4bits` computes them. Asymmetric: the block's range widened to hold 0, scale =
/// (max - min) / 15, zero point round(-min / scale). Symmetric: the value of largest magnitude maps to
/// -8 (scale = that value / -8), zero point 8.
pub(crate) fn quantize_column_4bit(
    column: &[f32],
    block_size: usize,
    symmetric: bool,
) -> (Vec<u8>, Vec<f32>, Vec<u8>) {
    let blocks = column.len().div_ceil(block_size);
    let mut packed = vec![0u8; blocks * block_size / 2];
    let mut scales = Vec::with_capacity(blocks);
    let mut zeros = Vec::with_capacity(blocks);
    for b in 0..blocks {
        let block = &column[b * block_size..((b + 1) * block_size).min(column.len())];
        let (scale, zp) = if symmetric {
            let vmax = block
                .iter()
                .copied()
                .fold(0.0f32, |m, v| if v.abs() > m.abs() { v } else { m });
            (vmax / -8.0, 8u8)
        } else {
            let lo = block.iter().copied().fold(0.0f32, f32::min);
            let hi = block.iter().copied().fold(0.0f32, f32::max);
            let scale = (hi - lo) / 15.0;
            let zp = if scale != 0.0 {
                (-lo / scale).round().clamp(0.0, 15.0) as u8
            } else {
                0
            };
            (scale, zp)
        };
        let inv = if scale != 0.0 { 1.0 / scale } else { 0.0 };
        for k in 0..block_size {
            let q = match block.get(k) {
                Some(v) => ((v * inv).round() + f32::from(zp)).clamp(0.0, 15.0) as u8,
                None => zp,
            };
            let byte = &mut packed[(b * block_size + k) / 2];
            *byte |= if k % 2 == 0 { q } else { q << 4 };
        }
        scales.push(scale);
        zeros.push(zp);
    }
    (packed, scales, zeros)
}

/// int4 weight-only: MatMul weights in blocks of `block_size` along K, 4 bits each, as ONNX Runtime's
/// `MatMulNBits` (com.microsoft) takes them — packed `[N, blocks, block_size / 2]` uint8, scales
/// `[N, blocks]`, and zero points `[N, ceil(blocks / 2)]` (two per byte) unless symmetric — as
/// `MatMulNBitsQuantizer` lays them out. MatMul nodes with a constant float32 2-D weight are rewritten;
/// Gemm and Conv are left as they are, with the reason in the report.
pub fn int4_weight_only(
    model: &mut ModelProto,
    p: Int4Params,
    report: &mut Report,
) -> Result<(), OptError> {
    if !INT4_BLOCK_SIZES.contains(&p.block_size) {
        return Err(OptError::Param {
            field: "--block-size",
            reason: format!(
                "{} is not one of {:?} (MatMulNBits' block sizes)",
                p.block_size, INT4_BLOCK_SIZES
            ),
        });
    }
    if p.accuracy_level > 4 {
        return Err(OptError::Param {
            field: "--accuracy-level",
            reason: format!("{} is not 0-4", p.accuracy_level),
        });
    }
    let g = graph::graph_mut(model)?;
    let mut found = Vec::new();
    for t in targets(g, report) {
        if t.kind == Kind::MatMul {
            found.push(t);
        } else {
            let n = &g.node[t.index];
            report.skip(
                n,
                t.index,
                "int4-weight-only rewrites MatMul (MatMulNBits) only",
            );
        }
    }
    let mut names = Names::of(g);
    let mut replace = HashMap::new();
    let mut inits = Vec::new();
    let bs = p.block_size as usize;
    for t in &found {
        let n = &g.node[t.index];
        let (w, dims) = weight_values(g, &t.weight, n, t.index)?;
        let (k, cols) = (dims[0] as usize, dims[1] as usize);
        let blocks = k.div_ceil(bs);
        let (mut packed, mut scales, mut zeros) = (Vec::new(), Vec::new(), Vec::new());
        let mut column = vec![0f32; k];
        for c in 0..cols {
            for (r, v) in column.iter_mut().enumerate() {
                *v = w[r * cols + c];
            }
            let (q, s, z) = quantize_column_4bit(&column, bs, p.symmetric);
            packed.extend(q);
            scales.extend(s);
            for pair in z.chunks(2) {
                zeros.push(pair[0] | pair.get(1).map_or(0, |h| h << 4));
            }
        }
        let base = t.weight.replace(['/', ':'], "_");
        let wq = names.fresh(&format!("{base}_Q4"));
        let ws = names.fresh(&format!("{base}_scales"));
        inits.push(graph::u8_tensor(
            &wq,
            &[cols as i64, blocks as i64, (bs / 2) as i64],
            &packed,
        ));
        inits.push(graph::f32_tensor(
            &ws,
            &[cols as i64, blocks as i64],
            &scales,
        ));
        let mut inputs = vec![t.act.as_str(), wq.as_str(), ws.as_str()];
        let wz = names.fresh(&format!("{base}_zero_points"));
        if !p.symmetric {
            inits.push(graph::u8_tensor(
                &wz,
                &[cols as i64, blocks.div_ceil(2) as i64],
                &zeros,
            ));
            inputs.push(&wz);
        }
        let out: Vec<&str> = n.output.iter().map(String::as_str).collect();
        let mut q = node(
            "MatMulNBits",
            names.fresh(&format!("{}_Q4", graph::node_label(n, t.index))),
            &inputs,
            &out,
        );
        q.domain = Some("com.microsoft".into());
        q.attribute.push(graph::int_attr("K", k as i64));
        q.attribute.push(graph::int_attr("N", cols as i64));
        q.attribute.push(graph::int_attr("bits", 4));
        q.attribute
            .push(graph::int_attr("block_size", i64::from(p.block_size)));
        if p.accuracy_level > 0 {
            q.attribute.push(graph::int_attr(
                "accuracy_level",
                i64::from(p.accuracy_level),
            ));
        }
        replace.insert(t.index, vec![q]);
        report.rewrote(n, t.index);
    }
    splice(g, HashMap::new(), replace, inits);
    if !found.is_empty()
        && !model
            .opset_import
            .iter()
            .any(|o| o.domain.as_deref() == Some("com.microsoft"))
    {
        model
            .opset_import
            .push(fleetbench_common::proto::onnx::OperatorSetIdProto {
                domain: Some("com.microsoft".into()),
                version: Some(1),
            });
    }
    Ok(())
}

#[cfg(test)]
mod int4_tests {
    use super::*;

    fn dequantize(packed: &[u8], scales: &[f32], zeros: &[u8], bs: usize, k: usize) -> Vec<f32> {
        (0..k)
            .map(|i| {
                let byte = packed[i / 2];
                let q = if i % 2 == 0 { byte & 0x0F } else { byte >> 4 };
                (f32::from(q) - f32::from(zeros[i / bs])) * scales[i / bs]
            })
            .collect()
    }

    #[test]
    fn four_bit_blocks_round_trip_within_half_a_step_and_pad_with_the_zero_point() {
        let column: Vec<f32> = (0..70)
            .map(|i| ((i * 37 % 23) as f32 - 9.0) * 0.11)
            .collect();
        for symmetric in [false, true] {
            let (packed, scales, zeros) = quantize_column_4bit(&column, 32, symmetric);
            assert_eq!(packed.len(), 3 * 16, "3 blocks of 32, two per byte");
            assert_eq!(scales.len(), 3);
            let back = dequantize(&packed, &scales, &zeros, 32, 96);
            for (i, (a, b)) in column.iter().zip(&back).enumerate() {
                let step = scales[i / 32].abs();
                assert!(
                    (a - b).abs() <= step * 0.5 + 1e-6,
                    "{symmetric} {i}: {a} vs {b}"
                );
            }
            // The padding past K dequantizes to 0.
            assert!(back[70..].iter().all(|v| *v == 0.0), "{:?}", &back[70..]);
            if symmetric {
                assert!(zeros.iter().all(|z| *z == 8));
            }
        }
    }
}
