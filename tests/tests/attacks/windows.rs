//! H5: receive windows. An authenticated peer may open HBONE connections to any pod it can
//! reach and fill each connection's receive window without ever reading the answers: the
//! agent holds what it took until the app reads it, and an echo app stops reading once its
//! answers back up. With 16 MiB a connection and 512 connections a source, one peer could make
//! a node's agent hold gigabytes (its memory limit is 512 MiB: every pod of the node closed
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

use crate::{h2_flood, rss_kib};

/// The victim app's port: it accepts and never reads.
const STALLED_PORT: u16 = 9100;

/// Accepts on `STALLED_PORT` in `netns` and holds every connection unread until `stop`.
fn stalled_app(netns: String, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<()> {
    let (ready_tx, ready) = std::sync::mpsc::channel();
    let app = std::thread::spawn(move || {
        in_netns(&netns, || {
            let listener = std::net::TcpListener::bind(("0.0.0.0", STALLED_PORT)).expect("bind the stalled app");
            listener.set_nonblocking(true).unwrap();
            ready_tx.send(()).unwrap();
            let mut held = Vec::new();
            while !stop.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((stream, _)) => held.push(stream),
                    // An idle server's poll, not a test's wait.
                    Err(_) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        })
    });
    ready.recv_timeout(Duration::from_secs(10)).expect("the stalled app listens");
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

#[test]
fn a_peer_that_fills_its_windows_and_never_reads_cannot_grow_the_agent_past_its_budget() {
    let spec = TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "c", 2).pod("legacy", "x", 1);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a"], CONFIG_WAIT * 4);
    topo.wait_enrolled(2, &["shop/c"], CONFIG_WAIT * 4);
    topo.serve_all();
    let (a, c, x) = (topo.pod("shop", "a"), topo.pod("shop", "c"), topo.pod("legacy", "x"));
    let victim = topo.pid("agent-node2").expect("node 2's agent");
    let ca_dir = topo.ca_dir();
    let read = |name: &str| std::fs::read_to_string(ca_dir.join(name)).expect("the mesh CA");
    // x holds a mesh identity of its own, as any pod can get one.
    let cert = MeshCert::issue(&read("root-cert.pem"), &read("root-key.pem"), "spiffe://cluster.local/ns/legacy/sa/x");
    let config = cert.client_config(false);
    let to = SocketAddr::from((c.ip, 15008));
    let authority = format!("{}:{STALLED_PORT}", c.ip);
    let app_stop = Arc::new(AtomicBool::new(false));
    let app = stalled_app(c.netns.clone(), app_stop.clone());
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
