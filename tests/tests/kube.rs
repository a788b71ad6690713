//! `mesh-ctrl --kubernetes`, the unchanged binary, against a Kubernetes API over real HTTP: the
//! testbed's API server fake (`ferrymesh_testbed::kube_fake`, the one mesh-ctrl's source and
//! identity tests use in process) served on the fabric's loopback, reached through a
//! kubeconfig. It holds what `kubectl apply -k manifests/overlays/kind` creates and the test's
//! own Namespaces, ServiceAccounts, Pods, a Service and a policy; mesh-ctrl runs with the
//! Deployment's own arguments; the agents on the topology's nodes present tokens the fake's
//! TokenReview binds to their nodes and verify mesh-ctrl against the root it publishes in its
//! ConfigMap. Changes made through the API (a Service added, a namespace label flipped live, a
//! policy added, a pod deleted) each reach the agents.

use std::time::Duration;

use ferrymesh_testbed::kube_fake::{kustomize, objects, KubeFake};
use ferrymesh_testbed::mesh::{bin, wait_until};
use ferrymesh_testbed::topology::{in_netns, FABRIC_IP};
use ferrymesh_testbed::{Pod, Topology, TopologySpec};
use serde_json::{json, Value};

const SYSTEM: &str = "ferrymesh-system";

/// The mesh-ctrl Deployment's container arguments, from the rendered overlay.
fn deployment_args(rendered: &str) -> Vec<String> {
    use serde::Deserialize;
    let deployment = serde_yaml::Deserializer::from_str(rendered)
        .map(|d| Value::deserialize(d).unwrap())
        .find(|d| d["kind"] == "Deployment" && d["metadata"]["name"] == "ferrymesh-ctrl")
        .expect("the mesh-ctrl Deployment");
    let args = deployment["spec"]["template"]["spec"]["containers"][0]["args"].as_array().unwrap();
    args.iter().map(|a| a.as_str().unwrap().to_string()).collect()
}

fn pod_object(pod: &Pod, labels: Value) -> Value {
    let uid = format!("uid-{}", pod.netns);
    objects::pod(&pod.namespace, &pod.name, &uid, &format!("node{}", pod.node), Some(&pod.ip.to_string()), labels)
}

