//! Names in `/etc/hosts` for a test, as Kubernetes' DNS gives a pod of a
//! StatefulSet its name (`xmpp-0.xmpp-peers.NS.svc.cluster.local`): added
//! when the test says (a name may resolve only after a while, as in a
//! cluster coming up), removed when the test says (a pod scaled away) or
//! when the guard is dropped. The node resolves through the system
//! resolver, which reads the file on every lookup. Tests run as root, and
//! use names of their own, so parallel tests never touch each other's
//! lines; changes are made under an exclusive lock on the file.

use std::io::{Read as _, Seek as _, Write as _};
use std::net::Ipv4Addr;
use std::os::fd::AsRawFd as _;

const PATH: &str = "/etc/hosts";

/// The lines this guard added; removed on drop.
pub struct Hosts {
    /// A marker on every line of ours, unique to this guard.
    tag: String,
}

impl Hosts {
    pub fn new() -> Hosts {
        let mut raw = [0u8; 6];
        rand::RngCore::fill_bytes(&mut rand::thread_rng(), &mut raw);
        let tag: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        Hosts {
            tag: format!("xmpp-test-{}-{tag}", std::process::id()),
        }
    }

    /// Makes `name` resolve to `ip`.
    pub fn add(&self, name: &str, ip: Ipv4Addr) -> anyhow::Result<()> {
        let line = format!("{ip} {name} # {}\n", self.tag);
        edit(|text| {
            format!(
                "{text}{}{line}",
                if text.ends_with('\n') || text.is_empty() {
                    ""
                } else {
                    "\n"
                }
            )
        })
    }

    /// Makes `name` stop resolving.
    pub fn remove(&self, name: &str) -> anyhow::Result<()> {
        let tag = self.tag.clone();
        let name = name.to_owned();
        edit(move |text| {
            text.lines()
                .filter(|l| {
                    !(l.ends_with(&format!("# {tag}"))
                        && l.split_whitespace().nth(1) == Some(&name))
                })
                .map(|l| format!("{l}\n"))
                .collect()
        })
    }
}

impl Default for Hosts {
    fn default() -> Self {
        Hosts::new()
    }
}

impl Drop for Hosts {
    fn drop(&mut self) {
        let tag = format!("# {}", self.tag);
        let _ = edit(|text| {
            text.lines()
                .filter(|l| !l.ends_with(&tag))
                .map(|l| format!("{l}\n"))
                .collect()
        });
    }
}

/// Rewrites the file in place under `flock(LOCK_EX)`.
fn edit(change: impl FnOnce(&str) -> String) -> anyhow::Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(PATH)?;
    // SAFETY: flock on a file descriptor we own; released when `f` closes.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX) } != 0 {
        anyhow::bail!("cannot lock {PATH}: {}", std::io::Error::last_os_error());
    }
    let mut text = String::new();
    f.read_to_string(&mut text)?;
    let new = change(&text);
    f.rewind()?;
    f.set_len(0)?;
    f.write_all(new.as_bytes())?;
    f.flush()?;
    Ok(())
}
