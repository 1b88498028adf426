//! Message Carbons (XEP-0280): a user's other devices see the chats that
//! one device sends and receives, so a conversation reads the same on
//! the phone and the desktop.

use std::sync::Arc;

use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::jid::{BareJid, FullJid};
use xmpp::stanza::{error_reply, iq_result, ns, MessageType};

use super::{BoxFuture, IqRequest, IqTarget, Module};
use crate::sessions::Outbound;
use crate::Server;

pub const NS: &str = "urn:xmpp:carbons:2";
const NS_FORWARD: &str = "urn:xmpp:forward:0";
const NS_HINTS: &str = "urn:xmpp:hints";

pub struct Carbons;

/// XEP-0280 §6: chat messages, and normal ones with a body, are copied;
/// a `<private/>` or `<no-copy/>` message is not.
fn eligible(m: &Element) -> bool {
    let kind = MessageType::of(m);
    let chatty =
        kind == MessageType::Chat || (kind == MessageType::Normal && m.has_child("body", &m.ns));
    chatty
        && !m.has_child("private", NS)
        && !m.has_child("no-copy", NS_HINTS)
        && !m.has_child("received", NS)
        && !m.has_child("sent", NS)
}

/// Sends a `<sent/>` or `<received/>` copy to the user's carbons-enabled
/// available resources other than `skip`.
fn copy(server: &Server, user: &BareJid, skip: &[&str], wrapper: &str, m: &Element) {
    // Most users have no carbons-enabled second device: find out without
    // copying or building anything.
    let wanted = |r: &crate::sessions::Resource| {
        r.carbons && r.available && !skip.contains(&r.resource.as_str())
    };
    let here = server
        .sessions
        .with_resources(user, |rs| rs.iter().any(wanted));
    // Resources on other nodes: whether they enabled carbons is theirs to
    // know, so every node with an available session of the user gets the
    // wrapper once and picks its own.
    let elsewhere = crate::router::remote::nodes_of(server, user, |e| e.available);
    if !here && elsewhere.is_empty() {
        return;
    }
    let forwarded =
        Element::new(wrapper, NS).child(Element::new("forwarded", NS_FORWARD).child(m.clone()));
    let kind = m.get_attr("type").unwrap_or("normal");
    if !elsewhere.is_empty() {
        let xml = forwarded.to_string_in(ns::CLIENT);
        let to = user.to_string();
        for n in elsewhere {
            crate::router::remote::forward(server, n, proto::Delivery::Carbons, &to, kind, &xml);
        }
    }
    if here {
        deliver(server, user, &forwarded, kind, wanted);
    }
}

/// Wraps `forwarded` for each of `user`'s resources here that `wanted`
/// picks.
fn deliver(
    server: &Server,
    user: &BareJid,
    forwarded: &Element,
    kind: &str,
    wanted: impl Fn(&crate::sessions::Resource) -> bool,
) {
    let targets: Vec<_> = server
        .sessions
        .resources(user)
        .into_iter()
        .filter(|r| wanted(r))
        .collect();
    for r in targets {
        let carbon = Element::new("message", ns::CLIENT)
            .attr("from", user.to_string())
            .attr("to", format!("{user}/{}", r.resource))
            .attr("type", kind)
            .child(forwarded.clone());
        let _ =
            r.tx.send(Outbound::Xml(Arc::from(carbon.to_string_in(ns::CLIENT))));
    }
}

/// A carbon wrapper from another node (`Delivery::Carbons`): for this
/// node's carbons-enabled available resources of `user`.
pub fn deliver_forwarded(server: &Server, user: &BareJid, kind: &str, wrapper: &Element) {
    let kind = match kind {
        "chat" | "normal" => kind,
        _ => "normal",
    };
    deliver(server, user, wrapper, kind, |r| r.carbons && r.available);
}

impl Module for Carbons {
    fn name(&self) -> &'static str {
        "carbons"
    }

    fn handles(&self, namespace: &str, target: &IqTarget) -> bool {
        namespace == NS && matches!(target, IqTarget::Account(_))
    }

    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }

    fn handle_iq<'a>(
        &'a self,
        server: &'a Server,
        req: IqRequest<'a>,
    ) -> BoxFuture<'a, Option<Element>> {
        let reply = if !req.is_set() || !req.to_own_account() {
            error_reply(req.iq, StanzaError::BadRequest, None)
        } else if req.payload.is("enable", NS) {
            server.sessions.set_carbons(req.from, true);
            Some(iq_result(req.iq))
        } else if req.payload.is("disable", NS) {
            server.sessions.set_carbons(req.from, false);
            Some(iq_result(req.iq))
        } else {
            error_reply(req.iq, StanzaError::BadRequest, None)
        };
        Box::pin(async move { reply })
    }

    fn on_message_delivered(
        &self,
        server: &Server,
        message: &Element,
        user: &BareJid,
        resources: &[&str],
    ) {
        if eligible(message) {
            copy(server, user, resources, "received", message);
        }
    }

    fn on_message_sent(&self, server: &Server, from: &FullJid, message: &Element) {
        if eligible(message) {
            copy(server, from.bare(), &[from.resource()], "sent", message);
        }
    }
}
