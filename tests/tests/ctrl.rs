//! The control channel to mesh-ctrl (15012), end to end with the real binaries: TLS 1.3 on the
//! wire with nothing readable in it (no token, no SPIFFE ID, no PEM), agents that refuse
//! plaintext, a root that is not the mesh's and an impostor mesh-ctrl, and a node token that
//! cannot obtain the identity of another node's pod. Needs root; uses tcpdump.

use std::time::Duration;

use ferrymesh_testbed::mesh::{bin, wait_until, CONFIG_WAIT};
use ferrymesh_testbed::pcap::{contains, tcp_payloads};
use ferrymesh_testbed::prom;
use ferrymesh_testbed::topology::FABRIC_IP;
use ferrymesh_testbed::{Topology, TopologySpec};

fn identities(topo: &Topology, node: u8) -> Vec<String> {
    let status = topo.try_status(node).unwrap_or_default();
    let certs = status["certs"].as_array().cloned().unwrap_or_default();
    certs.iter().map(|c| c["identity"].as_str().unwrap().to_string()).collect()
}

/// mesh-ctrl's metrics, read by the strict parser.
fn ctrl_metrics(topo: &Topology) -> prom::Exposition {
    let url = format!("http://{FABRIC_IP}:15020/metrics");
    let out = topo.output_in(&topo.fabric, "curl", &["-sS", "--max-time", "3", &url]);
    assert!(out.status.success(), "scrape mesh-ctrl: {}", String::from_utf8_lossy(&out.stderr));
    prom::parse(&String::from_utf8(out.stdout).unwrap()).expect("valid Prometheus text")
}

#[test]
fn the_control_channel_is_tls13_and_nothing_crosses_it_in_clear() {
    let topo = Topology::build(&TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "c", 2));
    topo.write_cluster(&["shop"]);
    // Everything the agents and mesh-ctrl say, from the agents' first connection on.
    let capture = topo.start_capture("tcpdump-ctrl", &topo.fabric, "br0");
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["shop/c"], Duration::from_secs(10));
    wait_until(Duration::from_secs(10), "both agents to hold their pods' certificates", || {
        identities(&topo, 1) == ["spiffe://cluster.local/ns/shop/sa/a"]
            && identities(&topo, 2) == ["spiffe://cluster.local/ns/shop/sa/c"]
    });
    // A config change streamed to both agents.
    let versions = [1, 2].map(|n| topo.status(n)["config_version"].as_u64().unwrap());
    topo.write_pod(topo.pod("shop", "a"), &[("app", "a")]);
    wait_until(CONFIG_WAIT, "the change to reach both agents", || {
        [1, 2].iter().zip(versions).all(|(&n, v)| topo.status(n)["config_version"].as_u64().unwrap() > v)
    });
    topo.stop_capture(&capture, &topo.nodes[0].netns, FABRIC_IP);

    let packets = tcp_payloads(&std::fs::read(&capture.pcap).unwrap());
    let stream = |keep: &dyn Fn(u16, u16) -> bool| -> Vec<u8> {
        packets.iter().filter(|(s, d, _)| keep(*s, *d)).flat_map(|(_, _, p)| p.clone()).collect()
    };
    let (to_ctrl, from_ctrl) = (stream(&|_, d| d == 15012), stream(&|s, _| s == 15012));
    assert!(to_ctrl.len() > 1000 && from_ctrl.len() > 1000, "captured {} / {} bytes", to_ctrl.len(), from_ctrl.len());
    // The ServerHello's supported_versions extension selects TLS 1.3 (0x0304).
    assert!(contains(&from_ctrl, &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]), "mesh-ctrl selected TLS 1.3");
    let everything = stream(&|_, _| true);
    let tokens = [1, 2].map(|n| std::fs::read(topo.token_file(n)).unwrap());
    let mut secrets: Vec<(&str, &[u8])> = vec![
        ("a SPIFFE ID", b"spiffe://"),
        ("a PEM header", b"-----BEGIN"),
        ("a namespace/service account", b"ns/shop/sa/"),
        ("the gRPC method of the CA", b"CreateCertificate"),
    ];
    secrets.extend(tokens.iter().map(|t| ("a node token", t.as_slice())));
    for (what, secret) in secrets {
        assert!(!contains(&everything, secret), "{what} crossed the fabric in clear");
    }
}

