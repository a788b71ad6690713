//! End-to-end waypoint: Services of a namespace bound to its waypoint (a Gateway of class
//! ferrymesh-waypoint, run as mesh-waypoint in a pod), the source agent carrying their traffic
//! over HBONE to it, the waypoint routing each request by Gateway API routes and carrying it over
//! HBONE to the endpoint with its own identity. Real curl, real WebSocket, real processes on the
//! netns topology. Needs root.

use std::collections::BTreeMap;
use std::time::Duration;

use ferrymesh_testbed::mesh::{
    bin, wait_until, CONFIG_WAIT, DATAPLANE_MODE, ECHO_GRPC_PORT, ECHO_HTTP_PORT, FLOW_WAIT, VECTOR_MEMCPY,
};
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
    // It runs with glibc's vector memcpy (ferrymesh_dataplane::memcpy).
    let environment = topo.environment("waypoint-waypoint");
    assert!(environment.contains(&VECTOR_MEMCPY.to_string()), "{environment:?}");

    // Counted with Istio's labels.
    let text = topo.metrics_text(&waypoint.netns);
    let scrape = ferrymesh_testbed::prom::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let labels = [
        ("reporter", "waypoint"),
        ("source_workload", "a"),
        ("source_principal", CLIENT_ID),
        ("destination_service", "shop/web"),
        ("destination_workload_namespace", "shop"),
        ("request_protocol", "http"),
        ("response_code", "200"),
        ("connection_security_policy", "mutual_tls"),
    ];
    assert!(scrape.sum("ferrymesh_requests_total", &labels) >= 40.0, "{text}");
    assert!(scrape.sum("ferrymesh_request_duration_milliseconds_count", &labels) >= 40.0, "{text}");
    let to_web_2 =
        [("destination_workload", "web-2"), ("destination_principal", "spiffe://cluster.local/ns/shop/sa/web-2")];
    assert!(scrape.sum("ferrymesh_requests_total", &to_web_2) >= 1.0, "{text}");

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

    // A second waypoint replica that refuses connections (nothing listens on 15008 at its
    // address, node 2's own): each connection that tries it first goes on to the other one,
    // with an attempt flow; no client fails.
    let gone = topo
        .pod_yaml(waypoint, &[(ferrymesh_testbed::mesh::GATEWAY_NAME_LABEL, "waypoint")])
        .replace("name: waypoint\n", "name: waypoint-gone\n")
        .replace("uid: uid-", "uid: gone-")
        .replace(&format!("podIP: {}", waypoint.ip), "podIP: 172.18.0.2");
    topo.write_config_file("pod-shop-waypoint-gone.yaml", &gone);
    wait_until(CONFIG_WAIT, "the second waypoint address", || {
        let out = topo.meshctl_all(1, &["explain", "shop/a", "shop/web:80"]);
        String::from_utf8_lossy(&out.stdout).contains("172.18.0.2")
    });
    let hits = topo.hits(a, format!("{WEB}:80").parse().unwrap(), 20);
    assert_eq!((hits["ok"].as_u64(), hits["failed"].as_u64()), (Some(20), Some(0)), "{hits}");
    wait_until(FLOW_WAIT, "an attempt flow on the gone replica", || {
        topo.flows(1).iter().any(|f| {
            f["dst"]["ip"] == "172.18.0.2"
                && f["dst"]["port"] == 15008
                && f["reason"].as_str().is_some_and(|r| r.starts_with("endpoint attempt 1 of 2 failed"))
        })
    });
}

/// An HTTPRoute `shop/<name>` attached to Service web (on `port`, or every port), with `rules`
/// (YAML, indented under `rules:`).
fn web_route(name: &str, port: Option<u16>, rules: &str) -> String {
    let port = port.map(|p| format!("\n    port: {p}")).unwrap_or_default();
    format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: web{port}\n  rules:\n{rules}"
    )
}

