//! Identity manager: one certificate per SPIFFE identity of the enrolled pods, from the mesh
//! CA. The key is generated here and never leaves the agent; only a CSR goes to mesh-ctrl.
//! Each identity has a task that renews at half-life (with jitter), and soon after mesh-ctrl
//! starts signing with another CA certificate (a root rotation), and, when renewal fails, keeps
//! the valid certificate and retries with backoff until it expires.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use ferrymesh_api::ca::{certificates_client::CertificatesClient, CreateCertificateRequest};
use rcgen::{CertificateParams, KeyPair, PKCS_ECDSA_P256_SHA256};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::sign::CertifiedKey;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use ferrymesh_spiffe::{SpiffeId, SpiffeIdError};

use crate::ctrl::Ctrl;
use crate::trust::{sha256_hex, TrustReceiver};

/// A workload identity: namespace and service account.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Identity {
    /// Namespace.
    pub namespace: String,
    /// Service account.
    pub service_account: String,
}

impl Identity {
    /// Its SPIFFE ID in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> Result<SpiffeId, SpiffeIdError> {
        SpiffeId::new(trust_domain, &self.namespace, &self.service_account)
    }
}

impl std::fmt::Display for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.service_account)
    }
}

/// A certificate and key for one identity, ready for rustls.
#[derive(Debug)]
pub struct WorkloadCert {
    /// Whose it is.
    pub identity: Identity,
    /// The SPIFFE ID in its URI SAN.
    pub spiffe_id: SpiffeId,
    /// Chain and signing key.
    pub key: Arc<CertifiedKey>,
    /// SHA-256 (hex) of the CA certificate that signed it.
    pub issuer_sha256: String,
    /// Leaf serial, hex.
    pub serial: String,
    /// Leaf expiry.
    pub not_after: SystemTime,
    /// When the manager will renew it.
    pub rotate_at: SystemTime,
}

impl WorkloadCert {
    /// Whether the certificate is still valid now.
    pub fn valid(&self) -> bool {
        SystemTime::now() < self.not_after
    }
}

/// Why a certificate could not be obtained.
#[derive(Debug, Clone, thiserror::Error)]
pub enum IdentityError {
    /// mesh-ctrl could not be reached or refused.
    #[error("certificate for {id}: {message}")]
    Fetch {
        /// SPIFFE ID asked for.
        id: String,
        /// Why.
        message: String,
    },
    /// No certificate arrived in time.
    #[error("no certificate for {0} yet")]
    NotReady(String),
    /// The agent runs without --token-file.
    #[error("certificates are disabled: start the agent with --token-file")]
    Disabled,
}

/// The current certificate of an identity, as its renewal task publishes it.
type CertReceiver = watch::Receiver<Option<Arc<WorkloadCert>>>;
/// The last renewal error of an identity, cleared on success.
type LastError = Arc<Mutex<Option<String>>>;

struct Tracked {
    cert: CertReceiver,
    last_error: LastError,
    task: JoinHandle<()>,
}

/// The agent's credential towards mesh-ctrl: the file behind `--token-file`, read again for
/// every request, since the kubelet rotates a projected ServiceAccount token in place.
#[derive(Debug)]
pub struct TokenFile {
    path: std::path::PathBuf,
    last: Mutex<String>,
}

impl TokenFile {
    /// Reads `path` once to check that it holds a token.
    pub fn open(path: &std::path::Path) -> Result<Self, String> {
        let token = read_token(path)?;
        Ok(Self { path: path.to_path_buf(), last: Mutex::new(token) })
    }

    /// The token as the file holds it now (the last good one if it cannot be read right now).
    pub fn current(&self) -> String {
        let mut last = self.last.lock().expect("token lock");
        match read_token(&self.path) {
            Ok(token) => *last = token,
            Err(e) => tracing::warn!("{e}; using the token read before"),
        }
        last.clone()
    }
}

fn read_token(path: &std::path::Path) -> Result<String, String> {
    let text =
        std::fs::read_to_string(path).map_err(|e| format!("cannot read --token-file {}: {e}", path.display()))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(format!("--token-file {} is empty", path.display()));
    }
    Ok(token.to_string())
}

/// Obtains and renews certificates.
pub struct IdentityManager {
    ctrl: Ctrl,
    token: Option<Arc<TokenFile>>,
    trust_domain: watch::Receiver<String>,
    trust: TrustReceiver,
    tracked: Mutex<HashMap<Identity, Tracked>>,
}

impl std::fmt::Debug for IdentityManager {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityManager")
            .field("ctrl", &self.ctrl.address())
            .field("enabled", &self.token.is_some())
            .finish()
    }
}

const BACKOFF_MIN: Duration = Duration::from_millis(200);
const BACKOFF_MAX: Duration = Duration::from_secs(30);

