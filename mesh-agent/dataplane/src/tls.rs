//! TLS for HBONE: TLS 1.3 only, AES-GCM suites, ALPN `h2`, no SNI, no resumption; the
//! server requires a client certificate chained to the mesh roots within the trust domain;
//! the client requires the server's SPIFFE ID to be exactly the expected one. It owns the
//! rustls configuration and certificate inspection; it never opens sockets.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::{verify_server_cert_signed_by_trust_anchor, Resumption};
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ParsedCertificate, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, DistinguishedName, Error, RootCertStore, ServerConfig,
    SignatureScheme,
};
use x509_parser::prelude::{FromDer, GeneralName, ParsedExtension, X509Certificate};

use ferrymesh_spiffe::SpiffeId;

use crate::identity::{Identity, IdentityManager, WorkloadCert};
use crate::trust::{TrustBundle, TrustReceiver};

/// ALPN of HBONE.
pub const ALPN_H2: &[u8] = b"h2";

/// The ring provider restricted to the TLS 1.3 AES-GCM suites.
pub fn provider() -> Arc<CryptoProvider> {
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites.retain(|s| {
        matches!(
            s.suite(),
            rustls::CipherSuite::TLS13_AES_128_GCM_SHA256 | rustls::CipherSuite::TLS13_AES_256_GCM_SHA384
        )
    });
    Arc::new(provider)
}

fn parse(der: &[u8]) -> Result<X509Certificate<'_>, String> {
    X509Certificate::from_der(der).map(|(_, c)| c).map_err(|e| format!("unparsable certificate: {e}"))
}

/// The SPIFFE ID in a certificate's URI SAN.
pub fn spiffe_id_of(der: &[u8]) -> Result<SpiffeId, String> {
    let cert = parse(der)?;
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    if uri.starts_with(ferrymesh_spiffe::SCHEME) {
                        return uri.parse().map_err(|e| format!("the certificate's URI SAN: {e}"));
                    }
                }
            }
        }
    }
    Err(format!("the certificate has no {} URI SAN", ferrymesh_spiffe::SCHEME))
}

/// Serial (hex) and expiry of a certificate.
pub fn serial_and_expiry(der: &[u8]) -> Result<(String, SystemTime), String> {
    let cert = parse(der)?;
    let secs = cert.validity().not_after.timestamp().max(0) as u64;
    Ok((cert.raw_serial_as_string().replace(':', ""), SystemTime::UNIX_EPOCH + Duration::from_secs(secs)))
}

fn bad_identity(message: String) -> Error {
    Error::InvalidCertificate(CertificateError::Other(rustls::OtherError(Arc::new(IdentityMismatch(message)))))
}

/// A peer identity the verifier refused.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct IdentityMismatch(pub String);

/// Client-certificate verifier of the HBONE server: chain to the mesh roots held at the moment
/// of the handshake (webpki), then the SPIFFE ID must be in our trust domain.
#[derive(Debug)]
struct SpiffeClientVerifier {
    trust: TrustReceiver,
    trust_domain: String,
    provider: Arc<CryptoProvider>,
}

impl SpiffeClientVerifier {
    fn current(&self) -> Result<Arc<TrustBundle>, Error> {
        self.trust.borrow().clone().ok_or_else(|| Error::General("no trust bundle from mesh-ctrl yet".into()))
    }
}

impl ClientCertVerifier for SpiffeClientVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, Error> {
        self.current()?.client_verifier.verify_client_cert(end_entity, intermediates, now)?;
        let id = spiffe_id_of(end_entity).map_err(bad_identity)?;
        if id.trust_domain() != self.trust_domain {
            return Err(bad_identity(format!("client identity {id} is outside trust domain {}", self.trust_domain)));
        }
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Server-certificate verifier of the HBONE client: chain to the mesh roots, and the SPIFFE ID
/// must equal the destination's expected identity. Server names are not used (no SNI).
#[derive(Debug)]
struct SpiffeServerVerifier {
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for SpiffeServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let cert = ParsedCertificate::try_from(end_entity)?;
        let algs = self.provider.signature_verification_algorithms.all;
        verify_server_cert_signed_by_trust_anchor(&cert, &self.roots, intermediates, now, algs)?;
        let id = spiffe_id_of(end_entity).map_err(bad_identity)?;
        if id != self.expected {
            return Err(bad_identity(format!("server identity {id}, expected {}", self.expected)));
        }
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The webpki client-certificate verifier for `roots` (one per trust bundle).
pub fn client_verifier(roots: Arc<RootCertStore>) -> Result<Arc<dyn ClientCertVerifier>, Error> {
    WebPkiClientVerifier::builder_with_provider(roots, provider())
        .build()
        .map_err(|e| Error::General(format!("client verifier: {e}")))
}

/// The certificate a 15008 listener presents: the current one of its identity, looked up at
/// each handshake so renewals apply to new connections.
#[derive(Debug)]
pub struct CurrentCert {
    /// Where certificates live.
    pub identities: Arc<IdentityManager>,
    /// The identity the listener serves as (a pod's, or a waypoint's).
    pub identity: Identity,
}

impl ResolvesServerCert for CurrentCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.identities.current(&self.identity).map(|c| c.key.clone())
    }
}

/// Server config for a 15008 listener (a pod's, or a waypoint's): its certificate comes from
/// `resolver` at each handshake (so renewals apply to new connections), clients must chain to
/// the bundle `trust` holds at that handshake (so a root rotation applies to new connections).
///
/// No session is ever resumed: neither a session cache nor TLS 1.3 tickets. A resumed handshake
/// restores the client's certificate from the saved session without verifying it again, so a
/// client identity would outlive its certificate's expiry and its root's removal.
pub fn server_config(
    resolver: Arc<dyn ResolvesServerCert>,
    trust: TrustReceiver,
    trust_domain: &str,
) -> Result<ServerConfig, Error> {
    let provider = provider();
    let verifier =
        Arc::new(SpiffeClientVerifier { trust, trust_domain: trust_domain.to_string(), provider: provider.clone() });
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.session_storage = Arc::new(rustls::server::NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(config)
}

/// Client config presenting `cert` and accepting only a server chained to `roots` and proving
/// `expected`.
pub fn client_config(
    cert: &WorkloadCert,
    roots: Arc<RootCertStore>,
    expected: SpiffeId,
) -> Result<ClientConfig, Error> {
    let provider = provider();
    let verifier = Arc::new(SpiffeServerVerifier { roots, expected, provider: provider.clone() });
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .dangerous()
        .with_custom_certificate_verifier(verifier)
        .with_client_cert_resolver(Arc::new(rustls::sign::SingleCertAndKey::from(cert.key.clone())));
    config.alpn_protocols = vec![ALPN_H2.to_vec()];
    config.enable_sni = false;
    config.resumption = Resumption::disabled();
    Ok(config)
}

/// Renders a TLS handshake error for a flow reason, naming the refused identity when that is
/// what failed.
pub fn describe(e: &std::io::Error) -> String {
    let mut text = e.to_string();
    if let Some(Error::InvalidCertificate(CertificateError::Other(other))) =
        e.get_ref().and_then(|i| i.downcast_ref::<Error>())
    {
        text = format!("peer certificate refused: {}", other.0);
    }
    text
}
