//! Personal Eventing Protocol (XEP-0163) over Publish-Subscribe (XEP-0060):
//! every account is a pubsub service of its own. OMEMO device lists and
//! key bundles, avatars (XEP-0084), bookmarks (XEP-0402) and nicknames
//! (XEP-0172) live here.
//!
//! Nodes and items are replicated state ([`Command::PepPublish`] and its
//! kin); a change comes back from every replica as an [`Effect::Pep`], and
//! each cluster node notifies the sessions it serves: the owner's own
//! resources and the contacts subscribed to the owner's presence, those
//! whose entity capabilities (XEP-0115) ask for `NODE+notify`. Caps are
//! resolved once per `ver` with a disco#info query and verified against
//! the hash before they are believed. When a session comes online (or a
//! remote contact's presence arrives), it gets the last item of each node
//! it is interested in.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::Rng as _;
use xmpp::caps::Caps;
use xmpp::element::{escape, Element, Node};
use xmpp::error::StanzaError;
use xmpp::forms::{self, Field, Submitted};
use xmpp::jid::{BareJid, FullJid, Jid};
use xmpp::stanza::{iq_result, ns, PresenceType};

use super::{iq_error, BoxFuture, Identity, IqRequest, IqTarget, Module};
use crate::cluster::state_machine::{
    ApplyError, Command, Effect, PepEvent, PepLimits, PepOptions, Refusal,
};
use crate::store::{MaxItems, PepAccess, PepConfig, PepItem};
use crate::Server;

pub const NS: &str = "http://jabber.org/protocol/pubsub";
pub const NS_OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
pub const NS_EVENT: &str = "http://jabber.org/protocol/pubsub#event";
pub const NS_ERRORS: &str = "http://jabber.org/protocol/pubsub#errors";
const NODE_CONFIG: &str = "http://jabber.org/protocol/pubsub#node_config";
const PUBLISH_OPTIONS: &str = "http://jabber.org/protocol/pubsub#publish-options";

/// Caps `ver`s remembered, remote contacts' sessions remembered, and disco
/// queries in flight, at most.
const MAX_CAPS: usize = 10_000;
const MAX_REMOTE: usize = 100_000;
const MAX_PENDING: usize = 1_000;
const PENDING_FOR: Duration = Duration::from_secs(60);

#[derive(Default)]
pub struct Pep {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Verified caps: `ver` -> the features it stands for.
    caps: HashMap<String, Arc<HashSet<String>>>,
    /// disco#info queries in flight, by IQ id.
    pending: HashMap<String, Pending>,
    /// `ver`s being resolved -> the IQ id asking for them.
    asked: HashMap<String, String>,
    /// Remote contacts' available sessions whose presence came in through
    /// this node: bare JID -> full JID -> caps `ver`.
    remote: HashMap<String, HashMap<String, String>>,
    remote_count: usize,
}

struct Pending {
    caps: Caps,
    sent: Instant,
    then: Vec<Then>,
}

/// What to do once a session's features are known.
#[derive(Clone)]
enum Then {
    /// A local session came online: its own and its contacts' last items.
    Local(FullJid),
    /// A remote contact's session sent presence to `owner`: `owner`'s last items.
    Remote { from: FullJid, owner: BareJid },
}

impl Pep {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn features(&self, ver: &str) -> Option<Arc<HashSet<String>>> {
        self.lock().caps.get(ver).cloned()
    }

    /// Whether a presence (its `<c/>`) asks for notifications of `node`.
    fn wants(&self, presence: Option<&str>, node: &str) -> bool {
        let Some(p) = presence else { return false };
        let Some(ver) = caps_ver(p) else { return false };
        self.features(&ver)
            .is_some_and(|f| f.contains(&format!("{node}+notify")))
    }

