//! C2, M1, M10: namespace boundaries of L7 config. A tenant of namespace `evil` writes config
//! naming another namespace's Service: a route attached to it (to take its requests), a
//! DestinationRule for it (to set cookies on its answers), a binding of its own Service to
//! that namespace's waypoint (to reach the waypoint owner's pods with the waypoint's identity).
//! The victim's clients must see none of it; the attacker's own clients do get the route and
//! the rule, as GAMMA and Istio scope them to the namespace that wrote them.

use ferrymesh_testbed::mesh::{wait_until, CONFIG_WAIT, ECHO_HTTP_PORT};
use ferrymesh_testbed::Topology;

use crate::{tenants, API, PROXY, WEB};

/// [`tenants`], web-1 admitting only the waypoint, as an operator keeps clients from going
/// around it.
fn cluster() -> Topology {
    tenants(|topo| {
        topo.write_config_file(
            "policy-web-only-waypoint.yaml",
            "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: only-waypoint\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: web\n  action: ALLOW\n  rules:\n  - from:\n    - source:\n        principals: [\"cluster.local/ns/shop/sa/waypoint\"]\n",
        );
    })
}

/// A route of namespace `evil` on shop/web: /login goes to the attacker's sink.
const STEAL: &str = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata:\n  name: steal\n  namespace: evil\nspec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    namespace: shop\n    name: web\n    port: 80\n  rules:\n  - matches:\n    - path:\n        type: PathPrefix\n        value: /login\n    backendRefs:\n    - name: sink\n      port: 80\n";

/// A DestinationRule of namespace `evil` for shop/api: a cookie on every answer.
const COOKIE: &str = "apiVersion: ferrymesh.io/v1alpha1\nkind: DestinationRule\nmetadata:\n  name: cookie\n  namespace: evil\nspec:\n  host: api.shop.svc.cluster.local\n  trafficPolicy:\n    loadBalancer:\n      consistentHash:\n        httpCookie:\n          name: evil-cookie\n          ttl: 60s\n";

#[test]
fn another_namespaces_route_takes_only_its_own_clients_requests() {
    let topo = cluster();
    let (a, e, sink) = (topo.pod("shop", "a"), topo.pod("evil", "e"), topo.pod("evil", "sink"));
    topo.write_config_file("route-evil-steal.yaml", STEAL);
    // The attacker's own clients get the route once it is in force (a consumer route): the
    // sign that the waypoint holds it.
    wait_until(CONFIG_WAIT * 4, "the attacker's route to serve the attacker's client", || {
        let answer = topo.http(e, &format!("http://{WEB}/login"), &[]);
        answer.status == 200 && answer.json()["pod"] == "sink"
    });
    for _ in 0..5 {
        let answer = topo.http(a, &format!("http://{WEB}/login/victim"), &[]);
        assert_eq!((answer.status, answer.json()["pod"].as_str()), (200, Some("web-1")), "{answer:?}");
    }
    let stolen = topo.echo_requests(sink).into_iter().filter(|r| r["path"] == "/login/victim").count();
    assert_eq!(stolen, 0, "the sink saw the victim's requests");
}

#[test]
fn another_namespaces_destination_rule_governs_only_its_own_clients_requests() {
    let topo = cluster();
    let (a, e) = (topo.pod("shop", "a"), topo.pod("evil", "e"));
    topo.write_config_file("destination-evil-api.yaml", COOKIE);
    // The attacker's own requests get the rule's cookie once it is in force (a rule of the
    // client's namespace, as Istio applies it).
    wait_until(CONFIG_WAIT * 4, "the attacker's rule to govern the attacker's requests", || {
        let answer = topo.http(e, &format!("http://{API}/"), &[]);
        answer.status == 200 && answer.header("set-cookie").is_some_and(|c| c.starts_with("evil-cookie="))
    });
    for _ in 0..5 {
        let answer = topo.http(a, &format!("http://{API}/"), &[]);
        assert_eq!(answer.status, 200, "{answer:?}");
        assert_eq!(answer.header("set-cookie"), None, "{answer:?}");
    }
}

#[test]
fn another_namespaces_service_bound_to_a_waypoint_without_its_consent_does_not_pass_it() {
    let topo = cluster();
    let (e, web_1) = (topo.pod("evil", "e"), topo.pod("shop", "web-1"));
    // evil/proxy: no selector, web-1 as its endpoint, bound to shop's waypoint.
    topo.write_config_file(
        "slice-evil-proxy.yaml",
        &format!(
            "apiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\nmetadata:\n  name: proxy-1\n  namespace: evil\n  labels:\n    kubernetes.io/service-name: proxy\naddressType: IPv4\nports:\n- name: http\n  port: {ECHO_HTTP_PORT}\nendpoints:\n- addresses: [{}]\n",
            web_1.ip
        ),
    );
    topo.write_config_file(
        "svc-evil-proxy.yaml",
        &format!(
            "apiVersion: v1\nkind: Service\nmetadata:\n  name: proxy\n  namespace: evil\n  labels:\n    ferrymesh.io/use-waypoint: waypoint\n    ferrymesh.io/use-waypoint-namespace: shop\nspec:\n  clusterIP: {PROXY}\n  ports:\n  - name: http\n    port: 80\n    targetPort: {ECHO_HTTP_PORT}\n"
        ),
    );
    wait_until(CONFIG_WAIT * 4, "e's agent to hold evil/proxy", || {
        String::from_utf8_lossy(&topo.meshctl(1, &["services"]).stdout).contains("evil/proxy")
    });
    for _ in 0..3 {
        let answer = topo.http(e, &format!("http://{PROXY}/through-the-waypoint"), &[]);
        assert_ne!(answer.status, 200, "the attacker reached shop's pod: {answer:?}");
    }
    let reached = topo.echo_requests(web_1).into_iter().filter(|r| r["path"] == "/through-the-waypoint").count();
    assert_eq!(reached, 0, "web-1 served the attacker");
}
