//! End-to-end authorization: a table of AuthorizationPolicy and PeerAuthentication cases
//! enforced by the destination agent, each checked on what the client itself saw (served with
//! the expected body, or refused/reset) and on the destination's flow naming policy and rule;
//! and a live policy change closing a now-denied connection. Needs root.

use std::time::Duration;

use ferrymesh_testbed::mesh::{bin, policy_pods, wait_until, CONFIG_WAIT, ECHO_PORT, FLOW_WAIT, HTTP_PORT};
use ferrymesh_testbed::{Pod, Topology};
use serde_json::Value;

fn cluster() -> Topology {
    ferrymesh_testbed::mesh::policy_cluster(|_| {})
}

fn version(topo: &Topology) -> u64 {
    topo.status(2)["config_version"].as_u64().unwrap()
}

/// `namespace/name` of every policy (AuthorizationPolicy and PeerAuthentication) the agent of
/// `node` holds, sorted.
fn held_policies(topo: &Topology, node: u8) -> Vec<String> {
    let out = topo.meshctl(node, &["policies", "-o", "json"]);
    assert!(out.status.success(), "meshctl policies: {}", String::from_utf8_lossy(&out.stderr));
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).expect("policies JSON");
    let mut names: Vec<String> =
        all.iter().map(|p| format!("{}/{}", p["namespace"].as_str().unwrap(), p["name"].as_str().unwrap())).collect();
    names.sort();
    names
}

/// Replaces the policy files with `policies` (name, YAML) and waits until both agents hold
/// exactly those policies. Waiting for "a newer version" is not enough: mesh-ctrl may publish
/// the removal of the old files before it has read every new one.
fn set_policies(topo: &Topology, policies: &[(&str, String)]) {
    for entry in std::fs::read_dir(topo.config_dir()).unwrap() {
        let path = entry.unwrap().path();
        if path.file_name().unwrap().to_string_lossy().starts_with("policy-") {
            std::fs::remove_file(path).unwrap();
        }
    }
    let mut want = Vec::new();
    for (name, yaml) in policies {
        topo.write_config_file(&format!("policy-{name}.yaml"), yaml);
        let object: serde_yaml::Value = serde_yaml::from_str(yaml).expect("policy YAML");
        let meta = &object["metadata"];
        want.push(format!("{}/{}", meta["namespace"].as_str().unwrap(), meta["name"].as_str().unwrap()));
    }
    want.sort();
    for node in [1, 2] {
        wait_until(CONFIG_WAIT, &format!("node{node} to hold exactly {want:?} within 1 s"), || {
            held_policies(topo, node) == want
        });
    }
}

fn authz(ns: &str, name: &str, spec: &str) -> String {
    format!("apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: {ns}\nspec:\n{spec}")
}

/// What the client itself saw of a connection: served (the HTTP responder's body names the
/// client's own address, or the echo sent its line back), or refused/reset, with the client's
/// error. Anything else (a timeout, a wrong body) fails the test here: a deny must be prompt.
fn client_sees(topo: &Topology, from: &Pod, to: &Pod, port: u16) -> Result<(), String> {
    if port == HTTP_PORT {
        let url = format!("http://{}:{port}/", to.ip);
        let out = topo.output_in(&from.netns, "curl", &["-sS", "--max-time", "3", &url]);
        let (body, err) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr).to_string());
        match out.status.code() {
            Some(0) => {
                assert!(
                    body.starts_with(&format!("client {}:", from.ip)),
                    "{} -> {url}: served, but {body:?}",
                    from.name
                );
                Ok(())
            }
            // 7: connection refused, 52: closed without a reply, 56: reset; 55 with a reset: reset
            // before curl had sent its request (a busy machine slows curl, not the deny).
            Some(code @ (7 | 52 | 55 | 56)) if code != 55 || err.contains("reset by peer") => {
                assert!(body.is_empty(), "a refused client gets no body: {body:?}");
                Err(err)
            }
            other => panic!("{} -> {url}: curl neither served nor refused ({other:?}): {err}", from.name),
        }
    } else {
        let addr = format!("{}:{port}", to.ip);
        let out =
            topo.output_in(&from.netns, bin("fm-peer"), &["ping", "--to", &addr, "--count", "1", "--interval-ms", "0"]);
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        if out.status.success() {
            assert!(String::from_utf8_lossy(&out.stdout).contains("ok 1 round trips"));
            Ok(())
        } else {
            assert!(!err.contains("timed out") && !err.contains("temporarily unavailable"), "a deny is prompt: {err}");
            Err(err)
        }
    }
}

