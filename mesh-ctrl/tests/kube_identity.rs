//! Kubernetes identity of agents against the testbed's fake API server (in process): the CA
//! root in a Secret (created when absent, read when present, the loser of a creation race
//! reading the winner's), the root published for agents as a ConfigMap, and TokenReview-based
//! node authorization for certificates over real gRPC on loopback: agents obtain the identities
//! of their node's pods, a workload (a waypoint) its own identity with its own token.

use std::sync::Arc;
use std::time::Duration;

use ferrymesh_api::ca::certificates_client::CertificatesClient;
use ferrymesh_api::ca::CreateCertificateRequest;
use ferrymesh_testbed::kube_fake::KubeFake;
use http::Method;
use mesh_ctrl::ca::auth::NodeAuth;
use mesh_ctrl::ca::secret;
use mesh_ctrl::ca::service::CertificateService;
use mesh_ctrl::ca::token_review::TokenReviewer;
use mesh_ctrl::snapshot::Publisher;
use serde_json::{json, Value};
use tonic::Code;

mod common;
use common::{csr, serve, shop_model};

const AGENT: &str = "system:serviceaccount:ferrymesh-system:ferrymesh-agent";

fn secret_pem(api: &KubeFake, key: &str) -> String {
    let encoded = api.get("Secret", "ferrymesh-system", "ferrymesh-ca")["data"][key].as_str().unwrap().to_string();
    let bytes: k8s_openapi::ByteString = serde_json::from_value(json!(encoded)).unwrap();
    String::from_utf8(bytes.0).unwrap()
}

/// The TokenReviews asked for so far.
fn reviews(api: &KubeFake) -> Vec<Value> {
    let requests = api.requests().into_iter();
    requests.filter(|r| r.method == Method::POST && r.path.ends_with("/tokenreviews")).map(|r| r.body).collect()
}

/// PEM as rcgen writes it (the CA re-encodes certificates with CRLF line ends).
fn unix(pem: &str) -> String {
    pem.replace("\r\n", "\n")
}

