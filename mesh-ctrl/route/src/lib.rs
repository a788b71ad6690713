//! L7 routing as the mesh holds it: Gateway API `HTTPRoute` and `GRPCRoute` attached to Services
//! (GAMMA), validated once (regular expressions compiled, ports and weights checked), and the
//! one function that picks the rule of a request, with the spec's precedence. mesh-ctrl builds
//! [`Route`]s from the Kubernetes objects; the waypoint routes with [`RouteTable`]; meshctl
//! explains with the same table. It never does I/O.
//!
//! Precedence among the rules of every route attached to a Service port (Gateway API, HTTPRoute
//! "matches"): an Exact path, then a RegularExpression path, then the longest PathPrefix; then a
//! method match; then the most header matches; then the most query-parameter matches; then the
//! oldest route, then the route first by `namespace/name`; then the first rule and match of the
//! route. (A regular expression's rank is ours to choose: the spec leaves it to implementations.)

pub mod destination;
pub mod spec;
pub mod traffic;
pub mod wire;

use std::cmp::Reverse;
use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;
use regex::Regex;

/// What kind of Gateway API route it came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RouteKind {
    /// `HTTPRoute`.
    Http,
    /// `GRPCRoute` (its matches are on gRPC paths and headers).
    Grpc,
}

impl RouteKind {
    /// The Kubernetes kind.
    pub const fn as_str(self) -> &'static str {
        match self {
            RouteKind::Http => "HTTPRoute",
            RouteKind::Grpc => "GRPCRoute",
        }
    }
}

/// A route attached to Services.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// `HTTPRoute` or `GRPCRoute`.
    pub kind: RouteKind,
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The Service ports it is attached to.
    pub parents: Vec<Parent>,
    /// Hostnames, as given (informational for mesh routes).
    pub hostnames: Vec<String>,
    /// Its rules, in order.
    pub rules: Vec<Rule>,
    /// Creation time (Unix seconds), for precedence.
    pub created_unix: i64,
}

impl Route {
    /// `Kind namespace/name`, as config keys and operators name it.
    pub fn key(&self) -> String {
        format!("{} {}/{}", self.kind.as_str(), self.namespace, self.name)
    }

    /// Whether it is a producer route of `service` (`namespace/name`): one of the Service's own
    /// namespace, which applies to every client. A route of another namespace is a consumer
    /// route: it applies only to clients of its own namespace (GAMMA's namespace boundaries).
    pub fn is_producer_of(&self, service: &str) -> bool {
        service.split_once('/').is_some_and(|(namespace, _)| namespace == self.namespace)
    }
}

/// A Service (and port) a route is attached to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parent {
    /// `namespace/name` of the Service.
    pub service: String,
    /// The port; None: every port.
    pub port: Option<u16>,
}

/// A rule: when it applies, what it does to the request, and where it sends it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rule {
    /// Its name, if it has one.
    pub name: Option<String>,
    /// Any one of them selects the rule (never empty: a rule without matches gets one that
    /// matches every request).
    pub matches: Vec<Match>,
    /// Filters applied to every request the rule takes.
    pub filters: Vec<Filter>,
    /// Where requests go, by weight.
    pub backends: Vec<Backend>,
    /// How long its requests may take.
    pub timeouts: Timeouts,
    /// When a failed attempt is tried again; None: the mesh's default ([`Retry::mesh_default`]).
    pub retry: Option<Retry>,
}

/// How long a rule's requests may take (Gateway API `timeouts`, GEP-1742); None: no limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Timeouts {
    /// From the request's arrival to its response's headers, retries included.
    pub request: Option<Duration>,
    /// Each attempt at a backend, to its response's headers.
    pub backend_request: Option<Duration>,
}

/// When a failed attempt at a backend is tried again (Gateway API `retry`, GEP-1731), on
/// another endpoint when there is one. A connection that could not be made is always retried
/// (the request never reached the endpoint); a response is retried when its status is one of
/// `codes`, and an attempt past `backendRequest` counts as a 504.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Retry {
    /// Response statuses that are retried.
    pub codes: Vec<u16>,
    /// Retries after the first attempt.
    pub attempts: u32,
    /// The wait before each retry.
    pub backoff: Duration,
}

impl Retry {
    /// The mesh's default where a route says nothing (Istio's: connection failures and 503, 2
    /// retries, Envoy's 25 ms base interval).
    pub fn mesh_default() -> Retry {
        Retry { codes: vec![503], attempts: 2, backoff: Duration::from_millis(25) }
    }
}

