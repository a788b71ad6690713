//! The config stream over real gRPC on loopback: snapshot then deltas of workloads, services and
//! policies, acks recorded per agent, and a nack answered with a full snapshot.

use std::collections::BTreeMap;
use std::time::Duration;

use ferrymesh_api::config::config_client::ConfigClient;
use ferrymesh_api::config::{ConfigUpdate, WatchRequest};
use ferrymesh_policy::spec::AuthorizationPolicySpec;
use mesh_ctrl::ca::auth::{Authenticator, NodeAuth, NodeTokens};
use mesh_ctrl::model::{Model, Service, ServicePort, TargetPort};
use mesh_ctrl::server::{Agents, ConfigService, StreamLimits};
use mesh_ctrl::snapshot::{Publisher, Trust};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

mod common;
use common::{serve, shop_model};

fn service(name: &str, vip: &str) -> Service {
    Service {
        namespace: "shop".into(),
        name: name.into(),
        vip: Some(vip.parse().unwrap()),
        other_vips: Vec::new(),
        ports: vec![ServicePort {
            name: "http".into(),
            port: 80,
            target: TargetPort::Number(8080),
            app_protocol: None,
        }],
        selector: Some(BTreeMap::from([("app".to_string(), name.to_string())])),
        labels: BTreeMap::new(),
    }
}

fn model() -> Model {
    let mut model = shop_model(&[("web", "node1", "10.244.1.2"), ("db", "node1", "10.244.1.3")], &[]);
    model.services.insert("shop/web".into(), service("web", "10.96.0.10"));
    model.services.insert("shop/db".into(), service("db", "10.96.0.11"));
    let spec: AuthorizationPolicySpec = serde_yaml::from_str("action: ALLOW\nrules: [{}]").unwrap();
    let policy = spec.validate("shop", "allow-all").unwrap();
    model.authorization_policies.insert(policy.key(), policy);
    model
}

struct Agent {
    answers: mpsc::Sender<WatchRequest>,
    updates: tonic::Streaming<ConfigUpdate>,
}

/// node1's and node2's tokens.
const NODE1_TOKEN: &str = "node1-token-0123456789";
const NODE2_TOKEN: &str = "node2-token-0123456789";

/// A config service of `snapshots` authenticating node1 and node2 by their tokens.
fn config_service(
    snapshots: tokio::sync::watch::Receiver<std::sync::Arc<mesh_ctrl::snapshot::Snapshot>>,
    agents: Agents,
    limits: StreamLimits,
) -> ConfigService {
    let tokens = [("node1".to_string(), NODE1_TOKEN.to_string()), ("node2".to_string(), NODE2_TOKEN.to_string())];
    let auth = Authenticator::new(NodeAuth::Tokens(NodeTokens::new(tokens).unwrap()));
    ConfigService::new(snapshots, "cluster.local".into(), agents, std::sync::Arc::new(auth), limits)
}

/// Opens a Watch with `token` (None: none), naming `node` and `waypoint`: its updates, or the
/// refusal.
async fn watch(
    addr: std::net::SocketAddr,
    token: Option<&str>,
    node: &str,
    waypoint: &str,
) -> Result<(mpsc::Sender<WatchRequest>, tonic::Streaming<ConfigUpdate>), tonic::Status> {
    let mut client = ConfigClient::connect(format!("http://{addr}")).await.unwrap();
    let (answers, rx) = mpsc::channel(4);
    let hello = WatchRequest { node: node.into(), waypoint: waypoint.into(), ..Default::default() };
    answers.send(hello).await.unwrap();
    let mut request = tonic::Request::new(ReceiverStream::new(rx));
    if let Some(token) = token {
        request.metadata_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
    }
    let updates = client.watch(request).await?.into_inner();
    Ok((answers, updates))
}

impl Agent {
    async fn connect(addr: std::net::SocketAddr) -> Self {
        let (answers, updates) = watch(addr, Some(NODE1_TOKEN), "node1", "").await.expect("node1's stream");
        Self { answers, updates }
    }

    async fn next(&mut self) -> ConfigUpdate {
        tokio::time::timeout(Duration::from_secs(5), self.updates.message())
            .await
            .expect("an update within 5 s")
            .unwrap()
            .expect("the stream stays open")
    }

    async fn answer(&self, version: u64, error: &str) {
        let answer = WatchRequest { node: "node1".into(), version, error: error.into(), ..Default::default() };
        self.answers.send(answer).await.unwrap();
    }
}

