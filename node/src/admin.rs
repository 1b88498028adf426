//! The admin gRPC service `clusterctl` talks to (proto/cluster.proto,
//! service `Admin`). It listens on `listen.grpc`, loopback by default.
//! With `admin.token_file` (required beyond loopback) every call must carry
//! `authorization: Bearer <token>`; without it, whoever reaches the
//! loopback address administers the node.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use proto::admin_server::{Admin, AdminServer};
use proto::*;
use tonic::{Request, Response, Status};
use xmpp::error::StreamError;
use xmpp::jid::{BareJid, Jid};

use crate::accounts::{self, AccountError};
use crate::cluster::state_machine::{ApplyError, Refusal};
use crate::Server;

pub async fn serve(server: Arc<Server>, listener: tokio::net::TcpListener, token: Option<String>) {
    let mut shutdown = server.shutdown.subscribe();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let check = move |req: Request<()>| -> Result<Request<()>, Status> {
        let Some(token) = &token else {
            return Ok(req);
        };
        let given = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .unwrap_or("");
        if bool::from(subtle::ConstantTimeEq::ct_eq(
            given.as_bytes(),
            token.as_bytes(),
        )) {
            Ok(req)
        } else {
            Err(Status::unauthenticated(
                "this node's admin API needs its token: clusterctl --token-file FILE (the file named by admin.token_file on the node)",
            ))
        }
    };
    let result = tonic::transport::Server::builder()
        .add_service(AdminServer::with_interceptor(
            AdminService { server },
            check,
        ))
        .serve_with_incoming_shutdown(incoming, async move {
            let _ = shutdown.changed().await;
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "admin gRPC service stopped");
    }
}

struct AdminService {
    server: Arc<Server>,
}

fn status_of(e: AccountError) -> Status {
    match e {
        AccountError::BadJid(..) | AccountError::UnknownHost(_) | AccountError::BadPassword => {
            Status::invalid_argument(e.to_string())
        }
        AccountError::Apply(ApplyError::Refused(Refusal::AccountExists(_))) => {
            Status::already_exists(e.to_string())
        }
        AccountError::Apply(ApplyError::Refused(Refusal::NoSuchAccount(_))) => {
            Status::not_found(e.to_string())
        }
        AccountError::Apply(ApplyError::Unavailable(_)) => Status::unavailable(e.to_string()),
        AccountError::Apply(_) | AccountError::Internal(_) => Status::internal(e.to_string()),
    }
}

impl AdminService {
    fn user(&self, jid: &str) -> Result<BareJid, Status> {
        accounts::parse_user(&self.server, jid).map_err(status_of)
    }
}

/// This node's own sessions, with the client's address and TLS.
pub fn local_sessions(server: &Server, vhost: &str) -> Vec<SessionInfo> {
    let node = server.cluster.id;
    server
        .sessions
        .list(vhost)
        .into_iter()
        .map(|(jid, r)| SessionInfo {
            jid,
            priority: i32::from(r.priority),
            available: r.available,
            peer: r.peer.to_string(),
            tls: r.tls,
            node,
        })
        .collect()
}

/// How long another member has to answer an operator's question.
const ASK_TIMEOUT: Duration = Duration::from_secs(3);

/// Every session of the cluster: each member lists its own. A member that
/// does not answer is named, and its sessions come from the replicated
/// session table (without address or TLS).
pub async fn cluster_sessions(server: &Server, vhost: &str) -> ListSessionsReply {
    let cluster = &server.cluster;
    let mut others: BTreeSet<u64> = cluster
        .raft
        .metrics()
        .borrow()
        .membership_config
        .membership()
        .nodes()
        .map(|(id, _)| *id)
        .collect();
    others.extend(cluster.table.nodes());
    others.remove(&cluster.id);
    let asks = others.into_iter().map(|id| async move {
        let listed = async {
            let mut peer = cluster.channels.get(&cluster.addr_of(id)?).ok()?;
            let ask = peer.local_sessions(ListSessionsRequest {
                vhost: vhost.to_owned(),
                local: true,
            });
            let reply = tokio::time::timeout(ASK_TIMEOUT, ask).await.ok()?.ok()?;
            Some(reply.into_inner().sessions)
        };
        (id, listed.await)
    });
    let mut sessions = local_sessions(server, vhost);
    let mut unreachable = Vec::new();
    for (id, listed) in futures_util::future::join_all(asks).await {
        match listed {
            Some(list) => sessions.extend(list),
            None => {
                unreachable.push(id);
                sessions.extend(
                    cluster
                        .table
                        .on_node(id, vhost)
                        .into_iter()
                        .map(|(jid, e)| SessionInfo {
                            jid,
                            priority: i32::from(e.priority),
                            available: e.available,
                            peer: String::new(),
                            tls: false,
                            node: id,
                        }),
                );
            }
        }
    }
    sessions.sort_by(|a, b| a.jid.cmp(&b.jid).then(a.node.cmp(&b.node)));
    ListSessionsReply {
        sessions,
        unreachable,
    }
}

