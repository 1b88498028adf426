//! This node's live sessions: full JID -> the sender into its session task,
//! with the presence state routing needs (available, priority).
//!
//! Binding a resource that is already online replaces the old session
//! (RFC 6120 §7.7.2.2, "override"): the caller gets the old sender back and
//! closes it with `<conflict/>`. Sessions are keyed by bare JID so that
//! bare-JID routing reads one small vector.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use tokio::sync::mpsc;
use xmpp::error::StreamError;
use xmpp::jid::{BareJid, FullJid};

pub type SessionId = u64;

/// What the router hands a session task.
#[derive(Debug)]
pub enum Outbound {
    /// A stanza, serialized once for every recipient (jabber:client default ns).
    Xml(Arc<str>),
    /// Several stanzas at once, in order: what a session's own task sends
    /// itself (offline messages, roster changes, presence at login), which
    /// must take one queue slot since that task cannot drain meanwhile.
    Batch(Vec<Arc<str>>),
    /// Messages from offline storage, in order; the sender fires once the
    /// client has them (written and flushed, or acknowledged under
    /// XEP-0198), and is dropped unfired if the session ends first: they
    /// stay stored until then (at-least-once).
    Stored(Vec<Arc<str>>, tokio::sync::oneshot::Sender<()>),
    /// Close the stream with this error.
    Close(StreamError, Option<String>),
}

impl Outbound {
    /// Bytes this holds, as counted against the queue's byte budget.
    fn bytes(&self) -> usize {
        match self {
            Outbound::Xml(x) => x.len(),
            Outbound::Batch(v) | Outbound::Stored(v, _) => v.iter().map(|x| x.len()).sum(),
            Outbound::Close(..) => 0,
        }
    }
}

/// The router's end of a session's queue. Bounded in stanzas and in
/// bytes: a client that stops reading fills it, and then [`Sender::send`]
/// fails (the router falls back to offline storage, so nothing is lost)
/// and the session is marked to be closed.
#[derive(Debug, Clone)]
pub struct Sender {
    tx: mpsc::Sender<Outbound>,
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    overflow: AtomicBool,
    /// Bytes queued and not yet taken by the session task.
    bytes: AtomicUsize,
    max_bytes: usize,
}

impl Sender {
    /// Entries waiting in this queue.
    pub fn queued(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn send(&self, o: Outbound) -> Result<(), Outbound> {
        let size = o.bytes();
        let before = self.shared.bytes.fetch_add(size, Ordering::Relaxed);
        // An empty queue takes anything, so one large batch is never stuck.
        if before > 0 && before + size > self.shared.max_bytes {
            self.shared.bytes.fetch_sub(size, Ordering::Relaxed);
            self.shared.overflow.store(true, Ordering::Relaxed);
            return Err(o);
        }
        match self.tx.try_send(o) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Full(o)) => {
                self.shared.bytes.fetch_sub(size, Ordering::Relaxed);
                self.shared.overflow.store(true, Ordering::Relaxed);
                Err(o)
            }
            Err(mpsc::error::TrySendError::Closed(o)) => {
                self.shared.bytes.fetch_sub(size, Ordering::Relaxed);
                Err(o)
            }
        }
    }
}

/// The session task's end of its queue.
pub struct Receiver {
    rx: mpsc::Receiver<Outbound>,
    shared: Arc<Shared>,
}

impl Receiver {
    pub async fn recv(&mut self) -> Option<Outbound> {
        let o = self.rx.recv().await;
        self.taken(o)
    }

    fn taken(&self, o: Option<Outbound>) -> Option<Outbound> {
        if let Some(o) = &o {
            self.shared.bytes.fetch_sub(o.bytes(), Ordering::Relaxed);
        }
        o
    }

    /// No more sends succeed; what is queued can still be taken.
    pub fn close(&mut self) {
        self.rx.close();
    }

    pub fn try_recv(&mut self) -> Option<Outbound> {
        let o = self.rx.try_recv().ok();
        self.taken(o)
    }

    /// Something could not be queued because the queue was full.
    pub fn overflowed(&self) -> bool {
        self.shared.overflow.load(Ordering::Relaxed)
    }
}

/// A session queue holding at most `capacity` stanzas and about
/// `max_bytes` of them.
pub fn queue(capacity: usize, max_bytes: usize) -> (Sender, Receiver) {
    let (tx, rx) = mpsc::channel(capacity.max(1));
    let shared = Arc::new(Shared {
        overflow: AtomicBool::new(false),
        bytes: AtomicUsize::new(0),
        max_bytes,
    });
    (
        Sender {
            tx,
            shared: shared.clone(),
        },
        Receiver { rx, shared },
    )
}

#[derive(Debug, Clone)]
pub struct Resource {
    pub resource: String,
    pub id: SessionId,
    pub tx: Sender,
    /// Sent initial presence and not yet unavailable (RFC 6121 §4.2).
    pub available: bool,
    pub priority: i8,
    /// The last presence broadcast by this session (from = its full JID,
    /// no `to`), sent to contacts who probe or newly subscribe.
    pub presence: Option<Arc<str>>,
    /// Requested the roster, so it gets roster pushes (RFC 6121 §2.1.6).
    pub interested: bool,
    /// Enabled Message Carbons (XEP-0280).
    pub carbons: bool,
    pub peer: SocketAddr,
    pub tls: bool,
}

