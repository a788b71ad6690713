//! Kubernetes objects to the mesh [`Model`], for both sources: the directory source
//! ([`super::local`]) and the Kubernetes API ([`super::kube`]) hand the same typed objects to
//! the same functions, so the same objects give the same model through either. A field that
//! does not translate is a [`FieldError`] naming the object and the field.

mod routes;

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use ferrymesh_policy::{AuthorizationPolicy, PeerAuthentication};
use k8s_openapi::api::core::v1 as k8s;
pub use routes::{grpc_route_from, http_route_from};

/// The mesh's part of a Gateway: a waypoint when its class is `ferrymesh-waypoint`, which must
/// listen on 15008 with protocol HBONE; any other class is another controller's (None).
pub fn waypoint_from(
    gateway: gateway_api::gateways::Gateway,
    key: &ObjectKey,
) -> Result<Option<crate::model::Waypoint>, FieldError> {
    use crate::model::{WaypointFor, WAYPOINT_CLASS, WAYPOINT_FOR_LABEL};
    if gateway.spec.gateway_class_name != WAYPOINT_CLASS {
        return Ok(None);
    }
    let hbone = gateway
        .spec
        .listeners
        .iter()
        .position(|l| l.port == i32::from(mesh_common::HBONE_PORT) && l.protocol == "HBONE");
    let Some(hbone) = hbone else {
        return Err(key.field_error(
            "spec.listeners",
            format!("a waypoint listens on {} with protocol HBONE: add that listener", mesh_common::HBONE_PORT),
        ));
    };
    let allowed = allowed_namespaces(&gateway.spec.listeners[hbone], key, &format!("spec.listeners[{hbone}]"))?;
    let labels = gateway.metadata.labels.unwrap_or_default();
    let traffic = match labels.get(WAYPOINT_FOR_LABEL) {
        None => WaypointFor::Service,
        Some(value) => WaypointFor::parse(value).ok_or_else(|| {
            key.field_error(
                format!("metadata.labels.{WAYPOINT_FOR_LABEL}"),
                format!("{value:?} is not service, workload, all or none"),
            )
        })?,
    };
    Ok(Some(crate::model::Waypoint { namespace: key.namespace.clone(), name: key.name.clone(), traffic, allowed }))
}

/// The namespaces a waypoint's HBONE listener lets bind to it (`allowedRoutes.namespaces`).
fn allowed_namespaces(
    listener: &gateway_api::gateways::GatewayListeners,
    key: &ObjectKey,
    field: &str,
) -> Result<crate::model::AllowedNamespaces, FieldError> {
    use crate::model::{AllowedNamespaces, LabelSelector};
    use gateway_api::gateways::GatewayListenersAllowedRoutesNamespacesFrom as From;
    let Some(namespaces) = listener.allowed_routes.as_ref().and_then(|a| a.namespaces.as_ref()) else {
        return Ok(AllowedNamespaces::Same);
    };
    let field = format!("{field}.allowedRoutes.namespaces");
    Ok(match namespaces.from {
        None | Some(From::Same) => AllowedNamespaces::Same,
        Some(From::All) => AllowedNamespaces::All,
        Some(From::Selector) => {
            let Some(selector) = &namespaces.selector else {
                return Err(key.field_error(format!("{field}.selector"), "missing; from: Selector needs one".into()));
            };
            let mut match_expressions = Vec::new();
            for (i, e) in selector.match_expressions.iter().flatten().enumerate() {
                if !["In", "NotIn", "Exists", "DoesNotExist"].contains(&e.operator.as_str()) {
                    return Err(key.field_error(
                        format!("{field}.selector.matchExpressions[{i}].operator"),
                        format!("{:?} is not In, NotIn, Exists or DoesNotExist", e.operator),
                    ));
                }
                match_expressions.push((e.key.clone(), e.operator.clone(), e.values.clone().unwrap_or_default()));
            }
            let match_labels = selector.match_labels.clone().unwrap_or_default();
            AllowedNamespaces::Selector(LabelSelector { match_labels, match_expressions })
        }
    })
}

/// A ReferenceGrant (gateway.networking.k8s.io v1beta1 or v1).
pub fn reference_grant_from(
    grant: gateway_api::referencegrants::ReferenceGrant,
    key: &ObjectKey,
) -> Result<crate::model::ReferenceGrant, FieldError> {
    for (i, from) in grant.spec.from.iter().enumerate() {
        if from.namespace.is_empty() {
            return Err(key.field_error(format!("spec.from[{i}].namespace"), "missing".into()));
        }
    }
    Ok(crate::model::ReferenceGrant {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        from: grant.spec.from.into_iter().map(|f| (f.group, f.kind, f.namespace)).collect(),
        to: grant.spec.to.into_iter().map(|t| (t.group, t.kind, t.name.filter(|n| !n.is_empty()))).collect(),
    })
}

