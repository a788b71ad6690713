use std::sync::Arc;
use std::time::Duration;

use ferrymesh_api::config as proto;

use super::spec::TrafficPolicySpec;
use super::*;
use crate::{Match, Rule, Timeouts};

fn validate(yaml: &str) -> Result<TrafficPolicy, spec::SpecError> {
    let spec: TrafficPolicySpec = serde_yaml::from_str(yaml).expect("YAML of the spec");
    spec.validate("shop", "p")
}

const TARGET: &str = "targetRefs:\n- kind: Service\n  name: web\n";

#[test]
fn a_fault_takes_istio_fields_and_every_bad_value_is_named() {
    let ok = validate(&format!(
        "{TARGET}fault:\n  delay:\n    fixedDelay: 1.5s\n    percentage:\n      value: 12.5\n  abort:\n    grpcStatus: UNAVAILABLE\n"
    ))
    .unwrap();
    let fault = ok.fault.unwrap();
    let delay = fault.delay.unwrap();
    assert_eq!((delay.fixed, delay.share.as_percent()), (Duration::from_millis(1500), 12.5));
    let abort = fault.abort.unwrap();
    assert_eq!(abort.status, AbortStatus::Grpc(GrpcCode::parse("UNAVAILABLE").unwrap()));
    assert_eq!(abort.share, Share::ALL, "no percentage: every request, as in Envoy");
    assert_eq!(GrpcCode::parse("UNAVAILABLE").unwrap().code(), 14);

    let table = [
        (
            "fault:\n  abort:\n    httpStatus: 503\n    percentage:\n      value: 150\n",
            "spec.fault.abort.percentage.value",
        ),
        (
            "fault:\n  abort:\n    httpStatus: 503\n    percentage:\n      value: -1\n",
            "spec.fault.abort.percentage.value",
        ),
        ("fault:\n  delay:\n    fixedDelay: -1s\n", "spec.fault.delay.fixedDelay"),
        ("fault:\n  delay:\n    fixedDelay: 5 seconds\n", "spec.fault.delay.fixedDelay"),
        ("fault:\n  delay:\n    percentage:\n      value: 5\n", "spec.fault.delay.fixedDelay"),
        ("fault:\n  abort:\n    httpStatus: 99\n", "spec.fault.abort.httpStatus"),
        ("fault:\n  abort:\n    grpcStatus: \"14\"\n", "spec.fault.abort.grpcStatus"),
        ("fault:\n  abort:\n    httpStatus: 503\n    grpcStatus: UNAVAILABLE\n", "spec.fault.abort"),
        ("fault:\n  abort:\n    percentage:\n      value: 5\n", "spec.fault.abort"),
        ("fault: {}\n", "spec.fault"),
        ("", "spec"),
    ];
    for (fault, field) in table {
        let e = validate(&format!("{TARGET}{fault}")).unwrap_err();
        assert_eq!(e.field, field, "{fault}: {e}");
    }
    let no_target = validate("fault:\n  abort:\n    httpStatus: 503\n").unwrap_err();
    assert_eq!(no_target.field, "spec.targetRefs");
    let targets = [
        ("- kind: Deployment\n  name: web\n", "spec.targetRefs[0].kind"),
        ("- group: gateway.networking.k8s.io\n  kind: Service\n  name: web\n", "spec.targetRefs[0].kind"),
        ("- kind: Service\n  name: web\n  sectionName: http\n", "spec.targetRefs[0].sectionName"),
        ("- kind: Service\n  name: \"\"\n", "spec.targetRefs[0].name"),
    ];
    for (target, field) in targets {
        let e = validate(&format!("targetRefs:\n{target}fault:\n  abort:\n    httpStatus: 503\n")).unwrap_err();
        assert_eq!(e.field, field, "{target}: {e}");
    }
}

#[test]
fn istio_durations_take_fractions_and_units_and_refuse_negatives() {
    let ok = [
        ("5s", Duration::from_secs(5)),
        ("0.5s", Duration::from_millis(500)),
        ("250ms", Duration::from_millis(250)),
        ("1m30s", Duration::from_secs(90)),
        ("1h", Duration::from_secs(3600)),
        ("100us", Duration::from_micros(100)),
        ("0s", Duration::ZERO),
    ];
    for (text, want) in ok {
        assert_eq!(parse_istio_duration(text), Ok(want), "{text}");
    }
    for bad in ["", "5", "s", "-1s", "1d", "1.2.3s", "5 s"] {
        assert!(parse_istio_duration(bad).is_err(), "{bad:?}");
    }
}

