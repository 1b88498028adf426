//! Group chat rooms (XEP-0045) in the replicated state.
//!
//! How a room's live state is owned: it is not owned by any one node.
//! Rooms, affiliations and the occupants present are replicated, and every
//! change (a join, a message, a kick) is one log entry. Each node applies
//! it and tells the occupants whose sessions it serves, from the
//! [`MucEvent`] the entry produced, which names every recipient as the
//! room stood at that entry. So every occupant on every node sees the
//! room's events in log order, and a minority side of a partition cannot
//! change a room at all: a room never splits in two. A session that ends
//! (or whose node is declared down) leaves its rooms in the same entry.

use serde::{Deserialize, Serialize};

use super::{encode, keys, ApplyError, ArchivePolicy, Effect, Refusal, Response, Tx};
use crate::store::{Affiliation, Occupant, Role, Room, RoomConfig, StoreError};

/// A change to a room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum MucCommand {
    /// Enter (creating the room on first use, with `defaults`), change
    /// nick, or update one's presence in the room.
    Join {
        room: String,
        nick: String,
        /// The session's full JID.
        real: String,
        /// Children of the presence (show, status, caps).
        presence: String,
        password: Option<String>,
        occupant_id: String,
        defaults: RoomConfig,
        /// Rooms a user may own: creating one more is refused.
        max_rooms: u32,
    },
    Leave {
        room: String,
        real: String,
        presence: String,
    },
    /// A groupchat message (or a subject change) from an occupant.
    Message {
        room: String,
        real: String,
        ts: u64,
        /// The message's children, serialised in `jabber:client`.
        body: String,
        /// `Some` for a subject change (empty: clear it).
        subject: Option<String>,
        /// Archived (a body, not a bare subject change or chat state).
        archive: bool,
        policy: ArchivePolicy,
    },
    Configure {
        room: String,
        by: String,
        config: RoomConfig,
    },
    /// Set affiliations; `by` is the bare JID of who asks.
    Affiliate {
        room: String,
        by: String,
        items: Vec<(String, Affiliation, Option<String>)>,
    },
    /// Set an occupant's role by nick; `by` is the asker's full JID.
    SetRole {
        room: String,
        by: String,
        nick: String,
        role: Role,
        reason: Option<String>,
    },
    Destroy {
        room: String,
        by: String,
        reason: Option<String>,
        alternate: Option<String>,
    },
    /// Retract an archived room message (XEP-0424 by its author, XEP-0425
    /// by a moderator): the archive keeps `tombstone` in its place, and
    /// everyone present gets `announce` (a groupchat message from `from`).
    Retract {
        room: String,
        /// The asker's full JID.
        by: String,
        id: u64,
        moderated: bool,
        tombstone: String,
        announce: String,
    },
}

/// Someone in the room, as the recipients list of an event names them.
pub type Present = (String, Occupant);

/// What an entry did to a room, with everyone who must hear of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MucEvent {
    Joined {
        nick: String,
        occupant: Occupant,
        /// Everyone present, the newcomer included.
        to: Vec<Present>,
        created: bool,
        /// History up to this archive id belongs to the newcomer's welcome.
        history_upto: u64,
        room: Room,
    },
    /// A presence update (or a role/affiliation change) of someone present.
    Changed {
        nick: String,
        occupant: Occupant,
        to: Vec<Present>,
        codes: Vec<u16>,
        reason: Option<String>,
    },
    NickChanged {
        old: String,
        new: String,
        occupant: Occupant,
        to: Vec<Present>,
    },
    /// Someone left (or was removed: codes 301 ban, 307 kick, 321
    /// affiliation, 333 gone); `to` includes them.
    Left {
        nick: String,
        occupant: Occupant,
        presence: String,
        to: Vec<Present>,
        codes: Vec<u16>,
        reason: Option<String>,
    },
    Message {
        nick: String,
        occupant: Occupant,
        /// The archive id (`None`: not archived).
        id: Option<u64>,
        body: String,
        to: Vec<Present>,
    },
    ConfigChanged {
        to: Vec<Present>,
    },
    Destroyed {
        reason: Option<String>,
        alternate: Option<String>,
        to: Vec<Present>,
    },
}

fn refuse(condition: &str, text: impl Into<String>) -> ApplyError {
    Refusal::Muc {
        condition: condition.into(),
        text: text.into(),
    }
    .into()
}

