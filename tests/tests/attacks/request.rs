//! The request path at the waypoint: what a client can do with the bytes of one request.
//!
//! H7: `outputPayloadToHeader` names the header a verified JWT's payload goes upstream in, and
//! backends trust it as the authenticated user. A client that sends that header itself, with no
//! token, must not have it reach the backend.
//!
//! M5: a header sent twice. A DENY on `request.headers[x-debug]` read only the first value, so
//! `x-debug: no` then `x-debug: true` passed it to a backend that reads the last; a value with a
//! byte past ASCII read as no header at all.
//!
//! M4: an upgrade. Any `Upgrade` was forwarded and, on a 101, the connection spliced: an
//! `Upgrade: h2c` on an allowed path gave the client an HTTP/2 connection to the backend whose
//! requests (`/admin`) no policy saw. Only `websocket` upgrades now, each authorized as the
//! request it is.
//!
//! M2: L7 or L4 was the client's choice on a port that declares no protocol: a leading CRLF or a
//! pause of 100 ms made the waypoint relay the connection as TCP, past the Service's rate limit.
//! The port decides now: one that declares nothing is HTTP.
//!
//! M11: a tenant's RequestAuthentication made the waypoint GET any `jwksUri`: its own loopback
//! (an admin endpoint), the cloud's metadata address.

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use ferrymesh_testbed::mesh::{bin, wait_until, CONFIG_WAIT, ECHO_HTTP_PORT};
use ferrymesh_testbed::topology::in_netns;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::{tenants, WEB};

/// An EC public key (RFC 7517's example), as an inline JWKS.
const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","kid":"k1","alg":"ES256"}]}"#;

#[test]
fn a_client_set_jwt_payload_header_never_reaches_the_backend() {
    let topo = tenants(|topo| {
        topo.write_config_file(
            "authn-web.yaml",
            &format!(
                "apiVersion: ferrymesh.io/v1alpha1\nkind: RequestAuthentication\nmetadata:\n  name: jwt\n  namespace: shop\nspec:\n  targetRefs:\n  - group: \"\"\n    kind: Service\n    name: web\n  jwtRules:\n  - issuer: https://issuer.example\n    jwks: '{JWKS}'\n    outputPayloadToHeader: x-jwt-payload\n"
            ),
        );
    });
    let (a, web_1) = (topo.pod("shop", "a"), topo.pod("shop", "web-1"));
    // {"sub":"admin","iss":"https://issuer.example"}, as a backend would read it.
    let forged = "x-jwt-payload: eyJzdWIiOiJhZG1pbiIsImlzcyI6Imh0dHBzOi8vaXNzdWVyLmV4YW1wbGUifQ";
    // The RequestAuthentication is in force once a bad token is refused.
    wait_until(CONFIG_WAIT * 2, "the RequestAuthentication at the waypoint", || {
        topo.http(a, &format!("http://{WEB}/probe"), &["-H", "authorization: Bearer not.a.jwt"]).status == 401
    });
    for (path, extra) in [("/anonymous", vec!["-H", forged]), ("/twice", vec!["-H", forged, "-H", forged])] {
        let answer = topo.http(a, &format!("http://{WEB}{path}"), &extra);
        assert_eq!(answer.status, 200, "{answer:?}");
        let headers = &answer.json()["headers"];
        assert!(headers.get("x-jwt-payload").is_none(), "{path}: the backend got the client's payload: {headers}");
    }
    let at_backend: Vec<_> =
        topo.echo_requests(web_1).into_iter().filter(|r| r["headers"].get("x-jwt-payload").is_some()).collect();
    assert!(at_backend.is_empty(), "{at_backend:?}");
}

/// An AuthorizationPolicy on Service shop/web.
fn policy_on_web(name: &str, spec: &str) -> String {
    format!("apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  targetRefs:\n  - group: \"\"\n    kind: Service\n    name: web\n{spec}")
}

