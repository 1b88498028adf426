//! Multi-User Chat (XEP-0045): the `conference.<vhost>` component.
//!
//! Rooms, affiliations and who is present live in the replicated state
//! (`cluster::state_machine::muc`, which also says how a room's live state
//! is owned: by the log, not by a node). This module turns stanzas into
//! those commands, and turns the [`MucEvent`]s every node applies into the
//! presence and messages for the occupants this node serves. Room messages
//! carry `<stanza-id/>` (XEP-0359) and `<occupant-id/>` (XEP-0421) and go
//! into the room's archive, which occupants query with XEP-0313 on the
//! room JID; self-pings (XEP-0410) are answered.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use base64::Engine as _;
use rand::Rng as _;
use sha2::{Digest as _, Sha256};
use xmpp::element::{escape, Element};
use xmpp::error::StanzaError;
use xmpp::forms::{self, Field, Submitted};
use xmpp::jid::{BareJid, FullJid, Jid};
use xmpp::stanza::{error_reply, iq_result, ns, MessageType, PresenceType};

use super::{BoxFuture, IqRequest, IqTarget, Module};
use crate::cluster::state_machine::muc::{MucCommand, MucEvent, Present};
use crate::cluster::state_machine::{ApplyError, ArchivePolicy, Command, Effect, Refusal};
use crate::modules::offline::utc_stamp;
use crate::sessions::Outbound;
use crate::store::{Affiliation, ArchiveDefault, Occupant, Role, Room, RoomConfig};
use crate::Server;

pub const NS: &str = "http://jabber.org/protocol/muc";
pub const NS_USER: &str = "http://jabber.org/protocol/muc#user";
pub const NS_OWNER: &str = "http://jabber.org/protocol/muc#owner";
pub const NS_ADMIN: &str = "http://jabber.org/protocol/muc#admin";
const NS_OCCUPANT_ID: &str = "urn:xmpp:occupant-id:0";
const NS_SID: &str = "urn:xmpp:sid:0";
const NS_DELAY: &str = "urn:xmpp:delay";
const NS_RETRACT: &str = "urn:xmpp:message-retract:1";
const NS_MODERATE: &str = "urn:xmpp:message-moderate:1";
const ROOMCONFIG: &str = "http://jabber.org/protocol/muc#roomconfig";
const ROOMINFO: &str = "http://jabber.org/protocol/muc#roominfo";

/// What a newcomer asked for in `<history/>` (XEP-0045 §7.2.14).
#[derive(Clone, Copy, Default)]
struct HistoryAsk {
    maxstanzas: Option<u32>,
    maxchars: Option<u64>,
    since_micros: Option<u64>,
}

#[derive(Default)]
pub struct Muc {
    /// History requests of joins this node proposed, by (room, real JID),
    /// taken when the join's event comes back.
    history: Mutex<HashMap<(String, String), HistoryAsk>>,
    /// Each occupant's message budget here: (tokens, last refill).
    budgets: Mutex<HashMap<(String, String), (f64, std::time::Instant)>>,
}

impl Muc {
    /// Takes one message from `real`'s budget in `room`; `false` when spent.
    fn spend(&self, server: &Server, room: &str, real: &str) -> bool {
        let m = &server.config.muc;
        let now = std::time::Instant::now();
        let mut b = self.budgets.lock().unwrap_or_else(|p| p.into_inner());
        if b.len() > 100_000 {
            // Forget idle entries rather than grow without bound.
            b.retain(|_, (t, at)| *t < m.message_burst || now.duration_since(*at).as_secs() < 60);
        }
        let (tokens, at) = b
            .entry((room.to_owned(), real.to_owned()))
            .or_insert((m.message_burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * m.messages_per_second)
            .min(m.message_burst);
        *at = now;
        if *tokens < 1.0 {
            return false;
        }
        *tokens -= 1.0;
        true
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as u64)
}

/// XEP-0421: the same for a user in a room on every node, and telling
/// nothing about who it is (keyed by the cluster's replicated secret).
async fn occupant_id(server: &Server, room: &str, user: &str) -> String {
    let secret = match server.store().secret("occupant-id").ok().flatten() {
        Some(s) => s,
        None => {
            let value: [u8; 32] = rand::thread_rng().gen();
            let _ = server
                .cluster
                .write(Command::InitSecret {
                    name: "occupant-id".into(),
                    value: value.to_vec(),
                })
                .await;
            server
                .store()
                .secret("occupant-id")
                .ok()
                .flatten()
                .unwrap_or_else(|| value.to_vec())
        }
    };
    let mut h = Sha256::new();
    h.update(&secret);
    h.update(room.as_bytes());
    h.update([0]);
    h.update(user.as_bytes());
    B64.encode(&h.finalize()[..18])
}

fn bare(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(b, _)| b)
}

/// Whether `to` may see occupants' real JIDs.
fn sees_jids(room: &Room, viewer: &Occupant) -> bool {
    room.config.whois_anyone || viewer.role == Role::Moderator
}

/// An occupant's presence in the room, rendered for each viewer
/// (XEP-0045 §7.2.3): the viewer's own gets 110, and real JIDs show where
/// the room or the viewer's role allows.
#[derive(Clone, Copy)]
struct Shown<'a> {
    nick: &'a str,
    occupant: &'a Occupant,
    unavailable: bool,
    codes: &'a [u16],
    reason: Option<&'a str>,
    /// The new nick, on the unavailable half of a nick change (303).
    new_nick: Option<&'a str>,
    /// The presence's own children (show, status, caps).
    children: &'a str,
}

