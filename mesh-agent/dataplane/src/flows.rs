//! Flow records: one per captured connection, written when it closes, kept in a bounded ring
//! of recent flows for the admin API, streamed to `meshctl flows --follow`, written to the
//! access log and counted in the `ferrymesh_tcp_*` metrics. It owns the record shape and its
//! wire conversion; it never decides verdicts.

use std::collections::VecDeque;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ferrymesh_api::admin as proto;
use ferrymesh_api::flow_json::FlowJson;
use ferrymesh_policy::Transport;

use crate::error::ProxyError;
use crate::metrics::FlowCounters;
use crate::state::{State, Workload};

/// Which way the connection went, seen from the workload the agent serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// A captured connect() of an enrolled pod.
    Outbound,
    /// A connection arriving at an enrolled pod.
    Inbound,
}

impl Direction {
    /// Name used in the flow JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Direction::Outbound => "outbound",
            Direction::Inbound => "inbound",
        }
    }
}

/// Outcome of a flow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Carried to the destination.
    Allowed,
    /// Refused by policy.
    Denied,
    /// Failed (dial error, reset, unknown original destination...).
    Error,
}

impl Verdict {
    /// Name used in the flow JSON.
    pub const fn as_str(self) -> &'static str {
        match self {
            Verdict::Allowed => "allowed",
            Verdict::Denied => "denied",
            Verdict::Error => "error",
        }
    }
}

/// One end of a flow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    /// Address and port.
    pub addr: SocketAddr,
    /// The workload the address belongs to, if known (shared with the state store).
    pub workload: Option<Arc<Workload>>,
    /// SPIFFE ID: our own side's, and the peer's only when mTLS proved it.
    pub identity: Option<Arc<str>>,
}

impl Endpoint {
    /// The endpoint at `addr`, named after the workload that owns its IP.
    pub fn lookup(state: &State, addr: SocketAddr) -> Self {
        Self { addr, workload: state.workload_by_ip(addr.ip()), identity: None }
    }

    /// (pod name, namespace) of the workload, if known.
    pub fn names(&self) -> Option<(&str, &str)> {
        self.workload.as_ref().map(|w| (w.name.as_str(), w.namespace.as_str()))
    }
}

/// A finished connection.
#[derive(Debug, Clone)]
pub struct Flow {
    /// When the connection was accepted.
    pub start: SystemTime,
    /// Node of the agent that recorded it.
    pub node: String,
    /// Outbound or inbound.
    pub direction: Direction,
    /// The client.
    pub src: Endpoint,
    /// The original destination.
    pub dst: Endpoint,
    /// Bytes from src to dst.
    pub bytes_sent: u64,
    /// Bytes from dst to src.
    pub bytes_received: u64,
    /// Time from accept to close.
    pub duration: Duration,
    /// Why it did not end normally; None when it was carried and closed.
    pub error: Option<ProxyError>,
    /// How the connection was carried (mTLS, node-local, plaintext).
    pub transport: Transport,
    /// Serial of the certificate the peer presented (inbound mTLS only).
    pub peer_cert_serial: String,
    /// The deciding policy and rule (`namespace/name rule N`), or why nothing allowed it;
    /// empty when no policy applied.
    pub policy: String,
    /// `namespace/name` of the service the client addressed by VIP; empty otherwise.
    pub service: String,
}

impl Flow {
    /// Its verdict: allowed when it ended normally, else as its error says.
    pub fn verdict(&self) -> Verdict {
        self.error.as_ref().map_or(Verdict::Allowed, ProxyError::verdict)
    }

    /// The `response_flags` of its metrics: `-` when it ended normally.
    pub fn response_flags(&self) -> &'static str {
        self.error.as_ref().map_or("-", ProxyError::response_flags)
    }
}

fn endpoint_proto(e: &Endpoint) -> proto::Endpoint {
    let (workload, namespace) = e.names().unwrap_or_default();
    proto::Endpoint {
        ip: e.addr.ip().to_string(),
        port: u32::from(e.addr.port()),
        workload: workload.into(),
        namespace: namespace.into(),
        identity: e.identity.as_deref().unwrap_or_default().to_string(),
    }
}