fn bare(jid: &str) -> &str {
    jid.split_once('/').map_or(jid, |(b, _)| b)
}

fn room_key(room: &str) -> Vec<u8> {
    [keys::ROOM, room.as_bytes()].concat()
}

impl Tx<'_> {
    fn room(&self, room: &str) -> Result<Option<Room>, StoreError> {
        match self.get(&room_key(room))? {
            Some(b) => Ok(Some(postcard::from_bytes(&b)?)),
            None => Ok(None),
        }
    }

    /// The room, or the refusal for one that does not exist.
    fn existing_room(&self, room: &str) -> Result<Room, ApplyError> {
        self.room(room)?
            .ok_or_else(|| refuse("item-not-found", "no such room"))
    }

    /// `nick` (present, as `occupant`) changed: everyone present hears it.
    fn changed(
        &mut self,
        room: &str,
        nick: String,
        occupant: Occupant,
        reason: Option<String>,
    ) -> Result<(), StoreError> {
        self.put_occupant(room, &nick, &occupant);
        let to = self.present(room)?;
        self.muc(
            room,
            MucEvent::Changed {
                nick,
                occupant,
                to,
                codes: vec![],
                reason,
            },
        );
        Ok(())
    }

    fn affiliation(&self, room: &str, jid: &str) -> Result<Affiliation, StoreError> {
        match self.get(&keys::user_key(keys::ROOM_AFFILIATION, room, jid))? {
            Some(b) => Ok(postcard::from_bytes(&b)?),
            None => Ok(Affiliation::None),
        }
    }

    fn set_affiliation(&mut self, room: &str, jid: &str, a: Affiliation) {
        let owned = keys::user_key(keys::ROOMS_OWNED, jid, room);
        if a == Affiliation::Owner {
            self.put(owned, Vec::new());
        } else {
            self.delete(owned);
        }
        let key = keys::user_key(keys::ROOM_AFFILIATION, room, jid);
        if a == Affiliation::None {
            self.delete(key);
        } else {
            self.put(key, encode(&a));
        }
    }

    fn present(&self, room: &str) -> Result<Vec<Present>, StoreError> {
        let prefix = keys::user_prefix(keys::OCCUPANT, room);
        self.scan(&prefix)?
            .into_iter()
            .map(|(k, v)| {
                let nick = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                Ok((nick, postcard::from_bytes(&v)?))
            })
            .collect()
    }

    fn nick_of(&self, room: &str, real: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .get(&keys::user_key(keys::OCCUPANT_OF, real, room))?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    fn put_occupant(&mut self, room: &str, nick: &str, o: &Occupant) {
        self.put(keys::user_key(keys::OCCUPANT, room, nick), encode(o));
        self.put(
            keys::user_key(keys::OCCUPANT_OF, &o.real, room),
            nick.as_bytes().to_vec(),
        );
    }

    fn remove_occupant(&mut self, room: &str, nick: &str, real: &str) {
        self.delete(keys::user_key(keys::OCCUPANT, room, nick));
        self.delete(keys::user_key(keys::OCCUPANT_OF, real, room));
    }

    /// A temporary room whose last occupant left is gone.
    fn maybe_close(&mut self, room: &str, r: &Room) -> Result<(), StoreError> {
        if !r.config.persistent && self.present(room)?.is_empty() {
            self.delete_room(room)?;
        }
        Ok(())
    }

    fn delete_room(&mut self, room: &str) -> Result<(), StoreError> {
        self.delete(room_key(room));
        let prefix = keys::user_prefix(keys::ROOM_AFFILIATION, room);
        for (k, _) in self.scan(&prefix)? {
            let jid = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
            self.delete(keys::user_key(keys::ROOMS_OWNED, &jid, room));
        }
        // The room's archive goes with it: a room made again under the
        // same name starts with no history.
        self.delete([keys::ARCHIVE_META, room.as_bytes()].concat());
        for prefix in [
            keys::ROOM_AFFILIATION,
            keys::OCCUPANT,
            keys::ARCHIVE,
            keys::ARCHIVE_WITH,
        ] {
            self.delete_user_prefix(prefix, room)?;
        }
        Ok(())
    }

    fn muc(&mut self, room: &str, event: MucEvent) {
        self.effects.push(Effect::Muc {
            room: room.to_owned(),
            event: Box::new(event),
        });
    }
}

