//! The netns topology (docs/ARCHITECTURE.md, "Test harness"): a *fabric* netns holding a bridge, one netns per *node*
//! joined to the bridge by a veth pair, one netns per *pod* joined to its node by a veth pair.
//!
//! Address plan: pods 10.244.<node>.<n>/32, nodes 172.18.0.<node>/24, the fabric's bridge
//! 172.18.0.254 (where mesh-ctrl listens), with a route to each node's pods. Dual-stack: pods
//! also have fd00:10:244:<node>::<n>/128 and nodes fd00:172:18::<node>/64, routed the same way. No namespace has
//! a route to the machine's real network: nodes have no default route and pods' default route
//! ends at their node.
//!
//! Names are unique per topology (process id + counter), so tests run in parallel. Every
//! namespace and process is removed on drop, which also runs on panic; [`cleanup_all`] removes
//! what a topology of this process left when the process is interrupted. When the process dies
//! without either (SIGKILL), its fm-guard removes them: every namespace, process group, cgroup
//! and scratch directory is registered with the guard when created and forgotten when removed.
//! Every process runs in a process group of its own, so a shell's children die with it.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, Ipv6Addr};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Mutex;

/// Address of the fabric bridge, reachable from every node.
pub const FABRIC_IP: Ipv4Addr = Ipv4Addr::new(172, 18, 0, 254);

static NEXT_ID: AtomicU32 = AtomicU32::new(0);
/// Namespaces and pids of every live topology of this process by id, for [`cleanup_all`].
static LIVE: Mutex<BTreeMap<String, Created>> = Mutex::new(BTreeMap::new());

/// The stdin of this process's fm-guard, started on first use.
static GUARD: Mutex<Option<ChildStdin>> = Mutex::new(None);

/// Tells this process's fm-guard (see `src/bin/fm-guard.rs`) one line: what was created, or
/// that something was removed. The guard's stdin closes only when this process is gone.
fn guard(line: &str) {
    let mut guard = GUARD.lock().unwrap_or_else(|e| e.into_inner());
    if guard.is_none() {
        let mut cmd = Command::new(crate::mesh::bin("fm-guard"));
        // A group of its own: a Ctrl-C at the terminal must not kill it along with the test.
        cmd.stdin(Stdio::piped()).stdout(Stdio::null()).process_group(0);
        #[expect(
            clippy::zombie_processes,
            reason = "fm-guard is never waited for: it exits only once this process is gone"
        )]
        let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start fm-guard: {e}"));
        *guard = child.stdin.take();
    }
    if let Some(stdin) = guard.as_mut() {
        let _ = writeln!(stdin, "{line}");
    }
}

/// What a topology created, in creation order.
#[derive(Debug, Default)]
struct Created {
    namespaces: Vec<String>,
    pids: Vec<u32>,
    cgroups: Vec<PathBuf>,
    mounts: Vec<PathBuf>,
}

/// A pod to create.
#[derive(Debug, Clone)]
pub struct PodSpec {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// 1-based node index.
    pub node: u8,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
}

/// What to build.
#[derive(Debug, Clone, Default)]
pub struct TopologySpec {
    /// Number of nodes (1..=200).
    pub nodes: u8,
    /// Pods, in creation order.
    pub pods: Vec<PodSpec>,
}

impl TopologySpec {
    /// A spec with `nodes` nodes and no pods.
    pub fn nodes(nodes: u8) -> Self {
        Self { nodes, pods: Vec::new() }
    }

    /// Adds pod `namespace/name` on node `node`.
    pub fn pod(mut self, namespace: &str, name: &str, node: u8) -> Self {
        self.pods.push(PodSpec { namespace: namespace.into(), name: name.into(), node, labels: BTreeMap::new() });
        self
    }
}

/// A node of the topology.
#[derive(Debug, Clone)]
pub struct Node {
    /// 1-based index.
    pub index: u8,
    /// Kubernetes node name (`node<index>`).
    pub name: String,
    /// Network namespace name.
    pub netns: String,
    /// Address on the fabric.
    pub ip: Ipv4Addr,
    /// IPv6 address on the fabric.
    pub ip6: Ipv6Addr,
}

/// A pod of the topology.
#[derive(Debug, Clone)]
pub struct Pod {
    /// Kubernetes namespace.
    pub namespace: String,
    /// Pod name.
    pub name: String,
    /// Node index.
    pub node: u8,
    /// Network namespace name.
    pub netns: String,
    /// Pod IP.
    pub ip: Ipv4Addr,
    /// Pod IPv6 address (dual-stack).
    pub ip6: Ipv6Addr,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
}

