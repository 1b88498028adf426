//! What one hostile client must not be able to do to everybody else on the
//! node (issue 12): stall the async workers with PBKDF2, and the like. Each
//! test runs the real binary over real sockets.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tests::client::{Client, Mechanism};
use tests::node::{NodeOptions, TestNode};
use xmpp::element::Element;

const PW: &str = "secret";

/// A node with `extra_config` (see `NodeOptions::extra_config`) and these
/// accounts, each with the password `PW`.
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

async fn ping(c: &mut Client) -> Duration {
    let iq = c.make_iq("get", None, Element::new("ping", "urn:xmpp:ping"));
    let t = Instant::now();
    let r = c.iq(iq).await.expect("ping answered");
    assert_eq!(r.get_attr("type"), Some("result"), "{r:?}");
    t.elapsed()
}

/// A flood of PLAIN logins with wrong passwords (each one PBKDF2 with many
/// iterations) runs beside an unrelated, logged-in user: the user's pings
/// are answered far faster than one such check takes, because the checks
/// run on a bounded blocking pool, not on the async workers. (With the
/// checks on the workers, both workers spend whole checks blocked and a
/// ping waits for one.) The bound is a ratio to the check's own time on
/// this machine, not a wall-clock figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn wrong_plain_passwords_do_not_stall_other_sessions() {
    let node = node_with(
        "scram_iterations = 50000\nmax_attempts_per_stream = 100\n",
        &["alice", "mallory"],
    );
    let mut alice = Client::login_bound(&node, "alice", PW, "pc").await.unwrap();

    // One check alone, as the measure of the work.
    let mut probe = Client::connect_starttls(node.c2s, "localhost")
        .await
        .unwrap();
    let t = Instant::now();
    let r = probe
        .try_login("mallory", "wrong", Mechanism::Plain)
        .await
        .unwrap();
    let check = t.elapsed();
    assert_eq!(r, Err("not-authorized".to_owned()));
    let quiet = ping(&mut alice).await;

    let stop = Arc::new(AtomicBool::new(false));
    let mut flood = Vec::new();
    for _ in 0..6 {
        let stop = stop.clone();
        let addr = node.c2s;
        flood.push(tokio::spawn(async move {
            let mut c = Client::connect_starttls(addr, "localhost").await.unwrap();
            let mut tries = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let r = c
                    .try_login("mallory", "wrong", Mechanism::Plain)
                    .await
                    .unwrap();
                assert_eq!(r, Err("not-authorized".to_owned()));
                tries += 1;
            }
            tries
        }));
    }
    // Let the flood fill the pool, then measure.
    tokio::time::sleep(check).await;
    let mut worst = Duration::ZERO;
    let until = Instant::now() + check * 6;
    let mut pings = 0;
    while Instant::now() < until {
        worst = worst.max(ping(&mut alice).await);
        pings += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let mut tries = 0;
    for f in flood {
        tries += f.await.unwrap();
    }
    eprintln!("one check {check:?}; worst ping {worst:?} over {pings} pings ({quiet:?} quiet); {tries} checks in the flood");
    assert!(tries >= 6, "the flood ran ({tries} checks)");
    assert!(
        worst * 3 < check,
        "a ping took {worst:?} during the flood ({pings} pings, {quiet:?} when quiet); one password check takes {check:?}"
    );
    // The node still logs people in.
    let mut fresh = Client::login_bound(&node, "alice", PW, "fresh")
        .await
        .unwrap();
    let _ = ping(&mut fresh).await;
}

fn presence_from<'a>(from: &'a str, show: Option<&'a str>) -> impl FnMut(&Element) -> bool + 'a {
    move |e: &Element| {
        e.name == "presence"
            && e.get_attr("from") == Some(from)
            && e.get_attr("type").is_none()
            && e.elements()
                .find(|c| c.name == "show")
                .map(|c| c.text_content())
                == show.map(str::to_owned)
    }
}

