//! Budgets in bytes and counts for what one account can make the server
//! keep: vCards, private XML storage, subscription requests from
//! strangers, and the removal marks of roster versioning.

use tests::client::{stanza_error, Client, WAIT};
use tests::node::{NodeOptions, TestNode};
use xmpp::element::Element;
use xmpp::stanza::ns;

const PW: &str = "secret";

fn node_with(extra_config: &str, users: &[&str]) -> TestNode {
    let node = TestNode::start_with(NodeOptions {
        extra_config: extra_config.into(),
        ..NodeOptions::default()
    })
    .expect("node starts");
    for u in users {
        node.adduser(u, PW).unwrap();
    }
    node
}

fn error_of(reply: &Element) -> Option<String> {
    stanza_error(reply)
}

#[tokio::test]
async fn a_vcard_over_its_budget_is_refused_and_the_old_one_kept() {
    let node = node_with("[limits]\nmax_vcard_bytes = 1024\n", &["alice"]);
    let mut alice = Client::login_bound(&node, "alice", PW, "pc").await.unwrap();
    let vcard = |name: &str, photo: usize| {
        Element::new("vCard", "vcard-temp")
            .child(Element::new("FN", "vcard-temp").text(name))
            .child(
                Element::new("PHOTO", "vcard-temp")
                    .child(Element::new("BINVAL", "vcard-temp").text("A".repeat(photo))),
            )
    };
    let set = alice.make_iq("set", None, vcard("Alice", 100));
    let r = alice.iq(set).await.unwrap();
    assert_eq!(r.get_attr("type"), Some("result"), "{r:?}");
    let set = alice.make_iq("set", None, vcard("Big Alice", 2000));
    let r = alice.iq(set).await.unwrap();
    assert_eq!(error_of(&r).as_deref(), Some("not-acceptable"), "{r:?}");
    assert!(format!("{r:?}").contains("1024 bytes"), "{r:?}");
    let get = alice.make_iq("get", None, Element::new("vCard", "vcard-temp"));
    let r = alice.iq(get).await.unwrap();
    let stored = r.get_child("vCard", "vcard-temp").expect("vCard");
    assert_eq!(
        stored.child_text("FN", "vcard-temp").as_deref(),
        Some("Alice")
    );
}

#[tokio::test]
async fn private_storage_is_bounded_across_namespaces() {
    let node = node_with("[limits]\nmax_private_bytes = 1024\n", &["alice"]);
    let mut alice = Client::login_bound(&node, "alice", PW, "pc").await.unwrap();
    let mut store = |ns: &str| {
        let item = Element::new("data", ns).text("z".repeat(300));
        let q = Element::new("query", "jabber:iq:private").child(item);
        alice.make_iq("set", None, q)
    };
    let (a, b, c) = (store("urn:x:a"), store("urn:x:b"), store("urn:x:c"));
    for iq in [a, b] {
        let r = alice.iq(iq).await.unwrap();
        assert_eq!(r.get_attr("type"), Some("result"), "{r:?}");
    }
    let r = alice.iq(c).await.unwrap();
    assert_eq!(
        error_of(&r).as_deref(),
        Some("resource-constraint"),
        "{r:?}"
    );
    // Replacing what is there is not growth.
    let again = Element::new("query", "jabber:iq:private")
        .child(Element::new("data", "urn:x:a").text("short"));
    let iq = alice.make_iq("set", None, again);
    let r = alice.iq(iq).await.unwrap();
    assert_eq!(r.get_attr("type"), Some("result"), "{r:?}");
}

