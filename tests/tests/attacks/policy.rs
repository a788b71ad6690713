//! M3: a DENY at a destination never fails open through a waypoint. The destination's agent
//! sees the waypoint as the client, so a DENY naming the original client (its namespace,
//! principal or address) never matched there: any client could get around it by calling a
//! Service bound to a waypoint. The waypoint applies the endpoints' own DENY rules to the
//! original client.

use ferrymesh_testbed::mesh::{wait_until, CONFIG_WAIT, ECHO_HTTP_PORT};

use crate::{tenants, API, PLAIN, WEB};

#[test]
fn a_deny_on_a_client_holds_with_and_without_a_waypoint() {
    let topo = tenants(|topo| {
        // shop/plain: web-1 again, bound to no waypoint.
        let echo = ECHO_HTTP_PORT.to_string();
        topo.write_service("shop", "plain", PLAIN, &[("app", "web")], &[("http", 80, &echo)]);
        let plain = std::fs::read_to_string(topo.config_dir().join("svc-shop-plain.yaml")).unwrap();
        let plain = plain.replace("  name: plain\n", "  name: plain\n  labels:\n    ferrymesh.io/use-waypoint: none\n");
        topo.write_config_file("svc-shop-plain.yaml", &plain);
        // web-1 refuses namespace evil; api-1 refuses e's address.
        topo.write_config_file(
            "policy-deny-evil.yaml",
            "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-evil\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: web\n  action: DENY\n  rules:\n  - from:\n    - source:\n        namespaces: [evil]\n",
        );
        topo.write_config_file(
            "policy-deny-e.yaml",
            &format!(
                "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-e\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: api\n  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{}/32\"]\n",
                topo.pod("evil", "e").ip
            ),
        );
    });
    let (a, e) = (topo.pod("shop", "a"), topo.pod("evil", "e"));
    let (web_1, api_1) = (topo.pod("shop", "web-1"), topo.pod("shop", "api-1"));
    // shop's own client reaches all three: the denials are e's alone.
    wait_until(CONFIG_WAIT * 2, "a to reach shop/plain", || {
        topo.http(a, &format!("http://{PLAIN}/from-a"), &[]).status == 200
    });
    for vip in [WEB, API, PLAIN] {
        let answer = topo.http(a, &format!("http://{vip}/from-a"), &[]);
        assert_eq!(answer.status, 200, "a -> {vip}: {answer:?}");
    }
    // Without a waypoint, web-1's agent refuses e.
    let answer = topo.http(e, &format!("http://{PLAIN}/direct"), &[]);
    assert_eq!(answer.status, 0, "e -> shop/plain is refused at web-1: {answer:?}");
    // Through the waypoint, the same DENY holds, and api-1's too.
    for (vip, policy) in [(WEB, "shop/deny-evil rule 0"), (API, "shop/deny-e rule 0")] {
        let answer = topo.http(e, &format!("http://{vip}/through-the-waypoint"), &[]);
        assert_eq!(answer.status, 403, "e -> {vip}: {answer:?}");
        assert!(answer.body.contains(policy), "{answer:?}");
    }
    for pod in [web_1, api_1] {
        let reached = topo.echo_requests(pod).iter().filter(|r| r["path"] != "/from-a").count();
        assert_eq!(reached, 0, "{} served e: {:?}", pod.name, topo.echo_requests(pod));
    }
}
