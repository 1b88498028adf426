//! Read access to the replicated state, and the narrow storage interface
//! the state machine writes through.
//!
//! Everything lives in one sled tree under typed key prefixes, so that one
//! command's writes are one atomic `apply_batch`. sled is durable only after
//! a flush: [`Store::flush`] is awaited before a write is acknowledged
//! (DESIGN.md, "Storage"). Keeping sled behind this one file is what makes a
//! switch to another engine a local change.

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
    pub const ROSTER: &[u8] = b"r:";
    pub const ROSTER_VER: &[u8] = b"rv:";
    pub const ROSTER_GONE: &[u8] = b"rt:";
    pub const BLOCK: &[u8] = b"b:";
    pub const VCARD: &[u8] = b"v:";
    pub const PRIVATE: &[u8] = b"x:";
    pub const APPLIED: &[u8] = b"m:applied";
    /// The Raft log id of the last applied entry, and the membership.
    pub const APPLIED_LOG: &[u8] = b"m:applied_log";
    pub const MEMBERSHIP: &[u8] = b"m:membership";
    /// The session table: `s:<full jid>` -> SessionEntry.
    pub const SESSION: &[u8] = b"s:";

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
pub struct Batch(sled::Batch);

impl Batch {
    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.0.insert(key, value);
    }
    pub fn delete(&mut self, key: &[u8]) {
        self.0.remove(key);
    }
}

#[derive(Clone)]
pub struct Store {
    db: sled::Db,
    tree: sled::Tree,
}

impl Store {
    pub fn open(dir: &std::path::Path) -> Result<Store, StoreError> {
        // No background flusher: every write is flushed before it is
        // acknowledged (Cluster::write), and keeping sled's own flusher
        // thread out of its lock dance removes a party to the deadlock
        // described there.
        let db = sled::Config::new().path(dir).flush_every_ms(None).open()?;
        let tree = db.open_tree("state")?;
        Ok(Store { db, tree })
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.tree.get(key)?.map(|v| v.to_vec()))
    }

    pub fn scan_prefix(
        &self,
        prefix: &[u8],
    ) -> impl Iterator<Item = Result<(Vec<u8>, Vec<u8>), StoreError>> + '_ {
        self.tree.scan_prefix(prefix).map(|r| {
            r.map(|(k, v)| (k.to_vec(), v.to_vec()))
                .map_err(StoreError::from)
        })
    }

    pub fn apply(&self, batch: Batch) -> Result<(), StoreError> {
        self.tree.apply_batch(batch.0)?;
        Ok(())
    }

    /// Makes every write so far durable.
    pub async fn flush(&self) -> Result<(), StoreError> {
        self.db.flush_async().await?;
        Ok(())
    }

    // ---- typed reads -------------------------------------------------

    pub fn account(&self, user: &BareJid) -> Result<Option<Account>, StoreError> {
        match self.get(&keys::account(&user.to_string()))? {
            Some(bytes) => Ok(Some(postcard::from_bytes(&bytes)?)),
            None => Ok(None),
        }
    }

    pub fn account_exists(&self, user: &BareJid) -> Result<bool, StoreError> {
        Ok(self.tree.contains_key(keys::account(&user.to_string()))?)
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
        for kv in self.tree.scan_prefix(keys::ACCOUNT).keys() {
            kv?;
            n += 1;
        }
        Ok(n)
    }

    pub fn offline_count(&self, user: &BareJid) -> Result<usize, StoreError> {
        let mut n = 0;
        for kv in self
            .tree
            .scan_prefix(keys::offline_prefix(&user.to_string()))
            .keys()
        {
            kv?;
            n += 1;
        }
        Ok(n)
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

    pub fn blocklist_is_empty(&self, user: &str) -> Result<bool, StoreError> {
        Ok(self
            .tree
            .scan_prefix(keys::user_prefix(keys::BLOCK, user))
            .keys()
            .next()
            .transpose()?
            .is_none())
    }

    pub fn is_blocked(&self, user: &str, jid: &str) -> Result<bool, StoreError> {
        Ok(self
            .tree
            .contains_key(keys::user_key(keys::BLOCK, user, jid))?)
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

    /// The whole replicated state, for a snapshot.
    pub fn dump(&self) -> Result<Pairs, StoreError> {
        self.scan_prefix(b"").collect()
    }

    /// Replaces the whole state with a snapshot's, in one atomic batch.
    pub fn replace_all(&self, pairs: Pairs) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for k in self.tree.iter().keys() {
            batch.remove(k?);
        }
        for (k, v) in pairs {
            batch.insert(k, v);
        }
        self.tree.apply_batch(batch)?;
        Ok(())
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
