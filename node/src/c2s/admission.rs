//! Who may open a connection: a cap on connections not yet bound to a
//! resource, in all and per source address (IPv6 by /64), so a flood of
//! idle or slow handshakes cannot use up the node's file descriptors or
//! memory; and each session's stanza rate.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use xmpp::error::StreamError;

/// The address a per-address limit counts by: IPv4 as is, IPv6 by /64
/// (one subscriber's network; an attacker has a whole /64 to rotate in).
fn source(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u128::from(v6) & !((1u128 << 64) - 1);
                IpAddr::V6(bits.into())
            }
        },
    }
}

/// In-band registrations (XEP-0077): one per source address (IPv6: /64)
/// per `auth.registration_interval_secs`, so one host cannot mint
/// accounts by the thousand.
pub struct Registrations {
    interval: std::time::Duration,
    last: Mutex<HashMap<IpAddr, Instant>>,
}

impl Registrations {
    pub fn new(interval: std::time::Duration) -> Registrations {
        Registrations {
            interval,
            last: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Instant>> {
        self.last.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Takes `ip`'s turn at `now`, or says how long until it has one.
    pub fn reserve(&self, ip: IpAddr, now: Instant) -> Result<(), std::time::Duration> {
        let mut last = self.lock();
        if last.len() > 10_000 {
            let interval = self.interval;
            last.retain(|_, at| now.duration_since(*at) < interval);
        }
        let key = source(ip);
        if let Some(at) = last.get(&key) {
            let since = now.duration_since(*at);
            if since < self.interval {
                return Err(self.interval - since);
            }
        }
        last.insert(key, now);
        Ok(())
    }

    /// The registration did not happen (name taken, bad password): the
    /// turn is given back.
    pub fn release(&self, ip: IpAddr) {
        self.lock().remove(&source(ip));
    }
}

#[derive(Default)]
struct Counts {
    total: usize,
    by_source: HashMap<IpAddr, usize>,
}

/// Connections still negotiating.
pub struct Admission {
    max_total: usize,
    max_per_source: usize,
    counts: Mutex<Counts>,
}

/// One admitted connection until it is bound (or ends): dropping it
/// releases its place.
pub struct Unbound {
    admission: Arc<Admission>,
    source: IpAddr,
}

impl Drop for Unbound {
    fn drop(&mut self) {
        let mut c = self.admission.lock();
        c.total = c.total.saturating_sub(1);
        if let Some(n) = c.by_source.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                c.by_source.remove(&self.source);
            }
        }
    }
}

impl Admission {
    pub fn new(max_total: usize, max_per_source: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max_total,
            max_per_source,
            counts: Mutex::default(),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Counts> {
        self.counts.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A place for a new connection from `ip`, or the stream error to
    /// refuse it with.
    pub fn admit(self: &Arc<Self>, ip: IpAddr) -> Result<Unbound, (StreamError, String)> {
        let source = source(ip);
        let mut c = self.lock();
        if c.total >= self.max_total {
            return Err((
                StreamError::ResourceConstraint,
                "too many connections are being set up; try again shortly".into(),
            ));
        }
        let n = c.by_source.entry(source).or_insert(0);
        if *n >= self.max_per_source {
            return Err((
                StreamError::PolicyViolation,
                format!(
                    "more than {} unauthenticated connections from your address",
                    self.max_per_source
                ),
            ));
        }
        *n += 1;
        c.total += 1;
        drop(c);
        Ok(Unbound {
            admission: self.clone(),
            source,
        })
    }

    pub fn unbound(&self) -> usize {
        self.lock().total
    }
}

/// A token bucket: `rate` per second, `burst` at once.
pub struct Rate {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Rate {
    pub fn new(rate: u32, burst: u32) -> Rate {
        Rate {
            rate: f64::from(rate),
            burst: f64::from(burst),
            tokens: f64::from(burst),
            last: Instant::now(),
        }
    }

    /// Takes one token at `now`; false when the bucket is empty.
    pub fn take(&mut self, now: Instant) -> bool {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn per_source_and_total_caps_release_on_drop() {
        let a = Admission::new(3, 2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let g1 = a.admit(ip).unwrap();
        let _g2 = a.admit(ip).unwrap();
        assert_eq!(
            a.admit(ip).err().map(|e| e.0),
            Some(StreamError::PolicyViolation)
        );
        let _g3 = a.admit("10.0.0.2".parse().unwrap()).unwrap();
        assert_eq!(
            a.admit("10.0.0.3".parse().unwrap()).err().map(|e| e.0),
            Some(StreamError::ResourceConstraint)
        );
        drop(g1);
        assert_eq!(a.unbound(), 2);
        let _g4 = a.admit(ip).unwrap();
    }

    #[test]
    fn one_registration_per_address_per_interval() {
        let r = Registrations::new(std::time::Duration::from_secs(60));
        let t = Instant::now();
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let same_net: IpAddr = "2001:db8::2".parse().unwrap();
        let other: IpAddr = "192.0.2.1".parse().unwrap();
        assert!(r.reserve(a, t).is_ok());
        let wait = r.reserve(same_net, t + std::time::Duration::from_secs(10));
        assert_eq!(wait, Err(std::time::Duration::from_secs(50)));
        assert!(r.reserve(other, t).is_ok());
        assert!(r.reserve(a, t + std::time::Duration::from_secs(60)).is_ok());
        r.release(a);
        assert!(r
            .reserve(same_net, t + std::time::Duration::from_secs(61))
            .is_ok());
    }

    #[test]
    fn ipv6_counts_by_slash_64() {
        let a = Admission::new(10, 1);
        let _g = a.admit("2001:db8:1:2::1".parse().unwrap()).unwrap();
        assert!(a.admit("2001:db8:1:2:ffff::9".parse().unwrap()).is_err());
        assert!(a.admit("2001:db8:1:3::1".parse().unwrap()).is_ok());
    }

    #[test]
    fn rate_allows_the_burst_then_the_rate() {
        let t0 = Instant::now();
        let mut r = Rate::new(10, 5);
        for _ in 0..5 {
            assert!(r.take(t0));
        }
        assert!(!r.take(t0));
        assert!(r.take(t0 + Duration::from_millis(150)));
        assert!(!r.take(t0 + Duration::from_millis(150)));
    }
}
