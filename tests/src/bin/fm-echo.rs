//! fm-echo: the HTTP backend of the waypoint tests, in the manner of Gateway API's conformance
//! echo server.
//!
//! `serve` answers every HTTP/1.1 or HTTP/2 (prior knowledge) request with a JSON body naming
//! the pod that answered and the request as it arrived (method, path with query, host, headers,
//! protocol, body length), echoes WebSocket messages on any path that asks to upgrade, and
//! switches to HTTP/2 on an `h2c` upgrade without insisting on `HTTP2-Settings` (a lax server).
//! `ws` is a WebSocket client: it sends numbered text messages and checks each echo, printing
//! JSON. `grpc-serve` is a gRPC server (tonic) of one unary method, `ferrymesh.test.Echo/Echo`,
//! answering with the pod's name and the request's metadata; `grpc` calls it `count` times on
//! one channel and prints which pods answered, the last answer's metadata, the call rate and
//! latency percentiles, as JSON. `load` is an open-loop HTTP load generator (a fixed request
//! rate over kept-alive connections), printing the achieved rate and latency percentiles.
//! `rls-serve` is a small rate-limit service speaking Envoy's protocol
//! (`envoy.service.ratelimit.v3.RateLimitService`), for the waypoint's global limits.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;

use clap::{Parser, Subcommand};
use ferrymesh_api::{otlp, ratelimit};
use futures::{SinkExt, StreamExt};
use http::{header, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::{Bytes, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

#[derive(Parser)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve HTTP echo on `port` as pod `pod` of `namespace`; prints "ready" once listening.
    /// Request headers steer the answer: `x-echo-delay-ms: N` answers N ms late,
    /// `x-echo-status: S` with status S, `x-echo-fail-every: N` with a 503 for every Nth such
    /// request this server sees, `x-echo-fail-pod: P` with a 500 when this server is pod P,
    /// `x-echo-bytes: N` with N zero bytes (at most 1 MiB) in place of the echo.
    Serve {
        #[arg(long, default_value_t = 8081)]
        port: u16,
        #[arg(long)]
        pod: String,
        #[arg(long)]
        namespace: String,
        /// Also print each answer (the JSON it echoes) as a line, for tests to see what arrived.
        #[arg(long)]
        log_requests: bool,
    },
    /// Serve gRPC `ferrymesh.test.Echo/Echo` on `port` as pod `pod`; prints "ready".
    GrpcServe {
        #[arg(long, default_value_t = 9090)]
        port: u16,
        #[arg(long)]
        pod: String,
    },
    /// Call `ferrymesh.test.Echo/Echo` on `to` `count` times over one channel.
    Grpc {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value_t = 1)]
        count: u32,
    },
    /// Open-loop HTTP load on `to`: `rate` requests a second over `connections` for `seconds`.
    Load {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "/")]
        path: String,
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        #[arg(long, default_value_t = 5)]
        seconds: u32,
        #[arg(long, default_value_t = 10)]
        connections: u32,
        /// HTTP/2 with prior knowledge instead of HTTP/1.1.
        #[arg(long)]
        h2: bool,
    },
    /// Serve Envoy's rate-limit service on `listen`: each descriptor with a limit override is
    /// counted in fixed windows of the override's unit (a window starts at its first hit), by
    /// domain and entries; one without an override is under no limit. Prints "ready", then
    /// each check as a JSON line (with the caller's address, `from`).
    RlsServe {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Serve OTLP/gRPC for traces (`opentelemetry.proto.collector.trace.v1.TraceService`) on
    /// `listen`; prints "ready", then each span received as a JSON line (ids in hex, the
    /// resource's `service.name` as `service`, string and integer attributes). The in-test
    /// tracing collector.
    OtlpServe {
        #[arg(long)]
        listen: SocketAddr,
    },
    /// Serve the content of `file` (read again for each request, so a test can change it) to
    /// every GET on `listen`, as JSON; prints "ready", then each request as a JSON line (the
    /// caller's address, `from`, and the path). The in-test JWKS server.
    FileServe {
        #[arg(long)]
        listen: SocketAddr,
        #[arg(long)]
        file: std::path::PathBuf,
    },
    /// Send `messages` WebSocket text messages to ws://`to``path` and check each echo.
    Ws {
        #[arg(long)]
        to: SocketAddr,
        #[arg(long, default_value = "/ws")]
        path: String,
        #[arg(long, default_value_t = 10)]
        messages: u32,
    },
}

