//! ferrymesh eBPF programs.
//!
//! Outbound capture: `connect4/6` (cgroup-v2 root) rewrite a TCP connect() of an enrolled pod
//! to the agent's outbound listener inside the same netns (`127.0.0.1:15001` for an IPv4 or
//! IPv4-mapped destination, `[::1]:15001` for a native IPv6 one) and remember the original
//! destination by socket cookie; `sockops` files it again under (netns cookie, client port,
//! family), the key the agent can compute on accept; `getpeername4/6` show the app its
//! original peer.
//!
//! Inbound capture: `sk_lookup`, attached to each enrolled pod netns, hands a SYN for one of
//! the pod's IPs to the agent's 15006 listener of that address (IPv4 or IPv6), except the
//! agent's own dials to the app (registered in `APP_DIALS`). A SYN it cannot hand over (no
//! agent listener: the agent is down or restarting) is refused with a reset, so a pod is never
//! reachable around the mesh.
//!
//! Every program acts only on network namespaces in `ENROLLED` (or on sockets it captured) and
//! leaves the agent's own sockets alone: marked (`SO_MARK`) and registered by cookie in
//! `AGENT_DIALS`, since a pod can set a mark. The maps are pinned by name (the agent
//! gives the directory), so they and the links outlive an agent: with no agent running the
//! programs keep enrolled pods closed. A connect() to capture whose original destination cannot
//! be remembered is refused (EPERM), never let through unencrypted.
//!
//! A captured socket's entries live from its connect() until it is gone, and one pod cannot
//! fill the node-global ORIG maps: `CAPTURES` counts each pod's captured sockets against its
//! share (the value of its `ENROLLED` entry), and a connect() past it is refused (EPERM). An
//! entry is forgotten, and uncounted, by `sockops` when its socket reaches TCP_CLOSE, or by
//! `sock_release` when the socket is closed in a state no TCP_CLOSE callback follows (its
//! connect() failed before a SYN, or it never connected).
#![no_std]
#![no_main]
// For the atomic counters (`fetch_add`): the BPF target has no atomics in `core`.
#![feature(asm_experimental_arch)]

mod object;

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    bindings::{
        bpf_sock_addr,
        sk_action::{SK_DROP, SK_PASS},
        BPF_NOEXIST,
    },
    helpers::{bpf_get_netns_cookie, bpf_get_socket_cookie},
    macros::{cgroup_sock, cgroup_sock_addr, map, sk_lookup, sock_ops},
    maps::{HashMap, LruHashMap, PerCpuArray, SockHash},
    programs::{SkLookupContext, SockAddrContext, SockContext, SockOpsContext},
    EbpfContext,
};
use mesh_common::{
    map_sizes, v4_mapped_words, AppDialKey, Counter, OrigDst, PortKey, AF_INET, AF_INET6, HBONE_PORT,
    INBOUND_PLAINTEXT_PORT, LOCALHOST_V4, LOCALHOST_V6_WORDS, MARK_AGENT, MARK_APP_DIAL, OUTBOUND_PORT,
};

/// Return value of cgroup sock_addr programs that lets the syscall proceed.
const ALLOW: i32 = 1;
/// Return value of cgroup sock_addr programs that fails the syscall with EPERM.
const REFUSE: i32 = 0;
const SOCK_STREAM: u32 = 1;
const IPPROTO_TCP: u32 = 6;
const BPF_SOCK_OPS_TCP_CONNECT_CB: u32 = 3;
const BPF_SOCK_OPS_STATE_CB: u32 = 10;
const BPF_SOCK_OPS_STATE_CB_FLAG: i32 = 4;
const BPF_TCP_CLOSE: u32 = 7;
const BPF_TCP_LISTEN: u32 = 10;

#[map]
static ENROLLED: HashMap<u64, u32> = HashMap::pinned(map_sizes::ENROLLED, 0);

#[map]
static CAPTURES: HashMap<u64, u64> = HashMap::pinned(map_sizes::CAPTURES, 0);

#[map]
static ORIG_BY_COOKIE: HashMap<u64, OrigDst> = HashMap::pinned(map_sizes::ORIG, 0);

#[map]
static ORIG_BY_PORT: LruHashMap<PortKey, OrigDst> = LruHashMap::pinned(map_sizes::ORIG, 0);

#[map]
static INBOUND_LISTENERS: SockHash<[u32; 4]> = SockHash::pinned(map_sizes::INBOUND_LISTENERS, 0);