/// The role a newcomer gets (XEP-0045 §5.1.2 defaults).
fn default_role(config: &RoomConfig, a: Affiliation) -> Role {
    match a {
        Affiliation::Owner | Affiliation::Admin => Role::Moderator,
        Affiliation::Member => Role::Participant,
        _ if config.moderated => Role::Visitor,
        _ => Role::Participant,
    }
}

pub(super) fn apply(tx: &mut Tx<'_>, cmd: MucCommand) -> Result<Response, ApplyError> {
    match cmd {
        MucCommand::Join {
            room,
            nick,
            real,
            presence,
            password,
            occupant_id,
            defaults,
            max_rooms,
        } => {
            if tx.room(&room)?.is_none() {
                let owned = tx.scan(&keys::user_prefix(keys::ROOMS_OWNED, bare(&real)))?;
                if owned.len() >= max_rooms as usize {
                    return Err(refuse(
                        "not-allowed",
                        format!("you own {} rooms already, the most allowed", owned.len()),
                    ));
                }
            }
            join(
                tx,
                room,
                nick,
                real,
                presence,
                password,
                occupant_id,
                defaults,
            )
        }
        MucCommand::Leave {
            room,
            real,
            presence,
        } => {
            let Some(nick) = tx.nick_of(&room, &real)? else {
                return Ok(Response::Done);
            };
            leave(tx, &room, &nick, presence, vec![], None)?;
            Ok(Response::Done)
        }
        MucCommand::Message {
            room,
            real,
            ts,
            body,
            subject,
            archive,
            policy,
        } => {
            let mut r = tx.existing_room(&room)?;
            let Some(nick) = tx.nick_of(&room, &real)? else {
                return Err(refuse("not-acceptable", "you are not in this room"));
            };
            let to = tx.present(&room)?;
            let Some(occupant) = to.iter().find(|(n, _)| *n == nick).map(|(_, o)| o.clone()) else {
                return Err(refuse("not-acceptable", "you are not in this room"));
            };
            if occupant.role < Role::Participant {
                return Err(refuse("forbidden", "visitors have no voice in this room"));
            }
            if let Some(text) = &subject {
                if !r.config.change_subject && occupant.role < Role::Moderator {
                    return Err(refuse("forbidden", "only moderators change the subject"));
                }
                r.subject = (!text.is_empty()).then(|| (nick.clone(), text.clone()));
                tx.put(room_key(&room), encode(&r));
            }
            let id = if archive {
                let peer = format!("{room}/{nick}");
                Some(super::append_archive(
                    tx,
                    &room,
                    ts,
                    bare(&occupant.real).to_owned(),
                    peer,
                    &body,
                    policy,
                )?)
            } else {
                None
            };
            tx.muc(
                &room,
                MucEvent::Message {
                    nick,
                    occupant,
                    id,
                    body,
                    to,
                },
            );
            Ok(Response::Done)
        }
        MucCommand::Configure { room, by, config } => {
            let mut r = tx.existing_room(&room)?;
            if tx.affiliation(&room, &by)? != Affiliation::Owner {
                return Err(refuse("forbidden", "only owners configure the room"));
            }
            let was_members_only = r.config.members_only;
            r.config = config;
            tx.put(room_key(&room), encode(&r));
            // Made members-only: non-members leave (XEP-0045 §9.3, 322).
            if r.config.members_only && !was_members_only {
                for (nick, o) in tx.present(&room)? {
                    if o.affiliation < Affiliation::Member {
                        leave(tx, &room, &nick, String::new(), vec![322], None)?;
                    }
                }
            }
            let to = tx.present(&room)?;
            tx.muc(&room, MucEvent::ConfigChanged { to });
            Ok(Response::Done)
        }
        MucCommand::Affiliate { room, by, items } => {
            let r = tx.existing_room(&room)?;
            let mine = tx.affiliation(&room, &by)?;
            for (jid, a, reason) in items {
                let theirs = tx.affiliation(&room, &jid)?;
                // §9/§10: admins manage members and outcasts below them;
                // owners manage everyone.
                let allowed = match mine {
                    Affiliation::Owner => true,
                    Affiliation::Admin => theirs < Affiliation::Admin && a < Affiliation::Admin,
                    _ => false,
                };
                if !allowed {
                    return Err(refuse(
                        "not-allowed",
                        "your affiliation does not allow that",
                    ));
                }
                tx.set_affiliation(&room, &jid, a);
                for (nick, mut o) in tx.present(&room)? {
                    if bare(&o.real) != jid {
                        continue;
                    }
                    if a == Affiliation::Outcast {
                        leave(tx, &room, &nick, String::new(), vec![301], reason.clone())?;
                    } else if r.config.members_only && a < Affiliation::Member {
                        leave(tx, &room, &nick, String::new(), vec![321], reason.clone())?;
                    } else {
                        o.affiliation = a;
                        // The new affiliation's role (moderator for admins
                        // and owners); a voice granted before is kept.
                        o.role = default_role(&r.config, a).max(o.role.min(Role::Participant));
                        tx.changed(&room, nick, o, reason.clone())?;
                    }
                }
            }
            if !r.config.persistent {
                tx.maybe_close(&room, &r)?;
            }
            Ok(Response::Done)
        }
        MucCommand::SetRole {
            room,
            by,
            nick,
            role,
            reason,
        } => {
            tx.existing_room(&room)?;
            let present = tx.present(&room)?;
            let me = present
                .iter()
                .find(|(_, o)| o.real == by)
                .map(|(_, o)| o.clone());
            let Some(me) = me.filter(|o| o.role == Role::Moderator) else {
                return Err(refuse("forbidden", "only moderators change roles"));
            };
            let Some((_, mut target)) = present.into_iter().find(|(n, _)| *n == nick) else {
                return Err(refuse("item-not-found", "no occupant with that nick"));
            };
            // §8.2: nobody kicks or silences someone of higher affiliation.
            if target.affiliation > me.affiliation
                || (target.affiliation >= Affiliation::Admin && role < Role::Moderator)
            {
                return Err(refuse("not-allowed", "their affiliation protects them"));
            }
            if role == Role::None {
                leave(tx, &room, &nick, String::new(), vec![307], reason)?;
            } else {
                target.role = role;
                tx.changed(&room, nick, target, reason)?;
            }
            Ok(Response::Done)
        }
        MucCommand::Retract {
            room,
            by,
            id,
            moderated,
            tombstone,
            announce,
        } => {
            tx.existing_room(&room)?;
            let to = tx.present(&room)?;
            let me = to
                .iter()
                .find(|(_, o)| o.real == by)
                .map(|(n, o)| (n.clone(), o.clone()));
            let Some((nick, occupant)) = me else {
                return Err(refuse("not-acceptable", "you are not in this room"));
            };
            let key = keys::archive(&room, id);
            let Some(raw) = tx.get(&key)? else {
                return Err(refuse(
                    "item-not-found",
                    "no such message in the room's archive",
                ));
            };
            let mut archived: crate::store::Archived =
                postcard::from_bytes(&raw).map_err(StoreError::from)?;
            if moderated {
                if occupant.role != Role::Moderator {
                    return Err(refuse(
                        "forbidden",
                        "only moderators retract others' messages",
                    ));
                }
            } else if archived.with != bare(&by) {
                return Err(refuse("forbidden", "only its author retracts a message"));
            }
            archived.stanza = tombstone;
            tx.put(key, encode(&archived));
            tx.muc(
                &room,
                MucEvent::Message {
                    nick,
                    occupant,
                    id: None,
                    body: announce,
                    to,
                },
            );
            Ok(Response::Done)
        }
        MucCommand::Destroy {
            room,
            by,
            reason,
            alternate,
        } => {
            tx.existing_room(&room)?;
            if tx.affiliation(&room, &by)? != Affiliation::Owner {
                return Err(refuse("forbidden", "only owners destroy the room"));
            }
            let to = tx.present(&room)?;
            for (_, o) in &to {
                tx.delete(keys::user_key(keys::OCCUPANT_OF, &o.real, &room));
            }
            tx.delete_room(&room)?;
            tx.muc(
                &room,
                MucEvent::Destroyed {
                    reason,
                    alternate,
                    to,
                },
            );
            Ok(Response::Done)
        }
    }
}

