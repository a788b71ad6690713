//! The mesh CA. This module signs: the certificate and key that sign workload certificates
//! from CSRs, and the trust bundle agents verify peers against (X.509 issuance with rcgen). Its
//! parts: the stores of the CA files, [`dir`] (`--ca-dir`) and [`secret`] (the Kubernetes
//! Secret, and the root ConfigMap for agents); [`service`], the gRPC certificate service; and
//! [`auth`] with [`token_review`], who a calling agent is. Signing never decides who may get
//! which identity (that is [`service`] with [`auth`]).
//!
//! The files, in `--ca-dir` or as keys of the CA Secret, Istio's plug-in CA names:
//! - `ca-cert.pem` + `ca-key.pem` (RSA or ECDSA): the issuing CA, with optional
//!   `cert-chain.pem` (the chain above `ca-cert.pem`) and `root-cert.pem` (the trust bundle);
//! - or, as generated on first start when there is no CA: `root-cert.pem` (the trust bundle)
//!   + `root-key.pem` (0600), which signs with the certificate of the bundle it matches.
//!
//! The trust bundle may hold several roots: during a root rotation the old and the new one
//! are both trusted. [`Reloader`] reads the files again and replaces the CA in force as a whole
//! when they change and make a consistent CA; anything else is refused and changes nothing.

pub mod auth;
pub mod dir;
pub mod secret;
pub mod service;
pub mod token_review;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ferrymesh_spiffe::SpiffeId;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};
use sha2::{Digest, Sha256};
use tokio::sync::watch;
use x509_parser::prelude::{FromDer, X509Certificate};

/// Lifetime of a generated root.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating of leaves, for clocks a little behind ours.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

/// Names of the CA files (in `--ca-dir`, or keys of the CA Secret).
pub const CA_FILES: [&str; 5] = ["ca-cert.pem", "ca-key.pem", "cert-chain.pem", "root-cert.pem", "root-key.pem"];

/// The CA files as read from one place: file name to text.
pub type CaFiles = BTreeMap<String, String>;

/// The CA in force: replaced as a whole when the operator changes the CA files.
pub type CurrentCa = watch::Receiver<Arc<Ca>>;

/// A [`CurrentCa`] that never changes (for tests and fixed setups).
pub fn fixed(ca: Ca) -> CurrentCa {
    watch::channel(Arc::new(ca)).1
}

/// Errors of the CA, written for operators.
#[derive(Debug, thiserror::Error)]
pub enum CaError {
    /// A CA file could not be read or written.
    #[error("CA file {path}: {source}")]
    File {
        /// The file.
        path: PathBuf,
        /// What went wrong.
        source: std::io::Error,
    },
    /// A CA file holds no usable certificate or key, or the files do not fit together.
    #[error("{path}: {message}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The CSR could not be parsed or its signature is wrong.
    #[error("invalid CSR: {0}")]
    Csr(String),
    /// Signing failed.
    #[error("cannot sign the certificate: {0}")]
    Sign(#[from] rcgen::Error),
}

/// A signed workload certificate.
#[derive(Debug, Clone)]
pub struct Signed {
    /// PEM certificates, leaf first, then every CA certificate above it up to the root.
    pub chain_pem: Vec<String>,
    /// When the leaf expires.
    pub not_after: SystemTime,
}

/// mesh-ctrl's own serving certificate (port 15012) and its key.
#[derive(Clone)]
pub struct ServingCert {
    /// PEM certificates, leaf first, then every CA certificate above it.
    pub chain_pem: Vec<String>,
    /// The leaf's private key (PKCS#8 PEM), generated for it.
    pub key_pem: String,
    /// When the leaf expires.
    pub not_after: SystemTime,
}

impl std::fmt::Debug for ServingCert {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServingCert").field("not_after", &self.not_after).finish_non_exhaustive()
    }
}

