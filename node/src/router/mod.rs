//! Where every stanza goes (DESIGN.md, "The life of a stanza"): the server
//! itself (a module), a local session, a session on another node, or
//! another domain over s2s. The delivery rules are RFC 6121 §8.5.
//!
//! The router never trusts `from`: the session task has already stamped it
//! with the sender's full JID.
//!
//! A user's sessions may live on several nodes: this node's own are in
//! [`crate::sessions`], the others' in the replicated session table, and
//! [`remote`] hands stanzas to them.

pub mod remote;

use std::sync::Arc;

use proto::Delivery;

use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::jid::{BareJid, FullJid, Jid};
use xmpp::stanza::{error_reply, iq_payload, ns, IqType, MessageType, PresenceType, StanzaKind};

use crate::metrics::Outcome;
use crate::modules::{IqRequest, IqTarget, RouteCheck};
use crate::sessions::{Outbound, Resource};
use crate::Server;

/// How a stanza is being routed.
#[derive(Clone, Copy)]
struct Pass {
    /// Not a retry: the sender's devices get their `<sent/>` copies.
    first_time: bool,
    /// Sessions on other nodes may receive it. Off for a stanza that came
    /// back from another node (its session was gone there, or the node
    /// could not be reached), so the rules end here instead of looping.
    cluster: bool,
}

/// Routes a stanza whose `from` is trustworthy.
pub async fn route(server: &Server, stanza: Element) {
    let pass = Pass {
        first_time: true,
        cluster: true,
    };
    route_with(server, stanza, pass).await
}

/// Routes a stanza again whose first delivery failed (its session ended
/// first): the sender's devices already had their `<sent/>` copies.
pub async fn reroute(server: &Server, stanza: Element) {
    let pass = Pass {
        first_time: false,
        cluster: true,
    };
    route_with(server, stanza, pass).await
}

/// The delivery rules for a stanza another node could not deliver, with
/// this node's sessions and storage only.
pub async fn reroute_here(server: &Server, stanza: Element) {
    let pass = Pass {
        first_time: false,
        cluster: false,
    };
    route_with(server, stanza, pass).await
}

async fn route_with(server: &Server, mut stanza: Element, pass: Pass) {
    let first_time = pass.first_time;
    let Some(kind) = StanzaKind::of(&stanza) else {
        return;
    };
    let to = match stanza.get_attr("to") {
        Some(to) => match Jid::parse(to) {
            Ok(j) => j,
            Err(e) => {
                let text = format!("bad 'to' address: {e}");
                return bounce(server, &stanza, StanzaError::JidMalformed, Some(&text));
            }
        },
        // RFC 6120 §10.3: no `to` means the sender's own account.
        None => match stanza.get_attr("from").and_then(|f| Jid::parse(f).ok()) {
            Some(from) => Jid::Bare(from.bare().clone()),
            None => return,
        },
    };
    // Parsed once: every hook below is handed this one.
    let from = stanza.get_attr("from").and_then(|f| Jid::parse(f).ok());
    if let Some(from) = &from {
        for m in server.modules.iter() {
            match m.check_route(server, &stanza, from, &to) {
                RouteCheck::Pass => {}
                RouteCheck::Drop => return,
                RouteCheck::Refuse(condition, extra) => {
                    server.metrics.routed(Outcome::Error);
                    if let Some(mut reply) = error_reply(&stanza, condition, None) {
                        if let (Some(extra), Some(err)) =
                            (extra, reply.get_child_mut("error", &stanza.ns))
                        {
                            err.children.push(xmpp::element::Node::Element(extra));
                        }
                        deliver_reply(server, reply);
                    }
                    return;
                }
            }
        }
    }
    if let (true, Some(from)) = (first_time && kind != StanzaKind::Iq, &from) {
        if let (StanzaKind::Message, Jid::Full(full)) = (kind, from) {
            if server.config.is_local_domain(full.domain()) {
                for m in server.modules.iter() {
                    m.on_message_sent(server, full, &stanza);
                }
            }
        }
        for m in server.modules.iter() {
            if kind == StanzaKind::Message {
                m.before_message_routed(server, &mut stanza, from, &to)
                    .await;
            } else {
                m.on_presence_routed(server, &stanza, from, &to);
            }
        }
    }
    if !server.config.is_local_domain(to.domain()) {
        // A component of ours (group chat): the module that owns it.
        if let Some(m) = server
            .modules
            .iter()
            .find(|m| m.owns_domain(server, to.domain()))
        {
            if let Some(from) = from {
                server.metrics.routed(Outcome::Local);
                m.handle_component(server, stanza, from, to).await;
            }
            return;
        }
        // Another domain: over s2s (DESIGN.md, "The life of a stanza").
        server.metrics.routed(Outcome::S2s);
        let remote = to.domain().to_owned();
        return crate::federation::route_remote(server, stanza, &remote);
    }
    match kind {
        StanzaKind::Message => route_message(server, stanza, to, pass).await,
        StanzaKind::Presence => route_presence(server, stanza, to, pass),
        StanzaKind::Iq => route_iq(server, stanza, to, pass).await,
    }
}

