//! HTTP File Upload (XEP-0363) end to end against the real binary: the
//! `upload.<vhost>` service is found through disco, hands out slots, and
//! a file PUT over HTTPS comes back byte for byte with its type; a file
//! over the size limit is refused with the limit, the quota refuses the
//! next file, a PUT of the wrong length or type is refused, unknown slots
//! and names are 404, users of other domains get no slot; in a cluster a
//! file PUT to one node is fetched through another.

use rand::Rng as _;
use tests::client::{stanza_error, Client};
use tests::http::{https_request, BytesResponse};
use tests::node::{NodeOptions, TestNode};
use xmpp::element::Element;
use xmpp::stanza::ns;

const PW: &str = "secret";
const UPLOAD: &str = "urn:xmpp:http:upload:0";
const SERVICE: &str = "upload.localhost";
const LIMITS: &str = "[upload]\nmax_file_size = 100000\nquota_per_user = 250000\n";

fn node_with(extra: &str, vhosts: &[&str]) -> TestNode {
    let node = TestNode::start_with(NodeOptions {
        vhosts: vhosts.iter().map(|v| v.to_string()).collect(),
        extra_config: extra.into(),
        ..NodeOptions::default()
    })
    .expect("node starts");
    for u in ["alice", "bob"] {
        node.adduser(u, PW).expect("adduser");
    }
    node
}

fn random_bytes(n: usize) -> Vec<u8> {
    let mut rng = rand::thread_rng();
    (0..n).map(|_| rng.gen()).collect()
}

async fn ask_slot(c: &mut Client, name: &str, size: usize, content_type: &str) -> Element {
    let req = Element::new("request", UPLOAD)
        .attr("filename", name)
        .attr("size", size.to_string())
        .attr("content-type", content_type);
    let iq = c.make_iq("get", Some(SERVICE), req);
    c.iq(iq).await.expect("an answer to the slot request")
}

/// The PUT and GET URLs of a slot answer.
fn urls(reply: &Element) -> (String, String) {
    let slot = reply
        .get_child("slot", UPLOAD)
        .unwrap_or_else(|| panic!("no slot in {}", reply.to_string_in(ns::CLIENT)));
    let url = |n: &str| {
        slot.get_child(n, UPLOAD)
            .and_then(|e| e.get_attr("url"))
            .unwrap_or_else(|| panic!("no {n} url"))
            .to_owned()
    };
    (url("put"), url("get"))
}

/// The path of an `https://host:port/path` URL.
fn path_of(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    rest.find('/').map_or("/".into(), |i| rest[i..].to_owned())
}

async fn put(node: &TestNode, url: &str, content_type: &str, body: &[u8]) -> BytesResponse {
    https_request(
        node.https,
        "localhost",
        "PUT",
        &path_of(url),
        &[("Content-Type", content_type)],
        body,
    )
    .await
    .expect("PUT answered")
}

/// A PUT the server must refuse from its headers alone: the body is
/// declared and never sent (a server that answers before reading a body
/// may reset the connection under the rest of it, losing its answer).
async fn put_refused(node: &TestNode, url: &str, content_type: &str, length: usize) -> u16 {
    let length = length.to_string();
    let r = https_request(
        node.https,
        "localhost",
        "PUT",
        &path_of(url),
        &[("Content-Type", content_type), ("Content-Length", &length)],
        b"",
    )
    .await
    .expect("PUT answered");
    r.status
}

async fn fetch(node: &TestNode, method: &str, url: &str) -> BytesResponse {
    https_request(node.https, "localhost", method, &path_of(url), &[], b"")
        .await
        .expect("GET answered")
}

fn error_text(reply: &Element) -> String {
    reply
        .get_child("error", ns::CLIENT)
        .and_then(|e| e.child_text("text", "urn:ietf:params:xml:ns:xmpp-stanzas"))
        .unwrap_or_default()
}

