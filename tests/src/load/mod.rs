//! `xmpp-load`: drives any RFC 6120 server over real sockets and measures
//! it. See the binary's `--help` for the flags and `report` for what is
//! measured.
//!
//! # How the work is laid out, and why
//!
//! `--threads` worker threads (one by default, so "one core of xmpp-load"
//! is what a run measures) each run a current-thread tokio runtime with
//! **one task driving all of that worker's connections** through a
//! `FuturesUnordered`. A connection is a plain future that polls its
//! socket's reads and writes and its send timer together
//! ([`conn::Conn`]); the task polls only the connections that were woken.
//! Compared with one spawned task per connection on a multi-thread
//! runtime, nothing is shared between threads on the hot path except a few
//! relaxed atomic counters and the duplicate-detection bitmap; latency
//! histograms and buffers are per worker, so recording takes no lock, and
//! there is no work stealing moving connections between cores.
//!
//! The main thread is the controller: it starts the workers, moves them
//! through the phases of a run (log in, go, stop) over a `watch` channel,
//! prints progress, reads the server's `/proc` figures and builds the report.

pub mod chat;
pub mod conn;
pub mod framer;
pub mod hist;
pub mod hold;
pub mod io;
pub mod login;
pub mod presence;
pub mod procs;
pub mod report;
pub mod session;
pub mod sys;
pub mod writes;

use std::io::IsTerminal as _;
use std::net::{SocketAddr, ToSocketAddrs as _};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::sync::watch;

use report::Report;
use session::{LoginError, Mech, Session, Target, TlsMode, Transport};

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Scenario {
    /// Connection + authentication rate: each login closes its connection.
    Login,
    /// N authenticated TLS connections held idle (memory per connection).
    Hold,
    /// Online users send chat messages to each other at an offered rate.
    Chat,
    /// Status changes fanned out over rosters of --roster-size contacts.
    Presence,
    /// Every user does roster sets back to back (one replicated write each):
    /// committed writes/s and commit latency.
    Writes,
    /// Print the generated accounts as `user@domain;password` lines (the
    /// format of `clusterctl import-users`) and exit.
    Accounts,
}

