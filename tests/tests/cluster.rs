//! A cluster of three real `xmpp-node` processes on their own loopback
//! addresses (DESIGN.md, "What Raft replicates"): accounts made through one
//! node log in on another, messages, presence and roster pushes cross
//! nodes, bare-JID priority is decided across the cluster, a killed leader
//! loses no acknowledged write, a restarted node catches up (also from a
//! snapshot), and a node without a quorum refuses writes and heals.

use std::time::{Duration, Instant};

use tests::client::{body, Client, WAIT};
use tests::faultnet::FaultNet;
use tests::node::{NodeOptions, TestNode};
use xmpp::element::Element;
use xmpp::stanza::ns;

const PW: &str = "secret";

fn opts(id: u64, join: Vec<String>, extra: &str) -> NodeOptions {
    NodeOptions {
        node_id: id,
        join,
        // Short timeouts keep the fault tests short; the rules are the same.
        cluster_config: format!(
            "heartbeat_ms = 100\nelection_timeout_ms = 600\nnode_down_grace_secs = 2\nwrite_timeout_ms = 3000\n{extra}"
        ),
        ..NodeOptions::default()
    }
}

/// Node 1 bootstraps; nodes 2 and 3 join through it.
fn three(extra: &str) -> Vec<TestNode> {
    let n1 = TestNode::start_with(opts(1, vec![], extra)).expect("node 1");
    let join = vec![n1.cluster.to_string()];
    let n2 = TestNode::start_with(opts(2, join.clone(), extra)).expect("node 2");
    let n3 = TestNode::start_with(opts(3, join, extra)).expect("node 3");
    let nodes = vec![n1, n2, n3];
    wait_members(&nodes[0], 3);
    nodes
}

/// As [`three`], with every node behind its own proxy in `net`.
fn three_behind(net: &FaultNet, extra: &str) -> Vec<TestNode> {
    tests::node::cluster_behind(net, 3, |id, join| opts(id, join, extra)).expect("cluster")
}

fn wait_members(n: &TestNode, want: usize) {
    n.wait_voters(want).expect("members");
}

fn leader_of(nodes: &[TestNode]) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        for n in nodes {
            if let Ok(s) = n.cluster_status() {
                if s["role"] == "leader" && s["quorum"] == true {
                    return n.node_id;
                }
            }
        }
        assert!(Instant::now() < deadline, "no leader");
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn online(node: &TestNode, user: &str, resource: &str, priority: i8) -> Client {
    let mut c = Client::login_bound(node, user, PW, resource)
        .await
        .unwrap_or_else(|e| panic!("{user}/{resource} logs in: {e:#}\n{}", node.log()));
    c.presence(priority).await.expect("presence");
    c
}

async fn expect_body(c: &mut Client, want: &str) {
    let m = c.recv_message(WAIT).await.expect("a message");
    assert_eq!(
        body(&m).as_deref(),
        Some(want),
        "{}",
        m.to_string_in(ns::CLIENT)
    );
}

/// Waits until `c` gets `unavailable` presence from the full JID `from`
/// (NodeDown takes the grace period and a commit).
async fn expect_unavailable(c: &mut Client, from: &str, what: &str) {
    c.recv_until(
        |e| {
            e.name == "presence"
                && e.get_attr("from") == Some(from)
                && e.get_attr("type") == Some("unavailable")
        },
        Duration::from_secs(15),
    )
    .await
    .expect(what);
}

/// How many sessions `n`'s copy of the session table holds, and the
/// status it was read from.
fn table_sessions(n: &TestNode) -> (u64, serde_json::Value) {
    let s = n.cluster_status().expect("status");
    let total = s["members"]
        .as_array()
        .map(|m| m.iter().map(|m| m["sessions"].as_u64().unwrap_or(0)).sum())
        .unwrap_or(0);
    (total, s)
}

