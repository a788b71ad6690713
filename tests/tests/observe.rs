//! End-to-end observability against live agents: flows within 1 s with the right ends,
//! identities, bytes and verdicts; `meshctl flows` filters (each tested for selecting exactly
//! what it should), follow mode, several agents at once; the access log; Prometheus metrics
//! parsed by a real text parser with byte counters matching the bytes sent; readiness;
//! `meshctl status` with and without mesh-ctrl; bad input as one-line errors. Needs root.
//!
//! Every scrape is read by a strict parser of the text exposition format
//! (`ferrymesh_testbed::prom`), and every metric docs/OBSERVABILITY.md names (Istio's TCP metrics and labels among them) must be
//! in it with its type and labels: a missing metric fails, it never passes as zero.

use std::collections::HashMap;
use std::process::{Command, Output};
use std::time::Duration;

use ferrymesh_testbed::mesh::{bin, policy_pods, wait_until, FLOW_WAIT, HTTP_PORT, SINK_PORT};
use ferrymesh_testbed::prom::{self, Exposition};
use ferrymesh_testbed::{Pod, Topology};
use serde_json::{json, Value};

const VIP: &str = "10.96.0.40";
const SENT: u64 = 123_457;

/// The policy cluster with a service in front of c and a policy denying namespace `other`.
fn cluster() -> Topology {
    ferrymesh_testbed::mesh::policy_cluster(|topo| {
        topo.write_service("shop", "web", VIP, &[("app", "c")], &[("http", 80, "http")]);
        topo.write_config_file(
            "policy-deny-other.yaml",
            "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-other\n  namespace: shop\nspec:\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [other]\n",
        );
        topo.write_config_file(
            "service-web-l7.yaml",
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: web-l7\n  namespace: shop\n  labels:\n    ferrymesh.io/use-waypoint: shop-waypoint\nspec:\n  clusterIP: 10.96.0.41\n  selector:\n    app: c\n  ports:\n  - port: 80\n",
        );
        topo.write_config_file(
            "route-web.yaml",
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: web-split\n  namespace: shop\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: web\n    port: 80\n  rules:\n  - name: api\n    matches:\n    - path:\n        type: PathPrefix\n        value: /api\n    backendRefs:\n    - name: web\n      port: 80\n      weight: 90\n    - name: web-canary\n      port: 80\n      weight: 10\n",
        );
    })
}

/// meshctl with `args` against every agent of the topology (`--agents-dir`).
fn meshctl_all(topo: &Topology, args: &[&str]) -> Output {
    let dir = topo.agent_socket(1).parent().unwrap().to_path_buf();
    Command::new(bin("meshctl")).arg("--agents-dir").arg(dir).args(args).output().expect("run meshctl")
}

