//! M12: the waypoint's 15008 had none of the agent's caps: any address could hold unbounded
//! connections open, each with TLS state allocated before its first byte, for the 10 s
//! handshake timeout. It now counts connections and streams per source and in all, as the
//! agent's pods do, and allocates nothing for TLS before a client speaks.

use std::net::SocketAddr;
use std::time::Duration;

use ferrymesh_testbed::mesh::{wait_until, CONFIG_WAIT};
use ferrymesh_testbed::topology::in_netns;

use crate::{tenants, WEB};

/// Half-open connections the flood opens from one address, and the cap it meets.
const FLOOD: usize = 2000;
const PER_SOURCE: usize = 512;

#[test]
fn a_half_open_flood_on_the_waypoint_is_capped_per_source_while_its_clients_are_served() {
    let topo = tenants(|_| {});
    let (a, x, waypoint) = (topo.pod("shop", "a"), topo.pod("legacy", "x"), topo.pod("shop", "waypoint"));
    let url = format!("http://{WEB}/before");
    wait_until(CONFIG_WAIT * 2, "requests through the waypoint", || topo.http(a, &url, &[]).status == 200);
    let target = SocketAddr::from((waypoint.ip, 15008));
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    let (closed_tx, closed) = std::sync::mpsc::channel::<usize>();
    let flood = std::thread::spawn({
        let netns = x.netns.clone();
        move || {
            in_netns(&netns, move || {
                let mut held = Vec::new();
                for _ in 0..FLOOD {
                    // A connection the waypoint closes at once may be reset before connect returns.
                    if let Ok(stream) = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(5)) {
                        stream.set_nonblocking(true).unwrap();
                        held.push(stream);
                    }
                }
                let refused = FLOOD - held.len();
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
                // Well inside the 10 s handshake timeout, so only the cap closes them.
                let deadline = std::time::Instant::now() + Duration::from_secs(5);
                let mut seen = closed_now(&held);
                while refused + seen < FLOOD - PER_SOURCE && std::time::Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(50));
                    seen = closed_now(&held);
                }
                closed_tx.send(refused + seen).unwrap();
                let _ = done.recv_timeout(Duration::from_secs(60));
            })
        }
    });
    let closed = closed.recv_timeout(Duration::from_secs(90)).expect("the flood reports");
    // The waypoint's clients are served meanwhile.
    for i in 0..20 {
        let answer = topo.http(a, &format!("http://{WEB}/during/{i}"), &[]);
        assert_eq!(answer.status, 200, "a request during the flood: {answer:?}");
    }
    let _ = done_tx.send(());
    flood.join().unwrap();
    assert!(
        closed >= FLOOD - PER_SOURCE,
        "{closed} of {FLOOD} half-open connections closed by the waypoint within 5 s"
    );
}