/// Sends an error reply to the stanza's sender, unless it is an error itself.
pub fn bounce(server: &Server, stanza: &Element, condition: StanzaError, text: Option<&str>) {
    server.metrics.routed(Outcome::Error);
    if let Some(reply) = error_reply(stanza, condition, text) {
        deliver_reply(server, reply);
    }
}

/// Delivers a reply generated by the server (IQ results, errors) to a full
/// JID. Replies are never stored offline and never bounced.
pub fn deliver_reply(server: &Server, reply: Element) {
    let remote = reply
        .get_attr("to")
        .and_then(|t| Jid::parse(t).ok())
        .map(|j| j.domain().to_owned())
        .filter(|d| !server.config.is_local_domain(d));
    if let Some(remote) = remote {
        return crate::federation::route_remote(server, reply, &remote);
    }
    let Some(to) = reply.get_attr("to").and_then(|t| FullJid::parse(t).ok()) else {
        return;
    };
    deliver_reply_xml(server, &to, serialize(&reply));
}

/// Delivers serialised server-made XML to a full JID on any node.
pub fn deliver_reply_xml(server: &Server, to: &FullJid, xml: Arc<str>) {
    if let Some(tx) = server.sessions.sender(to) {
        let _ = tx.send(Outbound::Xml(xml));
    } else {
        remote::forward_to_full(server, to, Delivery::FullOrDrop, &xml);
    }
}

/// Hands a stanza to the node holding `full`, if another node does
/// (serialised only then).
fn forward_full(
    server: &Server,
    full: &FullJid,
    stanza: &Element,
    pass: Pass,
    delivery: Delivery,
) -> bool {
    let node = match remote::node_of(server, full) {
        Some(node) if pass.cluster => node,
        _ => return false,
    };
    let xml = serialize(stanza);
    remote::forward(server, node, delivery, &full.to_string(), "", &xml);
    server.metrics.routed(Outcome::OtherNode);
    true
}

fn serialize(stanza: &Element) -> Arc<str> {
    Arc::from(stanza.to_string_in(ns::CLIENT))
}

/// Sends to each resource; returns how many took it.
fn send_to(resources: &[&Resource], xml: &Arc<str>) -> usize {
    resources
        .iter()
        .filter(|r| r.tx.send(Outbound::Xml(xml.clone())).is_ok())
        .count()
}

/// RFC 6121 §8.5.2.1.1: the available resources with the highest
/// non-negative priority. Negative priority never receives bare-JID
/// messages; several resources sharing the top priority all receive it.
pub fn highest_priority(resources: &[Resource]) -> Vec<&Resource> {
    let eligible = || resources.iter().filter(|r| r.available && r.priority >= 0);
    let Some(top) = eligible().map(|r| r.priority).max() else {
        return Vec::new();
    };
    eligible().filter(|r| r.priority == top).collect()
}

