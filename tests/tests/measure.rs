//! Control-plane scale, measured by hand (data-path figures are `cargo xtask bench`): time for
//! mesh-ctrl to load 10k pods and 2k services and for the agent to hold them, time for one pod
//! change to reach the agent, agent memory per workload. Not a pass/fail test.
//!
//! `cargo test --release -p ferrymesh-testbed --test measure -- --ignored --nocapture`

use std::time::Duration;

use ferrymesh_testbed::mesh::{scale_namespace_yaml, wait_until};
use ferrymesh_testbed::{Topology, TopologySpec};

fn rss_kb(pid: u32) -> u64 {
    ferrymesh_testbed::topology::rss_kib(pid).expect("the process is running")
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

/// Agent start to first config: over TLS to mesh-ctrl (this build) next to plaintext (the
/// binaries in FERRYMESH_PLAINTEXT_BIN_DIR, a build from before 15012 had TLS, e.g. commit
/// 0d74e37: `git worktree add /tmp/before 0d74e37 && (cd /tmp/before && CARGO_TARGET_DIR=/tmp/before-target
/// cargo xtask build)`), in interleaved rounds on one topology each; prints the medians.
///
/// `FERRYMESH_PLAINTEXT_BIN_DIR=/tmp/before-target/release cargo test --release -p ferrymesh-testbed
/// --test measure control_channel -- --ignored --nocapture`
#[test]
#[ignore = "measurement, run by hand"]
fn control_channel_start_to_first_config() {
    let old =
        std::path::PathBuf::from(std::env::var("FERRYMESH_PLAINTEXT_BIN_DIR").expect("FERRYMESH_PLAINTEXT_BIN_DIR"));
    let topo = |tls: bool| {
        let topo = Topology::build(&TopologySpec::nodes(1).pod("shop", "a", 1));
        topo.write_cluster(&["shop"]);
        if tls {
            topo.start_ctrl(&[]);
        } else {
            std::fs::write(topo.token_file(1), "token-node1-plaintext-measure").unwrap();
            std::fs::write(topo.dir.join("tokens.yaml"), "node1: token-node1-plaintext-measure\n").unwrap();
            let mut ctrl = topo.command_in(&topo.fabric, old.join("mesh-ctrl"));
            ctrl.arg("--config-dir").arg(topo.config_dir()).args(["--listen", "172.18.0.254:15012"]);
            ctrl.arg("--ca-dir").arg(topo.ca_dir()).arg("--node-tokens").arg(topo.dir.join("tokens.yaml"));
            topo.spawn("mesh-ctrl", ctrl);
            wait_until(Duration::from_secs(10), "the old mesh-ctrl to serve", || {
                topo.log("mesh-ctrl").contains("mesh-ctrl serving")
            });
        }
        topo
    };
    let (plain, tls) = (topo(false), topo(true));
    let start_to_config = |topo: &Topology, tls: bool| {
        let cmd = if tls {
            topo.agent_command(1, &[])
        } else {
            let mut cmd = topo.command_in(&topo.nodes[0].netns, old.join("mesh-agent"));
            cmd.args(["--node-name", "node1", "--ctrl", "http://172.18.0.254:15012"]);
            cmd.arg("--admin-socket").arg(topo.agent_socket(1)).arg("--token-file").arg(topo.token_file(1));
            cmd
        };
        // Polled every 2 ms (wait_until's 50 ms would be the resolution otherwise).
        let poll = |done: &dyn Fn(&serde_json::Value) -> bool| {
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            while !topo.try_status(1).is_some_and(|s| done(&s)) {
                assert!(std::time::Instant::now() < deadline, "the agent did not get there in 20 s");
                std::thread::sleep(Duration::from_millis(2));
            }
        };
        let started = std::time::Instant::now();
        topo.spawn("agent-node1", cmd);
        poll(&|s| s["config_version"].as_u64() > Some(0));
        let took = started.elapsed();
        // The first certificate too: one more TLS connection and a CSR.
        poll(&|s| s["certs"].as_array().is_some_and(|c| !c.is_empty()));
        let with_cert = started.elapsed();
        topo.signal_and_wait("agent-node1", libc::SIGTERM);
        (took.as_secs_f64() * 1e3, with_cert.as_secs_f64() * 1e3)
    };
    let (mut p, mut t) = (Vec::new(), Vec::new());
    for _ in 0..15 {
        p.push(start_to_config(&plain, false));
        t.push(start_to_config(&tls, true));
    }
    let median = |v: &mut Vec<(f64, f64)>, pick: fn(&(f64, f64)) -> f64| {
        let mut xs: Vec<f64> = v.iter().map(pick).collect();
        xs.sort_by(f64::total_cmp);
        xs[xs.len() / 2]
    };
    println!(
        "agent start -> first config (median of 15): plaintext {:.1} ms, TLS {:.1} ms; -> first certificate: plaintext {:.1} ms, TLS {:.1} ms",
        median(&mut p, |x| x.0),
        median(&mut t, |x| x.0),
        median(&mut p, |x| x.1),
        median(&mut t, |x| x.1)
    );
}
