//! Generates the gRPC code from `tessera.proto` with a vendored protoc, so building needs no
//! system protobuf compiler. The descriptor set feeds gRPC reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through this variable.
    std::env::set_var("PROTOC", protoc);
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("tessera_descriptor.bin"))
        .compile_protos(&["tessera.proto"], &["."])?;
    println!("cargo:rerun-if-changed=tessera.proto");
    Ok(())
}
