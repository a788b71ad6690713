//! HBONE: TCP carried in HTTP/2 CONNECT streams over mutual TLS (port 15008), wire-compatible
//! with Istio's ztunnel. The server side terminates mTLS in the destination pod's netns and
//! dials the app with the client's IP; the client side pools one HTTP/2 connection per
//! (source identity and certificate, destination identity, destination IP).

use std::collections::HashMap;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use ferrymesh_policy::Transport;
use ferrymesh_spiffe::SpiffeId;
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use mesh_common::{HBONE_PORT, MARK_AGENT, RESERVED_PORTS};
use rustls::pki_types::ServerName;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use super::authz::{Denied, InboundRequest};
use super::limits::{Held, Limit};
use super::{
    accept_loop, reset, until_done_or_revoked, Admitted, Connection, Outcome, PodContext, ProxyContext, Refused,
    RelayEnd, RELAY_BUFFER,
};
use crate::flows::{Direction, Endpoint, Verdict};
use crate::identity::{Identity, IdentityManager, WorkloadCert};
use crate::tls;

/// HTTP/2 stream window.
const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 connection window.
const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// HTTP/2 max frame size.
const MAX_FRAME: u32 = 1024 * 1024;
/// Streams per HTTP/2 connection.
const MAX_STREAMS: u32 = 100;
/// Largest header block a client may send: a CONNECT carries a handful of short headers.
const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Streams a client may reset before the server has taken them up ("rapid reset"); past it
/// the connection is closed with GOAWAY ENHANCE_YOUR_CALM.
const MAX_PENDING_RESETS: usize = 20;
/// How long the client side's TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer under TLS. rustls asks its transport for at most 4 KiB per read, which would
/// cost a recv syscall per 4 KiB of ciphertext; a buffer in between makes each recv take
/// whatever the socket holds, up to this much, and rustls then reads from memory.
const TLS_READ_BUFFER: usize = 32 * 1024;

/// The certificate a pod's 15008 listener presents: the current one of its identity, looked
/// up at each handshake so renewals apply to new connections.
#[derive(Debug)]
pub struct PodCertResolver {
    /// Where certificates live.
    pub identities: Arc<IdentityManager>,
    /// The pod's identity.
    pub identity: Identity,
}

impl ResolvesServerCert for PodCertResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.identities.current(&self.identity).map(|c| c.key.clone())
    }
}

fn h2_io(e: h2::Error) -> io::Error {
    if let Some(reason) = e.reason() {
        io::Error::new(io::ErrorKind::ConnectionReset, format!("HBONE stream reset ({reason})"))
    } else {
        io::Error::other(format!("HBONE: {e}"))
    }
}

