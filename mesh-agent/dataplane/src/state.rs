//! The agent's state store: workloads received from mesh-ctrl as plain domain types, indexed
//! by UID and by IP, services by VIP, the policies in force, and the control-plane link status.
//! Protobuf stops at `apply` (and starts again at `dump`, for the admin API): the data path and
//! the enroller read only these types. Every kind goes through the same [`Stored`] path, its
//! changes taken from the update by the kinds table (`ferrymesh_api::kinds`). An update is
//! converted whole before anything changes, so a bad update is rejected without touching the
//! store.

use std::collections::{BTreeMap, HashMap};
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use ferrymesh_api::config as proto;
use ferrymesh_api::kinds::{take_changes, ConfigKind, ConfigSet};
use ferrymesh_policy::authn::{RequestAuthentication, RequestAuthentications};
use ferrymesh_policy::{AuthorizationPolicy, PeerAuthentication, PolicySet};
use ferrymesh_route::destination::{DestinationRule, DestinationRules};
use ferrymesh_route::traffic::{TrafficPolicies, TrafficPolicy};
use ferrymesh_route::Route;
use tokio::sync::watch;

use crate::identity::Identity;
use crate::trust::{TrustBundle, TrustReceiver};

/// A workload (pod) of the mesh.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Workload {
    /// Kubernetes UID.
    pub uid: String,
    /// Pod name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Node the pod runs on.
    pub node: String,
    /// Service account.
    pub service_account: String,
    /// Pod IP.
    pub ip: IpAddr,
    /// Its other IPs (the other family's, when dual-stack).
    pub other_ips: Vec<IpAddr>,
    /// Path of the pod's network namespace.
    pub netns: PathBuf,
    /// Pod labels.
    pub labels: BTreeMap<String, String>,
    /// Whether its node's agent captures it.
    pub captured: bool,
    /// `namespace/name` of the waypoint traffic addressed to it passes.
    pub waypoint: Option<String>,
}

/// An endpoint of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceEndpoint {
    /// UID of the endpoint's workload.
    pub workload_uid: String,
    /// Pod IP.
    pub ip: IpAddr,
    /// Whether the pod is Ready.
    pub ready: bool,
    /// Service port -> pod port.
    pub target_ports: HashMap<u16, u16>,
}

/// A service: a VIP in front of endpoints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Namespace.
    pub namespace: String,
    /// Name.
    pub name: String,
    /// ClusterIP; None when headless.
    pub vip: Option<IpAddr>,
    /// A dual-stack Service's ClusterIP of the other family.
    pub other_vips: Vec<IpAddr>,
    /// Service ports.
    pub ports: Vec<u16>,
    /// The ports whose traffic a waypoint relays as opaque TCP (declared so).
    pub tcp_ports: Vec<u16>,
    /// The ports whose traffic a waypoint serves as HTTP (declared so); a waypoint serves the
    /// ports that declare nothing as HTTP too.
    pub http_ports: Vec<u16>,
    /// Endpoints.
    pub endpoints: Vec<ServiceEndpoint>,
    /// `namespace/name` of the waypoint it is bound to.
    pub waypoint: Option<String>,
}

impl Service {
    /// Its ClusterIPs: the VIP, then the other family's.
    pub fn vips(&self) -> impl Iterator<Item = IpAddr> + '_ {
        self.vip.iter().chain(&self.other_vips).copied()
    }

    /// What `port` declares its traffic is: `http`, `tcp`, or empty (nothing declared).
    pub fn protocol(&self, port: u16) -> &'static str {
        if self.tcp_ports.contains(&port) {
            "tcp"
        } else if self.http_ports.contains(&port) {
            "http"
        } else {
            ""
        }
    }
}

/// A waypoint: the L7 proxy Services may be bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Waypoint {
    /// Namespace.
    pub namespace: String,
    /// Name (and service account).
    pub name: String,
    /// `service`, `workload`, `all` or `none`.
    pub traffic_type: String,
    /// IPs of its ready pods.
    pub addresses: Vec<IpAddr>,
}

impl TryFrom<proto::Waypoint> for Waypoint {
    type Error = InvalidUpdate;