    /// Runs `then` with the features `caps` stands for, asking the session
    /// for them first when they are not known yet.
    fn with_features(&self, server: &Server, caps: Caps, target: &FullJid, from: &str, then: Then) {
        if let Some(f) = self.features(&caps.ver) {
            return run(server, &f, then);
        }
        let mut st = self.lock();
        if let Some(id) = st.asked.get(&caps.ver).cloned() {
            if let Some(p) = st.pending.get_mut(&id) {
                p.then.push(then);
                return;
            }
        }
        // Forget queries nobody answered.
        let now = Instant::now();
        let stale: Vec<String> = st
            .pending
            .iter()
            .filter(|(_, p)| now.duration_since(p.sent) > PENDING_FOR)
            .map(|(id, _)| id.clone())
            .collect();
        for id in stale {
            if let Some(p) = st.pending.remove(&id) {
                st.asked.remove(&p.caps.ver);
            }
        }
        if st.pending.len() >= MAX_PENDING {
            return;
        }
        let id = format!("caps{:016x}", rand::thread_rng().gen::<u64>());
        st.asked.insert(caps.ver.clone(), id.clone());
        let node = format!("{}#{}", caps.node, caps.ver);
        st.pending.insert(
            id.clone(),
            Pending {
                caps,
                sent: now,
                then: vec![then],
            },
        );
        drop(st);
        let iq = Element::new("iq", ns::CLIENT)
            .attr("type", "get")
            .attr("id", id)
            .attr("from", from)
            .attr("to", target.to_string())
            .child(Element::new("query", ns::DISCO_INFO).attr("node", node));
        send(server, target, iq);
    }

    /// A disco#info answer to one of our caps queries.
    fn answered(&self, server: &Server, iq: &Element) -> bool {
        let Some(id) = iq.get_attr("id") else {
            return false;
        };
        let Some(p) = self.lock().pending.remove(id) else {
            return false;
        };
        self.lock().asked.remove(&p.caps.ver);
        let Some(query) = iq.get_child("query", ns::DISCO_INFO) else {
            return true;
        };
        // XEP-0115 §5.4: believe the features only if they hash to `ver`.
        if xmpp::caps::ver(&p.caps.hash, query).as_deref() != Some(p.caps.ver.as_str()) {
            tracing::debug!(ver = %p.caps.ver, "caps answer does not match its hash; ignored");
            return true;
        }
        let features: Arc<HashSet<String>> =
            Arc::new(xmpp::caps::features(query).into_iter().collect());
        {
            let mut st = self.lock();
            if st.caps.len() >= MAX_CAPS {
                st.caps.clear();
            }
            st.caps.insert(p.caps.ver.clone(), features.clone());
        }
        for then in p.then {
            run(server, &features, then);
        }
        true
    }

    fn remember_remote(&self, from: &FullJid, ver: Option<String>) {
        let mut st = self.lock();
        let bare = from.bare().to_string();
        let full = from.to_string();
        match ver {
            Some(v) => {
                if st.remote_count >= MAX_REMOTE {
                    st.remote.clear();
                    st.remote_count = 0;
                }
                let entry = st.remote.entry(bare).or_default();
                if entry.insert(full, v).is_none() {
                    st.remote_count += 1;
                }
            }
            None => {
                let mut removed = false;
                if let Some(m) = st.remote.get_mut(&bare) {
                    removed = m.remove(&full).is_some();
                    if m.is_empty() {
                        st.remote.remove(&bare);
                    }
                }
                if removed {
                    st.remote_count -= 1;
                }
            }
        }
    }

