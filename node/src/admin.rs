//! The admin gRPC service `clusterctl` talks to (proto/cluster.proto,
//! service `Admin`). It listens on `listen.grpc`, loopback by default:
//! whoever reaches it administers the node.

use std::sync::Arc;

use proto::admin_server::{Admin, AdminServer};
use proto::*;
use tonic::{Request, Response, Status};
use xmpp::jid::BareJid;

use crate::accounts::{self, AccountError};
use crate::cluster::state_machine::ApplyError;
use crate::Server;

pub async fn serve(server: Arc<Server>, listener: tokio::net::TcpListener) {
    let mut shutdown = server.shutdown.subscribe();
    let incoming = tonic::transport::server::TcpIncoming::from(listener);
    let result = tonic::transport::Server::builder()
        .add_service(AdminServer::new(AdminService { server }))
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
        AccountError::Apply(ApplyError::AccountExists(_)) => Status::already_exists(e.to_string()),
        AccountError::Apply(ApplyError::NoSuchAccount(_)) => Status::not_found(e.to_string()),
        AccountError::Apply(_) | AccountError::Internal(_) => Status::internal(e.to_string()),
    }
}

impl AdminService {
    fn user(&self, jid: &str) -> Result<BareJid, Status> {
        accounts::parse_user(&self.server, jid).map_err(status_of)
    }
}

#[tonic::async_trait]
impl Admin for AdminService {
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
        let vhost = req.into_inner().vhost;
        let sessions = self
            .server
            .sessions
            .list(&vhost)
            .into_iter()
            .map(|(jid, r)| SessionInfo {
                jid,
                priority: i32::from(r.priority),
                available: r.available,
                peer: r.peer.to_string(),
                tls: r.tls,
            })
            .collect();
        Ok(Response::new(ListSessionsReply { sessions }))
    }
}
