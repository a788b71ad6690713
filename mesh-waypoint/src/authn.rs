//! End-user authentication at the waypoint: the JWT of a request checked against the
//! RequestAuthentications attached to its Service or to the waypoint (Istio's semantics, as
//! Envoy's jwt_authn filter applies them): no token passes unauthenticated; a token no rule
//! accepts is a 401 with Envoy's words and `www-authenticate`; a verified token gives the
//! request its `request.auth.*` for the AuthorizationPolicies, then is removed from its header
//! unless the rule forwards it (a token in a query parameter stays, as in Envoy), and its
//! payload goes upstream in the rule's `outputPayloadToHeader`.
//!
//! Keys: an inline `jwks` is parsed once; a `jwksUri` (https with the system's roots; http only
//! with `--jwks-allow-http` and from inside the cluster: a Service's name or a private address)
//! is fetched, never from the waypoint's own loopback or a link-local (metadata) address,
//! whether the URI names one or its name resolves to one, at most `MAX_JWKS_BYTES` within
//! `--jwks-timeout`. It is fetched by the first request that needs it, again once
//! `--jwks-refresh` has passed, and at once for a token whose `kid` the keys do not hold (a
//! rotated key), at most once a second per URI. One fetch at a time per URI, which only requests
//! with no keys at all wait for (the others use the keys held meanwhile); a failed fetch keeps
//! the keys held.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ferrymesh_policy::authn::{self, AuthnError, JwkSet, Jwks, JwtRule, RequestAuth, TokenPlace};
use ferrymesh_policy::l7::Target;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, StatusCode};
use http_body_util::{BodyExt, Empty, Limited};
use hyper_util::client::legacy::connect::dns::{GaiResolver, Name};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;

/// Resolves an issuer's name as the system does, keeping only addresses the waypoint may fetch
/// keys from ([`authn::forbidden_jwks_ip`]): a name that resolves to the waypoint's loopback
/// or to a metadata address is not an issuer.
#[derive(Clone, Debug)]
pub struct IssuerResolver(GaiResolver);

impl tower::Service<Name> for IssuerResolver {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<std::io::Result<()>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, name: Name) -> Self::Future {
        let lookup = self.0.call(name.clone());
        Box::pin(async move {
            let all: Vec<SocketAddr> = lookup.await?.collect();
            let allowed: Vec<SocketAddr> =
                all.iter().copied().filter(|a| authn::forbidden_jwks_ip(a.ip()).is_none()).collect();
            if allowed.is_empty() && !all.is_empty() {
                return Err(std::io::Error::other(format!(
                    "{name} resolves only to addresses keys are never fetched from ({all:?})"
                )));
            }
            Ok(allowed.into_iter())
        })
    }
}

/// The least time between two fetches of one JWKS URI.
const REFETCH_GAP: Duration = Duration::from_secs(1);
/// The largest JWKS the waypoint reads.
const MAX_JWKS_BYTES: usize = 1 << 20;

/// A request's token, verified: what policies read, and what to change before it goes on.
#[derive(Debug)]
pub struct Verified {
    /// `request.auth.*`.
    pub auth: RequestAuth,
    /// The header to remove (the token's, unless its rule forwards it).
    pub remove: Option<HeaderName>,
    /// The header to add with the token's payload (base64url JSON, as the token has it).
    pub payload: Option<(HeaderName, HeaderValue)>,
}

/// A request refused for its token.
#[derive(Debug)]
pub struct Refused {
    /// Why, in Envoy's words (the 401's body).
    pub error: AuthnError,
    /// Why, with the RequestAuthentications that apply (for the record).
    pub reason: String,
}

impl Refused {
    /// Envoy's answer: 401, the error as the body, and `www-authenticate` naming the realm.
    pub fn response(&self, authority: &str, path: &str) -> (StatusCode, String, HeaderValue) {
        let challenge = format!("Bearer realm=\"http://{authority}{path}\", error=\"invalid_token\"");
        let challenge = HeaderValue::try_from(challenge)
            .unwrap_or_else(|_| HeaderValue::from_static("Bearer error=\"invalid_token\""));
        (StatusCode::UNAUTHORIZED, self.error.to_string(), challenge)
    }
}

/// The issuers' keys the waypoint holds.
#[derive(Debug)]
pub struct KeyStore {
    client: Client<hyper_rustls::HttpsConnector<HttpConnector<IssuerResolver>>, Empty<Bytes>>,
    refresh: Duration,
    timeout: Duration,
    allow_http: bool,
    /// Unit tests serve their issuers on loopback.
    #[cfg(test)]
    loopback_issuers: bool,
    remote: Mutex<HashMap<String, Arc<Remote>>>,
    inline: Mutex<HashMap<String, Arc<JwkSet>>>,
}

