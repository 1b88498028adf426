//! XMPP over HTTP, end to end over real HTTP/1.1 connections: BOSH
//! (XEP-0124/0206) at `/http-bind` and WebSocket (RFC 7395) at
//! `/xmpp-websocket`, sessions like any other (SCRAM, bind, routing to and
//! from TCP clients, stream management), the BOSH request rules (`rid`
//! window, repeated and dropped requests, inactivity) and XEP-0156
//! discovery. Plain HTTP here, so the node is told it is behind a
//! TLS-terminating proxy (`http.consider_secure`).

use std::net::SocketAddr;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use tests::client::{body, Client, Mechanism, WAIT};
use tests::http::{bosh_post, request, ws_connect, BOSH_NS, XBOSH_NS};
use tests::node::{NodeOptions, TestNode};
use xmpp::element::Element;
use xmpp::sasl::HashAlg;
use xmpp::stanza::ns;

const PW: &str = "secret";
const SM: &str = "urn:xmpp:sm:3";

fn node(extra: &str) -> TestNode {
    let node = TestNode::start_with(NodeOptions {
        extra_config: format!("[http]\nconsider_secure = true\n{extra}"),
        ..NodeOptions::default()
    })
    .expect("node starts");
    node.adduser("alice", PW).expect("alice");
    node.adduser("bob", PW).expect("bob");
    node
}

fn chat(to: &str, text: &str) -> Element {
    Element::new("message", ns::CLIENT)
        .attr("to", to)
        .attr("type", "chat")
        .child(Element::new("body", ns::CLIENT).text(text))
}

fn presence(to: &str, ptype: &str) -> Element {
    Element::new("presence", ns::CLIENT)
        .attr("to", to)
        .attr("type", ptype)
}

/// SCRAM-SHA-256 (no channel binding: HTTP gives none), then bind.
async fn login(c: &mut Client, user: &str, resource: &str) {
    c.login(user, PW, Mechanism::Scram(HashAlg::Sha256))
        .await
        .expect("SCRAM login");
    c.bind(Some(resource))
        .await
        .unwrap_or_else(|e| panic!("bind: {e:#}; pending {:?}", c.take_pending()));
}

/// `http_user` (over HTTP) and bob (over TCP) chat both ways, to full
/// and to bare JIDs.
async fn chats_with_a_tcp_client(node: &TestNode, mut http_user: Client) {
    let mut bob = Client::login_bound(node, "bob", PW, "desk")
        .await
        .expect("bob");
    http_user.presence(1).await.expect("presence");
    bob.presence(1).await.expect("presence");
    let me = http_user.full_jid().to_owned();
    bob.send(&chat(&me, "to your browser")).await.expect("send");
    let m = http_user.recv_message(WAIT).await.expect("message arrives");
    assert_eq!(body(&m).as_deref(), Some("to your browser"));
    assert_eq!(m.get_attr("from"), Some("bob@localhost/desk"));
    bob.send(&chat("alice@localhost", "to your bare JID"))
        .await
        .expect("send");
    let m = http_user.recv_message(WAIT).await.expect("message arrives");
    assert_eq!(body(&m).as_deref(), Some("to your bare JID"));
    http_user
        .send(&chat("bob@localhost", "back at you"))
        .await
        .expect("send");
    let m = bob.recv_message(WAIT).await.expect("bob gets it");
    assert_eq!(body(&m).as_deref(), Some("back at you"));
    assert_eq!(m.get_attr("from"), Some(me.as_str()));
    // An IQ answered by the server itself.
    let ping = http_user.make_iq("get", Some("localhost"), Element::new("ping", ns::PING));
    let pong = http_user.iq(ping).await.expect("ping");
    assert_eq!(pong.get_attr("type"), Some("result"));
}

// ================================================================ BOSH

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bosh_session_logs_in_with_scram_binds_and_chats_with_a_tcp_client() {
    let node = node("");
    let mut alice = Client::connect_bosh(node.http, &node.domain)
        .await
        .unwrap_or_else(|e| panic!("BOSH session: {e}\n{}", node.log()));
    assert!(
        alice.mechanisms().iter().any(|m| m == "SCRAM-SHA-256"),
        "{:?}",
        alice.mechanisms()
    );
    assert!(
        !alice.mechanisms().iter().any(|m| m.ends_with("-PLUS")),
        "no channel binding over HTTP: {:?}",
        alice.mechanisms()
    );
    login(&mut alice, "alice", "browser").await;
    assert_eq!(alice.full_jid(), "alice@localhost/browser");
    chats_with_a_tcp_client(&node, alice).await;
}

