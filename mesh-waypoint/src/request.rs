//! One request at the waypoint, its path normalized first ([`ferrymesh_policy::path`]: the
//! path authorized is the path routed and forwarded): the rule it selects among the routes attached to its Service
//! port (Gateway API precedence, [`RouteTable`]), the rule's filters (redirect, header changes,
//! rewrite), a backend by weight and that backend's filters, then the request forwarded by
//! [`crate::upstream`] (a copy to each RequestMirror's backend, see [`mirror`]) and the
//! response's header changes applied. A Service port without routes sends every request to the
//! Service itself; with routes, a request no rule matches is a 404 (as Gateway API has it), and
//! a rule whose backends all weigh 0 answers 500. A request addressed to a workload (a pod bound
//! to a waypoint of workloads) has no routes: it goes to that pod. Before any of it, the
//! request's JWT is checked against the RequestAuthentications attached to the Service or the
//! waypoint ([`crate::authn`]; a token no rule accepts is a 401), then the AuthorizationPolicies
//! attached to them decide: a denial is a 403 naming the policy and rule. Once the rule and
//! backend are known, the backend's endpoints' own DENY policies are applied to the original
//! client ([`crate::denials`]: a 403 when every endpoint refuses it), then the TrafficPolicies
//! of the Service, route or rule apply: their rate limits
//! (local ones, [`crate::limits`], then global ones, [`crate::global_limits`]; 429), then their
//! fault (a delay, then an abort); and the backend's DestinationRule may hash the request's key
//! to keep it on one endpoint. The request's span ([`crate::spans`]) starts on arrival and ends
//! with its record. Only a WebSocket upgrade is forwarded (spliced once the backend answers
//! 101); any other `Upgrade` and `CONNECT` get a 403 (see [`upgrade_of`]).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ferrymesh_dataplane::state::State;
use ferrymesh_policy::authn::RequestAuth;
use ferrymesh_policy::l7::HttpRequest;
use ferrymesh_policy::path::{normalize, Normalized, PathRules};
use ferrymesh_policy::Decision;
use ferrymesh_route::destination::{HashOn, LoadBalancer};
use ferrymesh_route::traffic::AbortStatus;
use ferrymesh_route::{
    BackendRef, Filter, HeaderModifier, Mirror, RedirectFrom, RequestView, RouteTable, Selected, Timeouts,
};
use http::header::{HeaderName, HeaderValue, CONNECTION, HOST, LOCATION, UPGRADE};
use http::uri::{Authority, PathAndQuery};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;

use crate::global_limits::Refused;
use crate::listener::{Destination, Downstream, Waypoint};
use crate::record::{Record, Recorded};
use crate::upstream::{Forward, To, TryPolicy, UpstreamError, DEFAULT_RETRY, NO_RETRY};

/// Body of requests and responses through the waypoint.
pub type Body = UnsyncBoxBody<Bytes, hyper::Error>;

/// A body the waypoint writes itself.
pub fn full(text: impl Into<Bytes>) -> Body {
    Full::new(text.into()).map_err(|never| match never {}).boxed_unsync()
}

/// An empty body.
pub fn empty() -> Body {
    Empty::new().map_err(|never| match never {}).boxed_unsync()
}

/// The request's authority: `:authority` (HTTP/2, or an absolute HTTP/1.1 target), else `Host`.
pub fn authority_of<B>(request: &Request<B>) -> Option<String> {
    let host = || request.headers().get(HOST).and_then(|h| h.to_str().ok()).map(String::from);
    request.uri().authority().map(|a| a.to_string()).or_else(host)
}

/// The route tables of the Service ports the waypoint serves, each built on its first request
/// and kept until the routes change (not sorted again for every request).
#[derive(Debug, Default)]
pub struct RouteTables {
    /// The routes' generation they were built from, and the tables by Service and port.
    built: std::sync::Mutex<(u64, TablesByPort)>,
}

/// By Service, port and client namespace.
type TablesByPort = HashMap<(String, u16, Option<String>), Arc<RouteTable>>;

impl RouteTables {
    /// The table of `service` (`namespace/name`) port `port` as the routes in `state` have it,
    /// for a client of namespace `client` (consumer routes apply to their namespace's clients
    /// only; see [`RouteTable::new`]).
    pub fn get(&self, state: &State, service: &str, port: u16, client: Option<&str>) -> Arc<RouteTable> {
        // The generation is read before the routes: a table built from newer routes is kept
        // under the older number, and rebuilt on the next request.
        let generation = state.routes_generation();
        let mut built = self.built.lock().expect("route tables lock");
        if built.0 != generation {
            *built = (generation, HashMap::new());
        }
        let key = (service.to_string(), port, client.map(String::from));
        built.1.entry(key).or_insert_with(|| Arc::new(RouteTable::new(&state.routes(), service, port, client))).clone()
    }
}

