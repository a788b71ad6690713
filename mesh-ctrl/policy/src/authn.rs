//! ferrymesh.io/v1alpha1 `RequestAuthentication`, Istio's end-user authentication with its field
//! names: the JWTs a waypoint accepts for the Services (or every Service of the waypoint) it is
//! attached to by `targetRefs`. Each `jwtRules[]` names an `issuer`, the `audiences` a token
//! must carry one of (none: any), where its keys are (`jwksUri`, http or https, or the JWKS
//! inline in `jwks`), where the token is found (`fromHeaders` with a prefix, `fromParams`;
//! neither: Istio's defaults, `Authorization: Bearer <token>` then the `access_token` query
//! parameter), and whether the token goes on upstream (`forwardOriginalToken`, default no) and
//! its payload in a header (`outputPayloadToHeader`).
//!
//! Istio's semantics: a request with a token no rule accepts is refused (401); a request with
//! no token passes without a request principal, and only an AuthorizationPolicy asking for one
//! (`requestPrincipals`, `request.auth.*`) refuses it. `selector` is refused: JWTs are checked
//! by waypoints, which policies reach by `targetRefs`; the agents carry connections, not
//! requests.
//!
//! Here: the object, its validation, its wire form, and [`authenticate`] (a request's token
//! checked against the rules that apply, given each issuer's keys; [`find_token`] and
//! [`verify`] are its two halves, for a waypoint that fetches keys in between). The
//! [`RequestAuth`] of a verified token is what AuthorizationPolicy's `requestPrincipals` and
//! `request.auth.*` conditions read ([`crate::l7`]).

use jsonwebtoken::errors::ErrorKind;
pub use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{DecodingKey, Validation};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::l7::{attached, Target};
use crate::spec::{err, target_refs, Selector, SpecError, TargetRefSpec};
use crate::TargetRef;

/// A RequestAuthentication, validated.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RequestAuthentication {
    /// Namespace (its targets are in it).
    pub namespace: String,
    /// Name.
    pub name: String,
    /// The Services or waypoint Gateways it is attached to (never empty).
    pub target_refs: Vec<TargetRef>,
    /// The issuers accepted (never empty).
    pub rules: Vec<JwtRule>,
}

/// `jwtRules[]`: the tokens of one issuer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JwtRule {
    /// `issuer`: the token's `iss`.
    pub issuer: String,
    /// `audiences`: the token's `aud` must hold one of them; empty: any.
    pub audiences: Vec<String>,
    /// Where the issuer's keys are.
    pub jwks: Jwks,
    /// Headers a token is taken from, each with the prefix before it.
    pub from_headers: Vec<TokenHeader>,
    /// Query parameters a token is taken from.
    pub from_params: Vec<String>,
    /// `forwardOriginalToken`: the token goes on upstream (else its header or parameter is
    /// removed).
    pub forward_original_token: bool,
    /// `outputPayloadToHeader`: the header the verified payload goes upstream in
    /// (base64url-encoded JSON), if any.
    pub output_payload_to_header: Option<String>,
}

/// An issuer's keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Jwks {
    /// `jwksUri`: fetched, and fetched again from time to time.
    Uri(String),
    /// `jwks`: the JWKS JSON itself (checked to be a key set).
    Inline(String),
}

/// `fromHeaders[]`: a header a token is taken from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenHeader {
    /// The header's name, lowercase.
    pub name: String,
    /// What precedes the token in its value (`Bearer `), if anything.
    pub prefix: String,
}

/// `spec` of a RequestAuthentication.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RequestAuthenticationSpec {
    /// Refused: JWTs are checked at waypoints, attached by `targetRefs`.
    pub selector: Option<Selector>,
    /// The Services or waypoint Gateways of its namespace whose requests it checks.
    pub target_refs: Option<Vec<TargetRefSpec>>,
    /// One target (Istio's older singular form).
    pub target_ref: Option<TargetRefSpec>,
    /// The issuers accepted.
    #[serde(default)]
    pub jwt_rules: Vec<JwtRuleSpec>,
}

/// `spec.jwtRules[]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct JwtRuleSpec {
    /// The token's `iss`.
    #[serde(default)]
    pub issuer: String,
    /// The token's `aud` must hold one of them; none: any.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Where the issuer's JWKS is served (http or https).
    pub jwks_uri: Option<String>,
    /// The issuer's JWKS itself, as JSON.
    pub jwks: Option<String>,
    /// Headers a token is taken from.
    #[serde(default)]
    pub from_headers: Vec<JwtHeaderSpec>,
    /// Query parameters a token is taken from.
    #[serde(default)]
    pub from_params: Vec<String>,
    /// Send the token on upstream (default false: it is removed).
    #[serde(default)]
    pub forward_original_token: bool,
    /// A header to send the verified payload upstream in.
    pub output_payload_to_header: Option<String>,
}

