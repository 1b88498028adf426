//! The cluster: openraft between [`Cluster::write`] and
//! [`state_machine::apply`], in three pieces after openraft's examples:
//! [`log_store`] (the log on sled), [`raft_sm`] (the state machine around
//! `apply`, snapshots), [`network`] (tonic RPCs and the `Peer` service).
//! [`table`] is the session table as routing reads it, [`forward`] the
//! stanza path between nodes, [`membership`] bootstrap, join and node-down.
//!
//! XMPP code only calls `write(Command)` and reads through [`Store`] and
//! [`SessionTable`]; it never sees log indexes or Raft types (STYLE.md).

pub mod combine;
pub mod exec;
pub mod forward;
pub mod log_store;
pub mod membership;
pub mod network;
pub mod peer_tls;
pub mod raft_sm;
pub mod service;
pub mod state_machine;
pub mod table;

use std::io::Cursor;
use std::sync::Arc;
use std::time::Duration;

use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use state_machine::{ApplyError, Command, Effect, Outcome, Response};
use tokio::sync::{mpsc, watch};

use crate::config::Config;
use crate::store::{Store, StoreError};
use network::{Channels, Contacts};
use table::SessionTable;

openraft::declare_raft_types!(
    /// The Raft types of this cluster: commands in, outcomes out.
    pub TypeConfig:
        D = Command,
        R = Outcome,
);

pub type Raft = openraft::Raft<TypeConfig>;

