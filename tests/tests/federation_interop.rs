//! Federation with real servers nobody here wrote, both from Debian and
//! installed by `.ci/run`: Prosody 0.12 and ejabberd 23.01. Our user and
//! theirs become contacts, see each other's presence and exchange messages
//! in both directions, over STARTTLS with self-signed certificates on both
//! sides, so the domains authenticate with Server Dialback (XEP-0220) each
//! way: the peer checks our keys by connecting back to us, we check its
//! keys by connecting to it.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tests::client::{body, Client, Mechanism};
use tests::ejabberd::Ejabberd;
use tests::node::{fresh_ip, NodeOptions, TestNode};
use tests::prosody::Prosody;
use xmpp::element::Element;
use xmpp::sasl::HashAlg;
use xmpp::stanza::ns;

const PW: &str = "secret";
/// The first stanza waits for both s2s streams and their dialback.
const FED_WAIT: Duration = Duration::from_secs(30);

fn is_presence(e: &Element, ptype: Option<&str>, from_prefix: &str) -> bool {
    e.name == "presence"
        && e.get_attr("type") == ptype
        && e.get_attr("from")
            .is_some_and(|f| f.starts_with(from_prefix))
}

fn presence(to: &str, ptype: &str) -> Element {
    Element::new("presence", ns::CLIENT)
        .attr("to", to)
        .attr("type", ptype)
}

/// Our node for `ours.test`, on port 5269 of `ip` (where the peer's
/// resolver sends it), not started yet.
fn our_node(ip: Ipv4Addr) -> TestNode {
    TestNode::create(NodeOptions {
        vhosts: vec!["ours.test".into()],
        ip: Some(ip),
        s2s_addr: Some(SocketAddr::new(ip.into(), 5269)),
        ..Default::default()
    })
    .expect("our config")
}

