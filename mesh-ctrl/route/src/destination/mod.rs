//! ferrymesh.io/v1alpha1 `DestinationRule`: how a waypoint treats the endpoints of one Service,
//! with Istio's `trafficPolicy` fields: `connectionPool` (limits whose overflow answers 503
//! `UO`), `outlierDetection` (endpoints that keep failing are ejected for a while) and
//! `loadBalancer` (`simple`, or `consistentHash` on a header, a cookie or the source IP).
//! It never does I/O.

pub mod spec;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

/// A DestinationRule, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationRule {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The Service its `host` names, `namespace/name`.
    pub service: String,
    /// Its `trafficPolicy`.
    pub policy: TrafficSettings,
    /// Its `exportTo` (empty: every namespace).
    pub export_to: Vec<String>,
}

impl DestinationRule {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }

    /// Whether its `exportTo` lets it govern clients of `namespace`.
    pub fn exported_to(&self, namespace: &str) -> bool {
        self.export_to.is_empty()
            || self
                .export_to
                .iter()
                .any(|to| to == "*" || to == namespace || (to == "." && self.namespace == namespace))
    }

    /// What it sets, in a few words (for meshctl).
    pub fn summary(&self) -> String {
        let mut parts = Vec::new();
        let p = &self.policy.pool;
        let limits = [
            ("maxConnections", p.max_connections),
            ("http1MaxPendingRequests", p.max_pending_requests),
            ("http2MaxRequests", p.max_requests),
            ("maxRequestsPerConnection", p.max_requests_per_connection),
            ("maxRetries", p.max_retries),
        ];
        parts.extend(limits.iter().filter_map(|(name, n)| n.map(|n| format!("{name} {n}"))));
        if let Some(o) = &self.policy.outliers {
            let mut on = Vec::new();
            if let Some(n) = o.consecutive_5xx {
                on.push(format!("{n} 5xx"));
            }
            if let Some(n) = o.consecutive_gateway {
                on.push(format!("{n} gateway errors"));
            }
            parts.push(format!(
                "eject after {} in a row for {}ms+ (at most {}%)",
                on.join(" or "),
                o.base_ejection.as_millis(),
                o.max_ejection_percent
            ));
        }
        parts.push(match &self.policy.balancer {
            LoadBalancer::LeastRequest => "least request".to_string(),
            LoadBalancer::RoundRobin => "round robin".to_string(),
            LoadBalancer::Random => "random".to_string(),
            LoadBalancer::Hash(HashOn::Header(name)) => format!("hash of header {name}"),
            LoadBalancer::Hash(HashOn::Cookie { name, .. }) => format!("hash of cookie {name}"),
            LoadBalancer::Hash(HashOn::SourceIp) => "hash of source IP".to_string(),
        });
        format!("{}: {}", self.key(), parts.join(", "))
    }
}

/// `trafficPolicy`: what is not set keeps the mesh's default (no limit, no ejection, least
/// requests by power of two choices).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TrafficSettings {
    /// `connectionPool`.
    pub pool: ConnectionPool,
    /// `outlierDetection`.
    pub outliers: Option<OutlierDetection>,
    /// `loadBalancer`.
    pub balancer: LoadBalancer,
}

/// `connectionPool`, as Envoy's circuit breakers have it, per Service; None: no limit. HTTP/2
/// (gRPC) requests share one connection per endpoint, so `max_connections` and
/// `max_pending_requests` bound HTTP/1.1 requests only; `max_requests` bounds every request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ConnectionPool {
    /// `tcp.maxConnections`: HTTP/1.1 requests in progress at once, each holding a connection
    /// to an endpoint (a request over it waits for one, as a pending request).
    pub max_connections: Option<u32>,
    /// `http.http1MaxPendingRequests`: requests waiting for a connection.
    pub max_pending_requests: Option<u32>,
    /// `http.http2MaxRequests`: requests in progress at once, of any protocol.
    pub max_requests: Option<u32>,
    /// `http.maxRequestsPerConnection`: 1 closes each HTTP/1.1 connection after one request.
    pub max_requests_per_connection: Option<u32>,
    /// `http.maxRetries`: retries in progress at once.
    pub max_retries: Option<u32>,
}

/// `outlierDetection` (Envoy's): an endpoint that answers `consecutive_5xx` 5xx (or fails to
/// be reached) in a row, or `consecutive_gateway` 502/503/504 (or connection failures) in a
/// row, is ejected for `base_ejection` times the number of its ejections (at most
/// [`MAX_EJECTION`]), never more than `max_ejection_percent` of the endpoints (at least one);
/// once an ejected endpoint has stayed healthy for an `interval` its count goes down by one.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutlierDetection {
    /// `consecutive5xxErrors`; None (or 0): not counted.
    pub consecutive_5xx: Option<u32>,
    /// `consecutiveGatewayErrors`; None (or 0): not counted.
    pub consecutive_gateway: Option<u32>,
    /// `interval`.
    pub interval: Duration,
    /// `baseEjectionTime`.
    pub base_ejection: Duration,
    /// `maxEjectionPercent`.
    pub max_ejection_percent: u32,
}

/// The longest an endpoint stays ejected (Envoy's `max_ejection_time` default).
pub const MAX_EJECTION: Duration = Duration::from_secs(300);

