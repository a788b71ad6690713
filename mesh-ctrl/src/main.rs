//! mesh-ctrl: serves the mesh model to node agents.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use std::sync::Arc;
use tokio::sync::watch;

use mesh_ctrl::ca::auth::{Authenticator, NodeAuth, NodeTokens};
use mesh_ctrl::ca::dir::Reloader;
use mesh_ctrl::ca::service::CertificateService;
use mesh_ctrl::ca::token_review::TokenReviewer;
use mesh_ctrl::ca::Ca;
use mesh_ctrl::server::{Agents, ConfigService, StreamLimits};
use mesh_ctrl::snapshot::{Publisher, Trust};
use mesh_ctrl::source::{self, DirSource};
use mesh_ctrl::tls::ServingIdentity;

/// ferrymesh control plane.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Directory of Kubernetes-style YAML (local mode); watched for changes.
    #[arg(long, env = "FERRYMESH_CONFIG_DIR", required_unless_present = "kubernetes")]
    config_dir: Option<PathBuf>,
    /// Read the mesh from the Kubernetes API (in-cluster config or KUBECONFIG) instead of a
    /// directory; the CA root lives in a Secret and agents prove their node with their
    /// ServiceAccount token (TokenReview).
    #[arg(long, conflicts_with = "config_dir")]
    kubernetes: bool,
    /// Namespace of ferrymesh itself (Kubernetes mode): the CA Secret and the agents' pods.
    #[arg(long, env = "POD_NAMESPACE", default_value = "ferrymesh-system")]
    system_namespace: String,
    /// Secret holding the CA root (Kubernetes mode); created when absent.
    #[arg(long, default_value = mesh_ctrl::ca::secret::CA_SECRET)]
    ca_secret: String,
    /// ServiceAccount of the agent DaemonSet (Kubernetes mode): only its tokens obtain
    /// certificates.
    #[arg(long, default_value = "ferrymesh-agent")]
    agent_service_account: String,
    /// Address of the gRPC config and CA server (TLS 1.3 only).
    #[arg(long, default_value = "0.0.0.0:15012")]
    listen: SocketAddr,
    /// A name agents dial mesh-ctrl by, put in its serving certificate besides
    /// ferrymesh-ctrl.ferrymesh-system.svc[.cluster.local]: a DNS name or an IP address;
    /// repeatable.
    #[arg(long = "tls-san", value_name = "NAME")]
    tls_sans: Vec<String>,
    /// Lifetime of mesh-ctrl's own serving certificate, renewed at half-life.
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    serving_cert_ttl: Duration,
    /// How long a client of 15012 may take to finish its TLS handshake.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    handshake_timeout: Duration,
    /// Address of the Prometheus metrics endpoint (/metrics): 15014, istiod's monitoring port,
    /// so mesh-ctrl and an agent (15020) can run on one machine.
    #[arg(long, default_value = "0.0.0.0:15014")]
    metrics_addr: SocketAddr,
    /// Validate the config directory, print every rejected object and exit (non-zero if any).
    #[arg(long)]
    check: bool,
    /// Directory of the mesh CA in local mode (generated on first start, or the operator's
    /// ca-cert.pem and ca-key.pem).
    #[arg(long, default_value = "/var/lib/ferrymesh/ca")]
    ca_dir: PathBuf,
    /// How often the CA files (--ca-dir, or the CA Secret) are read again; a change that makes
    /// a consistent CA is put in force without a restart (root rotation).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    ca_reload_interval: Duration,
    /// Trust domain of SPIFFE identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Lifetime of workload certificates (e.g. 24h, 10s).
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    cert_ttl: Duration,
    /// YAML map of node name to bootstrap token; an agent proves its node with its token.
    /// Without it no certificate is issued and no config stream is served.
    #[arg(long)]
    node_tokens: Option<PathBuf>,
    /// Config streams (Config/Watch) one source address may hold open at once; past it a new
    /// stream is refused (RESOURCE_EXHAUSTED).
    #[arg(long, default_value_t = 16)]
    max_watches_per_source: usize,
    /// Config streams all sources may hold open at once.
    #[arg(long, default_value_t = 10_000)]
    max_watches: usize,
    /// Connections to 15012 one source address may hold open (an agent holds one or two; a
    /// node's waypoints share its address only in host networking).
    #[arg(long, default_value_t = 64)]
    max_connections_per_source: usize,
    /// Connections to 15012 all sources may hold open.
    #[arg(long, default_value_t = 20_000)]
    max_connections: usize,
    /// TLS handshakes on 15012 in progress at once.
    #[arg(long, default_value_t = 1024)]
    max_handshakes: usize,
}

fn main() -> std::process::ExitCode {
    ferrymesh_api::exit::report(
        tokio::runtime::Runtime::new().map_err(anyhow::Error::from).and_then(|r| r.block_on(run())),
    )
}

