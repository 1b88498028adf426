//! The `presence` scenario: status changes fanned out over rosters.
//!
//! Setup, over the protocol only so that it works on any server: user `i`
//! sends `subscribe` to users `i+1 ..= i+K/2` (mod N, K = `--roster-size`);
//! every user answers a `subscribe` with `subscribed`, and when the
//! request came from one of the K/2 users *before* it, also subscribes
//! back (RFC 6121 §3.1). Each pair ends with `subscription='both'`, so
//! every user has K contacts. Setup ends when no subscription traffic has
//! been seen for a while; a roster get per user then counts its `both`
//! items (reported as `min_roster`). Rerunning on the same accounts finds
//! the subscriptions already in place.
//!
//! Measurement: users change their status (`<presence><status>~xl~SEQ~SENT~`)
//! at their share of `--rate`; every contact online receives it. Each
//! received one gives a fan-out latency; the expected count is the sum,
//! over the changes sent, of the sender's contacts. Presence is not
//! counted as lost as strictly as messages (servers may coalesce it), so a
//! shortfall is reported but does not fail the run.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;

use super::chat::{hex, parse_hex, MARKER};
use super::conn::{answer_iq, attr, head, Conn};
use super::framer::find;
use super::hist::Latency;
use super::report::{PresenceFigures, ProcFigures, Report};
use super::session::LoginError;
use super::{await_logins, end_status, status_line, sys, Counters, Failure, Phase, RunCtx};

const SUBSCRIBE: u8 = 0;
const MEASURE: u8 = 1;

/// How long without subscription traffic ends the setup.
const QUIET: Duration = Duration::from_millis(1500);
const SETUP_LIMIT: Duration = Duration::from_secs(120);

struct Plan {
    users: usize,
    half: usize,
    stage: AtomicU8,
    /// Bumped by the controller: each connection then fetches its roster.
    verify_round: AtomicU64,
    measure_from: OnceLock<Instant>,
    /// Status changes per user during the measurement.
    per_user: u64,
    per_user_rate: f64,
    bare: Vec<String>,
    index: HashMap<String, usize>,
    /// ns (run clock) of the last subscription stanza seen.
    last_setup_activity: AtomicU64,
    rosters_reported: AtomicU64,
    min_roster: AtomicU64,
    expected: AtomicU64,
    received: AtomicU64,
}

