//! SCRAM's `y` flag (RFC 5802 §6) when -PLUS was offered: refused as a
//! downgrade, except after the same stream tried -PLUS with a binding the
//! server lacks (slixmpp's tls-unique) — unless `strict_channel_binding`.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tests::client::{Client, Mechanism, WAIT};
use tests::node::{NodeOptions, TestNode};
use xmpp::element::Element;
use xmpp::sasl::client::ClientChannelBinding;
use xmpp::sasl::HashAlg;
use xmpp::stanza::ns;

const PW: &str = "secret";

fn node(extra: &str) -> TestNode {
    let node = TestNode::start_with(NodeOptions {
        extra_config: extra.into(),
        ..NodeOptions::default()
    })
    .unwrap();
    node.adduser("alice", PW).unwrap();
    node
}

const Y: Mechanism = Mechanism::ScramWith(
    HashAlg::Sha256,
    ClientChannelBinding::SupportedButNotOffered,
);

/// Tries SCRAM-SHA-256-PLUS with tls-unique, which the server refuses
/// before any proof.
async fn try_tls_unique(c: &mut Client) {
    let first = B64.encode("p=tls-unique,,n=alice,r=0123456789abcdef");
    let auth = Element::new("auth", ns::SASL)
        .attr("mechanism", "SCRAM-SHA-256-PLUS")
        .text(first);
    c.send(&auth).await.unwrap();
    let reply = c.recv_until(|e| e.ns == ns::SASL, WAIT).await.unwrap();
    assert!(
        reply.is("failure", ns::SASL),
        "{}",
        reply.to_string_in(ns::CLIENT)
    );
}

#[tokio::test]
async fn y_flag_without_a_plus_attempt_is_a_downgrade() {
    let node = node("");
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let outcome = c.try_login("alice", PW, Y).await.unwrap();
    assert_eq!(outcome, Err("not-authorized".to_string()));
}

#[tokio::test]
async fn y_flag_after_a_failed_tls_unique_attempt_logs_in() {
    let node = node("");
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    try_tls_unique(&mut c).await;
    assert_eq!(c.try_login("alice", PW, Y).await.unwrap(), Ok(()));
}

#[tokio::test]
async fn strict_channel_binding_refuses_y_even_then() {
    let node = node("strict_channel_binding = true\n");
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    try_tls_unique(&mut c).await;
    assert_eq!(
        c.try_login("alice", PW, Y).await.unwrap(),
        Err("not-authorized".to_string())
    );
}
