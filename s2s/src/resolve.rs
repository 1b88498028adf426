//! Where a remote domain's servers are: a static route from config, else
//! `_xmpps-server._tcp` (direct TLS, XEP-0368) then `_xmpp-server._tcp`
//! SRV records in RFC 2782 order, else the domain's own A/AAAA on 5269
//! (RFC 6120 §3.2.2). Lookups go through hickory with the system's
//! configuration, so `/etc/hosts` answers for names it lists.

use std::collections::HashMap;
use std::net::SocketAddr;

use hickory_resolver::TokioResolver;
use rand::Rng;

/// The default s2s port (RFC 6120 §14.7).
pub const DEFAULT_PORT: u16 = 5269;

/// One place to try.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    pub host: String,
    pub port: u16,
    /// TLS from the first byte (an `_xmpps-server` record).
    pub direct_tls: bool,
}

/// An SRV record as far as ordering goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Srv {
    pub priority: u16,
    pub weight: u16,
    pub target: String,
    pub port: u16,
}

/// RFC 2782 order: ascending priority; within a priority, a weighted
/// random draw without replacement (weight 0 records get a small chance,
/// placed first in the pool as the RFC describes). A single `.` target
/// means the service is decidedly not available: nothing to try.
pub fn order(mut records: Vec<Srv>, rng: &mut impl Rng) -> Vec<Srv> {
    if records.len() == 1 && records[0].target.trim_end_matches('.').is_empty() {
        return Vec::new();
    }
    records.sort_by_key(|r| r.priority);
    let mut out = Vec::with_capacity(records.len());
    let mut rest = records.as_slice();
    while let Some(first) = rest.first() {
        let end = rest
            .iter()
            .position(|r| r.priority != first.priority)
            .unwrap_or(rest.len());
        let (group, tail) = rest.split_at(end);
        let mut pool: Vec<Srv> = group.to_vec();
        // Zero weights first (RFC 2782: "arrange ... with all those with
        // weight 0 placed at the beginning").
        pool.sort_by_key(|r| r.weight != 0);
        while !pool.is_empty() {
            let total: u32 = pool.iter().map(|r| u32::from(r.weight)).sum();
            let pick = rng.gen_range(0..=total);
            let mut running = 0u32;
            let mut chosen = pool.len() - 1;
            for (i, r) in pool.iter().enumerate() {
                running += u32::from(r.weight);
                if running >= pick {
                    chosen = i;
                    break;
                }
            }
            out.push(pool.remove(chosen));
        }
        rest = tail;
    }
    out.into_iter()
        .filter(|r| !r.target.trim_end_matches('.').is_empty())
        .collect()
}

pub struct Resolver {
    routes: HashMap<String, Vec<String>>,
    dns: Option<TokioResolver>,
}

impl Resolver {
    pub fn new(routes: HashMap<String, Vec<String>>) -> Resolver {
        let dns = match TokioResolver::builder_tokio() {
            Ok(b) => Some(b.build()),
            Err(e) => {
                tracing::warn!(error = %e, "no system DNS configuration: only static s2s routes work");
                None
            }
        };
        Resolver { routes, dns }
    }

    /// The places to try for `domain`, best first.
    pub async fn targets(&self, domain: &str) -> Vec<Target> {
        if let Some(route) = self.routes.get(domain) {
            return route
                .iter()
                .filter_map(|hp| {
                    let (host, port) = hp.rsplit_once(':')?;
                    let host = host.trim_start_matches('[').trim_end_matches(']');
                    Some(Target {
                        host: host.to_owned(),
                        port: port.parse().ok()?,
                        direct_tls: false,
                    })
                })
                .collect();
        }
        let mut out = Vec::new();
        if let Some(dns) = &self.dns {
            for (service, direct_tls) in
                [("_xmpps-server._tcp", true), ("_xmpp-server._tcp", false)]
            {
                let name = format!("{service}.{domain}.");
                if let Ok(found) = dns.srv_lookup(name).await {
                    let records = found
                        .iter()
                        .map(|r| Srv {
                            priority: r.priority(),
                            weight: r.weight(),
                            target: r.target().to_utf8(),
                            port: r.port(),
                        })
                        .collect();
                    out.extend(
                        order(records, &mut rand::thread_rng())
                            .into_iter()
                            .map(|r| Target {
                                host: r.target.trim_end_matches('.').to_owned(),
                                port: r.port,
                                direct_tls,
                            }),
                    );
                }
            }
        }
        if out.is_empty() {
            out.push(Target {
                host: domain.to_owned(),
                port: DEFAULT_PORT,
                direct_tls: false,
            });
        }
        out
    }

    /// The addresses of one target's host.
    pub async fn addrs(&self, target: &Target) -> Vec<SocketAddr> {
        if let Ok(ip) = target.host.parse::<std::net::IpAddr>() {
            return vec![SocketAddr::new(ip, target.port)];
        }
        if let Some(dns) = &self.dns {
            if let Ok(ips) = dns.lookup_ip(format!("{}.", target.host)).await {
                return ips
                    .iter()
                    .map(|ip| SocketAddr::new(ip, target.port))
                    .collect();
            }
        }
        // Without a DNS configuration, the system's own lookup.
        match tokio::net::lookup_host((target.host.as_str(), target.port)).await {
            Ok(a) => a.collect(),
            Err(_) => Vec::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn srv(priority: u16, weight: u16, target: &str) -> Srv {
        Srv {
            priority,
            weight,
            target: target.into(),
            port: 5269,
        }
    }

    #[test]
    fn lower_priority_always_comes_first() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        for _ in 0..200 {
            let o = order(
                vec![
                    srv(20, 100, "c"),
                    srv(10, 1, "a"),
                    srv(10, 1, "b"),
                    srv(30, 0, "d"),
                ],
                &mut rng,
            );
            let prios: Vec<u16> = o.iter().map(|r| r.priority).collect();
            assert_eq!(prios, vec![10, 10, 20, 30]);
        }
    }

    #[test]
    fn weights_share_the_first_place_in_proportion() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(42);
        let draws = 20_000;
        let mut first_heavy = 0;
        for _ in 0..draws {
            let o = order(vec![srv(10, 10, "light"), srv(10, 90, "heavy")], &mut rng);
            assert_eq!(o.len(), 2);
            if o[0].target == "heavy" {
                first_heavy += 1;
            }
        }
        // Expected 90 % (give or take the zero-sum slot): well within ±3 %.
        let share = f64::from(first_heavy) / f64::from(draws);
        assert!((0.87..0.93).contains(&share), "heavy first {share}");
    }

    #[test]
    fn zero_weights_still_get_tried() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let o = order(vec![srv(5, 0, "z"), srv(5, 50, "w")], &mut rng);
        assert_eq!(o.len(), 2);
    }

    #[test]
    fn a_dot_target_means_no_service() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        assert!(order(vec![srv(0, 0, ".")], &mut rng).is_empty());
    }

    #[tokio::test]
    async fn static_routes_win_over_dns() {
        let mut routes = HashMap::new();
        routes.insert(
            "b.test".to_owned(),
            vec!["127.0.0.9:5999".to_owned(), "[::1]:5269".to_owned()],
        );
        let r = Resolver::new(routes);
        let t = r.targets("b.test").await;
        assert_eq!(t.len(), 2);
        assert_eq!((t[0].host.as_str(), t[0].port), ("127.0.0.9", 5999));
        assert_eq!((t[1].host.as_str(), t[1].port), ("::1", 5269));
        assert_eq!(
            r.addrs(&t[0]).await,
            vec!["127.0.0.9:5999".parse().unwrap()]
        );
    }
}
