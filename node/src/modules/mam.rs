//! Message Archive Management (XEP-0313, `urn:xmpp:mam:2`) for user
//! archives, with Unique and Stable Stanza IDs (XEP-0359).
//!
//! Every chat message a local user sends or receives goes into that
//! user's archive before it is routed: one replicated write
//! ([`Command::Archive`]) holds it for both parties when both are ours,
//! and the recipient's copy carries `<stanza-id/>` naming its place in
//! the recipient's archive. A second device, or the same one after a
//! night offline, pages through the archive by time, by correspondent or
//! from an id it already has (RSM, XEP-0059). Archive ids are the
//! archive time in microseconds, unique and increasing per user, so one
//! user's archive is one ordered key range: the last page of a deep
//! archive is read from its end, never scanned to.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use xmpp::element::{escape, Element, Node};
use xmpp::error::StanzaError;
use xmpp::forms::{self, Field, Submitted};
use xmpp::jid::{BareJid, Jid};
use xmpp::stanza::{iq_result, MessageType};

use super::{iq_error, BoxFuture, IqRequest, IqTarget, Module};
use crate::cluster::state_machine::{
    ApplyError, ArchiveItem, ArchiveOwner, ArchivePolicy, Command, Refusal, Response,
};
use crate::modules::offline::utc_stamp;
use crate::store::{ArchiveDefault, ArchivePrefs, Archived};
use crate::Server;

pub const NS: &str = "urn:xmpp:mam:2";
/// `before-id`, `after-id`, `ids` and `<metadata/>` (XEP-0313 §8).
pub const NS_EXTENDED: &str = "urn:xmpp:mam:2#extended";
pub const NS_SID: &str = "urn:xmpp:sid:0";
pub const NS_RSM: &str = "http://jabber.org/protocol/rsm";
const NS_FORWARD: &str = "urn:xmpp:forward:0";
const NS_DELAY: &str = "urn:xmpp:delay";
const NS_HINTS: &str = "urn:xmpp:hints";

#[derive(Default)]
pub struct Mam {
    batcher: std::sync::OnceLock<Batcher>,
}

/// What one message asks of the archive, and where its ids go.
type Job = (
    ArchiveItem,
    tokio::sync::oneshot::Sender<Result<Vec<Option<u64>>, String>>,
);

/// The archive's group commit: messages waiting to be archived share one
/// replicated write. The first waits `mam.batch_ms` for company; while a
/// write is in flight, the next batch gathers on its own.
struct Batcher {
    jobs: tokio::sync::mpsc::UnboundedSender<Job>,
}

impl Batcher {
    fn start(server: &Server) -> Batcher {
        let (jobs, mut rx) = tokio::sync::mpsc::unbounded_channel::<Job>();
        // Weak: the server owns this module, the task must not own the server.
        let me = server.arc().map(|s| Arc::downgrade(&s));
        let linger = Duration::from_millis(server.config.mam.batch_ms);
        tokio::spawn(async move {
            while let Some(first) = rx.recv().await {
                let Some(server) = me.as_ref().and_then(std::sync::Weak::upgrade) else {
                    return;
                };
                let mut batch = vec![first];
                let until = tokio::time::Instant::now() + linger;
                while batch.len() < MAX_BATCH {
                    match tokio::time::timeout_at(until, rx.recv()).await {
                        Ok(Some(j)) => batch.push(j),
                        Ok(None) | Err(_) => break,
                    }
                }
                let (items, dones): (Vec<ArchiveItem>, Vec<_>) = batch.into_iter().unzip();
                let cmd = Command::ArchiveBatch {
                    items,
                    policy: policy(&server),
                };
                match server.cluster.write(cmd).await {
                    Ok(Response::ArchivedBatch(all)) if all.len() == dones.len() => {
                        for (done, ids) in dones.into_iter().zip(all) {
                            let _ = done.send(Ok(ids));
                        }
                    }
                    Ok(other) => {
                        for done in dones {
                            let _ = done.send(Err(format!("unexpected answer {other:?}")));
                        }
                    }
                    Err(e) => {
                        let e = e.to_string();
                        for done in dones {
                            let _ = done.send(Err(e.clone()));
                        }
                    }
                }
            }
        });
        Batcher { jobs }
    }
}

