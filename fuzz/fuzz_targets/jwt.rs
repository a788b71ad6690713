//! JWT authentication as the waypoint runs it (`ferrymesh_policy::authn::authenticate`): a
//! token from a header or a query parameter, its header and claims any JSON (so `exp`, `nbf`,
//! `aud` and `iss` of any type), signed with the issuer's key or carrying any signature, checked
//! against the issuer's JWKS or against any key set text. Nothing panics; checked against the
//! issuer's keys, a token is accepted only when the issuer's key signed it, and an accepted
//! token is its rule's issuer's.
#![no_main]

use std::sync::OnceLock;

use arbitrary::Arbitrary;
use base64::Engine;
use ferrymesh_policy::authn::{self, JwkSet, JwtRule, RequestAuthenticationSpec};
use http::{HeaderMap, HeaderValue};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    /// The token's header: `{"alg":..,"kid":..}` unless `raw_header`.
    alg: u8,
    kid: Option<String>,
    raw_header: Option<String>,
    /// The token's claims (JSON text, usually an object).
    claims: String,
    /// Signed with the issuer's key; else `signature` is the third part.
    signed: bool,
    signature: Vec<u8>,
    /// The whole token instead of the three parts.
    raw_token: Option<String>,
    /// Where it is: 0 `authorization: Bearer`, 1 `x-jwt`, 2 `?access_token=`, 3 `?token=`.
    place: u8,
    /// Another key set than the issuer's (any text).
    jwks: Option<String>,
}

const ALGS: [&str; 6] = ["ES256", "RS256", "HS256", "none", "EdDSA", "PS512"];

struct Issuer {
    signing: jsonwebtoken::EncodingKey,
    keys: JwkSet,
    rules: Vec<JwtRule>,
}

/// A P-256 key made once, its JWKS, and the rules of a RequestAuthentication trusting it.
fn issuer() -> &'static Issuer {
    static ISSUER: OnceLock<Issuer> = OnceLock::new();
    ISSUER.get_or_init(|| {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("a P-256 key");
        let point = pair.public_key_raw();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = format!(
            r#"{{"keys":[{{"kty":"EC","crv":"P-256","alg":"ES256","kid":"k1","x":"{}","y":"{}"}}]}}"#,
            b64(&point[1..33]),
            b64(&point[33..65])
        );
        let spec: RequestAuthenticationSpec = serde_json::from_value(serde_json::json!({
            "targetRefs": [{"kind": "Service", "name": "web"}],
            "jwtRules": [
                {"issuer": "https://issuer.example", "audiences": ["web"], "jwks": jwks},
                {"issuer": "inline", "jwks": jwks, "fromHeaders": [{"name": "x-jwt"}], "fromParams": ["token"]},
            ],
        }))
        .expect("RequestAuthentication JSON");
        let rules = spec.validate("shop", "jwt").expect("a valid RequestAuthentication").rules;
        Issuer {
            signing: jsonwebtoken::EncodingKey::from_ec_der(&pair.serialize_der()),
            keys: serde_json::from_str(&jwks).expect("a JWKS"),
            rules,
        }
    })
}

fuzz_target!(|input: Input| {
    let issuer = issuer();
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let header = input.raw_header.clone().unwrap_or_else(|| {
        let alg = ALGS[usize::from(input.alg) % ALGS.len()];
        serde_json::json!({"alg": alg, "typ": "JWT", "kid": input.kid}).to_string()
    });
    let message = format!("{}.{}", b64(header.as_bytes()), b64(input.claims.as_bytes()));
    let signed_by_issuer = input.signed && input.raw_token.is_none();
    let signature = match signed_by_issuer {
        true => jsonwebtoken::crypto::sign(message.as_bytes(), &issuer.signing, jsonwebtoken::Algorithm::ES256)
            .expect("ES256 signs"),
        false => b64(&input.signature),
    };
    let token = input.raw_token.clone().unwrap_or(format!("{message}.{signature}"));
    let mut headers = HeaderMap::new();
    let mut query = None;
    match input.place % 4 {
        0 => match HeaderValue::from_str(&format!("Bearer {token}")) {
            Ok(value) => drop(headers.insert("authorization", value)),
            Err(_) => return,
        },
        1 => match HeaderValue::from_str(&token) {
            Ok(value) => drop(headers.insert("x-jwt", value)),
            Err(_) => return,
        },
        2 => query = Some(format!("a=b&access_token={token}")),
        _ => query = Some(format!("token={token}")),
    }
    let other: Option<JwkSet> = input.jwks.as_deref().and_then(|text| serde_json::from_str(text).ok());
    let rules: Vec<&JwtRule> = issuer.rules.iter().collect();
    let keys = |_: &JwtRule| Some(other.as_ref().unwrap_or(&issuer.keys));
    if let Ok(Some(verified)) = authn::authenticate(&rules, &headers, query.as_deref(), keys) {
        // (Another key set's keys are whatever the input says; only the issuer's are known.)
        assert!(signed_by_issuer || other.is_some(), "a token the issuer did not sign was accepted: {token}");
        let claims: serde_json::Value = serde_json::from_str(&input.claims).expect("verified claims are JSON");
        assert_eq!(claims["iss"], verified.rule.issuer.as_str(), "the token is its rule's issuer's");
        assert!(verified.auth.principal.starts_with(&format!("{}/", verified.rule.issuer)));
    }
});