/// Command-line options.
#[derive(Debug, Clone, clap::Parser)]
#[command(
    name = "xmpp-load",
    about = "Load generator for XMPP servers (RFC 6120/6121 over TLS)",
    after_help = "Generated accounts are user1..userN with passwords pw1..pwN (see --user-pattern, --password-pattern); \
`xmpp-load accounts --users N --domain D > FILE` writes them for `clusterctl import-users FILE`.\n\
Exit status: 0 on success; 1 when the run failed (cannot connect, login errors before the run, messages lost or duplicated); 2 on bad flags."
)]
pub struct Options {
    #[arg(value_enum)]
    pub scenario: Scenario,
    /// Server address (HOST:PORT); several, comma-separated, for the nodes
    /// of a cluster: user i logs in to the (i mod count)-th, and in the chat
    /// scenario every message goes to a user of another node.
    #[arg(long, default_value = "127.0.0.1:5222", value_delimiter = ',')]
    pub server: Vec<String>,
    /// XMPP domain (virtual host) of the accounts; or one per `--server`,
    /// comma-separated (`a.test,b.test`): user i is of the i-th server's
    /// domain, and in `chat` every message then crosses domains (s2s).
    #[arg(long, default_value = "localhost")]
    pub domain: String,
    #[arg(long, value_enum, default_value = "starttls")]
    pub tls: TlsMode,
    /// TCP (c2s ports), or WebSocket (RFC 7395, `--server` is then an HTTP
    /// port: `--tls direct` for wss://, `--tls none` for ws://).
    #[arg(long, value_enum, default_value = "tcp")]
    pub transport: Transport,
    /// Path of the WebSocket endpoint.
    #[arg(long, default_value = "/xmpp-websocket")]
    pub ws_path: String,
    #[arg(long, value_enum, default_value = "plain")]
    pub mechanism: Mech,
    /// Number of users (generated accounts, or the first N of --accounts).
    #[arg(long, default_value_t = 100)]
    pub users: usize,
    /// Accounts file: `user;password` or `user@domain;password` lines.
    #[arg(long)]
    pub accounts: Option<PathBuf>,
    /// Local part of generated accounts; `{i}` is the number (1-based).
    #[arg(long, default_value = "user{i}")]
    pub user_pattern: String,
    /// Password of generated accounts; `{i}` is the number.
    #[arg(long, default_value = "pw{i}")]
    pub password_pattern: String,
    /// Logins started per second (0: as fast as --concurrency allows).
    #[arg(long, default_value_t = 200.0)]
    pub arrival_rate: f64,
    /// Most logins in flight at once.
    #[arg(long, default_value_t = 200)]
    pub concurrency: usize,
    /// Seconds of measurement (after every user is logged in, for hold,
    /// chat and presence).
    #[arg(long, default_value_t = 10.0)]
    pub duration: f64,
    /// Messages (chat) or status changes (presence) per second offered, in total.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// In `chat` with several `--server`s: every message goes to a user of
    /// the sender's own server (delivered within one node) instead of to
    /// one of another, for a baseline with the same spread of users.
    #[arg(long)]
    pub within_server: bool,
    /// Bytes of each message body (at least the ~30-byte marker).
    #[arg(long, default_value_t = 64)]
    pub body_size: usize,
    /// Seconds to wait for late deliveries after sending stops; what is
    /// still missing then is lost.
    #[arg(long, default_value_t = 5.0)]
    pub grace: f64,
    /// Contacts per user in the presence scenario.
    #[arg(long, default_value_t = 10)]
    pub roster_size: usize,
    /// The server's PID, for its memory (VmRSS) and CPU time from /proc;
    /// several, comma-separated, are summed (the nodes of a cluster).
    #[arg(long, value_delimiter = ',')]
    pub server_pid: Vec<u32>,
    /// Worker threads, each driving its share of the connections.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Local addresses to connect from, round-robin, so that more
    /// connections than one address's ephemeral ports (about 28,000 on
    /// Linux) reach one server address: a range `127.0.0.2-127.0.0.9`, a
    /// comma list, or both (`127.0.0.2-127.0.0.5,127.0.1.1`). Every
    /// 127.0.0.0/8 address is local on Linux.
    #[arg(long, value_parser = parse_source_ips)]
    pub source_ips: Option<SourceIps>,
    /// Run as this many processes, each driving a disjoint share of the
    /// users with the same options (`--threads` each), to go past one
    /// process's open-files limit; they log in, start measuring together
    /// and their reports are merged into one (login, hold and chat).
    #[arg(long, default_value_t = 1)]
    pub processes: usize,
    /// Internal: this process is share `I` of `N` of a `--processes N` run
    /// (started by the parent, which it talks to over stdin/stdout).
    #[arg(long, hide = true, value_parser = parse_shard)]
    pub shard: Option<Shard>,
    /// Seconds each negotiation step may take.
    #[arg(long, default_value_t = 30.0)]
    pub step_timeout: f64,
    /// Print one JSON object with every figure on stdout instead of the table.
    #[arg(long)]
    pub json: bool,
    /// No progress line on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    /// Local part only.
    pub user: String,
    pub password: String,
}

/// Accounts from a file of `user;password` or `user@domain;password` lines
/// (blank lines and `#` comments skipped).
pub fn parse_accounts(text: &str, domain: &str) -> anyhow::Result<Vec<Account>> {
    let mut out = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((user, password)) = line.split_once(';') else {
            bail!(
                "line {}: expected `user;password` or `user@domain;password`",
                n + 1
            );
        };
        let user = match user.split_once('@') {
            Some((local, d)) if d == domain => local,
            Some((_, d)) => bail!(
                "line {}: account of domain {d}, but --domain is {domain}",
                n + 1
            ),
            None => user,
        };
        out.push(Account {
            user: user.trim().to_owned(),
            password: password.to_owned(),
        });
    }
    Ok(out)
}

/// The addresses of `--source-ips`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SourceIps(pub Vec<std::net::IpAddr>);

/// Largest `--source-ips` list: a typo in a range (`127.0.0.2-127.1.0.2`)
/// should be an error, not 65,000 addresses.
const MAX_SOURCE_IPS: u32 = 4096;

