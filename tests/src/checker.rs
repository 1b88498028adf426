//! A fault-injection checker for the cluster, in the manner of Jepsen:
//! clients on every node issue concurrent writes and keep a history of
//! which were acknowledged, while a seeded nemesis kills (`SIGKILL`),
//! restarts and partitions nodes at random. At the end the faults are
//! healed and the history is checked against every node:
//!
//! - every acknowledged account (`clusterctl adduser` returned 0) is listed
//!   by every node;
//! - every acknowledged roster item (the IQ `result`) is in the user's
//!   roster as read through every node;
//! - every acknowledged offline message (handled, per the ping that
//!   followed it, without an error) is delivered at the next login;
//! - of the clients that raced to bind one full JID on different nodes, at
//!   most one still holds it, and it is the one a message to that JID
//!   reaches.
//!
//! A write that got an error or no answer is not acknowledged; it may or
//! may not have happened, and the checker asks nothing of it.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use xmpp::element::Element;
use xmpp::stanza::ns;

use crate::client::{body, Client};
use crate::faultnet::FaultNet;
use crate::node::{cluster_behind, clusterctl, NodeOptions, TestNode};

const PW: &str = "secret";
const DOMAIN: &str = "localhost";

#[derive(Clone, Debug)]
pub struct Options {
    /// How long clients write while the nemesis acts.
    pub duration: Duration,
    pub seed: u64,
    /// Clients that write (each its own user).
    pub writers: usize,
    /// Clients that race to bind the same full JID.
    pub racers: usize,
}

#[derive(Debug, Default)]
pub struct Report {
    pub seed: u64,
    /// Writes acknowledged, by kind.
    pub accounts: usize,
    pub roster_items: usize,
    pub offline_messages: usize,
    /// Writes answered with an error (no quorum, mostly).
    pub refused: usize,
    /// Successful binds of the contested full JID.
    pub binds: usize,
    /// What the nemesis did, in order.
    pub faults: Vec<String>,
    /// Acknowledged writes missing somewhere, and other violations.
    pub violations: Vec<String>,
}

impl Report {
    pub fn acknowledged(&self) -> usize {
        self.accounts + self.roster_items + self.offline_messages
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "seed {}: {} acknowledged writes ({} accounts, {} roster items, {} offline messages), \
             {} refused, {} binds of one contested JID, {} faults, {} violations",
            self.seed,
            self.acknowledged(),
            self.accounts,
            self.roster_items,
            self.offline_messages,
            self.refused,
            self.binds,
            self.faults.len(),
            self.violations.len()
        )?;
        for v in &self.violations {
            write!(f, "\n  violation: {v}")?;
        }
        Ok(())
    }
}

/// What clients were told, shared by all of them.
#[derive(Default)]
struct History {
    accounts: Mutex<Vec<String>>,
    /// (user, contact)
    roster: Mutex<Vec<(String, String)>>,
    /// (recipient, body)
    offline: Mutex<Vec<(String, String)>>,
    refused: AtomicUsize,
    binds: AtomicUsize,
}

#[derive(Clone, Copy)]
struct Addr {
    c2s: SocketAddr,
    grpc: SocketAddr,
}

