//! H5: receive windows. An authenticated peer may open HBONE connections to any pod it can
//! reach and fill each connection's receive window without ever reading the answers: the
//! agent holds what it took until the app reads it, and an echo app stops reading once its
//! answers back up. With 16 MiB a connection and 512 connections a source, one peer could make
//! a node's agent hold gigabytes (its memory limit was 512 MiB: every pod of the node closed
//! while it restarts). The agent's windows now come out of a node-wide budget. The victim app
//! here accepts and never reads, so what the peer sends stays with the agent.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use ferrymesh_testbed::mesh::{bin, CONFIG_WAIT, ECHO_PORT};
use ferrymesh_testbed::mesh_client::MeshCert;
use ferrymesh_testbed::topology::in_netns;
use ferrymesh_testbed::{Topology, TopologySpec};
use http::{Method, Request};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::{h2_flood, rss_kib, settled_peaks};

/// The victim apps' ports: the stalled one accepts and never reads; the writing one also
/// writes to every connection as fast as it drains.
const STALLED_PORT: u16 = 9100;
const WRITING_PORT: u16 = 9101;

/// Accepts in `netns` (on `WRITING_PORT` if it `writes`, else `STALLED_PORT`) and holds every
/// connection unread until `stop`; a writing app also writes to each whenever it has room.
fn victim_app(netns: String, writes: bool, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    use std::io::Write;
    let port = if writes { WRITING_PORT } else { STALLED_PORT };
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let app = std::thread::spawn(move || {
        in_netns(&netns, || {
            let listener = std::net::TcpListener::bind(("0.0.0.0", port)).expect("bind the victim app");
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            let chunk = vec![0x5a; 64 * 1024];
            let mut held = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                while let Ok((stream, _)) = listener.accept() {
                    stream.set_nonblocking(true).unwrap();
                    held.push(stream);
                }
                for mut stream in held.iter().filter(|_| writes) {
                    while stream.write(&chunk).is_ok_and(|n| n > 0) {}
                }
                // An idle server's poll, not a test's wait.
                std::thread::sleep(Duration::from_millis(20));
            }
        })
    });
    ready.recv_timeout(Duration::from_secs(10)).expect("the victim app listens");
    app
}

/// Connections the hostile peer opens, and the streams and bytes on each: 4 streams of 4 MiB
/// fill a connection's 16 MiB window, 48 connections 768 MiB.
const CONNECTIONS: usize = 48;
const STREAMS: usize = 4;
const PER_STREAM: usize = 4 << 20;
/// The agent's documented bound on what its HBONE connections hold (docs/SECURITY.md): the
/// window budget (64 MiB) and 64 KiB a connection past it (3 MiB here), with room for the rest
/// of a busy agent.
const RSS_GROWTH_BOUND_KIB: u64 = 128 * 1024;

/// shop's a on node 1 and c on node 2, in the mesh and serving, and legacy's x on node 1,
/// outside it, holding a mesh identity of its own (as any pod can get one): the topology and
/// x's TLS client config.
fn hostile_peer_scene() -> (Topology, Arc<rustls::ClientConfig>) {
    let spec = TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "c", 2).pod("legacy", "x", 1);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a"], CONFIG_WAIT * 4);
    topo.wait_enrolled(2, &["shop/c"], CONFIG_WAIT * 4);
    topo.serve_all();
    let ca_dir = topo.ca_dir();
    let read = |name: &str| std::fs::read_to_string(ca_dir.join(name)).expect("the mesh CA");
    let cert = MeshCert::issue(&read("root-cert.pem"), &read("root-key.pem"), "spiffe://cluster.local/ns/legacy/sa/x");
    let config = cert.client_config(false);
    (topo, config)
}

