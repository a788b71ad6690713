//! The data plane's metrics, recorded where their events happen: the `ferrymesh_tcp_*` family
//! with Istio's label names, counted as flows are recorded, and the certificate counters. The
//! process that embeds the library installs the Prometheus recorder, describes the metrics
//! and registers them at zero (docs/OBSERVABILITY.md lists every one).

use std::sync::Arc;

use ferrymesh_policy::Transport;
use metrics::{counter, Label, SharedString};

use crate::flows::{Direction, Flow, Verdict};

/// Istio's labels of a TCP flow, as the recording agent sees it. Each value is made once and
/// shared: the flow's four counters take the labels, and a clone of a shared value is a count
/// taken, not a string copied.
fn flow_labels(flow: &Flow) -> Vec<Label> {
    const UNKNOWN: SharedString = SharedString::const_str("unknown");
    let shared = |s: &str| SharedString::from_shared(Arc::from(s));
    let workload = |e: &crate::flows::Endpoint| e.names().map_or((UNKNOWN, UNKNOWN), |(n, ns)| (shared(n), shared(ns)));
    let principal = |e: &crate::flows::Endpoint| e.identity.clone().map_or(UNKNOWN, SharedString::from_shared);
    let (src_name, src_ns) = workload(&flow.src);
    let (dst_name, dst_ns) = workload(&flow.dst);
    let service = if flow.service.is_empty() { UNKNOWN } else { shared(&flow.service) };
    vec![
        Label::new("reporter", if flow.direction == Direction::Outbound { "source" } else { "destination" }),
        Label::new("source_workload", src_name),
        Label::new("source_workload_namespace", src_ns),
        Label::new("source_principal", principal(&flow.src)),
        Label::new("destination_workload", dst_name),
        Label::new("destination_workload_namespace", dst_ns),
        Label::new("destination_service", service),
        Label::new("destination_principal", principal(&flow.dst)),
        Label::new(
            "connection_security_policy",
            match flow.transport {
                Transport::Mtls => "mutual_tls",
                Transport::NodeLocal => "node_local",
                Transport::Plaintext => "none",
            },
        ),
        Label::new("response_flags", flow.response_flags()),
    ]
}

/// Counts a recorded (closed) flow. A connection that never carried data (refused, failed to
/// dial) counts as failed, not as opened and closed.
pub fn flow_closed(flow: &Flow) {
    let labels = flow_labels(flow);
    let carried = flow.verdict() == Verdict::Allowed || flow.bytes_sent > 0 || flow.bytes_received > 0;
    if carried {
        counter!("ferrymesh_tcp_connections_opened_total", labels.clone()).increment(1);
        counter!("ferrymesh_tcp_connections_closed_total", labels.clone()).increment(1);
        counter!("ferrymesh_tcp_sent_bytes_total", labels.clone()).increment(flow.bytes_sent);
        counter!("ferrymesh_tcp_received_bytes_total", labels.clone()).increment(flow.bytes_received);
    }
    if flow.verdict() != Verdict::Allowed {
        counter!("ferrymesh_tcp_connections_failed_total", labels).increment(1);
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