impl<'a> Shown<'a> {
    /// Available, with the occupant's last presence, no status codes.
    fn present(nick: &'a str, occupant: &'a Occupant) -> Shown<'a> {
        Shown {
            nick,
            occupant,
            unavailable: false,
            codes: &[],
            reason: None,
            new_nick: None,
            children: &occupant.presence,
        }
    }

    fn render(&self, room_jid: &str, room: &Room, viewer: &Occupant) -> String {
        let o = self.occupant;
        let mut s = format!(
            "<presence from='{}/{}' to='{}'",
            escape(room_jid),
            escape(self.nick),
            escape(&viewer.real)
        );
        if self.unavailable {
            s.push_str(" type='unavailable'");
        }
        s.push('>');
        s.push_str(self.children);
        s.push_str(&format!(
            "<x xmlns='{NS_USER}'><item affiliation='{}' role='{}'",
            o.affiliation.as_str(),
            if self.unavailable {
                "none"
            } else {
                o.role.as_str()
            }
        ));
        if sees_jids(room, viewer) || o.real == viewer.real {
            s.push_str(&format!(" jid='{}'", escape(&o.real)));
        }
        if let Some(n) = self.new_nick {
            s.push_str(&format!(" nick='{}'", escape(n)));
        }
        match self.reason {
            Some(r) => s.push_str(&format!("><reason>{}</reason></item>", escape(r))),
            None => s.push_str("/>"),
        }
        for c in self.codes {
            s.push_str(&format!("<status code='{c}'/>"));
        }
        if o.real == viewer.real {
            s.push_str("<status code='110'/>");
        }
        s.push_str(&format!(
            "</x><occupant-id xmlns='{NS_OCCUPANT_ID}' id='{}'/></presence>",
            escape(&o.occupant_id)
        ));
        s
    }
}

/// A room message for one recipient: `stored` is the message as archived
/// (from the occupant, no `to`).
fn message_for(stored: &str, to: &str, room_jid: &str, id: Option<u64>) -> String {
    let mut s = String::with_capacity(stored.len() + 160);
    let rest = stored.strip_prefix("<message").unwrap_or(stored);
    s.push_str("<message to='");
    s.push_str(&escape(to));
    s.push('\'');
    let Some(end) = rest.rfind("</message>") else {
        s.push_str(rest);
        return s;
    };
    s.push_str(&rest[..end]);
    if let Some(id) = id {
        s.push_str(&format!(
            "<stanza-id xmlns='{NS_SID}' by='{}' id='{id}'/>",
            escape(room_jid)
        ));
    }
    s.push_str("</message>");
    s
}

/// Sends to the occupant `real`: here if its session is on this node; over
/// s2s if it is another server's user and this node leads the cluster
/// (one node sends each event to other domains).
fn to_local(server: &Server, real: &str, xml: String) {
    let Ok(full) = FullJid::parse(real) else {
        return;
    };
    if let Some(r) = server.sessions.get(&full) {
        let _ = r.tx.send(Outbound::Xml(Arc::from(xml)));
    } else if is_remote_we_send_to(server, &full) {
        if let Ok(e) = xmpp::xml::parse_element(&xml, ns::CLIENT) {
            crate::federation::route_remote(server, e, full.domain());
        }
    }
}

fn is_remote_we_send_to(server: &Server, full: &FullJid) -> bool {
    !server.config.is_local_domain(full.domain())
        && server
            .cluster
            .leader()
            .is_some_and(|(id, _)| id == server.cluster.id)
}

/// Whether this node delivers to `real` (its session is here, or it is
/// another server's user and this node sends to other domains).
fn is_local_session(server: &Server, real: &str) -> bool {
    FullJid::parse(real)
        .ok()
        .is_some_and(|f| server.sessions.get(&f).is_some() || is_remote_we_send_to(server, &f))
}

/// The recipients of an event that this node delivers to.
fn here<'a>(server: &'a Server, to: &'a [Present]) -> impl Iterator<Item = &'a Occupant> + 'a {
    to.iter()
        .map(|(_, o)| o)
        .filter(|o| is_local_session(server, &o.real))
}

