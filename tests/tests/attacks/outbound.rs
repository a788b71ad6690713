//! M6: a pod's outbound connections are captured and carried by its node's agent, and nothing
//! bounded how much of the node one pod could hold with them.
//! - At 15001 each is a task, a relay and an upstream connection (or an HBONE stream) for as
//!   long as the pod keeps it open: the agent now counts them per pod and in all, as it counts
//!   inbound ones per source.
//! - In the kernel each capture is an entry in the node-global ORIG maps, which every pod shares:
//!   one pod could push its neighbours' entries out. The eBPF programs now count a pod's
//!   captures against the same per-pod share.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::time::Duration;

use ferrymesh_testbed::mesh::{CONFIG_WAIT, ECHO_PORT};
use ferrymesh_testbed::topology::in_netns;
use ferrymesh_testbed::{Topology, TopologySpec};
use socket2::{Domain, SockAddr, Socket, Type};

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

/// shop's a and b on node 1 and c on node 2, serving, their agents run with a share of
/// `PER_POD` outbound connections a pod.
fn neighbours_with_a_share() -> Topology {
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
    topo
}

#[test]
fn one_pod_cannot_hold_more_outbound_connections_than_its_share() {
    let topo = neighbours_with_a_share();
    let (a, b, c) = (topo.pod("shop", "a"), topo.pod("shop", "b"), topo.pod("shop", "c"));
    let to = SocketAddr::from((c.ip, ECHO_PORT));
    let answered = held_and_answered(&a.netns, to, OPENED, || {
        // Its neighbour on the node has a share of its own meanwhile.
        assert_eq!(held_and_answered(&b.netns, to, 10, || ()), 10, "b's connections while a holds its share");
    });
    assert_eq!(answered, PER_POD, "a's connections carried of the {OPENED} it opened");
}

/// Captures the attack makes the kernel remember and forget: twice the ORIG maps' 65,536 entries.
const FLOOD: usize = 2 * 65_536;

/// A socket bound (with SO_REUSEADDR) to `from` and connected to `to`: the connect's result.
fn connect_from(from: SocketAddr, to: SocketAddr) -> (Socket, std::io::Result<()>) {
    let socket = Socket::new(Domain::IPV4, Type::STREAM, None).unwrap();
    socket.set_reuse_address(true).unwrap();
    socket.bind(&SockAddr::from(from)).unwrap();
    let connected = socket.connect_timeout(&SockAddr::from(to), Duration::from_secs(5));
    (socket, connected)
}

/// What the attacker's connects got: (captured then failed in the kernel, refused by the mesh).
fn tally(results: impl Iterator<Item = std::io::Result<()>>) -> (usize, usize) {
    results.fold((0, 0), |(failed, refused), result| match result.map_err(|e| e.raw_os_error()) {
        Err(Some(libc::EADDRNOTAVAIL)) => (failed + 1, refused),
        Err(Some(libc::EPERM)) => (failed, refused + 1),
        other => panic!("a connect from an address in use: {other:?}"),
    })
}

#[test]
fn one_pod_cannot_fill_the_nodes_capture_maps() {
    let topo = neighbours_with_a_share();
    let (a, b, c) = (topo.pod("shop", "a"), topo.pod("shop", "b"), topo.pod("shop", "c"));
    let to = SocketAddr::from((c.ip, ECHO_PORT));
    let answers = |mut stream: &TcpStream| {
        let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
        let mut answer = [0u8; 5];
        stream.write_all(b"ping\n").is_ok() && stream.read_exact(&mut answer).is_ok() && &answer == b"ping\n"
    };
    // b, the victim, holds a connection to c through the attack.
    let victim = in_netns(&b.netns, || TcpStream::connect_timeout(&to, Duration::from_secs(5))).unwrap();
    assert!(answers(&victim), "b's connection before the attack");

    // a holds one connection from a port of its choice; every other socket it binds to that port
    // (SO_REUSEADDR) is captured by connect(), then fails in the kernel (the loopback 4-tuple is
    // taken). Each capture is remembered until the socket goes.
    let (flooded, held) = in_netns(&a.netns, || {
        let (anchor, connected) = connect_from(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), to);
        connected.expect("a's first connection");
        let port = anchor.local_addr().unwrap().as_socket().unwrap();
        let flooded = tally((0..FLOOD).map(|_| connect_from(port, to).1));
        let held: Vec<_> = (0..OPENED).map(|_| connect_from(port, to)).collect();
        (flooded, tally(held.into_iter().map(|(_, connected)| connected)))
    });
    // The victim's capture is still known: getpeername names c, the connection carries on.
    assert_eq!(victim.peer_addr().unwrap(), to, "b's peer as getpeername reports it after the attack");
    assert!(answers(&victim), "b's connection after the attack");
    assert_eq!(flooded.0 + flooded.1, FLOOD);
    let (captured, refused) = held;
    // Its share is PER_POD captures at once, one of them the anchor: no more, and none lost to
    // the flood's sockets, which are gone.
    let expected = (PER_POD - 1, OPENED + 1 - PER_POD);
    if (captured, refused) != expected {
        // Which kernel answer refused the odd one (`share_refused`, or `map_errors`: both are
        // EPERM to the pod), for whoever reads the failure.
        // The agent reads the counters every second: wait (5 s at most) until they hold every
        // refusal a saw.
        let node = topo.nodes.iter().find(|n| n.index == a.node).expect("a's node");
        let counted = |text: &str, event: &str| {
            let line = format!("ferrymesh_ebpf_events_total{{event=\"{event}\"}} ");
            text.lines().find_map(|l| l.strip_prefix(line.as_str())?.parse::<usize>().ok()).unwrap_or(0)
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        let mut text = topo.metrics_text(&node.netns);
        while counted(&text, "share_refused") + counted(&text, "map_errors") < refused
            && std::time::Instant::now() < deadline
        {
            text = topo.metrics_text(&node.netns);
        }
        let events: Vec<&str> = text.lines().filter(|l| l.starts_with("ferrymesh_ebpf_events_total")).collect();
        panic!(
            "a's held sockets: (captured by the kernel, refused) {:?} of {OPENED}, expected {expected:?} (its share \
             {PER_POD} with the anchor); its node's eBPF events: {events:#?}",
            (captured, refused)
        );
    }
    // The attacker's sockets are gone, and so are their captures: a connects again.
    let again = in_netns(&a.netns, || TcpStream::connect_timeout(&to, Duration::from_secs(5)));
    assert!(again.is_ok_and(|stream| answers(&stream)), "a's connection once its sockets are closed");
}