/// Most messages in one archive write.
const MAX_BATCH: usize = 256;

/// XEP-0313 §5.1.1 with the hints of XEP-0334: messages a person reads
/// (a body, or an end-to-end encrypted payload in place of one), unless
/// the sender asked for them not to be stored; never errors, headlines
/// or group chat (a room keeps its own archive).
pub fn archivable(m: &Element) -> bool {
    match MessageType::of(m) {
        MessageType::Chat | MessageType::Normal => {}
        _ => return false,
    }
    if m.has_child("no-store", NS_HINTS) || m.has_child("no-permanent-store", NS_HINTS) {
        return false;
    }
    m.has_child("body", &m.ns)
        || m.has_child("store", NS_HINTS)
        || m.has_child("encrypted", "eu.siacs.conversations.axolotl")
        || m.has_child("encrypted", "urn:xmpp:omemo:2")
        || m.has_child("openpgp", "urn:xmpp:openpgp:0")
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// An archive id as clients see it (opaque to them).
fn id_text(id: u64) -> String {
    id.to_string()
}

fn parse_id(s: &str) -> Option<u64> {
    s.trim().parse().ok()
}

/// XEP-0082 DateTime to microseconds since the epoch.
fn parse_time(s: &str) -> Option<u64> {
    let t = time::OffsetDateTime::parse(s.trim(), &time::format_description::well_known::Rfc3339)
        .ok()?;
    u64::try_from(t.unix_timestamp_nanos() / 1000).ok()
}

/// The archive time of an id, to the microsecond (so a stamp given back
/// as `start` or `end` selects exactly that message).
fn stamp(id: u64) -> String {
    let secs = utc_stamp(UNIX_EPOCH + Duration::from_secs(id / 1_000_000));
    let whole = secs.strip_suffix(".000Z").unwrap_or(&secs);
    format!("{whole}.{:06}Z", id % 1_000_000)
}

fn policy(server: &Server) -> ArchivePolicy {
    let c = &server.config.mam;
    ArchivePolicy {
        default: ArchiveDefault::parse(&c.default).unwrap_or_default(),
        max_messages: c.max_messages_per_user,
        retention_micros: c.retention_days.saturating_mul(86_400_000_000),
    }
}

/// The oldest id a query may still return (older ones are past the
/// retention period, even while they wait to be deleted).
fn oldest_visible(server: &Server) -> u64 {
    match server.config.mam.retention_days {
        0 => 0,
        d => now_micros().saturating_sub(d.saturating_mul(86_400_000_000)),
    }
}

impl Module for Mam {
    fn name(&self) -> &'static str {
        "mam"
    }

    fn handles(&self, namespace: &str, target: &IqTarget) -> bool {
        namespace == NS && matches!(target, IqTarget::Account(_))
    }

    fn account_features(&self) -> &'static [&'static str] {
        &[NS, NS_EXTENDED, NS_SID]
    }

    fn features(&self) -> &'static [&'static str] {
        &[NS_SID]
    }

    fn before_message_routed<'a>(
        &'a self,
        server: &'a Server,
        message: &'a mut Element,
        from: &'a Jid,
        to: &'a Jid,
    ) -> BoxFuture<'a, ()> {
        Box::pin(archive(self, server, message, from, to))
    }

    fn handle_iq<'a>(
        &'a self,
        server: &'a Server,
        req: IqRequest<'a>,
    ) -> BoxFuture<'a, Option<Element>> {
        Box::pin(async move {
            // Only one's own archive (a room's is the room's).
            if !req.to_own_account() {
                return Some(iq_error(req.iq, StanzaError::Forbidden, None));
            }
            if !req.is_set() || req.payload.name == "query" {
                // Reads see every write acknowledged anywhere in the
                // cluster before them (a message sent through another node).
                server.cluster.read_barrier().await;
            }
            let reply = match (req.payload.name.as_str(), req.is_set()) {
                ("query", true) => query(server, &req),
                ("query", false) => Ok(query_form(&req)),
                ("prefs", false) => prefs_get(server, &req),
                ("prefs", true) => prefs_set(server, &req).await,
                ("metadata", false) => metadata(server, &req),
                _ => Err(iq_error(req.iq, StanzaError::FeatureNotImplemented, None)),
            };
            Some(reply.unwrap_or_else(|e| e))
        })
    }
}