    fn try_from(w: proto::Waypoint) -> Result<Self, Self::Error> {
        let addresses = w
            .addresses
            .iter()
            .map(|a| {
                a.parse().map_err(|e| InvalidUpdate::Waypoint {
                    waypoint: format!("{}/{}", w.namespace, w.name),
                    field: "addresses",
                    message: format!("{a:?}: {e}"),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { namespace: w.namespace, name: w.name, traffic_type: w.traffic_type, addresses })
    }
}

impl TryFrom<proto::Service> for Service {
    type Error = InvalidUpdate;

    fn try_from(s: proto::Service) -> Result<Self, Self::Error> {
        let invalid = |field, message: String| InvalidUpdate::Service {
            service: format!("{}/{}", s.namespace, s.name),
            field,
            message,
        };
        let vip = match s.vip.as_str() {
            "" => None,
            v => Some(v.parse().map_err(|e| invalid("vip", format!("{v:?}: {e}")))?),
        };
        let other_vips = s
            .other_vips
            .iter()
            .map(|v| v.parse().map_err(|e| invalid("other_vips", format!("{v:?}: {e}"))))
            .collect::<Result<_, _>>()?;
        let port = |p: u32, field| u16::try_from(p).map_err(|_| invalid(field, format!("{p} is not a port")));
        let ports = s.ports.iter().map(|p| port(p.port, "ports")).collect::<Result<_, _>>()?;
        let declared = |protocol: &str| -> Result<Vec<u16>, InvalidUpdate> {
            s.ports.iter().filter(|p| p.protocol == protocol).map(|p| port(p.port, "ports")).collect()
        };
        let (tcp_ports, http_ports) = (declared("tcp")?, declared("http")?);
        if let Some(p) = s.ports.iter().find(|p| !["", "tcp", "http"].contains(&p.protocol.as_str())) {
            return Err(invalid("ports.protocol", format!("{:?} is not http, tcp or empty", p.protocol)));
        }
        let mut endpoints = Vec::new();
        for e in &s.endpoints {
            let ip = e.ip.parse().map_err(|err| invalid("endpoints.ip", format!("{:?}: {err}", e.ip)))?;
            let mut target_ports = HashMap::new();
            for (from, to) in &e.target_ports {
                target_ports.insert(port(*from, "endpoints.target_ports")?, port(*to, "endpoints.target_ports")?);
            }
            endpoints.push(ServiceEndpoint { workload_uid: e.workload_uid.clone(), ip, ready: e.ready, target_ports });
        }
        let waypoint = (!s.waypoint.is_empty()).then(|| s.waypoint.clone());
        Ok(Self {
            namespace: s.namespace.clone(),
            name: s.name.clone(),
            vip,
            other_vips,
            ports,
            tcp_ports,
            http_ports,
            endpoints,
            waypoint,
        })
    }
}

/// An update from mesh-ctrl that cannot be applied.
#[derive(Debug, thiserror::Error)]
pub enum InvalidUpdate {
    /// A workload does not convert.
    #[error("workload {uid}: field {field}: {message}")]
    Workload {
        /// UID of the offending workload.
        uid: String,
        /// Field at fault.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A policy does not convert.
    #[error("{0}")]
    Policy(#[from] ferrymesh_policy::wire::WireError),
    /// A route does not convert.
    #[error("{0}")]
    Route(#[from] ferrymesh_route::wire::WireError),
    /// A TrafficPolicy does not convert.
    #[error("{0}")]
    TrafficPolicy(#[from] ferrymesh_route::traffic::wire::WireError),
    /// A DestinationRule does not convert.
    #[error("{0}")]
    DestinationRule(#[from] ferrymesh_route::destination::wire::WireError),
    /// A waypoint does not convert.
    #[error("waypoint {waypoint}: field {field}: {message}")]
    Waypoint {
        /// `namespace/name`.
        waypoint: String,
        /// Field at fault.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A service does not convert.
    #[error("service {service}: field {field}: {message}")]
    Service {
        /// `namespace/name`.
        service: String,
        /// Field at fault.
        field: &'static str,
        /// What is wrong.
        message: String,
    },
}

/// A kind the store holds: converted from its wire form (`ferrymesh_api::kinds`) when an update
/// arrives, and back for the admin dump. Adding a kind to the store is this impl, a table in
/// the store and its line in [`State::apply`] and [`State::dump`].
pub trait Stored: TryFrom<Self::Wire> + Sized
where
    InvalidUpdate: From<Self::Error>,
{
    /// Its wire form.
    type Wire: ConfigKind;
    /// Back to the wire form.
    fn wire(&self) -> Self::Wire;
}

impl Stored for Workload {
    type Wire = proto::Workload;
    fn wire(&self) -> proto::Workload {
        proto::Workload {
            uid: self.uid.clone(),
            name: self.name.clone(),
            namespace: self.namespace.clone(),
            node: self.node.clone(),
            service_account: self.service_account.clone(),
            ip: self.ip.to_string(),
            other_ips: self.other_ips.iter().map(IpAddr::to_string).collect(),
            netns: self.netns.display().to_string(),
            labels: self.labels.clone().into_iter().collect(),
            captured: self.captured,
            waypoint: self.waypoint.clone().unwrap_or_default(),
        }
    }
}

impl Stored for Service {
    type Wire = proto::Service;
    fn wire(&self) -> proto::Service {
        proto::Service {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            vip: self.vip.map(|v| v.to_string()).unwrap_or_default(),
            other_vips: self.other_vips.iter().map(ToString::to_string).collect(),
            ports: self
                .ports
                .iter()
                .map(|p| proto::ServicePort {
                    name: String::new(),
                    port: u32::from(*p),
                    protocol: self.protocol(*p).into(),
                })
                .collect(),
            endpoints: self
                .endpoints
                .iter()
                .map(|e| proto::ServiceEndpoint {
                    workload_uid: e.workload_uid.clone(),
                    ip: e.ip.to_string(),
                    ready: e.ready,
                    target_ports: e.target_ports.iter().map(|(a, b)| (u32::from(*a), u32::from(*b))).collect(),
                })
                .collect(),
            waypoint: self.waypoint.clone().unwrap_or_default(),
        }
    }
}

impl Stored for Waypoint {
    type Wire = proto::Waypoint;
    fn wire(&self) -> proto::Waypoint {
        proto::Waypoint {
            namespace: self.namespace.clone(),
            name: self.name.clone(),
            traffic_type: self.traffic_type.clone(),
            addresses: self.addresses.iter().map(ToString::to_string).collect(),
        }
    }
}

impl Stored for AuthorizationPolicy {
    type Wire = proto::AuthorizationPolicy;
    fn wire(&self) -> proto::AuthorizationPolicy {
        self.into()
    }
}

impl Stored for Route {
    type Wire = proto::Route;
    fn wire(&self) -> proto::Route {
        self.into()
    }
}

impl Stored for TrafficPolicy {
    type Wire = proto::TrafficPolicy;
    fn wire(&self) -> proto::TrafficPolicy {
        self.into()
    }
}

impl Stored for DestinationRule {
    type Wire = proto::DestinationRule;
    fn wire(&self) -> proto::DestinationRule {
        self.into()
    }
}

impl Stored for RequestAuthentication {
    type Wire = proto::RequestAuthentication;
    fn wire(&self) -> proto::RequestAuthentication {
        self.into()
    }
}

impl Stored for PeerAuthentication {
    type Wire = proto::PeerAuthentication;
    fn wire(&self) -> proto::PeerAuthentication {
        self.into()
    }
}

/// Objects of one kind, by their wire key.
type Table<T> = BTreeMap<String, Arc<T>>;

/// An update's changes of one kind, converted to the store's type.
struct Changes<T> {
    /// Added or changed, with their keys.
    upserted: Vec<(String, T)>,
    /// Keys removed.
    removed: Vec<String>,
}

impl<T: Stored> Changes<T>
where
    InvalidUpdate: From<T::Error>,
{
    /// Takes the kind's changes out of `update` and converts them; the first object that does
    /// not convert fails them all.
    fn take(update: &mut proto::ConfigUpdate) -> Result<Self, InvalidUpdate> {
        let (upserted, removed) = take_changes::<T::Wire>(update);
        let upserted = upserted
            .into_iter()
            .map(|wire| {
                let key = wire.key();
                T::try_from(wire).map(|object| (key, object)).map_err(InvalidUpdate::from)
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { upserted, removed })
    }

    /// Applies them to `table` (emptied first for a snapshot); whether anything changed.
    fn apply(self, table: &mut Table<T>, snapshot: bool) -> bool {
        let changed = snapshot || !self.upserted.is_empty() || !self.removed.is_empty();
        if snapshot {
            table.clear();
        }
        for key in &self.removed {
            table.remove(key);
        }
        for (key, object) in self.upserted {
            table.insert(key, Arc::new(object));
        }
        changed
    }
}

/// Puts `table` into `set` in wire form.
fn dump_table<T: Stored>(table: &Table<T>, set: &mut ConfigSet)
where
    InvalidUpdate: From<T::Error>,
{
    set.extend(table.values().map(|object| object.wire()));
}

impl Workload {
    /// Its identity: namespace and service account.
    pub fn identity(&self) -> Identity {
        Identity { namespace: self.namespace.clone(), service_account: self.service_account.clone() }
    }

    /// Every IP of the pod, its primary one first.
    pub fn addresses(&self) -> impl Iterator<Item = IpAddr> + '_ {
        std::iter::once(self.ip).chain(self.other_ips.iter().copied())
    }

    /// Its IP of the family of `peer` (the one a connection with `peer` uses), else its primary.
    pub fn ip_for(&self, peer: IpAddr) -> IpAddr {
        self.addresses().find(|ip| ip.is_ipv6() == peer.is_ipv6()).unwrap_or(self.ip)
    }

    /// Its IPv6 address, if it has one.
    pub fn ipv6(&self) -> Option<IpAddr> {
        self.addresses().find(IpAddr::is_ipv6)
    }
}

impl TryFrom<proto::Workload> for Workload {
    type Error = InvalidUpdate;

    fn try_from(w: proto::Workload) -> Result<Self, Self::Error> {
        let invalid = |field, message: String| InvalidUpdate::Workload { uid: w.uid.clone(), field, message };
        if w.uid.is_empty() {
            return Err(invalid("uid", "empty".into()));
        }
        let ip = w.ip.parse().map_err(|e| invalid("ip", format!("{:?}: {e}", w.ip)))?;
        let other_ips = w
            .other_ips
            .iter()
            .map(|o| o.parse().map_err(|e| invalid("other_ips", format!("{o:?}: {e}"))))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            ip,
            other_ips,
            uid: w.uid,
            name: w.name,
            namespace: w.namespace,
            node: w.node,
            service_account: w.service_account,
            netns: PathBuf::from(w.netns),
            labels: w.labels.into_iter().collect(),
            captured: w.captured,
            waypoint: (!w.waypoint.is_empty()).then_some(w.waypoint),
        })
    }
}

#[derive(Debug, Default)]
struct Inner {
    version: u64,
    ctrl_connected: bool,
    /// Namespaces opted in to the mesh.
    captured_namespaces: std::collections::BTreeSet<String>,
    /// Workloads by UID.
    workloads: Table<Workload>,
    by_ip: HashMap<IpAddr, Arc<Workload>>,
    /// Services by `namespace/name`.
    services: Table<Service>,
    services_by_vip: HashMap<IpAddr, Arc<Service>>,
    /// Policies by `namespace/name`.
    authorization_policies: Table<AuthorizationPolicy>,
    peer_authentications: Table<PeerAuthentication>,
    /// Gateway API routes by `Kind namespace/name` (a waypoint routes with them).
    routes: Table<Route>,
    /// Counts the updates that changed the routes.
    routes_generation: u64,
    /// Waypoints by `namespace/name`.
    waypoints: Table<Waypoint>,
    /// TrafficPolicies by `namespace/name`, and the set a waypoint looks them up in.
    traffic_policies: Table<TrafficPolicy>,
    traffic: Arc<TrafficPolicies>,
    /// DestinationRules by `namespace/name`, and the set a waypoint looks them up in.
    destination_rules: Table<DestinationRule>,
    destinations: Arc<DestinationRules>,
    /// RequestAuthentications by `namespace/name`, and the set a waypoint looks them up in.
    request_authentications: Table<RequestAuthentication>,
    authentications: Arc<RequestAuthentications>,
}

/// The store. Readers take snapshots; `apply` is the single writer of workloads.
#[derive(Debug)]
pub struct State {
    inner: RwLock<Inner>,
    changed: watch::Sender<u64>,
    trust_domain: watch::Sender<String>,
    trust: watch::Sender<Option<Arc<TrustBundle>>>,
    policies: watch::Sender<Arc<PolicySet>>,
}

impl Default for State {
    fn default() -> Self {
        Self {
            inner: RwLock::default(),
            changed: watch::channel(0).0,
            trust_domain: watch::channel(String::new()).0,
            trust: watch::channel(None).0,
            policies: watch::channel(Arc::new(PolicySet::default())).0,
        }
    }
}

impl State {
    /// Applies a snapshot or delta from mesh-ctrl. All or nothing: every object is converted
    /// before anything changes.
    pub fn apply(&self, mut update: proto::ConfigUpdate) -> Result<(), InvalidUpdate> {
        let workloads = Changes::<Workload>::take(&mut update)?;
        let services = Changes::<Service>::take(&mut update)?;
        let authorization_policies = Changes::<AuthorizationPolicy>::take(&mut update)?;
        let peer_authentications = Changes::<PeerAuthentication>::take(&mut update)?;
        let routes = Changes::<Route>::take(&mut update)?;
        let waypoints = Changes::<Waypoint>::take(&mut update)?;
        let traffic_policies = Changes::<TrafficPolicy>::take(&mut update)?;
        let destination_rules = Changes::<DestinationRule>::take(&mut update)?;
        let request_authentications = Changes::<RequestAuthentication>::take(&mut update)?;
        let snapshot = update.snapshot;
        let captured_namespaces = std::mem::take(&mut update.captured_namespaces).into_iter().collect();
        let policies = {
            let mut inner = self.inner.write().expect("state lock");
            inner.captured_namespaces = captured_namespaces;
            if workloads.apply(&mut inner.workloads, snapshot) {
                let by_ip =
                    inner.workloads.values().flat_map(|w| w.addresses().map(move |ip| (ip, w.clone()))).collect();
                inner.by_ip = by_ip;
            }
            if services.apply(&mut inner.services, snapshot) {
                let by_vip = inner.services.values().flat_map(|s| s.vips().map(move |vip| (vip, s.clone()))).collect();
                inner.services_by_vip = by_vip;
            }
            let policies_changed = authorization_policies.apply(&mut inner.authorization_policies, snapshot)
                | peer_authentications.apply(&mut inner.peer_authentications, snapshot);
            if routes.apply(&mut inner.routes, snapshot) {
                inner.routes_generation += 1;
            }
            waypoints.apply(&mut inner.waypoints, snapshot);
            if traffic_policies.apply(&mut inner.traffic_policies, snapshot) {
                inner.traffic = Arc::new(TrafficPolicies::new(inner.traffic_policies.values().cloned().collect()));
            }
            if destination_rules.apply(&mut inner.destination_rules, snapshot) {
                inner.destinations =
                    Arc::new(DestinationRules::new(inner.destination_rules.values().cloned().collect()));
            }
            if request_authentications.apply(&mut inner.request_authentications, snapshot) {
                inner.authentications = Arc::new(RequestAuthentications::new(
                    inner.request_authentications.values().map(|p| (**p).clone()).collect(),
                ));
            }
            inner.version = update.version;
            policies_changed.then(|| {
                PolicySet::new(
                    inner.authorization_policies.values().map(|p| (**p).clone()).collect(),
                    inner.peer_authentications.values().map(|p| (**p).clone()).collect(),
                )
            })
        };
        if let Some(policies) = policies {
            self.policies.send_if_modified(|current| {
                let changed = **current != policies;
                if changed {
                    *current = Arc::new(policies);
                }
                changed
            });
        }
        if !update.trust_domain.is_empty() {
            self.trust_domain.send_if_modified(|td| {
                let changed = *td != update.trust_domain;
                td.clone_from(&update.trust_domain);
                changed
            });
        }
        self.changed.send_replace(update.version);
        Ok(())
    }

    /// The policies now in force.
    pub fn policies(&self) -> Arc<PolicySet> {
        self.policies.borrow().clone()
    }

    /// A receiver that changes whenever the policies change.
    pub fn subscribe_policies(&self) -> watch::Receiver<Arc<PolicySet>> {
        self.policies.subscribe()
    }

    /// The mesh's trust domain as mesh-ctrl announces it (empty until the first update).
    pub fn trust_domain(&self) -> watch::Receiver<String> {
        self.trust_domain.subscribe()
    }

    /// Puts the trust bundle `bundle` in force (mesh-ctrl sent it, and it holds a pinned root).
    pub fn set_trust(&self, bundle: TrustBundle) {
        self.trust.send_replace(Some(Arc::new(bundle)));
    }

    /// The trust bundle in force (None until mesh-ctrl sent one).
    pub fn trust(&self) -> TrustReceiver {
        self.trust.subscribe()
    }

    /// Records whether the config stream from mesh-ctrl is up.
    pub fn set_ctrl_connected(&self, connected: bool) {
        self.inner.write().expect("state lock").ctrl_connected = connected;
    }

    /// Whether the config stream from mesh-ctrl is up, and the config version held.
    pub fn ctrl_status(&self) -> (bool, u64) {
        let inner = self.inner.read().expect("state lock");
        (inner.ctrl_connected, inner.version)
    }

    /// Whether `namespace` is opted in to the mesh (as of the config held).
    pub fn namespace_captured(&self, namespace: &str) -> bool {
        self.inner.read().expect("state lock").captured_namespaces.contains(namespace)
    }

    /// The workload with `uid`, as it is now.
    pub fn workload(&self, uid: &str) -> Option<Arc<Workload>> {
        self.inner.read().expect("state lock").workloads.get(uid).cloned()
    }

    /// The workload that owns `ip`, if any.
    pub fn workload_by_ip(&self, ip: IpAddr) -> Option<Arc<Workload>> {
        self.inner.read().expect("state lock").by_ip.get(&ip).cloned()
    }

    /// The service whose ClusterIP is `ip`, if any.
    pub fn service_by_vip(&self, ip: IpAddr) -> Option<Arc<Service>> {
        self.inner.read().expect("state lock").services_by_vip.get(&ip).cloned()
    }

    /// What traffic to `port` of workload `uid` declares itself to be, from the Services that
    /// send a port of theirs there (`http` when one declares HTTP, else `tcp` when one declares
    /// an opaque protocol; empty when none declares anything).
    pub fn workload_protocol(&self, uid: &str, port: u16) -> &'static str {
        let inner = self.inner.read().expect("state lock");
        let mut declared = "";
        for service in inner.services.values() {
            let targeting = service.endpoints.iter().filter(|e| e.workload_uid == uid).flat_map(|e| &e.target_ports);
            for (service_port, _) in targeting.filter(|(_, target)| **target == port) {
                match service.protocol(*service_port) {
                    "http" => return "http",
                    "tcp" => declared = "tcp",
                    _ => {}
                }
            }
        }
        declared
    }

    /// The service `namespace/name`, if held.
    pub fn service(&self, key: &str) -> Option<Arc<Service>> {
        self.inner.read().expect("state lock").services.get(key).cloned()
    }

    /// Everything held, in wire form by kind and key (the admin API's config dump).
    pub fn dump(&self) -> ConfigSet {
        let inner = self.inner.read().expect("state lock");
        let mut set = ConfigSet::default();
        dump_table(&inner.workloads, &mut set);
        dump_table(&inner.services, &mut set);
        dump_table(&inner.authorization_policies, &mut set);
        dump_table(&inner.peer_authentications, &mut set);
        dump_table(&inner.routes, &mut set);
        dump_table(&inner.waypoints, &mut set);
        dump_table(&inner.traffic_policies, &mut set);
        dump_table(&inner.destination_rules, &mut set);
        dump_table(&inner.request_authentications, &mut set);
        set
    }

    /// Workloads of `node` that are to be captured, by UID.
    pub fn captured_on(&self, node: &str) -> HashMap<String, Arc<Workload>> {
        let inner = self.inner.read().expect("state lock");
        inner.workloads.values().filter(|w| w.captured && w.node == node).map(|w| (w.uid.clone(), w.clone())).collect()
    }

    /// The waypoint `namespace/name`, if held.
    pub fn waypoint(&self, key: &str) -> Option<Arc<Waypoint>> {
        self.inner.read().expect("state lock").waypoints.get(key).cloned()
    }

    /// Every route held, by `Kind namespace/name`.
    pub fn routes(&self) -> Vec<Arc<Route>> {
        self.inner.read().expect("state lock").routes.values().cloned().collect()
    }

    /// A number that changes whenever the routes do (what was built from them can be kept
    /// until it changes).
    pub fn routes_generation(&self) -> u64 {
        self.inner.read().expect("state lock").routes_generation
    }

    /// Every TrafficPolicy held, as the set requests look them up in.
    pub fn traffic_policies(&self) -> Arc<TrafficPolicies> {
        self.inner.read().expect("state lock").traffic.clone()
    }

    /// Every DestinationRule held, by the Service each is for.
    pub fn destination_rules(&self) -> Arc<DestinationRules> {
        self.inner.read().expect("state lock").destinations.clone()
    }

    /// Every RequestAuthentication held, as the set requests look them up in.
    pub fn request_authentications(&self) -> Arc<RequestAuthentications> {
        self.inner.read().expect("state lock").authentications.clone()
    }

    /// A receiver that changes whenever an update is applied.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(uid: &str, ip: &str, node: &str, captured: bool) -> proto::Workload {
        proto::Workload {
            uid: uid.into(),
            name: uid.into(),
            namespace: "ns".into(),
            node: node.into(),
            ip: ip.into(),
            netns: format!("/var/run/netns/{uid}"),
            captured,
            ..Default::default()
        }
    }

    #[test]
    fn snapshot_then_delta() {
        let state = State::default();
        let snapshot = proto::ConfigUpdate {
            version: 1,
            snapshot: true,
            upserted: vec![workload("a", "10.0.0.1", "n1", true), workload("b", "10.0.0.2", "n2", true)],
            removed: vec![],
            trust_domain: "example.org".into(),
            ..Default::default()
        };
        state.apply(snapshot).unwrap();
        assert_eq!(state.captured_on("n1").keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(state.workload_by_ip("10.0.0.2".parse().unwrap()).unwrap().uid, "b");
        let delta = proto::ConfigUpdate {
            version: 2,
            snapshot: false,
            upserted: vec![workload("a", "10.0.0.1", "n1", false)],
            removed: vec!["b".into()],
            trust_domain: "example.org".into(),
            ..Default::default()
        };
        state.apply(delta).unwrap();
        assert!(state.captured_on("n1").is_empty());
        assert!(state.workload_by_ip("10.0.0.2".parse().unwrap()).is_none());
        assert_eq!(state.ctrl_status().1, 2);
        assert_eq!(*state.trust_domain().borrow(), "example.org");
    }

    #[test]
    fn a_bad_update_changes_nothing() {
        let state = State::default();
        let good = proto::ConfigUpdate {
            version: 1,
            snapshot: true,
            upserted: vec![workload("a", "10.0.0.1", "n1", true)],
            ..Default::default()
        };
        state.apply(good).unwrap();
        let bad = proto::ConfigUpdate {
            version: 2,
            snapshot: true,
            upserted: vec![workload("c", "10.0.0.3", "n1", true), workload("d", "not-an-ip", "n1", true)],
            ..Default::default()
        };
        let e = state.apply(bad).unwrap_err();
        assert_eq!(e.to_string(), "workload d: field ip: \"not-an-ip\": invalid IP address syntax");
        assert_eq!(state.captured_on("n1").keys().collect::<Vec<_>>(), vec!["a"]);
        assert_eq!(state.ctrl_status().1, 1);
    }

    fn service(name: &str, vip: &str) -> proto::Service {
        proto::Service { namespace: "ns".into(), name: name.into(), vip: vip.into(), ..Default::default() }
    }

    fn allow(name: &str) -> proto::AuthorizationPolicy {
        proto::AuthorizationPolicy { namespace: "ns".into(), name: name.into(), ..Default::default() }
    }

    #[test]
    fn services_and_policies_arrive_as_deltas() {
        let state = State::default();
        let snapshot = proto::ConfigUpdate {
            version: 1,
            snapshot: true,
            services: vec![service("a", "10.96.0.1"), service("b", "10.96.0.2")],
            authorization_policies: vec![allow("p1"), allow("p2")],
            ..Default::default()
        };
        state.apply(snapshot).unwrap();
        assert_eq!(state.policies().authorization_policies().len(), 2);
        // A delta touching only services leaves the policies (and their watchers) alone.
        let mut policies = state.subscribe_policies();
        policies.mark_unchanged();
        let delta = proto::ConfigUpdate {
            version: 2,
            services: vec![service("a", "10.96.0.9")],
            removed_services: vec!["ns/b".into()],
            ..Default::default()
        };
        state.apply(delta).unwrap();
        assert!(!policies.has_changed().unwrap(), "policies untouched by a service delta");
        assert!(state.service_by_vip("10.96.0.1".parse().unwrap()).is_none(), "a's old VIP is gone");
        assert_eq!(state.service_by_vip("10.96.0.9".parse().unwrap()).unwrap().name, "a");
        assert!(state.service_by_vip("10.96.0.2".parse().unwrap()).is_none(), "b was removed");
        let delta = proto::ConfigUpdate {
            version: 3,
            removed_authorization_policies: vec!["ns/p1".into()],
            ..Default::default()
        };
        state.apply(delta).unwrap();
        assert!(policies.has_changed().unwrap());
        let names: Vec<String> = state.policies().authorization_policies().iter().map(|p| p.name.clone()).collect();
        assert_eq!(names, ["p2"]);
        assert_eq!(state.service_by_vip("10.96.0.9".parse().unwrap()).unwrap().name, "a", "services kept");
    }

    #[test]
    fn a_dual_stack_service_is_found_by_either_vip() {
        let state = State::default();
        let mut web = service("web", "10.96.0.1");
        web.other_vips = vec!["fd00:10:96::1".into()];
        state
            .apply(proto::ConfigUpdate { version: 1, snapshot: true, services: vec![web], ..Default::default() })
            .unwrap();
        for vip in ["10.96.0.1", "fd00:10:96::1"] {
            assert_eq!(state.service_by_vip(vip.parse().unwrap()).unwrap().name, "web", "{vip}");
        }
        // Single-stack again: the other family's VIP is gone.
        let delta =
            proto::ConfigUpdate { version: 2, services: vec![service("web", "10.96.0.1")], ..Default::default() };
        state.apply(delta).unwrap();
        assert!(state.service_by_vip("fd00:10:96::1".parse().unwrap()).is_none());
        assert_eq!(state.service_by_vip("10.96.0.1".parse().unwrap()).unwrap().name, "web");
        // A bad one is named, and nothing of its update is applied.
        let mut bad = service("web", "10.96.0.2");
        bad.other_vips = vec!["fd00::zz".into()];
        let e = state.apply(proto::ConfigUpdate { version: 3, services: vec![bad], ..Default::default() }).unwrap_err();
        assert!(e.to_string().starts_with("service ns/web: field other_vips: \"fd00::zz\""), "{e}");
        assert_eq!(state.service_by_vip("10.96.0.1".parse().unwrap()).unwrap().name, "web");
    }

    #[test]
    fn the_dump_holds_every_kind_as_applied() {
        let state = State::default();
        let peer =
            proto::PeerAuthentication { namespace: "ns".into(), name: "strict".into(), mode: 2, ..Default::default() };
        let mut sent =
            ConfigSet::from_iter([workload("a", "10.0.0.1", "n1", true), workload("b", "10.0.0.2", "n2", false)]);
        sent.insert(service("web", "10.96.0.1"));
        sent.insert(allow("p1"));
        sent.insert(peer);
        sent.insert(proto::Route {
            namespace: "ns".into(),
            name: "split".into(),
            kind: "HTTPRoute".into(),
            parents: vec![proto::RouteParent { namespace: "ns".into(), service: "web".into(), port: 80 }],
            rules: vec![proto::RouteRule {
                matches: vec![proto::RouteMatch::default()],
                backends: vec![proto::RouteBackend {
                    namespace: "ns".into(),
                    service: "web".into(),
                    port: 80,
                    weight: 1,
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        });
        let before = state.routes_generation();
        state.apply(proto::ConfigUpdate { version: 1, ..sent.to_snapshot() }).unwrap();
        assert_eq!(state.dump(), sent, "what was applied comes back, kind by kind");
        let with_route = state.routes_generation();
        assert_ne!(with_route, before, "the route's arrival changes the routes' generation");
        let delta = proto::ConfigUpdate { version: 2, removed: vec!["b".into()], ..Default::default() };
        state.apply(delta).unwrap();
        assert_eq!(state.routes_generation(), with_route, "a workload delta leaves the routes' generation");
        let dump = state.dump();
        assert_eq!(dump.workloads.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(
            (dump.services.len(), dump.authorization_policies.len(), dump.peer_authentications.len()),
            (1, 1, 1)
        );
    }
}
