//! End-to-end capture tests on the netns topology with real mesh-ctrl and mesh-agent
//! processes, real eBPF, curl and fm-peer. Needs root.
//!
//! The standard cluster: namespace `shop` enrolled with `a` and `b` on node 1 and `c` on
//! node 2; namespace `legacy` not enrolled with `x` on node 1 and `y` on node 2.

use std::time::Duration;

use ferrymesh_testbed::mesh::{
    cpu_seconds, wait_until, CONFIG_WAIT, DATAPLANE_MODE, ECHO_PORT, FLOW_WAIT, HTTP_PORT, SINK_PORT,
};
use ferrymesh_testbed::Topology;
use serde_json::Value;

const MB100: u64 = 100 * 1024 * 1024;

fn cluster() -> Topology {
    ferrymesh_testbed::mesh::two_node_mesh()
}

/// Flows of `node` matching `direction`, destination ip and port.
fn flows_to(topo: &Topology, node: u8, direction: &str, ip: &str, port: u16) -> Vec<Value> {
    topo.flows(node)
        .into_iter()
        .filter(|f| f["direction"] == direction && f["dst"]["ip"] == ip && f["dst"]["port"] == port)
        .collect()
}

fn counter(topo: &Topology, node: u8, name: &str) -> u64 {
    topo.status(node)["counters"][name].as_u64().unwrap_or_else(|| panic!("counter {name}"))
}

#[test]
fn enrolled_pod_reaches_pods_on_the_same_and_the_other_node() {
    let topo = cluster();
    let (a, b, c) = (topo.pod("shop", "a"), topo.pod("shop", "b"), topo.pod("shop", "c"));
    // b shares a's node: node-local handover; c is on the other node: HBONE (mTLS).
    for (dst, dst_node, transport) in [(b, 1, "node-local"), (c, 2, "mtls")] {
        // curl: the app at the destination sees a's real IP, through both agents.
        let body = topo.curl(a, dst.ip);
        assert!(body.starts_with(&format!("client {}:", a.ip)), "{} saw {body}", dst.name);
        // 100 MB, checksummed by the sink after a half-close.
        topo.send(a, dst.ip, MB100);

        let dst_ip = dst.ip.to_string();
        let outbound = flows_to(&topo, 1, "outbound", &dst_ip, SINK_PORT);
        assert_eq!(outbound.len(), 1, "one outbound flow to {dst_ip}:{SINK_PORT}: {outbound:?}");
        let f = &outbound[0];
        assert_eq!(f["verdict"], "allowed", "{f}");
        assert_eq!(f["transport"], transport, "{f}");
        assert_eq!(f["node"], "node1");
        assert_eq!(f["src"]["ip"], a.ip.to_string());
        assert_eq!((f["src"]["workload"].as_str(), f["src"]["namespace"].as_str()), (Some("a"), Some("shop")));
        assert_eq!(
            (f["dst"]["workload"].as_str(), f["dst"]["namespace"].as_str()),
            (Some(dst.name.as_str()), Some("shop"))
        );
        assert_eq!(f["bytes_sent"], MB100, "{f}");
        assert!(f["bytes_received"].as_u64().unwrap() > 64, "the sink's answer came back: {f}");
        for key in ["time", "duration_ms", "reason"] {
            assert!(!f[key].is_null(), "flow has {key}: {f}");
        }
        let http = flows_to(&topo, 1, "outbound", &dst_ip, HTTP_PORT);
        assert_eq!(http.len(), 1, "{http:?}");

        // The destination agent captured the same connection inbound (dst is enrolled).
        let inbound = flows_to(&topo, dst_node, "inbound", &dst_ip, SINK_PORT);
        assert_eq!(inbound.len(), 1, "{inbound:?}");
        assert_eq!(inbound[0]["src"]["ip"], a.ip.to_string());
        assert_eq!(inbound[0]["bytes_sent"], MB100);
        assert_eq!(inbound[0]["transport"], transport);
    }
    // Closed connections leave nothing behind in the original-destination maps.
    let entries = |map: &str| {
        let status = topo.status(1);
        let maps = status["maps"].as_array().expect("maps").clone();
        maps.iter().find(|m| m["name"] == map).and_then(|m| m["entries"].as_u64()).expect("map listed")
    };
    wait_until(Duration::from_secs(3), "the original-destination maps to empty", || {
        entries("ORIG_BY_COOKIE") == 0 && entries("ORIG_BY_PORT") == 0
    });
    // Bulk both ways at once through HBONE, then idle: a relay that loops without waiting (on
    // a stale readiness, or on tokio's spent cooperative budget) stalls the transfer and burns
    // a CPU.
    topo.start_iperf3_server(c);
    let bidir = topo.output_in(&a.netns, "timeout", &["20", "iperf3", "-c", &c.ip.to_string(), "--bidir", "-t", "2"]);
    assert!(bidir.status.success(), "iperf3 --bidir a -> c: {}", String::from_utf8_lossy(&bidir.stdout));
    let agents = [1, 2].map(|n| topo.pid(&format!("agent-node{n}")).expect("agent pid"));
    let before = agents.map(cpu_seconds);
    std::thread::sleep(Duration::from_secs(2));
    for (pid, before) in agents.into_iter().zip(before) {
        let used = cpu_seconds(pid) - before;
        assert!(used < 0.5, "agent {pid} used {used:.2} CPU seconds in 2 s without traffic");
    }
}

