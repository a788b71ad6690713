//! Running ferrymesh on a [`Topology`]: the local config directory, mesh-ctrl in the fabric
//! netns, one mesh-agent per node netns, meshctl queries, and fm-peer servers and clients in
//! pods. Every process is owned by the topology and dies with it.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::topology::{Pod, Topology, FABRIC_IP};

/// Port of the fm-peer HTTP responder.
pub const HTTP_PORT: u16 = 8080;
/// Port of the fm-peer checksum sink.
pub const SINK_PORT: u16 = 9000;
/// Port of the fm-peer echo.
pub const ECHO_PORT: u16 = 9001;
/// Namespace label that opts a namespace in.
pub const DATAPLANE_MODE: &str = "ferrymesh.io/dataplane-mode";

/// Directory of the project's release binaries: `FERRYMESH_BIN_DIR`, else the directory of
/// the running executable (or its parent, for test binaries under `deps/`).
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FERRYMESH_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("target dir").to_path_buf()
    } else {
        dir
    }
}

/// Path of the project binary `name`, checked to exist.
pub fn bin(name: &str) -> PathBuf {
    let path = bin_dir().join(name);
    assert!(path.is_file(), "{} not found: build the workspace first (`cargo xtask build`)", path.display());
    path
}

/// The usual two-node mesh: `shop` (enrolled) with a and b on node 1 and c on node 2, `legacy`
/// (not enrolled) with x on node 1 and y on node 2; the mesh started, pods enrolled and serving.
pub fn two_node_mesh() -> Topology {
    let spec = crate::TopologySpec::nodes(2)
        .pod("shop", "a", 1)
        .pod("shop", "b", 1)
        .pod("shop", "c", 2)
        .pod("legacy", "x", 1)
        .pod("legacy", "y", 2);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a", "shop/b"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["shop/c"], Duration::from_secs(10));
    topo.serve_all();
    topo
}

/// The policy cluster: `shop` (a, b on node 1; c, labelled `app: c`, on node 2) and `other`
/// (d on node 2) enrolled, `legacy` (x on node 1) not; `before_start` writes any further
/// config, then the mesh starts and every pod serves.
pub fn policy_cluster(before_start: impl FnOnce(&Topology)) -> Topology {
    let spec = crate::TopologySpec::nodes(2)
        .pod("shop", "a", 1)
        .pod("shop", "b", 1)
        .pod("shop", "c", 2)
        .pod("other", "d", 2)
        .pod("legacy", "x", 1);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop", "other"]);
    topo.write_pod(topo.pod("shop", "c"), &[("app", "c")]);
    before_start(&topo);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a", "shop/b"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["other/d", "shop/c"], Duration::from_secs(10));
    topo.serve_all();
    topo
}

/// The pods of [`policy_cluster`]: shop/a, shop/b, shop/c, other/d and legacy/x.
pub fn policy_pods(topo: &Topology) -> (&Pod, &Pod, &Pod, &Pod, &Pod) {
    (
        topo.pod("shop", "a"),
        topo.pod("shop", "b"),
        topo.pod("shop", "c"),
        topo.pod("other", "d"),
        topo.pod("legacy", "x"),
    )
}

/// What the agent and the waypoint add to their environment as they start, executing themselves
/// again so glibc copies with its vector loop (`ferrymesh_dataplane::memcpy`).
pub const VECTOR_MEMCPY: &str = "GLIBC_TUNABLES=glibc.cpu.x86_rep_movsb_threshold=4294967295";

/// How long a test waits for a flow: the documented bound (a flow is listed within 1 s of its
/// connection's end) plus slack for scheduling on a loaded 2-core machine.
pub const FLOW_WAIT: Duration = Duration::from_millis(2500);
/// How long a test waits for a config change to reach the agents (or an enrolment to follow
/// it): the documented 1 s plus the same slack.
pub const CONFIG_WAIT: Duration = Duration::from_millis(2500);

