//! Local directory source: Kubernetes-style YAML files (multi-document) in one directory,
//! validated strictly against the Kubernetes schema and turned into the [`Model`].
//!
//! It owns the rule that an invalid object never replaces a good one: an object that fails
//! validation keeps its last good version, a file that fails to parse keeps all of its last
//! good objects. It never talks to agents; it only produces models and errors.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1 as k8s;
use serde::Deserialize;
use serde_yaml::Value;

use ferrymesh_policy::authn::RequestAuthenticationSpec;
use ferrymesh_policy::spec::{AuthorizationPolicySpec, PeerAuthenticationSpec};
use ferrymesh_route::destination::spec::DestinationRuleSpec;
use ferrymesh_route::traffic::spec::TrafficPolicySpec;

use super::translate::{
    endpoint_slice_from, grpc_route_from, http_route_from, model_of, namespace_from, pod_from, reference_grant_from,
    service_account_from, service_from, waypoint_from, EndpointSliceResource, FieldError, Object, ObjectKey,
};
use crate::model::{Model, ServiceAccount};
use crate::schema::strict;

/// A config object that was rejected, named by file, object and field.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// File the object came from.
    pub file: PathBuf,
    /// `Kind namespace/name` of the object, when it could be identified.
    pub object: Option<String>,
    /// Dotted path of the offending field, when there is one.
    pub field: Option<String>,
    /// What is wrong and, where possible, how to fix it.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(object) = &self.object {
            write!(f, ": {object}")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A ferrymesh.io custom resource: Kubernetes metadata and a typed spec.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct CustomResource<S> {
    #[expect(dead_code, reason = "checked by parse_object before deserializing")]
    api_version: String,
    #[expect(dead_code, reason = "checked by parse_object before deserializing")]
    kind: String,
    #[expect(dead_code, reason = "identity comes from the object key")]
    metadata: k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta,
    #[serde(default)]
    spec: S,
}

/// ferrymesh CRD group/version.
const FERRYMESH_V1ALPHA1: &str = "ferrymesh.io/v1alpha1";
/// Gateway API group/version.
const GATEWAY_V1: &str = "gateway.networking.k8s.io/v1";
const GATEWAY_V1BETA1: &str = "gateway.networking.k8s.io/v1beta1";

#[derive(Clone, Debug)]
struct Loaded {
    file: PathBuf,
    object: Object,
}

/// What one file parsed to.
#[derive(Clone, Debug)]
enum Parsed {
    /// The file as a whole could not be read or parsed.
    File(ConfigError),
    /// Each document: an object, or why it was rejected.
    Docs(Vec<Result<(ObjectKey, Object), Box<Rejected>>>),
}

/// A file's parse, reused while its (mtime, size, inode) stay the same: a change to one file of
/// a large directory re-parses that file only.
#[derive(Debug)]
struct Cached {
    stamp: FileStamp,
    parsed: Parsed,
}

type FileStamp = (std::time::SystemTime, u64, u64);

fn file_stamp(file: &Path) -> Option<FileStamp> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(file).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

fn parse_file(file: &Path) -> Parsed {
    let docs = std::fs::read_to_string(file)
        .map_err(|e| file_error(file, format!("cannot read file: {e}")))
        .and_then(|text| split_documents(file, &text));
    match docs {
        Ok(docs) => Parsed::Docs(docs.into_iter().map(|doc| parse_object(file, doc)).collect()),
        Err(e) => Parsed::File(e),
    }
}

/// The directory source with the last good version of every object.
#[derive(Debug)]
pub struct DirSource {
    dir: PathBuf,
    good: BTreeMap<ObjectKey, Loaded>,
    cache: std::collections::HashMap<PathBuf, Cached>,
}

impl DirSource {
    /// A source reading `dir`; nothing is read until [`DirSource::reload`].
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self { dir: dir.into(), good: BTreeMap::new(), cache: Default::default() }
    }

    /// The directory this source reads.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Reads the directory again and returns the model of every good object, with the errors of
    /// everything that was rejected (and kept at its last good version).
    pub fn reload(&mut self) -> (Model, Vec<ConfigError>) {
        let mut errors = Vec::new();
        let files = match yaml_files(&self.dir) {
            Ok(files) => files,
            Err(e) => {
                errors.push(ConfigError {
                    file: self.dir.clone(),
                    object: None,
                    field: None,
                    message: format!("cannot read the config directory: {e}; keeping the last good config"),
                });
                return (self.model(), errors);
            }
        };
        let mut next: BTreeMap<ObjectKey, Loaded> = BTreeMap::new();
        for file in &files {
            let stamp = file_stamp(file);
            let parsed = match (stamp, self.cache.get(file)) {
                (Some(stamp), Some(cached)) if cached.stamp == stamp => cached.parsed.clone(),
                _ => {
                    let parsed = parse_file(file);
                    if let Some(stamp) = stamp {
                        self.cache.insert(file.clone(), Cached { stamp, parsed: parsed.clone() });
                    }
                    parsed
                }
            };
            let docs = match parsed {
                Parsed::Docs(docs) => docs,
                Parsed::File(e) => {
                    errors.push(e);
                    self.keep_file(file, &mut next);
                    continue;
                }
            };
            for doc in docs {
                match doc {
                    Ok((key, object)) => {
                        if let Some(first) = next.get(&key) {
                            errors.push(ConfigError {
                                file: file.clone(),
                                object: Some(key.to_string()),
                                field: Some("metadata.name".into()),
                                message: format!("duplicate of the object in {}; ignored", first.file.display()),
                            });
                        } else {
                            next.insert(key, Loaded { file: file.clone(), object });
                        }
                    }
                    Err(rejected) => {
                        errors.push(rejected.error);
                        if let Some(previous) = rejected.key.and_then(|k| self.good.get_key_value(&k)) {
                            next.entry(previous.0.clone()).or_insert_with(|| previous.1.clone());
                        }
                    }
                }
            }
        }
        self.cache.retain(|f, _| files.contains(f));
        self.good = next;
        (self.model(), errors)
    }

    /// Carries the last good objects of `file` over into `next`.
    fn keep_file(&self, file: &Path, next: &mut BTreeMap<ObjectKey, Loaded>) {
        for (key, loaded) in self.good.iter().filter(|(_, l)| l.file == file) {
            next.entry(key.clone()).or_insert_with(|| loaded.clone());
        }
    }

    /// The model of the good objects. A directory has no admission control to guarantee what
    /// the API server does: every namespace's `default` ServiceAccount and those its pods name
    /// exist, declared or not.
    fn model(&self) -> Model {
        let mut model = model_of(self.good.values().map(|l| &l.object));
        let implicit: Vec<(String, String)> = (model.namespaces.keys().map(|ns| (ns.clone(), "default".to_string())))
            .chain(model.pods.values().map(|p| (p.namespace.clone(), p.service_account.clone())))
            .collect();
        for (namespace, name) in implicit {
            model
                .service_accounts
                .entry(format!("{namespace}/{name}"))
                .or_insert_with(|| ServiceAccount { namespace, name });
        }
        model
    }
}

