//! Outbound: connections of an enrolled pod captured by connect4/6 and accepted on the pod's
//! `127.0.0.1:15001` (`[::1]:15001` for a native IPv6 destination); the original destination
//! comes from the eBPF map. A service VIP is resolved to a ready endpoint (power of two
//! choices, another endpoint on a failed dial); a meshed destination on another node is reached
//! over HBONE, a meshed pod of this node by a node-local handover (see [`super::local`]),
//! anything else as plain TCP, always dialled from the pod's netns (so the source IP stays the
//! pod's) with the agent's mark. A VIP of a Service bound to a waypoint, or a pod bound to a
//! waypoint of workloads (addressed directly or picked as a Service's endpoint), goes over HBONE
//! to the waypoint instead (see [`to_waypoint`]).

use std::net::SocketAddr;
use std::sync::Arc;

use ferrymesh_dataplane::hbone::client::Peer;
use ferrymesh_policy::{Placement, Transport};
use ferrymesh_spiffe::SpiffeId;
use mesh_common::MARK_AGENT;
use tokio::net::{TcpListener, TcpStream};

use super::{accept_loop, hbone, local, relay, reset, Connection, Outcome, PodContext, ProxyContext};
use crate::error::ProxyError;
use crate::flows::{Direction, Endpoint, UNKNOWN_ADDR};
use crate::state::{Service, ServiceEndpoint, Workload};

/// Endpoints tried for one connection to a service before the client is failed.
const SERVICE_ATTEMPTS: usize = 3;

/// Serves the pod's outbound listener until the task is aborted.
pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    accept_loop(listener, "outbound", ctx.drain.clone(), move |stream, peer| {
        handle(stream, peer, pod.clone(), ctx.clone())
    })
    .await
}

/// An upstream ready to carry the client's bytes.
enum Upstream<'a> {
    Plain(TcpStream),
    Hbone(hbone::Tunnel),
    Local(Box<local::Handover<'a>>),
}

/// How a destination is reached, and its identity when it is meshed.
struct Connected<'a> {
    upstream: Upstream<'a>,
    transport: Transport,
    dst_identity: Option<Arc<str>>,
}

/// How a destination is reached.
enum Route {
    /// A meshed pod enrolled on this node: handed over inside the agent.
    Local(Arc<Workload>, Arc<PodContext>),
    /// A meshed pod elsewhere (one its own agent captures): HBONE.
    Hbone(Arc<Workload>),
    /// Anything else: plain TCP.
    Plain,
}

impl Route {
    /// The route to `target` as the state and the enrolled pods say now.
    fn to(ctx: &ProxyContext, target: SocketAddr) -> Self {
        let Some(workload) = ctx.state.workload_by_ip(target.ip()) else { return Route::Plain };
        // Only a captured destination can be handed over: no enrolled-pod lookup for the rest.
        let local = workload
            .captured
            .then(|| ctx.local_pods.get(target.ip()).filter(|p| p.workload.uid == workload.uid))
            .flatten();
        let placement = Placement {
            src_captured: true,
            dst_captured: workload.captured,
            same_node: local.is_some(),
            certificates: ctx.identities.enabled(),
        };
        match (Transport::for_placement(placement), local) {
            (Transport::NodeLocal, Some(local)) => Route::Local(workload, local),
            (Transport::Mtls, _) => Route::Hbone(workload),
            _ => Route::Plain,
        }
    }

    fn transport(&self) -> Transport {
        match self {
            Route::Local(..) => Transport::NodeLocal,
            Route::Hbone(_) => Transport::Mtls,
            Route::Plain => Transport::Plaintext,
        }
    }
}

