//! Stream Management (XEP-0198): acknowledgements, resumption after a
//! dropped connection, and no message lost when the client never returns.

use tests::client::{body, Client, QUIET, WAIT};
use tests::node::{NodeOptions, TestNode};
use xmpp::element::Element;
use xmpp::sasl::HashAlg;
use xmpp::stanza::ns;

const PW: &str = "secret";
const SM: &str = "urn:xmpp:sm:3";

fn node(extra: &str) -> TestNode {
    let node = TestNode::start_with(NodeOptions {
        extra_config: extra.into(),
        ..NodeOptions::default()
    })
    .unwrap();
    node.adduser("alice", PW).unwrap();
    node.adduser("bob", PW).unwrap();
    node
}

/// Logs in, binds, enables stream management; returns the stream id.
async fn managed(node: &TestNode, user: &str, resume: bool) -> (Client, Option<String>) {
    let mut c = Client::login_bound(node, user, PW, "phone").await.unwrap();
    assert!(c.features.has_child("sm", SM), "the server offers XEP-0198");
    let mut enable = Element::new("enable", SM);
    if resume {
        enable.set_attr("resume", "true");
    }
    c.send(&enable).await.unwrap();
    let enabled = c.recv_until(|e| e.is("enabled", SM), WAIT).await.unwrap();
    let id = enabled.get_attr("id").map(str::to_owned);
    if resume {
        assert_eq!(enabled.get_attr("resume"), Some("true"));
        assert!(id.is_some());
    }
    c.presence(0).await.unwrap();
    (c, id)
}

fn chat(to: &str, text: &str) -> Element {
    Element::new("message", ns::CLIENT)
        .attr("to", to)
        .attr("type", "chat")
        .child(Element::new("body", ns::CLIENT).text(text))
}

/// Bodies of the messages among `elements`.
fn bodies(elements: &[Element]) -> Vec<String> {
    elements
        .iter()
        .filter(|e| e.name == "message")
        .filter_map(body)
        .collect()
}

#[tokio::test]
async fn acks_count_handled_stanzas() {
    let node = node("");
    let (mut bob, _) = managed(&node, "bob", false).await;
    // Whatever was handled so far, the count grows by what we send next.
    bob.send(&Element::new("r", SM)).await.unwrap();
    let a = bob.recv_until(|e| e.is("a", SM), WAIT).await.unwrap();
    let before: u32 = a.get_attr("h").unwrap().parse().unwrap();
    bob.send(&chat("bob@localhost/phone", "one")).await.unwrap();
    bob.send(&chat("bob@localhost/phone", "two")).await.unwrap();
    bob.send(&Element::new("r", SM)).await.unwrap();
    let a = bob.recv_until(|e| e.is("a", SM), WAIT).await.unwrap();
    assert_eq!(a.get_attr("h").unwrap().parse::<u32>().unwrap(), before + 2);
    // The server asks us to acknowledge what it sent.
    let r = bob.recv_until(|e| e.is("r", SM), WAIT).await;
    assert!(r.is_ok(), "the server requests acknowledgements");
}

