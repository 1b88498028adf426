//! The node's configuration: one TOML file, every setting also a flag and an
//! `XMPP_`-prefixed environment variable, embedded defaults for the rest.
//!
//! Precedence: flag or environment variable > file > default. Every limit,
//! timeout and default of the node lives here with its documentation
//! (STYLE.md habit 8); nothing else hard-codes them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

/// Command-line flags of `xmpp-node`. Each also reads `XMPP_<NAME>`.
#[derive(Debug, Parser, Default)]
#[command(
    name = "xmpp-node",
    version,
    about = "A clustered, federated XMPP server node"
)]
pub struct Flags {
    /// TOML configuration file.
    #[arg(long, env = "XMPP_CONFIG")]
    pub config: Option<PathBuf>,
    /// Where accounts, offline messages and generated certificates live.
    #[arg(long, env = "XMPP_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// A virtual host to serve (repeatable; replaces the file's list).
    #[arg(long = "vhost", env = "XMPP_VHOST", value_delimiter = ',')]
    pub vhosts: Vec<String>,
    /// Client-to-server listener with STARTTLS.
    #[arg(long, env = "XMPP_C2S_ADDR")]
    pub c2s_addr: Option<SocketAddr>,
    /// Client-to-server listener with direct TLS (XEP-0368).
    #[arg(long, env = "XMPP_C2S_TLS_ADDR")]
    pub c2s_tls_addr: Option<SocketAddr>,
    /// Server-to-server listener (federation).
    #[arg(long, env = "XMPP_S2S_ADDR")]
    pub s2s_addr: Option<SocketAddr>,
    /// HTTP listener (BOSH, WebSocket, XEP-0156 discovery).
    #[arg(long, env = "XMPP_HTTP_ADDR")]
    pub http_addr: Option<SocketAddr>,
    /// HTTPS listener (the same, over TLS with the vhosts' certificates).
    #[arg(long, env = "XMPP_HTTPS_ADDR")]
    pub https_addr: Option<SocketAddr>,
    /// Admin and cluster gRPC listener (clusterctl talks to it).
    #[arg(long, env = "XMPP_GRPC_ADDR")]
    pub grpc_addr: Option<SocketAddr>,
    /// Log filter, e.g. `info` or `node=debug,info`.
    #[arg(long, env = "XMPP_LOG_LEVEL")]
    pub log_level: Option<String>,
    /// Allow in-band registration (XEP-0077).
    #[arg(long, env = "XMPP_ALLOW_REGISTRATION")]
    pub allow_registration: Option<bool>,
    /// Keep message archives (XEP-0313), `[mam] enabled`.
    #[arg(long, env = "XMPP_MAM_ENABLED")]
    pub mam_enabled: Option<bool>,
    /// `[mam] retention_days`: archived messages older than this go (0: kept).
    #[arg(long, env = "XMPP_MAM_RETENTION_DAYS")]
    pub mam_retention_days: Option<u64>,
    /// `[mam] batch_ms`: how long a message waits for others to share its
    /// archive write.
    #[arg(long, env = "XMPP_MAM_BATCH_MS")]
    pub mam_batch_ms: Option<u64>,
    /// Require TLS before authentication on the STARTTLS listener.
    #[arg(long, env = "XMPP_REQUIRE_TLS")]
    pub require_tls: Option<bool>,
    /// PBKDF2 iteration count for newly stored SCRAM credentials.
    #[arg(long, env = "XMPP_SCRAM_ITERATIONS")]
    pub scram_iterations: Option<u32>,
    /// This node's id in the cluster.
    #[arg(long, env = "XMPP_NODE_ID")]
    pub node_id: Option<u64>,
    /// Log format: text or json.
    #[arg(long, env = "XMPP_LOG_FORMAT")]
    pub log_format: Option<LogFormat>,
    /// [auth] failure_delay_ms
    #[arg(long, env = "XMPP_FAILURE_DELAY_MS")]
    pub failure_delay_ms: Option<u64>,
    /// [auth] max_failure_delay_ms
    #[arg(long, env = "XMPP_MAX_FAILURE_DELAY_MS")]
    pub max_failure_delay_ms: Option<u64>,
    /// [auth] failure_memory_secs
    #[arg(long, env = "XMPP_FAILURE_MEMORY_SECS")]
    pub failure_memory_secs: Option<u64>,
    /// [auth] max_attempts_per_stream
    #[arg(long, env = "XMPP_MAX_ATTEMPTS_PER_STREAM")]
    pub max_attempts_per_stream: Option<u32>,
    /// [auth] strict_channel_binding
    #[arg(long, env = "XMPP_STRICT_CHANNEL_BINDING")]
    pub strict_channel_binding: Option<bool>,
    /// [limits] max_stanza_bytes
    #[arg(long, env = "XMPP_MAX_STANZA_BYTES")]
    pub max_stanza_bytes: Option<usize>,
    /// [limits] max_depth
    #[arg(long, env = "XMPP_MAX_DEPTH")]
    pub max_depth: Option<usize>,
    /// [limits] max_attrs
    #[arg(long, env = "XMPP_MAX_ATTRS")]
    pub max_attrs: Option<usize>,
    /// [limits] negotiation_timeout_secs
    #[arg(long, env = "XMPP_NEGOTIATION_TIMEOUT_SECS")]
    pub negotiation_timeout_secs: Option<u64>,
    /// [limits] offline_max_messages
    #[arg(long, env = "XMPP_OFFLINE_MAX_MESSAGES")]
    pub offline_max_messages: Option<usize>,
    /// [limits] session_queue
    #[arg(long, env = "XMPP_SESSION_QUEUE")]
    pub session_queue: Option<usize>,
    /// [limits] write_timeout_secs
    #[arg(long, env = "XMPP_WRITE_TIMEOUT_SECS")]
    pub write_timeout_secs: Option<u64>,
    /// [limits] resume_timeout_secs
    #[arg(long, env = "XMPP_RESUME_TIMEOUT_SECS")]
    pub resume_timeout_secs: Option<u64>,
    /// [limits] max_roster_items
    #[arg(long, env = "XMPP_MAX_ROSTER_ITEMS")]
    pub max_roster_items: Option<usize>,
    /// [limits] max_blocklist_items
    #[arg(long, env = "XMPP_MAX_BLOCKLIST_ITEMS")]
    pub max_blocklist_items: Option<usize>,
    /// [limits] max_unauthenticated
    #[arg(long, env = "XMPP_MAX_UNAUTHENTICATED")]
    pub max_unauthenticated: Option<usize>,
    /// [limits] max_unauthenticated_per_address
    #[arg(long, env = "XMPP_MAX_UNAUTHENTICATED_PER_ADDRESS")]
    pub max_unauthenticated_per_address: Option<usize>,
    /// [limits] stanzas_per_second
    #[arg(long, env = "XMPP_STANZAS_PER_SECOND")]
    pub stanzas_per_second: Option<u32>,
    /// [limits] stanza_burst
    #[arg(long, env = "XMPP_STANZA_BURST")]
    pub stanza_burst: Option<u32>,
    /// [limits] max_sessions_per_account
    #[arg(long, env = "XMPP_MAX_SESSIONS_PER_ACCOUNT")]
    pub max_sessions_per_account: Option<usize>,
    /// [limits] idle_ping_secs
    #[arg(long, env = "XMPP_IDLE_PING_SECS")]
    pub idle_ping_secs: Option<u64>,
    /// [limits] ping_timeout_secs
    #[arg(long, env = "XMPP_PING_TIMEOUT_SECS")]
    pub ping_timeout_secs: Option<u64>,
    /// [limits] tcp_keepalive_secs
    #[arg(long, env = "XMPP_TCP_KEEPALIVE_SECS")]
    pub tcp_keepalive_secs: Option<u64>,
    /// [limits] offline_max_bytes
    #[arg(long, env = "XMPP_OFFLINE_MAX_BYTES")]
    pub offline_max_bytes: Option<u64>,
    /// [limits] session_queue_bytes
    #[arg(long, env = "XMPP_SESSION_QUEUE_BYTES")]
    pub session_queue_bytes: Option<usize>,
    /// [limits] max_unacked_bytes
    #[arg(long, env = "XMPP_MAX_UNACKED_BYTES")]
    pub max_unacked_bytes: Option<usize>,
    /// [limits] csi_max_held
    #[arg(long, env = "XMPP_CSI_MAX_HELD")]
    pub csi_max_held: Option<usize>,
    /// [limits] csi_held_bytes
    #[arg(long, env = "XMPP_CSI_HELD_BYTES")]
    pub csi_held_bytes: Option<usize>,
    /// [limits] max_private_bytes
    #[arg(long, env = "XMPP_MAX_PRIVATE_BYTES")]
    pub max_private_bytes: Option<u64>,
    /// [limits] max_vcard_bytes
    #[arg(long, env = "XMPP_MAX_VCARD_BYTES")]
    pub max_vcard_bytes: Option<usize>,
    /// [limits] max_subscription_request_bytes
    #[arg(long, env = "XMPP_MAX_SUBSCRIPTION_REQUEST_BYTES")]
    pub max_subscription_request_bytes: Option<usize>,
    /// [limits] max_roster_tombstones
    #[arg(long, env = "XMPP_MAX_ROSTER_TOMBSTONES")]
    pub max_roster_tombstones: Option<usize>,
    /// [limits] shutdown_drain_secs
    #[arg(long, env = "XMPP_SHUTDOWN_DRAIN_SECS")]
    pub shutdown_drain_secs: Option<u64>,
    /// [auth] registration_interval_secs
    #[arg(long, env = "XMPP_REGISTRATION_INTERVAL_SECS")]
    pub registration_interval_secs: Option<u64>,

    /// This node's inter-node listener (Raft, forwarded writes, stanzas).
    #[arg(long, env = "XMPP_CLUSTER_ADDR")]
    pub cluster_addr: Option<SocketAddr>,

    /// The address other nodes dial to reach this one (`host:port`; a DNS
    /// name works). Defaults to --cluster-addr.
    #[arg(long, env = "XMPP_ADVERTISE_ADDR")]
    pub advertise_addr: Option<String>,