/// TCP packets tcpdump sees on every device of node 1's netns while `traffic` runs.
fn packets_on_node1(topo: &Topology, label: &str, traffic: impl FnOnce()) -> usize {
    let node1 = topo.nodes[0].netns.clone();
    let capture = topo.start_capture(label, &node1, "any");
    traffic();
    topo.stop_capture(&capture, &node1, ferrymesh_testbed::topology::FABRIC_IP);
    topo.captured_tcp(&capture).len()
}

#[test]
fn node_local_traffic_never_reaches_a_network_device() {
    let topo = cluster();
    let (a, b, c) = (topo.pod("shop", "a"), topo.pod("shop", "b"), topo.pod("shop", "c"));
    let local = packets_on_node1(&topo, "tcpdump-local", || {
        topo.send(a, b.ip, 8 * 1024 * 1024);
    });
    assert_eq!(local, 0, "a -> b (same node) put {local} packets on node 1's devices");
    // The same capture does see traffic that leaves a pod: a -> c goes over HBONE.
    let remote = packets_on_node1(&topo, "tcpdump-remote", || {
        topo.send(a, c.ip, 1024 * 1024);
    });
    assert!(remote > 100, "the capture sees a -> c: {remote} packets");
    let mut flows = Vec::new();
    wait_until(FLOW_WAIT, "the flow of a -> b", || {
        flows = flows_to(&topo, 1, "outbound", &b.ip.to_string(), SINK_PORT);
        !flows.is_empty()
    });
    assert_eq!(flows[0]["transport"], "node-local", "{flows:?}");
}

#[test]
fn pods_that_are_not_enrolled_are_not_captured() {
    let topo = cluster();
    let (x, y) = (topo.pod("legacy", "x"), topo.pod("legacy", "y"));
    let captured_before = (counter(&topo, 1, "captured"), counter(&topo, 2, "captured"));
    let body = topo.curl(x, y.ip);
    assert!(body.starts_with(&format!("client {}:", x.ip)), "{body}");
    topo.send(x, y.ip, 1024 * 1024);
    // The capture hooks count synchronously, in the connect() itself.
    assert_eq!((counter(&topo, 1, "captured"), counter(&topo, 2, "captured")), captured_before);
    // An enrolled pod's connection after them, on each node: once its flow is listed, any flow
    // of x's and y's would be too (flows are listed as connections end).
    let (a, c) = (topo.pod("shop", "a"), topo.pod("shop", "c"));
    topo.curl(a, c.ip);
    for node in [1, 2] {
        wait_until(FLOW_WAIT, &format!("node{node}'s flow of a -> c"), || !topo.flows(node).is_empty());
        let flows = topo.flows(node);
        assert!(
            flows.iter().all(|f| f["src"]["ip"] == a.ip.to_string()),
            "node{node} recorded a flow of an unenrolled pod: {flows:?}"
        );
    }
}