#[test]
fn a_share_takes_its_part_of_evenly_spread_rolls() {
    let rolls = crate::Rolls::default();
    let half = Share::percent(50.0).unwrap();
    let hits = (0..400).filter(|_| half.hits(rolls.next())).count();
    // A golden-ratio sequence strays at most 2 from the share over any run of this length
    // (checked over many random starts), where independent rolls would stray by 10.
    assert!((198..=202).contains(&hits), "{hits} of 400");
    assert!(!Share::percent(0.0).unwrap().hits(0));
    assert!(Share::ALL.hits(u32::MAX));
    assert!(Share::percent(100.5).is_err() && Share::percent(f64::NAN).is_err());
}

fn route(name: &str, rules: &[Option<&str>]) -> Route {
    Route {
        kind: RouteKind::Http,
        namespace: "shop".into(),
        name: name.into(),
        parents: vec![],
        hostnames: vec![],
        rules: rules
            .iter()
            .map(|n| Rule {
                name: n.map(String::from),
                matches: vec![Match::default()],
                filters: vec![],
                backends: vec![],
                timeouts: Timeouts::default(),
                retry: None,
            })
            .collect(),
        created_unix: 0,
    }
}

fn policy(name: &str, target: Target, status: u16) -> Arc<TrafficPolicy> {
    Arc::new(TrafficPolicy {
        namespace: "shop".into(),
        name: name.into(),
        targets: vec![target],
        fault: Some(Fault { delay: None, abort: Some(Abort { status: AbortStatus::Http(status), share: Share::ALL }) }),
        rate_limit: None,
    })
}

#[test]
fn the_most_specific_policy_applies_rule_then_route_then_service() {
    let web = route("web", &[Some("canary"), None]);
    let rule = |name: &str| Target::Route { kind: RouteKind::Http, name: "web".into(), rule: Some(name.into()) };
    let whole = Target::Route { kind: RouteKind::Http, name: "web".into(), rule: None };
    let policies = TrafficPolicies::new(vec![
        policy("z-service", Target::Service("web".into()), 500),
        policy("b-service", Target::Service("web".into()), 501),
        policy("route", whole, 502),
        policy("rule", rule("canary"), 503),
        policy("other-rule", rule("stable"), 504),
    ]);
    let status = |service: &str, taken: Option<(&Route, usize)>| {
        policies.fault(service, taken).map(|a| (a.policy.name.clone(), a.feature.abort.as_ref().unwrap().status))
    };
    assert_eq!(status("shop/web", Some((&web, 0))), Some(("rule".into(), AbortStatus::Http(503))));
    assert_eq!(status("shop/web", Some((&web, 1))), Some(("route".into(), AbortStatus::Http(502))));
    // No route took it: the Service's policies, the first by name of the two.
    assert_eq!(status("shop/web", None), Some(("b-service".into(), AbortStatus::Http(501))));
    // Another route of the Service: its policies do not apply, the Service's do.
    assert_eq!(status("shop/web", Some((&route("api", &[None]), 0))).unwrap().0, "b-service");
    // Another namespace's Service of the same name: nothing.
    assert!(status("other/web", None).is_none());
    assert!(status("shop/db", None).is_none());
}

#[test]
fn a_policy_survives_the_wire_and_a_bad_one_is_named() {
    let p = validate(
        "targetRefs:\n- group: gateway.networking.k8s.io\n  kind: GRPCRoute\n  name: g\n  sectionName: r\n- kind: Service\n  name: web\nfault:\n  delay:\n    fixedDelay: 250ms\n    percentage:\n      value: 0.1\n  abort:\n    httpStatus: 418\n",
    )
    .unwrap();
    let wire = proto::TrafficPolicy::from(&p);
    assert_eq!(TrafficPolicy::try_from(wire.clone()), Ok(p));
    let mut bad = wire.clone();
    bad.fault.as_mut().unwrap().abort.as_mut().unwrap().percentage = 101.0;
    let e = TrafficPolicy::try_from(bad).unwrap_err();
    assert_eq!((e.policy.as_str(), e.field.as_str()), ("shop/p", "fault.abort.percentage"));
    let mut bad = wire;
    bad.targets[0].kind = "Gateway".into();
    assert_eq!(TrafficPolicy::try_from(bad).unwrap_err().field, "targets[0].kind");
}

