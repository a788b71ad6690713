//! What the fuzz targets share: a realistic mesh config (the one the waypoint target serves and
//! the config target applies updates on top of), and an in-memory client for a server future.

use std::future::Future;
use std::time::Duration;

use ferrymesh_api::config as proto;
use ferrymesh_policy::authn::RequestAuthenticationSpec;
use ferrymesh_policy::spec::AuthorizationPolicySpec;

/// The mesh's trust domain.
pub const TRUST_DOMAIN: &str = "cluster.local";
/// The VIP of Service shop/web, bound to waypoint shop/waypoint.
pub const WEB_VIP: &str = "10.96.0.10";
/// A P-256 public key as a JWKS (RFC 7517 appendix A.1's first key), kid "1".
pub const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","use":"sig","kid":"1","alg":"ES256"}]}"#;

/// A mesh of namespace `shop`: pods web-1 (node-1) and client-1 (node-2), Service web (port 80
/// HTTP, 9100 TCP) and api (gRPC), both bound to waypoint shop/waypoint and with no ready
/// endpoint (so a request is routed and refused, never sent anywhere); an HTTPRoute on web with
/// path, header, query and method matches, redirects, rewrites and header filters; a DENY on
/// /admin* and an ALLOW of /public*, of GETs and POSTs with a `x-debug: no` header and of tokens
/// with claim `groups: admin`; a RequestAuthentication with an inline key; a local rate limit
/// per `x-user`.
pub fn mesh() -> proto::ConfigUpdate {
    let workload = |name: &str, ip: &str, node: &str| proto::Workload {
        uid: format!("uid-{name}"),
        name: name.into(),
        namespace: "shop".into(),
        node: node.into(),
        service_account: name.split('-').next().unwrap_or(name).into(),
        ip: ip.into(),
        netns: format!("/var/run/netns/{name}"),
        labels: [("app".to_string(), name.split('-').next().unwrap_or(name).to_string())].into(),
        captured: true,
        ..Default::default()
    };
    let port = |name: &str, port: u32, protocol: &str| proto::ServicePort {
        name: name.into(),
        port,
        protocol: protocol.into(),
    };
    let service = |name: &str, vip: &str, ports: Vec<proto::ServicePort>| proto::Service {
        namespace: "shop".into(),
        name: name.into(),
        vip: vip.into(),
        ports,
        waypoint: "shop/waypoint".into(),
        ..Default::default()
    };
    let policy = |name: &str, json: &str| {
        let spec: AuthorizationPolicySpec = serde_json::from_str(json).expect("policy JSON");
        proto::AuthorizationPolicy::from(&spec.validate("shop", name).expect("a valid policy"))
    };
    let authn: RequestAuthenticationSpec = serde_json::from_str(&format!(
        r#"{{"targetRefs":[{{"kind":"Service","name":"web"}}],"jwtRules":[{{"issuer":"https://issuer.example","audiences":["web"],"jwks":{},"outputPayloadToHeader":"x-jwt-payload"}}]}}"#,
        serde_json::Value::String(JWKS.into())
    ))
    .expect("RequestAuthentication JSON");
    let traffic: ferrymesh_route::traffic::spec::TrafficPolicySpec = serde_json::from_str(
        r#"{"targetRefs":[{"kind":"Service","name":"web"}],"rateLimit":{"local":[{"limit":{"requests":1000,"unit":"Second"},"key":{"header":"x-user"}}]}}"#,
    )
    .expect("TrafficPolicy JSON");
    proto::ConfigUpdate {
        version: 1,
        snapshot: true,
        trust_domain: TRUST_DOMAIN.into(),
        captured_namespaces: vec!["shop".into()],
        upserted: vec![workload("web-1", "10.244.1.2", "node-1"), workload("client-1", "10.244.2.2", "node-2")],
        services: vec![
            service("web", WEB_VIP, vec![port("http", 80, "http"), port("metrics", 9100, "tcp")]),
            service("api", "10.96.0.11", vec![port("grpc", 8080, "http")]),
        ],
        waypoints: vec![proto::Waypoint {
            namespace: "shop".into(),
            name: "waypoint".into(),
            traffic_type: "service".into(),
            addresses: vec!["10.244.1.9".into()],
        }],
        routes: vec![route()],
        authorization_policies: vec![
            policy(
                "deny-admin",
                r#"{"targetRefs":[{"kind":"Service","name":"web"}],"action":"DENY","rules":[{"to":[{"operation":{"paths":["/admin*"]}}]}]}"#,
            ),
            policy(
                "allow-public",
                r#"{"targetRefs":[{"kind":"Service","name":"web"}],"rules":[{"to":[{"operation":{"paths":["/public*"]}}]},{"to":[{"operation":{"methods":["GET","POST"]}}],"when":[{"key":"request.headers[x-debug]","values":["no"]}]},{"when":[{"key":"request.auth.claims[groups]","values":["admin"]}]}]}"#,
            ),
        ],
        request_authentications: vec![proto::RequestAuthentication::from(
            &authn.validate("shop", "jwt").expect("a valid RequestAuthentication"),
        )],
        traffic_policies: vec![proto::TrafficPolicy::from(
            &traffic.validate("shop", "limits").expect("a valid TrafficPolicy"),
        )],
        ..Default::default()
    }
}

