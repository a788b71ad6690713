//! The Kubernetes source against the testbed's fake API server (`ferrymesh_testbed::kube_fake`,
//! in process as the kube client's tower service; the same fake serves the real binary over
//! HTTP in tests/tests/kube.rs): initial list and watch, add/modify/delete, a bad object rejected while the rest
//! keeps working, a 410 Gone forcing a relist, and the same objects giving the same model
//! through the directory source; and the status mesh-ctrl writes back to routes and waypoints
//! (merge patches of the status subresource, applied by the fake as a server would).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferrymesh_testbed::kube_fake::{objects, KubeFake};
use http::Method;
use kube::Client;
use mesh_ctrl::snapshot::{Publisher, Snapshot};
use mesh_ctrl::source::kube::watch_kube;
use mesh_ctrl::source::DirSource;
use serde_json::{json, Value};
use tokio::sync::watch;

/// The Kubernetes source, watching the fake in process.
fn start(api: Arc<KubeFake>) -> watch::Receiver<Arc<Snapshot>> {
    let (publisher, rx) = Publisher::new();
    tokio::spawn(watch_kube(api.client(), publisher));
    rx
}

/// Status writes so far (patches of a `/status` subresource).
fn status_writes(api: &KubeFake) -> Vec<String> {
    let requests = api.requests().into_iter();
    requests.filter(|r| r.method == Method::PATCH && r.path.ends_with("/status")).map(|r| r.path).collect()
}

async fn wait_for(
    rx: &mut watch::Receiver<Arc<Snapshot>>,
    what: &str,
    check: impl Fn(&Snapshot) -> bool,
) -> Arc<Snapshot> {
    let found = match tokio::time::timeout(Duration::from_secs(5), rx.wait_for(|s| check(s))).await {
        Ok(found) => Some(found.unwrap().clone()),
        Err(_) => None,
    };
    found.unwrap_or_else(|| panic!("timed out waiting for {what}: {:?}", rx.borrow()))
}

fn namespace(name: &str, enrolled: bool) -> Value {
    let labels = if enrolled { json!({"ferrymesh.io/dataplane-mode": "enabled"}) } else { json!({}) };
    objects::namespace(name, labels)
}

fn pod(name: &str, ip: Option<&str>, labels: Value) -> Value {
    objects::pod("shop", name, &format!("uid-{name}"), "node1", ip, labels)
}

fn service() -> Value {
    objects::service(
        "shop",
        "web",
        Some("10.96.0.10"),
        "web",
        json!([{"name": "http", "port": 80, "targetPort": "http"}]),
    )
}

fn endpoint_slice(name: &str, ready: bool) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice", "addressType": "IPv4",
        "metadata": {"name": name, "namespace": "shop", "labels": {"kubernetes.io/service-name": "web"}},
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.244.1.2"], "conditions": {"ready": ready}, "targetRef": {"kind": "Pod", "name": "web", "namespace": "shop", "uid": "uid-web"}},
            {"addresses": ["10.244.9.9"]},
        ],
    })
}

use objects::service_account;

