//! Reading ONNX models: checks that bytes are an ONNX model, and reads the graph's inputs, outputs and
//! weight types.

use prost::Message;

use crate::proto::onnx::{
    ModelProto, TensorProto, TypeProto, tensor_shape_proto::dimension, type_proto,
};
use crate::proto::v1::TensorInfo;

/// Why bytes are not a usable ONNX model.
#[derive(Debug, thiserror::Error)]
pub enum OnnxError {
    /// Not a protobuf ModelProto at all.
    #[error("not an ONNX model: {0}")]
    Decode(String),
    /// A ModelProto without what every runnable model has.
    #[error("not an ONNX model: {0}")]
    Incomplete(&'static str),
}

/// What fleetbench needs to know about a model.
#[derive(Debug, Clone)]
pub struct ModelInfo {
    /// Graph inputs that are not initializers.
    pub inputs: Vec<TensorInfo>,
    /// Graph outputs.
    pub outputs: Vec<TensorInfo>,
    /// Number of nodes in the main graph.
    pub node_count: usize,
    /// Opset of the default domain.
    pub opset: i64,
    /// Default variant name from the dominant weight type: "fp32", "fp16", "int8", ...
    pub weight_kind: &'static str,
}

/// Decodes a model and checks that it looks like one.
pub fn decode_model(bytes: &[u8]) -> Result<ModelProto, OnnxError> {
    let model = ModelProto::decode(bytes).map_err(|e| OnnxError::Decode(e.to_string()))?;
    if model.ir_version.unwrap_or(0) <= 0 {
        return Err(OnnxError::Incomplete("ir_version is missing"));
    }
    if model.opset_import.is_empty() {
        return Err(OnnxError::Incomplete("no opset_import"));
    }
    let graph = model
        .graph
        .as_ref()
        .ok_or(OnnxError::Incomplete("no graph"))?;
    if graph.output.is_empty() {
        return Err(OnnxError::Incomplete("the graph has no outputs"));
    }
    Ok(model)
}

/// Inspects a model's graph.
pub fn inspect(bytes: &[u8]) -> Result<ModelInfo, OnnxError> {
    let model = decode_model(bytes)?;
    Ok(inspect_model(&model))
}

/// Inspects a decoded model.
pub fn inspect_model(model: &ModelProto) -> ModelInfo {
    let graph = model.graph.clone().unwrap_or_default();
    let initializers: std::collections::HashSet<&str> =
        graph.initializer.iter().map(|t| t.name()).collect();
    let inputs = graph
        .input
        .iter()
        .filter(|v| !initializers.contains(v.name()))
        .map(|v| tensor_info(v.name(), v.r#type.as_ref()))
        .collect();
    let outputs = graph
        .output
        .iter()
        .map(|v| tensor_info(v.name(), v.r#type.as_ref()))
        .collect();
    let opset = model
        .opset_import
        .iter()
        .find(|o| o.domain().is_empty() || o.domain() == "ai.onnx")
        .map(|o| o.version())
        .unwrap_or(0);
    ModelInfo {
        inputs,
        outputs,
        node_count: graph.node.len(),
        opset,
        weight_kind: weight_kind(&graph.initializer),
    }
}

fn tensor_info(name: &str, ty: Option<&TypeProto>) -> TensorInfo {
    let mut info = TensorInfo {
        name: name.to_string(),
        ..Default::default()
    };
    if let Some(type_proto::Value::TensorType(t)) = ty.and_then(|t| t.value.as_ref()) {
        info.element_type = element_type_name(t.elem_type()).to_string();
        if let Some(shape) = &t.shape {
            for d in &shape.dim {
                match &d.value {
                    Some(dimension::Value::DimValue(v)) => {
                        info.dims.push(*v);
                        info.dim_names.push(String::new());
                    }
                    Some(dimension::Value::DimParam(p)) => {
                        info.dims.push(-1);
                        info.dim_names.push(p.clone());
                    }
                    None => {
                        info.dims.push(-1);
                        info.dim_names.push(String::new());
                    }
                }
            }
        }
    } else {
        info.element_type = "non-tensor".to_string();
    }
    info
}

/// ONNX element type name for a TensorProto.DataType value.
pub fn element_type_name(t: i32) -> &'static str {
    match t {
        1 => "float32",
        2 => "uint8",
        3 => "int8",
        4 => "uint16",
        5 => "int16",
        6 => "int32",
        7 => "int64",
        8 => "string",
        9 => "bool",
        10 => "float16",
        11 => "float64",
        12 => "uint32",
        13 => "uint64",
        14 => "complex64",
        15 => "complex128",
        16 => "bfloat16",
        17..=20 => "float8",
        21 => "uint4",
        22 => "int4",
        _ => "undefined",
    }
}

/// Bytes per element of a TensorProto.DataType (0 for strings and unknown types).
pub fn element_size(t: i32) -> usize {
    match t {
        2 | 3 | 9 | 17..=20 => 1,
        4 | 5 | 10 | 16 => 2,
        1 | 6 | 12 => 4,
        7 | 11 | 13 | 14 => 8,
        15 => 16,
        _ => 0,
    }
}

/// Number of elements of an initializer (product of its dims).
pub fn element_count(t: &TensorProto) -> usize {
    t.dims.iter().map(|d| (*d).max(0) as usize).product()
}

fn weight_kind(initializers: &[TensorProto]) -> &'static str {
    let mut bytes = [0usize; 32];
    for t in initializers {
        let dt = t.data_type() as usize;
        if dt < bytes.len() {
            bytes[dt] += element_count(t) * element_size(t.data_type());
        }
    }
    let int8 = bytes[2] + bytes[3];
    let (fp32, fp16, bf16) = (bytes[1], bytes[10], bytes[16]);
    let best = [
        (int8, "int8"),
        (fp16, "fp16"),
        (bf16, "bf16"),
        (fp32, "fp32"),
    ]
    .into_iter()
    .max_by_key(|(b, _)| *b)
    .expect("non-empty");
    if best.0 == 0 { "fp32" } else { best.1 }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_text_and_empty_files() {
        assert!(inspect(b"hello, this is a text file and not a model\n").is_err());
        assert!(inspect(b"").is_err());
        let err = inspect(&[0x08, 0x07]).unwrap_err(); // ir_version only
        assert!(err.to_string().starts_with("not an ONNX model"), "{err}");
    }
}
