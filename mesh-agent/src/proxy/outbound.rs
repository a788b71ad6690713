//! Outbound: connections of an enrolled pod captured by connect4/6 and accepted on the pod's
//! `127.0.0.1:15001`; the original destination comes from the eBPF map, the upstream is
//! dialled from the pod's netns (so the source IP stays the pod's) with the agent's mark.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;

use mesh_common::MARK_AGENT;
use tokio::net::{TcpListener, TcpStream};

use super::{accept_loop, hbone, relay, reset, Connection, Outcome, PodContext, ProxyContext};
use crate::flows::{Direction, Endpoint, UNKNOWN_ADDR};
use crate::identity::Identity;

/// Serves the pod's outbound listener until the task is aborted.
pub async fn serve(listener: TcpListener, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    accept_loop(listener, "outbound", move |stream, peer| handle(stream, peer, pod.clone(), ctx.clone())).await
}

async fn handle(client: TcpStream, peer: SocketAddr, pod: Arc<PodContext>, ctx: Arc<ProxyContext>) {
    let unknown = Endpoint { addr: UNKNOWN_ADDR, workload: None, identity: None };
    let mut conn = Connection::new(Direction::Outbound, pod.endpoint(peer.port(), &ctx.identities), unknown);
    let orig = ctx.datapath.lock().expect("datapath lock").take_orig_dst(pod.cookie, peer.port());
    let Some(orig) = orig else {
        reset(&client);
        let reason = "original destination unknown: the connection reached 15001 without being captured".into();
        return ctx.record(conn, Outcome::failed(reason));
    };
    let dst = SocketAddr::new(Ipv4Addr::from(u32::from_be(orig.ip4)).into(), orig.port);
    conn.dst = Endpoint::lookup(&ctx.state, dst);
    let _ = client.set_nodelay(true);
    // A destination whose own agent captures it is meshed: HBONE to its 15008, expecting its
    // identity. Anything else is passed through as plain TCP.
    let meshed = ctx.state.workload_by_ip(dst.ip()).filter(|w| w.captured && ctx.identities.enabled());
    let outcome = if let Some(workload) = meshed {
        let dst_id =
            Identity { namespace: workload.namespace.clone(), service_account: workload.service_account.clone() }
                .spiffe_id(&ctx.identities.trust_domain());
        conn.dst.identity = Some(dst_id.clone());
        conn.mtls = true;
        hbone::outbound(client, &pod, &ctx, dst, &dst_id).await
    } else {
        conn.src.identity = None;
        match ctx.dial(&pod.netns, dst, MARK_AGENT, None).await {
            Ok(upstream) => {
                let (sent, received, end) = relay(client, upstream, None).await;
                Outcome::relayed(sent, received, end, String::new())
            }
            Err(e) => {
                reset(&client);
                Outcome::failed(format!("connect to {dst} failed: {e}"))
            }
        }
    };
    ctx.record(conn, outcome);
}
