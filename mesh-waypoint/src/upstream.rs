//! Reaching a backend's endpoints (or the one workload a request addressed): one endpoint per
//! request by power of two choices on requests in progress ([`Balancer`]), the connection to it
//! over HBONE to the endpoint pod's 15008 with the waypoint's own identity (plain TCP when the
//! endpoint is not meshed), HTTP/1.1 connections pooled and reused, HTTP/2 (gRPC) multiplexed
//! over one connection per endpoint. A failed attempt is tried again by the rule's [`Retry`]
//! (the mesh's default: a connection that could not be made, or a 503, twice more), on another
//! endpoint when there is one, each attempt within the rule's backend request timeout; a body
//! is replayed up to [`REPLAY_LIMIT`] bytes (a larger one, or one of unknown length, is sent
//! once), and retries are bounded by a [`RetryBudget`] per Service so that they cannot
//! multiply the load on a failing backend. A backend Service's DestinationRule
//! ([`crate::destination`]) adds limits (a request past them is refused, 503 `UO`), ejects
//! endpoints that keep failing, and may pick endpoints round robin, at random or by a
//! consistent hash of the request's key instead.

use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;
use std::time::Instant;

use bytes::Bytes;
use ferrymesh_dataplane::hbone::budget::WindowBudget;
use ferrymesh_dataplane::hbone::client::{Client, ConnectHeaders, Dialer};
use ferrymesh_dataplane::hbone::pool::StreamSlot;
use ferrymesh_dataplane::hbone::stream::H2Stream;
use ferrymesh_dataplane::identity::{Identity, IdentityManager};
use ferrymesh_dataplane::lb::{Active, Balancer};
use ferrymesh_dataplane::state::{Service, ServiceEndpoint, State};
use ferrymesh_policy::ROOT_NAMESPACE;
use ferrymesh_route::Retry;
use http::header::{CONTENT_LENGTH, HOST};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderValue, Request, Response, Uri, Version};
use http_body_util::BodyExt;
use hyper::body::Body as _;
use hyper_util::client::legacy::connect::{Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::destination::{Destination, Destinations, Outcome};
use crate::request::Body;
use ferrymesh_route::destination::LoadBalancer;

/// Endpoints a connection relayed at L4 may be tried on when connections fail.
const ATTEMPTS: usize = 3;
/// The largest request body kept to be sent again on a retry.
pub const REPLAY_LIMIT: usize = 64 * 1024;
/// How long a connection to an endpoint may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long an idle HTTP/1.1 connection is kept for reuse.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// An endpoint's multiplexed HTTP/2 connection (hyper's defaults in brackets): its receive
/// windows per stream and in all (2 MiB, 5 MiB), what an answer its client has not read yet
/// waits in, and the bytes of a request body queued for the endpoint at most (1 MiB a stream).
pub const UPSTREAM_HTTP2: (u32, u32, usize) = (64 * 1024, 1024 * 1024, 64 * 1024);

/// A request ready to forward: its head (hop-by-hop headers gone), body, and the authority and
/// path it goes with after the filters.
#[derive(Debug)]
pub struct Forward {
    /// Method, headers, version.
    pub parts: http::request::Parts,
    /// Body.
    pub body: Body,
    /// `Host` / `:authority` to send.
    pub authority: Authority,
    /// Path and query to send.
    pub path_and_query: PathAndQuery,
}

/// Why a request could not be forwarded.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// The backend has no ready endpoint on the port.
    #[error("no healthy upstream: Service {service} has no ready endpoint for port {port}")]
    NoEndpoint {
        /// `namespace/name`.
        service: String,
        /// The Service port.
        port: u16,
    },
    /// The connection to the endpoint failed (after trying others, for an empty body).
    #[error("upstream connect error: {endpoint}: {error}")]
    Connect {
        /// The last endpoint tried.
        endpoint: SocketAddr,
        /// Why.
        error: String,
    },
    /// The endpoint's connection failed during the request.
    #[error("upstream connection ended before the response: {endpoint}: {error}")]
    Request {
        /// The endpoint.
        endpoint: SocketAddr,
        /// Why.
        error: String,
    },
    /// The endpoint sent no response within the backend request timeout.
    #[error("upstream request timeout: {endpoint} sent no response within {}ms", after.as_millis())]
    Timeout {
        /// The endpoint.
        endpoint: SocketAddr,
        /// The timeout.
        after: Duration,
    },
    /// A limit of the backend's DestinationRule was reached (circuit breaking).
    #[error("upstream overflow: {0}")]
    Overflow(#[from] crate::destination::Overflow),
    /// The client's request body failed while it was read to be replayable.
    #[error("the request body failed: {error}")]
    Body {
        /// Why.
        error: String,
    },
}

/// How a request is tried: when again, and how long each attempt may take.
#[derive(Debug, Clone, Copy)]
pub struct TryPolicy<'a> {
    /// When a failed attempt is tried again: the rule's, [`DEFAULT_RETRY`] or [`NO_RETRY`].
    pub retry: &'a Retry,
    /// The limit of each attempt (Gateway API `backendRequest`).
    pub per_try: Option<Duration>,
    /// The hash of the request's key, when its backend's DestinationRule balances by a
    /// consistent hash (the same key goes to the same endpoint while it is there).
    pub affinity: Option<u64>,
    /// The client's namespace, which picks the backend's DestinationRule (see
    /// [`ferrymesh_route::destination::DestinationRules::of`]).
    pub client: Option<&'a str>,
    /// Endpoints whose own DENY policies refuse the client ([`crate::denials`]): never tried.
    pub denied: &'a [IpAddr],
}

