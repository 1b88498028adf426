//! The XMPP server node. `main.rs` parses flags and calls [`run`]; the
//! folders follow DESIGN.md: `c2s/` talks to clients, [`router`] decides
//! where stanzas go, [`sessions`] knows who is online here, [`modules`]
//! hold the features, [`cluster`] applies every durable write, [`store`]
//! reads it back, [`admin`] serves `clusterctl`.

pub mod accounts;
pub mod admin;
pub mod c2s;
pub mod cluster;
pub mod config;
pub mod fds;
pub mod federation;
pub mod files;
pub mod http;
pub mod metrics;
pub mod modules;
pub mod router;
pub mod sessions;
pub mod store;
pub mod telemetry;
pub mod tls;

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context as _;

use crate::c2s::throttle::AuthThrottle;
use crate::cluster::Cluster;
use crate::config::Config;
use crate::modules::Module;
use crate::sessions::Sessions;
use crate::store::Store;

/// Everything a connection, a module or the admin service needs, shared.
pub struct Server {
    pub config: Config,
    pub tls: tls::Tls,
    pub cluster: Cluster,
    pub sessions: Sessions,
    pub modules: Vec<Box<dyn Module>>,
    pub throttle: AuthThrottle,
    /// This server, for work a module hands to a task of its own.
    me: std::sync::Weak<Server>,
    /// Connections still negotiating, capped in all and per address.
    pub admission: Arc<c2s::admission::Admission>,
    /// Bound session tasks still running, counted until each has routed
    /// again what its client did not acknowledge (the shutdown drain
    /// waits for zero).
    pub session_tasks: Arc<std::sync::atomic::AtomicUsize>,
    /// In-band registrations, one per address per interval.
    pub registrations: c2s::admission::Registrations,
    /// Offline messages being handed to sessions now.
    pub offline: modules::offline::Deliveries,
    /// PBKDF2 (PLAIN logins, registration, password changes), off the
    /// async workers.
    pub kdf: accounts::KdfPool,
    /// Key for the fake SCRAM salts of unknown users: the same user name
    /// gets the same salt every time, as a real account would, so probing
    /// SCRAM does not tell who has an account. Kept in the data dir.
    pub sasl_secret: Vec<u8>,
    /// Sessions that can be resumed (XEP-0198), by stream id.
    pub resumable: c2s::sm::Registry,
    pub started: Instant,
    /// Streams to and from other domains (`None` when `s2s.enabled` is off).
    pub s2s: Option<Arc<s2s::Federation>>,
    /// Flips to `true` once: every listener and session task watches it.
    pub shutdown: tokio::sync::watch::Sender<bool>,
    /// What `/metrics` shows; counted where things happen.
    pub metrics: metrics::Metrics,
}

impl Server {
    pub fn store(&self) -> &Store {
        self.cluster.store()
    }

    /// This server as an `Arc` (`None` only while it is being dropped).
    pub fn arc(&self) -> Option<Arc<Server>> {
        self.me.upgrade()
    }
}