/// RFC 6121 §4.2.2 and §4.4.2: initial and updated presence go to every
/// available resource of the user, the sender's own included.
#[tokio::test]
async fn own_presence_comes_back_to_every_resource_including_the_sender() {
    let node = node_with("", &["alice"]);
    let mut pc = Client::login_bound(&node, "alice", PW, "pc").await.unwrap();
    let mut phone = Client::login_bound(&node, "alice", PW, "phone")
        .await
        .unwrap();
    pc.presence(1).await.unwrap();
    pc.recv_until(
        presence_from("alice@localhost/pc", None),
        tests::client::WAIT,
    )
    .await
    .expect("initial presence reflected to its sender");
    phone.presence(0).await.unwrap();
    phone
        .recv_until(
            presence_from("alice@localhost/phone", None),
            tests::client::WAIT,
        )
        .await
        .expect("reflected to the phone");
    pc.recv_until(
        presence_from("alice@localhost/phone", None),
        tests::client::WAIT,
    )
    .await
    .expect("the phone's presence reaches the pc");
    let away = Element::new("presence", xmpp::stanza::ns::CLIENT)
        .child(Element::new("show", xmpp::stanza::ns::CLIENT).text("away"));
    pc.send(&away).await.unwrap();
    pc.recv_until(
        presence_from("alice@localhost/pc", Some("away")),
        tests::client::WAIT,
    )
    .await
    .expect("updated presence reflected to its sender");
    phone
        .recv_until(
            presence_from("alice@localhost/pc", Some("away")),
            tests::client::WAIT,
        )
        .await
        .expect("and to the other resource");
}

/// A prefix declared only on the sender's stream root (`xmlns:x` on
/// `<stream:stream>`) and used on a stanza reaches the recipient declared
/// on the stanza itself, online and from offline storage: the recipient's
/// stream never saw the root's declaration, and a namespace-aware parser
/// (this test client's is one) refuses an undeclared prefix.
#[tokio::test]
async fn a_prefix_declared_on_the_senders_stream_root_reaches_the_recipient_declared() {
    let node = node_with("", &["bob", "mallory"]);
    let mut mallory = Client::connect_starttls(node.c2s, "localhost")
        .await
        .unwrap();
    mallory.header_extra = " xmlns:x='urn:example:x'".into();
    mallory
        .login("mallory", PW, Mechanism::Scram(xmpp::sasl::HashAlg::Sha256))
        .await
        .unwrap();
    mallory.bind(Some("evil")).await.unwrap();
    mallory.presence(0).await.unwrap();

    let check = |m: &Element, body: &str| {
        assert_eq!(tests::client::body(m).as_deref(), Some(body));
        assert_eq!(m.get_attr("x:a"), Some("1"), "{m:?}");
        assert_eq!(m.get_attr("xmlns:x"), Some("urn:example:x"), "{m:?}");
    };
    // Offline first: stored, then delivered at login.
    mallory
        .send_raw("<message to='bob@localhost' type='chat' x:a='1'><body>stored</body></message>")
        .await
        .unwrap();
    mallory.sync().await.unwrap();
    let mut bob = Client::login_bound(&node, "bob", PW, "pc").await.unwrap();
    bob.presence(0).await.unwrap();
    let m = bob
        .recv_message(tests::client::WAIT)
        .await
        .expect("offline message");
    check(&m, "stored");
    // Online.
    mallory
        .send_raw("<message to='bob@localhost/pc' type='chat' x:a='1'><body>live</body></message>")
        .await
        .unwrap();
    let m = bob
        .recv_message(tests::client::WAIT)
        .await
        .expect("live message");
    check(&m, "live");
    // Bob's stream is still fine.
    let _ = ping(&mut bob).await;
}

const SM: &str = "urn:xmpp:sm:3";

