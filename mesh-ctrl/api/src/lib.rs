//! Generated gRPC types of ferrymesh, the flow JSON every tool prints, how every binary
//! reports an error ([`exit`]), and the CNI plugin's protocol with the agent ([`cni`]). Protobuf types stay at the edge: mesh-ctrl and the agent convert
//! them once into their own domain types.

pub mod cni;
pub mod exit;
pub mod flow_json;
pub mod kinds;

/// The largest config message (a snapshot or a delta) mesh-ctrl sends and agents, waypoints
/// and meshctl accept: 256 MiB, far above a 100k-workload model (gRPC's default of 4 MiB broke
/// every stream past some 10k pods, or with a few large objects).
pub const MAX_CONFIG_MESSAGE: usize = 256 << 20;

/// The largest single object mesh-ctrl takes from its sources, as JSON: 512 KiB, a third of
/// the API server's own limit. A larger one is refused by name, its last good version kept, so
/// no tenant's object can make every node hold (and receive) megabytes.
pub const MAX_OBJECT_BYTES: usize = 512 << 10;

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

/// The parts of Envoy's API ferrymesh speaks (proto/envoy/README.md), nested as Envoy's
/// packages are.
#[allow(missing_docs, clippy::all)]
pub mod envoy {
    /// `envoy.service`.
    pub mod service {
        /// `envoy.service.ratelimit`.
        pub mod ratelimit {
            /// `envoy.service.ratelimit.v3`: the global rate-limit service protocol.
            pub mod v3 {
                tonic::include_proto!("envoy.service.ratelimit.v3");
            }
        }
    }
    /// `envoy.extensions`.
    pub mod extensions {
        /// `envoy.extensions.common`.
        pub mod common {
            /// `envoy.extensions.common.ratelimit`.
            pub mod ratelimit {
                /// `envoy.extensions.common.ratelimit.v3`.
                pub mod v3 {
                    tonic::include_proto!("envoy.extensions.common.ratelimit.v3");
                }
            }
        }
    }
    /// `envoy.config`.
    pub mod config {
        /// `envoy.config.core`.
        pub mod core {
            /// `envoy.config.core.v3`.
            pub mod v3 {
                tonic::include_proto!("envoy.config.core.v3");
            }
        }
    }
    /// `envoy.type`.
    pub mod r#type {
        /// `envoy.type.v3`.
        pub mod v3 {
            tonic::include_proto!("envoy.r#type.v3");
        }
    }
}

/// The parts of OpenTelemetry's protocol ferrymesh speaks (proto/opentelemetry/README.md),
/// nested as its packages are.
#[allow(missing_docs, clippy::all)]
pub mod opentelemetry {
    /// `opentelemetry.proto`.
    pub mod proto {
        /// `opentelemetry.proto.collector.trace.v1`: OTLP/gRPC for traces.
        pub mod collector {
            /// `opentelemetry.proto.collector.trace`.
            pub mod trace {
                /// `opentelemetry.proto.collector.trace.v1`.
                pub mod v1 {
                    tonic::include_proto!("opentelemetry.proto.collector.trace.v1");
                }
            }
        }
        /// `opentelemetry.proto.trace`.
        pub mod trace {
            /// `opentelemetry.proto.trace.v1`.
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.trace.v1");
            }
        }
        /// `opentelemetry.proto.common`.
        pub mod common {
            /// `opentelemetry.proto.common.v1`.
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.common.v1");
            }
        }
        /// `opentelemetry.proto.resource`.
        pub mod resource {
            /// `opentelemetry.proto.resource.v1`.
            pub mod v1 {
                tonic::include_proto!("opentelemetry.proto.resource.v1");
            }
        }
    }
}

/// OTLP/gRPC for traces: the service spans are exported to, and the span messages.
pub mod otlp {
    pub use crate::opentelemetry::proto::collector::trace::v1 as collector;
    pub use crate::opentelemetry::proto::common::v1 as common;
    pub use crate::opentelemetry::proto::resource::v1 as resource;
    pub use crate::opentelemetry::proto::trace::v1 as trace;
}

/// The global rate-limit service protocol (Envoy's), as the waypoint calls it.
pub use envoy::service::ratelimit::v3 as ratelimit;

/// Config streaming from mesh-ctrl to agents.
pub use ferrymesh::config::v1 as config;

/// The agent's admin API (flows, status, the config it holds).
pub use ferrymesh::admin::v1 as admin;

/// Workload certificates from the mesh CA.
pub use ferrymesh::ca::v1 as ca;
