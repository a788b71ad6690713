//! `fm-bench --quick` (what `cargo xtask bench --quick` runs) completes and writes well-formed
//! results: every scenario with every measurement, numbers that are numbers, ratios to plain.
//! Checks shape only: no figure is asserted (benchmarks are never timed assertions). Needs root.

use ferrymesh_testbed::mesh::bin;
use serde_json::Value;

#[test]
fn quick_bench_runs_and_writes_well_formed_results() {
    let dir = std::env::temp_dir().join(format!("fm-bench-smoke-{}", std::process::id()));
    let out = dir.join("results.json");
    let report = dir.join("BENCHMARKS.md");
    let status = std::process::Command::new(bin("fm-bench"))
        .args(["--quick", "--out"])
        .arg(&out)
        .arg("--report")
        .arg(&report)
        .status()
        .expect("run fm-bench");
    assert!(status.success(), "fm-bench --quick failed");
    let results: Vec<Value> = serde_json::from_slice(&std::fs::read(&out).unwrap()).expect("results.json is JSON");
    let has = |scenario: &str, measurement: &str| {
        results.iter().find(|r| r["scenario"] == scenario && r["measurement"] == measurement).cloned()
    };
    let per_scenario = [
        "throughput_1stream",
        "throughput_4stream",
        "rr_1b_p50",
        "rr_1b_p90",
        "rr_1b_p99",
        "rr_1k_p50",
        "rr_1k_p99",
        "conn_rate",
        "sockperf_64b_p50",
        "sockperf_64b_p99",
        "sockperf_64b_p999",
        "wrk_conn_rate",
        "wrk_rps_16c",
        "wrk_16c_p50",
        "wrk_16c_p99",
    ];
    for scenario in ["plain", "capture", "same-node", "cross-node"] {
        for m in per_scenario {
            let r = has(scenario, m).unwrap_or_else(|| panic!("{scenario} {m} missing"));
            for key in ["median", "min", "max"] {
                assert!(r[key].as_f64().is_some_and(|v| v.is_finite() && v > 0.0), "{scenario} {m} {key}: {r}");
            }
            assert!(r["min"].as_f64() <= r["median"].as_f64() && r["median"].as_f64() <= r["max"].as_f64(), "{r}");
            assert!(r["unit"].is_string());
            if scenario == "plain" {
                assert!(r["ratio_to_plain"].is_null(), "{r}");
            } else {
                assert!(r["ratio_to_plain"].as_f64().is_some_and(|v| v > 0.0), "{r}");
            }
        }
    }
    for scenario in ["capture", "same-node", "cross-node"] {
        assert!(has(scenario, "cpu_per_gb").is_some(), "{scenario} cpu_per_gb");
    }
    for m in ["rss_idle", "rss_per_conn", "rss_per_workload"] {
        let r = has("agent", m).unwrap_or_else(|| panic!("agent {m} missing"));
        assert_eq!(r["unit"], "KB");
        assert!(r["median"].as_f64().is_some_and(f64::is_finite), "{r}");
    }
    assert!(has("agent", "rss_idle").unwrap()["median"].as_f64().unwrap() > 1000.0, "an agent uses some memory");
    for m in
        ["tcp_loopback_rt_p50", "tcp_loopback_rt_p99", "sockmap_rt_p50", "sockmap_rt_p99", "unix_rt_p50", "unix_rt_p99"]
    {
        let r = has("hop", m).unwrap_or_else(|| panic!("hop {m} missing"));
        assert!(r["median"].as_f64().is_some_and(|v| v.is_finite() && v > 0.0), "{r}");
    }
    let policy = has("policy", "policy_decision").expect("policy_decision");
    assert_eq!(policy["unit"], "ns");
    assert!(policy["median"].as_f64().unwrap() > 0.0);
    for scenario in ["l7-direct", "waypoint", "waypoint-features"] {
        let r = has(scenario, "http1_max_rate").unwrap_or_else(|| panic!("{scenario} http1_max_rate missing"));
        assert!(r["median"].as_f64().is_some_and(|v| v.is_finite() && v > 0.0), "{r}");
    }
    for scenario in ["waypoint-features", "waypoint-traced"] {
        let cost = has(scenario, "http1_max_rate_vs_waypoint").unwrap_or_else(|| panic!("{scenario}'s cost"));
        assert!(cost["median"].as_f64().is_some_and(|v| v.is_finite() && v > 0.0), "{cost}");
    }
    let text = std::fs::read_to_string(&report).unwrap();
    assert!(text.contains("cross-node") && text.contains("throughput_1stream") && text.contains("machine:"));
    assert!(text.contains("| #19: cross-node added sockperf 64 B p50 <= 35 us | "), "#19's targets are checked");
    assert!(text.contains("Floor: cross-node adds four process hops"), "the report gives the hop floor");
    assert!(text.contains("With sockmap redirection between the loopback legs' sockets"), "and sockmap's");
    let _ = std::fs::remove_dir_all(&dir);
}
