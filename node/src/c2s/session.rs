//! The session task of a bound client: reads stanzas, stamps their true
//! `from`, hands them to the router; writes what the router sends it.
//! With stream management (XEP-0198, [`super::sm`]) it outlives a dropped
//! connection until the client resumes or the resumption time runs out.

use std::collections::HashSet;
use std::sync::Arc;

use rand::RngCore;
use tokio::sync::{mpsc, oneshot};
use xmpp::element::Element;
use xmpp::error::StreamError;
use xmpp::jid::{FullJid, Jid};
use xmpp::stanza::{ns, MessageType, StanzaKind};
use xmpp::xml::Event;

use super::negotiate::{bind_result, BindReply, Bound};
use super::sm::{self, Handoff, Sm};
use super::stream::{ConnError, Stream};
use crate::cluster::state_machine::{Command, SessionEntry};
use crate::modules::presence;
use crate::router;
use crate::sessions::{self, Outbound, SessionId};
use crate::Server;

/// Most queued entries written in one go (one TLS write, one syscall).
const WRITE_BATCH: usize = 64;

/// Unbinds the session however the task ends.
struct BoundGuard {
    server: Arc<Server>,
    jid: FullJid,
    id: SessionId,
    /// Moved to another node: its binding replaces ours in the table.
    moved: bool,
}

impl Drop for BoundGuard {
    fn drop(&mut self) {
        if self.server.sessions.unbind(&self.jid, self.id) {
            tracing::debug!(jid = %self.jid, "session ended");
        }
        // The replicated table forgets it too (a task: drop cannot wait).
        // (No runtime left means the process is exiting: NodeUp at the next
        // start removes the entry.)
        if self.moved {
            return;
        }
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            let (server, jid, id) = (self.server.clone(), self.jid.clone(), self.id);
            rt.spawn(async move { unbind_in_table(&server, &jid, id).await });
        }
    }
}

fn table_key(server: &Server, id: SessionId) -> (u64, u64, u64) {
    (server.cluster.id, server.cluster.incarnation, id)
}

async fn unbind_in_table(server: &Server, jid: &FullJid, id: SessionId) {
    let (node, incarnation, sid) = table_key(server, id);
    let cmd = Command::UnbindSession {
        jid: jid.to_string(),
        node,
        incarnation,
        sid,
    };
    if let Err(e) = server.cluster.write(cmd).await {
        // Left to NodeUp at this node's next start, or NodeDown.
        tracing::warn!(%jid, error = %e, "cannot remove an ended session from the cluster table");
    }
}

/// Records availability and priority in the replicated session table, so
/// other nodes route bare-JID messages by it (RFC 6121 §8.5.2.1.1).
pub async fn presence_in_table(
    server: &Server,
    jid: &FullJid,
    id: SessionId,
    available: bool,
    priority: i8,
) {
    let (node, incarnation, sid) = table_key(server, id);
    let cmd = Command::SessionPresence {
        jid: jid.to_string(),
        node,
        incarnation,
        sid,
        available,
        priority,
    };
    if let Err(e) = server.cluster.write(cmd).await {
        tracing::warn!(%jid, error = %e, "cannot record presence in the cluster table");
    }
}

/// Makes and boxes a future in a plain fn. Boxing inside the async fn
/// (`Box::pin(f(..)).await`) still leaves room for `f`'s future in the
/// caller's state (rustc keeps the temporary); made here, it does not. An
/// idle session then holds only the state it waits in.
fn boxed<'a, T, F: std::future::Future<Output = T> + Send + 'a>(
    make: impl FnOnce() -> F,
) -> std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + 'a>> {
    Box::pin(make())
}

/// The next resuming connection, or never when resumption is off.
async fn next_handoff(
    handoff: &mut Option<(sm::HandoffTx, sm::HandoffRx)>,
) -> Option<Box<Handoff>> {
    match handoff {
        Some((_, rx)) => rx.recv().await,
        None => std::future::pending().await,
    }
}

/// What a session task holds besides its stream.
struct Session {
    server: Arc<Server>,
    jid: FullJid,
    id: SessionId,
    rx: sessions::Receiver,
    /// Directed presence sent to non-subscribers (RFC 6121 §4.6).
    directed: HashSet<String>,
    sm: Option<Sm>,
    /// Where a resuming connection hands its stream over; made when the
    /// client enables resumption, so other sessions pay nothing for it.
    handoff: Option<(sm::HandoffTx, sm::HandoffRx)>,
    /// Client State Indication (XEP-0352): the client said it is not in
    /// use, so stanzas that can wait are held back (`held`) until
    /// something worth waking it for arrives.
    inactive: bool,
    held: Vec<Arc<str>>,
    /// Bytes of `held`.
    held_bytes: usize,
    /// When the client last sent anything, whether we asked it since, and
    /// the one timer that checks (re-armed once per idle period, not per
    /// read).
    last_rx: std::time::Instant,
    ping_at: Option<std::time::Instant>,
    idle: std::pin::Pin<Box<tokio::time::Sleep>>,
    /// Stanzas the client may still send now (`limits.stanzas_per_second`).
    rate: super::admission::Rate,
    /// Without stream management: offline messages in the batch being
    /// written, released from storage once the write has flushed.
    flushed: Vec<tokio::sync::oneshot::Sender<()>>,
    /// Handed over to another node (the client resumed there).
    moved: bool,
}

