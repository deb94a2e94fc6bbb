//! Small helpers over onnx.proto's prost types: tensor data in and out, attributes, node construction,
//! fresh names, consumers, and a forward pass over element types.

use std::collections::{HashMap, HashSet};

use fleetbench_common::proto::onnx::{
    AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto, TypeProto, ValueInfoProto,
    type_proto,
};

use crate::OptError;

/// onnx.TensorProto.DataType values used here.
pub mod dtype {
    /// float32.
    pub const FLOAT: i32 = 1;
    /// uint8.
    pub const UINT8: i32 = 2;
    /// int8.
    pub const INT8: i32 = 3;
    /// int32.
    pub const INT32: i32 = 6;
    /// int64.
    pub const INT64: i32 = 7;
    /// bool.
    pub const BOOL: i32 = 9;
    /// float16.
    pub const FLOAT16: i32 = 10;
}

/// The node's op type.
pub fn op(n: &NodeProto) -> &str {
    n.op_type.as_deref().unwrap_or("")
}

/// A readable name for a node: its own, or its position and first output.
pub fn node_label(n: &NodeProto, index: usize) -> String {
    match n.name.as_deref() {
        Some(s) if !s.is_empty() => s.to_string(),
        _ => format!(
            "#{index} ({})",
            n.output.first().map(String::as_str).unwrap_or("")
        ),
    }
}

/// An integer attribute.
pub fn attr_i(n: &NodeProto, name: &str) -> Option<i64> {
    n.attribute
        .iter()
        .find(|a| a.name.as_deref() == Some(name))
        .and_then(|a| a.i)
}

/// A float attribute.
pub fn attr_f(n: &NodeProto, name: &str) -> Option<f32> {
    n.attribute
        .iter()
        .find(|a| a.name.as_deref() == Some(name))
        .and_then(|a| a.f)
}

/// An INT attribute.
pub fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.to_string()),
        r#type: Some(2),
        i: Some(v),
        ..Default::default()
    }
}

