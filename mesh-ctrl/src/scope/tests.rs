use ferrymesh_api::config as proto;
use ferrymesh_api::kinds::ConfigSet;

use super::Scope;

fn workload(uid: &str, namespace: &str, node: &str) -> proto::Workload {
    proto::Workload {
        uid: uid.into(),
        name: uid.into(),
        namespace: namespace.into(),
        node: node.into(),
        service_account: uid.into(),
        ip: "10.244.1.2".into(),
        netns: format!("/var/run/netns/{uid}"),
        labels: [("app".to_string(), uid.to_string())].into(),
        captured: true,
        ..Default::default()
    }
}

fn service(namespace: &str, name: &str, waypoint: &str, endpoint: &str) -> proto::Service {
    proto::Service {
        namespace: namespace.into(),
        name: name.into(),
        waypoint: waypoint.into(),
        endpoints: vec![proto::ServiceEndpoint { workload_uid: endpoint.into(), ..Default::default() }],
        ..Default::default()
    }
}

fn route(namespace: &str, name: &str, parent: (&str, &str), backend: (&str, &str)) -> proto::Route {
    proto::Route {
        namespace: namespace.into(),
        name: name.into(),
        kind: "HTTPRoute".into(),
        parents: vec![proto::RouteParent { namespace: parent.0.into(), service: parent.1.into(), port: 0 }],
        rules: vec![proto::RouteRule {
            backends: vec![proto::RouteBackend {
                namespace: backend.0.into(),
                service: backend.1.into(),
                port: 80,
                weight: 1,
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn named<T: Default>(namespace: &str, name: &str, set: impl FnOnce(&mut T, String, String)) -> T {
    let mut t = T::default();
    set(&mut t, namespace.into(), name.into());
    t
}

/// shop (its waypoint, web bound to it and routed to web-v2), evil (its sink, a consumer route
/// on shop/web to it, its own route on its own Service), a policy, rule and authentication in each.
fn mesh() -> ConfigSet {
    let mut set = ConfigSet::default();
    for w in [
        workload("web-1", "shop", "node1"),
        workload("web-v2-1", "shop", "node2"),
        workload("sink-1", "evil", "node2"),
        workload("other-1", "evil", "node2"),
    ] {
        set.insert(w);
    }
    set.insert(service("shop", "web", "shop/waypoint", "web-1"));
    set.insert(service("shop", "web-v2", "", "web-v2-1"));
    set.insert(service("evil", "sink", "", "sink-1"));
    set.insert(service("evil", "other", "", "other-1"));
    set.insert(route("shop", "split", ("shop", "web"), ("shop", "web-v2")));
    set.insert(route("evil", "consumer", ("shop", "web"), ("evil", "sink")));
    set.insert(route("evil", "own", ("evil", "other"), ("evil", "other")));
    set.insert(proto::Waypoint { namespace: "shop".into(), name: "waypoint".into(), ..Default::default() });
    set.insert(proto::Waypoint { namespace: "evil".into(), name: "theirs".into(), ..Default::default() });
    for ns in ["shop", "evil", "ferrymesh-system"] {
        set.insert(named::<proto::AuthorizationPolicy>(ns, "p", |p, n, m| (p.namespace, p.name) = (n, m)));
        set.insert(named::<proto::RequestAuthentication>(ns, "jwt", |p, n, m| (p.namespace, p.name) = (n, m)));
        set.insert(named::<proto::TrafficPolicy>(ns, "limit", |p, n, m| (p.namespace, p.name) = (n, m)));
    }
    let rule = |ns: &str, name: &str, service: (&str, &str)| proto::DestinationRule {
        namespace: ns.into(),
        name: name.into(),
        service_namespace: service.0.into(),
        service: service.1.into(),
        ..Default::default()
    };
    set.insert(rule("shop", "web", ("shop", "web")));
    set.insert(rule("evil", "on-shop-web", ("shop", "web")));
    set.insert(rule("evil", "other", ("evil", "other")));
    set
}

fn keys<T>(map: &std::collections::BTreeMap<String, T>) -> Vec<&str> {
    map.keys().map(String::as_str).collect()
}

#[test]
fn an_agent_sees_its_nodes_workloads_in_full_and_the_others_as_peers() {
    let view = Scope::Node("node2".into()).view(&mesh());
    let full = |uid: &str| !view.workloads[uid].labels.is_empty() && !view.workloads[uid].netns.is_empty();
    assert!(full("web-v2-1") && full("sink-1"), "its own node's workloads, in full");
    let web = &view.workloads["web-1"];
    assert!(web.labels.is_empty() && web.netns.is_empty(), "another node's pod, as a peer: {web:?}");
    assert_eq!((web.ip.as_str(), web.service_account.as_str(), web.captured), ("10.244.1.2", "web-1", true));
    assert_eq!(view.services.len(), 4, "every Service");
    assert_eq!(view.routes.len(), 3);
}

#[test]
fn a_waypoint_sees_its_services_their_routes_and_rules_and_no_other_tenants_config() {
    let view = Scope::Waypoint("shop/waypoint".into()).view(&mesh());
    assert_eq!(
        keys(&view.services),
        ["evil/sink", "shop/web", "shop/web-v2"],
        "bound, routed to, and consumer backends"
    );
    assert_eq!(keys(&view.routes), ["HTTPRoute evil/consumer", "HTTPRoute shop/split"], "the routes on its Services");
    assert_eq!(keys(&view.waypoints), ["shop/waypoint"]);
    assert_eq!(keys(&view.destination_rules), ["evil/on-shop-web", "shop/web"], "rules for its backends only");
    // evil's own policies reach it only because evil/sink is a backend of a route on shop/web
    // (a consumer route evil wrote); evil/other's are not there.
    assert_eq!(
        keys(&view.authorization_policies),
        ["evil/p", "ferrymesh-system/p", "shop/p"],
        "the namespaces of its Services and backends, and the root"
    );
    // Endpoints with their labels, every other workload as a peer; no netns at all.
    assert!(!view.workloads["web-1"].labels.is_empty() && !view.workloads["web-v2-1"].labels.is_empty());
    assert!(view.workloads["other-1"].labels.is_empty());
    assert!(view.workloads.values().all(|w| w.netns.is_empty()));

    // evil's waypoint, bound to nothing, gets none of shop's config.
    let theirs = Scope::Waypoint("evil/theirs".into()).view(&mesh());
    assert!(theirs.services.is_empty() && theirs.routes.is_empty() && theirs.destination_rules.is_empty());
    assert_eq!(keys(&theirs.authorization_policies), ["evil/p", "ferrymesh-system/p"]);
    assert!(theirs.workloads.values().all(|w| w.labels.is_empty()));
}