    /// Remote sessions of `contact` seen here that want `node`.
    fn remote_wanting(&self, contact: &str, node: &str) -> Vec<String> {
        let st = self.lock();
        let want = format!("{node}+notify");
        st.remote
            .get(contact)
            .map(|m| {
                m.iter()
                    .filter(|(_, ver)| st.caps.get(*ver).is_some_and(|f| f.contains(&want)))
                    .map(|(full, _)| full.clone())
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The `ver` of a presence's caps, from its serialised form.
fn caps_ver(presence: &str) -> Option<String> {
    let e = xmpp::xml::parse_element(presence, ns::CLIENT).ok()?;
    Caps::of(&e).map(|c| c.ver)
}

/// Sends a server-made stanza to a full JID, here, on another node or
/// over s2s.
fn send(server: &Server, to: &FullJid, stanza: Element) {
    if server.config.is_local_domain(to.domain()) {
        let xml: Arc<str> = Arc::from(stanza.to_string_in(ns::CLIENT));
        crate::router::deliver_reply_xml(server, to, xml);
    } else {
        crate::federation::route_remote(server, stanza, to.domain());
    }
}

fn send_xml(server: &Server, to: &FullJid, xml: String) {
    if server.config.is_local_domain(to.domain()) {
        crate::router::deliver_reply_xml(server, to, Arc::from(xml));
    } else if let Ok(e) = xmpp::xml::parse_element(&xml, ns::CLIENT) {
        crate::federation::route_remote(server, e, to.domain());
    }
}

/// `<item id=…>payload</item>`.
fn item_xml(item: &PepItem, out: &mut String) {
    out.push_str("<item id='");
    out.push_str(&escape(&item.id));
    out.push_str("'>");
    out.push_str(&item.payload);
    out.push_str("</item>");
}

/// A notification message (XEP-0060 §7.1.2.1) around `inner`.
fn notification(owner: &str, to: &str, inner: &str) -> String {
    format!(
        "<message from='{}' to='{}' type='headline' id='pep{:016x}'><event xmlns='{NS_EVENT}'>{inner}</event></message>",
        escape(owner),
        escape(to),
        rand::thread_rng().gen::<u64>()
    )
}

fn event_xml(node: &str, event: &PepEvent) -> String {
    let node = escape(node);
    match event {
        PepEvent::Published(item) => {
            let mut s = format!("<items node='{node}'>");
            item_xml(item, &mut s);
            s.push_str("</items>");
            s
        }
        PepEvent::Retracted(ids) => {
            let mut s = format!("<items node='{node}'>");
            for id in ids {
                s.push_str(&format!("<retract id='{}'/>", escape(id)));
            }
            s.push_str("</items>");
            s
        }
        PepEvent::Purged => format!("<purge node='{node}'/>"),
        PepEvent::Deleted => format!("<delete node='{node}'/>"),
    }
}

/// May `who` read `owner`'s node with this access model?
fn may_read(server: &Server, owner: &BareJid, access: PepAccess, who: &BareJid) -> bool {
    if who == owner {
        return true;
    }
    if super::blocking::blocks(server, owner, &Jid::Bare(who.clone())) {
        return false;
    }
    match access {
        PepAccess::Open => true,
        PepAccess::Whitelist => false,
        PepAccess::Presence => super::presence::has_from(server, owner, who),
    }
}

/// Once a session's features are known: the last items it should have.
fn run(server: &Server, features: &HashSet<String>, then: Then) {
    let wants = |node: &str| features.contains(&format!("{node}+notify"));
    let store = server.store();
    let last_items = |owner: &BareJid, to: &FullJid, reader: &BareJid| {
        let o = owner.to_string();
        for (node, n) in store.pep_nodes(&o).unwrap_or_default() {
            if !wants(&node) || !may_read(server, owner, n.config.access, reader) {
                continue;
            }
            if let Some(item) = store
                .pep_items(&o, &node, 1)
                .ok()
                .and_then(|v| v.into_iter().next())
            {
                let inner = event_xml(&node, &PepEvent::Published(item));
                send_xml(server, to, notification(&o, &to.to_string(), &inner));
            }
        }
    };
    match then {
        Then::Local(me) => {
            let user = me.bare();
            last_items(user, &me, user);
            // Contacts whose presence this user receives (`to`/`both`).
            for (c, item) in store.roster(&user.to_string()).unwrap_or_default() {
                if !item.visible || !item.sub.subscription.has_to() {
                    continue;
                }
                match BareJid::parse(&c) {
                    Ok(contact) if server.config.is_local_domain(contact.domain()) => {
                        last_items(&contact, &me, user)
                    }
                    _ => {}
                }
            }
        }
        Then::Remote { from, owner } => last_items(&owner, &from, from.bare()),
    }
}

/// A change to one of `owner`'s nodes: notifications to the interested
/// sessions this node serves.
fn notify(
    server: &Server,
    pep: &Pep,
    owner: &str,
    node: &str,
    access: PepAccess,
    event: &PepEvent,
) {
    let Ok(owner_jid) = BareJid::parse(owner) else {
        return;
    };
    let inner = event_xml(node, event);
    let to_local = |user: &BareJid| {
        for r in server.sessions.resources(user) {
            if r.available && pep.wants(r.presence.as_deref(), node) {
                let full = format!("{user}/{}", r.resource);
                let _ =
                    r.tx.send(crate::sessions::Outbound::Xml(Arc::from(notification(
                        owner, &full, &inner,
                    ))));
            }
        }
    };
    to_local(&owner_jid);
    if access == PepAccess::Whitelist {
        return;
    }
    let roster = server.store().roster(owner).unwrap_or_default();
    for (c, item) in roster {
        if !item.visible || !item.sub.subscription.has_from() {
            continue;
        }
        let Ok(contact) = BareJid::parse(&c) else {
            continue;
        };
        if super::blocking::blocks(server, &owner_jid, &Jid::Bare(contact.clone())) {
            continue;
        }
        if server.config.is_local_domain(contact.domain()) {
            to_local(&contact);
        } else {
            for full in pep.remote_wanting(&c, node) {
                if let Ok(to) = FullJid::parse(&full) {
                    send_xml(server, &to, notification(owner, &full, &inner));
                }
            }
        }
    }
}

fn limits(server: &Server) -> PepLimits {
    PepLimits {
        max_nodes: server.config.pep.max_nodes,
        max_items: server.config.pep.max_items,
    }
}

/// A pubsub error: a stanza error plus a pubsub-specific condition.
fn pubsub_error(
    iq: &Element,
    condition: StanzaError,
    specific: Option<&str>,
    text: Option<&str>,
) -> Element {
    let mut reply = iq_error(iq, condition, text);
    if let (Some(name), Some(err)) = (specific, reply.get_child_mut("error", &iq.ns)) {
        err.children
            .push(Node::Element(Element::new(name, NS_ERRORS)));
    }
    reply
}

fn refused(iq: &Element, e: ApplyError) -> Element {
    match e {
        ApplyError::Refused(r) => match r {
            Refusal::NoPepNode { .. } | Refusal::NoPepItem { .. } | Refusal::NoSuchAccount(_) => {
                iq_error(iq, StanzaError::ItemNotFound, None)
            }
            Refusal::PepNodeExists(_) => iq_error(iq, StanzaError::Conflict, None),
            Refusal::PepPrecondition(field) => pubsub_error(
                iq,
                StanzaError::Conflict,
                Some("precondition-not-met"),
                Some(&format!(
                    "the node's {field} differs from the publish-options"
                )),
            ),
            Refusal::TooManyPepNodes { max, .. } => iq_error(
                iq,
                StanzaError::NotAllowed,
                Some(&format!("at most {max} PEP nodes per account")),
            ),
            other => iq_error(iq, StanzaError::NotAcceptable, Some(&other.to_string())),
        },
        ApplyError::Unavailable(m) => iq_error(
            iq,
            StanzaError::ResourceConstraint,
            Some(&format!("cannot save now, try again: {m}")),
        ),
        ApplyError::Store(e) => {
            tracing::error!(error = %e, "PEP write failed");
            iq_error(iq, StanzaError::InternalServerError, None)
        }
    }
}

/// Node configuration fields from a form (`node_config` or
/// `publish-options`): unknown fields are refused, as XEP-0060 asks.
fn read_options(form: &Submitted) -> Result<PepOptions, String> {
    let mut o = PepOptions::default();
    for var in form.vars() {
        let v = form.value(var).unwrap_or("").trim();
        match var {
            "pubsub#access_model" => {
                o.access = Some(PepAccess::parse(v).ok_or_else(|| {
                    format!("access model {v:?} is not supported (presence, open, whitelist)")
                })?)
            }
            "pubsub#persist_items" => {
                o.persist = Some(match v {
                    "1" | "true" => true,
                    "0" | "false" => false,
                    _ => return Err(format!("pubsub#persist_items {v:?} is not a boolean")),
                })
            }
            "pubsub#max_items" => {
                o.max_items = Some(
                    MaxItems::parse(v)
                        .ok_or_else(|| format!("pubsub#max_items {v:?} is not a number or max"))?,
                )
            }
            // Always on for PEP, or not ours to change: accepted as they are.
            "pubsub#deliver_notifications"
            | "pubsub#deliver_payloads"
            | "pubsub#notify_retract"
            | "pubsub#notify_delete"
            | "pubsub#send_last_published_item"
            | "pubsub#presence_based_delivery"
            | "pubsub#title"
            | "pubsub#type"
            | "pubsub#notify_config"
            | "pubsub#notify_sub"
            | "pubsub#max_payload_size"
            | "pubsub#itemreply"
            | "pubsub#publish_model" => {}
            other => return Err(format!("field {other} is not supported")),
        }
    }
    Ok(o)
}

fn config_form(c: &PepConfig) -> Element {
    forms::build(
        "form",
        Some(NODE_CONFIG),
        vec![
            Field::new("pubsub#access_model", "list-single").value(c.access.as_str()),
            Field::new("pubsub#persist_items", "boolean").value(if c.persist { "1" } else { "0" }),
            Field::new("pubsub#max_items", "text-single").value(c.max_items.text()),
            Field::new("pubsub#send_last_published_item", "list-single")
                .value("on_sub_and_presence"),
            Field::new("pubsub#deliver_notifications", "boolean").value("1"),
        ],
    )
}

impl Module for Pep {
    fn name(&self) -> &'static str {
        "pep"
    }

    fn handles(&self, namespace: &str, target: &IqTarget) -> bool {
        (namespace == NS || namespace == NS_OWNER) && matches!(target, IqTarget::Account(_))
    }

    fn account_identities(&self) -> &'static [Identity] {
        &[Identity {
            category: "pubsub",
            kind: "pep",
            name: "",
        }]
    }

    fn account_features(&self) -> &'static [&'static str] {
        &[
            NS,
            "http://jabber.org/protocol/pubsub#access-open",
            "http://jabber.org/protocol/pubsub#access-presence",
            "http://jabber.org/protocol/pubsub#access-whitelist",
            "http://jabber.org/protocol/pubsub#auto-create",
            "http://jabber.org/protocol/pubsub#auto-subscribe",
            "http://jabber.org/protocol/pubsub#config-node",
            "http://jabber.org/protocol/pubsub#config-node-max",
            "http://jabber.org/protocol/pubsub#create-and-configure",
            "http://jabber.org/protocol/pubsub#create-nodes",
            "http://jabber.org/protocol/pubsub#delete-items",
            "http://jabber.org/protocol/pubsub#delete-nodes",
            "http://jabber.org/protocol/pubsub#filtered-notifications",
            "http://jabber.org/protocol/pubsub#item-ids",
            "http://jabber.org/protocol/pubsub#last-published",
            "http://jabber.org/protocol/pubsub#multi-items",
            "http://jabber.org/protocol/pubsub#persistent-items",
            "http://jabber.org/protocol/pubsub#presence-notifications",
            "http://jabber.org/protocol/pubsub#publish",
            "http://jabber.org/protocol/pubsub#publish-options",
            "http://jabber.org/protocol/pubsub#purge-nodes",
            "http://jabber.org/protocol/pubsub#retract-items",
            "http://jabber.org/protocol/pubsub#retrieve-items",
        ]
    }

    fn features(&self) -> &'static [&'static str] {
        // XEP-0163 §6: the server supports PEP on its accounts.
        &["http://jabber.org/protocol/pubsub#pep"]
    }

