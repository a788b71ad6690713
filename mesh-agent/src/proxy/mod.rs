//! The L4 proxy: accept loops on the agent's listeners inside enrolled pods, dials made from
//! inside the pod's netns, byte relaying with half-close, and one flow record per connection.
//! Plain TCP for now; the proxy never touches eBPF maps except to take an original
//! destination through [`crate::ebpf::Datapath`].

pub mod hbone;
pub mod inbound;
pub mod outbound;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mesh_common::AppDialKey;
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::ebpf::Datapath;
use crate::flows::{Direction, Endpoint, Flow, FlowTable, Verdict};
use crate::identity::{Identity, IdentityManager};
use crate::netns::{Netns, NetnsRunner};
use crate::state::{State, Workload};

/// How long a dial may take before the client is reset.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Relay buffer per direction.
pub(crate) const RELAY_BUFFER: usize = 64 * 1024;

/// What every connection handler needs, shared by all pods of the node.
#[derive(Debug)]
pub struct ProxyContext {
    /// Node this agent serves.
    pub node: String,
    /// Workloads, to name flow endpoints.
    pub state: Arc<State>,
    /// eBPF maps (original destinations).
    pub datapath: Arc<Mutex<Datapath>>,
    /// Creates sockets inside pod network namespaces.
    pub runner: NetnsRunner,
    /// Where finished flows go.
    pub flows: Arc<FlowTable>,
    /// Workload certificates.
    pub identities: Arc<IdentityManager>,
    /// Pooled HBONE connections.
    pub pool: hbone::Pool,
}

/// One enrolled pod, as its accept loops see it.
#[derive(Debug)]
pub struct PodContext {
    /// The pod.
    pub workload: Arc<Workload>,
    /// Its network namespace.
    pub netns: Netns,
    /// Its netns cookie.
    pub cookie: u64,
    /// Its identity.
    pub identity: Identity,
}

impl PodContext {
    /// The pod as a flow endpoint on `port`, with its identity when certificates are on.
    fn endpoint(&self, port: u16, identities: &IdentityManager) -> Endpoint {
        Endpoint {
            addr: SocketAddr::new(self.workload.ip, port),
            workload: Some((self.workload.name.clone(), self.workload.namespace.clone())),
            identity: identities.enabled().then(|| self.identity.spiffe_id(&identities.trust_domain())),
        }
    }
}

/// How a connection ended.
#[derive(Debug)]
struct Outcome {
    sent: u64,
    received: u64,
    verdict: Verdict,
    reason: String,
}

impl Outcome {
    fn failed(reason: String) -> Self {
        Self { sent: 0, received: 0, verdict: Verdict::Error, reason }
    }
}

/// A connection in progress: when it started, between whom, and how it is carried.
struct Connection {
    direction: Direction,
    start: SystemTime,
    started: Instant,
    src: Endpoint,
    dst: Endpoint,
    mtls: bool,
    peer_cert_serial: String,
}

impl Connection {
    /// A connection starting now.
    fn new(direction: Direction, src: Endpoint, dst: Endpoint) -> Self {
        Self {
            direction,
            start: SystemTime::now(),
            started: Instant::now(),
            src,
            dst,
            mtls: false,
            peer_cert_serial: String::new(),
        }
    }
}

impl ProxyContext {
    fn record(&self, conn: Connection, outcome: Outcome) {
        self.flows.record(Flow {
            start: conn.start,
            node: self.node.clone(),
            direction: conn.direction,
            src: conn.src,
            dst: conn.dst,
            bytes_sent: outcome.sent,
            bytes_received: outcome.received,
            duration: conn.started.elapsed(),
            verdict: outcome.verdict,
            reason: outcome.reason,
            mtls: conn.mtls,
            peer_cert_serial: conn.peer_cert_serial,
        });
    }

    /// Dials `dst` from inside `netns` with `mark`; with `source`, binds to that (non-local)
    /// address using IP_TRANSPARENT and registers the dial so sk_lookup does not steer it.
    async fn dial(&self, netns: &Netns, dst: SocketAddr, mark: u32, source: Option<IpAddr>) -> io::Result<TcpStream> {
        let (socket, bound) = self
            .runner
            .run(netns, move || {
                let socket = Socket::new(Domain::for_address(dst), Type::STREAM, Some(Protocol::TCP))?;
                socket.set_mark(mark)?;
                let mut bound = None;
                if let Some(ip) = source {
                    match ip {
                        IpAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
                        IpAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
                    }
                    socket.bind(&SocketAddr::new(ip, 0).into())?;
                    bound = socket.local_addr()?.as_socket();
                }
                socket.set_nonblocking(true)?;
                Ok((socket, bound))
            })
            .await?;
        let app_dial = match (bound, dst) {
            (Some(SocketAddr::V4(from)), SocketAddr::V4(to)) => Some(AppDialKey {
                client_ip4: u32::from(*from.ip()).to_be(),
                client_port: u32::from(from.port()),
                pod_ip4: u32::from(*to.ip()).to_be(),
                app_port: u32::from(to.port()),
            }),
            _ => None,
        };
        if let Some(key) = app_dial {
            self.datapath.lock().expect("datapath lock").register_app_dial(key).map_err(io::Error::other)?;
        }
        let socket = TcpSocket::from_std_stream(socket.into());
        let connected = tokio::time::timeout(CONNECT_TIMEOUT, socket.connect(dst)).await;
        if let Some(key) = app_dial {
            self.datapath.lock().expect("datapath lock").unregister_app_dial(&key);
        }
        let stream = connected
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {CONNECT_TIMEOUT:?}")))??;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

/// Accepts on `listener` forever, handing each connection to `handle` on its own task.
async fn accept_loop<F, Fut>(listener: TcpListener, what: &'static str, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tokio::spawn(handle(stream, peer));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!("{what} accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Resets `stream` (RST instead of FIN) so the peer sees the failure.
fn reset(stream: &TcpStream) {
    let _ = SockRef::from(stream).set_linger(Some(Duration::ZERO));
}

/// Copies one direction until EOF, then half-closes the writer.
async fn copy_half<R, W>(mut from: R, mut to: W, count: &mut u64) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        to.write_all(&buf[..n]).await?;
        *count += n as u64;
    }
}

/// Relays bytes both ways, honouring half-close, until both directions end or one fails; a
/// failure resets both sides.
async fn relay(mut client: TcpStream, mut upstream: TcpStream) -> Outcome {
    let (mut sent, mut received) = (0, 0);
    let result = {
        let (client_read, client_write) = client.split();
        let (upstream_read, upstream_write) = upstream.split();
        futures::future::try_join(
            copy_half(client_read, upstream_write, &mut sent),
            copy_half(upstream_read, client_write, &mut received),
        )
        .await
    };
    match result {
        Ok(_) => Outcome { sent, received, verdict: Verdict::Allowed, reason: "closed".into() },
        Err(e) => {
            reset(&client);
            reset(&upstream);
            Outcome { sent, received, verdict: Verdict::Error, reason: format!("connection aborted: {e}") }
        }
    }
}