/// `spec.jwtRules[].fromHeaders[]`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, JsonSchema)]
pub struct JwtHeaderSpec {
    /// The header's name.
    #[serde(default)]
    pub name: String,
    /// What precedes the token in its value, e.g. `Bearer `.
    #[serde(default)]
    pub prefix: String,
}

/// Istio's default place of a token: `Authorization: Bearer <token>`.
fn default_header() -> TokenHeader {
    TokenHeader { name: "authorization".into(), prefix: "Bearer ".into() }
}

/// Istio's default query parameter of a token.
const DEFAULT_PARAM: &str = "access_token";

fn header_name(name: &str, field: String) -> Result<String, SpecError> {
    http::HeaderName::try_from(name)
        .map(|n| n.as_str().to_string())
        .map_err(|_| err(field, format!("{name:?} is not a header name")))
}

/// Names of the clouds' instance metadata services.
const METADATA_NAMES: [&str; 5] =
    ["metadata", "metadata.google.internal", "instance-data", "instance-data.ec2.internal", "metadata.azure.com"];

/// Why the waypoint must never fetch keys from `ip`: its own loopback, an unspecified address,
/// a link-local one (the clouds' metadata services live at 169.254.169.254 and fd00:ec2::254),
/// or an IPv4 one of those written as IPv6.
pub fn forbidden_jwks_ip(ip: std::net::IpAddr) -> Option<&'static str> {
    use std::net::IpAddr;
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let link_local = match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => {
            (v6.segments()[0] & 0xffc0) == 0xfe80 || v6 == std::net::Ipv6Addr::new(0xfd00, 0xec2, 0, 0, 0, 0, 0, 0x254)
        }
    };
    if ip.is_loopback() || ip.is_unspecified() {
        Some("a loopback or unspecified address is the waypoint itself, not an issuer")
    } else if link_local {
        Some("a link-local address (the clouds' instance metadata) is never fetched")
    } else {
        None
    }
}

/// Why the waypoint must never fetch keys from `host` (a URI's host: a name, an IPv4 address or
/// a bracketed IPv6 one): see [`forbidden_jwks_ip`], and `localhost` or a metadata service's
/// name. The waypoint checks the addresses a name resolves to as well.
pub fn forbidden_jwks_host(host: &str) -> Option<&'static str> {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse() {
        return forbidden_jwks_ip(ip);
    }
    let name = bare.trim_end_matches('.').to_ascii_lowercase();
    if name == "localhost" || name.ends_with(".localhost") {
        Some("a loopback name is the waypoint itself, not an issuer")
    } else if METADATA_NAMES.contains(&name.as_str()) {
        Some("an instance metadata service is never fetched")
    } else {
        None
    }
}

/// Whether `host` (a URI's host) is inside the cluster, where the waypoint may fetch keys over
/// plaintext http when allowed to: a Service's name (`NAME.NAMESPACE.svc`, with or without the
/// cluster domain, or any name under `cluster.local`) or a private address (RFC 1918, IPv6
/// unique-local), as pod and Service ranges are.
pub fn cluster_internal_host(host: &str) -> bool {
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    if let Ok(ip) = bare.parse::<std::net::IpAddr>() {
        return match ip {
            std::net::IpAddr::V4(v4) => v4.is_private(),
            std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xfe00) == 0xfc00,
        };
    }
    let name = bare.trim_end_matches('.').to_ascii_lowercase();
    name.ends_with(".svc") || name.contains(".svc.") || name.ends_with(".cluster.local")
}

