//! The YAML form of a ferrymesh.io/v1alpha1 TrafficPolicy (Istio's field names for what it
//! carries, Gateway API's `targetRefs`), and its validation. Every error names the field by its
//! path under `spec`.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::{
    parse_istio_duration, Abort, AbortStatus, Delay, Fault, GlobalLimit, GrpcCode, LimitKey, LimitUnit, LocalLimit,
    RateLimit, Share, Target, TrafficPolicy, ABORT_STATUSES, MAX_LIMIT,
};
use crate::spec::err;
pub use crate::spec::SpecError;
use crate::RouteKind;

/// Gateway API's group.
const GATEWAY_GROUP: &str = "gateway.networking.k8s.io";

/// `spec` of a TrafficPolicy.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrafficPolicySpec {
    /// What it is attached to: Services, HTTPRoutes or GRPCRoutes of its namespace.
    #[serde(default)]
    pub target_refs: Vec<TargetRefSpec>,
    /// Faults injected (Istio's `HTTPFaultInjection`).
    pub fault: Option<FaultSpec>,
    /// Limits on the request rate.
    pub rate_limit: Option<RateLimitSpec>,
}

/// `spec.rateLimit`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimitSpec {
    /// Token buckets kept by each waypoint replica; a request must pass every one.
    #[serde(default)]
    pub local: Vec<LocalLimitSpec>,
    /// Limits counted by the rate-limit service (Envoy's protocol), shared by every replica; a
    /// request must pass every one.
    #[serde(default)]
    pub global: Vec<GlobalLimitSpec>,
    /// Refuse (500) a request the rate-limit service gave no answer for, instead of letting it
    /// by (default false, as Envoy's `failure_mode_deny`).
    pub failure_mode_deny: Option<bool>,
}

/// `spec.rateLimit.global[]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
pub struct GlobalLimitSpec {
    /// The most requests per unit (a window the rate-limit service counts in).
    #[serde(default)]
    pub limit: LimitSpec,
    /// One count per value of this (default: one count).
    pub key: Option<LimitKeySpec>,
}

/// `spec.rateLimit.local[]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
pub struct LocalLimitSpec {
    /// The sustained rate.
    #[serde(default)]
    pub limit: LimitSpec,
    /// The most requests let by at once (the bucket's size); default `limit.requests`.
    pub burst: Option<i64>,
    /// One bucket per value of this (default: one bucket).
    pub key: Option<LimitKeySpec>,
}

/// `spec.rateLimit.local[].limit`, `spec.rateLimit.global[].limit`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
pub struct LimitSpec {
    /// Requests per unit.
    #[serde(default)]
    pub requests: i64,
    /// `Second`, `Minute`, `Hour` or `Day`.
    #[serde(default)]
    pub unit: String,
}

/// `spec.rateLimit.local[].key`, `spec.rateLimit.global[].key`: one of them.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LimitKeySpec {
    /// A request header's value.
    pub header: Option<String>,
    /// The client's identity (SPIFFE ID).
    pub source_principal: Option<bool>,
}

/// `spec.targetRefs[]` (Gateway API `LocalPolicyTargetReferenceWithSectionName`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TargetRefSpec {
    /// `""` (core) for a Service, `gateway.networking.k8s.io` for a route.
    #[serde(default)]
    pub group: String,
    /// `Service`, `HTTPRoute` or `GRPCRoute`.
    pub kind: String,
    /// Its name, in the policy's namespace.
    pub name: String,
    /// For a route: the name of one of its rules.
    pub section_name: Option<String>,
}

/// `spec.fault`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
pub struct FaultSpec {
    /// Requests held back.
    pub delay: Option<DelaySpec>,
    /// Requests answered by the waypoint.
    pub abort: Option<AbortSpec>,
}

/// `spec.fault.delay`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DelaySpec {
    /// How long, e.g. `5s` or `250ms`.
    pub fixed_delay: Option<String>,
    /// The share of requests delayed; absent: every request.
    pub percentage: Option<PercentSpec>,
}

/// `spec.fault.abort`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AbortSpec {
    /// The HTTP status answered (200 to 599).
    pub http_status: Option<i64>,
    /// The gRPC status answered, by name (`UNAVAILABLE`).
    pub grpc_status: Option<String>,
    /// The share of requests aborted; absent: every request.
    pub percentage: Option<PercentSpec>,
}

/// Istio's `Percent`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
pub struct PercentSpec {
    /// 0 to 100.
    #[serde(default)]
    pub value: f64,
}

fn share(p: &Option<PercentSpec>, field: &str) -> Result<Share, SpecError> {
    match p {
        None => Ok(Share::ALL),
        Some(p) => Share::percent(p.value).map_err(|e| err(format!("{field}.percentage.value"), e)),
    }
}