/// Serves one request from `down`, recorded when its response ends. It holds a place among the
/// requests in flight from its source and in all until then: past either cap it gets 503 (flag
/// OM, as Envoy's overload manager answers), so the buffers of what a client asks for and does
/// not read add up to a bound (docs/SECURITY.md).
pub async fn handle(waypoint: &Arc<Waypoint>, down: &Downstream, request: Request<Incoming>) -> Response<Body> {
    let mut record = Record::start(&waypoint.key, down, &request);
    let (response, place) = match waypoint.load.request(&waypoint.limits, down.addr.ip()) {
        Ok(place) => (route(waypoint, down, request, &mut record).await, Some(place)),
        Err(refusal) => {
            refusal.limit().count();
            tracing::info!(client = %down.addr, "{refusal}");
            (local_reply(&mut record, StatusCode::SERVICE_UNAVAILABLE, "OM", refusal.to_string()), None)
        }
    };
    record.answered(&response);
    response.map(|body| Recorded::new(body, record, waypoint.clone(), place).boxed_unsync())
}

/// An answer of the waypoint's own, with its flag and reason on the record.
fn local_reply(record: &mut Record, status: StatusCode, flags: &'static str, reason: String) -> Response<Body> {
    record.response_flags = flags;
    let mut response = Response::new(full(format!("{reason}\n")));
    *response.status_mut() = status;
    record.reason = reason;
    response
}

/// `retry-after` for a wait: whole seconds, at least 1.
fn retry_after(wait: Duration) -> HeaderValue {
    HeaderValue::from(wait.as_secs_f64().ceil().max(1.0) as u64)
}

/// The hash of a request's key for a consistent-hash backend, if it has one: the header's
/// value, the client's address, or the cookie's value; a request without the cookie gets one
/// made for it when the rule gives the cookie a ttl (`set_cookie`, for the response, as Envoy
/// does), so that its next requests stick.
fn affinity(on: &HashOn, headers: &HeaderMap, client: IpAddr, set_cookie: &mut Option<HeaderValue>) -> Option<u64> {
    use std::hash::{Hash, Hasher};
    let key = match on {
        HashOn::Header(name) => headers.get(name.as_str())?.as_bytes().to_vec(),
        HashOn::SourceIp => client.to_string().into_bytes(),
        HashOn::Cookie { name, ttl, path } => match cookie(headers, name) {
            Some(value) => value.as_bytes().to_vec(),
            None => {
                let ttl = (*ttl)?;
                let value = format!("{:016x}", rand::random::<u64>());
                let mut cookie = format!("{name}={value}");
                if !ttl.is_zero() {
                    cookie.push_str(&format!("; Max-Age={}", ttl.as_secs()));
                }
                if let Some(path) = path {
                    cookie.push_str(&format!("; Path={path}"));
                }
                cookie.push_str("; HttpOnly");
                *set_cookie = HeaderValue::try_from(cookie).ok();
                value.into_bytes()
            }
        },
    };
    let mut hasher = std::hash::DefaultHasher::new();
    key.hash(&mut hasher);
    Some(hasher.finish())
}

/// The value of cookie `name` in the request's `cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().split_once('=').filter(|(n, _)| *n == name).map(|(_, v)| v))
}