#[test]
fn plaintext_from_an_unenrolled_pod_to_an_enrolled_pod_is_captured_inbound() {
    let topo = cluster();
    let (x, b) = (topo.pod("legacy", "x"), topo.pod("shop", "b"));
    let (y, c) = (topo.pod("legacy", "y"), topo.pod("shop", "c"));
    for (client, server, node) in [(x, b, 1), (x, c, 2), (y, b, 1)] {
        let body = topo.curl(client, server.ip);
        assert!(
            body.starts_with(&format!("client {}:", client.ip)),
            "{} must see the real client IP: {body}",
            server.name
        );
        // A flow is recorded when the agent's relay ends, which may be just after curl exits.
        let mut inbound = Vec::new();
        wait_until(FLOW_WAIT, "the inbound flow of the curl", || {
            inbound = flows_to(&topo, node, "inbound", &server.ip.to_string(), HTTP_PORT);
            inbound.iter().any(|f| f["src"]["ip"] == client.ip.to_string())
        });
        let from_client: Vec<&Value> = inbound.iter().filter(|f| f["src"]["ip"] == client.ip.to_string()).collect();
        assert_eq!(from_client.len(), 1, "{inbound:?}");
        let f = from_client[0];
        assert_eq!(f["verdict"], "allowed");
        assert_eq!(
            (f["src"]["workload"].as_str(), f["src"]["namespace"].as_str()),
            (Some(client.name.as_str()), Some("legacy"))
        );
        assert!(f["bytes_received"].as_u64().unwrap() > 0);
    }
    // x is not enrolled: nothing outbound was recorded for it.
    assert!(topo.flows(1).iter().all(|f| f["direction"] != "outbound"));
}

#[test]
fn enrolling_and_unenrolling_live_keeps_established_connections() {
    let topo = cluster();
    let (x, y) = (topo.pod("legacy", "x"), topo.pod("legacy", "y"));
    // Established before enrolment, lasting through enrol and unenrol (about 6 s).
    let before = topo.start_ping("ping-before", x, y.ip, 60);

    topo.write_namespace("legacy", &[(DATAPLANE_MODE, "enabled")]);
    topo.wait_enrolled(1, &["legacy/x", "shop/a", "shop/b"], CONFIG_WAIT);
    topo.wait_enrolled(2, &["legacy/y", "shop/c"], CONFIG_WAIT);
    topo.curl(x, y.ip);
    wait_until(FLOW_WAIT, "the new connection of x to be captured", || {
        !flows_to(&topo, 1, "outbound", &y.ip.to_string(), HTTP_PORT).is_empty()
    });
    // Established while enrolled (proxied by both agents), lasting through the unenrolment.
    let during = topo.start_ping("ping-during", x, y.ip, 30);
    let peer = format!("-> {}:{ECHO_PORT}", y.ip);
    assert!(topo.log(&during).contains(&peer), "getpeername() shows the original peer: {}", topo.log(&during));
    assert!(counter(&topo, 1, "peer_restored") > 0);

    topo.write_pod(x, &[(DATAPLANE_MODE, "none")]);
    topo.wait_enrolled(1, &["shop/a", "shop/b"], CONFIG_WAIT);
    let captured = counter(&topo, 1, "captured");
    let body = topo.curl(x, y.ip);
    assert!(body.starts_with(&format!("client {}:", x.ip)), "{body}");
    assert_eq!(counter(&topo, 1, "captured"), captured, "an opted-out pod is not captured");

    topo.write_namespace("legacy", &[]);
    topo.wait_enrolled(2, &["shop/c"], CONFIG_WAIT);
    topo.wait_success(&before, Duration::from_secs(15));
    topo.wait_success(&during, Duration::from_secs(15));
    wait_until(FLOW_WAIT, "the flow of the connection made while enrolled", || {
        !flows_to(&topo, 1, "outbound", &y.ip.to_string(), ECHO_PORT).is_empty()
    });
    let echo = flows_to(&topo, 1, "outbound", &y.ip.to_string(), ECHO_PORT);
    assert_eq!(echo.len(), 1, "only the connection made while enrolled was proxied: {echo:?}");
    assert_eq!(echo[0]["bytes_sent"], echo[0]["bytes_received"], "echo: {}", echo[0]);
}

