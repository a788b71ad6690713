use std::collections::BTreeMap;
use std::net::IpAddr;

use proptest::prelude::*;

use super::spec::{AuthorizationPolicySpec, PeerAuthenticationSpec};
use super::*;
use ferrymesh_spiffe::SpiffeId;

fn authz(ns: &str, name: &str, yaml: &str) -> AuthorizationPolicy {
    let spec: AuthorizationPolicySpec = serde_yaml::from_str(yaml).unwrap();
    spec.validate(ns, name).unwrap()
}

fn peer(ns: &str, name: &str, yaml: &str) -> PeerAuthentication {
    let spec: PeerAuthenticationSpec = serde_yaml::from_str(yaml).unwrap();
    spec.validate(ns, name).unwrap()
}

fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// A request from `principal` (None: plaintext); the identity lives as long as the test.
fn request(ip: &str, principal: Option<&str>, port: u16) -> Request<'static> {
    let id = principal.map(|p| &*Box::leak(Box::new(format!("spiffe://{p}").parse::<SpiffeId>().unwrap())));
    Request {
        source_ip: ip.parse().unwrap(),
        source: id,
        destination_ip: "10.244.2.2".parse().unwrap(),
        destination_port: port,
    }
}

const A: &str = "cluster.local/ns/shop/sa/a";
const B: &str = "cluster.local/ns/shop/sa/b";
const D: &str = "cluster.local/ns/other/sa/d";

#[test]
fn decision_table() {
    let app_c = labels(&[("app", "c")]);
    let shop_c = Workload { namespace: "shop", labels: &app_c };
    let allow_a = authz(
        "shop",
        "allow-a",
        "selector: {matchLabels: {app: c}}\nrules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/a]}}]}]",
    );
    let allow_ns = authz("shop", "allow-shop", "rules: [{from: [{source: {namespaces: [shop]}}]}]");
    let allow_port = authz("shop", "allow-8080", "rules: [{to: [{operation: {ports: [\"8080\"]}}]}]");
    let allow_all = authz("shop", "allow-all", "rules: [{}]");
    let allow_nothing = authz("shop", "allow-nothing", "{}");
    let deny_a = authz("shop", "deny-a", "action: DENY\nrules: [{from: [{source: {principals: [\"*/sa/a\"]}}]}]");
    let deny_not_a = authz(
        "shop",
        "deny-not-a",
        "action: DENY\nrules: [{from: [{source: {notPrincipals: [cluster.local/ns/shop/sa/a]}}]}]",
    );
    let deny_not_port =
        authz("shop", "deny-not-8080", "action: DENY\nrules: [{to: [{operation: {notPorts: [\"8080\"]}}]}]");
    let allow_ip = authz("shop", "allow-ip", "rules: [{from: [{source: {ipBlocks: [10.244.1.0/24]}}]}]");
    let deny_not_ip =
        authz("shop", "deny-not-ip", "action: DENY\nrules: [{from: [{source: {notIpBlocks: [10.244.1.2]}}]}]");
    let mesh_deny_9000 =
        authz(ROOT_NAMESPACE, "no-9000", "action: DENY\nrules: [{to: [{operation: {ports: [\"9000\"]}}]}]");
    let allow_get = authz("shop", "allow-get", "rules: [{to: [{operation: {methods: [GET]}}]}]");
    let deny_get =
        authz("shop", "deny-get", "action: DENY\nrules: [{to: [{operation: {methods: [GET], ports: [\"9000\"]}}]}]");
    let when_port = authz("shop", "when-port", "rules: [{when: [{key: destination.port, values: [\"8080\"]}, {key: source.principal, notValues: [\"*/sa/b\"]}]}]");
    let other_selector = authz(
        "shop",
        "other-app",
        "selector: {matchLabels: {app: zzz}}\nrules: [{from: [{source: {principals: [nobody]}}]}]",
    );

    #[rustfmt::skip]
    let cases: Vec<(&str, Vec<&AuthorizationPolicy>, Request<'_>, bool, &str)> = vec![
        ("no policy allows", vec![], request("10.244.1.2", Some(A), 8080), true, ""),
        ("ALLOW by principal", vec![&allow_a], request("10.244.1.2", Some(A), 8080), true, "shop/allow-a rule 0"),
        ("ALLOW by principal, other principal", vec![&allow_a], request("10.244.1.3", Some(B), 8080), false, "no ALLOW policy matched (considered: shop/allow-a)"),
        ("ALLOW by principal, plaintext", vec![&allow_a], request("10.244.1.2", None, 8080), false, "no ALLOW policy matched (considered: shop/allow-a)"),
        ("ALLOW by namespace", vec![&allow_ns], request("10.244.1.3", Some(B), 8080), true, "shop/allow-shop rule 0"),
        ("ALLOW by namespace, other namespace", vec![&allow_ns], request("10.244.2.3", Some(D), 8080), false, "no ALLOW policy matched (considered: shop/allow-shop)"),
        ("ALLOW by port", vec![&allow_port], request("10.244.1.2", Some(A), 8080), true, "shop/allow-8080 rule 0"),
        ("ALLOW by port, other port", vec![&allow_port], request("10.244.1.2", Some(A), 9000), false, "no ALLOW policy matched (considered: shop/allow-8080)"),
        ("ALLOW without rules denies", vec![&allow_nothing], request("10.244.1.2", Some(A), 8080), false, "no ALLOW policy matched (considered: shop/allow-nothing)"),
        ("DENY wins over ALLOW", vec![&allow_all, &deny_a], request("10.244.1.2", Some(A), 8080), false, "shop/deny-a rule 0"),
        ("DENY not matching", vec![&allow_all, &deny_a], request("10.244.1.3", Some(B), 8080), true, "shop/allow-all rule 0"),
        ("notPrincipals", vec![&deny_not_a], request("10.244.1.3", Some(B), 8080), false, "shop/deny-not-a rule 0"),
        ("notPrincipals, excluded principal", vec![&deny_not_a], request("10.244.1.2", Some(A), 8080), true, ""),
        ("notPorts", vec![&deny_not_port], request("10.244.1.2", Some(A), 9000), false, "shop/deny-not-8080 rule 0"),
        ("notPorts, excluded port", vec![&deny_not_port], request("10.244.1.2", Some(A), 8080), true, ""),
        ("ipBlocks", vec![&allow_ip], request("10.244.1.7", None, 8080), true, "shop/allow-ip rule 0"),
        ("ipBlocks, outside", vec![&allow_ip], request("10.244.2.7", None, 8080), false, "no ALLOW policy matched (considered: shop/allow-ip)"),
        ("notIpBlocks", vec![&deny_not_ip], request("10.244.1.3", None, 8080), false, "shop/deny-not-ip rule 0"),
        ("notIpBlocks, excluded", vec![&deny_not_ip], request("10.244.1.2", None, 8080), true, ""),
        ("mesh-wide DENY", vec![&allow_all, &mesh_deny_9000], request("10.244.1.2", Some(A), 9000), false, "ferrymesh-system/no-9000 rule 0"),
        ("ALLOW with L7 field fails closed", vec![&allow_get], request("10.244.1.2", Some(A), 8080), false, "no ALLOW policy matched (considered: shop/allow-get); shop/allow-get rule 0 uses L7-only fields (rules[0].to[0].operation.methods) and matches no L4 traffic"),
        ("DENY with L7 field is broader", vec![&deny_get], request("10.244.1.2", Some(A), 9000), false, "shop/deny-get rule 0"),
        ("DENY with L7 field keeps its L4 part", vec![&deny_get], request("10.244.1.2", Some(A), 8080), true, ""),
        ("when conditions all hold", vec![&when_port], request("10.244.1.2", Some(A), 8080), true, "shop/when-port rule 0"),
        ("when notValues", vec![&when_port], request("10.244.1.3", Some(B), 8080), false, "no ALLOW policy matched (considered: shop/when-port)"),
        ("selector not matching", vec![&other_selector], request("10.244.1.2", Some(A), 8080), true, ""),
    ];
    for (what, policies, req, allowed, policy) in cases {
        let set = PolicySet::new(policies.into_iter().cloned().collect(), vec![]);
        let d = set.authorize(&shop_c, &req);
        assert_eq!((d.allowed, d.policy.as_str()), (allowed, policy), "{what}");
        // explain gives the same verdict, and its last step is the deciding one.
        let (verdict, steps) = set.explain(&shop_c, &req, Transport::Mtls);
        assert_eq!((verdict.allowed, verdict.policy.as_str()), (allowed, policy), "{what}: explain");
        assert_eq!(verdict, set.decide(&shop_c, &req, Transport::Mtls), "{what}: decide");
        let last = steps.last().unwrap();
        let decided_by_a_rule = policy.contains(" rule ") && !policy.starts_with("no ALLOW");
        if decided_by_a_rule {
            let (key, rule) = policy.split_once(" rule ").unwrap();
            assert!(last.what.ends_with(key), "{what}: {steps:?}");
            assert!(last.outcome.starts_with(&format!("rule {rule} matches")), "{what}: {steps:?}");
        }
        assert!(last.outcome.ends_with(if allowed { "allowed" } else { "denied" }), "{what}: {steps:?}");
    }
}

