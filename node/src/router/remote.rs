//! The router's side of the cluster: which other nodes hold a user's
//! sessions (from the replicated session table), handing stanzas to them,
//! and what this node does with stanzas and effects that arrive from the
//! cluster.
//!
//! Routing never forwards to this node itself: an entry of the table that
//! names this node but has no local session is a session that just ended,
//! and the delivery rules treat it as gone.

use std::collections::BTreeSet;
use std::sync::Arc;

use proto::{Delivery, Forwarded};
use tokio::sync::{mpsc, oneshot};
use xmpp::error::StreamError;
use xmpp::jid::{BareJid, FullJid};
use xmpp::stanza::ns;

use crate::cluster::state_machine::{Effect, SessionEntry};
use crate::cluster::Feeds;
use crate::modules::presence;
use crate::sessions::Outbound;
use crate::Server;

/// Other nodes holding a session of `user` for which `pred` holds.
pub fn nodes_of(server: &Server, user: &BareJid, pred: impl Fn(&SessionEntry) -> bool) -> Vec<u64> {
    let me = server.cluster.id;
    if server.cluster.table.only_on(me) {
        return Vec::new();
    }
    server.cluster.table.with_user(user, |entries| {
        let set: BTreeSet<u64> = entries
            .iter()
            .filter(|(_, e)| e.node != me && pred(e))
            .map(|(_, e)| e.node)
            .collect();
        set.into_iter().collect()
    })
}

/// The other node a full JID is bound on, if any.
pub fn node_of(server: &Server, full: &FullJid) -> Option<u64> {
    let me = server.cluster.id;
    if server.cluster.table.only_on(me) {
        return None;
    }
    server
        .cluster
        .table
        .get(full)
        .map(|e| e.node)
        .filter(|n| *n != me)
}

/// Hands one stanza to `node`.
pub fn forward(server: &Server, node: u64, delivery: Delivery, to: &str, from: &str, xml: &str) {
    let traceparent = if crate::telemetry::tracing_on() {
        forward_span(node, delivery)
    } else {
        String::new()
    };
    let f = Forwarded {
        delivery: delivery as i32,
        to: to.to_owned(),
        xml: prost::bytes::Bytes::copy_from_slice(xml.as_bytes()),
        from: from.to_owned(),
        traceparent,
    };
    match server.cluster.addr_of(node) {
        Some(addr) => server.cluster.forwarder.send(node, &addr, f),
        None => {
            tracing::warn!(node, "no address for a node of the session table");
            server.cluster.returned(f);
        }
    }
}

/// The `forward` span of a stanza handed to `node`, inside the span of
/// the stanza being routed, as the trace context the stanza carries
/// there (README "Traces"). Empty outside a traced stanza, e.g. for the
/// presence an applied Raft entry sends.
fn forward_span(node: u64, delivery: Delivery) -> String {
    let parent = tracing::Span::current();
    if !parent
        .metadata()
        .is_some_and(|m| m.target().starts_with("node::"))
    {
        return String::new();
    }
    let span =
        tracing::info_span!(parent: &parent, "forward", node, delivery = delivery.as_str_name());
    crate::telemetry::traceparent(&span)
}

/// The `deliver` span of a stanza from another node that carries the
/// context of a sampled trace: the sender's `forward` span is its parent.
fn deliver_span(f: &Forwarded, returned: bool) -> tracing::Span {
    if f.traceparent.is_empty() || !crate::telemetry::tracing_on() {
        return tracing::Span::none();
    }
    let kind = ["message", "presence", "iq"]
        .into_iter()
        .find(|k| f.xml.get(1..).is_some_and(|x| x.starts_with(k.as_bytes())))
        .unwrap_or("");
    let delivery = Delivery::try_from(f.delivery).unwrap_or(Delivery::Full);
    let span = tracing::info_span!(
        "deliver",
        kind,
        to = f.to.split('/').next().unwrap_or(""),
        delivery = delivery.as_str_name(),
        returned,
    );
    crate::telemetry::set_remote_parent(&span, &f.traceparent);
    span
}

/// Hands `xml` to the other node holding `full`; false when none does.
pub fn forward_to_full(server: &Server, full: &FullJid, delivery: Delivery, xml: &str) -> bool {
    match node_of(server, full) {
        Some(node) => {
            forward(server, node, delivery, &full.to_string(), "", xml);
            true
        }
        None => false,
    }
}

/// To every available resource of `user` on the other nodes.
pub fn to_available(server: &Server, user: &BareJid, xml: &str) -> usize {
    let nodes = nodes_of(server, user, |e| e.available);
    let to = user.to_string();
    for n in &nodes {
        forward(server, *n, Delivery::AllAvailable, &to, "", xml);
    }
    nodes.len()
}

/// A roster push for `user`'s interested resources on the other nodes.
pub fn to_interested(server: &Server, user: &BareJid, xml: &str) {
    to_every_node(server, user, Delivery::Interested, xml);
}