impl IdentityManager {
    /// A manager asking `ctrl` with the token of `token` (None: disabled), for identities in the
    /// trust domain `trust_domain` announces, renewing what another CA certificate than the one
    /// `trust` names signed.
    pub fn new(
        ctrl: Ctrl,
        token: Option<Arc<TokenFile>>,
        trust_domain: watch::Receiver<String>,
        trust: TrustReceiver,
    ) -> Self {
        Self { ctrl, token, trust_domain, trust, tracked: Mutex::new(HashMap::new()) }
    }

    /// The trust bundle peers are verified against (as mesh-ctrl sends it).
    pub fn trust(&self) -> TrustReceiver {
        self.trust.clone()
    }

    /// Whether certificates (and so HBONE) are enabled.
    pub fn enabled(&self) -> bool {
        self.token.is_some()
    }

    /// The trust domain of the mesh.
    pub fn trust_domain(&self) -> String {
        self.trust_domain.borrow().clone()
    }

    /// Starts keeping a certificate for `id` (idempotent) and returns its receiver.
    fn track(&self, id: &Identity) -> (CertReceiver, LastError) {
        let mut tracked = self.tracked.lock().expect("identity lock");
        let entry = tracked.entry(id.clone()).or_insert_with(|| {
            let (tx, rx) = watch::channel(None);
            let last_error = Arc::new(Mutex::new(None));
            let task = tokio::spawn(keep_renewed(
                id.clone(),
                self.ctrl.clone(),
                self.token.clone(),
                self.trust_domain.clone(),
                self.trust.clone(),
                tx,
                last_error.clone(),
            ));
            Tracked { cert: rx, last_error, task }
        });
        (entry.cert.clone(), entry.last_error.clone())
    }

    /// The valid certificate of `id`, waiting up to `timeout` for the first one.
    pub async fn cert(&self, id: &Identity, timeout: Duration) -> Result<Arc<WorkloadCert>, IdentityError> {
        if !self.enabled() {
            return Err(IdentityError::Disabled);
        }
        let (mut rx, last_error) = self.track(id);
        let cert = match tokio::time::timeout(timeout, rx.wait_for(|c| c.as_ref().is_some_and(|c| c.valid()))).await {
            Ok(Ok(cert)) => cert.clone(),
            _ => None,
        };
        match cert {
            Some(cert) => Ok(cert),
            None => {
                let id = id.spiffe_id(&self.trust_domain()).map_or_else(|_| id.to_string(), String::from);
                match last_error.lock().expect("identity lock").clone() {
                    Some(message) => Err(IdentityError::Fetch { id, message }),
                    None => Err(IdentityError::NotReady(id)),
                }
            }
        }
    }

    /// The valid certificate of `id` now, if any (never waits).
    pub fn current(&self, id: &Identity) -> Option<Arc<WorkloadCert>> {
        let tracked = self.tracked.lock().expect("identity lock");
        tracked.get(id).and_then(|t| t.cert.borrow().clone()).filter(|c| c.valid())
    }

    /// Stops renewing identities not in `keep`.
    pub fn retain(&self, keep: &[Identity]) {
        self.tracked.lock().expect("identity lock").retain(|id, t| {
            let kept = keep.contains(id);
            if !kept {
                t.task.abort();
            }
            kept
        });
    }

    /// Every certificate held, for status.
    pub fn all(&self) -> Vec<Arc<WorkloadCert>> {
        let tracked = self.tracked.lock().expect("identity lock");
        let mut all: Vec<_> = tracked.values().filter_map(|t| t.cert.borrow().clone()).collect();
        all.sort_by(|a, b| a.identity.cmp(&b.identity));
        all
    }
}

