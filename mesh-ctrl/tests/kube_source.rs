//! The Kubernetes source against a fake API server on kube's tower-test mock (as kube-rs tests
//! itself): initial list and watch, add/modify/delete, a bad object rejected while the rest
//! keeps working, a 410 Gone forcing a relist, and the same objects giving the same model
//! through the directory source.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use http::{Request, Response};
use kube::client::Body;
use kube::Client;
use mesh_ctrl::snapshot::{Publisher, Snapshot};
use mesh_ctrl::source::kube::watch_kube;
use mesh_ctrl::source::DirSource;
use serde_json::{json, Value};
use tokio::sync::{watch, Notify};

const PODS: &str = "/api/v1/pods";
const NAMESPACES: &str = "/api/v1/namespaces";
const SERVICES: &str = "/api/v1/services";
const AUTHZ: &str = "/apis/ferrymesh.io/v1alpha1/authorizationpolicies";
const PEER_AUTHN: &str = "/apis/ferrymesh.io/v1alpha1/peerauthentications";
const SLICES: &str = "/apis/discovery.k8s.io/v1/endpointslices";
const SERVICE_ACCOUNTS: &str = "/api/v1/serviceaccounts";
const HTTP_ROUTES: &str = "/apis/gateway.networking.k8s.io/v1/httproutes";

/// A fake API server: list responses per collection path, and queued watch events.
#[derive(Default)]
struct FakeApi {
    lists: Mutex<HashMap<String, Vec<Value>>>,
    events: Mutex<HashMap<String, VecDeque<Value>>>,
    list_calls: Mutex<HashMap<String, usize>>,
    resource_version: AtomicU64,
    notify: Notify,
}

impl FakeApi {
    fn stamp(&self, mut object: Value) -> Value {
        let rv = self.resource_version.fetch_add(1, Ordering::Relaxed) + 2;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object
    }

    fn set_list(&self, path: &str, items: Vec<Value>) {
        let items = items.into_iter().map(|o| self.stamp(o)).collect();
        self.lists.lock().unwrap().insert(path.into(), items);
    }

    fn push(&self, path: &str, kind: &str, object: Value) {
        let event = json!({"type": kind, "object": self.stamp(object)});
        self.events.lock().unwrap().entry(path.into()).or_default().push_back(event);
        self.notify.notify_waiters();
    }

    fn push_gone(&self, path: &str) {
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": "too old resource version", "reason": "Expired", "code": 410});
        self.events
            .lock()
            .unwrap()
            .entry(path.into())
            .or_default()
            .push_back(json!({"type": "ERROR", "object": status}));
        self.notify.notify_waiters();
    }

    fn list_calls(&self, path: &str) -> usize {
        self.list_calls.lock().unwrap().get(path).copied().unwrap_or(0)
    }

    async fn answer(self: Arc<Self>, request: Request<Body>, send: tower_test::mock::SendResponse<Response<Body>>) {
        let path = request.uri().path().to_string();
        let query = request.uri().query().unwrap_or_default().to_string();
        let body = if query.contains("watch=true") {
            // Hold the watch until events are queued (or briefly, as a server timeout would).
            let deadline = Instant::now() + Duration::from_millis(300);
            loop {
                let notified = self.notify.notified();
                let batch: Vec<Value> =
                    self.events.lock().unwrap().get_mut(&path).map(|q| q.drain(..).collect()).unwrap_or_default();
                if !batch.is_empty() || Instant::now() > deadline {
                    break batch.iter().map(|e| format!("{e}\n")).collect::<String>().into_bytes();
                }
                let _ = tokio::time::timeout(Duration::from_millis(50), notified).await;
            }
        } else {
            *self.list_calls.lock().unwrap().entry(path.clone()).or_default() += 1;
            let items = self.lists.lock().unwrap().get(&path).cloned().unwrap_or_default();
            let rv = self.resource_version.load(Ordering::Relaxed) + 1;
            serde_json::to_vec(&json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": rv.to_string()}, "items": items}))
                .unwrap()
        };
        send.send_response(Response::builder().body(Body::from(body)).unwrap());
    }
}

fn start(api: Arc<FakeApi>) -> watch::Receiver<Arc<Snapshot>> {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        while let Some((request, send)) = handle.next_request().await {
            tokio::spawn(api.clone().answer(request, send));
        }
    });
    let (publisher, rx) = Publisher::new();
    tokio::spawn(watch_kube(Client::new(service, "default"), publisher));
    rx
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
    json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
}

