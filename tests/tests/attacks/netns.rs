//! C1: a Pod names the network namespace its agent enrolls. A tenant who may create a Pod
//! annotates it with the node's netns (or the host's, or another pod's), and the agent captures
//! that netns as the pod: every inbound connection to the node is reset, its outbound
//! connections leave as the tenant's pod.

use std::time::Duration;

use ferrymesh_testbed::kube_fake::objects;
use ferrymesh_testbed::kube_mesh::{pod_object, KubeMesh};
use ferrymesh_testbed::mesh::{bin, wait_until, CONFIG_WAIT, HTTP_PORT};
use ferrymesh_testbed::topology::{netns_cookie, FABRIC_IP};
use ferrymesh_testbed::{Topology, TopologySpec};
use serde_json::json;

/// Serves fm-peer in node `node`'s own netns (label `peer-node<N>`): a listener of the node
/// that no pod owns, as a kubelet's or sshd's would be.
fn serve_on_node(topo: &Topology, node: u8) {
    let label = format!("peer-node{node}");
    let mut cmd = topo.command_in(&topo.nodes[usize::from(node) - 1].netns, bin("fm-peer"));
    cmd.arg("serve");
    topo.spawn(&label, cmd);
    wait_until(Duration::from_secs(10), &format!("{label} to listen"), || {
        assert!(topo.is_running(&label), "{label} exited: {}", topo.log(&label));
        topo.log(&label).contains("ready")
    });
}

