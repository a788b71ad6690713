//! Status written back to the Gateway API objects the mesh implements (Kubernetes mode), so
//! `kubectl get httproute -o yaml` says whether the mesh took a route, and if not, why:
//!
//! - each mesh route (`HTTPRoute`, `GRPCRoute`) gets one `status.parents` entry per Service it
//!   names in `parentRefs`, under controller [`CONTROLLER_NAME`], with `Accepted` (the route
//!   translated, its Service exists with the port it names and, when the Service's waypoint is of
//!   another namespace, that waypoint allows it; a route of another namespace than its Service's
//!   is accepted as a consumer route and says so) and `ResolvedRefs` (every backend is a Service
//!   that exists, with its port, of the route's namespace or opened to it by a ReferenceGrant);
//! - each waypoint (`Gateway` of class `ferrymesh-waypoint`) gets `Accepted` (it translated),
//!   `Programmed` (a ready pod runs it) and its ready pods' addresses.
//!
//! Entries of other controllers are kept. A condition keeps its `lastTransitionTime` while its
//! status holds, so an unchanged object computes to its current status and is not written
//! again: the watch event of a write settles instead of looping. Everything here reads objects
//! as JSON, so both route kinds share one code path.

use std::collections::BTreeMap;

use ferrymesh_api::config as proto;
use serde_json::{json, Value};

use super::local::ConfigError;
use crate::model::{Model, WAYPOINT_CLASS};

/// The `controllerName` of the mesh's route status entries.
pub const CONTROLLER_NAME: &str = "ferrymesh.io/mesh-controller";

/// A condition as mesh-ctrl decides it; [`condition_json`] adds generation and time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Condition {
    /// `Accepted`, `ResolvedRefs`, `Programmed`.
    pub type_: &'static str,
    /// True or False.
    pub status: bool,
    /// A reason the Gateway API defines for this condition.
    pub reason: &'static str,
    /// For the operator: what is wrong and what to do.
    pub message: String,
}

impl Condition {
    fn new(type_: &'static str, status: bool, reason: &'static str, message: impl Into<String>) -> Self {
        Self { type_, status, reason, message: message.into() }
    }
}

/// The status a route should have, or None when it already has it. `error` is its translation
/// error (the model then holds its last good version, if any).
pub fn route_status(route: &Value, error: Option<&ConfigError>, model: &Model, now: &str) -> Option<Value> {
    let namespace = str_at(route, "/metadata/namespace");
    let generation = route.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0);
    let parent_refs = route.pointer("/spec/parentRefs").and_then(Value::as_array).cloned().unwrap_or_default();
    let resolved = resolved_refs(route, namespace, model);
    let current = route.pointer("/status/parents").and_then(Value::as_array).cloned().unwrap_or_default();
    let (ours, others): (Vec<Value>, Vec<Value>) =
        current.into_iter().partition(|p| p["controllerName"].as_str() == Some(CONTROLLER_NAME));
    let desired: Vec<Value> = parent_refs
        .iter()
        .filter(|p| is_service_ref(p, "Gateway"))
        .map(|parent| {
            let accepted = accepted(parent, namespace, error, model);
            let before = ours.iter().find(|o| o["parentRef"] == *parent).map(|o| &o["conditions"]);
            let conditions = [accepted, resolved.clone()].map(|c| condition_json(&c, generation, before, now));
            json!({"parentRef": parent, "controllerName": CONTROLLER_NAME, "conditions": conditions})
        })
        .collect();
    if desired == ours {
        return None;
    }
    let parents: Vec<Value> = others.into_iter().chain(desired).collect();
    Some(json!({"parents": parents}))
}

