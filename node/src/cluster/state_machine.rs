//! The replicated state machine: every write to the node's durable state is
//! a [`Command`] value, applied by one [`apply`] function.
//!
//! `apply` is deterministic: it reads and writes only the store, takes no
//! clock and no randomness (salts, timestamps, ids and incarnations are
//! inside the command, chosen by whoever proposed it). Raft replays the
//! same log on every node through this exact function to the same state
//! ([`super::raft_sm`] wraps it for openraft).
//!
//! Besides its [`Response`] (for the proposer), applying a command yields
//! [`Effect`]s: what every node must do about it (close a session that lost
//! a resource conflict, tell contacts that a dead node's users are gone).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use xmpp::roster::{SubKind, Transition};
use xmpp::sasl::ScramCredentials;

pub mod muc;

use crate::store::{
    keys, Account, ArchiveDefault, ArchiveMeta, ArchivePrefs, Archived, Batch, FastToken,
    FastTokens, MaxItems, OfflineMeta, PepAccess, PepConfig, PepItem, PepNode, RosterItem, Store,
    StoreError,
};

/// Which side of a subscription stanza this server processes (RFC 6121 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Direction {
    /// The user sent it about the contact.
    Outbound,
    /// The user received it from the contact.
    Inbound,
}

/// A state change, as it will travel in the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create `user` (a normalised bare JID). Fails if it exists.
    CreateAccount {
        user: String,
        credentials: Vec<ScramCredentials>,
    },
    /// Create many accounts at once; existing ones are replaced when
    /// `update_existing`, skipped otherwise.
    ImportAccounts {
        accounts: Vec<(String, Vec<ScramCredentials>)>,
        update_existing: bool,
    },
    SetPassword {
        user: String,
        credentials: Vec<ScramCredentials>,
    },
    /// Remove the account and everything stored for it.
    DeleteAccount {
        user: String,
    },
    /// Queue a message (already stamped with `<delay/>`) for an offline
    /// user; refused when the queue holds `max` messages (XEP-0160).
    StoreOffline {
        user: String,
        stanza: String,
        max: u32,
    },
    /// Remove and return the user's queued messages, oldest first.
    TakeOffline {
        user: String,
    },
    /// Add or update a roster item's name and groups (RFC 6121 §2.4).
    RosterSet {
        user: String,
        contact: String,
        name: Option<String>,
        groups: Vec<String>,
        /// Refused when a new contact would make the roster larger.
        max: u32,
    },
    /// Remove a roster item (RFC 6121 §2.5). The caller sends the
    /// unsubscribe/unsubscribed the old state calls for.
    RosterRemove {
        user: String,
        contact: String,
    },
    /// One side of a subscription stanza (RFC 6121 §3). `stanza` is the
    /// inbound `subscribe` to keep for redelivery while it is pending.
    Subscription {
        user: String,
        contact: String,
        direction: Direction,
        kind: SubKind,
        stanza: Option<String>,
    },
    /// A subscription stanza from one local user to another: the sender's
    /// outbound side, then (if it is forwarded) the recipient's inbound
    /// side, then (if the recipient's server answers on its behalf) the
    /// sender's inbound side of that answer, all in one committed entry.
    SubscriptionLocal {
        from: String,
        to: String,
        kind: SubKind,
        stanza: String,
    },
    /// Several commands applied atomically.
    Batch(Vec<Command>),
    /// XEP-0191: add JIDs to the blocklist.
    Block {
        user: String,
        jids: Vec<String>,
        /// Refused when the list would grow beyond it.
        max: u32,
    },
    /// XEP-0191: remove JIDs from the blocklist (all when empty).
    Unblock {
        user: String,
        jids: Vec<String>,
    },
    /// XEP-0054: replace (or with `None`, remove) the user's vCard.
    SetVcard {
        user: String,
        vcard: Option<String>,
    },
    /// XEP-0049: store one private XML element under its namespace.
    SetPrivate {
        user: String,
        namespace: String,
        xml: String,
    },
    /// The session table: `jid` (a full JID) is bound on `node`. An entry
    /// already there loses (RFC 6120 §7.7.2.2, the new session wins) and its
    /// own node closes it with `<conflict/>`.
    BindSession {
        jid: String,
        entry: SessionEntry,
    },
    /// Availability and priority of a bound session (RFC 6121 §4), applied
    /// only while the table still names that session.
    SessionPresence {
        jid: String,
        node: u64,
        incarnation: u64,
        sid: u64,
        available: bool,
        priority: i8,
    },
    /// The session ended; ignored when another session holds the JID now.
    UnbindSession {
        jid: String,
        node: u64,
        incarnation: u64,
        sid: u64,
    },
    /// `node` (re)started as `incarnation`: sessions of its earlier lives
    /// are gone.
    NodeUp {
        node: u64,
        incarnation: u64,
    },
    /// The leader found `node` unreachable past the grace period.
    NodeDown {
        node: u64,
    },
    /// Independent commands that arrived together, in one log entry (group
    /// commit): each is applied on its own, in order, and has an outcome
    /// of its own; a refusal refuses only that one.
    Many(Vec<Command>),
    /// Queue a message for an offline user, refused when the queue holds
    /// `max` messages or would pass `max_bytes` (XEP-0160). Replaces
    /// `StoreOffline` (kept so that old log entries still apply).
    PushOffline {
        user: String,
        stanza: String,
        max: u32,
        max_bytes: u64,
    },
    /// The client has the user's stored messages before sequence `upto`
    /// (delivered and flushed, or acknowledged under XEP-0198): remove
    /// them. Messages leave storage only this way (at-least-once).
    AckOffline {
        user: String,
        upto: u64,
    },
    /// `command` applied under the proposing node's budgets (its
    /// configuration), which every replica then enforces alike. Commands
    /// outside one (old log entries) apply without these budgets.
    Limited {
        limits: Vec<Limit>,
        command: Box<Command>,
    },
    /// A cluster secret (the dialback secret, XEP-0185), set by whichever
    /// node proposes it first; later proposals leave it as it is, so every
    /// node signs and verifies with the same one.
    InitSecret {
        name: String,
        value: Vec<u8>,
    },
    /// XEP-0313: archive one message for each of `owners` (its sender
    /// and/or its local recipient), each as its preferences and
    /// `policy.default` decide. `ts` is the proposer's clock (microseconds
    /// since the epoch); each archive's id is `ts`, or one past its newest
    /// when that is later, so ids grow per user and name the time.
    Archive {
        ts: u64,
        stanza: String,
        owners: Vec<ArchiveOwner>,
        policy: ArchivePolicy,
    },
    /// XEP-0313 §6: replace a user's archiving preferences.
    SetArchivePrefs {
        user: String,
        prefs: ArchivePrefs,
    },
    /// PEP (XEP-0163): publish an item (replacing one with the same id),
    /// creating the node on first use with the defaults and `options`; on
    /// an existing node, `options` are preconditions (XEP-0060 §7.1.5).
    PepPublish {
        owner: String,
        node: String,
        item: PepItem,
        options: Option<PepOptions>,
        limits: PepLimits,
    },
    PepRetract {
        owner: String,
        node: String,
        ids: Vec<String>,
    },
    PepCreate {
        owner: String,
        node: String,
        config: PepConfig,
        limits: PepLimits,
    },
    PepConfigure {
        owner: String,
        node: String,
        config: PepConfig,
        limits: PepLimits,
    },
    PepDelete {
        owner: String,
        node: String,
    },
    PepPurge {
        owner: String,
        node: String,
    },
    /// Several messages' `Archive`s in one entry (the archive's own group
    /// commit: see `modules::mam`), each with its own outcome.
    ArchiveBatch {
        items: Vec<ArchiveItem>,
        policy: ArchivePolicy,
    },
    /// Group chat (XEP-0045), see [`muc`].
    Muc(muc::MucCommand),
    /// XEP-0357: wake `user`'s client through this app server and node.
    PushEnable {
        user: String,
        jid: String,
        node: String,
        options: Vec<(String, String)>,
    },
    /// XEP-0357: stop (one node, or every node of that app server).
    PushDisable {
        user: String,
        jid: String,
        node: Option<String>,
    },
    /// FAST (XEP-0484): a new token for `user`'s client `agent`. Tokens of
    /// that client expired at `token.issued` are dropped, and of the rest
    /// only the one before this is kept.
    FastIssue {
        user: String,
        agent: String,
        token: FastToken,
    },
    /// FAST: forget one token of a client, every token of a client
    /// (`token` none), or every token of the user (both none).
    FastRevoke {
        user: String,
        agent: Option<String>,
        token: Option<String>,
    },
    /// XEP-0012: when `user` was last online (seconds since the epoch), and
    /// the status text they left with.
    SetLastActivity {
        user: String,
        secs: u64,
        status: Option<String>,
    },
    /// XEP-0363: slot `slot` for `record.owner`'s file, refused when the
    /// owner's files and slots not expired at `record.created`, and this
    /// one, would hold more than `quota` bytes.
    UploadSlot {
        slot: String,
        record: crate::store::UploadRecord,
        quota: u64,
    },
    /// The PUT of `slot` completed on `node`, whose disk holds the file
    /// until `expires` (seconds). Refused when the slot lapsed or was used.
    UploadStored {
        slot: String,
        node: u64,
        expires: u64,
    },
    /// The leader's sweep: these slots and their files go, each only if it
    /// had expired by `now` (a slot may have been used since the sweep read).
    UploadDelete {
        slots: Vec<String>,
        now: u64,
    },
}

/// `publish-options` (XEP-0060 §7.1.5): the fields a publisher requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct PepOptions {
    pub access: Option<PepAccess>,
    pub persist: Option<bool>,
    pub max_items: Option<MaxItems>,
}

/// The proposing node's PEP limits, which every replica applies alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PepLimits {
    pub max_nodes: u64,
    pub max_items: u64,
}

/// One message of an [`Command::ArchiveBatch`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveItem {
    pub ts: u64,
    pub stanza: String,
    pub owners: Vec<ArchiveOwner>,
}

/// One archive a message goes into.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchiveOwner {
    pub user: String,
    /// The other party: bare JID, and as the stanza named it.
    pub with: String,
    pub peer: String,
}

/// The proposing node's archive configuration, which every replica applies alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArchivePolicy {
    pub default: ArchiveDefault,
    /// Most messages kept per user: the oldest go first (0: no cap).
    pub max_messages: u64,
    /// Messages older than this (microseconds) go (0: kept for ever).
    pub retention_micros: u64,
}

impl Command {
    /// This command under the budgets of `limits` (the node's config).
    pub fn limited(self, limits: &crate::config::Limits) -> Command {
        Command::Limited {
            limits: vec![
                Limit::RosterItems(limits.max_roster_items as u32),
                Limit::RosterTombstones(limits.max_roster_tombstones as u32),
                Limit::PrivateBytes(limits.max_private_bytes),
            ],
            command: Box::new(self),
        }
    }
}

