//! openraft's log storage on sled (after openraft's `raft-kv-rocksdb`
//! example): entries by index, the vote, the committed id and the last
//! purged id.
//!
//! The log has a sled database of its own, apart from the state machine's.
//! sled 0.34 can deadlock when an `apply_batch` and a flush of the same
//! database run at once (see `Store::open`); with two databases the log's
//! flushes and the state machine's batches never meet, and each database
//! is only ever written from one task at a time.
//!
//! `append` reports an entry flushed only after a flush that began after
//! the entry was written returned (`flush`, below): that is what makes an
//! acknowledged write survive kill -9. The flushes run in a task of their
//! own (group commit): `append` writes and returns, the flusher takes
//! every callback waiting, flushes once, and completes them all in order.
//! Writes and flushes never overlap (the `io` lock), the rule sled 0.34
//! needs.

// openraft's trait methods return its `StorageError` (over 200 bytes);
// the helpers here return the same type rather than convert twice.
#![allow(clippy::result_large_err)]

use std::fmt::Debug;
use std::ops::RangeBounds;
use std::path::Path;
use std::sync::Arc;

use tokio::sync::mpsc;

use openraft::storage::{LogFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{Entry, LogId, OptionalSend, StorageError, StorageIOError, Vote};

use super::TypeConfig;

type NodeId = u64;

const VOTE: &[u8] = b"vote";
const COMMITTED: &[u8] = b"committed";
const PURGED: &[u8] = b"purged";

#[derive(Clone)]
pub struct LogStore {
    db: sled::Db,
    log: sled::Tree,
    meta: sled::Tree,
    /// Held while writing and while flushing: they never run at once.
    io: Arc<tokio::sync::Mutex<()>>,
    /// Appended entries waiting for the flusher.
    flushes: mpsc::UnboundedSender<LogFlushed<TypeConfig>>,
}

fn read_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_logs(&e).into()
}

fn write_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::write_logs(&e).into()
}

impl LogStore {
    /// Opens the log and starts its flusher (inside a tokio runtime).
    pub fn open(dir: &Path) -> Result<LogStore, sled::Error> {
        let db = sled::Config::new().path(dir).flush_every_ms(None).open()?;
        let io = Arc::new(tokio::sync::Mutex::new(()));
        let (flushes, rx) = mpsc::unbounded_channel();
        tokio::spawn(flusher(db.clone(), io.clone(), rx));
        Ok(LogStore {
            log: db.open_tree("log")?,
            meta: db.open_tree("meta")?,
            db,
            io,
            flushes,
        })
    }

    /// Writes a batch to a tree, never during a flush.
    async fn write(&self, tree: &sled::Tree, batch: sled::Batch) -> Result<(), sled::Error> {
        let _io = self.io.lock().await;
        tree.apply_batch(batch)
    }

    /// Flushes now, never during a write.
    async fn flush_now(&self) -> Result<(), sled::Error> {
        let _io = self.io.lock().await;
        flush(&self.db).await
    }

    fn get_meta<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, StorageError<NodeId>> {
        match self.meta.get(key).map_err(read_err)? {
            Some(b) => Ok(Some(postcard::from_bytes(&b).map_err(read_err)?)),
            None => Ok(None),
        }
    }

    /// The committed index as last saved (0 before any), read for
    /// `/metrics` and `/readyz`: openraft 0.9's metrics do not carry it.
    pub fn committed_index(&self) -> u64 {
        self.get_meta::<Option<LogId<NodeId>>>(COMMITTED)
            .ok()
            .flatten()
            .flatten()
            .map_or(0, |l| l.index)
    }

    async fn put_meta<T: serde::Serialize>(
        &self,
        key: &[u8],
        value: &T,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = postcard::to_allocvec(value).map_err(write_err)?;
        let mut batch = sled::Batch::default();
        batch.insert(key, bytes);
        self.write(&self.meta, batch).await.map_err(write_err)?;
        self.flush_now().await.map_err(write_err)?;
        Ok(())
    }

    fn last_entry_id(&self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        match self.log.last().map_err(read_err)? {
            Some((_, v)) => {
                let e: Entry<TypeConfig> = postcard::from_bytes(&v).map_err(read_err)?;
                Ok(Some(e.log_id))
            }
            None => Ok(None),
        }
    }

    /// Flushes the log database (at shutdown).
    pub async fn flush(&self) -> Result<(), sled::Error> {
        self.flush_now().await
    }
}

/// Flushes `db` on a thread of tokio's blocking pool. sled's own
/// `flush_async` runs the flush on sled's I/O pool, which wakes every
/// idle thread of that pool (seven at least) for each job it is given,
/// and the flush then gives it another one (the log buffer's write):
/// this way there is one herd a flush instead of two.
async fn flush(db: &sled::Db) -> Result<(), sled::Error> {
    let db = db.clone();
    match tokio::task::spawn_blocking(move || db.flush()).await {
        Ok(r) => r.map(|_| ()),
        Err(e) => Err(sled::Error::ReportableBug(format!(
            "the Raft log's flush did not finish: {e}"
        ))),
    }
}

/// Group commit: one flush for every append waiting when it starts.
async fn flusher(
    db: sled::Db,
    io: Arc<tokio::sync::Mutex<()>>,
    mut rx: mpsc::UnboundedReceiver<LogFlushed<TypeConfig>>,
) {
    while let Some(first) = rx.recv().await {
        let mut waiting = vec![first];
        while let Ok(more) = rx.try_recv() {
            waiting.push(more);
        }
        // Every entry of `waiting` was written before its callback was
        // queued, so before this flush begins.
        let result = {
            let _io = io.lock().await;
            flush(&db).await
        };
        // An entry that may not be on disk must never count as appended
        // (a quorum could commit what this node then forgets): stop.
        if let Err(e) = &result {
            super::raft_sm::fatal("flushing the Raft log", e);
        }
        for callback in waiting {
            callback.log_io_completed(
                result
                    .as_ref()
                    .map(|_| ())
                    .map_err(|e| std::io::Error::other(e.to_string())),
            );
        }
    }
}