/// Copies TCP bytes into an HTTP/2 stream, honouring flow control; EOF ends the stream.
/// An idle connection holds no buffer: one is taken when bytes are there, and handed to h2.
async fn tcp_to_h2(from: &mut OwnedReadHalf, to: &mut SendStream<Bytes>, count: &mut u64) -> io::Result<()> {
    loop {
        from.readable().await?;
        let mut buf = BytesMut::with_capacity(RELAY_BUFFER);
        match from.try_read_buf(&mut buf) {
            Ok(0) => return to.send_data(Bytes::new(), true).map_err(h2_io),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
        let mut data = buf.freeze();
        while !data.is_empty() {
            to.reserve_capacity(data.len());
            let granted = match poll_fn(|cx| to.poll_capacity(cx)).await {
                Some(granted) => granted.map_err(h2_io)?,
                None => return Err(io::Error::new(io::ErrorKind::BrokenPipe, "HBONE stream closed by the peer")),
            };
            let chunk = data.split_to(granted.min(data.len()));
            *count += chunk.len() as u64;
            to.send_data(chunk, false).map_err(h2_io)?;
        }
    }
}

/// Copies an HTTP/2 stream into TCP, releasing flow-control capacity; the stream's end
/// half-closes the TCP side.
async fn h2_to_tcp(from: &mut RecvStream, to: &mut OwnedWriteHalf, count: &mut u64) -> io::Result<()> {
    while let Some(chunk) = from.data().await {
        let chunk = chunk.map_err(h2_io)?;
        to.write_all(&chunk).await?;
        *count += chunk.len() as u64;
        let _ = from.flow_control().release_capacity(chunk.len());
    }
    to.shutdown().await
}

/// Relays between a TCP connection and an HTTP/2 stream until both directions end, one fails,
/// or `close` fires; failure and revocation reset both sides. Returns (bytes TCP -> stream,
/// bytes stream -> TCP, how it ended).
async fn relay(
    tcp: TcpStream,
    mut recv: RecvStream,
    mut send: SendStream<Bytes>,
    close: Option<oneshot::Receiver<Denied>>,
) -> (u64, u64, RelayEnd) {
    let (mut up, mut down) = (0, 0);
    let (mut read, mut write) = tcp.into_split();
    let end = until_done_or_revoked(
        || {
            futures::future::try_join(
                tcp_to_h2(&mut read, &mut send, &mut up),
                h2_to_tcp(&mut recv, &mut write, &mut down),
            )
        },
        close,
    )
    .await;
    if !matches!(end, RelayEnd::Closed) {
        send.send_reset(h2::Reason::CANCEL);
        if let Ok(tcp) = read.reunite(write) {
            reset(&tcp);
        }
    }
    (up, down, end)
}

// ---------------------------------------------------------------------------------------
// Server side.

/// Serves a pod's 15008 listener until the task is aborted.
pub async fn serve(listener: TcpListener, tls: Arc<ServerConfig>, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    accept_loop(listener, "hbone", move |stream, peer| {
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
    let failed = |reason: String| {
        let conn = Connection::new(
            Direction::Inbound,
            Endpoint::lookup(&ctx.state, peer),
            pod.endpoint(HBONE_PORT, &ctx.identities),
        );
        ctx.record(conn, Outcome::failed(reason));
    };
    // Held for the connection's whole life: its place under the per-source and per-pod limits.
    let _held = match ctx.load.connection(&ctx.limits, peer.ip(), pod.workload.ip) {
        Ok(held) => held,
        Err(refusal) => {
            refusal.limit().count();
            reset(&tcp);
            return failed(refusal.to_string());
        }
    };
    let _ = tcp.set_nodelay(true);
    let timeout = ctx.limits.handshake_timeout;
    // Nothing is allocated for TLS until the client has sent something: a connection that
    // never does (a half-open flood) holds a socket and this task only, until the timeout.
    let handshake = async {
        tcp.readable().await?;
        TlsAcceptor::from(tls).accept(BufReader::with_capacity(TLS_READ_BUFFER, tcp)).await
    };
    let stream = match tokio::time::timeout(timeout, handshake).await {
        Ok(Ok(stream)) => stream,
        Ok(Err(e)) => return failed(format!("TLS handshake failed: {}", tls::describe(&e))),
        Err(_) => {
            Limit::HandshakeTimeout.count();
            return failed(format!("TLS handshake did not finish within {timeout:?} (--hbone-handshake-timeout)"));
        }
    };
    let (_, session) = stream.get_ref();
    if session.alpn_protocol() != Some(tls::ALPN_H2) {
        return failed("the client did not negotiate ALPN h2".into());
    }
    let peer_cert = session.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec()).unwrap_or_default();
    // Shared by every stream of the connection.
    let peer_id: Option<Arc<str>> = tls::spiffe_id_of(&peer_cert).ok().map(|id| Arc::from(id.as_str()));
    let peer_serial: Arc<str> = tls::serial_and_expiry(&peer_cert).map(|(s, _)| s).unwrap_or_default().into();
    let ended = serve_h2(stream, |http, mut respond| {
        let held = match ctx.load.stream(&ctx.limits, peer.ip(), pod.workload.ip) {
            Ok(held) => held,
            Err(refusal) => {
                refusal.limit().count();
                respond.send_reset(h2::Reason::REFUSED_STREAM);
                let port = http.uri().port_u16().unwrap_or(0);
                let mut src = Endpoint::lookup(&ctx.state, peer);
                src.identity = peer_id.clone();
                let conn = Connection::new(Direction::Inbound, src, pod.endpoint(port, &ctx.identities));
                return ctx.record(conn, Outcome::failed(refusal.to_string()));
            }
        };
        let peer = PeerInfo { addr: peer, local, identity: peer_id.clone(), serial: peer_serial.clone() };
        // Boxed so the stream's task does not keep room for them once they are used.
        let stream = Box::new(NewStream { http, respond, peer, _held: held });
        tokio::spawn(serve_stream(stream, pod.clone(), ctx.clone()));
    })
    .await;
    if let Err(closed) = ended {
        // A GOAWAY the server sent is a refusal (rapid reset, an oversized header block, a
        // malformed frame); one from the client is only its reason for leaving.
        if closed.by_server {
            Limit::Http2Protocol.count();
        }
        failed(closed.reason);
    }
}

/// An HTTP/2 connection that ended on an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Http2Closed {
    /// The server closed it (a GOAWAY of ours, or a failed handshake), not the client.
    pub(crate) by_server: bool,
    /// What happened, for the flow.
    pub(crate) reason: String,
}

/// The HTTP/2 server settings of every HBONE listener.
fn server_settings() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS);
    builder
}

