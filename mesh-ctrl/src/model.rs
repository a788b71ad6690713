//! The mesh model: plain domain types built from validated config objects, independent of the
//! source they came from (a local directory or the Kubernetes API). It owns the enrollment
//! decision (namespace label, pod opt-out), the waypoint binding of Services, and the
//! conversion to the wire types; it must never read files or talk to the network.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ferrymesh_api::config as proto;
use ferrymesh_api::kinds::ConfigSet;
use ferrymesh_policy::{AuthorizationPolicy, PeerAuthentication};
use ferrymesh_route::Filter;

/// Namespace label that opts a namespace into the mesh (value `enabled`) and pod label that
/// opts a pod out (value `none`).
pub const DATAPLANE_MODE_LABEL: &str = "ferrymesh.io/dataplane-mode";
/// Pod annotation carrying the pod's network namespace path in local mode (optional: without
/// it the agent finds the netns through the pod UID in /proc/<pid>/cgroup).
pub const NETNS_ANNOTATION: &str = "ferrymesh.io/netns";

/// Label binding a Namespace, Service or Pod to a waypoint (value: the waypoint's name; `none`
/// opts a Service or Pod out of its namespace's waypoint).
pub const USE_WAYPOINT_LABEL: &str = "ferrymesh.io/use-waypoint";
/// Label naming the namespace of the waypoint `ferrymesh.io/use-waypoint` names (default: the
/// labelled object's own).
pub const USE_WAYPOINT_NAMESPACE_LABEL: &str = "ferrymesh.io/use-waypoint-namespace";
/// Gateway label saying which traffic its waypoint takes: `service` (default), `workload`, `all`
/// or `none`.
pub const WAYPOINT_FOR_LABEL: &str = "ferrymesh.io/waypoint-for";
/// Pod label naming the Gateway a pod runs (set by the Gateway's deployment).
pub const GATEWAY_NAME_LABEL: &str = "gateway.networking.k8s.io/gateway-name";
/// The GatewayClass of the mesh's waypoints.
pub const WAYPOINT_CLASS: &str = "ferrymesh-waypoint";

/// Which traffic a waypoint takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaypointFor {
    /// Traffic addressed to the Services bound to it.
    Service,
    /// Traffic addressed to the workloads bound to it.
    Workload,
    /// Both.
    All,
    /// Neither.
    None,
}

impl WaypointFor {
    /// The value of a `ferrymesh.io/waypoint-for` label.
    pub fn parse(value: &str) -> Option<Self> {
        [WaypointFor::Service, WaypointFor::Workload, WaypointFor::All, WaypointFor::None]
            .into_iter()
            .find(|w| w.as_str() == value)
    }

    /// The label value.
    pub const fn as_str(self) -> &'static str {
        match self {
            WaypointFor::Service => "service",
            WaypointFor::Workload => "workload",
            WaypointFor::All => "all",
            WaypointFor::None => "none",
        }
    }

    /// Whether it takes Service-addressed traffic.
    pub fn takes_services(self) -> bool {
        matches!(self, WaypointFor::Service | WaypointFor::All)
    }

    /// Whether it takes traffic addressed to workloads (pod IPs).
    pub fn takes_workloads(self) -> bool {
        matches!(self, WaypointFor::Workload | WaypointFor::All)
    }
}

/// A waypoint: a Gateway of class `ferrymesh-waypoint`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Waypoint {
    /// Namespace.
    pub namespace: String,
    /// Name (also its service account: its identity is `.../ns/<namespace>/sa/<name>`).
    pub name: String,
    /// Which traffic it takes.
    pub traffic: WaypointFor,
    /// The namespaces whose Services and pods may bind to it: its HBONE listener's
    /// `allowedRoutes.namespaces` (Istio reads the same field for the same consent).
    pub allowed: AllowedNamespaces,
}

