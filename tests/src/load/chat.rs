//! The `chat` scenario: every online user sends `chat` messages to the
//! others at its share of the offered rate; every message body starts with
//! a marker `~xl~SEQ~SENT~` (hex: a run-unique sequence number and the
//! send time in ns since the run's clock), so the receiver gets the
//! delivery latency and detects duplicates from the raw bytes, without
//! parsing the stanza.
//!
//! Schedule: `total = rate × duration` messages, spread evenly over the
//! users; user `i` sends its `k`-th message at `t0 + (k + i/N) / r` with
//! `r = rate / N`, so the users' sends interleave instead of bunching. A
//! late timer sends everything due at once (one write), so the offered
//! rate holds as long as the generator keeps up. Message `k` of user `i`
//! goes to user `i + 1 + k mod (N-1)`, to the bare JID, and has sequence
//! number `k·N + i`.

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;

use super::conn::{answer_iq, attr, head, Conn};
use super::framer::find;
use super::hist::Latency;
use super::procs::Stage;
use super::report::{ChatFigures, ProcFigures, Report};
use super::{await_logins, end_status, status_line, sys, Counters, Failure, Phase, RunCtx};

pub(super) const MARKER: &[u8] = b"~xl~";

/// What every connection of the run needs to build and check messages.
struct Plan {
    users: usize,
    /// Messages per user: `base`, plus one for the first `extra` users.
    base: u64,
    extra: u64,
    per_user_rate: f64,
    /// `<message to='USER@DOMAIN' type='chat'><body>~xl~` per user.
    prefixes: Vec<Vec<u8>>,
    /// Body padding after the marker (`x` bytes).
    pad: Vec<u8>,
    /// One bit per sequence number: set when delivered.
    seen: Vec<AtomicU64>,
    /// Server addresses the users are spread over (user i on the
    /// (i mod servers)-th).
    servers: u64,
    /// Every message to a user of the sender's own server, instead of
    /// to one of another server.
    within: bool,
}

impl Plan {
    fn messages_of(&self, i: usize) -> u64 {
        self.base + u64::from((i as u64) < self.extra)
    }

    /// Marks `seq` delivered; false if it already was (a duplicate) or
    /// is not ours.
    fn first_delivery(&self, seq: u64) -> Option<bool> {
        let word = self.seen.get((seq / 64) as usize)?;
        let bit = 1u64 << (seq % 64);
        Some(word.fetch_or(bit, Ordering::Relaxed) & bit == 0)
    }

    /// The user message `k` of user `me` goes to.
    fn recipient(&self, me: u64, k: u64) -> u64 {
        recipient(me, k, self.users as u64, self.servers, self.within)
    }
}