fn key(index: u64) -> [u8; 8] {
    index.to_be_bytes()
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry<TypeConfig>>, StorageError<NodeId>> {
        use std::ops::Bound;
        let start = match range.start_bound() {
            Bound::Included(i) => *i,
            Bound::Excluded(i) => i.saturating_add(1),
            Bound::Unbounded => 0,
        };
        let mut out = Vec::new();
        for kv in self.log.range(key(start)..) {
            let (k, v) = kv.map_err(read_err)?;
            let index = <[u8; 8]>::try_from(k.as_ref())
                .map(u64::from_be_bytes)
                .unwrap_or(u64::MAX);
            if !range.contains(&index) {
                break;
            }
            out.push(postcard::from_bytes(&v).map_err(read_err)?);
        }
        Ok(out)
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = LogStore;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let last_purged_log_id: Option<LogId<NodeId>> = self.get_meta(PURGED)?;
        let last_log_id = self.last_entry_id()?.or(last_purged_log_id);
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        self.put_meta(VOTE, vote)
            .await
            .map_err(|e| StorageIOError::write_vote(&e).into())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        self.get_meta(VOTE)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Not flushed on its own: losing it only makes a restarted node
        // learn the commit point from the leader again.
        // A plain insert, not a batch: sled seals (and syncs) its log
        // buffer for every batch, and this runs once per commit.
        let bytes = postcard::to_allocvec(&committed).map_err(write_err)?;
        let _io = self.io.lock().await;
        self.meta.insert(COMMITTED, bytes).map_err(write_err)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.get_meta::<Option<LogId<NodeId>>>(COMMITTED)?.flatten())
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        // Plain inserts, not a batch: a sled batch seals and syncs its log
        // buffer twice, while the flusher syncs once for every append
        // waiting. No atomicity is lost: sled recovers its log in order, so
        // a crash keeps a prefix of these entries, and none of them was
        // acknowledged before the flush.
        {
            let _io = self.io.lock().await;
            for e in entries {
                let bytes = postcard::to_allocvec(&e).map_err(write_err)?;
                self.log
                    .insert(key(e.log_id.index), bytes)
                    .map_err(write_err)?;
            }
        }
        // The flusher completes the callback once this batch is on disk;
        // if it is gone the process is stopping and the entry unacknowledged.
        let _ = self.flushes.send(callback);
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut batch = sled::Batch::default();
        for k in self.log.range(key(log_id.index)..).keys() {
            batch.remove(k.map_err(write_err)?);
        }
        self.write(&self.log, batch).await.map_err(write_err)?;
        self.flush_now().await.map_err(write_err)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        // The purge mark first: a crash between the two steps leaves
        // entries the mark already says are gone, which is harmless.
        self.put_meta(PURGED, &log_id).await?;
        let mut batch = sled::Batch::default();
        for k in self.log.range(..=key(log_id.index)).keys() {
            batch.remove(k.map_err(write_err)?);
        }
        self.write(&self.log, batch).await.map_err(write_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use openraft::{EntryPayload, Membership};
    use std::collections::BTreeSet;

    fn entry(index: u64, payload: EntryPayload<TypeConfig>) -> Entry<TypeConfig> {
        Entry {
            log_id: LogId::new(openraft::CommittedLeaderId::new(1, 1), index),
            payload,
        }
    }

    /// The log keeps openraft's entries (commands and membership) through
    /// postcard, reads ranges back, truncates and purges.
    #[tokio::test]
    async fn entries_round_trip_truncate_and_purge() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut log = LogStore::open(dir.path()).expect("open");
        let members = Membership::new(vec![BTreeSet::from([1u64, 2, 3])], None);
        let entries = vec![
            entry(1, EntryPayload::Blank),
            entry(2, EntryPayload::Membership(members.clone())),
            entry(
                3,
                EntryPayload::Normal(super::super::state_machine::Command::NodeDown { node: 2 }),
            ),
            entry(4, EntryPayload::Blank),
        ];
        let mut batch = sled::Batch::default();
        for e in &entries {
            batch.insert(
                &key(e.log_id.index),
                postcard::to_allocvec(e).expect("encode"),
            );
        }
        log.log.apply_batch(batch).expect("append");
        let got = log.try_get_log_entries(2..4).await.expect("read");
        assert_eq!(got.len(), 2);
        assert!(matches!(&got[0].payload, EntryPayload::Membership(m) if *m == members));
        assert!(matches!(&got[1].payload, EntryPayload::Normal(_)));
        log.truncate(entries[3].log_id).await.expect("truncate");
        assert_eq!(
            log.get_log_state()
                .await
                .expect("state")
                .last_log_id
                .map(|l| l.index),
            Some(3)
        );
        log.purge(entries[1].log_id).await.expect("purge");
        let state = log.get_log_state().await.expect("state");
        assert_eq!(state.last_purged_log_id.map(|l| l.index), Some(2));
        assert_eq!(log.try_get_log_entries(0..10).await.expect("read").len(), 1);
        let vote = Vote::new(3, 2);
        log.save_vote(&vote).await.expect("vote");
        assert_eq!(log.read_vote().await.expect("vote"), Some(vote));
    }
}
