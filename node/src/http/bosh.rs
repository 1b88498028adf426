//! BOSH (XEP-0124, with XEP-0206 for XMPP) at `/http-bind`.
//!
//! A BOSH session is a c2s session whose transport is a [`Link`]: what
//! the client posts goes, in `rid` order, into the session core's parser;
//! what the core writes waits in the session's output until a held
//! request takes it. The rules kept here:
//! - requests are processed in `rid` order; one that arrives ahead of a
//!   gap waits for it (§14.2), one beyond the window (`requests`) ends
//!   the session with `item-not-found`;
//! - a repeated `rid` gets the answer it got before (§14.3), or
//!   `item-not-found` once that answer is gone;
//! - at most `hold` requests are held; a newer one releases the oldest;
//!   a held request is answered empty after `wait`;
//! - a session without a request for `inactivity` seconds is over: its
//!   c2s session sees the connection lost (and hibernates if it can be
//!   resumed, XEP-0198, or goes offline);
//! - `sid`s are 128 random bits.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use rand::RngCore;
use tokio::sync::{mpsc, Notify};
use tokio::time::Instant;
use xmpp::element::{Element, Node};
use xmpp::error::StreamError;
use xmpp::stanza::ns;
use xmpp::xml::StreamParser;

use super::{ConnInfo, Http};
use crate::c2s::framing::{self, Frame, Header};
use crate::c2s::io::Io;
use crate::c2s::stream::ConnError;

pub const NS: &str = "http://jabber.org/protocol/httpbind";
/// XEP-0206's attributes (`xmpp:version`, `xmpp:restart`, …).
const XBOSH: &str = "urn:xmpp:xbosh";
/// Inbound bodies waiting for the session core, at most.
const INBOUND_QUEUE: usize = 16;
/// Largest `rid` a client may use (XEP-0124 §14.1: 2^53 - 1).
const MAX_RID: u64 = (1 << 53) - 1;

/// The live BOSH sessions of this node, by `sid`.
pub struct Registry {
    sessions: Mutex<HashMap<String, Arc<Session>>>,
}

impl Registry {
    pub fn new() -> Arc<Registry> {
        Arc::new(Registry {
            sessions: Mutex::new(HashMap::new()),
        })
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<Session>>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self, sid: &str) -> Option<Arc<Session>> {
        self.lock().get(sid).cloned()
    }