#[test]
fn explain_lists_every_policy_in_evaluation_order() {
    let web = labels(&[("app", "web")]);
    let w = Workload { namespace: "shop", labels: &web };
    let sets = PolicySet::new(
        vec![
            authz("shop", "allow-b", "rules: [{from: [{source: {principals: [\"cluster.local/ns/shop/sa/b\"]}}]}]"),
            authz("shop", "allow-a", "rules: [{from: [{source: {principals: [\"cluster.local/ns/shop/sa/a\"]}}]}]"),
            authz("shop", "deny-9000", "action: DENY\nrules: [{to: [{operation: {ports: [\"9000\"]}}]}]"),
            authz(ROOT_NAMESPACE, "deny-legacy", "action: DENY\nrules: [{from: [{source: {namespaces: [legacy]}}]}]"),
        ],
        vec![peer("shop", "strict", "mtls: {mode: STRICT}")],
    );
    let (verdict, steps) =
        sets.explain(&w, &request("10.244.1.2", Some("cluster.local/ns/shop/sa/b"), 8080), Transport::Mtls);
    let lines: Vec<String> = steps.iter().map(|s| format!("{}: {}", s.what, s.outcome)).collect();
    assert_eq!(
        lines,
        [
            "PeerAuthentication shop/strict: mode STRICT; the connection is mTLS: accepted",
            "DENY ferrymesh-system/deny-legacy: no rule matches",
            "DENY shop/deny-9000: no rule matches",
            "ALLOW shop/allow-a: no rule matches",
            "ALLOW shop/allow-b: rule 0 matches: allowed",
        ]
    );
    assert!(verdict.allowed);
    // Plaintext stops at STRICT, with the reason the agent records.
    let (verdict, steps) = sets.explain(&w, &request("10.244.1.2", None, 8080), Transport::Plaintext);
    assert_eq!(steps.len(), 1);
    assert_eq!(verdict.reason, "plaintext refused: PeerAuthentication shop/strict requires mTLS (STRICT)");
    assert_eq!(verdict.policy, "shop/strict");
    // A node-local handover carries a proven identity: STRICT accepts it, and the same
    // authorization applies as over mTLS.
    let node_local = request("10.244.1.2", Some("cluster.local/ns/shop/sa/b"), 8080);
    let (verdict, steps) = sets.explain(&w, &node_local, Transport::NodeLocal);
    assert_eq!(steps[0].outcome, "mode STRICT; the connection is node-local (identity known to the agent): accepted");
    assert_eq!(verdict, sets.decide(&w, &node_local, Transport::Mtls));
}

