//! Presence (RFC 6121 §4) and subscriptions (§3): broadcast along the
//! roster, answers to probes, directed presence, unavailable on behalf of
//! a session that ends, and the subscription handshake with both sides of
//! a local contact committed in one command.
//!
//! Contacts on other domains get the broadcast, probes and subscription
//! stanzas over s2s ([`crate::federation`]); their inbound subscription
//! stanzas go through the same state machine (the contact's-server side,
//! RFC 6121 §3) in [`inbound_subscription`], and their probes are answered
//! by [`remote_probe`].

use std::collections::HashSet;
use std::sync::Arc;

use xmpp::element::{Element, Node};
use xmpp::error::StanzaError;
use xmpp::jid::{BareJid, FullJid, Jid};
use xmpp::roster::SubKind;
use xmpp::stanza::{ns, presence_priority, PresenceType};

use super::{blocking, roster, Module};
use crate::cluster::state_machine::{ApplyError, Command, Direction, Refusal, Response};
use crate::router;
use crate::sessions::{Outbound, SessionId};
use crate::Server;

pub struct Presence;

/// Most JIDs one session's directed presence is remembered for (§4.6).
const MAX_DIRECTED: usize = 1000;

impl Module for Presence {
    fn name(&self) -> &'static str {
        "presence"
    }
}

fn xml(e: &Element) -> Arc<str> {
    Arc::from(e.to_string_in(ns::CLIENT))
}

/// Sends to every available resource of a local user, on every node.
pub(crate) fn to_available(server: &Server, user: &BareJid, xml: &Arc<str>) {
    to_local_available(server, user, xml);
    router::remote::to_available(server, user, xml);
}

/// Sends to the user's available resources on this node; returns how many.
pub(crate) fn to_local_available(server: &Server, user: &BareJid, xml: &Arc<str>) -> usize {
    server.sessions.with_resources(user, |rs| {
        rs.iter()
            .filter(|r| r.available)
            .filter(|r| r.tx.send(Outbound::Xml(xml.clone())).is_ok())
            .count()
    })
}

fn to_session(server: &Server, full: &FullJid, xml: Arc<str>) {
    if let Some(r) = server.sessions.get(full) {
        let _ = r.tx.send(Outbound::Xml(xml));
    }
}

fn with_to(stanza: &Element, to: &str) -> Element {
    let mut e = stanza.clone();
    e.set_attr("to", to);
    e
}

fn is_local(server: &Server, jid: &BareJid) -> bool {
    jid.node().is_some() && server.config.is_local_domain(jid.domain())
}

/// The current presence of every available resource of `contact`, sent to
/// `user`'s available resources (§3.1.5 after approval, §4.3 probes).
pub(crate) fn send_current_presence(server: &Server, contact: &BareJid, user: &BareJid) {
    if blocked_either_way(server, contact, user) {
        return;
    }
    router::remote::probe(server, &user.to_string(), contact);
    current_presence_here(server, contact, user);
}

fn current_presence_here(server: &Server, contact: &BareJid, user: &BareJid) {
    for r in server.sessions.resources(contact) {
        if let (true, Some(p)) = (r.available, &r.presence) {
            let mut e = match xmpp::xml::parse_element(p, ns::CLIENT) {
                Ok(e) => e,
                Err(_) => continue,
            };
            e.set_attr("to", user.to_string());
            to_available(server, user, &xml(&e));
        }
    }
}

/// Unavailable from every available resource of `contact` to `user`
/// (§3.2.3, §3.3.3: a subscription ended).
fn send_unavailable(server: &Server, contact: &BareJid, user: &BareJid) {
    let mut from: Vec<String> = server
        .sessions
        .resources(contact)
        .into_iter()
        .filter(|r| r.available)
        .map(|r| format!("{contact}/{}", r.resource))
        .collect();
    from.extend(router::remote::available_elsewhere(server, contact));
    for f in from {
        let e = Element::new("presence", ns::CLIENT)
            .attr("type", "unavailable")
            .attr("from", f)
            .attr("to", user.to_string());
        to_available(server, user, &xml(&e));
    }
}

