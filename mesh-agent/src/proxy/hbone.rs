//! HBONE in the node agent: a pod's 15008 listener (TLS with the pod's certificate, the
//! per-source and per-pod limits, each CONNECT checked, decided by policy, and relayed to the app
//! dialled with the client's IP, each recorded as a flow) and the client side of captured
//! connections (dialling from inside the source pod's netns). The protocol itself (HTTP/2
//! settings, the server loop, the pool, the stream copies) is `ferrymesh_dataplane::hbone`.

use std::io;
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrymesh_dataplane::hbone::client::{Connect, ConnectHeaders, Dialer, Peer};
use ferrymesh_dataplane::hbone::pool::StreamSlot;
use ferrymesh_dataplane::hbone::queue::SendQueue;
use ferrymesh_dataplane::hbone::server::{accept_tls, connect_target, respond_status, serve_h2_until, NotAccepted};
use ferrymesh_dataplane::hbone::stream::{h2_to_tcp, tcp_to_h2};
use ferrymesh_dataplane::spans::TraceParent;
use ferrymesh_policy::Transport;
use h2::{RecvStream, SendStream};
use http::{Request, StatusCode};
use mesh_common::{HBONE_PORT, MARK_AGENT};
use nix::sys::socket::MsgFlags;
use rustls::ServerConfig;
use tokio::io::AsyncReadExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;

use super::authz::InboundRequest;
use super::{
    accept_loop, reset, until_done_or_revoked, Admitted, Connection, Outcome, PodContext, ProxyContext, Refused,
    RelayEnd,
};
use crate::error::{Denied, ProxyError};
use crate::flows::{Direction, Endpoint};
use crate::limits::{Held, Limit};
use crate::tls;

/// Most of a client's first bytes sent with the CONNECT, ahead of its answer (see
/// [`open`]): an HTTP request's head or a TLS ClientHello fits.
const FIRST_BYTES: usize = 16 * 1024;

/// Relays between a TCP connection and an HTTP/2 stream until both directions end, one fails,
/// or `close` fires; failure and revocation reset both sides. The first `sent_ahead` bytes of
/// the TCP connection already went out on the stream (with its CONNECT) and are skipped. On a
/// server connection, what goes to the stream takes room in the connection's `queue` first.
/// Returns (bytes TCP -> stream, bytes stream -> TCP, how it ended).
async fn relay(
    tcp: TcpStream,
    mut recv: RecvStream,
    mut send: SendStream<Bytes>,
    close: Option<oneshot::Receiver<Denied>>,
    sent_ahead: usize,
    queue: Option<&SendQueue>,
) -> (u64, u64, RelayEnd) {
    let (mut up, mut down) = (sent_ahead as u64, 0);
    let (mut read, mut write) = tcp.into_split();
    let id = send.stream_id().as_u32();
    queue.inspect(|queue| queue.open(id));
    let end = until_done_or_revoked(
        || async {
            if sent_ahead > 0 {
                // They are in the socket already (they were peeked), so this does not wait.
                read.read_exact(&mut vec![0; sent_ahead]).await?;
            }
            futures::future::try_join(
                tcp_to_h2(&mut read, &mut send, &mut up, queue),
                h2_to_tcp(&mut recv, &mut write, &mut down),
            )
            .await
        },
        close,
    )
    .await;
    if !matches!(end, RelayEnd::Closed) {
        send.send_reset(h2::Reason::CANCEL);
        if let Ok(tcp) = read.reunite(write) {
            reset(&tcp);
        }
        // h2 drops what it had queued for a reset stream.
        queue.inspect(|queue| queue.reset(id));
    } else {
        queue.inspect(|queue| queue.close(id));
    }
    (up, down, end)
}

// ---------------------------------------------------------------------------------------
// Server side.

/// Serves a pod's 15008 listener until the task is aborted.
pub async fn serve(listener: TcpListener, tls: Arc<ServerConfig>, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    accept_loop(listener, "hbone", ctx.drain.clone(), move |stream, peer| {
        serve_connection(stream, peer, tls.clone(), pod.clone(), ctx.clone())
    })
    .await
}