#[allow(clippy::too_many_arguments)]
fn join(
    tx: &mut Tx<'_>,
    room: String,
    nick: String,
    real: String,
    presence: String,
    password: Option<String>,
    occupant_id: String,
    defaults: RoomConfig,
) -> Result<Response, ApplyError> {
    let me = bare(&real).to_owned();
    let (r, created) = match tx.room(&room)? {
        Some(r) => (r, false),
        None => {
            let r = Room {
                config: defaults,
                subject: None,
            };
            tx.put(room_key(&room), encode(&r));
            tx.set_affiliation(&room, &me, Affiliation::Owner);
            (r, true)
        }
    };
    let present = tx.present(&room)?;
    // Already here: a presence update, or a nick change (§7.6).
    if let Some(old) = tx.nick_of(&room, &real)? {
        let Some((_, mut o)) = present.iter().find(|(n, _)| *n == old).cloned() else {
            return Ok(Response::Done);
        };
        o.presence = presence;
        if old == nick {
            tx.changed(&room, nick, o, None)?;
            return Ok(Response::Done);
        }
        if present
            .iter()
            .any(|(n, x)| *n == nick && bare(&x.real) != me)
        {
            return Err(refuse("conflict", "that nick is taken in this room"));
        }
        tx.remove_occupant(&room, &old, &real);
        tx.put_occupant(&room, &nick, &o);
        let to = tx.present(&room)?;
        tx.muc(
            &room,
            MucEvent::NickChanged {
                old,
                new: nick,
                occupant: o,
                to,
            },
        );
        return Ok(Response::Done);
    }
    let a = tx.affiliation(&room, &me)?;
    if a == Affiliation::Outcast {
        return Err(refuse("forbidden", "you are banned from this room"));
    }
    if r.config.members_only && a < Affiliation::Member {
        return Err(refuse(
            "registration-required",
            "this room is for members only",
        ));
    }
    if let Some(p) = &r.config.password {
        if a < Affiliation::Admin && password.as_deref() != Some(p.as_str()) {
            return Err(refuse("not-authorized", "this room needs a password"));
        }
    }
    if present
        .iter()
        .any(|(n, x)| *n == nick && bare(&x.real) != me)
    {
        return Err(refuse("conflict", "that nick is taken in this room"));
    }
    if present.len() >= r.config.max_occupants as usize && a < Affiliation::Admin {
        return Err(refuse("service-unavailable", "the room is full"));
    }
    let occupant = Occupant {
        real,
        role: default_role(&r.config, a),
        affiliation: a,
        occupant_id,
        presence,
    };
    tx.put_occupant(&room, &nick, &occupant);
    let history_upto = match tx.get(&[keys::ARCHIVE_META, room.as_bytes()].concat())? {
        Some(b) => {
            postcard::from_bytes::<crate::store::ArchiveMeta>(&b)
                .map_err(StoreError::from)?
                .last
        }
        None => 0,
    };
    let to = tx.present(&room)?;
    tx.muc(
        &room,
        MucEvent::Joined {
            nick,
            occupant,
            to,
            created,
            history_upto,
            room: r,
        },
    );
    Ok(Response::Done)
}

