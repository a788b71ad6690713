//! Kubernetes source: kube reflectors on Namespaces, Pods, Services, EndpointSlices,
//! ServiceAccounts, the ferrymesh AuthorizationPolicy, PeerAuthentication, RequestAuthentication,
//! TrafficPolicy and DestinationRule custom resources and Gateway API Gateways, HTTPRoutes, GRPCRoutes and
//! ReferenceGrants feed the same translation as the
//! directory source ([`super::translate`]), so the same objects give the same
//! model through either. An object that fails translation keeps its last good version; a pod
//! that is not scheduled, has no IP yet or uses the host network is simply not part of the mesh.
//! The only writes are the status of the mesh's routes and waypoints ([`super::status`]).

use std::collections::BTreeMap;
use std::path::PathBuf;

use futures::{FutureExt, Stream, StreamExt};
use k8s_openapi::api::core::v1 as k8s;
use kube::api::{Patch, PatchParams};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};
use serde_json::{json, Value};

use super::local::ConfigError;
use super::status::{route_status, waypoint_status};
use gateway_api::experimental::httproutes::HTTPRoute;
use gateway_api::gateways::Gateway;
use gateway_api::grpcroutes::GRPCRoute;
use gateway_api::referencegrants::ReferenceGrant;

use super::translate::{
    endpoint_slice_from, grpc_route_from, http_route_from, model_of, namespace_from, pod_from, reference_grant_from,
    service_account_from, service_from, waypoint_from, EndpointSliceResource, FieldError, Object, ObjectKey,
};
use crate::crd::{
    AuthorizationPolicyResource, DestinationRuleResource, PeerAuthenticationResource, RequestAuthenticationResource,
    TrafficPolicyResource,
};
use crate::model::{Model, NETNS_ANNOTATION};
use crate::snapshot::Publisher;

/// Where rejected Kubernetes objects are said to come from in errors.
const ORIGIN: &str = "kubernetes";

/// The reflector stores of the watched kinds, and the last good version of every object.
#[derive(Debug)]
pub struct KubeSource {
    namespaces: Store<k8s::Namespace>,
    pods: Store<k8s::Pod>,
    services: Store<k8s::Service>,
    endpoint_slices: Store<EndpointSliceResource>,
    service_accounts: Store<k8s::ServiceAccount>,
    authorization_policies: Store<AuthorizationPolicyResource>,
    peer_authentications: Store<PeerAuthenticationResource>,
    traffic_policies: Store<TrafficPolicyResource>,
    destination_rules: Store<DestinationRuleResource>,
    request_authentications: Store<RequestAuthenticationResource>,
    gateways: Store<Gateway>,
    http_routes: Store<HTTPRoute>,
    grpc_routes: Store<GRPCRoute>,
    reference_grants: Store<ReferenceGrant>,
    good: BTreeMap<ObjectKey, Object>,
    /// Each object's size verdict (why it is too large, if it is), at the resourceVersion it was
    /// taken at: an object is measured once per version, not on every rebuild.
    sizes: BTreeMap<ObjectKey, (String, Option<String>)>,
    /// UIDs of the pods whose `ferrymesh.io/netns` annotation was ignored (warned once each).
    netns_ignored: std::collections::BTreeSet<String>,
}

fn key(kind: &str, namespace: Option<String>, name: String) -> ObjectKey {
    ObjectKey { kind: kind.into(), namespace: namespace.unwrap_or_default(), name }
}

/// A watched object as the size check sees it.
trait ErasedObject {
    /// Its resourceVersion (empty: none).
    fn version(&self) -> String;
    /// Why it is too large, if it is.
    fn oversize(&self) -> Option<String>;
}

impl<K: kube::Resource + serde::Serialize> ErasedObject for K {
    fn version(&self) -> String {
        self.meta().resource_version.clone().unwrap_or_default()
    }
    fn oversize(&self) -> Option<String> {
        super::oversize(self)
    }
}

/// Whether a pod belongs in the mesh model yet: scheduled, with an IP, not on the host network.
fn meshable(pod: &k8s::Pod) -> bool {
    let spec = pod.spec.as_ref();
    spec.and_then(|s| s.node_name.as_ref()).is_some_and(|n| !n.is_empty())
        && pod.status.as_ref().and_then(|s| s.pod_ip.as_ref()).is_some_and(|ip| !ip.is_empty())
        && !spec.and_then(|s| s.host_network).unwrap_or(false)
}