use crate::model::{
    EndpointSlice, Model, Namespace, Pod, Service, ServiceAccount, ServicePort, SliceEndpoint, TargetPort,
    NETNS_ANNOTATION,
};

/// A field of an object that does not translate.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{object}: field {field}: {message}")]
pub struct FieldError {
    /// `Kind namespace/name`.
    pub object: String,
    /// Dotted path of the field.
    pub field: String,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

/// Identity of a config object: kind, namespace (empty for cluster-scoped) and name.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ObjectKey {
    /// Kind, e.g. `Pod`.
    pub kind: String,
    /// Namespace; empty for cluster-scoped objects.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.namespace.is_empty() {
            write!(f, "{} {}", self.kind, self.name)
        } else {
            write!(f, "{} {}/{}", self.kind, self.namespace, self.name)
        }
    }
}

/// A translated object, one variant per kind the mesh reads.
#[derive(Clone, Debug)]
pub enum Object {
    /// A Namespace.
    Namespace(Namespace),
    /// A Pod.
    Pod(Pod),
    /// A ferrymesh.io AuthorizationPolicy.
    AuthorizationPolicy(AuthorizationPolicy),
    /// A ferrymesh.io PeerAuthentication.
    PeerAuthentication(PeerAuthentication),
    /// A Service.
    Service(Service),
    /// An EndpointSlice.
    EndpointSlice(EndpointSlice),
    /// A ServiceAccount.
    ServiceAccount(ServiceAccount),
    /// A waypoint (a Gateway of class `ferrymesh-waypoint`).
    Waypoint(crate::model::Waypoint),
    /// A Gateway API route attached to Services (HTTPRoute, GRPCRoute).
    Route(ferrymesh_route::Route),
    /// A ferrymesh.io TrafficPolicy.
    TrafficPolicy(ferrymesh_route::traffic::TrafficPolicy),
    /// A ferrymesh.io DestinationRule.
    DestinationRule(ferrymesh_route::destination::DestinationRule),
    /// A ferrymesh.io RequestAuthentication.
    RequestAuthentication(ferrymesh_policy::authn::RequestAuthentication),
    /// A Gateway API ReferenceGrant.
    ReferenceGrant(crate::model::ReferenceGrant),
    /// An object the mesh reads and has no part of (a route attached only to Gateways).
    Ignored,
}

impl FieldError {
    /// The (field, message) a source's rejection records (it names the object itself).
    pub fn field_and_message(self) -> (Option<String>, String) {
        (Some(self.field), self.message)
    }
}

impl ObjectKey {
    /// A [`FieldError`] of this object.
    pub fn field_error(&self, field: impl Into<String>, message: String) -> FieldError {
        FieldError { object: self.to_string(), field: field.into(), message }
    }
}

/// The model the objects `objects` make.
pub fn model_of<'a>(objects: impl Iterator<Item = &'a Object>) -> Model {
    let mut model = Model::default();
    for object in objects {
        match object {
            Object::Namespace(ns) => {
                model.namespaces.insert(ns.name.clone(), ns.clone());
            }
            Object::Pod(pod) => {
                model.pods.insert(pod.uid.clone(), pod.clone());
            }
            Object::AuthorizationPolicy(p) => {
                model.authorization_policies.insert(p.key(), p.clone());
            }
            Object::PeerAuthentication(p) => {
                model.peer_authentications.insert(format!("{}/{}", p.namespace, p.name), p.clone());
            }
            Object::Service(svc) => {
                model.services.insert(format!("{}/{}", svc.namespace, svc.name), svc.clone());
            }
            Object::EndpointSlice(slice) => {
                model.endpoint_slices.insert(format!("{}/{}", slice.namespace, slice.name), slice.clone());
            }
            Object::ServiceAccount(sa) => {
                model.service_accounts.insert(format!("{}/{}", sa.namespace, sa.name), sa.clone());
            }
            Object::Waypoint(w) => {
                model.waypoints.insert(format!("{}/{}", w.namespace, w.name), w.clone());
            }
            Object::Route(route) => {
                model.routes.insert(route.key(), std::sync::Arc::new(route.clone()));
            }
            Object::TrafficPolicy(p) => {
                model.traffic_policies.insert(p.key(), p.clone());
            }
            Object::DestinationRule(r) => {
                model.destination_rules.insert(r.key(), r.clone());
            }
            Object::RequestAuthentication(p) => {
                model.request_authentications.insert(p.key(), p.clone());
            }
            Object::ReferenceGrant(g) => {
                model.reference_grants.insert(format!("{}/{}", g.namespace, g.name), g.clone());
            }
            Object::Ignored => {}
        }
    }
    model
}

