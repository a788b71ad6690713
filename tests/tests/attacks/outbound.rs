//! M6 at 15001: a pod's outbound connections are captured and carried by its node's agent, and
//! nothing bounded how many one pod could make the agent hold: each is a task, a relay and an
//! upstream connection (or an HBONE stream) for as long as the pod keeps it open. The agent now
//! counts them per pod and in all, as it counts inbound ones per source.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use ferrymesh_testbed::mesh::{CONFIG_WAIT, ECHO_PORT};
use ferrymesh_testbed::topology::in_netns;
use ferrymesh_testbed::{Topology, TopologySpec};

/// The cap the test's agents run with, and the connections the pod opens.
const PER_POD: usize = 64;
const OPENED: usize = 200;

/// Opens `count` connections from `netns` to `to`, says on each a line the echo server sends
/// back, and counts those that answered (the others were reset or closed by the agent); runs
/// `during` while all are held, and returns the count.
fn held_and_answered(netns: &str, to: SocketAddr, count: usize, during: impl FnOnce()) -> usize {
    let (answered_tx, answered) = std::sync::mpsc::channel();
    let (done_tx, done) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|scope| {
        let holder = scope.spawn(move || {
            in_netns(netns, move || {
                let held: Vec<TcpStream> =
                    (0..count).filter_map(|_| TcpStream::connect_timeout(&to, Duration::from_secs(5)).ok()).collect();
                let answering = held
                    .iter()
                    .filter(|&stream| {
                        let mut stream = stream;
                        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                        let mut answer = [0u8; 5];
                        stream.write_all(b"ping\n").is_ok()
                            && stream.read_exact(&mut answer).is_ok()
                            && &answer == b"ping\n"
                    })
                    .count();
                answered_tx.send(answering).unwrap();
                let _ = done.recv_timeout(Duration::from_secs(60));
            })
        });
        let answering = answered.recv_timeout(Duration::from_secs(90)).expect("the connections were tried");
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(during));
        let _ = done_tx.send(());
        holder.join().unwrap();
        if let Err(panic) = outcome {
            std::panic::resume_unwind(panic);
        }
        answering
    })
}

#[test]
fn one_pod_cannot_hold_more_outbound_connections_than_its_share() {
    let spec = TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "b", 1).pod("shop", "c", 2);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    topo.start_ctrl(&[]);
    let cap = PER_POD.to_string();
    for node in [1, 2] {
        topo.start_agent_with(node, &[("--max-outbound-connections-per-pod", &cap)]);
    }
    topo.wait_enrolled(1, &["shop/a", "shop/b"], CONFIG_WAIT * 4);
    topo.wait_enrolled(2, &["shop/c"], CONFIG_WAIT * 4);
    topo.serve_all();
    let (a, b, c) = (topo.pod("shop", "a"), topo.pod("shop", "b"), topo.pod("shop", "c"));
    let to = SocketAddr::from((c.ip, ECHO_PORT));
    let answered = held_and_answered(&a.netns, to, OPENED, || {
        // Its neighbour on the node has a share of its own meanwhile.
        assert_eq!(held_and_answered(&b.netns, to, 10, || ()), 10, "b's connections while a holds its share");
    });
    assert_eq!(answered, PER_POD, "a's connections carried of the {OPENED} it opened");
}
