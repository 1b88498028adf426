//! The `Peer` gRPC service: what the other nodes of the cluster call on
//! this one (openraft's RPCs, forwarded writes, joins, elections, and
//! stanzas for this node's sessions).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;

use openraft::error::{ClientWriteError, RaftError};
use openraft::BasicNode;
use proto::peer_server::Peer;
use proto::{
    ElectReply, ElectRequest, ForwardAck, ForwardBatch, Forwarded, JoinRequest, MembershipReply,
    RaftBytes, ReadIndexReply, ReadIndexRequest, ReadUploadRequest, UploadChunk,
};
use tokio::sync::{mpsc, oneshot};
use tonic::{Request, Response, Status, Streaming};

use super::network::{decode, encode, Channels};
use super::state_machine::{ApplyError, Command, Outcome};
use super::{node, Raft};

/// A batch of forwarded stanzas and the signal that it was delivered.
pub type Inbox = mpsc::Sender<(Vec<Forwarded>, oneshot::Sender<()>)>;

pub struct PeerService {
    pub raft: Raft,
    /// Forwarded writes join the leader's own in shared log entries.
    pub combiner: super::combine::Combiner,
    pub channels: Arc<Channels>,
    pub inbox: Inbox,
    /// Where this node keeps uploaded files (XEP-0363).
    pub upload_dir: std::path::PathBuf,
    /// For handing sessions over to the node their client resumed on.
    pub server: std::sync::Weak<crate::Server>,
}

fn bad(e: impl std::fmt::Display) -> Status {
    Status::invalid_argument(format!("undecodable Raft message: {e}"))
}

/// Sends a write to the leader at `leader`. `Ok(None)`: it was not
/// committed there (the leader moved or was unreachable before it took
/// the write); try again.
pub async fn forward_write(
    channels: &Channels,
    leader: &BasicNode,
    cmd: &Command,
) -> Result<Option<(u64, Outcome)>, ApplyError> {
    let mut client = match channels.get(&leader.addr) {
        Ok(c) => c,
        Err(_) => return Ok(None),
    };
    match client.write(encode(cmd)).await {
        Ok(reply) => {
            let r: Result<(u64, Outcome), String> = decode(reply.get_ref())
                .map_err(|e| ApplyError::Unavailable(format!("bad reply from the leader: {e}")))?;
            Ok(r.ok())
        }
        // Never reached the leader: nothing was committed.
        Err(s) if s.code() == tonic::Code::Unavailable => Ok(None),
        // Sent, then lost: whether it committed is unknown.
        Err(s) => Err(ApplyError::Unavailable(format!(
            "the leader at {} did not answer ({}); the write may or may not have been committed",
            leader.addr,
            s.message()
        ))),
    }
}

/// What a node that belongs to no cluster answers a join with.
pub const NOT_A_MEMBER: &str = "this node is not a member of any cluster";

/// Starts every other join refusal: it came from a member of a cluster
/// (as opposed to a peer that could not be reached).
pub const FROM_MEMBER: &str = "cluster member: ";

/// Asks the leader (through any member) to add `id` at `addr`.
pub async fn request_join(
    channels: &Channels,
    via: &str,
    id: u64,
    addr: &str,
) -> Result<MembershipReply, Status> {
    let mut client = channels
        .get(via)
        .map_err(|e| Status::unavailable(e.to_string()))?;
    let reply = client
        .join(JoinRequest {
            node_id: id,
            addr: addr.to_owned(),
        })
        .await?;
    Ok(reply.into_inner())
}

