//! Federation with other XMPP domains (RFC 6120 server-to-server streams).
//!
//! The crate owns s2s streams and knows nothing of Raft or sessions
//! (DESIGN.md, "Federation"): the node implements [`Host`] (is a domain
//! ours, deliver an authenticated inbound stanza, bounce a stanza we could
//! not send, the dialback secret, our certificates) and calls
//! [`Federation::send`] for every stanza to another domain.
//!
//! - [`inbound`]: the listener side: `jabber:server` streams, STARTTLS,
//!   SASL EXTERNAL, dialback in the receiving and authoritative roles.
//! - [`outbound`]: one stream per (local, remote) domain pair, opened on
//!   demand, stanzas queued while it is set up, bounced when it cannot be,
//!   closed after an idle time.
//! - [`resolve`]: where a domain's servers are (static routes, SRV, A/AAAA).
//! - [`dialback`]: XEP-0185 keys.
//! - [`certs`]: TLS set-up and certificate checks (RFC 6125 DNS-ID).

pub mod certs;
pub mod dialback;
pub mod inbound;
pub mod outbound;
pub mod resolve;
mod stream;

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::sign::CertifiedKey;
use rustls_pki_types::CertificateDer;
use xmpp::element::Element;
use xmpp::error::StanzaError;

/// How far a remote domain is trusted, and how it may prove who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Only a certificate valid for the domain (SASL EXTERNAL, or dialback
    /// over TLS whose certificate checks out).
    Certificate,
    /// A valid certificate is used when there is one; otherwise Server
    /// Dialback (XEP-0220) over TLS with any certificate, self-signed
    /// included (Prosody's and ejabberd's default).
    Dialback,
    /// No streams with this domain at all.
    Deny,
}

impl std::str::FromStr for Policy {
    type Err = String;
    fn from_str(s: &str) -> Result<Policy, String> {
        match s {
            "certificate" => Ok(Policy::Certificate),
            "dialback" => Ok(Policy::Dialback),
            "deny" => Ok(Policy::Deny),
            other => Err(format!(
                "unknown s2s policy {other:?}: use \"certificate\", \"dialback\" or \"deny\""
            )),
        }
    }
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::Certificate => "certificate",
            Policy::Dialback => "dialback",
            Policy::Deny => "deny",
        }
    }
}

/// Settings of the federation side; the node fills them from its config.
#[derive(Debug, Clone)]
pub struct Config {
    /// Refuse streams (both ways) that do not negotiate TLS.
    pub require_tls: bool,
    /// Policy for domains without one of their own.
    pub default_policy: Policy,
    /// Per remote domain policies.
    pub policies: HashMap<String, Policy>,
    /// Static routes: a remote domain's servers as `host:port`, tried in
    /// order, instead of DNS.
    pub routes: HashMap<String, Vec<String>>,
    /// One TCP connection attempt.
    pub connect_timeout: Duration,
    /// From the TCP connection to an authenticated stream (both ways).
    pub negotiation_timeout: Duration,
    /// An outbound stream with nothing to send this long is closed.
    pub idle_timeout: Duration,
    /// Most stanzas queued for one remote domain; more are bounced.
    pub max_queued: usize,
    /// A write that does not complete this long kills the stream.
    pub write_timeout: Duration,
    /// First wait before a domain that failed is tried again; doubles per
    /// failure up to `max_backoff`.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Parser limits (stanza size, depth, attributes), as for clients.
    pub limits: xmpp::xml::Limits,
    /// Trust anchors besides (or instead of) the Mozilla roots.
    pub extra_roots: Vec<CertificateDer<'static>>,
    /// Trust the Mozilla root store (webpki-roots).
    pub webpki_roots: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            require_tls: true,
            default_policy: Policy::Dialback,
            policies: HashMap::new(),
            routes: HashMap::new(),
            connect_timeout: Duration::from_secs(10),
            negotiation_timeout: Duration::from_secs(30),
            idle_timeout: Duration::from_secs(600),
            max_queued: 10_000,
            write_timeout: Duration::from_secs(30),
            backoff: Duration::from_secs(1),
            max_backoff: Duration::from_secs(300),
            limits: xmpp::xml::Limits::default(),
            extra_roots: Vec::new(),
            webpki_roots: true,
        }
    }
}

impl Config {
    pub fn policy(&self, domain: &str) -> Policy {
        self.policies
            .get(domain)
            .copied()
            .unwrap_or(self.default_policy)
    }
}

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// What the node does for the federation side.
pub trait Host: Send + Sync + 'static {
    /// Whether `domain` is one of our virtual hosts.
    fn is_local(&self, domain: &str) -> bool;
    /// A stanza from an authenticated remote domain to one of ours, its
    /// namespace already `jabber:client`. Awaited before the next stanza
    /// of the same stream is read, so a stream's order is kept.
    fn deliver(&self, stanza: Element) -> BoxFuture<'_, ()>;
    /// A stanza we could not send: its sender learns why.
    fn bounce(&self, stanza: Element, condition: StanzaError, text: &str);
    /// The dialback secret (XEP-0185), the same on every node of the
    /// cluster; `None` while there is none yet.
    fn dialback_secret(&self) -> Option<Vec<u8>>;
    /// Our certificate for `domain` (the first virtual host's when
    /// `domain` is not ours).
    fn certificate(&self, domain: &str) -> Option<Arc<CertifiedKey>>;
}