/// A probe from another node (see `router::remote::probe`): the presence
/// of `contact`'s available sessions here, to `from` (a full JID: that
/// session; a bare JID: all its available resources).
pub(crate) fn answer_probe_locally(server: &Server, contact: &BareJid, from: &str) {
    let presences: Vec<Arc<str>> = server
        .sessions
        .resources(contact)
        .into_iter()
        .filter(|r| r.available)
        .filter_map(|r| r.presence)
        .collect();
    if presences.is_empty() {
        return;
    }
    match Jid::parse(from) {
        Ok(Jid::Full(full)) => {
            for p in presences {
                router::deliver_reply_xml(server, &full, p);
            }
        }
        Ok(Jid::Bare(user)) => {
            for p in presences {
                let mut e = match xmpp::xml::parse_element(&p, ns::CLIENT) {
                    Ok(e) => e,
                    Err(_) => continue,
                };
                e.set_attr("to", user.to_string());
                to_available(server, &user, &xml(&e));
            }
        }
        Err(_) => {}
    }
}

/// A session on another node is gone without saying so (its node died):
/// `unavailable` on its behalf to its subscribers here (RFC 6121 §4.5.2).
pub(crate) fn gone_elsewhere(server: &Server, full: &FullJid) {
    let user = full.bare();
    let unavailable = Element::new("presence", ns::CLIENT)
        .attr("type", "unavailable")
        .attr("from", full.to_string());
    for (c, contact) in local_subscribers(server, user) {
        to_local_available(server, &contact, &xml(&with_to(&unavailable, &c)));
    }
    let own = xml(&with_to(&unavailable, &user.to_string()));
    to_local_available(server, user, &own);
}

/// Presence does not flow between a user and someone either of them blocks
/// (XEP-0191 §3.3), whatever the subscription says.
pub(crate) fn blocked_either_way(server: &Server, a: &BareJid, b: &BareJid) -> bool {
    blocking::blocks(server, a, &Jid::Bare(b.clone()))
        || blocking::blocks(server, b, &Jid::Bare(a.clone()))
}

pub(crate) fn has_to(server: &Server, user: &BareJid, contact: &BareJid) -> bool {
    server
        .store()
        .roster_item(&user.to_string(), &contact.to_string())
        .ok()
        .flatten()
        .is_some_and(|i| i.sub.subscription.has_to())
}

/// Applies the pushes and deliveries one side's subscription change asks for.
fn after_side(
    server: &Server,
    user: &BareJid,
    contact: &str,
    response: &Response,
    deliver: Option<&Arc<str>>,
) {
    if let Response::Subscription {
        transition,
        ver,
        item,
    } = response
    {
        if transition.changed {
            if let Some(item) = item {
                roster::push(server, user, *ver, contact, Some(item));
            }
        }
        if let (true, Some(x)) = (transition.forward, deliver) {
            to_available(server, user, x);
        }
    }
}

/// The subscription stanza `from` → `to` as stored and delivered (§3.1.2:
/// bare JIDs on both ends), with the element children of `original`.
fn subscription_stanza(
    server: &Server,
    from: &str,
    to: &str,
    kind: SubKind,
    original: Option<&Element>,
) -> (Element, Arc<str>) {
    let mut stanza = Element::new("presence", ns::CLIENT)
        .attr("from", from)
        .attr("to", to)
        .attr("type", kind.as_str());
    if let Some(o) = original {
        stanza.children = o
            .children
            .iter()
            .filter(|n| matches!(n, Node::Element(_)))
            .cloned()
            .collect();
    }
    let mut stanza_xml = xml(&stanza);
    // Kept until answered, possibly for ever and once per stranger: a
    // request larger than its budget keeps only what makes it a request.
    if stanza_xml.len() > server.config.limits.max_subscription_request_bytes {
        stanza.children.clear();
        stanza_xml = xml(&stanza);
    }
    (stanza, stanza_xml)
}