/// The status a waypoint Gateway should have (conditions and addresses), or None when it
/// already has it or is not a waypoint. `error` is its translation error; `waypoints` the
/// model's waypoints with their ready addresses ([`Model::waypoints_wire`], made once for all
/// Gateways).
pub fn waypoint_status(
    gateway: &Value,
    error: Option<&ConfigError>,
    waypoints: &BTreeMap<String, proto::Waypoint>,
    now: &str,
) -> Option<Value> {
    if gateway.pointer("/spec/gatewayClassName").and_then(Value::as_str) != Some(WAYPOINT_CLASS) {
        return None;
    }
    let key = format!("{}/{}", str_at(gateway, "/metadata/namespace"), str_at(gateway, "/metadata/name"));
    let generation = gateway.pointer("/metadata/generation").and_then(Value::as_i64).unwrap_or(0);
    let addresses = waypoints.get(&key).map_or(&[][..], |w| w.addresses.as_slice());
    let (accepted, programmed) = match error {
        Some(e) => {
            let field = e.field.as_deref().unwrap_or_default();
            let reason = if field.starts_with("spec.listeners") { "ListenersNotValid" } else { "InvalidParameters" };
            let message = format!("{}: {}", field, e.message);
            (
                Condition::new("Accepted", false, reason, message.clone()),
                Condition::new("Programmed", false, "Invalid", message),
            )
        }
        None => {
            let accepted = Condition::new("Accepted", true, "Accepted", "a ferrymesh waypoint");
            let programmed = match addresses.len() {
                0 => Condition::new(
                    "Programmed",
                    false,
                    "Pending",
                    format!("no ready pod runs waypoint {key}: deploy it (meshctl waypoint generate)"),
                ),
                n => Condition::new("Programmed", true, "Programmed", format!("{n} ready pod(s) run waypoint {key}")),
            };
            (accepted, programmed)
        }
    };
    let before = gateway.pointer("/status/conditions");
    let conditions = [accepted, programmed].map(|c| condition_json(&c, generation, before, now));
    let addresses: Vec<Value> = addresses.iter().map(|a| json!({"type": "IPAddress", "value": a})).collect();
    let current = (gateway.pointer("/status/conditions"), gateway.pointer("/status/addresses"));
    let unchanged =
        current.0 == Some(&json!(conditions)) && current.1.map_or(addresses.is_empty(), |a| *a == json!(addresses));
    (!unchanged).then(|| json!({"conditions": conditions, "addresses": addresses}))
}

/// Whether a reference names a Service (group `""` or `core`, or absent as in local files).
/// An absent kind is the API's default: `Gateway` for a parent, `Service` for a backend.
fn is_service_ref(r: &Value, default_kind: &str) -> bool {
    let core = r.get("group").and_then(Value::as_str).is_none_or(|g| g.is_empty() || g == "core");
    core && r.get("kind").and_then(Value::as_str).unwrap_or(default_kind) == "Service"
}

/// `Accepted` of a route for one Service parent.
fn accepted(parent: &Value, namespace: &str, error: Option<&ConfigError>, model: &Model) -> Condition {
    if let Some(e) = error {
        let field = e.field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default();
        let kept = "; the mesh keeps serving the route's last accepted version, if it had one";
        return Condition::new("Accepted", false, "UnsupportedValue", format!("{field}{}{kept}", e.message));
    }
    let service =
        format!("{}/{}", parent.get("namespace").and_then(Value::as_str).unwrap_or(namespace), str_at(parent, "/name"));
    let Some(svc) = model.services.get(&service) else {
        return Condition::new("Accepted", false, "NoMatchingParent", format!("Service {service} does not exist"));
    };
    if let Some(port) = parent.get("port").and_then(Value::as_i64) {
        if !svc.ports.iter().any(|p| i64::from(p.port) == port) {
            return Condition::new(
                "Accepted",
                false,
                "NoMatchingParent",
                format!("Service {service} has no port {port}"),
            );
        }
    }
    let labels = match svc.labels.contains_key(crate::model::USE_WAYPOINT_LABEL) {
        true => Some(&svc.labels),
        false => model.namespaces.get(&svc.namespace).map(|ns| &ns.labels),
    };
    let refused = labels.and_then(|labels| model.binding_refused(labels, &svc.namespace));
    let mut message = match (model.waypoint_of(svc), refused) {
        (_, Some(refused)) => {
            return Condition::new(
                "Accepted",
                false,
                "NotAllowedByListeners",
                format!("Service {service} is not bound to its waypoint: {refused}"),
            );
        }
        (Some(w), None) if model.waypoints.contains_key(&w) => format!("served by waypoint {w}"),
        (Some(w), None) => {
            format!("Service {service} is bound to waypoint {w}, which does not exist: its traffic fails closed")
        }
        (None, None) => format!(
            "Service {service} is bound to no waypoint: label it or its namespace ferrymesh.io/use-waypoint for the route to apply"
        ),
    };
    let service_namespace = service.split_once('/').map_or("", |(ns, _)| ns);
    if service_namespace != namespace {
        message.push_str(&format!(
            "; a consumer route (GAMMA): it applies only to clients in namespace {namespace}, and takes their requests instead of {service_namespace}'s own routes"
        ));
    }
    Condition::new("Accepted", true, "Accepted", message)
}