pub fn run(ctx: &Arc<RunCtx>) -> Result<Report, Failure> {
    let o = &ctx.opts;
    let n = ctx.accounts.len();
    if n < 2 {
        return Err(Failure {
            message: "the chat scenario needs at least 2 users".into(),
            report: None,
        });
    }
    let total = (o.rate * o.duration).round().max(0.0) as u64;
    let base = total / n as u64;
    let max_per_user = base + 1;
    let plan = Arc::new(Plan {
        users: n,
        base,
        extra: total % n as u64,
        per_user_rate: o.rate / n as f64,
        prefixes: ctx
            .accounts
            .iter()
            .enumerate()
            .map(|(j, a)| {
                format!(
                    "<message to='{}@{}' type='chat'><body>~xl~",
                    xmpp::element::escape(&a.user),
                    xmpp::element::escape(ctx.target.domain_of(j))
                )
                .into_bytes()
            })
            .collect(),
        pad: vec![b'x'; o.body_size.saturating_sub(MARKER.len() + 2 + 16 + 12)],
        seen: (0..(max_per_user * n as u64).div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect(),
        servers: ctx.target.addrs.len() as u64,
        within: o.within_server,
    });

    // What this process's users send and should receive: everything, but
    // in a --processes run, where messages cross between processes.
    let (to_send, to_receive) = if ctx.shard.count == 1 {
        (total, total)
    } else {
        let mut send = 0;
        let mut receive = 0;
        for i in 0..n {
            let mine = ctx.shard.owns(i);
            for k in 0..plan.messages_of(i) {
                send += u64::from(mine);
                let to = plan.recipient(i as u64, k);
                receive += u64::from(ctx.shard.owns(to as usize));
            }
        }
        (send, receive)
    };
    let (tx, rx) = std::sync::mpsc::channel();
    let workers = {
        let plan = plan.clone();
        ctx.spawn_workers(move |ctx, w| worker(ctx, w, plan.clone(), tx.clone()))
    };
    await_logins(ctx, rx, "chat")?;
    ctx.sync(Stage::Ready)?;

    let server_before = sys::sample_all(&o.server_pid);
    let server_before = server_before.map_err(|e| Failure {
        message: format!("{e:#}"),
        report: None,
    })?;
    let self_before = sys::sample_self();
    let t0 = Instant::now();
    ctx.phase.send_replace(Phase::Go(t0));
    let c = &ctx.counters;
    let duration = Duration::from_secs_f64(o.duration);
    let mut last = (Instant::now(), 0u64, 0u64);
    while t0.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(100).min(duration.saturating_sub(t0.elapsed())));
        if ctx.progress && last.0.elapsed() >= Duration::from_secs(1) {
            let (sent, del) = (Counters::get(&c.sent), Counters::get(&c.delivered));
            let dt = last.0.elapsed().as_secs_f64();
            status_line(&format!(
                "chat {:>4.0}s/{:.0}s  offered {:.0}/s  sent {:.0}/s  delivered {:.0}/s  in flight {}  dup {}  errors {}",
                t0.elapsed().as_secs_f64(),
                o.duration,
                o.rate,
                (sent - last.1) as f64 / dt,
                (del - last.2) as f64 / dt,
                sent.saturating_sub(del),
                Counters::get(&c.duplicated),
                Counters::get(&c.bounced) + Counters::get(&c.conn_errors),
            ));
            last = (Instant::now(), sent, del);
        }
    }
    let sending_wall = t0.elapsed().as_secs_f64();
    let sent_at_end = Counters::get(&c.sent);
    let delivered_at_end = Counters::get(&c.delivered);
    let drain_start = Instant::now();
    // Grace: late deliveries still count; whatever is missing then is lost.
    let grace_end = Instant::now() + Duration::from_secs_f64(o.grace);
    while Instant::now() < grace_end {
        // Senders a timer tick late may still owe their last messages.
        let sent = Counters::get(&c.sent);
        let settled = Counters::get(&c.delivered) + Counters::get(&c.bounced);
        if sent >= to_send && settled >= to_receive {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let drain_s = drain_start.elapsed().as_secs_f64();
    let wall = t0.elapsed().as_secs_f64();
    let server_after = sys::sample_all(&o.server_pid).ok().flatten();
    let self_after = sys::sample_self();
    ctx.sync(Stage::Measured)?;
    ctx.phase.send_replace(Phase::Stop);
    let mut hist = Latency::new();
    for w in workers {
        if let Ok(h) = w.join() {
            hist.add(&h);
        }
    }
    if ctx.progress {
        end_status();
    }

    let sent = Counters::get(&c.sent);
    let delivered = Counters::get(&c.delivered);
    let duplicated = Counters::get(&c.duplicated);
    let bounced = Counters::get(&c.bounced);
    // In a --processes run, what this process's users did not receive:
    // the parent sums and checks the whole.
    let lost = if ctx.shard.count == 1 {
        sent.saturating_sub(delivered)
    } else {
        to_receive.saturating_sub(delivered)
    };
    let server_process = match (server_before, server_after) {
        (Some(a), Some(b)) => Some(ProcFigures::between(a, b, wall)),
        _ => None,
    };
    let mut report = Report::empty(o);
    report.users = ctx.my_user_count();
    if ctx.opts.shard.is_some() {
        report.latency_buckets = Some(hist.buckets());
    }
    report.duration_s = sending_wall;
    report.chat = Some(ChatFigures {
        offered_per_s: o.rate,
        body_size: o.body_size.max(MARKER.len() + 2 + 16 + 12),
        sent,
        delivered,
        lost,
        duplicated,
        bounced,
        sent_per_s: sent_at_end as f64 / sending_wall,
        delivered_per_s: delivered as f64 / sending_wall,
        delivered_while_sending_per_s: delivered_at_end as f64 / sending_wall,
        drain_s,
        latency: hist.summary(),
        connection_errors: Counters::get(&c.conn_errors),
        server_cpu_s_per_1000_messages: server_process
            .filter(|_| delivered > 0)
            .map(|p| p.cpu_s * 1000.0 / delivered as f64),
    });
    report.server_process = server_process;
    report.load_process = ProcFigures::between(self_before, self_after, wall);
    let mut problems = Vec::new();
    if lost > 0 && ctx.shard.count == 1 {
        problems.push(format!("{lost} of {sent} messages LOST"));
    } else if lost > 0 {
        problems.push(format!(
            "{lost} of the {to_receive} messages to this process's users LOST"
        ));
    }
    if duplicated > 0 {
        problems.push(format!("{duplicated} messages DUPLICATED"));
    }
    if bounced > 0 {
        problems.push(format!("{bounced} messages bounced with an error"));
    }
    if let Some(e) = c.first_conn_error.lock().expect("not poisoned").as_ref() {
        problems.push(format!(
            "{} connections broke (first: {e})",
            Counters::get(&c.conn_errors)
        ));
    }
    if problems.is_empty() {
        Ok(report)
    } else {
        let message = problems.join("; ");
        report.ok = false;
        report.error = Some(message.clone());
        Err(Failure {
            message,
            report: Some(Box::new(report)),
        })
    }
}

/// One worker: logs in its share, then drives all its connections until
/// the controller says stop. Returns its latency histogram.
async fn worker(
    ctx: Arc<RunCtx>,
    w: usize,
    plan: Arc<Plan>,
    tx: std::sync::mpsc::Sender<Result<(), super::session::LoginError>>,
) -> Latency {
    let sessions = match ctx.login_all(ctx.share(w).collect()).await {
        Ok(s) => {
            let _ = tx.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = tx.send(Err(e));
            return Latency::new();
        }
    };
    let Some(t0) = ctx.wait_go().await else {
        return Latency::new();
    };
    let hist = Rc::new(RefCell::new(Latency::new()));
    let conns: FuturesUnordered<_> = sessions
        .into_iter()
        .map(|(i, s)| chat_conn(ctx.clone(), plan.clone(), hist.clone(), i, Conn::new(s), t0))
        .collect();
    super::drive(&ctx, conns, hist).await
}

/// One user's connection: sends on schedule, receives and checks messages.
/// Runs until the connection fails (or is dropped at the end of the run).
async fn chat_conn(
    ctx: Arc<RunCtx>,
    plan: Arc<Plan>,
    hist: Rc<RefCell<Latency>>,
    me: usize,
    mut conn: Conn,
    t0: Instant,
) -> std::io::Result<()> {
    let n = plan.users as u64;
    let mine = plan.messages_of(me);
    let phase = me as f64 / n as f64;
    let due_at = |k: u64| t0 + Duration::from_secs_f64((k as f64 + phase) / plan.per_user_rate);
    let mut k = 0u64;
    let mut timer: Pin<Box<tokio::time::Sleep>> = Box::pin(tokio::time::sleep_until(
        if mine > 0 { due_at(0) } else { t0 }.into(),
    ));
    let c = &ctx.counters;
    let mut itoa = [0u8; 16];
    std::future::poll_fn(|cx| {
        // Send whatever is due, in one write.
        while k < mine && timer.as_mut().poll(cx).is_ready() {
            let now = Instant::now();
            let sent_ns = ctx.ns_at(now);
            let before = k;
            while k < mine && due_at(k) <= now {
                let to = plan.recipient(me as u64, k);
                let out = &mut conn.out;
                out.extend_from_slice(&plan.prefixes[to as usize]);
                out.extend_from_slice(hex(k * n + me as u64, &mut itoa));
                out.push(b'~');
                out.extend_from_slice(hex(sent_ns, &mut itoa));
                out.push(b'~');
                out.extend_from_slice(&plan.pad);
                out.extend_from_slice(b"</body></message>");
                k += 1;
            }
            c.sent.fetch_add(k - before, Ordering::Relaxed);
            if k < mine {
                timer.as_mut().reset(due_at(k).into());
            }
        }
        if let Poll::Ready(Err(e)) = conn.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        let r = conn.poll_recv(cx, |stanza, out| {
            if stanza.starts_with(b"<message") {
                on_message(&ctx, &plan, &hist, stanza);
            } else {
                answer_iq(stanza, out);
            }
        });
        if let Poll::Ready(Err(e)) = r {
            return Poll::Ready(Err(e));
        }
        // Replies queued while receiving.
        if !conn.out.is_empty() {
            if let Poll::Ready(Err(e)) = conn.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Pending
    })
    .await
}

fn on_message(ctx: &RunCtx, plan: &Plan, hist: &RefCell<Latency>, stanza: &[u8]) {
    let c = &ctx.counters;
    let Some(at) = find(stanza, MARKER) else {
        return; // not ours (a server notice, a headline…)
    };
    if attr(head(stanza), "type") == Some(b"error") {
        c.bounced.fetch_add(1, Ordering::Relaxed);
        return;
    }
    let mut fields = stanza[at + MARKER.len()..].split(|&b| b == b'~');
    let (Some(seq), Some(sent_ns)) = (
        fields.next().and_then(parse_hex),
        fields.next().and_then(parse_hex),
    ) else {
        return;
    };
    match plan.first_delivery(seq) {
        Some(true) => {
            c.delivered.fetch_add(1, Ordering::Relaxed);
            let now = ctx.now_ns();
            hist.borrow_mut()
                .record_us(now.saturating_sub(sent_ns) / 1000);
        }
        Some(false) => {
            c.duplicated.fetch_add(1, Ordering::Relaxed);
        }
        None => {}
    }
}

/// The user message `k` of user `me` goes to, of `n` users spread over
/// `servers` servers: one of another server, or with `within` one of the
/// sender's own.
fn recipient(me: u64, k: u64, n: u64, servers: u64, within: bool) -> u64 {
    if within && servers > 1 {
        // The users of me's server are me mod servers + j·servers for
        // j < n / servers (which is at least 2); the next of them in turn.
        let per = n / servers;
        let j = (me / servers + 1 + k % (per - 1)) % per;
        return j * servers + me % servers;
    }
    let to = (me + 1 + k % (n - 1)) % n;
    if servers > 1 && to % servers == me % servers {
        // Users are on server i mod count and the count divides n, so the
        // next user is on another server.
        (to + 1) % n
    } else {
        to
    }
}

/// Lower-case hex of `v` without leading zeros, in `buf`.
pub(super) fn hex(mut v: u64, buf: &mut [u8; 16]) -> &[u8] {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut i = buf.len();
    loop {
        i -= 1;
        buf[i] = DIGITS[(v & 15) as usize];
        v >>= 4;
        if v == 0 {
            break;
        }
    }
    &buf[i..]
}

pub(super) fn parse_hex(s: &[u8]) -> Option<u64> {
    if s.is_empty() || s.len() > 16 {
        return None;
    }
    s.iter().try_fold(0u64, |acc, &b| {
        let d = (b as char).to_digit(16)?;
        Some(acc << 4 | u64::from(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trips() {
        let mut b = [0u8; 16];
        for v in [0, 1, 15, 16, 0xdead_beef, u64::MAX] {
            assert_eq!(parse_hex(hex(v, &mut b)), Some(v));
        }
        assert_eq!(parse_hex(b""), None);
        assert_eq!(parse_hex(b"xyz"), None);
    }

    #[test]
    fn duplicates_are_detected_by_sequence_number() {
        let plan = Plan {
            users: 2,
            base: 1,
            extra: 0,
            per_user_rate: 1.0,
            prefixes: vec![],
            pad: vec![],
            seen: (0..2).map(|_| AtomicU64::new(0)).collect(),
            servers: 1,
            within: false,
        };
        assert_eq!(plan.first_delivery(70), Some(true));
        assert_eq!(plan.first_delivery(70), Some(false));
        assert_eq!(plan.first_delivery(69), Some(true));
        assert_eq!(plan.first_delivery(128), None);
    }

    #[test]
    fn messages_go_to_another_server_or_with_within_to_the_senders_own() {
        for (n, servers) in [(12u64, 2u64), (12, 3), (4, 2), (7, 1)] {
            for me in 0..n {
                let mut reached = std::collections::BTreeSet::new();
                for k in 0..3 * n {
                    let cross = recipient(me, k, n, servers, false);
                    assert!(cross < n && cross != me);
                    if servers > 1 {
                        assert_ne!(cross % servers, me % servers, "n {n} me {me} k {k}");
                    }
                    let within = recipient(me, k, n, servers, true);
                    assert!(within < n && within != me, "n {n} me {me} k {k}");
                    assert_eq!(within % servers, me % servers, "n {n} me {me} k {k}");
                    reached.insert(within);
                }
                // Every other user of the sender's server gets messages.
                assert_eq!(reached.len() as u64, n / servers - 1, "n {n} me {me}");
            }
        }
    }
}
