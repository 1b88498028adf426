//! Where messages go (RFC 6121 §8.5): full JIDs, bare JIDs by priority,
//! unknown users, and offline storage (XEP-0160) — including across a
//! graceful restart and a SIGKILL of the node.

use tests::client::{body, message, stanza_error, Client, QUIET, WAIT};
use tests::node::{NodeOptions, TestNode};
use xmpp::element::Element;
use xmpp::stanza::ns;

const PW: &str = "secret";

fn node_with(users: &[&str]) -> TestNode {
    node_with_opts(users, NodeOptions::default())
}

fn node_with_opts(users: &[&str], opts: NodeOptions) -> TestNode {
    let node = TestNode::start_with(opts).expect("node starts");
    for u in users {
        node.adduser(u, PW).expect("adduser");
    }
    node
}

/// Logs in, binds `resource` and sends available presence with `priority`.
async fn online(node: &TestNode, user: &str, resource: &str, priority: i8) -> Client {
    let mut c = Client::login_bound(node, user, PW, resource).await.unwrap();
    c.presence(priority).await.unwrap();
    c
}

async fn expect_body(c: &mut Client, want: &str) -> Element {
    let m = c.recv_message(WAIT).await.unwrap();
    assert_eq!(
        body(&m).as_deref(),
        Some(want),
        "{}",
        m.to_string_in(ns::CLIENT)
    );
    m
}

#[tokio::test]
async fn message_to_a_full_jid_goes_only_to_that_resource() {
    let node = node_with(&["alice", "bob"]);
    let mut a1 = online(&node, "alice", "A", 5).await;
    let mut a2 = online(&node, "alice", "B", 0).await;
    let mut bob = online(&node, "bob", "pc", 0).await;
    bob.chat("alice@localhost/B", "for B").await.unwrap();
    let m = expect_body(&mut a2, "for B").await;
    assert_eq!(m.get_attr("from"), Some("bob@localhost/pc"));
    assert_eq!(m.get_attr("to"), Some("alice@localhost/B"));
    a1.expect_no_message(QUIET).await.unwrap();
}

#[tokio::test]
async fn bare_jid_message_goes_to_highest_priority_resource() {
    let node = node_with(&["alice", "bob"]);
    let mut home = online(&node, "alice", "Home", 10).await;
    let mut office = online(&node, "alice", "Office", 5).await;
    let mut mobile = online(&node, "alice", "Mobile", 1).await;
    let mut bob = online(&node, "bob", "pc", 0).await;
    bob.chat("alice@localhost", "where are you?").await.unwrap();
    expect_body(&mut home, "where are you?").await;
    office.expect_no_message(QUIET).await.unwrap();
    mobile.expect_no_message(QUIET).await.unwrap();
}

#[tokio::test]
async fn negative_priority_resource_never_gets_bare_jid_messages() {
    let node = node_with(&["alice", "bob"]);
    let mut shy = online(&node, "alice", "Shy", -1).await;
    let mut zero = online(&node, "alice", "Zero", 0).await;
    let mut bob = online(&node, "bob", "pc", 0).await;
    bob.chat("alice@localhost", "hello").await.unwrap();
    expect_body(&mut zero, "hello").await;
    shy.expect_no_message(QUIET).await.unwrap();
    // It still gets what is addressed to it.
    bob.chat("alice@localhost/Shy", "just you").await.unwrap();
    expect_body(&mut shy, "just you").await;
}

#[tokio::test]
async fn only_negative_priority_resources_online_means_offline_storage() {
    let node = node_with(&["alice", "bob"]);
    let mut shy = online(&node, "alice", "Shy", -5).await;
    let mut bob = online(&node, "bob", "pc", 0).await;
    bob.chat("alice@localhost", "for later").await.unwrap();
    bob.sync().await.unwrap();
    shy.expect_no_message(QUIET).await.unwrap();
    // No error to bob: the message was stored.
    bob.expect_no_message(QUIET).await.unwrap();
    let mut later = online(&node, "alice", "Later", 0).await;
    let m = expect_body(&mut later, "for later").await;
    assert!(
        m.has_child("delay", ns::DELAY),
        "{}",
        m.to_string_in(ns::CLIENT)
    );
    shy.expect_no_message(QUIET).await.unwrap();
}

#[tokio::test]
async fn message_to_unknown_user_bounces_service_unavailable() {
    let node = node_with(&["bob"]);
    let mut bob = online(&node, "bob", "pc", 0).await;
    bob.send(&message("nobody@localhost", "anyone?").attr("id", "m1"))
        .await
        .unwrap();
    let err = bob.recv_message(WAIT).await.unwrap();
    assert_eq!(stanza_error(&err).as_deref(), Some("service-unavailable"));
    assert_eq!(err.get_attr("id"), Some("m1"));
    assert_eq!(err.get_attr("from"), Some("nobody@localhost"));
}

