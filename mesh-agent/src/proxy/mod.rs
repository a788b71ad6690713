//! The L4 proxy: accept loops on the agent's listeners inside enrolled pods (outbound 15001,
//! inbound plaintext 15006, HBONE 15008), dials made from inside the pod's netns, byte relaying
//! with half-close, destination authorization, service load balancing, and one flow record per
//! connection. It never touches eBPF maps except through [`crate::ebpf::Datapath`] (original
//! destinations, app-dial registrations).

pub mod authz;
pub mod hbone;
pub mod inbound;
mod local;
pub mod outbound;
mod splice;

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ferrymesh_dataplane::spans::{attribute, SpanContext};
use ferrymesh_policy::Transport;
use mesh_common::{ip_words, AppDialKey, MARK_APP_DIAL};
use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::net::{TcpListener, TcpSocket, TcpStream};

use crate::ebpf::Datapath;
use crate::error::{Denied, ProxyError};
use crate::flows::{Direction, Endpoint, Flow, FlowTable};
use crate::identity::{Identity, IdentityManager};
use crate::netns::{Netns, NetnsRunner};
use crate::state::{State, Workload};
use authz::InboundRequest;

/// How long a dial may take before the client is reset.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The HBONE client (its pooled connections).
    pub hbone: ferrymesh_dataplane::hbone::client::Client,
    /// Live inbound connections, re-evaluated when policies change.
    pub live: authz::LiveConnections,
    /// Service load balancing state.
    pub balancer: Arc<crate::lb::Balancer>,
    /// The pods enrolled on this node, by IP: connections between two of them are handed
    /// over inside the agent.
    pub local_pods: LocalPods,
    /// Limits on what inbound peers may hold open.
    pub limits: crate::limits::Limits,
    /// What inbound peers hold open now.
    pub load: Arc<crate::limits::Load>,
    /// The receive windows the pods' HBONE connections may hold beyond their base windows.
    pub windows: Arc<ferrymesh_dataplane::hbone::budget::WindowBudget>,
    /// Where connection spans go.
    pub tracer: ferrymesh_dataplane::spans::Tracer,
    /// The connections this agent carries, and whether it is draining them.
    pub drain: Arc<Drain>,
}

/// The connections an agent carries (every connection its pod listeners accepted, until its
/// handler returns), and whether the agent is draining: it accepts no more, and its HBONE
/// connections got a graceful GOAWAY, while those carried run on to their end.
#[derive(Debug, Default)]
pub struct Drain {
    draining: tokio::sync::watch::Sender<bool>,
    active: std::sync::atomic::AtomicUsize,
}

/// One carried connection, counted while it lives.
struct Carried(Arc<Drain>);

impl Drop for Carried {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

impl Drain {
    /// Starts draining.
    pub fn start(&self) {
        self.draining.send_replace(true);
    }

    /// Completes once draining has started.
    pub async fn started(&self) {
        let mut draining = self.draining.subscribe();
        let _ = draining.wait_for(|d| *d).await;
    }

    /// How many connections are carried now.
    pub fn active(&self) -> usize {
        self.active.load(std::sync::atomic::Ordering::Acquire)
    }

    fn carry(self: &Arc<Self>) -> Carried {
        self.active.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        Carried(self.clone())
    }
}

/// The pods this agent has enrolled, by IP (kept by the enroller).
#[derive(Debug, Default)]
pub struct LocalPods(std::sync::RwLock<std::collections::HashMap<IpAddr, Arc<PodContext>>>);

impl LocalPods {
    /// Adds (or replaces) an enrolled pod.
    pub fn insert(&self, pod: Arc<PodContext>) {
        let mut pods = self.0.write().expect("local pods lock");
        for ip in pod.workload.addresses() {
            pods.insert(ip, pod.clone());
        }
    }

