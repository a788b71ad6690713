//! fm-bench: the benchmark harness (`cargo xtask bench [--quick]`). Runs plain TCP, eBPF
//! capture, same-node and cross-node mesh side by side on one netns topology, then times the
//! policy decision with 10k policies loaded, then requests through a waypoint next to the same
//! Service without it; writes `results.json`, prints a table and, for a
//! full run, rewrites docs/BENCHMARKS.md. Needs root.

use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use ferrymesh_testbed::bench::{self, Figure, Options};

/// Benchmark ferrymesh against plain TCP on this machine.
#[derive(Debug, Parser)]
struct Args {
    /// One short round (about a minute and a half), for spot checks.
    #[arg(long)]
    quick: bool,
    /// Where to write the results.
    #[arg(long, default_value = "target/bench/results.json")]
    out: PathBuf,
    /// Also write this Markdown report (the machine, the date, the command and the table).
    #[arg(long)]
    report: Option<PathBuf>,
    /// Measure nothing: build the benchmark topology (with `--only waypoint`, the waypoint's),
    /// print its pods and agents, and keep it up until Ctrl-C (for profiling by hand).
    #[arg(long)]
    hold: bool,
    /// Run only these parts (repeat or comma-separate); all of them by default. A partial run
    /// never writes the report.
    #[arg(long, value_enum, value_delimiter = ',')]
    only: Vec<Part>,
}

/// A part of the benchmark.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Part {
    /// Plain, capture, same-node and cross-node TCP.
    Mesh,
    /// The policy decision.
    Policy,
    /// Requests through a waypoint.
    Waypoint,
}

fn main() {
    let args = Args::parse();
    if args.hold {
        return hold(args.only.as_slice() == [Part::Waypoint]);
    }
    let options = if args.quick { Options::QUICK } else { Options::FULL };
    let started = Instant::now();
    let runs = |part| args.only.is_empty() || args.only.contains(&part);
    let mut figures = Vec::new();
    if runs(Part::Mesh) {
        figures.extend(bench::run(options, |what| eprintln!("fm-bench: {what}")));
    }
    if runs(Part::Policy) {
        eprintln!("fm-bench: policy decisions");
        let criterion_dir = args.out.parent().unwrap_or(std::path::Path::new(".")).join("criterion");
        figures.extend(bench::policy_decision(args.quick, options.rounds, &criterion_dir));
    }
    if runs(Part::Waypoint) {
        eprintln!("fm-bench: waypoint");
        figures.extend(bench::waypoint(options, |what| eprintln!("fm-bench: waypoint {what}")));
    }
    if let Some(dir) = args.out.parent() {
        std::fs::create_dir_all(dir).expect("create the output directory");
    }
    std::fs::write(&args.out, serde_json::to_string_pretty(&figures).expect("results serialize"))
        .expect("write results");
    let table = bench::table(&figures);
    println!("{table}");
    eprintln!("fm-bench: {} figures in {} ({:.0?})", figures.len(), args.out.display(), started.elapsed());
    if let Some(report) = args.report.filter(|_| args.only.is_empty()) {
        std::fs::write(&report, markdown(&figures, &table, args.quick)).expect("write the report");
    }
}

/// Keeps the benchmark topology up until Ctrl-C: the mesh one, or with `--only waypoint` the
/// waypoint one.
fn hold(waypoint: bool) {
    ctrlc::set_handler(|| {
        ferrymesh_testbed::topology::cleanup_all();
        std::process::exit(130);
    })
    .expect("Ctrl-C handler");
    let topo = if waypoint { bench::waypoint_topology() } else { bench::topology() };
    for pod in &topo.pods {
        println!("pod {}/{} node{} {} netns {}", pod.namespace, pod.name, pod.node, pod.ip, pod.netns);
    }
    for node in &topo.nodes {
        let label = format!("agent-node{}", node.index);
        println!("{label} pid {} netns {}", topo.pid(&label).unwrap_or(0), node.netns);
    }
    if waypoint {
        println!("waypoint pid {}", topo.pid("waypoint-waypoint").unwrap_or(0));
        println!("Services: {}", bench::WAYPOINT_SERVICES);
    } else {
        println!("iperf3 servers in shop/b, shop/c, legacy/y");
    }
    println!("Ctrl-C to tear down");
    loop {
        std::thread::park();
    }
}

fn markdown(figures: &[Figure], table: &str, quick: bool) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("model name").map(|v| v.trim_start_matches([' ', '\t', ':']).to_string()))
        .unwrap_or_default();
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now());
    let command = if quick { "cargo xtask bench --quick" } else { "cargo xtask bench" };
    let targets = bench::targets(figures);
    let floor = bench::hop_floor(figures).unwrap_or_default();
    format!(
        "# Benchmarks\n\nRecorded by `{command}` (the harness is `tests/src/bench.rs`; results also in\n`target/bench/results.json`). Scenarios, all on one netns topology and interleaved round by\nround: `plain` (two unmeshed pods on two nodes), `capture` (meshed pod to an unmeshed pod on\nthe other node: eBPF capture into the agent, spliced to plain TCP), `same-node` (two meshed\npods on one node: node-local handover inside the agent, spliced), `cross-node` (meshed pods on\ntwo nodes: HBONE, mTLS between two agents), each measured with neutral tools (iperf3;\n`sockperf_*`: sockperf ping-pong, 64 B over TCP, full round trips; `wrk_*`: wrk, one thread and\n16 connections, against nginx, `wrk_conn_rate` with `Connection: close`) and with fm-peer (`rr_*`,\n`conn_rate`: one connection at a time, so a new connection's latency; rates under load are\n`wrk_conn_rate`'s); `hop` holds what one process hop costs on this machine (`fm-peer\nhops`: round trips between two threads over TCP on loopback, over loopback TCP with sockmap\nredirection (`sockmap_rt_*`, mesh-ebpf's `hop-redirect`) and over a Unix socket pair, each two\nhops); `agent` and `policy` hold agent-wide figures\n(`rss_per_conn` is per agent holding the connection: each cross-node connection is held by\nboth). Ratios are to `plain` in the same run; only compare figures from one run.\n\n- machine: {cpu}, {cores} cores, Linux {}\n- date: {date}\n\n```\n{table}```\n\n## Targets (issues #7 and #19)\n\n{targets}\n{floor}\nWhere the time goes, and what would remove it: [PERFORMANCE.md](PERFORMANCE.md).\n",
        kernel.trim()
    )
}
