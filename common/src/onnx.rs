//! Reading ONNX models: checks that bytes are an ONNX model, and reads the graph's inputs, outputs and
//! weight types.

use prost::Message;

use crate::domain::TensorInfo;
use crate::proto::onnx::{
    ModelProto, TensorProto, TypeProto, tensor_shape_proto::dimension, type_proto,
};

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
    /// ONNX IR version the model is stamped with.
    pub ir_version: i64,
    /// Default variant name from the dominant weight type: "fp32", "fp16", "int8", ...
    pub weight_kind: &'static str,
    /// Initializers whose data lives in external files, in graph order.
    pub external_data: Vec<ExternalRef>,
    /// Decoders: the position limit stated in the model's metadata (`max_position_embeddings`).
    pub max_positions: Option<i64>,
}

/// Where an initializer keeps its data outside the model file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExternalRef {
    /// The initializer.
    pub tensor: String,
    /// `location`: the file, relative to the model's folder, as written.
    pub location: String,
    /// `offset` in the file (0 when absent).
    pub offset: u64,
    /// `length` in bytes; None when absent (to the end of the file).
    pub length: Option<u64>,
}

impl ExternalRef {
    /// One past the last byte read, when the length is known.
    pub fn end(&self) -> Option<u64> {
        self.length.map(|l| self.offset.saturating_add(l))
    }
}

/// TensorProto.DataLocation.EXTERNAL.
const EXTERNAL: i32 = 1;

/// The initializers of a graph that keep their data in external files, with where each reads it.
pub fn external_data(graph: &fleetbench_proto::onnx::GraphProto) -> Vec<ExternalRef> {
    graph.initializer.iter().filter_map(external_ref).collect()
}

/// Where one initializer keeps its data, when it is external.
pub fn external_ref(t: &TensorProto) -> Option<ExternalRef> {
    if t.data_location.unwrap_or(0) != EXTERNAL {
        return None;
    }
    let get = |k: &str| {
        t.external_data
            .iter()
            .find(|e| e.key() == k)
            .map(|e| e.value().to_string())
    };
    Some(ExternalRef {
        tensor: t.name().to_string(),
        location: get("location").unwrap_or_default(),
        offset: get("offset").and_then(|v| v.parse().ok()).unwrap_or(0),
        length: get("length").and_then(|v| v.parse().ok()),
    })
}

/// Checks an external-data `location` as a path relative to the model's folder, and returns it with
/// `/` separators and without `.` parts. Refused: empty, absolute paths, `..` parts (a location must
/// not reach outside the model's folder), backslashes and control characters.
pub fn check_location(location: &str) -> Result<String, String> {
    if location.is_empty() {
        return Err("the location is empty".into());
    }
    if location.starts_with('/') || location.starts_with('\\') || location.get(1..2) == Some(":") {
        return Err(format!(
            "'{location}' is an absolute path; external data must lie beside the model or below it"
        ));
    }
    if location.chars().any(|c| c.is_control() || c == '\\') {
        return Err(format!(
            "'{location}' holds a backslash or a control character; use '/' between folders"
        ));
    }
    let mut parts = Vec::new();
    for part in location.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                return Err(format!(
                    "'{location}' leaves the model's folder ('..'); external data must lie beside the \
                     model or below it"
                ));
            }
            p => parts.push(p),
        }
    }
    if parts.is_empty() {
        return Err(format!("'{location}' names no file"));
    }
    Ok(parts.join("/"))
}

/// Decodes a model and checks that it looks like one.
pub fn decode_model(bytes: &[u8]) -> Result<ModelProto, OnnxError> {
    let model = ModelProto::decode(bytes).map_err(|e| OnnxError::Decode(e.to_string()))?;
    check_model(&model)?;
    Ok(model)
}

/// Checks that a decoded model has what every runnable model has.
pub fn check_model(model: &ModelProto) -> Result<(), OnnxError> {
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
    Ok(())
}

/// Inspects a model file without reading its weights (see [`crate::onnx_scan`]).
pub fn inspect_file(path: &std::path::Path) -> Result<ModelInfo, OnnxError> {
    let f = std::fs::File::open(path)
        .map_err(|e| OnnxError::Decode(format!("cannot open {}: {e}", path.display())))?;
    Ok(info_of(&crate::onnx_scan::scan(f)?))
}

/// What [`inspect_model`] reads, from a scanned model.
pub fn info_of(scanned: &crate::onnx_scan::Scanned) -> ModelInfo {
    let mut info = inspect_model(&scanned.model);
    info.node_count = scanned.node_count;
    info
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
        ir_version: model.ir_version.unwrap_or(0),
        weight_kind: weight_kind(&graph.initializer),
        external_data: external_data(&graph),
        max_positions: model
            .metadata_props
            .iter()
            .find(|p| p.key() == "max_position_embeddings")
            .and_then(|p| p.value().trim().parse().ok())
            .filter(|v: &i64| *v > 0),
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

#[cfg(test)]
mod decoding_outside_bytes {
    use proptest::prelude::*;

    fn student() -> Vec<u8> {
        std::fs::read(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../models/digits/digits-student.onnx"
        ))
        .expect("the bundled student model")
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        /// Any bytes: an error or a model, never a panic.
        #[test]
        fn any_bytes_inspect_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..2048)) {
            let _ = super::inspect(&bytes);
        }

        /// A real model with bytes changed or cut short: the same.
        #[test]
        fn damaged_models_inspect_or_fail_cleanly(
            flips in proptest::collection::vec((any::<usize>(), any::<u8>()), 0..16),
            cut in any::<usize>(),
        ) {
            let mut bytes = student();
            for (at, b) in flips {
                let n = bytes.len();
                bytes[at % n] = b;
            }
            let n = bytes.len();
            bytes.truncate(cut % (n + 1));
            let _ = super::inspect(&bytes);
        }
    }
}
