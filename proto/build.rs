//! Generates Rust code for the fleetbench gRPC API and the ONNX model format.
//! protoc comes from protoc-bin-vendored, so no system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { std::env::set_var("PROTOC", protoc) };

    let api = [
        "fleetbench/v1/types.proto",
        "fleetbench/v1/models.proto",
        "fleetbench/v1/agent.proto",
        "fleetbench/v1/jobs.proto",
        "fleetbench/v1/fleet.proto",
        "fleetbench/v1/rankings.proto",
        "fleetbench/v1/admin.proto",
    ];
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("fleetbench_descriptor.bin"))
        .build_server(true)
        .build_client(true)
        .type_attribute(".fleetbench.v1", "#[derive(serde::Serialize)]")
        .compile_protos(&api, &["."])?;

    tonic_prost_build::configure()
        .build_server(false)
        .build_client(false)
        .compile_protos(&["onnx/onnx-ml.proto"], &["."])?;

    for file in api.iter().chain(["onnx/onnx-ml.proto"].iter()) {
        println!("cargo:rerun-if-changed={file}");
    }
    Ok(())
}
