//! `meshctl flows`: recent flows of an agent. The JSON form is a stable contract (one object
//! per line); the table is for people.

use std::path::Path;
use std::time::{Duration, UNIX_EPOCH};

use ferrymesh_api::admin::{self as proto, ListFlowsRequest};
use serde::Serialize;

use crate::agent::{connect, AgentError};
use crate::Output;

/// One end of a flow in the JSON output.
#[derive(Debug, Serialize)]
pub struct EndpointJson {
    ip: String,
    port: u32,
    workload: String,
    namespace: String,
    identity: String,
}

/// A flow in the JSON output.
#[derive(Debug, Serialize)]
pub struct FlowJson {
    time: String,
    node: String,
    direction: String,
    src: EndpointJson,
    dst: EndpointJson,
    bytes_sent: u64,
    bytes_received: u64,
    duration_ms: u64,
    verdict: String,
    reason: String,
    mtls: bool,
    peer_cert_serial: String,
    policy: String,
    service: String,
}

fn endpoint(e: Option<proto::Endpoint>) -> EndpointJson {
    let e = e.unwrap_or_default();
    EndpointJson { ip: e.ip, port: e.port, workload: e.workload, namespace: e.namespace, identity: e.identity }
}

impl From<proto::Flow> for FlowJson {
    fn from(f: proto::Flow) -> Self {
        let time = UNIX_EPOCH + Duration::from_millis(f.start_unix_ms.max(0) as u64);
        FlowJson {
            time: humantime::format_rfc3339_millis(time).to_string(),
            node: f.node,
            direction: f.direction,
            src: endpoint(f.src),
            dst: endpoint(f.dst),
            bytes_sent: f.bytes_sent,
            bytes_received: f.bytes_received,
            duration_ms: f.duration_ms,
            verdict: f.verdict,
            reason: f.reason,
            mtls: f.mtls,
            peer_cert_serial: f.peer_cert_serial,
            policy: f.policy,
            service: f.service,
        }
    }
}

fn name(e: &EndpointJson) -> String {
    let addr = format!("{}:{}", e.ip, e.port);
    if e.workload.is_empty() {
        addr
    } else {
        format!("{}/{} ({addr})", e.namespace, e.workload)
    }
}

/// Prints the flows of the agent at `agent`.
pub async fn run(agent: &Path, output: Output) -> Result<(), AgentError> {
    let flows = connect(agent).await?.list_flows(ListFlowsRequest {}).await?.into_inner().flows;
    let flows: Vec<FlowJson> = flows.into_iter().map(FlowJson::from).collect();
    match output {
        Output::Json => {
            for f in &flows {
                println!("{}", serde_json::to_string(f).expect("flow serializes"));
            }
        }
        Output::Table => {
            let rows: Vec<[String; 9]> = flows
                .iter()
                .map(|f| {
                    [
                        f.time.clone(),
                        f.direction.clone(),
                        name(&f.src),
                        match f.service.as_str() {
                            "" => name(&f.dst),
                            service => format!("{} via svc {service}", name(&f.dst)),
                        },
                        format!("{}/{}", f.bytes_sent, f.bytes_received),
                        if f.mtls { "mTLS".into() } else { "plain".into() },
                        f.verdict.clone(),
                        f.policy.clone(),
                        f.reason.clone(),
                    ]
                })
                .collect();
            print_table(
                &["TIME", "DIR", "SOURCE", "DESTINATION", "SENT/RECV", "SECURITY", "VERDICT", "POLICY", "REASON"],
                &rows,
            );
        }
    }
    Ok(())
}

/// Prints rows under headers, columns padded to their widest cell.
pub fn print_table<const N: usize>(headers: &[&str; N], rows: &[[String; N]]) {
    let mut widths = headers.map(str::len);
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(widths).map(|(c, w)| format!("{c:<w$}")).collect();
        println!("{}", padded.join("  ").trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}