impl From<&Flow> for proto::Flow {
    fn from(f: &Flow) -> Self {
        let start_unix_ms = f.start.duration_since(UNIX_EPOCH).map(|d| d.as_millis() as i64).unwrap_or(0);
        proto::Flow {
            start_unix_ms,
            node: f.node.clone(),
            direction: f.direction.as_str().into(),
            src: Some(endpoint_proto(&f.src)),
            dst: Some(endpoint_proto(&f.dst)),
            bytes_sent: f.bytes_sent,
            bytes_received: f.bytes_received,
            duration_ms: f.duration.as_millis() as u64,
            verdict: f.verdict().as_str().into(),
            reason: f.error.as_ref().map_or_else(|| "closed".to_string(), ToString::to_string),
            hint: f.error.as_ref().and_then(ProxyError::hint).unwrap_or_default(),
            response_flags: f.response_flags().into(),
            mtls: f.transport == Transport::Mtls,
            transport: f.transport.as_str().into(),
            peer_cert_serial: f.peer_cert_serial.clone(),
            policy: f.policy.clone(),
            service: f.service.clone(),
        }
    }
}

/// Where records go, one JSON line each: to stdout, appended to a file, or nowhere. Lines are
/// gathered in memory and written together, by [`AccessLog::flush`] (the process calls it every
/// [`AccessLog::FLUSH_EVERY`] and on shutdown) or once [`AccessLog::FLUSH_AT`] bytes wait, so a
/// busy proxy spends one write on many records rather than one each, as Envoy buffers its
/// access log. The agent writes a flow per closed connection, the waypoint a record per request.
#[derive(Debug)]
pub struct AccessLog {
    sink: Sink,
    /// Lines not yet written. Writes happen under this lock too, so lines keep their order.
    pending: Mutex<String>,
}

#[derive(Debug)]
enum Sink {
    Off,
    Stdout,
    File(std::fs::File),
}

impl AccessLog {
    /// How long a line may wait in memory.
    pub const FLUSH_EVERY: Duration = Duration::from_millis(100);
    /// How many bytes of lines are written at once, without waiting for the next flush.
    pub const FLUSH_AT: usize = 64 * 1024;

    /// `-` (stdout), `off`, or a file path (appended to).
    pub fn open(spec: &str) -> std::io::Result<Self> {
        let sink = match spec {
            "-" => Sink::Stdout,
            "off" => Sink::Off,
            path => Sink::File(std::fs::OpenOptions::new().create(true).append(true).open(path)?),
        };
        Ok(Self { sink, pending: Mutex::default() })
    }

    /// Adds the line `line` makes (a JSON record, without its newline); nothing is made when
    /// the log is off.
    pub fn write_with(&self, line: impl FnOnce() -> String) {
        if matches!(self.sink, Sink::Off) {
            return;
        }
        let line = line();
        let mut pending = self.pending.lock().expect("access log lock");
        pending.push_str(&line);
        pending.push('\n');
        if pending.len() >= Self::FLUSH_AT {
            self.write_out(&mut pending);
        }
    }

    /// Writes the lines waiting.
    pub fn flush(&self) {
        self.write_out(&mut self.pending.lock().expect("access log lock"));
    }

    /// Writes every `FLUSH_EVERY` until the task is dropped.
    pub async fn flush_periodically(&self) {
        let mut every = tokio::time::interval(Self::FLUSH_EVERY);
        loop {
            every.tick().await;
            self.flush();
        }
    }

    fn write_out(&self, pending: &mut String) {
        use std::io::Write;
        if pending.is_empty() {
            return;
        }
        let result = match &self.sink {
            Sink::Off => Ok(()),
            Sink::Stdout => std::io::stdout().lock().write_all(pending.as_bytes()),
            // `&File` writes: the lock held is the pending lines'.
            Sink::File(file) => (&mut &*file).write_all(pending.as_bytes()),
        };
        pending.clear();
        if let Err(e) = result {
            tracing::warn!("cannot write the access log: {e}");
        }
    }
}

impl Drop for AccessLog {
    /// A process that ends by returning (or by an error) keeps the lines still waiting.
    fn drop(&mut self) {
        self.flush();
    }
}

/// Bounded ring of the most recent flows, and the stream of new ones.
#[derive(Debug)]
pub struct FlowTable {
    capacity: usize,
    ring: Mutex<VecDeque<Flow>>,
    live: tokio::sync::broadcast::Sender<Flow>,
    access_log: AccessLog,
    counters: FlowCounters,
}

