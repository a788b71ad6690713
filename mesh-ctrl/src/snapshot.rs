//! Versioned snapshots of what agents receive of the model: the one value the config server streams.
//! Sources publish here; the server only reads. The version grows only when that
//! changes, so agents can tell a real update from a reload that changed nothing.

use std::collections::BTreeSet;
use std::sync::Arc;

use ferrymesh_api::kinds::ConfigSet;
use tokio::sync::watch;

use crate::ca::{Ca, CurrentCa};
use crate::model::Model;

/// The workloads agents receive, at one version.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    /// Monotonic version, starting at 1 for the first published model.
    pub version: u64,
    /// Every object agents receive, by kind and key.
    pub config: ConfigSet,
    /// `namespace/name` of every ServiceAccount (for the certificate service; not sent to agents).
    pub service_accounts: BTreeSet<String>,
    /// The trust bundle and the certificate signing now.
    pub trust: Trust,
    /// Namespaces opted in to the mesh.
    pub captured_namespaces: Vec<String>,
}

/// What agents verify peers against, and which CA certificate signs workload certificates now
/// (an agent renews every certificate another one signed).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Trust {
    /// The roots, one PEM certificate each.
    pub roots_pem: Vec<String>,
    /// SHA-256 (hex) of the issuing CA certificate.
    pub issuer_sha256: String,
}

impl Trust {
    /// The trust of `ca`.
    pub fn of(ca: &Ca) -> Self {
        Self { roots_pem: ca.roots().to_vec(), issuer_sha256: ca.issuer_sha256().to_string() }
    }
}

/// The writer of snapshots: the config source publishes the model, the CA its trust.
#[derive(Debug, Clone)]
pub struct Publisher {
    tx: Arc<watch::Sender<Arc<Snapshot>>>,
}

impl Publisher {
    /// A publisher and a receiver of its snapshots (version 0, empty, until the first publish).
    pub fn new() -> (Self, watch::Receiver<Arc<Snapshot>>) {
        let (tx, rx) = watch::channel(Arc::new(Snapshot::default()));
        (Self { tx: Arc::new(tx) }, rx)
    }

    /// Publishes `model` as a new version if what agents receive of it changed. Returns the
    /// version now current.
    pub fn publish(&self, model: &Model) -> u64 {
        let mut next = Snapshot {
            version: 0,
            config: model.config(),
            service_accounts: model.service_accounts.keys().cloned().collect(),
            trust: Trust::default(),
            captured_namespaces: model.captured_namespaces(),
        };
        let mut version = 0;
        self.tx.send_if_modified(|current| {
            next.version = current.version;
            next.trust = current.trust.clone();
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

    /// Sets the trust every snapshot carries from now on: a new version when it changed and a
    /// model was published already (before, the first model's version carries it).
    pub fn set_trust(&self, trust: Trust) {
        self.tx.send_if_modified(|current| {
            if current.trust == trust {
                return false;
            }
            let mut next = (**current).clone();
            next.trust = trust;
            if next.version > 0 {
                next.version += 1;
                metrics::gauge!("ferrymesh_ctrl_config_version").set(next.version as f64);
            }
            *current = Arc::new(next);
            true
        });
    }

    /// Keeps the snapshots carrying the trust of the CA in force (and its root count in
    /// ferrymesh_ctrl_trust_bundle_roots), forever.
    pub async fn keep_trust_current(self, mut ca: CurrentCa) {
        loop {
            let trust = Trust::of(&ca.borrow_and_update());
            metrics::gauge!("ferrymesh_ctrl_trust_bundle_roots").set(trust.roots_pem.len() as f64);
            self.set_trust(trust);
            if ca.changed().await.is_err() {
                return;
            }
        }
    }

    /// Another receiver of the snapshots.
    pub fn subscribe(&self) -> watch::Receiver<Arc<Snapshot>> {
        self.tx.subscribe()
    }
}