/// Stored messages leave storage only once the client has them: here the
/// client enables stream management and never acknowledges, the node is
/// killed with SIGKILL in the middle of the delivery, and at the next
/// login every message is there, in order. The delivery also comes in
/// pages: unacknowledged, only the first page is sent.
#[tokio::test]
async fn offline_messages_survive_kill_9_during_delivery_and_come_in_pages() {
    let mut node = node_with("[limits]\noffline_max_messages = 1000\n", &["alice", "bob"]);
    let mut alice = Client::login_bound(&node, "alice", PW, "pc").await.unwrap();
    alice.presence(0).await.unwrap();
    const N: usize = 250;
    for i in 0..N {
        alice.chat("bob@localhost", &format!("m{i}")).await.unwrap();
    }
    alice.sync().await.unwrap();

    let mut bob = Client::login_bound(&node, "bob", PW, "phone")
        .await
        .unwrap();
    bob.send(&Element::new("enable", SM)).await.unwrap();
    bob.recv_until(|e| e.is("enabled", SM), tests::client::WAIT)
        .await
        .unwrap();
    bob.presence(0).await.unwrap();
    for i in 0..100 {
        let m = bob.recv_message(tests::client::WAIT).await.unwrap();
        assert_eq!(tests::client::body(&m), Some(format!("m{i}")));
    }
    // Unacknowledged: the second page waits (a ping answered after the
    // first page is the marker that nothing else is on its way).
    let _ = ping(&mut bob).await;
    bob.expect_no_message(std::time::Duration::ZERO)
        .await
        .unwrap();

    node.kill();
    node.start_again().expect("restarts");
    let mut bob = Client::login_bound(&node, "bob", PW, "pc").await.unwrap();
    bob.presence(0).await.unwrap();
    for i in 0..N {
        let m = bob.recv_message(tests::client::WAIT).await.unwrap();
        assert_eq!(
            tests::client::body(&m),
            Some(format!("m{i}")),
            "message {i}"
        );
    }
}

/// The offline queue is bounded in bytes as well as in messages.
#[tokio::test]
async fn offline_storage_is_bounded_in_bytes() {
    let node = node_with(
        "[limits]\nmax_stanza_bytes = 10000\noffline_max_bytes = 20000\n",
        &["alice", "bob"],
    );
    let mut alice = Client::login_bound(&node, "alice", PW, "pc").await.unwrap();
    alice.presence(0).await.unwrap();
    let big = "x".repeat(6000);
    for _ in 0..3 {
        alice.chat("bob@localhost", &big).await.unwrap();
    }
    alice.sync().await.unwrap();
    alice
        .expect_no_message(std::time::Duration::ZERO)
        .await
        .unwrap();
    alice.chat("bob@localhost", &big).await.unwrap();
    let err = alice.recv_message(tests::client::WAIT).await.unwrap();
    assert_eq!(err.get_attr("type"), Some("error"), "{err:?}");
    assert_eq!(
        tests::client::stanza_error(&err).as_deref(),
        Some("service-unavailable")
    );
    assert!(format!("{err:?}").contains("20000 bytes"), "{err:?}");
}

/// Connections that never authenticate are capped per address: the next
/// one is refused with `<policy-violation/>` at once, and a place frees up
/// when one of them goes.
#[tokio::test]
async fn unauthenticated_connections_are_capped_per_address() {
    let node = node_with(
        "[limits]\nmax_unauthenticated = 10\nmax_unauthenticated_per_address = 3\n",
        &["alice"],
    );
    let mut idle = Vec::new();
    for _ in 0..3 {
        let mut c = Client::connect_tcp(node.c2s, "localhost").await.unwrap();
        // Answered with a header and features: admitted and waiting.
        c.send_stream_header().await.unwrap();
        c.recv_until(|e| e.name == "features", tests::client::WAIT)
            .await
            .unwrap();
        idle.push(c);
    }
    let mut refused = Client::connect_tcp(node.c2s, "localhost").await.unwrap();
    assert_eq!(
        refused
            .expect_stream_error(tests::client::WAIT)
            .await
            .unwrap(),
        "policy-violation"
    );
    drop(idle.pop());
    // The node notices the close; then there is room again.
    let deadline = Instant::now() + tests::client::WAIT;
    loop {
        match Client::login_bound(&node, "alice", PW, "pc").await {
            Ok(mut alice) => {
                let _ = ping(&mut alice).await;
                break;
            }
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("no room after a connection closed: {e:#}"),
        }
    }
}