#[test]
fn a_second_value_of_a_header_cannot_dodge_a_deny_on_it() {
    let topo = tenants(|topo| {
        topo.write_config_file(
            "policy-web-deny-debug.yaml",
            &policy_on_web(
                "deny-debug",
                "  action: DENY\n  rules:\n  - when:\n    - key: request.headers[x-debug]\n      values: [\"true\"]\n  - when:\n    - key: request.headers[x-internal]\n      values: [\"*\"]\n",
            ),
        );
    });
    let (a, web_1) = (topo.pod("shop", "a"), topo.pod("shop", "web-1"));
    let url = format!("http://{WEB}/debug");
    wait_until(CONFIG_WAIT * 2, "the DENY at the waypoint", || {
        topo.http(a, &url, &["-H", "x-debug: true"]).status == 403
    });
    // The control: a request the DENY does not name passes.
    assert_eq!(topo.http(a, &url, &["-H", "x-debug: no"]).status, 200);
    let before = topo.echo_requests(web_1).len();
    let attempts: [&[&str]; 4] = [
        &["-H", "x-debug: no", "-H", "x-debug: true"],
        &["-H", "x-debug: true", "-H", "x-debug: no"],
        &["-H", "x-debug: no", "-H", "x-debug: true", "--http2-prior-knowledge"],
        &["-H", "x-internal: caf\u{e9}"],
    ];
    for args in attempts {
        let answer = topo.http(a, &url, args);
        assert_eq!(answer.status, 403, "{args:?}: {answer:?}");
    }
    let after = topo.echo_requests(web_1);
    assert_eq!(after.len(), before, "the backend saw a denied request: {:?}", &after[before..]);
}

/// The status line's code of an HTTP/1.1 answer, 0 when there is none.
fn status_of(answer: &[u8]) -> u16 {
    String::from_utf8_lossy(answer).split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
}

/// An h2c upgrade on `path` from `netns` to `to`, then, if the answer is 101, `GET /admin` over
/// HTTP/2 on the switched connection: (the upgrade's status, the tunnelled request's status).
fn h2c_then_admin(netns: &str, to: SocketAddr, path: &str) -> (u16, Option<u16>) {
    in_netns(netns, || {
        let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        runtime.block_on(async {
            let exchange = async {
                let mut tcp = tokio::net::TcpStream::connect(to).await.ok()?;
                let upgrade = format!(
                    "GET {path} HTTP/1.1\r\nHost: web\r\nConnection: Upgrade, HTTP2-Settings\r\nUpgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n"
                );
                tcp.write_all(upgrade.as_bytes()).await.ok()?;
                // The answer's head, byte by byte: what follows a 101 is HTTP/2.
                let mut head = Vec::new();
                while !head.ends_with(b"\r\n\r\n") {
                    let mut byte = [0u8; 1];
                    if tcp.read(&mut byte).await.ok()? == 0 {
                        break;
                    }
                    head.push(byte[0]);
                }
                let status = status_of(&head);
                if status != 101 {
                    return Some((status, None));
                }
                let Ok((mut sender, connection)) = h2::client::handshake(tcp).await else { return Some((status, Some(0))) };
                tokio::spawn(connection);
                let request = http::Request::get("http://web/admin").body(()).unwrap();
                let Ok((response, _)) = sender.send_request(request, true) else { return Some((status, Some(0))) };
                let tunnelled = response.await.map_or(0, |r| r.status().as_u16());
                Some((status, Some(tunnelled)))
            };
            tokio::time::timeout(Duration::from_secs(10), exchange).await.ok().flatten().unwrap_or((0, None))
        })
    })
}