/// A Kubernetes pod never names its netns: the agent finds it through the pod's own cgroup.
/// The `ferrymesh.io/netns` annotation is the directory source's (its files are the
/// operator's); from the API any pod creator could write it, and make the agent capture the
/// node's netns (or another pod's) as that pod. It is dropped, with a warning (once per pod)
/// and a count in `ferrymesh_ctrl_netns_annotations_ignored_total`.
fn ignore_netns_annotation(
    mut pod: crate::model::Pod,
    key: &ObjectKey,
    warned: &mut std::collections::BTreeSet<String>,
) -> crate::model::Pod {
    if !pod.netns.is_empty() {
        if warned.insert(pod.uid.clone()) {
            tracing::warn!(
                pod = %key,
                annotation = %pod.netns,
                "ignored the pod's {NETNS_ANNOTATION} annotation: in Kubernetes the agent finds a pod's netns by its cgroup"
            );
            metrics::counter!("ferrymesh_ctrl_netns_annotations_ignored_total").increment(1);
        }
        pod.netns.clear();
    }
    pod
}

impl KubeSource {
    /// The model of what the stores hold now, with the errors of objects that were rejected.
    pub fn rebuild(&mut self) -> (Model, Vec<ConfigError>) {
        let mut next = BTreeMap::new();
        let mut errors = Vec::new();
        let previous_sizes = std::mem::take(&mut self.sizes);
        let mut sizes = BTreeMap::new();
        // Why an object is refused for its size (see super::oversize), measured once a version.
        let mut oversize = |key: &ObjectKey, object: &dyn ErasedObject| {
            let version = object.version();
            let verdict = match previous_sizes.get(key) {
                Some((seen, verdict)) if *seen == version && !version.is_empty() => verdict.clone(),
                _ => object.oversize(),
            };
            sizes.insert(key.clone(), (version, verdict.clone()));
            verdict
        };
        let mut add =
            |key: ObjectKey, result: Result<Object, (Option<String>, String)>, good: &BTreeMap<_, _>| match result {
                Ok(object) => {
                    next.insert(key, object);
                }
                Err((field, message)) => {
                    errors.push(ConfigError {
                        file: PathBuf::from(ORIGIN),
                        object: Some(key.to_string()),
                        field,
                        message,
                    });
                    if let Some(previous) = good.get(&key) {
                        next.insert(key, Clone::clone(previous));
                    }
                }
            };
        for ns in self.namespaces.state() {
            let k = key("Namespace", None, ns.name_any());
            let object = Object::Namespace(namespace_from((*ns).clone(), &k));
            let result = match oversize(&k, &*ns) {
                Some(message) => Err((None, message)),
                None => Ok(object),
            };
            add(k, result, &self.good);
        }
        for pod in self.pods.state().iter().filter(|p| meshable(p)) {
            let k = key("Pod", pod.namespace(), pod.name_any());
            let result = pod_from((**pod).clone(), &k)
                .map(|pod| Object::Pod(ignore_netns_annotation(pod, &k, &mut self.netns_ignored)))
                .map_err(FieldError::field_and_message);
            let result = match oversize(&k, &**pod) {
                Some(message) => Err((None, message)),
                None => result,
            };
            add(k, result, &self.good);
        }
        for svc in self.services.state() {
            let k = key("Service", svc.namespace(), svc.name_any());
            let result = service_from((*svc).clone(), &k).map(Object::Service).map_err(FieldError::field_and_message);
            let result = match oversize(&k, &*svc) {
                Some(message) => Err((None, message)),
                None => result,
            };
            add(k, result, &self.good);
        }
        for slice in self.endpoint_slices.state() {
            let k = key("EndpointSlice", slice.namespace(), slice.name_any());
            let result = endpoint_slice_from((*slice).clone(), &k)
                .map(Object::EndpointSlice)
                .map_err(FieldError::field_and_message);
            let result = match oversize(&k, &*slice) {
                Some(message) => Err((None, message)),
                None => result,
            };
            add(k, result, &self.good);
        }
        for sa in self.service_accounts.state() {
            let k = key("ServiceAccount", sa.namespace(), sa.name_any());
            let object = Object::ServiceAccount(service_account_from(&k));
            let result = match oversize(&k, &*sa) {
                Some(message) => Err((None, message)),
                None => Ok(object),
            };
            add(k, result, &self.good);
        }
        for p in self.authorization_policies.state() {
            let k = key("AuthorizationPolicy", p.namespace(), p.name_any());
            let result = p.spec.policy.validate(&k.namespace, &k.name).map(Object::AuthorizationPolicy);
            let result = match oversize(&k, &*p) {
                Some(message) => Err((None, message)),
                None => result.map_err(|e| (Some(e.field), e.message)),
            };
            add(k, result, &self.good);
        }
        for p in self.peer_authentications.state() {
            let k = key("PeerAuthentication", p.namespace(), p.name_any());
            let result = p.spec.peer_authentication.validate(&k.namespace, &k.name).map(Object::PeerAuthentication);
            let result = match oversize(&k, &*p) {
                Some(message) => Err((None, message)),
                None => result.map_err(|e| (Some(e.field), e.message)),
            };
            add(k, result, &self.good);
        }
        for p in self.request_authentications.state() {
            let k = key("RequestAuthentication", p.namespace(), p.name_any());
            let result =
                p.spec.request_authentication.validate(&k.namespace, &k.name).map(Object::RequestAuthentication);
            let result = match oversize(&k, &*p) {
                Some(message) => Err((None, message)),
                None => result.map_err(|e| (Some(e.field), e.message)),
            };
            add(k, result, &self.good);
        }
        for p in self.traffic_policies.state() {
            let k = key("TrafficPolicy", p.namespace(), p.name_any());
            let result = p.spec.policy.validate(&k.namespace, &k.name).map(Object::TrafficPolicy);
            let result = match oversize(&k, &*p) {
                Some(message) => Err((None, message)),
                None => result.map_err(|e| (Some(e.field), e.message)),
            };
            add(k, result, &self.good);
        }
        for r in self.destination_rules.state() {
            let k = key("DestinationRule", r.namespace(), r.name_any());
            let result = r.spec.rule.validate(&k.namespace, &k.name).map(Object::DestinationRule);
            let result = match oversize(&k, &*r) {
                Some(message) => Err((None, message)),
                None => result.map_err(|e| (Some(e.field), e.message)),
            };
            add(k, result, &self.good);
        }
        for gw in self.gateways.state() {
            let k = key("Gateway", gw.namespace(), gw.name_any());
            let result = waypoint_from((*gw).clone(), &k).map(|w| w.map_or(Object::Ignored, Object::Waypoint));
            let result = match oversize(&k, &*gw) {
                Some(message) => Err((None, message)),
                None => result.map_err(FieldError::field_and_message),
            };
            add(k, result, &self.good);
        }
        for r in self.http_routes.state() {
            let k = key("HTTPRoute", r.namespace(), r.name_any());
            let result = http_route_from((*r).clone(), &k).map(|r| r.map_or(Object::Ignored, Object::Route));
            let result = match oversize(&k, &*r) {
                Some(message) => Err((None, message)),
                None => result.map_err(FieldError::field_and_message),
            };
            add(k, result, &self.good);
        }
        for r in self.grpc_routes.state() {
            let k = key("GRPCRoute", r.namespace(), r.name_any());
            let result = grpc_route_from((*r).clone(), &k).map(|r| r.map_or(Object::Ignored, Object::Route));
            let result = match oversize(&k, &*r) {
                Some(message) => Err((None, message)),
                None => result.map_err(FieldError::field_and_message),
            };
            add(k, result, &self.good);
        }
        for g in self.reference_grants.state() {
            let k = key("ReferenceGrant", g.namespace(), g.name_any());
            let result = reference_grant_from((*g).clone(), &k).map(Object::ReferenceGrant);
            let result = match oversize(&k, &*g) {
                Some(message) => Err((None, message)),
                None => result.map_err(FieldError::field_and_message),
            };
            add(k, result, &self.good);
        }
        self.good = next;
        self.sizes = sizes;
        (model_of(self.good.values()), errors)
    }

