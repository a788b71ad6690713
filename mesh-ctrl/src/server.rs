//! The gRPC config server (port 15012). Each agent opens a `Watch` stream naming its node and
//! gets the current snapshot, then a delta for every new version (workloads, services and
//! policies added, changed or removed). The agent acks or nacks every update; a nack is
//! answered with a full snapshot. [`Agents`] records who is connected and what each has
//! applied. The server only reads snapshots; it never builds them.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ferrymesh_api::config::{self as proto, config_server};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::snapshot::Snapshot;

/// One agent's config stream, as mesh-ctrl sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLink {
    /// Node the agent serves.
    pub node: String,
    /// When the stream opened.
    pub connected_at: SystemTime,
    /// Version of the last update sent.
    pub sent_version: u64,
    /// Version of the last update the agent acked.
    pub acked_version: u64,
    /// Time from sending an update to its ack, for the last acked update.
    pub push_latency: Option<Duration>,
    /// Why the agent rejected the last update it rejected, with that update's version.
    pub last_nack: Option<(u64, String)>,
}

/// The agents connected now, by stream.
#[derive(Debug, Clone, Default)]
pub struct Agents {
    links: Arc<Mutex<BTreeMap<u64, AgentLink>>>,
    next: Arc<AtomicU64>,
}

impl Agents {
    /// Every open stream, oldest first.
    pub fn links(&self) -> Vec<AgentLink> {
        self.links.lock().expect("agents lock").values().cloned().collect()
    }

    fn open(&self, node: &str) -> u64 {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let link = AgentLink {
            node: node.to_string(),
            connected_at: SystemTime::now(),
            sent_version: 0,
            acked_version: 0,
            push_latency: None,
            last_nack: None,
        };
        let mut links = self.links.lock().expect("agents lock");
        links.insert(id, link);
        metrics::gauge!("ferrymesh_ctrl_connected_agents").set(links.len() as f64);
        id
    }

    fn update(&self, id: u64, f: impl FnOnce(&mut AgentLink)) {
        if let Some(link) = self.links.lock().expect("agents lock").get_mut(&id) {
            f(link);
        }
    }

    fn close(&self, id: u64) {
        let mut links = self.links.lock().expect("agents lock");
        links.remove(&id);
        metrics::gauge!("ferrymesh_ctrl_connected_agents").set(links.len() as f64);
    }
}

/// Implementation of the `ferrymesh.config.v1.Config` service.
#[derive(Debug, Clone)]
pub struct ConfigService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    trust_domain: String,
    agents: Agents,
    stop: watch::Receiver<bool>,
}

impl ConfigService {
    /// A service streaming the snapshots of `snapshots` for a mesh with `trust_domain`,
    /// recording its agents in `agents`.
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, trust_domain: String, agents: Agents) -> Self {
        Self { snapshots, trust_domain, agents, stop: watch::channel(false).1 }
    }

    /// Ends every stream once `stop` turns true (a graceful server shutdown waits for open
    /// streams, and agents never end theirs).
    pub fn with_stop(mut self, stop: watch::Receiver<bool>) -> Self {
        self.stop = stop;
        self
    }

    /// The tonic server wrapper for this service.
    pub fn into_server(self) -> config_server::ConfigServer<Self> {
        config_server::ConfigServer::new(self)
    }
}

/// The update that brings an agent holding `sent` (None: nothing, or nothing trusted) to
/// `current`.
fn update_for(sent: Option<&Snapshot>, current: &Snapshot, trust_domain: &str) -> proto::ConfigUpdate {
    let mut update = proto::ConfigUpdate {
        version: current.version,
        snapshot: sent.is_none(),
        trust_domain: trust_domain.to_string(),
        trust_roots_pem: current.trust.roots_pem.clone(),
        issuer_sha256: current.trust.issuer_sha256.clone(),
        captured_namespaces: current.captured_namespaces.clone(),
        ..Default::default()
    };
    // Every kind the same way (see ferrymesh_api::kinds).
    current.config.put_changes(sent.map(|s| &s.config), &mut update);
    update
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<proto::ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl config_server::Config for ConfigService {
    type WatchStream = UpdateStream;

    async fn watch(&self, request: Request<Streaming<proto::WatchRequest>>) -> Result<Response<UpdateStream>, Status> {
        let mut inbound = request.into_inner();
        let hello = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream must open with a WatchRequest naming the node"))?;
        let node = hello.node;
        if node.is_empty() {
            return Err(Status::invalid_argument("WatchRequest.node is empty: start the agent with --node-name"));
        }
        let mut snapshots = self.snapshots.clone();
        let trust_domain = self.trust_domain.clone();
        let agents = self.agents.clone();
        let mut stop = self.stop.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let id = agents.open(&node);
            tracing::info!(%node, "agent connected");
            // What the agent holds, as far as we know; None after a nack.
            let mut held: Option<Arc<Snapshot>> = None;
            // Updates sent and not yet answered: version -> (sent at, was a snapshot).
            let mut pending: BTreeMap<u64, (Instant, bool)> = BTreeMap::new();
            let mut send_now = true;
            loop {
                if send_now {
                    send_now = false;
                    let current = snapshots.borrow_and_update().clone();
                    let update = update_for(held.as_deref(), &current, &trust_domain);
                    held = Some(current);
                    pending.insert(update.version, (Instant::now(), update.snapshot));
                    agents.update(id, |l| l.sent_version = update.version);
                    if tx.send(Ok(update)).await.is_err() {
                        break;
                    }
                }
                tokio::select! {
                    changed = snapshots.changed() => {
                        if changed.is_err() {
                            break;
                        }
                        send_now = true;
                    }
                    message = inbound.message() => match message {
                        Ok(Some(answer)) => {
                            let sent = pending.remove(&answer.version);
                            pending.retain(|v, _| *v > answer.version);
                            if answer.error.is_empty() {
                                if let Some((at, _)) = sent {
                                    metrics::histogram!("ferrymesh_ctrl_push_latency_seconds").record(at.elapsed().as_secs_f64());
                                }
                                agents.update(id, |l| {
                                    l.acked_version = l.acked_version.max(answer.version);
                                    l.push_latency = sent.map(|(at, _)| at.elapsed()).or(l.push_latency);
                                });
                            } else {
                                tracing::warn!(%node, version = answer.version, "agent rejected the update: {}", answer.error);
                                metrics::counter!("ferrymesh_ctrl_config_nacks_total").increment(1);
                                agents.update(id, |l| l.last_nack = Some((answer.version, answer.error.clone())));
                                // The agent dropped the delta and every delta after it: it gets
                                // a full snapshot, now if a delta was rejected, at the next
                                // change if a snapshot was (sending it again would fail again).
                                held = None;
                                send_now = sent.is_some_and(|(_, snapshot)| !snapshot);
                            }
                        }
                        Ok(None) | Err(_) => break,
                    },
                    () = tx.closed() => break,
                    Ok(_) = stop.wait_for(|s| *s) => break,
                }
            }
            agents.close(id);
            tracing::info!(%node, "agent disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