#[derive(Default)]
pub struct Sessions {
    by_user: RwLock<HashMap<BareJid, Vec<Resource>>>,
    next_id: AtomicU64,
    count: AtomicUsize,
}

impl Sessions {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<BareJid, Vec<Resource>>> {
        self.by_user.read().unwrap_or_else(|p| p.into_inner())
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<BareJid, Vec<Resource>>> {
        self.by_user.write().unwrap_or_else(|p| p.into_inner())
    }

    /// Binds `full`; returns the new session id and the session it replaced.
    pub fn bind(
        &self,
        full: &FullJid,
        tx: Sender,
        peer: SocketAddr,
        tls: bool,
    ) -> (SessionId, Option<Resource>) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let entry = Resource {
            resource: full.resource().to_owned(),
            id,
            tx,
            available: false,
            priority: 0,
            presence: None,
            interested: false,
            carbons: false,
            peer,
            tls,
        };
        let mut map = self.write();
        let list = map.entry(full.bare().clone()).or_default();
        let old = match list.iter().position(|r| r.resource == full.resource()) {
            Some(i) => Some(std::mem::replace(&mut list[i], entry)),
            None => {
                list.push(entry);
                self.count.fetch_add(1, Ordering::Relaxed);
                None
            }
        };
        (id, old)
    }

    /// Removes the session if it is still the one bound to `full`.
    pub fn unbind(&self, full: &FullJid, id: SessionId) -> bool {
        let mut map = self.write();
        let Some(list) = map.get_mut(full.bare()) else {
            return false;
        };
        let Some(i) = list.iter().position(|r| r.id == id) else {
            return false;
        };
        list.swap_remove(i);
        if list.is_empty() {
            map.remove(full.bare());
        }
        self.count.fetch_sub(1, Ordering::Relaxed);
        true
    }

    /// Records the session's presence state; returns whether it was
    /// available before (to tell initial presence from an update).
    pub fn set_presence(
        &self,
        full: &FullJid,
        id: SessionId,
        available: bool,
        priority: i8,
        presence: Option<Arc<str>>,
    ) -> bool {
        let mut map = self.write();
        let Some(r) = map
            .get_mut(full.bare())
            .and_then(|l| l.iter_mut().find(|r| r.id == id))
        else {
            return false;
        };
        let was = r.available;
        r.available = available;
        r.priority = priority;
        r.presence = presence;
        was
    }

    /// Changes one session's flags in place.
    fn update(&self, full: &FullJid, f: impl FnOnce(&mut Resource)) {
        let mut map = self.write();
        if let Some(r) = map
            .get_mut(full.bare())
            .and_then(|l| l.iter_mut().find(|r| r.resource == full.resource()))
        {
            f(r);
        }
    }

    /// Marks the session as interested in roster pushes.
    pub fn set_interested(&self, full: &FullJid) {
        self.update(full, |r| r.interested = true);
    }

    /// Turns Message Carbons on or off for the session.
    pub fn set_carbons(&self, full: &FullJid, on: bool) {
        self.update(full, |r| r.carbons = on);
    }

    pub fn get(&self, full: &FullJid) -> Option<Resource> {
        self.read()
            .get(full.bare())?
            .iter()
            .find(|r| r.resource == full.resource())
            .cloned()
    }

    /// Runs `f` over a user's sessions without copying them (the hot path
    /// of routing). `f` runs under the table's read lock: no awaiting in it.
    pub fn with_resources<R>(&self, user: &BareJid, f: impl FnOnce(&[Resource]) -> R) -> R {
        let map = self.read();
        f(map.get(user).map_or(&[][..], Vec::as_slice))
    }

    /// All sessions of a user.
    pub fn resources(&self, user: &BareJid) -> Vec<Resource> {
        self.read().get(user).cloned().unwrap_or_default()
    }

    /// Entries waiting in every session queue of this node (a batch is
    /// one entry), read at scrape time.
    pub fn queued(&self) -> usize {
        self.read().values().flatten().map(|r| r.tx.queued()).sum()
    }

    pub fn count(&self) -> usize {
        self.count.load(Ordering::Relaxed)
    }

    /// Every session, optionally of one virtual host, as (full JID, resource).
    pub fn list(&self, vhost: &str) -> Vec<(String, Resource)> {
        let map = self.read();
        let mut out: Vec<(String, Resource)> = map
            .iter()
            .filter(|(u, _)| vhost.is_empty() || u.domain() == vhost)
            .flat_map(|(u, l)| {
                l.iter()
                    .map(move |r| (format!("{u}/{}", r.resource), r.clone()))
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Closes every session of `user` with `error`.
    pub fn close_user(&self, user: &BareJid, error: StreamError, text: &str) {
        for r in self.resources(user) {
            let _ = r.tx.send(Outbound::Close(error, Some(text.to_owned())));
        }
    }

    pub fn close_all(&self, error: StreamError) {
        for list in self.read().values() {
            for r in list {
                let _ = r.tx.send(Outbound::Close(error, None));
            }
        }
    }
}
