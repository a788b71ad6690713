//! Everything the eBPF programs and the agent must agree on: ports, socket marks, map names,
//! `#[repr(C)]` map keys and values, and the counter table.
//!
//! This crate is `no_std` and holds no logic; it must never grow a second copy of a layout
//! that lives elsewhere. The `user` feature implements `aya::Pod` for userspace.
#![no_std]
#![deny(unsafe_code)]

/// Agent listener inside each enrolled pod netns that receives captured outbound connections.
pub const OUTBOUND_PORT: u16 = 15001;
/// Agent listener inside each enrolled pod netns that receives steered plaintext inbound.
pub const INBOUND_PLAINTEXT_PORT: u16 = 15006;
/// HBONE (mTLS tunnel) port of every enrolled pod.
pub const HBONE_PORT: u16 = 15008;

/// Ports the agent owns inside a pod; never captured, never steered, never proxied to.
pub const RESERVED_PORTS: [u16; 3] = [OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, HBONE_PORT];

/// SO_MARK on every socket the agent dials with; `connect4/6` leave such sockets alone.
pub const MARK_AGENT: u32 = 0x539;
/// SO_MARK on the agent's transparent dials to an application inside its own pod. A policy
/// route in the pod netns (`fwmark MARK_APP_DIAL lookup ROUTE_TABLE_APP_DIAL`) sends the app's
/// replies back to the agent over `lo`.
pub const MARK_APP_DIAL: u32 = 0x53a;
/// Routing table in each enrolled pod netns holding `local default dev lo`.
pub const ROUTE_TABLE_APP_DIAL: u32 = 0x53a;

/// `lo` has this ifindex in every network namespace.
pub const LOOPBACK_IFINDEX: u32 = 1;

/// 127.0.0.1 in host byte order.
pub const LOCALHOST_V4: u32 = 0x7f00_0001;
/// `::1` as IPv6 words in network byte order, as the kernel holds `user_ip6`.
pub const LOCALHOST_V6_WORDS: [u32; 4] = [0, 0, 0, u32::from_be(1)];

/// Address families as the kernel numbers them.
pub const AF_INET: u16 = 2;
/// IPv6 address family.
pub const AF_INET6: u16 = 10;

/// Names of the maps in the eBPF object, used by the agent to find them.
pub mod map_names {
    /// `HashMap<u64 netns cookie, u32 capture share>`: the network namespaces whose sockets are
    /// captured, each with the most captured sockets it may have at once (its share of the
    /// ORIG maps).
    pub const ENROLLED: &str = "ENROLLED";
    /// `HashMap<u64 netns cookie, u64 captures>`: how many captured sockets each enrolled netns
    /// has now (entries of ORIG_BY_COOKIE), kept by the programs; the agent removes a netns's
    /// entry when it releases the netns.
    pub const CAPTURES: &str = "CAPTURES";
    /// `HashMap<u64 socket cookie, OrigDst>`: original destination of a captured socket, from its
    /// connect() until it is closed (or released without ever connecting). Not an LRU: an entry
    /// is never pushed out by others, and each is counted in CAPTURES.
    pub const ORIG_BY_COOKIE: &str = "ORIG_BY_COOKIE";
    /// `LruHashMap<PortKey, OrigDst>`: original destination keyed the way the agent sees it.
    pub const ORIG_BY_PORT: &str = "ORIG_BY_PORT";
    /// `SockHash<[u32; 4] pod IP (see [`super::ip_words`])>`: the agent's 15006 listener of
    /// each pod address.
    pub const INBOUND_LISTENERS: &str = "INBOUND_LISTENERS";
    /// `LruHashMap<AppDialKey, u8>`: the agent's own dials to apps, which sk_lookup must not
    /// steer back to the agent.
    pub const APP_DIALS: &str = "APP_DIALS";
    /// `LruHashMap<u64 socket cookie, u8>`: the agent's own sockets about to connect from a pod's
    /// netns, which connect4/6 let through (and forget). A pod can set the agent's socket mark
    /// (CAP_NET_RAW suffices); it cannot put its socket in this map.
    pub const AGENT_DIALS: &str = "AGENT_DIALS";
    /// `PerCpuArray<u64>` indexed by [`super::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
}

/// Capacity of the maps (entries). LRU maps evict the oldest entry when full.
pub mod map_sizes {
    /// Enrolled network namespaces per node.
    pub const ENROLLED: u32 = 4096;
    /// Captured sockets whose original destination is remembered, on the whole node.
    pub const ORIG: u32 = 65536;
    /// Enrolled network namespaces whose captures are counted (as many as can be enrolled).
    pub const CAPTURES: u32 = ENROLLED;
    /// Inbound listeners (one per enrolled pod).
    pub const INBOUND_LISTENERS: u32 = 4096;
    /// App dials in progress (entries live from bind to connect).
    pub const APP_DIALS: u32 = 16384;
    /// The agent's dials in progress (entries live from socket creation to connect).
    pub const AGENT_DIALS: u32 = 16384;
}

/// Original destination of a captured connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OrigDst {
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u16,
    /// Destination port, host byte order.
    pub port: u16,
    /// IPv4 address exactly as the kernel holds it (network byte order).
    pub ip4: u32,
    /// IPv6 address words exactly as the kernel holds them (network byte order).
    pub ip6: [u32; 4],
}

