//! M12: the waypoint's 15008 had none of the agent's caps: any address could hold unbounded
//! connections open, each with TLS state allocated before its first byte, for the 10 s
//! handshake timeout. It now counts connections and streams per source and in all, as the
//! agent's pods do, and allocates nothing for TLS before a client speaks.
//!
//! H5 at the waypoint: a meshed peer that sends requests on many tunnels and never reads the
//! answers makes the waypoint hold what it sent, as far as its windows let it: those come out
//! of the same budget as the agent's.
//!
//! And with HTTP/2 spoken inside the tunnels, many requests on each: hyper queued up to 400 KiB
//! of every answer its client did not read, and the requests in flight had no cap. They are now
//! capped per source and in all, and every buffer they hold is sized, so the waypoint's memory
//! at its caps is a sum (docs/SECURITY.md, "The waypoint's budget").

use std::net::SocketAddr;

use bytes::Bytes;
use ferrymesh_testbed::mesh::{wait_until, CONFIG_WAIT};
use ferrymesh_testbed::mesh_client::MeshCert;
use http::{Method, Request};

use crate::{h2_flood, half_open_flood, rss_kib, tenants, WEB};

/// Half-open connections the flood opens from one address, and the cap it meets (the waypoint's
/// `--max-connections-per-source`, 256: lower than the agent's 512).
const FLOOD: usize = 2000;
const PER_SOURCE: usize = 256;

#[test]
fn a_half_open_flood_on_the_waypoint_is_capped_per_source_while_its_clients_are_served() {
    let topo = tenants(|_| {});
    let (a, x, waypoint) = (topo.pod("shop", "a"), topo.pod("legacy", "x"), topo.pod("shop", "waypoint"));
    let url = format!("http://{WEB}/before");
    wait_until(CONFIG_WAIT * 2, "requests through the waypoint", || topo.http(a, &url, &[]).status == 200);
    let target = SocketAddr::from((waypoint.ip, 15008));
    // The waypoint's clients are served meanwhile.
    let closed = half_open_flood(&x.netns, target, FLOOD, PER_SOURCE, || {
        for i in 0..20 {
            let answer = topo.http(a, &format!("http://{WEB}/during/{i}"), &[]);
            assert_eq!(answer.status, 200, "a request during the flood: {answer:?}");
        }
    });
    assert!(
        closed >= FLOOD - PER_SOURCE,
        "{closed} of {FLOOD} half-open connections closed by the waypoint within 5 s"
    );
}

/// The hostile tunnels, the streams on each and what each sends: HTTP/1.1 POSTs of 64 KiB,
/// pipelined, 4 MiB a stream (the waypoint forwards them, the backend echoes each back, and the
/// answers back up toward a client that never reads).
const CONNECTIONS: usize = 48;
const STREAMS: usize = 4;
const PER_STREAM: usize = 4 << 20;
/// The waypoint's bound on what its clients can make it hold (docs/SECURITY.md): the window
/// budget (64 MiB), 64 KiB a connection past it, the upstream connection's 16 MiB window, with
/// room for the rest of a busy waypoint.
const RSS_GROWTH_BOUND_KIB: u64 = 160 * 1024;