fn pod(name: &str, ip: Option<&str>, labels: Value) -> Value {
    let mut status = json!({});
    if let Some(ip) = ip {
        status["podIP"] = json!(ip);
    }
    json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "namespace": "shop", "uid": format!("uid-{name}"), "labels": labels},
        "spec": {"nodeName": "node1", "serviceAccountName": name, "containers": [{"name": "app", "image": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
        "status": status,
    })
}

fn service() -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": "web", "namespace": "shop"},
        "spec": {"clusterIP": "10.96.0.10", "selector": {"app": "web"}, "ports": [{"name": "http", "port": 80, "targetPort": "http"}]},
    })
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

fn service_account(namespace: &str, name: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}})
}

fn authorization_policy(name: &str, action: &str) -> Value {
    json!({
        "apiVersion": "ferrymesh.io/v1alpha1", "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "shop"},
        "spec": {"action": action, "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/web"]}}]}]},
    })
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
    let api = Arc::new(FakeApi::default());
    api.set_list(AUTHZ, vec![authorization_policy("allow-web", "ALLOW")]);
    api.set_list(PEER_AUTHN, vec![strict_peer_authentication()]);
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
    api.push(AUTHZ, "MODIFIED", authorization_policy("allow-web", "AUDIT"));
    api.push(AUTHZ, "ADDED", authorization_policy("deny-web", "DENY"));
    let s = wait_for(&mut rx, "a good policy next to a bad one", |s| s.config.authorization_policies.len() == 2).await;
    let allow = &s.config.authorization_policies["shop/allow-web"];
    assert_eq!(allow.action, 0, "the bad AUDIT update never replaced the good ALLOW");
    api.push(PEER_AUTHN, "DELETED", strict_peer_authentication());
    wait_for(&mut rx, "a deleted peer authentication", |s| s.config.peer_authentications.is_empty()).await;
}

#[tokio::test]
async fn follows_the_cluster_through_list_watch_errors_and_relists() {
    let api = Arc::new(FakeApi::default());
    api.set_list(NAMESPACES, vec![namespace("shop", true)]);
    api.set_list(PODS, vec![pod("web", Some("10.244.1.2"), json!({"app": "web"})), pod("pending", None, json!({}))]);
    api.set_list(SERVICES, vec![service()]);
    let mut rx = start(api.clone());

    // Initial list: the pending pod (no IP yet) is not part of the mesh; the service resolves.
    let s =
        wait_for(&mut rx, "the initial list", |s| s.config.workloads.len() == 1 && s.config.services.len() == 1).await;
    let web = &s.config.workloads["uid-web"];
    assert!(web.captured);
    assert_eq!(web.netns, "", "Kubernetes pods are found by their cgroup, not an annotation");
    assert_eq!(s.config.services["shop/web"].endpoints[0].target_ports.get(&80), Some(&8080));

    // Watch: add, modify, delete.
    api.push(PODS, "ADDED", pod("db", Some("10.244.1.3"), json!({})));
    wait_for(&mut rx, "an added pod", |s| s.config.workloads.contains_key("uid-db")).await;
    api.push(
        PODS,
        "MODIFIED",
        pod("web", Some("10.244.1.2"), json!({"app": "web", "ferrymesh.io/dataplane-mode": "none"})),
    );
    wait_for(&mut rx, "a modified pod", |s| s.config.workloads.get("uid-web").is_some_and(|w| !w.captured)).await;
    api.push(PODS, "DELETED", pod("db", Some("10.244.1.3"), json!({})));
    wait_for(&mut rx, "a deleted pod", |s| !s.config.workloads.contains_key("uid-db")).await;

    // A bad object is rejected and keeps its last good version; the rest keeps working.
    api.push(PODS, "MODIFIED", pod("web", Some("not-an-ip"), json!({"app": "web"})));
    api.push(PODS, "ADDED", pod("api", Some("10.244.1.4"), json!({})));
    let s = wait_for(&mut rx, "a good pod next to a bad one", |s| s.config.workloads.contains_key("uid-api")).await;
    assert_eq!(s.config.workloads["uid-web"].ip, "10.244.1.2", "the bad update never replaced the good web");
    assert!(!s.config.workloads["uid-web"].captured, "web is still its last good version");

    // 410 Gone: the watcher relists and picks up what changed meanwhile.
    let lists_before = api.list_calls(PODS);
    api.set_list(
        PODS,
        vec![pod("web", Some("10.244.1.2"), json!({"app": "web"})), pod("late", Some("10.244.1.9"), json!({}))],
    );
    api.push_gone(PODS);
    let s = wait_for(&mut rx, "the relist after 410 Gone", |s| s.config.workloads.contains_key("uid-late")).await;
    assert!(api.list_calls(PODS) > lists_before, "a relist happened");
    assert!(!s.config.workloads.contains_key("uid-api"), "objects gone from the relist are gone");
    assert!(s.config.workloads["uid-web"].captured);
}