impl JwtRuleSpec {
    fn validate(&self, field: &str) -> Result<JwtRule, SpecError> {
        if self.issuer.is_empty() {
            return Err(err(format!("{field}.issuer"), "missing"));
        }
        let jwks = match (&self.jwks_uri, &self.jwks) {
            (Some(_), Some(_)) => return Err(err(field, "give jwksUri or jwks, not both")),
            (None, None) => {
                return Err(err(field, "give jwksUri or jwks (discovery from the issuer is not supported)"));
            }
            (Some(uri), None) => {
                let parsed: http::Uri =
                    uri.parse().map_err(|e| err(format!("{field}.jwksUri"), format!("{uri:?} is not a URL: {e}")))?;
                if let Some(reason) = parsed.host().and_then(forbidden_jwks_host) {
                    return Err(err(format!("{field}.jwksUri"), format!("{uri:?}: {reason}")));
                }
                match parsed.scheme_str() {
                    Some("http" | "https") if parsed.host().is_some() => Jwks::Uri(uri.clone()),
                    Some("http" | "https") => {
                        return Err(err(format!("{field}.jwksUri"), format!("{uri:?} has no host")))
                    }
                    other => {
                        return Err(err(
                            format!("{field}.jwksUri"),
                            format!("{uri:?}: the scheme {:?} is not http or https", other.unwrap_or("")),
                        ))
                    }
                }
            }
            (None, Some(text)) => {
                let set: jsonwebtoken::jwk::JwkSet = serde_json::from_str(text)
                    .map_err(|e| err(format!("{field}.jwks"), format!("not a JSON Web Key Set: {e}")))?;
                if set.keys.is_empty() {
                    return Err(err(format!("{field}.jwks"), "the key set holds no key"));
                }
                for (i, key) in set.keys.iter().enumerate() {
                    // A symmetric key verifies and mints alike: carried in config, its secret
                    // reaches every waypoint it is sent to, and whoever holds it writes tokens of
                    // any principal.
                    if matches!(key.algorithm, jsonwebtoken::jwk::AlgorithmParameters::OctetKey(_)) {
                        return Err(err(
                            format!("{field}.jwks"),
                            format!("key {i} is a symmetric (kty oct) key: a shared secret cannot be distributed safely; give the issuer's public keys (RSA, EC or OKP)"),
                        ));
                    }
                    jsonwebtoken::DecodingKey::from_jwk(key)
                        .map_err(|e| err(format!("{field}.jwks"), format!("key {i} cannot verify tokens: {e}")))?;
                }
                Jwks::Inline(text.clone())
            }
        };
        let mut from_headers = Vec::new();
        for (i, h) in self.from_headers.iter().enumerate() {
            let name = header_name(&h.name, format!("{field}.fromHeaders[{i}].name"))?;
            from_headers.push(TokenHeader { name, prefix: h.prefix.clone() });
        }
        if let Some((i, _)) = self.from_params.iter().enumerate().find(|(_, p)| p.is_empty()) {
            return Err(err(format!("{field}.fromParams[{i}]"), "empty"));
        }
        let mut from_params = self.from_params.clone();
        if from_headers.is_empty() && from_params.is_empty() {
            from_headers.push(default_header());
            from_params.push(DEFAULT_PARAM.into());
        }
        let output_payload_to_header = match &self.output_payload_to_header {
            None => None,
            Some(name) => Some(header_name(name, format!("{field}.outputPayloadToHeader"))?),
        };
        Ok(JwtRule {
            issuer: self.issuer.clone(),
            audiences: self.audiences.clone(),
            jwks,
            from_headers,
            from_params,
            forward_original_token: self.forward_original_token,
            output_payload_to_header,
        })
    }
}

impl RequestAuthenticationSpec {
    /// Validates into a RequestAuthentication `namespace/name`.
    pub fn validate(&self, namespace: &str, name: &str) -> Result<RequestAuthentication, SpecError> {
        if self.selector.is_some() {
            return Err(err(
                "spec.selector",
                "JWTs are checked at waypoints: attach the policy to a Service or a waypoint's Gateway with targetRefs",
            ));
        }
        let target_refs = target_refs(&self.target_refs, &self.target_ref)?;
        if target_refs.is_empty() {
            return Err(err("spec.targetRefs", "missing; name the Services or the waypoint Gateway it applies to"));
        }
        if self.jwt_rules.is_empty() {
            return Err(err("spec.jwtRules", "missing; give at least one issuer"));
        }
        let rules = self
            .jwt_rules
            .iter()
            .enumerate()
            .map(|(i, r)| r.validate(&format!("spec.jwtRules[{i}]")))
            .collect::<Result<_, _>>()?;
        Ok(RequestAuthentication { namespace: namespace.into(), name: name.into(), target_refs, rules })
    }
}

impl RequestAuthentication {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Every RequestAuthentication of the mesh, as a waypoint looks them up.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestAuthentications {
    /// Sorted by `namespace/name`.
    all: Vec<RequestAuthentication>,
}

impl RequestAuthentications {
    /// The set of `all`.
    pub fn new(mut all: Vec<RequestAuthentication>) -> Self {
        all.sort_by_key(RequestAuthentication::key);
        Self { all }
    }