/// alice@ours.test and `peer_user` (logged in at the peer) become
/// contacts both ways, see each other and chat both ways.
async fn contacts_and_chat(
    ours: &TestNode,
    our_domain: &str,
    mut them: Client,
    peer_user: &str,
    peer_domain: &str,
    logs: impl Fn(&str) -> String,
) {
    let pat = format!("{peer_user}@{peer_domain}");
    let alice_bare = format!("alice@{our_domain}");
    let alice_full = format!("{alice_bare}/home");
    let mut alice = Client::login_bound(ours, "alice", PW, "home")
        .await
        .expect("alice");
    alice.presence(5).await.expect("alice online");
    them.presence(5).await.expect("peer user online");
    let fail = |e: anyhow::Error| -> ! { panic!("{}", logs(&e.to_string())) };

    // Ours → theirs: alice asks, they approve.
    alice
        .send(&presence(&pat, "subscribe"))
        .await
        .expect("subscribe");
    them.recv_until(|e| is_presence(e, Some("subscribe"), &alice_bare), FED_WAIT)
        .await
        .unwrap_or_else(|e| fail(e));
    them.send(&presence(&alice_bare, "subscribed"))
        .await
        .expect("subscribed");
    alice
        .recv_until(|e| is_presence(e, Some("subscribed"), &pat), FED_WAIT)
        .await
        .unwrap_or_else(|e| fail(e));
    alice
        .recv_until(|e| is_presence(e, None, &format!("{pat}/laptop")), FED_WAIT)
        .await
        .unwrap_or_else(|e| fail(e));

    // Theirs → ours: they ask, alice approves; they see alice.
    them.send(&presence(&alice_bare, "subscribe"))
        .await
        .expect("subscribe back");
    alice
        .recv_until(|e| is_presence(e, Some("subscribe"), &pat), FED_WAIT)
        .await
        .unwrap_or_else(|e| fail(e));
    alice
        .send(&presence(&pat, "subscribed"))
        .await
        .expect("approve");
    them.recv_until(|e| is_presence(e, None, &alice_full), FED_WAIT)
        .await
        .unwrap_or_else(|e| fail(e));

    // Messages both ways.
    alice.chat(&pat, "hi from ours").await.expect("chat");
    let m = them
        .recv_message(FED_WAIT)
        .await
        .unwrap_or_else(|e| fail(e));
    assert_eq!(body(&m).as_deref(), Some("hi from ours"));
    assert_eq!(m.get_attr("from"), Some(alice_full.as_str()));
    them.chat(&alice_bare, "hi back").await.expect("chat back");
    let m = alice
        .recv_message(FED_WAIT)
        .await
        .unwrap_or_else(|e| fail(e));
    assert_eq!(body(&m).as_deref(), Some("hi back"));
    assert_eq!(
        m.get_attr("from").map(|f| f.to_owned()),
        Some(format!("{pat}/laptop"))
    );

    // A ping to their server, answered by it.
    let ping = alice.make_iq("get", Some(peer_domain), Element::new("ping", ns::PING));
    let pong = alice.iq(ping).await.expect("ping");
    assert_eq!(
        pong.get_attr("type"),
        Some("result"),
        "{}",
        pong.to_string_in(ns::CLIENT)
    );

    // Our side of it: both directions up, authenticated by dialback.
    let status = ours.clusterctl(&["s2s"]).expect("clusterctl s2s");
    for direction in ["outbound", "inbound"] {
        assert!(
            status.lines().any(|l| l.contains(peer_domain)
                && l.contains(direction)
                && l.contains("dialback")),
            "{status}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_and_we_become_contacts_and_chat_both_ways() {
    let (our_ip, their_ip) = (fresh_ip(), fresh_ip());
    let mut ours = our_node(our_ip);
    let prosody =
        Prosody::start("pros.test", their_ip, &[("ours.test", our_ip)]).expect("prosody starts");
    ours.append_config(&format!(
        "[s2s.routes]\n\"pros.test\" = [\"{}\"]\n",
        prosody.s2s
    ))
    .expect("route");
    ours.start_again().expect("our node starts");
    ours.adduser("alice", PW).expect("alice");
    prosody.register("pat", PW).expect("pat");
    let mut pat = Client::connect_starttls(prosody.c2s, "pros.test")
        .await
        .expect("pat connects");
    pat.login("pat", PW, Mechanism::Plain)
        .await
        .expect("pat logs in");
    pat.bind(Some("laptop")).await.expect("pat binds");
    let logs = |what: &str| {
        format!(
            "{what}\n--- our node ---\n{}\n--- prosody ---\n{}",
            ours.log(),
            prosody.log()
        )
    };
    contacts_and_chat(&ours, "ours.test", pat, "pat", "pros.test", logs).await;
}

/// ejabberd finds a peer's address through the system resolver only (its
/// SRV lookups go to [`tests::dns::Dns`]): `.ci/run` puts this name and
/// address, used by no other test, into /etc/hosts.
const EJ_PEER: (&str, [u8; 4]) = ("ours-ej.test", [127, 0, 77, 1]);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_and_we_become_contacts_and_chat_both_ways() {
    let (domain, ip) = (EJ_PEER.0, Ipv4Addr::from(EJ_PEER.1));
    let hosts = std::fs::read_to_string("/etc/hosts").unwrap_or_default();
    assert!(
        hosts
            .lines()
            .any(|l| l.split_whitespace().collect::<Vec<_>>() == [ip.to_string().as_str(), domain]),
        "/etc/hosts lacks `{ip} {domain}`: run the tests through .ci/run, which adds it"
    );
    let mut ours = TestNode::create(NodeOptions {
        vhosts: vec![domain.into()],
        ip: Some(ip),
        s2s_addr: Some(SocketAddr::new(ip.into(), 5269)),
        ..Default::default()
    })
    .expect("our config");
    let ejabberd =
        Ejabberd::start("ej.test", fresh_ip(), &[(domain, ip)]).expect("ejabberd starts");
    ours.append_config(&format!(
        "[s2s.routes]\n\"ej.test\" = [\"{}\"]\n",
        ejabberd.s2s
    ))
    .expect("route");
    ours.start_again().expect("our node starts");
    ours.adduser("alice", PW).expect("alice");
    ejabberd.register("eve", PW).expect("eve");
    let mut eve = Client::connect_starttls(ejabberd.c2s, "ej.test")
        .await
        .expect("eve connects");
    eve.login("eve", PW, Mechanism::Scram(HashAlg::Sha1))
        .await
        .expect("eve logs in");
    eve.bind(Some("laptop")).await.expect("eve binds");
    let logs = |what: &str| {
        format!(
            "{what}\n--- our node ---\n{}\n--- ejabberd ---\n{}",
            ours.log(),
            ejabberd.log()
        )
    };
    contacts_and_chat(&ours, domain, eve, "eve", "ej.test", logs).await;
}
