//! The mesh CA: a root (or operator-provided intermediate) that signs workload certificates
//! from CSRs. It owns key files in `--ca-dir` and X.509 issuance (rcgen); it never decides who
//! may get which identity (that is [`crate::certs`]).
//!
//! Files in the CA directory, Istio's plug-in CA names where the operator provides them:
//! - operator-provided: `ca-cert.pem` + `ca-key.pem` (RSA or ECDSA), optional `cert-chain.pem`
//!   (the chain above `ca-cert.pem`) and `root-cert.pem` (the trust bundle);
//! - generated on first start when none are there: `root-cert.pem` + `root-key.pem` (0600).

use std::fs::OpenOptions;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateSigningRequestParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose, SanType, SerialNumber, PKCS_ECDSA_P256_SHA256,
};

/// Lifetime of a generated root.
const ROOT_TTL: Duration = Duration::from_secs(10 * 365 * 24 * 3600);
/// Backdating of leaves, for clocks a little behind ours.
const CLOCK_SKEW: Duration = Duration::from_secs(5 * 60);

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
    /// A CA file holds no usable certificate or key.
    #[error("CA file {path}: {message}")]
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
    /// The trust bundle agents verify peers against (PEM).
    roots_pem: String,
    ttl: Duration,
}

impl std::fmt::Debug for Ca {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ca").field("chain", &self.chain_pem.len()).field("ttl", &self.ttl).finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<String, CaError> {
    std::fs::read_to_string(path).map_err(|source| CaError::File { path: path.to_path_buf(), source })
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

/// A PKCS#8 PEM key (RSA or ECDSA); older PEM forms get a hint that converts them.
fn load_key(path: &Path) -> Result<KeyPair, CaError> {
    parse_key(path, &read(path)?)
}

/// [`load_key`] of text already read (`path` names where it came from, for errors).
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

fn write_file(path: &Path, contents: &str, mode: u32) -> Result<(), CaError> {
    let file = OpenOptions::new().write(true).create_new(true).mode(mode).open(path);
    file.and_then(|mut f| f.write_all(contents.as_bytes()))
        .map_err(|source| CaError::File { path: path.to_path_buf(), source })
}

impl Ca {
    /// Loads the operator's CA or the generated root from `dir`, generating a root there on
    /// first start. Leaves live `ttl`.
    pub fn load_or_create(dir: &Path, trust_domain: &str, ttl: Duration) -> Result<Self, CaError> {
        std::fs::create_dir_all(dir).map_err(|source| CaError::File { path: dir.to_path_buf(), source })?;
        let (cert_path, key_path) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
        if cert_path.exists() || key_path.exists() {
            return Self::from_operator_files(dir, ttl);
        }
        let (root_path, root_key_path) = (dir.join("root-cert.pem"), dir.join("root-key.pem"));
        if !root_path.exists() && !root_key_path.exists() {
            let (cert_pem, key_pem) = Self::generate_root(trust_domain)?;
            // Key first and create_new: a crash never leaves a certificate without its key,
            // and an existing key is never overwritten.
            write_file(&root_key_path, &key_pem, 0o600)?;
            write_file(&root_path, &cert_pem, 0o644)?;
            tracing::info!(dir = %dir.display(), "generated a new mesh root CA");
        }
        Self::from_root_pem(&root_path, &read(&root_path)?, &root_key_path, &read(&root_key_path)?, ttl)
    }

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
        let now = SystemTime::now();
        params.not_before = now.into();
        params.not_after = (now + ROOT_TTL).into();
        let cert = params.self_signed(&key)?;
        Ok((cert.pem(), key.serialize_pem()))
    }

    /// A CA signing with the root `cert_pem` and its key `key_pem` (`cert_origin` and
    /// `key_origin` name where they came from, in errors). The root is the trust bundle.
    pub fn from_root_pem(
        cert_origin: &Path,
        cert_pem: &str,
        key_origin: &Path,
        key_pem: &str,
        ttl: Duration,
    ) -> Result<Self, CaError> {
        let key = parse_key(key_origin, key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(cert_pem, key).map_err(|e| invalid(cert_origin, e))?;
        let chain_pem = split_certs(cert_origin, cert_pem)?;
        Ok(Self { issuer, roots_pem: chain_pem.concat(), chain_pem, ttl })
    }

    fn from_operator_files(dir: &Path, ttl: Duration) -> Result<Self, CaError> {
        let (cert_path, key_path) = (dir.join("ca-cert.pem"), dir.join("ca-key.pem"));
        let cert_pem = read(&cert_path)?;
        let key = load_key(&key_path)?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key).map_err(|e| invalid(&cert_path, e))?;
        let mut chain_pem = split_certs(&cert_path, &cert_pem)?;
        let chain_path = dir.join("cert-chain.pem");
        if chain_path.exists() {
            for cert in split_certs(&chain_path, &read(&chain_path)?)? {
                if !chain_pem.contains(&cert) {
                    chain_pem.push(cert);
                }
            }
        }
        let root_path = dir.join("root-cert.pem");
        let roots_pem = if root_path.exists() {
            split_certs(&root_path, &read(&root_path)?)?.concat()
        } else {
            chain_pem.last().cloned().unwrap_or_default()
        };
        Ok(Self { issuer, chain_pem, roots_pem, ttl })
    }

    /// The trust bundle (PEM).
    pub fn roots_pem(&self) -> &str {
        &self.roots_pem
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
    pub fn sign(&self, csr_pem: &str, spiffe_id: &str) -> Result<Signed, CaError> {
        let mut csr = CertificateSigningRequestParams::from_pem(csr_pem).map_err(|e| CaError::Csr(e.to_string()))?;
        if *csr.public_key.algorithm() != PKCS_ECDSA_P256_SHA256 {
            return Err(CaError::Csr("the key must be ECDSA P-256".into()));
        }
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into()?)];
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

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;
    use std::path::Path;

    use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

    use super::*;

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
        let signed = ca.sign(&csr(), "spiffe://cluster.local/ns/shop/sa/web").unwrap();
        assert_eq!(signed.chain_pem.len(), 2);
        assert_eq!(uri_sans(&signed.chain_pem[0]), vec!["spiffe://cluster.local/ns/shop/sa/web"]);
        let ttl = signed.not_after.duration_since(SystemTime::now()).unwrap();
        assert!(ttl <= Duration::from_secs(60) && ttl > Duration::from_secs(55), "{ttl:?}");
    }

    #[test]
    fn bad_csrs_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::load_or_create(dir.path(), "cluster.local", Duration::from_secs(60)).unwrap();
        let id = "spiffe://cluster.local/ns/a/sa/b";
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
            let id = "spiffe://cluster.local/ns/a/sa/b";
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
        let signed = ca.sign(&csr(), "spiffe://cluster.local/ns/a/sa/b").unwrap();
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
        let signed = ca.sign(&csr(), "spiffe://cluster.local/ns/a/sa/b").unwrap();
        assert_eq!(signed.chain_pem.len(), 3, "leaf, intermediate, root");
        verify(d, &signed, "root-cert.pem");
        assert_eq!(ca.roots_pem().replace("\r", ""), std::fs::read_to_string(d.join("root-cert.pem")).unwrap());
    }
}