/// Stamps and archives a message about to be routed.
async fn archive(mam: &Mam, server: &Server, message: &mut Element, from: &Jid, to: &Jid) {
    let local_to = server.config.is_local_domain(to.domain()) && to.node().is_some();
    let to_bare = to.bare().clone();
    if local_to {
        // XEP-0359 §5: only we say what our ids are; a `<stanza-id/>` that
        // claims to be ours came from someone else.
        let ours = to_bare.to_string();
        message.children.retain(|c| match c {
            Node::Element(e) => !(e.is("stanza-id", NS_SID) && e.get_attr("by") == Some(&ours)),
            Node::Text(_) => true,
        });
    }
    if !archivable(message) {
        return;
    }
    let from_bare = from.bare().clone();
    let mut owners = Vec::with_capacity(2);
    if server.config.is_local_domain(from.domain()) && from.node().is_some() {
        owners.push(ArchiveOwner {
            user: from_bare.to_string(),
            with: to_bare.to_string(),
            peer: to.to_string(),
        });
    }
    let recipient_at = if local_to && to_bare != from_bare {
        owners.push(ArchiveOwner {
            user: to_bare.to_string(),
            with: from_bare.to_string(),
            peer: from.to_string(),
        });
        Some(owners.len() - 1)
    } else if local_to {
        // A note to oneself: one archive entry, seen as received too.
        Some(0).filter(|_| !owners.is_empty())
    } else {
        None
    };
    if owners.is_empty() {
        return;
    }
    let item = ArchiveItem {
        ts: now_micros(),
        stanza: message.to_string_in(""),
        owners,
    };
    let (done, ids) = tokio::sync::oneshot::channel();
    let batcher = mam.batcher.get_or_init(|| Batcher::start(server));
    if batcher.jobs.send((item, done)).is_err() {
        return tracing::warn!("message not archived: the archive writer stopped");
    }
    match ids.await {
        Ok(Ok(ids)) => {
            if let Some(id) = recipient_at.and_then(|i| ids.get(i).copied().flatten()) {
                message.children.push(Node::Element(
                    Element::new("stanza-id", NS_SID)
                        .attr("by", to_bare.to_string())
                        .attr("id", id_text(id)),
                ));
            }
        }
        // The message still goes out (it is the conversation that matters
        // now); it is only missing from the archive, and says so by
        // carrying no stanza id.
        Ok(Err(e)) => tracing::warn!(error = %e, "message not archived"),
        Err(_) => tracing::warn!("message not archived: the archive writer stopped"),
    }
}

/// What a query asks for, read from its form and RSM set.
struct Query {
    with: Option<Jid>,
    lo: u64,
    hi: u64,
    ids: Vec<u64>,
    /// Page from the end backwards (RSM `<before/>`).
    backwards: bool,
    max: usize,
    /// Time or correspondent filters: the total is not known cheaply.
    filtered: bool,
}

fn bad(req: &IqRequest<'_>, text: &str) -> Element {
    iq_error(req.iq, StanzaError::BadRequest, Some(text))
}

