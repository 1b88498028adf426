//! The result of a run: one JSON object for scripts (`--json`), or a table.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::{Deserialize, Serialize};

use super::hist::Summary;
use super::session::{Mech, TlsMode, Transport};
use super::sys::ProcSample;
use super::{Options, Scenario};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub scenario: Scenario,
    pub server: String,
    pub domain: String,
    pub tls: TlsMode,
    pub transport: Transport,
    pub mechanism: Mech,
    pub users: usize,
    /// Worker threads per process.
    pub threads: usize,
    /// Processes that drove the users (`--processes`).
    #[serde(default = "one")]
    pub processes: usize,
    /// Seconds of measurement.
    pub duration_s: f64,
    /// False when the run lost or duplicated messages or could not run.
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login: Option<LoginFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold: Option<HoldFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub chat: Option<ChatFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub presence: Option<PresenceFigures>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub writes: Option<WriteFigures>,
    /// The server process during the measurement (with --server-pid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_process: Option<ProcFigures>,
    /// xmpp-load itself during the measurement: near 1.0 core per thread
    /// means the generator, not the server, was the limit (summed over the
    /// processes of a `--processes` run).
    pub load_process: ProcFigures,
    /// Connections made from each local address (with `--source-ips`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub source_addresses: BTreeMap<String, u64>,
    /// The latency histogram as `(µs, count)` buckets: written by the
    /// children of a `--processes` run so the parent merges histograms,
    /// not percentiles.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_buckets: Option<Vec<(u64, u64)>>,
}