/// The mesh's default retry, for rules without their own (built once, not per request).
pub static DEFAULT_RETRY: std::sync::LazyLock<Retry> = std::sync::LazyLock::new(Retry::mesh_default);
/// No retry at all (mirrored copies).
pub static NO_RETRY: std::sync::LazyLock<Retry> =
    std::sync::LazyLock::new(|| Retry { attempts: 0, ..Retry::mesh_default() });

/// Retries a backend Service may get (Linkerd's budget): a fifth of its requests over the last
/// [`RetryBudget::WINDOW_SECS`] seconds, and at least [`RetryBudget::MIN_PER_SEC`] a second, so
/// a failing backend sees at most 20% more requests than its clients send (plus that floor).
#[derive(Debug, Default)]
pub struct RetryBudget {
    /// Requests and retries of each of the last seconds, by second (`second % WINDOW_SECS`).
    seconds: [(u64, u32, u32); RetryBudget::WINDOW_SECS as usize],
}

impl RetryBudget {
    /// The window, in seconds.
    pub const WINDOW_SECS: u64 = 10;
    /// Retries always allowed, per second of the window.
    pub const MIN_PER_SEC: u32 = 10;
    /// Retries per request allowed beyond that floor.
    pub const RATIO: f64 = 0.2;

    fn bucket(&mut self, second: u64) -> &mut (u64, u32, u32) {
        let slot = &mut self.seconds[(second % Self::WINDOW_SECS) as usize];
        if slot.0 != second {
            *slot = (second, 0, 0);
        }
        slot
    }

    /// Counts a request (its first attempt) at `second`.
    pub fn deposit(&mut self, second: u64) {
        self.bucket(second).1 += 1;
    }

    /// Whether a retry at `second` is within the budget; counts it when it is.
    pub fn withdraw(&mut self, second: u64) -> bool {
        let recent = |s: &&(u64, u32, u32)| s.0 + Self::WINDOW_SECS > second && s.0 <= second;
        let (requests, retries) =
            self.seconds.iter().filter(recent).fold((0u64, 0u64), |(q, r), s| (q + u64::from(s.1), r + u64::from(s.2)));
        let allowed = (Self::RATIO * requests as f64) as u64 + u64::from(Self::MIN_PER_SEC) * Self::WINDOW_SECS;
        if retries >= allowed {
            return false;
        }
        self.bucket(second).2 += 1;
        true
    }
}

/// Seconds on the waypoint's clock, for budgets.
fn now_second() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_secs()
}

/// Opens byte streams to endpoints: HBONE for meshed ones, TCP for the rest.
#[derive(Debug)]
struct Tunnels {
    state: Arc<State>,
    identities: Arc<IdentityManager>,
    identity: Identity,
    hbone: Client,
    pod_ip: IpAddr,
}

/// Dials endpoints' 15008 directly: the waypoint's pod is not captured.
struct DirectDialer;