/// `ResolvedRefs` of a route: the first backend that does not resolve, named by its field.
fn resolved_refs(route: &Value, namespace: &str, model: &Model) -> Condition {
    let kind = route.get("kind").and_then(Value::as_str).unwrap_or("HTTPRoute");
    let rules = route.pointer("/spec/rules").and_then(Value::as_array).cloned().unwrap_or_default();
    for (i, rule) in rules.iter().enumerate() {
        let backends = rule.get("backendRefs").and_then(Value::as_array).cloned().unwrap_or_default();
        for (j, backend) in backends.iter().enumerate() {
            let field = format!("spec.rules[{i}].backendRefs[{j}]");
            if !is_service_ref(backend, "Service") {
                return Condition::new(
                    "ResolvedRefs",
                    false,
                    "InvalidKind",
                    format!("{field}: only Service backends are supported"),
                );
            }
            let backend_namespace = backend.get("namespace").and_then(Value::as_str).unwrap_or(namespace);
            let service = format!("{backend_namespace}/{}", str_at(backend, "/name"));
            if !model.reference_permitted(kind, namespace, &service) {
                return Condition::new(
                    "ResolvedRefs",
                    false,
                    "RefNotPermitted",
                    format!(
                        "{field}: Service {service} is in another namespace, and no ReferenceGrant in {backend_namespace} opens it to {kind}s of {namespace}: its requests are answered 500"
                    ),
                );
            }
            let Some(svc) = model.services.get(&service) else {
                return Condition::new(
                    "ResolvedRefs",
                    false,
                    "BackendNotFound",
                    format!("{field}: Service {service} does not exist"),
                );
            };
            let port = backend.get("port").and_then(Value::as_i64);
            if !svc.ports.iter().any(|p| Some(i64::from(p.port)) == port) {
                let port = port.map_or("(none)".to_string(), |p| p.to_string());
                return Condition::new(
                    "ResolvedRefs",
                    false,
                    "BackendNotFound",
                    format!("{field}: Service {service} has no port {port}"),
                );
            }
        }
    }
    Condition::new("ResolvedRefs", true, "ResolvedRefs", "every backend reference resolves")
}

/// A condition in the API's form. Its `lastTransitionTime` is the one of the same condition in
/// `before` when its status has not changed, else `now`.
fn condition_json(c: &Condition, generation: i64, before: Option<&Value>, now: &str) -> Value {
    let status = if c.status { "True" } else { "False" };
    let previous = before
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .find(|b| b["type"].as_str() == Some(c.type_) && b["status"].as_str() == Some(status));
    let time = previous.and_then(|b| b["lastTransitionTime"].as_str()).unwrap_or(now);
    json!({
        "type": c.type_,
        "status": status,
        "reason": c.reason,
        "message": c.message,
        "observedGeneration": generation,
        "lastTransitionTime": time,
    })
}

