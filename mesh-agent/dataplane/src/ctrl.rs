//! The channel to mesh-ctrl (port 15012): TLS verified against the mesh root this node holds out
//! of band (`--ca-root`: a file in local mode, the `ferrymesh-ca-root-cert` ConfigMap mounted in
//! Kubernetes), never plaintext. The root file is read again for every connection, so a rotated
//! root applies without a restart. It also vets the trust bundles mesh-ctrl sends with
//! certificates: one that does not hold a pinned root is refused. The config client and the
//! identity manager both reach mesh-ctrl only through here.

use std::path::{Path, PathBuf};
use std::time::Duration;

use ferrymesh_api::exit::error_chain;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

/// How to give the agent the root, for messages.
const ROOT_HINT: &str = "give the mesh root with --ca-root FILE (local mode: root-cert.pem in mesh-ctrl's --ca-dir; \
Kubernetes: the ferrymesh-ca-root-cert ConfigMap in ferrymesh-system)";

/// Why mesh-ctrl cannot be reached, written for operators.
#[derive(Debug, thiserror::Error)]
pub enum CtrlError {
    /// `--ctrl` is plain HTTP.
    #[error("--ctrl {0}: mesh-ctrl is only reached over TLS; use https://<host>:15012 and {ROOT_HINT}")]
    Plaintext(String),
    /// `--ctrl` is not a URI.
    #[error("--ctrl {0}: {1}")]
    Address(String, String),
    /// No `--ca-root`.
    #[error("no --ca-root: the agent verifies mesh-ctrl before sending it anything; {ROOT_HINT}")]
    NoRoot,
    /// The root file is unreadable or holds no certificate.
    #[error("--ca-root {0}: {1}")]
    Root(PathBuf, String),
    /// The TLS connection failed (an impostor or a wrong root among the reasons).
    #[error("cannot reach mesh-ctrl at {address}: {message}{hint}")]
    Connect {
        /// `--ctrl`.
        address: String,
        /// The error chain.
        message: String,
        /// What to check, when the cause says.
        hint: &'static str,
    },
    /// A trust bundle from mesh-ctrl without any pinned root.
    #[error("mesh-ctrl sent a trust bundle that holds none of the roots in --ca-root {0}: refused")]
    Bundle(PathBuf),
}

/// mesh-ctrl's address and the root it must prove itself against.
#[derive(Debug, Clone)]
pub struct Ctrl {
    address: String,
    root: PathBuf,
}

impl Ctrl {
    /// `address` (`https://host:15012`) verified against the root(s) in the PEM file `root`.
    /// Plain `http://`, or no root, is refused here: there is no fallback.
    pub fn new(address: &str, root: Option<&Path>) -> Result<Self, CtrlError> {
        let uri: http::Uri = address.parse().map_err(|e| CtrlError::Address(address.into(), format!("{e}")))?;
        match uri.scheme_str() {
            Some("https") => {}
            Some("http") => return Err(CtrlError::Plaintext(address.into())),
            _ => return Err(CtrlError::Address(address.into(), "expected https://<host>:15012".into())),
        }
        let root = root.ok_or(CtrlError::NoRoot)?.to_path_buf();
        Ok(Self { address: address.to_string(), root })
    }

    /// `--ctrl`, for logs.
    pub fn address(&self) -> &str {
        &self.address
    }

