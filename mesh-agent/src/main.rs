//! mesh-agent: the ferrymesh node agent.
#![deny(unsafe_code)]

mod admin;
mod cni;
use ferrymesh_dataplane::{config_client, ctrl, error, flows, identity, lb, limits, state, tls};
mod discover;
#[expect(unsafe_code, reason = "ebpf::sys wraps two bpf(2) commands, each with a SAFETY comment")]
mod ebpf;
mod enroll;
#[expect(unsafe_code, reason = "descriptors received over SCM_RIGHTS become OwnedFds, each with a SAFETY comment")]
mod handover;
#[expect(unsafe_code, reason = "the syscall wrappers live here, each with a SAFETY comment")]
mod netns;
mod proxy;
mod telemetry;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use clap::Parser;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;

/// ferrymesh node agent.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Name of the node this agent serves; it enrolls the pods scheduled there.
    #[arg(long, env = "FERRYMESH_NODE_NAME", required_unless_present_any = ["uninstall", "install_cni"])]
    node_name: Option<String>,
    /// Directory (on a bpf filesystem) where the eBPF maps and links are pinned, so enrolled
    /// pods stay captured, and closed, while no agent runs; an agent adopts what it finds here.
    #[arg(long, env = "FERRYMESH_BPF_DIR", default_value = "/sys/fs/bpf/ferrymesh")]
    bpf_dir: PathBuf,
    /// Remove every eBPF object pinned under --bpf-dir, which releases every pod this node
    /// captured, and the CNI plugin (from --cni-conf-dir's conflists and --cni-bin-dir), and
    /// exit. Stop the agent first: a running agent keeps its hooks until it exits.
    #[arg(long)]
    uninstall: bool,
    /// Install the CNI plugin (`ferrymesh-cni`, found next to this binary) into --cni-bin-dir
    /// and chain it last into the first *.conflist of --cni-conf-dir, and exit (the DaemonSet's
    /// init container). Idempotent.
    #[arg(long)]
    install_cni: bool,
    /// While running, keep the CNI plugin chained: every 2 s check that the first *.conflist
    /// of --cni-conf-dir still chains it, and chain it again (copying `ferrymesh-cni`, found
    /// next to this binary, into --cni-bin-dir) when the node's CNI has rewritten the file
    /// without it, as istio-cni does. The DaemonSet sets it, with the init container's mounts.
    #[arg(long)]
    watch_cni: bool,
    /// The node's CNI binary directory.
    #[arg(long, default_value = "/opt/cni/bin")]
    cni_bin_dir: PathBuf,
    /// The node's CNI configuration directory.
    #[arg(long, default_value = "/etc/cni/net.d")]
    cni_conf_dir: PathBuf,
    /// mesh-ctrl's address: https only, verified against --ca-root.
    #[arg(long, env = "FERRYMESH_CTRL", default_value = "https://ferrymesh-ctrl.ferrymesh-system.svc:15012")]
    ctrl: String,
    /// The mesh root (PEM, one or more certificates) mesh-ctrl must prove itself against, held
    /// out of band: root-cert.pem of mesh-ctrl's --ca-dir in local mode, the mounted
    /// ferrymesh-ca-root-cert ConfigMap in Kubernetes. Read again for every connection.
    #[arg(long, env = "FERRYMESH_CA_ROOT")]
    ca_root: Option<PathBuf>,
    /// Unix socket where the running agent hands its pods' listeners to a successor. An agent
    /// that starts while another listens here takes over from it: no new connection is refused
    /// meanwhile, and the other drains. (Not `*.sock`: `meshctl --agents-dir` takes those for
    /// admin sockets.)
    #[arg(long, default_value = "/var/run/ferrymesh/handover")]
    handover_socket: PathBuf,
    /// Unix socket where the CNI plugin (`ferrymesh-cni`) asks the agent to hold a new pod of
    /// the mesh closed until it is enrolled; without an agent here the plugin fails the pod's
    /// sandbox (try again later), so no mesh pod runs before the agent. The plugin's
    /// network configuration names it (`agent_socket`).
    #[arg(long, default_value = "/var/run/ferrymesh/cni")]
    cni_socket: PathBuf,
    /// Where /proc/sys/net is mounted writable: the agent sets each enrolled pod's
    /// fwmark sysctls there from inside the pod's netns. An unprivileged agent's own /proc/sys
    /// is read-only; the DaemonSet mounts the host's /proc/sys/net (as Cilium does).
    #[arg(long, default_value = "/proc/sys/net")]
    proc_sys_net: PathBuf,
    /// How long a stopping agent (SIGTERM, or taken over) lets the connections it carries run
    /// on before it closes them and exits.
    #[arg(long, default_value = "5m", value_parser = humantime::parse_duration)]
    drain_grace: std::time::Duration,
    /// Unix socket of the admin API (used by meshctl --agent).
    #[arg(long, default_value = "/var/run/ferrymesh/agent.sock")]
    admin_socket: PathBuf,
    /// A group that may use the admin socket too (mode 0660), by name (from /etc/group) or GID;
    /// without it only the agent's user may (0600).
    #[arg(long)]
    admin_group: Option<String>,
    /// File holding the agent's token for mesh-ctrl, read again for every certificate request
    /// and config stream: this node's bootstrap token (its entry in mesh-ctrl --node-tokens) in
    /// local mode, the projected ServiceAccount token (audience ferrymesh) in Kubernetes.
    /// mesh-ctrl serves neither certificates nor config without it.
    #[arg(long, required_unless_present_any = ["uninstall", "install_cni"])]
    token_file: Option<PathBuf>,
    /// Number of recent flows kept for `meshctl flows`.
    #[arg(long, default_value_t = 4096)]
    flow_capacity: usize,
    /// Access log: one flow JSON line per closed connection, to `-` (stdout), a file (appended
    /// to), or `off`.
    #[arg(long, default_value = "-")]
    access_log: String,
    /// Address of the Prometheus metrics endpoint (/metrics).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: std::net::SocketAddr,
    /// Address of the readiness endpoint (/healthz/ready).
    #[arg(long, default_value = "0.0.0.0:15021")]
    readiness_addr: std::net::SocketAddr,
    /// Caps on what inbound peers may hold open.
    #[command(flatten)]
    limits: ferrymesh_dataplane::limits::LimitFlags,
    /// Concurrent outbound connections (captured, carried from 15001) one pod may hold open; also
    /// its share of the node's eBPF capture maps (a connect() past it fails with EPERM).
    #[arg(long, default_value_t = limits::Limits::default().outbound_per_pod)]
    max_outbound_connections_per_pod: u32,
    /// Concurrent outbound connections all of the node's pods may hold open.
    #[arg(long, default_value_t = limits::Limits::default().outbound)]
    max_outbound_connections: u32,
    /// Bytes of HBONE receive window the node's inbound connections may hold beyond 64 KiB
    /// each: a connection gets the full 16 MiB window while this has room, else keeps 64 KiB.
    #[arg(long, default_value_t = ferrymesh_dataplane::hbone::budget::DEFAULT_WINDOW_BUDGET)]
    hbone_window_budget: usize,
    /// Threads that carry connections.
    #[arg(long, env = "FERRYMESH_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
    /// The OpenTelemetry collector connection spans are exported to (`http://host:port`,
    /// OTLP/gRPC, usually port 4317); without one nothing is traced.
    #[arg(long, env = "FERRYMESH_TRACING_COLLECTOR")]
    tracing_collector: Option<String>,
    /// Percent of outbound connections traced (an inbound one follows its sender's decision,
    /// carried in the HBONE CONNECT's traceparent).
    #[arg(long, env = "FERRYMESH_TRACING_SAMPLING", default_value_t = 1.0)]
    tracing_sampling: f64,
}