async fn route_message(server: &Server, stanza: Element, to: Jid, pass: Pass) {
    let mtype = MessageType::of(&stanza);
    let bare = match &to {
        Jid::Full(full) => {
            if let Some(tx) = server.sessions.sender(full) {
                if tx.send(Outbound::Xml(serialize(&stanza))).is_ok() {
                    server.metrics.routed(Outcome::Local);
                    delivered(server, &stanza, full.bare(), &[full.resource()]);
                    return;
                }
            }
            if forward_full(server, full, &stanza, pass, Delivery::Full) {
                return;
            }
            // RFC 6121 §8.5.3.2.1: no such resource.
            match mtype {
                MessageType::Groupchat => {
                    return bounce(server, &stanza, StanzaError::ServiceUnavailable, None)
                }
                MessageType::Headline | MessageType::Error => return,
                MessageType::Chat | MessageType::Normal => full.bare().clone(),
            }
        }
        Jid::Bare(b) => b.clone(),
    };
    if bare.node().is_none() {
        // Messages to the server itself: no module takes them yet.
        return bounce(server, &stanza, StanzaError::ServiceUnavailable, None);
    }
    // A user with a session here exists (deleting an account ends its
    // sessions first): no store lookup for the common case.
    let online_here = server.sessions.with_resources(&bare, |r| !r.is_empty());
    let exists = if online_here {
        Ok(true)
    } else {
        server.store().account_exists(&bare)
    };
    match exists {
        Ok(true) => {}
        Ok(false) => {
            // RFC 6121 §8.5.1: no such user.
            return bounce(server, &stanza, StanzaError::ServiceUnavailable, None);
        }
        Err(e) => {
            tracing::error!(error = %e, "account lookup failed");
            return bounce(server, &stanza, StanzaError::InternalServerError, None);
        }
    }
    match mtype {
        // §8.5.2.1.1 / §8.5.2.2.1: errors to a bare JID are dropped, groupchat refused.
        MessageType::Error => {}
        MessageType::Groupchat => bounce(server, &stanza, StanzaError::ServiceUnavailable, None),
        MessageType::Headline => {
            let xml = serialize(&stanza);
            server.sessions.with_resources(&bare, |resources| {
                let all: Vec<&Resource> = resources
                    .iter()
                    .filter(|r| r.available && r.priority >= 0)
                    .collect();
                if send_to(&all, &xml) > 0 {
                    server.metrics.routed(Outcome::Local);
                }
            });
            if pass.cluster {
                for node in remote::nodes_of(server, &bare, |e| e.available && e.priority >= 0) {
                    server.metrics.routed(Outcome::OtherNode);
                    remote::forward(
                        server,
                        node,
                        Delivery::AllAvailable,
                        &bare.to_string(),
                        "",
                        &xml,
                    );
                }
            }
        }
        MessageType::Chat | MessageType::Normal => {
            let xml = serialize(&stanza);
            // RFC 6121 §8.5.2.1.1 across the cluster: the highest priority
            // among every node's available resources wins.
            let remote_top = if pass.cluster {
                remote_highest(server, &bare)
            } else {
                None
            };
            let local_top = server
                .sessions
                .with_resources(&bare, |rs| highest_priority(rs).first().map(|r| r.priority));
            let local_wins = match (local_top, &remote_top) {
                (Some(l), Some((r, _))) => l >= *r,
                (Some(_), None) => true,
                (None, _) => false,
            };
            let reached: Vec<String> = if local_wins {
                server.sessions.with_resources(&bare, |resources| {
                    let targets = highest_priority(resources);
                    targets
                        .into_iter()
                        .filter(|r| r.tx.send(Outbound::Xml(xml.clone())).is_ok())
                        .map(|r| r.resource.clone())
                        .collect()
                })
            } else {
                Vec::new()
            };
            let mut forwarded = false;
            if let Some((prio, targets)) = remote_top {
                if local_top.is_none_or(|l| prio >= l) {
                    for (node, full) in targets {
                        remote::forward(server, node, Delivery::Full, &full, "", &xml);
                        forwarded = true;
                    }
                }
            }
            if forwarded {
                server.metrics.routed(Outcome::OtherNode);
            }
            if !reached.is_empty() {
                server.metrics.routed(Outcome::Local);
                let names: Vec<&str> = reached.iter().map(String::as_str).collect();
                delivered(server, &stanza, &bare, &names);
            }
            if forwarded || !reached.is_empty() {
                return;
            }
            store_offline(server, &bare, &stanza).await;
        }
    }
}