/// The largest retry count a route may ask for.
pub const MAX_RETRY_ATTEMPTS: u32 = 10;
/// The response statuses a retry may name (GEP-1731).
pub const RETRY_CODES: std::ops::RangeInclusive<u16> = 400..=599;

/// A Gateway API duration (GEP-2257): one to four `<number><unit>` parts, numbers of at most 5
/// digits, units `h`, `m`, `s`, `ms`, e.g. `500ms`, `1m30s`. Zero means no limit (None).
pub fn parse_duration(text: &str) -> Result<Option<Duration>, String> {
    let invalid = || format!("{text:?} is not a duration (e.g. 500ms, 10s, 1m30s)");
    let (mut rest, mut total, mut parts) = (text, Duration::ZERO, 0);
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 || digits > 5 || parts == 4 {
            return Err(invalid());
        }
        let n: u64 = rest[..digits].parse().map_err(|_| invalid())?;
        rest = &rest[digits..];
        let (unit, len) = if rest.starts_with("ms") {
            (Duration::from_millis(1), 2)
        } else {
            match rest.bytes().next() {
                Some(b'h') => (Duration::from_secs(3600), 1),
                Some(b'm') => (Duration::from_secs(60), 1),
                Some(b's') => (Duration::from_secs(1), 1),
                _ => return Err(invalid()),
            }
        };
        total += unit * u32::try_from(n).map_err(|_| invalid())?;
        rest = &rest[len..];
        parts += 1;
    }
    if parts == 0 {
        return Err(invalid());
    }
    Ok((!total.is_zero()).then_some(total))
}

/// A request match: every part given must hold.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Match {
    /// The path; None: any.
    pub path: Option<PathMatch>,
    /// Headers (names are case-insensitive).
    pub headers: Vec<ValueMatch>,
    /// Query parameters (names are case-sensitive).
    pub query_params: Vec<ValueMatch>,
    /// The method; None: any.
    pub method: Option<http::Method>,
}

/// How a path is matched.
#[derive(Clone, Debug)]
pub enum PathMatch {
    /// The whole path.
    Exact(String),
    /// Whole path segments: `/foo` matches `/foo` and `/foo/bar`, not `/foobar`.
    Prefix(String),
    /// A regular expression that must match the whole path.
    Regex(Regex),
}

/// A header's or a query parameter's value.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValueMatch {
    /// Its name.
    pub name: String,
    /// How its value is matched.
    pub value: StringMatch,
}

/// Compiles `pattern` (RE2 syntax) to match whole values only.
pub fn anchored(pattern: &str) -> Result<Regex, regex::Error> {
    Regex::new(&format!("^(?:{pattern})$"))
}

/// The pattern [`anchored`] was given.
pub fn pattern_of(re: &Regex) -> &str {
    let s = re.as_str();
    s.strip_prefix("^(?:").and_then(|s| s.strip_suffix(")$")).unwrap_or(s)
}

/// An exact value or a regular expression over the whole value.
#[derive(Clone, Debug)]
pub enum StringMatch {
    /// Exactly this.
    Exact(String),
    /// Matching this (anchored).
    Regex(Regex),
}

impl PartialEq for StringMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (StringMatch::Exact(a), StringMatch::Exact(b)) => a == b,
            (StringMatch::Regex(a), StringMatch::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl Eq for StringMatch {}

impl PartialEq for PathMatch {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (PathMatch::Exact(a), PathMatch::Exact(b)) | (PathMatch::Prefix(a), PathMatch::Prefix(b)) => a == b,
            (PathMatch::Regex(a), PathMatch::Regex(b)) => a.as_str() == b.as_str(),
            _ => false,
        }
    }
}

impl Eq for PathMatch {}

impl StringMatch {
    /// Whether `value` matches.
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(exact) => exact == value,
            StringMatch::Regex(re) => re.is_match(value),
        }
    }
}

/// A filter of a rule or of a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Filter {
    /// Changes the request's headers.
    RequestHeaders(HeaderModifier),
    /// Changes the response's headers.
    ResponseHeaders(HeaderModifier),
    /// Answers with a redirect instead of forwarding.
    Redirect(Redirect),
    /// Rewrites host and path before forwarding.
    Rewrite(Rewrite),
    /// Sends a copy of the request to another backend (its answer is dropped).
    Mirror(Mirror),
}

