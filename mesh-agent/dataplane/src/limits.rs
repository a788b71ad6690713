//! Limits on what peers may hold open at the inbound listeners (the agent's 15008 HBONE and
//! 15006 plaintext, the waypoint's 15008): concurrent connections and HBONE streams per source
//! address, per pod and in all, TLS handshakes in progress, the time a client may take to
//! finish its handshake, and (the waypoint's) HTTP requests in flight per source and in all.
//! Pods' own outbound connections (15001) are counted here too. They bound what a hostile or broken peer can make the agent hold
//! (memory, tasks, dials to the app) while everyone else keeps being served: with the window
//! budget (`crate::hbone::budget`), the node-wide caps are what docs/SECURITY.md's memory bound
//! is computed from. Each refusal names its limit and the flag that sets it, in the flow reason
//! and in `ferrymesh_inbound_refused_total{limit}`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The limits (mesh-agent and mesh-waypoint flags).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a client of 15008 may take to finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// TLS handshakes in progress at once on 15008, from all sources (counted from a client's
    /// first byte: nothing is allocated for TLS before it).
    pub handshakes: u32,
    /// Concurrent inbound connections (HBONE and plaintext) from one source address.
    pub connections_per_source: u32,
    /// Concurrent inbound connections (HBONE and plaintext) to one pod.
    pub connections_per_pod: u32,
    /// Concurrent inbound connections (HBONE and plaintext) from all sources to all pods.
    pub connections: u32,
    /// Concurrent HBONE streams from one source address, over all its connections.
    pub streams_per_source: u32,
    /// Concurrent HBONE streams to one pod.
    pub streams_per_pod: u32,
    /// Concurrent HBONE streams from all sources to all pods.
    pub streams: u32,
    /// Concurrent outbound connections (captured, on 15001) of one pod.
    pub outbound_per_pod: u32,
    /// Concurrent outbound connections of all the node's pods.
    pub outbound: u32,
    /// HTTP requests in flight at the waypoint from one source address, each from its head to
    /// the end of its answer (the waypoint only).
    pub requests_per_source: u32,
    /// HTTP requests in flight at the waypoint from all sources (the waypoint only).
    pub requests: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            handshakes: 256,
            connections_per_source: 512,
            connections_per_pod: 1024,
            connections: 1024,
            streams_per_source: 2048,
            streams_per_pod: 16384,
            streams: 32768,
            outbound_per_pod: 4096,
            outbound: 32768,
            requests_per_source: 256,
            requests: 1024,
        }
    }
}

/// The limits as flags, the same for the agent's pod listeners and the waypoint's 15008 (whose
/// "pod" is the waypoint itself); `#[command(flatten)]` them into a program's arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct LimitFlags {
    /// How long a client of 15008 may take to finish its TLS handshake.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub hbone_handshake_timeout: Duration,
    /// TLS handshakes in progress at once on 15008 (from a client's first byte to its end).
    #[arg(long, default_value_t = Limits::default().handshakes)]
    pub max_handshakes: u32,
    /// Concurrent inbound connections (HBONE and plaintext) one source address may hold open.
    #[arg(long, default_value_t = Limits::default().connections_per_source)]
    pub max_connections_per_source: u32,
    /// Concurrent inbound connections (HBONE and plaintext) one pod may be held open.
    #[arg(long, default_value_t = Limits::default().connections_per_pod)]
    pub max_connections_per_pod: u32,
    /// Concurrent inbound connections (HBONE and plaintext) all sources may hold open, to all
    /// pods: with --hbone-window-budget, what bounds the memory peers can make this hold.
    #[arg(long, default_value_t = Limits::default().connections)]
    pub max_connections: u32,
    /// Concurrent HBONE streams one source address may hold open, over all its connections.
    #[arg(long, default_value_t = Limits::default().streams_per_source)]
    pub max_streams_per_source: u32,
    /// Concurrent HBONE streams one pod may be held open.
    #[arg(long, default_value_t = Limits::default().streams_per_pod)]
    pub max_streams_per_pod: u32,
    /// Concurrent HBONE streams all sources may hold open, to all pods.
    #[arg(long, default_value_t = Limits::default().streams)]
    pub max_streams: u32,
}