/// Key under which `sockops` files a captured connection once its source port is known:
/// the agent accepts it as `127.0.0.1:<port>` (`[::1]:<port>` for a native IPv6 destination)
/// inside the pod netns with this cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PortKey {
    /// Network namespace cookie of the client socket.
    pub netns_cookie: u64,
    /// Client's local port, host byte order.
    pub port: u32,
    /// Family of the original destination ([`OrigDst::family`]), which is the family the
    /// agent accepts the connection on: the IPv4 and IPv6 loopback port spaces are separate.
    pub family: u32,
}

/// A connection the agent is dialling to an app inside its own pod, as sk_lookup sees its SYN.
/// The kernel reports the pod's eth0, not `lo`, as ingress device of such a locally generated
/// packet to the pod IP, so the 4-tuple is what tells it apart from a client's SYN.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AppDialKey {
    /// Client IP the agent binds to, as [`ip_words`].
    pub client_ip: [u32; 4],
    /// Pod IP, as [`ip_words`].
    pub pod_ip: [u32; 4],
    /// Source port the agent's socket got (host byte order).
    pub client_port: u32,
    /// App port (host byte order).
    pub app_port: u32,
}

/// An IPv4 address (network byte order, as the kernel holds it) as the IPv4-mapped IPv6 words
/// map keys use for either family.
#[inline(always)]
pub const fn v4_mapped_words(ip4: u32) -> [u32; 4] {
    [0, 0, u32::from_be(0xffff), ip4]
}

/// An address as map keys hold it: IPv6 words in network byte order (the kernel's
/// `user_ip6`/`local_ip6`), an IPv4 address IPv4-mapped.
pub fn ip_words(ip: core::net::IpAddr) -> [u32; 4] {
    let octets = match ip {
        core::net::IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        core::net::IpAddr::V6(v6) => v6.octets(),
    };
    let word = |i: usize| u32::from_ne_bytes([octets[i], octets[i + 1], octets[i + 2], octets[i + 3]]);
    [word(0), word(4), word(8), word(12)]
}

/// The IPv6 address of words as map keys and [`OrigDst::ip6`] hold them (the inverse of
/// [`ip_words`] for an IPv6 address).
pub fn ipv6_from_words(words: [u32; 4]) -> core::net::Ipv6Addr {
    let mut octets = [0u8; 16];
    for (i, word) in words.iter().enumerate() {
        octets[i * 4..i * 4 + 4].copy_from_slice(&word.to_ne_bytes());
    }
    core::net::Ipv6Addr::from(octets)
}

/// Counters kept by the eBPF programs, one slot each in the `COUNTERS` per-CPU array.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum Counter {
    /// connect() of an enrolled pod rewritten to the outbound listener.
    Captured = 0,
    /// connect() in an enrolled netns left alone (agent socket, loopback, not TCP).
    Bypassed = 1,
    /// Original destination moved from socket cookie to (netns, port) by sockops.
    OrigFiled = 2,
    /// getpeername() answered with the original destination.
    PeerRestored = 3,
    /// Inbound SYN steered by sk_lookup to the agent's 15006 listener.
    InboundSteered = 4,
    /// A map update failed inside a program (map full or similar).
    MapErrors = 5,
    /// connect() of an enrolled pod refused rather than let through unencrypted: its original
    /// destination could not be remembered (the map update failed).
    OutboundRefused = 6,
    /// Inbound SYN to an enrolled pod refused by sk_lookup: no agent listener to steer it to
    /// (the agent is down) or an address family not carried yet.
    InboundRefused = 7,
    /// connect() of an enrolled pod refused (EPERM) because the pod already has its share of
    /// captured sockets open (the agent's `--max-outbound-connections-per-pod`).
    ShareRefused = 8,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; 9] = [
        Counter::Captured,
        Counter::Bypassed,
        Counter::OrigFiled,
        Counter::PeerRestored,
        Counter::InboundSteered,
        Counter::MapErrors,
        Counter::OutboundRefused,
        Counter::InboundRefused,
        Counter::ShareRefused,
    ];
    /// Number of slots in the `COUNTERS` map.
    pub const SLOTS: u32 = Self::ALL.len() as u32;

    /// Stable snake_case name, used for metrics and `meshctl status`.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Captured => "captured",
            Counter::Bypassed => "bypassed",
            Counter::OrigFiled => "orig_filed",
            Counter::PeerRestored => "peer_restored",
            Counter::InboundSteered => "inbound_steered",
            Counter::MapErrors => "map_errors",
            Counter::OutboundRefused => "outbound_refused",
            Counter::InboundRefused => "inbound_refused",
            Counter::ShareRefused => "share_refused",
        }
    }
}

#[cfg(feature = "user")]
#[expect(unsafe_code, reason = "aya::Pod is an unsafe marker trait")]
mod user {
    // SAFETY: both types are repr(C), Copy, contain only integers and have explicit padding
    // fields, so every byte pattern is a valid value and no byte is uninitialised.
    unsafe impl aya::Pod for super::OrigDst {}
    // SAFETY: as above.
    unsafe impl aya::Pod for super::PortKey {}
    // SAFETY: as above (four u32, no padding).
    unsafe impl aya::Pod for super::AppDialKey {}
}
