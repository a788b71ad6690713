//! Routes on the wire (`ferrymesh.config.v1.Route`) and back. mesh-ctrl has validated what it
//! sends; a receiver still checks everything it compiles or parses, and names the route and
//! field of what it refuses.

use ferrymesh_api::config as proto;

use std::time::Duration;

use crate::{
    anchored, pattern_of, Backend, BackendRef, Filter, HeaderModifier, Match, Mirror, Parent, PathMatch, PathReplace,
    Redirect, Retry, Rewrite, Route, RouteKind, Rule, StringMatch, Timeouts, ValueMatch, MAX_RETRY_ATTEMPTS,
    RETRY_CODES,
};

/// A route that does not convert.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{route}: field {field}: {message}")]
pub struct WireError {
    /// `Kind namespace/name`.
    pub route: String,
    /// The field.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// The redirect statuses Gateway API allows.
pub const REDIRECT_STATUSES: [u16; 5] = [301, 302, 303, 307, 308];

/// Checks a header name and value as HTTP defines them.
pub fn valid_header(name: &str, value: &str) -> Result<(), String> {
    http::header::HeaderName::try_from(name).map_err(|_| format!("{name:?} is not a valid header name"))?;
    http::header::HeaderValue::try_from(value).map_err(|_| format!("{value:?} is not a valid header value"))?;
    Ok(())
}

/// A port number (1-65535).
pub fn port(n: u32) -> Result<u16, String> {
    u16::try_from(n).ok().filter(|p| *p > 0).ok_or_else(|| format!("{n} is not a port number"))
}

struct Ctx {
    route: String,
}

impl Ctx {
    fn err(&self, field: impl Into<String>, message: impl Into<String>) -> WireError {
        WireError { route: self.route.clone(), field: field.into(), message: message.into() }
    }

    fn service(&self, field: &str, namespace: &str, name: &str) -> Result<String, WireError> {
        if namespace.is_empty() || name.is_empty() {
            return Err(self.err(field, "a Service needs a namespace and a name"));
        }
        Ok(format!("{namespace}/{name}"))
    }

    fn value_match(&self, field: &str, m: proto::ValueMatch) -> Result<ValueMatch, WireError> {
        if m.name.is_empty() {
            return Err(self.err(format!("{field}.name"), "empty"));
        }
        let value = if m.regex {
            StringMatch::Regex(anchored(&m.value).map_err(|e| self.err(format!("{field}.value"), e.to_string()))?)
        } else {
            StringMatch::Exact(m.value)
        };
        Ok(ValueMatch { name: m.name, value })
    }

    fn path_match(&self, field: &str, p: proto::PathMatch) -> Result<PathMatch, WireError> {
        let kind = proto::path_match::Kind::try_from(p.kind).map_err(|_| self.err(field, "unknown path match kind"))?;
        if kind != proto::path_match::Kind::Regex && !p.value.starts_with('/') {
            return Err(self.err(format!("{field}.value"), format!("{:?} does not start with /", p.value)));
        }
        Ok(match kind {
            proto::path_match::Kind::Exact => PathMatch::Exact(p.value),
            proto::path_match::Kind::Prefix => PathMatch::Prefix(p.value),
            proto::path_match::Kind::Regex => {
                PathMatch::Regex(anchored(&p.value).map_err(|e| self.err(format!("{field}.value"), e.to_string()))?)
            }
        })
    }

    fn headers(&self, field: &str, m: proto::HeaderModifier) -> Result<HeaderModifier, WireError> {
        let pairs = |list: Vec<proto::Header>, what: &str| {
            list.into_iter()
                .enumerate()
                .map(|(i, h)| {
                    valid_header(&h.name, &h.value).map_err(|e| self.err(format!("{field}.{what}[{i}]"), e))?;
                    Ok((h.name, h.value))
                })
                .collect::<Result<Vec<_>, WireError>>()
        };
        Ok(HeaderModifier { set: pairs(m.set, "set")?, add: pairs(m.add, "add")?, remove: m.remove })
    }

    fn path_replace(p: Option<proto::PathReplace>) -> Option<PathReplace> {
        p.map(|p| if p.prefix { PathReplace::Prefix(p.value) } else { PathReplace::Full(p.value) })
    }

