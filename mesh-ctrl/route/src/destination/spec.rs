//! The YAML form of a ferrymesh.io/v1alpha1 DestinationRule (Istio's field names) and its
//! validation. Every error names the field by its path under `spec`; a field Istio has and the
//! mesh does not apply is refused by name rather than ignored.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    service_of_host, ConnectionPool, DestinationRule, HashOn, LoadBalancer, OutlierDetection, TrafficSettings,
};
use crate::spec::err;
pub use crate::spec::SpecError;
use crate::traffic::parse_istio_duration;

/// `spec` of a DestinationRule.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DestinationRuleSpec {
    /// The Service: `reviews` (in the rule's namespace), `reviews.shop` or
    /// `reviews.shop.svc.cluster.local`.
    #[serde(default)]
    pub host: String,
    /// What applies to its endpoints.
    pub traffic_policy: Option<TrafficSettingsSpec>,
    /// Istio's subsets (refused: routes pick Services with Gateway API backendRefs).
    pub subsets: Option<Vec<SubsetSpec>>,
    /// The namespaces whose clients it governs, as Istio has it: `*` (every namespace, the
    /// default), `.` (its own), or namespace names.
    pub export_to: Option<Vec<String>>,
}

/// `spec.subsets[]` (refused when given).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
pub struct SubsetSpec {
    /// Its name.
    #[serde(default)]
    pub name: String,
}

/// `spec.trafficPolicy`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficSettingsSpec {
    /// Limits (circuit breaking).
    pub connection_pool: Option<ConnectionPoolSpec>,
    /// Ejection of failing endpoints.
    pub outlier_detection: Option<OutlierDetectionSpec>,
    /// How an endpoint is picked.
    pub load_balancer: Option<LoadBalancerSpec>,
}

/// `spec.trafficPolicy.connectionPool`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
pub struct ConnectionPoolSpec {
    /// TCP settings.
    pub tcp: Option<TcpSpec>,
    /// HTTP settings.
    pub http: Option<HttpSpec>,
}

/// `spec.trafficPolicy.connectionPool.tcp`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TcpSpec {
    /// Connections to the Service's endpoints at once (0: no limit).
    pub max_connections: Option<i64>,
    /// Refused: a waypoint gives every connection 5 s.
    pub connect_timeout: Option<String>,
}

/// `spec.trafficPolicy.connectionPool.http`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HttpSpec {
    /// Requests waiting for a connection (0: no limit).
    pub http1_max_pending_requests: Option<i64>,
    /// Requests in progress at once (0: no limit).
    pub http2_max_requests: Option<i64>,
    /// Requests per connection (0: no limit; 1: a connection per request).
    pub max_requests_per_connection: Option<i64>,
    /// Retries in progress at once (0: no limit).
    pub max_retries: Option<i64>,
}

/// `spec.trafficPolicy.outlierDetection`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OutlierDetectionSpec {
    /// 5xx answers (or failures to connect) in a row that eject an endpoint (0: off; default 5).
    #[serde(rename = "consecutive5xxErrors")]
    pub consecutive_5xx_errors: Option<i64>,
    /// 502, 503, 504 answers (or failures to connect) in a row that eject an endpoint (0: off).
    pub consecutive_gateway_errors: Option<i64>,
    /// How often ejection counts decay (default 10s).
    pub interval: Option<String>,
    /// The first ejection's length; later ones are multiples (default 30s).
    pub base_ejection_time: Option<String>,
    /// The most of the endpoints ejected at once, percent (default 10; at least one).
    pub max_ejection_percent: Option<i64>,
}

/// `spec.trafficPolicy.loadBalancer`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancerSpec {
    /// `LEAST_REQUEST` (default), `ROUND_ROBIN`, `RANDOM`.
    pub simple: Option<String>,
    /// Sticky endpoints by a hash.
    pub consistent_hash: Option<ConsistentHashSpec>,
}

/// `spec.trafficPolicy.loadBalancer.consistentHash`: one of its keys.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ConsistentHashSpec {
    /// A request header.
    pub http_header_name: Option<String>,
    /// A cookie.
    pub http_cookie: Option<HttpCookieSpec>,
    /// The client's address.
    pub use_source_ip: Option<bool>,
}

