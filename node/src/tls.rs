//! TLS for the client listeners: one certificate per virtual host, chosen
//! by SNI, and the channel-binding data SCRAM-*-PLUS needs.
//!
//! A virtual host without a configured certificate gets a self-signed one,
//! generated on first start and kept in `<data_dir>/certs/` so it stays the
//! same across restarts (clients pin it after the first connection).
//!
//! Client connections run over rustls's unbuffered API
//! ([`crate::c2s::tls_io`]), which tells neither the host chosen by SNI nor
//! the exporter. Both are seen while the handshake is processed, which is
//! synchronous on the connection's thread: the certificate resolver and a
//! key log note them in a [`Handshake`] set for that call
//! ([`Handshake::observe`]), and [`Tls::bindings`] derives the
//! channel-binding data from them.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::tls13::OkmBlock;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::{KeyLog, SupportedCipherSuite, Tls13CipherSuite};
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
    #[error("the key {key} does not belong to the certificate {cert}: give the key the certificate was issued for (or remove both to get a self-signed pair)")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
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
        let name = hello.server_name().map(str::to_ascii_lowercase);
        let by_name = name.as_ref().and_then(|n| self.hosts.get(n));
        if by_name.is_some() {
            Handshake::note(|h| h.host = name.clone());
        }
        Some(by_name.unwrap_or(&self.fallback).clone())
    }
}

/// What a client connection's handshake showed that the unbuffered API
/// does not tell: the virtual host picked by SNI and the TLS 1.3 exporter
/// master secret.
#[derive(Default)]
pub struct Handshake {
    /// The virtual host whose certificate was sent; `None` is the fallback.
    host: Option<String>,
    /// RFC 8446 §7.1 `exporter_master_secret`, kept until the exporter
    /// value is derived from it at the end of the handshake.
    exporter_secret: Option<OkmBlock>,
}

thread_local! {
    /// The handshake being processed on this thread, during
    /// [`Handshake::observe`] only.
    static OBSERVED: RefCell<Option<Handshake>> = const { RefCell::new(None) };
}

impl Handshake {
    /// Runs `f` (which processes this connection's handshake records) with
    /// `self` as the place the resolver and the key log note what they see.
    pub fn observe<R>(&mut self, f: impl FnOnce() -> R) -> R {
        /// Puts back what was observed before, also when `f` panics (and
        /// drops, so wipes, this handshake's secret with it).
        struct Restore(Option<Handshake>);
        impl Drop for Restore {
            fn drop(&mut self) {
                let before = self.0.take();
                let _ = OBSERVED.try_with(|o| *o.borrow_mut() = before);
            }
        }
        let before = OBSERVED.with(|o| o.borrow_mut().replace(std::mem::take(self)));
        let restore = Restore(before);
        let r = f();
        if let Some(h) = OBSERVED.with(|o| o.borrow_mut().take()) {
            *self = h;
        }
        drop(restore);
        r
    }

    /// Notes into the handshake being observed; outside [`Self::observe`]
    /// nothing is noted.
    fn note(f: impl FnOnce(&mut Handshake)) {
        OBSERVED.with(|o| {
            if let Some(h) = o.borrow_mut().as_mut() {
                f(h)
            }
        })
    }
}

/// Hands rustls's exporter master secret to the observed handshake; no
/// other secret is asked for, and nothing is written anywhere.
#[derive(Debug)]
struct ExporterSecret;

const EXPORTER_SECRET: &str = "EXPORTER_SECRET";

impl KeyLog for ExporterSecret {
    fn log(&self, label: &str, _client_random: &[u8], secret: &[u8]) {
        if label == EXPORTER_SECRET && secret.len() <= OkmBlock::MAX_LEN {
            Handshake::note(|h| h.exporter_secret = Some(OkmBlock::new(secret)));
        }
    }

    fn will_log(&self, label: &str) -> bool {
        label == EXPORTER_SECRET
    }
}

