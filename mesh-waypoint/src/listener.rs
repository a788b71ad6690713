//! The waypoint's HBONE listener: mutual TLS with the waypoint's identity, HTTP/2 with the
//! mesh's settings, and each CONNECT checked: its authority must be `VIP:port` of a Service
//! bound to this waypoint, or `pod IP:port` of a workload bound to it (as the source agent
//! sends them). An accepted stream is served as HTTP by hyper (HTTP/1.1, or HTTP/2 with prior
//! knowledge), each request handed to [`crate::request`], unless the port declares an opaque
//! protocol (`tcp`, `tls`, ...: relayed at L4 by [`crate::tcp`]). The port decides, never the
//! client: a port that declares nothing is HTTP, so no pause, leading CRLF or garbage gets a
//! client L4 treatment past the routes, limits and filters of an HTTP port. Clients meet the
//! agent's caps (`ferrymesh_dataplane::limits`: connections and streams per source and in all,
//! the handshake timeout, no TLS state before their first byte) and the window budget
//! (`ferrymesh_dataplane::hbone::budget`).

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrymesh_dataplane::flows::AccessLog;
use ferrymesh_dataplane::hbone::budget::WindowBudget;
use ferrymesh_dataplane::hbone::queue::SendQueue;
use ferrymesh_dataplane::hbone::server::{accept_tls, respond_status, serve_h2, NotAccepted};
use ferrymesh_dataplane::hbone::stream::H2Stream;
use ferrymesh_dataplane::limits::{Limit, Limits, Load};
use ferrymesh_dataplane::state::{Service, State, Workload};
use ferrymesh_dataplane::tls;
use h2::RecvStream;
use http::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};

use crate::upstream::Upstream;

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
    /// The receive windows its HBONE connections may hold beyond their base windows.
    pub windows: Arc<WindowBudget>,
    /// Caps on what clients may hold open (the waypoint is the "pod" of the per-pod caps).
    pub limits: Limits,
    /// What clients hold open now.
    pub load: Arc<Load>,
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

/// hyper's HTTP/1 buffer for one tunnel, each way (its default is about 400 KiB): a request head
/// up to the mesh's 64 KiB header limit fits, and pipelined requests past it wait in the tunnel's
/// window rather than in the waypoint. The upstream HTTP/1.1 connections have the same.
pub const HTTP1_BUFFER: usize = 72 * 1024;

/// HTTP/2 spoken inside a tunnel (hyper's defaults in brackets): what a client may send before
/// the waypoint has forwarded it, per stream and per tunnel (1 MiB, 1 MiB), and what the waypoint
/// queues of each answer for a client that does not read it (400 KiB a stream). Streams per
/// tunnel are 100, as on HBONE (200); the requests in flight are capped anyway
/// (`--max-requests-per-source`, `--max-requests`).
pub mod inner_http2 {
    /// Receive window of one stream.
    pub const STREAM_WINDOW: u32 = 64 * 1024;
    /// Receive window of one tunnel's HTTP/2 connection.
    pub const CONNECTION_WINDOW: u32 = 128 * 1024;
    /// Bytes of one answer queued for the client at most.
    pub const SEND_BUFFER: usize = 64 * 1024;
    /// Concurrent streams of one tunnel.
    pub const STREAMS: u32 = 100;
}