impl Pod {
    /// `/var/run/netns/<netns>`.
    pub fn netns_path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.netns)
    }
}

/// A built topology; dropping it removes everything it created.
#[derive(Debug)]
pub struct Topology {
    /// Unique id, the prefix of every name.
    pub id: String,
    /// Fabric netns name.
    pub fabric: String,
    /// Nodes.
    pub nodes: Vec<Node>,
    /// Pods.
    pub pods: Vec<Pod>,
    /// Scratch directory for config, sockets and logs.
    pub dir: PathBuf,
    children: Mutex<Vec<(String, Child)>>,
}

/// Runs `cmd`, panicking with its output when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn ip_batch(netns: &str, commands: &[String]) {
    let mut child = Command::new("ip")
        .args(["-n", netns, "-batch", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ip -batch");
    child.stdin.take().unwrap().write_all(commands.join("\n").as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ip -n {netns} -batch failed: {}\ncommands:\n{}",
        String::from_utf8_lossy(&out.stderr),
        commands.join("\n")
    );
}

fn sysctl(netns: &str, key: &str, value: &str) {
    run(Command::new("nsenter").arg(format!("--net=/var/run/netns/{netns}")).args([
        "sysctl",
        "-qw",
        &format!("{key}={value}"),
    ]));
}

impl Topology {
    /// Builds the topology of `spec`.
    pub fn build(spec: &TopologySpec) -> Self {
        assert!((1..=200).contains(&spec.nodes), "1 to 200 nodes");
        let id = format!("fm{}x{}", std::process::id(), NEXT_ID.fetch_add(1, Ordering::Relaxed));
        let dir = std::env::temp_dir().join(format!("ferrymesh-{id}"));
        guard(&format!("dir {}", dir.display()));
        std::fs::create_dir_all(dir.join("config")).expect("create topology dir");
        let mut topo = Topology {
            fabric: format!("{id}-fab"),
            id: id.clone(),
            nodes: Vec::new(),
            pods: Vec::new(),
            dir,
            children: Mutex::new(Vec::new()),
        };
        topo.add_netns(&topo.fabric.clone());
        ip_batch(
            &topo.fabric,
            &[
                "link set lo up".into(),
                "link add br0 type bridge".into(),
                format!("addr add {FABRIC_IP}/24 dev br0"),
                "link set br0 up".into(),
                "addr add fd00:172:18::fe/64 dev br0 nodad".into(),
            ],
        );
        for index in 1..=spec.nodes {
            let node = Node {
                index,
                name: format!("node{index}"),
                netns: format!("{id}-n{index}"),
                ip: Ipv4Addr::new(172, 18, 0, index),
                ip6: Ipv6Addr::new(0xfd00, 0x172, 0x18, 0, 0, 0, 0, u16::from(index)),
            };
            topo.add_netns(&node.netns);
            ip_batch(
                &topo.fabric,
                &[
                    format!("link add n{index} type veth peer name eth0 netns {}", node.netns),
                    format!("link set n{index} master br0 up"),
                ],
            );
            let mut cmds = vec![
                "link set lo up".to_string(),
                format!("addr add {}/24 dev eth0", node.ip),
                format!("addr add {}/64 dev eth0 nodad", node.ip6),
                "link set eth0 up".into(),
            ];
            for other in 1..=spec.nodes {
                if other != index {
                    cmds.push(format!("route add 10.244.{other}.0/24 via 172.18.0.{other}"));
                    cmds.push(format!("route add fd00:10:244:{other:x}::/64 via fd00:172:18::{other:x}"));
                }
            }
            ip_batch(&node.netns, &cmds);
            sysctl(&node.netns, "net.ipv4.ip_forward", "1");
            sysctl(&node.netns, "net.ipv6.conf.all.forwarding", "1");
            // Pods reach the fabric (mesh-ctrl) through their node, as in a cluster's pod
            // network: a waypoint's pod talks to mesh-ctrl itself.
            ip_batch(
                &topo.fabric,
                &[
                    format!("route add 10.244.{index}.0/24 via {}", node.ip),
                    format!("route add fd00:10:244:{index:x}::/64 via {}", node.ip6),
                ],
            );
            topo.nodes.push(node);
        }
        let mut per_node = BTreeMap::<u8, u8>::new();
        for (i, p) in spec.pods.iter().enumerate() {
            assert!((1..=spec.nodes).contains(&p.node), "pod {} on missing node {}", p.name, p.node);
            let host = per_node.entry(p.node).or_insert(1);
            *host += 1;
            let pod = Pod {
                namespace: p.namespace.clone(),
                name: p.name.clone(),
                node: p.node,
                netns: format!("{id}-p{i}"),
                ip: Ipv4Addr::new(10, 244, p.node, *host),
                ip6: Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(p.node), 0, 0, 0, u16::from(*host)),
                labels: p.labels.clone(),
            };
            let node_ns = &topo.nodes[usize::from(p.node) - 1].netns.clone();
            topo.add_netns(&pod.netns);
            let gw = Ipv4Addr::new(10, 244, p.node, 1);
            let gw6 = Ipv6Addr::new(0xfd00, 0x10, 0x244, u16::from(p.node), 0, 0, 0, 1);
            ip_batch(
                node_ns,
                &[
                    format!("link add p{i} type veth peer name eth0 netns {}", pod.netns),
                    format!("link set p{i} up"),
                    format!("addr add {gw}/32 dev p{i}"),
                    format!("route add {}/32 dev p{i}", pod.ip),
                    format!("addr add {gw6}/128 dev p{i} nodad"),
                    format!("route add {}/128 dev p{i}", pod.ip6),
                ],
            );
            ip_batch(
                &pod.netns,
                &[
                    "link set lo up".into(),
                    format!("addr add {}/32 dev eth0", pod.ip),
                    format!("addr add {}/128 dev eth0 nodad", pod.ip6),
                    "link set eth0 up".into(),
                    format!("route add {gw} dev eth0"),
                    format!("route add default via {gw}"),
                    format!("route add {gw6} dev eth0"),
                    format!("route add ::/0 via {gw6}"),
                ],
            );
            topo.pods.push(pod);
        }
        topo
    }

    fn add_netns(&mut self, name: &str) {
        // Registered before creation, so an interrupted build is cleaned up too.
        LIVE.lock().unwrap().entry(self.id.clone()).or_default().namespaces.push(name.to_string());
        guard(&format!("netns {name}"));
        run(Command::new("ip").args(["netns", "add", name]));
    }

    /// The pod `namespace/name`.
    pub fn pod(&self, namespace: &str, name: &str) -> &Pod {
        self.pods
            .iter()
            .find(|p| p.namespace == namespace && p.name == name)
            .unwrap_or_else(|| panic!("no pod {namespace}/{name} in the topology"))
    }

    /// A command that runs `program` inside network namespace `netns` (only the network
    /// namespace changes: mounts such as the cgroup2 hierarchy stay visible).
    pub fn command_in(&self, netns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/var/run/netns/{netns}")).arg("--").arg(program);
        cmd
    }

    /// Runs a command in `netns` to completion and returns its output (whatever its status).
    /// It runs in a process group of its own, registered with the guard while it runs.
    pub fn output_in(&self, netns: &str, program: impl AsRef<std::ffi::OsStr>, args: &[&str]) -> Output {
        let mut cmd = self.command_in(netns, program);
        cmd.args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
        let pgid = child.id();
        guard(&format!("pgid {pgid}"));
        let out = child.wait_with_output().unwrap_or_else(|e| panic!("cannot wait for {cmd:?}: {e}"));
        guard(&format!("forget-pgid {pgid}"));
        out
    }

    /// Starts a long-running process, killed (with every process it started) when the
    /// topology drops. `label` names it in panics and in the log file `<dir>/<label>.log` that
    /// receives its stdout and stderr.
    pub fn spawn(&self, label: &str, mut cmd: Command) -> u32 {
        let log = std::fs::File::create(self.log_path(label)).expect("create log file");
        cmd.stdout(log.try_clone().unwrap()).stderr(log).stdin(Stdio::null()).process_group(0);
        let child = cmd.spawn().unwrap_or_else(|e| panic!("cannot start {label} ({cmd:?}): {e}"));
        let pid = child.id();
        guard(&format!("pgid {pid}"));
        self.children.lock().unwrap().push((label.to_string(), child));
        LIVE.lock().unwrap().entry(self.id.clone()).or_default().pids.push(pid);
        pid
    }

    /// The bpf filesystem of this topology, mounted on first use at `<dir>/bpf`: where its
    /// agents pin their maps and links (each node in a directory of its own), unmounted on
    /// teardown, which releases whatever is still pinned.
    pub fn bpffs(&self) -> PathBuf {
        let path = self.dir.join("bpf");
        let mut live = LIVE.lock().unwrap();
        let created = live.entry(self.id.clone()).or_default();
        if !created.mounts.contains(&path) {
            std::fs::create_dir_all(&path).expect("create the bpffs mount point");
            guard(&format!("mount {}", path.display()));
            run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&path));
            created.mounts.push(path.clone());
        }
        path
    }

    /// Where the agent of node `node` pins its eBPF objects (`--bpf-dir`).
    pub fn bpf_dir(&self, node: u8) -> PathBuf {
        self.bpffs().join(format!("node{node}"))
    }

    /// Creates the cgroup the kubelet (cgroupfs driver) would give pod `uid`, under a directory
    /// of this topology in the cgroup2 hierarchy, and returns it; removed on teardown.
    pub fn pod_cgroup(&self, uid: &str) -> PathBuf {
        let mounts = std::fs::read_to_string("/proc/mounts").expect("read /proc/mounts");
        let root = mounts
            .lines()
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() > 2 && f[2] == "cgroup2").then(|| PathBuf::from(f[1]))
            })
            .expect("a cgroup2 mount");
        let mut path = root.join(format!("ferrymesh-{}", self.id));
        let mut live = LIVE.lock().unwrap();
        let created = live.entry(self.id.clone()).or_default();
        for part in ["kubepods".to_string(), "besteffort".to_string(), format!("pod{uid}")] {
            if !path.exists() {
                guard(&format!("cgroup {}", path.display()));
                std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
                created.cgroups.push(path.clone());
            }
            path = path.join(part);
        }
        guard(&format!("cgroup {}", path.display()));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create cgroup {}: {e}", path.display()));
        created.cgroups.push(path.clone());
        path
    }

    /// Path of the log file of the process started with `label`.
    pub fn log_path(&self, label: &str) -> PathBuf {
        self.dir.join(format!("{label}.log"))
    }

    /// Pid of the process started with `label`.
    pub fn pid(&self, label: &str) -> Option<u32> {
        self.children.lock().unwrap().iter().find(|(l, _)| l == label).map(|(_, c)| c.id())
    }

    /// The environment the process started with `label` runs with now (`/proc/<pid>/environ`:
    /// what its latest `exec` was given), one `NAME=value` each.
    pub fn environment(&self, label: &str) -> Vec<String> {
        let pid = self.pid(label).unwrap_or_else(|| panic!("no process {label}"));
        let environ =
            std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_else(|e| panic!("{label}'s environ: {e}"));
        environ.split(|&b| b == 0).filter(|v| !v.is_empty()).map(|v| String::from_utf8_lossy(v).into_owned()).collect()
    }

    /// Whether the process started with `label` is still running.
    pub fn is_running(&self, label: &str) -> bool {
        let mut children = self.children.lock().unwrap();
        children.iter_mut().find(|(l, _)| l == label).is_some_and(|(_, child)| matches!(child.try_wait(), Ok(None)))
    }

    /// Waits up to `timeout` for the process started with `label` to exit by itself and returns
    /// its status (the label is free again); panics if it is still running then.
    pub fn wait_exit(&self, label: &str, timeout: std::time::Duration) -> std::process::ExitStatus {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            {
                let mut children = self.children.lock().unwrap();
                let (_, child) =
                    children.iter_mut().find(|(l, _)| l == label).unwrap_or_else(|| panic!("no process {label}"));
                if let Some(status) = child.try_wait().expect("try_wait") {
                    kill_group(child.id());
                    children.retain(|(l, _)| l != label);
                    return status;
                }
            }
            assert!(std::time::Instant::now() < deadline, "{label} did not exit within {timeout:?}");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }

    /// Sends `signal` to the process started with `label` and waits for it to exit; anything
    /// it started that is still running is then killed.
    pub fn signal_and_wait(&self, label: &str, signal: i32) -> std::process::ExitStatus {
        let mut children = self.children.lock().unwrap();
        let (_, child) = children.iter_mut().find(|(l, _)| l == label).unwrap_or_else(|| panic!("no process {label}"));
        let rc = kill(child.id() as i32, signal);
        assert_eq!(rc, 0, "kill {label}");
        let status = child.wait().expect("wait");
        kill_group(child.id());
        // The label is free again, e.g. to restart the process.
        children.retain(|(l, _)| l != label);
        status
    }
}

