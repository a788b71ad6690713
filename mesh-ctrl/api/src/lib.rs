//! Generated gRPC types of ferrymesh, and the flow JSON every tool prints. Protobuf types stay
//! at the edge: mesh-ctrl and the agent convert them once into their own domain types.

pub mod flow_json;
pub mod kinds;

/// The generated code, nested as the proto packages are (so cross-package references resolve).
#[allow(missing_docs, clippy::all)]
pub mod ferrymesh {
    /// `ferrymesh.config`.
    pub mod config {
        /// `ferrymesh.config.v1`.
        pub mod v1 {
            tonic::include_proto!("ferrymesh.config.v1");
        }
    }
    /// `ferrymesh.admin`.
    pub mod admin {
        /// `ferrymesh.admin.v1`.
        pub mod v1 {
            tonic::include_proto!("ferrymesh.admin.v1");
        }
    }
    /// `ferrymesh.ca`.
    pub mod ca {
        /// `ferrymesh.ca.v1`.
        pub mod v1 {
            tonic::include_proto!("ferrymesh.ca.v1");
        }
    }
}

/// Config streaming from mesh-ctrl to agents.
pub use ferrymesh::config::v1 as config;

/// The agent's admin API (flows, status, the config it holds).
pub use ferrymesh::admin::v1 as admin;

/// Workload certificates from the mesh CA.
pub use ferrymesh::ca::v1 as ca;