/// XEP-0352 namespace.
const CSI: &str = "urn:xmpp:csi:0";

/// Whether a stanza is worth waking an inactive client for: a message
/// with a body (chat states, receipts and presence can wait).
fn urgent(xml: &str) -> bool {
    xml.starts_with("<message") && xml.contains("<body") || xml.starts_with("<iq")
}

/// Counts a session task from its start until it has routed again what
/// it held (dropped last in [`run`]).
struct TaskCount(Arc<std::sync::atomic::AtomicUsize>);

impl TaskCount {
    fn new(server: &Server) -> TaskCount {
        server
            .session_tasks
            .fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        TaskCount(server.session_tasks.clone())
    }
}

impl Drop for TaskCount {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

/// Runs a bound session to its end, then closes its stream.
pub async fn run(s: Box<Stream>, bound: Bound) {
    let jid = bound.jid.clone();
    run_from(s, Box::new((jid, Start::Bound(bound.reply)))).await
}

/// Carries on a session moved here from another node (the client resumed
/// here): `h` is the client's count from its `<resume/>`.
pub async fn run_migrated(s: Box<Stream>, m: sm::Migrated, h: u32, sasl2: Option<Element>) {
    let Ok(jid) = FullJid::parse(&m.jid) else {
        return;
    };
    run_from(s, Box::new((jid, Start::Migrated(Box::new(m), h, sasl2)))).await
}

/// How a session task begins.
enum Start {
    Bound(BindReply),
    Migrated(Box<sm::Migrated>, u32, Option<Element>),
}

/// What a session task keeps from its start to its end.
struct Live {
    server: Arc<Server>,
    session: Session,
    guard: BoundGuard,
    /// The client's connection; `None` while hibernating (XEP-0198).
    stream: Option<Box<Stream>>,
    result: Result<(), ConnError>,
    _running: TaskCount,
}

/// A session's life in three steps. Starting and ending are boxed futures
/// that exist only while they run, so what the task holds while the
/// session waits is `Live` and the wait (an async fn is as large as its
/// largest state: STYLE.md habit 9, measured by `xmpp-load hold`).
async fn run_from(s: Box<Stream>, begin: Box<(FullJid, Start)>) {
    let Some(mut live) = boxed(move || start(s, *begin)).await else {
        return;
    };
    live.serve().await;
    boxed(move || live.end()).await
}

/// Binds the session in the cluster and answers the client; `None` when
/// the binding could not be committed (the client has been told).
async fn start(s: Box<Stream>, (jid, start): (FullJid, Start)) -> Option<Live> {
    let server = s.server.clone();
    let running = TaskCount::new(&server);
    let (tx, rx) = sessions::queue(
        server.config.limits.session_queue,
        server.config.limits.session_queue_bytes,
    );
    let (id, replaced) = server.sessions.bind(&jid, tx, s.peer, s.io.is_tls());
    let guard = BoundGuard {
        server: server.clone(),
        jid: jid.clone(),
        id,
        moved: false,
    };
    // The cluster decides resource conflicts (DESIGN.md): the bind is in
    // the replicated table before the client is told it is bound.
    let (node, incarnation, sid) = table_key(&server, id);
    let entry = SessionEntry {
        node,
        incarnation,
        sid,
        available: false,
        priority: 0,
    };
    let cmd = Command::BindSession {
        jid: jid.to_string(),
        entry,
    };
    if let Err(e) = boxed(|| server.cluster.write(cmd)).await {
        tracing::warn!(jid = %jid, error = %e, "cannot bind: no quorum");
        let mut s = s;
        let text = "the cluster cannot commit the binding now; try again shortly";
        let reply = match &start {
            Start::Bound(BindReply::Iq(iq)) => xmpp::stanza::error_reply(
                iq,
                xmpp::error::StanzaError::ResourceConstraint,
                Some(text),
            ),
            Start::Bound(BindReply::Sasl2 { .. }) | Start::Migrated(_, _, Some(_)) => Some(
                super::sasl2::failure(xmpp::sasl::SaslFailure::TemporaryAuthFailure, Some(text)),
            ),
            Start::Migrated(_, _, None) => Some(sm::failed("item-not-found")),
        };
        if let Some(reply) = reply {
            let _ = boxed(|| s.send(&reply)).await;
        }
        boxed(|| {
            super::finish(
                &mut s,
                Err(ConnError::stream(StreamError::Reset, "no quorum")),
            )
        })
        .await;
        return None;
    }
    if let Some(old) = replaced {
        // RFC 6120 §7.7.2.2: the new session wins; the old one gets <conflict/>.
        let _ = old.tx.send(Outbound::Close(
            StreamError::Conflict,
            Some("replaced by a new connection for this resource".into()),
        ));
    }
    let mut session = Session {
        server: server.clone(),
        jid: jid.clone(),
        id,
        rx,
        directed: HashSet::new(),
        sm: None,
        handoff: None,
        inactive: false,
        held: Vec::new(),
        held_bytes: 0,
        last_rx: std::time::Instant::now(),
        ping_at: None,
        idle: Box::pin(tokio::time::sleep(std::time::Duration::from_secs(
            server.config.limits.idle_ping_secs,
        ))),
        rate: super::admission::Rate::new(
            server.config.limits.stanzas_per_second,
            server.config.limits.stanza_burst,
        ),
        flushed: Vec::new(),
        moved: false,
    };
    let mut stream = Some(s);
    let result = match (stream.as_mut(), start) {
        (Some(s), Start::Migrated(m, h, sasl2)) => {
            let m = *m;
            session.carry_on(&m);
            if m.available {
                boxed(|| presence_in_table(&server, &jid, id, true, m.priority)).await;
            }
            tracing::info!(%jid, "session moved here from another node");
            boxed(|| session.resume(s, h, sasl2)).await
        }
        (Some(s), Start::Bound(BindReply::Iq(iq))) => {
            let reply = bind_result(&iq, &jid);
            boxed(|| s.send(&reply)).await
        }
        (Some(s), Start::Bound(BindReply::Sasl2 { success, bind })) => {
            // Bind2 (XEP-0386): what the client asked to enable is on
            // before it hears it is bound.
            let mut bound_el = Element::new("bound", super::sasl2::BIND2);
            if let Some(resume) = bind.sm {
                bound_el = bound_el.child(session.enable_sm(resume));
            }
            if bind.carbons {
                server.sessions.set_carbons(&session.jid, true);
            }
            session.inactive = bind.inactive;
            let mut out = String::new();
            success.child(bound_el).write_to(&mut out, ns::CLIENT);
            bound_features(session.sm.is_some()).write_to(&mut out, ns::CLIENT);
            boxed(|| s.write_raw(&out)).await
        }
        (None, _) => Ok(()),
    };
    tracing::debug!(jid = %jid, "session bound");
    Some(Live {
        server,
        session,
        guard,
        stream,
        result,
        _running: running,
    })
}

impl Live {
    /// Serves connections until the session ends, hibernating between
    /// them when the client can resume.
    async fn serve(&mut self) {
        let session = &mut self.session;
        while self.result.is_ok() {
            let Some(s) = self.stream.as_mut() else { break };
            self.result = session.serve(s).await;
            let lost = matches!(self.result, Err(ConnError::Lost | ConnError::Io(_)));
            if !lost || !session.sm.as_ref().is_some_and(|sm| sm.resumable) {
                break;
            }
            // XEP-0198 §5: the connection dropped; wait for the client to resume.
            self.stream = None;
            match boxed(|| session.hibernate()).await {
                Some(next) => {
                    self.stream = Some(next);
                    self.result = Ok(());
                }
                None => self.result = Err(ConnError::Lost),
            }
        }
    }

