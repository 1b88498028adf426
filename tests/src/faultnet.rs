//! A fault-injecting TCP proxy between cluster nodes: real partitions on
//! loopback without root or a firewall.
//!
//! Each node gets a proxy on a loopback address of its own and advertises
//! it (`advertise_addr`), so every connection *to* that node passes the
//! proxy. Nodes dial out from their own cluster address, so the proxy
//! knows *who* is calling by the source address. A cut pair has its open
//! connections closed and new ones refused at once, in the direction(s)
//! cut, until it is healed.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};

use anyhow::Context as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

type NodeId = u64;

#[derive(Default)]
struct Routes {
    /// Node by the address it dials out from.
    by_ip: HashMap<IpAddr, NodeId>,
    /// Where each node's proxy forwards to.
    target: HashMap<NodeId, SocketAddr>,
}

/// The proxies of one test cluster and the cuts between them.
pub struct FaultNet {
    routes: Arc<Mutex<Routes>>,
    /// Cut directed pairs (from, to).
    cuts: watch::Sender<HashSet<(NodeId, NodeId)>>,
    nodes: Mutex<Vec<NodeId>>,
    rt: Option<tokio::runtime::Runtime>,
}

impl FaultNet {
    pub fn new() -> anyhow::Result<FaultNet> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("faultnet")
            .enable_all()
            .build()?;
        Ok(FaultNet {
            routes: Arc::default(),
            cuts: watch::channel(HashSet::new()).0,
            nodes: Mutex::default(),
            rt: Some(rt),
        })
    }

    fn rt(&self) -> &tokio::runtime::Runtime {
        self.rt.as_ref().expect("runtime lives until drop")
    }

    /// Opens the proxy for `node` and returns the address it listens on
    /// (the node's `advertise_addr`). Connections are refused until
    /// [`FaultNet::route`] says where the node is.
    pub fn listen(&self, node: NodeId) -> anyhow::Result<SocketAddr> {
        let ip = crate::node::fresh_ip();
        let std_listener = std::net::TcpListener::bind((ip, 0))
            .with_context(|| format!("cannot bind a proxy on {ip}"))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let routes = self.routes.clone();
        let cuts = self.cuts.subscribe();
        self.nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(node);
        let _guard = self.rt().enter();
        let listener = TcpListener::from_std(std_listener)?;
        self.rt().spawn(serve(listener, node, routes, cuts));
        Ok(addr)
    }

    /// `node` listens for cluster traffic on `cluster` and dials out from
    /// its address.
    pub fn route(&self, node: NodeId, cluster: SocketAddr) {
        let mut r = self.routes.lock().unwrap_or_else(|p| p.into_inner());
        r.by_ip.insert(cluster.ip(), node);
        r.target.insert(node, cluster);
    }

    /// Splits the nodes into groups that cannot reach each other; nodes in
    /// no group are cut off from everyone.
    pub fn partition(&self, groups: &[&[NodeId]]) {
        let nodes = self.nodes.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let group_of = |n: NodeId| groups.iter().position(|g| g.contains(&n));
        let mut cut = HashSet::new();
        for &a in &nodes {
            for &b in &nodes {
                if a != b && (group_of(a).is_none() || group_of(a) != group_of(b)) {
                    cut.insert((a, b));
                }
            }
        }
        self.cuts.send_replace(cut);
    }

    /// Cuts `node` off from every other node, both ways.
    pub fn isolate(&self, node: NodeId) {
        let others: Vec<NodeId> = self
            .nodes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .copied()
            .filter(|&n| n != node)
            .collect();
        self.partition(&[&[node], &others]);
    }

    /// Every node reaches every other again.
    pub fn heal(&self) {
        self.cuts.send_replace(HashSet::new());
    }
}

impl Drop for FaultNet {
    fn drop(&mut self) {
        if let Some(rt) = self.rt.take() {
            // Callable from inside a test's own runtime, unlike a plain drop.
            rt.shutdown_background();
        }
    }
}

async fn serve(
    listener: TcpListener,
    to: NodeId,
    routes: Arc<Mutex<Routes>>,
    cuts: watch::Receiver<HashSet<(NodeId, NodeId)>>,
) {
    while let Ok((inbound, peer)) = listener.accept().await {
        let (from, target) = {
            let r = routes.lock().unwrap_or_else(|p| p.into_inner());
            (r.by_ip.get(&peer.ip()).copied(), r.target.get(&to).copied())
        };
        let mut cuts = cuts.clone();
        tokio::spawn(async move {
            let is_cut = |c: &HashSet<(NodeId, NodeId)>| from.is_some_and(|f| c.contains(&(f, to)));
            let Some(target) = target else { return };
            if is_cut(&cuts.borrow_and_update()) {
                return;
            }
            let Ok(outbound) = TcpStream::connect(target).await else {
                return;
            };
            let _ = inbound.set_nodelay(true);
            let _ = outbound.set_nodelay(true);
            let (mut a, mut b) = (inbound, outbound);
            tokio::select! {
                _ = tokio::io::copy_bidirectional(&mut a, &mut b) => {}
                _ = async {
                    while cuts.changed().await.is_ok() {
                        if is_cut(&cuts.borrow_and_update()) {
                            return;
                        }
                    }
                    std::future::pending::<()>().await
                } => {}
            }
        });
    }
}