impl FlowTable {
    /// A table keeping the last `capacity` flows, logging each to `access_log`.
    pub fn new(capacity: usize, access_log: AccessLog) -> Self {
        Self {
            capacity,
            ring: Mutex::new(VecDeque::with_capacity(capacity.min(1024))),
            live: tokio::sync::broadcast::channel(1024).0,
            access_log,
            counters: FlowCounters::default(),
        }
    }

    /// Records a finished flow, evicting the oldest when full.
    pub fn record(&self, flow: Flow) {
        tracing::debug!(?flow, "flow");
        self.counters.count(&flow);
        self.access_log.write_with(|| FlowJson::from(proto::Flow::from(&flow)).to_line());
        // No receiver (nobody following) is fine.
        let _ = self.live.send(flow.clone());
        let mut ring = self.ring.lock().expect("flow lock");
        if ring.len() == self.capacity {
            ring.pop_front();
        }
        ring.push_back(flow);
    }

    /// Flows recorded from now on. A follower that falls more than 1024 flows behind misses
    /// some (it is told how many).
    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<Flow> {
        self.live.subscribe()
    }

    /// Where each recorded flow is logged (the agent flushes it, see [`AccessLog::flush`]).
    pub fn access_log(&self) -> &AccessLog {
        &self.access_log
    }

    /// All flows held, oldest first.
    pub fn snapshot(&self) -> Vec<Flow> {
        self.ring.lock().expect("flow lock").iter().cloned().collect()
    }
}