/// `spec.trafficPolicy.loadBalancer.consistentHash.httpCookie`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
pub struct HttpCookieSpec {
    /// The cookie's name.
    #[serde(default)]
    pub name: String,
    /// Its `Path` when the waypoint sets it.
    pub path: Option<String>,
    /// Its lifetime when the waypoint sets it; absent: the waypoint sets none.
    pub ttl: Option<String>,
}

/// A limit: a count, 0 or absent meaning none (as Istio reads them).
fn limit(n: Option<i64>, field: &str) -> Result<Option<u32>, SpecError> {
    match n {
        None | Some(0) => Ok(None),
        Some(n) => {
            u32::try_from(n).map(Some).map_err(|_| err(field, format!("{n} is not a count from 0 to {}", u32::MAX)))
        }
    }
}

fn duration(text: &Option<String>, field: &str) -> Result<Option<std::time::Duration>, SpecError> {
    text.as_deref().map(|t| parse_istio_duration(t).map_err(|e| err(field, e))).transpose()
}

/// A positive duration.
fn positive(text: &Option<String>, field: &str) -> Result<Option<std::time::Duration>, SpecError> {
    match duration(text, field)? {
        Some(d) if d.is_zero() => Err(err(field, "must be longer than 0")),
        other => Ok(other),
    }
}

const P: &str = "spec.trafficPolicy";

impl ConnectionPoolSpec {
    fn validate(&self) -> Result<ConnectionPool, SpecError> {
        let (tcp, http) = (self.tcp.clone().unwrap_or_default(), self.http.clone().unwrap_or_default());
        let per_connection =
            limit(http.max_requests_per_connection, &format!("{P}.connectionPool.http.maxRequestsPerConnection"))?;
        if per_connection.is_some_and(|n| n > 1) {
            return Err(err(
                format!("{P}.connectionPool.http.maxRequestsPerConnection"),
                "only 1 (a connection per request) or 0 (no limit) is supported yet",
            ));
        }
        if tcp.connect_timeout.is_some() {
            return Err(err(
                format!("{P}.connectionPool.tcp.connectTimeout"),
                "not supported yet: a waypoint gives every connection 5s; leave it out",
            ));
        }
        Ok(ConnectionPool {
            max_connections: limit(tcp.max_connections, &format!("{P}.connectionPool.tcp.maxConnections"))?,
            max_pending_requests: limit(
                http.http1_max_pending_requests,
                &format!("{P}.connectionPool.http.http1MaxPendingRequests"),
            )?,
            max_requests: limit(http.http2_max_requests, &format!("{P}.connectionPool.http.http2MaxRequests"))?,
            max_requests_per_connection: per_connection,
            max_retries: limit(http.max_retries, &format!("{P}.connectionPool.http.maxRetries"))?,
        })
    }
}

impl OutlierDetectionSpec {
    fn validate(&self) -> Result<OutlierDetection, SpecError> {
        let o = format!("{P}.outlierDetection");
        let percent = match self.max_ejection_percent {
            None => OutlierDetection::DEFAULT_MAX_EJECTION_PERCENT,
            Some(n) => u32::try_from(n).ok().filter(|n| *n <= 100).ok_or_else(|| {
                err(format!("{o}.maxEjectionPercent"), format!("{n} is not a percentage from 0 to 100"))
            })?,
        };
        let consecutive_5xx = match self.consecutive_5xx_errors {
            None => Some(OutlierDetection::DEFAULT_CONSECUTIVE_5XX),
            n => limit(n, &format!("{o}.consecutive5xxErrors"))?,
        };
        let consecutive_gateway = limit(self.consecutive_gateway_errors, &format!("{o}.consecutiveGatewayErrors"))?;
        Ok(OutlierDetection {
            consecutive_5xx,
            consecutive_gateway,
            interval: positive(&self.interval, &format!("{o}.interval"))?.unwrap_or(OutlierDetection::DEFAULT_INTERVAL),
            base_ejection: positive(&self.base_ejection_time, &format!("{o}.baseEjectionTime"))?
                .unwrap_or(OutlierDetection::DEFAULT_BASE_EJECTION),
            max_ejection_percent: percent,
        })
    }
}

