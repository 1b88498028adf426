//! TLS for s2s streams and the certificate checks behind SASL EXTERNAL
//! and the `certificate` policy.
//!
//! Both directions accept any certificate during the handshake (the
//! handshake signatures are still verified), then check the chain against
//! the trust anchors and the peer's domain (RFC 6125 DNS-ID, through
//! webpki) once the domain is known. Whether a stream may continue with a
//! certificate that failed the check is the domain's [`crate::Policy`]:
//! dialback over TLS with a self-signed certificate is the federation's
//! everyday case.

use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::ResolvesClientCert;
use rustls::crypto::CryptoProvider;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};

use crate::{Config, Host};

pub struct TlsSetup {
    provider: Arc<CryptoProvider>,
    /// Checks a chain for a domain; `None` without any trust anchor.
    checker: Option<Arc<rustls::client::WebPkiServerVerifier>>,
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
    host: Arc<dyn Host>,
}

impl TlsSetup {
    pub fn new(config: &Config, host: Arc<dyn Host>) -> TlsSetup {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut roots = rustls::RootCertStore::empty();
        if config.webpki_roots {
            roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
        }
        for ca in &config.extra_roots {
            if let Err(e) = roots.add(ca.clone()) {
                tracing::warn!(error = %e, "an s2s trust anchor is not usable; skipped");
            }
        }
        let checker = if roots.is_empty() {
            None
        } else {
            rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .ok()
        };
        let server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map(|b| {
                b.with_client_cert_verifier(Arc::new(AnyCert(provider.clone())))
                    .with_cert_resolver(Arc::new(ByName(host.clone())))
            });
        let server = match server {
            Ok(mut s) => {
                s.send_tls13_tickets = 0;
                s
            }
            Err(e) => unreachable!("the ring provider supports the default versions: {e}"),
        };
        TlsSetup {
            provider,
            checker,
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            host,
        }
    }

    /// A connector that presents our certificate for `local` (for the peer's
    /// SASL EXTERNAL) and takes any server certificate (checked later).
    pub fn connector(&self, local: &str) -> tokio_rustls::TlsConnector {
        let builder = rustls::ClientConfig::builder_with_provider(self.provider.clone())
            .with_safe_default_protocol_versions();
        let config = match builder {
            Ok(b) => b
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCert(self.provider.clone())))
                .with_client_cert_resolver(Arc::new(Ours(self.host.certificate(local)))),
            Err(e) => unreachable!("the ring provider supports the default versions: {e}"),
        };
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    /// Whether `chain` (leaf first) is valid now for `domain`.
    pub fn valid_for(&self, chain: &[CertificateDer<'_>], domain: &str) -> bool {
        let (Some(checker), Some((leaf, rest))) = (&self.checker, chain.split_first()) else {
            return false;
        };
        let Ok(name) = ServerName::try_from(domain.to_owned()) else {
            return false;
        };
        checker
            .verify_server_cert(leaf, rest, &name, &[], UnixTime::now())
            .is_ok()
    }
}

/// Our certificate by SNI; the first virtual host's for unknown names.
#[derive(Debug)]
struct ByName(Arc<dyn Host>);

impl std::fmt::Debug for dyn Host {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Host")
    }
}

impl ResolvesServerCert for ByName {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.0
            .certificate(&hello.server_name().unwrap_or_default().to_ascii_lowercase())
    }
}

#[derive(Debug)]
struct Ours(Option<Arc<CertifiedKey>>);

impl ResolvesClientCert for Ours {
    fn resolve(
        &self,
        _root_hint_subjects: &[&[u8]],
        _sigschemes: &[SignatureScheme],
    ) -> Option<Arc<CertifiedKey>> {
        self.0.clone()
    }

    fn has_certs(&self) -> bool {
        self.0.is_some()
    }
}

/// Accepts any certificate in the handshake, verifying its signatures.
#[derive(Debug)]
struct AnyCert(Arc<CryptoProvider>);

impl AnyCert {
    fn tls12(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn tls13(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

impl ServerCertVerifier for AnyCert {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}

impl ClientCertVerifier for AnyCert {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        false
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls12(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.tls13(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.schemes()
    }
}