impl FaultSpec {
    fn validate(&self) -> Result<Fault, SpecError> {
        let delay = match &self.delay {
            None => None,
            Some(d) => {
                let text = d.fixed_delay.as_deref().ok_or_else(|| err("spec.fault.delay.fixedDelay", "missing"))?;
                let fixed = parse_istio_duration(text).map_err(|e| err("spec.fault.delay.fixedDelay", e))?;
                Some(Delay { fixed, share: share(&d.percentage, "spec.fault.delay")? })
            }
        };
        let abort = match &self.abort {
            None => None,
            Some(a) => {
                let status = match (a.http_status, &a.grpc_status) {
                    (Some(code), None) => AbortStatus::Http(
                        u16::try_from(code).ok().filter(|c| ABORT_STATUSES.contains(c)).ok_or_else(|| {
                            err(
                                "spec.fault.abort.httpStatus",
                                format!(
                                    "{code} is not a status from {} to {}",
                                    ABORT_STATUSES.start(),
                                    ABORT_STATUSES.end()
                                ),
                            )
                        })?,
                    ),
                    (None, Some(name)) => {
                        AbortStatus::Grpc(GrpcCode::parse(name).map_err(|e| err("spec.fault.abort.grpcStatus", e))?)
                    }
                    (Some(_), Some(_)) => {
                        return Err(err("spec.fault.abort", "give httpStatus or grpcStatus, not both"));
                    }
                    (None, None) => return Err(err("spec.fault.abort", "give httpStatus or grpcStatus")),
                };
                Some(Abort { status, share: share(&a.percentage, "spec.fault.abort")? })
            }
        };
        if delay.is_none() && abort.is_none() {
            return Err(err("spec.fault", "give a delay, an abort or both"));
        }
        Ok(Fault { delay, abort })
    }
}

fn count(n: i64, field: String) -> Result<u32, SpecError> {
    u32::try_from(n)
        .ok()
        .filter(|n| (1..=MAX_LIMIT).contains(n))
        .ok_or_else(|| err(field, format!("{n} is not a count from 1 to {MAX_LIMIT}")))
}

impl LimitSpec {
    /// `(requests, unit)`, for the limit at `field`.
    fn validate(&self, field: &str) -> Result<(u32, LimitUnit), SpecError> {
        let requests = count(self.requests, format!("{field}.limit.requests"))?;
        let unit = LimitUnit::parse(&self.unit).ok_or_else(|| {
            err(format!("{field}.limit.unit"), format!("{:?} is not Second, Minute, Hour or Day", self.unit))
        })?;
        Ok((requests, unit))
    }
}

/// The key of the limit at `field`.
fn limit_key(key: &Option<LimitKeySpec>, field: &str) -> Result<LimitKey, SpecError> {
    let Some(k) = key else { return Ok(LimitKey::Shared) };
    match (&k.header, k.source_principal.unwrap_or(false)) {
        (Some(_), true) => Err(err(format!("{field}.key"), "give header or sourcePrincipal, not both")),
        (Some(name), false) => {
            http::header::HeaderName::try_from(name.as_str())
                .map_err(|_| err(format!("{field}.key.header"), format!("{name:?} is not a header name")))?;
            Ok(LimitKey::Header(name.to_ascii_lowercase()))
        }
        (None, true) => Ok(LimitKey::SourcePrincipal),
        (None, false) => Err(err(format!("{field}.key"), "give header or sourcePrincipal")),
    }
}

impl RateLimitSpec {
    fn validate(&self) -> Result<RateLimit, SpecError> {
        if self.local.is_empty() && self.global.is_empty() {
            return Err(err("spec.rateLimit", "no limit; give local or global limits"));
        }
        let mut local = Vec::new();
        for (i, l) in self.local.iter().enumerate() {
            let field = format!("spec.rateLimit.local[{i}]");
            let (requests, unit) = l.limit.validate(&field)?;
            let burst = match l.burst {
                None => requests,
                Some(n) => count(n, format!("{field}.burst"))?,
            };
            local.push(LocalLimit { requests, per: unit.duration(), burst, key: limit_key(&l.key, &field)? });
        }
        let mut global = Vec::new();
        for (i, g) in self.global.iter().enumerate() {
            let field = format!("spec.rateLimit.global[{i}]");
            let (requests, unit) = g.limit.validate(&field)?;
            global.push(GlobalLimit { requests, unit, key: limit_key(&g.key, &field)? });
        }
        Ok(RateLimit { local, global, failure_mode_deny: self.failure_mode_deny.unwrap_or(false) })
    }
}

impl TrafficPolicySpec {
    /// Validates into a policy `namespace/name`.
    pub fn validate(&self, namespace: &str, name: &str) -> Result<TrafficPolicy, SpecError> {
        if self.target_refs.is_empty() {
            return Err(err("spec.targetRefs", "missing; name the Services or routes the policy applies to"));
        }
        let mut targets = Vec::new();
        for (i, t) in self.target_refs.iter().enumerate() {
            let field = format!("spec.targetRefs[{i}]");
            if t.name.is_empty() {
                return Err(err(format!("{field}.name"), "empty"));
            }
            let kind = match (t.group.as_str(), t.kind.as_str()) {
                ("", "Service") => None,
                (GATEWAY_GROUP, "HTTPRoute") => Some(RouteKind::Http),
                (GATEWAY_GROUP, "GRPCRoute") => Some(RouteKind::Grpc),
                (group, kind) => {
                    return Err(err(
                        format!("{field}.kind"),
                        format!(
                            "{group:?}/{kind} is not a target of a TrafficPolicy (a Service, group \"\", or an HTTPRoute or GRPCRoute, group {GATEWAY_GROUP})"
                        ),
                    ))
                }
            };
            targets.push(match kind {
                None if t.section_name.is_some() => {
                    return Err(err(format!("{field}.sectionName"), "a Service target takes no sectionName"));
                }
                None => Target::Service(t.name.clone()),
                Some(kind) => Target::Route { kind, name: t.name.clone(), rule: t.section_name.clone() },
            });
        }
        let fault = self.fault.as_ref().map(FaultSpec::validate).transpose()?;
        let rate_limit = self.rate_limit.as_ref().map(RateLimitSpec::validate).transpose()?;
        if fault.is_none() && rate_limit.is_none() {
            return Err(err("spec", "the policy sets nothing: give fault or rateLimit"));
        }
        Ok(TrafficPolicy { namespace: namespace.into(), name: name.into(), targets, fault, rate_limit })
    }
}