/// Connects `from` -> `to`:`port` and returns the destination agent's flow for it, with what
/// the client saw.
fn attempt_seen(topo: &Topology, from: &Pod, to: &Pod, port: u16) -> (Value, Result<(), String>) {
    let before = topo.flows(to.node).len();
    let seen = client_sees(topo, from, to, port);
    let mut flow = Value::Null;
    wait_until(FLOW_WAIT, &format!("the flow of {} -> {}:{port}", from.name, to.name), || {
        let flows = topo.flows(to.node);
        let found = flows
            .iter()
            .skip(before)
            .find(|f| f["direction"] == "inbound" && f["src"]["ip"] == from.ip.to_string() && f["dst"]["port"] == port);
        flow = found.cloned().unwrap_or(Value::Null);
        found.is_some()
    });
    // Refused or not, over mTLS or node-local, the flow names the client's port.
    assert_ne!(flow["src"]["port"], 0, "{} -> {}:{port}: {flow}", from.name, to.name);
    (flow, seen)
}

/// [`attempt_seen`], asserting that the client's own result agrees with the flow's verdict.
fn attempt(topo: &Topology, from: &Pod, to: &Pod, port: u16) -> Value {
    let (flow, seen) = attempt_seen(topo, from, to, port);
    assert_eq!(
        seen.is_ok(),
        flow["verdict"] == "allowed",
        "{} -> {}:{port}: the client saw {seen:?}, the destination recorded {flow}",
        from.name,
        to.name
    );
    flow
}

/// One connection of a case: source, destination port, expected verdict and flow policy.
type Attempt<'a> = (&'a Pod, u16, &'a str, String);
/// A case: what it shows, the policies (file name, YAML), and the connections to try.
type Case<'a> = (&'a str, Vec<(&'a str, String)>, Vec<Attempt<'a>>);

