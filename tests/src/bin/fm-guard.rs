//! fm-guard: removes what a test process left behind when it died without running its
//! destructors (SIGKILL, abort, an OOM kill).
//!
//! The topology harness starts one fm-guard per process, in a process group of its own (so a
//! Ctrl-C at the terminal reaches the test, not the guard), and tells it over its stdin what it
//! creates and what it has already removed, one line each:
//!
//! ```text
//! netns NAME        forget-netns NAME
//! pgid PGID         forget-pgid PGID
//! cgroup PATH       forget-cgroup PATH
//! dir PATH          forget-dir PATH
//! mount PATH        forget-mount PATH
//! ```
//!
//! When stdin ends (the test process is gone, whatever killed it), fm-guard kills every process
//! group still registered and every process still inside a registered namespace, removes the
//! cgroups deepest first, deletes the namespaces in reverse order of creation, unmounts the
//! mounts (a topology's bpf filesystem: its agents' pinned maps and links go with it) and
//! removes the scratch directories. A test process that cleaned up after itself leaves nothing registered,
//! and the guard exits without touching anything.

use std::collections::BTreeSet;
use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// What the test process created and has not removed yet.
#[derive(Debug, Default)]
struct Registered {
    namespaces: Vec<String>,
    groups: BTreeSet<i32>,
    cgroups: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    mounts: Vec<PathBuf>,
}

impl Registered {
    fn apply(&mut self, line: &str) {
        let Some((verb, arg)) = line.split_once(' ') else { return };
        match verb {
            "netns" => self.namespaces.push(arg.to_string()),
            "forget-netns" => self.namespaces.retain(|n| n != arg),
            "pgid" => {
                if let Ok(pgid) = arg.parse() {
                    self.groups.insert(pgid);
                }
            }
            "forget-pgid" => {
                if let Ok(pgid) = arg.parse::<i32>() {
                    self.groups.remove(&pgid);
                }
            }
            "cgroup" => self.cgroups.push(PathBuf::from(arg)),
            "forget-cgroup" => self.cgroups.retain(|c| c != Path::new(arg)),
            "dir" => self.dirs.push(PathBuf::from(arg)),
            "forget-dir" => self.dirs.retain(|d| d != Path::new(arg)),
            "mount" => self.mounts.push(PathBuf::from(arg)),
            "forget-mount" => self.mounts.retain(|m| m != Path::new(arg)),
            _ => eprintln!("fm-guard: ignoring unknown line {line:?}"),
        }
    }

    fn is_empty(&self) -> bool {
        self.namespaces.is_empty()
            && self.groups.is_empty()
            && self.cgroups.is_empty()
            && self.dirs.is_empty()
            && self.mounts.is_empty()
    }
}

fn main() {
    let mut registered = Registered::default();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        registered.apply(line.trim_end());
    }
    if registered.is_empty() {
        return;
    }
    eprintln!(
        "fm-guard: the test process ended without cleaning up; removing {} process groups, {} namespaces, {} cgroups",
        registered.groups.len(),
        registered.namespaces.len(),
        registered.cgroups.len()
    );
    clean(&registered);
}

fn clean(registered: &Registered) {
    for &pgid in &registered.groups {
        let _ = kill(Pid::from_raw(-pgid), Signal::SIGKILL);
    }
    // Whatever else runs inside the namespaces (a process started without a group of its own).
    for ns in &registered.namespaces {
        let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).stderr(Stdio::null()).output() else { continue };
        for pid in String::from_utf8_lossy(&out.stdout).lines().filter_map(|p| p.trim().parse().ok()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
    // Deepest first; a cgroup can only go once its processes have exited.
    for cgroup in registered.cgroups.iter().rev() {
        let deadline = Instant::now() + Duration::from_secs(5);
        while cgroup.exists() && std::fs::remove_dir(cgroup).is_err() && Instant::now() < deadline {
            if let Ok(procs) = std::fs::read_to_string(cgroup.join("cgroup.procs")) {
                for pid in procs.lines().filter_map(|p| p.trim().parse().ok()) {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    for ns in registered.namespaces.iter().rev() {
        let _ = Command::new("ip").args(["netns", "delete", ns]).stderr(Stdio::null()).status();
    }
    for mount in registered.mounts.iter().rev() {
        let _ = Command::new("umount").arg(mount).stderr(Stdio::null()).status();
    }
    if std::env::var_os("FERRYMESH_KEEP_LOGS").is_none() {
        for dir in &registered.dirs {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forgotten_entries_are_left_alone() {
        let mut r = Registered::default();
        for line in [
            "netns a",
            "netns b",
            "pgid 42",
            "cgroup /x/y",
            "dir /tmp/d",
            "mount /tmp/d/bpf",
            "forget-netns a",
            "forget-pgid 42",
        ] {
            r.apply(line);
        }
        assert_eq!(r.namespaces, ["b"]);
        assert!(r.groups.is_empty());
        assert_eq!(r.cgroups, [PathBuf::from("/x/y")]);
        r.apply("forget-netns b");
        r.apply("forget-cgroup /x/y");
        r.apply("forget-dir /tmp/d");
        assert!(!r.is_empty(), "the mount is still registered");
        r.apply("forget-mount /tmp/d/bpf");
        assert!(r.is_empty());
    }
}