impl Dialer for DirectDialer {
    type Io = TcpStream;

    async fn dial(&self, addr: SocketAddr) -> io::Result<TcpStream> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        Ok(stream)
    }
}

impl Tunnels {
    /// A byte stream to `endpoint`.
    async fn open(&self, endpoint: SocketAddr) -> io::Result<Io> {
        let meshed = self.state.workload_by_ip(endpoint.ip()).filter(|w| w.captured);
        let Some(workload) = meshed else {
            let stream = tokio::time::timeout(CONNECT_TIMEOUT, DirectDialer.dial(endpoint))
                .await
                .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no answer in time"))??;
            return Ok(Io::Plain(stream));
        };
        let cert = self.identities.cert(&self.identity, CONNECT_TIMEOUT).await.map_err(io::Error::other)?;
        let roots = self.identities.trust().borrow().as_ref().map(|t| t.roots.clone());
        let roots = roots.ok_or_else(|| io::Error::other("no trust bundle from mesh-ctrl yet"))?;
        let dst_id = workload.identity().spiffe_id(&self.identities.trust_domain()).map_err(io::Error::other)?;
        let headers = ConnectHeaders {
            forwarded_for: self.pod_ip,
            baggage: format!(
                "k8s.namespace.name={},k8s.gateway.name={}",
                self.identity.namespace, self.identity.service_account
            ),
            // The connection is not traced (its requests are, in their own headers).
            traceparent: ferrymesh_dataplane::spans::SpanContext::start(None, false).traceparent(),
        };
        let open = self.hbone.open(&DirectDialer, &cert, roots, endpoint, &dst_id, &headers);
        let (send, recv, slot) = tokio::time::timeout(CONNECT_TIMEOUT, open)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "no HBONE tunnel in time"))?
            .map_err(io::Error::other)?;
        Ok(Io::Hbone(Box::new(H2Stream::new(send, recv)), slot))
    }
}

/// A byte stream to an endpoint.
#[derive(Debug)]
pub enum Io {
    /// An HBONE stream, and its place on its pooled connection (held while the stream lives).
    Hbone(Box<H2Stream>, #[allow(dead_code)] StreamSlot),
    /// Plain TCP.
    Plain(TcpStream),
}

impl AsyncRead for Io {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Hbone(stream, _) => Pin::new(stream.as_mut()).poll_read(cx, buf),
            Io::Plain(stream) => Pin::new(stream).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Hbone(stream, _) => Pin::new(stream.as_mut()).poll_write(cx, data),
            Io::Plain(stream) => Pin::new(stream).poll_write(cx, data),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Hbone(stream, _) => Pin::new(stream.as_mut()).poll_flush(cx),
            Io::Plain(stream) => Pin::new(stream).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Hbone(stream, _) => Pin::new(stream.as_mut()).poll_shutdown(cx),
            Io::Plain(stream) => Pin::new(stream).poll_shutdown(cx),
        }
    }
}

impl Connection for Io {
    fn connected(&self) -> Connected {
        Connected::new()
    }
}

/// The HTTP/1.1 client's connector: the URI's authority is the endpoint.
#[derive(Debug, Clone)]
struct Connector(Arc<Tunnels>);

impl tower::Service<Uri> for Connector {
    type Response = TokioIo<Io>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<Io>>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let tunnels = self.0.clone();
        Box::pin(async move {
            let endpoint = endpoint_of(&uri)?;
            Ok(TokioIo::new(tunnels.open(endpoint).await?))
        })
    }
}

fn endpoint_of(uri: &Uri) -> io::Result<SocketAddr> {
    uri.authority()
        .and_then(|a| a.as_str().parse().ok())
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{uri} does not name an endpoint")))
}

/// Where a request goes.
#[derive(Debug)]
pub enum To {
    /// A ready endpoint of this Service port, picked per request.
    Service(Arc<Service>, u16),
    /// This endpoint (a workload addressed directly).
    Endpoint(SocketAddr),
}

type H1Client = hyper_util::client::legacy::Client<Connector, Body>;
type H2Sender = hyper::client::conn::http2::SendRequest<Body>;