/// The CA.
pub struct Ca {
    issuer: Issuer<'static, KeyPair>,
    /// The issuing certificate and the chain above it (PEM), appended to every leaf.
    chain_pem: Vec<String>,
    /// The trust bundle agents verify peers against: one PEM certificate per root.
    roots: Vec<String>,
    /// SHA-256 of the issuing certificate (DER), hex.
    issuer_sha256: String,
    ttl: Duration,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca")
            .field("issuer_sha256", &self.issuer_sha256)
            .field("roots", &self.roots.len())
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

fn invalid(path: &Path, message: impl std::fmt::Display) -> CaError {
    CaError::Invalid { path: path.to_path_buf(), message: message.to_string() }
}

/// Splits a PEM bundle into its certificates, keeping each as PEM text.
fn split_certs(path: &Path, pem_text: &str) -> Result<Vec<String>, CaError> {
    let blocks = pem::parse_many(pem_text).map_err(|e| invalid(path, e))?;
    let certs: Vec<String> = blocks.iter().filter(|b| b.tag() == "CERTIFICATE").map(pem::encode).collect();
    if certs.is_empty() {
        return Err(invalid(path, "no CERTIFICATE block"));
    }
    Ok(certs)
}

/// The DER of a PEM certificate produced by [`split_certs`].
fn der(cert_pem: &str) -> Vec<u8> {
    pem::parse(cert_pem).map(|p| p.contents().to_vec()).unwrap_or_default()
}

/// SHA-256 of a PEM certificate's DER, hex.
pub fn sha256_hex(cert_pem: &str) -> String {
    Sha256::digest(der(cert_pem)).iter().map(|b| format!("{b:02x}")).collect()
}

/// A parsed certificate, or why not (`path` names the file).
fn parse_cert<'a>(path: &Path, der: &'a [u8]) -> Result<X509Certificate<'a>, CaError> {
    X509Certificate::from_der(der).map(|(_, c)| c).map_err(|e| invalid(path, format!("unparsable certificate: {e}")))
}

/// Whether `key` is the private key of the certificate `cert_der`.
fn key_matches(key: &KeyPair, cert_der: &[u8]) -> bool {
    X509Certificate::from_der(cert_der)
        .is_ok_and(|(_, c)| c.public_key().subject_public_key.data.as_ref() == key.public_key_raw())
}

/// A PKCS#8 PEM key (RSA or ECDSA); older PEM forms get a hint that converts them.
fn parse_key(path: &Path, text: &str) -> Result<KeyPair, CaError> {
    if text.contains("BEGIN EC PRIVATE KEY") || text.contains("BEGIN RSA PRIVATE KEY") {
        return Err(invalid(
            path,
            "the key must be PKCS#8 (BEGIN PRIVATE KEY); convert it with `openssl pkcs8 -topk8 -nocrypt -in KEY -out KEY.pkcs8`",
        ));
    }
    KeyPair::from_pem(text)
        .map_err(|e| invalid(path, format!("{e}: expected an RSA or ECDSA private key in PKCS#8 PEM")))
}

