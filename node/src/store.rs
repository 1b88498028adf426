//! Read access to the replicated state, and the narrow storage interface
//! the state machine writes through.
//!
//! Everything lives in one sled tree under typed key prefixes. The Raft log
//! (its own sled database) is what makes a write durable; this state is
//! derived from it, so it is written behind: applied batches collect in
//! memory ([`Store::apply`]) and reach sled together, in one atomic
//! `apply_batch` with the applied index, every [`PERSIST_EVERY`] or
//! [`PERSIST_KEYS`] keys, before a snapshot and at shutdown. Reads see the
//! pending writes first. After a crash sled holds the state at some
//! applied index and openraft applies the rest again from the log (which
//! is never purged past a snapshot, and a snapshot persists everything
//! first). A sled batch seals and syncs its log buffer twice; doing that
//! per applied entry was most of a write's cost. Keeping sled behind this
//! one file is what makes a switch to another engine a local change.

use std::collections::{BTreeMap, HashSet};
use std::iter::Peekable;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use serde::{Deserialize, Serialize};
use xmpp::jid::BareJid;
use xmpp::sasl::{HashAlg, ScramCredentials};

/// Key prefixes: `a:` accounts, `o:` offline messages, `r:` roster items,
/// `rv:` roster versions, `rt:` roster removals (for versioned fetches),
/// `b:` blocklists, `v:` vCards, `x:` private XML, `m:` metadata.
/// Per-user keys are `<prefix><bare jid>\0<rest>`.
pub(crate) mod keys {
    pub const ACCOUNT: &[u8] = b"a:";
    pub const OFFLINE: &[u8] = b"o:";
    /// `om:<user>` -> [`super::OfflineMeta`]: where a user's queue starts
    /// and ends and its size, so storing, counting and taking never scan.
    pub const OFFLINE_META: &[u8] = b"om:";
    pub const ROSTER: &[u8] = b"r:";
    pub const ROSTER_VER: &[u8] = b"rv:";
    pub const ROSTER_GONE: &[u8] = b"rt:";
    /// `rf:<user>`: the newest removal mark dropped (see
    /// `Limit::RosterTombstones`); a client's roster version below it
    /// cannot be brought up to date with pushes.
    pub const ROSTER_FLOOR: &[u8] = b"rf:";
    pub const BLOCK: &[u8] = b"b:";
    /// `bi:<blocked jid>\0<blocker>`: who blocks whom, the other way round,
    /// so a deleted account leaves no one's blocklist naming it.
    pub const BLOCKED_BY: &[u8] = b"bi:";
    pub const VCARD: &[u8] = b"v:";
    pub const PRIVATE: &[u8] = b"x:";
    pub const APPLIED: &[u8] = b"m:applied";
    /// The Raft log id of the last applied entry, and the membership.
    pub const APPLIED_LOG: &[u8] = b"m:applied_log";
    pub const MEMBERSHIP: &[u8] = b"m:membership";
    /// The session table: `s:<full jid>` -> SessionEntry.
    pub const SESSION: &[u8] = b"s:";
    /// Cluster secrets by name (`k:dialback`).
    pub const SECRET: &[u8] = b"k:";
    /// Message archives (XEP-0313): `ma:<user>\0<id>` -> [`super::Archived`],
    /// the id a big-endian u64 (microseconds since the epoch, made unique
    /// and increasing per user), so one user's archive is one key range in
    /// time order.
    pub const ARCHIVE: &[u8] = b"ma:";
    /// `mw:<user>\0<with bare jid>\0<id>` -> nothing: the same archive by
    /// correspondent, for `with` queries that read only what they return.
    pub const ARCHIVE_WITH: &[u8] = b"mw:";
    /// `mm:<user>` -> [`super::ArchiveMeta`].
    pub const ARCHIVE_META: &[u8] = b"mm:";
    /// `mp:<user>` -> [`super::ArchivePrefs`].
    pub const ARCHIVE_PREFS: &[u8] = b"mp:";
    /// Group chat (XEP-0045): `mr:<room>` -> [`super::Room`].
    pub const ROOM: &[u8] = b"mr:";
    /// `mf:<room>\0<bare jid>` -> [`super::Affiliation`].
    pub const ROOM_AFFILIATION: &[u8] = b"mf:";
    /// `mo:<room>\0<nick>` -> [`super::Occupant`]: who is in the room now.
    pub const OCCUPANT: &[u8] = b"mo:";
    /// `mj:<real full jid>\0<room>` -> nick: the rooms a session is in, so
    /// a session that ends leaves them all.
    pub const OCCUPANT_OF: &[u8] = b"mj:";
    /// `mu:<owner bare jid>\0<room>` -> nothing: the rooms a user owns.
    pub const ROOMS_OWNED: &[u8] = b"mu:";
    /// XEP-0357: `pu:<user>\0<app server jid>\0<node>` -> publish options.
    pub const PUSH: &[u8] = b"pu:";
    /// FAST (XEP-0484): `ft:<user>\0<user-agent id>` -> [`super::FastTokens`].
    pub const FAST: &[u8] = b"ft:";
    /// `la:<user>` -> (seconds since the epoch, status): the last logout.
    pub const LAST_ACTIVITY: &[u8] = b"la:";
    /// PEP (XEP-0163): `pn:<owner>\0<node>` -> [`super::PepNode`].
    pub const PEP_NODE: &[u8] = b"pn:";
    /// `pi:<owner>\0<node>\0<seq>` -> [`super::PepItem`], oldest first.
    pub const PEP_ITEM: &[u8] = b"pi:";
    /// `pk:<owner>\0<node>\0<item id>` -> seq: items by id.
    pub const PEP_ITEM_ID: &[u8] = b"pk:";
    /// HTTP File Upload (XEP-0363): `uf:<slot id>` -> [`super::UploadRecord`].
    pub const UPLOAD: &[u8] = b"uf:";
    /// `uu:<owner bare jid>\0<slot id>` -> nothing: a user's slots and
    /// files, for the quota.
    pub const UPLOAD_OF: &[u8] = b"uu:";
    /// `ux:<expiry, big-endian u64 seconds><slot id>` -> nothing: slots and
    /// files in the order they expire, so a sweep reads only what is due.
    pub const UPLOAD_EXPIRY: &[u8] = b"ux:";

