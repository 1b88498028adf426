//! Stream Management (XEP-0198): stanza acknowledgements, and resumption
//! of a session whose connection dropped, as mobile clients need.
//!
//! The session task keeps every stanza it wrote until the client
//! acknowledges it. When the connection drops, a resumable session stays
//! bound and keeps queueing for `limits.resume_timeout_secs`; a new
//! connection that authenticates as the same user and sends `<resume/>`
//! hands its stream to the waiting task, which retransmits what was not
//! acknowledged. A session that ends instead routes its unacknowledged
//! messages again (offline storage), so a dropped connection loses nothing.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot};
use xmpp::element::Element;
use xmpp::jid::{BareJid, FullJid};

use super::stream::Stream;

pub const NS: &str = "urn:xmpp:sm:3";

/// What a waiting (or still connected) session is handed. It travels
/// boxed ([`HandoffTx`]), so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Handoff {
    /// A new connection to this node resumes it: its stream and the
    /// client's count of stanzas it handled (`h`).
    Resume {
        stream: Box<Stream>,
        h: u32,
        /// Resumed inside SASL2 (XEP-0388): the `<success/>` to put
        /// `<resumed/>` in.
        sasl2: Option<Element>,
    },
    /// The client resumed on another node: hand the session's state over
    /// and end without a trace there (no unavailable presence, no unbind:
    /// the other node's binding replaces this one's).
    Migrate {
        h: u32,
        reply: oneshot::Sender<Option<Migrated>>,
    },
}

/// A session's state as it moves to another node (`Peer.TakeSession`).
#[derive(Debug, Clone, Default)]
pub struct Migrated {
    pub id: String,
    pub jid: String,
    pub handled: u32,
    /// The client's `h` at the move: what it acknowledged so far.
    pub acked: u32,
    pub unacked: Vec<String>,
    pub directed: Vec<String>,
    pub carbons: bool,
    pub interested: bool,
    pub available: bool,
    pub priority: i8,
    pub presence: Option<String>,
    pub inactive: bool,
}

/// Boxed: a channel allocates its slots up front, and a `Stream` is large.
pub type HandoffTx = mpsc::Sender<Box<Handoff>>;
pub type HandoffRx = mpsc::Receiver<Box<Handoff>>;

struct Entry {
    user: BareJid,
    tx: HandoffTx,
}

/// Resumable sessions by stream id, for `<resume previd='…'/>`.
#[derive(Default)]
pub struct Registry {
    sessions: Mutex<HashMap<String, Entry>>,
}

impl Registry {
    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn register(&self, id: String, user: BareJid, tx: HandoffTx) {
        self.map().insert(id, Entry { user, tx });
    }

    pub fn remove(&self, id: &str) {
        self.map().remove(id);
    }

    /// The session `id` of `user`, if it can still be resumed. Another
    /// user's id is as good as unknown (XEP-0198 §5).
    pub fn find(&self, id: &str, user: &BareJid) -> Option<HandoffTx> {
        let map = self.map();
        let e = map.get(id)?;
        (&e.user == user && !e.tx.is_closed()).then(|| e.tx.clone())
    }
}

/// The acknowledgement state of one session.
pub struct Sm {
    pub id: String,
    pub resumable: bool,
    /// Stanzas received from the client and handled (XEP-0198 §4, `h`).
    pub handled: u32,
    /// Stanzas the client has acknowledged.
    acked: u32,
    /// Written, not yet acknowledged, oldest first.
    pub unacked: VecDeque<Arc<str>>,
    /// Bytes of `unacked`.
    unacked_bytes: usize,
    /// An `<r/>` is out and its `<a/>` has not come back.
    pub request_pending: bool,
    /// Stanzas written so far, and acknowledged so far, counted without
    /// wrapping.
    sent: u64,
    acked_total: u64,
    /// Fired when the client has acknowledged up to that many stanzas in
    /// all: offline messages leave storage then.
    waiters: VecDeque<(u64, oneshot::Sender<()>)>,
    /// The unacknowledged stanzas that came from offline storage (by
    /// address): if the session ends, they are still stored, so they are
    /// not routed again.
    from_store: HashSet<usize>,
}

/// An `<a h='…'/>` acknowledging more than was sent (§4: `handled-count-too-high`).
#[derive(Debug)]
pub struct TooHigh;

impl Sm {
    /// The state of a session moved here from another node: the client
    /// acknowledged `acked` stanzas there; `unacked` follow.
    pub fn carried(id: String, handled: u32, acked: u32, unacked: Vec<Arc<str>>) -> Sm {
        let mut sm = Sm::new(id, true);
        sm.handled = handled;
        sm.acked = acked;
        for x in unacked {
            sm.push(x);
        }
        sm
    }

    pub fn new(id: String, resumable: bool) -> Sm {
        Sm {
            id,
            resumable,
            handled: 0,
            acked: 0,
            unacked: VecDeque::new(),
            unacked_bytes: 0,
            request_pending: false,
            sent: 0,
            acked_total: 0,
            waiters: VecDeque::new(),
            from_store: HashSet::new(),
        }
    }

