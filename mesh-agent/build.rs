//! Embeds the eBPF object built by `cargo xtask build` (nightly, bpfel-unknown-none) so the
//! agent ships as one binary.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=FERRYMESH_EBPF_OBJ");
    println!("cargo:rerun-if-env-changed=CARGO_TARGET_DIR");
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("set by cargo"));
    let target = std::env::var("CARGO_TARGET_DIR").map(PathBuf::from).unwrap_or_else(|_| manifest.join("../target"));
    let object = std::env::var("FERRYMESH_EBPF_OBJ")
        .map(PathBuf::from)
        .unwrap_or_else(|_| target.join("bpfel-unknown-none/release/mesh-ebpf"));
    println!("cargo:rerun-if-changed={}", object.display());
    assert!(
        object.is_file(),
        "eBPF object {} not found: build it first with `cargo xtask build` (or point FERRYMESH_EBPF_OBJ at it)",
        object.display()
    );
    let out = PathBuf::from(std::env::var("OUT_DIR").expect("set by cargo")).join("mesh-ebpf.o");
    std::fs::copy(&object, &out).expect("copy the eBPF object into OUT_DIR");
}