/// Header changes: set replaces, add appends, remove deletes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct HeaderModifier {
    /// (name, value) to set.
    pub set: Vec<(String, String)>,
    /// (name, value) to add.
    pub add: Vec<(String, String)>,
    /// Names to remove.
    pub remove: Vec<String>,
}

impl HeaderModifier {
    /// Applies the changes to `headers`; names and values were checked when the route was made.
    pub fn apply(&self, headers: &mut HeaderMap) {
        use http::header::{HeaderName, HeaderValue};
        let pair = |(n, v): &(String, String)| Some((HeaderName::try_from(n).ok()?, HeaderValue::try_from(v).ok()?));
        for (name, value) in self.set.iter().filter_map(pair) {
            headers.insert(name, value);
        }
        for (name, value) in self.add.iter().filter_map(pair) {
            headers.append(name, value);
        }
        for name in &self.remove {
            headers.remove(name.as_str());
        }
    }
}

/// A path replacement.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum PathReplace {
    /// The whole path becomes this.
    Full(String),
    /// The part the rule's PathPrefix matched becomes this.
    Prefix(String),
}

impl PathReplace {
    /// The path `path` becomes, `matched` being the match that selected the rule: a full
    /// replacement is the new path; a prefix replacement swaps the part a PathPrefix matched
    /// (segment-wise, so `/api` on `/api/v1` leaves `/v1` after it) and keeps the rest.
    pub fn apply(&self, path: &str, matched: &Match) -> String {
        let (replacement, rest) = match (self, &matched.path) {
            (PathReplace::Full(full), _) => return full.clone(),
            (PathReplace::Prefix(replacement), Some(PathMatch::Prefix(prefix))) => {
                (replacement.trim_end_matches('/'), path.get(prefix.trim_end_matches('/').len()..).unwrap_or(""))
            }
            // Validation allows a prefix replacement only under PathPrefix matches.
            (PathReplace::Prefix(_), _) => return path.to_string(),
        };
        let joined = match (replacement.is_empty(), rest.is_empty()) {
            (_, true) => replacement.to_string(),
            (true, false) => rest.to_string(),
            (false, false) => format!("{replacement}{rest}"),
        };
        if joined.is_empty() {
            "/".into()
        } else {
            joined
        }
    }
}

/// What a redirect is computed from: the request as it arrived on a Service port.
#[derive(Debug)]
pub struct RedirectFrom<'a> {
    /// `http` (inside the mesh, requests arrive in cleartext).
    pub scheme: &'a str,
    /// The request's host, without a port.
    pub host: &'a str,
    /// The Service port the request arrived on (the "listener port" of a GAMMA route).
    pub port: u16,
    /// The request's path.
    pub path: &'a str,
    /// Its query, if any.
    pub query: Option<&'a str>,
}

impl Redirect {
    /// The `Location` of the redirect, with Gateway API's port rules: the filter's port, else
    /// the new scheme's well-known port when the scheme changes, else the Service port; the
    /// port is left out when it is the scheme's default (80 for http, 443 for https).
    pub fn location(&self, from: &RedirectFrom<'_>, matched: &Match) -> String {
        let scheme = self.scheme.as_deref().unwrap_or(from.scheme);
        let host = self.hostname.as_deref().unwrap_or(from.host);
        let port = match (self.port, &self.scheme) {
            (Some(port), _) => Some(port),
            (None, Some(scheme)) => well_known_port(scheme),
            (None, None) => Some(from.port),
        };
        let port = match port {
            Some(port) if Some(port) != well_known_port(scheme) => format!(":{port}"),
            _ => String::new(),
        };
        let path = self.path.as_ref().map_or_else(|| from.path.to_string(), |p| p.apply(from.path, matched));
        let query = from.query.map(|q| format!("?{q}")).unwrap_or_default();
        format!("{scheme}://{host}{port}{path}{query}")
    }
}

fn well_known_port(scheme: &str) -> Option<u16> {
    match scheme {
        "http" => Some(80),
        "https" => Some(443),
        _ => None,
    }
}

/// A redirect answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// `http` or `https`; None: the request's.
    pub scheme: Option<String>,
    /// None: the request's.
    pub hostname: Option<String>,
    /// None: the request's path.
    pub path: Option<PathReplace>,
    /// None: the scheme's default when the scheme changes, else the request's.
    pub port: Option<u16>,
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
}

