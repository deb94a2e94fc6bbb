//! Domain logic shared by the fleetbench coordinator, agent and CLI: the shared domain model
//! ([`domain`], converted to and from the wire in [`convert`]), latency histograms and their statistics,
//! labels and selectors, platform fingerprints, run configuration rules, and ONNX model inspection.

pub mod artifact;
pub mod changepoint;
pub mod config;
pub mod convert;
pub mod domain;
pub mod files;
pub mod hist;
pub mod ids;
pub mod intervals;
pub mod labels;
pub mod logging;
pub mod network;
pub mod onnx;
pub mod onnx_scan;
pub mod platform;
pub mod protocol;
pub mod quality;
pub mod redact;
pub mod token;

pub use fleetbench_proto as proto;

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or_default()
}

/// Lower-case hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(bytes))
}

/// Version of fleetbench, the same for all its binaries.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
