//! The node's side of federation: it builds the `s2s` crate's
//! [`s2s::Federation`] from the config, implements its [`s2s::Host`]
//! (our domains, inbound delivery, bounces, the replicated dialback
//! secret, our certificates), and hands it every stanza for another domain.

use std::sync::{Arc, Weak};
use std::time::Duration;

use anyhow::Context as _;
use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::jid::Jid;
use xmpp::stanza::PresenceType;

use crate::cluster::state_machine::Command;
use crate::config::Config;
use crate::modules::presence;
use crate::router;
use crate::Server;

/// The name of the dialback secret among the cluster secrets.
const DIALBACK: &str = "dialback";

struct NodeHost(Weak<Server>);

impl s2s::Host for NodeHost {
    fn is_local(&self, domain: &str) -> bool {
        self.0
            .upgrade()
            .is_some_and(|s| s.config.serves_domain(domain))
    }

    fn deliver(&self, stanza: Element) -> s2s::BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(server) = self.0.upgrade() {
                inbound(&server, stanza).await;
            }
        })
    }

    fn bounce(&self, stanza: Element, condition: StanzaError, text: &str) {
        if let Some(server) = self.0.upgrade() {
            router::bounce(&server, &stanza, condition, Some(text));
        }
    }

    fn dialback_secret(&self) -> Option<Vec<u8>> {
        self.0.upgrade()?.store().secret(DIALBACK).ok().flatten()
    }

    fn certificate(&self, domain: &str) -> Option<Arc<rustls::sign::CertifiedKey>> {
        self.0.upgrade()?.tls.certified_key(domain)
    }
}

/// The federation side, when `s2s.enabled`.
pub fn build(config: &Config, me: Weak<Server>) -> Option<Arc<s2s::Federation>> {
    let c = &config.s2s;
    if !c.enabled {
        return None;
    }
    let parse = |p: &str| p.parse::<s2s::Policy>().unwrap_or(s2s::Policy::Dialback);
    let extra_roots = match &c.ca_file {
        Some(path) => match std::fs::read(path) {
            Ok(pem) => {
                use rustls_pki_types::pem::PemObject;
                rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
                    .filter_map(Result::ok)
                    .collect()
            }
            Err(e) => {
                tracing::error!(path = %path.display(), error = %e, "cannot read s2s.ca_file; remote certificates are checked without it");
                Vec::new()
            }
        },
        None => Vec::new(),
    };
    let s2s_config = s2s::Config {
        require_tls: c.require_tls,
        default_policy: parse(&c.default_policy),
        policies: c
            .policies
            .iter()
            .map(|(d, p)| (d.to_ascii_lowercase(), parse(p)))
            .collect(),
        routes: c
            .routes
            .iter()
            .map(|(d, r)| (d.to_ascii_lowercase(), r.clone()))
            .collect(),
        connect_timeout: Duration::from_secs(c.connect_timeout_secs),
        negotiation_timeout: Duration::from_secs(c.negotiation_timeout_secs),
        idle_timeout: Duration::from_secs(c.idle_timeout_secs),
        max_queued: c.max_queued,
        write_timeout: config.limits.write_timeout(),
        backoff: Duration::from_secs(c.backoff_secs),
        max_backoff: Duration::from_secs(c.max_backoff_secs),
        limits: config.limits.parser(),
        extra_roots,
        webpki_roots: c.webpki_roots,
    };
    Some(s2s::Federation::new(s2s_config, Arc::new(NodeHost(me))))
}

/// Binds the s2s listeners (STARTTLS, and direct TLS when configured).
pub async fn bind(config: &Config) -> anyhow::Result<Vec<(tokio::net::TcpListener, bool)>> {
    if !config.s2s.enabled {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    let plain = tokio::net::TcpListener::bind(config.listen.s2s)
        .await
        .with_context(|| format!("cannot listen on s2s address {}", config.listen.s2s))?;
    out.push((plain, false));
    if let Some(addr) = config.s2s.direct_tls_addr {
        let tls = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("cannot listen on s2s direct TLS address {addr}"))?;
        out.push((tls, true));
    }
    Ok(out)
}

/// Serves the listeners and makes sure the cluster has a dialback secret.
pub fn start(server: &Arc<Server>, listeners: Vec<(tokio::net::TcpListener, bool)>) {
    let Some(fed) = &server.s2s else {
        return;
    };
    for (listener, direct_tls) in listeners {
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, direct_tls, "s2s listener ready");
        }
        tokio::spawn(
            fed.clone()
                .serve(listener, direct_tls, server.shutdown.subscribe()),
        );
    }
    let server = server.clone();
    tokio::spawn(async move {
        let mut wait = Duration::from_millis(200);
        loop {
            if server.store().secret(DIALBACK).ok().flatten().is_some() {
                return;
            }
            let mut value = vec![0u8; 32];
            rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut value);
            let cmd = Command::InitSecret {
                name: DIALBACK.into(),
                value,
            };
            match server.cluster.write(cmd).await {
                Ok(_) => {}
                Err(e) => {
                    tracing::debug!(error = %e, "dialback secret not written yet; retrying");
                    tokio::time::sleep(wait).await;
                    wait = (wait * 2).min(Duration::from_secs(10));
                }
            }
        }
    });
}

/// A stanza from one of our users to another domain.
pub fn route_remote(server: &Server, stanza: Element, remote: &str) {
    let Some(fed) = &server.s2s else {
        return router::bounce(
            server,
            &stanza,
            StanzaError::RemoteServerNotFound,
            Some("federation is off on this server"),
        );
    };
    let local = stanza
        .get_attr("from")
        .and_then(|f| Jid::parse(f).ok())
        .map(|j| j.domain().to_owned())
        .filter(|d| server.config.serves_domain(d));
    match local {
        Some(local) => fed.send(&local, remote, stanza),
        // Only our own users' and components' stanzas leave for other domains.
        None => tracing::debug!(%remote, "stanza from another domain to another domain dropped"),
    }
}

/// A stanza from an authenticated remote domain to one of ours.
async fn inbound(server: &Server, stanza: Element) {
    if stanza.name == "presence" {
        let from = stanza.get_attr("from").and_then(|f| Jid::parse(f).ok());
        let to = stanza.get_attr("to").and_then(|t| Jid::parse(t).ok());
        if let (Some(from), Some(to)) = (from, to) {
            use xmpp::roster::SubKind;
            let kind = match PresenceType::of(&stanza) {
                Some(PresenceType::Subscribe) => Some(SubKind::Subscribe),
                Some(PresenceType::Subscribed) => Some(SubKind::Subscribed),
                Some(PresenceType::Unsubscribe) => Some(SubKind::Unsubscribe),
                Some(PresenceType::Unsubscribed) => Some(SubKind::Unsubscribed),
                Some(PresenceType::Probe) => {
                    return presence::remote_probe(server, to.bare(), &from);
                }
                _ => None,
            };
            if let Some(kind) = kind {
                if to.node().is_some() && from.node().is_some() {
                    presence::inbound_subscription(server, to.bare(), from.bare(), kind, &stanza)
                        .await;
                }
                return;
            }
        }
    }
    router::route(server, stanza).await
}
