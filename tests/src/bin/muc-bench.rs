//! Group chat fan-out against a running server: `--occupants` clients
//! join one room, one of them sends `--messages` room messages at
//! `--rate`, and every occupant counts its copies. Prints copies
//! delivered per second, the delivery latency of the last copy of each
//! message (p50, p99), and the server's CPU per delivered copy (from
//! /proc, with `--server-pid`). Used by `tests/bench/muc.sh`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use tests::client::{body, Client};
use tests::load::sys;
use tokio::sync::Mutex;
use xmpp::element::Element;
use xmpp::stanza::ns;

#[derive(Parser)]
#[command(about = "Fan-out of one room's messages to many occupants (XEP-0045)")]
struct Args {
    #[arg(long)]
    server: SocketAddr,
    #[arg(long, default_value = "localhost")]
    domain: String,
    /// Accounts user1..userN with passwords pw1..pwN.
    #[arg(long, default_value_t = 100)]
    occupants: usize,
    #[arg(long, default_value_t = 2000)]
    messages: usize,
    /// Messages per second the sender offers.
    #[arg(long, default_value_t = 50.0)]
    rate: f64,
    #[arg(long)]
    server_pid: Option<u32>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let room = format!("bench@conference.{}", a.domain);
    let mut clients = Vec::new();
    for i in 1..=a.occupants {
        let mut c = Client::login_at(
            a.server,
            &a.domain,
            &format!("user{i}"),
            &format!("pw{i}"),
            "b",
        )
        .await
        .with_context(|| format!("user{i} logs in"))?;
        let join = Element::new("presence", ns::CLIENT)
            .attr("to", format!("{room}/u{i}"))
            .child(Element::new("x", "http://jabber.org/protocol/muc"));
        c.send(&join).await?;
        c.recv_until(
            |e| e.name == "message" && e.get_child("subject", ns::CLIENT).is_some(),
            Duration::from_secs(30),
        )
        .await
        .with_context(|| format!("user{i} joins"))?;
        clients.push(c);
    }
    eprintln!("{} occupants in {room}", clients.len());
    let sent_at: Arc<Mutex<Vec<Option<Instant>>>> = Arc::new(Mutex::new(vec![None; a.messages]));
    let mut sender = clients.remove(0);
    let mut readers = Vec::new();
    for mut c in clients {
        let n = a.messages;
        readers.push(tokio::spawn(async move {
            let mut got = Vec::with_capacity(n);
            while got.len() < n {
                let m = c
                    .recv_until(
                        |e| e.get_attr("type") == Some("groupchat") && body(e).is_some(),
                        Duration::from_secs(60),
                    )
                    .await?;
                let i: usize = body(&m).unwrap_or_default().parse().unwrap_or(usize::MAX);
                got.push((i, Instant::now()));
            }
            anyhow::Ok(got)
        }));
    }
    let before = a.server_pid.map(sys::sample).transpose()?;
    let start = Instant::now();
    let gap = Duration::from_secs_f64(1.0 / a.rate);
    for i in 0..a.messages {
        let at = start + gap * i as u32;
        tokio::time::sleep_until(at.into()).await;
        sent_at.lock().await[i] = Some(Instant::now());
        let m = Element::new("message", ns::CLIENT)
            .attr("to", room.as_str())
            .attr("type", "groupchat")
            .child(Element::new("body", ns::CLIENT).text(i.to_string()));
        sender.send(&m).await?;
    }
    let mut last_copy = vec![start; a.messages];
    let mut copies = 0usize;
    for r in readers {
        for (i, t) in r.await?? {
            if i >= a.messages {
                bail!("a copy with an unknown body");
            }
            copies += 1;
            last_copy[i] = last_copy[i].max(t);
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let after = a.server_pid.map(sys::sample).transpose()?;
    let sent = sent_at.lock().await;
    let mut lat: Vec<f64> = sent
        .iter()
        .zip(&last_copy)
        .filter_map(|(s, l)| s.map(|s| l.duration_since(s).as_secs_f64() * 1000.0))
        .collect();
    lat.sort_by(f64::total_cmp);
    let at = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "occupants {}, messages {}, copies delivered {copies} in {wall:.1} s ({:.0}/s)",
        a.occupants,
        a.messages,
        copies as f64 / wall
    );
    println!(
        "last copy of a message after: p50 {:.2} ms, p99 {:.2} ms",
        at(0.5),
        at(0.99)
    );
    if let (Some(b), Some(e)) = (before, after) {
        println!(
            "server CPU per delivered copy: {:.4} ms ({:.2} s in all)",
            (e.cpu_s - b.cpu_s) * 1000.0 / copies as f64,
            e.cpu_s - b.cpu_s
        );
    }
    Ok(())
}