    /// Closes the stream, tells contacts the session is gone, and routes
    /// again what it still held.
    async fn end(mut self) {
        let server = self.server.clone();
        let session = &mut self.session;
        let id = session.id;
        let result = std::mem::replace(&mut self.result, Ok(()));
        if let Some(sm) = &session.sm {
            server.resumable.remove(&sm.id);
        }
        if let Some(mut s) = self.stream.take() {
            boxed(|| super::finish(&mut s, result)).await;
        }
        if session.moved {
            // Carried on by another node: nobody here is to learn anything.
            self.guard.moved = true;
            server.sessions.unbind(&session.jid, id);
            return;
        }
        // However the stream ended, contacts learn the session is gone (§4.5.2).
        boxed(|| presence::session_closed(&server, &session.jid, id, &mut session.directed)).await;
        server.sessions.unbind(&session.jid, id);
        boxed(|| session.requeue()).await;
    }
}

/// The features sent after a SASL2 success that bound the resource
/// (XEP-0388 §2.6.1: no restart, so they follow the success at once):
/// what can still be negotiated, without binding.
fn bound_features(sm_enabled: bool) -> Element {
    let mut f = Element::new("features", ns::STREAM)
        .child(Element::new("ver", crate::modules::ROSTERVER_FEATURE))
        .child(Element::new("sub", "urn:xmpp:features:pre-approval"))
        .child(Element::new("csi", CSI));
    if !sm_enabled {
        f = f.child(Element::new("sm", sm::NS));
    }
    f
}

/// What ended a session's wait.
enum Wake {
    /// The idle timer fired.
    Idle,
    /// The router queued something (`None`: the queue is closed).
    Queue(Option<Outbound>),
    /// A resuming connection, or another node asking for the session.
    Handoff(Option<Box<Handoff>>),
}

/// What the idle timer calls for.
enum Idle {
    Nothing,
    Ask(String),
    Dead,
}

impl Session {
    /// Serves one connection until it ends.
    ///
    /// The loop itself holds only what waiting needs; reading, writing and
    /// handling run in boxed futures that exist while they run. An idle
    /// session is then the size of this wait (measured per held connection
    /// by `xmpp-load hold`).
    async fn serve(&mut self, s: &mut Stream) -> Result<(), ConnError> {
        // A new (or resumed) connection starts with a clean slate.
        self.last_rx = std::time::Instant::now();
        self.ping_at = None;
        // A draining node closes every bound session through its queue
        // (`Sessions::close_all`, after the shutdown flag is set), so the
        // wait below needs no shutdown branch of its own: one registration
        // less per wakeup. A session bound after that sweep sees the flag.
        if *self.server.shutdown.borrow() {
            return Err(ConnError::Stream(StreamError::SystemShutdown, None));
        }
        loop {
            if s.parser.has_pending() {
                boxed(|| self.handle_buffered(s)).await?;
            }
            // Waiting costs no buffer memory: see `Stream::fill`.
            s.parser.release_memory();
            let wake = tokio::select! {
                r = s.fill() => {
                    r?;
                    self.last_rx = std::time::Instant::now();
                    continue;
                }
                () = &mut self.idle => Wake::Idle,
                msg = self.rx.recv() => Wake::Queue(msg),
                handoff = next_handoff(&mut self.handoff) => Wake::Handoff(handoff),
            };
            boxed(|| self.woken(s, wake)).await?;
        }
    }

