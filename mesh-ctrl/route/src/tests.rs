use std::sync::Arc;

use ferrymesh_api::config as proto;
use http::{HeaderMap, Method};

use super::*;

fn backend(name: &str, weight: u32) -> Backend {
    Backend {
        target: BackendRef { service: format!("shop/{name}"), port: 8080 },
        weight,
        filters: vec![],
        refused: None,
    }
}

fn rule(matches: Vec<Match>, to: &str) -> Rule {
    let matches = if matches.is_empty() { vec![Match::default()] } else { matches };
    Rule {
        name: None,
        matches,
        filters: vec![],
        backends: vec![backend(to, 1)],
        timeouts: Timeouts::default(),
        retry: None,
    }
}

fn route(name: &str, created_unix: i64, rules: Vec<Rule>) -> Arc<Route> {
    Arc::new(Route {
        kind: RouteKind::Http,
        namespace: "shop".into(),
        name: name.into(),
        parents: vec![Parent { service: "shop/web".into(), port: None }],
        hostnames: vec![],
        rules,
        created_unix,
    })
}

fn path(p: PathMatch) -> Match {
    Match { path: Some(p), ..Default::default() }
}

fn header(name: &str, value: &str) -> ValueMatch {
    ValueMatch { name: name.into(), value: StringMatch::Exact(value.into()) }
}

/// The backend service a request to `target` (`/path?query`) with `headers` is routed to.
fn routed(table: &RouteTable, method: &Method, target: &str, headers: &[(&str, &str)]) -> Option<String> {
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(), v.parse().unwrap());
    }
    let request = RequestView { method, path, query, headers: &map };
    table.select(&request).map(|s| s.rule().backends[0].target.service.clone())
}

#[test]
fn matching_follows_the_gateway_api_precedence() {
    // The shape of the conformance suite's HTTPRouteMatching and its precedence cases.
    let routes = [
        route(
            "a",
            100,
            vec![
                rule(vec![path(PathMatch::Prefix("/".into()))], "v-root"),
                rule(vec![path(PathMatch::Prefix("/v2/".into()))], "v2-prefix"),
                rule(vec![path(PathMatch::Exact("/v2/exact".into()))], "v2-exact"),
                rule(
                    vec![Match { headers: vec![header("version", "one")], ..path(PathMatch::Prefix("/".into())) }],
                    "h1",
                ),
                rule(
                    vec![Match {
                        headers: vec![header("version", "one"), header("color", "blue")],
                        ..path(PathMatch::Prefix("/".into()))
                    }],
                    "h2",
                ),
                rule(vec![Match { method: Some(Method::POST), ..path(PathMatch::Prefix("/".into())) }], "post"),
                rule(
                    vec![Match {
                        query_params: vec![header("animal", "whale")],
                        ..path(PathMatch::Prefix("/".into()))
                    }],
                    "whale",
                ),
                rule(vec![path(PathMatch::Regex(anchored("/re/[0-9]+").unwrap()))], "regex"),
            ],
        ),
        // Equally specific as route a's first rule, but newer: a wins.
        route("b", 200, vec![rule(vec![path(PathMatch::Prefix("/".into()))], "newer")]),
    ];
    let table = RouteTable::new(&routes, "shop/web", 8080, None);
    let get = Method::GET;
    type Case<'a> = (&'a Method, &'a str, &'a [(&'a str, &'a str)], &'a str);
    let cases: [Case; 14] = [
        (&get, "/", &[], "shop/v-root"),
        // A repeated header is matched as its values joined with `,`.
        (&get, "/x", &[("version", "one"), ("version", "two")], "shop/v-root"),
        (&get, "/x", &[("color", "blue"), ("color", "red"), ("version", "one")], "shop/h1"),
        (&get, "/v2", &[], "shop/v2-prefix"),
        (&get, "/v2/", &[], "shop/v2-prefix"),
        (&get, "/v2/example", &[], "shop/v2-prefix"),
        (&get, "/v2example", &[], "shop/v-root"),
        (&get, "/v2/exact", &[], "shop/v2-exact"),
        (&get, "/x", &[("version", "one")], "shop/h1"),
        (&get, "/x", &[("version", "one"), ("color", "blue")], "shop/h2"),
        (&Method::POST, "/x", &[("version", "one")], "shop/post"),
        (&get, "/x?animal=whale&x=1", &[], "shop/whale"),
        (&get, "/re/42", &[], "shop/regex"),
        (&get, "/re/x", &[], "shop/v-root"),
    ];
    for (method, target, headers, want) in cases {
        assert_eq!(routed(&table, method, target, headers).as_deref(), Some(want), "{method} {target} {headers:?}");
    }
    assert!(RouteTable::new(&routes, "shop/web", 9090, None).select(&view(&get, "/")).is_some(), "no port: every port");
    assert!(RouteTable::new(&routes, "shop/api", 8080, None).is_empty(), "another service has no routes");
}

