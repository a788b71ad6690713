//! End-to-end lifecycle tests: agent exit leaves nothing attached (checked by the kernel's own
//! listings through bpftool, independently of the agent), and bad config is rejected by name
//! while the last good config keeps being served. Needs root.
//!
//! The kernel listings are node-wide, so the tests of this file run one at a time: no other
//! agent of this binary loads or drops programs while one test compares them.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ferrymesh_testbed::mesh::{bin, wait_until, CONFIG_WAIT, DATAPLANE_MODE, FLOW_WAIT, HTTP_PORT};
use ferrymesh_testbed::{Topology, TopologySpec};
use serde_json::Value;

static KERNEL: Mutex<()> = Mutex::new(());

/// Holds the node's eBPF state for one test of this file.
fn serial() -> MutexGuard<'static, ()> {
    KERNEL.lock().unwrap_or_else(|e| e.into_inner())
}

fn spec() -> TopologySpec {
    TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "b", 1).pod("shop", "c", 2).pod("legacy", "x", 1)
}

fn cluster() -> Topology {
    let topo = Topology::build(&spec());
    topo.write_cluster(&["shop"]);
    start(&topo);
    topo
}

fn start(topo: &Topology) {
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a", "shop/b"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["shop/c"], Duration::from_secs(10));
    topo.serve_all();
}

/// The kernel's eBPF state as bpftool lists it: programs (id, type, name), links (id, type,
/// attach type, program, netns inode) and the attachments of the cgroup2 tree (cgroup, program, type, name).
/// Fields that change while a program runs (run counts, times) are left out.
#[derive(Debug, PartialEq, Eq)]
struct KernelBpf {
    programs: BTreeSet<String>,
    links: BTreeSet<String>,
    cgroup_tree: BTreeSet<String>,
}

fn bpftool(args: &[&str]) -> Vec<Value> {
    let out = std::process::Command::new("bpftool").arg("-j").args(args).output().expect("run bpftool");
    assert!(out.status.success(), "bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    if text.trim().is_empty() {
        return Vec::new();
    }
    serde_json::from_str::<Vec<Value>>(&text).unwrap_or_else(|e| panic!("bpftool {args:?} JSON: {e}: {text}"))
}

fn cgroup2_root() -> String {
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap();
    mounts
        .lines()
        .find_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 2 && f[2] == "cgroup2").then(|| f[1].to_string())
        })
        .expect("a cgroup2 mount")
}

fn kernel_bpf() -> KernelBpf {
    let field = |v: &Value, k: &str| v.get(k).map(|x| x.to_string()).unwrap_or_default();
    let programs = bpftool(&["prog", "list"])
        .iter()
        .map(|p| format!("prog {} {} {}", field(p, "id"), field(p, "type"), field(p, "name")))
        .collect();
    let links = bpftool(&["link", "list"])
        .iter()
        .map(|l| {
            format!(
                "link {} {} {} prog {} netns {}",
                field(l, "id"),
                field(l, "type"),
                field(l, "attach_type"),
                field(l, "prog_id"),
                field(l, "netns_ino")
            )
        })
        .collect();
    let mut cgroup_tree = BTreeSet::new();
    for cgroup in bpftool(&["cgroup", "tree", &cgroup2_root()]) {
        for attached in cgroup["programs"].as_array().into_iter().flatten() {
            cgroup_tree.insert(format!(
                "{} {} {} {}",
                field(&cgroup, "cgroup"),
                field(attached, "id"),
                field(attached, "attach_type"),
                field(attached, "name")
            ));
        }
    }
    KernelBpf { programs, links, cgroup_tree }
}

/// Inode of a named network namespace (what bpftool shows as a link's `netns_ino`).
fn netns_inode(pod: &ferrymesh_testbed::Pod) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(pod.netns_path()).expect("pod netns").ino()
}

/// Kernel ids of every bpf link and program that exists now (BPF_*_GET_NEXT_ID listings).
fn kernel_ids() -> (BTreeSet<u32>, BTreeSet<u32>) {
    let links = aya::programs::loaded_links().filter_map(Result::ok).map(|l| l.id()).collect();
    let programs = aya::programs::loaded_programs().filter_map(Result::ok).map(|p| p.id()).collect();
    (links, programs)
}

/// Link and program ids an agent reports holding.
fn agent_ids(status: &Value) -> (BTreeSet<u32>, BTreeSet<u32>) {
    let programs = status["programs"].as_array().expect("programs");
    let links = programs
        .iter()
        .flat_map(|p| p["link_ids"].as_array().expect("link_ids").iter().map(|id| id.as_u64().unwrap() as u32))
        .collect();
    let ids = programs.iter().map(|p| p["id"].as_u64().unwrap() as u32).collect();
    (links, ids)
}

