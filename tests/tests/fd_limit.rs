//! Running out of file descriptors: the node raises its open-files soft
//! limit to the hard limit at start and logs both; when accept fails for
//! want of descriptors it says so plainly (once per interval, with a
//! count, not a line per attempt and not a busy loop), and it serves again
//! as soon as connections close.

use std::time::{Duration, Instant};

use tests::client::{Client, WAIT};
use tests::node::{NodeOptions, TestNode};

/// The log without its colour escapes.
fn plain(log: &str) -> String {
    let mut out = String::with_capacity(log.len());
    let mut chars = log.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c == 'm' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[tokio::test]
async fn out_of_descriptors_is_said_plainly_and_the_node_recovers() {
    let node = TestNode::start_with(NodeOptions {
        nofile: Some((64, 160)),
        extra_config:
            "[limits]\nmax_unauthenticated = 100000\nmax_unauthenticated_per_address = 100000\n"
                .into(),
        ..NodeOptions::default()
    })
    .unwrap();
    node.adduser("alice", "secret").unwrap();
    let log = plain(&node.log());
    let started = log
        .lines()
        .find(|l| l.contains("open-files limit"))
        .unwrap_or_else(|| panic!("no limit line:\n{log}"));
    assert!(
        started.contains("soft_before=64")
            && started.contains("soft=160")
            && started.contains("hard=160"),
        "{started}"
    );

    // Idle TCP connections until the node cannot accept more.
    let mut held = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !node.log().contains("out of file descriptors") {
        assert!(Instant::now() < deadline, "never ran out:\n{}", node.log());
        for _ in 0..20 {
            if let Ok(s) = std::net::TcpStream::connect(node.c2s) {
                held.push(s);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    // A few more seconds of refused accepts: still one report, no flood.
    std::thread::sleep(Duration::from_secs(2));
    let reports = node.log().matches("out of file descriptors").count();
    assert!(reports <= 2, "{reports} reports:\n{}", node.log());

    // Connections close; the node serves again.
    drop(held);
    let deadline = Instant::now() + WAIT * 4;
    loop {
        match Client::login_bound(&node, "alice", "secret", "back").await {
            Ok(_) => break,
            Err(e) => {
                assert!(
                    Instant::now() < deadline,
                    "no recovery: {e}\n{}",
                    node.log()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    }
}