/// `nick` leaves (or is removed from) `room`; everyone present hears it,
/// the leaver included.
fn leave(
    tx: &mut Tx<'_>,
    room: &str,
    nick: &str,
    presence: String,
    codes: Vec<u16>,
    reason: Option<String>,
) -> Result<(), ApplyError> {
    let to = tx.present(room)?;
    let Some((_, occupant)) = to.iter().find(|(n, _)| n == nick).cloned() else {
        return Ok(());
    };
    tx.remove_occupant(room, nick, &occupant.real);
    tx.muc(
        room,
        MucEvent::Left {
            nick: nick.to_owned(),
            occupant,
            presence,
            to,
            codes,
            reason,
        },
    );
    if let Some(r) = tx.room(room)? {
        tx.maybe_close(room, &r)?;
    }
    Ok(())
}

/// A deleted account owns its rooms no more: a name registered again
/// inherits no room.
pub(super) fn account_deleted(tx: &mut Tx<'_>, user: &str) -> Result<(), StoreError> {
    let prefix = keys::user_prefix(keys::ROOMS_OWNED, user);
    for (k, _) in tx.scan(&prefix)? {
        let room = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        tx.delete(keys::user_key(keys::ROOM_AFFILIATION, &room, user));
        tx.delete(k);
    }
    Ok(())
}

/// A session ended: it leaves every room it was in (code 333: gone for
/// technical reasons, as far as the room can tell).
pub(super) fn session_gone(tx: &mut Tx<'_>, real: &str) -> Result<(), ApplyError> {
    let prefix = keys::user_prefix(keys::OCCUPANT_OF, real);
    for (k, v) in tx.scan(&prefix)? {
        let room = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
        let nick = String::from_utf8_lossy(&v).into_owned();
        leave(tx, &room, &nick, String::new(), vec![333], None)?;
    }
    Ok(())
}