fn node_options(id: u64, join: Vec<String>) -> NodeOptions {
    NodeOptions {
        node_id: id,
        join,
        cluster_config: "heartbeat_ms = 100\nelection_timeout_ms = 600\n\
                         node_down_grace_secs = 2\nwrite_timeout_ms = 3000\n"
            .into(),
        extra_config: "[limits]\noffline_max_messages = 100000\nmax_roster_items = 100000\n".into(),
        ..NodeOptions::default()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Starts three nodes behind proxies, runs the workload and the nemesis
/// for `opts.duration`, heals everything and checks the history.
pub async fn run(opts: Options) -> anyhow::Result<Report> {
    let net = Arc::new(FaultNet::new()?);
    let nodes = {
        let net = net.clone();
        tokio::task::spawn_blocking(move || cluster_behind(&net, 3, node_options)).await??
    };
    let addrs: Vec<Addr> = nodes
        .iter()
        .map(|n| Addr {
            c2s: n.c2s,
            grpc: n.grpc,
        })
        .collect();
    let writers: Vec<String> = (0..opts.writers).map(|w| format!("w{w}")).collect();
    {
        let first = addrs[0].grpc;
        let mut users: Vec<String> = writers.clone();
        users.extend((0..opts.writers).map(|w| format!("inbox{w}")));
        users.push("racer".into());
        users.push("checker".into());
        tokio::task::spawn_blocking(move || -> anyhow::Result<()> {
            for u in users {
                clusterctl(
                    first,
                    &["adduser", &format!("{u}@{DOMAIN}"), "--password", PW],
                )?;
            }
            Ok(())
        })
        .await??;
    }

    let history = Arc::new(History::default());
    let deadline = Instant::now() + opts.duration;
    let mut tasks = Vec::new();
    for (w, user) in writers.iter().enumerate() {
        tasks.push(tokio::spawn(writer(
            w,
            user.clone(),
            addrs.clone(),
            history.clone(),
            StdRng::seed_from_u64(opts.seed.wrapping_add(1 + w as u64)),
            deadline,
        )));
    }
    let racers: Vec<_> = (0..opts.racers)
        .map(|r| {
            tokio::spawn(racer(
                addrs.clone(),
                history.clone(),
                StdRng::seed_from_u64(opts.seed.wrapping_add(1000 + r as u64)),
                deadline,
            ))
        })
        .collect();
    let nemesis = {
        let net = net.clone();
        let mut rng = StdRng::seed_from_u64(opts.seed);
        tokio::task::spawn_blocking(move || nemesis(nodes, &net, &mut rng, deadline))
    };
    for t in tasks {
        t.await?;
    }
    let (mut nodes, faults) = nemesis.await??;

    // Heal: every node up and connected, every replica caught up.
    net.heal();
    let nodes = tokio::task::spawn_blocking(move || -> anyhow::Result<Vec<TestNode>> {
        for n in nodes.iter_mut() {
            if n.pid().is_none() {
                n.start_again()?;
            }
        }
        for n in nodes.iter_mut() {
            n.wait_quorum(Instant::now() + Duration::from_secs(60))?;
        }
        Ok(nodes)
    })
    .await??;
    let mut report = Report {
        seed: opts.seed,
        faults,
        ..Report::default()
    };
    let mut held = Vec::new();
    for r in racers {
        if let Some(c) = r.await? {
            held.push(c);
        }
    }
    check(&nodes, &addrs, &history, &writers, held, &mut report).await?;
    report.refused = history.refused.load(Ordering::Relaxed);
    report.binds = history.binds.load(Ordering::Relaxed);
    drop(nodes);
    Ok(report)
}

/// Kills, restarts and partitions nodes until `deadline`; one fault at a
/// time, so a majority can always make progress between faults.
fn nemesis(
    mut nodes: Vec<TestNode>,
    net: &FaultNet,
    rng: &mut StdRng,
    deadline: Instant,
) -> anyhow::Result<(Vec<TestNode>, Vec<String>)> {
    let mut faults = Vec::new();
    let leader = |nodes: &[TestNode]| {
        nodes.iter().position(|n| {
            n.cluster_status()
                .map(|s| s["role"] == "leader")
                .unwrap_or(false)
        })
    };
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(rng.gen_range(500..2500)));
        if Instant::now() >= deadline {
            break;
        }
        let hold = Duration::from_millis(rng.gen_range(500..5000));
        let victim = match rng.gen_range(0..4) {
            // The leader is the most interesting victim.
            0 | 1 => leader(&nodes).unwrap_or(0),
            _ => rng.gen_range(0..nodes.len()),
        };
        let id = nodes[victim].node_id;
        match rng.gen_range(0..3) {
            0 => {
                faults.push(format!("kill -9 node {id} for {hold:?}"));
                nodes[victim].kill();
                std::thread::sleep(hold);
                nodes[victim]
                    .start_again()
                    .with_context(|| format!("restarting node {id}"))?;
            }
            1 => {
                faults.push(format!("isolate node {id} for {hold:?}"));
                net.isolate(id);
                std::thread::sleep(hold);
                net.heal();
            }
            _ => {
                faults.push(format!("restart node {id}"));
                nodes[victim]
                    .restart()
                    .with_context(|| format!("restarting node {id}"))?;
            }
        }
    }
    Ok((nodes, faults))
}

