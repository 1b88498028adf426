//! Federation (RFC 6120 s2s, XEP-0220 dialback) between two real
//! `xmpp-node` processes serving `a.test` and `b.test` on their own
//! loopback addresses, found through static routes (no DNS), plus raw
//! s2s peers that try what a hostile server would.

use std::time::Duration;

use tests::client::{body, stanza_error, Client};
use tests::node::{NodeOptions, TestNode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use xmpp::element::Element;
use xmpp::stanza::ns;

const PW: &str = "secret";
/// A first stanza to another domain waits for the s2s stream to be set up
/// (TCP, STARTTLS, dialback with a connection back): give it time.
const FED_WAIT: Duration = Duration::from_secs(20);

fn node(domain: &str) -> TestNode {
    TestNode::create(NodeOptions {
        vhosts: vec![domain.into()],
        ..Default::default()
    })
    .expect("node config")
}

fn route(to: &str, addr: impl std::fmt::Display) -> String {
    format!("[s2s.routes]\n\"{to}\" = [\"{addr}\"]\n")
}

/// `a.test` and `b.test`, each routed to the other, with alice and bob.
fn two_domains(extra_a: &str) -> (TestNode, TestNode) {
    let mut a = node("a.test");
    let mut b = node("b.test");
    a.append_config(&format!("{extra_a}{}", route("b.test", b.s2s)))
        .expect("config a");
    b.append_config(&route("a.test", a.s2s)).expect("config b");
    a.start_again().expect("a starts");
    b.start_again().expect("b starts");
    a.adduser("alice", PW).expect("alice");
    b.adduser("bob", PW).expect("bob");
    (a, b)
}

fn is_presence(e: &Element, ptype: Option<&str>, from_prefix: &str) -> bool {
    e.name == "presence"
        && e.get_attr("type") == ptype
        && e.get_attr("from")
            .is_some_and(|f| f.starts_with(from_prefix))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_domains_subscribe_see_presence_chat_and_ping() {
    let (a, b) = two_domains("");
    let mut alice = Client::login_bound(&a, "alice", PW, "home")
        .await
        .expect("alice");
    let mut bob = Client::login_bound(&b, "bob", PW, "work")
        .await
        .expect("bob");
    alice.presence(5).await.expect("alice online");
    bob.presence(5).await.expect("bob online");

    // RFC 6121 §3.1: alice asks, bob's server delivers, bob approves.
    alice
        .send(
            &Element::new("presence", ns::CLIENT)
                .attr("to", "bob@b.test")
                .attr("type", "subscribe"),
        )
        .await
        .expect("subscribe");
    let request = bob
        .recv_until(
            |e| is_presence(e, Some("subscribe"), "alice@a.test"),
            FED_WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\nnode a log:\n{}\nnode b log:\n{}", a.log(), b.log()));
    assert_eq!(request.get_attr("from"), Some("alice@a.test"));
    bob.send(
        &Element::new("presence", ns::CLIENT)
            .attr("to", "alice@a.test")
            .attr("type", "subscribed"),
    )
    .await
    .expect("subscribed");
    // The approval reaches alice, then bob's current presence follows (§3.1.5).
    alice
        .recv_until(
            |e| is_presence(e, Some("subscribed"), "bob@b.test"),
            FED_WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\nnode a log:\n{}\nnode b log:\n{}", a.log(), b.log()));
    alice
        .recv_until(|e| is_presence(e, None, "bob@b.test/work"), FED_WAIT)
        .await
        .expect("bob's presence reaches alice");

    // And the other way round: bob subscribes to alice.
    bob.send(
        &Element::new("presence", ns::CLIENT)
            .attr("to", "alice@a.test")
            .attr("type", "subscribe"),
    )
    .await
    .expect("subscribe back");
    alice
        .recv_until(
            |e| is_presence(e, Some("subscribe"), "bob@b.test"),
            FED_WAIT,
        )
        .await
        .expect("bob's request reaches alice");
    alice
        .send(
            &Element::new("presence", ns::CLIENT)
                .attr("to", "bob@b.test")
                .attr("type", "subscribed"),
        )
        .await
        .expect("approve");
    bob.recv_until(|e| is_presence(e, None, "alice@a.test/home"), FED_WAIT)
        .await
        .expect("alice's presence reaches bob");

    // Both rosters say `both`.
    for (c, contact) in [(&mut alice, "bob@b.test"), (&mut bob, "alice@a.test")] {
        let q = Element::new("query", ns::ROSTER);
        let iq = c.make_iq("get", None, q);
        let roster = c.iq(iq).await.expect("roster");
        let item = roster
            .get_child("query", ns::ROSTER)
            .and_then(|q| {
                q.elements()
                    .find(|i| i.get_attr("jid") == Some(contact))
                    .cloned()
            })
            .expect("the contact is in the roster");
        assert_eq!(
            item.get_attr("subscription"),
            Some("both"),
            "{}",
            item.to_string_in(ns::CLIENT)
        );
    }

    // A status change travels as a broadcast to the remote subscriber.
    alice
        .send(
            &Element::new("presence", ns::CLIENT)
                .child(Element::new("show", ns::CLIENT).text("away")),
        )
        .await
        .expect("away");
    let away = bob
        .recv_until(
            |e| {
                is_presence(e, None, "alice@a.test/home")
                    && e.child_text("show", ns::CLIENT).as_deref() == Some("away")
            },
            FED_WAIT,
        )
        .await
        .expect("alice's away reaches bob");
    assert_eq!(
        away.get_attr("to").map(|t| t.starts_with("bob@b.test")),
        Some(true)
    );

    // Messages both ways, full JID to bare JID.
    alice
        .chat("bob@b.test", "hello from a")
        .await
        .expect("chat");
    let m = bob.recv_message(FED_WAIT).await.expect("bob gets it");
    assert_eq!(body(&m).as_deref(), Some("hello from a"));
    assert_eq!(m.get_attr("from"), Some("alice@a.test/home"));
    bob.chat("alice@a.test/home", "hello from b")
        .await
        .expect("chat back");
    let m = alice.recv_message(FED_WAIT).await.expect("alice gets it");
    assert_eq!(body(&m).as_deref(), Some("hello from b"));
    assert_eq!(m.get_attr("from"), Some("bob@b.test/work"));

    // IQs across: a ping to the other server (answered by it), and a
    // disco#info to the other server that comes back with features.
    let ping = alice.make_iq("get", Some("b.test"), Element::new("ping", ns::PING));
    let pong = alice.iq(ping).await.expect("ping answered");
    assert_eq!(pong.get_attr("type"), Some("result"));
    assert_eq!(pong.get_attr("from"), Some("b.test"));
    let disco = bob.make_iq("get", Some("a.test"), Element::new("query", ns::DISCO_INFO));
    let info = bob.iq(disco).await.expect("disco answered");
    assert_eq!(
        info.get_attr("type"),
        Some("result"),
        "{}",
        info.to_string_in(ns::CLIENT)
    );
    assert!(info
        .get_child("query", ns::DISCO_INFO)
        .is_some_and(|q| q.elements().any(|f| f.get_attr("var") == Some(ns::PING))));

    // A message to a user who does not exist there comes back as an error
    // from the other server.
    alice.chat("nobody@b.test", "anyone?").await.expect("send");
    let err = alice
        .recv_until(
            |e| e.name == "message" && e.get_attr("type") == Some("error"),
            FED_WAIT,
        )
        .await
        .expect("bounced by b.test");
    assert_eq!(err.get_attr("from"), Some("nobody@b.test"));
    assert_eq!(stanza_error(&err).as_deref(), Some("service-unavailable"));

    // Going offline sends unavailable to the remote subscriber.
    alice
        .send(&Element::new("presence", ns::CLIENT).attr("type", "unavailable"))
        .await
        .expect("unavailable");
    bob.recv_until(
        |e| is_presence(e, Some("unavailable"), "alice@a.test/home"),
        FED_WAIT,
    )
    .await
    .expect("unavailable reaches bob");

    // Both sides used dialback, and each node lists its streams.
    let status = a.clusterctl(&["s2s"]).expect("clusterctl s2s");
    assert!(
        status.contains("b.test") && status.contains("dialback"),
        "{status}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_request_waits_for_an_offline_user() {
    let (a, b) = two_domains("");
    let mut alice = Client::login_bound(&a, "alice", PW, "home")
        .await
        .expect("alice");
    alice.presence(1).await.expect("online");
    alice
        .send(
            &Element::new("presence", ns::CLIENT)
                .attr("to", "bob@b.test")
                .attr("type", "subscribe"),
        )
        .await
        .expect("subscribe");
    // Wait until b.test stored it: alice's roster shows the pending ask.
    let deadline = std::time::Instant::now() + FED_WAIT;
    loop {
        let iq = alice.make_iq("get", None, Element::new("query", ns::ROSTER));
        let r = alice.iq(iq).await.expect("roster");
        if r.to_string_in(ns::CLIENT).contains("ask='subscribe'") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no pending ask");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Bob logs in later: the stored request comes with his initial presence.
    let mut bob = None;
    for _ in 0..100 {
        let mut c = Client::login_bound(&b, "bob", PW, "later")
            .await
            .expect("bob");
        c.presence(1).await.expect("online");
        match c
            .recv_until(
                |e| is_presence(e, Some("subscribe"), "alice@a.test"),
                Duration::from_secs(1),
            )
            .await
        {
            Ok(_) => {
                bob = Some(c);
                break;
            }
            // The request may still be on its way over s2s.
            Err(_) => c.close().await.expect("close"),
        }
    }
    assert!(bob.is_some(), "the request never reached bob\n{}", b.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_domain_bounces_with_remote_server_not_found() {
    // A port on a fresh loopback address with nothing listening.
    let ip = tests::node::fresh_ip();
    let closed = std::net::TcpListener::bind((ip, 0)).expect("bind");
    let dead = closed.local_addr().expect("addr");
    drop(closed);
    let mut a = node("a.test");
    a.append_config(&route("nowhere.test", dead))
        .expect("config");
    a.start_again().expect("start");
    a.adduser("alice", PW).expect("alice");
    let mut alice = Client::login_bound(&a, "alice", PW, "home")
        .await
        .expect("alice");
    alice
        .chat("someone@nowhere.test", "are you there?")
        .await
        .expect("send");
    let err = alice
        .recv_until(
            |e| e.name == "message" && e.get_attr("type") == Some("error"),
            FED_WAIT,
        )
        .await
        .expect("bounce");
    assert_eq!(err.get_attr("from"), Some("someone@nowhere.test"));
    assert_eq!(
        stanza_error(&err).as_deref(),
        Some("remote-server-not-found")
    );
    // An IQ gets its error too, at once while the domain is in backoff.
    let iq = alice.make_iq("get", Some("nowhere.test"), Element::new("ping", ns::PING));
    let answer = alice.iq(iq).await.expect("iq answered");
    assert_eq!(answer.get_attr("type"), Some("error"));
    assert_eq!(
        stanza_error(&answer).as_deref(),
        Some("remote-server-not-found")
    );
}

/// A raw s2s peer speaking plain TCP.
struct RawPeer {
    tcp: tokio::net::TcpStream,
    seen: String,
}

impl RawPeer {
    async fn connect(addr: std::net::SocketAddr) -> RawPeer {
        let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
        RawPeer {
            tcp,
            seen: String::new(),
        }
    }

    async fn send(&mut self, s: &str) {
        self.tcp.write_all(s.as_bytes()).await.expect("write");
    }

    /// Reads until `marker` has been received; returns everything so far.
    async fn until(&mut self, marker: &str) -> String {
        let deadline = tokio::time::Instant::now() + FED_WAIT;
        let mut buf = [0u8; 4096];
        while !self.seen.contains(marker) {
            let n = tokio::time::timeout_at(deadline, self.tcp.read(&mut buf))
                .await
                .unwrap_or_else(|_| panic!("no {marker:?} in {:?}", self.seen))
                .expect("read");
            if n == 0 {
                break;
            }
            self.seen.push_str(&String::from_utf8_lossy(&buf[..n]));
        }
        self.seen.clone()
    }
}

const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:server' xmlns:stream='http://etherx.jabber.org/streams' xmlns:db='jabber:server:dialback' from='b.test' to='a.test' version='1.0'>";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stanzas_from_an_unauthenticated_peer_are_refused() {
    let mut a = node("a.test");
    a.start_again().expect("start");
    let mut peer = RawPeer::connect(a.s2s).await;
    peer.send(HEADER).await;
    let features = peer.until("</stream:features>").await;
    assert!(
        features.contains("<starttls") && features.contains("<required/>"),
        "{features}"
    );
    peer.send("<message from='mallory@b.test' to='alice@a.test'><body>spoof</body></message>")
        .await;
    let closed = peer.until("</stream:stream>").await;
    assert!(closed.contains("<not-authorized"), "{closed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_whose_dialback_key_fails_is_refused() {
    // TLS off on a.test's side so that the raw peer can speak in plain
    // text; the key is checked with b.test, the real authoritative server.
    let (a, _b) = two_domains("[s2s]\nrequire_tls = false\n");
    let mut peer = RawPeer::connect(a.s2s).await;
    peer.send(HEADER).await;
    let header = peer.until("</stream:features>").await;
    assert!(header.contains("urn:xmpp:features:dialback"), "{header}");
    peer.send("<db:result from='b.test' to='a.test'>0123456789abcdef</db:result>")
        .await;
    let answer = peer.until("type='invalid'").await;
    assert!(
        answer.contains("<db:result") || answer.contains("result"),
        "{answer}"
    );
    // Still not authenticated: a stanza claiming b.test closes the stream.
    peer.send("<message from='mallory@b.test' to='alice@a.test'><body>spoof</body></message>")
        .await;
    let closed = peer.until("</stream:stream>").await;
    assert!(closed.contains("<not-authorized"), "{closed}\n{}", a.log());
}

/// Gives the node's (only) virtual host this certificate and key.
fn set_vhost_cert(node: &TestNode, cert: &std::path::Path, key: &std::path::Path) {
    let text = std::fs::read_to_string(&node.config_path).expect("config");
    let line = format!("[[vhosts]]\nname = \"{}\"\n", node.domain);
    assert!(text.contains(&line), "{text}");
    let with = format!("{line}tls_cert = {:?}\ntls_key = {:?}\n", cert, key);
    std::fs::write(&node.config_path, text.replacen(&line, &with, 1)).expect("write config");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn domains_with_certificates_from_a_trusted_ca_use_sasl_external() {
    // A test CA and a certificate for each domain (server and client use),
    // made by `clusterctl certs init`.
    let certs = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(tests::node::bin("clusterctl"))
        .args(["certs", "init", "--dir"])
        .arg(certs.path())
        .args(["--node", "1=a.test", "--node", "2=b.test"])
        .output()
        .expect("clusterctl certs init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut a = node("a.test");
    let mut b = node("b.test");
    let p = |n: &str| certs.path().join(n);
    set_vhost_cert(&a, &p("node-1.crt"), &p("node-1.key"));
    set_vhost_cert(&b, &p("node-2.crt"), &p("node-2.key"));
    // Only certificates count: no dialback to fall back on.
    let trust = format!(
        "[s2s]\nca_file = {:?}\nwebpki_roots = false\ndefault_policy = \"certificate\"\n",
        p("ca.crt")
    );
    a.append_config(&format!("{trust}{}", route("b.test", b.s2s)))
        .expect("config a");
    b.append_config(&format!("{trust}{}", route("a.test", a.s2s)))
        .expect("config b");
    a.start_again().expect("a starts");
    b.start_again().expect("b starts");
    a.adduser("alice", PW).expect("alice");
    b.adduser("bob", PW).expect("bob");
    let mut alice = Client::login_bound(&a, "alice", PW, "home")
        .await
        .expect("alice");
    let mut bob = Client::login_bound(&b, "bob", PW, "work")
        .await
        .expect("bob");
    alice
        .chat("bob@b.test/work", "signed and sealed")
        .await
        .expect("chat");
    let m = bob
        .recv_message(FED_WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\nnode a log:\n{}\nnode b log:\n{}", a.log(), b.log()));
    assert_eq!(body(&m).as_deref(), Some("signed and sealed"));
    bob.chat("alice@a.test/home", "likewise")
        .await
        .expect("chat back");
    let m = alice.recv_message(FED_WAIT).await.expect("alice gets it");
    assert_eq!(body(&m).as_deref(), Some("likewise"));
    for n in [&a, &b] {
        let status = n.clusterctl(&["s2s"]).expect("clusterctl s2s");
        let outbound = status
            .lines()
            .find(|l| l.contains("outbound"))
            .unwrap_or_else(|| panic!("no outbound stream: {status}"));
        assert!(
            outbound.contains("sasl-external") && outbound.contains("certificate valid"),
            "{status}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_policy_refuses_a_self_signed_peer() {
    // b.test has only its generated self-signed certificate; a.test
    // demands a valid one for it.
    let (a, _b) = two_domains("[s2s.policies]\n\"b.test\" = \"certificate\"\n");
    let mut alice = Client::login_bound(&a, "alice", PW, "home")
        .await
        .expect("alice");
    alice.chat("bob@b.test", "let me in").await.expect("send");
    let err = alice
        .recv_until(
            |e| e.name == "message" && e.get_attr("type") == Some("error"),
            FED_WAIT,
        )
        .await
        .expect("bounced");
    assert_eq!(
        stanza_error(&err).as_deref(),
        Some("remote-server-not-found")
    );
}

/// A user of another server joins a room of ours (XEP-0045 over s2s):
/// the room's traffic to b.test leaves from conference.a.test, which
/// b.test verifies by dialback like any other domain of ours.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_of_another_server_joins_our_room() {
    const ROOM: &str = "garden@conference.a.test";
    let mut a = node("a.test");
    let mut b = node("b.test");
    a.append_config(&route("b.test", b.s2s)).expect("config a");
    b.append_config(&format!(
        "[s2s.routes]\n\"a.test\" = [\"{0}\"]\n\"conference.a.test\" = [\"{0}\"]\n",
        a.s2s
    ))
    .expect("config b");
    a.start_again().expect("a starts");
    b.start_again().expect("b starts");
    a.adduser("alice", PW).expect("alice");
    b.adduser("bob", PW).expect("bob");
    let is_self = |e: &Element| {
        e.name == "presence"
            && e.get_child("x", "http://jabber.org/protocol/muc#user")
                .is_some_and(|x| x.elements().any(|s| s.get_attr("code") == Some("110")))
    };
    let join = |nick: &str| {
        Element::new("presence", ns::CLIENT)
            .attr("to", format!("{ROOM}/{nick}"))
            .child(Element::new("x", "http://jabber.org/protocol/muc"))
    };
    let say = |text: &str| {
        Element::new("message", ns::CLIENT)
            .attr("to", ROOM)
            .attr("type", "groupchat")
            .child(Element::new("body", ns::CLIENT).text(text))
    };
    let mut alice = Client::login_bound(&a, "alice", PW, "home")
        .await
        .expect("alice");
    alice.send(&join("Alice")).await.expect("join");
    alice
        .recv_until(is_self, FED_WAIT)
        .await
        .expect("alice joined");
    let mut bob = Client::login_bound(&b, "bob", PW, "work")
        .await
        .expect("bob");
    bob.send(&join("Bob")).await.expect("join");
    bob.recv_until(is_self, FED_WAIT)
        .await
        .unwrap_or_else(|e| panic!("bob joins over s2s: {e}\n{}\n{}", a.log(), b.log()));
    alice
        .recv_until(
            |e| e.get_attr("from") == Some(&format!("{ROOM}/Bob")),
            FED_WAIT,
        )
        .await
        .expect("alice sees bob");
    bob.send(&say("hi from b.test")).await.expect("say");
    for c in [&mut alice, &mut bob] {
        c.recv_until(|e| body(e).as_deref() == Some("hi from b.test"), FED_WAIT)
            .await
            .expect("both get bob's message");
    }
    alice.send(&say("welcome")).await.expect("say");
    bob.recv_until(|e| body(e).as_deref() == Some("welcome"), FED_WAIT)
        .await
        .expect("bob gets alice's message over s2s");
    let leave = Element::new("presence", ns::CLIENT)
        .attr("to", format!("{ROOM}/Bob"))
        .attr("type", "unavailable");
    bob.send(&leave).await.expect("leave");
    alice
        .recv_until(
            |e| {
                e.get_attr("from") == Some(&format!("{ROOM}/Bob"))
                    && e.get_attr("type") == Some("unavailable")
            },
            FED_WAIT,
        )
        .await
        .expect("alice sees bob leave");
}
