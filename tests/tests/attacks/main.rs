//! Attack tests: each one is an attack on the mesh, run against the real binaries on the netns
//! topology (or through the Kubernetes API fake), judged by what the attacker and the victim
//! see: exit codes, bodies, the client address a server saw. One module per area; the table
//! in docs/SECURITY.md names, for each attack, where it is refused and which test proves it.
//! Needs root.

mod capture;
mod ctrl;
mod listeners;
mod netns;
mod paths;
mod policy;
mod pool;
mod request;
mod routes;
mod tls;
mod windows;

use ferrymesh_testbed::mesh::{CONFIG_WAIT, DATAPLANE_MODE, ECHO_HTTP_PORT};
use ferrymesh_testbed::{Topology, TopologySpec};

/// VIP of Service shop/web (pod web-1), bound to shop's waypoint.
pub const WEB: &str = "10.96.0.50";
/// VIP of Service shop/api (pod api-1), bound to shop's waypoint.
pub const API: &str = "10.96.0.52";
/// VIP of Service shop/plain (pod web-1 too), bound to no waypoint.
pub const PLAIN: &str = "10.96.0.53";
/// VIP of Service evil/sink (pod sink).
pub const SINK: &str = "10.96.0.60";
/// VIP of Service evil/proxy, which an attack writes: no selector, its endpoint the attacker's
/// choice.
pub const PROXY: &str = "10.96.0.61";

/// Two tenants: `shop` bound to its waypoint (on node 2), with a (client), web-1 and api-1;
/// `evil` with e (client) and sink, bound to no waypoint; and `legacy`'s x, outside the mesh. `before_start` writes more config;
/// then the mesh starts and the backends serve fm-echo.
pub fn tenants(before_start: impl FnOnce(&Topology)) -> Topology {
    let spec = TopologySpec::nodes(2)
        .pod("shop", "a", 1)
        .pod("shop", "web-1", 1)
        .pod("shop", "api-1", 2)
        .pod("shop", "waypoint", 2)
        .pod("evil", "e", 1)
        .pod("evil", "sink", 2)
        .pod("legacy", "x", 1);
    let topo = Topology::build(&spec);
    topo.write_cluster(&["shop", "evil"]);
    topo.write_namespace("shop", &[(DATAPLANE_MODE, "enabled"), ("ferrymesh.io/use-waypoint", "waypoint")]);
    topo.write_pod(topo.pod("shop", "web-1"), &[("app", "web")]);
    topo.write_pod(topo.pod("shop", "api-1"), &[("app", "api")]);
    topo.write_pod(topo.pod("evil", "sink"), &[("app", "sink")]);
    topo.write_waypoint_pod(topo.pod("shop", "waypoint"));
    topo.write_waypoint("shop", "waypoint");
    let echo = ECHO_HTTP_PORT.to_string();
    topo.write_service("shop", "web", WEB, &[("app", "web")], &[("http", 80, &echo)]);
    topo.write_service("shop", "api", API, &[("app", "api")], &[("http", 80, &echo)]);
    topo.write_service("evil", "sink", SINK, &[("app", "sink")], &[("http", 80, &echo)]);
    before_start(&topo);
    topo.start_mesh();
    topo.wait_enrolled(1, &["evil/e", "shop/a", "shop/web-1"], CONFIG_WAIT * 4);
    topo.wait_enrolled(2, &["evil/sink", "shop/api-1"], CONFIG_WAIT * 4);
    topo.start_waypoint(topo.pod("shop", "waypoint"));
    for pod in [topo.pod("shop", "web-1"), topo.pod("shop", "api-1"), topo.pod("evil", "sink")] {
        topo.serve_echo(pod);
    }
    topo
}
