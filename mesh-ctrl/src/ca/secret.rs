//! The mesh CA in a Kubernetes Secret (`mesh-ctrl --kubernetes`): read at start, or a root
//! generated and created when absent, so every replica and every restart signs with the same
//! root. Two replicas starting together both try to create it; the loser reads the winner's.
//! Keys are Istio's plug-in CA file names (see [`crate::ca`]): `ca-cert.pem` and `ca-key.pem`,
//! optionally `cert-chain.pem` and `root-cert.pem` (the trust bundle, which may hold an old and a
//! new root during a rotation). The Secret is read again periodically and a change that makes a
//! consistent CA is put in force without a restart.
//!
//! The trust bundle (root certificates only, never a key) is published for agents as ConfigMap
//! `ferrymesh-ca-root-cert` (Istio's `istio-ca-root-cert`), which the agent DaemonSet mounts
//! and gives to `mesh-agent --ca-root`: agents hold the root before they ever talk to mesh-ctrl.
//! It is kept in ferrymesh's namespace and in every namespace that holds a waypoint, whose pods
//! mount it the same way (a pod can mount only a ConfigMap of its own namespace).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use k8s_openapi::ByteString;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

use tokio::sync::watch;

use crate::ca::{Ca, CaError, CaFiles, CurrentCa, CA_FILES};
use crate::snapshot::Snapshot;

/// Default name of the Secret.
pub const CA_SECRET: &str = "ferrymesh-ca";
const CERT_KEY: &str = "ca-cert.pem";
const KEY_KEY: &str = "ca-key.pem";
/// The ConfigMap agents read the mesh root from.
pub const ROOT_CONFIGMAP: &str = "ferrymesh-ca-root-cert";
/// Its key holding the PEM bundle.
pub const ROOT_CONFIGMAP_KEY: &str = "root-cert.pem";
/// Field manager of mesh-ctrl's server-side applies.
const FIELD_MANAGER: &str = "mesh-ctrl";

/// Why the CA Secret or the root ConfigMap could not be read or written, written for operators.
#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    /// The API server refused or could not be reached.
    #[error("cannot {what}: {source}")]
    Api {
        /// What was being done, e.g. `read the CA Secret ferrymesh-system/ferrymesh-ca`.
        what: String,
        /// The API error.
        source: Box<kube::Error>,
    },
    /// The Secret holds no CA mesh-ctrl can use.
    #[error(transparent)]
    Ca(#[from] CaError),
    /// The Secret holds none of the CA files.
    #[error("{0}: holds none of {CA_FILES:?} (a generated CA Secret holds {CERT_KEY} and {KEY_KEY})")]
    Empty(String),
    /// Another replica created the Secret, and it cannot be read back.
    #[error("the CA {0} was created by someone else but cannot be read back")]
    Vanished(String),
}

fn api_error(what: String) -> impl FnOnce(kube::Error) -> SecretError {
    move |source| SecretError::Api { what, source: Box::new(source) }
}

/// Metadata of an object mesh-ctrl creates: `namespace/name`, labelled as ferrymesh's.
fn managed_meta(name: &str, namespace: &str) -> ObjectMeta {
    ObjectMeta {
        name: Some(name.to_string()),
        namespace: Some(namespace.to_string()),
        labels: Some(BTreeMap::from([("app.kubernetes.io/managed-by".into(), "ferrymesh".into())])),
        ..Default::default()
    }
}

/// Publishes the trust bundle `roots_pem` as ConfigMap `namespace/ferrymesh-ca-root-cert`
/// (server-side apply: created, or updated to exactly this).
pub async fn publish_root(client: Client, namespace: &str, roots_pem: &str) -> Result<(), SecretError> {
    let api: Api<ConfigMap> = Api::namespaced(client, namespace);
    let config_map = ConfigMap {
        metadata: managed_meta(ROOT_CONFIGMAP, namespace),
        data: Some(BTreeMap::from([(ROOT_CONFIGMAP_KEY.to_string(), roots_pem.to_string())])),
        ..Default::default()
    };
    api.patch(ROOT_CONFIGMAP, &PatchParams::apply(FIELD_MANAGER).force(), &Patch::Apply(&config_map))
        .await
        .map_err(api_error(format!("publish the mesh root as ConfigMap {namespace}/{ROOT_CONFIGMAP}")))?;
    Ok(())
}

/// How often the root ConfigMaps are published again even without a change (so a deleted or
/// edited one comes back).
const REPUBLISH_EVERY: Duration = Duration::from_secs(60);

