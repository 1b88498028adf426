//! Roster management (RFC 6121 §2): get (with versioning, §2.6), set and
//! remove, and roster pushes to every interested resource.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::jid::{BareJid, Jid};
use xmpp::roster::SubKind;
use xmpp::stanza::{iq_result, ns};

use super::{iq_error, BoxFuture, IqRequest, IqTarget, Module};
use crate::cluster::state_machine::{ApplyError, Command, Refusal, Response};
use crate::sessions::Outbound;
use crate::store::RosterItem;
use crate::Server;

/// Stream feature advertising roster versioning (RFC 6121 §2.6.1).
pub const ROSTERVER_FEATURE: &str = "urn:xmpp:features:rosterver";

pub struct Roster;

/// `<item/>` for a contact; `None` is a removal (`subscription='remove'`).
pub fn item_element(contact: &str, item: Option<&RosterItem>) -> Element {
    let mut e = Element::new("item", ns::ROSTER).attr("jid", contact);
    let Some(item) = item else {
        return e.attr("subscription", "remove");
    };
    if let Some(n) = &item.name {
        e = e.attr("name", n.as_str());
    }
    e = e.attr("subscription", item.sub.subscription.as_str());
    if item.sub.pending_out {
        e = e.attr("ask", "subscribe");
    }
    if item.sub.approved {
        e = e.attr("approved", "true");
    }
    for g in &item.groups {
        e = e.child(Element::new("group", ns::ROSTER).text(g.as_str()));
    }
    e
}

/// Sends a roster push to every interested resource of `user` (§2.1.6),
/// on every node.
pub fn push(server: &Server, user: &BareJid, ver: u64, contact: &str, item: Option<&RosterItem>) {
    let iq = Element::new("iq", ns::CLIENT).attr("type", "set").child(
        Element::new("query", ns::ROSTER)
            .attr("ver", ver.to_string())
            .child(item_element(contact, item)),
    );
    push_local(server, user, &iq);
    crate::router::remote::to_interested(server, user, &iq.to_string_in(ns::CLIENT));
}

/// Sends the push `iq` (no `to`, no `id` yet) to the interested resources
/// of `user` on this node.
pub fn push_local(server: &Server, user: &BareJid, iq: &Element) {
    static PUSH_ID: AtomicU64 = AtomicU64::new(0);
    for r in server.sessions.resources(user) {
        if !r.interested {
            continue;
        }
        let id = PUSH_ID.fetch_add(1, Ordering::Relaxed);
        let mut iq = iq.clone();
        iq.set_attr("id", format!("push{id}"));
        iq.set_attr("to", format!("{user}/{}", r.resource));
        let _ =
            r.tx.send(Outbound::Xml(Arc::from(iq.to_string_in(ns::CLIENT))));
    }
}

impl Module for Roster {
    fn name(&self) -> &'static str {
        "roster"
    }

    fn handles(&self, namespace: &str, target: &IqTarget) -> bool {
        namespace == ns::ROSTER && matches!(target, IqTarget::Account(_))
    }

    fn features(&self) -> &'static [&'static str] {
        &[ns::ROSTER]
    }

    fn handle_iq<'a>(
        &'a self,
        server: &'a Server,
        req: IqRequest<'a>,
    ) -> BoxFuture<'a, Option<Element>> {
        Box::pin(async move {
            let user = req.from.bare();
            // §2.1.5 / §2.3.3: only the user's own roster.
            if !req.to_own_account() {
                return Some(iq_error(req.iq, StanzaError::Forbidden, None));
            }
            if req.is_set() {
                Some(set(server, &req, user).await)
            } else {
                // A change acknowledged on another node is in this answer.
                server.cluster.read_barrier().await;
                get(server, &req, user)
            }
        })
    }
}

fn get(server: &Server, req: &IqRequest<'_>, user: &BareJid) -> Option<Element> {
    server.sessions.set_interested(req.from);
    let u = user.to_string();
    let store = server.store();
    let (current, items) = match (store.roster_version(&u), store.roster(&u)) {
        (Ok(v), Ok(i)) => (v, i),
        _ => return Some(iq_error(req.iq, StanzaError::InternalServerError, None)),
    };
    // §2.6.3: a client that sends the version it has gets only the changes,
    // as pushes after an empty result; the same version gets nothing.
    let known = req
        .payload
        .get_attr("ver")
        .and_then(|v| v.parse::<u64>().ok());
    // Below the floor, removals were forgotten: only the whole roster is right.
    let floor = store.roster_floor(&u).unwrap_or(u64::MAX);
    if let Some(known) = known.filter(|k| *k <= current && *k >= floor) {
        let result = iq_result(req.iq);
        if known < current {
            let removals = store.roster_removals(&u).unwrap_or_default();
            let from = req.from.clone();
            let mut pushes: Vec<(u64, Element)> = items
                .iter()
                .filter(|(_, i)| i.visible && i.ver > known)
                .map(|(c, i)| (i.ver, item_element(c, Some(i))))
                .chain(
                    removals
                        .iter()
                        .filter(|(_, v)| *v > known)
                        .map(|(c, v)| (*v, item_element(c, None))),
                )
                .collect();
            pushes.sort_by_key(|(v, _)| *v);
            if let Some(r) = server.sessions.get(&from) {
                // The result first, then the pushes, as one queue entry
                // (this runs in the session's own task).
                let mut out = vec![Arc::from(result.to_string_in(ns::CLIENT))];
                for (i, (ver, item)) in pushes.into_iter().enumerate() {
                    let iq = Element::new("iq", ns::CLIENT)
                        .attr("type", "set")
                        .attr("id", format!("rv{i}"))
                        .attr("to", from.to_string())
                        .child(
                            Element::new("query", ns::ROSTER)
                                .attr("ver", ver.to_string())
                                .child(item),
                        );
                    out.push(Arc::from(iq.to_string_in(ns::CLIENT)));
                }
                let _ = r.tx.send(Outbound::Batch(out));
            }
            // Answered above, in order with the pushes.
            return None;
        }
        return Some(result);
    }
    let mut query = Element::new("query", ns::ROSTER).attr("ver", current.to_string());
    for (c, i) in items.iter().filter(|(_, i)| i.visible) {
        query = query.child(item_element(c, Some(i)));
    }
    Some(iq_result(req.iq).child(query))
}