    fn remove(&self, sid: &str) {
        self.lock().remove(sid);
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// How the stream ended, for the terminating `<body/>`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum End {
    /// The stream closed (by either side), or ended with a stream error
    /// whose `<stream:error/>` goes in the body (`remote-stream-error`).
    Closed { stream_error: bool },
    /// A binding error of XEP-0124 §17.2 (`item-not-found`, …).
    Binding(&'static str),
}

struct Session {
    sid: String,
    wait: Duration,
    hold: usize,
    requests: u64,
    inactivity: Duration,
    /// Advertised shortest polling interval (`polling`).
    polling: u64,
    max_pending: usize,
    /// Into the session core; taken (closed) when the session times out.
    inbound: Mutex<Option<mpsc::Sender<String>>>,
    state: Mutex<SessionState>,
    /// Output arrived, a held request was released, or the session ended.
    changed: Notify,
    /// Output was taken by a response: a writer waiting for room may go on.
    drained: Notify,
}

struct SessionState {
    /// The next `rid` to process.
    next_rid: u64,
    /// Bodies that came ahead of a gap, by `rid`.
    early: BTreeMap<u64, Element>,
    /// Elements waiting for a response, each with its declarations.
    pending: String,
    /// A `<stream:error/>` is among them.
    stream_error: bool,
    ended: Option<End>,
    /// Our stream header, for the session creation response.
    header: Option<Header>,
    /// The creation request, answered with the session's attributes.
    creation_rid: u64,
    /// XEP-0124 §9: the client asked for acknowledgements.
    acks: bool,
    /// Answers to the latest requests, for a client that repeats one.
    answered: VecDeque<(u64, String)>,
    /// Requests held open, oldest first.
    held: VecDeque<u64>,
    /// Held requests told to answer now: a newer request took their place.
    released: Vec<u64>,
    /// When the last request arrived or was answered with none held.
    last_activity: Instant,
}

impl Session {
    fn lock(&self) -> MutexGuard<'_, SessionState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn end(&self, how: End) {
        let mut st = self.lock();
        if st.ended.is_none() {
            st.ended = Some(how);
        }
        drop(st);
        self.changed.notify_waiters();
    }

    /// Hands a body's content to the session core.
    fn feed(&self, text: String) -> Result<(), End> {
        let guard = self.inbound.lock().unwrap_or_else(|p| p.into_inner());
        let Some(tx) = guard.as_ref() else {
            return Err(End::Binding("item-not-found"));
        };
        tx.try_send(text).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => End::Binding("policy-violation"),
            mpsc::error::TrySendError::Closed(_) => End::Closed {
                stream_error: false,
            },
        })
    }

    /// What a body from the client asks of the session core: its
    /// elements, then a stream restart (XEP-0206 §5) or the end (§7).
    fn process(&self, body: &Element) -> Result<(), End> {
        let mut text = String::new();
        for child in body.elements() {
            child.write_to(&mut text, ns::CLIENT);
        }
        if xbosh_attr(body, "restart") == Some("true") {
            text.push_str(&framing::synthetic_header(
                body.get_attr("to"),
                None,
                Some(xbosh_attr(body, "version").unwrap_or("1.0")),
                body.get_attr("xml:lang"),
            ));
        }
        if body.get_attr("type") == Some("terminate") {
            text.push_str(framing::STREAM_CLOSE);
        }
        // An empty poll still tells the core the client is there.
        self.feed(text)
    }

    /// One request, from its arrival to its answer.
    async fn request(self: &Arc<Self>, rid: u64, body: Element) -> String {
        let mut retry = false;
        {
            let mut st = self.lock();
            st.last_activity = Instant::now();
            if let Some(ack) = body.get_attr("ack").and_then(|a| a.parse::<u64>().ok()) {
                // §9.2: responses up to `ack` arrived; no need to keep them.
                st.answered.retain(|(r, _)| *r > ack);
            }
            if let Some(end) = &st.ended {
                if !matches!(end, End::Closed { .. }) || st.pending.is_empty() {
                    let end = end.clone();
                    return self.terminal(&mut st, rid, &end);
                }
            }
            if rid < st.next_rid {
                if let Some((_, answer)) = st.answered.iter().find(|(r, _)| *r == rid) {
                    tracing::debug!(sid = %self.sid, rid, "repeated rid: answered again");
                    return answer.clone();
                }
                if st.held.contains(&rid) || st.early.contains_key(&rid) {
                    // The client gave up on a request we still hold: both
                    // copies get the same (empty) answer; output stays.
                    st.held.retain(|r| *r != rid);
                    let answer = empty_body();
                    remember(&mut st, self.requests, rid, &answer);
                    drop(st);
                    self.changed.notify_waiters();
                    return answer;
                }
                if rid + self.requests < st.next_rid {
                    tracing::info!(sid = %self.sid, rid, "rid no longer in the window");
                    return self.fail(&mut st, rid, "item-not-found");
                }
                // Processed, but its connection went before an answer
                // (§14.3: the client sends it again): answered now.
                retry = true;
            }
            if retry {
                // Answered below, as it would have been.
            } else if rid >= st.next_rid + self.requests {
                tracing::info!(sid = %self.sid, rid, next = st.next_rid, "rid beyond the window");
                return self.fail(&mut st, rid, "item-not-found");
            } else if rid > st.next_rid {
                // §14.2: it waits for the requests before it.
                st.early.insert(rid, body);
            } else {
                let mut next = Some(body);
                while let Some(b) = next.take() {
                    if let Err(end) = self.process(&b) {
                        return self.terminal(&mut st, rid, &end);
                    }
                    st.next_rid += 1;
                    let n = st.next_rid;
                    next = st.early.remove(&n);
                }
            }
        }
        self.changed.notify_waiters();
        self.hold_until_answered(rid).await
    }

    async fn hold_until_answered(self: &Arc<Self>, rid: u64) -> String {
        let deadline = Instant::now() + self.wait;
        let mut holding = false;
        // A request whose connection goes (the client gave up, or is gone)
        // is held no more: inactivity counts from then.
        let _unhold = Unhold { session: self, rid };
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut st = self.lock();
                if rid < st.next_rid {
                    if !holding {
                        holding = true;
                        st.held.push_back(rid);
                        let mut released = Vec::new();
                        while st.held.len() > self.hold {
                            if let Some(old) = st.held.pop_front() {
                                released.push(old);
                            }
                        }
                        st.released.extend(released);
                        if !st.released.is_empty() {
                            self.changed.notify_waiters();
                        }
                    }
                    let released = st.released.iter().position(|r| *r == rid);
                    let front = st.held.front() == Some(&rid);
                    let has_output = !st.pending.is_empty() || st.ended.is_some();
                    let still_held = st.held.contains(&rid);
                    if !still_held && released.is_none() {
                        // A repeat of this rid answered in its place.
                        return st
                            .answered
                            .iter()
                            .find(|(r, _)| *r == rid)
                            .map(|(_, a)| a.clone())
                            .unwrap_or_else(empty_body);
                    }
                    if released.is_some() || (front && has_output) || Instant::now() >= deadline {
                        if let Some(i) = released {
                            st.released.swap_remove(i);
                        }
                        st.held.retain(|r| *r != rid);
                        let answer = self.answer(&mut st, rid);
                        drop(st);
                        self.drained.notify_waiters();
                        self.changed.notify_waiters();
                        return answer;
                    }
                } else if let Some(end) = st.ended.clone() {
                    // Never processed: the session ended before its turn.
                    return self.terminal(&mut st, rid, &end);
                }
            }
            tokio::select! {
                () = &mut notified => {}
                () = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// The response to `rid`: what is waiting, in a `<body/>` (with the
    /// session's attributes on the creation response).
    fn answer(&self, st: &mut SessionState, rid: u64) -> String {
        let mut out = String::with_capacity(st.pending.len() + 256);
        out.push_str("<body xmlns='");
        out.push_str(NS);
        out.push('\'');
        if rid == st.creation_rid {
            self.creation_attrs(st, rid, &mut out);
        }
        let ending = st.ended.clone();
        if let Some(end) = &ending {
            push_terminate(&mut out, end, st.stream_error);
        }
        if st.pending.is_empty() {
            out.push_str("/>");
        } else {
            out.push('>');
            out.push_str(&st.pending);
            out.push_str("</body>");
            st.pending.clear();
            if st.pending.capacity() > 64 * 1024 {
                st.pending = String::new();
            }
        }
        if st.held.is_empty() {
            st.last_activity = Instant::now();
        }
        remember(st, self.requests, rid, &out);
        out
    }

    fn creation_attrs(&self, st: &SessionState, rid: u64, out: &mut String) {
        out.push_str(" xmlns:xmpp='");
        out.push_str(XBOSH);
        out.push_str("' xmlns:stream='");
        out.push_str(ns::STREAM);
        out.push_str("' sid='");
        out.push_str(&self.sid);
        out.push_str(&format!(
            "' wait='{}' requests='{}' hold='{}' inactivity='{}' polling='{}' ver='1.11'",
            self.wait.as_secs(),
            self.requests,
            self.hold,
            self.inactivity.as_secs(),
            self.polling,
        ));
        if let Some(h) = &st.header {
            out.push_str(" from='");
            xmpp::element::escape_into(out, &h.from, true);
            out.push_str("' authid='");
            xmpp::element::escape_into(out, &h.id, true);
            out.push('\'');
        }
        if st.acks {
            out.push_str(&format!(" ack='{rid}'"));
        }
        out.push_str(" xmpp:version='1.0' xmpp:restartlogic='true'");
    }

    /// A terminating answer; the session is over.
    fn terminal(&self, st: &mut SessionState, rid: u64, end: &End) -> String {
        if st.ended.is_none() {
            st.ended = Some(end.clone());
        }
        if matches!(end, End::Closed { .. }) {
            // What the core wrote before it closed goes with it.
            return self.answer(st, rid);
        }
        let mut out = format!("<body xmlns='{NS}'");
        push_terminate(&mut out, end, false);
        out.push_str("/>");
        out
    }

    fn fail(&self, st: &mut SessionState, rid: u64, condition: &'static str) -> String {
        let answer = self.terminal(st, rid, &End::Binding(condition));
        // The core sees the connection gone (and may hibernate, XEP-0198).
        self.inbound
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        self.changed.notify_waiters();
        answer
    }

    fn is_over(&self) -> bool {
        self.lock().ended.is_some()
    }
}