    /// Keeps a written stanza until the client acknowledges it.
    pub fn push(&mut self, x: Arc<str>) {
        self.unacked_bytes += x.len();
        self.unacked.push_back(x);
        self.sent += 1;
    }

    /// Keeps stanzas from offline storage; `done` fires once all of them
    /// are acknowledged.
    pub fn push_stored(&mut self, stanzas: Vec<Arc<str>>, done: oneshot::Sender<()>) {
        for x in stanzas {
            self.from_store
                .insert(Arc::as_ptr(&x) as *const u8 as usize);
            self.push(x);
        }
        self.waiters.push_back((self.sent, done));
    }

    /// Whether this unacknowledged stanza came from offline storage.
    pub fn is_from_store(&self, x: &Arc<str>) -> bool {
        self.from_store
            .contains(&(Arc::as_ptr(x) as *const u8 as usize))
    }

    /// The client says it has handled `h` stanzas in all: forget those.
    pub fn ack(&mut self, h: u32) -> Result<(), TooHigh> {
        let newly = h.wrapping_sub(self.acked) as usize;
        if newly > self.unacked.len() {
            return Err(TooHigh);
        }
        for x in self.unacked.drain(..newly) {
            self.unacked_bytes = self.unacked_bytes.saturating_sub(x.len());
            if !self.from_store.is_empty() {
                self.from_store
                    .remove(&(Arc::as_ptr(&x) as *const u8 as usize));
            }
        }
        self.acked = h;
        self.acked_total += newly as u64;
        self.request_pending = false;
        while self
            .waiters
            .front()
            .is_some_and(|(upto, _)| *upto <= self.acked_total)
        {
            if let Some((_, done)) = self.waiters.pop_front() {
                let _ = done.send(());
            }
        }
        Ok(())
    }

    /// Whether the client leaves more unacknowledged than the budget
    /// allows (`limits.session_queue` stanzas, `limits.max_unacked_bytes`).
    pub fn over(&self, limits: &crate::config::Limits) -> bool {
        self.unacked.len() > limits.session_queue || self.unacked_bytes > limits.max_unacked_bytes
    }

    pub fn enabled(&self) -> Element {
        let mut e = Element::new("enabled", NS).attr("id", self.id.as_str());
        if self.resumable {
            e = e.attr("resume", "true");
        }
        e
    }

    pub fn answer(&self) -> String {
        format!("<a xmlns='{NS}' h='{}'/>", self.handled)
    }

    pub fn resumed(&self) -> Element {
        Element::new("resumed", NS)
            .attr("h", self.handled.to_string())
            .attr("previd", self.id.as_str())
    }
}

/// `<failed/>` with a stanza error condition.
pub fn failed(condition: &str) -> Element {
    Element::new("failed", NS).child(Element::new(condition, xmpp::stanza::ns::STANZAS))
}

/// The parsed `h` attribute.
pub fn h_of(e: &Element) -> Option<u32> {
    e.get_attr("h")?.parse().ok()
}

/// For logs.
pub fn describe(jid: &FullJid, sm: &Sm) -> String {
    format!("{jid} (stream {}, {} unacked)", sm.id, sm.unacked.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acks_drop_what_the_client_handled_and_refuse_too_high_counts() {
        let mut sm = Sm::new("s".into(), true);
        for i in 0..3 {
            sm.unacked.push_back(Arc::from(format!("<m{i}/>").as_str()));
        }
        sm.ack(2).expect("two of three");
        assert_eq!(sm.unacked.len(), 1);
        assert_eq!(&*sm.unacked[0], "<m2/>");
        sm.ack(2).expect("repeated ack is fine");
        assert!(sm.ack(5).is_err());
        sm.ack(3).expect("last");
        assert!(sm.unacked.is_empty());
    }

    #[test]
    fn stored_stanzas_are_released_only_when_acknowledged() {
        let mut sm = Sm::new("s".into(), true);
        sm.push(Arc::from("<live/>"));
        let stored: Vec<Arc<str>> = vec![Arc::from("<o1/>"), Arc::from("<o2/>")];
        let (done, mut wait) = oneshot::channel();
        sm.push_stored(stored, done);
        assert!(sm.is_from_store(&sm.unacked[1]));
        assert!(!sm.is_from_store(&sm.unacked[0]));
        sm.ack(2).expect("live and o1");
        assert!(wait.try_recv().is_err(), "o2 is not acknowledged yet");
        sm.ack(3).expect("all");
        assert!(wait.try_recv().is_ok());
        assert!(sm.from_store.is_empty());
    }

    #[test]
    fn counts_wrap_around() {
        let mut sm = Sm::new("s".into(), false);
        sm.acked = u32::MAX;
        sm.unacked.push_back(Arc::from("<m/>"));
        sm.ack(0).expect("wraps to zero");
        assert!(sm.unacked.is_empty());
    }
}
