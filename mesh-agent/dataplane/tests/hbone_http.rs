//! The HBONE library's seams, with no netns and no agent: an in-memory client and server built
//! from `ferrymesh_dataplane::hbone` over real mutual TLS (rustls, SPIFFE certificates), and
//! hyper serving HTTP/1.1 and HTTP/2 on the CONNECT streams between them.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use ferrymesh_dataplane::hbone::budget::{WindowBudget, DEFAULT_WINDOW_BUDGET};
use ferrymesh_dataplane::hbone::client::{Client, Connect, ConnectHeaders, Dialer, HboneError, Peer};
use ferrymesh_dataplane::hbone::server::{connect_target, respond_status, serve_h2};
use ferrymesh_dataplane::hbone::stream::H2Stream;
use ferrymesh_dataplane::identity::{Identity, WorkloadCert};
use ferrymesh_dataplane::tls;
use ferrymesh_dataplane::trust::TrustBundle;
use ferrymesh_spiffe::SpiffeId;
use http::StatusCode;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncReadExt, DuplexStream};
use tokio::sync::{mpsc, watch};

const SERVER_IP: [u8; 4] = [10, 244, 2, 2];

/// A mesh root and workload certificates it signs.
struct Pki {
    root: rcgen::Certificate,
    issuer: Issuer<'static, KeyPair>,
}

impl Pki {
    fn new() -> Self {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let root = params.self_signed(&key).unwrap();
        Self { root, issuer: Issuer::new(params, key) }
    }

    fn cert(&self, id: &SpiffeId) -> WorkloadCert {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(id.as_str().try_into().unwrap())];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let leaf = params.signed_by(&key, &self.issuer).unwrap();
        let der = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        let signing = rustls::crypto::ring::sign::any_supported_type(&der).unwrap();
        let chain = vec![leaf.der().clone(), self.root.der().clone()];
        WorkloadCert {
            identity: Identity { namespace: id.namespace().into(), service_account: id.service_account().into() },
            spiffe_id: id.clone(),
            key: Arc::new(CertifiedKey::new(chain, signing)),
            issuer_sha256: String::new(),
            serial: "01".into(),
            not_after: SystemTime::now() + Duration::from_secs(3600),
            rotate_at: SystemTime::now() + Duration::from_secs(1800),
        }
    }

    fn trust(&self) -> TrustBundle {
        TrustBundle::new(&[self.root.pem()], "").unwrap()
    }
}

#[derive(Debug)]
struct Fixed(Arc<CertifiedKey>);

impl ResolvesServerCert for Fixed {
    fn resolve(&self, _: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.0.clone())
    }
}

/// Dials in memory: each dial is a duplex whose other end goes to the server; counted.
struct MemoryDialer {
    to_server: mpsc::UnboundedSender<DuplexStream>,
    dials: AtomicUsize,
}

impl Dialer for MemoryDialer {
    type Io = DuplexStream;

    async fn dial(&self, addr: SocketAddr) -> std::io::Result<DuplexStream> {
        assert_eq!(addr, SocketAddr::from((SERVER_IP, 15008)));
        self.dials.fetch_add(1, Ordering::Relaxed);
        let (client, server) = tokio::io::duplex(1 << 20);
        self.to_server.send(server).map_err(|_| std::io::Error::other("server gone"))?;
        Ok(client)
    }
}

/// The app behind the server: says which protocol it was asked in, and by whom.
async fn app(
    request: hyper::Request<hyper::body::Incoming>,
    peer: Arc<str>,
) -> Result<hyper::Response<Full<Bytes>>, hyper::Error> {
    let body = format!("{:?} {} from {peer}", request.version(), request.uri().path());
    Ok(hyper::Response::new(Full::new(Bytes::from(body))))
}

