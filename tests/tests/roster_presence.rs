//! Roster (RFC 6121 §2), subscriptions (§3), presence (§4), blocking
//! (XEP-0191), vcard-temp (XEP-0054) and private storage (XEP-0049),
//! end to end against the real `xmpp-node` binary, plus slixmpp clients
//! subscribing to each other (`tests/interop/roster_presence.py`).

use std::io::Read as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use tests::client::{body, message, stanza_error, Client, QUIET, WAIT};
use tests::node::TestNode;
use xmpp::element::Element;
use xmpp::stanza::ns;

const PW: &str = "secret";
const BLOCKING: &str = "urn:xmpp:blocking";
const BLOCKING_ERRORS: &str = "urn:xmpp:blocking:errors";
const VCARD: &str = "vcard-temp";
const PRIVATE: &str = "jabber:iq:private";
const BOOKMARKS: &str = "storage:bookmarks";

fn node_with(users: &[&str]) -> TestNode {
    let node = TestNode::start().expect("node starts");
    for u in users {
        node.adduser(u, PW).expect("adduser");
    }
    node
}

fn jid(user: &str) -> String {
    format!("{user}@localhost")
}

fn show(e: &Element) -> String {
    e.to_string_in(ns::CLIENT)
}

// ---------------------------------------------------------------- clients

/// Logs in, binds `resource` and requests the roster (an "interested
/// resource", RFC 6121 §2.2), without sending presence.
async fn interested(node: &TestNode, user: &str, resource: &str) -> Client {
    let mut c = Client::login_bound(node, user, PW, resource).await.unwrap();
    roster_get(&mut c).await;
    c
}

/// An interested resource that also sent initial presence with `priority`.
async fn online(node: &TestNode, user: &str, resource: &str, priority: i8) -> Client {
    let mut c = interested(node, user, resource).await;
    c.presence(priority).await.unwrap();
    c
}

/// Throws away everything received so far (waiting `window` for stragglers).
async fn drain(c: &mut Client, window: Duration) {
    while c.recv(window).await.is_ok() {}
}

/// Asserts that nothing matching `pred` arrives within `window` (other
/// elements are kept for later).
async fn expect_none(c: &mut Client, what: &str, pred: impl FnMut(&Element) -> bool) {
    match c.recv_until(pred, QUIET).await {
        Ok(e) => panic!("{}: expected no {what}, got {}", c.full_jid(), show(&e)),
        Err(e) => assert!(
            e.to_string().contains("no matching element"),
            "{}: {e:#}",
            c.full_jid()
        ),
    }
}

// ---------------------------------------------------------------- roster

fn roster_item(contact: &str, name: Option<&str>, groups: &[&str]) -> Element {
    let mut item = Element::new("item", ns::ROSTER).attr("jid", contact);
    if let Some(n) = name {
        item = item.attr("name", n);
    }
    for g in groups {
        item = item.child(Element::new("group", ns::ROSTER).text(*g));
    }
    item
}

/// A roster get (optionally with the version the client has); the reply.
async fn roster_get_ver(c: &mut Client, ver: Option<&str>) -> Element {
    let mut q = Element::new("query", ns::ROSTER);
    if let Some(v) = ver {
        q = q.attr("ver", v);
    }
    let iq = c.make_iq("get", None, q);
    let reply = c.iq(iq).await.unwrap();
    assert_eq!(reply.get_attr("type"), Some("result"), "{}", show(&reply));
    reply
}

async fn roster_get(c: &mut Client) -> Element {
    roster_get_ver(c, None).await
}

/// The `<query/>` of a full roster result.
fn query(reply: &Element) -> &Element {
    reply
        .get_child("query", ns::ROSTER)
        .unwrap_or_else(|| panic!("no roster query in {}", show(reply)))
}

fn find_item<'a>(reply: &'a Element, contact: &str) -> Option<&'a Element> {
    query(reply)
        .elements()
        .find(|i| i.is("item", ns::ROSTER) && i.get_attr("jid") == Some(contact))
}

async fn roster_set(c: &mut Client, item: Element) -> Element {
    let iq = c.make_iq("set", None, Element::new("query", ns::ROSTER).child(item));
    c.iq(iq).await.unwrap()
}

fn assert_result(reply: &Element) {
    assert_eq!(reply.get_attr("type"), Some("result"), "{}", show(reply));
}

fn groups(item: &Element) -> Vec<String> {
    item.elements()
        .filter(|g| g.is("group", ns::ROSTER))
        .map(Element::text_content)
        .collect()
}

/// The item of a roster push about `contact`.
fn push_item<'a>(e: &'a Element, contact: &str) -> Option<&'a Element> {
    if e.name != "iq" || e.get_attr("type") != Some("set") {
        return None;
    }
    e.get_child("query", ns::ROSTER)?
        .elements()
        .find(|i| i.is("item", ns::ROSTER) && i.get_attr("jid") == Some(contact))
}

/// Waits for a roster push about `contact`; returns the whole push.
async fn expect_push(c: &mut Client, contact: &str) -> Element {
    let push = c
        .recv_until(|e| push_item(e, contact).is_some(), WAIT)
        .await
        .unwrap_or_else(|e| panic!("{}: no roster push for {contact}: {e:#}", c.full_jid()));
    // RFC 6121 §2.1.6: a push comes from the user's bare JID or none.
    if let Some(from) = push.get_attr("from") {
        assert_eq!(
            Some(from),
            c.full_jid().split('/').next(),
            "push from a stranger: {}",
            show(&push)
        );
    }
    push
}

/// Waits for a push about `contact` with this subscription and ask
/// (earlier pushes about it, e.g. for a state change the item does not
/// show, are skipped).
async fn expect_sub_push(c: &mut Client, contact: &str, sub: &str, ask: Option<&str>) {
    c.recv_until(
        |e| {
            push_item(e, contact).is_some_and(|i| {
                i.get_attr("subscription") == Some(sub) && i.get_attr("ask") == ask
            })
        },
        WAIT,
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{}: no push for {contact} with subscription={sub} ask={ask:?}: {e:#}",
            c.full_jid()
        )
    });
}

/// (subscription, ask) of `contact` in a fresh roster get; None if absent.
async fn sub_state(c: &mut Client, contact: &str) -> Option<(String, Option<String>)> {
    let r = roster_get(c).await;
    find_item(&r, contact).map(|i| {
        (
            i.get_attr("subscription").unwrap_or("none").to_owned(),
            i.get_attr("ask").map(str::to_owned),
        )
    })
}

async fn assert_sub(c: &mut Client, contact: &str, sub: &str, ask: Option<&str>) {
    let got = sub_state(c, contact).await;
    assert_eq!(
        got,
        Some((sub.to_owned(), ask.map(str::to_owned))),
        "{}'s roster item for {contact}",
        c.full_jid()
    );
}