/// Drops a request from the held ones when its future ends, answered or not.
struct Unhold<'a> {
    session: &'a Session,
    rid: u64,
}

impl Drop for Unhold<'_> {
    fn drop(&mut self) {
        let mut st = self.session.lock();
        let before = st.held.len();
        st.held.retain(|r| *r != self.rid);
        st.released.retain(|r| *r != self.rid);
        if before != st.held.len() && st.held.is_empty() {
            st.last_activity = Instant::now();
        }
    }
}

fn remember(st: &mut SessionState, requests: u64, rid: u64, answer: &str) {
    st.answered.push_back((rid, answer.to_owned()));
    while st.answered.len() as u64 > requests + 1 {
        st.answered.pop_front();
    }
}

fn push_terminate(out: &mut String, end: &End, stream_error: bool) {
    out.push_str(" type='terminate'");
    match end {
        End::Closed { stream_error: e } if *e || stream_error => {
            out.push_str(" condition='remote-stream-error'");
        }
        End::Closed { .. } => {}
        End::Binding(c) => {
            out.push_str(" condition='");
            out.push_str(c);
            out.push('\'');
        }
    }
}

fn empty_body() -> String {
    format!("<body xmlns='{NS}'/>")
}

/// An XEP-0206 attribute, whatever prefix the client bound `urn:xmpp:xbosh` to.
fn xbosh_attr<'a>(body: &'a Element, local: &str) -> Option<&'a str> {
    body.attrs.iter().find_map(|(name, value)| {
        let (prefix, l) = name.split_once(':')?;
        if l != local || prefix == "xmlns" {
            return None;
        }
        let decl = format!("xmlns:{prefix}");
        (body.get_attr(&decl) == Some(XBOSH)).then_some(value.as_str())
    })
}

