//! `meshctl workloads`, `services`, `policies`, `routes`: the mesh config an agent holds (every agent
//! holds the whole mesh, so one agent answers).

use std::path::Path;

use ferrymesh_api::admin::GetConfigRequest;
use ferrymesh_api::kinds::ConfigSet;
use serde_json::json;

use super::table;
use crate::agent::{connect, AgentError};
use crate::Output;

/// What an agent holds.
pub struct Held {
    /// The mesh's trust domain.
    pub trust_domain: String,
    /// Whether it holds workload certificates.
    pub certificates: bool,
    /// Every object, by kind and key.
    pub objects: ConfigSet,
}

/// The config the agent at `agent` holds.
pub async fn dump(agent: &Path) -> Result<Held, AgentError> {
    let dump = connect(agent)
        .await?
        .get_config(GetConfigRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|s| AgentError::rpc(agent, s))?;
    Ok(Held {
        trust_domain: dump.trust_domain,
        certificates: dump.certificates,
        objects: ConfigSet::from_update(dump.objects.unwrap_or_default()),
    })
}

fn labels(map: &std::collections::HashMap<String, String>) -> String {
    let mut pairs: Vec<String> = map.iter().map(|(k, v)| format!("{k}={v}")).collect();
    pairs.sort();
    pairs.join(",")
}

/// Prints the workloads.
/// The SPIFFE ID of `w` in trust domain `td`, or why it has none.
fn identity(td: &str, w: &ferrymesh_api::config::Workload) -> String {
    match ferrymesh_spiffe::SpiffeId::new(td, &w.namespace, &w.service_account) {
        Ok(id) => id.into(),
        Err(e) => format!("(none: {e})"),
    }
}

pub async fn workloads(agent: &Path, output: Output) -> Result<(), String> {
    let config = dump(agent).await?;
    let td = &config.trust_domain;
    match output {
        Output::Json => {
            let all: Vec<_> = config
                .objects
                .workloads
                .values()
                .map(|w| {
                    json!({
                        "namespace": w.namespace, "name": w.name, "uid": w.uid, "node": w.node, "ip": w.ip,
                        "identity": identity(td, w),
                        "captured": w.captured, "labels": w.labels,
                    })
                })
                .collect();
            println!("{}", json!(all));
        }
        _ => {
            let rows: Vec<[String; 6]> = config
                .objects
                .workloads
                .values()
                .map(|w| {
                    [
                        format!("{}/{}", w.namespace, w.name),
                        w.node.clone(),
                        w.ip.clone(),
                        if w.captured { "mesh".into() } else { "-".into() },
                        identity(td, w),
                        labels(&w.labels),
                    ]
                })
                .collect();
            table::print(&["POD", "NODE", "IP", "CAPTURED", "IDENTITY", "LABELS"], &rows);
        }
    }
    Ok(())
}

/// A Service's waypoint as the table shows it: its name, and whether it has a ready pod.
fn waypoint(
    s: &ferrymesh_api::config::Service,
    waypoints: &std::collections::BTreeMap<String, ferrymesh_api::config::Waypoint>,
) -> String {
    match (s.waypoint.as_str(), waypoints.get(&s.waypoint)) {
        ("", _) => "-".into(),
        (name, None) => format!("{name} (no such waypoint)"),
        (name, Some(w)) if w.addresses.is_empty() => format!("{name} (no ready pod)"),
        (name, Some(_)) => name.to_string(),
    }
}

