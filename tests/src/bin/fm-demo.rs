//! fm-demo: what `cargo xtask demo` shows. Builds a two-node topology, starts mesh-ctrl and
//! both agents, sends curl traffic between pods, then a waypoint act (a 90/10 canary by weight,
//! by header, an L7 deny by path), prints the flows, and cleans everything up on exit or Ctrl-C. `--hold` keeps the mesh up until Ctrl-C so you can explore with meshctl.

use std::time::Duration;

use ferrymesh_testbed::mesh::{bin, ECHO_HTTP_PORT};
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
        .pod("shop", "store-v1", 1)
        .pod("shop", "store-v2", 2)
        .pod("shop", "waypoint", 2)
        .pod("legacy", "batch", 1)
        .pod("legacy", "report", 2);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    for version in ["v1", "v2"] {
        let pod = topo.pod("shop", &format!("store-{version}"));
        topo.write_pod(pod, &[("tier", "store"), ("app", &format!("store-{version}"))]);
    }
    // The waypoint's pod is not captured: it speaks HBONE itself.
    topo.write_waypoint_pod(topo.pod("shop", "waypoint"));
    topo.write_waypoint("shop", "waypoint");
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
    topo.wait_enrolled(1, &["shop/cart", "shop/store-v1", "shop/web"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["shop/api", "shop/store-v2"], Duration::from_secs(10));
    println!("  node1 enrolled {:?}, node2 enrolled {:?}", topo.enrolled(1), topo.enrolled(2));
    for pod in topo.pods.iter().filter(|p| !p.name.starts_with("store") && p.name != "waypoint") {
        topo.serve(pod);
    }

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

    waypoint_act(&topo);

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

/// The waypoint act: Service shop/store bound to waypoint shop/waypoint, an HTTPRoute splitting
/// it 90/10 between store-v1 and store-v2 (all to v2 with `x-canary: true`), and an
/// AuthorizationPolicy on the Service denying `/admin/*`.
fn waypoint_act(topo: &Topology) {
    banner("a waypoint: Gateway shop/waypoint (class ferrymesh-waypoint), Service shop/store bound to it");
    let waypoint = topo.pod("shop", "waypoint");
    let service = |name: &str, vip: &str, selector: &str, labels: &str| {
        let text = format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: {name}\n  namespace: shop\n  labels: {{{labels}}}\nspec:\n  clusterIP: {vip}\n  selector: {{{selector}}}\n  ports:\n  - port: 80\n    targetPort: {ECHO_HTTP_PORT}\n"
        );
        topo.write_config_file(&format!("svc-shop-{name}.yaml"), &text);
    };
    service("store", "10.96.0.30", "tier: store", "ferrymesh.io/use-waypoint: waypoint");
    service("store-v1", "10.96.0.31", "app: store-v1", "");
    service("store-v2", "10.96.0.32", "app: store-v2", "");
    topo.start_waypoint(waypoint);
    for name in ["store-v1", "store-v2"] {
        topo.serve_echo(topo.pod("shop", name));
    }
    println!(
        "  mesh-waypoint runs in pod shop/waypoint ({}) as spiffe://cluster.local/ns/shop/sa/waypoint",
        waypoint.ip
    );

    banner("HTTPRoute shop/store: 90% to store-v1, 10% to store-v2; x-canary: true goes to store-v2");
    let route = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: store\n  namespace: shop\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: store\n    port: 80\n  rules:\n  - name: canary-header\n    matches:\n    - headers:\n      - name: x-canary\n        value: \"true\"\n    backendRefs:\n    - name: store-v2\n      port: 80\n  - name: split\n    backendRefs:\n    - name: store-v1\n      port: 80\n      weight: 90\n    - name: store-v2\n      port: 80\n      weight: 10\n";
    topo.write_config_file("route-store.yaml", route);
    std::thread::sleep(Duration::from_millis(1500));
    let web = topo.pod("shop", "web");
    let tally = |pods: Vec<String>| {
        let v1 = pods.iter().filter(|p| *p == "store-v1").count();
        format!("store-v1 {v1}, store-v2 {}", pods.len() - v1)
    };
    let url = "http://10.96.0.30/";
    println!("  web -> store x100: {}", tally(topo.echo_pods(web, url, 100, &[])));
    println!(
        "  web -> store x20 with x-canary: true: {}",
        tally(topo.echo_pods(web, url, 20, &["-H", "x-canary: true"]))
    );
    println!("  meshctl routes --to shop/store:80 --path /:");
    let explained = topo.meshctl(1, &["routes", "--to", "shop/store:80", "--path", "/"]);
    for line in String::from_utf8_lossy(&explained.stdout).lines() {
        println!("    {line}");
    }

    banner("an L7 AuthorizationPolicy on Service shop/store: DENY paths /admin/*");
    let policy = "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: store-no-admin\n  namespace: shop\nspec:\n  targetRefs:\n  - group: \"\"\n    kind: Service\n    name: store\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin/*\"]\n";
    topo.write_config_file("policy-store-no-admin.yaml", policy);
    std::thread::sleep(Duration::from_millis(1500));
    for path in ["/catalog", "/admin/users"] {
        let answer = topo.http(web, &format!("http://10.96.0.30{path}"), &[]);
        let what = match answer.status {
            200 => format!("served by {}", answer.json()["pod"].as_str().unwrap_or_default()),
            _ => answer.body.lines().next().unwrap_or_default().to_string(),
        };
        println!("  web -> store{path}: {} {what}", answer.status);
    }
    banner("the waypoint's access log (last 3 requests)");
    // The waypoint writes its records every 100 ms.
    std::thread::sleep(Duration::from_millis(300));
    let records = topo.waypoint_requests(waypoint);
    for r in records.iter().rev().take(3).rev() {
        println!(
            "  {} {} {} -> {} via {} [{}] policy {}",
            r["source_identity"].as_str().unwrap_or_default(),
            r["method"].as_str().unwrap_or_default(),
            r["path"].as_str().unwrap_or_default(),
            r["status"],
            r["upstream"].as_str().filter(|u| !u.is_empty()).unwrap_or("-"),
            r["route"].as_str().filter(|u| !u.is_empty()).unwrap_or("no route"),
            r["policy"].as_str().filter(|u| !u.is_empty()).unwrap_or("-"),
        );
    }
}