impl From<&LimitFlags> for Limits {
    fn from(flags: &LimitFlags) -> Self {
        Self {
            handshake_timeout: flags.hbone_handshake_timeout,
            handshakes: flags.max_handshakes,
            connections_per_source: flags.max_connections_per_source,
            connections_per_pod: flags.max_connections_per_pod,
            connections: flags.max_connections,
            streams_per_source: flags.max_streams_per_source,
            streams_per_pod: flags.max_streams_per_pod,
            streams: flags.max_streams,
            ..Limits::default()
        }
    }
}

/// A limit that refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--hbone-handshake-timeout`
    HandshakeTimeout,
    /// `--max-handshakes`
    Handshakes,
    /// `--max-connections-per-source`
    ConnectionsPerSource,
    /// `--max-connections-per-pod`
    ConnectionsPerPod,
    /// `--max-connections`
    Connections,
    /// `--max-streams-per-source`
    StreamsPerSource,
    /// `--max-streams-per-pod`
    StreamsPerPod,
    /// `--max-streams`
    Streams,
    /// `--max-outbound-connections-per-pod`
    OutboundConnectionsPerPod,
    /// `--max-outbound-connections`
    OutboundConnections,
    /// `--max-requests-per-source` (the waypoint)
    RequestsPerSource,
    /// `--max-requests` (the waypoint)
    Requests,
    /// The HTTP/2 server's own protections (rapid reset, oversized header blocks, malformed
    /// frames): the connection was closed with a GOAWAY.
    Http2Protocol,
}

impl Limit {
    /// The `limit` label of `ferrymesh_inbound_refused_total`.
    pub const fn name(self) -> &'static str {
        match self {
            Limit::HandshakeTimeout => "handshake_timeout",
            Limit::Handshakes => "handshakes",
            Limit::ConnectionsPerSource => "connections_per_source",
            Limit::ConnectionsPerPod => "connections_per_pod",
            Limit::Connections => "connections",
            Limit::StreamsPerSource => "streams_per_source",
            Limit::StreamsPerPod => "streams_per_pod",
            Limit::Streams => "streams",
            Limit::OutboundConnectionsPerPod => "outbound_connections_per_pod",
            Limit::OutboundConnections => "outbound_connections",
            Limit::RequestsPerSource => "requests_per_source",
            Limit::Requests => "requests",
            Limit::Http2Protocol => "http2_protocol",
        }
    }

    /// The metric its refusals count in: `ferrymesh_outbound_refused_total` for the outbound
    /// limits, `ferrymesh_inbound_refused_total` for the others.
    pub const fn metric(self) -> &'static str {
        match self {
            Limit::OutboundConnectionsPerPod | Limit::OutboundConnections => "ferrymesh_outbound_refused_total",
            _ => "ferrymesh_inbound_refused_total",
        }
    }

    /// The limits of 15001 (the agent only), for registering their metric at zero.
    pub const OUTBOUND: [Limit; 2] = [Limit::OutboundConnectionsPerPod, Limit::OutboundConnections];

    /// The waypoint's limits on requests in flight, for registering their metric at zero.
    pub const REQUESTS: [Limit; 2] = [Limit::RequestsPerSource, Limit::Requests];

    /// The limits of the inbound listeners, for registering their metric at zero.
    pub const INBOUND: [Limit; 9] = [
        Limit::HandshakeTimeout,
        Limit::Handshakes,
        Limit::ConnectionsPerSource,
        Limit::ConnectionsPerPod,
        Limit::Connections,
        Limit::StreamsPerSource,
        Limit::StreamsPerPod,
        Limit::Streams,
        Limit::Http2Protocol,
    ];

    /// Counts one refusal.
    pub fn count(self) {
        metrics::counter!(self.metric(), "limit" => self.name()).increment(1);
    }
}

