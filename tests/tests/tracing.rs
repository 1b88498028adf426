//! Traces and logs an operator reads (README "Traces"), against real
//! processes: a message from a client on one node to a client on another
//! is one OpenTelemetry trace with spans from both nodes, exported over
//! OTLP/gRPC to a small receiver (`tests/tracing/otlp_receiver.py`, on the
//! `opentelemetry-proto` and `grpcio` packages that `.ci/run` installs in
//! `target/otlp-venv`); spans still batched when a node stops are
//! exported before it exits; and with `--log-format json` every line a
//! node writes is one JSON object carrying its node id.

use std::collections::HashMap;
use std::io::{BufRead as _, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tests::client::{body, Client, WAIT};
use tests::node::{NodeOptions, TestNode};

const PW: &str = "secret";

/// The python with `opentelemetry-proto` and `grpcio`: `OTLP_PYTHON`, or
/// the venv `.ci/run` makes.
fn python() -> PathBuf {
    let py = std::env::var_os("OTLP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/otlp-venv/bin/python")
        });
    let ok = Command::new(&py)
        .args(["-c", "import grpc, opentelemetry.proto.collector.trace.v1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        ok,
        "{} cannot import grpc and opentelemetry.proto: run .ci/run once, or \
         `python3 -m venv target/otlp-venv && target/otlp-venv/bin/pip install \
         opentelemetry-proto grpcio` (or set OTLP_PYTHON)",
        py.display()
    );
    py
}

/// The receiver process and the file it appends spans to.
struct Receiver {
    child: Child,
    spans: PathBuf,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Receiver {
    fn start() -> Receiver {
        let dir = tempfile::tempdir().expect("tempdir");
        let spans = dir.path().join("spans.jsonl");
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tracing/otlp_receiver.py");
        let mut child = Command::new(python())
            .arg(script)
            .arg(&spans)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start the OTLP receiver");
        let stdout = child.stdout.take().expect("stdout");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let port = loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(l) => {
                    if let Some(p) = l.strip_prefix("LISTENING ") {
                        break p.trim().parse::<u16>().expect("a port");
                    }
                }
                Err(e) => panic!("the OTLP receiver never said it listens: {e}"),
            }
        };
        Receiver {
            child,
            spans,
            endpoint: format!("http://127.0.0.1:{port}"),
            _dir: dir,
        }
    }

    /// Every whole span line received so far.
    fn spans(&self) -> Vec<Span> {
        let text = std::fs::read_to_string(&self.spans).unwrap_or_default();
        text.split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"));
                Span {
                    trace_id: v["trace_id"].as_str().unwrap_or("").into(),
                    span_id: v["span_id"].as_str().unwrap_or("").into(),
                    parent: v["parent_span_id"].as_str().unwrap_or("").into(),
                    name: v["name"].as_str().unwrap_or("").into(),
                    service: v["service_name"].as_str().unwrap_or("").into(),
                    node: v["service_instance_id"].as_str().unwrap_or("").into(),
                    kind: v["attributes"]["kind"].as_str().unwrap_or("").into(),
                }
            })
            .collect()
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[derive(Clone, Debug)]
struct Span {
    trace_id: String,
    span_id: String,
    parent: String,
    name: String,
    service: String,
    node: String,
    kind: String,
}

/// `deliver` spans of messages on `node`, each with the chain of its
/// ancestors among `spans` (nearest first).
fn delivered_messages(spans: &[Span], node: u64) -> Vec<(Span, Vec<Span>)> {
    let by_id: HashMap<&str, &Span> = spans.iter().map(|s| (s.span_id.as_str(), s)).collect();
    spans
        .iter()
        .filter(|s| s.name == "deliver" && s.kind == "message" && s.node == node.to_string())
        .map(|d| {
            let mut chain = Vec::new();
            let mut parent = d.parent.as_str();
            while let Some(p) = by_id.get(parent) {
                chain.push((*p).clone());
                parent = p.parent.as_str();
            }
            (d.clone(), chain)
        })
        .collect()
}

/// True when `chain` goes forward -> stanza on node `from`, in `trace`.
fn from_sender(chain: &[Span], trace: &str, from: u64) -> bool {
    let from = from.to_string();
    chain.iter().all(|s| s.trace_id == trace)
        && chain.iter().any(|s| s.name == "forward" && s.node == from)
        && chain
            .iter()
            .any(|s| s.name == "stanza" && s.kind == "message" && s.node == from)
}

fn opts(id: u64, join: Vec<String>, endpoint: &str) -> NodeOptions {
    NodeOptions {
        node_id: id,
        join,
        cluster_config: "heartbeat_ms = 100\nelection_timeout_ms = 600\n".into(),
        extra_config: format!("[trace]\notlp_endpoint = \"{endpoint}\"\nsample_ratio = 1.0\n"),
        ..NodeOptions::default()
    }
}