async fn set(server: &Server, req: &IqRequest<'_>, user: &BareJid) -> Element {
    // §2.3.3: exactly one item.
    let items: Vec<&Element> = req
        .payload
        .elements()
        .filter(|e| e.is("item", ns::ROSTER))
        .collect();
    let [item] = items.as_slice() else {
        return iq_error(
            req.iq,
            StanzaError::BadRequest,
            Some("a roster set carries exactly one item"),
        );
    };
    let Some(contact) = item.get_attr("jid").and_then(|j| Jid::parse(j).ok()) else {
        return iq_error(req.iq, StanzaError::JidMalformed, None);
    };
    let contact = contact.bare().clone();
    let c = contact.to_string();
    let u = user.to_string();
    match item.get_attr("subscription") {
        Some("remove") => return remove(server, req, user, &contact).await,
        None => {}
        // §2.1.2.5: a client may only send subscription='remove'.
        Some(_) => {
            return iq_error(
                req.iq,
                StanzaError::BadRequest,
                Some("only subscription='remove' may be set"),
            )
        }
    }
    let mut groups: Vec<String> = Vec::new();
    for g in item.elements().filter(|e| e.is("group", ns::ROSTER)) {
        let g = g.text_content();
        // §2.3.3: empty or duplicate groups are errors.
        if g.is_empty() {
            return iq_error(req.iq, StanzaError::NotAcceptable, Some("empty group name"));
        }
        if groups.contains(&g) {
            return iq_error(req.iq, StanzaError::BadRequest, Some("duplicate group"));
        }
        groups.push(g);
    }
    let name = item
        .get_attr("name")
        .filter(|n| !n.is_empty())
        .map(str::to_owned);
    match server
        .cluster
        .write(Command::RosterSet {
            max: u32::try_from(server.config.limits.max_roster_items).unwrap_or(u32::MAX),
            user: u,
            contact: c.clone(),
            name,
            groups,
        })
        .await
    {
        Ok(Response::Roster { ver, changes, .. }) => {
            for (contact, item) in &changes {
                push(server, user, ver, contact, item.as_ref());
            }
            iq_result(req.iq)
        }
        Ok(_) => iq_result(req.iq),
        // RFC 6121 §2.3.3: the roster size limit.
        Err(e @ ApplyError::Refused(Refusal::RosterFull(..))) => {
            iq_error(req.iq, StanzaError::NotAllowed, Some(&e.to_string()))
        }
        Err(e) => {
            tracing::error!(error = %e, "roster set failed");
            iq_error(req.iq, StanzaError::InternalServerError, None)
        }
    }
}

/// §2.5.2: what `user`'s item for `contact` says is subscribed or pending,
/// either way, cancelled through the subscription machinery (both rosters
/// change, the contact is told).
pub(crate) async fn cancel_subscriptions(
    server: &Server,
    user: &BareJid,
    contact: &BareJid,
    item: &crate::store::RosterItem,
) {
    if item.sub.subscription.has_to() || item.sub.pending_out {
        super::presence::subscription(server, user, contact, SubKind::Unsubscribe, None).await;
    }
    if item.sub.subscription.has_from() || item.sub.pending_in {
        super::presence::subscription(server, user, contact, SubKind::Unsubscribed, None).await;
    }
}

/// §2.5.2: removing an item cancels the subscriptions both ways.
async fn remove(
    server: &Server,
    req: &IqRequest<'_>,
    user: &BareJid,
    contact: &BareJid,
) -> Element {
    let u = user.to_string();
    let c = contact.to_string();
    let previous = match server.store().roster_item(&u, &c) {
        Ok(Some(p)) => p,
        Ok(None) => return iq_error(req.iq, StanzaError::ItemNotFound, None),
        Err(_) => return iq_error(req.iq, StanzaError::InternalServerError, None),
    };
    // Cancel first, through the subscription machinery, so the contact's
    // side changes and is told; then drop the item.
    cancel_subscriptions(server, user, contact, &previous).await;
    match server
        .cluster
        .write(
            Command::RosterRemove {
                user: u,
                contact: c.clone(),
            }
            .limited(&server.config.limits),
        )
        .await
    {
        Ok(Response::Roster { ver, .. }) => {
            push(server, user, ver, &c, None);
            iq_result(req.iq)
        }
        Ok(_) => iq_result(req.iq),
        Err(ApplyError::Refused(Refusal::NoRosterItem { .. })) => iq_result(req.iq),
        Err(e) => {
            tracing::error!(error = %e, "roster remove failed");
            iq_error(req.iq, StanzaError::InternalServerError, None)
        }
    }
}
