//! H2: the config stream on 15012. Any pod reaches mesh-ctrl's Service; without a credential it
//! read the whole mesh (every pod with its labels and netns, every policy's header values and
//! inline keys), and a node's agent read every other node's pods in detail. The stream takes
//! the CA's credential, is scoped to its caller, and is bounded per source.
//!
//! M12: 15012 accepted any number of connections, each with TLS state allocated before its
//! first byte and held for the 10 s handshake timeout: a flood starved agents of config and
//! certificates. Connections are now capped per source and in all, and handshakes in progress.
//!
//! The same against a flood of clients that finish TLS: each opens config streams (without a
//! node's token) and sends the start of a large message, then never reads; mesh-ctrl holds
//! little for each (the stream is refused before its body is read, HTTP/2's windows cap what
//! waits) and at most 64 from one address.
//!
//! H6: a config over gRPC's default 4 MiB (a few large objects, or some 10k pods) broke every
//! agent's stream: each failed to decode it and kept its last config forever.

use std::time::Duration;

use ferrymesh_api::config::config_client::ConfigClient;
use ferrymesh_api::config::{ConfigUpdate, WatchRequest};
use ferrymesh_testbed::mesh::{bin, wait_until, CONFIG_WAIT};
use ferrymesh_testbed::topology::{in_netns, FABRIC_IP};
use ferrymesh_testbed::{Pod, Topology, TopologySpec};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

use crate::{h2_flood, half_open_flood, rss_kib};

/// A shared secret people put in policies: any client that reads the config can replay it.
const SECRET: &str = "x-internal-token-s3cret-value";

fn cluster() -> Topology {
    let spec = TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "c", 2).pod("legacy", "x", 1);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    topo.write_pod(topo.pod("shop", "c"), &[("app", "c"), ("team", "payments")]);
    topo.write_config_file(
        "policy-secret.yaml",
        &format!("apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: internal\n  namespace: shop\nspec:\n  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: web\n  action: ALLOW\n  rules:\n  - when:\n    - key: request.headers[x-internal-token]\n      values: [\"{SECRET}\"]\n"),
    );
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a"], CONFIG_WAIT * 4);
    topo.wait_enrolled(2, &["shop/c"], CONFIG_WAIT * 4);
    topo
}

/// What a client in `from`'s netns gets from a Watch on mesh-ctrl (TLS verified against the
/// mesh root, as any pod could), with `token` (None: none) naming `node`: the first update, or
/// the refusal. `streams` more are opened first, and held, from the same address.
fn watch(
    topo: &Topology,
    from: &Pod,
    token: Option<&str>,
    node: &str,
    streams: usize,
) -> Result<ConfigUpdate, tonic::Status> {
    let root = std::fs::read_to_string(topo.ca_root()).expect("mesh root");
    let token = token.map(String::from);
    in_netns(&from.netns, move || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(async move {
            let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(root));
            let endpoint =
                Endpoint::from_shared(format!("https://{FABRIC_IP}:15012")).unwrap().tls_config(tls).unwrap();
            let channel = endpoint.connect().await.expect("TLS to mesh-ctrl");
            let open = |channel: tonic::transport::Channel| {
                let token = token.clone();
                async move {
                    let (answers, rx) = mpsc::channel(4);
                    let hello = WatchRequest { node: node.into(), ..Default::default() };
                    answers.send(hello).await.unwrap();
                    let mut request = tonic::Request::new(ReceiverStream::new(rx));
                    if let Some(token) = &token {
                        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
                    }
                    let mut updates = ConfigClient::new(channel).watch(request).await?.into_inner();
                    let first = tokio::time::timeout(Duration::from_secs(5), updates.message()).await;
                    let first = first.map_err(|_| tonic::Status::deadline_exceeded("no update within 5s"))??;
                    let first = first.ok_or_else(|| tonic::Status::cancelled("the stream ended"))?;
                    Ok::<_, tonic::Status>((first, answers, updates))
                }
            };
            let mut held = Vec::new();
            for i in 0..streams {
                held.push(open(channel.clone()).await.unwrap_or_else(|e| panic!("stream {i}: {e}")));
            }
            open(channel).await.map(|(first, _, _)| first)
        })
    })
}

