//! The `hold` scenario: log in `--users` connections, keep them idle
//! (answering pings) for `--duration` seconds, and read the server's
//! memory before the first login and after the last: the difference over
//! the number of connections is the memory one held TLS session costs.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt as _};

use super::conn::Conn;
use super::procs::Stage;
use super::report::{HoldFigures, ProcFigures, Report};
use super::session::LoginError;
use super::{await_logins, end_status, status_line, sys, Counters, Failure, Phase, RunCtx};

/// Time for the server to finish the work of the last logins (presence
/// broadcasts, buffers) before memory is read.
pub(super) const SETTLE: Duration = Duration::from_secs(2);

pub fn run(ctx: &Arc<RunCtx>) -> Result<Report, Failure> {
    let o = &ctx.opts;
    let err = |e: anyhow::Error| Failure {
        message: format!("{e:#}"),
        report: None,
    };
    let server_start = sys::sample_all(&o.server_pid).map_err(err)?;
    let (tx, rx) = std::sync::mpsc::channel();
    let workers = ctx.spawn_workers(move |ctx, w| worker(ctx, w, tx.clone()));
    await_logins(ctx, rx, "hold")?;
    if ctx.opts.shard.is_none() {
        std::thread::sleep(SETTLE);
    }
    // With --processes, the parent settles and reads the server.
    ctx.sync(Stage::Ready)?;
    let server_held = sys::sample_all(&o.server_pid).ok().flatten();
    let self_before = sys::sample_self();
    let t0 = Instant::now();
    ctx.phase.send_replace(Phase::Go(t0));
    let n = ctx.my_user_count() as u64;
    let c = &ctx.counters;
    let duration = Duration::from_secs_f64(o.duration);
    let mut last = Instant::now();
    while t0.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(100).min(duration.saturating_sub(t0.elapsed())));
        if ctx.progress && last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            status_line(&format!(
                "hold {:>4.0}s/{:.0}s  {} connections, {} broke",
                t0.elapsed().as_secs_f64(),
                o.duration,
                n,
                Counters::get(&c.conn_errors)
            ));
        }
    }
    let wall = t0.elapsed().as_secs_f64();
    let server_end = sys::sample_all(&o.server_pid).ok().flatten();
    let self_after = sys::sample_self();
    ctx.sync(Stage::Measured)?;
    ctx.phase.send_replace(Phase::Stop);
    for w in workers {
        let _ = w.join();
    }
    if ctx.progress {
        end_status();
    }
    let broke = Counters::get(&c.conn_errors);
    let mut report = Report::empty(o);
    report.users = n as usize;
    report.duration_s = wall;
    let before = server_start.map(|s| s.rss_kib);
    let after = server_held.map(|s| s.rss_kib);
    report.hold = Some(HoldFigures {
        connections: n,
        alive_at_end: n - broke.min(n),
        server_rss_before_kib: before,
        server_rss_after_kib: after,
        server_kib_per_connection: match (before, after) {
            (Some(a), Some(b)) => Some((b as f64 - a as f64) / n as f64),
            _ => None,
        },
    });
    report.server_process = match (server_held, server_end) {
        (Some(a), Some(b)) => Some(ProcFigures::between(a, b, wall)),
        _ => None,
    };
    report.load_process = ProcFigures::between(self_before, self_after, wall);
    if broke > 0 {
        let first = c.first_conn_error.lock().expect("not poisoned").clone();
        let message = format!(
            "{broke} of {n} held connections broke (first: {})",
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

async fn worker(ctx: Arc<RunCtx>, w: usize, tx: std::sync::mpsc::Sender<Result<(), LoginError>>) {
    let sessions = match ctx.login_all(ctx.share(w).collect()).await {
        Ok(s) => {
            let _ = tx.send(Ok(()));
            s
        }
        Err(e) => {
            let _ = tx.send(Err(e));
            return;
        }
    };
    let mut conns: FuturesUnordered<_> = sessions
        .into_iter()
        .map(|(_, s)| async move { Conn::new(s).idle().await })
        .collect();
    let stop = ctx.wait_stop();
    tokio::pin!(stop);
    loop {
        tokio::select! {
            Some(e) = conns.next() => ctx.counters.conn_error(&e),
            _ = &mut stop => break,
        }
    }
}