impl Muc {
    fn deliver(&self, server: &Server, room_jid: &str, event: &MucEvent) {
        let current = || {
            server
                .store()
                .room(room_jid)
                .ok()
                .flatten()
                .unwrap_or_default()
        };
        match event {
            MucEvent::Joined {
                nick,
                occupant,
                to,
                created,
                history_upto,
                room,
            } => {
                let shown = Shown::present(nick, occupant);
                for viewer in here(server, to) {
                    if viewer.real == occupant.real {
                        self.welcome(
                            server,
                            room_jid,
                            nick,
                            occupant,
                            to,
                            *created,
                            *history_upto,
                            room,
                        );
                    } else {
                        to_local(server, &viewer.real, shown.render(room_jid, room, viewer));
                    }
                }
            }
            MucEvent::Changed {
                nick,
                occupant,
                to,
                codes,
                reason,
            } => {
                let room = current();
                let shown = Shown {
                    codes,
                    reason: reason.as_deref(),
                    ..Shown::present(nick, occupant)
                };
                for viewer in here(server, to) {
                    to_local(server, &viewer.real, shown.render(room_jid, &room, viewer));
                }
            }
            MucEvent::NickChanged {
                old,
                new,
                occupant,
                to,
            } => {
                let room = current();
                let gone = Shown {
                    unavailable: true,
                    codes: &[303],
                    new_nick: Some(new),
                    children: "",
                    ..Shown::present(old, occupant)
                };
                let back = Shown::present(new, occupant);
                for viewer in here(server, to) {
                    to_local(server, &viewer.real, gone.render(room_jid, &room, viewer));
                    to_local(server, &viewer.real, back.render(room_jid, &room, viewer));
                }
            }
            MucEvent::Left {
                nick,
                occupant,
                presence,
                to,
                codes,
                reason,
            } => {
                let room = current();
                let shown = Shown {
                    unavailable: true,
                    codes,
                    reason: reason.as_deref(),
                    children: presence,
                    ..Shown::present(nick, occupant)
                };
                for viewer in here(server, to) {
                    to_local(server, &viewer.real, shown.render(room_jid, &room, viewer));
                }
            }
            MucEvent::Message { body, id, to, .. } => {
                for viewer in here(server, to) {
                    to_local(
                        server,
                        &viewer.real,
                        message_for(body, &viewer.real, room_jid, *id),
                    );
                }
            }
            MucEvent::ConfigChanged { to } => {
                for viewer in here(server, to) {
                    let xml = format!(
                        "<message from='{}' to='{}' type='groupchat'><x xmlns='{NS_USER}'><status code='104'/></x></message>",
                        escape(room_jid),
                        escape(&viewer.real)
                    );
                    to_local(server, &viewer.real, xml);
                }
            }
            MucEvent::Destroyed {
                reason,
                alternate,
                to,
            } => {
                let mut destroy = String::from("<destroy");
                if let Some(a) = alternate {
                    destroy.push_str(&format!(" jid='{}'", escape(a)));
                }
                match reason {
                    Some(r) => {
                        destroy.push_str(&format!("><reason>{}</reason></destroy>", escape(r)))
                    }
                    None => destroy.push_str("/>"),
                }
                for (nick, viewer) in to.iter().filter(|(_, v)| is_local_session(server, &v.real)) {
                    let xml = format!(
                        "<presence from='{}/{}' to='{}' type='unavailable'><x xmlns='{NS_USER}'><item affiliation='none' role='none'/>{destroy}</x></presence>",
                        escape(room_jid),
                        escape(nick),
                        escape(&viewer.real)
                    );
                    to_local(server, &viewer.real, xml);
                }
            }
        }
    }

    /// A newcomer's welcome (XEP-0045 §7.2): everyone else's presence, its
    /// own (110, 201 for a new room, 100 where JIDs are public), the
    /// history, then the subject.
    #[allow(clippy::too_many_arguments)]
    fn welcome(
        &self,
        server: &Server,
        room_jid: &str,
        nick: &str,
        me: &Occupant,
        to: &[Present],
        created: bool,
        history_upto: u64,
        room: &Room,
    ) {
        let mut out = Vec::new();
        for (n, o) in to.iter().filter(|(_, o)| o.real != me.real) {
            out.push(Shown::present(n, o).render(room_jid, room, me));
        }
        let mut codes = Vec::new();
        if room.config.whois_anyone {
            codes.push(100);
        }
        if created {
            codes.push(201);
        }
        let mine = Shown {
            codes: &codes,
            ..Shown::present(nick, me)
        };
        out.push(mine.render(room_jid, room, me));
        let ask = self
            .history
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(room_jid.to_owned(), me.real.clone()))
            .unwrap_or_default();
        // What was asked, within the room's history length and the
        // service's ceiling.
        let max = ask
            .maxstanzas
            .unwrap_or(room.config.history)
            .min(room.config.history)
            .min(server.config.muc.max_history) as usize;
        if max > 0 && history_upto > 0 {
            let since = ask.since_micros.unwrap_or(0);
            // Newest first, as far as maxchars allows, then in time order.
            let mut chars = 0u64;
            let mut kept: Vec<(u64, String)> = Vec::new();
            let newest = server
                .store()
                .archive_range(room_jid, None, since, history_upto + 1, true)
                .filter_map(Result::ok)
                .take(max);
            for (id, a) in newest {
                chars += a.stanza.len() as u64;
                if ask.maxchars.is_some_and(|m| chars > m) {
                    break;
                }
                kept.push((id, a.stanza));
            }
            kept.reverse();
            for (id, stanza) in kept {
                let stamp = utc_stamp(UNIX_EPOCH + Duration::from_micros(id));
                let with_delay = match stanza.rfind("</message>") {
                    Some(end) => format!(
                        "{}<delay xmlns='{NS_DELAY}' from='{}' stamp='{stamp}'/></message>",
                        &stanza[..end],
                        escape(room_jid)
                    ),
                    None => stanza,
                };
                out.push(message_for(&with_delay, &me.real, room_jid, Some(id)));
            }
        }
        // §7.2.15: the subject comes last, even when empty.
        let (by, text) = room.subject.clone().unwrap_or_default();
        let from = if by.is_empty() {
            room_jid.to_owned()
        } else {
            format!("{room_jid}/{by}")
        };
        out.push(format!(
            "<message from='{}' to='{}' type='groupchat'><subject>{}</subject></message>",
            escape(&from),
            escape(&me.real),
            escape(&text)
        ));
        for xml in out {
            to_local(server, &me.real, xml);
        }
    }
}

fn error_to(stanza: &Element, condition: StanzaError, text: Option<&str>) -> Option<Element> {
    error_reply(stanza, condition, text)
}

