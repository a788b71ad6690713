//! The HBONE server (a pod's 15008) against requests no agent sends, end to end: a real mTLS
//! client holding a valid mesh certificate, in an unenrolled pod's netns, talks HTTP/2 to a
//! live agent. Each bad request gets the documented answer (400, 503, or a closed connection)
//! and a flow record, and the agent keeps serving everyone else. Needs root.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrymesh_testbed::h2raw;
use ferrymesh_testbed::mesh::{wait_until, ECHO_PORT, FLOW_WAIT, HTTP_PORT};
use ferrymesh_testbed::topology::in_netns;
use ferrymesh_testbed::{Pod, Topology, TopologySpec};
use http::{Method, Request, StatusCode};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

fn cluster() -> Topology {
    let spec = TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "c", 2).pod("legacy", "x", 1);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["shop/c"], Duration::from_secs(10));
    topo.serve_all();
    topo
}

/// This test is the client of the server under test and checks nothing of the server's
/// certificate (the mTLS tests do); the server still verifies ours.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A TLS 1.3 client config with ALPN h2 presenting a mesh certificate for `legacy/x`, issued by
/// the mesh's own CA.
fn client_config(topo: &Topology) -> Arc<rustls::ClientConfig> {
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(topo.ca_dir().join("root-key.pem")).unwrap()).unwrap();
    let ca = Issuer::from_ca_cert_pem(&std::fs::read_to_string(topo.ca_dir().join("root-cert.pem")).unwrap(), ca_key)
        .unwrap();
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI("spiffe://cluster.local/ns/legacy/sa/x".try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
    let cert = params.signed_by(&key, &ca).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_client_auth_cert(
            vec![cert.der().clone()],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
        )
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec()];
    Arc::new(config)
}

/// An mTLS connection from the current netns to `pod`:15008.
async fn tls_to(config: Arc<rustls::ClientConfig>, pod: &Pod) -> TlsStream<TcpStream> {
    let tcp = TcpStream::connect((pod.ip, 15008)).await.expect("connect to 15008");
    let name = ServerName::IpAddress(std::net::IpAddr::from(pod.ip).into());
    let tls = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await.expect("mTLS handshake");
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    tls
}

/// Writes the preface, SETTINGS and `frames` on a new mTLS connection from the current netns to
/// `pod`:15008, then reads until the server closes the connection (5 s at most): the frames it
/// answered, and whether it closed.
async fn raw_exchange(config: Arc<rustls::ClientConfig>, pod: &Pod, frames: &[u8]) -> (Vec<h2raw::Frame>, bool) {
    let mut tls = tls_to(config, pod).await;
    let _ = tls.write_all(&[h2raw::PREFACE, &h2raw::settings(false), frames].concat()).await;
    let mut answer = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut answer)).await.is_ok();
    (h2raw::parse_frames(&answer), closed)
}

/// `streams` CONNECTs to `pod`'s echo, each followed at once by its RST_STREAM ("rapid reset").
fn rapid_resets(pod: &Pod, streams: u32) -> Vec<u8> {
    let authority = format!("{}:{ECHO_PORT}", pod.ip);
    (0..streams)
        .flat_map(|i| [h2raw::connect(2 * i + 1, &authority), h2raw::rst_stream(2 * i + 1, h2raw::code::CANCEL)])
        .flatten()
        .collect()
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
}

/// Sends one request (no body) on a new HBONE connection from `from`'s netns to `to` and
/// returns the status the server answered.
fn status_of(topo: &Topology, from: &Pod, to: &Pod, request: Request<()>) -> StatusCode {
    let config = client_config(topo);
    in_netns(&from.netns, || {
        runtime().block_on(async {
            let tls = tls_to(config, to).await;
            let (mut sender, connection) = h2::client::handshake(tls).await.expect("h2 handshake");
            tokio::spawn(connection);
            let (response, _send) = sender.send_request(request, false).expect("send request");
            tokio::time::timeout(Duration::from_secs(5), response)
                .await
                .expect("an answer in time")
                .expect("response")
                .status()
        })
    })
}

/// The newest inbound flow of `to`'s agent from `from` matching `keep`, waiting for it
/// ([`FLOW_WAIT`]).
fn flow_of(topo: &Topology, from: &Pod, to: &Pod, what: &str, keep: impl Fn(&Value) -> bool) -> Value {
    let mut found = Value::Null;
    wait_until(FLOW_WAIT, &format!("the flow of {what}"), || {
        let flows = topo.flows(to.node);
        let hit = flows
            .into_iter()
            .rev()
            .find(|f| f["direction"] == "inbound" && f["src"]["ip"] == from.ip.to_string() && keep(f));
        found = hit.unwrap_or(Value::Null);
        !found.is_null()
    });
    found
}