fn read_query(server: &Server, user: &str, req: &IqRequest<'_>) -> Result<Query, Element> {
    let mut q = Query {
        with: None,
        lo: oldest_visible(server),
        hi: u64::MAX,
        ids: Vec::new(),
        backwards: false,
        max: server.config.mam.default_page,
        filtered: false,
    };
    let exists = |id: u64| server.store().archived(user, id).ok().flatten().is_some();
    let not_found = |what: &str| {
        iq_error(
            req.iq,
            StanzaError::ItemNotFound,
            Some(&format!("no message {what} in the archive")),
        )
    };
    if let Some(x) = req.payload.get_child("x", forms::NS) {
        let form = Submitted::read(x).ok_or_else(|| bad(req, "not a data form"))?;
        if form.form_type().is_some_and(|t| t != NS) {
            return Err(bad(req, "FORM_TYPE must be urn:xmpp:mam:2"));
        }
        for var in form.vars() {
            let value = form.value(var).unwrap_or("");
            match var {
                "with" => {
                    let j = Jid::parse(value).map_err(|_| bad(req, "'with' is not a JID"))?;
                    q.with = Some(j);
                    q.filtered = true;
                }
                "start" => {
                    let t = parse_time(value)
                        .ok_or_else(|| bad(req, "'start' is not an XEP-0082 DateTime"))?;
                    q.lo = q.lo.max(t);
                    q.filtered = true;
                }
                "end" => {
                    let t = parse_time(value)
                        .ok_or_else(|| bad(req, "'end' is not an XEP-0082 DateTime"))?;
                    q.hi = q.hi.min(t.saturating_add(1));
                    q.filtered = true;
                }
                "after-id" => {
                    let id = parse_id(value).filter(|id| exists(*id));
                    let id = id.ok_or_else(|| not_found(value))?;
                    q.lo = q.lo.max(id + 1);
                }
                "before-id" => {
                    let id = parse_id(value).filter(|id| exists(*id));
                    let id = id.ok_or_else(|| not_found(value))?;
                    q.hi = q.hi.min(id);
                }
                "ids" => {
                    for v in form.values(var) {
                        q.ids.push(parse_id(v).ok_or_else(|| not_found(v))?);
                    }
                }
                other => {
                    return Err(iq_error(
                        req.iq,
                        StanzaError::FeatureNotImplemented,
                        Some(&format!("field '{other}' is not supported")),
                    ))
                }
            }
        }
    }
    if let Some(set) = req.payload.get_child("set", NS_RSM) {
        if let Some(max) = set.child_text("max", NS_RSM) {
            let max: usize = max
                .trim()
                .parse()
                .map_err(|_| bad(req, "RSM <max/> is not a number"))?;
            q.max = max.min(server.config.mam.max_page);
        }
        if let Some(after) = set.get_child("after", NS_RSM) {
            let text = after.text_content();
            let id = parse_id(&text).filter(|id| exists(*id));
            q.lo = q.lo.max(id.ok_or_else(|| not_found(&text))? + 1);
        }
        if let Some(before) = set.get_child("before", NS_RSM) {
            q.backwards = true;
            let text = before.text_content();
            if !text.trim().is_empty() {
                let id = parse_id(&text).filter(|id| exists(*id));
                q.hi = q.hi.min(id.ok_or_else(|| not_found(&text))?);
            }
        }
        if set.has_child("index", NS_RSM) {
            return Err(iq_error(
                req.iq,
                StanzaError::FeatureNotImplemented,
                Some("RSM <index/> is not supported; page with <after/> or <before/>"),
            ));
        }
    }
    Ok(q)
}

/// An archive query (XEP-0313 §4): the results as messages to the
/// requesting resource, then the IQ result with `<fin/>`.
fn query(server: &Server, req: &IqRequest<'_>) -> Result<Element, Element> {
    query_archive(server, req, &req.from.bare().to_string())
}