/// The session core's side of a BOSH session.
pub struct Link {
    inbound: mpsc::Receiver<String>,
    session: Arc<Session>,
    pub secure: bool,
}

impl Link {
    pub async fn fill(&mut self, parser: &mut StreamParser) -> Result<(), ConnError> {
        match self.inbound.recv().await {
            Some(text) => {
                parser.feed(text.as_bytes());
                Ok(())
            }
            None => Err(ConnError::Lost),
        }
    }

    /// Our stream header: its id and host go on the creation response.
    pub fn header(&mut self, h: &Header) {
        let mut st = self.session.lock();
        if st.header.is_none() {
            st.header = Some(h.clone());
        }
    }

    /// Queues what the core wrote for the next response; waits (up to
    /// `timeout`) while a client that does not poll has too much waiting.
    pub async fn write(&mut self, s: &str, timeout: Duration) -> Result<(), ConnError> {
        let deadline = Instant::now() + timeout;
        loop {
            let drained = self.session.drained.notified();
            tokio::pin!(drained);
            drained.as_mut().enable();
            {
                let mut st = self.session.lock();
                if matches!(st.ended, Some(End::Binding(_))) {
                    return Err(ConnError::Lost);
                }
                if st.pending.len() < self.session.max_pending {
                    let mut closed = false;
                    for frame in framing::split(s) {
                        match frame {
                            Frame::Element(e) => {
                                if e.starts_with("<stream:error") {
                                    st.stream_error = true;
                                }
                                framing::declare_into(&mut st.pending, e);
                            }
                            Frame::Close => closed = true,
                        }
                    }
                    if closed && st.ended.is_none() {
                        st.ended = Some(End::Closed {
                            stream_error: st.stream_error,
                        });
                    }
                    drop(st);
                    self.session.changed.notify_waiters();
                    return Ok(());
                }
            }
            tokio::select! {
                () = &mut drained => {}
                () = tokio::time::sleep_until(deadline) => {
                    return Err(ConnError::Stream(
                        StreamError::ConnectionTimeout,
                        Some("the client stopped polling".into()),
                    ));
                }
            }
        }
    }