fn view<'a>(method: &'a Method, path: &'a str) -> RequestView<'a> {
    static EMPTY: std::sync::OnceLock<HeaderMap> = std::sync::OnceLock::new();
    RequestView { method, path, query: None, headers: EMPTY.get_or_init(HeaderMap::new) }
}

#[test]
fn a_route_on_one_port_leaves_the_others_alone() {
    let mut r = (*route("p", 1, vec![rule(vec![], "only-8080")])).clone();
    r.parents = vec![Parent { service: "shop/web".into(), port: Some(8080) }];
    let routes = [Arc::new(r)];
    assert!(RouteTable::new(&routes, "shop/web", 8080, None).select(&view(&Method::GET, "/")).is_some());
    assert!(RouteTable::new(&routes, "shop/web", 9090, None).is_empty());
}

#[test]
fn ties_go_to_the_older_route_then_by_name_then_rule_order() {
    let routes = [
        route("zeta", 5, vec![rule(vec![], "zeta")]),
        route("alpha", 5, vec![rule(vec![], "alpha-0"), rule(vec![], "alpha-1")]),
        route("newest", 9, vec![rule(vec![], "newest")]),
    ];
    let table = RouteTable::new(&routes, "shop/web", 80, None);
    assert_eq!(routed(&table, &Method::GET, "/", &[]).as_deref(), Some("shop/alpha-0"));
    let selected = table.select(&view(&Method::GET, "/")).unwrap();
    assert_eq!(selected.describe(), "HTTPRoute shop/alpha rule 0");
}

#[test]
fn a_route_of_another_namespace_applies_only_to_that_namespaces_clients() {
    let in_namespace = |namespace: &str, name: &str, prefix: &str| {
        let mut r = (*route(name, 1, vec![rule(vec![path(PathMatch::Prefix(prefix.into()))], name)])).clone();
        r.namespace = namespace.into();
        Arc::new(r)
    };
    // shop's own route on shop/web, and one of evil's taking /login to its own backend.
    let routes = [in_namespace("shop", "producer", "/"), in_namespace("evil", "consumer", "/login")];
    // (client namespace, path, the rule that takes it; None: no rule matches)
    let cases = [
        (None, "/login", Some("shop/producer")),
        (Some("shop"), "/login", Some("shop/producer")),
        (Some("other"), "/login", Some("shop/producer")),
        // evil's clients get evil's routes instead of shop's: /login to evil's, and nothing else.
        (Some("evil"), "/login", Some("shop/consumer")),
        (Some("evil"), "/", None),
    ];
    for (client, target, want) in cases {
        let table = RouteTable::new(&routes, "shop/web", 80, client);
        assert_eq!(routed(&table, &Method::GET, target, &[]).as_deref(), want, "{client:?} {target}");
    }
    // With only a consumer route, every other client sees a Service without routes.
    let only_consumer = [in_namespace("evil", "consumer", "/login")];
    assert!(RouteTable::new(&only_consumer, "shop/web", 80, Some("shop")).is_empty());
    assert!(RouteTable::new(&only_consumer, "shop/web", 80, None).is_empty());
    assert!(!RouteTable::new(&only_consumer, "shop/web", 80, Some("evil")).is_empty());
}

#[test]
fn weights_split_requests_in_proportion() {
    let rule = Rule {
        name: None,
        matches: vec![Match::default()],
        filters: vec![],
        backends: vec![backend("v1", 70), backend("v2", 30), backend("off", 0)],
        timeouts: Timeouts::default(),
        retry: None,
    };
    // Evenly spread rolls stand for a uniform random source.
    let mut counts = std::collections::BTreeMap::new();
    for i in 0..1000u64 {
        let roll = ((i << 32).div_ceil(1000)) as u32;
        *counts.entry(rule.pick(roll).unwrap().target.service.clone()).or_insert(0) += 1;
    }
    assert_eq!(counts.get("shop/v1"), Some(&700));
    assert_eq!(counts.get("shop/v2"), Some(&300));
    assert_eq!(counts.get("shop/off"), None, "weight 0 is never picked");
    assert_eq!(rule.pick(u32::MAX).unwrap().target.service, "shop/v2", "the top of the range is in range");
    let none = Rule { backends: vec![backend("off", 0)], ..rule };
    assert!(none.pick(7).is_none(), "no weight, no backend");
}

