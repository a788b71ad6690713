//! The certificate service over real gRPC on loopback: node authorization by bootstrap token.

use std::time::Duration;

use ferrymesh_api::ca::certificates_client::CertificatesClient;
use ferrymesh_api::ca::CreateCertificateRequest;
use mesh_ctrl::ca::auth::{NodeAuth, NodeTokens};
use mesh_ctrl::ca::service::CertificateService;
use mesh_ctrl::ca::Ca;
use mesh_ctrl::snapshot::Publisher;
use tonic::Code;

mod common;
use common::{csr, serve, shop_model};

/// A certificate service on loopback for the node tokens `tokens` (YAML) and the shop model of
/// `pods` and `accounts`, and a client of it; the directory holds the CA and the tokens.
async fn certificate_service(
    tokens: &str,
    pods: &[(&str, &str, &str)],
    accounts: &[&str],
) -> (CertificatesClient<tonic::transport::Channel>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::load_or_create(&dir.path().join("ca"), "cluster.local", Duration::from_secs(3600)).unwrap();
    let tokens_file = dir.path().join("tokens.yaml");
    std::fs::write(&tokens_file, tokens).unwrap();
    let tokens = NodeTokens::load(&tokens_file).unwrap();
    let (publisher, snapshots) = Publisher::new();
    publisher.publish(&shop_model(pods, accounts));
    let service = CertificateService::new(
        mesh_ctrl::ca::fixed(ca),
        std::sync::Arc::new(mesh_ctrl::ca::auth::Authenticator::new(NodeAuth::Tokens(tokens))),
        "cluster.local".into(),
        snapshots,
    );
    let addr = serve(tonic::transport::Server::builder().add_service(service.into_server())).await;
    (CertificatesClient::connect(format!("http://{addr}")).await.unwrap(), dir)
}

#[tokio::test]
async fn an_agent_only_gets_identities_of_pods_on_its_node() {
    let (mut client, _dir) = certificate_service(
        "node1: node1-secret-token-0001\nnode2: node2-secret-token-0002\n",
        &[("web", "node1", "10.244.1.2"), ("db", "node2", "10.244.2.2"), ("ghost", "node1", "10.244.1.3")],
        &["web", "db"],
    )
    .await;
    let ask = |sa: &str, token: Option<&str>| {
        let mut request = tonic::Request::new(CreateCertificateRequest {
            csr_pem: csr(),
            namespace: "shop".into(),
            service_account: sa.into(),
        });
        if let Some(token) = token {
            request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        }
        request
    };

    let ok = client.create_certificate(ask("web", Some("node1-secret-token-0001"))).await.unwrap().into_inner();
    assert_eq!(ok.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
    assert_eq!(ok.cert_chain_pem.len(), 2);
    assert!(ok.roots_pem.contains("BEGIN CERTIFICATE"));

    let refused = client.create_certificate(ask("db", Some("node1-secret-token-0001"))).await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert_eq!(
        refused.message(),
        "node node1 runs no pod with identity spiffe://cluster.local/ns/shop/sa/db; an agent may only obtain identities of pods on its own node"
    );
    let unknown = client.create_certificate(ask("web", Some("not-a-known-token-at-all"))).await.unwrap_err();
    assert_eq!(unknown.code(), Code::Unauthenticated);
    assert!(unknown.message().contains("matches no node"), "{}", unknown.message());
    let missing = client.create_certificate(ask("web", None)).await.unwrap_err();
    assert_eq!(missing.code(), Code::Unauthenticated);
    assert!(client.create_certificate(ask("db", Some("node2-secret-token-0002"))).await.is_ok());
    // A pod on the node whose service account does not exist (deleted) gets nothing.
    let deleted = client.create_certificate(ask("ghost", Some("node1-secret-token-0001"))).await.unwrap_err();
    assert_eq!(deleted.code(), Code::PermissionDenied);
    assert!(deleted.message().contains("service account shop/ghost does not exist"), "{}", deleted.message());
}

#[tokio::test]
async fn a_source_that_keeps_failing_authentication_is_throttled() {
    let (mut client, _dir) =
        certificate_service("node1: node1-secret-token-0001\n", &[("web", "node1", "10.244.1.2")], &["web"]).await;
    let ask = |token: &str| {
        let mut request = tonic::Request::new(CreateCertificateRequest {
            csr_pem: csr(),
            namespace: "shop".into(),
            service_account: "web".into(),
        });
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        request
    };
    for i in 0..mesh_ctrl::ca::auth::MAX_AUTH_FAILURES {
        let refused = client.create_certificate(ask("guessed-token-guessed")).await.unwrap_err();
        assert_eq!(refused.code(), Code::Unauthenticated, "failure {i}");
    }
    // Past the limit the source is refused without its token being looked at, even a good one.
    for token in ["guessed-token-guessed", "node1-secret-token-0001"] {
        let throttled = client.create_certificate(ask(token)).await.unwrap_err();
        assert_eq!(throttled.code(), Code::ResourceExhausted);
        assert!(
            throttled.message().starts_with("too many failed authentications from 127.0.0.1 (10 in 60s); try again in"),
            "{}",
            throttled.message()
        );
    }
}

#[test]
fn node_token_files_are_validated() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        ("node1: short\n", "shorter than 16 characters"),
        ("node1: same-token-for-both-nodes\nnode2: same-token-for-both-nodes\n", "share a token"),
        ("- not a map\n", "expected a YAML map"),
    ];
    for (text, want) in cases {
        let file = dir.path().join("t.yaml");
        std::fs::write(&file, text).unwrap();
        let e = NodeTokens::load(&file).unwrap_err();
        assert!(e.contains(want), "{text:?}: {e}");
    }
}