fn main() {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let result = match cli.command {
        Command::Serve { port, pod, namespace, log_requests } => {
            runtime.block_on(serve(port, pod, namespace, log_requests))
        }
        Command::Ws { to, path, messages } => runtime.block_on(ws(to, &path, messages)),
        Command::GrpcServe { port, pod } => runtime.block_on(grpc_serve(port, pod)),
        Command::Grpc { to, count } => runtime.block_on(grpc(to, count)),
        Command::RlsServe { listen } => runtime.block_on(rls_serve(listen)),
        Command::FileServe { listen, file } => runtime.block_on(file_serve(listen, file)),
        Command::OtlpServe { listen } => runtime.block_on(otlp_serve(listen)),
        Command::Load { to, path, rate, seconds, connections, h2 } => {
            runtime.block_on(load(to, path, rate, seconds, connections, h2))
        }
    };
    if let Err(e) = result {
        eprintln!("fm-echo: {e}");
        std::process::exit(1);
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn serve(port: u16, pod: String, namespace: String, log_requests: bool) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    println!("ready");
    let who = std::sync::Arc::new((pod, namespace, log_requests));
    loop {
        let (stream, _) = listener.accept().await?;
        let who = who.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request| answer(request, who.clone()));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection_with_upgrades(TokioIo::new(stream), service).await;
        });
    }
}

/// A request that came over an h2c upgrade: echoed (pod, method, path, protocol) and logged as
/// [`answer`] does.
async fn h2c_answer(
    request: Request<Incoming>,
    who: std::sync::Arc<(String, String, bool)>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let body = json!({
        "pod": who.0,
        "namespace": who.1,
        "method": request.method().as_str(),
        "path": request.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "protocol": format!("{:?}", request.version()),
        "headers": {},
        "upgraded": "h2c",
    });
    if who.2 {
        println!("{body}");
    }
    Ok(Response::new(Full::new(Bytes::from(body.to_string()))))
}