/// Forwards requests to Service endpoints.
#[derive(Debug)]
pub struct Upstream {
    tunnels: Arc<Tunnels>,
    h1: H1Client,
    /// One multiplexed HTTP/2 connection per endpoint.
    h2: Mutex<HashMap<SocketAddr, H2Sender>>,
    balancer: Arc<Balancer>,
    /// Retry budgets by backend Service (`namespace/name`).
    budgets: Mutex<HashMap<String, RetryBudget>>,
    /// The DestinationRule state of backend Services.
    destinations: Destinations,
}

impl Upstream {
    /// Forwards as `identity` (the waypoint's), from `pod_ip`; its HBONE connections' receive
    /// windows come out of `windows`.
    pub fn new(
        state: Arc<State>,
        identities: Arc<IdentityManager>,
        identity: Identity,
        pod_ip: IpAddr,
        windows: Arc<WindowBudget>,
    ) -> Self {
        let hbone = Client::new(windows);
        let tunnels = Arc::new(Tunnels { state, identities, identity, hbone, pod_ip });
        let h1 = hyper_util::client::legacy::Client::builder(TokioExecutor::new())
            .pool_idle_timeout(IDLE_TIMEOUT)
            .http1_max_buf_size(crate::listener::HTTP1_BUFFER)
            .set_host(false)
            .build(Connector(tunnels.clone()));
        Self {
            tunnels,
            h1,
            h2: Mutex::default(),
            balancer: Arc::default(),
            budgets: Mutex::default(),
            destinations: Destinations::default(),
        }
    }