/// Keeps ConfigMap `ferrymesh-ca-root-cert` holding the trust bundle of the CA in force, in
/// `namespace` (ferrymesh's) and in every namespace of a waypoint of the latest snapshot:
/// published in a namespace as soon as it needs it, in all at once when the bundle changes, and
/// again every minute; a failure is retried after 5 s.
pub async fn keep_root_published(
    client: Client,
    namespace: String,
    mut ca: CurrentCa,
    mut snapshots: watch::Receiver<Arc<Snapshot>>,
) {
    // What each namespace was last given.
    let mut published: BTreeMap<String, String> = BTreeMap::new();
    let mut republish = tokio::time::interval_at(tokio::time::Instant::now() + REPUBLISH_EVERY, REPUBLISH_EVERY);
    loop {
        let roots_pem = ca.borrow_and_update().roots_pem();
        let mut wanted = BTreeSet::from([namespace.clone()]);
        wanted.extend(snapshots.borrow_and_update().config.waypoints.values().map(|w| w.namespace.clone()));
        published.retain(|ns, _| wanted.contains(ns));
        let mut failed = false;
        let due: Vec<String> = wanted.into_iter().filter(|ns| published.get(ns) != Some(&roots_pem)).collect();
        for ns in due {
            match publish_root(client.clone(), &ns, &roots_pem).await {
                Ok(()) => {
                    published.insert(ns, roots_pem.clone());
                }
                Err(e) => {
                    tracing::warn!("{e}; retrying in 5 s");
                    failed = true;
                }
            }
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(5)), if failed => {}
            _ = republish.tick() => published.clear(),
            Ok(()) = ca.changed() => {}
            Ok(()) = snapshots.changed() => {}
        }
    }
}

/// Reads Secret `namespace/name` every `interval` and puts a changed CA in force in `current`
/// (a Secret that makes no consistent CA is refused and logged; the CA in force stays).
pub async fn keep_reloading(
    client: Client,
    namespace: String,
    name: String,
    ttl: Duration,
    interval: Duration,
    current: watch::Sender<Arc<Ca>>,
) {
    let api: Api<Secret> = Api::namespaced(client, &namespace);
    let what = format!("Secret {namespace}/{name}");
    let mut seen: Option<CaFiles> = None;
    loop {
        tokio::time::sleep(interval).await;
        let secret = match api.get_opt(&name).await {
            Ok(Some(secret)) => secret,
            Ok(None) => {
                tracing::warn!("the CA {what} is gone; the CA in force stays");
                continue;
            }
            Err(e) => {
                tracing::warn!("cannot read the CA {what}: {e}; retrying");
                continue;
            }
        };
        let files = match files_of(&secret, &what) {
            Ok(files) => files,
            Err(e) => {
                crate::ca::apply_reload(&current, Err(e), &what);
                continue;
            }
        };
        if seen.as_ref() == Some(&files) {
            continue;
        }
        let reloaded = Ca::from_files(&files, &|key| origin(&what, key), ttl);
        seen = Some(files);
        crate::ca::apply_reload(&current, reloaded, &what);
    }
}

/// The CA whose root is in Secret `namespace/name`, creating the Secret with a new root for
/// `trust_domain` when there is none.
pub async fn load_or_create(
    client: Client,
    namespace: &str,
    name: &str,
    trust_domain: &str,
    ttl: Duration,
) -> Result<Ca, SecretError> {
    let secrets: Api<Secret> = Api::namespaced(client, namespace);
    let what = format!("Secret {namespace}/{name}");
    for _ in 0..2 {
        if let Some(secret) = secrets.get_opt(name).await.map_err(api_error(format!("read the CA {what}")))? {
            return from_secret(&secret, &what, ttl);
        }
        let (cert_pem, key_pem) = Ca::generate_root(trust_domain)?;
        let secret = Secret {
            metadata: managed_meta(name, namespace),
            type_: Some("Opaque".into()),
            data: Some(BTreeMap::from([
                (CERT_KEY.to_string(), ByteString(cert_pem.into_bytes())),
                (KEY_KEY.to_string(), ByteString(key_pem.into_bytes())),
            ])),
            ..Default::default()
        };
        match secrets.create(&PostParams::default(), &secret).await {
            Ok(created) => {
                tracing::info!(secret = %what, "generated a new mesh root CA");
                return from_secret(&created, &what, ttl);
            }
            // Another replica created it first: read theirs.
            Err(kube::Error::Api(e)) if e.code == 409 => continue,
            Err(e) => return Err(api_error(format!("create the CA {what}"))(e)),
        }
    }
    Err(SecretError::Vanished(what))
}

/// How a key of the CA Secret is named in errors.
fn origin(what: &str, key: &str) -> PathBuf {
    PathBuf::from(format!("{what} data.{key}"))
}

/// The CA files a Secret holds (its keys named like the files).
fn files_of(secret: &Secret, what: &str) -> Result<CaFiles, CaError> {
    let mut files = CaFiles::new();
    for key in CA_FILES {
        if let Some(bytes) = secret.data.as_ref().and_then(|d| d.get(key)) {
            let text = String::from_utf8(bytes.0.clone())
                .map_err(|_| CaError::Invalid { path: origin(what, key), message: "not PEM text".into() })?;
            files.insert(key.to_string(), text);
        }
    }
    Ok(files)
}

fn from_secret(secret: &Secret, what: &str, ttl: Duration) -> Result<Ca, SecretError> {
    let files = files_of(secret, what)?;
    if files.is_empty() {
        return Err(SecretError::Empty(what.to_string()));
    }
    Ok(Ca::from_files(&files, &|key| origin(what, key), ttl)?)
}
