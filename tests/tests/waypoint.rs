//! End-to-end waypoint: Services of a namespace bound to its waypoint (a Gateway of class
//! ferrymesh-waypoint, run as mesh-waypoint in a pod), the source agent carrying their traffic
//! over HBONE to it, the waypoint routing each request by Gateway API routes and carrying it over
//! HBONE to the endpoint with its own identity. Real curl, real WebSocket, real processes on the
//! netns topology. Needs root.

use std::collections::BTreeMap;
use std::time::Duration;

use ferrymesh_testbed::mesh::{wait_until, CONFIG_WAIT, DATAPLANE_MODE, ECHO_HTTP_PORT, FLOW_WAIT};
use ferrymesh_testbed::{Topology, TopologySpec};

/// VIP of Service shop/web (pods web-1 on node 1 and web-2 on node 2; ports 80 and 8080).
const WEB: &str = "10.96.0.50";
/// VIP of Service shop/canary (pod canary on node 2).
const CANARY: &str = "10.96.0.51";

const CLIENT_ID: &str = "spiffe://cluster.local/ns/shop/sa/a";
const WAYPOINT_ID: &str = "spiffe://cluster.local/ns/shop/sa/waypoint";

/// The waypoint cluster: `shop` enrolled and bound to its waypoint `shop/waypoint` (its pod on
/// node 2), client a and web-1 on node 1, web-2, canary and the waypoint on node 2; every
/// backend serving fm-echo on 8081.
fn waypoint_cluster() -> Topology {
    let spec = TopologySpec::nodes(2)
        .pod("shop", "a", 1)
        .pod("shop", "web-1", 1)
        .pod("shop", "web-2", 2)
        .pod("shop", "canary", 2)
        .pod("shop", "waypoint", 2);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    topo.write_namespace("shop", &[(DATAPLANE_MODE, "enabled"), ("ferrymesh.io/use-waypoint", "waypoint")]);
    for name in ["web-1", "web-2"] {
        topo.write_pod(topo.pod("shop", name), &[("app", "web")]);
    }
    topo.write_pod(topo.pod("shop", "canary"), &[("app", "canary")]);
    topo.write_waypoint_pod(topo.pod("shop", "waypoint"));
    topo.write_waypoint("shop", "waypoint");
    let echo = ECHO_HTTP_PORT.to_string();
    topo.write_service("shop", "web", WEB, &[("app", "web")], &[("http", 80, &echo), ("alt", 8080, &echo)]);
    topo.write_service("shop", "canary", CANARY, &[("app", "canary")], &[("http", 80, &echo)]);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a", "shop/web-1"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["shop/canary", "shop/web-2"], Duration::from_secs(10));
    topo.start_waypoint(topo.pod("shop", "waypoint"));
    for name in ["web-1", "web-2", "canary"] {
        topo.serve_echo(topo.pod("shop", name));
    }
    topo
}

/// Pod name -> answers.
fn tally(pods: &[String]) -> BTreeMap<&str, usize> {
    let mut counts = BTreeMap::new();
    for pod in pods {
        *counts.entry(pod.as_str()).or_default() += 1;
    }
    counts
}

#[test]
fn a_bound_service_is_reached_through_the_waypoint_with_both_identities() {
    let topo = waypoint_cluster();
    let (a, waypoint) = (topo.pod("shop", "a"), topo.pod("shop", "waypoint"));

    // MeshBasic: without a route, requests go to the Service's own endpoints, spread per request
    // over one kept-alive connection.
    let pods = topo.echo_pods(a, &format!("http://{WEB}/"), 40, &[]);
    let counts = tally(&pods);
    assert_eq!(pods.len(), 40, "{pods:?}");
    assert!(counts.keys().all(|p| ["web-1", "web-2"].contains(p)), "{counts:?}");
    assert!(counts.len() == 2, "one connection's requests spread over both endpoints: {counts:?}");

    // The waypoint saw the client's identity, each request on its own record.
    wait_until(FLOW_WAIT, "the waypoint's request records", || topo.waypoint_requests(waypoint).len() >= 40);
    let records = topo.waypoint_requests(waypoint);
    let first = &records[0];
    assert_eq!(first["source_identity"], CLIENT_ID, "{first}");
    assert_eq!(first["service"], "shop/web", "{first}");
    assert_eq!(first["status"], 200, "{first}");
    assert_eq!(first["backend"], "shop/web:80", "{first}");
    assert_eq!(first["protocol"], "HTTP/1.1", "{first}");

    // The source agent's flow went to the waypoint, which proved its identity.
    wait_until(FLOW_WAIT, "the client's flow", || {
        topo.flows(1).iter().any(|f| f["direction"] == "outbound" && f["service"] == "shop/web")
    });
    let flows = topo.flows(1);
    let out = flows.iter().find(|f| f["direction"] == "outbound" && f["service"] == "shop/web").unwrap();
    assert_eq!(out["dst"]["identity"], WAYPOINT_ID, "{out}");
    assert_eq!(out["transport"], "mtls", "{out}");

    // The endpoints' agents see the waypoint's identity: a policy admitting only the waypoint
    // (how an operator keeps clients from going around it) lets every request through the
    // Service pass, and refuses the client going to a pod directly.
    topo.write_config_file(
        "policy-only-waypoint.yaml",
        &format!(
            "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: only-waypoint\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: web\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"{}\"]\n",
            WAYPOINT_ID.trim_start_matches("spiffe://")
        ),
    );
    wait_until(CONFIG_WAIT, "both agents to hold the policy", || {
        [1, 2].iter().all(|&node| {
            let out = topo.meshctl(node, &["policies", "-o", "json"]);
            String::from_utf8_lossy(&out.stdout).contains("only-waypoint")
        })
    });
    let direct = format!("http://{}:{ECHO_HTTP_PORT}/", topo.pod("shop", "web-2").ip);
    let refused = topo.http(a, &direct, &[]);
    assert_eq!(refused.status, 0, "the client cannot go around the waypoint: {refused:?}");
    // New connections from the waypoint (its pooled ones were admitted before the policy, and
    // stay admitted: the waypoint is allowed).
    let pods = topo.echo_pods(a, &format!("http://{WEB}/"), 20, &[]);
    assert_eq!(pods.len(), 20, "{pods:?}");
}