#[test]
fn an_agent_refuses_plaintext_a_foreign_root_and_an_impostor_mesh_ctrl() {
    let topo = Topology::build(&TopologySpec::nodes(1).pod("shop", "a", 1));
    topo.write_cluster(&["shop"]);
    topo.start_ctrl(&[]);
    let node1 = topo.nodes[0].netns.clone();
    let root = topo.ca_root().display().to_string();
    let socket = topo.dir.join("refused.sock").display().to_string();
    let refused = |args: &[&str]| {
        let mut all = vec!["--node-name", "node1", "--admin-socket", &socket];
        all.extend_from_slice(args);
        let out = topo.output_in(&node1, bin("mesh-agent"), &all);
        assert!(!out.status.success(), "{args:?}: the agent must not start");
        String::from_utf8_lossy(&out.stderr).to_string()
    };
    let plain = refused(&["--ctrl", &format!("http://{FABRIC_IP}:15012"), "--ca-root", &root]);
    assert!(plain.contains("mesh-ctrl is only reached over TLS; use https://<host>:15012"), "{plain}");
    assert!(plain.contains("--ca-root FILE (local mode: root-cert.pem in mesh-ctrl's --ca-dir"), "{plain}");
    let rootless = refused(&["--ctrl", &topo.ctrl_address()]);
    assert!(rootless.contains("no --ca-root: the agent verifies mesh-ctrl before sending it anything"), "{rootless}");

    // A root that is not this mesh's: the agent keeps refusing mesh-ctrl, and says why.
    let other = topo.dir.join("other-ca");
    std::fs::create_dir_all(&other).unwrap();
    let (other_root, _) = generate_root();
    std::fs::write(other.join("foreign-root.pem"), other_root).unwrap();
    let foreign = other.join("foreign-root.pem").display().to_string();
    topo.spawn("agent-node1", topo.agent_command(1, &[("--ca-root", &foreign)]));
    wait_until(Duration::from_secs(10), "the agent to refuse mesh-ctrl", || {
        topo.log("agent-node1").contains("its certificate does not chain to --ca-root")
    });
    let status = topo.status(1);
    assert_eq!((status["ctrl_connected"].as_bool(), status["config_version"].as_u64()), (Some(false), Some(0)));
    assert!(ctrl_metrics(&topo).sum("ferrymesh_ctrl_tls_handshake_failures_total", &[]) >= 1.0);
    topo.signal_and_wait("agent-node1", libc::SIGTERM);

    // An impostor: a mesh-ctrl with a valid certificate from another CA, at the real address.
    topo.signal_and_wait("mesh-ctrl", libc::SIGTERM);
    topo.start_ctrl(&["--ca-dir", other.to_str().unwrap()]);
    topo.spawn("agent-node1", topo.agent_command(1, &[]));
    wait_until(Duration::from_secs(10), "the agent to refuse the impostor", || {
        topo.log("agent-node1").contains("its certificate does not chain to --ca-root")
    });
    let impostor = ctrl_metrics(&topo);
    assert!(impostor.sum("ferrymesh_ctrl_tls_handshake_failures_total", &[]) >= 1.0);
    assert_eq!(impostor.sum("ferrymesh_ctrl_connected_agents", &[]), 0.0, "no config stream to the impostor");
    assert_eq!(impostor.sum("ferrymesh_ctrl_certs_issued_total", &[]), 0.0);
    let impostor_log = topo.log("mesh-ctrl");
    assert!(!impostor_log.contains("agent connected"), "the agent said nothing to the impostor: {impostor_log}");
}

/// A new root (certificate PEM, key PEM) that is not the mesh's.
fn generate_root() -> (String, String) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "ferrymesh root CA");
    (params.self_signed(&key).unwrap().pem(), key.serialize_pem())
}

#[test]
fn a_node_token_cannot_obtain_the_identity_of_another_nodes_pod() {
    let topo = Topology::build(&TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "c", 2));
    topo.write_cluster(&["shop"]);
    topo.start_ctrl(&[]);
    // node1's agent holding node2's token: mesh-ctrl knows it as node2, which runs no shop/a.
    let node2_token = topo.token_file(2).display().to_string();
    topo.spawn("agent-node1", topo.agent_command(1, &[("--token-file", &node2_token)]));
    let refusal = "node node2 runs no pod with identity spiffe://cluster.local/ns/shop/sa/a; an agent may only obtain identities of pods on its own node";
    wait_until(Duration::from_secs(10), "the agent to log the refusal", || topo.log("agent-node1").contains(refusal));
    assert!(identities(&topo, 1).is_empty(), "no certificate was issued");
    let ctrl_log = topo.log("mesh-ctrl");
    assert!(
        ctrl_log.lines().any(|l| l.contains("refused a certificate: no such pod on the node")
            && l.contains("node=node2")
            && l.contains("spiffe://cluster.local/ns/shop/sa/a")),
        "{ctrl_log}"
    );
    let metrics = ctrl_metrics(&topo);
    assert!(metrics.sum("ferrymesh_ctrl_cert_refusals_total", &[]) >= 1.0);
    assert_eq!(metrics.sum("ferrymesh_ctrl_certs_issued_total", &[]), 0.0);
}