fn authorization_policy(name: &str, action: &str) -> Value {
    let spec =
        json!({"action": action, "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}]}]});
    objects::authorization_policy("shop", name, spec)
}

fn strict_peer_authentication() -> Value {
    json!({
        "apiVersion": "ferrymesh.io/v1alpha1", "kind": "PeerAuthentication",
        "metadata": {"name": "strict", "namespace": "shop"},
        "spec": {"mtls": {"mode": "STRICT"}},
    })
}

#[tokio::test]
async fn follows_ferrymesh_custom_resources() {
    let api = KubeFake::new();
    api.apply(authorization_policy("allow-web", "ALLOW"));
    api.apply(strict_peer_authentication());
    let mut rx = start(api.clone());
    let s = wait_for(&mut rx, "the custom resources", |s| {
        s.config.authorization_policies.len() == 1 && s.config.peer_authentications.len() == 1
    })
    .await;
    assert_eq!(
        s.config.authorization_policies["shop/allow-web"].rules[0].from[0].principals,
        ["cluster.local/ns/shop/sa/web"]
    );
    // A bad custom resource keeps its last good version; a new good one still lands.
    api.apply(authorization_policy("allow-web", "AUDIT"));
    api.apply(authorization_policy("deny-web", "DENY"));
    let s = wait_for(&mut rx, "a good policy next to a bad one", |s| s.config.authorization_policies.len() == 2).await;
    let allow = &s.config.authorization_policies["shop/allow-web"];
    assert_eq!(allow.action, 0, "the bad AUDIT update never replaced the good ALLOW");
    api.delete("PeerAuthentication", "shop", "strict");
    wait_for(&mut rx, "a deleted peer authentication", |s| s.config.peer_authentications.is_empty()).await;
}

#[tokio::test]
async fn follows_the_cluster_through_list_watch_errors_and_relists() {
    let api = KubeFake::new();
    api.apply(namespace("shop", true));
    for o in [pod("web", Some("10.244.1.2"), json!({"app": "web"})), pod("pending", None, json!({}))] {
        api.apply(o);
    }
    api.apply(service());
    let mut rx = start(api.clone());

    // Initial list: the pending pod (no IP yet) is not part of the mesh; the service resolves.
    let s =
        wait_for(&mut rx, "the initial list", |s| s.config.workloads.len() == 1 && s.config.services.len() == 1).await;
    let web = &s.config.workloads["uid-web"];
    assert!(web.captured);
    assert_eq!(web.netns, "", "Kubernetes pods are found by their cgroup, not an annotation");
    assert_eq!(s.config.services["shop/web"].endpoints[0].target_ports.get(&80), Some(&8080));

    // Watch: add, modify, delete.
    api.apply(pod("db", Some("10.244.1.3"), json!({})));
    wait_for(&mut rx, "an added pod", |s| s.config.workloads.contains_key("uid-db")).await;
    // A pod naming a netns (the node's) by annotation: the annotation is the directory
    // source's, ignored here, so its agent finds the pod's own netns by cgroup.
    let mut annotated = pod("annotated", Some("10.244.1.5"), json!({}));
    annotated["metadata"]["annotations"] = json!({"ferrymesh.io/netns": "/proc/1/ns/net"});
    api.apply(annotated);
    wait_for(&mut rx, "the annotated pod, without its annotation's netns", |s| {
        s.config.workloads.get("uid-annotated").is_some_and(|w| w.netns.is_empty())
    })
    .await;
    api.apply(pod("web", Some("10.244.1.2"), json!({"app": "web", "ferrymesh.io/dataplane-mode": "none"})));
    wait_for(&mut rx, "a modified pod", |s| s.config.workloads.get("uid-web").is_some_and(|w| !w.captured)).await;
    api.delete("Pod", "shop", "db");
    wait_for(&mut rx, "a deleted pod", |s| !s.config.workloads.contains_key("uid-db")).await;

    // A bad object is rejected and keeps its last good version; the rest keeps working.
    api.apply(pod("web", Some("not-an-ip"), json!({"app": "web"})));
    api.apply(pod("api", Some("10.244.1.4"), json!({})));
    let s = wait_for(&mut rx, "a good pod next to a bad one", |s| s.config.workloads.contains_key("uid-api")).await;
    assert_eq!(s.config.workloads["uid-web"].ip, "10.244.1.2", "the bad update never replaced the good web");
    assert!(!s.config.workloads["uid-web"].captured, "web is still its last good version");

    // 410 Gone: the watcher relists and picks up what changed meanwhile.
    let lists_before = api.list_calls("Pod");
    api.replace_and_compact(
        "Pod",
        vec![pod("web", Some("10.244.1.2"), json!({"app": "web"})), pod("late", Some("10.244.1.9"), json!({}))],
    );
    let s = wait_for(&mut rx, "the relist after 410 Gone", |s| s.config.workloads.contains_key("uid-late")).await;
    assert!(api.list_calls("Pod") > lists_before, "a relist happened");
    assert!(!s.config.workloads.contains_key("uid-api"), "objects gone from the relist are gone");
    assert!(s.config.workloads["uid-web"].captured);
}

#[tokio::test]
async fn namespaces_services_endpoint_slices_and_service_accounts_follow_add_modify_delete() {
    let api = KubeFake::new();
    api.apply(namespace("shop", false));
    api.apply(pod("web", Some("10.244.1.2"), json!({"app": "web"})));
    api.apply(service());
    let mut rx = start(api.clone());
    wait_for(&mut rx, "the initial list", |s| s.config.workloads.len() == 1 && s.config.services.len() == 1).await;

    // Namespace: modified (enrolled), deleted.
    api.apply(namespace("shop", true));
    wait_for(&mut rx, "an enrolled namespace", |s| s.config.workloads["uid-web"].captured).await;
    api.apply(namespace("extra", true));
    api.delete("Namespace", "", "shop");
    wait_for(&mut rx, "a deleted namespace", |s| !s.config.workloads["uid-web"].captured).await;

    // Service: added, modified, deleted.
    let mut other = service();
    other["metadata"]["name"] = json!("api");
    other["spec"]["clusterIP"] = json!("10.96.0.20");
    api.apply(other.clone());
    wait_for(&mut rx, "an added service", |s| s.config.services.contains_key("shop/api")).await;
    other["spec"]["clusterIP"] = json!("10.96.0.21");
    api.apply(other.clone());
    wait_for(&mut rx, "a modified service", |s| {
        s.config.services.get("shop/api").is_some_and(|v| v.vip == "10.96.0.21")
    })
    .await;
    api.delete("Service", "shop", "api");
    wait_for(&mut rx, "a deleted service", |s| !s.config.services.contains_key("shop/api")).await;

    // EndpointSlice: once web has one, its endpoints come from it (not from the selector).
    api.apply(endpoint_slice("web-abc", false));
    let s = wait_for(&mut rx, "endpoints from the slice", |s| s.config.services["shop/web"].endpoints.len() == 2).await;
    let eps = &s.config.services["shop/web"].endpoints;
    assert_eq!((eps[0].ip.as_str(), eps[0].ready, eps[0].workload_uid.as_str()), ("10.244.1.2", false, "uid-web"));
    assert_eq!(eps[0].target_ports.get(&80), Some(&8080));
    assert_eq!((eps[1].ip.as_str(), eps[1].ready, eps[1].workload_uid.as_str()), ("10.244.9.9", true, ""));
    api.apply(endpoint_slice("web-abc", true));
    wait_for(&mut rx, "a modified slice", |s| s.config.services["shop/web"].endpoints[0].ready).await;
    api.delete("EndpointSlice", "shop", "web-abc");
    let s = wait_for(&mut rx, "a deleted slice", |s| s.config.services["shop/web"].endpoints.len() == 1).await;
    assert_eq!(s.config.services["shop/web"].endpoints[0].ip, "10.244.1.2", "back to the selector");
    // A slice without its service label is rejected, named, and the rest keeps working.
    let mut unlabeled = endpoint_slice("orphan", true);
    unlabeled["metadata"]["labels"] = json!({});
    api.apply(unlabeled);
    api.apply(service_account("shop", "web"));
    let s = wait_for(&mut rx, "an added service account", |s| s.service_accounts.contains("shop/web")).await;
    assert_eq!(s.config.services["shop/web"].endpoints.len(), 1, "the bad slice changed nothing");

    // ServiceAccount: modified stays, deleted goes.
    let mut sa = service_account("shop", "web");
    sa["metadata"]["labels"] = json!({"team": "a"});
    api.apply(sa.clone());
    api.apply(service_account("shop", "db"));
    wait_for(&mut rx, "a second service account", |s| s.service_accounts.len() == 2).await;
    api.delete("ServiceAccount", "shop", "web");
    let s = wait_for(&mut rx, "a deleted service account", |s| s.service_accounts.len() == 1).await;
    assert!(s.service_accounts.contains("shop/db"));
}

#[tokio::test]
async fn the_same_objects_give_the_same_model_through_either_source() {
    let objects = [
        namespace("shop", true),
        namespace("legacy", false),
        pod("web", Some("10.244.1.2"), json!({"app": "web"})),
        pod("db", Some("10.244.1.3"), json!({"ferrymesh.io/dataplane-mode": "none"})),
        service(),
        authorization_policy("allow-web", "ALLOW"),
        strict_peer_authentication(),
        endpoint_slice("web-abc", true),
        service_account("shop", "default"),
        service_account("shop", "web"),
        service_account("shop", "db"),
        service_account("legacy", "default"),
    ];
    // Directory source: the same objects as YAML files.
    let dir = tempfile::tempdir().unwrap();
    for (i, o) in objects.iter().enumerate() {
        std::fs::write(dir.path().join(format!("{i}.yaml")), serde_yaml::to_string(o).unwrap()).unwrap();
    }
    let (model, errors) = DirSource::new(dir.path()).reload();
    assert!(errors.is_empty(), "{errors:?}");
    let (publisher, from_dir) = Publisher::new();
    publisher.publish(&model);
    let from_dir = from_dir.borrow().clone();

    let api = KubeFake::new();
    for o in objects.iter().cloned() {
        api.apply(o);
    }
    let mut rx = start(api);
    let from_kube = wait_for(&mut rx, "the Kubernetes model", |s| {
        s.config.workloads.len() == 2
            && s.config.services.get("shop/web").is_some_and(|v| v.endpoints.len() == 2)
            && s.config.authorization_policies.len() == 1
            && s.config.peer_authentications.len() == 1
            && s.service_accounts.len() == 4
    })
    .await;
    assert_eq!(from_dir.config.services["shop/web"].endpoints.len(), 2, "the slice decides the endpoints in both");
    assert_eq!(*from_kube, Snapshot { version: from_kube.version, ..(*from_dir).clone() });
}

/// Against a real cluster:
/// `FERRYMESH_TEST_KUBECONFIG=$HOME/.kube/config cargo test -p mesh-ctrl --test kube_source -- --ignored`
#[tokio::test]
#[ignore = "needs a Kubernetes cluster: set FERRYMESH_TEST_KUBECONFIG"]
async fn reads_a_real_cluster() {
    let path = std::env::var("FERRYMESH_TEST_KUBECONFIG").expect("set FERRYMESH_TEST_KUBECONFIG to a kubeconfig");
    let kubeconfig = kube::config::Kubeconfig::read_from(path).expect("read the kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default()).await.expect("kubeconfig");
    let (publisher, mut rx) = Publisher::new();
    tokio::spawn(watch_kube(Client::try_from(config).expect("client"), publisher));
    let s = wait_for(&mut rx, "a first model from the cluster", |s| s.version > 0).await;
    assert!(
        s.config.workloads.values().all(|w| !w.ip.is_empty() && !w.node.is_empty()),
        "only scheduled pods with IPs"
    );
}

fn http_route(name: &str, weights: (i64, i64)) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "HTTPRoute",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "creationTimestamp": "2026-11-30T10:00:00Z"},
        "spec": {
            "parentRefs": [{"group": "", "kind": "Service", "name": "web", "port": 80}],
            "rules": [{"backendRefs": [
                {"name": "web-v1", "port": 8080, "weight": weights.0},
                {"name": "web-v2", "port": 8080, "weight": weights.1},
            ]}],
        },
    })
}