/// Serves HTTP/2 on an established (TLS) connection, handing each request to `on_stream`, until
/// the client closes it. A connection that ends on a protocol error (a malformed frame, too
/// many rapid resets, an oversized header block: h2 answers with GOAWAY) returns what happened,
/// for a flow record; a client that simply goes away is no error.
pub(crate) async fn serve_h2<IO>(
    io: IO,
    mut on_stream: impl FnMut(Request<RecvStream>, h2::server::SendResponse<Bytes>),
) -> Result<(), Http2Closed>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut connection = match server_settings().handshake::<_, Bytes>(io).await {
        Ok(connection) => connection,
        Err(e) => return Err(Http2Closed { by_server: true, reason: format!("HTTP/2 handshake failed: {e}") }),
    };
    while let Some(accepted) = connection.accept().await {
        match accepted {
            Ok((request, respond)) => on_stream(request, respond),
            Err(e) => return connection_error(e),
        }
    }
    Ok(())
}

/// A connection-level HTTP/2 error worth a flow: one with a reason (protocol error, GOAWAY
/// ENHANCE_YOUR_CALM...), not the peer's socket closing.
fn connection_error(e: h2::Error) -> Result<(), Http2Closed> {
    match e.reason() {
        Some(reason) if reason != h2::Reason::NO_ERROR => {
            let by = if e.is_remote() { "the client" } else { "the server" };
            let reason = format!("HTTP/2 connection closed by {by}: {reason:?} ({e})");
            Err(Http2Closed { by_server: !e.is_remote(), reason })
        }
        _ => Ok(()),
    }
}

/// A CONNECT request as it arrives, with the connection's authenticated client.
struct NewStream {
    http: Request<RecvStream>,
    respond: h2::server::SendResponse<Bytes>,
    peer: PeerInfo,
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

fn respond_status(respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode) -> Option<SendStream<Bytes>> {
    let response = Response::builder().status(status).body(()).expect("static response");
    respond.send_response(response, status != StatusCode::OK).ok()
}

/// Validates an HBONE request: a CONNECT whose authority is `<the IP the connection arrived
/// on>:<port>` with a port that is not the mesh's own. Errors carry the status to answer.
pub fn connect_target(
    method: &Method,
    authority: Option<&str>,
    local_ip: IpAddr,
) -> Result<SocketAddr, (StatusCode, String)> {
    if method != Method::CONNECT {
        return Err((StatusCode::BAD_REQUEST, format!("HBONE request method {method} is not CONNECT")));
    }
    let Some(target) = authority.and_then(|a| a.parse::<SocketAddr>().ok()) else {
        return Err((StatusCode::BAD_REQUEST, format!("CONNECT authority {authority:?} is not ip:port")));
    };
    if target.ip() != local_ip {
        return Err((
            StatusCode::BAD_REQUEST,
            format!("CONNECT authority {target} is not the address the connection arrived on ({local_ip})"),
        ));
    }
    if RESERVED_PORTS.contains(&target.port()) {
        return Err((StatusCode::SERVICE_UNAVAILABLE, format!("port {} is reserved for the mesh", target.port())));
    }
    Ok(target)
}

/// A CONNECT admitted and answered 200, ready to relay.
struct Accepted<'a> {
    admitted: Admitted<'a>,
    body: RecvStream,
    send: SendStream<Bytes>,
    /// Its place under the per-source and per-pod stream limits.
    _held: Held,
}