/// The routes of the conformance table, as Gateway API's mesh conformance suite has them,
/// adapted to Services web (web-1, web-2) and canary.
fn conformance_routes(topo: &Topology) {
    // MeshHTTPRouteWeight and MeshPorts: a 70/30 split on port 8080 only.
    let weight = "  - backendRefs:\n    - name: web\n      port: 80\n      weight: 70\n    - name: canary\n      port: 80\n      weight: 30\n";
    topo.write_config_file("route-weight.yaml", &web_route("weight", Some(8080), weight));
    // MeshHTTPRouteMatching, MeshHTTPRouteQueryParamMatching, MeshHTTPRouteNamedRule, and a
    // header-based canary.
    let to = |svc: &str| format!("    backendRefs:\n    - name: {svc}\n      port: 80\n");
    let matching = [
        ("header-canary", "    - headers:\n      - name: x-canary\n        value: \"true\"\n", "canary"),
        ("v2", "    - path:\n        type: PathPrefix\n        value: /v2\n", "canary"),
        ("exact", "    - path:\n        type: Exact\n        value: /exact\n", "canary"),
        ("regex", "    - path:\n        type: RegularExpression\n        value: /re/[0-9]+\n", "canary"),
        (
            "query",
            "    - path:\n        type: PathPrefix\n        value: /q\n      queryParams:\n      - name: animal\n        value: whale\n",
            "canary",
        ),
        ("method", "    - path:\n        type: PathPrefix\n        value: /m\n      method: POST\n", "canary"),
        ("default", "    - path:\n        type: PathPrefix\n        value: /\n", "web"),
    ]
    .iter()
    .map(|(name, m, svc)| format!("  - name: {name}\n    matches:\n{m}{}", to(svc)))
    .collect::<String>();
    topo.write_config_file("route-matching.yaml", &web_route("matching", Some(80), &matching));
    // MeshHTTPRouteRequestHeaderModifier, MeshHTTPRouteBackendRequestHeaderModifier and a
    // response header change.
    let modifiers = "  - matches:\n    - path:\n        type: PathPrefix\n        value: /headers\n    filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier:\n        set:\n        - name: X-Header-Set\n          value: set-overwrites-values\n        add:\n        - name: X-Header-Add\n          value: header-val-1\n        remove:\n        - X-Header-Remove\n    - type: ResponseHeaderModifier\n      responseHeaderModifier:\n        set:\n        - name: X-Response\n          value: from-the-route\n    backendRefs:\n    - name: web\n      port: 80\n      filters:\n      - type: RequestHeaderModifier\n        requestHeaderModifier:\n          set:\n          - name: X-Backend\n            value: web\n";
    topo.write_config_file("route-modifiers.yaml", &web_route("modifiers", Some(80), modifiers));
    // The redirect cases: hostname, path (full and prefix), port, scheme, status codes.
    let redirect = |prefix: &str, spec: &str| {
        format!("  - matches:\n    - path:\n        type: PathPrefix\n        value: {prefix}\n    filters:\n    - type: RequestRedirect\n      requestRedirect:\n{spec}")
    };
    let redirects = [
        redirect("/hostname-redirect", "        hostname: example.org\n"),
        redirect("/full-path", "        path:\n          type: ReplaceFullPath\n          replaceFullPath: /new\n"),
        redirect(
            "/prefix-path",
            "        path:\n          type: ReplacePrefixMatch\n          replacePrefixMatch: /replaced\n",
        ),
        redirect("/port-redirect", "        port: 8083\n"),
        redirect("/scheme-redirect", "        scheme: https\n"),
        redirect("/status-301", "        statusCode: 301\n"),
        redirect("/status-303", "        statusCode: 303\n"),
        redirect("/status-307", "        statusCode: 307\n"),
        redirect("/status-308", "        statusCode: 308\n"),
    ]
    .concat();
    topo.write_config_file("route-redirects.yaml", &web_route("redirects", Some(80), &redirects));
    // MeshHTTPRouteRewritePath, and a host rewrite.
    let rewrite = |prefix: &str, spec: &str| {
        format!("  - matches:\n    - path:\n        type: PathPrefix\n        value: {prefix}\n    filters:\n    - type: URLRewrite\n      urlRewrite:\n{spec}    backendRefs:\n    - name: web\n      port: 80\n")
    };
    let rewrites = [
        rewrite(
            "/prefix/one",
            "        path:\n          type: ReplacePrefixMatch\n          replacePrefixMatch: /one\n",
        ),
        rewrite(
            "/strip-prefix",
            "        path:\n          type: ReplacePrefixMatch\n          replacePrefixMatch: /\n",
        ),
        rewrite("/full/path", "        path:\n          type: ReplaceFullPath\n          replaceFullPath: /one\n"),
        rewrite("/rewrite-host", "        hostname: rewritten.example\n"),
    ]
    .concat();
    topo.write_config_file("route-rewrites.yaml", &web_route("rewrites", Some(80), &rewrites));
    // HTTPRouteRequestMirror: a copy of each request to canary, the answer from web.
    let mirror = "  - matches:\n    - path:\n        type: PathPrefix\n        value: /mirror\n    filters:\n    - type: RequestMirror\n      requestMirror:\n        backendRef:\n          name: canary\n          port: 80\n    backendRefs:\n    - name: web\n      port: 80\n";
    topo.write_config_file("route-mirror.yaml", &web_route("mirror", Some(80), mirror));
    let held = |node: u8| {
        let out = topo.meshctl(node, &["routes", "-o", "json"]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        ["weight", "matching", "modifiers", "redirects", "rewrites", "mirror"]
            .iter()
            .all(|r| text.contains(&format!("\"{r}\"")))
    };
    wait_until(CONFIG_WAIT, "every agent to hold the routes", || held(1) && held(2));
}

/// What a case expects of the answer.
enum Expect {
    /// 200 from one of these pods, with these (header, values) seen by the backend, and this
    /// path and host (when given).
    Served {
        pods: &'static [&'static str],
        path: Option<&'static str>,
        host: Option<&'static str>,
        headers: Vec<(&'static str, Vec<&'static str>)>,
    },
    /// A redirect with this status and Location.
    Redirect(u16, &'static str),
}

#[test]
fn gateway_api_mesh_conformance_cases_pass_through_the_waypoint() {
    let topo = waypoint_cluster();
    conformance_routes(&topo);
    let a = topo.pod("shop", "a");
    let web = ["web-1", "web-2"].as_slice();
    let canary = ["canary"].as_slice();
    let served = |pods, path, host| Expect::Served { pods, path, host, headers: vec![] };
    let web_1 = format!("http://{}:{ECHO_HTTP_PORT}", topo.pod("shop", "web-1").ip);
    // (case, URL, curl arguments, expected)
    let cases: Vec<(&str, String, Vec<&str>, Expect)> = vec![
        ("MeshBasic", format!("http://{CANARY}/"), vec![], served(canary, Some("/"), Some(CANARY))),
        ("MeshHTTPRouteMatching default", format!("http://{WEB}/"), vec![], served(web, Some("/"), None)),
        (
            "HTTP/1.0 without Host",
            format!("http://{WEB}/"),
            vec!["--http1.0", "-H", "Host:"],
            served(web, Some("/"), None),
        ),
        ("MeshHTTPRouteMatching prefix", format!("http://{WEB}/v2/x"), vec![], served(canary, Some("/v2/x"), None)),
        ("MeshHTTPRouteMatching prefix is by segment", format!("http://{WEB}/v2x"), vec![], served(web, None, None)),
        ("MeshHTTPRouteMatching exact", format!("http://{WEB}/exact"), vec![], served(canary, None, None)),
        ("MeshHTTPRouteMatching exact is exact", format!("http://{WEB}/exact/more"), vec![], served(web, None, None)),
        ("MeshHTTPRouteMatching regex", format!("http://{WEB}/re/42"), vec![], served(canary, None, None)),
        ("MeshHTTPRouteMatching regex is anchored", format!("http://{WEB}/re/4x"), vec![], served(web, None, None)),
        ("header canary", format!("http://{WEB}/"), vec!["-H", "x-canary: true"], served(canary, None, None)),
        (
            "header canary needs the value",
            format!("http://{WEB}/"),
            vec!["-H", "x-canary: no"],
            served(web, None, None),
        ),
        ("MeshHTTPRouteMatching method", format!("http://{WEB}/m"), vec!["-X", "POST"], served(canary, None, None)),
        ("MeshHTTPRouteMatching other method", format!("http://{WEB}/m"), vec![], served(web, None, None)),
        (
            "MeshHTTPRouteQueryParamMatching",
            format!("http://{WEB}/q?animal=whale"),
            vec![],
            served(canary, Some("/q?animal=whale"), None),
        ),
        (
            "MeshHTTPRouteQueryParamMatching other value",
            format!("http://{WEB}/q?animal=dolphin"),
            vec![],
            served(web, None, None),
        ),
        (
            "MeshHTTPRouteRequestHeaderModifier and backend modifier",
            format!("http://{WEB}/headers"),
            vec!["-H", "X-Header-Set: some-other-value", "-H", "X-Header-Add: client", "-H", "X-Header-Remove: gone"],
            Expect::Served {
                pods: web,
                path: None,
                host: None,
                headers: vec![
                    ("x-header-set", vec!["set-overwrites-values"]),
                    ("x-header-add", vec!["client", "header-val-1"]),
                    ("x-header-remove", vec![]),
                    ("x-backend", vec!["web"]),
                ],
            },
        ),
        (
            "redirect hostname",
            format!("http://{WEB}/hostname-redirect"),
            vec![],
            Expect::Redirect(302, "http://example.org/hostname-redirect"),
        ),
        (
            "redirect full path",
            format!("http://{WEB}/full-path/x?k=v"),
            vec![],
            Expect::Redirect(302, "http://10.96.0.50/new?k=v"),
        ),
        (
            "redirect prefix path",
            format!("http://{WEB}/prefix-path/x"),
            vec![],
            Expect::Redirect(302, "http://10.96.0.50/replaced/x"),
        ),
        (
            "redirect port",
            format!("http://{WEB}/port-redirect"),
            vec![],
            Expect::Redirect(302, "http://10.96.0.50:8083/port-redirect"),
        ),
        (
            "redirect scheme",
            format!("http://{WEB}/scheme-redirect"),
            vec![],
            Expect::Redirect(302, "https://10.96.0.50/scheme-redirect"),
        ),
        (
            "redirect 301",
            format!("http://{WEB}/status-301"),
            vec![],
            Expect::Redirect(301, "http://10.96.0.50/status-301"),
        ),
        (
            "redirect 303",
            format!("http://{WEB}/status-303"),
            vec![],
            Expect::Redirect(303, "http://10.96.0.50/status-303"),
        ),
        (
            "redirect 307",
            format!("http://{WEB}/status-307"),
            vec![],
            Expect::Redirect(307, "http://10.96.0.50/status-307"),
        ),
        (
            "redirect 308",
            format!("http://{WEB}/status-308"),
            vec![],
            Expect::Redirect(308, "http://10.96.0.50/status-308"),
        ),
        (
            "MeshHTTPRouteRewritePath prefix",
            format!("http://{WEB}/prefix/one/two"),
            vec![],
            served(web, Some("/one/two"), None),
        ),
        (
            "MeshHTTPRouteRewritePath strip prefix",
            format!("http://{WEB}/strip-prefix/three"),
            vec![],
            served(web, Some("/three"), None),
        ),
        (
            "MeshHTTPRouteRewritePath full",
            format!("http://{WEB}/full/path/two"),
            vec![],
            served(web, Some("/one"), None),
        ),
        ("rewrite host", format!("http://{WEB}/rewrite-host"), vec![], served(web, None, Some("rewritten.example"))),
        // MeshFrontend: a pod addressed directly is not the Service: no rule applies.
        (
            "MeshFrontend",
            format!("{web_1}/v2/x"),
            vec!["-H", "x-canary: true"],
            served(["web-1"].as_slice(), Some("/v2/x"), None),
        ),
        // MeshPorts: the 8080 route splits, the port-80 rules do not apply to 8080.
        (
            "MeshPorts",
            format!("http://{WEB}:8080/v2/x"),
            vec!["-H", "x-canary: true"],
            served(&["web-1", "web-2", "canary"], None, None),
        ),
    ];
    let mut failures = Vec::new();
    for (case, url, args, expect) in &cases {
        let answer = topo.http(a, url, args);
        let problem = match expect {
            Expect::Redirect(status, location) => (answer.status != *status
                || answer.header("location") != Some(location))
            .then(|| format!("want {status} to {location}, got {} to {:?}", answer.status, answer.header("location"))),
            Expect::Served { pods, path, host, headers } => {
                if answer.status != 200 {
                    Some(format!("status {}: {} {}", answer.status, answer.body, answer.error))
                } else {
                    let body = answer.json();
                    let mut wrong = Vec::new();
                    if !pods.contains(&body["pod"].as_str().unwrap_or_default()) {
                        wrong.push(format!("answered by {} not {pods:?}", body["pod"]));
                    }
                    if path.is_some_and(|p| body["path"] != p) {
                        wrong.push(format!("path {} not {path:?}", body["path"]));
                    }
                    if host.is_some_and(|h| body["host"] != h) {
                        wrong.push(format!("host {} not {host:?}", body["host"]));
                    }
                    for (name, values) in headers {
                        let seen: Vec<&str> = body["headers"][name]
                            .as_array()
                            .map(|v| v.iter().filter_map(|s| s.as_str()).collect())
                            .unwrap_or_default();
                        if seen != *values {
                            wrong.push(format!("header {name} {seen:?} not {values:?}"));
                        }
                    }
                    (!wrong.is_empty()).then(|| wrong.join("; "))
                }
            }
        };
        if let Some(problem) = problem {
            failures.push(format!("{case} ({url}): {problem}"));
        }
    }
    assert!(failures.is_empty(), "{} of {} cases failed:\n{}", failures.len(), cases.len(), failures.join("\n"));

    // The response modifier, on the client's side.
    let answer = topo.http(a, &format!("http://{WEB}/headers"), &[]);
    assert_eq!(answer.header("x-response"), Some("from-the-route"), "{answer:?}");

    // HTTPRouteRequestMirror: web answers; canary gets a copy, its host `-shadow` as Envoy sends
    // it, a POST with its body.
    let answer = topo.http(a, &format!("http://{WEB}/mirror/get"), &[]);
    assert_eq!(answer.status, 200, "{answer:?}");
    assert!(web.contains(&answer.json()["pod"].as_str().unwrap_or_default()), "{answer:?}");
    let posted = topo.http(a, &format!("http://{WEB}/mirror/post"), &["-X", "POST", "--data", "twelve bytes"]);
    assert_eq!((posted.status, posted.json()["body_bytes"].as_u64()), (200, Some(12)), "{posted:?}");
    let canary_pod = topo.pod("shop", "canary");
    wait_until(FLOW_WAIT, "the mirrored copies at canary", || {
        let seen = topo.echo_requests(canary_pod);
        ["/mirror/get", "/mirror/post"].iter().all(|p| seen.iter().any(|r| r["path"] == *p))
    });
    let copies = topo.echo_requests(canary_pod);
    let copy = copies.iter().find(|r| r["path"] == "/mirror/post").unwrap();
    assert_eq!(copy["host"], format!("{WEB}-shadow"), "{copy}");
    assert_eq!((copy["method"].as_str(), copy["body_bytes"].as_u64()), (Some("POST"), Some(12)), "{copy}");

    // MeshHTTPRouteWeight: 70/30 within 5 points over 500 requests.
    let pods = topo.echo_pods(a, &format!("http://{WEB}:8080/"), 500, &[]);
    let to_canary = pods.iter().filter(|p| *p == "canary").count();
    assert_eq!(pods.len(), 500);
    assert!((125..=175).contains(&to_canary), "30% of 500 is 150 (±25): {to_canary} went to canary");

    // MeshHTTPRouteNamedRule: the request record names the rule.
    let waypoint = topo.pod("shop", "waypoint");
    wait_until(FLOW_WAIT, "the records of the 500 requests", || {
        topo.waypoint_requests(waypoint).iter().filter(|r| r["port"] == 8080).count() >= 500
    });
    let records = topo.waypoint_requests(waypoint);
    let v2 = records.iter().find(|r| r["path"] == "/v2/x" && r["port"] == 80).expect("the /v2/x request's record");
    assert_eq!(v2["route"], "HTTPRoute shop/matching rule v2", "{v2}");
    assert_eq!(v2["backend"], "shop/canary:80", "{v2}");
    let redirect = records.iter().find(|r| r["path"] == "/status-301").expect("the redirect's record");
    assert_eq!(redirect["status"], 301, "{redirect}");
}

#[test]
fn websocket_http2_endpoint_loss_and_failing_closed() {
    let topo = waypoint_cluster();
    let (a, waypoint) = (topo.pod("shop", "a"), topo.pod("shop", "waypoint"));

    // A WebSocket through the waypoint: the upgrade is passed through, messages echo.
    let out = topo.output_in(
        &a.netns,
        ferrymesh_testbed::mesh::bin("fm-echo"),
        &["ws", "--to", &format!("{WEB}:80"), "--messages", "20"],
    );
    let ws = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "WebSocket through the waypoint: {ws} {}", String::from_utf8_lossy(&out.stderr));
    assert!(ws.contains("\"echoed\":20") && ws.contains("\"status\":101"), "{ws}");

    // HTTP/2 (prior knowledge): 40 requests, 8 at a time multiplexed on one connection
    // (h2load), spread over the endpoints per request.
    let out = topo.output_in(&a.netns, "h2load", &["-n", "40", "-c", "1", "-m", "8", &format!("http://{WEB}/")]);
    let report = String::from_utf8_lossy(&out.stdout);
    assert!(report.contains("status codes: 40 2xx"), "h2load through the waypoint: {report}");
    wait_until(FLOW_WAIT, "HTTP/2 request records", || {
        topo.waypoint_requests(waypoint).iter().filter(|r| r["protocol"] == "HTTP/2").count() >= 40
    });
    let records = topo.waypoint_requests(waypoint);
    let h2: Vec<&serde_json::Value> = records.iter().filter(|r| r["protocol"] == "HTTP/2").collect();
    let clients: std::collections::BTreeSet<&str> = h2.iter().filter_map(|r| r["source_addr"].as_str()).collect();
    let upstreams: std::collections::BTreeSet<&str> = h2.iter().filter_map(|r| r["upstream"].as_str()).collect();
    assert_eq!(clients.len(), 1, "one client connection: {clients:?}");
    assert_eq!(upstreams.len(), 2, "its requests went to both endpoints: {upstreams:?}");

    // An endpoint leaving mid-load (unready, then its server gone) costs no request.
    let mut load = topo.command_in(&a.netns, "curl");
    load.args(["-sS", "--max-time", "60", "--rate", "100/s", "-w", "\\n"]);
    load.args(std::iter::repeat_n(format!("http://{WEB}/"), 400));
    topo.spawn("load", load);
    let answered = || topo.log("load").lines().filter(|l| l.starts_with('{')).count();
    wait_until(Duration::from_secs(10), "the load to be under way", || answered() >= 20);
    let web_2 = topo.pod("shop", "web-2");
    let unready = topo.pod_yaml(web_2, &[("app", "web")]) + "  conditions:\n  - type: Ready\n    status: \"False\"\n";
    let before = topo.status(1)["config_version"].as_u64().unwrap();
    topo.write_config_file(&format!("pod-shop-{}.yaml", web_2.name), &unready);
    // The waypoint holds the change once it has applied a newer version than the agents held.
    wait_until(CONFIG_WAIT, "the waypoint to hold web-2 unready", || {
        topo.log_lines("waypoint-waypoint").iter().any(|l| {
            l.contains("config applied")
                && l.split("version=").nth(1).and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                    > Some(before)
        })
    });
    let at_unready = answered();
    wait_until(Duration::from_secs(10), "the load to go on", || answered() >= at_unready + 20);
    topo.signal_and_wait("echo-shop-web-2", libc::SIGKILL);
    wait_until(Duration::from_secs(30), "the load to finish", || !topo.is_running("load"));
    let answers: Vec<String> = topo.log("load").lines().filter(|l| l.starts_with('{')).map(String::from).collect();
    let failed: Vec<&str> = topo.log("load").lines().filter(|l| l.starts_with("curl:")).map(|_| "x").collect();
    assert_eq!((answers.len(), failed.len()), (400, 0), "every request answered: {}", topo.log("load"));
    let last = answers.last().unwrap();
    assert!(last.contains("\"pod\":\"web-1\""), "after web-2 left, web-1 answers: {last}");

    // No waypoint ready: the Service's traffic is refused, not sent around the waypoint, and the
    // client's flow says why.
    std::fs::remove_file(topo.config_dir().join("pod-shop-waypoint.yaml")).unwrap();
    wait_until(CONFIG_WAIT, "the waypoint to have no address", || {
        let refused = topo.http(a, &format!("http://{WEB}/"), &[]);
        refused.status == 0
    });
    let explained =
        String::from_utf8_lossy(&topo.meshctl_all(1, &["explain", "shop/a", "shop/web:80"]).stdout).into_owned();
    assert!(explained.contains("waypoint: shop/waypoint has no ready address"), "{explained}");
    wait_until(FLOW_WAIT, "the refusal's flow", || {
        topo.flows(1).iter().any(|f| {
            f["service"] == "shop/web"
                && f["reason"] == "service shop/web is bound to waypoint shop/waypoint, which has no ready address"
        })
    });
}