/// The agents still serve a well-behaved client: a -> c across nodes, over HBONE.
fn still_healthy(topo: &Topology, after: &str) {
    let (a, c) = (topo.pod("shop", "a"), topo.pod("shop", "c"));
    assert!(topo.is_running("agent-node2"), "after {after}: the agent is running: {}", topo.log("agent-node2"));
    let body = topo.curl(a, c.ip);
    assert!(body.starts_with(&format!("client {}:", a.ip)), "after {after}: {body}");
}

#[test]
fn bad_hbone_requests_get_their_answer_and_a_flow_and_the_agent_keeps_serving() {
    let topo = cluster();
    let (c, x) = (topo.pod("shop", "c"), topo.pod("legacy", "x"));
    still_healthy(&topo, "start-up");
    let connect = |authority: String| {
        Request::builder().method(Method::CONNECT).uri(authority).body(()).expect("CONNECT request")
    };
    let cases: Vec<(&str, Request<()>, StatusCode, String)> = vec![
        (
            "a non-CONNECT request",
            Request::builder().method(Method::GET).uri(format!("https://{}:{HTTP_PORT}/", c.ip)).body(()).unwrap(),
            StatusCode::BAD_REQUEST,
            "400 HBONE request method GET is not CONNECT".into(),
        ),
        (
            "an authority IP other than the pod's",
            connect(format!("10.244.2.99:{HTTP_PORT}")),
            StatusCode::BAD_REQUEST,
            format!(
                "400 CONNECT authority 10.244.2.99:{HTTP_PORT} is not the address the connection arrived on ({})",
                c.ip
            ),
        ),
        (
            "a reserved target port",
            connect(format!("{}:15006", c.ip)),
            StatusCode::SERVICE_UNAVAILABLE,
            "503 port 15006 is reserved for the mesh".into(),
        ),
        (
            "a malformed authority",
            connect(format!("shop-c:{HTTP_PORT}")),
            StatusCode::BAD_REQUEST,
            format!("400 CONNECT authority Some(\"shop-c:{HTTP_PORT}\") is not ip:port"),
        ),
    ];
    for (what, request, want, reason) in cases {
        assert_eq!(status_of(&topo, x, c, request), want, "{what}");
        let flow = flow_of(&topo, x, c, what, |f| f["reason"] == reason.as_str());
        assert_eq!((flow["verdict"].as_str(), flow["mtls"].as_bool()), (Some("error"), Some(true)), "{what}: {flow}");
        assert_eq!(flow["src"]["identity"], "spiffe://cluster.local/ns/legacy/sa/x", "{what}: {flow}");
        still_healthy(&topo, what);
    }

    // A stream reset mid-transfer: the echo answered, then the client resets the stream. The
    // agent closes the app's side and records how the stream ended, with the bytes it carried.
    let config = client_config(&topo);
    in_netns(&x.netns, || {
        runtime().block_on(async {
            let tls = tls_to(config, c).await;
            let (mut sender, mut connection) = h2::client::handshake(tls).await.expect("h2 handshake");
            let mut ping_pong = connection.ping_pong().expect("ping_pong is taken once");
            tokio::spawn(connection);
            let request = connect(format!("{}:{ECHO_PORT}", c.ip));
            let (response, mut send) = sender.send_request(request, false).expect("CONNECT");
            let response = response.await.expect("response");
            assert_eq!(response.status(), StatusCode::OK);
            let mut body = response.into_body();
            send.send_data(Bytes::from_static(b"hello\n"), false).expect("send");
            let echoed = tokio::time::timeout(Duration::from_secs(5), body.data()).await.expect("the echo in time");
            assert_eq!(echoed.expect("data").expect("data"), Bytes::from_static(b"hello\n"));
            send.send_reset(h2::Reason::CANCEL);
            // The PONG comes after the server has read everything sent before the PING.
            ping_pong.ping(h2::Ping::opaque()).await.expect("PONG: the server has read the reset");
        })
    });
    let flow = flow_of(&topo, x, c, "the reset stream", |f| f["dst"]["port"] == ECHO_PORT);
    assert_eq!(flow["verdict"], "error", "{flow}");
    assert!(flow["reason"].as_str().unwrap().starts_with("connection aborted: HBONE stream reset"), "{flow}");
    assert_eq!((flow["bytes_sent"].as_u64(), flow["bytes_received"].as_u64()), (Some(6), Some(6)), "{flow}");
    still_healthy(&topo, "a stream reset mid-transfer");

    // Rapid reset: 200 CONNECT streams, each reset at once, in one burst. The server closes the
    // connection with GOAWAY ENHANCE_YOUR_CALM and records it.
    let config = client_config(&topo);
    let (frames, closed) = in_netns(&x.netns, || runtime().block_on(raw_exchange(config, c, &rapid_resets(c, 200))));
    assert!(closed, "the server closes the connection: {frames:?}");
    assert_eq!(h2raw::goaway_code(&frames), Some(h2raw::code::ENHANCE_YOUR_CALM), "{frames:?}");
    let flow = flow_of(&topo, x, c, "the rapid resets", |f| {
        f["reason"].as_str().unwrap().starts_with("HTTP/2 connection closed by the server: ENHANCE_YOUR_CALM")
    });
    assert_eq!((flow["verdict"].as_str(), flow["dst"]["port"].as_u64()), (Some("error"), Some(15008)), "{flow}");
    still_healthy(&topo, "a rapid-reset burst");
}