async fn answer(
    mut request: Request<Incoming>,
    who: std::sync::Arc<(String, String, bool)>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let upgrade_to = |request: &Request<Incoming>, protocol: &[u8]| {
        request.headers().get(header::UPGRADE).is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(protocol))
    };
    if upgrade_to(&request, b"h2c") {
        // A lax h2c server (it does not insist on HTTP2-Settings): switches, then serves HTTP/2
        // on the connection, so whatever upgrades it carries requests a proxy never parsed.
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let service = hyper::service::service_fn(move |request| h2c_answer(request, who.clone()));
                let builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                let _ = builder.serve_connection(upgraded, service).await;
            }
        });
        let response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "h2c")
            .body(Full::default())
            .expect("101 response");
        return Ok(response);
    }
    let websocket = upgrade_to(&request, b"websocket");
    if let (true, Some(key)) = (websocket, request.headers().get("sec-websocket-key").cloned()) {
        let upgrade = hyper::upgrade::on(&mut request);
        tokio::spawn(async move {
            if let Ok(upgraded) = upgrade.await {
                let mut socket = WebSocketStream::from_raw_socket(TokioIo::new(upgraded), Role::Server, None).await;
                while let Some(Ok(message)) = socket.next().await {
                    if message.is_close() || socket.send(message).await.is_err() {
                        break;
                    }
                }
            }
        });
        let response = Response::builder()
            .status(StatusCode::SWITCHING_PROTOCOLS)
            .header(header::CONNECTION, "upgrade")
            .header(header::UPGRADE, "websocket")
            .header("sec-websocket-accept", derive_accept_key(key.as_bytes()))
            .body(Full::default())
            .expect("101 response");
        return Ok(response);
    }
    let (parts, body) = request.into_parts();
    let body_bytes = body.collect().await.map(|b| b.to_bytes().len()).unwrap_or(0);
    // Test knobs, by request header: answer late, answer a status, fail every Nth request
    // carrying the header with a 503 (counted by this server), answer bytes.
    let knob = |name: &str| parts.headers.get(name).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    if let Some(ms) = knob("x-echo-delay-ms") {
        tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
    }
    let mut status = knob("x-echo-status").and_then(|s| StatusCode::from_u16(u16::try_from(s).ok()?).ok());
    if let Some(n) = knob("x-echo-fail-every").filter(|n| *n > 0) {
        static SEEN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        if (SEEN.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1).is_multiple_of(n) {
            status = Some(StatusCode::SERVICE_UNAVAILABLE);
        }
    }
    if parts.headers.get("x-echo-fail-pod").is_some_and(|p| p.as_bytes() == who.0.as_bytes()) {
        status = Some(StatusCode::INTERNAL_SERVER_ERROR);
    }
    // `x-echo-bytes: N` answers N zero bytes (up to 1 MiB) instead of the echo: an answer large
    // enough to back up toward a client that does not read it.
    if let Some(n) = knob("x-echo-bytes") {
        static ZEROS: [u8; 1 << 20] = [0; 1 << 20];
        let n = usize::try_from(n).unwrap_or(ZEROS.len()).min(ZEROS.len());
        let response = Response::builder()
            .status(status.unwrap_or(StatusCode::OK))
            .body(Full::new(Bytes::from_static(&ZEROS[..n])))
            .expect("bytes response");
        return Ok(response);
    }
    let mut headers: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in &parts.headers {
        headers.entry(name.to_string()).or_default().push(String::from_utf8_lossy(value.as_bytes()).into_owned());
    }
    let host = parts
        .uri
        .authority()
        .map(|a| a.to_string())
        .or_else(|| parts.headers.get(header::HOST).map(|h| String::from_utf8_lossy(h.as_bytes()).into_owned()))
        .unwrap_or_default();
    // An instrumented application calling another Service: `x-echo-call: HOST:PORT/PATH` makes
    // one GET there, with a traceparent whose parent is this server's own span (a child of the
    // request's, in its trace), as an OpenTelemetry SDK would send it.
    let called = match parts.headers.get("x-echo-call").and_then(|v| v.to_str().ok()) {
        Some(target) => Some(call_traced(target, parts.headers.get("traceparent")).await),
        None => None,
    };
    let body = json!({
        "called": called,
        "pod": who.0,
        "namespace": who.1,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "host": host,
        "protocol": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    if who.2 {
        println!("{body}");
    }
    let response = Response::builder()
        .status(status.unwrap_or(StatusCode::OK))
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("echo response");
    Ok(response)
}

/// One GET of `target` (`HOST:PORT/PATH`) over a fresh connection, carrying a child of
/// `traceparent` (a new span id in its trace); what was sent and the status answered.
async fn call_traced(target: &str, traceparent: Option<&http::HeaderValue>) -> serde_json::Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (addr, path) = target.split_once('/').map_or((target, "/".to_string()), |(a, p)| (a, format!("/{p}")));
    let child = traceparent.and_then(|v| v.to_str().ok()).and_then(|v| {
        let fields: Vec<&str> = v.split('-').collect();
        let span: u64 = rand::random::<u64>() | 1;
        (fields.len() == 4).then(|| format!("{}-{}-{span:016x}-{}", fields[0], fields[1], fields[3]))
    });
    let mut request = format!("GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n");
    if let Some(child) = &child {
        request.push_str(&format!("traceparent: {child}\r\n"));
    }
    request.push_str("\r\n");
    let answer = async {
        let mut stream = tokio::net::TcpStream::connect(addr).await?;
        stream.write_all(request.as_bytes()).await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        Ok::<_, std::io::Error>(String::from_utf8_lossy(&response).into_owned())
    };
    let status = match tokio::time::timeout(std::time::Duration::from_secs(10), answer).await {
        Ok(Ok(text)) => text.split_whitespace().nth(1).and_then(|s| s.parse::<u16>().ok()).unwrap_or(0),
        _ => 0,
    };
    json!({"to": target, "traceparent": child, "status": status})
}

