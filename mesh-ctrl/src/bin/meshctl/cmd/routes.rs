//! `meshctl routes`: the Gateway API routes the agent holds, rule by rule, with the rate
//! limits and faults TrafficPolicies give them; with `--to`, which rule a request to a Service
//! port takes, where it may go and what limits and fault it gets, decided by the `RouteTable`
//! and `TrafficPolicies` a waypoint uses.

use std::path::Path;
use std::sync::Arc;

use clap::Args;
use ferrymesh_route::traffic::{AbortStatus, TrafficPolicies, TrafficPolicy};
use ferrymesh_route::{Route, RouteTable};
use serde_json::json;

use super::config::dump;
use super::table;
use crate::Output;

/// `meshctl routes` arguments.
#[derive(Debug, Args)]
pub struct RoutesArgs {
    /// Output format.
    #[arg(short, long, value_enum, default_value_t = Output::Table)]
    pub output: Output,
    /// Show which rule a request to NAMESPACE/SERVICE:PORT takes (with --path, --method, --header).
    #[arg(long, value_name = "NAMESPACE/SERVICE:PORT")]
    pub to: Option<String>,
    /// The request's path, with its query if any (with --to).
    #[arg(long, default_value = "/")]
    pub path: String,
    /// The request's method (with --to).
    #[arg(long, default_value = "GET")]
    pub method: String,
    /// A request header, NAME:VALUE (with --to; repeatable).
    #[arg(long = "header", value_name = "NAME:VALUE")]
    pub headers: Vec<String>,
    /// The client's namespace (with --to): routes of another namespace than the Service's apply
    /// only to clients of theirs (GAMMA consumer routes). Default: the Service's own routes.
    #[arg(long, value_name = "NAMESPACE")]
    pub from_namespace: Option<String>,
}

/// A request as meshctl's options describe it (`--method`, `--path` with its query, `--header`).
pub struct RequestArgs {
    /// Method.
    pub method: http::Method,
    /// Path, without the query.
    pub path: String,
    /// Query, if any.
    pub query: Option<String>,
    /// Headers.
    pub headers: http::HeaderMap,
}

impl RequestArgs {
    /// Parses the options, each error naming its option.
    pub fn parse(method: &str, path: &str, headers: &[String]) -> Result<Self, String> {
        let method = http::Method::from_bytes(method.as_bytes())
            .map_err(|_| format!("--method {method:?} is not an HTTP method"))?;
        let mut map = http::HeaderMap::new();
        for h in headers {
            let (name, value) = h.split_once(':').ok_or_else(|| format!("--header {h:?}: expected NAME:VALUE"))?;
            let name = http::header::HeaderName::from_bytes(name.trim().as_bytes())
                .map_err(|_| format!("--header {h:?}: {name:?} is not a header name"))?;
            let value = http::HeaderValue::from_str(value.trim()).map_err(|_| format!("--header {h:?}: bad value"))?;
            map.append(name, value);
        }
        let (path, query) = match path.split_once('?') {
            Some((p, q)) => (p.to_string(), Some(q.to_string())),
            None => (path.to_string(), None),
        };
        Ok(Self { method, path, query, headers: map })
    }

    /// The request as route matching sees it.
    pub fn view(&self) -> ferrymesh_route::RequestView<'_> {
        ferrymesh_route::RequestView {
            method: &self.method,
            path: &self.path,
            query: self.query.as_deref(),
            headers: &self.headers,
        }
    }
}

/// What TrafficPolicies do to a request to `service` taken by `taken` (its rate limits and
/// fault), in a few words, naming the policies.
fn traffic_summary(traffic: &TrafficPolicies, service: &str, taken: Option<(&Route, usize)>) -> Option<String> {
    let limits = traffic.rate_limit(service, taken).map(|applied| {
        let (local, global) = (&applied.feature.local, &applied.feature.global);
        let each: Vec<String> =
            local.iter().map(ToString::to_string).chain(global.iter().map(ToString::to_string)).collect();
        format!("rate limit {} (TrafficPolicy {})", each.join(", "), applied.policy.key())
    });
    let fault = fault_words(traffic, service, taken);
    match (limits, fault) {
        (Some(l), Some(f)) => Some(format!("{l}; {f}")),
        (l, f) => l.or(f),
    }
}