/// A session that sends faster than `stanzas_per_second` beyond the burst
/// is closed with `<policy-violation/>`; the recipient gets at most the
/// burst and the rest of the node goes on.
#[tokio::test]
async fn a_stanza_flood_is_closed_with_policy_violation() {
    let node = node_with(
        "[limits]\nstanzas_per_second = 5\nstanza_burst = 20\n",
        &["alice", "mallory"],
    );
    let mut alice = Client::login_bound(&node, "alice", PW, "pc").await.unwrap();
    alice.presence(0).await.unwrap();
    let mut mallory = Client::login_bound(&node, "mallory", PW, "x")
        .await
        .unwrap();
    let mut flood = String::new();
    for i in 0..60 {
        flood.push_str(&format!(
            "<message to='alice@localhost' type='chat'><body>{i}</body></message>"
        ));
    }
    mallory.send_raw(&flood).await.unwrap();
    assert_eq!(
        mallory
            .expect_stream_error(tests::client::WAIT)
            .await
            .unwrap(),
        "policy-violation"
    );
    let _ = ping(&mut alice).await;
    let got = alice
        .take_pending()
        .into_iter()
        .filter(|e| e.name == "message")
        .count();
    assert!(got <= 20, "{got} messages got through");
}

/// At most `max_sessions_per_account` sessions per account: one more bind
/// gets `<resource-constraint/>`; rebinding an online resource replaces it.
#[tokio::test]
async fn sessions_per_account_are_capped() {
    let node = node_with("[limits]\nmax_sessions_per_account = 2\n", &["alice"]);
    let _a = Client::login_bound(&node, "alice", PW, "a").await.unwrap();
    let _b = Client::login_bound(&node, "alice", PW, "b").await.unwrap();
    let err = Client::login_bound(&node, "alice", PW, "c")
        .await
        .err()
        .expect("a third session is refused");
    assert!(
        format!("{err:#}").contains("resource-constraint"),
        "{err:#}"
    );
    let mut again = Client::login_bound(&node, "alice", PW, "a")
        .await
        .expect("rebinding an online resource replaces it");
    let _ = ping(&mut again).await;
}

fn is_server_ping(e: &Element) -> bool {
    e.name == "iq"
        && e.get_attr("type") == Some("get")
        && e.get_child("ping", "urn:xmpp:ping").is_some()
}

fn pong(ping: &Element) -> Element {
    let mut r = Element::new("iq", xmpp::stanza::ns::CLIENT).attr("type", "result");
    if let Some(id) = ping.get_attr("id") {
        r.set_attr("id", id);
    }
    if let Some(from) = ping.get_attr("from") {
        r.set_attr("to", from);
    }
    r
}

/// A silent client is asked (XEP-0199) after `idle_ping_secs`; one that
/// answers stays, one that never does (a half-open mobile link) is gone
/// after `ping_timeout_secs` more: its contacts, here its own other
/// resource, see it unavailable.
#[tokio::test]
async fn a_silent_client_is_pinged_and_dropped_when_it_never_answers() {
    let node = node_with(
        "[limits]\nidle_ping_secs = 1\nping_timeout_secs = 1\n",
        &["alice"],
    );
    let mut pc = Client::login_bound(&node, "alice", PW, "pc").await.unwrap();
    pc.presence(0).await.unwrap();
    let mut watch = Client::login_bound(&node, "alice", PW, "watch")
        .await
        .unwrap();
    watch.presence(0).await.unwrap();

    // Answered once: still served, and asked again later.
    let first = pc
        .recv_until(is_server_ping, tests::client::WAIT)
        .await
        .unwrap();
    pc.send(&pong(&first)).await.unwrap();
    let again = pc
        .recv_until(is_server_ping, tests::client::WAIT)
        .await
        .unwrap();
    assert_ne!(again.get_attr("id"), None);
    // Now pc goes silent. The watch answers its own pings meanwhile.
    let deadline = Instant::now() + tests::client::WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let e = watch.recv(left).await.expect("pc's unavailable presence");
        if is_server_ping(&e) {
            watch.send(&pong(&e)).await.unwrap();
            continue;
        }
        if e.name == "presence"
            && e.get_attr("type") == Some("unavailable")
            && e.get_attr("from") == Some("alice@localhost/pc")
        {
            break;
        }
    }
    let _ = ping(&mut watch).await;
}

