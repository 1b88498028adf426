//! Accounts as an operator and a user see them: `clusterctl` against the
//! node's admin API, and in-band registration (XEP-0077).

use std::time::{Duration, Instant};

use tests::client::{stanza_error, Client, Mechanism, WAIT};
use tests::node::{NodeOptions, TestNode};
use xmpp::element::Element;
use xmpp::sasl::HashAlg;
use xmpp::stanza::ns;

async fn try_login(node: &TestNode, user: &str, pw: &str) -> Result<(), String> {
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    c.try_login(user, pw, Mechanism::Scram(HashAlg::Sha256))
        .await
        .unwrap()
}

/// Polls `clusterctl status` until its `sessions` line says `n`.
fn wait_for_sessions(node: &TestNode, n: usize) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let status = node.clusterctl(&["status"]).unwrap();
        let sessions = status
            .lines()
            .find_map(|l| l.strip_prefix("sessions"))
            .map(str::trim)
            .unwrap_or_default()
            .to_owned();
        if sessions == n.to_string() {
            return status;
        }
        assert!(
            Instant::now() < deadline,
            "expected {n} sessions, status says:\n{status}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test]
async fn adduser_then_users_lists_the_accounts() {
    let node = TestNode::start().unwrap();
    node.adduser("alice", "a-pw").unwrap();
    node.adduser("bob", "b-pw").unwrap();
    let users = node.clusterctl(&["users"]).unwrap();
    let listed: Vec<&str> = users.lines().map(str::trim).collect();
    assert!(listed.contains(&"alice@localhost"), "{users}");
    assert!(listed.contains(&"bob@localhost"), "{users}");
    // Adding an existing account fails.
    assert!(node.adduser("alice", "other").is_err());
    assert_eq!(try_login(&node, "alice", "a-pw").await, Ok(()));
}

#[tokio::test]
async fn passwd_replaces_the_password() {
    let node = TestNode::start().unwrap();
    node.adduser("alice", "old-pw").unwrap();
    assert_eq!(try_login(&node, "alice", "old-pw").await, Ok(()));
    node.clusterctl(&["passwd", "alice@localhost", "--password", "new-pw"])
        .unwrap();
    assert_eq!(
        try_login(&node, "alice", "old-pw").await,
        Err("not-authorized".into())
    );
    assert_eq!(try_login(&node, "alice", "new-pw").await, Ok(()));
}

#[tokio::test]
async fn deluser_closes_live_sessions_and_login_then_fails() {
    let node = TestNode::start().unwrap();
    node.adduser("alice", "pw").unwrap();
    let mut live = Client::login_bound(&node, "alice", "pw", "pc")
        .await
        .unwrap();
    live.presence(0).await.unwrap();
    node.clusterctl(&["deluser", "alice@localhost"]).unwrap();
    let cond = live.expect_stream_error(WAIT).await.unwrap();
    assert_eq!(cond, "not-authorized");
    assert_eq!(
        try_login(&node, "alice", "pw").await,
        Err("not-authorized".into())
    );
    let users = node.clusterctl(&["users"]).unwrap();
    assert!(!users.contains("alice@localhost"), "{users}");
}

#[tokio::test]
async fn status_shows_vhosts_and_live_session_count() {
    let node = TestNode::start_with(NodeOptions {
        vhosts: vec!["localhost".into(), "example.test".into()],
        ..NodeOptions::default()
    })
    .unwrap();
    node.adduser("alice", "pw").unwrap();
    let status = wait_for_sessions(&node, 0);
    assert!(status.contains("localhost"), "{status}");
    assert!(status.contains("example.test"), "{status}");

    let a = Client::login_bound(&node, "alice", "pw", "one")
        .await
        .unwrap();
    let _b = Client::login_bound(&node, "alice", "pw", "two")
        .await
        .unwrap();
    wait_for_sessions(&node, 2);
    a.close().await.unwrap();
    wait_for_sessions(&node, 1);
}

fn register_iq(id: &str, user: &str, pw: &str) -> Element {
    Element::new("iq", ns::CLIENT)
        .attr("type", "set")
        .attr("id", id)
        .child(
            Element::new("query", ns::REGISTER)
                .child(Element::new("username", ns::REGISTER).text(user))
                .child(Element::new("password", ns::REGISTER).text(pw)),
        )
}

#[tokio::test]
async fn in_band_registration_is_refused_by_default() {
    let node = TestNode::start().unwrap();
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    assert!(
        !c.features.has_child("register", ns::REGISTER_FEATURE),
        "registration advertised while disabled"
    );
    let reply = c.iq(register_iq("r1", "eve", "pw")).await.unwrap();
    assert_eq!(stanza_error(&reply).as_deref(), Some("service-unavailable"));
    assert_eq!(
        c.try_login("eve", "pw", Mechanism::Scram(HashAlg::Sha256))
            .await
            .unwrap(),
        Err("not-authorized".into())
    );
}

#[tokio::test]
async fn in_band_registration_works_when_allowed() {
    // Keys before the first table header of extra_config are [auth] keys.
    let node = TestNode::start_with(NodeOptions {
        extra_config: "allow_registration = true\n".into(),
        ..NodeOptions::default()
    })
    .unwrap();
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    assert!(c.features.has_child("register", ns::REGISTER_FEATURE));
    let form = Element::new("iq", ns::CLIENT)
        .attr("type", "get")
        .attr("id", "g1")
        .child(Element::new("query", ns::REGISTER));
    let reply = c.iq(form).await.unwrap();
    assert_eq!(reply.get_attr("type"), Some("result"));
    let reply = c.iq(register_iq("r1", "eve", "eves-pw")).await.unwrap();
    assert_eq!(
        reply.get_attr("type"),
        Some("result"),
        "{}",
        reply.to_string_in(ns::CLIENT)
    );
    // Taken now.
    let reply = c.iq(register_iq("r2", "eve", "other")).await.unwrap();
    assert_eq!(stanza_error(&reply).as_deref(), Some("conflict"));
    // One registration per address per auth.registration_interval_secs:
    // a second name from the same host waits, on any stream.
    let mut c2 = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let reply = c2
        .iq(register_iq("r3", "frank", "franks-pw"))
        .await
        .unwrap();
    assert_eq!(
        stanza_error(&reply).as_deref(),
        Some("resource-constraint"),
        "{}",
        reply.to_string_in(ns::CLIENT)
    );
    assert!(!node.clusterctl(&["users"]).unwrap().contains("frank@"));
    // The same stream logs in with the new account.
    c.login("eve", "eves-pw", Mechanism::Scram(HashAlg::Sha256))
        .await
        .unwrap();
    assert_eq!(c.bind(Some("new")).await.unwrap(), "eve@localhost/new");
    let users = node.clusterctl(&["users"]).unwrap();
    assert!(users.contains("eve@localhost"), "{users}");
}