/// A rewrite of host and path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rewrite {
    /// The new `Host`/`:authority`; None: kept.
    pub hostname: Option<String>,
    /// The new path; None: kept.
    pub path: Option<PathReplace>,
}

/// A mirror: a copy of a share of requests to another backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mirror {
    /// Where copies go.
    pub backend: BackendRef,
    /// Share mirrored: (numerator, denominator).
    pub fraction: (u32, u32),
}

/// A Service port requests go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendRef {
    /// `namespace/name` of the Service.
    pub service: String,
    /// Its port.
    pub port: u16,
}

/// A weighted backend of a rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Backend {
    /// The Service port.
    pub target: BackendRef,
    /// Its share, relative to the rule's other backends (0: never).
    pub weight: u32,
    /// Filters for requests sent to this backend only.
    pub filters: Vec<Filter>,
    /// Why the backend may not be used (a Service of another namespace that no ReferenceGrant
    /// opens to the route): the requests it would take are answered 500, as Gateway API has it.
    pub refused: Option<String>,
}

/// What a request looks like to matching.
#[derive(Debug)]
pub struct RequestView<'a> {
    /// Its method.
    pub method: &'a http::Method,
    /// Its path, without the query.
    pub path: &'a str,
    /// Its raw query (after `?`), if any.
    pub query: Option<&'a str>,
    /// Its headers.
    pub headers: &'a HeaderMap,
}

impl PathMatch {
    fn matches(&self, path: &str) -> bool {
        match self {
            PathMatch::Exact(exact) => path == exact,
            PathMatch::Prefix(prefix) => prefix_matches(prefix, path),
            PathMatch::Regex(re) => re.is_match(path),
        }
    }

    /// Sort key: Exact first, then regular expressions, then longer prefixes first.
    fn rank(&self) -> (u8, Reverse<usize>) {
        match self {
            PathMatch::Exact(_) => (0, Reverse(0)),
            PathMatch::Regex(_) => (1, Reverse(0)),
            PathMatch::Prefix(p) => (2, Reverse(p.trim_end_matches('/').len())),
        }
    }
}