impl Ca {
    /// A new self-signed ECDSA P-256 root for `trust_domain`: (certificate PEM, key PEM).
    pub fn generate_root(trust_domain: &str) -> Result<(String, String), CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::OrganizationName, trust_domain);
        params.distinguished_name.push(DnType::CommonName, "ferrymesh root CA");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let now = SystemTime::now();
        params.not_before = now.into();
        params.not_after = (now + ROOT_TTL).into();
        let cert = params.self_signed(&key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// The CA the CA files `files` make (see the module doc); `at` names where a file is, for
    /// errors. The files must fit together: the key matches its certificate, and the issuing
    /// chain leads to a root in the trust bundle.
    pub fn from_files(files: &CaFiles, at: &dyn Fn(&str) -> PathBuf, ttl: Duration) -> Result<Self, CaError> {
        let get = |name: &str| files.get(name).map(String::as_str);
        let missing = |name: &str, because: &str| invalid(&at(name), format!("missing ({because})"));
        let (chain_pem, key, roots) = if get("ca-cert.pem").is_some() || get("ca-key.pem").is_some() {
            let cert_text = get("ca-cert.pem").ok_or_else(|| missing("ca-cert.pem", "ca-key.pem is there"))?;
            let key_text = get("ca-key.pem").ok_or_else(|| missing("ca-key.pem", "ca-cert.pem is there"))?;
            let mut chain_pem = split_certs(&at("ca-cert.pem"), cert_text)?;
            let key = parse_key(&at("ca-key.pem"), key_text)?;
            if !key_matches(&key, &der(&chain_pem[0])) {
                return Err(invalid(&at("ca-key.pem"), "is not the key of the certificate in ca-cert.pem"));
            }
            if let Some(text) = get("cert-chain.pem") {
                for cert in split_certs(&at("cert-chain.pem"), text)? {
                    if !chain_pem.contains(&cert) {
                        chain_pem.push(cert);
                    }
                }
            }
            let roots = match get("root-cert.pem") {
                Some(text) => split_certs(&at("root-cert.pem"), text)?,
                None => chain_pem.last().cloned().into_iter().collect(),
            };
            (chain_pem, key, roots)
        } else if let Some(key_text) = get("root-key.pem") {
            let roots_text = get("root-cert.pem").ok_or_else(|| missing("root-cert.pem", "root-key.pem is there"))?;
            let roots = split_certs(&at("root-cert.pem"), roots_text)?;
            let key = parse_key(&at("root-key.pem"), key_text)?;
            let issuing = roots.iter().find(|r| key_matches(&key, &der(r))).cloned().ok_or_else(|| {
                invalid(&at("root-key.pem"), "is the key of none of the certificates in root-cert.pem")
            })?;
            (vec![issuing], key, roots)
        } else if get("root-cert.pem").is_some() {
            return Err(missing("root-key.pem", "root-cert.pem is there, and no ca-cert.pem and ca-key.pem"));
        } else {
            return Err(invalid(
                &at(""),
                "no CA: expected ca-cert.pem and ca-key.pem, or root-cert.pem and root-key.pem",
            ));
        };
        Self::check_chain_to_bundle(&chain_pem, &roots, at)?;
        let issuer_sha256 = sha256_hex(&chain_pem[0]);
        let issuer = Issuer::from_ca_cert_pem(&chain_pem[0], key).map_err(|e| invalid(&at("ca-cert.pem"), e))?;
        Ok(Self { issuer, chain_pem, roots, issuer_sha256, ttl })
    }

    /// Refuses an issuing chain whose top is neither a root of the bundle nor signed by one:
    /// agents would refuse every certificate it signs.
    fn check_chain_to_bundle(
        chain_pem: &[String],
        roots: &[String],
        at: &dyn Fn(&str) -> PathBuf,
    ) -> Result<(), CaError> {
        let top = chain_pem.last().expect("a chain has at least one certificate");
        if roots.contains(top) {
            return Ok(());
        }
        let top_der = der(top);
        let top_cert = parse_cert(&at("ca-cert.pem"), &top_der)?;
        for root in roots {
            let root_der = der(root);
            let root_cert = parse_cert(&at("root-cert.pem"), &root_der)?;
            if root_cert.subject().as_raw() == top_cert.issuer().as_raw()
                && top_cert.verify_signature(Some(root_cert.public_key())).is_ok()
            {
                return Ok(());
            }
        }
        Err(invalid(
            &at("root-cert.pem"),
            format!(
                "holds no root of the issuing certificate (issued by {}): agents would refuse every certificate it signs",
                top_cert.issuer()
            ),
        ))
    }

    /// The trust bundle (PEM, every root one after the other).
    pub fn roots_pem(&self) -> String {
        self.roots.concat()
    }

    /// The trust bundle: one PEM certificate per root.
    pub fn roots(&self) -> &[String] {
        &self.roots
    }

    /// SHA-256 (hex) of the certificate that signs now.
    pub fn issuer_sha256(&self) -> &str {
        &self.issuer_sha256
    }

    /// Whether `other` signs with the same certificate and trusts the same roots.
    pub fn same_as(&self, other: &Ca) -> bool {
        self.issuer_sha256 == other.issuer_sha256 && self.roots == other.roots && self.chain_pem == other.chain_pem
    }

    /// Issues mesh-ctrl's own serving certificate for `names` (DNS names, or IP addresses),
    /// valid `ttl`, with a key generated for it. Agents verify it against the mesh root.
    pub fn issue_serving(&self, names: &[String], ttl: Duration) -> Result<ServingCert, CaError> {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256)?;
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, "ferrymesh-ctrl");
        params.subject_alt_names = names
            .iter()
            .map(|name| match name.parse::<std::net::IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => name.as_str().try_into().map(SanType::DnsName),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let now = SystemTime::now();
        let not_after = now + ttl;
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        params.use_authority_key_identifier_extension = true;
        let leaf = params.signed_by(&key, &self.issuer)?;
        let mut chain_pem = vec![leaf.pem()];
        chain_pem.extend(self.chain_pem.iter().cloned());
        Ok(ServingCert { chain_pem, key_pem: key.serialize_pem(), not_after })
    }

    /// Signs the CSR `csr_pem` for `spiffe_id`. Only the CSR's public key is used: subject,
    /// SANs and extensions come from the CA (the identity was authorized by the caller).
    pub fn sign(&self, csr_pem: &str, spiffe_id: &SpiffeId) -> Result<Signed, CaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::Csr(e.to_string()))?;
        if *csr.public_key.algorithm() != PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::Csr("the key must be ECDSA P-256".into()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.as_str().try_into()?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        params.serial_number = Some(SerialNumber::from_slice(&rand::random::<[u8; 16]>()));
        let now = SystemTime::now();
        let not_after = now + self.ttl;
        params.not_before = (now - CLOCK_SKEW).into();
        params.not_after = not_after.into();
        params.use_authority_key_identifier_extension = true;
        csr.params = params;
        let leaf = csr.signed_by(&self.issuer)?;
        let mut chain_pem = vec![leaf.pem()];
        chain_pem.extend(self.chain_pem.iter().cloned());
        Ok(Signed { chain_pem, not_after })
    }
}

