//! The gRPC config server (port 15012): each agent that calls `Watch` gets the current
//! snapshot, then a delta for every new version (workloads as a delta, policies whole). It only reads snapshots; it never builds them.

use std::pin::Pin;
use std::sync::Arc;

use ferrymesh_api::config::{self as proto, config_server};
use futures::Stream;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::model::diff;
use crate::snapshot::Snapshot;

/// Implementation of the `ferrymesh.config.v1.Config` service.
#[derive(Debug, Clone)]
pub struct ConfigService {
    snapshots: watch::Receiver<Arc<Snapshot>>,
    trust_domain: String,
}

impl ConfigService {
    /// A service streaming the snapshots of `snapshots` for a mesh with `trust_domain`.
    pub fn new(snapshots: watch::Receiver<Arc<Snapshot>>, trust_domain: String) -> Self {
        Self { snapshots, trust_domain }
    }

    /// The tonic server wrapper for this service.
    pub fn into_server(self) -> config_server::ConfigServer<Self> {
        config_server::ConfigServer::new(self)
    }
}

type UpdateStream = Pin<Box<dyn Stream<Item = Result<proto::ConfigUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl config_server::Config for ConfigService {
    type WatchStream = UpdateStream;

    async fn watch(&self, request: Request<proto::WatchRequest>) -> Result<Response<UpdateStream>, Status> {
        let node = request.into_inner().node;
        if node.is_empty() {
            return Err(Status::invalid_argument("WatchRequest.node is empty: start the agent with --node-name"));
        }
        let mut snapshots = self.snapshots.clone();
        let trust_domain = self.trust_domain.clone();
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(async move {
            tracing::info!(%node, "agent connected");
            let mut sent = snapshots.borrow_and_update().clone();
            let first = proto::ConfigUpdate {
                version: sent.version,
                snapshot: true,
                upserted: sent.workloads.values().cloned().collect(),
                removed: Vec::new(),
                trust_domain: trust_domain.clone(),
                authorization_policies: sent.authorization_policies.clone(),
                peer_authentications: sent.peer_authentications.clone(),
                services: sent.services.clone(),
            };
            if tx.send(Ok(first)).await.is_err() {
                return;
            }
            while snapshots.changed().await.is_ok() {
                let current = snapshots.borrow_and_update().clone();
                let (upserted, removed) = diff(&sent.workloads, &current.workloads);
                let update = proto::ConfigUpdate {
                    version: current.version,
                    snapshot: false,
                    upserted,
                    removed,
                    trust_domain: trust_domain.clone(),
                    authorization_policies: current.authorization_policies.clone(),
                    peer_authentications: current.peer_authentications.clone(),
                    services: current.services.clone(),
                };
                sent = current;
                if tx.send(Ok(update)).await.is_err() {
                    break;
                }
            }
            tracing::info!(%node, "agent disconnected");
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }
}