fn condition_of(name: &str) -> StanzaError {
    match name {
        "forbidden" => StanzaError::Forbidden,
        "conflict" => StanzaError::Conflict,
        "registration-required" => StanzaError::RegistrationRequired,
        "not-authorized" => StanzaError::NotAuthorized,
        "service-unavailable" => StanzaError::ServiceUnavailable,
        "item-not-found" => StanzaError::ItemNotFound,
        "not-allowed" => StanzaError::NotAllowed,
        "not-acceptable" => StanzaError::NotAcceptable,
        _ => StanzaError::BadRequest,
    }
}

/// The error reply for a refused write.
fn refused(stanza: &Element, e: ApplyError) -> Option<Element> {
    match e {
        ApplyError::Refused(Refusal::Muc { condition, text }) => {
            error_to(stanza, condition_of(&condition), Some(&text))
        }
        ApplyError::Unavailable(m) => error_to(
            stanza,
            StanzaError::ResourceConstraint,
            Some(&format!("the room cannot change now, try again: {m}")),
        ),
        other => {
            tracing::warn!(error = %other, "room write failed");
            error_to(stanza, StanzaError::InternalServerError, None)
        }
    }
}

fn config_form(c: &RoomConfig) -> Element {
    let b = |v: bool| if v { "1" } else { "0" };
    forms::build(
        "form",
        Some(ROOMCONFIG),
        vec![
            Field::new("muc#roomconfig_roomname", "text-single")
                .label("Name")
                .value(c.name.as_str()),
            Field::new("muc#roomconfig_roomdesc", "text-single")
                .label("Description")
                .value(c.description.as_str()),
            Field::new("muc#roomconfig_persistentroom", "boolean")
                .label("Persistent")
                .value(b(c.persistent)),
            Field::new("muc#roomconfig_publicroom", "boolean")
                .label("Listed publicly")
                .value(b(c.public)),
            Field::new("muc#roomconfig_membersonly", "boolean")
                .label("Members only")
                .value(b(c.members_only)),
            Field::new("muc#roomconfig_moderatedroom", "boolean")
                .label("Moderated")
                .value(b(c.moderated)),
            Field::new("muc#roomconfig_passwordprotectedroom", "boolean")
                .label("Password protected")
                .value(b(c.password.is_some())),
            Field::new("muc#roomconfig_roomsecret", "text-private")
                .label("Password")
                .value(c.password.clone().unwrap_or_default()),
            Field::new("muc#roomconfig_maxusers", "text-single")
                .label("Most occupants")
                .value(c.max_occupants.to_string()),
            Field::new("muc#roomconfig_whois", "list-single")
                .label("Who may see real JIDs")
                .value(if c.whois_anyone {
                    "anyone"
                } else {
                    "moderators"
                }),
            Field::new("muc#roomconfig_historylength", "text-single")
                .label("History messages")
                .value(c.history.to_string()),
            Field::new("muc#roomconfig_allowinvites", "boolean")
                .label("Occupants may invite")
                .value(b(c.allow_invites)),
            Field::new("muc#roomconfig_allowpm", "list-single")
                .label("Private messages")
                .value(if c.allow_pm { "anyone" } else { "none" }),
            Field::new("muc#roomconfig_changesubject", "boolean")
                .label("Occupants may change the subject")
                .value(b(c.change_subject)),
        ],
    )
}

/// Applies a submitted `muc#roomconfig` form to `c`.
fn read_config(form: &Submitted, c: &mut RoomConfig, server: &Server) -> Result<(), String> {
    let truthy = |v: &str| matches!(v, "1" | "true");
    let mut password_on = c.password.is_some();
    let mut secret = c.password.clone();
    for var in form.vars() {
        let v = form.value(var).unwrap_or("").trim().to_owned();
        match var {
            "muc#roomconfig_roomname" => c.name = v,
            "muc#roomconfig_roomdesc" => c.description = v,
            "muc#roomconfig_persistentroom" => c.persistent = truthy(&v),
            "muc#roomconfig_publicroom" => c.public = truthy(&v),
            "muc#roomconfig_membersonly" => c.members_only = truthy(&v),
            "muc#roomconfig_moderatedroom" => c.moderated = truthy(&v),
            "muc#roomconfig_passwordprotectedroom" => password_on = truthy(&v),
            "muc#roomconfig_roomsecret" => secret = (!v.is_empty()).then_some(v),
            "muc#roomconfig_maxusers" => {
                let n: u32 = v
                    .parse()
                    .map_err(|_| format!("maxusers {v:?} is not a number"))?;
                c.max_occupants = n.clamp(1, server.config.muc.max_occupants);
            }
            "muc#roomconfig_whois" => c.whois_anyone = v == "anyone",
            "muc#roomconfig_historylength" => {
                let n: u32 = v
                    .parse()
                    .map_err(|_| format!("historylength {v:?} is not a number"))?;
                c.history = n.min(server.config.muc.max_history);
            }
            "muc#roomconfig_allowinvites" => c.allow_invites = truthy(&v),
            "muc#roomconfig_allowpm" => c.allow_pm = v != "none" && v != "0",
            "muc#roomconfig_changesubject" => c.change_subject = truthy(&v),
            // Known to clients, kept as they are here.
            _ => {}
        }
    }
    c.password = if password_on { secret } else { None };
    if password_on && c.password.is_none() {
        return Err("a password-protected room needs muc#roomconfig_roomsecret".into());
    }
    Ok(())
}

