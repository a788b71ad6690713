//! The flow JSON: one object per closed connection, the same in `meshctl flows -o json` and the
//! agent's access log (a stable contract; docs/OBSERVABILITY.md describes every field).

use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::admin as proto;

/// One end of a flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointJson {
    /// IP address.
    pub ip: String,
    /// Port.
    pub port: u32,
    /// Pod name; empty when the address belongs to no known workload.
    pub workload: String,
    /// Namespace of the pod.
    pub namespace: String,
    /// SPIFFE ID: the recording agent's own side always, the peer's only when mTLS proved it.
    pub identity: String,
}

/// A flow.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FlowJson {
    /// Start of the connection, RFC 3339 with milliseconds, UTC.
    pub time: String,
    /// Node of the agent that recorded it.
    pub node: String,
    /// `outbound` (recorded by the client's agent) or `inbound` (by the server's).
    pub direction: String,
    /// Client.
    pub src: EndpointJson,
    /// Original destination (for a service VIP: the chosen endpoint).
    pub dst: EndpointJson,
    /// Bytes from src to dst.
    pub bytes_sent: u64,
    /// Bytes from dst to src.
    pub bytes_received: u64,
    /// Lifetime of the connection.
    pub duration_ms: u64,
    /// `allowed`, `denied` or `error`.
    pub verdict: String,
    /// `closed` for a normal end, else what went wrong or why it was refused.
    pub reason: String,
    /// What would fix a refusal or failure; empty when there is nothing to add.
    pub hint: String,
    /// Istio's `response_flags`, as in the flow's metrics: `-`, `DENY` or `CONNECT_FAILED`.
    pub response_flags: String,
    /// Carried over mutual TLS (HBONE).
    pub mtls: bool,
    /// `mtls` (HBONE between agents), `node-local` (both pods on the recording agent's node,
    /// handed over inside the agent, never on the network) or `plaintext`.
    pub transport: String,
    /// Serial of the certificate the peer presented (inbound mTLS only).
    pub peer_cert_serial: String,
    /// The deciding policy and rule (`namespace/name rule N`), or why nothing allowed it.
    pub policy: String,
    /// `namespace/name` of the service the client addressed by VIP.
    pub service: String,
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
            hint: f.hint,
            response_flags: f.response_flags,
            mtls: f.mtls,
            transport: f.transport,
            peer_cert_serial: f.peer_cert_serial,
            policy: f.policy,
            service: f.service,
        }
    }
}

impl FlowJson {
    /// The flow as one line of JSON.
    pub fn to_line(&self) -> String {
        serde_json::to_string(self).expect("a flow serializes")
    }
}