    fn on_presence_available<'a>(
        &'a self,
        server: &'a Server,
        session: &'a FullJid,
        initial: bool,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let presence = server
                .sessions
                .get(session)
                .and_then(|r| r.presence.clone());
            let caps = presence
                .as_deref()
                .and_then(|p| xmpp::xml::parse_element(p, ns::CLIENT).ok())
                .and_then(|e| Caps::of(&e));
            // Last items at the first presence, and when the caps change
            // (a client that learns a new +notify after login).
            if let Some(caps) = caps {
                let known = self.features(&caps.ver).is_some();
                if initial || !known {
                    let from = session.domain().to_owned();
                    self.with_features(server, caps, session, &from, Then::Local(session.clone()));
                }
            }
        })
    }

    fn on_presence_routed(&self, server: &Server, stanza: &Element, from: &Jid, to: &Jid) {
        // A remote contact's session telling a local user it is available.
        let (Jid::Full(from), Some(_)) = (from, to.node()) else {
            return;
        };
        if server.config.is_local_domain(from.domain())
            || !server.config.is_local_domain(to.domain())
        {
            return;
        }
        match PresenceType::of(stanza) {
            Some(PresenceType::Available) => {
                let caps = Caps::of(stanza);
                self.remember_remote(from, caps.as_ref().map(|c| c.ver.clone()));
                if let Some(caps) = caps {
                    let then = Then::Remote {
                        from: from.clone(),
                        owner: to.bare().clone(),
                    };
                    self.with_features(server, caps, from, to.domain(), then);
                }
            }
            Some(PresenceType::Unavailable) => self.remember_remote(from, None),
            _ => {}
        }
    }

    fn on_iq_response<'a>(&'a self, server: &'a Server, iq: &'a Element) -> BoxFuture<'a, bool> {
        let mine =
            iq.get_attr("id").is_some_and(|id| id.starts_with("caps")) && self.answered(server, iq);
        Box::pin(async move { mine })
    }

    fn on_applied(&self, server: &Server, effect: &Effect) {
        if let Effect::Pep {
            owner,
            node,
            access,
            event,
        } = effect
        {
            notify(server, self, owner, node, *access, event);
        }
    }

    fn handle_iq<'a>(
        &'a self,
        server: &'a Server,
        req: IqRequest<'a>,
    ) -> BoxFuture<'a, Option<Element>> {
        Box::pin(async move { Some(handle(server, &req).await.unwrap_or_else(|e| e)) })
    }
}

