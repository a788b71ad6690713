//! Helpers shared by the mesh-ctrl integration tests.

use std::collections::BTreeMap;

use mesh_ctrl::model::{Model, Namespace, Pod, ServiceAccount};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};

/// Pod `name` in namespace `shop` on `node` with IP `ip`, running as service account `name`,
/// labelled `app: name`.
fn pod(name: &str, node: &str, ip: &str) -> Pod {
    Pod {
        uid: name.into(),
        name: name.into(),
        namespace: "shop".into(),
        node: node.into(),
        service_account: name.into(),
        ip: ip.parse().unwrap(),
        other_ips: Vec::new(),
        netns: String::new(),
        labels: BTreeMap::from([("app".to_string(), name.to_string())]),
        container_ports: BTreeMap::new(),
        ready: true,
    }
}

/// A CSR for a new ECDSA P-256 key, PEM.
#[allow(dead_code, reason = "not every test binary asks for certificates")]
pub fn csr() -> String {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
    CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap()
}

/// A model of namespace `shop` with `pods` (name, node, IP) and service accounts `accounts`.
pub fn shop_model(pods: &[(&str, &str, &str)], accounts: &[&str]) -> Model {
    let mut model = Model::default();
    model.namespaces.insert("shop".into(), Namespace { name: "shop".into(), labels: BTreeMap::new() });
    for (name, node, ip) in pods {
        model.pods.insert(name.to_string(), pod(name, node, ip));
    }
    for sa in accounts {
        model
            .service_accounts
            .insert(format!("shop/{sa}"), ServiceAccount { namespace: "shop".into(), name: sa.to_string() });
    }
    model
}

/// Serves `router` on a free loopback port until the test ends; returns the address.
pub async fn serve(router: tonic::transport::server::Router) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)));
    addr
}