#[test]
fn a_peer_that_fills_its_windows_and_never_reads_cannot_grow_the_agent_past_its_budget() {
    let (topo, config) = hostile_peer_scene();
    let (a, c, x) = (topo.pod("shop", "a"), topo.pod("shop", "c"), topo.pod("legacy", "x"));
    let victim = topo.pid("agent-node2").expect("node 2's agent");
    let to = SocketAddr::from((c.ip, 15008));
    let authority = format!("{}:{STALLED_PORT}", c.ip);
    let app_stop = Arc::new(AtomicBool::new(false));
    let app = victim_app(c.netns.clone(), false, app_stop.clone());
    let rss_before = rss_kib(victim);
    let request = move || Request::builder().method(Method::CONNECT).uri(authority.as_str()).body(()).unwrap();
    let body = Bytes::from(vec![0x5a; PER_STREAM]);
    let (streams, peak) = h2_flood(&x.netns, (config, to), (CONNECTIONS, STREAMS), request, body, victim, || {
        // A neighbour's round trips keep succeeding meanwhile.
        let rr = topo.output_in(
            &a.netns,
            bin("fm-peer"),
            &["rr", "--to", &format!("{}:{ECHO_PORT}", c.ip), "--count", "200"],
        );
        assert!(rr.status.success(), "the neighbour's round trips: {}", String::from_utf8_lossy(&rr.stderr));
    });
    assert!(streams >= CONNECTIONS * STREAMS, "{streams} streams opened");
    println!("victim agent RSS {rss_before} KiB before, peak {peak} KiB under {streams} hostile streams");
    app_stop.store(true, Ordering::SeqCst);
    app.join().unwrap();
    assert!(
        peak < rss_before + RSS_GROWTH_BOUND_KIB,
        "the agent grew from {rss_before} to {peak} KiB (bound: {RSS_GROWTH_BOUND_KIB} KiB more)"
    );
    assert!(topo.is_running("agent-node2"), "{}", topo.log("agent-node2"));
}

/// A transport whose reads stop for good once `paused` is set: the peer stops taking what it
/// asked for, while its HTTP/2 windows say it has room.
struct Paused<T> {
    io: T,
    paused: Arc<AtomicBool>,
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Paused<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.paused.load(Ordering::SeqCst) {
            return std::task::Poll::Pending;
        }
        std::pin::Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Paused<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Runs `hold` in x's netns, on a runtime of its own: it opens what the attack holds and returns
/// a figure to report with it. Everything stays open, unread, until node 2's agent's memory has
/// settled and a's round trips to c's echo have succeeded meanwhile. The figure, and the agent's
/// peak RSS.
fn held_by_x<T: Send, H, Fut: std::future::Future<Output = (T, H)>>(
    topo: &Topology,
    hold: impl FnOnce() -> Fut + Send,
) -> (T, u64) {
    let (a, c, x) = (topo.pod("shop", "a"), topo.pod("shop", "c"), topo.pod("legacy", "x"));
    let victim = topo.pid("agent-node2").expect("node 2's agent");
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let (held_tx, held) = std::sync::mpsc::channel::<T>();
    std::thread::scope(|scope| {
        let peer = scope.spawn(move || {
            in_netns(&x.netns, move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async move {
                    let (figure, held) = hold().await;
                    held_tx.send(figure).unwrap();
                    let _ = tokio::task::spawn_blocking(move || stopped.recv_timeout(Duration::from_secs(120))).await;
                    drop(held);
                });
            })
        });
        let figure = held.recv_timeout(Duration::from_secs(90)).expect("the attack opened what it holds");
        let [peak] = settled_peaks([victim]);
        let rr = topo.output_in(
            &a.netns,
            bin("fm-peer"),
            &["rr", "--to", &format!("{}:{ECHO_PORT}", c.ip), "--count", "200"],
        );
        let _ = stop.send(());
        peer.join().unwrap();
        assert!(rr.status.success(), "the neighbour's round trips: {}", String::from_utf8_lossy(&rr.stderr));
        (figure, peak)
    })
}

/// Streams the hostile reader opens: 20 connections of 100 streams, about its source's cap of
/// 2048.
const READER_CONNECTIONS: usize = 20;
const READER_STREAMS: usize = 100;

