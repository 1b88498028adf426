//! `--processes N`: one run driven by N copies of xmpp-load, to go past one
//! process's open-files limit.
//!
//! The parent re-executes itself N times with the same flags plus
//! `--shard I/N --json --quiet`; child I drives the users `i` with
//! `i mod N = I` (chat messages still go to any user, so they cross
//! processes). The parent and each child talk over the child's stdin and
//! stdout, one line at a time, so the run starts and ends together without
//! any waiting on a guess:
//!
//! ```text
//! child:  @xmpp-load logged-in 812     (progress while logging in)
//! child:  @xmpp-load ready             (every user of this share logged in)
//! parent: go                           (once every child is ready)
//! child:  @xmpp-load measured          (its measurement is over)
//! parent: end                          (once every child has measured)
//! child:  { …its JSON report… }        then it closes its connections and exits
//! ```
//!
//! End of file on a child's stdin means the parent is gone or called the
//! run off: the child stops. The parent reads the server's `/proc` figures
//! itself, once for the whole run (before the first login, when every
//! child is ready, and when every child has measured), and merges the
//! children's reports: counts are summed, latency histograms are merged
//! from their buckets (exact, not an average of percentiles); rates are the
//! sums of each child's rate over its own measured seconds, which start
//! within milliseconds of each other, and `load_process` is the sum over
//! the children.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{BufRead as _, BufReader, Read as _, Write as _};
use std::process::{ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use super::hist::Latency;
use super::report::{ChatFigures, HoldFigures, LoginFigures, ProcFigures, Report};
use super::sys::{self, ProcSample};
use super::{end_status, status_line, Failure, Options, Scenario};

const PREFIX: &str = "@xmpp-load ";

/// The points where every process of a run waits for the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Stage {
    /// Every user logged in; the measurement starts on the parent's word.
    Ready,
    /// The measurement is over; connections close on the parent's word.
    Measured,
}

impl Stage {
    fn says(self) -> &'static str {
        match self {
            Stage::Ready => "ready",
            Stage::Measured => "measured",
        }
    }

    fn answer(self) -> &'static str {
        match self {
            Stage::Ready => "go",
            Stage::Measured => "end",
        }
    }
}

/// Child side: says `stage` on stdout and waits for the parent's answer on
/// stdin.
pub fn child_sync(stage: Stage) -> Result<(), String> {
    {
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{PREFIX}{}", stage.says());
        let _ = out.flush();
    }
    let mut line = String::new();
    match std::io::stdin().lock().read_line(&mut line) {
        Ok(0) | Err(_) => Err("the parent xmpp-load went away".into()),
        Ok(_) if line.trim() == stage.answer() => Ok(()),
        Ok(_) => Err(format!("called off by the parent ({})", line.trim())),
    }
}

/// Child side: login progress for the parent's progress line.
pub fn child_logged_in(n: u64) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{PREFIX}logged-in {n}");
    let _ = out.flush();
}

/// The parent's own flags minus those it handles itself, for its children
/// (`--processes` stays: a child with `--shard` knows it is one of them).
fn child_args(args: impl Iterator<Item = OsString>) -> Vec<OsString> {
    const WITH_VALUE: [&str; 2] = ["--server-pid", "--shard"];
    const FLAGS: [&str; 3] = ["--json", "--quiet", "-q"];
    let mut out = Vec::new();
    let mut skip_next = false;
    for a in args {
        if std::mem::take(&mut skip_next) {
            continue;
        }
        let s = a.to_string_lossy();
        if WITH_VALUE.contains(&s.as_ref()) {
            skip_next = true;
        } else if !FLAGS.contains(&s.as_ref())
            && !WITH_VALUE.iter().any(|f| s.starts_with(&format!("{f}=")))
        {
            out.push(a);
        }
    }
    out
}

enum Event {
    LoggedIn(usize, u64),
    Reached(usize, Stage),
    /// The child's stdout closed and it exited: what it printed that was
    /// not a control line (its JSON report), and whether it succeeded.
    Exited(usize, String, bool),
}