#[test]
fn policies_apply_by_namespace_and_root_namespace() {
    let none = BTreeMap::new();
    let other = Workload { namespace: "other", labels: &none };
    let shop_only = authz("shop", "deny-all", "action: DENY\nrules: [{}]");
    let mesh = authz(ROOT_NAMESPACE, "deny-all", "action: DENY\nrules: [{}]");
    let set = PolicySet::new(vec![shop_only.clone()], vec![]);
    assert!(set.authorize(&other, &request("10.0.0.1", None, 80)).allowed, "a shop policy does not reach other");
    let set = PolicySet::new(vec![shop_only, mesh], vec![]);
    assert_eq!(set.authorize(&other, &request("10.0.0.1", None, 80)).policy, "ferrymesh-system/deny-all rule 0");
}

#[test]
fn mtls_mode_precedence() {
    let web = labels(&[("app", "web")]);
    let w = Workload { namespace: "shop", labels: &web };
    let mesh_strict = peer(ROOT_NAMESPACE, "mesh", "mtls: {mode: STRICT}");
    let ns_permissive = peer("shop", "ns", "mtls: {mode: PERMISSIVE}");
    let web_strict = peer("shop", "web", "selector: {matchLabels: {app: web}}\nmtls: {mode: STRICT}");
    let ns_unset = peer("shop", "unset", "{}");
    let cases: Vec<(Vec<&PeerAuthentication>, MtlsMode, Option<&str>)> = vec![
        (vec![], MtlsMode::Permissive, None),
        (vec![&mesh_strict], MtlsMode::Strict, Some("ferrymesh-system/mesh")),
        (vec![&mesh_strict, &ns_permissive], MtlsMode::Permissive, Some("shop/ns")),
        (vec![&mesh_strict, &ns_permissive, &web_strict], MtlsMode::Strict, Some("shop/web")),
        (vec![&mesh_strict, &ns_unset], MtlsMode::Strict, Some("ferrymesh-system/mesh")),
    ];
    for (policies, mode, by) in cases {
        let set = PolicySet::new(vec![], policies.into_iter().cloned().collect());
        let (got, name) = set.mtls_mode(&w);
        assert_eq!((got, name.as_deref()), (mode, by));
    }
}

#[test]
fn invalid_specs_name_the_field() {
    let cases = [
        ("action: AUDIT", "spec.action", "AUDIT is not supported (ALLOW or DENY)"),
        (
            "rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 10.0.0.300]}}]}]",
            "spec.rules[0].from[0].source.ipBlocks[1]",
            "\"10.0.0.300\" is not an IP address or CIDR block",
        ),
        (
            "rules: [{}, {to: [{operation: {ports: [http]}}]}]",
            "spec.rules[1].to[0].operation.ports[0]",
            "\"http\" is not a port number (1-65535)",
        ),
        (
            "rules: [{when: [{key: source.bogus, values: [x]}]}]",
            "spec.rules[0].when[0].key",
            "source.bogus is not supported",
        ),
        (
            "rules: [{when: [{key: source.ip}]}]",
            "spec.rules[0].when[0].values",
            "a condition needs values or notValues",
        ),
        (
            "rules: [{when: [{key: destination.port, values: [eighty]}]}]",
            "spec.rules[0].when[0].values",
            "\"eighty\" is not valid for destination.port",
        ),
    ];
    for (yaml, field, message) in cases {
        let spec: AuthorizationPolicySpec = serde_yaml::from_str(yaml).unwrap();
        let e = spec.validate("ns", "p").unwrap_err();
        assert_eq!(e.field, field, "{yaml}");
        assert!(e.message.starts_with(message), "{yaml}: {}", e.message);
    }
    let spec: PeerAuthenticationSpec = serde_yaml::from_str("mtls: {mode: STRICTER}").unwrap();
    assert_eq!(spec.validate("ns", "p").unwrap_err().field, "spec.mtls.mode");
    let spec: PeerAuthenticationSpec = serde_yaml::from_str("portLevelMtls: {\"80\": {mode: DISABLE}}").unwrap();
    assert_eq!(spec.validate("ns", "p").unwrap_err().field, "spec.portLevelMtls");
}

#[test]
fn wire_round_trip() {
    let p = authz(
        "shop",
        "p",
        "selector: {matchLabels: {app: c}}\naction: DENY\nrules: [{from: [{source: {principals: [a], notIpBlocks: [10.0.0.0/8]}}], to: [{operation: {ports: [\"80\"], methods: [GET]}}], when: [{key: source.ip, values: [10.1.0.0/16]}]}]",
    );
    let back = AuthorizationPolicy::try_from(ferrymesh_api::config::AuthorizationPolicy::from(&p)).unwrap();
    assert_eq!(back, p);
    let pa = peer("shop", "strict", "mtls: {mode: STRICT}");
    assert_eq!(PeerAuthentication::try_from(ferrymesh_api::config::PeerAuthentication::from(&pa)).unwrap(), pa);
}