/// H5's other direction: what the agent sends. The peer advertises large windows, opens streams
/// to an app that writes, and stops reading its socket: h2 queued up to its send buffer (400
/// KiB) a stream (15 MB -> 909 MB with 2000 streams from one peer). A server connection's
/// streams now take room in its send queue (256 KiB) before they hand h2 bytes.
#[test]
fn a_peer_that_asks_for_data_and_never_reads_it_cannot_grow_the_agent_past_its_budget() {
    let (topo, config) = hostile_peer_scene();
    let c = topo.pod("shop", "c");
    let victim = topo.pid("agent-node2").expect("node 2's agent");
    let to = SocketAddr::from((c.ip, 15008));
    let authority = format!("{}:{WRITING_PORT}", c.ip);
    let app_stop = Arc::new(AtomicBool::new(false));
    let app = victim_app(c.netns.clone(), true, app_stop.clone());
    let rss_before = rss_kib(victim);
    let (opened, peak) = held_by_x(&topo, || async move {
        let (mut held, mut senders) = (Vec::new(), Vec::new());
        let paused = Arc::new(AtomicBool::new(false));
        for _ in 0..READER_CONNECTIONS {
            let Ok(tls) = ferrymesh_testbed::mesh_client::connect(config.clone(), to).await else {
                continue;
            };
            let io = Paused { io: tls, paused: paused.clone() };
            let handshake = h2::client::Builder::new()
                .initial_window_size(1 << 30)
                .initial_connection_window_size(1 << 30)
                .handshake::<_, Bytes>(io)
                .await;
            let Ok((mut sender, connection)) = handshake else { continue };
            tokio::spawn(connection);
            for _ in 0..READER_STREAMS {
                let request = Request::builder().method(Method::CONNECT).uri(authority.as_str()).body(()).unwrap();
                let Ok((response, send)) = sender.send_request(request, false) else { break };
                held.push((response, send));
            }
            senders.push(sender);
        }
        let mut answered = Vec::new();
        for (response, send) in held {
            if let Ok(Ok(response)) = tokio::time::timeout(Duration::from_secs(10), response).await {
                answered.push((response, send));
            }
        }
        // From here on it takes nothing: what the agent sends stays with the agent.
        paused.store(true, Ordering::SeqCst);
        (answered.len(), (answered, senders))
    });
    println!("victim agent RSS {rss_before} KiB before, peak {peak} KiB under {opened} streams read by nobody");
    app_stop.store(true, Ordering::SeqCst);
    app.join().unwrap();
    // Some may miss the answer's deadline on a busy machine; the flood is there.
    assert!(opened >= READER_CONNECTIONS * READER_STREAMS * 9 / 10, "{opened} streams answered");
    assert!(
        peak < rss_before + RSS_GROWTH_BOUND_KIB,
        "the agent grew from {rss_before} to {peak} KiB (bound: {RSS_GROWTH_BOUND_KIB} KiB more)"
    );
}

/// Connections the downloading pod opens to the writing app and never reads: 20 HBONE client
/// connections of its agent (100 streams each).
const DOWNLOADS: usize = 2000;
/// What the downloads may make their agent hold: the window budget (64 MiB), each download's own
/// state (about 12 KiB measured with an app that sends nothing; 32 KiB allowed) and 32 MiB for
/// the allocator. The windows alone were 320 MiB before they came out of the budget.
const DOWNLOADS_RSS_BOUND_KIB: u64 = 64 * 1024 + DOWNLOADS as u64 * 32 + 32 * 1024;

/// The receive windows of the agent's own HBONE client connections: a pod that asks a server for
/// data and never reads it makes its agent hold what the connection's window lets the server
/// send, 16 MiB a pooled connection. Those windows now come out of the node's budget too. (The
/// server's agent is shown, not judged: what it sends is the open half of H5, above.)
#[test]
fn a_pod_that_never_reads_its_downloads_cannot_grow_its_agent_past_the_budget() {
    let spec = TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "b", 1).pod("shop", "c", 2);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a", "shop/b"], CONFIG_WAIT * 4);
    topo.wait_enrolled(2, &["shop/c"], CONFIG_WAIT * 4);
    topo.serve_all();
    let (a, b, c) = (topo.pod("shop", "a"), topo.pod("shop", "b"), topo.pod("shop", "c"));
    let agents = [topo.pid("agent-node1").expect("node 1's agent"), topo.pid("agent-node2").expect("node 2's agent")];
    let app_stop = Arc::new(AtomicBool::new(false));
    let app = victim_app(c.netns.clone(), true, app_stop.clone());
    let rss_before = agents.map(rss_kib);
    let to = SocketAddr::from((c.ip, WRITING_PORT));
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let (opened_tx, opened) = std::sync::mpsc::channel::<usize>();
    let peak = std::thread::scope(|scope| {
        let a_netns = a.netns.clone();
        let downloader = scope.spawn(move || {
            in_netns(&a_netns, move || {
                let held: Vec<_> = (0..DOWNLOADS)
                    .filter_map(|_| std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)).ok())
                    .collect();
                opened_tx.send(held.len()).unwrap();
                let _ = stopped.recv_timeout(Duration::from_secs(120));
                drop(held);
            })
        });
        let opened = opened.recv_timeout(Duration::from_secs(90)).expect("the downloads were opened");
        let peak = settled_peaks(agents);
        // b, on the same node, keeps its round trips meanwhile.
        let rr = topo.output_in(
            &b.netns,
            bin("fm-peer"),
            &["rr", "--to", &format!("{}:{ECHO_PORT}", c.ip), "--count", "200"],
        );
        assert!(rr.status.success(), "the neighbour's round trips: {}", String::from_utf8_lossy(&rr.stderr));
        let _ = stop.send(());
        downloader.join().unwrap();
        println!("agents' RSS {rss_before:?} KiB before, peak {peak:?} KiB with {opened} downloads unread");
        assert_eq!(opened, DOWNLOADS, "the downloads opened");
        peak
    });
    app_stop.store(true, Ordering::SeqCst);
    app.join().unwrap();
    let (before, peak) = (rss_before[0], peak[0]);
    assert!(
        peak < before + DOWNLOADS_RSS_BOUND_KIB,
        "the downloading pod's agent grew from {before} to {peak} KiB (bound: {DOWNLOADS_RSS_BOUND_KIB} KiB more)"
    );
}