async fn wait_for_agents(agents: &Agents, what: &str, check: impl Fn(&Agents) -> bool) {
    for _ in 0..500 {
        if check(agents) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting for {what}: {:?}", agents.links());
}

#[tokio::test]
async fn snapshot_then_deltas_with_acks_and_a_nack_answered_by_a_snapshot() {
    let (publisher, snapshots) = Publisher::new();
    let mut model = model();
    publisher.publish(&model);
    let agents = Agents::default();
    let service = config_service(snapshots, agents.clone(), StreamLimits::default());
    let addr = serve(tonic::transport::Server::builder().add_service(service.into_server())).await;
    let mut agent = Agent::connect(addr).await;

    let first = agent.next().await;
    assert!(first.snapshot);
    assert_eq!((first.upserted.len(), first.services.len(), first.authorization_policies.len()), (2, 2, 1));
    agent.answer(first.version, "").await;
    wait_for_agents(&agents, "the ack of the snapshot", |a| {
        a.links().first().is_some_and(|l| l.node == "node1" && l.acked_version == first.version)
    })
    .await;
    assert!(agents.links()[0].push_latency.is_some());

    // One pod changes and one service goes: the delta carries exactly that.
    model.pods.get_mut("web").unwrap().labels.insert("tier".into(), "front".into());
    model.services.remove("shop/db");
    publisher.publish(&model);
    let delta = agent.next().await;
    assert!(!delta.snapshot);
    assert_eq!(delta.upserted.iter().map(|w| w.uid.as_str()).collect::<Vec<_>>(), ["web"]);
    assert!(delta.removed.is_empty());
    assert!(delta.services.iter().all(|s| s.name != "db"));
    assert_eq!(delta.removed_services, ["shop/db"]);
    assert!(delta.authorization_policies.is_empty(), "unchanged policies are not resent");
    assert!(delta.removed_authorization_policies.is_empty());

    // A policy removal.
    model.authorization_policies.clear();
    publisher.publish(&model);
    let delta = agent.next().await;
    assert_eq!(delta.removed_authorization_policies, ["shop/allow-all"]);
    assert!(delta.upserted.is_empty() && delta.services.is_empty());

    // The agent rejects it: mesh-ctrl records why and answers with a full snapshot at once.
    agent.answer(delta.version, "policy shop/allow-all: made-up reason").await;
    let resent = agent.next().await;
    assert!(resent.snapshot, "a nack is answered with a snapshot");
    assert_eq!(resent.version, delta.version);
    assert_eq!((resent.upserted.len(), resent.services.len(), resent.authorization_policies.len()), (2, 1, 0));
    let link = &agents.links()[0];
    assert_eq!(link.last_nack, Some((delta.version, "policy shop/allow-all: made-up reason".to_string())));
    agent.answer(resent.version, "").await;
    wait_for_agents(&agents, "the ack of the resent snapshot", |a| a.links()[0].acked_version == resent.version).await;

    // A root rotation: a change of trust alone is a new version, a delta carrying the bundle.
    let roots = vec!["-----BEGIN CERTIFICATE-----\nold\n".to_string(), "-----BEGIN CERTIFICATE-----\nnew\n".into()];
    publisher.set_trust(Trust { roots_pem: roots.clone(), issuer_sha256: "0ld".into() });
    let rotated = agent.next().await;
    assert!(!rotated.snapshot && rotated.upserted.is_empty() && rotated.services.is_empty());
    assert_eq!(rotated.version, resent.version + 1);
    assert_eq!((rotated.trust_roots_pem.clone(), rotated.issuer_sha256.as_str()), (roots.clone(), "0ld"));
    // Setting the same trust again changes nothing; a model change carries the trust along.
    publisher.set_trust(Trust { roots_pem: roots.clone(), issuer_sha256: "0ld".into() });
    model.pods.get_mut("web").unwrap().labels.insert("tier".into(), "back".into());
    publisher.publish(&model);
    let next = agent.next().await;
    assert_eq!(next.version, rotated.version + 1, "no version for the unchanged trust");
    assert_eq!(next.upserted.len(), 1);
    assert_eq!(next.trust_roots_pem, roots, "every update carries the bundle");

    // The agent goes away: it is no longer listed.
    drop(agent);
    wait_for_agents(&agents, "the agent's disconnection", |a| a.links().is_empty()).await;
}

#[tokio::test]
async fn a_stream_needs_the_token_of_its_node_and_streams_per_source_are_bounded() {
    let (publisher, snapshots) = Publisher::new();
    publisher.publish(&model());
    let agents = Agents::default();
    let service = config_service(snapshots, agents.clone(), StreamLimits { per_source: 2, total: 100 });
    let addr = serve(tonic::transport::Server::builder().add_service(service.into_server())).await;
    let code = |r: Result<_, tonic::Status>| r.err().map(|s| s.code());
    // No token, a made-up one, another node's, a waypoint no pod of the node runs: refused.
    assert_eq!(code(watch(addr, None, "node1", "").await), Some(tonic::Code::Unauthenticated));
    assert_eq!(
        code(watch(addr, Some("made-up-token-0123456789"), "node1", "").await),
        Some(tonic::Code::Unauthenticated)
    );
    assert_eq!(code(watch(addr, Some(NODE2_TOKEN), "node1", "").await), Some(tonic::Code::PermissionDenied));
    assert_eq!(
        code(watch(addr, Some(NODE1_TOKEN), "node1", "shop/waypoint").await),
        Some(tonic::Code::PermissionDenied)
    );
    // Two streams from this source; the third is refused, and a place frees when one ends.
    let first = watch(addr, Some(NODE1_TOKEN), "node1", "").await.expect("first");
    let _second = watch(addr, Some(NODE2_TOKEN), "node2", "").await.expect("second");
    assert_eq!(code(watch(addr, Some(NODE1_TOKEN), "node1", "").await), Some(tonic::Code::ResourceExhausted));
    drop(first);
    wait_for_agents(&agents, "the first stream to end", |a| a.links().len() == 1).await;
    let mut third = watch(addr, Some(NODE1_TOKEN), "node1", "").await.expect("a third, once the first ended");
    let update = tokio::time::timeout(Duration::from_secs(5), third.1.message()).await.unwrap().unwrap().unwrap();
    assert!(update.snapshot && update.upserted.len() == 2, "{update:?}");
}