    pub fn upload(slot: &str) -> Vec<u8> {
        [UPLOAD, slot.as_bytes()].concat()
    }

    pub fn upload_expiry(expires: u64, slot: &str) -> Vec<u8> {
        [UPLOAD_EXPIRY, &expires.to_be_bytes(), slot.as_bytes()].concat()
    }

    pub fn pep_node(owner: &str, node: &str) -> Vec<u8> {
        user_key(PEP_NODE, owner, node)
    }

    pub fn pep_items(owner: &str, node: &str) -> Vec<u8> {
        [user_key(PEP_ITEM, owner, node).as_slice(), b"\0"].concat()
    }

    pub fn pep_item(owner: &str, node: &str, seq: u64) -> Vec<u8> {
        [pep_items(owner, node).as_slice(), &seq.to_be_bytes()].concat()
    }

    pub fn pep_item_id(owner: &str, node: &str, id: &str) -> Vec<u8> {
        [
            user_key(PEP_ITEM_ID, owner, node).as_slice(),
            b"\0",
            id.as_bytes(),
        ]
        .concat()
    }

    pub fn archive(user: &str, id: u64) -> Vec<u8> {
        [user_prefix(ARCHIVE, user).as_slice(), &id.to_be_bytes()].concat()
    }

    pub fn archive_with_prefix(user: &str, with: &str) -> Vec<u8> {
        [ARCHIVE_WITH, user.as_bytes(), b"\0", with.as_bytes(), b"\0"].concat()
    }

    pub fn archive_with(user: &str, with: &str, id: u64) -> Vec<u8> {
        [
            archive_with_prefix(user, with).as_slice(),
            &id.to_be_bytes(),
        ]
        .concat()
    }

    /// The id at the end of an archive key (either index).
    pub fn archive_id(key: &[u8]) -> u64 {
        key.len()
            .checked_sub(8)
            .and_then(|at| <[u8; 8]>::try_from(&key[at..]).ok())
            .map_or(0, u64::from_be_bytes)
    }

    pub fn roster_floor(user: &str) -> Vec<u8> {
        [ROSTER_FLOOR, user.as_bytes()].concat()
    }

    pub fn secret(name: &str) -> Vec<u8> {
        [SECRET, name.as_bytes()].concat()
    }

    pub fn session(jid: &str) -> Vec<u8> {
        [SESSION, jid.as_bytes()].concat()
    }

    pub fn session_jid(key: &[u8]) -> String {
        String::from_utf8_lossy(key.get(SESSION.len()..).unwrap_or_default()).into_owned()
    }

    /// `<prefix><user>\0`: everything of one user under a prefix.
    pub fn user_prefix(prefix: &[u8], user: &str) -> Vec<u8> {
        [prefix, user.as_bytes(), b"\0"].concat()
    }

    pub fn user_key(prefix: &[u8], user: &str, rest: &str) -> Vec<u8> {
        [prefix, user.as_bytes(), b"\0", rest.as_bytes()].concat()
    }

    pub fn account(user: &str) -> Vec<u8> {
        [ACCOUNT, user.as_bytes()].concat()
    }

    /// All offline messages of a user: `o:<bare>\0`.
    pub fn offline_prefix(user: &str) -> Vec<u8> {
        [OFFLINE, user.as_bytes(), b"\0"].concat()
    }

    pub fn offline(user: &str, seq: u64) -> Vec<u8> {
        [offline_prefix(user).as_slice(), &seq.to_be_bytes()].concat()
    }

    pub fn offline_meta(user: &str) -> Vec<u8> {
        [OFFLINE_META, user.as_bytes()].concat()
    }
}

/// A user's offline queue: messages `head..tail` (sequence numbers) are
/// stored, `bytes` in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct OfflineMeta {
    pub head: u64,
    pub tail: u64,
    pub bytes: u64,
}

impl OfflineMeta {
    pub fn count(&self) -> u64 {
        self.tail - self.head
    }

    /// The metadata of a queue stored without it (before it existed):
    /// its entries, in key order, under a prefix `prefix_len` long.
    pub(crate) fn measure(
        prefix_len: usize,
        entries: impl IntoIterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>>,
    ) -> Result<OfflineMeta, StoreError> {
        let mut meta: Option<OfflineMeta> = None;
        for kv in entries {
            let (k, v) = kv?;
            let seq = k
                .get(prefix_len..)
                .and_then(|s| <[u8; 8]>::try_from(s).ok())
                .map_or(0, u64::from_be_bytes);
            let m = meta.get_or_insert(OfflineMeta {
                head: seq,
                tail: seq,
                bytes: 0,
            });
            m.tail = seq + 1;
            m.bytes += v.len() as u64;
        }
        Ok(meta.unwrap_or_default())
    }
}

/// One archived message (XEP-0313); its id (the key) is its time.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Archived {
    /// The other party's bare JID.
    pub with: String,
    /// The other party's JID as the stanza named it (full, for `with`
    /// queries naming a resource).
    pub peer: String,
    /// The stanza as routed, in `jabber:client`, namespace declared.
    pub stanza: String,
}

/// Where a user's archive stands, so appending and capping never scan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ArchiveMeta {
    /// The newest id given out (ids only grow, even past deletions).
    pub last: u64,
    pub count: u64,
    pub bytes: u64,
}

/// The default of XEP-0313 §6 archiving preferences.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum ArchiveDefault {
    #[default]
    Always,
    Never,
    /// Only conversations with contacts in the roster.
    Roster,
}

impl ArchiveDefault {
    pub fn as_str(self) -> &'static str {
        match self {
            ArchiveDefault::Always => "always",
            ArchiveDefault::Never => "never",
            ArchiveDefault::Roster => "roster",
        }
    }

    pub fn parse(s: &str) -> Option<ArchiveDefault> {
        match s {
            "always" => Some(ArchiveDefault::Always),
            "never" => Some(ArchiveDefault::Never),
            "roster" => Some(ArchiveDefault::Roster),
            _ => None,
        }
    }
}

/// A user's archiving preferences (XEP-0313 §6).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ArchivePrefs {
    pub default: ArchiveDefault,
    /// Bare JIDs always archived, and never archived.
    pub always: Vec<String>,
    pub never: Vec<String>,
}

