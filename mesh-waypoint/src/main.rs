//! mesh-waypoint's program: its flags, its identity and config from mesh-ctrl, then the HBONE
//! listener of the library (see `lib.rs` for the parts).
#![forbid(unsafe_code)]

use mesh_waypoint::{authn, global_limits, listener, record, upstream};

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use ferrymesh_dataplane::identity::{Identity, IdentityManager, TokenFile};
use ferrymesh_dataplane::limits::Limits;
use ferrymesh_dataplane::{config_client, ctrl, flows, state, tls};
use ferrymesh_policy::path::{EscapedSlashes, PathNormalization, PathRules};
use tokio::signal::unix::{signal, SignalKind};

/// ferrymesh waypoint proxy.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Namespace of the waypoint's Gateway.
    #[arg(long, env = "FERRYMESH_WAYPOINT_NAMESPACE")]
    namespace: String,
    /// Name of the waypoint's Gateway; its pods run as the service account of that name.
    #[arg(long, env = "FERRYMESH_WAYPOINT_NAME")]
    name: String,
    /// The node the waypoint runs on (its token proves it).
    #[arg(long, env = "FERRYMESH_NODE_NAME")]
    node_name: String,
    /// The waypoint pod's IP, sent upstream as the client address (`forwarded`).
    #[arg(long, env = "FERRYMESH_POD_IP")]
    pod_ip: IpAddr,
    /// mesh-ctrl's address: https only, verified against --ca-root.
    #[arg(long, env = "FERRYMESH_CTRL", default_value = "https://ferrymesh-ctrl.ferrymesh-system.svc:15012")]
    ctrl: String,
    /// The mesh root (PEM) mesh-ctrl must prove itself against.
    #[arg(long, env = "FERRYMESH_CA_ROOT")]
    ca_root: Option<PathBuf>,
    /// File holding the token for mesh-ctrl's CA (the node's bootstrap token in local mode, a
    /// projected ServiceAccount token in Kubernetes), read again for every certificate request.
    #[arg(long, env = "FERRYMESH_TOKEN_FILE")]
    token_file: PathBuf,
    /// Where HBONE is served.
    #[arg(long, default_value = "0.0.0.0:15008")]
    listen: SocketAddr,
    /// Address of the Prometheus metrics endpoint (/metrics).
    #[arg(long, default_value = "0.0.0.0:15020")]
    metrics_addr: SocketAddr,
    /// Access log: one JSON line per request, to `-` (stdout), a file (appended to), or `off`.
    #[arg(long, default_value = "-")]
    access_log: String,
    /// The rate-limit service global limits are counted by (`http://host:port`, gRPC, Envoy's
    /// `envoy.service.ratelimit.v3.RateLimitService`); without one, global limits are not
    /// checked (a policy with `failureModeDeny` refuses their requests).
    #[arg(long, env = "FERRYMESH_RATE_LIMIT_SERVICE")]
    rate_limit_service: Option<String>,
    /// The domain the waypoint's limits are kept under at the rate-limit service.
    #[arg(long, env = "FERRYMESH_RATE_LIMIT_DOMAIN", default_value = "ferrymesh")]
    rate_limit_domain: String,
    /// How long a request waits for the rate-limit service's answer.
    #[arg(long, default_value = "100ms", value_parser = humantime::parse_duration)]
    rate_limit_timeout: Duration,
    /// How long a fetched JWKS (a RequestAuthentication's jwksUri) is used before it is fetched
    /// again (Istio's istiod refreshes every 20 minutes); a token signed by a key it does not
    /// hold has it fetched again at once.
    #[arg(long, default_value = "20m", value_parser = humantime::parse_duration)]
    jwks_refresh: Duration,
    /// Caps on what inbound peers may hold open (the waypoint's defaults are lower than the
    /// agent's: see `WAYPOINT_DEFAULTS`).
    #[command(flatten)]
    limits: ferrymesh_dataplane::limits::LimitFlags,
    /// HTTP requests one source address may have in flight, each from its head to the end of
    /// its answer (HTTP/2 streams inside a tunnel, or one HTTP/1.1 request after another): past
    /// it a request gets 503.
    #[arg(long, default_value_t = Limits::default().requests_per_source)]
    max_requests_per_source: u32,
    /// HTTP requests all sources may have in flight: with the connection and stream caps, what
    /// bounds the memory clients can make the waypoint hold.
    #[arg(long, default_value_t = Limits::default().requests)]
    max_requests: u32,
    /// Bytes of HBONE receive window the waypoint's connections may hold beyond 64 KiB each: a
    /// connection gets the full 16 MiB window while this has room, else keeps 64 KiB.
    #[arg(long, default_value_t = ferrymesh_dataplane::hbone::budget::DEFAULT_WINDOW_BUDGET)]
    hbone_window_budget: usize,
    /// How long a JWKS fetch may take.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    jwks_timeout: Duration,
    /// Fetch a RequestAuthentication's `jwksUri` over plaintext http too, from inside the
    /// cluster only (a Service's name or a private address); without it only https is fetched.
    #[arg(long)]
    jwks_allow_http: bool,
    /// The OpenTelemetry collector request spans are exported to (`http://host:port`,
    /// OTLP/gRPC, usually port 4317); without one nothing is traced.
    #[arg(long, env = "FERRYMESH_TRACING_COLLECTOR")]
    tracing_collector: Option<String>,
    /// Percent of new traces sampled (a request with a `traceparent` follows its decision).
    #[arg(long, env = "FERRYMESH_TRACING_SAMPLING", default_value_t = 1.0)]
    tracing_sampling: f64,
    /// Threads that carry requests (1: a single-threaded runtime, no cross-thread wake-ups).
    #[arg(long, env = "FERRYMESH_WORKER_THREADS", default_value_t = 2)]
    worker_threads: usize,
    /// How a request's path is normalized before it is authorized, routed and forwarded
    /// (Istio's `pathNormalization`): NONE, BASE (RFC 3986: unreserved escapes decoded, dot
    /// segments removed, bad escapes refused), MERGE_SLASHES, DECODE_AND_MERGE_SLASHES.
    #[arg(long, env = "FERRYMESH_PATH_NORMALIZATION", default_value = "BASE", value_parser = path_normalization)]
    path_normalization: PathNormalization,
    /// What an escaped slash or backslash (%2F, %5C) in a path makes of a request (Envoy's
    /// `path_with_escaped_slashes_action`): KEEP_UNCHANGED, REJECT_REQUEST, UNESCAPE_AND_FORWARD,
    /// UNESCAPE_AND_REDIRECT. Default: UNESCAPE_AND_FORWARD with DECODE_AND_MERGE_SLASHES,
    /// KEEP_UNCHANGED with NONE, else REJECT_REQUEST.
    #[arg(long, env = "FERRYMESH_PATH_ESCAPED_SLASHES", value_parser = escaped_slashes)]
    path_escaped_slashes: Option<EscapedSlashes>,
}

