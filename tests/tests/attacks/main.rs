//! Attack tests: each one is an attack on the mesh, run against the real binaries on the netns
//! topology (or through the Kubernetes API fake), judged by what the attacker and the victim
//! see: exit codes, bodies, the client address a server saw. One module per area; the table
//! in docs/SECURITY.md names, for each attack, where it is refused and which test proves it.
//! Needs root.

mod capture;
mod ctrl;
mod listeners;
mod netns;
mod outbound;
mod paths;
mod policy;
mod pool;
mod request;
mod routes;
mod tls;
mod windows;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrymesh_testbed::mesh::{wait_until, CONFIG_WAIT, DATAPLANE_MODE, ECHO_HTTP_PORT};
use ferrymesh_testbed::mesh_client;
use ferrymesh_testbed::topology::in_netns;
use ferrymesh_testbed::{Topology, TopologySpec};

/// VIP of Service shop/web (pod web-1), bound to shop's waypoint.
pub const WEB: &str = "10.96.0.50";
/// VIP of Service shop/api (pod api-1), bound to shop's waypoint.
pub const API: &str = "10.96.0.52";
/// VIP of Service shop/plain (pod web-1 too), bound to no waypoint.
pub const PLAIN: &str = "10.96.0.53";
/// VIP of Service evil/sink (pod sink).
pub const SINK: &str = "10.96.0.60";
/// VIP of Service evil/proxy, which an attack writes: no selector, its endpoint the attacker's
/// choice.
pub const PROXY: &str = "10.96.0.61";

/// Two tenants: `shop` bound to its waypoint (on node 2), with a (client), web-1 and api-1;
/// `evil` with e (client) and sink, bound to no waypoint; and `legacy`'s x, outside the mesh. `before_start` writes more config;
/// then the mesh starts and the backends serve fm-echo.
pub fn tenants(before_start: impl FnOnce(&Topology)) -> Topology {
    let spec = TopologySpec::nodes(2)
        .pod("shop", "a", 1)
        .pod("shop", "web-1", 1)
        .pod("shop", "api-1", 2)
        .pod("shop", "waypoint", 2)
        .pod("evil", "e", 1)
        .pod("evil", "sink", 2)
        .pod("legacy", "x", 1);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop", "evil"]);
    topo.write_namespace("shop", &[(DATAPLANE_MODE, "enabled"), ("ferrymesh.io/use-waypoint", "waypoint")]);
    topo.write_pod(topo.pod("shop", "web-1"), &[("app", "web")]);
    topo.write_pod(topo.pod("shop", "api-1"), &[("app", "api")]);
    topo.write_pod(topo.pod("evil", "sink"), &[("app", "sink")]);
    topo.write_waypoint_pod(topo.pod("shop", "waypoint"));
    topo.write_waypoint("shop", "waypoint");
    let echo = ECHO_HTTP_PORT.to_string();
    topo.write_service("shop", "web", WEB, &[("app", "web")], &[("http", 80, &echo)]);
    topo.write_service("shop", "api", API, &[("app", "api")], &[("http", 80, &echo)]);
    topo.write_service("evil", "sink", SINK, &[("app", "sink")], &[("http", 80, &echo)]);
    before_start(&topo);
    topo.start_mesh();
    topo.wait_enrolled(1, &["evil/e", "shop/a", "shop/web-1"], CONFIG_WAIT * 4);
    topo.wait_enrolled(2, &["evil/sink", "shop/api-1"], CONFIG_WAIT * 4);
    topo.start_waypoint(topo.pod("shop", "waypoint"));
    for pod in [topo.pod("shop", "web-1"), topo.pod("shop", "api-1"), topo.pod("evil", "sink")] {
        topo.serve_echo(pod);
    }
    topo
}