#[test]
fn policy_table_is_enforced_at_the_destination_and_named_in_flows() {
    let topo = cluster();
    let (a, b, c, d, x) = policy_pods(&topo);
    let selector_c = "  selector:\n    matchLabels:\n      app: c\n";
    let no_allow = |names: &str| format!("no ALLOW policy matched (considered: {names})");
    let strict = "apiVersion: ferrymesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: shop\nspec:\n  mtls:\n    mode: STRICT\n".to_string();

    #[rustfmt::skip]
    let cases: Vec<Case<'_>> = vec![
        ("ALLOW by principal",
         vec![("allow-a", authz("shop", "allow-a", &format!("{selector_c}  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/a]\n")))],
         vec![(a, HTTP_PORT, "allowed", "shop/allow-a rule 0".into()), (b, HTTP_PORT, "denied", no_allow("shop/allow-a"))]),
        ("ALLOW by namespace",
         vec![("allow-shop", authz("shop", "allow-shop", "  rules:\n  - from:\n    - source:\n        namespaces: [shop]\n"))],
         vec![(b, HTTP_PORT, "allowed", "shop/allow-shop rule 0".into()), (d, HTTP_PORT, "denied", no_allow("shop/allow-shop"))]),
        ("ALLOW by port",
         vec![("allow-http", authz("shop", "allow-http", "  rules:\n  - to:\n    - operation:\n        ports: [\"8080\"]\n"))],
         vec![(a, HTTP_PORT, "allowed", "shop/allow-http rule 0".into()), (a, ECHO_PORT, "denied", no_allow("shop/allow-http"))]),
        ("DENY takes precedence",
         vec![("allow-all", authz("shop", "allow-all", "  rules:\n  - {}\n")),
              ("deny-a", authz("shop", "deny-a", "  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [\"*/sa/a\"]\n"))],
         vec![(a, HTTP_PORT, "denied", "shop/deny-a rule 0".into()), (b, HTTP_PORT, "allowed", "shop/allow-all rule 0".into())]),
        ("notPrincipals and notPorts",
         vec![("deny-not", authz("shop", "deny-not", "  action: DENY\n  rules:\n  - from:\n    - source:\n        notPrincipals: [cluster.local/ns/shop/sa/a]\n  - to:\n    - operation:\n        notPorts: [\"8080\"]\n"))],
         vec![(b, HTTP_PORT, "denied", "shop/deny-not rule 0".into()), (a, HTTP_PORT, "allowed", String::new()), (a, ECHO_PORT, "denied", "shop/deny-not rule 1".into())]),
        ("ipBlocks and notIpBlocks",
         vec![("allow-ip", authz("shop", "allow-ip", &format!("  rules:\n  - from:\n    - source:\n        ipBlocks: [10.244.1.0/24]\n        notIpBlocks: [{}]\n", b.ip)))],
         vec![(a, HTTP_PORT, "allowed", "shop/allow-ip rule 0".into()), (b, HTTP_PORT, "denied", no_allow("shop/allow-ip")), (d, HTTP_PORT, "denied", no_allow("shop/allow-ip"))]),
        ("mesh-wide policy in ferrymesh-system",
         vec![("mesh", authz("ferrymesh-system", "outsiders", "  action: DENY\n  rules:\n  - from:\n    - source:\n        notNamespaces: [shop]\n"))],
         vec![(d, HTTP_PORT, "denied", "ferrymesh-system/outsiders rule 0".into()), (a, HTTP_PORT, "allowed", String::new())]),
        ("PERMISSIVE accepts plaintext",
         vec![],
         vec![(x, HTTP_PORT, "allowed", String::new()), (a, HTTP_PORT, "allowed", String::new())]),
        ("STRICT refuses plaintext",
         vec![("strict", strict)],
         vec![(x, HTTP_PORT, "denied", "shop/strict".into()), (a, HTTP_PORT, "allowed", String::new()), (d, HTTP_PORT, "allowed", String::new())]),
        ("an ALLOW rule with an L7-only field fails closed",
         vec![("allow-get", authz("shop", "allow-get", "  rules:\n  - to:\n    - operation:\n        methods: [GET]\n"))],
         vec![(a, HTTP_PORT, "denied", no_allow("shop/allow-get") + "; shop/allow-get rule 0 uses L7-only fields (rules[0].to[0].operation.methods) and matches no L4 traffic")]),
    ];
    let attempts_in_table: usize = cases.iter().map(|(_, _, attempts)| attempts.len()).sum();
    assert_eq!(attempts_in_table, 22, "the table's connections");
    let mut explained = 0;
    for (what, policies, attempts) in cases {
        set_policies(&topo, &policies);
        for (from, port, verdict, policy) in attempts {
            let (flow, seen) = attempt_seen(&topo, from, c, port);
            // What the client saw is the expected verdict, independently of the agent's record.
            assert_eq!(
                seen.is_ok(),
                verdict == "allowed",
                "{what}: {} -> c:{port}: the client saw {seen:?}, expected {verdict}",
                from.name
            );
            // meshctl explain, asked of the other node's agent (with the destination's, which
            // alone holds its labels), agrees with what was enforced.
            let explain = topo.meshctl_all(
                1,
                &["explain", &format!("{}/{}", from.namespace, from.name), &format!("shop/c:{port}"), "-o", "json"],
            );
            assert!(explain.status.success(), "{what}: {}", String::from_utf8_lossy(&explain.stderr));
            let explain: Value = serde_json::from_slice(&explain.stdout).unwrap();
            assert_eq!(explain["verdict"], flow["verdict"], "{what}: {} -> c:{port}: {explain}", from.name);
            assert_eq!(
                explain["verdict"] == "allowed",
                seen.is_ok(),
                "{what}: explain agrees with the client: {explain}"
            );
            assert_eq!(explain["policy"], flow["policy"], "{what}: {} -> c:{port}: {explain}", from.name);
            assert_eq!(explain["mtls"], flow["mtls"], "{what}: {} -> c:{port}: {explain}", from.name);
            if verdict == "denied" {
                assert_eq!(explain["reason"], flow["reason"], "{what}: {explain}");
                assert_eq!(explain["hint"], flow["hint"], "{what}: {explain}");
                assert!(!flow["hint"].as_str().unwrap().is_empty(), "{what}: a denial says how to allow it: {flow}");
            }
            explained += 1;
            assert_eq!(flow["verdict"], verdict, "{what}: {} -> c:{port}: {flow}", from.name);
            assert_eq!(flow["policy"], policy.as_str(), "{what}: {} -> c:{port}: {flow}", from.name);
            if verdict == "denied" {
                assert!(
                    flow["reason"].as_str().unwrap().contains(policy.as_str()),
                    "{what}: the reason names the policy: {flow}"
                );
            }
        }
    }
    assert_eq!(explained, attempts_in_table, "explain was checked against every connection of the table");
    // Selectors follow live labels: relabelling c takes it out of a DENY policy's selector.
    set_policies(
        &topo,
        &[("deny-c", authz("shop", "deny-c", &format!("{selector_c}  action: DENY\n  rules:\n  - {{}}\n")))],
    );
    assert_eq!(attempt(&topo, a, c, HTTP_PORT)["policy"], "shop/deny-c rule 0");
    let before = version(&topo);
    topo.write_pod(c, &[("app", "not-c")]);
    wait_until(CONFIG_WAIT, "the relabel to reach node2", || version(&topo) > before);
    assert_eq!(topo.enrolled(2), ["other/d", "shop/c"], "a relabel does not re-enroll");
    assert_eq!(attempt(&topo, a, c, HTTP_PORT)["verdict"], "allowed");
    // The source agent sees the refusal of the tunnel as a denied flow too.
    set_policies(&topo, &[("deny-all", authz("shop", "deny-all", "  action: DENY\n  rules:\n  - {}\n"))]);
    let before = topo.flows(1).len();
    attempt(&topo, a, c, HTTP_PORT);
    let to_c = |f: &Value| f["direction"] == "outbound" && f["dst"]["ip"] == c.ip.to_string();
    wait_until(FLOW_WAIT, "the source's flow of the refused tunnel", || topo.flows(1).iter().skip(before).any(to_c));
    let outbound = topo.flows(1).into_iter().skip(before).rev().find(|f| to_c(f)).expect("the outbound flow");
    assert_eq!(outbound["verdict"], "denied", "{outbound}");
    assert_eq!(outbound["reason"], "destination refused the tunnel: HTTP 401");
    // It names the transport it tried (and the identity it presented), not plaintext.
    assert_eq!(outbound["transport"], "mtls", "{outbound}");
    assert_eq!(outbound["src"]["identity"], "spiffe://cluster.local/ns/shop/sa/a", "{outbound}");
}

