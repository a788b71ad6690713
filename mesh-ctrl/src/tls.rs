//! TLS of the config and CA server on 15012: TLS 1.3 only, ALPN h2, with a serving certificate
//! mesh-ctrl issues itself from the mesh CA and renews at half-life without a restart. Agents
//! verify it against the mesh root they hold out of band, so a node token, the config stream and
//! the trust bundle never cross the network in clear or to an impostor. It owns the serving
//! certificate and the TLS handshake of every accepted connection; it never decides who may
//! ask for what (that is [`crate::ca::service`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;

use crate::ca::{Ca, CaError, CurrentCa};

/// Names every serving certificate holds: the in-cluster Service, short and fully qualified.
pub const SERVICE_NAMES: [&str; 2] =
    ["ferrymesh-ctrl.ferrymesh-system.svc", "ferrymesh-ctrl.ferrymesh-system.svc.cluster.local"];

/// Why the serving certificate could not be made.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The CA could not issue it.
    #[error("cannot issue mesh-ctrl's serving certificate: {0}")]
    Issue(#[from] CaError),
    /// What the CA issued is not usable by rustls.
    #[error("mesh-ctrl's serving certificate is unusable: {0}")]
    Unusable(String),
}

/// mesh-ctrl's serving certificate, current at every handshake.
pub struct ServingIdentity {
    ca: CurrentCa,
    names: Vec<String>,
    ttl: Duration,
    current: RwLock<(Arc<CertifiedKey>, SystemTime)>,
}

impl std::fmt::Debug for ServingIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingIdentity").field("names", &self.names).field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

fn issue(ca: &Ca, names: &[String], ttl: Duration) -> Result<(Arc<CertifiedKey>, SystemTime), TlsError> {
    let serving = ca.issue_serving(names, ttl)?;
    let chain = serving
        .chain_pem
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Unusable(e.to_string()))?;
    let key =
        PrivateKeyDer::from_pem_slice(serving.key_pem.as_bytes()).map_err(|e| TlsError::Unusable(e.to_string()))?;
    let signing =
        rustls::crypto::ring::sign::any_supported_type(&key).map_err(|e| TlsError::Unusable(e.to_string()))?;
    Ok((Arc::new(CertifiedKey::new(chain, signing)), serving.not_after))
}

impl ServingIdentity {
    /// Issues a serving certificate for [`SERVICE_NAMES`] and `extra_names` (DNS names or IP
    /// addresses agents dial), valid `ttl`.
    pub fn new(ca: CurrentCa, extra_names: &[String], ttl: Duration) -> Result<Arc<Self>, TlsError> {
        let mut names: Vec<String> = SERVICE_NAMES.iter().map(|n| n.to_string()).collect();
        names.extend(extra_names.iter().filter(|n| !names.contains(n)).cloned().collect::<Vec<_>>());
        let current = issue(&ca.borrow(), &names, ttl)?;
        Ok(Arc::new(Self { ca, names, ttl, current: RwLock::new(current) }))
    }

    /// When the current certificate expires.
    pub fn not_after(&self) -> SystemTime {
        self.current.read().expect("serving identity lock").1
    }

    /// Renews the certificate at half its life, and at once when the CA in force changes (a
    /// root rotation), retrying every 10 s on failure while the current one is kept, forever.
    /// New handshakes present the renewed one.
    pub async fn renew_forever(self: Arc<Self>) {
        let mut changes = self.ca.clone();
        changes.mark_unchanged();
        loop {
            let left = self.not_after().duration_since(SystemTime::now()).unwrap_or_default();
            tokio::select! {
                () = tokio::time::sleep(left.min(self.ttl) / 2) => {}
                Ok(()) = changes.changed() => {}
            }
            loop {
                let ca = changes.borrow_and_update().clone();
                match issue(&ca, &self.names, self.ttl) {
                    Ok(renewed) => {
                        *self.current.write().expect("serving identity lock") = renewed;
                        tracing::info!("renewed mesh-ctrl's serving certificate");
                        break;
                    }
                    Err(e) => {
                        tracing::warn!("{e}; keeping the current one and retrying in 10 s");
                        tokio::time::sleep(Duration::from_secs(10)).await;
                    }
                }
            }
        }
    }

    /// The server TLS configuration: TLS 1.3 only, ALPN h2, this certificate.
    pub fn server_config(self: &Arc<Self>) -> Arc<ServerConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = ServerConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("the ring provider supports TLS 1.3")
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        config.alpn_protocols = vec![b"h2".to_vec()];
        Arc::new(config)
    }
}