#[tokio::test]
async fn follows_gateway_api_routes() {
    let api = KubeFake::new();
    api.apply(http_route("split", (90, 10)));
    let mut rx = start(api.clone());
    let s = wait_for(&mut rx, "the route", |s| s.config.routes.contains_key("HTTPRoute shop/split")).await;
    let route = ferrymesh_route::Route::try_from(s.config.routes["HTTPRoute shop/split"].clone()).unwrap();
    let weights: Vec<u32> = route.rules[0].backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [90, 10]);
    assert_eq!(route.created_unix, 1_796_032_800, "creation time orders equally specific routes");
    // A bad route keeps its last good version; a good change lands.
    api.apply(http_route("split", (-1, 10)));
    api.apply(http_route("other", (1, 1)));
    let s = wait_for(&mut rx, "a good route next to a bad one", |s| s.config.routes.len() == 2).await;
    let split = ferrymesh_route::Route::try_from(s.config.routes["HTTPRoute shop/split"].clone()).unwrap();
    assert_eq!(split.rules[0].backends[0].weight, 90, "the bad weight never replaced the good one");
    api.apply(http_route("split", (50, 50)));
    wait_for(&mut rx, "a changed route", |s| s.config.routes["HTTPRoute shop/split"].rules[0].backends[0].weight == 50)
        .await;
    api.delete("HTTPRoute", "shop", "other");
    wait_for(&mut rx, "a deleted route", |s| s.config.routes.len() == 1).await;
}

