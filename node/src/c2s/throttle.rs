//! Slows down password guessing: each failed authentication from an
//! address, and each against an account (from anywhere: a botnet guessing
//! one password has many addresses), doubles the delay before the next
//! failure is answered, up to a bound; an address or account that stops
//! failing is forgotten after a while. Delays only: an attacker can never
//! lock the account's owner out.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Auth;

/// What failures are counted by.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Key {
    Address(IpAddr),
    Account(String),
}

pub struct AuthThrottle {
    failures: Mutex<HashMap<Key, (u32, Instant)>>,
    base: Duration,
    max: Duration,
    memory: Duration,
}

impl AuthThrottle {
    pub fn new(auth: &Auth) -> AuthThrottle {
        AuthThrottle {
            failures: Mutex::new(HashMap::new()),
            base: Duration::from_millis(auth.failure_delay_ms),
            max: Duration::from_millis(auth.max_failure_delay_ms),
            memory: Duration::from_secs(auth.failure_memory_secs),
        }
    }

    /// Records a failure from `ip` against `account` (the name given, if
    /// any) at `now` and returns how long to wait before answering it: the
    /// longer of the two delays.
    pub fn fail_login(&self, ip: IpAddr, account: Option<&str>, now: Instant) -> Duration {
        let by_address = self.fail_key(Key::Address(ip), now);
        match account {
            Some(a) => by_address.max(self.fail_key(Key::Account(a.to_owned()), now)),
            None => by_address,
        }
    }

    /// Records a failure at `now` and returns how long to wait before answering it.
    pub fn fail(&self, ip: IpAddr, now: Instant) -> Duration {
        self.fail_key(Key::Address(ip), now)
    }

    fn fail_key(&self, key: Key, now: Instant) -> Duration {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // Forget addresses that stopped failing, so the map cannot grow without bound.
        if map.len() > 10_000 {
            let memory = self.memory;
            map.retain(|_, (_, at)| now.duration_since(*at) < memory);
        }
        let entry = map.entry(key).or_insert((0, now));
        if now.duration_since(entry.1) >= self.memory {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        let doublings = (entry.0 - 1).min(16);
        (self.base * 2u32.pow(doublings)).min(self.max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delay_doubles_per_failure_up_to_the_bound_and_is_per_address() {
        let t = AuthThrottle::new(&Auth {
            failure_delay_ms: 100,
            max_failure_delay_ms: 500,
            failure_memory_secs: 60,
            ..Auth::default()
        });
        let a: IpAddr = "10.0.0.1".parse().expect("ip");
        let b: IpAddr = "10.0.0.2".parse().expect("ip");
        let now = Instant::now();
        let ms = |d: Duration| d.as_millis();
        assert_eq!(ms(t.fail(a, now)), 100);
        assert_eq!(ms(t.fail(a, now)), 200);
        assert_eq!(ms(t.fail(a, now)), 400);
        assert_eq!(ms(t.fail(a, now)), 500);
        assert_eq!(ms(t.fail(b, now)), 100);
        assert_eq!(ms(t.fail(a, now + Duration::from_secs(61))), 100);
    }
}
