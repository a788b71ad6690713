//! mesh-ctrl's Prometheus metrics: their HELP texts, and every counter and gauge registered at
//! zero when the server starts, so a scrape lists each metric docs/OBSERVABILITY.md names
//! before its first event (a missing series and a zero are not the same answer to an
//! operator). The metrics are recorded where their events happen (server, certs, snapshot).

use metrics::{counter, describe_counter, describe_gauge, describe_histogram, gauge, Unit};

/// Describes every mesh-ctrl metric and registers the counters and gauges at zero.
pub fn describe() {
    describe_gauge!("ferrymesh_ctrl_connected_agents", "Open agent config streams.");
    describe_histogram!(
        "ferrymesh_ctrl_push_latency_seconds",
        Unit::Seconds,
        "Time from sending a config update to the agent's ack."
    );
    describe_counter!("ferrymesh_ctrl_config_nacks_total", "Config updates agents rejected.");
    describe_gauge!("ferrymesh_ctrl_config_version", "Version of the current config snapshot.");
    describe_gauge!(
        "ferrymesh_ctrl_rejected_config_objects",
        "Config objects rejected (kept at their last good version)."
    );
    describe_counter!("ferrymesh_ctrl_certs_issued_total", "Workload certificates signed.");
    describe_counter!(
        "ferrymesh_ctrl_cert_refusals_total",
        "Certificate requests refused (node authorization, unknown service account)."
    );
    describe_counter!(
        "ferrymesh_ctrl_tls_handshake_failures_total",
        "Connections to 15012 closed for a failed or missing TLS handshake."
    );
    describe_counter!(
        "ferrymesh_ctrl_auth_failures_total",
        "Certificate requests and config streams whose token was refused."
    );
    describe_counter!(
        "ferrymesh_ctrl_auth_throttled_total",
        "Certificate requests and config streams refused unread: their source failed authentication too often."
    );
    describe_counter!(
        "ferrymesh_ctrl_config_refusals_total",
        "Config streams refused, by reason: unauthenticated, scope (another node's or waypoint's view), streams (too many open)."
    );
    describe_counter!(
        "ferrymesh_ctrl_netns_annotations_ignored_total",
        "Pods whose ferrymesh.io/netns annotation was ignored (Kubernetes mode: the agent finds a pod's netns by its cgroup)."
    );
    describe_counter!(
        "ferrymesh_ctrl_ca_reloads_total",
        "Changes of the CA files (--ca-dir or the CA Secret), by result: applied, or rejected (the CA in force stays)."
    );
    describe_gauge!("ferrymesh_ctrl_trust_bundle_roots", "Roots in the trust bundle sent to agents.");
    describe_counter!(
        "ferrymesh_ctrl_status_writes_total",
        "Status writes to Gateway API objects (Kubernetes mode), by result: ok, conflict (retried on the object's next change), error."
    );
    for result in ["applied", "rejected"] {
        counter!("ferrymesh_ctrl_ca_reloads_total", "result" => result).absolute(0);
    }
    for result in ["ok", "conflict", "error"] {
        counter!("ferrymesh_ctrl_status_writes_total", "result" => result).absolute(0);
    }
    for reason in ["unauthenticated", "scope", "streams"] {
        counter!("ferrymesh_ctrl_config_refusals_total", "reason" => reason).absolute(0);
    }
    describe_counter!(
        "ferrymesh_ctrl_connections_refused_total",
        "Connections to 15012 closed at once, by the cap they met: connections_per_source, connections, handshakes."
    );
    for limit in ["connections_per_source", "connections", "handshakes"] {
        counter!("ferrymesh_ctrl_connections_refused_total", "limit" => limit).absolute(0);
    }
    for name in [
        "ferrymesh_ctrl_config_nacks_total",
        "ferrymesh_ctrl_certs_issued_total",
        "ferrymesh_ctrl_cert_refusals_total",
        "ferrymesh_ctrl_tls_handshake_failures_total",
        "ferrymesh_ctrl_auth_failures_total",
        "ferrymesh_ctrl_auth_throttled_total",
        "ferrymesh_ctrl_netns_annotations_ignored_total",
    ] {
        counter!(name).absolute(0);
    }
    for name in [
        "ferrymesh_ctrl_connected_agents",
        "ferrymesh_ctrl_config_version",
        "ferrymesh_ctrl_rejected_config_objects",
        "ferrymesh_ctrl_trust_bundle_roots",
    ] {
        gauge!(name).set(0.0);
    }
}
