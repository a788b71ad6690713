//! A Kubernetes API server fake: an in-memory object store with resource versions, list and
//! watch (resuming from a resourceVersion, bookmarks, 410 Gone for a compacted history), get,
//! create (409 when the object exists; a Service given a ClusterIP as the allocator would),
//! update, JSON merge and apply patches (the status
//! subresource among them, with optimistic concurrency), delete, and TokenReview answered from
//! the tokens a test registers.
//!
//! One fake serves two ways: in process, as the tower service of a [`kube::Client`]
//! ([`KubeFake::client`], for mesh-ctrl's source and identity tests), and over real HTTP on a
//! socket ([`KubeFake::serve`], for the unchanged `mesh-ctrl --kubernetes` binary through a
//! kubeconfig). [`objects`] builds the objects both kinds of test use.
//!
//! A watch is answered long-poll style: the events after its resourceVersion, or what arrives
//! within [`WATCH_WINDOW`], then a BOOKMARK at the store's version when asked for, and the
//! response ends; clients (kube's watcher) watch again from the last version they saw.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use serde_json::{json, Value};
use tokio::sync::Notify;

/// How long a watch waits for an event before it ends with what it has.
pub const WATCH_WINDOW: Duration = Duration::from_millis(300);

/// Where a kind lives in the API: its collection's path.
struct Resource {
    kind: &'static str,
    collection: &'static str,
}

const RESOURCES: &[Resource] = &[
    Resource { kind: "Namespace", collection: "/api/v1/namespaces" },
    Resource { kind: "Pod", collection: "/api/v1/pods" },
    Resource { kind: "Service", collection: "/api/v1/services" },
    Resource { kind: "ServiceAccount", collection: "/api/v1/serviceaccounts" },
    Resource { kind: "Secret", collection: "/api/v1/secrets" },
    Resource { kind: "ConfigMap", collection: "/api/v1/configmaps" },
    Resource { kind: "EndpointSlice", collection: "/apis/discovery.k8s.io/v1/endpointslices" },
    Resource { kind: "AuthorizationPolicy", collection: "/apis/ferrymesh.io/v1alpha1/authorizationpolicies" },
    Resource { kind: "PeerAuthentication", collection: "/apis/ferrymesh.io/v1alpha1/peerauthentications" },
    Resource { kind: "RequestAuthentication", collection: "/apis/ferrymesh.io/v1alpha1/requestauthentications" },
    Resource { kind: "TrafficPolicy", collection: "/apis/ferrymesh.io/v1alpha1/trafficpolicies" },
    Resource { kind: "DestinationRule", collection: "/apis/ferrymesh.io/v1alpha1/destinationrules" },
    Resource { kind: "Gateway", collection: "/apis/gateway.networking.k8s.io/v1/gateways" },
    Resource { kind: "HTTPRoute", collection: "/apis/gateway.networking.k8s.io/v1/httproutes" },
    Resource { kind: "GRPCRoute", collection: "/apis/gateway.networking.k8s.io/v1/grpcroutes" },
    Resource { kind: "ReferenceGrant", collection: "/apis/gateway.networking.k8s.io/v1beta1/referencegrants" },
    Resource { kind: "TokenReview", collection: "/apis/authentication.k8s.io/v1/tokenreviews" },
    // What `kubectl apply -k manifests/overlays/kind` creates besides.
    Resource {
        kind: "CustomResourceDefinition",
        collection: "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
    },
    Resource { kind: "ClusterRole", collection: "/apis/rbac.authorization.k8s.io/v1/clusterroles" },
    Resource { kind: "ClusterRoleBinding", collection: "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings" },
    Resource { kind: "Role", collection: "/apis/rbac.authorization.k8s.io/v1/roles" },
    Resource { kind: "RoleBinding", collection: "/apis/rbac.authorization.k8s.io/v1/rolebindings" },
    Resource { kind: "Deployment", collection: "/apis/apps/v1/deployments" },
    Resource { kind: "DaemonSet", collection: "/apis/apps/v1/daemonsets" },
    Resource { kind: "PodDisruptionBudget", collection: "/apis/policy/v1/poddisruptionbudgets" },
];