#[tokio::test]
async fn a_reference_grant_from_the_api_opens_another_namespaces_backend() {
    let api = KubeFake::new();
    let mut route = http_route("split", (90, 10));
    route["spec"]["rules"][0]["backendRefs"][1]["namespace"] = json!("other");
    api.apply(route);
    let mut rx = start(api.clone());
    let refused = |s: &Snapshot| {
        s.config.routes.get("HTTPRoute shop/split").map(|r| r.rules[0].backends[1].refused.clone()).unwrap_or_default()
    };
    wait_for(&mut rx, "other/web-v2 refused without a grant", |s| refused(s).contains("no ReferenceGrant")).await;
    api.apply(json!({
        "apiVersion": "gateway.networking.k8s.io/v1beta1", "kind": "ReferenceGrant",
        "metadata": {"name": "shop-routes", "namespace": "other"},
        "spec": {
            "from": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute", "namespace": "shop"}],
            "to": [{"group": "", "kind": "Service", "name": "web-v2"}],
        },
    }));
    let s = wait_for(&mut rx, "the grant to open other/web-v2", |s| {
        s.config.routes.contains_key("HTTPRoute shop/split") && refused(s).is_empty()
    })
    .await;
    assert_eq!(s.config.routes["HTTPRoute shop/split"].rules[0].backends[1].namespace, "other");
    api.delete("ReferenceGrant", "other", "shop-routes");
    wait_for(&mut rx, "the grant's removal to close it again", |s| !refused(s).is_empty()).await;
}