/// The model of a set of good objects (the same for every source).
fn file_error(file: &Path, message: String) -> ConfigError {
    ConfigError { file: file.to_path_buf(), object: None, field: None, message }
}

/// The `.yaml`/`.yml` files of `dir`, sorted, not recursing.
fn yaml_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let is_yaml = path.extension().is_some_and(|e| e == "yaml" || e == "yml");
        if is_yaml && path.is_file() {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn split_documents(file: &Path, text: &str) -> Result<Vec<Value>, ConfigError> {
    let mut docs = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        let value = Value::deserialize(doc).map_err(|e| file_error(file, format!("invalid YAML: {e}")))?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn str_at<'a>(value: &'a Value, path: &[&str]) -> Option<&'a str> {
    path.iter().try_fold(value, |v, key| v.get(key))?.as_str()
}

/// A document that was rejected, with the key of the object it meant when it said enough to
/// identify it.
#[derive(Clone, Debug)]
struct Rejected {
    key: Option<ObjectKey>,
    error: ConfigError,
}

/// Parses one document into a validated object.
/// `doc` without `apiVersion` and `kind` (already checked): kube's derived custom resource types
/// imply them rather than hold them, so strict parsing would call them unknown.
fn without_type_meta(mut doc: Value) -> Value {
    if let Value::Mapping(map) = &mut doc {
        map.remove("apiVersion");
        map.remove("kind");
    }
    doc
}

fn parse_object(file: &Path, doc: Value) -> Result<(ObjectKey, Object), Box<Rejected>> {
    let api_version = str_at(&doc, &["apiVersion"]).unwrap_or_default().to_string();
    let kind = str_at(&doc, &["kind"]).unwrap_or_default().to_string();
    let name = str_at(&doc, &["metadata", "name"]).map(str::to_string);
    let namespace = match kind.as_str() {
        "Namespace" => String::new(),
        _ => str_at(&doc, &["metadata", "namespace"]).unwrap_or("default").to_string(),
    };
    let key = name.map(|name| ObjectKey { kind: kind.clone(), namespace, name });
    let error = |field: Option<String>, message: String| {
        let object = key.as_ref().map(ToString::to_string).or_else(|| (!kind.is_empty()).then(|| kind.clone()));
        Box::new(Rejected { key: key.clone(), error: ConfigError { file: file.to_path_buf(), object, field, message } })
    };
    let Some(key) = key.clone() else {
        return Err(error(Some("metadata.name".into()), "missing; every object needs a name".into()));
    };
    if let Some(message) = super::oversize(&doc) {
        return Err(error(None, message));
    }
    let parsed = match (api_version.as_str(), kind.as_str()) {
        ("v1", "Namespace") => strict::<k8s::Namespace>(doc).map(|ns| Object::Namespace(namespace_from(ns, &key))),
        ("v1", "Pod") => strict::<k8s::Pod>(doc).and_then(|pod| pod_from(pod, &key).map(Object::Pod).map_err(FieldError::field_and_message)),
        ("v1", "Service") => {
            strict::<k8s::Service>(doc).and_then(|svc| service_from(svc, &key).map(Object::Service).map_err(FieldError::field_and_message))
        }
        ("v1", "ServiceAccount") => {
            strict::<k8s::ServiceAccount>(doc).map(|_| Object::ServiceAccount(service_account_from(&key)))
        }
        ("discovery.k8s.io/v1", "EndpointSlice") => strict::<EndpointSliceResource>(doc)
            .and_then(|slice| endpoint_slice_from(slice, &key).map(Object::EndpointSlice).map_err(FieldError::field_and_message)),
        (FERRYMESH_V1ALPHA1, "AuthorizationPolicy") => strict::<CustomResource<AuthorizationPolicySpec>>(doc).and_then(|cr| {
            cr.spec
                .validate(&key.namespace, &key.name)
                .map(Object::AuthorizationPolicy)
                .map_err(|e| (Some(e.field), e.message))
        }),
        (FERRYMESH_V1ALPHA1, "PeerAuthentication") => strict::<CustomResource<PeerAuthenticationSpec>>(doc).and_then(|cr| {
            cr.spec.validate(&key.namespace, &key.name).map(Object::PeerAuthentication).map_err(|e| (Some(e.field), e.message))
        }),
        (FERRYMESH_V1ALPHA1, "TrafficPolicy") => strict::<CustomResource<TrafficPolicySpec>>(doc).and_then(|cr| {
            cr.spec.validate(&key.namespace, &key.name).map(Object::TrafficPolicy).map_err(|e| (Some(e.field), e.message))
        }),
        (FERRYMESH_V1ALPHA1, "DestinationRule") => strict::<CustomResource<DestinationRuleSpec>>(doc).and_then(|cr| {
            cr.spec.validate(&key.namespace, &key.name).map(Object::DestinationRule).map_err(|e| (Some(e.field), e.message))
        }),
        (FERRYMESH_V1ALPHA1, "RequestAuthentication") => strict::<CustomResource<RequestAuthenticationSpec>>(doc).and_then(|cr| {
            cr.spec.validate(&key.namespace, &key.name).map(Object::RequestAuthentication).map_err(|e| (Some(e.field), e.message))
        }),
        (GATEWAY_V1, "Gateway") => strict::<gateway_api::gateways::Gateway>(without_type_meta(doc)).and_then(|gw| {
            waypoint_from(gw, &key).map(|w| w.map_or(Object::Ignored, Object::Waypoint)).map_err(FieldError::field_and_message)
        }),
        (GATEWAY_V1, "HTTPRoute") => strict::<gateway_api::experimental::httproutes::HTTPRoute>(without_type_meta(doc)).and_then(|route| {
            http_route_from(route, &key).map(|r| r.map_or(Object::Ignored, Object::Route)).map_err(FieldError::field_and_message)
        }),
        (GATEWAY_V1, "GRPCRoute") => strict::<gateway_api::grpcroutes::GRPCRoute>(without_type_meta(doc)).and_then(|route| {
            grpc_route_from(route, &key).map(|r| r.map_or(Object::Ignored, Object::Route)).map_err(FieldError::field_and_message)
        }),
        (GATEWAY_V1 | GATEWAY_V1BETA1, "ReferenceGrant") => strict::<gateway_api::referencegrants::ReferenceGrant>(without_type_meta(doc)).and_then(|grant| {
            reference_grant_from(grant, &key).map(Object::ReferenceGrant).map_err(FieldError::field_and_message)
        }),
        (_, "") => Err((Some("kind".into()), "missing".into())),
        _ => Err((
            Some("kind".into()),
            format!(
                "{api_version}/{kind} is not supported (supported: v1 Namespace, Pod, Service and ServiceAccount, discovery.k8s.io/v1 EndpointSlice, {FERRYMESH_V1ALPHA1} AuthorizationPolicy, PeerAuthentication, RequestAuthentication, TrafficPolicy and DestinationRule, {GATEWAY_V1} Gateway, HTTPRoute and GRPCRoute, {GATEWAY_V1BETA1} ReferenceGrant)"
            ),
        )),
    };
    parsed.map(|object| (key, object)).map_err(|(field, message)| error(field, message))
}