// ---------------------------------------------------------------- presence

fn presence(to: Option<&str>, ptype: Option<&str>) -> Element {
    let mut p = Element::new("presence", ns::CLIENT);
    if let Some(to) = to {
        p = p.attr("to", to);
    }
    if let Some(t) = ptype {
        p = p.attr("type", t);
    }
    p
}

/// Sends a subscription presence and waits until the server processed it.
async fn send_sub(c: &mut Client, to: &str, ptype: &str) {
    c.send(&presence(Some(to), Some(ptype))).await.unwrap();
    c.sync().await.unwrap();
}

fn is_presence(e: &Element, from: &str, ptype: Option<&str>) -> bool {
    e.name == "presence" && e.get_attr("from") == Some(from) && e.get_attr("type") == ptype
}

async fn expect_presence(c: &mut Client, from: &str, ptype: Option<&str>) -> Element {
    c.recv_until(|e| is_presence(e, from, ptype), WAIT)
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{}: no presence type={ptype:?} from {from}: {e:#}",
                c.full_jid()
            )
        })
}

async fn expect_no_presence_from(c: &mut Client, from_prefix: &str) {
    let p = from_prefix.to_owned();
    expect_none(c, &format!("presence from {from_prefix}"), move |e| {
        e.name == "presence" && e.get_attr("from").is_some_and(|f| f.starts_with(&p))
    })
    .await;
}

/// `a` subscribes to `b` and `b` approves: a has 'to', b has 'from'.
async fn subscribe_to(a: &mut Client, b: &mut Client) {
    let (aj, bj) = (a.bare_jid().to_owned(), b.bare_jid().to_owned());
    send_sub(a, &bj, "subscribe").await;
    send_sub(b, &aj, "subscribed").await;
}

/// Mutual subscription ('both' on each side); drains what it caused.
async fn befriend(a: &mut Client, b: &mut Client) {
    subscribe_to(a, b).await;
    subscribe_to(b, a).await;
    let bj = b.bare_jid().to_owned();
    assert_sub(a, &bj, "both", None).await;
    drain(a, Duration::from_millis(200)).await;
    drain(b, Duration::from_millis(200)).await;
}

// ================================================================ 1. roster

#[tokio::test]
async fn roster_set_is_pushed_to_every_interested_resource_and_get_returns_it() {
    let node = node_with(&["alice"]);
    let mut r1 = interested(&node, "alice", "r1").await;
    let mut r2 = interested(&node, "alice", "r2").await;
    let mut r3 = interested(&node, "alice", "r3").await;
    // Never asked for the roster: not interested, no pushes (§2.2).
    let mut uninterested = Client::login_bound(&node, "alice", PW, "r4").await.unwrap();
    let romeo = jid("romeo");

    let reply = roster_set(
        &mut r1,
        roster_item(&romeo, Some("Romeo"), &["Friends", "Lovers"]),
    )
    .await;
    assert_result(&reply);
    for c in [&mut r1, &mut r2, &mut r3] {
        let push = expect_push(c, &romeo).await;
        assert!(
            push.get_child("query", ns::ROSTER)
                .unwrap()
                .get_attr("ver")
                .is_some(),
            "push without ver: {}",
            show(&push)
        );
        let item = push_item(&push, &romeo).unwrap();
        assert_eq!(item.get_attr("name"), Some("Romeo"), "{}", show(&push));
        assert_eq!(item.get_attr("subscription"), Some("none"));
        assert_eq!(groups(item), ["Friends", "Lovers"]);
    }
    expect_none(&mut uninterested, "roster push", |e| {
        push_item(e, "romeo@localhost").is_some()
    })
    .await;

    let got = roster_get(&mut r2).await;
    assert!(query(&got).get_attr("ver").is_some(), "{}", show(&got));
    let item = find_item(&got, &romeo).expect("romeo in the roster");
    assert_eq!(item.get_attr("name"), Some("Romeo"));
    assert_eq!(item.get_attr("subscription"), Some("none"));
    assert_eq!(groups(item), ["Friends", "Lovers"]);

    // Update: name and groups are replaced.
    assert_result(&roster_set(&mut r2, roster_item(&romeo, Some("Romeo M."), &["Friends"])).await);
    for c in [&mut r1, &mut r2, &mut r3] {
        let push = expect_push(c, &romeo).await;
        let item = push_item(&push, &romeo).unwrap();
        assert_eq!(item.get_attr("name"), Some("Romeo M."), "{}", show(&push));
        assert_eq!(groups(item), ["Friends"]);
    }
    let got = roster_get(&mut r3).await;
    let item = find_item(&got, &romeo).expect("romeo still there");
    assert_eq!(item.get_attr("name"), Some("Romeo M."));
    assert_eq!(groups(item), ["Friends"]);

    // Remove (§2.5).
    let remove = Element::new("item", ns::ROSTER)
        .attr("jid", romeo.as_str())
        .attr("subscription", "remove");
    assert_result(&roster_set(&mut r3, remove.clone()).await);
    for c in [&mut r1, &mut r2, &mut r3] {
        let push = expect_push(c, &romeo).await;
        let item = push_item(&push, &romeo).unwrap();
        assert_eq!(
            item.get_attr("subscription"),
            Some("remove"),
            "{}",
            show(&push)
        );
    }
    let got = roster_get(&mut r1).await;
    assert!(find_item(&got, &romeo).is_none(), "{}", show(&got));

    // §2.5.3: removing an item that is not there.
    let reply = roster_set(&mut r1, remove).await;
    assert_eq!(
        stanza_error(&reply).as_deref(),
        Some("item-not-found"),
        "{}",
        show(&reply)
    );
}

#[tokio::test]
async fn invalid_roster_sets_are_refused() {
    let node = node_with(&["alice"]);
    let mut c = interested(&node, "alice", "pc").await;

    // §2.3.3: exactly one item.
    let iq = c.make_iq(
        "set",
        None,
        Element::new("query", ns::ROSTER)
            .child(roster_item("a@localhost", None, &[]))
            .child(roster_item("b@localhost", None, &[])),
    );
    let reply = c.iq(iq).await.unwrap();
    assert_eq!(
        stanza_error(&reply).as_deref(),
        Some("bad-request"),
        "{}",
        show(&reply)
    );

    // A JID that does not parse.
    let reply = roster_set(&mut c, roster_item("@localhost", None, &[])).await;
    let cond = stanza_error(&reply);
    assert!(
        matches!(cond.as_deref(), Some("jid-malformed" | "bad-request")),
        "{}",
        show(&reply)
    );

    // §2.1.2.5: a client may set subscription only to 'remove'.
    let reply = roster_set(
        &mut c,
        roster_item("romeo@localhost", None, &[]).attr("subscription", "both"),
    )
    .await;
    assert_eq!(
        stanza_error(&reply).as_deref(),
        Some("bad-request"),
        "{}",
        show(&reply)
    );

    // None of these left anything behind.
    let got = roster_get(&mut c).await;
    assert_eq!(query(&got).elements().count(), 0, "{}", show(&got));
}

