//! The certificate service (`ferrymesh.ca.v1.Certificates` on 15012): authenticates the caller
//! ([`super::auth`]: an agent, or in Kubernetes a workload with its own token, which may ask only
//! for its own identity), checks that the identity it asks for belongs to a pod on its node and
//! to a ServiceAccount that exists, and has the CA in force sign the CSR. It never touches key
//! material beyond the CSR it forwards. Failed authentications are logged with their source and
//! limited per source address.

use std::sync::Arc;

use ferrymesh_api::ca::{self as proto, certificates_server};
use tokio::sync::watch;
use tonic::{Request, Response, Status};

use ferrymesh_spiffe::SpiffeId;

use super::auth::{Authenticator, Caller};
use super::CurrentCa;
use crate::snapshot::Snapshot;

/// Implementation of `ferrymesh.ca.v1.Certificates`.
#[derive(Debug, Clone)]
pub struct CertificateService {
    ca: CurrentCa,
    auth: Arc<Authenticator>,
    trust_domain: String,
    snapshots: watch::Receiver<Arc<Snapshot>>,
}

impl CertificateService {
    /// A service signing with the CA in force in `ca` for the callers `auth` recognizes,
    /// authorizing against the model.
    pub fn new(
        ca: CurrentCa,
        auth: Arc<Authenticator>,
        trust_domain: String,
        snapshots: watch::Receiver<Arc<Snapshot>>,
    ) -> Self {
        Self { ca, auth, trust_domain, snapshots }
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
        let caller = self.auth.authenticate(&request).await?;
        let r = request.into_inner();
        if r.namespace.is_empty() || r.service_account.is_empty() {
            return Err(Status::invalid_argument("namespace and service_account are required"));
        }
        let id = SpiffeId::new(&self.trust_domain, &r.namespace, &r.service_account).map_err(|e| {
            Status::invalid_argument(format!("no identity for the namespace and service account asked: {e}"))
        })?;
        if let Caller::Workload { namespace, service_account, .. } = &caller {
            if (namespace, service_account) != (&r.namespace, &r.service_account) {
                tracing::warn!(identity = %id, "refused a certificate: a workload asked for another identity");
                metrics::counter!("ferrymesh_ctrl_cert_refusals_total").increment(1);
                return Err(Status::permission_denied(format!(
                    "the token is service account {namespace}/{service_account}'s, which obtains its own identity only, not {id}"
                )));
            }
        }
        let node = caller.node();
        let (on_node, account_exists) = {
            let snapshot = self.snapshots.borrow();
            let on_node = snapshot
                .config
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
