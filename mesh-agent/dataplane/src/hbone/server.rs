//! The HBONE server: the TLS handshake of an accepted connection under the listener caps
//! ([`accept_tls`]), HTTP/2 on it with the mesh's settings, each request handed to the caller's
//! handler, and the check of a CONNECT's target. What a stream is then used for (policy,
//! dialling the app, serving HTTP on it) is the caller's.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use http::{Method, Request, Response, StatusCode};
use mesh_common::RESERVED_PORTS;

use rustls::ServerConfig;
use tokio::io::BufReader;
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;

use super::budget::WindowBudget;
use super::queue::{Metered, SendQueue};
use super::{TLS_READ_BUFFER, TLS_WRITE_BUFFER};
use crate::limits::{Limit, Limits, Load, Refusal};

/// An accepted HBONE connection's TLS, over a read buffer.
pub type HboneTls = TlsStream<BufReader<TcpStream>>;

/// Why an accepted connection did not become a TLS session.
#[derive(Debug, thiserror::Error)]
pub enum NotAccepted {
    /// Too many handshakes in progress (`--max-handshakes`).
    #[error("{0}")]
    Refused(Refusal),
    /// The client did not finish within `--hbone-handshake-timeout`.
    #[error("no TLS handshake within {0:?} (--hbone-handshake-timeout)")]
    Timeout(std::time::Duration),
    /// The handshake failed.
    #[error("{0}")]
    Failed(std::io::Error),
}

/// The TLS handshake of an HBONE connection from `source` to `pod` (its place under the
/// connection caps already held), as every 15008 does it: nothing is allocated for TLS until
/// the client has sent something (a half-open connection holds a socket and a task only), the
/// handshake then counts under `--max-handshakes` until it ends, and it must end within
/// `--hbone-handshake-timeout`. Refusals and timeouts are counted by their limit.
pub async fn accept_tls(
    tcp: TcpStream,
    tls: Arc<ServerConfig>,
    (limits, load): (&Limits, &Arc<Load>),
    source: IpAddr,
    pod: IpAddr,
) -> Result<HboneTls, NotAccepted> {
    let handshake = async {
        // Until the first byte: `readable()` would not do, as tokio reports a new socket
        // readable at once (a false positive), and a silent client would count as a handshake.
        tcp.peek(&mut [0; 1]).await.map_err(NotAccepted::Failed)?;
        let _in_progress = load.handshake(limits, source, pod).map_err(NotAccepted::Refused)?;
        TlsAcceptor::from(tls)
            .accept_with(BufReader::with_capacity(TLS_READ_BUFFER, tcp), |tls| {
                tls.set_buffer_limit(Some(TLS_WRITE_BUFFER))
            })
            .await
            .map_err(NotAccepted::Failed)
    };
    let accepted = tokio::time::timeout(limits.handshake_timeout, handshake)
        .await
        .unwrap_or(Err(NotAccepted::Timeout(limits.handshake_timeout)));
    match &accepted {
        Err(NotAccepted::Refused(refusal)) => refusal.limit().count(),
        Err(NotAccepted::Timeout(_)) => Limit::HandshakeTimeout.count(),
        _ => {}
    }
    accepted
}

/// An HTTP/2 connection that ended on an error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Http2Closed {
    /// The server closed it (a GOAWAY of ours, or a failed handshake), not the client.
    pub by_server: bool,
    /// What happened, for the flow.
    pub reason: String,
}

/// Serves HTTP/2 on an established (TLS) connection, handing each request to `on_stream`, until
/// the client closes it. A connection that ends on a protocol error (a malformed frame, too
/// many rapid resets, an oversized header block: h2 answers with GOAWAY) returns what happened,
/// for a flow record; a client that simply goes away is no error. The connection's
/// [`SendQueue`] is handed along: a handler that relays on a stream opens it there, and what it
/// sends takes room there first ([`super::stream::tcp_to_h2`] does).
pub async fn serve_h2<IO>(
    io: IO,
    windows: &Arc<WindowBudget>,
    on_stream: impl FnMut(Request<RecvStream>, h2::server::SendResponse<Bytes>, &Arc<SendQueue>),
) -> Result<(), Http2Closed>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    serve_h2_until(io, windows, on_stream, std::future::pending()).await
}

/// [`serve_h2`] that drains once `drain` completes: a graceful GOAWAY tells the client to open
/// new streams elsewhere (its pool dials a new connection), the streams already open run to
/// their end, and the connection then closes.
pub async fn serve_h2_until<IO>(
    io: IO,
    windows: &Arc<WindowBudget>,
    mut on_stream: impl FnMut(Request<RecvStream>, h2::server::SendResponse<Bytes>, &Arc<SendQueue>),
    drain: impl std::future::Future<Output = ()>,
) -> Result<(), Http2Closed>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let queue = SendQueue::new(super::queue::CONNECTION_QUEUE);
    let io = Metered::server(io, queue.clone());
    let mut connection = match super::server_settings().handshake::<_, Bytes>(io).await {
        Ok(connection) => connection,
        Err(e) => return Err(Http2Closed { by_server: true, reason: format!("HTTP/2 handshake failed: {e}") }),
    };
    // The full window while the budget has room; held until the connection ends.
    let extra = (super::CONNECTION_WINDOW - super::budget::BASE_CONNECTION_WINDOW) as usize;
    let _grant = windows.take(extra).inspect(|_| connection.set_target_window_size(super::CONNECTION_WINDOW));
    let mut drain = std::pin::pin!(drain);
    let mut draining = false;
    loop {
        let accepted = if draining {
            connection.accept().await
        } else {
            tokio::select! {
                accepted = connection.accept() => accepted,
                () = &mut drain => {
                    connection.graceful_shutdown();
                    draining = true;
                    continue;
                }
            }
        };
        match accepted {
            Some(Ok((request, respond))) => on_stream(request, respond, &queue),
            Some(Err(e)) => return connection_error(e),
            None => return Ok(()),
        }
    }
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

