//! The mesh in Kubernetes mode on a [`Topology`]: the testbed's API server fake served over
//! real HTTP on the fabric's loopback, holding what `kubectl apply -k manifests/overlays/kind`
//! creates; the unchanged `mesh-ctrl` binary run with the Deployment's own arguments through a
//! kubeconfig; agents whose projected tokens the fake's TokenReview binds to their nodes, and
//! which verify mesh-ctrl against the root it publishes in its ConfigMap. Pods run in the
//! cgroups a kubelet would give them, so agents find their netns as they would on a node.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{json, Value};

use crate::kube_fake::{kustomize, objects, KubeFake};
use crate::mesh::{bin, wait_until};
use crate::topology::{in_netns, FABRIC_IP};
use crate::{Pod, Topology};

/// The namespace the mesh's own objects live in.
pub const SYSTEM: &str = "ferrymesh-system";

/// The API fake and the runtime that serves it; mesh-ctrl and the agents run on the topology.
pub struct KubeMesh {
    /// The API server fake.
    pub fake: Arc<KubeFake>,
    /// What `kubectl kustomize manifests/overlays/kind` rendered.
    pub rendered: String,
    /// Serves the fake; its tasks end when it drops.
    _runtime: tokio::runtime::Runtime,
}

/// The mesh-ctrl Deployment's container arguments, from the rendered overlay.
pub fn deployment_args(rendered: &str) -> Vec<String> {
    let deployment = serde_yaml::Deserializer::from_str(rendered)
        .map(|d| Value::deserialize(d).expect("rendered YAML"))
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "ferrymesh-ctrl")
        .expect("the mesh-ctrl Deployment");
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].as_array().expect("args");
    args.iter().map(|a| a.as_str().expect("string argument").to_string()).collect()
}

/// A Pod object of `pod` (UID `uid-<netns>`, on its node, with its IP) with `labels`.
pub fn pod_object(pod: &Pod, labels: Value) -> Value {
    let uid = format!("uid-{}", pod.netns);
    objects::pod(&pod.namespace, &pod.name, &uid, &format!("node{}", pod.node), Some(&pod.ip.to_string()), labels)
}

impl KubeMesh {
    /// Serves the fake in the fabric with the kind overlay applied, lets `populate` add the
    /// test's objects, gives each node's agent a token bound to its node, starts mesh-ctrl as
    /// the Deployment runs it and writes the root it publishes where agents read it
    /// ([`Topology::ca_root`]). No agent is started.
    pub fn start(topo: &Topology, populate: impl FnOnce(&KubeFake)) -> Self {
        let runtime = tokio::runtime::Runtime::new().expect("runtime");
        let fake = KubeFake::new();
        let listener = in_netns(&topo.fabric, || std::net::TcpListener::bind("127.0.0.1:0")).expect("bind the fake");
        let address = listener.local_addr().expect("address");
        listener.set_nonblocking(true).expect("nonblocking");
        {
            let _entered = runtime.enter();
            fake.serve(tokio::net::TcpListener::from_std(listener).expect("listener"));
        }
        let rendered = kustomize("kind");
        fake.apply_yaml(&rendered);
        populate(&fake);
        // Each agent's projected token, bound by TokenReview to its node (Kubernetes 1.30+).
        for node in &topo.nodes {
            let token = format!("projected-token-{}-{}", node.name, std::process::id());
            std::fs::write(topo.token_file(node.index), &token).expect("write token");
            let extra = json!({"authentication.kubernetes.io/node-name": [node.name]});
            fake.accept_token(&token, &format!("system:serviceaccount:{SYSTEM}:ferrymesh-agent"), extra);
        }
        let kubeconfig = topo.dir.join("kubeconfig");
        std::fs::write(&kubeconfig, KubeFake::kubeconfig(address, SYSTEM)).expect("write kubeconfig");

        // mesh-ctrl as the Deployment runs it (it listens on 0.0.0.0:15012), named by the
        // address agents dial here instead of the Service's.
        let args = deployment_args(&rendered);
        assert!(args.iter().any(|a| a == "--kubernetes"), "{args:?}");
        let mut ctrl = topo.command_in(&topo.fabric, bin("mesh-ctrl"));
        ctrl.args(&args).args(["--tls-san", &FABRIC_IP.to_string()]);
        ctrl.env("KUBECONFIG", &kubeconfig).env("POD_NAMESPACE", SYSTEM);
        topo.spawn("mesh-ctrl", ctrl);
        wait_until(Duration::from_secs(20), "mesh-ctrl to serve", || {
            assert!(topo.is_running("mesh-ctrl"), "mesh-ctrl exited: {}", topo.log("mesh-ctrl"));
            topo.log("mesh-ctrl").contains("mesh-ctrl serving")
        });
        let mut root = String::new();
        wait_until(Duration::from_secs(10), "the root ConfigMap", || {
            let config_map = fake.get("ConfigMap", SYSTEM, "ferrymesh-ca-root-cert");
            root = config_map["data"]["root-cert.pem"].as_str().unwrap_or_default().to_string();
            root.contains("BEGIN CERTIFICATE")
        });
        std::fs::create_dir_all(topo.ca_dir()).expect("create the CA directory");
        std::fs::write(topo.ca_root(), &root).expect("write the root");
        Self { fake, rendered, _runtime: runtime }
    }

    /// Starts fm-peer servers in each of `pods`, inside the cgroup the kubelet would give it
    /// (Kubernetes pods carry no netns annotation: the agent finds them by cgroup).
    pub fn serve_in_pod_cgroups(topo: &Topology, pods: &[&Pod]) {
        for pod in pods {
            let cgroup = topo.pod_cgroup(&format!("uid-{}", pod.netns));
            topo.serve_in_cgroup(pod, &cgroup);
        }
    }
}