#[tokio::test]
async fn the_ca_root_lives_in_a_secret_created_when_absent() {
    let api = KubeFake::new();
    let ttl = Duration::from_secs(3600);
    let first =
        secret::load_or_create(api.client(), "ferrymesh-system", "ferrymesh-ca", "cluster.local", ttl).await.unwrap();
    let stored_cert = secret_pem(&api, "ca-cert.pem");
    assert!(secret_pem(&api, "ca-key.pem").contains("BEGIN PRIVATE KEY"));
    assert_eq!(unix(&first.roots_pem()), stored_cert, "the CA signs with the root it stored");
    // A restart (or a second replica) reads the same root rather than making a new one.
    let again =
        secret::load_or_create(api.client(), "ferrymesh-system", "ferrymesh-ca", "cluster.local", ttl).await.unwrap();
    assert_eq!(unix(&again.roots_pem()), stored_cert);

    // Creation race: another replica creates the Secret between our read and our create.
    let (their_cert, their_key) = mesh_ctrl::ca::Ca::generate_root("cluster.local").unwrap();
    let racing = KubeFake::new();
    let encode = |pem: &str| serde_json::to_value(k8s_openapi::ByteString(pem.as_bytes().to_vec())).unwrap();
    racing.race_next_create(json!({
        "apiVersion": "v1", "kind": "Secret",
        "metadata": {"name": "ferrymesh-ca", "namespace": "ferrymesh-system"},
        "data": {"ca-cert.pem": encode(&their_cert), "ca-key.pem": encode(&their_key)},
    }));
    let ours = secret::load_or_create(racing.client(), "ferrymesh-system", "ferrymesh-ca", "cluster.local", ttl)
        .await
        .unwrap();
    assert_eq!(unix(&ours.roots_pem()), their_cert, "the loser of the race signs with the winner's root");

    // A Secret without the key is named precisely; nothing is generated over it.
    let broken = KubeFake::new();
    broken.apply(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ferrymesh-ca", "namespace": "ferrymesh-system"}, "data": {"ca-cert.pem": encode(&their_cert)}}));
    let e = secret::load_or_create(broken.client(), "ferrymesh-system", "ferrymesh-ca", "cluster.local", ttl)
        .await
        .unwrap_err();
    assert_eq!(e.to_string(), "Secret ferrymesh-system/ferrymesh-ca data.ca-key.pem: missing (ca-cert.pem is there)");
    assert!(broken.get("Secret", "ferrymesh-system", "ferrymesh-ca")["data"].get("ca-key.pem").is_none());
}

/// A root rotation in the CA Secret: a root-cert.pem holding both roots is put in force and
/// published in the ConfigMap at once; a switch to a key of no root in it is refused, and the
/// switch to the new root's key signs with it.
#[tokio::test]
async fn a_rotation_in_the_ca_secret_is_put_in_force_and_published() {
    let api = KubeFake::new();
    let ttl = Duration::from_secs(3600);
    let ca =
        secret::load_or_create(api.client(), "ferrymesh-system", "ferrymesh-ca", "cluster.local", ttl).await.unwrap();
    let (old_cert, old_key) = (secret_pem(&api, "ca-cert.pem"), secret_pem(&api, "ca-key.pem"));
    let (tx, current) = tokio::sync::watch::channel(Arc::new(ca));
    tokio::spawn(secret::keep_reloading(
        api.client(),
        "ferrymesh-system".into(),
        "ferrymesh-ca".into(),
        ttl,
        Duration::from_millis(20),
        tx,
    ));
    // A waypoint in namespace shop: its pods mount the root from their own namespace.
    let (publisher, snapshots) = Publisher::new();
    let mut model = shop_model(&[], &[]);
    let waypoint = mesh_ctrl::model::Waypoint {
        namespace: "shop".into(),
        name: "waypoint".into(),
        traffic: mesh_ctrl::model::WaypointFor::Service,
        allowed: Default::default(),
    };
    model.waypoints.insert("shop/waypoint".into(), waypoint);
    publisher.publish(&model);
    tokio::spawn(secret::keep_root_published(api.client(), "ferrymesh-system".into(), current.clone(), snapshots));
    let set = |data: &[(&str, &str)]| {
        let data: serde_json::Map<String, Value> =
            data.iter().map(|(k, v)| (k.to_string(), json!(k8s_openapi::ByteString(v.as_bytes().to_vec())))).collect();
        let secret = json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "ferrymesh-ca", "namespace": "ferrymesh-system"}, "data": data});
        api.apply(secret);
    };
    async fn until(what: &str, mut check: impl FnMut() -> bool) {
        for _ in 0..250 {
            if check() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("timed out waiting for {what}");
    }
    // What the root ConfigMap in `namespace` holds.
    let published_in = |api: &KubeFake, namespace: &str| -> String {
        let config_map = api.get("ConfigMap", namespace, secret::ROOT_CONFIGMAP);
        config_map["data"][secret::ROOT_CONFIGMAP_KEY].as_str().unwrap_or_default().to_string()
    };
    let published = |api: &KubeFake| published_in(api, "ferrymesh-system");
    let (new_cert, new_key) = mesh_ctrl::ca::Ca::generate_root("cluster.local").unwrap();
    let both = format!("{old_cert}{new_cert}");
    set(&[("ca-cert.pem", &old_cert), ("ca-key.pem", &old_key), ("root-cert.pem", &both)]);
    until("both roots in force and published", || {
        current.borrow().roots().len() == 2 && unix(&published(&api)) == both
    })
    .await;
    until("both roots published in the waypoint's namespace", || unix(&published_in(&api, "shop")) == both).await;
    let old_issuer = current.borrow().issuer_sha256().to_string();

    // A switch whose certificate is not the key's: refused, the CA in force stays.
    set(&[("ca-cert.pem", &new_cert), ("ca-key.pem", &old_key), ("root-cert.pem", &both)]);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(current.borrow().issuer_sha256(), old_issuer);

    set(&[("ca-cert.pem", &new_cert), ("ca-key.pem", &new_key), ("root-cert.pem", &both)]);
    until("the new root to sign", || current.borrow().issuer_sha256() == mesh_ctrl::ca::sha256_hex(&new_cert)).await;
    set(&[("ca-cert.pem", &new_cert), ("ca-key.pem", &new_key)]);
    until("the old root removed and unpublished", || {
        current.borrow().roots().len() == 1 && unix(&published(&api)) == unix(&new_cert)
    })
    .await;
}