    pub fn shutdown(&mut self) {
        let stream_error = self.session.lock().stream_error;
        self.session.end(End::Closed { stream_error });
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn xml_response(http: &Http, headers: &HeaderMap, status: StatusCode, body: String) -> Response {
    let mut r = (
        status,
        [(header::CONTENT_TYPE, "text/xml; charset=utf-8")],
        body,
    )
        .into_response();
    for (k, v) in super::cors(&http.server.config.http, headers) {
        r.headers_mut().insert(k, v);
    }
    r
}

fn binding_error(http: &Http, headers: &HeaderMap, condition: &str) -> Response {
    let body = format!("<body xmlns='{NS}' type='terminate' condition='{condition}'/>");
    xml_response(http, headers, StatusCode::OK, body)
}

/// `GET /http-bind`: what this is, for a human with a browser.
pub async fn info() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        "XMPP over BOSH (XEP-0124, XEP-0206): POST <body/> elements here.\n",
    )
        .into_response()
}

/// `POST /http-bind`.
pub async fn request(
    State(http): State<Arc<Http>>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    raw: Bytes,
) -> Response {
    let config = &http.server.config.http;
    if raw.len() > config.max_body_bytes {
        return (StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n").into_response();
    }
    let parsed = std::str::from_utf8(&raw)
        .ok()
        .and_then(|t| xmpp::xml::parse_element(t, NS).ok());
    let Some(body) = parsed.filter(|b| b.is("body", NS)) else {
        // §17.1: not a <body/> of ours at all.
        return (StatusCode::BAD_REQUEST, "expected a BOSH <body/>\n").into_response();
    };
    let Some(rid) = body
        .get_attr("rid")
        .and_then(|r| r.parse::<u64>().ok())
        .filter(|r| *r <= MAX_RID)
    else {
        return binding_error(&http, &headers, "bad-request");
    };
    let answer = match body.get_attr("sid") {
        None => match create(&http, &info, rid, body).await {
            Ok(a) => a,
            Err(condition) => return binding_error(&http, &headers, condition),
        },
        Some(sid) => {
            let Some(session) = http.bosh.get(sid) else {
                return binding_error(&http, &headers, "item-not-found");
            };
            let answer = session.request(rid, body).await;
            if session.is_over() {
                http.bosh.remove(&session.sid);
            }
            answer
        }
    };
    xml_response(&http, &headers, StatusCode::OK, answer)
}

/// XEP-0124 §7.1, XEP-0206 §6: a new session, its c2s core started on a
/// [`Link`], answered with the session's attributes and stream features.
async fn create(
    http: &Arc<Http>,
    info: &ConnInfo,
    rid: u64,
    body: Element,
) -> Result<String, &'static str> {
    let server = http.server.clone();
    let config = &server.config.http;
    if body.get_attr("to").is_none() {
        return Err("improper-addressing");
    }
    let admitted = server
        .admission
        .admit(info.peer.ip())
        .map_err(|(e, text)| {
            tracing::info!(peer = %info.peer, error = %e, "BOSH session refused: {text}");
            "policy-violation"
        })?;
    let num = |name: &str| body.get_attr(name).and_then(|v| v.parse::<u64>().ok());
    let wait = num("wait")
        .unwrap_or(config.bosh_max_wait_secs)
        .min(config.bosh_max_wait_secs);
    let hold = num("hold").unwrap_or(1).min(config.bosh_max_hold);
    let mut sid = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut sid);
    let sid: String = sid.iter().map(|b| format!("{b:02x}")).collect();
    let (tx, rx) = mpsc::channel(INBOUND_QUEUE);
    let session = Arc::new(Session {
        sid: sid.clone(),
        wait: Duration::from_secs(wait),
        hold: hold as usize,
        requests: hold + 1,
        inactivity: Duration::from_secs(config.bosh_inactivity_secs),
        polling: config.bosh_polling_secs,
        max_pending: config.bosh_max_pending_bytes,
        inbound: Mutex::new(Some(tx)),
        state: Mutex::new(SessionState {
            next_rid: rid,
            early: BTreeMap::new(),
            pending: String::new(),
            stream_error: false,
            ended: None,
            header: None,
            creation_rid: rid,
            acks: body.get_attr("ack").is_some(),
            answered: VecDeque::new(),
            held: VecDeque::new(),
            released: Vec::new(),
            last_activity: Instant::now(),
        }),
        changed: Notify::new(),
        drained: Notify::new(),
    });
    http.bosh.lock().insert(sid.clone(), session.clone());
    let io = Io::Bosh(Box::new(Link {
        inbound: rx,
        session: session.clone(),
        secure: info.secure,
    }));
    tracing::debug!(peer = %info.peer, sid = %sid, wait, hold, "BOSH session created");
    let peer = info.peer;
    tokio::spawn(async move {
        Box::pin(crate::c2s::serve(
            server,
            io,
            peer,
            xmpp::sasl::ChannelBindings::default(),
            admitted,
        ))
        .await;
    });
    tokio::spawn(reap(http.bosh.clone(), session.clone()));
    // The creation request opens the stream; its answer holds the features.
    let header = framing::synthetic_header(
        body.get_attr("to"),
        body.get_attr("from"),
        Some(xbosh_attr(&body, "version").unwrap_or("1.0")),
        body.get_attr("xml:lang"),
    );
    let opened = {
        let st = &mut session.lock();
        match session.feed(header) {
            Ok(()) => {
                st.next_rid = rid + 1;
                // Any stanzas sent with the creation request (rare) follow.
                let children = body.children.iter().any(|c| matches!(c, Node::Element(_)));
                if children {
                    let mut text = String::new();
                    for child in body.elements() {
                        child.write_to(&mut text, ns::CLIENT);
                    }
                    let _ = session.feed(text);
                }
                Ok(())
            }
            Err(_) => Err("internal-server-error"),
        }
    };
    opened?;
    Ok(session.hold_until_answered(rid).await)
}