/// A Gateway listener's `allowedRoutes.namespaces.from`: which namespaces may attach to it.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub enum AllowedNamespaces {
    /// Its own namespace only (Gateway API's default).
    #[default]
    Same,
    /// Every namespace.
    All,
    /// The namespaces whose labels match (`matchLabels`, and `matchExpressions` with `In`,
    /// `NotIn`, `Exists`, `DoesNotExist`).
    Selector(LabelSelector),
}

/// A Kubernetes label selector, translated.
#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct LabelSelector {
    /// Labels that must be present with these values.
    pub match_labels: BTreeMap<String, String>,
    /// (key, operator, values) requirements.
    pub match_expressions: Vec<(String, String, Vec<String>)>,
}

impl LabelSelector {
    /// Whether `labels` satisfy it.
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|(key, op, values)| match op.as_str() {
                "In" => labels.get(key).is_some_and(|v| values.contains(v)),
                "NotIn" => labels.get(key).is_none_or(|v| !values.contains(v)),
                "Exists" => labels.contains_key(key),
                "DoesNotExist" => !labels.contains_key(key),
                _ => false,
            })
    }
}

/// A Gateway API ReferenceGrant: lets references of the kinds and namespaces it lists in
/// `from` reach the objects of its own namespace it lists in `to`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReferenceGrant {
    /// Namespace (the one whose objects it opens).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// (group, kind, namespace) of the referring objects.
    pub from: Vec<(String, String, String)>,
    /// (group, kind, name: None for every one) of the objects referred to.
    pub to: Vec<(String, String, Option<String>)>,
}

impl ReferenceGrant {
    /// Whether it lets a `kind` (of group `group`) of namespace `from` refer to Service `name`
    /// of its namespace.
    fn opens_service(&self, group: &str, kind: &str, from: &str, name: &str) -> bool {
        self.from.iter().any(|(g, k, ns)| g == group && k == kind && ns == from)
            && self.to.iter().any(|(g, k, n)| {
                (g.is_empty() || g == "core") && k == "Service" && n.as_deref().is_none_or(|n| n == name)
            })
    }
}

/// A namespace and the labels that matter to the mesh.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Namespace {
    /// Namespace name.
    pub name: String,
    /// All labels of the namespace.
    pub labels: BTreeMap<String, String>,
}

impl Namespace {
    /// Whether the namespace opted into the mesh.
    pub fn enrolled(&self) -> bool {
        self.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some("enabled")
    }
}

/// A pod as the mesh sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pod {
    /// Kubernetes UID (local mode: `metadata.uid`, or `<namespace>/<name>` when absent).
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Namespace of the pod.
    pub namespace: String,
    /// Node the pod is scheduled on.
    pub node: String,
    /// Service account the pod runs as.
    pub service_account: String,
    /// Pod IP (status.podIP).
    pub ip: IpAddr,
    /// Its other IPs (status.podIPs after the first: the other family's, when dual-stack).
    pub other_ips: Vec<IpAddr>,
    /// Path of the pod's network namespace; empty: the agent finds it by the pod's cgroup.
    pub netns: String,
    /// All labels of the pod.
    pub labels: BTreeMap<String, String>,
    /// Named container ports (name -> port), for named targetPorts.
    pub container_ports: BTreeMap<String, u16>,
    /// The pod's Ready condition (true when the pod does not report one).
    pub ready: bool,
}

/// A Service's targetPort.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetPort {
    /// A port number.
    Number(u16),
    /// A container port name.
    Name(String),
}

/// A port of a Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePort {
    /// Port name (may be empty for a single-port service).
    pub name: String,
    /// Port on the VIP.
    pub port: u16,
    /// Where it goes on the pods.
    pub target: TargetPort,
    /// `spec.ports[].appProtocol`.
    pub app_protocol: Option<String>,
}

