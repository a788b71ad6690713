//! `meshctl workloads`, `services`, `policies`: the mesh config an agent holds. Every agent holds
//! every Service, policy and route, and every workload, but only its own node's in full: another
//! node's pods it holds as peers, without labels or netns ([`dump_all`] joins what several
//! agents hold).

use std::path::Path;

use ferrymesh_api::admin::GetConfigRequest;
use ferrymesh_api::kinds::ConfigSet;
use ferrymesh_route::destination::{DestinationRule, DestinationRules};
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
    /// The nodes whose workloads it holds in full (the agents asked).
    pub nodes: Vec<String>,
}

impl Held {
    /// Whether it holds the workloads of `node` in full (labels included), not as peers.
    pub fn holds_in_full(&self, node: &str) -> bool {
        self.nodes.iter().any(|n| n == node)
    }
}

/// What the agents at `agents` hold, joined: the first one's config, with each node's workloads
/// as that node's agent holds them (in full) where it is among them.
pub async fn dump_all(agents: &[std::path::PathBuf]) -> Result<Held, AgentError> {
    let mut held: Option<Held> = None;
    for agent in agents {
        let next = dump(agent).await?;
        match &mut held {
            None => held = Some(next),
            Some(held) => {
                let node = next.nodes.first().cloned().unwrap_or_default();
                for (uid, w) in next.objects.workloads.into_iter().filter(|(_, w)| w.node == node) {
                    held.objects.workloads.insert(uid, w);
                }
                held.nodes.push(node);
            }
        }
    }
    held.ok_or_else(|| AgentError::Dir { path: "--agent".into(), reason: "no agent to ask".into() })
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
        nodes: vec![dump.node],
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
    let rules = config
        .objects
        .destination_rules
        .values()
        .cloned()
        .map(|r| DestinationRule::try_from(r).map(std::sync::Arc::new))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("the agent holds a rule that does not convert: {e}"))?;
    let rules = DestinationRules::new(rules);
    // The rule the Service's own clients get (a client namespace's own rule may differ).
    let rule_of = |s: &ferrymesh_api::config::Service| {
        rules.of(&format!("{}/{}", s.namespace, s.name), None, ferrymesh_policy::ROOT_NAMESPACE).map(|r| r.summary())
    };
    match output {
        Output::Json => {
            let all: Vec<_> = config
                .objects.services
                .values()
                .map(|s| {
                    json!({
                        "namespace": s.namespace, "name": s.name, "vip": s.vip, "other_vips": s.other_vips,
                        "waypoint": s.waypoint,
                        "destination_rule": rule_of(s),
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
            let rows: Vec<[String; 6]> = config
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
                        if s.vip.is_empty() {
                            "None (headless)".into()
                        } else {
                            std::iter::once(&s.vip).chain(&s.other_vips).cloned().collect::<Vec<_>>().join(", ")
                        },
                        ports.join(","),
                        waypoint(s, &config.objects.waypoints),
                        endpoints.join(", "),
                        rule_of(s).unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            table::print(&["SERVICE", "VIP", "PORTS", "WAYPOINT", "ENDPOINTS", "DESTINATION RULE"], &rows);
        }
    }
    Ok(())
}

/// `targetRefs` as `Kind name`.
fn targets(refs: &[ferrymesh_api::config::TargetRef]) -> Vec<String> {
    refs.iter().map(|t| format!("{} {}", t.kind, t.name)).collect()
}

/// The issuers of a RequestAuthentication, each with where its keys are.
fn issuers(p: &ferrymesh_api::config::RequestAuthentication) -> Vec<String> {
    p.jwt_rules
        .iter()
        .map(|r| match r.jwks_uri.as_str() {
            "" => format!("{} (inline jwks)", r.issuer),
            uri => format!("{} ({uri})", r.issuer),
        })
        .collect()
}

/// Prints the policies (AuthorizationPolicy, PeerAuthentication, RequestAuthentication).
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
            let authn: Vec<_> = config
                .objects
                .request_authentications
                .values()
                .map(|p| json!({"kind": "RequestAuthentication", "namespace": p.namespace, "name": p.name, "target_refs": targets(&p.target_refs), "issuers": issuers(p)}))
                .collect();
            println!("{}", json!(authz.into_iter().chain(peer).chain(authn).collect::<Vec<_>>()));
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
            rows.extend(config.objects.request_authentications.values().map(|p| {
                [
                    format!("RequestAuthentication {}/{}", p.namespace, p.name),
                    "JWT".into(),
                    targets(&p.target_refs).join(", "),
                    format!("issuers {}", issuers(p).join(", ")),
                ]
            }));
            table::print(&["POLICY", "ACTION", "SELECTOR/TARGETS", "RULES"], &rows);
        }
    }
    Ok(())
}