/// Parses `A-B` ranges and single addresses, comma-separated.
pub fn parse_source_ips(s: &str) -> Result<SourceIps, String> {
    use std::net::{IpAddr, Ipv4Addr};
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let parse = |a: &str| {
            a.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("{a:?} is not an IP address"))
        };
        match part.split_once('-') {
            None => out.push(parse(part)?),
            Some((a, b)) => {
                let (IpAddr::V4(a), IpAddr::V4(b)) = (parse(a)?, parse(b)?) else {
                    return Err(format!("{part}: ranges are IPv4 only; list IPv6 addresses"));
                };
                let (a, b) = (u32::from(a), u32::from(b));
                if b < a {
                    return Err(format!("{part}: the range ends before it starts"));
                }
                if b - a >= MAX_SOURCE_IPS {
                    return Err(format!(
                        "{part}: {} addresses, more than the {MAX_SOURCE_IPS} allowed",
                        u64::from(b - a) + 1
                    ));
                }
                out.extend((a..=b).map(|ip| IpAddr::V4(Ipv4Addr::from(ip))));
            }
        }
    }
    if out.is_empty() {
        return Err("no address given".into());
    }
    Ok(SourceIps(out))
}

/// Which share of a `--processes` run this process drives: user `i` is
/// driven by process `i mod count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: usize,
    pub count: usize,
}

impl Shard {
    pub const WHOLE: Shard = Shard { index: 0, count: 1 };

    pub fn owns(self, user: usize) -> bool {
        user % self.count == self.index
    }

    /// The users worker `w` of `threads` drives in this share: user `i`
    /// belongs to process `i mod count` and, within it, to worker
    /// `(i / count) mod threads`.
    pub fn worker_share(
        self,
        w: usize,
        threads: usize,
        users: usize,
    ) -> impl Iterator<Item = usize> {
        (self.index + self.count * w..users).step_by(self.count * threads)
    }

    /// How many of `users` this share drives.
    pub fn len(self, users: usize) -> usize {
        users.saturating_sub(self.index).div_ceil(self.count)
    }
}

impl std::fmt::Display for Shard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.index, self.count)
    }
}

fn parse_shard(s: &str) -> Result<Shard, String> {
    let (i, n) = s.split_once('/').ok_or("expected I/N")?;
    let (index, count) = (
        i.parse::<usize>().map_err(|e| e.to_string())?,
        n.parse::<usize>().map_err(|e| e.to_string())?,
    );
    if index >= count {
        return Err(format!("{s}: I must be below N"));
    }
    Ok(Shard { index, count })
}

pub fn generate_accounts(n: usize, user_pattern: &str, password_pattern: &str) -> Vec<Account> {
    (1..=n)
        .map(|i| Account {
            user: user_pattern.replace("{i}", &i.to_string()),
            password: password_pattern.replace("{i}", &i.to_string()),
        })
        .collect()
}

/// What a run failed on, for the exit status and the JSON `error` field.
#[derive(Debug)]
pub struct Failure {
    pub message: String,
    pub report: Option<Box<Report>>,
}

