//! The `writes` scenario: every user logs in, then, for `--duration`
//! seconds, does roster sets back to back on its own connection (one in
//! flight per user), alternately adding and removing a contact. Each set is
//! one replicated write: its result comes only after the entry is committed
//! and applied. Reports acknowledged writes/s, the latency from send to
//! result, and the server's CPU per write (with `--server-pid`).

use std::sync::Arc;
use std::task::Poll;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt as _};

use super::conn::{answer_iq, attr, head, Conn};
use super::hist::Latency;
use super::report::{ProcFigures, Report, WriteFigures};
use super::session::LoginError;
use super::{await_logins, end_status, status_line, sys, Counters, Failure, Phase, RunCtx};

#[derive(Default)]
struct Out {
    hist: Latency,
    failed: u64,
}

pub fn run(ctx: &Arc<RunCtx>) -> Result<Report, Failure> {
    let o = &ctx.opts;
    let (tx, rx) = std::sync::mpsc::channel();
    let workers = ctx.spawn_workers(move |ctx, w| worker(ctx, w, tx.clone()));
    await_logins(ctx, rx, "writes")?;
    let server_before = sys::sample_all(&o.server_pid).ok().flatten();
    let self_before = sys::sample_self();
    let t0 = Instant::now();
    ctx.phase.send_replace(Phase::Go(t0));
    let duration = Duration::from_secs_f64(o.duration);
    let mut last = Instant::now();
    while t0.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(100).min(duration.saturating_sub(t0.elapsed())));
        if ctx.progress && last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            status_line(&format!(
                "writes {:>4.0}s/{:.0}s  connections broke: {}",
                t0.elapsed().as_secs_f64(),
                o.duration,
                Counters::get(&ctx.counters.conn_errors)
            ));
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let server_after = sys::sample_all(&o.server_pid).ok().flatten();
    let self_after = sys::sample_self();
    ctx.phase.send_replace(Phase::Stop);
    let mut total = Out::default();
    for w in workers {
        if let Ok(out) = w.join() {
            total.hist.add(&out.hist);
            total.failed += out.failed;
        }
    }
    if ctx.progress {
        end_status();
    }
    let acknowledged = total.hist.count();
    let server_process = match (server_before, server_after) {
        (Some(a), Some(b)) => Some(ProcFigures::between(a, b, wall)),
        _ => None,
    };
    let mut report = Report::empty(o);
    report.users = ctx.accounts.len();
    report.duration_s = wall;
    report.writes = Some(WriteFigures {
        acknowledged,
        failed: total.failed,
        per_s: acknowledged as f64 / wall,
        latency: total.hist.summary(),
        server_cpu_ms_per_write: server_process
            .filter(|_| acknowledged > 0)
            .map(|p| p.cpu_s * 1000.0 / acknowledged as f64),
    });
    report.server_process = server_process;
    report.load_process = ProcFigures::between(self_before, self_after, wall);
    let broke = Counters::get(&ctx.counters.conn_errors);
    if acknowledged == 0 || broke > 0 {
        let first = ctx
            .counters
            .first_conn_error
            .lock()
            .expect("not poisoned")
            .clone();
        let message = format!(
            "{acknowledged} writes acknowledged, {broke} connections broke (first: {})",
            first.unwrap_or_default()
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
    tx: std::sync::mpsc::Sender<Result<(), LoginError>>,
) -> Out {
    let sessions = match ctx.login_all(ctx.share(w).collect()).await {
        Ok(s) => {
            let _ = tx.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = tx.send(Err(e));
            return Out::default();
        }
    };
    let mut go = ctx.phase.subscribe();
    let _ = go
        .wait_for(|p| matches!(p, Phase::Go(_) | Phase::Stop))
        .await;
    let domain = ctx.opts.domain.clone();
    let mut conns: FuturesUnordered<_> = sessions
        .into_iter()
        .map(|(i, s)| writer(Conn::new(s), i, domain.clone()))
        .collect();
    let stop = ctx.wait_stop();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            Some(e) = conns.next() => ctx.counters.conn_error(&e),
            _ = &mut stop => break,
        }
    }
    // The writers run until stopped; what they measured is in WRITERS.
    drop(conns);
    WRITERS.with(|h| std::mem::take(&mut *h.borrow_mut()))
}

thread_local! {
    /// What the writers of this worker thread measured (one tokio runtime
    /// per worker thread, so no locking).
    static WRITERS: std::cell::RefCell<Out> = std::cell::RefCell::new(Out::default());
}

/// One user's closed loop of roster sets; runs until its future is dropped
/// (recording into [`WRITERS`] as it goes) or the connection fails.
async fn writer(mut c: Conn, i: usize, domain: String) -> std::io::Error {
    let mut seq = 0u64;
    loop {
        seq += 1;
        let id = format!("w{seq}");
        // Odd: add contact c<i>; even: remove it. The roster stays small.
        let item = if seq % 2 == 1 {
            format!("<item jid='c{i}@{domain}'/>")
        } else {
            format!("<item jid='c{i}@{domain}' subscription='remove'/>")
        };
        c.out.extend_from_slice(
            format!("<iq type='set' id='{id}'><query xmlns='jabber:iq:roster'>{item}</query></iq>")
                .as_bytes(),
        );
        let sent = Instant::now();
        let mut answer: Option<bool> = None;
        let r = std::future::poll_fn(|cx| {
            if let Poll::Ready(Err(e)) = c.poll_send(cx) {
                return Poll::Ready(Err(e));
            }
            let r = c.poll_recv(cx, |stanza, out| {
                let h = head(stanza);
                if stanza.starts_with(b"<iq") && attr(h, "id") == Some(id.as_bytes()) {
                    answer = Some(attr(h, "type") == Some(b"result"));
                } else {
                    // Roster pushes and pings.
                    answer_iq(stanza, out);
                }
            });
            if let Poll::Ready(Err(e)) = r {
                return Poll::Ready(Err(e));
            }
            if answer.is_some() {
                return Poll::Ready(Ok(()));
            }
            // Replies to pushes queued by poll_recv go out on the next poll.
            if !c.out.is_empty() {
                cx.waker().wake_by_ref();
            }
            Poll::Pending
        })
        .await;
        if let Err(e) = r {
            return e;
        }
        WRITERS.with(|h| {
            let mut h = h.borrow_mut();
            if answer == Some(true) {
                h.hist.record_us(sent.elapsed().as_micros() as u64);
            } else {
                h.failed += 1;
            }
        });
    }
}