fn str_at<'a>(value: &'a Value, pointer: &str) -> &'a str {
    value.pointer(pointer).and_then(Value::as_str).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::model::{Service, ServicePort, TargetPort};

    fn model() -> Model {
        let mut model = Model::default();
        let port = ServicePort { name: "http".into(), port: 80, target: TargetPort::Number(8080), app_protocol: None };
        let web = Service {
            namespace: "shop".into(),
            name: "web".into(),
            vip: Some([10, 96, 0, 10].into()),
            other_vips: Vec::new(),
            ports: vec![port],
            selector: None,
            labels: Default::default(),
        };
        let mut api = web.clone();
        api.namespace = "other".into();
        api.name = "api".into();
        model.services.insert("shop/web".into(), web);
        model.services.insert("other/api".into(), api);
        // other lets shop's HTTPRoutes reach its api, and only that.
        let grant = crate::model::ReferenceGrant {
            namespace: "other".into(),
            name: "shop-to-api".into(),
            from: vec![("gateway.networking.k8s.io".into(), "HTTPRoute".into(), "shop".into())],
            to: vec![(String::new(), "Service".into(), Some("api".into()))],
        };
        model.reference_grants.insert("other/shop-to-api".into(), grant);
        model
    }

    fn route() -> Value {
        json!({
            "metadata": {"name": "r", "namespace": "shop", "generation": 3},
            "spec": {
                "parentRefs": [{"group": "", "kind": "Service", "name": "web"}, {"name": "ingress"}],
                "rules": [{"backendRefs": [{"name": "web", "port": 80}]}],
            },
        })
    }

    #[test]
    fn a_route_settles_and_keeps_the_transition_time_of_a_condition_that_holds() {
        let model = model();
        let mut route = route();
        let status = route_status(&route, None, &model, "2026-12-02T10:00:00Z").expect("a first status");
        let entry = &status["parents"][0];
        assert_eq!(status["parents"].as_array().unwrap().len(), 1, "only the Service parent is the mesh's");
        assert_eq!(entry["parentRef"]["name"], "web");
        assert_eq!(entry["conditions"][0]["status"], "True");
        assert_eq!(entry["conditions"][0]["observedGeneration"], 3);
        assert!(entry["conditions"][0]["message"].as_str().unwrap().contains("bound to no waypoint"));
        assert_eq!(entry["conditions"][1]["reason"], "ResolvedRefs");
        route["status"] = status;
        assert_eq!(route_status(&route, None, &model, "2026-12-02T11:00:00Z"), None, "nothing to write again");

        let error = ConfigError {
            file: PathBuf::from("kubernetes"),
            object: Some("HTTPRoute shop/r".into()),
            field: Some("spec.rules[0].matches[0].path.value".into()),
            message: "\"(\" is not a regular expression".into(),
        };
        let status = route_status(&route, Some(&error), &model, "2026-12-02T12:00:00Z").expect("a changed status");
        let conditions = &status["parents"][0]["conditions"];
        assert_eq!(conditions[0]["status"], "False");
        assert_eq!(conditions[0]["reason"], "UnsupportedValue");
        assert_eq!(conditions[0]["lastTransitionTime"], "2026-12-02T12:00:00Z");
        assert!(conditions[0]["message"].as_str().unwrap().starts_with("spec.rules[0].matches[0].path.value: "));
        assert_eq!(conditions[1]["lastTransitionTime"], "2026-12-02T10:00:00Z", "ResolvedRefs held");
    }

    #[test]
    fn backends_that_do_not_resolve_are_named_with_their_reason() {
        let model = model();
        let cases = [
            (json!({"name": "web", "port": 80}), "True", "ResolvedRefs"),
            (json!({"name": "web", "port": 81}), "False", "BackendNotFound"),
            (json!({"name": "web"}), "False", "BackendNotFound"),
            (json!({"name": "db", "port": 80}), "False", "BackendNotFound"),
            (json!({"name": "web", "port": 80, "namespace": "other"}), "False", "RefNotPermitted"),
            (json!({"name": "api", "port": 80, "namespace": "other"}), "True", "ResolvedRefs"),
            (json!({"group": "example.com", "kind": "Bucket", "name": "b"}), "False", "InvalidKind"),
        ];
        for (backend, status, reason) in cases {
            let mut route = route();
            route["spec"]["rules"][0]["backendRefs"] = json!([{"name": "web", "port": 80}, backend.clone()]);
            let c = resolved_refs(&route, "shop", &model);
            assert_eq!((c.status, c.reason), (status == "True", reason), "{backend}");
            if !c.status {
                assert!(c.message.starts_with("spec.rules[0].backendRefs[1]: "), "{}", c.message);
            }
        }
    }
}