#[test]
fn ip_blocks() {
    let b = IpBlock::parse("10.244.1.0/24").unwrap();
    assert!(b.contains("10.244.1.255".parse::<IpAddr>().unwrap()));
    assert!(!b.contains("10.244.2.1".parse::<IpAddr>().unwrap()));
    assert!(IpBlock::parse("0.0.0.0/0").unwrap().contains("1.2.3.4".parse::<IpAddr>().unwrap()));
    assert!(IpBlock::parse("10.0.0.0/33").is_none());
    assert!(IpBlock::parse("fd00::/8").unwrap().contains("fd12::1".parse::<IpAddr>().unwrap()));
}

/// Arbitrary YAML values for the fuzzing of spec parsing.
fn yaml_value() -> impl Strategy<Value = serde_yaml::Value> {
    let leaf = prop_oneof![
        Just(serde_yaml::Value::Null),
        any::<bool>().prop_map(serde_yaml::Value::Bool),
        any::<i64>().prop_map(|n| serde_yaml::Value::Number(n.into())),
        prop_oneof![
            Just("ALLOW".to_string()),
            Just("DENY".to_string()),
            Just("10.0.0.0/8".to_string()),
            Just("8080".to_string()),
            Just("source.ip".to_string()),
            "[a-z./*0-9]{0,12}",
        ]
        .prop_map(serde_yaml::Value::String),
    ];
    let keys = prop_oneof![
        Just("action"),
        Just("rules"),
        Just("from"),
        Just("to"),
        Just("when"),
        Just("source"),
        Just("operation"),
        Just("principals"),
        Just("notPrincipals"),
        Just("namespaces"),
        Just("ipBlocks"),
        Just("notIpBlocks"),
        Just("ports"),
        Just("notPorts"),
        Just("methods"),
        Just("key"),
        Just("values"),
        Just("notValues"),
        Just("selector"),
        Just("matchLabels"),
        Just("mtls"),
        Just("mode"),
        Just("portLevelMtls"),
    ];
    leaf.prop_recursive(5, 64, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(serde_yaml::Value::Sequence),
            prop::collection::vec((keys.clone(), inner), 0..5).prop_map(|kv| {
                serde_yaml::Value::Mapping(
                    kv.into_iter().map(|(k, v)| (serde_yaml::Value::String(k.into()), v)).collect(),
                )
            }),
        ]
    })
}

proptest! {
    /// Policy parsing never panics; whatever validates survives the wire and decides.
    #[test]
    fn spec_parsing_never_panics(value in yaml_value()) {
        if let Ok(spec) = serde_yaml::from_value::<AuthorizationPolicySpec>(value.clone()) {
            if let Ok(p) = spec.validate("ns", "p") {
                let back = AuthorizationPolicy::try_from(ferrymesh_api::config::AuthorizationPolicy::from(&p)).unwrap();
                prop_assert_eq!(&back, &p);
                let none = BTreeMap::new();
                let set = PolicySet::new(vec![p], vec![]);
                let _ = set.authorize(&Workload { namespace: "ns", labels: &none }, &request("10.0.0.1", Some(A), 80));
            }
        }
        if let Ok(spec) = serde_yaml::from_value::<PeerAuthenticationSpec>(value) {
            let _ = spec.validate("ns", "p");
        }
    }
}

/// A policy in `ns` named `name` selecting `selector` (None: no selector).
fn selecting(ns: &str, name: &str, selector: Option<Vec<(&str, &str)>>) -> AuthorizationPolicy {
    AuthorizationPolicy {
        namespace: ns.into(),
        name: name.into(),
        selector: selector.map(|pairs| pairs.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()),
        action: Action::Allow,
        rules: vec![Rule::default()],
        target_refs: vec![],
    }
}

proptest! {
    /// The selector index finds exactly the policies a test of every selector finds, in the
    /// same (evaluation) order.
    #[test]
    fn applicable_equals_a_scan_of_every_policy(
        policies in prop::collection::vec(
            (
                prop_oneof![Just("shop"), Just("other"), Just(ROOT_NAMESPACE)],
                prop::option::of(prop::collection::vec(
                    (prop_oneof![Just("app"), Just("tier"), Just("v")], prop_oneof![Just("a"), Just("b")]),
                    0..3,
                )),
            ),
            0..40,
        ),
        workload_labels in prop::collection::vec(
            (prop_oneof![Just("app"), Just("tier"), Just("v"), Just("x")], prop_oneof![Just("a"), Just("b")]),
            0..4,
        ),
        namespace in prop_oneof![Just("shop"), Just("other"), Just(ROOT_NAMESPACE)],
    ) {
        let all: Vec<AuthorizationPolicy> = policies
            .into_iter()
            .enumerate()
            .map(|(i, (ns, selector))| selecting(ns, &format!("p{i:02}"), selector))
            .collect();
        let labels: BTreeMap<String, String> =
            workload_labels.into_iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        let w = Workload { namespace, labels: &labels };
        let set = PolicySet::new(all.clone(), vec![]);
        let got: Vec<String> = set.applicable(&w).iter().map(|p| p.key()).collect();
        let mut scope: Vec<&str> = vec![ROOT_NAMESPACE];
        if namespace != ROOT_NAMESPACE {
            scope.push(namespace);
        }
        let mut want = Vec::new();
        for ns in scope {
            let mut in_ns: Vec<String> =
                all.iter().filter(|p| p.namespace == ns && p.applies_to(&w)).map(|p| p.key()).collect();
            in_ns.sort();
            want.extend(in_ns);
        }
        prop_assert_eq!(got, want);
    }
}

