//! The record of one request at the waypoint, written to the access log as one JSON line:
//! who asked (identity, address), what (method, authority, path, protocol), which Service, route
//! rule, policy, backend and endpoint carried it, the answer (status, gRPC status), how long it
//! took, and, when the waypoint answered itself, why (`response_flags` as Envoy names them, and
//! the reason); and counted in the request metrics with Istio's labels.

use std::net::SocketAddr;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use ferrymesh_dataplane::state::State;
use http::{Request, Response, Version};
use metrics::{counter, histogram, Label};
use serde_json::json;

use crate::listener::{Destination, Downstream};

/// One request's record, filled in as it is handled.
#[derive(Debug)]
pub struct Record {
    start: SystemTime,
    started: Instant,
    /// The waypoint, `namespace/name`.
    pub waypoint: String,
    /// The Service the request addressed, `namespace/name`; empty when it addressed a workload.
    pub service: String,
    /// The workload the request addressed (by its pod IP), `namespace/name`; empty for a
    /// Service's request.
    pub workload: String,
    /// Its port.
    pub port: u16,
    /// The client's SPIFFE ID.
    pub source_identity: String,
    /// The client's address.
    pub source_addr: String,
    /// `iss/sub` of the request's verified JWT; empty without one.
    pub request_principal: String,
    /// Method.
    pub method: String,
    /// `Host` or `:authority`.
    pub authority: String,
    /// Path and query.
    pub path: String,
    /// `HTTP/1.1` or `HTTP/2`.
    pub protocol: &'static str,
    /// Whether it is gRPC (`content-type: application/grpc...`).
    pub is_grpc: bool,
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
    /// `grpc-status` of the answer (its headers, or its trailers), if any.
    pub grpc_status: String,
    /// Envoy's response flags: `-`, or why the waypoint answered itself (NR no route, UH no
    /// healthy upstream, UF upstream connect failure, UC upstream connection ended, UT upstream
    /// request timeout, UO a DestinationRule limit reached, FI a fault's abort, RL a rate
    /// limit; DENY, as the mesh's L4 flows have it, for a policy's refusal), or DI when a fault
    /// delayed a request that was then answered.
    pub response_flags: &'static str,
    /// Why the waypoint answered itself, in words.
    pub reason: String,
    /// For a connection relayed at L4 (protocol `TCP`): bytes from the client, and to it.
    pub bytes: Option<(u64, u64)>,
    /// Attempts at a backend after the first.
    pub retries: u32,
    /// The request's span, when the waypoint traces.
    pub span: Option<crate::spans::RequestSpan>,
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
            method: request.method().to_string(),
            authority: crate::request::authority_of(request).unwrap_or_default(),
            path: request.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default(),
            protocol: protocol(request.version()),
            is_grpc: request
                .headers()
                .get(http::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc")),
            ..Self::connection(waypoint, down)
        }
    }

    /// The record of a connection from `down` that `waypoint` relays at L4 (protocol `TCP`).
    pub fn connection(waypoint: &str, down: &Downstream) -> Self {
        Self {
            start: SystemTime::now(),
            started: Instant::now(),
            waypoint: waypoint.to_string(),
            service: match &down.dest {
                Destination::Service(s, _) => format!("{}/{}", s.namespace, s.name),
                Destination::Workload(_) => String::new(),
            },
            workload: match &down.dest {
                Destination::Service(..) => String::new(),
                Destination::Workload(w) => format!("{}/{}", w.namespace, w.name),
            },
            port: down.port,
            source_identity: down.identity.as_deref().unwrap_or_default().to_string(),
            source_addr: down.addr.to_string(),
            request_principal: String::new(),
            method: String::new(),
            authority: String::new(),
            path: String::new(),
            protocol: "TCP",
            is_grpc: false,
            route: String::new(),
            policy: String::new(),
            backend: String::new(),
            upstream: String::new(),
            status: 0,
            grpc_status: String::new(),
            response_flags: "-",
            reason: String::new(),
            bytes: None,
            retries: 0,
            span: None,
        }
    }

    /// The answer's status and gRPC status (of a trailers-only answer; one in the trailers is
    /// recorded when the body ends, see [`Recorded`]).
    pub fn answered<B>(&mut self, response: &Response<B>) {
        self.status = response.status().as_u16();
        if let Some(status) = response.headers().get("grpc-status").and_then(|v| v.to_str().ok()) {
            self.grpc_status = status.to_string();
        }
    }

    /// Counts the request in `ferrymesh_requests_total` and
    /// `ferrymesh_request_duration_milliseconds`, with Istio's labels (workloads named from the
    /// state: the client by its address, the destination by the endpoint that answered, whose
    /// principal is in `trust_domain`).
    pub fn count(&self, state: &State, trust_domain: &str) {
        let unknown = || "unknown".to_string();
        let at = |addr: &str| addr.parse::<SocketAddr>().ok().and_then(|a| state.workload_by_ip(a.ip()));
        let (src_name, src_ns) =
            at(&self.source_addr).map_or((unknown(), unknown()), |w| (w.name.clone(), w.namespace.clone()));
        let destination = at(&self.upstream);
        let (dst_name, dst_ns) =
            destination.as_ref().map_or((unknown(), unknown()), |w| (w.name.clone(), w.namespace.clone()));
        // The endpoint proved its identity over HBONE when it is meshed.
        let dst_principal = destination
            .filter(|w| w.captured)
            .and_then(|w| w.identity().spiffe_id(trust_domain).ok())
            .map_or_else(unknown, |id| id.as_str().to_string());
        let (service_ns, service_name) = self.service.split_once('/').unwrap_or(("unknown", "unknown"));
        let service = if self.service.is_empty() { "unknown".to_string() } else { self.service.clone() };
        let labels = vec![
            Label::new("reporter", "waypoint"),
            Label::new("source_workload", src_name),
            Label::new("source_workload_namespace", src_ns),
            Label::new("source_principal", self.principal_or_unknown()),
            Label::new("destination_workload", dst_name),
            Label::new("destination_workload_namespace", dst_ns),
            Label::new("destination_principal", dst_principal),
            Label::new("destination_service", service),
            Label::new("destination_service_name", service_name.to_string()),
            Label::new("destination_service_namespace", service_ns.to_string()),
            Label::new("request_protocol", if self.is_grpc { "grpc" } else { "http" }),
            Label::new("response_code", self.status.to_string()),
            Label::new("grpc_response_status", self.grpc_status.clone()),
            Label::new("response_flags", self.response_flags),
            Label::new("connection_security_policy", "mutual_tls"),
        ];
        counter!("ferrymesh_requests_total", labels.clone()).increment(1);
        let millis = self.started.elapsed().as_secs_f64() * 1000.0;
        histogram!("ferrymesh_request_duration_milliseconds", labels).record(millis);
    }

    fn principal_or_unknown(&self) -> String {
        if self.source_identity.is_empty() {
            "unknown".into()
        } else {
            self.source_identity.clone()
        }
    }

    /// Time since the request arrived.
    pub fn elapsed(&self) -> std::time::Duration {
        self.started.elapsed()
    }

    /// The record as one JSON line.
    pub fn to_line(&self) -> String {
        let start_ms = self.start.duration_since(UNIX_EPOCH).map(|d| d.as_millis()).unwrap_or(0);
        let mut line = json!({
            "reporter": "waypoint",
            "start_unix_ms": start_ms,
            "duration_ms": self.started.elapsed().as_secs_f64() * 1000.0,
            "waypoint": self.waypoint,
            "source_identity": self.source_identity,
            "source_addr": self.source_addr,
            "request_principal": self.request_principal,
            "service": self.service,
            "workload": self.workload,
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
            "retries": self.retries,
        });
        if let Some((received, sent)) = self.bytes {
            line["bytes_received"] = received.into();
            line["bytes_sent"] = sent.into();
        }
        line.to_string()
    }
}