#[test]
fn only_a_websocket_upgrade_passes_and_each_is_authorized_as_its_own_request() {
    let topo = tenants(|topo| {
        topo.write_config_file(
            "policy-web-deny-admin.yaml",
            &policy_on_web(
                "deny-admin",
                "  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin*\"]\n",
            ),
        );
    });
    let (a, web_1) = (topo.pod("shop", "a"), topo.pod("shop", "web-1"));
    let to: SocketAddr = format!("{WEB}:80").parse().unwrap();
    wait_until(CONFIG_WAIT * 2, "the DENY at the waypoint", || {
        topo.http(a, &format!("http://{WEB}/admin"), &[]).status == 403
    });
    // A WebSocket on an allowed path is switched and echoed; on a denied one, refused.
    let ws = |path: &str| {
        topo.output_in(&a.netns, bin("fm-echo"), &["ws", "--to", &to.to_string(), "--path", path, "--messages", "3"])
    };
    let public = ws("/public/ws");
    let echoed: serde_json::Value = serde_json::from_slice(&public.stdout).unwrap_or_default();
    assert_eq!(
        (echoed["status"].as_u64(), echoed["echoed"].as_u64()),
        (Some(101), Some(3)),
        "{echoed} {}",
        String::from_utf8_lossy(&public.stderr)
    );
    let admin = ws("/admin/ws");
    assert!(!admin.status.success(), "a WebSocket to /admin: {}", String::from_utf8_lossy(&admin.stdout));
    let before = topo.echo_requests(web_1).len();

    // h2c on an allowed path: refused, so no HTTP/2 connection carries /admin to the backend.
    let (upgrade, tunnelled) = h2c_then_admin(&a.netns, to, "/public");
    assert!((400..500).contains(&upgrade) && tunnelled.is_none(), "h2c: {upgrade}, then /admin: {tunnelled:?}");
    // Any other protocol is refused alike.
    for protocol in ["tunnel", "websocket, h2c", "TLS/1.2"] {
        let answer = topo.http(
            a,
            &format!("http://{WEB}/public"),
            &["-H", "connection: upgrade", "-H", &format!("upgrade: {protocol}")],
        );
        assert_eq!(answer.status, 403, "upgrade {protocol}: {answer:?}");
    }
    let after = topo.echo_requests(web_1);
    assert_eq!(after.len(), before, "the backend saw a refused upgrade: {:?}", &after[before..]);
    assert!(!after.iter().any(|r| r["path"] == "/admin"), "{after:?}");
}

/// One HTTP/1.1 exchange from `netns` to `to`: `first`, then after `pause` the `rest`; the
/// answer's status, 0 when the connection ended without one.
fn sent_in_two(netns: &str, to: SocketAddr, first: &[u8], pause: Duration, rest: &[u8]) -> u16 {
    in_netns(netns, || {
        let Ok(mut stream) = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)) else { return 0 };
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        stream.set_nodelay(true).unwrap();
        if stream.write_all(first).is_err() {
            return 0;
        }
        // The attack's own timing: the client holds back the rest of its request.
        std::thread::sleep(pause);
        if stream.write_all(rest).is_err() {
            return 0;
        }
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        status_of(&answer)
    })
}

#[test]
fn a_client_cannot_get_l4_treatment_on_an_http_port() {
    // Service site: web-1 behind a port that declares no protocol (name `web`), and Service web
    // (port `http`); each limited to one request a minute.
    const SITE: &str = "10.96.0.54";
    let limit = |service: &str| {
        format!("apiVersion: ferrymesh.io/v1alpha1\nkind: TrafficPolicy\nmetadata:\n  name: {service}-limit\n  namespace: shop\nspec:\n  targetRefs:\n  - kind: Service\n    name: {service}\n  rateLimit:\n    local:\n    - limit:\n        requests: 1\n        unit: Minute\n")
    };
    let topo = tenants(|topo| {
        let echo = ECHO_HTTP_PORT.to_string();
        topo.write_service("shop", "site", SITE, &[("app", "web")], &[("web", 80, &echo)]);
        topo.write_config_file("traffic-site.yaml", &limit("site"));
        topo.write_config_file("traffic-web.yaml", &limit("web"));
    });
    let (a, web_1) = (topo.pod("shop", "a"), topo.pod("shop", "web-1"));
    let request = b"GET /limited HTTP/1.1\r\nHost: site\r\nConnection: close\r\n\r\n";
    for vip in [SITE, WEB] {
        let to: SocketAddr = format!("{vip}:80").parse().unwrap();
        // The limit is in force once a request is refused with 429.
        wait_until(CONFIG_WAIT * 2, "the rate limit at the waypoint", || {
            sent_in_two(&a.netns, to, request, Duration::ZERO, b"") == 429
        });
        let before = topo.echo_requests(web_1).len();
        let attempts: [(&str, &[u8], Duration, &[u8]); 4] = [
            ("a leading CRLF", b"\r\n", Duration::ZERO, request),
            ("a pause after the first byte", b"G", Duration::from_millis(300), &request[1..]),
            ("a pause before anything", b"", Duration::from_millis(300), request),
            ("garbage", b"\x16\x03\x01 hello\r\n\r\n", Duration::ZERO, b""),
        ];
        for (what, first, pause, rest) in attempts {
            let status = sent_in_two(&a.netns, to, first, pause, rest);
            assert!([0, 400, 429].contains(&status), "{vip}, {what}: {status}");
        }
        let after = topo.echo_requests(web_1);
        assert_eq!(after.len(), before, "{vip}: the backend saw a request past the limit: {:?}", &after[before..]);
    }
}