    /// The pinned roots, read now from the root file.
    pub fn pinned_roots(&self) -> Result<Vec<CertificateDer<'static>>, CtrlError> {
        self.read_roots().map(|(_, roots)| roots)
    }

    /// The root file as read now: its text, and the certificates in it (at least one).
    fn read_roots(&self) -> Result<(Vec<u8>, Vec<CertificateDer<'static>>), CtrlError> {
        let text = std::fs::read(&self.root).map_err(|e| CtrlError::Root(self.root.clone(), e.to_string()))?;
        let roots = CertificateDer::pem_slice_iter(&text)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| CtrlError::Root(self.root.clone(), e.to_string()))?;
        if roots.is_empty() {
            return Err(CtrlError::Root(self.root.clone(), "no CERTIFICATE in it".into()));
        }
        Ok((text, roots))
    }

    /// A verified TLS channel to mesh-ctrl.
    pub async fn connect(&self, request_timeout: Option<Duration>) -> Result<Channel, CtrlError> {
        let (pem, _) = self.read_roots()?;
        let tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(pem));
        let mut endpoint = Endpoint::from_shared(self.address.clone())
            .map_err(|e| CtrlError::Address(self.address.clone(), e.to_string()))?
            .tls_config(tls)
            .map_err(|e| CtrlError::Address(self.address.clone(), error_chain(&e)))?
            .connect_timeout(Duration::from_secs(2))
            .http2_keep_alive_interval(Duration::from_secs(5))
            .keep_alive_timeout(Duration::from_secs(5));
        if let Some(timeout) = request_timeout {
            endpoint = endpoint.timeout(timeout);
        }
        endpoint.connect().await.map_err(|e| {
            let message = error_chain(&e);
            let hint = if message.contains("UnknownIssuer") || message.contains("invalid peer certificate") {
                " (its certificate does not chain to --ca-root: is that file this mesh's root, and is this the real mesh-ctrl?)"
            } else if message.contains("NotValidForName") {
                " (its certificate does not name the host in --ctrl: add it with mesh-ctrl --tls-san)"
            } else {
                " (is it running, and is port 15012 reachable from this node?)"
            };
            CtrlError::Connect { address: self.address.clone(), message, hint }
        })
    }

    /// Accepts a trust bundle from mesh-ctrl only when it holds one of the pinned roots.
    pub fn check_bundle(&self, bundle: &[CertificateDer<'_>]) -> Result<(), CtrlError> {
        let pinned = self.pinned_roots()?;
        if bundle.iter().any(|root| pinned.iter().any(|p| p.as_ref() == root.as_ref())) {
            Ok(())
        } else {
            Err(CtrlError::Bundle(self.root.clone()))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plaintext_and_missing_roots_are_refused_with_the_fix() {
        let root = Path::new("/etc/ferrymesh/root-cert.pem");
        let plain = Ctrl::new("http://10.0.0.1:15012", Some(root)).unwrap_err().to_string();
        assert!(plain.contains("only reached over TLS") && plain.contains("--ca-root FILE"), "{plain}");
        let no_root = Ctrl::new("https://10.0.0.1:15012", None).unwrap_err().to_string();
        assert!(no_root.starts_with("no --ca-root") && no_root.contains("ferrymesh-ca-root-cert"), "{no_root}");
        assert!(matches!(Ctrl::new("10.0.0.1:15012", Some(root)), Err(CtrlError::Address(..))));
        assert!(Ctrl::new("https://ferrymesh-ctrl.ferrymesh-system.svc:15012", Some(root)).is_ok());
    }

    #[test]
    fn a_bundle_must_hold_a_pinned_root() {
        let dir = std::env::temp_dir().join(format!("ferrymesh-ctrl-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let root = |name: &str| {
            let key = rcgen::KeyPair::generate().unwrap();
            let mut params = rcgen::CertificateParams::new(vec![name.to_string()]).unwrap();
            params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
            params.self_signed(&key).unwrap()
        };
        let (pinned, other) = (root("pinned"), root("other"));
        let file = dir.join("root.pem");
        std::fs::write(&file, pinned.pem()).unwrap();
        let ctrl = Ctrl::new("https://ctrl:15012", Some(&file)).unwrap();
        let (p, o) = (pinned.der().clone(), other.der().clone());
        assert!(ctrl.check_bundle(&[o.clone(), p.clone()]).is_ok(), "an overlap bundle holding the pinned root");
        assert!(matches!(ctrl.check_bundle(std::slice::from_ref(&o)), Err(CtrlError::Bundle(_))), "a foreign bundle");
        assert!(matches!(ctrl.check_bundle(&[]), Err(CtrlError::Bundle(_))));
        std::fs::write(&file, "not a PEM").unwrap();
        assert!(matches!(ctrl.check_bundle(&[p]), Err(CtrlError::Root(..))));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A mesh root and TLS servers signed by it on loopback, for unit tests of mesh-ctrl's clients.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::SocketAddr;
    use std::path::PathBuf;
    use std::sync::Arc;

    use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair, SanType};
    use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};

    use super::Ctrl;

    /// A root (written to a file, as `--ca-root` takes it) that signs servers for 127.0.0.1.
    pub(crate) struct Pki {
        issuer: Issuer<'static, KeyPair>,
        dir: PathBuf,
    }

    impl Pki {
        pub(crate) fn new() -> Self {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            let root = params.self_signed(&key).unwrap();
            let dir =
                std::env::temp_dir().join(format!("ferrymesh-pki-{}-{}", std::process::id(), rand::random::<u64>()));
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("root.pem"), root.pem()).unwrap();
            Self { issuer: Issuer::new(params, key), dir }
        }

        /// The root, PEM.
        pub(crate) fn root_pem(&self) -> String {
            std::fs::read_to_string(self.dir.join("root.pem")).unwrap()
        }

        /// A client of `address` pinning this root.
        pub(crate) fn ctrl(&self, address: &str) -> Ctrl {
            Ctrl::new(address, Some(&self.dir.join("root.pem"))).unwrap()
        }

        /// Serves `router` over TLS 1.3 on a loopback port with a certificate for 127.0.0.1.
        pub(crate) async fn serve(&self, router: tonic::transport::server::Router) -> SocketAddr {
            let key = KeyPair::generate().unwrap();
            let mut params = CertificateParams::default();
            params.subject_alt_names = vec![SanType::IpAddress([127, 0, 0, 1].into())];
            let leaf = params.signed_by(&key, &self.issuer).unwrap();
            let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
            let mut config =
                rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                    .with_protocol_versions(&[&rustls::version::TLS13])
                    .unwrap()
                    .with_no_client_auth()
                    .with_single_cert(vec![leaf.der().clone()], key)
                    .unwrap();
            config.alpn_protocols = vec![b"h2".to_vec()];
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let (tx, rx) = tokio::sync::mpsc::channel(8);
            tokio::spawn(async move {
                while let Ok((tcp, _)) = listener.accept().await {
                    let (acceptor, tx) = (acceptor.clone(), tx.clone());
                    tokio::spawn(async move {
                        if let Ok(tls) = acceptor.accept(tcp).await {
                            let _ = tx.send(Ok::<_, std::io::Error>(tls)).await;
                        }
                    });
                }
            });
            tokio::spawn(router.serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx)));
            addr
        }
    }

    impl Drop for Pki {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
