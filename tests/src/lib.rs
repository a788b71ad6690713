//! The ferrymesh testbed: the network-namespace topology (docs/ARCHITECTURE.md, "Test harness")
//! and the helpers that run the mesh on it. One harness serves the end-to-end tests, `cargo
//! xtask demo` and the benchmarks. Needs root (network namespaces, eBPF).
#![deny(unsafe_code)]

pub mod bench;
pub mod h2raw;
pub mod kube_fake;
pub mod kube_mesh;
pub mod mesh;
pub mod mesh_client;
pub mod pcap;
pub mod prom;
pub mod topology;

pub use topology::{Pod, Topology, TopologySpec};