/// Runs one scenario. `Ok` holds the report of a run that went well; a run
/// that lost messages or could not start is a [`Failure`] (with the report
/// when there is one).
pub fn run(opts: Options) -> Result<Report, Failure> {
    let fail = |e: anyhow::Error| Failure {
        message: format!("{e:#}"),
        report: None,
    };
    let accounts = match &opts.accounts {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))
                .map_err(fail)?;
            let mut a = parse_accounts(&text, &opts.domain)
                .with_context(|| path.display().to_string())
                .map_err(fail)?;
            if opts.users < a.len() {
                a.truncate(opts.users);
            }
            a
        }
        None => generate_accounts(opts.users, &opts.user_pattern, &opts.password_pattern),
    };
    if opts.scenario == Scenario::Accounts {
        for a in &accounts {
            println!("{}@{};{}", a.user, opts.domain, a.password);
        }
        return Ok(Report::empty(&opts));
    }
    if accounts.is_empty() {
        return Err(fail(anyhow::anyhow!(
            "no accounts: --users is 0 or the file is empty"
        )));
    }
    let addrs = opts
        .server
        .iter()
        .map(|s| resolve(s))
        .collect::<anyhow::Result<Vec<_>>>()
        .map_err(fail)?;
    if opts.scenario == Scenario::Chat && addrs.len() > 1 && accounts.len() % addrs.len() != 0 {
        return Err(fail(anyhow::anyhow!(
            "--users ({}) must be a multiple of the number of servers ({}) so that every message can cross nodes",
            accounts.len(),
            addrs.len()
        )));
    }
    if opts.scenario == Scenario::Chat
        && opts.within_server
        && addrs.len() > 1
        && accounts.len() < 2 * addrs.len()
    {
        return Err(fail(anyhow::anyhow!(
            "--within-server needs at least two users per server ({} users, {} servers)",
            accounts.len(),
            addrs.len()
        )));
    }
    let mut target = Target::new(
        addrs,
        &opts.domain,
        opts.tls,
        opts.transport,
        opts.mechanism,
    )
    .map_err(fail)?;
    target.ws_path = opts.ws_path.clone();
    target.step_timeout = Duration::from_secs_f64(opts.step_timeout);
    if let Some(ips) = &opts.source_ips {
        target.source_ips = ips.0.clone();
    }
    let shard = opts.shard.unwrap_or(Shard::WHOLE);
    if opts.processes == 0 {
        return Err(fail(anyhow::anyhow!("--processes must be at least 1")));
    }
    check_capacity(&opts, accounts.len(), &target).map_err(fail)?;
    if opts.processes > 1 && opts.shard.is_none() {
        return procs::run(&opts, accounts.len());
    }
    let mut opts = opts;
    if opts.shard.is_some() {
        // The parent measures the server once for the whole run.
        opts.server_pid.clear();
    }
    let (clock, clock_ns) = sys::monotonic_now();
    let ctx = Arc::new(RunCtx {
        progress: !opts.quiet,
        opts,
        target,
        accounts,
        counters: Counters::default(),
        phase: watch::channel(Phase::Setup).0,
        clock,
        clock_ns,
        shard,
    });
    let mut result = match ctx.opts.scenario {
        Scenario::Login => login::run(&ctx),
        Scenario::Hold => hold::run(&ctx),
        Scenario::Chat => chat::run(&ctx),
        Scenario::Presence => presence::run(&ctx),
        Scenario::Writes => writes::run(&ctx),
        Scenario::Accounts => unreachable!("handled above"),
    };
    let report = match &mut result {
        Ok(r) => Some(r),
        Err(f) => f.report.as_deref_mut(),
    };
    if let Some(r) = report {
        r.source_addresses = ctx.target.connections_by_source();
    }
    result
}

/// Connections one process of this run holds at once.
fn connections_per_process(opts: &Options, users: usize) -> usize {
    let processes = opts.processes.max(1);
    match opts.scenario {
        Scenario::Login => opts.concurrency.div_ceil(processes),
        _ => users.div_ceil(processes),
    }
}

/// Descriptors a process needs besides its connections (stdio, the
/// runtime's epoll and eventfd, pipes, /proc reads).
const FD_RESERVE: usize = 64;

/// Refuses, with the fix, a run that cannot fit: more connections per
/// process than its open-files limit allows (after raising the soft limit
/// to the hard one), or more connections to one server address than the
/// ephemeral ports of the source addresses.
fn check_capacity(opts: &Options, users: usize, target: &Target) -> anyhow::Result<()> {
    let fds = sys::raise_fd_limit() as usize;
    let per_process = connections_per_process(opts, users);
    if per_process + FD_RESERVE > fds {
        let fit = fds.saturating_sub(FD_RESERVE).max(1);
        let total = per_process * opts.processes.max(1);
        bail!(
            "{per_process} connections in one process need about {} open files, but a process may have {fds} \
             (its hard limit, which only root raises): run {total} connections with --processes {} \
             (at most {fit} each)",
            per_process + FD_RESERVE,
            total.div_ceil(fit),
        );
    }
    if opts.scenario != Scenario::Login {
        let ports = sys::ephemeral_ports();
        let sources = target.source_ips.len().max(1);
        let per_server = users.div_ceil(target.addrs.len());
        if per_server > ports * sources {
            bail!(
                "{per_server} connections to one server address need more than the {ports} ephemeral ports \
                 (net.ipv4.ip_local_port_range) of {sources} source address(es): give --source-ips with at \
                 least {} addresses (127.0.0.2-127.0.0.N)",
                per_server.div_ceil(ports)
            );
        }
    }
    Ok(())
}