async fn serve_connection(
    tcp: TcpStream,
    peer: SocketAddr,
    tls: Arc<ServerConfig>,
    pod: Arc<PodContext>,
    ctx: Arc<ProxyContext>,
) {
    let local = tcp.local_addr().unwrap_or_else(|_| SocketAddr::new(pod.workload.ip, HBONE_PORT));
    let failed = |error: ProxyError| {
        let conn = Connection::new(
            Direction::Inbound,
            Endpoint::lookup(&ctx.state, peer),
            pod.endpoint(local, &ctx.identities),
        );
        ctx.record(conn, Outcome::failed(error));
    };
    // Held for the connection's whole life: its place under the per-source and per-pod limits.
    let _held = match ctx.load.connection(&ctx.limits, peer.ip(), pod.workload.ip) {
        Ok(held) => held,
        Err(refusal) => {
            refusal.limit().count();
            reset(&tcp);
            return failed(ProxyError::Limited(refusal));
        }
    };
    let _ = tcp.set_nodelay(true);
    let stream = match accept_tls(tcp, tls, (&ctx.limits, &ctx.load), peer.ip(), pod.workload.ip).await {
        Ok(stream) => stream,
        Err(NotAccepted::Refused(refusal)) => return failed(ProxyError::Limited(refusal)),
        Err(NotAccepted::Timeout(timeout)) => return failed(ProxyError::HandshakeTimeout(timeout)),
        Err(NotAccepted::Failed(e)) => return failed(ProxyError::Handshake(tls::describe(&e))),
    };
    let (_, session) = stream.get_ref();
    if session.alpn_protocol() != Some(tls::ALPN_H2) {
        return failed(ProxyError::NoAlpnH2);
    }
    let peer_cert = session.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    // Shared by every stream of the connection.
    let peer_id: Option<Arc<str>> = tls::spiffe_id_of(&peer_cert).ok().map(|id| Arc::from(id.as_str()));
    let peer_serial: Arc<str> = tls::serial_and_expiry(&peer_cert).map(|(s, _)| s).unwrap_or_default().into();
    let drain = ctx.drain.clone();
    let ended = serve_h2_until(
        stream,
        &ctx.windows,
        |http, mut respond, queue| {
            let held = match ctx.load.stream(&ctx.limits, peer.ip(), pod.workload.ip) {
                Ok(held) => held,
                Err(refusal) => {
                    refusal.limit().count();
                    respond.send_reset(h2::Reason::REFUSED_STREAM);
                    let port = http.uri().port_u16().unwrap_or(0);
                    let mut src = Endpoint::lookup(&ctx.state, peer);
                    src.identity = peer_id.clone();
                    let to = SocketAddr::new(local.ip(), port);
                    let conn = Connection::new(Direction::Inbound, src, pod.endpoint(to, &ctx.identities));
                    return ctx.record(conn, Outcome::failed(ProxyError::Limited(refusal)));
                }
            };
            let peer = PeerInfo { addr: peer, local, identity: peer_id.clone(), serial: peer_serial.clone() };
            // Boxed so the stream's task does not keep room for them once they are used.
            let stream = Box::new(NewStream { http, respond, peer, queue: queue.clone(), _held: held });
            tokio::spawn(serve_stream(stream, pod.clone(), ctx.clone()));
        },
        drain.started(),
    )
    .await;
    if let Err(closed) = ended {
        // A GOAWAY the server sent is a refusal (rapid reset, an oversized header block, a
        // malformed frame); one from the client is only its reason for leaving.
        if closed.by_server {
            Limit::Http2Protocol.count();
        }
        failed(ProxyError::Http2(closed));
    }
}

/// A CONNECT request as it arrives, with the connection's authenticated client.
struct NewStream {
    http: Request<RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    peer: PeerInfo,
    /// Its connection's send queue.
    queue: Arc<SendQueue>,
    /// Its place under the per-source and per-pod stream limits, for the stream's whole life.
    _held: Held,
}

/// The authenticated client of an HBONE connection.
#[derive(Debug, Clone)]
struct PeerInfo {
    addr: SocketAddr,
    local: SocketAddr,
    identity: Option<Arc<str>>,
    serial: Arc<str>,
}

/// A CONNECT admitted and answered 200, ready to relay.
struct Accepted<'a> {
    admitted: Admitted<'a>,
    body: RecvStream,
    send: SendStream<Bytes>,
    queue: Arc<SendQueue>,
    /// Its place under the per-source and per-pod stream limits.
    _held: Held,
}

async fn serve_stream(stream: Box<NewStream>, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    // Everything before the relay is boxed: its state would otherwise stay, idle, in the task
    // for the whole life of the stream.
    let (conn, accepted) = Box::pin(accept_stream(*stream, &pod, &ctx)).await;
    let outcome = match accepted {
        Err(outcome) => outcome,
        Ok(Accepted { admitted: Admitted { app, policy, close, _live }, body, send, queue, _held }) => {
            let (to_client, to_app, end) = relay(app, body, send, Some(close), 0, Some(&queue)).await;
            Outcome::relayed(to_app, to_client, end, policy)
        }
    };
    ctx.record(conn, outcome);
}

