//! Bootstrap, join and node-down detection (DESIGN.md, "Cluster
//! membership and operations").
//!
//! - A node with an empty log and no `join` addresses starts a cluster of
//!   one with itself as the only voter.
//! - A node with `join` addresses asks them in turn, with backoff, until
//!   the leader has added it (learner, caught up, then voter). Names that
//!   do not resolve yet are simply retried. The leader lets a node whose
//!   address another member still has replace that member (a pod back
//!   with an empty volume).
//! - When the first `join` address is the node's own (pod 0 of a
//!   StatefulSet, whose pods all get the same list), a node with an empty
//!   log that finds, for `bootstrap_wait_secs`, no listed peer that belongs
//!   to a cluster starts one; any peer that does (even one that has no
//!   leader at the moment) makes it wait and join instead, so it never
//!   splits a cluster that exists.
//! - The leader removes a silent member whose advertised DNS name has not
//!   resolved for `remove_unresolvable_after_secs`: on Kubernetes a pod's
//!   name goes with the pod, so a scale-down needs no operator.
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
            } else if c.join.first() == Some(&advertised) {
                join_or_bootstrap(&server, &c.join[1..], &advertised).await;
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

/// Pod 0: joins a listed peer's cluster if there is one; starts one when,
/// for `bootstrap_wait_secs`, every peer either cannot be reached or says
/// it belongs to none.
async fn join_or_bootstrap(server: &Server, peers: &[String], advertised: &str) {
    let cluster = &server.cluster;
    let wait = Duration::from_secs(server.config.cluster.bootstrap_wait_secs);
    let started = Instant::now();
    let mut backoff = Duration::from_millis(200);
    loop {
        let mut a_cluster_exists = false;
        for addr in peers {
            match request_join(&cluster.channels, addr, cluster.id, advertised).await {
                Ok(r) => {
                    tracing::info!(via = %addr, members = ?r.members, "joined the cluster");
                    return;
                }
                Err(e) if e.message().starts_with(super::service::FROM_MEMBER) => {
                    a_cluster_exists = true;
                    tracing::warn!(via = %addr, error = %e.message(), "a peer that belongs to a cluster cannot admit this node yet; retrying");
                }
                // Belongs to none, or cannot be reached (not resolvable
                // yet, not listening yet): no cluster to split from there.
                Err(e) => {
                    tracing::debug!(via = %addr, error = %e.message(), "no cluster through this peer")
                }
            }
            if *server.shutdown.borrow() {
                return;
            }
        }
        if !a_cluster_exists && started.elapsed() >= wait {
            let mut members = BTreeMap::new();
            members.insert(cluster.id, node(advertised));
            match cluster.raft.initialize(members).await {
                Ok(()) => tracing::info!(
                    node = cluster.id,
                    addr = %advertised,
                    waited_secs = wait.as_secs(),
                    "no listed peer belongs to a cluster: started a new one"
                ),
                Err(e) => tracing::error!(error = %e, "cannot initialise the cluster"),
            }
            return;
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
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

/// Asks voter `id` to stand for election and waits (up to 5 s) until it
/// leads: how leadership is handed over (`clusterctl transfer-leader`, and
/// a leader's shutdown).
pub async fn elect(cluster: &super::Cluster, id: u64) -> Result<bool, tonic::Status> {
    let addr = cluster
        .addr_of(id)
        .ok_or_else(|| tonic::Status::not_found(format!("node {id} is not a member")))?;
    let mut client = cluster
        .channels
        .get(&addr)
        .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    client.elect(proto::ElectRequest {}).await?;
    // The election takes a round trip or two.
    let mut metrics = cluster.raft.metrics();
    let led = tokio::time::timeout(
        Duration::from_secs(5),
        metrics.wait_for(|m| m.current_leader == Some(id)),
    )
    .await;
    Ok(matches!(led, Ok(Ok(_))))
}

/// On a leader that is shutting down: hands leadership to the voter
/// furthest along, so the cluster does not wait out an election timeout.
pub async fn hand_over_leadership(cluster: &super::Cluster) {
    let m = cluster.raft.metrics().borrow().clone();
    if m.current_leader != Some(cluster.id) {
        return;
    }
    let voters: Vec<u64> = m
        .membership_config
        .membership()
        .voter_ids()
        .filter(|v| *v != cluster.id)
        .collect();
    let matched = |id: &u64| {
        m.replication
            .as_ref()
            .and_then(|r| r.get(id).cloned().flatten())
            .map(|l| l.index)
    };
    let Some(best) = voters.iter().copied().max_by_key(|v| matched(v)) else {
        return;
    };
    match elect(cluster, best).await {
        Ok(true) => tracing::info!(to = best, "handed leadership over before shutting down"),
        Ok(false) => tracing::warn!(to = best, "leadership hand-over did not finish in time"),
        Err(e) => tracing::warn!(to = best, error = %e.message(), "cannot hand leadership over"),
    }
}

/// Removes a member (voter or learner) on the leader; its sessions leave
/// the table with it. Refuses to remove the last voter.
pub async fn remove_member(cluster: &super::Cluster, id: u64) -> Result<(), RemoveError> {
    let m = cluster.raft.metrics().borrow().clone();
    if m.current_leader != Some(cluster.id) {
        return Err(RemoveError::NotLeader(m.current_leader));
    }
    let membership = m.membership_config.membership().clone();
    let mut voters: std::collections::BTreeSet<u64> = membership.voter_ids().collect();
    let was_voter = voters.remove(&id);
    if !was_voter && membership.get_node(&id).is_none() {
        return Err(RemoveError::NotAMember(id));
    }
    if voters.is_empty() {
        return Err(RemoveError::LastVoter);
    }
    // Its sessions leave the table while it still follows the log, so the
    // node itself closes them (its clients reconnect to a member) rather
    // than go on serving sessions nobody else knows of.
    let _ = cluster.write(Command::NodeDown { node: id }).await;
    let change = if was_voter {
        // `retain = false`: not kept as a learner either.
        cluster.raft.change_membership(voters, false).await
    } else {
        let gone = std::iter::once(id).collect();
        cluster
            .raft
            .change_membership(openraft::ChangeMembers::RemoveNodes(gone), false)
            .await
    };
    if let Err(e) = change {
        // Its sessions were dropped for nothing: they bind again.
        tracing::warn!(node = id, error = %e, "removing the member failed after its sessions were dropped");
        return Err(RemoveError::Raft(e.to_string()));
    }
    // Sessions bound on it meanwhile leave the table too; it no longer
    // follows the log, so it is told directly that it is out (it then
    // closes them and refuses writes and logins at once).
    let _ = cluster.write(Command::NodeDown { node: id }).await;
    tell_removed(cluster, id, &membership).await;
    tracing::info!(node = id, "node removed from the cluster");
    Ok(())
}

/// Tells member `id` (at its address in `before`, the membership it was
/// in) that it was removed; best effort, as it may be gone already.
async fn tell_removed(
    cluster: &super::Cluster,
    id: u64,
    before: &openraft::Membership<u64, openraft::BasicNode>,
) {
    if id == cluster.id {
        cluster.set_removed(true);
        return;
    }
    let Some(addr) = before.get_node(&id).map(|n| n.addr.clone()) else {
        return;
    };
    let Ok(mut client) = cluster.channels.get(&addr) else {
        return;
    };
    let told = tokio::time::timeout(
        Duration::from_secs(1),
        client.removed(proto::RemovedRequest {}),
    )
    .await;
    if !matches!(told, Ok(Ok(_))) {
        tracing::debug!(
            node = id,
            "the removed member was not told (it may be gone)"
        );
    }
}

/// Removes member `id` through the leader, wherever this runs: on a
/// follower the request is passed to the leader (`Peer.Remove`).
pub async fn remove_via_leader(
    cluster: &super::Cluster,
    id: u64,
) -> Result<proto::MembershipReply, tonic::Status> {
    match remove_member(cluster, id).await {
        Ok(()) => Ok(super::service::membership_reply(&cluster.raft)),
        Err(RemoveError::NotLeader(Some(leader))) => {
            let addr = cluster.addr_of(leader).ok_or_else(|| {
                tonic::Status::unavailable(format!(
                    "the leader's (node {leader}) address is unknown"
                ))
            })?;
            let mut client = cluster
                .channels
                .get(&addr)
                .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
            let reply = client
                .remove(proto::RemoveNodeRequest { node_id: id })
                .await
                .map_err(|s| {
                    tonic::Status::new(
                        s.code(),
                        format!("the leader (node {leader} at {addr}): {}", s.message()),
                    )
                })?;
            Ok(reply.into_inner())
        }
        Err(e) => Err(e.into()),
    }
}

impl From<RemoveError> for tonic::Status {
    fn from(e: RemoveError) -> Self {
        match e {
            RemoveError::NotAMember(_) => tonic::Status::not_found(e.to_string()),
            RemoveError::LastVoter => tonic::Status::failed_precondition(e.to_string()),
            // No leader, or leadership moved while the request was on its way.
            RemoveError::NotLeader(_) => tonic::Status::unavailable(format!("{e}; try again")),
            RemoveError::Raft(m) => tonic::Status::unavailable(m),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RemoveError {
    #[error("membership changes run on the leader: node {} (`clusterctl status` shows it)", .0.map_or("unknown".into(), |l| l.to_string()))]
    NotLeader(Option<u64>),
    #[error("node {0} is not a member")]
    NotAMember(u64),
    #[error("cannot remove the last voter")]
    LastVoter,
    #[error("{0}")]
    Raft(String),
}

/// Whether a member's advertised name resolves. An IP address always does.
async fn resolves(addr: &str) -> bool {
    let host = addr.rsplit_once(':').map_or(addr, |(h, _)| h);
    if host
        .trim_matches(['[', ']'])
        .parse::<std::net::IpAddr>()
        .is_ok()
    {
        return true;
    }
    match tokio::net::lookup_host(addr).await {
        Ok(mut found) => found.next().is_some(),
        Err(_) => false,
    }
}

/// On the leader: members that stopped answering lose their sessions, and
/// those whose name is gone for `remove_unresolvable_after_secs` leave.
async fn watch_members(server: Arc<Server>) {
    let grace = Duration::from_secs(server.config.cluster.node_down_grace_secs);
    let remove_after = Duration::from_secs(server.config.cluster.remove_unresolvable_after_secs);
    let mut unresolvable: std::collections::HashMap<u64, Instant> = Default::default();
    let mut last_lookup = Instant::now();
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
            unresolvable.clear();
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
        // Names are looked up every few seconds, of silent members only.
        if remove_after.is_zero() || last_lookup.elapsed() < Duration::from_secs(5) {
            continue;
        }
        last_lookup = Instant::now();
        let members: Vec<(u64, String)> = m
            .membership_config
            .membership()
            .nodes()
            .filter(|(id, _)| **id != cluster.id)
            .map(|(id, n)| (*id, n.addr.clone()))
            .collect();
        unresolvable.retain(|id, _| members.iter().any(|(m, _)| m == id));
        for (id, addr) in members {
            let silent = match cluster.contacts.since(id) {
                Some(d) => d > grace,
                None => since.elapsed() > grace,
            };
            if !silent || resolves(&addr).await {
                unresolvable.remove(&id);
                continue;
            }
            let gone_since = *unresolvable.entry(id).or_insert_with(Instant::now);
            if gone_since.elapsed() < remove_after {
                continue;
            }
            tracing::warn!(
                node = id,
                %addr,
                after_secs = remove_after.as_secs(),
                "member is silent and its name no longer resolves (scaled away): removing it"
            );
            match remove_member(cluster, id).await {
                Ok(()) => {
                    unresolvable.remove(&id);
                }
                Err(e) => tracing::warn!(node = id, error = %e, "cannot remove the member yet"),
            }
        }
    }
}