impl Module for Muc {
    fn name(&self) -> &'static str {
        "muc"
    }

    fn owns_domain(&self, server: &Server, domain: &str) -> bool {
        server.config.muc.host_of(domain, &server.config).is_some()
    }

    fn disco_items(&self, server: &Server, from: &FullJid, node: &str) -> Option<Vec<Element>> {
        let sub = &server.config.muc.subdomain;
        super::component_item(server, from, node, sub, "Chatrooms")
    }

    fn on_applied(&self, server: &Server, effect: &Effect) {
        if let Effect::Muc { room, event } = effect {
            self.deliver(server, room, event);
        }
    }

    fn handle_component<'a>(
        &'a self,
        server: &'a Server,
        stanza: Element,
        from: Jid,
        to: Jid,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            // A session's full JID: ours, or another server's user.
            let Jid::Full(from) = from else { return };
            let reply = match stanza.name.as_str() {
                "presence" => self.presence(server, &stanza, &from, &to).await,
                "message" => self.message(server, &stanza, &from, &to).await,
                "iq" => self.iq(server, &stanza, &from, &to).await,
                _ => None,
            };
            if let Some(r) = reply {
                crate::router::deliver_reply(server, r);
            }
        })
    }
}

impl Muc {
    async fn presence(
        &self,
        server: &Server,
        p: &Element,
        from: &FullJid,
        to: &Jid,
    ) -> Option<Element> {
        let Jid::Full(occupant) = to else {
            return error_to(p, StanzaError::JidMalformed, Some("join room@service/nick"));
        };
        let room = occupant.bare().to_string();
        let real = from.to_string();
        let children: String = p
            .elements()
            .filter(|e| !(e.ns == NS || e.ns == NS_USER))
            .map(|e| e.to_string_in(ns::CLIENT))
            .collect();
        let cmd = match PresenceType::of(p) {
            Some(PresenceType::Unavailable) => MucCommand::Leave {
                room,
                real,
                presence: children,
            },
            Some(PresenceType::Available) => {
                let x = p.get_child("x", NS);
                if let Some(h) = x.and_then(|x| x.get_child("history", NS)) {
                    let num = |a: &str| h.get_attr(a).and_then(|v| v.parse::<u64>().ok());
                    let since = h
                        .get_attr("since")
                        .and_then(|s| {
                            time::OffsetDateTime::parse(
                                s,
                                &time::format_description::well_known::Rfc3339,
                            )
                            .ok()
                        })
                        .map(|t| (t.unix_timestamp_nanos() / 1000).max(0) as u64)
                        .or_else(|| {
                            num("seconds").map(|s| now_micros().saturating_sub(s * 1_000_000))
                        });
                    let ask = HistoryAsk {
                        maxstanzas: num("maxstanzas").map(|n| n.min(u64::from(u32::MAX)) as u32),
                        maxchars: num("maxchars"),
                        since_micros: since,
                    };
                    self.history
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .insert((room.clone(), real.clone()), ask);
                }
                let m = &server.config.muc;
                MucCommand::Join {
                    occupant_id: occupant_id(server, &room, from.bare().to_string().as_str()).await,
                    room,
                    nick: occupant.resource().to_owned(),
                    real,
                    presence: children,
                    password: x.and_then(|x| x.child_text("password", NS)),
                    defaults: RoomConfig {
                        max_occupants: m.max_occupants,
                        history: m.history.min(m.max_history),
                        ..RoomConfig::default()
                    },
                    max_rooms: m.max_rooms_per_user,
                }
            }
            _ => return None,
        };
        match server.cluster.write(Command::Muc(cmd)).await {
            Ok(_) => None,
            Err(e) => refused(p, e),
        }
    }