fn one() -> usize {
    1
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LoginFigures {
    pub attempted: u64,
    pub succeeded: u64,
    pub failed: u64,
    /// Successful logins per second of measurement.
    pub per_s: f64,
    /// From TCP connect to the roster result.
    pub latency: Summary,
    /// Failures by cause (`connection-refused`, `auth:not-authorized`, …).
    pub errors: BTreeMap<String, u64>,
    /// One message per cause, as an operator would read it.
    pub error_examples: BTreeMap<String, String>,
    /// Server CPU milliseconds per successful login (with --server-pid).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_ms_per_login: Option<f64>,
}

/// The `writes` scenario: acknowledged roster sets, each one replicated
/// write (a Raft entry committed and applied before the result).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WriteFigures {
    pub acknowledged: u64,
    /// Answered with an error, or not answered before the end.
    pub failed: u64,
    pub per_s: f64,
    /// From sending the IQ to its result.
    pub latency: Summary,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_ms_per_write: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HoldFigures {
    pub connections: u64,
    /// Connections still open at the end of the hold.
    pub alive_at_end: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_before_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_rss_after_kib: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_kib_per_connection: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatFigures {
    pub offered_per_s: f64,
    pub body_size: usize,
    pub sent: u64,
    pub delivered: u64,
    /// Not delivered within the grace period after sending stopped.
    pub lost: u64,
    /// Delivered more than once (each extra copy counts).
    pub duplicated: u64,
    /// Returned as `type='error'` instead of being delivered.
    pub bounced: u64,
    pub sent_per_s: f64,
    pub delivered_per_s: f64,
    /// Delivered before sending stopped, per second of sending: below the
    /// offered rate, the server is falling behind (a growing backlog).
    pub delivered_while_sending_per_s: f64,
    /// Seconds after sending stopped until the last delivery (or the grace
    /// period ran out).
    pub drain_s: f64,
    /// From the send timestamp carried in the body to its arrival.
    pub latency: Summary,
    /// Connections that broke during the run.
    pub connection_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_s_per_1000_messages: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PresenceFigures {
    pub offered_per_s: f64,
    pub roster_size: usize,
    /// Smallest roster (both-way subscriptions) among the users after setup.
    pub min_roster: usize,
    pub status_changes_sent: u64,
    /// Presence stanzas from contacts expected (changes × online contacts).
    pub expected: u64,
    pub received: u64,
    pub received_per_s: f64,
    pub latency: Summary,
    pub connection_errors: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub server_cpu_s_per_1000_stanzas: Option<f64>,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct ProcFigures {
    /// CPU seconds used during the measurement.
    pub cpu_s: f64,
    /// `cpu_s` / wall seconds (1.0 = one core busy).
    pub cpu_cores: f64,
    pub rss_kib_start: u64,
    pub rss_kib_end: u64,
}

impl ProcFigures {
    pub fn between(a: ProcSample, b: ProcSample, wall_s: f64) -> ProcFigures {
        let cpu_s = (b.cpu_s - a.cpu_s).max(0.0);
        ProcFigures {
            cpu_s,
            cpu_cores: if wall_s > 0.0 { cpu_s / wall_s } else { 0.0 },
            rss_kib_start: a.rss_kib,
            rss_kib_end: b.rss_kib,
        }
    }
}

impl Report {
    pub fn empty(o: &Options) -> Report {
        Report {
            scenario: o.scenario,
            server: o.server.join(","),
            domain: o.domain.clone(),
            tls: o.tls,
            transport: o.transport,
            mechanism: o.mechanism,
            users: o.users,
            threads: o.threads.max(1),
            processes: o.processes.max(1),
            duration_s: 0.0,
            ok: true,
            error: None,
            login: None,
            hold: None,
            chat: None,
            presence: None,
            writes: None,
            server_process: None,
            load_process: ProcFigures::default(),
            source_addresses: BTreeMap::new(),
            latency_buckets: None,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("a report serialises")
    }

    /// The human-readable table.
    pub fn table(&self) -> String {
        let mut t = Table::default();
        t.row(
            "scenario",
            format!(
                "{:?} against {} ({}, {:?}, {:?}, {})",
                self.scenario,
                self.server,
                self.domain,
                self.transport,
                self.tls,
                self.mechanism.name()
            )
            .to_lowercase(),
        );
        t.row("users", self.users);
        t.row("measured", format!("{:.1} s", self.duration_s));
        if let Some(l) = &self.login {
            t.row(
                "logins",
                format!("{} ok, {} failed of {}", l.succeeded, l.failed, l.attempted),
            );
            t.row("logins/s", format!("{:.1}", l.per_s));
            t.row("login latency", latency(&l.latency));
            for (cause, n) in &l.errors {
                t.row(&format!("  error {cause}"), n);
            }
            if let Some(ms) = l.server_cpu_ms_per_login {
                t.row("server CPU per login", format!("{ms:.2} ms"));
            }
        }
        if let Some(w) = &self.writes {
            t.row(
                "writes",
                format!("{} acknowledged, {} failed", w.acknowledged, w.failed),
            );
            t.row("writes/s", format!("{:.1}", w.per_s));
            t.row("write latency", latency(&w.latency));
            if let Some(ms) = w.server_cpu_ms_per_write {
                t.row("server CPU per write", format!("{ms:.3} ms"));
            }
        }
        if let Some(h) = &self.hold {
            t.row(
                "connections held",
                format!("{} ({} alive at end)", h.connections, h.alive_at_end),
            );
            if let (Some(a), Some(b)) = (h.server_rss_before_kib, h.server_rss_after_kib) {
                t.row("server RSS", format!("{a} KiB -> {b} KiB"));
            }
            if let Some(k) = h.server_kib_per_connection {
                t.row("server memory per connection", format!("{k:.1} KiB"));
            }
        }
        if let Some(c) = &self.chat {
            t.row(
                "offered",
                format!("{:.0} msg/s, {} B bodies", c.offered_per_s, c.body_size),
            );
            t.row("sent", format!("{} ({:.0}/s)", c.sent, c.sent_per_s));
            t.row(
                "delivered",
                format!(
                    "{} ({:.0}/s while sending, then {:.2} s to drain)",
                    c.delivered, c.delivered_while_sending_per_s, c.drain_s
                ),
            );
            t.row("lost", c.lost);
            t.row("duplicated", c.duplicated);
            if c.bounced > 0 {
                t.row("bounced (error)", c.bounced);
            }
            if c.connection_errors > 0 {
                t.row("connection errors", c.connection_errors);
            }
            t.row("delivery latency", latency(&c.latency));
            if let Some(s) = c.server_cpu_s_per_1000_messages {
                t.row("server CPU per 1000 msgs", format!("{s:.4} s"));
            }
        }
        if let Some(p) = &self.presence {
            t.row(
                "offered",
                format!(
                    "{:.0} status changes/s, roster {}",
                    p.offered_per_s, p.roster_size
                ),
            );
            t.row("smallest roster", p.min_roster);
            t.row("status changes sent", p.status_changes_sent);
            t.row(
                "presence received",
                format!(
                    "{} of {} expected ({:.0}/s)",
                    p.received, p.expected, p.received_per_s
                ),
            );
            t.row("presence latency", latency(&p.latency));
            if let Some(s) = p.server_cpu_s_per_1000_stanzas {
                t.row("server CPU per 1000 stanzas", format!("{s:.4} s"));
            }
        }
        if let Some(s) = &self.server_process {
            t.row(
                "server CPU",
                format!("{:.2} s ({:.2} cores)", s.cpu_s, s.cpu_cores),
            );
        }
        if !self.source_addresses.is_empty() {
            let by: Vec<String> = self
                .source_addresses
                .iter()
                .map(|(ip, n)| format!("{ip} {n}"))
                .collect();
            t.row("connections by source", by.join(", "));
        }
        let l = &self.load_process;
        let procs = if self.processes > 1 {
            format!(" in each of {} processes", self.processes)
        } else {
            String::new()
        };
        t.row(
            "xmpp-load CPU",
            format!(
                "{:.2} s ({:.2} cores of {} thread(s){procs})",
                l.cpu_s, l.cpu_cores, self.threads
            ),
        );
        if let Some(e) = &self.error {
            t.row("RESULT", format!("FAILED: {e}"));
        } else {
            t.row("RESULT", "ok");
        }
        t.0
    }
}

fn latency(s: &Summary) -> String {
    format!(
        "p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, p99.9 {:.2} ms, max {:.2} ms",
        s.p50_ms, s.p90_ms, s.p99_ms, s.p999_ms, s.max_ms
    )
}

#[derive(Default)]
struct Table(String);

impl Table {
    fn row(&mut self, k: &str, v: impl std::fmt::Display) {
        let _ = writeln!(self.0, "{k:<30} {v}");
    }
}