    /// The cluster CA certificate (PEM): with --cluster-cert and
    /// --cluster-key, mutual TLS between nodes.
    #[arg(long, env = "XMPP_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,

    /// This node's certificate for inter-node TLS (PEM).
    #[arg(long, env = "XMPP_CLUSTER_CERT")]
    pub cluster_cert: Option<PathBuf>,

    /// This node's private key for inter-node TLS (PEM).
    #[arg(long, env = "XMPP_CLUSTER_KEY")]
    pub cluster_key: Option<PathBuf>,

    /// A file holding the token every admin API call must carry.
    #[arg(long, env = "XMPP_ADMIN_TOKEN_FILE")]
    pub admin_token_file: Option<PathBuf>,

    /// Join the cluster through this member's cluster address (repeatable;
    /// tried in turn). Without it, a node with an empty data dir starts a
    /// cluster of its own.
    #[arg(long = "join", env = "XMPP_JOIN", value_delimiter = ',')]
    pub join: Vec<String>,

    #[arg(long, env = "XMPP_CLUSTER_WRITE_TIMEOUT_MS")]
    pub cluster_write_timeout_ms: Option<u64>,

    #[arg(long, env = "XMPP_NODE_DOWN_GRACE_SECS")]
    pub node_down_grace_secs: Option<u64>,

    #[arg(long, env = "XMPP_HEARTBEAT_MS")]
    pub heartbeat_ms: Option<u64>,

    #[arg(long, env = "XMPP_ELECTION_TIMEOUT_MS")]
    pub election_timeout_ms: Option<u64>,

    #[arg(long, env = "XMPP_SNAPSHOT_EVERY")]
    pub snapshot_every: Option<u64>,

    /// [trace] otlp_endpoint: an OTLP/gRPC collector, e.g.
    /// `http://127.0.0.1:4317`; empty: no traces.
    #[arg(long, env = "XMPP_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// [trace] sample_ratio
    #[arg(long, env = "XMPP_TRACE_SAMPLE_RATIO")]
    pub trace_sample_ratio: Option<f64>,
}

/// The whole configuration, after file, flags and defaults are merged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This node's id in the cluster; 0 (the default): chosen at the
    /// first start and kept in the data dir (`node.id`), so a pod gets no
    /// id from outside and an empty volume is a new member.
    pub node_id: u64,
    /// Data directory (sled database, generated certificates).
    pub data_dir: PathBuf,
    /// Virtual hosts served by this node.
    pub vhosts: Vec<VHost>,
    pub listen: Listen,
    pub tls: Tls,
    pub auth: Auth,
    pub limits: Limits,
    pub log: Log,
    pub trace: Trace,
    pub cluster: ClusterConfig,
    pub admin: Admin,
    pub s2s: S2s,
    pub http: Http,
    pub mam: Mam,
    pub pep: Pep,
    pub muc: Muc,
    pub push: Push,
    pub upload: Upload,
    /// Contact addresses published in the server's disco#info (XEP-0157).
    pub contact: Contact,
    /// STUN and TURN servers offered to clients for calls (XEP-0215).
    pub extdisco: Vec<ExtService>,
}

/// XEP-0157 addresses (URIs: `mailto:`, `xmpp:`, `https:`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Contact {
    pub abuse: Vec<String>,
    pub admin: Vec<String>,
    pub feedback: Vec<String>,
    pub sales: Vec<String>,
    pub security: Vec<String>,
    pub support: Vec<String>,
}

/// One external service (XEP-0215), e.g. a coturn server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExtService {
    /// `stun`, `turn`, `stuns` or `turns`.
    #[serde(rename = "type")]
    pub kind: String,
    pub host: String,
    pub port: u16,
    /// `udp` or `tcp`.
    #[serde(default = "default_transport")]
    pub transport: String,
    /// The TURN REST shared secret (coturn's `static-auth-secret`): each
    /// client gets a user name and password valid for `ttl_secs`.
    #[serde(default)]
    pub secret: Option<String>,
    #[serde(default = "default_ttl")]
    pub ttl_secs: u64,
}

fn default_transport() -> String {
    "udp".into()
}

fn default_ttl() -> u64 {
    86_400
}

/// Message Archive Management (XEP-0313): every user's conversations,
/// kept on every node of the cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Mam {
    /// Archive messages and answer archive queries at all.
    pub enabled: bool,
    /// What is archived for a user who set no preferences: `always`,
    /// `roster` (conversations with roster contacts only) or `never`.
    pub default: String,
    /// Messages older than this many days are deleted (0: kept for ever).
    pub retention_days: u64,
    /// Most messages kept per user; the oldest go first.
    pub max_messages_per_user: u64,
    /// Results per query page when the client does not ask for fewer.
    pub default_page: usize,
    /// Most results per query page, whatever the client asks for.
    pub max_page: usize,
    /// How long the first message waiting to be archived waits for others
    /// to share its replicated write (milliseconds; 0: none). Each message
    /// is routed once its archive entry is committed, so this is added
    /// latency, traded for fewer, larger writes.
    pub batch_ms: u64,
}

impl Default for Mam {
    fn default() -> Self {
        Mam {
            enabled: true,
            default: "always".into(),
            retention_days: 0,
            max_messages_per_user: 100_000,
            default_page: 50,
            max_page: 250,
            batch_ms: 1,
        }
    }
}

/// Push notifications (XEP-0357) to the app servers clients register.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Push {
    pub enabled: bool,
    /// Send the message body in the summary (off: sender and count only,
    /// so the app server and the phone vendor's push service see no text).
    pub include_body: bool,
}

impl Default for Push {
    fn default() -> Self {
        Push {
            enabled: true,
            include_body: false,
        }
    }
}

/// HTTP File Upload (XEP-0363): an `upload.<vhost>` service per virtual
/// host hands out slots; files are PUT to and fetched from the HTTP
/// listeners at `/upload/<slot>/<name>`, from any node of the cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Upload {
    pub enabled: bool,
    /// The service of `example.com` is `upload.example.com`.
    pub subdomain: String,
    /// Largest file, in bytes (announced in disco#info, XEP-0363 §2).
    pub max_file_size: u64,
    /// Bytes one user may hold: the files not yet expired plus the slots
    /// handed out and not yet used.
    pub quota_per_user: u64,
    /// Files are deleted this many days after their upload (0: kept until
    /// the account goes).
    pub expire_days: u64,
    /// A slot that is not used within this many seconds lapses.
    pub slot_expire_secs: u64,
    /// Longest one PUT may take from its first byte to its last; a slower
    /// upload is cut off (and its slot, unused, lapses after this too).
    pub transfer_secs: u64,
    /// Where this node keeps files (default `<data_dir>/uploads`). A volume
    /// every node mounts here lets every node read every file from disk;
    /// otherwise a node fetches a file it lacks from the node that has it.
    pub dir: Option<PathBuf>,
    /// Base URL of the upload and download links, e.g.
    /// `https://upload.example.com` (behind a proxy that passes
    /// `/upload/` to the nodes). Default: `https://<vhost>:<port of
    /// listen.https>`, or `http://<vhost>:<port of listen.http>` when HTTPS
    /// is off.
    pub public_url: Option<String>,
}

impl Default for Upload {
    fn default() -> Self {
        Upload {
            enabled: true,
            subdomain: "upload".into(),
            max_file_size: 100 * 1024 * 1024,
            quota_per_user: 1024 * 1024 * 1024,
            expire_days: 30,
            slot_expire_secs: 600,
            transfer_secs: 3600,
            dir: None,
            public_url: None,
        }
    }
}

impl Upload {
    /// The virtual host whose service `domain` is, if it is one.
    pub fn host_of<'a>(&self, domain: &'a str, config: &Config) -> Option<&'a str> {
        let enabled = self.enabled && config.http.enabled;
        component_host(enabled, &self.subdomain, domain, config)
    }

    /// Where this node keeps the files.
    pub fn dir(&self, data_dir: &Path) -> PathBuf {
        self.dir.clone().unwrap_or_else(|| data_dir.join("uploads"))
    }

    /// The base of the links handed out for `vhost`, without a trailing `/`.
    pub fn base_url(&self, vhost: &str, listen: &Listen) -> String {
        match (&self.public_url, listen.https) {
            (Some(u), _) => u.trim_end_matches('/').to_owned(),
            (None, Some(https)) => format!("https://{vhost}:{}", https.port()),
            (None, None) => format!("http://{vhost}:{}", listen.http.port()),
        }
    }
}

/// Group chat (XEP-0045): a `SUBDOMAIN.<vhost>` service per virtual host.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Muc {
    pub enabled: bool,
    /// The service of `example.com` is `conference.example.com`.
    pub subdomain: String,
    /// Occupants a new room allows (its owner may change it up to this).
    pub max_occupants: u32,
    /// Messages a newcomer gets by default (a room's owner may change it).
    pub history: u32,
    /// Most history messages anyone gets on joining, whatever is asked.
    pub max_history: u32,
    /// Rooms one user may own; creating one more is refused.
    pub max_rooms_per_user: u32,
    /// Room messages one occupant may send per second, sustained, and in
    /// a burst; beyond, `resource-constraint` (the message is not sent).
    pub messages_per_second: f64,
    pub message_burst: f64,
}

impl Default for Muc {
    fn default() -> Self {
        Muc {
            enabled: true,
            subdomain: "conference".into(),
            max_occupants: 200,
            history: 20,
            max_history: 200,
            max_rooms_per_user: 100,
            messages_per_second: 5.0,
            message_burst: 20.0,
        }
    }
}

impl Muc {
    /// The virtual host whose service `domain` is, if it is one.
    pub fn host_of<'a>(&self, domain: &'a str, config: &Config) -> Option<&'a str> {
        component_host(self.enabled, &self.subdomain, domain, config)
    }
}

/// The virtual host of a component's `domain` (`<subdomain>.<vhost>`),
/// when the component is `enabled` and the host is ours.
fn component_host<'a>(
    enabled: bool,
    subdomain: &str,
    domain: &'a str,
    config: &Config,
) -> Option<&'a str> {
    let (sub, host) = domain.split_once('.')?;
    (enabled && sub == subdomain && config.is_local_domain(host)).then_some(host)
}