impl ServicePort {
    /// What a waypoint makes of the port's traffic, as Istio selects a protocol: `appProtocol`,
    /// else the port's name (`<protocol>[-<suffix>]`); `http`, `http2`, `grpc`, `grpc-web`, `h2c`
    /// (and Kubernetes' `kubernetes.io/h2c`, `kubernetes.io/ws`) are HTTP, any other declared
    /// protocol (`tcp`, `tls`, `https`, `mysql`, ...) is opaque TCP, and a port that declares none
    /// is empty (a waypoint serves it as HTTP: the port decides, never the client).
    pub fn protocol(&self) -> &'static str {
        let declared = match &self.app_protocol {
            Some(app) => Some(app.as_str()),
            None => self.name.split('-').next().filter(|prefix| KNOWN_PROTOCOLS.contains(prefix)),
        };
        match declared.map(str::to_ascii_lowercase).as_deref() {
            None => "",
            Some("http" | "http2" | "grpc" | "grpc-web" | "h2c" | "kubernetes.io/h2c" | "kubernetes.io/ws" | "ws") => {
                "http"
            }
            Some(_) => "tcp",
        }
    }
}

/// Port name prefixes that declare a protocol (Istio's list); another name declares nothing.
const KNOWN_PROTOCOLS: [&str; 11] =
    ["http", "http2", "https", "grpc", "grpc-web", "tcp", "tls", "mongo", "mysql", "redis", "udp"];

/// A Service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// ClusterIP; None for a headless service.
    pub vip: Option<IpAddr>,
    /// A dual-stack Service's ClusterIP of the other family (`spec.clusterIPs[1]`).
    pub other_vips: Vec<IpAddr>,
    /// Ports.
    pub ports: Vec<ServicePort>,
    /// Pod selector; None: endpoints are managed elsewhere (none in local mode).
    pub selector: Option<BTreeMap<String, String>>,
    /// Its labels (a waypoint binding).
    pub labels: BTreeMap<String, String>,
}

impl Service {
    /// `pod`'s addresses that are endpoints of this Service when its selector picks the pod, as
    /// the EndpointSlice controller makes them: one per family the Service has a ClusterIP of (a
    /// headless Service: the pod's primary address).
    fn endpoint_ips<'a>(&'a self, pod: &'a Pod) -> impl Iterator<Item = IpAddr> + 'a {
        let families: Vec<bool> = self.vip.iter().chain(&self.other_vips).map(IpAddr::is_ipv4).collect();
        std::iter::once(pod.ip).chain(pod.other_ips.iter().copied()).filter(move |ip| {
            if families.is_empty() {
                *ip == pod.ip
            } else {
                families.contains(&ip.is_ipv4())
            }
        })
    }
}

/// An EndpointSlice: endpoints of one Service (in local mode optional: without one, a Service's
/// endpoints are the pods its selector matches).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EndpointSlice {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The Service it belongs to (label `kubernetes.io/service-name`).
    pub service: String,
    /// Port name -> port on the endpoints.
    pub ports: BTreeMap<String, u16>,
    /// Endpoints.
    pub endpoints: Vec<SliceEndpoint>,
}

/// One endpoint of an EndpointSlice.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpoint {
    /// Address.
    pub ip: IpAddr,
    /// conditions.ready (an absent condition counts as ready, as Kubernetes documents).
    pub ready: bool,
    /// UID of the pod behind it (targetRef), when it names one.
    pub pod_uid: Option<String>,
}

/// A ServiceAccount: the name behind a SPIFFE identity. Certificates are only issued for
/// service accounts that exist.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
}

impl Pod {
    /// Whether the pod itself opted out of the mesh.
    pub fn opted_out(&self) -> bool {
        self.labels.get(DATAPLANE_MODE_LABEL).map(String::as_str) == Some("none")
    }
}

