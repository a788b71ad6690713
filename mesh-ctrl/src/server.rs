//! The gRPC config server (port 15012). A client (an agent, or a waypoint) opens a `Watch` stream
//! with the same token the CA takes, naming its node (and, a waypoint, which one it is); mesh-ctrl
//! refuses it unless the token proves that node (and that waypoint), and within the per-source and
//! total stream limits, each refusal counted. The client gets its view ([`Scope`]) of the
//! current snapshot, then a delta for every new version (objects added, changed or removed). The
//! client acks or nacks every update; a nack is answered with a full snapshot. [`Agents`] records
//! who is connected and what each has applied. The server only reads snapshots; it never builds
//! them.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use ferrymesh_api::config::{self as proto, config_server};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::ca::auth::{Authenticator, Caller};
use crate::model::GATEWAY_NAME_LABEL;
use crate::scope::Scope;
use crate::snapshot::Snapshot;
use ferrymesh_api::kinds::ConfigSet;

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

/// How many config streams may be open at once.
#[derive(Debug, Clone, Copy)]
pub struct StreamLimits {
    /// From one source address.
    pub per_source: usize,
    /// From all sources.
    pub total: usize,
}

impl Default for StreamLimits {
    fn default() -> Self {
        Self { per_source: 16, total: 10_000 }
    }
}

/// The streams open now, by source address.
#[derive(Debug, Default)]
struct OpenStreams {
    by_source: Mutex<(BTreeMap<IpAddr, usize>, usize)>,
}

/// A stream's place within the limits, given back when it ends.
struct StreamSlot {
    streams: Arc<OpenStreams>,
    source: IpAddr,
}

impl OpenStreams {
    fn take(self: &Arc<Self>, source: IpAddr, limits: StreamLimits) -> Result<StreamSlot, Status> {
        let mut open = self.by_source.lock().expect("streams lock");
        let from_source = open.0.get(&source).copied().unwrap_or(0);
        if from_source >= limits.per_source {
            return Err(Status::resource_exhausted(format!(
                "{from_source} config streams already open from {source} (mesh-ctrl --max-watches-per-source)"
            )));
        }
        if open.1 >= limits.total {
            return Err(Status::resource_exhausted(format!(
                "{} config streams already open (mesh-ctrl --max-watches)",
                open.1
            )));
        }
        *open.0.entry(source).or_default() += 1;
        open.1 += 1;
        Ok(StreamSlot { streams: self.clone(), source })
    }
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut open = self.streams.by_source.lock().expect("streams lock");
        if let Some(n) = open.0.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                open.0.remove(&self.source);
            }
        }
        open.1 -= 1;
    }
}

/// Implementation of the `ferrymesh.config.v1.Config` service.
#[derive(Debug, Clone)]
pub struct ConfigService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    trust_domain: String,
    agents: Agents,
    stop: watch::Receiver<bool>,
    auth: Arc<Authenticator>,
    limits: StreamLimits,
    streams: Arc<OpenStreams>,
}

impl ConfigService {
    /// A service streaming the snapshots of `snapshots` for a mesh with `trust_domain` to the
    /// callers `auth` recognizes, each its own view ([`Scope`]), within `limits`, recording its
    /// clients in `agents`.
    pub fn new(
        snapshots: watch::Receiver<Arc<Snapshot>>,
        trust_domain: String,
        agents: Agents,
        auth: Arc<Authenticator>,
        limits: StreamLimits,
    ) -> Self {
        let stop = watch::channel(false).1;
        Self { snapshots, trust_domain, agents, stop, auth, limits, streams: Arc::default() }
    }

    /// Ends every stream once `stop` turns true (a graceful server shutdown waits for open
    /// streams, and agents never end theirs).
    pub fn with_stop(mut self, stop: watch::Receiver<bool>) -> Self {
        self.stop = stop;
        self
    }

    /// The tonic server wrapper for this service.
    pub fn into_server(self) -> config_server::ConfigServer<Self> {
        config_server::ConfigServer::new(self).max_encoding_message_size(ferrymesh_api::MAX_CONFIG_MESSAGE)
    }
}

/// Counts a refused stream in `ferrymesh_ctrl_config_refusals_total{reason}` and passes the
/// refusal on.
fn refused(reason: &'static str, status: Status) -> Status {
    metrics::counter!("ferrymesh_ctrl_config_refusals_total", "reason" => reason).increment(1);
    status
}