/// RFC 8446 §7.5 `TLS-Exporter(label, context, out.len())` from the
/// connection's exporter master secret, with the suite's hash and HKDF.
fn tls13_export(
    suite: &Tls13CipherSuite,
    exporter_secret: &OkmBlock,
    label: &[u8],
    context: &[u8],
    out: &mut [u8],
) -> Option<()> {
    let hash = suite.common.hash_provider;
    let hkdf = suite.hkdf_provider;
    // Derive-Secret(exporter_master_secret, label, "")
    let empty = hash.hash(&[]);
    let secret = hkdf
        .expander_for_okm(exporter_secret)
        .expand_block(&expand_label(hash.output_len(), label, empty.as_ref()).parts());
    // HKDF-Expand-Label(secret, "exporter", Hash(context), length)
    let context = hash.hash(context);
    hkdf.expander_for_okm(&secret)
        .expand_slice(
            &expand_label(out.len(), b"exporter", context.as_ref()).parts(),
            out,
        )
        .ok()
}

/// The `HkdfLabel` of RFC 8446 §7.1, as the pieces HKDF-Expand takes.
struct ExpandLabel<'a> {
    length: [u8; 2],
    label_len: [u8; 1],
    label: &'a [u8],
    context_len: [u8; 1],
    context: &'a [u8],
}

fn expand_label<'a>(length: usize, label: &'a [u8], context: &'a [u8]) -> ExpandLabel<'a> {
    ExpandLabel {
        length: u16::try_from(length).unwrap_or(u16::MAX).to_be_bytes(),
        label_len: [u8::try_from(b"tls13 ".len() + label.len()).unwrap_or(u8::MAX)],
        label,
        context_len: [u8::try_from(context.len()).unwrap_or(u8::MAX)],
        context,
    }
}

impl<'a> ExpandLabel<'a> {
    fn parts(&self) -> [&[u8]; 6] {
        [
            &self.length,
            &self.label_len,
            b"tls13 ",
            self.label,
            &self.context_len,
            self.context,
        ]
    }
}

/// The TLS side of the node: the rustls configuration and per-host data.
pub struct Tls {
    /// For the client listeners, XMPP and HTTPS ([`crate::c2s::tls_io`]),
    /// with the key log that hands over the exporter secret.
    pub c2s: Arc<rustls::ServerConfig>,
    hosts: HashMap<String, HostCert>,
    fallback: String,
}

impl Tls {
    pub fn load(config: &Config) -> Result<Tls, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut hosts = HashMap::new();
        for vhost in &config.vhosts {
            let (certs, key, cert_path, key_path) = match (&vhost.tls_cert, &vhost.tls_key) {
                (Some(c), Some(k)) => (read_certs(c)?, read_key(k)?, c.clone(), k.clone()),
                _ => self_signed(&config.data_dir, &vhost.name)?,
            };
            let end_point = end_point_hash(certs[0].as_ref());
            let signing =
                provider
                    .key_provider
                    .load_private_key(key)
                    .map_err(|e| TlsError::Key {
                        path: vhost.tls_key.clone().unwrap_or_default(),
                        reason: e.to_string(),
                    })?;
            let key = Arc::new(CertifiedKey::new(certs, signing));
            if let Err(rustls::Error::InconsistentKeys(_)) = key.keys_match() {
                return Err(TlsError::KeyMismatch {
                    cert: cert_path,
                    key: key_path,
                });
            }
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
        server.key_log = Arc::new(ExporterSecret);
        Ok(Tls {
            c2s: Arc::new(server),
            hosts,
            fallback,
        })
    }

    /// The certificate for `domain` (the first virtual host's for others),
    /// for s2s streams.
    pub fn certified_key(&self, domain: &str) -> Option<Arc<CertifiedKey>> {
        self.hosts
            .get(domain)
            .or_else(|| self.hosts.get(&self.fallback))
            .map(|h| h.key.clone())
    }

