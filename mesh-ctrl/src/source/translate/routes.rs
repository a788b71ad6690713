//! Gateway API routes (`HTTPRoute`, `GRPCRoute`, gateway.networking.k8s.io/v1) to
//! [`ferrymesh_route::Route`]: validated here, with the Kubernetes field path of anything that
//! does not translate. Only mesh routes (GAMMA: `parentRefs` to a Service) are the mesh's; a
//! route attached only to Gateways belongs to an ingress controller and translates to nothing.
//! A GRPCRoute becomes path and header matches on gRPC paths (`/<service>/<method>`).
//!
//! Not supported yet, and refused by name: `ExtensionRef` filters and backends of another kind
//! than Service. A backend of another namespace translates, and is used only when a
//! ReferenceGrant of its namespace opens it to the route (the model decides, as grants change
//! apart from routes). A parent Service of another namespace makes the route a consumer route
//! of that Service (GAMMA): it applies only to clients of the route's namespace. Routes are read
//! with the experimental channel's types (a superset of the standard channel's), for
//! HTTPRoute's `retry` (GEP-1731).

use ferrymesh_route::wire::{check_timeouts, port, retry_attempts, retry_code, valid_header, REDIRECT_STATUSES};
use ferrymesh_route::{
    anchored, parse_duration, Backend, BackendRef, Filter, HeaderModifier, Match, Mirror, Parent, PathMatch,
    PathReplace, Redirect, Retry, Rewrite, Route, RouteKind, Rule, StringMatch, Timeouts, ValueMatch,
};
use gateway_api::experimental::httproutes::{
    HTTPRoute, HTTPRouteParentRefs, HTTPRouteRulesBackendRefs, HTTPRouteRulesFilters, HTTPRouteRulesFiltersType,
    HTTPRouteRulesMatches, HTTPRouteRulesMatchesPathType, HTTPRouteRulesRetry, HTTPRouteRulesTimeouts,
};
use gateway_api::grpcroutes::{GRPCRoute, GRPCRouteRulesMatches, GRPCRouteRulesMatchesMethodType};
use serde::de::DeserializeOwned;
use serde::Serialize;

use super::{FieldError, ObjectKey};

/// A rule as both route kinds give it: its name, its matches already translated, and its
/// filters and backends in the HTTPRoute shape (see [`canonical`]).
struct RawRule {
    name: Option<String>,
    matches: Vec<Match>,
    filters: Vec<HTTPRouteRulesFilters>,
    backends: Vec<HTTPRouteRulesBackendRefs>,
    timeouts: Option<HTTPRouteRulesTimeouts>,
    retry: Option<HTTPRouteRulesRetry>,
}

/// The mesh's part of a route: None when it is attached to no Service.
pub fn http_route_from(route: HTTPRoute, key: &ObjectKey) -> Result<Option<Route>, FieldError> {
    let spec = route.spec;
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.into_iter().flatten().enumerate() {
        let field = format!("spec.rules[{i}]");
        let matches = translate_matches(rule.matches, key, &field, http_match)?;
        let filters = rule.filters.unwrap_or_default();
        let backends = rule.backend_refs.unwrap_or_default();
        rules.push(RawRule { name: rule.name, matches, filters, backends, timeouts: rule.timeouts, retry: rule.retry });
    }
    let parents = spec.parent_refs.unwrap_or_default();
    mesh_route(RouteKind::Http, key, &route.metadata, spec.hostnames, parents, rules)
}

/// The mesh's part of a gRPC route: None when it is attached to no Service.
pub fn grpc_route_from(route: GRPCRoute, key: &ObjectKey) -> Result<Option<Route>, FieldError> {
    let spec = route.spec;
    let mut rules = Vec::new();
    for (i, rule) in spec.rules.into_iter().flatten().enumerate() {
        let field = format!("spec.rules[{i}]");
        let matches = translate_matches(rule.matches, key, &field, grpc_match)?;
        let filters = as_http(rule.filters, key, &format!("{field}.filters"))?;
        let backends = as_http(rule.backend_refs, key, &format!("{field}.backendRefs"))?;
        rules.push(RawRule { name: rule.name, matches, filters, backends, timeouts: None, retry: None });
    }
    let parents = as_http(spec.parent_refs, key, "spec.parentRefs")?;
    mesh_route(RouteKind::Grpc, key, &route.metadata, spec.hostnames, parents, rules)
}