fn ver_of(reply: &Element) -> String {
    query(reply)
        .get_attr("ver")
        .unwrap_or_else(|| panic!("no ver in {}", show(reply)))
        .to_owned()
}

/// Whether a roster result is "empty" in the §2.6.3 sense: no items.
fn has_no_items(reply: &Element) -> bool {
    reply
        .get_child("query", ns::ROSTER)
        .is_none_or(|q| q.elements().next().is_none())
}

#[tokio::test]
async fn roster_versioning_returns_nothing_or_only_the_changes() {
    let node = node_with(&["alice"]);
    let mut c = interested(&node, "alice", "pc").await;
    let first = roster_get(&mut c).await;
    let _ = ver_of(&first);

    for u in ["a", "b", "w"] {
        assert_result(&roster_set(&mut c, roster_item(&jid(u), None, &[])).await);
    }
    drain(&mut c, Duration::from_millis(300)).await;
    let full = roster_get(&mut c).await;
    let known = ver_of(&full);
    assert_eq!(query(&full).elements().count(), 3, "{}", show(&full));

    // §2.6.3: the version the client has is current: an empty result.
    let same = roster_get_ver(&mut c, Some(&known)).await;
    assert!(has_no_items(&same), "{}", show(&same));
    c.expect_nothing(QUIET).await.unwrap();

    // ver='' means "no cache": the whole roster.
    let all = roster_get_ver(&mut c, Some("")).await;
    assert_eq!(query(&all).elements().count(), 3, "{}", show(&all));

    // Changes: a removed, d added, b renamed; w untouched.
    let remove = Element::new("item", ns::ROSTER)
        .attr("jid", jid("a"))
        .attr("subscription", "remove");
    assert_result(&roster_set(&mut c, remove).await);
    assert_result(&roster_set(&mut c, roster_item(&jid("d"), None, &[])).await);
    assert_result(&roster_set(&mut c, roster_item(&jid("b"), Some("Bee"), &[])).await);
    drain(&mut c, Duration::from_millis(300)).await;

    let older = roster_get_ver(&mut c, Some(&known)).await;
    assert!(has_no_items(&older), "{}", show(&older));
    // Then pushes for exactly what changed since `known`.
    let mut pushed = Vec::new();
    while let Ok(e) = c.recv(QUIET).await {
        let q = e
            .get_child("query", ns::ROSTER)
            .filter(|_| e.name == "iq" && e.get_attr("type") == Some("set"))
            .unwrap_or_else(|| panic!("not a roster push: {}", show(&e)));
        assert!(
            q.get_attr("ver").is_some(),
            "push without ver: {}",
            show(&e)
        );
        for i in q.elements() {
            pushed.push((
                i.get_attr("jid").unwrap_or_default().to_owned(),
                i.get_attr("subscription").unwrap_or_default().to_owned(),
                i.get_attr("name").map(str::to_owned),
            ));
        }
    }
    pushed.sort();
    assert_eq!(
        pushed,
        [
            (jid("a"), "remove".to_owned(), None),
            (jid("b"), "none".to_owned(), Some("Bee".to_owned())),
            (jid("d"), "none".to_owned(), None),
        ]
    );
    let now = roster_get(&mut c).await;
    assert_ne!(ver_of(&now), known);
}

// ======================================================= 2-4. subscriptions

#[tokio::test]
async fn subscription_handshake_with_both_online_reaches_both() {
    let node = node_with(&["alice", "bob"]);
    let mut alice = online(&node, "alice", "pc", 0).await;
    let mut bob = online(&node, "bob", "pc", 0).await;
    let (aj, bj) = (jid("alice"), jid("bob"));

    // Alice asks: none + ask on her side; bob gets the request.
    send_sub(&mut alice, &bj, "subscribe").await;
    expect_sub_push(&mut alice, &bj, "none", Some("subscribe")).await;
    let req = expect_presence(&mut bob, &aj, Some("subscribe")).await;
    assert_eq!(req.get_attr("to"), Some(bj.as_str()), "{}", show(&req));
    assert_sub(&mut alice, &bj, "none", Some("subscribe")).await;
    // The contact's roster is not touched by a request alone (§3.1.3).
    assert_eq!(sub_state(&mut bob, &aj).await, None);

    // Bob approves: from on his side, to on hers, and she sees him.
    send_sub(&mut bob, &aj, "subscribed").await;
    expect_sub_push(&mut bob, &aj, "from", None).await;
    expect_sub_push(&mut alice, &bj, "to", None).await;
    expect_presence(&mut alice, &bj, Some("subscribed")).await;
    expect_presence(&mut alice, "bob@localhost/pc", None).await;
    assert_sub(&mut alice, &bj, "to", None).await;
    assert_sub(&mut bob, &aj, "from", None).await;

    // The other way round.
    send_sub(&mut bob, &aj, "subscribe").await;
    expect_sub_push(&mut bob, &aj, "from", Some("subscribe")).await;
    expect_presence(&mut alice, &bj, Some("subscribe")).await;
    send_sub(&mut alice, &bj, "subscribed").await;
    expect_sub_push(&mut alice, &bj, "both", None).await;
    expect_sub_push(&mut bob, &aj, "both", None).await;
    expect_presence(&mut bob, &aj, Some("subscribed")).await;
    expect_presence(&mut bob, "alice@localhost/pc", None).await;
    assert_sub(&mut alice, &bj, "both", None).await;
    assert_sub(&mut bob, &aj, "both", None).await;
}

#[tokio::test]
async fn subscription_request_to_an_offline_contact_waits_for_their_login() {
    let node = node_with(&["alice", "bob"]);
    let mut alice = online(&node, "alice", "pc", 0).await;
    let (aj, bj) = (jid("alice"), jid("bob"));
    send_sub(&mut alice, &bj, "subscribe").await;
    expect_sub_push(&mut alice, &bj, "none", Some("subscribe")).await;

    let mut bob = interested(&node, "bob", "pc").await;
    bob.expect_nothing(QUIET).await.unwrap();
    // Initial presence brings the pending request (§3.1.3).
    bob.send(&presence(None, None)).await.unwrap();
    expect_presence(&mut bob, &aj, Some("subscribe")).await;
    send_sub(&mut bob, &aj, "subscribed").await;
    expect_sub_push(&mut bob, &aj, "from", None).await;
    expect_sub_push(&mut alice, &bj, "to", None).await;
    expect_presence(&mut alice, "bob@localhost/pc", None).await;
    assert_sub(&mut alice, &bj, "to", None).await;
    assert_sub(&mut bob, &aj, "from", None).await;
}

