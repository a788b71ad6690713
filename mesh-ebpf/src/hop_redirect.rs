//! A measurement, not the agent's data path: the sk_msg program `fm-peer hops --sockmap` attaches
//! to `HOP_PEERS`, a sockhash holding the two ends of its own loopback connection (each under
//! its local port, inserted by fm-peer). Each `sendmsg` of either end goes straight into the
//! other end's receive queue, skipping the loopback TCP stack: what a hop between an agent and a
//! pod would cost with sockmap redirection. Only sockets fm-peer puts in the map are touched.
#![no_std]
#![no_main]

mod object;

use aya_ebpf::{
    bindings::{sk_action::SK_PASS, BPF_F_INGRESS},
    macros::{map, sk_msg},
    maps::{PerCpuArray, SockHash},
    programs::SkMsgContext,
};

/// The two ends, each under its local port.
#[map]
static HOP_PEERS: SockHash<u32> = SockHash::with_max_entries(2, 0);

/// Messages redirected (slot 0, per CPU): fm-peer checks the measurement took the redirected
/// path rather than TCP.
#[map]
static HOP_REDIRECTED: PerCpuArray<u64> = PerCpuArray::with_max_entries(1, 0);

#[sk_msg]
pub fn fm_hop_redirect(ctx: SkMsgContext) -> u32 {
    // SAFETY: the context points at the kernel's sk_msg_md for this message.
    let remote_port = unsafe { (*ctx.msg).remote_port };
    // The peer's local port is this socket's remote port (network order in the upper half).
    let mut peer = u32::from(u16::from_be((remote_port >> 16) as u16));
    // A peer not in the map leaves the message to TCP.
    if HOP_PEERS.redirect_msg(&ctx, &mut peer, u64::from(BPF_F_INGRESS)) == i64::from(SK_PASS) {
        if let Some(redirected) = HOP_REDIRECTED.get_ptr_mut(0) {
            // SAFETY: the slot is this CPU's, and this program runs once at a time on it.
            unsafe { *redirected += 1 };
        }
    }
    SK_PASS
}
