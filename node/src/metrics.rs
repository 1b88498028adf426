//! Prometheus metrics (`GET /metrics`) and the health endpoints' logic
//! (`/healthz`, `/readyz`), served by [`crate::http`].
//!
//! Two kinds of figures:
//! - **Counted where they happen**: connections, logins and failures,
//!   stanzas in and out, routing outcomes. These sit on hot paths, so each
//!   label value's counter is resolved once, here at start, and kept in a
//!   field: counting a stanza is one atomic add, with no map lookup and no
//!   allocation.
//! - **Read at scrape time**: Raft term and indexes, replication lag,
//!   session queue depth, s2s streams, RSS and open file descriptors. They
//!   already exist elsewhere (openraft's metrics watch, the session map,
//!   the s2s status `clusterctl s2s` shows, `/proc`), so a scrape copies
//!   them into gauges and costs nothing between scrapes. Leader changes and
//!   snapshots are the exception: a scrape sees only the present, so a
//!   small task ([`start`]) watches openraft's metrics and counts them.
//!
//! Names and labels are what the Grafana dashboard in `deploy/` reads;
//! README.md ("Metrics and health") says what each one means.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use xmpp::stanza::StanzaKind;

use crate::Server;

/// The content type of what [`Metrics::render`] writes (the text encoder
/// of `prometheus-client` writes OpenMetrics, which Prometheus reads).
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Client transports, as `Io::kind` names them.
const TRANSPORTS: [&str; 4] = ["tcp", "tls", "websocket", "bosh"];

/// Stanza kinds, in [`kind_index`] order.
const KINDS: [&str; 3] = ["message", "presence", "iq"];

type Label = [(&'static str, &'static str); 1];
type OwnedLabel = [(&'static str, String); 1];
type S2sLabels = [(&'static str, String); 2];

/// Where the router sent a stanza (`xmpp_routed_total{outcome}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A session of this node, a module, or a component took it.
    Local,
    /// Forwarded to a session on another node of the cluster.
    OtherNode,
    /// Handed to federation, for another domain.
    S2s,
    /// Kept in offline storage for a user with no session.
    Offline,
    /// Answered with a stanza error instead of delivered.
    Error,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Local,
        Outcome::OtherNode,
        Outcome::S2s,
        Outcome::Offline,
        Outcome::Error,
    ];

    fn label(self) -> &'static str {
        match self {
            Outcome::Local => "local",
            Outcome::OtherNode => "other_node",
            Outcome::S2s => "s2s",
            Outcome::Offline => "offline",
            Outcome::Error => "error",
        }
    }
}

/// Every mechanism a login can use: SASL (both profiles) and FAST tokens.
fn mechanism_names() -> Vec<&'static str> {
    use xmpp::sasl::{HashAlg, Mechanism};
    let mut v = vec![Mechanism::Plain.name(), Mechanism::External.name()];
    for h in HashAlg::ALL {
        v.push(Mechanism::Scram(h).name());
        v.push(Mechanism::ScramPlus(h).name());
    }
    v.extend(xmpp::fast::HtMechanism::ALL.map(|m| m.name()));
    v
}