/// A blocklist push (XEP-0191 §3.3) for every resource of `user` on the
/// other nodes: `xml` is the `<block/>` or `<unblock/>` element.
pub fn to_all_resources(server: &Server, user: &BareJid, xml: &str) {
    to_every_node(server, user, Delivery::BlockPush, xml);
}

/// Hands `xml` for `user` to every other node holding any of its sessions.
fn to_every_node(server: &Server, user: &BareJid, delivery: Delivery, xml: &str) {
    let to = user.to_string();
    for n in nodes_of(server, user, |_| true) {
        forward(server, n, delivery, &to, "", xml);
    }
}

/// Asks the nodes holding `contact`'s available sessions for their
/// presence, to be sent to `from` (a full JID: that session only; a bare
/// JID: all its available resources).
pub fn probe(server: &Server, from: &str, contact: &BareJid) {
    let to = contact.to_string();
    for n in nodes_of(server, contact, |e| e.available) {
        forward(server, n, Delivery::Probe, &to, from, "");
    }
}

/// Full JIDs of `user`'s available sessions on the other nodes.
pub fn available_elsewhere(server: &Server, user: &BareJid) -> Vec<String> {
    let me = server.cluster.id;
    if server.cluster.table.only_on(me) {
        return Vec::new();
    }
    server.cluster.table.with_user(user, |entries| {
        entries
            .iter()
            .filter(|(_, e)| e.node != me && e.available)
            .map(|(r, _)| format!("{user}/{r}"))
            .collect()
    })
}

/// What a stanza from another node becomes here.
async fn deliver(server: &Server, f: Forwarded, returned: bool) {
    if let Some(f) = deliver_now(server, f, returned) {
        reroute(server, f).await;
    }
}

/// Delivers `f` at once where that needs no wait: everything but a
/// stanza whose session is gone, which comes back for `reroute`.
pub fn deliver_now(server: &Server, f: Forwarded, returned: bool) -> Option<Forwarded> {
    let delivery = Delivery::try_from(f.delivery).unwrap_or(Delivery::Full);
    let Ok(xml) = std::str::from_utf8(&f.xml) else {
        tracing::warn!(to = %f.to, "forwarded stanza is not UTF-8; dropped");
        return None;
    };
    match delivery {
        Delivery::Full | Delivery::FullOrDrop => {
            let Ok(full) = FullJid::parse(&f.to) else {
                return None;
            };
            if !returned {
                if let Some(tx) = server.sessions.sender(&full) {
                    if tx.send(Outbound::Xml(Arc::from(xml))).is_ok() {
                        server.metrics.routed(crate::metrics::Outcome::Local);
                        if delivery == Delivery::Full && xml.starts_with("<message") {
                            after_message(server, &full, xml);
                        }
                        return None;
                    }
                }
            }
            if delivery == Delivery::FullOrDrop {
                return None;
            }
            return Some(f);
        }
        Delivery::Carbons if !returned => {
            if let (Ok(user), Ok(wrapper)) = (
                BareJid::parse(&f.to),
                xmpp::xml::parse_element(xml, ns::CLIENT),
            ) {
                crate::modules::carbons::deliver_forwarded(server, &user, &f.from, &wrapper);
            }
        }
        Delivery::AllAvailable if !returned => {
            if let Ok(user) = BareJid::parse(&f.to) {
                presence::to_local_available(server, &user, &Arc::from(xml));
            }
        }
        Delivery::Interested if !returned => {
            if let (Ok(user), Ok(iq)) = (
                BareJid::parse(&f.to),
                xmpp::xml::parse_element(xml, ns::CLIENT),
            ) {
                crate::modules::roster::push_local(server, &user, &iq);
            }
        }
        Delivery::BlockPush if !returned => {
            if let (Ok(user), Ok(push)) = (
                BareJid::parse(&f.to),
                xmpp::xml::parse_element(xml, crate::modules::blocking::NS),
            ) {
                crate::modules::blocking::push_local(server, &user, &push);
            }
        }
        Delivery::Probe if !returned => {
            if let Ok(contact) = BareJid::parse(&f.to) {
                presence::answer_probe_locally(server, &contact, &f.from);
            }
        }
        // Broadcasts and probes to a node that is gone: its sessions are
        // gone with it, and its contacts learn that from NodeDown.
        _ => {}
    }
    None
}

/// A stanza for a full JID whose session is gone: the delivery rules
/// again, here (DESIGN.md step 3), so nothing is dropped silently.
async fn reroute(server: &Server, f: Forwarded) {
    let Ok(xml) = std::str::from_utf8(&f.xml) else {
        return;
    };
    match xmpp::xml::parse_element(xml, ns::CLIENT) {
        Ok(stanza) => super::reroute_here(server, stanza).await,
        Err(e) => tracing::warn!(error = %e, "unparsable forwarded stanza"),
    }
}