    /// Whether every watched kind has completed its initial list.
    fn listed(&self) -> bool {
        fn ready<K: kube::Resource + Clone>(store: &Store<K>) -> bool
        where
            K::DynamicType: Eq + std::hash::Hash + Clone,
        {
            store.wait_until_ready().now_or_never().is_some_and(|r| r.is_ok())
        }
        ready(&self.namespaces)
            && ready(&self.pods)
            && ready(&self.services)
            && ready(&self.endpoint_slices)
            && ready(&self.service_accounts)
            && ready(&self.authorization_policies)
            && ready(&self.peer_authentications)
            && ready(&self.traffic_policies)
            && ready(&self.destination_rules)
            && ready(&self.request_authentications)
            && ready(&self.gateways)
            && ready(&self.http_routes)
            && ready(&self.grpc_routes)
            && ready(&self.reference_grants)
    }

    /// The status writes that bring the mesh's routes and waypoints in line with `model` (and
    /// the translation `errors` of the rebuild that made it); none for an object whose status
    /// already says so.
    pub fn status_writes(&self, model: &Model, errors: &[ConfigError]) -> Vec<StatusWrite> {
        if !self.listed() {
            // A model missing a kind's objects would write statuses it then takes back.
            return Vec::new();
        }
        let now = k8s_openapi::chrono::Utc::now().to_rfc3339_opts(k8s_openapi::chrono::SecondsFormat::Secs, true);
        let error_of = |key: &ObjectKey| {
            let key = key.to_string();
            errors.iter().find(|e| e.object.as_deref() == Some(key.as_str()))
        };
        let mut writes = Vec::new();
        let mut add = |kind: StatusKind, k: ObjectKey, object: Value, status: Option<Value>| {
            if let Some(status) = status {
                let resource_version = object.pointer("/metadata/resourceVersion").cloned().unwrap_or(Value::Null);
                writes.push(StatusWrite { kind, key: k, resource_version, status });
            }
        };
        for r in self.http_routes.state() {
            let k = key("HTTPRoute", r.namespace(), r.name_any());
            let object = serde_json::to_value(&*r).unwrap_or_default();
            let status = route_status(&object, error_of(&k), model, &now);
            add(StatusKind::HttpRoute, k, object, status);
        }
        for r in self.grpc_routes.state() {
            let k = key("GRPCRoute", r.namespace(), r.name_any());
            let object = serde_json::to_value(&*r).unwrap_or_default();
            let status = route_status(&object, error_of(&k), model, &now);
            add(StatusKind::GrpcRoute, k, object, status);
        }
        let waypoints = model.waypoints_wire();
        for gw in self.gateways.state() {
            let k = key("Gateway", gw.namespace(), gw.name_any());
            let object = serde_json::to_value(&*gw).unwrap_or_default();
            let status = waypoint_status(&object, error_of(&k), &waypoints, &now);
            add(StatusKind::Gateway, k, object, status);
        }
        writes
    }
}

