//! Archive query latency (XEP-0313) against a running server: logs in one
//! user and times, many times over, a query for the newest page, the
//! oldest page, a page after an id from the middle of the archive, and
//! one page filtered by correspondent. Prints one line per kind (p50, p99,
//! max in ms) and the archive's size as the server counts it.
//! Used by `tests/bench/archive.sh`.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use clap::Parser;
use tests::client::Client;
use xmpp::element::Element;
use xmpp::forms::{self, Field};

const MAM: &str = "urn:xmpp:mam:2";
const RSM: &str = "http://jabber.org/protocol/rsm";

#[derive(Parser)]
#[command(about = "Time archive queries (XEP-0313) on a deep archive")]
struct Args {
    #[arg(long)]
    server: SocketAddr,
    #[arg(long, default_value = "localhost")]
    domain: String,
    #[arg(long)]
    user: String,
    #[arg(long)]
    password: String,
    /// The correspondent for the filtered query (a bare JID).
    #[arg(long)]
    with: String,
    /// Queries of each kind.
    #[arg(long, default_value_t = 200)]
    rounds: usize,
    /// Results per page.
    #[arg(long, default_value_t = 50)]
    max: usize,
}

/// A kind of query: its name, the `with` filter and the RSM children.
type Kind<'a> = (&'a str, Option<&'a str>, Vec<(&'a str, &'a str)>);

/// One query; returns (result ids, count) once the IQ result is in.
async fn query(
    c: &mut Client,
    with: Option<&str>,
    rsm: &[(&str, &str)],
) -> anyhow::Result<(Vec<String>, Option<u64>)> {
    let mut q = Element::new("query", MAM);
    if let Some(w) = with {
        q = q.child(forms::build(
            "submit",
            Some(MAM),
            vec![Field::new("with", "jid-single").value(w)],
        ));
    }
    let mut set = Element::new("set", RSM);
    for (n, v) in rsm {
        set = set.child(Element::new(*n, RSM).text(*v));
    }
    let iq = c.make_iq("set", None, q.child(set));
    let reply = c.iq(iq).await?;
    if reply.get_attr("type") != Some("result") {
        bail!("query failed: {}", reply.to_string_in("jabber:client"));
    }
    let ids = c
        .take_pending()
        .iter()
        .filter_map(|m| m.get_child("result", MAM))
        .filter_map(|r| r.get_attr("id").map(str::to_owned))
        .collect();
    let count = reply
        .get_child("fin", MAM)
        .and_then(|f| f.get_child("set", RSM))
        .and_then(|s| s.child_text("count", RSM))
        .and_then(|c| c.parse().ok());
    Ok((ids, count))
}

fn line(name: &str, mut ms: Vec<f64>) {
    ms.sort_by(f64::total_cmp);
    let at = |p: f64| ms[((ms.len() as f64 - 1.0) * p).round() as usize];
    println!(
        "{name}: p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms ({} queries)",
        at(0.5),
        at(0.99),
        at(1.0),
        ms.len()
    );
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let a = Args::parse();
    let mut c = Client::login_at(a.server, &a.domain, &a.user, &a.password, "probe")
        .await
        .context("login")?;
    let max = a.max.to_string();
    let (_, count) = query(&mut c, None, &[("max", "1")]).await?;
    let count = count.context("the server gave no count")?;
    println!("archive of {}@{}: {count} messages", a.user, a.domain);
    // An id from the middle: page forwards from the start in big steps.
    let mut middle = None;
    let mut after: Option<String> = None;
    let mut seen = 0u64;
    while seen < count / 2 {
        let mut rsm = vec![("max", "250")];
        if let Some(x) = &after {
            rsm.push(("after", x.as_str()));
        }
        let (ids, _) = query(&mut c, None, &rsm).await?;
        let Some(last) = ids.last().cloned() else {
            break;
        };
        seen += ids.len() as u64;
        after = Some(last.clone());
        middle = Some(last);
    }
    let middle = middle.context("an empty archive")?;
    let kinds: [Kind; 4] = [
        ("newest page", None, vec![("max", &max), ("before", "")]),
        ("oldest page", None, vec![("max", &max)]),
        (
            "page after a middle id",
            None,
            vec![("max", &max), ("after", &middle)],
        ),
        (
            "newest page with one correspondent",
            Some(&a.with),
            vec![("max", &max), ("before", "")],
        ),
    ];
    for (name, with, rsm) in kinds {
        let mut ms = Vec::with_capacity(a.rounds);
        for _ in 0..a.rounds {
            let t = Instant::now();
            let (ids, _) = query(&mut c, with, &rsm).await?;
            ms.push(t.elapsed().as_secs_f64() * 1000.0);
            if ids.len() != a.max {
                bail!("{name}: {} results, expected {}", ids.len(), a.max);
            }
        }
        line(name, ms);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(())
}
