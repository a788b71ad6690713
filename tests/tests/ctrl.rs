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
    let url = format!("http://{FABRIC_IP}:15014/metrics");
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
    let token = topo.token_file(1).display().to_string();
    let refused = |args: &[&str]| {
        let mut all = vec!["--node-name", "node1", "--admin-socket", &socket, "--token-file", &token];
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
fn a_node_token_cannot_obtain_the_config_or_identities_of_another_node() {
    let topo = Topology::build(&TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "c", 2));
    topo.write_cluster(&["shop"]);
    topo.start_ctrl(&[]);
    // node1's agent holding node2's token: mesh-ctrl knows it as node2, which may not watch
    // node1's config (and runs no shop/a, whose certificate it could then ask for; the CA's own
    // refusal of that is in mesh-ctrl/tests/certs.rs).
    let node2_token = topo.token_file(2).display().to_string();
    topo.spawn("agent-node1", topo.agent_command(1, &[("--token-file", &node2_token)]));
    let refusal = "the token is node node2's: it cannot watch node node1's config";
    wait_until(Duration::from_secs(10), "the agent to log the refusal", || topo.log("agent-node1").contains(refusal));
    let status = topo.status(1);
    assert_eq!(status["config_version"], 0, "no config reached it: {status}");
    assert!(identities(&topo, 1).is_empty(), "no certificate was issued");
    let metrics = ctrl_metrics(&topo);
    assert!(metrics.sum("ferrymesh_ctrl_config_refusals_total", &[("reason", "scope")]) >= 1.0);
    assert_eq!(metrics.sum("ferrymesh_ctrl_certs_issued_total", &[]), 0.0);
}

/// Replaces `path` with `text` in one step (write aside, rename), as `kubectl apply` replaces a
/// Secret: mesh-ctrl never reads a half-written CA file.
fn replace_file(path: &std::path::Path, text: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).unwrap();
    std::fs::rename(&aside, path).unwrap();
}

/// The SHA-256 of every root in the trust bundle the agent of `node` holds, and of the CA
/// certificate that signed each of its workload certificates.
fn trust_of(topo: &Topology, node: u8) -> (Vec<String>, Vec<String>) {
    let status = topo.try_status(node).unwrap_or_default();
    let all = |key: &str, field: &str| -> Vec<String> {
        let items = status[key].as_array().cloned().unwrap_or_default();
        items.iter().map(|r| r[field].as_str().unwrap_or_default().to_string()).collect()
    };
    (all("trust_roots", "sha256"), all("certs", "issuer_sha256"))
}

/// `ok` and `failed` lines of an `fm-peer hits --progress` so far.
fn hit_counts(topo: &Topology, label: &str) -> (usize, Vec<String>) {
    let log = topo.log(label);
    let failed = log.lines().filter(|l| l.starts_with("failed") || l.starts_with("fm-peer:")).map(String::from);
    (log.lines().filter(|l| *l == "ok").count(), failed.collect())
}