/// Requests from strangers are kept as hidden roster items, and count
/// against `max_roster_items`: past it, a request is dropped, and the
/// user logging in later gets only the ones that fitted.
#[tokio::test]
async fn subscription_requests_from_strangers_count_against_the_roster() {
    let node = node_with(
        "[limits]\nmax_roster_items = 2\n",
        &["alice", "s1", "s2", "s3"],
    );
    for s in ["s1", "s2", "s3"] {
        let mut c = Client::login_bound(&node, s, PW, "pc").await.unwrap();
        let sub = Element::new("presence", ns::CLIENT)
            .attr("to", "alice@localhost")
            .attr("type", "subscribe");
        c.send(&sub).await.unwrap();
        c.sync().await.unwrap();
    }
    let mut alice = Client::login_bound(&node, "alice", PW, "pc").await.unwrap();
    alice.presence(0).await.unwrap();
    // Requests are sent at initial presence, before the ping's answer.
    alice.sync().await.unwrap();
    let mut from: Vec<String> = alice
        .take_pending()
        .into_iter()
        .filter(|e| e.name == "presence" && e.get_attr("type") == Some("subscribe"))
        .filter_map(|e| e.get_attr("from").map(str::to_owned))
        .collect();
    from.sort();
    assert_eq!(from, ["s1@localhost", "s2@localhost"]);

    // Alice's own request to a fourth contact is refused with an error.
    let sub = Element::new("presence", ns::CLIENT)
        .attr("to", "s3@localhost")
        .attr("type", "subscribe");
    alice.send(&sub).await.unwrap();
    let err = alice
        .recv_until(
            |e| e.name == "presence" && e.get_attr("type") == Some("error"),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(error_of(&err).as_deref(), Some("resource-constraint"));
}

fn roster_get(c: &mut Client, ver: Option<u64>) -> Element {
    let mut q = Element::new("query", ns::ROSTER);
    if let Some(v) = ver {
        q.set_attr("ver", v.to_string());
    }
    c.make_iq("get", None, q)
}

fn roster_set(c: &mut Client, jid: &str, remove: bool) -> Element {
    let mut item = Element::new("item", ns::ROSTER).attr("jid", jid);
    if remove {
        item.set_attr("subscription", "remove");
    }
    c.make_iq("set", None, Element::new("query", ns::ROSTER).child(item))
}

/// Roster versioning keeps `max_roster_tombstones` removals; a client
/// whose version predates a forgotten removal gets the whole roster, one
/// after it only the changes.
#[tokio::test]
async fn forgotten_roster_removals_mean_a_full_roster() {
    let node = node_with("[limits]\nmax_roster_tombstones = 1\n", &["alice"]);
    let mut alice = Client::login_bound(&node, "alice", PW, "pc").await.unwrap();
    for c in [
        "c1@elsewhere.test",
        "c2@elsewhere.test",
        "c3@elsewhere.test",
    ] {
        let iq = roster_set(&mut alice, c, false);
        assert_eq!(alice.iq(iq).await.unwrap().get_attr("type"), Some("result"));
    }
    let iq = roster_get(&mut alice, None);
    let r = alice.iq(iq).await.unwrap();
    let old: u64 = r
        .get_child("query", ns::ROSTER)
        .and_then(|q| q.get_attr("ver"))
        .and_then(|v| v.parse().ok())
        .expect("a versioned roster");
    for c in ["c1@elsewhere.test", "c2@elsewhere.test"] {
        let iq = roster_set(&mut alice, c, true);
        assert_eq!(alice.iq(iq).await.unwrap().get_attr("type"), Some("result"));
    }
    let iq = roster_get(&mut alice, Some(old));
    let r = alice.iq(iq).await.unwrap();
    let q = r
        .get_child("query", ns::ROSTER)
        .expect("the whole roster, since the removal of c1 is forgotten");
    let items: Vec<&str> = q.elements().filter_map(|i| i.get_attr("jid")).collect();
    assert_eq!(items, ["c3@elsewhere.test"]);
    let newest: u64 = q
        .get_attr("ver")
        .and_then(|v| v.parse().ok())
        .expect("version");
    // Up to date: an empty result.
    let iq = roster_get(&mut alice, Some(newest));
    let r = alice.iq(iq).await.unwrap();
    assert!(r.get_child("query", ns::ROSTER).is_none(), "{r:?}");
}