/// The HBONE server: mTLS, then each CONNECT checked and answered 200, then hyper on the
/// stream: HTTP/1.1 for port 8080, HTTP/2 for port 8081. A CONNECT to port 8098 or 8099 is
/// reset unanswered (REFUSED_STREAM, INTERNAL_ERROR).
async fn serve(mut accepted: mpsc::UnboundedReceiver<DuplexStream>, config: Arc<rustls::ServerConfig>) {
    while let Some(io) = accepted.recv().await {
        let config = config.clone();
        tokio::spawn(async move {
            let tls = tokio_rustls::TlsAcceptor::from(config).accept(io).await.expect("mTLS handshake");
            let peer_cert = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
            let peer: Arc<str> = tls::spiffe_id_of(&peer_cert).unwrap().as_str().into();
            let windows = ferrymesh_dataplane::hbone::budget::WindowBudget::new(64 << 20);
            let ended = serve_h2(tls, &windows, move |request, mut respond, _queue| {
                let (parts, body) = request.into_parts();
                let target = connect_target(&parts.method, parts.uri.authority().map(|a| a.as_str()), SERVER_IP.into());
                let Ok(target) = target else {
                    respond_status(&mut respond, StatusCode::BAD_REQUEST);
                    return;
                };
                match target.port() {
                    // The stream fails without an answer: reset by the server's limits (it was
                    // never processed), or for any other reason (it may have been).
                    8098 => return respond.send_reset(h2::Reason::REFUSED_STREAM),
                    8099 => return respond.send_reset(h2::Reason::INTERNAL_ERROR),
                    _ => {}
                }
                let send = respond_status(&mut respond, StatusCode::OK).expect("stream open");
                let io = TokioIo::new(H2Stream::new(send, body));
                let peer = peer.clone();
                let service = service_fn(move |r| app(r, peer.clone()));
                tokio::spawn(async move {
                    let served = match target.port() {
                        8080 => hyper::server::conn::http1::Builder::new().serve_connection(io, service).await,
                        _ => {
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                                .serve_connection(io, service)
                                .await
                        }
                    };
                    served.expect("hyper served the stream");
                });
            });
            ended.await.expect("the HTTP/2 connection ends cleanly");
        });
    }
}

async fn body_text(response: hyper::Response<hyper::body::Incoming>) -> String {
    assert_eq!(response.status(), 200);
    String::from_utf8(response.into_body().collect().await.unwrap().to_bytes().to_vec()).unwrap()
}

/// The server running, and what a client needs to reach it.
struct Setup {
    client_id: SpiffeId,
    server_id: SpiffeId,
    client_cert: WorkloadCert,
    dialer: MemoryDialer,
    client: Client,
    roots: Arc<rustls::RootCertStore>,
    headers: ConnectHeaders,
    /// Keeps the server's trust bundle.
    _trust: watch::Sender<Option<Arc<TrustBundle>>>,
}

impl Setup {
    /// A mesh root, a client and a server certificate, and the server spawned.
    fn start() -> Self {
        let pki = Pki::new();
        let client_id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/client".parse().unwrap();
        let server_id: SpiffeId = "spiffe://cluster.local/ns/shop/sa/server".parse().unwrap();
        let (client_cert, server_cert) = (pki.cert(&client_id), pki.cert(&server_id));
        let (_trust, trust) = watch::channel(Some(Arc::new(pki.trust())));
        let config = tls::server_config(Arc::new(Fixed(server_cert.key.clone())), trust, "cluster.local").unwrap();
        let (to_server, accepted) = mpsc::unbounded_channel();
        tokio::spawn(serve(accepted, Arc::new(config)));
        let headers = ConnectHeaders {
            forwarded_for: [10, 244, 1, 2].into(),
            baggage: "k8s.namespace.name=shop".into(),
            traceparent: "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00".into(),
        };
        Self {
            client_id,
            server_id,
            client_cert,
            dialer: MemoryDialer { to_server, dials: AtomicUsize::new(0) },
            client: Client::new(WindowBudget::new(DEFAULT_WINDOW_BUDGET)),
            roots: pki.trust().roots.clone(),
            headers,
            _trust,
        }
    }
}