fn main() -> std::process::ExitCode {
    // Returns only when it did not re-execute this binary (see its module).
    let reexec = ferrymesh_dataplane::memcpy::reexec_with_vector_memcpy();
    ferrymesh_api::exit::report(start(reexec))
}

fn start(reexec: std::io::Result<()>) -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    if let Err(e) = reexec {
        tracing::warn!("cannot restart with glibc's vector memcpy ({e}): large copies may be slow on AMD CPUs");
    }
    let args = Args::parse();
    if args.uninstall {
        let removed = ebpf::uninstall(&args.bpf_dir)
            .with_context(|| format!("cannot uninstall the pinned eBPF state under {}", args.bpf_dir.display()))?;
        println!("removed {removed} pinned eBPF objects under {}", args.bpf_dir.display());
        let cni = cni::install::uninstall(&args.cni_bin_dir, &args.cni_conf_dir)
            .with_context(|| format!("cannot remove the CNI plugin from {}", args.cni_conf_dir.display()))?;
        if cni > 0 {
            println!("removed the CNI plugin ({cni} files changed or removed)");
        }
        return Ok(());
    }
    if args.install_cni {
        let conflist = cni::install::install(&cni_install(&args)?).context("cannot install the CNI plugin")?;
        println!("chained {} into {}", cni::install::PLUGIN, conflist.display());
        return Ok(());
    }
    anyhow::ensure!(args.worker_threads > 0, "--worker-threads must be at least 1");
    let runtime = if args.worker_threads == 1 {
        tokio::runtime::Builder::new_current_thread().enable_all().build()?
    } else {
        tokio::runtime::Builder::new_multi_thread().worker_threads(args.worker_threads).enable_all().build()?
    };
    runtime.block_on(run(args))
}