#[test]
fn local_rate_limits_validate_with_a_burst_and_a_key_and_survive_the_wire() {
    let p = validate(&format!(
        "{TARGET}rateLimit:\n  local:\n  - limit:\n      requests: 10\n      unit: Second\n  - limit:\n      requests: 5\n      unit: Minute\n    burst: 8\n    key:\n      header: X-User\n  - limit:\n      requests: 100\n      unit: Hour\n    key:\n      sourcePrincipal: true\n"
    ))
    .unwrap();
    let local = &p.rate_limit.as_ref().unwrap().local;
    assert_eq!(
        (local[0].requests, local[0].per, local[0].burst, &local[0].key),
        (10, Duration::from_secs(1), 10, &LimitKey::Shared)
    );
    assert_eq!((local[1].burst, &local[1].key), (8, &LimitKey::Header("x-user".into())));
    assert_eq!((local[2].per, &local[2].key), (Duration::from_secs(3600), &LimitKey::SourcePrincipal));
    assert!(p.fault.is_none());
    assert_eq!(TrafficPolicy::try_from(proto::TrafficPolicy::from(&p)), Ok(p.clone()));
    let policies = TrafficPolicies::new(vec![Arc::new(p)]);
    assert!(policies.rate_limit("shop/web", None).is_some() && policies.fault("shop/web", None).is_none());

    let limit = |body: &str| format!("{TARGET}rateLimit:\n  local:\n  - {body}");
    let table = [
        (limit("limit:\n      requests: 0\n      unit: Second\n"), "spec.rateLimit.local[0].limit.requests"),
        (limit("limit:\n      requests: -5\n      unit: Second\n"), "spec.rateLimit.local[0].limit.requests"),
        (limit("limit:\n      requests: 5\n      unit: Week\n"), "spec.rateLimit.local[0].limit.unit"),
        (limit("limit:\n      requests: 5\n      unit: Second\n    burst: 0\n"), "spec.rateLimit.local[0].burst"),
        (limit("limit:\n      requests: 5\n      unit: Second\n    key: {}\n"), "spec.rateLimit.local[0].key"),
        (
            limit("limit:\n      requests: 5\n      unit: Second\n    key:\n      header: a b\n"),
            "spec.rateLimit.local[0].key.header",
        ),
        (
            limit("limit:\n      requests: 5\n      unit: Second\n    key:\n      header: x\n      sourcePrincipal: true\n"),
            "spec.rateLimit.local[0].key",
        ),
        (format!("{TARGET}rateLimit: {{}}\n"), "spec.rateLimit"),
    ];
    for (yaml, field) in table {
        let e = validate(&yaml).unwrap_err();
        assert_eq!(e.field, field, "{yaml}: {e}");
    }
}

#[test]
fn global_rate_limits_validate_with_a_unit_and_a_key_and_survive_the_wire() {
    let p = validate(&format!(
        "{TARGET}rateLimit:\n  failureModeDeny: true\n  global:\n  - limit:\n      requests: 10\n      unit: Minute\n    key:\n      header: X-User\n  - limit:\n      requests: 1000\n      unit: Day\n"
    ))
    .unwrap();
    let limits = p.rate_limit.as_ref().unwrap();
    assert!(limits.local.is_empty() && limits.failure_mode_deny);
    assert_eq!(
        limits.global,
        [
            GlobalLimit { requests: 10, unit: LimitUnit::Minute, key: LimitKey::Header("x-user".into()) },
            GlobalLimit { requests: 1000, unit: LimitUnit::Day, key: LimitKey::Shared },
        ]
    );
    assert_eq!(LimitUnit::Day.duration(), Duration::from_secs(86_400));
    let wire = proto::TrafficPolicy::from(&p);
    assert_eq!(wire.rate_limit.as_ref().unwrap().global[0].unit, 2, "Envoy's number for a minute");
    assert_eq!(TrafficPolicy::try_from(wire.clone()), Ok(p));
    let mut bad = wire;
    bad.rate_limit.as_mut().unwrap().global[1].unit = 9;
    assert_eq!(TrafficPolicy::try_from(bad).unwrap_err().field, "rate_limit.global[1].unit");

    let limit = |body: &str| format!("{TARGET}rateLimit:\n  global:\n  - {body}");
    let table = [
        (limit("limit:\n      requests: 0\n      unit: Second\n"), "spec.rateLimit.global[0].limit.requests"),
        (limit("limit:\n      requests: 5\n      unit: Fortnight\n"), "spec.rateLimit.global[0].limit.unit"),
        (limit("limit:\n      requests: 5\n      unit: Hour\n    key: {}\n"), "spec.rateLimit.global[0].key"),
    ];
    for (yaml, field) in table {
        let e = validate(&yaml).unwrap_err();
        assert_eq!(e.field, field, "{yaml}: {e}");
    }
}
