//! The session table as every node reads it: full JID -> where it is bound,
//! kept in memory beside the replicated `s:` keys so that routing a stanza
//! reads a small vector under a read lock, not the database.
//!
//! Only applying an entry writes it ([`super::raft_sm`]), so every node's
//! copy follows the log.

use std::collections::HashMap;
use std::sync::RwLock;

use xmpp::jid::{BareJid, FullJid};

use super::state_machine::SessionEntry;

#[derive(Default)]
pub struct SessionTable {
    by_user: RwLock<HashMap<BareJid, Vec<(String, SessionEntry)>>>,
}

impl SessionTable {
    fn write(
        &self,
    ) -> std::sync::RwLockWriteGuard<'_, HashMap<BareJid, Vec<(String, SessionEntry)>>> {
        self.by_user.write().unwrap_or_else(|p| p.into_inner())
    }

    fn read(
        &self,
    ) -> std::sync::RwLockReadGuard<'_, HashMap<BareJid, Vec<(String, SessionEntry)>>> {
        self.by_user.read().unwrap_or_else(|p| p.into_inner())
    }

    /// Applies one change of the replicated table.
    pub fn set(&self, jid: &str, entry: Option<SessionEntry>) {
        let Ok(full) = FullJid::parse(jid) else {
            return;
        };
        let mut map = self.write();
        let list = map.entry(full.bare().clone()).or_default();
        let pos = list.iter().position(|(r, _)| r == full.resource());
        match (pos, entry) {
            (Some(i), Some(e)) => list[i].1 = e,
            (None, Some(e)) => list.push((full.resource().to_owned(), e)),
            (Some(i), None) => {
                list.swap_remove(i);
            }
            (None, None) => {}
        }
        if list.is_empty() {
            map.remove(full.bare());
        }
    }

    /// Replaces the whole table (after a snapshot install, or at start).
    pub fn reset(&self, entries: Vec<(String, SessionEntry)>) {
        let mut map = self.write();
        map.clear();
        for (jid, e) in entries {
            if let Ok(full) = FullJid::parse(&jid) {
                map.entry(full.bare().clone())
                    .or_default()
                    .push((full.resource().to_owned(), e));
            }
        }
    }

    pub fn get(&self, full: &FullJid) -> Option<SessionEntry> {
        self.read()
            .get(full.bare())?
            .iter()
            .find(|(r, _)| r == full.resource())
            .map(|(_, e)| *e)
    }

    /// Runs `f` over the user's entries under the read lock (no awaiting).
    pub fn with_user<R>(
        &self,
        user: &BareJid,
        f: impl FnOnce(&[(String, SessionEntry)]) -> R,
    ) -> R {
        let map = self.read();
        f(map.get(user).map_or(&[][..], Vec::as_slice))
    }

    /// Sessions per node.
    pub fn count_by_node(&self) -> HashMap<u64, u64> {
        let mut out = HashMap::new();
        for list in self.read().values() {
            for (_, e) in list {
                *out.entry(e.node).or_default() += 1;
            }
        }
        out
    }

    /// Whether `node` has any session in the table.
    pub fn has_node(&self, node: u64) -> bool {
        self.read()
            .values()
            .any(|l| l.iter().any(|(_, e)| e.node == node))
    }
}
