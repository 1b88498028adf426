//! `/metrics`, `/healthz` and `/readyz` against the real binary: the
//! counters the Grafana dashboard reads move with traffic (logins and a
//! failed one, messages between two clients, local routing, open
//! connections), the Raft and process figures are there; a lone node and
//! every voter of a three-node cluster are ready, and a node that never
//! managed to join is alive but not ready.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tests::client::{Client, Mechanism, WAIT};
use tests::http::request;
use tests::node::{NodeOptions, TestNode};
use xmpp::sasl::HashAlg;

const PW: &str = "secret";

/// One scrape: every sample line, `name{labels}` -> value.
struct Scrape(HashMap<String, f64>);

impl Scrape {
    fn get(&self, series: &str) -> f64 {
        self.0.get(series).copied().unwrap_or(0.0)
    }

    fn has(&self, series: &str) -> bool {
        self.0.contains_key(series)
    }
}

async fn scrape(node: &TestNode) -> Scrape {
    let r = request(node.http, "GET", "/metrics", &[], "")
        .await
        .expect("GET /metrics");
    assert_eq!(r.status, 200, "{}", r.body);
    let ct = r.header("content-type").unwrap_or_default();
    assert!(
        ct.starts_with("application/openmetrics-text") || ct.starts_with("text/plain"),
        "content type {ct}"
    );
    let mut samples = HashMap::new();
    for line in r.body.lines().filter(|l| !l.starts_with('#')) {
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("not a sample: {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("not a number: {line:?}"));
        samples.insert(series.to_owned(), value);
    }
    Scrape(samples)
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    let r = request(addr, "GET", path, &[], "")
        .await
        .unwrap_or_else(|e| panic!("GET {path}: {e:#}"));
    (r.status, r.body)
}

async fn online(node: &TestNode, user: &str) -> Client {
    let mut c = Client::login_bound(node, user, PW, "metrics")
        .await
        .unwrap_or_else(|e| panic!("{user} logs in: {e:#}\n{}", node.log()));
    c.presence(0).await.expect("presence");
    c
}

#[tokio::test]
async fn counters_move_with_logins_failures_and_messages() {
    let node = TestNode::with_users(&["alice", "bob"], PW).unwrap();
    let before = scrape(&node).await;

    let mut alice = online(&node, "alice").await;
    let mut bob = online(&node, "bob").await;
    let mut wrong = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let refused = wrong
        .try_login(
            "alice",
            "not the password",
            Mechanism::Scram(HashAlg::Sha256),
        )
        .await
        .unwrap();
    assert_eq!(refused, Err("not-authorized".to_owned()));

    let bob_jid = bob.bare_jid().to_owned();
    let alice_jid = alice.bare_jid().to_owned();
    alice.chat(&bob_jid, "hello bob").await.unwrap();
    bob.recv_message(WAIT)
        .await
        .expect("bob gets alice's message");
    bob.chat(&alice_jid, "hello alice").await.unwrap();
    alice
        .recv_message(WAIT)
        .await
        .expect("alice gets bob's message");
    // A round trip after each message: its session has finished routing
    // (and counting) it before it handles the ping.
    alice.sync().await.unwrap();
    bob.sync().await.unwrap();

    let after = scrape(&node).await;
    let moved = |series: &str| after.get(series) - before.get(series);
    let at_least = |series: &str, want: f64| {
        assert!(
            moved(series) >= want,
            "{series} moved by {} (want at least {want}): {} -> {}",
            moved(series),
            before.get(series),
            after.get(series)
        );
    };
    at_least("xmpp_logins_total{mechanism=\"SCRAM-SHA-256\"}", 2.0);
    at_least("xmpp_auth_failures_total{mechanism=\"SCRAM-SHA-256\"}", 1.0);
    at_least("xmpp_stanzas_in_total{kind=\"message\"}", 2.0);
    at_least("xmpp_stanzas_in_total{kind=\"presence\"}", 2.0);
    at_least("xmpp_stanzas_in_total{kind=\"iq\"}", 2.0);
    at_least("xmpp_stanzas_out_total{kind=\"message\"}", 2.0);
    at_least("xmpp_routed_total{outcome=\"local\"}", 2.0);
    // Alice and Bob (STARTTLS) are still connected.
    assert!(
        after.get("xmpp_connections{transport=\"tls\"}") >= 2.0,
        "connections: {}",
        after.get("xmpp_connections{transport=\"tls\"}")
    );
    for series in [
        "xmpp_raft_term",
        "xmpp_raft_applied_index",
        "xmpp_raft_commit_index",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(after.get(series) > 0.0, "{series} = {}", after.get(series));
    }
    for series in [
        "xmpp_session_queue_depth",
        "xmpp_raft_leader_changes_total",
        "xmpp_raft_snapshots_total",
        "xmpp_routed_total{outcome=\"other_node\"}",
        "xmpp_routed_total{outcome=\"s2s\"}",
        "xmpp_routed_total{outcome=\"offline\"}",
        "xmpp_routed_total{outcome=\"error\"}",
        "xmpp_connections{transport=\"websocket\"}",
        "xmpp_connections{transport=\"bosh\"}",
    ] {
        assert!(after.has(series), "no {series} in the scrape");
    }
    assert!(after.get("xmpp_raft_leader_changes_total") >= 1.0);

    // The connections gauge goes down again when clients leave.
    let open = after.get("xmpp_connections{transport=\"tls\"}");
    alice.close().await.unwrap();
    drop(wrong);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = scrape(&node)
            .await
            .get("xmpp_connections{transport=\"tls\"}");
        if now < open {
            break;
        }
        assert!(Instant::now() < deadline, "tls connections stay at {now}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    assert_eq!(get(node.http, "/healthz").await, (200, "ok\n".to_owned()));
    let (status, body) = get(node.http, "/readyz").await;
    assert_eq!(status, 200, "a lone node is ready: {body}");
}

fn opts(id: u64, join: Vec<String>) -> NodeOptions {
    NodeOptions {
        node_id: id,
        join,
        cluster_config: "heartbeat_ms = 100\nelection_timeout_ms = 600\n".into(),
        ..NodeOptions::default()
    }
}

/// Polls `/readyz` until it answers 200 (a voter that just joined may
/// still be applying what it was sent).
async fn wait_ready(node: &TestNode) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = get(node.http, "/readyz").await;
        if status == 200 {
            return;
        }
        assert_eq!(status, 503, "{body}");
        assert!(
            Instant::now() < deadline,
            "node {} never became ready: {body}",
            node.node_id
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn every_voter_of_a_cluster_is_ready_and_a_node_that_never_joined_is_not() {
    let n1 = TestNode::start_with(opts(1, vec![])).expect("node 1");
    let join = vec![n1.cluster.to_string()];
    let n2 = TestNode::start_with(opts(2, join.clone())).expect("node 2");
    let n3 = TestNode::start_with(opts(3, join)).expect("node 3");
    n1.wait_voters(3).expect("three voters");
    for n in [&n1, &n2, &n3] {
        wait_ready(n).await;
        assert_eq!(get(n.http, "/healthz").await.0, 200);
    }
    // The leader reports what each follower lacks.
    let leader = [&n1, &n2, &n3]
        .into_iter()
        .find(|n| n.cluster_status().is_ok_and(|s| s["role"] == "leader"))
        .expect("a leader");
    let s = scrape(leader).await;
    let lag_series =
        s.0.keys()
            .filter(|k| k.starts_with("xmpp_raft_replication_lag{"))
            .count();
    assert_eq!(lag_series, 2, "one lag per follower");

    // Nothing listens where this node is told to join: it never becomes
    // a member, so it is alive but not ready.
    let nowhere = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let lonely = TestNode::start_with(NodeOptions {
        node_id: 4,
        wait_quorum: false,
        args: vec!["--join".into(), nowhere.to_string()],
        ..NodeOptions::default()
    })
    .expect("node 4");
    let (status, body) = get(lonely.http, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, "ok\n"));
    let (status, body) = get(lonely.http, "/readyz").await;
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("not a voting member"), "{body}");
}
