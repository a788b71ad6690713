//! M7: capture bypassed by a socket mark. The capture hooks left alone every socket carrying
//! the agent's marks (0x539, 0x53a), and a pod sets a mark with CAP_NET_RAW (in containers'
//! default set). A pod then connects around its agent: in plaintext, without its identity, so
//! a DENY on its principal at the destination never sees it.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use ferrymesh_testbed::mesh::{wait_until, CONFIG_WAIT, HTTP_PORT};
use ferrymesh_testbed::topology::in_netns;
use ferrymesh_testbed::{Topology, TopologySpec};

/// The agent's socket marks, as docs/ARCHITECTURE.md publishes them.
const AGENT_MARKS: [u32; 2] = [0x539, 0x53a];

/// An HTTP GET from `netns` to `to` on a socket marked `mark`: the answer, or the error.
fn marked_get(netns: &str, to: SocketAddr, mark: u32) -> std::io::Result<String> {
    in_netns(netns, || {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.set_mark(mark)?;
        socket.set_read_timeout(Some(Duration::from_secs(5)))?;
        socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
        let mut stream: std::net::TcpStream = socket.into();
        stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer)?;
        Ok(answer)
    })
}

#[test]
fn a_pod_that_sets_the_agents_mark_is_still_captured() {
    let spec = TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "c", 2).pod("legacy", "x", 1);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    topo.write_pod(topo.pod("shop", "c"), &[("app", "c")]);
    topo.write_config_file(
        "policy-deny-a.yaml",
        "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-a\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: c\n  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/shop/sa/a\"]\n",
    );
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a"], CONFIG_WAIT * 4);
    topo.wait_enrolled(2, &["shop/c"], CONFIG_WAIT * 4);
    topo.serve_all();
    let (a, c) = (topo.pod("shop", "a"), topo.pod("shop", "c"));
    let to = SocketAddr::from((c.ip, HTTP_PORT));
    // a's own connections carry its identity, and c refuses them.
    wait_until(CONFIG_WAIT * 2, "c to refuse a", || topo.try_curl(a, c.ip.into()).0 != Some(0));
    // With the agent's marks, a's connections are captured all the same: c refuses them too
    // (the connection is reset, or ends without an answer from the app).
    for mark in AGENT_MARKS {
        let answer = marked_get(&a.netns, to, mark);
        let reached = answer.as_ref().is_ok_and(|body| body.contains(&format!("client {}:", a.ip)));
        assert!(!reached, "mark {mark:#x}: a reached c's app around its agent: {answer:?}");
    }
    // The same marked socket from x, a pod outside the mesh, reaches c's app (which takes
    // plaintext): the refusals above are the mesh's, not the socket code's.
    let x = topo.pod("legacy", "x");
    let answer = marked_get(&x.netns, to, AGENT_MARKS[0]).expect("x reaches c");
    assert!(answer.contains(&format!("client {}:", x.ip)), "{answer}");
}
