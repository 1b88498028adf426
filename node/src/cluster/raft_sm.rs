//! openraft's state machine around [`state_machine::apply_entry`]: applies
//! committed entries in order, records the applied log id and membership
//! in the same atomic batch as the entry's writes, builds and installs
//! snapshots of the whole state tree.
//!
//! A store fault while applying stops the process with a clear log line:
//! skipping an entry, or recording it as applied with an error, would make
//! this replica diverge from the others (DESIGN.md, "The cluster in code").

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use openraft::storage::{RaftStateMachine, Snapshot};
use openraft::{
    BasicNode, Entry, EntryPayload, LogId, RaftSnapshotBuilder, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};

use super::state_machine::{self, Effect, Outcome};
use super::table::SessionTable;
use super::TypeConfig;
use crate::store::{keys, Store, StoreError};

type NodeId = u64;
type Membership = StoredMembership<NodeId, BasicNode>;

/// A snapshot as kept on disk and sent to a lagging node.
#[derive(Serialize, Deserialize)]
struct SnapshotFile {
    meta: SnapshotMeta<NodeId, BasicNode>,
    /// Every key and value of the state tree.
    pairs: Vec<(Vec<u8>, Vec<u8>)>,
}

pub struct StateMachine {
    store: Store,
    table: Arc<SessionTable>,
    effects: mpsc::UnboundedSender<Effect>,
    applied: watch::Sender<u64>,
    snapshot_path: PathBuf,
    current: Current,
}

/// The latest snapshot: its meta (decoded once) and its encoded file.
type Current = Arc<Mutex<Option<(SnapshotMeta<NodeId, BasicNode>, Vec<u8>)>>>;

/// A fault in this node's own storage: logged, then the process stops.
pub(crate) fn fatal(what: &str, e: &dyn std::fmt::Display) -> ! {
    tracing::error!(error = %e, "{what}: local storage fault; stopping this node so its replica cannot diverge (restart it once the disk is fixed; it catches up from the others)");
    std::process::exit(70)
}

fn sm_err(e: impl std::error::Error + 'static) -> StorageError<NodeId> {
    StorageIOError::read_state_machine(&e).into()
}

impl StateMachine {
    pub fn new(
        store: Store,
        table: Arc<SessionTable>,
        effects: mpsc::UnboundedSender<Effect>,
        applied: watch::Sender<u64>,
        snapshot_path: PathBuf,
    ) -> Result<StateMachine, StoreError> {
        table.reset(store.sessions()?);
        // A snapshot that does not decode is ignored: the leader sends a
        // new one, or this node builds one, when it is needed.
        let current = std::fs::read(&snapshot_path).ok().and_then(|d| {
            postcard::from_bytes::<SnapshotFile>(&d)
                .ok()
                .map(|f| (f.meta, d))
        });
        let sm = StateMachine {
            store,
            table,
            effects,
            applied,
            snapshot_path,
            current: Arc::new(Mutex::new(current)),
        };
        let (last, _) = sm.position()?;
        sm.applied.send_replace(last.map_or(0, |l| l.index));
        Ok(sm)
    }

    fn position(&self) -> Result<(Option<LogId<NodeId>>, Membership), StoreError> {
        let last = match self.store.get(keys::APPLIED_LOG)? {
            Some(b) => postcard::from_bytes(&b)?,
            None => None,
        };
        let membership = match self.store.get(keys::MEMBERSHIP)? {
            Some(b) => postcard::from_bytes(&b)?,
            None => Membership::default(),
        };
        Ok((last, membership))
    }