    /// Those attached to `target` (its Service, or its waypoint's Gateway), in name order:
    /// their JWT rules together are the ones a request to it is checked against.
    pub fn attached(&self, target: &Target<'_>) -> Vec<&RequestAuthentication> {
        self.all.iter().filter(|p| attached(&p.namespace, &p.target_refs, target)).collect()
    }

    /// Every header any rule of any of them sends a verified payload in
    /// (`outputPayloadToHeader`): a request's own copy of one is never forwarded, with or
    /// without a token, or a client could write its own claims (as Envoy strips them).
    pub fn payload_headers(&self) -> impl Iterator<Item = &str> {
        self.all.iter().flat_map(|p| p.rules.iter()).filter_map(|r| r.output_payload_to_header.as_deref())
    }
}

/// What a verified token says about a request: Istio's `request.auth.*` attributes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct RequestAuth {
    /// `iss/sub`: Istio's request principal.
    pub principal: String,
    /// The token's `aud`, as a list.
    pub audiences: Vec<String>,
    /// The token's `azp`, if any.
    pub presenter: Option<String>,
    /// Every claim of the payload.
    pub claims: serde_json::Map<String, serde_json::Value>,
}

impl RequestAuth {
    /// What a token of `issuer` with `claims` says: principal `issuer/sub`, `aud` as a list
    /// (one string or many), `azp`.
    pub fn from_claims(issuer: &str, claims: serde_json::Map<String, serde_json::Value>) -> Self {
        let text = |name: &str| claims.get(name).and_then(|v| v.as_str()).map(str::to_string);
        let audiences = match claims.get("aud") {
            Some(serde_json::Value::String(one)) => vec![one.clone()],
            Some(serde_json::Value::Array(many)) => {
                many.iter().filter_map(|v| v.as_str().map(str::to_string)).collect()
            }
            _ => Vec::new(),
        };
        let (principal, presenter) = (format!("{issuer}/{}", text("sub").unwrap_or_default()), text("azp"));
        Self { principal, audiences, presenter, claims }
    }
}

/// A request's token, verified.
#[derive(Clone, Debug, PartialEq)]
pub struct Authenticated<'r> {
    /// What it says.
    pub auth: RequestAuth,
    /// Where it was (the waypoint removes it from there unless the rule forwards it).
    pub found_in: TokenPlace,
    /// The rule that accepted it.
    pub rule: &'r JwtRule,
}

/// A request's token, found but not verified yet: which rule it is for and which key signed it.
#[derive(Clone, Debug, PartialEq)]
pub struct Token<'r> {
    /// The JWT.
    pub jwt: String,
    /// Where it was.
    pub found_in: TokenPlace,
    /// The rule of its issuer.
    pub rule: &'r JwtRule,
    /// Its header's `kid`, if any.
    pub kid: Option<String>,
}

/// Where a token was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenPlace {
    /// This header.
    Header(String),
    /// This query parameter.
    Param(String),
}

/// Why a token was refused (401), in Envoy's words.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthnError {
    /// Not a JWT.
    #[error("Jwt is not in the form of Header.Payload.Signature")]
    Malformed,
    /// No rule takes its issuer.
    #[error("Jwt issuer is not configured")]
    UnknownIssuer,
    /// Past its `exp`.
    #[error("Jwt is expired")]
    Expired,
    /// Before its `nbf`.
    #[error("Jwt not yet valid")]
    NotYetValid,
    /// Its `aud` holds none of the rule's audiences.
    #[error("Audiences in Jwt are not allowed")]
    Audience,
    /// The issuer's keys are not at hand (its JWKS could not be fetched).
    #[error("Jwks remote fetch is failed")]
    NoKeys,
    /// Its signature does not verify with the issuer's keys, or it is otherwise invalid.
    #[error("Jwt verification fails")]
    Invalid,
}

/// The token of a request, checked against `rules` (every JWT rule of the RequestAuthentications
/// that apply), each issuer's keys from `keys`: `Ok(None)` without a token (Istio lets the
/// request by, unauthenticated), the verified token, or why it is refused.
pub fn authenticate<'r, 'k>(
    rules: &[&'r JwtRule],
    headers: &http::HeaderMap,
    query: Option<&str>,
    keys: impl Fn(&JwtRule) -> Option<&'k JwkSet>,
) -> Result<Option<Authenticated<'r>>, AuthnError> {
    let Some(token) = find_token(rules, headers, query)? else { return Ok(None) };
    let set = keys(token.rule).ok_or(AuthnError::NoKeys)?;
    verify(&token, set).map(Some)
}