/// Median of the time an unrelated user's roster set takes, over `n`.
async fn roster_set_median(c: &mut Client, n: usize, tag: &str) -> Duration {
    let mut times = Vec::with_capacity(n);
    for i in 0..n {
        let item = Element::new("item", xmpp::stanza::ns::ROSTER)
            .attr("jid", format!("{tag}{i}@elsewhere.test"));
        let iq = c.make_iq(
            "set",
            None,
            Element::new("query", xmpp::stanza::ns::ROSTER).child(item),
        );
        let t = Instant::now();
        let r = c.iq(iq).await.expect("roster set answered");
        times.push(t.elapsed());
        assert_eq!(r.get_attr("type"), Some("result"), "{r:?}");
    }
    times.sort();
    times[n / 2]
}

/// One user's offline queue growing by thousands of messages does not
/// slow down everyone else's writes: storing a message costs the same
/// whatever the queue holds (the queue was once copied whole on every
/// store, under the one write lock). An unrelated user's roster sets are
/// timed while the flood runs on an empty queue and again on a queue of
/// thousands; the bound is a ratio between the two, not a wall-clock figure.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_offline_flood_does_not_slow_others_as_the_queue_grows() {
    let node = node_with(
        "[limits]\noffline_max_messages = 100000\noffline_max_bytes = 100000000\nstanzas_per_second = 1000000\nstanza_burst = 1000000\n",
        &["alice", "bob", "mallory"],
    );
    let mut alice = Client::login_bound(&node, "alice", PW, "pc").await.unwrap();
    let filler = "f".repeat(1000);
    let flood = |mut m: Client, from: usize, to: usize| {
        let filler = filler.clone();
        tokio::spawn(async move {
            for i in from..to {
                m.chat("bob@localhost", &format!("{i} {filler}"))
                    .await
                    .unwrap();
                if i % 200 == 199 {
                    m.sync().await.unwrap();
                }
            }
            m.sync().await.unwrap();
            m
        })
    };
    let mallory = Client::login_bound(&node, "mallory", PW, "x")
        .await
        .unwrap();
    let running = flood(mallory, 0, 1000);
    let early = roster_set_median(&mut alice, 15, "early").await;
    let mallory = running.await.unwrap();
    // Grow bob's queue to thousands, then time again with the flood on.
    let mallory = flood(mallory, 1000, 6000).await.unwrap();
    let running = flood(mallory, 6000, 7000);
    let late = roster_set_median(&mut alice, 15, "late").await;
    running.await.unwrap();
    eprintln!("roster set median: {early:?} beside a short queue, {late:?} beside 6000 stored");
    assert!(
        late < early * 4 + Duration::from_millis(20),
        "roster sets slowed from {early:?} to {late:?} as one offline queue grew"
    );
    // Everything was stored: bob's first page arrives.
    let mut bob = Client::login_bound(&node, "bob", PW, "pc").await.unwrap();
    bob.presence(0).await.unwrap();
    let first = bob.recv_message(tests::client::WAIT).await.unwrap();
    assert!(format!("{first:?}").contains("0 f"), "{first:?}");
}
