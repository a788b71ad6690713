//! ferrymesh.io/v1alpha1 `TrafficPolicy`: what a waypoint does to the requests of a Service, a
//! route or one named rule of a route beyond routing them: fault injection, with Istio's
//! `HTTPFaultInjection` fields (`fault.delay.fixedDelay` and `percentage`,
//! `fault.abort.httpStatus` or `grpcStatus` and `percentage`), local rate limits (token
//! buckets per route, or per source principal or header value, with a burst) and global ones
//! (counted by a rate-limit service speaking Envoy's protocol, shared by every replica).
//!
//! Why a policy and not Istio's VirtualService: the mesh routes with Gateway API, and a
//! VirtualService is a second routing API whose rules would compete with the HTTPRoutes of the
//! same Service. A policy attached by `targetRefs` (Gateway API policy attachment, GEP-713) adds
//! behaviour to the routes users already have, under Istio's field names, without a second
//! source of routing truth; Istio's own Gateway API mode has no fault injection at all.
//!
//! Attachment: a policy targets Services, HTTPRoutes or GRPCRoutes of its namespace, and a route
//! target may name one rule (`sectionName`, the rule's `name`). For each feature, a request takes
//! it from the most specific policy that has it: one naming its rule, else one naming its route,
//! else one naming the Service it addressed; among equally specific policies, the first by name.
//! It never does I/O.

pub mod spec;
pub mod wire;

use std::sync::Arc;
use std::time::Duration;

use crate::{Route, RouteKind};

/// A TrafficPolicy, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TrafficPolicy {
    /// Namespace (its targets are in it).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// What it is attached to (never empty).
    pub targets: Vec<Target>,
    /// Faults injected into the requests it applies to.
    pub fault: Option<Fault>,
    /// Limits on the rate of the requests it applies to.
    pub rate_limit: Option<RateLimit>,
}

/// `rateLimit`: every limit that applies must let a request by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RateLimit {
    /// `local`: token buckets kept by each waypoint replica.
    pub local: Vec<LocalLimit>,
    /// `global`: counts kept by the rate-limit service, shared by every replica.
    pub global: Vec<GlobalLimit>,
    /// `failureModeDeny`: a request the rate-limit service gave no answer for is refused (500)
    /// rather than let by (Envoy's default).
    pub failure_mode_deny: bool,
}

/// `rateLimit.global[]`: at most `requests` per `unit` (the window the rate-limit service
/// counts in), across every waypoint replica.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GlobalLimit {
    /// `limit.requests`.
    pub requests: u32,
    /// `limit.unit`.
    pub unit: LimitUnit,
    /// `key`: one count for all, or one per value.
    pub key: LimitKey,
}

/// The window of a global limit, numbered as Envoy's `RateLimitUnit`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LimitUnit {
    /// `Second`.
    Second = 1,
    /// `Minute`.
    Minute = 2,
    /// `Hour`.
    Hour = 3,
    /// `Day`.
    Day = 4,
}

impl LimitUnit {
    /// Every unit, by its name.
    pub const ALL: [(LimitUnit, &'static str); 4] =
        [(Self::Second, "Second"), (Self::Minute, "Minute"), (Self::Hour, "Hour"), (Self::Day, "Day")];

    /// Its name: `Second`, `Minute`, `Hour` or `Day`.
    pub fn name(self) -> &'static str {
        Self::ALL.iter().find(|(u, _)| *u == self).map(|(_, name)| *name).expect("every unit is named")
    }

    /// The unit named `name`.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.iter().find(|(_, n)| *n == name).map(|(u, _)| *u)
    }

    /// The unit of Envoy's number, as the wire carries it.
    pub fn from_number(n: i32) -> Option<Self> {
        Self::ALL.iter().find(|(u, _)| *u as i32 == n).map(|(u, _)| *u)
    }

    /// Its length.
    pub fn duration(self) -> Duration {
        Duration::from_secs(match self {
            Self::Second => 1,
            Self::Minute => 60,
            Self::Hour => 3600,
            Self::Day => 86_400,
        })
    }
}

/// `rateLimit.local[]`: a token bucket of `burst` tokens, refilled with `requests` tokens every
/// `per`; a request takes a token, and one that finds none is answered 429.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalLimit {
    /// `limit.requests`.
    pub requests: u32,
    /// `limit.unit`, as a duration.
    pub per: Duration,
    /// `burst`: the bucket's size (default: `requests`).
    pub burst: u32,
    /// `key`: one bucket for all, or one per value.
    pub key: LimitKey,
}

/// What a limit's buckets are kept by.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LimitKey {
    /// One bucket for every request the limit applies to.
    Shared,
    /// One bucket per value of this request header (requests without it share one).
    Header(String),
    /// One bucket per client identity (the HBONE peer's SPIFFE ID).
    SourcePrincipal,
}

