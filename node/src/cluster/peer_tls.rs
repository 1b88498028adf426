//! Mutual TLS between nodes: every node presents a certificate from the
//! cluster CA and accepts only peers that do (`cluster.ca`, `cluster.cert`,
//! `cluster.key`). The client side checks the peer's certificate against
//! the host it dialled, as any TLS client; the server side requires a
//! client certificate from the same CA.

use std::path::Path;

use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

use crate::config::ClusterConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsFileError {
    #[error(
        "cannot read {path}: {source} (cluster TLS material; `clusterctl certs init` makes it)"
    )]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cluster.cert / cluster.key / cluster.ca are not usable PEM ({0}); `clusterctl certs init` makes a matching set")]
    Unusable(String),
}

/// Both sides of the inter-node TLS configuration.
#[derive(Clone, Debug)]
pub struct PeerTls {
    pub server: ServerTlsConfig,
    pub client: ClientTlsConfig,
}

fn read(path: &Path) -> Result<Vec<u8>, TlsFileError> {
    std::fs::read(path).map_err(|source| TlsFileError::Read {
        path: path.display().to_string(),
        source,
    })
}

impl PeerTls {
    /// `None` when the cluster runs without TLS (loopback only; the config
    /// check enforces that).
    pub fn load(c: &ClusterConfig) -> Result<Option<PeerTls>, TlsFileError> {
        let (Some(ca), Some(cert), Some(key)) = (&c.ca, &c.cert, &c.key) else {
            return Ok(None);
        };
        let ca = Certificate::from_pem(read(ca)?);
        let identity = Identity::from_pem(read(cert)?, read(key)?);
        let tls = PeerTls {
            server: ServerTlsConfig::new()
                .identity(identity.clone())
                .client_ca_root(ca.clone()),
            client: ClientTlsConfig::new().ca_certificate(ca).identity(identity),
        };
        // Both sides parse their PEM now, so a bad file stops the start.
        tonic::transport::Server::builder()
            .tls_config(tls.server.clone())
            .map_err(|e| TlsFileError::Unusable(format!("{e:?}")))?;
        tonic::transport::Endpoint::from_static("https://127.0.0.1:1")
            .tls_config(tls.client.clone())
            .map_err(|e| TlsFileError::Unusable(format!("{e:?}")))?;
        Ok(Some(tls))
    }
}

/// A cluster CA and one certificate per node, for `clusterctl certs init`.
pub struct Issued {
    pub ca_cert: String,
    pub ca_key: String,
    /// (node id, certificate, key), PEM.
    pub nodes: Vec<(u64, String, String)>,
}

/// How long `clusterctl certs init` certificates are valid: the CA ten
/// years, each node's certificate five (both from a day ago, for clocks
/// a little behind). Dates past 2050 break some peers: Erlang's TLS
/// (ejabberd) cannot load a certificate that expires in 4096, rcgen's
/// default.
const CA_DAYS: i64 = 3650;
const NODE_DAYS: i64 = 1826;

/// Makes a CA and a certificate for each `(id, host)`: valid for `host`
/// (an IP address or a DNS name: what peers dial), for server and client
/// authentication alike.
pub fn issue(nodes: &[(u64, String)]) -> Result<Issued, rcgen::Error> {
    use rcgen::{
        BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
        KeyPair, KeyUsagePurpose,
    };
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca.distinguished_name
        .push(DnType::CommonName, "xmpp-node cluster CA");
    ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    let now = time::OffsetDateTime::now_utc();
    let from = now - time::Duration::days(1);
    ca.not_before = from;
    ca.not_after = now + time::Duration::days(CA_DAYS);
    let ca_key = KeyPair::generate()?;
    let ca_cert = ca.self_signed(&ca_key)?;
    let ca_key_pem = ca_key.serialize_pem();
    let issuer = Issuer::new(ca, ca_key);
    let mut out = Vec::new();
    for (id, host) in nodes {
        let mut p = CertificateParams::new(vec![host.clone()])?;
        p.distinguished_name
            .push(DnType::CommonName, format!("xmpp-node {id}"));
        p.not_before = from;
        p.not_after = now + time::Duration::days(NODE_DAYS);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = KeyPair::generate()?;
        let cert = p.signed_by(&key, &issuer)?;
        out.push((*id, cert.pem(), key.serialize_pem()));
    }
    Ok(Issued {
        ca_cert: ca_cert.pem(),
        ca_key: ca_key_pem,
        nodes: out,
    })
}
