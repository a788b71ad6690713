//! Kubernetes identity of callers of the CA (`mesh-ctrl --kubernetes`): a caller presents its
//! projected ServiceAccount token (audience `ferrymesh`); mesh-ctrl asks the API server with a
//! TokenReview whether it is valid and binds it to the node of the pod the token was issued for:
//! the node name the API server reports with the token (Kubernetes 1.30+), else the pod's
//! `spec.nodeName` after checking its UID (so a token of a deleted pod whose name was reused
//! proves nothing). A token of the agent DaemonSet's ServiceAccount is an agent's
//! ([`Caller::Agent`]); any other is a workload's own ([`Caller::Workload`]), as a waypoint's
//! pod presents it. Answers are cached for a minute per token.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use k8s_openapi::api::authentication::v1::{TokenReview, TokenReviewSpec};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::{Api, Client};
use tonic::Status;

use super::auth::Caller;

/// Audience agents request for their projected token.
pub const AUDIENCE: &str = "ferrymesh";
const NODE_NAME: &str = "authentication.kubernetes.io/node-name";
const POD_NAME: &str = "authentication.kubernetes.io/pod-name";
const POD_UID: &str = "authentication.kubernetes.io/pod-uid";
const CACHE_TTL: Duration = Duration::from_secs(60);
const CACHE_MAX: usize = 4096;

/// Checks callers' tokens with the API server.
pub struct TokenReviewer {
    client: Client,
    /// The agent DaemonSet's ServiceAccount: namespace and name.
    namespace: String,
    service_account: String,
    cache: Mutex<HashMap<String, (Caller, Instant)>>,
}

impl std::fmt::Debug for TokenReviewer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenReviewer")
            .field("service_account", &format!("{}/{}", self.namespace, self.service_account))
            .finish_non_exhaustive()
    }
}

impl TokenReviewer {
    /// A reviewer taking tokens of ServiceAccount `namespace/service_account` for agents'.
    pub fn new(client: Client, namespace: &str, service_account: &str) -> Self {
        Self {
            client,
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
            cache: Mutex::default(),
        }
    }

    /// Who presents `token`, and on which node.
    pub async fn caller(&self, token: &str) -> Result<Caller, Status> {
        if let Some((caller, at)) = self.cache.lock().expect("cache lock").get(token) {
            if at.elapsed() < CACHE_TTL {
                return Ok(caller.clone());
            }
        }
        let caller = self.review(token).await?;
        let mut cache = self.cache.lock().expect("cache lock");
        if cache.len() >= CACHE_MAX {
            cache.retain(|_, (_, at)| at.elapsed() < CACHE_TTL);
        }
        cache.insert(token.to_string(), (caller.clone(), Instant::now()));
        Ok(caller)
    }

    async fn review(&self, token: &str) -> Result<Caller, Status> {
        let review = TokenReview {
            spec: TokenReviewSpec { token: Some(token.to_string()), audiences: Some(vec![AUDIENCE.to_string()]) },
            ..Default::default()
        };
        let answer = Api::<TokenReview>::all(self.client.clone())
            .create(&PostParams::default(), &review)
            .await
            .map_err(|e| Status::unavailable(format!("cannot check the token with a TokenReview: {e}")))?;
        let status = answer.status.unwrap_or_default();
        if status.authenticated != Some(true) {
            let why = status.error.unwrap_or_else(|| "not authenticated".into());
            return Err(Status::unauthenticated(format!("the Kubernetes API rejected the token: {why}")));
        }
        let user = status.user.unwrap_or_default();
        let username = user.username.unwrap_or_default();
        let Some((namespace, service_account)) =
            username.strip_prefix("system:serviceaccount:").and_then(|rest| rest.split_once(':'))
        else {
            return Err(Status::permission_denied(format!(
                "the token belongs to {username}, which is not a service account"
            )));
        };
        let extra = user.extra.unwrap_or_default();
        let first = |key: &str| extra.get(key).and_then(|v| v.first()).filter(|v| !v.is_empty()).cloned();
        let node = match first(NODE_NAME) {
            Some(node) => node,
            None => self.node_of_pod(namespace, first(POD_NAME), first(POD_UID)).await?,
        };
        Ok(if (namespace, service_account) == (self.namespace.as_str(), self.service_account.as_str()) {
            Caller::Agent { node }
        } else {
            Caller::Workload { node, namespace: namespace.into(), service_account: service_account.into() }
        })
    }

    /// The node of the pod a token was issued for, by the pod's name and UID.
    async fn node_of_pod(&self, namespace: &str, name: Option<String>, uid: Option<String>) -> Result<String, Status> {
        let (Some(pod_name), Some(pod_uid)) = (name, uid) else {
            return Err(Status::permission_denied(
                "the token is not bound to a pod: mount a projected service account token (audience ferrymesh) into the pod",
            ));
        };
        let pod = Api::<Pod>::namespaced(self.client.clone(), namespace)
            .get_opt(&pod_name)
            .await
            .map_err(|e| Status::unavailable(format!("cannot read the token's pod {namespace}/{pod_name}: {e}")))?;
        let pod = pod.filter(|p| p.metadata.uid.as_deref() == Some(pod_uid.as_str())).ok_or_else(|| {
            Status::permission_denied(format!("the token's pod {namespace}/{pod_name} no longer exists"))
        })?;
        pod.spec.and_then(|s| s.node_name).filter(|n| !n.is_empty()).ok_or_else(|| {
            Status::permission_denied(format!("the token's pod {namespace}/{pod_name} is not scheduled"))
        })
    }
}