fn resolve(server: &str) -> anyhow::Result<SocketAddr> {
    server
        .to_socket_addrs()
        .with_context(|| format!("cannot resolve {server} (expected HOST:PORT)"))?
        .next()
        .with_context(|| format!("{server} resolves to no address"))
}

/// Where a run is; workers follow it through [`RunCtx::phase`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Phase {
    Setup,
    /// Measurement starts at this instant.
    Go(Instant),
    /// Stop everything (end of the run, or a failed setup).
    Stop,
}

/// Counters shared by the workers; relaxed atomics, read by the controller
/// for progress and the report.
#[derive(Default)]
pub struct Counters {
    pub logged_in: AtomicU64,
    pub logins_failed: AtomicU64,
    pub sent: AtomicU64,
    pub delivered: AtomicU64,
    pub duplicated: AtomicU64,
    /// Messages that came back as `type='error'`.
    pub bounced: AtomicU64,
    /// Connections that broke after login.
    pub conn_errors: AtomicU64,
    pub first_conn_error: std::sync::Mutex<Option<String>>,
}

impl Counters {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }

    pub fn conn_error(&self, e: &std::io::Error) {
        self.conn_errors.fetch_add(1, Ordering::Relaxed);
        let mut first = self.first_conn_error.lock().expect("not poisoned");
        if first.is_none() {
            *first = Some(e.to_string());
        }
    }
}

pub struct RunCtx {
    pub opts: Options,
    pub target: Target,
    pub accounts: Vec<Account>,
    pub counters: Counters,
    pub phase: watch::Sender<Phase>,
    /// Time base of the send timestamps carried in messages.
    pub clock: Instant,
    /// `clock` on the system's monotonic clock (ns): the timestamps carried
    /// in messages are on that clock, so that the processes of a
    /// `--processes` run measure latency between each other.
    pub clock_ns: u64,
    pub progress: bool,
    /// The users this process drives (all but in a `--processes` run).
    pub shard: Shard,
}

impl RunCtx {
    /// Now on the monotonic clock, in ns (see [`RunCtx::clock_ns`]).
    pub fn now_ns(&self) -> u64 {
        self.ns_at(Instant::now())
    }

    /// `t` on the monotonic clock, in ns.
    pub fn ns_at(&self, t: Instant) -> u64 {
        self.clock_ns + t.saturating_duration_since(self.clock).as_nanos() as u64
    }

    /// The global account indices worker `w` of this process drives.
    pub fn share(&self, w: usize) -> impl Iterator<Item = usize> {
        self.shard
            .worker_share(w, self.threads(), self.accounts.len())
    }

    /// Every account index this process drives.
    pub fn my_users(&self) -> impl Iterator<Item = usize> {
        (self.shard.index..self.accounts.len()).step_by(self.shard.count)
    }

    /// How many users this process drives.
    pub fn my_user_count(&self) -> usize {
        self.shard.len(self.accounts.len())
    }

    /// In a `--processes` run, tells the parent this process reached
    /// `stage` and waits for its word to go on (see [`procs`]); a no-op
    /// otherwise. An error means the parent is gone or called the run off:
    /// the phase is then `Stop`.
    pub fn sync(&self, stage: procs::Stage) -> Result<(), Failure> {
        if self.opts.shard.is_none() {
            return Ok(());
        }
        procs::child_sync(stage).map_err(|message| {
            self.phase.send_replace(Phase::Stop);
            Failure {
                message,
                report: None,
            }
        })
    }

    pub fn threads(&self) -> usize {
        self.opts.threads.max(1)
    }

    /// Workers over all processes of the run: `--arrival-rate` and
    /// `--concurrency` are totals, split between them.
    pub fn workers_in_run(&self) -> usize {
        self.threads() * self.shard.count
    }

