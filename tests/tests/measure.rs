//! Control-plane scale, measured by hand (data-path figures are `cargo xtask bench`): time for
//! mesh-ctrl to load 10k pods and 2k services and for the agent to hold them, time for one pod
//! change to reach the agent, agent memory per workload. Not a pass/fail test.
//!
//! `cargo test --release -p ferrymesh-testbed --test measure -- --ignored --nocapture`

use std::time::Duration;

use ferrymesh_testbed::mesh::{scale_namespace_yaml, wait_until};
use ferrymesh_testbed::{Topology, TopologySpec};

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