fn service_named(name: &str, vip: &str, port: u16) -> Value {
    objects::service("shop", name, Some(vip), name, json!([{"name": "http", "port": port}]))
}

fn waypoint_gateway() -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": "waypoint", "namespace": "shop", "generation": 1},
        "spec": {"gatewayClassName": "ferrymesh-waypoint", "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]},
    })
}

/// The conditions of `object`'s ferrymesh status entry for `parent`, as type -> (status, reason,
/// message); empty while it has none.
fn route_conditions(object: &Value, parent: &str) -> HashMap<String, (String, String, String)> {
    let parents = object["status"]["parents"].as_array().cloned().unwrap_or_default();
    let ours = parents.iter().find(|p| {
        p["controllerName"] == mesh_ctrl::source::status::CONTROLLER_NAME && p["parentRef"]["name"] == parent
    });
    conditions(ours.map(|p| &p["conditions"]))
}

fn conditions(list: Option<&Value>) -> HashMap<String, (String, String, String)> {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_string();
    let list = list.and_then(Value::as_array).cloned().unwrap_or_default();
    list.iter().map(|c| (text(&c["type"]), (text(&c["status"]), text(&c["reason"]), text(&c["message"])))).collect()
}

async fn wait_until(what: &str, check: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn writes_the_status_of_routes_and_waypoints_back() {
    let api = KubeFake::new();
    let mut shop = namespace("shop", true);
    shop["metadata"]["labels"]["ferrymesh.io/use-waypoint"] = json!("waypoint");
    api.apply(shop);
    for o in [service(), service_named("web-v1", "10.96.0.11", 8080)] {
        api.apply(o);
    }
    api.apply(waypoint_gateway());
    let mut orphan = http_route("orphan", (1, 1));
    orphan["spec"]["parentRefs"][0]["name"] = json!("gone");
    let mut shared = http_route("shared", (1, 0));
    shared["spec"]["parentRefs"] =
        json!([{"name": "ingress"}, {"group": "", "kind": "Service", "name": "web", "port": 81}]);
    let ingress = json!({"parentRef": {"name": "ingress"}, "controllerName": "example.com/ingress", "conditions": []});
    shared["status"] = json!({"parents": [ingress]});
    let routes = [http_route("split", (90, 10)), orphan, http_route("bad", (-1, 1)), shared];
    for o in routes {
        api.apply(o);
    }
    let _rx = start(api.clone());

    let route = |name: &str| api.get("HTTPRoute", "shop", name);
    wait_until("the status of every route and the waypoint", || {
        ["split", "orphan", "bad", "shared"].iter().all(|r| {
            route(r)["status"]["parents"]
                .as_array()
                .is_some_and(|p| p.iter().any(|e| e["controllerName"] == mesh_ctrl::source::status::CONTROLLER_NAME))
        }) && !api.get("Gateway", "shop", "waypoint")["status"]["conditions"].is_null()
    })
    .await;

    // Accepted by the waypoint the Service is bound to; one backend does not exist, named.
    let split = route_conditions(&route("split"), "web");
    assert_eq!(split["Accepted"].0, "True");
    assert_eq!(split["Accepted"].2, "served by waypoint shop/waypoint");
    let resolved = &split["ResolvedRefs"];
    assert_eq!((resolved.0.as_str(), resolved.1.as_str()), ("False", "BackendNotFound"));
    assert!(resolved.2.contains("spec.rules[0].backendRefs[1]") && resolved.2.contains("shop/web-v2"), "{resolved:?}");
    // A Service that does not exist, and a port the Service does not have.
    let orphan = route_conditions(&route("orphan"), "gone");
    assert_eq!((orphan["Accepted"].0.as_str(), orphan["Accepted"].1.as_str()), ("False", "NoMatchingParent"));
    let shared = route_conditions(&route("shared"), "web");
    assert_eq!(shared["Accepted"].1, "NoMatchingParent");
    assert_eq!(shared["Accepted"].2, "Service shop/web has no port 81");
    // Another controller's entry (for its Gateway parent) is kept.
    let shared_parents = route("shared")["status"]["parents"].as_array().unwrap().clone();
    assert_eq!(shared_parents.len(), 2);
    assert!(shared_parents.iter().any(|p| p["controllerName"] == "example.com/ingress"));
    // An invalid route: not accepted, the field named.
    let bad = route_conditions(&route("bad"), "web");
    assert_eq!((bad["Accepted"].0.as_str(), bad["Accepted"].1.as_str()), ("False", "UnsupportedValue"));
    assert!(bad["Accepted"].2.starts_with("spec.rules[0].backendRefs[0].weight: "), "{:?}", bad["Accepted"]);
    // The waypoint is accepted; no pod runs it yet.
    let gateway = conditions(Some(&api.get("Gateway", "shop", "waypoint")["status"]["conditions"]));
    assert_eq!(gateway["Accepted"].0, "True");
    assert_eq!((gateway["Programmed"].0.as_str(), gateway["Programmed"].1.as_str()), ("False", "Pending"));
    for c in api.get("Gateway", "shop", "waypoint")["status"]["conditions"].as_array().unwrap() {
        assert_eq!(c["observedGeneration"], 1);
    }

    // Each write's own watch event settles: nothing is written again while nothing changes.
    let written = status_writes(&api).len();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let writes = status_writes(&api);
    assert_eq!(writes.len(), written, "status writes loop: {writes:?}");

    // The missing backend appears and a pod runs the waypoint: both statuses follow. A
    // condition whose status holds keeps its transition time.
    let accepted_at = route("split")["status"]["parents"][0]["conditions"][0]["lastTransitionTime"].clone();
    api.apply(service_named("web-v2", "10.96.0.12", 8080));
    api.apply(pod("waypoint-abc", Some("10.244.1.7"), json!({"gateway.networking.k8s.io/gateway-name": "waypoint"})));
    wait_until("the resolved backend", || route_conditions(&route("split"), "web")["ResolvedRefs"].0 == "True").await;
    wait_until("the programmed waypoint", || {
        conditions(Some(&api.get("Gateway", "shop", "waypoint")["status"]["conditions"]))["Programmed"].0 == "True"
    })
    .await;
    assert_eq!(
        api.get("Gateway", "shop", "waypoint")["status"]["addresses"],
        json!([{"type": "IPAddress", "value": "10.244.1.7"}])
    );
    assert_eq!(route("split")["status"]["parents"][0]["conditions"][0]["lastTransitionTime"], accepted_at);
}

#[tokio::test]
async fn an_object_over_the_size_limit_from_the_api_keeps_its_last_good_version() {
    let api = KubeFake::new();
    let with_principals = |count: usize| {
        let principals: Vec<String> = (0..count).map(|i| format!("cluster.local/ns/shop/sa/client-{i}")).collect();
        objects::authorization_policy(
            "shop",
            "big",
            json!({"action": "ALLOW", "rules": [{"from": [{"source": {"principals": principals}}]}]}),
        )
    };
    api.apply(with_principals(2));
    let mut rx = start(api.clone());
    wait_for(&mut rx, "the policy", |s| s.config.authorization_policies.contains_key("shop/big")).await;
    // 20,000 principals: some 800 KiB as JSON, over the 512 KiB an object may be.
    api.apply(with_principals(20_000));
    api.apply(authorization_policy("after", "DENY"));
    let s = wait_for(&mut rx, "the next policy", |s| s.config.authorization_policies.contains_key("shop/after")).await;
    let kept = &s.config.authorization_policies["shop/big"].rules[0].from[0].principals;
    assert_eq!(kept.len(), 2, "the oversize update never replaced the last good version");
}
