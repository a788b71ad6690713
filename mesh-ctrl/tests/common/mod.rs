//! Helpers shared by the mesh-ctrl integration tests.

use std::collections::BTreeMap;

use mesh_ctrl::model::Pod;
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};

/// Pod `name` in namespace `shop` on `node` with IP `ip`, running as service account `name`,
/// labelled `app: name`.
pub fn pod(name: &str, node: &str, ip: &str) -> Pod {
    Pod {
        uid: name.into(),
        name: name.into(),
        namespace: "shop".into(),
        node: node.into(),
        service_account: name.into(),
        ip: ip.parse().unwrap(),
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