/// Every combination of where the two pods are: only two captured pods, with certificates on
/// the source's agent, go over mTLS or node-local.
#[test]
fn transport_for_every_placement() {
    for bits in 0u8..16 {
        let placement = Placement {
            src_captured: bits & 1 != 0,
            dst_captured: bits & 2 != 0,
            same_node: bits & 4 != 0,
            certificates: bits & 8 != 0,
        };
        let meshed = placement.src_captured && placement.dst_captured && placement.certificates;
        let want = match (meshed, placement.same_node) {
            (false, _) => Transport::Plaintext,
            (true, true) => Transport::NodeLocal,
            (true, false) => Transport::Mtls,
        };
        assert_eq!(Transport::for_placement(placement), want, "{placement:?}");
    }
}

/// A request at the waypoint: `method` `path` with `headers` (name, value), host `web.shop`.
fn http_request<'a>(
    principal: Option<&str>,
    method: &'a str,
    path: &'a str,
    host: &'a str,
    headers: &'a http::HeaderMap,
) -> l7::HttpRequest<'a> {
    l7::HttpRequest { l4: request("10.244.1.2", principal, 80), host, method, path, headers, auth: None }
}

#[test]
fn a_repeated_header_is_seen_whole_by_conditions() {
    let web = l7::Target { namespace: "shop", service: Some("web"), gateway: ("shop", "waypoint") };
    let on_web = |name: &str, yaml: &str| {
        authz("shop", name, &format!("targetRefs: [{{group: \"\", kind: Service, name: web}}]\n{yaml}"))
    };
    let set = PolicySet::new(
        vec![
            on_web(
                "deny-debug",
                "action: DENY\nrules: [{when: [{key: \"request.headers[x-debug]\", values: [\"true\"]}]}]",
            ),
            on_web(
                "deny-pair",
                "action: DENY\nrules: [{when: [{key: \"request.headers[x-pair]\", values: [\"a,b\"]}]}]",
            ),
            on_web(
                "deny-internal",
                "action: DENY\nrules: [{when: [{key: \"request.headers[x-internal]\", values: [\"*\"]}]}]",
            ),
            on_web("allow-not-evil", "rules: [{when: [{key: \"request.headers[x-tenant]\", notValues: [evil]}]}]"),
        ],
        vec![],
    );
    let headers = |pairs: &[(&str, &[u8])]| {
        let mut map = http::HeaderMap::new();
        for (name, value) in pairs {
            map.append(
                http::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                http::HeaderValue::from_bytes(value).unwrap(),
            );
        }
        map
    };
    // (the request's headers, allowed)
    type Case<'a> = (&'a [(&'a str, &'a [u8])], bool);
    let cases: [Case; 9] = [
        (&[("x-tenant", b"shop")], true),
        (&[("x-tenant", b"shop"), ("x-debug", b"no")], true),
        (&[("x-tenant", b"shop"), ("x-debug", b"true")], false),
        (&[("x-tenant", b"shop"), ("x-debug", b"no"), ("x-debug", b"true")], false),
        (&[("x-tenant", b"shop"), ("x-debug", b"true"), ("x-debug", b"no")], false),
        // Envoy's joined form: `a` and `b` are `a,b`.
        (&[("x-tenant", b"shop"), ("x-pair", b"a"), ("x-pair", b"b")], false),
        // A value past ASCII is still a value.
        (&[("x-tenant", b"shop"), ("x-internal", b"caf\xe9")], false),
        (&[("x-tenant", b"shop"), ("x-tenant", b"evil")], false),
        (&[("x-tenant", b"evil"), ("x-tenant", b"shop")], false),
    ];
    for (pairs, allowed) in cases {
        let map = headers(pairs);
        let d = set.authorize_request(&web, &http_request(Some(A), "GET", "/", "web.shop", &map));
        assert_eq!(d.allowed, allowed, "{map:?}: {d:?}");
    }
}