impl ResolvesServerCert for ServingIdentity {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current.read().expect("serving identity lock").0.clone())
    }
}

/// What clients may hold open on 15012: connections from one source address and in all, and
/// TLS handshakes in progress. Past a cap a new connection is closed at once (logged, counted in
/// `ferrymesh_ctrl_connections_refused_total{limit}`).
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// How long a client may take to finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// Connections one source address may hold open.
    pub per_source: usize,
    /// Connections all sources may hold open.
    pub total: usize,
    /// TLS handshakes in progress at once (nothing is allocated for one before the client's
    /// first byte).
    pub handshakes: usize,
}

/// The connections open now, by source.
#[derive(Debug, Default)]
struct Open {
    by_source: Mutex<(HashMap<IpAddr, usize>, usize)>,
}

/// One open connection's place under the caps, given back when dropped.
#[derive(Debug)]
struct Slot {
    open: Arc<Open>,
    source: IpAddr,
}

impl Open {
    fn take(self: &Arc<Self>, source: IpAddr, limits: &ConnectionLimits) -> Result<Slot, &'static str> {
        let mut guard = self.by_source.lock().expect("open connections lock");
        let (by_source, total) = &mut *guard;
        if *total >= limits.total {
            return Err("connections");
        }
        let from_source = by_source.entry(source).or_default();
        if *from_source >= limits.per_source {
            return Err("connections_per_source");
        }
        *from_source += 1;
        *total += 1;
        Ok(Slot { open: self.clone(), source })
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        let mut guard = self.open.by_source.lock().expect("open connections lock");
        let (by_source, total) = &mut *guard;
        *total -= 1;
        if let Some(n) = by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                by_source.remove(&self.source);
            }
        }
    }
}

/// A TLS connection to 15012, holding its place under the caps while it lives.
#[derive(Debug)]
pub struct Counted {
    inner: TlsStream<TcpStream>,
    _slot: Slot,
}

impl tokio::io::AsyncRead for Counted {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Counted {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl tonic::transport::server::Connected for Counted {
    type ConnectInfo = <TlsStream<TcpStream> as tonic::transport::server::Connected>::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Logs and counts a connection closed at once for its cap `limit` (the flag is `--max-` and
/// the limit's name).
fn refuse(peer: std::net::SocketAddr, limit: &'static str) {
    metrics::counter!("ferrymesh_ctrl_connections_refused_total", "limit" => limit).increment(1);
    tracing::info!(%peer, "refused a connection to 15012: too many {limit} (--max-{})", limit.replace('_', "-"));
}

/// Accepts TCP connections on `listener` and completes their TLS handshakes (each within
/// `limits.handshake_timeout`, on a task of its own so a slow client holds up nobody), yielding
/// the connections that made it. A failed handshake is logged and counted, never served; a
/// connection past a cap of `limits` is closed at once.
pub fn incoming(
    listener: TcpListener,
    config: Arc<ServerConfig>,
    limits: ConnectionLimits,
) -> ReceiverStream<std::io::Result<Counted>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let open = Arc::new(Open::default());
    let handshakes = Arc::new(tokio::sync::Semaphore::new(limits.handshakes));
    let handshake_timeout = limits.handshake_timeout;
    tokio::spawn(async move {
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    tracing::warn!("accept on 15012 failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let slot = match open.take(peer.ip(), &limits) {
                Ok(slot) => slot,
                Err(limit) => {
                    refuse(peer, limit);
                    continue;
                }
            };
            let (acceptor, tx, handshakes) = (acceptor.clone(), tx.clone(), handshakes.clone());
            tokio::spawn(async move {
                // Nothing is allocated for TLS until the client has sent something, and a
                // handshake counts under --max-handshakes from then on. (Waiting with
                // `readable()` would not do: tokio reports a new socket readable at once, a
                // false positive, and TLS state was made for a silent client.)
                let handshake = async {
                    tcp.peek(&mut [0; 1]).await?;
                    let Ok(permit) = handshakes.try_acquire_owned() else { return Ok(None) };
                    acceptor.accept(tcp).await.map(|stream| Some((stream, permit)))
                };
                let reason = match tokio::time::timeout(handshake_timeout, handshake).await {
                    Ok(Ok(Some((stream, permit)))) => {
                        drop(permit);
                        let _ = tx.send(Ok(Counted { inner: stream, _slot: slot })).await;
                        return;
                    }
                    Ok(Ok(None)) => return refuse(peer, "handshakes"),
                    Ok(Err(e)) => format!("TLS handshake failed: {e}"),
                    Err(_) => format!("no TLS handshake within {handshake_timeout:?}"),
                };
                metrics::counter!("ferrymesh_ctrl_tls_handshake_failures_total").increment(1);
                tracing::info!(%peer, "refused a connection to 15012: {reason} (a plaintext client, or one without the mesh root?)");
            });
        }
    });
    ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_serving_certificate_names_the_service_and_the_extra_names() {
        let (cert, key) = Ca::generate_root("cluster.local").unwrap();
        let files = [("root-cert.pem".to_string(), cert), ("root-key.pem".to_string(), key)].into();
        let ca = Ca::from_files(&files, &|name| name.into(), Duration::from_secs(60)).unwrap();
        let identity =
            ServingIdentity::new(crate::ca::fixed(ca), &["172.18.0.254".into()], Duration::from_secs(60)).unwrap();
        let leaf = identity.current.read().unwrap().0.cert[0].clone();
        let (_, parsed) = x509_parser::parse_x509_certificate(&leaf).unwrap();
        let san = parsed.subject_alternative_name().unwrap().unwrap().value.general_names.clone();
        let names: Vec<String> = san.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            names,
            [
                "DNSName(ferrymesh-ctrl.ferrymesh-system.svc)",
                "DNSName(ferrymesh-ctrl.ferrymesh-system.svc.cluster.local)",
                "IPAddress(ac:12:00:fe)" // 172.18.0.254
            ]
        );
        let left = identity.not_after().duration_since(SystemTime::now()).unwrap();
        assert!(left <= Duration::from_secs(60) && left > Duration::from_secs(50), "{left:?}");
    }