async fn ws(to: SocketAddr, path: &str, messages: u32) -> Result<(), BoxError> {
    let stream = tokio::net::TcpStream::connect(to).await?;
    let (mut socket, response) = tokio_tungstenite::client_async(format!("ws://{to}{path}"), stream).await?;
    let mut echoed = 0;
    for i in 0..messages {
        let text = format!("message {i}");
        socket.send(Message::text(text.clone())).await?;
        match socket.next().await {
            Some(Ok(Message::Text(back))) if back.as_str() == text => echoed += 1,
            other => return Err(format!("message {i}: expected its echo, got {other:?}").into()),
        }
    }
    socket.close(None).await?;
    println!("{}", json!({ "status": response.status().as_u16(), "echoed": echoed }));
    Ok(())
}

/// The request of `ferrymesh.test.Echo/Echo`.
#[derive(Clone, PartialEq, prost::Message)]
struct EchoRequest {
    #[prost(string, tag = "1")]
    message: String,
}

/// Its answer: who answered, and the metadata the request arrived with.
#[derive(Clone, PartialEq, prost::Message)]
struct EchoReply {
    #[prost(string, tag = "1")]
    pod: String,
    #[prost(map = "string, string", tag = "2")]
    metadata: std::collections::HashMap<String, String>,
}

const ECHO_PATH: &str = "/ferrymesh.test.Echo/Echo";

/// The Echo service, as generated code would route it.
#[derive(Clone)]
struct EchoService(std::sync::Arc<String>);

impl tonic::server::NamedService for EchoService {
    const NAME: &'static str = "ferrymesh.test.Echo";
}

impl tower::Service<http::Request<tonic::body::Body>> for EchoService {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let pod = self.0.clone();
        Box::pin(async move {
            if request.uri().path() != ECHO_PATH {
                return Ok(tonic::Status::unimplemented(request.uri().path().to_string()).into_http());
            }
            let handler = tower::service_fn(move |request: tonic::Request<EchoRequest>| {
                let pod = pod.clone();
                async move {
                    let metadata = request
                        .metadata()
                        .iter()
                        .filter_map(|entry| match entry {
                            tonic::metadata::KeyAndValueRef::Ascii(k, v) => {
                                Some((k.to_string(), v.to_str().unwrap_or_default().to_string()))
                            }
                            _ => None,
                        })
                        .collect();
                    Ok::<_, tonic::Status>(tonic::Response::new(EchoReply { pod: pod.to_string(), metadata }))
                }
            });
            let mut grpc = tonic::server::Grpc::new(tonic_prost::ProstCodec::default());
            Ok(grpc.unary(handler, request).await)
        })
    }
}

async fn grpc_serve(port: u16, pod: String) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    println!("ready");
    tonic::transport::Server::builder()
        .add_service(EchoService(std::sync::Arc::new(pod)))
        .serve_with_incoming(tokio_stream_of(listener))
        .await?;
    Ok(())
}

/// The rate-limit service's counts: by key, the window's start and the hits in it.
#[derive(Default)]
struct RateLimitCounts(std::sync::Mutex<std::collections::HashMap<String, (std::time::Instant, u64)>>);