    /// Removes `pod`, under each of its IPs another pod has not taken since.
    pub fn remove(&self, pod: &Arc<PodContext>) {
        let mut pods = self.0.write().expect("local pods lock");
        for ip in pod.workload.addresses() {
            if pods.get(&ip).is_some_and(|p| Arc::ptr_eq(p, pod)) {
                pods.remove(&ip);
            }
        }
    }

    /// The enrolled pod with `ip`, if any.
    pub fn get(&self, ip: IpAddr) -> Option<Arc<PodContext>> {
        self.0.read().expect("local pods lock").get(&ip).cloned()
    }
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
    /// The pod as a flow endpoint at `addr` (one of its addresses), with its identity when
    /// certificates are on.
    fn endpoint(&self, addr: SocketAddr, identities: &IdentityManager) -> Endpoint {
        Endpoint {
            addr,
            workload: Some(self.workload.clone()),
            identity: identities
                .enabled()
                .then(|| self.identity.spiffe_id(&identities.trust_domain()).ok())
                .flatten()
                .map(|id| id.as_str().into()),
        }
    }
}

/// How a connection ended.
#[derive(Debug, Clone)]
struct Outcome {
    sent: u64,
    received: u64,
    /// Why it did not end normally; None when it was carried and closed.
    error: Option<ProxyError>,
    policy: String,
}

impl Outcome {
    /// Refused or failed before any byte was carried.
    fn failed(error: ProxyError) -> Self {
        let policy = match &error {
            ProxyError::Denied(d) => d.policy.clone(),
            _ => String::new(),
        };
        Self { sent: 0, received: 0, error: Some(error), policy }
    }

    /// The end of a relay: allowed, or why it was cut.
    fn relayed(sent: u64, received: u64, end: RelayEnd, policy: String) -> Self {
        let (error, policy) = match end {
            RelayEnd::Closed => (None, policy),
            RelayEnd::Failed(e) => (Some(ProxyError::Aborted(Arc::new(e))), policy),
            RelayEnd::Revoked(d) => {
                let policy = d.policy.clone();
                (Some(ProxyError::Revoked(d)), policy)
            }
        };
        Self { sent, received, error, policy }
    }
}

/// Why a relay ended.
#[derive(Debug)]
enum RelayEnd {
    /// Both directions finished.
    Closed,
    /// A side failed or reset.
    Failed(io::Error),
    /// A policy change denied the connection.
    Revoked(Denied),
}

/// Drives both copy directions (the future `copy` makes) until they end or fail, or until
/// `close` fires. It takes a maker, not the future: a future passed in would be kept twice
/// in this one's state (as the argument and as the running copy), for every connection.
async fn until_done_or_revoked<T, F>(
    copy: impl FnOnce() -> F,
    close: Option<tokio::sync::oneshot::Receiver<Denied>>,
) -> RelayEnd
where
    F: std::future::Future<Output = io::Result<T>>,
{
    tokio::select! {
        result = copy() => match result {
            Ok(_) => RelayEnd::Closed,
            Err(e) => RelayEnd::Failed(e),
        },
        denied = revoked(close) => RelayEnd::Revoked(denied),
    }
}

/// Waits for a policy change to deny the connection; never fires without a receiver.
async fn revoked(close: Option<tokio::sync::oneshot::Receiver<Denied>>) -> Denied {
    match close {
        Some(rx) => match rx.await {
            Ok(denied) => denied,
            Err(_) => std::future::pending().await,
        },
        None => std::future::pending().await,
    }
}

/// A connection in progress: when it started, between whom, and how it is carried.
struct Connection {
    direction: Direction,
    start: SystemTime,
    started: Instant,
    src: Endpoint,
    dst: Endpoint,
    transport: Transport,
    peer_cert_serial: Arc<str>,
    /// `namespace/name` of the service the client addressed (VIP), else empty.
    service: String,
    /// Its span, when the agent traces.
    trace: Option<SpanContext>,
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
            transport: Transport::Plaintext,
            peer_cert_serial: Arc::from(""),
            service: String::new(),
            trace: None,
        }
    }

    /// The `traceparent` its HBONE CONNECT carries: its span as the parent, or, when the
    /// agent does not trace, a new unsampled trace.
    fn traceparent(&self) -> String {
        self.trace.unwrap_or_else(|| SpanContext::start(None, false)).traceparent()
    }
}