/// The request's token, if it has one, with the rule of its issuer (among the rules that read
/// the place it was found in): the first half of [`authenticate`], for callers that fetch the
/// issuer's keys in between.
pub fn find_token<'r>(
    rules: &[&'r JwtRule],
    headers: &http::HeaderMap,
    query: Option<&str>,
) -> Result<Option<Token<'r>>, AuthnError> {
    let Some((jwt, found_in)) = rules.iter().find_map(|r| token_in(r, headers, query)) else {
        return Ok(None);
    };
    let header = jsonwebtoken::decode_header(&jwt).map_err(|_| AuthnError::Malformed)?;
    let issuer = unverified_issuer(&jwt, header.alg)?;
    let rule = rules.iter().find(|r| r.issuer == issuer && r.reads(&found_in)).ok_or(AuthnError::UnknownIssuer)?;
    Ok(Some(Token { jwt, found_in, rule, kid: header.kid }))
}

/// Verifies `token` with its issuer's keys `set`: its signature (by the key its `kid` names, or
/// any key without one; the key's type must fit the token's algorithm), then `exp`, `nbf`,
/// `iss` and `aud`.
pub fn verify<'r>(token: &Token<'r>, set: &JwkSet) -> Result<Authenticated<'r>, AuthnError> {
    let rule = token.rule;
    let header = jsonwebtoken::decode_header(&token.jwt).map_err(|_| AuthnError::Malformed)?;
    let candidates: Vec<_> = match &header.kid {
        Some(kid) => set.find(kid).into_iter().collect(),
        None => set.keys.iter().collect(),
    };
    let mut validation = Validation::new(header.alg);
    validation.set_issuer(&[&rule.issuer]);
    validation.required_spec_claims.clear();
    validation.validate_nbf = true;
    if rule.audiences.is_empty() {
        validation.validate_aud = false;
    } else {
        validation.set_audience(&rule.audiences);
    }
    let mut refused = AuthnError::Invalid;
    for jwk in candidates {
        // A key that states its algorithm verifies only tokens of that algorithm.
        if jwk.common.key_algorithm.is_some_and(|alg| alg.to_string() != format!("{:?}", header.alg)) {
            continue;
        }
        let Ok(key) = DecodingKey::from_jwk(jwk) else { continue };
        match jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(&token.jwt, &key, &validation) {
            Ok(data) => {
                let auth = RequestAuth::from_claims(&rule.issuer, data.claims);
                return Ok(Authenticated { auth, found_in: token.found_in.clone(), rule });
            }
            Err(e) => {
                refused = match e.kind() {
                    ErrorKind::ExpiredSignature => AuthnError::Expired,
                    ErrorKind::ImmatureSignature => AuthnError::NotYetValid,
                    ErrorKind::InvalidAudience => AuthnError::Audience,
                    _ => AuthnError::Invalid,
                };
                if refused != AuthnError::Invalid {
                    // The signature verified: the claims are what is wrong, whatever the key.
                    break;
                }
            }
        }
    }
    Err(refused)
}

impl JwtRule {
    /// Whether a token in `place` is one of this rule's.
    fn reads(&self, place: &TokenPlace) -> bool {
        match place {
            TokenPlace::Header(name) => self.from_headers.iter().any(|h| h.name == *name),
            TokenPlace::Param(name) => self.from_params.iter().any(|p| p == name),
        }
    }
}

/// The token in the first place of `rule` that has one.
fn token_in(rule: &JwtRule, headers: &http::HeaderMap, query: Option<&str>) -> Option<(String, TokenPlace)> {
    for h in &rule.from_headers {
        for value in headers.get_all(h.name.as_str()).iter().filter_map(|v| v.to_str().ok()) {
            if let Some(token) = value.strip_prefix(h.prefix.as_str()).map(str::trim).filter(|t| !t.is_empty()) {
                return Some((token.to_string(), TokenPlace::Header(h.name.clone())));
            }
        }
    }
    let pairs = query.into_iter().flat_map(|q| q.split('&')).filter_map(|p| p.split_once('='));
    for (name, value) in pairs {
        if rule.from_params.iter().any(|p| p == name) && !value.is_empty() {
            return Some((value.to_string(), TokenPlace::Param(name.to_string())));
        }
    }
    None
}

