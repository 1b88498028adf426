//! Resource binding (RFC 6120 §7) and the IQs the server answers itself
//! (XEP-0030 disco, XEP-0199 ping, XEP-0092 version, RFC 6120 §8.4).

use tests::client::{stanza_error, Client, Mechanism, QUIET, WAIT};
use tests::node::TestNode;
use xmpp::element::Element;
use xmpp::sasl::HashAlg;
use xmpp::stanza::ns;

const PW: &str = "secret";

fn node_with(users: &[&str]) -> TestNode {
    let node = TestNode::start().expect("node starts");
    for u in users {
        node.adduser(u, PW).expect("adduser");
    }
    node
}

async fn logged_in(node: &TestNode, user: &str) -> Client {
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    c.login(user, PW, Mechanism::Scram(HashAlg::Sha256))
        .await
        .unwrap();
    c
}

#[tokio::test]
async fn client_chosen_resource_is_honoured() {
    let node = node_with(&["alice"]);
    let mut c = logged_in(&node, "alice").await;
    assert!(c.features.has_child("bind", ns::BIND), "no bind feature");
    let jid = c.bind(Some("Home")).await.unwrap();
    assert_eq!(jid, "alice@localhost/Home");
}

#[tokio::test]
async fn server_generates_a_unique_resource_when_none_is_asked_for() {
    let node = node_with(&["alice"]);
    let mut c1 = logged_in(&node, "alice").await;
    let mut c2 = logged_in(&node, "alice").await;
    let j1 = c1.bind(None).await.unwrap();
    let j2 = c2.bind(None).await.unwrap();
    for j in [&j1, &j2] {
        let resource = j.strip_prefix("alice@localhost/").expect("full JID");
        assert!(!resource.is_empty(), "empty resource in {j}");
    }
    assert_ne!(j1, j2);
    c1.sync().await.unwrap();
    c2.sync().await.unwrap();
}

#[tokio::test]
async fn binding_an_online_resource_closes_the_old_stream_with_conflict() {
    let node = node_with(&["alice", "bob"]);
    let mut old = Client::login_bound(&node, "alice", PW, "phone")
        .await
        .unwrap();
    old.presence(0).await.unwrap();
    let mut new = Client::login_bound(&node, "alice", PW, "phone")
        .await
        .unwrap();
    assert_eq!(new.full_jid(), "alice@localhost/phone");
    assert_eq!(old.expect_stream_error(WAIT).await.unwrap(), "conflict");

    // The new session is the one that gets stanzas for the full JID.
    new.presence(0).await.unwrap();
    let mut bob = Client::login_bound(&node, "bob", PW, "pc").await.unwrap();
    bob.chat("alice@localhost/phone", "still there?")
        .await
        .unwrap();
    let m = new.recv_message(WAIT).await.unwrap();
    assert_eq!(tests::client::body(&m).as_deref(), Some("still there?"));
}

#[tokio::test]
async fn legacy_session_iq_returns_a_result() {
    // RFC 3921 §3: old clients send this after binding; RFC 6121 keeps it
    // as a no-op, and we advertise it as optional.
    let node = node_with(&["alice"]);
    let mut c = logged_in(&node, "alice").await;
    assert!(c.features.has_child("session", ns::SESSION));
    c.bind(Some("old")).await.unwrap();
    let domain = c.domain.clone();
    let iq = c.make_iq("set", Some(&domain), Element::new("session", ns::SESSION));
    let reply = c.iq(iq).await.unwrap();
    assert_eq!(
        reply.get_attr("type"),
        Some("result"),
        "{}",
        reply.to_string_in(ns::CLIENT)
    );
}

#[tokio::test]
async fn legacy_session_iq_without_to_returns_a_result() {
    let node = node_with(&["alice"]);
    let mut c = logged_in(&node, "alice").await;
    c.bind(Some("old")).await.unwrap();
    let iq = c.make_iq("set", None, Element::new("session", ns::SESSION));
    let reply = c.iq(iq).await.unwrap();
    assert_eq!(
        reply.get_attr("type"),
        Some("result"),
        "{}",
        reply.to_string_in(ns::CLIENT)
    );
}

#[tokio::test]
async fn disco_info_of_the_server_lists_identity_and_features() {
    let node = node_with(&["alice"]);
    let mut c = Client::login_bound(&node, "alice", PW, "r").await.unwrap();
    let iq = c.make_iq(
        "get",
        Some("localhost"),
        Element::new("query", ns::DISCO_INFO),
    );
    let reply = c.iq(iq).await.unwrap();
    assert_eq!(reply.get_attr("type"), Some("result"));
    assert_eq!(reply.get_attr("from"), Some("localhost"));
    let q = reply.get_child("query", ns::DISCO_INFO).expect("query");
    assert!(
        q.elements().any(|i| i.name == "identity"
            && i.get_attr("category") == Some("server")
            && i.get_attr("type") == Some("im")),
        "no server/im identity: {}",
        q.to_string_in(ns::CLIENT)
    );
    let features: Vec<&str> = q
        .elements()
        .filter(|f| f.name == "feature")
        .filter_map(|f| f.get_attr("var"))
        .collect();
    for f in [ns::DISCO_INFO, ns::DISCO_ITEMS, ns::PING, ns::VERSION] {
        assert!(features.contains(&f), "{f} missing from {features:?}");
    }
}

