//! Bootstrap, join and node-down detection (DESIGN.md, "Cluster
//! membership and operations").
//!
//! - A node with an empty log and no `join` addresses starts a cluster of
//!   one with itself as the only voter.
//! - A node with `join` addresses asks them in turn, with backoff, until
//!   the leader has added it (learner, caught up, then voter). Names that
//!   do not resolve yet are simply retried.
//! - Every start commits `NodeUp` with a fresh incarnation: the sessions of
//!   this node's earlier life leave the table.
//! - The leader commits `NodeDown` for a member that has sessions in the
//!   table and has not answered for `node_down_grace_secs`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::service::request_join;
use super::state_machine::Command;
use super::{node, Raft};
use crate::Server;

pub fn start(server: Arc<Server>) {
    tokio::spawn(watch_members(server.clone()));
    tokio::spawn(async move {
        let cluster = &server.cluster;
        let c = &server.config.cluster;
        let advertised = c.advertised();
        let initialized = cluster.raft.is_initialized().await.unwrap_or(false);
        if !initialized {
            if c.join.is_empty() {
                let mut members = BTreeMap::new();
                members.insert(cluster.id, node(&advertised));
                match cluster.raft.initialize(members).await {
                    Ok(()) => {
                        tracing::info!(node = cluster.id, addr = %advertised, "started a new cluster of one")
                    }
                    Err(e) => tracing::error!(error = %e, "cannot initialise the cluster"),
                }
            } else {
                join(&server, &c.join, &advertised).await;
            }
        }
        announce(&server).await;
    });
}

async fn join(server: &Server, via: &[String], advertised: &str) {
    let cluster = &server.cluster;
    let mut backoff = Duration::from_millis(200);
    loop {
        for addr in via {
            match request_join(&cluster.channels, addr, cluster.id, advertised).await {
                Ok(r) => {
                    tracing::info!(via = %addr, members = ?r.members, "joined the cluster");
                    return;
                }
                Err(e) => {
                    tracing::warn!(via = %addr, error = %e.message(), "cannot join through this member yet; retrying")
                }
            }
            if *server.shutdown.borrow() {
                return;
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

/// Commits `NodeUp` for this incarnation, retrying until it is committed.
async fn announce(server: &Server) {
    let cluster = &server.cluster;
    loop {
        let cmd = Command::NodeUp {
            node: cluster.id,
            incarnation: cluster.incarnation,
        };
        match cluster.write(cmd).await {
            Ok(_) => {
                tracing::info!(node = cluster.id, "node is up in the cluster");
                return;
            }
            Err(e) => tracing::warn!(error = %e, "cannot announce this node yet; retrying"),
        }
        if *server.shutdown.borrow() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// On the leader: members that stopped answering lose their sessions.
async fn watch_members(server: Arc<Server>) {
    let grace = Duration::from_secs(server.config.cluster.node_down_grace_secs);
    let mut leader_since: Option<Instant> = None;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    loop {
        tick.tick().await;
        if *server.shutdown.borrow() {
            return;
        }
        let cluster = &server.cluster;
        let raft: &Raft = &cluster.raft;
        let m = raft.metrics().borrow().clone();
        if m.current_leader != Some(cluster.id) {
            leader_since = None;
            continue;
        }
        let since = *leader_since.get_or_insert_with(Instant::now);
        // A leader the majority has not acknowledged within the grace
        // period is the one cut off: it must not even propose.
        let heard = m
            .millis_since_quorum_ack
            .is_some_and(|ms| u128::from(ms) < grace.as_millis());
        if !heard {
            continue;
        }
        for (id, _) in m.membership_config.membership().nodes() {
            if *id == cluster.id || !cluster.table.has_node(*id) {
                continue;
            }
            let silent = match cluster.contacts.since(*id) {
                Some(d) => d > grace,
                None => since.elapsed() > grace,
            };
            if silent {
                tracing::warn!(
                    node = id,
                    grace_secs = grace.as_secs(),
                    "member stopped answering; marking it down and dropping its sessions"
                );
                if let Err(e) = cluster
                    .write_as_leader(Command::NodeDown { node: *id })
                    .await
                {
                    tracing::warn!(node = id, error = %e, "cannot commit NodeDown yet");
                }
            }
        }
    }
}