/// The collection path (`/api/v1/pods`) of a kind.
pub fn collection_of(kind: &str) -> &'static str {
    RESOURCES.iter().find(|r| r.kind == kind).unwrap_or_else(|| panic!("the fake knows no kind {kind}")).collection
}

fn resource_of(collection: &str) -> Option<&'static Resource> {
    RESOURCES.iter().find(|r| r.collection == collection)
}

/// What a request path names.
#[derive(Debug, PartialEq)]
struct Target {
    /// `/api/v1/pods`, whatever namespace the path named.
    collection: String,
    /// The namespace the path is scoped to, if any.
    namespace: Option<String>,
    name: Option<String>,
    status: bool,
}

fn parse_path(path: &str) -> Option<Target> {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let (prefix, rest) = match *segments.first()? {
        "api" => (format!("/api/{}", segments.get(1)?), &segments[2..]),
        "apis" => (format!("/apis/{}/{}", segments.get(1)?, segments.get(2)?), &segments[3..]),
        _ => return None,
    };
    let target = |plural: &str, namespace: Option<&str>, tail: &[&str]| {
        let status = tail.get(1) == Some(&"status");
        (tail.len() <= 1 || (tail.len() == 2 && status)).then(|| Target {
            collection: format!("{prefix}/{plural}"),
            namespace: namespace.map(String::from),
            name: tail.first().map(|n| n.to_string()),
            status,
        })
    };
    match rest {
        // A Namespace's own status, not a collection called "status".
        ["namespaces", name, "status"] => target("namespaces", None, &[name, "status"]),
        ["namespaces", ns, plural, tail @ ..] => target(plural, Some(ns), tail),
        [plural, tail @ ..] => target(plural, None, tail),
        [] => None,
    }
}

/// A key of the store: collection, namespace ("" for cluster-scoped), name.
type Key = (String, String, String);

#[derive(Default)]
struct Store {
    version: u64,
    objects: BTreeMap<Key, Value>,
    /// Every change, in order: (version, collection, namespace, event).
    history: Vec<(u64, String, String, Value)>,
    /// Per collection: a watch from a version below this is told 410 Gone.
    compacted_below: HashMap<String, u64>,
    list_calls: HashMap<String, usize>,
    /// Token -> the TokenReview status the fake answers for it.
    tokens: HashMap<String, Value>,
    /// Every request, in order.
    requests: Vec<Recorded>,
    /// An object another client creates just before the next create of its collection.
    racing: HashMap<String, Value>,
    uid: u64,
    /// ClusterIPs handed out.
    allocated: u64,
}

/// A request the fake answered.
#[derive(Clone, Debug)]
pub struct Recorded {
    pub method: Method,
    pub path: String,
    pub query: String,
    pub content_type: String,
    pub body: Value,
}

/// The fake API server (see the module documentation).
#[derive(Default)]
pub struct KubeFake {
    store: Mutex<Store>,
    changed: Notify,
}

fn status(code: StatusCode, reason: &str, message: &str) -> (StatusCode, Value) {
    let body = json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure", "message": message, "reason": reason, "code": code.as_u16()});
    (code, body)
}