#[cfg(test)]
mod tests {
    use super::*;

    const NS_ON: &str = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: shop\n  labels:\n    ferrymesh.io/dataplane-mode: enabled\n";

    fn pod_yaml(name: &str, ip: &str, extra_spec: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  namespace: shop\n  uid: uid-{name}\n  labels:\n    app: {name}\n  annotations:\n    ferrymesh.io/netns: /var/run/netns/{name}\nspec:\n  nodeName: node1\n  serviceAccountName: sa-{name}\n  containers:\n  - name: app\n    image: app\n{extra_spec}status:\n  podIP: {ip}\n"
        )
    }

    fn write(dir: &Path, file: &str, text: &str) {
        std::fs::write(dir.join(file), text).unwrap();
    }

    #[test]
    fn reads_namespaces_and_pods_from_multi_document_files() {
        let dir = tempfile::tempdir().unwrap();
        write(
            dir.path(),
            "all.yaml",
            &format!("{NS_ON}---\n{}---\n{}", pod_yaml("web", "10.244.1.2", ""), pod_yaml("db", "10.244.1.3", "")),
        );
        let mut source = DirSource::new(dir.path());
        let (model, errors) = source.reload();
        assert!(errors.is_empty(), "{errors:?}");
        let web = &model.pods["uid-web"];
        assert_eq!((web.name.as_str(), web.namespace.as_str(), web.node.as_str()), ("web", "shop", "node1"));
        assert_eq!(web.service_account, "sa-web");
        assert_eq!(web.ip.to_string(), "10.244.1.2");
        assert_eq!(web.netns, "/var/run/netns/web");
        assert!(model.captured(web));
        assert_eq!(model.pods.len(), 2);
    }

    /// Each bad input names file, object and field, and the last good object stays.
    #[test]
    fn bad_objects_are_named_and_keep_the_last_good_version() {
        let cases: [(&str, String, &str, Option<&str>); 5] = [
            (
                "unknown field",
                pod_yaml("web", "10.244.1.2", "  hostNetwrk: true\n"),
                "Pod shop/web",
                Some("spec.hostNetwrk"),
            ),
            (
                "missing podIP",
                pod_yaml("web", "10.244.1.2", "").replace("status:\n  podIP: 10.244.1.2\n", ""),
                "Pod shop/web",
                Some("status.podIP"),
            ),
            ("bad podIP", pod_yaml("web", "10.244.1.x", ""), "Pod shop/web", Some("status.podIP")),
            (
                "missing nodeName",
                pod_yaml("web", "10.244.1.2", "").replace("  nodeName: node1\n", ""),
                "Pod shop/web",
                Some("spec.nodeName"),
            ),
            (
                "wrong type",
                pod_yaml("web", "10.244.1.2", "  containers: 3\n")
                    .replace("  containers:\n  - name: app\n    image: app\n", ""),
                "Pod shop/web",
                Some("spec.containers"),
            ),
        ];
        for (what, bad, object, field) in cases {
            let dir = tempfile::tempdir().unwrap();
            write(dir.path(), "ns.yaml", NS_ON);
            write(dir.path(), "web.yaml", &pod_yaml("web", "10.244.1.2", ""));
            let mut source = DirSource::new(dir.path());
            let (good, errors) = source.reload();
            assert!(errors.is_empty(), "{what}: {errors:?}");
            write(dir.path(), "web.yaml", &bad);
            let (model, errors) = source.reload();
            assert_eq!(errors.len(), 1, "{what}: {errors:?}");
            let e = &errors[0];
            assert_eq!(e.file, dir.path().join("web.yaml"), "{what}");
            assert_eq!(e.object.as_deref(), Some(object), "{what}: {e}");
            assert_eq!(e.field.as_deref(), field, "{what}: {e}");
            assert_eq!(model, good, "{what}: the last good pod must stay");
        }
    }

    #[test]
    fn invalid_yaml_keeps_every_object_of_the_file() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "all.yaml", &format!("{NS_ON}---\n{}", pod_yaml("web", "10.244.1.2", "")));
        let mut source = DirSource::new(dir.path());
        let (good, _) = source.reload();
        write(dir.path(), "all.yaml", "apiVersion: v1\nkind: [Namespace\n");
        let (model, errors) = source.reload();
        assert_eq!(errors.len(), 1);
        assert!(
            errors[0].to_string().starts_with(&format!("{}: invalid YAML", dir.path().join("all.yaml").display())),
            "{}",
            errors[0]
        );
        assert_eq!(model, good);
    }

    #[test]
    fn removed_objects_go_away_and_new_bad_objects_never_appear() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "ns.yaml", NS_ON);
        write(dir.path(), "web.yaml", &pod_yaml("web", "10.244.1.2", ""));
        let mut source = DirSource::new(dir.path());
        assert_eq!(source.reload().0.pods.len(), 1);
        std::fs::remove_file(dir.path().join("web.yaml")).unwrap();
        write(dir.path(), "db.yaml", &pod_yaml("db", "nope", ""));
        let (model, errors) = source.reload();
        assert!(model.pods.is_empty());
        assert_eq!(errors.len(), 1);
        assert_eq!(
            errors[0].to_string(),
            format!(
                "{}: Pod shop/db: field status.podIP: \"nope\" is not an IP address: invalid IP address syntax",
                dir.path().join("db.yaml").display()
            )
        );
    }

    #[test]
    fn reads_policies_and_names_their_bad_fields() {
        let dir = tempfile::tempdir().unwrap();
        let authz = "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: allow-a\n  namespace: shop\nspec:\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/a]\n";
        let peer = "apiVersion: ferrymesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: shop\nspec:\n  mtls:\n    mode: STRICT\n";
        write(dir.path(), "p.yaml", &format!("{authz}---\n{peer}"));
        let mut source = DirSource::new(dir.path());
        let (model, errors) = source.reload();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            model.authorization_policies["shop/allow-a"].rules[0].from[0].principals,
            ["cluster.local/ns/shop/sa/a"]
        );
        assert_eq!(model.peer_authentications["shop/strict"].mode, ferrymesh_policy::MtlsMode::Strict);
        let cases = [
            (authz.replace("ALLOW", "AUDIT"), "spec.action"),
            (authz.replace("principals:", "principalz:"), "spec.rules[0].from[0].source.principalz"),
            (
                authz.replace("principals: [cluster.local/ns/shop/sa/a]", "ipBlocks: [300.1.1.1]"),
                "spec.rules[0].from[0].source.ipBlocks[0]",
            ),
        ];
        for (bad, field) in cases {
            write(dir.path(), "p.yaml", &format!("{bad}---\n{peer}"));
            let (after, errors) = source.reload();
            assert_eq!(errors.len(), 1, "{field}: {errors:?}");
            assert_eq!(errors[0].object.as_deref(), Some("AuthorizationPolicy shop/allow-a"));
            assert_eq!(errors[0].field.as_deref(), Some(field));
            assert_eq!(after, model, "{field}: the last good policy stays");
        }
    }

    #[test]
    fn an_object_over_the_size_limit_is_refused_by_name_and_its_last_good_version_kept() {
        let dir = tempfile::tempdir().unwrap();
        let policy = |blocks: usize| {
            let list: Vec<String> =
                (0..blocks).map(|i| format!("10.{}.{}.{}/32", i >> 16, (i >> 8) & 255, i & 255)).collect();
            format!("apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: big\n  namespace: shop\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [{}]\n", list.join(", "))
        };
        write(dir.path(), "p.yaml", &policy(1000));
        let mut source = DirSource::new(dir.path());
        let (good, errors) = source.reload();
        assert!(errors.is_empty(), "{errors:?}");
        // 40,000 blocks: some 600 KiB as JSON.
        write(dir.path(), "p.yaml", &policy(40_000));
        let (after, errors) = source.reload();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].object.as_deref(), Some("AuthorizationPolicy shop/big"));
        assert!(errors[0].message.contains("over 512 KiB as JSON"), "{}", errors[0]);
        assert_eq!(after, good, "the last good policy stays");
    }

    /// An HTTPRoute in the shape of the Gateway API mesh conformance suite's.
    const HTTP_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: canary
  namespace: shop