/// An HTTPRoute on shop/web: exact, prefix and regex paths, header, query and method matches,
/// a redirect, a prefix rewrite, request and response header filters, two weighted backends.
fn route() -> proto::Route {
    use proto::route_filter::Filter;
    let path =
        |kind: proto::path_match::Kind, value: &str| Some(proto::PathMatch { kind: kind as i32, value: value.into() });
    let value =
        |name: &str, value: &str, regex: bool| proto::ValueMatch { name: name.into(), value: value.into(), regex };
    let backend = |service: &str, weight: u32| proto::RouteBackend {
        namespace: "shop".into(),
        service: service.into(),
        port: 80,
        weight,
        ..Default::default()
    };
    let filter = |filter: Filter| proto::RouteFilter { filter: Some(filter) };
    let rule = |matches: Vec<proto::RouteMatch>, filters: Vec<proto::RouteFilter>| proto::RouteRule {
        matches,
        filters,
        backends: vec![backend("web", 90), backend("api", 10)],
        ..Default::default()
    };
    let headers = proto::HeaderModifier {
        set: vec![proto::Header { name: "x-route".into(), value: "fuzz".into() }],
        add: vec![proto::Header { name: "x-added".into(), value: "1".into() }],
        remove: vec!["x-remove".into()],
    };
    proto::Route {
        namespace: "shop".into(),
        name: "web".into(),
        kind: "HTTPRoute".into(),
        parents: vec![proto::RouteParent { namespace: "shop".into(), service: "web".into(), port: 0 }],
        hostnames: vec![],
        created_unix: 1_700_000_000,
        rules: vec![
            rule(
                vec![proto::RouteMatch { path: path(proto::path_match::Kind::Exact, "/old"), ..Default::default() }],
                vec![filter(Filter::Redirect(proto::Redirect {
                    scheme: "https".into(),
                    path: Some(proto::PathReplace { prefix: false, value: "/new".into() }),
                    status: 301,
                    ..Default::default()
                }))],
            ),
            rule(
                vec![proto::RouteMatch {
                    path: path(proto::path_match::Kind::Prefix, "/v1"),
                    headers: vec![value("x-version", "^v[0-9]+$", true)],
                    query_params: vec![value("debug", "1", false)],
                    method: "POST".into(),
                }],
                vec![filter(Filter::Rewrite(proto::Rewrite {
                    hostname: "web.internal".into(),
                    path: Some(proto::PathReplace { prefix: true, value: "/v2".into() }),
                }))],
            ),
            rule(
                vec![proto::RouteMatch {
                    path: path(proto::path_match::Kind::Regex, "/items/[0-9]+"),
                    ..Default::default()
                }],
                vec![filter(Filter::RequestHeaders(headers.clone())), filter(Filter::ResponseHeaders(headers))],
            ),
            rule(vec![], vec![]),
        ],
    }
}

/// Runs `serve` (a server on the far end of an in-memory pipe) while a client writes `input`,
/// closes its side and reads what the server wrote, on a single-threaded runtime whose clock
/// moves on whenever everything waits (so timeouts pass at once). Returns what the server
/// wrote, and whether both ended within a minute of that clock.
pub fn serve_bytes<F, S>(input: &[u8], serve: F) -> (Vec<u8>, bool)
where
    F: FnOnce(tokio::io::DuplexStream) -> S,
    S: Future<Output = ()>,
{
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime =
        tokio::runtime::Builder::new_current_thread().enable_all().start_paused(true).build().expect("a runtime");
    runtime.block_on(async {
        let (mut client, server) = tokio::io::duplex(1 << 16);
        let talk = async move {
            let mut output = Vec::new();
            let (mut read, mut write) = tokio::io::split(&mut client);
            let writing = async {
                let _ = write.write_all(input).await;
                // Answers come back before the client closes (a closed connection's pending
                // requests are dropped): wait until the server has nothing more to say for now.
                tokio::time::sleep(Duration::from_millis(10)).await;
                let _ = write.shutdown().await;
            };
            let reading = read.read_to_end(&mut output);
            let _ = tokio::join!(writing, reading);
            output
        };
        let both = async { tokio::join!(serve(server), talk) };
        match tokio::time::timeout(Duration::from_secs(60), both).await {
            Ok(((), output)) => (output, true),
            Err(_) => (Vec::new(), false),
        }
    })
}

#[cfg(test)]
mod tests {
    use prost::Message;

    use super::proto;

    /// Writes the seed inputs of the corpora made from this crate's config (run by hand with
    /// `cargo test --manifest-path fuzz/Cargo.toml -- --ignored`, then commit fuzz/corpus).
    #[test]
    #[ignore = "writes the committed seed corpus"]
    fn write_seeds() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus/config_update");
        std::fs::create_dir_all(&dir).unwrap();
        let mesh = super::mesh();
        std::fs::write(dir.join("seed-mesh-snapshot"), mesh.encode_to_vec()).unwrap();
        let delta = delta(&mesh);
        std::fs::write(dir.join("seed-mesh-delta"), delta.encode_to_vec()).unwrap();
    }

    #[test]
    fn the_mesh_applies() {
        let state = ferrymesh_dataplane::state::State::default();
        state.apply(super::mesh()).unwrap();
        assert!(state.service("shop/web").is_some());
    }

    /// A delta on `mesh`: web-1 removed, a policy and a route removed, the workloads of another node.
    fn delta(mesh: &proto::ConfigUpdate) -> proto::ConfigUpdate {
        proto::ConfigUpdate {
            version: 2,
            snapshot: false,
            removed: vec!["uid-web-1".into()],
            removed_authorization_policies: vec!["shop/deny-admin".into()],
            removed_routes: vec!["HTTPRoute shop/web".into()],
            upserted: mesh
                .upserted
                .iter()
                .cloned()
                .map(|mut w| {
                    w.other_ips = vec!["fd00::2".into()];
                    w
                })
                .collect(),
            ..Default::default()
        }
    }
}