    fn backend_ref(&self, field: &str, b: &proto::RouteBackend) -> Result<BackendRef, WireError> {
        Ok(BackendRef {
            service: self.service(field, &b.namespace, &b.service)?,
            port: port(b.port).map_err(|e| self.err(format!("{field}.port"), e))?,
        })
    }

    fn filter(&self, field: &str, f: proto::RouteFilter) -> Result<Filter, WireError> {
        use proto::route_filter::Filter as F;
        Ok(match f.filter.ok_or_else(|| self.err(field, "empty filter"))? {
            F::RequestHeaders(m) => Filter::RequestHeaders(self.headers(field, m)?),
            F::ResponseHeaders(m) => Filter::ResponseHeaders(self.headers(field, m)?),
            F::Redirect(r) => {
                let status =
                    u16::try_from(r.status).ok().filter(|s| REDIRECT_STATUSES.contains(s)).ok_or_else(|| {
                        self.err(format!("{field}.status"), format!("{} is not a redirect status", r.status))
                    })?;
                let scheme = (!r.scheme.is_empty()).then_some(r.scheme);
                if let Some(s) = scheme.as_deref().filter(|s| *s != "http" && *s != "https") {
                    return Err(self.err(format!("{field}.scheme"), format!("{s:?} is not http or https")));
                }
                Filter::Redirect(Redirect {
                    scheme,
                    hostname: (!r.hostname.is_empty()).then_some(r.hostname),
                    path: Self::path_replace(r.path),
                    port: match r.port {
                        0 => None,
                        p => Some(port(p).map_err(|e| self.err(format!("{field}.port"), e))?),
                    },
                    status,
                })
            }
            F::Rewrite(r) => Filter::Rewrite(Rewrite {
                hostname: (!r.hostname.is_empty()).then_some(r.hostname),
                path: Self::path_replace(r.path),
            }),
            F::Mirror(m) => {
                let backend = m.backend.ok_or_else(|| self.err(format!("{field}.backend"), "missing"))?;
                if m.denominator == 0 || m.numerator > m.denominator {
                    return Err(self.err(
                        format!("{field}.fraction"),
                        format!("{}/{} is not a fraction of at most 1", m.numerator, m.denominator),
                    ));
                }
                Filter::Mirror(Mirror {
                    backend: self.backend_ref(&format!("{field}.backend"), &backend)?,
                    fraction: (m.numerator, m.denominator),
                })
            }
        })
    }

    fn timeouts(&self, field: &str, request_ms: u64, backend_ms: u64) -> Result<Timeouts, WireError> {
        let ms = |n: u64| (n > 0).then(|| Duration::from_millis(n));
        let timeouts = Timeouts { request: ms(request_ms), backend_request: ms(backend_ms) };
        check_timeouts(&timeouts).map_err(|e| self.err(format!("{field}.backend_request_timeout_ms"), e))?;
        Ok(timeouts)
    }

    fn retry(&self, field: &str, r: proto::RouteRetry) -> Result<Retry, WireError> {
        let codes = r
            .codes
            .iter()
            .enumerate()
            .map(|(i, c)| retry_code(i64::from(*c)).map_err(|e| self.err(format!("{field}.codes[{i}]"), e)))
            .collect::<Result<_, _>>()?;
        let attempts = retry_attempts(i64::from(r.attempts)).map_err(|e| self.err(format!("{field}.attempts"), e))?;
        Ok(Retry { codes, attempts, backoff: Duration::from_millis(r.backoff_ms) })
    }

    fn filters(&self, field: &str, filters: Vec<proto::RouteFilter>) -> Result<Vec<Filter>, WireError> {
        filters.into_iter().enumerate().map(|(i, f)| self.filter(&format!("{field}[{i}]"), f)).collect()
    }
}

impl TryFrom<proto::Route> for Route {
    type Error = WireError;