/// Who may see a PEP node's items (XEP-0060 §4.5).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum PepAccess {
    /// Contacts subscribed to the owner's presence (`from`/`both`).
    #[default]
    Presence,
    Open,
    /// The owner alone.
    Whitelist,
}

impl PepAccess {
    pub fn as_str(self) -> &'static str {
        match self {
            PepAccess::Presence => "presence",
            PepAccess::Open => "open",
            PepAccess::Whitelist => "whitelist",
        }
    }

    pub fn parse(s: &str) -> Option<PepAccess> {
        match s {
            "presence" => Some(PepAccess::Presence),
            "open" => Some(PepAccess::Open),
            "whitelist" => Some(PepAccess::Whitelist),
            _ => None,
        }
    }
}

/// `pubsub#max_items`: a number, or `max` (as many as the server keeps).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum MaxItems {
    Count(u64),
    Max,
}

impl MaxItems {
    pub fn parse(s: &str) -> Option<MaxItems> {
        match s.trim() {
            "max" => Some(MaxItems::Max),
            n => n.parse().ok().filter(|n| *n > 0).map(MaxItems::Count),
        }
    }

    pub fn text(self) -> String {
        match self {
            MaxItems::Count(n) => n.to_string(),
            MaxItems::Max => "max".into(),
        }
    }

    /// Items kept under the server's cap.
    pub fn within(self, cap: u64) -> u64 {
        match self {
            MaxItems::Count(n) => n.min(cap),
            MaxItems::Max => cap,
        }
    }
}

/// A PEP node's configuration (the `pubsub#node_config` fields we honour).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PepConfig {
    pub access: PepAccess,
    pub persist: bool,
    pub max_items: MaxItems,
}

impl Default for PepConfig {
    fn default() -> Self {
        PepConfig {
            access: PepAccess::Presence,
            persist: true,
            max_items: MaxItems::Count(1),
        }
    }
}

/// A PEP node: its configuration and where its items stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PepNode {
    pub config: PepConfig,
    /// The sequence number the next item gets.
    pub next: u64,
    pub count: u64,
}

/// One published item.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PepItem {
    pub id: String,
    /// The payload element, serialised with its namespace.
    pub payload: String,
}

/// A room's settings (XEP-0045 §10.2, the `muc#roomconfig` fields we honour).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RoomConfig {
    pub name: String,
    pub description: String,
    /// Kept when the last occupant leaves.
    pub persistent: bool,
    /// Listed in the service's disco#items.
    pub public: bool,
    pub members_only: bool,
    /// Only moderators and participants speak; newcomers are visitors.
    pub moderated: bool,
    pub password: Option<String>,
    pub max_occupants: u32,
    /// Everyone sees occupants' real JIDs (otherwise moderators only).
    pub whois_anyone: bool,
    /// Messages sent to a newcomer by default.
    pub history: u32,
    pub allow_invites: bool,
    pub allow_pm: bool,
    /// Occupants may change the subject (otherwise moderators only).
    pub change_subject: bool,
}

impl Default for RoomConfig {
    fn default() -> Self {
        RoomConfig {
            name: String::new(),
            description: String::new(),
            persistent: false,
            public: true,
            members_only: false,
            moderated: false,
            password: None,
            max_occupants: 200,
            whois_anyone: false,
            history: 20,
            allow_invites: true,
            allow_pm: true,
            change_subject: false,
        }
    }
}

/// A room: its settings and subject.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Room {
    pub config: RoomConfig,
    /// (nick of whoever set it, text).
    pub subject: Option<(String, String)>,
}

/// A long-lived relation to a room (XEP-0045 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default, Serialize, Deserialize)]
pub enum Affiliation {
    Outcast,
    #[default]
    None,
    Member,
    Admin,
    Owner,
}

impl Affiliation {
    pub fn as_str(self) -> &'static str {
        match self {
            Affiliation::Owner => "owner",
            Affiliation::Admin => "admin",
            Affiliation::Member => "member",
            Affiliation::None => "none",
            Affiliation::Outcast => "outcast",
        }
    }

    pub fn parse(s: &str) -> Option<Affiliation> {
        Some(match s {
            "owner" => Affiliation::Owner,
            "admin" => Affiliation::Admin,
            "member" => Affiliation::Member,
            "none" => Affiliation::None,
            "outcast" => Affiliation::Outcast,
            _ => return None,
        })
    }
}

/// A role in the room while present (XEP-0045 §5.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Role {
    None,
    Visitor,
    Participant,
    Moderator,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Moderator => "moderator",
            Role::Participant => "participant",
            Role::Visitor => "visitor",
            Role::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        Some(match s {
            "moderator" => Role::Moderator,
            "participant" => Role::Participant,
            "visitor" => Role::Visitor,
            "none" => Role::None,
            _ => return None,
        })
    }
}

/// Someone in a room now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Occupant {
    /// The session's full JID.
    pub real: String,
    pub role: Role,
    pub affiliation: Affiliation,
    /// XEP-0421: stable per room and bare JID, opaque.
    pub occupant_id: String,
    /// The last presence's children (show, status, caps), as sent.
    pub presence: String,
}

/// A FAST token (XEP-0484) one client (user-agent id) of a user holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FastToken {
    /// The secret the client proves it holds (the HMAC key).
    pub token: String,
    /// The HT mechanism it was issued for (e.g. `HT-SHA-256-EXPR`).
    pub mechanism: String,
    /// Seconds since the epoch.
    pub issued: u64,
    pub expiry: u64,
}

/// The tokens of one client, oldest first: the newest, and the one it
/// replaced (valid until it expires, so a client that missed the new
/// token's delivery still gets in once).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct FastTokens {
    pub tokens: Vec<FastToken>,
}

/// An upload slot (XEP-0363) and, once the PUT completed, its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRecord {
    /// The bare JID it was handed to.
    pub owner: String,
    /// As it appears in the URLs (checked, not percent-encoded).
    pub filename: String,
    /// Exactly the bytes the PUT must carry.
    pub size: u64,
    pub content_type: String,
    /// When the slot was handed out (seconds since the epoch).
    pub created: u64,
    /// A PUT must begin before this (seconds).
    pub put_by: u64,
    /// When the slot goes if unused (`put_by` and the time a PUT that
    /// began may take), or, once stored, when the file goes (seconds;
    /// `u64::MAX`: never).
    pub expires: u64,
    /// The node whose disk took the file; `None` until the PUT completed.
    pub stored_on: Option<u64>,
}

