//! Readings from `/proc`: the server's memory and CPU time when its PID is
//! given, and our own CPU time (to show when xmpp-load itself saturates).

use serde::Serialize;

/// Resident memory and CPU time used so far by one process.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ProcSample {
    pub rss_kib: u64,
    pub cpu_s: f64,
}

/// Reads `/proc/PID/status` (VmRSS) and `/proc/PID/stat` (utime + stime).
pub fn sample(pid: u32) -> anyhow::Result<ProcSample> {
    sample_path(&pid.to_string())
}

/// The sum over several processes (the nodes of a cluster); `None` for
/// none.
pub fn sample_all(pids: &[u32]) -> anyhow::Result<Option<ProcSample>> {
    let mut sum: Option<ProcSample> = None;
    for &pid in pids {
        let s = sample(pid)?;
        let t = sum.get_or_insert_with(ProcSample::default);
        t.rss_kib += s.rss_kib;
        t.cpu_s += s.cpu_s;
    }
    Ok(sum)
}

/// This process.
pub fn sample_self() -> ProcSample {
    sample_path("self").unwrap_or_default()
}

fn sample_path(pid: &str) -> anyhow::Result<ProcSample> {
    use anyhow::Context as _;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("cannot read /proc/{pid}/status: is the server PID right?"))?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .with_context(|| format!("cannot read /proc/{pid}/stat"))?;
    Ok(ProcSample {
        rss_kib: parse_rss_kib(&status).unwrap_or(0),
        cpu_s: parse_cpu_ticks(&stat).unwrap_or(0) as f64 / clock_ticks(),
    })
}

fn parse_rss_kib(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// utime + stime, fields 14 and 15 of `/proc/PID/stat` (proc(5)); the
/// command name (field 2) may contain spaces, so count after its `)`.
fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let mut f = rest.split_whitespace().skip(11);
    let utime: u64 = f.next()?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some(utime + stime)
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// An `Instant` and the same moment on `CLOCK_MONOTONIC` in ns: the clock
/// `Instant` reads on Linux, shared by every process of the machine, so
/// timestamps taken from it compare across processes.
pub fn monotonic_now() -> (std::time::Instant, u64) {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    let t = std::time::Instant::now();
    // SAFETY: clock_gettime writes into the valid local struct.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (t, ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Local ports the kernel hands out to outgoing connections from one
/// source address to one destination (`net.ipv4.ip_local_port_range`).
pub fn ephemeral_ports() -> usize {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| parse_port_range(&s))
        .unwrap_or(28_232)
}

fn parse_port_range(s: &str) -> Option<usize> {
    let mut f = s.split_whitespace().map(|x| x.parse::<usize>());
    let (lo, hi) = (f.next()?.ok()?, f.next()?.ok()?);
    (hi >= lo).then_some(hi - lo + 1)
}

/// Raises the open-files limit to its hard limit: each connection is a
/// descriptor, and the usual soft limit of 1024 is far below a real run.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    unsafe {
        let mut r = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) != 0 {
            return 1024;
        }
        if r.rlim_cur < r.rlim_max {
            let want = libc::rlimit {
                rlim_cur: r.rlim_max,
                rlim_max: r.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &want) == 0 {
                return want.rlim_cur;
            }
        }
        r.rlim_cur
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_fields() {
        assert_eq!(parse_rss_kib("Name:\tx\nVmRSS:\t  12345 kB\n"), Some(12345));
        let stat = "42 (xmpp node) S 1 42 42 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 4 0";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
    }

    #[test]
    fn parses_the_port_range() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some(28232));
        assert_eq!(parse_port_range("x"), None);
    }

    #[test]
    fn samples_this_process() {
        assert!(sample_self().rss_kib > 0);
    }
}