#[tokio::test]
async fn duplicate_subscribe_is_answered_by_the_server_not_the_contact() {
    let node = node_with(&["alice", "bob"]);
    let mut alice = online(&node, "alice", "pc", 0).await;
    let mut bob = online(&node, "bob", "pc", 0).await;
    let (aj, bj) = (jid("alice"), jid("bob"));
    subscribe_to(&mut alice, &mut bob).await;
    assert_sub(&mut alice, &bj, "to", None).await;
    drain(&mut alice, Duration::from_millis(200)).await;
    drain(&mut bob, Duration::from_millis(200)).await;

    send_sub(&mut alice, &bj, "subscribe").await;
    expect_none(&mut bob, "second subscription request", |e| {
        e.name == "presence" && e.get_attr("type") == Some("subscribe")
    })
    .await;
    expect_none(&mut alice, "roster push", |e| {
        push_item(e, "bob@localhost").is_some()
    })
    .await;
    assert_sub(&mut alice, &bj, "to", None).await;
    assert_sub(&mut bob, &aj, "from", None).await;
}

#[tokio::test]
async fn stray_subscribed_changes_nothing() {
    let node = node_with(&["alice", "carol"]);
    let mut alice = online(&node, "alice", "pc", 0).await;
    let mut carol = online(&node, "carol", "pc", 0).await;
    let (aj, cj) = (jid("alice"), jid("carol"));
    // Alice never asked carol for anything.
    send_sub(&mut carol, &aj, "subscribed").await;
    expect_none(&mut alice, "anything from carol", |e| {
        e.get_attr("from").is_some_and(|f| f.starts_with("carol@"))
            || push_item(e, "carol@localhost").is_some()
    })
    .await;
    assert_eq!(sub_state(&mut alice, &cj).await, None);
    // On carol's side it is a pre-approval (§3.4), not a subscription.
    assert_eq!(
        sub_state(&mut carol, &aj).await,
        Some(("none".to_owned(), None))
    );
}

#[tokio::test]
async fn pre_approved_subscription_is_granted_without_asking_the_contact() {
    let node = node_with(&["alice", "bob"]);
    let mut alice = online(&node, "alice", "pc", 0).await;
    let mut bob = online(&node, "bob", "pc", 0).await;
    let (aj, bj) = (jid("alice"), jid("bob"));

    // §3.4: bob approves before alice asks.
    send_sub(&mut bob, &aj, "subscribed").await;
    let push = expect_push(&mut bob, &aj).await;
    let item = push_item(&push, &aj).unwrap();
    assert_eq!(
        item.get_attr("subscription"),
        Some("none"),
        "{}",
        show(&push)
    );
    assert_eq!(item.get_attr("approved"), Some("true"), "{}", show(&push));
    // Nothing reaches alice yet.
    expect_no_presence_from(&mut alice, "bob@").await;

    send_sub(&mut alice, &bj, "subscribe").await;
    expect_sub_push(&mut bob, &aj, "from", None).await;
    let to = alice
        .recv_until(
            |e| {
                push_item(e, "bob@localhost")
                    .is_some_and(|i| i.get_attr("subscription") == Some("to"))
            },
            WAIT,
        )
        .await
        .unwrap();
    assert!(
        push_item(&to, &bj).unwrap().get_attr("ask").is_none(),
        "{}",
        show(&to)
    );
    expect_presence(&mut alice, "bob@localhost/pc", None).await;
    expect_none(&mut bob, "subscription request", |e| {
        e.name == "presence" && e.get_attr("type") == Some("subscribe")
    })
    .await;
    assert_sub(&mut alice, &bj, "to", None).await;
    assert_sub(&mut bob, &aj, "from", None).await;
}

#[tokio::test]
async fn unsubscribe_and_roster_remove_cancel_subscriptions() {
    let node = node_with(&["alice", "bob"]);
    let mut alice = interested(&node, "alice", "pc").await;
    let mut bob = interested(&node, "bob", "pc").await;
    befriend(&mut alice, &mut bob).await;
    alice.presence(0).await.unwrap();
    bob.presence(0).await.unwrap();
    expect_presence(&mut alice, "bob@localhost/pc", None).await;
    expect_presence(&mut bob, "alice@localhost/pc", None).await;
    let (aj, bj) = (jid("alice"), jid("bob"));

    // §3.3: alice no longer wants bob's presence.
    send_sub(&mut alice, &bj, "unsubscribe").await;
    expect_sub_push(&mut alice, &bj, "from", None).await;
    expect_sub_push(&mut bob, &aj, "to", None).await;
    expect_presence(&mut bob, &aj, Some("unsubscribe")).await;
    expect_presence(&mut alice, "bob@localhost/pc", Some("unavailable")).await;
    assert_sub(&mut alice, &bj, "from", None).await;
    assert_sub(&mut bob, &aj, "to", None).await;

    // §2.5.2: removing bob also cancels his subscription to alice.
    let remove = Element::new("item", ns::ROSTER)
        .attr("jid", bj.as_str())
        .attr("subscription", "remove");
    assert_result(&roster_set(&mut alice, remove).await);
    expect_sub_push(&mut alice, &bj, "remove", None).await;
    expect_sub_push(&mut bob, &aj, "none", None).await;
    expect_presence(&mut bob, &aj, Some("unsubscribed")).await;
    expect_presence(&mut bob, "alice@localhost/pc", Some("unavailable")).await;
    assert_eq!(sub_state(&mut alice, &bj).await, None);
    assert_sub(&mut bob, &aj, "none", None).await;
    // And alice's presence no longer reaches bob.
    alice
        .send(
            &Element::new("presence", ns::CLIENT)
                .child(Element::new("status", ns::CLIENT).text("gone")),
        )
        .await
        .unwrap();
    expect_no_presence_from(&mut bob, "alice@").await;
}

// ============================================================ 5. presence

