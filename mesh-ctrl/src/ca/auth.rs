//! Node authorization for the CA: who a request's bearer token says the caller is (an agent by
//! a bootstrap node token in local mode, by its ServiceAccount token checked with TokenReview in
//! Kubernetes, where a workload such as a waypoint may also present its own token), and the
//! per-source limit on failed authentications: past [`MAX_AUTH_FAILURES`]
//! in [`AUTH_FAILURE_WINDOW`] a source is refused without its token being looked at.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use tonic::{Request, Status};

use super::token_review::TokenReviewer;

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
        Self::new(map).map_err(|e| format!("--node-tokens {}: {e}", path.display()))
    }

    /// The tokens of `(node, token)` pairs: each at least 16 characters, no two alike.
    pub fn new(pairs: impl IntoIterator<Item = (String, String)>) -> Result<Self, String> {
        let mut node_by_token = HashMap::new();
        for (node, token) in pairs {
            if token.len() < 16 {
                return Err(format!("the token of node {node} is shorter than 16 characters"));
            }
            if let Some(other) = node_by_token.insert(token, node.clone()) {
                return Err(format!("nodes {node} and {other} share a token"));
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

/// Who a certificate request comes from, as its token proves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Caller {
    /// A node's agent: it may obtain the identity of any pod on its node.
    Agent {
        /// The node.
        node: String,
    },
    /// A workload with its own ServiceAccount token (a waypoint in Kubernetes): its own identity
    /// only, and only while a pod of that identity runs on its node.
    Workload {
        /// The node of the pod the token was issued for.
        node: String,
        /// The token's ServiceAccount: namespace and name.
        namespace: String,
        /// The token's ServiceAccount name.
        service_account: String,
    },
}

impl Caller {
    /// The node the caller runs on.
    pub fn node(&self) -> &str {
        match self {
            Caller::Agent { node } | Caller::Workload { node, .. } => node,
        }
    }
}

/// How callers prove which node they run on.
#[derive(Debug)]
pub enum NodeAuth {
    /// Bootstrap tokens (local mode).
    Tokens(NodeTokens),
    /// Projected ServiceAccount tokens checked with TokenReview (Kubernetes).
    TokenReview(TokenReviewer),
}

impl NodeAuth {
    /// Who a request's `authorization: Bearer <token>` proves the caller is.
    pub(crate) async fn caller<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let header = request.metadata().get("authorization").and_then(|v| v.to_str().ok());
        let token = header.and_then(|h| h.strip_prefix("Bearer ")).filter(|t| !t.is_empty()).ok_or_else(|| {
            Status::unauthenticated(
                "no token: start the agent with --token-file (its node's bootstrap token, or its projected service account token)",
            )
        })?;
        match self {
            Self::Tokens(tokens) => tokens.node(token).map(|node| Caller::Agent { node }),
            Self::TokenReview(reviewer) => reviewer.caller(token).await,
        }
    }
}

/// Authenticates the callers of 15012's services (the CA and the config stream alike): the
/// per-source throttle first, then the token; every refusal is logged with its source (up to the
/// throttle) and counted in `ferrymesh_ctrl_auth_failures_total`, every throttled request in
/// `ferrymesh_ctrl_auth_throttled_total`.
#[derive(Debug)]
pub struct Authenticator {
    auth: NodeAuth,
    failures: AuthFailures,
}

impl Authenticator {
    /// Authenticates with `auth`.
    pub fn new(auth: NodeAuth) -> Self {
        Self { auth, failures: AuthFailures::default() }
    }

    /// Who `request`'s bearer token proves the caller is.
    pub async fn authenticate<T>(&self, request: &Request<T>) -> Result<Caller, Status> {
        let source = request.remote_addr().map(|a| a.ip()).unwrap_or(IpAddr::from([0, 0, 0, 0]));
        if let Err(retry) = self.failures.check(source) {
            metrics::counter!("ferrymesh_ctrl_auth_throttled_total").increment(1);
            return Err(Status::resource_exhausted(format!(
                "too many failed authentications from {source} ({MAX_AUTH_FAILURES} in {}s); try again in {}s",
                AUTH_FAILURE_WINDOW.as_secs(),
                retry.as_secs() + 1
            )));
        }
        match self.auth.caller(request).await {
            Ok(caller) => Ok(caller),
            Err(refused) => {
                let failures = self.failures.failed(source);
                metrics::counter!("ferrymesh_ctrl_auth_failures_total").increment(1);
                // Logged up to the limit; past it the throttle answers, and is counted.
                if failures <= MAX_AUTH_FAILURES {
                    tracing::warn!(%source, failures, "refused an authentication: {}", refused.message());
                }
                Err(refused)
            }
        }
    }
}

/// Failed authentications a source may make within [`AUTH_FAILURE_WINDOW`].
pub const MAX_AUTH_FAILURES: u32 = 10;
/// The window failed authentications are counted in.
pub const AUTH_FAILURE_WINDOW: Duration = Duration::from_secs(60);

/// Failed authentications per source address, in windows of [`AUTH_FAILURE_WINDOW`].
#[derive(Debug, Default)]
pub(crate) struct AuthFailures {
    by_source: Mutex<HashMap<IpAddr, (Instant, u32)>>,
}

impl AuthFailures {
    /// Refuses `source` (with how long until it may try again) once it has failed
    /// [`MAX_AUTH_FAILURES`] times in the current window.
    pub(crate) fn check(&self, source: IpAddr) -> Result<(), Duration> {
        let mut by_source = self.by_source.lock().expect("auth failures lock");
        let now = Instant::now();
        by_source.retain(|_, (start, _)| now.duration_since(*start) < AUTH_FAILURE_WINDOW);
        match by_source.get(&source) {
            Some((start, n)) if *n >= MAX_AUTH_FAILURES => Err(AUTH_FAILURE_WINDOW - now.duration_since(*start)),
            _ => Ok(()),
        }
    }

    /// Counts a failure of `source`; returns its failures in the current window.
    pub(crate) fn failed(&self, source: IpAddr) -> u32 {
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
