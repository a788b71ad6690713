//! fm-echo: the HTTP backend of the waypoint tests, in the manner of Gateway API's conformance
//! echo server.
//!
//! `serve` answers every HTTP/1.1 or HTTP/2 (prior knowledge) request with a JSON body naming
//! the pod that answered and the request as it arrived (method, path with query, host, headers,
//! protocol, body length), and echoes WebSocket messages on any path that asks to upgrade.
//! `ws` is a WebSocket client: it sends numbered text messages and checks each echo, printing
//! JSON.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;

use clap::{Parser, Subcommand};
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
    Serve {
        #[arg(long, default_value_t = 8081)]
        port: u16,
        #[arg(long)]
        pod: String,
        #[arg(long)]
        namespace: String,
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
        Command::Serve { port, pod, namespace } => runtime.block_on(serve(port, pod, namespace)),
        Command::Ws { to, path, messages } => runtime.block_on(ws(to, &path, messages)),
    };
    if let Err(e) = result {
        eprintln!("fm-echo: {e}");
        std::process::exit(1);
    }
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

async fn serve(port: u16, pod: String, namespace: String) -> Result<(), BoxError> {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port)).await?;
    println!("ready");
    let who = std::sync::Arc::new((pod, namespace));
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

async fn answer(
    mut request: Request<Incoming>,
    who: std::sync::Arc<(String, String)>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let websocket =
        request.headers().get(header::UPGRADE).is_some_and(|u| u.as_bytes().eq_ignore_ascii_case(b"websocket"));
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
    let body = json!({
        "pod": who.0,
        "namespace": who.1,
        "method": parts.method.as_str(),
        "path": parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
        "host": host,
        "protocol": format!("{:?}", parts.version),
        "headers": headers,
        "body_bytes": body_bytes,
    });
    let response = Response::builder()
        .header(header::CONTENT_TYPE, "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("echo response");
    Ok(response)
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