#[tokio::test]
async fn a_file_goes_up_over_https_and_comes_back_byte_for_byte() {
    let node = node_with(LIMITS, &["localhost"]);
    let mut alice = Client::login_bound(&node, "alice", PW, "a").await.unwrap();

    // The service is among the server's items, and says what it is.
    let ask = alice.make_iq(
        "get",
        Some("localhost"),
        Element::new("query", ns::DISCO_ITEMS),
    );
    let items = alice.iq(ask).await.unwrap();
    let listed = items
        .get_child("query", ns::DISCO_ITEMS)
        .map(|q| q.elements().any(|i| i.get_attr("jid") == Some(SERVICE)));
    assert_eq!(listed, Some(true), "{}", items.to_string_in(ns::CLIENT));
    let ask = alice.make_iq("get", Some(SERVICE), Element::new("query", ns::DISCO_INFO));
    let info = alice.iq(ask).await.unwrap();
    let q = info.get_child("query", ns::DISCO_INFO).expect("disco#info");
    assert!(q.elements().any(|e| e.name == "identity"
        && e.get_attr("category") == Some("store")
        && e.get_attr("type") == Some("file")));
    assert!(q
        .elements()
        .any(|e| e.name == "feature" && e.get_attr("var") == Some(UPLOAD)));
    let form = q
        .get_child("x", xmpp::forms::NS)
        .and_then(xmpp::forms::Submitted::read)
        .expect("a data form");
    assert_eq!(form.value("FORM_TYPE"), Some(UPLOAD));
    assert_eq!(form.value("max-file-size"), Some("100000"));

    let data = random_bytes(70_000);
    let name = "hello wörld.bin";
    let reply = ask_slot(&mut alice, name, data.len(), "application/x-test").await;
    let (put_url, get_url) = urls(&reply);
    assert!(
        put_url.starts_with(&format!("https://localhost:{}/upload/", node.https.port())),
        "{put_url}"
    );
    assert!(put_url.ends_with("/hello%20w%C3%B6rld.bin"), "{put_url}");

    // Nothing to fetch before the PUT.
    assert_eq!(fetch(&node, "GET", &get_url).await.status, 404);
    let r = put(&node, &put_url, "application/x-test", &data).await;
    assert_eq!(r.status, 201, "{}", String::from_utf8_lossy(&r.body));

    let got = fetch(&node, "GET", &get_url).await;
    assert_eq!(got.status, 200);
    assert!(got.body == data, "the file came back different");
    assert_eq!(got.header("content-type"), Some("application/x-test"));
    assert_eq!(got.header("content-length"), Some("70000"));
    assert_eq!(got.header("x-content-type-options"), Some("nosniff"));
    let disposition = got.header("content-disposition").unwrap_or_default();
    assert!(disposition.starts_with("attachment;"), "{disposition}");
    let head = fetch(&node, "HEAD", &get_url).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("70000"));
    assert!(head.body.is_empty());

    // One PUT per slot.
    assert_eq!(
        put_refused(&node, &put_url, "application/x-test", data.len()).await,
        409
    );
    assert!(fetch(&node, "GET", &get_url).await.body == data);

    // A slot is only found with its own name; unknown slots are not found.
    let slot_path = path_of(&get_url);
    let (dir, _) = slot_path.rsplit_once('/').unwrap();
    let other_name = format!("https://localhost{dir}/other.bin");
    assert_eq!(fetch(&node, "GET", &other_name).await.status, 404);
    let unknown = format!("https://localhost/upload/{}/x.bin", "ab".repeat(24));
    assert_eq!(fetch(&node, "GET", &unknown).await.status, 404);
    assert_eq!(
        put_refused(&node, &unknown, "application/octet-stream", 1).await,
        404
    );
    assert_eq!(
        fetch(&node, "GET", "https://localhost/upload/..%2F..%2Fdb/x")
            .await
            .status,
        404
    );
}

#[tokio::test]
async fn size_limit_quota_length_type_and_other_domains_are_refused() {
    let node = node_with(LIMITS, &["localhost", "example.net"]);
    node.clusterctl(&["adduser", "carol@example.net", "--password", PW])
        .expect("adduser carol");
    let mut alice = Client::login_bound(&node, "alice", PW, "a").await.unwrap();

    // Over the limit: not-acceptable, and the limit in <max-file-size/>.
    let reply = ask_slot(&mut alice, "big.bin", 100_001, "application/octet-stream").await;
    assert_eq!(stanza_error(&reply).as_deref(), Some("not-acceptable"));
    let max = reply
        .get_child("error", ns::CLIENT)
        .and_then(|e| e.get_child("file-too-large", UPLOAD))
        .and_then(|f| f.child_text("max-file-size", UPLOAD));
    assert_eq!(max.as_deref(), Some("100000"));

    // Bad requests.
    for (name, size) in [("a/b", 10), ("ok.txt", 0)] {
        let reply = ask_slot(&mut alice, name, size, "text/plain").await;
        assert_eq!(
            stanza_error(&reply).as_deref(),
            Some("bad-request"),
            "{name}"
        );
    }

    // 100000 + 100000 (PUT or not, a slot counts) + 60000 > 250000.
    let one = random_bytes(100_000);
    let (first, _) = urls(&ask_slot(&mut alice, "one.bin", one.len(), "image/png").await);
    assert_eq!(put(&node, &first, "image/png", &one).await.status, 201);
    let (second, second_get) = urls(&ask_slot(&mut alice, "two.bin", 100_000, "image/png").await);
    let reply = ask_slot(&mut alice, "three.bin", 60_000, "image/png").await;
    assert_eq!(stanza_error(&reply).as_deref(), Some("resource-constraint"));
    assert!(
        error_text(&reply).contains("250000"),
        "{}",
        error_text(&reply)
    );

    // The wrong length, or type, is refused; the slot stays usable.
    let two = random_bytes(100_000);
    assert_eq!(put_refused(&node, &second, "image/png", 99_999).await, 400);
    assert_eq!(put_refused(&node, &second, "image/png", 100_001).await, 413);
    assert_eq!(put_refused(&node, &second, "text/html", 100_000).await, 400);
    assert_eq!(put(&node, &second, "image/png", &two).await.status, 201);
    let got = fetch(&node, "GET", &second_get).await;
    assert!(got.status == 200 && got.body == two);
    let disposition = got.header("content-disposition").unwrap_or_default();
    assert!(disposition.starts_with("inline;"), "{disposition}");

    // Bob has a quota of his own.
    let mut bob = Client::login_bound(&node, "bob", PW, "b").await.unwrap();
    let reply = ask_slot(&mut bob, "b.bin", 60_000, "image/png").await;
    assert!(reply.get_child("slot", UPLOAD).is_some());

    // A user of another of our domains gets no slot from this one.
    let mut carol = Client::login_at(node.c2s, "example.net", "carol", PW, "c")
        .await
        .unwrap();
    let reply = ask_slot(&mut carol, "c.bin", 10, "image/png").await;
    assert_eq!(stanza_error(&reply).as_deref(), Some("forbidden"));
}