/// Label naming the Service an EndpointSlice belongs to.
const SERVICE_NAME_LABEL: &str = "kubernetes.io/service-name";

pub use k8s_openapi::api::discovery::v1::EndpointSlice as EndpointSliceResource;

pub fn service_account_from(key: &ObjectKey) -> ServiceAccount {
    ServiceAccount { namespace: key.namespace.clone(), name: key.name.clone() }
}

pub fn endpoint_slice_from(slice: EndpointSliceResource, key: &ObjectKey) -> Result<EndpointSlice, FieldError> {
    let labels = slice.metadata.labels.unwrap_or_default();
    let Some(service) = labels.get(SERVICE_NAME_LABEL).filter(|s| !s.is_empty()) else {
        return Err(key.field_error(
            format!("metadata.labels.{SERVICE_NAME_LABEL}"),
            "missing; it names the Service the slice belongs to".into(),
        ));
    };
    if slice.address_type != "IPv4" && slice.address_type != "IPv6" {
        return Err(key.field_error("addressType", format!("{} is not supported (IPv4 or IPv6)", slice.address_type)));
    }
    let mut ports = BTreeMap::new();
    for (i, p) in slice.ports.iter().flatten().enumerate() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let Some(port) = p.port else { continue };
        let port = u16::try_from(port)
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| key.field_error(format!("ports[{i}].port"), format!("{port} is not a port number")))?;
        ports.insert(p.name.clone().unwrap_or_default(), port);
    }
    let mut endpoints = Vec::new();
    for (i, e) in slice.endpoints.iter().enumerate() {
        let Some(address) = e.addresses.first() else { continue };
        let ip = address.parse::<IpAddr>().map_err(|err| {
            key.field_error(format!("endpoints[{i}].addresses[0]"), format!("{address:?} is not an IP address: {err}"))
        })?;
        let ready = e.conditions.as_ref().and_then(|c| c.ready).unwrap_or(true);
        let pod_uid = e.target_ref.as_ref().filter(|r| r.kind.as_deref() == Some("Pod")).and_then(|r| r.uid.clone());
        endpoints.push(SliceEndpoint { ip, ready, pod_uid });
    }
    Ok(EndpointSlice {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        service: service.clone(),
        ports,
        endpoints,
    })
}

pub fn namespace_from(ns: k8s::Namespace, key: &ObjectKey) -> Namespace {
    Namespace { name: key.name.clone(), labels: ns.metadata.labels.unwrap_or_default() }
}

pub fn pod_from(pod: k8s::Pod, key: &ObjectKey) -> Result<Pod, FieldError> {
    let missing = |field: &str, hint: &str| Err(key.field_error(field, format!("missing; {hint}")));
    let meta = pod.metadata;
    let spec = pod.spec.unwrap_or_default();
    let Some(node) = spec.node_name.filter(|n| !n.is_empty()) else {
        return missing("spec.nodeName", "the pod must be scheduled to a node");
    };
    let status = pod.status.unwrap_or_default();
    let ready = status
        .conditions
        .as_ref()
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .is_none_or(|c| c.status == "True");
    let Some(ip) = status.pod_ip.filter(|ip| !ip.is_empty()) else {
        return missing("status.podIP", "the mesh addresses pods by IP");
    };
    let ip: IpAddr =
        ip.parse().map_err(|e| key.field_error("status.podIP", format!("{ip:?} is not an IP address: {e}")))?;
    // status.podIPs lists podIP first, then (dual-stack) the other family's address.
    let mut other_ips = Vec::new();
    for (i, entry) in status.pod_ips.iter().flatten().enumerate() {
        let field = format!("status.podIPs[{i}].ip");
        let parsed: IpAddr = entry
            .ip
            .parse()
            .map_err(|e| key.field_error(&field, format!("{:?} is not an IP address: {e}", entry.ip)))?;
        if parsed != ip && !other_ips.contains(&parsed) {
            other_ips.push(parsed);
        }
    }
    // Without the annotation the agent finds the netns by the pod's cgroup (its UID).
    let annotations = meta.annotations.unwrap_or_default();
    let netns = annotations.get(NETNS_ANNOTATION).cloned().unwrap_or_default();
    let mut container_ports = BTreeMap::new();
    for (c, container) in spec.containers.iter().enumerate() {
        for (i, port) in container.ports.iter().flatten().enumerate() {
            let field = format!("spec.containers[{c}].ports[{i}].containerPort");
            let number = u16::try_from(port.container_port)
                .ok()
                .filter(|p| *p > 0)
                .ok_or_else(|| key.field_error(field, format!("{} is not a port number", port.container_port)))?;
            if let Some(name) = &port.name {
                container_ports.insert(name.clone(), number);
            }
        }
    }
    Ok(Pod {
        container_ports,
        ready,
        uid: meta.uid.filter(|u| !u.is_empty()).unwrap_or_else(|| format!("{}/{}", key.namespace, key.name)),
        name: key.name.clone(),
        namespace: key.namespace.clone(),
        node,
        service_account: spec.service_account_name.unwrap_or_else(|| "default".into()),
        ip,
        other_ips,
        netns,
        labels: meta.labels.unwrap_or_default(),
    })
}