/// A rule's matches, each by `translate` (HTTP or gRPC), named `<field>.matches[j]`.
fn translate_matches<M>(
    matches: Option<Vec<M>>,
    key: &ObjectKey,
    field: &str,
    translate: fn(M, &ObjectKey, &str) -> Result<Match, FieldError>,
) -> Result<Vec<Match>, FieldError> {
    matches
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(j, m)| translate(m, key, &format!("{field}.matches[{j}]")))
        .collect()
}

/// What both route kinds share: parents (None when no Service is one), filters, backends.
fn mesh_route(
    kind: RouteKind,
    key: &ObjectKey,
    meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    hostnames: Option<Vec<String>>,
    parent_refs: Vec<HTTPRouteParentRefs>,
    raw: Vec<RawRule>,
) -> Result<Option<Route>, FieldError> {
    let parents = parents(parent_refs.iter().map(|p| (&p.group, &p.kind, &p.name, &p.namespace, p.port)), key)?;
    if parents.is_empty() {
        return Ok(None);
    }
    let mut rules = Vec::new();
    for (i, rule) in raw.into_iter().enumerate() {
        let field = format!("spec.rules[{i}]");
        let prefix_matched = rule.matches.iter().all(|m| matches!(m.path, Some(PathMatch::Prefix(_))));
        let filters = translate_filters(rule.filters, key, &format!("{field}.filters"), prefix_matched)?;
        let mut backends = Vec::new();
        for (j, b) in rule.backends.into_iter().enumerate() {
            let field = format!("{field}.backendRefs[{j}]");
            let target = backend_ref((&b.group, &b.kind, &b.name, &b.namespace, b.port), key, &field)?;
            let filters = as_http(b.filters, key, &format!("{field}.filters"))?;
            let filters = translate_filters(filters, key, &format!("{field}.filters"), prefix_matched)?;
            backends.push(Backend { target, weight: weight(b.weight, key, &field)?, filters, refused: None });
        }
        let timeouts = timeouts(rule.timeouts, key, &format!("{field}.timeouts"))?;
        let retry = rule.retry.map(|r| retry(r, key, &format!("{field}.retry"))).transpose()?;
        let mut rule = finish_rule(rule.name, rule.matches, filters, backends, timeouts);
        rule.retry = retry;
        rules.push(rule);
    }
    Ok(Some(Route {
        kind,
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        parents,
        hostnames: hostnames.unwrap_or_default(),
        rules,
        created_unix: created_unix(meta),
    }))
}

fn created_unix(meta: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta) -> i64 {
    meta.creation_timestamp.as_ref().map_or(0, |t| t.0.timestamp())
}

fn finish_rule(
    name: Option<String>,
    matches: Vec<Match>,
    filters: Vec<Filter>,
    backends: Vec<Backend>,
    timeouts: Timeouts,
) -> Rule {
    let matches = if matches.is_empty() { vec![Match::default()] } else { matches };
    Rule { name, matches, filters, backends, timeouts, retry: None }
}

/// A rule's `retry` (GEP-1731): what it leaves out is the mesh's default (503, 2 retries, 25 ms).
fn retry(r: HTTPRouteRulesRetry, key: &ObjectKey, field: &str) -> Result<Retry, FieldError> {
    let default = Retry::mesh_default();
    let codes = match r.codes {
        None => default.codes,
        Some(codes) => codes
            .into_iter()
            .enumerate()
            .map(|(i, c)| retry_code(c).map_err(|e| key.field_error(format!("{field}.codes[{i}]"), e)))
            .collect::<Result<_, _>>()?,
    };
    let attempts = match r.attempts {
        None => default.attempts,
        Some(n) => retry_attempts(n).map_err(|e| key.field_error(format!("{field}.attempts"), e))?,
    };
    let backoff = match r.backoff {
        None => default.backoff,
        Some(text) => {
            parse_duration(&text).map_err(|e| key.field_error(format!("{field}.backoff"), e))?.unwrap_or_default()
        }
    };
    Ok(Retry { codes, attempts, backoff })
}