/// The answer to a request a fault aborts (flag FI): its HTTP status, or, for a gRPC status, a
/// trailers-only gRPC answer (HTTP 200, `grpc-status` and `grpc-message` in its headers), with
/// Envoy's message.
fn fault_abort(record: &mut Record, status: AbortStatus, policy: &str) -> Response<Body> {
    const MESSAGE: &str = "fault filter abort";
    match status {
        AbortStatus::Http(code) => {
            let status = StatusCode::from_u16(code).unwrap_or(StatusCode::SERVICE_UNAVAILABLE);
            let mut response = local_reply(record, status, "FI", format!("{MESSAGE} (TrafficPolicy {policy})"));
            *response.body_mut() = full(format!("{MESSAGE}\n"));
            response
        }
        AbortStatus::Grpc(code) => {
            record.response_flags = "FI";
            record.reason = format!("{MESSAGE} (TrafficPolicy {policy}): gRPC {}", code.name());
            let mut response = Response::new(empty());
            let headers = response.headers_mut();
            headers.insert(http::header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
            headers.insert("grpc-status", HeaderValue::from(u16::from(code.code())));
            headers.insert("grpc-message", HeaderValue::from_static(MESSAGE));
            response
        }
    }
}

/// Normalizes the request's path in place ([`ferrymesh_policy::path`]); the answer instead when
/// the path is refused (400) or the client is redirected to its unescaped form (307).
fn normalize_path(
    rules: &PathRules,
    parts: &mut http::request::Parts,
    record: &mut Record,
) -> Result<(), Box<Response<Body>>> {
    let raw = parts.uri.path();
    let path = match normalize(raw, rules) {
        Ok(Normalized::Path(path)) => path,
        Ok(Normalized::Redirect(path)) => {
            let mut response =
                local_reply(record, StatusCode::TEMPORARY_REDIRECT, "-", "escaped slashes unescaped".into());
            let location = match parts.uri.query() {
                Some(q) => format!("{path}?{q}"),
                None => path,
            };
            if let Ok(value) = HeaderValue::try_from(location) {
                response.headers_mut().insert(LOCATION, value);
            }
            return Err(Box::new(response));
        }
        Err(e) => {
            let reason = format!("bad path: {e} ({rules})");
            return Err(Box::new(local_reply(record, StatusCode::BAD_REQUEST, "-", reason)));
        }
    };
    if path == raw {
        return Ok(());
    }
    let path_and_query = match parts.uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut uri = http::uri::Parts::from(parts.uri.clone());
    uri.path_and_query = Some(PathAndQuery::try_from(path_and_query.as_str()).map_err(|e| {
        Box::new(local_reply(record, StatusCode::BAD_REQUEST, "-", format!("bad path after normalization: {e}")))
    })?);
    parts.uri = http::Uri::from_parts(uri).map_err(|e| {
        Box::new(local_reply(record, StatusCode::BAD_REQUEST, "-", format!("bad path after normalization: {e}")))
    })?;
    Ok(())
}

/// Whether `request` upgrades its connection to a WebSocket (RFC 9110 §7.8: HTTP/1.1, `Connection`
/// listing `upgrade`, `Upgrade: websocket`), the only upgrade taken, as Envoy's default
/// `upgrade_configs`; the refusal's reason for any other upgrade (`h2c` included) and for
/// `CONNECT`: once switched, the connection would be an opaque tunnel whose later requests no
/// policy sees. An `Upgrade` header without `Connection: upgrade` asks for nothing and is
/// dropped with the other hop-by-hop headers.
fn upgrade_of<B>(request: &Request<B>) -> Result<bool, String> {
    if request.method() == http::Method::CONNECT {
        return Err("CONNECT is not proxied by the waypoint".into());
    }
    let headers = request.headers();
    let asked = request.version() == Version::HTTP_11
        && headers.contains_key(UPGRADE)
        && headers
            .get_all(CONNECTION)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .any(|token| token.trim_ascii().eq_ignore_ascii_case(b"upgrade"));
    if !asked {
        return Ok(false);
    }
    let protocols: Vec<&[u8]> = headers
        .get_all(UPGRADE)
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii)
        .collect();
    match protocols.as_slice() {
        [one] if one.eq_ignore_ascii_case(b"websocket") => Ok(true),
        _ => {
            let named: Vec<_> = protocols.iter().map(|p| String::from_utf8_lossy(p)).collect();
            Err(format!("upgrade to {:?} refused: only websocket is upgraded", named.join(", ")))
        }
    }
}

/// Headers that belong to one connection and are not forwarded (RFC 9110 7.6.1), except
/// `connection: upgrade` and `upgrade` on an upgrade, which the upstream must see.
fn strip_hop_by_hop(headers: &mut HeaderMap, upgrade: bool) {
    let listed: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::try_from(name.trim()).ok())
        .filter(|name| !(upgrade && *name == UPGRADE))
        .collect();
    for name in listed {
        headers.remove(name);
    }
    for name in ["keep-alive", "proxy-connection", "proxy-authorization", "transfer-encoding"] {
        headers.remove(name);
    }
    if !upgrade {
        headers.remove(CONNECTION);
        headers.remove(UPGRADE);
    }
    // `te: trailers` is what gRPC sends and needs; any other `te` is hop-by-hop.
    if headers.get("te").is_some_and(|te| te != "trailers") {
        headers.remove("te");
    }
}