fn cluster_opts(id: u64, join: Vec<String>, extra: &str) -> NodeOptions {
    NodeOptions {
        node_id: id,
        join,
        cluster_config: "heartbeat_ms = 100\nelection_timeout_ms = 600\nwrite_timeout_ms = 3000\n"
            .into(),
        extra_config: format!("{LIMITS}{extra}"),
        ..NodeOptions::default()
    }
}

/// Node 1 bootstraps, 2 and 3 join; alice has an account.
fn three(extra: &str) -> [TestNode; 3] {
    let n1 = TestNode::start_with(cluster_opts(1, vec![], extra)).expect("node 1");
    let join = vec![n1.cluster.to_string()];
    let n2 = TestNode::start_with(cluster_opts(2, join.clone(), extra)).expect("node 2");
    let n3 = TestNode::start_with(cluster_opts(3, join, extra)).expect("node 3");
    n1.wait_voters(3).expect("three members");
    n1.adduser("alice", PW).expect("adduser");
    [n1, n2, n3]
}

#[tokio::test]
async fn a_file_put_to_one_node_is_fetched_through_another() {
    let [mut n1, n2, n3] = three("");

    // Alice is on node 2; her client uploads to node 1.
    let mut alice = Client::login_bound(&n2, "alice", PW, "a").await.unwrap();
    let data = random_bytes(99_999);
    let (put_url, get_url) =
        urls(&ask_slot(&mut alice, "shared.dat", data.len(), "application/pdf").await);
    let r = put(&n1, &put_url, "application/pdf", &data).await;
    assert_eq!(
        r.status,
        201,
        "{}\n{}",
        String::from_utf8_lossy(&r.body),
        n1.log()
    );
    let slot = path_of(&get_url)
        .split('/')
        .nth(2)
        .expect("a slot in the URL")
        .to_owned();
    assert!(n1.dir.path().join("data/uploads").join(&slot).exists());
    // Only node 1's disk holds it; nodes 2 and 3 fetch it from there.
    for n in [&n2, &n3, &n1] {
        assert!(
            n.node_id == 1 || !n.dir.path().join("data/uploads").join(&slot).exists(),
            "node {} has a copy",
            n.node_id
        );
        let got = fetch(n, "GET", &get_url).await;
        assert_eq!(got.status, 200, "node {}: {}", n.node_id, n.log());
        assert!(got.body == data, "node {} served other bytes", n.node_id);
        assert_eq!(got.header("content-type"), Some("application/pdf"));
        assert_eq!(got.header("content-length"), Some("99999"));
    }
    // With node 1 gone, no other node has the bytes: they say so.
    n1.kill();
    let r = fetch(&n2, "GET", &get_url).await;
    assert_eq!(r.status, 502, "{}", n2.log());
    assert!(r.header("retry-after").is_some());
}

#[tokio::test]
async fn with_a_shared_directory_every_node_serves_from_disk() {
    let shared = tempfile::tempdir().expect("shared dir");
    let extra = format!("dir = {:?}\n", shared.path());
    let [mut n1, n2, n3] = three(&extra);
    let mut alice = Client::login_bound(&n3, "alice", PW, "a").await.unwrap();
    let data = random_bytes(12_345);
    let (put_url, get_url) =
        urls(&ask_slot(&mut alice, "on a share.txt", data.len(), "text/plain").await);
    let r = put(&n1, &put_url, "text/plain", &data).await;
    assert_eq!(r.status, 201, "{}", n1.log());
    let slot = path_of(&get_url).split('/').nth(2).unwrap().to_owned();
    assert!(shared.path().join(&slot).exists());
    for n in [&n2, &n3] {
        assert_eq!(fetch(n, "GET", &get_url).await.status, 200);
    }
    // The node that took the PUT is gone; the others read the share.
    n1.kill();
    for n in [&n2, &n3] {
        let got = fetch(n, "GET", &get_url).await;
        assert_eq!(got.status, 200, "node {}: {}", n.node_id, n.log());
        assert!(got.body == data);
    }
}
