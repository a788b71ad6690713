//! `meshctl flows`: recent flows of one or more agents, filtered, and with `--follow` the new
//! ones as they close. JSON is the stable contract (`ferrymesh_api::flow_json`, one object per
//! line); the table fits 120 columns; compact is one short line per flow.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use clap::{Args, ValueEnum};
use ferrymesh_api::admin::{ListFlowsRequest, WatchFlowsRequest};
use ferrymesh_api::flow_json::{EndpointJson, FlowJson};
use futures::StreamExt;

use super::table::fit;
use crate::agent::{connect, AgentError};
use crate::Output;

/// Options of `meshctl flows`.
#[derive(Debug, Args)]
pub struct FlowsArgs {
    /// Keep running and print flows as they close.
    #[arg(short, long)]
    follow: bool,
    /// Only the last N recent flows (after filtering).
    #[arg(long, value_name = "N")]
    last: Option<usize>,
    /// Only flows that started within this long (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
    since: Option<Duration>,
    /// Only flows whose source or destination is in this namespace.
    #[arg(long)]
    namespace: Option<String>,
    /// Only flows from this pod (NAMESPACE/POD, or POD in any namespace).
    #[arg(long, value_name = "POD")]
    from_pod: Option<String>,
    /// Only flows to this pod (NAMESPACE/POD, or POD in any namespace).
    #[arg(long, value_name = "POD")]
    to_pod: Option<String>,
    /// Only flows whose source identity is this SPIFFE ID (a trailing `*` matches a prefix).
    #[arg(long, value_name = "SPIFFE_ID")]
    from_identity: Option<String>,
    /// Only flows whose destination identity is this SPIFFE ID (a trailing `*` matches a prefix).
    #[arg(long, value_name = "SPIFFE_ID")]
    to_identity: Option<String>,
    /// Only flows addressed to this service (NAMESPACE/NAME) by its VIP.
    #[arg(long, value_name = "NAMESPACE/NAME")]
    service: Option<String>,
    /// Only flows to this destination port.
    #[arg(long)]
    port: Option<u16>,
    /// Only flows with this verdict.
    #[arg(long, value_enum)]
    verdict: Option<VerdictFilter>,
    /// Only flows carried over mutual TLS (HBONE).
    #[arg(long, conflicts_with_all = ["plaintext", "node_local"])]
    mtls: bool,
    /// Only flows carried in plaintext.
    #[arg(long, conflicts_with = "node_local")]
    plaintext: bool,
    /// Only flows between two pods of one node, handed over inside its agent.
    #[arg(long)]
    node_local: bool,
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// Verdicts to filter on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum VerdictFilter {
    /// Carried to the destination.
    Allowed,
    /// Refused by policy.
    Denied,
    /// Failed.
    Error,
}

impl VerdictFilter {
    fn as_str(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Denied => "denied",
            Self::Error => "error",
        }
    }
}

fn pod_matches(filter: &str, e: &EndpointJson) -> bool {
    match filter.split_once('/') {
        Some((ns, pod)) => e.namespace == ns && e.workload == pod,
        None => e.workload == filter,
    }
}

fn identity_matches(filter: &str, identity: &str) -> bool {
    match filter.strip_suffix('*') {
        Some(prefix) => identity.starts_with(prefix),
        None => identity == filter,
    }
}

impl FlowsArgs {
    /// Whether `f` passes every filter given.
    fn keeps(&self, f: &FlowJson, now: SystemTime) -> bool {
        let started = humantime::parse_rfc3339(&f.time).unwrap_or(SystemTime::UNIX_EPOCH);
        self.since.is_none_or(|since| now.duration_since(started).unwrap_or_default() <= since)
            && self.namespace.as_ref().is_none_or(|ns| f.src.namespace == *ns || f.dst.namespace == *ns)
            && self.from_pod.as_ref().is_none_or(|p| pod_matches(p, &f.src))
            && self.to_pod.as_ref().is_none_or(|p| pod_matches(p, &f.dst))
            && self.from_identity.as_ref().is_none_or(|i| identity_matches(i, &f.src.identity))
            && self.to_identity.as_ref().is_none_or(|i| identity_matches(i, &f.dst.identity))
            && self.service.as_ref().is_none_or(|s| f.service == *s)
            && self.port.is_none_or(|p| f.dst.port == u32::from(p))
            && self.verdict.is_none_or(|v| f.verdict == v.as_str())
            && (!self.mtls || f.transport == "mtls")
            && (!self.plaintext || f.transport == "plaintext")
            && (!self.node_local || f.transport == "node-local")
    }

    fn check(&self) -> Result<(), String> {
        for (flag, value) in [("--from-pod", &self.from_pod), ("--to-pod", &self.to_pod), ("--service", &self.service)]
        {
            if let Some(v) = value {
                let parts: Vec<&str> = v.split('/').collect();
                let bad =
                    parts.iter().any(|p| p.is_empty()) || parts.len() > 2 || (flag == "--service" && parts.len() != 2);
                if bad {
                    let form = if flag == "--service" { "NAMESPACE/NAME" } else { "NAMESPACE/POD or POD" };
                    return Err(format!("{flag} {v:?}: expected {form}"));
                }
            }
        }
        for (flag, value) in [("--from-identity", &self.from_identity), ("--to-identity", &self.to_identity)] {
            if let Some(v) = value.as_ref().filter(|v| !v.starts_with(ferrymesh_spiffe::SCHEME)) {
                return Err(format!("{flag} {v:?}: expected a SPIFFE ID ({}...)", ferrymesh_spiffe::SCHEME));
            }
        }
        Ok(())
    }
}