#[test]
fn a_policy_change_closes_connections_it_now_denies() {
    let topo = cluster();
    let (a, b, c, d, x) = policy_pods(&topo);
    let denied_ping = topo.start_ping("ping-a", a, c.ip, 100);
    // d is on c's node: its connection is handed over inside the agent, and cut all the same.
    let local_ping = topo.start_ping("ping-d", d, c.ip, 100);
    let kept_ping = topo.start_ping("ping-b", b, c.ip, 30);
    // Each has done a round trip (start_ping waits for it): every connection carried bytes.
    let plain_ping = topo.start_ping("ping-x", x, c.ip, 100);
    let deny_a = authz(
        "shop",
        "deny-a",
        "  action: DENY\n  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/a, cluster.local/ns/other/sa/d]\n",
    );
    let strict = "apiVersion: ferrymesh.io/v1alpha1\nkind: PeerAuthentication\nmetadata:\n  name: strict\n  namespace: shop\nspec:\n  mtls:\n    mode: STRICT\n";
    set_policies(&topo, &[("deny-a", deny_a), ("strict", strict.to_string())]);
    for (label, pod, reason, policy) in [
        (&denied_ping, a, "closed after a policy change: denied: shop/deny-a rule 0", "shop/deny-a rule 0"),
        (&local_ping, d, "closed after a policy change: denied: shop/deny-a rule 0", "shop/deny-a rule 0"),
        (
            &plain_ping,
            x,
            "closed after a policy change: plaintext refused: PeerAuthentication shop/strict requires mTLS (STRICT)",
            "shop/strict",
        ),
    ] {
        wait_until(Duration::from_secs(3), &format!("{label} to be cut"), || !topo.is_running(label));
        assert!(!topo.log(label).contains("ok "), "{label} must not complete: {}", topo.log(label));
        let inbound = |f: &Value| {
            f["direction"] == "inbound" && f["src"]["ip"] == pod.ip.to_string() && f["dst"]["port"] == ECHO_PORT
        };
        wait_until(FLOW_WAIT, "the flow of the closed connection", || topo.flows(2).iter().any(inbound));
        let flow = topo.flows(2).into_iter().find(inbound).unwrap();
        assert_eq!(flow["verdict"], "denied", "{flow}");
        assert_eq!(flow["reason"], reason, "{flow}");
        assert_eq!(flow["policy"], policy, "{flow}");
        assert!(flow["bytes_sent"].as_u64().unwrap() > 0, "it carried bytes before: {flow}");
    }
    topo.wait_success(&kept_ping, Duration::from_secs(10));
}
