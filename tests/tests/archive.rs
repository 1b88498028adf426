//! Message Archive Management (XEP-0313) with stanza ids (XEP-0359), end
//! to end against the real `xmpp-node` binary: a conversation archived for
//! both parties, paged forwards and backwards, filtered by correspondent
//! and time, resumed from an id, preferences honoured, offline messages
//! archived too, and only the server names its own stanza ids.

use tests::client::{body, message, show, Client, QUIET, WAIT};
use tests::node::TestNode;
use xmpp::element::Element;
use xmpp::forms::{self, Field};
use xmpp::stanza::ns;

const PW: &str = "secret";
const MAM: &str = "urn:xmpp:mam:2";
const RSM: &str = "http://jabber.org/protocol/rsm";
const SID: &str = "urn:xmpp:sid:0";
const FORWARD: &str = "urn:xmpp:forward:0";
const DELAY: &str = "urn:xmpp:delay";

fn node_with(users: &[&str]) -> TestNode {
    TestNode::with_users(users, PW).expect("node starts")
}

fn jid(user: &str) -> String {
    format!("{user}@localhost")
}

async fn online(node: &TestNode, user: &str) -> Client {
    let mut c = Client::login_bound(node, user, PW, "r").await.unwrap();
    c.presence(0).await.unwrap();
    c
}

/// One archived message as a query returned it.
#[derive(Debug)]
struct Item {
    id: String,
    body: String,
    from: String,
    stamp: String,
}

/// What a query returned: the items in order and the `<fin/>`.
struct Page {
    items: Vec<Item>,
    fin: Element,
}

impl Page {
    fn bodies(&self) -> Vec<&str> {
        self.items.iter().map(|i| i.body.as_str()).collect()
    }

    fn complete(&self) -> bool {
        self.fin.get_attr("complete") == Some("true")
    }

    fn rsm(&self, name: &str) -> Option<String> {
        self.fin
            .get_child("set", RSM)
            .and_then(|s| s.child_text(name, RSM))
    }
}

/// Sends a query (form fields, then RSM children) and collects the
/// results up to the IQ reply. `Err` carries the error reply.
async fn query(
    c: &mut Client,
    fields: &[(&str, &[&str])],
    rsm: &[(&str, &str)],
) -> Result<Page, Element> {
    let queryid = c.id();
    let mut q = Element::new("query", MAM).attr("queryid", queryid.as_str());
    if !fields.is_empty() {
        let fields = fields
            .iter()
            .map(|(var, values)| {
                values
                    .iter()
                    .fold(Field::new(var, "text-single"), |f, v| f.value(*v))
            })
            .collect();
        q = q.child(forms::build("submit", Some(MAM), fields));
    }
    if !rsm.is_empty() {
        let mut set = Element::new("set", RSM);
        for (name, value) in rsm {
            set = set.child(Element::new(*name, RSM).text(*value));
        }
        q = q.child(set);
    }
    let iq = c.make_iq("set", None, q);
    let reply = c.iq(iq).await.expect("a reply");
    if reply.get_attr("type") != Some("result") {
        return Err(reply);
    }
    let mut items = Vec::new();
    for e in c.take_pending() {
        let Some(result) = e.get_child("result", MAM) else {
            continue;
        };
        assert_eq!(result.get_attr("queryid"), Some(queryid.as_str()));
        assert_eq!(e.get_attr("from"), Some(c.bare_jid()), "{}", show(&e));
        let fwd = result.get_child("forwarded", FORWARD).expect("forwarded");
        let m = fwd.get_child("message", ns::CLIENT).expect("the message");
        items.push(Item {
            id: result.get_attr("id").expect("an id").to_owned(),
            body: body(m).unwrap_or_default(),
            from: m.get_attr("from").unwrap_or_default().to_owned(),
            stamp: fwd
                .get_child("delay", DELAY)
                .and_then(|d| d.get_attr("stamp"))
                .expect("a delay stamp")
                .to_owned(),
        });
    }
    let fin = reply.get_child("fin", MAM).expect("fin").clone();
    Ok(Page { items, fin })
}

fn condition(reply: &Element) -> String {
    tests::client::stanza_error(reply).unwrap_or_else(|| show(reply))
}