#[map]
static APP_DIALS: LruHashMap<AppDialKey, u8> = LruHashMap::pinned(map_sizes::APP_DIALS, 0);

#[map]
static AGENT_DIALS: LruHashMap<u64, u8> = LruHashMap::pinned(map_sizes::AGENT_DIALS, 0);

#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(Counter::SLOTS, 0);

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *slot += 1 };
    }
}

/// Fields of a `bpf_sock_addr` context, read once and unconditionally (the verifier rejects
/// some conditional ctx reads).
struct SockAddr {
    user_ip4: u32,
    user_ip6: [u32; 4],
    user_port: u32,
    sock_type: u32,
    mark: u32,
}

#[inline(always)]
fn read_sock_addr(ctx: &SockAddrContext, v6: bool) -> SockAddr {
    let sa: *mut bpf_sock_addr = ctx.sock_addr;
    // SAFETY: `sa` is the kernel-provided context; each field is a valid aligned u32 and `sk`
    // is a non-null PTR_TO_SOCKET for sock_addr programs.
    unsafe {
        let user_ip4 = if v6 { 0 } else { read_volatile(&(*sa).user_ip4) };
        let user_ip6 = if v6 {
            [
                read_volatile(&(*sa).user_ip6[0]),
                read_volatile(&(*sa).user_ip6[1]),
                read_volatile(&(*sa).user_ip6[2]),
                read_volatile(&(*sa).user_ip6[3]),
            ]
        } else {
            [0; 4]
        };
        let sk = read_volatile(&(*sa).__bindgen_anon_1.sk);
        SockAddr {
            user_ip4,
            user_ip6,
            user_port: read_volatile(&(*sa).user_port),
            sock_type: read_volatile(&(*sa).type_),
            mark: read_volatile(&(*sk).mark),
        }
    }
}

#[inline(always)]
fn netns_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the helper only reads the context it is given.
    unsafe { bpf_get_netns_cookie(ctx.as_ptr()) }
}

/// The capture share of network namespace `netns` if it is enrolled.
#[inline(always)]
fn enrolled_share(netns: u64) -> Option<u32> {
    // SAFETY: the value is copied out at once.
    unsafe { ENROLLED.get(netns) }.copied()
}

/// `*counter += delta` as one atomic instruction (BPF_ATOMIC | BPF_FETCH): programs on every CPU
/// count. Returns the value before.
#[inline(always)]
fn fetch_add(counter: *mut u64, delta: u64) -> u64 {
    let mut value = delta;
    // SAFETY: `counter` is a valid, aligned u64 map value, only ever updated by this instruction.
    unsafe {
        core::arch::asm!("{v} = atomic_fetch_add((u64 *)({p} + 0), {v})", p = in(reg) counter, v = inout(reg) value);
    }
    value
}

/// Counts one more capture of `netns` against its `share`; false (nothing counted) when it has
/// its share already, or its count cannot be kept.
#[inline(always)]
fn take_share(netns: u64, share: u32) -> bool {
    if CAPTURES.get_ptr_mut(netns).is_none() {
        // Its first capture: a count at zero (another CPU may create it first; one exists after).
        let _ = CAPTURES.insert(netns, 0, u64::from(BPF_NOEXIST));
    }
    let Some(count) = CAPTURES.get_ptr_mut(netns) else {
        return false;
    };
    if fetch_add(count, 1) < u64::from(share) {
        return true;
    }
    fetch_add(count, u64::MAX);
    false
}

/// Forgets the capture of socket `cookie` in `netns`, if it has one, and gives its share back.
#[inline(always)]
fn forget_capture(cookie: u64, netns: u64) {
    if ORIG_BY_COOKIE.remove(cookie).is_ok() {
        give_back(netns);
    }
}

/// Uncounts one capture of `netns`.
#[inline(always)]
fn give_back(netns: u64) {
    // A released netns has no count left to give back to.
    let Some(count) = CAPTURES.get_ptr_mut(netns) else {
        return;
    };
    // Never below zero: a netns released and enrolled again counts from zero while sockets it
    // had before close.
    if fetch_add(count, u64::MAX) == 0 {
        fetch_add(count, 1);
    }
}