/// Unspecified address used for an endpoint that could not be determined.
pub const UNKNOWN_ADDR: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED), 0);

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(port: u16) -> Flow {
        Flow {
            start: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            node: "n1".into(),
            direction: Direction::Inbound,
            src: Endpoint { addr: SocketAddr::from(([10, 0, 0, 1], port)), workload: None, identity: None },
            dst: Endpoint {
                addr: SocketAddr::from(([10, 0, 0, 2], 80)),
                workload: Some(Arc::new(Workload {
                    uid: "uid-web".into(),
                    name: "web".into(),
                    namespace: "shop".into(),
                    node: "n1".into(),
                    service_account: "web".into(),
                    ip: [10, 0, 0, 2].into(),
                    other_ips: Vec::new(),
                    netns: Default::default(),
                    labels: Default::default(),
                    captured: true,
                    waypoint: None,
                })),
                identity: Some("spiffe://cluster.local/ns/shop/sa/web".into()),
            },
            bytes_sent: 5,
            bytes_received: 7,
            duration: Duration::from_millis(12),
            error: None,
            transport: Transport::Mtls,
            peer_cert_serial: "0a".into(),
            policy: "shop/allow rule 0".into(),
            service: String::new(),
        }
    }

    /// A recorder that keeps each series' counter by its name and labels, and counts how often
    /// a counter is asked for.
    #[derive(Default)]
    struct Counted {
        series: Mutex<std::collections::BTreeMap<String, Arc<std::sync::atomic::AtomicU64>>>,
        asked: std::sync::atomic::AtomicUsize,
    }

    impl Counted {
        fn value(&self, name: &str, response_flags: &str) -> Option<u64> {
            let series = self.series.lock().unwrap();
            let mut matching = series
                .iter()
                .filter(|(k, _)| k.starts_with(name) && k.contains(&format!("response_flags={response_flags},")));
            let (_, value) = matching.next()?;
            assert!(matching.next().is_none(), "one series of {name} with {response_flags}");
            Some(value.load(std::sync::atomic::Ordering::Relaxed))
        }
    }

    impl metrics::Recorder for Counted {
        fn describe_counter(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
        fn describe_gauge(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
        fn describe_histogram(&self, _: metrics::KeyName, _: Option<metrics::Unit>, _: metrics::SharedString) {}
        fn register_counter(&self, key: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Counter {
            self.asked.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let labels: String = key.labels().map(|l| format!("{}={},", l.key(), l.value())).collect();
            let name = format!("{} {labels}", key.name());
            metrics::Counter::from_arc(self.series.lock().unwrap().entry(name).or_default().clone())
        }
        fn register_gauge(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Gauge {
            metrics::Gauge::noop()
        }
        fn register_histogram(&self, _: &metrics::Key, _: &metrics::Metadata<'_>) -> metrics::Histogram {
            metrics::Histogram::noop()
        }
    }

    #[test]
    fn flow_counters_take_each_series_once_and_count_every_flow() {
        let recorder = Counted::default();
        let denied = || {
            let mut flow = flow(9);
            (flow.bytes_sent, flow.bytes_received) = (0, 0);
            flow.error = Some(ProxyError::Denied(crate::error::Denied {
                reason: "denied: shop/deny rule 0".into(),
                policy: "shop/deny rule 0".into(),
                hint: String::new(),
            }));
            flow
        };
        metrics::with_local_recorder(&recorder, || {
            let counters = FlowCounters::default();
            for port in 1..=3 {
                counters.count(&flow(port));
            }
            counters.count(&denied());
            counters.count(&denied());
        });
        // Three flows of one series, and two of the denied one.
        assert_eq!(recorder.value("ferrymesh_tcp_connections_opened_total", "-"), Some(3));
        assert_eq!(recorder.value("ferrymesh_tcp_sent_bytes_total", "-"), Some(15));
        assert_eq!(recorder.value("ferrymesh_tcp_received_bytes_total", "-"), Some(21));
        assert_eq!(recorder.value("ferrymesh_tcp_connections_failed_total", "DENY"), Some(2));
        // A series is registered only for what it counts: no failed series for the allowed
        // flows, no opened series for the denied ones (they carried nothing).
        assert_eq!(recorder.value("ferrymesh_tcp_connections_failed_total", "-"), None);
        assert_eq!(recorder.value("ferrymesh_tcp_connections_opened_total", "DENY"), None);
        // Five counters in all, each asked for once, not once per flow.
        assert_eq!(recorder.asked.load(std::sync::atomic::Ordering::Relaxed), 5);
    }

    #[test]
    fn ring_keeps_the_newest() {
        let table = FlowTable::new(2, AccessLog::open("off").unwrap());
        for port in 1..=3 {
            table.record(flow(port));
        }
        let ports: Vec<u16> = table.snapshot().iter().map(|f| f.src.addr.port()).collect();
        assert_eq!(ports, vec![2, 3]);
    }

    #[test]
    fn access_log_writes_lines_together_in_order() {
        struct Removed(std::path::PathBuf);
        impl Drop for Removed {
            fn drop(&mut self) {
                let _ = std::fs::remove_file(&self.0);
            }
        }
        let path = Removed(std::env::temp_dir().join(format!("ferrymesh-access-log-{}", std::process::id())));
        let read = || std::fs::read_to_string(&path.0).unwrap();
        let log = AccessLog::open(path.0.to_str().unwrap()).unwrap();
        log.write_with(|| "{\"n\":1}".into());
        log.write_with(|| "{\"n\":2}".into());
        assert_eq!(read(), "", "lines wait in memory for a flush");
        log.flush();
        assert_eq!(read(), "{\"n\":1}\n{\"n\":2}\n");
        let big = "x".repeat(AccessLog::FLUSH_AT);
        log.write_with(|| big.clone());
        assert_eq!(read().len(), 16 + AccessLog::FLUSH_AT + 1, "FLUSH_AT bytes are written without a flush");
        log.write_with(|| "{\"n\":3}".into());
        drop(log);
        assert!(read().ends_with("x\n{\"n\":3}\n"), "dropping the log writes what waits");
        AccessLog::open("off").unwrap().write_with(|| panic!("an off log makes no line"));
    }

    #[test]
    fn wire_form() {
        let p = proto::Flow::from(&flow(4000));
        assert_eq!(p.start_unix_ms, 1_700_000_000_123);
        assert_eq!(p.direction, "inbound");
        assert_eq!(
            (p.verdict.as_str(), p.reason.as_str(), p.hint.as_str(), p.response_flags.as_str()),
            ("allowed", "closed", "", "-")
        );
        let dst = p.dst.unwrap();
        assert_eq!(
            (dst.ip.as_str(), dst.port, dst.workload.as_str(), dst.namespace.as_str()),
            ("10.0.0.2", 80, "web", "shop")
        );
        assert_eq!(dst.identity, "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!(p.src.unwrap().workload, "");
        assert!(p.mtls);
        assert_eq!(p.transport, "mtls");
    }
}
