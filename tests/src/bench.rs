//! The benchmark harness behind `cargo xtask bench`: plain TCP, eBPF capture into the agent,
//! the mesh on one node and the mesh across nodes, side by side on one topology, in interleaved
//! rounds; medians with min and max, and every figure as a ratio to `plain` from the same run.
//! Each scenario is measured with neutral tools (iperf3; sockperf ping-pong, 64 B over TCP; wrk
//! against nginx, with `Connection: close` for the connection rate and keep-alive for requests/s)
//! and with fm-peer (`rr_*`, `conn_rate`). fm-peer's `conn_rate` makes one connection at a time
//! (an HTTP request to fm-peer's server, which spawns a thread per connection): it measures a
//! new connection's latency, not the rate under load; compare rates under load with
//! `wrk_conn_rate`.
//! Agent-wide figures (memory) are reported under the scenario `agent`, the policy decision
//! under `policy`; the waypoint's requests under `waypoint`, next to `l7-direct` (the same
//! Service endpoints without the waypoint, ratios against it). Never a pass/fail test: the numbers go to `target/bench/results.json` and
//! docs/BENCHMARKS.md.

use ferrymesh_spiffe::SpiffeId;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::Serialize;
use serde_json::Value;

use crate::mesh::{
    bin, bin_dir, cpu_seconds, scale_namespace_yaml, two_node_mesh, wait_until, ECHO_GRPC_PORT, ECHO_HTTP_PORT,
    ECHO_PORT, HTTP_PORT,
};
use crate::{Pod, Topology};

/// How much to measure.
#[derive(Debug, Clone, Copy)]
pub struct Options {
    /// Interleaved rounds of every scenario.
    pub rounds: usize,
    /// Seconds per iperf3 run.
    pub iperf_seconds: u32,
    /// Round trips per request/response run.
    pub rr_count: u32,
    /// Connections per connection-rate run.
    pub conns: u32,
    /// Idle connections held for the per-connection memory figure. One client holds them all,
    /// so they stay below the destination agent's `--max-streams-per-source` (2048 by default):
    /// more would be refused by that limit, not measured.
    pub idle_conns: u32,
    /// Workloads loaded for the per-workload memory figure (multiple of 100).
    pub workloads: u32,
    /// Seconds per run of each neutral tool (sockperf, wrk).
    pub neutral_seconds: u32,
}

impl Options {
    /// The full run: 5 rounds, 2000 idle connections, 10k workloads.
    pub const FULL: Options = Options {
        rounds: 5,
        iperf_seconds: 5,
        rr_count: 20_000,
        conns: 1000,
        idle_conns: 2000,
        workloads: 10_000,
        neutral_seconds: 5,
    };
    /// A spot check of about a minute and a half.
    pub const QUICK: Options = Options {
        rounds: 1,
        iperf_seconds: 1,
        rr_count: 2000,
        conns: 200,
        idle_conns: 1000,
        workloads: 1000,
        neutral_seconds: 1,
    };
}

/// One line of `results.json`.
#[derive(Debug, Clone, Serialize)]
pub struct Figure {
    /// `plain`, `capture`, `same-node`, `cross-node`, `agent`, `policy`, `l7-direct` or
    /// `waypoint`.
    pub scenario: String,
    /// E.g. `throughput_1stream`.
    pub measurement: String,
    /// E.g. `Gbit/s`.
    pub unit: String,
    /// Median over rounds.
    pub median: f64,
    /// Smallest round.
    pub min: f64,
    /// Largest round.
    pub max: f64,
    /// median / plain's median for the same measurement (for `waypoint`: / `l7-direct`'s); None
    /// where there is no such figure.
    pub ratio_to_plain: Option<f64>,
}

/// (scenario, measurement, unit) of a figure.
type Key = (&'static str, &'static str, &'static str);

/// The values measured in each round, by figure, in the order first measured.
#[derive(Default)]
struct Samples(Vec<(Key, Vec<f64>)>);

impl Samples {
    fn add(&mut self, key: Key, value: f64) {
        match self.0.iter_mut().find(|(k, _)| *k == key) {
            Some((_, values)) => values.push(value),
            None => self.0.push((key, vec![value])),
        }
    }

    /// One figure per key: median, min and max over the rounds (no ratio yet).
    fn figures(&self) -> Vec<Figure> {
        self.0
            .iter()
            .map(|((scenario, measurement, unit), values)| {
                let (median, min, max) = median(values);
                Figure {
                    scenario: scenario.to_string(),
                    measurement: measurement.to_string(),
                    unit: unit.to_string(),
                    median,
                    min,
                    max,
                    ratio_to_plain: None,
                }
            })
            .collect()
    }
}

impl Figure {
    /// A figure measured once.
    fn once(scenario: &str, measurement: &str, unit: &str, value: f64) -> Self {
        Figure {
            scenario: scenario.into(),
            measurement: measurement.into(),
            unit: unit.into(),
            median: value,
            min: value,
            max: value,
            ratio_to_plain: None,
        }
    }
}

/// Sets each figure's ratio to the median of the same measurement of `baseline` (from the same
/// run); figures without a baseline counterpart keep none.
fn compare_to(figures: &mut [Figure], baseline: &str) {
    let base: Vec<(String, f64)> =
        figures.iter().filter(|f| f.scenario == baseline).map(|f| (f.measurement.clone(), f.median)).collect();
    for f in figures.iter_mut().filter(|f| f.scenario != baseline) {
        f.ratio_to_plain = base.iter().find(|(m, _)| *m == f.measurement).map(|(_, b)| f.median / b);
    }
}

struct Scenario<'a> {
    name: &'static str,
    from: &'a Pod,
    to: &'a Pod,
    /// Nodes whose agents carry the traffic (for CPU).
    agents: &'static [u8],
}

fn rss_kb(pid: u32) -> f64 {
    crate::topology::rss_kib(pid).unwrap_or(0) as f64
}

