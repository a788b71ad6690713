//! `meshctl explain SRC NAMESPACE/SERVICE:PORT`: a request to a Service followed hop by hop,
//! with the code each hop decides with. Without a waypoint: the client's agent picks a ready
//! endpoint, and each endpoint's agent decides as `PolicySet::explain` says. With one: the
//! waypoint (or the refusal when it has no ready address), the RequestAuthentications attached
//! (with `--jwt-claims`, the token's principal and claims), the AuthorizationPolicies attached
//! to the Service or the waypoint (`PolicySet::explain_request`), the rule the request takes
//! (`RouteTable`) and its backends, and each backend endpoint's agent deciding the waypoint's
//! connection.

use std::sync::Arc;

use ferrymesh_api::config::{Service, Workload};
use ferrymesh_policy::authn::{RequestAuth, RequestAuthentication, RequestAuthentications};
use ferrymesh_policy::l7::{HttpRequest, Target};
use ferrymesh_policy::{PolicySet, Request, Transport};
use ferrymesh_route::{BackendRef, Route, RouteTable};
use ferrymesh_spiffe::SpiffeId;
use serde_json::{json, Value};

use super::config::Held;
use super::explain::{policy_set, ExplainArgs};
use super::routes::{rule_summary, RequestArgs};
use crate::Output;

/// The L4 decision of `endpoint`'s agent for a connection from `source` (an identity when the
/// connection is mTLS), as JSON; "unknown" when that agent was not asked (only it holds the
/// pod's labels).
fn endpoint_verdict(
    held: &Held,
    policies: &PolicySet,
    endpoint: &Workload,
    port: u32,
    source_ip: std::net::IpAddr,
    source: Option<&SpiffeId>,
) -> Value {
    if endpoint.captured && !held.holds_in_full(&endpoint.node) {
        return json!({
            "pod": format!("{}/{}", endpoint.namespace, endpoint.name),
            "address": format!("{}:{port}", endpoint.ip),
            "verdict": "unknown", "policy": "",
            "reason": format!("decided by {}'s agent, which was not asked", endpoint.node),
            "hint": "ask it too: --agent with its socket, or --agents-dir",
        });
    }
    let labels = endpoint.labels.clone().into_iter().collect();
    let workload = ferrymesh_policy::Workload { namespace: &endpoint.namespace, labels: &labels };
    let request = Request {
        source_ip,
        source,
        destination_ip: endpoint.ip.parse().unwrap_or(source_ip),
        destination_port: u16::try_from(port).unwrap_or(0),
    };
    let transport = if endpoint.captured && source.is_some() { Transport::Mtls } else { Transport::Plaintext };
    let verdict = if endpoint.captured {
        policies.decide(&workload, &request, transport)
    } else {
        ferrymesh_policy::Verdict { allowed: true, policy: String::new(), reason: String::new(), hint: String::new() }
    };
    json!({
        "pod": format!("{}/{}", endpoint.namespace, endpoint.name),
        "address": format!("{}:{port}", endpoint.ip),
        "verdict": if verdict.allowed { "allowed" } else { "denied" },
        "policy": verdict.policy, "reason": verdict.reason, "hint": verdict.hint,
    })
}

/// The issuer and the `request.auth.*` of a verified token with `claims` (JSON): its principal
/// `iss/sub`, audiences, presenter and claims.
fn request_auth(claims: &str) -> Result<(String, RequestAuth), String> {
    let claims: serde_json::Map<String, Value> =
        serde_json::from_str(claims).map_err(|e| format!("--jwt-claims: not a JSON object: {e}"))?;
    let issuer = claims.get("iss").and_then(Value::as_str).ok_or("--jwt-claims: a token names its issuer (iss)")?;
    let issuer = issuer.to_string();
    let auth = RequestAuth::from_claims(&issuer, claims);
    Ok((issuer, auth))
}

/// The ready endpoints of `service` for `port`, with the pod port they take it on.
fn ready_endpoints<'a>(held: &'a Held, service: &'a Service, port: u16) -> Vec<(&'a Workload, u32)> {
    service
        .endpoints
        .iter()
        .filter(|e| e.ready)
        .filter_map(|e| {
            let target = *e.target_ports.get(&u32::from(port))?;
            Some((held.objects.workloads.get(&e.workload_uid)?, target))
        })
        .collect()
}

