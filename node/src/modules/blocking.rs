//! Blocking Command (XEP-0191): a user's blocklist, managed by IQ, and
//! enforced on every stanza the router carries to or from that user.

use std::sync::Arc;

use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::jid::{BareJid, Jid};
use xmpp::stanza::{iq_result, ns, StanzaKind};

use super::{iq_error, BoxFuture, IqRequest, IqTarget, Module, RouteCheck};
use crate::cluster::state_machine::{ApplyError, Command, Refusal, Response};
use crate::sessions::Outbound;
use crate::Server;

pub const NS: &str = "urn:xmpp:blocking";
const NS_ERRORS: &str = "urn:xmpp:blocking:errors";

pub struct Blocking;

/// Whether `user` blocks `other`: an entry for its full JID, its bare JID
/// or its domain matches (XEP-0191 §3.3, after XEP-0016 §2.1 matching).
pub fn blocks(server: &Server, user: &BareJid, other: &Jid) -> bool {
    let store = server.store();
    let u = user.to_string();
    // Most users block nobody: the store knows them from memory.
    if store.blocklist_is_empty(&u) {
        return false;
    }
    let check = |j: &str| store.is_blocked(&u, j).unwrap_or(false);
    check(&other.to_string()) || check(&other.bare().to_string()) || check(other.domain())
}

/// §3.3, §3.4: pushes a change of `user`'s blocklist to its resources,
/// on this node and on every other node holding one of them.
pub fn push(server: &Server, user: &BareJid, block: bool, changed: &[String]) {
    if changed.is_empty() {
        return;
    }
    let mut push = Element::new(if block { "block" } else { "unblock" }, NS);
    for j in changed {
        push = push.child(Element::new("item", NS).attr("jid", j.as_str()));
    }
    push_local(server, user, &push);
    crate::router::remote::to_all_resources(server, user, &push.to_string_in(NS));
}

/// Sends the `<block/>` or `<unblock/>` push to every resource of `user`
/// on this node, each in an IQ set of its own.
pub fn push_local(server: &Server, user: &BareJid, push: &Element) {
    for r in server.sessions.resources(user) {
        let iq = Element::new("iq", ns::CLIENT)
            .attr("type", "set")
            .attr("id", "block-push")
            .attr("to", format!("{user}/{}", r.resource))
            .child(push.clone());
        let _ =
            r.tx.send(Outbound::Xml(Arc::from(iq.to_string_in(ns::CLIENT))));
    }
}

fn items(payload: &Element) -> Option<Vec<String>> {
    payload
        .elements()
        .filter(|e| e.is("item", NS))
        .map(|e| {
            e.get_attr("jid")
                .and_then(|j| Jid::parse(j).ok())
                .map(|j| j.to_string())
        })
        .collect()
}

impl Module for Blocking {
    fn name(&self) -> &'static str {
        "blocking"
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
        Box::pin(async move {
            let user = req.from.bare();
            if !req.to_own_account() {
                return Some(iq_error(req.iq, StanzaError::Forbidden, None));
            }
            let u = user.to_string();
            if !req.is_set() {
                if !req.payload.is("blocklist", NS) {
                    return Some(iq_error(req.iq, StanzaError::BadRequest, None));
                }
                let mut list = Element::new("blocklist", NS);
                for j in server.store().blocklist(&u).unwrap_or_default() {
                    list = list.child(Element::new("item", NS).attr("jid", j));
                }
                return Some(iq_result(req.iq).child(list));
            }
            let block = req.payload.is("block", NS);
            if !block && !req.payload.is("unblock", NS) {
                return Some(iq_error(req.iq, StanzaError::BadRequest, None));
            }
            let Some(jids) = items(req.payload) else {
                return Some(iq_error(req.iq, StanzaError::JidMalformed, None));
            };
            // §3.3: a block must name at least one JID; an empty unblock clears the list.
            if block && jids.is_empty() {
                return Some(iq_error(req.iq, StanzaError::BadRequest, None));
            }
            let cmd = if block {
                Command::Block {
                    max: u32::try_from(server.config.limits.max_blocklist_items)
                        .unwrap_or(u32::MAX),
                    user: u.clone(),
                    jids,
                }
            } else {
                Command::Unblock {
                    user: u.clone(),
                    jids,
                }
            };
            let changed = match server.cluster.write(cmd).await {
                Ok(Response::Blocking(c)) => c,
                Ok(_) => Vec::new(),
                Err(e @ ApplyError::Refused(Refusal::BlocklistFull(..))) => {
                    return Some(iq_error(
                        req.iq,
                        StanzaError::NotAcceptable,
                        Some(&e.to_string()),
                    ));
                }
                Err(e) => {
                    tracing::error!(error = %e, "blocklist change failed");
                    return Some(iq_error(req.iq, StanzaError::InternalServerError, None));
                }
            };
            if block {
                // §3.3: the blocked contact sees the user go offline. Sent
                // directly: the router would now (rightly) drop it.
                for j in &changed {
                    let Ok(contact) = Jid::parse(j) else { continue };
                    let contact = contact.bare().clone();
                    if contact.node().is_none() || !server.config.is_local_domain(contact.domain())
                    {
                        continue;
                    }
                    for r in server.sessions.resources(user) {
                        if r.available {
                            let p = Element::new("presence", ns::CLIENT)
                                .attr("type", "unavailable")
                                .attr("from", format!("{user}/{}", r.resource))
                                .attr("to", j.as_str());
                            super::presence::to_available(
                                server,
                                &contact,
                                &Arc::from(p.to_string_in(ns::CLIENT)),
                            );
                        }
                    }
                }
            }
            if !block {
                // Presence flows again where the subscriptions say it should.
                for j in &changed {
                    let Ok(contact) = BareJid::parse(j) else {
                        continue;
                    };
                    if contact.node().is_none() || !server.config.is_local_domain(contact.domain())
                    {
                        continue;
                    }
                    if super::presence::has_from(server, user, &contact) {
                        super::presence::send_current_presence(server, user, &contact);
                    }
                    if super::presence::has_to(server, user, &contact) {
                        super::presence::send_current_presence(server, &contact, user);
                    }
                }
            }
            push(server, user, block, &changed);
            Some(iq_result(req.iq))
        })
    }

    fn check_route(&self, server: &Server, stanza: &Element, from: &Jid, to: &Jid) -> RouteCheck {
        let kind = StanzaKind::of(stanza);
        // Errors and results are let through: they answer something already sent.
        let answer = matches!(stanza.get_attr("type"), Some("error" | "result"));
        if from.node().is_some()
            && server.config.is_local_domain(from.domain())
            && blocks(server, from.bare(), to)
        {
            // §3.5: the user writes to someone they block.
            return match kind {
                Some(StanzaKind::Presence) => RouteCheck::Drop,
                _ if answer => RouteCheck::Pass,
                _ => RouteCheck::Refuse(
                    StanzaError::NotAcceptable,
                    Some(Element::new("blocked", NS_ERRORS)),
                ),
            };
        }
        if to.node().is_some()
            && server.config.is_local_domain(to.domain())
            && blocks(server, to.bare(), from)
        {
            // §3.4: a blocked contact writes to the user.
            return match kind {
                Some(StanzaKind::Presence) => RouteCheck::Drop,
                _ if answer => RouteCheck::Drop,
                _ => RouteCheck::Refuse(StanzaError::ServiceUnavailable, None),
            };
        }
        RouteCheck::Pass
    }
}