#[test]
fn l7_decision_table() {
    let web = l7::Target { namespace: "shop", service: Some("web"), gateway: ("shop", "waypoint") };
    let on_web = |name: &str, yaml: &str| {
        authz("shop", name, &format!("targetRefs: [{{group: \"\", kind: Service, name: web}}]\n{yaml}"))
    };
    let deny_admin = on_web("deny-admin", "action: DENY\nrules: [{to: [{operation: {paths: [\"/admin/*\"]}}]}]");
    let deny_delete = on_web("deny-delete", "action: DENY\nrules: [{to: [{operation: {methods: [DELETE]}}]}]");
    let allow_get =
        on_web("allow-get", "rules: [{to: [{operation: {methods: [GET, HEAD], notPaths: [\"*.secret\"]}}]}]");
    let allow_header =
        on_web("allow-header", "rules: [{when: [{key: \"request.headers[X-Token]\", values: [\"ok-*\"]}]}]");
    let allow_b = on_web("allow-b", "rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/b]}}]}]");
    let allow_host = on_web("allow-host", "rules: [{to: [{operation: {hosts: [\"API.shop\"], paths: [/exact]}}]}]");
    let on_gateway = authz(
        "shop",
        "deny-on-gateway",
        "targetRefs: [{group: gateway.networking.k8s.io, kind: Gateway, name: waypoint}]\naction: DENY\nrules: [{to: [{operation: {paths: [\"*.php\"]}}]}]",
    );
    let elsewhere = authz(
        "shop",
        "deny-on-other",
        "targetRefs: [{group: \"\", kind: Service, name: other}]\naction: DENY\nrules: [{}]",
    );
    let unsupported = on_web("allow-regex", "rules: [{when: [{key: \"request.regex.headers[x]\", values: [a]}]}]");
    let set = PolicySet::new(
        vec![deny_admin, deny_delete, allow_get, allow_header, allow_b, allow_host, on_gateway, elsewhere, unsupported],
        vec![],
    );
    let mut token = http::HeaderMap::new();
    token.insert("x-token", "ok-123".parse().unwrap());
    let none = http::HeaderMap::new();
    // (principal, method, path, host, headers, allowed, deciding policy)
    type Case<'a> = (Option<&'a str>, &'a str, &'a str, &'a str, &'a http::HeaderMap, bool, &'a str);
    let cases: [Case; 12] = [
        (Some(A), "GET", "/", "web.shop", &none, true, "shop/allow-get rule 0"),
        (Some(A), "GET", "/admin/users", "web.shop", &none, false, "shop/deny-admin rule 0"),
        (Some(A), "GET", "/admin", "web.shop", &none, true, "shop/allow-get rule 0"),
        (Some(A), "DELETE", "/", "web.shop", &token, false, "shop/deny-delete rule 0"),
        (Some(A), "GET", "/index.php", "web.shop", &none, false, "shop/deny-on-gateway rule 0"),
        (Some(A), "GET", "/keys.secret", "web.shop", &none, false, "no ALLOW policy matched"),
        (Some(A), "POST", "/", "web.shop", &none, false, "no ALLOW policy matched"),
        (Some(A), "POST", "/", "web.shop", &token, true, "shop/allow-header rule 0"),
        (Some(B), "POST", "/", "web.shop", &none, true, "shop/allow-b rule 0"),
        (None, "POST", "/", "web.shop", &none, false, "no ALLOW policy matched"),
        (Some(A), "PUT", "/exact", "api.SHOP:80", &none, true, "shop/allow-host rule 0"),
        (Some(A), "PUT", "/exact", "other.shop", &none, false, "no ALLOW policy matched"),
    ];
    for (principal, method, path, host, headers, allowed, policy) in cases {
        let r = http_request(principal, method, path, host, headers);
        let d = set.authorize_request(&web, &r);
        assert_eq!(d.allowed, allowed, "{method} {path} from {principal:?}: {d:?}");
        assert!(d.policy.starts_with(policy), "{method} {path} from {principal:?}: {d:?}");
        assert_eq!(d.hint.is_empty(), allowed, "a denial says what to change: {d:?}");
        let (explained, steps) = set.explain_request(&web, &r);
        assert_eq!(explained, d, "explain decides as enforcement does");
        assert!(!steps.is_empty());
    }
    // A condition key the mesh does not evaluate admits nothing, and says so.
    let (_, steps) = set.explain_request(&web, &http_request(Some(D), "POST", "/", "web.shop", &none));
    assert!(steps.iter().any(|s| s.outcome.contains("the mesh does not evaluate")), "{steps:?}");
    // Another Service's policies do not apply; and no targetRef'd policy applies at L4.
    let other = l7::Target { namespace: "shop", service: Some("canary"), gateway: ("shop", "other-waypoint") };
    assert!(set.authorize_request(&other, &http_request(None, "DELETE", "/admin/x", "c", &none)).allowed);
    let app_web = labels(&[("app", "web")]);
    assert!(set.applicable(&Workload { namespace: "shop", labels: &app_web }).is_empty());
    // A TCP connection relayed by the waypoint is decided at L4: the DENY rules' HTTP fields are
    // ignored (deny-admin, deny-delete, deny-on-gateway deny it all), and with those gone the
    // ALLOW rules with HTTP fields would match nothing.
    let tcp = set.authorize_connection(&web, &request("10.244.1.2", Some(B), 80));
    assert_eq!((tcp.allowed, tcp.policy.as_str()), (false, "shop/deny-admin rule 0"));
    let allow_only = PolicySet::new(
        vec![
            on_web("allow-b", "rules: [{from: [{source: {principals: [cluster.local/ns/shop/sa/b]}}]}]"),
            on_web("allow-get", "rules: [{to: [{operation: {methods: [GET]}}]}]"),
        ],
        vec![],
    );
    let from_b = allow_only.authorize_connection(&web, &request("10.244.1.2", Some(B), 80));
    assert_eq!((from_b.allowed, from_b.policy.as_str()), (true, "shop/allow-b rule 0"));
    let from_a = allow_only.authorize_connection(&web, &request("10.244.1.2", Some(A), 80));
    assert!(!from_a.allowed, "allow-get's method matches no TCP connection: {from_a:?}");
    assert!(from_a.hint.contains("are attached to this Service or its waypoint"), "{from_a:?}");
    // Traffic addressed to a workload through the waypoint: only the Gateway's policies apply.
    let workload = l7::Target { namespace: "shop", service: None, gateway: ("shop", "waypoint") };
    let attached: Vec<String> = set.targeting(&workload).iter().map(|p| p.key()).collect();
    assert_eq!(attached, ["shop/deny-on-gateway"]);
    assert!(set.authorize_request(&workload, &http_request(Some(A), "DELETE", "/admin/x", "c", &none)).allowed);
    let php = set.authorize_request(&workload, &http_request(Some(A), "GET", "/x.php", "c", &none));
    assert_eq!((php.allowed, php.policy.as_str()), (false, "shop/deny-on-gateway rule 0"));
}