/// One JWKS URI: the keys last fetched, and the fetch in progress.
#[derive(Debug, Default)]
struct Remote {
    held: Mutex<Option<(Arc<JwkSet>, Instant)>>,
    /// Held while fetching; holds when the last fetch began.
    fetching: tokio::sync::Mutex<Option<Instant>>,
}

impl Remote {
    fn held(&self) -> Option<(Arc<JwkSet>, Instant)> {
        self.held.lock().expect("jwks lock").clone()
    }
}

impl KeyStore {
    /// A store that fetches JWKS with `timeout` and again every `refresh`; over http too when
    /// `allow_http`.
    pub fn new(refresh: Duration, timeout: Duration, allow_http: bool) -> Self {
        let tls = match hyper_rustls::HttpsConnectorBuilder::new().with_native_roots() {
            Ok(builder) => builder,
            Err(e) => {
                tracing::warn!(error = %e, "no system roots: an https jwksUri cannot be verified, nor fetched");
                let none = rustls::ClientConfig::builder()
                    .with_root_certificates(rustls::RootCertStore::empty())
                    .with_no_client_auth();
                hyper_rustls::HttpsConnectorBuilder::new().with_tls_config(none)
            }
        }
        .https_or_http()
        .enable_http1()
        .wrap_connector({
            let mut http = HttpConnector::new_with_resolver(IssuerResolver(GaiResolver::new()));
            http.enforce_http(false);
            http
        });
        let client = Client::builder(hyper_util::rt::TokioExecutor::new()).build(tls);
        Self {
            client,
            refresh,
            timeout,
            allow_http,
            #[cfg(test)]
            loopback_issuers: false,
            remote: Mutex::default(),
            inline: Mutex::default(),
        }
    }

    /// The keys of `rule`'s issuer, for a token signed by key `kid`: None when they cannot be
    /// had (a JWKS never fetched).
    pub async fn keys(&self, rule: &JwtRule, kid: Option<&str>) -> Option<Arc<JwkSet>> {
        match &rule.jwks {
            Jwks::Inline(text) => {
                let mut inline = self.inline.lock().expect("jwks lock");
                if let Some(set) = inline.get(text) {
                    return Some(set.clone());
                }
                // Checked when the policy was validated.
                let set = Arc::new(serde_json::from_str::<JwkSet>(text).ok()?);
                inline.insert(text.clone(), set.clone());
                Some(set)
            }
            Jwks::Uri(uri) => self.remote_keys(uri, kid).await,
        }
    }

    async fn remote_keys(&self, uri: &str, kid: Option<&str>) -> Option<Arc<JwkSet>> {
        let remote = self.remote.lock().expect("jwks lock").entry(uri.to_string()).or_default().clone();
        let usable = |held: &Option<(Arc<JwkSet>, Instant)>| {
            held.as_ref()
                .is_some_and(|(set, at)| at.elapsed() < self.refresh && kid.is_none_or(|kid| set.find(kid).is_some()))
        };
        let held = remote.held();
        if usable(&held) {
            return held.map(|(set, _)| set);
        }
        // With keys held (stale, or without the kid), a request does not wait for a fetch under
        // way: it uses them. Only a request with nothing to go on waits.
        let mut last_fetch = match (remote.fetching.try_lock(), &held) {
            (Ok(guard), _) => guard,
            (Err(_), Some((set, _))) => return Some(set.clone()),
            (Err(_), None) => remote.fetching.lock().await,
        };
        // Another request may have fetched while this one waited.
        let held = remote.held();
        if usable(&held) || last_fetch.is_some_and(|at| at.elapsed() < REFETCH_GAP) {
            return held.map(|(set, _)| set);
        }
        *last_fetch = Some(Instant::now());
        match self.fetch(uri).await {
            Ok(set) => {
                metrics::counter!("ferrymesh_jwks_fetches_total", "result" => "ok").increment(1);
                let set = Arc::new(set);
                *remote.held.lock().expect("jwks lock") = Some((set.clone(), Instant::now()));
                Some(set)
            }
            Err(e) => {
                metrics::counter!("ferrymesh_jwks_fetches_total", "result" => "error").increment(1);
                tracing::warn!(jwks_uri = uri, error = %e, "cannot fetch the JWKS; keeping the keys held, if any");
                held.map(|(set, _)| set)
            }
        }
    }