impl OutlierDetection {
    /// Istio's defaults for what `outlierDetection` leaves out: 5 consecutive 5xx, every 10 s,
    /// 30 s, 10%.
    pub const DEFAULT_CONSECUTIVE_5XX: u32 = 5;
    /// Default `interval`.
    pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
    /// Default `baseEjectionTime`.
    pub const DEFAULT_BASE_EJECTION: Duration = Duration::from_secs(30);
    /// Default `maxEjectionPercent`.
    pub const DEFAULT_MAX_EJECTION_PERCENT: u32 = 10;

    /// How many of `endpoints` may be ejected at once: `max_ejection_percent` of them, and at
    /// least one (as Envoy allows).
    pub fn max_ejected(&self, endpoints: usize) -> usize {
        (endpoints * self.max_ejection_percent as usize / 100).max(1)
    }

    /// How long the `times`-th ejection of an endpoint lasts.
    pub fn ejection_time(&self, times: u32) -> Duration {
        self.base_ejection.saturating_mul(times.max(1)).min(MAX_EJECTION.max(self.base_ejection))
    }
}

/// `loadBalancer`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum LoadBalancer {
    /// `LEAST_REQUEST` (and the default): power of two choices on requests in progress.
    #[default]
    LeastRequest,
    /// `ROUND_ROBIN`: each endpoint in turn.
    RoundRobin,
    /// `RANDOM`.
    Random,
    /// `consistentHash`: requests with the same key go to the same endpoint while it is there.
    Hash(HashOn),
}

/// What a consistent hash is taken over.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum HashOn {
    /// `httpHeaderName`: this header's value (requests without it are balanced as usual).
    Header(String),
    /// `httpCookie`: this cookie's value; without the cookie, with a `ttl`, the waypoint makes
    /// one and sets it on the response (as Envoy does); without a ttl, balanced as usual.
    Cookie {
        /// The cookie's name.
        name: String,
        /// Its lifetime, when the waypoint makes it (0: a session cookie).
        ttl: Option<Duration>,
        /// Its `Path`, if any.
        path: Option<String>,
    },
    /// `useSourceIp`: the client's address.
    SourceIp,
}

/// Every DestinationRule the waypoint holds, by the Service each is for.
#[derive(Clone, Debug, Default)]
pub struct DestinationRules {
    /// By Service, each Service's rules sorted by `namespace/name`.
    by_service: std::collections::HashMap<String, Vec<Arc<DestinationRule>>>,
}

impl DestinationRules {
    /// The set of `rules`.
    pub fn new(mut rules: Vec<Arc<DestinationRule>>) -> Self {
        rules.sort_by_key(|r| r.key());
        let mut by_service: std::collections::HashMap<String, Vec<_>> = std::collections::HashMap::new();
        for rule in rules {
            by_service.entry(rule.service.clone()).or_default().push(rule);
        }
        Self { by_service }
    }

    /// The rule governing requests of a client of namespace `client` (None: not known) to
    /// Service `service` (`namespace/name`), found as Istio finds it: a rule of the client's
    /// namespace, then one of the Service's namespace, then one of the root namespace
    /// `root`, each only when its `exportTo` reaches the client's namespace. A rule of any other
    /// namespace governs nothing: a tenant's rule never reaches another tenant's clients. Of
    /// several in one namespace, the first by name (Istio takes the oldest; the mesh holds no
    /// creation times for them).
    pub fn of(&self, service: &str, client: Option<&str>, root: &str) -> Option<&Arc<DestinationRule>> {
        let rules = self.by_service.get(service)?;
        let service_namespace = service.split_once('/').map_or("", |(namespace, _)| namespace);
        let reaches = |rule: &&Arc<DestinationRule>| client.is_none_or(|client| rule.exported_to(client));
        [client, Some(service_namespace), Some(root)]
            .into_iter()
            .flatten()
            .find_map(|namespace| rules.iter().filter(|r| r.namespace == namespace).find(reaches))
    }
}

/// The Service (`namespace/name`) an Istio `host` names from namespace `namespace`: a short
/// name (`reviews`, in `namespace`), `name.ns`, `name.ns.svc` or `name.ns.svc.<cluster domain>`.
/// Wildcards and hosts outside the cluster are refused.
pub fn service_of_host(host: &str, namespace: &str) -> Result<String, String> {
    if host.is_empty() {
        return Err("empty".into());
    }
    if host.contains('*') {
        return Err(format!("{host:?}: wildcard hosts are not supported; name one Service"));
    }
    let labels: Vec<&str> = host.split('.').collect();
    let valid = |l: &str| !l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !labels.iter().all(|l| valid(l)) {
        return Err(format!("{host:?} is not a DNS name of a Service"));
    }
    match labels.as_slice() {
        [name] => Ok(format!("{namespace}/{name}")),
        [name, ns] => Ok(format!("{ns}/{name}")),
        [name, ns, "svc", ..] => Ok(format!("{ns}/{name}")),
        _ => Err(format!(
            "{host:?} is not a Service of the cluster (name, name.namespace or name.namespace.svc.cluster.local)"
        )),
    }
}

#[cfg(test)]
mod tests;