/// The node's metrics: one registry, and handles to its hot counters.
pub struct Metrics {
    registry: Registry,
    /// One scrape at a time: a scrape clears and refills the families
    /// with labels that come and go (peers, remote domains).
    scrape: Mutex<()>,
    connections: [Gauge; 4],
    logins: Vec<(&'static str, Counter)>,
    login_family: Family<OwnedLabel, Counter>,
    auth_failures: Vec<(&'static str, Counter)>,
    failure_family: Family<OwnedLabel, Counter>,
    stanzas_in: [Counter; 3],
    stanzas_out: [Counter; 3],
    routed: [Counter; 5],
    queue_depth: Gauge,
    raft_term: Gauge,
    raft_commit_index: Gauge,
    raft_applied_index: Gauge,
    raft_leader_changes: Counter,
    raft_replication_lag: Family<OwnedLabel, Gauge>,
    raft_snapshots: Counter,
    s2s_streams: Family<S2sLabels, Gauge>,
    resident_memory: Gauge,
    open_fds: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Registers a family whose label values are all known now, and returns
/// one handle per value, in order.
fn fixed<const N: usize, M>(
    registry: &mut Registry,
    name: &str,
    help: &str,
    label: &'static str,
    values: [&'static str; N],
) -> [M; N]
where
    M: prometheus_client::metrics::TypedMetric
        + prometheus_client::encoding::EncodeMetric
        + Default
        + Clone
        + Send
        + Sync
        + std::fmt::Debug
        + 'static,
{
    let family = Family::<Label, M>::default();
    registry.register(name, help, family.clone());
    values.map(|v| family.get_or_create_owned(&[(label, v)]))
}

/// A counter per mechanism, made at start so every one shows as 0.
fn by_mechanism(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> (Vec<(&'static str, Counter)>, Family<OwnedLabel, Counter>) {
    let family = Family::<OwnedLabel, Counter>::default();
    registry.register(name, help, family.clone());
    let handles = mechanism_names()
        .into_iter()
        .map(|m| {
            (
                m,
                family.get_or_create_owned(&[("mechanism", m.to_owned())]),
            )
        })
        .collect();
    (handles, family)
}

fn single<M>(registry: &mut Registry, name: &str, help: &str) -> M
where
    M: prometheus_client::registry::Metric + Default + Clone,
{
    let m = M::default();
    registry.register(name, help, m.clone());
    m
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut r = Registry::default();
        let connections = fixed(
            &mut r,
            "xmpp_connections",
            "Client connections open now (negotiating or bound), by transport",
            "transport",
            TRANSPORTS,
        );
        // The encoder adds `_total` to counter names.
        let (logins, login_family) =
            by_mechanism(&mut r, "xmpp_logins", "Successful logins, by mechanism");
        let (auth_failures, failure_family) = by_mechanism(
            &mut r,
            "xmpp_auth_failures",
            "Logins refused for wrong credentials, by mechanism",
        );
        let stanzas_in = fixed(
            &mut r,
            "xmpp_stanzas_in",
            "Stanzas received from bound clients, by kind",
            "kind",
            KINDS,
        );
        let stanzas_out = fixed(
            &mut r,
            "xmpp_stanzas_out",
            "Stanzas written to clients, by kind",
            "kind",
            KINDS,
        );
        let routed = fixed(
            &mut r,
            "xmpp_routed",
            "Routing decisions, by outcome",
            "outcome",
            Outcome::ALL.map(Outcome::label),
        );
        let queue_depth = single(
            &mut r,
            "xmpp_session_queue_depth",
            "Entries waiting in this node's session queues, summed over sessions",
        );
        let raft_term = single(&mut r, "xmpp_raft_term", "Current Raft term");
        let raft_commit_index = single(
            &mut r,
            "xmpp_raft_commit_index",
            "Highest log index this node knows to be committed",
        );
        let raft_applied_index = single(
            &mut r,
            "xmpp_raft_applied_index",
            "Highest log index applied to this node's state machine",
        );
        let raft_leader_changes = single(
            &mut r,
            "xmpp_raft_leader_changes",
            "Leaders this node has seen elected since it started",
        );
        let raft_replication_lag = Family::<OwnedLabel, Gauge>::default();
        r.register(
            "xmpp_raft_replication_lag",
            "Log entries a peer lacks (leader only): last log index minus the peer's matched index",
            raft_replication_lag.clone(),
        );
        let raft_snapshots = single(
            &mut r,
            "xmpp_raft_snapshots",
            "Raft snapshots built or installed on this node since it started",
        );
        let s2s_streams = Family::<S2sLabels, Gauge>::default();
        r.register(
            "xmpp_s2s_streams",
            "Server-to-server streams open now, by remote domain and direction",
            s2s_streams.clone(),
        );
        let resident_memory = single(
            &mut r,
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
        );
        let open_fds = single(&mut r, "process_open_fds", "Open file descriptors");
        Metrics {
            registry: r,
            scrape: Mutex::new(()),
            connections,
            logins,
            login_family,
            auth_failures,
            failure_family,
            stanzas_in,
            stanzas_out,
            routed,
            queue_depth,
            raft_term,
            raft_commit_index,
            raft_applied_index,
            raft_leader_changes,
            raft_replication_lag,
            raft_snapshots,
            s2s_streams,
            resident_memory,
            open_fds,
        }
    }

    /// Counts a client connection of `transport` (`Io::kind`) until the
    /// returned guard is dropped.
    pub fn connection(&self, transport: &str) -> Connection {
        let gauge = self.transport(transport);
        gauge.inc();
        Connection { gauge }
    }

    fn transport(&self, transport: &str) -> Gauge {
        let i = TRANSPORTS.iter().position(|t| *t == transport).unwrap_or(0);
        self.connections[i].clone()
    }

    /// A successful login with `mechanism`.
    pub fn login(&self, mechanism: &str) {
        Self::by_name(&self.logins, &self.login_family, mechanism).inc();
    }

    /// A login refused for wrong credentials, with `mechanism`.
    pub fn auth_failure(&self, mechanism: &str) {
        Self::by_name(&self.auth_failures, &self.failure_family, mechanism).inc();
    }

    fn by_name(
        known: &[(&'static str, Counter)],
        family: &Family<OwnedLabel, Counter>,
        name: &str,
    ) -> Counter {
        match known.iter().find(|(m, _)| *m == name) {
            Some((_, c)) => c.clone(),
            None => family.get_or_create_owned(&[("mechanism", name.to_owned())]),
        }
    }

    /// A stanza from a bound client.
    pub fn stanza_in(&self, kind: StanzaKind) {
        let i = match kind {
            StanzaKind::Message => 0,
            StanzaKind::Presence => 1,
            StanzaKind::Iq => 2,
        };
        self.stanzas_in[i].inc();
    }

    /// A serialised stanza written to a client (its kind from the tag).
    pub fn stanza_out(&self, xml: &str) {
        if let Some(i) = kind_index(xml) {
            self.stanzas_out[i].inc();
        }
    }

    /// One routing decision.
    pub fn routed(&self, outcome: Outcome) {
        self.routed[outcome as usize].inc();
    }

    /// The exposition, with the scrape-time figures read now.
    pub fn render(&self, server: &Server) -> String {
        let _one = self.scrape.lock().unwrap_or_else(|p| p.into_inner());
        self.refresh(server);
        self.encode()
    }

    fn encode(&self) -> String {
        let mut out = String::with_capacity(8 * 1024);
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    fn refresh(&self, server: &Server) {
        let m = server.cluster.raft.metrics().borrow().clone();
        self.raft_term.set(m.current_term as i64);
        self.raft_applied_index
            .set(m.last_applied.map_or(0, |l| l.index) as i64);
        self.raft_commit_index
            .set(server.cluster.committed_index() as i64);
        self.raft_replication_lag.clear();
        if let Some(replication) = &m.replication {
            let peers = replication
                .iter()
                .map(|(id, matched)| (*id, matched.as_ref().map(|l| l.index)));
            for (peer, lag) in replication_lag(m.id, m.last_log_index, peers) {
                self.raft_replication_lag
                    .get_or_create(&[("peer", peer.to_string())])
                    .set(lag as i64);
            }
        }
        self.queue_depth.set(server.sessions.queued() as i64);
        self.s2s_streams.clear();
        if let Some(fed) = &server.s2s {
            // What `clusterctl s2s` lists; a domain in backoff has no stream.
            for s in fed.status() {
                if s.state.starts_with("backoff") {
                    continue;
                }
                self.s2s_streams
                    .get_or_create(&[("domain", s.remote), ("direction", s.direction.to_owned())])
                    .inc();
            }
        }
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        self.resident_memory
            .set(vm_rss_bytes(&status).unwrap_or(0) as i64);
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        self.open_fds.set(fds as i64);
    }
}

/// A counted client connection: one in `xmpp_connections` until dropped.
pub struct Connection {
    gauge: Gauge,
}

impl Connection {
    /// The connection now runs over `transport` (STARTTLS: tcp to tls).
    pub fn retransport(&mut self, metrics: &Metrics, transport: &str) {
        self.gauge.dec();
        self.gauge = metrics.transport(transport);
        self.gauge.inc();
    }
}

impl Drop for Connection {
    fn drop(&mut self) {
        self.gauge.dec();
    }
}

/// Which of [`KINDS`] a serialised stanza is.
fn kind_index(xml: &str) -> Option<usize> {
    let b = xml.as_bytes();
    let tag = |name: &[u8]| {
        b.len() > name.len() + 1
            && b[0] == b'<'
            && b[1..].starts_with(name)
            && matches!(b[name.len() + 1], b' ' | b'>' | b'/')
    };
    if tag(b"message") {
        Some(0)
    } else if tag(b"presence") {
        Some(1)
    } else if tag(b"iq") {
        Some(2)
    } else {
        None
    }
}

/// Entries each peer lacks: the leader's last log index minus what the
/// peer matched (all of it when it matched nothing yet). The leader's own
/// entry is left out.
fn replication_lag(
    me: u64,
    last_log_index: Option<u64>,
    peers: impl Iterator<Item = (u64, Option<u64>)>,
) -> Vec<(u64, u64)> {
    // Counts of entries, so that "nothing" and "entry 0" differ.
    let total = last_log_index.map_or(0, |i| i + 1);
    peers
        .filter(|(id, _)| *id != me)
        .map(|(id, matched)| (id, total.saturating_sub(matched.map_or(0, |i| i + 1))))
        .collect()
}

/// `VmRSS` of `/proc/self/status`, in bytes.
fn vm_rss_bytes(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let mut parts = line["VmRSS:".len()..].split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    let unit = match parts.next() {
        Some("kB") | None => 1024,
        Some("mB") => 1024 * 1024,
        Some(_) => 1,
    };
    Some(n * unit)
}

/// Watches openraft's metrics for what a scrape cannot see afterwards:
/// leader elections and snapshots. Ends with Raft.
pub fn start(server: &Arc<Server>) {
    let mut rx = server.cluster.raft.metrics();
    let leader_changes = server.metrics.raft_leader_changes.clone();
    let snapshots = server.metrics.raft_snapshots.clone();
    tokio::spawn(async move {
        let (mut leadership, mut snapshot) = {
            let m = rx.borrow_and_update();
            (None, m.snapshot)
        };
        loop {
            {
                let m = rx.borrow_and_update();
                // One leader per term: a (term, leader) not seen before is
                // an election this node learnt of.
                let now = m.current_leader.map(|l| (m.current_term, l));
                if now.is_some() && now != leadership {
                    leader_changes.inc();
                    leadership = now;
                }
                // Built here, or installed from the leader: either way a
                // new last-included log id.
                if m.snapshot != snapshot {
                    snapshots.inc();
                    snapshot = m.snapshot;
                }
            }
            if rx.changed().await.is_err() {
                return;
            }
        }
    });
}

/// What makes a node ready to take clients (`/readyz`), as this node sees
/// it: a voting member, with a leader, and applied what it knows to be
/// committed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RaftView {
    pub id: u64,
    pub running: bool,
    pub voter: bool,
    pub leader: Option<u64>,
    pub applied: u64,
    pub committed: u64,
}

/// Why a node is not ready, in one line; `None` when it is.
pub fn not_ready(v: &RaftView) -> Option<String> {
    if !v.running {
        return Some("Raft has stopped on this node".into());
    }
    if !v.voter {
        return Some(format!(
            "node {} is not a voting member (not joined yet, or still a learner)",
            v.id
        ));
    }
    if v.leader.is_none() {
        return Some("no Raft leader is known".into());
    }
    if v.applied < v.committed {
        return Some(format!(
            "applied index {} is behind committed index {}",
            v.applied, v.committed
        ));
    }
    None
}

fn view(server: &Server) -> RaftView {
    let m = server.cluster.raft.metrics().borrow().clone();
    RaftView {
        id: m.id,
        running: m.running_state.is_ok(),
        voter: m
            .membership_config
            .membership()
            .voter_ids()
            .any(|v| v == m.id),
        leader: m.current_leader,
        applied: m.last_applied.map_or(0, |l| l.index),
        committed: server.cluster.committed_index(),
    }
}

/// `/readyz`: `Ok` when ready, else the reason. A node that is applying
/// entries right now has committed a little ahead of what it applied, so
/// it is given one election timeout to apply what it had committed when
/// asked: a node that cannot is really behind.
pub async fn readiness(server: &Server) -> Result<(), String> {
    if *server.shutdown.borrow() {
        return Err("shutting down".into());
    }
    if server.cluster.is_removed() {
        return Err("removed from the cluster".into());
    }
    let v = view(server);
    match not_ready(&v) {
        None => Ok(()),
        Some(_) if v.running && v.voter && v.leader.is_some() => {
            let grace = Duration::from_millis(server.config.cluster.election_timeout_ms);
            let target = v.committed;
            let caught_up = server
                .cluster
                .raft
                .wait(Some(grace))
                .applied_index_at_least(Some(target), "readyz")
                .await
                .is_ok();
            if caught_up {
                return Ok(());
            }
            let v = view(server);
            Err(not_ready(&v).unwrap_or_else(|| {
                format!(
                    "applied index {} is behind committed index {target}",
                    v.applied
                )
            }))
        }
        Some(reason) => Err(reason),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_show_under_the_dashboard_names() {
        let m = Metrics::new();
        m.login("SCRAM-SHA-256");
        m.auth_failure("PLAIN");
        m.auth_failure("X-UNKNOWN");
        m.stanza_in(StanzaKind::Message);
        m.stanza_out("<presence from='a@b/c'/>");
        m.routed(Outcome::OtherNode);
        let _c = m.connection("websocket");
        let text = m.encode();
        for line in [
            "xmpp_logins_total{mechanism=\"SCRAM-SHA-256\"} 1",
            "xmpp_logins_total{mechanism=\"HT-SHA-256-NONE\"} 0",
            "xmpp_auth_failures_total{mechanism=\"PLAIN\"} 1",
            "xmpp_auth_failures_total{mechanism=\"X-UNKNOWN\"} 1",
            "xmpp_stanzas_in_total{kind=\"message\"} 1",
            "xmpp_stanzas_out_total{kind=\"presence\"} 1",
            "xmpp_routed_total{outcome=\"other_node\"} 1",
            "xmpp_routed_total{outcome=\"offline\"} 0",
            "xmpp_connections{transport=\"websocket\"} 1",
            "xmpp_connections{transport=\"bosh\"} 0",
            "xmpp_session_queue_depth 0",
            "xmpp_raft_term 0",
            "xmpp_raft_commit_index 0",
            "xmpp_raft_applied_index 0",
            "xmpp_raft_leader_changes_total 0",
            "xmpp_raft_snapshots_total 0",
            "process_resident_memory_bytes 0",
            "process_open_fds 0",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
        // Families of labels that come and go show once they have one.
        m.raft_replication_lag
            .get_or_create(&[("peer", "2".to_owned())])
            .set(3);
        m.s2s_streams
            .get_or_create(&[
                ("domain", "example.org".to_owned()),
                ("direction", "inbound".to_owned()),
            ])
            .inc();
        let text = m.encode();
        for line in [
            "xmpp_raft_replication_lag{peer=\"2\"} 3",
            "xmpp_s2s_streams{domain=\"example.org\",direction=\"inbound\"} 1",
        ] {
            assert!(text.lines().any(|l| l == line), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn a_connection_moves_with_starttls_and_leaves_when_dropped() {
        let m = Metrics::new();
        let mut c = m.connection("tcp");
        assert_eq!(m.connections[0].get(), 1);
        c.retransport(&m, "tls");
        assert_eq!((m.connections[0].get(), m.connections[1].get()), (0, 1));
        drop(c);
        assert_eq!(m.connections[1].get(), 0);
    }

    #[test]
    fn stanza_kind_comes_from_the_tag_name_only() {
        assert_eq!(kind_index("<message to='x'>"), Some(0));
        assert_eq!(kind_index("<presence/>"), Some(1));
        assert_eq!(kind_index("<iq type='get' id='1'/>"), Some(2));
        assert_eq!(kind_index("<iqx/>"), None);
        assert_eq!(kind_index("<messages/>"), None);
        assert_eq!(kind_index("<r xmlns='urn:xmpp:sm:3'/>"), None);
        assert_eq!(kind_index(""), None);
    }

    #[test]
    fn replication_lag_counts_what_each_peer_lacks() {
        let peers = [(1, Some(10)), (2, Some(7)), (3, None)].into_iter();
        assert_eq!(replication_lag(1, Some(10), peers), vec![(2, 3), (3, 11)]);
        assert_eq!(
            replication_lag(1, None, [(2, None)].into_iter()),
            vec![(2, 0)]
        );
    }

    #[test]
    fn rss_is_read_in_bytes() {
        let status = "Name:\txmpp-node\nVmPeak:\t  9000 kB\nVmRSS:\t    1234 kB\nThreads:\t4\n";
        assert_eq!(vm_rss_bytes(status), Some(1234 * 1024));
        assert_eq!(vm_rss_bytes("Name:\tx\n"), None);
    }

    #[test]
    fn ready_only_as_a_caught_up_voter_with_a_leader() {
        let ok = RaftView {
            id: 2,
            running: true,
            voter: true,
            leader: Some(1),
            applied: 40,
            committed: 40,
        };
        assert_eq!(not_ready(&ok), None);
        let learner = RaftView {
            voter: false,
            ..ok.clone()
        };
        assert!(not_ready(&learner).unwrap().contains("not a voting member"));
        let leaderless = RaftView {
            leader: None,
            ..ok.clone()
        };
        assert!(not_ready(&leaderless).unwrap().contains("no Raft leader"));
        let behind = RaftView {
            applied: 39,
            ..ok.clone()
        };
        assert!(not_ready(&behind).unwrap().contains("behind"));
        let stopped = RaftView {
            running: false,
            ..ok
        };
        assert!(not_ready(&stopped).unwrap().contains("stopped"));
    }
}