    /// Handles every complete element the parser holds.
    async fn handle_buffered(&mut self, s: &mut Stream) -> Result<(), ConnError> {
        let server = self.server.clone();
        while let Some(ev) = s.parse_buffered()? {
            match ev {
                Event::Element(e) if e.ns == sm::NS => {
                    boxed(|| self.stream_management(s, e)).await?
                }
                Event::Element(e) if e.ns == CSI => {
                    // XEP-0352 §4: not a stanza, never answered.
                    self.inactive = e.name == "inactive";
                    if !self.inactive && !self.held.is_empty() {
                        let mut out = String::new();
                        self.flush_held(&mut out);
                        boxed(|| s.write_raw(&out)).await?;
                    }
                }
                Event::Element(e) => {
                    if !self.rate.take(std::time::Instant::now()) {
                        return Err(ConnError::stream(
                            StreamError::PolicyViolation,
                            format!(
                                "more than {} stanzas per second",
                                server.config.limits.stanzas_per_second
                            ),
                        ));
                    }
                    // Boxed: only a session handling a stanza holds the
                    // (large) state of routing it.
                    boxed(|| handle(&server, &self.jid, self.id, e, &mut self.directed)).await?;
                    if let Some(sm) = &mut self.sm {
                        sm.handled = sm.handled.wrapping_add(1);
                    }
                }
                Event::StreamClose => return Err(ConnError::Closed),
                Event::StreamOpen(_) => {
                    return Err(ConnError::stream(
                        StreamError::NotWellFormed,
                        "unexpected stream header",
                    ))
                }
            }
        }
        Ok(())
    }