#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("cannot open the Raft log: {0}")]
    Log(#[from] sled::Error),
    #[error("cannot start Raft: {0}")]
    Raft(String),
    #[error(transparent)]
    Tls(#[from] peer_tls::TlsFileError),
}

pub struct Cluster {
    pub id: u64,
    /// Random per process start (see `SessionEntry::incarnation`).
    pub incarnation: u64,
    pub raft: Raft,
    store: Store,
    log: log_store::LogStore,
    pub table: Arc<SessionTable>,
    applied: watch::Receiver<u64>,
    pub channels: Arc<Channels>,
    /// Concurrent writes grouped into shared log entries.
    pub combiner: combine::Combiner,
    /// Mutual TLS between nodes, when configured.
    pub tls: Option<peer_tls::PeerTls>,
    pub contacts: Arc<Contacts>,
    pub forwarder: forward::Forwarder,
    write_timeout: Duration,
    /// Removed from the cluster by the leader and not taken back in: no
    /// write can commit here, so writes fail at once.
    removed: std::sync::atomic::AtomicBool,
}

/// What the node consumes from the cluster: effects of applied entries
/// and stanzas that could not be forwarded.
pub struct Feeds {
    pub effects: mpsc::UnboundedReceiver<Effect>,
    pub returned: mpsc::UnboundedReceiver<proto::Forwarded>,
}

impl Cluster {
    pub async fn open(config: &Config, store: Store) -> Result<(Cluster, Feeds), ClusterError> {
        let dir = &config.data_dir;
        let log = log_store::LogStore::open(&dir.join("raft"))?;
        let table = Arc::new(SessionTable::default());
        let (effects_tx, effects) = mpsc::unbounded_channel();
        let (applied_tx, applied) = watch::channel(0);
        let sm = raft_sm::StateMachine::new(
            store.clone(),
            table.clone(),
            effects_tx,
            applied_tx,
            dir.join("snapshot.bin"),
        )?;
        let c = &config.cluster;
        let raft_config = openraft::Config {
            cluster_name: "xmpp".into(),
            heartbeat_interval: c.heartbeat_ms,
            election_timeout_min: c.election_timeout_ms,
            election_timeout_max: c.election_timeout_ms * 2,
            install_snapshot_timeout: 10_000,
            snapshot_policy: openraft::SnapshotPolicy::LogsSinceLast(c.snapshot_every),
            max_in_snapshot_log_to_keep: c.snapshot_every / 10,
            ..Default::default()
        }
        .validate()
        .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let tls = peer_tls::PeerTls::load(c)?;
        let channels = Arc::new(Channels::new(
            c.addr.ip(),
            tls.as_ref().map(|t| t.client.clone()),
        ));
        let contacts = Arc::new(Contacts::default());
        let net = network::Network {
            channels: channels.clone(),
            contacts: contacts.clone(),
        };
        let raft = Raft::new(config.node_id, Arc::new(raft_config), net, log.clone(), sm)
            .await
            .map_err(|e| ClusterError::Raft(e.to_string()))?;
        let (returned_tx, returned) = mpsc::unbounded_channel();
        let combiner = combine::Combiner::new(raft.clone());
        let cluster = Cluster {
            id: config.node_id,
            incarnation: rand::random::<u64>() | 1,
            raft,
            store,
            log,
            table,
            applied,
            forwarder: forward::Forwarder::new(config.node_id, channels.clone(), returned_tx),
            combiner,
            channels,
            tls,
            contacts,
            write_timeout: c.write_timeout(),
            removed: std::sync::atomic::AtomicBool::new(false),
        };
        Ok((cluster, Feeds { effects, returned }))
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn applied_index(&self) -> u64 {
        *self.applied.borrow()
    }

    /// The highest log index this node knows to be committed.
    pub fn committed_index(&self) -> u64 {
        self.log.committed_index()
    }

    /// The leader as this node last heard, and its address.
    pub fn leader(&self) -> Option<(u64, String)> {
        let m = self.raft.metrics();
        let m = m.borrow();
        let id = m.current_leader?;
        let addr = m
            .membership_config
            .membership()
            .get_node(&id)
            .map(|n| n.addr.clone())?;
        Some((id, addr))
    }

    /// A stanza that cannot be forwarded goes to the local rules.
    pub fn returned(&self, f: proto::Forwarded) {
        self.forwarder.give_back(f);
    }

    /// The address of member `node`.
    pub fn addr_of(&self, node: u64) -> Option<String> {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.membership_config
            .membership()
            .get_node(&node)
            .map(|n| n.addr.clone())
    }

    /// Commits a command and returns its outcome once this node has applied
    /// it (read-your-writes). Without a quorum this fails within the
    /// configured write timeout with [`ApplyError::Unavailable`].
    pub async fn write(&self, cmd: Command) -> Result<Response, ApplyError> {
        self.write_with(cmd, true).await
    }

    /// A write this node decided as the leader, on what only the leader
    /// knows (which members answer it): committed by this node while it
    /// leads, never handed to a successor, who must decide for itself. (A
    /// cut-off leader's `NodeDown` for the members it could not reach,
    /// forwarded to the new leader after the partition heals, would drop
    /// the sessions of healthy nodes.)
    pub async fn write_as_leader(&self, cmd: Command) -> Result<Response, ApplyError> {
        self.write_with(cmd, false).await
    }

    /// This node was removed from the cluster (`true`), or taken back in.
    pub fn set_removed(&self, removed: bool) {
        let was = self
            .removed
            .swap(removed, std::sync::atomic::Ordering::AcqRel);
        match (was, removed) {
            (false, true) => tracing::warn!(
                "this node was removed from the cluster: writes and logins fail here until it is taken back in (`clusterctl join`) or stopped"
            ),
            (true, false) => tracing::info!("this node was taken back into the cluster"),
            _ => {}
        }
    }

    pub fn is_removed(&self) -> bool {
        self.removed.load(std::sync::atomic::Ordering::Acquire)
    }

    async fn write_with(&self, cmd: Command, forward: bool) -> Result<Response, ApplyError> {
        if self.is_removed() {
            return Err(ApplyError::Unavailable(
                "this node was removed from the cluster; connect to a member (`clusterctl status` there lists them)".into(),
            ));
        }
        let deadline = tokio::time::Instant::now() + self.write_timeout;
        let unavailable = || {
            ApplyError::Unavailable(format!(
                "no quorum: the write was not committed within {} ms (are a majority of the members up and reachable? `clusterctl status`)",
                self.write_timeout.as_millis()
            ))
        };
        let (index, outcome) = tokio::time::timeout_at(deadline, self.commit(cmd, forward))
            .await
            .map_err(|_| unavailable())??;
        let mut applied = self.applied.clone();
        tokio::time::timeout_at(deadline, applied.wait_for(|a| *a >= index))
            .await
            .map_err(|_| unavailable())?
            .map_err(|_| ApplyError::Unavailable("the state machine stopped".into()))?;
        outcome.map_err(ApplyError::from)
    }

    async fn commit(&self, cmd: Command, forward: bool) -> Result<(u64, Outcome), ApplyError> {
        let mut backoff = Duration::from_millis(10);
        loop {
            // Known to be a follower: straight to the leader, which groups
            // it with the others (asking our own Raft first costs a round
            // through the combiner for the same answer).
            if forward {
                if let Some((_, addr)) = self.leader().filter(|(l, _)| *l != self.id) {
                    if let Some(r) =
                        service::forward_write(&self.channels, &node(&addr), &cmd).await?
                    {
                        return Ok(r);
                    }
                }
            }
            match self.combiner.client_write(cmd.clone()).await {
                Ok(r) => return Ok(r),
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) if !forward => {
                    return Err(ApplyError::Unavailable(
                        "this node is not the leader any more".into(),
                    ))
                }
                Err(RaftError::APIError(ClientWriteError::ForwardToLeader(f))) => {
                    if let Some(node) = f.leader_node {
                        if let Some(r) = service::forward_write(&self.channels, &node, &cmd).await?
                        {
                            return Ok(r);
                        }
                    }
                }
                Err(RaftError::APIError(e)) => return Err(ApplyError::Unavailable(e.to_string())),
                Err(RaftError::Fatal(e)) => return Err(ApplyError::Unavailable(e.to_string())),
            }
            // No leader known yet, or it moved: ask again shortly.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(200));
        }
    }

    /// Waits until this node has applied what the leader had committed when
    /// asked (Raft's read index), so a read here sees every write
    /// acknowledged anywhere before it: an account made through node 1
    /// logs in on node 2, a roster set on node 1 is in node 2's next roster
    /// get. The leader needs no round trip, only to have applied what it
    /// committed (a new leader may not have yet). Bounded by the write timeout; a node with no leader
    /// reads what it has (and refuses logins on its own, see `has_quorum`).
    pub async fn read_barrier(&self) {
        if self.is_removed() {
            // Nothing will reach it: read what it has, and let the quorum
            // check refuse.
            return;
        }
        let wait = async {
            loop {
                // Asked again when the node we took for the leader is not
                // (any more): our view of the leader may lag an election.
                let Some((leader, addr)) = self.leader() else {
                    return;
                };
                if leader == self.id {
                    // Just elected, a leader may have committed entries it
                    // has not applied yet (those of its predecessor).
                    if let Ok((Some(read), _)) = self.raft.get_read_log_id().await {
                        let mut applied = self.applied.clone();
                        let _ = applied.wait_for(|a| *a >= read.index).await;
                    }
                    return;
                }
                let index = match self.channels.get(&addr) {
                    Ok(mut client) => client
                        .read_index(proto::ReadIndexRequest {})
                        .await
                        .map(|r| r.into_inner().index),
                    Err(e) => Err(tonic::Status::unavailable(e.to_string())),
                };
                if let Ok(index) = index {
                    let mut applied = self.applied.clone();
                    let _ = applied.wait_for(|a| *a >= index).await;
                    return;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        if tokio::time::timeout(self.write_timeout, wait)
            .await
            .is_err()
        {
            tracing::warn!("read barrier timed out; reading local state");
        }
    }

    /// Whether this node currently knows a leader that heard from a quorum.
    pub fn has_quorum(&self) -> bool {
        if self.is_removed() {
            return false;
        }
        let m = self.raft.metrics();
        let m = m.borrow();
        let limit = self.write_timeout.as_millis() as u64;
        match m.current_leader {
            None => false,
            // A leader knows when a quorum last acknowledged it.
            Some(l) if l == self.id => m.millis_since_quorum_ack.is_some_and(|ms| ms < limit),
            Some(_) => true,
        }
    }

    /// Stops Raft and flushes both databases.
    pub async fn shutdown(&self) -> Result<(), StoreError> {
        let _ = self.raft.shutdown().await;
        self.store.flush().await?;
        self.log.flush().await?;
        Ok(())
    }
}

/// The node entry of a member at `addr`.
pub fn node(addr: &str) -> BasicNode {
    BasicNode {
        addr: addr.to_owned(),
    }
}
