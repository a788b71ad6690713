//! What the agent sets up inside a pod's network namespace, run on the netns thread: the
//! 15001/15006/15008 listeners of each address family the pod has, `tcp_fwmark_accept`, and the
//! policy routes that return the app's replies to the agent's transparent dials. Everything here
//! is idempotent.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener};
use std::path::Path;

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

/// The agent's listeners of one address family inside a pod.
#[derive(Debug)]
pub struct Listeners {
    /// `127.0.0.1:15001` (`[::1]:15001`), target of captured outbound connections.
    pub outbound: TcpListener,
    /// `127.0.0.1:15006` (`[::1]:15006`), target of sk_lookup for inbound plaintext.
    pub inbound: TcpListener,
    /// `0.0.0.0:15008` (`[::]:15008`, IPv6 only), HBONE.
    pub hbone: TcpListener,
}

impl Listeners {
    /// Listens on the three ports of the IPv4 (`v6` false) or IPv6 family.
    fn open(v6: bool) -> io::Result<Self> {
        let (loopback, any): (IpAddr, IpAddr) = match v6 {
            false => (Ipv4Addr::LOCALHOST.into(), Ipv4Addr::UNSPECIFIED.into()),
            true => (Ipv6Addr::LOCALHOST.into(), Ipv6Addr::UNSPECIFIED.into()),
        };
        Ok(Self {
            outbound: listen(loopback, OUTBOUND_PORT)?,
            inbound: listen(loopback, INBOUND_PLAINTEXT_PORT)?,
            hbone: listen(any, HBONE_PORT)?,
        })
    }

    /// The three, in the order they are handed over: 15001, 15006, 15008.
    pub fn each(&self) -> [&TcpListener; 3] {
        [&self.outbound, &self.inbound, &self.hbone]
    }
}

/// Listeners the agent owns inside one pod, and the pod's netns cookie.
#[derive(Debug)]
pub struct PodListeners {
    /// The IPv4 listeners (every pod has them: loopback is always there).
    pub v4: Listeners,
    /// The IPv6 listeners, when the pod has an IPv6 address.
    pub v6: Option<Listeners>,
    /// Cookie of the pod's netns.
    pub cookie: u64,
}

impl PodListeners {
    /// Every listener, IPv4 then IPv6, each in [`Listeners::each`] order.
    pub fn each(&self) -> impl Iterator<Item = &TcpListener> {
        self.v4.each().into_iter().chain(self.v6.iter().flat_map(Listeners::each))
    }
}

fn listen(ip: IpAddr, port: u16) -> io::Result<TcpListener> {
    let addr = SocketAddr::new(ip, port);
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if ip.is_ipv6() {
        // [::]:15008 takes IPv6 only: IPv4 has its own listener, so no address is ever mapped.
        socket.set_only_v6(true)?;
    }
    socket.set_reuse_address(true)?;
    socket
        .bind(&addr.into())
        .map_err(|e| io::Error::new(e.kind(), format!("cannot bind {addr} in the pod (is the port in use?): {e}")))?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Sets up the current netns (call on the netns thread, inside the pod's netns), with the IPv6
/// listeners and route when `v6` (the pod has an IPv6 address); `sysctl` is where /proc/sys/net
/// is mounted writable.
pub fn setup(v6: bool, sysctl: &Path) -> io::Result<PodListeners> {
    let v4 = Listeners::open(false)?;
    let v6 = v6.then(|| Listeners::open(true)).transpose()?;
    let cookie = netns_cookie(&v4.outbound)?;
    prepare(v6.is_some(), sysctl)?;
    Ok(PodListeners { v4, v6, cookie })
}

/// Sets up the current netns around listeners the agent before this one created and handed
/// over, checking they belong to it (call on the netns thread, inside the pod's netns). The
/// IPv6 listeners are opened when `v6` and none were handed over, closed when not `v6`.
pub fn adopt(mut handed: PodListeners, v6: bool, sysctl: &Path) -> io::Result<PodListeners> {
    let here = netns_cookie(&std::net::UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))?)?;
    for listener in handed.each() {
        if netns_cookie(listener)? != here || handed.cookie != here {
            return Err(io::Error::other(format!(
                "the listeners handed over for netns cookie {} are not in the pod's netns ({here})",
                handed.cookie
            )));
        }
        listener.set_nonblocking(true)?;
    }
    match (v6, handed.v6.is_some()) {
        (true, false) => handed.v6 = Some(Listeners::open(true)?),
        (false, true) => handed.v6 = None,
        _ => {}
    }
    prepare(v6, sysctl)?;
    Ok(handed)
}