/// The kinds whose status mesh-ctrl writes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StatusKind {
    /// `HTTPRoute`.
    HttpRoute,
    /// `GRPCRoute`.
    GrpcRoute,
    /// `Gateway` (waypoints only).
    Gateway,
}

/// A status to write to one object, on the condition that it is still at `resource_version`.
#[derive(Clone, Debug)]
pub struct StatusWrite {
    /// Its kind.
    pub kind: StatusKind,
    /// The object.
    pub key: ObjectKey,
    /// The version the status was computed from: the write is refused if the object changed.
    pub resource_version: Value,
    /// The new `status` (route: `parents`; Gateway: `conditions` and `addresses`).
    pub status: Value,
}

impl StatusWrite {
    /// Writes the status (a merge patch of the status subresource); a conflict means the object
    /// changed meanwhile, and its watch event brings the next try.
    async fn apply(&self, client: &Client) -> Result<(), kube::Error> {
        let patch = json!({"metadata": {"resourceVersion": self.resource_version}, "status": self.status});
        let (ns, name, params) = (&self.key.namespace, &self.key.name, PatchParams::default());
        let patch = Patch::Merge(&patch);
        match self.kind {
            StatusKind::HttpRoute => {
                Api::<HTTPRoute>::namespaced(client.clone(), ns).patch_status(name, &params, &patch).await.map(drop)
            }
            StatusKind::GrpcRoute => {
                Api::<GRPCRoute>::namespaced(client.clone(), ns).patch_status(name, &params, &patch).await.map(drop)
            }
            StatusKind::Gateway => {
                Api::<Gateway>::namespaced(client.clone(), ns).patch_status(name, &params, &patch).await.map(drop)
            }
        }
    }
}

