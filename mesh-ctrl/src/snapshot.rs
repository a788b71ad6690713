//! Versioned snapshots of what agents receive of the model: the one value the config server streams.
//! Sources publish here; the server only reads. The version grows only when that
//! changes, so agents can tell a real update from a reload that changed nothing.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use ferrymesh_api::config as proto;
use tokio::sync::watch;

use crate::model::Model;

/// The workloads agents receive, at one version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Monotonic version, starting at 1 for the first published model.
    pub version: u64,
    /// Workloads by UID.
    pub workloads: BTreeMap<String, proto::Workload>,
    /// Every AuthorizationPolicy, by `namespace/name`.
    pub authorization_policies: BTreeMap<String, proto::AuthorizationPolicy>,
    /// Every PeerAuthentication, by `namespace/name`.
    pub peer_authentications: BTreeMap<String, proto::PeerAuthentication>,
    /// Every Service with its endpoints, by `namespace/name`.
    pub services: BTreeMap<String, proto::Service>,
    /// `namespace/name` of every ServiceAccount (for the certificate service; not sent to agents).
    pub service_accounts: BTreeSet<String>,
}

/// The single writer of snapshots.
#[derive(Debug)]
pub struct Publisher {
    tx: watch::Sender<Arc<Snapshot>>,
}

impl Publisher {
    /// A publisher and a receiver of its snapshots (version 0, empty, until the first publish).
    pub fn new() -> (Self, watch::Receiver<Arc<Snapshot>>) {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        (Self { tx }, rx)
    }

    /// Publishes `model` as a new version if what agents receive of it changed. Returns the
    /// version now current.
    pub fn publish(&self, model: &Model) -> u64 {
        let mut next = Snapshot {
            version: 0,
            workloads: model.workloads(),
            authorization_policies: model.authorization_policies_wire(),
            peer_authentications: model.peer_authentications_wire(),
            services: model.services_wire(),
            service_accounts: model.service_accounts.keys().cloned().collect(),
        };
        let mut version = 0;
        self.tx.send_if_modified(|current| {
            next.version = current.version;
            if current.version > 0 && **current == next {
                version = current.version;
                return false;
            }
            version = current.version + 1;
            next.version = version;
            *current = Arc::new(std::mem::take(&mut next));
            true
        });
        metrics::gauge!("ferrymesh_ctrl_config_version").set(version as f64);
        version
    }

    /// Another receiver of the snapshots.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }
}
