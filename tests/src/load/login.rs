//! The `login` scenario: for `--duration` seconds, start logins at
//! `--arrival-rate` per second (at most `--concurrency` in flight), each a
//! full connect + TLS + SASL + bind + roster get + initial presence, then
//! close the stream. Reports logins/s, login latency and errors by cause.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::stream::{FuturesUnordered, StreamExt as _};
use tokio::io::AsyncWriteExt as _;

use super::hist::Latency;
use super::procs::Stage;
use super::report::{LoginFigures, ProcFigures, Report};
use super::session::{Mech, Session};
use super::{end_status, status_line, sys, Counters, Failure, Phase, RunCtx};

#[derive(Default)]
struct WorkerOut {
    hist: Latency,
    attempted: u64,
    errors: BTreeMap<String, (u64, String)>,
}

pub fn run(ctx: &Arc<RunCtx>) -> Result<Report, Failure> {
    let o = &ctx.opts;
    if o.mechanism == Mech::Fast {
        prime_fast_tokens(ctx)?;
    }
    let workers = ctx.spawn_workers(worker);
    ctx.sync(Stage::Ready)?;
    let server_before = sys::sample_all(&o.server_pid).map_err(|e| Failure {
        message: format!("{e:#}"),
        report: None,
    })?;
    let self_before = sys::sample_self();
    let t0 = Instant::now();
    ctx.phase.send_replace(Phase::Go(t0));
    let duration = Duration::from_secs_f64(o.duration);
    let c = &ctx.counters;
    let mut last = Instant::now();
    while t0.elapsed() < duration {
        std::thread::sleep(Duration::from_millis(100).min(duration.saturating_sub(t0.elapsed())));
        if ctx.progress && last.elapsed() >= Duration::from_secs(1) {
            last = Instant::now();
            status_line(&format!(
                "login {:>4.0}s/{:.0}s  offered {:.0}/s  achieved {:.1}/s  failed {}",
                t0.elapsed().as_secs_f64(),
                o.duration,
                o.arrival_rate,
                Counters::get(&c.logged_in) as f64 / t0.elapsed().as_secs_f64(),
                Counters::get(&c.logins_failed)
            ));
        }
    }
    ctx.phase.send_replace(Phase::Stop);
    let wall = t0.elapsed().as_secs_f64();
    let server_after = sys::sample_all(&o.server_pid).ok().flatten();
    let self_after = sys::sample_self();
    ctx.sync(Stage::Measured)?;
    let mut total = WorkerOut::default();
    for w in workers {
        if let Ok(out) = w.join() {
            total.hist.add(&out.hist);
            total.attempted += out.attempted;
            for (cause, (n, example)) in out.errors {
                let e = total.errors.entry(cause).or_insert((0, example));
                e.0 += n;
            }
        }
    }
    if ctx.progress {
        end_status();
    }
    let succeeded = total.hist.count();
    let failed: u64 = total.errors.values().map(|e| e.0).sum();
    let server_process = match (server_before, server_after) {
        (Some(a), Some(b)) => Some(ProcFigures::between(a, b, wall)),
        _ => None,
    };
    let mut report = Report::empty(o);
    report.users = ctx.my_user_count();
    if ctx.opts.shard.is_some() {
        report.latency_buckets = Some(total.hist.buckets());
    }
    report.duration_s = wall;
    report.login = Some(LoginFigures {
        attempted: total.attempted,
        succeeded,
        failed,
        per_s: succeeded as f64 / wall,
        latency: total.hist.summary(),
        errors: total.errors.iter().map(|(k, v)| (k.clone(), v.0)).collect(),
        error_examples: total
            .errors
            .iter()
            .map(|(k, v)| (k.clone(), v.1.clone()))
            .collect(),
        server_cpu_ms_per_login: server_process
            .filter(|_| succeeded > 0)
            .map(|p| p.cpu_s * 1000.0 / succeeded as f64),
    });
    report.server_process = server_process;
    report.load_process = ProcFigures::between(self_before, self_after, wall);
    if succeeded == 0 {
        // Name the most frequent cause: a run where nothing logged in is
        // almost always a setup problem (server down, wrong accounts).
        let message = match total.errors.values().max_by_key(|e| e.0) {
            Some((_, example)) => format!("no login succeeded: {example}"),
            None => "no login was attempted (is --duration too short?)".into(),
        };
        report.ok = false;
        report.error = Some(message.clone());
        return Err(Failure {
            message,
            report: Some(Box::new(report)),
        });
    }
    Ok(report)
}

