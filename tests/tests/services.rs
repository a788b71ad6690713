//! End-to-end services: a ClusterIP VIP with a named targetPort, spread across its endpoints by
//! the client's agent, skipping unready endpoints, trying another endpoint when one fails (each
//! failed attempt seen in its own flow), dropping a removed endpoint without failing clients, and
//! preferring the less loaded endpoint (power of two choices); a dual-stack Service's IPv6 VIP.
//! Needs root.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use ferrymesh_testbed::mesh::{bin, wait_until, CONFIG_WAIT, ECHO_PORT, FLOW_WAIT};
use ferrymesh_testbed::{Topology, TopologySpec};

const VIP: &str = "10.96.0.10";
/// The IPv6 ClusterIP of the dual-stack Service.
const VIP6: &str = "fd00:10:96::a";

/// The flows of node 1's agent since `skip`, once `n` successful outbound flows to the service
/// are among them (flows are listed as connections end, within a second).
fn web_flows(topo: &Topology, skip: usize, n: usize) -> Vec<serde_json::Value> {
    let allowed = |f: &serde_json::Value| f["service"] == "shop/web" && f["verdict"] == "allowed";
    let mut flows = Vec::new();
    wait_until(FLOW_WAIT * 2, &format!("{n} flows to shop/web"), || {
        flows = topo.flows(1).into_iter().skip(skip).collect();
        flows.iter().filter(|f| allowed(f)).count() >= n
    });
    flows
}

/// Endpoint workload name -> number of successful outbound flows to the service since `skip`,
/// once there are `n`.
fn spread(topo: &Topology, skip: usize, n: usize) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for f in web_flows(topo, skip, n) {
        if f["service"] == "shop/web" && f["verdict"] == "allowed" {
            *out.entry(f["dst"]["workload"].as_str().unwrap().to_string()).or_default() += 1;
        }
    }
    out
}

