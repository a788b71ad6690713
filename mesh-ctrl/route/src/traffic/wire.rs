//! TrafficPolicies on the wire (`ferrymesh.config.v1.TrafficPolicy`) and back. A receiver checks
//! every value again and names the policy and field of what it refuses.

use std::time::Duration;

use ferrymesh_api::config as proto;

use super::{
    Abort, AbortStatus, Delay, Fault, GlobalLimit, GrpcCode, LimitKey, LimitUnit, LocalLimit, RateLimit, Share, Target,
    TrafficPolicy, ABORT_STATUSES, MAX_LIMIT,
};
use crate::RouteKind;

/// A TrafficPolicy that does not convert.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("TrafficPolicy {policy}: field {field}: {message}")]
pub struct WireError {
    /// `namespace/name`.
    pub policy: String,
    /// The field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl TryFrom<proto::TrafficPolicy> for TrafficPolicy {
    type Error = WireError;

    fn try_from(p: proto::TrafficPolicy) -> Result<Self, WireError> {
        let key = format!("{}/{}", p.namespace, p.name);
        let err = |field: String, message: String| WireError { policy: key.clone(), field, message };
        let mut targets = Vec::new();
        for (i, t) in p.targets.into_iter().enumerate() {
            let rule = (!t.section_name.is_empty()).then_some(t.section_name);
            targets.push(match t.kind.as_str() {
                "Service" => Target::Service(t.name),
                "HTTPRoute" => Target::Route { kind: RouteKind::Http, name: t.name, rule },
                "GRPCRoute" => Target::Route { kind: RouteKind::Grpc, name: t.name, rule },
                other => return Err(err(format!("targets[{i}].kind"), format!("{other:?} is not a target kind"))),
            });
        }
        if targets.is_empty() {
            return Err(err("targets".into(), "empty".into()));
        }
        let fault = match p.fault {
            None => None,
            Some(f) => {
                let delay = match f.delay {
                    None => None,
                    Some(d) => Some(Delay {
                        fixed: Duration::from_micros(d.fixed_delay_us),
                        share: Share::percent(d.percentage).map_err(|e| err("fault.delay.percentage".into(), e))?,
                    }),
                };
                let abort = match f.abort {
                    None => None,
                    Some(a) => {
                        let status = if a.grpc_status.is_empty() {
                            let code = u16::try_from(a.http_status).ok().filter(|c| ABORT_STATUSES.contains(c));
                            AbortStatus::Http(code.ok_or_else(|| {
                                err("fault.abort.http_status".into(), format!("{} is not a status", a.http_status))
                            })?)
                        } else {
                            AbortStatus::Grpc(
                                GrpcCode::parse(&a.grpc_status)
                                    .map_err(|e| err("fault.abort.grpc_status".into(), e))?,
                            )
                        };
                        let share =
                            Share::percent(a.percentage).map_err(|e| err("fault.abort.percentage".into(), e))?;
                        Some(Abort { status, share })
                    }
                };
                Some(Fault { delay, abort })
            }
        };
        let rate_limit = match p.rate_limit {
            None => None,
            Some(r) => {
                let count = |n: u32, field: String| {
                    (1..=MAX_LIMIT).contains(&n).then_some(n).ok_or_else(|| err(field, format!("{n} is out of range")))
                };
                let key = |header: String, principal: bool, field: String| match (header.is_empty(), principal) {
                    (true, false) => Ok(LimitKey::Shared),
                    (false, false) => Ok(LimitKey::Header(header)),
                    (true, true) => Ok(LimitKey::SourcePrincipal),
                    (false, true) => Err(err(field, "a header and the principal".into())),
                };
                let mut local = Vec::new();
                for (i, l) in r.local.into_iter().enumerate() {
                    let field = |f: &str| format!("rate_limit.local[{i}].{f}");
                    if l.per_ms == 0 {
                        return Err(err(field("per_ms"), "0".into()));
                    }
                    local.push(LocalLimit {
                        requests: count(l.requests, field("requests"))?,
                        per: Duration::from_millis(l.per_ms),
                        burst: count(l.burst, field("burst"))?,
                        key: key(l.key_header, l.key_source_principal, field("key_header"))?,
                    });
                }
                let mut global = Vec::new();
                for (i, g) in r.global.into_iter().enumerate() {
                    let field = |f: &str| format!("rate_limit.global[{i}].{f}");
                    global.push(GlobalLimit {
                        requests: count(g.requests, field("requests"))?,
                        unit: LimitUnit::from_number(g.unit)
                            .ok_or_else(|| err(field("unit"), format!("{} is not a unit", g.unit)))?,
                        key: key(g.key_header, g.key_source_principal, field("key_header"))?,
                    });
                }
                Some(RateLimit { local, global, failure_mode_deny: r.failure_mode_deny })
            }
        };
        Ok(TrafficPolicy { namespace: p.namespace, name: p.name, targets, fault, rate_limit })
    }
}

impl From<&TrafficPolicy> for proto::TrafficPolicy {
    fn from(p: &TrafficPolicy) -> Self {
        proto::TrafficPolicy {
            namespace: p.namespace.clone(),
            name: p.name.clone(),
            targets: p
                .targets
                .iter()
                .map(|t| match t {
                    Target::Service(name) => {
                        proto::TrafficTarget { kind: "Service".into(), name: name.clone(), section_name: String::new() }
                    }
                    Target::Route { kind, name, rule } => proto::TrafficTarget {
                        kind: kind.as_str().into(),
                        name: name.clone(),
                        section_name: rule.clone().unwrap_or_default(),
                    },
                })
                .collect(),
            fault: p.fault.as_ref().map(|f| proto::Fault {
                delay: f.delay.as_ref().map(|d| proto::FaultDelay {
                    fixed_delay_us: u64::try_from(d.fixed.as_micros()).unwrap_or(u64::MAX),
                    percentage: d.share.as_percent(),
                }),
                abort: f.abort.as_ref().map(|a| {
                    let (http_status, grpc_status) = match a.status {
                        AbortStatus::Http(code) => (u32::from(code), String::new()),
                        AbortStatus::Grpc(code) => (0, code.name().to_string()),
                    };
                    proto::FaultAbort { http_status, grpc_status, percentage: a.share.as_percent() }
                }),
            }),
            rate_limit: p.rate_limit.as_ref().map(|r| proto::RateLimit {
                local: r
                    .local
                    .iter()
                    .map(|l| proto::LocalLimit {
                        requests: l.requests,
                        per_ms: u64::try_from(l.per.as_millis()).unwrap_or(u64::MAX),
                        burst: l.burst,
                        key_header: key_header(&l.key),
                        key_source_principal: l.key == LimitKey::SourcePrincipal,
                    })
                    .collect(),
                global: r
                    .global
                    .iter()
                    .map(|g| proto::GlobalLimit {
                        requests: g.requests,
                        unit: g.unit as i32,
                        key_header: key_header(&g.key),
                        key_source_principal: g.key == LimitKey::SourcePrincipal,
                    })
                    .collect(),
                failure_mode_deny: r.failure_mode_deny,
            }),
        }
    }
}

fn key_header(key: &LimitKey) -> String {
    match key {
        LimitKey::Header(name) => name.clone(),
        _ => String::new(),
    }
}