#[test]
fn mesh_ctrl_serves_a_kubernetes_cluster_over_http_and_its_changes_reach_the_agents() {
    let spec = TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "c", 2).pod("legacy", "x", 1);
    let topo = Topology::build(&spec);
    let (a, c, x) = (topo.pod("shop", "a"), topo.pod("shop", "c"), topo.pod("legacy", "x"));

    // The API server: on the loopback of the fabric namespace, where mesh-ctrl runs.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let fake = KubeFake::new();
    let listener = in_netns(&topo.fabric, || std::net::TcpListener::bind("127.0.0.1:0")).expect("bind the fake");
    let address = listener.local_addr().unwrap();
    listener.set_nonblocking(true).unwrap();
    {
        let _entered = runtime.enter();
        fake.serve(tokio::net::TcpListener::from_std(listener).unwrap());
    }
    let rendered = kustomize("kind");
    fake.apply_yaml(&rendered);
    fake.apply(objects::namespace("shop", json!({"ferrymesh.io/dataplane-mode": "enabled"})));
    fake.apply(objects::namespace("legacy", json!({})));
    for pod in [a, c, x] {
        fake.apply(objects::service_account(&pod.namespace, &pod.name));
        fake.apply(pod_object(pod, json!({"app": pod.name})));
    }
    // Each agent's projected token, bound by TokenReview to its node (Kubernetes 1.30+).
    for node in [1u8, 2] {
        let token = format!("projected-token-node{node}-{}", std::process::id());
        std::fs::write(topo.token_file(node), &token).unwrap();
        let extra = json!({"authentication.kubernetes.io/node-name": [format!("node{node}")]});
        fake.accept_token(&token, &format!("system:serviceaccount:{SYSTEM}:ferrymesh-agent"), extra);
    }
    let kubeconfig = topo.dir.join("kubeconfig");
    std::fs::write(&kubeconfig, KubeFake::kubeconfig(address, SYSTEM)).unwrap();

    // mesh-ctrl as the Deployment runs it (it listens on 0.0.0.0:15012), named by the address
    // agents dial here instead of the Service's.
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
    // It created the CA Secret and publishes the root agents mount.
    let secret = fake.get("Secret", SYSTEM, "ferrymesh-ca");
    assert!(secret["data"]["ca-cert.pem"].is_string() && secret["data"]["ca-key.pem"].is_string(), "{secret}");
    let mut root = String::new();
    wait_until(Duration::from_secs(10), "the root ConfigMap", || {
        let config_map = fake.get("ConfigMap", SYSTEM, "ferrymesh-ca-root-cert");
        root = config_map["data"]["root-cert.pem"].as_str().unwrap_or_default().to_string();
        root.contains("BEGIN CERTIFICATE")
    });
    std::fs::create_dir_all(topo.ca_dir()).unwrap();
    std::fs::write(topo.ca_root(), &root).unwrap();

    // The pods run in their kubelet cgroups (Kubernetes pods carry no netns annotation).
    for pod in [a, c, x] {
        let cgroup = topo.pod_cgroup(&format!("uid-{}", pod.netns));
        topo.serve_in_cgroup(pod, &cgroup);
    }
    topo.start_agent(1);
    topo.start_agent(2);
    topo.wait_enrolled(1, &["shop/a"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["shop/c"], Duration::from_secs(10));
    // Certificates through TokenReview: a -> c across nodes is mutual TLS with both identities.
    let body = topo.curl(a, c.ip);
    assert!(body.starts_with(&format!("client {}:", a.ip)), "{body}");
    let carried = |flows: Vec<Value>| {
        flows.into_iter().any(|f| {
            f["direction"] == "inbound"
                && f["src"]["identity"] == "spiffe://cluster.local/ns/shop/sa/a"
                && f["transport"] == "mtls"
                && f["verdict"] == "allowed"
        })
    };
    wait_until(Duration::from_secs(5), "the mTLS flow at c's agent", || carried(topo.flows(2)));

    // A Service added through the API (its ClusterIP allocated by the API server) is carried to
    // its endpoint, c.
    fake.apply(objects::service("shop", "web", None, "c", json!([{"name": "http", "port": 80, "targetPort": 8080}])));
    let vip = fake.get("Service", "shop", "web")["spec"]["clusterIP"].as_str().unwrap().to_string();
    let url = format!("http://{vip}/");
    wait_until(Duration::from_secs(10), "the Service to reach c", || {
        let out = topo.output_in(&a.netns, "curl", &["-sS", "--max-time", "3", &url]);
        String::from_utf8_lossy(&out.stdout).starts_with(&format!("client {}:", a.ip))
    });
    let via_service = |flows: Vec<Value>| flows.into_iter().any(|f| f["service"] == "shop/web");
    wait_until(Duration::from_secs(5), "a flow naming the Service", || via_service(topo.flows(1)));

    // A namespace label flipped live: legacy joins the mesh, x is enrolled.
    fake.apply(objects::namespace("legacy", json!({"ferrymesh.io/dataplane-mode": "enabled"})));
    topo.wait_enrolled(1, &["legacy/x", "shop/a"], Duration::from_secs(10));

    // A policy added: c refuses a, and the flow names the policy.
    let deny = json!({"selector": {"matchLabels": {"app": "c"}}, "action": "DENY", "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/shop/sa/a"]}}]}]});
    fake.apply(objects::authorization_policy("shop", "deny-a", deny));
    wait_until(Duration::from_secs(10), "the policy to refuse a", || topo.try_curl(a, c.ip.into()).0 != Some(0));
    wait_until(Duration::from_secs(5), "the denied flow", || {
        topo.flows(2).iter().any(|f| f["verdict"] == "denied" && f["policy"] == "shop/deny-a rule 0")
    });
    assert_eq!(topo.try_curl(x, c.ip.into()).0, Some(0), "x (now in the mesh) is not refused");

    // A pod deleted: its agent lets it go.
    fake.delete("Pod", "shop", "a");
    wait_until(Duration::from_secs(10), "a to be released", || !topo.enrolled(1).contains(&"shop/a".to_string()));
    assert!(topo.enrolled(1).contains(&"legacy/x".to_string()));

    // mesh-ctrl used the API as a client of a real server does: watches resumed from a
    // resourceVersion with bookmarks, TokenReviews for the agents' tokens.
    let requests = fake.requests();
    assert!(
        requests.iter().any(|r| r.query.contains("watch=true")
            && r.query.contains("allowWatchBookmarks=true")
            && r.query.contains("resourceVersion=")),
        "no resumed watch among {} requests",
        requests.len()
    );
    let reviews = requests.iter().filter(|r| r.path.ends_with("/tokenreviews")).count();
    assert!(reviews >= 2, "each agent's token reviewed: {reviews}");
    drop(runtime);
}