impl LimitKey {
    /// The value of a request's count or bucket: its header's (empty when absent or not text),
    /// the client's identity (empty without one), or empty when all share one.
    pub fn value_in<'a>(&self, headers: &'a http::HeaderMap, principal: Option<&'a str>) -> &'a str {
        match self {
            LimitKey::Shared => "",
            LimitKey::Header(name) => headers.get(name.as_str()).and_then(|v| v.to_str().ok()).unwrap_or(""),
            LimitKey::SourcePrincipal => principal.unwrap_or(""),
        }
    }

    /// `""`, `" per <header>"` or `" per source principal"`.
    pub fn per(&self) -> String {
        match self {
            LimitKey::Shared => String::new(),
            LimitKey::Header(name) => format!(" per {name}"),
            LimitKey::SourcePrincipal => " per source principal".into(),
        }
    }
}

/// `10/1s burst 20 per x-user`.
impl std::fmt::Display for LocalLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}s burst {}{}", self.requests, self.per.as_secs(), self.burst, self.key.per())
    }
}

/// `10/Minute global per x-user`.
impl std::fmt::Display for GlobalLimit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{} global{}", self.requests, self.unit.name(), self.key.per())
    }
}

/// The largest bucket or rate a limit may ask for.
pub const MAX_LIMIT: u32 = 1_000_000;

impl TrafficPolicy {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// What a TrafficPolicy is attached to, in its namespace.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// Every request addressed to the Service of this name (whatever route takes it).
    Service(String),
    /// Every request a route takes, or only those of its rule named `rule`.
    Route {
        /// HTTPRoute or GRPCRoute.
        kind: RouteKind,
        /// The route's name.
        name: String,
        /// The rule's name (`sectionName`); None: every rule.
        rule: Option<String>,
    },
}

/// Faults injected on purpose (Istio's `HTTPFaultInjection`): a delay before the request goes
/// on, then an answer of the waypoint's own instead of the backend's. Both may apply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Held back before forwarding.
    pub delay: Option<Delay>,
    /// Answered by the waypoint.
    pub abort: Option<Abort>,
}

/// `fault.delay`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Delay {
    /// `fixedDelay`.
    pub fixed: Duration,
    /// The share of requests delayed.
    pub share: Share,
}

/// `fault.abort`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Abort {
    /// What the aborted requests are answered.
    pub status: AbortStatus,
    /// The share of requests aborted.
    pub share: Share,
}

/// An abort's answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AbortStatus {
    /// This HTTP status (`httpStatus`).
    Http(u16),
    /// This gRPC status, answered as gRPC does (HTTP 200, `grpc-status` in a trailers-only
    /// answer) (`grpcStatus`).
    Grpc(GrpcCode),
}

/// A share of requests, Istio's `percentage.value` (0 to 100, fractions allowed).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Share(f64);

// Never NaN: `percent` refuses it, so equality is total.
impl Eq for Share {}

impl Share {
    /// Every request (a fault without `percentage`, as in Envoy).
    pub const ALL: Share = Share(100.0);

    /// `percent` (0 to 100) of requests.
    pub fn percent(percent: f64) -> Result<Share, String> {
        if percent.is_finite() && (0.0..=100.0).contains(&percent) {
            Ok(Share(percent))
        } else {
            Err(format!("{percent} is not a percentage from 0 to 100"))
        }
    }

    /// The percentage.
    pub fn as_percent(self) -> f64 {
        self.0
    }

    /// Whether a request with `roll` (uniform over `0..=u32::MAX`, from [`crate::Rolls`]) is
    /// in the share.
    pub fn hits(self, roll: u32) -> bool {
        let threshold = self.0 / 100.0 * (f64::from(u32::MAX) + 1.0);
        f64::from(roll) < threshold
    }
}

/// A gRPC status code, by the name Istio's `grpcStatus` takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GrpcCode(u8);

/// gRPC's status names, by code.
const GRPC_CODES: [&str; 17] = [
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

impl GrpcCode {
    /// The code named `name` (`UNAVAILABLE`), as Istio takes it: by name, in capitals.
    pub fn parse(name: &str) -> Result<GrpcCode, String> {
        GRPC_CODES.iter().position(|n| *n == name).map(|code| GrpcCode(code as u8)).ok_or_else(|| {
            format!("{name:?} is not a gRPC status name (e.g. UNAVAILABLE, as Istio takes it, not its number)")
        })
    }

    /// Its number (14 for UNAVAILABLE).
    pub fn code(self) -> u8 {
        self.0
    }

    /// Its name.
    pub fn name(self) -> &'static str {
        GRPC_CODES[usize::from(self.0)]
    }
}

/// The range of statuses an abort may answer (Istio's validation).
pub const ABORT_STATUSES: std::ops::RangeInclusive<u16> = 200..=599;