    /// Sends `forward` to `to` (a ready endpoint of a Service port, picked per attempt, or one
    /// endpoint) as `policy` says; the response (its body holds the endpoint's place in the
    /// balancer until it ends) and the endpoint. `retries` counts the attempts after the first.
    pub async fn send(
        &self,
        to: &To,
        forward: Forward,
        policy: TryPolicy<'_>,
        retries: &mut u32,
    ) -> Result<(Response<Body>, SocketAddr), UpstreamError> {
        // The backend, for budgets and metrics (`unknown` for a workload, as in the request
        // metrics).
        let name = match to {
            To::Service(service, _) => format!("{}/{}", service.namespace, service.name),
            To::Endpoint(_) => "unknown".to_string(),
        };
        let Forward { parts, body, authority, path_and_query } = forward;
        // The backend's DestinationRule: its limits admit the request (the place is held until
        // the response ends), its outlier detection and balancer pick the endpoints.
        let destination = self.destination(to, policy.client);
        let admission = match &destination {
            Some(d) => Some(d.admit(parts.version != Version::HTTP_2).await?),
            None => None,
        };
        // One request per HTTP/1.1 connection (`maxRequestsPerConnection: 1`).
        let close = destination.as_ref().is_some_and(|d| d.rule.policy.pool.max_requests_per_connection == Some(1));
        // The body, kept whole when it may have to be sent again.
        let length = parts.headers.get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
        let (replay, mut once) = if body.is_end_stream() {
            (Some(Bytes::new()), None)
        } else if policy.retry.attempts > 0 && length.is_some_and(|n| n <= REPLAY_LIMIT) {
            let bytes = body.collect().await.map_err(|e| UpstreamError::Body { error: e.to_string() })?.to_bytes();
            (Some(bytes), None)
        } else {
            (None, Some(body))
        };
        let attempts = if replay.is_some() { policy.retry.attempts + 1 } else { 1 };
        self.budgets.lock().expect("budgets lock").entry(name.clone()).or_default().deposit(now_second());
        let mut tried: Vec<IpAddr> = Vec::new();
        let mut last: Option<Result<(Response<Body>, SocketAddr), UpstreamError>> = None;
        for attempt in 0..attempts {
            // A retry's place within the rule's maxRetries, held while it is tried.
            let mut _retry_place = None;
            if attempt > 0 {
                let reason = match &last {
                    Some(Ok((response, _))) => response.status().as_str().to_string(),
                    Some(Err(UpstreamError::Timeout { .. })) => "per-try-timeout".into(),
                    _ => "connect-failure".into(),
                };
                // The rule's maxRetries bounds retries in progress, the budget those over time.
                let place = match &destination {
                    Some(d) => d.retry().map(Some),
                    None => Some(None),
                };
                let allowed = place.is_some()
                    && self
                        .budgets
                        .lock()
                        .expect("budgets lock")
                        .entry(name.clone())
                        .or_default()
                        .withdraw(now_second());
                if !allowed {
                    tracing::debug!(service = %name, "retry budget or maxRetries exhausted");
                    metrics::counter!("ferrymesh_request_retry_overflow_total", "destination_service" => name.clone())
                        .increment(1);
                    break;
                }
                *retries += 1;
                metrics::counter!("ferrymesh_request_retries_total", "destination_service" => name.clone(), "reason" => reason)
                    .increment(1);
                tokio::time::sleep(policy.retry.backoff).await;
                _retry_place = place.flatten();
            }
            let picked = self.pick(to, &tried, policy.denied, destination.as_deref(), policy.affinity);
            let Some((target, active)) = picked else { break };
            let body = match &replay {
                Some(bytes) => crate::request::full(bytes.clone()),
                None => once.take().unwrap_or_else(crate::request::empty),
            };
            let sent = self.send_once(target, &parts, body, &authority, &path_and_query, close);
            let result = match policy.per_try {
                Some(after) => tokio::time::timeout(after, sent)
                    .await
                    .unwrap_or(Err(UpstreamError::Timeout { endpoint: target, after })),
                None => sent.await,
            };
            tried.push(target.ip());
            if let (Some(d), To::Service(service, port)) = (&destination, to) {
                let outcome = match &result {
                    Ok(response) => Some(Outcome::Status(response.status().as_u16())),
                    Err(UpstreamError::Timeout { .. }) => Some(Outcome::Status(504)),
                    Err(UpstreamError::Connect { .. } | UpstreamError::Request { .. }) => Some(Outcome::LocalFailure),
                    Err(_) => None,
                };
                let ready = service.endpoints.iter().filter(|e| e.ready && e.target_ports.contains_key(port)).count();
                if outcome.is_some_and(|o| d.report(target.ip(), o, ready)) {
                    tracing::info!(service = %name, endpoint = %target, "endpoint ejected by outlier detection");
                    metrics::counter!("ferrymesh_outlier_ejections_total", "destination_service" => name.clone())
                        .increment(1);
                }
            }
            let again = match &result {
                Ok(response) => policy.retry.codes.contains(&response.status().as_u16()),
                Err(UpstreamError::Connect { .. }) => true,
                Err(UpstreamError::Timeout { .. }) => policy.retry.codes.contains(&504),
                Err(_) => false,
            };
            // The endpoint counts as busy until the response body ends.
            let result = result.map(|response| (hold_until_the_end(response, active), target));
            if let Err(e) = &result {
                tracing::debug!(service = %name, %target, "attempt {} failed: {e}", attempt + 1);
            }
            last = Some(result);
            if !again {
                break;
            }
        }
        let last = last.unwrap_or_else(|| {
            Err(match to {
                To::Service(_, port) => UpstreamError::NoEndpoint { service: name, port: *port },
                To::Endpoint(endpoint) => UpstreamError::Connect { endpoint: *endpoint, error: "not tried".into() },
            })
        });
        // The request holds its place within the limits until the answer's body ends, whichever
        // attempt gave it.
        last.map(|(response, target)| (hold_until_the_end(response, admission), target))
    }

    /// The DestinationRule state of the Service `to` addresses for a client of namespace
    /// `client`, when a rule governs it.
    fn destination(&self, to: &To, client: Option<&str>) -> Option<Arc<Destination>> {
        let To::Service(service, _) = to else { return None };
        let rules = self.tunnels.state.destination_rules();
        let rule = rules.of(&format!("{}/{}", service.namespace, service.name), client, ROOT_NAMESPACE)?;
        Some(self.destinations.of(rule))
    }

    /// Where an attempt goes: for a Service, a ready endpoint not in `tried` (any ready one
    /// once every one was tried) and never one in `denied`, with its place in the balancer; else
    /// the one endpoint.
    fn pick(
        &self,
        to: &To,
        tried: &[IpAddr],
        denied: &[IpAddr],
        destination: Option<&Destination>,
        affinity: Option<u64>,
    ) -> Option<(SocketAddr, Option<Active>)> {
        match to {
            To::Endpoint(endpoint) => Some((*endpoint, None)),
            To::Service(service, port) => {
                let fresh = [tried, denied].concat();
                self.next_endpoint(service, *port, &fresh, destination, affinity)
                    .or_else(|| self.next_endpoint(service, *port, denied, destination, affinity))
                    .map(|(target, active)| (target, Some(active)))
            }
        }
    }