#[test]
fn l7_authorization_policies_at_the_waypoint_name_the_deciding_rule() {
    let topo = waypoint_cluster();
    let on_web = |name: &str, spec: &str| {
        topo.write_config_file(
            &format!("policy-{name}.yaml"),
            &format!(
                "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  targetRefs:\n  - group: \"\"\n    kind: Service\n    name: web\n{spec}"
            ),
        );
    };
    on_web("deny-admin", "  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin/*\"]\n");
    on_web("deny-delete", "  action: DENY\n  rules:\n  - to:\n    - operation:\n        methods: [DELETE]\n");
    on_web(
        "allow-reads",
        "  rules:\n  - from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/a]\n    to:\n    - operation:\n        methods: [GET]\n        notPaths: [\"*.secret\"]\n",
    );
    on_web("allow-token", "  rules:\n  - when:\n    - key: request.headers[x-token]\n      values: [\"ok-*\"]\n");
    on_web(
        "allow-api-host",
        "  rules:\n  - to:\n    - operation:\n        hosts: [api.shop]\n        paths: [/exact]\n",
    );
    wait_until(CONFIG_WAIT, "the waypoint to deny DELETE", || {
        topo.http(topo.pod("shop", "a"), &format!("http://{WEB}/"), &["-X", "DELETE"]).status == 403
    });
    let (a, canary) = (topo.pod("shop", "a"), topo.pod("shop", "canary"));
    // (client, path, curl arguments, status, deciding policy)
    let cases: [(&ferrymesh_testbed::Pod, &str, &[&str], u16, &str); 9] = [
        (a, "/", &[], 200, "shop/allow-reads rule 0"),
        (a, "/admin/users", &[], 403, "shop/deny-admin rule 0"),
        (a, "/", &["-X", "DELETE", "-H", "x-token: ok-1"], 403, "shop/deny-delete rule 0"),
        (a, "/keys.secret", &[], 403, "no ALLOW policy matched"),
        (a, "/", &["-X", "POST"], 403, "no ALLOW policy matched"),
        (a, "/", &["-X", "POST", "-H", "x-token: ok-1"], 200, "shop/allow-token rule 0"),
        (a, "/exact", &["-X", "PUT", "-H", "Host: api.shop"], 200, "shop/allow-api-host rule 0"),
        (a, "/exact", &["-X", "PUT", "-H", "Host: other.shop"], 403, "no ALLOW policy matched"),
        (canary, "/", &[], 403, "no ALLOW policy matched"),
    ];
    let waypoint = topo.pod("shop", "waypoint");
    let mut failures = Vec::new();
    for (i, (client, path, args, status, policy)) in cases.iter().enumerate() {
        let answer = topo.http(client, &format!("http://{WEB}{path}"), args);
        if answer.status != *status {
            failures.push(format!("case {i} {path} {args:?}: status {} not {status}: {}", answer.status, answer.body));
            continue;
        }
        if *status == 403 && !answer.body.contains(policy) {
            failures.push(format!("case {i}: the 403 does not name {policy}: {}", answer.body));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
    // The access log names the deciding rule of each request.
    wait_until(FLOW_WAIT, "the denial records", || {
        topo.waypoint_requests(waypoint).iter().filter(|r| r["status"] == 403).count() >= 6
    });
    let records = topo.waypoint_requests(waypoint);
    let admin = records.iter().find(|r| r["path"] == "/admin/users").expect("the /admin/users record");
    assert_eq!(admin["policy"], "shop/deny-admin rule 0", "{admin}");
    assert_eq!(admin["response_flags"], "DENY", "{admin}");
    let read = records.iter().find(|r| r["path"] == "/" && r["status"] == 200 && r["method"] == "GET").unwrap();
    assert_eq!(read["policy"], "shop/allow-reads rule 0", "{read}");

    // meshctl explain follows a request through the waypoint hop, by the same decision code.
    let explain = |args: &[&str]| {
        let mut all = vec!["explain", "shop/a", "shop/web:80"];
        all.extend_from_slice(args);
        let out = topo.meshctl_all(1, &all);
        assert!(out.status.success(), "meshctl explain {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let denied = explain(&["--path", "/admin/users"]);
    assert!(denied.contains("verdict:  DENIED, 403 (shop/deny-admin rule 0)"), "{denied}");
    assert!(denied.contains(&format!("the waypoint proves {WAYPOINT_ID}")), "{denied}");
    let allowed = explain(&[]);
    assert!(allowed.contains("ALLOW shop/allow-reads: rule 0 matches: allowed"), "{allowed}");
    assert!(allowed.contains("route:    no route is attached: the Service itself"), "{allowed}");
    assert!(allowed.contains("endpoint (from the waypoint): shop/web-2 at 10.244.2.2:8081: ALLOWED"), "{allowed}");
    let json: serde_json::Value = serde_json::from_str(&explain(&["--method", "DELETE", "-o", "json"])).unwrap();
    assert_eq!(json["waypoint_policy"]["policy"], "shop/deny-delete rule 0", "{json}");
    // No RequestAuthentication is attached: a token is not read, and decides nothing.
    let with_token = explain(&["--jwt-claims", r#"{"iss": "https://issuer.test", "sub": "x"}"#]);
    assert!(with_token.contains("no RequestAuthentication is attached: tokens are not read"), "{with_token}");
    assert!(with_token.contains("ALLOW shop/allow-reads: rule 0 matches: allowed"), "{with_token}");

    // meshctl requests reads the waypoint's log, filtered.
    let meshctl = |args: &[&str]| {
        std::process::Command::new(bin("meshctl"))
            .arg("requests")
            .arg("--log")
            .arg(topo.log_path("waypoint-waypoint"))
            .args(args)
            .output()
            .expect("run meshctl")
    };
    let out = meshctl(&["--status", "4xx", "--path", "/admin", "-o", "json"]);
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["policy"], "shop/deny-admin rule 0");
    let table = String::from_utf8_lossy(&meshctl(&["--method", "DELETE", "--status", "403"]).stdout).into_owned();
    let rows: Vec<&str> = table.lines().skip(1).collect();
    assert!(!rows.is_empty(), "{table}");
    assert!(rows.iter().all(|r| r.contains("DENY: denied: shop/deny-delete rule 0")), "{table}");
    let bad = meshctl(&["--status", "9xx"]);
    let error = String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success() && error.lines().count() == 1 && error.contains("9xx"), "{error}");
}

#[test]
fn grpc_routes_split_by_weight_and_modify_headers_with_a_real_grpc_client() {
    let topo = waypoint_cluster();
    let grpc = ECHO_GRPC_PORT.to_string();
    topo.write_service("shop", "grpc", "10.96.0.53", &[("app", "web")], &[("grpc", ECHO_GRPC_PORT, &grpc)]);
    topo.write_service("shop", "grpc-canary", "10.96.0.54", &[("app", "canary")], &[("grpc", ECHO_GRPC_PORT, &grpc)]);
    for name in ["web-1", "web-2", "canary"] {
        topo.serve_grpc(topo.pod("shop", name));
    }
    // MeshGRPCRouteWeight and MeshGRPCRouteRequestHeaderModifier, on one rule.
    let route = format!(
        "apiVersion: gateway.networking.k8s.io/v1\nkind: GRPCRoute\nmetadata:\n  name: grpc-split\n  namespace: shop\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: grpc\n    port: {ECHO_GRPC_PORT}\n  rules:\n  - matches:\n    - method:\n        service: ferrymesh.test.Echo\n        method: Echo\n    filters:\n    - type: RequestHeaderModifier\n      requestHeaderModifier:\n        add:\n        - name: x-added\n          value: by-route\n        remove:\n        - x-removed\n    backendRefs:\n    - name: grpc\n      port: {ECHO_GRPC_PORT}\n      weight: 70\n    - name: grpc-canary\n      port: {ECHO_GRPC_PORT}\n      weight: 30\n"
    );
    topo.write_config_file("route-grpc.yaml", &route);
    let a = topo.pod("shop", "a");
    let to = format!("10.96.0.53:{ECHO_GRPC_PORT}");
    let call = |count: &str| {
        let out = topo.output_in(&a.netns, bin("fm-echo"), &["grpc", "--to", &to, "--count", count]);
        assert!(out.status.success(), "gRPC through the waypoint: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("grpc JSON")
    };
    wait_until(CONFIG_WAIT, "the GRPCRoute to apply", || call("1")["metadata"]["x-added"] == "by-route");
    let answer = call("500");
    let canary = answer["pods"]["canary"].as_u64().unwrap_or(0);
    let web = answer["pods"]["web-1"].as_u64().unwrap_or(0) + answer["pods"]["web-2"].as_u64().unwrap_or(0);
    assert_eq!(canary + web, 500, "{answer}");
    assert!((125..=175).contains(&canary), "30% of 500 is 150 (±25): {answer}");
    assert_eq!(answer["metadata"]["x-added"], "by-route", "{answer}");
    // The waypoint knows it for gRPC, with the status from the trailers.
    let waypoint = topo.pod("shop", "waypoint");
    wait_until(FLOW_WAIT, "the gRPC records", || {
        topo.waypoint_requests(waypoint).iter().filter(|r| r["service"] == "shop/grpc").count() >= 501
    });
    let records = topo.waypoint_requests(waypoint);
    let last = records.iter().rev().find(|r| r["service"] == "shop/grpc").expect("a gRPC record");
    assert_eq!(last["protocol"], "HTTP/2", "{last}");
    assert_eq!(last["grpc_status"], "0", "{last}");
    assert_eq!(last["route"], "GRPCRoute shop/grpc-split rule 0", "{last}");
    let text = topo.metrics_text(&waypoint.netns);
    let scrape = ferrymesh_testbed::prom::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let ok = [("request_protocol", "grpc"), ("grpc_response_status", "0"), ("destination_service", "shop/grpc")];
    assert!(scrape.sum("ferrymesh_requests_total", &ok) >= 500.0, "{text}");
}

#[test]
fn pods_bound_to_a_waypoint_of_workloads_are_reached_through_it() {
    let topo = waypoint_cluster();
    let (a, waypoint) = (topo.pod("shop", "a"), topo.pod("shop", "waypoint"));
    let (web_1, web_2) = (topo.pod("shop", "web-1"), topo.pod("shop", "web-2"));
    // The waypoint takes all traffic: the namespace's label now binds its pods too. web-1 opts
    // out; Service canary opts out, but its pod is bound.
    topo.write_waypoint_for("shop", "waypoint", "all");
    topo.write_pod(web_1, &[("app", "web"), ("ferrymesh.io/use-waypoint", "none")]);
    topo.write_config_file(
        "svc-shop-canary.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: canary\n  namespace: shop\n  labels:\n    ferrymesh.io/use-waypoint: none\nspec:\n  clusterIP: {CANARY}\n  selector:\n    app: canary\n  ports:\n  - name: http\n    port: 80\n    targetPort: {ECHO_HTTP_PORT}\n"
        ),
    );
    topo.write_config_file(
        "policy-deny-private.yaml",
        "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-private\n  namespace: shop\nspec:\n  targetRefs:\n  - group: gateway.networking.k8s.io\n    kind: Gateway\n    name: waypoint\n  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/private/*\"]\n",
    );
    let to_web_2 = |path: &str| topo.http(a, &format!("http://{}:{ECHO_HTTP_PORT}{path}", web_2.ip), &[]);
    wait_until(CONFIG_WAIT, "requests to web-2's address to pass the waypoint's policy", || {
        to_web_2("/private/x").status == 403
    });

    // Addressed to the pod: through the waypoint (its Gateway's policy applies), to that pod.
    let denied = to_web_2("/private/x");
    assert!(denied.body.contains("shop/deny-private rule 0"), "{denied:?}");
    let served = to_web_2("/public");
    assert_eq!(served.status, 200, "{served:?}");
    assert_eq!(served.json()["pod"], "web-2", "{served:?}");
    // Through Service canary (not bound itself): to its endpoint's waypoint, addressed to the pod.
    let canary = topo.http(a, &format!("http://{CANARY}/via-service"), &[]);
    assert_eq!((canary.status, canary.json()["pod"].as_str()), (200, Some("canary")), "{canary:?}");
    // web-1 opted out: reached directly, the waypoint not involved.
    let direct = topo.http(a, &format!("http://{}:{ECHO_HTTP_PORT}/opted-out", web_1.ip), &[]);
    assert_eq!((direct.status, direct.json()["pod"].as_str()), (200, Some("web-1")), "{direct:?}");

    wait_until(FLOW_WAIT, "the workload records", || {
        topo.waypoint_requests(waypoint).iter().any(|r| r["path"] == "/via-service")
    });
    let records = topo.waypoint_requests(waypoint);
    let find = |path: &str| records.iter().find(|r| r["path"] == path).cloned();
    let public = find("/public").expect("the /public record");
    assert_eq!(
        (&public["workload"], &public["service"], &public["source_identity"]),
        (&serde_json::json!("shop/web-2"), &serde_json::json!(""), &serde_json::json!(CLIENT_ID)),
        "{public}"
    );
    assert_eq!(public["upstream"], format!("{}:{ECHO_HTTP_PORT}", web_2.ip), "{public}");
    // The last one: while the config arrived, a request may have passed the waypoint before
    // its policy did.
    let private = records.iter().rev().find(|r| r["path"] == "/private/x").expect("the /private/x record");
    assert_eq!((private["status"].as_u64(), private["policy"].as_str()), (Some(403), Some("shop/deny-private rule 0")));
    let via_service = find("/via-service").expect("the /via-service record");
    assert_eq!(via_service["workload"], "shop/canary", "{via_service}");
    assert!(find("/opted-out").is_none(), "the opted-out pod's request passed no waypoint");
    let is_to_web_1 = |f: &serde_json::Value| f["direction"] == "outbound" && f["dst"]["ip"] == web_1.ip.to_string();
    wait_until(FLOW_WAIT, "the client's flow to web-1", || topo.flows(1).iter().any(is_to_web_1));
    let flows = topo.flows(1);
    let to_web_1 = flows.iter().find(|f| is_to_web_1(f)).expect("the client's flow to web-1");
    assert_eq!(to_web_1["dst"]["identity"], "spiffe://cluster.local/ns/shop/sa/web-1", "{to_web_1}");
}

#[test]
fn tcp_to_a_bound_service_is_relayed_at_l4_with_l4_policy() {
    let topo = waypoint_cluster();
    let (a, waypoint, web_2) = (topo.pod("shop", "a"), topo.pod("shop", "waypoint"), topo.pod("shop", "web-2"));
    topo.serve(web_2);
    // Service db (bound, as its namespace is): port 9000 declared TCP by its name, port 9100
    // by its appProtocol, both to web-2's sink (a port declaring nothing would be HTTP).
    let sink = ferrymesh_testbed::mesh::SINK_PORT;
    topo.write_pod(web_2, &[("app", "web"), ("app-db", "yes")]);
    topo.write_config_file(
        "svc-shop-db.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: db\n  namespace: shop\nspec:\n  clusterIP: 10.96.0.52\n  selector:\n    app-db: \"yes\"\n  ports:\n  - name: tcp-sink\n    port: 9000\n    targetPort: {sink}\n  - name: data\n    port: 9100\n    appProtocol: tcp\n    targetPort: {sink}\n"
        ),
    );
    let send = |port: u16| {
        let to = format!("10.96.0.52:{port}");
        topo.output_in(&a.netns, bin("fm-peer"), &["send", "--to", &to, "--bytes", "300000"])
    };
    wait_until(CONFIG_WAIT, "Service db to be reachable", || send(9000).status.success());
    for port in [9000, 9100] {
        let out = send(port);
        let answer: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
        assert_eq!(answer["match"], true, "port {port}: {answer} {}", String::from_utf8_lossy(&out.stderr));
    }
    wait_until(FLOW_WAIT, "the TCP records", || {
        topo.waypoint_requests(waypoint).iter().filter(|r| r["protocol"] == "TCP" && r["port"] == 9100).count() >= 1
    });
    let records = topo.waypoint_requests(waypoint);
    let tcp = records.iter().rev().find(|r| r["protocol"] == "TCP" && r["port"] == 9100).unwrap();
    assert_eq!(tcp["service"], "shop/db", "{tcp}");
    assert_eq!(tcp["bytes_received"], 300_000, "{tcp}");
    assert_eq!(tcp["upstream"], format!("{}:{sink}", web_2.ip), "{tcp}");
    assert_eq!(tcp["source_identity"], CLIENT_ID, "{tcp}");

    // L4 policy at the waypoint: an ALLOW whose only rule names HTTP methods matches no TCP
    // connection, so the connection is refused; one naming the client's principal lets it by.
    let policy = |rule: &str| {
        topo.write_config_file(
            "policy-db.yaml",
            &format!(
                "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: db\n  namespace: shop\nspec:\n  targetRefs:\n  - group: \"\"\n    kind: Service\n    name: db\n  rules:\n  - {rule}\n"
            ),
        );
    };
    policy("to:\n    - operation:\n        methods: [GET]");
    wait_until(CONFIG_WAIT, "the HTTP-only rule to refuse TCP", || !send(9000).status.success());
    wait_until(FLOW_WAIT, "the denial's record", || {
        topo.waypoint_requests(waypoint).iter().any(|r| r["protocol"] == "TCP" && r["response_flags"] == "DENY")
    });
    let records = topo.waypoint_requests(waypoint);
    let denied = records.iter().find(|r| r["protocol"] == "TCP" && r["response_flags"] == "DENY").unwrap();
    assert!(denied["policy"].as_str().unwrap_or_default().starts_with("no ALLOW policy matched"), "{denied}");
    policy("from:\n    - source:\n        principals: [cluster.local/ns/shop/sa/a]");
    wait_until(CONFIG_WAIT, "the principal's rule to let TCP by", || send(9000).status.success());
}

/// The HTTP status of each of `count` requests to `url` from `from`, over one kept-alive
/// connection, with the extra curl `args`.
fn statuses(topo: &Topology, from: &ferrymesh_testbed::Pod, url: &str, count: usize, args: &[&str]) -> Vec<u16> {
    let mut all = vec!["-sS", "--max-time", "60", "-w", "%{http_code}\\n"];
    all.extend_from_slice(args);
    for _ in 0..count {
        all.extend(["-o", "/dev/null", url]);
    }
    let out = topo.output_in(&from.netns, "curl", &all);
    String::from_utf8_lossy(&out.stdout).lines().filter_map(|l| l.trim().parse().ok()).collect()
}

#[test]
fn request_timeouts_and_the_default_retry_shape_what_clients_see() {
    let topo = waypoint_cluster();
    let (a, waypoint) = (topo.pod("shop", "a"), topo.pod("shop", "waypoint"));
    let rules = "  - matches:\n    - path:\n        type: PathPrefix\n        value: /slow\n    timeouts:\n      request: 500ms\n    backendRefs:\n    - name: web\n      port: 80\n  - matches:\n    - path:\n        type: PathPrefix\n        value: /per-try\n    timeouts:\n      request: 3s\n      backendRequest: 300ms\n    backendRefs:\n    - name: web\n      port: 80\n  - matches:\n    - path:\n        type: PathPrefix\n        value: /retry-500\n    retry:\n      codes: [500]\n      attempts: 1\n      backoff: 0s\n    backendRefs:\n    - name: web\n      port: 80\n  - backendRefs:\n    - name: web\n      port: 80\n";
    topo.write_config_file("route-timeouts.yaml", &web_route("timeouts", Some(80), rules));
    wait_until(CONFIG_WAIT, "the route at the waypoint's node", || {
        String::from_utf8_lossy(&topo.meshctl(2, &["routes", "-o", "json"]).stdout).contains("\"timeouts\"")
    });

    // meshctl shows each rule's limits.
    let shown = String::from_utf8_lossy(&topo.meshctl(2, &["routes"]).stdout).into_owned();
    for limit in ["; timeout 500ms", "; timeout 3000ms, per-try timeout 300ms", "; retry 500 x1 after 0ms"] {
        assert!(shown.contains(limit), "{limit:?} in {shown}");
    }

    // A 2 s upstream behind a 500 ms request timeout: a 504 near 500 ms, flagged UT.
    let started = std::time::Instant::now();
    let slow = topo.http(a, &format!("http://{WEB}/slow"), &["-H", "x-echo-delay-ms: 2000"]);
    let took = started.elapsed();
    assert_eq!(slow.status, 504, "{slow:?}");
    // (Below the upstream's 2 s: the waypoint answered, not the upstream; tests run side by
    // side on 2 vCPUs, hence the slack above 500 ms.)
    assert!(took >= Duration::from_millis(450) && took < Duration::from_millis(1900), "answered after {took:?}");
    assert!(slow.body.contains("request timeout: no response within 500ms"), "{slow:?}");
    // A request within its timeout is served.
    assert_eq!(topo.http(a, &format!("http://{WEB}/slow"), &["-H", "x-echo-delay-ms: 100"]).status, 200);
    // Each attempt limited to 300 ms: a 504 (the default retry retries 503s, not 504s) after one
    // attempt, well before the 3 s request timeout.
    let started = std::time::Instant::now();
    let per_try = topo.http(a, &format!("http://{WEB}/per-try"), &["-H", "x-echo-delay-ms: 2000"]);
    assert_eq!(per_try.status, 504, "{per_try:?}");
    assert!(started.elapsed() < Duration::from_millis(1900), "answered after {:?}", started.elapsed());
    assert!(per_try.body.contains("sent no response within 300ms"), "{per_try:?}");

    // Endpoints failing one request in three with a 503, behind the mesh's default retry:
    // no client sees an error, and the retries are counted and recorded.
    let codes = statuses(&topo, a, &format!("http://{WEB}/fail"), 60, &["-H", "x-echo-fail-every: 3"]);
    assert_eq!(codes.len(), 60, "{codes:?}");
    assert!(codes.iter().all(|c| *c == 200), "{codes:?}");
    wait_until(FLOW_WAIT, "the records of the timeouts and the retried requests", || {
        let records = topo.waypoint_requests(waypoint);
        records.iter().filter(|r| r["path"] == "/fail").count() >= 60
            && records.iter().filter(|r| r["response_flags"] == "UT").count() >= 2
    });
    let records = topo.waypoint_requests(waypoint);
    let timed_out = records.iter().find(|r| r["path"] == "/slow" && r["status"] == 504).expect("the timed-out record");
    assert_eq!(timed_out["response_flags"], "UT", "{timed_out}");
    let retried: u64 = records.iter().filter(|r| r["path"] == "/fail").map(|r| r["retries"].as_u64().unwrap()).sum();
    // About one request in three fails once (two endpoints counting on their own).
    assert!((10..=40).contains(&retried), "{retried} retries over 60 requests");
    // A rule's own retry (GEP-1731): a 500 retried once, then answered; the default retry does
    // not retry a 500.
    let always_500 = ["-H", "x-echo-status: 500"];
    assert_eq!(topo.http(a, &format!("http://{WEB}/retry-500"), &always_500).status, 500);
    assert_eq!(topo.http(a, &format!("http://{WEB}/plain-500"), &always_500).status, 500);
    wait_until(FLOW_WAIT, "the records of the 500s", || {
        let records = topo.waypoint_requests(waypoint);
        ["/retry-500", "/plain-500"].iter().all(|p| records.iter().any(|r| r["path"] == *p))
    });
    let records = topo.waypoint_requests(waypoint);
    let retries_of = |path: &str| records.iter().find(|r| r["path"] == path).map(|r| r["retries"].clone());
    assert_eq!(retries_of("/retry-500"), Some(serde_json::json!(1)));
    assert_eq!(retries_of("/plain-500"), Some(serde_json::json!(0)));
    let text = topo.metrics_text(&waypoint.netns);
    let scrape = ferrymesh_testbed::prom::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let by_503 = [("destination_service", "shop/web"), ("reason", "503")];
    assert_eq!(scrape.sum("ferrymesh_request_retries_total", &by_503), retried as f64, "{text}");
    let timeouts = [("destination_service", "shop/web"), ("response_code", "504"), ("response_flags", "UT")];
    assert!(scrape.sum("ferrymesh_requests_total", &timeouts) >= 2.0, "{text}");
    assert_eq!(scrape.sum("ferrymesh_request_retries_total", &[("reason", "500")]), 1.0, "{text}");
}

/// A TrafficPolicy `shop/<name>` targeting `target` (YAML, indented under `targetRefs:`) with
/// `fault` (YAML, indented under `fault:`).
fn traffic_policy(name: &str, target: &str, fault: &str) -> String {
    format!(
        "apiVersion: ferrymesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  targetRefs:\n{target}  fault:\n{fault}"
    )
}

/// A targetRef to rule `rule` of HTTPRoute shop/faults.
fn faults_rule(rule: &str) -> String {
    format!("  - group: gateway.networking.k8s.io\n    kind: HTTPRoute\n    name: faults\n    sectionName: {rule}\n")
}

#[test]
fn faults_of_a_traffic_policy_delay_and_abort_what_clients_see() {
    let topo = waypoint_cluster();
    let (a, waypoint) = (topo.pod("shop", "a"), topo.pod("shop", "waypoint"));
    let to_web = "    backendRefs:\n    - name: web\n      port: 80\n";
    let rule = |name: &str, path: &str, extra: &str| {
        format!("  - name: {name}\n    matches:\n    - path:\n        type: PathPrefix\n        value: {path}\n{extra}{to_web}")
    };
    let rules = [
        rule("aborted", "/abort", ""),
        rule("delayed", "/delay", ""),
        rule("too-slow", "/too-slow", "    timeouts:\n      request: 500ms\n"),
        format!("  - name: rest\n{to_web}"),
    ]
    .concat();
    topo.write_config_file("route-faults.yaml", &web_route("faults", Some(80), &rules));
    let half = "    abort:\n      httpStatus: 503\n      percentage:\n        value: 50\n";
    topo.write_config_file("traffic-abort-half.yaml", &traffic_policy("abort-half", &faults_rule("aborted"), half));
    let delay = |d: &str| format!("    delay:\n      fixedDelay: {d}\n");
    topo.write_config_file("traffic-delay.yaml", &traffic_policy("delay", &faults_rule("delayed"), &delay("300ms")));
    topo.write_config_file(
        "traffic-too-slow.yaml",
        &traffic_policy("too-slow", &faults_rule("too-slow"), &delay("2s")),
    );
    // gRPC: every call to Service grpc aborted with UNAVAILABLE.
    let grpc = ECHO_GRPC_PORT.to_string();
    topo.write_service("shop", "grpc", "10.96.0.53", &[("app", "web")], &[("grpc", ECHO_GRPC_PORT, &grpc)]);
    for name in ["web-1", "web-2"] {
        topo.serve_grpc(topo.pod("shop", name));
    }
    let unavailable = "    abort:\n      grpcStatus: UNAVAILABLE\n";
    topo.write_config_file(
        "traffic-grpc.yaml",
        &traffic_policy("grpc-unavailable", "  - kind: Service\n    name: grpc\n", unavailable),
    );
    wait_until(CONFIG_WAIT, "the policies at the waypoint's node", || {
        let shown = String::from_utf8_lossy(&topo.meshctl(2, &["routes"]).stdout).into_owned();
        ["TrafficPolicy shop/abort-half", "TrafficPolicy shop/delay", "TrafficPolicy shop/too-slow"]
            .iter()
            .all(|p| shown.contains(p))
    });
    let grpc_to = format!("shop/grpc:{ECHO_GRPC_PORT}");
    let explain_grpc = || String::from_utf8_lossy(&topo.meshctl(2, &["routes", "--to", &grpc_to]).stdout).into_owned();
    wait_until(CONFIG_WAIT, "the gRPC Service's policy at the waypoint's node", || {
        explain_grpc().contains("shop/grpc-unavailable")
    });
    // meshctl says what each rule gets, and what a request to the gRPC Service gets.
    let shown = String::from_utf8_lossy(&topo.meshctl(2, &["routes"]).stdout).into_owned();
    for fault in
        ["fault abort 503 50% (TrafficPolicy shop/abort-half)", "fault delay 300ms 100% (TrafficPolicy shop/delay)"]
    {
        assert!(shown.contains(fault), "{fault:?} in {shown}");
    }
    let explained = explain_grpc();
    assert!(
        explained.contains("traffic: fault abort gRPC UNAVAILABLE 100% (TrafficPolicy shop/grpc-unavailable)"),
        "{explained}"
    );

    // A 50% abort over 400 requests: 45-55% are 503s (the rolls spread them evenly: 200 ± 2).
    let url = |path: &str| format!("http://{WEB}{path}");
    wait_until(CONFIG_WAIT, "the abort at the waypoint", || statuses(&topo, a, &url("/abort"), 4, &[]).contains(&503));
    let codes = statuses(&topo, a, &url("/abort"), 400, &[]);
    assert_eq!(codes.len(), 400, "{codes:?}");
    let aborted = codes.iter().filter(|c| **c == 503).count();
    assert_eq!(aborted + codes.iter().filter(|c| **c == 200).count(), 400, "{codes:?}");
    assert!((180..=220).contains(&aborted), "{aborted} of 400 aborted");
    // Other rules of the route are not aborted.
    assert!(statuses(&topo, a, &url("/other"), 20, &[]).iter().all(|c| *c == 200));

    // A 300 ms delay: answered, after 300 ms.
    let started = std::time::Instant::now();
    let delayed = topo.http(a, &url("/delay"), &[]);
    let took = started.elapsed();
    assert_eq!(delayed.status, 200, "{delayed:?}");
    assert!(took >= Duration::from_millis(300) && took < Duration::from_millis(1500), "answered after {took:?}");
    // A 2 s delay within a 500 ms request timeout: a 504 near 500 ms, saying why.
    let started = std::time::Instant::now();
    let slow = topo.http(a, &url("/too-slow"), &[]);
    let took = started.elapsed();
    assert_eq!(slow.status, 504, "{slow:?}");
    assert!(took >= Duration::from_millis(450) && took < Duration::from_millis(1900), "answered after {took:?}");
    assert!(slow.body.contains("a fault delay of 2000ms by TrafficPolicy shop/too-slow"), "{slow:?}");

    // A real gRPC client sees UNAVAILABLE with Envoy's message.
    let out = topo.output_in(&a.netns, bin("fm-echo"), &["grpc", "--to", &format!("10.96.0.53:{ECHO_GRPC_PORT}")]);
    let error = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the call was aborted");
    // (tonic words UNAVAILABLE as "The service is currently unavailable".)
    assert!(error.contains("currently unavailable") && error.contains("fault filter abort"), "{error}");

    // Records and metrics flag them: FI for aborts, DI for delays.
    wait_until(FLOW_WAIT, "the records of the faults", || {
        let records = topo.waypoint_requests(waypoint);
        records.iter().any(|r| r["path"] == "/delay") && records.iter().any(|r| r["service"] == "shop/grpc")
    });
    let records = topo.waypoint_requests(waypoint);
    let flagged_fi = records.iter().filter(|r| r["path"] == "/abort" && r["response_flags"] == "FI").count();
    let answered_503 = records.iter().filter(|r| r["path"] == "/abort" && r["status"] == 503).count();
    assert_eq!(flagged_fi, answered_503, "every abort is flagged FI");
    let delayed = records.iter().find(|r| r["path"] == "/delay").unwrap();
    assert_eq!(delayed["response_flags"], "DI", "{delayed}");
    let grpc_record = records.iter().find(|r| r["service"] == "shop/grpc").unwrap();
    assert_eq!((&grpc_record["grpc_status"], &grpc_record["response_flags"]), (&"14".into(), &"FI".into()));
    let text = topo.metrics_text(&waypoint.netns);
    let scrape = ferrymesh_testbed::prom::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let fi = [("destination_service", "shop/web"), ("response_code", "503"), ("response_flags", "FI")];
    assert_eq!(scrape.sum("ferrymesh_requests_total", &fi), answered_503 as f64, "{text}");

    // A percentage above 100 is refused, named; the last good policy keeps aborting half.
    let bad = half.replace("value: 50", "value: 150");
    topo.write_config_file("traffic-abort-half.yaml", &traffic_policy("abort-half", &faults_rule("aborted"), &bad));
    wait_until(CONFIG_WAIT, "mesh-ctrl to refuse the policy", || {
        topo.log("mesh-ctrl").contains("TrafficPolicy shop/abort-half: field spec.fault.abort.percentage.value: 150 is not a percentage from 0 to 100")
    });
    let codes = statuses(&topo, a, &url("/abort"), 40, &[]);
    let aborted = codes.iter().filter(|c| **c == 503).count();
    assert!((18..=22).contains(&aborted), "{aborted} of 40 aborted after the bad change");
}

#[test]
fn a_destination_rule_pins_by_hash_breaks_circuits_and_ejects_a_failing_endpoint() {
    let topo = waypoint_cluster();
    let (a, waypoint) = (topo.pod("shop", "a"), topo.pod("shop", "waypoint"));
    let rule = "apiVersion: ferrymesh.io/v1alpha1\nkind: DestinationRule\nmetadata:\n  name: web\n  namespace: shop\nspec:\n  host: web.shop.svc.cluster.local\n  trafficPolicy:\n    connectionPool:\n      tcp:\n        maxConnections: 1\n      http:\n        http1MaxPendingRequests: 1\n    outlierDetection:\n      consecutive5xxErrors: 3\n      interval: 1s\n      baseEjectionTime: 2s\n      maxEjectionPercent: 50\n    loadBalancer:\n      consistentHash:\n        httpHeaderName: x-user\n";
    topo.write_config_file("destination-web.yaml", rule);
    wait_until(CONFIG_WAIT, "the rule at the waypoint's node", || {
        let shown = String::from_utf8_lossy(&topo.meshctl(2, &["services"]).stdout).into_owned();
        shown.contains("shop/web: maxConnections 1, http1MaxPendingRequests 1, eject after 3 5xx in a row for 2000ms+ (at most 50%), hash of header x-user")
    });
    let url = format!("http://{WEB}/");

    // A consistent hash on x-user: each user's requests stay on one endpoint; users spread.
    let mut used = std::collections::BTreeSet::new();
    for user in 0..16 {
        let header = format!("x-user: user-{user}");
        let pods = topo.echo_pods(a, &url, 10, &["-H", &header]);
        let tally = tally(&pods);
        assert_eq!(tally.len(), 1, "user-{user} went to one endpoint: {tally:?}");
        used.extend(tally.into_keys().map(String::from));
    }
    assert_eq!(used.len(), 2, "16 users over web-1 and web-2: {used:?}");

    // Pending-request overflow: with one connection and one pending request, of five slow
    // requests at once, two are answered and three refused at once with 503 UO.
    let started = std::time::Instant::now();
    let parallel = ["-Z", "--parallel-immediate", "--parallel-max", "5", "-H", "x-echo-delay-ms: 1000"];
    let codes = statuses(&topo, a, &url, 5, &parallel);
    let mut sorted = codes.clone();
    sorted.sort_unstable();
    assert_eq!(sorted, [200, 200, 503, 503, 503], "{codes:?}");
    // (The two answered one after the other: the second waited for the first's connection.)
    assert!(started.elapsed() >= Duration::from_millis(2000), "{:?}", started.elapsed());
    wait_until(FLOW_WAIT, "the overflow records", || {
        topo.waypoint_requests(waypoint).iter().filter(|r| r["response_flags"] == "UO").count() == 3
    });
    let overflow = topo.waypoint_requests(waypoint).into_iter().find(|r| r["response_flags"] == "UO").unwrap();
    assert_eq!(overflow["status"], 503, "{overflow}");
    assert!(
        overflow["reason"].as_str().unwrap().contains("http1MaxPendingRequests of shop/web reached (1)"),
        "{overflow}"
    );

    // web-1 answers 500s: after three in a row it is ejected and web-2 takes everything...
    let failing = ["-H", "x-echo-fail-pod: web-1"];
    let codes = statuses(&topo, a, &url, 40, &failing);
    assert_eq!(codes.len(), 40, "{codes:?}");
    assert_eq!(codes.iter().filter(|c| **c == 500).count(), 3, "{codes:?}");
    assert!(codes.iter().rev().take(10).all(|c| *c == 200), "{codes:?}");
    // ... until its 2 s ejection ends: it is back, fails three more, and is ejected again.
    std::thread::sleep(Duration::from_millis(2300));
    let codes = statuses(&topo, a, &url, 40, &failing);
    assert_eq!(codes.iter().filter(|c| **c == 500).count(), 3, "back after its ejection: {codes:?}");
    let text = topo.metrics_text(&waypoint.netns);
    let scrape = ferrymesh_testbed::prom::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert_eq!(scrape.sum("ferrymesh_outlier_ejections_total", &[("destination_service", "shop/web")]), 2.0, "{text}");
    let uo = [("destination_service", "shop/web"), ("response_code", "503"), ("response_flags", "UO")];
    assert_eq!(scrape.sum("ferrymesh_requests_total", &uo), 3.0, "{text}");

    // A bad rule is refused by name; the last good one keeps serving (still one pending).
    topo.write_config_file("destination-web.yaml", &rule.replace("maxEjectionPercent: 50", "maxEjectionPercent: 150"));
    wait_until(CONFIG_WAIT, "mesh-ctrl to refuse the rule", || {
        topo.log("mesh-ctrl").contains(
            "DestinationRule shop/web: field spec.trafficPolicy.outlierDetection.maxEjectionPercent: 150 is not a percentage",
        )
    });
    let codes = statuses(&topo, a, &url, 5, &parallel);
    assert_eq!(codes.iter().filter(|c| **c == 503).count(), 3, "{codes:?}");
}

/// A TrafficPolicy `shop/<name>` targeting rule `rule` of HTTPRoute shop/limits with local
/// rate limits `local` (YAML, indented under `local:`).
fn rate_limit_policy(name: &str, rule: &str, local: &str) -> String {
    format!(
        "apiVersion: ferrymesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  targetRefs:\n  - group: gateway.networking.k8s.io\n    kind: HTTPRoute\n    name: limits\n    sectionName: {rule}\n  rateLimit:\n    local:\n{local}"
    )
}

#[test]
fn local_rate_limits_answer_429_with_retry_after_per_rule_and_per_key() {
    let topo = waypoint_cluster();
    let (a, waypoint) = (topo.pod("shop", "a"), topo.pod("shop", "waypoint"));
    let to_web = "    backendRefs:\n    - name: web\n      port: 80\n";
    let rule = |name: &str, path: &str| {
        format!(
            "  - name: {name}\n    matches:\n    - path:\n        type: PathPrefix\n        value: {path}\n{to_web}"
        )
    };
    let rules =
        [rule("steady", "/steady"), rule("per-user", "/per-user"), format!("  - name: rest\n{to_web}")].concat();
    topo.write_config_file("route-limits.yaml", &web_route("limits", Some(80), &rules));
    let ten_per_second = "    - limit:\n        requests: 10\n        unit: Second\n";
    topo.write_config_file("traffic-steady.yaml", &rate_limit_policy("steady", "steady", ten_per_second));
    let per_user = "    - limit:\n        requests: 5\n        unit: Minute\n      key:\n        header: x-user\n";
    topo.write_config_file("traffic-per-user.yaml", &rate_limit_policy("per-user", "per-user", per_user));
    wait_until(CONFIG_WAIT, "the limits at the waypoint's node", || {
        let shown = String::from_utf8_lossy(&topo.meshctl(2, &["routes"]).stdout).into_owned();
        shown.contains("rate limit 10/1s burst 10 (TrafficPolicy shop/steady)")
            && shown.contains("rate limit 5/60s burst 5 per x-user (TrafficPolicy shop/per-user)")
    });
    let url = |path: &str| format!("http://{WEB}{path}");

    // 10 requests a second against 50 offered for 3 s: the burst of 10 and 10 a second are
    // answered (about 40), the rest 429.
    let started = std::time::Instant::now();
    let codes = statuses(&topo, a, &url("/steady"), 150, &["--rate", "50/s"]);
    let took = started.elapsed().as_secs_f64();
    assert_eq!(codes.len(), 150, "{codes:?}");
    let ok = codes.iter().filter(|c| **c == 200).count();
    assert_eq!(ok + codes.iter().filter(|c| **c == 429).count(), 150, "{codes:?}");
    let expected = 10.0 + 10.0 * took;
    assert!((ok as f64 - expected).abs() <= 6.0, "{ok} answered in {took:.2}s (expected about {expected:.0})");
    // A refused request says when to come back, and why.
    let refused = (0..20).map(|_| topo.http(a, &url("/steady"), &[])).find(|r| r.status == 429).expect("a 429");
    let retry_after = |r: &ferrymesh_testbed::mesh::HttpAnswer| {
        r.headers.iter().find(|(n, _)| n == "retry-after").map(|(_, v)| v.clone())
    };
    assert_eq!(retry_after(&refused).as_deref(), Some("1"), "{refused:?}");
    assert_eq!(refused.body, "local_rate_limited\n");
    // Other rules of the route are not limited.
    assert!(statuses(&topo, a, &url("/other"), 30, &[]).iter().all(|c| *c == 200));

    // 5 a minute per x-user: each user gets their own 5.
    let user = |name: &str| {
        let header = format!("x-user: {name}");
        statuses(&topo, a, &url("/per-user"), 8, &["-H", &header])
    };
    for name in ["alice", "bob"] {
        let codes = user(name);
        assert_eq!(codes, [200, 200, 200, 200, 200, 429, 429, 429], "{name}");
    }
    let refused = topo.http(a, &url("/per-user"), &["-H", "x-user: alice"]);
    let wait: u64 = retry_after(&refused).expect("retry-after").parse().unwrap();
    assert!((1..=12).contains(&wait), "a token every 12 s: {refused:?}");

    // Records and metrics flag them RL.
    wait_until(FLOW_WAIT, "the records of the limited requests", || {
        topo.waypoint_requests(waypoint).iter().filter(|r| r["path"] == "/per-user").count() >= 17
    });
    let records = topo.waypoint_requests(waypoint);
    let limited: Vec<_> = records.iter().filter(|r| r["status"] == 429).collect();
    assert!(limited.iter().all(|r| r["response_flags"] == "RL"), "{limited:?}");
    let per_user_record = limited.iter().find(|r| r["path"] == "/per-user").unwrap();
    assert_eq!(
        per_user_record["reason"], "rate limited by TrafficPolicy shop/per-user local[0]: 5/60s burst 5 per x-user",
        "{per_user_record}"
    );
    let text = topo.metrics_text(&waypoint.netns);
    let scrape = ferrymesh_testbed::prom::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    let rl = [("destination_service", "shop/web"), ("response_code", "429"), ("response_flags", "RL")];
    assert_eq!(scrape.sum("ferrymesh_requests_total", &rl), limited.len() as f64, "{text}");

    // A limit of 0 is refused by name; the last good one keeps limiting.
    topo.write_config_file(
        "traffic-per-user.yaml",
        &rate_limit_policy("per-user", "per-user", &per_user.replace("requests: 5", "requests: 0")),
    );
    wait_until(CONFIG_WAIT, "mesh-ctrl to refuse the limit", || {
        topo.log("mesh-ctrl").contains(
            "TrafficPolicy shop/per-user: field spec.rateLimit.local[0].limit.requests: 0 is not a count from 1 to 1000000",
        )
    });
    assert_eq!(user("carol"), [200, 200, 200, 200, 200, 429, 429, 429]);
}

/// The waypoint's cap on one source's requests in flight (`--max-requests-per-source`, what keeps
/// a client from making it hold the buffers of every request it can open): past it a request is
/// answered 503 at once, naming the flag; another client is served meanwhile, and the source again
/// once its requests have ended. (Every request of a is a slow one: a quick one in flight at the
/// wrong moment would take a place of the cap.)
#[test]
fn requests_past_a_sources_cap_in_flight_get_503_while_other_clients_are_served() {
    let spec = TopologySpec::nodes(2)
        .pod("shop", "a", 1)
        .pod("shop", "b", 1)
        .pod("shop", "web-1", 1)
        .pod("shop", "waypoint", 2);
    let topo = bound_shop(&spec, &[("web-1", "web")]);
    topo.write_service("shop", "web", WEB, &[("app", "web")], &[("http", 80, &ECHO_HTTP_PORT.to_string())]);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a", "shop/b", "shop/web-1"], Duration::from_secs(10));
    topo.start_waypoint_replica(topo.pod("shop", "waypoint"), "waypoint", &["--max-requests-per-source", "2"]);
    topo.serve_echo(topo.pod("shop", "web-1"));
    let (a, b) = (topo.pod("shop", "a"), topo.pod("shop", "b"));
    let url = format!("http://{WEB}/");
    wait_until(CONFIG_WAIT, "requests through the waypoint", || topo.http(a, &url, &[]).status == 200);
    // Three requests of a at once, each answered 15 s late by the backend: two are let in, the
    // third (whichever comes last) is refused at once.
    const SLOW: [&str; 4] = ["-H", "x-echo-delay-ms: 15000", "--max-time", "30"];
    let (answers_tx, answers) = std::sync::mpsc::channel();
    std::thread::scope(|scope| {
        for _ in 0..3 {
            let (answers_tx, topo, url) = (answers_tx.clone(), &topo, &url);
            scope.spawn(move || answers_tx.send(topo.http(a, url, &SLOW)).unwrap());
        }
        let refused = answers.recv_timeout(Duration::from_secs(12)).expect("an answer well before the backend's");
        assert_eq!(refused.status, 503, "the first answer, while two are in flight: {refused:?}");
        assert!(refused.body.contains("(--max-requests-per-source)"), "{refused:?}");
        let other = topo.http(b, &url, &[]);
        assert_eq!(other.status, 200, "b, another source, meanwhile: {other:?}");
        for _ in 0..2 {
            let answer = answers.recv_timeout(Duration::from_secs(30)).expect("the answers of the two let in");
            assert_eq!(answer.status, 200, "a request let in: {answer:?}");
        }
    });
    let again = topo.http(a, &url, &[]);
    assert_eq!(again.status, 200, "a once its requests ended: {again:?}");
}

/// A global limit of a TrafficPolicy on Service web: `requests` an hour per x-user, counted by
/// the rate-limit service.
fn global_limit_policy(requests: &str, extra: &str) -> String {
    format!(
        "apiVersion: ferrymesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: global\n  namespace: shop\nspec:\n  targetRefs:\n  - kind: Service\n    name: web\n  rateLimit:\n{extra}    global:\n    - limit:\n        requests: {requests}\n        unit: Hour\n      key:\n        header: x-user\n"
    )
}

#[test]
fn a_global_rate_limit_holds_across_two_waypoint_replicas_through_the_rate_limit_service() {
    let spec = TopologySpec::nodes(2)
        .pod("shop", "a", 1)
        .pod("shop", "web-1", 1)
        .pod("shop", "web-2", 2)
        .pod("shop", "waypoint-1", 1)
        .pod("shop", "waypoint-2", 2);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    topo.write_namespace("shop", &[(DATAPLANE_MODE, "enabled"), ("ferrymesh.io/use-waypoint", "waypoint")]);
    for name in ["web-1", "web-2"] {
        topo.write_pod(topo.pod("shop", name), &[("app", "web")]);
    }
    let replicas = [topo.pod("shop", "waypoint-1"), topo.pod("shop", "waypoint-2")];
    for pod in replicas {
        topo.write_waypoint_replica(pod, "waypoint");
    }
    topo.write_waypoint("shop", "waypoint");
    topo.write_service("shop", "web", WEB, &[("app", "web")], &[("http", 80, &ECHO_HTTP_PORT.to_string())]);
    topo.write_config_file("traffic-global.yaml", &global_limit_policy("10", ""));
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a", "shop/web-1"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["shop/web-2"], Duration::from_secs(10));
    let rls = topo.serve_rate_limit_service();
    for pod in replicas {
        topo.start_waypoint_replica(pod, "waypoint", &["--rate-limit-service", &rls]);
    }
    for name in ["web-1", "web-2"] {
        topo.serve_echo(topo.pod("shop", name));
    }
    let a = topo.pod("shop", "a");
    let url = format!("http://{WEB}/");
    // Each request on a connection of its own, which its agent sends to either replica.
    let user = |name: &str, count: usize| {
        let header = format!("x-user: {name}");
        statuses(&topo, a, &url, count, &["-H", &header, "-H", "Connection: close"])
    };
    let callers = || -> std::collections::BTreeSet<String> {
        topo.rate_limit_checks().iter().map(|c| c["from"].as_str().unwrap_or_default().to_string()).collect()
    };
    // Both replicas hold the policy once each has asked the service about a request.
    let mut n = 0;
    wait_until(CONFIG_WAIT, "both replicas to ask the rate-limit service", || {
        n += 1;
        user(&format!("warm-up-{n}"), 1);
        callers().len() == 2
    });
    let replica_ips: std::collections::BTreeSet<String> = replicas.iter().map(|p| p.ip.to_string()).collect();
    assert_eq!(callers(), replica_ips);

    // 10 an hour per user across both replicas: of 30 requests, 10 are answered.
    let before = topo.rate_limit_checks().len();
    let alice = user("alice", 30);
    assert_eq!(alice, [vec![200; 10], vec![429; 20]].concat());
    assert_eq!(user("bob", 12), [vec![200; 10], vec![429; 2]].concat(), "bob has his own count");
    let checks = topo.rate_limit_checks();
    let from_alice: Vec<_> = checks[before..]
        .iter()
        .filter(|c| c["descriptors"][0]["entries"][3] == serde_json::json!(["x-user", "alice"]))
        .collect();
    assert_eq!(from_alice.len(), 30, "one check per request: {from_alice:?}");
    let first = from_alice[0];
    assert_eq!(first["domain"], "ferrymesh", "{first}");
    assert_eq!(
        first["descriptors"][0]["entries"],
        serde_json::json!([
            ["traffic_policy", "shop/global"],
            ["limit", "0"],
            ["destination_service", "shop/web"],
            ["x-user", "alice"]
        ]),
        "{first}"
    );
    assert_eq!(first["descriptors"][0]["limit"], serde_json::json!([10, 3]), "10 an hour, Envoy's unit 3");
    let alice_callers: std::collections::BTreeSet<_> = from_alice.iter().map(|c| c["from"].to_string()).collect();
    assert_eq!(alice_callers.len(), 2, "both replicas counted alice's requests: {from_alice:?}");

    // The refusal as Envoy's: 429, no body, retry-after, x-envoy-ratelimited, and the headers
    // the service added; the record says which limit.
    let refused = topo.http(a, &url, &["-H", "x-user: alice"]);
    assert_eq!(refused.status, 429, "{refused:?}");
    assert_eq!(refused.body, "");
    let header = |name: &str| refused.headers.iter().find(|(n, _)| n == name).map(|(_, v)| v.clone());
    let wait: u64 = header("retry-after").expect("retry-after").parse().unwrap();
    assert!((1..=3600).contains(&wait), "{refused:?}");
    assert_eq!(header("x-envoy-ratelimited").as_deref(), Some("true"));
    assert_eq!(header("x-ratelimit-remaining").as_deref(), Some("0"));
    wait_until(FLOW_WAIT, "the refused requests' records", || {
        replicas.iter().map(|w| topo.waypoint_requests(w).iter().filter(|r| r["status"] == 429).count()).sum::<usize>()
            >= 23
    });
    let records: Vec<_> = replicas.iter().flat_map(|w| topo.waypoint_requests(w)).collect();
    let limited: Vec<_> = records.iter().filter(|r| r["status"] == 429).collect();
    assert!(limited.iter().all(|r| r["response_flags"] == "RL"), "{limited:?}");
    assert_eq!(
        limited[0]["reason"], "rate limited by TrafficPolicy shop/global global[0]: 10/Hour global per x-user",
        "{}",
        limited[0]
    );
    let over_limit: f64 = replicas
        .iter()
        .map(|w| {
            let text = topo.metrics_text(&w.netns);
            let scrape = ferrymesh_testbed::prom::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
            scrape.sum("ferrymesh_rate_limit_service_calls_total", &[("result", "over_limit")])
        })
        .sum();
    assert_eq!(over_limit, limited.len() as f64);

    // An invalid unit is refused by name; the last good policy keeps limiting.
    topo.write_config_file(
        "traffic-global.yaml",
        &global_limit_policy("10", "").replace("unit: Hour", "unit: Fortnight"),
    );
    wait_until(CONFIG_WAIT, "mesh-ctrl to refuse the unit", || {
        topo.log("mesh-ctrl").contains(
            "TrafficPolicy shop/global: field spec.rateLimit.global[0].limit.unit: \"Fortnight\" is not Second, Minute, Hour or Day",
        )
    });
    assert_eq!(user("alice", 4), [429; 4]);

    // The service gone: requests are let by (Envoy's default), unless the policy denies on
    // failure: then a 500 flagged RLSE.
    topo.signal_and_wait("rls", libc::SIGKILL);
    assert_eq!(user("alice", 6), [200; 6], "failing open");
    topo.write_config_file("traffic-global.yaml", &global_limit_policy("10", "    failureModeDeny: true\n"));
    wait_until(CONFIG_WAIT, "both replicas to deny on failure", || user("carol", 8).iter().all(|s| *s == 500));
    wait_until(FLOW_WAIT, "a denied request's record", || {
        replicas.iter().flat_map(|w| topo.waypoint_requests(w)).any(|r| r["status"] == 500)
    });
    let denied = replicas.iter().flat_map(|w| topo.waypoint_requests(w)).find(|r| r["status"] == 500).unwrap();
    assert_eq!(denied["response_flags"], "RLSE", "{denied}");
    let reason = denied["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("rate-limit service") && reason.contains("TrafficPolicy shop/global has failureModeDeny"),
        "{reason}"
    );
}

/// The topology of `spec` with `shop` enrolled and bound to its waypoint `shop/waypoint` (pod
/// `waypoint`), each (pod, app) of `apps` written with its `app` label; nothing started.
fn bound_shop(spec: &TopologySpec, apps: &[(&str, &str)]) -> Topology {
    let topo = Topology::build(spec);
    topo.write_cluster(&["shop"]);
    topo.write_namespace("shop", &[(DATAPLANE_MODE, "enabled"), ("ferrymesh.io/use-waypoint", "waypoint")]);
    for (pod, app) in apps {
        topo.write_pod(topo.pod("shop", pod), &[("app", app)]);
    }
    topo.write_waypoint_pod(topo.pod("shop", "waypoint"));
    topo.write_waypoint("shop", "waypoint");
    topo
}

/// A P-256 signing key and its public half as a JWKS key of id `kid` (JSON).
fn jwt_key(kid: &str) -> (jsonwebtoken::EncodingKey, String) {
    use base64::Engine;
    let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("P-256 key");
    let point = pair.public_key_raw();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let jwk = format!(
        r#"{{"kty":"EC","crv":"P-256","alg":"ES256","use":"sig","kid":"{kid}","x":"{}","y":"{}"}}"#,
        b64(&point[1..33]),
        b64(&point[33..65])
    );
    (jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der()), jwk)
}

/// A JWT signed by `key` (ES256, key id `kid`) with `claims`.
fn jwt(key: &jsonwebtoken::EncodingKey, kid: &str, claims: serde_json::Value) -> String {
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(kid.into());
    jsonwebtoken::encode(&header, &claims, key).expect("sign JWT")
}

const ISSUER: &str = "https://issuer.test";

/// RequestAuthentication shop/jwt on Service web (its keys at `jwks_uri`), and the policies
/// that use its principals: /private needs one; DELETE needs the `admin` group.
fn jwt_policies(jwks_uri: &str) -> String {
    format!(
        r#"apiVersion: ferrymesh.io/v1alpha1
kind: RequestAuthentication
metadata: {{name: jwt, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: "", name: web}}]
  jwtRules:
  - issuer: {ISSUER}
    audiences: [web]
    jwksUri: {jwks_uri}
    outputPayloadToHeader: x-jwt-payload
---
apiVersion: ferrymesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: private-needs-jwt, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: "", name: web}}]
  action: DENY
  rules:
  - from: [{{source: {{notRequestPrincipals: ["*"]}}}}]
    to: [{{operation: {{paths: ["/private*"]}}}}]
