use std::time::Duration;

use ferrymesh_api::config as proto;

use super::spec::DestinationRuleSpec;
use super::*;

fn validate(yaml: &str) -> Result<DestinationRule, spec::SpecError> {
    let spec: DestinationRuleSpec = serde_yaml::from_str(yaml).expect("YAML of the spec");
    spec.validate("shop", "dr")
}

#[test]
fn istio_fields_validate_into_the_rule_with_istio_defaults() {
    let rule = validate(
        "host: web.shop.svc.cluster.local\ntrafficPolicy:\n  connectionPool:\n    tcp:\n      maxConnections: 1\n    http:\n      http1MaxPendingRequests: 1\n      http2MaxRequests: 10\n      maxRequestsPerConnection: 1\n      maxRetries: 3\n  outlierDetection:\n    consecutive5xxErrors: 3\n    baseEjectionTime: 2s\n    maxEjectionPercent: 50\n  loadBalancer:\n    consistentHash:\n      httpCookie:\n        name: user\n        ttl: 60s\n",
    )
    .unwrap();
    assert_eq!(rule.service, "shop/web");
    let pool = &rule.policy.pool;
    assert_eq!(
        (pool.max_connections, pool.max_pending_requests, pool.max_requests, pool.max_retries),
        (Some(1), Some(1), Some(10), Some(3))
    );
    let o = rule.policy.outliers.as_ref().unwrap();
    assert_eq!((o.consecutive_5xx, o.consecutive_gateway), (Some(3), None));
    assert_eq!(
        (o.interval, o.base_ejection, o.max_ejection_percent),
        (Duration::from_secs(10), Duration::from_secs(2), 50)
    );
    assert_eq!(
        rule.policy.balancer,
        LoadBalancer::Hash(HashOn::Cookie { name: "user".into(), ttl: Some(Duration::from_secs(60)), path: None })
    );
    // Nothing set: no limit, no ejection, least requests; a short host is in the rule's namespace.
    let plain = validate("host: web\n").unwrap();
    assert_eq!((plain.service.as_str(), &plain.policy), ("shop/web", &TrafficSettings::default()));
    // outlierDetection with nothing in it: Istio's defaults.
    let defaults = validate("host: web\ntrafficPolicy:\n  outlierDetection: {}\n").unwrap();
    let o = defaults.policy.outliers.unwrap();
    assert_eq!((o.consecutive_5xx, o.max_ejection_percent), (Some(5), 10));
    assert_eq!(validate("host: web.other\n").unwrap().service, "other/web");
}

#[test]
fn every_bad_field_is_named() {
    let t = "host: web\ntrafficPolicy:\n";
    let table = [
        ("host: \"*.shop.svc.cluster.local\"\n".to_string(), "spec.host"),
        ("host: web.example.com\n".into(), "spec.host"),
        ("host: \"\"\n".into(), "spec.host"),
        ("host: web\nsubsets:\n- name: v1\n".into(), "spec.subsets"),
        (
            format!("{t}  connectionPool:\n    tcp:\n      maxConnections: -1\n"),
            "spec.trafficPolicy.connectionPool.tcp.maxConnections",
        ),
        (
            format!("{t}  connectionPool:\n    tcp:\n      connectTimeout: 1s\n"),
            "spec.trafficPolicy.connectionPool.tcp.connectTimeout",
        ),
        (
            format!("{t}  connectionPool:\n    http:\n      maxRequestsPerConnection: 5\n"),
            "spec.trafficPolicy.connectionPool.http.maxRequestsPerConnection",
        ),
        (
            format!("{t}  connectionPool:\n    http:\n      http1MaxPendingRequests: 5000000000\n"),
            "spec.trafficPolicy.connectionPool.http.http1MaxPendingRequests",
        ),
        (
            format!("{t}  outlierDetection:\n    maxEjectionPercent: 150\n"),
            "spec.trafficPolicy.outlierDetection.maxEjectionPercent",
        ),
        (format!("{t}  outlierDetection:\n    interval: 0s\n"), "spec.trafficPolicy.outlierDetection.interval"),
        (
            format!("{t}  outlierDetection:\n    baseEjectionTime: soon\n"),
            "spec.trafficPolicy.outlierDetection.baseEjectionTime",
        ),
        (
            format!("{t}  outlierDetection:\n    consecutive5xxErrors: -2\n"),
            "spec.trafficPolicy.outlierDetection.consecutive5xxErrors",
        ),
        (format!("{t}  loadBalancer:\n    simple: PASSTHROUGH\n"), "spec.trafficPolicy.loadBalancer.simple"),
        (format!("{t}  loadBalancer:\n    simple: FASTEST\n"), "spec.trafficPolicy.loadBalancer.simple"),
        (
            format!("{t}  loadBalancer:\n    simple: RANDOM\n    consistentHash:\n      useSourceIp: true\n"),
            "spec.trafficPolicy.loadBalancer",
        ),
        (format!("{t}  loadBalancer:\n    consistentHash: {{}}\n"), "spec.trafficPolicy.loadBalancer.consistentHash"),
        (
            format!("{t}  loadBalancer:\n    consistentHash:\n      httpHeaderName: x-user\n      useSourceIp: true\n"),
            "spec.trafficPolicy.loadBalancer.consistentHash",
        ),
        (
            format!("{t}  loadBalancer:\n    consistentHash:\n      httpHeaderName: \"bad header\"\n"),
            "spec.trafficPolicy.loadBalancer.consistentHash.httpHeaderName",
        ),
        (
            format!("{t}  loadBalancer:\n    consistentHash:\n      httpCookie:\n        name: \"a;b\"\n"),
            "spec.trafficPolicy.loadBalancer.consistentHash.httpCookie.name",
        ),
    ];
    for (yaml, field) in table {
        let e = validate(&yaml).unwrap_err();
        assert_eq!(e.field, field, "{yaml}: {e}");
    }
}

