//! Inbound streams: a remote server connects to us.
//!
//! Per connection: our header and features (STARTTLS, required by
//! default; then SASL EXTERNAL when the peer's certificate is valid for
//! the domain in its header, and dialback with errors), then the peer
//! proves one or more domains (SASL EXTERNAL, or `<db:result/>` which we
//! check with the domain's authoritative server, or at once when its
//! certificate is valid for that domain) and sends stanzas. A stanza is
//! accepted only when its `from` domain was proven on this stream and its
//! `to` is one of our domains (RFC 6120 §8.1.1.2, §13.7.1.1).
//!
//! The same connection also answers `<db:verify/>` for keys we issued
//! (the authoritative server's role); that needs no authentication.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use xmpp::element::Element;
use xmpp::error::StreamError;
use xmpp::stanza::{ns, StanzaKind};
use xmpp::xml::Event;

use crate::stream::{new_stream_id, Conn, Io, StreamEnd};
use crate::{dialback, AuthMethod, Federation, Policy, StatusCell, StreamStatus};

/// Dialback verifications one stream may have outstanding at once.
const MAX_PENDING_VERIFY: usize = 8;

struct Inbound {
    fed: Arc<Federation>,
    conn: Conn,
    status: StatusCell,
    /// Our domain the peer addressed (`to` of its header).
    local: String,
    /// The domain the peer named in its header (`from`), if any.
    peer_domain: Option<String>,
    stream_id: String,
    /// (remote domain, our domain) pairs proven on this stream.
    proven: HashSet<(String, String)>,
    /// Whether the peer's certificate is valid for `peer_domain`.
    cert_valid: bool,
    pending: usize,
    verdicts: (
        mpsc::UnboundedSender<Verdict>,
        mpsc::UnboundedReceiver<Verdict>,
    ),
}

struct Verdict {
    remote: String,
    local: String,
    valid: Result<bool, String>,
}

pub(crate) async fn run(fed: Arc<Federation>, tcp: TcpStream, peer: SocketAddr, direct_tls: bool) {
    let id = fed.new_id();
    let status = Arc::new(Mutex::new(StreamStatus {
        direction: "inbound",
        local: String::new(),
        remote: String::new(),
        state: "negotiating".into(),
        auth: AuthMethod::None,
        tls: String::new(),
        cert_valid: false,
        since: Instant::now(),
        queued: 0,
        peer: peer.to_string(),
    }));
    if let Ok(mut m) = fed.inbound.lock() {
        m.insert(id, status.clone());
    }
    let mut io = Io::Plain(tcp);
    if direct_tls {
        let Io::Plain(tcp) = io else { unreachable!() };
        match tokio::time::timeout(fed.config.negotiation_timeout, fed.tls.acceptor.accept(tcp))
            .await
        {
            Ok(Ok(tls)) => io = Io::Server(Box::new(tls)),
            _ => {
                tracing::debug!(%peer, "s2s direct TLS handshake failed");
                if let Ok(mut m) = fed.inbound.lock() {
                    m.remove(&id);
                }
                return;
            }
        }
    }
    let conn = Conn::new(io, peer, fed.config.limits, fed.config.write_timeout);
    let mut stream = Inbound {
        fed: fed.clone(),
        conn,
        status,
        local: String::new(),
        peer_domain: None,
        stream_id: String::new(),
        proven: HashSet::new(),
        cert_valid: false,
        pending: 0,
        verdicts: mpsc::unbounded_channel(),
    };
    let end = stream.serve().await;
    let from = if stream.local.is_empty() {
        "localhost".to_owned()
    } else {
        stream.local.clone()
    };
    match &end {
        StreamEnd::Error(e, text) => {
            tracing::info!(%peer, remote = ?stream.peer_domain, condition = e.condition(), %text, "s2s inbound stream closed with an error");
            stream.conn.close_with_error(&from, *e, text).await;
        }
        StreamEnd::Closed => stream.conn.close().await,
        StreamEnd::PeerError(..) => {
            tracing::warn!(%peer, remote = ?stream.peer_domain, reason = %end, "s2s peer closed its stream with an error");
            stream.conn.close().await;
        }
        other => {
            tracing::debug!(%peer, remote = ?stream.peer_domain, reason = %other, "s2s inbound stream ended")
        }
    }
    if let Ok(mut m) = fed.inbound.lock() {
        m.remove(&id);
    }
}

