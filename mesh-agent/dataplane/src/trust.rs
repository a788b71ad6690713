//! The mesh trust bundle: the roots the agent verifies HBONE peers against, and which CA
//! certificate of mesh-ctrl signs workload certificates now. mesh-ctrl streams both with every
//! config update; a bundle is taken only when it holds a root pinned in `--ca-root` (see
//! [`crate::ctrl::Ctrl::check_bundle`]). During a root rotation the bundle holds the old and the
//! new root, so peers with a certificate from either are accepted; every handshake verifies
//! against the bundle held at that moment, so a change applies to the next connection without
//! touching open ones. It owns the parsed bundle; it never opens connections.

use std::sync::Arc;
use std::time::SystemTime;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use rustls::server::danger::ClientCertVerifier;
use rustls::RootCertStore;
use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// The bundle held now (None until mesh-ctrl sent one).
pub type TrustReceiver = watch::Receiver<Option<Arc<TrustBundle>>>;

/// One root of the bundle, for status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RootInfo {
    /// Subject, RFC 4514 text.
    pub subject: String,
    /// SHA-256 of the DER, hex.
    pub sha256: String,
    /// Expiry.
    pub not_after: SystemTime,
}

/// A parsed trust bundle.
pub struct TrustBundle {
    /// The roots, for rustls.
    pub roots: Arc<RootCertStore>,
    /// The roots, for status, in the order mesh-ctrl sent them.
    pub info: Vec<RootInfo>,
    /// SHA-256 (hex) of the CA certificate that signs workload certificates now.
    pub issuer_sha256: String,
    /// The client-certificate verifier of 15008 for these roots (built once per bundle).
    pub client_verifier: Arc<dyn ClientCertVerifier>,
}

impl std::fmt::Debug for TrustBundle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrustBundle").field("info", &self.info).field("issuer_sha256", &self.issuer_sha256).finish()
    }
}

/// SHA-256 of `der`, hex.
pub fn sha256_hex(der: &[u8]) -> String {
    Sha256::digest(der).iter().map(|b| format!("{b:02x}")).collect()
}

/// The certificates of `pems` (one or more PEM certificates each).
pub fn certificates(pems: &[String]) -> Result<Vec<CertificateDer<'static>>, String> {
    let mut all = Vec::new();
    for pem in pems {
        for cert in CertificateDer::pem_slice_iter(pem.as_bytes()) {
            all.push(cert.map_err(|e| format!("bad PEM: {e}"))?);
        }
    }
    Ok(all)
}

impl TrustBundle {
    /// The bundle of the roots `roots_pem`, with `issuer_sha256` the CA certificate that signs
    /// workload certificates now.
    pub fn new(roots_pem: &[String], issuer_sha256: &str) -> Result<Self, String> {
        Self::from_certs(certificates(roots_pem)?, issuer_sha256)
    }

    /// [`TrustBundle::new`] of roots already parsed out of their PEM.
    pub fn from_certs(ders: Vec<CertificateDer<'static>>, issuer_sha256: &str) -> Result<Self, String> {
        if ders.is_empty() {
            return Err("no root in it".into());
        }
        let mut roots = RootCertStore::empty();
        let mut info = Vec::new();
        for der in ders {
            let (_, parsed) = x509_parser::parse_x509_certificate(&der).map_err(|e| format!("unparsable root: {e}"))?;
            let secs = parsed.validity().not_after.timestamp().max(0) as u64;
            info.push(RootInfo {
                subject: parsed.subject().to_string(),
                sha256: sha256_hex(&der),
                not_after: SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs),
            });
            roots.add(der).map_err(|e| format!("unusable root: {e}"))?;
        }
        let roots = Arc::new(roots);
        let client_verifier = crate::tls::client_verifier(roots.clone()).map_err(|e| e.to_string())?;
        Ok(Self { roots, info, issuer_sha256: issuer_sha256.to_string(), client_verifier })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn root() -> rcgen::Certificate {
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.self_signed(&key).unwrap()
    }

    #[test]
    fn a_bundle_of_two_roots_holds_both() {
        let (old, new) = (root(), root());
        let bundle = TrustBundle::new(&[old.pem(), new.pem()], "abc").unwrap();
        assert_eq!(bundle.roots.len(), 2);
        let held: Vec<&str> = bundle.info.iter().map(|r| r.sha256.as_str()).collect();
        assert!(held.contains(&sha256_hex(old.der()).as_str()) && held.contains(&sha256_hex(new.der()).as_str()));
        assert_eq!(bundle.issuer_sha256, "abc");
        // One string holding both is the same bundle.
        assert_eq!(TrustBundle::new(&[format!("{}{}", old.pem(), new.pem())], "").unwrap().info, bundle.info);
        assert!(TrustBundle::new(&[], "").is_err());
        assert!(TrustBundle::new(
            &["-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n".into()],
            ""
        )
        .is_err());
    }
}