    async fn message(
        &self,
        server: &Server,
        m: &Element,
        from: &FullJid,
        to: &Jid,
    ) -> Option<Element> {
        let store = server.store();
        let room = to.bare().to_string();
        let real = from.to_string();
        if let Jid::Full(target) = to {
            // A private message to an occupant (§7.5).
            let r = store.room(&room).ok().flatten()?;
            let Some(my_nick) = store.nick_of(&room, &real).ok().flatten() else {
                return error_to(
                    m,
                    StanzaError::NotAcceptable,
                    Some("you are not in this room"),
                );
            };
            if !r.config.allow_pm || MessageType::of(m) == MessageType::Groupchat {
                return error_to(
                    m,
                    StanzaError::NotAllowed,
                    Some("no private messages in this room"),
                );
            }
            let occupants = store.occupants(&room).ok()?;
            let Some((_, o)) = occupants.into_iter().find(|(n, _)| n == target.resource()) else {
                return error_to(
                    m,
                    StanzaError::ItemNotFound,
                    Some("no occupant with that nick"),
                );
            };
            let mut copy = m.clone();
            copy.set_attr("from", format!("{room}/{my_nick}"));
            copy.set_attr("to", o.real.as_str());
            copy.children
                .push(xmpp::element::Node::Element(Element::new("x", NS_USER)));
            crate::router::route(server, copy).await;
            return None;
        }
        if let Some(invite) = m
            .get_child("x", NS_USER)
            .and_then(|x| x.get_child("invite", NS_USER))
        {
            return self.invite(server, m, from, &room, invite).await;
        }
        if MessageType::of(m) != MessageType::Groupchat {
            return error_to(
                m,
                StanzaError::BadRequest,
                Some("send type='groupchat' to the room"),
            );
        }
        let nick = store.nick_of(&room, &real).ok().flatten()?;
        if !self.spend(server, &room, &real) {
            return error_to(
                m,
                StanzaError::ResourceConstraint,
                Some("you are sending too fast to this room; wait a moment"),
            );
        }
        // XEP-0424: the author takes back one of their messages.
        if let Some(r) = m.get_child("retract", NS_RETRACT) {
            let Some(id) = r.get_attr("id").and_then(|i| i.parse::<u64>().ok()) else {
                return error_to(
                    m,
                    StanzaError::ItemNotFound,
                    Some("retract names a stanza id of this room"),
                );
            };
            let from_nick = format!("{room}/{nick}");
            let announce = format!(
                "<message from='{}' type='groupchat'><retract xmlns='{NS_RETRACT}' id='{id}'/><body>This person attempted to retract a previous message, but it's unsupported by your client.</body><fallback xmlns='urn:xmpp:fallback:0' for='{NS_RETRACT}'/></message>",
                escape(&from_nick)
            );
            let cmd = MucCommand::Retract {
                room: room.clone(),
                by: real,
                id,
                moderated: false,
                tombstone: tombstone(&from_nick, None),
                announce,
            };
            return match server.cluster.write(Command::Muc(cmd)).await {
                Ok(_) => None,
                Err(e) => refused(m, e),
            };
        }
        let subject = m.child_text("subject", ns::CLIENT);
        let archive = super::mam::archivable(&with_type_chat(m)) || m.has_child("body", ns::CLIENT);
        let mut stored = Element::new("message", ns::CLIENT)
            .attr("from", format!("{room}/{nick}"))
            .attr("type", "groupchat");
        if let Some(id) = m.get_attr("id") {
            stored.set_attr("id", id);
        }
        for c in m.elements() {
            // Ids and occupant ids are the room's to give (XEP-0359, 0421).
            if c.is("stanza-id", NS_SID) || c.ns == NS_OCCUPANT_ID {
                continue;
            }
            stored
                .children
                .push(xmpp::element::Node::Element(c.clone()));
        }
        let oid = store.occupants(&room).ok().and_then(|os| {
            os.into_iter()
                .find(|(n, _)| *n == nick)
                .map(|(_, o)| o.occupant_id)
        });
        if let Some(oid) = oid {
            stored = stored.child(Element::new("occupant-id", NS_OCCUPANT_ID).attr("id", oid));
        }
        let cmd = MucCommand::Message {
            room,
            real,
            ts: now_micros(),
            body: stored.to_string_in(""),
            subject,
            archive,
            policy: ArchivePolicy {
                default: ArchiveDefault::Always,
                max_messages: server.config.mam.max_messages_per_user,
                retention_micros: server
                    .config
                    .mam
                    .retention_days
                    .saturating_mul(86_400_000_000),
            },
        };
        match server.cluster.write(Command::Muc(cmd)).await {
            Ok(_) => None,
            Err(e) => refused(m, e),
        }
    }

    /// A mediated invitation (§7.8.2): the room passes it on.
    async fn invite(
        &self,
        server: &Server,
        m: &Element,
        from: &FullJid,
        room: &str,
        invite: &Element,
    ) -> Option<Element> {
        let store = server.store();
        let r = store.room(room).ok().flatten()?;
        let mine = store
            .affiliation(room, from.bare().to_string().as_str())
            .ok()?;
        if store
            .nick_of(room, &from.to_string())
            .ok()
            .flatten()
            .is_none()
        {
            return error_to(
                m,
                StanzaError::NotAcceptable,
                Some("you are not in this room"),
            );
        }
        if !r.config.allow_invites && mine < Affiliation::Admin {
            return error_to(m, StanzaError::Forbidden, Some("only admins invite here"));
        }
        let invitee = invite.get_attr("to").and_then(|t| BareJid::parse(t).ok())?;
        let mut inv = Element::new("invite", NS_USER).attr("from", from.bare().to_string());
        if let Some(reason) = invite.child_text("reason", NS_USER) {
            inv = inv.child(Element::new("reason", NS_USER).text(reason));
        }
        let mut x = Element::new("x", NS_USER).child(inv);
        if let Some(p) = &r.config.password {
            x = x.child(Element::new("password", NS_USER).text(p.as_str()));
        }
        let out = Element::new("message", ns::CLIENT)
            .attr("from", room)
            .attr("to", invitee.to_string())
            .child(x);
        crate::router::route(server, out).await;
        None
    }