async fn route(
    waypoint: &Arc<Waypoint>,
    down: &Downstream,
    mut request: Request<Incoming>,
    record: &mut Record,
) -> Response<Body> {
    // `namespace/name` of the Service addressed; empty for a workload (no route attaches to it).
    let service = down.dest.service_name().map(|name| format!("{}/{name}", down.dest.namespace())).unwrap_or_default();
    let upgrade = match upgrade_of(&request) {
        Ok(upgrade) => upgrade,
        Err(refused) => return local_reply(record, StatusCode::FORBIDDEN, "-", refused),
    };
    let downstream_upgrade = upgrade.then(|| hyper::upgrade::on(&mut request));
    let (mut parts, body) = request.into_parts();
    record.span = crate::spans::RequestSpan::start(&waypoint.tracer, &parts.headers, down.traceparent);
    // One path from here on: the one authorized is the one routed and the one forwarded.
    if let Err(response) = normalize_path(&waypoint.paths, &mut parts, record) {
        return *response;
    }

    // The authority as requested (the record took it on arrival; empty: none was sent).
    let requested = record.authority.clone();
    // End-user authentication, then authorization (Envoy's order: jwt_authn, then RBAC). Only a
    // verified token's payload may be in a payload header: the client's own copies go first.
    let authentications = waypoint.state.request_authentications();
    for name in authentications.payload_headers() {
        parts.headers.remove(name);
    }
    let target = down.policy_target(waypoint);
    let verified = match waypoint.keys.authenticate(&authentications, &target, &parts.headers, parts.uri.query()).await
    {
        Ok(verified) => verified,
        Err(refused) => {
            let (status, body, challenge) = refused.response(&requested, parts.uri.path());
            let mut response = local_reply(record, status, "-", refused.reason);
            *response.body_mut() = full(body);
            response.headers_mut().insert(http::header::WWW_AUTHENTICATE, challenge);
            return response;
        }
    };
    if let Some(verified) = &verified {
        record.request_principal.clone_from(&verified.auth.principal);
    }
    let decision = authorize(waypoint, &target, down, &parts, &requested, verified.as_ref().map(|v| &v.auth));
    record.policy.clone_from(&decision.policy);
    if !decision.allowed {
        let mut response = local_reply(record, StatusCode::FORBIDDEN, "DENY", format!("denied: {}", decision.policy));
        *response.body_mut() = full(format!("RBAC: access denied by {}\n", decision.policy));
        return response;
    }
    if let Some(verified) = verified {
        if let Some(name) = verified.remove {
            parts.headers.remove(name);
        }
        if let Some((name, value)) = verified.payload {
            parts.headers.insert(name, value);
        }
    }
    // Upstream, the waypoint's span is the caller's.
    if let Some(span) = &record.span {
        parts.headers.insert("traceparent", span.traceparent());
    }

    let table = match &down.dest {
        Destination::Service(..) => {
            waypoint.route_tables.get(&waypoint.state, &service, down.port, down.client_namespace())
        }
        Destination::Workload(_) => Arc::default(),
    };
    let selected: Option<Selected> = table
        .select(&RequestView {
            method: &parts.method,
            path: parts.uri.path(),
            query: parts.uri.query(),
            headers: &parts.headers,
        })
        .cloned();
    // An HTTP/1.0 request may carry no Host: it goes as addressed, to the VIP (or pod) and port.
    let addressed = || down.dest.address().map(|ip| std::net::SocketAddr::new(ip, down.port).to_string());
    let mut authority = Some(requested).filter(|a| !a.is_empty()).or_else(addressed).unwrap_or_default();
    let mut path = parts.uri.path().to_string();
    let query = parts.uri.query().map(String::from);
    let mut later = Deferred::default();
    // The rule's timeouts and retry; without a rule, no timeout and the mesh's default retry.
    let (timeouts, retry) = match &selected {
        Some(selected) => (selected.rule().timeouts, selected.rule().retry.as_ref().unwrap_or(&DEFAULT_RETRY)),
        None => (Timeouts::default(), &*DEFAULT_RETRY),
    };

    // The backend Service; None: the workload addressed, itself.
    let backend: Option<BackendRef> = match (&selected, table.is_empty()) {
        (_, true) => match &down.dest {
            Destination::Service(..) => Some(BackendRef { service: service.clone(), port: down.port }),
            Destination::Workload(_) => None,
        },
        (None, false) => {
            return local_reply(
                record,
                StatusCode::NOT_FOUND,
                "NR",
                format!("no route of {service}:{} matched", down.port),
            );
        }
        (Some(selected), false) => {
            record.route = selected.describe();
            let rule = selected.rule();
            for filter in &rule.filters {
                match filter {
                    Filter::Redirect(redirect) => {
                        let host = authority.rsplit_once(':').map_or(authority.as_str(), |(h, _)| h);
                        let from = RedirectFrom {
                            scheme: "http",
                            host,
                            port: down.port,
                            path: &path,
                            query: query.as_deref(),
                        };
                        let location = redirect.location(&from, selected.matched());
                        let mut response = Response::new(empty());
                        *response.status_mut() = StatusCode::from_u16(redirect.status).unwrap_or(StatusCode::FOUND);
                        if let Ok(value) = HeaderValue::try_from(location) {
                            response.headers_mut().insert(LOCATION, value);
                        }
                        return response;
                    }
                    other => apply(other, selected, &mut parts.headers, &mut authority, &mut path, &mut later),
                }
            }
            let Some(picked) = rule.pick(waypoint.rolls.next()) else {
                let reason = format!("every backend of {} has weight 0", selected.describe());
                return local_reply(record, StatusCode::INTERNAL_SERVER_ERROR, "-", reason);
            };
            if let Some(refused) = &picked.refused {
                let reason = format!("backend {} of {}: {refused}", picked.target.service, selected.describe());
                return local_reply(record, StatusCode::INTERNAL_SERVER_ERROR, "-", reason);
            }
            for filter in &picked.filters {
                apply(filter, selected, &mut parts.headers, &mut authority, &mut path, &mut later);
            }
            Some(picked.target.clone())
        }
    };
    let to = match (backend, &down.dest) {
        (Some(backend), _) => {
            record.backend = format!("{}:{}", backend.service, backend.port);
            let Some(target) = waypoint.state.service(&backend.service) else {
                let reason = format!("backend Service {} does not exist", backend.service);
                return local_reply(record, StatusCode::INTERNAL_SERVER_ERROR, "-", reason);
            };
            To::Service(target, backend.port)
        }
        (None, Destination::Workload(workload)) => To::Endpoint(std::net::SocketAddr::new(workload.ip, down.port)),
        (None, Destination::Service(..)) => unreachable!("a Service's request always has a backend Service"),
    };

    // The endpoints' own DENY policies, for the original client (the endpoints' agents see the
    // waypoint): no request goes to one that denies it, none at all when every one does.
    let denials = crate::denials::of(waypoint, down, &to);
    if let Some(denied) = denials.all {
        record.policy.clone_from(&denied.policy);
        let mut response = local_reply(record, StatusCode::FORBIDDEN, "DENY", format!("denied: {}", denied.policy));
        *response.body_mut() = full(format!("RBAC: access denied by {}\n", denied.policy));
        return response;
    }

    // The rate limits of a TrafficPolicy of the Service, route or rule: past one, a 429.
    let traffic = waypoint.state.traffic_policies();
    let taken = selected.as_ref().map(|s| (&*s.route, s.rule));
    if let Some(limits) = traffic.rate_limit(&service, taken) {
        let principal = down.identity.as_deref();
        if let Err(limited) = waypoint.rate_limiters.check(limits, &service, &parts.headers, principal) {
            let mut response = local_reply(record, StatusCode::TOO_MANY_REQUESTS, "RL", limited.reason);
            *response.body_mut() = full("local_rate_limited\n");
            response.headers_mut().insert(http::header::RETRY_AFTER, retry_after(limited.retry_after));
            return response;
        }
        if !limits.feature.global.is_empty() {
            match waypoint.rate_limit_service.check(limits, &service, &parts.headers, principal).await {
                Ok(()) => {}
                Err(Refused::OverLimit { retry_after: wait, reason, headers }) => {
                    // Envoy's answer: no body, `x-envoy-ratelimited`.
                    let mut response = local_reply(record, StatusCode::TOO_MANY_REQUESTS, "RL", reason);
                    *response.body_mut() = empty();
                    for (name, value) in headers {
                        response.headers_mut().append(name, value);
                    }
                    response.headers_mut().insert(http::header::RETRY_AFTER, retry_after(wait));
                    response.headers_mut().insert("x-envoy-ratelimited", HeaderValue::from_static("true"));
                    return response;
                }
                Err(Refused::Unanswered { reason }) => {
                    return local_reply(record, StatusCode::INTERNAL_SERVER_ERROR, "RLSE", reason);
                }
            }
        }
    }
    // Faults injected on purpose (a TrafficPolicy of the Service, route or rule): the delay,
    // then the abort, as Envoy's fault filter has them, before anything is sent.
    if let Some(fault) = traffic.fault(&service, taken) {
        let (delay_rolls, abort_rolls) = &waypoint.fault_rolls;
        if let Some(delay) = fault.feature.delay.as_ref().filter(|d| d.share.hits(delay_rolls.next())) {
            record.response_flags = "DI";
            // The delay counts within the request timeout, as a slow backend's time would.
            match timeouts.request {
                Some(limit) if limit.saturating_sub(record.elapsed()) < delay.fixed => {
                    tokio::time::sleep(limit.saturating_sub(record.elapsed())).await;
                    let reason = format!(
                        "request timeout: no response within {}ms (a fault delay of {}ms by TrafficPolicy {})",
                        limit.as_millis(),
                        delay.fixed.as_millis(),
                        fault.policy.key()
                    );
                    return local_reply(record, StatusCode::GATEWAY_TIMEOUT, "UT", reason);
                }
                _ => tokio::time::sleep(delay.fixed).await,
            }
        }
        if let Some(abort) = fault.feature.abort.as_ref().filter(|a| a.share.hits(abort_rolls.next())) {
            return fault_abort(record, abort.status, &fault.policy.key());
        }
    }

    strip_hop_by_hop(&mut parts.headers, upgrade);
    let path_and_query = match &query {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let (Ok(authority), Ok(path_and_query)) =
        (Authority::try_from(authority.as_str()), PathAndQuery::try_from(path_and_query.as_str()))
    else {
        return local_reply(record, StatusCode::BAD_REQUEST, "-", "the rewritten authority or path is invalid".into());
    };
    // A backend balanced by a consistent hash (its DestinationRule): the request's key.
    let mut set_cookie = None;
    let affinity = match &to {
        To::Service(target, _) => {
            let rules = waypoint.state.destination_rules();
            let rule = rules.of(
                &format!("{}/{}", target.namespace, target.name),
                down.client_namespace(),
                ferrymesh_policy::ROOT_NAMESPACE,
            );
            match rule.map(|r| &r.policy.balancer) {
                Some(LoadBalancer::Hash(on)) => affinity(on, &parts.headers, down.addr.ip(), &mut set_cookie),
                _ => None,
            }
        }
        To::Endpoint(_) => None,
    };
    let mut forward = Forward { parts, body: body.boxed_unsync(), authority, path_and_query };
    if !later.mirrors.is_empty() {
        forward = match mirror(waypoint, &later.mirrors, forward).await {
            Ok(forward) => forward,
            Err(reason) => return local_reply(record, StatusCode::BAD_REQUEST, "-", reason),
        };
    }
    let policy = TryPolicy {
        retry,
        per_try: timeouts.backend_request,
        affinity,
        client: down.client_namespace(),
        denied: &denials.endpoints,
    };
    // The request timeout runs from the request's arrival to its response's headers.
    let deadline = timeouts.request.map(|limit| (limit, limit.saturating_sub(record.elapsed())));
    let mut retries = 0;
    let sent = {
        let send = waypoint.upstream.send(&to, forward, policy, &mut retries);
        match deadline {
            Some((_, left)) => tokio::time::timeout(left, send).await.ok(),
            None => Some(send.await),
        }
    };
    record.retries = retries;
    let Some(sent) = sent else {
        let limit = deadline.map_or(0, |(limit, _)| limit.as_millis());
        return local_reply(
            record,
            StatusCode::GATEWAY_TIMEOUT,
            "UT",
            format!("request timeout: no response within {limit}ms"),
        );
    };
    let mut response = match sent {
        Ok((response, endpoint)) => {
            record.upstream = endpoint.to_string();
            response
        }
        Err(e) => {
            let (status, flags) = match &e {
                UpstreamError::Timeout { endpoint, .. } => {
                    record.upstream = endpoint.to_string();
                    (StatusCode::GATEWAY_TIMEOUT, "UT")
                }
                UpstreamError::Body { .. } => (StatusCode::BAD_REQUEST, "DPE"),
                UpstreamError::Overflow(_) => (StatusCode::SERVICE_UNAVAILABLE, "UO"),
                UpstreamError::NoEndpoint { .. } => (StatusCode::SERVICE_UNAVAILABLE, "UH"),
                UpstreamError::Connect { endpoint, .. } => {
                    record.upstream = endpoint.to_string();
                    (StatusCode::SERVICE_UNAVAILABLE, "UF")
                }
                UpstreamError::Request { endpoint, .. } => {
                    record.upstream = endpoint.to_string();
                    (StatusCode::SERVICE_UNAVAILABLE, "UC")
                }
            };
            return local_reply(record, status, flags, e.to_string());
        }
    };
    for modifier in &later.response_headers {
        modifier.apply(response.headers_mut());
    }
    if let Some(cookie) = set_cookie {
        response.headers_mut().append(http::header::SET_COOKIE, cookie);
    }
    if response.status() == StatusCode::SWITCHING_PROTOCOLS {
        if let Some(downstream_upgrade) = downstream_upgrade {
            splice_upgrade(downstream_upgrade, hyper::upgrade::on(&mut response));
        }
    }
    response
}

/// The decision of the policies attached to the request's Service or to the waypoint.
fn authorize(
    waypoint: &Waypoint,
    target: &ferrymesh_policy::l7::Target<'_>,
    down: &Downstream,
    parts: &http::request::Parts,
    host: &str,
    auth: Option<&RequestAuth>,
) -> Decision {
    let request = HttpRequest {
        l4: down.connection(),
        host,
        method: parts.method.as_str(),
        path: parts.uri.path(),
        headers: &parts.headers,
        auth,
    };
    waypoint.state.policies().authorize_request(target, &request)
}

/// What the filters leave for later: changes to the response, and copies of the request.
#[derive(Debug, Default)]
struct Deferred {
    response_headers: Vec<HeaderModifier>,
    mirrors: Vec<Mirror>,
}

/// Applies a non-redirect filter of the selected rule or its backend.
fn apply(
    filter: &Filter,
    selected: &Selected,
    headers: &mut HeaderMap,
    authority: &mut String,
    path: &mut String,
    later: &mut Deferred,
) {
    match filter {
        Filter::RequestHeaders(modifier) => modifier.apply(headers),
        Filter::ResponseHeaders(modifier) => later.response_headers.push(modifier.clone()),
        Filter::Rewrite(rewrite) => {
            if let Some(hostname) = &rewrite.hostname {
                authority.clone_from(hostname);
            }
            if let Some(replace) = &rewrite.path {
                *path = replace.apply(path, selected.matched());
            }
        }
        Filter::Mirror(mirror) => later.mirrors.push(mirror.clone()),
        Filter::Redirect(_) => {}
    }
}

/// The largest request body a mirror copies: a request with a larger body (or one of unknown
/// length) is forwarded but not mirrored, so the waypoint never holds more than this per request.
pub const MIRROR_BODY_LIMIT: usize = 64 * 1024;

/// Sends a copy of `forward` to each of `mirrors` whose share it falls in (fire and forget: the
/// copies' answers are dropped, their failures logged), and gives `forward` back to go on. A
/// copy goes as Envoy sends one, with `-shadow` appended to its host. A body is read whole
/// before the request goes on, up to [`MIRROR_BODY_LIMIT`]; a body that fails while read is
/// the error.
async fn mirror(waypoint: &Arc<Waypoint>, mirrors: &[Mirror], forward: Forward) -> Result<Forward, String> {
    let chosen: Vec<&Mirror> =
        mirrors.iter().filter(|m| m.fraction.1 > 0 && rand::random_range(0..m.fraction.1) < m.fraction.0).collect();
    if chosen.is_empty() {
        return Ok(forward);
    }
    let Forward { parts, body, authority, path_and_query } = forward;
    let length = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    let bytes = match (hyper::body::Body::is_end_stream(&body), length) {
        (true, _) => Bytes::new(),
        (false, Some(n)) if n <= MIRROR_BODY_LIMIT => match body.collect().await {
            Ok(collected) => collected.to_bytes(),
            Err(e) => return Err(format!("the request body failed: {e}")),
        },
        (false, _) => {
            tracing::debug!("request body too large or of unknown length: not mirrored");
            return Ok(Forward { parts, body, authority, path_and_query });
        }
    };
    let shadow = shadow_authority(&authority);
    for m in chosen {
        let Some(service) = waypoint.state.service(&m.backend.service) else {
            tracing::debug!("mirror backend {} does not exist", m.backend.service);
            continue;
        };
        let copy = Forward {
            parts: parts.clone(),
            body: full(bytes.clone()),
            authority: shadow.clone(),
            path_and_query: path_and_query.clone(),
        };
        let (waypoint, port) = (waypoint.clone(), m.backend.port);
        tokio::spawn(async move {
            // A copy is sent once: a mirror never adds retries to its backend's load.
            let once = TryPolicy { retry: &NO_RETRY, per_try: None, affinity: None, client: None, denied: &[] };
            match waypoint.upstream.send(&To::Service(service, port), copy, once, &mut 0).await {
                Ok((response, _)) => {
                    let _ = response.into_body().collect().await;
                }
                Err(e) => tracing::debug!("mirrored request failed: {e}"),
            }
        });
    }
    Ok(Forward { parts, body: full(bytes), authority, path_and_query })
}

/// `host-shadow[:port]`, the authority of a mirrored copy.
fn shadow_authority(authority: &Authority) -> Authority {
    let shadow = match authority.port() {
        Some(port) => format!("{}-shadow:{port}", authority.host()),
        None => format!("{}-shadow", authority.host()),
    };
    Authority::try_from(shadow).unwrap_or_else(|_| authority.clone())
}

/// Copies both ways between the client and the upstream once both have switched protocols
/// (a WebSocket), until either side closes.
fn splice_upgrade(downstream: hyper::upgrade::OnUpgrade, upstream: hyper::upgrade::OnUpgrade) {
    tokio::spawn(async move {
        let (downstream, upstream) = match futures::future::try_join(downstream, upstream).await {
            Ok(both) => both,
            Err(e) => return tracing::debug!("upgrade failed: {e}"),
        };
        let mut downstream = hyper_util::rt::TokioIo::new(downstream);
        let mut upstream = hyper_util::rt::TokioIo::new(upstream);
        if let Err(e) = tokio::io::copy_bidirectional(&mut downstream, &mut upstream).await {
            tracing::debug!("upgraded connection ended: {e}");
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_mirrored_copy_goes_to_the_shadow_host_with_its_port() {
        let shadow = |a: &str| shadow_authority(&Authority::try_from(a).unwrap()).to_string();
        assert_eq!(shadow("web.shop"), "web.shop-shadow");
        assert_eq!(shadow("web.shop:8080"), "web.shop-shadow:8080");
        assert_eq!(shadow("10.96.0.50:80"), "10.96.0.50-shadow:80");
    }

    #[test]
    fn a_hash_key_comes_from_its_header_cookie_or_client_and_a_missing_cookie_is_made() {
        let client = IpAddr::from([10, 244, 1, 5]);
        let mut headers = HeaderMap::new();
        headers.insert(http::header::COOKIE, HeaderValue::from_static("a=1; user=alice; b=2"));
        headers.insert("x-user", HeaderValue::from_static("alice"));
        let mut set = None;
        let by_header = affinity(&HashOn::Header("x-user".into()), &headers, client, &mut set);
        let cookie_on = |ttl| HashOn::Cookie { name: "user".into(), ttl, path: Some("/".into()) };
        let by_cookie = affinity(&cookie_on(None), &headers, client, &mut set);
        assert!(by_header.is_some() && by_header == by_cookie, "the same value hashes alike");
        assert!(set.is_none(), "a request with the cookie gets none");
        assert_eq!(
            affinity(&HashOn::SourceIp, &headers, client, &mut set),
            affinity(&HashOn::SourceIp, &HeaderMap::new(), client, &mut set)
        );
        // Without the header: no key (balanced as usual).
        assert_eq!(affinity(&HashOn::Header("x-other".into()), &headers, client, &mut set), None);
        // Without the cookie: none without a ttl; with one, a cookie is made and set.
        let bare = HeaderMap::new();
        assert_eq!(affinity(&cookie_on(None), &bare, client, &mut set), None);
        let made = affinity(&cookie_on(Some(std::time::Duration::from_secs(60))), &bare, client, &mut set);
        let set = set.expect("a cookie to set").to_str().unwrap().to_string();
        assert!(set.starts_with("user=") && set.ends_with("; Max-Age=60; Path=/; HttpOnly"), "{set}");
        // The next request carries it and lands where the first did.
        let mut next = HeaderMap::new();
        next.insert(http::header::COOKIE, HeaderValue::try_from(set.split(';').next().unwrap()).unwrap());
        assert_eq!(affinity(&cookie_on(Some(std::time::Duration::from_secs(60))), &next, client, &mut None), made);
    }

    #[test]
    fn hop_by_hop_headers_stay_behind_unless_upgrading() {
        let mut headers = HeaderMap::new();
        headers.insert(CONNECTION, HeaderValue::from_static("keep-alive, x-private"));
        headers.insert("x-private", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        headers.insert("te", HeaderValue::from_static("trailers"));
        headers.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut headers, false);
        let mut left: Vec<&str> = headers.keys().map(|k| k.as_str()).collect();
        left.sort_unstable();
        assert_eq!(left, ["te", "x-kept"], "te: trailers is gRPC's and goes on");
        let mut upgrade = HeaderMap::new();
        upgrade.insert(CONNECTION, HeaderValue::from_static("Upgrade"));
        upgrade.insert(UPGRADE, HeaderValue::from_static("websocket"));
        strip_hop_by_hop(&mut upgrade, true);
        assert_eq!(upgrade.len(), 2, "an upgrade keeps connection and upgrade: {upgrade:?}");
    }

    #[test]
    fn only_a_websocket_upgrade_is_taken() {
        let request = |method: &str, version: Version, headers: &[(&str, &str)]| {
            let mut builder = Request::builder().method(method).uri("/").version(version);
            for (name, value) in headers {
                builder = builder.header(*name, *value);
            }
            builder.body(()).unwrap()
        };
        let h11 = Version::HTTP_11;
        let ws = [("connection", "keep-alive, Upgrade"), ("upgrade", "WebSocket")];
        assert_eq!(upgrade_of(&request("GET", h11, &ws)), Ok(true));
        assert_eq!(upgrade_of(&request("GET", h11, &[])), Ok(false));
        // Not asked (no `Connection: upgrade`, or HTTP/1.0): a plain request, the header dropped.
        assert_eq!(upgrade_of(&request("GET", h11, &[("upgrade", "h2c")])), Ok(false));
        assert_eq!(upgrade_of(&request("GET", Version::HTTP_10, &ws)), Ok(false));
        for refused in [
            vec![
                ("connection", "Upgrade, HTTP2-Settings"),
                ("upgrade", "h2c"),
                ("http2-settings", "AAMAAABkAAQAoAAAAAIAAAAA"),
            ],
            vec![("connection", "upgrade"), ("upgrade", "tunnel")],
            vec![("connection", "upgrade"), ("upgrade", "websocket, h2c")],
            vec![("connection", "upgrade"), ("upgrade", "websocket"), ("upgrade", "h2c")],
        ] {
            let answer = upgrade_of(&request("GET", h11, &refused));
            assert!(answer.as_ref().is_err_and(|e| e.contains("only websocket")), "{refused:?}: {answer:?}");
        }
        assert!(upgrade_of(&request("CONNECT", h11, &[])).is_err());
    }
}