/// A subscription stanza from `user` about `contact` (RFC 6121 §3),
/// `original` carrying the status text the user gave.
pub async fn subscription(
    server: &Server,
    user: &BareJid,
    contact: &BareJid,
    kind: SubKind,
    original: Option<&Element>,
) {
    // XEP-0191 §3.4: nothing from a blocked user reaches the one who
    // blocked them, subscription requests included. (The blocker's own
    // cancellations still go through, so both rosters stay consistent.)
    if is_local(server, contact) && blocking::blocks(server, contact, &Jid::Bare(user.clone())) {
        return;
    }
    let u = user.to_string();
    let c = contact.to_string();
    // §3.1.2: stamped with bare JIDs on both ends.
    let (stanza, stanza_xml) = subscription_stanza(server, &u, &c, kind, original);
    let local = is_local(server, contact);
    let contact_had_from = !local && has_from(server, user, contact);
    let (user_had_to, contact_had_to) = (
        has_to(server, user, contact),
        local && has_to(server, contact, user),
    );
    let cmd = if local {
        Command::SubscriptionLocal {
            from: u.clone(),
            to: c.clone(),
            kind,
            stanza: stanza_xml.to_string(),
        }
    } else {
        Command::Subscription {
            user: u.clone(),
            contact: c.clone(),
            direction: Direction::Outbound,
            kind,
            stanza: None,
        }
    };
    let response = match server
        .cluster
        .write(cmd.limited(&server.config.limits))
        .await
    {
        Ok(r) => r,
        Err(ApplyError::Refused(Refusal::RosterFull(_, max))) => {
            // RFC 6121 §3.1.2 leaves the answer to the server: the user
            // learns why, the contact is not asked.
            tracing::info!(%user, %contact, max, "subscription refused: the roster is full");
            let text = format!("your roster is full ({max} contacts)");
            if let Some(error) =
                xmpp::stanza::error_reply(&stanza, StanzaError::ResourceConstraint, Some(&text))
            {
                to_available(server, user, &xml(&error));
            }
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, %user, %contact, "subscription change failed");
            return;
        }
    };
    match &response {
        Response::Batch(parts) => {
            if let Some(sender) = parts.first() {
                after_side(server, user, &c, sender, None);
            }
            if let Some(recipient) = parts.get(1) {
                after_side(server, contact, &u, recipient, Some(&stanza_xml));
            }
            if let Some(reply) = parts.get(2) {
                // The contact's server answered for the contact (§3.1.3).
                let answer = Element::new("presence", ns::CLIENT)
                    .attr("from", c.as_str())
                    .attr("to", u.as_str())
                    .attr("type", SubKind::Subscribed.as_str());
                after_side(server, user, &c, reply, Some(&xml(&answer)));
            }
        }
        Response::Subscription { transition, .. } => {
            after_side(server, user, &c, &response, None);
            if transition.forward {
                router::route(server, stanza).await;
            }
        }
        _ => {}
    }
    if !local && contact.node().is_some() && !server.config.is_local_domain(contact.domain()) {
        // §3.1.5 / §3.2.3: approving a remote contact sends it our
        // presence; cancelling its subscription sends it unavailable.
        match (contact_had_from, has_from(server, user, contact)) {
            (false, true) => presence_to_remote(server, user, &Jid::Bare(contact.clone())),
            (true, false) => unavailable_to_remote(server, user, contact),
            _ => {}
        }
    }
    if local {
        let (user_has_to, contact_has_to) =
            (has_to(server, user, contact), has_to(server, contact, user));
        match (user_had_to, user_has_to) {
            (false, true) => send_current_presence(server, contact, user),
            (true, false) => send_unavailable(server, contact, user),
            _ => {}
        }
        match (contact_had_to, contact_has_to) {
            (false, true) => send_current_presence(server, user, contact),
            (true, false) => send_unavailable(server, user, contact),
            _ => {}
        }
    }
}

/// Presence without `to` from a session: its own availability, broadcast
/// to subscribers and the user's other resources (§4.2, §4.4, §4.5).
pub async fn broadcast(
    server: &Server,
    me: &FullJid,
    id: SessionId,
    stanza: Element,
    directed: &mut HashSet<String>,
) {
    match PresenceType::of(&stanza) {
        Some(PresenceType::Available) => {
            let own = xml(&stanza);
            let priority = presence_priority(&stanza);
            in_table(server, me, id, true, priority).await;
            let was_available = server
                .sessions
                .set_presence(me, id, true, priority, Some(own));
            to_subscribers(server, me, &stanza);
            if !was_available {
                initial(server, me);
            }
            for m in server.modules.iter() {
                m.on_presence_available(server, me, !was_available).await;
            }
        }
        Some(PresenceType::Unavailable) => {
            in_table(server, me, id, false, 0).await;
            let was_available = server.sessions.set_presence(me, id, false, 0, None);
            to_subscribers(server, me, &stanza);
            if was_available {
                let status = stanza.child_text("status", ns::CLIENT);
                for m in server.modules.iter() {
                    m.on_unavailable(server, me, status.clone()).await;
                }
            }
            for to in directed.drain() {
                router::route(server, with_to(&stanza, &to)).await;
            }
        }
        _ => router::bounce(
            server,
            &stanza,
            StanzaError::BadRequest,
            Some("this presence type needs a 'to'"),
        ),
    }
}