#[tokio::test]
async fn disco_items_of_the_server_is_answered() {
    let node = node_with(&["alice"]);
    let mut c = Client::login_bound(&node, "alice", PW, "r").await.unwrap();
    let iq = c.make_iq(
        "get",
        Some("localhost"),
        Element::new("query", ns::DISCO_ITEMS),
    );
    let reply = c.iq(iq).await.unwrap();
    assert_eq!(reply.get_attr("type"), Some("result"));
    assert!(reply.has_child("query", ns::DISCO_ITEMS));
}

#[tokio::test]
async fn ping_to_the_server_gets_a_result() {
    let node = node_with(&["alice"]);
    let mut c = Client::login_bound(&node, "alice", PW, "r").await.unwrap();
    let iq = c.make_iq("get", Some("localhost"), Element::new("ping", ns::PING));
    let id = iq.get_attr("id").unwrap().to_owned();
    let reply = c.iq(iq).await.unwrap();
    assert_eq!(reply.get_attr("type"), Some("result"));
    assert_eq!(reply.get_attr("id"), Some(id.as_str()));
    assert_eq!(reply.get_attr("to"), Some("alice@localhost/r"));
}

#[tokio::test]
async fn version_query_returns_name_and_version() {
    let node = node_with(&["alice"]);
    let mut c = Client::login_bound(&node, "alice", PW, "r").await.unwrap();
    let iq = c.make_iq("get", Some("localhost"), Element::new("query", ns::VERSION));
    let reply = c.iq(iq).await.unwrap();
    assert_eq!(reply.get_attr("type"), Some("result"));
    let q = reply.get_child("query", ns::VERSION).expect("query");
    assert_eq!(
        q.child_text("name", ns::VERSION).as_deref(),
        Some("xmpp-node")
    );
    let v = q.child_text("version", ns::VERSION).unwrap_or_default();
    assert!(!v.is_empty(), "empty version");
}

#[tokio::test]
async fn unknown_namespace_to_the_server_is_service_unavailable() {
    let node = node_with(&["alice"]);
    let mut c = Client::login_bound(&node, "alice", PW, "r").await.unwrap();
    let iq = c.make_iq(
        "get",
        Some("localhost"),
        Element::new("query", "urn:example:nope"),
    );
    let reply = c.iq(iq).await.unwrap();
    assert_eq!(stanza_error(&reply).as_deref(), Some("service-unavailable"));
}

#[tokio::test]
async fn unknown_namespace_to_a_bare_jid_is_service_unavailable() {
    let node = node_with(&["alice", "bob"]);
    let mut c = Client::login_bound(&node, "alice", PW, "r").await.unwrap();
    let mut bob = Client::login_bound(&node, "bob", PW, "r").await.unwrap();
    bob.presence(0).await.unwrap();
    let iq = c.make_iq(
        "get",
        Some("bob@localhost"),
        Element::new("query", "urn:example:nope"),
    );
    let reply = c.iq(iq).await.unwrap();
    assert_eq!(stanza_error(&reply).as_deref(), Some("service-unavailable"));
    // The server answers for the bare JID: bob's resource sees nothing.
    bob.expect_none(|e| e.name == "iq", QUIET).await.unwrap();
}

#[tokio::test]
async fn iq_to_an_offline_full_jid_is_service_unavailable() {
    let node = node_with(&["alice", "bob"]);
    let mut c = Client::login_bound(&node, "alice", PW, "r").await.unwrap();
    let iq = c.make_iq(
        "get",
        Some("bob@localhost/gone"),
        Element::new("ping", ns::PING),
    );
    let reply = c.iq(iq).await.unwrap();
    assert_eq!(stanza_error(&reply).as_deref(), Some("service-unavailable"));
}

#[tokio::test]
async fn iq_to_an_online_full_jid_reaches_it_and_the_answer_comes_back() {
    let node = node_with(&["alice", "bob"]);
    let mut alice = Client::login_bound(&node, "alice", PW, "r").await.unwrap();
    let mut bob = Client::login_bound(&node, "bob", PW, "pc").await.unwrap();
    let iq = alice.make_iq(
        "get",
        Some("bob@localhost/pc"),
        Element::new("ping", ns::PING),
    );
    alice.send(&iq).await.unwrap();
    let got = bob.recv_until(|e| e.name == "iq", WAIT).await.unwrap();
    assert_eq!(got.get_attr("from"), Some("alice@localhost/r"));
    let pong = Element::new("iq", ns::CLIENT)
        .attr("type", "result")
        .attr("id", got.get_attr("id").unwrap())
        .attr("to", got.get_attr("from").unwrap());
    bob.send(&pong).await.unwrap();
    let reply = alice.recv_until(|e| e.name == "iq", WAIT).await.unwrap();
    assert_eq!(reply.get_attr("type"), Some("result"));
    assert_eq!(reply.get_attr("from"), Some("bob@localhost/pc"));
}