/// Applies a CA made from changed files (`Some(Ok)`) to `current`, or logs why the files were
/// refused (`Some(Err)`: the CA in force stays). Counted in ferrymesh_ctrl_ca_reloads_total.
pub fn apply_reload(current: &watch::Sender<Arc<Ca>>, reloaded: Result<Ca, CaError>, origin: &str) {
    match reloaded {
        Ok(ca) if current.borrow().same_as(&ca) => {}
        Ok(ca) => {
            tracing::info!(
                %origin,
                issuer_sha256 = ca.issuer_sha256(),
                roots = ca.roots().len(),
                "CA files changed: signing and trusting what they hold now"
            );
            metrics::counter!("ferrymesh_ctrl_ca_reloads_total", "result" => "applied").increment(1);
            current.send_replace(Arc::new(ca));
        }
        Err(e) => {
            tracing::warn!(%origin, "CA files changed but are refused: {e}; the CA in force stays");
            metrics::counter!("ferrymesh_ctrl_ca_reloads_total", "result" => "rejected").increment(1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::dir::Reloader;
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

    use super::*;

    fn id(text: &str) -> SpiffeId {
        text.parse().unwrap()
    }

    fn csr() -> String {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        CertificateParams::default().serialize_request(&key).unwrap().pem().unwrap()
    }

    fn uri_sans(pem_text: &str) -> Vec<String> {
        let der = pem::parse(pem_text).unwrap();
        let (_, cert) = X509Certificate::from_der(der.contents()).unwrap();
        cert.extensions()
            .iter()
            .filter_map(|e| match e.parsed_extension() {
                ParsedExtension::SubjectAlternativeName(san) => Some(san.general_names.clone()),
                _ => None,
            })
            .flatten()
            .filter_map(|n| match n {
                GeneralName::URI(u) => Some(u.to_string()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn generates_a_root_once_with_a_private_key_file() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(60)).unwrap();
        let mode = std::fs::metadata(dir.path().join("root-key.pem")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(60)).unwrap();
        assert_eq!(ca.roots_pem(), again.roots_pem(), "the root is reused, not regenerated");
        let signed = ca.sign(&csr(), &id("spiffe://cluster.local/ns/shop/sa/web")).unwrap();
        assert_eq!(signed.chain_pem.len(), 2);
        assert_eq!(uri_sans(&signed.chain_pem[0]), vec!["spiffe://cluster.local/ns/shop/sa/web"]);
        let ttl = signed.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(ttl <= Duration::from_secs(60) && ttl > Duration::from_secs(55), "{ttl:?}");
    }

    #[test]
    fn bad_csrs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(60)).unwrap();
        let id = &id("spiffe://cluster.local/ns/a/sa/b");
        assert!(matches!(ca.sign("not a csr", id), Err(CaError::Csr(_))));
        let mut tampered = pem::parse(csr()).unwrap().contents().to_vec();
        let n = tampered.len();
        tampered[n - 5] ^= 0xff;
        let tampered = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", tampered));
        assert!(matches!(ca.sign(&tampered, id), Err(CaError::Csr(_))), "a CSR with a bad signature is refused");
        let ed = KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
        let ed_csr = CertificateParams::default().serialize_request(&ed).unwrap().pem().unwrap();
        let e = ca.sign(&ed_csr, id).unwrap_err();
        assert_eq!(e.to_string(), "invalid CSR: the key must be ECDSA P-256");
    }

    fn write(dir: &Path, name: &str, text: &str) {
        std::fs::write(dir.join(name), text).unwrap();
    }

    /// Add a second root, switch signing to it, remove the old one: each step is one file
    /// change; a step that does not fit is refused and the CA in force stays.
    #[test]
    fn a_root_rotation_adds_switches_and_removes_and_refuses_what_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let ttl = Duration::from_secs(60);
        let first = Ca::load_or_create(d, "cluster.local", ttl).unwrap();
        let mut reloader = Reloader::new(d, ttl);
        assert!(reloader.poll().is_none(), "nothing changed");
        let old_root = std::fs::read_to_string(d.join("root-cert.pem")).unwrap();
        let (new_root, new_key) = Ca::generate_root("cluster.local").unwrap();
        let (tx, current) = watch::channel(Arc::new(first));
        let old_issuer = current.borrow().issuer_sha256().to_string();
        assert_eq!(old_issuer, sha256_hex(&old_root));

        write(d, "root-cert.pem", &format!("{old_root}{new_root}"));
        let added = reloader.poll().unwrap().unwrap();
        assert_eq!(added.roots().len(), 2, "both roots trusted");
        assert_eq!(added.issuer_sha256(), old_issuer, "still signing with the old root");
        apply_reload(&tx, Ok(added), "test");
        assert_eq!(current.borrow().roots().len(), 2);

        write(d, "root-key.pem", &Ca::generate_root("cluster.local").unwrap().1);
        let e = reloader.poll().unwrap().unwrap_err().to_string();
        assert!(e.contains("root-key.pem: is the key of none of the certificates in root-cert.pem"), "{e}");
        apply_reload(&tx, Err(CaError::Csr(e)), "test");
        assert_eq!(current.borrow().issuer_sha256(), old_issuer, "a refused change changes nothing");

        write(d, "root-key.pem", &new_key);
        let switched = reloader.poll().unwrap().unwrap();
        assert_eq!(switched.issuer_sha256(), sha256_hex(&new_root), "signing with the new root");
        assert_eq!(switched.roots().len(), 2);
        let signed = switched.sign(&csr(), &id("spiffe://cluster.local/ns/a/sa/b")).unwrap();
        assert_eq!(der(&signed.chain_pem[1]), der(&new_root));
        apply_reload(&tx, Ok(switched), "test");

        write(d, "root-cert.pem", &old_root);
        let e = reloader.poll().unwrap().unwrap_err().to_string();
        assert!(e.contains("root-key.pem"), "removing the signing root is refused: {e}");

        write(d, "root-cert.pem", &new_root);
        let removed = reloader.poll().unwrap().unwrap();
        assert_eq!(removed.roots(), [pem::encode(&pem::parse(&new_root).unwrap())]);
        assert_eq!(removed.issuer_sha256(), sha256_hex(&new_root));
        assert!(reloader.poll().is_none());
    }

    /// Operator files that do not fit together are refused, each naming the file at fault.
    #[test]
    fn operator_files_must_fit_together() {
        let at = |name: &str| PathBuf::from(format!("ca/{name}"));
        let ttl = Duration::from_secs(60);
        let (a_cert, a_key) = Ca::generate_root("cluster.local").unwrap();
        let (b_cert, b_key) = Ca::generate_root("cluster.local").unwrap();
        let files =
            |pairs: &[(&str, &str)]| -> CaFiles { pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect() };
        let err = |f: CaFiles| Ca::from_files(&f, &at, ttl).unwrap_err().to_string();
        let e = err(files(&[("ca-cert.pem", &a_cert), ("ca-key.pem", &b_key)]));
        assert_eq!(e, "ca/ca-key.pem: is not the key of the certificate in ca-cert.pem");
        let e = err(files(&[("ca-cert.pem", &a_cert), ("ca-key.pem", &a_key), ("root-cert.pem", &b_cert)]));
        assert!(e.starts_with("ca/root-cert.pem: holds no root of the issuing certificate"), "{e}");
        let e = err(files(&[("ca-cert.pem", &a_cert)]));
        assert_eq!(e, "ca/ca-key.pem: missing (ca-cert.pem is there)");
        let e = err(files(&[("root-cert.pem", &a_cert)]));
        assert!(e.starts_with("ca/root-key.pem: missing"), "{e}");
        let both = format!("{b_cert}{a_cert}");
        let ok = Ca::from_files(
            &files(&[("ca-cert.pem", &a_cert), ("ca-key.pem", &a_key), ("root-cert.pem", &both)]),
            &at,
            ttl,
        )
        .unwrap();
        assert_eq!((ok.roots().len(), ok.issuer_sha256()), (2, sha256_hex(&a_cert).as_str()));
    }

    proptest::proptest! {
        /// CSR handling never panics: garbage, truncated and bit-flipped CSRs are refused with a
        /// CSR error, and anything accepted carries exactly the identity asked for.
        #[test]
        fn csr_handling_never_panics(
            cut in 0usize..400,
            flip in proptest::option::of((0usize..400, 1u8..=255)),
            garbage in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..64),
        ) {
            use std::sync::OnceLock;
            static CA: OnceLock<(tempfile::TempDir, Ca, Vec<u8>)> = OnceLock::new();
            let (_, ca, der) = CA.get_or_init(|| {
                let dir = tempfile::tempdir().unwrap();
                let ca = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(60)).unwrap();
                let der = pem::parse(csr()).unwrap().contents().to_vec();
                (dir, ca, der)
            });
            let mut bytes = der.clone();
            if let Some((at, x)) = flip {
                let at = at % bytes.len();
                bytes[at] ^= x;
            }
            bytes.truncate(bytes.len().saturating_sub(cut % 8 * (cut / 50)));
            bytes.extend_from_slice(&garbage);
            let text = pem::encode(&pem::Pem::new("CERTIFICATE REQUEST", bytes.clone()));
            let id = &id("spiffe://cluster.local/ns/a/sa/b");
            match ca.sign(&text, id) {
                Ok(signed) => {
                    proptest::prop_assert_eq!(uri_sans(&signed.chain_pem[0]), vec![id.to_string()]);
                }
                Err(e) => proptest::prop_assert!(matches!(e, CaError::Csr(_)), "{e}"),
            }
            let raw = String::from_utf8_lossy(&garbage).into_owned();
            proptest::prop_assert!(ca.sign(&raw, id).is_err());
        }
    }

    fn openssl(dir: &Path, args: &[&str]) {
        let out = std::process::Command::new("openssl").args(args).current_dir(dir).output().unwrap();
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }

    fn verify(dir: &Path, signed: &Signed, root: &str) {
        std::fs::write(dir.join("leaf.pem"), &signed.chain_pem[0]).unwrap();
        std::fs::write(dir.join("chain.pem"), signed.chain_pem[1..].concat()).unwrap();
        openssl(dir, &["verify", "-CAfile", root, "-untrusted", "chain.pem", "leaf.pem"]);
    }

    /// An operator's RSA root signing directly, made with the openssl CLI.
    #[test]
    fn uses_an_operator_rsa_root() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "ca-key.pem",
                "-out",
                "ca-cert.pem",
                "-days",
                "30",
                "-subj",
                "/O=op/CN=op rsa root",
            ],
        );
        let ca = Ca::load_or_create(d, "cluster.local", Duration::from_secs(60)).unwrap();
        let signed = ca.sign(&csr(), &id("spiffe://cluster.local/ns/a/sa/b")).unwrap();
        assert_eq!(signed.chain_pem.len(), 2, "leaf and root");
        verify(d, &signed, "ca-cert.pem");
        assert!(ca.roots_pem().contains("BEGIN CERTIFICATE"));
    }

    /// An ECDSA intermediate under an operator's RSA root, with cert-chain.pem and
    /// root-cert.pem; a SEC1 key gets a hint, its PKCS#8 form works.
    #[test]
    fn uses_an_operator_intermediate_chain() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::write(
            d.join("ext.cnf"),
            "[v3_ca]\nbasicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n",
        )
        .unwrap();
        openssl(
            d,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-keyout",
                "rk.pem",
                "-out",
                "root-cert.pem",
                "-days",
                "30",
                "-subj",
                "/O=op/CN=op root",
            ],
        );
        openssl(d, &["ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "ca-key.pem"]);
        openssl(d, &["req", "-new", "-key", "ca-key.pem", "-out", "ca.csr", "-subj", "/O=op/CN=op intermediate"]);
        openssl(
            d,
            &[
                "x509",
                "-req",
                "-in",
                "ca.csr",
                "-CA",
                "root-cert.pem",
                "-CAkey",
                "rk.pem",
                "-CAcreateserial",
                "-out",
                "ca-cert.pem",
                "-days",
                "30",
                "-extfile",
                "ext.cnf",
                "-extensions",
                "v3_ca",
            ],
        );
        std::fs::copy(d.join("root-cert.pem"), d.join("cert-chain.pem")).unwrap();
        let e = Ca::load_or_create(d, "cluster.local", Duration::from_secs(60)).unwrap_err();
        assert!(e.to_string().contains("openssl pkcs8 -topk8"), "{e}");
        openssl(d, &["pkcs8", "-topk8", "-nocrypt", "-in", "ca-key.pem", "-out", "k8.pem"]);
        std::fs::rename(d.join("k8.pem"), d.join("ca-key.pem")).unwrap();
        let ca = Ca::load_or_create(d, "cluster.local", Duration::from_secs(60)).unwrap();
        let signed = ca.sign(&csr(), &id("spiffe://cluster.local/ns/a/sa/b")).unwrap();
        assert_eq!(signed.chain_pem.len(), 3, "leaf, intermediate, root");
        verify(d, &signed, "root-cert.pem");
        assert_eq!(ca.roots_pem().replace("\r", ""), std::fs::read_to_string(d.join("root-cert.pem")).unwrap());
    }
}