/// A BOSH session driven request by request: `rid` and `sid` in the
/// test's hands.
struct RawBosh {
    addr: SocketAddr,
    sid: String,
    rid: u64,
    /// Everything the server sent so far, in order.
    got: Vec<Element>,
}

impl RawBosh {
    /// Creates a session (`wait` seconds, `hold='1'`); returns it and the
    /// creation response.
    async fn create(addr: SocketAddr, wait: u64) -> (RawBosh, Element) {
        let rid = 4_000_000;
        let answer = bosh_post(
            addr,
            format!(
                "<body xmlns='{BOSH_NS}' xmlns:xmpp='{XBOSH_NS}' content='text/xml; charset=utf-8' hold='1' rid='{rid}' to='localhost' ver='1.11' wait='{wait}' xmpp:version='1.0'/>"
            ),
        )
        .await
        .expect("session creation");
        let sid = answer.get_attr("sid").expect("a sid").to_owned();
        let mut me = RawBosh {
            addr,
            sid,
            rid,
            got: Vec::new(),
        };
        me.got.extend(answer.elements().cloned());
        (me, answer)
    }

    fn body(&self, rid: u64, attrs: &str, payload: &str) -> String {
        format!(
            "<body xmlns='{BOSH_NS}' xmlns:xmpp='{XBOSH_NS}' rid='{rid}' sid='{}'{attrs}>{payload}</body>",
            self.sid
        )
    }

    /// The next request, with `payload`; its answer's children are kept.
    async fn post(&mut self, attrs: &str, payload: &str) -> (u64, String, Element) {
        self.rid += 1;
        let text = self.body(self.rid, attrs, payload);
        let answer = bosh_post(self.addr, text.clone()).await.expect("request");
        self.got.extend(answer.elements().cloned());
        (self.rid, text, answer)
    }

    /// Posts empty polls until an element matching `pred` has come.
    async fn until(&mut self, pred: impl Fn(&Element) -> bool) -> Element {
        for _ in 0..20 {
            if let Some(i) = self.got.iter().position(&pred) {
                return self.got.remove(i);
            }
            self.post("", "").await;
        }
        panic!("never came; got {:?}", self.got);
    }

    /// SASL PLAIN (allowed: the node counts HTTP as secure here),
    /// restart, bind.
    async fn login(&mut self, user: &str, resource: &str) {
        self.until(|e| e.is("features", ns::STREAM)).await;
        let plain = B64.encode(format!("\0{user}\0{PW}"));
        self.post(
            "",
            &format!(
                "<auth xmlns='{}' mechanism='PLAIN'>{plain}</auth>",
                ns::SASL
            ),
        )
        .await;
        self.until(|e| e.is("success", ns::SASL)).await;
        self.post(" to='localhost' xmpp:restart='true'", "").await;
        self.until(|e| e.is("features", ns::STREAM)).await;
        self.post(
            "",
            &format!(
                "<iq xmlns='jabber:client' type='set' id='b1'><bind xmlns='{}'><resource>{resource}</resource></bind></iq>",
                ns::BIND
            ),
        )
        .await;
        self.until(|e| e.name == "iq" && e.get_attr("id") == Some("b1"))
            .await;
    }
}