/// A node in the default domain.
pub fn node(op: &str, name: String, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: Some(op.to_string()),
        name: Some(name),
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// A Cast node.
pub fn cast(name: String, input: &str, output: &str, to: i32) -> NodeProto {
    let mut n = node("Cast", name, &[input], &[output]);
    n.attribute.push(int_attr("to", to as i64));
    n
}

/// The error for a node a recipe must rewrite and cannot.
pub fn node_error(n: &NodeProto, index: usize, reason: impl Into<String>) -> OptError {
    OptError::Node {
        node: node_label(n, index),
        op: op(n).to_string(),
        reason: reason.into(),
    }
}

/// A float32 initializer that node `n` reads as its `role` (weight, bias, ...), or an error naming
/// the node, its op, the role and the tensor.
pub fn node_f32(
    n: &NodeProto,
    index: usize,
    t: &TensorProto,
    role: &str,
) -> Result<Vec<f32>, OptError> {
    f32_values(t).map_err(|reason| {
        node_error(
            n,
            index,
            format!("{role} '{}': {reason}", t.name.as_deref().unwrap_or("")),
        )
    })
}

/// Element count of a shape.
pub fn numel(dims: &[i64]) -> usize {
    dims.iter().map(|d| (*d).max(0) as usize).product()
}

/// A float32 tensor's values (raw or typed storage); external data is refused.
pub fn f32_values(t: &TensorProto) -> Result<Vec<f32>, String> {
    if t.data_location == Some(1) || !t.external_data.is_empty() {
        return Err("weights stored as external data are not supported".into());
    }
    if t.data_type != Some(dtype::FLOAT) {
        return Err(format!(
            "tensor type {} is not float32",
            t.data_type.unwrap_or(0)
        ));
    }
    let v: Vec<f32> = match &t.raw_data {
        Some(raw) if !raw.is_empty() => raw
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        _ => t.float_data.clone(),
    };
    if v.len() != numel(&t.dims) {
        return Err(format!("holds {} values for shape {:?}", v.len(), t.dims));
    }
    Ok(v)
}

fn raw_tensor(name: &str, dims: &[i64], data_type: i32, raw: Vec<u8>) -> TensorProto {
    TensorProto {
        name: Some(name.to_string()),
        dims: dims.to_vec(),
        data_type: Some(data_type),
        raw_data: Some(raw),
        ..Default::default()
    }
}

/// A float32 tensor.
pub fn f32_tensor(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    raw_tensor(
        name,
        dims,
        dtype::FLOAT,
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

/// A float16 tensor from float32 values.
pub fn f16_tensor(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    raw_tensor(
        name,
        dims,
        dtype::FLOAT16,
        v.iter()
            .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
            .collect(),
    )
}

/// An int8 tensor.
pub fn i8_tensor(name: &str, dims: &[i64], v: &[i8]) -> TensorProto {
    raw_tensor(
        name,
        dims,
        dtype::INT8,
        v.iter().map(|x| *x as u8).collect(),
    )
}

/// A uint8 tensor.
pub fn u8_tensor(name: &str, dims: &[i64], v: &[u8]) -> TensorProto {
    raw_tensor(name, dims, dtype::UINT8, v.to_vec())
}

/// An int32 tensor.
pub fn i32_tensor(name: &str, dims: &[i64], v: &[i32]) -> TensorProto {
    raw_tensor(
        name,
        dims,
        dtype::INT32,
        v.iter().flat_map(|x| x.to_le_bytes()).collect(),
    )
}

/// Fresh tensor and node names that collide with nothing in the graph.
pub struct Names {
    used: HashSet<String>,
}

impl Names {
    /// Every name the graph uses.
    pub fn of(g: &GraphProto) -> Names {
        let mut used = HashSet::new();
        for n in &g.node {
            used.extend(n.input.iter().cloned());
            used.extend(n.output.iter().cloned());
            if let Some(name) = &n.name {
                used.insert(name.clone());
            }
        }
        used.extend(g.initializer.iter().filter_map(|t| t.name.clone()));
        used.extend(g.input.iter().filter_map(|v| v.name.clone()));
        used.extend(g.output.iter().filter_map(|v| v.name.clone()));
        Names { used }
    }

    /// `base`, or `base_2`, `base_3`, ... whichever is free.
    pub fn fresh(&mut self, base: &str) -> String {
        let mut name = base.to_string();
        let mut i = 2;
        while self.used.contains(&name) {
            name = format!("{base}_{i}");
            i += 1;
        }
        self.used.insert(name.clone());
        name
    }
}

/// The model's graph, or an error.
pub fn graph_mut(model: &mut ModelProto) -> Result<&mut GraphProto, OptError> {
    model
        .graph
        .as_mut()
        .ok_or_else(|| OptError::NotOnnx("no graph".into()))
}

/// Opset of the default domain.
pub fn opset(model: &ModelProto) -> i64 {
    model
        .opset_import
        .iter()
        .find(|o| {
            o.domain.as_deref().unwrap_or("").is_empty() || o.domain.as_deref() == Some("ai.onnx")
        })
        .and_then(|o| o.version)
        .unwrap_or(0)
}

/// Index of initializers by name.
pub fn initializers(g: &GraphProto) -> HashMap<String, usize> {
    g.initializer
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.name.clone().map(|n| (n, i)))
        .collect()
}

/// Indices of the nodes that read each tensor (and whether a graph output is that tensor).
pub fn consumers(g: &GraphProto) -> HashMap<String, Vec<usize>> {
    let mut map: HashMap<String, Vec<usize>> = HashMap::new();
    for (i, n) in g.node.iter().enumerate() {
        for input in &n.input {
            if !input.is_empty() {
                map.entry(input.clone()).or_default().push(i);
            }
        }
    }
    map
}

/// Names of graph outputs.
pub fn graph_outputs(g: &GraphProto) -> HashSet<String> {
    g.output.iter().filter_map(|v| v.name.clone()).collect()
}

/// Element type of a value info.
pub fn value_elem_type(v: &ValueInfoProto) -> Option<i32> {
    match v.r#type.as_ref()?.value.as_ref()? {
        type_proto::Value::TensorType(t) => t.elem_type,
        _ => None,
    }
}

/// Sets the element type of a value info that is a tensor.
pub fn set_value_elem_type(v: &mut ValueInfoProto, ty: i32) {
    if let Some(TypeProto {
        value: Some(type_proto::Value::TensorType(t)),
        ..
    }) = v.r#type.as_mut()
    {
        t.elem_type = Some(ty);
    }
}

/// Element types of every tensor, by a forward pass over the (topologically sorted) nodes: graph
/// inputs, initializers and value infos say; ops that fix their output type say; others output the
/// type of their first typed input.
pub fn elem_types(g: &GraphProto) -> HashMap<String, i32> {
    let mut types: HashMap<String, i32> = HashMap::new();
    for v in g.input.iter().chain(&g.value_info).chain(&g.output) {
        if let (Some(name), Some(t)) = (&v.name, value_elem_type(v)) {
            types.insert(name.clone(), t);
        }
    }
    for t in &g.initializer {
        if let (Some(name), Some(ty)) = (&t.name, t.data_type) {
            types.insert(name.clone(), ty);
        }
    }
    for n in &g.node {
        let first = n
            .input
            .iter()
            .find_map(|i| types.get(i).copied())
            .unwrap_or(dtype::FLOAT);
        for (k, out) in n.output.iter().enumerate() {
            if out.is_empty() || types.contains_key(out) {
                continue;
            }
            let ty = match (op(n), k) {
                ("Cast", 0) => attr_i(n, "to").map(|t| t as i32).unwrap_or(first),
                ("Shape" | "Size" | "ArgMax" | "ArgMin" | "NonZero", _) => dtype::INT64,
                ("TopK" | "MaxPool", 1) => dtype::INT64,
                (
                    "Equal" | "Less" | "Greater" | "LessOrEqual" | "GreaterOrEqual" | "Not" | "And"
                    | "Or" | "Xor" | "IsNaN" | "IsInf",
                    _,
                ) => dtype::BOOL,
                ("Constant", _) => n
                    .attribute
                    .iter()
                    .find_map(|a| a.t.as_ref().and_then(|t| t.data_type))
                    .unwrap_or(dtype::FLOAT),
                ("ConstantOfShape", _) => n
                    .attribute
                    .iter()
                    .find_map(|a| a.t.as_ref().and_then(|t| t.data_type))
                    .unwrap_or(dtype::FLOAT),
                ("DequantizeLinear", _) => dtype::FLOAT,
                ("QuantizeLinear", _) => n
                    .input
                    .get(2)
                    .and_then(|z| types.get(z).copied())
                    .unwrap_or(dtype::UINT8),
                ("DynamicQuantizeLinear", 0 | 2) => dtype::UINT8,
                ("DynamicQuantizeLinear", 1) => dtype::FLOAT,
                ("MatMulInteger" | "ConvInteger", _) => dtype::INT32,
                ("Where", _) => n
                    .input
                    .get(1)
                    .and_then(|x| types.get(x).copied())
                    .unwrap_or(first),
                _ => first,
            };
            types.insert(out.clone(), ty);
        }
    }
    types
}

/// Serialized size of a model.
pub fn encoded_len(model: &ModelProto) -> usize {
    prost::Message::encoded_len(model)
}

/// The tensor a `Constant` node holds, named after its output; None for the forms a weight never
/// takes (sparse tensors, strings).
fn constant_tensor(n: &NodeProto) -> Option<TensorProto> {
    let name = n.output.first()?.clone();
    let attr = n.attribute.first()?;
    let mut t = match attr.name.as_deref()? {
        "value" => attr.t.clone()?,
        "value_float" => f32_tensor(&name, &[], &[attr.f?]),
        "value_floats" => f32_tensor(&name, &[attr.floats.len() as i64], &attr.floats),
        "value_int" => TensorProto {
            dims: vec![],
            data_type: Some(dtype::INT64),
            int64_data: vec![attr.i?],
            ..Default::default()
        },
        "value_ints" => TensorProto {
            dims: vec![attr.ints.len() as i64],
            data_type: Some(dtype::INT64),
            int64_data: attr.ints.clone(),
            ..Default::default()
        },
        _ => return None,
    };
    t.name = Some(name);
    Some(t)
}

/// Makes constant weights look the way recipes expect them: `Constant` nodes of the main graph become
/// initializers (TensorFlow and Paddle exporters often hold weights in them), and initializers that
/// are also listed as graph inputs (required before IR version 4) stop being inputs, so nothing can
/// override them at run time. Returns notes for the report; the model means the same afterwards.
pub fn fold_constants(model: &mut ModelProto) -> Result<Vec<String>, OptError> {
    let g = graph_mut(model)?;
    let mut notes = Vec::new();
    let mut folded = 0usize;
    let mut kept = Vec::with_capacity(g.node.len());
    for n in std::mem::take(&mut g.node) {
        let single = op(&n) == "Constant"
            && n.domain.as_deref().unwrap_or("").is_empty()
            && n.output.len() == 1
            && n.attribute.len() == 1;
        match single.then(|| constant_tensor(&n)).flatten() {
            Some(t) => {
                g.initializer.push(t);
                folded += 1;
            }
            None => kept.push(n),
        }
    }
    g.node = kept;
    if folded > 0 {
        notes.push(format!(
            "{folded} Constant nodes held weights; they were folded into initializers first"
        ));
    }
    let inits: HashSet<String> = g
        .initializer
        .iter()
        .filter_map(|t| t.name.clone())
        .collect();
    let before = g.input.len();
    g.input
        .retain(|v| !v.name.as_ref().is_some_and(|n| inits.contains(n)));
    let moved = before - g.input.len();
    if moved > 0 {
        notes.push(format!(
            "{moved} initializers were also listed as graph inputs (IR version {}); they are constants now",
            model.ir_version.unwrap_or(0)
        ));
        // Initializers that are not inputs need IR version 4 or later.
        if model.ir_version.unwrap_or(0) < 4 {
            model.ir_version = Some(4);
        }
    }
    Ok(notes)
}