/// Connections made from the machine's own network namespace (this test process) while agents
/// run with enrolled pods: the node-wide cgroup hooks see them, and must leave them alone
/// before anything else (the netns cookie is not enrolled), so no agent counts them, not even
/// as "bypassed" (what an enrolled pod's loopback connect() counts as).
#[test]
fn the_machines_own_connections_are_neither_rewritten_nor_counted() {
    use std::io::{Read, Write};
    use std::net::{SocketAddr, TcpListener, TcpStream};

    let topo = cluster();
    let counters = || [1, 2].map(|node| topo.status(node)["counters"].clone());
    let flows = || [1, 2].map(|node| topo.flows(node).len());
    let (counters_before, flows_before) = (counters(), flows());
    assert!(counters_before[0]["captured"].as_u64().is_some(), "{:?}", counters_before[0]);
    let mut targets: Vec<(&str, Option<&str>)> = vec![("127.0.0.1:0", None)];
    if std::net::TcpListener::bind("[::1]:0").is_ok() {
        // IPv6 loopback, and IPv4-mapped IPv6 through a dual-stack socket (connect6's mapped path).
        targets.push(("[::1]:0", None));
        targets.push(("[::]:0", Some("::ffff:127.0.0.1")));
    }
    for (bind, connect_ip) in targets {
        let listener = TcpListener::bind(bind).unwrap();
        let mut addr = listener.local_addr().unwrap();
        if let Some(ip) = connect_ip {
            addr = SocketAddr::new(ip.parse().unwrap(), addr.port());
        }
        for _ in 0..20 {
            let mut client = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
            let (mut server, peer) = listener.accept().unwrap();
            // The listener accepted this very client (not a rewritten connection), and the
            // client's peer is the address it asked for.
            assert_eq!(peer.port(), client.local_addr().unwrap().port());
            assert_eq!(client.peer_addr().unwrap(), addr, "getpeername() is untouched");
            client.write_all(b"x").unwrap();
            let mut byte = [0u8; 1];
            server.read_exact(&mut byte).unwrap();
            server.write_all(&byte).unwrap();
            client.read_exact(&mut byte).unwrap();
            assert_eq!(&byte, b"x");
        }
    }
    assert_eq!(counters(), counters_before, "no agent counted the machine's own connections");
    assert_eq!(flows(), flows_before, "no agent recorded a flow for them");
}