/// Explains a request from `src` to Service `key` port `port`.
pub fn run(held: &Held, src: &Workload, key: &str, port: u16, args: &ExplainArgs) -> Result<(), String> {
    let service = &held.objects.services[key];
    if !service.ports.iter().any(|p| p.port == u32::from(port)) {
        let ports: Vec<String> = service.ports.iter().map(|p| p.port.to_string()).collect();
        return Err(format!("Service {key} has no port {port} (its ports: {})", ports.join(", ")));
    }
    let policies = policy_set(held)?;
    let td = &held.trust_domain;
    let src_id = SpiffeId::new(td, &src.namespace, &src.service_account)
        .map_err(|e| format!("pod {}/{} has no valid identity: {e}", src.namespace, src.name))?;
    let src_ip = src.ip.parse().map_err(|_| format!("pod {}/{} has no valid IP", src.namespace, src.name))?;
    let mut out = json!({
        "src": format!("{}/{}", src.namespace, src.name),
        "service": key, "port": port, "vip": service.vip,
    });
    let authenticated = src.captured && held.certificates;
    if service.waypoint.is_empty() {
        out["waypoint"] = Value::Null;
        let endpoints: Vec<Value> = ready_endpoints(held, service, port)
            .into_iter()
            .map(|(w, target)| endpoint_verdict(held, &policies, w, target, src_ip, authenticated.then_some(&src_id)))
            .collect();
        out["endpoints"] = json!(endpoints);
        return print(&out, args.output);
    }
    let waypoint = held.objects.waypoints.get(&service.waypoint).filter(|w| !w.addresses.is_empty());
    let Some(waypoint) = waypoint else {
        out["waypoint"] = json!({"name": service.waypoint, "ready": false});
        return print(&out, args.output);
    };
    let waypoint_id = SpiffeId::new(td, &waypoint.namespace, &waypoint.name)
        .map_err(|e| format!("waypoint {} has no valid identity: {e}", service.waypoint))?;
    out["waypoint"] = json!({
        "name": service.waypoint, "ready": true, "addresses": waypoint.addresses, "identity": waypoint_id.as_str(),
    });

    let request = RequestArgs::parse(&args.method, &args.path, &args.headers)?;
    let host = request.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or(&service.vip);
    let target = Target {
        namespace: &service.namespace,
        service: Some(&service.name),
        gateway: (&waypoint.namespace, &waypoint.name),
    };
    let vip = service.vip.parse().unwrap_or(src_ip);
    let token = match &args.jwt_claims {
        None => None,
        Some(text) => Some(request_auth(text)?),
    };
    let authentications = held
        .objects
        .request_authentications
        .values()
        .cloned()
        .map(RequestAuthentication::try_from)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| e.to_string())?;
    let attached = RequestAuthentications::new(authentications);
    let attached = attached.attached(&target);
    // Without a RequestAuthentication attached the waypoint reads no token: the request has no
    // principal whatever it carries.
    let auth = token.as_ref().filter(|_| !attached.is_empty()).map(|(_, auth)| auth.clone());
    out["authentication"] = json!({
        "request_authentications": attached.iter().map(|p| p.key()).collect::<Vec<_>>(),
        "issuers": attached.iter().flat_map(|p| p.rules.iter().map(|r| r.issuer.clone())).collect::<Vec<_>>(),
        "request_principal": auth.as_ref().map(|a| a.principal.clone()),
    });
    if let (Some((issuer, _)), false) = (&token, attached.is_empty()) {
        if !attached.iter().any(|p| p.rules.iter().any(|r| r.issuer == *issuer)) {
            out["authentication"]["refused"] = json!(format!(
                "401: Jwt issuer is not configured (no RequestAuthentication attached to {}/{} accepts {issuer:?})",
                service.namespace, service.name
            ));
            return print(&out, args.output);
        }
    }
    let http_request = HttpRequest {
        l4: Request {
            source_ip: src_ip,
            source: authenticated.then_some(&src_id),
            destination_ip: vip,
            destination_port: port,
        },
        host,
        method: request.method.as_str(),
        path: &request.path,
        headers: &request.headers,
        auth: auth.as_ref(),
    };
    let (decision, steps) = policies.explain_request(&target, &http_request);
    out["request"] = json!(format!("{} {}", request.method, args.path));
    out["waypoint_policy"] = json!({
        "verdict": if decision.allowed { "allowed" } else { "denied" }, "policy": decision.policy, "hint": decision.hint,
        "steps": steps.iter().map(|s| json!({"what": s.what, "outcome": s.outcome})).collect::<Vec<_>>(),
    });
    if !decision.allowed {
        return print(&out, args.output);
    }

    let routes: Vec<Arc<Route>> = held
        .objects
        .routes
        .values()
        .cloned()
        .map(|r| Route::try_from(r).map(Arc::new))
        .collect::<Result<_, _>>()
        .map_err(|e| format!("the agent holds a route that does not convert: {e}"))?;
    let table = RouteTable::new(&routes, key, port, Some(src_id.namespace()));
    let backends: Vec<(BackendRef, u32)> = match table.select(&request.view()) {
        None if table.is_empty() => {
            out["route"] = json!({"rule": null, "does": "no route is attached: the Service itself"});
            vec![(BackendRef { service: key.to_string(), port }, 1)]
        }
        None => {
            out["route"] = json!({"rule": null, "does": "no rule matches: the waypoint answers 404"});
            return print(&out, args.output);
        }
        Some(selected) => {
            out["route"] = json!({"rule": selected.describe(), "does": rule_summary(selected.rule())});
            selected.rule().backends.iter().map(|b| (b.target.clone(), b.weight)).collect()
        }
    };
    let waypoint_ip = waypoint.addresses[0].parse().unwrap_or(src_ip);
    let backends: Vec<Value> = backends
        .into_iter()
        .map(|(backend, weight)| {
            let endpoints: Vec<Value> = match held.objects.services.get(&backend.service) {
                Some(s) => ready_endpoints(held, s, backend.port)
                    .into_iter()
                    .map(|(w, target)| endpoint_verdict(held, &policies, w, target, waypoint_ip, Some(&waypoint_id)))
                    .collect(),
                None => Vec::new(),
            };
            json!({"service": backend.service, "port": backend.port, "weight": weight, "endpoints": endpoints})
        })
        .collect();
    out["backends"] = json!(backends);
    print(&out, args.output)
}