/// The whole root rotation, with traffic between two nodes both ways all along: a connection
/// opened before it that stays open through it, and new connections every 20 ms. Add a second
/// root, switch signing to it, remove the old one; not one connection may fail.
#[test]
fn a_root_rotation_fails_no_connection() {
    let topo = Topology::build(&TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "b", 1).pod("shop", "c", 2));
    topo.write_cluster(&["shop"]);
    topo.start_mesh_with(&["--ca-reload-interval", "300ms"]);
    topo.wait_enrolled(1, &["shop/a", "shop/b"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["shop/c"], Duration::from_secs(10));
    topo.serve_all();
    let (a, b, c) = (topo.pod("shop", "a"), topo.pod("shop", "b"), topo.pod("shop", "c"));
    wait_until(Duration::from_secs(10), "both agents to hold one root and certificates from it", || {
        [1, 2].iter().all(|&n| {
            let (roots, issuers) = trust_of(&topo, n);
            roots.len() == 1 && !issuers.is_empty() && issuers.iter().all(|i| *i == roots[0])
        })
    });
    let old = trust_of(&topo, 1).0[0].clone();

    let long_lived = topo.start_ping("long-lived", a, c.ip, 600);
    for (label, from, to) in [("hits-a-c", a, c), ("hits-c-a", c, a)] {
        let mut hits = topo.command_in(&from.netns, bin("fm-peer"));
        let to = format!("{}:{}", to.ip, ferrymesh_testbed::mesh::HTTP_PORT);
        hits.args(["hits", "--to", &to, "--count", "3000", "--interval-ms", "20", "--progress"]);
        topo.spawn(label, hits);
    }
    // New connections both ways in every phase: at least 10 more each, none failed.
    let mut done = (0, 0);
    let mut phase = |name: &str| {
        let want = (done.0 + 10, done.1 + 10);
        wait_until(Duration::from_secs(10), &format!("new connections both ways {name}"), || {
            let (ac, ca) = (hit_counts(&topo, "hits-a-c"), hit_counts(&topo, "hits-c-a"));
            assert!(ac.1.is_empty() && ca.1.is_empty(), "a connection failed {name}: {:?} {:?}", ac.1, ca.1);
            done = (ac.0, ca.0);
            done.0 >= want.0 && done.1 >= want.1
        });
    };
    phase("before the rotation");

    // 1. Add the new root: the bundle holds both (in local mode each node's --ca-root file is
    //    given the same bundle; here the agents read mesh-ctrl's root-cert.pem itself).
    let ca = topo.ca_dir();
    let old_pem = std::fs::read_to_string(ca.join("root-cert.pem")).unwrap();
    let (new_pem, new_key) = generate_root();
    replace_file(&ca.join("root-cert.pem"), &format!("{old_pem}{new_pem}"));
    wait_until(Duration::from_secs(10), "both agents to trust both roots", || {
        [1, 2].iter().all(|&n| trust_of(&topo, n).0.len() == 2)
    });
    let new = trust_of(&topo, 1).0.into_iter().find(|r| *r != old).unwrap();
    phase("with both roots trusted");

    // 2. Switch: mesh-ctrl signs with the new root; every workload certificate is re-issued.
    replace_file(&ca.join("root-key.pem"), &new_key);
    wait_until(Duration::from_secs(15), "every workload certificate to be re-issued from the new root", || {
        [1, 2].iter().all(|&n| {
            let issuers = trust_of(&topo, n).1;
            issuers.len() == if n == 1 { 2 } else { 1 } && issuers.iter().all(|i| *i == new)
        })
    });
    phase("after the switch");

    // 3. Remove the old root.
    replace_file(&ca.join("root-cert.pem"), &new_pem);
    wait_until(Duration::from_secs(10), "both agents to trust the new root alone", || {
        [1, 2].iter().all(|&n| trust_of(&topo, n).0 == [new.clone()])
    });
    phase("after the old root was removed");

    // The connection opened before the rotation is still up (fm-peer ping exits on any error).
    assert!(topo.is_running(&long_lived), "the long-lived connection broke: {}", topo.log(&long_lived));
    assert!(!topo.log(&long_lived).contains("fm-peer:"), "{}", topo.log(&long_lived));
    // A pod that never connected before: a fresh mTLS handshake, each side verifying the other
    // against the new root alone.
    let fresh = topo.output_in(
        &b.netns,
        bin("fm-peer"),
        &["hits", "--to", &format!("{}:{}", c.ip, ferrymesh_testbed::mesh::HTTP_PORT), "--count", "3"],
    );
    let fresh: serde_json::Value = serde_json::from_slice(&fresh.stdout).expect("hits JSON");
    assert_eq!((fresh["ok"].as_u64(), fresh["failed"].as_u64()), (Some(3), Some(0)), "{fresh}");
    let from_b = |f: &&serde_json::Value| f["src"]["workload"] == "b" && f["direction"] == "inbound";
    wait_until(ferrymesh_testbed::mesh::FLOW_WAIT, "the inbound flow from b on node2", || {
        topo.flows(2).iter().any(|f| from_b(&f))
    });
    let flows = topo.flows(2);
    let b_flow = flows.iter().rev().find(from_b).expect("b's flow");
    assert_eq!((b_flow["verdict"].as_str(), b_flow["transport"].as_str()), (Some("allowed"), Some("mtls")));

    // mesh-ctrl itself now serves a certificate from the new root.
    let new_root_file = topo.dir.join("new-root.pem");
    std::fs::write(&new_root_file, &new_pem).unwrap();
    let connect = format!("{FABRIC_IP}:15012");
    let s_client = topo.output_in(
        &topo.fabric,
        "openssl",
        &["s_client", "-connect", &connect, "-CAfile", new_root_file.to_str().unwrap(), "-verify_return_error"],
    );
    let said = String::from_utf8_lossy(&s_client.stdout);
    assert!(said.contains("Verify return code: 0 (ok)"), "{said}{}", String::from_utf8_lossy(&s_client.stderr));
    let metrics = ctrl_metrics(&topo);
    assert_eq!(metrics.sum("ferrymesh_ctrl_ca_reloads_total", &[("result", "applied")]), 3.0);
    assert_eq!(metrics.sum("ferrymesh_ctrl_ca_reloads_total", &[("result", "rejected")]), 0.0);
    assert_eq!(metrics.sum("ferrymesh_ctrl_trust_bundle_roots", &[]), 1.0);
    for label in ["hits-a-c", "hits-c-a"] {
        topo.signal_and_wait(label, libc::SIGTERM);
        let (ok, failed) = hit_counts(&topo, label);
        assert!(failed.is_empty(), "{label}: {failed:?}");
        eprintln!("{label}: {ok} new connections through the rotation, none failed");
    }
    topo.signal_and_wait(&long_lived, libc::SIGTERM);
}