async fn serve_stream(stream: Box<NewStream>, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    // Everything before the relay is boxed: its state would otherwise stay, idle, in the task
    // for the whole life of the stream.
    let (conn, accepted) = Box::pin(accept_stream(*stream, &pod, &ctx)).await;
    let outcome = match accepted {
        Err(outcome) => outcome,
        Ok(Accepted { admitted: Admitted { app, policy, close, _live }, body, send, _held }) => {
            let (to_client, to_app, end) = relay(app, body, send, Some(close)).await;
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
    let NewStream { http, mut respond, peer, _held } = stream;
    let (parts, body) = http.into_parts();
    let target = connect_target(&parts.method, parts.uri.authority().map(|a| a.as_str()), peer.local.ip());
    drop(parts);
    let mut src = Endpoint::lookup(&ctx.state, peer.addr);
    src.identity = peer.identity.clone();
    let port = target.as_ref().map_or(0, |t| t.port());
    let mut conn = Connection::new(Direction::Inbound, src, pod.endpoint(port, &ctx.identities));
    conn.transport = Transport::Mtls;
    conn.peer_cert_serial = peer.serial;
    let mut refuse = |status: StatusCode, reason: String| {
        respond_status(&mut respond, status);
        Outcome::failed(format!("{} {reason}", status.as_u16()))
    };
    let target = match target {
        Ok(target) => target,
        Err((status, reason)) => return (conn, Err(refuse(status, reason))),
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
            return (conn, Err(refused.outcome(target)));
        }
    };
    let accepted = match respond_status(&mut respond, StatusCode::OK) {
        Some(send) => Ok(Accepted { admitted, body, send, _held }),
        None => Err(Outcome::failed("the client went away before the CONNECT was answered".into())),
    };
    (conn, accepted)
}

// ---------------------------------------------------------------------------------------
// Client side.

/// Key of a pooled HBONE connection.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct PoolKey {
    src: SpiffeId,
    /// A renewed source certificate opens new connections.
    src_serial: String,
    dst: SpiffeId,
    dst_ip: IpAddr,
}

/// Pooled HTTP/2 connections to other pods' 15008.
#[derive(Debug, Default)]
pub struct Pool {
    connections: Arc<Mutex<PoolMap>>,
}

/// Pooled connections with a generation each, so an ended connection only ever removes itself,
/// and the number of streams open on each. A key holds several connections once one has all
/// [`MAX_STREAMS`] streams open (the peer's limit: a stream over it would wait, not fail).
type PoolMap = HashMap<PoolKey, Vec<Pooled>>;

#[derive(Debug, Clone)]
struct Pooled {
    generation: u64,
    sender: h2::client::SendRequest<Bytes>,
    open: Arc<std::sync::atomic::AtomicU32>,
}

/// One stream's place on a pooled connection, given back when dropped (the stream ended).
#[derive(Debug)]
pub(super) struct StreamSlot(Arc<std::sync::atomic::AtomicU32>);

impl StreamSlot {
    /// Takes a place on a connection with `open` streams, if it has one free.
    fn take(open: &Arc<std::sync::atomic::AtomicU32>) -> Option<Self> {
        use std::sync::atomic::Ordering;
        open.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < MAX_STREAMS).then_some(n + 1))
            .ok()
            .map(|_| Self(open.clone()))
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}
static GENERATION: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn unpool(pool: &Mutex<PoolMap>, key: &PoolKey, generation: u64) {
    let mut pool = pool.lock().expect("pool lock");
    if let Some(connections) = pool.get_mut(key) {
        connections.retain(|c| c.generation != generation);
        if connections.is_empty() {
            pool.remove(key);
        }
    }
}

/// Interval of HTTP/2 PINGs on a pooled connection, and how long a PONG may take.
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(10);

/// PINGs the connection every [`KEEPALIVE_INTERVAL`]; one without a PONG in time drops the
/// connection from the pool (new streams go to a new connection; open ones end with it).
async fn keepalive(mut ping_pong: h2::PingPong, pool: Arc<Mutex<PoolMap>>, key: PoolKey, generation: u64) {
    loop {
        tokio::time::sleep(KEEPALIVE_INTERVAL).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping_pong.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(_)) => break,
            Err(_) => {
                tracing::warn!(dst = %key.dst_ip, "HBONE connection missed its PING; dropping it from the pool");
                break;
            }
        }
    }
    unpool(&pool, &key, generation);
}

/// Why an HBONE stream could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum HboneError {
    /// The TCP connection to 15008 failed.
    #[error("connect to {0}:15008 failed: {1} (is port 15008 allowed by a NetworkPolicy?)")]
    Connect(IpAddr, io::Error),
    /// The TLS handshake failed (untrusted CA, wrong identity, expired certificate...).
    #[error("mTLS handshake with {0} failed: {1}")]
    Tls(IpAddr, String),
    /// HTTP/2 failed.
    #[error("HTTP/2 to {0}: {1}")]
    Http2(IpAddr, h2::Error),
    /// The destination agent answered the CONNECT with an error status.
    #[error("destination refused the tunnel: HTTP {0}")]
    Refused(u16),
}

