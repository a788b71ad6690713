//! End-to-end lifecycle tests: a dead agent leaves its pods closed and the next one adopts
//! them, uninstall leaves nothing attached (checked by the kernel's own listings through
//! bpftool, independently of the agent), pins of another layout are refused, and bad config
//! is rejected by name while the last good config keeps being served. Needs root.
//!
//! The kernel listings are node-wide, so the tests of this file run one at a time: no other
//! agent of this binary loads or drops programs while one test compares them.

use std::collections::BTreeSet;
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use ferrymesh_testbed::mesh::{
    bin, wait_until, CONFIG_WAIT, DATAPLANE_MODE, FLOW_WAIT, HTTP_PORT, SINK_PORT, VECTOR_MEMCPY,
};
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
/// attach type, program, netns inode), the attachments of the cgroup2 tree (cgroup, program,
/// type, name) and maps (id, type, name). Fields that change while a program runs (run
/// counts, times) are left out.
#[derive(Debug, PartialEq, Eq)]
struct KernelBpf {
    programs: BTreeSet<String>,
    links: BTreeSet<String>,
    cgroup_tree: BTreeSet<String>,
    maps: BTreeSet<String>,
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
    let maps = bpftool(&["map", "list"])
        .iter()
        .map(|m| format!("map {} {} {}", field(m, "id"), field(m, "type"), field(m, "name")))
        .collect();
    KernelBpf { programs, links, cgroup_tree, maps }
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

/// curl from `from` to `to`'s HTTP responder: (curl's exit code, how long it took).
fn try_curl(topo: &Topology, from: &ferrymesh_testbed::Pod, to: std::net::Ipv4Addr) -> (Option<i32>, Duration) {
    let started = std::time::Instant::now();
    let url = format!("http://{to}:{HTTP_PORT}/");
    let out = topo.output_in(&from.netns, "curl", &["-sS", "--max-time", "10", &url]);
    (out.status.code(), started.elapsed())
}

/// curl's exit code for "Failed to connect" (refused, or EPERM from connect()).
const CURL_COULDNT_CONNECT: i32 = 7;

/// The files pinned under an agent's bpf directory, relative to it.
fn pinned(dir: &std::path::Path) -> BTreeSet<String> {
    ["maps", "links", "netns"]
        .iter()
        .flat_map(|sub| {
            std::fs::read_dir(dir.join(sub))
                .into_iter()
                .flatten()
                .map(move |e| format!("{sub}/{}", e.unwrap().file_name().to_string_lossy()))
        })
        .collect()
}

#[test]
fn a_killed_agent_leaves_its_pods_closed_and_the_next_agent_adopts_them() {
    let _serial = serial();
    let spec = spec().pod("legacy", "y", 2);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    let strict = "apiVersion: ferrymesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: shop\nspec:\n  mtls:\n    mode: STRICT\n";
    topo.write_config_file("strict.yaml", strict);
    start(&topo);
    let (a, c, x, y) = (topo.pod("shop", "a"), topo.pod("shop", "c"), topo.pod("legacy", "x"), topo.pod("legacy", "y"));
    let c_cookie = topo.status(2)["enrolled"][0]["netns_cookie"].as_u64().unwrap();
    let pins = pinned(&topo.bpf_dir(2));
    let want: BTreeSet<String> = [
        "maps/APP_DIALS",
        "maps/AGENT_DIALS",
        "maps/CAPTURES",
        "maps/COUNTERS",
        "maps/ENROLLED",
        "maps/INBOUND_LISTENERS",
        "maps/ORIG_BY_COOKIE",
        "maps/ORIG_BY_PORT",
        "links/fm_connect4",
        "links/fm_connect6",
        "links/fm_peer4",
        "links/fm_peer6",
        "links/fm_orig_dst",
        "links/fm_release",
    ]
    .into_iter()
    .map(String::from)
    .chain([format!("netns/{c_cookie}")])
    .collect();
    assert_eq!(pins, want, "node2's pins");
    let fresh = topo.status(2);
    assert_eq!((fresh["adopted_links"].as_u64(), fresh["adopted_maps"].as_array().map(Vec::len)), (Some(0), Some(0)));
    let (links, _) = agent_ids(&fresh);

    topo.signal_and_wait("agent-node2", libc::SIGKILL);
    // The kernel still holds node2's links: pinned, not owned by the dead process.
    let (live_links, _) = kernel_ids();
    assert!(links.is_subset(&live_links), "node2's links outlive its agent: {links:?} vs {live_links:?}");
    // Plaintext from an unenrolled pod to the STRICT pod c: refused at once, not hung.
    let (code, took) = try_curl(&topo, x, c.ip);
    assert_eq!(code, Some(CURL_COULDNT_CONNECT), "x -> c with node2's agent down must be refused");
    assert!(took < Duration::from_secs(5), "refused, not hung: {took:?}");
    // c's own outbound connect fails at once too.
    let (code, took) = try_curl(&topo, c, a.ip);
    assert_eq!(code, Some(CURL_COULDNT_CONNECT), "c -> a with its agent down must fail to connect");
    assert!(took < Duration::from_secs(5), "refused, not hung: {took:?}");
    // An unenrolled pod on that node is untouched.
    let body = topo.curl(y, x.ip);
    assert!(body.starts_with(&format!("client {}:", y.ip)), "y -> x: {body}");
    // The same for IPv6: refused to and from c at once, untouched between unenrolled pods.
    for (from, to) in [(x, c), (c, a)] {
        let (code, text, took) = topo.try_curl(from, to.ip6.into());
        assert_eq!(code, Some(CURL_COULDNT_CONNECT), "{} -> {} over IPv6 must be refused: {text}", from.name, to.name);
        assert!(took < Duration::from_secs(5), "refused, not hung: {took:?}");
    }
    let (code, body, _) = topo.try_curl(y, x.ip6.into());
    assert_eq!(code, Some(0), "y -> x over IPv6: {body}");
    assert!(body.starts_with(&format!("client [{}]:", y.ip6)), "{body}");

    // The next agent adopts the pins: every pod works again, nothing enrolled by hand.
    topo.start_agent(2);
    topo.wait_enrolled(2, &["shop/c"], Duration::from_secs(10));
    let status = topo.status(2);
    assert_eq!(status["adopted_links"], 6, "{status}");
    assert_eq!(status["adopted_maps"].as_array().map(Vec::len), Some(8), "{status}");
    assert_eq!(status["enrolled"][0]["adopted"], true, "c's sk_lookup link was adopted: {status}");
    assert_eq!(status["enrolled"][0]["netns_cookie"], c_cookie);
    assert_eq!(pinned(&topo.bpf_dir(2)), want, "the same pins, no second copy");
    let (new_links, _) = agent_ids(&status);
    assert_eq!(new_links, links, "the same kernel links, now running the new agent's programs");
    assert!(status["counters"]["inbound_refused"].as_u64() >= Some(1), "{status}");
    let metrics = ferrymesh_testbed::prom::parse(&topo.metrics_text(&topo.nodes[1].netns)).expect("Prometheus text");
    assert_eq!(metrics.sum("ferrymesh_ebpf_adopted_objects", &[("kind", "link")]), 6.0);
    assert!(topo.log("agent-node2").contains("adopted the eBPF state an earlier agent pinned"));
    for (from, to) in [(a, c), (c, a)] {
        let body = topo.curl(from, to.ip);
        assert!(body.starts_with(&format!("client {}:", from.ip)), "{} -> {}: {body}", from.name, to.name);
        let (code, body, _) = topo.try_curl(from, to.ip6.into());
        assert_eq!(code, Some(0), "{} -> {} over IPv6 again: {body}", from.name, to.name);
        assert!(body.starts_with(&format!("client [{}]:", from.ip6)), "{} -> {}: {body}", from.name, to.name);
    }
    // STRICT is enforced by the agent again: x's plaintext reaches it and is denied by policy
    // (its reset looks like a refused connect to curl; the agent's record tells them apart).
    let (code, _) = try_curl(&topo, x, c.ip);
    assert_ne!(code, Some(0), "x -> c is denied");
    wait_until(FLOW_WAIT, "the STRICT deny of x's plaintext", || {
        topo.flows(2)
            .iter()
            .any(|f| f["verdict"] == "denied" && f["policy"] == "shop/strict" && f["src"]["ip"] == x.ip.to_string())
    });
}

#[test]
fn uninstall_removes_every_pinned_object_and_attachment() {
    let _serial = serial();
    let topo = Topology::build(&spec());
    topo.write_cluster(&["shop"]);
    let before = kernel_bpf();
    start(&topo);
    let running = kernel_bpf();
    let ours = |set: &BTreeSet<String>| set.iter().filter(|l| l.contains("\"fm_")).count();
    assert_eq!(ours(&running.programs) - ours(&before.programs), 14, "7 fm_ programs per agent: {running:?}");
    assert_eq!(ours(&running.cgroup_tree) - ours(&before.cgroup_tree), 12, "6 per agent at the root: {running:?}");
    for pod in [topo.pod("shop", "a"), topo.pod("shop", "b"), topo.pod("shop", "c")] {
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

    // Stopped agents leave everything attached, as the kernel lists it.
    for node in [1u8, 2] {
        let status = topo.signal_and_wait(&format!("agent-node{node}"), libc::SIGTERM);
        assert!(status.success(), "agent exits cleanly on SIGTERM: {status}");
    }
    assert!(!topo.agent_socket(1).exists(), "the admin socket is removed on SIGTERM");
    std::thread::sleep(Duration::from_millis(200));
    let stopped = kernel_bpf();
    assert_eq!(stopped.links, running.links, "no link went with the agents");
    assert_eq!(stopped.cgroup_tree, running.cgroup_tree, "no cgroup attachment went with the agents");

    // --uninstall, a process of its own, removes every pin; the kernel then frees everything.
    for node in [1u8, 2] {
        let dir = topo.bpf_dir(node);
        let out = topo.output_in(
            &topo.nodes[0].netns,
            bin("mesh-agent"),
            &["--uninstall", "--bpf-dir", dir.to_str().unwrap()],
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "uninstall: {}", String::from_utf8_lossy(&out.stderr));
        let objects = if node == 1 { 8 + 6 + 2 } else { 8 + 6 + 1 };
        assert_eq!(stdout.trim(), format!("removed {objects} pinned eBPF objects under {}", dir.display()));
        assert!(!dir.exists(), "{} is gone", dir.display());
        let again = topo.output_in(
            &topo.nodes[0].netns,
            bin("mesh-agent"),
            &["--uninstall", "--bpf-dir", dir.to_str().unwrap()],
        );
        assert!(again.status.success(), "uninstall twice: {}", String::from_utf8_lossy(&again.stderr));
        assert!(String::from_utf8_lossy(&again.stdout).starts_with("removed 0 pinned eBPF objects"));
    }
    // bpftool's listings (programs, links, cgroup attachments, maps) are as before the agents.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut after = kernel_bpf();
    while after != before && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        after = kernel_bpf();
    }
    assert_eq!(after, before, "bpftool's listings after uninstall, against before the agents started");

    // Nothing is captured any more: pods talk directly and servers see the real client.
    let (a, b, c, x) = (topo.pod("shop", "a"), topo.pod("shop", "b"), topo.pod("shop", "c"), topo.pod("legacy", "x"));
    for (from, to) in [(a, b), (a, c), (x, c)] {
        let body = topo.curl(from, to.ip);
        assert!(body.starts_with(&format!("client {}:", from.ip)), "{} -> {}: {body}", from.name, to.name);
    }
    topo.send(a, c.ip, 10 * 1024 * 1024);
}

#[test]
fn pins_of_another_layout_or_off_bpffs_are_refused_and_nothing_is_attached() {
    let _serial = serial();
    let topo = Topology::build(&TopologySpec::nodes(1).pod("shop", "a", 1));
    topo.write_cluster(&["shop"]);
    topo.start_ctrl(&[]);
    // A map an agent of another layout would have pinned: ENROLLED with 8-byte values.
    let dir = topo.bpf_dir(1);
    std::fs::create_dir_all(dir.join("maps")).unwrap();
    let map = dir.join("maps/ENROLLED");
    let out = std::process::Command::new("bpftool")
        .args(["map", "create"])
        .arg(&map)
        .args(["type", "hash", "key", "8", "value", "8", "entries", "4096", "name", "ENROLLED"])
        .output()
        .unwrap();
    assert!(out.status.success(), "bpftool map create: {}", String::from_utf8_lossy(&out.stderr));
    let before = kernel_bpf();
    let run = |overrides: &[(&str, &str)]| {
        let mut cmd = topo.agent_command(1, overrides);
        cmd.stdin(std::process::Stdio::null());
        let out = cmd.output().unwrap();
        assert!(!out.status.success(), "the agent must refuse to start");
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let refused = run(&[]);
    let want = format!(
        "pinned map {} has value size 8, this agent's layout needs 4: it was left by an incompatible ferrymesh version",
        map.display()
    );
    assert!(refused.contains(&want), "{refused}");
    assert_eq!(pinned(&dir), BTreeSet::from(["maps/ENROLLED".to_string()]), "nothing else was pinned");
    let off = topo.dir.join("not-bpffs");
    let refused = run(&[("--bpf-dir", off.to_str().unwrap())]);
    assert!(refused.contains(&format!("--bpf-dir {} is not on a bpf filesystem", off.display())), "{refused}");
    assert!(!off.exists(), "nothing was created under a directory off bpffs");
    assert_eq!(kernel_bpf(), before, "nothing was loaded or attached");
}

#[test]
fn agents_are_replaced_under_load_without_a_failed_connect_or_a_reset() {
    let _serial = serial();
    let topo = Topology::build(&TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "c", 2));
    topo.write_cluster(&["shop"]);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["shop/c"], Duration::from_secs(10));
    topo.serve_all();
    let (a, c) = (topo.pod("shop", "a"), topo.pod("shop", "c"));
    // 20 long-lived connections across the nodes, both ways, each streaming 5 MB at 250 kB/s
    // (about 20 s, longer than both replacements take) into a sink that checks its SHA-256.
    let mut streams = Vec::new();
    for i in 0..20 {
        let (from, to) = if i % 2 == 0 { (a, c) } else { (c, a) };
        let mut cmd = topo.command_in(&from.netns, bin("fm-peer"));
        cmd.args(["send", "--to", &format!("{}:{SINK_PORT}", to.ip), "--bytes", "5000000", "--rate", "250000"]);
        let label = format!("stream-{i}");
        topo.spawn(&label, cmd);
        streams.push(label);
    }
    // New connections across the nodes, both ways, back to back, one HTTP request each, until
    // the test stops them (each one's end is a line: `ok`, or `failed: <why>`).
    let mut hits = Vec::new();
    for (from, to) in [(a, c), (c, a)] {
        let mut cmd = topo.command_in(&from.netns, bin("fm-peer"));
        cmd.args(["hits", "--to", &format!("{}:{HTTP_PORT}", to.ip), "--count", "100000000", "--progress"]);
        let label = format!("hits-{}", from.name);
        topo.spawn(&label, cmd);
        hits.push(label);
    }
    let made = |label: &str| {
        let log = topo.log(label);
        let failed: Vec<String> = log.lines().filter(|l| !l.is_empty() && *l != "ok").map(String::from).collect();
        assert!(failed.is_empty(), "{label}: a connection failed: {failed:?}");
        log.lines().filter(|l| *l == "ok").count()
    };
    // Each steady client has made this many more connections: the load runs through the step.
    let more = |after: &str| {
        let from: Vec<usize> = hits.iter().map(|l| made(l)).collect();
        wait_until(Duration::from_secs(30), &format!("200 more connections each {after}"), || {
            hits.iter().zip(&from).all(|(label, before)| made(label) >= before + 200)
        });
    };
    let started = std::time::Instant::now();
    more("before the replacements");
    // Each node's agent is replaced by a new process while the load runs: the new one takes
    // over the pods' listeners, the old one stops accepting and drains.
    for node in [1u8, 2] {
        let next = format!("agent-node{node}-next");
        topo.spawn(&next, topo.agent_command(node, &[]));
        wait_until(Duration::from_secs(20), &format!("{next} to take over"), || {
            assert!(topo.is_running(&next), "{next} exited: {}", topo.log(&next));
            topo.log(&next).contains("took over from the previous agent")
        });
        let status = topo.status(node);
        assert_eq!(status["enrolled"].as_array().map(Vec::len), Some(1), "{status}");
        assert_eq!(status["adopted_links"], 6, "{status}");
        assert!(topo.log(&format!("agent-node{node}")).contains("a successor took over this node's pods"));
        more(&format!("after node{node}'s agent was replaced"));
        for label in &streams {
            assert!(topo.is_running(label), "{label} still runs after node{node}'s agent was replaced");
        }
    }
    let hits_took = started.elapsed();
    let total: usize = hits.iter().map(|l| made(l)).sum();
    for label in &hits {
        topo.signal_and_wait(label, libc::SIGTERM);
        made(label);
    }
    for label in &streams {
        let status = topo.wait_exit(label, Duration::from_secs(60));
        let log = topo.log(label);
        assert!(status.success(), "{label} failed: {log}");
        let result: Value = serde_json::from_str(log.lines().last().unwrap_or_default()).expect("send JSON");
        assert_eq!(result["match"], true, "{label}: bytes arrived intact: {result}");
    }
    let rate = total as f64 / hits_took.as_secs_f64();
    println!("new connections across the nodes during the upgrade: {rate:.0}/s over {hits_took:?}");
    assert!(rate >= 200.0, "the steady client opened {rate:.0} connections/s, the test asks for 200/s at least");
    // The old agents drained their connections and exited cleanly.
    for node in [1u8, 2] {
        let old = format!("agent-node{node}");
        let status = topo.wait_exit(&old, Duration::from_secs(30));
        assert!(status.success(), "{old}: {status}: {}", topo.log(&old));
        assert!(topo.log(&old).contains("drained: every connection ended"), "{}", topo.log(&old));
    }
    // Both generations carried the load: the old agents' access logs and the new agents'
    // flows hold HTTP connections of the steady client.
    for node in [1u8, 2] {
        let http = |f: &Value| f["direction"] == "outbound" && f["dst"]["port"] == HTTP_PORT;
        let old = topo.log(&format!("agent-node{node}"));
        let old_flows = old.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).filter(http).count();
        let new_flows = topo.flows(node).iter().filter(|f| http(f)).count();
        assert!(old_flows > 0 && new_flows > 0, "node{node}: old agent carried {old_flows}, new {new_flows}");
    }
    // The new agents serve on: a connection made now works.
    let body = topo.curl(a, c.ip);
    assert!(body.starts_with(&format!("client {}:", a.ip)), "{body}");
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
            good.split("status:\n").next().unwrap().to_string(),
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
    let inbound_to = |ip: std::net::Ipv4Addr| {
        let ip = ip.to_string();
        move |flows: Vec<Value>| flows.iter().any(|f| f["direction"] == "inbound" && f["dst"]["ip"] == ip)
    };
    let body = topo.curl(x, a.ip);
    assert!(body.starts_with(&format!("client {}:", x.ip)), "{body}");
    wait_until(FLOW_WAIT, "the inbound flow to a", || inbound_to(a.ip)(topo.flows(1)));
    // After an agent restart the pods are found again.
    topo.signal_and_wait("agent-node1", libc::SIGTERM);
    topo.start_agent(1);
    topo.wait_enrolled(1, &["shop/a", "shop/late"], Duration::from_secs(5));
    let body = topo.curl(x, late.ip);
    assert!(body.starts_with(&format!("client {}:", x.ip)), "{body}");
    wait_until(FLOW_WAIT, "the inbound flow to late", || inbound_to(late.ip)(topo.flows(1)));
}