/// Everything the control plane knows, as one consistent value.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Model {
    /// Namespaces by name.
    pub namespaces: BTreeMap<String, Namespace>,
    /// Pods by UID.
    pub pods: BTreeMap<String, Pod>,
    /// AuthorizationPolicies by `namespace/name`.
    pub authorization_policies: BTreeMap<String, AuthorizationPolicy>,
    /// PeerAuthentications by `namespace/name`.
    pub peer_authentications: BTreeMap<String, PeerAuthentication>,
    /// Services by `namespace/name`.
    pub services: BTreeMap<String, Service>,
    /// EndpointSlices by `namespace/name`.
    pub endpoint_slices: BTreeMap<String, EndpointSlice>,
    /// ServiceAccounts by `namespace/name`.
    pub service_accounts: BTreeMap<String, ServiceAccount>,
    /// Waypoints (Gateways of class `ferrymesh-waypoint`), by `namespace/name`.
    pub waypoints: BTreeMap<String, Waypoint>,
    /// Gateway API routes attached to Services, by `Kind namespace/name`.
    pub routes: BTreeMap<String, std::sync::Arc<ferrymesh_route::Route>>,
    /// TrafficPolicies, by `namespace/name`.
    pub traffic_policies: BTreeMap<String, ferrymesh_route::traffic::TrafficPolicy>,
    /// DestinationRules, by `namespace/name`.
    pub destination_rules: BTreeMap<String, ferrymesh_route::destination::DestinationRule>,
    /// RequestAuthentications, by `namespace/name`.
    pub request_authentications: BTreeMap<String, ferrymesh_policy::authn::RequestAuthentication>,
    /// ReferenceGrants, by `namespace/name` (read by mesh-ctrl, not sent).
    pub reference_grants: BTreeMap<String, ReferenceGrant>,
}

impl Model {
    /// Whether the agent of the pod's node captures its traffic. A waypoint's own pods never are:
    /// the waypoint speaks HBONE itself.
    pub fn captured(&self, pod: &Pod) -> bool {
        !pod.opted_out()
            && self.namespaces.get(&pod.namespace).is_some_and(Namespace::enrolled)
            && !self.runs_waypoint(pod)
    }

    /// The namespaces opted in to the mesh, sorted.
    pub fn captured_namespaces(&self) -> Vec<String> {
        self.namespaces.values().filter(|ns| ns.enrolled()).map(|ns| ns.name.clone()).collect()
    }

    /// Whether `pod` runs a waypoint of the model.
    fn runs_waypoint(&self, pod: &Pod) -> bool {
        pod.labels
            .get(GATEWAY_NAME_LABEL)
            .is_some_and(|name| self.waypoints.contains_key(&format!("{}/{name}", pod.namespace)))
    }

    /// The waypoint (`namespace/name`) a Service is bound to: its own `ferrymesh.io/use-waypoint`
    /// label, else its namespace's (`none` on the Service opts out), when that waypoint takes
    /// Service traffic. A label naming a waypoint of the Service's namespace that does not exist
    /// still binds: traffic for the Service then fails closed rather than bypass the policy it
    /// was meant to pass. A waypoint of another namespace binds only with its consent
    /// ([`Model::waypoint_allows`]); without it the Service is bound to no waypoint, and the
    /// binding's refusal is said in its routes' status ([`Model::binding_refused`]).
    pub fn waypoint_of(&self, svc: &Service) -> Option<String> {
        let namespace_labels = self.namespaces.get(&svc.namespace).map(|ns| &ns.labels);
        let labels = match svc.labels.get(USE_WAYPOINT_LABEL) {
            Some(_) => &svc.labels,
            None => namespace_labels?,
        };
        let name = labels.get(USE_WAYPOINT_LABEL).filter(|n| n.as_str() != "none")?;
        let namespace = labels.get(USE_WAYPOINT_NAMESPACE_LABEL).unwrap_or(&svc.namespace);
        let key = format!("{namespace}/{name}");
        match self.waypoints.get(&key) {
            Some(w) if !w.traffic.takes_services() => None,
            Some(w) if !self.waypoint_allows(w, &svc.namespace) => None,
            // A waypoint of another namespace that does not exist has not consented either.
            None if *namespace != svc.namespace => None,
            _ => Some(key),
        }
    }

    /// Whether waypoint `w` lets Services and pods of `namespace` bind to it: always its own
    /// namespace's; another's only when its listener's `allowedRoutes` names it. Without that
    /// consent a tenant could push its traffic through another namespace's waypoint, and reach
    /// that namespace's pods with the waypoint's identity.
    pub fn waypoint_allows(&self, w: &Waypoint, namespace: &str) -> bool {
        match &w.allowed {
            _ if w.namespace == namespace => true,
            AllowedNamespaces::Same => false,
            AllowedNamespaces::All => true,
            AllowedNamespaces::Selector(selector) => {
                self.namespaces.get(namespace).is_some_and(|ns| selector.matches(&ns.labels))
            }
        }
    }

