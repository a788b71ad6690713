//! The waypoint's request handling on an accepted tunnel: whatever bytes a client sends as
//! HTTP/1.1 or HTTP/2 (prior knowledge) go through parsing, path normalization, JWT
//! authentication, authorization, rate limits and routing, with the mesh of
//! `ferrymesh_fuzz::mesh` (its backends have no ready endpoint, so nothing leaves the process).
//! The first byte picks the client (a pod of the namespace, one of another, or no identity) and
//! the port (HTTP or gRPC Service). The waypoint never panics and ends once the client has gone;
//! every HTTP/1.1 answer it writes is a well-formed response, and none is a success (nothing
//! was forwarded).
#![no_main]

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use ferrymesh_dataplane::identity::{Identity, IdentityManager};
use ferrymesh_dataplane::state::State;
use libfuzzer_sys::fuzz_target;
use mesh_waypoint::listener::{Destination, Downstream, Waypoint};

/// A waypoint shop/waypoint holding `ferrymesh_fuzz::mesh()`, made once.
fn waypoint() -> Arc<Waypoint> {
    static WAYPOINT: OnceLock<Arc<Waypoint>> = OnceLock::new();
    WAYPOINT
        .get_or_init(|| {
            let state = Arc::new(State::default());
            state.apply(ferrymesh_fuzz::mesh()).expect("the mesh applies");
            // No token: certificates are never asked for (and nothing is dialled: no endpoint
            // is ready).
            let ctrl = ferrymesh_dataplane::ctrl::Ctrl::new("https://127.0.0.1:15012", Some("/nonexistent".as_ref()))
                .expect("a ctrl address");
            let identities = Arc::new(IdentityManager::new(ctrl, None, state.trust_domain(), state.trust()));
            let identity = Identity { namespace: "shop".into(), service_account: "waypoint".into() };
            let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
            let _entered = runtime.enter();
            let windows = ferrymesh_dataplane::hbone::budget::WindowBudget::new(64 << 20);
            Arc::new(Waypoint {
                key: "shop/waypoint".into(),
                gateway: ("shop".into(), "waypoint".into()),
                trust_domain: ferrymesh_fuzz::TRUST_DOMAIN.into(),
                state: state.clone(),
                upstream: mesh_waypoint::upstream::Upstream::new(
                    state,
                    identities,
                    identity,
                    "10.244.1.9".parse().unwrap(),
                    windows.clone(),
                ),
                log: ferrymesh_dataplane::flows::AccessLog::open("off").expect("no log"),
                rolls: Default::default(),
                fault_rolls: Default::default(),
                rate_limiters: Default::default(),
                rate_limit_service: mesh_waypoint::global_limits::RateLimitService::new(
                    None,
                    "ferrymesh".into(),
                    std::time::Duration::from_millis(100),
                )
                .expect("no rate-limit service"),
                route_tables: Default::default(),
                keys: mesh_waypoint::authn::KeyStore::new(
                    std::time::Duration::from_secs(1200),
                    std::time::Duration::from_secs(5),
                    false,
                ),
                tracer: ferrymesh_dataplane::spans::Tracer::new(None, 1.0, vec![]).expect("no tracer"),
                paths: Default::default(),
                windows,
                limits: Default::default(),
                load: Arc::default(),
            })
        })
        .clone()
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, bytes)) = data.split_first() else { return };
    let waypoint = waypoint();
    let (service, port) = match pick & 1 {
        0 => ("web", 80),
        _ => ("api", 8080),
    };
    let service = waypoint.state.service(&format!("shop/{service}")).expect("the Service");
    let identity: Option<Arc<str>> = match (pick >> 1) % 3 {
        0 => Some("spiffe://cluster.local/ns/shop/sa/client".into()),
        1 => Some("spiffe://cluster.local/ns/other/sa/intruder".into()),
        _ => None,
    };
    let vip: IpAddr = service.vip.expect("a VIP");
    let downstream = Arc::new(Downstream {
        dest: Destination::Service(service, vip),
        port,
        spiffe_id: identity.as_deref().and_then(|id| id.parse().ok()),
        identity,
        addr: SocketAddr::from(([10, 244, 2, 2], 40000)),
        traceparent: None,
    });
    let (output, ended) = ferrymesh_fuzz::serve_bytes(bytes, |io| async move {
        let _ = mesh_waypoint::listener::serve_http(io, waypoint, downstream).await;
    });
    assert!(ended, "the waypoint ended after its client did");
    if output.starts_with(b"HTTP/1.1 ") {
        let mut headers = [httparse::EMPTY_HEADER; 64];
        let mut response = httparse::Response::new(&mut headers);
        let parsed = response.parse(&output).expect("an HTTP/1.1 response a client parses");
        assert!(parsed.is_complete(), "a whole response head");
        // No endpoint is ready: nothing is forwarded, so nothing succeeds.
        let status = response.code.expect("a status");
        assert!(!(200..300).contains(&status), "{status} without a backend");
    }
});
