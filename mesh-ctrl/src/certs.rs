//! The certificate service: authenticates the calling agent (bootstrap node token in local
//! mode, its ServiceAccount token checked by TokenReview with Kubernetes), checks that the
//! identity it asks for belongs to a pod on its node and to a ServiceAccount that exists, and
//! has the CA sign the CSR. It owns node authorization; it never touches key material beyond
//! the CSR it forwards. Failed authentications are logged with their source and limited per
//! source address: past [`MAX_AUTH_FAILURES`] in [`AUTH_FAILURE_WINDOW`] a source is refused
//! without its token being looked at, until the window has passed.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferrymesh_api::ca::{self as proto, certificates_server};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use ferrymesh_spiffe::SpiffeId;

use crate::ca::CurrentCa;
use crate::snapshot::Snapshot;
use crate::token_review::TokenReviewer;

/// Node tokens: who a bearer token says the caller is.
#[derive(Debug, Default, Clone)]
pub struct NodeTokens {
    node_by_token: HashMap<String, String>,
}

impl NodeTokens {
    /// Reads a YAML map of node name to token (`--node-tokens`).
    pub fn load(path: &Path) -> Result<Self, String> {
        let text = std::fs::read_to_string(path).map_err(|e| format!("--node-tokens {}: {e}", path.display()))?;
        let map: HashMap<String, String> = serde_yaml::from_str(&text)
            .map_err(|e| format!("--node-tokens {}: expected a YAML map of node name to token: {e}", path.display()))?;
        let mut node_by_token = HashMap::new();
        for (node, token) in map {
            if token.len() < 16 {
                return Err(format!(
                    "--node-tokens {}: the token of node {node} is shorter than 16 characters",
                    path.display()
                ));
            }
            if let Some(other) = node_by_token.insert(token, node.clone()) {
                return Err(format!("--node-tokens {}: nodes {node} and {other} share a token", path.display()));
            }
        }
        Ok(Self { node_by_token })
    }

    /// The node `token` names.
    fn node(&self, token: &str) -> Result<String, Status> {
        self.node_by_token.get(token).cloned().ok_or_else(|| {
            Status::unauthenticated(
                "unknown node token: the agent's --token-file matches no node in mesh-ctrl --node-tokens",
            )
        })
    }
}

/// How agents prove which node they run on.
#[derive(Debug)]
pub enum NodeAuth {
    /// Bootstrap tokens (local mode).
    Tokens(NodeTokens),
    /// Projected ServiceAccount tokens checked with TokenReview (Kubernetes).
    TokenReview(TokenReviewer),
}

impl NodeAuth {
    /// The node a request's `authorization: Bearer <token>` proves.
    async fn node<T>(&self, request: &Request<T>) -> Result<String, Status> {
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        let token = header.and_then(|h| h.strip_prefix("Bearer ")).filter(|t| !t.is_empty()).ok_or_else(|| {
            Status::unauthenticated(
                "no token: start the agent with --token-file (its node's bootstrap token, or its projected service account token)",
            )
        })?;
        match self {
            Self::Tokens(tokens) => tokens.node(token),
            Self::TokenReview(reviewer) => reviewer.node(token).await,
        }
    }
}

/// Failed authentications a source may make within [`AUTH_FAILURE_WINDOW`].
pub const MAX_AUTH_FAILURES: u32 = 10;
/// The window failed authentications are counted in.
pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Failed authentications per source address, in windows of [`AUTH_FAILURE_WINDOW`].
#[derive(Debug, Default)]
struct AuthFailures {
    by_source: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl AuthFailures {
    /// Refuses `source` (with how long until it may try again) once it has failed
    /// [`MAX_AUTH_FAILURES`] times in the current window.
    fn check(&self, source: IpAddr) -> Result<(), Duration> {
        let mut by_source = self.by_source.lock().expect("auth failures lock");
        let now = Instant::now();
        by_source.retain(|_, (start, _)| now.duration_since(*start) < AUTH_FAILURE_WINDOW);
        match by_source.get(&source) {
            Some((start, n)) if *n >= MAX_AUTH_FAILURES => Err(AUTH_FAILURE_WINDOW - now.duration_since(*start)),
            _ => Ok(()),
        }
    }

    /// Counts a failure of `source`; returns its failures in the current window.
    fn failed(&self, source: IpAddr) -> u32 {
        let mut by_source = self.by_source.lock().expect("auth failures lock");
        let now = Instant::now();
        let entry = by_source.entry(source).or_insert((now, 0));
        if now.duration_since(entry.0) >= AUTH_FAILURE_WINDOW {
            *entry = (now, 0);
        }
        entry.1 += 1;
        entry.1
    }
}

/// Implementation of `ferrymesh.ca.v1.Certificates`.
#[derive(Debug, Clone)]
pub struct CertificateService {
    ca: CurrentCa,
    auth: Arc<NodeAuth>,
    failures: Arc<AuthFailures>,
    trust_domain: String,
    snapshots: watch::Receiver<Arc<Snapshot>>,
}

impl CertificateService {
    /// A service signing with the CA in force in `ca` for the agents `auth` recognizes,
    /// authorizing against the model.
    pub fn new(ca: CurrentCa, auth: NodeAuth, trust_domain: String, snapshots: watch::Receiver<Arc<Snapshot>>) -> Self {
        Self { ca, auth: Arc::new(auth), failures: Arc::default(), trust_domain, snapshots }
    }