/// Delivers a batch from another node in order, as far as that needs no
/// wait; the rest, from the first stanza whose session is gone, is
/// returned for the consumer task (`run`), which keeps the order.
pub fn deliver_batch_now(server: &Server, batch: Vec<Forwarded>) -> Vec<Forwarded> {
    let mut it = batch.into_iter();
    while let Some(f) = it.next() {
        let span = deliver_span(&f, false);
        let left = span.in_scope(|| deliver_now(server, f, false));
        if let Some(f) = left {
            let mut rest = Vec::with_capacity(it.len() + 1);
            rest.push(f);
            rest.extend(it);
            return rest;
        }
    }
    Vec::new()
}

/// A message from another node reached `full` here: the delivery hooks
/// (carbons to the user's other devices) run here, where the delivery
/// happened. Parsed only when the user has another session somewhere.
fn after_message(server: &Server, full: &FullJid, xml: &str) {
    let user = full.bare();
    let others_here = server.sessions.with_resources(user, |rs| rs.len() > 1);
    if !others_here && nodes_of(server, user, |e| e.available).is_empty() {
        return;
    }
    if let Ok(stanza) = xmpp::xml::parse_element(xml, ns::CLIENT) {
        super::delivered(server, &stanza, user, &[full.resource()]);
    }
}

/// Effects of applied entries that concern this node's sessions.
async fn on_effect(server: &Arc<Server>, effect: Effect) {
    let me = (server.cluster.id, server.cluster.incarnation);
    match effect {
        Effect::SessionReplaced { jid, old } if (old.node, old.incarnation) == me => {
            if let Ok(full) = FullJid::parse(&jid) {
                if let Some(r) = server.sessions.get(&full).filter(|r| r.id == old.sid) {
                    // RFC 6120 §7.7.2.2: a newer session (on another node) won.
                    let _ = r.tx.send(Outbound::Close(
                        StreamError::Conflict,
                        Some("replaced by a new connection for this resource".into()),
                    ));
                }
            }
        }
        Effect::SessionsGone(list) => {
            for (jid, entry) in list {
                let Ok(full) = FullJid::parse(&jid) else {
                    continue;
                };
                if (entry.node, entry.incarnation) == me {
                    // The cluster counts this session gone (this node was
                    // declared down while cut off): close it, so the client
                    // reconnects and binds again, rather than serve a
                    // session the others do not know.
                    if let Some(r) = server.sessions.get(&full).filter(|r| r.id == entry.sid) {
                        let _ = r.tx.send(Outbound::Close(
                            StreamError::Reset,
                            Some(
                                "this node lost contact with the cluster or left it; reconnect"
                                    .into(),
                            ),
                        ));
                    }
                } else if entry.node != me.0 && entry.available {
                    presence::gone_elsewhere(server, &full);
                }
            }
        }
        Effect::AccountDeleted { user } => {
            // On whichever node the account was deleted through: its
            // sessions here go too (a deleted user routes nowhere).
            if let Ok(user) = BareJid::parse(&user) {
                server
                    .sessions
                    .close_user(&user, StreamError::NotAuthorized, "account deleted");
            }
        }
        Effect::OfflineStored { user } => {
            // The sender's node stored it while the user's initial presence
            // was still on its way: the node of the user's best session
            // (the same answer on every node, from the same table) hands
            // it over now rather than at the next login.
            let Ok(user) = BareJid::parse(&user) else {
                return;
            };
            let best = server.cluster.table.with_user(&user, |list| {
                list.iter()
                    .filter(|(_, e)| e.available && e.priority >= 0)
                    .max_by(|(ra, a), (rb, b)| {
                        a.priority
                            .cmp(&b.priority)
                            .then_with(|| b.node.cmp(&a.node))
                            .then_with(|| rb.cmp(ra))
                    })
                    .map(|(r, e)| (r.clone(), *e))
            });
            if let Some((resource, e)) = best {
                if (e.node, e.incarnation) == me {
                    if let Ok(full) = FullJid::parse(&format!("{user}/{resource}")) {
                        let server = server.clone();
                        tokio::spawn(async move {
                            crate::modules::offline::deliver_stored(&server, &full).await
                        });
                    }
                }
            }
        }
        other => {
            for m in server.modules.iter() {
                m.on_applied(server, &other);
            }
        }
    }
}

/// The node's consumer of everything the cluster hands it.
pub async fn run(
    server: Arc<Server>,
    mut feeds: Feeds,
    mut inbox: mpsc::Receiver<(Vec<Forwarded>, oneshot::Sender<()>)>,
) {
    loop {
        tokio::select! {
            Some((batch, done)) = inbox.recv() => {
                for f in batch {
                    let span = deliver_span(&f, false);
                    tracing::Instrument::instrument(deliver(&server, f, false), span).await;
                }
                let _ = done.send(());
            }
            Some(f) = feeds.returned.recv() => {
                let span = deliver_span(&f, true);
                tracing::Instrument::instrument(deliver(&server, f, true), span).await;
            }
            Some(e) = feeds.effects.recv() => on_effect(&server, e).await,
            else => return,
        }
    }
}
