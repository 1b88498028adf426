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
    let node = TestNode::start_with(NodeOptions {
        extra_config: "scram_iterations = 50000\nmax_attempts_per_stream = 100\n".into(),
        ..NodeOptions::default()
    })
    .expect("node starts");
    node.adduser("alice", PW).unwrap();
    node.adduser("mallory", PW).unwrap();
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
