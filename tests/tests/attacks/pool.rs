//! H3: pods of one ServiceAccount on one node share HBONE connections. The destination takes
//! the TCP peer as the client, so one pod's traffic arrives with the other pod's source IP: an
//! `ipBlocks` rule, the app's view of its client and the flows all name the wrong pod.

use ferrymesh_testbed::mesh::{wait_until, CONFIG_WAIT};
use ferrymesh_testbed::{Topology, TopologySpec};

#[test]
fn pods_sharing_a_service_account_each_reach_the_server_with_their_own_ip() {
    let spec = TopologySpec::nodes(2).pod("shop", "a1", 1).pod("shop", "a2", 1).pod("shop", "c", 2);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop"]);
    let (a1, a2, c) = (topo.pod("shop", "a1"), topo.pod("shop", "a2"), topo.pod("shop", "c"));
    // Two replicas of one app: one ServiceAccount, one identity.
    for pod in [a1, a2] {
        let text = topo.pod_yaml_as(pod, &[], "app");
        topo.write_config_file(&format!("pod-shop-{}.yaml", pod.name), &text);
    }
    topo.write_pod(c, &[("app", "c")]);
    topo.start_mesh();
    topo.wait_enrolled(1, &["shop/a1", "shop/a2"], CONFIG_WAIT * 4);
    topo.wait_enrolled(2, &["shop/c"], CONFIG_WAIT * 4);
    topo.serve_all();

    // a1 holds an HBONE connection to c open; a2's connections follow while it is open.
    let held = topo.start_ping("a1-holds", a1, c.ip, 600);
    for _ in 0..3 {
        let body = topo.curl(a2, c.ip);
        assert!(body.starts_with(&format!("client {}:", a2.ip)), "c saw a2 as {body}");
        let body = topo.curl(a1, c.ip);
        assert!(body.starts_with(&format!("client {}:", a1.ip)), "c saw a1 as {body}");
    }

    // A DENY of a2's address at c refuses a2, and a2 only.
    topo.write_config_file(
        "policy-deny-a2.yaml",
        &format!(
            "apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-a2\n  namespace: shop\nspec:\n  selector:\n    matchLabels:\n      app: c\n  action: DENY\n  rules:\n  - from:\n    - source:\n        ipBlocks: [\"{}/32\"]\n",
            a2.ip
        ),
    );
    wait_until(CONFIG_WAIT * 2, "the policy to refuse a2", || topo.try_curl(a2, c.ip.into()).0 != Some(0));
    for _ in 0..3 {
        let (code, text, _) = topo.try_curl(a2, c.ip.into());
        assert_ne!(code, Some(0), "a2 is denied: {text}");
        let body = topo.curl(a1, c.ip);
        assert!(body.starts_with(&format!("client {}:", a1.ip)), "a1 is not: {body}");
    }
    assert!(topo.is_running(&held), "a1's held connection is untouched: {}", topo.log(&held));
}