    async fn fetch(&self, uri: &str) -> anyhow::Result<JwkSet> {
        let uri: http::Uri = uri.parse()?;
        #[cfg(test)]
        let test_issuer = self.loopback_issuers;
        #[cfg(not(test))]
        let test_issuer = false;
        if let Some(reason) = uri.host().and_then(authn::forbidden_jwks_host).filter(|_| !test_issuer) {
            anyhow::bail!("refused: {reason}");
        }
        if uri.scheme_str() == Some("http") {
            anyhow::ensure!(
                self.allow_http,
                "refused: keys over plaintext http could be swapped on the way; serve them over https, or start the waypoint with --jwks-allow-http for an issuer inside the cluster"
            );
            anyhow::ensure!(
                test_issuer || uri.host().is_some_and(authn::cluster_internal_host),
                "refused: plaintext http is fetched only from inside the cluster (a Service's name, a private address); serve these keys over https"
            );
        }
        let response = tokio::time::timeout(self.timeout, self.client.get(uri))
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {:?}", self.timeout))??;
        anyhow::ensure!(response.status() == StatusCode::OK, "answered {}", response.status());
        let body = tokio::time::timeout(self.timeout, Limited::new(response.into_body(), MAX_JWKS_BYTES).collect())
            .await
            .map_err(|_| anyhow::anyhow!("the body did not arrive within {:?}", self.timeout))?
            .map_err(|e| anyhow::anyhow!("reading the body: {e}"))?
            .to_bytes();
        let set: JwkSet = serde_json::from_slice(&body).map_err(|e| anyhow::anyhow!("not a JWKS: {e}"))?;
        anyhow::ensure!(!set.keys.is_empty(), "the JWKS holds no key");
        Ok(set)
    }

