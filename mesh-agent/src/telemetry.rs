//! Metrics and readiness. Prometheus text on :15020 (`/metrics`, rendered by the `metrics`
//! crate's Prometheus recorder): every metric described and registered at zero here; the
//! `ferrymesh_tcp_*` family and the certificate counters are recorded by the data-plane library
//! (`ferrymesh_dataplane::metrics`), the eBPF counters and map fill, identity and control-plane
//! gauges refreshed here every second. Readiness on :15021 (`/healthz/ready`): 200 once the eBPF programs
//! are attached and the first config from mesh-ctrl is applied, else 503 saying what is
//! missing. docs/OBSERVABILITY.md lists every metric.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use metrics::{counter, describe_counter, describe_gauge, gauge, Unit};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::sync::watch;

use crate::ebpf::MapStats;
use crate::state::State;

/// Installs the Prometheus recorder, with every metric described and the unlabelled ones
/// registered at zero (a scrape lists them before their first event); [`serve_metrics`]
/// serves what it renders.
pub fn install_metrics() -> anyhow::Result<PrometheusHandle> {
    let handle = PrometheusBuilder::new()
        .install_recorder()
        .map_err(|e| anyhow::anyhow!("cannot install the metrics recorder: {e}"))?;
    describe();
    Ok(handle)
}

fn describe() {
    ferrymesh_dataplane::spans::describe_metrics();
    describe_counter!(
        "ferrymesh_tcp_connections_opened_total",
        "TCP connections that carried traffic (counted when they close)."
    );
    describe_counter!("ferrymesh_tcp_connections_closed_total", "TCP connections closed.");
    describe_counter!("ferrymesh_tcp_sent_bytes_total", Unit::Bytes, "Bytes from source to destination.");
    describe_counter!("ferrymesh_tcp_received_bytes_total", Unit::Bytes, "Bytes from destination to source.");
    describe_counter!("ferrymesh_tcp_connections_failed_total", "TCP connections denied or failed.");
    describe_counter!("ferrymesh_ebpf_events_total", "eBPF program counters, summed over CPUs.");
    describe_gauge!("ferrymesh_ebpf_map_entries", "Entries in an eBPF map.");
    describe_gauge!("ferrymesh_ebpf_map_capacity", "Capacity of an eBPF map.");
    describe_gauge!(
        "ferrymesh_ebpf_adopted_objects",
        "Pinned eBPF objects an earlier agent left that this one adopted when it started (label kind: map, link)."
    );
    describe_counter!("ferrymesh_certs_issued_total", "Workload certificates obtained from mesh-ctrl.");
    describe_counter!("ferrymesh_cert_rotation_failures_total", "Failed certificate requests (retried with backoff).");
    describe_gauge!("ferrymesh_ctrl_connected", "1 while the config stream from mesh-ctrl is up.");
    describe_gauge!("ferrymesh_config_version", "Config version held.");
    describe_counter!(
        "ferrymesh_inbound_refused_total",
        "Inbound connections and HBONE streams refused by a limit (label limit)."
    );
    describe_counter!(
        "ferrymesh_outbound_refused_total",
        "Outbound connections (a pod's, captured on 15001) refused by a limit (label limit)."
    );
    for limit in crate::limits::Limit::INBOUND.into_iter().chain(crate::limits::Limit::OUTBOUND) {
        counter!(limit.metric(), "limit" => limit.name()).absolute(0);
    }
    counter!("ferrymesh_certs_issued_total").absolute(0);
    counter!("ferrymesh_cert_rotation_failures_total").absolute(0);
    ferrymesh_dataplane::hbone::budget::describe_metrics();
}

/// Records what the agent adopted from an earlier one (zero when it created everything).
pub fn record_adopted(adopted: &crate::ebpf::Adopted) {
    gauge!("ferrymesh_ebpf_adopted_objects", "kind" => "map").set(adopted.maps.len() as f64);
    gauge!("ferrymesh_ebpf_adopted_objects", "kind" => "link").set(adopted.links as f64);
}

/// How often map fill is counted: a walk of every key, a syscall each, so not every second.
const MAP_FILL_EVERY: Duration = Duration::from_secs(10);

/// Refreshes the gauges read from the kernel and the state store every second (map fill every
/// [`MAP_FILL_EVERY`], on a blocking thread), and runs the recorder's upkeep, forever.
pub async fn refresh(stats: Arc<MapStats>, state: Arc<State>, metrics: PrometheusHandle) {
    let mut second = tokio::time::interval(Duration::from_secs(1));
    let mut fill = tokio::time::interval(MAP_FILL_EVERY);
    loop {
        tokio::select! {
            _ = second.tick() => {
                for (c, value) in stats.counters() {
                    counter!("ferrymesh_ebpf_events_total", "event" => c.name()).absolute(value);
                }
                let (connected, version) = state.ctrl_status();
                gauge!("ferrymesh_ctrl_connected").set(if connected { 1.0 } else { 0.0 });
                gauge!("ferrymesh_config_version").set(version as f64);
                metrics.run_upkeep();
            }
            _ = fill.tick() => {
                let stats = stats.clone();
                if let Ok(maps) = tokio::task::spawn_blocking(move || stats.map_fill()).await {
                    for (name, entries, capacity) in maps {
                        gauge!("ferrymesh_ebpf_map_entries", "map" => name).set(entries as f64);
                        gauge!("ferrymesh_ebpf_map_capacity", "map" => name).set(capacity as f64);
                    }
                }
            }
        }
    }
}

/// Serves `/metrics` on `addr` until `shutdown` fires.
pub async fn serve_metrics(
    addr: SocketAddr,
    metrics: PrometheusHandle,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve(addr, "metrics", shutdown, move |path| match path {
        "/metrics" => (hyper::StatusCode::OK, metrics.render()),
        _ => (hyper::StatusCode::NOT_FOUND, "try /metrics\n".to_string()),
    })
    .await
}

/// Serves readiness on `addr` until `shutdown` fires. `ready` says what is missing, if anything.
pub async fn serve_readiness(
    addr: SocketAddr,
    ready: impl Fn() -> Result<(), String> + Send + Sync + 'static,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve(addr, "readiness", shutdown, move |path| match path {
        "/healthz/ready" => match ready() {
            Ok(()) => (hyper::StatusCode::OK, "ready\n".to_string()),
            Err(missing) => (hyper::StatusCode::SERVICE_UNAVAILABLE, format!("not ready: {missing}\n")),
        },
        _ => (hyper::StatusCode::NOT_FOUND, "try /healthz/ready\n".to_string()),
    })
    .await
}

/// A plain-text HTTP/1 server on `addr` answering GETs with `answer(path)`, until `shutdown`
/// fires (the listener closes then; requests under way finish).
async fn serve(
    addr: SocketAddr,
    what: &str,
    mut shutdown: watch::Receiver<bool>,
    answer: impl Fn(&str) -> (hyper::StatusCode, String) + Send + Sync + 'static,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| std::io::Error::new(e.kind(), format!("cannot serve {what} on {addr}: {e}")))?;
    let answer = Arc::new(answer);
    loop {
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted?,
            _ = shutdown.wait_for(|stop| *stop) => return Ok(()),
        };
        let answer = answer.clone();
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let (status, body) = answer(request.uri().path());
                async move {
                    hyper::Response::builder()
                        .status(status)
                        .header("content-type", "text/plain; version=0.0.4; charset=utf-8")
                        .body(body)
                }
            });
            let io = hyper_util::rt::TokioIo::new(stream);
            let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
        });
    }
}