fn stanza_ids(m: &Element) -> Vec<(String, String)> {
    m.elements()
        .filter(|e| e.is("stanza-id", SID))
        .map(|e| {
            (
                e.get_attr("by").unwrap_or_default().to_owned(),
                e.get_attr("id").unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_conversation_is_archived_for_both_and_paged_both_ways() {
    let node = node_with(&["alice", "bob"]);
    let mut alice = online(&node, "alice").await;
    let mut bob = online(&node, "bob").await;
    let mut delivered_ids = Vec::new();
    for i in 1..=25 {
        alice.chat(&jid("bob"), &format!("m{i}")).await.unwrap();
        let m = bob.recv_message(WAIT).await.unwrap();
        assert_eq!(body(&m).as_deref(), Some(format!("m{i}").as_str()));
        // XEP-0359: the recipient's copy names its place in the archive.
        let ids = stanza_ids(&m);
        assert_eq!(ids.len(), 1, "{}", show(&m));
        assert_eq!(ids[0].0, jid("bob"));
        delivered_ids.push(ids[0].1.clone());
    }
    let all: Vec<String> = (1..=25).map(|i| format!("m{i}")).collect();
    let expect = |r: std::ops::RangeInclusive<usize>| -> Vec<&str> {
        all[r.start() - 1..*r.end()]
            .iter()
            .map(String::as_str)
            .collect()
    };

    // Forwards from the start, ten at a time.
    let p1 = query(&mut bob, &[], &[("max", "10")]).await.unwrap();
    assert_eq!(p1.bodies(), expect(1..=10));
    assert!(!p1.complete());
    assert_eq!(p1.rsm("count").as_deref(), Some("25"));
    assert_eq!(p1.rsm("first").as_deref(), Some(p1.items[0].id.as_str()));
    assert_eq!(p1.items[0].from, format!("{}/r", jid("alice")));
    // The ids the recipient was given are the archive's ids.
    let ids: Vec<&str> = p1.items.iter().map(|i| i.id.as_str()).collect();
    assert_eq!(ids, delivered_ids[..10]);
    let last = p1.rsm("last").unwrap();
    let p2 = query(&mut bob, &[], &[("max", "10"), ("after", &last)])
        .await
        .unwrap();
    assert_eq!(p2.bodies(), expect(11..=20));
    let last = p2.rsm("last").unwrap();
    let p3 = query(&mut bob, &[], &[("max", "10"), ("after", &last)])
        .await
        .unwrap();
    assert_eq!(p3.bodies(), expect(21..=25));
    assert!(p3.complete());

    // Backwards from the end: the newest page first, each in time order.
    let b1 = query(&mut bob, &[], &[("max", "10"), ("before", "")])
        .await
        .unwrap();
    assert_eq!(b1.bodies(), expect(16..=25));
    assert!(!b1.complete());
    let first = b1.rsm("first").unwrap();
    let b2 = query(&mut bob, &[], &[("max", "10"), ("before", &first)])
        .await
        .unwrap();
    assert_eq!(b2.bodies(), expect(6..=15));
    let first = b2.rsm("first").unwrap();
    let b3 = query(&mut bob, &[], &[("max", "10"), ("before", &first)])
        .await
        .unwrap();
    assert_eq!(b3.bodies(), expect(1..=5));
    assert!(b3.complete());

    // The sender has the same conversation in her own archive.
    let a = query(&mut alice, &[], &[("max", "100")]).await.unwrap();
    assert_eq!(a.bodies(), expect(1..=25));
    assert!(a.complete());

    // An id that is not in the archive.
    let e = query(&mut bob, &[], &[("after", "12345")])
        .await
        .err()
        .expect("refused");
    assert_eq!(condition(&e), "item-not-found");

    // Someone else's archive is not for reading.
    let iq = alice.make_iq("set", Some(&jid("bob")), Element::new("query", MAM));
    let reply = alice.iq(iq).await.unwrap();
    assert_eq!(condition(&reply), "forbidden", "{}", show(&reply));

    // The account advertises its archive (XEP-0313 §7).
    let iq = bob.make_iq(
        "get",
        Some(&jid("bob")),
        Element::new("query", ns::DISCO_INFO),
    );
    let info = bob.iq(iq).await.unwrap();
    let features: Vec<&str> = info
        .get_child("query", ns::DISCO_INFO)
        .map(|q| {
            q.elements()
                .filter_map(|f| f.get_attr("var"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    assert!(features.contains(&MAM), "{features:?}");
    assert!(features.contains(&SID), "{features:?}");
}

#[tokio::test]
async fn queries_filter_by_correspondent_and_time_and_fetch_ids() {
    let node = node_with(&["alice", "bob", "carol"]);
    let mut alice = online(&node, "alice").await;
    let mut bob = online(&node, "bob").await;
    let mut carol = online(&node, "carol").await;
    for i in 1..=3 {
        alice
            .chat(&jid("bob"), &format!("to bob {i}"))
            .await
            .unwrap();
        bob.recv_message(WAIT).await.unwrap();
        alice
            .chat(&jid("carol"), &format!("to carol {i}"))
            .await
            .unwrap();
        carol.recv_message(WAIT).await.unwrap();
    }
    carol.chat(&jid("alice"), "from carol").await.unwrap();
    alice.recv_message(WAIT).await.unwrap();

    let carol_jid = jid("carol");
    let with_carol = query(&mut alice, &[("with", &[&carol_jid])], &[])
        .await
        .unwrap();
    assert_eq!(
        with_carol.bodies(),
        ["to carol 1", "to carol 2", "to carol 3", "from carol"]
    );
    assert!(with_carol.complete());
    // Filtered: the total is not promised.
    assert_eq!(with_carol.rsm("count"), None);
    let with_bob = query(&mut alice, &[("with", &[&jid("bob")])], &[("max", "2")])
        .await
        .unwrap();
    assert_eq!(with_bob.bodies(), ["to bob 1", "to bob 2"]);
    assert!(!with_bob.complete());

    // By time: from the fourth message's stamp to the fifth's.
    let all = query(&mut alice, &[], &[]).await.unwrap();
    assert_eq!(all.items.len(), 7);
    let (s4, s5) = (all.items[3].stamp.clone(), all.items[4].stamp.clone());
    eprintln!("{:?}", all.items);
    let window = query(&mut alice, &[("start", &[&s4]), ("end", &[&s5])], &[])
        .await
        .unwrap();
    assert_eq!(
        window.bodies(),
        [all.items[3].body.as_str(), &all.items[4].body]
    );
    let since = query(&mut alice, &[("start", &[&s5])], &[]).await.unwrap();
    assert_eq!(since.items.len(), 3);

    // Resumed from an id (XEP-0313 #extended), and fetched by id.
    let after = query(&mut alice, &[("after-id", &[&all.items[4].id])], &[])
        .await
        .unwrap();
    assert_eq!(
        after.bodies(),
        [all.items[5].body.as_str(), &all.items[6].body]
    );
    let before = query(&mut alice, &[("before-id", &[&all.items[1].id])], &[])
        .await
        .unwrap();
    assert_eq!(before.bodies(), [all.items[0].body.as_str()]);
    let picked = query(
        &mut alice,
        &[("ids", &[&all.items[6].id, &all.items[0].id])],
        &[],
    )
    .await
    .unwrap();
    assert_eq!(
        picked.bodies(),
        [all.items[6].body.as_str(), &all.items[0].body]
    );

    // Bad input gets the error XEP-0313 names.
    let e = query(&mut alice, &[("start", &["last tuesday"])], &[])
        .await
        .err()
        .expect("refused");
    assert_eq!(condition(&e), "bad-request");
    let e = query(&mut alice, &[("colour", &["red"])], &[])
        .await
        .err()
        .expect("refused");
    assert_eq!(condition(&e), "feature-not-implemented");
    let e = query(&mut alice, &[("after-id", &["999"])], &[])
        .await
        .err()
        .expect("refused");
    assert_eq!(condition(&e), "item-not-found");

    // The archive's two ends (#extended metadata).
    let iq = alice.make_iq("get", None, Element::new("metadata", MAM));
    let meta = alice.iq(iq).await.unwrap();
    let m = meta.get_child("metadata", MAM).expect("metadata");
    assert_eq!(
        m.get_child("start", MAM).and_then(|e| e.get_attr("id")),
        Some(all.items[0].id.as_str())
    );
    assert_eq!(
        m.get_child("end", MAM).and_then(|e| e.get_attr("id")),
        Some(all.items[6].id.as_str())
    );
}

#[tokio::test]
async fn preferences_decide_what_is_archived() {
    let node = node_with(&["alice", "bob", "carol", "dave"]);
    let mut alice = online(&node, "alice").await;
    let mut bob = online(&node, "bob").await;
    let mut carol = online(&node, "carol").await;
    let mut dave = online(&node, "dave").await;

    // Bob: never, except with alice.
    let prefs = Element::new("prefs", MAM)
        .attr("default", "never")
        .child(Element::new("always", MAM).child(Element::new("jid", MAM).text(jid("alice"))));
    let iq = bob.make_iq("set", None, prefs);
    let reply = bob.iq(iq).await.unwrap();
    assert_eq!(reply.get_attr("type"), Some("result"), "{}", show(&reply));
    let iq = bob.make_iq("get", None, Element::new("prefs", MAM));
    let got = bob.iq(iq).await.unwrap();
    let p = got.get_child("prefs", MAM).expect("prefs");
    assert_eq!(p.get_attr("default"), Some("never"));
    assert_eq!(
        p.get_child("always", MAM)
            .and_then(|a| a.child_text("jid", MAM))
            .as_deref(),
        Some(jid("alice").as_str())
    );

    carol.chat(&jid("bob"), "from carol").await.unwrap();
    let m = bob.recv_message(WAIT).await.unwrap();
    assert!(
        stanza_ids(&m).is_empty(),
        "not archived, no id: {}",
        show(&m)
    );
    alice.chat(&jid("bob"), "from alice").await.unwrap();
    let m = bob.recv_message(WAIT).await.unwrap();
    assert_eq!(stanza_ids(&m).len(), 1, "{}", show(&m));
    let b = query(&mut bob, &[], &[]).await.unwrap();
    assert_eq!(b.bodies(), ["from alice"]);
    // The sender's own preferences are hers: carol keeps what she sent.
    let c = query(&mut carol, &[], &[]).await.unwrap();
    assert_eq!(c.bodies(), ["from carol"]);

    // Dave: only contacts in his roster.
    let prefs = Element::new("prefs", MAM).attr("default", "roster");
    let iq = dave.make_iq("set", None, prefs);
    dave.iq(iq).await.unwrap();
    let item = Element::new("query", ns::ROSTER)
        .child(Element::new("item", ns::ROSTER).attr("jid", jid("alice")));
    let iq = dave.make_iq("set", None, item);
    let reply = dave.iq(iq).await.unwrap();
    assert_eq!(reply.get_attr("type"), Some("result"), "{}", show(&reply));
    carol.chat(&jid("dave"), "stranger").await.unwrap();
    alice.chat(&jid("dave"), "contact").await.unwrap();
    dave.recv_until(|e| body(e).as_deref() == Some("contact"), WAIT)
        .await
        .unwrap();
    let d = query(&mut dave, &[], &[]).await.unwrap();
    assert_eq!(d.bodies(), ["contact"]);

    // Bad preferences are refused.
    let iq = dave.make_iq(
        "set",
        None,
        Element::new("prefs", MAM).attr("default", "sometimes"),
    );
    let reply = dave.iq(iq).await.unwrap();
    assert_eq!(condition(&reply), "bad-request");
}

#[tokio::test]
async fn offline_messages_are_archived_and_ids_are_the_servers_own() {
    let node = node_with(&["alice", "bob"]);
    let mut alice = online(&node, "alice").await;
    // Bob is offline: the message waits for him and is in his archive.
    alice.chat(&jid("bob"), "while you were out").await.unwrap();
    // A chat state alone is not archived; a no-store hint keeps a body out.
    let state = Element::new("message", ns::CLIENT)
        .attr("to", jid("bob"))
        .attr("type", "chat")
        .child(Element::new(
            "active",
            "http://jabber.org/protocol/chatstates",
        ));
    alice.send(&state).await.unwrap();
    let hinted =
        message(&jid("bob"), "do not keep").child(Element::new("no-store", "urn:xmpp:hints"));
    alice.send(&hinted).await.unwrap();
    // A stanza id that claims to be bob's server's is not the sender's to give.
    let spoofed = message(&jid("bob"), "spoofed").child(
        Element::new("stanza-id", SID)
            .attr("by", jid("bob"))
            .attr("id", "forged"),
    );
    alice.send(&spoofed).await.unwrap();
    alice.sync().await.unwrap();

    let mut bob = Client::login_bound(&node, "bob", PW, "r").await.unwrap();
    bob.presence(0).await.unwrap();
    let first = bob
        .recv_until(|e| body(e).as_deref() == Some("while you were out"), WAIT)
        .await
        .unwrap();
    let ids = stanza_ids(&first);
    assert_eq!(ids.len(), 1, "{}", show(&first));
    let spoofed = bob
        .recv_until(|e| body(e).as_deref() == Some("spoofed"), WAIT)
        .await
        .unwrap();
    let sids = stanza_ids(&spoofed);
    assert_eq!(sids.len(), 1, "{}", show(&spoofed));
    assert_ne!(sids[0].1, "forged");
    tokio::time::sleep(QUIET).await;
    let b = query(&mut bob, &[], &[]).await.unwrap();
    assert_eq!(b.bodies(), ["while you were out", "spoofed"]);
    assert_eq!(b.items[0].id, ids[0].1);
    assert_eq!(b.items[1].id, sids[0].1);
}