/// What clients can make the waypoint hold at most, in bytes, at `limits` and a window budget
/// of `windows` (docs/SECURITY.md, "The waypoint's budget"):
/// - each HBONE connection: its base receive window, a frame being read, the buffers under TLS
///   and its send queue;
/// - each tunnel: hyper's HTTP/1 buffers each way, or its HTTP/2 connection window and a frame
///   each way;
/// - each request in flight: its answer queued for the client, its body kept for a retry, and
///   its upstream HTTP/1.1 connection's buffers (or its HTTP/2 stream's send buffer and window).
pub fn memory_bound(limits: &Limits, windows: usize) -> usize {
    use ferrymesh_dataplane::hbone::{budget, queue, MAX_FRAME, TLS_READ_BUFFER, TLS_WRITE_BUFFER};
    /// hyper's HTTP/2 frame size inside a tunnel (HTTP/2's default, 16 KiB) and its header.
    const INNER_FRAME: usize = 16 * 1024 + 9;
    let connection = budget::BASE_CONNECTION_WINDOW as usize
        + MAX_FRAME as usize
        + TLS_READ_BUFFER
        + TLS_WRITE_BUFFER
        + queue::CONNECTION_QUEUE;
    let tunnel = (2 * HTTP1_BUFFER).max(inner_http2::CONNECTION_WINDOW as usize + 2 * INNER_FRAME);
    let (stream_window, _, send_buffer) = crate::upstream::UPSTREAM_HTTP2;
    let upstream = (2 * HTTP1_BUFFER).max(stream_window as usize + send_buffer);
    let request = inner_http2::SEND_BUFFER + crate::upstream::REPLAY_LIMIT + upstream;
    windows
        + limits.connections as usize * connection
        + limits.streams as usize * tunnel
        + limits.requests as usize * request
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
    // Held for the connection's whole life: its place under the per-source and overall caps.
    let me = tcp.local_addr().map_or(peer.ip(), |local| local.ip());
    let _held = match waypoint.load.connection(&waypoint.limits, peer.ip(), me) {
        Ok(held) => held,
        Err(refusal) => {
            refusal.limit().count();
            return tracing::info!(%peer, "{refusal}");
        }
    };
    let _ = tcp.set_nodelay(true);
    let stream = match accept_tls(tcp, tls, (&waypoint.limits, &waypoint.load), peer.ip(), me).await {
        Ok(stream) => stream,
        Err(NotAccepted::Failed(e)) => return tracing::info!(%peer, "mTLS handshake failed: {}", tls::describe(&e)),
        Err(refused) => return tracing::info!(%peer, "{refused}"),
    };
    let session = &stream.get_ref().1;
    if session.alpn_protocol() != Some(tls::ALPN_H2) {
        return tracing::info!(%peer, "client did not negotiate ALPN h2");
    }
    let cert = session.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    let identity: Option<Arc<str>> = tls::spiffe_id_of(&cert).ok().map(|id| Arc::from(id.as_str()));
    let ended = serve_h2(stream, &waypoint.windows, |request, mut respond, queue| {
        let held = match waypoint.load.stream(&waypoint.limits, peer.ip(), me) {
            Ok(held) => held,
            Err(refusal) => {
                refusal.limit().count();
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                return tracing::info!(%peer, "{refusal}");
            }
        };
        let tunnel = serve_tunnel(request, respond, peer, identity.clone(), waypoint.clone(), queue.clone());
        tokio::spawn(async move {
            tunnel.await;
            drop(held);
        });
    })
    .await;
    if let Err(closed) = ended {
        if closed.by_server {
            Limit::Http2Protocol.count();
        }
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
    queue: Arc<SendQueue>,
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
    // What the tunnel answers takes room in its connection's send queue first.
    let stream = H2Stream::queued(send, body, queue);
    let declared = match &dest {
        Destination::Service(service, _) => service.protocol(port),
        Destination::Workload(workload) => waypoint.state.workload_protocol(&workload.uid, port),
    };
    let http = declared != "tcp";
    let downstream = Arc::new(Downstream { dest, port, identity, spiffe_id, addr: peer, traceparent });
    if !http {
        return crate::tcp::relay(&waypoint, &downstream, stream).await;
    }
    if let Err(e) = serve_http(stream, waypoint, downstream).await {
        tracing::debug!(%peer, "HTTP on the tunnel ended: {e}");
    }
}

/// Serves HTTP (HTTP/1.1, or HTTP/2 with prior knowledge) on an accepted tunnel of
/// `downstream`, each request handed to [`crate::request::handle`], until the client closes it.
pub async fn serve_http<IO>(
    io: IO,
    waypoint: Arc<Waypoint>,
    downstream: Arc<Downstream>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let service = hyper::service::service_fn(move |request| {
        let (waypoint, downstream) = (waypoint.clone(), downstream.clone());
        async move { Ok::<_, std::convert::Infallible>(crate::request::handle(&waypoint, &downstream, request).await) }
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder.http1().max_buf_size(HTTP1_BUFFER);
    builder
        .http2()
        .initial_stream_window_size(inner_http2::STREAM_WINDOW)
        .initial_connection_window_size(inner_http2::CONNECTION_WINDOW)
        .max_send_buf_size(inner_http2::SEND_BUFFER)
        .max_concurrent_streams(inner_http2::STREAMS);
    builder.serve_connection_with_upgrades(TokioIo::new(io), service).await
}