/// Waits until each node's session table holds at least `want` sessions.
fn wait_sessions(nodes: &[&TestNode], want: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    for n in nodes {
        loop {
            let (total, s) = table_sessions(n);
            if total as usize >= want {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "sessions never reached {want}: {s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Waits until `n` has applied everything `after` has applied now: a
/// write acknowledged through `after` is then visible to reads on `n`
/// (read-your-writes holds on the writer's node; others follow the log).
fn wait_applied(n: &TestNode, after: &TestNode) {
    let index = |m: &TestNode| {
        m.cluster_status().expect("status")["applied_index"]
            .as_u64()
            .unwrap_or(0)
    };
    let want = index(after);
    let deadline = Instant::now() + Duration::from_secs(10);
    while index(n) < want {
        assert!(
            Instant::now() < deadline,
            "node {} never applied up to {want}",
            n.node_id
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn subscribe_both(a: &mut Client, b: &mut Client) {
    subscribe(a, b).await;
    subscribe(b, a).await;
}

/// `x` subscribes to `y`'s presence and `y` approves.
async fn subscribe(x: &mut Client, y: &mut Client) {
    {
        let to = y.bare_jid().to_owned();
        let sub = Element::new("presence", ns::CLIENT)
            .attr("to", to.as_str())
            .attr("type", "subscribe");
        x.send(&sub).await.expect("subscribe");
        let from = x.bare_jid().to_owned();
        y.recv_until(
            |e| e.name == "presence" && e.get_attr("type") == Some("subscribe"),
            WAIT,
        )
        .await
        .expect("request arrives across nodes");
        let ok = Element::new("presence", ns::CLIENT)
            .attr("to", from.as_str())
            .attr("type", "subscribed");
        y.send(&ok).await.expect("subscribed");
        y.sync().await.expect("sync");
        x.sync().await.expect("sync");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn account_made_through_one_node_logs_in_on_another_at_once() {
    let nodes = three("");
    // Through a follower or the leader alike: the write is forwarded.
    for (i, n) in nodes.iter().enumerate() {
        n.adduser(&format!("u{i}"), PW).expect("adduser");
        let other = &nodes[(i + 1) % 3];
        let c = Client::login_bound(other, &format!("u{i}"), PW, "r").await;
        assert!(
            c.is_ok(),
            "u{i} made on node {} logs in on node {}: {:?}",
            n.node_id,
            other.node_id,
            c.err()
        );
    }
    let users = nodes[2].clusterctl(&["users"]).expect("users");
    assert_eq!(users.lines().count(), 3, "{users}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_presence_and_roster_pushes_cross_nodes_and_priority_is_cluster_wide() {
    let nodes = three("");
    nodes[0].adduser("alice", PW).expect("alice");
    nodes[0].adduser("bob", PW).expect("bob");
    let mut home = online(&nodes[0], "alice", "Home", 10).await;
    let mut office = online(&nodes[1], "alice", "Office", 5).await;
    let mut bob = online(&nodes[2], "bob", "pc", 0).await;
    wait_sessions(&[&nodes[2]], 3);

    // Bare JID: Home (10, node 1) beats Office (5, node 2).
    bob.chat("alice@localhost", "to the bare jid")
        .await
        .expect("send");
    expect_body(&mut home, "to the bare jid").await;
    // Office's next message is the marker: the bare one never went there.
    bob.chat("alice@localhost/Office", "marker")
        .await
        .expect("send");
    expect_body(&mut office, "marker").await;
    // And back, full JID across nodes.
    office
        .chat("bob@localhost/pc", "hi bob")
        .await
        .expect("send");
    expect_body(&mut bob, "hi bob").await;

    // Subscriptions and presence across nodes.
    subscribe_both(&mut bob, &mut home).await;
    let away =
        Element::new("presence", ns::CLIENT).child(Element::new("show", ns::CLIENT).text("away"));
    bob.send(&away).await.expect("away");
    for c in [&mut home, &mut office] {
        let p = c
            .recv_until(
                |e| {
                    e.name == "presence"
                        && e.get_attr("from") == Some("bob@localhost/pc")
                        && e.get_child("show", ns::CLIENT).is_some()
                },
                WAIT,
            )
            .await
            .expect("bob's away reaches alice on both nodes");
        assert_eq!(p.child_text("show", ns::CLIENT).as_deref(), Some("away"));
    }

    // A roster set on node 1 is pushed to alice's resource on node 2.
    let roster_get = office.make_iq("get", None, Element::new("query", ns::ROSTER));
    office.iq(roster_get).await.expect("roster get");
    let item = Element::new("item", ns::ROSTER)
        .attr("jid", "carol@localhost")
        .attr("name", "Carol");
    let set = home.make_iq("set", None, Element::new("query", ns::ROSTER).child(item));
    let r = home.iq(set).await.expect("roster set");
    assert_eq!(r.get_attr("type"), Some("result"));
    office
        .recv_until(
            |e| {
                e.name == "iq"
                    && e.get_attr("type") == Some("set")
                    && e.get_child("query", ns::ROSTER)
                        .and_then(|q| q.get_child("item", ns::ROSTER))
                        .and_then(|i| i.get_attr("jid"))
                        == Some("carol@localhost")
            },
            WAIT,
        )
        .await
        .expect("roster push on the other node");
    // And node 3 answers the next roster get with it.
    let mut bob2 = online(&nodes[2], "alice", "Third", 0).await;
    let get = bob2.make_iq("get", None, Element::new("query", ns::ROSTER));
    let roster = bob2.iq(get).await.expect("roster");
    assert!(
        roster.to_string_in(ns::CLIENT).contains("carol@localhost"),
        "{}",
        roster.to_string_in(ns::CLIENT)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_leader_loses_no_acknowledged_write_and_its_users_go_unavailable() {
    let mut nodes = three("");
    let leader = leader_of(&nodes);
    let li = nodes
        .iter()
        .position(|n| n.node_id == leader)
        .expect("leader index");
    let (fa, fb) = ((li + 1) % 3, (li + 2) % 3);
    nodes[fa].adduser("alice", PW).expect("alice");
    nodes[fa].adduser("bob", PW).expect("bob");
    let mut bob = online(&nodes[li], "bob", "pc", 0).await;
    let mut alice = online(&nodes[fa], "alice", "pc", 0).await;
    subscribe_both(&mut alice, &mut bob).await;

    // Writes through both followers, with the leader killed midway.
    let mut acked = Vec::new();
    for i in 0..40 {
        if i == 15 {
            nodes[li].kill();
        }
        let via = &nodes[if i % 2 == 0 { fa } else { fb }];
        if via.adduser(&format!("w{i}"), PW).is_ok() {
            acked.push(format!("w{i}@localhost"));
        }
    }
    assert!(
        acked.len() >= 30,
        "writes resumed under a new leader: {acked:?}"
    );
    for n in [&nodes[fa], &nodes[fb]] {
        let users = n.clusterctl(&["users"]).expect("users");
        for a in &acked {
            assert!(
                users.lines().any(|l| l == a),
                "node {} lost acknowledged {a}",
                n.node_id
            );
        }
    }
    // Bob was on the dead node: alice learns he is gone (NodeDown).
    expect_unavailable(&mut alice, "bob@localhost/pc", "bob seen unavailable").await;
    // He logs in elsewhere and carries on.
    let mut bob = online(&nodes[fb], "bob", "pc", 0).await;
    alice
        .chat("bob@localhost", "still there?")
        .await
        .expect("send");
    expect_body(&mut bob, "still there?").await;

    // The killed node comes back and catches up.
    nodes[li].start_again().expect("restart");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let users = nodes[li].clusterctl(&["users"]).unwrap_or_default();
        if acked.iter().all(|a| users.lines().any(|l| l == a)) {
            break;
        }
        assert!(Instant::now() < deadline, "restarted node never caught up");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_node_catches_up_from_a_snapshot_after_compaction() {
    let mut nodes = three("snapshot_every = 20");
    nodes[2].stop().expect("stop node 3");
    // One entry per account, so the log passes the snapshot threshold.
    for i in 0..60 {
        nodes[i % 2].adduser(&format!("s{i}"), PW).expect("adduser");
    }
    nodes[2].start_again().expect("start node 3");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let users = nodes[2].clusterctl(&["users"]).unwrap_or_default();
        if users.lines().count() == 60 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "node 3 never caught up: {}",
            users.lines().count()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        nodes[2].log().contains("installed a snapshot"),
        "node 3 caught up without a snapshot install:\n{}",
        nodes[2].log()
    );
    let c = Client::login_bound(&nodes[2], "s59", PW, "r").await;
    assert!(c.is_ok(), "{:?}", c.err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_without_quorum_refuses_writes_and_logins_then_heals() {
    let mut nodes = three("");
    nodes[0].adduser("alice", PW).expect("alice");
    nodes[1].kill();
    nodes[2].kill();
    // Alone, node 1 cannot commit: a clear error naming the quorum, not a hang.
    let deadline = Instant::now() + Duration::from_secs(20);
    let err = loop {
        match nodes[0].adduser("lonely", PW) {
            Err(e) => break e.to_string(),
            Ok(()) => {
                assert!(Instant::now() < deadline, "a lone node kept committing");
            }
        }
    };
    assert!(err.contains("quorum"), "{err}");
    let status = nodes[0].cluster_status().expect("status");
    assert_eq!(status["quorum"], false, "{status}");
    let login = Client::login_bound(&nodes[0], "alice", PW, "r").await;
    let msg = format!("{:?}", login.err());
    assert!(msg.contains("temporary-auth-failure"), "{msg}");
    // The others come back: the cluster heals with no operator action.
    nodes[1].start_again().expect("node 2");
    nodes[2].start_again().expect("node 3");
    nodes[0]
        .wait_quorum(Instant::now() + Duration::from_secs(30))
        .expect("healed");
    nodes[0].adduser("healed", PW).expect("writes work again");
    let users = nodes[2].clusterctl(&["users"]).expect("users");
    // (`lonely` was never acknowledged: it may or may not be there now.)
    assert!(users.contains("healed@localhost"), "{users}");
}

/// Retries a write through `n` until it is acknowledged.
fn adduser_eventually(n: &TestNode, user: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match n.adduser(user, PW) {
            Ok(()) => return,
            Err(e) => assert!(
                Instant::now() < deadline,
                "node {} never took {user}: {e:#}\n{}",
                n.node_id,
                n.log()
            ),
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn users_of(n: &TestNode) -> Vec<String> {
    let mut u: Vec<String> = n
        .clusterctl(&["users"])
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect();
    u.sort();
    u
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_cut_off_by_a_partition_refuses_writes_and_the_cluster_heals() {
    let net = FaultNet::new().expect("proxies");
    let nodes = three_behind(&net, "");
    let li = nodes
        .iter()
        .position(|n| n.node_id == leader_of(&nodes))
        .expect("leader index");
    let (fa, fb) = ((li + 1) % 3, (li + 2) % 3);
    nodes[fa].adduser("alice", PW).expect("alice");
    nodes[fa].adduser("bob", PW).expect("bob");
    let mut bob = online(&nodes[li], "bob", "pc", 0).await;
    let mut alice = online(&nodes[fa], "alice", "pc", 0).await;
    subscribe_both(&mut alice, &mut bob).await;

    // The leader is the minority: it may not commit anything any more.
    net.isolate(nodes[li].node_id);
    // (A write racing the cut may still commit; the first refusal is final.)
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut raced = Vec::new();
    let (refused, err) = loop {
        let user = format!("minority{}", raced.len());
        match nodes[li].adduser(&user, PW) {
            Err(e) => break (format!("{user}@localhost"), e.to_string()),
            Ok(()) => {
                assert!(
                    Instant::now() < deadline,
                    "a cut-off leader kept committing"
                );
                raced.push(format!("{user}@localhost"));
            }
        }
    };
    assert!(err.contains("quorum"), "{err}");
    let login = Client::login_bound(&nodes[li], "alice", PW, "x").await;
    let msg = format!("{:?}", login.err());
    assert!(msg.contains("temporary-auth-failure"), "{msg}");

    // The majority elects a leader of its own and carries on.
    adduser_eventually(&nodes[fb], "majority");
    let c = Client::login_bound(&nodes[fb], "majority", PW, "r").await;
    assert!(c.is_ok(), "{:?}", c.err());
    // Bob's node stopped answering: alice sees him go.
    expect_unavailable(
        &mut alice,
        "bob@localhost/pc",
        "bob seen unavailable on the majority side",
    )
    .await;

    // Healed: the old leader learns the new term and what was committed,
    // drops what it could not commit, and closes the session the cluster
    // counted gone so its client binds again.
    net.heal();
    let cond = bob
        .expect_stream_error(Duration::from_secs(20))
        .await
        .expect("bob's stale session is closed");
    assert_eq!(cond, "reset");
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let all: Vec<Vec<String>> = nodes.iter().map(users_of).collect();
        if all.iter().all(|u| u == &all[0]) && all[0].iter().any(|u| u == "majority@localhost") {
            assert!(
                !all[0].contains(&refused),
                "{refused}, refused on the minority side, took effect: {all:?}"
            );
            for r in &raced {
                assert!(all[0].contains(r), "acknowledged {r} was lost: {all:?}");
            }
            break;
        }
        assert!(Instant::now() < deadline, "replicas never agreed: {all:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut bob = online(&nodes[li], "bob", "pc", 0).await;
    alice
        .chat("bob@localhost", "welcome back")
        .await
        .expect("send");
    let m = bob.recv_message(WAIT).await;
    assert!(
        m.as_ref().ok().and_then(body).as_deref() == Some("welcome back"),
        "{m:?}\n--- node {} (bob's)\n{}\n--- node {} (alice's)\n{}\n--- node {}\n{}",
        nodes[li].node_id,
        nodes[li].log(),
        nodes[fa].node_id,
        nodes[fa].log(),
        nodes[fb].node_id,
        nodes[fb].log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn carbons_reach_a_users_devices_on_other_nodes() {
    const CARBONS: &str = "urn:xmpp:carbons:2";
    const FORWARD: &str = "urn:xmpp:forward:0";
    let nodes = three("");
    nodes[0].adduser("alice", PW).expect("alice");
    nodes[0].adduser("bob", PW).expect("bob");
    let mut phone = online(&nodes[0], "alice", "phone", 5).await;
    let mut desktop = online(&nodes[1], "alice", "desktop", 1).await;
    let enable = desktop.make_iq("set", None, Element::new("enable", CARBONS));
    let r = desktop.iq(enable).await.expect("enable carbons");
    assert_eq!(r.get_attr("type"), Some("result"));
    let mut bob = online(&nodes[2], "bob", "pc", 0).await;
    wait_sessions(&[&nodes[0], &nodes[1], &nodes[2]], 3);
    let carbon_of = |m: &Element, wrapper: &str| {
        m.get_child(wrapper, CARBONS)
            .and_then(|w| w.get_child("forwarded", FORWARD))
            .and_then(|f| f.get_child("message", ns::CLIENT))
            .and_then(body)
    };

    // Received on node 1 (the phone has the highest priority): the
    // desktop on node 2 gets a <received/> copy.
    bob.chat("alice@localhost", "to the phone")
        .await
        .expect("send");
    expect_body(&mut phone, "to the phone").await;
    let m = desktop.recv_message(WAIT).await.expect("received carbon");
    assert_eq!(
        carbon_of(&m, "received").as_deref(),
        Some("to the phone"),
        "{}",
        m.to_string_in(ns::CLIENT)
    );
    assert_eq!(m.get_attr("to"), Some("alice@localhost/desktop"));
    // Sent from node 1: a <sent/> copy on node 2.
    phone
        .chat("bob@localhost/pc", "from the phone")
        .await
        .expect("send");
    expect_body(&mut bob, "from the phone").await;
    let m = desktop.recv_message(WAIT).await.expect("sent carbon");
    assert_eq!(
        carbon_of(&m, "sent").as_deref(),
        Some("from the phone"),
        "{}",
        m.to_string_in(ns::CLIENT)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn archives_and_pep_are_the_same_on_every_node() {
    const MAM: &str = "urn:xmpp:mam:2";
    const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
    const EVENT: &str = "http://jabber.org/protocol/pubsub#event";
    const NICK: &str = "http://jabber.org/protocol/nick";
    let nodes = three("");
    nodes[0].adduser("alice", PW).expect("alice");
    nodes[0].adduser("bob", PW).expect("bob");
    nodes[0].adduser("carol", PW).expect("carol");
    let mut alice = Client::login_bound(&nodes[0], "alice", PW, "a")
        .await
        .expect("alice");
    alice
        .presence_with_caps(&[NICK], false)
        .await
        .expect("caps");
    let mut bob = online(&nodes[1], "bob", "b", 0).await;
    let mut carol = Client::login_bound(&nodes[2], "carol", PW, "c")
        .await
        .expect("carol");
    carol
        .presence_with_caps(&[NICK], false)
        .await
        .expect("caps");
    wait_sessions(&[&nodes[0], &nodes[1], &nodes[2]], 3);

    // A conversation across nodes 1 and 2, read back from node 3's replica.
    for i in 1..=3 {
        alice
            .chat("bob@localhost", &format!("m{i}"))
            .await
            .expect("send");
        expect_body(&mut bob, &format!("m{i}")).await;
    }
    let mut bob3 = Client::login_bound(&nodes[2], "bob", PW, "on3")
        .await
        .expect("bob on 3");
    let q = bob3.make_iq("set", None, Element::new("query", MAM).attr("queryid", "q"));
    let fin = bob3.iq(q).await.expect("query");
    assert_eq!(
        fin.get_attr("type"),
        Some("result"),
        "{}",
        fin.to_string_in(ns::CLIENT)
    );
    let bodies: Vec<String> = bob3
        .take_pending()
        .iter()
        .filter_map(|m| {
            m.get_child("result", MAM)
                .and_then(|r| r.get_child("forwarded", "urn:xmpp:forward:0"))
                .and_then(|f| f.get_child("message", ns::CLIENT))
                .and_then(body)
        })
        .collect();
    assert_eq!(bodies, ["m1", "m2", "m3"]);

    // Alice (node 1) publishes; carol (node 3), subscribed, is notified by
    // her own node from the replicated effect.
    subscribe(&mut carol, &mut alice).await;
    let publish = alice.make_iq(
        "set",
        None,
        Element::new("pubsub", PUBSUB).child(
            Element::new("publish", PUBSUB).attr("node", NICK).child(
                Element::new("item", PUBSUB)
                    .attr("id", "current")
                    .child(Element::new("nick", NICK).text("Alice")),
            ),
        ),
    );
    let r = alice.iq(publish).await.expect("publish");
    assert_eq!(
        r.get_attr("type"),
        Some("result"),
        "{}",
        r.to_string_in(ns::CLIENT)
    );
    let m = carol
        .recv_until(|e| e.get_child("event", EVENT).is_some(), WAIT)
        .await
        .expect("notification on node 3");
    let nick = m
        .get_child("event", EVENT)
        .and_then(|e| e.get_child("items", EVENT))
        .and_then(|i| i.get_child("item", EVENT))
        .and_then(|i| i.child_text("nick", NICK));
    assert_eq!(nick.as_deref(), Some("Alice"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn occupants_on_different_nodes_are_in_one_room() {
    const MUC: &str = "http://jabber.org/protocol/muc";
    const ROOM: &str = "ops@conference.localhost";
    let nodes = three("");
    for u in ["alice", "bob", "carol"] {
        nodes[0].adduser(u, PW).expect("user");
    }
    let join = |nick: &str| {
        Element::new("presence", ns::CLIENT)
            .attr("to", format!("{ROOM}/{nick}"))
            .child(Element::new("x", MUC))
    };
    let is_self = |e: &Element| {
        e.name == "presence"
            && e.get_child("x", "http://jabber.org/protocol/muc#user")
                .is_some_and(|x| x.elements().any(|s| s.get_attr("code") == Some("110")))
    };
    let mut alice = Client::login_bound(&nodes[0], "alice", PW, "a")
        .await
        .expect("alice");
    alice.send(&join("Alice")).await.expect("join");
    alice
        .recv_until(is_self, WAIT)
        .await
        .expect("alice in the room");
    let mut bob = Client::login_bound(&nodes[1], "bob", PW, "b")
        .await
        .expect("bob");
    bob.send(&join("Bob")).await.expect("join");
    bob.recv_until(is_self, WAIT)
        .await
        .expect("bob in the room");
    // Each sees the other, though their sessions are on different nodes.
    alice
        .recv_until(|e| e.get_attr("from") == Some(&format!("{ROOM}/Bob")), WAIT)
        .await
        .expect("alice sees bob join");
    let say = |text: &str| {
        Element::new("message", ns::CLIENT)
            .attr("to", ROOM)
            .attr("type", "groupchat")
            .child(Element::new("body", ns::CLIENT).text(text))
    };
    alice.send(&say("from node 1")).await.expect("say");
    bob.send(&say("from node 2")).await.expect("say");
    // Both get both, in the same order (the log's).
    let mut orders = Vec::new();
    for c in [&mut alice, &mut bob] {
        let mut got = Vec::new();
        while got.len() < 2 {
            let m = c
                .recv_until(
                    |e| e.get_attr("type") == Some("groupchat") && body(e).is_some(),
                    WAIT,
                )
                .await
                .expect("a room message");
            got.push(body(&m).unwrap_or_default());
        }
        orders.push(got);
    }
    assert_eq!(orders[0], orders[1]);
    // A third node's user joins and gets the history from its replica.
    let mut carol = Client::login_bound(&nodes[2], "carol", PW, "c")
        .await
        .expect("carol");
    carol.send(&join("Carol")).await.expect("join");
    carol
        .recv_until(is_self, WAIT)
        .await
        .expect("carol in the room");
    for want in &orders[0] {
        carol
            .recv_until(|e| body(e).as_deref() == Some(want.as_str()), WAIT)
            .await
            .expect("history on node 3");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blocklist_pushes_reach_a_users_resources_on_other_nodes() {
    const BLOCKING: &str = "urn:xmpp:blocking";
    let nodes = three("");
    nodes[0].adduser("alice", PW).expect("alice");
    nodes[0].adduser("spam", PW).expect("spam");
    let mut phone = online(&nodes[0], "alice", "phone", 5).await;
    let mut desktop = online(&nodes[1], "alice", "desktop", 1).await;
    let mut spam = online(&nodes[2], "spam", "bot", 0).await;
    wait_sessions(&[&nodes[0], &nodes[1], &nodes[2]], 3);
    let push_of = |e: &Element, what: &str| {
        e.name == "iq"
            && e.get_attr("type") == Some("set")
            && e.get_child(what, BLOCKING)
                .and_then(|b| b.get_child("item", BLOCKING))
                .and_then(|i| i.get_attr("jid"))
                == Some("spam@localhost")
    };

    // Blocked on node 1: the desktop on node 2 hears of it (XEP-0191 §3.3).
    let block = Element::new("block", BLOCKING)
        .child(Element::new("item", BLOCKING).attr("jid", "spam@localhost"));
    let block = phone.make_iq("set", None, block);
    let r = phone.iq(block).await.expect("block");
    assert_eq!(r.get_attr("type"), Some("result"));
    let p = desktop
        .recv_until(|e| push_of(e, "block"), WAIT)
        .await
        .expect("block push on the other node");
    assert_eq!(p.get_attr("to"), Some("alice@localhost/desktop"));
    // And the cluster enforces it: spam's message to the desktop is
    // refused (by spam's node, once it has applied the block).
    wait_applied(&nodes[2], &nodes[0]);
    spam.chat("alice@localhost/desktop", "buy now")
        .await
        .expect("send");
    spam.recv_until(
        |e| e.name == "message" && e.get_attr("type") == Some("error"),
        WAIT,
    )
    .await
    .expect("spam gets an error");

    // Unblocked on node 2: the phone on node 1 hears of it.
    let unblock = Element::new("unblock", BLOCKING)
        .child(Element::new("item", BLOCKING).attr("jid", "spam@localhost"));
    let unblock = desktop.make_iq("set", None, unblock);
    let r = desktop.iq(unblock).await.expect("unblock");
    assert_eq!(r.get_attr("type"), Some("result"));
    phone
        .recv_until(|e| push_of(e, "unblock"), WAIT)
        .await
        .expect("unblock push on the other node");
    wait_applied(&nodes[2], &nodes[1]);
    spam.chat("alice@localhost/desktop", "hello again")
        .await
        .expect("send");
    expect_body(&mut desktop, "hello again").await;
}

/// An operator works the whole cluster through any node: `clusterctl
/// sessions` lists every node's sessions with their node, `kick` closes a
/// session wherever it is bound, and `remove-node` and `leave` run against
/// a follower are carried out by the leader.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn operators_list_and_kick_sessions_and_remove_members_through_any_node() {
    let nodes = three("");
    nodes[0].adduser("alice", PW).expect("alice");
    nodes[0].adduser("bob", PW).expect("bob");
    let mut one = online(&nodes[0], "alice", "one", 1).await;
    let mut two = online(&nodes[1], "alice", "two", 1).await;
    let mut bob = online(&nodes[1], "bob", "pc", 0).await;
    wait_sessions(&[&nodes[0], &nodes[1], &nodes[2]], 3);

    // Asked on node 3, which holds none of them.
    let list = nodes[2].clusterctl(&["sessions"]).expect("sessions");
    let rows: Vec<Vec<&str>> = list.lines().map(|l| l.split('\t').collect()).collect();
    let placed: Vec<(&str, &str)> = rows.iter().map(|r| (r[0], r[1])).collect();
    assert_eq!(
        placed,
        [
            ("alice@localhost/one", "node=1"),
            ("alice@localhost/two", "node=2"),
            ("bob@localhost/pc", "node=2"),
        ],
        "{list}"
    );
    for r in &rows {
        assert!(
            r[4].starts_with("127."),
            "each node gives its address: {list}"
        );
    }
    let json: serde_json::Value = serde_json::from_str(
        &nodes[0]
            .clusterctl(&["sessions", "--json"])
            .expect("sessions --json"),
    )
    .expect("JSON");
    assert_eq!(json["sessions"].as_array().map(Vec::len), Some(3), "{json}");
    assert_eq!(json["sessions"][2]["jid"], "bob@localhost/pc", "{json}");
    assert_eq!(json["sessions"][2]["node"], 2, "{json}");
    assert_eq!(json["unreachable"].as_array().map(Vec::len), Some(0));
    let local = nodes[1]
        .clusterctl(&["sessions", "--local"])
        .expect("sessions --local");
    assert_eq!(local.lines().count(), 2, "{local}");
    assert!(local.lines().all(|l| l.contains("\tnode=2\t")), "{local}");

    // A full JID bound on node 2, kicked through node 3.
    let out = nodes[2]
        .clusterctl(&["kick", "alice@localhost/two"])
        .expect("kick");
    assert_eq!(out.trim(), "closed alice@localhost/two");
    assert_eq!(
        two.expect_stream_error(WAIT).await.expect("kicked"),
        "policy-violation"
    );
    // Gone from the list once node 2 has unbound it.
    let deadline = Instant::now() + Duration::from_secs(10);
    while nodes[1]
        .clusterctl(&["sessions", "--local"])
        .expect("sessions")
        .contains("alice@localhost/two")
    {
        assert!(Instant::now() < deadline, "alice/two stays listed");
        std::thread::sleep(Duration::from_millis(20));
    }
    // A bare JID: the rest of alice's sessions, with the operator's reason.
    let out = nodes[1]
        .clusterctl(&["kick", "alice@localhost", "--reason", "maintenance"])
        .expect("kick");
    assert_eq!(out.trim(), "closed alice@localhost/one");
    let e = one
        .recv_until(|e| e.is("error", ns::STREAM), WAIT)
        .await
        .expect("kicked");
    assert!(
        e.get_child("policy-violation", ns::STREAMS).is_some()
            && e.get_child("text", ns::STREAMS)
                .map(|t| t.text_content())
                .as_deref()
                == Some("maintenance"),
        "{}",
        e.to_string_in(ns::CLIENT)
    );
    bob.sync().await.expect("bob is still connected");
    // The client has its stream error a moment before its node unbinds it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let list = nodes[0].clusterctl(&["sessions"]).expect("sessions");
        if list.lines().count() == 1 {
            assert!(list.starts_with("bob@localhost/pc\tnode=2"), "{list}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "kicked sessions stay listed: {list}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let err = nodes[0]
        .clusterctl(&["kick", "alice@localhost"])
        .expect_err("nobody left to kick");
    assert!(err.to_string().contains("no session"), "{err:#}");

    // Membership changes through followers. A client of the node removed
    // is disconnected, to reconnect to a member.
    let leader = leader_of(&nodes);
    let followers: Vec<&TestNode> = nodes.iter().filter(|n| n.node_id != leader).collect();
    let mut stranded = online(followers[1], "alice", "stranded", 0).await;
    let gone = followers[1].node_id.to_string();
    followers[0]
        .clusterctl(&["remove-node", &gone])
        .expect("remove-node through a follower");
    let leader = nodes.iter().find(|n| n.node_id == leader).expect("leader");
    wait_members(leader, 2);
    assert_eq!(
        stranded.expect_stream_error(WAIT).await.expect("closed"),
        "reset"
    );
    // Told it is out, it refuses writes and logins at once.
    let err = followers[1]
        .adduser("late", PW)
        .expect_err("a write on the removed node");
    assert!(
        err.to_string().contains("removed from the cluster"),
        "{err:#}"
    );
    assert!(
        Client::login_bound(followers[1], "bob", PW, "again")
            .await
            .is_err(),
        "a login on the removed node"
    );
    let s = followers[1].cluster_status().expect("status");
    assert!(
        s["health"]
            .as_str()
            .is_some_and(|h| h.starts_with("REMOVED")),
        "{s}"
    );
    let ready = tests::http::request(followers[1].http, "GET", "/readyz", &[], "")
        .await
        .expect("readyz");
    assert_eq!(ready.status, 503, "the removed node is not ready");
    assert!(
        ready.body.contains("removed from the cluster"),
        "{}",
        ready.body
    );
    let out = followers[0]
        .clusterctl(&["leave"])
        .expect("leave through a follower");
    assert!(out.contains("left"), "{out}");
    wait_members(leader, 1);
    let err = followers[0]
        .adduser("later", PW)
        .expect_err("a write on the node that left");
    assert!(
        err.to_string().contains("removed from the cluster"),
        "{err:#}"
    );
    // The lone member left carries on.
    leader
        .adduser("carol", PW)
        .expect("a write on the remaining member");
}

/// `clusterctl deluser` through one node closes the user's sessions on
/// every node, and messages to the deleted user bounce.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_account_closes_its_sessions_on_every_node() {
    let nodes = three("");
    nodes[0].adduser("alice", PW).expect("alice");
    nodes[0].adduser("bob", PW).expect("bob");
    let mut phone = online(&nodes[1], "alice", "phone", 1).await;
    let mut laptop = online(&nodes[2], "alice", "laptop", 1).await;
    let mut bob = online(&nodes[2], "bob", "pc", 0).await;
    wait_sessions(&[&nodes[0], &nodes[1], &nodes[2]], 3);
    nodes[0]
        .clusterctl(&["deluser", "alice@localhost"])
        .expect("deluser");
    for (c, what) in [(&mut phone, "on node 2"), (&mut laptop, "on node 3")] {
        assert_eq!(
            c.expect_stream_error(WAIT).await.expect(what),
            "not-authorized",
            "{what}"
        );
    }
    // Once node 3 has applied the deletion and the unbinds, bob's message
    // bounces there.
    wait_applied(&nodes[2], &nodes[0]);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (total, s) = table_sessions(&nodes[2]);
        if total == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "alice's sessions stay: {s}");
        std::thread::sleep(Duration::from_millis(20));
    }
    bob.chat("alice@localhost", "still there?")
        .await
        .expect("send");
    let e = bob
        .recv_until(
            |e| e.name == "message" && e.get_attr("type") == Some("error"),
            WAIT,
        )
        .await
        .expect("an error for a deleted user");
    assert_eq!(
        tests::client::stanza_error(&e).as_deref(),
        Some("service-unavailable"),
        "{}",
        e.to_string_in(ns::CLIENT)
    );
}

/// A member that does not answer: `clusterctl sessions` names it and lists
/// its sessions from the replicated session table (without address or
/// TLS) until the leader declares it down.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_of_a_silent_member_are_listed_from_the_table() {
    // A long grace: the killed node's sessions stay in the table meanwhile.
    let start = |id: u64, join: Vec<String>| {
        let mut o = opts(id, join, "");
        o.cluster_config = o
            .cluster_config
            .replace("node_down_grace_secs = 2", "node_down_grace_secs = 120");
        TestNode::start_with(o).expect("node")
    };
    let n1 = start(1, vec![]);
    let join = vec![n1.cluster.to_string()];
    let n2 = start(2, join.clone());
    let n3 = start(3, join);
    let mut nodes = [n1, n2, n3];
    wait_members(&nodes[0], 3);
    nodes[0].adduser("alice", PW).expect("alice");
    let _alice = online(&nodes[2], "alice", "pc", 3).await;
    wait_sessions(&[&nodes[0]], 1);
    nodes[2].kill();

    let json: serde_json::Value = serde_json::from_str(
        &nodes[0]
            .clusterctl(&["sessions", "--json"])
            .expect("sessions --json"),
    )
    .expect("JSON");
    assert_eq!(json["unreachable"], serde_json::json!([3]), "{json}");
    let s = &json["sessions"][0];
    assert_eq!(s["jid"], "alice@localhost/pc", "{json}");
    assert_eq!(s["node"], 3, "{json}");
    assert_eq!(s["priority"], 3, "{json}");
    assert_eq!(s["available"], true, "{json}");
    assert!(s["peer"].is_null(), "no address from the table: {json}");
    let out = nodes[0]
        .clusterctl_command()
        .arg("sessions")
        .output()
        .expect("clusterctl sessions");
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "alice@localhost/pc\tnode=3\tpriority=3\tavailable\t-\t-"
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("node 3 could not list its sessions"), "{err}");
}