/// Contacts as (JID string, JID).
type Contacts = Vec<(String, BareJid)>;

/// The user's contacts subscribed to the user's presence (`from`/`both`),
/// as (JID string, JID): those on our domains, then those on others.
fn subscribers(server: &Server, user: &BareJid) -> (Contacts, Contacts) {
    let roster = server.store().roster(&user.to_string()).unwrap_or_default();
    roster
        .into_iter()
        .filter(|(_, item)| item.sub.subscription.has_from())
        .filter_map(|(c, _)| BareJid::parse(&c).ok().map(|j| (c, j)))
        .partition(|(_, j)| is_local(server, j))
}

fn local_subscribers(server: &Server, user: &BareJid) -> Contacts {
    subscribers(server, user).0
}

/// The current presence of `user`'s available resources here, to a
/// contact on another domain (§4.3.2 probe answers, §3.1.5 approval).
fn presence_to_remote(server: &Server, user: &BareJid, to: &Jid) {
    for r in server.sessions.resources(user) {
        if let (true, Some(p)) = (r.available, &r.presence) {
            if let Ok(mut e) = xmpp::xml::parse_element(p, ns::CLIENT) {
                e.set_attr("from", format!("{user}/{}", r.resource));
                e.set_attr("to", to.to_string());
                crate::federation::route_remote(server, e, to.domain());
            }
        }
    }
}

/// Unavailable from each of `user`'s available resources here to a remote
/// contact (§3.2.3, §3.3.3: it no longer may see the user's presence).
fn unavailable_to_remote(server: &Server, user: &BareJid, to: &BareJid) {
    for r in server.sessions.resources(user) {
        if r.available {
            let e = Element::new("presence", ns::CLIENT)
                .attr("type", "unavailable")
                .attr("from", format!("{user}/{}", r.resource))
                .attr("to", to.to_string());
            crate::federation::route_remote(server, e, to.domain());
        }
    }
}

/// A probe from another domain (§4.3.2): answered only when the prober is
/// subscribed to the user and neither blocks the other.
pub(crate) fn remote_probe(server: &Server, user: &BareJid, from: &Jid) {
    if user.node().is_none() || !server.config.is_local_domain(user.domain()) {
        return;
    }
    if has_from(server, user, from.bare()) && !blocked_either_way(server, user, from.bare()) {
        presence_to_remote(server, user, from);
    }
}