/// The API resources the source lists and watches, as (API group, plural): what the mesh-ctrl
/// ClusterRole in `manifests/` must grant (a test checks it does).
pub fn watched_resources() -> Vec<(String, String)> {
    fn of<K: kube::Resource<DynamicType = ()>>() -> (String, String) {
        (K::group(&()).into_owned(), K::plural(&()).into_owned())
    }
    vec![
        of::<k8s::Namespace>(),
        of::<k8s::Pod>(),
        of::<k8s::Service>(),
        of::<EndpointSliceResource>(),
        of::<k8s::ServiceAccount>(),
        of::<AuthorizationPolicyResource>(),
        of::<PeerAuthenticationResource>(),
        of::<TrafficPolicyResource>(),
        of::<DestinationRuleResource>(),
        of::<RequestAuthenticationResource>(),
        of::<Gateway>(),
        of::<HTTPRoute>(),
        of::<GRPCRoute>(),
        of::<ReferenceGrant>(),
    ]
}

/// The status subresources the source writes, as (API group, plural/status), each patched:
/// what the mesh-ctrl ClusterRole must grant (a test checks it does).
pub fn written_status() -> Vec<(String, String)> {
    fn of<K: kube::Resource<DynamicType = ()>>() -> (String, String) {
        (K::group(&()).into_owned(), format!("{}/status", K::plural(&())))
    }
    vec![of::<Gateway>(), of::<HTTPRoute>(), of::<GRPCRoute>()]
}

/// A reflected watch of `api` whose items are `()` for every change that needs a rebuild (not
/// for each object of an initial list, only once it is complete).
fn changes<K>(api: Api<K>, writer: reflector::store::Writer<K>) -> impl Stream<Item = Result<(), watcher::Error>> + Send
where
    K: kube::Resource + Clone + std::fmt::Debug + serde::de::DeserializeOwned + Send + Sync + 'static,
    K::DynamicType: Default + Eq + std::hash::Hash + Clone + Send + Sync,
{
    reflector::reflector(writer, watcher(api, watcher::Config::default())).default_backoff().filter_map(
        |event| async move {
            match event {
                Ok(watcher::Event::Apply(_) | watcher::Event::Delete(_) | watcher::Event::InitDone) => Some(Ok(())),
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => None,
                Err(e) => Some(Err(e)),
            }
        },
    )
}

/// Makes each set of status writes `writes` receives, until its sender is gone. A write that
/// conflicts (the object changed meanwhile) is left to the object's next event; a failure is
/// logged once per object until its message changes.
async fn write_statuses(client: Client, mut writes: tokio::sync::watch::Receiver<Vec<StatusWrite>>) {
    let mut failed: BTreeMap<String, String> = BTreeMap::new();
    while writes.changed().await.is_ok() {
        let batch = writes.borrow_and_update().clone();
        for write in batch {
            let object = write.key.to_string();
            match write.apply(&client).await {
                Ok(()) => {
                    metrics::counter!("ferrymesh_ctrl_status_writes_total", "result" => "ok").increment(1);
                    failed.remove(&object);
                }
                Err(kube::Error::Api(e)) if e.code == 409 => {
                    metrics::counter!("ferrymesh_ctrl_status_writes_total", "result" => "conflict").increment(1);
                    tracing::debug!(%object, "status write conflicted; the object's next event retries it");
                }
                Err(e) => {
                    metrics::counter!("ferrymesh_ctrl_status_writes_total", "result" => "error").increment(1);
                    let message = e.to_string();
                    if failed.get(&object) != Some(&message) {
                        tracing::warn!(%object, "cannot write the status: {message}");
                        failed.insert(object, message);
                    }
                }
            }
        }
    }
}