    /// Why a binding to a waypoint (its labels on `labels`, of an object of `namespace`) is
    /// refused, if it is: the waypoint is of another namespace and has not consented.
    pub fn binding_refused(&self, labels: &BTreeMap<String, String>, namespace: &str) -> Option<String> {
        let name = labels.get(USE_WAYPOINT_LABEL).filter(|n| n.as_str() != "none")?;
        let waypoint_namespace = labels.get(USE_WAYPOINT_NAMESPACE_LABEL).filter(|ns| *ns != namespace)?;
        let key = format!("{waypoint_namespace}/{name}");
        match self.waypoints.get(&key) {
            None => Some(format!("waypoint {key} does not exist")),
            Some(w) if !self.waypoint_allows(w, namespace) => Some(format!(
                "waypoint {key} does not allow namespace {namespace}: its HBONE listener's allowedRoutes.namespaces must name it (from: All, or a Selector)"
            )),
            Some(_) => None,
        }
    }

    /// Whether a route of kind `kind` (HTTPRoute, GRPCRoute) of namespace `from` may send
    /// requests to Service `service` (`namespace/name`): one of its own namespace, or one a
    /// ReferenceGrant of the Service's namespace opens to it.
    pub fn reference_permitted(&self, kind: &str, from: &str, service: &str) -> bool {
        let Some((namespace, name)) = service.split_once('/') else { return false };
        namespace == from
            || self
                .reference_grants
                .values()
                .any(|g| g.namespace == namespace && g.opens_service("gateway.networking.k8s.io", kind, from, name))
    }

    /// The routes as waypoints receive them: a backend of another namespace that no
    /// ReferenceGrant opens to the route is marked refused (its share of requests is answered
    /// 500), and a mirror to one is left out (copies go nowhere they may not).
    pub fn routes_resolved(&self) -> BTreeMap<String, proto::Route> {
        self.routes
            .iter()
            .map(|(key, route)| {
                let kind = route.kind.as_str();
                let permitted = |service: &str| self.reference_permitted(kind, &route.namespace, service);
                let mut resolved = (**route).clone();
                for rule in &mut resolved.rules {
                    rule.filters.retain(|f| !matches!(f, Filter::Mirror(m) if !permitted(&m.backend.service)));
                    for backend in &mut rule.backends {
                        backend.filters.retain(|f| !matches!(f, Filter::Mirror(m) if !permitted(&m.backend.service)));
                        if !permitted(&backend.target.service) {
                            backend.refused = Some(format!(
                                "Service {} is in another namespace than the route and no ReferenceGrant there opens it to {kind}s of {}",
                                backend.target.service, route.namespace
                            ));
                        }
                    }
                }
                (key.clone(), proto::Route::from(&resolved))
            })
            .collect()
    }

    /// The waypoint (`namespace/name`) traffic addressed to `pod` (its IP) must pass: the pod's
    /// own `ferrymesh.io/use-waypoint` label, else its namespace's (`none` on the pod opts out),
    /// when that waypoint takes workload traffic (`ferrymesh.io/waypoint-for: workload` or
    /// `all`). Only pods the mesh captures are bound, and never a waypoint's own. A pod's own
    /// label naming a waypoint of its namespace that does not exist still binds (fail closed,
    /// as for Services); a namespace's label binds its pods only to a waypoint that exists and
    /// takes workloads, since a waypoint takes Service traffic alone unless it says otherwise.
    /// A waypoint of another namespace binds only with its consent, as for Services.
    pub fn waypoint_of_pod(&self, pod: &Pod) -> Option<String> {
        if !self.captured(pod) {
            return None;
        }
        let own = pod.labels.contains_key(USE_WAYPOINT_LABEL);
        let labels = match own {
            true => &pod.labels,
            false => &self.namespaces.get(&pod.namespace)?.labels,
        };
        let name = labels.get(USE_WAYPOINT_LABEL).filter(|n| n.as_str() != "none")?;
        let namespace = labels.get(USE_WAYPOINT_NAMESPACE_LABEL).unwrap_or(&pod.namespace);
        let key = format!("{namespace}/{name}");
        match self.waypoints.get(&key) {
            Some(w) if w.traffic.takes_workloads() && self.waypoint_allows(w, &pod.namespace) => Some(key),
            None if own && *namespace == pod.namespace => Some(key),
            _ => None,
        }
    }