/// A subscription stanza from a contact on another domain about one of
/// our users: the contact's-server side of RFC 6121 §3 (§3.1.3, §3.2.2,
/// §3.3.2, §3.4.2), stored for offline users like a local request.
pub(crate) async fn inbound_subscription(
    server: &Server,
    user: &BareJid,
    contact: &BareJid,
    kind: SubKind,
    original: &Element,
) {
    if !is_local(server, user) {
        return;
    }
    let (u, c) = (user.to_string(), contact.to_string());
    let exists = server.store().account(user).ok().flatten().is_some();
    if !exists {
        // §3.1.3: a request for no such user is answered `unsubscribed`.
        if kind == SubKind::Subscribe {
            let answer = Element::new("presence", ns::CLIENT)
                .attr("from", u.as_str())
                .attr("to", c.as_str())
                .attr("type", SubKind::Unsubscribed.as_str());
            crate::federation::route_remote(server, answer, contact.domain());
        }
        return;
    }
    // XEP-0191 §3.4: nothing from a blocked JID reaches the blocker.
    if blocking::blocks(server, user, &Jid::Bare(contact.clone())) {
        return;
    }
    let (_, stanza_xml) = subscription_stanza(server, &c, &u, kind, Some(original));
    let had_from = has_from(server, user, contact);
    let cmd = Command::Subscription {
        user: u.clone(),
        contact: c.clone(),
        direction: Direction::Inbound,
        kind,
        stanza: Some(stanza_xml.to_string()),
    };
    let response = match server
        .cluster
        .write(cmd.limited(&server.config.limits))
        .await
    {
        Ok(r) => r,
        Err(ApplyError::Refused(Refusal::RosterFull(_, max))) => {
            // Debug, not info: one event per stanza a remote server sends.
            tracing::debug!(%user, %contact, max, "remote subscription request dropped: the roster is full");
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, %user, %contact, "remote subscription change failed");
            return;
        }
    };
    after_side(server, user, &c, &response, Some(&stanza_xml));
    if let Response::Subscription {
        transition:
            xmpp::roster::Transition {
                auto_reply: Some(reply),
                ..
            },
        ..
    } = &response
    {
        // The user approved in advance (§3.4): the server answers.
        let answer = Element::new("presence", ns::CLIENT)
            .attr("from", u.as_str())
            .attr("to", c.as_str())
            .attr("type", reply.as_str());
        crate::federation::route_remote(server, answer, contact.domain());
    }
    match (had_from, has_from(server, user, contact)) {
        (false, true) => presence_to_remote(server, user, &Jid::Bare(contact.clone())),
        (true, false) => unavailable_to_remote(server, user, contact),
        _ => {}
    }
}

/// Availability and priority into the replicated session table, when they
/// changed (status texts alone are not replicated: DESIGN.md).
async fn in_table(server: &Server, me: &FullJid, id: SessionId, available: bool, priority: i8) {
    let current = server.cluster.table.get(me);
    if current.is_some_and(|e| (e.available, e.priority) != (available, priority)) {
        crate::c2s::session::presence_in_table(server, me, id, available, priority).await;
    }
}

/// To every contact subscribed to the user (`from`/`both`) and to all of
/// the user's available resources, the sender's own included.
fn to_subscribers(server: &Server, me: &FullJid, stanza: &Element) {
    let user = me.bare();
    let (local, remote) = subscribers(server, user);
    for (c, contact) in local {
        if blocked_either_way(server, user, &contact) {
            continue;
        }
        to_available(server, &contact, &xml(&with_to(stanza, &c)));
    }
    for (c, contact) in remote.into_iter().filter(|_| server.s2s.is_some()) {
        if !blocking::blocks(server, user, &Jid::Bare(contact.clone())) {
            crate::federation::route_remote(server, with_to(stanza, &c), contact.domain());
        }
    }
    // RFC 6121 §4.2.2, §4.4.2, §4.5.2: to all of the user's available
    // resources, including the one that sent it (clients such as
    // slixmpp's avatar flow wait for their own presence to come back).
    let own = xml(&with_to(stanza, &user.to_string()));
    for r in server.sessions.resources(user) {
        if r.available || r.resource == me.resource() {
            let _ = r.tx.send(Outbound::Xml(own.clone()));
        }
    }
    router::remote::to_available(server, user, &own);
}

/// After initial presence (§4.2.2): the presence of contacts the user is
/// subscribed to (probes answered locally), of the user's other resources,
/// and subscription requests still waiting for an answer (§3.1.3).
fn initial(server: &Server, me: &FullJid) {
    let user = me.bare();
    // Collected into one queue entry: this runs in the session's own task.
    let mut out: Vec<Arc<str>> = Vec::new();
    let roster = server.store().roster(&user.to_string()).unwrap_or_default();
    for (c, item) in &roster {
        let Ok(contact) = BareJid::parse(c) else {
            continue;
        };
        if item.sub.subscription.has_to()
            && server.s2s.is_some()
            && !is_local(server, &contact)
            && contact.node().is_some()
            && !blocking::blocks(server, user, &Jid::Bare(contact.clone()))
        {
            // §4.2.2: a probe to a contact on another domain.
            let probe = Element::new("presence", ns::CLIENT)
                .attr("type", "probe")
                .attr("from", user.to_string())
                .attr("to", c.as_str());
            crate::federation::route_remote(server, probe, contact.domain());
        }
        if item.sub.subscription.has_to()
            && is_local(server, &contact)
            && !blocked_either_way(server, user, &contact)
        {
            router::remote::probe(server, &me.to_string(), &contact);
            for r in server.sessions.resources(&contact) {
                if let (true, Some(p)) = (r.available, &r.presence) {
                    out.push(p.clone());
                }
            }
        }
        if let Some(request) = &item.pending_request {
            if !blocking::blocks(server, user, &Jid::Bare(contact.clone())) {
                out.push(Arc::from(request.as_str()));
            }
        }
    }
    for r in server.sessions.resources(user) {
        if let (true, Some(p)) = (r.available && r.resource != me.resource(), &r.presence) {
            out.push(p.clone());
        }
    }
    router::remote::probe(server, &me.to_string(), user);
    if let (false, Some(r)) = (out.is_empty(), server.sessions.get(me)) {
        let _ = r.tx.send(Outbound::Batch(out));
    }
}

