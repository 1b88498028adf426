//! The small XEPs clients ask for, end to end against the real binary:
//! entity time (XEP-0202), last activity (XEP-0012), external services
//! with TURN credentials (XEP-0215), contact addresses (XEP-0157) and
//! service administration over ad-hoc commands (XEP-0133/XEP-0050).

use tests::client::{body, Client, WAIT};
use tests::node::{NodeOptions, TestNode};
use xmpp::element::Element;
use xmpp::forms::{self, Field};
use xmpp::stanza::ns;

const PW: &str = "secret";
const COMMANDS: &str = "http://jabber.org/protocol/commands";

fn show(e: &Element) -> String {
    e.to_string_in(ns::CLIENT)
}

fn condition(reply: &Element) -> String {
    tests::client::stanza_error(reply).unwrap_or_else(|| show(reply))
}

fn node_with(extra: &str, users: &[&str]) -> TestNode {
    let node = TestNode::start_with(NodeOptions {
        extra_config: extra.into(),
        ..NodeOptions::default()
    })
    .expect("node starts");
    for u in users {
        node.adduser(u, PW).expect("adduser");
    }
    node
}

#[tokio::test]
async fn entity_time_and_server_uptime() {
    let node = node_with("", &["alice"]);
    let mut alice = Client::login_bound(&node, "alice", PW, "r").await.unwrap();
    let iq = alice.make_iq(
        "get",
        Some("localhost"),
        Element::new("time", "urn:xmpp:time"),
    );
    let r = alice.iq(iq).await.unwrap();
    let t = r.get_child("time", "urn:xmpp:time").expect("time");
    assert_eq!(
        t.child_text("tzo", "urn:xmpp:time").as_deref(),
        Some("+00:00")
    );
    let utc = t.child_text("utc", "urn:xmpp:time").expect("utc");
    assert!(utc.ends_with('Z') && utc.len() >= 20, "{utc}");
    let iq = alice.make_iq(
        "get",
        Some("localhost"),
        Element::new("query", "jabber:iq:last"),
    );
    let r = alice.iq(iq).await.unwrap();
    let secs: u64 = r
        .get_child("query", "jabber:iq:last")
        .and_then(|q| q.get_attr("seconds"))
        .and_then(|s| s.parse().ok())
        .expect("seconds");
    assert!(secs < 3600, "{secs}");
}

#[tokio::test]
async fn last_activity_of_a_contact_is_for_subscribers_only() {
    let node = node_with("", &["alice", "carol", "dave"]);
    let mut alice = Client::login_bound(&node, "alice", PW, "r").await.unwrap();
    alice.presence(0).await.unwrap();
    let mut carol = Client::login_bound(&node, "carol", PW, "r").await.unwrap();
    carol.presence(0).await.unwrap();
    let mut dave = Client::login_bound(&node, "dave", PW, "r").await.unwrap();
    // Carol subscribes to alice.
    carol
        .send(
            &Element::new("presence", ns::CLIENT)
                .attr("to", "alice@localhost")
                .attr("type", "subscribe"),
        )
        .await
        .unwrap();
    alice
        .recv_until(|e| e.get_attr("type") == Some("subscribe"), WAIT)
        .await
        .unwrap();
    alice
        .send(
            &Element::new("presence", ns::CLIENT)
                .attr("to", "carol@localhost")
                .attr("type", "subscribed"),
        )
        .await
        .unwrap();
    alice.sync().await.unwrap();
    carol.sync().await.unwrap();
    let last = |c: &mut Client| {
        c.make_iq(
            "get",
            Some("alice@localhost"),
            Element::new("query", "jabber:iq:last"),
        )
    };
    // Online: zero seconds (§4).
    let iq = last(&mut carol);
    let r = carol.iq(iq).await.unwrap();
    assert_eq!(
        r.get_child("query", "jabber:iq:last")
            .and_then(|q| q.get_attr("seconds")),
        Some("0"),
        "{}",
        show(&r)
    );
    // Alice leaves with a status; carol learns when, and the status.
    let bye = Element::new("presence", ns::CLIENT)
        .attr("type", "unavailable")
        .child(Element::new("status", ns::CLIENT).text("gone fishing"));
    alice.send(&bye).await.unwrap();
    alice.sync().await.unwrap();
    drop(alice);
    carol
        .recv_until(
            |e| e.name == "presence" && e.get_attr("type") == Some("unavailable"),
            WAIT,
        )
        .await
        .unwrap();
    let iq = last(&mut carol);
    let r = carol.iq(iq).await.unwrap();
    let q = r.get_child("query", "jabber:iq:last").expect("query");
    let secs: u64 = q
        .get_attr("seconds")
        .and_then(|s| s.parse().ok())
        .expect("seconds");
    assert!(secs < 600, "{}", show(&r));
    assert_eq!(q.text_content(), "gone fishing");
    // Not a subscriber: not told.
    let iq = last(&mut dave);
    let r = dave.iq(iq).await.unwrap();
    assert_eq!(condition(&r), "forbidden");
}

