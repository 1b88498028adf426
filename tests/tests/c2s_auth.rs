//! Authentication against the real node over real TLS: every offered SASL
//! mechanism, channel binding, what is refused before TLS, and the
//! throttling of wrong passwords (RFC 6120 §5, §6).

use std::time::{Duration, Instant};

use tests::client::{condition, Client, Mechanism, WAIT};
use tests::node::TestNode;
use xmpp::element::Element;
use xmpp::sasl::client::ClientChannelBinding;
use xmpp::sasl::HashAlg;
use xmpp::stanza::ns;

const PW: &str = "correct horse battery staple";

fn node_with_alice() -> TestNode {
    let node = TestNode::start().expect("node starts");
    node.adduser("alice", PW).expect("adduser");
    node
}

/// Logs in with `mech` over STARTTLS, binds, and proves the session works.
async fn login_and_ping(node: &TestNode, mech: Mechanism) {
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    c.login("alice", PW, mech).await.unwrap();
    let jid = c.bind(Some("desk")).await.unwrap();
    assert_eq!(jid, "alice@localhost/desk");
    c.sync().await.unwrap();
}

#[tokio::test]
async fn starttls_then_scram_sha_1_256_512_each_log_in() {
    let node = node_with_alice();
    for h in HashAlg::ALL {
        login_and_ping(&node, Mechanism::Scram(h)).await;
    }
}

#[tokio::test]
async fn tls_features_offer_scram_plus_scram_and_plain() {
    let node = node_with_alice();
    let c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let mechs = c.mechanisms();
    for m in [
        "SCRAM-SHA-512-PLUS",
        "SCRAM-SHA-256-PLUS",
        "SCRAM-SHA-1-PLUS",
        "SCRAM-SHA-512",
        "SCRAM-SHA-256",
        "SCRAM-SHA-1",
        "PLAIN",
    ] {
        assert!(mechs.iter().any(|x| x == m), "{m} not offered: {mechs:?}");
    }
    assert!(
        c.features.get_child("starttls", ns::TLS).is_none(),
        "STARTTLS offered again inside TLS"
    );
}

#[tokio::test]
async fn direct_tls_port_logs_in() {
    let node = node_with_alice();
    let mut c = Client::connect_direct_tls(node.c2s_tls, &node.domain)
        .await
        .unwrap();
    assert!(c.is_tls());
    assert!(c.features.get_child("starttls", ns::TLS).is_none());
    c.login("alice", PW, Mechanism::Scram(HashAlg::Sha256))
        .await
        .unwrap();
    c.bind(Some("direct")).await.unwrap();
    c.sync().await.unwrap();
}

#[tokio::test]
async fn scram_sha_256_plus_with_tls_exporter_succeeds() {
    let node = node_with_alice();
    login_and_ping(&node, Mechanism::ScramPlusExporter(HashAlg::Sha256)).await;
}

#[tokio::test]
async fn scram_sha_1_plus_with_tls_server_end_point_succeeds() {
    let node = node_with_alice();
    login_and_ping(&node, Mechanism::ScramPlusEndPoint(HashAlg::Sha1)).await;
}

#[tokio::test]
async fn scram_plus_over_direct_tls_succeeds() {
    let node = node_with_alice();
    let mut c = Client::connect_direct_tls(node.c2s_tls, &node.domain)
        .await
        .unwrap();
    c.login("alice", PW, Mechanism::ScramPlusExporter(HashAlg::Sha512))
        .await
        .unwrap();
    c.bind(None).await.unwrap();
}

#[tokio::test]
async fn scram_plus_with_wrong_binding_data_fails() {
    let node = node_with_alice();
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let mut wrong = c.tls_exporter().expect("TLS 1.3");
    wrong[0] ^= 0xff;
    let r = c
        .try_login(
            "alice",
            PW,
            Mechanism::ScramWith(HashAlg::Sha256, ClientChannelBinding::TlsExporter(wrong)),
        )
        .await
        .unwrap();
    assert_eq!(
        r,
        Err("not-authorized".to_owned()),
        "login with another channel's binding data"
    );

    // Binding to a certificate hash that is not the server's fails too.
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let r = c
        .try_login(
            "alice",
            PW,
            Mechanism::ScramWith(
                HashAlg::Sha1,
                ClientChannelBinding::TlsServerEndPoint(vec![7u8; 32]),
            ),
        )
        .await
        .unwrap();
    assert_eq!(
        r,
        Err("not-authorized".to_owned()),
        "login with a foreign certificate hash"
    );
}

#[tokio::test]
async fn plain_over_tls_logs_in() {
    let node = node_with_alice();
    login_and_ping(&node, Mechanism::Plain).await;
}

