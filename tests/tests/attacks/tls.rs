//! H4: TLS session resumption on a pod's 15008. Whoever once held a valid workload key keeps
//! the server's session tickets and resumes later: a resumed TLS 1.3 handshake restores the old
//! client certificate without verifying it again, so the identity outlives its root.

use std::net::SocketAddr;

use ferrymesh_testbed::mesh::{wait_until, CONFIG_WAIT, HTTP_PORT};
use ferrymesh_testbed::mesh_client::{self, MeshCert};
use ferrymesh_testbed::topology::in_netns;
use ferrymesh_testbed::{Topology, TopologySpec};
use rustls::HandshakeKind;

/// How many roots the agent of `node` trusts.
fn roots_of(topo: &Topology, node: u8) -> usize {
    let status = topo.try_status(node).unwrap_or_default();
    status["trust_roots"].as_array().map_or(0, Vec::len)
}

/// Replaces `path` with `text` in one step, so mesh-ctrl never reads half a CA file.
fn replace_file(path: &std::path::Path, text: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, text).expect("write");
    std::fs::rename(&aside, path).expect("rename");
}

#[test]
fn a_saved_session_gets_a_full_handshake_and_is_refused_once_its_root_is_removed() {
    let spec = TopologySpec::nodes(2).pod("shop", "c", 2).pod("legacy", "x", 1);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    topo.start_mesh_with(&["--ca-reload-interval", "300ms"]);
    topo.wait_enrolled(2, &["shop/c"], CONFIG_WAIT * 4);
    topo.serve_all();
    let (c, x) = (topo.pod("shop", "c"), topo.pod("legacy", "x"));

    // The attacker's key was once valid: a second root, trusted by the mesh, signed it.
    let root = topo.ca_root();
    let mesh_root = std::fs::read_to_string(&root).expect("mesh root");
    let (old_root, old_key) = mesh_client::generate_root("an old root");
    replace_file(&root, &format!("{mesh_root}{old_root}"));
    wait_until(CONFIG_WAIT * 4, "c's agent to trust both roots", || roots_of(&topo, 2) == 2);
    let cert = MeshCert::issue(&old_root, &old_key, "spiffe://cluster.local/ns/legacy/sa/x");
    let config = cert.client_config(true);
    let to = SocketAddr::from((c.ip, 15008));
    let authority = format!("{}:{HTTP_PORT}", c.ip);
    let request = b"GET / HTTP/1.0\r\n\r\n";

    let (first, second) = in_netns(&x.netns, || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(async {
            let tls = mesh_client::connect(config.clone(), to).await.expect("the first handshake");
            let first = tls.get_ref().1.handshake_kind();
            let (status, body) = mesh_client::connect_and_send(tls, &authority, request).await.expect("CONNECT");
            assert_eq!(status, 200, "the first connection is admitted");
            assert!(String::from_utf8_lossy(&body).contains(&format!("client {}:", x.ip)), "{body:?}");
            // The client offers the ticket it was given: the server must not take it.
            let tls = mesh_client::connect(config.clone(), to).await.expect("the second handshake");
            let second = tls.get_ref().1.handshake_kind();
            drop(tls);
            (first, second)
        })
    });
    assert_eq!(first, Some(HandshakeKind::Full));
    assert_eq!(second, Some(HandshakeKind::Full), "the server resumed a saved session");

    // The old root leaves the bundle: the key it signed is worth nothing, saved session or not.
    replace_file(&root, &mesh_root);
    wait_until(CONFIG_WAIT * 4, "c's agent to trust the mesh root alone", || roots_of(&topo, 2) == 1);
    let after = in_netns(&x.netns, || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime").block_on(async {
            match mesh_client::connect(config.clone(), to).await {
                Err(e) => Err(format!("handshake: {e}")),
                Ok(tls) => mesh_client::connect_and_send(tls, &authority, request).await,
            }
        })
    });
    match after {
        Err(refused) => assert!(!refused.is_empty()),
        Ok((status, body)) => {
            panic!("a removed root's key reached the app: CONNECT {status}, {:?}", String::from_utf8_lossy(&body))
        }
    }
}
