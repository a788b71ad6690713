//! The HBONE client: CONNECT streams to a peer's 15008 over pooled mTLS connections. The TCP
//! connection comes from the caller's [`Dialer`] (the node agent dials from inside the source
//! pod's netns; a proxy of its own dials directly; a test dials in memory).

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use ferrymesh_spiffe::SpiffeId;
use h2::{RecvStream, SendStream};
use http::{Method, Request, StatusCode};
use rustls::pki_types::ServerName;
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncWrite, BufReader};
use tokio_rustls::TlsConnector;

use super::budget::WindowBudget;
use super::pool::{Pool, PoolKey, StreamSlot};
use super::{client_settings, HANDSHAKE_TIMEOUT, PORT, TLS_READ_BUFFER, TLS_WRITE_BUFFER};
use crate::identity::WorkloadCert;
use crate::tls;

/// Makes the TCP (or any byte-stream) connection to a peer's HBONE port.
pub trait Dialer: Send + Sync {
    /// The connection.
    type Io: AsyncRead + AsyncWrite + Unpin + Send + 'static;

    /// Connects to `addr`.
    fn dial(&self, addr: SocketAddr) -> impl Future<Output = io::Result<Self::Io>> + Send;

    /// The address its connections to `peer` leave from, when that names the client: the
    /// destination takes the TCP peer as the client (its address for `ipBlocks`, the source
    /// the app sees, the flow's source), so connections of two sources are never shared. None:
    /// one source for every connection (a proxy dialling from its own address).
    fn source(&self, _peer: IpAddr) -> Option<IpAddr> {
        None
    }
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
    /// The destination answered the CONNECT with an error status.
    #[error("destination refused the tunnel: HTTP {0}")]
    Refused(u16),
    /// HTTP/2 failed after the client's first bytes went out with the CONNECT and before its
    /// answer: the destination may have received them, so the connection is not tried again
    /// elsewhere (the bytes would reach two apps).
    #[error("HTTP/2 to {0} failed after the client's first bytes were sent: {1}")]
    Interrupted(IpAddr, h2::Error),
}

impl HboneError {
    /// Whether the same bytes may be tried on another peer: false once the destination may
    /// have received some of them.
    pub fn retryable(&self) -> bool {
        !matches!(self, HboneError::Interrupted(..))
    }
}

/// What a CONNECT asks for, besides its target.
#[derive(Debug, Clone)]
pub struct ConnectHeaders {
    /// The original client's address (`forwarded: for="<ip>"`).
    pub forwarded_for: IpAddr,
    /// W3C baggage naming the source workload (`k8s.namespace.name=...,k8s.pod.name=...`).
    pub baggage: String,
    /// W3C `traceparent`: the sender's span of the connection (see [`crate::spans`]).
    pub traceparent: String,
}

/// What a CONNECT asks for and carries.
#[derive(Debug, Clone)]
pub struct Connect<'a> {
    /// The target (`:authority`).
    pub target: SocketAddr,
    /// Its headers.
    pub headers: &'a ConnectHeaders,
    /// The client's first bytes, sent as DATA right behind the CONNECT (may be empty): see
    /// [`Client::open_via`].
    pub first: Bytes,
}

/// The proxy an HBONE connection goes to, and the identity it must prove.
#[derive(Debug, Clone, Copy)]
pub struct Peer<'a> {
    /// Its address (the connection goes to its 15008).
    pub ip: IpAddr,
    /// Its SPIFFE ID.
    pub id: &'a SpiffeId,
}

/// An HBONE client: the pool of its connections, and the window budget they take their
/// receive windows from.
#[derive(Debug, Clone)]
pub struct Client {
    pool: Pool,
    windows: Arc<WindowBudget>,
}

impl Client {
    /// A client whose connections' receive windows come out of `windows` (the process's budget,
    /// shared with its HBONE server connections).
    pub fn new(windows: Arc<WindowBudget>) -> Self {
        Self { pool: Pool::default(), windows }
    }