/// Personal Eventing Protocol (XEP-0163): per-user publish-subscribe nodes
/// (OMEMO keys, avatars, bookmarks, nicknames).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Pep {
    pub enabled: bool,
    /// Nodes per user.
    pub max_nodes: u64,
    /// Items kept per node, whatever a node's `pubsub#max_items` asks (`max`).
    pub max_items: u64,
    /// Largest item payload, in bytes (an avatar's data is its largest).
    pub max_item_bytes: usize,
}

impl Default for Pep {
    fn default() -> Self {
        Pep {
            enabled: true,
            max_nodes: 256,
            max_items: 1000,
            max_item_bytes: 256 * 1024,
        }
    }
}

/// The HTTP transports on `listen.http` and `listen.https`: BOSH
/// (XEP-0124/0206) at `/http-bind`, WebSocket (RFC 7395) at
/// `/xmpp-websocket`, XEP-0156 discovery at `/.well-known/host-meta`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Http {
    /// Serve the HTTP listeners at all.
    pub enabled: bool,
    /// Treat plain-HTTP requests as encrypted: set this only when a
    /// TLS-terminating proxy (an ingress) is the sole way in. Off, SASL
    /// over plain HTTP is refused while `tls.require_c2s` is on.
    pub consider_secure: bool,
    /// Origins whose pages may use BOSH and WebSocket (CORS and the
    /// WebSocket `Origin` check), e.g. `["https://chat.example.com"]`;
    /// `["*"]` allows any page.
    pub allowed_origins: Vec<String>,
    /// Public base URL for the discovery links, e.g.
    /// `https://xmpp.example.com`; by default taken from each request's
    /// `Host` header and scheme.
    pub public_url: Option<String>,
    /// RFC 7395 §3.6: where a WebSocket client is sent when this node
    /// shuts down (`<close see-other-uri=…/>`), e.g. another node's URL.
    pub see_other_uri: Option<String>,
    /// Largest request body; a BOSH body holds several stanzas.
    pub max_body_bytes: usize,
    /// BOSH: longest a request is held open (a client asking for more gets this).
    pub bosh_max_wait_secs: u64,
    /// BOSH: most requests held at once (`hold`).
    pub bosh_max_hold: u64,
    /// BOSH: longest a session may go without a request (`inactivity`).
    pub bosh_inactivity_secs: u64,
    /// BOSH: shortest interval between polls when nothing is held (`polling`).
    pub bosh_polling_secs: u64,
    /// BOSH: output waiting for a client that does not poll, at most.
    pub bosh_max_pending_bytes: usize,
}

impl Default for Http {
    fn default() -> Self {
        Http {
            enabled: true,
            consider_secure: false,
            allowed_origins: vec!["*".into()],
            public_url: None,
            see_other_uri: None,
            max_body_bytes: 1024 * 1024,
            bosh_max_wait_secs: 60,
            bosh_max_hold: 1,
            bosh_inactivity_secs: 60,
            bosh_polling_secs: 5,
            bosh_max_pending_bytes: 4 * 1024 * 1024,
        }
    }
}

impl Http {
    /// Whether a page from `origin` may use the transports.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.allowed_origins
            .iter()
            .any(|o| o == "*" || o.eq_ignore_ascii_case(origin))
    }
}

/// Federation with other domains (`listen.s2s`, DESIGN.md "Federation").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct S2s {
    /// Serve and open server-to-server streams at all. Off: stanzas to
    /// other domains get `remote-server-not-found`.
    pub enabled: bool,
    /// A second listener with TLS from the first byte (XEP-0368), e.g.
    /// `0.0.0.0:5270`; none by default.
    pub direct_tls_addr: Option<SocketAddr>,
    /// Refuse server streams (both ways) without TLS.
    pub require_tls: bool,
    /// How remote domains must prove who they are: `certificate` (a valid
    /// certificate only), `dialback` (a valid certificate, or dialback over
    /// TLS with any certificate), `deny`.
    pub default_policy: String,
    /// Per remote domain policies, e.g. `"partner.example" = "certificate"`.
    pub policies: std::collections::HashMap<String, String>,
    /// Static routes instead of DNS, e.g. `"b.test" = ["127.0.0.2:5269"]`.
    pub routes: std::collections::HashMap<String, Vec<String>>,
    /// Extra trust anchors (PEM) for remote servers' certificates.
    pub ca_file: Option<PathBuf>,
    /// Trust the Mozilla root store for remote servers' certificates.
    pub webpki_roots: bool,
    /// One TCP connection attempt, in seconds.
    pub connect_timeout_secs: u64,
    /// From connecting to an authenticated stream, both ways; queued
    /// stanzas bounce after it.
    pub negotiation_timeout_secs: u64,
    /// An outbound stream idle this long is closed.
    pub idle_timeout_secs: u64,
    /// Stanzas queued for one remote domain; more bounce.
    pub max_queued: usize,
    /// First wait before a domain that failed is tried again (doubles
    /// per failure up to `max_backoff_secs`).
    pub backoff_secs: u64,
    pub max_backoff_secs: u64,
}

impl Default for S2s {
    fn default() -> Self {
        S2s {
            enabled: true,
            direct_tls_addr: None,
            require_tls: true,
            default_policy: "dialback".into(),
            policies: Default::default(),
            routes: Default::default(),
            ca_file: None,
            webpki_roots: true,
            connect_timeout_secs: 10,
            negotiation_timeout_secs: 30,
            idle_timeout_secs: 600,
            max_queued: 10_000,
            backoff_secs: 1,
            max_backoff_secs: 300,
        }
    }
}

/// The admin gRPC API that `clusterctl` talks to (`listen.grpc`).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Admin {
    /// A file holding the bearer token every admin call must carry
    /// (`clusterctl --token-file`). Required when `listen.grpc` is not a
    /// loopback address.
    pub token_file: Option<PathBuf>,
}

/// The Raft cluster (DESIGN.md, "Cluster membership and operations").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClusterConfig {
    /// Inter-node listener. Without `ca`/`cert`/`key` it must be a
    /// loopback address: nothing authenticates a peer otherwise.
    pub addr: SocketAddr,
    /// The cluster CA (PEM): with `cert` and `key`, inter-node gRPC is
    /// mutual TLS, and only peers with a certificate from this CA are let in.
    pub ca: Option<PathBuf>,
    /// This node's certificate (PEM, issued by `ca`, valid for the host
    /// part of its advertised address; `clusterctl certs init` makes them).
    pub cert: Option<PathBuf>,
    /// This node's private key (PEM).
    pub key: Option<PathBuf>,
    /// What peers dial; empty means `addr`.
    pub advertise_addr: String,
    /// Members to ask for admission; empty: bootstrap a cluster of one.
    pub join: Vec<String>,
    /// A write (login, roster change, stored message) that cannot be
    /// committed this long fails with a "no quorum" error instead of waiting.
    pub write_timeout_ms: u64,
    /// A member unreachable this long is declared down: its sessions leave
    /// the table and their contacts get `unavailable`.
    pub node_down_grace_secs: u64,
    /// Leader heartbeat interval.
    pub heartbeat_ms: u64,
    /// Election timeout (lower bound; the upper bound is twice this).
    pub election_timeout_ms: u64,
    /// Build a snapshot (and compact the log) after this many entries.
    pub snapshot_every: u64,
    /// The first `join` address is this node's own (a StatefulSet's pod
    /// 0): with an empty log it waits this long for a listed peer that
    /// already belongs to a cluster, then starts one.
    pub bootstrap_wait_secs: u64,
    /// The leader removes a member that has not answered and whose
    /// advertised DNS name has not resolved for this long (a pod scaled
    /// away on Kubernetes); 0 never removes. Members advertised by IP
    /// address are never removed this way.
    pub remove_unresolvable_after_secs: u64,
    /// Where a draining node (SIGTERM) sends its TCP clients with
    /// `<see-other-host/>` (`host` or `host:port`, e.g. the c2s Service's
    /// name); without it they get `<system-shutdown/>` and reconnect as
    /// they were configured.
    pub see_other_host: Option<String>,
}

impl Default for ClusterConfig {
    fn default() -> Self {
        ClusterConfig {
            addr: addr("127.0.0.1:5291"),
            advertise_addr: String::new(),
            ca: None,
            cert: None,
            key: None,
            join: Vec::new(),
            write_timeout_ms: 5_000,
            node_down_grace_secs: 10,
            heartbeat_ms: 200,
            election_timeout_ms: 1_000,
            snapshot_every: 10_000,
            bootstrap_wait_secs: 15,
            remove_unresolvable_after_secs: 300,
            see_other_host: None,
        }
    }
}

impl ClusterConfig {
    /// The address peers dial.
    pub fn advertised(&self) -> String {
        if self.advertise_addr.is_empty() {
            self.addr.to_string()
        } else {
            self.advertise_addr.clone()
        }
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_millis(self.write_timeout_ms)
    }
}

/// One virtual host: a domain, and optionally its certificate.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VHost {
    /// The domain, e.g. `example.com`.
    pub name: String,
    /// PEM certificate chain. When absent, a self-signed certificate is
    /// generated on first start and kept in `<data_dir>/certs/`.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key matching `tls_cert`.
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Listen {
    pub c2s: SocketAddr,
    pub c2s_tls: SocketAddr,
    pub s2s: SocketAddr,
    pub http: SocketAddr,
    /// HTTPS (the vhosts' certificates, chosen by SNI); none with `"off"`.
    #[serde(deserialize_with = "addr_or_off")]
    pub https: Option<SocketAddr>,
    pub grpc: SocketAddr,
}