#[test]
fn ejection_lengths_grow_and_at_least_one_endpoint_may_go() {
    let o = OutlierDetection {
        consecutive_5xx: Some(5),
        consecutive_gateway: None,
        interval: Duration::from_secs(10),
        base_ejection: Duration::from_secs(30),
        max_ejection_percent: 10,
    };
    assert_eq!(o.ejection_time(1), Duration::from_secs(30));
    assert_eq!(o.ejection_time(3), Duration::from_secs(90));
    assert_eq!(o.ejection_time(100), MAX_EJECTION);
    assert_eq!((o.max_ejected(3), o.max_ejected(30)), (1, 3));
}

#[test]
fn rules_survive_the_wire_and_the_first_by_name_wins_a_service() {
    for yaml in [
        "host: web\ntrafficPolicy:\n  connectionPool:\n    tcp:\n      maxConnections: 2\n  outlierDetection:\n    consecutiveGatewayErrors: 2\n    consecutive5xxErrors: 0\n  loadBalancer:\n    simple: ROUND_ROBIN\n",
        "host: web\ntrafficPolicy:\n  loadBalancer:\n    consistentHash:\n      httpHeaderName: X-User\n",
        "host: web\ntrafficPolicy:\n  loadBalancer:\n    consistentHash:\n      useSourceIp: true\n",
        "host: web\ntrafficPolicy:\n  loadBalancer:\n    consistentHash:\n      httpCookie:\n        name: s\n        path: /\n",
    ] {
        let rule = validate(yaml).unwrap();
        assert_eq!(DestinationRule::try_from(proto::DestinationRule::from(&rule)), Ok(rule), "{yaml}");
    }
    let mut bad = proto::DestinationRule::from(&validate("host: web\n").unwrap());
    bad.load_balancer.as_mut().unwrap().simple = "FASTEST".into();
    let e = DestinationRule::try_from(bad).unwrap_err();
    assert_eq!((e.rule.as_str(), e.field.as_str()), ("shop/dr", "load_balancer.simple"));

    let named = |name: &str| {
        let spec: DestinationRuleSpec = serde_yaml::from_str("host: web\n").unwrap();
        Arc::new(spec.validate("shop", name).unwrap())
    };
    let rules = DestinationRules::new(vec![named("b"), named("a")]);
    assert_eq!(rules.of("shop/web", None, ROOT).unwrap().name, "a");
    assert!(rules.of("shop/db", None, ROOT).is_none());
}

const ROOT: &str = "ferrymesh-system";

#[test]
fn a_rule_governs_clients_as_istio_finds_it_and_never_another_namespaces() {
    let rule = |namespace: &str, name: &str, export_to: &str| {
        let yaml = format!("host: web.shop.svc.cluster.local\nexportTo: {export_to}\n");
        let spec: DestinationRuleSpec = serde_yaml::from_str(&yaml).unwrap();
        Arc::new(spec.validate(namespace, name).unwrap())
    };
    let found = |rules: &DestinationRules, client: Option<&str>| rules.of("shop/web", client, ROOT).map(|r| r.key());
    // A rule of a third namespace governs no one, not even with exportTo "*"; its own clients
    // it does.
    let evil = DestinationRules::new(vec![rule("evil", "steal", "[\"*\"]")]);
    for client in [None, Some("shop"), Some("other")] {
        assert_eq!(found(&evil, client), None, "{client:?}");
    }
    assert_eq!(found(&evil, Some("evil")).as_deref(), Some("evil/steal"));
    // The client's own namespace first, then the Service's, then the root namespace.
    let all = DestinationRules::new(vec![
        rule(ROOT, "mesh", "[\"*\"]"),
        rule("shop", "owner", "[\"*\"]"),
        rule("team", "mine", "[\".\"]"),
    ]);
    assert_eq!(found(&all, Some("team")).as_deref(), Some("team/mine"));
    assert_eq!(found(&all, Some("other")).as_deref(), Some("shop/owner"));
    assert_eq!(found(&all, None).as_deref(), Some("shop/owner"));
    // exportTo keeps a rule to the namespaces it names.
    let private = DestinationRules::new(vec![rule(ROOT, "mesh", "[\"*\"]"), rule("shop", "owner", "[\".\"]")]);
    assert_eq!(found(&private, Some("shop")).as_deref(), Some("shop/owner"));
    assert_eq!(found(&private, Some("other")).as_deref(), Some("ferrymesh-system/mesh"));
    let listed = DestinationRules::new(vec![rule("shop", "owner", "[team]")]);
    assert_eq!(found(&listed, Some("team")).as_deref(), Some("shop/owner"));
    assert_eq!(found(&listed, Some("other")), None);
    // A bad exportTo is refused by field.
    let spec: DestinationRuleSpec = serde_yaml::from_str("host: web\nexportTo: [\"Not A Namespace\"]\n").unwrap();
    assert_eq!(spec.validate("shop", "x").unwrap_err().field, "spec.exportTo[0]");
}