/// Ends a session that has gone `inactivity` seconds without a request
/// (XEP-0124 §7.1), or that is over, and forgets it.
async fn reap(registry: Arc<Registry>, session: Arc<Session>) {
    loop {
        let due = {
            let st = session.lock();
            if st.ended.is_some() && st.held.is_empty() {
                break;
            }
            if st.held.is_empty() && st.last_activity.elapsed() >= session.inactivity {
                None
            } else {
                Some(st.last_activity + session.inactivity)
            }
        };
        match due {
            Some(at) => {
                let now = Instant::now();
                tokio::time::sleep_until(at.max(now + Duration::from_millis(250))).await
            }
            None => {
                tracing::info!(sid = %session.sid, "BOSH session inactive: closed");
                session
                    .inbound
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .take();
                session.end(End::Binding("item-not-found"));
                break;
            }
        }
    }
    // An ended session's last answer may still be asked for again.
    tokio::time::sleep(session.wait.max(Duration::from_secs(1))).await;
    registry.remove(&session.sid);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn xbosh_attributes_are_found_under_any_prefix() {
        let body = xmpp::xml::parse_element(
            "<body xmlns='http://jabber.org/protocol/httpbind' xmlns:x='urn:xmpp:xbosh' x:restart='true' rid='5'/>",
            NS,
        )
        .expect("parses");
        assert_eq!(xbosh_attr(&body, "restart"), Some("true"));
        let other = xmpp::xml::parse_element(
            "<body xmlns='http://jabber.org/protocol/httpbind' xmlns:x='urn:other' x:restart='true'/>",
            NS,
        )
        .expect("parses");
        assert_eq!(xbosh_attr(&other, "restart"), None);
    }
}