/// On the leader: learner, wait for it to catch up, then voter. Elsewhere:
/// passed on to the leader.
pub async fn admit(
    raft: &Raft,
    channels: &Channels,
    id: u64,
    addr: &str,
) -> Result<MembershipReply, Status> {
    let metrics = raft.metrics().borrow().clone();
    if metrics
        .membership_config
        .membership()
        .voter_ids()
        .next()
        .is_none()
    {
        // Told apart from "no leader": a joiner that may bootstrap must
        // know this peer holds no cluster it would split from.
        return Err(Status::failed_precondition(NOT_A_MEMBER));
    }
    let Some(leader) = metrics.current_leader else {
        return Err(Status::unavailable("no leader yet; try again"));
    };
    if leader != raft_id(raft) {
        let leader_addr = metrics
            .membership_config
            .membership()
            .get_node(&leader)
            .map(|n| n.addr.clone())
            .ok_or_else(|| Status::unavailable("the leader's address is unknown"))?;
        return request_join(channels, &leader_addr, id, addr).await;
    }
    let membership = metrics.membership_config.membership().clone();
    let is_voter = membership.voter_ids().any(|v| v == id);
    let known = membership.get_node(&id).map(|n| n.addr.clone());
    // The same address under another id: that member's data dir is gone
    // (a pod back with an empty volume), so its old self leaves as the new
    // one comes in.
    let stale: Vec<u64> = membership
        .nodes()
        .filter(|(other, n)| **other != id && n.addr == addr)
        .map(|(other, _)| *other)
        .collect();
    if !(is_voter && known.as_deref() == Some(addr)) {
        // Blocking: returns once the learner has caught up with the log.
        raft.add_learner(id, node(addr), true)
            .await
            .map_err(|e| Status::unavailable(format!("adding the learner failed: {e}")))?;
        let mut voters: std::collections::BTreeSet<u64> = raft
            .metrics()
            .borrow()
            .membership_config
            .membership()
            .voter_ids()
            .collect();
        voters.insert(id);
        for old in &stale {
            voters.remove(old);
        }
        // `retain = false`: a voter left out is removed, not kept as a learner.
        raft.change_membership(voters, false)
            .await
            .map_err(|e| Status::unavailable(format!("promoting the node to voter failed: {e}")))?;
        let learners: std::collections::BTreeSet<u64> = {
            let m = raft.metrics().borrow().clone();
            let left = m.membership_config.membership().clone();
            stale
                .iter()
                .copied()
                .filter(|s| left.get_node(s).is_some())
                .collect()
        };
        if !learners.is_empty() {
            raft.change_membership(openraft::ChangeMembers::RemoveNodes(learners), false)
                .await
                .map_err(|e| {
                    Status::unavailable(format!("removing the stale member failed: {e}"))
                })?;
        }
        if !stale.is_empty() {
            tracing::info!(node = id, %addr, replaced = ?stale, "a member with an empty data dir replaced its old self");
        }
        tracing::info!(node = id, %addr, "node joined the cluster as a voter");
    }
    Ok(membership_reply(raft))
}

impl PeerService {
    /// The server, unless it is shutting down.
    fn live(&self) -> Result<Arc<crate::Server>, Status> {
        self.server
            .upgrade()
            .ok_or_else(|| Status::unavailable("the node is shutting down"))
    }

    /// Refuses a Raft RPC meant for another node id (see
    /// [`super::network::TARGET`]); one without the key (an older peer)
    /// is taken.
    fn addressed_to_me<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let me = raft_id(&self.raft);
        match req
            .metadata()
            .get(super::network::TARGET)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(to) if to != me => Err(Status::failed_precondition(format!(
                "this is node {me}, not node {to}: that member's data is gone from this address"
            ))),
            _ => Ok(()),
        }
    }
}

pub fn raft_id(raft: &Raft) -> u64 {
    raft.metrics().borrow().id
}