/// Connections the frame-holding peer opens (its source's cap is 512).
const FRAME_CONNECTIONS: usize = 400;

/// H5 below the windows: HTTP/2 reads a whole frame before it looks at it, and the window only
/// counts the DATA a frame carries. A peer that sends all of a frame as large as the agent says
/// it takes (SETTINGS_MAX_FRAME_SIZE) but its last byte has the agent hold that much per
/// connection: 1 MiB a frame made 400 connections of one peer cost 440 MB.
#[test]
fn a_peer_that_sends_all_but_the_last_byte_of_large_frames_cannot_grow_the_agent_past_its_budget() {
    use ferrymesh_testbed::h2raw::{flag, frame, kind, parse_frames, setting, settings, PREFACE};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (topo, config) = hostile_peer_scene();
    let c = topo.pod("shop", "c");
    let victim = topo.pid("agent-node2").expect("node 2's agent");
    let to = SocketAddr::from((c.ip, 15008));
    let rss_before = rss_kib(victim);
    let ((sent, largest), peak) = held_by_x(&topo, || async move {
        let (mut held, mut largest) = (Vec::new(), 0);
        for _ in 0..FRAME_CONNECTIONS {
            let Ok(mut tls) = ferrymesh_testbed::mesh_client::connect(config.clone(), to).await else {
                continue;
            };
            let _ = tls.write_all(&[PREFACE, &settings(false)].concat()).await;
            // The agent's SETTINGS say how large a frame it takes (16 KiB if unsaid).
            let mut answer = Vec::new();
            let mut buf = [0u8; 4096];
            let said = tokio::time::timeout(Duration::from_secs(5), async {
                while let Ok(n @ 1..) = tls.read(&mut buf).await {
                    answer.extend_from_slice(&buf[..n]);
                    let frames = parse_frames(&answer);
                    if frames.iter().any(|f| f.kind == kind::SETTINGS) {
                        return setting(&frames, 5).unwrap_or(16_384) as usize;
                    }
                }
                0
            });
            let Ok(size @ 1..) = said.await else { continue };
            largest = largest.max(size);
            let mut almost = frame(kind::HEADERS, flag::END_HEADERS, 1, &vec![0; size]);
            almost.pop();
            if let Ok(Ok(())) = tokio::time::timeout(Duration::from_secs(5), tls.write_all(&almost)).await {
                held.push(tls);
            }
        }
        ((held.len(), largest), held)
    });
    println!(
        "victim agent RSS {rss_before} KiB before, peak {peak} KiB with {sent} frames of {largest} bytes all but sent"
    );
    assert_eq!(sent, FRAME_CONNECTIONS, "connections that sent all but the last byte of a frame");
    assert!(
        peak < rss_before + RSS_GROWTH_BOUND_KIB,
        "the agent grew from {rss_before} to {peak} KiB (bound: {RSS_GROWTH_BOUND_KIB} KiB more)"
    );
    assert!(topo.is_running("agent-node2"), "{}", topo.log("agent-node2"));
}