/// Resident memory of `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    ferrymesh_testbed::topology::rss_kib(pid).expect("the process is running")
}

/// The agent of node 2's metrics, read by the strict parser.
fn node2_metrics(topo: &Topology) -> ferrymesh_testbed::prom::Exposition {
    ferrymesh_testbed::prom::parse(&topo.metrics_text(&topo.nodes[1].netns)).expect("valid Prometheus text")
}

fn refused(topo: &Topology, limit: &str) -> f64 {
    node2_metrics(topo).sum("ferrymesh_inbound_refused_total", &[("limit", limit)])
}

/// Round trips of a well-behaved client (a -> c's echo, across nodes over HBONE) while `flood`
/// runs on another thread: they must all succeed. Returns the flood's result and the client's
/// p50 and p99 (µs) over every run made meanwhile.
fn served_during<T: Send>(topo: &Topology, flood: impl FnOnce() -> T + Send) -> (T, f64, f64) {
    let (a, c) = (topo.pod("shop", "a"), topo.pod("shop", "c"));
    let to = format!("{}:{ECHO_PORT}", c.ip);
    let done = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let flooding = scope.spawn(|| {
            let result = flood();
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            result
        });
        let mut runs: Vec<(f64, f64)> = Vec::new();
        while !done.load(std::sync::atomic::Ordering::SeqCst) || runs.is_empty() {
            let out = topo.output_in(
                &a.netns,
                ferrymesh_testbed::mesh::bin("fm-peer"),
                &["rr", "--to", &to, "--count", "50"],
            );
            assert!(out.status.success(), "the well-behaved client failed: {}", String::from_utf8_lossy(&out.stderr));
            let rr: Value = serde_json::from_slice(&out.stdout).unwrap();
            runs.push((rr["p50_us"].as_f64().unwrap(), rr["p99_us"].as_f64().unwrap()));
        }
        let result = flooding.join().unwrap();
        let worst = |f: fn(&(f64, f64)) -> f64| runs.iter().map(f).fold(0.0, f64::max);
        (result, worst(|r| r.0), worst(|r| r.1))
    })
}

/// How much the victim agent's memory may grow under each flood (docs/SECURITY.md).
const FLOOD_RSS_BOUND_KIB: u64 = 64 * 1024;