#[test]
fn agent_exit_leaves_no_attachment_and_traffic_flows_directly() {
    let _serial = serial();
    let topo = Topology::build(&spec());
    topo.write_cluster(&["shop"]);
    let before = kernel_bpf();
    start(&topo);
    // While the agents run, bpftool sees their programs by name, attached at the cgroup2 root,
    // and an sk_lookup link in each enrolled pod's netns.
    let running = kernel_bpf();
    assert_ne!(running, before, "the listings show the running agents");
    let ours = |set: &BTreeSet<String>| set.iter().filter(|l| l.contains("\"fm_")).count();
    assert_eq!(ours(&running.programs) - ours(&before.programs), 12, "6 fm_ programs per agent: {running:?}");
    assert_eq!(ours(&running.cgroup_tree) - ours(&before.cgroup_tree), 10, "5 per agent at the root: {running:?}");
    let enrolled_pods = [topo.pod("shop", "a"), topo.pod("shop", "b"), topo.pod("shop", "c")];
    for pod in enrolled_pods {
        let netns = format!("netns {}", netns_inode(pod));
        assert!(
            running.links.iter().any(|l| l.contains("sk_lookup") && l.ends_with(&netns)),
            "{}'s netns has an sk_lookup link: {:?}",
            pod.name,
            running.links
        );
    }
    let unenrolled = format!("netns {}", netns_inode(topo.pod("legacy", "x")));
    assert!(!running.links.iter().any(|l| l.ends_with(&unenrolled)), "nothing is attached to x's netns");
    for (node, signal, name) in [(1u8, libc::SIGTERM, "SIGTERM"), (2, libc::SIGKILL, "SIGKILL")] {
        let (links, programs) = agent_ids(&topo.status(node));
        // 5 cgroup links plus one sk_lookup link per enrolled pod; 6 programs.
        let enrolled = if node == 1 { 2 } else { 1 };
        assert_eq!(links.len(), 5 + enrolled, "node{node} links {links:?}");
        assert_eq!(programs.len(), 6, "node{node} programs {programs:?}");
        let (live_links, live_programs) = kernel_ids();
        assert!(
            links.is_subset(&live_links) && programs.is_subset(&live_programs),
            "the kernel lists the agent's links and programs"
        );

        let status = topo.signal_and_wait(&format!("agent-node{node}"), signal);
        if signal == libc::SIGTERM {
            assert!(status.success(), "agent exits cleanly on SIGTERM: {status}");
        }
        wait_until(
            Duration::from_secs(5),
            &format!("the kernel to drop the links of the agent killed by {name}"),
            || {
                let (live_links, live_programs) = kernel_ids();
                live_links.is_disjoint(&links) && live_programs.is_disjoint(&programs)
            },
        );
    }
    assert!(!std::path::Path::new("/sys/fs/bpf/ferrymesh").exists(), "nothing is pinned");
    assert!(!topo.agent_socket(1).exists(), "the admin socket is removed on SIGTERM");
    // The kernel's own listings are as they were before the agents started: no program, link
    // or cgroup attachment, and no sk_lookup link in any pod netns, is left.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut after = kernel_bpf();
    while after != before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = kernel_bpf();
    }
    assert_eq!(after, before, "bpftool's listings after both agents exited, against before they started");

    // No agent anywhere: pods talk directly and servers see the real client.
    let (a, b, c, x) = (topo.pod("shop", "a"), topo.pod("shop", "b"), topo.pod("shop", "c"), topo.pod("legacy", "x"));
    for (from, to) in [(a, b), (a, c), (x, c)] {
        let body = topo.curl(from, to.ip);
        assert!(body.starts_with(&format!("client {}:", from.ip)), "{} -> {}: {body}", from.name, to.name);
    }
    topo.send(a, c.ip, 10 * 1024 * 1024);
}

fn ctrl_log_has(topo: &Topology, text: &str) -> bool {
    topo.log("mesh-ctrl").contains(text)
}

