//! Side-by-side measurement of HBONE (cross-node, mTLS between two agents) and plain TCP
//! (cross-node, pods not enrolled) in one run: single-stream throughput (iperf3) and 1-byte
//! request/response latency (fm-peer rr). Not a pass/fail test: run it by hand and read the
//! numbers (machines here are shared and noisy; only compare figures from the same run).
//!
//! `cargo test --release -p ferrymesh-testbed --test measure -- --ignored --nocapture`

use std::time::Duration;

use ferrymesh_testbed::mesh::{bin, scale_namespace_yaml, wait_until, ECHO_PORT};
use ferrymesh_testbed::{Pod, Topology, TopologySpec};
use serde_json::Value;

fn iperf_gbits(topo: &Topology, label: &str, from: &Pod, to: &Pod) -> f64 {
    let mut server = topo.command_in(&to.netns, "iperf3");
    server.args(["-s", "-1", "--forceflush"]);
    topo.spawn(label, server);
    wait_until(Duration::from_secs(5), "iperf3 to listen", || topo.log(label).contains("Server listening"));
    let out = topo.output_in(&from.netns, "iperf3", &["-c", &to.ip.to_string(), "-t", "5", "-J"]);
    assert!(out.status.success(), "iperf3: {}", String::from_utf8_lossy(&out.stderr));
    let json: Value = serde_json::from_slice(&out.stdout).unwrap();
    json["end"]["sum_received"]["bits_per_second"].as_f64().unwrap() / 1e9
}

fn rr(topo: &Topology, from: &Pod, to: &Pod) -> Value {
    let addr = format!("{}:{ECHO_PORT}", to.ip);
    let out = topo.output_in(&from.netns, bin("fm-peer"), &["rr", "--to", &addr, "--count", "20000"]);
    assert!(out.status.success(), "rr: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
#[ignore = "measurement, run by hand"]
fn hbone_next_to_plain_tcp() {
    let spec =
        TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "c", 2).pod("legacy", "x", 1).pod("legacy", "y", 2);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a"], Duration::from_secs(10));
    topo.serve_all();
    let (a, c, x, y) = (topo.pod("shop", "a"), topo.pod("shop", "c"), topo.pod("legacy", "x"), topo.pod("legacy", "y"));
    for round in 1..=3 {
        let plain = iperf_gbits(&topo, &format!("iperf-plain-{round}"), x, y);
        let hbone = iperf_gbits(&topo, &format!("iperf-hbone-{round}"), a, c);
        let (rr_plain, rr_hbone) = (rr(&topo, x, y), rr(&topo, a, c));
        println!(
            "round {round}: throughput plain {plain:.2} Gbit/s, HBONE {hbone:.2} Gbit/s (ratio {:.2}); 1 B rr p50 plain {:.1} us, HBONE {:.1} us; p99 plain {:.1} us, HBONE {:.1} us",
            hbone / plain,
            rr_plain["p50_us"].as_f64().unwrap(),
            rr_hbone["p50_us"].as_f64().unwrap(),
            rr_plain["p99_us"].as_f64().unwrap(),
            rr_hbone["p99_us"].as_f64().unwrap(),
        );
    }
}

fn rss_kb(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .unwrap()
        .trim()
        .trim_end_matches(" kB")
        .trim()
        .parse()
        .unwrap()
}

/// 10k pods and 2k services (100 namespaces; 5 pods per service) on a node that is not in the
/// topology, so the agent holds them without enrolling any: time for mesh-ctrl to load and the
/// agent to have them, time for one pod change to reach the agent, agent memory per workload.
#[test]
#[ignore = "measurement, run by hand"]
fn control_plane_scale() {
    let topo = Topology::build(&TopologySpec::nodes(1).pod("shop", "a", 1));
    topo.write_cluster(&["shop"]);
    topo.start_mesh();
    let pid = topo.pid("agent-node1").expect("agent pid");
    std::thread::sleep(Duration::from_secs(1));
    let rss_before = rss_kb(pid);
    let version = |topo: &Topology| topo.status(1)["config_version"].as_u64().unwrap();
    let v0 = version(&topo);
    let start = std::time::Instant::now();
    for ns in 0..100 {
        topo.write_config_file(&format!("scale-{ns:03}.yaml"), &scale_namespace_yaml(ns, "far-away"));
    }
    wait_until(Duration::from_secs(120), "the agent to hold 10k pods", || {
        version(&topo) > v0 && topo.log("mesh-ctrl").contains("pods=10001")
    });
    // The agent has the final version once mesh-ctrl logged 10001 pods and the agent caught up.
    let final_line = topo.log("mesh-ctrl").lines().rfind(|l| l.contains("pods=10001")).unwrap().to_string();
    let loaded = start.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    let rss_after = rss_kb(pid);
    // One pod change, timed from the file write to the agent's own "config applied" log line.
    let v1 = version(&topo);
    let text = std::fs::read_to_string(topo.config_dir().join("scale-042.yaml")).unwrap();
    let written = std::time::SystemTime::now();
    topo.write_config_file("scale-042.yaml", &text.replacen("app: s0\n", "app: changed\n", 1));
    wait_until(Duration::from_secs(10), "one change to reach the agent", || version(&topo) > v1);
    let applied_line = topo.log("agent-node1").lines().rfind(|l| l.contains("config applied")).unwrap().to_string();
    let applied_at =
        humantime::parse_rfc3339_weak(applied_line.split_whitespace().next().unwrap().trim_end_matches('Z')).unwrap();
    let one_change = applied_at.duration_since(written).unwrap();
    let change_line = topo.log("mesh-ctrl").lines().last().unwrap().to_string();
    println!("10k pods + 2k services written and held by the agent in {loaded:?}; mesh-ctrl: {final_line}");
    println!("one pod change applied by the agent {one_change:?} after the file write; mesh-ctrl: {change_line}; agent: {applied_line}");
    println!(
        "agent RSS {rss_before} kB -> {rss_after} kB: {:.2} kB per workload (services included)",
        (rss_after.saturating_sub(rss_before)) as f64 / 10000.0
    );
}