#[test]
fn header_modifiers_set_add_and_remove() {
    let m = HeaderModifier {
        set: vec![("x-set".into(), "one".into())],
        add: vec![("x-add".into(), "two".into())],
        remove: vec!["x-drop".into()],
    };
    let mut headers = HeaderMap::new();
    headers.insert("x-set", "old".parse().unwrap());
    headers.insert("x-add", "first".parse().unwrap());
    headers.insert("x-drop", "gone".parse().unwrap());
    m.apply(&mut headers);
    assert_eq!(headers.get("x-set").unwrap(), "one");
    assert_eq!(headers.get_all("x-add").iter().collect::<Vec<_>>(), ["first", "two"]);
    assert!(headers.get("x-drop").is_none());
}

fn full_route() -> Route {
    let mut r = (*route(
        "full",
        42,
        vec![Rule {
            name: Some("canary".into()),
            matches: vec![Match {
                path: Some(PathMatch::Regex(anchored("/v[0-9]+/.*").unwrap())),
                headers: vec![ValueMatch { name: "env".into(), value: StringMatch::Regex(anchored("ca.*").unwrap()) }],
                query_params: vec![header("q", "1")],
                method: Some(Method::PUT),
            }],
            filters: vec![
                Filter::RequestHeaders(HeaderModifier { set: vec![("a".into(), "b".into())], ..Default::default() }),
                Filter::Redirect(Redirect {
                    scheme: Some("https".into()),
                    hostname: Some("example.com".into()),
                    path: Some(PathReplace::Prefix("/new".into())),
                    port: Some(8443),
                    status: 308,
                }),
                Filter::Mirror(Mirror {
                    backend: BackendRef { service: "shop/shadow".into(), port: 80 },
                    fraction: (1, 10),
                }),
            ],
            backends: vec![Backend {
                target: BackendRef { service: "shop/v2".into(), port: 8080 },
                weight: 10,
                filters: vec![Filter::Rewrite(Rewrite {
                    hostname: Some("v2".into()),
                    path: Some(PathReplace::Full("/".into())),
                })],
                refused: None,
            }],
            timeouts: Timeouts {
                request: Some(Duration::from_millis(1500)),
                backend_request: Some(Duration::from_millis(500)),
            },
            retry: Some(Retry { codes: vec![500, 503], attempts: 3, backoff: Duration::from_millis(100) }),
        }],
    ))
    .clone();
    r.parents = vec![Parent { service: "shop/web".into(), port: Some(8080) }];
    r
}

#[test]
fn a_route_survives_the_wire() {
    let r = full_route();
    let wire = proto::Route::from(&r);
    let back = Route::try_from(wire.clone()).unwrap();
    assert_eq!(proto::Route::from(&back), wire);
    assert_eq!(back.rules[0].matches[0].path.as_ref().map(|p| matches!(p, PathMatch::Regex(_))), Some(true));
    assert_eq!(back.rules[0].filters, r.rules[0].filters);
    assert_eq!(back.key(), "HTTPRoute shop/full");
}

#[test]
fn a_bad_route_on_the_wire_names_its_field() {
    let good = proto::Route::from(&full_route());
    type Spoil = Box<dyn Fn(&mut proto::Route)>;
    let cases: Vec<(Spoil, &str)> = vec![
        (Box::new(|r| r.kind = "TCPRoute".into()), "TCPRoute shop/full: field kind: not HTTPRoute or GRPCRoute"),
        (
            Box::new(|r| r.parents[0].port = 70000),
            "HTTPRoute shop/full: field parents[0].port: 70000 is not a port number",
        ),
        (
            Box::new(|r| r.rules[0].matches[0].path.as_mut().unwrap().value = "(".into()),
            "HTTPRoute shop/full: field rules[0].matches[0].path.value: regex parse error",
        ),
        (
            Box::new(|r| r.rules[0].matches[0].method = "GE T".into()),
            "HTTPRoute shop/full: field rules[0].matches[0].method: \"GE T\" is not a method",
        ),
        (
            Box::new(|r| {
                if let Some(proto::route_filter::Filter::Redirect(red)) = &mut r.rules[0].filters[1].filter {
                    red.status = 305;
                }
            }),
            "HTTPRoute shop/full: field rules[0].filters[1].status: 305 is not a redirect status",
        ),
        (
            Box::new(|r| r.rules[0].backends[0].service.clear()),
            "HTTPRoute shop/full: field rules[0].backends[0]: a Service needs a namespace and a name",
        ),
    ];
    for (spoil, want) in cases {
        let mut r = good.clone();
        spoil(&mut r);
        let e = Route::try_from(r).unwrap_err().to_string();
        assert!(e.starts_with(want), "{e}\n  does not start with\n{want}");
    }
}