/// Segment-wise prefix: a trailing `/` of the prefix is ignored.
fn prefix_matches(prefix: &str, path: &str) -> bool {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        return true;
    }
    path.strip_prefix(prefix).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The value of query parameter `name` in `query`, if present (the first one; no decoding
/// beyond `+` being kept as is).
fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

/// Header `name` of `headers` as a match reads it: a repeated header's values joined with `,`
/// (RFC 9110 §5.3, as Envoy matches them), bytes past ASCII read as UTF-8; None when absent.
fn joined_header(headers: &HeaderMap, name: &str) -> Option<String> {
    let values: Vec<_> = headers.get_all(name).iter().map(|v| String::from_utf8_lossy(v.as_bytes())).collect();
    (!values.is_empty()).then(|| values.join(","))
}

impl Match {
    /// Whether `request` satisfies every part of the match.
    pub fn matches(&self, request: &RequestView<'_>) -> bool {
        self.path.as_ref().is_none_or(|p| p.matches(request.path))
            && self.method.as_ref().is_none_or(|m| m == request.method)
            && self.headers.iter().all(|h| joined_header(request.headers, &h.name).is_some_and(|v| h.value.matches(&v)))
            && self.query_params.iter().all(|q| {
                request.query.and_then(|query| query_param(query, &q.name)).is_some_and(|v| q.value.matches(v))
            })
    }

    /// Sort key within and across routes (smaller first).
    fn rank(&self) -> (u8, Reverse<usize>, bool, Reverse<usize>, Reverse<usize>) {
        let (kind, len) = self.path.as_ref().map_or((2, Reverse(0)), PathMatch::rank);
        (kind, len, self.method.is_none(), Reverse(self.headers.len()), Reverse(self.query_params.len()))
    }
}

/// The rule a request selected.
#[derive(Clone, Debug)]
pub struct Selected {
    /// The route.
    pub route: Arc<Route>,
    /// Index of the rule in the route.
    pub rule: usize,
    /// Index of the match in the rule.
    pub matched: usize,
}

impl Selected {
    /// The rule.
    pub fn rule(&self) -> &Rule {
        &self.route.rules[self.rule]
    }

    /// The match that selected it.
    pub fn matched(&self) -> &Match {
        &self.rule().matches[self.matched]
    }

    /// `Kind namespace/name rule N` (or the rule's name), for access logs and explain.
    pub fn describe(&self) -> String {
        match &self.rule().name {
            Some(name) => format!("{} rule {name}", self.route.key()),
            None => format!("{} rule {}", self.route.key(), self.rule),
        }
    }
}

/// The routes of one Service port, every match in precedence order: the first that matches a
/// request selects its rule.
#[derive(Clone, Debug, Default)]
pub struct RouteTable {
    entries: Vec<Selected>,
}

impl RouteTable {
    /// The table of `service` (`namespace/name`) port `port` from `routes`, as a client of
    /// namespace `client` sees it (GAMMA's namespace boundaries, as Istio implements them):
    /// producer routes (of the Service's namespace) apply to every client; consumer routes (of
    /// another namespace) only to clients of theirs, and where a client's namespace has consumer
    /// routes on the Service port, they take its requests instead of the producer routes. So a
    /// route never reaches the clients of a namespace that did not write it or own the Service.
    /// None: a client of no known namespace, which sees the producer routes.
    pub fn new(routes: &[Arc<Route>], service: &str, port: u16, client: Option<&str>) -> Self {
        let attached = |route: &&Arc<Route>| {
            route.parents.iter().any(|p| p.service == service && p.port.is_none_or(|p| p == port))
        };
        let consumer: Vec<&Arc<Route>> = match client {
            Some(client) => {
                routes.iter().filter(attached).filter(|r| !r.is_producer_of(service) && r.namespace == client).collect()
            }
            None => Vec::new(),
        };
        let chosen = match consumer.is_empty() {
            false => consumer,
            true => routes.iter().filter(attached).filter(|r| r.is_producer_of(service)).collect(),
        };
        let mut entries: Vec<Selected> = Vec::new();
        for route in chosen {
            for (rule, r) in route.rules.iter().enumerate() {
                for matched in 0..r.matches.len() {
                    entries.push(Selected { route: route.clone(), rule, matched });
                }
            }
        }
        fn key(s: &Selected) -> (impl Ord + '_, i64, &str, &str) {
            (s.matched().rank(), s.route.created_unix, s.route.namespace.as_str(), s.route.name.as_str())
        }
        entries.sort_by(|a, b| key(a).cmp(&key(b)).then(a.rule.cmp(&b.rule)).then(a.matched.cmp(&b.matched)));
        Self { entries }
    }

    /// Whether any route is attached.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The rule `request` selects, if any.
    pub fn select(&self, request: &RequestView<'_>) -> Option<&Selected> {
        self.entries.iter().find(|e| e.matched().matches(request))
    }
}

/// The rolls that pick backends by weight: a Weyl sequence (each roll the last plus 2^32 over
/// the golden ratio), so every run of rolls is split as close to the weights as whole requests
/// allow, not merely on average: 500 requests over 70/30 send 150 ± 2 to the 30, where
/// independent random rolls would stray by ±10 (one standard deviation) and a canary's share
/// would wobble from run to run. A waypoint has one sequence: a rule that takes every request,
/// or a regularly spaced part of them (every other one, say), gets that split; a rule taking
/// an irregular part does no worse than with random rolls.
#[derive(Debug)]
pub struct Rolls(std::sync::atomic::AtomicU32);

impl Default for Rolls {
    fn default() -> Self {
        // A random start, so replicas of a waypoint do not move in step.
        Self(std::sync::atomic::AtomicU32::new(rand_start()))
    }
}

fn rand_start() -> u32 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    nanos ^ std::process::id().rotate_left(16)
}

impl Rolls {
    /// 2^32 / golden ratio.
    const STEP: u32 = 0x9E37_79B9;

    /// The next roll.
    pub fn next(&self) -> u32 {
        self.0.fetch_add(Self::STEP, std::sync::atomic::Ordering::Relaxed).wrapping_add(Self::STEP)
    }
}

impl Rule {
    /// The backend for a request, chosen by weight with `roll` (in `0..=u32::MAX`, from
    /// [`Rolls`]); None when no backend has weight.
    pub fn pick(&self, roll: u32) -> Option<&Backend> {
        let total: u64 = self.backends.iter().map(|b| u64::from(b.weight)).sum();
        if total == 0 {
            return None;
        }
        let mut point = u64::from(roll) * total / (u64::from(u32::MAX) + 1);
        for backend in &self.backends {
            if point < u64::from(backend.weight) {
                return Some(backend);
            }
            point -= u64::from(backend.weight);
        }
        None
    }
}

#[cfg(test)]
mod tests;