    /// Starts one thread per worker, each with a current-thread runtime
    /// running `f(worker index)`.
    pub fn spawn_workers<F, Fut, R>(self: &Arc<Self>, f: F) -> Vec<std::thread::JoinHandle<R>>
    where
        F: Fn(Arc<RunCtx>, usize) -> Fut + Send + Sync + Clone + 'static,
        Fut: std::future::Future<Output = R>,
        R: Send + 'static,
    {
        (0..self.threads())
            .map(|w| {
                let ctx = self.clone();
                let f = f.clone();
                std::thread::Builder::new()
                    .name(format!("xmpp-load-{w}"))
                    .spawn(move || {
                        let rt = tokio::runtime::Builder::new_current_thread()
                            .enable_all()
                            .build()
                            .expect("a tokio runtime");
                        rt.block_on(f(ctx, w))
                    })
                    .expect("a worker thread")
            })
            .collect()
    }

    /// Waits until the phase is `Go` (returning its instant) or `Stop`.
    pub async fn wait_go(&self) -> Option<Instant> {
        let mut rx = self.phase.subscribe();
        loop {
            match *rx.borrow_and_update() {
                Phase::Go(t0) => return Some(t0),
                Phase::Stop => return None,
                Phase::Setup => {}
            }
            if rx.changed().await.is_err() {
                return None;
            }
        }
    }

    pub async fn wait_stop(&self) {
        let mut rx = self.phase.subscribe();
        let _ = rx.wait_for(|p| *p == Phase::Stop).await;
    }

    /// Logs in the given accounts, at most `--arrival-rate` per second
    /// (split across workers) and `--concurrency` at once; stops at the
    /// first failure, which it returns.
    pub async fn login_all(
        &self,
        indices: Vec<usize>,
    ) -> Result<Vec<(usize, Session)>, LoginError> {
        let per_worker_rate = self.opts.arrival_rate / self.workers_in_run() as f64;
        let max_inflight = (self.opts.concurrency / self.workers_in_run()).max(1);
        let start = Instant::now();
        let mut next = 0;
        let mut inflight = FuturesUnordered::new();
        let mut done = Vec::with_capacity(indices.len());
        while done.len() < indices.len() {
            let due = if per_worker_rate > 0.0 {
                (start.elapsed().as_secs_f64() * per_worker_rate) as usize + 1
            } else {
                usize::MAX
            };
            while next < indices.len() && next < due && inflight.len() < max_inflight {
                let i = indices[next];
                next += 1;
                let t = &self.target;
                let a = &self.accounts[i];
                inflight.push(async move { (i, Session::login(t, i, a).await) });
            }
            let tick = tokio::time::sleep(Duration::from_millis(2));
            tokio::select! {
                Some((i, r)) = inflight.next(), if !inflight.is_empty() => {
                    let s = r?;
                    self.counters.logged_in.fetch_add(1, Ordering::Relaxed);
                    done.push((i, s));
                }
                _ = tick, if next < indices.len() => {}
            }
        }
        Ok(done)
    }

    /// Shows how far the setup logins are.
    pub fn progress_logins(&self, started: Instant, label: &str) {
        if self.opts.shard.is_some() {
            procs::child_logged_in(Counters::get(&self.counters.logged_in));
        } else if self.progress {
            let c = &self.counters;
            status_line(&format!(
                "{label}: logged in {}/{} ({:.0}/s)",
                Counters::get(&c.logged_in),
                self.my_user_count(),
                Counters::get(&c.logged_in) as f64 / started.elapsed().as_secs_f64().max(1e-3)
            ));
        }
    }
}

/// Drives a worker's connections until the run stops (or they all end),
/// counting connection errors, and returns the latencies they recorded.
pub(crate) async fn drive<F>(
    ctx: &RunCtx,
    mut conns: futures_util::stream::FuturesUnordered<F>,
    hist: std::rc::Rc<std::cell::RefCell<hist::Latency>>,
) -> hist::Latency
where
    F: std::future::Future<Output = std::io::Result<()>>,
{
    let stop = ctx.wait_stop();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            r = conns.next() => match r {
                Some(Err(e)) => ctx.counters.conn_error(&e),
                Some(Ok(())) => {}
                None => break,
            },
            _ = &mut stop => break,
        }
    }
    drop(conns);
    std::rc::Rc::try_unwrap(hist)
        .map(std::cell::RefCell::into_inner)
        .unwrap_or_default()
}

