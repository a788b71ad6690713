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

use ferrymesh_testbed::kube_fake::objects;
use ferrymesh_testbed::kube_mesh::{pod_object, KubeMesh, SYSTEM};
use ferrymesh_testbed::mesh::wait_until;
use ferrymesh_testbed::{Topology, TopologySpec};
use serde_json::{json, Value};

#[test]
fn mesh_ctrl_serves_a_kubernetes_cluster_over_http_and_its_changes_reach_the_agents() {
    let spec = TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "c", 2).pod("legacy", "x", 1);
    let topo = Topology::build(&spec);
    let (a, c, x) = (topo.pod("shop", "a"), topo.pod("shop", "c"), topo.pod("legacy", "x"));

    let mesh = KubeMesh::start(&topo, |fake| {
        fake.apply(objects::namespace("shop", json!({"ferrymesh.io/dataplane-mode": "enabled"})));
        fake.apply(objects::namespace("legacy", json!({})));
        for pod in [a, c, x] {
            fake.apply(objects::service_account(&pod.namespace, &pod.name));
            fake.apply(pod_object(pod, json!({"app": pod.name})));
        }
    });
    let fake = &mesh.fake;
    // It created the CA Secret and publishes the root agents mount.
    let secret = fake.get("Secret", SYSTEM, "ferrymesh-ca");
    assert!(secret["data"]["ca-cert.pem"].is_string() && secret["data"]["ca-key.pem"].is_string(), "{secret}");

    KubeMesh::serve_in_pod_cgroups(&topo, &[a, c, x]);
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
}