---
apiVersion: ferrymesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {{name: delete-needs-admin, namespace: shop}}
spec:
  targetRefs: [{{kind: Service, group: "", name: web}}]
  action: DENY
  rules:
  - to: [{{operation: {{methods: [DELETE]}}}}]
    when: [{{key: "request.auth.claims[groups]", notValues: [admin]}}]
"#
    )
}

#[test]
fn end_user_jwts_are_verified_at_the_waypoint_and_keys_rotate_without_restart() {
    use base64::Engine;
    let spec = TopologySpec::nodes(2).pod("shop", "a", 1).pod("shop", "web-1", 1).pod("shop", "waypoint", 2);
    let topo = bound_shop(&spec, &[("web-1", "web")]);
    let waypoint = topo.pod("shop", "waypoint");
    topo.write_service("shop", "web", WEB, &[("app", "web")], &[("http", 80, &ECHO_HTTP_PORT.to_string())]);
    let (key1, jwk1) = jwt_key("k1");
    let (key2, jwk2) = jwt_key("k2");
    let jwks_uri = topo.serve_jwks(&format!(r#"{{"keys":[{jwk1}]}}"#));
    topo.write_config_file("jwt.yaml", &jwt_policies(&jwks_uri));
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a", "shop/web-1"], Duration::from_secs(10));
    topo.start_waypoint_replica(waypoint, "waypoint", &["--jwks-refresh", "3s", "--jwks-allow-http"]);
    topo.serve_echo(topo.pod("shop", "web-1"));
    let a = topo.pod("shop", "a");
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
    let claims = |sub: &str, iss: &str, aud: &str, exp: u64, groups: &[&str]| serde_json::json!({"iss": iss, "sub": sub, "aud": aud, "exp": exp, "groups": groups});
    let alice = jwt(&key1, "k1", claims("alice", ISSUER, "web", now + 3600, &["dev"]));
    let root = jwt(&key1, "k1", claims("root", ISSUER, "web", now + 3600, &["dev", "admin"]));
    let call = |method: &str, path: &str, token: Option<&str>| {
        let bearer = token.map(|t| format!("authorization: Bearer {t}"));
        let mut args = vec!["-X", method];
        if let Some(h) = &bearer {
            args.extend(["-H", h.as_str()]);
        }
        topo.http(a, &format!("http://{WEB}{path}"), &args)
    };

    // The policies are held once a request to /private without a token is refused.
    wait_until(CONFIG_WAIT, "the waypoint to hold the policies", || call("GET", "/private", None).status == 403);
    // No token: passes where no policy asks for a principal (Istio's semantics).
    assert_eq!(call("GET", "/", None).status, 200);
    // A valid token: /private passes; upstream, the token is gone and its payload is there.
    let ok = call("GET", "/private/x", Some(&alice));
    assert_eq!(ok.status, 200, "{ok:?}");
    let echoed: serde_json::Value = serde_json::from_str(&ok.body).unwrap_or_else(|e| panic!("{e}: {ok:?}"));
    assert!(echoed["headers"].get("authorization").is_none(), "the token is not forwarded: {echoed}");
    let payload = echoed["headers"]["x-jwt-payload"][0].as_str().unwrap_or_else(|| panic!("{echoed}"));
    let payload = base64::engine::general_purpose::URL_SAFE_NO_PAD.decode(payload).expect("base64url payload");
    let payload: serde_json::Value = serde_json::from_slice(&payload).expect("JSON payload");
    assert_eq!(payload["sub"], "alice", "{payload}");
    // Claims decide: DELETE needs the admin group.
    assert_eq!(call("DELETE", "/item", Some(&alice)).status, 403);
    assert_eq!(call("DELETE", "/item", Some(&root)).status, 200);

    // Every bad token is a 401 in Envoy's words, whatever the path and policies.
    let forged_hs256 = {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
        header.kid = Some("k1".into());
        let secret = jsonwebtoken::EncodingKey::from_secret(jwk1.as_bytes());
        jsonwebtoken::encode(&header, &claims("mallory", ISSUER, "web", now + 3600, &["admin"]), &secret).unwrap()
    };
    let bad = [
        (jwt(&key1, "k1", claims("alice", ISSUER, "web", now - 3600, &[])), "Jwt is expired"),
        (
            jwt(&key1, "k1", claims("alice", "https://other.test", "web", now + 3600, &[])),
            "Jwt issuer is not configured",
        ),
        (jwt(&key1, "k1", claims("alice", ISSUER, "db", now + 3600, &[])), "Audiences in Jwt are not allowed"),
        (jwt(&key2, "k1", claims("alice", ISSUER, "web", now + 3600, &[])), "Jwt verification fails"),
        (forged_hs256, "Jwt verification fails"),
        ("not.a.jwt".to_string(), "Jwt is not in the form of Header.Payload.Signature"),
    ];
    for (token, why) in &bad {
        let refused = call("GET", "/", Some(token));
        assert_eq!((refused.status, refused.body.as_str()), (401, *why), "{refused:?}");
        let challenge = refused.header("www-authenticate").unwrap_or_default();
        assert!(challenge.starts_with("Bearer realm=\"http://") && challenge.contains("invalid_token"), "{refused:?}");
    }
    wait_until(FLOW_WAIT, "the records of the refusals", || {
        topo.waypoint_requests(waypoint).iter().filter(|r| r["status"] == 401).count() >= bad.len()
    });
    let records = topo.waypoint_requests(waypoint);
    let expired = records.iter().find(|r| r["status"] == 401).unwrap();
    assert_eq!(expired["reason"], "Jwt is expired (RequestAuthentication shop/jwt)", "{expired}");
    let passed = records.iter().find(|r| r["path"] == "/private/x").unwrap();
    assert_eq!(passed["request_principal"], format!("{ISSUER}/alice"), "{passed}");

    // The issuer rotates its key: a token of the new key passes at once (its unknown kid has
    // the keys fetched again), and the old key's tokens stop passing by the next refresh.
    let fetches_before = topo.jwks_fetches().len();
    topo.write_jwks(&format!(r#"{{"keys":[{jwk2}]}}"#));
    std::thread::sleep(Duration::from_millis(1100));
    let alice_k2 = jwt(&key2, "k2", claims("alice", ISSUER, "web", now + 3600, &["dev"]));
    assert_eq!(call("GET", "/private", Some(&alice_k2)).status, 200, "the rotated key is fetched on its first use");
    wait_until(Duration::from_secs(15), "the old key to be dropped", || call("GET", "/", Some(&alice)).status == 401);
    let fetches = topo.jwks_fetches();
    assert!(fetches.len() > fetches_before, "{fetches:?}");
    assert!(fetches.iter().all(|f| f["from"].as_str().unwrap_or_default().starts_with(&waypoint.ip.to_string())));
    let text = topo.metrics_text(&waypoint.netns);
    let scrape = ferrymesh_testbed::prom::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
    assert!(scrape.sum("ferrymesh_jwks_fetches_total", &[("result", "ok")]) >= 2.0, "{text}");

    // meshctl lists the RequestAuthentication with the policies.
    let policies = String::from_utf8_lossy(&topo.meshctl(1, &["policies"]).stdout).into_owned();
    assert!(
        policies.lines().any(|l| l.contains("RequestAuthentication shop/jwt")
            && l.contains("Service web")
            && l.contains(&format!("issuers {ISSUER} ({jwks_uri})"))),
        "{policies}"
    );

    // meshctl explain says what a token's claims make of a request, by the same decision code.
    let explain = |args: &[&str]| {
        let mut all = vec!["explain", "shop/a", "shop/web:80"];
        all.extend_from_slice(args);
        let out = topo.meshctl_all(1, &all);
        assert!(out.status.success(), "meshctl explain {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let anonymous = explain(&["--path", "/private"]);
    assert!(
        anonymous.contains("jwt:      RequestAuthentication shop/jwt: a request without a token passes"),
        "{anonymous}"
    );
    assert!(anonymous.contains("verdict:  DENIED, 403 (shop/private-needs-jwt rule 0)"), "{anonymous}");
    let dev = format!(r#"{{"iss": "{ISSUER}", "sub": "alice", "aud": "web", "groups": ["dev"]}}"#);
    let as_alice = explain(&["--path", "/private", "--jwt-claims", &dev]);
    assert!(as_alice.contains(&format!("the token's principal is {ISSUER}/alice")), "{as_alice}");
    assert!(!as_alice.contains("DENIED"), "{as_alice}");
    let delete = explain(&["--method", "DELETE", "--jwt-claims", &dev]);
    assert!(delete.contains("verdict:  DENIED, 403 (shop/delete-needs-admin rule 0)"), "{delete}");
    let stranger = explain(&["--jwt-claims", r#"{"iss": "https://other.test", "sub": "x"}"#]);
    assert!(stranger.contains("401: Jwt issuer is not configured"), "{stranger}");

    // An invalid RequestAuthentication is refused by field; the last good one keeps holding.
    topo.write_config_file("jwt.yaml", &jwt_policies("ftp://keys.test/jwks"));
    wait_until(CONFIG_WAIT, "mesh-ctrl to refuse the jwksUri", || {
        topo.log("mesh-ctrl").contains("RequestAuthentication shop/jwt: field spec.jwtRules[0].jwksUri")
    });
    assert_eq!(call("GET", "/private", Some(&alice_k2)).status, 200);
    assert_eq!(call("GET", "/", Some(&alice)).status, 401);
}

/// VIP of Service shop/api, in the tracing test.
const API: &str = "10.96.0.52";

#[test]
fn requests_are_traced_across_two_services_through_the_waypoint_over_otlp() {
    let spec = TopologySpec::nodes(2)
        .pod("shop", "a", 1)
        .pod("shop", "web-1", 1)
        .pod("shop", "api", 2)
        .pod("shop", "waypoint", 2);
    let topo = bound_shop(&spec, &[("web-1", "web"), ("api", "api")]);
    let waypoint = topo.pod("shop", "waypoint");
    let echo = ECHO_HTTP_PORT.to_string();
    topo.write_service("shop", "web", WEB, &[("app", "web")], &[("http", 80, &echo)]);
    topo.write_service("shop", "api", API, &[("app", "api")], &[("http", 80, &echo)]);
    // The agents trace every connection; the waypoint starts no trace of its own: a request is
    // recorded when its client, or the agent that carried it, sampled its trace.
    let collector = topo.serve_otlp();
    topo.start_ctrl(&[]);
    for node in [1, 2] {
        topo.start_agent_with(node, &[("--tracing-collector", &collector), ("--tracing-sampling", "100")]);
    }
    topo.wait_enrolled(1, &["shop/a", "shop/web-1"], Duration::from_secs(10));
    topo.wait_enrolled(2, &["shop/api"], Duration::from_secs(10));
    topo.start_waypoint_replica(waypoint, "waypoint", &["--tracing-collector", &collector, "--tracing-sampling", "0"]);
    for name in ["web-1", "api"] {
        topo.serve_echo(topo.pod("shop", name));
    }
    let a = topo.pod("shop", "a");
    let get = |traceparent: Option<&str>| {
        let mut args = vec!["-H".to_string(), "tracestate: client=1".to_string()];
        args.extend(["-H".to_string(), format!("x-echo-call: {API}:80/inner")]);
        if let Some(t) = traceparent {
            args.extend(["-H".to_string(), format!("traceparent: {t}")]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let answer = topo.http(a, &format!("http://{WEB}/outer"), &args);
        assert_eq!(answer.status, 200, "{answer:?}");
        let echoed: serde_json::Value =
            serde_json::from_str(&answer.body).unwrap_or_else(|e| panic!("{e}: {answer:?}"));
        echoed
    };
    let fields = |traceparent: &str| -> Vec<String> { traceparent.split('-').map(str::to_string).collect() };

    // The client's traceparent, unsampled: not recorded (the request's own decision comes
    // first). The waypoint still gives its span's id to the application, with that decision.
    let (unsampled_trace, client_span) = ("0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331");
    wait_until(CONFIG_WAIT, "the waypoint to serve web", || topo.http(a, &format!("http://{WEB}/"), &[]).status == 200);
    get(None);
    let echoed = get(Some(&format!("00-{unsampled_trace}-{client_span}-00")));
    let seen = fields(echoed["headers"]["traceparent"][0].as_str().unwrap_or_else(|| panic!("{echoed}")));
    assert_eq!((seen[1].as_str(), seen[3].as_str()), (unsampled_trace, "00"), "{echoed}");
    assert_ne!(seen[2], client_span, "the waypoint's span is the application's parent");

    // Sampled by the client: client -> waypoint -> web, which calls api -> waypoint -> api.
    let (trace, client_span) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let echoed = get(Some(&format!("00-{trace}-{client_span}-01")));
    let at_web = fields(echoed["headers"]["traceparent"][0].as_str().unwrap_or_else(|| panic!("{echoed}")));
    assert_eq!((at_web[1].as_str(), at_web[3].as_str()), (trace, "01"), "{echoed}");
    assert_eq!(echoed["headers"]["tracestate"][0], "client=1", "tracestate goes on unchanged: {echoed}");
    assert_eq!(echoed["called"]["status"], 200, "web reached api: {echoed}");
    let web_call = fields(echoed["called"]["traceparent"].as_str().unwrap_or_else(|| panic!("{echoed}")));
    assert_eq!(web_call[1], trace);

    let waypoint_spans = || -> Vec<serde_json::Value> {
        topo.otlp_spans().into_iter().filter(|s| s["service"] == "waypoint.shop").collect()
    };
    wait_until(FLOW_WAIT, "the collector to receive both spans", || {
        waypoint_spans().iter().filter(|s| s["trace_id"] == trace).count() >= 2
    });
    let all = waypoint_spans();
    assert!(all.iter().all(|s| s["trace_id"] != unsampled_trace), "an unsampled trace is not exported: {all:?}");
    let spans: Vec<&serde_json::Value> = all.iter().filter(|s| s["trace_id"] == trace).collect();
    assert_eq!(spans.len(), 2, "one span per sampled request: {spans:?}");
    let outer = spans.iter().find(|s| s["parent_span_id"] == client_span).unwrap_or_else(|| panic!("{spans:?}"));
    let inner =
        spans.iter().find(|s| s["parent_span_id"] == web_call[2].as_str()).unwrap_or_else(|| panic!("{spans:?}"));
    // The links: client -> waypoint span (web) -> web's span -> waypoint span (api).
    assert_eq!(outer["span_id"], at_web[2].as_str(), "web's parent is the waypoint's span: {outer}");
    assert_eq!(outer["name"], "web.shop.svc.cluster.local:80/*", "{outer}");
    assert_eq!(inner["name"], "api.shop.svc.cluster.local:80/*", "{inner}");
    for span in [outer, inner] {
        assert_eq!(span["service"], "waypoint.shop", "{span}");
        assert_eq!(span["kind"], 2, "a server span: {span}");
        assert_eq!(span["attributes"]["http.status_code"], 200, "{span}");
        assert_eq!(span["flags"], 0x301, "sampled, with a remote parent: {span}");
    }
    assert_eq!(outer["trace_state"], "client=1", "{outer}");
    assert_eq!(outer["attributes"]["http.url"], format!("http://{WEB}/outer"), "{outer}");
    assert_eq!(inner["attributes"]["source.principal"], "spiffe://cluster.local/ns/shop/sa/web-1", "{inner}");
    let time = |s: &serde_json::Value, k: &str| s[k].as_u64().unwrap_or_else(|| panic!("{s}"));
    assert!(
        time(outer, "start") <= time(inner, "start") && time(inner, "end") <= time(outer, "end"),
        "the inner request happened within the outer: {outer} {inner}"
    );
    // Counted once the collector has answered the export.
    let exported = || {
        let text = topo.metrics_text(&waypoint.netns);
        let exposition = ferrymesh_testbed::prom::parse(&text).unwrap_or_else(|e| panic!("{e}: {text}"));
        text.contains("ferrymesh_spans_exported_total").then(|| exposition.sum("ferrymesh_spans_exported_total", &[]))
    };
    wait_until(FLOW_WAIT, "every span received to be counted", || exported() == Some(waypoint_spans().len() as f64));

    // A request without a traceparent of its own is the child of its tunnel's span: the source
    // agent's span of the connection, carried in the HBONE CONNECT.
    let tunnel_child = all
        .iter()
        .find(|s| s["attributes"]["http.url"] == format!("http://{WEB}/outer") && s["trace_id"] != trace)
        .unwrap_or_else(|| panic!("the span of the request without a traceparent: {all:?}"));
    let parent = || topo.otlp_spans().into_iter().find(|s| s["span_id"] == tunnel_child["parent_span_id"]);
    // The agent's span ends with its connection, and is exported then.
    wait_until(FLOW_WAIT, "its parent, the agent's span", || parent().is_some());
    let agent_span = parent().unwrap();
    assert_eq!(agent_span["service"], "mesh-agent", "{agent_span}");
    assert_eq!(agent_span["name"], format!("outbound {WEB}:80"), "{agent_span}");
    assert_eq!(agent_span["trace_id"], tunnel_child["trace_id"]);

    // The agents: a connection's span at the source's agent (client) and at the destination's
    // (server), the second the child of the first through the HBONE CONNECT's traceparent.
    let api = topo.pod("shop", "api");
    let target = format!("{}:{ECHO_HTTP_PORT}", api.ip);
    let direct = topo.http(a, &format!("http://{target}/direct"), &[]);
    assert_eq!(direct.status, 200, "{direct:?}");
    let named = |name: String| topo.otlp_spans().into_iter().find(|s| s["name"] == name.as_str());
    wait_until(FLOW_WAIT, "both agents' spans of the connection", || {
        named(format!("outbound {target}")).is_some() && named(format!("inbound {target}")).is_some()
    });
    let client = named(format!("outbound {target}")).unwrap();
    let server = named(format!("inbound {target}")).unwrap();
    assert_eq!((&client["service"], &server["service"]), (&"mesh-agent".into(), &"mesh-agent".into()));
    assert_eq!((&client["attributes"]["node"], &server["attributes"]["node"]), (&"node1".into(), &"node2".into()));
    assert_eq!((&client["kind"], &server["kind"]), (&3.into(), &2.into()), "client and server spans");
    assert_eq!(server["trace_id"], client["trace_id"], "{client} {server}");
    assert_eq!(server["parent_span_id"], client["span_id"], "linked through HBONE: {client} {server}");
    assert_eq!((&client["flags"], &server["flags"]), (&0x101.into(), &0x301.into()));
    assert_eq!(server["attributes"]["source.principal"], CLIENT_ID, "{server}");
    assert_eq!(client["attributes"]["connection_security_policy"], "mtls", "{client}");
    assert!(server["attributes"]["bytes_sent"].as_i64() > Some(0), "{server}");
}