/// The sysctls (under `sysctl`, a mount of /proc/sys/net) and the policy routes of the current
/// netns (IPv6's too when `v6`).
fn prepare(v6: bool, sysctl: &Path) -> io::Result<()> {
    // /proc/sys/net follows the calling thread's netns, through any mount of it (an
    // unprivileged agent's own /proc/sys is read-only: it writes through the host's, mounted
    // writable, as Cilium does). fwmark_accept (for both families): the
    // app's accepted socket carries the mark of the agent's SYN, so its replies take the
    // policy route back. fwmark_reflect: so do kernel replies without a socket, such as the
    // RST for a closed app port; without it that RST leaves through eth0 and the agent's dial
    // hangs until timeout.
    let mut names = vec!["ipv4/tcp_fwmark_accept", "ipv4/fwmark_reflect"];
    if v6 {
        names.push("ipv6/fwmark_reflect");
    }
    for name in names {
        let path = sysctl.join(name);
        std::fs::write(&path, "1").map_err(|e| {
            let what = name.replace('/', ".");
            io::Error::new(e.kind(), format!("cannot set net.{what} in the pod ({}): {e}", path.display()))
        })?;
    }
    install_app_dial_routes(v6)
}

fn ignore_exists(result: Result<(), rtnetlink::Error>, what: &str) -> io::Result<()> {
    match result {
        Ok(()) => Ok(()),
        Err(rtnetlink::Error::NetlinkError(e)) if e.raw_code() == -libc::EEXIST => Ok(()),
        Err(e) => Err(io::Error::other(format!("cannot add {what} in the pod: {e}"))),
    }
}

/// `ip rule add fwmark MARK_APP_DIAL lookup ROUTE_TABLE_APP_DIAL` and
/// `ip route add local default dev lo table ROUTE_TABLE_APP_DIAL`, over netlink, for IPv4 and,
/// when `v6`, IPv6.
fn install_app_dial_routes(v6: bool) -> io::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread().enable_io().build()?;
    runtime.block_on(async {
        // The netlink socket is created here, so it belongs to the pod's netns.
        let (connection, handle, _) = rtnetlink::new_connection()?;
        tokio::spawn(connection);
        let rule = handle.rule().add().v4().fw_mark(MARK_APP_DIAL).table_id(ROUTE_TABLE_APP_DIAL);
        let rule = rule.priority(RULE_PRIORITY).action(RuleAction::ToTable).execute().await;
        ignore_exists(rule, "the fwmark rule")?;
        let route = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(Ipv4Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .output_interface(LOOPBACK_IFINDEX)
            .table_id(ROUTE_TABLE_APP_DIAL)
            .build();
        ignore_exists(handle.route().add(route).execute().await, "the local route")?;
        if !v6 {
            return Ok(());
        }
        let rule = handle.rule().add().v6().fw_mark(MARK_APP_DIAL).table_id(ROUTE_TABLE_APP_DIAL);
        let rule = rule.priority(RULE_PRIORITY).action(RuleAction::ToTable).execute().await;
        ignore_exists(rule, "the IPv6 fwmark rule")?;
        let route = RouteMessageBuilder::<Ipv6Addr>::new()
            .destination_prefix(Ipv6Addr::UNSPECIFIED, 0)
            .kind(RouteType::Local)
            .scope(RouteScope::Host)
            .output_interface(LOOPBACK_IFINDEX)
            .table_id(ROUTE_TABLE_APP_DIAL)
            .build();
        ignore_exists(handle.route().add(route).execute().await, "the IPv6 local route")
    })
}