fn median(values: &[f64]) -> (f64, f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let mid = if v.len() % 2 == 1 { v[v.len() / 2] } else { (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0 };
    (mid, v[0], v[v.len() - 1])
}

/// iperf3 from `from` to `to` (a server already listens there): (Gbit/s, bytes received).
/// Killed 30 s after its run should have ended, so a stalled data path cannot hang the bench.
fn iperf(topo: &Topology, from: &Pod, to: &Pod, streams: u32, seconds: u32) -> (f64, f64) {
    let limit = (seconds + 30).to_string();
    let out = topo.output_in(
        &from.netns,
        "timeout",
        &[&limit, "iperf3", "-c", &to.ip.to_string(), "-t", &seconds.to_string(), "-P", &streams.to_string(), "-J"],
    );
    assert!(out.status.success(), "iperf3 {} -> {}: {}", from.name, to.name, String::from_utf8_lossy(&out.stdout));
    let v: Value = serde_json::from_slice(&out.stdout).expect("iperf3 JSON");
    let received = &v["end"]["sum_received"];
    (received["bits_per_second"].as_f64().unwrap() / 1e9, received["bytes"].as_f64().unwrap())
}

fn rr(topo: &Topology, from: &Pod, to: &Pod, count: u32, size: usize) -> Value {
    let addr = SocketAddr::from((to.ip, ECHO_PORT)).to_string();
    let out = topo.output_in(
        &from.netns,
        bin("fm-peer"),
        &["rr", "--to", &addr, "--count", &count.to_string(), "--size", &size.to_string()],
    );
    assert!(out.status.success(), "rr {} -> {}: {}", from.name, to.name, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("rr JSON")
}

/// mesh-ebpf's `hop-redirect` object, in the target directory of the binaries
/// (target/<triple>/release/ as `cargo xtask build` makes them, or target/release/ from a
/// plain `cargo build`); absent when the binaries come from elsewhere (`FERRYMESH_BIN_DIR`).
fn hop_redirect_object() -> Option<PathBuf> {
    bin_dir()
        .ancestors()
        .skip(1)
        .take(2)
        .map(|target| target.join("bpfel-unknown-none/release/hop-redirect"))
        .find(|object| object.is_file())
}

/// `fm-peer hops` in `pod`'s netns: round trips between two threads over TCP on loopback, over
/// loopback TCP with sockmap redirection (when the `hop-redirect` object is there) and over a
/// Unix socket pair (the JSON it prints).
fn hops(topo: &Topology, pod: &Pod) -> Value {
    let object = hop_redirect_object();
    let mut args = vec!["hops"];
    if let Some(object) = object.as_deref().and_then(std::path::Path::to_str) {
        args.extend(["--sockmap", object]);
    }
    let out = topo.output_in(&pod.netns, bin("fm-peer"), &args);
    assert!(out.status.success(), "hops in {}: {}", pod.name, String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("hops JSON")
}

/// What the process hops cross-node adds cost at least: four per round trip (each way, the
/// client's agent receives on a loopback leg and the server's agent sends on one), at this
/// machine's `hop` figures; a sentence for the report, or nothing without them.
pub fn hop_floor(figures: &[Figure]) -> Option<String> {
    let median = |m: &str| find(figures, "hop", m).map(|f| f.median);
    let (tcp, unix) = (median("tcp_loopback_rt_p50")?, median("unix_rt_p50")?);
    let sockmap = median("sockmap_rt_p50").map_or(String::new(), |sockmap| {
        format!(
            " With sockmap redirection between the loopback legs' sockets a hop costs {:.1} us, so \
the four would cost {:.1} us.",
            sockmap / 2.0,
            sockmap * 2.0
        )
    });
    Some(format!(
        "Floor: cross-node adds four process hops per round trip over plain (two loopback legs each \
way). On this machine a hop costs {:.1} us over TCP on loopback and {:.1} us over a Unix socket \
(`hop`: half a round trip), so the four cost {:.1} us as they are and would still cost {:.1} us \
with no TCP stack at all, before any work in the agents.{sockmap}\n",
        tcp / 2.0,
        unix / 2.0,
        tcp * 2.0,
        unix * 2.0
    ))
}

/// Where the neutral tools' servers listen in a pod.
const SOCKPERF_PORT: u16 = 11111;
const NGINX_PORT: u16 = 8088;

/// Starts the neutral tools' servers in `pod`: `sockperf server` (TCP) and nginx answering every
/// request with a 3-byte 200, without logging (one process, no master), and waits until both
/// accept connections.
fn start_neutral_servers(topo: &Topology, pod: &Pod) {
    let ip = pod.ip.to_string();
    let mut sockperf = topo.command_in(&pod.netns, "sockperf");
    sockperf.args(["server", "--tcp", "-i", &ip, "-p", &SOCKPERF_PORT.to_string()]);
    topo.spawn(&format!("sockperf-{}", pod.name), sockperf);
    let dir = topo.dir.join(format!("nginx-{}", pod.name));
    std::fs::create_dir_all(&dir).expect("nginx directory");
    let d = dir.display();
    let conf = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log stderr warn;\n\
         events {{ worker_connections 4096; }}\n\
         http {{\n  access_log off;\n  client_body_temp_path {d}/body;\n  proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n  uwsgi_temp_path {d}/uwsgi;\n  scgi_temp_path {d}/scgi;\n\
         server {{ listen {ip}:{NGINX_PORT}; location / {{ return 200 \"ok\\n\"; }} }}\n}}\n"
    );
    std::fs::write(dir.join("nginx.conf"), conf).expect("nginx.conf");
    let mut nginx = topo.command_in(&pod.netns, "nginx");
    nginx.arg("-c").arg(dir.join("nginx.conf")).arg("-p").arg(&dir);
    topo.spawn(&format!("nginx-{}", pod.name), nginx);
    for port in [SOCKPERF_PORT, NGINX_PORT] {
        let addr = SocketAddr::from((pod.ip, port));
        wait_until(Duration::from_secs(10), &format!("{addr} to accept"), || {
            crate::topology::in_netns(&pod.netns, || std::net::TcpStream::connect(addr).is_ok())
        });
    }
}

/// `sockperf ping-pong` over TCP, 64-byte messages, full round trips, for `seconds`: p50, p99
/// and p99.9 in microseconds.
fn sockperf(topo: &Topology, from: &Pod, to: &Pod, seconds: u32) -> (f64, f64, f64) {
    let (limit, ip, port, secs) =
        ((seconds + 30).to_string(), to.ip.to_string(), SOCKPERF_PORT.to_string(), seconds.to_string());
    let args = ["ping-pong", "--tcp", "-i", &ip, "-p", &port, "-m", "64", "-t", &secs, "--full-rtt"];
    let out = topo.output_in(&from.netns, "timeout", &[&[limit.as_str(), "sockperf"][..], &args].concat());
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "sockperf {} -> {}: {text}", from.name, to.name);
    let percentile = |p: &str| {
        text.lines()
            .find_map(|l| l.split_once(&format!("percentile {p} ="))?.1.trim().parse::<f64>().ok())
            .unwrap_or_else(|| panic!("sockperf printed no percentile {p}: {text}"))
    };
    (percentile("50.000"), percentile("99.000"), percentile("99.900"))
}

/// A wrk latency (`116.00us`, `1.90ms`, `1.02s`) in milliseconds.
fn wrk_ms(value: &str) -> Option<f64> {
    let unit_at = value.find(|c: char| c.is_ascii_alphabetic())?;
    let (number, unit) = value.split_at(unit_at);
    let scale = match unit {
        "us" => 1e-3,
        "ms" => 1.0,
        "s" => 1e3,
        _ => return None,
    };
    Some(number.parse::<f64>().ok()? * scale)
}

/// wrk (one thread, 16 connections, `seconds`) against nginx in `to`: requests/s, p50 and p99
/// in ms. With `close`, every request carries `Connection: close`: requests/s is then new
/// connections/s. Any socket error or non-2xx answer fails the run.
fn wrk(topo: &Topology, from: &Pod, to: &Pod, seconds: u32, close: bool) -> (f64, f64, f64) {
    let (limit, duration, url) =
        ((seconds + 30).to_string(), format!("{seconds}s"), format!("http://{}:{NGINX_PORT}/", to.ip));
    let mut args = vec![limit.as_str(), "wrk", "-t1", "-c16", "-d", &duration, "--latency"];
    if close {
        args.extend(["-H", "Connection: close"]);
    }
    args.push(&url);
    let out = topo.output_in(&from.netns, "timeout", &args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "wrk {} -> {}: {text}{}", from.name, to.name, String::from_utf8_lossy(&out.stderr));
    assert!(!text.contains("Socket errors") && !text.contains("Non-2xx"), "wrk {} -> {}: {text}", from.name, to.name);
    let field = |prefix: &str| text.lines().find_map(|l| l.trim().strip_prefix(prefix).map(|v| v.trim().to_string()));
    let rps = field("Requests/sec:").and_then(|v| v.parse().ok());
    let (p50, p99) = (field("50%").as_deref().and_then(wrk_ms), field("99%").as_deref().and_then(wrk_ms));
    match (rps, p50, p99) {
        (Some(rps), Some(p50), Some(p99)) => (rps, p50, p99),
        _ => panic!("wrk {} -> {}: no Requests/sec or latency distribution in {text}", from.name, to.name),
    }
}

/// The benchmark topology: the two-node mesh (`shop` a, b on node 1 and c on node 2 enrolled;
/// `legacy` x on node 1 and y on node 2 not), every pod serving fm-peer, and iperf3, sockperf
/// and nginx servers in b, c and y.
pub fn topology() -> Topology {
    let topo = two_node_mesh();
    for pod in [topo.pod("shop", "b"), topo.pod("shop", "c"), topo.pod("legacy", "y")] {
        topo.start_iperf3_server(pod);
        start_neutral_servers(&topo, pod);
    }
    topo
}

/// Runs every scenario `options.rounds` times, interleaved, and returns the figures.
pub fn run(options: Options, mut progress: impl FnMut(&str)) -> Vec<Figure> {
    let topo = topology();
    let (a, b, c, x, y) = (
        topo.pod("shop", "a"),
        topo.pod("shop", "b"),
        topo.pod("shop", "c"),
        topo.pod("legacy", "x"),
        topo.pod("legacy", "y"),
    );
    let agent_pid = |node: u8| topo.pid(&format!("agent-node{node}")).expect("agent pid");
    std::thread::sleep(Duration::from_secs(1));
    let rss_idle = rss_kb(agent_pid(1));

    let scenarios = [
        Scenario { name: "plain", from: x, to: y, agents: &[] },
        Scenario { name: "capture", from: a, to: y, agents: &[1] },
        Scenario { name: "same-node", from: a, to: b, agents: &[1] },
        Scenario { name: "cross-node", from: a, to: c, agents: &[1, 2] },
    ];
    let mut samples = Samples::default();
    let mut add = |scenario, measurement, unit, value| samples.add((scenario, measurement, unit), value);
    for round in 1..=options.rounds {
        // What one process hop costs on this machine, in x (nothing there is captured).
        let hop = hops(&topo, x);
        for (path, p50, p99) in [
            ("tcp_loopback", "tcp_loopback_rt_p50", "tcp_loopback_rt_p99"),
            ("tcp_sockmap", "sockmap_rt_p50", "sockmap_rt_p99"),
            ("unix", "unix_rt_p50", "unix_rt_p99"),
        ] {
            // `tcp_sockmap` only where the eBPF object is (see `hop_redirect_object`).
            if let (Some(p50_us), Some(p99_us)) = (hop[path]["p50_us"].as_f64(), hop[path]["p99_us"].as_f64()) {
                add("hop", p50, "us", p50_us);
                add("hop", p99, "us", p99_us);
            }
        }
        for s in &scenarios {
            progress(&format!("round {round}/{}: {}", options.rounds, s.name));
            let cpu_before: f64 = s.agents.iter().map(|n| cpu_seconds(agent_pid(*n))).sum();
            let (gbits, bytes) = iperf(&topo, s.from, s.to, 1, options.iperf_seconds);
            let cpu: f64 = s.agents.iter().map(|n| cpu_seconds(agent_pid(*n))).sum::<f64>() - cpu_before;
            add(s.name, "throughput_1stream", "Gbit/s", gbits);
            if !s.agents.is_empty() {
                add(s.name, "cpu_per_gb", "s", cpu / (bytes / 1e9));
            }
            add(s.name, "throughput_4stream", "Gbit/s", iperf(&topo, s.from, s.to, 4, options.iperf_seconds).0);
            let small = rr(&topo, s.from, s.to, options.rr_count, 1);
            for (m, key) in [("rr_1b_p50", "p50_us"), ("rr_1b_p90", "p90_us"), ("rr_1b_p99", "p99_us")] {
                add(s.name, m, "us", small[key].as_f64().unwrap());
            }
            let large = rr(&topo, s.from, s.to, options.rr_count, 1024);
            for (m, key) in [("rr_1k_p50", "p50_us"), ("rr_1k_p99", "p99_us")] {
                add(s.name, m, "us", large[key].as_f64().unwrap());
            }
            // The neutral tools.
            let (p50, p99, p999) = sockperf(&topo, s.from, s.to, options.neutral_seconds);
            add(s.name, "sockperf_64b_p50", "us", p50);
            add(s.name, "sockperf_64b_p99", "us", p99);
            add(s.name, "sockperf_64b_p999", "us", p999);
            let (conns, _, _) = wrk(&topo, s.from, s.to, options.neutral_seconds, true);
            add(s.name, "wrk_conn_rate", "connections/s", conns);
            let (rps, p50, p99) = wrk(&topo, s.from, s.to, options.neutral_seconds, false);
            add(s.name, "wrk_rps_16c", "requests/s", rps);
            add(s.name, "wrk_16c_p50", "ms", p50);
            add(s.name, "wrk_16c_p99", "ms", p99);
            let started = Instant::now();
            let hits = topo.hits(s.from, SocketAddr::from((s.to.ip, HTTP_PORT)), options.conns);
            let elapsed = started.elapsed().as_secs_f64();
            assert_eq!(hits["failed"], 0, "{}: {hits}", s.name);
            add(s.name, "conn_rate", "connections/s", f64::from(options.conns) / elapsed);
        }
    }

    // Memory per idle connection: a holds that many connections to c's echo, across nodes, so
    // each connection is held by both agents (HBONE client and server); the figure is per agent.
    progress(&format!("agent memory with {} idle connections", options.idle_conns));
    let (pid1, pid2) = (agent_pid(1), agent_pid(2));
    let before = rss_kb(pid1) + rss_kb(pid2);
    let mut hold = topo.command_in(&a.netns, bin("fm-peer"));
    hold.args(["hold", "--to", &SocketAddr::from((c.ip, ECHO_PORT)).to_string()]);
    hold.args(["--count", &options.idle_conns.to_string()]);
    topo.spawn("hold", hold);
    wait_until(Duration::from_secs(120), "the idle connections to open", || {
        assert!(topo.is_running("hold"), "fm-peer hold failed: {}", topo.log("hold"));
        topo.log("hold").contains("held")
    });
    std::thread::sleep(Duration::from_secs(1));
    let per_conn = (rss_kb(pid1) + rss_kb(pid2) - before) / 2.0 / f64::from(options.idle_conns);
    topo.signal_and_wait("hold", libc::SIGKILL);

    // Memory per workload: that many pods on a node outside the topology, held but not enrolled.
    progress(&format!("agent memory with {} workloads", options.workloads));
    let before = rss_kb(pid1);
    let version = |topo: &Topology| topo.status(1)["config_version"].as_u64().unwrap_or(0);
    let v0 = version(&topo);
    for ns in 0..options.workloads / 100 {
        topo.write_config_file(&format!("scale-{ns:03}.yaml"), &scale_namespace_yaml(ns as usize, "far-away"));
    }
    let want = format!("pods={}", options.workloads + 5);
    wait_until(Duration::from_secs(120), "the agent to hold the workloads", || {
        version(&topo) > v0 && topo.log("mesh-ctrl").contains(&want)
    });
    std::thread::sleep(Duration::from_secs(2));
    let per_workload = (rss_kb(pid1) - before) / f64::from(options.workloads);

    let mut figures = samples.figures();
    for (measurement, value) in [("rss_idle", rss_idle), ("rss_per_conn", per_conn), ("rss_per_workload", per_workload)]
    {
        figures.push(Figure::once("agent", measurement, "KB", value));
    }
    compare_to(&mut figures, "plain");
    figures
}

/// The figures as an aligned table.
pub fn table(figures: &[Figure]) -> String {
    let mut out = format!(
        "{:<12} {:<20} {:>12} {:>12} {:>12} {:<14} {:>8}\n",
        "scenario", "measurement", "median", "min", "max", "unit", "ratio"
    );
    for f in figures {
        let ratio = f.ratio_to_plain.map(|r| format!("{r:.2}")).unwrap_or_else(|| "-".into());
        out.push_str(&format!(
            "{:<12} {:<20} {:>12.2} {:>12.2} {:>12.2} {:<14} {:>8}\n",
            f.scenario, f.measurement, f.median, f.min, f.max, f.unit, ratio
        ));
    }
    out
}

/// Time of one inbound decision (`PolicySet::decide`, what the agent enforces with) with 10k
/// AuthorizationPolicies loaded (100 namespaces of 100 policies, each selecting by label and
/// matching by principal), and with 100, to show that it does not grow with the number of
/// policies. Measured with criterion (its statistics written under `criterion_dir`) in
/// `rounds` interleaved rounds, so that a noisy moment of a shared machine lands on both
/// sizes alike: the figure is the median of the rounds' criterion medians, with the smallest
/// and largest round as min and max.
pub fn policy_decision(quick: bool, rounds: usize, criterion_dir: &std::path::Path) -> Vec<Figure> {
    use criterion::Criterion;
    use ferrymesh_policy::spec::AuthorizationPolicySpec;
    use ferrymesh_policy::{PolicySet, Request, Transport, Workload};
    let build = |namespaces: usize, per_namespace: usize| {
        let mut policies = Vec::new();
        for ns in 0..namespaces {
            for i in 0..per_namespace {
                let yaml = format!(
                    "selector: {{matchLabels: {{app: app{i}}}}}\naction: ALLOW\nrules: [{{from: [{{source: {{principals: [\"cluster.local/ns/ns{ns}/sa/sa{i}\"]}}}}], to: [{{operation: {{ports: [\"8080\"]}}}}]}}]"
                );
                let spec: AuthorizationPolicySpec = serde_yaml::from_str(&yaml).expect("policy YAML");
                policies.push(spec.validate(&format!("ns{ns}"), &format!("p{i}")).expect("valid policy"));
            }
        }
        PolicySet::new(policies, vec![])
    };
    let labels = std::collections::BTreeMap::from([("app".to_string(), "app7".to_string())]);
    let mut criterion = Criterion::default()
        .output_directory(criterion_dir)
        .without_plots()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(if quick { 1 } else { 2 }));
    let mut group = criterion.benchmark_group("policy_decision");
    let cases = [
        ("policy_decision", "10k_policies", build(100, 100), "ns42"),
        ("policy_decision_100_policies", "100_policies", build(1, 100), "ns0"),
    ];
    let principals: Vec<SpiffeId> =
        cases.iter().map(|c| SpiffeId::new("cluster.local", c.3, "sa7").expect("a valid identity")).collect();
    let requests: Vec<Request> = principals
        .iter()
        .map(|principal| Request {
            source_ip: "10.244.1.2".parse().unwrap(),
            source: Some(principal),
            destination_ip: "10.244.2.3".parse().unwrap(),
            destination_port: 8080,
        })
        .collect();
    let mut rounds_ns = vec![Vec::new(); cases.len()];
    for round in 1..=rounds {
        for (((_, id, set, namespace), request), times) in cases.iter().zip(&requests).zip(&mut rounds_ns) {
            let workload = Workload { namespace, labels: &labels };
            let verdict = set.decide(&workload, request, Transport::Mtls);
            assert!(
                verdict.allowed && verdict.policy == format!("{namespace}/p7 rule 0"),
                "the timed decision is a real match: {verdict:?}"
            );
            let name = format!("{id}_round{round}");
            group.bench_function(&name, |b| {
                b.iter(|| set.decide(std::hint::black_box(&workload), std::hint::black_box(request), Transport::Mtls))
            });
            let estimates = criterion_dir.join("policy_decision").join(&name).join("new/estimates.json");
            let estimates: Value = serde_json::from_slice(&std::fs::read(&estimates).expect("criterion estimates"))
                .expect("criterion estimates JSON");
            times.push(estimates["median"]["point_estimate"].as_f64().expect("criterion median"));
        }
    }
    group.finish();
    cases
        .iter()
        .zip(&rounds_ns)
        .map(|((measurement, ..), times)| {
            let (median, min, max) = median(times);
            Figure {
                scenario: "policy".into(),
                measurement: (*measurement).into(),
                unit: "ns".into(),
                median,
                min,
                max,
                ratio_to_plain: None,
            }
        })
        .collect()
}

/// The figure of `measurement` in `scenario`, if `figures` has it.
fn find<'a>(figures: &'a [Figure], scenario: &str, measurement: &str) -> Option<&'a Figure> {
    figures.iter().find(|f| f.scenario == scenario && f.measurement == measurement)
}

/// A target: what it says, the measured value, its unit, and whether the value meets it.
type Target<'a> = (&'a str, Option<f64>, &'a str, fn(f64) -> bool);

/// Issue #7's and #19's targets checked against `figures`, as Markdown table rows
/// (`| target | measured | met |`). A target whose figures are missing is reported as such.
pub fn targets(figures: &[Figure]) -> String {
    let ratio = |scenario: &str, measurement: &str| find(figures, scenario, measurement).and_then(|f| f.ratio_to_plain);
    let median = |scenario: &str, measurement: &str| find(figures, scenario, measurement).map(|f| f.median);
    let added = |measurement: &str| Some(median("cross-node", measurement)? - median("plain", measurement)?);
    let scaling = || Some(median("policy", "policy_decision")? / median("policy", "policy_decision_100_policies")?);
    #[rustfmt::skip]
    let rows: [Target<'_>; 15] = [
        ("cross-node throughput, 1 stream >= 0.6 x plain", ratio("cross-node", "throughput_1stream"), "x", |v| v >= 0.6),
        ("same-node throughput, 1 stream >= 0.9 x plain", ratio("same-node", "throughput_1stream"), "x", |v| v >= 0.9),
        ("cross-node added latency p50 <= 30 us", added("rr_1b_p50"), "us", |v| v <= 30.0),
        ("cross-node added latency p99 <= 60 us", added("rr_1b_p99"), "us", |v| v <= 60.0),
        ("cross-node connections/s >= 0.5 x plain", ratio("cross-node", "conn_rate"), "x", |v| v >= 0.5),
        ("agent idle RSS <= 15 MiB", median("agent", "rss_idle").map(|kb| kb / 1024.0), "MiB", |v| v <= 15.0),
        ("agent RSS per idle connection <= 4 KB", median("agent", "rss_per_conn"), "KB", |v| v <= 4.0),
        ("agent RSS per workload <= 2 KB", median("agent", "rss_per_workload"), "KB", |v| v <= 2.0),
        ("policy decision < 1 us at 10k policies", median("policy", "policy_decision"), "ns", |v| v < 1000.0),
        ("policy decision independent of the number of policies (10k / 100 <= 1.5)", scaling(), "x", |v| v <= 1.5),
        ("#19: cross-node added sockperf 64 B p50 <= 35 us", added("sockperf_64b_p50"), "us", |v| v <= 35.0),
        ("#19: cross-node added sockperf 64 B p99 <= 70 us", added("sockperf_64b_p99"), "us", |v| v <= 70.0),
        ("#19: cross-node throughput, 1 stream >= 0.40 x plain", ratio("cross-node", "throughput_1stream"), "x", |v| v >= 0.4),
        ("#19: cross-node CPU per GB <= 1.8 s", median("cross-node", "cpu_per_gb"), "s", |v| v <= 1.8),
        ("#19: cross-node new connections/s (wrk) >= 0.45 x plain", ratio("cross-node", "wrk_conn_rate"), "x", |v| v >= 0.45),
    ];
    let mut out = String::from("| target | measured | met |\n| --- | --- | --- |\n");
    for (target, value, unit, met) in rows {
        let (measured, verdict) = match value {
            Some(v) => (format!("{v:.2} {unit}"), if met(v) { "yes" } else { "no" }),
            None => ("not measured".to_string(), "-"),
        };
        out.push_str(&format!("| {target} | {measured} | {verdict} |\n"));
    }
    out
}

/// VIPs of the waypoint benchmark: `web` (no waypoint) and `web-l7` (bound to the waypoint),
/// both selecting web-1 (node 1) and web-2 (node 2) on the fm-echo port; `grpc` and `grpc-l7`
/// the same on the gRPC port.
const L7_DIRECT: &str = "10.96.0.60";
const L7_WAYPOINT: &str = "10.96.0.61";
const GRPC_DIRECT: &str = "10.96.0.62";
const GRPC_WAYPOINT: &str = "10.96.0.63";
/// Service web-l7-features: as web-l7, with every resilience feature enabled and none
/// triggered ([`FEATURES`]).
const L7_FEATURES: &str = "10.96.0.64";
/// The Services of the waypoint topology, for `fm-bench --hold --only waypoint`.
pub const WAYPOINT_SERVICES: &str = "HTTP 10.96.0.60:80 direct, 10.96.0.61:80 through the waypoint, \
10.96.0.64:80 through the waypoint with every feature enabled and none triggered; \
gRPC 10.96.0.62:80 direct, 10.96.0.63:80 through the waypoint";

/// What Service web-l7-features has, enabled but never triggered: an HTTPRoute with a request
/// and a per-try timeout and a retry of 503s; a TrafficPolicy on its rule with a 0% delay, a
/// 0% abort and a local limit of a million requests a second; a DestinationRule with a
/// connection pool, outlier detection and least-request balancing; a RequestAuthentication
/// (the load's requests carry no token). (Global rate limits are left out: each request costs
/// a call to the rate-limit service, by design. Tracing is the waypoint's, not a Service's: it
/// is measured on the waypoint restarted with it, `waypoint-traced`.)
const FEATURES: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: features, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: web-l7-features, port: 80}]
  rules:
  - name: all
    timeouts: {request: 10s, backendRequest: 5s}
    retry: {codes: [503], attempts: 2, backoff: 25ms}
    backendRefs: [{name: web-l7-features, port: 80}]
---
apiVersion: ferrymesh.io/v1alpha1
kind: TrafficPolicy
metadata: {name: features, namespace: shop}
spec:
  targetRefs: [{group: gateway.networking.k8s.io, kind: HTTPRoute, name: features, sectionName: all}]
  fault:
    delay: {fixedDelay: 1s, percentage: {value: 0}}
    abort: {httpStatus: 503, percentage: {value: 0}}
  rateLimit:
    local:
    - limit: {requests: 1000000, unit: Second}
---
apiVersion: ferrymesh.io/v1alpha1
kind: DestinationRule
metadata: {name: features, namespace: shop}
spec:
  host: web-l7-features
  trafficPolicy:
    connectionPool:
      tcp: {maxConnections: 100000}
      http: {http1MaxPendingRequests: 100000, http2MaxRequests: 100000, maxRetries: 1000}
    outlierDetection: {consecutive5xxErrors: 5, interval: 10s, baseEjectionTime: 30s}
    loadBalancer: {simple: LEAST_REQUEST}
---
apiVersion: ferrymesh.io/v1alpha1
kind: RequestAuthentication
metadata: {name: features, namespace: shop}
spec:
  targetRefs: [{kind: Service, group: \"\", name: web-l7-features}]
  jwtRules:
  - issuer: https://issuer.example
    jwks: '{\"keys\":[{\"kty\":\"EC\",\"crv\":\"P-256\",\"x\":\"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4\",\"y\":\"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM\",\"kid\":\"1\",\"alg\":\"ES256\"}]}'
";

/// The waypoint benchmark topology: `shop` enrolled with client a and web-1 on node 1, web-2 and
/// the waypoint on node 2; Services as [`L7_DIRECT`] and its neighbours say; fm-echo serving
/// HTTP and gRPC in web-1 and web-2.
pub fn waypoint_topology() -> Topology {
    let spec = crate::TopologySpec::nodes(2)
        .pod("shop", "a", 1)
        .pod("shop", "web-1", 1)
        .pod("shop", "web-2", 2)
        .pod("shop", "waypoint", 2);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    for name in ["web-1", "web-2"] {
        topo.write_pod(topo.pod("shop", name), &[("app", "web")]);
    }
    topo.write_waypoint_pod(topo.pod("shop", "waypoint"));
    topo.write_waypoint("shop", "waypoint");
    let service = |name: &str, vip: &str, port: u16, bound: bool| {
        let label = if bound { "ferrymesh.io/use-waypoint: waypoint" } else { "" };
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{{label}}}\nspec:\n  clusterIP: {vip}\n  selector: {{app: web}}\n  ports:\n  - port: 80\n    targetPort: {port}\n"
        );
        topo.write_config_file(&format!("svc-shop-{name}.yaml"), &text);
    };
    service("web", L7_DIRECT, ECHO_HTTP_PORT, false);
    service("web-l7", L7_WAYPOINT, ECHO_HTTP_PORT, true);
    service("web-l7-features", L7_FEATURES, ECHO_HTTP_PORT, true);
    topo.write_config_file("features.yaml", FEATURES);
    service("grpc", GRPC_DIRECT, ECHO_GRPC_PORT, false);
    service("grpc-l7", GRPC_WAYPOINT, ECHO_GRPC_PORT, true);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a", "shop/web-1"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["shop/web-2"], Duration::from_secs(10));
    // Every feature of web-l7-features was accepted (a refused object would leave the Service
    // plain, and its figures would measure nothing).
    let started = Instant::now();
    loop {
        let routes = String::from_utf8_lossy(&topo.meshctl(2, &["routes"]).stdout).into_owned();
        let services = String::from_utf8_lossy(&topo.meshctl(2, &["services"]).stdout).into_owned();
        if routes.contains("retry 503 x2")
            && routes.contains("rate limit 1000000/1s burst 1000000 (TrafficPolicy shop/features)")
            && routes.contains("fault delay 1000ms 0%, abort 503 0% (TrafficPolicy shop/features)")
            && services.contains("shop/features: maxConnections 100000")
            && String::from_utf8_lossy(&topo.meshctl(2, &["policies"]).stdout)
                .contains("RequestAuthentication shop/features")
        {
            break;
        }
        assert!(
            started.elapsed() < crate::mesh::CONFIG_WAIT,
            "the features of web-l7-features did not all arrive:\n{routes}\n{services}\n{}",
            topo.log("mesh-ctrl")
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    topo.start_waypoint(topo.pod("shop", "waypoint"));
    for name in ["web-1", "web-2"] {
        topo.serve_echo_with(topo.pod("shop", name), false);
        topo.serve_grpc(topo.pod("shop", name));
    }
    topo
}

/// Runs fm-echo `args` in `from` and returns its JSON.
fn echo_json(topo: &Topology, from: &Pod, args: &[&str]) -> Value {
    let out = topo.output_in(&from.netns, bin("fm-echo"), args);
    assert!(out.status.success(), "fm-echo {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("fm-echo JSON")
}

/// The waypoint scenarios: HTTP/1.1 at a fixed 1000 requests/s (open loop, 10 connections) and
/// gRPC calls back to back on one channel, each to a Service through the waypoint
/// (`waypoint`) and to the same endpoints without it (`l7-direct`), in interleaved rounds; the
/// waypoint's CPU per 1000 requests and its memory; and the most HTTP/1.1 requests a second
/// each carries, and the waypoint with every feature enabled and none triggered
/// (`waypoint-features`, [`FEATURES`]), with its ratio to the plain waypoint.
pub fn waypoint(options: Options, mut progress: impl FnMut(&str)) -> Vec<Figure> {
    let topo = waypoint_topology();
    let a = topo.pod("shop", "a");
    let pid = topo.pid("waypoint-waypoint").expect("waypoint pid");
    let seconds = if options.rounds == 1 { 3 } else { 10 };
    let calls = (options.rr_count / 4).max(500).to_string();
    let mut samples = Samples::default();
    let mut add = |scenario, measurement, unit, value| samples.add((scenario, measurement, unit), value);
    let rss_idle = rss_kb(pid);
    for round in 1..=options.rounds {
        for (scenario, http, grpc) in [("l7-direct", L7_DIRECT, GRPC_DIRECT), ("waypoint", L7_WAYPOINT, GRPC_WAYPOINT)]
        {
            progress(&format!("round {round}/{}: {scenario}", options.rounds));
            let cpu_before = cpu_seconds(pid);
            let to = format!("{http}:80");
            let load = echo_json(
                &topo,
                a,
                &["load", "--to", &to, "--rate", "1000", "--seconds", &seconds.to_string(), "--connections", "10"],
            );
            assert_eq!(load["failed"], 0, "{scenario}: {load}");
            let requests = load["requests"].as_f64().unwrap_or(0.0);
            add(scenario, "http1_rate", "requests/s", load["rate"].as_f64().unwrap_or(0.0));
            add(scenario, "http1_p50_at_1000rps", "us", load["p50_us"].as_f64().unwrap_or(0.0));
            add(scenario, "http1_p99_at_1000rps", "us", load["p99_us"].as_f64().unwrap_or(0.0));
            if scenario == "waypoint" {
                let cpu = cpu_seconds(pid) - cpu_before;
                add(scenario, "cpu_per_1000_requests", "s", cpu / (requests / 1000.0));
            }
            let grpc = echo_json(&topo, a, &["grpc", "--to", &format!("{grpc}:80"), "--count", &calls]);
            add(scenario, "grpc_rate_1conn", "calls/s", grpc["rate"].as_f64().unwrap_or(0.0));
            add(scenario, "grpc_p50", "us", grpc["p50_us"].as_f64().unwrap_or(0.0));
            add(scenario, "grpc_p99", "us", grpc["p99_us"].as_f64().unwrap_or(0.0));
        }
    }
    // The most requests a second each path carries (more offered than any carries, over 16
    // kept-alive connections), the waypoint with and without every feature enabled.
    let (offered, seconds) = (20_000, if options.rounds == 1 { 1 } else { 2 });
    for round in 1..=options.rounds {
        for (scenario, http) in
            [("l7-direct", L7_DIRECT), ("waypoint", L7_WAYPOINT), ("waypoint-features", L7_FEATURES)]
        {
            progress(&format!("round {round}/{}: {scenario} at its most", options.rounds));
            let to = format!("{http}:80");
            let args = ["load", "--to", &to, "--rate", &offered.to_string(), "--seconds", &seconds.to_string()];
            let load = echo_json(&topo, a, &[&args[..], &["--connections", "16"]].concat());
            assert_eq!(load["failed"], 0, "{scenario}: {load}");
            add(scenario, "http1_max_rate", "requests/s", load["rate"].as_f64().unwrap_or(0.0));
        }
    }
    let rss_loaded = rss_kb(pid);
    // Tracing enabled but not triggered: the waypoint restarted with a collector and no trace
    // sampled (the load sends no traceparent), at its most, after the rounds above.
    let collector = topo.serve_otlp();
    topo.signal_and_wait("waypoint-waypoint", libc::SIGTERM);
    let traced = ["--tracing-collector", &collector, "--tracing-sampling", "0"];
    topo.start_waypoint_replica(topo.pod("shop", "waypoint"), "waypoint", &traced);
    for round in 1..=options.rounds {
        progress(&format!("round {round}/{}: waypoint-traced at its most", options.rounds));
        let to = format!("{L7_WAYPOINT}:80");
        let args = ["load", "--to", &to, "--rate", &offered.to_string(), "--seconds", &seconds.to_string()];
        let load = echo_json(&topo, a, &[&args[..], &["--connections", "16"]].concat());
        assert_eq!(load["failed"], 0, "waypoint-traced: {load}");
        add("waypoint-traced", "http1_max_rate", "requests/s", load["rate"].as_f64().unwrap_or(0.0));
    }
    let mut figures = samples.figures();
    for (measurement, value) in [("rss_idle", rss_idle), ("rss_after_load", rss_loaded)] {
        figures.push(Figure::once("waypoint", measurement, "KB", value));
    }
    // Against the same Service without the waypoint, in the same run.
    compare_to(&mut figures, "l7-direct");
    // What the features cost when none is triggered: against the plain waypoint.
    let max_rate = |scenario: &str| find(&figures, scenario, "http1_max_rate").map(|f| f.median);
    let costs: Vec<Figure> = ["waypoint-features", "waypoint-traced"]
        .into_iter()
        .filter_map(|scenario| {
            let (plain, featured) = (max_rate("waypoint")?, max_rate(scenario)?);
            Some(Figure::once(scenario, "http1_max_rate_vs_waypoint", "x", featured / plain))
        })
        .collect();
    figures.extend(costs);
    figures
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(scenario: &str, measurement: &str, median: f64, ratio: Option<f64>) -> Figure {
        Figure {
            scenario: scenario.into(),
            measurement: measurement.into(),
            unit: String::new(),
            median,
            min: median,
            max: median,
            ratio_to_plain: ratio,
        }
    }

    #[test]
    fn targets_compare_each_figure_with_its_bound() {
        let figures = vec![
            figure("cross-node", "throughput_1stream", 4.0, Some(0.3)),
            figure("same-node", "throughput_1stream", 15.0, Some(1.1)),
            figure("plain", "rr_1b_p50", 40.0, None),
            figure("cross-node", "rr_1b_p50", 65.0, Some(1.6)),
            figure("agent", "rss_idle", 13_000.0, None),
            figure("policy", "policy_decision", 300.0, None),
            figure("policy", "policy_decision_100_policies", 280.0, None),
        ];
        let table = targets(&figures);
        let row = |start: &str| table.lines().find(|l| l.starts_with(&format!("| {start}"))).unwrap().to_string();
        assert_eq!(row("cross-node throughput"), "| cross-node throughput, 1 stream >= 0.6 x plain | 0.30 x | no |");
        assert_eq!(row("same-node throughput"), "| same-node throughput, 1 stream >= 0.9 x plain | 1.10 x | yes |");
        assert_eq!(row("cross-node added latency p50"), "| cross-node added latency p50 <= 30 us | 25.00 us | yes |");
        assert_eq!(row("cross-node added latency p99"), "| cross-node added latency p99 <= 60 us | not measured | - |");
        assert_eq!(row("agent idle RSS"), "| agent idle RSS <= 15 MiB | 12.70 MiB | yes |");
        assert!(row("policy decision independent").ends_with("| 1.07 x | yes |"));
        assert_eq!(
            row("#19: cross-node throughput"),
            "| #19: cross-node throughput, 1 stream >= 0.40 x plain | 0.30 x | no |"
        );
    }

    #[test]
    fn hop_floor_is_four_hops_at_the_measured_cost() {
        assert_eq!(hop_floor(&[]), None);
        let figures = [figure("hop", "tcp_loopback_rt_p50", 21.0, None), figure("hop", "unix_rt_p50", 14.0, None)];
        let floor = hop_floor(&figures).unwrap();
        assert!(floor.contains("10.5 us over TCP on loopback and 7.0 us over a Unix socket"), "{floor}");
        assert!(floor.contains("cost 42.0 us as they are and would still cost 28.0 us"), "{floor}");
        assert!(!floor.contains("sockmap"), "no sockmap sentence without its figure: {floor}");
        let with_sockmap = [figures.as_slice(), &[figure("hop", "sockmap_rt_p50", 15.0, None)]].concat();
        let floor = hop_floor(&with_sockmap).unwrap();
        assert!(floor.contains("a hop costs 7.5 us, so the four would cost 30.0 us."), "{floor}");
    }
}
