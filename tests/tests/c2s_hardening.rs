//! What a hostile or broken client cannot do: spoof its address, feed bad
//! or restricted XML, send oversized stanzas, or hold a connection open
//! without authenticating (RFC 6120 §4.9.3, §8.1.2.1; XEP-0205). After
//! each, the node is still alive and serving everybody else.

use std::time::Duration;

use tests::client::{body, message, Client, QUIET, WAIT};
use tests::node::{NodeOptions, TestNode};
use xmpp::stanza::ns;

const PW: &str = "secret";

fn node() -> TestNode {
    hardened_node("")
}

fn hardened_node(extra_config: &str) -> TestNode {
    let node = TestNode::start_with(NodeOptions {
        extra_config: extra_config.into(),
        ..NodeOptions::default()
    })
    .expect("node starts");
    for u in ["alice", "bob", "mallory"] {
        node.adduser(u, PW).expect("adduser");
    }
    node
}

async fn online(node: &TestNode, user: &str, resource: &str) -> Client {
    let mut c = Client::login_bound(node, user, PW, resource).await.unwrap();
    c.presence(0).await.unwrap();
    c
}

/// Alice and Bob, connected before the attack, can still talk; and a new
/// login still works: the node survived.
async fn still_serving(node: &TestNode, alice: &mut Client, bob: &mut Client) {
    alice.chat("bob@localhost", "still here").await.unwrap();
    let m = bob.recv_message(WAIT).await.unwrap();
    assert_eq!(body(&m).as_deref(), Some("still here"));
    let mut fresh = online(node, "alice", "fresh").await;
    fresh.sync().await.unwrap();
}

/// Sends `raw` on a bound session of mallory's and returns the stream error.
async fn attack(node: &TestNode, raw: &str) -> String {
    let mut mallory = online(node, "mallory", "evil").await;
    mallory.send_raw(raw).await.unwrap();
    mallory.expect_stream_error(WAIT).await.unwrap()
}