#[test]
fn a_client_without_its_nodes_token_gets_nothing_and_a_node_sees_others_only_as_peers() {
    let topo = cluster();
    let x = topo.pod("legacy", "x");
    let node1_token = std::fs::read_to_string(topo.token_file(1)).expect("node1's token");

    // Any pod, with the root only: refused, and none of the config reaches it.
    let refused = watch(&topo, x, None, "node1", 0).expect_err("a stream without a token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    assert!(!refused.message().contains(SECRET));
    let refused = watch(&topo, x, Some("a-guessed-token-0123456789"), "node1", 0).expect_err("a made-up token");
    assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
    // node1's token cannot watch as node2.
    let refused = watch(&topo, x, Some(&node1_token), "node2", 0).expect_err("another node's stream");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");

    // node1's token: its own pod in full, node2's pod as a peer (no labels, no netns).
    let update = watch(&topo, x, Some(&node1_token), "node1", 0).expect("node1's own stream");
    let of =
        |name: &str| update.upserted.iter().find(|w| w.name == name).unwrap_or_else(|| panic!("{name}: {update:?}"));
    assert!(!of("a").netns.is_empty(), "its own pod, in full: {:?}", of("a"));
    let c = of("c");
    assert!(c.labels.is_empty() && c.netns.is_empty(), "another node's pod, as a peer: {c:?}");
    assert_eq!(c.ip, topo.pod("shop", "c").ip.to_string(), "with what a connection to it needs");

    // Streams from one source are bounded; the agents keep their streams meanwhile.
    let refused = watch(&topo, x, Some(&node1_token), "node1", 16).expect_err("a 17th stream from one address");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
    let before = topo.status(1)["config_version"].as_u64().unwrap();
    topo.write_pod(topo.pod("shop", "a"), &[("app", "a"), ("rev", "2")]);
    wait_until(CONFIG_WAIT * 2, "node1's agent to take the next version", || {
        topo.status(1)["config_version"].as_u64().unwrap() > before
    });
}

#[test]
fn an_inline_symmetric_key_is_refused_by_field() {
    // A tenant's RequestAuthentication carrying an HMAC secret: refused, naming the field, so
    // the secret is never put in any stream.
    let dir = ferrymesh_testbed::topology::ScratchDir::new("oct-jwks");
    let authn = "apiVersion: ferrymesh.io/v1alpha1\nkind: RequestAuthentication\nmetadata:\n  name: hmac\n  namespace: shop\nspec:\n  targetRefs:\n  - kind: Service\n    group: \"\"\n    name: web\n  jwtRules:\n  - issuer: https://issuer.example\n    jwks: '{\"keys\":[{\"kty\":\"oct\",\"alg\":\"HS256\",\"k\":\"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0\"}]}'\n";
    std::fs::write(dir.path().join("authn.yaml"), authn).unwrap();
    let out = std::process::Command::new(bin("mesh-ctrl"))
        .args(["--check", "--config-dir"])
        .arg(dir.path())
        .output()
        .expect("mesh-ctrl --check");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{text}");
    assert!(text.contains("RequestAuthentication shop/hmac") && text.contains("spec.jwtRules[0].jwks"), "{text}");
    assert!(text.contains("symmetric (kty oct) key"), "{text}");
}

/// `namespace/name` of every AuthorizationPolicy and PeerAuthentication the agent of `node`
/// holds, sorted.
fn held_policies(topo: &Topology, node: u8) -> Vec<String> {
    let out = topo.meshctl(node, &["policies", "-o", "json"]);
    let all: Vec<serde_json::Value> = serde_json::from_slice(&out.stdout).unwrap_or_default();
    let mut names: Vec<String> = all
        .iter()
        .map(|p| format!("{}/{}", p["namespace"].as_str().unwrap_or_default(), p["name"].as_str().unwrap_or_default()))
        .collect();
    names.sort();
    names
}

#[test]
fn a_config_over_4_mib_reaches_every_agent_and_an_oversize_object_is_refused_by_name() {
    let topo = cluster();
    // A DENY on no pod, from `blocks` addresses: about 14 bytes each on the wire, 17 as JSON.
    let policy = |name: &str, blocks: usize| {
        let list: Vec<String> =
            (0..blocks).map(|i| format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255)).collect();
        format!(
            "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: nobody\n  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [{}]\n",
            list.join(", ")
        )
    };
    // 18 policies of 25,000 blocks, each under the object limit: some 6 MiB in all.
    let mut want: Vec<String> = (0..18).map(|i| format!("shop/big-{i:02}")).collect();
    for name in &want {
        let name = name.trim_start_matches("shop/");
        topo.write_config_file(&format!("policy-{name}.yaml"), &policy(name, 25_000));
    }
    // And one tenant's object over it.
    topo.write_config_file("policy-huge.yaml", &policy("huge", 40_000));
    want.push("shop/internal".into());
    want.sort();
    for node in [1, 2] {
        wait_until(CONFIG_WAIT * 6, &format!("node {node}'s agent to hold the config of over 4 MiB"), || {
            held_policies(&topo, node) == want
        });
    }
    wait_until(CONFIG_WAIT, "mesh-ctrl to refuse the oversize object by name", || {
        let log = topo.log("mesh-ctrl");
        log.contains("AuthorizationPolicy shop/huge") && log.contains("over 512 KiB as JSON")
    });
    // The stream goes on: a change after the refusal reaches both agents.
    topo.write_config_file("policy-after.yaml", &policy("after", 10));
    want.push("shop/after".into());
    want.sort();
    for node in [1, 2] {
        wait_until(CONFIG_WAIT * 2, &format!("node {node}'s agent to hold the change after it"), || {
            held_policies(&topo, node) == want
        });
    }
}