pub fn run(ctx: &Arc<RunCtx>) -> Result<Report, Failure> {
    let o = &ctx.opts;
    let n = ctx.accounts.len();
    let k = o.roster_size.min(n.saturating_sub(1)) / 2 * 2;
    if k == 0 {
        return Err(Failure {
            message: "the presence scenario needs --roster-size >= 2 and more users than that"
                .into(),
            report: None,
        });
    }
    let bare: Vec<String> = ctx
        .accounts
        .iter()
        .map(|a| format!("{}@{}", a.user, ctx.target.domain).to_lowercase())
        .collect();
    let plan = Arc::new(Plan {
        users: n,
        half: k / 2,
        stage: AtomicU8::new(SUBSCRIBE),
        verify_round: AtomicU64::new(0),
        measure_from: OnceLock::new(),
        per_user: ((o.rate * o.duration) / n as f64).round() as u64,
        per_user_rate: o.rate / n as f64,
        index: bare
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, b)| (b, i))
            .collect(),
        bare,
        last_setup_activity: AtomicU64::new(0),
        rosters_reported: AtomicU64::new(0),
        min_roster: AtomicU64::new(u64::MAX),
        expected: AtomicU64::new(0),
        received: AtomicU64::new(0),
    });
    let (tx, rx) = std::sync::mpsc::channel();
    let workers = {
        let plan = plan.clone();
        ctx.spawn_workers(move |ctx, w| worker(ctx, w, plan.clone(), tx.clone()))
    };
    await_logins(ctx, rx, "presence")?;
    let setup = Instant::now();
    plan.last_setup_activity
        .store(ctx.now_ns(), Ordering::Relaxed);
    ctx.phase.send_replace(Phase::Go(setup));
    let mut last = Instant::now();
    loop {
        // Wait for the subscription traffic to calm down…
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let idle = ctx
                .now_ns()
                .saturating_sub(plan.last_setup_activity.load(Ordering::Relaxed));
            if Duration::from_nanos(idle) >= QUIET || setup.elapsed() > SETUP_LIMIT {
                break;
            }
            if ctx.progress && last.elapsed() >= Duration::from_secs(1) {
                last = Instant::now();
                status_line(&format!(
                    "presence: subscribing ({:.0}s)",
                    setup.elapsed().as_secs_f64()
                ));
            }
        }
        // …then count every user's `both` contacts; a slow server may
        // still be working through the subscriptions, so check again.
        plan.rosters_reported.store(0, Ordering::Relaxed);
        plan.min_roster.store(u64::MAX, Ordering::Relaxed);
        plan.verify_round.fetch_add(1, Ordering::Relaxed);
        let verify = Instant::now();
        while plan.rosters_reported.load(Ordering::Relaxed) < n as u64
            && verify.elapsed() < Duration::from_secs(30)
        {
            std::thread::sleep(Duration::from_millis(20));
        }
        let min = plan.min_roster.load(Ordering::Relaxed);
        if (min != u64::MAX && min >= k as u64) || setup.elapsed() > SETUP_LIMIT {
            break;
        }
        if ctx.progress {
            status_line(&format!(
                "presence: rosters incomplete (smallest {} of {k}), waiting ({:.0}s)",
                if min == u64::MAX { 0 } else { min },
                setup.elapsed().as_secs_f64()
            ));
        }
        plan.last_setup_activity
            .store(ctx.now_ns(), Ordering::Relaxed);
    }
    let min_roster = plan.min_roster.load(Ordering::Relaxed);
    let min_roster = if min_roster == u64::MAX {
        0
    } else {
        min_roster
    };

    let server_before = sys::sample_all(&o.server_pid).ok().flatten();
    let self_before = sys::sample_self();
    let t0 = Instant::now() + Duration::from_millis(50);
    let _ = plan.measure_from.set(t0);
    plan.stage.store(MEASURE, Ordering::Relaxed);
    let duration = Duration::from_secs_f64(o.duration);
    while t0.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(100));
        if ctx.progress && last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            status_line(&format!(
                "presence {:>4.0}s/{:.0}s  changes {}  received {}/{} expected",
                t0.elapsed().as_secs_f64(),
                o.duration,
                Counters::get(&ctx.counters.sent),
                plan.received.load(Ordering::Relaxed),
                plan.expected.load(Ordering::Relaxed),
            ));
        }
    }
    let sending_wall = t0.elapsed().as_secs_f64();
    let grace_end = Instant::now() + Duration::from_secs_f64(o.grace);
    let planned = plan.per_user * n as u64;
    while Instant::now() < grace_end
        && (Counters::get(&ctx.counters.sent) < planned
            || plan.received.load(Ordering::Relaxed) < plan.expected.load(Ordering::Relaxed))
    {
        std::thread::sleep(Duration::from_millis(20));
    }
    let wall = t0.elapsed().as_secs_f64();
    let server_after = sys::sample_all(&o.server_pid).ok().flatten();
    let self_after = sys::sample_self();
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
    let received = plan.received.load(Ordering::Relaxed);
    let server_process = match (server_before, server_after) {
        (Some(a), Some(b)) => Some(ProcFigures::between(a, b, wall)),
        _ => None,
    };
    let mut report = Report::empty(o);
    report.users = n;
    report.duration_s = sending_wall;
    report.presence = Some(PresenceFigures {
        offered_per_s: o.rate,
        roster_size: k,
        min_roster: min_roster as usize,
        status_changes_sent: Counters::get(&ctx.counters.sent),
        expected: plan.expected.load(Ordering::Relaxed),
        received,
        received_per_s: received as f64 / sending_wall,
        latency: hist.summary(),
        connection_errors: Counters::get(&ctx.counters.conn_errors),
        server_cpu_s_per_1000_stanzas: server_process
            .filter(|_| received > 0)
            .map(|p| p.cpu_s * 1000.0 / received as f64),
    });
    report.server_process = server_process;
    report.load_process = ProcFigures::between(self_before, self_after, wall);
    if let Some(e) = ctx
        .counters
        .first_conn_error
        .lock()
        .expect("not poisoned")
        .clone()
    {
        let message = format!(
            "{} connections broke (first: {e})",
            Counters::get(&ctx.counters.conn_errors)
        );
        report.ok = false;
        report.error = Some(message.clone());
        return Err(Failure {
            message,
            report: Some(Box::new(report)),
        });
    }
    Ok(report)
}

async fn worker(
    ctx: Arc<RunCtx>,
    w: usize,
    plan: Arc<Plan>,
    tx: std::sync::mpsc::Sender<Result<(), LoginError>>,
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
    if ctx.wait_go().await.is_none() {
        return Latency::new();
    }
    let hist = Rc::new(RefCell::new(Latency::new()));
    let conns: FuturesUnordered<_> = sessions
        .into_iter()
        .map(|(i, s)| presence_conn(ctx.clone(), plan.clone(), hist.clone(), i, Conn::new(s)))
        .collect();
    super::drive(&ctx, conns, hist).await
}

/// The user index of a `from` attribute (full or bare JID).
fn sender(plan: &Plan, from: &[u8]) -> Option<usize> {
    let from = std::str::from_utf8(from).ok()?;
    let bare = from.split('/').next()?.to_lowercase();
    plan.index.get(&bare).copied()
}