/// RFC 7386 JSON merge patch.
fn merge(target: &mut Value, patch: &Value) {
    match (target.as_object_mut(), patch.as_object()) {
        (Some(target), Some(patch)) => {
            for (k, v) in patch {
                if v.is_null() {
                    target.remove(k);
                } else {
                    merge(target.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        _ => *target = patch.clone(),
    }
}

fn text(v: &Value) -> String {
    v.as_str().unwrap_or_default().to_string()
}

impl Store {
    fn key(collection: &str, object: &Value) -> Key {
        (collection.to_string(), text(&object["metadata"]["namespace"]), text(&object["metadata"]["name"]))
    }

    /// Stores `object` (stamped with the next version, a uid when it has none) and records
    /// the event `kind` unless `quietly`.
    fn put(&mut self, collection: &str, mut object: Value, kind: &str, quietly: bool) -> Value {
        self.version += 1;
        object["metadata"]["resourceVersion"] = json!(self.version.to_string());
        if object["metadata"]["uid"].is_null() {
            self.uid += 1;
            object["metadata"]["uid"] = json!(format!("fake-uid-{}", self.uid));
        }
        // As an API server's allocator does: a Service without a ClusterIP (and not headless)
        // is given one.
        if collection == "/api/v1/services" && kind == "ADDED" && object["spec"]["clusterIP"].is_null() {
            self.allocated += 1;
            let ip = format!("10.96.{}.{}", self.allocated / 250, 10 + self.allocated % 250);
            object["spec"]["clusterIP"] = json!(ip);
            object["spec"]["clusterIPs"] = json!([ip]);
        }
        let key = Self::key(collection, &object);
        if kind == "DELETED" {
            self.objects.remove(&key);
        } else {
            self.objects.insert(key.clone(), object.clone());
        }
        if !quietly {
            let event = json!({"type": kind, "object": object});
            self.history.push((self.version, collection.to_string(), key.1, event));
        }
        object
    }
}

impl KubeFake {
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    fn store(&self) -> std::sync::MutexGuard<'_, Store> {
        self.store.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Creates or replaces `object` (its `kind` names where it lives), as a client's write
    /// would: watchers see ADDED or MODIFIED.
    pub fn apply(&self, object: Value) -> Value {
        let collection = collection_of(object["kind"].as_str().expect("an object with a kind"));
        let mut store = self.store();
        let exists = store.objects.contains_key(&Store::key(collection, &object));
        let stored = store.put(collection, object, if exists { "MODIFIED" } else { "ADDED" }, false);
        drop(store);
        self.changed.notify_waiters();
        stored
    }

    /// Creates or replaces every document of a multi-document YAML text (`kubectl apply -f`).
    pub fn apply_yaml(&self, text: &str) {
        use serde::Deserialize;
        for doc in serde_yaml::Deserializer::from_str(text) {
            let value = Value::deserialize(doc).expect("a YAML document");
            if !value.is_null() {
                self.apply(value);
            }
        }
    }

    /// Deletes the object `kind` `namespace/name` (watchers see DELETED).
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let collection = collection_of(kind);
        let key = (collection.to_string(), namespace.to_string(), name.to_string());
        let mut store = self.store();
        let object = store.objects.get(&key).cloned().unwrap_or_else(|| panic!("no {kind} {namespace}/{name}"));
        store.put(collection, object, "DELETED", false);
        drop(store);
        self.changed.notify_waiters();
    }

    /// Replaces every object of `kind` with `objects` without telling watchers, and compacts
    /// the kind's history: a watch then gets 410 Gone, and only a relist sees the change (an API
    /// server after an etcd compaction).
    pub fn replace_and_compact(&self, kind: &str, objects: Vec<Value>) {
        let collection = collection_of(kind);
        let mut store = self.store();
        store.objects.retain(|k, _| k.0 != collection);
        for object in objects {
            store.put(collection, object, "ADDED", true);
        }
        let version = store.version;
        store.compacted_below.insert(collection.to_string(), version + 1);
        drop(store);
        self.changed.notify_waiters();
    }

    /// The object `kind` `namespace/name` as stored now, or Null.
    pub fn get(&self, kind: &str, namespace: &str, name: &str) -> Value {
        let key = (collection_of(kind).to_string(), namespace.to_string(), name.to_string());
        self.store().objects.get(&key).cloned().unwrap_or(Value::Null)
    }

    /// How many lists of `kind` were asked for.
    pub fn list_calls(&self, kind: &str) -> usize {
        self.store().list_calls.get(collection_of(kind)).copied().unwrap_or(0)
    }

    /// Every request so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.store().requests.clone()
    }

    /// Makes the next create of `object`'s kind lose a race: `object` is stored (as another
    /// client's) just before it, so it gets 409 AlreadyExists.
    pub fn race_next_create(&self, object: Value) {
        let collection = collection_of(object["kind"].as_str().expect("an object with a kind"));
        self.store().racing.insert(collection.to_string(), object);
    }

    /// TokenReview answers `token` as authenticated for `username`, with `extra` (e.g. the
    /// node name a projected token is bound to).
    pub fn accept_token(&self, token: &str, username: &str, extra: Value) {
        let status =
            json!({"authenticated": true, "audiences": ["ferrymesh"], "user": {"username": username, "extra": extra}});
        self.store().tokens.insert(token.to_string(), status);
    }

    /// Answers one request: `(status, JSON body)`.
    pub async fn handle(
        &self,
        method: Method,
        path: &str,
        query: &str,
        content_type: &str,
        body: &[u8],
    ) -> (StatusCode, Value) {
        let body: Value = if body.is_empty() {
            Value::Null
        } else if content_type.contains("yaml") {
            serde_yaml::from_slice(body).unwrap_or(Value::Null)
        } else {
            serde_json::from_slice(body).unwrap_or(Value::Null)
        };
        self.store().requests.push(Recorded {
            method: method.clone(),
            path: path.to_string(),
            query: query.to_string(),
            content_type: content_type.to_string(),
            body: body.clone(),
        });
        let Some(target) = parse_path(path) else {
            return status(StatusCode::NOT_FOUND, "NotFound", &format!("the fake serves no {path}"));
        };
        let params: HashMap<&str, &str> = query.split('&').filter_map(|kv| kv.split_once('=')).collect();
        match (method, &target.name) {
            (Method::GET, None) if params.get("watch").is_some_and(|w| *w == "true" || *w == "1") => {
                (StatusCode::OK, self.watch(&target, &params).await)
            }
            (Method::GET, None) => (StatusCode::OK, self.list(&target)),
            (Method::GET, Some(name)) => self.read(&target, name),
            (Method::POST, None) => self.create(&target, body),
            (Method::PUT, Some(_)) => self.update(&target, body),
            (Method::PATCH, Some(name)) => self.patch(&target, name, content_type, body),
            (Method::DELETE, Some(name)) => {
                let namespace = target.namespace.clone().unwrap_or_default();
                let key = (target.collection.clone(), namespace, name.clone());
                let mut store = self.store();
                let Some(object) = store.objects.get(&key).cloned() else {
                    return status(StatusCode::NOT_FOUND, "NotFound", &format!("{name} not found"));
                };
                store.put(&target.collection, object.clone(), "DELETED", false);
                drop(store);
                self.changed.notify_waiters();
                (StatusCode::OK, object)
            }
            (method, _) => status(StatusCode::METHOD_NOT_ALLOWED, "MethodNotAllowed", &format!("{method} {path}")),
        }
    }

    fn in_scope(target: &Target, key: &Key) -> bool {
        key.0 == target.collection && target.namespace.as_ref().is_none_or(|ns| *ns == key.1)
    }

    fn list(&self, target: &Target) -> Value {
        let mut store = self.store();
        *store.list_calls.entry(target.collection.clone()).or_default() += 1;
        let items: Vec<Value> =
            store.objects.iter().filter(|(k, _)| Self::in_scope(target, k)).map(|(_, v)| v.clone()).collect();
        json!({"kind": "List", "apiVersion": "v1", "metadata": {"resourceVersion": store.version.to_string()}, "items": items})
    }

    /// The events after the watch's resourceVersion (waiting up to [`WATCH_WINDOW`] for one),
    /// as newline-separated JSON in one array value the caller writes out line by line.
    async fn watch(&self, target: &Target, params: &HashMap<&str, &str>) -> Value {
        let since: u64 = params.get("resourceVersion").and_then(|v| v.parse().ok()).unwrap_or(0);
        let bookmarks = params.get("allowWatchBookmarks").is_some_and(|b| *b == "true");
        let deadline = tokio::time::Instant::now() + WATCH_WINDOW;
        loop {
            let changed = self.changed.notified();
            {
                let store = self.store();
                if since < store.compacted_below.get(&target.collection).copied().unwrap_or(0) {
                    let (_, gone) = status(StatusCode::GONE, "Expired", "too old resource version");
                    return json!([{"type": "ERROR", "object": gone}]);
                }
                let events: Vec<Value> = store
                    .history
                    .iter()
                    .filter(|(v, c, ns, _)| {
                        *v > since && *c == target.collection && target.namespace.as_ref().is_none_or(|n| n == ns)
                    })
                    .map(|(_, _, _, e)| e.clone())
                    .collect();
                if !events.is_empty() || tokio::time::Instant::now() >= deadline {
                    let mut events = events;
                    if bookmarks {
                        let kind = resource_of(&target.collection).map_or("List", |r| r.kind);
                        let bookmark = json!({"kind": kind, "apiVersion": "v1", "metadata": {"resourceVersion": store.version.to_string()}});
                        events.push(json!({"type": "BOOKMARK", "object": bookmark}));
                    }
                    return Value::Array(events);
                }
            }
            let _ = tokio::time::timeout_at(deadline, changed).await;
        }
    }

    fn read(&self, target: &Target, name: &str) -> (StatusCode, Value) {
        let key = (target.collection.clone(), target.namespace.clone().unwrap_or_default(), name.to_string());
        match self.store().objects.get(&key) {
            Some(object) => (StatusCode::OK, object.clone()),
            None => status(StatusCode::NOT_FOUND, "NotFound", &format!("{} {name} not found", target.collection)),
        }
    }

    fn create(&self, target: &Target, mut object: Value) -> (StatusCode, Value) {
        if target.collection == collection_of("TokenReview") {
            let token = text(&object["spec"]["token"]);
            let answer = self.store().tokens.get(&token).cloned();
            object["status"] = answer.unwrap_or_else(
                || json!({"authenticated": false, "error": "invalid bearer token, token lookup failed"}),
            );
            return (StatusCode::CREATED, object);
        }
        if let Some(ns) = &target.namespace {
            object["metadata"]["namespace"] = json!(ns);
        }
        // Check and store under one lock: of two clients creating the same object at once, one
        // gets 409 (the race mesh-ctrl's replicas run for the CA Secret).
        let mut store = self.store();
        if let Some(theirs) = store.racing.remove(&target.collection) {
            store.put(&target.collection, theirs, "ADDED", false);
        }
        let key = Store::key(&target.collection, &object);
        if store.objects.contains_key(&key) {
            return status(StatusCode::CONFLICT, "AlreadyExists", &format!("{} {} already exists", key.0, key.2));
        }
        let stored = store.put(&target.collection, object, "ADDED", false);
        drop(store);
        self.changed.notify_waiters();
        (StatusCode::CREATED, stored)
    }

    fn update(&self, target: &Target, object: Value) -> (StatusCode, Value) {
        let key = Store::key(&target.collection, &object);
        let mut store = self.store();
        let Some(current) = store.objects.get(&key) else {
            return status(StatusCode::NOT_FOUND, "NotFound", &format!("{} not found", key.2));
        };
        let wanted = &object["metadata"]["resourceVersion"];
        if !wanted.is_null() && *wanted != current["metadata"]["resourceVersion"] {
            return status(StatusCode::CONFLICT, "Conflict", "the object has been modified");
        }
        let stored = store.put(&target.collection, object, "MODIFIED", false);
        drop(store);
        self.changed.notify_waiters();
        (StatusCode::OK, stored)
    }

    /// A merge patch (`application/merge-patch+json`) or a server-side apply
    /// (`application/apply-patch+yaml`, which creates a missing object; the fake merges the
    /// applied fields rather than tracking field managers). On `/status` only the status
    /// changes. A `metadata.resourceVersion` in the patch must be the object's (409 otherwise).
    fn patch(&self, target: &Target, name: &str, content_type: &str, patch: Value) -> (StatusCode, Value) {
        let namespace = target.namespace.clone().unwrap_or_default();
        let key = (target.collection.clone(), namespace.clone(), name.to_string());
        // The resourceVersion check and the write under one lock, as in `create`.
        let mut store = self.store();
        let current = store.objects.get(&key).cloned();
        let apply = content_type.starts_with("application/apply-patch");
        let mut object = match current {
            Some(current) => {
                let wanted = &patch["metadata"]["resourceVersion"];
                if !wanted.is_null() && *wanted != current["metadata"]["resourceVersion"] {
                    return status(StatusCode::CONFLICT, "Conflict", "the object has been modified");
                }
                current
            }
            None if apply && !target.status => {
                let mut created = json!({"metadata": {"name": name}});
                if !namespace.is_empty() {
                    created["metadata"]["namespace"] = json!(namespace);
                }
                created
            }
            None => {
                return status(StatusCode::NOT_FOUND, "NotFound", &format!("{} {name} not found", target.collection))
            }
        };
        let existed = !object["metadata"]["resourceVersion"].is_null();
        if target.status {
            merge(&mut object["status"], &patch["status"]);
        } else {
            let mut patch = patch;
            if let Some(meta) = patch["metadata"].as_object_mut() {
                meta.remove("resourceVersion");
            }
            merge(&mut object, &patch);
        }
        let stored = store.put(&target.collection, object, if existed { "MODIFIED" } else { "ADDED" }, false);
        drop(store);
        self.changed.notify_waiters();
        (if existed { StatusCode::OK } else { StatusCode::CREATED }, stored)
    }

    /// The body of an answer: JSON, or for a watch one event per line.
    fn body(answer: &Value, watch: bool) -> Vec<u8> {
        match (watch, answer) {
            (true, Value::Array(events)) => events.iter().map(|e| format!("{e}\n")).collect::<String>().into_bytes(),
            _ => serde_json::to_vec(answer).expect("JSON"),
        }
    }

    /// Answers an HTTP request.
    pub async fn respond<B>(&self, request: Request<B>) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body,
        B::Error: std::fmt::Debug,
    {
        let (parts, body) = request.into_parts();
        let body = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
        let content_type = parts.headers.get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
        let query = parts.uri.query().unwrap_or_default();
        let watch = query.split('&').any(|kv| kv == "watch=true" || kv == "watch=1");
        let (code, answer) = self.handle(parts.method.clone(), parts.uri.path(), query, content_type, &body).await;
        Response::builder()
            .status(code)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(Self::body(&answer, watch))))
            .expect("a response")
    }

    /// A kube client whose requests this fake answers in process.
    pub fn client(self: &Arc<Self>) -> kube::Client {
        let fake = self.clone();
        let service = tower::service_fn(move |request: Request<kube::client::Body>| {
            let fake = fake.clone();
            async move { Ok::<_, std::convert::Infallible>(fake.respond(request).await) }
        });
        kube::Client::new(service, "default")
    }

    /// Serves the fake over HTTP/1.1 on `listener` until the runtime ends.
    pub fn serve(self: &Arc<Self>, listener: tokio::net::TcpListener) {
        let fake = self.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let fake = fake.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        let fake = fake.clone();
                        async move { Ok::<_, std::convert::Infallible>(fake.respond(request).await) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
    }

    /// A kubeconfig that points a client at `address` (the fake served over plain HTTP).
    pub fn kubeconfig(address: std::net::SocketAddr, namespace: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{address}\nusers:\n- name: fake\n  user: {{}}\ncontexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n    namespace: {namespace}\ncurrent-context: fake\n"
        )
    }
}

