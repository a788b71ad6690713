//! The waypoint's HBONE listener: mutual TLS with the waypoint's identity, HTTP/2 with the
//! mesh's settings, and each CONNECT checked: its authority must be `VIP:port` of a Service
//! bound to this waypoint, or `pod IP:port` of a workload bound to it (as the source agent
//! sends them). An accepted stream is served as HTTP by hyper (HTTP/1.1, or HTTP/2 with prior
//! knowledge), each request handed to [`crate::request`], when the Service port declares HTTP,
//! or declares nothing and the stream's first bytes are HTTP ([`detect`]); otherwise it is
//! relayed at L4 ([`crate::tcp`]).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrymesh_dataplane::flows::AccessLog;
use ferrymesh_dataplane::hbone::server::{respond_status, serve_h2};
use ferrymesh_dataplane::hbone::stream::H2Stream;
use ferrymesh_dataplane::hbone::{TLS_READ_BUFFER, TLS_WRITE_BUFFER};
use ferrymesh_dataplane::state::{Service, State, Workload};
use ferrymesh_dataplane::tls;
use h2::RecvStream;
use http::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::upstream::Upstream;

/// How long a client may take to finish its TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The waypoint: what every connection and request needs.
#[derive(Debug)]
pub struct Waypoint {
    /// `namespace/name` of its Gateway: Services bound to it name it.
    pub key: String,
    /// Its Gateway's namespace and name (policies attach to it).
    pub gateway: (String, String),
    /// The mesh's trust domain (from the first config; it names endpoints' principals).
    pub trust_domain: String,
    /// Services, endpoints, routes, workloads.
    pub state: Arc<State>,
    /// Reaching endpoints.
    pub upstream: Upstream,
    /// Where request records go (flushed every `AccessLog::FLUSH_EVERY` by main).
    pub log: AccessLog,
    /// The rolls that split requests over weighted backends.
    pub rolls: ferrymesh_route::Rolls,
    /// The rolls that pick the requests a fault delays, and those it aborts (their own, so that
    /// each share is spread as evenly as weights are).
    pub fault_rolls: (ferrymesh_route::Rolls, ferrymesh_route::Rolls),
    /// The buckets of the TrafficPolicies' local rate limits.
    pub rate_limiters: crate::limits::RateLimiters,
    /// Where the TrafficPolicies' global rate limits are counted.
    pub rate_limit_service: crate::global_limits::RateLimitService,
    /// Route tables, kept per Service port until the routes change.
    pub route_tables: crate::request::RouteTables,
    /// The issuers' keys the RequestAuthentications' JWTs are verified with.
    pub keys: crate::authn::KeyStore,
    /// Where request spans go.
    pub tracer: ferrymesh_dataplane::spans::Tracer,
    /// How request paths are normalized.
    pub paths: ferrymesh_policy::path::PathRules,
}

/// What a CONNECT addressed.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A Service bound to the waypoint, by the VIP of it the client addressed (a dual-stack
    /// Service has one per family).
    Service(Arc<Service>, IpAddr),
    /// A workload bound to the waypoint (a waypoint of workloads), by its pod IP.
    Workload(Arc<Workload>),
}

impl Destination {
    /// Its namespace.
    pub fn namespace(&self) -> &str {
        match self {
            Destination::Service(s, _) => &s.namespace,
            Destination::Workload(w) => &w.namespace,
        }
    }

    /// The Service's name, for Service traffic.
    pub fn service_name(&self) -> Option<&str> {
        match self {
            Destination::Service(s, _) => Some(&s.name),
            Destination::Workload(_) => None,
        }
    }

    /// The address the client dialled: the Service's VIP or the pod's IP.
    pub fn address(&self) -> Option<IpAddr> {
        match self {
            Destination::Service(_, vip) => Some(*vip),
            Destination::Workload(w) => Some(w.ip),
        }
    }
}

