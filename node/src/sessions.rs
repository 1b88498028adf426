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
///
/// A queue of our own rather than tokio's mpsc: that one allocates a block
/// of 32 slots and a cache-padded channel up front (1.7 KiB per session,
/// measured with heaptrack under `xmpp-load hold`), while an idle session's
/// queue is empty nearly always. This one holds a `VecDeque` that
/// allocates on the first stanza and is given back whenever it drains.
#[derive(Debug)]
pub struct Sender {
    shared: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    state: std::sync::Mutex<State>,
    overflow: AtomicBool,
    /// Bytes queued and not yet taken by the session task.
    bytes: AtomicUsize,
    max_bytes: usize,
    capacity: usize,
}

#[derive(Debug, Default)]
struct State {
    queue: std::collections::VecDeque<Outbound>,
    /// The receiver closed or dropped: sends fail.
    closed: bool,
    /// Live senders; with none left and the queue empty, `recv` ends.
    senders: usize,
    waker: Option<std::task::Waker>,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Clone for Sender {
    fn clone(&self) -> Sender {
        self.shared.lock().senders += 1;
        Sender {
            shared: self.shared.clone(),
        }
    }
}

impl Drop for Sender {
    fn drop(&mut self) {
        let waker = {
            let mut st = self.shared.lock();
            st.senders -= 1;
            if st.senders == 0 {
                st.waker.take()
            } else {
                None
            }
        };
        if let Some(w) = waker {
            w.wake();
        }
    }
}

impl Sender {
    /// Entries waiting in this queue.
    pub fn queued(&self) -> usize {
        self.shared.lock().queue.len()
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
        let waker = {
            let mut st = self.shared.lock();
            if st.closed {
                drop(st);
                self.shared.bytes.fetch_sub(size, Ordering::Relaxed);
                return Err(o);
            }
            if st.queue.len() >= self.shared.capacity {
                drop(st);
                self.shared.bytes.fetch_sub(size, Ordering::Relaxed);
                self.shared.overflow.store(true, Ordering::Relaxed);
                return Err(o);
            }
            st.queue.push_back(o);
            st.waker.take()
        };
        if let Some(w) = waker {
            w.wake();
        }
        Ok(())
    }
}

/// The session task's end of its queue.
pub struct Receiver {
    shared: Arc<Shared>,
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.close();
    }
}

impl Receiver {
    /// The next entry; `None` once every sender is gone (or the queue was
    /// closed) and nothing is left. Cancel-safe.
    pub async fn recv(&mut self) -> Option<Outbound> {
        std::future::poll_fn(|cx| {
            let mut st = self.shared.lock();
            if let Some(o) = Self::pop(&mut st) {
                drop(st);
                return std::task::Poll::Ready(Some(self.taken(o)));
            }
            if st.closed || st.senders == 0 {
                return std::task::Poll::Ready(None);
            }
            if !st.waker.as_ref().is_some_and(|w| w.will_wake(cx.waker())) {
                st.waker = Some(cx.waker().clone());
            }
            std::task::Poll::Pending
        })
        .await
    }

    fn pop(st: &mut State) -> Option<Outbound> {
        let o = st.queue.pop_front()?;
        // Drained: give the memory back (an idle session holds none; the
        // next stanza allocates again, one small allocation).
        if st.queue.is_empty() && st.queue.capacity() > 0 {
            st.queue = std::collections::VecDeque::new();
        }
        Some(o)
    }

    fn taken(&self, o: Outbound) -> Outbound {
        self.shared.bytes.fetch_sub(o.bytes(), Ordering::Relaxed);
        o
    }

    /// No more sends succeed; what is queued can still be taken.
    pub fn close(&mut self) {
        let mut st = self.shared.lock();
        st.closed = true;
        st.waker = None;
    }

    pub fn try_recv(&mut self) -> Option<Outbound> {
        let o = Self::pop(&mut self.shared.lock())?;
        Some(self.taken(o))
    }

    /// Something could not be queued because the queue was full.
    pub fn overflowed(&self) -> bool {
        self.shared.overflow.load(Ordering::Relaxed)
    }
}