    /// A ready endpoint of `service` port `port` not in `tried` nor ejected, picked as its
    /// DestinationRule says (by default power of two choices on requests in progress), as its
    /// address for that port, and its place in the balancer.
    fn next_endpoint(
        &self,
        service: &Service,
        port: u16,
        tried: &[IpAddr],
        destination: Option<&Destination>,
        affinity: Option<u64>,
    ) -> Option<(SocketAddr, Active)> {
        let mut candidates: Vec<&ServiceEndpoint> = service
            .endpoints
            .iter()
            .filter(|e| e.ready && e.target_ports.contains_key(&port) && !tried.contains(&e.ip))
            .collect();
        let endpoint = match destination {
            None => self.balancer.pick(&candidates)?,
            Some(d) => {
                let ejected = d.ejected(candidates.iter().map(|e| e.ip));
                let mut ejected = ejected.into_iter();
                candidates.retain(|_| !ejected.next().unwrap_or(false));
                match (&d.rule.policy.balancer, affinity) {
                    (LoadBalancer::RoundRobin, _) if !candidates.is_empty() => {
                        candidates[d.next_turn() % candidates.len()]
                    }
                    (LoadBalancer::Random, _) if !candidates.is_empty() => {
                        candidates[rand::random_range(0..candidates.len())]
                    }
                    (LoadBalancer::Hash(_), Some(key)) => *candidates.iter().max_by_key(|e| rendezvous(key, e.ip))?,
                    _ => self.balancer.pick(&candidates)?,
                }
            }
        };
        Some((SocketAddr::new(endpoint.ip, endpoint.target_ports[&port]), self.balancer.start(endpoint.ip)))
    }

    /// A byte stream to a ready endpoint of `to`, for a connection relayed at L4: another
    /// endpoint is tried when one cannot be reached (up to 3); the endpoint, and its place in
    /// the balancer (held while the connection lasts).
    pub async fn connect(
        &self,
        to: &To,
        client: Option<&str>,
        denied: &[IpAddr],
    ) -> Result<(Io, SocketAddr, Option<Active>), UpstreamError> {
        let (service, port) = match to {
            To::Endpoint(endpoint) => {
                let io = self.tunnels.open(*endpoint).await;
                let io = io.map_err(|e| UpstreamError::Connect { endpoint: *endpoint, error: e.to_string() })?;
                return Ok((io, *endpoint, None));
            }
            To::Service(service, port) => (service, *port),
        };
        let mut tried: Vec<IpAddr> = denied.to_vec();
        let mut last = None;
        let destination = self.destination(to, client);
        for _ in 0..ATTEMPTS {
            let Some((target, active)) = self.next_endpoint(service, port, &tried, destination.as_deref(), None) else {
                break;
            };
            match self.tunnels.open(target).await {
                Ok(io) => return Ok((io, target, Some(active))),
                Err(e) => {
                    tracing::debug!(%target, "endpoint failed, trying another: {e}");
                    tried.push(target.ip());
                    last = Some(UpstreamError::Connect { endpoint: target, error: e.to_string() });
                }
            }
        }
        let service = format!("{}/{}", service.namespace, service.name);
        Err(last.unwrap_or(UpstreamError::NoEndpoint { service, port }))
    }

