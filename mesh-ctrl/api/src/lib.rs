//! Generated gRPC types of ferrymesh. Protobuf types stay at the edge: mesh-ctrl and the agent
//! convert them once into their own domain types.

/// Config streaming from mesh-ctrl to agents.
pub mod config {
    tonic::include_proto!("ferrymesh.config.v1");
}

/// The agent's admin API (flows, status).
pub mod admin {
    tonic::include_proto!("ferrymesh.admin.v1");
}

/// Workload certificates from the mesh CA.
pub mod ca {
    tonic::include_proto!("ferrymesh.ca.v1");
}