/// Each daemon's failure reaches the user as one line, `Error: ` with its causes, and never a
/// backtrace, even with RUST_BACKTRACE=1 (nothing here reaches the network: each fails first).
#[test]
fn errors_reach_users_as_one_line_whatever_rust_backtrace_says() {
    let dir = ferrymesh_testbed::topology::ScratchDir::new("errors");
    let scratch = dir.path();
    std::fs::create_dir_all(scratch.join("config")).unwrap();
    let config = scratch.join("config");
    let cases: [(&str, Vec<&str>, &str); 3] = [
        (
            "mesh-ctrl",
            vec![
                "--config-dir",
                config.to_str().unwrap(),
                "--ca-dir",
                "/proc/ferrymesh-none/ca",
                "--listen",
                "127.0.0.1:0",
            ],
            "Error: CA file /proc/ferrymesh-none/ca",
        ),
        (
            "mesh-agent",
            vec!["--uninstall", "--bpf-dir", scratch.to_str().unwrap()],
            "is not on a bpf filesystem: nothing was removed",
        ),
        (
            "mesh-waypoint",
            vec![
                "--namespace",
                "shop",
                "--name",
                "wp",
                "--node-name",
                "n",
                "--pod-ip",
                "127.0.0.1",
                "--ctrl",
                "https://127.0.0.1:9",
                "--ca-root",
                "/proc/ferrymesh-none/root.pem",
                "--token-file",
                "/proc/ferrymesh-none/token",
            ],
            "Error: cannot read --token-file /proc/ferrymesh-none/token: No such file or directory",
        ),
    ];
    for (binary, args, expected) in cases {
        let out = std::process::Command::new(bin(binary)).args(&args).env("RUST_BACKTRACE", "1").output().unwrap();
        assert!(!out.status.success(), "{binary} must fail");
        let stderr = String::from_utf8_lossy(&out.stderr);
        // Log lines (tracing) may come first; the error is the last line, and the only one.
        let errors: Vec<&str> = stderr.lines().filter(|l| l.contains("Error")).collect();
        assert_eq!(errors.len(), 1, "{binary}: {stderr}");
        assert!(errors[0].starts_with("Error: ") && errors[0].contains(expected), "{binary}: {stderr}");
        assert_eq!(stderr.lines().last(), Some(errors[0]), "{binary}: {stderr}");
        assert!(!stderr.contains("backtrace") && !stderr.contains("Caused by"), "{binary}: {stderr}");
    }
}