/// One budget a [`Command::Limited`] carries. New kinds are appended, so
/// old entries keep decoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Limit {
    /// Roster items, hidden ones (pending inbound requests) included: a
    /// subscription stanza that would add one more is refused.
    RosterItems(u32),
    /// Removal marks kept for roster versioning (XEP-0237); the oldest go
    /// first, and a client that knew a version older than what was
    /// dropped gets the whole roster.
    RosterTombstones(u32),
    /// Bytes of one user's private XML storage (XEP-0049), all namespaces.
    PrivateBytes(u64),
}

/// The budgets in force while a command applies.
#[derive(Debug, Clone, Copy, Default)]
struct Budgets {
    roster_items: Option<u32>,
    roster_tombstones: Option<u32>,
    private_bytes: Option<u64>,
}

impl Budgets {
    fn of(limits: &[Limit]) -> Budgets {
        let mut b = Budgets::default();
        for l in limits {
            match *l {
                Limit::RosterItems(n) => b.roster_items = Some(n),
                Limit::RosterTombstones(n) => b.roster_tombstones = Some(n),
                Limit::PrivateBytes(n) => b.private_bytes = Some(n),
            }
        }
        b
    }
}

/// Where one full JID is bound (DESIGN.md, "What Raft replicates").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEntry {
    pub node: u64,
    /// Random per process start: a restarted node's old sessions are told
    /// apart from its new ones.
    pub incarnation: u64,
    /// The session's id on its node.
    pub sid: u64,
    pub available: bool,
    pub priority: i8,
}

/// What every node does after an entry is applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// The table entry of `jid` changed (`None`: removed).
    SessionChanged {
        jid: String,
        entry: Option<SessionEntry>,
    },
    /// `jid`'s session `old` lost its resource to a newer bind.
    SessionReplaced { jid: String, old: SessionEntry },
    /// These sessions are gone because their node died or restarted.
    SessionsGone(Vec<(String, SessionEntry)>),
    /// Something happened in a room: each node tells the occupants whose
    /// sessions it serves.
    Muc {
        room: String,
        event: Box<muc::MucEvent>,
    },
    /// A PEP node changed: each node notifies the interested sessions it
    /// serves (and the remote contacts it has seen).
    Pep {
        owner: String,
        node: String,
        access: PepAccess,
        event: PepEvent,
    },
    /// A message was stored for `user`, who may have come online on some
    /// node after the sender's node decided they were offline.
    OfflineStored { user: String },
    /// An account is gone: every node closes the user's sessions it serves.
    AccountDeleted { user: String },
    /// An upload (XEP-0363) is gone: the node(s) whose disk holds the file
    /// delete it (`node`: where it was stored, `None` for an unused slot).
    UploadDeleted { slot: String, node: Option<u64> },
}

/// What happened to a PEP node (XEP-0060 §7.1.2, §7.2.2, §8.4, §8.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PepEvent {
    Published(PepItem),
    Retracted(Vec<String>),
    Purged,
    Deleted,
}

/// A roster item that changed: `None` when it was removed (or hidden).
pub type RosterChange = (String, Option<RosterItem>);

/// What a successfully applied command reports back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Done,
    Imported {
        created: u64,
        updated: u64,
        skipped: u64,
    },
    Offline(Vec<String>),
    /// The roster after a change: its new version and the items to push.
    Roster {
        ver: u64,
        changes: Vec<RosterChange>,
        /// The item as it was before (for `RosterRemove`).
        previous: Option<RosterItem>,
    },
    Subscription {
        transition: Transition,
        ver: u64,
        /// The item to push when `transition.changed` (None: not visible).
        item: Option<RosterItem>,
    },
    /// JIDs whose blocking state changed.
    Blocking(Vec<String>),
    Batch(Vec<Response>),
    /// The outcomes of a `Command::Many`, in order.
    Many(Vec<Outcome>),
    /// A deleted account left these blocklists: (blocker, blocked JID).
    Unblocked(Vec<(String, String)>),
    /// `Command::Archive`: the id in each owner's archive, in order
    /// (`None`: not archived there, by preference or for want of an account).
    Archived(Vec<Option<u64>>),
    /// `Command::ArchiveBatch`: each message's ids, in order.
    ArchivedBatch(Vec<Vec<Option<u64>>>),
}

/// Why a write did not take effect: a deterministic refusal (part of the
/// replicated outcome), a local store fault, or no quorum in time.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The cluster could not commit the write in time (no quorum, no
    /// leader): nothing was applied; the caller may try again later.
    #[error("the cluster cannot commit writes now: {0}")]
    Unavailable(String),
}

/// A deterministic refusal: every replica reaches the same one, and it
/// travels back from the leader with the outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum Refusal {
    #[error("account {0} already exists")]
    AccountExists(String),
    #[error("no account {0}")]
    NoSuchAccount(String),
    #[error("offline queue of {user} is full ({max} messages)")]
    OfflineFull { user: String, max: u32 },
    #[error("the roster of {0} is full ({1} items)")]
    RosterFull(String, u32),
    #[error("the blocklist of {0} is full ({1} items)")]
    BlocklistFull(String, u32),
    #[error("no roster item {contact} for {user}")]
    NoRosterItem { user: String, contact: String },
    /// Only the group commit makes `Many`, and only at the top level.
    #[error("a group of commands cannot be nested in another command")]
    Nested,
    #[error("offline queue of {user} is full ({max_bytes} bytes)")]
    OfflineBytesFull { user: String, max_bytes: u64 },
    #[error("private storage of {user} is full ({max_bytes} bytes)")]
    PrivateFull { user: String, max_bytes: u64 },
    #[error("no PEP node {node} of {owner}")]
    NoPepNode { owner: String, node: String },
    #[error("no item {id} in {node}")]
    NoPepItem { node: String, id: String },
    #[error("PEP node {0} exists")]
    PepNodeExists(String),
    /// `publish-options` that the existing node's configuration does not meet.
    #[error("the node's {0} differs from the publish-options")]
    PepPrecondition(String),
    #[error("{owner} has {max} PEP nodes already")]
    TooManyPepNodes { owner: String, max: u64 },
    /// A room refused: the stanza error condition to answer with, and why.
    #[error("{text}")]
    Muc { condition: String, text: String },
    #[error("{user} has {used} bytes in uploads; the quota is {quota} bytes")]
    UploadQuota { user: String, quota: u64, used: u64 },
    #[error("no upload slot {0}")]
    NoUploadSlot(String),
    #[error("upload slot {0} is used already")]
    UploadSlotUsed(String),
}

/// The outcome of one applied command, as every replica computes it.
pub type Outcome = Result<Response, Refusal>;

/// Where `user`'s offline queue stands, as of this transaction (a queue
/// from before the metadata is measured once by a scan).
fn offline_meta(tx: &Tx<'_>, user: &str) -> Result<OfflineMeta, StoreError> {
    if let Some(b) = tx.get(&keys::offline_meta(user))? {
        return Ok(postcard::from_bytes(&b)?);
    }
    let prefix = keys::offline_prefix(user);
    OfflineMeta::measure(prefix.len(), tx.scan(&prefix)?.into_iter().map(Ok))
}

/// Kept even when the queue is empty: sequence numbers never restart, so
/// a late `AckOffline` can never remove a message stored after it.
fn put_offline_meta(tx: &mut Tx<'_>, user: &str, meta: OfflineMeta) {
    tx.put(
        keys::offline_meta(user),
        postcard::to_allocvec(&meta).unwrap_or_default(),
    );
}

/// One message onto the tail of `user`'s queue: O(1), whatever its length.
fn push_offline(
    tx: &mut Tx<'_>,
    user: String,
    stanza: String,
    max: u32,
    max_bytes: u64,
) -> Result<Response, ApplyError> {
    let mut meta = offline_meta(tx, &user)?;
    if meta.count() >= u64::from(max) {
        return Err(Refusal::OfflineFull { user, max }.into());
    }
    let len = stanza.len() as u64;
    if meta.bytes.saturating_add(len) > max_bytes {
        return Err(Refusal::OfflineBytesFull { user, max_bytes }.into());
    }
    tx.put(keys::offline(&user, meta.tail), stanza.into_bytes());
    meta.tail += 1;
    meta.bytes += len;
    put_offline_meta(tx, &user, meta);
    tx.effects.push(Effect::OfflineStored { user });
    Ok(Response::Done)
}

/// Archives `stanza` for `owner` if its preferences want it; the id.
fn archive_one(
    tx: &mut Tx<'_>,
    ts: u64,
    stanza: &str,
    owner: ArchiveOwner,
    policy: ArchivePolicy,
) -> Result<Option<u64>, ApplyError> {
    let user = owner.user;
    if tx.get(&keys::account(&user))?.is_none() {
        return Ok(None);
    }
    let prefs: Option<ArchivePrefs> = tx
        .get(&[keys::ARCHIVE_PREFS, user.as_bytes()].concat())?
        .map(|b| postcard::from_bytes(&b))
        .transpose()
        .map_err(StoreError::from)?;
    let wanted = match &prefs {
        Some(p) if p.never.contains(&owner.with) => false,
        Some(p) if p.always.contains(&owner.with) => true,
        _ => match prefs.as_ref().map_or(policy.default, |p| p.default) {
            ArchiveDefault::Always => true,
            ArchiveDefault::Never => false,
            ArchiveDefault::Roster => tx
                .roster_item(&user, &owner.with)?
                .is_some_and(|i| i.visible),
        },
    };
    if !wanted {
        return Ok(None);
    }
    append_archive(tx, &user, ts, owner.with, owner.peer, stanza, policy).map(Some)
}

/// Appends to `user`'s archive (a user's or a room's) and applies its cap
/// and retention; the new id.
fn append_archive(
    tx: &mut Tx<'_>,
    user: &str,
    ts: u64,
    with: String,
    peer: String,
    stanza: &str,
    policy: ArchivePolicy,
) -> Result<u64, ApplyError> {
    let meta_key = [keys::ARCHIVE_META, user.as_bytes()].concat();
    let mut meta: ArchiveMeta = match tx.get(&meta_key)? {
        Some(b) => postcard::from_bytes(&b).map_err(StoreError::from)?,
        None => ArchiveMeta::default(),
    };
    let id = ts.max(meta.last.saturating_add(1));
    tx.put(keys::archive_with(user, &with, id), Vec::new());
    let entry = encode(&Archived {
        with,
        peer,
        stanza: stanza.to_owned(),
    });
    meta.last = id;
    meta.count += 1;
    meta.bytes += entry.len() as u64;
    tx.put(keys::archive(user, id), entry);
    // The cap and the retention period, oldest first; a bounded number per
    // message, so one append never turns into a long sweep (the expired
    // rest is hidden from queries and goes with the following messages).
    let expired_before = match policy.retention_micros {
        0 => 0,
        r => ts.saturating_sub(r),
    };
    let prefix = keys::user_prefix(keys::ARCHIVE, user);
    for _ in 0..16 {
        let over = policy.max_messages > 0 && meta.count > policy.max_messages;
        if !over && expired_before == 0 {
            break;
        }
        let Some((k, v)) = tx.first(&prefix)? else {
            break;
        };
        let oldest = keys::archive_id(&k);
        if !over && oldest >= expired_before {
            break;
        }
        let gone: Archived = postcard::from_bytes(&v).map_err(StoreError::from)?;
        tx.delete(keys::archive_with(user, &gone.with, oldest));
        tx.delete(k);
        meta.count -= 1;
        meta.bytes = meta.bytes.saturating_sub(v.len() as u64);
    }
    tx.put(meta_key, encode(&meta));
    Ok(id)
}