async fn handle(server: &Server, req: &IqRequest<'_>) -> Result<Element, Element> {
    let IqTarget::Account(owner) = &req.target else {
        return Err(iq_error(req.iq, StanzaError::ServiceUnavailable, None));
    };
    let own = req.to_own_account();
    let iq = req.iq;
    let p = req.payload;
    let o = owner.to_string();
    let first = p
        .elements()
        .next()
        .ok_or_else(|| iq_error(iq, StanzaError::BadRequest, None))?;
    let node = first.get_attr("node").unwrap_or("").to_owned();
    let needs_node = || {
        if node.is_empty() {
            Err(pubsub_error(
                iq,
                StanzaError::BadRequest,
                Some("nodeid-required"),
                None,
            ))
        } else {
            Ok(())
        }
    };
    let owner_only = || {
        if own {
            Ok(())
        } else {
            Err(iq_error(iq, StanzaError::Forbidden, None))
        }
    };
    let write =
        |cmd: Command| async move { server.cluster.write(cmd).await.map_err(|e| refused(iq, e)) };
    match (p.ns.as_str(), first.name.as_str(), req.is_set()) {
        (NS, "publish", true) => {
            owner_only()?;
            needs_node()?;
            let items: Vec<&Element> = first.elements().filter(|e| e.is("item", NS)).collect();
            let [item] = items.as_slice() else {
                return Err(pubsub_error(
                    iq,
                    StanzaError::BadRequest,
                    Some("invalid-payload"),
                    Some("publish one item"),
                ));
            };
            let payloads: Vec<&Element> = item.elements().collect();
            let [payload] = payloads.as_slice() else {
                return Err(pubsub_error(
                    iq,
                    StanzaError::BadRequest,
                    Some("invalid-payload"),
                    Some("an item carries one payload element"),
                ));
            };
            let payload = payload.to_string_in("");
            if payload.len() > server.config.pep.max_item_bytes {
                return Err(pubsub_error(
                    iq,
                    StanzaError::NotAcceptable,
                    Some("payload-too-big"),
                    Some(&format!(
                        "items are limited to {} bytes",
                        server.config.pep.max_item_bytes
                    )),
                ));
            }
            let options = match p
                .get_child("publish-options", NS)
                .and_then(|po| po.get_child("x", forms::NS))
                .and_then(Submitted::read)
            {
                Some(form) => {
                    if form.form_type().is_some_and(|t| t != PUBLISH_OPTIONS) {
                        return Err(iq_error(
                            iq,
                            StanzaError::BadRequest,
                            Some("publish-options need FORM_TYPE pubsub#publish-options"),
                        ));
                    }
                    Some(read_options(&form).map_err(|m| {
                        pubsub_error(
                            iq,
                            StanzaError::Conflict,
                            Some("precondition-not-met"),
                            Some(&m),
                        )
                    })?)
                }
                None => None,
            };
            let id = item
                .get_attr("id")
                .filter(|i| !i.is_empty())
                .map(str::to_owned)
                .unwrap_or_else(|| format!("{:016x}", rand::thread_rng().gen::<u64>()));
            write(Command::PepPublish {
                owner: o,
                node: node.clone(),
                item: PepItem {
                    id: id.clone(),
                    payload,
                },
                options,
                limits: limits(server),
            })
            .await?;
            Ok(iq_result(iq).child(
                Element::new("pubsub", NS).child(
                    Element::new("publish", NS)
                        .attr("node", node)
                        .child(Element::new("item", NS).attr("id", id)),
                ),
            ))
        }
        (NS, "retract", true) => {
            owner_only()?;
            needs_node()?;
            let ids: Vec<String> = first
                .elements()
                .filter(|e| e.is("item", NS))
                .filter_map(|e| e.get_attr("id").map(str::to_owned))
                .collect();
            if ids.is_empty() {
                return Err(pubsub_error(
                    iq,
                    StanzaError::BadRequest,
                    Some("item-required"),
                    None,
                ));
            }
            write(Command::PepRetract {
                owner: o,
                node,
                ids,
            })
            .await?;
            Ok(iq_result(iq))
        }
        (NS, "items", false) => {
            needs_node()?;
            server.cluster.read_barrier().await;
            let store = server.store();
            let n = store
                .pep_node(&o, &node)
                .ok()
                .flatten()
                .ok_or_else(|| iq_error(iq, StanzaError::ItemNotFound, None))?;
            if !may_read(server, owner, n.config.access, req.from.bare()) {
                let specific = match n.config.access {
                    PepAccess::Presence => "presence-subscription-required",
                    _ => "closed-node",
                };
                return Err(pubsub_error(
                    iq,
                    StanzaError::NotAuthorized,
                    Some(specific),
                    None,
                ));
            }
            let asked: Vec<&str> = first
                .elements()
                .filter(|e| e.is("item", NS))
                .filter_map(|e| e.get_attr("id"))
                .collect();
            let mut items = Vec::new();
            if asked.is_empty() {
                let max = first
                    .get_attr("max_items")
                    .and_then(|m| m.parse().ok())
                    .unwrap_or(usize::MAX);
                let mut newest = store.pep_items(&o, &node, max).unwrap_or_default();
                // Oldest first, as they were published.
                newest.reverse();
                items = newest;
            } else {
                for id in asked {
                    if let Some(i) = store.pep_item(&o, &node, id).ok().flatten() {
                        items.push(i);
                    }
                }
            }
            let mut list = Element::new("items", NS).attr("node", node.as_str());
            for i in items {
                let payload = xmpp::xml::parse_element(&i.payload, "")
                    .map_err(|_| iq_error(iq, StanzaError::InternalServerError, None))?;
                list = list.child(Element::new("item", NS).attr("id", i.id).child(payload));
            }
            Ok(iq_result(iq).child(Element::new("pubsub", NS).child(list)))
        }
        (NS, "create", true) => {
            owner_only()?;
            needs_node()?;
            let mut config = PepConfig::default();
            if let Some(form) = p
                .get_child("configure", NS)
                .and_then(|c| c.get_child("x", forms::NS))
                .and_then(Submitted::read)
            {
                let o = read_options(&form)
                    .map_err(|m| iq_error(iq, StanzaError::NotAcceptable, Some(&m)))?;
                apply_options(&mut config, o);
            }
            write(Command::PepCreate {
                owner: o,
                node,
                config,
                limits: limits(server),
            })
            .await?;
            Ok(iq_result(iq))
        }
        (NS, "subscribe" | "unsubscribe" | "subscriptions" | "affiliations" | "options", _) => {
            Err(pubsub_error(
                iq,
                StanzaError::FeatureNotImplemented,
                Some("unsupported"),
                Some("PEP notifications follow presence subscriptions and +notify (XEP-0163)"),
            ))
        }
        (NS_OWNER, "configure", false) => {
            owner_only()?;
            needs_node()?;
            let n = server
                .store()
                .pep_node(&o, &node)
                .ok()
                .flatten()
                .ok_or_else(|| iq_error(iq, StanzaError::ItemNotFound, None))?;
            Ok(iq_result(iq).child(
                Element::new("pubsub", NS_OWNER).child(
                    Element::new("configure", NS_OWNER)
                        .attr("node", node)
                        .child(config_form(&n.config)),
                ),
            ))
        }
        (NS_OWNER, "configure", true) => {
            owner_only()?;
            needs_node()?;
            let n = server
                .store()
                .pep_node(&o, &node)
                .ok()
                .flatten()
                .ok_or_else(|| iq_error(iq, StanzaError::ItemNotFound, None))?;
            let form = first
                .get_child("x", forms::NS)
                .and_then(Submitted::read)
                .ok_or_else(|| iq_error(iq, StanzaError::BadRequest, Some("a node_config form")))?;
            let opts = read_options(&form)
                .map_err(|m| iq_error(iq, StanzaError::NotAcceptable, Some(&m)))?;
            let mut config = n.config;
            apply_options(&mut config, opts);
            write(Command::PepConfigure {
                owner: o,
                node,
                config,
                limits: limits(server),
            })
            .await?;
            Ok(iq_result(iq))
        }
        (NS_OWNER, "delete", true) => {
            owner_only()?;
            needs_node()?;
            write(Command::PepDelete { owner: o, node }).await?;
            Ok(iq_result(iq))
        }
        (NS_OWNER, "purge", true) => {
            owner_only()?;
            needs_node()?;
            write(Command::PepPurge { owner: o, node }).await?;
            Ok(iq_result(iq))
        }
        _ => Err(pubsub_error(
            iq,
            StanzaError::FeatureNotImplemented,
            Some("unsupported"),
            None,
        )),
    }
}

fn apply_options(c: &mut PepConfig, o: PepOptions) {
    if let Some(a) = o.access {
        c.access = a;
    }
    if let Some(p) = o.persist {
        c.persist = p;
    }
    if let Some(m) = o.max_items {
        c.max_items = m;
    }
}