#[test]
fn a_vip_spreads_connections_over_ready_endpoints_and_survives_endpoint_loss() {
    let spec = TopologySpec::nodes(2)
        .pod("shop", "client", 1)
        .pod("shop", "web-1", 1)
        .pod("shop", "web-2", 2)
        .pod("shop", "web-3", 2);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    for name in ["web-1", "web-2", "web-3"] {
        topo.write_pod(topo.pod("shop", name), &[("app", "web")]);
    }
    // Port 80 on the VIP is the pods' container port named "http" (8080); 9001 their echo.
    topo.write_service("shop", "web", VIP, &[("app", "web")], &[("http", 80, "http"), ("echo", ECHO_PORT, "echo")]);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/client", "shop/web-1"], Duration::from_secs(10));
    topo.serve_all();
    let client = topo.pod("shop", "client");
    let vip: SocketAddr = format!("{VIP}:80").parse().unwrap();

    // 300 connections spread over all three endpoints; the servers see the client's own IP.
    let result = topo.hits(client, vip, 300);
    assert_eq!((result["ok"].as_u64(), result["failed"].as_u64()), (Some(300), Some(0)), "{result}");
    assert_eq!(result["client_ips"], serde_json::json!([client.ip.to_string()]));
    let hits = spread(&topo, 0, 300);
    assert_eq!(hits.len(), 3, "{hits:?}");
    assert!(hits.values().all(|n| *n >= 50), "P2C spreads 300 sequential connections: {hits:?}");
    for flow in topo.flows(1).into_iter().filter(|f| f["service"] == "shop/web") {
        assert_eq!(flow["dst"]["port"], 8080, "the named targetPort resolved: {flow}");
        // Endpoints are meshed: web-1 shares the client's node (handed over inside the agent),
        // web-2 and web-3 are reached over HBONE.
        let transport = if flow["dst"]["workload"] == "web-1" { "node-local" } else { "mtls" };
        assert_eq!(flow["transport"], transport, "{flow}");
    }

    // An unready endpoint gets nothing.
    let web2 = topo.pod("shop", "web-2");
    let unready = topo
        .pod_yaml(web2, &[("app", "web")])
        .replace("status:\n", "status:\n  conditions:\n  - type: Ready\n    status: \"False\"\n");
    // The version before the change, read before making it (the change can land in a few ms).
    let before = topo.status(1)["config_version"].as_u64().unwrap();
    topo.write_config_file("pod-shop-web-2.yaml", &unready);
    wait_until(CONFIG_WAIT, "the readiness change", || topo.status(1)["config_version"].as_u64().unwrap() > before);
    let skip = topo.flows(1).len();
    let result = topo.hits(client, vip, 60);
    assert_eq!(result["failed"], 0, "{result}");
    let hits = spread(&topo, skip, 60);
    assert!(!hits.contains_key("web-2") && hits.len() == 2, "unready web-2 is skipped: {hits:?}");

    // web-3's app dies but the config still lists it: every client connection still succeeds,
    // the agent tries another endpoint.
    topo.signal_and_wait("peer-shop-web-3", libc::SIGKILL);
    let skip = topo.flows(1).len();
    let result = topo.hits(client, vip, 60);
    let flows = web_flows(&topo, skip, 60);
    let failed: Vec<_> = flows.iter().filter(|f| f["verdict"] != "allowed").collect();
    assert_eq!((result["ok"].as_u64(), result["failed"].as_u64()), (Some(60), Some(0)), "{result} {failed:?}");
    assert_eq!(spread(&topo, skip, 60).keys().collect::<Vec<_>>(), ["web-1"], "only web-1 answers");
    // The retries are seen: P2C tries web-3 about half the time; each try has its own flow,
    // and the same client connection (same source port) then succeeded on web-1.
    assert!(!failed.is_empty(), "no failed attempt was recorded in {} flows", flows.len());
    for attempt in &failed {
        assert_eq!(
            (&attempt["dst"]["workload"], &attempt["service"]),
            (&serde_json::json!("web-3"), &serde_json::json!("shop/web")),
            "{attempt}"
        );
        assert_eq!(attempt["verdict"], "error", "{attempt}");
        let reason = attempt["reason"].as_str().unwrap();
        assert!(
            reason.starts_with("endpoint attempt 1 of 3 failed: destination refused the tunnel: HTTP 503"),
            "{reason}"
        );
        let retried = flows.iter().find(|f| {
            f["verdict"] == "allowed" && f["src"]["port"] == attempt["src"]["port"] && f["dst"]["workload"] == "web-1"
        });
        assert!(retried.is_some(), "the connection of {attempt} was carried by web-1");
    }

    // web-3 removed from the config: after the change no connection even tries it.
    let before = topo.status(1)["config_version"].as_u64().unwrap();
    std::fs::remove_file(topo.config_dir().join("pod-shop-web-3.yaml")).unwrap();
    wait_until(CONFIG_WAIT, "the removal to reach node1", || {
        topo.status(1)["config_version"].as_u64().unwrap() > before
    });
    let result = topo.hits(client, vip, 60);
    assert_eq!((result["ok"].as_u64(), result["failed"].as_u64()), (Some(60), Some(0)), "{result}");

    // Power of two choices end to end: 10 connections held open through the VIP while web-1
    // is its only ready endpoint; once web-2 is ready again, new connections all go to web-2
    // (with two endpoints P2C always compares both, and web-1 has 10 in progress).
    let mut hold = topo.command_in(&client.netns, bin("fm-peer"));
    hold.args(["hold", "--to", &format!("{VIP}:{ECHO_PORT}"), "--count", "10"]);
    topo.spawn("hold", hold);
    wait_until(Duration::from_secs(10), "10 connections held", || topo.log("hold").contains("held 10"));
    // The client's side of a held connection (node-local handovers record both sides).
    let held_flow = |f: &serde_json::Value| f["service"] == "shop/web" && f["dst"]["port"] == ECHO_PORT;
    let held: Vec<_> = topo.flows(1).into_iter().skip(skip).filter(held_flow).collect();
    assert!(held.is_empty(), "held connections are still open (no flow yet): {held:?}");
    let before = topo.status(1)["config_version"].as_u64().unwrap();
    topo.write_pod(web2, &[("app", "web")]);
    wait_until(CONFIG_WAIT, "web-2 to be ready again", || topo.status(1)["config_version"].as_u64().unwrap() > before);
    let skip = topo.flows(1).len();
    let result = topo.hits(client, vip, 30);
    assert_eq!(result["failed"], 0, "{result}");
    assert_eq!(spread(&topo, skip, 30), BTreeMap::from([("web-2".to_string(), 30)]), "the loaded web-1 is avoided");
    // Once the held connections close, web-1 is chosen again.
    topo.signal_and_wait("hold", libc::SIGKILL);
    wait_until(FLOW_WAIT, "the held connections' flows", || {
        topo.flows(1).iter().skip(skip).filter(|f| held_flow(f)).count() == 10
    });
    let held: Vec<_> = topo.flows(1).into_iter().filter(held_flow).collect();
    assert!(held.iter().all(|f| f["dst"]["workload"] == "web-1"), "all 10 were held on web-1: {held:?}");
    let skip = topo.flows(1).len();
    let result = topo.hits(client, vip, 40);
    assert_eq!(result["failed"], 0, "{result}");
    let hits = spread(&topo, skip, 40);
    assert!(hits.get("web-1") > Some(&0) && hits.get("web-2") > Some(&0), "both endpoints serve again: {hits:?}");
}