#[inline(always)]
fn socket_cookie<C: EbpfContext>(ctx: &C) -> u64 {
    // SAFETY: the helper only reads the context it is given.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// IPv4 address (network order) carried in an IPv4-mapped IPv6 address, if it is one.
#[inline(always)]
fn v4_mapped(ip6: &[u32; 4]) -> Option<u32> {
    (ip6[0] == 0 && ip6[1] == 0 && u32::from_be(ip6[2]) == 0xffff).then_some(ip6[3])
}

/// Word-by-word equality (array `==` may become a `bcmp` call, which BPF does not have).
#[inline(always)]
fn same_words(a: &[u32; 4], b: &[u32; 4]) -> bool {
    a[0] == b[0] && a[1] == b[1] && a[2] == b[2] && a[3] == b[3]
}

/// Whether `ip6` (network-order words) is `::1` or an IPv4-mapped 127.0.0.0/8 address.
#[inline(always)]
fn is_loopback6(ip6: &[u32; 4]) -> bool {
    match v4_mapped(ip6) {
        Some(ip4) => u32::from_be(ip4) >> 24 == 127,
        None => ip6[0] == 0 && ip6[1] == 0 && ip6[2] == 0 && u32::from_be(ip6[3]) == 1,
    }
}

/// Whether a connect() to `dst` (map-key words, see [`v4_mapped_words`]) port `port` (host
/// order) is to be captured: TCP, not loopback (it stays inside the pod), never the agent's own
/// ports. The agent's own sockets are told apart before ([`agents_own`]).
#[inline(always)]
fn wants_capture(addr: &SockAddr, dst: &[u32; 4], port: u16) -> bool {
    addr.sock_type == SOCK_STREAM && !is_loopback6(dst) && port != OUTBOUND_PORT && port != INBOUND_PLAINTEXT_PORT
}

/// Whether the connecting socket is the agent's own: it carries the agent's mark (which routes
/// its packets) and the agent registered its cookie in `AGENT_DIALS` before connecting (which
/// nothing else can: a pod may set the mark, with CAP_NET_RAW, but not write the map). The
/// entry is forgotten here, its one use done; a marked socket that is not in the map is
/// captured like any other.
#[inline(always)]
fn agents_own(ctx: &SockAddrContext, addr: &SockAddr) -> bool {
    if addr.mark != MARK_AGENT && addr.mark != MARK_APP_DIAL {
        return false;
    }
    let cookie = socket_cookie(ctx);
    // SAFETY: the value is only tested for presence.
    if unsafe { AGENT_DIALS.get(cookie) }.is_none() {
        return false;
    }
    let _ = AGENT_DIALS.remove(cookie);
    true
}

#[cgroup_sock_addr(connect4)]
pub fn fm_connect4(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, false)
}

#[cgroup_sock_addr(connect6)]
pub fn fm_connect6(ctx: SockAddrContext) -> i32 {
    try_connect(&ctx, true)
}

#[inline(always)]
fn try_connect(ctx: &SockAddrContext, v6: bool) -> i32 {
    let addr = read_sock_addr(ctx, v6);
    let netns = netns_cookie(ctx);
    let Some(share) = enrolled_share(netns) else {
        return ALLOW;
    };
    // An IPv4-mapped destination of an IPv6 socket goes out as IPv4: it is captured as such,
    // to 127.0.0.1 (mapped); a native IPv6 one to [::1].
    let (dst, native6) = if v6 {
        match v4_mapped(&addr.user_ip6) {
            Some(ip4) => (v4_mapped_words(ip4), false),
            None => (addr.user_ip6, true),
        }
    } else {
        (v4_mapped_words(addr.user_ip4), false)
    };
    let port = u16::from_be(addr.user_port as u16);
    if agents_own(ctx, &addr) || !wants_capture(&addr, &dst, port) {
        count(Counter::Bypassed);
        return ALLOW;
    }
    let orig = match native6 {
        true => OrigDst { family: AF_INET6, port, ip4: 0, ip6: dst },
        false => OrigDst { family: AF_INET, port, ip4: dst[3], ip6: [0; 4] },
    };
    let cookie = socket_cookie(ctx);
    // A socket whose earlier connect() failed keeps its one entry, counted once.
    // SAFETY: the value is only tested for presence.
    let counted = unsafe { ORIG_BY_COOKIE.get(cookie) }.is_some();
    if !counted && !take_share(netns, share) {
        count(Counter::ShareRefused);
        return REFUSE;
    }
    if ORIG_BY_COOKIE.insert(cookie, orig, 0).is_err() {
        // Let through, the connection would bypass the mesh: refused instead.
        if !counted {
            give_back(netns);
        }
        count(Counter::MapErrors);
        count(Counter::OutboundRefused);
        return REFUSE;
    }
    let sa = ctx.sock_addr;
    // SAFETY: writable ctx fields, written one by one (merged stores are rejected).
    unsafe {
        if native6 {
            write_volatile(&mut (*sa).user_ip6[0], LOCALHOST_V6_WORDS[0]);
            write_volatile(&mut (*sa).user_ip6[1], LOCALHOST_V6_WORDS[1]);
            write_volatile(&mut (*sa).user_ip6[2], LOCALHOST_V6_WORDS[2]);
            write_volatile(&mut (*sa).user_ip6[3], LOCALHOST_V6_WORDS[3]);
        } else if v6 {
            write_volatile(&mut (*sa).user_ip6[3], LOCALHOST_V4.to_be());
        } else {
            write_volatile(&mut (*sa).user_ip4, LOCALHOST_V4.to_be());
        }
        write_volatile(&mut (*sa).user_port, u32::from(OUTBOUND_PORT.to_be()));
    }
    count(Counter::Captured);
    ALLOW
}