#[expect(unsafe_code, reason = "kill(2) has no safe wrapper in std")]
fn kill(pid: i32, signal: i32) -> i32 {
    // SAFETY: kill(2) takes plain integers and touches no memory of ours; callers pass pids
    // of children they have not reaped yet, or (negative) their process groups.
    unsafe { libc::kill(pid, signal) }
}

/// Kills the process group led by `pgid` (a process started by [`Topology::spawn`] and what it
/// started) and tells the guard it is gone.
fn kill_group(pgid: u32) {
    kill(-(pgid as i32), libc::SIGKILL);
    guard(&format!("forget-pgid {pgid}"));
}

fn teardown(namespaces: &[String], pids: &[u32], cgroups: &[PathBuf], mounts: &[PathBuf]) {
    for &pid in pids {
        kill_group(pid);
    }
    // Deepest first; a cgroup can only go once its processes have exited.
    for cgroup in cgroups.iter().rev() {
        for _ in 0..50 {
            if std::fs::remove_dir(cgroup).is_ok() || !cgroup.exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        guard(&format!("forget-cgroup {}", cgroup.display()));
    }
    // Pods first, then nodes, then the fabric: deleting a netns removes its veth ends.
    for ns in namespaces.iter().rev() {
        let _ = Command::new("ip").args(["netns", "delete", ns]).stderr(Stdio::null()).status();
        guard(&format!("forget-netns {ns}"));
    }
    // Unmounting a bpf filesystem releases every map and link pinned in it.
    for mount in mounts.iter().rev() {
        let _ = Command::new("umount").arg(mount).stderr(Stdio::null()).status();
        guard(&format!("forget-mount {}", mount.display()));
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        let mut children = self.children.lock().unwrap_or_else(|e| e.into_inner());
        for (_, child) in children.iter_mut() {
            kill_group(child.id());
            let _ = child.wait();
        }
        let created = LIVE.lock().unwrap_or_else(|e| e.into_inner()).remove(&self.id);
        if let Some(created) = created {
            teardown(&created.namespaces, &[], &created.cgroups, &created.mounts);
        }
        if std::env::var_os("FERRYMESH_KEEP_LOGS").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
        guard(&format!("forget-dir {}", self.dir.display()));
    }
}

/// A scratch directory of a test that needs no topology, `<tmp>/ferrymesh-<name>-<pid>`,
/// created empty and removed however the test ends.
#[derive(Debug)]
pub struct ScratchDir(PathBuf);

impl ScratchDir {
    /// Creates it (empty).
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!("ferrymesh-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        Self(dir)
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Removes every namespace and process of every live topology of this process: for signal
/// handlers (Ctrl-C in the demo), where destructors do not run.
pub fn cleanup_all() {
    let live = std::mem::take(&mut *LIVE.lock().unwrap_or_else(|e| e.into_inner()));
    for created in live.into_values() {
        teardown(&created.namespaces, &created.pids, &created.cgroups, &created.mounts);
    }
}

/// Runs `f` on a thread that has entered network namespace `netns` (a name under
/// /var/run/netns): the sockets it creates live there, as a pod's would. Only that thread
/// moves; it ends with `f`.
pub fn in_netns<T: Send>(netns: &str, f: impl FnOnce() -> T + Send) -> T {
    let path = Path::new("/var/run/netns").join(netns);
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let ns = std::fs::File::open(&path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                    .unwrap_or_else(|e| panic!("setns {}: {e}", path.display()));
                f()
            })
            .join()
            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
    })
}

