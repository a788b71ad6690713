//! Kernel feature probe, run once at start: every feature the data path needs, each failure
//! naming the missing feature and what provides it. It only reads; it never attaches anything.

use std::path::{Path, PathBuf};

use aya::programs::ProgramType;
use aya::util::KernelVersion;

/// Oldest kernel the data path supports (netns cookies in sockops/sock_addr, SO_NETNS_COOKIE).
pub const MIN_KERNEL: (u8, u8) = (5, 15);

/// A kernel feature the agent needs but did not find.
#[derive(Debug, thiserror::Error)]
#[error("kernel feature missing: {feature} ({hint})")]
pub struct MissingFeature {
    /// The feature, as an operator would search for it.
    pub feature: String,
    /// What provides it.
    pub hint: String,
}

fn missing(feature: impl Into<String>, hint: impl Into<String>) -> MissingFeature {
    MissingFeature { feature: feature.into(), hint: hint.into() }
}

/// What the probe found that the agent uses.
#[derive(Debug)]
pub struct Features {
    /// Mount point of the cgroup v2 hierarchy (the attach point of the node-wide programs).
    pub cgroup2_root: PathBuf,
}

/// The cgroup2 mount point in a `/proc/mounts` text.
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(target.replace("\\040", " ")))
    })
}

/// Checks the kernel version against [`MIN_KERNEL`].
pub fn check_kernel(version: KernelVersion) -> Result<(), MissingFeature> {
    if version < KernelVersion::new(MIN_KERNEL.0, MIN_KERNEL.1, 0) {
        return Err(missing(
            format!("Linux {}.{}+ (running {version:?})", MIN_KERNEL.0, MIN_KERNEL.1),
            "netns cookies in sockops and sock_addr programs arrived in 5.15",
        ));
    }
    Ok(())
}

/// Checks every feature; the first one missing is the error.
pub fn probe() -> Result<Features, MissingFeature> {
    let version = KernelVersion::current().map_err(|e| missing("kernel version", format!("cannot read it: {e}")))?;
    check_kernel(version)?;
    if !Path::new("/sys/kernel/btf/vmlinux").exists() {
        return Err(missing("BTF (/sys/kernel/btf/vmlinux)", "a kernel built with CONFIG_DEBUG_INFO_BTF=y"));
    }
    let mounts = std::fs::read_to_string("/proc/mounts").map_err(|e| missing("/proc/mounts", e.to_string()))?;
    let cgroup2_root = cgroup2_mount(&mounts)
        .ok_or_else(|| missing("cgroup v2 mount", "mount cgroup2 (e.g. `mount -t cgroup2 none /sys/fs/cgroup`)"))?;
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").map_err(|e| missing("a loopback socket", e.to_string()))?;
    crate::netns::netns_cookie(&socket).map_err(|e| missing("SO_NETNS_COOKIE", e.to_string()))?;
    for (program, what) in [
        (ProgramType::CgroupSockAddr, "BPF_PROG_TYPE_CGROUP_SOCK_ADDR (connect4/6, getpeername4/6)"),
        (ProgramType::SockOps, "BPF_PROG_TYPE_SOCK_OPS"),
        (ProgramType::SkLookup, "BPF_PROG_TYPE_SK_LOOKUP (Linux 5.9+)"),
    ] {
        match aya::sys::is_program_supported(program) {
            Ok(true) => {}
            Ok(false) => {
                return Err(missing(what, "not supported by this kernel; are you root (CAP_BPF, CAP_NET_ADMIN)?"))
            }
            Err(e) => return Err(missing(what, format!("probe failed: {e}; are you root (CAP_BPF, CAP_NET_ADMIN)?"))),
        }
    }
    Ok(Features { cgroup2_root })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_cgroup2_mount_among_v1_hierarchies() {
        let cases = [
            ("cgroup2 /sys/fs/cgroup cgroup2 rw,nosuid 0 0\n", Some("/sys/fs/cgroup")),
            (
                "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\ncgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n",
                Some("/sys/fs/cgroup/unified"),
            ),
            ("cgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n", None),
            ("none /mnt/my\\040cg cgroup2 rw 0 0\n", Some("/mnt/my cg")),
        ];
        for (mounts, want) in cases {
            assert_eq!(cgroup2_mount(mounts), want.map(PathBuf::from), "{mounts}");
        }
    }

    #[test]
    fn an_old_kernel_is_named_in_the_error() {
        let e = check_kernel(KernelVersion::new(5, 10, 0)).unwrap_err();
        assert!(e.to_string().starts_with("kernel feature missing: Linux 5.15+"), "{e}");
        assert!(check_kernel(KernelVersion::new(5, 15, 0)).is_ok());
        assert!(check_kernel(KernelVersion::new(6, 18, 44)).is_ok());
    }

    #[test]
    fn this_machine_passes_the_probe() {
        let features = probe().expect("the CI machine has every feature");
        assert!(features.cgroup2_root.is_dir());
    }
}