#[test]
fn target_refs_are_validated_with_their_field() {
    let bad = |yaml: &str| {
        let spec: AuthorizationPolicySpec = serde_yaml::from_str(yaml).unwrap();
        spec.validate("shop", "p").unwrap_err()
    };
    let e = bad("targetRefs: [{group: apps, kind: Deployment, name: web}]");
    assert_eq!(e.field, "spec.targetRefs[0].kind", "{e}");
    let e = bad("targetRefs: [{kind: Service, name: web}]\nselector: {matchLabels: {app: web}}");
    assert_eq!(e.field, "spec.selector", "{e}");
    let e = bad("targetRef: {kind: Service, name: \"\"}");
    assert_eq!(e.field, "spec.targetRef.name", "{e}");
    // A policy survives the wire with its L7 fields and targets.
    let p = authz(
        "shop",
        "p",
        "targetRefs: [{kind: Service, name: web}]\nrules: [{to: [{operation: {methods: [GET], paths: [/a], hosts: [h], notPaths: [/b]}}], when: [{key: \"request.headers[x-a]\", values: [v]}]}]",
    );
    let back = AuthorizationPolicy::try_from(ferrymesh_api::config::AuthorizationPolicy::from(&p)).unwrap();
    assert_eq!(back, p);
    assert_eq!(p.rules[0].l7_fields.len(), 5, "{:?}", p.rules[0].l7_fields);
}

#[test]
fn request_principals_and_jwt_claims_decide_at_the_waypoint_with_istio_semantics() {
    use crate::authn::RequestAuth;
    let web = l7::Target { namespace: "shop", service: Some("web"), gateway: ("shop", "waypoint") };
    let on_web = |name: &str, yaml: &str| {
        authz("shop", name, &format!("targetRefs: [{{group: \"\", kind: Service, name: web}}]\n{yaml}"))
    };
    // Istio's pattern: an authenticated request is required, and admins may delete.
    let require_jwt =
        on_web("require-jwt", "action: DENY\nrules: [{from: [{source: {notRequestPrincipals: [\"*\"]}}]}]");
    let allow = on_web(
        "allow",
        "rules:\n- from: [{source: {requestPrincipals: [\"https://issuer.example/*\"]}}]\n  to: [{operation: {methods: [GET]}}]\n- when:\n  - {key: \"request.auth.claims[groups]\", values: [admin]}\n  - {key: \"request.auth.claims[org][tier]\", values: [gold]}\n  - {key: request.auth.audiences, values: [web]}\n  - {key: request.auth.presenter, notValues: [untrusted-*]}\n",
    );
    assert!(allow.rules.iter().all(|r| r.unsupported_fields.is_empty()), "request.auth.* is evaluated");
    let back = AuthorizationPolicy::try_from(ferrymesh_api::config::AuthorizationPolicy::from(&allow)).unwrap();
    assert_eq!(back, allow, "request principals and claim keys survive the wire");
    let set = PolicySet::new(vec![require_jwt, allow], vec![]);
    let auth = |sub: &str, claims: serde_json::Value, azp: Option<&str>| RequestAuth {
        principal: format!("https://issuer.example/{sub}"),
        audiences: vec!["web".into()],
        presenter: azp.map(str::to_string),
        claims: claims.as_object().unwrap().clone(),
    };
    let alice = auth("alice", serde_json::json!({"groups": ["dev"]}), None);
    let root = auth("root", serde_json::json!({"groups": ["dev", "admin"], "org": {"tier": "gold"}}), Some("cli"));
    let silver = auth("bob", serde_json::json!({"groups": "admin", "org": {"tier": "silver"}}), None);
    let untrusted =
        auth("eve", serde_json::json!({"groups": ["admin"], "org": {"tier": "gold"}}), Some("untrusted-app"));
    let none = http::HeaderMap::new();
    let cases: [(Option<&RequestAuth>, &str, bool, &str); 7] = [
        (None, "GET", false, "shop/require-jwt rule 0"),
        (Some(&alice), "GET", true, "shop/allow rule 0"),
        (Some(&alice), "DELETE", false, "no ALLOW policy matched"),
        (Some(&root), "DELETE", true, "shop/allow rule 1"),
        (Some(&silver), "DELETE", false, "no ALLOW policy matched"),
        (Some(&untrusted), "DELETE", false, "no ALLOW policy matched"),
        (Some(&untrusted), "GET", true, "shop/allow rule 0"),
    ];
    for (auth, method, allowed, policy) in cases {
        let mut r = http_request(Some(A), method, "/", "web.shop", &none);
        r.auth = auth;
        let d = set.authorize_request(&web, &r);
        let who = auth.map(|a| a.principal.as_str());
        assert_eq!(d.allowed, allowed, "{method} by {who:?}: {d:?}");
        assert!(d.policy.starts_with(policy), "{method} by {who:?}: {d:?}");
    }
    // At L4 the request principal is unknown: an ALLOW rule on it matches no connection.
    let tcp = set.authorize_connection(&web, &request("10.244.1.2", Some(A), 80));
    assert!(!tcp.allowed, "{tcp:?}");
    // Bad claim keys are named.
    let spec: AuthorizationPolicySpec =
        serde_yaml::from_str("rules: [{when: [{key: \"request.auth.claims[]\", values: [a]}]}]").unwrap();
    let e = spec.validate("shop", "p").unwrap_err();
    assert_eq!(e.field, "spec.rules[0].when[0].key", "{e}");
}