/// Opens the data directory and TLS material, then serves until SIGTERM/SIGINT.
pub async fn run(mut config: Config) -> anyhow::Result<()> {
    files::private_dir(&config.data_dir)
        .with_context(|| format!("cannot create data dir {}", config.data_dir.display()))?;
    config.node_id = node_identity(&config)?;
    // Logs and traces name the node, so they start once its id is known.
    let telemetry = telemetry::init(&config);
    match fds::raise_limit() {
        Ok(l) => tracing::info!(
            soft_before = l.soft_before,
            soft = l.soft,
            hard = l.hard,
            "open-files limit: every connection takes one"
        ),
        Err(e) => tracing::warn!(error = %e, "cannot read or raise the open-files limit"),
    }
    let store = Store::open(&config.data_dir.join("db")).with_context(|| {
        format!(
            "cannot open the database in {} (is another xmpp-node using it?)",
            config.data_dir.display()
        )
    })?;
    let (cluster, feeds) = Cluster::open(&config, store)
        .await
        .context("cannot open the Raft log and state machine")?;
    let tls = tls::Tls::load(&config).context("cannot set up TLS")?;
    let sasl_secret = load_or_make_secret(&config.data_dir.join("sasl.secret"))?;
    let admin_token = match &config.admin.token_file {
        Some(path) => {
            let t = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read admin.token_file {}", path.display()))?;
            let t = t.trim().to_owned();
            if t.len() < 16 {
                anyhow::bail!(
                    "admin.token_file {}: the token is {} characters; use at least 16 random ones (e.g. `head -c 32 /dev/urandom | base64`)",
                    path.display(),
                    t.len()
                );
            }
            Some(t)
        }
        None => None,
    };
    let (shutdown, _) = tokio::sync::watch::channel(false);
    let server = Arc::new_cyclic(|me| Server {
        me: me.clone(),
        offline: modules::offline::Deliveries::default(),
        admission: c2s::admission::Admission::new(
            config.limits.max_unauthenticated,
            config.limits.max_unauthenticated_per_address,
        ),
        session_tasks: Arc::default(),
        registrations: c2s::admission::Registrations::new(std::time::Duration::from_secs(
            config.auth.registration_interval_secs,
        )),
        throttle: AuthThrottle::new(&config.auth),
        kdf: accounts::KdfPool::default(),
        resumable: c2s::sm::Registry::default(),
        sasl_secret,
        s2s: federation::build(&config, me.clone()),
        modules: modules::all(&config),
        config,
        tls,
        cluster,
        sessions: Sessions::default(),
        started: Instant::now(),
        shutdown,
        metrics: metrics::Metrics::new(),
    });

    let c2s_plain = tokio::net::TcpListener::bind(server.config.listen.c2s)
        .await
        .with_context(|| format!("cannot listen on c2s address {}", server.config.listen.c2s))?;
    let c2s_tls = tokio::net::TcpListener::bind(server.config.listen.c2s_tls)
        .await
        .with_context(|| {
            format!(
                "cannot listen on c2s TLS address {}",
                server.config.listen.c2s_tls
            )
        })?;
    let peer = tokio::net::TcpListener::bind(server.config.cluster.addr)
        .await
        .with_context(|| {
            format!(
                "cannot listen on cluster address {}",
                server.config.cluster.addr
            )
        })?;
    let s2s_listeners = federation::bind(&server.config).await?;
    let http_listeners = http::bind(&server.config).await?;
    let grpc = tokio::net::TcpListener::bind(server.config.listen.grpc)
        .await
        .with_context(|| {
            format!(
                "cannot listen on gRPC address {}",
                server.config.listen.grpc
            )
        })?;
    tracing::info!(
        vhosts = ?server.config.vhosts.iter().map(|v| v.name.as_str()).collect::<Vec<_>>(),
        c2s = %server.config.listen.c2s,
        c2s_tls = %server.config.listen.c2s_tls,
        grpc = %server.config.listen.grpc,
        cluster = %server.config.cluster.addr,
        node_id = server.config.node_id,
        data_dir = %server.config.data_dir.display(),
        "xmpp-node ready"
    );

    let (inbox, inbox_rx) = tokio::sync::mpsc::channel(1024);
    let tasks = [
        tokio::spawn(serve_peer(server.clone(), peer, inbox)),
        tokio::spawn(router::remote::run(server.clone(), feeds, inbox_rx)),
        tokio::spawn(c2s::listen(server.clone(), c2s_plain, false)),
        tokio::spawn(c2s::listen(server.clone(), c2s_tls, true)),
        tokio::spawn(admin::serve(server.clone(), grpc, admin_token)),
    ];
    cluster::membership::start(server.clone());
    federation::start(&server, s2s_listeners);
    http::start(&server, http_listeners);
    metrics::start(&server);
    modules::upload::start(&server);

    wait_for_signal().await;
    tracing::info!("shutting down");
    // A leader hands over first: the rest of the cluster goes on writing
    // while this node drains, instead of waiting out an election.
    cluster::membership::hand_over_leadership(&server.cluster).await;
    // Listeners stop accepting; every session writes its stream error,
    // then routes again what its client never acknowledged (to offline
    // storage, through the cluster) before it counts as gone.
    let _ = server.shutdown.send(true);
    server
        .sessions
        .close_all(xmpp::error::StreamError::SystemShutdown);
    let drain = std::time::Duration::from_secs(server.config.limits.shutdown_drain_secs);
    let deadline = Instant::now() + drain;
    while server
        .session_tasks
        .load(std::sync::atomic::Ordering::Acquire)
        > 0
        && Instant::now() < deadline
    {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let left = server
        .session_tasks
        .load(std::sync::atomic::Ordering::Acquire);
    if left > 0 {
        tracing::warn!(
            sessions = left,
            drain_secs = drain.as_secs(),
            "shutdown drain time over with sessions still handing over their messages; what they held waits in the Raft log or is lost if it never reached it"
        );
    } else {
        tracing::info!("every session handed over its messages");
    }
    for t in tasks {
        t.abort();
    }
    server.cluster.shutdown().await.context("final flush")?;
    telemetry.shutdown().await;
    Ok(())
}

/// The inter-node listener: openraft's RPCs, forwarded writes and stanzas.
async fn serve_peer(
    server: Arc<Server>,
    listener: tokio::net::TcpListener,
    inbox: cluster::service::Inbox,
) {
    let svc = cluster::service::PeerService {
        raft: server.cluster.raft.clone(),
        combiner: server.cluster.combiner.clone(),
        channels: server.cluster.channels.clone(),
        inbox,
        upload_dir: server.config.upload.dir(&server.config.data_dir),
        server: Arc::downgrade(&server),
    };
    let incoming = tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true));
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &server.cluster.tls {
        builder = match builder.tls_config(tls.server.clone()) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(error = %e, "cannot use the cluster certificate; the cluster listener is not running");
                return;
            }
        };
    }
    let result = builder
        .add_service(
            proto::peer_server::PeerServer::new(svc).max_decoding_message_size(256 * 1024 * 1024),
        )
        .serve_with_incoming(incoming)
        .await;
    if let Err(e) = result {
        tracing::error!(error = %e, "cluster listener failed");
    }
}