fn wait_sessions(node: &TestNode, want: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = node.cluster_status().expect("status");
        let total: u64 = s["members"]
            .as_array()
            .map(|m| m.iter().map(|m| m["sessions"].as_u64().unwrap_or(0)).sum())
            .unwrap_or(0);
        if total >= want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "sessions never reached {want}: {s}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

async fn online(node: &TestNode, user: &str, resource: &str) -> Client {
    let mut c = Client::login_bound(node, user, PW, resource)
        .await
        .unwrap_or_else(|e| panic!("{user}/{resource} logs in: {e:#}\n{}", node.log()));
    c.presence(0).await.expect("presence");
    c
}

async fn expect_body(c: &mut Client, want: &str) {
    let m = c.recv_message(WAIT).await.expect("a message");
    assert_eq!(body(&m).as_deref(), Some(want));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_across_nodes_is_one_trace_with_spans_from_both() {
    let receiver = Receiver::start();
    let endpoint = receiver.endpoint.clone();
    let mut a = TestNode::start_with(opts(1, vec![], &endpoint)).expect("node 1");
    let join = vec![a.cluster.to_string()];
    let mut b = TestNode::start_with(opts(2, join.clone(), &endpoint)).expect("node 2");
    let _c = TestNode::start_with(opts(3, join, &endpoint)).expect("node 3");
    a.wait_voters(3).expect("three voters");
    a.adduser("alice", PW).expect("alice");
    a.adduser("bob", PW).expect("bob");
    let mut alice = online(&a, "alice", "phone").await;
    let mut bob = online(&b, "bob", "pc").await;
    wait_sessions(&a, 2);

    alice
        .chat("bob@localhost/pc", "traced across nodes")
        .await
        .expect("send");
    expect_body(&mut bob, "traced across nodes").await;

    // The batch exporter sends within seconds: poll until node 2's
    // delivery span and node 1's spans of the same trace are all in.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (deliver, chain) = loop {
        let spans = receiver.spans();
        let found = delivered_messages(&spans, b.node_id)
            .into_iter()
            .find(|(d, chain)| from_sender(chain, &d.trace_id, a.node_id));
        if let Some(f) = found {
            break f;
        }
        assert!(
            Instant::now() < deadline,
            "no trace with node 1's stanza and forward spans above node 2's deliver span; received:\n{spans:#?}\nnode 1:\n{}\nnode 2:\n{}",
            a.log(),
            b.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    // deliver (node 2) <- forward (node 1) <- stanza (node 1), the root.
    assert_eq!(chain[0].name, "forward", "{chain:#?}");
    assert_eq!(chain[0].span_id, deliver.parent);
    let root = chain.last().expect("a root");
    assert_eq!(root.name, "stanza", "{chain:#?}");
    assert_eq!(root.parent, "", "the client's stanza starts the trace");
    assert!(deliver.service == "xmpp-node" && root.service == "xmpp-node");

    // A second message, then both nodes stop at once: what they still
    // batch is exported before they exit, so no polling is needed.
    alice
        .chat("bob@localhost/pc", "just before the end")
        .await
        .expect("send");
    expect_body(&mut bob, "just before the end").await;
    b.stop().expect("node 2 stops");
    a.stop().expect("node 1 stops");
    let spans = receiver.spans();
    let traces: Vec<String> = delivered_messages(&spans, b.node_id)
        .into_iter()
        .filter(|(d, chain)| from_sender(chain, &d.trace_id, a.node_id))
        .map(|(d, _)| d.trace_id)
        .collect();
    assert_eq!(traces.len(), 2, "two messages, two traces: {spans:#?}");
    assert_ne!(traces[0], traces[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_each_carry_the_node_id_and_stanzas_log_at_debug() {
    let mut node = TestNode::start_with(NodeOptions {
        node_id: 7,
        args: vec!["--log-format".into(), "json".into()],
        ..NodeOptions::default()
    })
    .expect("node");
    node.adduser("alice", PW).expect("alice");
    let mut alice = online(&node, "alice", "phone").await;
    const MESSAGES: usize = 100;
    for i in 0..MESSAGES {
        alice
            .chat("alice@localhost/phone", &format!("note {i}"))
            .await
            .expect("send");
    }
    for i in 0..MESSAGES {
        expect_body(&mut alice, &format!("note {i}")).await;
    }
    node.stop().expect("stops");
    let log = node.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(lines.iter().any(|l| l.contains("xmpp-node ready")), "{log}");
    for l in &lines {
        let v: Value =
            serde_json::from_str(l).unwrap_or_else(|e| panic!("not one JSON object ({e}): {l}"));
        assert_eq!(v["node_id"], 7, "{l}");
    }
    // At info (TestNode's RUST_LOG unless TEST_NODE_LOG says otherwise)
    // the node logs start-up, the login and the shutdown, nothing per stanza.
    let level = std::env::var("TEST_NODE_LOG").unwrap_or_else(|_| "info".into());
    assert!(
        level != "info" || lines.len() < MESSAGES,
        "{} lines for {MESSAGES} messages: something logs each stanza at info\n{log}",
        lines.len()
    );
}
