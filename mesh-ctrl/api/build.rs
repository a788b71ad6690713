//! Compiles the .proto files with the protoc shipped in the protoc-bin-vendored crate, so no
//! system protoc is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build reads PROTOC from the environment; build scripts are single-threaded.
    std::env::set_var("PROTOC", protoc);
    tonic_prost_build::configure().compile_protos(
        &[
            "proto/config.proto",
            "proto/admin.proto",
            "proto/ca.proto",
            "proto/envoy/service/ratelimit/v3/rls.proto",
            "proto/opentelemetry/proto/collector/trace/v1/trace_service.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