/// The waypoint's defaults for the agent's listener caps: a waypoint holds more per tunnel than
/// an agent per stream (its HTTP buffers, its requests' upstream connections), so it takes fewer
/// tunnels and connections, and they add up inside its 1 GiB memory limit (docs/SECURITY.md).
const WAYPOINT_DEFAULTS: [(&str, &str); 5] = [
    ("max_connections_per_source", "256"),
    ("max_connections", "512"),
    ("max_connections_per_pod", "512"),
    ("max_streams", "1024"),
    ("max_streams_per_source", "512"),
];

/// `args` parsed, with the waypoint's defaults for the shared caps.
fn parse_args<I: IntoIterator<Item = T>, T: Into<std::ffi::OsString> + Clone>(args: I) -> Result<Args, clap::Error> {
    use clap::{CommandFactory, FromArgMatches};
    let command = WAYPOINT_DEFAULTS
        .iter()
        .fold(Args::command(), |command, (id, default)| command.mut_arg(*id, |arg| arg.default_value(*default)));
    Args::from_arg_matches(&command.try_get_matches_from(args)?)
}

/// The memory limit of the waypoint's container (mesh-ctrl's Deployment of it).
const MEMORY_LIMIT: usize = 1 << 30;

impl Args {
    /// The caps on clients.
    fn limits(&self) -> Limits {
        Limits {
            requests_per_source: self.max_requests_per_source,
            requests: self.max_requests,
            ..(&self.limits).into()
        }
    }
}

fn path_normalization(text: &str) -> Result<PathNormalization, String> {
    PathNormalization::parse(text)
        .ok_or_else(|| format!("{text:?} is not NONE, BASE, MERGE_SLASHES or DECODE_AND_MERGE_SLASHES"))
}

fn escaped_slashes(text: &str) -> Result<EscapedSlashes, String> {
    EscapedSlashes::parse(text).ok_or_else(|| {
        format!("{text:?} is not KEEP_UNCHANGED, REJECT_REQUEST, UNESCAPE_AND_FORWARD or UNESCAPE_AND_REDIRECT")
    })
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
    let args = parse_args(std::env::args_os()).unwrap_or_else(|e| e.exit());
    anyhow::ensure!(args.worker_threads > 0, "--worker-threads must be at least 1");
    let runtime = match args.worker_threads {
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build()?,
        n => tokio::runtime::Builder::new_multi_thread().worker_threads(n).enable_all().build()?,
    };
    runtime.block_on(run(args))
}

/// How long the waypoint waits for its first config and certificate before giving up.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(30);

