//! fm-demo: what `cargo xtask demo` shows. Builds a two-node topology, starts mesh-ctrl and
//! both agents, sends curl traffic between pods, prints the flows, and cleans everything up on
//! exit or Ctrl-C. `--hold` keeps the mesh up until Ctrl-C so you can explore with meshctl.

use std::time::Duration;

use ferrymesh_testbed::mesh::bin;
use ferrymesh_testbed::topology::{cleanup_all, FABRIC_IP};
use ferrymesh_testbed::{Topology, TopologySpec};

fn banner(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

fn main() {
    ctrlc::set_handler(|| {
        eprintln!("\ninterrupted: removing the demo topology");
        cleanup_all();
        std::process::exit(130);
    })
    .expect("Ctrl-C handler");
    let hold = std::env::args().any(|a| a == "--hold");

    banner("topology: 2 nodes; namespace shop is enrolled, namespace legacy is not");
    let spec = TopologySpec::nodes(2)
        .pod("shop", "web", 1)
        .pod("shop", "cart", 1)
        .pod("shop", "api", 2)
        .pod("legacy", "batch", 1)
        .pod("legacy", "report", 2);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    for pod in &topo.pods {
        println!(
            "  pod {:<14} node{}  {:<12} netns {}",
            format!("{}/{}", pod.namespace, pod.name),
            pod.node,
            pod.ip,
            pod.netns
        );
    }

    banner(&format!("mesh-ctrl on {FABRIC_IP}:15012, one mesh-agent per node"));
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/cart", "shop/web"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["shop/api"], Duration::from_secs(10));
    println!("  node1 enrolled {:?}, node2 enrolled {:?}", topo.enrolled(1), topo.enrolled(2));
    topo.serve_all();

    banner("traffic (curl; each server answers with the client address it saw)");
    let pairs = [
        ("shop", "web", "shop", "api", "enrolled -> enrolled, across nodes (HBONE)"),
        ("shop", "web", "shop", "cart", "enrolled -> enrolled, same node (node-local)"),
        ("shop", "web", "legacy", "batch", "enrolled -> not enrolled, same node"),
        ("legacy", "batch", "shop", "api", "not enrolled -> enrolled (inbound capture)"),
        ("legacy", "batch", "legacy", "report", "not enrolled -> not enrolled (no capture)"),
    ];
    for (fns, from, tns, to, what) in pairs {
        let (src, dst) = (topo.pod(fns, from), topo.pod(tns, to));
        let body = topo.curl(src, dst.ip);
        println!("  {from:>6} -> {to:<6} {what:<44} server saw {}", body.trim());
    }
    let (web, api) = (topo.pod("shop", "web"), topo.pod("shop", "api"));
    let result = topo.send(web, api.ip, 50 * 1024 * 1024);
    println!(
        "  web -> api 50 MiB over HBONE (mTLS) through both agents: checksum match = {}, {:.2} s",
        result["match"], result["seconds"]
    );

    banner("a Service VIP (10.96.0.20:80 -> container port \"http\" of app=api pods)");
    topo.write_pod(api, &[("app", "api")]);
    topo.write_service("shop", "api", "10.96.0.20", &[("app", "api")], &[("http", 80, "http")]);
    std::thread::sleep(Duration::from_millis(500));
    let vip = "10.96.0.20:80".parse().expect("VIP");
    let hits = topo.hits(web, vip, 4);
    println!(
        "  web -> 10.96.0.20:80 x4: {} ok, {} failed; servers saw {}",
        hits["ok"], hits["failed"], hits["client_ips"]
    );

    banner("an AuthorizationPolicy: only shop/web may reach app=api");
    let policy = "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: api-from-web\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: api\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/web]\n";
    topo.write_config_file("policy-api-from-web.yaml", policy);
    std::thread::sleep(Duration::from_millis(500));
    let batch = topo.pod("legacy", "batch");
    for (from, what) in [(web, "mTLS as spiffe://cluster.local/ns/shop/sa/web"), (batch, "plaintext, no identity")] {
        let url = format!("http://{}:8080/", api.ip);
        let out = topo.output_in(&from.netns, "curl", &["-sS", "--max-time", "3", &url]);
        let verdict = if out.status.success() { "allowed" } else { "denied" };
        println!("  {:>6} -> api ({what}): {verdict}", from.name);
    }

    for node in [1, 2] {
        banner(&format!("flows on node{node}: meshctl --agent {} flows", topo.agent_socket(node).display()));
        print!("{}", String::from_utf8_lossy(&topo.meshctl(node, &["flows"]).stdout));
    }
    banner("node1: meshctl status");
    print!("{}", String::from_utf8_lossy(&topo.meshctl(1, &["status"]).stdout));

    if hold {
        banner("holding the mesh up; try (in another shell):");
        println!("  {} --agent {} flows -o json", bin("meshctl").display(), topo.agent_socket(1).display());
        println!("  nsenter --net={} curl http://{}:8080/", web.netns_path().display(), api.ip);
        println!("  Ctrl-C to stop and clean up");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
    banner("cleaning up");
    drop(topo);
    println!("  done: no namespace, process or eBPF attachment of the demo remains");
}