/// x, with a mesh identity of its own (as any pod can get one), opens `connections` mTLS
/// connections to shop's waypoint with `tunnels` CONNECTs to web:80 on each, as a source agent
/// would, sends `body` on each tunnel and reads nothing, while a's requests through the waypoint
/// must keep succeeding. Asserts the waypoint's RSS grew less than `RSS_GROWTH_BOUND_KIB`, and
/// returns the tunnels opened.
fn flood_the_waypoint(body: Bytes, (connections, tunnels): (usize, usize), what: &str) -> usize {
    let topo = tenants(|_| {});
    let (a, x, waypoint) = (topo.pod("shop", "a"), topo.pod("legacy", "x"), topo.pod("shop", "waypoint"));
    wait_until(CONFIG_WAIT * 2, "requests through the waypoint", || {
        topo.http(a, &format!("http://{WEB}/before"), &[]).status == 200
    });
    let victim = topo.pid(&format!("waypoint-{}", waypoint.name)).expect("the waypoint");
    let ca_dir = topo.ca_dir();
    let read = |name: &str| std::fs::read_to_string(ca_dir.join(name)).expect("the mesh CA");
    let cert = MeshCert::issue(&read("root-cert.pem"), &read("root-key.pem"), "spiffe://cluster.local/ns/legacy/sa/x");
    let to = SocketAddr::from((waypoint.ip, 15008));
    let request = || Request::builder().method(Method::CONNECT).uri(format!("{WEB}:80")).body(()).unwrap();
    let rss_before = rss_kib(victim);
    let (opened, peak) =
        h2_flood(&x.netns, (cert.client_config(false), to), (connections, tunnels), request, body, victim, || {
            for i in 0..20 {
                let answer = topo.http(a, &format!("http://{WEB}/during/{i}"), &[]);
                assert_eq!(answer.status, 200, "a request during the flood: {answer:?}");
            }
        });
    println!("waypoint RSS {rss_before} KiB before, peak {peak} KiB under {opened} tunnels of {what}");
    assert!(
        peak < rss_before + RSS_GROWTH_BOUND_KIB,
        "the waypoint grew from {rss_before} to {peak} KiB (bound: {RSS_GROWTH_BOUND_KIB} KiB more)"
    );
    assert!(topo.is_running(&format!("waypoint-{}", waypoint.name)));
    opened
}

#[test]
fn a_peer_that_sends_on_many_tunnels_and_never_reads_cannot_grow_the_waypoint_past_its_budget() {
    let post = [
        format!("POST /public/flood HTTP/1.1\r\nhost: web\r\ncontent-length: {}\r\n\r\n", 64 << 10).into_bytes(),
        vec![0x5a; 64 << 10],
    ]
    .concat();
    let body = Bytes::from(post.repeat(PER_STREAM / post.len()));
    let opened = flood_the_waypoint(body, (CONNECTIONS, STREAMS), "pipelined POSTs");
    assert!(opened >= CONNECTIONS * STREAMS, "{opened} tunnels opened");
}

/// HTTP/2 inside the tunnels: connections, tunnels on each, requests on each tunnel (GETs of a
/// 1 MiB answer, with the client's HTTP/2 windows as large as the protocol allows, so that only
/// the waypoint's own limits hold the answers back). The growth allowed is the same 160 MiB: the
/// window budget (64 MiB) and x's 256 requests in flight at 272 KiB each (68 MiB) are most of it.
const H2_CONNECTIONS: usize = 4;
const H2_TUNNELS: usize = 4;
const H2_REQUESTS: u32 = 100;

/// The client preface and requests of an HTTP/2 client that lets the server send as much as
/// HTTP/2 allows (windows of 2^31 - 1) and asks `requests` times for a 1 MiB answer from web.
fn greedy_http2_requests(requests: u32) -> Vec<u8> {
    use ferrymesh_testbed::h2raw::{frame, headers, kind, PREFACE};
    const MAX_WINDOW: u32 = (1 << 31) - 1;
    let mut bytes = PREFACE.to_vec();
    // SETTINGS_INITIAL_WINDOW_SIZE (0x4); the connection window grows by WINDOW_UPDATE.
    bytes.extend(frame(kind::SETTINGS, 0, 0, &[&0x4u16.to_be_bytes()[..], &MAX_WINDOW.to_be_bytes()].concat()));
    bytes.extend(frame(kind::WINDOW_UPDATE, 0, 0, &(MAX_WINDOW - 65_535).to_be_bytes()));
    for i in 0..requests {
        let request = [
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "web"),
            (":path", "/public/big"),
            ("x-echo-bytes", "1048576"),
        ];
        bytes.extend(headers(1 + 2 * i, &request, true));
    }
    bytes
}

#[test]
fn a_peer_that_asks_for_answers_over_http2_in_its_tunnels_and_never_reads_cannot_grow_the_waypoint_past_its_budget() {
    let body = Bytes::from(greedy_http2_requests(H2_REQUESTS));
    let opened = flood_the_waypoint(body, (H2_CONNECTIONS, H2_TUNNELS), "HTTP/2 requests");
    assert!(opened >= H2_CONNECTIONS * H2_TUNNELS, "{opened} tunnels opened");
}