async fn run() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    if args.check {
        let dir = args.config_dir.as_ref().context("--check validates a --config-dir")?;
        let (model, errors) = DirSource::new(dir).reload();
        for e in &errors {
            eprintln!("{e}");
        }
        println!("{} namespaces, {} pods, {} rejected", model.namespaces.len(), model.pods.len(), errors.len());
        std::process::exit(if errors.is_empty() { 0 } else { 1 });
    }
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(args.metrics_addr)
        .install()
        .with_context(|| format!("cannot serve metrics on {}", args.metrics_addr))?;
    mesh_ctrl::telemetry::describe();
    let (publisher, snapshots) = Publisher::new();
    let (watcher, origin, auth, ca) = match &args.config_dir {
        Some(dir) => {
            anyhow::ensure!(dir.is_dir(), "--config-dir {}: not a directory", dir.display());
            let (ca_tx, ca) =
                watch::channel(Arc::new(Ca::load_or_create(&args.ca_dir, &args.trust_domain, args.cert_ttl)?));
            let reloader = Reloader::new(&args.ca_dir, args.cert_ttl);
            tokio::spawn(mesh_ctrl::ca::dir::keep_reloading_dir(reloader, args.ca_reload_interval, ca_tx));
            let tokens = match &args.node_tokens {
                Some(path) => NodeTokens::load(path).map_err(anyhow::Error::msg)?,
                None => {
                    tracing::warn!(
                        "no --node-tokens: no agent can authenticate, so no certificate or config is served"
                    );
                    NodeTokens::default()
                }
            };
            publisher.set_trust(Trust::of(&ca.borrow()));
            let watch = source::watch_dir(DirSource::new(dir), publisher.clone());
            (
                tokio::spawn(async move { watch.await.context("cannot watch the config directory") }),
                dir.display().to_string(),
                NodeAuth::Tokens(tokens),
                ca,
            )
        }
        None => {
            let client = kube::Client::try_default()
                .await
                .context("cannot reach the Kubernetes API (in-cluster service account or KUBECONFIG)")?;
            let ca = mesh_ctrl::ca::secret::load_or_create(
                client.clone(),
                &args.system_namespace,
                &args.ca_secret,
                &args.trust_domain,
                args.cert_ttl,
            )
            .await?;
            let (ca_tx, ca) = watch::channel(Arc::new(ca));
            tokio::spawn(mesh_ctrl::ca::secret::keep_reloading(
                client.clone(),
                args.system_namespace.clone(),
                args.ca_secret.clone(),
                args.cert_ttl,
                args.ca_reload_interval,
                ca_tx,
            ));
            tokio::spawn(mesh_ctrl::ca::secret::keep_root_published(
                client.clone(),
                args.system_namespace.clone(),
                ca.clone(),
                snapshots.clone(),
            ));
            let reviewer = TokenReviewer::new(client.clone(), &args.system_namespace, &args.agent_service_account);
            publisher.set_trust(Trust::of(&ca.borrow()));
            let watch = source::kube::watch_kube(client, publisher.clone());
            let watch = async move {
                watch.await;
                Ok::<(), anyhow::Error>(())
            };
            (tokio::spawn(watch), "kubernetes".to_string(), NodeAuth::TokenReview(reviewer), ca)
        }
    };
    // One authenticator for both services of 15012: a token proves the same caller to either,
    // and failures count against one throttle.
    let auth = Arc::new(Authenticator::new(auth));
    let certificates = CertificateService::new(ca.clone(), auth.clone(), args.trust_domain.clone(), snapshots.clone());
    tokio::spawn(publisher.keep_trust_current(ca.clone()));
    let serving = ServingIdentity::new(ca, &args.tls_sans, args.serving_cert_ttl)?;
    tokio::spawn(serving.clone().renew_forever());
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {} (is another mesh-ctrl running?)", args.listen))?;
    tracing::info!(listen = %args.listen, source = %origin, "mesh-ctrl serving (TLS 1.3)");
    let (stop_tx, stop) = tokio::sync::watch::channel(false);
    let streams = StreamLimits { per_source: args.max_watches_per_source, total: args.max_watches };
    let config =
        ConfigService::new(snapshots, args.trust_domain.clone(), Agents::default(), auth, streams).with_stop(stop);
    let shutdown = async move {
        shutdown_signal().await;
        stop_tx.send_replace(true);
    };
    let server = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .add_service(config.into_server())
        .add_service(certificates.into_server())
        .serve_with_incoming_shutdown(
            mesh_ctrl::tls::incoming(
                listener,
                serving.server_config(),
                mesh_ctrl::tls::ConnectionLimits {
                    handshake_timeout: args.handshake_timeout,
                    per_source: args.max_connections_per_source,
                    total: args.max_connections,
                    handshakes: args.max_handshakes,
                },
            ),
            shutdown,
        );
    tokio::select! {
        result = server => result.context("config server failed")?,
        result = watcher => result.context("config source panicked")??,
    }
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