spec:
  parentRefs:
  - group: \"\"
    kind: Service
    name: web
    port: 80
  - group: gateway.networking.k8s.io
    kind: Gateway
    name: ingress
  rules:
  - name: by-header
    matches:
    - headers:
      - name: x-canary
        value: \"yes\"
    filters:
    - type: RequestHeaderModifier
      requestHeaderModifier:
        set:
        - name: x-route
          value: canary
    backendRefs:
    - name: web-v2
      port: 8080
  - matches:
    - path:
        type: PathPrefix
        value: /api
    - path:
        type: RegularExpression
        value: /v[0-9]+/.*
      method: POST
      queryParams:
      - name: debug
        value: \"1\"
    timeouts:
      request: 1500ms
      backendRequest: 500ms
    retry:
      codes: [500, 502]
      attempts: 3
      backoff: 100ms
    backendRefs:
    - name: web-v1
      port: 8080
      weight: 90
    - name: web-v2
      port: 8080
      weight: 10
  - filters:
    - type: RequestRedirect
      requestRedirect:
        scheme: https
        statusCode: 308
";

    const GRPC_ROUTE: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata:
  name: echo
  namespace: shop
spec:
  parentRefs:
  - kind: Service
    group: \"\"
    name: echo
  rules:
  - matches:
    - method:
        service: echo.Echo
        method: Say
    backendRefs:
    - name: echo-v2
      port: 9090