/// What `kubectl apply -k manifests/overlays/<overlay>` would create, as `kubectl kustomize`
/// renders it (for the manifest checks and for the fake's cluster).
pub fn kustomize(overlay: &str) -> String {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../manifests/overlays").join(overlay);
    let out = std::process::Command::new("kubectl")
        .arg("kustomize")
        .arg(&dir)
        .output()
        .unwrap_or_else(|e| panic!("kubectl (for its kustomize) is needed to render {}: {e}", dir.display()));
    assert!(out.status.success(), "kubectl kustomize {}: {}", dir.display(), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("YAML is UTF-8")
}

/// Objects as the tests write them to the fake.
pub mod objects {
    use serde_json::{json, Value};

    pub fn namespace(name: &str, labels: Value) -> Value {
        json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": labels}})
    }

    /// Pod `namespace/name` on `node`, running as service account `name`, with one container
    /// port `http` 8080; `ip` None: not scheduled an address yet.
    pub fn pod(namespace: &str, name: &str, uid: &str, node: &str, ip: Option<&str>, labels: Value) -> Value {
        let mut status = json!({});
        if let Some(ip) = ip {
            status["podIP"] = json!(ip);
        }
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": uid, "labels": labels},
            "spec": {"nodeName": node, "serviceAccountName": name, "containers": [{"name": "app", "image": "app", "ports": [{"name": "http", "containerPort": 8080}]}]},
            "status": status,
        })
    }

    /// Service `namespace/name` selecting `app: <selector>`, with `ports` as given; at `cluster_ip`,
    /// or None for the API server to allocate one.
    pub fn service(namespace: &str, name: &str, cluster_ip: Option<&str>, selector: &str, ports: Value) -> Value {
        let mut service = json!({
            "apiVersion": "v1", "kind": "Service",
            "metadata": {"name": name, "namespace": namespace},
            "spec": {"selector": {"app": selector}, "ports": ports},
        });
        if let Some(ip) = cluster_ip {
            service["spec"]["clusterIP"] = json!(ip);
        }
        service
    }

    pub fn service_account(namespace: &str, name: &str) -> Value {
        json!({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}})
    }

    /// AuthorizationPolicy `namespace/name` with `spec` as given.
    pub fn authorization_policy(namespace: &str, name: &str, spec: Value) -> Value {
        json!({
            "apiVersion": "ferrymesh.io/v1alpha1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_name_collections_objects_and_status() {
        let t = parse_path("/api/v1/namespaces/shop/pods/web/status").unwrap();
        assert_eq!(
            t,
            Target {
                collection: "/api/v1/pods".into(),
                namespace: Some("shop".into()),
                name: Some("web".into()),
                status: true
            }
        );
        let t = parse_path("/api/v1/namespaces/shop").unwrap();
        assert_eq!((t.collection.as_str(), t.name.as_deref(), t.namespace), ("/api/v1/namespaces", Some("shop"), None));
        let t = parse_path("/apis/gateway.networking.k8s.io/v1/httproutes").unwrap();
        assert_eq!((t.collection.as_str(), t.name), ("/apis/gateway.networking.k8s.io/v1/httproutes", None));
        assert!(parse_path("/healthz").is_none());
        assert!(parse_path("/api/v1/namespaces/shop/pods/web/log/extra").is_none());
    }

    #[tokio::test]
    async fn watches_resume_from_a_version_end_in_a_bookmark_and_are_told_410_after_compaction() {
        let fake = KubeFake::new();
        let a = fake.apply(objects::namespace("a", json!({})));
        let since = text(&a["metadata"]["resourceVersion"]);
        fake.apply(objects::namespace("b", json!({})));
        let (_, events) = fake
            .handle(
                Method::GET,
                "/api/v1/namespaces",
                &format!("watch=true&resourceVersion={since}&allowWatchBookmarks=true"),
                "",
                b"",
            )
            .await;
        let kinds: Vec<&str> = events.as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["ADDED", "BOOKMARK"], "only what came after {since}, then the bookmark");
        fake.replace_and_compact("Namespace", vec![objects::namespace("c", json!({}))]);
        let (_, events) = fake.handle(Method::GET, "/api/v1/namespaces", "watch=true&resourceVersion=1", "", b"").await;
        assert_eq!(events[0]["object"]["code"], 410);
        let (_, list) = fake.handle(Method::GET, "/api/v1/namespaces", "", "", b"").await;
        assert_eq!(list["items"].as_array().unwrap().len(), 1, "the relist sees the replacement");
        // Create twice: 409 the second time; a stale status patch: 409.
        let secret = json!({"metadata": {"name": "s"}, "data": {}});
        let path = "/api/v1/namespaces/sys/secrets";
        assert_eq!(fake.handle(Method::POST, path, "", "application/json", secret.to_string().as_bytes()).await.0, 201);
        assert_eq!(fake.handle(Method::POST, path, "", "application/json", secret.to_string().as_bytes()).await.0, 409);
        let stale = json!({"metadata": {"resourceVersion": "1"}, "status": {"x": 1}});
        let code = fake
            .handle(
                Method::PATCH,
                "/api/v1/namespaces/c/status",
                "",
                "application/merge-patch+json",
                stale.to_string().as_bytes(),
            )
            .await
            .0;
        assert_eq!(code, StatusCode::CONFLICT);
    }
}