/// A rule's `timeouts` (GEP-1742): durations as GEP-2257 writes them, `0s` for no limit, the
/// backend request's no longer than the request's.
fn timeouts(t: Option<HTTPRouteRulesTimeouts>, key: &ObjectKey, field: &str) -> Result<Timeouts, FieldError> {
    let Some(t) = t else { return Ok(Timeouts::default()) };
    let parse = |value: Option<String>, name: &str| {
        value
            .map(|v| parse_duration(&v))
            .transpose()
            .map(Option::flatten)
            .map_err(|e| key.field_error(format!("{field}.{name}"), e))
    };
    let timeouts = Timeouts {
        request: parse(t.request, "request")?,
        backend_request: parse(t.backend_request, "backendRequest")?,
    };
    check_timeouts(&timeouts).map_err(|e| key.field_error(format!("{field}.backendRequest"), e))?;
    Ok(timeouts)
}

/// Filters, backend or parent references of any place, read in the HTTPRoute rule's shape (see
/// [`canonical`]).
fn as_http<T: Serialize, U: DeserializeOwned>(
    list: Option<Vec<T>>,
    key: &ObjectKey,
    field: &str,
) -> Result<Vec<U>, FieldError> {
    list.iter().flatten().map(canonical).collect::<Result<_, _>>().map_err(|e| key.field_error(field, e))
}

/// A filter, backend or parent reference has the same shape in every place Gateway API declares
/// it (rule or backend, HTTP or gRPC; gRPC's being a subset): each is read as HTTPRoute's.
fn canonical<T: Serialize, U: DeserializeOwned>(t: &T) -> Result<U, String> {
    serde_json::to_value(t).and_then(serde_json::from_value).map_err(|e| e.to_string())
}

type Ref<'a> = (&'a Option<String>, &'a Option<String>, &'a String, &'a Option<String>, Option<i32>);

/// The Services among `refs` (`group` "" or "core", `kind` Service); Gateways are skipped.
fn parents<'a>(refs: impl Iterator<Item = Ref<'a>>, key: &ObjectKey) -> Result<Vec<Parent>, FieldError> {
    let mut parents = Vec::new();
    for (i, (group, kind, name, namespace, p)) in refs.enumerate() {
        let field = format!("spec.parentRefs[{i}]");
        let core = group.as_deref().is_none_or(|g| g.is_empty() || g == "core");
        if !core || kind.as_deref() != Some("Service") {
            continue;
        }
        let port = p
            .map(|p| u32::try_from(p).map_err(|_| format!("{p} is not a port number")).and_then(port))
            .transpose()
            .map_err(|e| key.field_error(format!("{field}.port"), e))?;
        let namespace = namespace.clone().unwrap_or_else(|| key.namespace.clone());
        parents.push(Parent { service: format!("{namespace}/{name}"), port });
    }
    Ok(parents)
}

fn backend_ref(r: Ref<'_>, key: &ObjectKey, field: &str) -> Result<BackendRef, FieldError> {
    let (group, kind, name, namespace, p) = r;
    let core = group.as_deref().is_none_or(|g| g.is_empty() || g == "core");
    if !core || kind.as_deref().is_some_and(|k| k != "Service") {
        return Err(key.field_error(format!("{field}.kind"), "only Service backends are supported".into()));
    }
    // A backend of another namespace needs a ReferenceGrant there: the model checks it, since
    // grants come and go apart from the route (see `Model::routes_resolved`).
    let namespace = namespace.clone().unwrap_or_else(|| key.namespace.clone());
    let Some(p) = p else {
        return Err(key.field_error(format!("{field}.port"), "missing; a Service backend needs its port".into()));
    };
    let port = u32::try_from(p)
        .map_err(|_| format!("{p} is not a port number"))
        .and_then(port)
        .map_err(|e| key.field_error(format!("{field}.port"), e))?;
    Ok(BackendRef { service: format!("{namespace}/{name}"), port })
}

