//! `xmpp-load`: a load generator for XMPP servers. See `tests::load`.

use clap::Parser as _;
use tests::load::{self, Options};

fn main() -> std::process::ExitCode {
    let opts = Options::parse();
    let json = opts.json;
    // A child of a --processes run: its parent names its failures.
    let child = opts.shard.is_some();
    match load::run(opts) {
        Ok(report) => {
            if report.scenario != load::Scenario::Accounts {
                if json {
                    println!("{}", report.to_json());
                } else {
                    print!("{}", report.table());
                }
            }
            std::process::ExitCode::SUCCESS
        }
        Err(failure) => {
            match (&failure.report, json) {
                (Some(r), true) => println!("{}", r.to_json()),
                (Some(r), false) => print!("{}", r.table()),
                (None, true) => println!(
                    "{}",
                    serde_json::json!({ "ok": false, "error": failure.message })
                ),
                (None, false) => {}
            }
            if !child {
                eprintln!("xmpp-load: FAILED: {}", failure.message);
            }
            std::process::ExitCode::FAILURE
        }
    }
}