fn name(e: &EndpointJson) -> String {
    if e.workload.is_empty() {
        format!("{}:{}", e.ip, e.port)
    } else {
        format!("{}/{}:{}", e.namespace, e.workload, e.port)
    }
}

/// What a person wants to read about a flow besides its ends: the deciding policy and rule of
/// a denial (else why it was refused), the error of a failure, the service and the allowing
/// policy of an allowed flow.
fn detail(f: &FlowJson) -> String {
    let mut parts = Vec::new();
    if !f.service.is_empty() {
        parts.push(format!("svc {}", f.service));
    }
    match f.verdict.as_str() {
        "denied" if !f.policy.is_empty() => parts.push(f.policy.clone()),
        "allowed" if !f.policy.is_empty() => parts.push(f.policy.clone()),
        "allowed" => {}
        _ => parts.push(f.reason.clone()),
    }
    parts.join("; ")
}

const TABLE_HEADER: [&str; 7] = ["TIME", "SOURCE", "DESTINATION", "BYTES ↑/↓", "SEC", "VERDICT", "POLICY / REASON"];
const TABLE_WIDTHS: [usize; 6] = [12, 24, 24, 13, 5, 7];
/// Tables are cut to this many columns (the JSON and compact forms carry everything).
const TABLE_MAX: usize = 120;

fn table_line(cells: [&str; 7]) -> String {
    let mut line = String::new();
    for (cell, width) in cells.iter().zip(TABLE_WIDTHS) {
        line.push_str(&format!("{:<width$}  ", fit(cell, width)));
    }
    let used = line.chars().count();
    line.push_str(&fit(cells[6], TABLE_MAX.saturating_sub(used)));
    line.trim_end().to_string()
}

/// The transport as the table and compact output show it.
fn security(f: &FlowJson) -> &'static str {
    match f.transport.as_str() {
        "mtls" => "mTLS",
        "node-local" => "local",
        _ => "plain",
    }
}

fn print(f: &FlowJson, output: Output) {
    match output {
        Output::Json => println!("{}", f.to_line()),
        Output::Compact => {
            println!(
                "{} [{}] {} -> {} {} {} {}/{}B {}",
                f.time,
                f.node,
                name(&f.src),
                name(&f.dst),
                f.verdict.to_uppercase(),
                security(f),
                f.bytes_sent,
                f.bytes_received,
                detail(f)
            );
        }
        Output::Table => {
            let time = f.time.get(11..23).unwrap_or(&f.time);
            let bytes = format!("{}/{}", f.bytes_sent, f.bytes_received);
            println!(
                "{}",
                table_line([time, &name(&f.src), &name(&f.dst), &bytes, security(f), &f.verdict, &detail(f)])
            );
        }
    }
}

async fn recent(agent: &Path) -> Result<Vec<FlowJson>, AgentError> {
    let flows = connect(agent)
        .await?
        .list_flows(ListFlowsRequest {})
        .await
        .map_err(|s| AgentError::rpc(agent, s))?
        .into_inner()
        .flows;
    Ok(flows.into_iter().map(FlowJson::from).collect())
}

/// Prints the flows of `agents` as `args` asks.
pub async fn run(agents: &[PathBuf], args: FlowsArgs) -> Result<(), String> {
    args.check()?;
    // Connect every agent first: one unreachable agent is an error, not a partial answer.
    let mut clients = Vec::new();
    for agent in agents {
        clients.push((agent.clone(), connect(agent).await?));
    }
    let mut flows = Vec::new();
    for (agent, _) in &clients {
        flows.extend(recent(agent).await?);
    }
    let now = SystemTime::now();
    flows.retain(|f| args.keeps(f, now));
    flows.sort_by(|a, b| a.time.cmp(&b.time));
    if let Some(n) = args.last {
        flows.drain(..flows.len().saturating_sub(n));
    }
    if args.output == Output::Table {
        println!("{}", table_line(TABLE_HEADER));
    }
    for f in &flows {
        print(f, args.output);
    }
    if !args.follow {
        return Ok(());
    }
    let mut streams = Vec::new();
    for (agent, mut client) in clients {
        let stream = client.watch_flows(WatchFlowsRequest {}).await.map_err(|s| AgentError::rpc(&agent, s))?;
        streams.push(stream.into_inner().map(move |item| (agent.clone(), item)).boxed());
    }
    // Said once every stream is open, so a reader knows from here on nothing is missed.
    eprintln!("meshctl: following the flows of {} agent(s)", streams.len());
    let mut live = futures::stream::select_all(streams);
    while let Some((agent, item)) = live.next().await {
        let flow = FlowJson::from(item.map_err(|s| AgentError::rpc(&agent, s))?);
        if args.keeps(&flow, SystemTime::now()) {
            print(&flow, args.output);
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
    }
    Err("the agents closed the flow stream".into())
}
