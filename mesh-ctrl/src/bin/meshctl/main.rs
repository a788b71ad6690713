//! meshctl: inspect ferrymesh agents. One module per subcommand under `cmd/`.
#![forbid(unsafe_code)]

mod agent;
mod cmd;

use std::path::PathBuf;

use clap::{Parser, Subcommand, ValueEnum};

/// Inspect ferrymesh agents.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Args {
    /// Admin socket of the agent to ask.
    #[arg(long, global = true, default_value = "/var/run/ferrymesh/agent.sock")]
    agent: PathBuf,
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Recent flows of the agent, oldest first.
    Flows {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
    /// Control-plane link, enrolled pods, eBPF programs and counters of the agent.
    Status {
        /// Output format.
        #[arg(short, long, value_enum, default_value_t = Output::Table)]
        output: Output,
    },
}

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    /// Aligned columns for people.
    Table,
    /// One JSON object per line, for programs.
    Json,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args = Args::parse();
    let result = match args.cmd {
        Command::Flows { output } => cmd::flows::run(&args.agent, output).await,
        Command::Status { output } => cmd::status::run(&args.agent, output).await,
    };
    if let Err(e) = result {
        eprintln!("meshctl: {e}");
        std::process::exit(1);
    }
}