/// The stream error text of a kick without a reason.
pub const KICKED: &str = "Disconnected by the server's administrator";

fn kick_target(jid: &str) -> Result<Jid, Status> {
    Jid::parse(jid).map_err(|e| Status::invalid_argument(format!("`{jid}` is not a JID: {e}")))
}

/// Closes the matching sessions bound on this node (`policy-violation`,
/// with `reason` as the text); returns their full JIDs.
pub fn kick_local(server: &Server, jid: &str, reason: &str) -> Result<KickReply, Status> {
    let jid = kick_target(jid)?;
    let text = if reason.is_empty() { KICKED } else { reason };
    let closed = server.sessions.close_matching(
        jid.bare(),
        jid.resource(),
        StreamError::PolicyViolation,
        text,
    );
    if !closed.is_empty() {
        tracing::info!(%jid, sessions = closed.len(), "sessions kicked by the operator");
    }
    Ok(KickReply { closed })
}

/// Closes the session of a full JID, or every session of a bare JID, on
/// every node where the replicated session table says it is bound.
pub async fn kick(server: &Server, jid: &str, reason: &str) -> Result<KickReply, Status> {
    let target = kick_target(jid)?;
    if !server.config.is_local_domain(target.domain()) {
        return Err(Status::invalid_argument(format!(
            "`{}` is not a virtual host of this cluster",
            target.domain()
        )));
    }
    let cluster = &server.cluster;
    let mut closed = kick_local(server, jid, reason)?.closed;
    let nodes: BTreeSet<u64> = cluster.table.with_user(target.bare(), |list| {
        list.iter()
            .filter(|(r, _)| target.resource().is_none_or(|want| want == r))
            .map(|(_, e)| e.node)
            .filter(|n| *n != cluster.id)
            .collect()
    });
    let asks = nodes.into_iter().map(|node| async move {
        let asked = async {
            let addr = cluster
                .addr_of(node)
                .ok_or_else(|| "not a member any more".to_owned())?;
            let mut peer = cluster.channels.get(&addr).map_err(|e| e.to_string())?;
            let ask = peer.kick(KickRequest {
                jid: jid.to_owned(),
                reason: reason.to_owned(),
            });
            match tokio::time::timeout(ASK_TIMEOUT, ask).await {
                Ok(Ok(r)) => Ok(r.into_inner().closed),
                Ok(Err(e)) => Err(e.message().to_owned()),
                Err(_) => Err("no answer".to_owned()),
            }
        };
        (node, asked.await)
    });
    let mut failed = Vec::new();
    for (node, asked) in futures_util::future::join_all(asks).await {
        match asked {
            Ok(list) => closed.extend(list),
            Err(e) => failed.push(format!("node {node}: {e}")),
        }
    }
    closed.sort();
    // A session that moved between nodes meanwhile is closed once.
    closed.dedup();
    if !failed.is_empty() {
        return Err(Status::unavailable(format!(
            "closed [{}]; not reached: {}",
            closed.join(", "),
            failed.join("; ")
        )));
    }
    if closed.is_empty() {
        return Err(Status::not_found(format!(
            "{target} has no session in the cluster"
        )));
    }
    Ok(KickReply { closed })
}