#[sock_ops]
pub fn fm_orig_dst(ctx: SockOpsContext) -> u32 {
    try_file_orig_dst(&ctx);
    1
}

/// On connect of a captured socket: files its original destination under (netns cookie,
/// client port, family) and asks for state callbacks. On its close: forgets it, so the maps
/// hold only live connections.
#[inline(always)]
fn try_file_orig_dst(ctx: &SockOpsContext) {
    let op = ctx.op();
    let local_port = ctx.local_port();
    let new_state = ctx.arg(1);
    if op != BPF_SOCK_OPS_TCP_CONNECT_CB && op != BPF_SOCK_OPS_STATE_CB {
        return;
    }
    let cookie = socket_cookie(ctx);
    let netns = netns_cookie(ctx);
    // SAFETY: the value is copied out before any other map operation. Only captured sockets
    // have one (and only they asked for state callbacks).
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(cookie) }).copied() else {
        return;
    };
    let key = PortKey { netns_cookie: netns, port: local_port, family: u32::from(orig.family) };
    if op == BPF_SOCK_OPS_STATE_CB {
        if new_state == BPF_TCP_CLOSE {
            let _ = ORIG_BY_PORT.remove(key);
            forget_capture(cookie, netns);
        }
        return;
    }
    if ORIG_BY_PORT.insert(key, orig, 0).is_ok() {
        count(Counter::OrigFiled);
    } else {
        count(Counter::MapErrors);
    }
    if ctx.set_cb_flags(BPF_SOCK_OPS_STATE_CB_FLAG).is_err() {
        count(Counter::MapErrors);
    }
}

#[cgroup_sock(sock_release)]
pub fn fm_release(ctx: SockContext) -> i32 {
    try_forget_unconnected(&ctx);
    ALLOW
}

/// On close of a TCP socket that will see no TCP_CLOSE callback (it is closed already: its
/// captured connect() failed before a SYN, or it never connected; or it listens): forgets its
/// capture. A socket closed in any other state goes on to TCP_CLOSE, where sockops forgets it.
/// Only a captured socket has an entry to forget.
#[inline(always)]
fn try_forget_unconnected(ctx: &SockContext) {
    let sk = ctx.sock;
    // SAFETY: `sk` is the kernel-provided socket of a cgroup sock program; aligned u32 fields.
    let (protocol, state) = unsafe { (read_volatile(&(*sk).protocol), read_volatile(&(*sk).state)) };
    if protocol != IPPROTO_TCP || (state != BPF_TCP_CLOSE && state != BPF_TCP_LISTEN) {
        return;
    }
    forget_capture(socket_cookie(ctx), netns_cookie(ctx));
}

#[cgroup_sock_addr(getpeername4)]
pub fn fm_peer4(ctx: SockAddrContext) -> i32 {
    try_restore_peer(&ctx, false);
    ALLOW
}

#[cgroup_sock_addr(getpeername6)]
pub fn fm_peer6(ctx: SockAddrContext) -> i32 {
    try_restore_peer(&ctx, true);
    ALLOW
}