/// How a stream's peer proved its domain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMethod {
    /// Not yet.
    None,
    /// SASL EXTERNAL with a certificate valid for the domain.
    External,
    /// XEP-0220 Server Dialback.
    Dialback,
}

impl AuthMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            AuthMethod::None => "none",
            AuthMethod::External => "sasl-external",
            AuthMethod::Dialback => "dialback",
        }
    }
}

/// One stream as `clusterctl s2s` shows it.
#[derive(Debug, Clone)]
pub struct StreamStatus {
    /// `outbound` or `inbound`.
    pub direction: &'static str,
    pub local: String,
    pub remote: String,
    /// `connecting`, `negotiating`, `established`, `backoff`.
    pub state: String,
    pub auth: AuthMethod,
    /// `TLSv1_3`, or empty before TLS.
    pub tls: String,
    /// Whether the peer's certificate is valid for its domain.
    pub cert_valid: bool,
    pub since: Instant,
    /// Stanzas waiting to be sent (outbound only).
    pub queued: usize,
    /// The address of the other end.
    pub peer: String,
}

/// Shared, updated by the stream's own task.
pub(crate) type StatusCell = Arc<Mutex<StreamStatus>>;

/// The federation side of one node.
pub struct Federation {
    pub config: Config,
    pub(crate) host: Arc<dyn Host>,
    pub(crate) tls: certs::TlsSetup,
    pub(crate) resolver: resolve::Resolver,
    pub(crate) pool: outbound::Pool,
    pub(crate) inbound: Mutex<HashMap<u64, StatusCell>>,
    pub(crate) next_id: std::sync::atomic::AtomicU64,
}

impl Federation {
    pub fn new(config: Config, host: Arc<dyn Host>) -> Arc<Federation> {
        let tls = certs::TlsSetup::new(&config, host.clone());
        let resolver = resolve::Resolver::new(config.routes.clone());
        Arc::new(Federation {
            config,
            host,
            tls,
            resolver,
            pool: outbound::Pool::default(),
            inbound: Mutex::new(HashMap::new()),
            next_id: std::sync::atomic::AtomicU64::new(1),
        })
    }

    /// Sends a stanza from our domain `local` to the remote domain `remote`
    /// (opening a stream if there is none); bounced if it cannot be.
    pub fn send(self: &Arc<Self>, local: &str, remote: &str, stanza: Element) {
        outbound::send(self, local, remote, stanza)
    }

    /// Every stream, inbound and outbound.
    pub fn status(&self) -> Vec<StreamStatus> {
        let mut out = self.pool.status();
        if let Ok(map) = self.inbound.lock() {
            out.extend(
                map.values()
                    .filter_map(|c| c.lock().ok().map(|s| s.clone())),
            );
        }
        out.sort_by(|a, b| (&a.remote, a.direction).cmp(&(&b.remote, b.direction)));
        out
    }

    /// Serves one listener until `shutdown` flips: STARTTLS (`direct_tls`
    /// false) or TLS from the first byte (XEP-0368).
    pub async fn serve(
        self: Arc<Self>,
        listener: tokio::net::TcpListener,
        direct_tls: bool,
        mut shutdown: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((tcp, peer)) => {
                        let _ = tcp.set_nodelay(true);
                        tokio::spawn(inbound::run(self.clone(), tcp, peer, direct_tls));
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "s2s accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
                _ = shutdown.changed() => return,
            }
        }
    }

    pub(crate) fn new_id(&self) -> u64 {
        self.next_id
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }
}

/// Rewrites every element of `from` into `to`: RFC 6120 §4.8.3, the
/// content namespace is `jabber:client` towards clients and
/// `jabber:server` between servers.
pub fn translate_ns(e: &mut Element, from: &str, to: &str) {
    if e.ns == from {
        e.ns = to.to_owned();
    }
    for n in &mut e.children {
        if let xmpp::element::Node::Element(c) = n {
            translate_ns(c, from, to);
        }
    }
}

/// The domain part of a JID string (no stringprep: the caller compares
/// with prepared names after parsing).
pub(crate) fn domain_of(jid: &str) -> Option<String> {
    xmpp::jid::Jid::parse(jid)
        .ok()
        .map(|j| j.domain().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn namespaces_are_translated_deeply_and_only_the_content_namespace() {
        let mut e = xmpp::xml::parse_element(
            "<message xmlns='jabber:client' to='a@b'><body>x</body><x xmlns='urn:other'><y/></x></message>",
            "jabber:client",
        )
        .expect("parses");
        translate_ns(&mut e, "jabber:client", "jabber:server");
        assert_eq!(e.ns, "jabber:server");
        assert!(e.get_child("body", "jabber:server").is_some());
        assert!(e.get_child("x", "urn:other").is_some());
        assert_eq!(
            e.to_string_in("jabber:server"),
            "<message to='a@b'><body>x</body><x xmlns='urn:other'><y/></x></message>"
        );
    }

    #[test]
    fn policies_parse_with_a_clear_error() {
        assert_eq!("dialback".parse::<Policy>(), Ok(Policy::Dialback));
        assert!("open"
            .parse::<Policy>()
            .unwrap_err()
            .contains("certificate"));
    }
}