/// `--mechanism fast` measures FAST logins: every user first logs in once
/// (SCRAM, asking for a token), outside the measurement.
fn prime_fast_tokens(ctx: &Arc<RunCtx>) -> Result<(), Failure> {
    let failed = |message: String| Failure {
        message,
        report: None,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(format!("a tokio runtime: {e}")))?;
    let started = Instant::now();
    rt.block_on(async {
        let all: Vec<usize> = ctx.my_users().collect();
        let sessions = ctx
            .login_all(all)
            .await
            .map_err(|e| failed(format!("getting FAST tokens: {e}")))?;
        for (_, mut s) in sessions {
            let _ = s.io.write_all(b"</stream:stream>").await;
            let _ = s.io.shutdown().await;
        }
        Ok::<_, Failure>(())
    })?;
    ctx.progress_logins(started, "FAST tokens");
    let held = ctx.target.fast_tokens_held();
    if held < ctx.my_user_count() {
        return Err(failed(format!(
            "only {held} of {} users got a FAST token: is FAST on (auth.fast)?",
            ctx.my_user_count()
        )));
    }
    ctx.counters.logged_in.store(0, Ordering::Relaxed);
    if ctx.progress {
        end_status();
    }
    Ok(())
}

async fn worker(ctx: Arc<RunCtx>, w: usize) -> WorkerOut {
    let out = RefCell::new(WorkerOut::default());
    let Some(t0) = ctx.wait_go().await else {
        return out.into_inner();
    };
    let accounts: Vec<usize> = ctx.share(w).collect();
    if accounts.is_empty() {
        return out.into_inner();
    }
    let rate = ctx.opts.arrival_rate / ctx.workers_in_run() as f64;
    let max_inflight = (ctx.opts.concurrency / ctx.workers_in_run()).max(1);
    let end = t0 + Duration::from_secs_f64(ctx.opts.duration);
    let mut inflight = FuturesUnordered::new();
    let mut started = 0u64;
    let one = |i: usize| {
        let ctx = &ctx;
        let out = &out;
        async move {
            let begun = Instant::now();
            match Session::login(&ctx.target, i, &ctx.accounts[i]).await {
                Ok(mut s) => {
                    let us = begun.elapsed().as_micros() as u64;
                    ctx.counters.logged_in.fetch_add(1, Ordering::Relaxed);
                    out.borrow_mut().hist.record_us(us);
                    let _ = s.io.write_all(b"</stream:stream>").await;
                    let _ = s.io.shutdown().await;
                }
                Err(e) => {
                    ctx.counters.logins_failed.fetch_add(1, Ordering::Relaxed);
                    let mut o = out.borrow_mut();
                    let entry = o.errors.entry(e.cause()).or_insert((0, e.to_string()));
                    entry.0 += 1;
                }
            }
        }
    };
    let stop = ctx.wait_stop();
    tokio::pin!(stop);
    loop {
        let now = Instant::now();
        if now >= end {
            break;
        }
        let due = if rate > 0.0 {
            ((now - t0).as_secs_f64() * rate) as u64 + 1
        } else {
            u64::MAX
        };
        while started < due && inflight.len() < max_inflight {
            inflight.push(one(accounts[started as usize % accounts.len()]));
            started += 1;
        }
        tokio::select! {
            _ = inflight.next(), if !inflight.is_empty() => {}
            _ = tokio::time::sleep(Duration::from_millis(1)) => {}
            _ = &mut stop => break,
        }
    }
    // Logins still in flight at the end are not counted either way.
    drop(inflight);
    out.borrow_mut().attempted = started;
    out.into_inner()
}