/// The highest non-negative priority among `user`'s available sessions on
/// other nodes, and those sessions (node, full JID).
fn remote_highest(server: &Server, user: &BareJid) -> Option<(i8, Vec<(u64, String)>)> {
    let me = server.cluster.id;
    if server.cluster.table.only_on(me) {
        return None;
    }
    server.cluster.table.with_user(user, |entries| {
        let eligible = || {
            entries
                .iter()
                .filter(|(_, e)| e.node != me && e.available && e.priority >= 0)
        };
        let top = eligible().map(|(_, e)| e.priority).max()?;
        let targets = eligible()
            .filter(|(_, e)| e.priority == top)
            .map(|(r, e)| (e.node, format!("{user}/{r}")))
            .collect();
        Some((top, targets))
    })
}

pub(crate) fn delivered(server: &Server, message: &Element, user: &BareJid, resources: &[&str]) {
    for m in server.modules.iter() {
        m.on_message_delivered(server, message, user, resources);
    }
}

async fn store_offline(server: &Server, user: &BareJid, stanza: &Element) {
    for m in server.modules.iter() {
        match m.on_message_offline(server, user, stanza).await {
            Some(Ok(())) => {
                server.metrics.routed(Outcome::Offline);
                for m in server.modules.iter() {
                    m.on_offline_stored(server, user, stanza);
                }
                return;
            }
            Some(Err(reply)) => {
                server.metrics.routed(Outcome::Error);
                return deliver_reply(server, reply);
            }
            None => {}
        }
    }
    // No module stores messages: RFC 6121 §8.5.2.2.1.
    bounce(server, stanza, StanzaError::ServiceUnavailable, None);
}

fn route_presence(server: &Server, stanza: Element, to: Jid, pass: Pass) {
    let Some(ptype) = PresenceType::of(&stanza) else {
        return bounce(
            server,
            &stanza,
            StanzaError::BadRequest,
            Some("unknown presence type"),
        );
    };
    match &to {
        Jid::Full(full) => {
            if let Some(tx) = server.sessions.sender(full) {
                if tx.send(Outbound::Xml(serialize(&stanza))).is_ok() {
                    server.metrics.routed(Outcome::Local);
                }
            } else {
                forward_full(server, full, &stanza, pass, Delivery::FullOrDrop);
            }
        }
        Jid::Bare(bare) => {
            if bare.node().is_none() || ptype == PresenceType::Probe {
                // Presence to the server and probes are answered by the
                // presence module (the roster issue); nothing to deliver.
                return;
            }
            // RFC 6121 §8.5.2.1.2: to every available resource.
            let resources = server.sessions.resources(bare);
            let all: Vec<&Resource> = resources.iter().filter(|r| r.available).collect();
            let xml = serialize(&stanza);
            if send_to(&all, &xml) > 0 {
                server.metrics.routed(Outcome::Local);
            }
            if pass.cluster && remote::to_available(server, bare, &xml) > 0 {
                server.metrics.routed(Outcome::OtherNode);
            }
        }
    }
}

