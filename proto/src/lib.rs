//! Generated types of the fleetbench gRPC API (`fleetbench.v1`) and of the ONNX model format (`onnx`).

/// The fleetbench v1 API: messages and tonic clients and servers.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("fleetbench.v1");
}

/// The ONNX model format (`onnx-ml.proto`), used to inspect and rewrite graphs.
pub mod onnx {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("onnx");
}
