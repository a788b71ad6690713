//! The record of one request at the waypoint, written to the access log as one JSON line:
//! who asked (identity, address), what (method, authority, path, protocol), which Service, route
//! rule, backend and endpoint carried it, the answer (status, gRPC status), how long it took,
//! and, when the waypoint answered itself, why (`response_flags` as Envoy names them, and the
//! reason).

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferrymesh_dataplane::flows::AccessLog;
use http::{Request, Response, Version};
use serde_json::json;

use crate::listener::Downstream;

/// One request's record, filled in as it is handled.
#[derive(Debug)]
pub struct Record {
    start: SystemTime,
    started: Instant,
    /// The waypoint, `namespace/name`.
    pub waypoint: String,
    /// The Service the request addressed, `namespace/name`.
    pub service: String,
    /// Its port.
    pub port: u16,
    /// The client's SPIFFE ID.
    pub source_identity: String,
    /// The client's address.
    pub source_addr: String,
    /// Method.
    pub method: String,
    /// `Host` or `:authority`.
    pub authority: String,
    /// Path and query.
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// The route rule that selected the request (`HTTPRoute ns/name rule N`), empty without.
    pub route: String,
    /// The policy (and rule) that allowed or denied the request, empty when none is attached.
    pub policy: String,
    /// The backend Service port (`namespace/name:port`).
    pub backend: String,
    /// The endpoint that answered (`ip:port`).
    pub upstream: String,
    /// Status answered.
    pub status: u16,
    /// `grpc-status` of the response headers (a trailers-only answer), if any.
    pub grpc_status: String,
    /// Envoy's response flags: `-`, or why the waypoint answered itself (NR no route, UH no
    /// healthy upstream, UF upstream connect failure, UC upstream connection ended; DENY, as
    /// the mesh's L4 flows have it, for a policy's refusal).
    pub response_flags: &'static str,
    /// Why the waypoint answered itself, in words.
    pub reason: String,
}

/// `HTTP/1.1`, `HTTP/2`...
fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "HTTP/1.1",
    }
}

impl Record {
    /// The record of `request`, arriving now from `down` at `waypoint`.
    pub fn start<B>(waypoint: &str, down: &Downstream, request: &Request<B>) -> Self {
        Self {
            start: SystemTime::now(),
            started: Instant::now(),
            waypoint: waypoint.to_string(),
            service: format!("{}/{}", down.service.namespace, down.service.name),
            port: down.port,
            source_identity: down.identity.as_deref().unwrap_or_default().to_string(),
            source_addr: down.addr.to_string(),
            method: request.method().to_string(),
            authority: crate::request::authority_of(request).unwrap_or_default(),
            path: request.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default(),
            protocol: protocol(request.version()),
            route: String::new(),
            policy: String::new(),
            backend: String::new(),
            upstream: String::new(),
            status: 0,
            grpc_status: String::new(),
            response_flags: "-",
            reason: String::new(),
        }
    }

    /// The answer's status and gRPC status.
    pub fn answered<B>(&mut self, response: &Response<B>) {
        self.status = response.status().as_u16();
        if let Some(status) = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()) {
            self.grpc_status = status.to_string();
        }
    }

    /// The record as one JSON line.
    pub fn to_line(&self) -> String {
        let start_ms = self.start.duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        json!({
            "reporter": "waypoint",
            "start_unix_ms": start_ms,
            "duration_ms": self.started.elapsed().as_secs_f64() * 1000.0,
            "waypoint": self.waypoint,
            "source_identity": self.source_identity,
            "source_addr": self.source_addr,
            "service": self.service,
            "port": self.port,
            "method": self.method,
            "authority": self.authority,
            "path": self.path,
            "protocol": self.protocol,
            "route": self.route,
            "policy": self.policy,
            "backend": self.backend,
            "upstream": self.upstream,
            "status": self.status,
            "grpc_status": self.grpc_status,
            "response_flags": self.response_flags,
            "reason": self.reason,
        })
        .to_string()
    }
}

/// Where request records go.
#[derive(Debug)]
pub struct RequestLog {
    log: AccessLog,
}

impl RequestLog {
    /// Records to `log`.
    pub fn new(log: AccessLog) -> Self {
        Self { log }
    }

    /// Writes `record`.
    pub fn write(&self, record: &Record) {
        self.log.write_line(&record.to_line());
    }
}
