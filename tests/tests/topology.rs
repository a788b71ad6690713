//! Tests of the topology harness itself: connectivity, isolation from the real network, and
//! teardown on drop and on panic.

use std::process::Command;

use ferrymesh_testbed::{Topology, TopologySpec};

fn netns_exists(name: &str) -> bool {
    let out = Command::new("ip").args(["netns", "list"]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).lines().any(|l| l.split_whitespace().next() == Some(name))
}

fn spec() -> TopologySpec {
    TopologySpec::nodes(2).pod("a", "p1", 1).pod("a", "p2", 1).pod("b", "p3", 2)
}

#[test]
fn pods_reach_each_other_on_one_node_and_across_nodes() {
    let topo = Topology::build(&spec());
    let (p1, p2, p3) = (topo.pod("a", "p1"), topo.pod("a", "p2"), topo.pod("b", "p3"));
    assert_eq!(p1.ip.to_string(), "10.244.1.2");
    assert_eq!(p3.ip.to_string(), "10.244.2.2");
    for pod in [p1, p2, p3] {
        topo.serve(pod);
    }
    for (from, to) in [(p1, p2), (p1, p3), (p3, p1)] {
        let body = topo.curl(from, to.ip);
        assert!(body.starts_with(&format!("client {}:", from.ip)), "{} -> {}: {body}", from.name, to.name);
    }
}

#[test]
fn no_namespace_has_a_route_to_the_real_network() {
    let topo = Topology::build(&spec());
    let mut namespaces: Vec<&str> = topo.nodes.iter().map(|n| n.netns.as_str()).collect();
    namespaces.extend(topo.pods.iter().map(|p| p.netns.as_str()));
    namespaces.push(&topo.fabric);
    for ns in namespaces {
        // `ip route get` only consults the routing table; nothing is sent. A pod's default
        // route ends at its node, which has no route for outside addresses.
        let out = topo.output_in(ns, "ip", &["route", "get", "192.0.2.1"]);
        let text = String::from_utf8_lossy(&out.stdout);
        let node_ip = text.split_whitespace().skip_while(|w| *w != "via").nth(1).map(str::to_string);
        match node_ip {
            None => assert!(!out.status.success(), "{ns} has a route out: {text}"),
            Some(gw) => {
                assert!(gw.starts_with("10.244."), "{ns} routes out via {gw}");
                let node = &topo.nodes[usize::from(gw.split('.').nth(2).unwrap().parse::<u8>().unwrap()) - 1];
                let out = topo.output_in(&node.netns, "ip", &["route", "get", "192.0.2.1"]);
                assert!(!out.status.success(), "node {} has a route out", node.name);
            }
        }
    }
}

#[test]
fn teardown_removes_everything_on_drop_and_on_panic() {
    let topo = Topology::build(&spec());
    let names: Vec<String> = topo.pods.iter().map(|p| p.netns.clone()).chain([topo.fabric.clone()]).collect();
    let dir = topo.dir.clone();
    assert!(names.iter().all(|n| netns_exists(n)));
    drop(topo);
    assert!(names.iter().all(|n| !netns_exists(n)), "namespaces left after drop");
    assert!(!dir.exists());

    let built = std::sync::Mutex::new(Vec::new());
    let result = std::panic::catch_unwind(|| {
        let topo = Topology::build(&spec());
        let mut sleeper = topo.command_in(&topo.pods[0].netns, "sleep");
        sleeper.arg("600");
        let pid = topo.spawn("sleeper", sleeper);
        built.lock().unwrap().push((topo.fabric.clone(), pid));
        panic!("test failure inside a topology");
    });
    assert!(result.is_err());
    let (fabric, pid) = built.lock().unwrap()[0].clone();
    assert!(!netns_exists(&fabric), "namespaces left after panic");
    assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists(), "process left after panic");
}