#[tokio::test]
async fn namespaces_services_endpoint_slices_and_service_accounts_follow_add_modify_delete() {
    let api = Arc::new(FakeApi::default());
    api.set_list(NAMESPACES, vec![namespace("shop", false)]);
    api.set_list(PODS, vec![pod("web", Some("10.244.1.2"), json!({"app": "web"}))]);
    api.set_list(SERVICES, vec![service()]);
    let mut rx = start(api.clone());
    wait_for(&mut rx, "the initial list", |s| s.config.workloads.len() == 1 && s.config.services.len() == 1).await;

    // Namespace: modified (enrolled), deleted.
    api.push(NAMESPACES, "MODIFIED", namespace("shop", true));
    wait_for(&mut rx, "an enrolled namespace", |s| s.config.workloads["uid-web"].captured).await;
    api.push(NAMESPACES, "ADDED", namespace("extra", true));
    api.push(NAMESPACES, "DELETED", namespace("shop", true));
    wait_for(&mut rx, "a deleted namespace", |s| !s.config.workloads["uid-web"].captured).await;

    // Service: added, modified, deleted.
    let mut other = service();
    other["metadata"]["name"] = json!("api");
    other["spec"]["clusterIP"] = json!("10.96.0.20");
    api.push(SERVICES, "ADDED", other.clone());
    wait_for(&mut rx, "an added service", |s| s.config.services.contains_key("shop/api")).await;
    other["spec"]["clusterIP"] = json!("10.96.0.21");
    api.push(SERVICES, "MODIFIED", other.clone());
    wait_for(&mut rx, "a modified service", |s| {
        s.config.services.get("shop/api").is_some_and(|v| v.vip == "10.96.0.21")
    })
    .await;
    api.push(SERVICES, "DELETED", other);
    wait_for(&mut rx, "a deleted service", |s| !s.config.services.contains_key("shop/api")).await;

    // EndpointSlice: once web has one, its endpoints come from it (not from the selector).
    api.push(SLICES, "ADDED", endpoint_slice("web-abc", false));
    let s = wait_for(&mut rx, "endpoints from the slice", |s| s.config.services["shop/web"].endpoints.len() == 2).await;
    let eps = &s.config.services["shop/web"].endpoints;
    assert_eq!((eps[0].ip.as_str(), eps[0].ready, eps[0].workload_uid.as_str()), ("10.244.1.2", false, "uid-web"));
    assert_eq!(eps[0].target_ports.get(&80), Some(&8080));
    assert_eq!((eps[1].ip.as_str(), eps[1].ready, eps[1].workload_uid.as_str()), ("10.244.9.9", true, ""));
    api.push(SLICES, "MODIFIED", endpoint_slice("web-abc", true));
    wait_for(&mut rx, "a modified slice", |s| s.config.services["shop/web"].endpoints[0].ready).await;
    api.push(SLICES, "DELETED", endpoint_slice("web-abc", true));
    let s = wait_for(&mut rx, "a deleted slice", |s| s.config.services["shop/web"].endpoints.len() == 1).await;
    assert_eq!(s.config.services["shop/web"].endpoints[0].ip, "10.244.1.2", "back to the selector");
    // A slice without its service label is rejected, named, and the rest keeps working.
    let mut unlabeled = endpoint_slice("orphan", true);
    unlabeled["metadata"]["labels"] = json!({});
    api.push(SLICES, "ADDED", unlabeled);
    api.push(SERVICE_ACCOUNTS, "ADDED", service_account("shop", "web"));
    let s = wait_for(&mut rx, "an added service account", |s| s.service_accounts.contains("shop/web")).await;
    assert_eq!(s.config.services["shop/web"].endpoints.len(), 1, "the bad slice changed nothing");

    // ServiceAccount: modified stays, deleted goes.
    let mut sa = service_account("shop", "web");
    sa["metadata"]["labels"] = json!({"team": "a"});
    api.push(SERVICE_ACCOUNTS, "MODIFIED", sa.clone());
    api.push(SERVICE_ACCOUNTS, "ADDED", service_account("shop", "db"));
    wait_for(&mut rx, "a second service account", |s| s.service_accounts.len() == 2).await;
    api.push(SERVICE_ACCOUNTS, "DELETED", sa);
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

    let api = Arc::new(FakeApi::default());
    api.set_list(NAMESPACES, objects[..2].to_vec());
    api.set_list(PODS, objects[2..4].to_vec());
    api.set_list(SERVICES, vec![objects[4].clone()]);
    api.set_list(AUTHZ, vec![objects[5].clone()]);
    api.set_list(PEER_AUTHN, vec![objects[6].clone()]);
    api.set_list(SLICES, vec![objects[7].clone()]);
    api.set_list(SERVICE_ACCOUNTS, objects[8..].to_vec());
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
    let api = Arc::new(FakeApi::default());
    api.set_list(HTTP_ROUTES, vec![http_route("split", (90, 10))]);
    let mut rx = start(api.clone());
    let s = wait_for(&mut rx, "the route", |s| s.config.routes.contains_key("HTTPRoute shop/split")).await;
    let route = ferrymesh_route::Route::try_from(s.config.routes["HTTPRoute shop/split"].clone()).unwrap();
    let weights: Vec<u32> = route.rules[0].backends.iter().map(|b| b.weight).collect();
    assert_eq!(weights, [90, 10]);
    assert_eq!(route.created_unix, 1_796_032_800, "creation time orders equally specific routes");
    // A bad route keeps its last good version; a good change lands.
    api.push(HTTP_ROUTES, "MODIFIED", http_route("split", (-1, 10)));
    api.push(HTTP_ROUTES, "ADDED", http_route("other", (1, 1)));
    let s = wait_for(&mut rx, "a good route next to a bad one", |s| s.config.routes.len() == 2).await;
    let split = ferrymesh_route::Route::try_from(s.config.routes["HTTPRoute shop/split"].clone()).unwrap();
    assert_eq!(split.rules[0].backends[0].weight, 90, "the bad weight never replaced the good one");
    api.push(HTTP_ROUTES, "MODIFIED", http_route("split", (50, 50)));
    wait_for(&mut rx, "a changed route", |s| s.config.routes["HTTPRoute shop/split"].rules[0].backends[0].weight == 50)
        .await;
    api.push(HTTP_ROUTES, "DELETED", http_route("other", (1, 1)));
    wait_for(&mut rx, "a deleted route", |s| s.config.routes.len() == 1).await;
}