async fn keep_renewed(
    id: Identity,
    ctrl: Ctrl,
    token: Option<Arc<TokenFile>>,
    mut trust_domain: watch::Receiver<String>,
    mut trust: TrustReceiver,
    tx: watch::Sender<Option<Arc<WorkloadCert>>>,
    last_error: LastError,
) {
    // Certificates need the trust domain, which arrives with the first config update.
    let _ = trust_domain.wait_for(|td| !td.is_empty()).await;
    let mut backoff = BACKOFF_MIN;
    loop {
        let td = trust_domain.borrow().clone();
        let bearer = token.as_ref().map(|t| t.current()).unwrap_or_default();
        match fetch(&id, &td, &ctrl, &bearer).await {
            Ok(cert) => {
                tracing::info!(identity = %cert.spiffe_id, serial = %cert.serial, "certificate issued");
                crate::metrics::cert_issued();
                let wait = cert.rotate_at.duration_since(SystemTime::now()).unwrap_or_default();
                let issuer = cert.issuer_sha256.clone();
                tx.send_replace(Some(Arc::new(cert)));
                *last_error.lock().expect("identity lock") = None;
                backoff = BACKOFF_MIN;
                tokio::select! {
                    () = tokio::time::sleep(wait) => {}
                    () = issuer_moved_from(&mut trust, &issuer) => {
                        // Spread the renewals of every identity of every node a little.
                        tokio::time::sleep(rand::random_range(ROTATION_SPREAD / 4..ROTATION_SPREAD)).await;
                        tracing::info!(identity = %id, "mesh-ctrl signs with another CA certificate now: renewing");
                    }
                }
            }
            Err(message) => {
                tracing::warn!(identity = %id, "{message}; retrying in {backoff:?}");
                crate::metrics::cert_failed();
                *last_error.lock().expect("identity lock") = Some(message);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        }
    }
}

/// Over how long the certificates of a node are renewed after mesh-ctrl switched its CA
/// certificate.
const ROTATION_SPREAD: Duration = Duration::from_secs(2);

/// Returns once the trust bundle names a signing CA certificate other than `issuer` (never when
/// mesh-ctrl names none, or the certificate's issuer is unknown: its chain held no CA).
async fn issuer_moved_from(trust: &mut TrustReceiver, issuer: &str) {
    if issuer.is_empty() {
        return std::future::pending().await;
    }
    let moved =
        trust.wait_for(|t| t.as_ref().is_some_and(|t| !t.issuer_sha256.is_empty() && t.issuer_sha256 != issuer));
    if moved.await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// When to renew a certificate issued at `issued` that expires at `not_after`: at half its
/// remaining life, moved by up to ±10% so many certificates do not renew at once.
pub fn rotate_at(issued: SystemTime, not_after: SystemTime) -> SystemTime {
    let life = not_after.duration_since(issued).unwrap_or_default();
    let jitter = rand::random_range(0.9..1.1);
    issued + life.mul_f64(0.5 * jitter)
}

async fn fetch(id: &Identity, trust_domain: &str, ctrl: &Ctrl, token: &str) -> Result<WorkloadCert, String> {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).map_err(|e| format!("cannot generate a key: {e}"))?;
    let csr = CertificateParams::default()
        .serialize_request(&key)
        .and_then(|c| c.pem())
        .map_err(|e| format!("cannot make a CSR: {e}"))?;
    // The token goes only to a mesh-ctrl that proved itself against the pinned root.
    let channel = ctrl.connect(Some(Duration::from_secs(10))).await.map_err(|e| e.to_string())?;
    let mut request = tonic::Request::new(CreateCertificateRequest {
        csr_pem: csr,
        namespace: id.namespace.clone(),
        service_account: id.service_account.clone(),
    });
    let bearer =
        format!("Bearer {token}").parse().map_err(|_| "the node token is not valid header text".to_string())?;
    request.metadata_mut().insert("authorization", bearer);
    let issued = SystemTime::now();
    let response = CertificatesClient::new(channel)
        .create_certificate(request)
        .await
        .map_err(|s| format!("mesh-ctrl refused: {}", s.message()))?
        .into_inner();
    let chain: Vec<CertificateDer<'static>> = response
        .cert_chain_pem
        .iter()
        .map(|pem| CertificateDer::from_pem_slice(pem.as_bytes()))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("bad certificate from mesh-ctrl: {e}"))?;
    let want = id.spiffe_id(trust_domain).map_err(|e| format!("no identity for {id}: {e}"))?;
    if response.spiffe_id != want.as_str() {
        return Err(format!("mesh-ctrl issued {} instead of {want}", response.spiffe_id));
    }
    let leaf = chain.first().ok_or("mesh-ctrl sent an empty chain")?;
    let (serial, not_after) = crate::tls::serial_and_expiry(leaf)?;
    let bundle = CertificateDer::pem_slice_iter(response.roots_pem.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("bad trust bundle from mesh-ctrl: {e}"))?;
    ctrl.check_bundle(&bundle).map_err(|e| e.to_string())?;
    let issuer_sha256 = chain.get(1).map(|ca| sha256_hex(ca)).unwrap_or_default();
    let key_der = PrivateKeyDer::try_from(key.serialize_der()).map_err(|e| format!("key encoding: {e}"))?;
    let signing = rustls::crypto::ring::sign::any_supported_type(&key_der).map_err(|e| format!("key: {e}"))?;
    Ok(WorkloadCert {
        identity: id.clone(),
        spiffe_id: want,
        key: Arc::new(CertifiedKey::new(chain, signing)),
        issuer_sha256,
        serial,
        not_after,
        rotate_at: rotate_at(issued, not_after),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_is_at_half_life_with_jitter() {
        let issued = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let not_after = issued + Duration::from_secs(100);
        for _ in 0..200 {
            let at = rotate_at(issued, not_after).duration_since(issued).unwrap();
            assert!(at >= Duration::from_secs(45) && at <= Duration::from_secs(55), "{at:?}");
        }
        assert_eq!(rotate_at(not_after, issued), not_after, "an already expired cert renews now");
    }

    #[test]
    fn spiffe_ids() {
        let id = Identity { namespace: "shop".into(), service_account: "web".into() };
        assert_eq!(id.spiffe_id("cluster.local").unwrap().to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert!(id.spiffe_id("").is_err(), "no identity before the trust domain is known");
    }
}
