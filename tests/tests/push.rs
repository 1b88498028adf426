//! Push notifications (XEP-0357) end to end against the real binary: an
//! app server (here a client of ours, as a push relay would be) is
//! notified when a message reaches a user whose session is hibernated
//! (XEP-0198) or gone, not while the user is online; the summary carries
//! no body by default; an app server answering with an error loses its
//! registration.

use std::time::Duration;

use tests::client::{body, message, show, Client, WAIT};
use tests::node::TestNode;
use xmpp::element::Element;
use xmpp::forms::{self, Field};
use xmpp::stanza::ns;

const PW: &str = "secret";
const PUSH: &str = "urn:xmpp:push:0";
const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
const SM: &str = "urn:xmpp:sm:3";
const APP: &str = "relay@localhost/app";

fn is_push(e: &Element) -> bool {
    e.name == "iq" && e.get_attr("type") == Some("set") && e.get_child("pubsub", PUBSUB).is_some()
}

/// The summary form's fields of a notification.
fn summary(iq: &Element) -> forms::Submitted {
    iq.get_child("pubsub", PUBSUB)
        .and_then(|p| p.get_child("publish", PUBSUB))
        .and_then(|p| p.get_child("item", PUBSUB))
        .and_then(|i| i.get_child("notification", PUSH))
        .and_then(|n| n.get_child("x", forms::NS))
        .and_then(forms::Submitted::read)
        .unwrap_or_else(|| panic!("no summary in {}", show(iq)))
}

async fn answer(app: &mut Client, iq: &Element, error: bool) {
    let mut r = Element::new("iq", ns::CLIENT)
        .attr("id", iq.get_attr("id").unwrap())
        .attr("to", iq.get_attr("from").unwrap())
        .attr("type", if error { "error" } else { "result" });
    if error {
        r = r.child(
            Element::new("error", ns::CLIENT)
                .attr("type", "cancel")
                .child(Element::new(
                    "item-not-found",
                    "urn:ietf:params:xml:ns:xmpp-stanzas",
                )),
        );
    }
    app.send(&r).await.unwrap();
}

#[tokio::test]
async fn a_sleeping_or_absent_user_is_woken_through_the_app_server() {
    let node = TestNode::with_users(&["alice", "bob", "relay"], PW).unwrap();
    let mut app = Client::login_bound(&node, "relay", PW, "app")
        .await
        .unwrap();
    let mut bob = Client::login_bound(&node, "bob", PW, "b").await.unwrap();

    // Alice's phone: stream management with resumption, push enabled.
    let mut alice = Client::login_bound(&node, "alice", PW, "phone")
        .await
        .unwrap();
    alice
        .send(&Element::new("enable", SM).attr("resume", "true"))
        .await
        .unwrap();
    alice
        .recv_until(|e| e.is("enabled", SM), WAIT)
        .await
        .unwrap();
    alice.presence(0).await.unwrap();
    let form = forms::build(
        "submit",
        Some("http://jabber.org/protocol/pubsub#publish-options"),
        vec![Field::new("secret", "text-single").value("s3cr3t")],
    );
    let enable = Element::new("enable", PUSH)
        .attr("jid", APP)
        .attr("node", "device-1")
        .child(form);
    let iq = alice.make_iq("set", None, enable);
    let r = alice.iq(iq).await.unwrap();
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));

    // The connection drops; the session waits for resumption: pushed
    // (whether the message comes before the node notices the drop, and
    // stays unacknowledged, or after).
    drop(alice);
    bob.send(&message("alice@localhost", "secret plans"))
        .await
        .unwrap();
    let n = app.recv_until(is_push, WAIT).await.unwrap();
    assert_eq!(n.get_attr("from"), Some("alice@localhost"));
    let node_attr = n
        .get_child("pubsub", PUBSUB)
        .and_then(|p| p.get_child("publish", PUBSUB))
        .and_then(|p| p.get_attr("node"));
    assert_eq!(node_attr, Some("device-1"));
    let s = summary(&n);
    assert_eq!(s.value("message-count"), Some("1"));
    assert_eq!(s.value("last-message-sender"), Some("bob@localhost/b"));
    assert_eq!(
        s.value("last-message-body"),
        None,
        "no body unless configured"
    );
    assert!(
        show(&n).contains("s3cr3t"),
        "publish-options go along: {}",
        show(&n)
    );
    answer(&mut app, &n, false).await;

    // The app server refuses the next one: the registration goes.
    bob.send(&message("alice@localhost", "again"))
        .await
        .unwrap();
    let n = app.recv_until(is_push, WAIT).await.unwrap();
    answer(&mut app, &n, true).await;
    // The relay's session handles its stanzas in order: once its ping is
    // answered, the error has been handled and the registration removed.
    app.sync().await.unwrap();
    bob.send(&message("alice@localhost", "and again"))
        .await
        .unwrap();
    app.expect_none(is_push, Duration::from_millis(800))
        .await
        .unwrap();
}

/// Until no session of alice is bound (a clean close has been handled).
async fn wait_offline(node: &TestNode) {
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let out = node.clusterctl(&["sessions"]).unwrap_or_default();
        if !out.contains("alice@localhost") {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "alice still bound: {out}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_offline_user_is_woken_too() {
    let node = TestNode::with_users(&["alice", "bob", "relay"], PW).unwrap();
    let mut app = Client::login_bound(&node, "relay", PW, "app")
        .await
        .unwrap();
    let mut alice = Client::login_bound(&node, "alice", PW, "phone")
        .await
        .unwrap();
    alice.presence(0).await.unwrap();
    let enable = Element::new("enable", PUSH)
        .attr("jid", APP)
        .attr("node", "n1");
    let iq = alice.make_iq("set", None, enable);
    assert_eq!(alice.iq(iq).await.unwrap().get_attr("type"), Some("result"));
    // Online: no push.
    let mut bob = Client::login_bound(&node, "bob", PW, "b").await.unwrap();
    bob.send(&message("alice@localhost", "while awake"))
        .await
        .unwrap();
    alice
        .recv_until(|e| body(e).as_deref() == Some("while awake"), WAIT)
        .await
        .unwrap();
    app.expect_none(is_push, Duration::from_millis(500))
        .await
        .unwrap();
    // Gone (a clean logout): the next message is stored, and pushed.
    alice.close().await.unwrap();
    bob.sync().await.unwrap();
    wait_offline(&node).await;
    bob.send(&message("alice@localhost", "you were out"))
        .await
        .unwrap();
    let n = app.recv_until(is_push, WAIT).await.unwrap();
    assert_eq!(
        summary(&n).value("last-message-sender"),
        Some("bob@localhost/b")
    );
    answer(&mut app, &n, false).await;
    // Disabled: nothing more.
    let mut alice = Client::login_bound(&node, "alice", PW, "phone")
        .await
        .unwrap();
    let disable = Element::new("disable", PUSH).attr("jid", APP);
    let iq = alice.make_iq("set", None, disable);
    assert_eq!(alice.iq(iq).await.unwrap().get_attr("type"), Some("result"));
    alice.close().await.unwrap();
    wait_offline(&node).await;
    bob.send(&message("alice@localhost", "still out"))
        .await
        .unwrap();
    app.expect_none(is_push, Duration::from_millis(800))
        .await
        .unwrap();
}