    /// The tonic server wrapper for this service.
    pub fn into_server(self) -> certificates_server::CertificatesServer<Self> {
        certificates_server::CertificatesServer::new(self)
    }
}

#[tonic::async_trait]
impl certificates_server::Certificates for CertificateService {
    async fn create_certificate(
        &self,
        request: Request<proto::CreateCertificateRequest>,
    ) -> Result<Response<proto::CreateCertificateResponse>, Status> {
        let source = request.remote_addr().map(|a| a.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
        if let Err(retry) = self.failures.check(source) {
            metrics::counter!("ferrymesh_ctrl_auth_throttled_total").increment(1);
            return Err(Status::resource_exhausted(format!(
                "too many failed authentications from {source} ({MAX_AUTH_FAILURES} in {}s); try again in {}s",
                AUTH_FAILURE_WINDOW.as_secs(),
                retry.as_secs() + 1
            )));
        }
        let node = match self.auth.node(&request).await {
            Ok(node) => node,
            Err(refused) => {
                let failures = self.failures.failed(source);
                metrics::counter!("ferrymesh_ctrl_auth_failures_total").increment(1);
                // Logged up to the limit; past it the throttle answers, and is counted.
                if failures <= MAX_AUTH_FAILURES {
                    tracing::warn!(%source, failures, "refused an authentication: {}", refused.message());
                }
                return Err(refused);
            }
        };
        let r = request.into_inner();
        if r.namespace.is_empty() || r.service_account.is_empty() {
            return Err(Status::invalid_argument("namespace and service_account are required"));
        }
        let id = SpiffeId::new(&self.trust_domain, &r.namespace, &r.service_account).map_err(|e| {
            Status::invalid_argument(format!("no identity for the namespace and service account asked: {e}"))
        })?;
        let (on_node, account_exists) = {
            let snapshot = self.snapshots.borrow();
            let on_node = snapshot
                .workloads
                .values()
                .any(|w| w.node == node && w.namespace == r.namespace && w.service_account == r.service_account);
            (on_node, snapshot.service_accounts.contains(&format!("{}/{}", r.namespace, r.service_account)))
        };
        if !account_exists {
            tracing::warn!(%node, identity = %id, "refused a certificate: no such service account");
            metrics::counter!("ferrymesh_ctrl_cert_refusals_total").increment(1);
            return Err(Status::permission_denied(format!(
                "service account {}/{} does not exist; no certificate for {id}",
                r.namespace, r.service_account
            )));
        }
        if !on_node {
            tracing::warn!(%node, identity = %id, "refused a certificate: no such pod on the node");
            metrics::counter!("ferrymesh_ctrl_cert_refusals_total").increment(1);
            return Err(Status::permission_denied(format!(
                "node {node} runs no pod with identity {id}; an agent may only obtain identities of pods on its own node"
            )));
        }
        let ca = self.ca.borrow().clone();
        let signed = ca.sign(&r.csr_pem, &id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(%node, identity = %id, "issued a certificate");
        metrics::counter!("ferrymesh_ctrl_certs_issued_total").increment(1);
        Ok(Response::new(proto::CreateCertificateResponse {
            cert_chain_pem: signed.chain_pem,
            roots_pem: ca.roots_pem(),
            spiffe_id: id.into(),
        }))
    }
}