/// Polls `check` every 50 ms until it returns true, panicking with `what` after `timeout`.
pub fn wait_until(timeout: Duration, what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while !check() {
        assert!(start.elapsed() < timeout, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn yaml_labels(labels: &[(&str, &str)], indent: &str) -> String {
    if labels.is_empty() {
        return String::new();
    }
    let mut out = format!("{indent}labels:\n");
    for (k, v) in labels {
        out.push_str(&format!("{indent}  {k}: \"{v}\"\n"));
    }
    out
}

impl Topology {
    /// The config directory mesh-ctrl watches.
    pub fn config_dir(&self) -> PathBuf {
        self.dir.join("config")
    }

    /// Writes `file` in the config directory atomically (write, then rename).
    pub fn write_config_file(&self, file: &str, text: &str) {
        let tmp = self.dir.join(format!(".{file}.tmp"));
        std::fs::write(&tmp, text).expect("write config");
        std::fs::rename(&tmp, self.config_dir().join(file)).expect("rename config");
    }

    /// Writes Namespace `name` with `labels`.
    pub fn write_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let text = format!("apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {name}\n{}", yaml_labels(labels, "  "));
        self.write_config_file(&format!("ns-{name}.yaml"), &text);
    }

    /// The Pod YAML of `pod` with `labels`.
    pub fn pod_yaml(&self, pod: &Pod, labels: &[(&str, &str)]) -> String {
        self.pod_yaml_as(pod, labels, &pod.name)
    }

    /// [`Topology::pod_yaml`] for a pod running as `service_account`.
    pub fn pod_yaml_as(&self, pod: &Pod, labels: &[(&str, &str)], service_account: &str) -> String {
        self.pod_yaml_in(pod, labels, service_account, &pod.netns_path())
    }

    /// [`Topology::pod_yaml_as`] with `netns` as the pod's `ferrymesh.io/netns` annotation (an
    /// attacker's pod names a netns not its own).
    pub fn pod_yaml_in(&self, pod: &Pod, labels: &[(&str, &str)], service_account: &str, netns: &Path) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: {ns}\n  uid: uid-{netns}\n{labels}  annotations:\n    ferrymesh.io/netns: {path}\nspec:\n  nodeName: node{node}\n  serviceAccountName: {service_account}\n  containers:\n  - name: app\n    image: fm-peer\n    ports:\n    - name: http\n      containerPort: {HTTP_PORT}\n    - name: echo\n      containerPort: {ECHO_PORT}\nstatus:\n  podIP: {ip}\n  podIPs:\n  - ip: {ip}\n  - ip: {ip6}\n",
            name = pod.name,
            ns = pod.namespace,
            netns = pod.netns,
            labels = yaml_labels(labels, "  "),
            path = netns.display(),
            node = pod.node,
            ip = pod.ip,
            ip6 = pod.ip6,
        )
    }

    /// Writes Service `namespace/name` at `vip` selecting `selector`, with (name, port, target)
    /// ports; a target that parses as a number is a number, else a container port name. A
    /// dual-stack Service's two ClusterIPs are given comma-separated (`10.96.0.10,fd00::a`).
    pub fn write_service(
        &self,
        namespace: &str,
        name: &str,
        vip: &str,
        selector: &[(&str, &str)],
        ports: &[(&str, u16, &str)],
    ) {
        let vips: Vec<&str> = vip.split(',').collect();
        let mut text = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: {namespace}\nspec:\n  clusterIP: {}\n  clusterIPs: {vips:?}\n  selector:\n",
            vips[0]
        );
        for (k, v) in selector {
            text.push_str(&format!("    {k}: {v}\n"));
        }
        text.push_str("  ports:\n");
        for (port_name, port, target) in ports {
            let target = if target.parse::<u16>().is_ok() { target.to_string() } else { format!("\"{target}\"") };
            text.push_str(&format!("  - name: {port_name}\n    port: {port}\n    targetPort: {target}\n"));
        }
        self.write_config_file(&format!("svc-{namespace}-{name}.yaml"), &text);
    }

    /// Runs `fm-peer hits` from `from` to `to`: (ok, failed, client IPs the servers saw).
    pub fn hits(&self, from: &Pod, to: SocketAddr, count: u32) -> Value {
        let out = self.output_in(
            &from.netns,
            bin("fm-peer"),
            &["hits", "--to", &to.to_string(), "--count", &count.to_string()],
        );
        assert!(out.status.success(), "fm-peer hits: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("hits JSON")
    }

    /// Writes Pod `pod` with `labels`.
    pub fn write_pod(&self, pod: &Pod, labels: &[(&str, &str)]) {
        self.write_config_file(&format!("pod-{}-{}.yaml", pod.namespace, pod.name), &self.pod_yaml(pod, labels));
    }

    /// Writes every namespace (enrolled when listed in `enrolled`) and every pod (unlabelled).
    pub fn write_cluster(&self, enrolled: &[&str]) {
        let mut namespaces: Vec<&str> = self.pods.iter().map(|p| p.namespace.as_str()).collect();
        namespaces.sort_unstable();
        namespaces.dedup();
        for ns in namespaces {
            let labels: &[(&str, &str)] = if enrolled.contains(&ns) { &[(DATAPLANE_MODE, "enabled")] } else { &[] };
            self.write_namespace(ns, labels);
        }
        for pod in &self.pods {
            self.write_pod(pod, &[]);
        }
    }

    /// Admin socket of the agent of node `node`.
    pub fn agent_socket(&self, node: u8) -> PathBuf {
        self.dir.join(format!("agent-node{node}.sock"))
    }

    /// The CA directory of mesh-ctrl.
    pub fn ca_dir(&self) -> PathBuf {
        self.dir.join("ca")
    }

    /// The bootstrap token file of the agent of `node`.
    pub fn token_file(&self, node: u8) -> PathBuf {
        self.dir.join(format!("node{node}.token"))
    }

    /// Starts mesh-ctrl in the fabric netns, serving the config directory over TLS (its serving
    /// certificate names the fabric address agents dial), with a CA in [`Topology::ca_dir`] and
    /// one bootstrap token per node; `extra` is appended (a `--ca-dir` there replaces
    /// [`Topology::ca_dir`]). Waits until it serves.
    pub fn start_ctrl(&self, extra: &[&str]) {
        let mut tokens = String::new();
        for node in &self.nodes {
            let token = format!("token-{}-{}-{}", self.id, node.name, std::process::id());
            std::fs::write(self.token_file(node.index), &token).expect("write token");
            tokens.push_str(&format!("{}: {token}\n", node.name));
        }
        let tokens_file = self.dir.join("node-tokens.yaml");
        std::fs::write(&tokens_file, tokens).expect("write node tokens");
        let mut cmd = self.command_in(&self.fabric, bin("mesh-ctrl"));
        cmd.arg("--config-dir").arg(self.config_dir()).arg("--listen").arg(format!("{FABRIC_IP}:15012"));
        if !extra.contains(&"--ca-dir") {
            cmd.arg("--ca-dir").arg(self.ca_dir());
        }
        cmd.arg("--node-tokens").arg(tokens_file);
        cmd.args(["--tls-san", &FABRIC_IP.to_string()]).args(extra);
        self.spawn("mesh-ctrl", cmd);
        wait_until(Duration::from_secs(10), "mesh-ctrl to serve", || {
            assert!(self.is_running("mesh-ctrl"), "mesh-ctrl exited: {}", self.log("mesh-ctrl"));
            self.log("mesh-ctrl").contains("mesh-ctrl serving")
        });
    }

    /// mesh-ctrl's address as agents dial it.
    pub fn ctrl_address(&self) -> String {
        format!("https://{FABRIC_IP}:15012")
    }

    /// The mesh root, as agents hold it (`--ca-root`).
    pub fn ca_root(&self) -> PathBuf {
        self.ca_dir().join("root-cert.pem")
    }

    /// The command of the agent of node `node` (label `agent-node<N>`), not started: in its
    /// netns, dialling mesh-ctrl over TLS with the mesh root, with its admin socket and token.
    /// `overrides` replace the value of a flag (`("--ca-root", "/other/root.pem")`); an empty
    /// value leaves the flag out (`("--token-file", "")`: an agent without certificates).
    pub fn agent_command(&self, node: u8, overrides: &[(&str, &str)]) -> std::process::Command {
        let netns = self.nodes[usize::from(node) - 1].netns.clone();
        let mut flags: Vec<(&str, String)> = vec![
            ("--node-name", format!("node{node}")),
            ("--ctrl", self.ctrl_address()),
            ("--ca-root", self.ca_root().display().to_string()),
            ("--admin-socket", self.agent_socket(node).display().to_string()),
            ("--token-file", self.token_file(node).display().to_string()),
            ("--bpf-dir", self.bpf_dir(node).display().to_string()),
            ("--handover-socket", self.dir.join(format!("agent-node{node}.handover")).display().to_string()),
            ("--cni-socket", self.cni_socket(node).display().to_string()),
        ];
        for (flag, value) in overrides {
            match flags.iter_mut().find(|(f, _)| f == flag) {
                Some(entry) => entry.1 = value.to_string(),
                None => flags.push((flag, value.to_string())),
            }
        }
        let mut cmd = self.command_in(&netns, bin("mesh-agent"));
        for (flag, value) in flags.into_iter().filter(|(_, value)| !value.is_empty()) {
            cmd.arg(flag).arg(value);
        }
        cmd
    }

    /// Where the agent of node `node` serves the CNI plugin (not `*.sock`: `meshctl
    /// --agents-dir` takes those for admin sockets).
    pub fn cni_socket(&self, node: u8) -> PathBuf {
        self.dir.join(format!("agent-node{node}.cni"))
    }

    /// Runs `ferrymesh-cni` as a container runtime would for `pod` on its node: `command`
    /// (ADD, DEL, ...) with the pod's netns and Kubernetes names in the environment, and the
    /// plugin's entry of a chained network configuration (as `mesh-agent --install-cni` writes
    /// it) whose previous result holds the pod's addresses.
    pub fn cni(&self, command: &str, pod: &Pod) -> Output {
        let config = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": "k8s-pod-network",
            "type": "ferrymesh-cni",
            "agent_socket": self.cni_socket(pod.node),
            "exclude_namespaces": ["kube-system", "ferrymesh-system"],
            "prevResult": {
                "cniVersion": "1.0.0",
                "interfaces": [{"name": "eth0", "sandbox": pod.netns_path()}],
                "ips": [
                    {"address": format!("{}/24", pod.ip), "interface": 0},
                    {"address": format!("{}/64", pod.ip6), "interface": 0},
                ],
            },
        });
        let mut child = std::process::Command::new(bin("ferrymesh-cni"))
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", format!("sandbox-{}", pod.netns))
            .env("CNI_NETNS", pod.netns_path())
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", bin_dir())
            .env(
                "CNI_ARGS",
                format!("K8S_POD_NAMESPACE={};K8S_POD_NAME={};K8S_POD_UID=uid-{}", pod.namespace, pod.name, pod.netns),
            )
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("ferrymesh-cni runs");
        std::io::Write::write_all(&mut child.stdin.take().unwrap(), config.to_string().as_bytes()).unwrap();
        child.wait_with_output().expect("ferrymesh-cni output")
    }

    /// Starts the agent of node `node` in its netns and waits until it serves its admin API
    /// and holds a config from mesh-ctrl.
    pub fn start_agent(&self, node: u8) {
        self.start_agent_with(node, &[]);
    }

    /// [`Topology::start_agent`] with flags of [`Topology::agent_command`] replaced or added.
    pub fn start_agent_with(&self, node: u8, overrides: &[(&str, &str)]) {
        self.start_agent_with_switches(node, overrides, &[]);
    }

    /// [`Topology::start_agent_with`], with `switches` (flags without a value) added.
    pub fn start_agent_with_switches(&self, node: u8, overrides: &[(&str, &str)], switches: &[&str]) {
        let label = format!("agent-node{node}");
        let mut command = self.agent_command(node, overrides);
        command.args(switches);
        self.spawn(&label, command);
        wait_until(Duration::from_secs(20), &format!("{label} to connect to mesh-ctrl"), || {
            assert!(self.is_running(&label), "{label} exited: {}", self.log(&label));
            self.try_status(node).is_some_and(|s| s["ctrl_connected"] == true && s["config_version"].as_u64() > Some(0))
        });
    }

    /// Starts mesh-ctrl and every agent.
    pub fn start_mesh(&self) {
        self.start_mesh_with(&[]);
    }

    /// Starts mesh-ctrl with `ctrl_args` appended, and every agent.
    pub fn start_mesh_with(&self, ctrl_args: &[&str]) {
        self.start_ctrl(ctrl_args);
        for node in &self.nodes {
            self.start_agent(node.index);
        }
    }

    /// The log of the process started with `label`.
    pub fn log(&self, label: &str) -> String {
        std::fs::read_to_string(self.log_path(label)).unwrap_or_default()
    }

    /// The whole lines of the log of `label`. The process may be writing as it is read: a last
    /// line without its newline is still being written, and is left for the next read.
    pub fn log_lines(&self, label: &str) -> Vec<String> {
        let log = self.log(label);
        let whole = log.rsplit_once('\n').map_or("", |(whole, _)| whole);
        whole.lines().map(str::to_string).collect()
    }

    /// Runs meshctl with `args` against the agent of `node`.
    pub fn meshctl(&self, node: u8, args: &[&str]) -> Output {
        std::process::Command::new(bin("meshctl"))
            .arg("--agent")
            .arg(self.agent_socket(node))
            .args(args)
            .output()
            .expect("run meshctl")
    }

    /// Runs meshctl with `args` against the agent of `node` first, then every agent of the
    /// topology (`--agents-dir`): what `explain` needs, since only a pod's own node's agent
    /// holds its labels and decides its policies.
    pub fn meshctl_all(&self, node: u8, args: &[&str]) -> Output {
        std::process::Command::new(bin("meshctl"))
            .arg("--agent")
            .arg(self.agent_socket(node))
            .arg("--agents-dir")
            .arg(&self.dir)
            .args(args)
            .output()
            .expect("run meshctl")
    }

    /// `meshctl status -o json` of the agent of `node`, if it answers.
    pub fn try_status(&self, node: u8) -> Option<Value> {
        let out = self.meshctl(node, &["status", "-o", "json"]);
        out.status.success().then(|| serde_json::from_slice(&out.stdout).expect("status JSON"))
    }

    /// `meshctl status -o json` of the agent of `node`.
    pub fn status(&self, node: u8) -> Value {
        let out = self.meshctl(node, &["status", "-o", "json"]);
        assert!(out.status.success(), "meshctl status failed: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).expect("status JSON")
    }

    /// `meshctl flows -o json` of the agent of `node`, one value per flow.
    pub fn flows(&self, node: u8) -> Vec<Value> {
        let out = self.meshctl(node, &["flows", "-o", "json"]);
        assert!(out.status.success(), "meshctl flows failed: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout)
            .expect("utf8")
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("flow line {l:?}: {e}")))
            .collect()
    }

    /// Names (`namespace/name`) of the pods the agent of `node` has enrolled.
    pub fn enrolled(&self, node: u8) -> Vec<String> {
        self.status(node)["enrolled"]
            .as_array()
            .expect("enrolled array")
            .iter()
            .map(|e| format!("{}/{}", e["namespace"].as_str().unwrap(), e["name"].as_str().unwrap()))
            .collect()
    }

    /// Waits until the agent of `node` has enrolled exactly `pods` (`namespace/name`, sorted).
    pub fn wait_enrolled(&self, node: u8, pods: &[&str], timeout: Duration) {
        wait_until(timeout, &format!("node{node} to enroll exactly {pods:?}"), || self.enrolled(node) == pods);
    }

    /// Starts fm-peer servers in `pod` and waits until they listen.
    pub fn serve(&self, pod: &Pod) {
        let label = format!("peer-{}-{}", pod.namespace, pod.name);
        let mut cmd = self.command_in(&pod.netns, bin("fm-peer"));
        cmd.arg("serve");
        self.spawn(&label, cmd);
        wait_until(Duration::from_secs(10), &format!("{label} to listen"), || {
            assert!(self.is_running(&label), "{label} exited: {}", self.log(&label));
            self.log(&label).contains("ready")
        });
    }

    /// Starts fm-peer servers in every pod of the topology.
    pub fn serve_all(&self) {
        for pod in &self.pods {
            self.serve(pod);
        }
    }

    /// Starts fm-peer servers in `pod` inside cgroup `cgroup` (as a kubelet would run the pod's
    /// containers) and waits until they listen.
    pub fn serve_in_cgroup(&self, pod: &Pod, cgroup: &std::path::Path) {
        let label = format!("peer-{}-{}", pod.namespace, pod.name);
        let mut cmd = self.command_in(&pod.netns, bin("fm-peer"));
        cmd.arg("serve");
        let pid = self.spawn(&label, cmd);
        std::fs::write(cgroup.join("cgroup.procs"), pid.to_string()).expect("move the pod's process into its cgroup");
        wait_until(Duration::from_secs(10), &format!("{label} to listen"), || self.log(&label).contains("ready"));
    }

    /// `curl` from `from` to the HTTP responder of `to`; returns the body (the client address
    /// the server saw), panicking when curl fails.
    pub fn curl(&self, from: &Pod, to: Ipv4Addr) -> String {
        let url = format!("http://{to}:{HTTP_PORT}/");
        let out = self.output_in(&from.netns, "curl", &["-sS", "--max-time", "10", &url]);
        assert!(out.status.success(), "curl {url} from {} failed: {}", from.name, String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf8 body")
    }

    /// `curl` from `from` to `to`'s HTTP responder at `ip` (IPv4 or IPv6): curl's exit code,
    /// its stdout and stderr, and how long it took.
    pub fn try_curl(&self, from: &Pod, ip: std::net::IpAddr) -> (Option<i32>, String, Duration) {
        let started = Instant::now();
        let url = format!("http://{}/", SocketAddr::new(ip, HTTP_PORT));
        let out = self.output_in(&from.netns, "curl", &["-gsS", "--max-time", "10", &url]);
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        (out.status.code(), text, started.elapsed())
    }

    /// Sends `bytes` from `from` to the sink of `to` and checks the checksum the sink computed.
    pub fn send(&self, from: &Pod, to: Ipv4Addr, bytes: u64) -> Value {
        self.send_with(from, to, bytes, &[])
    }

    /// [`Topology::send`] with extra fm-peer arguments (e.g. `--marker TEXT`).
    pub fn send_with(&self, from: &Pod, to: impl Into<std::net::IpAddr>, bytes: u64, extra: &[&str]) -> Value {
        let addr = SocketAddr::new(to.into(), SINK_PORT).to_string();
        let mut args = vec!["send", "--to", &addr, "--bytes"];
        let bytes_text = bytes.to_string();
        args.push(&bytes_text);
        args.extend_from_slice(extra);
        let out = self.output_in(&from.netns, bin("fm-peer"), &args);
        assert!(
            out.status.success(),
            "transfer of {bytes} bytes {} -> {addr} failed: {}{}",
            from.name,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let result: Value = serde_json::from_slice(&out.stdout).expect("send JSON");
        assert_eq!(result["match"], true, "{result}");
        result
    }

    /// Starts an iperf3 server on `pod`'s IP (label `iperf3-<pod>`) and waits until it listens.
    pub fn start_iperf3_server(&self, pod: &Pod) {
        let label = format!("iperf3-{}", pod.name);
        let mut server = self.command_in(&pod.netns, "iperf3");
        server.args(["-s", "--forceflush", "-B", &pod.ip.to_string()]);
        self.spawn(&label, server);
        wait_until(Duration::from_secs(5), "iperf3 to listen", || self.log(&label).contains("Server listening"));
    }

    /// Starts a long-lived echo client from `from` to `to` doing `count` round trips, and waits
    /// until its first round trip is done; returns its label for [`Topology::wait_success`].
    pub fn start_ping(&self, label: &str, from: &Pod, to: Ipv4Addr, count: u32) -> String {
        let addr = SocketAddr::from((to, ECHO_PORT)).to_string();
        let mut cmd = self.command_in(&from.netns, bin("fm-peer"));
        cmd.args(["ping", "--to", &addr, "--count", &count.to_string(), "--interval-ms", "100"]);
        self.spawn(label, cmd);
        wait_until(Duration::from_secs(10), &format!("{label} to connect"), || {
            assert!(self.is_running(label) || self.log(label).contains("ok "), "{label} failed: {}", self.log(label));
            self.log(label).contains("first round trip ok")
        });
        label.to_string()
    }

    /// Waits for the process `label` to end and asserts it succeeded.
    pub fn wait_success(&self, label: &str, timeout: Duration) {
        wait_until(timeout, &format!("{label} to finish"), || !self.is_running(label));
        assert!(self.log(label).contains("ok "), "{label} failed: {}", self.log(label));
    }
}

/// A tcpdump capture running in a network namespace (see [`Topology::start_capture`]).
#[derive(Debug)]
pub struct Capture {
    label: String,
    /// The pcap file it writes.
    pub pcap: PathBuf,
}

impl Topology {
    /// Starts tcpdump on `iface` in `netns`, writing every TCP and ICMP packet to
    /// `<dir>/<label>.pcap` as it is seen, and waits until it listens.
    pub fn start_capture(&self, label: &str, netns: &str, iface: &str) -> Capture {
        let pcap = self.dir.join(format!("{label}.pcap"));
        let mut cmd = self.command_in(netns, "tcpdump");
        cmd.args(["-i", iface, "-n", "-U", "-B", "32768", "-s", "0", "-w"]).arg(&pcap).args(["tcp", "or", "icmp"]);
        self.spawn(label, cmd);
        wait_until(Duration::from_secs(10), &format!("{label} to listen"), || self.log(label).contains("listening on"));
        Capture { label: label.to_string(), pcap }
    }

    /// Stops `capture` once every packet seen before now is in its file: pings `to` from
    /// `from_netns` (a marker crossing the captured device) until tcpdump has written an ICMP
    /// packet, then interrupts it. Packets are written in the order they are seen.
    pub fn stop_capture(&self, capture: &Capture, from_netns: &str, to: Ipv4Addr) {
        wait_until(Duration::from_secs(10), &format!("{} to write the ICMP marker", capture.label), || {
            self.output_in(from_netns, "ping", &["-c", "1", "-W", "1", &to.to_string()]);
            let read = self.output_in(from_netns, "tcpdump", &["-n", "-r", capture.pcap.to_str().unwrap(), "icmp"]);
            !read.stdout.is_empty()
        });
        self.signal_and_wait(&capture.label, libc::SIGINT);
    }

    /// The TCP packets of a stopped capture, one line each as `tcpdump -r` prints them.
    pub fn captured_tcp(&self, capture: &Capture) -> Vec<String> {
        let read = self.output_in(&self.fabric, "tcpdump", &["-n", "-r", capture.pcap.to_str().unwrap(), "tcp"]);
        String::from_utf8_lossy(&read.stdout).lines().map(str::to_string).collect()
    }
}

/// CPU seconds (user + system) used by `pid` so far.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at field 3.
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or_default();
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    // utime and stime are fields 14 and 15 of /proc/<pid>/stat: 11 and 12 after the name.
    // The tick rate of user-visible clocks is USER_HZ, 100 on every mainstream architecture.
    (ticks(11) + ticks(12)) / 100.0
}