#[tokio::test]
async fn the_root_is_published_for_agents_as_a_configmap_without_any_key() {
    let api = KubeFake::new();
    let ca = secret::load_or_create(
        api.client(),
        "ferrymesh-system",
        "ferrymesh-ca",
        "cluster.local",
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    secret::publish_root(api.client(), "ferrymesh-system", &ca.roots_pem()).await.unwrap();
    let requests = api.requests();
    let applies: Vec<_> = requests.iter().filter(|r| r.path.ends_with(secret::ROOT_CONFIGMAP)).collect();
    assert_eq!(applies.len(), 1);
    let (query, content_type, object) = (&applies[0].query, &applies[0].content_type, &applies[0].body);
    assert_eq!(applies[0].method, Method::PATCH);
    assert_eq!(content_type, "application/apply-patch+yaml", "a server-side apply");
    assert!(query.contains("fieldManager=mesh-ctrl") && query.contains("force=true"), "{query}");
    assert_eq!((object["apiVersion"].as_str(), object["kind"].as_str()), (Some("v1"), Some("ConfigMap")));
    assert_eq!(object["metadata"]["name"], secret::ROOT_CONFIGMAP);
    assert_eq!(api.get("ConfigMap", "ferrymesh-system", secret::ROOT_CONFIGMAP)["data"], object["data"], "stored");
    let data = object["data"].as_object().unwrap();
    assert_eq!(data.keys().collect::<Vec<_>>(), [secret::ROOT_CONFIGMAP_KEY]);
    assert_eq!(data[secret::ROOT_CONFIGMAP_KEY], ca.roots_pem());
    assert!(!object.to_string().contains("PRIVATE KEY"), "only the root certificate is published");
}

#[tokio::test]
async fn agent_tokens_are_checked_with_token_review_and_bound_to_their_node() {
    let api = KubeFake::new();
    // Node A's agent: the API server reports the node with the token (Kubernetes 1.30+).
    api.accept_token("token-agent-a", AGENT, json!({"authentication.kubernetes.io/node-name": ["node-a"], "authentication.kubernetes.io/pod-name": ["agent-a"]}));
    // Node B's agent on an older API server: only pod name and UID; the pod gives the node.
    api.accept_token("token-agent-b", AGENT, json!({"authentication.kubernetes.io/pod-name": ["agent-b"], "authentication.kubernetes.io/pod-uid": ["uid-b"]}));
    api.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "agent-b", "namespace": "ferrymesh-system", "uid": "uid-b"}, "spec": {"nodeName": "node-b", "containers": []}}));
    // A token of a pod that was replaced by another of the same name.
    api.accept_token("token-stale", AGENT, json!({"authentication.kubernetes.io/pod-name": ["agent-b"], "authentication.kubernetes.io/pod-uid": ["uid-old"]}));
    // A workload's own token (a waypoint's pod), the node reported with it.
    api.accept_token(
        "token-web",
        "system:serviceaccount:shop:web",
        json!({"authentication.kubernetes.io/node-name": ["node-a"]}),
    );
    // A workload's own token on an older API server: its pod, in its namespace, gives the node.
    api.accept_token(
        "token-db",
        "system:serviceaccount:shop:db",
        json!({"authentication.kubernetes.io/pod-name": ["db-0"], "authentication.kubernetes.io/pod-uid": ["uid-db"]}),
    );
    api.apply(json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "db-0", "namespace": "shop", "uid": "uid-db"}, "spec": {"nodeName": "node-b", "containers": []}}));
    // Not a service account's token.
    api.accept_token("token-user", "alice", json!({}));
    let kube = api.client();

    let ca = secret::load_or_create(
        kube.clone(),
        "ferrymesh-system",
        "ferrymesh-ca",
        "cluster.local",
        Duration::from_secs(3600),
    )
    .await
    .unwrap();
    let (publisher, snapshots) = Publisher::new();
    let model = shop_model(&[("web", "node-a", "10.244.1.2"), ("db", "node-b", "10.244.2.2")], &["web", "db"]);
    publisher.publish(&model);
    let reviewer = TokenReviewer::new(kube, "ferrymesh-system", "ferrymesh-agent");
    let service = CertificateService::new(
        mesh_ctrl::ca::fixed(ca),
        std::sync::Arc::new(mesh_ctrl::ca::auth::Authenticator::new(NodeAuth::TokenReview(reviewer))),
        "cluster.local".into(),
        snapshots,
    );
    let addr = serve(tonic::transport::Server::builder().add_service(service.into_server())).await;
    let mut certs = CertificatesClient::connect(format!("http://{addr}")).await.unwrap();
    let mut ask = async |sa: &str, token: &str| {
        let mut request = tonic::Request::new(CreateCertificateRequest {
            csr_pem: csr(),
            namespace: "shop".into(),
            service_account: sa.into(),
        });
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        certs.create_certificate(request).await
    };

    let web = ask("web", "token-agent-a").await.unwrap().into_inner();
    assert_eq!(web.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
    let refused = ask("db", "token-agent-a").await.unwrap_err();
    assert_eq!(refused.code(), Code::PermissionDenied);
    assert!(refused.message().starts_with("node node-a runs no pod with identity"), "{}", refused.message());
    assert!(ask("db", "token-agent-b").await.is_ok(), "node B's agent, bound through its pod");
    assert_eq!(ask("web", "token-agent-b").await.unwrap_err().code(), Code::PermissionDenied);

    let invalid = ask("web", "not-a-token").await.unwrap_err();
    assert_eq!(invalid.code(), Code::Unauthenticated);
    assert_eq!(invalid.message(), "the Kubernetes API rejected the token: invalid bearer token, token lookup failed");
    // A workload's own token obtains its own identity, and no other.
    let own = ask("web", "token-web").await.unwrap().into_inner();
    assert_eq!(own.spiffe_id, "spiffe://cluster.local/ns/shop/sa/web");
    let other = ask("db", "token-web").await.unwrap_err();
    assert_eq!(other.code(), Code::PermissionDenied);
    assert_eq!(
        other.message(),
        "the token is service account shop/web's, which obtains its own identity only, not spiffe://cluster.local/ns/shop/sa/db"
    );
    assert!(ask("db", "token-db").await.is_ok(), "a workload bound to its node through its pod");
    let user = ask("web", "token-user").await.unwrap_err();
    assert_eq!(user.code(), Code::PermissionDenied);
    assert_eq!(user.message(), "the token belongs to alice, which is not a service account");
    let stale = ask("db", "token-stale").await.unwrap_err();
    assert_eq!(stale.code(), Code::PermissionDenied);
    assert_eq!(stale.message(), "the token's pod ferrymesh-system/agent-b no longer exists");

    // Every review asked for the ferrymesh audience; a repeated token is answered from cache.
    assert!(reviews(&api).iter().all(|r| r["spec"]["audiences"] == json!(["ferrymesh"])));
    let calls = reviews(&api).len();
    assert!(ask("web", "token-agent-a").await.is_ok());
    assert_eq!(reviews(&api).len(), calls, "cached");
}