/// Presence with a `to` from a session: subscriptions, probes, directed presence.
pub async fn outbound(
    server: &Server,
    me: &FullJid,
    stanza: Element,
    directed: &mut HashSet<String>,
) {
    let Some(ptype) = PresenceType::of(&stanza) else {
        return router::bounce(
            server,
            &stanza,
            StanzaError::BadRequest,
            Some("unknown presence type"),
        );
    };
    let Some(to) = stanza.get_attr("to").and_then(|t| Jid::parse(t).ok()) else {
        return router::bounce(server, &stanza, StanzaError::JidMalformed, None);
    };
    let kind = match ptype {
        PresenceType::Subscribe => Some(SubKind::Subscribe),
        PresenceType::Subscribed => Some(SubKind::Subscribed),
        PresenceType::Unsubscribe => Some(SubKind::Unsubscribe),
        PresenceType::Unsubscribed => Some(SubKind::Unsubscribed),
        _ => None,
    };
    if let Some(kind) = kind {
        if to.node().is_none() {
            return router::bounce(
                server,
                &stanza,
                StanzaError::BadRequest,
                Some("subscribe to a user, not a server"),
            );
        }
        return subscription(server, me.bare(), to.bare(), kind, Some(&stanza)).await;
    }
    match ptype {
        PresenceType::Probe => {
            // §4.3.2: answered only to subscribers.
            let contact = to.bare();
            if is_local(server, contact)
                && has_from(server, contact, me.bare())
                && !blocked_either_way(server, contact, me.bare())
            {
                for r in server.sessions.resources(contact) {
                    if let (true, Some(p)) = (r.available, &r.presence) {
                        to_session(server, me, p.clone());
                    }
                }
                router::remote::probe(server, &me.to_string(), contact);
            }
        }
        PresenceType::Available | PresenceType::Unavailable => {
            if blocking::blocks(server, me.bare(), &to) {
                return;
            }
            // §4.6: remember directed presence to non-subscribers, so they
            // get unavailable when the session ends.
            if !has_from(server, me.bare(), to.bare()) {
                let key = to.to_string();
                if ptype == PresenceType::Available {
                    // Bounded: a session cannot make the server remember
                    // (and later notify) an unlimited number of JIDs.
                    if directed.len() < MAX_DIRECTED {
                        directed.insert(key);
                    }
                } else {
                    directed.remove(&key);
                }
            }
            router::route(server, stanza).await;
        }
        _ => router::route(server, stanza).await,
    }
}

pub(crate) fn has_from(server: &Server, user: &BareJid, contact: &BareJid) -> bool {
    server
        .store()
        .roster_item(&user.to_string(), &contact.to_string())
        .ok()
        .flatten()
        .is_some_and(|i| i.sub.subscription.has_from())
}

/// The session ended (cleanly or not): unavailable on its behalf (§4.5.2)
/// if it was available, and to everyone it sent directed presence to.
pub async fn session_closed(
    server: &Server,
    me: &FullJid,
    id: SessionId,
    directed: &mut HashSet<String>,
) {
    let was_available = server.sessions.set_presence(me, id, false, 0, None);
    let unavailable = Element::new("presence", ns::CLIENT)
        .attr("type", "unavailable")
        .attr("from", me.to_string());
    if was_available {
        to_subscribers(server, me, &unavailable);
        for m in server.modules.iter() {
            m.on_unavailable(server, me, None).await;
        }
    }
    for to in directed.drain() {
        router::route(server, with_to(&unavailable, &to)).await;
    }
}