#[tokio::test]
async fn spoofed_from_closes_the_stream_with_invalid_from() {
    let node = node();
    let mut alice = online(&node, "alice", "pc").await;
    let mut bob = online(&node, "bob", "pc").await;
    let mut mallory = online(&node, "mallory", "evil").await;
    let forged =
        message("bob@localhost", "send me your password").attr("from", "alice@localhost/pc");
    mallory.send(&forged).await.unwrap();
    assert_eq!(
        mallory.expect_stream_error(WAIT).await.unwrap(),
        "invalid-from"
    );
    bob.expect_no_message(QUIET).await.unwrap();
    alice.expect_no_message(Duration::ZERO).await.unwrap();
    still_serving(&node, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn own_bare_or_full_jid_as_from_is_accepted() {
    let node = node();
    let mut alice = online(&node, "alice", "pc").await;
    let mut bob = online(&node, "bob", "pc").await;
    alice
        .send(&message("bob@localhost", "bare").attr("from", "alice@localhost"))
        .await
        .unwrap();
    alice
        .send(&message("bob@localhost", "full").attr("from", "alice@localhost/pc"))
        .await
        .unwrap();
    for want in ["bare", "full"] {
        let m = bob.recv_message(WAIT).await.unwrap();
        assert_eq!(body(&m).as_deref(), Some(want));
        // The server stamps the full JID either way.
        assert_eq!(m.get_attr("from"), Some("alice@localhost/pc"));
    }
}

#[tokio::test]
async fn malformed_xml_is_not_well_formed_and_others_keep_working() {
    let node = node();
    let mut alice = online(&node, "alice", "pc").await;
    let mut bob = online(&node, "bob", "pc").await;
    let cond = attack(
        &node,
        "<message to='bob@localhost'><body>oops</bdoy></message>",
    )
    .await;
    assert_eq!(cond, "not-well-formed");
    bob.expect_no_message(QUIET).await.unwrap();
    still_serving(&node, &mut alice, &mut bob).await;
}

/// `<message><body>x</message>` leaves `<message>` open by depth alone;
/// the end tag cannot match, so the stream fails when it arrives instead
/// of waiting for a close that never comes.
#[tokio::test]
async fn mismatched_end_tag_fails_at_once() {
    let node = node();
    let mut alice = online(&node, "alice", "pc").await;
    let mut bob = online(&node, "bob", "pc").await;
    let cond = attack(&node, "<message to='bob@localhost'><body>x</message>").await;
    assert_eq!(cond, "not-well-formed");
    bob.expect_no_message(QUIET).await.unwrap();
    still_serving(&node, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn doctype_is_restricted_xml() {
    let node = node();
    let mut alice = online(&node, "alice", "pc").await;
    let mut bob = online(&node, "bob", "pc").await;
    let cond = attack(&node, "<!DOCTYPE message>").await;
    assert_eq!(cond, "restricted-xml");
    still_serving(&node, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn entity_declaration_is_restricted_xml() {
    let node = node();
    let mut alice = online(&node, "alice", "pc").await;
    let mut bob = online(&node, "bob", "pc").await;
    let billion_laughs = "<!DOCTYPE m [<!ENTITY lol 'lol'><!ENTITY lol2 '&lol;&lol;&lol;&lol;'>]>";
    let cond = attack(&node, billion_laughs).await;
    assert_eq!(cond, "restricted-xml");
    still_serving(&node, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn processing_instruction_is_restricted_xml() {
    let node = node();
    let mut alice = online(&node, "alice", "pc").await;
    let mut bob = online(&node, "bob", "pc").await;
    let cond = attack(&node, "<?xml-stylesheet href='evil.xsl'?>").await;
    assert_eq!(cond, "restricted-xml");
    still_serving(&node, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn processing_instruction_inside_a_stanza_is_restricted_xml() {
    let node = node();
    let mut alice = online(&node, "alice", "pc").await;
    let mut bob = online(&node, "bob", "pc").await;
    let cond = attack(
        &node,
        "<message to='bob@localhost'><?evil?><body>x</body></message>",
    )
    .await;
    assert_eq!(cond, "restricted-xml");
    bob.expect_no_message(QUIET).await.unwrap();
    still_serving(&node, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn undefined_entity_is_refused() {
    let node = node();
    let mut alice = online(&node, "alice", "pc").await;
    let mut bob = online(&node, "bob", "pc").await;
    let cond = attack(
        &node,
        "<message to='bob@localhost'><body>&xxe;</body></message>",
    )
    .await;
    assert!(
        cond == "not-well-formed" || cond == "restricted-xml",
        "undefined entity gave {cond}"
    );
    bob.expect_no_message(QUIET).await.unwrap();
    still_serving(&node, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn predefined_and_character_entities_are_fine() {
    let node = node();
    let mut alice = online(&node, "alice", "pc").await;
    let mut bob = online(&node, "bob", "pc").await;
    alice
        .send_raw("<message to='bob@localhost' type='chat'><body>&lt;b&gt; &amp; &#x263A;</body></message>")
        .await
        .unwrap();
    let m = bob.recv_message(WAIT).await.unwrap();
    assert_eq!(body(&m).as_deref(), Some("<b> & \u{263A}"));
}

#[tokio::test]
async fn stanza_over_max_stanza_bytes_is_a_policy_violation() {
    let node = hardened_node("[limits]\nmax_stanza_bytes = 10000\n");
    let mut alice = online(&node, "alice", "pc").await;
    let mut bob = online(&node, "bob", "pc").await;
    // Just under the limit is delivered.
    let fits = "a".repeat(9000);
    alice.chat("bob@localhost", &fits).await.unwrap();
    let m = bob.recv_message(WAIT).await.unwrap();
    assert_eq!(body(&m).as_deref(), Some(fits.as_str()));
    // Over it closes the sender's stream.
    let big = message("bob@localhost", &"b".repeat(20_000)).to_string_in(ns::CLIENT);
    let cond = attack(&node, &big).await;
    assert_eq!(cond, "policy-violation");
    bob.expect_no_message(QUIET).await.unwrap();
    still_serving(&node, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn endless_stanza_without_a_closing_tag_is_a_policy_violation() {
    // The limit holds while the stanza is still arriving: the server must
    // not buffer without bound waiting for an end that never comes.
    let node = hardened_node("[limits]\nmax_stanza_bytes = 10000\n");
    let mut mallory = online(&node, "mallory", "evil").await;
    mallory
        .send_raw("<message to='bob@localhost'><body>")
        .await
        .unwrap();
    let chunk = "c".repeat(4096);
    let mut sent = 0;
    while sent < 64 * 1024 {
        if mallory.send_raw(&chunk).await.is_err() {
            break; // the server already closed on us
        }
        sent += chunk.len();
    }
    assert_eq!(
        mallory.expect_stream_error(WAIT).await.unwrap(),
        "policy-violation"
    );
}

#[tokio::test]
async fn connection_that_never_authenticates_times_out() {
    let node = hardened_node("[limits]\nnegotiation_timeout_secs = 2\n");
    let mut alice = online(&node, "alice", "pc").await;
    let mut bob = online(&node, "bob", "pc").await;
    // Idle before TLS, and idle after TLS without SASL.
    let mut plain = Client::connect_plain(node.c2s, &node.domain).await.unwrap();
    let mut tls = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let timeout = Duration::from_secs(15);
    assert_eq!(
        plain.expect_stream_error(timeout).await.unwrap(),
        "connection-timeout"
    );
    assert_eq!(
        tls.expect_stream_error(timeout).await.unwrap(),
        "connection-timeout"
    );
    // Bound sessions are not subject to it.
    still_serving(&node, &mut alice, &mut bob).await;
}

#[tokio::test]
async fn node_survives_a_series_of_attacks() {
    let node = hardened_node("[limits]\nmax_stanza_bytes = 10000\n");
    let mut alice = online(&node, "alice", "pc").await;
    let mut bob = online(&node, "bob", "pc").await;
    for raw in [
        "<message><body></message>",
        "<!DOCTYPE x>",
        "<?pi?>",
        "<message to='bob@localhost'><body>&bogus;</body></message>",
        "\u{0}\u{1}\u{2}garbage<<<>>>",
        "</stream:stream><stream:stream>",
    ] {
        let mut mallory = online(&node, "mallory", "evil").await;
        mallory.send_raw(raw).await.unwrap();
        // Some of these are a clean close rather than an error; either way
        // the stream must end.
        let _ = mallory.expect_stream_error(WAIT).await;
    }
    let big = message("bob@localhost", &"b".repeat(50_000)).to_string_in(ns::CLIENT);
    attack(&node, &big).await;
    still_serving(&node, &mut alice, &mut bob).await;
}