/// The `iss` of a token (of algorithm `alg`), read before it is verified, to pick the rule
/// that verifies it.
fn unverified_issuer(token: &str, alg: jsonwebtoken::Algorithm) -> Result<String, AuthnError> {
    let mut peek = Validation::new(alg);
    peek.insecure_disable_signature_validation();
    peek.required_spec_claims.clear();
    peek.validate_exp = false;
    peek.validate_aud = false;
    let data = jsonwebtoken::decode::<serde_json::Map<String, serde_json::Value>>(
        token,
        &DecodingKey::from_secret(&[]),
        &peek,
    )
    .map_err(|_| AuthnError::Malformed)?;
    Ok(data.claims.get("iss").and_then(|v| v.as_str()).unwrap_or_default().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TargetKind;

    fn validate(yaml: &str) -> Result<RequestAuthentication, SpecError> {
        let spec: RequestAuthenticationSpec = serde_yaml::from_str(yaml).expect("YAML of the spec");
        spec.validate("shop", "jwt")
    }

    const TARGET: &str = "targetRefs: [{kind: Service, name: web}]\n";
    /// A P-256 public key as a JWKS (RFC 7517 appendix A.1's first key).
    const JWKS: &str = r#"{"keys":[{"kty":"EC","crv":"P-256","x":"MKBCTNIcKUSDii11ySs3526iDZ8AiTo7Tu6KPAqv7D4","y":"4Etl6SRW2YiLUrN5vfvVHuhp7x8PxltmWWlbbM4IFyM","use":"sig","kid":"1","alg":"ES256"}]}"#;

    #[test]
    fn jwt_rules_take_istio_fields_and_defaults() {
        let p = validate(&format!(
            "{TARGET}jwtRules:\n- issuer: https://issuer.example\n  audiences: [web]\n  jwksUri: http://keys.example:8080/jwks.json\n- issuer: inline\n  jwks: '{JWKS}'\n  fromHeaders: [{{name: X-Jwt}}]\n  forwardOriginalToken: true\n  outputPayloadToHeader: X-Payload\n"
        ))
        .unwrap();
        assert_eq!(p.target_refs, [TargetRef { kind: TargetKind::Service, name: "web".into() }]);
        let (uri, inline) = (&p.rules[0], &p.rules[1]);
        assert_eq!(uri.jwks, Jwks::Uri("http://keys.example:8080/jwks.json".into()));
        assert_eq!(uri.audiences, ["web"]);
        // Neither headers nor params: Istio's defaults, and the token is not forwarded.
        assert_eq!(uri.from_headers, [TokenHeader { name: "authorization".into(), prefix: "Bearer ".into() }]);
        assert_eq!(uri.from_params, ["access_token"]);
        assert!(!uri.forward_original_token && uri.output_payload_to_header.is_none());
        assert_eq!(inline.jwks, Jwks::Inline(JWKS.into()));
        assert_eq!(inline.from_headers, [TokenHeader { name: "x-jwt".into(), prefix: String::new() }]);
        assert!(inline.from_params.is_empty(), "headers given: no default parameter");
        assert!(inline.forward_original_token);
        assert_eq!(inline.output_payload_to_header.as_deref(), Some("x-payload"));
    }

    #[test]
    fn every_bad_field_is_named() {
        let rule = |body: &str| format!("{TARGET}jwtRules:\n- {body}");
        let table = [
            (rule("jwksUri: http://k/jwks"), "spec.jwtRules[0].issuer"),
            (rule("issuer: i\n  jwksUri: ftp://keys.example/jwks"), "spec.jwtRules[0].jwksUri"),
            (rule("issuer: i\n  jwksUri: http://127.0.0.1:9901/admin"), "spec.jwtRules[0].jwksUri"),
            (rule("issuer: i\n  jwksUri: http://169.254.169.254/latest/meta-data/"), "spec.jwtRules[0].jwksUri"),
            (rule("issuer: i\n  jwksUri: https://[::ffff:169.254.169.254]/x"), "spec.jwtRules[0].jwksUri"),
            (rule("issuer: i\n  jwksUri: https://[fd00:ec2::254]/x"), "spec.jwtRules[0].jwksUri"),
            (rule("issuer: i\n  jwksUri: http://metadata.google.internal/x"), "spec.jwtRules[0].jwksUri"),
            (rule("issuer: i\n  jwksUri: https://LocalHost./x"), "spec.jwtRules[0].jwksUri"),
            (rule("issuer: i\n  jwksUri: file:///etc/jwks.json"), "spec.jwtRules[0].jwksUri"),
            (rule("issuer: i\n  jwksUri: /jwks.json"), "spec.jwtRules[0].jwksUri"),
            (rule("issuer: i"), "spec.jwtRules[0]"),
            (rule(&format!("issuer: i\n  jwksUri: http://k/j\n  jwks: '{JWKS}'")), "spec.jwtRules[0]"),
            (rule("issuer: i\n  jwks: 'not json'"), "spec.jwtRules[0].jwks"),
            (rule("issuer: i\n  jwks: '{\"keys\": []}'"), "spec.jwtRules[0].jwks"),
            (
                rule("issuer: i\n  jwksUri: http://k/j\n  fromHeaders: [{name: 'a b'}]"),
                "spec.jwtRules[0].fromHeaders[0].name",
            ),
            (rule("issuer: i\n  jwksUri: http://k/j\n  fromParams: ['']"), "spec.jwtRules[0].fromParams[0]"),
            (format!("{TARGET}jwtRules: []\n"), "spec.jwtRules"),
            ("jwtRules: [{issuer: i, jwksUri: 'http://k/j'}]\n".to_string(), "spec.targetRefs"),
            (
                "selector: {matchLabels: {app: web}}\njwtRules: [{issuer: i, jwksUri: 'http://k/j'}]\n".to_string(),
                "spec.selector",
            ),
            (
                "targetRefs: [{kind: Pod, name: web}]\njwtRules: [{issuer: i, jwksUri: 'http://k/j'}]\n".to_string(),
                "spec.targetRefs[0].kind",
            ),
        ];
        for (yaml, field) in table {
            let e = validate(&yaml).unwrap_err();
            assert_eq!(e.field, field, "{yaml}: {e}");
        }
        let e = validate(&rule("issuer: i\n  jwksUri: ftp://keys.example/jwks")).unwrap_err();
        assert!(e.message.contains("the scheme \"ftp\" is not http or https"), "{e}");
        // A symmetric key (a shared secret that mints tokens too) is refused, even beside a
        // public one.
        let hmac = r#"{"kty":"oct","alg":"HS256","kid":"s","k":"c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0"}"#;
        let jwks = JWKS.replacen("[", &format!("[{hmac},"), 1);
        let e = validate(&rule(&format!("issuer: i\n  jwks: '{jwks}'"))).unwrap_err();
        assert_eq!(e.field, "spec.jwtRules[0].jwks", "{e}");
        assert!(e.message.contains("key 0 is a symmetric (kty oct) key"), "{e}");
    }

    /// A P-256 key pair: the signing key, and its public half as a JWKS of key id `kid`.
    fn key_pair(kid: &str) -> (jsonwebtoken::EncodingKey, JwkSet) {
        use base64::Engine;
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let point = pair.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","alg":"ES256","kid":"{kid}","x":"{}","y":"{}"}}]}}"#,
            b64(&point[1..33]),
            b64(&point[33..65])
        );
        (jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der()), serde_json::from_str(&jwks).unwrap())
    }

    fn token(key: &jsonwebtoken::EncodingKey, kid: &str, claims: serde_json::Value) -> String {
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(kid.into());
        jsonwebtoken::encode(&header, &claims, key).unwrap()
    }

    #[test]
    fn a_token_is_verified_by_its_issuers_keys_and_each_refusal_says_why() {
        let (signing, keys) = key_pair("k1");
        let (other_signing, _) = key_pair("k1");
        let p = validate(&format!(
            "{TARGET}jwtRules:\n- issuer: https://issuer.example\n  audiences: [web]\n  jwksUri: http://keys.example/jwks\n"
        ))
        .unwrap();
        let rules: Vec<&JwtRule> = p.rules.iter().collect();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let claims = |iss: &str, aud: &str, exp: u64| serde_json::json!({"iss": iss, "sub": "alice", "aud": aud, "exp": exp, "groups": ["dev"]});
        let check = |token: Option<&str>| {
            let mut headers = http::HeaderMap::new();
            if let Some(t) = token {
                headers.insert("authorization", format!("Bearer {t}").parse().unwrap());
            }
            authenticate(&rules, &headers, None, |_| Some(&keys))
        };

        let good = token(&signing, "k1", claims("https://issuer.example", "web", now + 600));
        let ok = check(Some(&good)).unwrap().expect("verified");
        assert_eq!(ok.auth.principal, "https://issuer.example/alice");
        assert_eq!(ok.auth.audiences, ["web"]);
        assert_eq!(ok.auth.claims["groups"], serde_json::json!(["dev"]));
        assert_eq!(ok.found_in, TokenPlace::Header("authorization".into()));
        // No token: passes, unauthenticated.
        assert_eq!(check(None), Ok(None));
        let cases = [
            (token(&signing, "k1", claims("https://issuer.example", "web", now - 600)), AuthnError::Expired),
            (token(&signing, "k1", claims("https://other.example", "web", now + 600)), AuthnError::UnknownIssuer),
            (token(&signing, "k1", claims("https://issuer.example", "db", now + 600)), AuthnError::Audience),
            (token(&other_signing, "k1", claims("https://issuer.example", "web", now + 600)), AuthnError::Invalid),
            (token(&signing, "k9", claims("https://issuer.example", "web", now + 600)), AuthnError::Invalid),
            ("not-a-jwt".to_string(), AuthnError::Malformed),
        ];
        for (t, why) in cases {
            assert_eq!(check(Some(&t)), Err(why.clone()), "{why}");
        }
        assert_eq!(AuthnError::Expired.to_string(), "Jwt is expired");
        // The default query parameter is a place too; keys not at hand refuse.
        let by_param =
            authenticate(&rules, &http::HeaderMap::new(), Some(&format!("a=1&access_token={good}")), |_| Some(&keys));
        assert_eq!(by_param.unwrap().unwrap().found_in, TokenPlace::Param("access_token".into()));
        let mut headers = http::HeaderMap::new();
        headers.insert("authorization", format!("Bearer {good}").parse().unwrap());
        assert_eq!(authenticate(&rules, &headers, None, |_| None), Err(AuthnError::NoKeys));
        // An issuer's rule takes its tokens only from its own places.
        let elsewhere = validate(&format!(
            "{TARGET}jwtRules:\n- issuer: https://other.example\n  jwksUri: http://keys.example/other\n- issuer: https://issuer.example\n  jwksUri: http://keys.example/jwks\n  fromHeaders: [{{name: x-jwt}}]\n"
        ))
        .unwrap();
        let rules: Vec<&JwtRule> = elsewhere.rules.iter().collect();
        assert_eq!(authenticate(&rules, &headers, None, |_| Some(&keys)), Err(AuthnError::UnknownIssuer));
        let mut x_jwt = http::HeaderMap::new();
        x_jwt.insert("x-jwt", good.parse().unwrap());
        let found = authenticate(&rules, &x_jwt, None, |_| Some(&keys)).unwrap().unwrap();
        assert_eq!(found.found_in, TokenPlace::Header("x-jwt".into()));
    }

    #[test]
    fn a_token_cannot_choose_a_weaker_algorithm_than_its_key() {
        use base64::Engine;
        let (_, keys) = key_pair("k1");
        let p =
            validate(&format!("{TARGET}jwtRules:\n- issuer: https://issuer.example\n  jwksUri: http://k/j\n")).unwrap();
        let rules: Vec<&JwtRule> = p.rules.iter().collect();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        let claims = serde_json::json!({"iss": "https://issuer.example", "sub": "mallory", "exp": now + 600});
        let with_bearer = |t: &str| {
            let mut headers = http::HeaderMap::new();
            headers.insert("authorization", format!("Bearer {t}").parse().unwrap());
            headers
        };
        // HS256 "signed" with the public key's text as the secret (the classic confusion): the
        // EC key never verifies an HMAC.
        let public_text = serde_json::to_string(&keys.keys[0]).unwrap();
        for secret in [public_text.as_bytes(), b"".as_slice()] {
            let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256);
            header.kid = Some("k1".into());
            let forged =
                jsonwebtoken::encode(&header, &claims, &jsonwebtoken::EncodingKey::from_secret(secret)).unwrap();
            assert_eq!(authenticate(&rules, &with_bearer(&forged), None, |_| Some(&keys)), Err(AuthnError::Invalid));
        }
        // `alg: none` with no signature is not a JWT the mesh reads.
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let unsigned = format!("{}.{}.", b64(br#"{"alg":"none","typ":"JWT"}"#), b64(claims.to_string().as_bytes()));
        assert_eq!(authenticate(&rules, &with_bearer(&unsigned), None, |_| Some(&keys)), Err(AuthnError::Malformed));
        // A key that names its algorithm verifies no token of another (ES384 claimed, ES256 key).
        let (signing, keys) = key_pair("k2");
        let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some("k2".into());
        let good = jsonwebtoken::encode(&header, &claims, &signing).unwrap();
        assert!(authenticate(&rules, &with_bearer(&good), None, |_| Some(&keys)).is_ok());
        let mut mislabelled = keys.clone();
        mislabelled.keys[0].common.key_algorithm = Some(jsonwebtoken::jwk::KeyAlgorithm::ES384);
        assert_eq!(authenticate(&rules, &with_bearer(&good), None, |_| Some(&mislabelled)), Err(AuthnError::Invalid));
    }
}
