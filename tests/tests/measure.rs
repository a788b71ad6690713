//! Side-by-side measurement of HBONE (cross-node, mTLS between two agents) and plain TCP
//! (cross-node, pods not enrolled) in one run: single-stream throughput (iperf3) and 1-byte
//! request/response latency (fm-peer rr). Not a pass/fail test: run it by hand and read the
//! numbers (machines here are shared and noisy; only compare figures from the same run).
//!
//! `cargo test --release -p ferrymesh-testbed --test measure -- --ignored --nocapture`

use std::time::Duration;

use ferrymesh_testbed::mesh::{bin, wait_until, ECHO_PORT};
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
    for pod in &topo.pods {
        topo.serve(pod);
    }
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
