//! The session table as every node reads it: full JID -> where it is bound,
//! kept in memory beside the replicated `s:` keys so that routing a stanza
//! reads a small vector under a read lock, not the database.
//!
//! Only applying an entry writes it ([`super::raft_sm`]), so every node's
//! copy follows the log.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, RwLock};

use xmpp::jid::{BareJid, FullJid};

use super::state_machine::SessionEntry;

#[derive(Default)]
pub struct SessionTable {
    by_user: RwLock<HashMap<BareJid, Vec<(String, SessionEntry)>>>,
    /// Entries per node, changed under the `by_user` write lock.
    per_node: Mutex<HashMap<u64, usize>>,
    /// How many nodes have entries, and which one when it is one: lets a
    /// node whose sessions are all its own (a lone node, or the others
    /// empty) skip every lookup for sessions elsewhere.
    nodes: AtomicUsize,
    sole: AtomicU64,
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

    /// Counts `node`'s entries up or down; called with the write lock held.
    fn count(&self, node: u64, up: bool) {
        let mut per = self.per_node.lock().unwrap_or_else(|p| p.into_inner());
        if up {
            *per.entry(node).or_default() += 1;
        } else if let Some(n) = per.get_mut(&node) {
            *n -= 1;
            if *n == 0 {
                per.remove(&node);
            }
        }
        self.publish(&per);
    }

    fn publish(&self, per: &HashMap<u64, usize>) {
        if let (1, Some(only)) = (per.len(), per.keys().next()) {
            self.sole.store(*only, Ordering::Release);
        }
        self.nodes.store(per.len(), Ordering::Release);
    }

    /// Whether every entry of the table is `node`'s (or there is none).
    pub fn only_on(&self, node: u64) -> bool {
        match self.nodes.load(Ordering::Acquire) {
            0 => true,
            1 => self.sole.load(Ordering::Acquire) == node,
            _ => false,
        }
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
            (Some(i), Some(e)) => {
                if list[i].1.node != e.node {
                    self.count(list[i].1.node, false);
                    self.count(e.node, true);
                }
                list[i].1 = e;
            }
            (None, Some(e)) => {
                self.count(e.node, true);
                list.push((full.resource().to_owned(), e));
            }
            (Some(i), None) => {
                let (_, old) = list.swap_remove(i);
                self.count(old.node, false);
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
        let mut per = self.per_node.lock().unwrap_or_else(|p| p.into_inner());
        per.clear();
        for (jid, e) in entries {
            if let Ok(full) = FullJid::parse(&jid) {
                *per.entry(e.node).or_default() += 1;
                map.entry(full.bare().clone())
                    .or_default()
                    .push((full.resource().to_owned(), e));
            }
        }
        self.publish(&per);
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

    /// `node`'s entries, optionally of one virtual host, as (full JID, entry).
    pub fn on_node(&self, node: u64, vhost: &str) -> Vec<(String, SessionEntry)> {
        let map = self.read();
        map.iter()
            .filter(|(u, _)| vhost.is_empty() || u.domain() == vhost)
            .flat_map(|(u, l)| {
                l.iter()
                    .filter(|(_, e)| e.node == node)
                    .map(move |(r, e)| (format!("{u}/{r}"), *e))
            })
            .collect()
    }

    /// The nodes with entries in the table.
    pub fn nodes(&self) -> Vec<u64> {
        let per = self.per_node.lock().unwrap_or_else(|p| p.into_inner());
        per.keys().copied().collect()
    }

    /// Whether `node` has any session in the table.
    pub fn has_node(&self, node: u64) -> bool {
        self.read()
            .values()
            .any(|l| l.iter().any(|(_, e)| e.node == node))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(node: u64) -> Option<SessionEntry> {
        Some(SessionEntry {
            node,
            incarnation: 1,
            sid: 1,
            available: true,
            priority: 0,
        })
    }

    /// `only_on` follows binds, moves between nodes, unbinds and resets.
    #[test]
    fn only_on_knows_when_every_session_is_one_nodes() {
        let t = SessionTable::default();
        assert!(t.only_on(1) && t.only_on(2), "an empty table");
        t.set("a@x/1", entry(1));
        t.set("b@x/1", entry(1));
        assert!(t.only_on(1) && !t.only_on(2));
        t.set("a@x/2", entry(2));
        assert!(!t.only_on(1) && !t.only_on(2), "two nodes");
        // The session on node 2 moves to node 1 (a resumption elsewhere).
        t.set("a@x/2", entry(1));
        assert!(t.only_on(1));
        t.set("a@x/1", None);
        t.set("b@x/1", None);
        t.set("a@x/2", None);
        assert!(t.only_on(2), "empty again");
        t.reset(vec![("c@x/r".into(), entry(3).expect("entry"))]);
        assert!(t.only_on(3) && !t.only_on(1));
        t.reset(Vec::new());
        assert!(t.only_on(1));
    }

    /// `on_node` lists one node's entries, of one host or all.
    #[test]
    fn on_node_lists_a_nodes_entries() {
        let t = SessionTable::default();
        t.set("a@x/1", entry(1));
        t.set("a@x/2", entry(2));
        t.set("b@y/1", entry(1));
        let mut all = t.on_node(1, "");
        all.sort_by(|a, b| a.0.cmp(&b.0));
        let jids: Vec<&str> = all.iter().map(|(j, _)| j.as_str()).collect();
        assert_eq!(jids, ["a@x/1", "b@y/1"]);
        let y: Vec<String> = t.on_node(1, "y").into_iter().map(|(j, _)| j).collect();
        assert_eq!(y, ["b@y/1"]);
        assert_eq!(t.on_node(3, "").len(), 0);
        let mut nodes = t.nodes();
        nodes.sort_unstable();
        assert_eq!(nodes, [1, 2]);
    }
}