    /// The waypoints in wire form, with the addresses of their ready pods.
    pub fn waypoints_wire(&self) -> BTreeMap<String, proto::Waypoint> {
        // One pass over the pods, not one per waypoint.
        let mut running: BTreeMap<(&str, &str), Vec<String>> = BTreeMap::new();
        for pod in self.pods.values().filter(|p| p.ready) {
            if let Some(name) = pod.labels.get(GATEWAY_NAME_LABEL) {
                running.entry((pod.namespace.as_str(), name.as_str())).or_default().push(pod.ip.to_string());
            }
        }
        self.waypoints
            .iter()
            .map(|(key, w)| {
                let addresses = running.remove(&(w.namespace.as_str(), w.name.as_str())).unwrap_or_default();
                let wire = proto::Waypoint {
                    namespace: w.namespace.clone(),
                    name: w.name.clone(),
                    traffic_type: w.traffic.as_str().into(),
                    addresses,
                };
                (key.clone(), wire)
            })
            .collect()
    }

    /// The workloads of the model as agents receive them, keyed by UID.
    pub fn workloads(&self) -> BTreeMap<String, proto::Workload> {
        self.pods
            .values()
            .map(|pod| {
                let workload = proto::Workload {
                    uid: pod.uid.clone(),
                    name: pod.name.clone(),
                    namespace: pod.namespace.clone(),
                    node: pod.node.clone(),
                    service_account: pod.service_account.clone(),
                    ip: pod.ip.to_string(),
                    other_ips: pod.other_ips.iter().map(IpAddr::to_string).collect(),
                    netns: pod.netns.clone(),
                    labels: pod.labels.clone().into_iter().collect(),
                    captured: self.captured(pod),
                    waypoint: self.waypoint_of_pod(pod).unwrap_or_default(),
                };
                (pod.uid.clone(), workload)
            })
            .collect()
    }
}

impl Model {
    /// Everything agents receive of the model, in wire form.
    pub fn config(&self) -> ConfigSet {
        ConfigSet {
            workloads: self.workloads(),
            authorization_policies: self.authorization_policies_wire(),
            peer_authentications: self.peer_authentications_wire(),
            services: self.services_wire(),
            waypoints: self.waypoints_wire(),
            routes: self.routes_resolved(),
            traffic_policies: self
                .traffic_policies
                .iter()
                .map(|(k, p)| (k.clone(), proto::TrafficPolicy::from(p)))
                .collect(),
            destination_rules: self
                .destination_rules
                .iter()
                .map(|(k, r)| (k.clone(), proto::DestinationRule::from(r)))
                .collect(),
            request_authentications: self
                .request_authentications
                .iter()
                .map(|(k, p)| (k.clone(), proto::RequestAuthentication::from(p)))
                .collect(),
        }
    }

    /// Every AuthorizationPolicy in wire form, by `namespace/name`.
    pub fn authorization_policies_wire(&self) -> BTreeMap<String, proto::AuthorizationPolicy> {
        self.authorization_policies.iter().map(|(k, p)| (k.clone(), proto::AuthorizationPolicy::from(p))).collect()
    }