fn is_terminate(answer: &Element, condition: &str) -> bool {
    answer.get_attr("type") == Some("terminate") && answer.get_attr("condition") == Some(condition)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_rid_gets_the_same_answer_and_an_out_of_window_rid_terminates() {
    let node = node("");
    let (mut s, created) = RawBosh::create(node.http, 5).await;
    // XEP-0124 §7: the session's terms, within what the node allows.
    assert_eq!(created.get_attr("requests"), Some("2"), "{created:?}");
    assert_eq!(created.get_attr("hold"), Some("1"));
    assert_eq!(created.get_attr("wait"), Some("5"));
    assert!(created.get_attr("inactivity").is_some());
    assert!(s.sid.len() >= 20, "an unguessable sid, not {:?}", s.sid);
    s.until(|e| e.is("features", ns::STREAM)).await;
    let plain = B64.encode(format!("\0alice\0{PW}"));
    let (rid, text, answer) = s
        .post(
            "",
            &format!(
                "<auth xmlns='{}' mechanism='PLAIN'>{plain}</auth>",
                ns::SASL
            ),
        )
        .await;
    let mut answer = answer;
    let mut rid = rid;
    let mut text = text;
    while !answer.has_child("success", ns::SASL) {
        (rid, text, answer) = s.post("", "").await;
    }
    // The client never saw that answer and sends the request again: it
    // gets the same answer, and the SASL exchange is not run twice.
    let again = bosh_post(node.http, text).await.expect("repeat");
    assert_eq!(
        again.to_string_in(BOSH_NS),
        answer.to_string_in(BOSH_NS),
        "rid {rid} answered differently the second time"
    );
    // The session goes on after the repeat.
    s.post(" to='localhost' xmpp:restart='true'", "").await;
    s.until(|e| e.is("features", ns::STREAM)).await;
    // A rid beyond the window (requests='2') ends the session.
    let far = s.rid + 5;
    let answer = bosh_post(node.http, s.body(far, "", ""))
        .await
        .expect("far rid");
    assert!(
        is_terminate(&answer, "item-not-found"),
        "{}",
        answer.to_string_in(BOSH_NS)
    );
    // And the session is gone.
    let (_, _, after) = s.post("", "").await;
    assert_eq!(after.get_attr("type"), Some("terminate"), "{after:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rid_older_than_the_window_terminates_the_session() {
    let node = node("");
    let (mut s, _) = RawBosh::create(node.http, 2).await;
    s.until(|e| e.is("features", ns::STREAM)).await;
    for _ in 0..4 {
        s.post("", "").await;
    }
    let old = s.rid - 4;
    let answer = bosh_post(node.http, s.body(old, "", ""))
        .await
        .expect("old rid");
    assert!(
        is_terminate(&answer, "item-not-found"),
        "{}",
        answer.to_string_in(BOSH_NS)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bosh_session_survives_a_dropped_long_poll() {
    let node = node("");
    let (mut s, _) = RawBosh::create(node.http, 3).await;
    s.login("alice", "browser").await;
    s.post("", "<presence xmlns='jabber:client'/>").await;
    let mut bob = Client::login_bound(&node, "bob", PW, "desk")
        .await
        .expect("bob");
    // A long poll whose connection dies before any answer (a phone
    // changing networks): written whole, then the socket is closed.
    s.rid += 1;
    let lost = s.body(s.rid, "", "");
    {
        use tokio::io::AsyncWriteExt as _;
        let mut tcp = tokio::net::TcpStream::connect(node.http)
            .await
            .expect("connect");
        let req = format!(
            "POST /http-bind HTTP/1.1\r\nHost: {}\r\nContent-Type: text/xml\r\nContent-Length: {}\r\n\r\n{lost}",
            node.http,
            lost.len()
        );
        tcp.write_all(req.as_bytes()).await.expect("write");
    }
    bob.send(&chat("alice@localhost/browser", "while you were gone"))
        .await
        .expect("send");
    bob.sync().await.expect("bob's message is routed");
    // The client sends the lost request again, then goes on polling: the
    // message comes exactly once.
    let answer = bosh_post(node.http, lost).await.expect("retransmission");
    s.got.extend(answer.elements().cloned());
    let m = s
        .until(|e| e.name == "message" && body(e).as_deref() == Some("while you were gone"))
        .await;
    assert_eq!(m.get_attr("from"), Some("bob@localhost/desk"));
    s.post("", "").await;
    assert!(
        !s.got.iter().any(|e| e.name == "message"),
        "delivered twice: {:?}",
        s.got
    );
    // Still the same live session.
    s.post(
        "",
        "<message xmlns='jabber:client' to='bob@localhost/desk' type='chat'><body>still here</body></message>",
    )
    .await;
    let m = bob.recv_message(WAIT).await.expect("bob gets it");
    assert_eq!(body(&m).as_deref(), Some("still here"));
}

/// `a` asks for `b`'s presence and `b` approves.
async fn befriend_one_way(a: &mut Client, b: &mut Client) {
    let (aj, bj) = (a.bare_jid().to_owned(), b.bare_jid().to_owned());
    a.send(&presence(&bj, "subscribe"))
        .await
        .expect("subscribe");
    b.recv_until(
        |e| e.name == "presence" && e.get_attr("type") == Some("subscribe"),
        WAIT,
    )
    .await
    .expect("request arrives");
    b.send(&presence(&aj, "subscribed")).await.expect("approve");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abandoned_bosh_session_times_out_and_contacts_see_it_go() {
    let node = node("bosh_inactivity_secs = 2\nbosh_max_wait_secs = 1\n");
    let mut alice = Client::connect_bosh(node.http, &node.domain)
        .await
        .expect("BOSH session");
    login(&mut alice, "alice", "browser").await;
    let mut bob = Client::login_bound(&node, "bob", PW, "desk")
        .await
        .expect("bob");
    bob.presence(1).await.expect("bob online");
    alice.presence(1).await.expect("alice online");
    // Contacts both ways.
    befriend_one_way(&mut alice, &mut bob).await;
    befriend_one_way(&mut bob, &mut alice).await;
    let from_alice = |e: &Element, t: Option<&str>| {
        e.name == "presence"
            && e.get_attr("from") == Some("alice@localhost/browser")
            && e.get_attr("type") == t
    };
    bob.recv_until(|e| from_alice(e, None), WAIT)
        .await
        .expect("bob sees alice online");
    // The tab is closed: no more requests, no terminate.
    drop(alice);
    bob.recv_until(
        |e| from_alice(e, Some("unavailable")),
        Duration::from_secs(15),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bosh_requests_that_are_not_bodies_get_clear_errors() {
    let node = node("");
    let r = request(node.http, "POST", "/http-bind", &[], "this is not XML")
        .await
        .expect("request");
    assert_eq!(r.status, 400, "{r:?}");
    let unknown = bosh_post(
        node.http,
        format!("<body xmlns='{BOSH_NS}' rid='10' sid='no-such-session'/>"),
    )
    .await
    .expect("unknown sid");
    assert!(is_terminate(&unknown, "item-not-found"), "{unknown:?}");
    // CORS preflight for a page on another origin.
    let r = request(
        node.http,
        "OPTIONS",
        "/http-bind",
        &[
            ("Origin", "https://chat.example"),
            ("Access-Control-Request-Method", "POST"),
        ],
        "",
    )
    .await
    .expect("preflight");
    assert!(r.status == 200 || r.status == 204, "{r:?}");
    assert!(r.header("access-control-allow-origin").is_some(), "{r:?}");
}

// ================================================================ WebSocket

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_session_logs_in_with_scram_binds_and_chats_with_a_tcp_client() {
    let node = node("");
    let mut alice = Client::connect_websocket(node.http, &node.domain)
        .await
        .unwrap_or_else(|e| panic!("WebSocket session: {e}\n{}", node.log()));
    login(&mut alice, "alice", "browser").await;
    assert_eq!(alice.full_jid(), "alice@localhost/browser");
    chats_with_a_tcp_client(&node, alice).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_websocket_without_the_xmpp_subprotocol_or_from_a_foreign_origin_is_refused() {
    let node = node("allowed_origins = [\"https://chat.example\"]\n");
    let err = ws_connect(node.http, "/xmpp-websocket", &[])
        .await
        .expect_err("no subprotocol: refused");
    assert!(format!("{err:#}").contains("400"), "{err:#}");
    let err = ws_connect(
        node.http,
        "/xmpp-websocket",
        &[
            ("Sec-WebSocket-Protocol", "xmpp"),
            ("Origin", "https://evil.example"),
        ],
    )
    .await
    .expect_err("foreign origin: refused");
    assert!(format!("{err:#}").contains("403"), "{err:#}");
    ws_connect(
        node.http,
        "/xmpp-websocket",
        &[
            ("Sec-WebSocket-Protocol", "xmpp"),
            ("Origin", "https://chat.example"),
        ],
    )
    .await
    .expect("the allowed origin gets in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_xml_over_websocket_closes_that_session_alone() {
    let node = node("");
    let mut alice = Client::connect_websocket(node.http, &node.domain)
        .await
        .expect("alice");
    login(&mut alice, "alice", "browser").await;
    let mut bob = Client::connect_websocket(node.http, &node.domain)
        .await
        .expect("bob");
    login(&mut bob, "bob", "tab").await;
    alice
        .send_raw("<message to='bob@localhost'><body>oops</wrong></message>")
        .await
        .expect("send");
    let cond = alice
        .expect_stream_error(WAIT)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", node.log()));
    assert_eq!(cond, "not-well-formed");
    // Bob's session is untouched.
    let ping = bob.make_iq("get", Some("localhost"), Element::new("ping", ns::PING));
    let pong = bob.iq(ping).await.expect("bob still served");
    assert_eq!(pong.get_attr("type"), Some("result"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_dropped_over_tcp_resumes_over_websocket() {
    let node = node("");
    let mut bob = Client::login_bound(&node, "bob", PW, "phone")
        .await
        .expect("bob");
    bob.send(&Element::new("enable", SM).attr("resume", "true"))
        .await
        .expect("enable");
    let enabled = bob
        .recv_until(|e| e.is("enabled", SM), WAIT)
        .await
        .expect("enabled");
    let id = enabled.get_attr("id").expect("resumption id").to_owned();
    bob.presence(0).await.expect("presence");
    let mut alice = Client::login_bound(&node, "alice", PW, "a")
        .await
        .expect("alice");
    alice
        .send(&chat("bob@localhost/phone", "first"))
        .await
        .expect("send");
    bob.recv_message(WAIT).await.expect("first arrives");
    // The TCP connection dies; the session waits for bob.
    drop(bob);
    alice
        .send(&chat("bob@localhost/phone", "while away"))
        .await
        .expect("send");
    alice.sync().await.expect("routed");
    // Bob comes back from a browser.
    let mut bob = Client::connect_websocket(node.http, &node.domain)
        .await
        .expect("WebSocket");
    bob.login("bob", PW, Mechanism::Scram(HashAlg::Sha256))
        .await
        .expect("login");
    // Bob acknowledges nothing: what he saw comes again, then the rest.
    bob.send(
        &Element::new("resume", SM)
            .attr("previd", id.as_str())
            .attr("h", "0"),
    )
    .await
    .expect("resume");
    let resumed = bob
        .recv_until(|e| e.is("resumed", SM) || e.is("failed", SM), WAIT)
        .await
        .expect("an answer");
    assert!(
        resumed.is("resumed", SM),
        "{}\n{}",
        resumed.to_string_in(ns::CLIENT),
        node.log()
    );
    let mut texts = Vec::new();
    while texts.last().map(String::as_str) != Some("while away") {
        let m = bob.recv_message(WAIT).await.expect("what it missed");
        texts.push(body(&m).unwrap_or_default());
    }
    assert_eq!(texts, ["first", "while away"]);
    alice
        .send(&chat("bob@localhost/phone", "after"))
        .await
        .expect("send");
    let m = bob
        .recv_message(WAIT)
        .await
        .expect("same session, new transport");
    assert_eq!(body(&m).as_deref(), Some("after"));
}

// ================================================================ discovery

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_meta_names_both_endpoints() {
    let node = node("");
    let xrd = request(node.http, "GET", "/.well-known/host-meta", &[], "")
        .await
        .expect("host-meta");
    assert_eq!(xrd.status, 200, "{xrd:?}");
    // Behind a TLS-terminating proxy (`consider_secure`), the links say
    // https and wss.
    let bosh = format!("https://{}/http-bind", node.http);
    let ws = format!("wss://{}/xmpp-websocket", node.http);
    let xml = xrd
        .body
        .split_once("?>")
        .map_or(xrd.body.as_str(), |(_, rest)| rest);
    let doc = tests::http::parse_element(xml.trim()).expect("XRD is XML");
    let links: Vec<(String, String)> = doc
        .elements()
        .filter(|l| l.name == "Link")
        .map(|l| {
            (
                l.get_attr("rel").unwrap_or_default().to_owned(),
                l.get_attr("href").unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert!(
        links.contains(&("urn:xmpp:alt-connections:xbosh".into(), bosh.clone())),
        "{links:?}"
    );
    assert!(
        links.contains(&("urn:xmpp:alt-connections:websocket".into(), ws.clone())),
        "{links:?}"
    );
    let json = request(node.http, "GET", "/.well-known/host-meta.json", &[], "")
        .await
        .expect("host-meta.json");
    assert_eq!(json.status, 200, "{json:?}");
    let v: serde_json::Value = serde_json::from_str(&json.body).expect("JSON");
    let links = v["links"].as_array().expect("links");
    for (rel, href) in [
        ("urn:xmpp:alt-connections:xbosh", &bosh),
        ("urn:xmpp:alt-connections:websocket", &ws),
    ] {
        assert!(
            links
                .iter()
                .any(|l| l["rel"] == rel && l["href"].as_str() == Some(href.as_str())),
            "{links:?}"
        );
    }
}