/// Request latency buckets in milliseconds (Istio's).
const DURATION_BUCKETS: [f64; 19] = [
    0.5, 1.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2500.0, 5000.0, 10000.0, 30000.0, 60000.0, 300000.0,
    600000.0, 1800000.0, 3600000.0,
];

/// Installs the Prometheus recorder and serves it on `addr` (`/metrics`), the request metrics
/// described (docs/OBSERVABILITY.md lists them).
pub fn serve_metrics(addr: SocketAddr) -> anyhow::Result<()> {
    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder};
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Full("ferrymesh_request_duration_milliseconds".into()), &DURATION_BUCKETS)?
        .install()
        .map_err(|e| anyhow::anyhow!("cannot serve metrics on {addr}: {e}"))?;
    metrics::describe_counter!("ferrymesh_requests_total", "HTTP and gRPC requests the waypoint answered.");
    metrics::describe_counter!(
        "ferrymesh_request_retries_total",
        "Attempts at a backend after the first, by destination_service and reason (connect-failure, per-try-timeout, or the status retried)."
    );
    metrics::describe_counter!(
        "ferrymesh_request_retry_overflow_total",
        "Retries not made because the backend's retry budget was spent, by destination_service."
    );
    metrics::describe_counter!(
        "ferrymesh_outlier_ejections_total",
        "Endpoints ejected by the backend's DestinationRule outlierDetection, by destination_service."
    );
    metrics::describe_counter!(
        "ferrymesh_rate_limit_service_calls_total",
        "Calls to the rate-limit service for global limits, by result (ok, over_limit, error)."
    );
    metrics::describe_counter!(
        "ferrymesh_jwks_fetches_total",
        "Fetches of RequestAuthentication jwksUri key sets, by result (ok, error)."
    );
    metrics::describe_counter!(
        "ferrymesh_waypoint_rate_limit_evictions_total",
        "Buckets of local rate-limit keys dropped, least recently used first, past a limit's cap of keys."
    );
    metrics::counter!("ferrymesh_waypoint_rate_limit_evictions_total").absolute(0);
    ferrymesh_dataplane::spans::describe_metrics();
    ferrymesh_dataplane::hbone::budget::describe_metrics();
    metrics::describe_counter!(
        "ferrymesh_inbound_refused_total",
        "HBONE connections and streams, and HTTP requests, refused by a limit of the waypoint (label limit)."
    );
    for limit in
        ferrymesh_dataplane::limits::Limit::INBOUND.into_iter().chain(ferrymesh_dataplane::limits::Limit::REQUESTS)
    {
        metrics::counter!("ferrymesh_inbound_refused_total", "limit" => limit.name()).absolute(0);
    }
    metrics::describe_histogram!(
        "ferrymesh_request_duration_milliseconds",
        metrics::Unit::Milliseconds,
        "Time from a request's arrival to the end of its response, in milliseconds."
    );
    Ok(())
}