    /// Acts on what ended a wait in [`Session::serve`].
    async fn woken(&mut self, s: &mut Stream, wake: Wake) -> Result<(), ConnError> {
        let server = self.server.clone();
        match wake {
            Wake::Idle => match self.idle_check() {
                Idle::Nothing => {}
                Idle::Ask(ping) => boxed(|| s.keepalive(&ping)).await?,
                Idle::Dead => {
                    tracing::info!(jid = %self.jid, "no answer to a ping: the link is dead");
                    return Err(ConnError::Lost);
                }
            },
            Wake::Queue(msg) => {
                let Some(msg) = msg else {
                    return Err(ConnError::Closed);
                };
                // Per batch, not per connection: idle sessions hold none.
                let mut out = String::new();
                let close = self.collect(msg, &mut out);
                if let Some(sm) = &mut self.sm {
                    // Ask for an acknowledgement once per round trip.
                    if !sm.request_pending && !sm.unacked.is_empty() {
                        out.push_str("<r xmlns='urn:xmpp:sm:3'/>");
                        sm.request_pending = true;
                    }
                }
                if !out.is_empty() {
                    // Boxed: the timer and the write exist only while writing.
                    boxed(|| s.write_raw(&out)).await?;
                }
                // Written and flushed: offline messages in it may leave
                // storage (under XEP-0198, only once acknowledged).
                for done in self.flushed.drain(..) {
                    let _ = done.send(());
                }
                // XEP-0198: a client that never acknowledges must not make
                // us keep everything we ever sent it.
                if self
                    .sm
                    .as_ref()
                    .is_some_and(|sm| sm.over(&server.config.limits))
                {
                    return Err(ConnError::stream(
                        StreamError::PolicyViolation,
                        "too many stanzas not acknowledged (XEP-0198)",
                    ));
                }
                if self.rx.overflowed() {
                    // The router could not queue for this client: it reads
                    // too slowly. What it missed went to offline storage.
                    return Err(ConnError::stream(
                        StreamError::PolicyViolation,
                        "too many stanzas waiting; the client reads too slowly",
                    ));
                }
                if let Some((e, t)) = close {
                    return Err(ConnError::Stream(e, t));
                }
            }
            Wake::Handoff(handoff) => {
                // The client resumed on a new connection while this one
                // still looked alive: carry on there.
                if let Some(h) = handoff {
                    let (mut next, h, sasl2) = match *h {
                        Handoff::Resume { stream, h, sasl2 } => (stream, h, sasl2),
                        Handoff::Migrate { h, reply } => {
                            if self.migrate(h, reply) {
                                return Err(ConnError::stream(
                                    StreamError::Conflict,
                                    "this session was resumed on another connection",
                                ));
                            }
                            return Ok(());
                        }
                    };
                    match boxed(|| self.resume(&mut next, h, sasl2)).await {
                        Ok(()) => {
                            std::mem::swap(s, &mut next);
                            drop(next);
                            self.last_rx = std::time::Instant::now();
                            self.ping_at = None;
                        }
                        // A bad resumption fails on its own stream; this
                        // one goes on.
                        Err(e) => boxed(|| super::finish(&mut next, Err(e))).await,
                    }
                }
            }
        }
        Ok(())
    }

    /// The idle timer fired: re-arms it, and says whether to ask the
    /// client if it is still there (silent for `idle_ping_secs`), or to
    /// give up on it (no word for `ping_timeout_secs` after asking).
    fn idle_check(&mut self) -> Idle {
        let limits = &self.server.config.limits;
        let after = std::time::Duration::from_secs(limits.idle_ping_secs);
        let wait = std::time::Duration::from_secs(limits.ping_timeout_secs);
        let now = std::time::Instant::now();
        if let Some(at) = self.ping_at {
            if self.last_rx >= at {
                self.ping_at = None;
            } else if now >= at + wait {
                return Idle::Dead;
            } else {
                self.idle.as_mut().reset((at + wait).into());
                return Idle::Nothing;
            }
        }
        let heard = self.last_rx + after;
        if heard > now {
            self.idle.as_mut().reset(heard.into());
            return Idle::Nothing;
        }
        self.ping_at = Some(now);
        self.idle.as_mut().reset((now + wait).into());
        Idle::Ask(match &self.sm {
            // XEP-0198 §4: any answer will do, and <a/> is cheap.
            Some(_) => "<r xmlns='urn:xmpp:sm:3'/>".to_owned(),
            None => format!(
                "<iq type='get' id='idle-{}' from='{}' to='{}'><ping xmlns='urn:xmpp:ping'/></iq>",
                self.id,
                xmpp::element::escape(self.jid.domain()),
                xmpp::element::escape(&self.jid.to_string())
            ),
        })
    }

    /// Appends queued stanzas (up to a batch) to `out`, keeping them for
    /// retransmission under stream management; returns a close request.
    fn collect(
        &mut self,
        first: Outbound,
        out: &mut String,
    ) -> Option<(StreamError, Option<String>)> {
        let mut next = Some(first);
        let mut n = 0;
        while let Some(m) = next.take() {
            match m {
                Outbound::Xml(x) => self.deliver(x, out),
                Outbound::Batch(v) => {
                    for x in v {
                        self.deliver(x, out);
                    }
                }
                Outbound::Stored(v, done) => {
                    // Never held back by CSI: storage waits for this write.
                    self.flush_held(out);
                    for x in &v {
                        self.server.metrics.stanza_out(x);
                        out.push_str(x);
                    }
                    match &mut self.sm {
                        Some(sm) => sm.push_stored(v, done),
                        None => self.flushed.push(done),
                    }
                }
                Outbound::Close(e, t) => return Some((e, t)),
            }
            n += 1;
            if n < WRITE_BATCH {
                next = self.rx.try_recv();
            }
        }
        None
    }

