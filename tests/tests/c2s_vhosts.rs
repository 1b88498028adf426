//! Several virtual hosts on one node: each user logs in to their own host,
//! and messages cross between hosts.

use tests::client::{body, Client, Mechanism, WAIT};
use tests::node::{NodeOptions, TestNode};
use xmpp::sasl::HashAlg;

fn two_hosts() -> TestNode {
    let node = TestNode::start_with(NodeOptions {
        vhosts: vec!["a.test".into(), "b.test".into()],
        ..NodeOptions::default()
    })
    .unwrap();
    for jid in ["alice@a.test", "bob@b.test"] {
        node.clusterctl(&["adduser", jid, "--password", "pw"])
            .unwrap();
    }
    node
}

async fn online(node: &TestNode, domain: &str, user: &str) -> Client {
    let mut c = Client::connect_starttls(node.c2s, domain).await.unwrap();
    c.login(user, "pw", Mechanism::Scram(HashAlg::Sha256))
        .await
        .unwrap();
    c.bind(Some("r")).await.unwrap();
    c.presence(0).await.unwrap();
    c
}

#[tokio::test]
async fn users_of_each_vhost_log_in_to_their_host() {
    let node = two_hosts();
    let a = online(&node, "a.test", "alice").await;
    assert_eq!(a.full_jid(), "alice@a.test/r");
    let b = online(&node, "b.test", "bob").await;
    assert_eq!(b.full_jid(), "bob@b.test/r");
}

#[tokio::test]
async fn an_account_exists_only_on_its_own_vhost() {
    let node = two_hosts();
    let mut c = Client::connect_starttls(node.c2s, "b.test").await.unwrap();
    let r = c
        .try_login("alice", "pw", Mechanism::Scram(HashAlg::Sha256))
        .await
        .unwrap();
    assert_eq!(r, Err("not-authorized".into()));
}

#[tokio::test]
async fn message_from_one_vhost_to_another_is_delivered() {
    let node = two_hosts();
    let mut alice = online(&node, "a.test", "alice").await;
    let mut bob = online(&node, "b.test", "bob").await;
    alice.chat("bob@b.test", "hi from a").await.unwrap();
    let m = bob.recv_message(WAIT).await.unwrap();
    assert_eq!(body(&m).as_deref(), Some("hi from a"));
    assert_eq!(m.get_attr("from"), Some("alice@a.test/r"));
    bob.chat("alice@a.test", "hi from b").await.unwrap();
    let m = alice.recv_message(WAIT).await.unwrap();
    assert_eq!(body(&m).as_deref(), Some("hi from b"));
}

#[tokio::test]
async fn direct_tls_picks_the_vhost_from_the_stream_header() {
    let node = two_hosts();
    let mut c = Client::connect_direct_tls(node.c2s_tls, "b.test")
        .await
        .unwrap();
    c.login("bob", "pw", Mechanism::ScramPlusEndPoint(HashAlg::Sha256))
        .await
        .unwrap();
    assert_eq!(c.bind(Some("d")).await.unwrap(), "bob@b.test/d");
}

#[tokio::test]
async fn stream_to_a_host_not_served_is_host_unknown() {
    let node = two_hosts();
    let mut c = Client::connect_tcp(node.c2s, "c.test").await.unwrap();
    c.send_stream_header().await.unwrap();
    assert_eq!(c.expect_stream_error(WAIT).await.unwrap(), "host-unknown");
}