/// What a client in the fabric gets from `url` on a node: curl's exit code and the body.
fn from_fabric(topo: &Topology, url: &str) -> (Option<i32>, String) {
    let out = topo.output_in(&topo.fabric, "curl", &["-sS", "--max-time", "5", url]);
    (out.status.code(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

/// The node's own listeners answer the fabric: the agent's readiness port and an app of the node.
fn assert_node_answers(topo: &Topology, node: u8) {
    let ip = topo.nodes[usize::from(node) - 1].ip;
    let (code, body) = from_fabric(topo, &format!("http://{ip}:15021/healthz/ready"));
    assert_eq!(code, Some(0), "the node's readiness port from the fabric: {body}");
    let (code, body) = from_fabric(topo, &format!("http://{ip}:{HTTP_PORT}/"));
    assert_eq!(code, Some(0), "the node's own app from the fabric: {body}");
    assert!(body.starts_with(&format!("client {FABRIC_IP}:")), "the node's app saw the fabric: {body}");
}

#[test]
fn a_pod_naming_a_foreign_netns_is_enrolled_in_its_own_netns_only_in_kubernetes_mode() {
    let spec = TopologySpec::nodes(2)
        .pod("shop", "a", 1)
        .pod("shop", "evil-host", 1)
        .pod("shop", "evil-node", 1)
        .pod("shop", "c", 2);
    let topo = Topology::build(&spec);
    let (a, evil_host, evil_node, c) =
        (topo.pod("shop", "a"), topo.pod("shop", "evil-host"), topo.pod("shop", "evil-node"), topo.pod("shop", "c"));
    let node1_netns = format!("/var/run/netns/{}", topo.nodes[0].netns);
    let host_netns = "/proc/1/ns/net".to_string();
    let _mesh = KubeMesh::start(&topo, |fake| {
        fake.apply(objects::namespace("shop", json!({"ferrymesh.io/dataplane-mode": "enabled"})));
        for (pod, netns) in [(a, None), (evil_host, Some(&host_netns)), (evil_node, Some(&node1_netns)), (c, None)] {
            fake.apply(objects::service_account(&pod.namespace, &pod.name));
            let mut object = pod_object(pod, json!({"app": pod.name}));
            if let Some(netns) = netns {
                object["metadata"]["annotations"] = json!({"ferrymesh.io/netns": netns});
            }
            fake.apply(object);
        }
    });
    serve_on_node(&topo, 1);
    KubeMesh::serve_in_pod_cgroups(&topo, &[a, evil_host, evil_node, c]);
    topo.start_agent(1);
    topo.start_agent(2);
    assert_node_answers(&topo, 1);
    topo.wait_enrolled(1, &["shop/a", "shop/evil-host", "shop/evil-node"], CONFIG_WAIT * 4);
    topo.wait_enrolled(2, &["shop/c"], CONFIG_WAIT * 4);

    // Each pod is captured in its own netns, found by its cgroup; the node's is not captured.
    let node_cookie = netns_cookie(&topo.nodes[0].netns);
    let status = topo.status(1);
    for entry in status["enrolled"].as_array().expect("enrolled") {
        let pod = topo.pod("shop", entry["name"].as_str().expect("name"));
        assert_eq!(entry["netns_cookie"].as_u64(), Some(netns_cookie(&pod.netns)), "{entry}");
        assert_ne!(entry["netns_cookie"].as_u64(), Some(node_cookie), "{entry}");
    }
    // The node still answers, and the pods are served in their own netns.
    assert_node_answers(&topo, 1);
    for pod in [a, evil_host, evil_node] {
        let body = topo.curl(c, pod.ip);
        assert!(body.starts_with(&format!("client {}:", c.ip)), "{} saw {body}", pod.name);
    }
    // mesh-ctrl counted each ignored annotation once.
    let out = topo.output_in(&topo.fabric, "curl", &["-sS", "--max-time", "3", "http://127.0.0.1:15014/metrics"]);
    let text = String::from_utf8_lossy(&out.stdout);
    let scrape = ferrymesh_testbed::prom::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(scrape.sum("ferrymesh_ctrl_netns_annotations_ignored_total", &[]), 2.0, "{text}");
}

#[test]
fn the_agent_refuses_to_enroll_its_own_netns_or_another_pods_in_local_mode() {
    // Local mode honours the annotation (the operator writes the directory); the agent still
    // refuses a netns that is its own or not the pod's.
    let spec = TopologySpec::nodes(2)
        .pod("shop", "a", 1)
        .pod("shop", "evil-node", 1)
        .pod("shop", "evil-pod", 1)
        .pod("shop", "c", 2)
        .pod("legacy", "x", 1)
        .pod("legacy", "y", 1);
    let topo = Topology::build(&spec);
    let (a, c, x, y) = (topo.pod("shop", "a"), topo.pod("shop", "c"), topo.pod("legacy", "x"), topo.pod("legacy", "y"));
    topo.write_cluster(&["shop"]);
    let node1_netns = std::path::Path::new("/var/run/netns").join(&topo.nodes[0].netns);
    for (name, netns) in [("evil-node", node1_netns), ("evil-pod", y.netns_path())] {
        let pod = topo.pod("shop", name);
        let text = topo.pod_yaml_in(pod, &[], name, &netns);
        topo.write_config_file(&format!("pod-shop-{name}.yaml"), &text);
    }
    serve_on_node(&topo, 1);
    topo.start_mesh();
    for pod in [a, c, x, y] {
        topo.serve(pod);
    }
    // The agent has tried both attackers' pods (enrolled or refused) once a is enrolled and
    // its log names them.
    wait_until(CONFIG_WAIT * 4, "a to be enrolled, and the agent to have tried both attackers' pods", || {
        let log = topo.log("agent-node1");
        topo.enrolled(1).contains(&"shop/a".to_string())
            && ["shop/evil-node", "shop/evil-pod"].iter().all(|p| log.contains(p))
    });

    // y (not in the mesh) answers x as it did, and the node answers the fabric.
    let (code, body, _) = topo.try_curl(x, y.ip.into());
    assert_eq!(code, Some(0), "x -> y: {body}");
    assert!(body.starts_with(&format!("client {}:", x.ip)), "y saw {body}");
    assert_node_answers(&topo, 1);
    // a is captured in its own netns and still reaches c.
    let body = topo.curl(a, c.ip);
    assert!(body.starts_with(&format!("client {}:", a.ip)), "c saw {body}");
}