fn json_lines(out: &Output) -> Vec<Value> {
    assert!(out.status.success(), "meshctl failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("flow JSON")).collect()
}

fn identity(pod: &Pod) -> String {
    format!("spiffe://cluster.local/ns/{}/sa/{}", pod.namespace, pod.name)
}

fn curl(topo: &Topology, from: &Pod, url: &str) -> bool {
    topo.output_in(&from.netns, "curl", &["-sS", "--max-time", "3", url]).status.success()
}

/// The flow recorded by `node`'s agent in `direction` from `from` to `ip:port`.
fn find_flow(flows: &[Value], direction: &str, from: &Pod, ip: &str, port: u16) -> Option<Value> {
    flows
        .iter()
        .find(|f| {
            f["direction"] == direction
                && f["src"]["ip"] == from.ip.to_string()
                && f["dst"]["ip"] == ip
                && f["dst"]["port"] == port
        })
        .cloned()
}

fn scrape(topo: &Topology, netns: &str, addr: &str) -> Exposition {
    let out = topo.output_in(netns, "curl", &["-sS", "--max-time", "3", &format!("http://{addr}/metrics")]);
    assert!(out.status.success(), "scrape {addr}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    prom::parse(&text).unwrap_or_else(|e| panic!("the scrape of {addr} is not valid Prometheus text: {e}\n{text}"))
}

/// Sum of the samples of `metric` whose labels include every pair of `labels` (panics when
/// the scrape has no such metric).
fn sum(scrape: &Exposition, metric: &str, labels: &[(&str, &str)]) -> f64 {
    scrape.sum(metric, labels)
}

/// A metric docs/OBSERVABILITY.md names: whether mesh-ctrl (else the agent) serves it, its
/// type, and its labels, each with the values that must all appear (none listed: the label
/// must be on every sample).
#[derive(Debug)]
struct Documented {
    name: String,
    ctrl: bool,
    kind: String,
    labels: Vec<(String, Vec<String>)>,
}

/// The texts between backticks in a Markdown table cell.
fn ticked(cell: &str) -> Vec<String> {
    cell.split('`').skip(1).step_by(2).map(String::from).collect()
}

/// Every metric of the agent's and mesh-ctrl's tables of docs/OBSERVABILITY.md: the agent's
/// table has a labels column (`TCP` meaning the TCP label table above it), mesh-ctrl's has none.
/// The waypoint's tables are checked by the waypoint tests.
fn documented_metrics() -> Vec<Documented> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/OBSERVABILITY.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (mut tcp_labels, mut in_label_table, mut out) = (Vec::new(), false, Vec::new());
    // The waypoint's tables (from its paragraph to the next server's) are the waypoint test's.
    let mut waypoint = false;
    for line in doc.lines() {
        if !line.starts_with('|') {
            in_label_table = false;
            if line.starts_with("Waypoint (") {
                waypoint = true;
            } else if line.starts_with("Agent (") || line.starts_with("mesh-ctrl (") || line.starts_with('#') {
                waypoint = false;
            }
            continue;
        }
        if waypoint {
            continue;
        }
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        if cells[0] == "label" {
            in_label_table = true;
        } else if in_label_table {
            tcp_labels.extend(ticked(cells[0]));
        } else if cells[0].starts_with("`ferrymesh_") {
            let (kind, labels, ctrl, meaning) =
                if cells.len() == 4 { (cells[1], cells[2], false, cells[3]) } else { (cells[1], "", true, cells[2]) };
            let labels = if labels == "TCP" {
                tcp_labels.iter().map(|l| (l.clone(), Vec::new())).collect()
            } else {
                match ticked(labels).split_first() {
                    None => Vec::new(),
                    // `map`: the values are the map names the meaning lists in capitals.
                    Some((label, [])) => vec![(
                        label.clone(),
                        meaning
                            .split([' ', ','])
                            .filter(|w| w.len() > 1 && w.chars().all(|c| c.is_ascii_uppercase() || c == '_'))
                            .map(String::from)
                            .collect(),
                    )],
                    Some((label, values)) => vec![(label.clone(), values.to_vec())],
                }
            };
            for name in ticked(cells[0]) {
                out.push(Documented { name, ctrl, kind: kind.to_string(), labels: labels.clone() });
            }
        }
    }
    assert_eq!(tcp_labels.len(), 10, "the TCP label table: {tcp_labels:?}");
    out
}

/// The TCP metrics docs/OBSERVABILITY.md promises, with Istio's labels.
const TCP_METRICS: [&str; 5] = [
    "ferrymesh_tcp_connections_opened_total",
    "ferrymesh_tcp_connections_closed_total",
    "ferrymesh_tcp_sent_bytes_total",
    "ferrymesh_tcp_received_bytes_total",
    "ferrymesh_tcp_connections_failed_total",
];
const TCP_LABELS: [&str; 9] = [
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "destination_workload",
    "destination_service",
    "destination_principal",
    "connection_security_policy",
    "response_flags",
    "reporter",
];

/// Asserts that `scrape` (of mesh-ctrl when `ctrl`, else of an agent) has every documented
/// metric of that server, with its type and labels.
fn assert_documented_metrics(scrape: &Exposition, ctrl: bool, documented: &[Documented], what: &str) {
    let mine: Vec<&Documented> = documented.iter().filter(|d| d.ctrl == ctrl).collect();
    assert!(mine.len() >= 7, "{what}: docs/OBSERVABILITY.md lists its metrics: {mine:?}");
    if !ctrl {
        for name in TCP_METRICS {
            let doc = mine.iter().find(|d| d.name == name).unwrap_or_else(|| panic!("{name} is documented"));
            for label in TCP_LABELS {
                assert!(doc.labels.iter().any(|(l, _)| l == label), "{name}: Istio's label {label} is documented");
            }
        }
    }
    for doc in mine {
        let family = scrape.family(&doc.name).unwrap_or_else(|| panic!("{what}: metric {} is missing", doc.name));
        assert_eq!(family.kind.name(), doc.kind, "{what}: the TYPE of {}", doc.name);
        assert!(family.help.as_deref().is_some_and(|h| !h.is_empty()), "{what}: {} has a HELP text", doc.name);
        let samples: Vec<&prom::Sample> = family.samples.iter().filter(|s| s.name == doc.name).collect();
        assert!(!samples.is_empty(), "{what}: {} has samples", doc.name);
        for (label, values) in &doc.labels {
            for sample in &samples {
                assert!(sample.labels.contains_key(label), "{what}: {} lacks label {label}: {sample:?}", doc.name);
            }
            for value in values {
                assert!(
                    samples.iter().any(|s| s.labels.get(label) == Some(value)),
                    "{what}: {} has no series with {label}={value}",
                    doc.name
                );
            }
        }
    }
}

/// A filter's predicate, as the test states it.
type Keep<'a> = Box<dyn Fn(&Value) -> bool + 'a>;

#[test]
fn flows_filters_follow_access_log_and_metrics() {
    let topo = cluster();
    let (a, b, c, d, x) = policy_pods(&topo);
    // Follow every agent from now on, in JSON.
    let dir = topo.agent_socket(1).parent().unwrap().to_path_buf();
    let mut follow = Command::new(bin("meshctl"));
    follow.arg("--agents-dir").arg(&dir).args(["flows", "--follow", "-o", "json"]);
    topo.spawn("follow", follow);
    wait_until(Duration::from_secs(5), "meshctl to follow both agents", || {
        topo.log("follow").contains("following the flows of 2 agent(s)")
    });

    // a -> c across nodes over mTLS: the flow appears within 1 s with exact bytes.
    topo.send(a, c.ip, SENT);
    let mut outbound = None;
    wait_until(FLOW_WAIT, "a's outbound flow within 1 s", || {
        outbound = find_flow(&topo.flows(1), "outbound", a, &c.ip.to_string(), SINK_PORT);
        outbound.is_some()
    });
    let outbound = outbound.unwrap();
    assert_eq!(outbound["src"]["workload"], "a");
    assert_eq!(outbound["src"]["namespace"], "shop");
    assert_eq!(outbound["src"]["identity"], identity(a));
    assert_eq!(outbound["dst"]["workload"], "c");
    assert_eq!(outbound["dst"]["identity"], identity(c));
    assert_eq!(outbound["bytes_sent"], SENT);
    assert_eq!(outbound["verdict"], "allowed");
    assert_eq!(outbound["mtls"], true);
    let mut inbound = None;
    wait_until(FLOW_WAIT, "c's inbound flow within 1 s", || {
        inbound = find_flow(&topo.flows(2), "inbound", a, &c.ip.to_string(), SINK_PORT);
        inbound.is_some()
    });
    let inbound = inbound.unwrap();
    assert_eq!(inbound["bytes_sent"], SENT);
    assert_eq!(inbound["src"]["identity"], identity(a));
    assert!(!inbound["peer_cert_serial"].as_str().unwrap().is_empty());

    // More traffic: same node (b -> a), plaintext from an unmeshed pod (x -> c), a denied one
    // (d -> c), and one through the service VIP (a -> web).
    assert!(curl(&topo, b, &format!("http://{}:{HTTP_PORT}/", a.ip)));
    assert!(curl(&topo, x, &format!("http://{}:{HTTP_PORT}/", c.ip)));
    assert!(!curl(&topo, d, &format!("http://{}:{HTTP_PORT}/", c.ip)), "d is denied");
    assert!(curl(&topo, a, &format!("http://{VIP}:80/")));
    // A failed dial on node 1 too (x has nothing on port 1), so each agent has failures.
    assert!(!curl(&topo, a, &format!("http://{}:1/", x.ip)), "nothing listens on x:1");
    wait_until(FLOW_WAIT, "the flows of every connection", || {
        let all = json_lines(&meshctl_all(&topo, &["flows", "-o", "json"]));
        all.iter().any(|f| f["verdict"] == "denied" && f["direction"] == "inbound")
            && all.iter().any(|f| f["service"] == "shop/web" && f["direction"] == "outbound")
            && all.iter().any(|f| f["src"]["ip"] == x.ip.to_string())
    });

    // b -> a never left node 1: its agent handed it over inside itself, knowing both identities,
    // and recorded both sides.
    let local: Vec<Value> =
        topo.flows(1).into_iter().filter(|f| f["src"]["workload"] == "b" && f["dst"]["workload"] == "a").collect();
    assert_eq!(local.len(), 2, "an outbound and an inbound flow: {local:?}");
    for f in &local {
        assert_eq!(
            (&f["transport"], &f["mtls"], &f["verdict"]),
            (&json!("node-local"), &json!(false), &json!("allowed"))
        );
        assert_eq!((&f["src"]["identity"], &f["dst"]["identity"]), (&json!(identity(b)), &json!(identity(a))), "{f}");
        assert!(f["bytes_received"].as_u64() > Some(0) && f["bytes_sent"] == local[0]["bytes_sent"], "{f}");
    }

    // Every filter selects exactly the flows its predicate says, and is not a no-op.
    let all = json_lines(&meshctl_all(&topo, &["flows", "-o", "json"]));
    assert!(all.len() >= 8, "{all:?}");
    let ids = (identity(a), identity(c));
    #[rustfmt::skip]
    let filters: Vec<(Vec<&str>, Keep<'_>)> = vec![
        (vec!["--namespace", "other"], Box::new(|f| f["src"]["namespace"] == "other" || f["dst"]["namespace"] == "other")),
        (vec!["--from-pod", "shop/a"], Box::new(|f| f["src"]["namespace"] == "shop" && f["src"]["workload"] == "a")),
        (vec!["--to-pod", "c"], Box::new(|f| f["dst"]["workload"] == "c")),
        (vec!["--from-identity", &ids.0], Box::new(|f| f["src"]["identity"] == identity(a))),
        (vec!["--to-identity", &ids.1], Box::new(|f| f["dst"]["identity"] == identity(c))),
        (vec!["--to-identity", "spiffe://cluster.local/ns/shop/*"], Box::new(|f| f["dst"]["identity"].as_str().unwrap().starts_with("spiffe://cluster.local/ns/shop/"))),
        (vec!["--service", "shop/web"], Box::new(|f| f["service"] == "shop/web")),
        (vec!["--port", "9000"], Box::new(|f| f["dst"]["port"] == 9000)),
        (vec!["--verdict", "denied"], Box::new(|f| f["verdict"] == "denied")),
        (vec!["--verdict", "allowed"], Box::new(|f| f["verdict"] == "allowed")),
        (vec!["--mtls"], Box::new(|f| f["mtls"] == true && f["transport"] == "mtls")),
        (vec!["--plaintext"], Box::new(|f| f["transport"] == "plaintext")),
        (vec!["--node-local"], Box::new(|f| f["transport"] == "node-local")),
        (vec!["--since", "1h"], Box::new(|_| true)),
    ];
    for (args, keep) in &filters {
        let mut argv = vec!["flows", "-o", "json"];
        argv.extend(args.iter().copied());
        let got = json_lines(&meshctl_all(&topo, &argv));
        let mut want: Vec<&Value> = all.iter().filter(|f| keep(f)).collect();
        want.sort_by_key(|f| f["time"].as_str().unwrap().to_string());
        let mut got_sorted: Vec<&Value> = got.iter().collect();
        got_sorted.sort_by_key(|f| f["time"].as_str().unwrap().to_string());
        assert!(!want.is_empty(), "{args:?} selects something");
        if args[0] != "--since" {
            assert!(want.len() < all.len(), "{args:?} leaves something out");
        }
        assert_eq!(got_sorted.len(), want.len(), "{args:?}: {got:?}");
        for (g, w) in got_sorted.iter().zip(&want) {
            assert_eq!(g, w, "{args:?}");
        }
    }
    let last = json_lines(&meshctl_all(&topo, &["flows", "-o", "json", "--last", "2"]));
    let mut times: Vec<&str> = all.iter().map(|f| f["time"].as_str().unwrap()).collect();
    times.sort();
    assert_eq!(last.len(), 2);
    assert_eq!(last[1]["time"].as_str().unwrap(), *times.last().unwrap(), "--last keeps the newest");
    std::thread::sleep(Duration::from_millis(1100));
    let none = json_lines(&meshctl_all(&topo, &["flows", "-o", "json", "--since", "1s"]));
    assert!(none.is_empty(), "--since 1s leaves out older flows: {none:?}");

    // A denied connection names policy and rule, in JSON and in the table.
    // (The destination decides, so its inbound flow names the policy; the source's outbound
    // flow records the refusal it was told of.)
    let denied = json_lines(&meshctl_all(&topo, &["flows", "-o", "json", "--verdict", "denied", "--to-pod", "shop/c"]));
    let denied: Vec<&Value> = denied.iter().filter(|f| f["direction"] == "inbound").collect();
    assert_eq!(denied[0]["policy"], "shop/deny-other rule 0");
    assert_eq!(denied[0]["reason"], "denied: shop/deny-other rule 0");
    // ... says what would allow it, and is labelled as its metrics are.
    assert_eq!(
        denied[0]["hint"], "DENY shop/deny-other rule 0 matches: narrow or remove that rule to allow it",
        "{}",
        denied[0]
    );
    assert_eq!(denied[0]["response_flags"], "DENY");
    let table =
        meshctl_all(&topo, &["--agent", topo.agent_socket(2).to_str().unwrap(), "flows", "--verdict", "denied"]);
    let text = String::from_utf8_lossy(&table.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert!(lines[0].starts_with("TIME") && lines[0].contains("VERDICT"), "{text}");
    assert!(lines.iter().any(|l| l.contains("denied") && l.contains("shop/deny-other rule 0")), "{text}");
    assert!(lines.iter().all(|l| l.chars().count() <= 120), "{text}");
    let compact = meshctl_all(&topo, &["flows", "-o", "compact", "--from-pod", "shop/a", "--port", "9000"]);
    let compact = String::from_utf8_lossy(&compact.stdout);
    assert!(compact.contains("shop/a:") && compact.contains("-> shop/c:9000 ALLOWED mTLS"), "{compact}");

    // Follow mode streamed the flows made after it started.
    let followed: Vec<Value> = topo
        .log_lines("follow")
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(followed.contains(&outbound), "follow mode printed a's outbound flow");
    assert!(followed.iter().any(|f| f["verdict"] == "denied"), "and the denied one");

    // The access log holds the same JSON as meshctl, one line per closed connection, written
    // within `AccessLog::FLUSH_EVERY` (100 ms) of the connection's end.
    let access = || -> Vec<Value> {
        topo.log_lines("agent-node2")
            .iter()
            .filter(|l| l.starts_with("{\"time\""))
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    wait_until(FLOW_WAIT, "the access log to hold c's inbound and denied flows", || {
        let access = access();
        access.contains(&inbound) && access.contains(denied[0])
    });

    // Metrics: a real Prometheus text parser reads them; byte counters match the bytes sent.
    let node1 = &topo.nodes[0].netns;
    let node2 = &topo.nodes[1].netns;
    let m1 = scrape(&topo, node1, "127.0.0.1:15020");
    let labels = [
        ("reporter", "source"),
        ("source_workload", "a"),
        ("source_workload_namespace", "shop"),
        ("source_principal", ids.0.as_str()),
        ("destination_workload", "c"),
        ("destination_principal", ids.1.as_str()),
        ("destination_service", "unknown"),
        ("connection_security_policy", "mutual_tls"),
    ];
    let a_to_c: Vec<&Value> = all
        .iter()
        .filter(|f| f["direction"] == "outbound" && f["src"]["workload"] == "a" && f["dst"]["workload"] == "c")
        .collect();
    assert_eq!(sum(&m1, "ferrymesh_tcp_sent_bytes_total", &labels), SENT as f64, "{a_to_c:?}");
    assert_eq!(
        sum(&m1, "ferrymesh_tcp_received_bytes_total", &labels),
        outbound["bytes_received"].as_u64().unwrap() as f64
    );
    assert_eq!(sum(&m1, "ferrymesh_tcp_connections_opened_total", &labels), 1.0);
    assert_eq!(sum(&m1, "ferrymesh_tcp_connections_closed_total", &labels), 1.0);
    assert!(sum(&m1, "ferrymesh_ebpf_events_total", &[("event", "captured")]) >= 3.0);
    assert!(sum(&m1, "ferrymesh_certs_issued_total", &[]) >= 2.0, "a and b got certificates");
    let m2 = scrape(&topo, node2, "127.0.0.1:15020");
    let dst_labels = [("reporter", "destination"), ("source_workload", "a"), ("destination_workload", "c")];
    // The destination cannot tell a VIP connection from a direct one: both of a's connections
    // to c count here, the 123457 bytes and the request that went through the service.
    let inbound_a_to_c: u64 = topo
        .flows(2)
        .iter()
        .filter(|f| f["direction"] == "inbound" && f["src"]["workload"] == "a")
        .map(|f| f["bytes_sent"].as_u64().unwrap())
        .sum();
    assert!(inbound_a_to_c > SENT);
    assert_eq!(sum(&m2, "ferrymesh_tcp_sent_bytes_total", &dst_labels), inbound_a_to_c as f64);
    let denied_labels = [("reporter", "destination"), ("source_workload", "d"), ("response_flags", "DENY")];
    assert_eq!(sum(&m2, "ferrymesh_tcp_connections_failed_total", &denied_labels), 1.0);
    let ctrl = scrape(&topo, &topo.fabric, "172.18.0.254:15014");
    assert_eq!(sum(&ctrl, "ferrymesh_ctrl_connected_agents", &[]), 2.0);
    assert_eq!(sum(&ctrl, "ferrymesh_ctrl_rejected_config_objects", &[]), 0.0);
    assert!(sum(&ctrl, "ferrymesh_ctrl_push_latency_seconds_count", &[]) >= 2.0, "both agents acked");
    // Every metric the docs name, with its type and labels, from each agent and mesh-ctrl.
    let documented = documented_metrics();
    assert_documented_metrics(&m1, false, &documented, "node1's agent");
    assert_documented_metrics(&m2, false, &documented, "node2's agent");
    assert_documented_metrics(&ctrl, true, &documented, "mesh-ctrl");

    // Readiness.
    let ready = topo.output_in(node1, "curl", &["-sS", "-w", " %{http_code}", "http://127.0.0.1:15021/healthz/ready"]);
    assert_eq!(String::from_utf8_lossy(&ready.stdout), "ready\n 200");
}

fn one_line_error(out: &Output, contains: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "exits non-zero: {stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr:?}");
    assert!(stderr.starts_with("meshctl: ") && stderr.contains(contains), "{stderr:?}");
    assert!(!stderr.contains("panicked") && !stderr.contains("backtrace"), "{stderr:?}");
}

#[test]
fn status_views_and_bad_input() {
    let topo = cluster();
    let c = topo.pod("shop", "c");
    // The admin socket is root's only.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(topo.agent_socket(1)).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the admin socket is the agent user's only");
    // Status shows the attached programs and the map fill.
    let status = topo.meshctl(1, &["status"]);
    let text = String::from_utf8_lossy(&status.stdout).to_string();
    assert!(text.contains("mesh-ctrl: connected, config version"), "{text}");
    for program in ["connect4", "fm_orig_dst", "fm_steer_in"] {
        assert!(text.contains(program), "{program} listed: {text}");
    }
    assert!(text.contains("ENROLLED") && text.contains("2/4096"), "{text}");
    let json: Value = serde_json::from_slice(&topo.meshctl(1, &["status", "-o", "json"]).stdout).unwrap();
    assert!(json["programs"].as_array().unwrap().iter().all(|p| p["id"].as_u64() > Some(0)));

    // Workloads, services, policies and certificates.
    let workloads = String::from_utf8_lossy(&topo.meshctl(1, &["workloads"]).stdout).to_string();
    assert!(workloads.contains("shop/c") && workloads.contains("spiffe://cluster.local/ns/shop/sa/c"), "{workloads}");
    let services: Value = serde_json::from_slice(&topo.meshctl(1, &["services", "-o", "json"]).stdout).unwrap();
    assert_eq!(services[0]["vip"], VIP);
    assert_eq!(services[0]["endpoints"][0]["ip"], c.ip.to_string());
    let table = String::from_utf8_lossy(&topo.meshctl(1, &["services"]).stdout).to_string();
    let bound = table.lines().find(|l| l.starts_with("shop/web-l7")).unwrap_or_else(|| panic!("{table}"));
    assert!(
        bound.contains("shop/shop-waypoint (no such waypoint)"),
        "the binding shows, and that it has no waypoint: {table}"
    );
    assert_eq!(services[1]["waypoint"], "shop/shop-waypoint", "{services}");
    let policies = String::from_utf8_lossy(&topo.meshctl(1, &["policies"]).stdout).to_string();
    assert!(policies.contains("AuthorizationPolicy shop/deny-other") && policies.contains("DENY"), "{policies}");
    let certs: Value = serde_json::from_slice(&topo.meshctl(2, &["certs", "-o", "json"]).stdout).unwrap();
    let certs: HashMap<String, &Value> =
        certs.as_array().unwrap().iter().map(|c| (c["identity"].as_str().unwrap().to_string(), c)).collect();
    let cert = certs["spiffe://cluster.local/ns/shop/sa/c"];
    assert!(!cert["serial"].as_str().unwrap().is_empty() && cert["rotate_at"].as_str() < cert["not_after"].as_str());
    let table = String::from_utf8_lossy(&topo.meshctl(2, &["certs"]).stdout).to_string();
    assert!(table.contains("ROTATES IN") && table.contains("spiffe://cluster.local/ns/other/sa/d"), "{table}");

    // explain, for people.
    let explain =
        String::from_utf8_lossy(&topo.meshctl_all(1, &["explain", "other/d", "shop/c:8080"]).stdout).to_string();
    assert!(explain.contains("carried: node-local: both pods are in the mesh on node2"), "{explain}");
    assert!(explain.contains("  2. DENY shop/deny-other: rule 0 matches: denied"), "{explain}");
    assert!(explain.contains("verdict: DENIED (denied: shop/deny-other rule 0)"), "{explain}");
    assert!(
        explain.contains("to fix:  DENY shop/deny-other rule 0 matches: narrow or remove that rule to allow it"),
        "{explain}"
    );

    // Routes, as mesh-ctrl validated them and the agent holds them.
    let routes = String::from_utf8_lossy(&topo.meshctl(1, &["routes"]).stdout).to_string();
    assert!(routes.lines().next().is_some_and(|l| l.starts_with("ROUTE")), "{routes}");
    assert!(
        routes.contains("HTTPRoute shop/web-split")
            && routes.contains("shop/web:80")
            && routes.contains("[path=/api*] -> shop/web:80 w90, shop/web-canary:80 w10"),
        "{routes}"
    );
    let routes: Value = serde_json::from_slice(&topo.meshctl(2, &["routes", "-o", "json"]).stdout).unwrap();
    assert_eq!(routes[0]["rules"][0]["name"], "api", "{routes}");
    // Which rule a request takes, by the table a waypoint routes with.
    let take = |args: &[&str]| {
        let mut all = vec!["routes", "--to"];
        all.extend_from_slice(args);
        String::from_utf8_lossy(&topo.meshctl(1, &all).stdout).to_string()
    };
    let api = take(&["shop/web:80", "--path", "/api/orders?id=7"]);
    assert!(api.contains("rule:    HTTPRoute shop/web-split rule api"), "{api}");
    assert!(
        api.contains("backend: shop/web:80 weight 90 (90%)")
            && api.contains("backend: shop/web-canary:80 weight 10 (10%)"),
        "{api}"
    );
    assert!(
        take(&["shop/web:80", "--path", "/apiary"]).contains("no rule of the routes attached to shop/web:80 matches")
    );
    assert!(take(&["shop/web-l7:80"]).contains("no route is attached to shop/web-l7:80"));
    one_line_error(&topo.meshctl(1, &["routes", "--to", "web"]), "--to \"web\": expected NAMESPACE/SERVICE:PORT");

    // Bad input: one line, non-zero, no panic.
    one_line_error(
        &topo.meshctl_all(1, &["explain", "shop/nope", "shop/c:8080"]),
        "unknown pod shop/nope: pods in shop are a, b, c",
    );
    one_line_error(&topo.meshctl_all(1, &["explain", "shop/a", "shop/c"]), "expected NAMESPACE/POD:PORT");
    one_line_error(
        &Command::new(bin("meshctl")).args(["--agent", "/nonexistent/agent.sock", "status"]).output().unwrap(),
        "cannot reach the agent at /nonexistent/agent.sock",
    );
    one_line_error(&topo.meshctl(1, &["flows", "--verdict", "maybe"]), "invalid value 'maybe' for '--verdict");
    one_line_error(
        &topo.meshctl(1, &["flows", "--from-pod", "a/b/c"]),
        "--from-pod \"a/b/c\": expected NAMESPACE/POD or POD",
    );
    one_line_error(&topo.meshctl(1, &["flows", "--since", "soon"]), "--since");
    one_line_error(&topo.meshctl(1, &["flows", "--to-identity", "shop/c"]), "expected a SPIFFE ID");

    // explain decides the transport as the agent does: mTLS between nodes. Asked of node1's
    // agent alone it cannot decide for c, whose labels only node2's agent holds: it says so.
    let out = topo.meshctl_all(1, &["explain", "shop/a", "shop/c:8080", "-o", "json"]);
    let explained = serde_json::from_slice::<Value>(&out.stdout).expect("explain JSON");
    assert_eq!(explained["transport"], "mtls", "{explained}");
    one_line_error(
        &topo.meshctl(1, &["explain", "shop/a", "shop/c:8080"]),
        "shop/c runs on node2, whose agent decides its policies and alone holds its labels: ask it too (--agent with its socket, or --agents-dir)",
    );

    // mesh-ctrl stopped: status says so clearly; readiness stays (the last good config serves).
    topo.signal_and_wait("mesh-ctrl", libc::SIGTERM);
    wait_until(Duration::from_secs(10), "the agent to notice mesh-ctrl is gone", || {
        let text = String::from_utf8_lossy(&topo.meshctl(1, &["status"]).stdout).to_string();
        text.contains("mesh-ctrl: NOT CONNECTED: mesh-ctrl is unreachable; serving the last good config")
    });
}
