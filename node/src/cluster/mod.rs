//! The cluster: today a cluster of one, applying commands locally in log
//! order; the Raft issue puts openraft between [`Cluster::write`] and
//! [`state_machine::apply`] without changing either side.
//!
//! XMPP code only calls `write(Command)` and reads through [`Store`]; it
//! never sees log indexes or Raft types (STYLE.md, openraft examples).

pub mod state_machine;

use std::sync::atomic::{AtomicU64, Ordering};

use state_machine::{apply, ApplyError, Command, Response};

use crate::store::{Store, StoreError};

pub struct Cluster {
    store: Store,
    /// Serialises `apply`, as the Raft log will.
    log: tokio::sync::Mutex<u64>,
    last_applied: AtomicU64,
}

impl Cluster {
    pub fn open(store: Store) -> Result<Cluster, StoreError> {
        let applied = store.applied_index()?;
        Ok(Cluster {
            store,
            log: tokio::sync::Mutex::new(applied),
            last_applied: AtomicU64::new(applied),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn applied_index(&self) -> u64 {
        self.last_applied.load(Ordering::Relaxed)
    }

    /// Commits a command and returns its outcome once it is durable.
    pub async fn write(&self, cmd: Command) -> Result<Response, ApplyError> {
        let result = {
            let mut index = self.log.lock().await;
            *index += 1;
            let r = apply(&self.store, *index, cmd);
            self.last_applied.store(*index, Ordering::Relaxed);
            r
        };
        // Flushed outside the lock: concurrent writers share one flush, and
        // nobody is told "done" before their write is on disk.
        self.store.flush().await?;
        result
    }
}