/// The fault a request to `service` taken by `taken` gets, in a few words, naming its policy.
fn fault_words(traffic: &TrafficPolicies, service: &str, taken: Option<(&Route, usize)>) -> Option<String> {
    let applied = traffic.fault(service, taken)?;
    let mut parts = Vec::new();
    if let Some(d) = &applied.feature.delay {
        parts.push(format!("delay {}ms {}%", d.fixed.as_millis(), d.share.as_percent()));
    }
    if let Some(a) = &applied.feature.abort {
        let status = match a.status {
            AbortStatus::Http(code) => code.to_string(),
            AbortStatus::Grpc(code) => format!("gRPC {}", code.name()),
        };
        parts.push(format!("abort {status} {}%", a.share.as_percent()));
    }
    Some(format!("fault {} (TrafficPolicy {})", parts.join(", "), applied.policy.key()))
}

/// The rule `args` describe a request to `to` taking, printed.
fn select(routes: &[Route], traffic: &TrafficPolicies, to: &str, args: &RoutesArgs) -> Result<(), String> {
    let (service, port) = to
        .rsplit_once(':')
        .and_then(|(s, p)| Some((s, p.parse::<u16>().ok().filter(|p| *p > 0)?)))
        .filter(|(s, _)| s.contains('/'))
        .ok_or_else(|| format!("--to {to:?}: expected NAMESPACE/SERVICE:PORT"))?;
    let parsed = RequestArgs::parse(&args.method, &args.path, &args.headers)?;
    let shared: Vec<Arc<Route>> = routes.iter().cloned().map(Arc::new).collect();
    let table = RouteTable::new(&shared, service, port, args.from_namespace.as_deref());
    let selected = table.select(&parsed.view());
    let traffic = traffic_summary(traffic, service, selected.map(|s| (&*s.route, s.rule)));
    let total = |rule: &ferrymesh_route::Rule| rule.backends.iter().map(|b| u64::from(b.weight)).sum::<u64>();
    match args.output {
        Output::Json => {
            let value = match selected {
                None => json!({"to": to, "attached": !table.is_empty(), "rule": null, "traffic": traffic}),
                Some(s) => json!({
                    "to": to, "attached": true, "rule": s.describe(), "summary": rule_summary(s.rule()), "traffic": traffic,
                    "backends": s.rule().backends.iter().map(|b| json!({
                        "service": b.target.service, "port": b.target.port, "weight": b.weight,
                        "share": if total(s.rule()) == 0 { 0.0 } else { f64::from(b.weight) / total(s.rule()) as f64 },
                    })).collect::<Vec<_>>(),
                }),
            };
            println!("{value}");
        }
        _ => {
            match selected {
                None if table.is_empty() => {
                    println!("no route is attached to {to}: a waypoint sends the request to the Service itself")
                }
                None => println!("no rule of the routes attached to {to} matches: a waypoint answers 404"),
                Some(s) => {
                    println!("rule:    {}", s.describe());
                    println!("does:    {}", rule_summary(s.rule()));
                    for b in &s.rule().backends {
                        let share = if total(s.rule()) == 0 {
                            0.0
                        } else {
                            100.0 * f64::from(b.weight) / total(s.rule()) as f64
                        };
                        println!("backend: {}:{} weight {} ({share:.0}%)", b.target.service, b.target.port, b.weight);
                    }
                }
            }
            // A Service's policies apply even where no rule matched (a 404 is neither limited
            // nor faulted).
            if let (Some(traffic), false) = (&traffic, selected.is_none() && !table.is_empty()) {
                println!("traffic: {traffic}");
            }
        }
    }
    Ok(())
}

