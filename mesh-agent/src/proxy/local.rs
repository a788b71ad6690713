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
use tokio::net::TcpStream;

use super::authz::InboundRequest;
use super::{relay, Admitted, Connection, Outcome, PodContext, ProxyContext};
use crate::error::ProxyError;
use crate::flows::{Direction, Endpoint};

/// A connection admitted by the destination, ready to carry bytes.
pub(super) struct Handover<'a> {
    admitted: Admitted<'a>,
    /// The destination's view of the connection (its inbound flow).
    inbound: Connection,
}

/// Admits `src` -> `dst`:`target` as `dst`'s HBONE server would an mTLS peer with `src`'s
/// identity (see [`ProxyContext::admit`]), dialling the app as `src`'s IP. `client` is the
/// connection's source as the outbound flow names it: `src`'s address of the destination's
/// family and the client's port. A refusal is recorded as `dst`'s inbound flow from `client`
/// (no dial to the app made a port of its own), and returned for the source's flow.
pub(super) async fn open<'a>(
    ctx: &'a ProxyContext,
    src: &PodContext,
    dst: &Arc<PodContext>,
    target: SocketAddr,
    client: SocketAddr,
) -> Result<Handover<'a>, ProxyError> {
    let src_identity = src.identity.spiffe_id(&ctx.identities.trust_domain());
    let src_identity: Arc<str> = src_identity
        .map_err(|error| ProxyError::NoIdentity { workload: src.identity.to_string(), error })?
        .as_str()
        .into();
    let source_ip = client.ip();
    let mut client = Endpoint::lookup(&ctx.state, client);
    client.identity = Some(src_identity.clone());
    let mut inbound = Connection::new(Direction::Inbound, client, dst.endpoint(target, &ctx.identities));
    inbound.transport = Transport::NodeLocal;
    let request = InboundRequest {
        source_ip,
        source_identity: Some(src_identity),
        destination: target,
        transport: Transport::NodeLocal,
    };
    match ctx.admit(dst, request).await {
        Ok(admitted) => {
            // The client port the app sees is the one the agent's dial got.
            if let Ok(local) = admitted.app.local_addr() {
                inbound.src.addr = local;
            }
            Ok(Handover { admitted, inbound })
        }
        Err(refused) => {
            let error = refused.error(target);
            ctx.record(inbound, Outcome::failed(error.clone()));
            Err(error)
        }
    }
}

impl Handover<'_> {
    /// Relays `client` and the app until the connection ends, records the destination's flow,
    /// and returns how it ended (for the source's flow, which names the same policy).
    pub(super) async fn carry(self, ctx: &ProxyContext, client: TcpStream) -> Outcome {
        let Admitted { app, policy, close, _live } = self.admitted;
        let (sent, received, end) = relay(client, app, Some(close)).await;
        let outcome = Outcome::relayed(sent, received, end, policy);
        ctx.record(self.inbound, outcome.clone());
        outcome
    }
}