/// What one private element counts against its owner's budget: key and
/// value, plus a fixed overhead so that many tiny elements count too.
fn private_cost(key: &[u8], value: &[u8]) -> u64 {
    (key.len() + value.len() + 64) as u64
}

fn upload_record(
    tx: &Tx<'_>,
    slot: &str,
) -> Result<Option<crate::store::UploadRecord>, StoreError> {
    match tx.get(&keys::upload(slot))? {
        Some(b) => Ok(Some(postcard::from_bytes(&b)?)),
        None => Ok(None),
    }
}

/// Forgets an upload slot and its file; every node deletes the file.
fn delete_upload(tx: &mut Tx<'_>, slot: &str, r: &crate::store::UploadRecord) {
    tx.delete(keys::upload(slot));
    tx.delete(keys::upload_expiry(r.expires, slot));
    tx.delete(keys::user_key(keys::UPLOAD_OF, &r.owner, slot));
    tx.effects.push(Effect::UploadDeleted {
        slot: slot.to_owned(),
        node: r.stored_on,
    });
}

/// Splits an apply result into the replicated outcome and a local fault.
fn outcome(r: Result<Response, ApplyError>) -> Result<Outcome, StoreError> {
    match r {
        Ok(r) => Ok(Ok(r)),
        Err(ApplyError::Refused(refusal)) => Ok(Err(refusal)),
        Err(ApplyError::Store(e)) => Err(e),
        // Never produced by apply itself.
        Err(ApplyError::Unavailable(m)) => Err(StoreError::Fault(m)),
    }
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serializing a plain struct into a Vec cannot fail.
    postcard::to_allocvec(value).unwrap_or_default()
}

type KeyValue = (Vec<u8>, Vec<u8>);

/// The writes of one command, readable before they are committed, so that
/// a `Batch` sees its own earlier writes and commits as one sled batch.
struct Tx<'a> {
    store: &'a Store,
    /// Writes of the entries before this one in the same batch.
    base: &'a Writes,
    writes: Writes,
    effects: Vec<Effect>,
    budgets: Budgets,
}

/// Pending writes by key (`None`: delete).
type Writes = BTreeMap<Vec<u8>, Option<Vec<u8>>>;