/// Where a user's client wants to be woken (XEP-0357).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushRegistration {
    pub jid: String,
    pub node: String,
    /// `publish-options` fields (var, value), e.g. the app's secret.
    pub options: Vec<(String, String)>,
}

/// One contact in a user's roster (RFC 6121 §2.1.2).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct RosterItem {
    pub name: Option<String>,
    pub groups: Vec<String>,
    pub sub: xmpp::roster::SubState,
    /// The roster version at which this item last changed.
    pub ver: u64,
    /// False while the item only records subscription state the user has
    /// not acted on (a contact's pending request, a pre-approval): such
    /// items are not part of the roster the user sees (RFC 6121 §3.1.3).
    pub visible: bool,
    /// The contact's pending `subscribe` stanza, redelivered at each
    /// login until answered (§3.1.3).
    pub pending_request: Option<String>,
}

fn decode_item(bytes: &[u8]) -> Result<RosterItem, StoreError> {
    Ok(postcard::from_bytes(bytes)?)
}

fn rest_of_key(key: &[u8], prefix_len: usize) -> String {
    String::from_utf8_lossy(key.get(prefix_len..).unwrap_or_default()).into_owned()
}

/// Keys and values, in key order.
pub type Pairs = Vec<(Vec<u8>, Vec<u8>)>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record is corrupt: {0}")]
    Decode(#[from] postcard::Error),
    #[error("{0}")]
    Fault(String),
}

/// A stored account: its SCRAM credentials, one per hash, never a password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Account {
    pub credentials: Vec<ScramCredentials>,
}

impl Account {
    pub fn credentials(&self, hash: HashAlg) -> Option<&ScramCredentials> {
        self.credentials.iter().find(|c| c.hash == hash)
    }
}

/// A write set applied atomically.
#[derive(Default)]
pub struct Batch(Vec<(Vec<u8>, Option<Vec<u8>>)>);

impl Batch {
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.0.push((key.to_vec(), Some(value.to_vec())));
    }
    pub fn delete(&mut self, key: &[u8]) {
        self.0.push((key.to_vec(), None));
    }
}

/// Pending writes older than this reach sled at the next apply.
pub const PERSIST_EVERY: std::time::Duration = std::time::Duration::from_millis(200);
/// This many pending keys reach sled at once.
pub const PERSIST_KEYS: usize = 4096;

/// Applied writes not yet in sled (`None`: a deletion).
#[derive(Default)]
struct Pending {
    writes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    since: Option<Instant>,
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
    pending: Arc<RwLock<Pending>>,
    /// Held while pending writes move to sled: one mover at a time.
    persisting: Arc<Mutex<()>>,
    persist_every: std::time::Duration,
    /// Users with a blocklist entry (XEP-0191), kept from every write: most
    /// users block nobody, and every stanza routed asks (a sled scan per
    /// stanza was 6% of a node's CPU at 5,000 messages/s).
    blockers: Arc<RwLock<HashSet<Vec<u8>>>>,
}

/// The user of a `b:<user>\0<jid>` key.
fn blocker_of(key: &[u8]) -> Option<&[u8]> {
    let rest = key.strip_prefix(keys::BLOCK)?;
    let end = rest.iter().position(|&b| b == 0)?;
    Some(&rest[..end])
}

impl Store {
    pub fn open(dir: &std::path::Path) -> Result<Store, StoreError> {
        // No background flusher: every write is flushed before it is
        // acknowledged (Cluster::write), and keeping sled's own flusher
        // thread out of its lock dance removes a party to the deadlock
        // described there.
        let db = sled::Config::new().path(dir).flush_every_ms(None).open()?;
        let tree = db.open_tree("state")?;
        let store = Store {
            db,
            tree,
            pending: Arc::default(),
            persisting: Arc::default(),
            persist_every: PERSIST_EVERY,
            blockers: Arc::default(),
        };
        store.index_blockers()?;
        Ok(store)
    }

    /// Builds the set of users with a blocklist from the whole state.
    fn index_blockers(&self) -> Result<(), StoreError> {
        let mut set = HashSet::new();
        for kv in self.scan_prefix(keys::BLOCK) {
            let (k, _) = kv?;
            if let Some(user) = blocker_of(&k) {
                set.insert(user.to_vec());
            }
        }
        *self.blockers.write().unwrap_or_else(|p| p.into_inner()) = set;
        Ok(())
    }

    /// Brings the blocker set up to date after a batch that touched these
    /// blocklist keys (`true`: written, `false`: deleted).
    fn note_blocks(&self, touched: Vec<(Vec<u8>, bool)>) -> Result<(), StoreError> {
        for (user, written) in touched {
            if written {
                self.blockers
                    .write()
                    .unwrap_or_else(|p| p.into_inner())
                    .insert(user);
            } else {
                let prefix = [keys::BLOCK, &user, b"\0"].concat();
                if self.scan_prefix(&prefix).next().transpose()?.is_none() {
                    self.blockers
                        .write()
                        .unwrap_or_else(|p| p.into_inner())
                        .remove(&user);
                }
            }
        }
        Ok(())
    }

    /// Pending writes reach sled after `d` instead of [`PERSIST_EVERY`].
    pub fn with_persist_every(mut self, d: std::time::Duration) -> Store {
        self.persist_every = d;
        self
    }

    fn pending(&self) -> std::sync::RwLockReadGuard<'_, Pending> {
        self.pending.read().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        if let Some(v) = self.pending().writes.get(key) {
            return Ok(v.clone());
        }
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    fn contains(&self, key: &[u8]) -> Result<bool, StoreError> {
        if let Some(v) = self.pending().writes.get(key) {
            return Ok(v.is_some());
        }
        Ok(self.tree.contains_key(key)?)
    }