/// One user writing through a random node until `deadline`, reconnecting
/// elsewhere whenever its node goes away.
async fn writer(
    w: usize,
    user: String,
    addrs: Vec<Addr>,
    history: Arc<History>,
    mut rng: StdRng,
    deadline: Instant,
) {
    let mut seq = 0u64;
    while Instant::now() < deadline {
        let at = addrs[rng.gen_range(0..addrs.len())];
        let Ok(Ok(mut c)) = tokio::time::timeout(
            Duration::from_secs(10),
            Client::login_at(at.c2s, DOMAIN, &user, PW, "r"),
        )
        .await
        else {
            tokio::time::sleep(Duration::from_millis(200)).await;
            continue;
        };
        while Instant::now() < deadline {
            seq += 1;
            let ok = match rng.gen_range(0..3) {
                0 => roster_set(&mut c, &user, &format!("c{w}-{seq}@{DOMAIN}"), &history).await,
                1 => offline(&mut c, &format!("inbox{w}@{DOMAIN}"), seq, &history).await,
                _ => account(at.grpc, &format!("a{w}-{seq}@{DOMAIN}"), &history).await,
            };
            if !ok {
                break;
            }
        }
    }
}

/// A roster set; false when the stream is gone.
async fn roster_set(c: &mut Client, user: &str, contact: &str, h: &History) -> bool {
    let item = Element::new("item", ns::ROSTER).attr("jid", contact);
    let iq = c.make_iq("set", None, Element::new("query", ns::ROSTER).child(item));
    match c.iq(iq).await {
        Ok(r) if r.get_attr("type") == Some("result") => {
            lock(&h.roster).push((user.to_owned(), contact.to_owned()));
            true
        }
        Ok(_) => {
            h.refused.fetch_add(1, Ordering::Relaxed);
            true
        }
        Err(_) => false,
    }
}

/// A message to a user who is never online; acknowledged when the ping
/// after it is answered with no error for it before.
async fn offline(c: &mut Client, to: &str, seq: u64, h: &History) -> bool {
    let text = format!("m{seq}");
    let id = format!("off{seq}");
    let m = crate::client::message(to, &text).attr("id", id.as_str());
    if c.send(&m).await.is_err() || c.sync().await.is_err() {
        return false;
    }
    let bounced = c.take_pending().iter().any(|e| {
        e.name == "message" && e.get_attr("type") == Some("error") && e.get_attr("id") == Some(&id)
    });
    if bounced {
        h.refused.fetch_add(1, Ordering::Relaxed);
    } else {
        lock(&h.offline).push((to.to_owned(), text));
    }
    true
}

/// `clusterctl adduser` through this node.
async fn account(grpc: SocketAddr, jid: &str, h: &History) -> bool {
    let j = jid.to_owned();
    let r =
        tokio::task::spawn_blocking(move || clusterctl(grpc, &["adduser", &j, "--password", PW]))
            .await;
    match r {
        Ok(Ok(_)) => lock(&h.accounts).push(jid.to_owned()),
        _ => {
            h.refused.fetch_add(1, Ordering::Relaxed);
        }
    }
    true
}

/// Binds `racer@localhost/r` on random nodes, again and again, holding each
/// binding a while. Returns the client it holds at the end, if its stream
/// is still open.
async fn racer(
    addrs: Vec<Addr>,
    history: Arc<History>,
    mut rng: StdRng,
    deadline: Instant,
) -> Option<Client> {
    let mut held: Option<Client> = None;
    while Instant::now() < deadline {
        let at = addrs[rng.gen_range(0..addrs.len())];
        if let Ok(Ok(c)) = tokio::time::timeout(
            Duration::from_secs(10),
            Client::login_at(at.c2s, DOMAIN, "racer", PW, "r"),
        )
        .await
        {
            history.binds.fetch_add(1, Ordering::Relaxed);
            held = Some(c);
        }
        tokio::time::sleep(Duration::from_millis(rng.gen_range(200..3000))).await;
    }
    held
}