#[tokio::test]
async fn a_dropped_session_resumes_and_gets_what_it_missed() {
    let node = node("");
    let (mut bob, id) = managed(&node, "bob", true).await;
    let id = id.unwrap();
    let mut alice = Client::login_bound(&node, "alice", PW, "a").await.unwrap();

    alice
        .send(&chat("bob@localhost", "before 1"))
        .await
        .unwrap();
    alice
        .send(&chat("bob@localhost", "before 2"))
        .await
        .unwrap();
    let first = bob.recv_message(WAIT).await.unwrap();
    assert_eq!(body(&first).as_deref(), Some("before 1"));
    // Bob acknowledges nothing and his connection dies without a close.
    drop(bob);
    tokio::time::sleep(QUIET).await;
    // While bob is away, the session still takes messages.
    alice
        .send(&chat("bob@localhost", "while away"))
        .await
        .unwrap();
    alice.sync().await.unwrap();

    let mut bob = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    bob.login("bob", PW, tests::client::Mechanism::Scram(HashAlg::Sha256))
        .await
        .unwrap();
    // Bob handled nothing of what he saw (h=0): everything comes again.
    bob.send(
        &Element::new("resume", SM)
            .attr("previd", id.as_str())
            .attr("h", "0"),
    )
    .await
    .unwrap();
    let resumed = bob.recv_until(|e| e.is("resumed", SM), WAIT).await.unwrap();
    assert_eq!(resumed.get_attr("previd"), Some(id.as_str()));
    let mut got = Vec::new();
    while got.len() < 3 {
        got.push(bob.recv_message(WAIT).await.unwrap());
    }
    let texts = bodies(&got);
    assert!(texts.contains(&"before 1".to_string()), "{texts:?}");
    assert!(texts.contains(&"before 2".to_string()), "{texts:?}");
    assert_eq!(
        texts.last().map(String::as_str),
        Some("while away"),
        "{texts:?}"
    );
    // The resumed session is the same one: messages keep flowing.
    alice
        .send(&chat("bob@localhost/phone", "after"))
        .await
        .unwrap();
    assert_eq!(
        body(&bob.recv_message(WAIT).await.unwrap()).as_deref(),
        Some("after")
    );
}

#[tokio::test]
async fn resuming_someone_elses_session_fails() {
    let node = node("");
    let (bob, id) = managed(&node, "bob", true).await;
    drop(bob);
    let mut alice = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    alice
        .login(
            "alice",
            PW,
            tests::client::Mechanism::Scram(HashAlg::Sha256),
        )
        .await
        .unwrap();
    alice
        .send(
            &Element::new("resume", SM)
                .attr("previd", id.unwrap().as_str())
                .attr("h", "0"),
        )
        .await
        .unwrap();
    let failed = alice
        .recv_until(|e| e.name == "failed" || e.name == "resumed", WAIT)
        .await
        .unwrap();
    assert!(
        failed.is("failed", SM),
        "{}",
        failed.to_string_in(ns::CLIENT)
    );
    // Alice can still bind normally.
    alice.bind(Some("x")).await.unwrap();
}

#[tokio::test]
async fn unacknowledged_messages_go_offline_when_the_client_never_returns() {
    let node = node("[limits]\nresume_timeout_secs = 1\n");
    let (mut bob, _) = managed(&node, "bob", true).await;
    let mut alice = Client::login_bound(&node, "alice", PW, "a").await.unwrap();
    alice
        .send(&chat("bob@localhost", "seen but not acked"))
        .await
        .unwrap();
    bob.recv_message(WAIT).await.unwrap();
    drop(bob);
    tokio::time::sleep(QUIET).await;
    alice
        .send(&chat("bob@localhost", "sent while away"))
        .await
        .unwrap();
    alice.sync().await.unwrap();
    // The resumption time runs out; both messages wait offline.
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    let mut bob = Client::login_bound(&node, "bob", PW, "desk").await.unwrap();
    bob.presence(0).await.unwrap();
    let mut got = Vec::new();
    while got.len() < 2 {
        got.push(bob.recv_message(WAIT).await.unwrap());
    }
    let texts = bodies(&got);
    assert!(
        texts.contains(&"seen but not acked".to_string()),
        "{texts:?}"
    );
    assert!(texts.contains(&"sent while away".to_string()), "{texts:?}");
}

#[tokio::test]
async fn a_client_that_never_acknowledges_is_closed_and_loses_nothing() {
    never_acknowledges("[limits]\nsession_queue = 16\n", "").await;
}