#[tonic::async_trait]
impl ratelimit::rate_limit_service_server::RateLimitService for RateLimitCounts {
    async fn should_rate_limit(
        &self,
        request: tonic::Request<ratelimit::RateLimitRequest>,
    ) -> Result<tonic::Response<ratelimit::RateLimitResponse>, tonic::Status> {
        use ratelimit::rate_limit_response::{Code, DescriptorStatus};
        let from = request.remote_addr().map(|a| a.ip().to_string());
        let request = request.into_inner();
        let hits = u64::from(request.hits_addend.max(1));
        let now = std::time::Instant::now();
        let mut statuses = Vec::new();
        let mut logged = Vec::new();
        let mut counts = self.0.lock().expect("counts lock");
        for d in &request.descriptors {
            let entries: Vec<(String, String)> = d.entries.iter().map(|e| (e.key.clone(), e.value.clone())).collect();
            let limit = d.limit.as_ref().map(|l| (l.requests_per_unit, l.unit));
            logged.push(json!({"entries": entries, "limit": limit}));
            let Some((allowed, unit)) = limit else {
                statuses.push(DescriptorStatus { code: Code::Ok as i32, ..Default::default() });
                continue;
            };
            let window = std::time::Duration::from_secs(match unit {
                1 => 1,
                2 => 60,
                3 => 3600,
                4 => 86_400,
                other => return Err(tonic::Status::invalid_argument(format!("unit {other}"))),
            });
            let key = format!("{}|{entries:?}", request.domain);
            let count = counts.entry(key).or_insert((now, 0));
            if now.duration_since(count.0) >= window {
                *count = (now, 0);
            }
            count.1 += d.hits_addend.unwrap_or(hits);
            let code = if count.1 > u64::from(allowed) { Code::OverLimit } else { Code::Ok };
            let reset = window.saturating_sub(now.duration_since(count.0));
            statuses.push(DescriptorStatus {
                code: code as i32,
                limit_remaining: u32::try_from(u64::from(allowed).saturating_sub(count.1)).unwrap_or(0),
                duration_until_reset: prost_types::Duration::try_from(reset).ok(),
                ..Default::default()
            });
        }
        drop(counts);
        let over = statuses.iter().any(|s| s.code == Code::OverLimit as i32);
        let overall = if over { Code::OverLimit } else { Code::Ok };
        println!(
            "{}",
            json!({"from": from, "domain": request.domain, "descriptors": logged, "code": overall.as_str_name()})
        );
        let response_headers_to_add = if over {
            vec![ferrymesh_api::envoy::config::core::v3::HeaderValue {
                key: "x-ratelimit-remaining".into(),
                value: "0".into(),
                raw_value: Vec::new(),
            }]
        } else {
            Vec::new()
        };
        Ok(tonic::Response::new(ratelimit::RateLimitResponse {
            overall_code: overall as i32,
            statuses,
            response_headers_to_add,
            request_headers_to_add: Vec::new(),
        }))
    }
}

async fn rls_serve(listen: SocketAddr) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("ready");
    tonic::transport::Server::builder()
        .add_service(ratelimit::rate_limit_service_server::RateLimitServiceServer::new(RateLimitCounts::default()))
        .serve_with_incoming(tokio_stream_of(listener))
        .await?;
    Ok(())
}

/// The in-test OTLP collector: prints the spans it receives.
struct SpanPrinter;