    /// Every Service with its endpoints in wire form, by `namespace/name`. A service's endpoints
    /// come from its EndpointSlices when it has any, else from the pods of its namespace its
    /// selector matches (local mode's stand-in for the EndpointSlice controller); a named
    /// targetPort then resolves per pod through its container port names.
    pub fn services_wire(&self) -> BTreeMap<String, proto::Service> {
        let mut pods_by_namespace: BTreeMap<&str, Vec<&Pod>> = BTreeMap::new();
        let mut pod_by_ip: BTreeMap<IpAddr, &Pod> = BTreeMap::new();
        for pod in self.pods.values() {
            pods_by_namespace.entry(&pod.namespace).or_default().push(pod);
            for ip in std::iter::once(pod.ip).chain(pod.other_ips.iter().copied()) {
                pod_by_ip.insert(ip, pod);
            }
        }
        let mut slices_by_service: BTreeMap<(&str, &str), Vec<&EndpointSlice>> = BTreeMap::new();
        for slice in self.endpoint_slices.values() {
            slices_by_service.entry((&slice.namespace, &slice.service)).or_default().push(slice);
        }
        self.services
            .iter()
            .map(|(key, svc)| {
                let endpoints =
                    match (slices_by_service.get(&(svc.namespace.as_str(), svc.name.as_str())), &svc.selector) {
                        (Some(slices), _) => slice_endpoints(svc, slices, &pod_by_ip),
                        (None, None) => Vec::new(),
                        (None, Some(selector)) => pods_by_namespace
                            .get(svc.namespace.as_str())
                            .into_iter()
                            .flatten()
                            .filter(|p| selector.iter().all(|(k, v)| p.labels.get(k) == Some(v)))
                            .flat_map(|p| svc.endpoint_ips(p).map(move |ip| (p, ip)))
                            .map(|(p, ip)| proto::ServiceEndpoint {
                                workload_uid: p.uid.clone(),
                                ip: ip.to_string(),
                                ready: p.ready,
                                target_ports: svc
                                    .ports
                                    .iter()
                                    .filter_map(|sp| {
                                        let target = match &sp.target {
                                            TargetPort::Number(n) => Some(*n),
                                            TargetPort::Name(name) => p.container_ports.get(name).copied(),
                                        };
                                        target.map(|t| (u32::from(sp.port), u32::from(t)))
                                    })
                                    .collect(),
                            })
                            .collect(),
                    };
                let wire = proto::Service {
                    namespace: svc.namespace.clone(),
                    name: svc.name.clone(),
                    vip: svc.vip.map(|v| v.to_string()).unwrap_or_default(),
                    other_vips: svc.other_vips.iter().map(ToString::to_string).collect(),
                    ports: svc
                        .ports
                        .iter()
                        .map(|p| proto::ServicePort {
                            name: p.name.clone(),
                            port: u32::from(p.port),
                            protocol: p.protocol().into(),
                        })
                        .collect(),
                    endpoints,
                    waypoint: self.waypoint_of(svc).unwrap_or_default(),
                };
                (key.clone(), wire)
            })
            .collect()
    }

    /// Every PeerAuthentication in wire form, by `namespace/name`.
    pub fn peer_authentications_wire(&self) -> BTreeMap<String, proto::PeerAuthentication> {
        self.peer_authentications.iter().map(|(k, p)| (k.clone(), proto::PeerAuthentication::from(p))).collect()
    }
}