/// Connects `client` (whose source the outbound flow names `src`) to `target` as `pod`: a
/// meshed destination (one its own agent captures) by a node-local handover when it is enrolled
/// on this node, else over HBONE; anything else as plain TCP.
async fn connect<'a>(
    ctx: &'a ProxyContext,
    pod: &PodContext,
    client: &TcpStream,
    src: SocketAddr,
    target: SocketAddr,
    traceparent: String,
) -> Result<Connected<'a>, ProxyError> {
    let route = Route::to(ctx, target);
    let transport = route.transport();
    if let Route::Local(workload, _) | Route::Hbone(workload) = &route {
        let dst_id = workload.identity();
        let dst_id = dst_id
            .spiffe_id(&ctx.identities.trust_domain())
            .map_err(|error| ProxyError::NoIdentity { workload: dst_id.to_string(), error })?;
        let upstream = match &route {
            Route::Local(_, dst) => Upstream::Local(Box::new(local::open(ctx, pod, dst, target, src).await?)),
            _ => {
                let peer = Peer { ip: target.ip(), id: &dst_id };
                Upstream::Hbone(hbone::open(client, pod, ctx, peer, target, traceparent).await?)
            }
        };
        return Ok(Connected { upstream, transport, dst_identity: Some(dst_id.as_str().into()) });
    }
    match ctx.dial(&pod.netns, target, MARK_AGENT, None).await {
        Ok(stream) => {
            Ok(Connected { upstream: Upstream::Plain(stream), transport: Transport::Plaintext, dst_identity: None })
        }
        Err(e) => Err(ProxyError::Connect { target, error: Arc::new(e) }),
    }
}

async fn carry(ctx: &ProxyContext, client: TcpStream, upstream: Upstream<'_>) -> Outcome {
    let (sent, received, end) = match upstream {
        Upstream::Plain(stream) => relay(client, stream, None).await,
        Upstream::Hbone(tunnel) => hbone::relay_client(client, tunnel).await,
        // Boxed: the other transports' connections would otherwise all be as large as this one.
        Upstream::Local(handover) => return Box::pin(handover.carry(ctx, client)).await,
    };
    Outcome::relayed(sent, received, end, String::new())
}

fn refused(client: &TcpStream, error: ProxyError) -> Outcome {
    reset(client);
    Outcome::failed(error)
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    let unknown = Endpoint { addr: UNKNOWN_ADDR, workload: None, identity: None };
    // The client connected from 127.0.0.1 or [::1], the family of its destination: the pod's
    // address of that family is its source.
    let src = SocketAddr::new(pod.workload.ip_for(peer.ip()), peer.port());
    let mut conn = Connection::new(Direction::Outbound, pod.endpoint(src, &ctx.identities), unknown);
    conn.trace = ctx.tracer.start(None);
    let orig = ctx.datapath.lock().expect("datapath lock").take_orig_dst(pod.cookie, peer);
    let Some(dst) = orig else {
        reset(&client);
        return ctx.record(conn, Outcome::failed(ProxyError::NotCaptured));
    };
    conn.dst = Endpoint::lookup(&ctx.state, dst);
    // Held for the connection's whole life: its place under the pod's and the node's caps.
    let _held = match ctx.load.outbound(&ctx.limits, pod.workload.ip) {
        Ok(held) => held,
        Err(refusal) => {
            refusal.limit().count();
            reset(&client);
            return ctx.record(conn, Outcome::failed(ProxyError::Limited(refusal)));
        }
    };
    let _ = client.set_nodelay(true);
    let outcome = match ctx.state.service_by_vip(dst.ip()) {
        Some(service) => {
            let name = format!("{}/{}", service.namespace, service.name);
            conn.service.clone_from(&name);
            match &service.waypoint {
                _ if !service.ports.contains(&dst.port()) => {
                    refused(&client, ProxyError::NoServicePort { service: name, port: dst.port() })
                }
                Some(waypoint) => {
                    let bound = Bound { kind: "service", name, waypoint: waypoint.clone() };
                    Box::pin(to_waypoint(client, &pod, &ctx, &mut conn, bound, dst)).await
                }
                // Boxed: only connections to a service pay for its endpoint-retry state.
                None => Box::pin(to_service(client, &pod, &ctx, &mut conn, &service, name, dst)).await,
            }
        }
        None => match Bound::workload(&ctx, dst) {
            Some(bound) => Box::pin(to_waypoint(client, &pod, &ctx, &mut conn, bound, dst)).await,
            None => direct(client, &pod, &ctx, &mut conn, dst).await,
        },
    };
    if !conn.transport.authenticated() {
        // Without mTLS the peer proves nothing, and we claim nothing for our side either.
        conn.src.identity = None;
    }
    ctx.record(conn, outcome);
}