/// A socket address, or `"off"` for a listener that is not wanted.
fn addr_or_off<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<SocketAddr>, D::Error> {
    let s = String::deserialize(d)?;
    if s == "off" {
        return Ok(None);
    }
    s.parse()
        .map(Some)
        .map_err(|_| serde::de::Error::custom(format!("`{s}` is not host:port or \"off\"")))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Tls {
    /// Refuse authentication before STARTTLS (RFC 6120 §5.3.1 mandatory-to-negotiate).
    pub require_c2s: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Auth {
    /// PBKDF2 iterations for new SCRAM credentials (RFC 7677 asks for at least 4096).
    pub scram_iterations: u32,
    /// In-band registration (XEP-0077); off by default.
    pub allow_registration: bool,
    /// Delay before answering the first failed authentication from an address;
    /// it doubles with each further failure from the same address.
    pub failure_delay_ms: u64,
    /// Upper bound of that delay.
    pub max_failure_delay_ms: u64,
    /// Failures from one address are forgotten after this long without one.
    pub failure_memory_secs: u64,
    /// Failed attempts allowed on one stream before it is closed (RFC 6120 §6.4.5).
    pub max_attempts_per_stream: u32,
    /// Refuse SCRAM's `y` flag whenever -PLUS was offered (RFC 5802 §6),
    /// even from a client that just tried -PLUS with a binding we lack
    /// (slixmpp's tls-unique). Strict stops a man in the middle from
    /// faking that attempt; tolerant (the default) keeps such clients on
    /// SCRAM instead of falling back to PLAIN, which would hand that same
    /// man in the middle the password.
    pub strict_channel_binding: bool,
    /// Seconds between two in-band registrations from one address (IPv6:
    /// one /64); sooner gets `<resource-constraint/>`.
    pub registration_interval_secs: u64,
    /// Accounts that may run the service administration commands
    /// (XEP-0133: add, delete and change the password of users, announce),
    /// e.g. `["admin@example.com"]`.
    pub admins: Vec<String>,
    /// FAST (XEP-0484): issue login tokens, so a reconnecting client logs
    /// in in one round trip without PBKDF2.
    pub fast: bool,
    /// Days a FAST token stays valid.
    pub fast_token_days: u64,
    /// A FAST login with a token older than this many hours gets a fresh
    /// one (the old stays valid until it expires or the next rotation).
    pub fast_rotate_hours: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    /// Largest stanza accepted, in bytes; larger gets `<policy-violation/>`.
    pub max_stanza_bytes: usize,
    /// Deepest element nesting inside a stanza.
    pub max_depth: usize,
    /// Most attributes on one element.
    pub max_attrs: usize,
    /// Seconds a connection may take from accept to a bound resource.
    pub negotiation_timeout_secs: u64,
    /// Messages kept per offline user (XEP-0160); more are refused with an error.
    pub offline_max_messages: usize,
    /// Bytes of stored messages kept per offline user; a message that would
    /// pass it is refused with an error, like one past the count.
    pub offline_max_bytes: u64,
    /// Stanzas queued for one session before it counts as not reading;
    /// then it is closed and what it missed goes to offline storage.
    pub session_queue: usize,
    /// Seconds a write to a client may block before the client counts as gone.
    pub write_timeout_secs: u64,
    /// Seconds a session with stream management (XEP-0198) waits for its
    /// client to resume after the connection drops.
    pub resume_timeout_secs: u64,
    /// Contacts one roster may hold (RFC 6121 §2.3.3: `not-allowed` beyond).
    pub max_roster_items: usize,
    /// JIDs one blocklist may hold (XEP-0191).
    pub max_blocklist_items: usize,
    /// Connections not yet bound to a resource, in all; more are refused
    /// with `<resource-constraint/>`.
    pub max_unauthenticated: usize,
    /// Of those, from one address (IPv6: one /64); more get
    /// `<policy-violation/>`.
    pub max_unauthenticated_per_address: usize,
    /// Sessions one account may have at once; one more bind gets
    /// `<resource-constraint/>` (binding a resource already online
    /// replaces it and counts once).
    pub max_sessions_per_account: usize,
    /// Stanzas a session may send per second, sustained; stream management
    /// and CSI elements do not count.
    pub stanzas_per_second: u32,
    /// Stanzas a session may send at once above that rate; beyond, the
    /// stream is closed with `<policy-violation/>`.
    pub stanza_burst: u32,
    /// Seconds without a byte from a client before the server asks whether
    /// it is still there (XEP-0199 ping, or XEP-0198 `<r/>`).
    pub idle_ping_secs: u64,
    /// Seconds it then has to answer (with anything); silent, the link
    /// counts as dead: the session ends, or hibernates for resumption.
    pub ping_timeout_secs: u64,
    /// TCP keepalive probes start after this many idle seconds (0: off),
    /// so the kernel finds half-open links even between pings.
    pub tcp_keepalive_secs: u64,
    /// Bytes queued for one session before it counts as not reading (as
    /// `session_queue`, counted in bytes).
    pub session_queue_bytes: usize,
    /// Bytes sent under stream management (XEP-0198) and not yet
    /// acknowledged; past it (or past `session_queue` stanzas) the stream
    /// is closed with `<policy-violation/>` and the rest is routed again.
    pub max_unacked_bytes: usize,
    /// Stanzas held back for an inactive client (XEP-0352) before they go
    /// anyway, and their bytes.
    pub csi_max_held: usize,
    pub csi_held_bytes: usize,
    /// Bytes of one user's private XML storage (XEP-0049), all namespaces
    /// together (each element counts 64 bytes more than its size).
    pub max_private_bytes: u64,
    /// Bytes of one vCard (XEP-0054).
    pub max_vcard_bytes: usize,
    /// Bytes of a subscription request kept until it is answered; a larger
    /// one is kept without its status text and extensions.
    pub max_subscription_request_bytes: usize,
    /// Roster removals remembered for roster versioning (XEP-0237); a
    /// client whose version is older than the oldest gets the whole roster.
    pub max_roster_tombstones: usize,
    /// Seconds a SIGTERM waits for sessions to hand what their clients
    /// did not acknowledge to offline storage before the node exits
    /// (match Kubernetes' `terminationGracePeriodSeconds`, minus a margin).
    pub shutdown_drain_secs: u64,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Log {
    /// `tracing` filter directive.
    pub level: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

/// OpenTelemetry traces over OTLP (README "Traces"): a span per routed
/// client stanza, one for its hand-over to another node and one for its
/// delivery there, all in one trace.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Trace {
    /// The collector's OTLP/gRPC address, `http://host:4317`. Empty (the
    /// default): no spans are made or exported. When neither the file nor
    /// `--otlp-endpoint` sets it, `OTEL_EXPORTER_OTLP_ENDPOINT` is used.
    pub otlp_endpoint: String,
    /// Share of new traces kept, 0.0 to 1.0, decided where a trace starts
    /// (the sending client's node); the other nodes follow that decision
    /// (parent-based), so a trace is kept whole or not at all.
    pub sample_ratio: f64,
    /// `service.name` of the spans; `service.instance.id` is the node id.
    pub service_name: String,
}

impl Default for Trace {
    fn default() -> Self {
        Trace {
            otlp_endpoint: String::new(),
            sample_ratio: 1.0,
            service_name: "xmpp-node".into(),
        }
    }
}

impl Trace {
    pub fn enabled(&self) -> bool {
        !self.otlp_endpoint.is_empty()
    }
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Text,
    Json,
}

fn addr(s: &str) -> SocketAddr {
    s.parse()
        .unwrap_or_else(|_| unreachable!("built-in address {s} parses"))
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node_id: 0,
            data_dir: PathBuf::from("./data"),
            vhosts: vec![VHost {
                name: "localhost".into(),
                tls_cert: None,
                tls_key: None,
            }],
            listen: Listen::default(),
            tls: Tls::default(),
            auth: Auth::default(),
            limits: Limits::default(),
            log: Log::default(),
            trace: Trace::default(),
            cluster: ClusterConfig::default(),
            admin: Admin::default(),
            s2s: S2s::default(),
            http: Http::default(),
            mam: Mam::default(),
            pep: Pep::default(),
            muc: Muc::default(),
            push: Push::default(),
            upload: Upload::default(),
            contact: Contact::default(),
            extdisco: Vec::new(),
        }
    }
}

impl Default for Listen {
    fn default() -> Self {
        Listen {
            c2s: addr("0.0.0.0:5222"),
            c2s_tls: addr("0.0.0.0:5223"),
            s2s: addr("0.0.0.0:5269"),
            http: addr("0.0.0.0:5280"),
            https: Some(addr("0.0.0.0:5281")),
            grpc: addr("127.0.0.1:5290"),
        }
    }
}

impl Default for Tls {
    fn default() -> Self {
        Tls { require_c2s: true }
    }
}

impl Default for Auth {
    fn default() -> Self {
        Auth {
            scram_iterations: 4096,
            allow_registration: false,
            failure_delay_ms: 500,
            max_failure_delay_ms: 8_000,
            failure_memory_secs: 300,
            max_attempts_per_stream: 3,
            strict_channel_binding: false,
            registration_interval_secs: 600,
            admins: Vec::new(),
            fast: true,
            fast_token_days: 21,
            fast_rotate_hours: 24,
        }
    }
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_bytes: 256 * 1024,
            max_depth: 32,
            max_attrs: 64,
            negotiation_timeout_secs: 60,
            offline_max_messages: 500,
            offline_max_bytes: 4 * 1024 * 1024,
            session_queue: 10_000,
            write_timeout_secs: 60,
            resume_timeout_secs: 300,
            max_roster_items: 2000,
            max_blocklist_items: 1000,
            max_unauthenticated: 1000,
            max_unauthenticated_per_address: 20,
            max_sessions_per_account: 32,
            stanzas_per_second: 100,
            stanza_burst: 1000,
            idle_ping_secs: 300,
            ping_timeout_secs: 60,
            tcp_keepalive_secs: 120,
            session_queue_bytes: 4 * 1024 * 1024,
            max_unacked_bytes: 4 * 1024 * 1024,
            csi_max_held: 256,
            csi_held_bytes: 256 * 1024,
            max_private_bytes: 1024 * 1024,
            max_vcard_bytes: 128 * 1024,
            max_subscription_request_bytes: 4096,
            max_roster_tombstones: 1000,
            shutdown_drain_secs: 25,
        }
    }
}