    /// Writes a stanza now, or holds it back for an inactive client.
    fn deliver(&mut self, x: Arc<str>, out: &mut String) {
        let limits = &self.server.config.limits;
        // Past the budget (`csi_max_held`, `csi_held_bytes`), what is
        // held goes anyway.
        if self.inactive
            && !urgent(&x)
            && self.held.len() < limits.csi_max_held
            && self.held_bytes + x.len() <= limits.csi_held_bytes
        {
            self.held_bytes += x.len();
            self.held.push(x);
            return;
        }
        // What was held goes first, so the order is kept.
        self.flush_held(out);
        self.emit(x, out);
    }

    fn flush_held(&mut self, out: &mut String) {
        self.held_bytes = 0;
        for h in std::mem::take(&mut self.held) {
            self.emit(h, out);
        }
    }

    fn emit(&mut self, x: Arc<str>, out: &mut String) {
        self.server.metrics.stanza_out(&x);
        out.push_str(&x);
        if let Some(sm) = &mut self.sm {
            sm.push(x);
        }
    }

    /// Turns stream management on (XEP-0198 §3), resumable if asked, and
    /// returns the `<enabled/>` to send, with the resumption time in `max`.
    fn enable_sm(&mut self, resumable: bool) -> Element {
        let mut raw = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut raw);
        let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
        let sm = Sm::new(id, resumable);
        let mut enabled = sm.enabled();
        if resumable {
            let (tx, rx) = mpsc::channel(1);
            self.server
                .resumable
                .register(sm.id.clone(), self.jid.bare().clone(), tx.clone());
            self.handoff = Some((tx, rx));
            enabled.set_attr(
                "max",
                self.server.config.limits.resume_timeout_secs.to_string(),
            );
        }
        self.sm = Some(sm);
        enabled
    }

    /// `<enable/>`, `<r/>`, `<a/>` (XEP-0198 §3, §4).
    async fn stream_management(&mut self, s: &mut Stream, e: Element) -> Result<(), ConnError> {
        match e.name.as_str() {
            "enable" => {
                if self.sm.is_some() {
                    return s.send(&sm::failed("unexpected-request")).await;
                }
                let resumable = matches!(e.get_attr("resume"), Some("true" | "1"));
                let enabled = self.enable_sm(resumable);
                s.send(&enabled).await
            }
            "r" => match &self.sm {
                Some(sm) => {
                    let a = sm.answer();
                    s.write_raw(&a).await
                }
                None => Err(ConnError::stream(
                    StreamError::UnsupportedStanzaType,
                    "stream management is not enabled",
                )),
            },
            "a" => {
                let (Some(sm), Some(h)) = (&mut self.sm, sm::h_of(&e)) else {
                    return Err(ConnError::stream(
                        StreamError::UnsupportedStanzaType,
                        "unexpected <a/>",
                    ));
                };
                sm.ack(h).map_err(|_| {
                    ConnError::stream(
                        StreamError::UndefinedCondition,
                        "handled-count-too-high: acknowledged more than was sent",
                    )
                })
            }
            _ => Err(ConnError::stream(
                StreamError::UnsupportedStanzaType,
                format!("<{}/> of stream management is not expected here", e.name),
            )),
        }
    }

    /// Answers another node's request for this session; whether it moved
    /// (then this task ends without a trace).
    fn migrate(&mut self, h: u32, reply: oneshot::Sender<Option<sm::Migrated>>) -> bool {
        let state = self.hand_over(h);
        self.moved = state.is_some();
        let _ = reply.send(state);
        self.moved
    }

    /// The session's state for another node the client resumed on; `None`
    /// when `h` acknowledges more than was sent (the client is confused:
    /// it binds anew). Afterwards this task owns nothing of the session.
    fn hand_over(&mut self, h: u32) -> Option<sm::Migrated> {
        let sm = self.sm.as_mut()?;
        sm.ack(h).ok()?;
        let mut unacked: Vec<String> = sm.unacked.iter().map(|x| x.to_string()).collect();
        unacked.extend(self.held.drain(..).map(|x| x.to_string()));
        self.held_bytes = 0;
        self.rx.close();
        while let Some(o) = self.rx.try_recv() {
            match o {
                Outbound::Xml(x) => unacked.push(x.to_string()),
                Outbound::Batch(v) => unacked.extend(v.iter().map(|x| x.to_string())),
                Outbound::Stored(..) | Outbound::Close(..) => {}
            }
        }
        let me = self
            .server
            .sessions
            .get(&self.jid)
            .filter(|r| r.id == self.id);
        let state = sm::Migrated {
            id: sm.id.clone(),
            jid: self.jid.to_string(),
            handled: sm.handled,
            acked: h,
            unacked,
            directed: self.directed.drain().collect(),
            carbons: me.as_ref().is_some_and(|r| r.carbons),
            interested: me.as_ref().is_some_and(|r| r.interested),
            available: me.as_ref().is_some_and(|r| r.available),
            priority: me.as_ref().map_or(0, |r| r.priority),
            presence: me.and_then(|r| r.presence.map(|p| p.to_string())),
            inactive: self.inactive,
        };
        self.server.resumable.remove(&sm.id);
        self.sm = None;
        tracing::info!(jid = %self.jid, "session handed over to the node the client resumed on");
        Some(state)
    }