/// This node's id: `node_id` when configured, else the one kept in
/// `data_dir/node.id`, else a new random one (a new data dir is a new
/// member: a pod back with an empty volume must not pose as its old self,
/// whose Raft votes and log it has lost). A data dir from before ids were
/// kept is node 1, the old default. A configured id that contradicts the
/// kept one is refused rather than silently becoming another member.
fn node_identity(config: &Config) -> anyhow::Result<u64> {
    let path = config.data_dir.join("node.id");
    let kept = match std::fs::read_to_string(&path) {
        Ok(s) => Some(s.trim().parse::<u64>().ok().filter(|&i| i != 0).with_context(|| {
            format!(
                "{} does not hold a node id; remove it only if this data dir is to become a new member",
                path.display()
            )
        })?),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    let id = match (config.node_id, kept) {
        (0, Some(id)) => id,
        (0, None) if config.data_dir.join("db").exists() => 1,
        // Below 2^53, so the id survives JSON tooling unchanged.
        (0, None) => rand::Rng::gen_range(&mut rand::thread_rng(), 1..(1u64 << 53)),
        (set, Some(id)) if set != id => anyhow::bail!(
            "node_id is {set}, but data dir {} belongs to node {id}: give node_id = {id}, or a new data dir for a new member",
            config.data_dir.display()
        ),
        (set, _) => set,
    };
    if kept.is_none() {
        std::fs::write(&path, format!("{id}\n"))
            .with_context(|| format!("cannot write {}", path.display()))?;
    }
    Ok(id)
}

/// 32 random bytes, made once and kept in `path` (mode 0600).
fn load_or_make_secret(path: &std::path::Path) -> anyhow::Result<Vec<u8>> {
    if let Ok(bytes) = std::fs::read(path) {
        if bytes.len() == 32 {
            return Ok(bytes);
        }
    }
    let mut secret = vec![0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut secret);
    files::write_private(path, &secret)
        .with_context(|| format!("cannot write {}", path.display()))?;
    Ok(secret)
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = term.recv() => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}