    /// Keys with this prefix, in order, pending writes included.
    pub fn scan_prefix(
        &self,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + '_ {
        let overlay: Vec<(Vec<u8>, Option<Vec<u8>>)> = {
            let p = self.pending();
            p.writes
                .range(prefix.to_vec()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        Merge {
            base: self.tree.scan_prefix(prefix).peekable(),
            overlay: overlay.into_iter().peekable(),
            rev: false,
        }
    }

    /// Keys in `lo..hi`, in order (`rev`: from the highest down), pending
    /// writes included. Lazy: a page from either end of a long range reads
    /// that page only.
    pub fn range(
        &self,
        lo: Vec<u8>,
        hi: Vec<u8>,
        rev: bool,
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + '_ {
        let mut overlay: Vec<(Vec<u8>, Option<Vec<u8>>)> = if lo < hi {
            let p = self.pending();
            p.writes
                .range(lo.clone()..hi.clone())
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        } else {
            Vec::new()
        };
        let base: SledIter = if lo >= hi {
            Box::new(std::iter::empty())
        } else if rev {
            overlay.reverse();
            Box::new(self.tree.range(lo..hi).rev())
        } else {
            Box::new(self.tree.range(lo..hi))
        };
        Merge {
            base: base.peekable(),
            overlay: overlay.into_iter().peekable(),
            rev,
        }
    }

    /// Applies a batch: visible to reads at once, in sled soon (see the
    /// module documentation).
    pub fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        let touched: Vec<(Vec<u8>, bool)> = batch
            .0
            .iter()
            .filter_map(|(k, v)| Some((blocker_of(k)?.to_vec(), v.is_some())))
            .collect();
        let due = {
            let mut p = self.pending.write().unwrap_or_else(|p| p.into_inner());
            p.writes.extend(batch.0);
            let since = *p.since.get_or_insert_with(Instant::now);
            p.writes.len() >= PERSIST_KEYS || since.elapsed() >= self.persist_every
        };
        if !touched.is_empty() {
            self.note_blocks(touched)?;
        }
        if due {
            self.persist()?;
        }
        Ok(())
    }

    /// Moves the pending writes to sled in one atomic batch.
    pub fn persist(&self) -> Result<(), StoreError> {
        let _one = self.persisting.lock().unwrap_or_else(|p| p.into_inner());
        self.persist_locked()
    }

    fn persist_locked(&self) -> Result<(), StoreError> {
        let writes: Vec<(Vec<u8>, Option<Vec<u8>>)> = {
            let p = self.pending();
            if p.writes.is_empty() {
                return Ok(());
            }
            p.writes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect()
        };
        let mut batch = sled::Batch::default();
        for (k, v) in &writes {
            match v {
                Some(v) => batch.insert(k.as_slice(), v.as_slice()),
                None => batch.remove(k.as_slice()),
            }
        }
        self.tree.apply_batch(batch)?;
        // Drop what reached sled, unless it was written again meanwhile.
        let mut p = self.pending.write().unwrap_or_else(|p| p.into_inner());
        for (k, v) in writes {
            if p.writes.get(&k) == Some(&v) {
                p.writes.remove(&k);
            }
        }
        p.since = (!p.writes.is_empty()).then(Instant::now);
        Ok(())
    }

    /// Makes every write so far durable in this database.
    /// The flush holds the persist lock, so no `apply_batch` of this
    /// database runs beside it (sled 0.34 can deadlock on that pair); it
    /// blocks a thread of the blocking pool, not an async worker.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let store = self.clone();
        tokio::task::spawn_blocking(move || {
            let _one = store.persisting.lock().unwrap_or_else(|p| p.into_inner());
            store.persist_locked()?;
            store.db.flush()?;
            Ok(())
        })
        .await
        .map_err(|e| StoreError::Fault(format!("the final flush did not finish: {e}")))?
    }

    // ---- typed reads -------------------------------------------------