/// Where `--install-cni` and `--watch-cni` install the CNI plugin from and to.
fn cni_install(args: &Args) -> anyhow::Result<cni::install::Install> {
    Ok(cni::install::Install {
        binary: std::env::current_exe()?.with_file_name(cni::install::PLUGIN),
        bin_dir: args.cni_bin_dir.clone(),
        conf_dir: args.cni_conf_dir.clone(),
        agent_socket: args.cni_socket.clone(),
    })
}

async fn run(args: Args) -> anyhow::Result<()> {
    let node_name = args.node_name.clone().context("--node-name is required")?;
    // Before anything is attached: an agent that cannot trust mesh-ctrl does not start.
    let ctrl = ctrl::Ctrl::new(&args.ctrl, args.ca_root.as_deref())?;
    let features = ebpf::probe::probe()?;
    let datapath =
        ebpf::Datapath::load_and_attach(&features.cgroup2_root, &args.bpf_dir, args.max_outbound_connections_per_pod)?;
    for a in datapath.attached() {
        let how = if a.adopted { "adopted the pinned link of" } else { "attached" };
        tracing::info!(program = a.name, prog_id = a.prog_id, link_id = a.link_id, "{how} {}", a.attach);
    }
    let adopted = datapath.adopted().clone();
    if adopted.any() {
        tracing::info!(
            bpf_dir = %args.bpf_dir.display(),
            maps = ?adopted.maps,
            links = adopted.links,
            "adopted the eBPF state an earlier agent pinned"
        );
    }
    let map_stats = datapath.stats();
    let datapath = Arc::new(Mutex::new(datapath));
    // A running agent hands over its pods' listeners; this one then serves them alongside it
    // until it has enrolled them all, and the other drains.
    let handover_socket = args.handover_socket.clone();
    let takeover = tokio::task::spawn_blocking(move || handover::take(&handover_socket))
        .await?
        .with_context(|| format!("cannot take over from the agent at {}", args.handover_socket.display()))?;
    if let Some(takeover) = &takeover {
        tracing::info!(pods = takeover.pods.len(), "taking over from the running agent");
    }
    let state = Arc::new(state::State::default());
    let access_log = flows::AccessLog::open(&args.access_log)
        .with_context(|| format!("cannot open --access-log {}", args.access_log))?;
    let flows = Arc::new(flows::FlowTable::new(args.flow_capacity, access_log));
    let flushing = flows.clone();
    tokio::spawn(async move { flushing.access_log().flush_periodically().await });
    let metrics = telemetry::install_metrics()?;
    telemetry::record_adopted(&adopted);
    tokio::spawn(telemetry::refresh(map_stats.clone(), state.clone(), metrics.clone()));
    let token_file = args.token_file.as_deref().context("--token-file is required to run the agent")?;
    let token = Arc::new(identity::TokenFile::open(token_file).map_err(anyhow::Error::msg)?);
    let identities = Arc::new(identity::IdentityManager::new(
        ctrl.clone(),
        Some(token.clone()),
        state.trust_domain(),
        state.trust(),
    ));
    let drain = Arc::new(proxy::Drain::default());
    // One budget for every receive window the agent grants its peers, inbound and outbound.
    let windows = ferrymesh_dataplane::hbone::budget::WindowBudget::new(args.hbone_window_budget);
    let ctx = Arc::new(proxy::ProxyContext {
        node: node_name.clone(),
        state: state.clone(),
        datapath: datapath.clone(),
        runner: netns::NetnsRunner::start().context("cannot start the netns thread")?,
        flows: flows.clone(),
        identities: identities.clone(),
        hbone: ferrymesh_dataplane::hbone::client::Client::new(windows.clone()),
        live: proxy::authz::LiveConnections::default(),
        balancer: Arc::default(),
        local_pods: proxy::LocalPods::default(),
        limits: limits::Limits {
            outbound_per_pod: args.max_outbound_connections_per_pod,
            outbound: args.max_outbound_connections,
            ..(&args.limits).into()
        },
        load: Arc::default(),
        windows,
        tracer: ferrymesh_dataplane::spans::Tracer::new(
            args.tracing_collector.as_deref(),
            args.tracing_sampling,
            vec![("service.name", "mesh-agent".into()), ("k8s.node.name", node_name.clone())],
        )?,
        drain: drain.clone(),
    });
    tokio::spawn(reevaluate_on_policy_change(ctx.clone()));
    let (shutdown_tx, shutdown) = watch::channel(false);
    let (takeover, handed) = match takeover {
        Some(mut takeover) => {
            let pods = std::mem::take(&mut takeover.pods);
            (Some(takeover), pods)
        }
        None => (None, Default::default()),
    };
    let (taken_tx, taken_rx) = tokio::sync::oneshot::channel();
    let (enroller, channels) =
        enroll::Enroller::new(ctx, handed, takeover.is_some().then_some(taken_tx), &args.proc_sys_net);
    let enroll::Channels { enrolled, offers, cni: cni_asks } = channels;
    let enroller = tokio::spawn(enroller.run(shutdown.clone()));
    let watcher = config_client::Watcher { node: node_name.clone(), waypoint: None, token };
    tokio::spawn(config_client::run(ctrl, watcher, state.clone()));
    if let Some(takeover) = takeover {
        let taken = taken_rx.await.context("the enroller stopped before the first config")?;
        let count = taken.len();
        tokio::task::spawn_blocking(move || takeover.finish(&taken))
            .await?
            .context("the previous agent did not release its endpoints")?;
        tracing::info!(pods = count, "took over from the previous agent, which now drains");
    }

    // The endpoints: bound only now, after a predecessor released them.
    let ready_state = state.clone();
    let ready = move || match ready_state.ctrl_status() {
        (_, 0) => Err("no config from mesh-ctrl yet".to_string()),
        _ => Ok(()),
    };
    let mut readiness = tokio::spawn(telemetry::serve_readiness(args.readiness_addr, ready, shutdown.clone()));
    let mut metrics_server = tokio::spawn(telemetry::serve_metrics(args.metrics_addr, metrics, shutdown.clone()));
    let admin = admin::AdminService {
        node: node_name.clone(),
        state: state.clone(),
        flows: flows.clone(),
        datapath,
        map_stats,
        enrolled,
        identities,
    };
    let mut admin =
        tokio::spawn(admin::serve(args.admin_socket.clone(), args.admin_group.clone(), admin, shutdown.clone()));
    let mut cni_server = tokio::spawn(cni::serve(args.cni_socket.clone(), cni_asks, shutdown.clone()));
    if args.watch_cni {
        tokio::spawn(cni::install::keep_chained(cni_install(&args)?, shutdown.clone()));
    }
    let handover_server = handover::Server::bind(&args.handover_socket)
        .with_context(|| format!("cannot serve --handover-socket {}", args.handover_socket.display()))?;
    let mut handover_task = tokio::spawn(async move { handover_server.serve(offers).await });
    tracing::info!(node = %node_name, ctrl = %args.ctrl, admin = %args.admin_socket.display(), "mesh-agent running");

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let successor = tokio::select! {
        _ = term.recv() => { tracing::info!("SIGTERM: draining"); None }
        _ = int.recv() => { tracing::info!("SIGINT: draining"); None }
        result = &mut handover_task => match result.context("handover server panicked")? {
            Ok(successor) => Some(successor),
            Err(e) => return Err(anyhow::Error::from(e).context("handover server failed")),
        },
        result = &mut admin => {
            result.context("admin server panicked")?.context("admin server failed")?;
            None
        }
        result = &mut cni_server => {
            result.context("CNI server panicked")?.context("CNI server failed")?;
            None
        }
        result = &mut readiness => {
            result.context("readiness server panicked")?.context("readiness server failed")?;
            None
        }
        result = &mut metrics_server => {
            result.context("metrics server panicked")?.context("metrics server failed")?;
            None
        }
    };
    // Stop accepting (a successor, if any, holds the same listeners), GOAWAY to HBONE clients,
    // close the endpoints; then let the connections carried run on to their end.
    drain.start();
    shutdown_tx.send_replace(true);
    // No successor can take over from a draining agent (its handover socket goes).
    handover_task.abort();
    enroller.await.context("enroller panicked")?;
    // The admin server removes its socket once it has stopped.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), admin).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), cni_server).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), readiness).await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(2), metrics_server).await;
    if let Some(successor) = successor {
        tokio::task::spawn_blocking(move || successor.released()).await??;
    }
    let deadline = tokio::time::Instant::now() + args.drain_grace;
    loop {
        let active = drain.active();
        if active == 0 {
            tracing::info!("drained: every connection ended");
            break;
        }
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            _ = tokio::time::sleep_until(deadline) => {
                tracing::warn!(active, "--drain-grace {:?} passed: closing the connections still open", args.drain_grace);
                break;
            }
            _ = term.recv() => { tracing::warn!(active, "second SIGTERM: closing the connections still open"); break; }
            _ = int.recv() => { tracing::warn!(active, "second SIGINT: closing the connections still open"); break; }
        }
    }
    flows.access_log().flush();
    // The pinned maps and links stay: enrolled pods stay captured, and closed while no agent
    // serves them, until the next agent adopts them (or `--uninstall` removes them).
    Ok(())
}

/// Re-evaluates live inbound connections whenever the policies or workloads change (labels
/// select policies), closing the ones now denied.
async fn reevaluate_on_policy_change(ctx: Arc<proxy::ProxyContext>) {
    let mut policies = ctx.state.subscribe_policies();
    let mut workloads = ctx.state.subscribe();
    loop {
        tokio::select! {
            changed = policies.changed() => if changed.is_err() { break },
            changed = workloads.changed() => if changed.is_err() { break },
        }
        let current = policies.borrow_and_update().clone();
        let closed = ctx.live.reevaluate(&current, &ctx.state);
        if closed > 0 {
            tracing::info!(closed, "policy change closed now-denied connections");
        }
    }
}