#[test]
fn a_dual_stack_service_takes_each_family_to_endpoints_of_that_family() {
    let spec = TopologySpec::nodes(2).pod("shop", "client", 1).pod("shop", "web-1", 1).pod("shop", "web-2", 2);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    for name in ["web-1", "web-2"] {
        topo.write_pod(topo.pod("shop", name), &[("app", "web")]);
    }
    topo.write_service("shop", "web", &format!("{VIP},{VIP6}"), &[("app", "web")], &[("http", 80, "http")]);
    // Its selector matches no pod.
    topo.write_service("shop", "empty", "10.96.0.11,fd00:10:96::b", &[("app", "none")], &[("http", 80, "http")]);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/client", "shop/web-1"], Duration::from_secs(10));
    topo.serve_all();
    let client = topo.pod("shop", "client");
    let web6: Vec<String> = ["web-1", "web-2"].iter().map(|n| topo.pod("shop", n).ip6.to_string()).collect();
    let web4: Vec<String> = ["web-1", "web-2"].iter().map(|n| topo.pod("shop", n).ip.to_string()).collect();

    // The IPv6 VIP is the Service's too: its connections go to the endpoints' IPv6 addresses,
    // over both transports, and the servers see the client's IPv6 address.
    let vip6 = SocketAddr::new(VIP6.parse().unwrap(), 80);
    let result = topo.hits(client, vip6, 40);
    assert_eq!((result["ok"].as_u64(), result["failed"].as_u64()), (Some(40), Some(0)), "{result}");
    assert_eq!(result["client_ips"], serde_json::json!([client.ip6.to_string()]));
    let flows: Vec<_> = web_flows(&topo, 0, 40).into_iter().filter(|f| f["service"] == "shop/web").collect();
    assert_eq!(flows.len(), 40, "{flows:#?}");
    for flow in &flows {
        assert!(web6.iter().any(|ip| flow["dst"]["ip"] == ip.as_str()), "{flow}");
        assert_eq!(flow["dst"]["port"], 8080, "{flow}");
    }
    let transports: std::collections::BTreeSet<_> = flows.iter().map(|f| f["transport"].to_string()).collect();
    assert_eq!(transports.len(), 2, "node-local and mtls: {transports:?}");

    // The IPv4 VIP still leads to IPv4 endpoints only.
    let result = topo.hits(client, format!("{VIP}:80").parse().unwrap(), 20);
    assert_eq!((result["ok"].as_u64(), result["failed"].as_u64()), (Some(20), Some(0)), "{result}");
    assert_eq!(result["client_ips"], serde_json::json!([client.ip.to_string()]));
    let flows: Vec<_> = web_flows(&topo, 0, 60).into_iter().filter(|f| f["service"] == "shop/web").skip(40).collect();
    assert_eq!(flows.len(), 20, "{flows:#?}");
    assert!(flows.iter().all(|f| web4.iter().any(|ip| f["dst"]["ip"] == ip.as_str())), "{flows:#?}");

    // Without a ready endpoint the connection is refused, and the flow names the VIP's family.
    let result = topo.hits(client, "[fd00:10:96::b]:80".parse().unwrap(), 1);
    assert_eq!((result["ok"].as_u64(), result["failed"].as_u64()), (Some(0), Some(1)), "{result}");
    wait_until(FLOW_WAIT, "the refused flow", || {
        topo.flows(1).iter().any(|f| {
            f["service"] == "shop/empty" && f["reason"] == "service shop/empty has no ready IPv6 endpoint for port 80"
        })
    });
}

#[test]
fn traffic_continues_while_mesh_ctrl_is_down_and_agents_resync_after_restart() {
    let spec = TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "b", 1).pod("shop", "c", 2);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a", "shop/b"], Duration::from_secs(10));
    topo.serve_all();
    let (a, b, c) = (topo.pod("shop", "a"), topo.pod("shop", "b"), topo.pod("shop", "c"));
    let ping = topo.start_ping("ping", a, c.ip, 80);

    topo.signal_and_wait("mesh-ctrl", libc::SIGKILL);
    for node in [1, 2] {
        wait_until(Duration::from_secs(10), "the agent to notice mesh-ctrl is gone", || {
            topo.status(node)["ctrl_connected"] == false
        });
    }
    // New connections, with mTLS and the last good config.
    for _ in 0..5 {
        let body = topo.curl(a, c.ip);
        assert!(body.starts_with(&format!("client {}:", a.ip)), "{body}");
    }
    assert_eq!(topo.enrolled(1), ["shop/a", "shop/b"]);

    topo.start_ctrl(&[]);
    for node in [1, 2] {
        wait_until(Duration::from_secs(10), "the agent to resync", || topo.status(node)["ctrl_connected"] == true);
    }
    let versions =
        (topo.status(1)["config_version"].as_u64().unwrap(), topo.status(2)["config_version"].as_u64().unwrap());
    topo.write_pod(b, &[("ferrymesh.io/dataplane-mode", "none")]);
    wait_until(CONFIG_WAIT, "the change to reach both agents within 1 s", || {
        topo.status(1)["config_version"].as_u64().unwrap() > versions.0
            && topo.status(2)["config_version"].as_u64().unwrap() > versions.1
    });
    topo.wait_enrolled(1, &["shop/a"], CONFIG_WAIT);
    topo.wait_success(&ping, Duration::from_secs(15));
}