fn weight(w: Option<i32>, key: &ObjectKey, field: &str) -> Result<u32, FieldError> {
    let w = w.unwrap_or(1);
    u32::try_from(w)
        .ok()
        .filter(|w| *w <= 1_000_000)
        .ok_or_else(|| key.field_error(format!("{field}.weight"), format!("{w} is not a weight (0 to 1000000)")))
}

fn string_match(regex: bool, value: &str, key: &ObjectKey, field: &str) -> Result<StringMatch, FieldError> {
    if regex {
        anchored(value)
            .map(StringMatch::Regex)
            .map_err(|e| key.field_error(field, format!("{value:?} is not a regular expression: {e}")))
    } else {
        Ok(StringMatch::Exact(value.to_string()))
    }
}

fn header_match(name: &str, regex: bool, value: &str, key: &ObjectKey, field: &str) -> Result<ValueMatch, FieldError> {
    http::header::HeaderName::try_from(name)
        .map_err(|_| key.field_error(format!("{field}.name"), format!("{name:?} is not a header name")))?;
    Ok(ValueMatch { name: name.to_string(), value: string_match(regex, value, key, &format!("{field}.value"))? })
}

fn http_match(m: HTTPRouteRulesMatches, key: &ObjectKey, field: &str) -> Result<Match, FieldError> {
    let path = match m.path {
        None => None,
        Some(p) => {
            let value = p.value.unwrap_or_else(|| "/".into());
            let kind = p.r#type.unwrap_or(HTTPRouteRulesMatchesPathType::PathPrefix);
            let pf = format!("{field}.path.value");
            if kind != HTTPRouteRulesMatchesPathType::RegularExpression && !value.starts_with('/') {
                return Err(key.field_error(pf, format!("{value:?} does not start with /")));
            }
            Some(match kind {
                HTTPRouteRulesMatchesPathType::Exact => PathMatch::Exact(value),
                HTTPRouteRulesMatchesPathType::PathPrefix => PathMatch::Prefix(value),
                HTTPRouteRulesMatchesPathType::RegularExpression => PathMatch::Regex(
                    anchored(&value)
                        .map_err(|e| key.field_error(pf, format!("{value:?} is not a regular expression: {e}")))?,
                ),
            })
        }
    };
    let regex = |t: Option<String>| t.as_deref() == Some("RegularExpression");
    let headers = m
        .headers
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(k, h)| {
            let kind = h.r#type.as_ref().map(enum_name);
            header_match(&h.name, regex(kind), &h.value, key, &format!("{field}.headers[{k}]"))
        })
        .collect::<Result<_, _>>()?;
    let query_params = m
        .query_params
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(k, q)| {
            let kind = q.r#type.as_ref().map(enum_name);
            let field = format!("{field}.queryParams[{k}]");
            Ok(ValueMatch {
                name: q.name.clone(),
                value: string_match(regex(kind), &q.value, key, &format!("{field}.value"))?,
            })
        })
        .collect::<Result<_, FieldError>>()?;
    let method = m.method.as_ref().map(|method| {
        let name = enum_name(method);
        http::Method::from_bytes(name.as_bytes()).expect("Gateway API methods are HTTP methods")
    });
    Ok(Match { path, headers, query_params, method })
}

/// The name an enum of the Gateway API types has in YAML.
fn enum_name<T: Serialize>(value: &T) -> String {
    serde_json::to_value(value).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default()
}

