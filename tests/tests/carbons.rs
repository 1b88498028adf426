//! Message Carbons (XEP-0280): a user's other carbons-enabled devices get
//! copies of the chats one device sends and receives.

use tests::client::{body, message, Client, QUIET, WAIT};
use tests::node::TestNode;
use xmpp::element::Element;
use xmpp::stanza::ns;

const PW: &str = "secret";
const CARBONS: &str = "urn:xmpp:carbons:2";
const FORWARD: &str = "urn:xmpp:forward:0";

async fn online(
    node: &TestNode,
    user: &str,
    resource: &str,
    priority: i8,
    carbons: bool,
) -> Client {
    let mut c = Client::login_bound(node, user, PW, resource).await.unwrap();
    if carbons {
        let iq = c.make_iq("set", None, Element::new("enable", CARBONS));
        let reply = c.iq(iq).await.unwrap();
        assert_eq!(
            reply.get_attr("type"),
            Some("result"),
            "{}",
            reply.to_string_in(ns::CLIENT)
        );
    }
    c.presence(priority).await.unwrap();
    c
}

/// The message inside a carbon: `<wrapper><forwarded><message/>`.
fn inner<'a>(carbon: &'a Element, wrapper: &str) -> &'a Element {
    carbon
        .get_child(wrapper, CARBONS)
        .and_then(|w| w.get_child("forwarded", FORWARD))
        .and_then(|f| f.get_child("message", ns::CLIENT))
        .unwrap_or_else(|| {
            panic!(
                "not a {wrapper} carbon: {}",
                carbon.to_string_in(ns::CLIENT)
            )
        })
}

#[tokio::test]
async fn carbons_copy_sent_and_received_chats_to_other_enabled_devices() {
    let node = TestNode::start().unwrap();
    node.adduser("alice", PW).unwrap();
    node.adduser("bob", PW).unwrap();
    let mut phone = online(&node, "alice", "phone", 5, true).await;
    let mut desktop = online(&node, "alice", "desktop", 1, true).await;
    let mut legacy = online(&node, "alice", "legacy", 0, false).await;
    let mut bob = online(&node, "bob", "b", 0, false).await;

    // Received: bob writes to alice's bare JID; the phone (priority 5) gets
    // it, the desktop a <received/> copy, the legacy client nothing.
    bob.chat("alice@localhost", "hi alice").await.unwrap();
    let m = phone.recv_message(WAIT).await.unwrap();
    assert_eq!(body(&m).as_deref(), Some("hi alice"));
    let carbon = desktop.recv_message(WAIT).await.unwrap();
    assert_eq!(carbon.get_attr("from"), Some("alice@localhost"));
    let copy = inner(&carbon, "received");
    assert_eq!(body(copy).as_deref(), Some("hi alice"));
    assert_eq!(copy.get_attr("from"), Some("bob@localhost/b"));
    legacy.expect_no_message(QUIET).await.unwrap();

    // Sent: the desktop writes to bob; the phone gets a <sent/> copy.
    let mut m = message("bob@localhost", "hi bob");
    m.set_attr("type", "chat");
    desktop.send(&m).await.unwrap();
    assert_eq!(
        body(&bob.recv_message(WAIT).await.unwrap()).as_deref(),
        Some("hi bob")
    );
    let carbon = phone.recv_message(WAIT).await.unwrap();
    let copy = inner(&carbon, "sent");
    assert_eq!(copy.get_attr("from"), Some("alice@localhost/desktop"));
    assert_eq!(body(copy).as_deref(), Some("hi bob"));
    legacy.expect_no_message(QUIET).await.unwrap();
    desktop.expect_no_message(QUIET).await.unwrap();
}

#[tokio::test]
async fn private_messages_and_disabled_devices_get_no_carbons() {
    let node = TestNode::start().unwrap();
    node.adduser("alice", PW).unwrap();
    node.adduser("bob", PW).unwrap();
    let mut phone = online(&node, "alice", "phone", 5, true).await;
    let mut desktop = online(&node, "alice", "desktop", 1, true).await;
    let mut bob = online(&node, "bob", "b", 0, false).await;

    let mut m = message("alice@localhost", "just for the phone");
    m.set_attr("type", "chat");
    m = m
        .child(Element::new("private", CARBONS))
        .child(Element::new("no-copy", "urn:xmpp:hints"));
    bob.send(&m).await.unwrap();
    assert_eq!(
        body(&phone.recv_message(WAIT).await.unwrap()).as_deref(),
        Some("just for the phone")
    );
    desktop.expect_no_message(QUIET).await.unwrap();

    let iq = desktop.make_iq("set", None, Element::new("disable", CARBONS));
    assert_eq!(
        desktop.iq(iq).await.unwrap().get_attr("type"),
        Some("result")
    );
    bob.chat("alice@localhost", "after disable").await.unwrap();
    assert_eq!(
        body(&phone.recv_message(WAIT).await.unwrap()).as_deref(),
        Some("after disable")
    );
    desktop.expect_no_message(QUIET).await.unwrap();
}

#[tokio::test]
async fn server_advertises_carbons() {
    let node = TestNode::start().unwrap();
    node.adduser("alice", PW).unwrap();
    let mut c = Client::login_bound(&node, "alice", PW, "r").await.unwrap();
    let iq = c.make_iq(
        "get",
        Some("localhost"),
        Element::new("query", ns::DISCO_INFO),
    );
    let info = c.iq(iq).await.unwrap();
    let query = info.get_child("query", ns::DISCO_INFO).expect("query");
    assert!(
        query.elements().any(|f| f.get_attr("var") == Some(CARBONS)),
        "{}",
        info.to_string_in(ns::CLIENT)
    );
}