    /// A ready sender to `dst_ip` for `cert`'s identity, verifying the peer as `dst_id` against
    /// `roots`: on a pooled connection with a free stream (its pool key and generation given
    /// back), unless `fresh`, else on a new one `dialer` makes.
    async fn sender<D: Dialer>(
        &self,
        dialer: &D,
        cert: &WorkloadCert,
        roots: Arc<RootCertStore>,
        dst_ip: IpAddr,
        dst_id: &SpiffeId,
        fresh: bool,
    ) -> Result<(h2::client::SendRequest<Bytes>, StreamSlot, Option<(PoolKey, u64)>), HboneError> {
        let key = PoolKey {
            src: cert.spiffe_id.clone(),
            src_serial: cert.serial.clone(),
            src_ip: dialer.source(dst_ip),
            dst: dst_id.clone(),
            dst_ip,
        };
        if !fresh {
            if let Some((sender, slot, generation)) = self.pool.ready(&key).await {
                return Ok((sender, slot, Some((key, generation))));
            }
        }
        let io = dialer.dial(SocketAddr::new(dst_ip, PORT)).await.map_err(|e| HboneError::Connect(dst_ip, e))?;
        let config =
            tls::client_config(cert, roots, dst_id.clone()).map_err(|e| HboneError::Tls(dst_ip, e.to_string()))?;
        let stream = tokio::time::timeout(
            HANDSHAKE_TIMEOUT,
            TlsConnector::from(Arc::new(config)).connect_with(
                ServerName::IpAddress(dst_ip.into()),
                BufReader::with_capacity(TLS_READ_BUFFER, io),
                |tls| tls.set_buffer_limit(Some(TLS_WRITE_BUFFER)),
            ),
        )
        .await
        .map_err(|_| HboneError::Tls(dst_ip, format!("no handshake within {HANDSHAKE_TIMEOUT:?}")))?
        .map_err(|e| HboneError::Tls(dst_ip, tls::describe(&e)))?;
        if stream.get_ref().1.alpn_protocol() != Some(tls::ALPN_H2) {
            return Err(HboneError::Tls(dst_ip, "the server did not negotiate ALPN h2".into()));
        }
        let (sender, mut connection) =
            client_settings().handshake::<_, Bytes>(stream).await.map_err(|e| HboneError::Http2(dst_ip, e))?;
        // The full window while the budget has room, held as long as the connection: what a
        // server may send before the pod reads it is memory this process holds.
        let extra = (super::CONNECTION_WINDOW - super::budget::BASE_CONNECTION_WINDOW) as usize;
        let grant = self.windows.take(extra).inspect(|_| connection.set_target_window_size(super::CONNECTION_WINDOW));
        let slot = self.pool.insert(key, sender.clone(), connection, grant);
        Ok((sender, slot, None))
    }

    /// Opens a CONNECT stream to `dst` for `cert`'s identity, the peer proving `dst_id` against
    /// `roots`. The slot is the stream's place on its pooled connection: hold it until the
    /// stream ends.
    pub async fn open<D: Dialer>(
        &self,
        dialer: &D,
        cert: &WorkloadCert,
        roots: Arc<RootCertStore>,
        dst: SocketAddr,
        dst_id: &SpiffeId,
        headers: &ConnectHeaders,
    ) -> Result<(SendStream<Bytes>, RecvStream, StreamSlot), HboneError> {
        let connect = Connect { target: dst, headers, first: Bytes::new() };
        self.open_via(dialer, cert, roots, Peer { ip: dst.ip(), id: dst_id }, connect).await
    }

    /// [`Client::open`] through a peer that may not be the target: the connection goes to
    /// `peer`'s 15008 (a waypoint), whose identity it checks, and the CONNECT asks for
    /// `connect.target` (a Service's VIP and port, as ztunnel sends it).
    ///
    /// `connect.first` (may be empty) is the client's first bytes, sent as DATA right behind the
    /// CONNECT rather than after its answer: a client that speaks first (HTTP, TLS) saves the
    /// round trip to the destination and its dial of the app. The destination's agent holds
    /// them until it has admitted the stream and dialled the app, and drops them on a refusal.
    /// They go only to the peer that proved `peer.id`, inside its mTLS connection. Once they
    /// are sent, a failure without an answer is [`HboneError::Interrupted`].
    pub async fn open_via<D: Dialer>(
        &self,
        dialer: &D,
        cert: &WorkloadCert,
        roots: Arc<RootCertStore>,
        peer: Peer<'_>,
        connect: Connect<'_>,
    ) -> Result<(SendStream<Bytes>, RecvStream, StreamSlot), HboneError> {
        let Peer { ip: peer, id: peer_id } = peer;
        let Connect { target, headers, first } = connect;
        let request = || {
            Request::builder()
                .method(Method::CONNECT)
                .uri(target.to_string())
                .header("forwarded", format!("for=\"{}\"", headers.forwarded_for))
                .header("baggage", &headers.baggage)
                .header("traceparent", &headers.traceparent)
                .body(())
                .expect("CONNECT request")
        };
        let mut fresh = false;
        loop {
            let (mut sender, slot, pooled) = self.sender(dialer, cert, roots.clone(), peer, peer_id, fresh).await?;
            let sent = match sender.send_request(request(), false) {
                Ok((response, mut send)) => {
                    let first_sent = if first.is_empty() { Ok(()) } else { send.send_data(first.clone(), false) };
                    match first_sent {
                        Ok(()) => response.await.map(|response| (response, send)),
                        Err(e) => Err(e),
                    }
                }
                Err(e) => Err(e),
            };
            let (response, send) = match sent {
                Ok(sent) => sent,
                // A pooled connection whose server is going away (an agent handing over to its
                // successor sends a graceful GOAWAY) never processed this stream: forget the
                // connection and open the stream on a new one, once.
                Err(e) if e.is_go_away() => match pooled {
                    Some((key, generation)) => {
                        self.pool.forget(&key, generation);
                        fresh = true;
                        continue;
                    }
                    None => return Err(HboneError::Http2(peer, e)),
                },
                // A stream the server refused (its limits) was never processed.
                Err(e) if first.is_empty() || e.reason() == Some(h2::Reason::REFUSED_STREAM) => {
                    return Err(HboneError::Http2(peer, e))
                }
                Err(e) => return Err(HboneError::Interrupted(peer, e)),
            };
            if response.status() != StatusCode::OK {
                return Err(HboneError::Refused(response.status().as_u16()));
            }
            return Ok((send, response.into_body(), slot));
        }
    }
}
