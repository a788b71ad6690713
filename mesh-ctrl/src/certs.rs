//! The certificate service: authenticates the calling agent (bootstrap node token in local
//! mode, its ServiceAccount token checked by TokenReview with Kubernetes), checks that the
//! identity it asks for belongs to a pod on its node and to a ServiceAccount that exists, and
//! has the CA sign the CSR. It owns node authorization; it never touches key material beyond
//! the CSR it forwards.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use ferrymesh_api::ca::{self as proto, certificates_server};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use crate::ca::Ca;
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

/// Implementation of `ferrymesh.ca.v1.Certificates`.
#[derive(Debug, Clone)]
pub struct CertificateService {
    ca: Arc<Ca>,
    auth: Arc<NodeAuth>,
    trust_domain: String,
    snapshots: watch::Receiver<Arc<Snapshot>>,
}

impl CertificateService {
    /// A service signing with `ca` for the agents `auth` recognizes, authorizing against the
    /// model.
    pub fn new(ca: Arc<Ca>, auth: NodeAuth, trust_domain: String, snapshots: watch::Receiver<Arc<Snapshot>>) -> Self {
        Self { ca, auth: Arc::new(auth), trust_domain, snapshots }
    }

    /// The tonic server wrapper for this service.
    pub fn into_server(self) -> certificates_server::CertificatesServer<Self> {
        certificates_server::CertificatesServer::new(self)
    }
}

/// `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
pub fn spiffe_id(trust_domain: &str, namespace: &str, service_account: &str) -> String {
    format!("spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}")
}

#[tonic::async_trait]
impl certificates_server::Certificates for CertificateService {
    async fn create_certificate(
        &self,
        request: Request<proto::CreateCertificateRequest>,
    ) -> Result<Response<proto::CreateCertificateResponse>, Status> {
        let node = self.auth.node(&request).await?;
        let r = request.into_inner();
        if r.namespace.is_empty() || r.service_account.is_empty() {
            return Err(Status::invalid_argument("namespace and service_account are required"));
        }
        let id = spiffe_id(&self.trust_domain, &r.namespace, &r.service_account);
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
        let signed = self.ca.sign(&r.csr_pem, &id).map_err(|e| Status::invalid_argument(e.to_string()))?;
        tracing::info!(%node, identity = %id, "issued a certificate");
        metrics::counter!("ferrymesh_ctrl_certs_issued_total").increment(1);
        Ok(Response::new(proto::CreateCertificateResponse {
            cert_chain_pem: signed.chain_pem,
            roots_pem: self.ca.roots_pem().to_string(),
            spiffe_id: id,
        }))
    }
}
