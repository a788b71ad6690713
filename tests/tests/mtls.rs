//! End-to-end identity and HBONE tests: what crosses the fabric, who may connect to 15008,
//! identities in flows, certificate rotation. Needs root; uses tcpdump and openssl.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use ferrymesh_testbed::mesh::{wait_until, FLOW_WAIT, HTTP_PORT, SINK_PORT};
use ferrymesh_testbed::pcap::{contains, tcp6_payloads, tcp_payloads};
use ferrymesh_testbed::{Topology, TopologySpec};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use serde_json::Value;

const TD: &str = "cluster.local";

fn cluster(ctrl_args: &[&str]) -> Topology {
    let spec = TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "c", 2).pod("legacy", "x", 1);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    topo.start_mesh_with(ctrl_args);
    topo.wait_enrolled(1, &["shop/a"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["shop/c"], Duration::from_secs(10));
    topo.serve_all();
    topo
}

fn flows_to(topo: &Topology, node: u8, direction: &str, port: u16) -> Vec<Value> {
    topo.flows(node).into_iter().filter(|f| f["direction"] == direction && f["dst"]["port"] == port).collect()
}

/// The captured TCP payloads hold a whole 4 MiB transfer, none of it in plain text (`marker`), all
/// of it on 15008 in TLS 1.3 with ALPN h2; `log` is tcpdump's, for the failure message.
fn assert_only_tls13_h2_on_15008(packets: &[(u16, u16, Vec<u8>)], marker: &str, log: &str) {
    let total: usize = packets.iter().map(|p| p.2.len()).sum();
    assert!(total > 4 * 1024 * 1024, "the capture holds the whole transfer ({total} bytes captured): {log}");
    for (sport, dport, payload) in packets {
        assert!(!contains(payload, marker.as_bytes()), "plaintext marker on the wire ({sport} -> {dport})");
        assert!(payload.is_empty() || *sport == 15008 || *dport == 15008, "payload outside HBONE: {sport} -> {dport}");
    }
    let from_server: Vec<u8> = packets.iter().filter(|p| p.0 == 15008).flat_map(|p| p.2.clone()).collect();
    let to_server: Vec<u8> = packets.iter().filter(|p| p.1 == 15008).flat_map(|p| p.2.clone()).collect();
    // ServerHello's supported_versions extension selecting TLS 1.3 (0x0304).
    assert!(contains(&from_server, &[0x00, 0x2b, 0x00, 0x02, 0x03, 0x04]), "the server selected TLS 1.3");
    // ClientHello offering ALPN "h2".
    assert!(contains(&to_server, &[0x02, b'h', b'2']), "the client offered ALPN h2");
}

/// The flows of the one transfer from a to c's sink: node1's outbound and node2's inbound, both
/// mTLS and naming a's and c's identities.
fn sink_flows_of_a_to_c(topo: &Topology) -> Vec<Value> {
    let (id_a, id_c) = (format!("spiffe://{TD}/ns/shop/sa/a"), format!("spiffe://{TD}/ns/shop/sa/c"));
    let mut both = Vec::new();
    for (node, direction) in [(1, "outbound"), (2, "inbound")] {
        let flows = flows_to(topo, node, direction, SINK_PORT);
        assert_eq!(flows.len(), 1, "{direction}: {flows:?}");
        let f = flows.into_iter().next().unwrap();
        assert_eq!(f["mtls"], true, "{f}");
        let ids = (f["src"]["identity"].as_str(), f["dst"]["identity"].as_str());
        assert_eq!(ids, (Some(id_a.as_str()), Some(id_c.as_str())), "{f}");
        both.push(f);
    }
    both
}

