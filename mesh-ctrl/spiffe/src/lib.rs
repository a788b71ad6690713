//! Workload identities of the mesh: [`SpiffeId`], `spiffe://<trust domain>/ns/<namespace>/sa/<service
//! account>`, as Istio issues them. This is the one place that builds or parses SPIFFE IDs: the
//! CA signs them, agents read them from certificates and match them in policies (as Istio
//! principals, the ID without its scheme), meshctl prints them.
#![forbid(unsafe_code)]

use std::fmt;
use std::str::FromStr;

/// The URI scheme of SPIFFE IDs, with its `//`.
pub const SCHEME: &str = "spiffe://";

/// A workload identity: trust domain, namespace and service account.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    /// The whole URI; its parts are found again on demand (it was checked once, when made).
    uri: String,
}

/// Why a text is not a SPIFFE ID of the mesh.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// It does not start with `spiffe://`.
    #[error("{0:?} is not a SPIFFE ID: it must start with spiffe://")]
    Scheme(String),
    /// The trust domain is empty or holds characters SPIFFE does not allow.
    #[error("{0:?}: the trust domain must be non-empty lowercase letters, digits, '.', '-' or '_'")]
    TrustDomain(String),
    /// The path is not `/ns/<namespace>/sa/<service account>`.
    #[error("{0:?}: the path must be /ns/<namespace>/sa/<service account>")]
    Path(String),
}

fn valid_trust_domain(td: &str) -> bool {
    !td.is_empty() && td.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b))
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && s.bytes().all(|b| b.is_ascii_graphic())
}

impl SpiffeId {
    /// The identity of service account `namespace/service_account` in `trust_domain`.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, SpiffeIdError> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    fn parts(&self) -> [&str; 3] {
        let mut it = self.principal().split('/');
        let td = it.next().unwrap_or_default();
        let ns = it.nth(1).unwrap_or_default();
        let sa = it.nth(1).unwrap_or_default();
        [td, ns, sa]
    }

    /// The trust domain.
    pub fn trust_domain(&self) -> &str {
        self.parts()[0]
    }

    /// The namespace.
    pub fn namespace(&self) -> &str {
        self.parts()[1]
    }

    /// The service account.
    pub fn service_account(&self) -> &str {
        self.parts()[2]
    }

    /// The Istio principal: the ID without its scheme, `<trust domain>/ns/<ns>/sa/<sa>`.
    pub fn principal(&self) -> &str {
        &self.uri[SCHEME.len()..]
    }

    /// The whole ID, `spiffe://...`.
    pub fn as_str(&self) -> &str {
        &self.uri
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let rest = s.strip_prefix(SCHEME).ok_or_else(|| SpiffeIdError::Scheme(s.to_string()))?;
        let (td, path) = rest.split_once('/').unwrap_or((rest, ""));
        if !valid_trust_domain(td) {
            return Err(SpiffeIdError::TrustDomain(s.to_string()));
        }
        let segments: Vec<&str> = path.split('/').collect();
        match segments.as_slice() {
            ["ns", ns, "sa", sa] if valid_segment(ns) && valid_segment(sa) => Ok(Self { uri: s.to_string() }),
            _ => Err(SpiffeIdError::Path(s.to_string())),
        }
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

impl fmt::Debug for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SpiffeId({})", self.uri)
    }
}

impl From<SpiffeId> for String {
    fn from(id: SpiffeId) -> Self {
        id.uri
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builds_parses_and_splits() {
        let id = SpiffeId::new("cluster.local", "shop", "web").unwrap();
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/shop/sa/web");
        assert_eq!((id.trust_domain(), id.namespace(), id.service_account()), ("cluster.local", "shop", "web"));
        assert_eq!(id.principal(), "cluster.local/ns/shop/sa/web");
        assert_eq!("spiffe://cluster.local/ns/shop/sa/web".parse::<SpiffeId>().unwrap(), id);
    }

    #[test]
    fn refuses_what_is_not_a_mesh_identity() {
        let err = |s: &str| s.parse::<SpiffeId>().unwrap_err();
        assert!(matches!(err("cluster.local/ns/a/sa/b"), SpiffeIdError::Scheme(_)));
        assert!(matches!(err("spiffe:///ns/a/sa/b"), SpiffeIdError::TrustDomain(_)));
        assert!(matches!(err("spiffe://Cluster.Local/ns/a/sa/b"), SpiffeIdError::TrustDomain(_)));
        for path in ["", "/", "/ns/a", "/ns/a/sa/", "/ns//sa/b", "/ns/a/sa/b/c", "/sa/b/ns/a", "/ns/a b/sa/c"] {
            assert!(matches!(err(&format!("spiffe://td{path}")), SpiffeIdError::Path(_)), "{path:?}");
        }
        assert_eq!(
            err("spiffe://td/x").to_string(),
            "\"spiffe://td/x\": the path must be /ns/<namespace>/sa/<service account>"
        );
    }

    proptest::proptest! {
        /// Whatever parses prints back as itself and is rebuilt from its parts.
        #[test]
        fn parse_display_round_trip(s in "spiffe://[a-z0-9._-]{0,6}/(ns|sa|x)/[a-z/]{0,4}/(sa|ns)/[a-z]{0,4}") {
            if let Ok(id) = s.parse::<SpiffeId>() {
                proptest::prop_assert_eq!(id.to_string(), s.clone());
                let rebuilt = SpiffeId::new(id.trust_domain(), id.namespace(), id.service_account()).unwrap();
                proptest::prop_assert_eq!(rebuilt, id);
            }
        }
    }
}
