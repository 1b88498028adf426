//! Stream resumption across the nodes of a cluster: behind a load balancer
//! a phone's new connection lands on any node. A session waiting on node 1
//! is resumed through node 2 (classic `<resume/>`, and inside SASL2): the
//! client gets what it missed, the same full JID, stays available (a bare
//! JID message reaches it), and node 1 lets the session go without a
//! trace.

use std::time::{Duration, Instant};

use tests::client::{body, message, Client, Sasl2Auth, Sasl2Options, WAIT};
use tests::node::{NodeOptions, TestNode};
use xmpp::element::Element;
use xmpp::sasl::HashAlg;

const PW: &str = "secret";
const SM: &str = "urn:xmpp:sm:3";

fn opts(id: u64, join: Vec<String>) -> NodeOptions {
    NodeOptions {
        node_id: id,
        join,
        cluster_config: "heartbeat_ms = 100\nelection_timeout_ms = 600\nnode_down_grace_secs = 2\nwrite_timeout_ms = 3000\n".into(),
        ..NodeOptions::default()
    }
}

fn two() -> (TestNode, TestNode) {
    let n1 = TestNode::start_with(opts(1, vec![])).expect("node 1");
    let n2 = TestNode::start_with(opts(2, vec![n1.cluster.to_string()])).expect("node 2");
    n1.wait_voters(2).expect("two voters");
    for u in ["alice", "bob"] {
        n1.adduser(u, PW).unwrap();
    }
    (n1, n2)
}

/// Alice on `node` with resumable stream management, available; returns
/// the client and the stream id.
async fn phone(node: &TestNode) -> (Client, String) {
    let mut c = Client::login_bound(node, "alice", PW, "phone")
        .await
        .unwrap();
    c.send(&Element::new("enable", SM).attr("resume", "true"))
        .await
        .unwrap();
    let enabled = c.recv_until(|e| e.is("enabled", SM), WAIT).await.unwrap();
    let id = enabled.get_attr("id").unwrap().to_owned();
    c.presence(5).await.unwrap();
    c.sync().await.unwrap();
    (c, id)
}

/// A new connection to `node`, authenticated as alice and not yet bound:
/// ready to resume.
async fn alice_logged_in(node: &TestNode) -> Client {
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    c.login(
        "alice",
        PW,
        tests::client::Mechanism::Scram(HashAlg::Sha256),
    )
    .await
    .unwrap();
    c
}

/// Waits until a bare-JID message from bob reaches this client.
async fn reachable_by_bare_jid(bob: &mut Client, alice: &mut Client, text: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        bob.send(&message("alice@localhost", text)).await.unwrap();
        if alice
            .recv_until(
                |e| body(e).as_deref() == Some(text),
                Duration::from_millis(500),
            )
            .await
            .is_ok()
        {
            return;
        }
        assert!(Instant::now() < deadline, "{text} never reached alice");
    }
}

#[tokio::test]
async fn a_session_on_one_node_resumes_through_another() {
    let (n1, n2) = two();
    let (c, id) = phone(&n1).await;
    drop(c);
    let mut bob = Client::login_bound(&n2, "bob", PW, "b").await.unwrap();
    bob.send(&message("alice@localhost/phone", "while away"))
        .await
        .unwrap();
    bob.sync().await.unwrap();

    // The phone comes back through node 2.
    let mut c = alice_logged_in(&n2).await;
    let resumed = c.resume(&id, 0).await.unwrap();
    assert!(
        resumed.is("resumed", SM),
        "{}\n--- node 1\n{}\n--- node 2\n{}",
        tests::client::show(&resumed),
        n1.log(),
        n2.log()
    );
    assert_eq!(resumed.get_attr("previd"), Some(id.as_str()));
    c.recv_until(|e| body(e).as_deref() == Some("while away"), WAIT)
        .await
        .expect("what it missed, sent again");
    // Same full JID, still available: messages to it and to the bare JID
    // arrive on the new connection.
    bob.send(&message("alice@localhost/phone", "full"))
        .await
        .unwrap();
    c.recv_until(|e| body(e).as_deref() == Some("full"), WAIT)
        .await
        .expect("to the full JID");
    reachable_by_bare_jid(&mut bob, &mut c, "bare").await;
    // Node 1 let the session go without ending it.
    let log = n1.log();
    assert!(log.contains("session handed over"), "{log}");
    assert!(n2.log().contains("session moved here from another node"));

    // It can move again, back to node 1, resuming inside SASL2 this time.
    c.send(&Element::new("a", SM).attr("h", "3")).await.unwrap();
    c.sync().await.unwrap();
    drop(c);
    bob.send(&message("alice@localhost/phone", "second trip"))
        .await
        .unwrap();
    bob.sync().await.unwrap();
    let mut c = Client::connect_starttls(n1.c2s, &n1.domain).await.unwrap();
    let opts = Sasl2Options {
        resume: Some((id.clone(), 3)),
        ..Sasl2Options::default()
    };
    let ok = c
        .sasl2_login("alice", Sasl2Auth::Scram(HashAlg::Sha256, PW), &opts)
        .await
        .unwrap()
        .expect("SASL2 login");
    assert!(
        ok.success.get_child("resumed", SM).is_some(),
        "{}",
        tests::client::show(&ok.success)
    );
    c.recv_until(|e| body(e).as_deref() == Some("second trip"), WAIT)
        .await
        .expect("what it missed on the way back");
}

#[tokio::test]
async fn an_unknown_or_foreign_stream_id_is_refused_on_every_node() {
    let (n1, n2) = two();
    let (c, id) = phone(&n1).await;
    drop(c);
    // Bob cannot take alice's session, even knowing its id.
    let mut bob = Client::connect_starttls(n2.c2s, &n2.domain).await.unwrap();
    bob.login("bob", PW, tests::client::Mechanism::Scram(HashAlg::Sha256))
        .await
        .unwrap();
    let r = bob.resume(&id, 0).await.unwrap();
    assert!(r.is("failed", SM));
    // An id nobody has: refused, and the client can bind instead.
    let r = bob.resume("no-such-stream", 0).await.unwrap();
    assert!(r.is("failed", SM));
    bob.bind(Some("b")).await.unwrap();
    // Alice's session still waits on node 1, untouched.
    let mut c = alice_logged_in(&n1).await;
    let r = c.resume(&id, 0).await.unwrap();
    assert!(r.is("resumed", SM));
}