#[test]
fn a_waypoint_applies_the_destinations_deny_rules_that_name_clients_to_the_original_client() {
    let app_web = labels(&[("app", "web")]);
    let web = Workload { namespace: "shop", labels: &app_web };
    const WAYPOINT: &str = "cluster.local/ns/shop/sa/waypoint";
    let set = PolicySet::new(
        vec![
            authz(ROOT_NAMESPACE, "no-other", "action: DENY\nrules: [{from: [{source: {namespaces: [other]}}]}]"),
            authz("shop", "no-b", "selector: {matchLabels: {app: web}}\naction: DENY\nrules: [{from: [{source: {principals: [\"cluster.local/ns/shop/sa/b\"]}}]}]"),
            authz("shop", "no-lab", "action: DENY\nrules: [{when: [{key: source.ip, values: [192.0.2.0/24]}]}]"),
            // About the hop the destination sees (the waypoint), not the client: its own.
            authz("shop", "only-waypoint", &format!("action: DENY\nrules: [{{from: [{{source: {{notPrincipals: [\"{WAYPOINT}\"]}}}}]}}]")),
            authz("shop", "no-9000", "action: DENY\nrules: [{to: [{operation: {ports: [\"9000\"]}}]}]"),
            // Another workload's, and an ALLOW: not the waypoint's to apply.
            authz("shop", "db-no-a", "selector: {matchLabels: {app: db}}\naction: DENY\nrules: [{from: [{source: {principals: [\"cluster.local/ns/shop/sa/a\"]}}]}]"),
            authz("shop", "allow-waypoint", &format!("rules: [{{from: [{{source: {{principals: [\"{WAYPOINT}\"]}}}}]}}]")),
        ],
        vec![],
    );
    let cases = [
        (request("10.244.1.2", Some(A), 8080), None),
        (request("10.244.1.2", Some(D), 8080), Some("ferrymesh-system/no-other rule 0")),
        (request("10.244.1.3", Some(B), 8080), Some("shop/no-b rule 0")),
        (request("192.0.2.7", Some(A), 8080), Some("shop/no-lab rule 0")),
        (request("10.244.1.2", Some(A), 9000), None),
    ];
    for (r, want) in cases {
        let got = set.denied_at_waypoint(&web, &r);
        assert_eq!(got.as_ref().map(|d| d.policy.as_str()), want, "{r:?}");
        assert!(got.is_none_or(|d| !d.allowed && d.hint.contains("enforced by its waypoint")));
    }
}

/// What the waypoint decides of a request whose raw path is `raw` under `set` (path normalized
/// first, as it is before authorization): allowed or not, or None when the path is refused (400).
fn decide_raw_path(set: &PolicySet, raw: &str) -> Option<bool> {
    let web = l7::Target { namespace: "shop", service: Some("web"), gateway: ("shop", "waypoint") };
    let none = http::HeaderMap::new();
    match path::normalize(raw, &path::PathRules::default()) {
        Ok(path::Normalized::Path(p) | path::Normalized::Redirect(p)) => {
            Some(set.authorize_request(&web, &http_request(Some(A), "GET", &p, "web", &none)).allowed)
        }
        Err(_) => None,
    }
}

proptest! {
    /// A DENY on /admin* and an ALLOW on /public* only: a path decides as its normalized form
    /// does, and nothing that normalizes into /admin or out of /public is allowed.
    #[test]
    fn a_path_is_authorized_as_its_normalized_form(
        pieces in proptest::collection::vec(
            prop_oneof![
                Just("/"), Just("//"), Just("."), Just(".."), Just("%2e"), Just("%2E"), Just("%61"),
                Just("%2f"), Just("%5c"), Just("\\"), Just(";x"), Just("admin"), Just("public"), Just("%"),
            ],
            0..10,
        )
    ) {
        let on_web = |name: &str, yaml: &str| {
            authz("shop", name, &format!("targetRefs: [{{group: \"\", kind: Service, name: web}}]\n{yaml}"))
        };
        let set = PolicySet::new(
            vec![
                on_web("deny-admin", "action: DENY\nrules: [{to: [{operation: {paths: [\"/admin*\"]}}]}]"),
                on_web("allow-public", "rules: [{to: [{operation: {paths: [\"/public*\"]}}]}]"),
            ],
            vec![],
        );
        let raw = format!("/{}", pieces.concat());
        let decided = decide_raw_path(&set, &raw);
        if let Ok(path::Normalized::Path(normalized)) = path::normalize(&raw, &path::PathRules::default()) {
            prop_assert_eq!(decided, decide_raw_path(&set, &normalized), "{}", raw);
            if decided == Some(true) {
                prop_assert!(normalized.starts_with("/public") && !normalized.starts_with("/admin"), "{} -> {}", raw, normalized);
            }
        }
    }
}

#[test]
fn jwks_hosts_of_the_waypoint_itself_and_of_metadata_services_are_forbidden() {
    use crate::authn::forbidden_jwks_host;
    for allowed in ["keys.example", "10.0.0.5", "jwks.auth.svc.cluster.local", "[2001:db8::1]", "169.255.0.1"] {
        assert_eq!(forbidden_jwks_host(allowed), None, "{allowed}");
    }
    for forbidden in [
        "127.0.0.1",
        "127.1.2.3",
        "0.0.0.0",
        "[::1]",
        "[::]",
        "169.254.169.254",
        "[fe80::1]",
        "[fd00:ec2::254]",
        "[::ffff:127.0.0.1]",
        "localhost",
        "api.localhost",
        "Metadata.Google.Internal.",
        "instance-data",
    ] {
        assert!(forbidden_jwks_host(forbidden).is_some(), "{forbidden}");
    }
}

#[test]
fn plaintext_jwks_hosts_are_only_those_inside_the_cluster() {
    use crate::authn::cluster_internal_host;
    for inside in [
        "jwks.auth.svc",
        "jwks.auth.svc.cluster.local",
        "keys.cluster.local",
        "10.96.0.10",
        "172.18.0.254",
        "192.168.1.2",
        "[fd00::1]",
    ] {
        assert!(cluster_internal_host(inside), "{inside}");
    }
    for outside in ["keys.example", "accounts.google.com", "8.8.8.8", "[2001:db8::1]", "svc.example"] {
        assert!(!cluster_internal_host(outside), "{outside}");
    }
}