struct Child {
    stdin: Option<ChildStdin>,
    reached: Option<Stage>,
    exit: Option<(String, bool)>,
}

struct Children {
    n: usize,
    kids: Vec<Child>,
    rx: mpsc::Receiver<Event>,
    logged_in: Vec<u64>,
}

impl Children {
    fn spawn(n: usize) -> anyhow::Result<Children> {
        use anyhow::Context as _;
        let exe = std::env::current_exe().context("cannot find this program to run it again")?;
        let args = child_args(std::env::args_os().skip(1));
        let (tx, rx) = mpsc::channel();
        let mut kids = Vec::with_capacity(n);
        for i in 0..n {
            let mut child = Command::new(&exe)
                .args(&args)
                .arg("--shard")
                .arg(format!("{i}/{n}"))
                .args(["--json", "--quiet"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .with_context(|| format!("cannot start {}", exe.display()))?;
            let stdout = child.stdout.take().expect("piped");
            let mut stderr = child.stderr.take().expect("piped");
            let stdin = child.stdin.take();
            let tx = tx.clone();
            std::thread::spawn(move || {
                let mut rest = String::new();
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    let event = match line.strip_prefix(PREFIX) {
                        Some("ready") => Event::Reached(i, Stage::Ready),
                        Some("measured") => Event::Reached(i, Stage::Measured),
                        Some(l) => match l.strip_prefix("logged-in ").map(str::parse) {
                            Some(Ok(k)) => Event::LoggedIn(i, k),
                            _ => continue,
                        },
                        None => {
                            rest.push_str(&line);
                            rest.push('\n');
                            continue;
                        }
                    };
                    if tx.send(event).is_err() {
                        break;
                    }
                }
                let ok = child.wait().map(|s| s.success()).unwrap_or(false);
                let _ = tx.send(Event::Exited(i, rest, ok));
            });
            // A child's complaints, named by its share; collected whole so
            // that a progress line in between cannot split one.
            std::thread::spawn(move || {
                let mut text = String::new();
                let _ = stderr.read_to_string(&mut text);
                for line in text.lines() {
                    eprintln!("xmpp-load[{i}/{n}]: {line}");
                }
            });
            kids.push(Child {
                stdin,
                reached: None,
                exit: None,
            });
        }
        Ok(Children {
            n,
            kids,
            rx,
            logged_in: vec![0; n],
        })
    }

    fn handle(&mut self, e: Event) {
        match e {
            Event::LoggedIn(i, k) => self.logged_in[i] = k,
            Event::Reached(i, s) => self.kids[i].reached = Some(s),
            Event::Exited(i, out, ok) => {
                self.kids[i].stdin = None;
                self.kids[i].exit = Some((out, ok));
            }
        }
    }

    /// Waits until every child reached `stage` or exited; `tick` runs about
    /// once a second meanwhile. Returns the first child that exited before
    /// reaching it.
    fn wait(&mut self, stage: Stage, mut tick: impl FnMut(&Children)) -> Option<usize> {
        let mut last = Instant::now();
        loop {
            let pending = self
                .kids
                .iter()
                .any(|k| k.exit.is_none() && k.reached.is_none_or(|r| r < stage));
            if !pending {
                break;
            }
            match self.rx.recv_timeout(Duration::from_millis(200)) {
                Ok(e) => self.handle(e),
                Err(mpsc::RecvTimeoutError::Timeout) => {}
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
            if last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                tick(self);
            }
        }
        self.kids
            .iter()
            .position(|k| k.exit.is_some() && k.reached.is_none_or(|r| r < stage))
    }

    /// Tells every child still running to go on past its current stage.
    fn say(&mut self, word: &str) {
        for k in &mut self.kids {
            if let Some(stdin) = &mut k.stdin {
                if writeln!(stdin, "{word}")
                    .and_then(|_| stdin.flush())
                    .is_err()
                {
                    k.stdin = None;
                }
            }
        }
    }

    /// Closes every child's stdin (a child stops on end of file) and waits
    /// for all of them to exit.
    fn finish(&mut self) -> Vec<(String, bool)> {
        for k in &mut self.kids {
            k.stdin = None;
        }
        while self.kids.iter().any(|k| k.exit.is_none()) {
            match self.rx.recv() {
                Ok(e) => self.handle(e),
                Err(_) => break,
            }
        }
        self.kids
            .iter_mut()
            .map(|k| k.exit.take().unwrap_or_default())
            .collect()
    }
}

/// What the parent measured of the server.
#[derive(Debug, Default, Clone, Copy)]
pub struct ServerFigures {
    /// Before the first login.
    pub start: Option<ProcSample>,
    /// When the measurement started (every user logged in).
    pub go: Option<ProcSample>,
    /// When every child had measured.
    pub end: Option<ProcSample>,
    /// Seconds between `go` and `end`.
    pub wall_s: f64,
}

/// Parent side of `--processes N`: starts the children, moves them through
/// the run together and merges their reports.
pub fn run(opts: &Options, users: usize) -> Result<Report, Failure> {
    let fail = |message: String| Failure {
        message,
        report: None,
    };
    let n = opts.processes;
    if !matches!(
        opts.scenario,
        Scenario::Login | Scenario::Hold | Scenario::Chat
    ) {
        return Err(fail(format!(
            "--processes runs the login, hold and chat scenarios, not {:?}",
            opts.scenario
        )));
    }
    if users < n {
        return Err(fail(format!(
            "{users} users cannot be shared by {n} processes"
        )));
    }
    let progress = !opts.quiet;
    let label = format!("{:?}", opts.scenario).to_lowercase();
    let mut server = ServerFigures {
        start: sys::sample_all(&opts.server_pid).map_err(|e| fail(format!("{e:#}")))?,
        ..ServerFigures::default()
    };
    let mut kids = Children::spawn(n).map_err(|e| fail(format!("{e:#}")))?;
    let started = Instant::now();
    let early = kids.wait(Stage::Ready, |k| {
        if progress {
            let done: u64 = k.logged_in.iter().sum();
            status_line(&format!(
                "{label}: logged in {done}/{users} ({:.0}/s) in {} processes",
                done as f64 / started.elapsed().as_secs_f64(),
                k.n
            ));
        }
    });
    if let Some(i) = early {
        let exits = kids.finish();
        if progress {
            end_status();
        }
        let (out, _) = &exits[i];
        return Err(fail(format!(
            "process {i}/{n} stopped before the run began: {}",
            child_error(out)
        )));
    }
    if opts.scenario == Scenario::Hold {
        std::thread::sleep(super::hold::SETTLE);
    }
    server.go = sys::sample_all(&opts.server_pid).ok().flatten();
    let t0 = Instant::now();
    kids.say(Stage::Ready.answer());
    kids.wait(Stage::Measured, |_| {
        if progress {
            status_line(&format!(
                "{label} {:>4.0}s/{:.0}s in {n} processes",
                t0.elapsed().as_secs_f64(),
                opts.duration
            ));
        }
    });
    server.wall_s = t0.elapsed().as_secs_f64();
    server.end = sys::sample_all(&opts.server_pid).ok().flatten();
    kids.say(Stage::Measured.answer());
    let exits = kids.finish();
    if progress {
        end_status();
    }
    let mut parts = Vec::with_capacity(n);
    let mut errors = Vec::new();
    for (i, (out, ok)) in exits.iter().enumerate() {
        match serde_json::from_str::<Report>(out) {
            Ok(r) => {
                if let (false, Some(e)) = (r.ok && *ok, &r.error) {
                    errors.push(format!("process {i}/{n}: {e}"));
                }
                parts.push(r);
            }
            Err(_) => errors.push(format!("process {i}/{n}: {}", child_error(out))),
        }
    }
    let mut report = merge(opts, &parts, &server);
    errors.extend(report.error.take());
    if errors.is_empty() {
        Ok(report)
    } else {
        let message = errors.join("; ");
        report.ok = false;
        report.error = Some(message.clone());
        Err(Failure {
            message,
            report: Some(Box::new(report)),
        })
    }
}

/// What a child said went wrong: the `error` of its JSON, or its output.
fn child_error(out: &str) -> String {
    serde_json::from_str::<serde_json::Value>(out)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_owned))
        .unwrap_or_else(|| {
            let t = out.trim();
            if t.is_empty() {
                "it exited without a report (see its messages above)".into()
            } else {
                t.to_owned()
            }
        })
}