#[tokio::test]
async fn presence_is_broadcast_to_subscribers_only_and_unavailable_on_disconnect() {
    let node = node_with(&["alice", "bob", "carol"]);
    let mut alice = interested(&node, "alice", "pc").await;
    let mut bob = interested(&node, "bob", "pc").await;
    befriend(&mut alice, &mut bob).await;
    // Carol has alice in her roster, but no subscription at all.
    let mut carol = interested(&node, "carol", "pc").await;
    assert_result(&roster_set(&mut carol, roster_item(&jid("alice"), None, &[])).await);
    carol.presence(0).await.unwrap();
    bob.presence(0).await.unwrap();
    drain(&mut carol, Duration::from_millis(200)).await;
    drain(&mut bob, Duration::from_millis(200)).await;

    // Initial presence: bob sees alice, alice gets bob's (probe answered).
    alice.presence(0).await.unwrap();
    expect_presence(&mut bob, "alice@localhost/pc", None).await;
    expect_presence(&mut alice, "bob@localhost/pc", None).await;

    // An update with show and status.
    let update = Element::new("presence", ns::CLIENT)
        .child(Element::new("show", ns::CLIENT).text("away"))
        .child(Element::new("status", ns::CLIENT).text("lunch"))
        .child(Element::new("priority", ns::CLIENT).text("5"));
    alice.send(&update).await.unwrap();
    let p = expect_presence(&mut bob, "alice@localhost/pc", None).await;
    assert_eq!(
        p.child_text("show", ns::CLIENT).as_deref(),
        Some("away"),
        "{}",
        show(&p)
    );
    assert_eq!(p.child_text("status", ns::CLIENT).as_deref(), Some("lunch"));
    expect_no_presence_from(&mut carol, "alice@").await;

    // Bob's new session gets alice's current presence, and his resources
    // see each other.
    let mut phone = interested(&node, "bob", "phone").await;
    phone.send(&presence(None, None)).await.unwrap();
    let p = expect_presence(&mut phone, "alice@localhost/pc", None).await;
    assert_eq!(
        p.child_text("show", ns::CLIENT).as_deref(),
        Some("away"),
        "{}",
        show(&p)
    );
    assert_eq!(p.child_text("status", ns::CLIENT).as_deref(), Some("lunch"));
    expect_presence(&mut phone, "bob@localhost/pc", None).await;
    expect_presence(&mut bob, "bob@localhost/phone", None).await;

    // An explicit probe (§4.3) from a subscriber is answered.
    bob.send(&presence(Some(&jid("alice")), Some("probe")))
        .await
        .unwrap();
    let p = expect_presence(&mut bob, "alice@localhost/pc", None).await;
    assert_eq!(p.child_text("status", ns::CLIENT).as_deref(), Some("lunch"));

    // Alice's TCP connection dies without a closing stream tag.
    drop(alice);
    expect_presence(&mut bob, "alice@localhost/pc", Some("unavailable")).await;
    expect_presence(&mut phone, "alice@localhost/pc", Some("unavailable")).await;
    expect_no_presence_from(&mut carol, "alice@").await;
}

// ====================================================== 6. directed presence

#[tokio::test]
async fn directed_presence_reaches_a_non_contact_and_is_ended_with_the_session() {
    let node = node_with(&["alice", "carol"]);
    let mut carol = online(&node, "carol", "pc", 0).await;
    let mut alice = online(&node, "alice", "pc", 0).await;
    // No subscription: alice's broadcast does not reach carol.
    expect_no_presence_from(&mut carol, "alice@").await;

    alice
        .send(&presence(Some(&jid("carol")), None))
        .await
        .unwrap();
    expect_presence(&mut carol, "alice@localhost/pc", None).await;

    alice.close().await.unwrap();
    expect_presence(&mut carol, "alice@localhost/pc", Some("unavailable")).await;
}

#[tokio::test]
async fn directed_presence_is_ended_by_broadcast_unavailable() {
    let node = node_with(&["alice", "carol"]);
    let mut carol = online(&node, "carol", "pc", 0).await;
    let mut alice = online(&node, "alice", "pc", 0).await;
    alice
        .send(&presence(Some("carol@localhost/pc"), None))
        .await
        .unwrap();
    expect_presence(&mut carol, "alice@localhost/pc", None).await;
    alice
        .send(&presence(None, Some("unavailable")))
        .await
        .unwrap();
    expect_presence(&mut carol, "alice@localhost/pc", Some("unavailable")).await;
}

// ============================================================== 7. priority

#[tokio::test]
async fn priority_change_redirects_bare_jid_messages_at_once() {
    let node = node_with(&["alice", "bob"]);
    let mut a = online(&node, "alice", "A", 5).await;
    let mut b = online(&node, "alice", "B", 1).await;
    let mut bob = online(&node, "bob", "pc", 0).await;
    drain(&mut a, Duration::from_millis(100)).await;
    drain(&mut b, Duration::from_millis(100)).await;

    bob.chat(&jid("alice"), "first").await.unwrap();
    let m = a.recv_message(WAIT).await.unwrap();
    assert_eq!(body(&m).as_deref(), Some("first"));
    expect_none(&mut b, "message", |e| e.name == "message").await;

    b.presence(10).await.unwrap();
    bob.chat(&jid("alice"), "second").await.unwrap();
    let m = b.recv_message(WAIT).await.unwrap();
    assert_eq!(body(&m).as_deref(), Some("second"));
    expect_none(&mut a, "message", |e| e.name == "message").await;
}

// ============================================================== 8. blocking

fn block_iq(c: &mut Client, op: &str, jids: &[&str]) -> Element {
    let mut e = Element::new(op, BLOCKING);
    for j in jids {
        e = e.child(Element::new("item", BLOCKING).attr("jid", *j));
    }
    c.make_iq("set", None, e)
}

async fn blocklist(c: &mut Client) -> Vec<String> {
    let iq = c.make_iq("get", None, Element::new("blocklist", BLOCKING));
    let reply = c.iq(iq).await.unwrap();
    assert_result(&reply);
    reply
        .get_child("blocklist", BLOCKING)
        .unwrap_or_else(|| panic!("no blocklist: {}", show(&reply)))
        .elements()
        .filter_map(|i| i.get_attr("jid").map(str::to_owned))
        .collect()
}

async fn expect_block_push(c: &mut Client, op: &str, who: &str) {
    let push = c
        .recv_until(
            |e| {
                e.name == "iq"
                    && e.get_attr("type") == Some("set")
                    && e.get_child(op, BLOCKING)
                        .is_some_and(|b| b.elements().any(|i| i.get_attr("jid") == Some(who)))
            },
            WAIT,
        )
        .await;
    push.unwrap_or_else(|e| panic!("{}: no {op} push for {who}: {e:#}", c.full_jid()));
}

#[tokio::test]
async fn block_and_unblock_are_pushed_and_listed() {
    let node = node_with(&["alice", "mallory"]);
    let mut a1 = online(&node, "alice", "pc", 0).await;
    let mut a2 = online(&node, "alice", "phone", 0).await;
    let mj = jid("mallory");
    assert!(blocklist(&mut a1).await.is_empty());

    let iq = block_iq(&mut a1, "block", &[&mj]);
    assert_result(&a1.iq(iq).await.unwrap());
    expect_block_push(&mut a1, "block", &mj).await;
    expect_block_push(&mut a2, "block", &mj).await;
    assert_eq!(blocklist(&mut a2).await, vec![jid("mallory")]);

    let iq = block_iq(&mut a2, "unblock", &[&mj]);
    assert_result(&a2.iq(iq).await.unwrap());
    expect_block_push(&mut a1, "unblock", &mj).await;
    expect_block_push(&mut a2, "unblock", &mj).await;
    assert!(blocklist(&mut a1).await.is_empty());
}