impl ProxyContext {
    async fn hbone_sender(
        &self,
        pod: &PodContext,
        cert: &WorkloadCert,
        dst_ip: IpAddr,
        dst_id: &SpiffeId,
    ) -> Result<(h2::client::SendRequest<Bytes>, StreamSlot), HboneError> {
        let key = PoolKey { src: cert.spiffe_id.clone(), src_serial: cert.serial.clone(), dst: dst_id.clone(), dst_ip };
        let pooled: Vec<Pooled> =
            self.pool.connections.lock().expect("pool lock").get(&key).cloned().unwrap_or_default();
        // The first pooled connection with a free stream; when all are full, a new one.
        for connection in pooled {
            if let Some(slot) = StreamSlot::take(&connection.open) {
                if let Ok(sender) = connection.sender.ready().await {
                    return Ok((sender, slot));
                }
            }
        }
        let tcp = self
            .dial(&pod.netns, SocketAddr::new(dst_ip, HBONE_PORT), MARK_AGENT, None)
            .await
            .map_err(|e| HboneError::Connect(dst_ip, e))?;
        let roots = self.identities.trust().borrow().as_ref().map(|t| t.roots.clone());
        let roots = roots.ok_or_else(|| HboneError::Tls(dst_ip, "no trust bundle from mesh-ctrl yet".into()))?;
        let config =
            tls::client_config(cert, roots, dst_id.clone()).map_err(|e| HboneError::Tls(dst_ip, e.to_string()))?;
        let stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(Arc::new(config))
                .connect(ServerName::IpAddress(dst_ip.into()), BufReader::with_capacity(TLS_READ_BUFFER, tcp)),
        )
        .await
        .map_err(|_| HboneError::Tls(dst_ip, format!("no handshake within {HANDSHAKE_TIMEOUT:?}")))?
        .map_err(|e| HboneError::Tls(dst_ip, tls::describe(&e)))?;
        if stream.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
            return Err(HboneError::Tls(dst_ip, "the server did not negotiate ALPN h2".into()));
        }
        let (sender, mut connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_frame_size(MAX_FRAME)
            .max_concurrent_streams(MAX_STREAMS)
            .handshake::<_, Bytes>(stream)
            .await
            .map_err(|e| HboneError::Http2(dst_ip, e))?;
        let generation = GENERATION.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let ping_pong = connection.ping_pong().expect("ping_pong is taken once, right after the handshake");
        tokio::spawn(keepalive(ping_pong, self.pool.connections.clone(), key.clone(), generation));
        let pool = self.pool.connections.clone();
        let pooled = key.clone();
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("HBONE connection to {dst_ip} ended: {e}");
            }
            // An ended connection leaves the pool at once rather than at its next use.
            unpool(&pool, &pooled, generation);
        });
        let mut pool = self.pool.connections.lock().expect("pool lock");
        // Connections of an older certificate of the same identity drain and are dropped.
        pool.retain(|k, _| {
            !(k.src == key.src && k.dst == key.dst && k.dst_ip == key.dst_ip && k.src_serial != key.src_serial)
        });
        let open = Arc::new(std::sync::atomic::AtomicU32::new(0));
        let slot = StreamSlot::take(&open).expect("a new connection has room");
        pool.entry(key).or_default().push(Pooled { generation, sender: sender.clone(), open });
        Ok((sender, slot))
    }

    /// Opens an HBONE stream from `pod` (with `cert`) to `dst`, whose identity must be `dst_id`.
    async fn hbone_open(
        &self,
        pod: &PodContext,
        cert: &WorkloadCert,
        dst: SocketAddr,
        dst_id: &SpiffeId,
    ) -> Result<(SendStream<Bytes>, RecvStream, StreamSlot), HboneError> {
        let (mut sender, slot) = self.hbone_sender(pod, cert, dst.ip(), dst_id).await?;
        let request = Request::builder()
            .method(Method::CONNECT)
            .uri(dst.to_string())
            .header("forwarded", format!("for=\"{}\"", pod.workload.ip))
            .header(
                "baggage",
                format!("k8s.namespace.name={},k8s.pod.name={}", pod.workload.namespace, pod.workload.name),
            )
            .header("traceparent", traceparent())
            .body(())
            .expect("CONNECT request");
        let (response, send) = sender.send_request(request, false).map_err(|e| HboneError::Http2(dst.ip(), e))?;
        let response = response.await.map_err(|e| HboneError::Http2(dst.ip(), e))?;
        if response.status() != StatusCode::OK {
            return Err(HboneError::Refused(response.status().as_u16()));
        }
        Ok((send, response.into_body(), slot))
    }
}