/// A query of `user`'s archive (an account's, or a room's: XEP-0313 §5 on
/// a room JID), answered to the requesting resource.
pub fn query_archive(server: &Server, req: &IqRequest<'_>, user: &str) -> Result<Element, Element> {
    let user = user.to_owned();
    let q = read_query(server, &user, req)?;
    let store = server.store();
    let internal = |e: crate::store::StoreError| {
        tracing::error!(error = %e, "archive read failed");
        iq_error(req.iq, StanzaError::InternalServerError, None)
    };
    let mut page: Vec<(u64, Archived)> = Vec::new();
    let complete;
    if !q.ids.is_empty() {
        for id in &q.ids {
            match store.archived(&user, *id).map_err(internal)? {
                Some(a) if *id >= q.lo => page.push((*id, a)),
                _ => return Err(iq_error(req.iq, StanzaError::ItemNotFound, None)),
            }
        }
        complete = true;
    } else {
        let with_bare = q.with.as_ref().map(|j| j.bare().to_string());
        let full = q.with.as_ref().filter(|j| j.resource().is_some());
        let full = full.map(|j| j.to_string());
        let matches = |a: &Archived| full.as_ref().is_none_or(|f| &a.peer == f);
        for item in store.archive_range(&user, with_bare.as_deref(), q.lo, q.hi, q.backwards) {
            let (id, a) = item.map_err(internal)?;
            if !matches(&a) {
                continue;
            }
            page.push((id, a));
            if page.len() > q.max {
                break;
            }
        }
        complete = page.len() <= q.max;
        page.truncate(q.max);
        if q.backwards {
            page.reverse();
        }
    }
    let queryid = req.payload.get_attr("queryid");
    let owner = escape(&user);
    let to = escape(&req.from.to_string());
    for (id, a) in &page {
        let mut xml = String::with_capacity(a.stanza.len() + 320);
        xml.push_str("<message from='");
        xml.push_str(&owner);
        xml.push_str("' to='");
        xml.push_str(&to);
        xml.push_str("'><result xmlns='");
        xml.push_str(NS);
        xml.push('\'');
        if let Some(qid) = queryid {
            xml.push_str(" queryid='");
            xml.push_str(&escape(qid));
            xml.push('\'');
        }
        xml.push_str(" id='");
        xml.push_str(&id_text(*id));
        xml.push_str("'><forwarded xmlns='");
        xml.push_str(NS_FORWARD);
        xml.push_str("'><delay xmlns='");
        xml.push_str(NS_DELAY);
        xml.push_str("' stamp='");
        xml.push_str(&stamp(*id));
        xml.push_str("'/>");
        // Stored with its own namespace declaration, as we serialised it.
        xml.push_str(&a.stanza);
        xml.push_str("</forwarded></result></message>");
        crate::router::deliver_reply_xml(server, req.from, Arc::from(xml));
    }
    let mut set = Element::new("set", NS_RSM);
    if let (Some((first, _)), Some((last, _))) = (page.first(), page.last()) {
        set = set
            .child(Element::new("first", NS_RSM).text(id_text(*first)))
            .child(Element::new("last", NS_RSM).text(id_text(*last)));
    }
    if !q.filtered && q.ids.is_empty() {
        let meta = store.archive_meta(&user).map_err(internal)?;
        set = set.child(Element::new("count", NS_RSM).text(meta.count.to_string()));
    }
    let mut fin = Element::new("fin", NS).child(set);
    if complete {
        fin = fin.attr("complete", "true");
    }
    Ok(iq_result(req.iq).child(fin))
}

/// XEP-0313 §4.1.1: the fields a query form may carry.
fn query_form(req: &IqRequest<'_>) -> Element {
    let fields = vec![
        Field::new("with", "jid-single"),
        Field::new("start", "text-single"),
        Field::new("end", "text-single"),
        Field::new("after-id", "text-single"),
        Field::new("before-id", "text-single"),
        Field::new("ids", "list-multi"),
    ];
    iq_result(req.iq).child(Element::new("query", NS).child(forms::build("form", Some(NS), fields)))
}

/// XEP-0313 §8.1 (`#extended`): the first and last messages of the archive.
fn metadata(server: &Server, req: &IqRequest<'_>) -> Result<Element, Element> {
    let user = req.from.bare().to_string();
    let store = server.store();
    let lo = oldest_visible(server);
    let end = |rev: bool| {
        store
            .archive_range(&user, None, lo, u64::MAX, rev)
            .next()
            .and_then(Result::ok)
            .map(|(id, _)| id)
    };
    let mut m = Element::new("metadata", NS);
    for (name, id) in [("start", end(false)), ("end", end(true))] {
        if let Some(id) = id {
            m = m.child(
                Element::new(name, NS)
                    .attr("id", id_text(id))
                    .attr("timestamp", stamp(id)),
            );
        }
    }
    Ok(iq_result(req.iq).child(m))
}

fn prefs_element(prefs: &ArchivePrefs) -> Element {
    let list = |name: &str, jids: &[String]| {
        jids.iter().fold(Element::new(name, NS), |e, j| {
            e.child(Element::new("jid", NS).text(j.as_str()))
        })
    };
    Element::new("prefs", NS)
        .attr("default", prefs.default.as_str())
        .child(list("always", &prefs.always))
        .child(list("never", &prefs.never))
}

fn prefs_get(server: &Server, req: &IqRequest<'_>) -> Result<Element, Element> {
    let user = req.from.bare().to_string();
    let prefs = server
        .store()
        .archive_prefs(&user)
        .map_err(|_| iq_error(req.iq, StanzaError::InternalServerError, None))?
        .unwrap_or_else(|| ArchivePrefs {
            default: policy(server).default,
            ..ArchivePrefs::default()
        });
    Ok(iq_result(req.iq).child(prefs_element(&prefs)))
}