#[tokio::test]
async fn hyper_serves_http1_and_http2_on_hbone_streams() {
    let Setup { client_id, server_id, client_cert, dialer, client, roots, headers, _trust } = Setup::start();
    let open = |port: u16| {
        let dst = SocketAddr::from((SERVER_IP, port));
        client.open(&dialer, &client_cert, roots.clone(), dst, &server_id, &headers)
    };

    // HTTP/1.1 on one CONNECT stream.
    let (send, recv, _slot1) = open(8080).await.unwrap();
    let (mut http1, conn) =
        hyper::client::conn::http1::handshake(TokioIo::new(H2Stream::new(send, recv))).await.unwrap();
    tokio::spawn(conn);
    let request = hyper::Request::get("/one").body(Full::new(Bytes::new())).unwrap();
    let said = body_text(http1.send_request(request).await.unwrap()).await;
    assert_eq!(said, format!("HTTP/1.1 /one from {client_id}"));

    // HTTP/2 on another, over the same pooled mTLS connection.
    let (send, recv, _slot2) = open(8081).await.unwrap();
    let io = TokioIo::new(H2Stream::new(send, recv));
    let (mut http2, conn) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await.unwrap();
    tokio::spawn(conn);
    for path in ["/two", "/three"] {
        let request = hyper::Request::get(path).body(Full::new(Bytes::new())).unwrap();
        let said = body_text(http2.send_request(request).await.unwrap()).await;
        assert_eq!(said, format!("HTTP/2.0 {path} from {client_id}"));
    }
    assert_eq!(dialer.dials.load(Ordering::Relaxed), 1, "both streams share one pooled connection");

    // The client refuses a server proving another identity; the server refuses a bad target.
    let other: SpiffeId = "spiffe://cluster.local/ns/shop/sa/other".parse().unwrap();
    let fresh = Client::new(WindowBudget::new(DEFAULT_WINDOW_BUDGET));
    let dst = SocketAddr::from((SERVER_IP, 8080));
    let e = fresh.open(&dialer, &client_cert, roots.clone(), dst, &other, &headers).await.unwrap_err();
    assert!(e.to_string().contains("server identity spiffe://cluster.local/ns/shop/sa/server"), "{e}");
    let reserved = SocketAddr::from((SERVER_IP, 15006));
    let e = client.open(&dialer, &client_cert, roots, reserved, &server_id, &headers).await.unwrap_err();
    assert_eq!(e.to_string(), "destination refused the tunnel: HTTP 400");
}

/// The client's first bytes go with the CONNECT and reach the app once the stream is answered;
/// a stream that then fails unanswered is `Interrupted` (not retried elsewhere) unless the
/// server says it never processed it.
#[tokio::test]
async fn first_bytes_ride_with_the_connect() {
    let Setup { client_id, server_id, client_cert, dialer, client, roots, headers, _trust } = Setup::start();
    let server = Peer { ip: SERVER_IP.into(), id: &server_id };
    let open = |port: u16, first: &'static [u8]| {
        let target = SocketAddr::from((SERVER_IP, port));
        let connect = Connect { target, headers: &headers, first: Bytes::from_static(first) };
        client.open_via(&dialer, &client_cert, roots.clone(), server, connect)
    };

    // The whole request went with the CONNECT; the stream carries only the answer back.
    let request = b"GET /early HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n";
    let (send, recv, _slot) = open(8080, request).await.unwrap();
    let mut stream = H2Stream::new(send, recv);
    let mut response = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut response)).await.unwrap().unwrap();
    assert!(response.starts_with("HTTP/1.1 200 OK\r\n"), "{response}");
    assert!(response.ends_with(&format!("\r\n\r\nHTTP/1.1 /early from {client_id}")), "{response}");

    // Unanswered: only a stream the server refused as unprocessed may be tried elsewhere.
    let refused = open(8098, request).await.unwrap_err();
    assert!(matches!(refused, HboneError::Http2(..)) && refused.retryable(), "{refused}");
    let interrupted = open(8099, request).await.unwrap_err();
    assert!(matches!(interrupted, HboneError::Interrupted(..)) && !interrupted.retryable(), "{interrupted}");
    assert!(interrupted.to_string().starts_with("HTTP/2 to 10.244.2.2 failed after the client's first bytes"));
    let nothing_sent = open(8099, b"").await.unwrap_err();
    assert!(matches!(nothing_sent, HboneError::Http2(..)) && nothing_sent.retryable(), "{nothing_sent}");
    assert_eq!(dialer.dials.load(Ordering::Relaxed), 1, "a reset stream leaves the connection pooled");
}