    /// Takes on a session moved here: its acknowledgement state (resumable
    /// under the same id), presence, carbons and directed presence.
    fn carry_on(&mut self, m: &sm::Migrated) {
        let unacked = m.unacked.iter().map(|x| Arc::from(x.as_str())).collect();
        let sm = Sm::carried(m.id.clone(), m.handled, m.acked, unacked);
        let (tx, rx) = mpsc::channel(1);
        self.server
            .resumable
            .register(sm.id.clone(), self.jid.bare().clone(), tx.clone());
        self.handoff = Some((tx, rx));
        self.sm = Some(sm);
        self.directed = m.directed.iter().cloned().collect();
        self.inactive = m.inactive;
        let sessions = &self.server.sessions;
        if m.carbons {
            sessions.set_carbons(&self.jid, true);
        }
        if m.interested {
            sessions.set_interested(&self.jid);
        }
        if m.available {
            let presence = m.presence.as_deref().map(Arc::from);
            sessions.set_presence(&self.jid, self.id, true, m.priority, presence);
        }
    }

    /// Answers a `<resume/>` on a new stream: what the client handled is
    /// dropped, the rest is sent again (XEP-0198 §5).
    /// Inside SASL2 (`sasl2`: its `<success/>`), `<resumed/>` goes in the
    /// success, and the features after it.
    async fn resume(
        &mut self,
        s: &mut Stream,
        h: u32,
        sasl2: Option<Element>,
    ) -> Result<(), ConnError> {
        let Some(sm) = &mut self.sm else {
            return Err(ConnError::Closed);
        };
        if sm.ack(h).is_err() {
            return Err(ConnError::stream(
                StreamError::UndefinedCondition,
                "handled-count-too-high",
            ));
        }
        let mut out = String::new();
        match sasl2 {
            Some(success) => {
                success.child(sm.resumed()).write_to(&mut out, ns::CLIENT);
                bound_features(false).write_to(&mut out, ns::CLIENT);
            }
            None => sm.resumed().write_to(&mut out, ns::CLIENT),
        }
        for x in &sm.unacked {
            out.push_str(x);
        }
        tracing::info!(session = %sm::describe(&self.jid, sm), "session resumed");
        s.write_raw(&out).await
    }

    /// The connection is gone: keep the session, and what is sent to it,
    /// until the client resumes or the time runs out.
    async fn hibernate(&mut self) -> Option<Box<Stream>> {
        let server = self.server.clone();
        let deadline = tokio::time::Instant::now() + server.config.limits.resume_timeout();
        let mut shutdown = server.shutdown.subscribe();
        tracing::debug!(jid = %self.jid, "connection lost; waiting for resumption");
        // Messages written to the lost connection but never acknowledged
        // are as unread as those still to come (offline ones told already).
        if let Some(sm) = &self.sm {
            for x in sm.unacked.iter().filter(|x| !sm.is_from_store(x)) {
                held(&server, &self.jid, &Outbound::Xml(x.clone()));
            }
        }
        loop {
            tokio::select! {
                handoff = next_handoff(&mut self.handoff) => {
                    match *handoff? {
                        Handoff::Resume { mut stream, h, sasl2 } => {
                            return match self.resume(&mut stream, h, sasl2).await {
                                Ok(()) => Some(stream),
                                Err(e) => {
                                    boxed(|| super::finish(&mut stream, Err(e))).await;
                                    None
                                }
                            };
                        }
                        Handoff::Migrate { h, reply } => {
                            if self.migrate(h, reply) {
                                return None;
                            }
                        }
                    }
                }
                msg = self.rx.recv() => {
                    let msg = msg?;
                    held(&server, &self.jid, &msg);
                    let mut ignored = String::new();
                    if self.collect(msg, &mut ignored).is_some() {
                        return None;
                    }
                    let full = self
                        .sm
                        .as_ref()
                        .is_some_and(|sm| sm.over(&server.config.limits));
                    if full || self.rx.overflowed() {
                        return None;
                    }
                }
                _ = tokio::time::sleep_until(deadline) => return None,
                _ = shutdown.changed() => return None,
            }
        }
    }

