//! H1: one path, read one way. A DENY on `/admin*` and an ALLOW on `/public*` only saw the raw
//! path: `/public/../admin`, `/public/%2e%2e/admin`, `/%61dmin` and their kin passed them, and
//! a backend that normalizes (nginx, Go, Spring, Tomcat) served `/admin`. Each variant here is
//! sent verbatim, over HTTP/1.1 and HTTP/2, and judged at the backend: it must never see a
//! request, and the client must get a refusal (400 or 403; 414 or 431 for the overlong one).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use ferrymesh_testbed::mesh::{wait_until, CONFIG_WAIT};
use ferrymesh_testbed::topology::in_netns;

use crate::{tenants, WEB};

/// The variants of a path to `/admin`, or out of `/public`, that a backend may read as such.
fn variants() -> Vec<String> {
    let mut all: Vec<String> = [
        "/admin",
        "//admin",
        "/./admin",
        "/%61dmin",
        "/%61%64%6d%69%6e",
        "/public/../admin",
        "/public/./../admin",
        "/public/%2e%2e/admin",
        "/public/%2E%2E/admin",
        "/public/.%2e/admin",
        "/public%2F..%2Fadmin",
        "/public/..%2Fadmin",
        "/public/..%2fadmin",
        "/public/..%5Cadmin",
        "/public\\..\\admin",
        "/public/..;/admin",
        "/public/%2e%2e;x/admin",
        "/ADMIN",
        "/Public/../admin",
        "/admin;x=1",
        "/;/admin",
        "/public/..",
        "/admin%zz",
        "/public%",
        "/%2561dmin",
    ]
    .iter()
    .map(|p| p.to_string())
    .collect();
    // Overlong: deep enough that a careless normalizer gives up, short enough for one request.
    let depth = 4000;
    all.push(format!("/public/{}{}admin", "x/".repeat(depth), "../".repeat(depth + 1)));
    all
}

/// One HTTP/1.1 request for `path`, written verbatim from `netns` to `to`: the status (0 when
/// the connection ended without an answer).
fn http1(netns: &str, to: SocketAddr, path: &str) -> u16 {
    in_netns(netns, || {
        let Ok(mut stream) = std::net::TcpStream::connect_timeout(&to, Duration::from_secs(5)) else { return 0 };
        stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let request = format!("GET {path} HTTP/1.1\r\nHost: web\r\nConnection: close\r\n\r\n");
        if stream.write_all(request.as_bytes()).is_err() {
            return 0;
        }
        let mut answer = Vec::new();
        let _ = stream.read_to_end(&mut answer);
        let text = String::from_utf8_lossy(&answer);
        text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0)
    })
}

/// One HTTP/2 request (prior knowledge) for `path` from `netns` to `to`: the status, or None
/// when the path is no URI the client library can send (the HTTP/1.1 case covers it).
fn http2(netns: &str, to: SocketAddr, path: &str) -> Option<u16> {
    let uri: http::Uri = format!("http://web{path}").parse().ok()?;
    let status = in_netns(netns, || {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
            let exchange = async {
                let tcp = tokio::net::TcpStream::connect(to).await.ok()?;
                let (mut sender, connection) = h2::client::handshake(tcp).await.ok()?;
                tokio::spawn(connection);
                let request = http::Request::get(uri).body(()).unwrap();
                let (response, _) = sender.send_request(request, true).ok()?;
                let response = response.await.ok()?;
                let status = response.status().as_u16();
                let mut body = response.into_body();
                while let Some(Ok(chunk)) = body.data().await {
                    let _: Bytes = chunk;
                }
                Some(status)
            };
            tokio::time::timeout(Duration::from_secs(10), exchange).await.ok().flatten().unwrap_or(0)
        })
    });
    Some(status)
}

#[test]
fn a_deny_on_admin_and_an_allow_on_public_hold_against_every_spelling_of_a_path() {
    let topo = tenants(|topo| {
        let on_web = |name: &str, spec: &str| {
            format!("apiVersion: ferrymesh.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata:\n  name: {name}\n  namespace: shop\nspec:\n  targetRefs:\n  - group: \"\"\n    kind: Service\n    name: web\n{spec}")
        };
        topo.write_config_file(
            "policy-web-deny-admin.yaml",
            &on_web(
                "deny-admin",
                "  action: DENY\n  rules:\n  - to:\n    - operation:\n        paths: [\"/admin*\"]\n",
            ),
        );
        topo.write_config_file(
            "policy-web-allow-public.yaml",
            &on_web(
                "allow-public",
                "  action: ALLOW\n  rules:\n  - to:\n    - operation:\n        paths: [\"/public*\"]\n",
            ),
        );
    });
    let (a, web_1) = (topo.pod("shop", "a"), topo.pod("shop", "web-1"));
    let to: SocketAddr = format!("{WEB}:80").parse().unwrap();
    // The controls: /public passes, and goes on in its normalized form.
    wait_until(CONFIG_WAIT * 2, "the policies at the waypoint", || http1(&a.netns, to, "/admin") == 403);
    for (sent, seen) in
        [("/public/ok", "/public/ok"), ("/public/./x/../y", "/public/y"), ("/public/%61bc", "/public/abc")]
    {
        assert_eq!(http1(&a.netns, to, sent), 200, "{sent}");
        assert_eq!(http2(&a.netns, to, sent), Some(200), "{sent} over HTTP/2");
        let seen_at_backend = topo.echo_requests(web_1).iter().filter(|r| r["path"] == seen).count();
        assert_eq!(seen_at_backend, 2, "{sent} reached the backend as {seen}: {:?}", topo.echo_requests(web_1));
    }
    let controls = topo.echo_requests(web_1).len();

    let mut answers = Vec::new();
    for path in variants() {
        let one = http1(&a.netns, to, &path);
        let two = http2(&a.netns, to, &path);
        answers.push((path.chars().take(60).collect::<String>(), one, two));
    }
    // Refused: 400 (a path refused as it is), 403 (its normalized form denied), or, for the
    // overlong one, 414 or 431 (too long for a request line or a header block).
    let refused = [400, 403, 414, 431];
    for (path, one, two) in &answers {
        assert!(refused.contains(one), "HTTP/1.1 {path}: {one}; all: {answers:?}");
        assert!(two.is_none_or(|s| refused.contains(&s)), "HTTP/2 {path}: {two:?}; all: {answers:?}");
    }
    let after = topo.echo_requests(web_1);
    assert_eq!(after.len(), controls, "the backend saw a variant: {:?}", &after[controls..]);
}