/// A half-open flood: `count` TCP connections from `netns` to `target` that never send a byte.
/// Waits (5 s at most, well inside a 10 s handshake timeout, so only a cap can close them) until
/// all but `cap` are closed by the server, runs `during` while every one still open is held, and
/// returns how many the server closed (refused at connect, or read as ended).
pub fn half_open_flood(netns: &str, target: SocketAddr, count: usize, cap: usize, during: impl FnOnce()) -> usize {
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    let (closed_tx, closed) = std::sync::mpsc::channel::<usize>();
    std::thread::scope(|scope| {
        let flood = scope.spawn(move || {
            in_netns(netns, move || {
                let mut held = Vec::new();
                for _ in 0..count {
                    // A connection the server closes at once may be reset before connect returns.
                    if let Ok(stream) = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                        stream.set_nonblocking(true).unwrap();
                        held.push(stream);
                    }
                }
                let refused = count - held.len();
                // Closed by the server: a read ends (EOF) or fails with anything but "would block".
                let closed_now = |held: &[std::net::TcpStream]| {
                    let mut byte = [0u8; 1];
                    held.iter()
                        .filter(|s| match s.peek(&mut byte) {
                            Ok(_) => true,
                            Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
                        })
                        .count()
                };
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                let mut seen = closed_now(&held);
                while refused + seen < count - cap && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                    seen = closed_now(&held);
                }
                closed_tx.send(refused + seen).unwrap();
                let _ = done.recv_timeout(Duration::from_secs(60));
            })
        });
        let closed = closed.recv_timeout(Duration::from_secs(90)).expect("the flood reports");
        during();
        let _ = done_tx.send(());
        flood.join().unwrap();
        closed
    })
}

/// Waits (60 s at most) until the RSS of every process `pids` names stops growing (less than
/// 1 MiB in half a second), and returns the peak RSS (KiB) each reached meanwhile.
pub fn settled_peaks<const N: usize>(pids: [u32; N]) -> [u64; N] {
    let mut last = pids.map(rss_kib);
    let mut peaks = last;
    wait_until(Duration::from_secs(60), "the victims' memory to settle", || {
        std::thread::sleep(Duration::from_millis(500));
        let now = pids.map(rss_kib);
        let settled = now.iter().zip(&last).all(|(now, last)| now.abs_diff(*last) < 1024);
        for (peak, now) in peaks.iter_mut().zip(now) {
            *peak = (*peak).max(now);
        }
        last = now;
        settled
    });
    peaks
}

/// Resident memory of `pid`, in KiB (0 once it is gone: the tests then find it not running).
pub fn rss_kib(pid: u32) -> u64 {
    ferrymesh_testbed::topology::rss_kib(pid).unwrap_or(0)
}

/// A hostile HTTP/2 client's flood, as a peer holding a mesh certificate (`config`) can send
/// it: from `netns`, `connections` TLS connections to `to`, each with `streams` requests
/// (`request()`) that each send `body` and never read a byte of what comes back. Once all are
/// open, waits until `pid`'s memory settles (it changes by less than 1 MiB in half a second),
/// runs `during` while everything is held, and returns how many streams were opened and the
/// peak RSS of `pid` (KiB) seen meanwhile.
pub fn h2_flood(
    netns: &str,
    (config, to): (Arc<rustls::ClientConfig>, SocketAddr),
    (connections, streams): (usize, usize),
    request: impl Fn() -> http::Request<()> + Send + 'static,
    body: Bytes,
    pid: u32,
    during: impl FnOnce(),
) -> (usize, u64) {
    let (stop, stopped) = std::sync::mpsc::channel::<()>();
    let (opened_tx, opened) = std::sync::mpsc::channel::<usize>();
    std::thread::scope(|scope| {
        let flood = scope.spawn(move || {
            in_netns(netns, move || {
                let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
                runtime.block_on(async move {
                    let (mut held, mut senders) = (Vec::new(), Vec::new());
                    for _ in 0..connections {
                        let Ok(tls) = mesh_client::connect(config.clone(), to).await else { continue };
                        let Ok((mut sender, connection)) = h2::client::handshake(tls).await else { continue };
                        tokio::spawn(connection);
                        for _ in 0..streams {
                            let Ok((response, mut send)) = sender.send_request(request(), false) else { break };
                            // Queued whole: h2 sends it as the server's windows allow.
                            let _ = send.send_data(body.clone(), false);
                            held.push((response, send));
                        }
                        senders.push(sender);
                    }
                    opened_tx.send(held.len()).unwrap();
                    // Holds everything open, reading nothing, until the test is done.
                    let _ = tokio::task::spawn_blocking(move || stopped.recv_timeout(Duration::from_secs(120))).await;
                    drop((held, senders));
                });
            })
        });
        let opened = opened.recv_timeout(Duration::from_secs(90)).expect("the flood opened its streams");
        // The flood lands as fast as the server takes it: wait until its memory settles.
        let [mut peak] = settled_peaks([pid]);
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(during));
        peak = peak.max(rss_kib(pid));
        let _ = stop.send(());
        flood.join().unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
        (opened, peak)
    })
}
