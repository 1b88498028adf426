//! Client State Indication (XEP-0352): an inactive client is not woken
//! for presence; a message with a body wakes it, and what was held back
//! comes first, in order.

use tests::client::{body, Client, QUIET, WAIT};
use tests::node::TestNode;
use xmpp::element::Element;
use xmpp::stanza::ns;

const PW: &str = "secret";
const CSI: &str = "urn:xmpp:csi:0";

/// alice and bob, subscribed to each other, both online.
async fn friends(node: &TestNode) -> (Client, Client) {
    let mut alice = Client::login_bound(node, "alice", PW, "phone")
        .await
        .unwrap();
    let mut bob = Client::login_bound(node, "bob", PW, "pc").await.unwrap();
    alice.presence(0).await.unwrap();
    bob.presence(0).await.unwrap();
    for (c, other) in [(&mut alice, "bob@localhost"), (&mut bob, "alice@localhost")] {
        let req = Element::new("presence", ns::CLIENT)
            .attr("to", other)
            .attr("type", "subscribe");
        c.send(&req).await.unwrap();
    }
    for (c, other) in [(&mut alice, "bob@localhost"), (&mut bob, "alice@localhost")] {
        c.recv_until(
            |e| e.name == "presence" && e.get_attr("type") == Some("subscribe"),
            WAIT,
        )
        .await
        .unwrap();
        c.send(
            &Element::new("presence", ns::CLIENT)
                .attr("to", other)
                .attr("type", "subscribed"),
        )
        .await
        .unwrap();
    }
    alice.sync().await.unwrap();
    bob.sync().await.unwrap();
    (alice, bob)
}

fn status(e: &Element) -> Option<String> {
    e.child_text("status", ns::CLIENT)
}

#[tokio::test]
async fn inactive_client_gets_presence_only_with_the_next_message() {
    let node = TestNode::start().unwrap();
    node.adduser("alice", PW).unwrap();
    node.adduser("bob", PW).unwrap();
    let (mut alice, mut bob) = friends(&node).await;
    assert!(
        alice.features.has_child("csi", CSI),
        "the server offers XEP-0352"
    );
    // Drain what the handshake delivered.
    while alice.recv(QUIET).await.is_ok() {}

    alice.send(&Element::new("inactive", CSI)).await.unwrap();
    alice.sync().await.unwrap();
    let away = |text: &str| {
        Element::new("presence", ns::CLIENT)
            .child(Element::new("show", ns::CLIENT).text("away"))
            .child(Element::new("status", ns::CLIENT).text(text))
    };
    bob.send(&away("lunch")).await.unwrap();
    bob.send(&away("meeting")).await.unwrap();
    bob.sync().await.unwrap();
    // Held back: nothing from bob while alice is inactive.
    alice
        .expect_none(|e| e.get_attr("from") == Some("bob@localhost/pc"), QUIET)
        .await
        .unwrap();

    bob.chat("alice@localhost", "are you there?").await.unwrap();
    let first = alice
        .recv_until(|e| e.get_attr("from") == Some("bob@localhost/pc"), WAIT)
        .await
        .unwrap();
    assert_eq!(
        status(&first).as_deref(),
        Some("lunch"),
        "held presence first: {}",
        first.to_string_in(ns::CLIENT)
    );
    let second = alice
        .recv_until(|e| e.get_attr("from") == Some("bob@localhost/pc"), WAIT)
        .await
        .unwrap();
    assert_eq!(status(&second).as_deref(), Some("meeting"));
    let third = alice
        .recv_until(|e| e.get_attr("from") == Some("bob@localhost/pc"), WAIT)
        .await
        .unwrap();
    assert_eq!(body(&third).as_deref(), Some("are you there?"));
}

#[tokio::test]
async fn becoming_active_releases_what_was_held() {
    let node = TestNode::start().unwrap();
    node.adduser("alice", PW).unwrap();
    node.adduser("bob", PW).unwrap();
    let (mut alice, mut bob) = friends(&node).await;
    while alice.recv(QUIET).await.is_ok() {}
    alice.send(&Element::new("inactive", CSI)).await.unwrap();
    alice.sync().await.unwrap();
    bob.send(
        &Element::new("presence", ns::CLIENT)
            .child(Element::new("status", ns::CLIENT).text("back soon")),
    )
    .await
    .unwrap();
    bob.sync().await.unwrap();
    alice
        .expect_none(|e| e.get_attr("from") == Some("bob@localhost/pc"), QUIET)
        .await
        .unwrap();
    alice.send(&Element::new("active", CSI)).await.unwrap();
    let p = alice
        .recv_until(|e| e.get_attr("from") == Some("bob@localhost/pc"), WAIT)
        .await
        .unwrap();
    assert_eq!(status(&p).as_deref(), Some("back soon"));
}
