//! The fault-injection checker's long form: `cluster-check --secs 600`.
//! Starts three `xmpp-node` processes (from `XMPP_BIN_DIR`, or next to this
//! binary), runs the workload and the nemesis, prints what happened and
//! exits non-zero on any lost acknowledged write or double binding.

use std::time::Duration;

use clap::Parser;

#[derive(Parser)]
#[command(
    about = "Kill, restart and partition a 3-node cluster under writes; check nothing acknowledged is lost"
)]
struct Args {
    /// How long to write under faults.
    #[arg(long, default_value_t = 600)]
    secs: u64,
    /// Seed of the nemesis and the clients (random if not given).
    #[arg(long)]
    seed: Option<u64>,
    /// Writing clients.
    #[arg(long, default_value_t = 6)]
    writers: usize,
    /// Clients racing to bind one full JID.
    #[arg(long, default_value_t = 3)]
    racers: usize,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let seed = args.seed.unwrap_or_else(rand::random::<u64>);
    eprintln!("cluster-check: seed {seed}, {} s", args.secs);
    let report = tests::checker::run(tests::checker::Options {
        duration: Duration::from_secs(args.secs),
        seed,
        writers: args.writers,
        racers: args.racers,
    })
    .await?;
    for f in &report.faults {
        println!("fault: {f}");
    }
    println!("{report}");
    if !report.violations.is_empty() {
        std::process::exit(1);
    }
    Ok(())
}