    /// Channel-binding data of a client connection whose handshake was
    /// observed into `seen` and has completed.
    pub fn bindings(&self, conn: &rustls::CommonState, seen: Handshake) -> ChannelBindings {
        // RFC 9266: tls-exporter is defined for TLS 1.3 only.
        let tls_exporter = match (conn.negotiated_cipher_suite(), &seen.exporter_secret) {
            (Some(SupportedCipherSuite::Tls13(suite)), Some(secret))
                if conn.protocol_version() == Some(rustls::ProtocolVersion::TLSv1_3) =>
            {
                let mut out = [0u8; 32];
                tls13_export(suite, secret, b"EXPORTER-Channel-Binding", b"", &mut out)
                    .map(|()| out.to_vec())
            }
            _ => None,
        };
        let host = seen.host.unwrap_or_else(|| self.fallback.clone());
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

/// The hash `tls-server-end-point` binds to (RFC 5929 §4.1): the
/// certificate hashed with its signature's hash function, SHA-256 when that
/// is MD5 or SHA-1 or when the algorithm names none (Ed25519, unknown).
pub fn end_point_hash(cert_der: &[u8]) -> Vec<u8> {
    use sha2::{Sha384, Sha512};
    match signature_hash(cert_der) {
        Some(SigHash::Sha384) => Sha384::digest(cert_der).to_vec(),
        Some(SigHash::Sha512) => Sha512::digest(cert_der).to_vec(),
        _ => Sha256::digest(cert_der).to_vec(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SigHash {
    Sha256,
    Sha384,
    Sha512,
}

/// One DER TLV at the start of `b`: (tag, contents, rest).
fn der_tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |a, &x| (a << 8) | usize::from(x));
        b = &b[n..];
        len
    };
    (b.len() >= len).then(|| (tag, &b[..len], &b[len..]))
}

/// The hash of the certificate's `signatureAlgorithm` (RFC 5280 §4.1.1.2).
fn signature_hash(cert_der: &[u8]) -> Option<SigHash> {
    const SEQ: u8 = 0x30;
    const OID: u8 = 0x06;
    let (SEQ, cert, _) = der_tlv(cert_der)? else {
        return None;
    };
    let (_, _tbs, rest) = der_tlv(cert)?;
    let (SEQ, alg, _) = der_tlv(rest)? else {
        return None;
    };
    let (OID, oid, params) = der_tlv(alg)? else {
        return None;
    };
    // 1.2.840.113549.1.1.x (PKCS #1) and 1.2.840.10045.4.3.x (ECDSA).
    const PKCS1: &[u8] = &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01];
    const ECDSA: &[u8] = &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03];
    // 2.16.840.1.101.3.4.2.x (NIST hash algorithms), inside RSASSA-PSS.
    const NIST_HASH: &[u8] = &[0x60, 0x86, 0x48, 0x01, 0x65, 0x03, 0x04, 0x02];
    match oid {
        [p @ .., 11] if p == PKCS1 => Some(SigHash::Sha256),
        [p @ .., 12] if p == PKCS1 => Some(SigHash::Sha384),
        [p @ .., 13] if p == PKCS1 => Some(SigHash::Sha512),
        [p @ .., 2] if p == ECDSA => Some(SigHash::Sha256),
        [p @ .., 3] if p == ECDSA => Some(SigHash::Sha384),
        [p @ .., 4] if p == ECDSA => Some(SigHash::Sha512),
        // RSASSA-PSS: the hash is the first parameter, [0] AlgorithmIdentifier.
        [p @ .., 10] if p == PKCS1 => {
            let (SEQ, params, _) = der_tlv(params)? else {
                return None;
            };
            let (0xa0, hash, _) = der_tlv(params)? else {
                return None;
            };
            let (SEQ, hash, _) = der_tlv(hash)? else {
                return None;
            };
            let (OID, hash_oid, _) = der_tlv(hash)? else {
                return None;
            };
            match hash_oid {
                [p @ .., 1] if p == NIST_HASH => Some(SigHash::Sha256),
                [p @ .., 2] if p == NIST_HASH => Some(SigHash::Sha384),
                [p @ .., 3] if p == NIST_HASH => Some(SigHash::Sha512),
                _ => None,
            }
        }
        _ => None,
    }
}

/// What a vhost's certificate and key are, and where they came from.
type Loaded = (
    Vec<CertificateDer<'static>>,
    PrivateKeyDer<'static>,
    PathBuf,
    PathBuf,
);

