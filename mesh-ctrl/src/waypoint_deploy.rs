//! How a waypoint is deployed in Kubernetes: the objects `meshctl waypoint generate` prints for
//! `kubectl apply -f -`. mesh-ctrl does not create pods; a waypoint is these four objects in its
//! namespace:
//!
//! - the `Gateway` of class `ferrymesh-waypoint` with its HBONE listener on 15008, which makes
//!   it a waypoint for the mesh (and, labelled `ferrymesh.io/waypoint-for`, which traffic it
//!   takes);
//! - a `ServiceAccount` of the Gateway's name: the waypoint's identity is
//!   `spiffe://<td>/ns/<namespace>/sa/<name>`;
//! - a `Deployment` of `mesh-waypoint` whose pods carry the label
//!   `gateway.networking.k8s.io/gateway-name: <name>` (agents send bound traffic to the ready
//!   ones, by pod IP, and never capture them) and present their own projected token (audience
//!   `ferrymesh`) to mesh-ctrl's CA, which issues that identity to a pod of it on the token's
//!   node; they verify mesh-ctrl against the root ConfigMap mesh-ctrl keeps in the namespace of
//!   every waypoint;
//! - a `PodDisruptionBudget` when there is more than one replica.
//!
//! The pods run as non-root with no capabilities: a waypoint is a plain TCP server.

use serde_json::{json, Value};

use crate::ca::secret::{ROOT_CONFIGMAP, ROOT_CONFIGMAP_KEY};
use crate::ca::token_review::AUDIENCE;
use crate::model::{WaypointFor, GATEWAY_NAME_LABEL, WAYPOINT_CLASS, WAYPOINT_FOR_LABEL};

/// Where the pod's projected token is mounted, and its file name there.
pub const TOKEN_DIR: &str = "/var/run/secrets/ferrymesh";
/// Where the root ConfigMap is mounted (whole, so a rotated root arrives).
pub const CA_ROOT_DIR: &str = "/etc/ferrymesh/ca-root";

/// One waypoint to deploy.
#[derive(Clone, Debug)]
pub struct WaypointDeploy {
    /// The namespace it serves and runs in.
    pub namespace: String,
    /// The Gateway's name (and its service account's).
    pub name: String,
    /// Which traffic it takes.
    pub traffic: WaypointFor,
    /// The mesh-waypoint image.
    pub image: String,
    /// Pods.
    pub replicas: u16,
    /// mesh-ctrl's address.
    pub ctrl: String,
    /// The rate-limit service of global rate limits, if any.
    pub rate_limit_service: Option<String>,
    /// The OpenTelemetry collector request spans go to, if any.
    pub tracing_collector: Option<String>,
}

impl WaypointDeploy {
    /// The objects, as YAML documents.
    pub fn yaml(&self) -> String {
        self.objects()
            .iter()
            .map(|o| format!("---\n{}", serde_yaml::to_string(o).expect("JSON values serialize")))
            .collect()
    }

    /// The objects, in the order they are applied.
    pub fn objects(&self) -> Vec<Value> {
        let (ns, name) = (self.namespace.as_str(), self.name.as_str());
        let labels = json!({GATEWAY_NAME_LABEL: name});
        let mut objects = vec![
            json!({
                "apiVersion": "gateway.networking.k8s.io/v1",
                "kind": "Gateway",
                "metadata": {"name": name, "namespace": ns, "labels": {WAYPOINT_FOR_LABEL: self.traffic.as_str()}},
                "spec": {
                    "gatewayClassName": WAYPOINT_CLASS,
                    "listeners": [{"name": "mesh", "port": mesh_common::HBONE_PORT, "protocol": "HBONE"}],
                },
            }),
            json!({
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": name, "namespace": ns},
            }),
            json!({
                "apiVersion": "apps/v1",
                "kind": "Deployment",
                "metadata": {"name": name, "namespace": ns, "labels": labels},
                "spec": {
                    "replicas": self.replicas,
                    "selector": {"matchLabels": labels},
                    "template": {
                        "metadata": {"labels": labels},
                        "spec": self.pod_spec(),
                    },
                },
            }),
        ];
        if self.replicas > 1 {
            objects.push(json!({
                "apiVersion": "policy/v1",
                "kind": "PodDisruptionBudget",
                "metadata": {"name": name, "namespace": ns},
                "spec": {"minAvailable": 1, "selector": {"matchLabels": labels}},
            }));
        }
        objects
    }

    fn args(&self) -> Vec<String> {
        let mut args = vec![
            format!("--namespace={}", self.namespace),
            format!("--name={}", self.name),
            format!("--ctrl={}", self.ctrl),
            format!("--ca-root={CA_ROOT_DIR}/{ROOT_CONFIGMAP_KEY}"),
            format!("--token-file={TOKEN_DIR}/token"),
            "--access-log=-".into(),
        ];
        args.extend(self.rate_limit_service.iter().map(|url| format!("--rate-limit-service={url}")));
        args.extend(self.tracing_collector.iter().map(|url| format!("--tracing-collector={url}")));
        args
    }

    fn pod_spec(&self) -> Value {
        let field = |path: &str| json!({"fieldRef": {"fieldPath": path}});
        json!({
            "serviceAccountName": self.name,
            // Its token for the API server is not needed: it talks to mesh-ctrl only, with the
            // projected token below.
            "automountServiceAccountToken": false,
            "securityContext": {"runAsNonRoot": true, "runAsUser": 65532, "seccompProfile": {"type": "RuntimeDefault"}},
            "containers": [{
                "name": "mesh-waypoint",
                "image": self.image,
                "args": self.args(),
                "env": [
                    {"name": "FERRYMESH_NODE_NAME", "valueFrom": field("spec.nodeName")},
                    {"name": "FERRYMESH_POD_IP", "valueFrom": field("status.podIP")},
                ],
                "ports": [
                    {"name": "hbone", "containerPort": mesh_common::HBONE_PORT},
                    {"name": "metrics", "containerPort": 15020},
                ],
                // 15008 is bound once the waypoint has its config and certificate.
                "readinessProbe": {"tcpSocket": {"port": mesh_common::HBONE_PORT}, "periodSeconds": 2},
                // What its clients can make it hold at its default caps fits in the limit
                // (docs/SECURITY.md, "The waypoint's budget").
                "resources": {
                    "requests": {"cpu": "100m", "memory": "32Mi"},
                    "limits": {"memory": "1Gi"},
                },
                "securityContext": {
                    "allowPrivilegeEscalation": false,
                    "readOnlyRootFilesystem": true,
                    "capabilities": {"drop": ["ALL"]},
                },
                "volumeMounts": [
                    {"name": "token", "mountPath": TOKEN_DIR, "readOnly": true},
                    {"name": "ca-root", "mountPath": CA_ROOT_DIR, "readOnly": true},
                ],
            }],
            "volumes": [
                {"name": "token", "projected": {"sources": [{"serviceAccountToken": {"audience": AUDIENCE, "expirationSeconds": 3600, "path": "token"}}]}},
                {"name": "ca-root", "configMap": {"name": ROOT_CONFIGMAP}},
            ],
        })
    }
}
