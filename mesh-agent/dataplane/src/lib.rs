//! The ferrymesh data-plane library: what a node agent and a waypoint proxy share.
//!
//! - [`ctrl`]: the verified TLS channel to mesh-ctrl (port 15012);
//! - [`identity`]: workload certificates from the mesh CA, renewed in the background;
//! - [`trust`]: the trust bundle peers are verified against;
//! - [`tls`]: the rustls configuration of HBONE and certificate inspection;
//! - [`hbone`]: the HBONE server, client, connection pool and stream adapters;
//! - [`state`]: the store of workloads, services, policies, routes and waypoints, and
//!   [`config_client`], the config stream from mesh-ctrl that fills it;
//! - [`lb`]: choosing a Service endpoint (power of two choices on work in progress);
//! - [`limits`]: what inbound peers may hold open;
//! - [`error`]: why a proxied connection failed, with its verdict, metric flag and hint;
//! - [`flows`]: flow records, and [`metrics`], the metrics recorded from them;
//! - [`memcpy`]: the glibc setting that keeps large copies fast on AMD CPUs.
//!
//! It holds no eBPF, no network namespace handling and no unsafe code: those stay in the node
//! agent (`mesh-agent`), which depends on this crate, never the other way round.
#![forbid(unsafe_code)]

pub mod config_client;
pub mod ctrl;
pub mod error;
pub mod flows;
pub mod hbone;
pub mod identity;
pub mod lb;
pub mod limits;
pub mod memcpy;
pub mod metrics;
pub mod spans;
pub mod state;
pub mod tls;
pub mod trust;