    pub fn account(&self, user: &BareJid) -> Result<Option<Account>, StoreError> {
        match self.get(&keys::account(&user.to_string()))? {
            Some(bytes) => Ok(Some(postcard::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    pub fn account_exists(&self, user: &BareJid) -> Result<bool, StoreError> {
        self.contains(&keys::account(&user.to_string()))
    }

    /// Users of one virtual host (all hosts when `vhost` is empty), sorted.
    pub fn users(&self, vhost: &str) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for kv in self.scan_prefix(keys::ACCOUNT) {
            let (k, _) = kv?;
            let jid = String::from_utf8_lossy(&k[keys::ACCOUNT.len()..]).into_owned();
            let matches = vhost.is_empty() || jid.rsplit_once('@').is_some_and(|(_, d)| d == vhost);
            if matches {
                out.push(jid);
            }
        }
        Ok(out)
    }

    pub fn account_count(&self) -> Result<u64, StoreError> {
        let mut n = 0;
        for kv in self.scan_prefix(keys::ACCOUNT) {
            kv?;
            n += 1;
        }
        Ok(n)
    }

    /// Where `user`'s offline queue stands. A queue stored before the
    /// metadata existed is measured by a scan until its next change.
    pub fn offline_meta(&self, user: &str) -> Result<OfflineMeta, StoreError> {
        if let Some(b) = self.get(&keys::offline_meta(user))? {
            return Ok(postcard::from_bytes(&b)?);
        }
        let prefix = keys::offline_prefix(user);
        OfflineMeta::measure(prefix.len(), self.scan_prefix(&prefix))
    }

    pub fn offline_count(&self, user: &BareJid) -> Result<u64, StoreError> {
        Ok(self.offline_meta(&user.to_string())?.count())
    }

    /// Up to `max` of `user`'s oldest stored messages, as (sequence, XML).
    pub fn offline_page(&self, user: &str, max: usize) -> Result<Vec<(u64, String)>, StoreError> {
        let meta = self.offline_meta(user)?;
        let mut out = Vec::new();
        let mut seq = meta.head;
        while seq < meta.tail && out.len() < max {
            if let Some(v) = self.get(&keys::offline(user, seq))? {
                out.push((seq, String::from_utf8_lossy(&v).into_owned()));
            }
            seq += 1;
        }
        Ok(out)
    }

    /// The roster item for `contact`, visible or not.
    pub fn roster_item(&self, user: &str, contact: &str) -> Result<Option<RosterItem>, StoreError> {
        self.get(&keys::user_key(keys::ROSTER, user, contact))?
            .map(|b| decode_item(&b))
            .transpose()
    }

    /// Every roster item of a user (hidden ones included), by contact JID.
    pub fn roster(&self, user: &str) -> Result<Vec<(String, RosterItem)>, StoreError> {
        let prefix = keys::user_prefix(keys::ROSTER, user);
        self.scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((rest_of_key(&k, prefix.len()), decode_item(&v)?))
            })
            .collect()
    }

    pub fn roster_version(&self, user: &str) -> Result<u64, StoreError> {
        Ok(self
            .get(&[keys::ROSTER_VER, user.as_bytes()].concat())?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Roster versions below this one cannot be updated incrementally:
    /// removal marks from before it were dropped.
    pub fn roster_floor(&self, user: &str) -> Result<u64, StoreError> {
        Ok(self
            .get(&keys::roster_floor(user))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }

    /// Contacts removed from the roster, with the version of the removal.
    pub fn roster_removals(&self, user: &str) -> Result<Vec<(String, u64)>, StoreError> {
        let prefix = keys::user_prefix(keys::ROSTER_GONE, user);
        self.scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv?;
                let ver = <[u8; 8]>::try_from(v.as_slice())
                    .map(u64::from_be_bytes)
                    .unwrap_or(0);
                Ok((rest_of_key(&k, prefix.len()), ver))
            })
            .collect()
    }

    /// The user's blocklist (XEP-0191), as JID strings.
    pub fn blocklist(&self, user: &str) -> Result<Vec<String>, StoreError> {
        let prefix = keys::user_prefix(keys::BLOCK, user);
        self.scan_prefix(&prefix)
            .map(|kv| Ok(rest_of_key(&kv?.0, prefix.len())))
            .collect()
    }

    /// Whether `user` blocks nobody: answered from memory.
    pub fn blocklist_is_empty(&self, user: &str) -> bool {
        !self
            .blockers
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .contains(user.as_bytes())
    }

    pub fn is_blocked(&self, user: &str, jid: &str) -> Result<bool, StoreError> {
        self.contains(&keys::user_key(keys::BLOCK, user, jid))
    }

    /// A cluster secret (see `Command::InitSecret`).
    pub fn secret(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        self.get(&keys::secret(name))
    }

    pub fn vcard(&self, user: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .get(&keys::user_key(keys::VCARD, user, ""))?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    pub fn private(&self, user: &str, namespace: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .get(&keys::user_key(keys::PRIVATE, user, namespace))?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    pub fn archive_meta(&self, user: &str) -> Result<ArchiveMeta, StoreError> {
        match self.get(&[keys::ARCHIVE_META, user.as_bytes()].concat())? {
            Some(b) => Ok(postcard::from_bytes(&b)?),
            None => Ok(ArchiveMeta::default()),
        }
    }

    /// `None`: the user never set preferences (the server default applies).
    pub fn archive_prefs(&self, user: &str) -> Result<Option<ArchivePrefs>, StoreError> {
        match self.get(&[keys::ARCHIVE_PREFS, user.as_bytes()].concat())? {
            Some(b) => Ok(Some(postcard::from_bytes(&b)?)),
            None => Ok(None),
        }
    }

    pub fn archived(&self, user: &str, id: u64) -> Result<Option<Archived>, StoreError> {
        match self.get(&keys::archive(user, id))? {
            Some(b) => Ok(Some(postcard::from_bytes(&b)?)),
            None => Ok(None),
        }
    }

    /// `user`'s archived messages with ids in `lo..hi`, oldest first (or
    /// newest first when `rev`), only those with `with` (a bare JID) when
    /// given, each read as the iterator reaches it.
    pub fn archive_range<'a>(
        &'a self,
        user: &'a str,
        with: Option<&str>,
        lo: u64,
        hi: u64,
        rev: bool,
    ) -> Box<dyn Iterator<Item = Result<(u64, Archived), StoreError>> + 'a> {
        match with {
            None => {
                let p = keys::user_prefix(keys::ARCHIVE, user);
                let bound = |id: u64| [p.as_slice(), &id.to_be_bytes()].concat();
                Box::new(self.range(bound(lo), bound(hi), rev).map(|kv| {
                    let (k, v) = kv?;
                    Ok((keys::archive_id(&k), postcard::from_bytes(&v)?))
                }))
            }
            Some(with) => {
                let p = keys::archive_with_prefix(user, with);
                let bound = |id: u64| [p.as_slice(), &id.to_be_bytes()].concat();
                Box::new(
                    self.range(bound(lo), bound(hi), rev)
                        .filter_map(move |kv| match kv {
                            Err(e) => Some(Err(e)),
                            Ok((k, _)) => {
                                let id = keys::archive_id(&k);
                                self.archived(user, id)
                                    .transpose()
                                    .map(|a| a.map(|a| (id, a)))
                            }
                        }),
                )
            }
        }
    }

    pub fn room(&self, room: &str) -> Result<Option<Room>, StoreError> {
        match self.get(&[keys::ROOM, room.as_bytes()].concat())? {
            Some(b) => Ok(Some(postcard::from_bytes(&b)?)),
            None => Ok(None),
        }
    }

    /// Every room of a service domain (`@domain` suffix), with its settings.
    pub fn rooms(&self, domain: &str) -> Result<Vec<(String, Room)>, StoreError> {
        let mut out = Vec::new();
        for kv in self.scan_prefix(keys::ROOM) {
            let (k, v) = kv?;
            let jid = rest_of_key(&k, keys::ROOM.len());
            if jid.rsplit_once('@').is_some_and(|(_, d)| d == domain) {
                out.push((jid, postcard::from_bytes(&v)?));
            }
        }
        Ok(out)
    }

    pub fn occupants(&self, room: &str) -> Result<Vec<(String, Occupant)>, StoreError> {
        let prefix = keys::user_prefix(keys::OCCUPANT, room);
        self.scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((rest_of_key(&k, prefix.len()), postcard::from_bytes(&v)?))
            })
            .collect()
    }

    pub fn affiliation(&self, room: &str, jid: &str) -> Result<Affiliation, StoreError> {
        match self.get(&keys::user_key(keys::ROOM_AFFILIATION, room, jid))? {
            Some(b) => Ok(postcard::from_bytes(&b)?),
            None => Ok(Affiliation::None),
        }
    }