/// Loads `<data_dir>/certs/<vhost>.{crt,key}`, creating them on first start.
fn self_signed(data_dir: &Path, vhost: &str) -> Result<Loaded, TlsError> {
    let dir = data_dir.join("certs");
    let cert_path = dir.join(format!("{vhost}.crt"));
    let key_path = dir.join(format!("{vhost}.key"));
    if cert_path.exists() && key_path.exists() {
        return Ok((
            read_certs(&cert_path)?,
            read_key(&key_path)?,
            cert_path,
            key_path,
        ));
    }
    let generated = rcgen::generate_simple_self_signed(vec![vhost.to_owned()]).map_err(|e| {
        TlsError::Generate {
            vhost: vhost.to_owned(),
            reason: e.to_string(),
        }
    })?;
    let write = |path: &Path, text: String| {
        crate::files::private_dir(&dir)
            .and_then(|()| crate::files::write_private(path, text.as_bytes()))
            .map_err(|source| TlsError::Write {
                path: path.to_owned(),
                source,
            })
    };
    // The key first: a certificate without its key is never left behind.
    write(&key_path, generated.signing_key.serialize_pem())?;
    write(&cert_path, generated.cert.pem())?;
    tracing::info!(vhost, cert = %cert_path.display(), "generated a self-signed certificate");
    Ok((
        read_certs(&cert_path)?,
        read_key(&key_path)?,
        cert_path,
        key_path,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::Sha384;

    fn cert_with(alg: &'static rcgen::SignatureAlgorithm) -> Vec<u8> {
        let key = rcgen::KeyPair::generate_for(alg).unwrap();
        let params = rcgen::CertificateParams::new(vec!["example.org".to_owned()]).unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn end_point_hash_follows_the_signature_hash() {
        let p256 = cert_with(&rcgen::PKCS_ECDSA_P256_SHA256);
        assert_eq!(signature_hash(&p256), Some(SigHash::Sha256));
        assert_eq!(end_point_hash(&p256), Sha256::digest(&p256).to_vec());
        let p384 = cert_with(&rcgen::PKCS_ECDSA_P384_SHA384);
        assert_eq!(signature_hash(&p384), Some(SigHash::Sha384));
        assert_eq!(end_point_hash(&p384), Sha384::digest(&p384).to_vec());
        assert_ne!(end_point_hash(&p384), Sha256::digest(&p384).to_vec());
        // Ed25519 names no hash: SHA-256.
        let ed = cert_with(&rcgen::PKCS_ED25519);
        assert_eq!(signature_hash(&ed), None);
        assert_eq!(end_point_hash(&ed), Sha256::digest(&ed).to_vec());
    }

    #[test]
    fn truncated_or_garbage_der_falls_back_to_sha256() {
        let p384 = cert_with(&rcgen::PKCS_ECDSA_P384_SHA384);
        for cut in [0, 1, 2, 10, p384.len() / 2] {
            let b = &p384[..cut];
            assert_eq!(end_point_hash(b), Sha256::digest(b).to_vec());
        }
        assert_eq!(signature_hash(&[0x30, 0x84, 0xff, 0xff, 0xff, 0xff]), None);
    }

    #[test]
    fn a_key_that_is_not_the_certificates_is_refused_with_both_paths() {
        let t = tempfile::tempdir().unwrap();
        let a = rcgen::generate_simple_self_signed(vec!["example.org".into()]).unwrap();
        let b = rcgen::generate_simple_self_signed(vec!["example.org".into()]).unwrap();
        let cert = t.path().join("a.crt");
        let key = t.path().join("b.key");
        std::fs::write(&cert, a.cert.pem()).unwrap();
        std::fs::write(&key, b.signing_key.serialize_pem()).unwrap();
        let config = Config {
            data_dir: t.path().join("data"),
            vhosts: vec![crate::config::VHost {
                name: "example.org".into(),
                tls_cert: Some(cert),
                tls_key: Some(key),
            }],
            ..Config::default()
        };
        let err = Tls::load(&config)
            .err()
            .expect("mismatch refused")
            .to_string();
        assert!(err.contains("a.crt") && err.contains("b.key"), "{err}");
    }
}
