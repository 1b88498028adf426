//! openraft's network over tonic (after openraft's `raft-kv-memstore-grpc`
//! example): the client side of AppendEntries, Vote and InstallSnapshot,
//! and the `Peer` service that answers them, takes writes forwarded by
//! followers, admits joining nodes and receives stanzas for this node.
//!
//! Raft messages are openraft's serde types, postcard-encoded inside
//! `RaftBytes`. Every successful RPC to a member is noted in [`Contacts`],
//! which is how the leader tells a member that stopped answering.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use openraft::BasicNode;
use proto::peer_client::PeerClient;
use proto::RaftBytes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

use super::TypeConfig;

type NodeId = u64;

/// When each peer last answered an RPC of ours.
#[derive(Default)]
pub struct Contacts {
    last_ok: Mutex<HashMap<NodeId, Instant>>,
}

impl Contacts {
    pub fn saw(&self, node: NodeId) {
        self.last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(node, Instant::now());
    }

    pub fn since(&self, node: NodeId) -> Option<Duration> {
        self.last_ok
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(&node)
            .map(|t| t.elapsed())
    }
}

/// A lazily connected channel to `addr` (`host:port`; DNS names resolve at
/// connect time, so a peer whose name does not resolve yet is retried).
/// With `local`, connections leave from that address (the node's own
/// cluster address, so peers and firewalls see which node is calling).
/// With `tls`, the peer must show a certificate from the cluster CA valid
/// for the host of `addr`, and this node shows its own.
pub fn channel(
    addr: &str,
    local: Option<IpAddr>,
    tls: Option<&ClientTlsConfig>,
) -> Result<Channel, tonic::transport::Error> {
    let endpoint = match tls {
        Some(t) => Endpoint::from_shared(format!("https://{addr}"))?.tls_config(t.clone())?,
        None => Endpoint::from_shared(format!("http://{addr}"))?,
    };
    Ok(endpoint
        .executor(super::exec::Executor)
        .local_address(local)
        .connect_timeout(Duration::from_secs(2))
        .tcp_nodelay(true)
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(5))
        .connect_lazy())
}

/// Channels by address, shared by every user of the peer connections.
#[derive(Default)]
pub struct Channels {
    by_addr: Mutex<HashMap<String, Channel>>,
    local: Option<IpAddr>,
    tls: Option<ClientTlsConfig>,
}

impl Channels {
    /// Outgoing connections bound to `local` when it is a specific address
    /// (not `0.0.0.0` or `::`).
    pub fn new(local: IpAddr, tls: Option<ClientTlsConfig>) -> Channels {
        Channels {
            by_addr: Mutex::default(),
            local: (!local.is_unspecified()).then_some(local),
            tls,
        }
    }

    pub fn get(&self, addr: &str) -> Result<PeerClient<Channel>, tonic::transport::Error> {
        let mut map = self.by_addr.lock().unwrap_or_else(|p| p.into_inner());
        let ch = match map.get(addr) {
            Some(c) => c.clone(),
            None => {
                let c = channel(addr, self.local, self.tls.as_ref())?;
                map.insert(addr.to_owned(), c.clone());
                c
            }
        };
        Ok(PeerClient::new(ch).max_decoding_message_size(256 * 1024 * 1024))
    }
}

pub fn encode<T: Serialize>(v: &T) -> RaftBytes {
    RaftBytes {
        data: postcard::to_allocvec(v).unwrap_or_default(),
    }
}

pub fn decode<T: DeserializeOwned>(b: &RaftBytes) -> Result<T, postcard::Error> {
    postcard::from_bytes(&b.data)
}

#[derive(Clone)]
pub struct Network {
    pub channels: Arc<Channels>,
    pub contacts: Arc<Contacts>,
}

pub struct Connection {
    target: NodeId,
    addr: String,
    channels: Arc<Channels>,
    contacts: Arc<Contacts>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = Connection;

    async fn new_client(&mut self, target: NodeId, node: &BasicNode) -> Connection {
        Connection {
            target,
            addr: node.addr.clone(),
            channels: self.channels.clone(),
            contacts: self.contacts.clone(),
        }
    }
}

type RpcErr<E> = RPCError<NodeId, BasicNode, RaftError<NodeId, E>>;

/// The metadata key naming the node a Raft RPC is meant for. A process
/// at a member's address may be another member by now (a pod back with an
/// empty volume has a new id); it must not answer for the old one, whose
/// log and votes it does not have.
pub const TARGET: &str = "x-raft-target";

/// One generated client method, boxed.
type Rpc = fn(
    PeerClient<Channel>,
    tonic::Request<RaftBytes>,
) -> futures_util::future::BoxFuture<
    'static,
    Result<tonic::Response<RaftBytes>, tonic::Status>,
>;

impl Connection {
    /// One RPC: encode, call, decode the remote `Result`.
    async fn call<Req, Resp, E>(
        &self,
        req: &Req,
        ttl: Duration,
        rpc: Rpc,
    ) -> Result<Resp, RpcErr<E>>
    where
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    {
        let client = self
            .channels
            .get(&self.addr)
            .map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
        let mut request = tonic::Request::new(encode(req));
        if let Ok(v) = self.target.to_string().parse() {
            request.metadata_mut().insert(TARGET, v);
        }
        let reply = match tokio::time::timeout(ttl, rpc(client, request)).await {
            Ok(Ok(r)) => r.into_inner(),
            Ok(Err(status)) => {
                return Err(if status.code() == tonic::Code::Unavailable {
                    RPCError::Unreachable(Unreachable::new(&status))
                } else {
                    RPCError::Network(NetworkError::new(&status))
                })
            }
            Err(elapsed) => return Err(RPCError::Unreachable(Unreachable::new(&elapsed))),
        };
        self.contacts.saw(self.target);
        let result: Result<Resp, RaftError<NodeId, E>> =
            decode(&reply).map_err(|e| RPCError::Network(NetworkError::new(&e)))?;
        result.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for Connection {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        self.call(&rpc, option.hard_ttl(), |mut c, b| {
            Box::pin(async move { c.append_entries(b).await })
        })
        .await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<InstallSnapshotResponse<NodeId>, RpcErr<InstallSnapshotError>> {
        self.call(&rpc, option.hard_ttl(), |mut c, b| {
            Box::pin(async move { c.install_snapshot(b).await })
        })
        .await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RpcErr<openraft::error::Infallible>> {
        self.call(&rpc, option.hard_ttl(), |mut c, b| {
            Box::pin(async move { c.vote(b).await })
        })
        .await
    }
}

/// The members of a membership config: voters and learners, with addresses.
pub fn members(
    m: &openraft::Membership<NodeId, BasicNode>,
) -> (BTreeSet<NodeId>, BTreeMap<NodeId, String>) {
    let voters: BTreeSet<NodeId> = m.voter_ids().collect();
    let nodes = m.nodes().map(|(id, n)| (*id, n.addr.clone())).collect();
    (voters, nodes)
}