/// Why a connection or stream was refused: the limit, with what it was about.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Refusal {
    /// Too many connections from one source.
    #[error("refused: {0} connections already open from {1} (--max-connections-per-source)")]
    SourceConnections(u32, IpAddr),
    /// Too many connections to one pod.
    #[error("refused: {0} connections already open to this pod (--max-connections-per-pod)")]
    PodConnections(u32),
    /// Too many streams from one source.
    #[error("refused: {0} HBONE streams already open from {1} (--max-streams-per-source)")]
    SourceStreams(u32, IpAddr),
    /// Too many streams to one pod.
    #[error("refused: {0} HBONE streams already open to this pod (--max-streams-per-pod)")]
    PodStreams(u32),
    /// Too many connections in all.
    #[error("refused: {0} connections already open in all (--max-connections)")]
    Connections(u32),
    /// Too many streams in all.
    #[error("refused: {0} HBONE streams already open in all (--max-streams)")]
    Streams(u32),
    /// Too many TLS handshakes in progress.
    #[error("refused: {0} TLS handshakes already in progress (--max-handshakes)")]
    Handshakes(u32),
    /// Too many requests in flight from one source.
    #[error("refused: {0} requests already in flight from {1} (--max-requests-per-source)")]
    SourceRequests(u32, IpAddr),
    /// Too many requests in flight in all.
    #[error("refused: {0} requests already in flight in all (--max-requests)")]
    Requests(u32),
    /// Too many outbound connections of one pod.
    #[error("refused: {0} outbound connections already open from this pod (--max-outbound-connections-per-pod)")]
    OutboundPerPod(u32),
    /// Too many outbound connections of the node's pods.
    #[error("refused: {0} outbound connections already open from this node's pods (--max-outbound-connections)")]
    Outbound(u32),
}

impl Refusal {
    /// The limit that refused.
    pub fn limit(&self) -> Limit {
        match self {
            Refusal::SourceConnections(..) => Limit::ConnectionsPerSource,
            Refusal::PodConnections(_) => Limit::ConnectionsPerPod,
            Refusal::SourceStreams(..) => Limit::StreamsPerSource,
            Refusal::PodStreams(_) => Limit::StreamsPerPod,
            Refusal::Connections(_) => Limit::Connections,
            Refusal::Streams(_) => Limit::Streams,
            Refusal::Handshakes(_) => Limit::Handshakes,
            Refusal::OutboundPerPod(_) => Limit::OutboundConnectionsPerPod,
            Refusal::Outbound(_) => Limit::OutboundConnections,
            Refusal::SourceRequests(..) => Limit::RequestsPerSource,
            Refusal::Requests(_) => Limit::Requests,
        }
    }
}

/// What kind of thing a [`Held`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Connection,
    Stream,
    Handshake,
    Outbound,
    Request,
}

/// The counts of [`Load`], under one lock.
#[derive(Debug, Default)]
struct Counts {
    by_source: HashMap<(Kind, IpAddr), u32>,
    by_pod: HashMap<(Kind, IpAddr), u32>,
    all: HashMap<Kind, u32>,
}

/// Connections, streams and handshakes open now: by source address, by pod address and in all.
#[derive(Debug, Default)]
pub struct Load {
    counts: Mutex<Counts>,
}

/// A connection, stream or handshake counted as open until dropped.
#[derive(Debug)]
pub struct Held {
    load: Arc<Load>,
    kind: Kind,
    source: IpAddr,
    pod: IpAddr,
}

fn release<K: std::hash::Hash + Eq>(map: &mut HashMap<K, u32>, key: K) {
    if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut counts = self.load.counts.lock().expect("load lock");
        release(&mut counts.by_source, (self.kind, self.source));
        release(&mut counts.by_pod, (self.kind, self.pod));
        release(&mut counts.all, self.kind);
    }
}

impl Load {
    /// Counts a new connection from `source` to pod `pod`, unless one of the three is at its
    /// limit.
    pub fn connection(self: &Arc<Self>, limits: &Limits, source: IpAddr, pod: IpAddr) -> Result<Held, Refusal> {
        let caps = (limits.connections_per_source, limits.connections_per_pod, limits.connections);
        self.take(Kind::Connection, source, pod, caps)
    }

    /// Counts a new HBONE stream from `source` to pod `pod`, unless one of the three is at its
    /// limit.
    pub fn stream(self: &Arc<Self>, limits: &Limits, source: IpAddr, pod: IpAddr) -> Result<Held, Refusal> {
        self.take(Kind::Stream, source, pod, (limits.streams_per_source, limits.streams_per_pod, limits.streams))
    }

    /// Counts a new outbound connection of pod `pod` (accepted on its 15001), unless the pod or
    /// the node is at its limit.
    pub fn outbound(self: &Arc<Self>, limits: &Limits, pod: IpAddr) -> Result<Held, Refusal> {
        self.take(Kind::Outbound, pod, pod, (u32::MAX, limits.outbound_per_pod, limits.outbound))
    }

    /// Counts a new HTTP request from `source` at the waypoint, unless the source or all are at
    /// their limit (held until the end of its answer).
    pub fn request(self: &Arc<Self>, limits: &Limits, source: IpAddr) -> Result<Held, Refusal> {
        self.take(Kind::Request, source, source, (limits.requests_per_source, u32::MAX, limits.requests))
    }