#[test]
fn path_replacements_follow_the_gateway_api() {
    let prefix = |p: &str| path(PathMatch::Prefix(p.into()));
    // (replacement, the rule's PathPrefix, request path, result): the conformance cases of
    // HTTPRouteRewritePath and HTTPRouteRedirectPath, and the edges of segment joining.
    let cases = [
        (PathReplace::Prefix("/one".into()), "/prefix/one", "/prefix/one/two", "/one/two"),
        (PathReplace::Prefix("/".into()), "/strip-prefix", "/strip-prefix/three", "/three"),
        (PathReplace::Prefix("/".into()), "/strip-prefix", "/strip-prefix", "/"),
        (PathReplace::Prefix("/v2/".into()), "/api/", "/api/users?x", "/v2/users?x"),
        (PathReplace::Prefix("".into()), "/api", "/api", "/"),
        (PathReplace::Full("/one".into()), "/full", "/full/path/two", "/one"),
    ];
    for (replace, rule_prefix, request, want) in cases {
        assert_eq!(replace.apply(request, &prefix(rule_prefix)), want, "{replace:?} under {rule_prefix} on {request}");
    }
}

#[test]
fn redirect_locations_follow_the_gateway_api_port_rules() {
    let from = RedirectFrom { scheme: "http", host: "web.shop", port: 8080, path: "/a/b", query: Some("q=1") };
    let any = path(PathMatch::Prefix("/a".into()));
    let redirect = |scheme: Option<&str>, hostname: Option<&str>, port: Option<u16>, path: Option<PathReplace>| {
        Redirect { scheme: scheme.map(String::from), hostname: hostname.map(String::from), path, port, status: 302 }
    };
    let cases = [
        (redirect(None, Some("example.org"), None, None), "http://example.org:8080/a/b?q=1"),
        (redirect(Some("https"), None, None, None), "https://web.shop/a/b?q=1"),
        (redirect(Some("https"), None, Some(8443), None), "https://web.shop:8443/a/b?q=1"),
        (redirect(None, None, Some(80), None), "http://web.shop/a/b?q=1"),
        (redirect(Some("http"), None, None, None), "http://web.shop/a/b?q=1"),
        (redirect(None, None, None, Some(PathReplace::Prefix("/z".into()))), "http://web.shop:8080/z/b?q=1"),
        (redirect(None, None, None, Some(PathReplace::Full("/new".into()))), "http://web.shop:8080/new?q=1"),
    ];
    for (r, want) in cases {
        assert_eq!(r.location(&from, &any), want, "{r:?}");
    }
}

#[test]
fn rolls_split_every_run_of_requests_by_weight() {
    let r = Rule {
        name: None,
        matches: vec![Match::default()],
        filters: vec![],
        backends: vec![backend("web", 70), backend("canary", 30)],
        timeouts: Timeouts::default(),
        retry: None,
    };
    let rolls = Rolls::default();
    for run in [10usize, 100, 500, 5000] {
        let canary = (0..run).filter(|_| r.pick(rolls.next()).unwrap().target.service == "shop/canary").count();
        let want = run * 3 / 10;
        assert!(canary.abs_diff(want) <= 2, "{canary} of {run} to canary, want {want}");
    }
    // Every other request (another rule takes the rest) is split as well.
    let alternate: Vec<u32> = (0..1000).map(|_| rolls.next()).step_by(2).collect();
    let canary = alternate.iter().filter(|roll| r.pick(**roll).unwrap().target.service == "shop/canary").count();
    assert!(canary.abs_diff(150) <= 3, "{canary} of 500 alternate requests to canary");
}

#[test]
fn durations_read_as_gateway_api_writes_them() {
    let ok = [
        ("500ms", Some(Duration::from_millis(500))),
        ("10s", Some(Duration::from_secs(10))),
        ("1m30s", Some(Duration::from_secs(90))),
        ("1h2m3s4ms", Some(Duration::from_millis(3_723_004))),
        ("0s", None),
        ("0ms", None),
    ];
    for (text, want) in ok {
        assert_eq!(parse_duration(text), Ok(want), "{text}");
    }
    for bad in ["", "-1s", "1.5s", "10", "s", "1d", "123456s", "1h1m1s1ms1s", "10 s"] {
        let e = parse_duration(bad).unwrap_err();
        assert!(e.contains("is not a duration"), "{bad}: {e}");
    }
}

#[test]
fn the_default_retry_is_istios() {
    let retry = Retry::mesh_default();
    assert_eq!((retry.codes.as_slice(), retry.attempts), ([503].as_slice(), 2));
}