async fn run(args: Args) -> anyhow::Result<()> {
    let ctrl = ctrl::Ctrl::new(&args.ctrl, args.ca_root.as_deref())?;
    record::serve_metrics(args.metrics_addr)?;
    let state = Arc::new(state::State::default());
    let token = Arc::new(TokenFile::open(&args.token_file).map_err(anyhow::Error::msg)?);
    let watcher = config_client::Watcher {
        node: args.node_name.clone(),
        waypoint: Some(format!("{}/{}", args.namespace, args.name)),
        token: token.clone(),
    };
    tokio::spawn(config_client::run(ctrl.clone(), watcher, state.clone()));
    let identities = Arc::new(IdentityManager::new(ctrl, Some(token), state.trust_domain(), state.trust()));
    let identity = Identity { namespace: args.namespace.clone(), service_account: args.name.clone() };

    // Serve only with a config and a certificate: a waypoint that cannot route or prove itself
    // is not ready, and agents do not send it traffic it would fail.
    let mut trust_domain = state.trust_domain();
    tokio::time::timeout(STARTUP_TIMEOUT, trust_domain.wait_for(|td| !td.is_empty()))
        .await
        .context("no config from mesh-ctrl within 30s")?
        .context("config stream ended")?;
    let trust_domain = trust_domain.borrow().clone();
    identities.cert(&identity, STARTUP_TIMEOUT).await.with_context(|| format!("no certificate for {identity}"))?;
    let resolver = Arc::new(tls::CurrentCert { identities: identities.clone(), identity: identity.clone() });
    let tls = Arc::new(tls::server_config(resolver, state.trust(), &trust_domain)?);

    let log = flows::AccessLog::open(&args.access_log)
        .with_context(|| format!("cannot open --access-log {}", args.access_log))?;
    let rate_limit_service = global_limits::RateLimitService::new(
        args.rate_limit_service.as_deref(),
        args.rate_limit_domain.clone(),
        args.rate_limit_timeout,
    )?;
    // Istio names a waypoint's spans' service `<name>.<namespace>`.
    let tracer = ferrymesh_dataplane::spans::Tracer::new(
        args.tracing_collector.as_deref(),
        args.tracing_sampling,
        vec![
            ("service.name", format!("{}.{}", args.name, args.namespace)),
            ("k8s.namespace.name", args.namespace.clone()),
        ],
    )?;
    // One budget for every receive window the waypoint grants its peers, downstream and upstream.
    let windows = ferrymesh_dataplane::hbone::budget::WindowBudget::new(args.hbone_window_budget);
    let upstream = upstream::Upstream::new(state.clone(), identities.clone(), identity, args.pod_ip, windows.clone());
    let waypoint = Arc::new(listener::Waypoint {
        key: format!("{}/{}", args.namespace, args.name),
        gateway: (args.namespace.clone(), args.name.clone()),
        trust_domain,
        state,
        upstream,
        log,
        rolls: Default::default(),
        fault_rolls: Default::default(),
        rate_limiters: Default::default(),
        rate_limit_service,
        route_tables: Default::default(),
        keys: authn::KeyStore::new(args.jwks_refresh, args.jwks_timeout, args.jwks_allow_http),
        tracer,
        paths: PathRules {
            normalization: args.path_normalization,
            escaped_slashes: args.path_escaped_slashes.unwrap_or(args.path_normalization.default_escaped_slashes()),
        },
        windows,
        limits: args.limits(),
        load: Arc::default(),
    });
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    let bound = listener::memory_bound(&waypoint.limits, args.hbone_window_budget);
    tracing::info!(waypoint = %waypoint.key, listen = %args.listen, paths = %waypoint.paths, "mesh-waypoint serving");
    tracing::info!("at its caps, clients can make this waypoint hold up to {} MiB (docs/SECURITY.md)", bound >> 20);
    if bound > MEMORY_LIMIT {
        tracing::warn!("that is over the 1 GiB its Deployment allows: raise the memory limit with the caps");
    }
    let serving = tokio::spawn(listener::serve(listener, tls, waypoint.clone()));
    let flushing = waypoint.clone();
    tokio::spawn(async move { flushing.log.flush_periodically().await });

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        result = serving => result.context("the HBONE listener panicked")?,
    }
    waypoint.log.flush();
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const REQUIRED: [&str; 11] = [
        "mesh-waypoint",
        "--namespace",
        "shop",
        "--name",
        "waypoint",
        "--node-name",
        "node-1",
        "--pod-ip",
        "10.0.2.9",
        "--token-file",
        "/token",
    ];

    #[test]
    fn the_waypoint_has_its_own_defaults_for_the_shared_caps_and_flags_override_them() {
        let limits = parse_args(REQUIRED).unwrap().limits();
        assert_eq!((limits.connections, limits.connections_per_source), (512, 256));
        assert_eq!((limits.streams, limits.streams_per_source), (1024, 512));
        assert_eq!((limits.requests, limits.requests_per_source), (1024, 256));
        let flags = [&REQUIRED[..], &["--max-streams", "64", "--max-requests", "8"]].concat();
        let limits = parse_args(flags).unwrap().limits();
        assert_eq!((limits.streams, limits.requests), (64, 8));
    }

    #[test]
    fn what_clients_can_make_it_hold_at_its_defaults_fits_in_its_memory_limit() {
        let args = parse_args(REQUIRED).unwrap();
        let bound = listener::memory_bound(&args.limits(), args.hbone_window_budget);
        // Room for the rest of the waypoint: some 15 MiB idle, its config and upstream pools.
        assert!(bound + (64 << 20) <= MEMORY_LIMIT, "{} MiB at the default caps", bound >> 20);
    }
}