/// Prints the explanation as JSON, or as lines for people.
fn print(out: &Value, output: Output) -> Result<(), String> {
    if output == Output::Json {
        println!("{out}");
        return Ok(());
    }
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    println!("from:     {}", text(&out["src"]));
    println!("to:       Service {}:{} ({})", text(&out["service"]), out["port"], text(&out["vip"]));
    let endpoint_line = |e: &Value| {
        let verdict = match (e["verdict"].as_str(), text(&e["policy"]).is_empty()) {
            (Some("allowed"), true) => "ALLOWED".to_string(),
            (Some("allowed"), false) => format!("ALLOWED by {}", text(&e["policy"])),
            (Some("unknown"), _) => format!("not known here: {}; {}", text(&e["reason"]), text(&e["hint"])),
            _ => format!("DENIED ({}); to fix: {}", text(&e["reason"]), text(&e["hint"])),
        };
        format!("{} at {}: {verdict}", text(&e["pod"]), text(&e["address"]))
    };
    match &out["waypoint"] {
        Value::Null => {
            println!("waypoint: none: the client's agent picks a ready endpoint (power of two choices)");
            for e in out["endpoints"].as_array().into_iter().flatten() {
                println!("endpoint: {}", endpoint_line(e));
            }
            return Ok(());
        }
        w if w["ready"] == false => {
            println!(
                "waypoint: {} has no ready address: the client's agent refuses the connection (fail closed)",
                text(&w["name"])
            );
            println!("to fix:   deploy the waypoint, or label the Service ferrymesh.io/use-waypoint=none");
            return Ok(());
        }
        w => println!(
            "waypoint: {} at {}: the client's agent carries the connection over HBONE; the waypoint proves {}",
            text(&w["name"]),
            w["addresses"].as_array().into_iter().flatten().map(text).collect::<Vec<_>>().join(", "),
            text(&w["identity"])
        ),
    }
    let authn = &out["authentication"];
    let attached: Vec<String> = authn["request_authentications"].as_array().into_iter().flatten().map(text).collect();
    match (attached.is_empty(), authn["request_principal"].as_str()) {
        (true, _) => println!("jwt:      no RequestAuthentication is attached: tokens are not read (no principal)"),
        (false, Some(principal)) => println!(
            "jwt:      RequestAuthentication {} (issuers {}); the token's principal is {principal}",
            attached.join(", "),
            authn["issuers"].as_array().into_iter().flatten().map(text).collect::<Vec<_>>().join(", ")
        ),
        (false, None) => println!(
            "jwt:      RequestAuthentication {}: a request without a token passes unauthenticated (give --jwt-claims for one with a token)",
            attached.join(", ")
        ),
    }
    if let Some(refused) = authn["refused"].as_str() {
        println!("verdict:  {refused}");
        return Ok(());
    }
    let policy = &out["waypoint_policy"];
    println!("request:  {}", text(&out["request"]));
    println!("policy at the waypoint (in evaluation order):");
    for (i, s) in policy["steps"].as_array().into_iter().flatten().enumerate() {
        println!("  {}. {}: {}", i + 1, text(&s["what"]), text(&s["outcome"]));
    }
    if policy["verdict"] == "denied" {
        println!("verdict:  DENIED, 403 ({})", text(&policy["policy"]));
        println!("to fix:   {}", text(&policy["hint"]));
        return Ok(());
    }
    let route = &out["route"];
    match route["rule"].as_str() {
        Some(rule) => println!("route:    {rule}: {}", text(&route["does"])),
        None => println!("route:    {}", text(&route["does"])),
    }
    for b in out["backends"].as_array().into_iter().flatten() {
        println!("backend:  {}:{} weight {}", text(&b["service"]), b["port"], b["weight"]);
        for e in b["endpoints"].as_array().into_iter().flatten() {
            println!("  endpoint (from the waypoint): {}", endpoint_line(e));
        }
    }
    Ok(())
}
