//! `meshctl waypoint generate`: the Kubernetes objects that deploy a waypoint
//! ([`mesh_ctrl::waypoint_deploy`]), printed for `kubectl apply -f -`.

use clap::{Args, Subcommand};
use mesh_ctrl::model::WaypointFor;
use mesh_ctrl::waypoint_deploy::WaypointDeploy;

/// `meshctl waypoint ...`.
#[derive(Debug, Args)]
pub struct WaypointArgs {
    #[command(subcommand)]
    cmd: WaypointCommand,
}

#[derive(Debug, Subcommand)]
enum WaypointCommand {
    /// Print the Gateway, ServiceAccount and Deployment of a waypoint (and a
    /// PodDisruptionBudget with several replicas), for `kubectl apply -f -`.
    Generate(GenerateArgs),
}

#[derive(Debug, Args)]
struct GenerateArgs {
    /// The waypoint's name: its Gateway's, service account's and Deployment's.
    #[arg(default_value = "waypoint")]
    name: String,
    /// The namespace it serves and runs in.
    #[arg(short, long)]
    namespace: String,
    /// Which traffic it takes: Services' (the default, as Istio), pods' addressed by IP, or both.
    #[arg(long = "for", default_value = "service", value_parser = ["service", "workload", "all"])]
    traffic: String,
    /// The mesh-waypoint image.
    #[arg(long, default_value = concat!("localhost/ferrymesh/mesh-waypoint:", env!("CARGO_PKG_VERSION")))]
    image: String,
    /// Pods (more than one adds a PodDisruptionBudget keeping one up).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u16).range(1..))]
    replicas: u16,
    /// mesh-ctrl's address, as the agents' `--ctrl`.
    #[arg(long, default_value = "https://ferrymesh-ctrl.ferrymesh-system.svc:15012")]
    ctrl: String,
    /// The rate-limit service global rate limits are counted by (`http://host:port`, Envoy's
    /// protocol), e.g. envoyproxy/ratelimit's Service.
    #[arg(long)]
    rate_limit_service: Option<String>,
    /// The OpenTelemetry collector request spans are exported to (`http://host:port`,
    /// OTLP/gRPC), e.g. an OpenTelemetry Collector's Service on 4317.
    #[arg(long)]
    tracing_collector: Option<String>,
}

pub fn run(args: WaypointArgs) -> Result<(), String> {
    match args.cmd {
        WaypointCommand::Generate(g) => {
            let deploy = WaypointDeploy {
                traffic: WaypointFor::parse(&g.traffic)
                    .ok_or_else(|| format!("--for {}: not a traffic type", g.traffic))?,
                namespace: g.namespace,
                name: g.name,
                image: g.image,
                replicas: g.replicas,
                ctrl: g.ctrl,
                rate_limit_service: g.rate_limit_service,
                tracing_collector: g.tracing_collector,
            };
            print!("{}", deploy.yaml());
            Ok(())
        }
    }
}