/// The endpoints of `svc` from its EndpointSlices: a service port maps to the slice port of the
/// same name (EndpointSlice ports carry the resolved targetPort); an address seen in several
/// slices counts once.
fn slice_endpoints(
    svc: &Service,
    slices: &[&EndpointSlice],
    pod_by_ip: &BTreeMap<IpAddr, &Pod>,
) -> Vec<proto::ServiceEndpoint> {
    let mut by_ip: BTreeMap<IpAddr, proto::ServiceEndpoint> = BTreeMap::new();
    for slice in slices {
        for e in &slice.endpoints {
            let workload_uid = e.pod_uid.clone().or_else(|| pod_by_ip.get(&e.ip).map(|p| p.uid.clone()));
            let endpoint = by_ip.entry(e.ip).or_insert_with(|| proto::ServiceEndpoint {
                workload_uid: workload_uid.unwrap_or_default(),
                ip: e.ip.to_string(),
                ready: e.ready,
                target_ports: Default::default(),
            });
            for sp in &svc.ports {
                if let Some(target) = slice.ports.get(&sp.name) {
                    endpoint.target_ports.insert(u32::from(sp.port), u32::from(*target));
                }
            }
        }
    }
    by_ip.into_values().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ns(name: &str, enabled: bool) -> Namespace {
        let mut labels = BTreeMap::new();
        if enabled {
            labels.insert(DATAPLANE_MODE_LABEL.to_string(), "enabled".to_string());
        }
        Namespace { name: name.to_string(), labels }
    }

    fn pod(name: &str, namespace: &str, opt_out: bool) -> Pod {
        let mut labels = BTreeMap::new();
        if opt_out {
            labels.insert(DATAPLANE_MODE_LABEL.to_string(), "none".to_string());
        }
        Pod {
            uid: format!("{namespace}/{name}"),
            name: name.to_string(),
            namespace: namespace.to_string(),
            node: "node1".to_string(),
            service_account: "default".to_string(),
            ip: "10.244.1.2".parse().unwrap(),
            other_ips: Vec::new(),
            netns: "/var/run/netns/x".to_string(),
            labels,
            container_ports: BTreeMap::new(),
            ready: true,
        }
    }

    #[test]
    fn capture_decision_table() {
        let mut model = Model::default();
        model.namespaces.insert("on".into(), ns("on", true));
        model.namespaces.insert("off".into(), ns("off", false));
        let cases = [
            (pod("a", "on", false), true),
            (pod("b", "on", true), false),
            (pod("c", "off", false), false),
            (pod("d", "missing", false), false),
        ];
        for (pod, want) in cases {
            assert_eq!(model.captured(&pod), want, "pod {}/{}", pod.namespace, pod.name);
        }
    }

    #[test]
    fn diff_reports_changes_and_removals() {
        let mut model = Model::default();
        model.namespaces.insert("on".into(), ns("on", true));
        model.pods.insert("on/a".into(), pod("a", "on", false));
        model.pods.insert("on/b".into(), pod("b", "on", false));
        let before = model.workloads();
        model.pods.get_mut("on/a").unwrap().labels.insert(DATAPLANE_MODE_LABEL.into(), "none".into());
        model.pods.remove("on/b");
        let after = model.workloads();
        // The delta the config server sends (ferrymesh_api::kinds).
        let diff = |old, new| {
            let mut update = ferrymesh_api::config::ConfigUpdate::default();
            ferrymesh_api::kinds::put_changes(&mut update, Some(old), new);
            ferrymesh_api::kinds::take_changes::<proto::Workload>(&mut update)
        };
        let (upserted, removed) = diff(&before, &after);
        assert_eq!(upserted.len(), 1);
        assert_eq!(upserted[0].uid, "on/a");
        assert!(!upserted[0].captured);
        assert_eq!(removed, vec!["on/b".to_string()]);
        assert_eq!(diff(&after, &after), (vec![], vec![]));
    }

    #[test]
    fn a_port_declares_its_protocol_by_app_protocol_then_name() {
        let port = |name: &str, app: Option<&str>| {
            ServicePort {
                name: name.into(),
                port: 80,
                target: TargetPort::Number(80),
                app_protocol: app.map(String::from),
            }
            .protocol()
        };
        assert_eq!(port("http", None), "http");
        assert_eq!(port("grpc-api", None), "http");
        assert_eq!(port("http2", None), "http");
        assert_eq!(port("tcp-db", None), "tcp");
        assert_eq!(port("mysql", None), "tcp");
        assert_eq!(port("web", None), "", "a name that is no protocol declares nothing");
        assert_eq!(port("", None), "");
        assert_eq!(port("http", Some("tcp")), "tcp", "appProtocol over the name");
        assert_eq!(port("db", Some("kubernetes.io/h2c")), "http");
        assert_eq!(port("db", Some("HTTP")), "http");
    }
}