impl ProxyContext {
    fn record(&self, conn: Connection, outcome: Outcome) {
        let trace = conn.trace;
        let flow = Flow {
            start: conn.start,
            node: self.node.clone(),
            direction: conn.direction,
            src: conn.src,
            dst: conn.dst,
            bytes_sent: outcome.sent,
            bytes_received: outcome.received,
            duration: conn.started.elapsed(),
            error: outcome.error,
            transport: conn.transport,
            peer_cert_serial: conn.peer_cert_serial.to_string(),
            policy: outcome.policy,
            service: conn.service,
        };
        if let Some(trace) = trace.filter(|t| t.sampled) {
            self.tracer.export(connection_span(&trace, &flow));
        }
        self.flows.record(flow);
    }

    /// Dials `dst` from inside `netns` with `mark`; with `source`, binds to that (non-local)
    /// address using IP_TRANSPARENT and registers the dial so sk_lookup does not steer it.
    async fn dial(&self, netns: &Netns, dst: SocketAddr, mark: u32, source: Option<IpAddr>) -> io::Result<TcpStream> {
        let (socket, bound, cookie) = self
            .runner
            .run(netns, move || {
                let socket = Socket::new(Domain::for_address(dst), Type::STREAM.nonblocking(), Some(Protocol::TCP))?;
                socket.set_mark(mark)?;
                let cookie = crate::netns::socket_cookie(&socket)?;
                let mut bound = None;
                if let Some(ip) = source {
                    match ip {
                        IpAddr::V4(_) => socket.set_ip_transparent_v4(true)?,
                        IpAddr::V6(_) => socket.set_ip_transparent_v6(true)?,
                    }
                    socket.bind(&SocketAddr::new(ip, 0).into())?;
                    bound = socket.local_addr()?.as_socket();
                }
                Ok((socket, bound, cookie))
            })
            .await?;
        // The mark routes the socket's packets; the map is what tells the capture hooks it is
        // the agent's (a pod can set a mark too).
        self.datapath.lock().expect("datapath lock").register_agent_dial(cookie).map_err(io::Error::other)?;
        let app_dial = bound.map(|from| AppDialKey {
            client_ip: ip_words(from.ip()),
            pod_ip: ip_words(dst.ip()),
            client_port: u32::from(from.port()),
            app_port: u32::from(dst.port()),
        });
        if let Some(key) = app_dial {
            let registered = self.datapath.lock().expect("datapath lock").register_app_dial(key);
            if let Err(e) = registered {
                self.datapath.lock().expect("datapath lock").unregister_agent_dial(cookie);
                return Err(io::Error::other(e));
            }
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

/// The span of a connection, from its flow: a client span for an outbound connection, a server
/// span for an inbound one, with the flow's endpoints, bytes and verdict.
fn connection_span(trace: &SpanContext, flow: &Flow) -> ferrymesh_api::otlp::trace::Span {
    use ferrymesh_api::otlp::trace::span::SpanKind;
    use ferrymesh_api::otlp::trace::{status::StatusCode, Status};
    let (name, kind) = match flow.direction {
        Direction::Outbound => (format!("outbound {}", flow.dst.addr), SpanKind::Client),
        Direction::Inbound => (format!("inbound {}", flow.dst.addr), SpanKind::Server),
    };
    let identity = |e: &Endpoint| e.identity.as_deref().unwrap_or_default().to_string();
    let mut attributes = vec![
        attribute("source.address", flow.src.addr.to_string()),
        attribute("source.principal", identity(&flow.src)),
        attribute("destination.address", flow.dst.addr.to_string()),
        attribute("destination.principal", identity(&flow.dst)),
        attribute("connection_security_policy", flow.transport.as_str().to_string()),
        attribute("bytes_sent", i64::try_from(flow.bytes_sent).unwrap_or(i64::MAX)),
        attribute("bytes_received", i64::try_from(flow.bytes_received).unwrap_or(i64::MAX)),
        attribute("response_flags", flow.response_flags().to_string()),
        attribute("node", flow.node.clone()),
    ];
    if !flow.service.is_empty() {
        attributes.push(attribute("destination_service", flow.service.clone()));
    }
    let mut span = trace.to_span(name, kind, attributes);
    span.status = flow.error.as_ref().map(|e| Status { message: e.to_string(), code: StatusCode::Error as i32 });
    span
}

/// An inbound connection the destination admitted: decided, registered for re-evaluation,
/// and dialled through to the app.
struct Admitted<'a> {
    app: TcpStream,
    /// The deciding ALLOW policy, if any.
    policy: String,
    /// Fires when a policy change denies the connection.
    close: tokio::sync::oneshot::Receiver<Denied>,
    _live: authz::LiveGuard<'a>,
}

/// Why the destination did not admit a connection.
enum Refused {
    /// The policy denies it.
    Denied(Denied),
    /// The app could not be dialled.
    Dial(io::Error),
}

impl Refused {
    /// The error of the refusal of a connection to `target`.
    fn error(self, target: SocketAddr) -> ProxyError {
        match self {
            Refused::Denied(denied) => ProxyError::Denied(denied),
            Refused::Dial(e) => ProxyError::AppDial { target, error: Arc::new(e) },
        }
    }
}

impl ProxyContext {
    /// The destination's side of every inbound connection, however it arrived (HBONE,
    /// plaintext, node-local): decides `request` for `pod` (PeerAuthentication and
    /// AuthorizationPolicy on the pod's current labels), registers it for re-evaluation when
    /// policies change, and dials the app from the pod's netns as the client's IP.
    async fn admit(&self, pod: &PodContext, request: InboundRequest) -> Result<Admitted<'_>, Refused> {
        let policies = self.state.policies();
        let policy =
            authz::check(&policies, &authz::current(&self.state, &pod.workload), &request).map_err(Refused::Denied)?;
        let (target, client_ip) = (request.destination, request.source_ip);
        let (live, close) = self.live.register(pod.workload.clone(), request);
        let app = self.dial(&pod.netns, target, MARK_APP_DIAL, Some(client_ip)).await.map_err(Refused::Dial)?;
        Ok(Admitted { app, policy, close, _live: live })
    }
}

/// Accepts on `listener` forever, handing each connection to `handle` on its own task,
/// counted in `drain` while the handler runs.
async fn accept_loop<F, Fut>(listener: TcpListener, what: &'static str, drain: Arc<Drain>, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                let carried = drain.carry();
                let handled = handle(stream, peer);
                tokio::spawn(async move {
                    handled.await;
                    drop(carried);
                });
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

/// Relays bytes both ways (in the kernel, see [`splice`]), honouring half-close, until both
/// directions end, one fails, or `close` fires; failure and revocation reset both sides.
/// Returns (client -> upstream bytes, upstream -> client bytes, how it ended).
async fn relay(
    client: TcpStream,
    upstream: TcpStream,
    close: Option<tokio::sync::oneshot::Receiver<Denied>>,
) -> (u64, u64, RelayEnd) {
    let (mut sent, mut received) = (0, 0);
    let end = until_done_or_revoked(|| splice::relay(&client, &upstream, &mut sent, &mut received), close).await;
    if !matches!(end, RelayEnd::Closed) {
        reset(&client);
        reset(&upstream);
    }
    (sent, received, end)
}
