//! Finds a pod's network namespace without a CNI plugin. The kubelet runs every container of a
//! pod in a cgroup whose path names the pod UID (`.../pod<uid>/...` with the cgroupfs driver,
//! `...-pod<uid with _ for ->.slice/...` with systemd), so any process of the pod is found by
//! its /proc/<pid>/cgroup, and its /proc/<pid>/ns/net is the pod's netns. It only reads /proc.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// Why a pod's netns was not found.
#[derive(Debug, thiserror::Error)]
pub enum DiscoverError {
    /// No process of the pod runs yet (or its cgroup does not name the UID).
    #[error("no process of pod {0} found in /proc/*/cgroup (not started yet?); retrying")]
    NotRunning(String),
    /// The pod shares the node's network namespace.
    #[error("pod {0} uses the host network; there is nothing to enroll")]
    HostNetwork(String),
}

/// Whether a /proc/<pid>/cgroup text places the process in the cgroup of pod `uid`.
pub fn in_pod_cgroup(cgroup: &str, uid: &str) -> bool {
    let systemd = uid.replace('-', "_");
    cgroup.lines().filter_map(|l| l.splitn(3, ':').nth(2)).any(|path| {
        path.split('/').any(|part| {
            part.strip_prefix("pod").is_some_and(|rest| rest == uid)
                || part
                    .strip_suffix(".slice")
                    .and_then(|s| s.rsplit_once("-pod"))
                    .is_some_and(|(_, rest)| rest == systemd)
        })
    })
}

/// The netns path of pod `uid`: `/proc/<pid>/ns/net` of one of its processes.
pub fn pod_netns(uid: &str) -> Result<PathBuf, DiscoverError> {
    let own = std::fs::metadata("/proc/self/ns/net").map(|m| m.ino()).ok();
    let mut host_network = false;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let dir = Path::new("/proc").join(&name);
        let Ok(cgroup) = std::fs::read_to_string(dir.join("cgroup")) else { continue };
        if !in_pod_cgroup(&cgroup, uid) {
            continue;
        }
        let netns = dir.join("ns/net");
        match std::fs::metadata(&netns).map(|m| m.ino()) {
            Ok(ino) if Some(ino) == own => host_network = true,
            Ok(_) => return Ok(netns),
            Err(_) => continue,
        }
    }
    Err(if host_network { DiscoverError::HostNetwork(uid.into()) } else { DiscoverError::NotRunning(uid.into()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recognises_both_kubelet_cgroup_drivers() {
        let uid = "1f0c2a3b-aaaa-4bbb-8ccc-0123456789ab";
        let cases = [
            ("0::/kubepods/besteffort/pod1f0c2a3b-aaaa-4bbb-8ccc-0123456789ab/0123abc\n", true),
            ("0::/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod1f0c2a3b_aaaa_4bbb_8ccc_0123456789ab.slice/cri-containerd-01.scope\n", true),
            ("12:pids:/kubepods/pod1f0c2a3b-aaaa-4bbb-8ccc-0123456789ab/x\n0::/\n", true),
            ("0::/kubepods/besteffort/pod1f0c2a3b-aaaa-4bbb-8ccc-0123456789ac/0123abc\n", false),
            ("0::/system.slice/containerd.service\n", false),
            ("0::/kubepods/besteffort/pod1f0c2a3b-aaaa-4bbb-8ccc-0123456789ab-extra\n", false),
        ];
        for (text, want) in cases {
            assert_eq!(in_pod_cgroup(text, uid), want, "{text}");
        }
    }

    #[test]
    fn a_pod_with_no_process_is_not_running() {
        assert!(matches!(pod_netns("no-such-pod-uid-ever"), Err(DiscoverError::NotRunning(_))));
    }
}