/// A progress line on stderr: rewritten in place on a terminal, one line
/// each time otherwise (logs, CI).
pub fn status_line(s: &str) {
    use std::io::Write as _;
    let mut e = std::io::stderr().lock();
    if std::io::stderr().is_terminal() {
        let _ = write!(e, "\r\x1b[2K{s}");
    } else {
        let _ = writeln!(e, "{s}");
    }
    let _ = e.flush();
}

/// Ends an in-place progress line before other output.
pub fn end_status() {
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
}

/// Login results of all workers, gathered by the controller while it shows
/// progress. The first failure stops every worker and is returned.
pub fn await_logins(
    ctx: &RunCtx,
    rx: std::sync::mpsc::Receiver<Result<(), LoginError>>,
    label: &str,
) -> Result<(), Failure> {
    let started = Instant::now();
    let mut pending = ctx.threads();
    let mut last = Instant::now();
    while pending > 0 {
        match rx.recv_timeout(Duration::from_millis(200)) {
            Ok(Ok(())) => pending -= 1,
            Ok(Err(e)) => {
                ctx.phase.send_replace(Phase::Stop);
                end_status();
                return Err(Failure {
                    message: format!("login failed: {e}"),
                    report: None,
                });
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return Err(Failure {
                    message: "a worker thread died during login".into(),
                    report: None,
                })
            }
        }
        if last.elapsed() >= Duration::from_secs(1) {
            ctx.progress_logins(started, label);
            last = Instant::now();
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accounts_file_takes_both_line_forms() {
        let a = parse_accounts("# c\nuser1;pw;1\n\nuser2@localhost;x\n", "localhost").unwrap();
        assert_eq!(
            a,
            vec![
                Account {
                    user: "user1".into(),
                    password: "pw;1".into()
                },
                Account {
                    user: "user2".into(),
                    password: "x".into()
                }
            ]
        );
        assert!(parse_accounts("u@other;x", "localhost").is_err());
        assert!(parse_accounts("nopassword", "localhost").is_err());
    }

    #[test]
    fn source_ips_take_ranges_and_lists() {
        let ips = parse_source_ips("127.0.0.254-127.0.1.1, 10.0.0.1,::1").unwrap();
        let s: Vec<String> = ips.0.iter().map(|ip| ip.to_string()).collect();
        assert_eq!(
            s,
            [
                "127.0.0.254",
                "127.0.0.255",
                "127.0.1.0",
                "127.0.1.1",
                "10.0.0.1",
                "::1"
            ]
        );
        assert!(parse_source_ips("127.0.0.9-127.0.0.2").is_err());
        assert!(parse_source_ips("127.0.0.1-127.1.0.0").is_err());
        assert!(parse_source_ips("localhost").is_err());
        assert!(parse_source_ips("").is_err());
    }

    #[test]
    fn shards_and_workers_split_the_users_once() {
        let mut seen = vec![0; 23];
        for count in [1, 2, 3] {
            seen.iter_mut().for_each(|s| *s = 0);
            for index in 0..count {
                let shard = Shard { index, count };
                let mut mine = 0;
                for w in 0..2 {
                    for i in shard.worker_share(w, 2, 23) {
                        assert!(shard.owns(i));
                        seen[i] += 1;
                        mine += 1;
                    }
                }
                assert_eq!(mine, shard.len(23));
            }
            assert!(seen.iter().all(|&s| s == 1), "{count}: {seen:?}");
        }
        assert_eq!(parse_shard("1/2"), Ok(Shard { index: 1, count: 2 }));
        assert!(parse_shard("2/2").is_err());
    }

    #[test]
    fn generated_accounts_follow_the_patterns() {
        let a = generate_accounts(2, "u{i}", "p{i}");
        assert_eq!(a[1].user, "u2");
        assert_eq!(a[1].password, "p2");
    }
}
