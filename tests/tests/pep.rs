//! PEP (XEP-0163 over XEP-0060) end to end against the real `xmpp-node`
//! binary: publish with publish-options, access models (presence, open,
//! whitelist), +notify interest learned from verified entity capabilities
//! (XEP-0115), the last item at login, retraction, node configuration and
//! deletion, and vCard avatar hashes in presence (XEP-0153).

use tests::client::{show, Client, QUIET, WAIT};
use tests::node::TestNode;
use xmpp::element::Element;
use xmpp::forms::{self, Field};
use xmpp::stanza::ns;

const PW: &str = "secret";
const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
const OWNER: &str = "http://jabber.org/protocol/pubsub#owner";
const EVENT: &str = "http://jabber.org/protocol/pubsub#event";
const ERRORS: &str = "http://jabber.org/protocol/pubsub#errors";
const NICK: &str = "http://jabber.org/protocol/nick";
const DEVICELIST: &str = "eu.siacs.conversations.axolotl.devicelist";
const AXOLOTL: &str = "eu.siacs.conversations.axolotl";
const BOOKMARKS: &str = "urn:xmpp:bookmarks:1";
const AVATAR_META: &str = "urn:xmpp:avatar:metadata";

fn node_with(users: &[&str]) -> TestNode {
    TestNode::with_users(users, PW).expect("node starts")
}

fn jid(user: &str) -> String {
    format!("{user}@localhost")
}

/// Logs in and sends presence with caps for `notify` (see
/// [`Client::presence_with_caps`]).
async fn online_with_caps(
    node: &TestNode,
    user: &str,
    resource: &str,
    notify: &[&str],
    lie: bool,
) -> Client {
    let mut c = Client::login_bound(node, user, PW, resource).await.unwrap();
    c.presence_with_caps(notify, lie).await.unwrap();
    c
}

/// `user` asks `contact` for a subscription and `contact` (online) approves.
async fn subscribe(user: &mut Client, contact: &mut Client) {
    let to = contact.bare_jid().to_owned();
    let from = user.bare_jid().to_owned();
    user.send(
        &Element::new("presence", ns::CLIENT)
            .attr("to", to.as_str())
            .attr("type", "subscribe"),
    )
    .await
    .unwrap();
    contact
        .recv_until(
            |e| e.name == "presence" && e.get_attr("type") == Some("subscribe"),
            WAIT,
        )
        .await
        .unwrap();
    contact
        .send(
            &Element::new("presence", ns::CLIENT)
                .attr("to", from.as_str())
                .attr("type", "subscribed"),
        )
        .await
        .unwrap();
    user.recv_until(
        |e| e.name == "presence" && e.get_attr("type") == Some("subscribed"),
        WAIT,
    )
    .await
    .unwrap();
    contact.sync().await.unwrap();
    user.sync().await.unwrap();
}

fn publish_options(fields: &[(&str, &str)]) -> Element {
    let fields = fields
        .iter()
        .map(|(var, value)| Field::new(var, "text-single").value(*value))
        .collect();
    Element::new("publish-options", PUBSUB).child(forms::build(
        "submit",
        Some("http://jabber.org/protocol/pubsub#publish-options"),
        fields,
    ))
}

async fn publish(
    c: &mut Client,
    node: &str,
    id: &str,
    payload: Element,
    options: &[(&str, &str)],
) -> Element {
    let mut pubsub = Element::new("pubsub", PUBSUB).child(
        Element::new("publish", PUBSUB)
            .attr("node", node)
            .child(Element::new("item", PUBSUB).attr("id", id).child(payload)),
    );
    if !options.is_empty() {
        pubsub = pubsub.child(publish_options(options));
    }
    let iq = c.make_iq("set", None, pubsub);
    c.iq(iq).await.unwrap()
}

async fn items(c: &mut Client, owner: &str, node: &str) -> Element {
    let iq = c.make_iq(
        "get",
        Some(owner),
        Element::new("pubsub", PUBSUB).child(Element::new("items", PUBSUB).attr("node", node)),
    );
    c.iq(iq).await.unwrap()
}