impl Default for Log {
    fn default() -> Self {
        Log {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}

impl Limits {
    pub fn negotiation_timeout(&self) -> Duration {
        Duration::from_secs(self.negotiation_timeout_secs)
    }

    pub fn resume_timeout(&self) -> Duration {
        Duration::from_secs(self.resume_timeout_secs)
    }

    pub fn write_timeout(&self) -> Duration {
        Duration::from_secs(self.write_timeout_secs)
    }

    pub fn parser(&self) -> xmpp::xml::Limits {
        xmpp::xml::Limits {
            max_stanza_bytes: self.max_stanza_bytes,
            max_depth: self.max_depth,
            max_attrs: self.max_attrs,
        }
    }
}

/// A configuration problem, worded for the operator who has to fix it.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: PathBuf,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
}

impl Config {
    /// Merges defaults, the file named by `--config` (if any) and the flags.
    pub fn load(flags: &Flags) -> Result<Config, ConfigError> {
        let file = match &flags.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                Some((path.clone(), text))
            }
            None => None,
        };
        let mut config = match &file {
            Some((path, text)) => Config::from_toml(text, path)?,
            None => Config::default(),
        };
        config.apply_flags(flags);
        // The standard OpenTelemetry variable, when nothing of ours names
        // a collector.
        if config.trace.otlp_endpoint.is_empty() {
            if let Ok(e) = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT") {
                config.trace.otlp_endpoint = e.trim().to_owned();
            }
        }
        config.validate(file.as_ref().map(|(p, t)| (p.as_path(), t.as_str())))?;
        Ok(config)
    }

    /// Parses a TOML document; errors name the file, line and column.
    pub fn from_toml(text: &str, path: &Path) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((0, 0));
            ConfigError::Syntax {
                path: path.to_owned(),
                line,
                column,
                message: plain_words(e.message().trim()),
            }
        })?;
        // Where the file names vhosts, per-key semantic errors below refer
        // to the file; line numbers come from the TOML span where we have one.
        Ok(config)
    }

    fn apply_flags(&mut self, f: &Flags) {
        if let Some(d) = &f.data_dir {
            self.data_dir = d.clone();
        }
        if !f.vhosts.is_empty() {
            self.vhosts = f
                .vhosts
                .iter()
                .map(|name| VHost {
                    name: name.clone(),
                    tls_cert: None,
                    tls_key: None,
                })
                .collect();
        }
        if let Some(a) = f.c2s_addr {
            self.listen.c2s = a;
        }
        if let Some(a) = f.c2s_tls_addr {
            self.listen.c2s_tls = a;
        }
        if let Some(a) = f.s2s_addr {
            self.listen.s2s = a;
        }
        if let Some(a) = f.http_addr {
            self.listen.http = a;
        }
        if let Some(a) = f.https_addr {
            self.listen.https = Some(a);
        }
        if let Some(a) = f.grpc_addr {
            self.listen.grpc = a;
        }
        if let Some(l) = &f.log_level {
            self.log.level = l.clone();
        }
        if let Some(r) = f.allow_registration {
            self.auth.allow_registration = r;
        }
        if let Some(m) = f.mam_enabled {
            self.mam.enabled = m;
        }
        if let Some(d) = f.mam_retention_days {
            self.mam.retention_days = d;
        }
        if let Some(b) = f.mam_batch_ms {
            self.mam.batch_ms = b;
        }
        if let Some(r) = f.require_tls {
            self.tls.require_c2s = r;
        }
        if let Some(i) = f.scram_iterations {
            self.auth.scram_iterations = i;
        }
        fn set<T: Copy>(target: &mut T, value: Option<T>) {
            if let Some(v) = value {
                *target = v;
            }
        }
        set(&mut self.node_id, f.node_id);
        set(&mut self.log.format, f.log_format);
        set(&mut self.auth.failure_delay_ms, f.failure_delay_ms);
        set(&mut self.auth.max_failure_delay_ms, f.max_failure_delay_ms);
        set(&mut self.auth.failure_memory_secs, f.failure_memory_secs);
        set(
            &mut self.auth.max_attempts_per_stream,
            f.max_attempts_per_stream,
        );
        set(
            &mut self.auth.strict_channel_binding,
            f.strict_channel_binding,
        );
        set(&mut self.limits.max_stanza_bytes, f.max_stanza_bytes);
        set(&mut self.limits.max_depth, f.max_depth);
        set(&mut self.limits.max_attrs, f.max_attrs);
        set(
            &mut self.limits.negotiation_timeout_secs,
            f.negotiation_timeout_secs,
        );
        set(
            &mut self.limits.offline_max_messages,
            f.offline_max_messages,
        );
        set(&mut self.limits.session_queue, f.session_queue);
        set(&mut self.limits.write_timeout_secs, f.write_timeout_secs);
        set(&mut self.limits.resume_timeout_secs, f.resume_timeout_secs);
        set(&mut self.limits.max_roster_items, f.max_roster_items);
        set(&mut self.limits.max_blocklist_items, f.max_blocklist_items);
        set(&mut self.limits.max_unauthenticated, f.max_unauthenticated);
        set(
            &mut self.limits.max_unauthenticated_per_address,
            f.max_unauthenticated_per_address,
        );
        set(&mut self.limits.stanzas_per_second, f.stanzas_per_second);
        set(&mut self.limits.stanza_burst, f.stanza_burst);
        set(
            &mut self.limits.max_sessions_per_account,
            f.max_sessions_per_account,
        );
        set(&mut self.limits.idle_ping_secs, f.idle_ping_secs);
        set(&mut self.limits.ping_timeout_secs, f.ping_timeout_secs);
        set(&mut self.limits.tcp_keepalive_secs, f.tcp_keepalive_secs);
        set(&mut self.limits.offline_max_bytes, f.offline_max_bytes);
        set(&mut self.limits.session_queue_bytes, f.session_queue_bytes);
        set(&mut self.limits.max_unacked_bytes, f.max_unacked_bytes);
        set(&mut self.limits.csi_max_held, f.csi_max_held);
        set(&mut self.limits.csi_held_bytes, f.csi_held_bytes);
        set(&mut self.limits.max_private_bytes, f.max_private_bytes);
        set(&mut self.limits.max_vcard_bytes, f.max_vcard_bytes);
        set(
            &mut self.limits.max_subscription_request_bytes,
            f.max_subscription_request_bytes,
        );
        set(
            &mut self.limits.max_roster_tombstones,
            f.max_roster_tombstones,
        );
        set(&mut self.limits.shutdown_drain_secs, f.shutdown_drain_secs);
        set(
            &mut self.auth.registration_interval_secs,
            f.registration_interval_secs,
        );
        set(&mut self.cluster.addr, f.cluster_addr);
        if let Some(p) = &f.cluster_ca {
            self.cluster.ca = Some(p.clone());
        }
        if let Some(p) = &f.cluster_cert {
            self.cluster.cert = Some(p.clone());
        }
        if let Some(p) = &f.cluster_key {
            self.cluster.key = Some(p.clone());
        }
        if let Some(p) = &f.admin_token_file {
            self.admin.token_file = Some(p.clone());
        }
        if let Some(a) = &f.advertise_addr {
            self.cluster.advertise_addr = a.clone();
        }
        if !f.join.is_empty() {
            self.cluster.join = f.join.clone();
        }
        set(
            &mut self.cluster.write_timeout_ms,
            f.cluster_write_timeout_ms,
        );
        set(
            &mut self.cluster.node_down_grace_secs,
            f.node_down_grace_secs,
        );
        set(&mut self.cluster.heartbeat_ms, f.heartbeat_ms);
        set(&mut self.cluster.election_timeout_ms, f.election_timeout_ms);
        set(&mut self.cluster.snapshot_every, f.snapshot_every);
        if let Some(e) = &f.otlp_endpoint {
            self.trace.otlp_endpoint = e.trim().to_owned();
        }
        set(&mut self.trace.sample_ratio, f.trace_sample_ratio);
    }

    /// Checks what serde cannot: domains, certificate pairs, ranges.
    fn validate(&mut self, file: Option<(&Path, &str)>) -> Result<(), ConfigError> {
        // `file:line: key` where the file sets the key; a value from a flag,
        // the environment or the defaults is named by its key alone.
        let origin = |key: &str| match file {
            Some((p, text)) => match key_line(text, key) {
                Some(line) => format!("{}:{line}: key `{key}`", p.display()),
                None => format!("key `{key}` (from a flag, the environment or the default)"),
            },
            None => format!("key `{key}`"),
        };
        if self.vhosts.is_empty() {
            return Err(ConfigError::Invalid {
                origin: origin("vhosts"),
                message: "no virtual host configured; add `[[vhosts]] name = \"example.com\"` or pass --vhost example.com".into(),
            });
        }
        for (i, v) in self.vhosts.iter_mut().enumerate() {
            let key = format!("vhosts[{i}].name");
            let normal = xmpp::jid::nameprep(&v.name).map_err(|e| ConfigError::Invalid {
                origin: origin(&key),
                message: format!(
                    "`{}` is not a valid domain ({e}); use a DNS name such as `example.com`",
                    v.name
                ),
            })?;
            if normal.is_empty() || normal.contains(['@', '/']) {
                return Err(ConfigError::Invalid {
                    origin: origin(&key),
                    message: format!("`{}` is not a domain; use a DNS name such as `example.com` (no user@ or /resource)", v.name),
                });
            }
            v.name = normal;
            if v.tls_cert.is_some() != v.tls_key.is_some() {
                return Err(ConfigError::Invalid {
                    origin: origin(&format!("vhosts[{i}]")),
                    message: "`tls_cert` and `tls_key` go together: give both, or neither for a generated self-signed certificate".into(),
                });
            }
        }
        let mut names: Vec<&str> = self.vhosts.iter().map(|v| v.name.as_str()).collect();
        names.sort_unstable();
        if let Some(w) = names.windows(2).find(|w| w[0] == w[1]) {
            return Err(ConfigError::Invalid {
                origin: origin("vhosts"),
                message: format!("virtual host `{}` is listed twice", w[0]),
            });
        }
        if self.auth.scram_iterations < 4096 {
            return Err(ConfigError::Invalid {
                origin: origin("auth.scram_iterations"),
                message: format!(
                    "{} is too low; RFC 7677 asks for at least 4096",
                    self.auth.scram_iterations
                ),
            });
        }
        if self.auth.fast && self.auth.fast_token_days == 0 {
            return Err(ConfigError::Invalid {
                origin: origin("auth.fast_token_days"),
                message: "0 would issue tokens that are already expired; give at least 1, or set `fast = false`".into(),
            });
        }
        if self.limits.max_stanza_bytes < 10_000 {
            return Err(ConfigError::Invalid {
                origin: origin("limits.max_stanza_bytes"),
                message: format!(
                    "{} is too small; RFC 6120 §13.12 requires accepting stanzas of at least 10000 bytes",
                    self.limits.max_stanza_bytes
                ),
            });
        }
        let l = &self.limits;
        for (key, value, min, why) in [
            ("limits.max_depth", l.max_depth, 4, "or ordinary stanzas are refused"),
            ("limits.max_attrs", l.max_attrs, 8, "or ordinary stanzas are refused"),
            ("limits.session_queue", l.session_queue, 16, "or a burst of presence closes sessions"),
            (
                "limits.session_queue_bytes",
                l.session_queue_bytes,
                l.max_stanza_bytes,
                "(limits.max_stanza_bytes), or one accepted stanza could never be queued",
            ),
            (
                "limits.max_unacked_bytes",
                l.max_unacked_bytes,
                l.max_stanza_bytes,
                "(limits.max_stanza_bytes), or one accepted stanza closes a stream-management session",
            ),
            ("limits.max_vcard_bytes", l.max_vcard_bytes, 1024, "for a vCard with a small photo"),
            (
                "limits.max_subscription_request_bytes",
                l.max_subscription_request_bytes,
                512,
                "to keep a request's addresses",
            ),
            ("limits.max_roster_tombstones", l.max_roster_tombstones, 1, "for roster versioning"),
            ("limits.max_private_bytes", l.max_private_bytes as usize, 1024, "for a client's bookmarks"),
        ] {
            if value < min {
                return Err(ConfigError::Invalid {
                    origin: origin(key),
                    message: format!("{value} is too small; make it at least {min} {why}"),
                });
            }
        }
        if self.auth.failure_delay_ms > self.auth.max_failure_delay_ms {
            return Err(ConfigError::Invalid {
                origin: origin("auth.max_failure_delay_ms"),
                message: format!(
                    "{} is below auth.failure_delay_ms ({}); the bound must be at least the first delay",
                    self.auth.max_failure_delay_ms, self.auth.failure_delay_ms
                ),
            });
        }
        for (key, value) in [
            (
                "limits.write_timeout_secs",
                self.limits.write_timeout_secs as usize,
            ),
            (
                "limits.negotiation_timeout_secs",
                self.limits.negotiation_timeout_secs as usize,
            ),
            (
                "auth.max_attempts_per_stream",
                self.auth.max_attempts_per_stream as usize,
            ),
            (
                "limits.max_unauthenticated",
                self.limits.max_unauthenticated,
            ),
            (
                "limits.max_unauthenticated_per_address",
                self.limits.max_unauthenticated_per_address,
            ),
            (
                "limits.max_sessions_per_account",
                self.limits.max_sessions_per_account,
            ),
            (
                "limits.stanzas_per_second",
                self.limits.stanzas_per_second as usize,
            ),
            ("limits.stanza_burst", self.limits.stanza_burst as usize),
            ("limits.idle_ping_secs", self.limits.idle_ping_secs as usize),
            (
                "limits.ping_timeout_secs",
                self.limits.ping_timeout_secs as usize,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    origin: origin(key),
                    message: "must be at least 1 (0 would refuse everyone)".into(),
                });
            }
        }
        for (key, value) in [
            ("s2s.connect_timeout_secs", self.s2s.connect_timeout_secs),
            (
                "s2s.negotiation_timeout_secs",
                self.s2s.negotiation_timeout_secs,
            ),
            ("s2s.idle_timeout_secs", self.s2s.idle_timeout_secs),
            ("s2s.max_queued", self.s2s.max_queued as u64),
            ("s2s.backoff_secs", self.s2s.backoff_secs),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    origin: origin(key),
                    message: "must be at least 1".into(),
                });
            }
        }
        for (key, value) in [
            ("http.max_body_bytes", self.http.max_body_bytes as u64),
            ("http.bosh_max_wait_secs", self.http.bosh_max_wait_secs),
            ("http.bosh_inactivity_secs", self.http.bosh_inactivity_secs),
            (
                "http.bosh_max_pending_bytes",
                self.http.bosh_max_pending_bytes as u64,
            ),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    origin: origin(key),
                    message: "must be at least 1".into(),
                });
            }
        }
        for a in &self.auth.admins {
            if xmpp::jid::BareJid::parse(a).map_or(true, |j| j.node().is_none()) {
                return Err(ConfigError::Invalid {
                    origin: origin("auth.admins"),
                    message: format!("{a:?} is not an account (user@domain)"),
                });
            }
        }
        for (i, e) in self.extdisco.iter().enumerate() {
            if !matches!(e.kind.as_str(), "stun" | "stuns" | "turn" | "turns") {
                return Err(ConfigError::Invalid {
                    origin: origin(&format!("extdisco[{i}].type")),
                    message: format!(
                        "[[extdisco]] type {:?} must be stun, stuns, turn or turns",
                        e.kind
                    ),
                });
            }
            if !matches!(e.transport.as_str(), "udp" | "tcp") {
                return Err(ConfigError::Invalid {
                    origin: origin(&format!("extdisco[{i}].transport")),
                    message: format!(
                        "[[extdisco]] transport {:?} must be udp or tcp",
                        e.transport
                    ),
                });
            }
            if e.ttl_secs == 0 {
                return Err(ConfigError::Invalid {
                    origin: origin(&format!("extdisco[{i}].ttl_secs")),
                    message: "must be at least 1".into(),
                });
            }
        }
        if crate::store::ArchiveDefault::parse(&self.mam.default).is_none() {
            return Err(ConfigError::Invalid {
                origin: origin("mam.default"),
                message: format!(
                    "is {:?}; must be \"always\", \"roster\" or \"never\"",
                    self.mam.default
                ),
            });
        }
        for (key, value) in [
            ("mam.max_messages_per_user", self.mam.max_messages_per_user),
            ("mam.default_page", self.mam.default_page as u64),
            ("mam.max_page", self.mam.max_page as u64),
            ("pep.max_nodes", self.pep.max_nodes),
            ("muc.max_occupants", u64::from(self.muc.max_occupants)),
            (
                "muc.max_rooms_per_user",
                u64::from(self.muc.max_rooms_per_user),
            ),
            ("pep.max_items", self.pep.max_items),
            ("pep.max_item_bytes", self.pep.max_item_bytes as u64),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    origin: origin(key),
                    message: "must be at least 1".into(),
                });
            }
        }
        if !(self.muc.messages_per_second > 0.0 && self.muc.message_burst >= 1.0) {
            return Err(ConfigError::Invalid {
                origin: origin("muc.messages_per_second"),
                message: "muc.messages_per_second must be above 0 and muc.message_burst at least 1"
                    .into(),
            });
        }
        let u = &self.upload;
        for (key, value) in [
            ("upload.max_file_size", u.max_file_size),
            ("upload.quota_per_user", u.quota_per_user),
        ] {
            if value == 0 {
                return Err(ConfigError::Invalid {
                    origin: origin(key),
                    message: "must be at least 1 (to turn uploads off, set upload.enabled = false)"
                        .into(),
                });
            }
        }
        if u.quota_per_user < u.max_file_size {
            return Err(ConfigError::Invalid {
                origin: origin("upload.quota_per_user"),
                message: format!(
                    "must be at least upload.max_file_size ({}), or a file of the largest size could never be stored",
                    u.max_file_size
                ),
            });
        }
        if u.transfer_secs < 10 {
            return Err(ConfigError::Invalid {
                origin: origin("upload.transfer_secs"),
                message: format!("{} is too short; make it at least 10", u.transfer_secs),
            });
        }
        if u.slot_expire_secs < 10 {
            return Err(ConfigError::Invalid {
                origin: origin("upload.slot_expire_secs"),
                message: format!(
                    "{} is too short for a client to upload anything; make it at least 10",
                    u.slot_expire_secs
                ),
            });
        }
        let label_ok = |s: &str| {
            !s.is_empty()
                && s.len() <= 63
                && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if !label_ok(&u.subdomain) || (self.muc.enabled && u.subdomain == self.muc.subdomain) {
            return Err(ConfigError::Invalid {
                origin: origin("upload.subdomain"),
                message: format!(
                    "`{}` must be one DNS label (letters, digits, `-`) other than muc.subdomain, e.g. \"upload\"",
                    u.subdomain
                ),
            });
        }
        if let Some(url) = &u.public_url {
            let rest = url
                .strip_prefix("https://")
                .or_else(|| url.strip_prefix("http://"));
            let host_ok = rest.is_some_and(|r| {
                let host = r.split('/').next().unwrap_or("");
                !host.is_empty()
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b))
            });
            if !host_ok || url.contains(['?', '#']) {
                return Err(ConfigError::Invalid {
                    origin: origin("upload.public_url"),
                    message: format!(
                        "`{url}` is not a base URL; use e.g. \"https://upload.example.com\" or \"https://xmpp.example.com:5281\""
                    ),
                });
            }
        }
        if self.mam.max_page < self.mam.default_page {
            return Err(ConfigError::Invalid {
                origin: origin("mam.max_page"),
                message: format!(
                    "must be at least mam.default_page ({})",
                    self.mam.default_page
                ),
            });
        }
        if self.http.max_body_bytes < self.limits.max_stanza_bytes {
            return Err(ConfigError::Invalid {
                origin: origin("http.max_body_bytes"),
                message: format!(
                    "must be at least limits.max_stanza_bytes ({}), or no stanza of full size fits in a request",
                    self.limits.max_stanza_bytes
                ),
            });
        }
        if self.s2s.max_backoff_secs < self.s2s.backoff_secs {
            return Err(ConfigError::Invalid {
                origin: origin("s2s.max_backoff_secs"),
                message: format!(
                    "must be at least s2s.backoff_secs ({})",
                    self.s2s.backoff_secs
                ),
            });
        }
        let mut policies = vec![(
            "s2s.default_policy".to_owned(),
            self.s2s.default_policy.clone(),
        )];
        policies.extend(
            self.s2s
                .policies
                .iter()
                .map(|(d, p)| (format!("s2s.policies.{d}"), p.clone())),
        );
        for (key, value) in policies {
            if let Err(message) = value.parse::<s2s::Policy>() {
                return Err(ConfigError::Invalid {
                    origin: origin(&key),
                    message,
                });
            }
        }
        for (domain, targets) in &self.s2s.routes {
            for t in targets {
                let port = t.rsplit_once(':').and_then(|(_, p)| p.parse::<u16>().ok());
                if port.is_none() {
                    return Err(ConfigError::Invalid {
                        origin: origin(&format!("s2s.routes.{domain}")),
                        message: format!("`{t}` is not `host:port` (e.g. \"xmpp.{domain}:5269\")"),
                    });
                }
            }
        }
        if self.limits.max_unauthenticated_per_address > self.limits.max_unauthenticated {
            return Err(ConfigError::Invalid {
                origin: origin("limits.max_unauthenticated_per_address"),
                message: format!(
                    "must not exceed limits.max_unauthenticated ({})",
                    self.limits.max_unauthenticated
                ),
            });
        }
        if self.limits.offline_max_messages == 0 {
            return Err(ConfigError::Invalid {
                origin: origin("limits.offline_max_messages"),
                message: "must be at least 1".into(),
            });
        }
        if self.limits.offline_max_bytes < self.limits.max_stanza_bytes as u64 {
            return Err(ConfigError::Invalid {
                origin: origin("limits.offline_max_bytes"),
                message: format!(
                    "must be at least limits.max_stanza_bytes ({}), or a message that was accepted could never be stored",
                    self.limits.max_stanza_bytes
                ),
            });
        }
        let c = &self.cluster;
        let tls = [&c.ca, &c.cert, &c.key];
        if tls.iter().any(|p| p.is_some()) && !tls.iter().all(|p| p.is_some()) {
            return Err(ConfigError::Invalid {
                origin: origin("cluster"),
                message: "ca, cert and key go together: set all three for mutual TLS between nodes (`clusterctl certs init` makes them), or none".into(),
            });
        }
        if c.ca.is_none() && !c.addr.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                origin: origin("cluster.addr"),
                message: format!(
                    "{} is not a loopback address, and without certificates nothing authenticates a peer: set cluster.ca, cluster.cert and cluster.key (`clusterctl certs init`), or bind it to 127.0.0.1 or another 127.x.y.z",
                    c.addr
                ),
            });
        }
        if self.admin.token_file.is_none() && !self.listen.grpc.ip().is_loopback() {
            return Err(ConfigError::Invalid {
                origin: origin("listen.grpc"),
                message: format!(
                    "the admin API on {} would be open to anyone who reaches it: set admin.token_file (a file holding a secret token; clusterctl sends it with --token-file), or listen on a loopback address",
                    self.listen.grpc
                ),
            });
        }
        for (key, value, min) in [
            ("cluster.node_down_grace_secs", c.node_down_grace_secs, 1),
            ("cluster.write_timeout_ms", c.write_timeout_ms, 100),
            ("cluster.heartbeat_ms", c.heartbeat_ms, 1),
        ] {
            if value < min {
                return Err(ConfigError::Invalid {
                    origin: origin(key),
                    message: format!("{value} is too small; make it at least {min}"),
                });
            }
        }
        if c.election_timeout_ms < 3 * c.heartbeat_ms {
            return Err(ConfigError::Invalid {
                origin: origin("cluster.election_timeout_ms"),
                message: format!(
                    "{} is too short for heartbeat_ms = {}; make it at least three heartbeats",
                    c.election_timeout_ms, c.heartbeat_ms
                ),
            });
        }
        if c.snapshot_every < 10 {
            return Err(ConfigError::Invalid {
                origin: origin("cluster.snapshot_every"),
                message: "must be at least 10 entries".into(),
            });
        }
        let t = &self.trace;
        if !(0.0..=1.0).contains(&t.sample_ratio) {
            return Err(ConfigError::Invalid {
                origin: origin("trace.sample_ratio"),
                message: format!(
                    "{} is not a share; give 0.0 (none) to 1.0 (every trace)",
                    t.sample_ratio
                ),
            });
        }
        if t.enabled() {
            let rest = t.otlp_endpoint.strip_prefix("http://");
            if rest.is_none_or(|r| r.is_empty() || r.starts_with('/')) {
                return Err(ConfigError::Invalid {
                    origin: origin("trace.otlp_endpoint"),
                    message: format!(
                        "`{}` is not an OTLP/gRPC address; give `http://host:4317` (a collector reached without TLS, e.g. an agent on the same host or pod network), or \"\" for no traces",
                        t.otlp_endpoint
                    ),
                });
            }
        }
        if t.service_name.trim().is_empty() {
            return Err(ConfigError::Invalid {
                origin: origin("trace.service_name"),
                message: "give a name, e.g. \"xmpp-node\"".into(),
            });
        }
        Ok(())
    }

    pub fn is_local_domain(&self, domain: &str) -> bool {
        self.vhosts.iter().any(|v| v.name == domain)
    }

    /// A domain this server answers for over s2s: a virtual host, or a
    /// component of one (the group chat service).
    pub fn serves_domain(&self, domain: &str) -> bool {
        self.is_local_domain(domain)
            || self.muc.host_of(domain, self).is_some()
            || self.upload.host_of(domain, self).is_some()
    }
}