    /// Counts a TLS handshake starting from `source` to pod `pod`, unless `limits.handshakes`
    /// are in progress (a source's handshakes are bounded by its connections).
    pub fn handshake(self: &Arc<Self>, limits: &Limits, source: IpAddr, pod: IpAddr) -> Result<Held, Refusal> {
        self.take(Kind::Handshake, source, pod, (u32::MAX, u32::MAX, limits.handshakes))
    }

    fn take(
        self: &Arc<Self>,
        kind: Kind,
        source: IpAddr,
        pod: IpAddr,
        (per_source, per_pod, in_all): (u32, u32, u32),
    ) -> Result<Held, Refusal> {
        let mut counts = self.counts.lock().expect("load lock");
        let from_source = counts.by_source.get(&(kind, source)).copied().unwrap_or(0);
        let to_pod = counts.by_pod.get(&(kind, pod)).copied().unwrap_or(0);
        let all = counts.all.get(&kind).copied().unwrap_or(0);
        let refused = if from_source >= per_source {
            Some(match kind {
                Kind::Stream => Refusal::SourceStreams(from_source, source),
                Kind::Request => Refusal::SourceRequests(from_source, source),
                _ => Refusal::SourceConnections(from_source, source),
            })
        } else if to_pod >= per_pod {
            Some(match kind {
                Kind::Stream => Refusal::PodStreams(to_pod),
                Kind::Outbound => Refusal::OutboundPerPod(to_pod),
                _ => Refusal::PodConnections(to_pod),
            })
        } else if all >= in_all {
            Some(match kind {
                Kind::Connection => Refusal::Connections(all),
                Kind::Stream => Refusal::Streams(all),
                Kind::Handshake => Refusal::Handshakes(all),
                Kind::Outbound => Refusal::Outbound(all),
                Kind::Request => Refusal::Requests(all),
            })
        } else {
            None
        };
        if let Some(refused) = refused {
            return Err(refused);
        }
        *counts.by_source.entry((kind, source)).or_default() += 1;
        *counts.by_pod.entry((kind, pod)).or_default() += 1;
        *counts.all.entry(kind).or_default() += 1;
        Ok(Held { load: self.clone(), kind, source, pod })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn limits_count_per_source_and_per_pod_and_free_on_drop() {
        let limits = Limits {
            connections_per_source: 2,
            connections_per_pod: 3,
            streams_per_source: 1,
            streams_per_pod: 2,
            ..Limits::default()
        };
        let load = Arc::new(Load::default());
        let (a, b, pod) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]), IpAddr::from([10, 0, 1, 1]));
        let a1 = load.connection(&limits, a, pod).unwrap();
        let _a2 = load.connection(&limits, a, pod).unwrap();
        let refused = load.connection(&limits, a, pod).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "refused: 2 connections already open from 10.0.0.1 (--max-connections-per-source)"
        );
        assert_eq!(refused.limit(), Limit::ConnectionsPerSource);
        let _b1 = load.connection(&limits, b, pod).unwrap();
        let full = load.connection(&limits, b, pod).unwrap_err();
        assert_eq!(full.limit(), Limit::ConnectionsPerPod, "{full}");
        // The refusal by the pod's limit did not count against b.
        assert_eq!(load.counts.lock().unwrap().by_source[&(Kind::Connection, b)], 1);
        assert_eq!(load.counts.lock().unwrap().by_pod[&(Kind::Connection, pod)], 3);
        drop(a1);
        assert!(load.connection(&limits, b, pod).is_ok(), "a closed connection frees its place");
        let s = load.stream(&limits, a, pod).unwrap();
        assert_eq!(load.stream(&limits, a, pod).unwrap_err().limit(), Limit::StreamsPerSource);
        let _s2 = load.stream(&limits, b, pod).unwrap();
        let c = IpAddr::from([10, 0, 0, 3]);
        let full = load.stream(&limits, c, pod).unwrap_err();
        assert_eq!(full.to_string(), "refused: 2 HBONE streams already open to this pod (--max-streams-per-pod)");
        drop(s);
        assert!(load.stream(&limits, c, pod).is_ok(), "a closed stream frees its place");
    }

    #[test]
    fn nothing_is_left_counted_once_everything_is_dropped() {
        let limits = Limits::default();
        let load = Arc::new(Load::default());
        let pod = IpAddr::from([10, 0, 1, 1]);
        let held: Vec<Held> = (0..10u8)
            .flat_map(|i| {
                let source = IpAddr::from([10, 0, 0, i]);
                [load.connection(&limits, source, pod).unwrap(), load.stream(&limits, source, pod).unwrap()]
            })
            .collect();
        drop(held);
        let counts = load.counts.lock().unwrap();
        assert!(counts.by_source.is_empty() && counts.by_pod.is_empty() && counts.all.is_empty());
    }

    #[test]
    fn the_caps_in_all_hold_across_sources_and_pods() {
        let limits = Limits { connections: 3, streams: 2, handshakes: 1, ..Limits::default() };
        let load = Arc::new(Load::default());
        let pod = |i: u8| IpAddr::from([10, 0, 1, i]);
        let source = |i: u8| IpAddr::from([10, 0, 0, i]);
        let connections: Vec<Held> = (0..3).map(|i| load.connection(&limits, source(i), pod(i)).unwrap()).collect();
        let refused = load.connection(&limits, source(9), pod(9)).unwrap_err();
        assert_eq!(refused.to_string(), "refused: 3 connections already open in all (--max-connections)");
        assert_eq!(refused.limit(), Limit::Connections);
        let _streams =
            [load.stream(&limits, source(1), pod(1)).unwrap(), load.stream(&limits, source(2), pod(2)).unwrap()];
        assert_eq!(load.stream(&limits, source(3), pod(3)).unwrap_err().limit(), Limit::Streams);
        let handshake = load.handshake(&limits, source(1), pod(1)).unwrap();
        let refused = load.handshake(&limits, source(2), pod(2)).unwrap_err();
        assert_eq!(refused.to_string(), "refused: 1 TLS handshakes already in progress (--max-handshakes)");
        drop(handshake);
        assert!(load.handshake(&limits, source(2), pod(2)).is_ok(), "a finished handshake frees its place");
        drop(connections);
        assert!(load.connection(&limits, source(9), pod(9)).is_ok(), "closed connections free their places");
    }

    #[test]
    fn outbound_connections_count_per_pod_and_in_all_apart_from_inbound_ones() {
        let limits = Limits { outbound_per_pod: 2, outbound: 3, ..Limits::default() };
        let load = Arc::new(Load::default());
        let (a, b) = (IpAddr::from([10, 0, 1, 1]), IpAddr::from([10, 0, 1, 2]));
        let a1 = load.outbound(&limits, a).unwrap();
        let _a2 = load.outbound(&limits, a).unwrap();
        let refused = load.outbound(&limits, a).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "refused: 2 outbound connections already open from this pod (--max-outbound-connections-per-pod)"
        );
        assert_eq!(refused.limit().metric(), "ferrymesh_outbound_refused_total");
        // a's inbound connections are another count.
        let _inbound = load.connection(&limits, b, a).unwrap();
        let _b1 = load.outbound(&limits, b).unwrap();
        assert_eq!(load.outbound(&limits, b).unwrap_err().limit(), Limit::OutboundConnections);
        drop(a1);
        assert!(load.outbound(&limits, b).is_ok(), "a closed connection frees its place");
    }

    #[test]
    fn requests_count_per_source_and_in_all_apart_from_streams() {
        let limits = Limits { requests_per_source: 2, requests: 3, ..Limits::default() };
        let load = Arc::new(Load::default());
        let (a, b, me) = (IpAddr::from([10, 0, 0, 1]), IpAddr::from([10, 0, 0, 2]), IpAddr::from([10, 0, 1, 1]));
        let _streams: Vec<Held> = (0..4).map(|_| load.stream(&limits, a, me).unwrap()).collect();
        let a1 = load.request(&limits, a).unwrap();
        let _a2 = load.request(&limits, a).unwrap();
        let refused = load.request(&limits, a).unwrap_err();
        assert_eq!(
            refused.to_string(),
            "refused: 2 requests already in flight from 10.0.0.1 (--max-requests-per-source)"
        );
        assert_eq!(refused.limit().name(), "requests_per_source");
        let _b1 = load.request(&limits, b).unwrap();
        let refused = load.request(&limits, b).unwrap_err();
        assert_eq!(refused.to_string(), "refused: 3 requests already in flight in all (--max-requests)");
        drop(a1);
        assert!(load.request(&limits, b).is_ok(), "an ended request frees its place");
    }
}