    fn try_from(r: proto::Route) -> Result<Self, WireError> {
        let kind = match r.kind.as_str() {
            "HTTPRoute" => RouteKind::Http,
            "GRPCRoute" => RouteKind::Grpc,
            other => {
                return Err(WireError {
                    route: format!("{other} {}/{}", r.namespace, r.name),
                    field: "kind".into(),
                    message: "not HTTPRoute or GRPCRoute".into(),
                })
            }
        };
        let ctx = Ctx { route: format!("{} {}/{}", kind.as_str(), r.namespace, r.name) };
        let mut parents = Vec::new();
        for (i, p) in r.parents.into_iter().enumerate() {
            let field = format!("parents[{i}]");
            let port = match p.port {
                0 => None,
                n => Some(port(n).map_err(|e| ctx.err(format!("{field}.port"), e))?),
            };
            parents.push(Parent { service: ctx.service(&field, &p.namespace, &p.service)?, port });
        }
        let mut rules = Vec::new();
        for (i, rule) in r.rules.into_iter().enumerate() {
            let field = format!("rules[{i}]");
            let mut matches = Vec::new();
            for (j, m) in rule.matches.into_iter().enumerate() {
                let field = format!("{field}.matches[{j}]");
                let method = match m.method.as_str() {
                    "" => None,
                    method => Some(
                        http::Method::from_bytes(method.as_bytes())
                            .map_err(|_| ctx.err(format!("{field}.method"), format!("{method:?} is not a method")))?,
                    ),
                };
                let path = m.path.map(|p| ctx.path_match(&format!("{field}.path"), p)).transpose()?;
                let headers = m
                    .headers
                    .into_iter()
                    .enumerate()
                    .map(|(k, h)| ctx.value_match(&format!("{field}.headers[{k}]"), h))
                    .collect::<Result<_, _>>()?;
                let query_params = m
                    .query_params
                    .into_iter()
                    .enumerate()
                    .map(|(k, q)| ctx.value_match(&format!("{field}.query_params[{k}]"), q))
                    .collect::<Result<_, _>>()?;
                matches.push(Match { path, headers, query_params, method });
            }
            if matches.is_empty() {
                matches.push(Match::default());
            }
            let mut backends = Vec::new();
            for (j, b) in rule.backends.into_iter().enumerate() {
                let field = format!("{field}.backends[{j}]");
                let target = ctx.backend_ref(&field, &b)?;
                let filters = ctx.filters(&format!("{field}.filters"), b.filters)?;
                let refused = (!b.refused.is_empty()).then(|| b.refused.clone());
                backends.push(Backend { target, weight: b.weight, filters, refused });
            }
            rules.push(Rule {
                name: (!rule.name.is_empty()).then_some(rule.name),
                matches,
                filters: ctx.filters(&format!("{field}.filters"), rule.filters)?,
                backends,
                timeouts: ctx.timeouts(&field, rule.request_timeout_ms, rule.backend_request_timeout_ms)?,
                retry: rule.retry.map(|r| ctx.retry(&format!("{field}.retry"), r)).transpose()?,
            });
        }
        Ok(Route {
            kind,
            namespace: r.namespace,
            name: r.name,
            parents,
            hostnames: r.hostnames,
            rules,
            created_unix: r.created_unix,
        })
    }
}

/// A backend request timeout no longer than the request timeout (Gateway API requires it).
pub fn check_timeouts(t: &Timeouts) -> Result<(), String> {
    match (t.request, t.backend_request) {
        (Some(request), Some(backend)) if backend > request => Err(format!(
            "the backend request timeout ({}ms) is longer than the request timeout ({}ms)",
            backend.as_millis(),
            request.as_millis()
        )),
        _ => Ok(()),
    }
}

/// A status a retry may name.
pub fn retry_code(code: i64) -> Result<u16, String> {
    u16::try_from(code)
        .ok()
        .filter(|c| RETRY_CODES.contains(c))
        .ok_or_else(|| format!("{code} is not a status from {} to {}", RETRY_CODES.start(), RETRY_CODES.end()))
}

/// A retry count a route may ask for.
pub fn retry_attempts(n: i64) -> Result<u32, String> {
    u32::try_from(n)
        .ok()
        .filter(|n| *n <= MAX_RETRY_ATTEMPTS)
        .ok_or_else(|| format!("{n} is not a retry count from 0 to {MAX_RETRY_ATTEMPTS}"))
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn value_match(m: &ValueMatch) -> proto::ValueMatch {
    let (value, regex) = match &m.value {
        StringMatch::Exact(v) => (v.clone(), false),
        StringMatch::Regex(re) => (pattern_of(re).to_string(), true),
    };
    proto::ValueMatch { name: m.name.clone(), value, regex }
}

fn path_replace(p: &Option<PathReplace>) -> Option<proto::PathReplace> {
    p.as_ref().map(|p| match p {
        PathReplace::Full(v) => proto::PathReplace { prefix: false, value: v.clone() },
        PathReplace::Prefix(v) => proto::PathReplace { prefix: true, value: v.clone() },
    })
}

fn split_service(service: &str) -> (String, String) {
    let (ns, name) = service.split_once('/').unwrap_or(("", service));
    (ns.to_string(), name.to_string())
}

fn backend(target: &BackendRef, weight: u32, filters: &[Filter]) -> proto::RouteBackend {
    let (namespace, service) = split_service(&target.service);
    proto::RouteBackend {
        namespace,
        service,
        port: u32::from(target.port),
        weight,
        filters: filters.iter().map(filter).collect(),
        refused: String::new(),
    }
}

fn headers(m: &HeaderModifier) -> proto::HeaderModifier {
    let list = |pairs: &[(String, String)]| {
        pairs.iter().map(|(n, v)| proto::Header { name: n.clone(), value: v.clone() }).collect()
    };
    proto::HeaderModifier { set: list(&m.set), add: list(&m.add), remove: m.remove.clone() }
}

fn filter(f: &Filter) -> proto::RouteFilter {
    use proto::route_filter::Filter as F;
    let filter = match f {
        Filter::RequestHeaders(m) => F::RequestHeaders(headers(m)),
        Filter::ResponseHeaders(m) => F::ResponseHeaders(headers(m)),
        Filter::Redirect(r) => F::Redirect(proto::Redirect {
            scheme: r.scheme.clone().unwrap_or_default(),
            hostname: r.hostname.clone().unwrap_or_default(),
            path: path_replace(&r.path),
            port: r.port.map_or(0, u32::from),
            status: u32::from(r.status),
        }),
        Filter::Rewrite(r) => {
            F::Rewrite(proto::Rewrite { hostname: r.hostname.clone().unwrap_or_default(), path: path_replace(&r.path) })
        }
        Filter::Mirror(m) => F::Mirror(proto::Mirror {
            backend: Some(backend(&m.backend, 0, &[])),
            numerator: m.fraction.0,
            denominator: m.fraction.1,
        }),
    };
    proto::RouteFilter { filter: Some(filter) }
}

impl From<&Route> for proto::Route {
    fn from(r: &Route) -> Self {
        proto::Route {
            namespace: r.namespace.clone(),
            name: r.name.clone(),
            kind: r.kind.as_str().into(),
            parents: r
                .parents
                .iter()
                .map(|p| {
                    let (namespace, service) = split_service(&p.service);
                    proto::RouteParent { namespace, service, port: p.port.map_or(0, u32::from) }
                })
                .collect(),
            hostnames: r.hostnames.clone(),
            rules: r
                .rules
                .iter()
                .map(|rule| proto::RouteRule {
                    name: rule.name.clone().unwrap_or_default(),
                    matches: rule
                        .matches
                        .iter()
                        .map(|m| proto::RouteMatch {
                            path: m.path.as_ref().map(|p| {
                                use proto::path_match::Kind;
                                let (kind, value) = match p {
                                    PathMatch::Exact(v) => (Kind::Exact, v.clone()),
                                    PathMatch::Prefix(v) => (Kind::Prefix, v.clone()),
                                    PathMatch::Regex(re) => (Kind::Regex, pattern_of(re).to_string()),
                                };
                                proto::PathMatch { kind: kind.into(), value }
                            }),
                            headers: m.headers.iter().map(value_match).collect(),
                            query_params: m.query_params.iter().map(value_match).collect(),
                            method: m.method.as_ref().map(ToString::to_string).unwrap_or_default(),
                        })
                        .collect(),
                    filters: rule.filters.iter().map(filter).collect(),
                    backends: rule
                        .backends
                        .iter()
                        .map(|b| proto::RouteBackend {
                            refused: b.refused.clone().unwrap_or_default(),
                            ..backend(&b.target, b.weight, &b.filters)
                        })
                        .collect(),
                    request_timeout_ms: rule.timeouts.request.map_or(0, millis),
                    backend_request_timeout_ms: rule.timeouts.backend_request.map_or(0, millis),
                    retry: rule.retry.as_ref().map(|r| proto::RouteRetry {
                        codes: r.codes.iter().map(|c| u32::from(*c)).collect(),
                        attempts: r.attempts,
                        backoff_ms: millis(r.backoff),
                    }),
                })
                .collect(),
            created_unix: r.created_unix,
        }
    }
}
