//! M12: the waypoint's 15008 had none of the agent's caps: any address could hold unbounded
//! connections open, each with TLS state allocated before its first byte, for the 10 s
//! handshake timeout. It now counts connections and streams per source and in all, as the
//! agent's pods do, and allocates nothing for TLS before a client speaks.

use std::net::SocketAddr;

use ferrymesh_testbed::mesh::{wait_until, CONFIG_WAIT};

use crate::{half_open_flood, tenants, WEB};

/// Half-open connections the flood opens from one address, and the cap it meets.
const FLOOD: usize = 2000;
const PER_SOURCE: usize = 512;

#[test]
fn a_half_open_flood_on_the_waypoint_is_capped_per_source_while_its_clients_are_served() {
    let topo = tenants(|_| {});
    let (a, x, waypoint) = (topo.pod("shop", "a"), topo.pod("legacy", "x"), topo.pod("shop", "waypoint"));
    let url = format!("http://{WEB}/before");
    wait_until(CONFIG_WAIT * 2, "requests through the waypoint", || topo.http(a, &url, &[]).status == 200);
    let target = SocketAddr::from((waypoint.ip, 15008));
    // The waypoint's clients are served meanwhile.
    let closed = half_open_flood(&x.netns, target, FLOOD, PER_SOURCE, || {
        for i in 0..20 {
            let answer = topo.http(a, &format!("http://{WEB}/during/{i}"), &[]);
            assert_eq!(answer.status, 200, "a request during the flood: {answer:?}");
        }
    });
    assert!(
        closed >= FLOOD - PER_SOURCE,
        "{closed} of {FLOOD} half-open connections closed by the waypoint within 5 s"
    );
}
