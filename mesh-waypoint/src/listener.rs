//! The waypoint's HBONE listener: mutual TLS with the waypoint's identity, HTTP/2 with the
//! mesh's settings, and each CONNECT checked: its authority must be `VIP:port` of a Service
//! bound to this waypoint, or `pod IP:port` of a workload bound to it (as the source agent
//! sends them). An accepted stream is served as HTTP
//! (HTTP/1.1 or HTTP/2 with prior knowledge, detected from its first bytes) by hyper, each
//! request handed to [`crate::request`].

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrymesh_dataplane::hbone::server::{respond_status, serve_h2};
use ferrymesh_dataplane::hbone::stream::H2Stream;
use ferrymesh_dataplane::hbone::TLS_READ_BUFFER;
use ferrymesh_dataplane::state::{Service, State, Workload};
use ferrymesh_dataplane::tls;
use h2::RecvStream;
use http::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::ServerConfig;
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use crate::record::RequestLog;
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
    /// Where request records go.
    pub log: RequestLog,
    /// The rolls that split requests over weighted backends.
    pub rolls: ferrymesh_route::Rolls,
    /// Route tables, kept per Service port until the routes change.
    pub route_tables: crate::request::RouteTables,
}

/// What a CONNECT addressed.
#[derive(Debug, Clone)]
pub enum Destination {
    /// A Service bound to the waypoint, by its VIP.
    Service(Arc<Service>),
    /// A workload bound to the waypoint (one of workloads), by its pod IP.
    Workload(Arc<Workload>),
}

impl Destination {
    /// Its namespace.
    pub fn namespace(&self) -> &str {
        match self {
            Destination::Service(s) => &s.namespace,
            Destination::Workload(w) => &w.namespace,
        }
    }

    /// The Service's name, for Service traffic.
    pub fn service_name(&self) -> Option<&str> {
        match self {
            Destination::Service(s) => Some(&s.name),
            Destination::Workload(_) => None,
        }
    }

    /// The address the client dialled: the Service's VIP or the pod's IP.
    pub fn address(&self) -> Option<IpAddr> {
        match self {
            Destination::Service(s) => s.vip,
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
    let accept = TlsAcceptor::from(tls).accept(BufReader::with_capacity(TLS_READ_BUFFER, tcp));
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
        Ok((Destination::Service(service), target.port()))
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
    let downstream = Arc::new(Downstream { dest, port, identity, spiffe_id, addr: peer });
    let io = TokioIo::new(H2Stream::new(send, body));
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
