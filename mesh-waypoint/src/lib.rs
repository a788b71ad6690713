//! mesh-waypoint: ferrymesh's L7 proxy, one per namespace (or Service) that asks for one with a
//! Gateway of class `ferrymesh-waypoint`.
//!
//! - [`listener`]: HBONE on 15008 with the waypoint's identity; each CONNECT names a Service
//!   VIP and port bound to this waypoint, and HTTP is served on the stream;
//! - [`request`]: one request: the route it selects, the rule's filters, the backend by weight;
//! - [`upstream`]: the endpoint by power of two choices, reached over HBONE with the
//!   waypoint's identity (HTTP/1.1 connections reused, HTTP/2 multiplexed);
//! - [`authn`]: the request's JWT checked against the RequestAuthentications, keys fetched;
//! - [`record`]: the access log line of each request;
//! - [`spans`]: W3C trace context, a span per request, exported over OTLP.
//!
//! Its identity is `spiffe://<trust domain>/ns/<namespace>/sa/<gateway name>`, obtained like a
//! pod's: a CSR to mesh-ctrl with its node's token, which mesh-ctrl grants because the
//! waypoint's pod (service account = the Gateway's name) runs on that node.
//!
//! The program (`main.rs`) reads its flags and puts these together; the fuzz targets drive
//! [`listener::serve_http`] with the same parts.
#![forbid(unsafe_code)]

pub mod authn;
pub mod denials;
pub mod destination;
pub mod global_limits;
pub mod limits;
pub mod listener;
pub mod record;
pub mod request;
pub mod spans;
pub mod tcp;
pub mod upstream;