#[tokio::test]
async fn turn_credentials_and_contact_addresses_come_from_the_config() {
    let extra = "\
[contact]
abuse = [\"mailto:abuse@localhost\"]
support = [\"xmpp:support@localhost\", \"https://localhost/help\"]

[[extdisco]]
type = \"stun\"
host = \"stun.localhost\"
port = 3478

[[extdisco]]
type = \"turn\"
host = \"turn.localhost\"
port = 3478
transport = \"udp\"
secret = \"north\"
ttl_secs = 3600
";
    let node = node_with(extra, &["alice"]);
    let mut alice = Client::login_bound(&node, "alice", PW, "r").await.unwrap();
    let iq = alice.make_iq(
        "get",
        Some("localhost"),
        Element::new("services", "urn:xmpp:extdisco:2"),
    );
    let r = alice.iq(iq).await.unwrap();
    let services: Vec<&Element> = r
        .get_child("services", "urn:xmpp:extdisco:2")
        .map(|s| s.elements().collect())
        .unwrap_or_default();
    assert_eq!(services.len(), 2, "{}", show(&r));
    assert_eq!(services[0].get_attr("type"), Some("stun"));
    assert_eq!(services[0].get_attr("username"), None);
    let turn = services[1];
    assert_eq!(turn.get_attr("host"), Some("turn.localhost"));
    let user = turn.get_attr("username").expect("a TURN user name");
    assert!(user.ends_with(":alice@localhost"), "{user}");
    assert!(turn.get_attr("password").is_some_and(|p| p.len() == 28));
    assert!(turn.get_attr("expires").is_some());
    // Only the kind asked for.
    let iq = alice.make_iq(
        "get",
        Some("localhost"),
        Element::new("services", "urn:xmpp:extdisco:2").attr("type", "turn"),
    );
    let r = alice.iq(iq).await.unwrap();
    let n = r
        .get_child("services", "urn:xmpp:extdisco:2")
        .map_or(0, |s| s.elements().count());
    assert_eq!(n, 1, "{}", show(&r));

    let iq = alice.make_iq(
        "get",
        Some("localhost"),
        Element::new("query", ns::DISCO_INFO),
    );
    let r = alice.iq(iq).await.unwrap();
    let form = r
        .get_child("query", ns::DISCO_INFO)
        .and_then(|q| q.get_child("x", forms::NS))
        .and_then(forms::Submitted::read)
        .expect("a serverinfo form");
    assert_eq!(
        form.form_type(),
        Some("http://jabber.org/network/serverinfo")
    );
    assert_eq!(form.values("abuse-addresses"), ["mailto:abuse@localhost"]);
    assert_eq!(
        form.values("support-addresses"),
        ["xmpp:support@localhost", "https://localhost/help"]
    );
}

async fn run_command(c: &mut Client, node: &str, fields: Vec<Field>) -> Element {
    let iq = c.make_iq(
        "set",
        Some("localhost"),
        Element::new("command", COMMANDS)
            .attr("node", node)
            .attr("action", "execute"),
    );
    let step1 = c.iq(iq).await.unwrap();
    let cmd = step1
        .get_child("command", COMMANDS)
        .unwrap_or_else(|| panic!("{}", show(&step1)));
    assert_eq!(cmd.get_attr("status"), Some("executing"));
    let sessionid = cmd.get_attr("sessionid").expect("sessionid").to_owned();
    assert!(cmd.get_child("x", forms::NS).is_some(), "a form to fill");
    let iq = c.make_iq(
        "set",
        Some("localhost"),
        Element::new("command", COMMANDS)
            .attr("node", node)
            .attr("sessionid", sessionid)
            .child(forms::build(
                "submit",
                Some("http://jabber.org/protocol/admin"),
                fields,
            )),
    );
    c.iq(iq).await.unwrap()
}

fn field(var: &str, values: &[&str]) -> Field {
    values
        .iter()
        .fold(Field::new(var, "text-single"), |f, v| f.value(*v))
}

#[tokio::test]
async fn administrators_manage_accounts_and_announce_with_ad_hoc_commands() {
    let node = node_with("admins = [\"admin@localhost\"]\n", &["admin", "bob"]);
    let mut admin = Client::login_bound(&node, "admin", PW, "r").await.unwrap();
    let mut bob = Client::login_bound(&node, "bob", PW, "r").await.unwrap();
    bob.presence(0).await.unwrap();
    let list = |c: &mut Client| {
        c.make_iq(
            "get",
            Some("localhost"),
            Element::new("query", ns::DISCO_ITEMS).attr("node", COMMANDS),
        )
    };
    let iq = list(&mut admin);
    let r = admin.iq(iq).await.unwrap();
    let nodes: Vec<&str> = r
        .get_child("query", ns::DISCO_ITEMS)
        .map(|q| q.elements().filter_map(|i| i.get_attr("node")).collect())
        .unwrap_or_default();
    assert!(
        nodes.contains(&"http://jabber.org/protocol/admin#add-user"),
        "{nodes:?}"
    );
    let iq = list(&mut bob);
    let r = bob.iq(iq).await.unwrap();
    assert_eq!(
        r.get_child("query", ns::DISCO_ITEMS)
            .map(|q| q.elements().count()),
        Some(0)
    );

    let add = "http://jabber.org/protocol/admin#add-user";
    let r = run_command(
        &mut admin,
        add,
        vec![
            field("accountjid", &["carol@localhost"]),
            field("password", &["pw-one"]),
            field("password-verify", &["pw-one"]),
        ],
    )
    .await;
    assert_eq!(
        r.get_child("command", COMMANDS)
            .and_then(|c| c.get_attr("status")),
        Some("completed"),
        "{}",
        show(&r)
    );
    Client::login_bound(&node, "carol", "pw-one", "r")
        .await
        .expect("carol logs in");

    let r = run_command(
        &mut admin,
        "http://jabber.org/protocol/admin#change-user-password",
        vec![
            field("accountjid", &["carol@localhost"]),
            field("password", &["pw-two"]),
        ],
    )
    .await;
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    Client::login_bound(&node, "carol", "pw-two", "r")
        .await
        .expect("new password");

    let r = run_command(
        &mut admin,
        "http://jabber.org/protocol/admin#announce",
        vec![
            field("subject", &["Maintenance"]),
            field("announcement", &["back at six"]),
        ],
    )
    .await;
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    let m = bob
        .recv_until(
            |e| e.name == "message" && e.get_attr("type") == Some("headline"),
            WAIT,
        )
        .await
        .unwrap();
    assert_eq!(body(&m).as_deref(), Some("back at six"));

    let r = run_command(
        &mut admin,
        "http://jabber.org/protocol/admin#delete-user",
        vec![field("accountjids", &["carol@localhost"])],
    )
    .await;
    assert_eq!(r.get_attr("type"), Some("result"), "{}", show(&r));
    assert!(Client::login_bound(&node, "carol", "pw-two", "r")
        .await
        .is_err());

    // Not an administrator.
    let iq = bob.make_iq(
        "set",
        Some("localhost"),
        Element::new("command", COMMANDS)
            .attr("node", add)
            .attr("action", "execute"),
    );
    let r = bob.iq(iq).await.unwrap();
    assert_eq!(condition(&r), "forbidden");
}