/// serde speaks Rust types; operators read "a whole number".
fn plain_words(message: &str) -> String {
    let mut m = message.to_owned();
    for (rust, plain) in [
        ("expected usize", "expected a whole number (no quotes)"),
        ("expected u64", "expected a whole number (no quotes)"),
        ("expected u32", "expected a whole number (no quotes)"),
        ("expected a boolean", "expected true or false (no quotes)"),
        (
            "expected f64",
            "expected a number with a decimal point, e.g. 1.0",
        ),
    ] {
        m = m.replace(rust, plain);
    }
    m
}

/// The line of `text` that sets `key` (`limits.max_depth`,
/// `vhosts[1].name`), or opens the table `key` names (`cluster`).
fn key_line(text: &str, key: &str) -> Option<usize> {
    let mut table = String::new();
    let mut arrays: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if let Some(name) = line.strip_prefix("[[").and_then(|l| l.strip_suffix("]]")) {
            let name = name.trim().to_owned();
            let n = arrays.entry(name.clone()).or_insert(0);
            table = format!("{name}[{n}]");
            *n += 1;
        } else if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            table = name.trim().to_owned();
        } else if let Some((k, _)) = line.split_once('=') {
            let k = k.trim().trim_matches('"');
            let full = if table.is_empty() {
                k.to_owned()
            } else {
                format!("{table}.{k}")
            };
            if full == key {
                return Some(i + 1);
            }
            continue;
        } else {
            continue;
        }
        if table == key {
            return Some(i + 1);
        }
    }
    None
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_str(text: &str) -> Result<Config, ConfigError> {
        let path = Path::new("/etc/xmpp/node.toml");
        let mut c = Config::from_toml(text, path)?;
        c.validate(Some((path, text)))?;
        Ok(c)
    }

    /// The `node.toml` of deploy/kubernetes/base/configmap.yaml: the block
    /// under `node.toml: |`, unindented; with `uncomment`, its commented
    /// settings (`# key = …`, `# [table]`) are taken too.
    fn configmap_toml(uncomment: bool) -> String {
        let yaml = include_str!("../../deploy/kubernetes/base/configmap.yaml");
        let mut lines = yaml
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("node.toml: |"));
        lines.next();
        let mut out = String::new();
        for l in lines.take_while(|l| l.is_empty() || l.starts_with("    ")) {
            let l = l.strip_prefix("    ").unwrap_or(l);
            let setting = l.strip_prefix("# ").filter(|r| {
                r.starts_with('[') || r.split_once(" = ").is_some_and(|(k, _)| !k.contains(' '))
            });
            match setting {
                Some(r) if uncomment => out.push_str(r),
                _ => out.push_str(l),
            }
            out.push('\n');
        }
        out
    }

    #[test]
    fn the_kubernetes_configmap_is_a_valid_config_with_and_without_its_options() {
        for uncomment in [false, true] {
            let text = configmap_toml(uncomment);
            assert!(text.contains("[cluster]"), "{text}");
            let path = Path::new("/etc/xmpp/node.toml");
            let mut c = Config::from_toml(&text, path).unwrap_or_else(|e| panic!("{e}\n{text}"));
            // What the StatefulSet's flags add (statefulset.yaml).
            let tls = Path::new("/etc/xmpp/cluster-tls");
            c.cluster.ca = Some(tls.join("ca.crt"));
            c.cluster.cert = Some(tls.join("tls.crt"));
            c.cluster.key = Some(tls.join("tls.key"));
            c.validate(Some((path, &text)))
                .unwrap_or_else(|e| panic!("{e}\n{text}"));
            assert_eq!(c.node_id, 0, "pods choose their ids");
            assert_eq!(c.cluster.see_other_host.is_some(), uncomment, "{text}");
        }
    }

    #[test]
    fn values_that_cannot_work_name_file_line_and_fix() {
        let msg = load_str("node_id = 2\n[limits]\nmax_depth = 32\nwrite_timeout_secs = 0\n")
            .expect_err("zero timeout")
            .to_string();
        assert!(
            msg.starts_with("/etc/xmpp/node.toml:4: key `limits.write_timeout_secs`"),
            "{msg}"
        );
        let msg = load_str("[auth]\nfailure_delay_ms = 900\nmax_failure_delay_ms = 100\n")
            .expect_err("max below base")
            .to_string();
        assert!(msg.starts_with("/etc/xmpp/node.toml:3:"), "{msg}");
        assert!(msg.contains("failure_delay_ms (900)"), "{msg}");
        let msg = load_str("[limits]\nmax_stanza_bytes = 65536\nsession_queue_bytes = 1000\n")
            .expect_err("budget below one stanza")
            .to_string();
        assert!(msg.starts_with("/etc/xmpp/node.toml:3:"), "{msg}");
        assert!(msg.contains("max_stanza_bytes"), "{msg}");
        let msg = load_str("[[vhosts]]\nname = \"a.test\"\n[[vhosts]]\nname = \"b@c\"\n")
            .expect_err("bad second vhost")
            .to_string();
        assert!(
            msg.starts_with("/etc/xmpp/node.toml:4: key `vhosts[1].name`"),
            "{msg}"
        );
        // A key the file does not set is named as coming from elsewhere.
        let msg = load_str("[cluster]\nheartbeat_ms = 500\n")
            .expect_err("the default election timeout is below three such heartbeats")
            .to_string();
        assert!(
            msg.contains("cluster.election_timeout_ms` (from a flag"),
            "{msg}"
        );
    }

    #[test]
    fn full_file_parses_and_normalises_domains() {
        let c = load_str(
            r#"
node_id = 3
data_dir = "/var/lib/xmpp"
[[vhosts]]
name = "Example.COM"
[[vhosts]]
name = "chat.example.org"
tls_cert = "/etc/ssl/chat.pem"
tls_key = "/etc/ssl/chat.key"
[listen]
c2s = "127.0.0.1:15222"
[limits]
max_stanza_bytes = 65536
"#,
        )
        .expect("valid config");
        assert_eq!(c.node_id, 3);
        assert_eq!(c.vhosts[0].name, "example.com");
        assert_eq!(c.listen.c2s, addr("127.0.0.1:15222"));
        assert_eq!(c.listen.c2s_tls, addr("0.0.0.0:5223"));
        assert_eq!(c.limits.max_stanza_bytes, 65536);
        assert!(c.tls.require_c2s);
    }

    #[test]
    fn bad_value_names_file_line_and_expectation() {
        let err =
            load_str("node_id = 1\n[listen]\nc2s = \"localhost-5222\"\n").expect_err("bad address");
        let msg = err.to_string();
        assert!(msg.starts_with("/etc/xmpp/node.toml:3:"), "{msg}");
        assert!(msg.contains("socket address"), "{msg}");
    }

    #[test]
    fn listeners_beyond_loopback_need_certificates_or_a_token() {
        let err = load_str("[cluster]\naddr = \"10.0.0.1:5291\"\n").expect_err("no certs");
        assert!(err.to_string().contains("cluster.ca"), "{err}");
        let err = load_str("[cluster]\naddr = \"10.0.0.1:5291\"\nca = \"/c/ca.crt\"\n")
            .expect_err("half the set");
        assert!(err.to_string().contains("go together"), "{err}");
        load_str(
            "[cluster]\naddr = \"10.0.0.1:5291\"\nca = \"/c/ca.crt\"\ncert = \"/c/n.crt\"\nkey = \"/c/n.key\"\n",
        )
        .expect("mutual TLS may listen anywhere");
        let err = load_str("[listen]\ngrpc = \"0.0.0.0:5290\"\n").expect_err("open admin");
        assert!(err.to_string().contains("admin.token_file"), "{err}");
        load_str("[listen]\ngrpc = \"0.0.0.0:5290\"\n[admin]\ntoken_file = \"/t\"\n")
            .expect("a token guards it");
    }

    #[test]
    fn unknown_key_lists_valid_keys() {
        let err = load_str("[limits]\nmax_stanza_size = 5\n").expect_err("unknown key");
        let msg = err.to_string();
        assert!(msg.contains(":2:"), "{msg}");
        assert!(msg.contains("max_stanza_bytes"), "{msg}");
    }

    #[test]
    fn semantic_errors_name_the_key_and_fix() {
        let msg = load_str("[auth]\nscram_iterations = 10\n")
            .expect_err("low")
            .to_string();
        assert!(
            msg.contains("auth.scram_iterations") && msg.contains("4096"),
            "{msg}"
        );
        let msg = load_str("[[vhosts]]\nname = \"a@b\"\n")
            .expect_err("jid")
            .to_string();
        assert!(msg.contains("vhosts[0].name"), "{msg}");
        let msg = load_str("[[vhosts]]\nname = \"a.b\"\ntls_cert = \"x\"\n")
            .expect_err("pair")
            .to_string();
        assert!(msg.contains("tls_key"), "{msg}");
    }

    #[test]
    fn every_limit_flag_is_applied() {
        use clap::Parser as _;
        let flags = Flags::try_parse_from([
            "xmpp-node",
            "--node-id=7",
            "--log-format=json",
            "--failure-delay-ms=1",
            "--max-failure-delay-ms=2",
            "--failure-memory-secs=3",
            "--max-attempts-per-stream=4",
            "--max-stanza-bytes=20000",
            "--max-depth=9",
            "--max-attrs=10",
            "--negotiation-timeout-secs=11",
            "--offline-max-messages=12",
            "--session-queue=130",
            "--write-timeout-secs=14",
            "--resume-timeout-secs=15",
            "--scram-iterations=5000",
            "--strict-channel-binding=true",
            "--max-roster-items=16",
            "--max-blocklist-items=17",
            "--shutdown-drain-secs=18",
            "--max-vcard-bytes=2048",
            "--registration-interval-secs=19",
        ])
        .expect("flags parse");
        let mut c = Config::default();
        c.apply_flags(&flags);
        assert_eq!(c.node_id, 7);
        assert_eq!(c.log.format, LogFormat::Json);
        let a = &c.auth;
        assert_eq!(
            (
                a.failure_delay_ms,
                a.max_failure_delay_ms,
                a.failure_memory_secs
            ),
            (1, 2, 3)
        );
        assert_eq!((a.max_attempts_per_stream, a.scram_iterations), (4, 5000));
        let l = &c.limits;
        assert_eq!(
            (l.max_stanza_bytes, l.max_depth, l.max_attrs),
            (20000, 9, 10)
        );
        assert_eq!(
            (l.negotiation_timeout_secs, l.offline_max_messages),
            (11, 12)
        );
        assert_eq!(
            (l.session_queue, l.write_timeout_secs, l.resume_timeout_secs),
            (130, 14, 15)
        );
        assert_eq!((l.max_roster_items, l.max_blocklist_items), (16, 17));
        assert_eq!((l.shutdown_drain_secs, l.max_vcard_bytes), (18, 2048));
        assert_eq!(c.auth.registration_interval_secs, 19);
        assert!(c.auth.strict_channel_binding);
    }

    #[test]
    fn flags_override_file() {
        let mut c = Config::default();
        let flags = Flags {
            vhosts: vec!["a.test".into(), "b.test".into()],
            c2s_addr: Some(addr("127.0.0.2:1")),
            ..Flags::default()
        };
        c.apply_flags(&flags);
        assert_eq!(c.vhosts.len(), 2);
        assert_eq!(c.listen.c2s, addr("127.0.0.2:1"));
    }

    #[test]
    fn trace_settings_are_checked_and_name_their_line() {
        let c = load_str("").expect("defaults");
        assert!(!c.trace.enabled(), "no collector unless one is named");
        assert_eq!(c.trace.service_name, "xmpp-node");
        let c =
            load_str("[trace]\notlp_endpoint = \"http://127.0.0.1:4317\"\nsample_ratio = 0.25\n")
                .expect("valid");
        assert!(c.trace.enabled());
        assert_eq!(c.trace.sample_ratio, 0.25);
        let msg = load_str("[trace]\nsample_ratio = 1.5\n")
            .expect_err("not a share")
            .to_string();
        assert!(
            msg.starts_with("/etc/xmpp/node.toml:2: key `trace.sample_ratio`"),
            "{msg}"
        );
        let msg = load_str("[trace]\n\notlp_endpoint = \"collector:4317\"\n")
            .expect_err("no scheme")
            .to_string();
        assert!(
            msg.starts_with("/etc/xmpp/node.toml:3: key `trace.otlp_endpoint`"),
            "{msg}"
        );
        let mut c = Config::default();
        c.apply_flags(&Flags {
            otlp_endpoint: Some("http://otel:4317".into()),
            trace_sample_ratio: Some(0.5),
            ..Flags::default()
        });
        assert_eq!(c.trace.otlp_endpoint, "http://otel:4317");
        assert_eq!(c.trace.sample_ratio, 0.5);
    }

    #[test]
    fn upload_settings_are_checked_and_name_their_line() {
        let msg = load_str("[upload]\nmax_file_size = \"big\"\n")
            .expect_err("not a number")
            .to_string();
        assert!(msg.starts_with("/etc/xmpp/node.toml:2:"), "{msg}");
        let msg = load_str("[upload]\nmax_file_size = 2000\nquota_per_user = 1000\n")
            .expect_err("quota below one file")
            .to_string();
        assert!(
            msg.starts_with("/etc/xmpp/node.toml:3: key `upload.quota_per_user`"),
            "{msg}"
        );
        let msg = load_str("[upload]\npublic_url = \"ftp://x\"\n")
            .expect_err("not http")
            .to_string();
        assert!(msg.contains("upload.public_url"), "{msg}");
        let msg = load_str("[upload]\nsubdomain = \"conference\"\n")
            .expect_err("the group chat service's name")
            .to_string();
        assert!(msg.contains("upload.subdomain"), "{msg}");
        let c = load_str("[listen]\nhttps = \"off\"\nhttp = \"127.0.0.1:5280\"\n").expect("valid");
        assert_eq!(
            c.upload.base_url("example.com", &c.listen),
            "http://example.com:5280"
        );
        assert_eq!(c.upload.dir(Path::new("/d")), Path::new("/d/uploads"));
        assert_eq!(c.upload.host_of("upload.localhost", &c), Some("localhost"));
        assert!(c.serves_domain("upload.localhost"));
    }
}