";

    #[test]
    fn a_backend_of_another_namespace_is_used_only_with_a_reference_grant_there() {
        let dir = tempfile::tempdir().unwrap();
        let cross = HTTP_ROUTE.replace("    - name: web-v1\n", "    - name: web-v1\n      namespace: other\n");
        write(dir.path(), "routes.yaml", &cross);
        let mut source = DirSource::new(dir.path());
        let refused = |source: &mut DirSource| {
            let (model, errors) = source.reload();
            assert!(errors.is_empty(), "{errors:?}");
            let routes = model.config().routes;
            routes["HTTPRoute shop/canary"].rules[1].backends[0].refused.clone()
        };
        let no_grant = refused(&mut source);
        assert!(no_grant.contains("no ReferenceGrant there opens it to HTTPRoutes of shop"), "{no_grant:?}");
        // A grant of another namespace, of another kind, or for another Service opens nothing.
        let grant = |namespace: &str, from_kind: &str, to_name: &str| {
            format!(
                "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\nmetadata:\n  name: g\n  namespace: {namespace}\nspec:\n  from:\n  - group: gateway.networking.k8s.io\n    kind: {from_kind}\n    namespace: shop\n  to:\n  - group: \"\"\n    kind: Service\n    name: {to_name}\n"
            )
        };
        for (namespace, kind, name) in
            [("shop", "HTTPRoute", "web-v1"), ("other", "GRPCRoute", "web-v1"), ("other", "HTTPRoute", "db")]
        {
            write(dir.path(), "grant.yaml", &grant(namespace, kind, name));
            assert!(!refused(&mut source).is_empty(), "{namespace} {kind} {name}");
        }
        write(dir.path(), "grant.yaml", &grant("other", "HTTPRoute", "web-v1"));
        assert_eq!(refused(&mut source), "", "the grant of other opens web-v1 to shop's HTTPRoutes");
        // A grant without a source namespace is refused by field.
        write(dir.path(), "grant.yaml", &grant("other", "HTTPRoute", "web-v1").replace("    namespace: shop\n", ""));
        let (_, errors) = source.reload();
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert_eq!(errors[0].object.as_deref(), Some("ReferenceGrant other/g"), "{errors:?}");
    }

    #[test]
    fn reads_mesh_routes_and_names_their_bad_fields() {
        use ferrymesh_route::{Filter, PathMatch};
        let dir = tempfile::tempdir().unwrap();
        let ingress_only = HTTP_ROUTE
            .replace("name: canary", "name: north-south")
            .replace("  - group: \"\"\n    kind: Service\n    name: web\n    port: 80\n", "");
        write(dir.path(), "routes.yaml", &format!("{HTTP_ROUTE}---\n{GRPC_ROUTE}---\n{ingress_only}"));
        let mut source = DirSource::new(dir.path());
        let (model, errors) = source.reload();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            model.routes.keys().collect::<Vec<_>>(),
            ["GRPCRoute shop/echo", "HTTPRoute shop/canary"],
            "a route attached only to a Gateway is not the mesh's"
        );
        let http = &model.routes["HTTPRoute shop/canary"];
        assert_eq!(http.parents, [ferrymesh_route::Parent { service: "shop/web".into(), port: Some(80) }]);
        assert_eq!(http.rules[0].name.as_deref(), Some("by-header"));
        assert!(
            matches!(&http.rules[0].filters[0], Filter::RequestHeaders(m) if m.set == [("x-route".to_string(), "canary".to_string())])
        );
        let weights: Vec<u32> = http.rules[1].backends.iter().map(|b| b.weight).collect();
        assert_eq!(weights, [90, 10]);
        assert_eq!(http.rules[1].matches[1].method, Some(http::Method::POST));
        let timeouts = http.rules[1].timeouts;
        assert_eq!(timeouts.request, Some(std::time::Duration::from_millis(1500)));
        assert_eq!(timeouts.backend_request, Some(std::time::Duration::from_millis(500)));
        assert_eq!(http.rules[0].timeouts, ferrymesh_route::Timeouts::default(), "no timeouts: no limit");
        let retry = http.rules[1].retry.as_ref().expect("the rule's retry");
        assert_eq!((retry.codes.as_slice(), retry.attempts), ([500, 502].as_slice(), 3));
        assert_eq!(retry.backoff, std::time::Duration::from_millis(100));
        assert_eq!(http.rules[0].retry, None, "no retry: the mesh's default");
        assert!(
            matches!(&http.rules[2].filters[0], Filter::Redirect(r) if r.status == 308 && r.scheme.as_deref() == Some("https"))
        );
        let grpc = &model.routes["GRPCRoute shop/echo"];
        assert_eq!(grpc.parents[0].port, None, "no port: every port of the Service");
        assert_eq!(grpc.rules[0].matches[0].path, Some(PathMatch::Exact("/echo.Echo/Say".into())));
        assert_eq!(model.config().routes.len(), 2, "both go to agents and waypoints");

        let cases = [
            (HTTP_ROUTE.replace("value: /v[0-9]+/.*", "value: /v[0-9+/.*"), "spec.rules[1].matches[1].path.value"),
            (HTTP_ROUTE.replace("value: /api", "value: api"), "spec.rules[1].matches[0].path.value"),
            (HTTP_ROUTE.replacen("      port: 8080\n", "", 1), "spec.rules[0].backendRefs[0].port"),
            (HTTP_ROUTE.replace("weight: 90", "weight: -1"), "spec.rules[1].backendRefs[0].weight"),
            (HTTP_ROUTE.replace("request: 1500ms", "request: -1s"), "spec.rules[1].timeouts.request"),
            (
                HTTP_ROUTE.replace("backendRequest: 500ms", "backendRequest: 2s"),
                "spec.rules[1].timeouts.backendRequest",
            ),
            (
                HTTP_ROUTE.replace("statusCode: 308", "statusCode: 305"),
                "spec.rules[2].filters[0].requestRedirect.statusCode",
            ),
            (HTTP_ROUTE.replace("name: x-route", "name: \"x route\""), "spec.rules[0].filters[0].set[0]"),
            (
                HTTP_ROUTE.replace("      requestRedirect:\n        scheme: https\n        statusCode: 308\n", ""),
                "spec.rules[2].filters[0].requestRedirect",
            ),
            (
                HTTP_ROUTE
                    .replace("matchez", "x")
                    .replace("  - name: by-header\n", "  - name: by-header\n    matchez: []\n"),
                "spec.rules[0].matchez",
            ),
        ];
        for (bad, field) in cases {
            write(dir.path(), "routes.yaml", &format!("{bad}---\n{GRPC_ROUTE}"));
            let (after, errors) = source.reload();
            assert_eq!(errors.len(), 1, "{field}: {errors:?}");
            assert_eq!(errors[0].object.as_deref(), Some("HTTPRoute shop/canary"), "{field}");
            assert_eq!(errors[0].field.as_deref(), Some(field), "{errors:?}");
            assert_eq!(after.routes, model.routes, "{field}: the last good route stays");
        }
        let rewrite_and_redirect = HTTP_ROUTE.replace(
            "    - type: RequestRedirect\n",
            "    - type: URLRewrite\n      urlRewrite:\n        hostname: web\n    - type: RequestRedirect\n",
        );
        write(dir.path(), "routes.yaml", &rewrite_and_redirect);
        let (_, errors) = source.reload();
        assert_eq!(errors[0].field.as_deref(), Some("spec.rules[2].filters"), "{errors:?}");
        assert!(errors[0].message.contains("cannot be used on the same rule"), "{errors:?}");
    }

    fn gateway(name: &str, class: &str, labels: &str, listener: &str) -> String {
        format!(
            "apiVersion: gateway.networking.k8s.io/v1\nkind: Gateway\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{{labels}}}\nspec:\n  gatewayClassName: {class}\n  listeners:\n  - name: mesh\n    {listener}\n"
        )
    }

    fn service_yaml(name: &str, labels: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{{labels}}}\nspec:\n  clusterIP: 10.96.0.{}\n  ports:\n  - port: 80\n",
            name.len()
        )
    }

    #[test]
    fn waypoints_bind_services_by_label_and_are_not_captured() {
        let dir = tempfile::tempdir().unwrap();
        let hbone = "port: 15008\n    protocol: HBONE";
        let ns = NS_ON.replace(
            "ferrymesh.io/dataplane-mode: enabled\n",
            "ferrymesh.io/dataplane-mode: enabled\n    ferrymesh.io/use-waypoint: wp\n",
        );
        let waypoint_pod = pod_yaml("wp-0", "10.244.1.9", "")
            .replace("    app: wp-0\n", "    app: wp-0\n    gateway.networking.k8s.io/gateway-name: wp\n");
        let labelled = |name: &str, ip: &str, label: &str| {
            pod_yaml(name, ip, "").replace(&format!("    app: {name}\n"), &format!("    app: {name}\n    {label}\n"))
        };
        let objects = [
            ns,
            gateway("wp", "ferrymesh-waypoint", "", hbone),
            gateway("workloads-only", "ferrymesh-waypoint", "ferrymesh.io/waypoint-for: workload", hbone),
            gateway("ingress", "some-other-class", "", "port: 80\n    protocol: HTTP"),
            waypoint_pod,
            pod_yaml("web", "10.244.1.2", ""),
            labelled("bound", "10.244.1.3", "ferrymesh.io/use-waypoint: workloads-only"),
            labelled("to-services-wp", "10.244.1.4", "ferrymesh.io/use-waypoint: wp"),
            labelled("to-missing", "10.244.1.5", "ferrymesh.io/use-waypoint: gone"),
            labelled("pod-opted-out", "10.244.1.6", "ferrymesh.io/use-waypoint: none"),
            service_yaml("web", ""),
            service_yaml("opted-out", "ferrymesh.io/use-waypoint: none"),
            gateway(
                "edge",
                "ferrymesh-waypoint",
                "",
                &format!("{hbone}\n    allowedRoutes:\n      namespaces:\n        from: All"),
            )
            .replace("namespace: shop", "namespace: infra"),
            gateway("closed", "ferrymesh-waypoint", "", hbone).replace("namespace: shop", "namespace: infra"),
            service_yaml("elsewhere", "ferrymesh.io/use-waypoint: edge, ferrymesh.io/use-waypoint-namespace: infra"),
            service_yaml(
                "not-allowed",
                "ferrymesh.io/use-waypoint: closed, ferrymesh.io/use-waypoint-namespace: infra",
            ),
            service_yaml("to-nowhere", "ferrymesh.io/use-waypoint: gone, ferrymesh.io/use-waypoint-namespace: infra"),
            service_yaml("wl", "ferrymesh.io/use-waypoint: workloads-only"),
        ];
        write(dir.path(), "all.yaml", &objects.join("---\n"));
        let mut source = DirSource::new(dir.path());
        let (model, errors) = source.reload();
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(
            model.waypoints.keys().collect::<Vec<_>>(),
            ["infra/closed", "infra/edge", "shop/workloads-only", "shop/wp"],
            "another class's Gateway is not ours"
        );
        let config = model.config();
        let bound = |svc: &str| config.services[&format!("shop/{svc}")].waypoint.clone();
        assert_eq!(bound("web"), "shop/wp", "the namespace's label binds its Services");
        assert_eq!(bound("opted-out"), "", "none on the Service opts out");
        assert_eq!(bound("elsewhere"), "infra/edge", "a waypoint of another namespace that allows all namespaces");
        assert_eq!(bound("not-allowed"), "", "a waypoint of another namespace that allows its own only");
        assert_eq!(bound("to-nowhere"), "", "a waypoint of another namespace that is not there to consent");
        let labels = |svc: &str| model.services[&format!("shop/{svc}")].labels.clone();
        assert!(model
            .binding_refused(&labels("not-allowed"), "shop")
            .unwrap()
            .contains("does not allow namespace shop"));
        assert!(model.binding_refused(&labels("to-nowhere"), "shop").unwrap().contains("does not exist"));
        assert_eq!(model.binding_refused(&labels("elsewhere"), "shop"), None);
        assert_eq!(bound("wl"), "", "a waypoint for workloads takes no Service traffic");
        assert_eq!(config.waypoints["shop/wp"].addresses, ["10.244.1.9"]);
        assert_eq!(config.waypoints["shop/workloads-only"].traffic_type, "workload");
        let captured: BTreeMap<&str, bool> = config.workloads.values().map(|w| (w.name.as_str(), w.captured)).collect();
        assert!(captured["web"]);
        assert!(!captured["wp-0"], "a waypoint speaks HBONE itself");
        // Pods: bound by their own label to a waypoint of workloads (or a missing one: fail
        // closed); a waypoint of Services takes none of their traffic, nor does the
        // namespace's label bind its pods to it.
        let pod_bound: BTreeMap<&str, &str> =
            config.workloads.values().map(|w| (w.name.as_str(), w.waypoint.as_str())).collect();
        assert_eq!(
            pod_bound,
            BTreeMap::from([
                ("bound", "shop/workloads-only"),
                ("pod-opted-out", ""),
                ("to-missing", "shop/gone"),
                ("to-services-wp", ""),
                ("web", ""),
                ("wp-0", ""),
            ])
        );

        for (bad, field) in [
            (gateway("wp", "ferrymesh-waypoint", "", "port: 80\n    protocol: HTTP"), "spec.listeners"),
            (
                gateway("wp", "ferrymesh-waypoint", "ferrymesh.io/waypoint-for: everything", hbone),
                "metadata.labels.ferrymesh.io/waypoint-for",
            ),
        ] {
            let mut next = objects.clone();
            next[1] = bad;
            write(dir.path(), "all.yaml", &next.join("---\n"));
            let (after, errors) = source.reload();
            assert_eq!(errors.len(), 1, "{field}: {errors:?}");
            assert_eq!(
                (errors[0].object.as_deref(), errors[0].field.as_deref()),
                (Some("Gateway shop/wp"), Some(field))
            );
            assert_eq!(after.waypoints, model.waypoints, "{field}: the last good waypoint stays");
        }

        // A namespace bound to a waypoint of all traffic binds its pods too; `none` opts one out.
        let mut all = objects.clone();
        all[1] = gateway("wp", "ferrymesh-waypoint", "ferrymesh.io/waypoint-for: all", hbone);
        write(dir.path(), "all.yaml", &all.join("---\n"));
        let (model_all, errors) = source.reload();
        assert!(errors.is_empty(), "{errors:?}");
        let config_all = model_all.config();
        let bound_to = |name: &str| config_all.workloads[&format!("uid-{name}")].waypoint.clone();
        assert_eq!(bound_to("web"), "shop/wp");
        assert_eq!(bound_to("pod-opted-out"), "");
        assert_eq!(bound_to("to-services-wp"), "shop/wp");
        assert_eq!(bound_to("wp-0"), "", "a waypoint's own pod is never bound");
        assert_eq!(config_all.services["shop/web"].waypoint, "shop/wp", "all takes Service traffic too");
    }

    #[test]
    fn services_resolve_endpoints_and_named_target_ports() {
        let dir = tempfile::tempdir().unwrap();
        let ports =
            "  containers:\n  - name: app\n    image: app\n    ports:\n    - name: http\n      containerPort: 8080\n";
        let web = pod_yaml("web", "10.244.1.2", "").replace("  containers:\n  - name: app\n    image: app\n", ports);
        let unready = pod_yaml("web2", "10.244.1.3", "")
            .replace("  containers:\n  - name: app\n    image: app\n", ports)
            .replace("app: web2", "app: web")
            .replace("status:\n", "status:\n  conditions:\n  - type: Ready\n    status: \"False\"\n");
        let svc = "apiVersion: v1\nkind: Service\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  clusterIP: 10.96.0.10\n  selector:\n    app: web\n  ports:\n  - name: http\n    port: 80\n    targetPort: http\n  - name: admin\n    port: 9000\n    targetPort: 9001\n";
        write(dir.path(), "all.yaml", &format!("{NS_ON}---\n{web}---\n{unready}---\n{svc}"));
        let mut source = DirSource::new(dir.path());
        let (model, errors) = source.reload();
        assert!(errors.is_empty(), "{errors:?}");
        let wire = model.services_wire();
        assert_eq!(wire.len(), 1);
        assert_eq!(wire["shop/web"].vip, "10.96.0.10");
        let mut eps: Vec<(String, bool, Option<u32>, Option<u32>)> = wire["shop/web"]
            .endpoints
            .iter()
            .map(|e| (e.ip.clone(), e.ready, e.target_ports.get(&80).copied(), e.target_ports.get(&9000).copied()))
            .collect();
        eps.sort();
        assert_eq!(
            eps,
            vec![
                ("10.244.1.2".into(), true, Some(8080), Some(9001)),
                ("10.244.1.3".into(), false, Some(8080), Some(9001))
            ]
        );
        write(
            dir.path(),
            "all.yaml",
            &format!("{NS_ON}---\n{web}---\n{}", svc.replace("  clusterIP: 10.96.0.10\n", "")),
        );
        let (_, errors) = source.reload();
        assert_eq!(errors.len(), 1);
        assert_eq!(errors[0].object.as_deref(), Some("Service shop/web"));
        assert_eq!(errors[0].field.as_deref(), Some("spec.clusterIP"));
    }

    #[test]
    fn a_dual_stack_service_has_both_vips_and_endpoints_of_each_family() {
        let dir = tempfile::tempdir().unwrap();
        let web = pod_yaml("web", "10.244.1.2", "").replace("app: web", "app: web\n    tier: web").replace(
            "  podIP: 10.244.1.2\n",
            "  podIP: 10.244.1.2\n  podIPs:\n  - ip: 10.244.1.2\n  - ip: fd00:10:244:1::2\n",
        );
        let service = |name: &str, ips: &str| {
            format!(
                "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  {ips}\n  selector:\n    tier: web\n  ports:\n  - port: 80\n"
            )
        };
        let dual = service("dual", "clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00:10:96::a\"]");
        let single = service("single", "clusterIP: 10.96.0.11");
        write(dir.path(), "all.yaml", &format!("{NS_ON}---\n{web}---\n{dual}---\n{single}"));
        let mut source = DirSource::new(dir.path());
        let (model, errors) = source.reload();
        assert!(errors.is_empty(), "{errors:?}");
        let wire = model.services_wire();
        let ips = |name: &str| wire[name].endpoints.iter().map(|e| e.ip.clone()).collect::<Vec<_>>();
        assert_eq!(
            (wire["shop/dual"].vip.as_str(), wire["shop/dual"].other_vips.clone()),
            ("10.96.0.10", vec!["fd00:10:96::a".into()])
        );
        assert_eq!(ips("shop/dual"), ["10.244.1.2", "fd00:10:244:1::2"]);
        assert!(wire["shop/single"].other_vips.is_empty());
        assert_eq!(ips("shop/single"), ["10.244.1.2"], "a single-stack Service's endpoints are of its family");
        // What Kubernetes would refuse is named by field, and changes nothing: the Service
        // keeps its last good version.
        for (ips, field, says) in [
            (
                "clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.12, \"fd00:10:96::a\"]",
                "spec.clusterIPs[0]",
                "must come first",
            ),
            (
                "clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, 10.96.0.12]",
                "spec.clusterIPs[1]",
                "one address per family",
            ),
            ("clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, nope]", "spec.clusterIPs[1]", "is not an IP address"),
            (
                "clusterIP: 10.96.0.10\n  clusterIPs: [10.96.0.10, \"fd00::a\", \"fd00::b\"]",
                "spec.clusterIPs[2]",
                "at most two",
            ),
        ] {
            write(dir.path(), "all.yaml", &format!("{NS_ON}---\n{web}---\n{}", service("dual", ips)));
            let (model, errors) = source.reload();
            assert_eq!(errors.len(), 1, "{ips}: {errors:?}");
            assert_eq!(errors[0].object.as_deref(), Some("Service shop/dual"));
            assert_eq!(errors[0].field.as_deref(), Some(field), "{ips}");
            assert!(errors[0].message.contains(says), "{ips}: {errors:?}");
            let kept = &model.services_wire()["shop/dual"];
            assert_eq!(
                (kept.vip.as_str(), kept.other_vips.as_slice()),
                ("10.96.0.10", &["fd00:10:96::a".to_string()][..])
            );
        }
    }

    #[test]
    fn endpoint_slices_and_service_accounts_are_read_and_their_bad_fields_named() {
        let dir = tempfile::tempdir().unwrap();
        let slice = "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: web-1\n  namespace: shop\n  labels:\n    kubernetes.io/service-name: web\naddressType: IPv4\nports:\n- name: http\n  port: 8080\nendpoints:\n- addresses: [10.244.1.7]\n  conditions:\n    ready: false\n";
        let sa = "apiVersion: v1\nkind: ServiceAccount\nmetadata:\n  name: robot\n  namespace: shop\n";
        write(dir.path(), "all.yaml", &format!("{NS_ON}---\n{slice}---\n{sa}"));
        let mut source = DirSource::new(dir.path());
        let (model, errors) = source.reload();
        assert!(errors.is_empty(), "{errors:?}");
        let s = &model.endpoint_slices["shop/web-1"];
        assert_eq!((s.service.as_str(), s.ports.get("http")), ("web", Some(&8080)));
        assert_eq!((s.endpoints[0].ip.to_string(), s.endpoints[0].ready), ("10.244.1.7".to_string(), false));
        let accounts: Vec<&String> = model.service_accounts.keys().collect();
        assert_eq!(accounts, ["shop/default", "shop/robot"], "declared, and the namespace's default");
        let cases = [
            (
                slice.replace("    kubernetes.io/service-name: web\n", "    x: y\n"),
                "metadata.labels.kubernetes.io/service-name",
            ),
            (slice.replace("addressType: IPv4", "addressType: FQDN"), "addressType"),
            (slice.replace("10.244.1.7", "10.244.1.x"), "endpoints[0].addresses[0]"),
            (slice.replace("  port: 8080", "  port: 70000"), "ports[0].port"),
            (slice.replace("addressType: IPv4", "adressType: IPv4"), "adressType"),
        ];
        for (bad, field) in cases {
            write(dir.path(), "all.yaml", &format!("{NS_ON}---\n{bad}---\n{sa}"));
            let (after, errors) = source.reload();
            assert_eq!(errors.len(), 1, "{field}: {errors:?}");
            assert_eq!(errors[0].object.as_deref(), Some("EndpointSlice shop/web-1"), "{field}");
            assert_eq!(errors[0].field.as_deref(), Some(field), "{}", errors[0]);
            assert_eq!(after, model, "{field}: the last good slice stays");
        }
    }

    #[test]
    fn unsupported_kind_and_missing_name_are_named() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "x.yaml", "apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: d\n---\napiVersion: v1\nkind: Pod\nmetadata:\n  namespace: shop\n");
        let (_, errors) = DirSource::new(dir.path()).reload();
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(errors.len(), 2, "{text:?}");
        assert_eq!(errors[0].object.as_deref(), Some("Deployment default/d"));
        assert_eq!(errors[0].field.as_deref(), Some("kind"));
        assert_eq!(errors[1].object.as_deref(), Some("Pod"));
        assert_eq!(errors[1].field.as_deref(), Some("metadata.name"));
    }
}
