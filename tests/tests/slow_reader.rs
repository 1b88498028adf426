//! A client that stops reading must not make the server hold unbounded
//! data, nor lose what was sent to it: its queue is bounded, it is closed
//! with `<policy-violation/>`, and everything it missed is kept offline.

use std::collections::HashSet;

use tests::client::{body, Client, WAIT};
use tests::node::{NodeOptions, TestNode};
use xmpp::element::Element;
use xmpp::stanza::ns;

const PW: &str = "secret";

const GENEROUS: &str = "offline_max_messages = 100000\noffline_max_bytes = 100000000\nstanzas_per_second = 1000000\nstanza_burst = 1000000\n";

#[tokio::test]
async fn a_client_that_stops_reading_is_closed_and_loses_no_message() {
    stops_reading(&format!("[limits]\nsession_queue = 16\n{GENEROUS}")).await;
}

/// The same with the queue bounded in bytes (`session_queue_bytes`) and
/// room for thousands of stanzas.
#[tokio::test]
async fn the_session_queue_is_bounded_in_bytes() {
    stops_reading(&format!(
        "[limits]\nmax_stanza_bytes = 10000\nsession_queue_bytes = 10000\n{GENEROUS}"
    ))
    .await;
}

async fn stops_reading(config: &str) {
    let node = TestNode::start_with(NodeOptions {
        extra_config: config.into(),
        ..NodeOptions::default()
    })
    .unwrap();
    node.adduser("alice", PW).unwrap();
    node.adduser("bob", PW).unwrap();
    let mut alice = Client::login_bound(&node, "alice", PW, "a").await.unwrap();
    let mut bob = Client::login_bound(&node, "bob", PW, "slow").await.unwrap();
    bob.presence(0).await.unwrap();
    bob.sync().await.unwrap();

    // Bob stops reading. Enough data to fill the loopback socket buffers
    // many times over, then some.
    let filler = "x".repeat(4000);
    const N: usize = 1500;
    for i in 0..N {
        let m = Element::new("message", ns::CLIENT)
            .attr("to", "bob@localhost/slow")
            .attr("type", "chat")
            .attr("id", format!("m{i}"))
            .child(Element::new("body", ns::CLIENT).text(format!("{i} {filler}")));
        alice.send(&m).await.unwrap();
    }
    // A round trip proves the server processed all of alice's messages
    // (storing the overflow offline takes a while on a slow disk).
    let mut synced = false;
    for _ in 0..24 {
        if alice.sync().await.is_ok() {
            synced = true;
            break;
        }
    }
    assert!(synced, "the server never answered alice's ping");

    let mut seen = HashSet::new();
    let mut closed_with = None;
    loop {
        let e = match bob.recv(WAIT).await {
            Ok(e) => e,
            Err(_) => break,
        };
        if e.is("error", ns::STREAM) {
            closed_with = e
                .elements()
                .find(|c| c.ns == ns::STREAMS)
                .map(|c| c.name.clone());
            break;
        }
        if e.name == "message" {
            let n = body(&e)
                .and_then(|b| b.split(' ').next().map(str::to_owned))
                .unwrap();
            assert!(seen.insert(n.clone()), "message {n} delivered twice");
        }
    }
    assert_eq!(
        closed_with.as_deref(),
        Some("policy-violation"),
        "the slow reader is closed"
    );
    assert!(
        seen.len() < N,
        "the reader cannot have received everything before it was closed"
    );

    // What bob missed waits offline and arrives at his next login.
    let mut bob = Client::login_bound(&node, "bob", PW, "again")
        .await
        .unwrap();
    bob.presence(0).await.unwrap();
    while seen.len() < N {
        let m = bob
            .recv_message(WAIT)
            .await
            .unwrap_or_else(|e| panic!("only {} of {N} messages arrived: {e}", seen.len()));
        let n = body(&m)
            .and_then(|b| b.split(' ').next().map(str::to_owned))
            .unwrap();
        assert!(seen.insert(n.clone()), "message {n} delivered twice");
    }
    assert_eq!(seen.len(), N);
}
