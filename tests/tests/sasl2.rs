//! The reconnect path of a mobile client against the real binary: SASL2
//! (XEP-0388) with Bind2 (XEP-0386) binds, enables stream management and
//! carbons inside the login; FAST (XEP-0484) tokens log in in one round
//! trip and stop working when the password changes; a user-agent id gets
//! its resource back; a dropped session resumes inside SASL2, on the
//! other port, and over WebSocket.

use tests::client::{body, message, show, Client, Sasl2Auth, Sasl2Options, WAIT};
use tests::node::{NodeOptions, TestNode};
use xmpp::element::Element;
use xmpp::sasl::HashAlg;
use xmpp::stanza::ns;

const PW: &str = "secret";
const SASL2: &str = "urn:xmpp:sasl:2";
const BIND2: &str = "urn:xmpp:bind:0";
const FAST: &str = "urn:xmpp:fast:0";
const SM: &str = "urn:xmpp:sm:3";
const AGENT: &str = "d4565fa7-4d72-4749-b3d3-740edbf87770";

fn phone() -> Sasl2Options {
    Sasl2Options {
        agent: Some(AGENT.into()),
        bind: true,
        tag: Some("Phone".into()),
        sm: Some(true),
        carbons: true,
        ..Sasl2Options::default()
    }
}

#[tokio::test]
async fn sasl2_offers_its_mechanisms_with_bind2_and_fast_inline() {
    let node = TestNode::with_users(&["alice"], PW).unwrap();
    let c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let auth = c
        .features
        .get_child("authentication", SASL2)
        .expect("SASL2 offered");
    let mechs: Vec<String> = auth
        .elements()
        .filter(|m| m.is("mechanism", SASL2))
        .map(|m| m.text_content())
        .collect();
    assert!(mechs.contains(&"SCRAM-SHA-256".to_string()), "{mechs:?}");
    assert!(
        mechs.contains(&"SCRAM-SHA-256-PLUS".to_string()),
        "{mechs:?}"
    );
    let inline = auth.get_child("inline", SASL2).expect("inline features");
    let bind = inline.get_child("bind", BIND2).expect("Bind2");
    let features: Vec<&str> = bind
        .get_child("inline", BIND2)
        .map(|i| {
            i.elements()
                .filter(|f| f.is("feature", BIND2))
                .filter_map(|f| f.get_attr("var"))
                .collect()
        })
        .unwrap_or_default();
    assert!(features.contains(&SM) && features.contains(&"urn:xmpp:carbons:2"));
    assert!(inline.get_child("sm", SM).is_some());
    let fast: Vec<String> = inline
        .get_child("fast", FAST)
        .expect("FAST offered")
        .elements()
        .filter(|m| m.is("mechanism", FAST))
        .map(|m| m.text_content())
        .collect();
    // TLS 1.3 here: tls-exporter, and the certificate hash, and none.
    for m in ["HT-SHA-256-EXPR", "HT-SHA-256-ENDP", "HT-SHA-256-NONE"] {
        assert!(fast.contains(&m.to_string()), "{fast:?}");
    }
    // FAST mechanisms are not offered as ordinary SASL.
    assert!(!mechs.iter().any(|m| m.starts_with("HT-")));
}