/// Who sent a tunnel, and to which Service or workload port it was addressed.
#[derive(Debug, Clone)]
pub struct Downstream {
    /// What the CONNECT addressed.
    pub dest: Destination,
    /// Its port.
    pub port: u16,
    /// The client's SPIFFE ID (from its certificate).
    pub identity: Option<Arc<str>>,
    /// The same, parsed, for policies.
    pub spiffe_id: Option<ferrymesh_spiffe::SpiffeId>,
    /// The client's address (the source agent dials from the client pod).
    pub addr: SocketAddr,
    /// The CONNECT's `traceparent`: the source agent's span of the connection.
    pub traceparent: Option<ferrymesh_dataplane::spans::TraceParent>,
}

impl Downstream {
    /// What policies are attached to for this tunnel: its Service (none for a workload) or the
    /// Gateway of `waypoint`.
    pub fn policy_target<'a>(&'a self, waypoint: &'a Waypoint) -> ferrymesh_policy::l7::Target<'a> {
        ferrymesh_policy::l7::Target {
            namespace: self.dest.namespace(),
            service: self.dest.service_name(),
            gateway: (&waypoint.gateway.0, &waypoint.gateway.1),
        }
    }

    /// The client's namespace, from its identity: it picks the consumer routes and the
    /// DestinationRules that govern the client's requests.
    pub fn client_namespace(&self) -> Option<&str> {
        self.spiffe_id.as_ref().map(ferrymesh_spiffe::SpiffeId::namespace)
    }

    /// The tunnel as policies see a connection: the client's address and identity, and the
    /// address and port it dialled.
    pub fn connection(&self) -> ferrymesh_policy::Request<'_> {
        ferrymesh_policy::Request {
            source_ip: self.addr.ip(),
            source: self.spiffe_id.as_ref(),
            destination_ip: self.dest.address().unwrap_or(self.addr.ip()),
            destination_port: self.port,
        }
    }
}