async fn route_iq(server: &Server, stanza: Element, to: Jid, pass: Pass) {
    let Some(itype) = IqType::of(&stanza) else {
        return bounce(
            server,
            &stanza,
            StanzaError::BadRequest,
            Some("IQ without a valid type"),
        );
    };
    if stanza.get_attr("id").is_none() {
        return bounce(
            server,
            &stanza,
            StanzaError::BadRequest,
            Some("IQ without an id"),
        );
    }
    let target = match &to {
        Jid::Full(full) => {
            match server.sessions.sender(full) {
                Some(tx) => {
                    let sent = tx.send(Outbound::Xml(serialize(&stanza))).is_ok();
                    if sent {
                        server.metrics.routed(Outcome::Local);
                    }
                }
                None if forward_full(server, full, &stanza, pass, Delivery::Full) => {}
                // RFC 6121 §8.5.3.2.1: requests get an error, responses are dropped.
                None if itype.is_request() => {
                    bounce(server, &stanza, StanzaError::ServiceUnavailable, None)
                }
                None => {}
            }
            return;
        }
        Jid::Bare(b) if b.node().is_none() => IqTarget::Server(b.domain().to_owned()),
        Jid::Bare(b) => IqTarget::Account(b.clone()),
    };
    if !itype.is_request() {
        // Results and errors addressed to the server or an account: a
        // module may be waiting for one; nothing else is.
        for m in server.modules.iter() {
            if m.on_iq_response(server, &stanza).await {
                server.metrics.routed(Outcome::Local);
                return;
            }
        }
        return;
    }
    // RFC 6120 §8.2.3: a get or set has exactly one payload child.
    let payload = match (iq_payload(&stanza), stanza.elements().count()) {
        (Some(p), 1) => p,
        _ => {
            return bounce(
                server,
                &stanza,
                StanzaError::BadRequest,
                Some("IQ get/set must have exactly one child"),
            )
        }
    };
    if let IqTarget::Account(user) = &target {
        // RFC 6121 §8.5.1: requests to a user that does not exist.
        if !server.store().account_exists(user).unwrap_or(false) {
            return bounce(server, &stanza, StanzaError::ServiceUnavailable, None);
        }
    }
    let Some(from) = stanza.get_attr("from").and_then(|f| FullJid::parse(f).ok()) else {
        return;
    };
    let Some(module) = server
        .modules
        .iter()
        .find(|m| m.handles(&payload.ns, &target))
    else {
        // §8.4: an unknown namespace is not supported by the server.
        return bounce(server, &stanza, StanzaError::ServiceUnavailable, None);
    };
    server.metrics.routed(Outcome::Local);
    let req = IqRequest {
        iq: &stanza,
        payload,
        from: &from,
        target,
    };
    if let Some(reply) = module.handle_iq(server, req).await {
        deliver_reply(server, reply);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn res(name: &str, priority: i8, available: bool) -> Resource {
        let (tx, _rx) = crate::sessions::queue(1, 1 << 20);
        Resource {
            resource: name.into(),
            id: 0,
            tx,
            available,
            priority,
            presence: None,
            interested: false,
            carbons: false,
            peer: "127.0.0.1:1".parse().expect("addr"),
            tls: true,
        }
    }

    fn names(v: Vec<&Resource>) -> Vec<&str> {
        v.into_iter().map(|r| r.resource.as_str()).collect()
    }

    #[test]
    fn bare_jid_message_goes_to_highest_priority_resource() {
        let rs = vec![
            res("Mobile", 1, true),
            res("Home", 10, true),
            res("Office", 5, true),
        ];
        assert_eq!(names(highest_priority(&rs)), vec!["Home"]);
    }

    #[test]
    fn negative_priority_and_unavailable_never_get_bare_messages() {
        let rs = vec![res("A", -1, true), res("B", 50, false)];
        assert!(highest_priority(&rs).is_empty());
    }

    #[test]
    fn equal_top_priority_resources_all_receive() {
        let rs = vec![res("A", 3, true), res("B", 3, true), res("C", 0, true)];
        assert_eq!(names(highest_priority(&rs)), vec!["A", "B"]);
    }
}