fn grpc_match(m: GRPCRouteRulesMatches, key: &ObjectKey, field: &str) -> Result<Match, FieldError> {
    let path = match m.method {
        None => None,
        Some(method) => {
            let regex = method.r#type == Some(GRPCRouteRulesMatchesMethodType::RegularExpression);
            let (service, name) = (method.service.as_deref(), method.method.as_deref());
            let f = format!("{field}.method");
            Some(match (service, name, regex) {
                (None, None, _) => return Err(key.field_error(f, "needs a service, a method or both".into())),
                (Some(s), Some(m), false) => PathMatch::Exact(format!("/{s}/{m}")),
                (Some(s), None, false) => PathMatch::Prefix(format!("/{s}")),
                (None, Some(m), false) => {
                    PathMatch::Regex(anchored(&format!("/[^/]+/{}", regex::escape(m))).expect("an escaped pattern"))
                }
                (s, m, true) => {
                    let pattern = format!("/{}/{}", s.unwrap_or("[^/]+"), m.unwrap_or("[^/]+"));
                    PathMatch::Regex(
                        anchored(&pattern)
                            .map_err(|e| key.field_error(f, format!("{pattern:?} is not a regular expression: {e}")))?,
                    )
                }
            })
        }
    };
    let headers = m
        .headers
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(k, h)| {
            let regex = h.r#type.as_ref().is_some_and(|t| enum_name(t) == "RegularExpression");
            header_match(&h.name, regex, &h.value, key, &format!("{field}.headers[{k}]"))
        })
        .collect::<Result<_, _>>()?;
    Ok(Match { path, headers, query_params: vec![], method: None })
}

fn header_modifier(
    set: Vec<(String, String)>,
    add: Vec<(String, String)>,
    remove: Vec<String>,
    key: &ObjectKey,
    field: &str,
) -> Result<HeaderModifier, FieldError> {
    for (what, list) in [("set", &set), ("add", &add)] {
        for (i, (n, v)) in list.iter().enumerate() {
            valid_header(n, v).map_err(|e| key.field_error(format!("{field}.{what}[{i}]"), e))?;
        }
    }
    Ok(HeaderModifier { set, add, remove })
}

fn path_replace(
    kind: &str,
    full: Option<String>,
    prefix: Option<String>,
    prefix_matched: bool,
    key: &ObjectKey,
    field: &str,
) -> Result<PathReplace, FieldError> {
    match kind {
        "ReplaceFullPath" => Ok(PathReplace::Full(full.unwrap_or_else(|| "/".into()))),
        _ if !prefix_matched => Err(key.field_error(
            format!("{field}.type"),
            "ReplacePrefixMatch needs every match of the rule to be a PathPrefix".into(),
        )),
        _ => Ok(PathReplace::Prefix(prefix.unwrap_or_else(|| "/".into()))),
    }
}

