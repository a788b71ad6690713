//! The HBONE server (`serve_h2`, as the agent's 15008 runs it) on whatever bytes a client sends
//! after TLS: each CONNECT is checked as the agent checks it and an accepted tunnel is read to
//! its end. The server never panics, ends once the client has gone, and returns every byte of
//! receive window it was granted.
#![no_main]

use std::net::IpAddr;

use bytes::Bytes;
use ferrymesh_dataplane::hbone::budget::WindowBudget;
use ferrymesh_dataplane::hbone::server::{connect_target, respond_status, serve_h2};
use ferrymesh_dataplane::hbone::stream::H2Stream;
use http::StatusCode;
use libfuzzer_sys::fuzz_target;
use tokio::io::AsyncReadExt;

/// The address the connection arrived on (a pod's).
const LOCAL: [u8; 4] = [10, 244, 2, 2];

fuzz_target!(|data: &[u8]| {
    let windows = WindowBudget::new(64 << 20);
    let serve = |io| {
        let windows = windows.clone();
        async move {
            let _ = serve_h2(io, &windows, |request, mut respond: h2::server::SendResponse<Bytes>, _queue| {
                let (parts, body) = request.into_parts();
                let authority = parts.uri.authority().map(|a| a.as_str());
                let status = match connect_target(&parts.method, authority, IpAddr::from(LOCAL)) {
                    Ok(_) => StatusCode::OK,
                    Err(e) => e.status(),
                };
                if let Some(send) = respond_status(&mut respond, status) {
                    // The tunnel as the agent reads it toward the app.
                    tokio::spawn(async move {
                        let mut stream = H2Stream::new(send, body);
                        let mut sink = Vec::new();
                        let _ = stream.read_to_end(&mut sink).await;
                    });
                }
            })
            .await;
        }
    };
    let (_, ended) = ferrymesh_fuzz::serve_bytes(data, serve);
    assert!(ended, "the HBONE server ended after its client did");
    assert_eq!(windows.granted(), 0, "every window grant is returned when its connection ends");
});
