//! The request path at the waypoint: what a client can do with the bytes of one request.
//!
//! H7: `outputPayloadToHeader` names the header a verified JWT's payload goes upstream in, and
//! backends trust it as the authenticated user. A client that sends that header itself, with no
//! token, must not have it reach the backend.
//!
//! M5: a header sent twice. A DENY on `request.headers[x-debug]` read only the first value, so
//! `x-debug: no` then `x-debug: true` passed it to a backend that reads the last; a value with a
//! byte past ASCII read as no header at all.

use ferrymesh_testbed::mesh::{wait_until, CONFIG_WAIT};

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