#[tokio::test]
async fn error_message_to_unknown_user_is_not_bounced() {
    let node = node_with(&["bob"]);
    let mut bob = online(&node, "bob", "pc", 0).await;
    let e = Element::new("message", ns::CLIENT)
        .attr("to", "nobody@localhost")
        .attr("type", "error")
        .attr("id", "e1")
        .child(
            Element::new("error", ns::CLIENT)
                .attr("type", "cancel")
                .child(Element::new("item-not-found", ns::STANZAS)),
        );
    bob.send(&e).await.unwrap();
    bob.sync().await.unwrap();
    bob.expect_no_message(QUIET).await.unwrap();
}

#[tokio::test]
async fn message_to_offline_full_jid_falls_back_to_bare_jid_rules() {
    let node = node_with(&["alice", "bob"]);
    let mut home = online(&node, "alice", "Home", 1).await;
    let mut bob = online(&node, "bob", "pc", 0).await;
    bob.chat("alice@localhost/Gone", "fallback").await.unwrap();
    expect_body(&mut home, "fallback").await;
    bob.expect_no_message(QUIET).await.unwrap();
}

#[tokio::test]
async fn message_to_offline_full_jid_of_offline_user_is_stored() {
    let node = node_with(&["alice", "bob"]);
    let mut bob = online(&node, "bob", "pc", 0).await;
    bob.chat("alice@localhost/Gone", "stored").await.unwrap();
    bob.sync().await.unwrap();
    bob.expect_no_message(QUIET).await.unwrap();
    let mut alice = online(&node, "alice", "Home", 0).await;
    expect_body(&mut alice, "stored").await;
}

#[tokio::test]
async fn offline_message_is_delivered_after_initial_presence_with_delay() {
    let node = node_with(&["alice", "bob"]);
    let mut bob = online(&node, "bob", "pc", 0).await;
    bob.chat("alice@localhost", "while you were out")
        .await
        .unwrap();
    bob.sync().await.unwrap();

    let mut alice = Client::login_bound(&node, "alice", PW, "Home")
        .await
        .unwrap();
    // XEP-0160 §3: not before initial presence.
    alice.expect_no_message(QUIET).await.unwrap();
    alice.presence(0).await.unwrap();
    let m = expect_body(&mut alice, "while you were out").await;
    assert_eq!(m.get_attr("from"), Some("bob@localhost/pc"));
    let delay = m.get_child("delay", ns::DELAY).expect("<delay/>");
    let stamp = delay.get_attr("stamp").unwrap_or_default();
    // XEP-0082 DateTime in UTC, e.g. 2026-11-25T21:00:00.123Z.
    assert!(
        stamp.len() >= 20 && stamp.as_bytes()[10] == b'T' && stamp.ends_with('Z'),
        "bad stamp {stamp:?}"
    );
    // Delivered once: a second session does not get it again.
    let mut again = online(&node, "alice", "Again", 0).await;
    again.expect_no_message(QUIET).await.unwrap();
}

/// Stores a message for offline alice, runs `bounce` on the node, and
/// checks alice gets the message at her next login.
async fn offline_message_survives(bounce: impl FnOnce(&mut TestNode)) {
    let mut node = node_with(&["alice", "bob"]);
    let mut bob = online(&node, "bob", "pc", 0).await;
    bob.chat("alice@localhost", "survive this").await.unwrap();
    // Once the ping is answered the message is stored (stanzas of a
    // session are handled in order).
    bob.sync().await.unwrap();
    drop(bob);
    bounce(&mut node);
    let mut alice = online(&node, "alice", "Home", 0).await;
    let m = expect_body(&mut alice, "survive this").await;
    assert!(m.has_child("delay", ns::DELAY));
}

#[tokio::test]
async fn offline_message_survives_a_graceful_restart() {
    offline_message_survives(|node| node.restart().expect("restart")).await;
}

#[tokio::test]
async fn offline_message_survives_sigkill() {
    offline_message_survives(|node| {
        node.kill();
        node.start_again().expect("start again");
    })
    .await;
}

#[tokio::test]
async fn offline_queue_is_bounded_and_the_sender_is_told() {
    let node = node_with_opts(
        &["alice", "bob"],
        NodeOptions {
            extra_config: "[limits]\noffline_max_messages = 3\n".into(),
            ..NodeOptions::default()
        },
    );
    let mut bob = online(&node, "bob", "pc", 0).await;
    for i in 1..=3 {
        bob.chat("alice@localhost", &format!("m{i}")).await.unwrap();
    }
    bob.sync().await.unwrap();
    bob.expect_no_message(QUIET).await.unwrap();
    bob.send(&message("alice@localhost", "m4").attr("id", "fourth"))
        .await
        .unwrap();
    let err = bob.recv_message(WAIT).await.unwrap();
    assert_eq!(err.get_attr("id"), Some("fourth"));
    assert_eq!(stanza_error(&err).as_deref(), Some("service-unavailable"));
    let text = err
        .get_child("error", ns::CLIENT)
        .and_then(|e| e.child_text("text", ns::STANZAS))
        .unwrap_or_default();
    assert!(
        text.contains('3'),
        "error text does not name the limit: {text:?}"
    );

    let mut alice = online(&node, "alice", "Home", 0).await;
    for i in 1..=3 {
        expect_body(&mut alice, &format!("m{i}")).await;
    }
    alice.expect_no_message(QUIET).await.unwrap();
}