/// A session queue holding at most `capacity` stanzas and about
/// `max_bytes` of them.
pub fn queue(capacity: usize, max_bytes: usize) -> (Sender, Receiver) {
    let shared = Arc::new(Shared {
        state: std::sync::Mutex::new(State {
            senders: 1,
            ..State::default()
        }),
        overflow: AtomicBool::new(false),
        bytes: AtomicUsize::new(0),
        max_bytes,
        capacity: capacity.max(1),
    });
    (
        Sender {
            shared: shared.clone(),
        },
        Receiver { shared },
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
                // Most users have one session: room for exactly one
                // (a plain push would make room for four).
                list.reserve_exact(1);
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

    /// The queue of `full`'s session: what delivering to it needs, without
    /// copying the session's record.
    pub fn sender(&self, full: &FullJid) -> Option<Sender> {
        self.read()
            .get(full.bare())?
            .iter()
            .find(|r| r.resource == full.resource())
            .map(|r| r.tx.clone())
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
        self.close_matching(user, None, error, text);
    }

    /// Closes the session of a full JID, or every session of a bare one,
    /// with `error`; returns the full JIDs closed.
    pub fn close_matching(
        &self,
        user: &BareJid,
        resource: Option<&str>,
        error: StreamError,
        text: &str,
    ) -> Vec<String> {
        let mut closed = Vec::new();
        for r in self.resources(user) {
            if resource.is_some_and(|want| want != r.resource) {
                continue;
            }
            // Refused only by a queue already closed or overflowing: that
            // session is ending anyway.
            let _ = r.tx.send(Outbound::Close(error, Some(text.to_owned())));
            closed.push(format!("{user}/{}", r.resource));
        }
        closed
    }

    pub fn close_all(&self, error: StreamError) {
        for list in self.read().values() {
            for r in list {
                let _ = r.tx.send(Outbound::Close(error, None));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn xml(s: &str) -> Outbound {
        Outbound::Xml(Arc::from(s))
    }

    fn text(o: Option<Outbound>) -> String {
        match o {
            Some(Outbound::Xml(x)) => x.to_string(),
            other => panic!("expected one stanza, got {other:?}"),
        }
    }

    #[test]
    fn the_queue_is_bounded_in_entries_and_bytes() {
        let (tx, mut rx) = queue(2, 10);
        tx.send(xml("0123456789abc"))
            .expect("an empty queue takes anything");
        assert!(tx.send(xml("x")).is_err(), "over the byte budget");
        assert!(rx.overflowed());
        assert_eq!(text(rx.try_recv()), "0123456789abc");
        tx.send(xml("a")).expect("room again");
        tx.send(xml("b")).expect("two entries fit");
        assert!(tx.send(xml("c")).is_err(), "over the entry bound");
        assert_eq!(tx.queued(), 2);
        assert_eq!(text(rx.try_recv()), "a");
        assert_eq!(text(rx.try_recv()), "b");
        assert!(rx.try_recv().is_none());
    }

    #[test]
    fn a_closed_queue_refuses_sends_and_still_gives_what_it_holds() {
        let (tx, mut rx) = queue(8, 1 << 20);
        tx.send(xml("kept")).expect("open");
        rx.close();
        match tx.send(xml("late")) {
            Err(Outbound::Xml(x)) => assert_eq!(&*x, "late", "the stanza comes back"),
            other => panic!("a closed queue must refuse, got {other:?}"),
        }
        assert!(!rx.overflowed(), "closed is not full");
        assert_eq!(text(rx.try_recv()), "kept");
        let (tx, rx) = queue(8, 1 << 20);
        drop(rx);
        assert!(
            tx.send(xml("nobody")).is_err(),
            "a dropped receiver refuses"
        );
    }

    #[tokio::test]
    async fn recv_wakes_on_send_and_ends_when_every_sender_is_gone() {
        let (tx, mut rx) = queue(64, 1 << 20);
        let tx2 = tx.clone();
        let sender = tokio::spawn(async move {
            for i in 0..40 {
                tx2.send(xml(&i.to_string())).expect("room");
                tokio::task::yield_now().await;
            }
        });
        for i in 0..40 {
            assert_eq!(text(rx.recv().await), i.to_string(), "in order");
        }
        sender.await.expect("sender task");
        drop(tx);
        assert!(rx.recv().await.is_none(), "no senders left");
    }

    #[test]
    fn a_drained_queue_gives_its_memory_back() {
        let (tx, mut rx) = queue(1000, 1 << 20);
        for i in 0..100 {
            tx.send(xml(&i.to_string())).expect("room");
        }
        while rx.try_recv().is_some() {}
        assert_eq!(rx.shared.lock().queue.capacity(), 0);
    }
}