    async fn iq(&self, server: &Server, iq: &Element, from: &FullJid, to: &Jid) -> Option<Element> {
        let kind = iq.get_attr("type").unwrap_or("");
        if kind != "get" && kind != "set" {
            return None;
        }
        let payload = xmpp::stanza::iq_payload(iq)?;
        let store = server.store();
        let room = to.bare().to_string();
        // The service itself.
        if to.node().is_none() {
            return Some(match (payload.ns.as_str(), kind) {
                (ns::DISCO_INFO, "get") => iq_result(iq).child(
                    Element::new("query", ns::DISCO_INFO)
                        .child(
                            Element::new("identity", ns::DISCO_INFO)
                                .attr("category", "conference")
                                .attr("type", "text")
                                .attr("name", "Chatrooms"),
                        )
                        .child(Element::new("feature", ns::DISCO_INFO).attr("var", ns::DISCO_INFO))
                        .child(Element::new("feature", ns::DISCO_INFO).attr("var", ns::DISCO_ITEMS))
                        .child(Element::new("feature", ns::DISCO_INFO).attr("var", NS)),
                ),
                (ns::DISCO_ITEMS, "get") => {
                    let mut q = Element::new("query", ns::DISCO_ITEMS);
                    for (jid, r) in store.rooms(to.domain()).unwrap_or_default() {
                        if r.config.public {
                            let name = if r.config.name.is_empty() {
                                jid.clone()
                            } else {
                                r.config.name.clone()
                            };
                            q = q.child(
                                Element::new("item", ns::DISCO_ITEMS)
                                    .attr("jid", jid)
                                    .attr("name", name),
                            );
                        }
                    }
                    iq_result(iq).child(q)
                }
                _ => error_to(iq, StanzaError::ServiceUnavailable, None)?,
            });
        }
        if let Jid::Full(target) = to {
            // XEP-0410: a self-ping says whether the pinger is still joined.
            if payload.is("ping", ns::PING) {
                let mine = store.nick_of(&room, &from.to_string()).ok().flatten();
                return Some(if mine.as_deref() == Some(target.resource()) {
                    iq_result(iq)
                } else {
                    error_to(iq, StanzaError::NotAcceptable, Some("not joined"))?
                });
            }
            return error_to(iq, StanzaError::ServiceUnavailable, None);
        }
        let Some(r) = store.room(&room).ok().flatten() else {
            return error_to(iq, StanzaError::ItemNotFound, Some("no such room"));
        };
        let me = from.bare().to_string();
        let mine = store.affiliation(&room, &me).unwrap_or_default();
        let write = |cmd: MucCommand| async move {
            match server.cluster.write(Command::Muc(cmd)).await {
                Ok(_) => Some(iq_result(iq)),
                Err(e) => refused(iq, e),
            }
        };
        match (payload.ns.as_str(), payload.name.as_str(), kind) {
            (ns::DISCO_INFO, "query", "get") => {
                let c = &r.config;
                let mut q = Element::new("query", ns::DISCO_INFO).child(
                    Element::new("identity", ns::DISCO_INFO)
                        .attr("category", "conference")
                        .attr("type", "text")
                        .attr(
                            "name",
                            if c.name.is_empty() {
                                room.clone()
                            } else {
                                c.name.clone()
                            },
                        ),
                );
                let pick = |on: bool, a: &'static str, b: &'static str| if on { a } else { b };
                for f in [
                    NS,
                    super::mam::NS,
                    NS_SID,
                    NS_OCCUPANT_ID,
                    NS_MODERATE,
                    NS_RETRACT,
                    pick(c.persistent, "muc_persistent", "muc_temporary"),
                    pick(c.public, "muc_public", "muc_hidden"),
                    pick(c.members_only, "muc_membersonly", "muc_open"),
                    pick(c.moderated, "muc_moderated", "muc_unmoderated"),
                    pick(
                        c.password.is_some(),
                        "muc_passwordprotected",
                        "muc_unsecured",
                    ),
                    pick(c.whois_anyone, "muc_nonanonymous", "muc_semianonymous"),
                ] {
                    q = q.child(Element::new("feature", ns::DISCO_INFO).attr("var", f));
                }
                let occupants = store.occupants(&room).map(|o| o.len()).unwrap_or(0);
                q = q.child(forms::build(
                    "result",
                    Some(ROOMINFO),
                    vec![
                        Field::new("muc#roominfo_description", "text-single")
                            .value(c.description.as_str()),
                        Field::new("muc#roominfo_occupants", "text-single")
                            .value(occupants.to_string()),
                        Field::new("muc#roominfo_subject", "text-single")
                            .value(r.subject.clone().map(|s| s.1).unwrap_or_default()),
                    ],
                ));
                Some(iq_result(iq).child(q))
            }
            (ns::DISCO_ITEMS, "query", "get") => {
                Some(iq_result(iq).child(Element::new("query", ns::DISCO_ITEMS)))
            }
            (NS_OWNER, "query", "get") => {
                if mine != Affiliation::Owner {
                    return error_to(iq, StanzaError::Forbidden, None);
                }
                Some(
                    iq_result(iq)
                        .child(Element::new("query", NS_OWNER).child(config_form(&r.config))),
                )
            }
            (NS_OWNER, "query", "set") => {
                if let Some(d) = payload.get_child("destroy", NS_OWNER) {
                    return write(MucCommand::Destroy {
                        room: room.clone(),
                        by: me.clone(),
                        reason: d.child_text("reason", NS_OWNER),
                        alternate: d.get_attr("jid").map(str::to_owned),
                    })
                    .await;
                }
                let Some(x) = payload.get_child("x", forms::NS) else {
                    return error_to(
                        iq,
                        StanzaError::BadRequest,
                        Some("a muc#roomconfig form or <destroy/>"),
                    );
                };
                // §10.1.2: an instant room (empty submit) or a cancel keep the defaults.
                let Some(form) =
                    Submitted::read(x).filter(|_| x.get_attr("type") == Some("submit"))
                else {
                    return Some(iq_result(iq));
                };
                let mut config = r.config.clone();
                if let Err(m) = read_config(&form, &mut config, server) {
                    return error_to(iq, StanzaError::NotAcceptable, Some(&m));
                }
                write(MucCommand::Configure {
                    room: room.clone(),
                    by: me.clone(),
                    config,
                })
                .await
            }
            (NS_ADMIN, "query", "set") => {
                let mut affs = Vec::new();
                for item in payload.elements().filter(|e| e.is("item", NS_ADMIN)) {
                    let reason = item.child_text("reason", NS_ADMIN);
                    if let (Some(nick), Some(role)) = (item.get_attr("nick"), item.get_attr("role"))
                    {
                        let Some(role) = Role::parse(role) else {
                            return error_to(iq, StanzaError::BadRequest, Some("unknown role"));
                        };
                        let cmd = MucCommand::SetRole {
                            room: room.clone(),
                            by: from.to_string(),
                            nick: nick.to_owned(),
                            role,
                            reason,
                        };
                        if let Err(e) = server.cluster.write(Command::Muc(cmd)).await {
                            return refused(iq, e);
                        }
                    } else if let (Some(jid), Some(a)) =
                        (item.get_attr("jid"), item.get_attr("affiliation"))
                    {
                        let (Ok(jid), Some(a)) = (BareJid::parse(bare(jid)), Affiliation::parse(a))
                        else {
                            return error_to(
                                iq,
                                StanzaError::BadRequest,
                                Some("a bare JID and a known affiliation"),
                            );
                        };
                        affs.push((jid.to_string(), a, reason));
                    } else {
                        return error_to(
                            iq,
                            StanzaError::BadRequest,
                            Some("an item needs nick+role or jid+affiliation"),
                        );
                    }
                }
                if affs.is_empty() {
                    return Some(iq_result(iq));
                }
                write(MucCommand::Affiliate {
                    room: room.clone(),
                    by: me.clone(),
                    items: affs,
                })
                .await
            }
            (NS_ADMIN, "query", "get") => {
                if mine < Affiliation::Admin {
                    return error_to(iq, StanzaError::Forbidden, None);
                }
                let want = payload
                    .get_child("item", NS_ADMIN)
                    .and_then(|i| i.get_attr("affiliation"))
                    .and_then(Affiliation::parse);
                let mut q = Element::new("query", NS_ADMIN);
                for (jid, a) in store.affiliations(&room).unwrap_or_default() {
                    if want.is_none_or(|w| w == a) {
                        q = q.child(
                            Element::new("item", NS_ADMIN)
                                .attr("jid", jid)
                                .attr("affiliation", a.as_str()),
                        );
                    }
                }
                Some(iq_result(iq).child(q))
            }
            (NS_MODERATE, "moderate", "set") => {
                // XEP-0425: a moderator retracts someone's message.
                let Some(id) = payload.get_attr("id").and_then(|i| i.parse::<u64>().ok()) else {
                    return error_to(
                        iq,
                        StanzaError::ItemNotFound,
                        Some("moderate names a stanza id of this room"),
                    );
                };
                if !payload.has_child("retract", NS_RETRACT) {
                    return error_to(
                        iq,
                        StanzaError::BadRequest,
                        Some("only <retract/> is supported"),
                    );
                }
                let reason = payload.child_text("reason", NS_MODERATE);
                let my_nick = store
                    .nick_of(&room, &from.to_string())
                    .ok()
                    .flatten()
                    .unwrap_or_default();
                let by = format!("{room}/{my_nick}");
                let mut retract = format!(
                    "<retract xmlns='{NS_RETRACT}' id='{id}'><moderated xmlns='{NS_MODERATE}' by='{}'/>",
                    escape(&by)
                );
                if let Some(r) = &reason {
                    retract.push_str(&format!("<reason>{}</reason>", escape(r)));
                }
                retract.push_str("</retract>");
                let announce = format!(
                    "<message from='{}' type='groupchat'>{retract}</message>",
                    escape(&room)
                );
                write(MucCommand::Retract {
                    room: room.clone(),
                    by: from.to_string(),
                    id,
                    moderated: true,
                    tombstone: tombstone(&room, Some(&by)),
                    announce,
                })
                .await
            }
            (super::mam::NS, "query", "set") => {
                // §XEP-0313 on rooms: as private as the room (members-only
                // rooms to members, others to anyone who could join).
                let allowed = if r.config.members_only {
                    mine >= Affiliation::Member
                } else {
                    mine != Affiliation::Outcast
                };
                if !allowed {
                    return error_to(iq, StanzaError::Forbidden, None);
                }
                let target = IqTarget::Account(BareJid::parse(&room).ok()?);
                let req = IqRequest {
                    iq,
                    payload,
                    from,
                    target,
                };
                Some(super::mam::query_archive(server, &req, &room).unwrap_or_else(|e| e))
            }
            _ => error_to(iq, StanzaError::ServiceUnavailable, None),
        }
    }
}

/// What the archive keeps of a retracted message (XEP-0424 §5.1).
fn tombstone(from: &str, moderated_by: Option<&str>) -> String {
    let stamp = utc_stamp(SystemTime::now());
    let moderated = moderated_by
        .map(|b| format!("<moderated xmlns='{NS_MODERATE}' by='{}'/>", escape(b)))
        .unwrap_or_default();
    format!(
        "<message xmlns='jabber:client' from='{}' type='groupchat'><retracted xmlns='{NS_RETRACT}' stamp='{stamp}'>{moderated}</retracted></message>",
        escape(from)
    )
}

/// A copy typed `chat`, to ask [`super::mam::archivable`] about a
/// groupchat message's payload.
fn with_type_chat(m: &Element) -> Element {
    let mut c = m.clone();
    c.set_attr("type", "chat");
    c
}
