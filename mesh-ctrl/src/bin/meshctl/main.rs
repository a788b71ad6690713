//! meshctl: inspect ferrymesh agents. One module per subcommand under `cmd/`; every error is
//! one line on stderr and a non-zero exit.
#![deny(unsafe_code)]

mod agent;
mod cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Inspect ferrymesh agents: live flows that explain themselves, what each agent holds, and
/// why a connection would be allowed or denied.
#[derive(Debug, Parser)]
#[command(name = "meshctl", version, about)]
struct Args {
    /// Admin socket of an agent to ask; repeat for several agents (default
    /// /var/run/ferrymesh/agent.sock).
    #[arg(long, global = true)]
    agent: Vec<PathBuf>,
    /// Ask every agent whose admin socket (`*.sock`) is in this directory (local mode: one
    /// directory for a whole node set).
    #[arg(long, global = true)]
    agents_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Recent flows (oldest first), optionally followed live and filtered.
    Flows(cmd::flows::FlowsArgs),
    /// Why a connection from SRC to DST:PORT would be allowed or denied, by the same decision
    /// code the agents enforce with.
    Explain(cmd::explain::ExplainArgs),
    /// Workloads (pods) of the mesh as the agent holds them.
    Workloads {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Services with their VIPs and endpoints.
    Services {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// AuthorizationPolicies and PeerAuthentications in force.
    Policies {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// A waypoint's request records (its access log, from --log or stdin), filtered.
    Requests(cmd::requests::RequestsArgs),
    /// Gateway API routes (HTTPRoute, GRPCRoute) attached to Services, as the agent holds them.
    Routes(cmd::routes::RoutesArgs),
    /// Workload certificates the agent holds: identity, serial, expiry, time to rotation.
    Certs {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Control-plane link, enrolled pods, eBPF programs, counters and map fill.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Waypoints in Kubernetes: `generate` prints the objects that deploy one.
    Waypoint(cmd::waypoint::WaypointArgs),
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// JSON (one object per line for flows).
    Json,
    /// One short line per flow (flows only; tables elsewhere).
    Compact,
}

/// Printing to a closed pipe ends meshctl quietly, as it does any Unix filter
/// (`meshctl flows | head`, `meshctl status | grep -q ...`): SIGPIPE back to its default
/// action, which Rust's runtime sets to ignore (and every print would then panic).
#[allow(unsafe_code)]
fn die_quietly_on_a_closed_pipe() {
    // SAFETY: called first thing in main, before any other thread exists; SIG_DFL is a valid
    // disposition for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    die_quietly_on_a_closed_pipe();
    let args = match Args::try_parse() {
        Ok(args) => args,
        Err(e) if matches!(e.kind(), clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion) => {
            e.exit()
        }
        Err(e) => {
            // clap's message spans several lines: what is wrong (the missing arguments on lines
            // of their own), then usage and hints after a blank line. What is wrong, on one line.
            let rendered = e.render().to_string();
            let what: Vec<&str> = rendered.lines().take_while(|l| !l.trim().is_empty()).map(str::trim).collect();
            let what = what.join(" ");
            let what = what.trim_start_matches("error: ");
            eprintln!("meshctl: {}", if what.is_empty() { "invalid arguments" } else { what });
            std::process::exit(2);
        }
    };
    let result = run(args).await;
    if let Err(e) = result {
        eprintln!("meshctl: {e}");
        std::process::exit(1);
    }
}

async fn run(args: Args) -> Result<(), String> {
    // Resolved only by the subcommands that ask agents (`requests` reads a waypoint's log,
    // `waypoint` prints manifests).
    let agents = || agent::targets(&args.agent, args.agents_dir.as_deref()).map_err(|e| e.to_string());
    match args.cmd {
        Command::Flows(flows) => cmd::flows::run(&agents()?, flows).await,
        Command::Explain(explain) => cmd::explain::run(&agents()?, explain).await,
        Command::Workloads { output } => cmd::config::workloads(&agents()?[0], output).await,
        Command::Services { output } => cmd::config::services(&agents()?[0], output).await,
        Command::Policies { output } => cmd::config::policies(&agents()?[0], output).await,
        Command::Routes(routes) => cmd::routes::run(&agents()?[0], routes).await,
        Command::Requests(requests) => cmd::requests::run(requests),
        Command::Certs { output } => cmd::status::certs(&agents()?, output).await,
        Command::Status { output } => cmd::status::run(&agents()?, output).await,
        Command::Waypoint(waypoint) => cmd::waypoint::run(waypoint),
    }
}