impl LoadBalancerSpec {
    fn validate(&self) -> Result<LoadBalancer, SpecError> {
        let l = format!("{P}.loadBalancer");
        match (&self.simple, &self.consistent_hash) {
            (Some(_), Some(_)) => Err(err(&l, "give simple or consistentHash, not both")),
            (Some(simple), None) => match simple.as_str() {
                "UNSPECIFIED" | "LEAST_REQUEST" | "LEAST_CONN" => Ok(LoadBalancer::LeastRequest),
                "ROUND_ROBIN" => Ok(LoadBalancer::RoundRobin),
                "RANDOM" => Ok(LoadBalancer::Random),
                "PASSTHROUGH" => Err(err(
                    format!("{l}.simple"),
                    "PASSTHROUGH is not supported: a waypoint always picks a ready endpoint of the Service",
                )),
                other => {
                    Err(err(format!("{l}.simple"), format!("{other:?} is not LEAST_REQUEST, ROUND_ROBIN or RANDOM")))
                }
            },
            (None, Some(hash)) => {
                let h = format!("{l}.consistentHash");
                let header = hash.http_header_name.as_ref().map(|name| {
                    http::header::HeaderName::try_from(name.as_str())
                        .map(|_| HashOn::Header(name.to_ascii_lowercase()))
                        .map_err(|_| err(format!("{h}.httpHeaderName"), format!("{name:?} is not a header name")))
                });
                let cookie = hash.http_cookie.as_ref().map(|c| {
                    if c.name.is_empty()
                        || !c.name.bytes().all(|b| b.is_ascii_graphic() && !b"()<>@,;:\\\"/[]?={}".contains(&b))
                    {
                        return Err(err(format!("{h}.httpCookie.name"), format!("{:?} is not a cookie name", c.name)));
                    }
                    let ttl = duration(&c.ttl, &format!("{h}.httpCookie.ttl"))?;
                    Ok(HashOn::Cookie { name: c.name.clone(), ttl, path: c.path.clone() })
                });
                let source = hash.use_source_ip.filter(|on| *on).map(|_| Ok(HashOn::SourceIp));
                let keys: Vec<Result<HashOn, SpecError>> = [header, cookie, source].into_iter().flatten().collect();
                match keys.len() {
                    0 => Err(err(&h, "give httpHeaderName, httpCookie or useSourceIp")),
                    1 => keys.into_iter().next().expect("one key").map(LoadBalancer::Hash),
                    _ => Err(err(&h, "give one of httpHeaderName, httpCookie and useSourceIp")),
                }
            }
            (None, None) => Ok(LoadBalancer::LeastRequest),
        }
    }
}

impl DestinationRuleSpec {
    /// Validates into a rule `namespace/name`.
    pub fn validate(&self, namespace: &str, name: &str) -> Result<DestinationRule, SpecError> {
        let service = service_of_host(&self.host, namespace).map_err(|e| err("spec.host", e))?;
        if self.subsets.as_ref().is_some_and(|s| !s.is_empty()) {
            return Err(err(
                "spec.subsets",
                "subsets are not supported: route to a Service per version with HTTPRoute backendRefs",
            ));
        }
        let t = self.traffic_policy.clone().unwrap_or_default();
        let policy = TrafficSettings {
            pool: t.connection_pool.as_ref().map(ConnectionPoolSpec::validate).transpose()?.unwrap_or_default(),
            outliers: t.outlier_detection.as_ref().map(OutlierDetectionSpec::validate).transpose()?,
            balancer: t.load_balancer.as_ref().map(LoadBalancerSpec::validate).transpose()?.unwrap_or_default(),
        };
        let export_to = self.export_to.clone().unwrap_or_default();
        for (i, to) in export_to.iter().enumerate() {
            let name = to.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') && !to.is_empty();
            if !(name || to == "*" || to == ".") {
                return Err(err(format!("spec.exportTo[{i}]"), format!("{to:?} is not \"*\", \".\" or a namespace")));
            }
        }
        Ok(DestinationRule { namespace: namespace.into(), name: name.into(), service, policy, export_to })
    }
}