/// What a rule does, in a few words: its matches, filters, weighted backends, and the timeouts
/// and retry it sets.
pub fn rule_summary(rule: &ferrymesh_route::Rule) -> String {
    use ferrymesh_route::{Filter, PathMatch};
    let matches: Vec<String> = rule
        .matches
        .iter()
        .map(|m| {
            let mut parts = Vec::new();
            if let Some(method) = &m.method {
                parts.push(method.to_string());
            }
            match &m.path {
                Some(PathMatch::Exact(p)) => parts.push(format!("path={p}")),
                Some(PathMatch::Prefix(p)) => parts.push(format!("path={p}*")),
                Some(PathMatch::Regex(re)) => parts.push(format!("path~{}", ferrymesh_route::pattern_of(re))),
                None => {}
            }
            parts.extend(m.headers.iter().map(|h| format!("header {}", h.name)));
            parts.extend(m.query_params.iter().map(|q| format!("query {}", q.name)));
            if parts.is_empty() {
                "*".to_string()
            } else {
                parts.join(" ")
            }
        })
        .collect();
    let filters: Vec<&str> = rule
        .filters
        .iter()
        .map(|f| match f {
            Filter::RequestHeaders(_) => "request headers",
            Filter::ResponseHeaders(_) => "response headers",
            Filter::Redirect(_) => "redirect",
            Filter::Rewrite(_) => "rewrite",
            Filter::Mirror(_) => "mirror",
        })
        .collect();
    let backends: Vec<String> =
        rule.backends.iter().map(|b| format!("{}:{} w{}", b.target.service, b.target.port, b.weight)).collect();
    let mut text = format!("[{}]", matches.join(" | "));
    if !filters.is_empty() {
        text.push_str(&format!(" {}", filters.join(", ")));
    }
    if !backends.is_empty() {
        text.push_str(&format!(" -> {}", backends.join(", ")));
    }
    // Limits the rule sets itself (the mesh's default retry otherwise).
    let mut limits = Vec::new();
    if let Some(t) = rule.timeouts.request {
        limits.push(format!("timeout {}ms", t.as_millis()));
    }
    if let Some(t) = rule.timeouts.backend_request {
        limits.push(format!("per-try timeout {}ms", t.as_millis()));
    }
    if let Some(r) = &rule.retry {
        let codes: Vec<String> = r.codes.iter().map(ToString::to_string).collect();
        limits.push(format!("retry {} x{} after {}ms", codes.join("/"), r.attempts, r.backoff.as_millis()));
    }
    if !limits.is_empty() {
        text.push_str(&format!("; {}", limits.join(", ")));
    }
    text
}

/// Prints the routes, or which rule a request would take.
pub async fn run(agent: &Path, args: RoutesArgs) -> Result<(), String> {
    let config = dump(agent).await?;
    let routes = config
        .objects
        .routes
        .into_values()
        .map(ferrymesh_route::Route::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the agent holds a route that does not convert: {e}"))?;
    let traffic = config
        .objects
        .traffic_policies
        .into_values()
        .map(|p| TrafficPolicy::try_from(p).map(Arc::new))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the agent holds a policy that does not convert: {e}"))?;
    let traffic = TrafficPolicies::new(traffic);
    if let Some(to) = &args.to {
        return select(&routes, &traffic, to, &args);
    }
    // What a rule's requests get from TrafficPolicies, as those to the route's first Service.
    let rule_traffic = |r: &Route, i: usize| {
        let service = r.parents.first().map(|p| p.service.as_str()).unwrap_or_default();
        traffic_summary(&traffic, service, Some((r, i)))
    };
    let output = args.output;
    let parents = |r: &ferrymesh_route::Route| {
        let list: Vec<String> = r
            .parents
            .iter()
            .map(|p| match p.port {
                Some(port) => format!("{}:{port}", p.service),
                None => p.service.clone(),
            })
            .collect();
        list.join(",")
    };
    match output {
        Output::Json => {
            let all: Vec<_> = routes
                .iter()
                .map(|r| {
                    json!({
                        "kind": r.kind.as_str(), "namespace": r.namespace, "name": r.name, "parents": parents(r),
                        "rules": r.rules.iter().enumerate().map(|(i, rule)| json!({
                            "name": rule.name.clone().unwrap_or_else(|| i.to_string()), "summary": rule_summary(rule),
                            "traffic": rule_traffic(r, i),
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            println!("{}", json!(all));
        }
        _ => {
            let mut rows: Vec<[String; 4]> = Vec::new();
            for r in &routes {
                for (i, rule) in r.rules.iter().enumerate() {
                    rows.push([
                        format!("{} {}/{}", r.kind.as_str(), r.namespace, r.name),
                        parents(r),
                        rule.name.clone().unwrap_or_else(|| i.to_string()),
                        match rule_traffic(r, i) {
                            Some(fault) => format!("{}; {fault}", rule_summary(rule)),
                            None => rule_summary(rule),
                        },
                    ]);
                }
            }
            table::print(&["ROUTE", "SERVICES", "RULE", "MATCHES / FILTERS -> BACKENDS"], &rows);
        }
    }
    Ok(())
}