    /// The token of a request to `target` checked against the RequestAuthentications attached
    /// to it: Ok(None) when none applies or the request has no token.
    pub async fn authenticate(
        &self,
        attached: &authn::RequestAuthentications,
        target: &Target<'_>,
        headers: &HeaderMap,
        query: Option<&str>,
    ) -> Result<Option<Verified>, Refused> {
        let policies = attached.attached(target);
        if policies.is_empty() {
            return Ok(None);
        }
        let refuse = |error: AuthnError| {
            let names: Vec<String> = policies.iter().map(|p| p.key()).collect();
            let reason = format!("{error} (RequestAuthentication {})", names.join(", "));
            Refused { error, reason }
        };
        let rules: Vec<&JwtRule> = policies.iter().flat_map(|p| p.rules.iter()).collect();
        let Some(token) = authn::find_token(&rules, headers, query).map_err(&refuse)? else { return Ok(None) };
        let keys = self.keys(token.rule, token.kid.as_deref()).await.ok_or_else(|| refuse(AuthnError::NoKeys))?;
        let verified = authn::verify(&token, &keys).map_err(&refuse)?;
        let rule = verified.rule;
        let remove = match &verified.found_in {
            TokenPlace::Header(name) if !rule.forward_original_token => HeaderName::try_from(name.as_str()).ok(),
            _ => None,
        };
        let payload = rule.output_payload_to_header.as_ref().and_then(|name| {
            let segment = token.jwt.split('.').nth(1)?;
            Some((HeaderName::try_from(name.as_str()).ok()?, HeaderValue::try_from(segment).ok()?))
        });
        Ok(Some(Verified { auth: verified.auth, remove, payload }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU16, AtomicUsize, Ordering};

    /// A JWKS of one P-256 key of id `kid` (RFC 7517's example point).
    fn jwks(kid: &str) -> String {
        format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","kid":"{kid}","alg":"ES256"}}]}}"#
        )
    }

    /// An issuer on loopback serving `jwks(kid)` for the kid in `serving`, or 500 when it is
    /// 0, and counting the fetches.
    async fn issuer(serving: Arc<AtomicU16>, fetches: Arc<AtomicUsize>) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let (serving, fetches) = (serving.clone(), fetches.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |_request| {
                        fetches.fetch_add(1, Ordering::SeqCst);
                        let kid = serving.load(Ordering::SeqCst);
                        let response = match kid {
                            0 => http::Response::builder().status(500).body(crate::request::full("down")),
                            kid => http::Response::builder().body(crate::request::full(jwks(&format!("k{kid}")))),
                        };
                        async move { Ok::<_, std::convert::Infallible>(response.unwrap()) }
                    });
                    let io = hyper_util::rt::TokioIo::new(stream);
                    let _ = hyper::server::conn::http1::Builder::new().serve_connection(io, service).await;
                });
            }
        });
        format!("http://{addr}/jwks.json")
    }

    impl KeyStore {
        /// A store that fetches over http from issuers on loopback, as these tests serve them.
        fn on_loopback(refresh: Duration) -> Self {
            Self { loopback_issuers: true, ..Self::new(refresh, Duration::from_secs(2), true) }
        }
    }

    #[tokio::test]
    async fn keys_are_never_fetched_from_the_waypoint_itself_a_metadata_address_or_plain_http_unless_allowed() {
        let (serving, fetches) = (Arc::new(AtomicU16::new(1)), Arc::new(AtomicUsize::new(0)));
        let on_loopback = issuer(serving, fetches.clone()).await;
        let guarded = KeyStore::new(Duration::from_secs(600), Duration::from_secs(2), true);
        let e = guarded.fetch(&on_loopback).await.unwrap_err().to_string();
        assert!(e.contains("loopback"), "{e}");
        for uri in ["http://169.254.169.254/latest/meta-data/", "https://[fd00:ec2::254]/", "http://localhost:1/"] {
            let e = guarded.fetch(uri).await.unwrap_err().to_string();
            assert!(e.starts_with("refused: "), "{uri}: {e}");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 0, "the issuer on loopback was never asked");
        // A name that resolves to loopback is no issuer either.
        let mut resolver = IssuerResolver(GaiResolver::new());
        let e = tower::Service::call(&mut resolver, "localhost".parse().unwrap()).await.unwrap_err();
        assert!(e.to_string().contains("resolves only to addresses keys are never fetched from"), "{e}");
        // Plain http only with the opt-in.
        let https_only = KeyStore::new(Duration::from_secs(600), Duration::from_secs(2), false);
        let e = https_only.fetch("http://jwks.auth.svc.cluster.local/keys").await.unwrap_err().to_string();
        assert!(e.contains("--jwks-allow-http"), "{e}");
        // And with it, only from inside the cluster.
        let e = guarded.fetch("http://keys.example/jwks").await.unwrap_err().to_string();
        assert!(e.contains("only from inside the cluster"), "{e}");
    }

    fn rule(uri: &str) -> JwtRule {
        JwtRule {
            issuer: "https://issuer.test".into(),
            audiences: vec![],
            jwks: Jwks::Uri(uri.into()),
            from_headers: vec![],
            from_params: vec![],
            forward_original_token: false,
            output_payload_to_header: None,
        }
    }

    #[tokio::test]
    async fn keys_are_fetched_once_refetched_for_an_unknown_kid_and_kept_when_the_issuer_fails() {
        let (serving, fetches) = (Arc::new(AtomicU16::new(1)), Arc::new(AtomicUsize::new(0)));
        let rule = rule(&issuer(serving.clone(), fetches.clone()).await);
        let store = KeyStore::on_loopback(Duration::from_secs(600));
        let kids = |set: Option<Arc<JwkSet>>| -> Vec<String> {
            set.map(|s| s.keys.iter().filter_map(|k| k.common.key_id.clone()).collect()).unwrap_or_default()
        };
        assert_eq!(kids(store.keys(&rule, Some("k1")).await), ["k1"]);
        assert_eq!(kids(store.keys(&rule, Some("k1")).await), ["k1"]);
        assert_eq!(kids(store.keys(&rule, None).await), ["k1"]);
        assert_eq!(fetches.load(Ordering::SeqCst), 1, "fresh keys are not fetched again");
        // The issuer rotates: a token of the new kid has the keys fetched again, at most once
        // a second.
        serving.store(2, Ordering::SeqCst);
        assert_eq!(kids(store.keys(&rule, Some("k2")).await), ["k1"], "within a second of the last fetch");
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        tokio::time::sleep(REFETCH_GAP).await;
        assert_eq!(kids(store.keys(&rule, Some("k2")).await), ["k2"]);
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
        // The issuer fails: the keys held stay.
        serving.store(0, Ordering::SeqCst);
        tokio::time::sleep(REFETCH_GAP).await;
        assert_eq!(kids(store.keys(&rule, Some("k3")).await), ["k2"]);
        assert_eq!(fetches.load(Ordering::SeqCst), 3, "it was asked");
        // Never fetched, and the issuer down: no keys (the request is refused).
        let other = KeyStore::on_loopback(Duration::from_secs(600));
        assert!(other.keys(&rule, None).await.is_none());
        // Past the refresh interval, keys are fetched again even for a known kid.
        serving.store(2, Ordering::SeqCst);
        let quick = KeyStore::on_loopback(Duration::from_millis(10));
        let before = fetches.load(Ordering::SeqCst);
        quick.keys(&rule, Some("k2")).await.unwrap();
        tokio::time::sleep(REFETCH_GAP).await;
        quick.keys(&rule, Some("k2")).await.unwrap();
        assert_eq!(fetches.load(Ordering::SeqCst), before + 2);
    }
}