#[tokio::test]
async fn plain_listener_requires_starttls_and_offers_no_mechanisms() {
    let node = node_with_alice();
    let c = Client::connect_plain(node.c2s, &node.domain).await.unwrap();
    let starttls = c
        .features
        .get_child("starttls", ns::TLS)
        .expect("<starttls/> offered");
    assert!(
        starttls.has_child("required", ns::TLS),
        "STARTTLS not required"
    );
    assert!(
        c.features.get_child("mechanisms", ns::SASL).is_none(),
        "mechanisms offered before TLS: {}",
        c.features.to_string_in(ns::CLIENT)
    );
}

#[tokio::test]
async fn auth_before_starttls_is_refused_with_encryption_required() {
    let node = node_with_alice();
    let mut c = Client::connect_plain(node.c2s, &node.domain).await.unwrap();
    let initial = xmpp::sasl::client::plain_initial_response(None, "alice", PW);
    use base64::Engine as _;
    let auth = Element::new("auth", ns::SASL)
        .attr("mechanism", "PLAIN")
        .text(base64::engine::general_purpose::STANDARD.encode(initial));
    c.send(&auth).await.unwrap();
    let reply = c.recv(WAIT).await.unwrap();
    assert!(
        reply.is("failure", ns::SASL),
        "{}",
        reply.to_string_in(ns::CLIENT)
    );
    assert_eq!(condition(&reply).as_deref(), Some("encryption-required"));
    // The stream stays usable for STARTTLS, after which login works.
    c.starttls().await.unwrap();
    c.login("alice", PW, Mechanism::Scram(HashAlg::Sha256))
        .await
        .unwrap();
}

#[tokio::test]
async fn stanza_before_starttls_gets_a_stream_error() {
    let node = node_with_alice();
    let mut c = Client::connect_plain(node.c2s, &node.domain).await.unwrap();
    c.send_raw("<message to='alice@localhost'><body>hi</body></message>")
        .await
        .unwrap();
    let cond = c.expect_stream_error(WAIT).await.unwrap();
    assert_eq!(cond, "not-authorized");
}

#[tokio::test]
async fn wrong_password_is_not_authorized() {
    let node = node_with_alice();
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let r = c
        .try_login("alice", "wrong", Mechanism::Scram(HashAlg::Sha256))
        .await
        .unwrap();
    assert_eq!(r, Err("not-authorized".to_owned()));
    // PLAIN says the same.
    let r = c
        .try_login("alice", "wrong", Mechanism::Plain)
        .await
        .unwrap();
    assert_eq!(r, Err("not-authorized".to_owned()));
}

#[tokio::test]
async fn unknown_user_is_not_authorized() {
    let node = node_with_alice();
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    let r = c
        .try_login("nobody", PW, Mechanism::Scram(HashAlg::Sha256))
        .await
        .unwrap();
    assert_eq!(r, Err("not-authorized".to_owned()));
    let r = c.try_login("nobody", PW, Mechanism::Plain).await.unwrap();
    assert_eq!(r, Err("not-authorized".to_owned()));
}

#[tokio::test]
async fn repeated_failures_from_one_address_take_longer_each_time() {
    // The harness configures failure_delay_ms = 100: the n-th failure from
    // an address is answered after at least 100 * 2^(n-1) ms. Only lower
    // bounds are checked: the machine is shared and noisy.
    let node = node_with_alice();
    for (n, min_ms) in [(1, 100u64), (2, 200), (3, 400)] {
        let mut c = Client::connect_starttls(node.c2s, &node.domain)
            .await
            .unwrap();
        let t = Instant::now();
        let r = c
            .try_login("alice", "wrong", Mechanism::Scram(HashAlg::Sha1))
            .await
            .unwrap();
        let took = t.elapsed();
        assert_eq!(r, Err("not-authorized".to_owned()));
        assert!(
            took >= Duration::from_millis(min_ms),
            "failure {n} answered after {took:?}, expected at least {min_ms} ms"
        );
    }
    // The right password still works (a delay, not a lockout).
    login_and_ping(&node, Mechanism::Scram(HashAlg::Sha256)).await;
}

#[tokio::test]
async fn too_many_failures_on_one_stream_close_it() {
    let node = node_with_alice();
    let mut c = Client::connect_starttls(node.c2s, &node.domain)
        .await
        .unwrap();
    // max_attempts_per_stream defaults to 3.
    for _ in 0..3 {
        let r = c
            .try_login("alice", "wrong", Mechanism::Plain)
            .await
            .unwrap();
        assert_eq!(r, Err("not-authorized".to_owned()));
    }
    let cond = c.expect_stream_error(WAIT).await.unwrap();
    assert_eq!(cond, "policy-violation");
}