fn set(status: &StatusCell, f: impl FnOnce(&mut StreamStatus)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

impl Inbound {
    async fn serve(&mut self) -> StreamEnd {
        let deadline = tokio::time::Instant::now() + self.fed.config.negotiation_timeout;
        loop {
            if let Err(e) = self.open().await {
                return e;
            }
            loop {
                let authenticated = !self.proven.is_empty();
                let timeout = tokio::time::sleep_until(deadline);
                let event = tokio::select! {
                    ev = self.conn.next_event() => ev,
                    Some(v) = self.verdicts.1.recv() => {
                        if let Err(e) = self.verdict(v).await {
                            return e;
                        }
                        continue;
                    }
                    _ = timeout, if !authenticated => {
                        return StreamEnd::err(StreamError::ConnectionTimeout, "no domain was authenticated in time");
                    }
                };
                let e = match event {
                    Ok(Event::Element(e)) => e,
                    Ok(Event::StreamClose) => return StreamEnd::Closed,
                    Ok(Event::StreamOpen(_)) => {
                        return StreamEnd::err(
                            StreamError::NotWellFormed,
                            "a second stream header",
                        );
                    }
                    Err(e) => return e,
                };
                match self.element(e).await {
                    Ok(true) => break, // stream restart
                    Ok(false) => {}
                    Err(e) => return e,
                }
            }
        }
    }

    /// Reads the peer's header, answers with ours and the features.
    async fn open(&mut self) -> Result<(), StreamEnd> {
        let h = self.conn.next_header().await?;
        let to = h.to.as_deref().and_then(|t| xmpp::jid::nameprep(t).ok());
        match to {
            Some(t) if self.fed.host.is_local(&t) => {
                if !self.local.is_empty() && self.local != t {
                    return Err(StreamEnd::err(
                        StreamError::HostUnknown,
                        "the host changed on a restart",
                    ));
                }
                self.local = t;
            }
            other => {
                let text = match other {
                    Some(t) => format!("this server does not serve {t}"),
                    None => "the stream header has no valid 'to'".into(),
                };
                return Err(StreamEnd::err(StreamError::HostUnknown, text));
            }
        }
        if h.default_ns != ns::SERVER {
            return Err(StreamEnd::err(
                StreamError::InvalidNamespace,
                "server streams use the jabber:server namespace",
            ));
        }
        self.peer_domain = h.from.as_deref().and_then(|f| xmpp::jid::nameprep(f).ok());
        self.stream_id = new_stream_id();
        let local = self.local.clone();
        let (id, from) = (self.stream_id.clone(), self.peer_domain.clone());
        self.conn
            .write_header(&local, from.as_deref(), Some(&id))
            .await?;
        if self.conn.is_tls() {
            self.cert_valid = match &self.peer_domain {
                Some(d) => self.fed.tls.valid_for(&self.conn.peer_chain(), d),
                None => false,
            };
        }
        set(&self.status, |s| {
            s.local = local.clone();
            s.remote = from.clone().unwrap_or_default();
            s.tls = self.conn.tls_version();
            s.cert_valid = self.cert_valid;
        });
        let versioned = h.version.as_deref().is_some_and(|v| v.starts_with('1'));
        if !versioned {
            // Pre-1.0 peers get no features; dialback still works.
            return Ok(());
        }
        let mut features = Element::new("features", ns::STREAM);
        if !self.conn.is_tls() {
            let mut starttls = Element::new("starttls", ns::TLS);
            if self.fed.config.require_tls {
                starttls = starttls.child(Element::new("required", ns::TLS));
            }
            features = features.child(starttls);
        }
        let proven_external = self
            .peer_domain
            .as_ref()
            .is_some_and(|d| self.proven.contains(&(d.clone(), self.local.clone())));
        if self.conn.is_tls() && self.cert_valid && !proven_external {
            features = features.child(
                Element::new("mechanisms", ns::SASL)
                    .child(Element::new("mechanism", ns::SASL).text("EXTERNAL")),
            );
        }
        if self.conn.is_tls() || !self.fed.config.require_tls {
            features = features.child(
                Element::new("dialback", dialback::FEATURE_NS)
                    .child(Element::new("errors", dialback::FEATURE_NS)),
            );
        }
        self.conn.send(&features).await
    }

    /// Handles one element; `Ok(true)` when the stream restarts.
    async fn element(&mut self, e: Element) -> Result<bool, StreamEnd> {
        if e.is("starttls", ns::TLS) {
            return self.starttls().await.map(|_| true);
        }
        if e.is("auth", ns::SASL) {
            return self.external(&e).await;
        }
        if e.is("result", dialback::NS) {
            self.db_result(&e).await?;
            return Ok(false);
        }
        if e.is("verify", dialback::NS) {
            self.db_verify(&e).await?;
            return Ok(false);
        }
        if e.is("error", ns::STREAM) {
            return Err(crate::stream::peer_error(&e));
        }
        if StanzaKind::of(&e).is_some() && e.ns == ns::SERVER {
            self.stanza(e).await?;
            return Ok(false);
        }
        Err(StreamEnd::err(
            StreamError::UnsupportedStanzaType,
            format!("<{}/> in {} is not understood here", e.name, e.ns),
        ))
    }

    async fn starttls(&mut self) -> Result<(), StreamEnd> {
        if self.conn.is_tls() {
            return Err(StreamEnd::err(
                StreamError::PolicyViolation,
                "TLS is already on",
            ));
        }
        self.conn.send(&Element::new("proceed", ns::TLS)).await?;
        let Io::Plain(tcp) = std::mem::replace(&mut self.conn.io, Io::Upgrading) else {
            return Err(StreamEnd::Lost);
        };
        match self.fed.tls.acceptor.accept(tcp).await {
            Ok(tls) => self.conn.io = Io::Server(Box::new(tls)),
            Err(e) => return Err(StreamEnd::Failed(format!("TLS handshake failed: {e}"))),
        }
        self.conn.reset_for_tls();
        Ok(())
    }

    /// SASL EXTERNAL (RFC 6120 §6, XEP-0178): the certificate proves the
    /// domain in the header, or the authorization identity if it is that.
    async fn external(&mut self, e: &Element) -> Result<bool, StreamEnd> {
        let failure =
            |cond: &str| Element::new("failure", ns::SASL).child(Element::new(cond, ns::SASL));
        if e.get_attr("mechanism") != Some("EXTERNAL") {
            self.conn.send(&failure("invalid-mechanism")).await?;
            return Ok(false);
        }
        let Some(domain) = self.peer_domain.clone() else {
            self.conn.send(&failure("not-authorized")).await?;
            return Ok(false);
        };
        let text = e.text_content();
        let text = text.trim();
        let authzid = if text.is_empty() || text == "=" {
            None
        } else {
            use base64::Engine;
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .ok()
                .and_then(|b| String::from_utf8(b).ok())
        };
        let names_other = authzid
            .as_deref()
            .is_some_and(|a| xmpp::jid::nameprep(a).ok().as_deref() != Some(domain.as_str()));
        if !self.conn.is_tls()
            || !self.cert_valid
            || names_other
            || self.fed.config.policy(&domain) == Policy::Deny
        {
            tracing::info!(peer = %self.conn.peer, %domain, "s2s SASL EXTERNAL refused");
            self.conn.send(&failure("not-authorized")).await?;
            return Ok(false);
        }
        self.conn.send(&Element::new("success", ns::SASL)).await?;
        self.prove(domain, self.local.clone(), AuthMethod::External);
        self.conn.reset();
        Ok(true)
    }

    fn prove(&mut self, remote: String, local: String, how: AuthMethod) {
        tracing::info!(peer = %self.conn.peer, %remote, %local, method = how.as_str(), "s2s inbound domain authenticated");
        set(&self.status, |s| {
            s.auth = how;
            s.state = "established".into();
            s.remote = remote.clone();
        });
        self.proven.insert((remote, local));
    }

    /// XEP-0220 §2.1.2: the receiving server's side of `<db:result/>`.
    async fn db_result(&mut self, e: &Element) -> Result<(), StreamEnd> {
        let (Some(from), Some(to)) = (e.get_attr("from"), e.get_attr("to")) else {
            return Err(StreamEnd::err(
                StreamError::ImproperAddressing,
                "db:result needs 'from' and 'to'",
            ));
        };
        let key = e.text_content();
        if key.is_empty() {
            // A result without a key is an answer, not a request; we never
            // send requests on inbound streams.
            return Ok(());
        }
        let (remote, local) = match (xmpp::jid::nameprep(from), xmpp::jid::nameprep(to)) {
            (Ok(f), Ok(t)) => (f, t),
            _ => {
                return Err(StreamEnd::err(
                    StreamError::ImproperAddressing,
                    "db:result with invalid domains",
                ))
            }
        };
        let refuse = |cond: &str, kind: &str| {
            Element::new("result", dialback::NS)
                .attr("from", to)
                .attr("to", from)
                .attr("type", "error")
                .child(
                    Element::new("error", ns::SERVER)
                        .attr("type", kind)
                        .child(Element::new(cond, ns::STANZAS)),
                )
        };
        if !self.fed.host.is_local(&local) {
            // XEP-0220 §2.4: not a domain we serve.
            return self.conn.send(&refuse("item-not-found", "cancel")).await;
        }
        if self.fed.config.require_tls && !self.conn.is_tls() {
            return Err(StreamEnd::err(
                StreamError::PolicyViolation,
                "TLS comes before dialback here",
            ));
        }
        let cert_valid = self.fed.tls.valid_for(&self.conn.peer_chain(), &remote);
        match self.fed.config.policy(&remote) {
            Policy::Deny => return self.conn.send(&refuse("forbidden", "auth")).await,
            Policy::Certificate if !cert_valid => {
                return self.conn.send(&refuse("not-authorized", "auth")).await;
            }
            _ => {}
        }
        if cert_valid {
            // The certificate already proves the domain (XEP-0344 §2.3).
            self.prove(remote, local, AuthMethod::Dialback);
            return self
                .conn
                .send(
                    &Element::new("result", dialback::NS)
                        .attr("from", to)
                        .attr("to", from)
                        .attr("type", "valid"),
                )
                .await;
        }
        if self.pending >= MAX_PENDING_VERIFY {
            return self.conn.send(&refuse("resource-constraint", "wait")).await;
        }
        self.pending += 1;
        let fed = self.fed.clone();
        let id = self.stream_id.clone();
        let tx = self.verdicts.0.clone();
        tokio::spawn(async move {
            let valid = crate::outbound::verify(&fed, &local, &remote, &id, &key)
                .await
                .map_err(|e| e.to_string());
            let _ = tx.send(Verdict {
                remote,
                local,
                valid,
            });
        });
        Ok(())
    }

    async fn verdict(&mut self, v: Verdict) -> Result<(), StreamEnd> {
        self.pending = self.pending.saturating_sub(1);
        let answer = Element::new("result", dialback::NS)
            .attr("from", v.local.as_str())
            .attr("to", v.remote.as_str());
        match v.valid {
            Ok(true) => {
                self.prove(v.remote, v.local, AuthMethod::Dialback);
                self.conn.send(&answer.attr("type", "valid")).await
            }
            Ok(false) => {
                tracing::warn!(peer = %self.conn.peer, remote = %v.remote, "s2s dialback key refused by the domain's authoritative server");
                self.conn.send(&answer.attr("type", "invalid")).await
            }
            Err(why) => {
                tracing::warn!(peer = %self.conn.peer, remote = %v.remote, %why, "s2s dialback: cannot reach the authoritative server");
                let error = Element::new("error", ns::SERVER)
                    .attr("type", "cancel")
                    .child(Element::new("remote-server-not-found", ns::STANZAS));
                self.conn
                    .send(&answer.attr("type", "error").child(error))
                    .await
            }
        }
    }

    /// XEP-0220 §2.1.3: the authoritative server's side: did we issue this key?
    async fn db_verify(&mut self, e: &Element) -> Result<(), StreamEnd> {
        let (Some(from), Some(to), Some(id)) =
            (e.get_attr("from"), e.get_attr("to"), e.get_attr("id"))
        else {
            return Err(StreamEnd::err(
                StreamError::ImproperAddressing,
                "db:verify needs 'from', 'to' and 'id'",
            ));
        };
        let valid = match (
            xmpp::jid::nameprep(from),
            xmpp::jid::nameprep(to),
            self.fed.host.dialback_secret(),
        ) {
            (Ok(receiving), Ok(originating), Some(secret))
                if self.fed.host.is_local(&originating) =>
            {
                dialback::is_valid(
                    &secret,
                    &receiving,
                    &originating,
                    id,
                    e.text_content().trim(),
                )
            }
            _ => false,
        };
        let answer = Element::new("verify", dialback::NS)
            .attr("from", to)
            .attr("to", from)
            .attr("id", id)
            .attr("type", if valid { "valid" } else { "invalid" });
        self.conn.send(&answer).await
    }

    /// A stanza: accepted only from a proven domain to one of ours.
    async fn stanza(&mut self, mut e: Element) -> Result<(), StreamEnd> {
        let from = e.get_attr("from").and_then(crate::domain_of);
        let to = e.get_attr("to").and_then(crate::domain_of);
        let (Some(from), Some(to)) = (from, to) else {
            return Err(StreamEnd::err(
                StreamError::ImproperAddressing,
                "stanzas between servers need valid 'from' and 'to'",
            ));
        };
        if !self.proven.contains(&(from.clone(), to.clone())) {
            if !self.fed.host.is_local(&to) {
                return Err(StreamEnd::err(
                    StreamError::HostUnknown,
                    format!("this server does not serve {to}"),
                ));
            }
            if self.proven.is_empty() {
                return Err(StreamEnd::err(
                    StreamError::NotAuthorized,
                    "no domain is authenticated on this stream",
                ));
            }
            return Err(StreamEnd::err(
                StreamError::InvalidFrom,
                format!("{from} is not authenticated on this stream"),
            ));
        }
        crate::translate_ns(&mut e, ns::SERVER, ns::CLIENT);
        self.fed.host.deliver(e).await;
        Ok(())
    }
}