#[tonic::async_trait]
impl otlp::collector::trace_service_server::TraceService for SpanPrinter {
    async fn export(
        &self,
        request: tonic::Request<otlp::collector::ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<otlp::collector::ExportTraceServiceResponse>, tonic::Status> {
        use otlp::common::any_value::Value;
        let hex = |b: &[u8]| b.iter().map(|x| format!("{x:02x}")).collect::<String>();
        for resource_spans in request.into_inner().resource_spans {
            let resource = resource_spans.resource.unwrap_or_default();
            let service = resource.attributes.iter().find(|a| a.key == "service.name").and_then(|a| {
                match a.value.as_ref()?.value.as_ref()? {
                    Value::StringValue(s) => Some(s.clone()),
                    _ => None,
                }
            });
            for span in resource_spans.scope_spans.into_iter().flat_map(|s| s.spans) {
                let attributes: serde_json::Map<String, serde_json::Value> = span
                    .attributes
                    .iter()
                    .filter_map(|a| {
                        let value = match a.value.as_ref()?.value.as_ref()? {
                            Value::StringValue(s) => json!(s),
                            Value::IntValue(i) => json!(i),
                            Value::BoolValue(b) => json!(b),
                            Value::DoubleValue(d) => json!(d),
                            Value::BytesValue(b) => json!(hex(b)),
                        };
                        Some((a.key.clone(), value))
                    })
                    .collect();
                let line = json!({
                    "service": service,
                    "trace_id": hex(&span.trace_id),
                    "span_id": hex(&span.span_id),
                    "parent_span_id": hex(&span.parent_span_id),
                    "trace_state": span.trace_state,
                    "flags": span.flags,
                    "name": span.name,
                    "kind": span.kind,
                    "start": span.start_time_unix_nano,
                    "end": span.end_time_unix_nano,
                    "status": span.status.map(|s| s.code),
                    "attributes": attributes,
                });
                println!("{line}");
            }
        }
        Ok(tonic::Response::new(otlp::collector::ExportTraceServiceResponse::default()))
    }
}

async fn otlp_serve(listen: SocketAddr) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("ready");
    tonic::transport::Server::builder()
        .add_service(otlp::collector::trace_service_server::TraceServiceServer::new(SpanPrinter))
        .serve_with_incoming(tokio_stream_of(listener))
        .await?;
    Ok(())
}

async fn file_serve(listen: SocketAddr, file: std::path::PathBuf) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("ready");
    let file = std::sync::Arc::new(file);
    loop {
        let (stream, from) = listener.accept().await?;
        let file = file.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                let file = file.clone();
                async move {
                    println!("{}", serde_json::json!({"from": from.to_string(), "path": request.uri().path()}));
                    let response = match std::fs::read(&*file) {
                        Ok(content) => Response::builder()
                            .header(header::CONTENT_TYPE, "application/json")
                            .body(Full::new(Bytes::from(content))),
                        Err(_) => Response::builder().status(StatusCode::NOT_FOUND).body(Full::default()),
                    };
                    Ok::<_, Infallible>(response.expect("file response"))
                }
            });
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let _ = builder.serve_connection(TokioIo::new(stream), service).await;
        });
    }
}

/// The accepted connections of `listener`, as tonic takes them.
fn tokio_stream_of(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}

async fn grpc(to: SocketAddr, count: u32) -> Result<(), BoxError> {
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{to}"))?.connect().await?;
    let mut client = tonic::client::Grpc::new(channel);
    let mut pods: BTreeMap<String, u32> = BTreeMap::new();
    let mut metadata = std::collections::HashMap::new();
    let mut latencies = Vec::with_capacity(count as usize);
    let started = std::time::Instant::now();
    for i in 0..count {
        let call = std::time::Instant::now();
        client.ready().await?;
        let request = tonic::Request::new(EchoRequest { message: format!("call {i}") });
        let path = http::uri::PathAndQuery::from_static(ECHO_PATH);
        let codec = tonic_prost::ProstCodec::<EchoRequest, EchoReply>::default();
        let reply = client.unary(request, path, codec).await?.into_inner();
        latencies.push(call.elapsed().as_secs_f64() * 1e6);
        *pods.entry(reply.pod).or_default() += 1;
        metadata = reply.metadata;
    }
    let rate = f64::from(count) / started.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
    let (p50, p99) = (pct(0.5), pct(0.99));
    println!(
        "{}",
        json!({ "ok": count, "pods": pods, "metadata": metadata, "rate": rate, "p50_us": p50, "p99_us": p99 })
    );
    Ok(())
}