#[test]
fn native_ipv6_of_enrolled_pods_is_captured_never_bypassed_and_other_pods_are_untouched() {
    let topo = cluster();
    let (a, b, c) = (topo.pod("shop", "a"), topo.pod("shop", "b"), topo.pod("shop", "c"));
    let (x, y) = (topo.pod("legacy", "x"), topo.pod("legacy", "y"));
    // a is enrolled with both its addresses.
    let status = topo.status(1);
    let enrolled_a = status["enrolled"].as_array().unwrap().iter().find(|e| e["name"] == "a").cloned();
    assert_eq!(enrolled_a.map(|e| e["other_ips"].clone()), Some(serde_json::json!([a.ip6.to_string()])), "{status}");
    // Unenrolled pods talk IPv6 across the nodes as before: nothing captures it.
    let captured_before = counter(&topo, 1, "captured");
    let (code, body, _) = topo.try_curl(x, y.ip6.into());
    assert_eq!(code, Some(0), "x -> y over IPv6: {body}");
    assert!(body.starts_with(&format!("client [{}]:", x.ip6)), "{body}");
    assert_eq!(counter(&topo, 1, "captured"), captured_before, "x's connection was not captured");
    // An enrolled pod's native IPv6 connect is captured to [::1]:15001 and carried: to b on
    // its node (node-local) and to c on the other (HBONE over IPv6); the app sees a's IPv6.
    for (dst, dst_node, transport) in [(b, 1, "node-local"), (c, 2, "mtls")] {
        let (code, body, _) = topo.try_curl(a, dst.ip6.into());
        assert_eq!(code, Some(0), "a -> {} over IPv6: {body}", dst.name);
        assert!(body.starts_with(&format!("client [{}]:", a.ip6)), "{} saw {body}", dst.name);
        topo.send_with(a, dst.ip6, 4 * 1024 * 1024, &[]);
        let dst_ip = dst.ip6.to_string();
        wait_until(FLOW_WAIT, "the flows of the IPv6 transfer", || {
            flows_to(&topo, 1, "outbound", &dst_ip, SINK_PORT).len() == 1
                && flows_to(&topo, dst_node, "inbound", &dst_ip, SINK_PORT).len() == 1
        });
        for (node, direction) in [(1, "outbound"), (dst_node, "inbound")] {
            let f = &flows_to(&topo, node, direction, &dst_ip, SINK_PORT)[0];
            assert_eq!((f["verdict"].as_str(), f["transport"].as_str()), (Some("allowed"), Some(transport)), "{f}");
            assert_eq!(f["src"]["ip"], a.ip6.to_string(), "{f}");
            assert_eq!(
                (f["src"]["workload"].as_str(), f["dst"]["workload"].as_str()),
                (Some("a"), Some(dst.name.as_str()))
            );
            assert_eq!(f["src"]["identity"], "spiffe://cluster.local/ns/shop/sa/a", "{f}");
            assert_eq!(f["dst"]["identity"], format!("spiffe://cluster.local/ns/shop/sa/{}", dst.name), "{f}");
            assert_eq!(f["bytes_sent"], 4 * 1024 * 1024, "{f}");
        }
    }
    assert!(counter(&topo, 1, "captured") >= captured_before + 4, "node1 captured a's IPv6 connects");
    // getpeername() shows the app its original IPv6 peer, not [::1]:15001.
    let to = std::net::SocketAddr::new(c.ip6.into(), ECHO_PORT).to_string();
    let out = topo.output_in(&a.netns, ferrymesh_testbed::mesh::bin("fm-peer"), &["ping", "--to", &to, "--count", "1"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && text.contains(&format!("-> {to}")),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Plaintext IPv6 from outside the mesh to an enrolled pod is steered to its agent, which
    // records it (and would apply policy to it) before the app sees the client's IPv6.
    let (code, body, _) = topo.try_curl(x, c.ip6.into());
    assert_eq!(code, Some(0), "x -> c over IPv6: {body}");
    assert!(body.starts_with(&format!("client [{}]:", x.ip6)), "{body}");
    wait_until(FLOW_WAIT, "c's inbound plaintext IPv6 flow", || {
        flows_to(&topo, 2, "inbound", &c.ip6.to_string(), HTTP_PORT)
            .iter()
            .any(|f| f["transport"] == "plaintext" && f["src"]["ip"] == x.ip6.to_string())
    });
    // Loopback inside an enrolled pod is left alone; IPv4 between the same pods is carried as ever.
    let (code, body, _) = topo.try_curl(a, std::net::Ipv6Addr::LOCALHOST.into());
    assert_eq!(code, Some(0), "a -> [::1] stays inside the pod: {body}");
    let body = topo.curl(a, c.ip);
    assert!(body.starts_with(&format!("client {}:", a.ip)), "{body}");
}