/// One namespace of the scale cluster: 100 pods (5 per service, on node `node`, IPs from
/// 10.100.0.0 up) and 20 ClusterIP services, enrolled; 100 of them make 10k pods and 2k services.
pub fn scale_namespace_yaml(ns: usize, node: &str) -> String {
    let mut text = format!(
        "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: ns{ns}\n  labels:\n    ferrymesh.io/dataplane-mode: enabled\n"
    );
    for i in 0..100 {
        let n = ns * 100 + i;
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata:\n  name: p{n}\n  namespace: ns{ns}\n  uid: 00000000-0000-0000-0000-{n:012}\n  labels:\n    app: s{}\nspec:\n  nodeName: {node}\n  serviceAccountName: sa{i}\n  containers:\n  - name: app\n    image: x\nstatus:\n  podIP: 10.{}.{}.{}\n",
            i / 5,
            100 + n / 65536,
            (n / 256) % 256,
            n % 256
        ));
    }
    for s in 0..20 {
        let vip = ns * 20 + s;
        text.push_str(&format!(
            "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: s{s}\n  namespace: ns{ns}\nspec:\n  clusterIP: 10.96.{}.{}\n  selector:\n    app: s{s}\n  ports:\n  - port: 80\n    targetPort: 8080\n",
            vip / 256,
            vip % 256
        ));
    }
    text
}