pub fn membership_reply(raft: &Raft) -> MembershipReply {
    let m = raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let mut members: Vec<String> = Vec::new();
    for (id, n) in membership.nodes() {
        if voters.contains(id) {
            members.push(format!("{id}={}", n.addr));
        }
    }
    for (id, n) in membership.nodes() {
        if !voters.contains(id) {
            members.push(format!("{id}={} (learner)", n.addr));
        }
    }
    MembershipReply {
        members,
        leader: m.current_leader.unwrap_or(0),
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    async fn take_session(
        &self,
        req: Request<proto::TakeSessionRequest>,
    ) -> Result<Response<proto::TakeSessionReply>, Status> {
        let server = self.live()?;
        let reply = crate::c2s::moved::give(&server, req.into_inner()).await;
        Ok(Response::new(reply))
    }

    async fn remove(
        &self,
        req: Request<proto::RemoveNodeRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        let server = self.live()?;
        let id = req.into_inner().node_id;
        // Only the leader runs it: passed on once, never around in circles.
        use super::membership::{remove_member, RemoveError};
        remove_member(&server.cluster, id)
            .await
            .map_err(|e| match e {
                RemoveError::NotLeader(_) => Status::unavailable(
                    "leadership moved while the request was passed on; try again",
                ),
                e => e.into(),
            })?;
        Ok(Response::new(membership_reply(&self.raft)))
    }

    async fn removed(
        &self,
        _req: Request<proto::RemovedRequest>,
    ) -> Result<Response<proto::RemovedReply>, Status> {
        let server = self.live()?;
        server.cluster.set_removed(true);
        // Any session bound since its sessions left the table goes too.
        server.sessions.close_all(xmpp::error::StreamError::Reset);
        Ok(Response::new(proto::RemovedReply {}))
    }

    async fn local_sessions(
        &self,
        req: Request<proto::ListSessionsRequest>,
    ) -> Result<Response<proto::ListSessionsReply>, Status> {
        let server = self.live()?;
        Ok(Response::new(proto::ListSessionsReply {
            sessions: crate::admin::local_sessions(&server, &req.into_inner().vhost),
            unreachable: Vec::new(),
        }))
    }

    async fn kick(
        &self,
        req: Request<proto::KickRequest>,
    ) -> Result<Response<proto::KickReply>, Status> {
        let server = self.live()?;
        let r = req.into_inner();
        Ok(Response::new(crate::admin::kick_local(
            &server, &r.jid, &r.reason,
        )?))
    }

    async fn append_entries(&self, req: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        self.addressed_to_me(&req)?;
        // A leader replicates to it again: it was taken back in.
        if let Some(server) = self.server.upgrade() {
            if server.cluster.is_removed() {
                server.cluster.set_removed(false);
            }
        }
        let rpc = decode(req.get_ref()).map_err(bad)?;
        let r = self.raft.append_entries(rpc).await;
        Ok(Response::new(encode(&r)))
    }

    async fn vote(&self, req: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        self.addressed_to_me(&req)?;
        let rpc = decode(req.get_ref()).map_err(bad)?;
        let r = self.raft.vote(rpc).await;
        Ok(Response::new(encode(&r)))
    }

    async fn install_snapshot(
        &self,
        req: Request<RaftBytes>,
    ) -> Result<Response<RaftBytes>, Status> {
        self.addressed_to_me(&req)?;
        let rpc = decode(req.get_ref()).map_err(bad)?;
        let r = self.raft.install_snapshot(rpc).await;
        Ok(Response::new(encode(&r)))
    }

    async fn write(&self, req: Request<RaftBytes>) -> Result<Response<RaftBytes>, Status> {
        let cmd: Command = decode(req.get_ref()).map_err(bad)?;
        let r: Result<(u64, Outcome), String> = match self.combiner.client_write(cmd).await {
            Ok(r) => Ok(r),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err("not the leader".into())
            }
            Err(e) => return Err(Status::internal(e.to_string())),
        };
        Ok(Response::new(encode(&r)))
    }

    async fn join(&self, req: Request<JoinRequest>) -> Result<Response<MembershipReply>, Status> {
        let JoinRequest { node_id, addr } = req.into_inner();
        if node_id == 0 || addr.is_empty() {
            return Err(Status::invalid_argument(
                "a join needs a node id and an address",
            ));
        }
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            admit(&self.raft, &self.channels, node_id, &addr),
        )
        .await
        .map_err(|_| Status::deadline_exceeded("the new node did not catch up within 60 s"))
        .and_then(|r| r)
        .map_err(|s| {
            if s.message() == NOT_A_MEMBER || s.message().starts_with(FROM_MEMBER) {
                s
            } else {
                Status::new(s.code(), format!("{FROM_MEMBER}{}", s.message()))
            }
        })?;
        Ok(Response::new(r))
    }

    async fn elect(&self, _req: Request<ElectRequest>) -> Result<Response<ElectReply>, Status> {
        self.raft
            .trigger()
            .elect()
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ElectReply {}))
    }

    async fn read_index(
        &self,
        _req: Request<ReadIndexRequest>,
    ) -> Result<Response<ReadIndexReply>, Status> {
        let (read, _) = self
            .raft
            .get_read_log_id()
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        Ok(Response::new(ReadIndexReply {
            index: read.map_or(0, |l| l.index),
        }))
    }

    type ForwardStreamStream =
        Pin<Box<dyn Stream<Item = Result<ForwardAck, Status>> + Send + 'static>>;

    async fn forward_stream(
        &self,
        req: Request<Streaming<ForwardBatch>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        let inbound = req.into_inner();
        let inbox = self.inbox.clone();
        let server = self.server.clone();
        let start = Some((inbound, inbox, server, 0u64));
        let acks = futures_util::stream::unfold(start, |state| async move {
            let (mut inbound, inbox, server, mut total) = state?;
            let gone = || Status::unavailable("this node is shutting down");
            // Acknowledged at most every ACK_DELAY or ACK_MAX stanzas:
            // an ack is a write and a wakeup on both nodes, and it only
            // bounds what the sender keeps for re-routing.
            // What waits in the consumer task (`router::remote::run`):
            // the signal that the last batch handed to it is done.
            let mut pending: Option<oneshot::Receiver<()>> = None;
            let mut since_ack = 0u64;
            // Armed by the round's first batch (so, unarmed, the round has
            // nothing to acknowledge). One timer a round: a new one per
            // batch cost a timer registration each, and a wakeup of the
            // worker waiting on the timers.
            let tick = tokio::time::sleep(std::time::Duration::from_secs(86_400));
            tokio::pin!(tick);
            let mut armed = false;
            let mut ended = false;
            loop {
                tokio::select! {
                    m = inbound.message() => match m {
                        Ok(Some(b)) => {
                            let n = b.stanzas.len() as u64;
                            total += n;
                            if pending.as_mut().is_some_and(|p| p.try_recv().is_ok()) {
                                pending = None;
                            }
                            // In order: straight to the sessions here while
                            // nothing waits in the consumer task (one wakeup
                            // less per batch), else behind what does.
                            let rest = if pending.is_some() {
                                b.stanzas
                            } else {
                                let Some(server) = server.upgrade() else {
                                    return Some((Err(gone()), None));
                                };
                                crate::router::remote::deliver_batch_now(&server, b.stanzas)
                            };
                            if !rest.is_empty() {
                                let (done, wait) = oneshot::channel();
                                if inbox.send((rest, done)).await.is_err() {
                                    return Some((Err(gone()), None));
                                }
                                pending = Some(wait);
                            }
                            since_ack += n;
                            if !armed {
                                tick.as_mut().reset(tokio::time::Instant::now() + ACK_DELAY);
                                armed = true;
                            }
                            if since_ack >= ACK_MAX {
                                break;
                            }
                        }
                        Ok(None) | Err(_) => {
                            ended = true;
                            break;
                        }
                    },
                    () = &mut tick, if armed => break,
                }
            }
            if !armed {
                return None; // ended with nothing to acknowledge
            }
            // The consumer takes batches in order: the last one handed
            // to it being done means all are.
            if let Some(p) = pending {
                if p.await.is_err() {
                    return Some((Err(gone()), None));
                }
            }
            let next = (!ended).then_some((inbound, inbox, server, total));
            Some((Ok(ForwardAck { received: total }), next))
        });
        Ok(Response::new(Box::pin(acks)))
    }

    type ReadUploadStream =
        Pin<Box<dyn Stream<Item = Result<UploadChunk, Status>> + Send + 'static>>;

    async fn read_upload(
        &self,
        req: Request<ReadUploadRequest>,
    ) -> Result<Response<Self::ReadUploadStream>, Status> {
        use futures_util::StreamExt as _;
        let ReadUploadRequest { slot, size } = req.into_inner();
        let Some(path) = crate::modules::upload::file_path(&self.upload_dir, &slot) else {
            return Err(Status::invalid_argument("not an upload slot id"));
        };
        let file = tokio::fs::File::open(&path).await.map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Status::not_found(format!("upload {slot} is not on this node"))
            } else {
                tracing::warn!(%slot, error = %e, "cannot open an upload for a peer");
                Status::internal(format!("cannot open upload {slot}: {e}"))
            }
        })?;
        let len = file
            .metadata()
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .len();
        if len != size {
            return Err(Status::not_found(format!(
                "upload {slot} here has {len} bytes, not {size}"
            )));
        }
        let chunks = crate::modules::upload::read_chunks(file).map(|c| {
            c.map(|data| UploadChunk { data })
                .map_err(|e| Status::internal(e.to_string()))
        });
        Ok(Response::new(Box::pin(chunks)))
    }
}

/// Longest wait before delivered stanzas are acknowledged to the sender.
const ACK_DELAY: std::time::Duration = std::time::Duration::from_millis(20);
/// Stanzas delivered before an acknowledgement goes out at once.
const ACK_MAX: u64 = 1024;
