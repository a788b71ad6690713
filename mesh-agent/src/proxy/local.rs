//! Node-local handover: a connection between two pods enrolled on this node never leaves the
//! node, so the agent does not tunnel it over HBONE to itself. It applies the destination's
//! checks (PeerAuthentication and AuthorizationPolicy) with the source pod's identity, which it
//! knows from enrolling that pod, dials the app from inside the destination pod with the
//! client's IP (as the HBONE server side does), and relays the two sockets in the kernel.
//!
//! The destination's inbound flow is recorded here; the source's outbound flow stays with the
//! caller. Both name the transport `node-local`: no TLS, and no packet on any network device.

use std::net::SocketAddr;
use std::sync::Arc;

use ferrymesh_policy::Transport;
use mesh_common::MARK_APP_DIAL;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use super::authz::{self, Denied, InboundRequest, LiveGuard};
use super::{relay, Connection, Outcome, PodContext, ProxyContext};
use crate::flows::{Direction, Endpoint, Verdict};

/// A connection authorized and dialled to the destination app, ready to carry bytes.
pub(super) struct Handover<'a> {
    app: TcpStream,
    /// The destination's view of the connection (its inbound flow).
    inbound: Connection,
    /// The deciding ALLOW policy, if any.
    policy: String,
    /// Fires when a policy change denies the connection.
    close: oneshot::Receiver<Denied>,
    _live: LiveGuard<'a>,
}

/// Authorizes `src` -> `dst`:`target` as `dst`'s HBONE server would for an mTLS peer with
/// `src`'s identity, then dials the app as `src`'s IP. A refusal or a failed dial is recorded
/// as `dst`'s inbound flow and returned as (verdict, reason) for the source's flow.
pub(super) async fn open<'a>(
    ctx: &'a ProxyContext,
    src: &PodContext,
    dst: &Arc<PodContext>,
    target: SocketAddr,
) -> Result<Handover<'a>, (Verdict, String)> {
    let src_identity: Arc<str> = src.identity.spiffe_id(&ctx.identities.trust_domain()).into();
    let mut client = Endpoint::lookup(&ctx.state, SocketAddr::new(src.workload.ip, 0));
    client.identity = Some(src_identity.clone());
    let mut inbound = Connection::new(Direction::Inbound, client, dst.endpoint(target.port(), &ctx.identities));
    inbound.transport = Transport::NodeLocal;
    let request = InboundRequest {
        source_ip: src.workload.ip,
        source_identity: Some(src_identity),
        destination: target,
        transport: Transport::NodeLocal,
    };
    let policy = match authz::check(&ctx.state.policies(), &authz::current(&ctx.state, &dst.workload), &request) {
        Ok(policy) => policy,
        Err(denied) => {
            let reason = denied.reason.clone();
            ctx.record(inbound, Outcome::denied(denied));
            return Err((Verdict::Denied, reason));
        }
    };
    let (live, close) = ctx.live.register(dst.workload.clone(), request);
    match ctx.dial(&dst.netns, target, MARK_APP_DIAL, Some(src.workload.ip)).await {
        Ok(app) => {
            // The client port the app sees is the one the agent's dial got.
            if let Ok(local) = app.local_addr() {
                inbound.src.addr = local;
            }
            Ok(Handover { app, inbound, policy, close, _live: live })
        }
        Err(e) => {
            let reason = format!("connect to the app at {target} failed: {e}");
            ctx.record(inbound, Outcome::failed(reason.clone()));
            Err((Verdict::Error, reason))
        }
    }
}

impl Handover<'_> {
    /// Relays `client` and the app until the connection ends, records the destination's flow,
    /// and returns how it ended (for the source's flow, which names the same policy).
    pub(super) async fn carry(self, ctx: &ProxyContext, client: TcpStream) -> Outcome {
        let (sent, received, end) = relay(client, self.app, Some(self.close)).await;
        let outcome = Outcome::relayed(sent, received, end, self.policy);
        ctx.record(self.inbound, outcome.clone());
        outcome
    }
}