/// The scope `caller` may watch, as its first message asks: its own node's, and as a waypoint
/// only the waypoint it is (a workload's token), or one of its node's pods runs (a node's).
fn scope_of(caller: &Caller, hello: &proto::WatchRequest, config: &ConfigSet) -> Result<Scope, Status> {
    if hello.node.is_empty() {
        return Err(Status::invalid_argument("WatchRequest.node is empty: start the agent with --node-name"));
    }
    if hello.node != caller.node() {
        return Err(Status::permission_denied(format!(
            "the token is node {}'s: it cannot watch node {}'s config",
            caller.node(),
            hello.node
        )));
    }
    match (caller, hello.waypoint.as_str()) {
        (Caller::Agent { node }, "") => Ok(Scope::Node(node.clone())),
        (Caller::Agent { node }, key) if runs_waypoint_on(config, key, node) => Ok(Scope::Waypoint(key.to_string())),
        (Caller::Agent { node }, key) => Err(Status::permission_denied(format!(
            "no pod of waypoint {key} runs on node {node}: its token cannot watch that waypoint's config"
        ))),
        (Caller::Workload { namespace, service_account, .. }, key) if key == format!("{namespace}/{service_account}") => {
            Ok(Scope::Waypoint(key.to_string()))
        }
        (Caller::Workload { namespace, service_account, .. }, _) => Err(Status::permission_denied(format!(
            "the token is service account {namespace}/{service_account}'s: it watches only as waypoint {namespace}/{service_account}"
        ))),
    }
}

/// Whether a pod of waypoint `key` (`namespace/name`) runs on `node`.
fn runs_waypoint_on(config: &ConfigSet, key: &str, node: &str) -> bool {
    let Some((namespace, name)) = key.split_once('/') else { return false };
    config.workloads.values().any(|w| {
        w.node == node && w.namespace == namespace && w.labels.get(GATEWAY_NAME_LABEL).is_some_and(|n| n == name)
    })
}

/// The update that brings a client holding `sent` (None: nothing, or nothing trusted) to
/// `view`, its view of `current`.
fn update_for(
    sent: Option<&ConfigSet>,
    view: &ConfigSet,
    current: &Snapshot,
    trust_domain: &str,
) -> proto::ConfigUpdate {
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
    view.put_changes(sent, &mut update);
    update
}

/// The longest nack text kept and logged: a client chooses it.
const NACK_TEXT_LIMIT: usize = 512;

/// A client's nack text as it is kept and logged: at most [`NACK_TEXT_LIMIT`] bytes, control
/// characters escaped (no forged log lines).
fn nack_text(text: &str) -> String {
    let mut end = text.len().min(NACK_TEXT_LIMIT);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let escaped: String = text[..end].chars().flat_map(char::escape_default).collect();
    if end < text.len() {
        format!("{escaped}... ({} bytes)", text.len())
    } else {
        escaped
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<proto::ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl config_server::Config for ConfigService {
    type WatchStream = UpdateStream;

    async fn watch(&self, request: Request<Streaming<proto::WatchRequest>>) -> Result<Response<UpdateStream>, Status> {
        let source = request.remote_addr().map(|a| a.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
        let caller = self.auth.authenticate(&request).await.map_err(|e| refused("unauthenticated", e))?;
        let slot = self.streams.take(source, self.limits).map_err(|e| refused("streams", e))?;
        let mut inbound = request.into_inner();
        let hello = inbound
            .message()
            .await?
            .ok_or_else(|| Status::invalid_argument("the stream must open with a WatchRequest naming the node"))?;
        let scope = scope_of(&caller, &hello, &self.snapshots.borrow().config).map_err(|e| {
            tracing::warn!(%source, node = %hello.node, waypoint = %hello.waypoint, "refused a config stream: {}", e.message());
            refused("scope", e)
        })?;
        let node = hello.node;
        let mut snapshots = self.snapshots.clone();
        let trust_domain = self.trust_domain.clone();
        let agents = self.agents.clone();
        let mut stop = self.stop.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            let _slot = slot;
            let id = agents.open(&node);
            tracing::info!(%node, %scope, "config stream opened");
            // What the client holds, as far as we know; None after a nack.
            let mut held: Option<Arc<ConfigSet>> = None;
            // Updates sent and not yet answered: version -> (sent at, was a snapshot).
            let mut pending: BTreeMap<u64, (Instant, bool)> = BTreeMap::new();
            let mut send_now = true;
            loop {
                if send_now {
                    send_now = false;
                    let current = snapshots.borrow_and_update().clone();
                    let view = Arc::new(scope.view(&current.config));
                    let update = update_for(held.as_deref(), &view, &current, &trust_domain);
                    held = Some(view);
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
                                let error = nack_text(&answer.error);
                                tracing::warn!(%node, %scope, version = answer.version, "the client rejected the update: {error}");
                                metrics::counter!("ferrymesh_ctrl_config_nacks_total").increment(1);
                                agents.update(id, |l| l.last_nack = Some((answer.version, error)));
                                // The client dropped the delta and every delta after it: it gets
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
            tracing::info!(%node, %scope, "config stream closed");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nack_text_is_bounded_and_cannot_forge_a_log_line() {
        assert_eq!(nack_text("policy shop/p: bad"), "policy shop/p: bad");
        assert_eq!(nack_text("x\nINFO forged"), "x\\nINFO forged");
        let long = "é".repeat(1000);
        let kept = nack_text(&long);
        assert!(kept.ends_with("... (2000 bytes)") && kept.len() < 4 * NACK_TEXT_LIMIT, "{kept}");
    }
}