#[test]
fn floods_are_refused_by_their_limits_while_others_are_served() {
    let topo = Topology::build(&TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "c", 2).pod("legacy", "x", 1));
    topo.write_cluster(&["shop"]);
    topo.start_ctrl(&[]);
    topo.start_agent(1);
    topo.start_agent_with(2, &[("--hbone-handshake-timeout", "2s")]);
    topo.wait_enrolled(1, &["shop/a"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["shop/c"], Duration::from_secs(10));
    topo.serve_all();
    let (c, x) = (topo.pod("shop", "c"), topo.pod("legacy", "x"));
    let victim = topo.pid("agent-node2").unwrap();
    let ((), p50, p99) = served_during(&topo, || ());
    println!("baseline: well-behaved client p50 {p50:.0} us, p99 {p99:.0} us");
    let rss_before = rss_kib(victim);

    // 2000 half-open connections from x to c's 15008: 512 are held (then time out), the rest
    // refused at once.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let (opened_tx, opened) = std::sync::mpsc::channel();
    let netns = x.netns.clone();
    let target = std::net::SocketAddr::from((c.ip, 15008));
    let holder = std::thread::spawn(move || {
        in_netns(&netns, move || {
            let mut held = Vec::new();
            // A connection the agent refuses so fast that the reset beats connect()'s return
            // fails here with ECONNRESET: it was part of the flood all the same.
            let mut reset = 0;
            for _ in 0..2000 {
                match std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                    Ok(stream) => held.push(stream),
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => reset += 1,
                    Err(e) => panic!("connect to {target}: {e}"),
                }
            }
            opened_tx.send(held.len() + reset).unwrap();
            let _ = rx.recv_timeout(Duration::from_secs(30));
        })
    });
    let opened = opened.recv_timeout(Duration::from_secs(60)).expect("the flood opened its connections");
    assert_eq!(opened, 2000, "every connection reached the agent");
    let ((), p50, p99) = served_during(&topo, || std::thread::sleep(Duration::from_millis(500)));
    println!("2000 half-open connections: well-behaved client p50 {p50:.0} us, p99 {p99:.0} us");
    let rss = rss_kib(victim);
    println!("victim agent RSS {rss_before} KiB before, {rss} KiB during");
    assert!(rss < rss_before + FLOOD_RSS_BOUND_KIB, "RSS grew from {rss_before} to {rss} KiB");
    wait_until(FLOW_WAIT, "the refusals to be counted", || refused(&topo, "connections_per_source") >= 1488.0);
    // Silent connections hold no handshake (tokio's first readiness is a false positive: the
    // agent waits for a byte), so none was refused by --max-handshakes (256).
    assert_eq!(refused(&topo, "handshakes"), 0.0, "half-open connections counted as handshakes");
    let limit_reason = format!("refused: 512 connections already open from {} (--max-connections-per-source)", x.ip);
    flow_of(&topo, x, c, "a refused half-open connection", |f| f["reason"] == limit_reason.as_str());
    // The 512 held ones never send a ClientHello: each is closed at the handshake timeout.
    wait_until(Duration::from_secs(2) + FLOW_WAIT, "the held ones to time out", || {
        refused(&topo, "handshake_timeout") >= 512.0
    });
    flow_of(&topo, x, c, "a timed-out handshake", |f| {
        f["reason"] == "TLS handshake did not finish within 2s (--hbone-handshake-timeout)"
    });
    tx.send(()).unwrap();
    holder.join().unwrap();
    still_healthy(&topo, "the half-open flood");

    // 10k CONNECT streams, each reset at once, in bursts of 100 per connection: every
    // connection is closed with GOAWAY ENHANCE_YOUR_CALM.
    let config = client_config(&topo);
    let rss_before = rss_kib(victim);
    let (goaways, p50, p99) = served_during(&topo, || {
        in_netns(&x.netns, || {
            runtime().block_on(async {
                let (burst, mut goaways) = (rapid_resets(c, 100), 0);
                for _ in 0..100 {
                    let (frames, _) = raw_exchange(config.clone(), c, &burst).await;
                    goaways += usize::from(h2raw::goaway_code(&frames) == Some(h2raw::code::ENHANCE_YOUR_CALM));
                }
                goaways
            })
        })
    });
    println!("10k rapid resets: well-behaved client p50 {p50:.0} us, p99 {p99:.0} us; RSS {} KiB", rss_kib(victim));
    assert_eq!(goaways, 100, "every rapid-reset connection was closed with ENHANCE_YOUR_CALM");
    assert!(rss_kib(victim) < rss_before + FLOOD_RSS_BOUND_KIB);
    wait_until(FLOW_WAIT, "the GOAWAYs to be counted", || refused(&topo, "http2_protocol") >= 100.0);
    still_healthy(&topo, "the rapid-reset flood");

    // A 1 MB header block (HEADERS and CONTINUATION frames of 16 KiB): refused, not buffered.
    let config = client_config(&topo);
    let rss_before = rss_kib(victim);
    let before = refused(&topo, "http2_protocol");
    let (answer, p50, p99) = served_during(&topo, || {
        in_netns(&x.netns, || {
            runtime().block_on(async {
                let big = "x".repeat(1_000_000);
                let authority = format!("{}:{ECHO_PORT}", c.ip);
                let block = h2raw::header_block(&[(":method", "CONNECT"), (":authority", &authority), ("x-big", &big)]);
                let chunks: Vec<&[u8]> = block.chunks(16 * 1024).collect();
                let mut frames = Vec::new();
                for (i, chunk) in chunks.iter().enumerate() {
                    let kind = if i == 0 { h2raw::kind::HEADERS } else { h2raw::kind::CONTINUATION };
                    let flags = if i + 1 == chunks.len() { h2raw::flag::END_HEADERS } else { 0 };
                    frames.extend(h2raw::frame(kind, flags, 1, chunk));
                }
                raw_exchange(config, c, &frames).await.0
            })
        })
    });
    println!("1 MB header block: well-behaved client p50 {p50:.0} us, p99 {p99:.0} us; answer {answer:?}");
    assert!(rss_kib(victim) < rss_before + FLOOD_RSS_BOUND_KIB);
    assert!(
        !answer.iter().any(|f| f.kind == h2raw::kind::HEADERS && f.payload.first() == Some(&0x88)),
        "no 200 for a 1 MB header block"
    );
    wait_until(FLOW_WAIT, "the refusal to be counted", || refused(&topo, "http2_protocol") > before);
    still_healthy(&topo, "the 1 MB header block");
}