/// Watches the cluster behind `client` and publishes a model after every change, until the
/// watches end (they retry with backoff, so only when the process stops).
pub async fn watch_kube(client: Client, publisher: Publisher) {
    let (namespaces, ns_writer) = reflector::store();
    let (pods, pod_writer) = reflector::store();
    let (services, svc_writer) = reflector::store();
    let (endpoint_slices, slice_writer) = reflector::store();
    let (service_accounts, sa_writer) = reflector::store();
    let (authorization_policies, authz_writer) = reflector::store();
    let (peer_authentications, peer_writer) = reflector::store();
    let (traffic_policies, traffic_writer) = reflector::store();
    let (destination_rules, destination_writer) = reflector::store();
    let (request_authentications, authn_writer) = reflector::store();
    let (gateways, gateway_writer) = reflector::store();
    let (http_routes, http_route_writer) = reflector::store();
    let (grpc_routes, grpc_route_writer) = reflector::store();
    let (reference_grants, grant_writer) = reflector::store();
    let mut source = KubeSource {
        namespaces,
        pods,
        services,
        endpoint_slices,
        service_accounts,
        authorization_policies,
        peer_authentications,
        traffic_policies,
        destination_rules,
        request_authentications,
        gateways,
        http_routes,
        grpc_routes,
        reference_grants,
        good: BTreeMap::new(),
        sizes: BTreeMap::new(),
        netns_ignored: Default::default(),
    };
    let mut events = futures::stream::select_all([
        changes(Api::<k8s::Namespace>::all(client.clone()), ns_writer).boxed(),
        changes(Api::<k8s::Pod>::all(client.clone()), pod_writer).boxed(),
        changes(Api::<k8s::Service>::all(client.clone()), svc_writer).boxed(),
        changes(Api::<EndpointSliceResource>::all(client.clone()), slice_writer).boxed(),
        changes(Api::<k8s::ServiceAccount>::all(client.clone()), sa_writer).boxed(),
        changes(Api::<AuthorizationPolicyResource>::all(client.clone()), authz_writer).boxed(),
        changes(Api::<PeerAuthenticationResource>::all(client.clone()), peer_writer).boxed(),
        changes(Api::<TrafficPolicyResource>::all(client.clone()), traffic_writer).boxed(),
        changes(Api::<DestinationRuleResource>::all(client.clone()), destination_writer).boxed(),
        changes(Api::<RequestAuthenticationResource>::all(client.clone()), authn_writer).boxed(),
        changes(Api::<Gateway>::all(client.clone()), gateway_writer).boxed(),
        changes(Api::<HTTPRoute>::all(client.clone()), http_route_writer).boxed(),
        changes(Api::<GRPCRoute>::all(client.clone()), grpc_route_writer).boxed(),
        changes(Api::<ReferenceGrant>::all(client.clone()), grant_writer).boxed(),
    ]);
    let mut last_errors = Vec::new();
    // Status is written by a task of its own: a slow API server never holds up the config.
    let (status_tx, status_rx) = tokio::sync::watch::channel(Vec::new());
    tokio::spawn(write_statuses(client, status_rx));
    while let Some(event) = events.next().await {
        if let Err(e) = event {
            tracing::warn!("Kubernetes watch failed: {e}; retrying with backoff and keeping the last good config");
            continue;
        }
        // Fold a burst of changes into one rebuild.
        while let Some(Some(Ok(()))) = events.next().now_or_never() {}
        let (model, errors) = source.rebuild();
        let version = publisher.publish(&model);
        let messages: Vec<String> = errors.iter().map(ToString::to_string).collect();
        metrics::gauge!("ferrymesh_ctrl_rejected_config_objects").set(messages.len() as f64);
        if messages != last_errors {
            for m in &messages {
                tracing::warn!("rejected config: {m}");
            }
            last_errors = messages;
        }
        // The latest set of writes replaces any not yet made: each set is complete.
        status_tx.send_replace(source.status_writes(&model, &errors));
        tracing::debug!(
            version,
            pods = model.pods.len(),
            services = model.services.len(),
            "Kubernetes model published"
        );
    }
}
