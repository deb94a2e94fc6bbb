//! ONNX Runtime for fleetbench, shared by the agent, the CLI's optimizer checks and the benchmarks:
//! [`load`] finds and loads the runtime library (`load-dynamic`: each machine brings its own build) and
//! reports its version and providers; [`inputs`] builds a session's input tensors from its own
//! metadata; [`data`] reads .npy/.npz files; [`batches`] cuts a data set into batches and reads outputs
//! back as numbers; [`decoder`] detects decoder-only language models and generates tokens with their KV
//! cache; [`memory`] has the process ask for transparent huge pages for the runtime's memory.

pub mod batches;
pub mod compat;
pub mod data;
pub mod decoder;
pub mod inputs;
pub mod load;
pub mod memory;

pub use load::{Runtime, load};

/// What can go wrong loading the runtime or building its inputs.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// ONNX Runtime could not be loaded, or is too old.
    #[error("{0}")]
    Load(String),
    /// Data or inputs do not fit the model; the message names the input or file.
    #[error("{0}")]
    Data(String),
}

/// Result with the runtime's error.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

impl From<ort::Error> for RuntimeError {
    fn from(e: ort::Error) -> Self {
        RuntimeError::Data(format!("onnxruntime: {e}"))
    }
}
