//! TLS for the client listeners: one certificate per virtual host, chosen
//! by SNI, and the channel-binding data SCRAM-*-PLUS needs.
//!
//! A virtual host without a configured certificate gets a self-signed one,
//! generated on first start and kept in `<data_dir>/certs/` so it stays the
//! same across restarts (clients pin it after the first connection).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use sha2::{Digest, Sha256};
use xmpp::sasl::ChannelBindings;

use crate::config::Config;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {reason}; check the path and that it is PEM")]
    Pem { path: PathBuf, reason: String },
    #[error("{path} holds no certificate; it must hold a PEM `CERTIFICATE` block")]
    NoCertificate { path: PathBuf },
    #[error("the key in {path} is not usable by rustls: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("cannot generate a self-signed certificate for {vhost}: {reason}")]
    Generate { vhost: String, reason: String },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// A host's certificate with the hash tls-server-end-point binds to.
struct HostCert {
    key: Arc<CertifiedKey>,
    /// RFC 5929 §4.1: hash of the leaf certificate (SHA-256 for the
    /// SHA-1/SHA-256/ECDSA signatures we serve).
    end_point: Vec<u8>,
}

/// Picks the certificate by SNI; the first virtual host is the fallback for
/// clients that send no SNI or an unknown name.
#[derive(Debug)]
struct SniResolver {
    hosts: HashMap<String, Arc<CertifiedKey>>,
    fallback: Arc<CertifiedKey>,
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let by_name = hello
            .server_name()
            .and_then(|n| self.hosts.get(&n.to_ascii_lowercase()));
        Some(by_name.unwrap_or(&self.fallback).clone())
    }
}

/// The TLS side of the node: the rustls configuration and per-host data.
pub struct Tls {
    pub acceptor: tokio_rustls::TlsAcceptor,
    hosts: HashMap<String, HostCert>,
    fallback: String,
}

impl Tls {
    pub fn load(config: &Config) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut hosts = HashMap::new();
        for vhost in &config.vhosts {
            let (certs, key) = match (&vhost.tls_cert, &vhost.tls_key) {
                (Some(c), Some(k)) => (read_certs(c)?, read_key(k)?),
                _ => self_signed(&config.data_dir, &vhost.name)?,
            };
            let end_point = Sha256::digest(certs[0].as_ref()).to_vec();
            let signing =
                provider
                    .key_provider
                    .load_private_key(key)
                    .map_err(|e| TlsError::Key {
                        path: vhost.tls_key.clone().unwrap_or_default(),
                        reason: e.to_string(),
                    })?;
            let key = Arc::new(CertifiedKey::new(certs, signing));
            hosts.insert(vhost.name.clone(), HostCert { key, end_point });
        }
        let fallback = config.vhosts[0].name.clone();
        let resolver = SniResolver {
            hosts: hosts
                .iter()
                .map(|(n, h)| (n.clone(), h.key.clone()))
                .collect(),
            fallback: hosts[&fallback].key.clone(),
        };
        let mut server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(Arc::new(resolver));
        // No ticket/session state per connection beyond what rustls needs:
        // idle connections should stay small.
        server.send_tls13_tickets = 0;
        Ok(Tls {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            hosts,
            fallback,
        })
    }

    /// Channel-binding data of an established server connection.
    pub fn channel_bindings(&self, conn: &rustls::ServerConnection) -> ChannelBindings {
        // RFC 9266: tls-exporter is defined for TLS 1.3 only.
        let tls_exporter = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => conn
                .export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", Some(b""))
                .ok()
                .map(|k| k.to_vec()),
            _ => None,
        };
        let host = conn
            .server_name()
            .map(str::to_ascii_lowercase)
            .filter(|n| self.hosts.contains_key(n))
            .unwrap_or_else(|| self.fallback.clone());
        ChannelBindings {
            tls_exporter,
            tls_server_end_point: self.hosts.get(&host).map(|h| h.end_point.clone()),
        }
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Pem {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(certs)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path).map_err(|e| TlsError::Pem {
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

/// Loads `<data_dir>/certs/<vhost>.{crt,key}`, creating them on first start.
fn self_signed(
    data_dir: &Path,
    vhost: &str,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), TlsError> {
    let dir = data_dir.join("certs");
    let cert_path = dir.join(format!("{vhost}.crt"));
    let key_path = dir.join(format!("{vhost}.key"));
    if cert_path.exists() && key_path.exists() {
        return Ok((read_certs(&cert_path)?, read_key(&key_path)?));
    }
    let generated = rcgen::generate_simple_self_signed(vec![vhost.to_owned()]).map_err(|e| {
        TlsError::Generate {
            vhost: vhost.to_owned(),
            reason: e.to_string(),
        }
    })?;
    let write = |path: &Path, text: String| {
        std::fs::create_dir_all(&dir)
            .and_then(|()| std::fs::write(path, text))
            .map_err(|source| TlsError::Write {
                path: path.to_owned(),
                source,
            })
    };
    write(&cert_path, generated.cert.pem())?;
    write(&key_path, generated.signing_key.serialize_pem())?;
    tracing::info!(vhost, cert = %cert_path.display(), "generated a self-signed certificate");
    Ok((read_certs(&cert_path)?, read_key(&key_path)?))
}