#[test]
fn a_jwks_uri_cannot_make_the_waypoint_fetch_from_its_loopback_or_the_metadata_address() {
    let topo = tenants(|topo| {
        let rule = |issuer: &str, uri: &str| format!("  - issuer: {issuer}\n    jwksUri: {uri}\n");
        topo.write_config_file(
            "authn-web-ssrf.yaml",
            &format!(
                "apiVersion: ferrymesh.io/v1alpha1\nkind: RequestAuthentication\nmetadata:\n  name: ssrf\n  namespace: shop\nspec:\n  targetRefs:\n  - group: \"\"\n    kind: Service\n    name: web\n  jwtRules:\n{}{}",
                rule("https://loopback.example", "http://127.0.0.1:9901/admin/secrets"),
                rule("https://metadata.example", "http://169.254.169.254/latest/meta-data/"),
            ),
        );
        // A sentinel on the same Service: its refusals show the waypoint holds the config.
        topo.write_config_file(
            "authn-web-inline.yaml",
            &format!("apiVersion: ferrymesh.io/v1alpha1\nkind: RequestAuthentication\nmetadata:\n  name: inline\n  namespace: shop\nspec:\n  targetRefs:\n  - group: \"\"\n    kind: Service\n    name: web\n  jwtRules:\n  - issuer: https://issuer.example\n    jwks: '{JWKS}'\n"),
        );
    });
    let (a, waypoint) = (topo.pod("shop", "a"), topo.pod("shop", "waypoint"));
    // The victims, in the waypoint's own netns: an admin endpoint on its loopback, and the
    // metadata address (as a cloud's node would route it).
    let added = topo.output_in(&waypoint.netns, "ip", &["addr", "add", "169.254.169.254/32", "dev", "lo"]);
    assert!(added.status.success(), "{}", String::from_utf8_lossy(&added.stderr));
    for (label, listen) in [("internal", "127.0.0.1:9901"), ("metadata", "169.254.169.254:80")] {
        let mut cmd = topo.command_in(&waypoint.netns, bin("fm-echo"));
        cmd.args(["file-serve", "--listen", listen, "--file", "/nonexistent/secret.json"]);
        topo.spawn(label, cmd);
        wait_until(CONFIG_WAIT, &format!("the {label} server to listen"), || topo.log(label).contains("ready"));
    }
    wait_until(CONFIG_WAIT * 2, "the RequestAuthentications at the waypoint", || {
        topo.http(a, &format!("http://{WEB}/probe"), &["-H", "authorization: Bearer not.a.jwt"]).status == 401
    });
    // A token of each issuer: a waypoint that fetches keys does so before it answers.
    for token in ["eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImsxIn0.eyJpc3MiOiJodHRwczovL2xvb3BiYWNrLmV4YW1wbGUiLCJzdWIiOiJ4In0.c2ln", "eyJhbGciOiJFUzI1NiIsInR5cCI6IkpXVCIsImtpZCI6ImsxIn0.eyJpc3MiOiJodHRwczovL21ldGFkYXRhLmV4YW1wbGUiLCJzdWIiOiJ4In0.c2ln"] {
        let answer = topo.http(a, &format!("http://{WEB}/x"), &["-H", &format!("authorization: Bearer {token}")]);
        assert_ne!(answer.status, 0, "{answer:?}");
    }
    for label in ["internal", "metadata"] {
        let fetched: Vec<String> = topo.log_lines(label).into_iter().filter(|l| l.starts_with('{')).collect();
        assert!(fetched.is_empty(), "the waypoint fetched from the {label} server: {fetched:?}");
    }
}