    /// Applies openraft's entries as one batch, then publishes their
    /// effects and the applied index, in log order.
    fn apply_all(&self, entries: Vec<Entry<TypeConfig>>) -> Vec<Outcome> {
        let mut indexes = Vec::with_capacity(entries.len());
        let items = entries
            .into_iter()
            .map(|entry| {
                let log_id = Some(entry.log_id);
                indexes.push(entry.log_id.index);
                let mut meta = vec![(
                    keys::APPLIED_LOG,
                    postcard::to_allocvec(&log_id).unwrap_or_default(),
                )];
                let cmd = match entry.payload {
                    EntryPayload::Blank => None,
                    EntryPayload::Normal(cmd) => Some(cmd),
                    EntryPayload::Membership(m) => {
                        let stored = Membership::new(log_id, m);
                        meta.push((
                            keys::MEMBERSHIP,
                            postcard::to_allocvec(&stored).unwrap_or_default(),
                        ));
                        None
                    }
                };
                (meta, cmd)
            })
            .collect();
        let results = match state_machine::apply_entries(&self.store, items) {
            Ok(r) => r,
            Err(e) => fatal("applying committed entries", &e),
        };
        let mut outcomes = Vec::with_capacity(results.len());
        for ((outcome, effects), index) in results.into_iter().zip(indexes) {
            for effect in effects {
                if let Effect::SessionChanged { jid, entry } = &effect {
                    self.table.set(jid, *entry);
                } else {
                    let _ = self.effects.send(effect);
                }
            }
            self.applied.send_replace(index);
            outcomes.push(outcome);
        }
        outcomes
    }
}

pub struct Builder {
    data: Vec<u8>,
    meta: SnapshotMeta<NodeId, BasicNode>,
    path: PathBuf,
    current: Current,
}

impl RaftSnapshotBuilder<TypeConfig> for Builder {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        // Written to a temporary file and renamed: a crash leaves the old
        // snapshot or the new one, never half of one.
        let tmp = self.path.with_extension("tmp");
        let data = std::mem::take(&mut self.data);
        let written = tokio::fs::write(&tmp, &data).await;
        if let Err(e) = written.and(tokio::fs::rename(&tmp, &self.path).await) {
            return Err(StorageIOError::write_snapshot(Some(self.meta.signature()), &e).into());
        }
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) =
            Some((self.meta.clone(), data.clone()));
        Ok(Snapshot {
            meta: self.meta.clone(),
            snapshot: Box::new(Cursor::new(data)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Builder;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, Membership), StorageError<NodeId>> {
        self.position().map_err(sm_err)
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Outcome>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry<TypeConfig>> + openraft::OptionalSend,
        I::IntoIter: openraft::OptionalSend,
    {
        Ok(self.apply_all(entries.into_iter().collect()))
    }

    async fn get_snapshot_builder(&mut self) -> Builder {
        // Taken here, between applies, so the dump is exactly the state at
        // the applied position; flushed first, because the log before this
        // point may be purged once the snapshot exists.
        if let Err(e) = self.store.flush().await {
            fatal("flushing the state before a snapshot", &e);
        }
        let (pairs, (last, membership)) = match (self.store.dump(), self.position()) {
            (Ok(p), Ok(pos)) => (p, pos),
            (Err(e), _) | (_, Err(e)) => fatal("reading the state for a snapshot", &e),
        };
        let meta = SnapshotMeta {
            last_log_id: last,
            last_membership: membership,
            snapshot_id: format!(
                "{}-{}",
                last.map_or(0, |l| l.leader_id.term),
                last.map_or(0, |l| l.index)
            ),
        };
        let file = SnapshotFile {
            meta: meta.clone(),
            pairs,
        };
        Builder {
            data: postcard::to_allocvec(&file).unwrap_or_default(),
            meta,
            path: self.snapshot_path.clone(),
            current: self.current.clone(),
        }
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, BasicNode>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let data = snapshot.into_inner();
        let file: SnapshotFile = postcard::from_bytes(&data)
            .map_err(|e| StorageIOError::read_snapshot(Some(meta.signature()), &e))?;
        if let Err(e) = self.store.replace_all(file.pairs) {
            fatal("installing a snapshot", &e);
        }
        if let Err(e) = self.store.flush().await {
            fatal("flushing an installed snapshot", &e);
        }
        match self.store.sessions() {
            Ok(s) => self.table.reset(s),
            Err(e) => fatal("reading the installed session table", &e),
        }
        let _ = tokio::fs::write(&self.snapshot_path, &data).await;
        *self.current.lock().unwrap_or_else(|p| p.into_inner()) = Some((meta.clone(), data));
        self.applied
            .send_replace(meta.last_log_id.map_or(0, |l| l.index));
        tracing::info!(snapshot = %meta.snapshot_id, "installed a snapshot from the leader");
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let data = self
            .current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        Ok(data.map(|(meta, data)| Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(data)),
        }))
    }
}
