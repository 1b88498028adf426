//! The session task of a bound client: reads stanzas, stamps their true
//! `from`, hands them to the router; writes what the router sends it.

use std::collections::HashSet;
use std::sync::Arc;

use xmpp::element::Element;
use xmpp::error::StreamError;
use xmpp::jid::{FullJid, Jid};
use xmpp::stanza::{ns, MessageType, StanzaKind};
use xmpp::xml::Event;

use super::negotiate::{bind_result, Bound};
use super::stream::{ConnError, Stream};
use crate::modules::presence;
use crate::router;
use crate::sessions::{self, Outbound, SessionId};
use crate::Server;

/// Most queued stanzas written in one go (one TLS write, one syscall).
const WRITE_BATCH: usize = 64;

/// Unbinds the session however the task ends.
struct BoundGuard {
    server: Arc<Server>,
    jid: FullJid,
    id: SessionId,
}

impl Drop for BoundGuard {
    fn drop(&mut self) {
        if self.server.sessions.unbind(&self.jid, self.id) {
            tracing::debug!(jid = %self.jid, "session ended");
        }
    }
}

pub async fn run(s: &mut Stream, bound: Bound) -> Result<(), ConnError> {
    let server = s.server.clone();
    let (tx, mut rx) = sessions::queue(server.config.limits.session_queue);
    let (id, replaced) = server.sessions.bind(&bound.jid, tx, s.peer, s.io.is_tls());
    let _guard = BoundGuard {
        server: server.clone(),
        jid: bound.jid.clone(),
        id,
    };
    if let Some(old) = replaced {
        // RFC 6120 §7.7.2.2: the new session wins; the old one gets <conflict/>.
        let _ = old.tx.send(Outbound::Close(
            StreamError::Conflict,
            Some("replaced by a new connection for this resource".into()),
        ));
    }
    s.send(&bind_result(&bound.bind_iq, &bound.jid)).await?;
    tracing::debug!(jid = %bound.jid, peer = %s.peer, "session bound");
    // Directed presence sent to non-subscribers (RFC 6121 §4.6).
    let mut directed = HashSet::new();
    let result = serve(s, &server, &bound, id, &mut rx, &mut directed).await;
    // However the stream ended, contacts learn the session is gone (§4.5.2).
    presence::session_closed(&server, &bound.jid, id, &mut directed).await;
    server.sessions.unbind(&bound.jid, id);
    requeue(&server, &bound.jid, &mut rx).await;
    result
}

/// Messages still queued for a session that ended were never written to
/// the client: route them again now that the session is gone, so they
/// reach another resource or offline storage instead of being lost.
async fn requeue(server: &Server, me: &FullJid, rx: &mut sessions::Receiver) {
    rx.close();
    let own = me.bare().to_string();
    // An entry may hold several stanzas (offline delivery, roster pushes):
    // frame them as a stream would.
    let mut parser = xmpp::xml::StreamParser::new(server.config.limits.parser());
    parser.feed(
        b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>",
    );
    while let Some(o) = rx.try_recv() {
        let Outbound::Xml(xml) = o else { continue };
        if !xml.contains("<message") {
            continue;
        }
        parser.feed(xml.as_bytes());
        while let Ok(Some(ev)) = parser.next_event() {
            let xmpp::xml::Event::Element(m) = ev else {
                continue;
            };
            // Carbons copies (from our own bare JID) are not worth keeping.
            let chat = m.name == "message"
                && matches!(MessageType::of(&m), MessageType::Chat | MessageType::Normal);
            if chat && m.get_attr("from") != Some(own.as_str()) {
                router::route(server, m).await;
            }
        }
    }
}

async fn serve(
    s: &mut Stream,
    server: &Arc<Server>,
    bound: &Bound,
    id: SessionId,
    rx: &mut sessions::Receiver,
    directed: &mut HashSet<String>,
) -> Result<(), ConnError> {
    let mut shutdown = server.shutdown.subscribe();
    let mut out = String::with_capacity(1024);
    loop {
        while let Some(ev) = s.parse_buffered()? {
            match ev {
                Event::Element(e) => handle(server, &bound.jid, id, e, directed).await?,
                Event::StreamClose => return Err(ConnError::Closed),
                Event::StreamOpen(_) => {
                    return Err(ConnError::stream(
                        StreamError::NotWellFormed,
                        "unexpected stream header",
                    ))
                }
            }
        }
        tokio::select! {
            r = s.fill() => r?,
            msg = rx.recv() => {
                let Some(msg) = msg else { return Err(ConnError::Closed) };
                out.clear();
                let mut close = None;
                let mut next = Some(msg);
                let mut n = 0;
                while let Some(m) = next.take() {
                    match m {
                        Outbound::Xml(x) => out.push_str(&x),
                        Outbound::Close(e, t) => {
                            close = Some((e, t));
                            break;
                        }
                    }
                    n += 1;
                    if n < WRITE_BATCH {
                        next = rx.try_recv();
                    }
                }
                if !out.is_empty() {
                    let limit = server.config.limits.write_timeout();
                    match tokio::time::timeout(limit, s.write_raw(&out)).await {
                        Ok(r) => r?,
                        Err(_) => {
                            return Err(ConnError::stream(
                                StreamError::ConnectionTimeout,
                                "the client stopped reading",
                            ))
                        }
                    }
                }
                if rx.overflowed() {
                    // The router could not queue for this client: it reads
                    // too slowly. What it missed went to offline storage.
                    return Err(ConnError::stream(
                        StreamError::PolicyViolation,
                        "too many stanzas waiting; the client reads too slowly",
                    ));
                }
                if let Some((e, t)) = close {
                    return Err(ConnError::Stream(e, t));
                }
            }
            _ = shutdown.changed() => {
                return Err(ConnError::Stream(StreamError::SystemShutdown, None));
            }
        }
    }
}

/// One element from the client on a bound stream.
async fn handle(
    server: &Server,
    me: &FullJid,
    id: SessionId,
    mut e: Element,
    directed: &mut HashSet<String>,
) -> Result<(), ConnError> {
    let Some(kind) = StanzaKind::of(&e) else {
        if e.is("error", ns::STREAM) {
            return Err(ConnError::Closed);
        }
        return Err(ConnError::stream(
            StreamError::UnsupportedStanzaType,
            format!("<{}/> in {} is not a stanza", e.name, e.ns),
        ));
    };
    // RFC 6120 §8.1.2.1: the server stamps the full JID; a `from` naming
    // anyone else is refused (§4.9.3.9 invalid-from).
    if let Some(from) = e.get_attr("from") {
        let ok = match Jid::parse(from) {
            Ok(Jid::Full(f)) => &f == me,
            Ok(Jid::Bare(b)) => &b == me.bare(),
            Err(_) => false,
        };
        if !ok {
            return Err(ConnError::stream(
                StreamError::InvalidFrom,
                format!("you are {me}, not {from}"),
            ));
        }
    }
    e.set_attr("from", me.to_string());
    // Stanzas from the client are addressed in jabber:client; keep it so.
    e.ns = ns::CLIENT.to_owned();

    if kind == StanzaKind::Presence {
        if e.get_attr("to").is_none() {
            presence::broadcast(server, me, id, e, directed).await;
        } else {
            presence::outbound(server, me, e, directed).await;
        }
        return Ok(());
    }
    router::route(server, e).await;
    Ok(())
}
