//! What every eBPF object this crate builds must define once (each `[[bin]]` is one object):
//! the panic handler a `no_std` binary needs, and the license section the kernel reads (GPL: the
//! programs call GPL-only helpers).

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 4] = *b"GPL\0";