/// Accepts HBONE connections until the task is aborted.
pub async fn serve(listener: TcpListener, tls: Arc<ServerConfig>, waypoint: Arc<Waypoint>) {
    loop {
        match listener.accept().await {
            Ok((tcp, peer)) => {
                tokio::spawn(serve_connection(tcp, peer, tls.clone(), waypoint.clone()));
            }
            Err(e) => {
                tracing::warn!("accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn serve_connection(tcp: TcpStream, peer: SocketAddr, tls: Arc<ServerConfig>, waypoint: Arc<Waypoint>) {
    let _ = tcp.set_nodelay(true);
    let accept = TlsAcceptor::from(tls).accept_with(BufReader::with_capacity(TLS_READ_BUFFER, tcp), |tls| {
        tls.set_buffer_limit(Some(TLS_WRITE_BUFFER))
    });
    let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return tracing::info!(%peer, "mTLS handshake failed: {}", tls::describe(&e)),
        Err(_) => return tracing::info!(%peer, "no TLS handshake within {HANDSHAKE_TIMEOUT:?}"),
    };
    let session = &stream.get_ref().1;
    if session.alpn_protocol() != Some(tls::ALPN_H2) {
        return tracing::info!(%peer, "client did not negotiate ALPN h2");
    }
    let cert = session.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    let identity: Option<Arc<str>> = tls::spiffe_id_of(&cert).ok().map(|id| Arc::from(id.as_str()));
    let ended = serve_h2(stream, |request, respond| {
        tokio::spawn(serve_tunnel(request, respond, peer, identity.clone(), waypoint.clone()));
    })
    .await;
    if let Err(closed) = ended {
        tracing::info!(%peer, "{}", closed.reason);
    }
}

/// Why a CONNECT is not one this waypoint takes.
#[derive(Debug, thiserror::Error)]
enum NotForUs {
    #[error("HBONE request method {0} is not CONNECT")]
    Method(Method),
    #[error("CONNECT authority {0:?} is not ip:port")]
    Authority(Option<String>),
    #[error("{0} is neither a Service's nor a workload's address")]
    Unknown(IpAddr),
    #[error("{what} is bound to waypoint {bound:?}, not this one")]
    OtherWaypoint { what: String, bound: Option<String> },
    #[error("Service {service} has no port {port}")]
    NoPort { service: String, port: u16 },
}

impl Waypoint {
    /// The Service or workload port a CONNECT asks for, if it is bound to this waypoint.
    fn bound_target(&self, method: &Method, authority: Option<&str>) -> Result<(Destination, u16), NotForUs> {
        if method != Method::CONNECT {
            return Err(NotForUs::Method(method.clone()));
        }
        let target: SocketAddr =
            authority.and_then(|a| a.parse().ok()).ok_or_else(|| NotForUs::Authority(authority.map(String::from)))?;
        let Some(service) = self.state.service_by_vip(target.ip()) else {
            let workload = self.state.workload_by_ip(target.ip()).ok_or(NotForUs::Unknown(target.ip()))?;
            if workload.waypoint.as_deref() != Some(self.key.as_str()) {
                let what = format!("workload {}/{}", workload.namespace, workload.name);
                return Err(NotForUs::OtherWaypoint { what, bound: workload.waypoint.clone() });
            }
            return Ok((Destination::Workload(workload), target.port()));
        };
        let name = format!("{}/{}", service.namespace, service.name);
        if service.waypoint.as_deref() != Some(self.key.as_str()) {
            return Err(NotForUs::OtherWaypoint { what: format!("Service {name}"), bound: service.waypoint.clone() });
        }
        if !service.ports.contains(&target.port()) {
            return Err(NotForUs::NoPort { service: name, port: target.port() });
        }
        Ok((Destination::Service(service, target.ip()), target.port()))
    }
}

/// One CONNECT: checked, answered, and its stream served as HTTP.
async fn serve_tunnel(
    request: Request<RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    peer: SocketAddr,
    identity: Option<Arc<str>>,
    waypoint: Arc<Waypoint>,
) {
    let (parts, body) = request.into_parts();
    let traceparent = ferrymesh_dataplane::spans::TraceParent::of(&parts.headers);
    let (dest, port) = match waypoint.bound_target(&parts.method, parts.uri.authority().map(|a| a.as_str())) {
        Ok(target) => target,
        Err(refused) => {
            tracing::info!(%peer, identity = identity.as_deref().unwrap_or(""), "CONNECT refused: {refused}");
            respond_status(&mut respond, StatusCode::BAD_REQUEST);
            return;
        }
    };
    let Some(send) = respond_status(&mut respond, StatusCode::OK) else { return };
    let spiffe_id = identity.as_deref().and_then(|id| id.parse().ok());
    let mut stream = H2Stream::new(send, body);
    let declared = match &dest {
        Destination::Service(service, _) => service.protocol(port),
        Destination::Workload(_) => "",
    };
    let http = match declared {
        "http" => true,
        "tcp" => false,
        _ => detect(&mut stream).await == Detected::Http,
    };
    let downstream = Arc::new(Downstream { dest, port, identity, spiffe_id, addr: peer, traceparent });
    if !http {
        return crate::tcp::relay(&waypoint, &downstream, stream).await;
    }
    let io = TokioIo::new(stream);
    let handler = waypoint.clone();
    let service = hyper::service::service_fn(move |request| {
        let (waypoint, downstream) = (handler.clone(), downstream.clone());
        async move { Ok::<_, std::convert::Infallible>(crate::request::handle(&waypoint, &downstream, request).await) }
    });
    let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    if let Err(e) = builder.serve_connection_with_upgrades(io, service).await {
        tracing::debug!(%peer, "HTTP on the tunnel ended: {e}");
    }
}

/// How long the waypoint waits for a client's first bytes on a port that declares no protocol:
/// a client that says nothing by then (a server-first protocol) is relayed as TCP. Istio's
/// sidecars waited as long (`protocolDetectionTimeout`, 100 ms, before it was turned off);
/// declaring the port's protocol spares the wait.
pub const DETECT_TIMEOUT: Duration = Duration::from_millis(100);

/// What a stream's first bytes say it carries.
#[derive(Debug, PartialEq, Eq)]
enum Detected {
    /// An HTTP/1.x request line, or HTTP/2's connection preface.
    Http,
    /// Anything else (or nothing in time): relayed at L4.
    Tcp,
}

/// Tells `stream`'s protocol from its first bytes, leaving them unread.
async fn detect(stream: &mut H2Stream) -> Detected {
    let deadline = tokio::time::Instant::now() + DETECT_TIMEOUT;
    loop {
        if let Some(detected) = classify(stream.unread()) {
            return detected;
        }
        match tokio::time::timeout_at(deadline, stream.fill()).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Detected::Tcp,
        }
    }
}

/// HTTP/2's connection preface.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The longest method token taken for HTTP/1.x.
const LONGEST_METHOD: usize = 16;
/// The longest request target waited for: a longer first line is taken for TCP.
const LONGEST_TARGET: usize = 8192;

/// What `first` (a stream's first bytes) says, or None until more arrive: HTTP/2's preface, or
/// an HTTP/1.x request line (`METHOD SP target SP HTTP/1.`, the method in capitals, the target
/// visible ASCII), is HTTP; anything that cannot begin one is TCP.
fn classify(first: &[u8]) -> Option<Detected> {
    let visible = |b: &u8| (0x21..=0x7e).contains(b);
    if first.is_empty() {
        return None;
    }
    if first.starts_with(H2_PREFACE) {
        return Some(Detected::Http);
    }
    if H2_PREFACE.starts_with(first) {
        return None;
    }
    let Some(method_end) = first.iter().position(|b| *b == b' ') else {
        let may_be_method = first.len() <= LONGEST_METHOD && first.iter().all(u8::is_ascii_uppercase);
        return (!may_be_method).then_some(Detected::Tcp);
    };
    if method_end == 0 || method_end > LONGEST_METHOD || !first[..method_end].iter().all(u8::is_ascii_uppercase) {
        return Some(Detected::Tcp);
    }
    let rest = &first[method_end + 1..];
    let Some(target_end) = rest.iter().position(|b| *b == b' ') else {
        let may_be_target = rest.len() <= LONGEST_TARGET && rest.iter().all(visible);
        return (!may_be_target).then_some(Detected::Tcp);
    };
    if target_end == 0 || !rest[..target_end].iter().all(visible) {
        return Some(Detected::Tcp);
    }
    const VERSION: &[u8] = b"HTTP/1.";
    let version = &rest[target_end + 1..];
    if version.len() >= VERSION.len() {
        Some(if version.starts_with(VERSION) { Detected::Http } else { Detected::Tcp })
    } else if VERSION.starts_with(version) {
        None
    } else {
        Some(Detected::Tcp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_bytes_tell_http_from_tcp() {
        let cases: [(&[u8], Option<Detected>); 15] = [
            (b"GET / HTTP/1.1\r\n", Some(Detected::Http)),
            (b"OPTIONS * HTTP/1.1", Some(Detected::Http)),
            (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", Some(Detected::Http)),
            (b"PRI * HTTP/2", None),
            (b"GE", None),
            (b"GET /index", None),
            (b"GET /index HTTP/", None),
            (b"", None),
            (b"hello\n", Some(Detected::Tcp)),
            (b"\x16\x03\x01\x02\x00", Some(Detected::Tcp)),
            (b" GET /", Some(Detected::Tcp)),
            (b"AVERYLONGMETHODNAME /", Some(Detected::Tcp)),
            (b"A \x01\x02", Some(Detected::Tcp)),
            (b"GET / FTP/1.0", Some(Detected::Tcp)),
            (b"GET  HTTP/1.1", Some(Detected::Tcp)),
        ];
        for (first, want) in cases {
            assert_eq!(classify(first), want, "{:?}", String::from_utf8_lossy(first));
        }
    }
}
