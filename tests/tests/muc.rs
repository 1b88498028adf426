//! Group chat (XEP-0045) end to end against the real `xmpp-node` binary:
//! create and configure a room through its form, join, chat, history on
//! join, subject, private messages, members-only and password rooms,
//! kick and ban, nick conflicts, the room archive (XEP-0313), self-ping
//! (XEP-0410), a vanished occupant, and destruction.

use std::time::Duration;

use tests::client::{body, show, Client, WAIT};
use tests::node::TestNode;
use xmpp::element::Element;
use xmpp::forms::{self, Field};
use xmpp::stanza::ns;

const PW: &str = "secret";
const MUC: &str = "http://jabber.org/protocol/muc";
const USER: &str = "http://jabber.org/protocol/muc#user";
const OWNER: &str = "http://jabber.org/protocol/muc#owner";
const ADMIN: &str = "http://jabber.org/protocol/muc#admin";
const MAM: &str = "urn:xmpp:mam:2";
const ROOM: &str = "lounge@conference.localhost";

fn codes(p: &Element) -> Vec<String> {
    p.get_child("x", USER)
        .map(|x| {
            x.elements()
                .filter(|e| e.name == "status")
                .filter_map(|e| e.get_attr("code").map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

fn condition(e: &Element) -> String {
    tests::client::stanza_error(e).unwrap_or_else(|| show(e))
}

/// Joins `room` as `nick`; the self-presence (status 110), or the error.
async fn join_with(c: &mut Client, room: &str, nick: &str, x: Element) -> Result<Element, String> {
    let to = format!("{room}/{nick}");
    c.send(
        &Element::new("presence", ns::CLIENT)
            .attr("to", to.as_str())
            .child(x),
    )
    .await
    .unwrap();
    let p = c
        .recv_until(
            |e| {
                e.name == "presence"
                    && e.get_attr("from") == Some(to.as_str())
                    && (codes(e).contains(&"110".to_owned()) || e.get_attr("type") == Some("error"))
            },
            WAIT,
        )
        .await
        .map_err(|e| e.to_string())?;
    if p.get_attr("type") == Some("error") {
        return Err(condition(&p));
    }
    Ok(p)
}

async fn join(c: &mut Client, room: &str, nick: &str) -> Element {
    join_with(c, room, nick, Element::new("x", MUC))
        .await
        .expect("joined")
}

/// The subject message that ends a welcome.
async fn subject(c: &mut Client) -> Option<String> {
    let m = c
        .recv_until(
            |e| e.name == "message" && e.get_child("subject", ns::CLIENT).is_some(),
            WAIT,
        )
        .await
        .expect("the subject");
    m.child_text("subject", ns::CLIENT)
        .filter(|s| !s.is_empty())
}

async fn groupchat(c: &mut Client, room: &str, text: &str) {
    let m = Element::new("message", ns::CLIENT)
        .attr("to", room)
        .attr("type", "groupchat")
        .attr("id", c.id())
        .child(Element::new("body", ns::CLIENT).text(text));
    c.send(&m).await.unwrap();
}

async fn recv_groupchat(c: &mut Client, text: &str) -> Element {
    c.recv_until(
        |e| {
            e.name == "message"
                && e.get_attr("type") == Some("groupchat")
                && body(e).as_deref() == Some(text)
        },
        WAIT,
    )
    .await
    .unwrap_or_else(|e| panic!("{} did not get {text:?}: {e}", c.full_jid()))
}

async fn configure(c: &mut Client, room: &str, fields: &[(&str, &str)]) -> Element {
    let fields = fields
        .iter()
        .map(|(var, v)| Field::new(var, "text-single").value(*v))
        .collect();
    let x = forms::build(
        "submit",
        Some("http://jabber.org/protocol/muc#roomconfig"),
        fields,
    );
    let iq = c.make_iq("set", Some(room), Element::new("query", OWNER).child(x));
    c.iq(iq).await.unwrap()
}

async fn admin(c: &mut Client, room: &str, item: Element) -> Element {
    let iq = c.make_iq("set", Some(room), Element::new("query", ADMIN).child(item));
    c.iq(iq).await.unwrap()
}

#[tokio::test]
async fn a_room_is_created_configured_joined_and_chatted_in() {
    let node = TestNode::with_users(&["alice", "bob", "carol"], PW).unwrap();
    let mut alice = Client::login_bound(&node, "alice", PW, "a").await.unwrap();
    let mut bob = Client::login_bound(&node, "bob", PW, "b").await.unwrap();
    let mut carol = Client::login_bound(&node, "carol", PW, "c").await.unwrap();

    // The service is discoverable from the server (XEP-0045 §6.1).
    let iq = alice.make_iq(
        "get",
        Some("localhost"),
        Element::new("query", ns::DISCO_ITEMS),
    );
    let items = alice.iq(iq).await.unwrap();
    assert!(
        show(&items).contains("conference.localhost"),
        "{}",
        show(&items)
    );

    // Creating: 201 and 110, owner, moderator.
    let me = join(&mut alice, ROOM, "Alice").await;
    let c = codes(&me);
    assert!(
        c.contains(&"201".into()) && c.contains(&"110".into()),
        "{}",
        show(&me)
    );
    let item = me
        .get_child("x", USER)
        .and_then(|x| x.get_child("item", USER))
        .expect("item");
    assert_eq!(item.get_attr("affiliation"), Some("owner"));
    assert_eq!(item.get_attr("role"), Some("moderator"));
    assert_eq!(subject(&mut alice).await, None);

    // Configured through the form: a name, persistent, listed.
    let iq = alice.make_iq("get", Some(ROOM), Element::new("query", OWNER));
    let form = alice.iq(iq).await.unwrap();
    assert!(
        show(&form).contains("muc#roomconfig_persistentroom"),
        "{}",
        show(&form)
    );
    let r = configure(
        &mut alice,
        ROOM,
        &[
            ("muc#roomconfig_roomname", "The Lounge"),
            ("muc#roomconfig_persistentroom", "1"),
        ],
    )
    .await;
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    let iq = bob.make_iq(
        "get",
        Some("conference.localhost"),
        Element::new("query", ns::DISCO_ITEMS),
    );
    let rooms = bob.iq(iq).await.unwrap();
    assert!(show(&rooms).contains("The Lounge"), "{}", show(&rooms));
    let iq = bob.make_iq("get", Some(ROOM), Element::new("query", ns::DISCO_INFO));
    let info = bob.iq(iq).await.unwrap();
    assert!(
        show(&info).contains("muc_persistent") && show(&info).contains("muc#roominfo"),
        "{}",
        show(&info)
    );

    // Bob joins: he sees alice, alice sees him.
    join(&mut bob, ROOM, "Bob").await;
    let p = bob
        .recv_until(
            |e| e.get_attr("from") == Some(&format!("{ROOM}/Alice")),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(p.name, "presence");
    alice
        .recv_until(|e| e.get_attr("from") == Some(&format!("{ROOM}/Bob")), WAIT)
        .await
        .unwrap();

    // The subject, then messages reflected to everyone, the sender too.
    let subj = Element::new("message", ns::CLIENT)
        .attr("to", ROOM)
        .attr("type", "groupchat")
        .child(Element::new("subject", ns::CLIENT).text("Tea at five"));
    alice.send(&subj).await.unwrap();
    for c in [&mut alice, &mut bob] {
        c.recv_until(
            |e| e.child_text("subject", ns::CLIENT).as_deref() == Some("Tea at five"),
            WAIT,
        )
        .await
        .unwrap();
    }
    for i in 1..=4 {
        groupchat(&mut bob, ROOM, &format!("hello {i}")).await;
        for c in [&mut alice, &mut bob] {
            let m = recv_groupchat(c, &format!("hello {i}")).await;
            assert_eq!(m.get_attr("from"), Some(format!("{ROOM}/Bob").as_str()));
            let sid = m
                .get_child("stanza-id", "urn:xmpp:sid:0")
                .expect("a stanza id");
            assert_eq!(sid.get_attr("by"), Some(ROOM));
            assert!(
                m.get_child("occupant-id", "urn:xmpp:occupant-id:0")
                    .is_some(),
                "{}",
                show(&m)
            );
        }
    }

    // Carol joins asking for two messages of history: they come with
    // <delay/>, then the subject.
    let x = Element::new("x", MUC).child(Element::new("history", MUC).attr("maxstanzas", "2"));
    join_with(&mut carol, ROOM, "Carol", x).await.unwrap();
    let h1 = recv_groupchat(&mut carol, "hello 3").await;
    assert!(
        h1.get_child("delay", "urn:xmpp:delay").is_some(),
        "{}",
        show(&h1)
    );
    recv_groupchat(&mut carol, "hello 4").await;
    assert_eq!(subject(&mut carol).await.as_deref(), Some("Tea at five"));
    assert!(carol
        .take_pending()
        .iter()
        .all(|e| body(e).as_deref() != Some("hello 2")));

    // A private message between occupants.
    let pm = Element::new("message", ns::CLIENT)
        .attr("to", format!("{ROOM}/Bob"))
        .attr("type", "chat")
        .child(Element::new("body", ns::CLIENT).text("psst"));
    carol.send(&pm).await.unwrap();
    let got = bob
        .recv_until(|e| body(e).as_deref() == Some("psst"), WAIT)
        .await
        .unwrap();
    assert_eq!(got.get_attr("from"), Some(format!("{ROOM}/Carol").as_str()));

    // A nick in use by someone else is refused.
    let e = join_with(&mut carol, ROOM, "Bob", Element::new("x", MUC)).await;
    assert_eq!(e.err().as_deref(), Some("conflict"));

    // Self-ping (XEP-0410) while joined, and after leaving.
    let ping = |c: &mut Client, nick: &str| {
        c.make_iq(
            "get",
            Some(&format!("{ROOM}/{nick}")),
            Element::new("ping", ns::PING),
        )
    };
    let iq = ping(&mut carol, "Carol");
    assert_eq!(carol.iq(iq).await.unwrap().get_attr("type"), Some("result"));
    carol
        .send(
            &Element::new("presence", ns::CLIENT)
                .attr("to", format!("{ROOM}/Carol"))
                .attr("type", "unavailable"),
        )
        .await
        .unwrap();
    carol
        .recv_until(
            |e| e.get_attr("type") == Some("unavailable") && codes(e).contains(&"110".into()),
            WAIT,
        )
        .await
        .unwrap();
    let iq = ping(&mut carol, "Carol");
    assert_eq!(condition(&carol.iq(iq).await.unwrap()), "not-acceptable");

    // The room's archive, paged (XEP-0313 on the room JID).
    let q = Element::new("query", MAM).attr("queryid", "r").child(
        Element::new("set", "http://jabber.org/protocol/rsm")
            .child(Element::new("max", "http://jabber.org/protocol/rsm").text("3")),
    );
    let iq = bob.make_iq("set", Some(ROOM), q);
    let fin = bob.iq(iq).await.unwrap();
    assert_eq!(fin.get_attr("type"), Some("result"), "{}", show(&fin));
    let bodies: Vec<String> = bob
        .take_pending()
        .iter()
        .filter_map(|m| {
            m.get_child("result", MAM)
                .and_then(|r| r.get_child("forwarded", "urn:xmpp:forward:0"))
                .and_then(|f| f.get_child("message", ns::CLIENT))
                .and_then(body)
        })
        .collect();
    assert_eq!(bodies, ["hello 1", "hello 2", "hello 3"]);
}

#[tokio::test]
async fn members_only_passwords_kicks_and_bans() {
    let node = TestNode::with_users(&["alice", "bob", "mallory"], PW).unwrap();
    let mut alice = Client::login_bound(&node, "alice", PW, "a").await.unwrap();
    let mut bob = Client::login_bound(&node, "bob", PW, "b").await.unwrap();
    let mut mallory = Client::login_bound(&node, "mallory", PW, "m")
        .await
        .unwrap();
    let club = "club@conference.localhost";
    join(&mut alice, club, "Alice").await;
    let r = configure(
        &mut alice,
        club,
        &[
            ("muc#roomconfig_membersonly", "1"),
            ("muc#roomconfig_persistentroom", "1"),
        ],
    )
    .await;
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    assert_eq!(
        join_with(&mut mallory, club, "M", Element::new("x", MUC))
            .await
            .err()
            .as_deref(),
        Some("registration-required")
    );
    let r = admin(
        &mut alice,
        club,
        Element::new("item", ADMIN)
            .attr("jid", "bob@localhost")
            .attr("affiliation", "member"),
    )
    .await;
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    join(&mut bob, club, "Bob").await;

    // A password room.
    let vault = "vault@conference.localhost";
    join(&mut alice, vault, "Alice").await;
    let r = configure(
        &mut alice,
        vault,
        &[
            ("muc#roomconfig_passwordprotectedroom", "1"),
            ("muc#roomconfig_roomsecret", "sesame"),
        ],
    )
    .await;
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    let wrong = Element::new("x", MUC).child(Element::new("password", MUC).text("open up"));
    assert_eq!(
        join_with(&mut mallory, vault, "M", wrong)
            .await
            .err()
            .as_deref(),
        Some("not-authorized")
    );
    let right = Element::new("x", MUC).child(Element::new("password", MUC).text("sesame"));
    join_with(&mut mallory, vault, "M", right)
        .await
        .expect("the password opens it");

    // Kick (role none, 307): everyone sees it, the kicked one too.
    let r = admin(
        &mut alice,
        vault,
        Element::new("item", ADMIN)
            .attr("nick", "M")
            .attr("role", "none"),
    )
    .await;
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    let p = mallory
        .recv_until(
            |e| e.get_attr("type") == Some("unavailable") && codes(e).contains(&"307".into()),
            WAIT,
        )
        .await
        .unwrap();
    assert!(codes(&p).contains(&"110".into()));
    alice
        .recv_until(
            |e| {
                e.get_attr("from") == Some(&format!("{vault}/M"))
                    && codes(e).contains(&"307".into())
            },
            WAIT,
        )
        .await
        .unwrap();
    // A participant may not kick.
    let right = Element::new("x", MUC).child(Element::new("password", MUC).text("sesame"));
    join_with(&mut mallory, vault, "M", right).await.unwrap();
    let r = admin(
        &mut mallory,
        vault,
        Element::new("item", ADMIN)
            .attr("nick", "Alice")
            .attr("role", "none"),
    )
    .await;
    assert_eq!(condition(&r), "forbidden");
    // Ban (outcast, 301), and the ban holds.
    let r = admin(
        &mut alice,
        vault,
        Element::new("item", ADMIN)
            .attr("jid", "mallory@localhost")
            .attr("affiliation", "outcast"),
    )
    .await;
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    mallory
        .recv_until(
            |e| e.get_attr("type") == Some("unavailable") && codes(e).contains(&"301".into()),
            WAIT,
        )
        .await
        .unwrap();
    let right = Element::new("x", MUC).child(Element::new("password", MUC).text("sesame"));
    assert_eq!(
        join_with(&mut mallory, vault, "M", right)
            .await
            .err()
            .as_deref(),
        Some("forbidden")
    );

    // A vanished session leaves its rooms (333), and a destroyed room
    // tells its occupants where to go.
    drop(bob);
    alice
        .recv_until(
            |e| {
                e.get_attr("from") == Some(&format!("{club}/Bob"))
                    && e.get_attr("type") == Some("unavailable")
            },
            Duration::from_secs(10),
        )
        .await
        .unwrap();
    let destroy = Element::new("query", OWNER).child(
        Element::new("destroy", OWNER)
            .attr("jid", "elsewhere@conference.localhost")
            .child(Element::new("reason", OWNER).text("moving")),
    );
    let iq = alice.make_iq("set", Some(club), destroy);
    assert_eq!(alice.iq(iq).await.unwrap().get_attr("type"), Some("result"));
    let gone = alice
        .recv_until(
            |e| {
                e.get_attr("from") == Some(&format!("{club}/Alice"))
                    && e.get_attr("type") == Some("unavailable")
            },
            WAIT,
        )
        .await
        .unwrap();
    assert!(
        show(&gone).contains("elsewhere@conference.localhost"),
        "{}",
        show(&gone)
    );
    let iq = alice.make_iq("get", Some(club), Element::new("query", ns::DISCO_INFO));
    assert_eq!(condition(&alice.iq(iq).await.unwrap()), "item-not-found");
}

#[tokio::test]
async fn messages_are_retracted_by_their_author_or_a_moderator() {
    const RETRACT: &str = "urn:xmpp:message-retract:1";
    const MODERATE: &str = "urn:xmpp:message-moderate:1";
    let node = TestNode::with_users(&["alice", "bob", "carol"], PW).unwrap();
    let mut alice = Client::login_bound(&node, "alice", PW, "a").await.unwrap();
    let mut bob = Client::login_bound(&node, "bob", PW, "b").await.unwrap();
    let mut carol = Client::login_bound(&node, "carol", PW, "c").await.unwrap();
    let room = "talk@conference.localhost";
    join(&mut alice, room, "Alice").await;
    join(&mut bob, room, "Bob").await;
    join(&mut carol, room, "Carol").await;
    let mut ids = Vec::new();
    for text in ["spam", "typo", "fine"] {
        groupchat(&mut bob, room, text).await;
        let m = recv_groupchat(&mut alice, text).await;
        recv_groupchat(&mut carol, text).await;
        let sid = m
            .get_child("stanza-id", "urn:xmpp:sid:0")
            .and_then(|s| s.get_attr("id"))
            .expect("id");
        ids.push(sid.to_owned());
    }
    // A moderator (the owner) retracts "spam": everyone is told who did.
    let moderate = Element::new("moderate", MODERATE)
        .attr("id", ids[0].as_str())
        .child(Element::new("retract", RETRACT))
        .child(Element::new("reason", MODERATE).text("spam"));
    let iq = alice.make_iq("set", Some(room), moderate);
    let r = alice.iq(iq).await.unwrap();
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    for c in [&mut bob, &mut carol] {
        let m = c
            .recv_until(
                |e| {
                    e.get_child("retract", RETRACT)
                        .is_some_and(|r| r.get_attr("id") == Some(ids[0].as_str()))
                },
                WAIT,
            )
            .await
            .unwrap();
        let by = m
            .get_child("retract", RETRACT)
            .and_then(|r| r.get_child("moderated", MODERATE))
            .and_then(|md| md.get_attr("by"));
        assert_eq!(by, Some(format!("{room}/Alice").as_str()), "{}", show(&m));
    }
    // A participant cannot moderate; nor retract someone else's message.
    let moderate = Element::new("moderate", MODERATE)
        .attr("id", ids[2].as_str())
        .child(Element::new("retract", RETRACT));
    let iq = carol.make_iq("set", Some(room), moderate);
    assert_eq!(condition(&carol.iq(iq).await.unwrap()), "forbidden");
    let not_mine = Element::new("message", ns::CLIENT)
        .attr("to", room)
        .attr("type", "groupchat")
        .child(Element::new("retract", RETRACT).attr("id", ids[2].as_str()));
    carol.send(&not_mine).await.unwrap();
    let err = carol
        .recv_until(|e| e.get_attr("type") == Some("error"), WAIT)
        .await
        .unwrap();
    assert_eq!(condition(&err), "forbidden");
    // The author takes back "typo" (XEP-0424).
    let mine = Element::new("message", ns::CLIENT)
        .attr("to", room)
        .attr("type", "groupchat")
        .child(Element::new("retract", RETRACT).attr("id", ids[1].as_str()));
    bob.send(&mine).await.unwrap();
    alice
        .recv_until(
            |e| {
                e.get_child("retract", RETRACT)
                    .is_some_and(|r| r.get_attr("id") == Some(ids[1].as_str()))
            },
            WAIT,
        )
        .await
        .unwrap();
    // The archive keeps tombstones where the two were.
    let iq = carol.make_iq(
        "set",
        Some(room),
        Element::new("query", MAM).attr("queryid", "q"),
    );
    let fin = carol.iq(iq).await.unwrap();
    assert_eq!(fin.get_attr("type"), Some("result"), "{}", show(&fin));
    let inner: Vec<Element> = carol
        .take_pending()
        .into_iter()
        .filter_map(|m| {
            m.get_child("result", MAM)
                .and_then(|r| r.get_child("forwarded", "urn:xmpp:forward:0"))
                .and_then(|f| f.get_child("message", ns::CLIENT))
                .cloned()
        })
        .collect();
    assert_eq!(inner.len(), 3, "{inner:?}");
    assert!(inner[0].get_child("retracted", RETRACT).is_some() && body(&inner[0]).is_none());
    assert!(inner[1].get_child("retracted", RETRACT).is_some() && body(&inner[1]).is_none());
    assert_eq!(body(&inner[2]).as_deref(), Some("fine"));
}

#[tokio::test]
async fn rooms_per_user_and_message_rate_are_limited() {
    let node = TestNode::start_with(tests::node::NodeOptions {
        extra_config:
            "[muc]\nmax_rooms_per_user = 1\nmessages_per_second = 0.5\nmessage_burst = 2\n".into(),
        ..Default::default()
    })
    .unwrap();
    node.adduser("alice", PW).unwrap();
    let mut alice = Client::login_bound(&node, "alice", PW, "a").await.unwrap();
    join(&mut alice, "one@conference.localhost", "A").await;
    let e = join_with(
        &mut alice,
        "two@conference.localhost",
        "A",
        Element::new("x", MUC),
    )
    .await;
    assert_eq!(e.err().as_deref(), Some("not-allowed"));
    for text in ["1", "2", "3"] {
        groupchat(&mut alice, "one@conference.localhost", text).await;
    }
    recv_groupchat(&mut alice, "1").await;
    recv_groupchat(&mut alice, "2").await;
    let err = alice
        .recv_until(|e| e.get_attr("type") == Some("error"), WAIT)
        .await
        .unwrap();
    assert_eq!(condition(&err), "resource-constraint");
}

#[tokio::test]
async fn an_emptied_temporary_room_and_a_deleted_owner_leave_nothing_behind() {
    let node = TestNode::with_users(&["alice", "bob"], PW).unwrap();
    let mut alice = Client::login_bound(&node, "alice", PW, "a").await.unwrap();
    let room = "pop-up@conference.localhost";
    join(&mut alice, room, "A").await;
    groupchat(&mut alice, room, "before").await;
    recv_groupchat(&mut alice, "before").await;
    alice
        .send(
            &Element::new("presence", ns::CLIENT)
                .attr("to", format!("{room}/A"))
                .attr("type", "unavailable"),
        )
        .await
        .unwrap();
    alice
        .recv_until(|e| e.get_attr("type") == Some("unavailable"), WAIT)
        .await
        .unwrap();
    // Gone with its last occupant: joining makes it anew, with no history.
    let me = join(&mut alice, room, "A").await;
    assert!(codes(&me).contains(&"201".into()), "{}", show(&me));
    subject(&mut alice).await;
    assert!(alice.take_pending().iter().all(|e| body(e).is_none()));

    // A persistent room outlives its owner's account, but a new account
    // of the same name does not own it.
    let keep = "keep@conference.localhost";
    join(&mut alice, keep, "A").await;
    let r = configure(&mut alice, keep, &[("muc#roomconfig_persistentroom", "1")]).await;
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    drop(alice);
    node.clusterctl(&["deluser", "alice@localhost"])
        .expect("deluser");
    node.adduser("alice", PW).expect("again");
    let mut again = Client::login_bound(&node, "alice", PW, "a").await.unwrap();
    let iq = again.make_iq("get", Some(keep), Element::new("query", OWNER));
    assert_eq!(condition(&again.iq(iq).await.unwrap()), "forbidden");
}