/// A dual-stack Service's ClusterIPs after the first, `spec.clusterIPs[1..]`, as Kubernetes
/// allows them: the list (when given) starts with `spec.clusterIP`, and holds at most one address
/// of each family.
fn other_cluster_ips(vip: IpAddr, ips: &[String], key: &ObjectKey) -> Result<Vec<IpAddr>, FieldError> {
    let mut others = Vec::new();
    for (i, ip) in ips.iter().enumerate() {
        let field = format!("spec.clusterIPs[{i}]");
        let ip: IpAddr =
            ip.parse().map_err(|e| key.field_error(&field, format!("{ip:?} is not an IP address: {e}")))?;
        match i {
            0 if ip != vip => {
                return Err(
                    key.field_error(&field, format!("{ip} is not spec.clusterIP ({vip}), which must come first"))
                )
            }
            0 => {}
            1 if ip.is_ipv4() == vip.is_ipv4() => {
                return Err(
                    key.field_error(&field, format!("{ip} is of the same family as {vip}: one address per family"))
                )
            }
            1 => others.push(ip),
            _ => return Err(key.field_error(&field, "a Service has at most two ClusterIPs, one per family".into())),
        }
    }
    Ok(others)
}

pub fn service_from(svc: k8s::Service, key: &ObjectKey) -> Result<Service, FieldError> {
    use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
    let spec = svc.spec.unwrap_or_default();
    let vip = match spec.cluster_ip.as_deref() {
        Some("None") => None,
        Some(ip) if !ip.is_empty() => Some(
            ip.parse::<IpAddr>()
                .map_err(|e| key.field_error("spec.clusterIP", format!("{ip:?} is not an IP address: {e}")))?,
        ),
        _ => {
            return Err(key.field_error(
                "spec.clusterIP",
                "missing; local mode has no allocator: give the VIP, or None for a headless service".into(),
            ))
        }
    };
    let other_vips = match vip {
        Some(vip) => other_cluster_ips(vip, spec.cluster_ips.as_deref().unwrap_or_default(), key)?,
        None => Vec::new(),
    };
    let mut ports = Vec::new();
    for (i, p) in spec.ports.iter().flatten().enumerate() {
        if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
            continue;
        }
        let port = u16::try_from(p.port).ok().filter(|p| *p > 0).ok_or_else(|| {
            key.field_error(format!("spec.ports[{i}].port"), format!("{} is not a port number", p.port))
        })?;
        let target = match &p.target_port {
            None => TargetPort::Number(port),
            Some(IntOrString::Int(n)) => {
                TargetPort::Number(u16::try_from(*n).ok().filter(|n| *n > 0).ok_or_else(|| {
                    key.field_error(format!("spec.ports[{i}].targetPort"), format!("{n} is not a port number"))
                })?)
            }
            Some(IntOrString::String(name)) => TargetPort::Name(name.clone()),
        };
        let (name, app_protocol) = (p.name.clone().unwrap_or_default(), p.app_protocol.clone());
        ports.push(ServicePort { name, port, target, app_protocol });
    }
    Ok(Service {
        namespace: key.namespace.clone(),
        name: key.name.clone(),
        vip,
        other_vips,
        ports,
        selector: spec.selector,
        labels: svc.metadata.labels.unwrap_or_default(),
    })
}