#[tokio::test]
async fn blocked_contact_messages_bounce_both_ways_until_unblocked() {
    let node = node_with(&["alice", "mallory"]);
    let mut alice = online(&node, "alice", "pc", 0).await;
    let mut mallory = online(&node, "mallory", "pc", 0).await;
    let (aj, mj) = (jid("alice"), jid("mallory"));
    let iq = block_iq(&mut alice, "block", &[&mj]);
    assert_result(&alice.iq(iq).await.unwrap());
    drain(&mut alice, Duration::from_millis(200)).await;

    // XEP-0191 §3.4: mallory -> alice bounces with service-unavailable.
    mallory.chat(&aj, "let me in").await.unwrap();
    let bounce = mallory.recv_message(WAIT).await.unwrap();
    assert_eq!(
        stanza_error(&bounce).as_deref(),
        Some("service-unavailable"),
        "{}",
        show(&bounce)
    );
    // Nor to a full JID.
    mallory.chat("alice@localhost/pc", "psst").await.unwrap();
    let bounce = mallory.recv_message(WAIT).await.unwrap();
    assert_eq!(
        stanza_error(&bounce).as_deref(),
        Some("service-unavailable")
    );
    expect_none(&mut alice, "message", |e| e.name == "message").await;

    // §3.5: alice -> mallory: not-acceptable with <blocked/>.
    alice.chat(&mj, "go away").await.unwrap();
    let refused = alice.recv_message(WAIT).await.unwrap();
    assert_eq!(
        stanza_error(&refused).as_deref(),
        Some("not-acceptable"),
        "{}",
        show(&refused)
    );
    let err = refused.get_child("error", ns::CLIENT).unwrap();
    assert!(
        err.has_child("blocked", BLOCKING_ERRORS),
        "{}",
        show(&refused)
    );
    expect_none(&mut mallory, "message", |e| {
        e.name == "message" && e.get_attr("type") != Some("error")
    })
    .await;

    // Unblocked: delivery again, both ways.
    let iq = block_iq(&mut alice, "unblock", &[&mj]);
    assert_result(&alice.iq(iq).await.unwrap());
    mallory.chat(&aj, "friends?").await.unwrap();
    let m = alice.recv_message(WAIT).await.unwrap();
    assert_eq!(body(&m).as_deref(), Some("friends?"), "{}", show(&m));
    alice.send(&message(&mj, "ok")).await.unwrap();
    let m = mallory.recv_message(WAIT).await.unwrap();
    assert_eq!(body(&m).as_deref(), Some("ok"), "{}", show(&m));
}

#[tokio::test]
async fn blocking_a_subscriber_sends_them_unavailable() {
    let node = node_with(&["alice", "mallory"]);
    let mut alice = interested(&node, "alice", "pc").await;
    let mut mallory = interested(&node, "mallory", "pc").await;
    subscribe_to(&mut mallory, &mut alice).await;
    mallory.presence(0).await.unwrap();
    alice.presence(0).await.unwrap();
    expect_presence(&mut mallory, "alice@localhost/pc", None).await;

    let iq = block_iq(&mut alice, "block", &[&jid("mallory")]);
    assert_result(&alice.iq(iq).await.unwrap());
    // XEP-0191 §3.3: the blocked contact sees the user go offline.
    expect_presence(&mut mallory, "alice@localhost/pc", Some("unavailable")).await;
}

#[tokio::test]
async fn blocked_subscriber_gets_no_later_presence_and_sends_none() {
    let node = node_with(&["alice", "mallory"]);
    let mut alice = interested(&node, "alice", "pc").await;
    let mut mallory = interested(&node, "mallory", "pc").await;
    befriend(&mut alice, &mut mallory).await;
    mallory.presence(0).await.unwrap();
    alice.presence(0).await.unwrap();
    expect_presence(&mut mallory, "alice@localhost/pc", None).await;

    let iq = block_iq(&mut alice, "block", &[&jid("mallory")]);
    assert_result(&alice.iq(iq).await.unwrap());
    drain(&mut alice, Duration::from_millis(200)).await;
    drain(&mut mallory, Duration::from_millis(300)).await;

    alice
        .send(
            &Element::new("presence", ns::CLIENT)
                .child(Element::new("status", ns::CLIENT).text("busy")),
        )
        .await
        .unwrap();
    expect_no_presence_from(&mut mallory, "alice@").await;
    mallory
        .send(
            &Element::new("presence", ns::CLIENT)
                .child(Element::new("status", ns::CLIENT).text("hello?")),
        )
        .await
        .unwrap();
    expect_no_presence_from(&mut alice, "mallory@").await;
    // A new session of mallory's gets no probe answer from alice either.
    let mut m2 = interested(&node, "mallory", "phone").await;
    m2.send(&presence(None, None)).await.unwrap();
    expect_no_presence_from(&mut m2, "alice@").await;
}

#[tokio::test]
async fn blocked_subscriber_probe_is_not_answered() {
    let node = node_with(&["alice", "mallory"]);
    let mut alice = interested(&node, "alice", "pc").await;
    let mut mallory = interested(&node, "mallory", "pc").await;
    subscribe_to(&mut mallory, &mut alice).await;
    mallory.presence(0).await.unwrap();
    alice.presence(0).await.unwrap();
    expect_presence(&mut mallory, "alice@localhost/pc", None).await;
    let iq = block_iq(&mut alice, "block", &[&jid("mallory")]);
    assert_result(&alice.iq(iq).await.unwrap());
    drain(&mut mallory, Duration::from_millis(300)).await;

    // RFC 6121 §4.3 probe; XEP-0191 §3.4: nothing from alice reaches mallory.
    mallory
        .send(&presence(Some(&jid("alice")), Some("probe")))
        .await
        .unwrap();
    expect_no_presence_from(&mut mallory, "alice@").await;
}

// ===================================================== 9. vCard, private XML