/// An Istio duration (a protobuf Duration as Istio's CRDs take it, Go's syntax): one or more
/// `<number><unit>` parts, numbers with an optional fraction, units `h`, `m`, `s`, `ms`, `us`
/// (or `µs`), `ns`; e.g. `5s`, `0.5s`, `1m30s`, `250ms`. A negative duration is refused.
pub fn parse_istio_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("{text:?} is not a duration (e.g. 5s, 0.5s, 250ms, 1m30s)");
    if text.starts_with('-') {
        return Err(format!("{text:?} is negative"));
    }
    let mut rest = text.strip_prefix('+').unwrap_or(text);
    if rest.is_empty() {
        return Err(invalid());
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let number_len = rest.bytes().take_while(|b| b.is_ascii_digit() || *b == b'.').count();
        let number: f64 = rest[..number_len].parse().map_err(|_| invalid())?;
        rest = &rest[number_len..];
        let unit_len = rest.bytes().take_while(|b| !b.is_ascii_digit() && *b != b'.').count();
        let seconds = match &rest[..unit_len] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(invalid()),
        };
        total += number * seconds;
        rest = &rest[unit_len..];
    }
    Duration::try_from_secs_f64(total).map_err(|_| invalid())
}

/// How specific an attachment is: a rule, over a route, over a Service.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Specificity {
    Service,
    Route,
    Rule,
}

/// Every TrafficPolicy the waypoint holds, to find what applies to a request.
#[derive(Clone, Debug, Default)]
pub struct TrafficPolicies {
    /// By `namespace/name`, so that the first by name wins a tie.
    policies: Vec<Arc<TrafficPolicy>>,
}

/// The policy a feature of a request comes from, and the feature.
#[derive(Debug)]
pub struct Applied<'a, T> {
    /// The policy, for records and explain.
    pub policy: &'a TrafficPolicy,
    /// The feature.
    pub feature: &'a T,
}

// By hand: derived, they would ask `T: Copy`, and a pair of references is Copy whatever `T` is.
impl<T> Clone for Applied<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for Applied<'_, T> {}

impl TrafficPolicies {
    /// The set of `policies`.
    pub fn new(mut policies: Vec<Arc<TrafficPolicy>>) -> Self {
        policies.sort_by_key(|p| p.key());
        Self { policies }
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.policies.is_empty()
    }

    /// How specifically `policy` applies to a request to `service` (`namespace/name`) that the
    /// rule `rule` of `route` took (None: no route took it); None when it does not apply.
    fn specificity(policy: &TrafficPolicy, service: &str, taken: Option<(&Route, usize)>) -> Option<Specificity> {
        let in_namespace = |name: &str| service.split_once('/') == Some((policy.namespace.as_str(), name));
        policy
            .targets
            .iter()
            .filter_map(|target| match (target, taken) {
                (Target::Service(name), _) if in_namespace(name) => Some(Specificity::Service),
                (Target::Route { kind, name, rule }, Some((route, index)))
                    if *kind == route.kind && *name == route.name && policy.namespace == route.namespace =>
                {
                    match rule {
                        None => Some(Specificity::Route),
                        Some(rule) if route.rules.get(index).and_then(|r| r.name.as_ref()) == Some(rule) => {
                            Some(Specificity::Rule)
                        }
                        Some(_) => None,
                    }
                }
                _ => None,
            })
            .max()
    }

    /// The feature `pick` takes from the most specific policy that has it, for a request to
    /// `service` (`namespace/name`) taken by rule `rule` of `route` (None: no route took it).
    pub fn find<'a, T>(
        &'a self,
        service: &str,
        taken: Option<(&Route, usize)>,
        pick: impl Fn(&'a TrafficPolicy) -> Option<&'a T>,
    ) -> Option<Applied<'a, T>> {
        let mut best: Option<(Specificity, Applied<'a, T>)> = None;
        for policy in &self.policies {
            let Some(feature) = pick(policy) else { continue };
            let Some(specificity) = Self::specificity(policy, service, taken) else { continue };
            // Strictly more specific replaces: of equals, the first by name stays.
            if best.as_ref().is_none_or(|(s, _)| specificity > *s) {
                best = Some((specificity, Applied { policy, feature }));
            }
        }
        best.map(|(_, applied)| applied)
    }

    /// The fault a request to `service` taken by `taken` gets, if any.
    pub fn fault(&self, service: &str, taken: Option<(&Route, usize)>) -> Option<Applied<'_, Fault>> {
        self.find(service, taken, |p| p.fault.as_ref())
    }

    /// The rate limits a request to `service` taken by `taken` is held to, if any.
    pub fn rate_limit(&self, service: &str, taken: Option<(&Route, usize)>) -> Option<Applied<'_, RateLimit>> {
        self.find(service, taken, |p| p.rate_limit.as_ref())
    }
}

#[cfg(test)]
mod tests;
