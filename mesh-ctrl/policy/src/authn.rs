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
//! Built so far: the object and its validation. Not yet wired: mesh-ctrl's sources and config
//! stream, the waypoint's token checks and JWKS fetching, AuthorizationPolicy
//! `requestPrincipals` and `request.auth.claims` (issue #16).

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

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
    }
}