    /// With one handshake allowed in progress, a client that connects and says nothing holds no
    /// handshake: the next client's TLS handshake still completes. (It used to count from the
    /// connect: a half-open flood from a few addresses took every handshake slot.)
    #[tokio::test]
    async fn a_silent_client_holds_no_handshake() {
        use tokio_stream::StreamExt;
        let (cert, key) = Ca::generate_root("cluster.local").unwrap();
        let identity =
            ServingIdentity::new(crate::ca::fixed(ca_of(&cert, &key)), &[], Duration::from_secs(60)).unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        let limits =
            ConnectionLimits { handshake_timeout: Duration::from_secs(30), per_source: 10, total: 10, handshakes: 1 };
        let mut accepted = incoming(listener, identity.server_config(), limits);
        let _silent = TcpStream::connect(to).await.unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        client.alpn_protocols = vec![b"h2".to_vec()];
        let name = rustls::pki_types::ServerName::try_from(SERVICE_NAMES[0]).unwrap();
        let tcp = TcpStream::connect(to).await.unwrap();
        let speaking = tokio::time::timeout(
            Duration::from_secs(10),
            tokio_rustls::TlsConnector::from(Arc::new(client)).connect(name, tcp),
        );
        let served = tokio::time::timeout(Duration::from_secs(10), accepted.next());
        let (speaking, served) = tokio::join!(speaking, served);
        assert!(matches!(speaking, Ok(Ok(_))), "the speaking client's handshake: {speaking:?}");
        assert!(matches!(served, Ok(Some(Ok(_)))), "the server yields its connection");
    }

    fn ca_of(cert: &str, key: &str) -> Ca {
        let files = [("root-cert.pem".to_string(), cert.to_string()), ("root-key.pem".to_string(), key.to_string())];
        Ca::from_files(&files.into(), &|name| name.into(), Duration::from_secs(60)).unwrap()
    }

    /// A switch of the CA in force re-issues the serving certificate at once, from the new CA.
    #[tokio::test]
    async fn a_new_ca_reissues_the_serving_certificate_at_once() {
        let (old_cert, old_key) = Ca::generate_root("cluster.local").unwrap();
        let (new_cert, new_key) = Ca::generate_root("cluster.local").unwrap();
        let (tx, ca) = tokio::sync::watch::channel(Arc::new(ca_of(&old_cert, &old_key)));
        let identity = ServingIdentity::new(ca, &[], Duration::from_secs(3600)).unwrap();
        let issuer = |identity: &ServingIdentity| identity.current.read().unwrap().0.cert[1].to_vec();
        let der = |pem_text: &str| pem::parse(pem_text).unwrap().contents().to_vec();
        assert_eq!(issuer(&identity), der(&old_cert));
        tokio::spawn(identity.clone().renew_forever());
        tokio::time::sleep(Duration::from_millis(50)).await;
        tx.send_replace(Arc::new(ca_of(&format!("{old_cert}{new_cert}"), &new_key)));
        for _ in 0..100 {
            if issuer(&identity) == der(&new_cert) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("the serving certificate was not re-issued from the new CA within 2 s");
    }
}