    /// Sends one request to `endpoint`: HTTP/2 over its multiplexed connection, HTTP/1.x over
    /// a pooled one (`Host` the authority the request goes with; with `close`, a connection of
    /// its own that closes after it).
    async fn send_once(
        &self,
        endpoint: SocketAddr,
        parts: &http::request::Parts,
        body: Body,
        authority: &Authority,
        path_and_query: &PathAndQuery,
        close: bool,
    ) -> Result<Response<Body>, UpstreamError> {
        let mut request = Request::new(body);
        *request.method_mut() = parts.method.clone();
        *request.headers_mut() = parts.headers.clone();
        if parts.version == Version::HTTP_2 {
            *request.uri_mut() = absolute(authority, path_and_query);
            *request.version_mut() = Version::HTTP_2;
            return self.send_h2(endpoint, request).await;
        }
        let address = Authority::try_from(endpoint.to_string().as_str()).expect("an address is an authority");
        *request.uri_mut() = absolute(&address, path_and_query);
        *request.version_mut() = parts.version;
        if let Ok(host) = HeaderValue::try_from(authority.as_str()) {
            request.headers_mut().insert(HOST, host);
        }
        if close {
            request.headers_mut().insert(http::header::CONNECTION, HeaderValue::from_static("close"));
        }
        match self.h1.request(request).await {
            Ok(response) => Ok(response.map(BodyExt::boxed_unsync)),
            Err(e) => {
                let error = ferrymesh_api::exit::error_chain(&e);
                Err(if e.is_connect() {
                    UpstreamError::Connect { endpoint, error }
                } else {
                    UpstreamError::Request { endpoint, error }
                })
            }
        }
    }

    /// Sends an HTTP/2 request over the endpoint's multiplexed connection, made when there is
    /// none (or it ended).
    async fn send_h2(&self, endpoint: SocketAddr, request: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        let pooled = self.h2.lock().expect("h2 pool lock").get(&endpoint).filter(|s| !s.is_closed()).cloned();
        let mut sender = match pooled {
            Some(sender) => sender,
            None => {
                let connect = |error: String| UpstreamError::Connect { endpoint, error };
                let io = self.tunnels.open(endpoint).await.map_err(|e| connect(e.to_string()))?;
                let (sender, connection) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
                    .initial_stream_window_size(UPSTREAM_HTTP2.0)
                    .initial_connection_window_size(UPSTREAM_HTTP2.1)
                    .max_send_buf_size(UPSTREAM_HTTP2.2)
                    .handshake(TokioIo::new(io))
                    .await
                    .map_err(|e| connect(e.to_string()))?;
                tokio::spawn(async move {
                    if let Err(e) = connection.await {
                        tracing::debug!(%endpoint, "HTTP/2 connection ended: {e}");
                    }
                });
                self.h2.lock().expect("h2 pool lock").insert(endpoint, sender.clone());
                sender
            }
        };
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| UpstreamError::Request { endpoint, error: ferrymesh_api::exit::error_chain(&e) })?;
        Ok(response.map(BodyExt::boxed_unsync))
    }
}

/// `response` with `held` kept alive until its body ends (or is dropped).
fn hold_until_the_end<T: Send + 'static>(response: Response<Body>, held: T) -> Response<Body> {
    response.map(|body| {
        body.map_frame(move |frame| {
            let _ = &held;
            frame
        })
        .boxed_unsync()
    })
}

/// The rendezvous (highest random weight) score of endpoint `ip` for a request's `key`: the
/// endpoint with the highest score takes the key, so a key moves only when its endpoint goes.
fn rendezvous(key: u64, ip: IpAddr) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::hash::DefaultHasher::new();
    (key, ip).hash(&mut hasher);
    hasher.finish()
}

/// `http://<authority><path>`.
fn absolute(authority: &Authority, path_and_query: &PathAndQuery) -> Uri {
    Uri::builder()
        .scheme(Scheme::HTTP)
        .authority(authority.clone())
        .path_and_query(path_and_query.clone())
        .build()
        .expect("an authority and a path make a URI")
}

#[cfg(test)]
mod tests {
    use super::RetryBudget;

    #[test]
    fn the_retry_budget_allows_a_floor_and_a_fifth_of_recent_requests() {
        let mut budget = RetryBudget::default();
        // The floor: 10 a second over the 10 s window, with no requests at all.
        let floor = (RetryBudget::MIN_PER_SEC as u64 * RetryBudget::WINDOW_SECS) as usize;
        assert_eq!((0..1000).filter(|_| budget.withdraw(5)).count(), floor);
        // 1000 requests more allow 200 more retries, within the window.
        for _ in 0..1000 {
            budget.deposit(6);
        }
        assert_eq!((0..1000).filter(|_| budget.withdraw(7)).count(), 200);
        // Once the window has passed, the old requests and retries no longer count.
        assert_eq!((0..1000).filter(|_| budget.withdraw(20)).count(), floor);
    }
}