#[test]
fn invalid_config_is_rejected_by_name_and_the_last_good_config_keeps_serving() {
    let _serial = serial();
    let topo = cluster();
    let (a, c) = (topo.pod("shop", "a"), topo.pod("shop", "c"));
    let version = topo.status(1)["config_version"].as_u64().unwrap();
    let good = topo.pod_yaml(a, &[]);
    let file = topo.config_dir().join("pod-shop-a.yaml");
    let file = file.display();
    let cases = [
        ("invalid YAML", "apiVersion: v1\nkind: Pod\nmetadata: [a\n".to_string(), format!("{file}: invalid YAML")),
        (
            "unknown field",
            good.replace("  nodeName:", "  hostNetwrk: true\n  nodeName:"),
            format!("{file}: Pod shop/a: field spec.hostNetwrk: unknown field"),
        ),
        (
            "missing podIP",
            good.replace(&format!("status:\n  podIP: {}\n", a.ip), ""),
            format!("{file}: Pod shop/a: field status.podIP: missing"),
        ),
    ];
    for (what, text, message) in cases {
        topo.write_config_file("pod-shop-a.yaml", &text);
        wait_until(Duration::from_secs(5), &format!("mesh-ctrl to reject the {what}"), || {
            ctrl_log_has(&topo, &message)
        });

        let check = std::process::Command::new(bin("mesh-ctrl"))
            .arg("--check")
            .arg("--config-dir")
            .arg(topo.config_dir())
            .output()
            .unwrap();
        assert_eq!(check.status.code(), Some(1), "{what}: --check fails");
        assert!(
            String::from_utf8_lossy(&check.stderr).contains(&message),
            "{what}: --check names it: {}",
            String::from_utf8_lossy(&check.stderr)
        );

        // The last good config is still served: same version, a still enrolled and captured.
        assert_eq!(topo.status(1)["config_version"].as_u64().unwrap(), version, "{what}: no new version");
        assert_eq!(topo.enrolled(1), ["shop/a", "shop/b"], "{what}");
        let before = topo.flows(1).len();
        topo.curl(a, c.ip);
        wait_until(FLOW_WAIT, &format!("{what}: a's connection to be captured"), || {
            topo.flows(1).iter().skip(before).any(|f| f["direction"] == "outbound" && f["dst"]["port"] == HTTP_PORT)
        });
    }
    // A good change still lands, within a second.
    topo.write_pod(a, &[(DATAPLANE_MODE, "none")]);
    topo.wait_enrolled(1, &["shop/b"], CONFIG_WAIT);
}

/// Pod YAML without the netns annotation: the agent must find the netns by the pod's cgroup.
fn without_netns_annotation(topo: &Topology, pod: &ferrymesh_testbed::Pod) -> String {
    topo.pod_yaml(pod, &[])
        .replace(&format!("  annotations:\n    ferrymesh.io/netns: {}\n", pod.netns_path().display()), "")
}

#[test]
fn pod_netns_is_found_by_the_pod_uid_cgroup_also_for_late_pods_and_after_a_restart() {
    let _serial = serial();
    let spec = TopologySpec::nodes(1).pod("shop", "a", 1).pod("shop", "late", 1).pod("legacy", "x", 1);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    let (a, late, x) = (topo.pod("shop", "a"), topo.pod("shop", "late"), topo.pod("legacy", "x"));
    for pod in [a, late] {
        let yaml = without_netns_annotation(&topo, pod);
        assert!(!yaml.contains("ferrymesh.io/netns"));
        topo.write_config_file(&format!("pod-shop-{}.yaml", pod.name), &yaml);
    }
    // The kubelet's cgroup of a pod names its UID; the harness's pods have UID uid-<netns>.
    let cgroup_a = topo.pod_cgroup(&format!("uid-{}", a.netns));
    topo.serve_in_cgroup(a, &cgroup_a);
    topo.serve(x);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a"], Duration::from_secs(10));
    // late's process starts after the agent: it is enrolled once it runs.
    let cgroup_late = topo.pod_cgroup(&format!("uid-{}", late.netns));
    topo.serve_in_cgroup(late, &cgroup_late);
    topo.wait_enrolled(1, &["shop/a", "shop/late"], Duration::from_secs(5));
    // The discovered netns is the right one: plaintext to a is captured there, with the real IP.
    let body = topo.curl(x, a.ip);
    assert!(body.starts_with(&format!("client {}:", x.ip)), "{body}");
    assert!(topo.flows(1).iter().any(|f| f["direction"] == "inbound" && f["dst"]["ip"] == a.ip.to_string()));
    // After an agent restart the pods are found again.
    topo.signal_and_wait("agent-node1", libc::SIGTERM);
    topo.start_agent(1);
    topo.wait_enrolled(1, &["shop/a", "shop/late"], Duration::from_secs(5));
    topo.curl(x, late.ip);
    assert!(topo.flows(1).iter().any(|f| f["direction"] == "inbound" && f["dst"]["ip"] == late.ip.to_string()));
}
