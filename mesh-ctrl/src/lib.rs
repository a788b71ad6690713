//! mesh-ctrl: the ferrymesh control plane. Config sources feed one model; the config server
//! streams it to node agents over gRPC.
#![forbid(unsafe_code)]

pub mod ca;
pub mod crd;
pub mod model;
pub mod schema;
pub mod scope;
pub mod server;
pub mod snapshot;
pub mod source;
pub mod telemetry;
pub mod tls;
pub mod waypoint_deploy;
