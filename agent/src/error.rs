//! The agent's error type.

/// Everything that can go wrong in the agent.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// ONNX Runtime could not be loaded or is too old.
    #[error("{0}")]
    Runtime(String),
    /// A setting is wrong; the message names it.
    #[error("{0}")]
    Config(String),
    /// The coordinator answered with an error.
    #[error("coordinator: {0}")]
    Coordinator(#[from] tonic::Status),
    /// The coordinator could not be reached; says why (the whole chain of causes: "transport error"
    /// alone hides a refused connection or a certificate the CA did not sign).
    #[error("cannot reach the coordinator: {}", causes(.0))]
    Transport(#[from] tonic::transport::Error),
    /// The coordinator and the agent speak protocols they cannot both serve; names both versions.
    #[error("{0}")]
    Protocol(String),
    /// The coordinator refused the agent's join token or credential; says what to do.
    #[error("{0}")]
    Refused(String),
    /// The server did not prove to be the coordinator the join token pins; says what it presented.
    #[error("{0}")]
    Untrusted(String),
    /// Local file trouble (state directory, cache).
    #[error("{0}")]
    Io(String),
    /// A task cannot be run; the message says why (shown as the task's failure reason).
    #[error("{0}")]
    Task(String),
}

/// An error and its sources, joined by ": ".
fn causes(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(s) = next {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        next = s.source();
    }
    out
}

/// Result with the agent's error.
pub type Result<T, E = AgentError> = std::result::Result<T, E>;

impl From<fleetbench_runtime::RuntimeError> for AgentError {
    fn from(e: fleetbench_runtime::RuntimeError) -> Self {
        match e {
            fleetbench_runtime::RuntimeError::Load(m) => AgentError::Runtime(m),
            fleetbench_runtime::RuntimeError::Data(m) => AgentError::Task(m),
        }
    }
}

impl From<ort::Error> for AgentError {
    fn from(e: ort::Error) -> Self {
        AgentError::Task(format!("onnxruntime: {e}"))
    }
}
