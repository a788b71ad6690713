//! Inbound authorization at the destination: PeerAuthentication and AuthorizationPolicy,
//! decided by `ferrymesh-policy` (the same code `meshctl explain` shows), and the registry
//! of live inbound connections that a policy change re-evaluates, closing the ones now denied.

use ferrymesh_spiffe::SpiffeId;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ferrymesh_policy::{PolicySet, Request, Transport};
use tokio::sync::oneshot;

use crate::error::Denied;
use crate::state::{State, Workload};

/// What a destination knows about an inbound connection.
#[derive(Debug, Clone)]
pub struct InboundRequest {
    /// Client IP.
    pub source_ip: IpAddr,
    /// Client SPIFFE ID proven by mTLS.
    pub source_identity: Option<Arc<str>>,
    /// Original destination.
    pub destination: SocketAddr,
    /// How it arrived (STRICT refuses plaintext).
    pub transport: Transport,
}

/// Decides `request` to `workload` under `policies`: the deciding ALLOW policy (empty when no
/// policy applies), or why it is denied.
pub fn check(policies: &PolicySet, workload: &Workload, request: &InboundRequest) -> Result<String, Denied> {
    let w = ferrymesh_policy::Workload { namespace: &workload.namespace, labels: &workload.labels };
    let source: Option<SpiffeId> = request.source_identity.as_deref().and_then(|id| id.parse().ok());
    let r = Request {
        source_ip: request.source_ip,
        source: source.as_ref(),
        destination_ip: request.destination.ip(),
        destination_port: request.destination.port(),
    };
    let verdict = policies.decide(&w, &r, request.transport);
    if verdict.allowed {
        Ok(verdict.policy)
    } else {
        Err(Denied { reason: verdict.reason, policy: verdict.policy, hint: verdict.hint })
    }
}

struct Live {
    /// The destination as enrolled; decisions use its current labels from the state store.
    workload: Arc<Workload>,
    request: InboundRequest,
    close: oneshot::Sender<Denied>,
}

/// The destination workload as it is now (labels may have changed since enrollment).
pub fn current(state: &State, enrolled: &Arc<Workload>) -> Arc<Workload> {
    state.workload(&enrolled.uid).unwrap_or_else(|| enrolled.clone())
}

/// Live inbound connections, for re-evaluation when policies change.
#[derive(Default)]
pub struct LiveConnections {
    next: AtomicU64,
    conns: Mutex<HashMap<u64, Live>>,
}

impl std::fmt::Debug for LiveConnections {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LiveConnections").field("live", &self.conns.lock().map(|c| c.len()).unwrap_or(0)).finish()
    }
}

/// Removes a connection from the registry when it ends.
pub struct LiveGuard<'a> {
    registry: &'a LiveConnections,
    id: u64,
}

impl Drop for LiveGuard<'_> {
    fn drop(&mut self) {
        self.registry.conns.lock().expect("live lock").remove(&self.id);
    }
}

impl LiveConnections {
    /// Registers a connection; the receiver fires if a policy change denies it.
    pub fn register(
        &self,
        workload: Arc<Workload>,
        request: InboundRequest,
    ) -> (LiveGuard<'_>, oneshot::Receiver<Denied>) {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (close, closed) = oneshot::channel();
        self.conns.lock().expect("live lock").insert(id, Live { workload, request, close });
        (LiveGuard { registry: self, id }, closed)
    }

    /// Closes every live connection `policies` now deny; returns how many.
    pub fn reevaluate(&self, policies: &PolicySet, state: &State) -> usize {
        let mut conns = self.conns.lock().expect("live lock");
        let denied: Vec<(u64, Denied)> = conns
            .iter()
            .filter_map(|(id, l)| check(policies, &current(state, &l.workload), &l.request).err().map(|d| (*id, d)))
            .collect();
        for (id, denied) in &denied {
            if let Some(live) = conns.remove(id) {
                let _ = live.close.send(denied.clone());
            }
        }
        denied.len()
    }
}