async fn prefs_set(server: &Server, req: &IqRequest<'_>) -> Result<Element, Element> {
    let p = req.payload;
    let default = match p.get_attr("default") {
        Some(d) => ArchiveDefault::parse(d)
            .ok_or_else(|| bad(req, "default must be always, never or roster"))?,
        None => return Err(bad(req, "prefs need a default")),
    };
    let jids = |name: &str| -> Result<Vec<String>, Element> {
        let mut out = Vec::new();
        if let Some(list) = p.get_child(name, NS) {
            for j in list.elements().filter(|e| e.is("jid", NS)) {
                let jid = BareJid::parse(j.text_content().trim())
                    .map_err(|_| bad(req, "a <jid/> is not a bare JID"))?;
                out.push(jid.to_string());
            }
        }
        out.sort();
        out.dedup();
        Ok(out)
    };
    let prefs = ArchivePrefs {
        default,
        always: jids("always")?,
        never: jids("never")?,
    };
    if prefs.always.len() + prefs.never.len() > server.config.limits.max_roster_items {
        return Err(iq_error(
            req.iq,
            StanzaError::NotAcceptable,
            Some("too many JIDs in the preferences"),
        ));
    }
    let cmd = Command::SetArchivePrefs {
        user: req.from.bare().to_string(),
        prefs: prefs.clone(),
    };
    match server.cluster.write(cmd).await {
        Ok(_) => Ok(iq_result(req.iq).child(prefs_element(&prefs))),
        Err(ApplyError::Refused(Refusal::NoSuchAccount(_))) => {
            Err(iq_error(req.iq, StanzaError::ItemNotFound, None))
        }
        Err(ApplyError::Unavailable(m)) => Err(iq_error(
            req.iq,
            StanzaError::ResourceConstraint,
            Some(&format!("cannot save now, try again: {m}")),
        )),
        Err(e) => {
            tracing::error!(error = %e, "archive preferences not saved");
            Err(iq_error(req.iq, StanzaError::InternalServerError, None))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(xml: &str) -> Element {
        xmpp::xml::parse_element(xml, xmpp::stanza::ns::CLIENT).expect("xml")
    }

    #[test]
    fn what_is_archived() {
        assert!(archivable(&msg(
            "<message type='chat'><body>hi</body></message>"
        )));
        assert!(archivable(&msg("<message><body>hi</body></message>")));
        assert!(!archivable(&msg(
            "<message type='chat'><active xmlns='http://jabber.org/protocol/chatstates'/></message>"
        )));
        assert!(archivable(&msg(
            "<message type='chat'><encrypted xmlns='eu.siacs.conversations.axolotl'/></message>"
        )));
        assert!(archivable(&msg(
            "<message type='chat'><store xmlns='urn:xmpp:hints'/><x xmlns='jabber:x:oob'/></message>"
        )));
        assert!(!archivable(&msg(
            "<message type='chat'><body>hi</body><no-store xmlns='urn:xmpp:hints'/></message>"
        )));
        assert!(!archivable(&msg(
            "<message type='headline'><body>hi</body></message>"
        )));
        assert!(!archivable(&msg(
            "<message type='groupchat'><body>hi</body></message>"
        )));
        assert!(!archivable(&msg(
            "<message type='error'><body>hi</body></message>"
        )));
    }

    #[test]
    fn times_and_ids_read_back() {
        assert_eq!(parse_time("1970-01-01T00:00:01Z"), Some(1_000_000));
        assert_eq!(
            parse_time("2010-06-07T00:00:00.5+02:00"),
            Some(1_275_861_600_500_000)
        );
        assert_eq!(parse_time("yesterday"), None);
        for id in [
            1_795_640_458_000_001,
            1_795_640_458_123_456,
            1_795_640_458_999_999,
        ] {
            assert_eq!(parse_time(&stamp(id)), Some(id), "{}", stamp(id));
        }
        assert_eq!(stamp(1_275_861_600_500_000), "2010-06-06T22:00:00.500000Z");
        assert_eq!(
            parse_id(&id_text(1_275_861_600_500_001)),
            Some(1_275_861_600_500_001)
        );
        assert_eq!(parse_id("x"), None);
    }
}