/// A response body that finishes its request's record when it ends, or is dropped (the client
/// left): the log line and the metrics then cover the whole response, and a gRPC status sent in
/// the trailers is recorded. The request's place among those in flight (`--max-requests`) is
/// freed then too.
pub struct Recorded {
    body: crate::request::Body,
    record: Option<Box<Record>>,
    waypoint: std::sync::Arc<crate::listener::Waypoint>,
    place: Option<ferrymesh_dataplane::limits::Held>,
}

impl Recorded {
    /// `body`, finishing `record` and freeing `place` at its end.
    pub fn new(
        body: crate::request::Body,
        record: Record,
        waypoint: std::sync::Arc<crate::listener::Waypoint>,
        place: Option<ferrymesh_dataplane::limits::Held>,
    ) -> Self {
        Self { body, record: Some(Box::new(record)), waypoint, place }
    }

    fn finish(&mut self) {
        self.place = None;
        if let Some(record) = self.record.take() {
            self.waypoint.log.write_with(|| record.to_line());
            record.count(&self.waypoint.state, &self.waypoint.trust_domain);
            crate::spans::finish(&self.waypoint.tracer, &record);
        }
    }
}

impl Drop for Recorded {
    fn drop(&mut self) {
        self.finish();
    }
}

impl hyper::body::Body for Recorded {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.body).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                let status = frame.trailers_ref().and_then(|t| t.get("grpc-status")).and_then(|v| v.to_str().ok());
                if let (Some(status), Some(record)) = (status, this.record.as_mut()) {
                    record.grpc_status = status.to_string();
                }
            }
            std::task::Poll::Ready(Some(Err(_))) => {
                if let Some(record) = this.record.as_mut() {
                    record.response_flags = "UC";
                    record.reason = "the upstream connection ended during the response".into();
                }
                this.finish();
            }
            std::task::Poll::Ready(None) => this.finish(),
            std::task::Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.body.size_hint()
    }
}
