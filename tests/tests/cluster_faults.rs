//! The fault-injection checker's short form (`tests::checker`): three real
//! nodes behind fault-injecting proxies, concurrent acknowledged writes on
//! every node while a seeded nemesis kills, restarts and partitions them,
//! then every acknowledged write must be on every node and no full JID
//! held twice. `CHECK_SECS` and `CHECK_SEED` change the run; the long run
//! is `cluster-check` (README, "Fault injection").

use std::time::Duration;

use tests::checker::{run, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_writes_survive_kills_restarts_and_partitions() {
    let secs = std::env::var("CHECK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let seed = std::env::var("CHECK_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    // Printed first, so a failing run can be replayed with CHECK_SEED.
    eprintln!("fault-injection checker: seed {seed}, {secs} s");
    let report = run(Options {
        duration: Duration::from_secs(secs),
        seed,
        writers: 4,
        racers: 3,
    })
    .await
    .unwrap_or_else(|e| panic!("seed {seed}: the run itself failed: {e:#}"));
    eprintln!("{report}");
    for f in &report.faults {
        eprintln!("  fault: {f}");
    }
    assert!(report.violations.is_empty(), "{report}");
    assert!(
        !report.faults.is_empty() && report.acknowledged() > 0 && report.binds > 1,
        "the run exercised nothing: {report}"
    );
}