    pub fn affiliations(&self, room: &str) -> Result<Vec<(String, Affiliation)>, StoreError> {
        let prefix = keys::user_prefix(keys::ROOM_AFFILIATION, room);
        self.scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((rest_of_key(&k, prefix.len()), postcard::from_bytes(&v)?))
            })
            .collect()
    }

    /// The nick `real` (a full JID) has in `room`, if it is there.
    pub fn nick_of(&self, room: &str, real: &str) -> Result<Option<String>, StoreError> {
        Ok(self
            .get(&keys::user_key(keys::OCCUPANT_OF, real, room))?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// `user`'s push registrations (XEP-0357): app server JID, node, and
    /// the publish options to send along.
    pub fn push_registrations(&self, user: &str) -> Result<Vec<PushRegistration>, StoreError> {
        let prefix = keys::user_prefix(keys::PUSH, user);
        self.scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv?;
                let rest = rest_of_key(&k, prefix.len());
                let (jid, node) = rest.split_once('\0').unwrap_or((rest.as_str(), ""));
                Ok(PushRegistration {
                    jid: jid.to_owned(),
                    node: node.to_owned(),
                    options: postcard::from_bytes(&v)?,
                })
            })
            .collect()
    }

    /// The FAST tokens of `user`'s client `agent` (XEP-0484).
    pub fn fast_tokens(&self, user: &str, agent: &str) -> Result<FastTokens, StoreError> {
        match self.get(&keys::user_key(keys::FAST, user, agent))? {
            Some(b) => Ok(postcard::from_bytes(&b)?),
            None => Ok(FastTokens::default()),
        }
    }

    /// An upload slot (XEP-0363) by its id.
    pub fn upload(&self, slot: &str) -> Result<Option<UploadRecord>, StoreError> {
        match self.get(&keys::upload(slot))? {
            Some(b) => Ok(Some(postcard::from_bytes(&b)?)),
            None => Ok(None),
        }
    }

    /// Up to `max` slot ids whose expiry is at or before `now`, soonest first.
    pub fn uploads_due(&self, now: u64, max: usize) -> Result<Vec<String>, StoreError> {
        let mut out = Vec::new();
        for kv in self.scan_prefix(keys::UPLOAD_EXPIRY) {
            let (k, _) = kv?;
            let rest = k.get(keys::UPLOAD_EXPIRY.len()..).unwrap_or_default();
            let Some((at, slot)) = rest.split_first_chunk::<8>() else {
                continue;
            };
            if u64::from_be_bytes(*at) > now || out.len() >= max {
                break;
            }
            out.push(String::from_utf8_lossy(slot).into_owned());
        }
        Ok(out)
    }

    /// When `user` was last online, and their status text then (XEP-0012).
    pub fn last_activity(&self, user: &str) -> Result<Option<(u64, Option<String>)>, StoreError> {
        match self.get(&[keys::LAST_ACTIVITY, user.as_bytes()].concat())? {
            Some(b) => Ok(Some(postcard::from_bytes(&b)?)),
            None => Ok(None),
        }
    }

    pub fn pep_node(&self, owner: &str, node: &str) -> Result<Option<PepNode>, StoreError> {
        match self.get(&keys::pep_node(owner, node))? {
            Some(b) => Ok(Some(postcard::from_bytes(&b)?)),
            None => Ok(None),
        }
    }

    /// The names and configurations of `owner`'s PEP nodes.
    pub fn pep_nodes(&self, owner: &str) -> Result<Vec<(String, PepNode)>, StoreError> {
        let prefix = keys::user_prefix(keys::PEP_NODE, owner);
        self.scan_prefix(&prefix)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((rest_of_key(&k, prefix.len()), postcard::from_bytes(&v)?))
            })
            .collect()
    }

    /// Up to `max` of a node's items, newest first.
    pub fn pep_items(
        &self,
        owner: &str,
        node: &str,
        max: usize,
    ) -> Result<Vec<PepItem>, StoreError> {
        let prefix = keys::pep_items(owner, node);
        let hi = [prefix.as_slice(), &[0xff; 9]].concat();
        self.range(prefix, hi, true)
            .take(max)
            .map(|kv| Ok(postcard::from_bytes(&kv?.1)?))
            .collect()
    }

    /// One item by its id.
    pub fn pep_item(
        &self,
        owner: &str,
        node: &str,
        id: &str,
    ) -> Result<Option<PepItem>, StoreError> {
        let Some(seq) = self.get(&keys::pep_item_id(owner, node, id))? else {
            return Ok(None);
        };
        let seq = <[u8; 8]>::try_from(seq.as_slice()).map_or(0, u64::from_be_bytes);
        match self.get(&keys::pep_item(owner, node, seq))? {
            Some(b) => Ok(Some(postcard::from_bytes(&b)?)),
            None => Ok(None),
        }
    }

    /// The whole replicated state, for a snapshot.
    pub fn dump(&self) -> Result<Pairs, StoreError> {
        self.scan_prefix(b"").collect()
    }

    /// Replaces the whole state with a snapshot's, in one atomic batch.
    pub fn replace_all(&self, pairs: Pairs) -> Result<(), StoreError> {
        let _one = self.persisting.lock().unwrap_or_else(|p| p.into_inner());
        *self.pending.write().unwrap_or_else(|p| p.into_inner()) = Pending::default();
        let mut batch = sled::Batch::default();
        for k in self.tree.iter().keys() {
            batch.remove(k?);
        }
        for (k, v) in pairs {
            batch.insert(k, v);
        }
        self.tree.apply_batch(batch)?;
        self.index_blockers()
    }

    /// Every entry of the session table.
    pub fn sessions(
        &self,
    ) -> Result<Vec<(String, crate::cluster::state_machine::SessionEntry)>, StoreError> {
        self.scan_prefix(keys::SESSION)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((keys::session_jid(&k), postcard::from_bytes(&v)?))
            })
            .collect()
    }

    pub fn applied_index(&self) -> Result<u64, StoreError> {
        Ok(self
            .get(keys::APPLIED)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }
}

type SledIter = Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>> + Send>;

