//! Federation with a real Prosody (Debian's 0.12 package, installed by
//! `.ci/run`): our user and Prosody's become contacts, see each other's
//! presence and exchange messages in both directions, over STARTTLS with
//! self-signed certificates on both sides, so the domains authenticate
//! with Server Dialback (XEP-0220) each way: Prosody checks our keys by
//! connecting back to us, we check its keys by connecting to it.

use std::net::SocketAddr;
use std::time::Duration;

use tests::client::{body, Client, Mechanism};
use tests::node::{fresh_ip, NodeOptions, TestNode};
use tests::prosody::Prosody;
use xmpp::element::Element;
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_and_we_become_contacts_and_chat_both_ways() {
    let (our_ip, their_ip) = (fresh_ip(), fresh_ip());
    let mut ours = TestNode::create(NodeOptions {
        vhosts: vec!["ours.test".into()],
        ip: Some(our_ip),
        s2s_addr: Some(SocketAddr::new(our_ip.into(), 5269)),
        ..Default::default()
    })
    .expect("our config");
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
    let logs = |what: &str| {
        format!(
            "{what}\n--- our node ---\n{}\n--- prosody ---\n{}",
            ours.log(),
            prosody.log()
        )
    };

    let mut alice = Client::login_bound(&ours, "alice", PW, "home")
        .await
        .expect("alice");
    let mut pat = Client::connect_starttls(prosody.c2s, "pros.test")
        .await
        .expect("pat connects");
    pat.login("pat", PW, Mechanism::Plain)
        .await
        .expect("pat logs in");
    pat.bind(Some("laptop")).await.expect("pat binds");
    alice.presence(5).await.expect("alice online");
    pat.presence(5).await.expect("pat online");

    // Ours → Prosody: alice asks, pat approves.
    alice
        .send(&presence("pat@pros.test", "subscribe"))
        .await
        .expect("subscribe");
    pat.recv_until(
        |e| is_presence(e, Some("subscribe"), "alice@ours.test"),
        FED_WAIT,
    )
    .await
    .unwrap_or_else(|e| panic!("{}", logs(&e.to_string())));
    pat.send(&presence("alice@ours.test", "subscribed"))
        .await
        .expect("subscribed");
    alice
        .recv_until(
            |e| is_presence(e, Some("subscribed"), "pat@pros.test"),
            FED_WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("{}", logs(&e.to_string())));
    alice
        .recv_until(|e| is_presence(e, None, "pat@pros.test/laptop"), FED_WAIT)
        .await
        .unwrap_or_else(|e| panic!("{}", logs(&e.to_string())));

    // Prosody → ours: pat asks, alice approves; pat sees alice.
    pat.send(&presence("alice@ours.test", "subscribe"))
        .await
        .expect("subscribe back");
    alice
        .recv_until(
            |e| is_presence(e, Some("subscribe"), "pat@pros.test"),
            FED_WAIT,
        )
        .await
        .unwrap_or_else(|e| panic!("{}", logs(&e.to_string())));
    alice
        .send(&presence("pat@pros.test", "subscribed"))
        .await
        .expect("approve");
    pat.recv_until(|e| is_presence(e, None, "alice@ours.test/home"), FED_WAIT)
        .await
        .unwrap_or_else(|e| panic!("{}", logs(&e.to_string())));

    // Messages both ways.
    alice
        .chat("pat@pros.test", "hi prosody")
        .await
        .expect("chat");
    let m = pat
        .recv_message(FED_WAIT)
        .await
        .unwrap_or_else(|e| panic!("{}", logs(&e.to_string())));
    assert_eq!(body(&m).as_deref(), Some("hi prosody"));
    assert_eq!(m.get_attr("from"), Some("alice@ours.test/home"));
    pat.chat("alice@ours.test", "hi back")
        .await
        .expect("chat back");
    let m = alice
        .recv_message(FED_WAIT)
        .await
        .unwrap_or_else(|e| panic!("{}", logs(&e.to_string())));
    assert_eq!(body(&m).as_deref(), Some("hi back"));
    assert_eq!(m.get_attr("from"), Some("pat@pros.test/laptop"));

    // A ping to Prosody's server, answered by it.
    let ping = alice.make_iq("get", Some("pros.test"), Element::new("ping", ns::PING));
    let pong = alice.iq(ping).await.expect("ping");
    assert_eq!(
        pong.get_attr("type"),
        Some("result"),
        "{}",
        pong.to_string_in(ns::CLIENT)
    );

    // Our side of it: both streams up, authenticated by dialback.
    let status = ours.clusterctl(&["s2s"]).expect("clusterctl s2s");
    assert!(
        status.contains("pros.test") && status.contains("dialback"),
        "{status}"
    );
}