/// Writes a policy and waits until both agents hold it: the config stream still works.
fn a_change_reaches_every_agent(topo: &Topology) {
    topo.write_config_file(
        "policy-during.yaml",
        "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: during\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: nobody\n  action: DENY\n  rules:\n  - {}\n",
    );
    for node in [1, 2] {
        wait_until(CONFIG_WAIT * 2, &format!("node {node}'s agent to get the change"), || {
            held_policies(topo, node).contains(&"shop/during".to_string())
        });
    }
}

#[test]
fn a_half_open_flood_on_15012_is_capped_per_source_while_agents_get_their_config() {
    const FLOOD: usize = 2000;
    const PER_SOURCE: usize = 64;
    let topo = cluster();
    let x = topo.pod("legacy", "x");
    let target = std::net::SocketAddr::from((FABRIC_IP, 15012));
    // Agents keep getting config meanwhile (their streams are open; a restarted one would
    // connect anew).
    let closed = half_open_flood(&x.netns, target, FLOOD, PER_SOURCE, || a_change_reaches_every_agent(&topo));
    assert!(closed >= FLOOD - PER_SOURCE, "{closed} of {FLOOD} half-open connections closed by mesh-ctrl within 5 s");
}

#[test]
fn a_flood_of_tls_clients_on_15012_holds_mesh_ctrl_to_its_budget_while_agents_get_their_config() {
    /// TLS clients the flood opens from one address (64 are held), streams on each, and the
    /// start of a 4 MiB Watch message each sends.
    const CLIENTS: usize = 200;
    const STREAMS: usize = 8;
    const RSS_GROWTH_BOUND_KIB: u64 = 64 * 1024;
    let topo = cluster();
    let x = topo.pod("legacy", "x");
    let victim = topo.pid("mesh-ctrl").expect("mesh-ctrl");
    let ca_dir = topo.ca_dir();
    let read = |name: &str| std::fs::read_to_string(ca_dir.join(name)).expect("the mesh CA");
    // Any client certificate, or none: 15012 authenticates tokens, not certificates.
    let cert = ferrymesh_testbed::mesh_client::MeshCert::issue(
        &read("root-cert.pem"),
        &read("root-key.pem"),
        "spiffe://cluster.local/ns/legacy/sa/x",
    );
    let to = std::net::SocketAddr::from((FABRIC_IP, 15012));
    let request = || {
        http::Request::builder()
            .method(http::Method::POST)
            .uri(format!("https://{FABRIC_IP}:15012/ferrymesh.config.v1.Config/Watch"))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(())
            .unwrap()
    };
    // A gRPC frame announcing 4 MiB, and its first 256 KiB.
    let body = bytes::Bytes::from([vec![0, 0, 0x40, 0, 0], vec![0x5a; 256 << 10]].concat());
    let rss_before = rss_kib(victim);
    let (streams, peak) =
        h2_flood(&x.netns, (cert.client_config(false), to), (CLIENTS, STREAMS), request, body, victim, || {
            a_change_reaches_every_agent(&topo)
        });
    println!("mesh-ctrl RSS {rss_before} KiB before, peak {peak} KiB under {streams} hostile streams");
    assert!(streams >= 64 * STREAMS, "{streams} streams opened");
    assert!(
        peak < rss_before + RSS_GROWTH_BOUND_KIB,
        "mesh-ctrl grew from {rss_before} to {peak} KiB (bound: {RSS_GROWTH_BOUND_KIB} KiB more)"
    );
    assert!(topo.is_running("mesh-ctrl"), "{}", topo.log("mesh-ctrl"));
}