fn item_ids(reply: &Element) -> Vec<String> {
    reply
        .get_child("pubsub", PUBSUB)
        .and_then(|p| p.get_child("items", PUBSUB))
        .map(|i| {
            i.elements()
                .filter_map(|e| e.get_attr("id").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn nick(name: &str) -> Element {
    Element::new("nick", NICK).text(name)
}

/// The next PEP notification for `node`; its `<items/>` (or other) child.
async fn event(c: &mut Client, node: &str) -> Element {
    let m = c
        .recv_until(
            |e| {
                e.get_child("event", EVENT)
                    .and_then(|ev| ev.elements().next())
                    .is_some_and(|x| x.get_attr("node") == Some(node))
            },
            WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("{} got no {node} event: {e}", c.full_jid()));
    m.get_child("event", EVENT)
        .and_then(|ev| ev.elements().next())
        .cloned()
        .expect("event content")
}

fn no_event(node: &str) -> impl FnMut(&Element) -> bool + '_ {
    move |e| {
        e.get_child("event", EVENT)
            .and_then(|ev| ev.elements().next())
            .is_some_and(|x| x.get_attr("node") == Some(node))
    }
}

fn error_parts(reply: &Element) -> (String, Option<String>) {
    let err = reply.get_child("error", ns::CLIENT);
    let specific = err.and_then(|e| {
        e.elements()
            .find(|c| c.ns == ERRORS)
            .map(|c| c.name.clone())
    });
    (
        tests::client::stanza_error(reply).unwrap_or_else(|| show(reply)),
        specific,
    )
}

#[tokio::test]
async fn presence_nodes_notify_subscribers_with_notify_and_nobody_else() {
    let node = node_with(&["alice", "carol", "dave"]);
    let mut alice = online_with_caps(&node, "alice", "phone", &[NICK], false).await;
    let mut alice2 = online_with_caps(&node, "alice", "desktop", &[NICK], false).await;
    let mut carol = online_with_caps(&node, "carol", "c", &[NICK], false).await;
    let mut dave = online_with_caps(&node, "dave", "d", &[NICK], false).await;
    // Carol sees alice's presence (alice: from; carol: to); dave does not.
    subscribe(&mut carol, &mut alice).await;

    let r = publish(&mut alice, NICK, "current", nick("Alice"), &[]).await;
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    for c in [&mut carol, &mut alice2, &mut alice] {
        let items = event(c, NICK).await;
        let item = items.get_child("item", EVENT).expect("item");
        assert_eq!(item.get_attr("id"), Some("current"));
        assert_eq!(item.child_text("nick", NICK).as_deref(), Some("Alice"));
    }
    dave.expect_none(no_event(NICK), QUIET).await.unwrap();

    // Readable by the subscriber, hidden from the stranger.
    let got = items(&mut carol, &jid("alice"), NICK).await;
    assert_eq!(item_ids(&got), ["current"], "{}", show(&got));
    let refused = items(&mut dave, &jid("alice"), NICK).await;
    assert_eq!(
        error_parts(&refused),
        (
            "not-authorized".into(),
            Some("presence-subscription-required".into())
        )
    );

    // A later login of a subscriber gets the last item.
    let mut carol2 = online_with_caps(&node, "carol", "late", &[NICK], false).await;
    let items = event(&mut carol2, NICK).await;
    assert_eq!(
        items
            .get_child("item", EVENT)
            .and_then(|i| i.child_text("nick", NICK))
            .as_deref(),
        Some("Alice")
    );

    // Retraction is notified too.
    let iq = alice.make_iq(
        "set",
        None,
        Element::new("pubsub", PUBSUB).child(
            Element::new("retract", PUBSUB)
                .attr("node", NICK)
                .attr("notify", "true")
                .child(Element::new("item", PUBSUB).attr("id", "current")),
        ),
    );
    let r = alice.iq(iq).await.unwrap();
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    let items = event(&mut carol, NICK).await;
    assert_eq!(
        items
            .get_child("retract", EVENT)
            .and_then(|r| r.get_attr("id")),
        Some("current")
    );
    let got = items_of(&mut carol, "alice", NICK).await;
    assert!(got.is_empty(), "{got:?}");
}

async fn items_of(c: &mut Client, owner: &str, node: &str) -> Vec<String> {
    let r = items(c, &jid(owner), node).await;
    item_ids(&r)
}

#[tokio::test]
async fn an_omemo_device_list_is_open_to_strangers_and_options_are_preconditions() {
    let node = node_with(&["alice", "mallory"]);
    let mut alice = online_with_caps(&node, "alice", "phone", &[DEVICELIST], false).await;
    let mut mallory = online_with_caps(&node, "mallory", "m", &[], false).await;
    let list =
        Element::new("list", AXOLOTL).child(Element::new("device", AXOLOTL).attr("id", "12345"));
    let r = publish(
        &mut alice,
        DEVICELIST,
        "current",
        list,
        &[("pubsub#access_model", "open")],
    )
    .await;
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    // OMEMO: whoever wants to write to alice fetches her devices.
    let got = items(&mut mallory, &jid("alice"), DEVICELIST).await;
    assert_eq!(item_ids(&got), ["current"], "{}", show(&got));
    let device = got
        .get_child("pubsub", PUBSUB)
        .and_then(|p| p.get_child("items", PUBSUB))
        .and_then(|i| i.get_child("item", PUBSUB))
        .and_then(|i| i.get_child("list", AXOLOTL))
        .and_then(|l| l.get_child("device", AXOLOTL))
        .and_then(|d| d.get_attr("id"));
    assert_eq!(device, Some("12345"));
    // Nobody but the owner publishes.
    let r = publish(
        &mut mallory,
        DEVICELIST,
        "x",
        Element::new("list", AXOLOTL),
        &[],
    )
    .await;
    assert_eq!(
        r.get_attr("type"),
        Some("result"),
        "mallory's own node: {}",
        show(&r)
    );
    let iq = mallory.make_iq(
        "set",
        Some(&jid("alice")),
        Element::new("pubsub", PUBSUB).child(
            Element::new("publish", PUBSUB)
                .attr("node", DEVICELIST)
                .child(Element::new("item", PUBSUB).child(Element::new("list", AXOLOTL))),
        ),
    );
    let r = mallory.iq(iq).await.unwrap();
    assert_eq!(error_parts(&r).0, "forbidden");

    // publish-options that the node does not meet (XEP-0060 §7.1.5).
    let r = publish(
        &mut alice,
        DEVICELIST,
        "current",
        Element::new("list", AXOLOTL),
        &[("pubsub#access_model", "presence")],
    )
    .await;
    assert_eq!(
        error_parts(&r),
        ("conflict".into(), Some("precondition-not-met".into()))
    );
    // Reconfigured, then the same publish goes through.
    let iq = alice.make_iq(
        "get",
        None,
        Element::new("pubsub", OWNER)
            .child(Element::new("configure", OWNER).attr("node", DEVICELIST)),
    );
    let r = alice.iq(iq).await.unwrap();
    let form = r
        .get_child("pubsub", OWNER)
        .and_then(|p| p.get_child("configure", OWNER))
        .and_then(|c| c.get_child("x", forms::NS))
        .and_then(forms::Submitted::read)
        .expect("a config form");
    assert_eq!(form.value("pubsub#access_model"), Some("open"));
    let x = forms::build(
        "submit",
        Some("http://jabber.org/protocol/pubsub#node_config"),
        vec![Field::new("pubsub#access_model", "list-single").value("presence")],
    );
    let iq = alice.make_iq(
        "set",
        None,
        Element::new("pubsub", OWNER).child(
            Element::new("configure", OWNER)
                .attr("node", DEVICELIST)
                .child(x),
        ),
    );
    let r = alice.iq(iq).await.unwrap();
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    let r = publish(
        &mut alice,
        DEVICELIST,
        "current",
        Element::new("list", AXOLOTL),
        &[("pubsub#access_model", "presence")],
    )
    .await;
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    let refused = items(&mut mallory, &jid("alice"), DEVICELIST).await;
    assert_eq!(error_parts(&refused).0, "not-authorized");

    // Deleting the node: gone for everyone, the owner's session told.
    let iq = alice.make_iq(
        "set",
        None,
        Element::new("pubsub", OWNER).child(Element::new("delete", OWNER).attr("node", DEVICELIST)),
    );
    let r = alice.iq(iq).await.unwrap();
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    let ev = alice
        .recv_until(
            |e| {
                e.get_child("event", EVENT)
                    .is_some_and(|ev| ev.has_child("delete", EVENT))
            },
            WAIT,
        )
        .await
        .unwrap();
    assert!(ev.get_child("event", EVENT).is_some());
    let r = items(&mut alice, &jid("alice"), DEVICELIST).await;
    assert_eq!(error_parts(&r).0, "item-not-found");
}

#[tokio::test]
async fn bookmarks_are_private_to_the_owner_and_keep_many_items() {
    let node = node_with(&["alice", "carol"]);
    let mut alice = online_with_caps(&node, "alice", "phone", &[BOOKMARKS], false).await;
    let mut alice2 = online_with_caps(&node, "alice", "desktop", &[BOOKMARKS], false).await;
    let mut carol = online_with_caps(&node, "carol", "c", &[BOOKMARKS], false).await;
    subscribe(&mut carol, &mut alice).await;
    // XEP-0402 §3: one item per room, whitelist, as many as the server keeps.
    let opts = [
        ("pubsub#persist_items", "true"),
        ("pubsub#access_model", "whitelist"),
        ("pubsub#max_items", "max"),
        ("pubsub#send_last_published_item", "never"),
    ];
    for room in [
        "a@conference.localhost",
        "b@conference.localhost",
        "c@conference.localhost",
    ] {
        let conf = Element::new("conference", BOOKMARKS)
            .attr("name", room)
            .attr("autojoin", "true");
        let r = publish(&mut alice, BOOKMARKS, room, conf, &opts).await;
        assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
        let ev = event(&mut alice2, BOOKMARKS).await;
        assert_eq!(
            ev.get_child("item", EVENT).and_then(|i| i.get_attr("id")),
            Some(room)
        );
    }
    assert_eq!(
        items_of(&mut alice, "alice", BOOKMARKS).await,
        [
            "a@conference.localhost",
            "b@conference.localhost",
            "c@conference.localhost"
        ]
    );
    // A contact, even one subscribed to alice's presence, sees none of it.
    carol.expect_none(no_event(BOOKMARKS), QUIET).await.unwrap();
    let r = items(&mut carol, &jid("alice"), BOOKMARKS).await;
    assert_eq!(
        error_parts(&r),
        ("not-authorized".into(), Some("closed-node".into()))
    );
}

#[tokio::test]
async fn caps_that_do_not_match_their_hash_are_not_believed() {
    let node = node_with(&["alice", "eve"]);
    let mut alice = online_with_caps(&node, "alice", "a", &[], false).await;
    // Eve announces no interests but answers the query claiming many.
    let mut eve = online_with_caps(&node, "eve", "e", &[], true).await;
    subscribe(&mut eve, &mut alice).await;
    let r = publish(&mut alice, NICK, "current", nick("Alice"), &[]).await;
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    eve.expect_none(no_event(NICK), QUIET).await.unwrap();
}

#[tokio::test]
async fn avatar_hashes_in_presence_reach_contacts_and_own_resources() {
    const UPDATE: &str = "vcard-temp:x:update";
    let node = node_with(&["alice", "carol"]);
    let mut alice = online_with_caps(&node, "alice", "phone", &[AVATAR_META], false).await;
    let mut alice2 = online_with_caps(&node, "alice", "desktop", &[AVATAR_META], false).await;
    let mut carol = online_with_caps(&node, "carol", "c", &[AVATAR_META], false).await;
    subscribe(&mut carol, &mut alice).await;
    // XEP-0084: metadata on its node, seen by contacts and own devices.
    let meta = Element::new("metadata", AVATAR_META).child(
        Element::new("info", AVATAR_META)
            .attr("id", "111f4b3c50d7b0df729d299bc6f8e9ef9066971f")
            .attr("bytes", "12345")
            .attr("type", "image/png"),
    );
    let r = publish(
        &mut alice,
        AVATAR_META,
        "111f4b3c50d7b0df729d299bc6f8e9ef9066971f",
        meta,
        &[],
    )
    .await;
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    for c in [&mut carol, &mut alice2] {
        let ev = event(c, AVATAR_META).await;
        assert!(ev
            .get_child("item", EVENT)
            .and_then(|i| i.get_child("metadata", AVATAR_META))
            .is_some());
    }
    // XEP-0153: the vCard photo hash travels in presence, as sent.
    let p = Element::new("presence", ns::CLIENT)
        .child(Element::new("x", UPDATE).child(Element::new("photo", UPDATE).text("abc123")));
    alice.send(&p).await.unwrap();
    for c in [&mut carol, &mut alice2] {
        let got = c
            .recv_until(
                |e| e.name == "presence" && e.get_child("x", UPDATE).is_some(),
                WAIT,
            )
            .await
            .unwrap();
        assert_eq!(
            got.get_child("x", UPDATE)
                .and_then(|x| x.child_text("photo", UPDATE))
                .as_deref(),
            Some("abc123")
        );
    }
}