/// The CNI plugin's answer on stdout, as JSON.
fn cni_answer(out: &std::process::Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "ferrymesh-cni printed no JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

/// After a node reboot the pins are gone, and a pod that ran before its agent would be open:
/// the CNI plugin fails a pod's sandbox while the agent is not there, and, once it is, holds a
/// new mesh pod closed from its sandbox's creation until the agent enrolls it.
#[test]
fn the_cni_plugin_keeps_mesh_pods_closed_until_enrolled_and_fails_them_without_an_agent() {
    let _serial = serial();
    let spec = spec().pod("shop", "d", 2).pod("shop", "e", 2).pod("legacy", "y", 2);
    let topo = Topology::build(&spec);
    // The DaemonSet's init container chains the plugin into the node's network configuration.
    let (bin_dir, conf_dir) = (topo.dir.join("cni-bin"), topo.dir.join("net.d"));
    std::fs::create_dir_all(&conf_dir).unwrap();
    let primary = r#"{"cniVersion":"1.0.0","name":"k8s-pod-network","plugins":[{"type":"ptp"}]}"#;
    std::fs::write(conf_dir.join("10-ptp.conflist"), primary).unwrap();
    let cni_dirs = ["--cni-bin-dir", bin_dir.to_str().unwrap(), "--cni-conf-dir", conf_dir.to_str().unwrap()];
    let socket = topo.cni_socket(2);
    let out = topo.output_in(
        &topo.nodes[1].netns,
        bin("mesh-agent"),
        &[&["--install-cni", "--cni-socket", socket.to_str().unwrap()][..], &cni_dirs].concat(),
    );
    assert!(out.status.success(), "--install-cni: {}", String::from_utf8_lossy(&out.stderr));
    let list: Value =
        serde_json::from_str(&std::fs::read_to_string(conf_dir.join("10-ptp.conflist")).unwrap()).unwrap();
    assert_eq!(list["plugins"][1]["type"], "ferrymesh-cni", "{list}");
    assert_eq!(list["plugins"][1]["agent_socket"], socket.to_str().unwrap());
    assert_eq!(std::fs::read(bin_dir.join("ferrymesh-cni")).unwrap(), std::fs::read(bin("ferrymesh-cni")).unwrap());
    topo.write_cluster(&["shop"]);
    // d and e are pods being created: the runtime sets their sandboxes up (CNI ADD) before
    // mesh-ctrl knows them (their Pod objects have no IP yet).
    for pod in ["d", "e"] {
        std::fs::remove_file(topo.config_dir().join(format!("pod-shop-{pod}.yaml"))).unwrap();
    }
    start(&topo);
    let (a, c, d, e) = (topo.pod("shop", "a"), topo.pod("shop", "c"), topo.pod("shop", "d"), topo.pod("shop", "e"));
    let (x, y) = (topo.pod("legacy", "x"), topo.pod("legacy", "y"));

    // node2 reboots: its agent is gone, and so are its pins.
    topo.signal_and_wait("agent-node2", libc::SIGKILL);
    let dir = topo.bpf_dir(2);
    let out =
        topo.output_in(&topo.nodes[1].netns, bin("mesh-agent"), &["--uninstall", "--bpf-dir", dir.to_str().unwrap()]);
    assert!(out.status.success(), "uninstall: {}", String::from_utf8_lossy(&out.stderr));
    // Without the agent, d's sandbox fails with "try again later": d does not run meanwhile.
    let out = topo.cni("ADD", d);
    assert!(!out.status.success(), "ADD without an agent must fail");
    let error = cni_answer(&out);
    assert_eq!(error["code"], 11, "try again later: {error}");
    assert!(error["msg"].as_str().unwrap().contains("agent of this node is not running"), "{error}");
    // The cluster's own namespaces start without it (mesh-ctrl runs in one).
    let mut system = y.clone();
    system.namespace = "kube-system".into();
    let out = topo.cni("ADD", &system);
    assert!(out.status.success(), "ADD in kube-system: {}", String::from_utf8_lossy(&out.stdout));

    // The agent is back (keeping the plugin chained, as the DaemonSet runs it): ADD holds d (its
    // namespace is in the mesh) and passes the previous plugin's result on unchanged.
    let cni_dir_flags = [("--cni-bin-dir", cni_dirs[1]), ("--cni-conf-dir", cni_dirs[3])];
    topo.start_agent_with_switches(2, &cni_dir_flags, &["--watch-cni"]);
    topo.wait_enrolled(2, &["shop/c"], Duration::from_secs(10));
    // The node's CNI rewrites its conflist without the plugin (an upgrade, a restart): the
    // running agent chains it again, so the pods created next are still held.
    let chained = std::fs::read_to_string(conf_dir.join("10-ptp.conflist")).unwrap();
    std::fs::write(conf_dir.join("10-ptp.conflist"), primary).unwrap();
    wait_until(Duration::from_secs(10), "the plugin to be chained again", || {
        std::fs::read_to_string(conf_dir.join("10-ptp.conflist")).unwrap() == chained
    });
    assert!(topo.log("agent-node2").contains("chained ferrymesh-cni again"), "{}", topo.log("agent-node2"));
    let out = topo.cni("ADD", d);
    assert!(
        out.status.success(),
        "ADD: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let result = cni_answer(&out);
    assert_eq!(result["ips"][0]["address"], format!("{}/24", d.ip), "the previous result passes on: {result}");
    assert!(topo.log("agent-node2").contains("pod held closed until enrolled"));
    // d is closed both ways, at once, for IPv4 and IPv6, while nothing enrolls it.
    for (from, to) in [(x, d.ip), (d, a.ip)] {
        let (code, took) = try_curl(&topo, from, to);
        assert_eq!(code, Some(CURL_COULDNT_CONNECT), "{} -> {} must be refused while d is held", from.name, to);
        assert!(took < Duration::from_secs(5), "refused, not hung: {took:?}");
    }
    for (from, to) in [(x, d.ip6), (d, a.ip6)] {
        let (code, text, took) = topo.try_curl(from, to.into());
        assert_eq!(code, Some(CURL_COULDNT_CONNECT), "{} -> {to} over IPv6 must be refused: {text}", from.name);
        assert!(took < Duration::from_secs(5), "refused, not hung: {took:?}");
    }
    // A pod outside the mesh is left alone, and so is its traffic; DEL always succeeds.
    let out = topo.cni("ADD", y);
    assert!(out.status.success(), "ADD of y: {}", String::from_utf8_lossy(&out.stdout));
    let body = topo.curl(x, y.ip);
    assert!(body.starts_with(&format!("client {}:", x.ip)), "x -> y: {body}");
    assert!(topo.cni("DEL", y).status.success());

    // mesh-ctrl learns d's IP: the agent enrolls it on the pinned hold, and d is served.
    topo.write_pod(d, &[]);
    topo.wait_enrolled(2, &["shop/c", "shop/d"], CONFIG_WAIT);
    let status = topo.status(2);
    let enrolled_d = status["enrolled"].as_array().unwrap().iter().find(|p| p["name"] == "d").cloned().unwrap();
    assert_eq!(enrolled_d["adopted"], true, "enrolling adopted the hold's pinned link: {status}");
    for (from, to) in [(a, d), (d, c)] {
        let body = topo.curl(from, to.ip);
        assert!(body.starts_with(&format!("client {}:", from.ip)), "{} -> {}: {body}", from.name, to.name);
    }
    wait_until(FLOW_WAIT, "d's inbound mTLS flow", || {
        topo.flows(2).iter().any(|f| f["direction"] == "inbound" && f["dst"]["workload"] == "d" && f["mtls"] == true)
    });

    // e is held too, then turns out to opt out: the hold is released once mesh-ctrl says so.
    assert!(topo.cni("ADD", e).status.success());
    let (code, _) = try_curl(&topo, x, e.ip);
    assert_eq!(code, Some(CURL_COULDNT_CONNECT), "x -> e is refused while e is held");
    topo.write_pod(e, &[(DATAPLANE_MODE, "none")]);
    wait_until(CONFIG_WAIT, "e's hold to be released", || topo.log("agent-node2").contains("hold released"));
    let body = topo.curl(x, e.ip);
    assert!(body.starts_with(&format!("client {}:", x.ip)), "x -> e, not in the mesh: {body}");
    assert_eq!(topo.enrolled(2), vec!["shop/c".to_string(), "shop/d".to_string()]);
    // A DEL of an enrolled pod changes nothing (mesh-ctrl's config unenrolls it when it goes).
    assert!(topo.cni("DEL", d).status.success());
    let body = topo.curl(a, d.ip);
    assert!(body.starts_with(&format!("client {}:", a.ip)), "a -> d: {body}");

    // Uninstall (of a stopped agent) takes the plugin out of the node's network configuration.
    topo.signal_and_wait("agent-node2", libc::SIGKILL);
    let dir = topo.bpf_dir(2);
    let out = topo.output_in(
        &topo.nodes[1].netns,
        bin("mesh-agent"),
        &[&["--uninstall", "--bpf-dir", dir.to_str().unwrap()][..], &cni_dirs].concat(),
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("removed the CNI plugin (2 files changed or removed)"));
    let list: Value =
        serde_json::from_str(&std::fs::read_to_string(conf_dir.join("10-ptp.conflist")).unwrap()).unwrap();
    assert_eq!(list, serde_json::from_str::<Value>(primary).unwrap());
    assert!(!bin_dir.join("ferrymesh-cni").exists());
}

/// The capabilities the DaemonSet gives the agent container, from manifests/base/ferrymesh.yaml.
fn daemonset_capabilities() -> Vec<String> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/base/ferrymesh.yaml");
    let text = std::fs::read_to_string(&path).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let object = <serde_yaml::Value as serde::Deserialize>::deserialize(doc).unwrap();
        if object["kind"] == "DaemonSet" {
            let container = &object["spec"]["template"]["spec"]["containers"][0];
            let add = container["securityContext"]["capabilities"]["add"].as_sequence().expect("capabilities.add");
            return add.iter().map(|c| c.as_str().unwrap().to_lowercase()).collect();
        }
    }
    panic!("no DaemonSet in {}", path.display());
}

