//! File descriptors: every connection costs one, and the process limit
//! (RLIMIT_NOFILE) decides how many clients a node can hold. At start the
//! soft limit is raised to the hard one (both logged); when accept fails
//! for want of descriptors the log says so plainly, once per interval with
//! a count, instead of a warning per attempt.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The soft limit before and after raising it, and the hard limit.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub soft_before: u64,
    pub soft: u64,
    pub hard: u64,
}

/// Raises RLIMIT_NOFILE's soft limit to its hard limit.
pub fn raise_limit() -> std::io::Result<Limits> {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local struct.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let soft_before = rl.rlim_cur;
    if rl.rlim_cur < rl.rlim_max {
        rl.rlim_cur = rl.rlim_max;
        // SAFETY: as above.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &rl) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(Limits {
        soft_before,
        soft: rl.rlim_cur,
        hard: rl.rlim_max,
    })
}

/// How many descriptors the process has open now (entries of /proc/self/fd).
pub fn open_count() -> Option<u64> {
    std::fs::read_dir("/proc/self/fd")
        .ok()
        .map(|d| d.count() as u64)
}

/// Whether an accept error means the process or system ran out of
/// descriptors (EMFILE, ENFILE).
pub fn is_exhaustion(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE | libc::ENFILE))
}

/// Accept failures of one listener, logged at most once per interval.
pub struct AcceptErrors {
    listener: &'static str,
    every: Duration,
    last: Mutex<Option<Instant>>,
    suppressed: AtomicU64,
}

impl AcceptErrors {
    pub fn new(listener: &'static str) -> AcceptErrors {
        AcceptErrors {
            listener,
            every: Duration::from_secs(10),
            last: Mutex::new(None),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Notes a failed accept; the caller then pauses before the next.
    pub fn failed(&self, e: &std::io::Error) {
        let now = Instant::now();
        let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_some_and(|t| now.duration_since(t) < self.every) {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        *last = Some(now);
        let also = self.suppressed.swap(0, Ordering::Relaxed);
        if is_exhaustion(e) {
            let limit = raise_limit().map(|l| l.soft).unwrap_or(0);
            tracing::error!(
                listener = self.listener,
                open = open_count().unwrap_or(0),
                limit,
                failed_since_last_report = also,
                "out of file descriptors: new connections wait until some close; raise the open-files limit (LimitNOFILE=, ulimit -n) or lower limits.max_unauthenticated and the sessions this node takes"
            );
        } else {
            tracing::warn!(listener = self.listener, error = %e, failed_since_last_report = also, "accept failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_soft_limit_ends_at_the_hard_limit() {
        let l = raise_limit().expect("getrlimit");
        assert_eq!(l.soft, l.hard);
        assert!(l.soft >= l.soft_before);
        assert!(open_count().is_some_and(|n| n > 0));
    }

    #[test]
    fn exhaustion_is_told_from_other_errors() {
        assert!(is_exhaustion(&std::io::Error::from_raw_os_error(
            libc::EMFILE
        )));
        assert!(is_exhaustion(&std::io::Error::from_raw_os_error(
            libc::ENFILE
        )));
        assert!(!is_exhaustion(&std::io::Error::from_raw_os_error(
            libc::ECONNABORTED
        )));
    }
}
