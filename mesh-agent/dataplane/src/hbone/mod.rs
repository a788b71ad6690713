//! HBONE: TCP carried in HTTP/2 CONNECT streams over mutual TLS (port 15008), wire-compatible
//! with Istio's ztunnel, as a library with seams a second proxy can plug into:
//!
//! - [`server`]: HTTP/2 on an accepted (TLS) connection, each CONNECT handed to the caller's
//!   handler, and the check of a CONNECT's target;
//! - [`client`]: opening CONNECT streams to a peer over pooled connections, the TCP connection
//!   made by the caller's [`client::Dialer`] (the node agent's enters the pod's netns);
//! - [`pool`]: the pooled client connections;
//! - [`budget`] and [`queue`]: what peers can make a process hold, received (the windows) and
//!   to send (a server connection's queue);
//! - [`stream`]: copying between TCP and a CONNECT stream, and [`stream::H2Stream`], a CONNECT
//!   stream as `AsyncRead`/`AsyncWrite` (hyper can serve HTTP on it).
//!
//! [`server_settings`] and [`client_settings`] are the one place the HTTP/2 settings live.

pub mod budget;
pub mod client;
pub mod pool;
pub mod queue;
pub mod server;
pub mod stream;

use std::io;
use std::time::Duration;

/// The HBONE port.
pub const PORT: u16 = mesh_common::HBONE_PORT;
/// HTTP/2 stream window.
pub const STREAM_WINDOW: u32 = 4 * 1024 * 1024;
/// HTTP/2 connection window of a connection (client or server) the budget granted it
/// ([`budget`]); the others keep the base window.
pub const CONNECTION_WINDOW: u32 = 16 * 1024 * 1024;
/// HTTP/2 max frame size, what this side takes. HTTP/2 reads a whole frame before it looks at it
/// (flow control counts only the DATA in it), so each connection may hold one this large of a
/// peer that never sends the frame's last byte: part of what a connection costs (docs/SECURITY.md).
/// It was 1 MiB: 400 connections of one peer grew an agent from 15 to 454 MB.
pub const MAX_FRAME: u32 = 64 * 1024;
/// Streams per HTTP/2 connection.
pub const MAX_STREAMS: u32 = 100;
/// Largest header block a client may send: a CONNECT carries a handful of short headers.
pub const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Streams a client may reset before the server has taken them up ("rapid reset"); past it
/// the connection is closed with GOAWAY ENHANCE_YOUR_CALM.
pub const MAX_PENDING_RESETS: usize = 20;
/// How long the client side's TLS handshake may take.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Read buffer under TLS. rustls asks its transport for at most 4 KiB per read, which would
/// cost a recv syscall per 4 KiB of ciphertext; a buffer in between makes each recv take
/// whatever the socket holds, up to this much, and rustls then reads from memory.
pub const TLS_READ_BUFFER: usize = 32 * 1024;
/// TLS records rustls may hold for the socket (its default is 64 KiB): a large DATA frame goes
/// out in fewer, larger writes. Records are held only while they wait for the socket, so an idle
/// connection holds nothing.
pub const TLS_WRITE_BUFFER: usize = 256 * 1024;

/// The HTTP/2 server settings of every HBONE listener (the connection window starts at the
/// base one; [`server::serve_h2`] grows it with a grant).
pub fn server_settings() -> h2::server::Builder {
    let mut builder = h2::server::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(budget::BASE_CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS)
        .max_header_list_size(MAX_HEADER_LIST)
        .max_pending_accept_reset_streams(MAX_PENDING_RESETS);
    builder
}

/// The HTTP/2 client settings of every HBONE connection (the connection window starts at the
/// base one, as a server's; [`client::Client`] grows it with a grant).
pub fn client_settings() -> h2::client::Builder {
    let mut builder = h2::client::Builder::new();
    builder
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(budget::BASE_CONNECTION_WINDOW)
        .max_frame_size(MAX_FRAME)
        .max_concurrent_streams(MAX_STREAMS);
    builder
}

/// An h2 error as an I/O error: a stream reset keeps its reason.
pub fn h2_io(e: h2::Error) -> io::Error {
    if let Some(reason) = e.reason() {
        io::Error::new(io::ErrorKind::ConnectionReset, format!("HBONE stream reset ({reason})"))
    } else {
        io::Error::other(format!("HBONE: {e}"))
    }
}