/// A new W3C trace context (version 00, random trace and span ids, sampled).
fn traceparent() -> String {
    format!("00-{:032x}-{:016x}-01", rand::random::<u128>(), rand::random::<u64>())
}

/// Opens an HBONE stream for a captured connection of `pod` to `dst`, whose identity must be
/// `dst_id`. A refusal by the destination's policy (401) is a deny, anything else an error.
/// The slot is the stream's place on its pooled connection: hold it until the stream ends.
pub(super) async fn open(
    pod: &PodContext,
    ctx: &ProxyContext,
    dst: SocketAddr,
    dst_id: &SpiffeId,
) -> Result<(SendStream<Bytes>, RecvStream, StreamSlot), (Verdict, String)> {
    let cert = ctx
        .identities
        .cert(&pod.identity, Duration::from_secs(5))
        .await
        .map_err(|e| (Verdict::Error, e.to_string()))?;
    ctx.hbone_open(pod, &cert, dst, dst_id).await.map_err(|e| {
        let verdict = if matches!(e, HboneError::Refused(401)) { Verdict::Denied } else { Verdict::Error };
        (verdict, e.to_string())
    })
}

/// Relays a captured client connection over an open HBONE stream.
pub(super) async fn relay_client(client: TcpStream, send: SendStream<Bytes>, recv: RecvStream) -> (u64, u64, RelayEnd) {
    relay(client, recv, send, None).await
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    const LOCAL: [u8; 4] = [10, 244, 2, 2];

    #[test]
    fn connect_requests_table() {
        let local = IpAddr::from(LOCAL);
        let cases: [(Method, Option<&str>, Result<u16, u16>); 7] = [
            (Method::CONNECT, Some("10.244.2.2:8080"), Ok(8080)),
            (Method::GET, Some("10.244.2.2:8080"), Err(400)),
            (Method::CONNECT, Some("10.244.2.3:8080"), Err(400)),
            (Method::CONNECT, Some("example.com:80"), Err(400)),
            (Method::CONNECT, None, Err(400)),
            (Method::CONNECT, Some("10.244.2.2:15008"), Err(503)),
            (Method::CONNECT, Some("10.244.2.2:15006"), Err(503)),
        ];
        for (method, authority, want) in cases {
            let got = connect_target(&method, authority, local).map(|t| t.port()).map_err(|(s, _)| s.as_u16());
            assert_eq!(got, want, "{method} {authority:?}");
        }
    }

    /// Answers a request as the agent's streams do before policy: the CONNECT check, then the
    /// status it gives (200 where the agent would go on to policy and the app). Each answer is
    /// recorded as (stream id, status).
    fn answer_as_the_agent(
        answers: &std::cell::RefCell<Vec<(u32, u16)>>,
    ) -> impl FnMut(Request<RecvStream>, h2::server::SendResponse<Bytes>) + '_ {
        move |request, mut respond| {
            let (parts, _) = request.into_parts();
            let status = match connect_target(&parts.method, parts.uri.authority().map(|a| a.as_str()), LOCAL.into()) {
                Ok(_) => StatusCode::OK,
                Err((status, _)) => status,
            };
            answers.borrow_mut().push((respond.stream_id().as_u32(), status.as_u16()));
            respond_status(&mut respond, status);
        }
    }

    /// What the HBONE server did with one client's bytes.
    struct Served {
        /// How the connection ended.
        ended: Result<(), Http2Closed>,
        /// What the server wrote.
        output: Vec<u8>,
        /// The requests it answered: (stream id, status).
        answers: Vec<(u32, u16)>,
    }

    /// Runs the HBONE server's HTTP/2 handling on `input` (what a client writes, then closes)
    /// over an in-memory duplex.
    fn serve_bytes(input: Vec<u8>) -> Served {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let answers = std::cell::RefCell::new(Vec::new());
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        let (ended, output) = runtime
            .block_on(async {
                let (mut client, server) = tokio::io::duplex(1 << 20);
                let serve = serve_h2(server, answer_as_the_agent(&answers));
                let talk = async move {
                    let _ = client.write_all(&input).await;
                    // A client waits for its answers before closing (a closed connection's
                    // pending streams are never handed out). Both sides run on this one task,
                    // so yielding lets the server read and answer everything written so far.
                    for _ in 0..16 {
                        tokio::task::yield_now().await;
                    }
                    let _ = client.shutdown().await;
                    let mut output = Vec::new();
                    let _ = client.read_to_end(&mut output).await;
                    output
                };
                tokio::time::timeout(Duration::from_secs(5), futures::future::join(serve, talk)).await
            })
            .expect("the server ends once the client has");
        Served { ended, output, answers: answers.into_inner() }
    }

    #[test]
    fn the_hbone_server_seam_answers_each_connect_as_the_agent_does() {
        use ferrymesh_testbed::h2raw;
        let get = [(":method", "GET"), (":scheme", "https"), (":path", "/"), (":authority", "10.244.2.2:8080")];
        let input = [
            h2raw::PREFACE,
            &h2raw::settings(false),
            &h2raw::connect(1, "10.244.2.2:8080"),
            &h2raw::connect(3, "10.244.2.3:8080"),
            &h2raw::connect(5, "10.244.2.2:15008"),
            &h2raw::headers(7, &get, true),
            &h2raw::connect(9, "pod-c:8080"),
        ]
        .concat();
        let Served { ended, output, answers } = serve_bytes(input);
        assert_eq!(ended, Ok(()));
        assert_eq!(answers, [(1, 200), (3, 400), (5, 503), (7, 400), (9, 400)]);
        let answered: Vec<u32> =
            h2raw::parse_frames(&output).iter().filter(|f| f.kind == h2raw::kind::HEADERS).map(|f| f.stream).collect();
        assert_eq!(answered, [1, 3, 5, 7, 9], "each answer is on the wire");
    }

    /// What a client of the fuzz target sends after each request.
    fn follow_up(id: u32) -> impl Strategy<Value = Vec<u8>> {
        use ferrymesh_testbed::h2raw::{self, kind};
        prop_oneof![
            3 => (proptest::collection::vec(any::<u8>(), 0..64), any::<bool>())
                .prop_map(move |(data, end)| h2raw::frame(kind::DATA, u8::from(end), id, &data)),
            1 => any::<u32>().prop_map(move |code| h2raw::rst_stream(id, code)),
            1 => (1u32..0x7fff_ffff).prop_map(move |n| h2raw::frame(kind::WINDOW_UPDATE, 0, id, &n.to_be_bytes())),
            1 => any::<[u8; 8]>().prop_map(|p| h2raw::frame(kind::PING, 0, 0, &p)),
        ]
    }

    /// A frame of any type, flags, stream and payload.
    fn any_frame() -> impl Strategy<Value = Vec<u8>> {
        (any::<u8>(), any::<u8>(), prop_oneof![0u32..32, any::<u32>()], proptest::collection::vec(any::<u8>(), 0..64))
            .prop_map(|(k, flags, id, p)| ferrymesh_testbed::h2raw::frame(k, flags, id, &p))
    }

    /// A client script: requests on streams 1, 3, 5... with any method (a non-CONNECT often
    /// with :scheme and :path), authority and extra headers, each followed by data, resets,
    /// window updates or pings; sometimes a frame of anything anywhere, sometimes garbage in
    /// place of the preface.
    fn client_script() -> impl Strategy<Value = Vec<u8>> {
        use ferrymesh_testbed::h2raw;
        let authority = prop_oneof![
            any::<u16>().prop_map(|port| format!("10.244.2.2:{port}")),
            Just("10.244.2.2:15008".to_string()),
            Just("10.244.2.3:80".to_string()),
            "[ -~]{0,24}",
        ];
        let method = prop_oneof![3 => Just("CONNECT".to_string()), 1 => Just("GET".to_string()), 1 => "[A-Z]{1,8}"];
        let extra = proptest::collection::vec(("[a-z-]{1,12}", "[ -~]{0,16}"), 0..3);
        let request = (method, authority, extra, any::<bool>(), any::<bool>());
        let requests = proptest::collection::vec(request, 1..8).prop_flat_map(|requests| {
            let scripted: Vec<_> = requests
                .into_iter()
                .enumerate()
                .map(|(i, (method, authority, extra, with_path, end))| {
                    let id = 2 * i as u32 + 1;
                    let mut headers =
                        vec![(":method".to_string(), method.clone()), (":authority".to_string(), authority)];
                    if method != "CONNECT" && with_path {
                        headers.extend([(":scheme".into(), "https".into()), (":path".into(), "/".into())]);
                    }
                    headers.extend(extra);
                    let refs: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    let opened = h2raw::headers(id, &refs, end);
                    proptest::collection::vec(follow_up(id), 0..3)
                        .prop_map(move |more| [opened.clone(), more.concat()].concat())
                })
                .collect();
            scripted
        });
        let chaos = proptest::option::weighted(0.3, (any_frame(), any::<prop::sample::Index>()));
        let preface = prop_oneof![
            9 => Just([h2raw::PREFACE, &h2raw::settings(false)].concat()),
            1 => proptest::collection::vec(any::<u8>(), 0..32),
        ];
        (preface, requests, chaos).prop_map(|(preface, mut requests, chaos)| {
            if let Some((frame, at)) = chaos {
                requests.insert(at.index(requests.len() + 1), frame);
            }
            [preface, requests.concat()].concat()
        })
    }

    /// The HBONE server's whole request handling (h2 settings, the accept loop, the CONNECT
    /// checks and answers), driven over an in-memory duplex by clients sending any script: it
    /// never panics or hangs, writes only whole frames, answers only streams the client opened
    /// and each with the status the CONNECT check gives, and reports every connection error it
    /// sends a GOAWAY for (for a flow record). A quarter of the runs at least must reach the
    /// request handling, or the fuzzing would only be exercising h2's frame checks.
    #[test]
    fn the_hbone_server_survives_any_client() {
        use ferrymesh_testbed::h2raw::{self, kind};
        let mut runner =
            proptest::test_runner::TestRunner::new(ProptestConfig { cases: 300, ..ProptestConfig::default() });
        let answered = std::cell::Cell::new(0usize);
        runner
            .run(&client_script(), |input| {
                let sent = h2raw::parse_frames(input.get(h2raw::PREFACE.len()..).unwrap_or_default());
                let opened: Vec<u32> = sent.iter().filter(|f| f.kind == kind::HEADERS).map(|f| f.stream).collect();
                let Served { ended, output, answers } = serve_bytes(input);
                let frames = h2raw::parse_frames(&output);
                let framed: usize = frames.iter().map(|f| 9 + f.payload.len()).sum();
                prop_assert_eq!(framed, output.len(), "the server wrote only whole frames");
                for f in frames.iter().filter(|f| f.kind == kind::HEADERS) {
                    prop_assert!(opened.contains(&f.stream), "answered stream {} the client never opened", f.stream);
                }
                for (stream, status) in &answers {
                    prop_assert!([200, 400, 503].contains(status), "stream {stream}: status {status}");
                }
                if h2raw::goaway_code(&frames).is_some_and(|code| code != 0) {
                    prop_assert!(ended.is_err(), "a GOAWAY with an error code is reported: {:?}", frames);
                }
                answered.set(answered.get() + usize::from(!answers.is_empty()));
                Ok(())
            })
            .unwrap_or_else(|e| panic!("{e}"));
        assert!(answered.get() >= 75, "only {} of 300 runs reached the request handling", answered.get());
    }

    proptest! {
        /// Any request line is either refused with 400/503 or is exactly a CONNECT to the local
        /// IP on a non-mesh port; nothing panics.
        #[test]
        fn connect_target_accepts_only_valid_connects(
            method in prop_oneof![Just("CONNECT".to_string()), Just("GET".to_string()), "[A-Z]{1,8}"],
            authority in prop_oneof![
                "[0-9.:]{0,24}".prop_map(String::from),
                (any::<[u8; 4]>(), any::<u16>()).prop_map(|(ip, port)| format!("{}:{port}", std::net::Ipv4Addr::from(ip))),
                any::<u16>().prop_map(|port| format!("10.244.2.2:{port}")),
                ".{0,40}".prop_map(String::from),
            ],
        ) {
            let method = Method::from_bytes(method.as_bytes()).unwrap();
            match connect_target(&method, Some(&authority), IpAddr::from(LOCAL)) {
                Ok(target) => {
                    prop_assert_eq!(&method, &Method::CONNECT);
                    prop_assert_eq!(target.ip(), IpAddr::from(LOCAL));
                    prop_assert!(!RESERVED_PORTS.contains(&target.port()));
                    prop_assert_eq!(target, authority.parse::<SocketAddr>().unwrap());
                }
                Err((status, reason)) => {
                    prop_assert!(status == StatusCode::BAD_REQUEST || status == StatusCode::SERVICE_UNAVAILABLE);
                    prop_assert!(!reason.is_empty());
                }
            }
        }
    }
}