#[tokio::test]
async fn one_round_trip_binds_enables_sm_and_carbons_and_fast_skips_the_password() {
    let node = TestNode::with_users(&["alice", "bob"], PW).unwrap();

    // First login: SCRAM (two round trips), asking for a token.
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let mut opts = phone();
    opts.request_token = Some("HT-SHA-256-EXPR".into());
    let first = c
        .sasl2_login("alice", Sasl2Auth::Scram(HashAlg::Sha256, PW), &opts)
        .await
        .unwrap()
        .expect("SCRAM over SASL2");
    assert_eq!(first.round_trips, 2);
    let jid = first.authzid.clone();
    assert!(jid.starts_with("alice@localhost/Phone."), "{jid}");
    let bound = first.success.get_child("bound", BIND2).expect("bound");
    let enabled = bound.get_child("enabled", SM).expect("SM enabled inline");
    assert_eq!(enabled.get_attr("resume"), Some("true"));
    assert!(
        enabled.get_attr("max").is_some(),
        "resumption time advertised"
    );
    let token = first.token.clone().expect("a FAST token");
    assert!(first
        .success
        .get_child("token", FAST)
        .and_then(|t| t.get_attr("expiry"))
        .is_some());
    // Bound: the features after success offer no binding.
    assert!(c.features.get_child("bind", ns::BIND).is_none());

    // The session works, and carbons are on: a message bob sends to
    // alice's other resource is copied here.
    c.presence(5).await.unwrap();
    let mut other = Client::login_bound(&node, "alice", PW, "desk")
        .await
        .unwrap();
    other.presence(1).await.unwrap();
    let mut bob = Client::login_bound(&node, "bob", PW, "b").await.unwrap();
    bob.send(&message("alice@localhost/desk", "to the desk"))
        .await
        .unwrap();
    let copy = c
        .recv_until(
            |e| e.get_child("received", "urn:xmpp:carbons:2").is_some(),
            WAIT,
        )
        .await
        .expect("a carbon copy");
    assert!(show(&copy).contains("to the desk"));
    bob.send(&message(&jid, "direct")).await.unwrap();
    let m = c.recv_message(WAIT).await.unwrap();
    assert_eq!(body(&m).as_deref(), Some("direct"));
    drop(c);

    // Reconnect with FAST: one round trip, same resource (same agent).
    let mut c = Client::connect_direct_tls(node.c2s_tls, &node.domain)
        .await
        .unwrap();
    let mut opts = phone();
    opts.sm = Some(false);
    let fast = c
        .sasl2_login(
            "alice",
            Sasl2Auth::Fast {
                mechanism: "HT-SHA-256-EXPR",
                token: &token,
            },
            &opts,
        )
        .await
        .unwrap()
        .expect("FAST login");
    assert_eq!(fast.round_trips, 1);
    assert_eq!(
        fast.authzid, jid,
        "the user-agent id gets its resource back"
    );
    bob.send(&message(&jid, "again")).await.unwrap();
    // (What the old session never acknowledged, "direct", comes first:
    // the replaced session handed it on rather than dropping it.)
    c.recv_until(|e| body(e).as_deref() == Some("again"), WAIT)
        .await
        .expect("delivered to the rebound resource");

    // A wrong token, or the right one from another user-agent id, fails.
    let mut c2 = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let bad = c2
        .sasl2_login(
            "alice",
            Sasl2Auth::Fast {
                mechanism: "HT-SHA-256-EXPR",
                token: "fast-not-the-token",
            },
            &phone(),
        )
        .await
        .unwrap();
    assert_eq!(bad.unwrap_err(), "not-authorized");
    let mut stranger = phone();
    stranger.agent = Some("another-device".into());
    let bad = c2
        .sasl2_login(
            "alice",
            Sasl2Auth::Fast {
                mechanism: "HT-SHA-256-EXPR",
                token: &token,
            },
            &stranger,
        )
        .await
        .unwrap();
    assert_eq!(bad.unwrap_err(), "not-authorized");

    // A password change revokes every token.
    node.clusterctl(&["passwd", "alice@localhost", "--password", "new-pw"])
        .unwrap();
    let mut c3 = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let after = c3
        .sasl2_login(
            "alice",
            Sasl2Auth::Fast {
                mechanism: "HT-SHA-256-EXPR",
                token: &token,
            },
            &phone(),
        )
        .await
        .unwrap();
    assert_eq!(after.unwrap_err(), "not-authorized");
    // The old SASL path, with the new password, works side by side.
    let mut old = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    old.login(
        "alice",
        "new-pw",
        tests::client::Mechanism::ScramPlusExporter(HashAlg::Sha256),
    )
    .await
    .unwrap();
    old.bind(Some("classic")).await.unwrap();
}

#[tokio::test]
async fn a_fast_token_is_bound_to_its_channel_and_can_be_invalidated() {
    let node = TestNode::with_users(&["alice"], PW).unwrap();
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let mut opts = phone();
    opts.request_token = Some("HT-SHA-256-NONE".into());
    let token = c
        .sasl2_login("alice", Sasl2Auth::Plain(PW), &opts)
        .await
        .unwrap()
        .unwrap()
        .token
        .expect("token");
    drop(c);

    // A token works only with the mechanism it was issued for: one for
    // -NONE is no good with -EXPR (and the other way round, so a token
    // bound to the channel cannot be used unbound).
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let other = Sasl2Auth::Fast {
        mechanism: "HT-SHA-256-EXPR",
        token: &token,
    };
    let r = c.sasl2_login("alice", other, &phone()).await.unwrap();
    assert_eq!(r.unwrap_err(), "not-authorized");

    // Invalidating logs in once and then the token is gone.
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let mut inval = phone();
    inval.invalidate = true;
    inval.bind = false;
    let fast = Sasl2Auth::Fast {
        mechanism: "HT-SHA-256-NONE",
        token: &token,
    };
    let ok = c.sasl2_login("alice", fast, &inval).await.unwrap().unwrap();
    assert_eq!(ok.authzid, "alice@localhost");
    // Not bound: the features offer RFC 6120 binding, which works.
    assert!(c.features.get_child("bind", ns::BIND).is_some());
    c.bind(Some("later")).await.unwrap();
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let r = c.sasl2_login("alice", fast, &phone()).await.unwrap();
    assert_eq!(r.unwrap_err(), "not-authorized");
}

