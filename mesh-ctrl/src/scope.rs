//! What each config stream receives of the model: its client's scope, decided from who the
//! client proved to be ([`crate::ca::auth::Caller`]), never from what it asks for. mesh-ctrl
//! streams a client its view of each snapshot, and deltas between its views.
//!
//! - A node's agent (node-trusted: it obtains the identity of any pod of its node) receives
//!   every workload of its node in full; every other workload as a peer: its UID, name,
//!   namespace, node, ServiceAccount, IPs, whether it is captured and its waypoint, which is what
//!   a connection to it needs (is it meshed, which identity must it prove, through which
//!   waypoint), without its labels or netns. It receives every Service and waypoint (a pod may
//!   connect to any), the policies, and the L7 config that `meshctl` explains from the node
//!   agent's copy.
//! - A waypoint (run by a tenant in its own namespace) receives only what serving its bound
//!   Services and workloads needs: those Services and the Services their routes send to, the
//!   routes attached to them, the DestinationRules of those Services, and the policies,
//!   RequestAuthentications and TrafficPolicies of the namespaces involved (its own, its
//!   Services', backends' and their endpoints', the root namespace); every workload as a peer (a request's client
//!   may be any pod, named in its record), the endpoints of its Services with their labels.
//!   Nothing of another tenant's L7 config, unless it is a consumer route or client-namespace
//!   DestinationRule on one of its Services, which is that tenant's own say over its own clients.

use std::collections::BTreeSet;

use ferrymesh_api::config::{self as proto, route_filter};
use ferrymesh_api::kinds::ConfigSet;
use ferrymesh_policy::ROOT_NAMESPACE;

/// Whose view a config stream carries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    /// The agent of this node.
    Node(String),
    /// The waypoint `namespace/name`.
    Waypoint(String),
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scope::Node(node) => write!(f, "agent of node {node}"),
            Scope::Waypoint(key) => write!(f, "waypoint {key}"),
        }
    }
}

impl Scope {
    /// The part of `config` this scope receives.
    pub fn view(&self, config: &ConfigSet) -> ConfigSet {
        match self {
            Scope::Node(node) => node_view(config, node),
            Scope::Waypoint(key) => waypoint_view(config, key),
        }
    }
}

/// A workload as a peer: what a connection to it needs.
fn peer(w: &proto::Workload) -> proto::Workload {
    proto::Workload { labels: Default::default(), netns: String::new(), ..w.clone() }
}

fn node_view(config: &ConfigSet, node: &str) -> ConfigSet {
    let mut view = config.clone();
    for w in view.workloads.values_mut().filter(|w| w.node != node) {
        *w = peer(w);
    }
    view
}

fn namespace_of(key: &str) -> &str {
    key.split_once('/').map_or("", |(namespace, _)| namespace)
}

fn waypoint_view(config: &ConfigSet, key: &str) -> ConfigSet {
    let bound: BTreeSet<&str> =
        config.services.iter().filter(|(_, s)| s.waypoint == key).map(|(k, _)| k.as_str()).collect();
    let routes: Vec<(&String, &proto::Route)> = config
        .routes
        .iter()
        .filter(|(_, r)| r.parents.iter().any(|p| bound.contains(format!("{}/{}", p.namespace, p.service).as_str())))
        .collect();
    // Every Service its requests may go to: its bound Services and their routes' backends and
    // mirrors.
    let mut backends: BTreeSet<String> = bound.iter().map(|s| s.to_string()).collect();
    for (_, route) in &routes {
        for rule in &route.rules {
            let filters = rule.filters.iter().chain(rule.backends.iter().flat_map(|b| b.filters.iter()));
            let mirrors = filters.filter_map(|f| match &f.filter {
                Some(route_filter::Filter::Mirror(m)) => m.backend.as_ref(),
                _ => None,
            });
            for b in rule.backends.iter().chain(mirrors) {
                backends.insert(format!("{}/{}", b.namespace, b.service));
            }
        }
    }
    let services: Vec<(&String, &proto::Service)> =
        config.services.iter().filter(|(k, _)| backends.contains(k.as_str())).collect();
    let bound_workloads: Vec<&proto::Workload> = config.workloads.values().filter(|w| w.waypoint == key).collect();
    let endpoints: BTreeSet<&str> = services
        .iter()
        .flat_map(|(_, s)| s.endpoints.iter().map(|e| e.workload_uid.as_str()))
        .chain(bound_workloads.iter().map(|w| w.uid.as_str()))
        .collect();
    let mut namespaces: BTreeSet<&str> = BTreeSet::from([namespace_of(key), ROOT_NAMESPACE]);
    namespaces.extend(backends.iter().map(|s| namespace_of(s)));
    namespaces.extend(bound_workloads.iter().map(|w| w.namespace.as_str()));
    // The endpoints' own namespaces too: their DENY policies apply at the waypoint (see
    // mesh-waypoint's `denials`), and an endpoint may be another namespace's pod.
    namespaces.extend(endpoints.iter().filter_map(|uid| config.workloads.get(*uid)).map(|w| w.namespace.as_str()));
    let in_namespaces = |namespace: &str| namespaces.contains(namespace);

    let mut view = ConfigSet::default();
    for (k, w) in &config.workloads {
        let shown = match endpoints.contains(k.as_str()) {
            true => proto::Workload { netns: String::new(), ..w.clone() },
            false => peer(w),
        };
        view.workloads.insert(k.clone(), shown);
    }
    view.services = services.into_iter().map(|(k, s)| (k.clone(), s.clone())).collect();
    view.routes = routes.into_iter().map(|(k, r)| (k.clone(), r.clone())).collect();
    view.waypoints = config.waypoints.iter().filter(|(k, _)| *k == key).map(|(k, w)| (k.clone(), w.clone())).collect();
    view.destination_rules = config
        .destination_rules
        .iter()
        .filter(|(_, r)| backends.contains(&format!("{}/{}", r.service_namespace, r.service)))
        .map(|(k, r)| (k.clone(), r.clone()))
        .collect();
    view.authorization_policies = filtered(&config.authorization_policies, |p| in_namespaces(&p.namespace));
    view.peer_authentications = filtered(&config.peer_authentications, |p| in_namespaces(&p.namespace));
    view.request_authentications = filtered(&config.request_authentications, |p| in_namespaces(&p.namespace));
    view.traffic_policies = filtered(&config.traffic_policies, |p| in_namespaces(&p.namespace));
    view
}

fn filtered<T: Clone>(
    objects: &std::collections::BTreeMap<String, T>,
    keep: impl Fn(&T) -> bool,
) -> std::collections::BTreeMap<String, T> {
    objects.iter().filter(|(_, o)| keep(o)).map(|(k, o)| (k.clone(), o.clone())).collect()
}

#[cfg(test)]
mod tests;