async fn presence_conn(
    ctx: Arc<RunCtx>,
    plan: Arc<Plan>,
    hist: Rc<RefCell<Latency>>,
    me: usize,
    mut conn: Conn,
) -> std::io::Result<()> {
    let n = plan.users;
    for d in 1..=plan.half {
        let to = &plan.bare[(me + d) % n];
        conn.out.extend_from_slice(
            format!(
                "<presence type='subscribe' to='{}'/>",
                xmpp::element::escape(to)
            )
            .as_bytes(),
        );
    }
    let mut stage = SUBSCRIBE;
    let mut my_round = 0;
    let roster = Cell::new(0u64);
    let mut k = 0u64;
    let mut timer: Pin<Box<tokio::time::Sleep>> =
        Box::pin(tokio::time::sleep(Duration::from_millis(50)));
    let mut itoa = [0u8; 16];
    let phase = me as f64 / n as f64;
    std::future::poll_fn(|cx| {
        while timer.as_mut().poll(cx).is_ready() {
            let now_stage = plan.stage.load(Ordering::Relaxed);
            let round = plan.verify_round.load(Ordering::Relaxed);
            if stage == SUBSCRIBE && round > my_round {
                my_round = round;
                conn.out.extend_from_slice(
                    b"<iq type='get' id='xl-roster2'><query xmlns='jabber:iq:roster'/></iq>",
                );
            }
            if now_stage == MEASURE && stage != MEASURE {
                stage = MEASURE;
            }
            if stage != MEASURE {
                timer
                    .as_mut()
                    .reset((Instant::now() + Duration::from_millis(50)).into());
                continue;
            }
            let t0 = *plan.measure_from.get().expect("set before MEASURE");
            let due_at =
                |k: u64| t0 + Duration::from_secs_f64((k as f64 + phase) / plan.per_user_rate);
            let now = Instant::now();
            let sent_ns = ctx.ns_at(now);
            let before = k;
            while k < plan.per_user && due_at(k) <= now {
                conn.out.extend_from_slice(b"<presence><status>~xl~");
                conn.out
                    .extend_from_slice(hex(k * n as u64 + me as u64, &mut itoa));
                conn.out.push(b'~');
                conn.out.extend_from_slice(hex(sent_ns, &mut itoa));
                conn.out.extend_from_slice(b"~</status></presence>");
                k += 1;
            }
            ctx.counters.sent.fetch_add(k - before, Ordering::Relaxed);
            plan.expected
                .fetch_add((k - before) * roster.get(), Ordering::Relaxed);
            if k >= plan.per_user {
                break;
            }
            timer.as_mut().reset(due_at(k).into());
        }
        if let Poll::Ready(Err(e)) = conn.poll_send(cx) {
            return Poll::Ready(Err(e));
        }
        let r = conn.poll_recv(cx, |stanza, out| {
            if stanza.starts_with(b"<presence") {
                on_presence(&ctx, &plan, &hist, me, stanza, out);
            } else if stanza.starts_with(b"<iq") {
                let h = head(stanza);
                if attr(h, "id") == Some(b"xl-roster2") {
                    let mut both = 0;
                    let mut rest = stanza;
                    while let Some(p) = find(rest, b"subscription=") {
                        if rest[p + 14..].starts_with(b"both") {
                            both += 1;
                        }
                        rest = &rest[p + 14..];
                    }
                    roster.set(both);
                    plan.min_roster.fetch_min(both, Ordering::Relaxed);
                    plan.rosters_reported.fetch_add(1, Ordering::Relaxed);
                } else {
                    answer_iq(stanza, out);
                }
            }
        });
        if let Poll::Ready(Err(e)) = r {
            return Poll::Ready(Err(e));
        }
        if !conn.out.is_empty() {
            if let Poll::Ready(Err(e)) = conn.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
        }
        Poll::Pending
    })
    .await
}

fn on_presence(
    ctx: &RunCtx,
    plan: &Plan,
    hist: &RefCell<Latency>,
    me: usize,
    stanza: &[u8],
    out: &mut Vec<u8>,
) {
    let h = head(stanza);
    match attr(h, "type") {
        Some(b"subscribe") => {
            plan.last_setup_activity
                .store(ctx.now_ns(), Ordering::Relaxed);
            let Some(from) = attr(h, "from") else { return };
            out.extend_from_slice(b"<presence type='subscribed' to='");
            out.extend_from_slice(from);
            out.extend_from_slice(b"'/>");
            // A request from one of the users before us: subscribe back,
            // so the pair ends with `both`.
            if let Some(x) = sender(plan, from) {
                let back = (me + plan.users - x) % plan.users;
                if (1..=plan.half).contains(&back) {
                    out.extend_from_slice(b"<presence type='subscribe' to='");
                    out.extend_from_slice(from);
                    out.extend_from_slice(b"'/>");
                }
            }
        }
        Some(b"subscribed") | Some(b"unsubscribed") | Some(b"unsubscribe") => {
            plan.last_setup_activity
                .store(ctx.now_ns(), Ordering::Relaxed);
        }
        _ => {
            let Some(at) = find(stanza, MARKER) else {
                return;
            };
            let mut f = stanza[at + MARKER.len()..].split(|&b| b == b'~');
            let (Some(seq), Some(sent_ns)) =
                (f.next().and_then(parse_hex), f.next().and_then(parse_hex))
            else {
                return;
            };
            if seq % plan.users as u64 == me as u64 {
                return; // our own presence, reflected to our resource (RFC 6121 §4.4.2)
            }
            plan.received.fetch_add(1, Ordering::Relaxed);
            hist.borrow_mut()
                .record_us(ctx.now_ns().saturating_sub(sent_ns) / 1000);
        }
    }
}