    /// Messages that never reached the client, or were never acknowledged
    /// by it: route them again now that the session is gone, so they reach
    /// another resource or offline storage instead of being lost.
    async fn requeue(&mut self) {
        self.rx.close();
        // Offline messages not yet acknowledged are still in storage (they
        // leave it only once acknowledged): not routed again.
        let mut pending: Vec<Arc<str>> = self
            .sm
            .take()
            .map(|sm| {
                sm.unacked
                    .iter()
                    .filter(|x| !sm.is_from_store(x))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default();
        self.flushed.clear();
        // Held back for an inactive client, never written.
        pending.append(&mut self.held);
        self.held_bytes = 0;
        while let Some(o) = self.rx.try_recv() {
            match o {
                Outbound::Xml(x) => pending.push(x),
                Outbound::Batch(v) => pending.extend(v),
                Outbound::Stored(..) | Outbound::Close(..) => {}
            }
        }
        let own = self.jid.bare().to_string();
        for xml in pending {
            if !xml.starts_with("<message") {
                continue;
            }
            let Ok(m) = xmpp::xml::parse_element(&xml, ns::CLIENT) else {
                continue;
            };
            // Carbons copies (from our own bare JID) are not worth keeping.
            let chat = matches!(MessageType::of(&m), MessageType::Chat | MessageType::Normal);
            if chat && m.get_attr("from") != Some(own.as_str()) {
                router::reroute(&self.server, m).await;
            }
        }
    }
}

/// One element from the client on a bound stream.
async fn handle(
    server: &Server,
    me: &FullJid,
    id: SessionId,
    mut e: Element,
    directed: &mut HashSet<String>,
) -> Result<(), ConnError> {
    let Some(kind) = StanzaKind::of(&e) else {
        if e.is("error", ns::STREAM) {
            return Err(ConnError::Closed);
        }
        return Err(ConnError::stream(
            StreamError::UnsupportedStanzaType,
            format!("<{}/> in {} is not a stanza", e.name, e.ns),
        ));
    };
    server.metrics.stanza_in(kind);
    // RFC 6120 §8.1.2.1: the server stamps the full JID; a `from` naming
    // anyone else is refused (§4.9.3.9 invalid-from).
    if let Some(from) = e.get_attr("from") {
        let ok = match Jid::parse(from) {
            Ok(Jid::Full(f)) => &f == me,
            Ok(Jid::Bare(b)) => &b == me.bare(),
            Err(_) => false,
        };
        if !ok {
            return Err(ConnError::stream(
                StreamError::InvalidFrom,
                format!("you are {me}, not {from}"),
            ));
        }
    }
    e.set_attr("from", me.to_string());
    // Stanzas from the client are addressed in jabber:client; keep it so.
    e.ns = ns::CLIENT.to_owned();

    let span = stanza_span(kind, me, &e);
    tracing::Instrument::instrument(
        async move {
            if kind == StanzaKind::Presence {
                if e.get_attr("to").is_none() {
                    presence::broadcast(server, me, id, e, directed).await;
                } else {
                    presence::outbound(server, me, e, directed).await;
                }
                return;
            }
            router::route(server, e).await;
        },
        span,
    )
    .await;
    Ok(())
}

/// The root span of a client's stanza (README "Traces"): bare JIDs only,
/// so traces group by conversation rather than by device. None while no
/// traces are exported.
fn stanza_span(kind: StanzaKind, me: &FullJid, e: &Element) -> tracing::Span {
    if !crate::telemetry::tracing_on() {
        return tracing::Span::none();
    }
    let kind = match kind {
        StanzaKind::Message => "message",
        StanzaKind::Presence => "presence",
        StanzaKind::Iq => "iq",
    };
    let to = match e.get_attr("to").map(Jid::parse) {
        Some(Ok(j)) => j.bare().to_string(),
        Some(Err(_)) => "invalid".to_owned(),
        None => String::new(),
    };
    tracing::info_span!("stanza", kind, from = %me.bare(), to)
}

/// Tells the modules of each message a hibernated session takes in (push
/// notifications wake its client).
fn held(server: &Server, jid: &FullJid, msg: &Outbound) {
    let each = |x: &str| {
        if x.starts_with("<message") {
            for m in server.modules.iter() {
                m.on_message_held(server, jid, x);
            }
        }
    };
    match msg {
        Outbound::Xml(x) => each(x),
        Outbound::Batch(v) => v.iter().for_each(|x| each(x)),
        _ => {}
    }
}