#[inline(always)]
fn try_restore_peer(ctx: &SockAddrContext, v6: bool) {
    let addr = read_sock_addr(ctx, v6);
    if u16::from_be(addr.user_port as u16) != OUTBOUND_PORT {
        return;
    }
    // The peer a captured socket sees: 127.0.0.1 (or IPv4-mapped) for an IPv4 destination,
    // [::1] for a native IPv6 one.
    let native6 = v6 && same_words(&addr.user_ip6, &LOCALHOST_V6_WORDS);
    let ip4 = match v6 {
        true => v4_mapped(&addr.user_ip6),
        false => Some(addr.user_ip4),
    };
    if !native6 && ip4.is_none_or(|ip4| u32::from_be(ip4) != LOCALHOST_V4) {
        return;
    }
    // SAFETY: the value is copied out before the context is written.
    let Some(orig) = (unsafe { ORIG_BY_COOKIE.get(socket_cookie(ctx)) }).copied() else {
        return;
    };
    if native6 != (orig.family == AF_INET6) {
        return;
    }
    let sa = ctx.sock_addr;
    // SAFETY: writable ctx fields, written one by one.
    unsafe {
        if native6 {
            write_volatile(&mut (*sa).user_ip6[0], orig.ip6[0]);
            write_volatile(&mut (*sa).user_ip6[1], orig.ip6[1]);
            write_volatile(&mut (*sa).user_ip6[2], orig.ip6[2]);
            write_volatile(&mut (*sa).user_ip6[3], orig.ip6[3]);
        } else if v6 {
            write_volatile(&mut (*sa).user_ip6[3], orig.ip4);
        } else {
            write_volatile(&mut (*sa).user_ip4, orig.ip4);
        }
        write_volatile(&mut (*sa).user_port, u32::from(orig.port.to_be()));
    }
    count(Counter::PeerRestored);
}

#[sk_lookup]
pub fn fm_steer_in(ctx: SkLookupContext) -> u32 {
    steer_inbound(&ctx)
}

/// Hands a TCP SYN for the pod to the agent's 15006 listener of the pod address (either
/// family), or refuses it when there is none: loopback, the agent's own ports and the agent's
/// dials to the app pass.
#[inline(always)]
fn steer_inbound(ctx: &SkLookupContext) -> u32 {
    let lookup = ctx.lookup;
    // SAFETY: kernel-provided context; each field is a valid aligned u32 (remote_port a u16),
    // read unconditionally for the verifier.
    let (family, protocol, local_ip4, local_ip6, local_port, remote_ip4, remote_ip6, remote_port) = unsafe {
        (
            read_volatile(&(*lookup).family),
            read_volatile(&(*lookup).protocol),
            read_volatile(&(*lookup).local_ip4),
            [
                read_volatile(&(*lookup).local_ip6[0]),
                read_volatile(&(*lookup).local_ip6[1]),
                read_volatile(&(*lookup).local_ip6[2]),
                read_volatile(&(*lookup).local_ip6[3]),
            ],
            read_volatile(&(*lookup).local_port),
            read_volatile(&(*lookup).remote_ip4),
            [
                read_volatile(&(*lookup).remote_ip6[0]),
                read_volatile(&(*lookup).remote_ip6[1]),
                read_volatile(&(*lookup).remote_ip6[2]),
                read_volatile(&(*lookup).remote_ip6[3]),
            ],
            read_volatile(&(*lookup).remote_port),
        )
    };
    if protocol != IPPROTO_TCP {
        return SK_PASS;
    }
    let (local, remote) = if family == u32::from(AF_INET) {
        (v4_mapped_words(local_ip4), v4_mapped_words(remote_ip4))
    } else if family == u32::from(AF_INET6) {
        (local_ip6, remote_ip6)
    } else {
        return SK_PASS;
    };
    let port = local_port as u16;
    if is_loopback6(&local) || port == OUTBOUND_PORT || port == INBOUND_PLAINTEXT_PORT || port == HBONE_PORT {
        return SK_PASS;
    }
    let dial = AppDialKey {
        client_ip: remote,
        pod_ip: local,
        client_port: u32::from(u16::from_be(remote_port)),
        app_port: local_port,
    };
    // SAFETY: the value is only tested for presence.
    if unsafe { APP_DIALS.get(dial) }.is_some() {
        return SK_PASS;
    }
    if INBOUND_LISTENERS.redirect_sk_lookup(ctx, local, 0).is_ok() {
        count(Counter::InboundSteered);
        return SK_PASS;
    }
    count(Counter::InboundRefused);
    SK_DROP
}