/// Carries a connection to a destination that is not a Service's VIP, as [`connect`] reaches it.
async fn direct(
    client: TcpStream,
    pod: &PodContext,
    ctx: &ProxyContext,
    conn: &mut Connection,
    dst: SocketAddr,
) -> Outcome {
    // Connecting (TLS and HTTP/2 handshakes included) is boxed: its state would otherwise
    // stay in the task, idle, for the connection's whole life.
    match Box::pin(connect(ctx, pod, &client, conn.src.addr, dst, conn.traceparent())).await {
        Ok(connected) => {
            conn.transport = connected.transport;
            conn.dst.identity = connected.dst_identity;
            carry(ctx, client, connected.upstream).await
        }
        Err(e) => {
            conn.transport = Route::to(ctx, dst).transport();
            refused(&client, e)
        }
    }
}

/// A Service or workload bound to a waypoint.
struct Bound {
    /// `service` or `workload`.
    kind: &'static str,
    /// Its `namespace/name`.
    name: String,
    /// Its waypoint's `namespace/name`.
    waypoint: String,
}

impl Bound {
    /// The binding of the workload at `target`, when traffic addressed to it passes a waypoint.
    fn workload(ctx: &ProxyContext, target: SocketAddr) -> Option<Self> {
        let workload = ctx.state.workload_by_ip(target.ip())?;
        let waypoint = workload.waypoint.clone()?;
        Some(Self { kind: "workload", name: format!("{}/{}", workload.namespace, workload.name), waypoint })
    }
}

/// Carries a connection to a Service or workload bound to a waypoint: over HBONE to one of the
/// waypoint's ready addresses, which must prove the waypoint's identity, the CONNECT naming what
/// the client addressed (the Service's VIP and port, or the pod's IP and port; for a Service the
/// waypoint then picks an endpoint per request). A waypoint with no ready address refuses the
/// connection: it is never sent around the waypoint (fail closed). The waypoint's own pods are
/// never captured, so their traffic never comes back here.
async fn to_waypoint(
    client: TcpStream,
    pod: &PodContext,
    ctx: &ProxyContext,
    conn: &mut Connection,
    bound: Bound,
    authority: SocketAddr,
) -> Outcome {
    let Bound { kind, name, waypoint: key } = bound;
    let ready = ctx.state.waypoint(&key).filter(|w| !w.addresses.is_empty());
    let Some(waypoint) = ready else {
        return refused(&client, ProxyError::NoWaypoint { kind, name, waypoint: key });
    };
    let id = match SpiffeId::new(&ctx.identities.trust_domain(), &waypoint.namespace, &waypoint.name) {
        Ok(id) => id,
        Err(error) => return refused(&client, ProxyError::NoIdentity { workload: key, error }),
    };
    conn.transport = Transport::Mtls;
    conn.dst.identity = Some(id.as_str().into());
    // The addresses from a random one on; one that fails (a replica going away) costs an
    // attempt flow, and the next one is tried.
    let (addresses, start) = (&waypoint.addresses, rand::random_range(0..waypoint.addresses.len()));
    let attempts = addresses.len().min(SERVICE_ATTEMPTS);
    for n in 0..attempts {
        let address = addresses[(start + n) % addresses.len()];
        match hbone::open(&client, pod, ctx, Peer { ip: address, id: &id }, authority, conn.traceparent()).await {
            Ok(tunnel) => return carry(ctx, client, Upstream::Hbone(tunnel)).await,
            Err(error) if n + 1 < attempts && error.retryable() => {
                tracing::debug!(%kind, %name, %address, "waypoint address failed, trying another: {error}");
                let target = SocketAddr::new(address, mesh_common::HBONE_PORT);
                record_attempt(ctx, conn, target, Transport::Mtls, (n + 1, attempts), &error);
            }
            Err(error) => return refused(&client, error),
        }
    }
    unreachable!("a waypoint with addresses makes at least one attempt")
}