#[test]
fn cross_node_traffic_is_tls13_on_15008_and_flows_name_both_identities() {
    let topo = cluster(&[]);
    let (a, c) = (topo.pod("shop", "a"), topo.pod("shop", "c"));
    let capture = topo.start_capture("tcpdump", &topo.fabric, "n1");

    let marker = "FERRYMESH-SECRET-MARKER-7f3a";
    topo.send_with(a, c.ip, 4 * 1024 * 1024, &["--marker", marker]);
    topo.curl(a, c.ip);
    topo.stop_capture(&capture, &topo.nodes[0].netns, ferrymesh_testbed::topology::FABRIC_IP);

    assert_only_tls13_h2_on_15008(&tcp_payloads(&std::fs::read(&capture.pcap).unwrap()), marker, &topo.log("tcpdump"));

    for f in sink_flows_of_a_to_c(&topo) {
        assert_eq!(f["bytes_sent"], 4 * 1024 * 1024);
    }
    let id_c = format!("spiffe://{TD}/ns/shop/sa/c");
    // Plaintext from an unenrolled pod: no identity is claimed for it.
    topo.curl(topo.pod("legacy", "x"), c.ip);
    let plain: Vec<Value> =
        flows_to(&topo, 2, "inbound", HTTP_PORT).into_iter().filter(|f| f["mtls"] == false).collect();
    assert_eq!(plain.len(), 1, "{plain:?}");
    assert_eq!(plain[0]["src"]["identity"], "");
    assert_eq!(plain[0]["dst"]["identity"], id_c.as_str());
}

/// A client certificate for openssl s_client, written to `dir` as `<name>.pem` and
/// `<name>-key.pem`.
fn client_cert(dir: &Path, name: &str, uri: &str, issuer: Option<&Issuer<'_, KeyPair>>, expired: bool) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    let mut params = CertificateParams::default();
    params.subject_alt_names = vec![SanType::URI(uri.try_into().unwrap())];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
    let now = SystemTime::now();
    let (from, to) = if expired {
        (now - Duration::from_secs(7200), now - Duration::from_secs(3600))
    } else {
        (now - Duration::from_secs(60), now + Duration::from_secs(3600))
    };
    params.not_before = from.into();
    params.not_after = to.into();
    let cert = match issuer {
        Some(issuer) => params.signed_by(&key, issuer).unwrap(),
        None => params.self_signed(&key).unwrap(),
    };
    std::fs::write(dir.join(format!("{name}.pem")), cert.pem()).unwrap();
    std::fs::write(dir.join(format!("{name}-key.pem")), key.serialize_pem()).unwrap();
}

#[test]
fn hbone_refuses_clients_without_a_valid_mesh_certificate() {
    let topo = cluster(&[]);
    let (c, x) = (topo.pod("shop", "c"), topo.pod("legacy", "x"));
    let dir = topo.dir.join("certs");
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(topo.ca_dir().join("root-key.pem")).unwrap()).unwrap();
    let mesh = Issuer::from_ca_cert_pem(&std::fs::read_to_string(topo.ca_dir().join("root-cert.pem")).unwrap(), ca_key)
        .unwrap();
    let mut other_params = CertificateParams::default();
    other_params.is_ca = IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let other = Issuer::new(other_params, KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap());
    let id = format!("spiffe://{TD}/ns/legacy/sa/x");
    client_cert(&dir, "good", &id, Some(&mesh), false);
    client_cert(&dir, "other-ca", &id, Some(&other), false);
    client_cert(&dir, "other-td", "spiffe://evil.example/ns/legacy/sa/x", Some(&mesh), false);
    client_cert(&dir, "expired", &id, Some(&mesh), true);
    client_cert(&dir, "self-signed", &id, None, false);

    let s_client = |cert: Option<&str>, alpn: &str| {
        let mut script = format!(
            "sleep 1 | openssl s_client -connect {}:15008 -tls1_3 -alpn {alpn} -CAfile {}",
            c.ip,
            topo.ca_dir().join("root-cert.pem").display()
        );
        if let Some(name) = cert {
            script.push_str(&format!(" -cert {0}/{name}.pem -key {0}/{name}-key.pem", dir.display()));
        }
        let out = topo.output_in(&x.netns, "bash", &["-c", &script]);
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    };

    // Positive control: a mesh certificate in the trust domain completes TLS 1.3 with h2.
    let (ok, text) = s_client(Some("good"), "h2");
    assert!(ok && text.contains("New, TLSv1.3") && text.contains("ALPN protocol: h2"), "{text}");
    assert!(!text.contains("alert"), "{text}");

    let cases = [
        (None, "h2", "no client certificate", "peer sent no certificates"),
        (Some("other-ca"), "h2", "another CA", "UnknownIssuer"),
        (Some("self-signed"), "h2", "a self-signed certificate", "UnknownIssuer"),
        (Some("other-td"), "h2", "another trust domain", "outside trust domain cluster.local"),
        (Some("expired"), "h2", "an expired certificate", "xpired"),
        (Some("good"), "http/1.1", "ALPN http/1.1 only", "protocol"),
    ];
    for (cert, alpn, what, reason) in cases {
        let before = topo.flows(2).len();
        let (ok, text) = s_client(cert, alpn);
        assert!(!ok && text.contains("alert"), "{what}: the server must refuse: {text}");
        wait_until(Duration::from_secs(2), &format!("{what}: a flow naming the refusal"), || {
            topo.flows(2).iter().skip(before).any(|f| {
                f["verdict"] == "error" && f["dst"]["port"] == 15008 && f["reason"].as_str().unwrap().contains(reason)
            })
        });
    }
}

