//! Limits on what peers may hold open at the pods' inbound listeners (15008 HBONE, 15006
//! plaintext): concurrent connections per source address and per pod, concurrent HBONE streams
//! per source address and per pod, and the time a client may take to finish its TLS handshake. They bound
//! what a hostile or broken peer can make the agent hold (memory, tasks, dials to the app) while
//! everyone else keeps being served. Each refusal names its limit and the flag that sets it, in
//! the flow reason and in `ferrymesh_inbound_refused_total{limit}`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// The limits (mesh-agent flags).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// How long a client of 15008 may take to finish its TLS handshake.
    pub handshake_timeout: Duration,
    /// Concurrent inbound connections (HBONE and plaintext) from one source address.
    pub connections_per_source: u32,
    /// Concurrent inbound connections (HBONE and plaintext) to one pod.
    pub connections_per_pod: u32,
    /// Concurrent HBONE streams from one source address, over all its connections.
    pub streams_per_source: u32,
    /// Concurrent HBONE streams to one pod.
    pub streams_per_pod: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            handshake_timeout: Duration::from_secs(10),
            connections_per_source: 512,
            connections_per_pod: 4096,
            streams_per_source: 2048,
            streams_per_pod: 16384,
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
    /// Concurrent inbound connections (HBONE and plaintext) one source address may hold open.
    #[arg(long, default_value_t = Limits::default().connections_per_source)]
    pub max_connections_per_source: u32,
    /// Concurrent inbound connections (HBONE and plaintext) one pod may be held open.
    #[arg(long, default_value_t = Limits::default().connections_per_pod)]
    pub max_connections_per_pod: u32,
    /// Concurrent HBONE streams one source address may hold open, over all its connections.
    #[arg(long, default_value_t = Limits::default().streams_per_source)]
    pub max_streams_per_source: u32,
    /// Concurrent HBONE streams one pod may be held open.
    #[arg(long, default_value_t = Limits::default().streams_per_pod)]
    pub max_streams_per_pod: u32,
}

impl From<&LimitFlags> for Limits {
    fn from(flags: &LimitFlags) -> Self {
        Self {
            handshake_timeout: flags.hbone_handshake_timeout,
            connections_per_source: flags.max_connections_per_source,
            connections_per_pod: flags.max_connections_per_pod,
            streams_per_source: flags.max_streams_per_source,
            streams_per_pod: flags.max_streams_per_pod,
        }
    }
}

/// A limit that refused something.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// `--hbone-handshake-timeout`
    HandshakeTimeout,
    /// `--max-connections-per-source`
    ConnectionsPerSource,
    /// `--max-connections-per-pod`
    ConnectionsPerPod,
    /// `--max-streams-per-source`
    StreamsPerSource,
    /// `--max-streams-per-pod`
    StreamsPerPod,
    /// The HTTP/2 server's own protections (rapid reset, oversized header blocks, malformed
    /// frames): the connection was closed with a GOAWAY.
    Http2Protocol,
}

impl Limit {
    /// The `limit` label of `ferrymesh_inbound_refused_total`.
    pub const fn name(self) -> &'static str {
        match self {
            Limit::HandshakeTimeout => "handshake_timeout",
            Limit::ConnectionsPerSource => "connections_per_source",
            Limit::ConnectionsPerPod => "connections_per_pod",
            Limit::StreamsPerSource => "streams_per_source",
            Limit::StreamsPerPod => "streams_per_pod",
            Limit::Http2Protocol => "http2_protocol",
        }
    }

    /// Every limit, for registering the metric at zero.
    pub const ALL: [Limit; 6] = [
        Limit::HandshakeTimeout,
        Limit::ConnectionsPerSource,
        Limit::ConnectionsPerPod,
        Limit::StreamsPerSource,
        Limit::StreamsPerPod,
        Limit::Http2Protocol,
    ];

    /// Counts one refusal.
    pub fn count(self) {
        metrics::counter!("ferrymesh_inbound_refused_total", "limit" => self.name()).increment(1);
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
}

impl Refusal {
    /// The limit that refused.
    pub fn limit(&self) -> Limit {
        match self {
            Refusal::SourceConnections(..) => Limit::ConnectionsPerSource,
            Refusal::PodConnections(_) => Limit::ConnectionsPerPod,
            Refusal::SourceStreams(..) => Limit::StreamsPerSource,
            Refusal::PodStreams(_) => Limit::StreamsPerPod,
        }
    }
}

/// What kind of thing a [`Held`] counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Kind {
    Connection,
    Stream,
}

/// Connections and streams open now, by source address and by pod address.
#[derive(Debug, Default)]
pub struct Load {
    by_source: Mutex<HashMap<(Kind, IpAddr), u32>>,
    by_pod: Mutex<HashMap<(Kind, IpAddr), u32>>,
}

/// A connection or stream counted as open until dropped.
#[derive(Debug)]
pub struct Held {
    load: Arc<Load>,
    kind: Kind,
    source: IpAddr,
    pod: IpAddr,
}

fn release<K: std::hash::Hash + Eq>(map: &Mutex<HashMap<K, u32>>, key: K) {
    let mut map = map.lock().expect("load lock");
    if let Some(n) = map.get_mut(&key) {
        *n -= 1;
        if *n == 0 {
            map.remove(&key);
        }
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        release(&self.load.by_source, (self.kind, self.source));
        release(&self.load.by_pod, (self.kind, self.pod));
    }
}

impl Load {
    /// Counts a new connection from `source` to pod `pod`, unless either is at its limit.
    pub fn connection(self: &Arc<Self>, limits: &Limits, source: IpAddr, pod: IpAddr) -> Result<Held, Refusal> {
        self.take(Kind::Connection, source, pod, (limits.connections_per_source, limits.connections_per_pod))
    }

    /// Counts a new HBONE stream from `source` to pod `pod`, unless either is at its limit.
    pub fn stream(self: &Arc<Self>, limits: &Limits, source: IpAddr, pod: IpAddr) -> Result<Held, Refusal> {
        self.take(Kind::Stream, source, pod, (limits.streams_per_source, limits.streams_per_pod))
    }

    fn take(
        self: &Arc<Self>,
        kind: Kind,
        source: IpAddr,
        pod: IpAddr,
        (per_source, per_pod): (u32, u32),
    ) -> Result<Held, Refusal> {
        // Both counts change under both locks (always taken in this order), so a refusal by the
        // pod's limit never leaves the source's count raised.
        let mut by_source = self.by_source.lock().expect("load lock");
        let mut by_pod = self.by_pod.lock().expect("load lock");
        let from_source = by_source.get(&(kind, source)).copied().unwrap_or(0);
        if from_source >= per_source {
            return Err(match kind {
                Kind::Connection => Refusal::SourceConnections(from_source, source),
                Kind::Stream => Refusal::SourceStreams(from_source, source),
            });
        }
        let to_pod = by_pod.get(&(kind, pod)).copied().unwrap_or(0);
        if to_pod >= per_pod {
            return Err(match kind {
                Kind::Connection => Refusal::PodConnections(to_pod),
                Kind::Stream => Refusal::PodStreams(to_pod),
            });
        }
        *by_source.entry((kind, source)).or_default() += 1;
        *by_pod.entry((kind, pod)).or_default() += 1;
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
        assert_eq!(load.by_source.lock().unwrap()[&(Kind::Connection, b)], 1);
        assert_eq!(load.by_pod.lock().unwrap()[&(Kind::Connection, pod)], 3);
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
        assert!(load.by_source.lock().unwrap().is_empty() && load.by_pod.lock().unwrap().is_empty());
    }
}