#[tokio::test]
async fn vcard_is_set_by_its_owner_and_read_by_anyone() {
    let node = node_with(&["alice", "bob"]);
    let mut alice = interested(&node, "alice", "pc").await;
    let mut bob = interested(&node, "bob", "pc").await;

    let vcard = Element::new("vCard", VCARD)
        .child(Element::new("FN", VCARD).text("Alice Liddell"))
        .child(Element::new("NICKNAME", VCARD).text("ally"));
    let iq = alice.make_iq("set", None, vcard);
    assert_result(&alice.iq(iq).await.unwrap());

    let check = |reply: &Element| {
        assert_result(reply);
        let v = reply
            .get_child("vCard", VCARD)
            .unwrap_or_else(|| panic!("no vCard: {}", show(reply)));
        assert_eq!(
            v.child_text("FN", VCARD).as_deref(),
            Some("Alice Liddell"),
            "{}",
            show(reply)
        );
        assert_eq!(v.child_text("NICKNAME", VCARD).as_deref(), Some("ally"));
    };
    let iq = alice.make_iq("get", None, Element::new("vCard", VCARD));
    check(&alice.iq(iq).await.unwrap());
    let iq = bob.make_iq("get", Some(&jid("alice")), Element::new("vCard", VCARD));
    let reply = bob.iq(iq).await.unwrap();
    check(&reply);
    assert_eq!(
        reply.get_attr("from"),
        Some("alice@localhost"),
        "{}",
        show(&reply)
    );

    // Bob may not write alice's vCard.
    let forged = Element::new("vCard", VCARD).child(Element::new("FN", VCARD).text("Bob"));
    let iq = bob.make_iq("set", Some(&jid("alice")), forged);
    let reply = bob.iq(iq).await.unwrap();
    assert_eq!(
        stanza_error(&reply).as_deref(),
        Some("forbidden"),
        "{}",
        show(&reply)
    );
    let iq = alice.make_iq("get", None, Element::new("vCard", VCARD));
    check(&alice.iq(iq).await.unwrap());
}

fn bookmarks_query(conference: Option<&str>) -> Element {
    let mut storage = Element::new("storage", BOOKMARKS);
    if let Some(room) = conference {
        storage = storage.child(
            Element::new("conference", BOOKMARKS)
                .attr("jid", room)
                .attr("name", "Tea party")
                .attr("autojoin", "true")
                .child(Element::new("nick", BOOKMARKS).text("alice")),
        );
    }
    Element::new("query", PRIVATE).child(storage)
}

#[tokio::test]
async fn private_storage_keeps_bookmarks_and_refuses_jabber_namespaces() {
    let node = node_with(&["alice", "bob"]);
    let mut alice = interested(&node, "alice", "pc").await;
    let mut bob = interested(&node, "bob", "pc").await;
    let room = "tea@conference.localhost";

    let iq = alice.make_iq("set", None, bookmarks_query(Some(room)));
    assert_result(&alice.iq(iq).await.unwrap());
    let iq = alice.make_iq("get", None, bookmarks_query(None));
    let reply = alice.iq(iq).await.unwrap();
    assert_result(&reply);
    let conf = reply
        .get_child("query", PRIVATE)
        .and_then(|q| q.get_child("storage", BOOKMARKS))
        .and_then(|s| s.get_child("conference", BOOKMARKS))
        .unwrap_or_else(|| panic!("no bookmark: {}", show(&reply)));
    assert_eq!(conf.get_attr("jid"), Some(room));
    assert_eq!(conf.child_text("nick", BOOKMARKS).as_deref(), Some("alice"));

    // XEP-0049 §3: jabber:* namespaces are refused.
    let bad = Element::new("query", PRIVATE).child(Element::new("query", ns::ROSTER));
    let iq = alice.make_iq("set", None, bad);
    let reply = alice.iq(iq).await.unwrap();
    assert_eq!(
        stanza_error(&reply).as_deref(),
        Some("not-acceptable"),
        "{}",
        show(&reply)
    );

    // Nobody else reads it.
    let iq = bob.make_iq("get", Some(&jid("alice")), bookmarks_query(None));
    let reply = bob.iq(iq).await.unwrap();
    assert_eq!(reply.get_attr("type"), Some("error"), "{}", show(&reply));
    // Bob's own storage is empty.
    let iq = bob.make_iq("get", None, bookmarks_query(None));
    let reply = bob.iq(iq).await.unwrap();
    assert_result(&reply);
    let storage = reply
        .get_child("query", PRIVATE)
        .and_then(|q| q.get_child("storage", BOOKMARKS))
        .unwrap_or_else(|| panic!("no storage element: {}", show(&reply)));
    assert_eq!(storage.elements().count(), 0, "{}", show(&reply));
}

// ==================================================== 10. disco, features

#[tokio::test]
async fn server_disco_lists_roster_blocking_vcard_and_private() {
    let node = node_with(&["alice"]);
    let mut c = interested(&node, "alice", "pc").await;
    let iq = c.make_iq(
        "get",
        Some("localhost"),
        Element::new("query", ns::DISCO_INFO),
    );
    let reply = c.iq(iq).await.unwrap();
    assert_result(&reply);
    let features: Vec<String> = reply
        .get_child("query", ns::DISCO_INFO)
        .unwrap()
        .elements()
        .filter(|f| f.name == "feature")
        .filter_map(|f| f.get_attr("var").map(str::to_owned))
        .collect();
    for want in [ns::ROSTER, BLOCKING, VCARD, PRIVATE] {
        assert!(
            features.iter().any(|f| f == want),
            "{want} missing: {features:?}"
        );
    }
}

#[tokio::test]
async fn stream_features_after_auth_offer_roster_versioning() {
    let node = node_with(&["alice"]);
    let c = Client::login_bound(&node, "alice", PW, "pc").await.unwrap();
    assert!(
        c.features.has_child("ver", "urn:xmpp:features:rosterver"),
        "{}",
        show(&c.features)
    );
}

/// RFC 6121 §3.4: "If a server supports subscription pre-approvals, then
/// it MUST advertise the following stream feature during stream
/// negotiation: <sub xmlns='urn:xmpp:features:pre-approval'/>". The node
/// does pre-approve (see `pre_approved_subscription_is_granted_...`).
#[tokio::test]
async fn stream_features_after_auth_offer_pre_approval() {
    let node = node_with(&["alice"]);
    let c = Client::login_bound(&node, "alice", PW, "pc").await.unwrap();
    assert!(
        c.features
            .has_child("sub", "urn:xmpp:features:pre-approval"),
        "{}",
        show(&c.features)
    );
}

// ========================================================== 11. slixmpp