#[test]
fn connections_survive_rotations_and_new_connections_use_the_new_certificate() {
    let topo = cluster(&["--cert-ttl", "10s"]);
    let (a, c) = (topo.pod("shop", "a"), topo.pod("shop", "c"));
    let id_a = format!("spiffe://{TD}/ns/shop/sa/a");
    let serial_of_a = || {
        topo.status(1)["certs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|cert| cert["identity"] == id_a.as_str())
            .map(|cert| cert["serial"].as_str().unwrap().to_string())
    };
    // About 18 s of round trips on one connection: three or more rotations at a 10 s TTL.
    let ping = topo.start_ping("ping", a, c.ip, 180);
    // The serial c's agent saw on the newest inbound HTTP connection, after a curl from a.
    let serial_seen_by_c = || {
        let before = flows_to(&topo, 2, "inbound", HTTP_PORT).len();
        topo.curl(a, c.ip);
        wait_until(FLOW_WAIT, "the inbound flow of the new connection", || {
            flows_to(&topo, 2, "inbound", HTTP_PORT).len() > before
        });
        flows_to(&topo, 2, "inbound", HTTP_PORT).pop().unwrap()["peer_cert_serial"].as_str().unwrap().to_string()
    };
    let mut current = serial_of_a().expect("a has a certificate");
    let mut issued = BTreeSet::from([current.clone()]);
    let mut used = Vec::new();
    for renewal in 1..=3 {
        wait_until(Duration::from_secs(15), &format!("renewal {renewal} of a's certificate"), || {
            serial_of_a().is_some_and(|s| s != current)
        });
        // A connection opened after the renewal presents the renewed certificate. When yet
        // another renewal lands while it opens, either is right: try again with the newer one.
        loop {
            let before = serial_of_a().unwrap();
            let seen = serial_seen_by_c();
            let after = serial_of_a().unwrap();
            issued.extend([before.clone(), after.clone()]);
            if before == after {
                assert_eq!(seen, after, "renewal {renewal}: a new connection presents the current certificate");
                used.push(seen);
                current = after;
                break;
            }
        }
    }
    topo.wait_success(&ping, Duration::from_secs(15));
    assert!(issued.len() >= 4, "at least three rotations: {issued:?}");
    let distinct: BTreeSet<&String> = used.iter().collect();
    assert_eq!(distinct.len(), 3, "each renewal's connection presented its own certificate: {used:?}");
}

#[test]
fn a_client_refuses_a_server_with_the_wrong_identity() {
    let topo = cluster(&[]);
    let (a, c) = (topo.pod("shop", "a"), topo.pod("shop", "c"));
    // Replace c's agent with an impostor on 15008 holding a valid mesh certificate for another
    // identity: node1's agent must refuse it because c's identity is spiffe://.../sa/c.
    topo.signal_and_wait("agent-node2", libc::SIGKILL);
    let dir = topo.dir.join("certs");
    std::fs::create_dir_all(&dir).unwrap();
    let ca_key = KeyPair::from_pem(&std::fs::read_to_string(topo.ca_dir().join("root-key.pem")).unwrap()).unwrap();
    let mesh = Issuer::from_ca_cert_pem(&std::fs::read_to_string(topo.ca_dir().join("root-cert.pem")).unwrap(), ca_key)
        .unwrap();
    client_cert(&dir, "impostor", &format!("spiffe://{TD}/ns/shop/sa/impostor"), Some(&mesh), false);
    // s_server ends a connection when its stdin closes, so stdin stays open (sleep).
    let script = format!(
        "sleep 30 | openssl s_server -accept 15008 -tls1_3 -alpn h2 -naccept 1 -cert {0}/impostor.pem -key {0}/impostor-key.pem",
        dir.display()
    );
    let mut server = topo.command_in(&c.netns, "bash");
    server.args(["-c", &script]);
    topo.spawn("impostor", server);
    wait_until(Duration::from_secs(10), "the impostor to listen", || topo.log("impostor").contains("ACCEPT"));

    let out = topo.output_in(&a.netns, "curl", &["-sS", "--max-time", "5", &format!("http://{}:{HTTP_PORT}/", c.ip)]);
    assert!(!out.status.success(), "the connection must be refused");
    let refused = flows_to(&topo, 1, "outbound", HTTP_PORT);
    assert_eq!(refused.len(), 1, "{refused:?}");
    let want = format!(
        "mTLS handshake with {} failed: peer certificate refused: server identity spiffe://{TD}/ns/shop/sa/impostor, expected spiffe://{TD}/ns/shop/sa/c",
        c.ip
    );
    assert_eq!(refused[0]["verdict"], "error");
    assert_eq!(refused[0]["reason"], want.as_str());
}

#[test]
fn native_ipv6_across_nodes_is_tls13_on_15008_over_ipv6_and_ipv6_policies_apply() {
    let topo = cluster(&[]);
    let (a, c) = (topo.pod("shop", "a"), topo.pod("shop", "c"));
    let capture = topo.start_capture("tcpdump6", &topo.fabric, "n1");
    let marker = "FERRYMESH-SECRET-MARKER-v6-91c2";
    topo.send_with(a, c.ip6, 4 * 1024 * 1024, &["--marker", marker]);
    let (code, body, _) = topo.try_curl(a, c.ip6.into());
    assert_eq!(code, Some(0), "a -> c over IPv6: {body}");
    assert!(body.starts_with(&format!("client [{}]:", a.ip6)), "{body}");
    topo.stop_capture(&capture, &topo.nodes[0].netns, ferrymesh_testbed::topology::FABRIC_IP);

    // Every byte crossed the fabric as IPv6, on 15008, in TLS 1.3 with ALPN h2.
    assert_only_tls13_h2_on_15008(
        &tcp6_payloads(&std::fs::read(&capture.pcap).unwrap()),
        marker,
        &topo.log("tcpdump6"),
    );
    assert!(!tcp_payloads(&std::fs::read(&capture.pcap).unwrap()).iter().any(|p| contains(&p.2, marker.as_bytes())));

    // Both agents' flows name both identities and the IPv6 addresses.
    for f in sink_flows_of_a_to_c(&topo) {
        let ips = (f["src"]["ip"].as_str(), f["dst"]["ip"].as_str());
        assert_eq!(ips, (Some(&*a.ip6.to_string()), Some(&*c.ip6.to_string())), "{f}");
    }

    // An IPv6 ipBlock applies to a's IPv6 connections, not to its IPv4 ones.
    let deny = format!(
        "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-a6\n  namespace: shop\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{}/128\"]\n    to:\n    - operation:\n        ports: [\"{HTTP_PORT}\"]\n",
        a.ip6
    );
    topo.write_config_file("deny-a6.yaml", &deny);
    wait_until(Duration::from_secs(10), "node2 to hold shop/deny-a6", || {
        let out = topo.meshctl(2, &["policies", "-o", "json"]);
        String::from_utf8_lossy(&out.stdout).contains("deny-a6")
    });
    let (code, text, _) = topo.try_curl(a, c.ip6.into());
    assert_ne!(code, Some(0), "a -> c over IPv6 is denied: {text}");
    wait_until(FLOW_WAIT, "the IPv6 deny", || {
        flows_to(&topo, 2, "inbound", HTTP_PORT).iter().any(|f| {
            f["verdict"] == "denied" && f["policy"] == "shop/deny-a6 rule 0" && f["src"]["ip"] == a.ip6.to_string()
        })
    });
    let body = topo.curl(a, c.ip);
    assert!(
        body.starts_with(&format!("client {}:", a.ip)),
        "a -> c over IPv4 is not matched by the IPv6 block: {body}"
    );
}