/// Open-loop load: `rate` requests a second spread over `connections` kept-alive connections
/// (HTTP/1.1, or HTTP/2 prior knowledge with one connection each), for `seconds`; prints the
/// achieved rate, failures and latency percentiles (µs, from sending to the end of the
/// response) as JSON. Each connection sends its share on a fixed schedule, the connections'
/// schedules staggered evenly over one interval so requests arrive spread out rather than in
/// bursts of `connections`; a late response delays that connection's next request, and the
/// achieved rate shows it.
async fn load(
    to: SocketAddr,
    path: String,
    rate: u32,
    seconds: u32,
    connections: u32,
    h2: bool,
) -> Result<(), BoxError> {
    let per_connection = f64::from(rate) / f64::from(connections.max(1));
    let interval = std::time::Duration::from_secs_f64(1.0 / per_connection);
    let total_per_connection = (per_connection * f64::from(seconds)).round() as u64;
    // Time for every connection to be set up before the first request.
    let start = tokio::time::Instant::now() + std::time::Duration::from_millis(200);
    let mut tasks = Vec::new();
    for k in 0..connections {
        let path = path.clone();
        let schedule = start + interval.mul_f64(f64::from(k) / f64::from(connections.max(1)));
        tasks.push(tokio::spawn(async move {
            let stream = tokio::net::TcpStream::connect(to).await?;
            stream.set_nodelay(true)?;
            let io = TokioIo::new(stream);
            let mut latencies = Vec::with_capacity(total_per_connection as usize);
            let mut failed = 0u64;
            let request = || {
                Request::builder()
                    .uri(format!("http://{to}{path}"))
                    .header(header::HOST, to.to_string())
                    .body(http_body_util::Empty::<Bytes>::new())
                    .expect("request")
            };
            let mut sender = if h2 {
                let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io).await?;
                tokio::spawn(connection);
                Sender::H2(sender)
            } else {
                let (sender, connection) = hyper::client::conn::http1::handshake(io).await?;
                tokio::spawn(connection);
                Sender::H1(sender)
            };
            for i in 0..total_per_connection {
                tokio::time::sleep_until(schedule + interval.mul_f64(i as f64)).await;
                let sent = std::time::Instant::now();
                match sender.send(request()).await {
                    Ok(response) if response.status().is_success() => {
                        let _ = response.into_body().collect().await;
                        latencies.push(sent.elapsed().as_secs_f64() * 1e6);
                    }
                    _ => failed += 1,
                }
            }
            Ok::<_, BoxError>((latencies, failed))
        }));
    }
    let mut latencies = Vec::new();
    let mut failed = 0;
    for task in tasks {
        let (l, f) = task.await??;
        latencies.extend(l);
        failed += f;
    }
    let elapsed = start.elapsed().as_secs_f64();
    latencies.sort_by(f64::total_cmp);
    let pct = |p: f64| latencies.get(((latencies.len() as f64 - 1.0) * p).round() as usize).copied().unwrap_or(0.0);
    println!(
        "{}",
        json!({
            "requests": latencies.len(),
            "failed": failed,
            "rate": latencies.len() as f64 / elapsed,
            "p50_us": pct(0.50),
            "p90_us": pct(0.90),
            "p99_us": pct(0.99),
        })
    );
    Ok(())
}

/// A client connection of `load`.
enum Sender {
    H1(hyper::client::conn::http1::SendRequest<http_body_util::Empty<Bytes>>),
    H2(hyper::client::conn::http2::SendRequest<http_body_util::Empty<Bytes>>),
}

impl Sender {
    /// Sends `request` once the connection can take it.
    async fn send(
        &mut self,
        request: Request<http_body_util::Empty<Bytes>>,
    ) -> Result<Response<Incoming>, hyper::Error> {
        match self {
            Sender::H1(sender) => {
                sender.ready().await?;
                sender.send_request(request).await
            }
            Sender::H2(sender) => sender.send_request(request).await,
        }
    }
}
