//! The data plane's metrics, recorded where their events happen: the `ferrymesh_tcp_*` family
//! with Istio's label names, counted as flows are recorded, and the certificate counters. The
//! process that embeds the library installs the Prometheus recorder, describes the metrics
//! and registers them at zero (docs/OBSERVABILITY.md lists every one).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, OnceLock};

use ferrymesh_policy::Transport;
use metrics::{counter, Counter, Label};

use crate::flows::{Direction, Endpoint, Flow, Verdict};

/// Istio's label names of a TCP flow, in the order [`label_values`] gives their values.
const FLOW_LABELS: [&str; 10] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_workload_namespace",
    "destination_service",
    "destination_principal",
    "connection_security_policy",
    "response_flags",
];

/// The values of [`FLOW_LABELS`] for `flow`, as the recording agent sees it, borrowed from it.
fn label_values(flow: &Flow) -> [&str; 10] {
    const UNKNOWN: &str = "unknown";
    fn workload(e: &Endpoint) -> (&str, &str) {
        e.names().unwrap_or((UNKNOWN, UNKNOWN))
    }
    fn principal(e: &Endpoint) -> &str {
        e.identity.as_deref().unwrap_or(UNKNOWN)
    }
    let (src_name, src_ns) = workload(&flow.src);
    let (dst_name, dst_ns) = workload(&flow.dst);
    [
        if flow.direction == Direction::Outbound { "source" } else { "destination" },
        src_name,
        src_ns,
        principal(&flow.src),
        dst_name,
        dst_ns,
        if flow.service.is_empty() { UNKNOWN } else { &flow.service },
        principal(&flow.dst),
        match flow.transport {
            Transport::Mtls => "mutual_tls",
            Transport::NodeLocal => "node_local",
            Transport::Plaintext => "none",
        },
        flow.response_flags(),
    ]
}

/// The flow counters, by label values: each series' handles are taken from the recorder once,
/// not looked up for every flow (the recorder's lookup compares label sets sorted, which was a
/// few percent of an agent's CPU under a new-connection load).
#[derive(Default)]
pub struct FlowCounters {
    /// By the hash of the series' label values; a collision replaces the entry (both series
    /// still count: the recorder hands out the same counters again).
    series: Mutex<HashMap<u64, Arc<Series>>>,
    hasher: RandomState,
}

/// One series' handles. A series is registered with the recorder only once it counts
/// something, as `counter!` would: a label set whose flows all carried data has no `failed`
/// series.
struct Series {
    values: [Box<str>; 10],
    /// opened, closed, sent bytes, received bytes.
    carried: OnceLock<[Counter; 4]>,
    failed: OnceLock<Counter>,
}

impl Series {
    fn labels(&self) -> Vec<Label> {
        FLOW_LABELS.iter().zip(&self.values).map(|(name, value)| Label::new(*name, value.to_string())).collect()
    }
}

impl std::fmt::Debug for FlowCounters {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let series = self.series.lock().map_or(0, |all| all.len());
        f.debug_struct("FlowCounters").field("series", &series).finish()
    }
}

impl FlowCounters {
    /// Counts a recorded (closed) flow. A connection that never carried data (refused, failed
    /// to dial) counts as failed, not as opened and closed.
    pub fn count(&self, flow: &Flow) {
        let series = self.series(label_values(flow));
        let carried = flow.verdict() == Verdict::Allowed || flow.bytes_sent > 0 || flow.bytes_received > 0;
        if carried {
            let [opened, closed, sent, received] = series.carried.get_or_init(|| {
                let labels = series.labels();
                [
                    counter!("ferrymesh_tcp_connections_opened_total", labels.clone()),
                    counter!("ferrymesh_tcp_connections_closed_total", labels.clone()),
                    counter!("ferrymesh_tcp_sent_bytes_total", labels.clone()),
                    counter!("ferrymesh_tcp_received_bytes_total", labels),
                ]
            });
            opened.increment(1);
            closed.increment(1);
            sent.increment(flow.bytes_sent);
            received.increment(flow.bytes_received);
        }
        if flow.verdict() != Verdict::Allowed {
            let failed =
                series.failed.get_or_init(|| counter!("ferrymesh_tcp_connections_failed_total", series.labels()));
            failed.increment(1);
        }
    }

    fn series(&self, values: [&str; 10]) -> Arc<Series> {
        let hash = self.hasher.hash_one(values);
        let mut all = self.series.lock().expect("flow counters lock");
        match all.get(&hash) {
            Some(series) if series.values.iter().map(AsRef::as_ref).eq(values) => series.clone(),
            _ => {
                let series = Arc::new(Series {
                    values: values.map(Box::from),
                    carried: OnceLock::new(),
                    failed: OnceLock::new(),
                });
                all.insert(hash, series.clone());
                series
            }
        }
    }
}

/// A certificate was issued to this agent.
pub fn cert_issued() {
    counter!("ferrymesh_certs_issued_total").increment(1);
}

/// Obtaining or renewing a certificate failed.
pub fn cert_failed() {
    counter!("ferrymesh_cert_rotation_failures_total").increment(1);
}