/// Answers a request with `status` (ending the stream unless it is 200); the stream to send on
/// after a 200.
pub fn respond_status(respond: &mut h2::server::SendResponse<Bytes>, status: StatusCode) -> Option<SendStream<Bytes>> {
    let response = Response::builder().status(status).body(()).expect("static response");
    respond.send_response(response, status != StatusCode::OK).ok()
}

/// Why a request is not an HBONE CONNECT this server takes; answered with [`BadConnect::status`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadConnect {
    /// Not a CONNECT.
    #[error("HBONE request method {0} is not CONNECT")]
    Method(Method),
    /// The authority is missing or not `ip:port`.
    #[error("CONNECT authority {0:?} is not ip:port")]
    Authority(Option<String>),
    /// The target is another address than the one the connection arrived on.
    #[error("CONNECT authority {target} is not the address the connection arrived on ({local})")]
    OtherAddress {
        /// What the CONNECT asked for.
        target: SocketAddr,
        /// Where the connection arrived.
        local: IpAddr,
    },
    /// The target port is one of the mesh's own.
    #[error("port {0} is reserved for the mesh")]
    ReservedPort(u16),
}

impl BadConnect {
    /// The status to answer: 503 for a reserved port (nothing serves it), else 400.
    pub fn status(&self) -> StatusCode {
        match self {
            BadConnect::ReservedPort(_) => StatusCode::SERVICE_UNAVAILABLE,
            _ => StatusCode::BAD_REQUEST,
        }
    }
}

/// Validates an HBONE request: a CONNECT whose authority is `<the IP the connection arrived
/// on>:<port>` with a port that is not the mesh's own.
pub fn connect_target(method: &Method, authority: Option<&str>, local_ip: IpAddr) -> Result<SocketAddr, BadConnect> {
    if method != Method::CONNECT {
        return Err(BadConnect::Method(method.clone()));
    }
    let Some(target) = authority.and_then(|a| a.parse::<SocketAddr>().ok()) else {
        return Err(BadConnect::Authority(authority.map(String::from)));
    };
    if target.ip() != local_ip {
        return Err(BadConnect::OtherAddress { target, local: local_ip });
    }
    if RESERVED_PORTS.contains(&target.port()) {
        return Err(BadConnect::ReservedPort(target.port()));
    }
    Ok(target)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    const LOCAL: [u8; 4] = [10, 244, 2, 2];

    /// A self-signed TLS server config (what is served does not matter to the accept path).
    fn any_server_config() -> Arc<ServerConfig> {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["pod".into()]).unwrap().self_signed(&key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into()),
            )
            .unwrap();
        Arc::new(config)
    }

    /// With no handshake allowed in progress, a client that connects and says nothing meets the
    /// handshake timeout (nothing was started for it), and one that speaks is refused by the
    /// cap: a handshake counts from the client's first byte, not from its connect.
    #[tokio::test]
    async fn a_handshake_counts_from_the_clients_first_byte() {
        use tokio::io::AsyncWriteExt;
        let limits = Limits { handshakes: 0, handshake_timeout: Duration::from_millis(300), ..Limits::default() };
        let load = Arc::new(Load::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let to = listener.local_addr().unwrap();
        let pod = IpAddr::from([127, 0, 0, 1]);
        let accept = |speak: bool| {
            let (listener, load, tls) = (&listener, load.clone(), any_server_config());
            async move {
                let mut client = TcpStream::connect(to).await.unwrap();
                let (tcp, peer) = listener.accept().await.unwrap();
                if speak {
                    client.write_all(b"\x16\x03\x01").await.unwrap();
                }
                accept_tls(tcp, tls, (&limits, &load), peer.ip(), pod).await.map(drop)
            }
        };
        let silent = accept(false).await;
        assert!(matches!(silent, Err(NotAccepted::Timeout(_))), "a silent client: {silent:?}");
        let speaking = accept(true).await;
        assert!(
            matches!(speaking, Err(NotAccepted::Refused(Refusal::Handshakes(0)))),
            "a client that spoke: {speaking:?}"
        );
    }

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
            let got = connect_target(&method, authority, local).map(|t| t.port()).map_err(|e| e.status().as_u16());
            assert_eq!(got, want, "{method} {authority:?}");
        }
    }

    /// Answers a request as the agent's streams do before policy: the CONNECT check, then the
    /// status it gives (200 where the agent would go on to policy and the app). Each answer is
    /// recorded as (stream id, status).
    fn answer_as_the_agent(
        answers: &std::cell::RefCell<Vec<(u32, u16)>>,
    ) -> impl FnMut(Request<RecvStream>, h2::server::SendResponse<Bytes>, &Arc<SendQueue>) + '_ {
        move |request, mut respond, _| {
            let (parts, _) = request.into_parts();
            let status = match connect_target(&parts.method, parts.uri.authority().map(|a| a.as_str()), LOCAL.into()) {
                Ok(_) => StatusCode::OK,
                Err(e) => e.status(),
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
                let windows = WindowBudget::new(64 << 20);
                let serve = serve_h2(server, &windows, answer_as_the_agent(&answers));
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
                Err(e) => {
                    prop_assert!(e.status() == StatusCode::BAD_REQUEST || e.status() == StatusCode::SERVICE_UNAVAILABLE);
                    prop_assert!(!e.to_string().is_empty());
                }
            }
        }
    }
}