fn python() -> PathBuf {
    let py = PathBuf::from(
        std::env::var_os("INTEROP_PYTHON").unwrap_or_else(|| "/usr/bin/python3".into()),
    );
    let ok = Command::new(&py)
        .args(["-c", "import slixmpp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    assert!(
        ok,
        "{} cannot import slixmpp: install it with `apt-get install python3-slixmpp` \
         (or set INTEROP_PYTHON)",
        py.display()
    );
    py
}

#[test]
fn slixmpp_clients_subscribe_and_see_presence() {
    let node = node_with(&["alice", "bob"]);
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("interop/roster_presence.py");
    let mut child = Command::new(python())
        .arg(script)
        .arg(node.c2s.ip().to_string())
        .arg(node.c2s.port().to_string())
        .arg(&node.domain)
        .arg(PW)
        .arg(PW)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("cannot run roster_presence.py");
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let (mut out, mut err) = (String::new(), String::new());
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut out)
        .unwrap();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut err)
        .unwrap();
    let report = format!(
        "status {status:?}\n--- stdout ---\n{out}\n--- stderr ---\n{err}\n--- node log ---\n{}",
        node.log()
    );
    assert!(status.is_some_and(|s| s.success()), "{report}");
    for want in [
        "SUBSCRIPTION alice bob@localhost both",
        "SUBSCRIPTION bob alice@localhost both",
        "AVAILABLE alice bob@localhost",
        "AVAILABLE bob alice@localhost",
        "STATUS bob alice@localhost away lunch",
        "DONE",
    ] {
        assert!(out.lines().any(|l| l == want), "missing {want:?}: {report}");
    }
}

#[tokio::test]
async fn subscription_requests_from_a_blocked_user_never_arrive() {
    let node = node_with(&["alice", "mallory"]);
    let mut alice = online(&node, "alice", "pc", 0).await;
    let mut mallory = online(&node, "mallory", "m", 0).await;
    let mj = jid("mallory");
    let iq = block_iq(&mut alice, "block", &[&mj]);
    assert_result(&alice.iq(iq).await.unwrap());
    drain(&mut alice, QUIET).await;
    send_sub(&mut mallory, &jid("alice"), "subscribe").await;
    mallory.sync().await.unwrap();
    expect_none(
        &mut alice,
        "a subscription request from a blocked user",
        |e| e.name == "presence" && e.get_attr("type") == Some("subscribe"),
    )
    .await;
    // Nor is it kept for alice's next login.
    drop(alice);
    let mut alice = online(&node, "alice", "phone", 0).await;
    expect_none(&mut alice, "a stored request from a blocked user", |e| {
        e.name == "presence" && e.get_attr("type") == Some("subscribe")
    })
    .await;
}

#[tokio::test]
async fn unblocking_a_subscriber_sends_them_current_presence() {
    let node = node_with(&["alice", "mallory"]);
    let mut alice = online(&node, "alice", "pc", 0).await;
    let mut mallory = online(&node, "mallory", "m", 0).await;
    befriend(&mut alice, &mut mallory).await;
    let mj = jid("mallory");
    let iq = block_iq(&mut alice, "block", &[&mj]);
    assert_result(&alice.iq(iq).await.unwrap());
    expect_presence(&mut mallory, "alice@localhost/pc", Some("unavailable")).await;
    drain(&mut mallory, QUIET).await;
    let iq = block_iq(&mut alice, "unblock", &[&mj]);
    assert_result(&alice.iq(iq).await.unwrap());
    // Without waiting for alice's next presence change, mallory sees her again.
    expect_presence(&mut mallory, "alice@localhost/pc", None).await;
}

#[tokio::test]
async fn a_full_roster_refuses_new_contacts_with_not_allowed() {
    let node = TestNode::start_with(tests::node::NodeOptions {
        extra_config: "[limits]\nmax_roster_items = 2\n".into(),
        ..Default::default()
    })
    .unwrap();
    node.adduser("alice", PW).unwrap();
    let mut alice = interested(&node, "alice", "pc").await;
    for c in ["a", "b"] {
        assert_result(&roster_set(&mut alice, roster_item(&jid(c), None, &[])).await);
    }
    let refused = roster_set(&mut alice, roster_item(&jid("c"), None, &[])).await;
    assert_eq!(
        stanza_error(&refused).as_deref(),
        Some("not-allowed"),
        "{}",
        refused.to_string_in(ns::CLIENT)
    );
    // Renaming a contact already there still works.
    assert_result(&roster_set(&mut alice, roster_item(&jid("a"), Some("A"), &[])).await);
}

/// Deleting an account takes it out of every local contact's roster, as
/// if the user had removed them: the contact sees it go unavailable and a
/// roster push removing it, and a new account of the same name inherits
/// no subscription.
#[tokio::test]
async fn a_deleted_account_leaves_its_contacts_rosters() {
    let node = node_with(&["alice", "bob"]);
    let mut alice = online(&node, "alice", "pc", 0).await;
    let mut bob = online(&node, "bob", "pc", 0).await;
    send_sub(&mut alice, &jid("bob"), "subscribe").await;
    send_sub(&mut bob, &jid("alice"), "subscribed").await;
    send_sub(&mut bob, &jid("alice"), "subscribe").await;
    send_sub(&mut alice, &jid("bob"), "subscribed").await;
    assert_sub(&mut bob, &jid("alice"), "both", None).await;
    drain(&mut bob, Duration::ZERO).await;

    node.clusterctl(&["deluser", &jid("alice")])
        .expect("deluser");
    expect_presence(&mut bob, "alice@localhost/pc", Some("unavailable")).await;
    expect_sub_push(&mut bob, &jid("alice"), "remove", None).await;
    assert_eq!(sub_state(&mut bob, &jid("alice")).await, None);

    node.adduser("alice", PW).unwrap();
    let mut again = online(&node, "alice", "new", 0).await;
    let reply = roster_get(&mut again).await;
    assert_eq!(query(&reply).elements().count(), 0, "{}", show(&reply));
    assert_eq!(sub_state(&mut bob, &jid("alice")).await, None);
}

/// A deleted account leaves every blocklist that named it (bare or full
/// JID), with an unblock push; the owner's own list goes with it. A new
/// account of the same name starts unblocked.
#[tokio::test]
async fn a_deleted_account_leaves_others_blocklists() {
    let node = node_with(&["alice", "mallory", "carol"]);
    let mut alice = online(&node, "alice", "pc", 0).await;
    let mj = jid("mallory");
    let full = format!("{mj}/bot");
    let iq = block_iq(&mut alice, "block", &[&mj, &full, &jid("carol")]);
    assert_result(&alice.iq(iq).await.unwrap());
    let mut mallory = online(&node, "mallory", "pc", 0).await;
    let iq = block_iq(&mut mallory, "block", &[&jid("alice")]);
    assert_result(&mallory.iq(iq).await.unwrap());

    node.clusterctl(&["deluser", &mj]).expect("deluser");
    expect_block_push(&mut alice, "unblock", &mj).await;
    expect_block_push(&mut alice, "unblock", &full).await;
    assert_eq!(blocklist(&mut alice).await, vec![jid("carol")]);

    node.adduser("mallory", PW).unwrap();
    let mut again = online(&node, "mallory", "new", 0).await;
    assert!(blocklist(&mut again).await.is_empty());
    again.chat(&jid("alice"), "hello again").await.unwrap();
    let m = alice.recv_message(WAIT).await.unwrap();
    assert_eq!(body(&m).as_deref(), Some("hello again"));
}