/// This node's view of the cluster, for `clusterctl status`.
pub fn cluster_status(server: &Server) -> ClusterStatusReply {
    let cluster = &server.cluster;
    let m = cluster.raft.metrics().borrow().clone();
    let membership = m.membership_config.membership();
    let voters: Vec<u64> = membership.voter_ids().collect();
    let leader = m.current_leader.unwrap_or(0);
    let last_log = m.last_log_index.unwrap_or(0);
    let applied = m.last_applied.map_or(0, |l| l.index);
    let grace = std::time::Duration::from_secs(server.config.cluster.node_down_grace_secs);
    let sessions = cluster.table.count_by_node();
    let replication = m.replication.clone().unwrap_or_default();
    let mut members = Vec::new();
    for (id, node) in membership.nodes() {
        let role = if *id == leader {
            "leader"
        } else if voters.contains(id) {
            "follower"
        } else {
            "learner"
        };
        let (reachable, last_contact_ms) = if *id == cluster.id {
            (true, 0)
        } else {
            match cluster.contacts.since(*id) {
                Some(d) => (d < grace, d.as_millis() as i64),
                None => (false, -1),
            }
        };
        let matched = if *id == cluster.id {
            last_log
        } else {
            replication
                .get(id)
                .and_then(|l| l.map(|l| l.index))
                .unwrap_or(0)
        };
        members.push(MemberStatus {
            id: *id,
            addr: node.addr.clone(),
            role: role.into(),
            reachable,
            last_contact_ms,
            matched,
            lag: last_log.saturating_sub(matched),
            sessions: sessions.get(id).copied().unwrap_or(0),
        });
    }
    // The commit index: the highest index a majority of voters holds.
    let commit_index = if leader == cluster.id {
        let mut held: Vec<u64> = members
            .iter()
            .filter(|mm| voters.contains(&mm.id))
            .map(|mm| mm.matched)
            .collect();
        held.sort_unstable_by(|a, b| b.cmp(a));
        held.get(voters.len() / 2).copied().unwrap_or(0)
    } else {
        applied
    };
    let quorum = cluster.has_quorum();
    let role = if leader == cluster.id {
        "leader"
    } else if voters.contains(&cluster.id) {
        "follower"
    } else {
        "learner"
    };
    let health = if cluster.is_removed() {
        "REMOVED: the leader removed this node from the cluster; writes and logins fail here until `clusterctl join` takes it back in, or stop it".to_owned()
    } else if !quorum {
        format!(
            "NO QUORUM: this node knows no leader that reached a majority of the {} voters; writes and logins fail here",
            voters.len()
        )
    } else if leader == cluster.id {
        let down: Vec<String> = members
            .iter()
            .filter(|mm| !mm.reachable)
            .map(|mm| mm.id.to_string())
            .collect();
        if down.is_empty() {
            format!("ok: {} members, all reachable", members.len())
        } else {
            format!(
                "degraded: node(s) {} unreachable; quorum holds",
                down.join(", ")
            )
        }
    } else {
        format!("ok: following leader {leader} (run status against the leader for per-member reachability)")
    };
    ClusterStatusReply {
        node_id: cluster.id,
        leader,
        term: m.current_term,
        commit_index,
        applied_index: applied,
        last_log_index: last_log,
        members,
        quorum,
        health,
        role: role.into(),
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
    async fn cluster_status(
        &self,
        _: Request<ClusterStatusRequest>,
    ) -> Result<Response<ClusterStatusReply>, Status> {
        Ok(Response::new(cluster_status(&self.server)))
    }

    async fn add_node(
        &self,
        req: Request<AddNodeRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        let r = req.into_inner();
        let c = &self.server.cluster;
        let reply =
            crate::cluster::service::admit(&c.raft, &c.channels, r.node_id, &r.addr).await?;
        Ok(Response::new(reply))
    }

    async fn remove_node(
        &self,
        req: Request<RemoveNodeRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        let id = req.into_inner().node_id;
        let reply = crate::cluster::membership::remove_via_leader(&self.server.cluster, id).await?;
        Ok(Response::new(reply))
    }

    async fn transfer_leader(
        &self,
        req: Request<TransferLeaderRequest>,
    ) -> Result<Response<MembershipReply>, Status> {
        let id = req.into_inner().node_id;
        let c = &self.server.cluster;
        crate::cluster::membership::elect(c, id).await?;
        Ok(Response::new(crate::cluster::service::membership_reply(
            &c.raft,
        )))
    }

    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusReply>, Status> {
        let s = &self.server;
        Ok(Response::new(StatusReply {
            node_id: s.config.node_id,
            version: env!("CARGO_PKG_VERSION").into(),
            uptime_seconds: s.started.elapsed().as_secs(),
            vhosts: s.config.vhosts.iter().map(|v| v.name.clone()).collect(),
            sessions: s.sessions.count() as u64,
            c2s_addr: s.config.listen.c2s.to_string(),
            c2s_tls_addr: s.config.listen.c2s_tls.to_string(),
            data_dir: s.config.data_dir.display().to_string(),
            accounts: s
                .store()
                .account_count()
                .map_err(|e| Status::internal(e.to_string()))?,
        }))
    }

    async fn add_user(
        &self,
        req: Request<AddUserRequest>,
    ) -> Result<Response<AddUserReply>, Status> {
        let r = req.into_inner();
        let user = self.user(&r.jid)?;
        accounts::create(&self.server, &user, &r.password)
            .await
            .map_err(status_of)?;
        tracing::info!(%user, "account created");
        Ok(Response::new(AddUserReply {}))
    }

    async fn set_password(
        &self,
        req: Request<SetPasswordRequest>,
    ) -> Result<Response<SetPasswordReply>, Status> {
        let r = req.into_inner();
        let user = self.user(&r.jid)?;
        accounts::set_password(&self.server, &user, &r.password)
            .await
            .map_err(status_of)?;
        tracing::info!(%user, "password changed");
        Ok(Response::new(SetPasswordReply {}))
    }

    async fn delete_user(
        &self,
        req: Request<DeleteUserRequest>,
    ) -> Result<Response<DeleteUserReply>, Status> {
        let user = self.user(&req.into_inner().jid)?;
        accounts::delete(&self.server, &user)
            .await
            .map_err(status_of)?;
        tracing::info!(%user, "account deleted");
        Ok(Response::new(DeleteUserReply {}))
    }

    async fn list_users(
        &self,
        req: Request<ListUsersRequest>,
    ) -> Result<Response<ListUsersReply>, Status> {
        let vhost = req.into_inner().vhost;
        if !vhost.is_empty() && !self.server.config.is_local_domain(&vhost) {
            return Err(Status::invalid_argument(format!(
                "`{vhost}` is not a virtual host of this node"
            )));
        }
        self.server.cluster.read_barrier().await;
        let jids = self
            .server
            .store()
            .users(&vhost)
            .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(ListUsersReply { jids }))
    }

    async fn import_users(
        &self,
        req: Request<ImportUsersRequest>,
    ) -> Result<Response<ImportUsersReply>, Status> {
        let r = req.into_inner();
        let mut users = Vec::with_capacity(r.users.len());
        for u in r.users {
            users.push((self.user(&u.jid)?, u.password));
        }
        let (created, updated, skipped) = accounts::import(&self.server, users, r.update_existing)
            .await
            .map_err(status_of)?;
        tracing::info!(created, updated, skipped, "accounts imported");
        Ok(Response::new(ImportUsersReply {
            created,
            updated,
            skipped,
        }))
    }

    async fn list_sessions(
        &self,
        req: Request<ListSessionsRequest>,
    ) -> Result<Response<ListSessionsReply>, Status> {
        let r = req.into_inner();
        let reply = if r.local {
            ListSessionsReply {
                sessions: local_sessions(&self.server, &r.vhost),
                unreachable: Vec::new(),
            }
        } else {
            cluster_sessions(&self.server, &r.vhost).await
        };
        Ok(Response::new(reply))
    }

    async fn kick(&self, req: Request<KickRequest>) -> Result<Response<KickReply>, Status> {
        let r = req.into_inner();
        Ok(Response::new(kick(&self.server, &r.jid, &r.reason).await?))
    }

    async fn list_s2s(
        &self,
        _req: Request<proto::ListS2sRequest>,
    ) -> Result<Response<proto::ListS2sReply>, Status> {
        let Some(fed) = &self.server.s2s else {
            return Ok(Response::new(proto::ListS2sReply {
                streams: Vec::new(),
                enabled: false,
            }));
        };
        let streams = fed
            .status()
            .into_iter()
            .map(|s| proto::S2sStream {
                direction: s.direction.into(),
                local: s.local,
                remote: s.remote,
                state: s.state,
                auth: s.auth.as_str().into(),
                tls: s.tls,
                cert_valid: s.cert_valid,
                age_seconds: s.since.elapsed().as_secs(),
                queued: s.queued as u64,
                peer: s.peer,
            })
            .collect();
        Ok(Response::new(proto::ListS2sReply {
            streams,
            enabled: true,
        }))
    }
}
