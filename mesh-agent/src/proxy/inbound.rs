//! Inbound plaintext: connections to an enrolled pod steered by sk_lookup to the pod's 15006
//! listener. The original destination is the accepted socket's local address. The agent
//! dials the app from inside the pod with the client's IP as source (IP_TRANSPARENT) and
//! `MARK_APP_DIAL`, so the app sees the real client; the pod's policy route brings the app's
//! replies back to the agent.

use std::net::SocketAddr;
use std::sync::Arc;

use ferrymesh_policy::Transport;
use mesh_common::RESERVED_PORTS;
use tokio::net::{TcpListener, TcpStream};

use super::authz::InboundRequest;
use super::{accept_loop, relay, reset, Connection, Outcome, PodContext, ProxyContext};
use crate::error::ProxyError;
use crate::flows::{Direction, Endpoint};

/// Serves the pod's inbound plaintext listener until the task is aborted.
pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    accept_loop(listener, "inbound", ctx.drain.clone(), move |stream, peer| {
        handle(stream, peer, pod.clone(), ctx.clone())
    })
    .await
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    let dst = client.local_addr().unwrap_or_else(|_| SocketAddr::new(pod.workload.ip, 0));
    let conn =
        Connection::new(Direction::Inbound, Endpoint::lookup(&ctx.state, peer), pod.endpoint(dst, &ctx.identities));
    if RESERVED_PORTS.contains(&dst.port()) {
        reset(&client);
        return ctx.record(conn, Outcome::failed(ProxyError::ReservedPort(dst.port())));
    }
    let _held = match ctx.load.connection(&ctx.limits, peer.ip(), pod.workload.ip) {
        Ok(held) => held,
        Err(refusal) => {
            refusal.limit().count();
            reset(&client);
            return ctx.record(conn, Outcome::failed(ProxyError::Limited(refusal)));
        }
    };
    let _ = client.set_nodelay(true);
    let request = InboundRequest {
        source_ip: peer.ip(),
        source_identity: None,
        destination: dst,
        transport: Transport::Plaintext,
    };
    // Boxed: the dial's state would otherwise stay in the task for its whole life.
    let outcome = match Box::pin(ctx.admit(&pod, request)).await {
        Ok(admitted) => {
            let (sent, received, end) = relay(client, admitted.app, Some(admitted.close)).await;
            Outcome::relayed(sent, received, end, admitted.policy)
        }
        Err(refused) => {
            reset(&client);
            Outcome::failed(refused.error(dst))
        }
    };
    ctx.record(conn, outcome);
}
