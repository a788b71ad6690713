//! The config client: streams the model (workloads, services, policies) and the trust bundle
//! (taken only when it holds a root of `--ca-root`) from mesh-ctrl into the state store and acks
//! (or nacks, with the reason) every update, reconnecting with capped
//! exponential backoff. While mesh-ctrl is away the store keeps the last good config, so
//! enrolled pods and proxying are unaffected. After a rejected update every delta is rejected
//! until mesh-ctrl sends a full snapshot: a delta only makes sense on top of what it follows.

use std::sync::Arc;
use std::time::Duration;

use ferrymesh_api::config::{config_client::ConfigClient, ConfigUpdate, WatchRequest};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::ctrl::{Ctrl, CtrlError};
use crate::identity::TokenFile;
use crate::state::State;
use crate::trust::{certificates, TrustBundle};

const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why a config stream ended.
#[derive(Debug, thiserror::Error)]
pub enum ConfigClientError {
    /// mesh-ctrl could not be reached, or did not prove itself.
    #[error(transparent)]
    Ctrl(#[from] CtrlError),
    /// The stream failed.
    #[error("config stream from mesh-ctrl failed: {0}")]
    Stream(#[from] tonic::Status),
}

/// Who a config stream is for: the node, the waypoint (None: the node's agent), and the token
/// that proves it (the one the CA takes).
#[derive(Debug, Clone)]
pub struct Watcher {
    /// The node it runs on.
    pub node: String,
    /// `namespace/name` of the waypoint it is; None: the node's agent.
    pub waypoint: Option<String>,
    /// Its token (`--token-file`).
    pub token: Arc<TokenFile>,
}

/// Streams config from `ctrl` into `state` forever, as `watcher`.
pub async fn run(ctrl: Ctrl, watcher: Watcher, state: Arc<State>) {
    let mut backoff = BACKOFF_MIN;
    let mut last_error = String::new();
    loop {
        match stream_once(&ctrl, &watcher, &state).await {
            Ok(()) => {
                backoff = BACKOFF_MIN;
                tracing::warn!(
                    ctrl = ctrl.address(),
                    "mesh-ctrl closed the config stream; keeping the last good config"
                );
            }
            Err(e) => {
                let message = e.to_string();
                if message != last_error {
                    tracing::warn!(ctrl = ctrl.address(), "{message}; keeping the last good config and retrying");
                    last_error = message;
                }
            }
        }
        if state.ctrl_status().0 {
            backoff = BACKOFF_MIN;
        }
        state.set_ctrl_connected(false);
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn stream_once(ctrl: &Ctrl, watcher: &Watcher, state: &State) -> Result<(), ConfigClientError> {
    let node = watcher.node.as_str();
    let channel = ctrl.connect(None).await?;
    let (answers, outbound) = mpsc::channel(16);
    let hello = WatchRequest {
        node: node.to_string(),
        waypoint: watcher.waypoint.clone().unwrap_or_default(),
        ..Default::default()
    };
    answers.send(hello).await.expect("the receiver is held by the request below");
    // The token goes only to a mesh-ctrl that proved itself against the pinned root.
    let mut request = tonic::Request::new(ReceiverStream::new(outbound));
    let bearer = format!("Bearer {}", watcher.token.current())
        .parse()
        .map_err(|_| tonic::Status::invalid_argument("the token is not valid header text"))?;
    request.metadata_mut().insert("authorization", bearer);
    let mut stream = ConfigClient::new(channel)
        .max_decoding_message_size(ferrymesh_api::MAX_CONFIG_MESSAGE)
        .watch(request)
        .await?
        .into_inner();
    let mut broken = false;
    while let Some(update) = stream.message().await? {
        state.set_ctrl_connected(true);
        let version = update.version;
        let (snapshot, workloads, services) = (update.snapshot, update.upserted.len(), update.services.len());
        let started = std::time::Instant::now();
        let result = if broken && !snapshot {
            Err(format!(
                "delta ignored: it follows a rejected update (waiting for a snapshot, holding version {})",
                state.ctrl_status().1
            ))
        } else {
            trusted_bundle(ctrl, &update).and_then(|trust| {
                state.apply(update).map_err(|e| e.to_string())?;
                if let Some(trust) = trust {
                    state.set_trust(trust);
                }
                Ok(())
            })
        };
        let error = match result {
            Ok(()) => {
                broken = false;
                let took_ms = started.elapsed().as_secs_f64() * 1000.0;
                tracing::info!(version, snapshot, workloads, services, took_ms, "config applied");
                String::new()
            }
            Err(e) => {
                broken = true;
                tracing::warn!(version, "rejected config update: {e}; keeping the last good config");
                e
            }
        };
        if answers.send(WatchRequest { node: node.to_string(), version, error, ..Default::default() }).await.is_err() {
            break;
        }
    }
    Ok(())
}

/// The trust bundle `update` carries (None: it carries none, the one held stays), refused
/// unless it holds a root pinned in `--ca-root`.
fn trusted_bundle(ctrl: &Ctrl, update: &ConfigUpdate) -> Result<Option<TrustBundle>, String> {
    if update.trust_roots_pem.is_empty() {
        return Ok(None);
    }
    let bad = |e: String| format!("trust bundle: {e}");
    let roots = certificates(&update.trust_roots_pem).map_err(bad)?;
    ctrl.check_bundle(&roots).map_err(|e| e.to_string())?;
    TrustBundle::from_certs(roots, &update.issuer_sha256).map(Some).map_err(bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// node n1's agent, with a token in a file of its own.
    fn watcher() -> Watcher {
        let path =
            std::env::temp_dir().join(format!("ferrymesh-token-{}-{:x}", std::process::id(), rand::random::<u64>()));
        std::fs::write(&path, "n1-token-0123456789").unwrap();
        let token = Arc::new(TokenFile::open(&path).unwrap());
        let _ = std::fs::remove_file(&path);
        Watcher { node: "n1".into(), waypoint: None, token }
    }

    #[tokio::test]
    async fn unreachable_ctrl_and_an_impostor_are_told_apart() {
        let state = State::default();
        let pki = crate::ctrl::testing::Pki::new();
        let e = stream_once(&pki.ctrl("https://127.0.0.1:1"), &watcher(), &state).await.unwrap_err();
        let text = e.to_string();
        assert!(text.starts_with("cannot reach mesh-ctrl at https://127.0.0.1:1: transport error: "), "{text}");
        assert!(text.contains("Connection refused") && text.contains("is it running"), "{text}");
        // A server with a valid certificate from another CA.
        let impostor = crate::ctrl::testing::Pki::new();
        let router = tonic::transport::Server::builder()
            .add_service(ferrymesh_api::config::config_server::ConfigServer::new(Scripted::default()));
        let addr = impostor.serve(router).await;
        let e = stream_once(&pki.ctrl(&format!("https://{addr}")), &watcher(), &state).await.unwrap_err();
        let text = e.to_string();
        assert!(text.contains("invalid peer certificate") && text.contains("does not chain to --ca-root"), "{text}");
        assert_eq!(text.matches("invalid peer certificate").count(), 1, "said once: {text}");
        assert!(!state.ctrl_status().0);
    }

    /// A mesh-ctrl that sends a fixed script of updates and forwards every answer.
    #[derive(Default)]
    struct Scripted {
        updates: std::sync::Mutex<Option<Vec<ferrymesh_api::config::ConfigUpdate>>>,
        answers: Option<mpsc::Sender<WatchRequest>>,
    }

    #[tonic::async_trait]
    impl ferrymesh_api::config::config_server::Config for Scripted {
        type WatchStream = ReceiverStream<Result<ferrymesh_api::config::ConfigUpdate, tonic::Status>>;

        async fn watch(
            &self,
            request: tonic::Request<tonic::Streaming<WatchRequest>>,
        ) -> Result<tonic::Response<Self::WatchStream>, tonic::Status> {
            let mut inbound = request.into_inner();
            let answers = self.answers.clone();
            tokio::spawn(async move {
                while let Ok(Some(answer)) = inbound.message().await {
                    if let Some(answers) = &answers {
                        let _ = answers.send(answer).await;
                    }
                }
            });
            let (tx, rx) = mpsc::channel(8);
            let script = self.updates.lock().unwrap().take().unwrap_or_default();
            for update in script {
                tx.send(Ok(update)).await.unwrap();
            }
            tokio::spawn(async move { tx.closed().await });
            Ok(tonic::Response::new(ReceiverStream::new(rx)))
        }
    }

    #[tokio::test]
    async fn acks_good_updates_and_nacks_deltas_after_a_rejected_one_until_a_snapshot() {
        use ferrymesh_api::config::{ConfigUpdate, Workload};
        let workload = |uid: &str, ip: &str| Workload { uid: uid.into(), ip: ip.into(), ..Default::default() };
        let update = |version, snapshot, w: Workload| ConfigUpdate {
            version,
            snapshot,
            upserted: vec![w],
            ..Default::default()
        };
        let script = vec![
            update(1, true, workload("a", "10.0.0.1")),
            update(2, false, workload("b", "not-an-ip")),
            update(3, false, workload("c", "10.0.0.3")),
            update(4, true, workload("d", "10.0.0.4")),
        ];
        let (answers, mut answered) = mpsc::channel(8);
        let server = Scripted { updates: std::sync::Mutex::new(Some(script)), answers: Some(answers) };
        let pki = crate::ctrl::testing::Pki::new();
        let router = tonic::transport::Server::builder()
            .add_service(ferrymesh_api::config::config_server::ConfigServer::new(server));
        let addr = pki.serve(router).await;
        let state = std::sync::Arc::new(State::default());
        let client_state = state.clone();
        let ctrl = pki.ctrl(&format!("https://{addr}"));
        let watcher = watcher();
        tokio::spawn(async move { stream_once(&ctrl, &watcher, &client_state).await });
        let mut got = Vec::new();
        for _ in 0..5 {
            let answer = tokio::time::timeout(Duration::from_secs(5), answered.recv()).await.unwrap().unwrap();
            assert_eq!(answer.node, "n1");
            got.push((answer.version, answer.error));
        }
        assert_eq!(got[0], (0, String::new()), "the hello");
        assert_eq!(got[1], (1, String::new()));
        assert_eq!(got[2].0, 2);
        assert!(got[2].1.starts_with("workload b: field ip:"), "{:?}", got[2]);
        assert_eq!(got[3].0, 3);
        assert!(got[3].1.starts_with("delta ignored: it follows a rejected update"), "{:?}", got[3]);
        assert_eq!(got[4], (4, String::new()), "the snapshot is applied");
        assert!(state.workload("c").is_none(), "the delta after the rejected one was not applied");
        assert!(state.workload("d").is_some() && state.workload("a").is_none());
        assert_eq!(state.ctrl_status().1, 4);
    }

    /// A snapshot of 100,000 workloads (some 10 MiB, past gRPC's default 4 MiB) is received,
    /// applied and acked.
    #[tokio::test]
    async fn a_snapshot_of_100k_workloads_is_applied() {
        use ferrymesh_api::config::{ConfigUpdate, Workload};
        let workloads: Vec<Workload> = (0..100_000u32)
            .map(|i| Workload {
                uid: format!("uid-{i:06}"),
                name: format!("pod-{i:06}"),
                namespace: format!("ns-{:03}", i % 1000),
                node: format!("node-{:04}", i % 1000),
                service_account: "default".into(),
                ip: std::net::Ipv4Addr::from(0x0af4_0000 + i).to_string(),
                labels: [("app".to_string(), format!("app-{}", i % 5000))].into(),
                ..Default::default()
            })
            .collect();
        let update = ConfigUpdate { version: 1, snapshot: true, upserted: workloads, ..Default::default() };
        assert!(prost::Message::encoded_len(&update) > 8 << 20, "{}", prost::Message::encoded_len(&update));
        let (answers, mut answered) = mpsc::channel(8);
        let server = Scripted { updates: std::sync::Mutex::new(Some(vec![update])), answers: Some(answers) };
        let pki = crate::ctrl::testing::Pki::new();
        let router = tonic::transport::Server::builder().add_service(
            ferrymesh_api::config::config_server::ConfigServer::new(server)
                .max_encoding_message_size(ferrymesh_api::MAX_CONFIG_MESSAGE),
        );
        let addr = pki.serve(router).await;
        let state = std::sync::Arc::new(State::default());
        let (client_state, ctrl, watcher) = (state.clone(), pki.ctrl(&format!("https://{addr}")), watcher());
        let stream = tokio::spawn(async move { stream_once(&ctrl, &watcher, &client_state).await });
        let mut got = Vec::new();
        for _ in 0..2 {
            let answer = tokio::time::timeout(Duration::from_secs(60), answered.recv()).await.unwrap().unwrap();
            got.push((answer.version, answer.error));
        }
        stream.abort();
        assert_eq!(got, [(0, String::new()), (1, String::new())], "the hello, then the ack");
        assert!(
            state.workload("uid-099999").is_some() && state.workload_by_ip("10.245.134.159".parse().unwrap()).is_some()
        );
    }

    /// The bundle of every update replaces the one held, when it holds a pinned root; one
    /// that does not is refused with the whole update, and an update without one keeps it.
    #[tokio::test]
    async fn a_trust_bundle_is_taken_only_when_it_holds_a_pinned_root() {
        use ferrymesh_api::config::{ConfigUpdate, Workload};
        let pki = crate::ctrl::testing::Pki::new();
        let foreign = crate::ctrl::testing::Pki::new();
        let (pinned, other) = (pki.root_pem(), foreign.root_pem());
        let update = |version, roots: Vec<String>, issuer: &str| ConfigUpdate {
            version,
            snapshot: true,
            upserted: vec![Workload { uid: format!("w{version}"), ip: "10.0.0.1".into(), ..Default::default() }],
            trust_roots_pem: roots,
            issuer_sha256: issuer.into(),
            ..Default::default()
        };
        let state = std::sync::Arc::new(State::default());
        // One stream per update: its answer comes after it was applied, before anything else.
        let mut seen = Vec::new();
        for u in [
            update(1, vec![other.clone()], "a"),
            update(2, vec![other.clone(), pinned.clone()], "a"),
            update(3, vec![], ""),
            update(4, vec![pinned.clone()], "b"),
        ] {
            let (answers, mut answered) = mpsc::channel(8);
            let server = Scripted { updates: std::sync::Mutex::new(Some(vec![u])), answers: Some(answers) };
            let router = tonic::transport::Server::builder()
                .add_service(ferrymesh_api::config::config_server::ConfigServer::new(server));
            let addr = pki.serve(router).await;
            let (client_state, ctrl) = (state.clone(), pki.ctrl(&format!("https://{addr}")));
            let watcher = watcher();
            let stream = tokio::spawn(async move { stream_once(&ctrl, &watcher, &client_state).await });
            for _ in 0..2 {
                let answer = tokio::time::timeout(Duration::from_secs(5), answered.recv()).await.unwrap().unwrap();
                let held = state.trust().borrow().as_ref().map(|t| (t.info.len(), t.issuer_sha256.clone()));
                seen.push((answer.version, answer.error, held));
            }
            stream.abort();
        }
        let seen: Vec<_> = seen.into_iter().filter(|(version, _, _)| *version > 0).collect();
        assert_eq!(seen[0].0, 1);
        assert!(seen[0].1.contains("holds none of the roots in --ca-root"), "{:?}", seen[0]);
        assert_eq!(seen[0].2, None);
        assert!(state.workload("w1").is_none(), "nothing of the refused update was applied");
        assert_eq!(seen[1], (2, String::new(), Some((2, "a".to_string()))), "the overlap bundle");
        assert_eq!(seen[2], (3, String::new(), Some((2, "a".to_string()))), "no bundle: the held one stays");
        assert_eq!(seen[3], (4, String::new(), Some((1, "b".to_string()))), "the old root removed");
    }
}