/// Port of the fm-echo HTTP backend.
pub const ECHO_HTTP_PORT: u16 = 8081;
/// Port of the in-test rate-limit service on the fabric.
pub const RLS_PORT: u16 = 18081;
/// Port of the in-test JWKS server on the fabric.
pub const JWKS_PORT: u16 = 18082;
/// Port of the in-test OTLP collector on the fabric.
pub const OTLP_PORT: u16 = 18083;
/// Label naming a waypoint pod's Gateway.
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";

impl Topology {
    /// Writes Gateway `namespace/name` of class `ferrymesh-waypoint` (an HBONE listener on
    /// 15008): a waypoint for Services.
    pub fn write_waypoint(&self, namespace: &str, name: &str) {
        self.write_waypoint_for(namespace, name, "service");
    }

    /// Writes the Gateway of waypoint `namespace/name` taking `traffic`
    /// (`ferrymesh.io/waypoint-for`: `service`, `workload`, `all` or `none`).
    pub fn write_waypoint_for(&self, namespace: &str, name: &str, traffic: &str) {
        let text = format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\n  namespace: {namespace}\n  labels:\n    ferrymesh.io/waypoint-for: {traffic}\nspec:\n  gatewayClassName: ferrymesh-waypoint\n  listeners:\n  - name: mesh\n    port: 15008\n    protocol: HBONE\n"
        );
        self.write_config_file(&format!("gateway-{namespace}-{name}.yaml"), &text);
    }

    /// Writes `pod` as the pod of the waypoint of its name (labelled with the Gateway's name,
    /// running as the service account of that name, as a Gateway's deployment does).
    pub fn write_waypoint_pod(&self, pod: &Pod) {
        self.write_waypoint_replica(pod, &pod.name);
    }

    /// Writes `pod` as a pod (one replica) of waypoint `gateway`, in its namespace.
    pub fn write_waypoint_replica(&self, pod: &Pod, gateway: &str) {
        let text = self.pod_yaml_as(pod, &[(GATEWAY_NAME_LABEL, gateway)], gateway);
        self.write_config_file(&format!("pod-{}-{}.yaml", pod.namespace, pod.name), &text);
    }

    /// Starts mesh-waypoint in `pod` (label `waypoint-<name>`) as the waypoint named like the
    /// pod, with its node's token, and waits until it serves.
    pub fn start_waypoint(&self, pod: &Pod) {
        self.start_waypoint_replica(pod, &pod.name, &[]);
    }

    /// Starts mesh-waypoint in `pod` (label `waypoint-<pod name>`) as a replica of waypoint
    /// `gateway` with the `extra` arguments, and waits until it serves.
    pub fn start_waypoint_replica(&self, pod: &Pod, gateway: &str, extra: &[&str]) {
        let label = format!("waypoint-{}", pod.name);
        let mut cmd = self.command_in(&pod.netns, bin("mesh-waypoint"));
        cmd.args(["--namespace", &pod.namespace, "--name", gateway])
            .args(["--node-name", &format!("node{}", pod.node), "--pod-ip", &pod.ip.to_string()])
            .args(["--ctrl", &self.ctrl_address()])
            .arg("--ca-root")
            .arg(self.ca_root())
            .arg("--token-file")
            .arg(self.token_file(pod.node))
            .args(extra);
        self.spawn(&label, cmd);
        let start = Instant::now();
        while !self.log(&label).contains("mesh-waypoint serving") {
            assert!(self.is_running(&label), "{label} exited: {}", self.log(&label));
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "{label} is not serving after 20s: {}",
                self.log(&label)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the in-test rate-limit service (`fm-echo rls-serve`, label `rls`) on the fabric,
    /// where pods reach it as they reach mesh-ctrl, and returns its URL for
    /// `mesh-waypoint --rate-limit-service`.
    pub fn serve_rate_limit_service(&self) -> String {
        let listen = format!("{FABRIC_IP}:{RLS_PORT}");
        let mut cmd = self.command_in(&self.fabric, bin("fm-echo"));
        cmd.args(["rls-serve", "--listen", &listen]);
        self.spawn("rls", cmd);
        wait_until(Duration::from_secs(10), "the rate-limit service to listen", || {
            assert!(self.is_running("rls"), "rls exited: {}", self.log("rls"));
            self.log("rls").contains("ready")
        });
        format!("http://{listen}")
    }

    /// Starts the in-test JWKS server (`fm-echo file-serve`, label `jwks`) on the fabric,
    /// serving `jwks` (see [`Topology::write_jwks`]), and returns its URL for a
    /// RequestAuthentication's `jwksUri`.
    pub fn serve_jwks(&self, jwks: &str) -> String {
        self.write_jwks(jwks);
        let listen = format!("{FABRIC_IP}:{JWKS_PORT}");
        let mut cmd = self.command_in(&self.fabric, bin("fm-echo"));
        cmd.args(["file-serve", "--listen", &listen, "--file"]).arg(self.dir.join("jwks.json"));
        self.spawn("jwks", cmd);
        wait_until(Duration::from_secs(10), "the JWKS server to listen", || {
            assert!(self.is_running("jwks"), "jwks exited: {}", self.log("jwks"));
            self.log("jwks").contains("ready")
        });
        format!("http://{listen}/jwks.json")
    }

    /// Replaces what the JWKS server serves (a key rotation at the issuer).
    pub fn write_jwks(&self, jwks: &str) {
        let tmp = self.dir.join(".jwks.json.tmp");
        std::fs::write(&tmp, jwks).expect("write jwks");
        std::fs::rename(&tmp, self.dir.join("jwks.json")).expect("rename jwks");
    }

    /// Starts the in-test OTLP collector (`fm-echo otlp-serve`, label `otlp`) on the fabric and
    /// returns its URL for `mesh-waypoint --tracing-collector`.
    pub fn serve_otlp(&self) -> String {
        let listen = format!("{FABRIC_IP}:{OTLP_PORT}");
        let mut cmd = self.command_in(&self.fabric, bin("fm-echo"));
        cmd.args(["otlp-serve", "--listen", &listen]);
        self.spawn("otlp", cmd);
        wait_until(Duration::from_secs(10), "the OTLP collector to listen", || {
            assert!(self.is_running("otlp"), "otlp exited: {}", self.log("otlp"));
            self.log("otlp").contains("ready")
        });
        format!("http://{listen}")
    }

    /// The spans the in-test collector received, one JSON value each.
    pub fn otlp_spans(&self) -> Vec<Value> {
        self.log("otlp").lines().filter(|l| l.starts_with('{')).filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The fetches the JWKS server answered, one JSON value each (`from`, `path`).
    pub fn jwks_fetches(&self) -> Vec<Value> {
        self.log("jwks").lines().filter(|l| l.starts_with('{')).filter_map(|l| serde_json::from_str(l).ok()).collect()
    }

    /// The checks the in-test rate-limit service answered, one JSON value each.
    pub fn rate_limit_checks(&self) -> Vec<Value> {
        self.log_lines("rls")
            .iter()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("check line {l:?}: {e}")))
            .collect()
    }

    /// The Prometheus text served on `127.0.0.1:15020/metrics` inside `netns` (an agent's node,
    /// or a waypoint's pod); empty when nothing answers.
    pub fn metrics_text(&self, netns: &str) -> String {
        let out = self.output_in(netns, "curl", &["-sS", "--max-time", "3", "http://127.0.0.1:15020/metrics"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The request records the waypoint in `pod` has logged, one JSON value each.
    pub fn waypoint_requests(&self, pod: &Pod) -> Vec<Value> {
        self.log_lines(&format!("waypoint-{}", pod.name))
            .iter()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("request line {l:?}: {e}")))
            .collect()
    }

    /// Starts the fm-echo HTTP backend in `pod` on [`ECHO_HTTP_PORT`], logging each request
    /// (see [`Topology::echo_requests`]), and waits until it listens.
    pub fn serve_echo(&self, pod: &Pod) {
        self.serve_echo_with(pod, true);
    }

    /// [`Topology::serve_echo`], logging each request or not (a benchmark's backend does not).
    pub fn serve_echo_with(&self, pod: &Pod, log_requests: bool) {
        let label = format!("echo-{}-{}", pod.namespace, pod.name);
        let mut cmd = self.command_in(&pod.netns, bin("fm-echo"));
        cmd.args(["serve", "--pod", &pod.name, "--namespace", &pod.namespace]);
        if log_requests {
            cmd.arg("--log-requests");
        }
        self.spawn(&label, cmd);
        wait_until(Duration::from_secs(10), &format!("{label} to listen"), || {
            assert!(self.is_running(&label), "{label} exited: {}", self.log(&label));
            self.log(&label).contains("ready")
        });
    }
}

impl Topology {
    /// The requests the fm-echo backend of `pod` answered, as it echoed them.
    pub fn echo_requests(&self, pod: &Pod) -> Vec<Value> {
        self.log_lines(&format!("echo-{}-{}", pod.namespace, pod.name))
            .iter()
            .filter(|l| l.starts_with('{'))
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("echo line {l:?}: {e}")))
            .collect()
    }
}