/// Records the failed attempt `(n, of)` of `conn` on `target` (carried by `transport`) as a
/// flow of its own: the client's address and start are the connection's.
fn record_attempt(
    ctx: &ProxyContext,
    conn: &Connection,
    target: SocketAddr,
    transport: Transport,
    (n, of): (usize, usize),
    error: &ProxyError,
) {
    let mut attempt = Connection::new(Direction::Outbound, conn.src.clone(), Endpoint::lookup(&ctx.state, target));
    attempt.start = conn.start;
    attempt.service.clone_from(&conn.service);
    attempt.transport = transport;
    if !transport.authenticated() {
        attempt.src.identity = None;
    }
    let failed = ProxyError::EndpointAttempt { attempt: n, attempts: of, error: Box::new(error.clone()) };
    ctx.record(attempt, Outcome::failed(failed));
}

/// Carries a connection to `service` (named `name`) at `vip`, one of its ClusterIPs and ports,
/// to one of its ready endpoints of the VIP's family (a dual-stack Service's IPv6 VIP leads to
/// its IPv6 endpoints, as kube-proxy does), trying another endpoint when a dial fails. Each
/// failed attempt gets a flow of its own (verdict error, the endpoint it tried, why it failed;
/// the client's address is the connection's), so a retry is seen, not inferred from the
/// client's success.
async fn to_service(
    client: TcpStream,
    pod: &PodContext,
    ctx: &ProxyContext,
    conn: &mut Connection,
    service: &Service,
    name: String,
    vip: SocketAddr,
) -> Outcome {
    let (port, ipv4) = (vip.port(), vip.is_ipv4());
    let mut tried = Vec::new();
    let mut last_error = None;
    for _ in 0..SERVICE_ATTEMPTS {
        let candidates: Vec<&ServiceEndpoint> = service
            .endpoints
            .iter()
            .filter(|e| e.ready && e.ip.is_ipv4() == ipv4 && e.target_ports.contains_key(&port))
            .filter(|e| !tried.contains(&e.ip))
            .collect();
        let Some(endpoint) = ctx.balancer.pick(&candidates) else { break };
        let target = SocketAddr::new(endpoint.ip, endpoint.target_ports[&port]);
        let _active = ctx.balancer.start(endpoint.ip);
        if let Some(bound) = Bound::workload(ctx, target) {
            // The endpoint is bound to a waypoint of workloads: the connection passes it,
            // addressed to the endpoint (as ztunnel sends a Service's traffic on to the
            // waypoint of the workload it picked).
            conn.dst = Endpoint::lookup(&ctx.state, target);
            return Box::pin(to_waypoint(client, pod, ctx, conn, bound, target)).await;
        }
        match Box::pin(connect(ctx, pod, &client, conn.src.addr, target, conn.traceparent())).await {
            Ok(connected) => {
                conn.dst = Endpoint::lookup(&ctx.state, target);
                conn.transport = connected.transport;
                conn.dst.identity = connected.dst_identity;
                return carry(ctx, client, connected.upstream).await;
            }
            // A policy refusal is the answer, not a reason to try elsewhere; nor is a failure
            // after the destination may have had the client's bytes.
            Err(error) if !error.retryable() => {
                conn.dst = Endpoint::lookup(&ctx.state, target);
                conn.transport = Route::to(ctx, target).transport();
                return refused(&client, error);
            }
            Err(error) => {
                tracing::debug!(service = %name, %target, "endpoint failed, trying another: {error}");
                let transport = Route::to(ctx, target).transport();
                record_attempt(ctx, conn, target, transport, (tried.len() + 1, SERVICE_ATTEMPTS), &error);
                tried.push(endpoint.ip);
                last_error = Some(error);
            }
        }
    }
    let error = match last_error {
        Some(last) => ProxyError::NoEndpointReachable { service: name, tried: tried.len(), last: Box::new(last) },
        None => ProxyError::NoReadyEndpoint { service: name, port, family: if ipv4 { "IPv4" } else { "IPv6" } },
    };
    refused(&client, error)
}