/// A key and value recording the applied position.
pub type Meta = (&'static [u8], Vec<u8>);

impl<'a> Tx<'a> {
    fn new(store: &'a Store, base: &'a Writes) -> Tx<'a> {
        Tx {
            store,
            base,
            writes: BTreeMap::new(),
            effects: Vec::new(),
            budgets: Budgets::default(),
        }
    }

    fn session(&self, jid: &str) -> Result<Option<SessionEntry>, StoreError> {
        match self.get(&keys::session(jid))? {
            Some(b) => Ok(Some(postcard::from_bytes(&b)?)),
            None => Ok(None),
        }
    }

    fn set_session(&mut self, jid: &str, entry: Option<SessionEntry>) {
        match entry {
            Some(e) => self.put(keys::session(jid), encode(&e)),
            None => self.delete(keys::session(jid)),
        }
        self.effects.push(Effect::SessionChanged {
            jid: jid.to_owned(),
            entry,
        });
    }

    /// Removes every session entry for which `gone` holds.
    fn drop_sessions(&mut self, gone: impl Fn(&SessionEntry) -> bool) -> Result<(), StoreError> {
        let mut removed = Vec::new();
        for (k, v) in self.scan(keys::SESSION)? {
            let entry: SessionEntry = postcard::from_bytes(&v)?;
            if gone(&entry) {
                let jid = keys::session_jid(&k);
                self.set_session(&jid, None);
                muc::session_gone(self, &jid).map_err(|e| match e {
                    ApplyError::Store(e) => e,
                    other => StoreError::Fault(other.to_string()),
                })?;
                removed.push((jid, entry));
            }
        }
        if !removed.is_empty() {
            self.effects.push(Effect::SessionsGone(removed));
        }
        Ok(())
    }

    fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        match self.writes.get(key).or_else(|| self.base.get(key)) {
            Some(v) => Ok(v.clone()),
            None => self.store.get(key),
        }
    }

    fn put(&mut self, key: Vec<u8>, value: Vec<u8>) {
        self.writes.insert(key, Some(value));
    }

    fn delete(&mut self, key: Vec<u8>) {
        self.writes.insert(key, None);
    }

    fn pep_node(&self, owner: &str, node: &str) -> Result<Option<PepNode>, StoreError> {
        match self.get(&keys::pep_node(owner, node))? {
            Some(b) => Ok(Some(postcard::from_bytes(&b)?)),
            None => Ok(None),
        }
    }

    /// Refused when `owner` has as many nodes as the limit allows.
    fn check_pep_room(&self, owner: &str, limits: PepLimits) -> Result<(), ApplyError> {
        let nodes = self.scan(&keys::user_prefix(keys::PEP_NODE, owner))?.len() as u64;
        if nodes >= limits.max_nodes {
            return Err(Refusal::TooManyPepNodes {
                owner: owner.to_owned(),
                max: limits.max_nodes,
            }
            .into());
        }
        Ok(())
    }

    /// Drops the oldest items beyond what the node keeps.
    fn trim_pep(
        &mut self,
        owner: &str,
        node: &str,
        n: &mut PepNode,
        limits: PepLimits,
    ) -> Result<(), StoreError> {
        let keep = if n.config.persist {
            n.config.max_items.within(limits.max_items)
        } else {
            // Not persistent: only the last item, for late joiners.
            1
        };
        let prefix = keys::pep_items(owner, node);
        while n.count > keep {
            let Some((k, v)) = self.first(&prefix)? else {
                break;
            };
            let gone: PepItem = postcard::from_bytes(&v)?;
            self.delete(keys::pep_item_id(owner, node, &gone.id));
            self.delete(k);
            n.count -= 1;
        }
        Ok(())
    }

    fn clear_pep_items(&mut self, owner: &str, node: &str) -> Result<(), StoreError> {
        for (k, v) in self.scan(&keys::pep_items(owner, node))? {
            let gone: PepItem = postcard::from_bytes(&v)?;
            self.delete(keys::pep_item_id(owner, node, &gone.id));
            self.delete(k);
        }
        Ok(())
    }

    /// The first key and value under a prefix, with the writes so far
    /// applied, reading only as far as it must.
    fn first(&self, prefix: &[u8]) -> Result<Option<KeyValue>, StoreError> {
        let overlay = |k: &[u8]| self.writes.get(k).or_else(|| self.base.get(k));
        let mut stored = None;
        for kv in self.store.scan_prefix(prefix) {
            let (k, v) = kv?;
            match overlay(&k) {
                Some(None) => continue,
                Some(Some(newer)) => stored = Some((k, newer.clone())),
                None => stored = Some((k, v)),
            }
            break;
        }
        let mut best = stored;
        for layer in [self.base, &self.writes] {
            let written = layer
                .range(prefix.to_vec()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .find(|(k, v)| v.is_some() && overlay(k).is_some_and(|v| v.is_some()));
            if let Some((k, Some(v))) = written {
                if best.as_ref().is_none_or(|(b, _)| k < b) {
                    let v = overlay(k).cloned().flatten().unwrap_or_else(|| v.clone());
                    best = Some((k.clone(), v));
                }
            }
        }
        Ok(best)
    }

    /// Keys and values under a prefix, in key order, with this command's writes applied.
    fn scan(&self, prefix: &[u8]) -> Result<Vec<KeyValue>, StoreError> {
        let mut all: BTreeMap<Vec<u8>, Vec<u8>> = BTreeMap::new();
        for kv in self.store.scan_prefix(prefix) {
            let (k, v) = kv?;
            all.insert(k, v);
        }
        for layer in [self.base, &self.writes] {
            for (k, v) in layer.range(prefix.to_vec()..) {
                if !k.starts_with(prefix) {
                    break;
                }
                match v {
                    Some(v) => all.insert(k.clone(), v.clone()),
                    None => all.remove(k),
                };
            }
        }
        Ok(all.into_iter().collect())
    }

    fn roster_item(&self, user: &str, contact: &str) -> Result<Option<RosterItem>, ApplyError> {
        match self.get(&keys::user_key(keys::ROSTER, user, contact))? {
            Some(b) => Ok(Some(postcard::from_bytes(&b).map_err(StoreError::from)?)),
            None => Ok(None),
        }
    }

    /// Bumps the user's roster version and returns it.
    fn next_roster_version(&mut self, user: &str) -> Result<u64, StoreError> {
        let key = [keys::ROSTER_VER, user.as_bytes()].concat();
        let ver = self
            .get(&key)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes)
            + 1;
        self.put(key, ver.to_be_bytes().to_vec());
        Ok(ver)
    }

    fn roster_version(&self, user: &str) -> Result<u64, StoreError> {
        Ok(self
            .get(&[keys::ROSTER_VER, user.as_bytes()].concat())?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    /// Stores an item at a new version; a hidden item leaves a removal
    /// mark so versioned fetches learn it is gone from the visible roster.
    fn write_item(
        &mut self,
        user: &str,
        contact: &str,
        mut item: RosterItem,
    ) -> Result<(u64, RosterItem), StoreError> {
        let ver = self.next_roster_version(user)?;
        item.ver = ver;
        self.put(keys::user_key(keys::ROSTER, user, contact), encode(&item));
        if item.visible {
            self.delete(keys::user_key(keys::ROSTER_GONE, user, contact));
        } else {
            self.mark_gone(user, contact, ver)?;
        }
        Ok((ver, item))
    }

    /// Records that `contact` left the visible roster at `ver`, dropping
    /// the oldest marks past the tombstone budget; the newest dropped
    /// version becomes the floor below which only a full roster is right.
    fn mark_gone(&mut self, user: &str, contact: &str, ver: u64) -> Result<(), StoreError> {
        self.put(
            keys::user_key(keys::ROSTER_GONE, user, contact),
            ver.to_be_bytes().to_vec(),
        );
        let Some(max) = self.budgets.roster_tombstones else {
            return Ok(());
        };
        let marks = self.scan(&keys::user_prefix(keys::ROSTER_GONE, user))?;
        let excess = marks.len().saturating_sub(max as usize);
        if excess == 0 {
            return Ok(());
        }
        let mut by_version: Vec<(u64, Vec<u8>)> = marks
            .into_iter()
            .map(|(k, v)| {
                let ver = <[u8; 8]>::try_from(v.as_slice()).map_or(0, u64::from_be_bytes);
                (ver, k)
            })
            .collect();
        by_version.sort_unstable();
        let mut floor = self.roster_floor(user)?;
        for (ver, key) in by_version.into_iter().take(excess) {
            floor = floor.max(ver);
            self.delete(key);
        }
        self.put(keys::roster_floor(user), floor.to_be_bytes().to_vec());
        Ok(())
    }

    fn roster_floor(&self, user: &str) -> Result<u64, StoreError> {
        Ok(self
            .get(&keys::roster_floor(user))?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    fn delete_user_prefix(&mut self, prefix: &[u8], user: &str) -> Result<(), StoreError> {
        for (k, _) in self.scan(&keys::user_prefix(prefix, user))? {
            self.delete(k);
        }
        Ok(())
    }
}

/// Applies one command at log position `index` (the form the unit tests
/// use; Raft goes through [`apply_entry`]).
pub fn apply(store: &Store, index: u64, cmd: Command) -> Result<Response, ApplyError> {
    let meta = vec![(keys::APPLIED, index.to_be_bytes().to_vec())];
    match apply_entries(store, vec![(meta, Some(cmd))]) {
        Ok(mut r) => match r.pop() {
            Some((outcome, _)) => outcome.map_err(ApplyError::from),
            None => Ok(Response::Done),
        },
        Err(e) => Err(ApplyError::Store(e)),
    }
}

/// Applies entries in log order as one atomic sled batch (sled seals and
/// syncs its log buffer once per batch, so one batch for all the entries
/// openraft hands over at once is the cheap way). Each entry records its
/// `meta` (the applied log position) and sees the writes of the entries
/// before it; a refused command (or an entry without one: openraft's
/// blank and membership entries) still advances the position and leaves
/// nothing else behind. `Err` is a local store fault: the caller must stop,
/// never skip an entry.
pub fn apply_entries(
    store: &Store,
    entries: Vec<(Vec<Meta>, Option<Command>)>,
) -> Result<Vec<(Outcome, Vec<Effect>)>, StoreError> {
    let mut done = Writes::new();
    let mut out = Vec::with_capacity(entries.len());
    for (meta, cmd) in entries {
        let (result, writes) = match cmd {
            None => ((Ok(Response::Done), Vec::new()), Writes::new()),
            Some(Command::Many(cmds)) => {
                let mut outcomes = Vec::with_capacity(cmds.len());
                let mut effects = Vec::new();
                for cmd in cmds {
                    let mut tx = Tx::new(store, &done);
                    let o = outcome(apply_in(&mut tx, cmd))?;
                    if o.is_ok() {
                        effects.extend(tx.effects);
                        let writes = tx.writes;
                        done.extend(writes);
                    }
                    outcomes.push(o);
                }
                ((Ok(Response::Many(outcomes)), effects), Writes::new())
            }
            Some(cmd) => {
                let mut tx = Tx::new(store, &done);
                match outcome(apply_in(&mut tx, cmd))? {
                    Ok(r) => ((Ok(r), tx.effects), tx.writes),
                    Err(refusal) => ((Err(refusal), Vec::new()), Writes::new()),
                }
            }
        };
        done.extend(writes);
        for (k, v) in meta {
            done.insert(k.to_vec(), Some(v));
        }
        out.push(result);
    }
    let mut batch = Batch::default();
    for (k, v) in done {
        match v {
            Some(v) => batch.put(&k, &v),
            None => batch.delete(&k),
        }
    }
    store.apply(batch)?;
    Ok(out)
}

fn apply_in(tx: &mut Tx<'_>, cmd: Command) -> Result<Response, ApplyError> {
    match cmd {
        Command::CreateAccount { user, credentials } => {
            let key = keys::account(&user);
            if tx.get(&key)?.is_some() {
                return Err(Refusal::AccountExists(user).into());
            }
            tx.put(key, encode(&Account { credentials }));
            Ok(Response::Done)
        }
        Command::ImportAccounts {
            accounts,
            update_existing,
        } => {
            let (mut created, mut updated, mut skipped) = (0, 0, 0);
            for (user, credentials) in accounts {
                let key = keys::account(&user);
                let exists = tx.get(&key)?.is_some();
                match (exists, update_existing) {
                    (true, false) => {
                        skipped += 1;
                        continue;
                    }
                    (true, true) => updated += 1,
                    (false, _) => created += 1,
                }
                tx.put(key, encode(&Account { credentials }));
            }
            Ok(Response::Imported {
                created,
                updated,
                skipped,
            })
        }
        Command::SetPassword { user, credentials } => {
            let key = keys::account(&user);
            if tx.get(&key)?.is_none() {
                return Err(Refusal::NoSuchAccount(user).into());
            }
            tx.put(key, encode(&Account { credentials }));
            // XEP-0484 §6: a new password revokes every FAST token.
            tx.delete_user_prefix(keys::FAST, &user)?;
            Ok(Response::Done)
        }
        Command::DeleteAccount { user } => {
            let key = keys::account(&user);
            if tx.get(&key)?.is_none() {
                return Err(Refusal::NoSuchAccount(user).into());
            }
            tx.delete(key);
            tx.delete([keys::ROSTER_VER, user.as_bytes()].concat());
            tx.delete(keys::roster_floor(&user));
            // Off the reverse index of whom this user blocked, and out of
            // the blocklists of those who blocked this user (bare or full
            // JID): a name registered again inherits nothing.
            let own = keys::user_prefix(keys::BLOCK, &user);
            for (k, _) in tx.scan(&own)? {
                let j = String::from_utf8_lossy(&k[own.len()..]).into_owned();
                tx.delete(keys::user_key(keys::BLOCKED_BY, &j, &user));
            }
            let mut unblocked = Vec::new();
            for prefix in [
                keys::user_prefix(keys::BLOCKED_BY, &user),
                [keys::BLOCKED_BY, user.as_bytes(), b"/"].concat(),
            ] {
                for (k, _) in tx.scan(&prefix)? {
                    let rest = &k[keys::BLOCKED_BY.len()..];
                    let Some(nul) = rest.iter().position(|b| *b == 0) else {
                        continue;
                    };
                    let jid = String::from_utf8_lossy(&rest[..nul]).into_owned();
                    let blocker = String::from_utf8_lossy(&rest[nul + 1..]).into_owned();
                    tx.delete(keys::user_key(keys::BLOCK, &blocker, &jid));
                    tx.delete(k);
                    unblocked.push((blocker, jid));
                }
            }
            tx.delete(keys::offline_meta(&user));
            tx.delete([keys::ARCHIVE_META, user.as_bytes()].concat());
            tx.delete([keys::ARCHIVE_PREFS, user.as_bytes()].concat());
            tx.delete([keys::LAST_ACTIVITY, user.as_bytes()].concat());
            muc::account_deleted(tx, &user)?;
            for (k, _) in tx.scan(&keys::user_prefix(keys::UPLOAD_OF, &user))? {
                let slot = String::from_utf8_lossy(&k[keys::UPLOAD_OF.len() + user.len() + 1..])
                    .into_owned();
                if let Some(r) = upload_record(tx, &slot)? {
                    delete_upload(tx, &slot, &r);
                }
            }
            for prefix in [
                keys::PUSH,
                keys::FAST,
                keys::PEP_NODE,
                keys::PEP_ITEM,
                keys::PEP_ITEM_ID,
                keys::ARCHIVE,
                keys::ARCHIVE_WITH,
                keys::OFFLINE,
                keys::ROSTER,
                keys::ROSTER_GONE,
                keys::BLOCK,
                keys::VCARD,
                keys::PRIVATE,
            ] {
                tx.delete_user_prefix(prefix, &user)?;
            }
            tx.effects.push(Effect::AccountDeleted { user });
            Ok(Response::Unblocked(unblocked))
        }
        Command::StoreOffline { user, stanza, max } => {
            push_offline(tx, user, stanza, max, u64::MAX)
        }
        Command::PushOffline {
            user,
            stanza,
            max,
            max_bytes,
        } => push_offline(tx, user, stanza, max, max_bytes),
        Command::TakeOffline { user } => {
            // Everything at once (entries from before AckOffline).
            let mut meta = offline_meta(tx, &user)?;
            let mut out = Vec::new();
            for seq in meta.head..meta.tail {
                let key = keys::offline(&user, seq);
                if let Some(v) = tx.get(&key)? {
                    out.push(String::from_utf8_lossy(&v).into_owned());
                }
                tx.delete(key);
            }
            meta.head = meta.tail;
            meta.bytes = 0;
            put_offline_meta(tx, &user, meta);
            Ok(Response::Offline(out))
        }
        Command::Archive {
            ts,
            stanza,
            owners,
            policy,
        } => {
            let mut ids = Vec::with_capacity(owners.len());
            for owner in owners {
                ids.push(archive_one(tx, ts, &stanza, owner, policy)?);
            }
            Ok(Response::Archived(ids))
        }
        Command::ArchiveBatch { items, policy } => {
            let mut all = Vec::with_capacity(items.len());
            for item in items {
                let mut ids = Vec::with_capacity(item.owners.len());
                for owner in item.owners {
                    ids.push(archive_one(tx, item.ts, &item.stanza, owner, policy)?);
                }
                all.push(ids);
            }
            Ok(Response::ArchivedBatch(all))
        }
        Command::SetArchivePrefs { user, prefs } => {
            if tx.get(&keys::account(&user))?.is_none() {
                return Err(Refusal::NoSuchAccount(user).into());
            }
            tx.put(
                [keys::ARCHIVE_PREFS, user.as_bytes()].concat(),
                encode(&prefs),
            );
            Ok(Response::Done)
        }
        Command::PepPublish {
            owner,
            node,
            item,
            options,
            limits,
        } => {
            if tx.get(&keys::account(&owner))?.is_none() {
                return Err(Refusal::NoSuchAccount(owner).into());
            }
            let mut n = match tx.pep_node(&owner, &node)? {
                Some(n) => {
                    if let Some(o) = options {
                        let c = n.config;
                        let unmet = [
                            (
                                "pubsub#access_model",
                                o.access.is_some_and(|a| a != c.access),
                            ),
                            (
                                "pubsub#persist_items",
                                o.persist.is_some_and(|p| p != c.persist),
                            ),
                            (
                                "pubsub#max_items",
                                o.max_items.is_some_and(|m| m != c.max_items),
                            ),
                        ];
                        if let Some((field, _)) = unmet.iter().find(|(_, u)| *u) {
                            return Err(Refusal::PepPrecondition((*field).into()).into());
                        }
                    }
                    n
                }
                None => {
                    tx.check_pep_room(&owner, limits)?;
                    let o = options.unwrap_or_default();
                    let d = PepConfig::default();
                    PepNode {
                        config: PepConfig {
                            access: o.access.unwrap_or(d.access),
                            persist: o.persist.unwrap_or(d.persist),
                            max_items: o.max_items.unwrap_or(d.max_items),
                        },
                        next: 0,
                        count: 0,
                    }
                }
            };
            let id_key = keys::pep_item_id(&owner, &node, &item.id);
            if let Some(seq) = tx.get(&id_key)? {
                let seq = <[u8; 8]>::try_from(seq.as_slice()).map_or(0, u64::from_be_bytes);
                tx.delete(keys::pep_item(&owner, &node, seq));
                n.count = n.count.saturating_sub(1);
            }
            tx.put(id_key, n.next.to_be_bytes().to_vec());
            tx.put(keys::pep_item(&owner, &node, n.next), encode(&item));
            n.next += 1;
            n.count += 1;
            tx.trim_pep(&owner, &node, &mut n, limits)?;
            tx.put(keys::pep_node(&owner, &node), encode(&n));
            tx.effects.push(Effect::Pep {
                owner,
                node,
                access: n.config.access,
                event: PepEvent::Published(item),
            });
            Ok(Response::Done)
        }
        Command::PepRetract { owner, node, ids } => {
            let Some(mut n) = tx.pep_node(&owner, &node)? else {
                return Err(Refusal::NoPepNode { owner, node }.into());
            };
            for id in &ids {
                let id_key = keys::pep_item_id(&owner, &node, id);
                let Some(seq) = tx.get(&id_key)? else {
                    return Err(Refusal::NoPepItem {
                        node,
                        id: id.clone(),
                    }
                    .into());
                };
                let seq = <[u8; 8]>::try_from(seq.as_slice()).map_or(0, u64::from_be_bytes);
                tx.delete(keys::pep_item(&owner, &node, seq));
                tx.delete(id_key);
                n.count = n.count.saturating_sub(1);
            }
            tx.put(keys::pep_node(&owner, &node), encode(&n));
            tx.effects.push(Effect::Pep {
                owner,
                node,
                access: n.config.access,
                event: PepEvent::Retracted(ids),
            });
            Ok(Response::Done)
        }
        Command::PepCreate {
            owner,
            node,
            config,
            limits,
        } => {
            if tx.get(&keys::account(&owner))?.is_none() {
                return Err(Refusal::NoSuchAccount(owner).into());
            }
            if tx.pep_node(&owner, &node)?.is_some() {
                return Err(Refusal::PepNodeExists(node).into());
            }
            tx.check_pep_room(&owner, limits)?;
            let n = PepNode {
                config,
                next: 0,
                count: 0,
            };
            tx.put(keys::pep_node(&owner, &node), encode(&n));
            Ok(Response::Done)
        }
        Command::PepConfigure {
            owner,
            node,
            config,
            limits,
        } => {
            let Some(mut n) = tx.pep_node(&owner, &node)? else {
                return Err(Refusal::NoPepNode { owner, node }.into());
            };
            n.config = config;
            tx.trim_pep(&owner, &node, &mut n, limits)?;
            tx.put(keys::pep_node(&owner, &node), encode(&n));
            Ok(Response::Done)
        }
        Command::PepDelete { owner, node } => {
            let Some(n) = tx.pep_node(&owner, &node)? else {
                return Err(Refusal::NoPepNode { owner, node }.into());
            };
            tx.clear_pep_items(&owner, &node)?;
            tx.delete(keys::pep_node(&owner, &node));
            tx.effects.push(Effect::Pep {
                owner,
                node,
                access: n.config.access,
                event: PepEvent::Deleted,
            });
            Ok(Response::Done)
        }
        Command::PepPurge { owner, node } => {
            let Some(mut n) = tx.pep_node(&owner, &node)? else {
                return Err(Refusal::NoPepNode { owner, node }.into());
            };
            tx.clear_pep_items(&owner, &node)?;
            n.count = 0;
            tx.put(keys::pep_node(&owner, &node), encode(&n));
            tx.effects.push(Effect::Pep {
                owner,
                node,
                access: n.config.access,
                event: PepEvent::Purged,
            });
            Ok(Response::Done)
        }
        Command::Muc(cmd) => muc::apply(tx, cmd),
        Command::PushEnable {
            user,
            jid,
            node,
            options,
        } => {
            if tx.get(&keys::account(&user))?.is_none() {
                return Err(Refusal::NoSuchAccount(user).into());
            }
            let key = [
                keys::user_prefix(keys::PUSH, &user),
                format!("{jid}\0{node}").into_bytes(),
            ]
            .concat();
            tx.put(key, encode(&options));
            Ok(Response::Done)
        }
        Command::PushDisable { user, jid, node } => {
            let prefix = [
                keys::user_prefix(keys::PUSH, &user),
                format!("{jid}\0").into_bytes(),
            ]
            .concat();
            for (k, _) in tx.scan(&prefix)? {
                let this = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                if node.as_ref().is_none_or(|n| *n == this) {
                    tx.delete(k);
                }
            }
            Ok(Response::Done)
        }
        Command::FastIssue { user, agent, token } => {
            if tx.get(&keys::account(&user))?.is_none() {
                return Err(Refusal::NoSuchAccount(user).into());
            }
            let key = keys::user_key(keys::FAST, &user, &agent);
            let mut held: FastTokens = match tx.get(&key)? {
                Some(b) => postcard::from_bytes(&b).map_err(StoreError::from)?,
                None => FastTokens::default(),
            };
            let now = token.issued;
            held.tokens.retain(|t| t.expiry > now);
            if held.tokens.len() > 1 {
                held.tokens.drain(..held.tokens.len() - 1);
            }
            held.tokens.push(token);
            tx.put(key, encode(&held));
            Ok(Response::Done)
        }
        Command::FastRevoke { user, agent, token } => {
            match (agent, token) {
                (None, _) => tx.delete_user_prefix(keys::FAST, &user)?,
                (Some(agent), None) => tx.delete(keys::user_key(keys::FAST, &user, &agent)),
                (Some(agent), Some(token)) => {
                    let key = keys::user_key(keys::FAST, &user, &agent);
                    if let Some(b) = tx.get(&key)? {
                        let mut held: FastTokens =
                            postcard::from_bytes(&b).map_err(StoreError::from)?;
                        held.tokens.retain(|t| t.token != token);
                        if held.tokens.is_empty() {
                            tx.delete(key);
                        } else {
                            tx.put(key, encode(&held));
                        }
                    }
                }
            }
            Ok(Response::Done)
        }
        Command::UploadSlot {
            slot,
            record,
            quota,
        } => {
            if tx.get(&keys::account(&record.owner))?.is_none() {
                return Err(Refusal::NoSuchAccount(record.owner).into());
            }
            if tx.get(&keys::upload(&slot))?.is_some() {
                return Err(Refusal::UploadSlotUsed(slot).into());
            }
            let now = record.created;
            let mine = keys::user_prefix(keys::UPLOAD_OF, &record.owner);
            let mut used = 0u64;
            for (k, _) in tx.scan(&mine)? {
                let other = String::from_utf8_lossy(&k[mine.len()..]).into_owned();
                if let Some(r) = upload_record(tx, &other)?.filter(|r| r.expires > now) {
                    used = used.saturating_add(r.size);
                }
            }
            if used.saturating_add(record.size) > quota {
                return Err(Refusal::UploadQuota {
                    user: record.owner,
                    quota,
                    used,
                }
                .into());
            }
            tx.put(keys::upload_expiry(record.expires, &slot), Vec::new());
            tx.put(
                keys::user_key(keys::UPLOAD_OF, &record.owner, &slot),
                Vec::new(),
            );
            tx.put(keys::upload(&slot), encode(&record));
            Ok(Response::Done)
        }
        Command::UploadStored {
            slot,
            node,
            expires,
        } => {
            let Some(mut r) = upload_record(tx, &slot)? else {
                return Err(Refusal::NoUploadSlot(slot).into());
            };
            if r.stored_on.is_some() {
                return Err(Refusal::UploadSlotUsed(slot).into());
            }
            tx.delete(keys::upload_expiry(r.expires, &slot));
            r.expires = expires;
            r.stored_on = Some(node);
            tx.put(keys::upload_expiry(expires, &slot), Vec::new());
            tx.put(keys::upload(&slot), encode(&r));
            Ok(Response::Done)
        }
        Command::UploadDelete { slots, now } => {
            for slot in slots {
                if let Some(r) = upload_record(tx, &slot)?.filter(|r| r.expires <= now) {
                    delete_upload(tx, &slot, &r);
                }
            }
            Ok(Response::Done)
        }
        Command::SetLastActivity { user, secs, status } => {
            if tx.get(&keys::account(&user))?.is_some() {
                tx.put(
                    [keys::LAST_ACTIVITY, user.as_bytes()].concat(),
                    encode(&(secs, status)),
                );
            }
            Ok(Response::Done)
        }
        Command::InitSecret { name, value } => {
            let key = keys::secret(&name);
            if tx.get(&key)?.is_none() {
                tx.put(key, value);
            }
            Ok(Response::Done)
        }
        Command::AckOffline { user, upto } => {
            let mut meta = offline_meta(tx, &user)?;
            let end = upto.min(meta.tail);
            for seq in meta.head..end {
                let key = keys::offline(&user, seq);
                if let Some(v) = tx.get(&key)? {
                    meta.bytes = meta.bytes.saturating_sub(v.len() as u64);
                }
                tx.delete(key);
            }
            if end > meta.head {
                meta.head = end;
                put_offline_meta(tx, &user, meta);
            }
            Ok(Response::Done)
        }
        Command::RosterSet {
            user,
            contact,
            name,
            groups,
            max,
        } => {
            let previous = tx.roster_item(&user, &contact)?;
            if previous.is_none()
                && tx.scan(&keys::user_prefix(keys::ROSTER, &user))?.len() >= max as usize
            {
                return Err(Refusal::RosterFull(user, max).into());
            }
            let mut item = previous.clone().unwrap_or_default();
            item.name = name;
            item.groups = groups;
            item.visible = true;
            let (ver, item) = tx.write_item(&user, &contact, item)?;
            Ok(Response::Roster {
                ver,
                changes: vec![(contact, Some(item))],
                previous,
            })
        }
        Command::RosterRemove { user, contact } => {
            let Some(previous) = tx.roster_item(&user, &contact)? else {
                return Err(Refusal::NoRosterItem { user, contact }.into());
            };
            let ver = tx.next_roster_version(&user)?;
            tx.delete(keys::user_key(keys::ROSTER, &user, &contact));
            tx.mark_gone(&user, &contact, ver)?;
            Ok(Response::Roster {
                ver,
                changes: vec![(contact, None)],
                previous: Some(previous),
            })
        }
        Command::Subscription {
            user,
            contact,
            direction,
            kind,
            stanza,
        } => {
            let existing = tx.roster_item(&user, &contact)?;
            let old = existing.clone().unwrap_or_default();
            let transition = match direction {
                Direction::Outbound => xmpp::roster::outbound(old.sub, kind),
                Direction::Inbound => xmpp::roster::inbound(old.sub, kind),
            };
            let mut item = old;
            item.sub = transition.state;
            if !item.sub.pending_in {
                item.pending_request = None;
            } else if direction == Direction::Inbound && kind == SubKind::Subscribe {
                item.pending_request = stanza;
            }
            // RFC 6121 §3.1.2 / §3.1.5: the user's own subscription acts put
            // the contact in the visible roster.
            if direction == Direction::Outbound
                && matches!(kind, SubKind::Subscribe | SubKind::Subscribed)
                && transition.changed
            {
                item.visible = true;
            }
            let nothing_left = !item.visible
                && item.sub == xmpp::roster::SubState::default()
                && item.pending_request.is_none();
            if existing.is_none() && !nothing_left {
                if let Some(max) = tx.budgets.roster_items {
                    if tx.scan(&keys::user_prefix(keys::ROSTER, &user))?.len() >= max as usize {
                        return Err(Refusal::RosterFull(user, max).into());
                    }
                }
            }
            if nothing_left {
                if existing.is_some() {
                    tx.delete(keys::user_key(keys::ROSTER, &user, &contact));
                }
                let ver = tx.roster_version(&user)?;
                return Ok(Response::Subscription {
                    transition,
                    ver,
                    item: None,
                });
            }
            if Some(&item) == existing.as_ref() {
                let ver = tx.roster_version(&user)?;
                let item = item.visible.then_some(item);
                return Ok(Response::Subscription {
                    transition,
                    ver,
                    item,
                });
            }
            // A change the user cannot see in the roster (a pending inbound
            // request) is stored without a new version or a push.
            let seen = |i: &RosterItem| {
                (
                    i.visible,
                    i.sub.subscription,
                    i.sub.pending_out,
                    i.sub.approved,
                )
            };
            if existing
                .as_ref()
                .is_some_and(|e| e.visible && seen(e) == seen(&item))
            {
                tx.put(keys::user_key(keys::ROSTER, &user, &contact), encode(&item));
                let ver = tx.roster_version(&user)?;
                let mut transition = transition;
                transition.changed = false;
                return Ok(Response::Subscription {
                    transition,
                    ver,
                    item: None,
                });
            }
            let (ver, item) = tx.write_item(&user, &contact, item)?;
            Ok(Response::Subscription {
                transition,
                ver,
                item: item.visible.then_some(item),
            })
        }
        Command::SubscriptionLocal {
            from,
            to,
            kind,
            stanza,
        } => {
            let mut out = Vec::with_capacity(3);
            let sender = apply_in(
                tx,
                Command::Subscription {
                    user: from.clone(),
                    contact: to.clone(),
                    direction: Direction::Outbound,
                    kind,
                    stanza: None,
                },
            )?;
            let forward =
                matches!(&sender, Response::Subscription { transition, .. } if transition.forward);
            out.push(sender);
            if forward && tx.get(&keys::account(&to))?.is_some() {
                let recipient = match apply_in(
                    tx,
                    Command::Subscription {
                        user: to.clone(),
                        contact: from.clone(),
                        direction: Direction::Inbound,
                        kind,
                        stanza: Some(stanza),
                    },
                ) {
                    // The recipient's roster has no room for one more
                    // stranger: the request is dropped there (nothing was
                    // written for it), the sender's side stands.
                    Err(ApplyError::Refused(Refusal::RosterFull(..))) => {
                        return Ok(Response::Batch(out));
                    }
                    r => r?,
                };
                let reply = match &recipient {
                    Response::Subscription { transition, .. } => transition.auto_reply,
                    _ => None,
                };
                out.push(recipient);
                if let Some(reply) = reply {
                    out.push(apply_in(
                        tx,
                        Command::Subscription {
                            user: from,
                            contact: to,
                            direction: Direction::Inbound,
                            kind: reply,
                            stanza: None,
                        },
                    )?);
                }
            }
            Ok(Response::Batch(out))
        }
        Command::Many(_) => Err(Refusal::Nested.into()),
        Command::Limited { limits, command } => {
            let outer = std::mem::replace(&mut tx.budgets, Budgets::of(&limits));
            let r = apply_in(tx, *command);
            tx.budgets = outer;
            r
        }
        Command::Batch(cmds) => {
            let mut out = Vec::with_capacity(cmds.len());
            for c in cmds {
                out.push(apply_in(tx, c)?);
            }
            Ok(Response::Batch(out))
        }
        Command::Block { user, jids, max } => {
            let listed = tx.scan(&keys::user_prefix(keys::BLOCK, &user))?.len();
            let new = jids
                .iter()
                .filter(|j| !matches!(tx.get(&keys::user_key(keys::BLOCK, &user, j)), Ok(Some(_))))
                .count();
            if listed + new > max as usize {
                return Err(Refusal::BlocklistFull(user, max).into());
            }
            let mut changed = Vec::new();
            for j in jids {
                let key = keys::user_key(keys::BLOCK, &user, &j);
                if tx.get(&key)?.is_none() {
                    tx.put(key, Vec::new());
                    tx.put(keys::user_key(keys::BLOCKED_BY, &j, &user), Vec::new());
                    changed.push(j);
                }
            }
            Ok(Response::Blocking(changed))
        }
        Command::Unblock { user, jids } => {
            let prefix = keys::user_prefix(keys::BLOCK, &user);
            let mut changed = Vec::new();
            for (k, _) in tx.scan(&prefix)? {
                let j = String::from_utf8_lossy(&k[prefix.len()..]).into_owned();
                if jids.is_empty() || jids.contains(&j) {
                    tx.delete(k);
                    tx.delete(keys::user_key(keys::BLOCKED_BY, &j, &user));
                    changed.push(j);
                }
            }
            Ok(Response::Blocking(changed))
        }
        Command::SetVcard { user, vcard } => {
            let key = keys::user_key(keys::VCARD, &user, "");
            match vcard {
                Some(v) => tx.put(key, v.into_bytes()),
                None => tx.delete(key),
            }
            Ok(Response::Done)
        }
        Command::SetPrivate {
            user,
            namespace,
            xml,
        } => {
            if let Some(max_bytes) = tx.budgets.private_bytes {
                let key = keys::user_key(keys::PRIVATE, &user, &namespace);
                let others: u64 = tx
                    .scan(&keys::user_prefix(keys::PRIVATE, &user))?
                    .iter()
                    .filter(|(k, _)| *k != key)
                    .map(|(k, v)| private_cost(k, v))
                    .sum();
                if others + private_cost(&key, xml.as_bytes()) > max_bytes {
                    return Err(Refusal::PrivateFull { user, max_bytes }.into());
                }
            }
            tx.put(
                keys::user_key(keys::PRIVATE, &user, &namespace),
                xml.into_bytes(),
            );
            Ok(Response::Done)
        }
        Command::BindSession { jid, entry } => {
            if let Some(old) = tx.session(&jid)? {
                if (old.node, old.incarnation, old.sid)
                    != (entry.node, entry.incarnation, entry.sid)
                {
                    tx.effects.push(Effect::SessionReplaced {
                        jid: jid.clone(),
                        old,
                    });
                }
            }
            tx.set_session(&jid, Some(entry));
            Ok(Response::Done)
        }
        Command::SessionPresence {
            jid,
            node,
            incarnation,
            sid,
            available,
            priority,
        } => {
            if let Some(mut e) = tx.session(&jid)? {
                if (e.node, e.incarnation, e.sid) == (node, incarnation, sid)
                    && (e.available, e.priority) != (available, priority)
                {
                    e.available = available;
                    e.priority = priority;
                    tx.set_session(&jid, Some(e));
                }
            }
            Ok(Response::Done)
        }
        Command::UnbindSession {
            jid,
            node,
            incarnation,
            sid,
        } => {
            if let Some(e) = tx.session(&jid)? {
                if (e.node, e.incarnation, e.sid) == (node, incarnation, sid) {
                    tx.set_session(&jid, None);
                    muc::session_gone(tx, &jid)?;
                }
            }
            Ok(Response::Done)
        }
        Command::NodeUp { node, incarnation } => {
            tx.drop_sessions(|e| e.node == node && e.incarnation != incarnation)?;
            Ok(Response::Done)
        }
        Command::NodeDown { node } => {
            tx.drop_sessions(|e| e.node == node)?;
            Ok(Response::Done)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xmpp::jid::BareJid;
    use xmpp::sasl::HashAlg;

    fn creds(pw: &str) -> Vec<ScramCredentials> {
        vec![
            ScramCredentials::derive(HashAlg::Sha256, pw, b"0123456789abcdef", 4096)
                .expect("derive"),
        ]
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        (dir, s)
    }

    /// A group commit: each command has its own outcome, a refusal refuses
    /// only its own command, and later commands see earlier ones' writes.
    #[test]
    fn many_applies_each_command_on_its_own() {
        let (_d, s) = store();
        let create = |u: &str, pw: &str| Command::CreateAccount {
            user: u.to_owned(),
            credentials: creds(pw),
        };
        let r = apply(
            &s,
            1,
            Command::Many(vec![
                create("a@example.com", "1"),
                create("a@example.com", "2"),
                create("b@example.com", "3"),
                Command::Many(vec![]),
            ]),
        )
        .expect("group applied");
        let Response::Many(outcomes) = r else {
            panic!("not a group answer: {r:?}")
        };
        assert_eq!(outcomes.len(), 4);
        assert!(outcomes[0].is_ok(), "{outcomes:?}");
        assert_eq!(
            outcomes[1],
            Err(Refusal::AccountExists("a@example.com".into()))
        );
        assert!(outcomes[2].is_ok(), "{outcomes:?}");
        assert_eq!(outcomes[3], Err(Refusal::Nested));
        let a = BareJid::parse("a@example.com").expect("jid");
        assert_eq!(
            s.account(&a).expect("read").expect("a exists").credentials,
            creds("1"),
            "the refused second create left nothing behind"
        );
        assert!(s
            .account(&BareJid::parse("b@example.com").expect("jid"))
            .expect("read")
            .is_some());
        assert_eq!(s.applied_index().expect("index"), 1);
    }

    #[test]
    fn account_lifecycle_is_applied_in_order() {
        let (_d, s) = store();
        let alice = BareJid::parse("alice@example.com").expect("jid");
        let user = alice.to_string();
        apply(
            &s,
            1,
            Command::CreateAccount {
                user: user.clone(),
                credentials: creds("a"),
            },
        )
        .expect("create");
        assert!(matches!(
            apply(
                &s,
                2,
                Command::CreateAccount {
                    user: user.clone(),
                    credentials: creds("b")
                }
            ),
            Err(ApplyError::Refused(Refusal::AccountExists(_)))
        ));
        assert_eq!(
            s.account(&alice)
                .expect("read")
                .expect("exists")
                .credentials,
            creds("a")
        );
        apply(
            &s,
            3,
            Command::SetPassword {
                user: user.clone(),
                credentials: creds("c"),
            },
        )
        .expect("passwd");
        assert_eq!(
            s.account(&alice)
                .expect("read")
                .expect("exists")
                .credentials,
            creds("c")
        );
        apply(&s, 4, Command::DeleteAccount { user: user.clone() }).expect("delete");
        assert!(s.account(&alice).expect("read").is_none());
        assert_eq!(s.applied_index().expect("index"), 4);
    }

    /// Every node learns of a deletion, to close the user's sessions it
    /// serves.
    #[test]
    fn deleting_an_account_is_an_effect_on_every_node() {
        let (_d, s) = store();
        let user = "gone@example.com".to_string();
        let created = effects(
            &s,
            Command::CreateAccount {
                user: user.clone(),
                credentials: creds("a"),
            },
        );
        assert!(created.is_empty(), "{created:?}");
        let e = effects(&s, Command::DeleteAccount { user: user.clone() });
        assert_eq!(e, vec![Effect::AccountDeleted { user }]);
    }

    #[test]
    fn offline_pages_leave_only_when_acknowledged_and_bytes_are_bounded() {
        let (_d, s) = store();
        let user = "bob@example.com".to_string();
        let push = |i: u64, stanza: &str, max_bytes: u64| {
            apply(
                &s,
                i,
                Command::PushOffline {
                    user: user.clone(),
                    stanza: stanza.into(),
                    max: 100,
                    max_bytes,
                },
            )
        };
        for i in 0..5u64 {
            push(i + 1, &format!("<m{i}/>"), 27).expect("fits");
        }
        // Five of 5 bytes: a sixth passes 27.
        assert!(matches!(
            push(6, "<m5/>", 27),
            Err(ApplyError::Refused(Refusal::OfflineBytesFull {
                max_bytes: 27,
                ..
            }))
        ));
        let page = s.offline_page(&user, 2).expect("page");
        assert_eq!(page, vec![(0, "<m0/>".into()), (1, "<m1/>".into())]);
        // Reading takes nothing away.
        assert_eq!(s.offline_page(&user, 2).expect("page"), page);
        apply(
            &s,
            7,
            Command::AckOffline {
                user: user.clone(),
                upto: 2,
            },
        )
        .expect("ack");
        let meta = s.offline_meta(&user).expect("meta");
        assert_eq!((meta.head, meta.tail, meta.bytes), (2, 5, 15));
        // A repeated (late) ack changes nothing.
        apply(
            &s,
            8,
            Command::AckOffline {
                user: user.clone(),
                upto: 2,
            },
        )
        .expect("ack");
        apply(
            &s,
            9,
            Command::AckOffline {
                user: user.clone(),
                upto: 5,
            },
        )
        .expect("ack");
        assert_eq!(s.offline_meta(&user).expect("meta").count(), 0);
        // Sequence numbers go on after the queue emptied, so an old ack
        // cannot remove what is stored next.
        push(10, "<n/>", 27).expect("store");
        apply(
            &s,
            11,
            Command::AckOffline {
                user: user.clone(),
                upto: 5,
            },
        )
        .expect("ack");
        assert_eq!(
            s.offline_page(&user, 10).expect("page"),
            vec![(5, "<n/>".into())]
        );
    }

    #[test]
    fn archive_ids_grow_per_user_and_the_cap_drops_the_oldest() {
        let (_d, s) = store();
        for (i, u) in ["a@x", "b@x"].iter().enumerate() {
            apply(
                &s,
                i as u64 + 1,
                Command::CreateAccount {
                    user: (*u).into(),
                    credentials: creds("pw"),
                },
            )
            .expect("account");
        }
        let owner = |user: &str, with: &str| ArchiveOwner {
            user: user.into(),
            with: with.into(),
            peer: format!("{with}/r"),
        };
        let policy = ArchivePolicy {
            default: ArchiveDefault::Always,
            max_messages: 3,
            retention_micros: 0,
        };
        // Two messages in one batch with the same clock reading, and one
        // with a clock that went back: ids still grow, one past the last.
        let items = vec![
            ArchiveItem {
                ts: 1_000,
                stanza: "<m1/>".into(),
                owners: vec![owner("a@x", "b@x"), owner("b@x", "a@x")],
            },
            ArchiveItem {
                ts: 1_000,
                stanza: "<m2/>".into(),
                owners: vec![owner("a@x", "b@x"), owner("nobody@x", "a@x")],
            },
        ];
        let r = apply(&s, 3, Command::ArchiveBatch { items, policy }).expect("archive");
        assert_eq!(
            r,
            Response::ArchivedBatch(vec![
                vec![Some(1_000), Some(1_000)],
                vec![Some(1_001), None]
            ])
        );
        for (i, ts) in [(4, 500), (5, 2_000)] {
            let r = apply(
                &s,
                i,
                Command::Archive {
                    ts,
                    stanza: format!("<m{i}/>"),
                    owners: vec![owner("a@x", "c@y")],
                    policy,
                },
            )
            .expect("archive");
            let want = if ts == 500 { 1_002 } else { 2_000 };
            assert_eq!(r, Response::Archived(vec![Some(want)]));
        }
        // Four archived for a@x, cap three: the oldest went.
        let ids: Vec<u64> = s
            .archive_range("a@x", None, 0, u64::MAX, false)
            .map(|r| r.expect("read").0)
            .collect();
        assert_eq!(ids, [1_001, 1_002, 2_000]);
        assert_eq!(s.archive_meta("a@x").expect("meta").count, 3);
        let newest_first: Vec<u64> = s
            .archive_range("a@x", Some("c@y"), 0, u64::MAX, true)
            .map(|r| r.expect("read").0)
            .collect();
        assert_eq!(newest_first, [2_000, 1_002]);
        // Preferences: b@x archives nothing from a@x any more.
        apply(
            &s,
            6,
            Command::SetArchivePrefs {
                user: "b@x".into(),
                prefs: ArchivePrefs {
                    default: ArchiveDefault::Always,
                    always: vec![],
                    never: vec!["a@x".into()],
                },
            },
        )
        .expect("prefs");
        let r = apply(
            &s,
            7,
            Command::Archive {
                ts: 3_000,
                stanza: "<m/>".into(),
                owners: vec![owner("b@x", "a@x")],
                policy,
            },
        )
        .expect("archive");
        assert_eq!(r, Response::Archived(vec![None]));
    }

    #[test]
    fn offline_queue_is_ordered_bounded_and_drained() {
        let (_d, s) = store();
        let user = "bob@example.com".to_string();
        for i in 0..3 {
            apply(
                &s,
                i + 1,
                Command::StoreOffline {
                    user: user.clone(),
                    stanza: format!("<m{i}/>"),
                    max: 3,
                },
            )
            .expect("store");
        }
        assert!(matches!(
            apply(
                &s,
                4,
                Command::StoreOffline {
                    user: user.clone(),
                    stanza: "<x/>".into(),
                    max: 3
                }
            ),
            Err(ApplyError::Refused(Refusal::OfflineFull { max: 3, .. }))
        ));
        let got = apply(&s, 5, Command::TakeOffline { user: user.clone() }).expect("take");
        assert_eq!(
            got,
            Response::Offline(vec!["<m0/>".into(), "<m1/>".into(), "<m2/>".into()])
        );
        assert_eq!(
            apply(&s, 6, Command::TakeOffline { user }).expect("take"),
            Response::Offline(vec![])
        );
    }

    #[test]
    fn import_counts_created_updated_and_skipped() {
        let (_d, s) = store();
        apply(
            &s,
            1,
            Command::CreateAccount {
                user: "a@x".into(),
                credentials: creds("1"),
            },
        )
        .expect("create");
        let accounts = vec![
            ("a@x".to_string(), creds("2")),
            ("b@x".to_string(), creds("2")),
        ];
        let r = apply(
            &s,
            2,
            Command::ImportAccounts {
                accounts: accounts.clone(),
                update_existing: false,
            },
        )
        .expect("import");
        assert_eq!(
            r,
            Response::Imported {
                created: 1,
                updated: 0,
                skipped: 1
            }
        );
        let r = apply(
            &s,
            3,
            Command::ImportAccounts {
                accounts,
                update_existing: true,
            },
        )
        .expect("import");
        assert_eq!(
            r,
            Response::Imported {
                created: 0,
                updated: 2,
                skipped: 0
            }
        );
    }

    fn sub_of(r: &Response) -> Option<(Transition, Option<RosterItem>)> {
        match r {
            Response::Subscription {
                transition, item, ..
            } => Some((*transition, item.clone())),
            _ => None,
        }
    }

    #[test]
    fn local_subscription_changes_both_rosters_in_one_entry() {
        let (_d, s) = store();
        for u in ["alice@x", "bob@x"] {
            apply(
                &s,
                1,
                Command::CreateAccount {
                    user: u.into(),
                    credentials: creds("1"),
                },
            )
            .expect("create");
        }
        let r = apply(
            &s,
            2,
            Command::SubscriptionLocal {
                from: "alice@x".into(),
                to: "bob@x".into(),
                kind: SubKind::Subscribe,
                stanza: "<presence type='subscribe'/>".into(),
            },
        )
        .expect("sub");
        let Response::Batch(parts) = r else {
            panic!("batch")
        };
        assert_eq!(parts.len(), 2);
        let (alice_t, alice_item) = sub_of(&parts[0]).expect("alice side");
        assert!(alice_t.forward);
        assert!(alice_item.expect("visible").sub.pending_out);
        let (bob_t, bob_item) = sub_of(&parts[1]).expect("bob side");
        assert!(bob_t.forward);
        assert!(
            bob_item.is_none(),
            "a pending request is not a visible roster item"
        );
        let stored = s
            .roster_item("bob@x", "alice@x")
            .expect("read")
            .expect("kept");
        assert!(stored.sub.pending_in && stored.pending_request.is_some());

        // Bob approves: bob gets `from`, alice gets `to`, in one entry.
        apply(
            &s,
            3,
            Command::SubscriptionLocal {
                from: "bob@x".into(),
                to: "alice@x".into(),
                kind: SubKind::Subscribed,
                stanza: String::new(),
            },
        )
        .expect("approve");
        use xmpp::roster::Subscription;
        assert_eq!(
            s.roster_item("bob@x", "alice@x")
                .expect("r")
                .expect("i")
                .sub
                .subscription,
            Subscription::From
        );
        assert_eq!(
            s.roster_item("alice@x", "bob@x")
                .expect("r")
                .expect("i")
                .sub
                .subscription,
            Subscription::To
        );
        assert!(s
            .roster_item("bob@x", "alice@x")
            .expect("r")
            .expect("i")
            .pending_request
            .is_none());

        // A repeated request is answered for bob: no delivery, alice unchanged.
        let r = apply(
            &s,
            4,
            Command::SubscriptionLocal {
                from: "alice@x".into(),
                to: "bob@x".into(),
                kind: SubKind::Subscribe,
                stanza: String::new(),
            },
        )
        .expect("dup");
        let Response::Batch(parts) = r else {
            panic!("batch")
        };
        let (bob_t, _) = sub_of(&parts[1]).expect("bob");
        assert!(!bob_t.forward && bob_t.auto_reply == Some(SubKind::Subscribed));
    }

    #[test]
    fn roster_versions_grow_and_removals_are_remembered() {
        let (_d, s) = store();
        let set = |i, c: &str| {
            apply(
                &s,
                i,
                Command::RosterSet {
                    user: "a@x".into(),
                    contact: c.into(),
                    name: Some("N".into()),
                    groups: vec!["G".into()],
                    max: 3,
                },
            )
            .expect("set")
        };
        set(1, "b@x");
        set(2, "c@x");
        assert_eq!(s.roster_version("a@x").expect("ver"), 2);
        apply(
            &s,
            3,
            Command::RosterRemove {
                user: "a@x".into(),
                contact: "b@x".into(),
            },
        )
        .expect("remove");
        assert_eq!(s.roster_version("a@x").expect("ver"), 3);
        assert_eq!(
            s.roster_removals("a@x").expect("gone"),
            vec![("b@x".to_string(), 3)]
        );
        let items = s.roster("a@x").expect("roster");
        assert_eq!(items.len(), 1);
        assert_eq!(items[0].1.ver, 2);
        assert!(matches!(
            apply(
                &s,
                4,
                Command::RosterRemove {
                    user: "a@x".into(),
                    contact: "zz@x".into()
                }
            ),
            Err(ApplyError::Refused(Refusal::NoRosterItem { .. }))
        ));
    }

    #[test]
    fn roster_and_blocklist_sizes_are_bounded() {
        let (_d, s) = store();
        let set = |i, c: &str| {
            apply(
                &s,
                i,
                Command::RosterSet {
                    user: "a@x".into(),
                    contact: c.into(),
                    name: None,
                    groups: vec![],
                    max: 2,
                },
            )
        };
        set(1, "b@x").expect("first");
        set(2, "c@x").expect("second");
        assert!(matches!(
            set(3, "d@x"),
            Err(ApplyError::Refused(Refusal::RosterFull(_, 2)))
        ));
        // Updating a contact already there is not growth.
        set(4, "b@x").expect("update");
        let block = |i, jids: &[&str]| {
            apply(
                &s,
                i,
                Command::Block {
                    user: "a@x".into(),
                    jids: jids.iter().map(|j| j.to_string()).collect(),
                    max: 2,
                },
            )
        };
        block(5, &["m@x", "n@x"]).expect("two");
        block(6, &["m@x"]).expect("already listed");
        assert!(matches!(
            block(7, &["o@x"]),
            Err(ApplyError::Refused(Refusal::BlocklistFull(_, 2)))
        ));
        assert_eq!(s.blocklist("a@x").expect("list").len(), 2);
    }

    fn limited(cmd: Command, limits: &[Limit]) -> Command {
        Command::Limited {
            limits: limits.to_vec(),
            command: Box::new(cmd),
        }
    }

    /// Requests from strangers count against the roster budget; the
    /// recipient's full roster drops the request and keeps the sender's
    /// side; removal marks past their budget go, oldest first, and raise
    /// the floor; private storage is bounded across namespaces.
    #[test]
    fn budgets_bound_hidden_items_tombstones_and_private_storage() {
        let (_d, s) = store();
        for u in ["a@x", "s1@x", "s2@x", "s3@x"] {
            apply(
                &s,
                1,
                Command::CreateAccount {
                    user: u.into(),
                    credentials: creds("1"),
                },
            )
            .expect("create");
        }
        let ask = |i, from: &str| {
            apply(
                &s,
                i,
                limited(
                    Command::SubscriptionLocal {
                        from: from.into(),
                        to: "a@x".into(),
                        kind: SubKind::Subscribe,
                        stanza: "<presence type='subscribe'/>".into(),
                    },
                    &[Limit::RosterItems(2)],
                ),
            )
        };
        ask(2, "s1@x").expect("first stranger");
        ask(3, "s2@x").expect("second stranger");
        let Response::Batch(parts) = ask(4, "s3@x").expect("the sender's side stands") else {
            panic!("batch")
        };
        assert_eq!(parts.len(), 1, "nothing for the full roster: {parts:?}");
        assert!(s.roster_item("a@x", "s3@x").expect("read").is_none());
        assert!(s
            .roster_item("s3@x", "a@x")
            .expect("read")
            .is_some_and(|i| i.sub.pending_out));
        // Without the budget (an old entry), the same request is kept.
        apply(
            &s,
            5,
            Command::Subscription {
                user: "a@x".into(),
                contact: "s4@y".into(),
                direction: Direction::Inbound,
                kind: SubKind::Subscribe,
                stanza: Some("<presence/>".into()),
            },
        )
        .expect("unbudgeted");
        assert_eq!(s.roster("a@x").expect("roster").len(), 3);

        // Tombstones: three removals with room for two.
        for (i, c) in ["t1@y", "t2@y", "t3@y"].iter().enumerate() {
            let i = 10 + 2 * i as u64;
            apply(
                &s,
                i,
                Command::RosterSet {
                    user: "a@x".into(),
                    contact: (*c).into(),
                    name: None,
                    groups: vec![],
                    max: 100,
                },
            )
            .expect("set");
            apply(
                &s,
                i + 1,
                limited(
                    Command::RosterRemove {
                        user: "a@x".into(),
                        contact: (*c).into(),
                    },
                    &[Limit::RosterTombstones(2)],
                ),
            )
            .expect("remove");
        }
        let marks = s.roster_removals("a@x").expect("marks");
        let names: Vec<&str> = marks.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(names, ["t2@y", "t3@y"], "the oldest mark went");
        let t1_removed_at = marks.iter().map(|(_, v)| *v).min().expect("some") - 2;
        assert_eq!(s.roster_floor("a@x").expect("floor"), t1_removed_at);

        // Private storage: 2 items of ~200 bytes fit in 500, a third does not;
        // replacing one is not growth.
        let put = |i, ns: &str| {
            apply(
                &s,
                i,
                limited(
                    Command::SetPrivate {
                        user: "a@x".into(),
                        namespace: ns.into(),
                        xml: "x".repeat(120),
                    },
                    &[Limit::PrivateBytes(500)],
                ),
            )
        };
        put(20, "urn:a").expect("first");
        put(21, "urn:b").expect("second");
        assert!(matches!(
            put(22, "urn:c"),
            Err(ApplyError::Refused(Refusal::PrivateFull {
                max_bytes: 500,
                ..
            }))
        ));
        put(23, "urn:a").expect("replace");
    }

    #[test]
    fn same_log_gives_same_state() {
        let log = [
            Command::CreateAccount {
                user: "a@x".into(),
                credentials: creds("1"),
            },
            Command::StoreOffline {
                user: "a@x".into(),
                stanza: "<m/>".into(),
                max: 10,
            },
            Command::CreateAccount {
                user: "a@x".into(),
                credentials: creds("2"),
            },
        ];
        let dump = |s: &Store| {
            s.scan_prefix(b"")
                .collect::<Result<Vec<_>, _>>()
                .expect("scan")
        };
        let (_d1, s1) = store();
        let (_d2, s2) = store();
        for (i, c) in log.iter().enumerate() {
            let _ = apply(&s1, i as u64 + 1, c.clone());
            let _ = apply(&s2, i as u64 + 1, c.clone());
        }
        assert_eq!(dump(&s1), dump(&s2));
    }

    fn entry(node: u64, incarnation: u64, sid: u64) -> SessionEntry {
        SessionEntry {
            node,
            incarnation,
            sid,
            available: false,
            priority: 0,
        }
    }

    fn effects(s: &Store, cmd: Command) -> Vec<Effect> {
        let meta = vec![(keys::APPLIED, 1u64.to_be_bytes().to_vec())];
        let mut r = apply_entries(s, vec![(meta, Some(cmd))]).expect("apply");
        let (outcome, effects) = r.pop().expect("one outcome");
        outcome.expect("not refused");
        effects
    }

    #[test]
    fn a_newer_bind_replaces_the_old_session_and_says_whose_it_was() {
        let (_d, s) = store();
        let jid = "a@x/r".to_string();
        effects(
            &s,
            Command::BindSession {
                jid: jid.clone(),
                entry: entry(1, 7, 1),
            },
        );
        let e = effects(
            &s,
            Command::BindSession {
                jid: jid.clone(),
                entry: entry(2, 9, 4),
            },
        );
        assert!(
            e.contains(&Effect::SessionReplaced {
                jid: jid.clone(),
                old: entry(1, 7, 1)
            }),
            "{e:?}"
        );
        // The loser's late unbind leaves the winner in place.
        effects(
            &s,
            Command::UnbindSession {
                jid: jid.clone(),
                node: 1,
                incarnation: 7,
                sid: 1,
            },
        );
        assert_eq!(
            s.sessions().expect("table"),
            vec![(jid.clone(), entry(2, 9, 4))]
        );
        // Presence of a session that is not the bound one changes nothing.
        effects(
            &s,
            Command::SessionPresence {
                jid: jid.clone(),
                node: 1,
                incarnation: 7,
                sid: 1,
                available: true,
                priority: 5,
            },
        );
        assert!(!s.sessions().expect("table")[0].1.available);
        effects(
            &s,
            Command::SessionPresence {
                jid: jid.clone(),
                node: 2,
                incarnation: 9,
                sid: 4,
                available: true,
                priority: 5,
            },
        );
        assert_eq!(s.sessions().expect("table")[0].1.priority, 5);
    }

    #[test]
    fn node_up_drops_earlier_incarnations_and_node_down_drops_all() {
        let (_d, s) = store();
        effects(
            &s,
            Command::BindSession {
                jid: "a@x/1".into(),
                entry: entry(1, 7, 1),
            },
        );
        effects(
            &s,
            Command::BindSession {
                jid: "b@x/1".into(),
                entry: entry(1, 8, 1),
            },
        );
        effects(
            &s,
            Command::BindSession {
                jid: "c@x/1".into(),
                entry: entry(2, 5, 1),
            },
        );
        let e = effects(
            &s,
            Command::NodeUp {
                node: 1,
                incarnation: 8,
            },
        );
        assert!(
            e.contains(&Effect::SessionsGone(vec![(
                "a@x/1".into(),
                entry(1, 7, 1)
            )])),
            "{e:?}"
        );
        effects(&s, Command::NodeDown { node: 2 });
        let left: Vec<String> = s
            .sessions()
            .expect("table")
            .into_iter()
            .map(|(j, _)| j)
            .collect();
        assert_eq!(left, vec!["b@x/1".to_string()]);
    }
}