/// Port of the fm-echo gRPC server.
pub const ECHO_GRPC_PORT: u16 = 9090;

impl Topology {
    /// Starts the fm-echo gRPC server in `pod` on [`ECHO_GRPC_PORT`] and waits until it listens.
    pub fn serve_grpc(&self, pod: &Pod) {
        let label = format!("grpc-{}-{}", pod.namespace, pod.name);
        let mut cmd = self.command_in(&pod.netns, bin("fm-echo"));
        cmd.args(["grpc-serve", "--pod", &pod.name]);
        self.spawn(&label, cmd);
        wait_until(Duration::from_secs(10), &format!("{label} to listen"), || {
            assert!(self.is_running(&label), "{label} exited: {}", self.log(&label));
            self.log(&label).contains("ready")
        });
    }
}

/// An HTTP response as curl printed it.
#[derive(Debug)]
pub struct HttpAnswer {
    /// Status code (0 when curl failed).
    pub status: u16,
    /// Header names (lowercase) and values.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: String,
    /// curl's error output.
    pub error: String,
}

impl HttpAnswer {
    /// The first value of header `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The body as JSON (an fm-echo answer).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("body is not JSON ({e}): {self:?}"))
    }
}

impl Topology {
    /// One request with curl from `from` to `url` with extra curl `args`; the final answer.
    pub fn http(&self, from: &Pod, url: &str, args: &[&str]) -> HttpAnswer {
        let mut all = vec!["-sS", "-i", "--max-time", "10"];
        all.extend_from_slice(args);
        all.push(url);
        let out = self.output_in(&from.netns, "curl", &all);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let error = String::from_utf8_lossy(&out.stderr).into_owned();
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
        let mut lines = head.lines();
        let status = lines.next().and_then(|l| l.split_whitespace().nth(1)).and_then(|s| s.parse().ok()).unwrap_or(0);
        let headers = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
            .collect();
        HttpAnswer { status, headers, body: body.to_string(), error }
    }

    /// `count` requests with one curl from `from` to `url` (one connection, kept alive; HTTP/2
    /// multiplexed with `--http2-prior-knowledge` in `args`): the pod named in each answer.
    pub fn echo_pods(&self, from: &Pod, url: &str, count: usize, args: &[&str]) -> Vec<String> {
        let mut all = vec!["-sS", "--max-time", "60", "-w", "\\n"];
        all.extend_from_slice(args);
        all.extend(std::iter::repeat_n(url, count));
        let out = self.output_in(&from.netns, "curl", &all);
        assert!(out.status.success(), "curl {url} x{count}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("answer {l:?}: {e}"));
                v["pod"].as_str().unwrap_or_default().to_string()
            })
            .collect()
    }
}
