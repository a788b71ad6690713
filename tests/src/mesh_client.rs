//! An HBONE client holding a mesh certificate the test issued itself: what an attacker who
//! holds (or once held) a workload key can do against a pod's 15008, with real rustls and h2.
//! It checks nothing of the server's certificate (the mTLS tests do); the server still verifies
//! the client's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use rcgen::{CertificateParams, ExtendedKeyUsagePurpose, Issuer, KeyPair, SanType, PKCS_ECDSA_P256_SHA256};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// Accepts any server certificate (see the module documentation).
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// A self-signed CA: its PEM certificate and key.
pub fn generate_root(name: &str) -> (String, String) {
    let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = CertificateParams::default();
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    (params.self_signed(&key).expect("self-signed root").pem(), key.serialize_pem())
}

/// A workload certificate for `spiffe_id`, signed by the CA of `ca_cert_pem` and `ca_key_pem`.
pub struct MeshCert {
    chain: Vec<CertificateDer<'static>>,
    key: Vec<u8>,
}

impl MeshCert {
    /// Issues the certificate.
    pub fn issue(ca_cert_pem: &str, ca_key_pem: &str, spiffe_id: &str) -> Self {
        let ca_key = KeyPair::from_pem(ca_key_pem).expect("CA key");
        let ca = Issuer::from_ca_cert_pem(ca_cert_pem, ca_key).expect("CA certificate");
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).expect("key");
        let mut params = CertificateParams::default();
        params.subject_alt_names = vec![SanType::URI(spiffe_id.try_into().expect("SPIFFE ID"))];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth, ExtendedKeyUsagePurpose::ServerAuth];
        let now = SystemTime::now();
        params.not_before = (now - Duration::from_secs(60)).into();
        params.not_after = (now + Duration::from_secs(3600)).into();
        let cert = params.signed_by(&key, &ca).expect("sign");
        Self { chain: vec![cert.der().clone()], key: key.serialize_der() }
    }

    /// A TLS 1.3 client config offering ALPN h2 and presenting this certificate. With
    /// `resumption`, it keeps the server's session tickets and offers them again (rustls's
    /// default in-memory cache), as an attacker replaying a saved session would.
    pub fn client_config(&self, resumption: bool) -> Arc<rustls::ClientConfig> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
            .with_client_auth_cert(self.chain.clone(), PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone())))
            .expect("client certificate");
        config.alpn_protocols = vec![b"h2".to_vec()];
        if !resumption {
            config.resumption = rustls::client::Resumption::disabled();
        }
        Arc::new(config)
    }
}

/// Connects to `to` (a pod's 15008) from the current netns and completes the TLS handshake.
pub async fn connect(config: Arc<rustls::ClientConfig>, to: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(to).await?;
    let name = ServerName::IpAddress(to.ip().into());
    tokio::time::timeout(Duration::from_secs(5), tokio_rustls::TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "TLS handshake timed out"))?
}

/// Opens a CONNECT stream to `authority` on `tls`, writes `payload` and reads what comes back
/// until the server ends the stream (5 s at most): the CONNECT's status and the bytes read.
/// An error names the step that failed (a server that refused the client's certificate after
/// the handshake fails the HTTP/2 exchange).
pub async fn connect_and_send(
    tls: TlsStream<TcpStream>,
    authority: &str,
    payload: &[u8],
) -> Result<(StatusCode, Vec<u8>), String> {
    let exchange = async {
        let (mut sender, connection) = h2::client::handshake(tls).await.map_err(|e| format!("h2 handshake: {e}"))?;
        tokio::spawn(connection);
        let request = Request::builder().method(Method::CONNECT).uri(authority).body(()).expect("request");
        let (response, mut send) = sender.send_request(request, false).map_err(|e| format!("CONNECT: {e}"))?;
        let response = response.await.map_err(|e| format!("CONNECT answer: {e}"))?;
        let status = response.status();
        if status != StatusCode::OK {
            return Ok((status, Vec::new()));
        }
        send.send_data(Bytes::copy_from_slice(payload), true).map_err(|e| format!("send: {e}"))?;
        let mut body = response.into_body();
        let mut read = Vec::new();
        while let Some(chunk) = body.data().await {
            let chunk = chunk.map_err(|e| format!("read: {e}"))?;
            let _ = body.flow_control().release_capacity(chunk.len());
            read.extend_from_slice(&chunk);
        }
        Ok((status, read))
    };
    tokio::time::timeout(Duration::from_secs(5), exchange).await.map_err(|_| "no answer within 5s".to_string())?
}