/// Logs alice in with SM enabled (resumable) inside SASL2; returns the
/// client and the stream id.
async fn resumable(node: &TestNode) -> (Client, String) {
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let ok = c
        .sasl2_login("alice", Sasl2Auth::Scram(HashAlg::Sha256, PW), &phone())
        .await
        .unwrap()
        .unwrap();
    let id = ok
        .success
        .get_child("bound", BIND2)
        .and_then(|b| b.get_child("enabled", SM))
        .and_then(|e| e.get_attr("id"))
        .expect("resumable SM")
        .to_owned();
    c.presence(0).await.unwrap();
    c.sync().await.unwrap();
    (c, id)
}

#[tokio::test]
async fn a_dropped_session_resumes_inside_sasl2_on_the_other_port() {
    let node = TestNode::with_users(&["alice", "bob"], PW).unwrap();
    let (c, id) = resumable(&node).await;
    let jid = c.jid.clone().unwrap();
    drop(c);
    let mut bob = Client::login_bound(&node, "bob", PW, "b").await.unwrap();
    bob.send(&message(&jid, "while away")).await.unwrap();
    bob.sync().await.unwrap();

    // The phone comes back on the direct-TLS port and resumes in the login.
    let mut c = Client::connect_direct_tls(node.c2s_tls, &node.domain)
        .await
        .unwrap();
    let opts = Sasl2Options {
        agent: Some(AGENT.into()),
        resume: Some((id.clone(), 0)),
        ..Sasl2Options::default()
    };
    let ok = c
        .sasl2_login("alice", Sasl2Auth::Scram(HashAlg::Sha256, PW), &opts)
        .await
        .unwrap()
        .unwrap();
    let resumed = ok.success.get_child("resumed", SM).expect("resumed inline");
    assert_eq!(resumed.get_attr("previd"), Some(id.as_str()));
    let m = c.recv_message(WAIT).await.unwrap();
    assert_eq!(body(&m).as_deref(), Some("while away"));
    // The same session: a message to the full JID still arrives.
    bob.send(&message(&jid, "after")).await.unwrap();
    let m = c.recv_message(WAIT).await.unwrap();
    assert_eq!(body(&m).as_deref(), Some("after"));
}

#[tokio::test]
async fn a_dropped_session_resumes_on_the_other_port_and_over_websocket() {
    // WebSocket over plain HTTP behind a TLS-terminating proxy, as the
    // HTTP transport tests run it.
    let node = TestNode::start_with(NodeOptions {
        extra_config: "[http]\nconsider_secure = true\n".into(),
        ..NodeOptions::default()
    })
    .unwrap();
    for u in ["alice", "bob"] {
        node.adduser(u, PW).unwrap();
    }
    let mut bob = Client::login_bound(&node, "bob", PW, "b").await.unwrap();
    for (round, connect) in ["direct-tls", "websocket"].into_iter().enumerate() {
        // Classic SM on the STARTTLS port.
        let mut c = Client::login_bound(&node, "alice", PW, "phone")
            .await
            .unwrap();
        c.send(&Element::new("enable", SM).attr("resume", "true"))
            .await
            .unwrap();
        let enabled = c.recv_until(|e| e.is("enabled", SM), WAIT).await.unwrap();
        assert!(enabled.get_attr("max").is_some());
        let id = enabled.get_attr("id").unwrap().to_owned();
        c.presence(0).await.unwrap();
        c.sync().await.unwrap();
        drop(c);
        let text = format!("missed {round}");
        bob.send(&message("alice@localhost/phone", &text))
            .await
            .unwrap();
        bob.sync().await.unwrap();

        let mut c = match connect {
            "direct-tls" => Client::connect_direct_tls(node.c2s_tls, &node.domain)
                .await
                .unwrap(),
            _ => Client::connect_websocket(node.http, &node.domain)
                .await
                .unwrap(),
        };
        c.login(
            "alice",
            PW,
            tests::client::Mechanism::Scram(HashAlg::Sha256),
        )
        .await
        .unwrap();
        let resumed = c.resume(&id, 0).await.unwrap();
        assert_eq!(resumed.get_attr("previd"), Some(id.as_str()), "{connect}");
        // (Round 1 first gets round 0's message again: it was never
        // acknowledged, so the ended session stored it rather than drop it.)
        c.recv_until(|e| body(e).as_deref() == Some(text.as_str()), WAIT)
            .await
            .unwrap_or_else(|e| panic!("{connect}: {e}"));
        c.send_raw("</stream:stream>").await.unwrap();
    }
}