/// The agent as the DaemonSet runs it, unprivileged: with only the capabilities the manifest
/// adds (root's bounding set cut to them) and a read-only /proc/sys, setting pod sysctls through
/// a writable mount of /proc/sys/net as the manifest mounts the host's. It enrolls, captures,
/// carries mTLS and holds pods as the privileged agent does.
#[test]
fn an_agent_serves_with_only_the_daemonsets_capabilities_and_a_read_only_proc_sys() {
    let _serial = serial();
    let topo = Topology::build(&TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "c", 2).pod("legacy", "x", 1));
    topo.write_cluster(&["shop"]);
    topo.start_ctrl(&[]);
    topo.start_agent(1);
    let caps = daemonset_capabilities();
    let bounding = format!("-all,{}", caps.iter().map(|c| format!("+{c}")).collect::<Vec<_>>().join(","));
    let host_sysctl = topo.dir.join("host-proc-sys-net");
    std::fs::create_dir_all(&host_sysctl).unwrap();
    // A mount namespace of its own (gone with the process): /proc/sys/net bound writable at
    // host_sysctl, then /proc/sys made read-only, then the agent with the manifest's capabilities.
    let agent = topo.agent_command(2, &[("--proc-sys-net", host_sysctl.to_str().unwrap())]);
    let mut line = vec![agent.get_program().to_string_lossy().into_owned()];
    line.extend(agent.get_args().map(|a| a.to_string_lossy().into_owned()));
    let nsenter_prefix = line.iter().position(|a| a == "--").unwrap();
    let agent_line: Vec<String> = line[nsenter_prefix + 1..].iter().map(|a| format!("'{a}'")).collect();
    let script = format!(
        "mount --make-rprivate / && mount --bind /proc/sys/net '{sysctl}' && mount --bind /proc/sys /proc/sys \
         && mount -o remount,bind,ro /proc/sys && exec setpriv --bounding-set {bounding} --inh-caps -all {agent}",
        sysctl = host_sysctl.display(),
        agent = agent_line.join(" "),
    );
    let mut cmd = topo.command_in(&topo.nodes[1].netns, "unshare");
    cmd.args(["-m", "sh", "-c", &script]);
    topo.spawn("agent-node2", cmd);
    wait_until(Duration::from_secs(15), "the unprivileged agent to serve", || {
        assert!(topo.is_running("agent-node2"), "the agent exited: {}", topo.log("agent-node2"));
        topo.try_status(2).is_some_and(|s| s["config_version"].as_u64() > Some(0))
    });
    topo.wait_enrolled(2, &["shop/c"], Duration::from_secs(15));
    topo.wait_enrolled(1, &["shop/a"], Duration::from_secs(10));
    topo.serve_all();
    let (a, c, x) = (topo.pod("shop", "a"), topo.pod("shop", "c"), topo.pod("legacy", "x"));

    // It runs with exactly those capabilities, and its /proc/sys is read-only.
    // nsenter, unshare, sh and setpriv each exec the next: the spawned process is the agent.
    let pid = topo.pid("agent-node2").expect("the agent's pid");
    assert!(std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap().starts_with("mesh-agent"));
    // It executed itself again (same pid) with glibc's vector memcpy (ferrymesh_dataplane::memcpy),
    // as the agent started without these restrictions did.
    for agent in ["agent-node1", "agent-node2"] {
        let environment = topo.environment(agent);
        assert!(environment.contains(&VECTOR_MEMCPY.to_string()), "{agent}: {environment:?}");
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let mounts = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")).unwrap();
    let proc_sys = mounts.lines().rfind(|l| l.split(' ').nth(4) == Some("/proc/sys")).expect("/proc/sys mount");
    assert!(proc_sys.split(' ').nth(5).unwrap().split(',').any(|o| o == "ro"), "read-only /proc/sys: {proc_sys}");
    let eff = status.lines().find_map(|l| l.strip_prefix("CapEff:")).unwrap().trim().to_string();
    let decoded = std::process::Command::new("capsh").arg(format!("--decode={eff}")).output().unwrap();
    let decoded = String::from_utf8_lossy(&decoded.stdout).to_lowercase();
    let held: BTreeSet<String> = decoded
        .trim()
        .split('=')
        .nth(1)
        .unwrap_or_default()
        .split(',')
        .map(|c| c.trim_start_matches("cap_").to_string())
        .collect();
    assert_eq!(held, caps.iter().cloned().collect::<BTreeSet<_>>(), "the agent's effective capabilities");
    assert!(!topo.log("agent-node2").contains("cannot set net."), "{}", topo.log("agent-node2"));

    // c's sysctls were set through the writable mount.
    let sysctl = topo.output_in(&c.netns, "sysctl", &["-n", "net.ipv4.tcp_fwmark_accept", "net.ipv6.fwmark_reflect"]);
    assert_eq!(String::from_utf8_lossy(&sysctl.stdout).split_whitespace().collect::<Vec<_>>(), ["1", "1"]);
    // It carries mTLS both ways, and plaintext to c reaches c through it.
    for (from, to) in [(a, c), (c, a)] {
        let body = topo.curl(from, to.ip);
        assert!(body.starts_with(&format!("client {}:", from.ip)), "{} -> {}: {body}", from.name, to.name);
    }
    let (code, body, _) = topo.try_curl(a, c.ip6.into());
    assert_eq!(code, Some(0), "a -> c over IPv6: {body}");
    let body = topo.curl(x, c.ip);
    assert!(body.starts_with(&format!("client {}:", x.ip)), "x -> c: {body}");
    wait_until(FLOW_WAIT, "c's inbound mTLS flow from a", || {
        topo.flows(2).iter().any(|f| f["direction"] == "inbound" && f["mtls"] == true && f["src"]["workload"] == "a")
    });
}
