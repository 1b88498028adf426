//! Federation with real servers nobody here wrote, both from Debian and
//! installed by `.ci/run`: Prosody 0.12 and ejabberd 23.01. Our user and
//! theirs become contacts, see each other's presence and exchange messages
//! in both directions, over STARTTLS. Once with self-signed certificates
//! on both sides, so the domains authenticate with Server Dialback
//! (XEP-0220) each way: the peer checks our keys by connecting back to us,
//! we check its keys by connecting to it. Once with certificates from a
//! test CA that both sides trust and dialback off on both, so the domains
//! authenticate with SASL EXTERNAL each way.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use tests::client::{body, Client, Mechanism};
use tests::ejabberd::Ejabberd;
use tests::node::{fresh_ip, NodeOptions, TestNode};
use tests::prosody::{CaSigned, Prosody};
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

/// A test CA (`clusterctl certs init`) with a certificate for our domain
/// and one for the peer's: `(dir, ours, theirs)`.
fn test_ca(ours: &str, theirs: &str) -> (tempfile::TempDir, CaSigned, CaSigned) {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = std::process::Command::new(tests::node::bin("clusterctl"))
        .args(["certs", "init", "--dir"])
        .arg(dir.path())
        .arg("--node")
        .arg(format!("1={ours}"))
        .arg("--node")
        .arg(format!("2={theirs}"))
        .output()
        .expect("clusterctl certs init");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let p = |n: &str| dir.path().join(n);
    let signed = |i: u32| CaSigned {
        ca: p("ca.crt"),
        cert: p(&format!("node-{i}.crt")),
        key: p(&format!("node-{i}.key")),
    };
    let (a, b) = (signed(1), signed(2));
    (dir, a, b)
}

/// Our node serves `certs` for its only virtual host, trusts their CA
/// alone and accepts nothing but a valid certificate from any peer.
fn use_certificates(node: &TestNode, certs: &CaSigned) {
    let text = std::fs::read_to_string(&node.config_path).expect("config");
    let line = format!("[[vhosts]]\nname = \"{}\"\n", node.domain);
    assert!(text.contains(&line), "{text}");
    let with = format!(
        "{line}tls_cert = {:?}\ntls_key = {:?}\n",
        certs.cert, certs.key
    );
    std::fs::write(&node.config_path, text.replacen(&line, &with, 1)).expect("write config");
    node.append_config(&format!(
        "[s2s]\nca_file = {:?}\nwebpki_roots = false\ndefault_policy = \"certificate\"\n",
        certs.ca
    ))
    .expect("s2s trust");
}

/// alice@ours.test and `peer_user` (logged in at the peer) become
/// contacts both ways, see each other and chat both ways; our side of the
/// streams authenticated the peer by `auth` (as `clusterctl s2s` says it).
async fn contacts_and_chat(
    ours: &TestNode,
    our_domain: &str,
    mut them: Client,
    peer_user: &str,
    peer_domain: &str,
    auth: &str,
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

    // Our side of it: both directions up, authenticated as expected.
    let status = ours.clusterctl(&["s2s"]).expect("clusterctl s2s");
    for direction in ["outbound", "inbound"] {
        assert!(
            status
                .lines()
                .any(|l| l.contains(peer_domain) && l.contains(direction) && l.contains(auth)),
            "{direction} {auth}: {status}\n{}",
            logs("")
        );
    }
}

async fn with_prosody(certificates: bool) {
    let (our_ip, their_ip) = (fresh_ip(), fresh_ip());
    let mut ours = our_node(our_ip);
    let ca = certificates.then(|| test_ca("ours.test", "pros.test"));
    if let Some((_, our_cert, _)) = &ca {
        use_certificates(&ours, our_cert);
    }
    let prosody = Prosody::start_with(
        "pros.test",
        their_ip,
        &[("ours.test", our_ip)],
        ca.as_ref().map(|(_, _, theirs)| theirs),
    )
    .expect("prosody starts");
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
    let auth = if certificates {
        "sasl-external"
    } else {
        "dialback"
    };
    contacts_and_chat(&ours, "ours.test", pat, "pat", "pros.test", auth, logs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_and_we_become_contacts_and_chat_both_ways() {
    with_prosody(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_and_we_authenticate_with_certificates_sasl_external() {
    with_prosody(true).await;
}

/// ejabberd finds a peer's address through the system resolver only (its
/// SRV lookups go to [`tests::dns::Dns`]): `.ci/run` puts this name and
/// address, used by no other test, into /etc/hosts.
const EJ_PEER: (&str, [u8; 4]) = ("ours-ej.test", [127, 0, 77, 1]);
/// The ejabberd tests take turns at that one address and its port 5269.
static EJ_TURN: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn with_ejabberd(certificates: bool) {
    let _turn = EJ_TURN.lock().await;
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
    let ca = certificates.then(|| test_ca(domain, "ej.test"));
    if let Some((_, our_cert, _)) = &ca {
        use_certificates(&ours, our_cert);
    }
    let ejabberd = Ejabberd::start_with(
        "ej.test",
        fresh_ip(),
        &[(domain, ip)],
        ca.as_ref().map(|(_, _, theirs)| theirs),
    )
    .expect("ejabberd starts");
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
        .unwrap_or_else(|e| panic!("eve connects: {e}\n{}", ejabberd.log()));
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
    let auth = if certificates {
        "sasl-external"
    } else {
        "dialback"
    };
    contacts_and_chat(&ours, domain, eve, "eve", "ej.test", auth, logs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_and_we_become_contacts_and_chat_both_ways() {
    with_ejabberd(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_and_we_authenticate_with_certificates_sasl_external() {
    with_ejabberd(true).await;
}