/// `SO_NETNS_COOKIE` (Linux 5.14+).
const SO_NETNS_COOKIE: libc::c_int = 71;

/// The cookie of network namespace `netns` (a name under /var/run/netns): the key the mesh's
/// eBPF programs and `meshctl status` know it by.
pub fn netns_cookie(netns: &str) -> u64 {
    in_netns(netns, || {
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("a socket to ask the netns cookie of");
        let mut cookie: u64 = 0;
        let mut len = std::mem::size_of::<u64>() as libc::socklen_t;
        // SAFETY: getsockopt writes at most `len` bytes into `cookie`, a live, aligned u64; the
        // descriptor is borrowed from a socket that outlives the call.
        #[expect(unsafe_code, reason = "getsockopt(SO_NETNS_COOKIE) has no safe wrapper in libc or nix")]
        let rc = unsafe {
            libc::getsockopt(
                std::os::fd::AsRawFd::as_raw_fd(&socket),
                libc::SOL_SOCKET,
                SO_NETNS_COOKIE,
                (&raw mut cookie).cast(),
                &mut len,
            )
        };
        assert_eq!(rc, 0, "getsockopt(SO_NETNS_COOKIE): {}", std::io::Error::last_os_error());
        cookie
    })
}

/// Resident memory of process `pid` in KiB (`VmRSS` of `/proc/<pid>/status`), or None when
/// there is no such process.
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}
