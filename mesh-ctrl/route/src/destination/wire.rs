//! DestinationRules on the wire (`ferrymesh.config.v1.DestinationRule`) and back. A receiver
//! checks every value again and names the rule and field of what it refuses.

use std::time::Duration;

use ferrymesh_api::config as proto;

use super::{ConnectionPool, DestinationRule, HashOn, LoadBalancer, OutlierDetection, TrafficSettings};

/// A DestinationRule that does not convert.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DestinationRule {rule}: field {field}: {message}")]
pub struct WireError {
    /// `namespace/name`.
    pub rule: String,
    /// The field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

fn some(n: u32) -> Option<u32> {
    (n > 0).then_some(n)
}

impl TryFrom<proto::DestinationRule> for DestinationRule {
    type Error = WireError;

    fn try_from(r: proto::DestinationRule) -> Result<Self, WireError> {
        let key = format!("{}/{}", r.namespace, r.name);
        let err = |field: &str, message: String| WireError { rule: key.clone(), field: field.into(), message };
        if r.service_namespace.is_empty() || r.service.is_empty() {
            return Err(err("service", "a Service needs a namespace and a name".into()));
        }
        let p = r.connection_pool.unwrap_or_default();
        if p.max_requests_per_connection > 1 {
            return Err(err("connection_pool.max_requests_per_connection", "only 1 or 0 is supported".into()));
        }
        let pool = ConnectionPool {
            max_connections: some(p.max_connections),
            max_pending_requests: some(p.max_pending_requests),
            max_requests: some(p.max_requests),
            max_requests_per_connection: some(p.max_requests_per_connection),
            max_retries: some(p.max_retries),
        };
        let outliers = match r.outlier_detection {
            None => None,
            Some(o) => {
                if o.max_ejection_percent > 100 {
                    return Err(err(
                        "outlier_detection.max_ejection_percent",
                        format!("{} is over 100", o.max_ejection_percent),
                    ));
                }
                if o.interval_us == 0 || o.base_ejection_us == 0 {
                    return Err(err("outlier_detection", "interval and base ejection must be longer than 0".into()));
                }
                Some(OutlierDetection {
                    consecutive_5xx: some(o.consecutive_5xx),
                    consecutive_gateway: some(o.consecutive_gateway),
                    interval: Duration::from_micros(o.interval_us),
                    base_ejection: Duration::from_micros(o.base_ejection_us),
                    max_ejection_percent: o.max_ejection_percent,
                })
            }
        };
        let b = r.load_balancer.unwrap_or_default();
        let balancer = if !b.hash_header.is_empty() {
            LoadBalancer::Hash(HashOn::Header(b.hash_header))
        } else if !b.hash_cookie.is_empty() {
            LoadBalancer::Hash(HashOn::Cookie {
                name: b.hash_cookie,
                ttl: (b.hash_cookie_ttl_us > 0).then(|| Duration::from_micros(b.hash_cookie_ttl_us)),
                path: (!b.hash_cookie_path.is_empty()).then_some(b.hash_cookie_path),
            })
        } else if b.hash_source_ip {
            LoadBalancer::Hash(HashOn::SourceIp)
        } else {
            match b.simple.as_str() {
                "" | "LEAST_REQUEST" => LoadBalancer::LeastRequest,
                "ROUND_ROBIN" => LoadBalancer::RoundRobin,
                "RANDOM" => LoadBalancer::Random,
                other => return Err(err("load_balancer.simple", format!("{other:?} is not a load balancer"))),
            }
        };
        Ok(DestinationRule {
            namespace: r.namespace,
            name: r.name,
            service: format!("{}/{}", r.service_namespace, r.service),
            policy: TrafficSettings { pool, outliers, balancer },
            export_to: r.export_to,
        })
    }
}

impl From<&DestinationRule> for proto::DestinationRule {
    fn from(r: &DestinationRule) -> Self {
        let (service_namespace, service) = r.service.split_once('/').unwrap_or(("", &r.service));
        let p = &r.policy.pool;
        let mut balancer = proto::LoadBalancer::default();
        match &r.policy.balancer {
            LoadBalancer::LeastRequest => balancer.simple = "LEAST_REQUEST".into(),
            LoadBalancer::RoundRobin => balancer.simple = "ROUND_ROBIN".into(),
            LoadBalancer::Random => balancer.simple = "RANDOM".into(),
            LoadBalancer::Hash(HashOn::Header(name)) => balancer.hash_header.clone_from(name),
            LoadBalancer::Hash(HashOn::Cookie { name, ttl, path }) => {
                balancer.hash_cookie.clone_from(name);
                balancer.hash_cookie_ttl_us = ttl.map_or(0, micros);
                balancer.hash_cookie_path = path.clone().unwrap_or_default();
            }
            LoadBalancer::Hash(HashOn::SourceIp) => balancer.hash_source_ip = true,
        }
        proto::DestinationRule {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            service_namespace: service_namespace.into(),
            service: service.into(),
            connection_pool: Some(proto::ConnectionPool {
                max_connections: p.max_connections.unwrap_or(0),
                max_pending_requests: p.max_pending_requests.unwrap_or(0),
                max_requests: p.max_requests.unwrap_or(0),
                max_requests_per_connection: p.max_requests_per_connection.unwrap_or(0),
                max_retries: p.max_retries.unwrap_or(0),
            }),
            outlier_detection: r.policy.outliers.as_ref().map(|o| proto::OutlierDetection {
                consecutive_5xx: o.consecutive_5xx.unwrap_or(0),
                consecutive_gateway: o.consecutive_gateway.unwrap_or(0),
                interval_us: micros(o.interval),
                base_ejection_us: micros(o.base_ejection),
                max_ejection_percent: o.max_ejection_percent,
            }),
            load_balancer: Some(balancer),
            export_to: r.export_to.clone(),
        }
    }
}