/// One report for the whole run from the children's, with the server as
/// the parent measured it. Sets `error` when the merged figures show a
/// loss the children could not see alone.
pub fn merge(opts: &Options, parts: &[Report], server: &ServerFigures) -> Report {
    let mut r = Report::empty(opts);
    r.processes = opts.processes.max(1);
    r.users = parts.iter().map(|p| p.users).sum();
    r.duration_s = parts.iter().map(|p| p.duration_s).fold(0.0, f64::max);
    r.ok = parts.iter().all(|p| p.ok);
    for p in parts {
        let l = &mut r.load_process;
        l.cpu_s += p.load_process.cpu_s;
        l.cpu_cores += p.load_process.cpu_cores;
        l.rss_kib_start += p.load_process.rss_kib_start;
        l.rss_kib_end += p.load_process.rss_kib_end;
        for (ip, k) in &p.source_addresses {
            *r.source_addresses.entry(ip.clone()).or_default() += k;
        }
    }
    r.server_process = match (server.go, server.end) {
        (Some(a), Some(b)) => Some(ProcFigures::between(a, b, server.wall_s)),
        _ => None,
    };
    let cpu_s = r.server_process.map(|p| p.cpu_s);
    let mut hist = Latency::new();
    for p in parts {
        hist.add(&Latency::from_buckets(
            p.latency_buckets.as_deref().unwrap_or_default(),
        ));
    }
    let per_s = |x: u64| {
        if r.duration_s > 0.0 {
            x as f64 / r.duration_s
        } else {
            0.0
        }
    };
    let holds: Vec<&HoldFigures> = parts.iter().filter_map(|p| p.hold.as_ref()).collect();
    if !holds.is_empty() {
        let connections = holds.iter().map(|h| h.connections).sum();
        let before = server.start.map(|s| s.rss_kib);
        let after = server.go.map(|s| s.rss_kib);
        r.hold = Some(HoldFigures {
            connections,
            alive_at_end: holds.iter().map(|h| h.alive_at_end).sum(),
            server_rss_before_kib: before,
            server_rss_after_kib: after,
            server_kib_per_connection: match (before, after) {
                (Some(a), Some(b)) if connections > 0 => {
                    Some((b as f64 - a as f64) / connections as f64)
                }
                _ => None,
            },
        });
    }
    let logins: Vec<&LoginFigures> = parts.iter().filter_map(|p| p.login.as_ref()).collect();
    if !logins.is_empty() {
        let mut errors = BTreeMap::new();
        let mut examples = BTreeMap::new();
        for l in &logins {
            for (cause, k) in &l.errors {
                *errors.entry(cause.clone()).or_insert(0) += k;
            }
            for (cause, e) in &l.error_examples {
                examples.entry(cause.clone()).or_insert_with(|| e.clone());
            }
        }
        let succeeded = logins.iter().map(|l| l.succeeded).sum();
        r.login = Some(LoginFigures {
            attempted: logins.iter().map(|l| l.attempted).sum(),
            succeeded,
            failed: logins.iter().map(|l| l.failed).sum(),
            per_s: logins.iter().map(|l| l.per_s).sum(),
            latency: hist.summary(),
            errors,
            error_examples: examples,
            server_cpu_ms_per_login: cpu_s
                .filter(|_| succeeded > 0)
                .map(|c| c * 1000.0 / succeeded as f64),
        });
    }
    let chats: Vec<&ChatFigures> = parts.iter().filter_map(|p| p.chat.as_ref()).collect();
    if !chats.is_empty() {
        let sum = |f: fn(&ChatFigures) -> u64| chats.iter().map(|c| f(c)).sum::<u64>();
        let (sent, delivered) = (sum(|c| c.sent), sum(|c| c.delivered));
        let c = ChatFigures {
            offered_per_s: opts.rate,
            body_size: chats[0].body_size,
            sent,
            delivered,
            lost: sent.saturating_sub(delivered),
            duplicated: sum(|c| c.duplicated),
            bounced: sum(|c| c.bounced),
            sent_per_s: chats.iter().map(|c| c.sent_per_s).sum(),
            delivered_per_s: per_s(delivered),
            delivered_while_sending_per_s: chats
                .iter()
                .map(|c| c.delivered_while_sending_per_s)
                .sum(),
            drain_s: chats.iter().map(|c| c.drain_s).fold(0.0, f64::max),
            latency: hist.summary(),
            connection_errors: sum(|c| c.connection_errors),
            server_cpu_s_per_1000_messages: cpu_s
                .filter(|_| delivered > 0)
                .map(|c| c * 1000.0 / delivered as f64),
        };
        if c.lost > 0 {
            r.error = Some(format!("{} of {} messages LOST", c.lost, c.sent));
        }
        r.chat = Some(c);
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser as _;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn children_get_the_flags_but_not_the_parents_own() {
        let args = os(&[
            "chat",
            "--processes",
            "2",
            "--server-pid=7",
            "--users",
            "10",
            "--json",
            "-q",
            "--source-ips",
            "127.0.0.2-127.0.0.3",
            "--processes=3",
        ]);
        assert_eq!(
            child_args(args.into_iter()),
            os(&[
                "chat",
                "--processes",
                "2",
                "--users",
                "10",
                "--source-ips",
                "127.0.0.2-127.0.0.3",
                "--processes=3"
            ])
        );
    }

    #[test]
    fn merged_chat_sums_counts_and_merges_histograms() {
        let opts = Options::parse_from(["xmpp-load", "chat", "--processes", "2", "--rate", "100"]);
        let part = |sent, delivered, lat: &[u64], ip: &str| {
            let mut h = Latency::new();
            for &us in lat {
                h.record_us(us);
            }
            let mut r = Report::empty(&opts);
            r.users = 5;
            r.duration_s = 2.0;
            r.chat = Some(ChatFigures {
                sent,
                delivered,
                sent_per_s: sent as f64 / 2.0,
                latency: h.summary(),
                ..ChatFigures::default()
            });
            r.latency_buckets = Some(h.buckets());
            r.source_addresses.insert(ip.into(), 5);
            r.load_process.cpu_s = 0.5;
            r
        };
        // Process 0's users received more than they sent, and the other way
        // round: only the sums say whether anything was lost.
        let a = part(100, 120, &[1000; 120], "127.0.0.2");
        let b = part(100, 80, &[3000; 80], "127.0.0.3");
        let server = ServerFigures {
            go: Some(ProcSample {
                rss_kib: 1,
                cpu_s: 1.0,
            }),
            end: Some(ProcSample {
                rss_kib: 1,
                cpu_s: 1.4,
            }),
            wall_s: 2.0,
            ..ServerFigures::default()
        };
        let r = merge(&opts, &[a.clone(), b], &server);
        let c = r.chat.as_ref().unwrap();
        assert_eq!((c.sent, c.delivered, c.lost), (200, 200, 0));
        assert_eq!(c.latency.count, 200);
        assert!((c.latency.p50_ms - 1.0).abs() < 0.01, "{:?}", c.latency);
        assert!((c.latency.p99_ms - 3.0).abs() < 0.01, "{:?}", c.latency);
        assert_eq!(r.users, 10);
        assert_eq!(r.processes, 2);
        assert_eq!(r.source_addresses.len(), 2);
        assert!((r.load_process.cpu_s - 1.0).abs() < 1e-9);
        assert!((c.server_cpu_s_per_1000_messages.unwrap() - 2.0).abs() < 1e-9);
        assert!(r.error.is_none());

        let short = part(100, 70, &[1000; 70], "127.0.0.3");
        let r = merge(&opts, &[a.clone(), short], &server);
        assert_eq!(r.chat.as_ref().unwrap().lost, 10);
        assert!(r
            .error
            .as_deref()
            .unwrap()
            .contains("10 of 200 messages LOST"));
    }
}