/// Checks a CONNECT (target, then policy), dials the app as the client's IP and answers 200;
/// or answers the error status and returns the refusal.
async fn accept_stream<'a>(
    stream: NewStream,
    pod: &PodContext,
    ctx: &'a ProxyContext,
) -> (Connection, Result<Accepted<'a>, Outcome>) {
    let NewStream { http, mut respond, peer, queue, _held } = stream;
    let (parts, body) = http.into_parts();
    let target = connect_target(&parts.method, parts.uri.authority().map(|a| a.as_str()), peer.local.ip());
    // The connection's span is the child of the sender's, named by the CONNECT's traceparent.
    let trace = ctx.tracer.start(TraceParent::of(&parts.headers));
    drop(parts);
    let mut src = Endpoint::lookup(&ctx.state, peer.addr);
    src.identity = peer.identity.clone();
    let port = target.as_ref().map_or(0, |t| t.port());
    let to = SocketAddr::new(peer.local.ip(), port);
    let mut conn = Connection::new(Direction::Inbound, src, pod.endpoint(to, &ctx.identities));
    conn.transport = Transport::Mtls;
    conn.peer_cert_serial = peer.serial;
    conn.trace = trace;
    let target = match target {
        Ok(target) => target,
        Err(bad) => {
            respond_status(&mut respond, bad.status());
            return (conn, Err(Outcome::failed(ProxyError::BadConnect(bad))));
        }
    };
    let request = InboundRequest {
        source_ip: peer.addr.ip(),
        source_identity: peer.identity,
        destination: target,
        transport: Transport::Mtls,
    };
    let admitted = match ctx.admit(pod, request).await {
        Ok(admitted) => admitted,
        Err(refused) => {
            let status = match refused {
                Refused::Denied(_) => StatusCode::UNAUTHORIZED,
                Refused::Dial(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            respond_status(&mut respond, status);
            return (conn, Err(Outcome::failed(refused.error(target))));
        }
    };
    let accepted = match respond_status(&mut respond, StatusCode::OK) {
        Some(send) => Ok(Accepted { admitted, body, send, queue, _held }),
        None => Err(Outcome::failed(ProxyError::ClientGone)),
    };
    (conn, accepted)
}

// ---------------------------------------------------------------------------------------
// Client side.

/// Dials peers' 15008 from inside a source pod's netns, marked as the agent's own traffic (the
/// capture hooks leave it alone).
struct PodDialer<'a> {
    ctx: &'a ProxyContext,
    pod: &'a PodContext,
}

impl Dialer for PodDialer<'_> {
    type Io = TcpStream;

    async fn dial(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        self.ctx.dial(&self.pod.netns, addr, MARK_AGENT, None).await
    }

    fn source(&self, peer: std::net::IpAddr) -> Option<std::net::IpAddr> {
        Some(self.pod.workload.ip_for(peer))
    }
}

/// An HBONE stream open for a captured connection.
pub(super) struct Tunnel {
    send: SendStream<Bytes>,
    recv: RecvStream,
    /// The stream's place on its pooled connection, held until the stream ends.
    _slot: StreamSlot,
    /// How many of the client's first bytes went out with the CONNECT.
    sent_ahead: usize,
}

/// Opens an HBONE stream for `client`, a captured connection of `pod`, to `target` through
/// `peer` (the destination itself, or the waypoint of the destination's Service), which must
/// prove its identity (a refusal by the destination's policy is a 401, see
/// [`ProxyError::verdict`]). What the client has sent already (up to [`FIRST_BYTES`]) goes with
/// the CONNECT: it is peeked, not read, so a refusal leaves it in the socket for another
/// endpoint or route, and the relay skips it once the stream is answered.
pub(super) async fn open(
    client: &TcpStream,
    pod: &PodContext,
    ctx: &ProxyContext,
    peer: Peer<'_>,
    target: SocketAddr,
    traceparent: String,
) -> Result<Tunnel, ProxyError> {
    let cert = ctx.identities.cert(&pod.identity, Duration::from_secs(5)).await.map_err(ProxyError::Certificate)?;
    let roots = ctx.identities.trust().borrow().as_ref().map(|t| t.roots.clone());
    let roots = roots.ok_or(ProxyError::NoTrustBundle)?;
    let headers = ConnectHeaders {
        forwarded_for: pod.workload.ip_for(peer.ip),
        baggage: format!("k8s.namespace.name={},k8s.pod.name={}", pod.workload.namespace, pod.workload.name),
        traceparent,
    };
    let first = peek(client);
    let sent_ahead = first.len();
    let dialer = PodDialer { ctx, pod };
    let (send, recv, _slot) = ctx
        .hbone
        .open_via(&dialer, &cert, roots, peer, Connect { target, headers: &headers, first })
        .await
        .map_err(|e| ProxyError::Tunnel(Arc::new(e)))?;
    Ok(Tunnel { send, recv, _slot, sent_ahead })
}

/// What `client` has sent and nobody has read, up to [`FIRST_BYTES`], left in the socket;
/// empty when nothing is there yet (a server-first protocol) or on any error (the relay meets
/// it).
fn peek(client: &TcpStream) -> Bytes {
    let mut buf = vec![0; FIRST_BYTES];
    let flags = MsgFlags::MSG_PEEK | MsgFlags::MSG_DONTWAIT;
    match nix::sys::socket::recv(client.as_raw_fd(), &mut buf, flags) {
        Ok(n) => {
            buf.truncate(n);
            Bytes::from(buf)
        }
        Err(_) => Bytes::new(),
    }
}

/// Relays a captured client connection over its open HBONE stream.
pub(super) async fn relay_client(client: TcpStream, tunnel: Tunnel) -> (u64, u64, RelayEnd) {
    let Tunnel { send, recv, _slot, sent_ahead } = tunnel;
    relay(client, recv, send, None, sent_ahead, None).await
}