async fn check(
    nodes: &[TestNode],
    addrs: &[Addr],
    h: &History,
    writers: &[String],
    held: Vec<Client>,
    report: &mut Report,
) -> anyhow::Result<()> {
    let accounts = lock(&h.accounts).clone();
    let roster = lock(&h.roster).clone();
    let offline = lock(&h.offline).clone();
    report.accounts = accounts.len();
    report.roster_items = roster.len();
    report.offline_messages = offline.len();

    // Accounts, on every node.
    for n in nodes {
        let grpc = n.grpc;
        let listed: BTreeSet<String> =
            tokio::task::spawn_blocking(move || clusterctl(grpc, &["users"]))
                .await??
                .lines()
                .map(str::to_owned)
                .collect();
        for a in &accounts {
            if !listed.contains(a) {
                report
                    .violations
                    .push(format!("node {} lost account {a}", n.node_id));
            }
        }
    }
    // Rosters, read through every node.
    for (i, at) in addrs.iter().enumerate() {
        for user in writers {
            let mut c = Client::login_at(at.c2s, DOMAIN, user, PW, &format!("check{i}"))
                .await
                .with_context(|| format!("{user} logs in on node {}", i + 1))?;
            let get = c.make_iq("get", None, Element::new("query", ns::ROSTER));
            let r = c.iq(get).await?;
            let have: BTreeSet<String> = r
                .get_child("query", ns::ROSTER)
                .map(|q| {
                    q.elements()
                        .filter_map(|i| i.get_attr("jid").map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            for (u, contact) in roster.iter().filter(|(u, _)| u == user) {
                if !have.contains(contact) {
                    report
                        .violations
                        .push(format!("node {} lost {u}'s roster item {contact}", i + 1));
                }
            }
        }
    }
    // Offline messages, delivered at the recipients' first login.
    for (w, _) in writers.iter().enumerate() {
        let inbox = format!("inbox{w}");
        let want: BTreeSet<String> = offline
            .iter()
            .filter(|(to, _)| to.starts_with(&format!("{inbox}@")))
            .map(|(_, b)| b.clone())
            .collect();
        let at = addrs[w % addrs.len()];
        let mut c = Client::login_at(at.c2s, DOMAIN, &inbox, PW, "r").await?;
        c.presence(0).await?;
        let mut got = BTreeSet::new();
        while !want.is_subset(&got) {
            match c.recv_message(Duration::from_secs(5)).await {
                Ok(m) => {
                    if let Some(b) = body(&m) {
                        got.insert(b);
                    }
                }
                Err(_) => break,
            }
        }
        for b in want.difference(&got) {
            report
                .violations
                .push(format!("offline message {b} to {inbox} was lost"));
        }
    }
    // The contested JID: at most one holder, and the one a message reaches.
    let mut alive = Vec::new();
    for mut c in held {
        if c.sync().await.is_ok() {
            alive.push(c);
        }
    }
    if alive.len() > 1 {
        report.violations.push(format!(
            "{} clients still hold racer@{DOMAIN}/r",
            alive.len()
        ));
    }
    let mut checker = Client::login_at(addrs[0].c2s, DOMAIN, "checker", PW, "r").await?;
    checker
        .chat(&format!("racer@{DOMAIN}/r"), "who holds it?")
        .await?;
    checker.sync().await?;
    if let Some(holder) = alive.first_mut() {
        match holder.recv_message(Duration::from_secs(10)).await {
            Ok(m) if body(&m).as_deref() == Some("who holds it?") => {}
            other => report.violations.push(format!(
                "the holder of racer@{DOMAIN}/r did not get its message: {:?}",
                other.map(|m| m.to_string_in(ns::CLIENT))
            )),
        }
    }
    Ok(())
}
