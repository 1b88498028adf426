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

/// Key prefixes: `a:` accounts, `o:` offline messages, `m:` metadata.
pub(crate) mod keys {
    pub const ACCOUNT: &[u8] = b"a:";
    pub const OFFLINE: &[u8] = b"o:";
    pub const APPLIED: &[u8] = b"m:applied";

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

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored record is corrupt: {0}")]
    Decode(#[from] postcard::Error),
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
        let db = sled::Config::new().path(dir).open()?;
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

    pub fn last_with_prefix(&self, prefix: &[u8]) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self
            .tree
            .scan_prefix(prefix)
            .next_back()
            .transpose()?
            .map(|(k, _)| k.to_vec()))
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

    pub fn applied_index(&self) -> Result<u64, StoreError> {
        Ok(self
            .get(keys::APPLIED)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
            .map(u64::from_be_bytes)
            .unwrap_or(0))
    }
}