/// The same budget in bytes: 40 messages of 2 kB, far fewer than
/// `session_queue`, but more than `max_unacked_bytes`.
#[tokio::test]
async fn unacknowledged_bytes_are_bounded_too() {
    never_acknowledges(
        "[limits]\nmax_stanza_bytes = 10000\nmax_unacked_bytes = 20000\n",
        &"x".repeat(2000),
    )
    .await;
}

async fn never_acknowledges(config: &str, filler: &str) {
    let node = node(config);
    let (mut bob, _) = managed(&node, "bob", false).await;
    let mut alice = Client::login_bound(&node, "alice", PW, "a").await.unwrap();
    // Bob reads everything but never answers the server's <r/>.
    for i in 0..40 {
        alice
            .send(&chat("bob@localhost", &format!("m{i} {filler}")))
            .await
            .unwrap();
    }
    alice.sync().await.unwrap();
    let mut seen = Vec::new();
    let mut closed_with = None;
    while let Ok(e) = bob.recv(WAIT).await {
        if e.is("error", ns::STREAM) {
            closed_with = e
                .elements()
                .find(|c| c.ns == ns::STREAMS)
                .map(|c| c.name.clone());
            break;
        }
        if e.name == "message" {
            seen.extend(body(&e).and_then(|b| b.split(' ').next().map(str::to_owned)));
        }
    }
    assert_eq!(closed_with.as_deref(), Some("policy-violation"));
    // Everything bob never acknowledged waits offline, so all 40 arrive
    // (some twice: seen, but not acknowledged).
    let mut bob = Client::login_bound(&node, "bob", PW, "again")
        .await
        .unwrap();
    bob.presence(0).await.unwrap();
    let mut all: std::collections::HashSet<String> = std::collections::HashSet::new();
    while let Ok(m) = bob.recv_message(QUIET).await {
        all.extend(body(&m).and_then(|b| b.split(' ').next().map(str::to_owned)));
    }
    all.extend(seen);
    assert_eq!(all.len(), 40, "every message reached bob at least once");
}

/// SIGTERM while stream-management sessions hold messages their clients
/// never acknowledged (one connected, one dropped and waiting to resume):
/// the node hands them to offline storage before it exits, and after a
/// restart each user gets all of them.
#[tokio::test]
async fn sigterm_keeps_what_sessions_held() {
    // Enough that handing them over takes a while (one write each).
    const N: usize = 200;
    let mut node = node("");
    node.adduser("carol", PW).unwrap();
    let (mut bob, _) = managed(&node, "bob", true).await;
    let (carol, _) = managed(&node, "carol", true).await;
    let mut alice = Client::login_bound(&node, "alice", PW, "a").await.unwrap();
    for i in 0..N {
        alice
            .send(&chat("bob@localhost", &format!("b{i}")))
            .await
            .unwrap();
    }
    // Bob sees them all, and acknowledges none.
    for _ in 0..N {
        bob.recv_message(WAIT).await.unwrap();
    }
    // Carol's link dies without a close; her session waits to resume.
    drop(carol);
    for i in 0..N {
        alice
            .send(&chat("carol@localhost", &format!("c{i}")))
            .await
            .unwrap();
    }
    alice.sync().await.unwrap();

    node.stop().expect("the node stops on SIGTERM");
    assert!(
        node.log()
            .contains("every session handed over its messages"),
        "{}",
        node.log()
    );
    node.start_again().unwrap();
    for (user, prefix) in [("bob", "b"), ("carol", "c")] {
        let mut c = Client::login_bound(&node, user, PW, "again").await.unwrap();
        c.presence(0).await.unwrap();
        let mut got = std::collections::BTreeSet::new();
        while got.len() < N {
            let m = c
                .recv_message(WAIT)
                .await
                .unwrap_or_else(|e| panic!("{user} got only {got:?}: {e}"));
            got.extend(body(&m));
        }
        let want: std::collections::BTreeSet<String> =
            (0..N).map(|i| format!("{prefix}{i}")).collect();
        assert_eq!(got, want);
    }
}