/// Translates filters (every kind as the rule-level HTTPRoute filter; see [`canonical`]).
fn translate_filters(
    list: Vec<HTTPRouteRulesFilters>,
    key: &ObjectKey,
    field: &str,
    prefix_matched: bool,
) -> Result<Vec<Filter>, FieldError> {
    let mut out = Vec::new();
    for (i, f) in list.into_iter().enumerate() {
        let field = format!("{field}[{i}]");
        let missing = |what: &str| {
            key.field_error(format!("{field}.{what}"), format!("missing; type {:?} needs it", enum_name(&f.r#type)))
        };
        let pairs = |l: Option<Vec<(String, String)>>| l.unwrap_or_default();
        let filter = match f.r#type {
            HTTPRouteRulesFiltersType::RequestHeaderModifier | HTTPRouteRulesFiltersType::ResponseHeaderModifier => {
                let request = f.r#type == HTTPRouteRulesFiltersType::RequestHeaderModifier;
                let m = if request {
                    let m = f.request_header_modifier.clone().ok_or_else(|| missing("requestHeaderModifier"))?;
                    (
                        pairs(m.set.map(|l| l.into_iter().map(|h| (h.name, h.value)).collect())),
                        pairs(m.add.map(|l| l.into_iter().map(|h| (h.name, h.value)).collect())),
                        m.remove.unwrap_or_default(),
                    )
                } else {
                    let m = f.response_header_modifier.clone().ok_or_else(|| missing("responseHeaderModifier"))?;
                    (
                        pairs(m.set.map(|l| l.into_iter().map(|h| (h.name, h.value)).collect())),
                        pairs(m.add.map(|l| l.into_iter().map(|h| (h.name, h.value)).collect())),
                        m.remove.unwrap_or_default(),
                    )
                };
                let m = header_modifier(m.0, m.1, m.2, key, &field)?;
                if request {
                    Filter::RequestHeaders(m)
                } else {
                    Filter::ResponseHeaders(m)
                }
            }
            HTTPRouteRulesFiltersType::RequestRedirect => {
                let r = f.request_redirect.clone().ok_or_else(|| missing("requestRedirect"))?;
                let status = r.status_code.unwrap_or(302);
                let status = u16::try_from(status).ok().filter(|s| REDIRECT_STATUSES.contains(s)).ok_or_else(|| {
                    key.field_error(
                        format!("{field}.requestRedirect.statusCode"),
                        format!("{status} is not one of 301, 302, 303, 307, 308"),
                    )
                })?;
                let path = r
                    .path
                    .map(|p| {
                        path_replace(
                            &enum_name(&p.r#type),
                            p.replace_full_path,
                            p.replace_prefix_match,
                            prefix_matched,
                            key,
                            &format!("{field}.requestRedirect.path"),
                        )
                    })
                    .transpose()?;
                let port = r
                    .port
                    .map(|p| u32::try_from(p).map_err(|_| format!("{p} is not a port number")).and_then(port))
                    .transpose()
                    .map_err(|e| key.field_error(format!("{field}.requestRedirect.port"), e))?;
                Filter::Redirect(Redirect {
                    scheme: r.scheme.as_ref().map(enum_name),
                    hostname: r.hostname,
                    path,
                    port,
                    status,
                })
            }
            HTTPRouteRulesFiltersType::UrlRewrite => {
                let r = f.url_rewrite.clone().ok_or_else(|| missing("urlRewrite"))?;
                let path = r
                    .path
                    .map(|p| {
                        path_replace(
                            &enum_name(&p.r#type),
                            p.replace_full_path,
                            p.replace_prefix_match,
                            prefix_matched,
                            key,
                            &format!("{field}.urlRewrite.path"),
                        )
                    })
                    .transpose()?;
                Filter::Rewrite(Rewrite { hostname: r.hostname, path })
            }
            HTTPRouteRulesFiltersType::RequestMirror => {
                let m = f.request_mirror.clone().ok_or_else(|| missing("requestMirror"))?;
                let b = &m.backend_ref;
                let backend = backend_ref(
                    (&b.group, &b.kind, &b.name, &b.namespace, b.port),
                    key,
                    &format!("{field}.requestMirror.backendRef"),
                )?;
                let fraction = match (m.percent, m.fraction) {
                    (Some(p), _) => (u32::try_from(p).unwrap_or(0).min(100), 100),
                    (None, Some(f)) => (
                        u32::try_from(f.numerator).unwrap_or(0),
                        u32::try_from(f.denominator.unwrap_or(100)).unwrap_or(0),
                    ),
                    (None, None) => (1, 1),
                };
                if fraction.1 == 0 || fraction.0 > fraction.1 {
                    return Err(key.field_error(
                        format!("{field}.requestMirror.fraction"),
                        format!("{}/{} is not a fraction of at most 1", fraction.0, fraction.1),
                    ));
                }
                Filter::Mirror(Mirror { backend, fraction })
            }
            HTTPRouteRulesFiltersType::ExtensionRef
            | HTTPRouteRulesFiltersType::Cors
            | HTTPRouteRulesFiltersType::ExternalAuth => {
                let name = serde_json::to_value(&f.r#type).ok().and_then(|v| v.as_str().map(String::from));
                let name = name.unwrap_or_else(|| "this".into());
                return Err(key.field_error(format!("{field}.type"), format!("{name} filters are not supported")));
            }
        };
        out.push(filter);
    }
    let redirects = out.iter().filter(|f| matches!(f, Filter::Redirect(_))).count();
    let rewrites = out.iter().filter(|f| matches!(f, Filter::Rewrite(_))).count();
    if redirects > 0 && rewrites > 0 {
        return Err(key.field_error(field, "RequestRedirect and URLRewrite cannot be used on the same rule".into()));
    }
    Ok(out)
}