/// Pending writes of one scan, in key order.
type Overlay = Peekable<std::vec::IntoIter<(Vec<u8>, Option<Vec<u8>>)>>;

/// sled's keys merged with the pending writes (which win, and hide what
/// they delete), in key order (`rev`: both in descending order).
struct Merge<B: Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> {
    base: Peekable<B>,
    overlay: Overlay,
    rev: bool,
}

impl<B: Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> Iterator for Merge<B> {
    type Item = Result<(Vec<u8>, Vec<u8>), StoreError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let take_overlay = match (self.base.peek(), self.overlay.peek()) {
                (None, None) => return None,
                (Some(Err(_)), _) => {
                    return self.base.next().map(|r| match r {
                        Err(e) => Err(e.into()),
                        Ok((k, v)) => Ok((k.to_vec(), v.to_vec())),
                    })
                }
                (None, Some(_)) => true,
                (Some(_), None) => false,
                (Some(Ok((bk, _))), Some((ok, _))) => {
                    if ok.as_slice() == bk.as_ref() {
                        // Same key: the pending write replaces sled's value.
                        self.base.next();
                        true
                    } else {
                        (ok.as_slice() < bk.as_ref()) != self.rev
                    }
                }
            };
            if take_overlay {
                match self.overlay.next() {
                    Some((k, Some(v))) => return Some(Ok((k, v))),
                    // A pending deletion: skip it (sled's copy, if any,
                    // was consumed above).
                    Some((_, None)) => continue,
                    None => return None,
                }
            }
            return self.base.next().map(|r| {
                r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                    .map_err(StoreError::from)
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn batch(ops: &[(&str, Option<&str>)]) -> Batch {
        let mut b = Batch::default();
        for (k, v) in ops {
            match v {
                Some(v) => b.put(k.as_bytes(), v.as_bytes()),
                None => b.delete(k.as_bytes()),
            }
        }
        b
    }

    fn scan(s: &Store, prefix: &str) -> Vec<(String, String)> {
        s.scan_prefix(prefix.as_bytes())
            .map(|kv| {
                let (k, v) = kv.expect("scan");
                (
                    String::from_utf8(k).expect("utf8"),
                    String::from_utf8(v).expect("utf8"),
                )
            })
            .collect()
    }

    /// Opens the store again in this process. sled releases its file lock
    /// from its I/O threads shortly after the last handle is dropped (a
    /// process that exits releases it at once): wait for that release.
    fn reopen(dir: &std::path::Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        loop {
            match Store::open(dir) {
                Ok(s) => return s,
                Err(StoreError::Sled(sled::Error::Io(e)))
                    if e.to_string().contains("could not acquire lock")
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(std::time::Duration::from_millis(10));
                }
                Err(e) => panic!("reopen: {e}"),
            }
        }
    }

    /// The in-memory set of users with a blocklist follows every write,
    /// a reopen and a snapshot install.
    #[test]
    fn the_blocker_set_follows_writes_reopens_and_snapshots() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = Store::open(dir.path()).expect("open");
            assert!(s.blocklist_is_empty("a@x"));
            s.apply(batch(&[
                ("b:a@x\0m@y", Some("")),
                ("b:a@x\0n@y", Some("")),
                ("bi:m@y\0a@x", Some("")),
            ]))
            .expect("apply");
            assert!(!s.blocklist_is_empty("a@x"));
            assert!(s.blocklist_is_empty("m@y"), "blocked is not blocking");
            s.apply(batch(&[("b:a@x\0m@y", None)])).expect("apply");
            assert!(!s.blocklist_is_empty("a@x"), "one entry left");
            s.persist().expect("persist");
        }
        let s = reopen(dir.path());
        assert!(!s.blocklist_is_empty("a@x"), "rebuilt at open");
        s.apply(batch(&[("b:a@x\0n@y", None), ("b:a@xx\0n@y", Some(""))]))
            .expect("apply");
        assert!(s.blocklist_is_empty("a@x"), "the last entry went");
        assert!(!s.blocklist_is_empty("a@xx"));
        s.replace_all(vec![(b"b:c@x\0d@y".to_vec(), Vec::new())])
            .expect("replace");
        assert!(s.blocklist_is_empty("a@xx"), "a snapshot replaces the set");
        assert!(!s.blocklist_is_empty("c@x"));
    }

    /// Reads merge sled with the pending writes (which win and hide their
    /// deletions); pending writes reach sled only when persisted.
    #[test]
    fn pending_writes_are_read_first_and_persisted_together() {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let s = Store::open(dir.path()).expect("open");
            s.apply(batch(&[
                ("p:a", Some("1")),
                ("p:c", Some("3")),
                ("p:e", Some("5")),
            ]))
            .expect("apply");
            s.persist().expect("persist");
            // Pending over persisted: overwrite c, delete e, add b and d,
            // delete a key that never existed.
            s.apply(batch(&[
                ("p:c", Some("33")),
                ("p:e", None),
                ("p:b", Some("2")),
                ("p:d", Some("4")),
                ("p:zz", None),
                ("q:x", Some("other prefix")),
            ]))
            .expect("apply");
            let want: Vec<(String, String)> =
                [("p:a", "1"), ("p:b", "2"), ("p:c", "33"), ("p:d", "4")]
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect();
            assert_eq!(scan(&s, "p:"), want);
            assert_eq!(s.get(b"p:e").expect("get"), None);
            assert_eq!(s.get(b"p:c").expect("get").as_deref(), Some(&b"33"[..]));
            assert!(!s.contains(b"p:e").expect("contains"));
            // Dropped without persisting, as in a crash.
        }
        {
            let s = reopen(dir.path());
            let persisted: Vec<String> = scan(&s, "p:")
                .into_iter()
                .map(|(k, v)| format!("{k}={v}"))
                .collect();
            assert_eq!(
                persisted,
                ["p:a=1", "p:c=3", "p:e=5"],
                "only what was persisted"
            );
            s.apply(batch(&[("p:e", None), ("p:b", Some("2"))]))
                .expect("apply");
            s.persist().expect("persist");
        }
        let s = reopen(dir.path());
        let persisted: Vec<String> = scan(&s, "p:")
            .into_iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        assert_eq!(persisted, ["p:a=1", "p:b=2", "p:c=3"]);
    }
}
