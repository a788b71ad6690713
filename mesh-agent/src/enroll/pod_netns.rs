//! What the agent sets up inside a pod's network namespace, run on the netns thread: the
//! 15001/15006/15008 listeners, `tcp_fwmark_accept`, and the policy route that returns the app's
//! replies to the agent's transparent dials. Everything here is idempotent.

use std::io;
use std::net::{Ipv4Addr, SocketAddr, TcpListener};

use mesh_common::{
    HBONE_PORT, INBOUND_PLAINTEXT_PORT, LOOPBACK_IFINDEX, MARK_APP_DIAL, OUTBOUND_PORT, ROUTE_TABLE_APP_DIAL,
};
use rtnetlink::packet_route::route::{RouteScope, RouteType};
use rtnetlink::packet_route::rule::RuleAction;
use rtnetlink::RouteMessageBuilder;
use socket2::{Domain, Protocol, Socket, Type};

use crate::netns::netns_cookie;

/// Priority of the `fwmark MARK_APP_DIAL` rule: before `main` (32766), after `local` (0).
const RULE_PRIORITY: u32 = 100;
const LISTEN_BACKLOG: i32 = 1024;

/// Listeners the agent owns inside one pod, and the pod's netns cookie.
#[derive(Debug)]
pub struct PodListeners {
    /// `127.0.0.1:15001`, target of captured outbound connections.
    pub outbound: TcpListener,
    /// `127.0.0.1:15006`, target of sk_lookup for inbound plaintext.
    pub inbound: TcpListener,
    /// `0.0.0.0:15008`, HBONE.
    pub hbone: TcpListener,
    /// Cookie of the pod's netns.
    pub cookie: u64,
}

fn listen(ip: Ipv4Addr, port: u16) -> io::Result<TcpListener> {
    let addr = SocketAddr::from((ip, port));
    let socket = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr} in the pod (is the port in use?): {e}")))?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Sets up the current netns (call on the netns thread, inside the pod's netns).
pub fn setup() -> io::Result<PodListeners> {
    let outbound = listen(Ipv4Addr::LOCALHOST, OUTBOUND_PORT)?;
    let inbound = listen(Ipv4Addr::LOCALHOST, INBOUND_PLAINTEXT_PORT)?;
    let hbone = listen(Ipv4Addr::UNSPECIFIED, HBONE_PORT)?;
    let cookie = netns_cookie(&outbound)?;
    prepare()?;
    Ok(PodListeners { outbound, inbound, hbone, cookie })
}

/// Sets up the current netns around listeners the agent before this one created and handed
/// over, checking they belong to it (call on the netns thread, inside the pod's netns).
pub fn adopt(handed: PodListeners) -> io::Result<PodListeners> {
    let here = netns_cookie(&std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?)?;
    for listener in [&handed.outbound, &handed.inbound, &handed.hbone] {
        if netns_cookie(listener)? != here || handed.cookie != here {
            return Err(io::Error::other(format!(
                "the listeners handed over for netns cookie {} are not in the pod's netns ({here})",
                handed.cookie
            )));
        }
        listener.set_nonblocking(true)?;
    }
    prepare()?;
    Ok(handed)
}

/// The sysctls and the policy route of the current netns.
fn prepare() -> io::Result<()> {
    // /proc/sys/net follows the calling thread's netns. fwmark_accept: the app's accepted
    // socket carries the mark of the agent's SYN, so its replies take the policy route back.
    // fwmark_reflect: so do kernel replies without a socket, such as the RST for a closed app
    // port; without it that RST leaves through eth0 and the agent's dial hangs until timeout.
    for sysctl in ["tcp_fwmark_accept", "fwmark_reflect"] {
        std::fs::write(format!("/proc/sys/net/ipv4/{sysctl}"), "1")
            .map_err(|e| io::Error::new(e.kind(), format!("cannot set net.ipv4.{sysctl} in the pod: {e}")))?;
    }
    install_app_dial_route()
}

fn ignore_exists(result: Result<(), rtnetlink::Error>, what: &str) -> io::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        Err(e) => Err(io::Error::other(format!("cannot add {what} in the pod: {e}"))),
    }
}

/// `ip rule add fwmark MARK_APP_DIAL lookup ROUTE_TABLE_APP_DIAL` and
/// `ip route add local default dev lo table ROUTE_TABLE_APP_DIAL`, over netlink.
fn install_app_dial_route() -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    runtime.block_on(async {
        // The netlink socket is created here, so it belongs to the pod's netns.
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        let rule = handle
            .rule()
            .add()
            .v4()
            .fw_mark(MARK_APP_DIAL)
            .table_id(ROUTE_TABLE_APP_DIAL)
            .priority(RULE_PRIORITY)
            .action(RuleAction::ToTable)
            .execute()
            .await;
        ignore_exists(rule, "the fwmark rule")?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .output_interface(LOOPBACK_IFINDEX)
            .table_id(ROUTE_TABLE_APP_DIAL)
            .build();
        ignore_exists(handle.route().add(route).execute().await, "the local route")
    })
}