/// Prints the services.
pub async fn services(agent: &Path, output: Output) -> Result<(), String> {
    let config = dump(agent).await?;
    match output {
        Output::Json => {
            let all: Vec<_> = config
                .objects.services
                .values()
                .map(|s| {
                    json!({
                        "namespace": s.namespace, "name": s.name, "vip": s.vip, "waypoint": s.waypoint,
                        "ports": s.ports.iter().map(|p| p.port).collect::<Vec<_>>(),
                        "endpoints": s.endpoints.iter().map(|e| json!({
                            "ip": e.ip, "ready": e.ready, "workload_uid": e.workload_uid, "target_ports": e.target_ports,
                        })).collect::<Vec<_>>(),
                    })
                })
                .collect();
            println!("{}", json!(all));
        }
        _ => {
            let rows: Vec<[String; 5]> = config
                .objects
                .services
                .values()
                .map(|s| {
                    let ports: Vec<String> = s.ports.iter().map(|p| p.port.to_string()).collect();
                    let endpoints: Vec<String> = s
                        .endpoints
                        .iter()
                        .map(|e| if e.ready { e.ip.clone() } else { format!("{} (not ready)", e.ip) })
                        .collect();
                    [
                        format!("{}/{}", s.namespace, s.name),
                        if s.vip.is_empty() { "None (headless)".into() } else { s.vip.clone() },
                        ports.join(","),
                        waypoint(s, &config.objects.waypoints),
                        endpoints.join(", "),
                    ]
                })
                .collect();
            table::print(&["SERVICE", "VIP", "PORTS", "WAYPOINT", "ENDPOINTS"], &rows);
        }
    }
    Ok(())
}

/// Prints the policies.
pub async fn policies(agent: &Path, output: Output) -> Result<(), String> {
    let config = dump(agent).await?;
    let action = |a: i32| if a == 1 { "DENY" } else { "ALLOW" };
    let mode = |m: i32| ["UNSET", "PERMISSIVE", "STRICT", "DISABLE"].get(m as usize).copied().unwrap_or("?");
    let selector = |has: bool, s: &std::collections::HashMap<String, String>| {
        if has {
            labels(s)
        } else {
            "(all workloads)".to_string()
        }
    };
    match output {
        Output::Json => {
            let authz: Vec<_> = config
                .objects.authorization_policies
                .values()
                .map(|p| json!({"kind": "AuthorizationPolicy", "namespace": p.namespace, "name": p.name, "action": action(p.action), "selector": p.selector, "rules": p.rules.len()}))
                .collect();
            let peer: Vec<_> = config
                .objects.peer_authentications
                .values()
                .map(|p| json!({"kind": "PeerAuthentication", "namespace": p.namespace, "name": p.name, "mode": mode(p.mode), "selector": p.selector}))
                .collect();
            println!("{}", json!(authz.into_iter().chain(peer).collect::<Vec<_>>()));
        }
        _ => {
            let mut rows: Vec<[String; 4]> = config
                .objects
                .authorization_policies
                .values()
                .map(|p| {
                    [
                        format!("AuthorizationPolicy {}/{}", p.namespace, p.name),
                        action(p.action).into(),
                        selector(p.has_selector, &p.selector),
                        format!("{} rules", p.rules.len()),
                    ]
                })
                .collect();
            rows.extend(config.objects.peer_authentications.values().map(|p| {
                [
                    format!("PeerAuthentication {}/{}", p.namespace, p.name),
                    format!("mTLS {}", mode(p.mode)),
                    selector(p.has_selector, &p.selector),
                    String::new(),
                ]
            }));
            table::print(&["POLICY", "ACTION", "SELECTOR", "RULES"], &rows);
        }
    }
    Ok(())
}

/// What a rule does, in a few words: its matches, filters and weighted backends.
fn rule_summary(rule: &ferrymesh_route::Rule) -> String {
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
    text
}

/// Prints the routes.
pub async fn routes(agent: &Path, output: Output) -> Result<(), String> {
    let config = dump(agent).await?;
    let routes = config
        .objects
        .routes
        .into_values()
        .map(ferrymesh_route::Route::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the agent holds a route that does not convert: {e}"))?;
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
                        rule_summary(rule),
                    ]);
                }
            }
            table::print(&["ROUTE", "SERVICES", "RULE", "MATCHES / FILTERS -> BACKENDS"], &rows);
        }
    }
    Ok(())
}
