//! Outbound streams: one per (local, remote) domain pair, opened when the
//! first stanza for it arrives, reused, closed after `idle_timeout`.
//!
//! Stanzas wait in the stream's queue while it is set up (resolve, TCP,
//! STARTTLS, SASL EXTERNAL or dialback). When it cannot be set up within
//! `negotiation_timeout`, everything queued goes back to its sender as
//! `remote-server-not-found` (or `remote-server-timeout`), and the pair
//! waits out a backoff (doubling to `max_backoff`) during which new
//! stanzas bounce at once instead of piling up.
//!
//! Also here: the receiving server's half of dialback, [`verify`], which
//! asks a domain's authoritative server over a connection of its own
//! (XEP-0220 §2.1.2); keeping it off the pooled stream means two servers
//! setting up streams to each other at the same time never wait on each
//! other.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::net::TcpStream;
use tokio::sync::mpsc;
use xmpp::element::Element;
use xmpp::error::{StanzaError, StreamError};
use xmpp::stanza::ns;

use crate::resolve::Target;
use crate::stream::{Conn, Io, StreamEnd};
use crate::{dialback, AuthMethod, Federation, Policy, StatusCell, StreamStatus};

type Pair = (String, String);

struct Handle {
    tx: mpsc::UnboundedSender<Element>,
    queued: Arc<AtomicUsize>,
    status: StatusCell,
}

#[derive(Default)]
pub(crate) struct Pool {
    streams: Mutex<HashMap<Pair, Handle>>,
    /// Pairs that failed: until when new stanzas bounce, and the next wait.
    backoff: Mutex<HashMap<Pair, (Instant, Duration)>>,
}

impl Pool {
    pub(crate) fn status(&self) -> Vec<StreamStatus> {
        let mut out: Vec<StreamStatus> = match self.streams.lock() {
            Ok(m) => m
                .values()
                .filter_map(|h| {
                    let mut s = h.status.lock().ok()?.clone();
                    s.queued = h.queued.load(Ordering::Relaxed);
                    Some(s)
                })
                .collect(),
            Err(_) => Vec::new(),
        };
        if let Ok(b) = self.backoff.lock() {
            let now = Instant::now();
            for ((local, remote), (until, _)) in b.iter() {
                if *until > now {
                    out.push(StreamStatus {
                        direction: "outbound",
                        local: local.clone(),
                        remote: remote.clone(),
                        state: format!("backoff {}s", (*until - now).as_secs()),
                        auth: AuthMethod::None,
                        tls: String::new(),
                        cert_valid: false,
                        since: now,
                        queued: 0,
                        peer: String::new(),
                    });
                }
            }
        }
        out
    }
}

/// Why an outbound stream could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    #[error("no server found for the domain")]
    NotFound,
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("timed out setting up the stream")]
    Timeout,
    #[error("{0}")]
    Stream(#[from] StreamEnd),
    #[error("not authenticated: {0}")]
    Auth(String),
    #[error("refused by policy: {0}")]
    Policy(String),
    #[error("the peer refused our certificate (SASL EXTERNAL)")]
    ExternalRefused,
}

impl Failure {
    fn condition(&self) -> StanzaError {
        match self {
            Failure::Timeout => StanzaError::RemoteServerTimeout,
            _ => StanzaError::RemoteServerNotFound,
        }
    }
}

pub(crate) fn send(fed: &Arc<Federation>, local: &str, remote: &str, mut stanza: Element) {
    if fed.config.policy(remote) == Policy::Deny {
        let text = format!("this server does not federate with {remote}");
        return fed
            .host
            .bounce(stanza, StanzaError::RemoteServerNotFound, &text);
    }
    let pair = (local.to_owned(), remote.to_owned());
    if let Some(wait) = in_backoff(fed, &pair) {
        let text = format!(
            "{remote} could not be reached a moment ago; the next attempt is in {}s",
            wait.as_secs().max(1)
        );
        return fed
            .host
            .bounce(stanza, StanzaError::RemoteServerNotFound, &text);
    }
    crate::translate_ns(&mut stanza, ns::CLIENT, ns::SERVER);
    let Ok(mut streams) = fed.pool.streams.lock() else {
        return;
    };
    let handle = streams
        .entry(pair.clone())
        .or_insert_with(|| spawn(fed, &pair));
    if handle.queued.load(Ordering::Relaxed) >= fed.config.max_queued {
        drop(streams);
        crate::translate_ns(&mut stanza, ns::SERVER, ns::CLIENT);
        let text = format!("too many stanzas are waiting for {remote}");
        return fed
            .host
            .bounce(stanza, StanzaError::ResourceConstraint, &text);
    }
    handle.queued.fetch_add(1, Ordering::Relaxed);
    if let Err(mpsc::error::SendError(stanza)) = handle.tx.send(stanza) {
        // The task ended without removing itself (it panicked): start over.
        let fresh = spawn(fed, &pair);
        fresh.queued.fetch_add(1, Ordering::Relaxed);
        let _ = fresh.tx.send(stanza);
        streams.insert(pair, fresh);
    }
}

fn in_backoff(fed: &Federation, pair: &Pair) -> Option<Duration> {
    let b = fed.pool.backoff.lock().ok()?;
    let (until, _) = b.get(pair)?;
    until.checked_duration_since(Instant::now())
}

fn spawn(fed: &Arc<Federation>, pair: &Pair) -> Handle {
    let (tx, rx) = mpsc::unbounded_channel();
    let queued = Arc::new(AtomicUsize::new(0));
    let status = Arc::new(Mutex::new(StreamStatus {
        direction: "outbound",
        local: pair.0.clone(),
        remote: pair.1.clone(),
        state: "connecting".into(),
        auth: AuthMethod::None,
        tls: String::new(),
        cert_valid: false,
        since: Instant::now(),
        queued: 0,
        peer: String::new(),
    }));
    tokio::spawn(run(
        fed.clone(),
        pair.clone(),
        rx,
        queued.clone(),
        status.clone(),
    ));
    Handle { tx, queued, status }
}

fn set(status: &StatusCell, f: impl FnOnce(&mut StreamStatus)) {
    if let Ok(mut s) = status.lock() {
        f(&mut s);
    }
}

/// Leaves the pool if nothing is queued (checked under the pool lock, so
/// no stanza is sent to a task that is gone). Returns a stanza that came
/// in meanwhile instead.
fn leave(
    fed: &Federation,
    pair: &Pair,
    rx: &mut mpsc::UnboundedReceiver<Element>,
    me: &StatusCell,
) -> Option<Element> {
    let Ok(mut streams) = fed.pool.streams.lock() else {
        return None;
    };
    if let Ok(e) = rx.try_recv() {
        return Some(e);
    }
    if streams
        .get(pair)
        .is_some_and(|h| Arc::ptr_eq(&h.status, me))
    {
        streams.remove(pair);
    }
    None
}

async fn run(
    fed: Arc<Federation>,
    pair: Pair,
    mut rx: mpsc::UnboundedReceiver<Element>,
    queued: Arc<AtomicUsize>,
    status: StatusCell,
) {
    let (local, remote) = (pair.0.as_str(), pair.1.as_str());
    let mut first: Option<Element> = None;
    loop {
        set(&status, |s| {
            s.state = "connecting".into();
            s.since = Instant::now();
        });
        let setup = tokio::time::timeout(fed.config.negotiation_timeout, async {
            match establish(&fed, local, remote, &status, true).await {
                // Some servers (ejabberd) offer EXTERNAL whatever our
                // certificate, and take nothing else on that stream after
                // refusing it: a new stream, with dialback only.
                Err(Failure::ExternalRefused) => {
                    establish(&fed, local, remote, &status, false).await
                }
                other => other,
            }
        })
        .await
        .unwrap_or(Err(Failure::Timeout));
        match setup {
            Ok(mut conn) => {
                if let Ok(mut b) = fed.pool.backoff.lock() {
                    b.remove(&pair);
                }
                set(&status, |s| {
                    s.state = "established".into();
                    s.since = Instant::now();
                });
                tracing::info!(%local, %remote, peer = %conn.peer, "s2s outbound stream established");
                match established(
                    &fed,
                    &pair,
                    &mut conn,
                    &mut rx,
                    &queued,
                    &status,
                    first.take(),
                )
                .await
                {
                    Ok(()) => return,
                    Err(e) => {
                        tracing::info!(%local, %remote, reason = %e, "s2s outbound stream ended");
                        conn.shutdown().await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%local, %remote, reason = %e, "cannot set up an s2s stream; bouncing what waits for it");
                let wait = {
                    let mut b = match fed.pool.backoff.lock() {
                        Ok(b) => b,
                        Err(_) => return,
                    };
                    let next = b
                        .get(&pair)
                        .map(|(_, d)| (*d * 2).min(fed.config.max_backoff))
                        .unwrap_or(fed.config.backoff);
                    b.insert(pair.clone(), (Instant::now() + next, next));
                    next
                };
                tracing::debug!(%remote, wait_secs = wait.as_secs(), "s2s backoff");
                let condition = e.condition();
                let text = format!("{remote}: {e}");
                let bounce = |mut stanza: Element| {
                    crate::translate_ns(&mut stanza, ns::SERVER, ns::CLIENT);
                    fed.host.bounce(stanza, condition, &text);
                };
                if let Some(s) = first.take() {
                    bounce(s);
                }
                loop {
                    while let Ok(s) = rx.try_recv() {
                        queued.fetch_sub(1, Ordering::Relaxed);
                        bounce(s);
                    }
                    match leave(&fed, &pair, &mut rx, &status) {
                        Some(s) => {
                            queued.fetch_sub(1, Ordering::Relaxed);
                            bounce(s)
                        }
                        None => return,
                    }
                }
            }
        }
        // The stream broke: start again if something waits, else leave.
        match rx.try_recv() {
            Ok(s) => {
                queued.fetch_sub(1, Ordering::Relaxed);
                first = Some(s);
            }
            Err(_) => match leave(&fed, &pair, &mut rx, &status) {
                Some(s) => {
                    queued.fetch_sub(1, Ordering::Relaxed);
                    first = Some(s);
                }
                None => return,
            },
        }
    }
}

/// Sends until idle (Ok: left the pool) or the stream breaks (Err).
async fn established(
    fed: &Federation,
    pair: &Pair,
    conn: &mut Conn,
    rx: &mut mpsc::UnboundedReceiver<Element>,
    queued: &AtomicUsize,
    status: &StatusCell,
    first: Option<Element>,
) -> Result<(), StreamEnd> {
    let mut out = String::new();
    if let Some(e) = first {
        e.write_to(&mut out, ns::SERVER);
    }
    loop {
        // Everything queued goes out in one write.
        while out.len() < 64 * 1024 {
            match rx.try_recv() {
                Ok(e) => {
                    queued.fetch_sub(1, Ordering::Relaxed);
                    e.write_to(&mut out, ns::SERVER);
                }
                Err(_) => break,
            }
        }
        if !out.is_empty() {
            conn.write_raw(&out).await?;
            out.clear();
            continue;
        }
        let idle = tokio::time::sleep(fed.config.idle_timeout);
        tokio::select! {
            e = rx.recv() => match e {
                Some(e) => {
                    queued.fetch_sub(1, Ordering::Relaxed);
                    e.write_to(&mut out, ns::SERVER);
                }
                None => return Ok(()),
            },
            ev = conn.next_event() => match ev? {
                xmpp::xml::Event::StreamClose => {
                    conn.close().await;
                    return Err(StreamEnd::Closed);
                }
                xmpp::xml::Event::Element(e) if e.is("error", ns::STREAM) => {
                    let end = crate::stream::peer_error(&e);
                    tracing::warn!(local = %pair.0, remote = %pair.1, reason = %end, "s2s peer closed its stream with an error");
                    return Err(end);
                }
                // RFC 6120 §4.1: the stream is one-way; nothing is
                // expected back but errors (dialback answers are over).
                _ => {}
            },
            _ = idle => {
                match leave(fed, pair, rx, status) {
                    Some(e) => {
                        queued.fetch_sub(1, Ordering::Relaxed);
                        e.write_to(&mut out, ns::SERVER);
                    }
                    None => {
                        tracing::debug!(local = %pair.0, remote = %pair.1, "idle s2s stream closed");
                        conn.close().await;
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// What the peer's (restarted) stream offered.
pub(crate) struct Opened {
    pub conn: Conn,
    pub stream_id: String,
    pub features: Element,
    pub cert_valid: bool,
}

/// Connects to `remote`'s servers in order and opens a stream, with
/// STARTTLS when offered (required by `require_tls`).
pub(crate) async fn open(fed: &Federation, local: &str, remote: &str) -> Result<Opened, Failure> {
    let targets = fed.resolver.targets(remote).await;
    if targets.is_empty() {
        return Err(Failure::NotFound);
    }
    let mut last = Failure::NotFound;
    for target in &targets {
        let addrs = fed.resolver.addrs(target).await;
        if addrs.is_empty() {
            last = Failure::Connect(format!("{} has no address", target.host));
        }
        for addr in addrs {
            let tcp =
                match tokio::time::timeout(fed.config.connect_timeout, TcpStream::connect(addr))
                    .await
                {
                    Ok(Ok(t)) => t,
                    Ok(Err(e)) => {
                        last = Failure::Connect(format!("{addr}: {e}"));
                        continue;
                    }
                    Err(_) => {
                        last = Failure::Connect(format!(
                            "{addr}: no answer in {:?}",
                            fed.config.connect_timeout
                        ));
                        continue;
                    }
                };
            let _ = tcp.set_nodelay(true);
            match negotiate_tls(fed, tcp, addr, target, local, remote).await {
                Ok(o) => return Ok(o),
                Err(e) => last = e,
            }
        }
    }
    Err(last)
}

async fn tls_connect(
    fed: &Federation,
    tcp: TcpStream,
    local: &str,
    remote: &str,
) -> Result<Io, Failure> {
    let name = rustls_pki_types::ServerName::try_from(remote.to_owned())
        .map_err(|e| Failure::Connect(format!("{remote} is not a valid TLS name: {e}")))?;
    let tls = fed
        .tls
        .connector(local)
        .connect(name, tcp)
        .await
        .map_err(|e| Failure::Connect(format!("TLS handshake failed: {e}")))?;
    Ok(Io::Client(Box::new(tls)))
}

async fn negotiate_tls(
    fed: &Federation,
    tcp: TcpStream,
    addr: std::net::SocketAddr,
    target: &Target,
    local: &str,
    remote: &str,
) -> Result<Opened, Failure> {
    let io = if target.direct_tls {
        tls_connect(fed, tcp, local, remote).await?
    } else {
        Io::Plain(tcp)
    };
    let mut conn = Conn::new(io, addr, fed.config.limits, fed.config.write_timeout);
    loop {
        let (stream_id, features) = restart(&mut conn, local, remote).await?;
        let offers_tls = features.has_child("starttls", ns::TLS);
        if !conn.is_tls() && offers_tls {
            conn.send(&Element::new("starttls", ns::TLS)).await?;
            let answer = conn.next_element().await?;
            if !answer.is("proceed", ns::TLS) {
                return Err(Failure::Connect(format!("{remote} refused STARTTLS")));
            }
            let Io::Plain(tcp) = std::mem::replace(&mut conn.io, Io::Upgrading) else {
                return Err(Failure::Connect("STARTTLS twice".into()));
            };
            conn.io = tls_connect(fed, tcp, local, remote).await?;
            conn.reset_for_tls();
            continue;
        }
        if !conn.is_tls() && fed.config.require_tls {
            conn.close_with_error(
                local,
                StreamError::PolicyViolation,
                "this server requires TLS between servers",
            )
            .await;
            return Err(Failure::Policy(format!("{remote} does not offer TLS")));
        }
        let cert_valid = conn.is_tls() && fed.tls.valid_for(&conn.peer_chain(), remote);
        return Ok(Opened {
            conn,
            stream_id,
            features,
            cert_valid,
        });
    }
}

/// Sends our header, reads the peer's and its features.
async fn restart(conn: &mut Conn, local: &str, remote: &str) -> Result<(String, Element), Failure> {
    conn.write_header(local, Some(remote), None).await?;
    let header = conn.next_header().await?;
    if header.default_ns != ns::SERVER {
        return Err(Failure::Connect(format!(
            "{remote} does not speak jabber:server"
        )));
    }
    let Some(id) = header.id else {
        return Err(Failure::Connect(format!("{remote} sent no stream id")));
    };
    // A pre-1.0 server sends no features (RFC 6120 §4.7.5).
    let features = if header
        .version
        .as_deref()
        .is_some_and(|v| v.starts_with('1'))
    {
        let f = conn.next_element().await?;
        if !f.is("features", ns::STREAM) {
            return Err(Failure::Connect(format!(
                "{remote} sent no stream features"
            )));
        }
        f
    } else {
        Element::new("features", ns::STREAM)
    };
    Ok((id, features))
}

/// Opens and authenticates a stream from `local` to `remote`.
async fn establish(
    fed: &Federation,
    local: &str,
    remote: &str,
    status: &StatusCell,
    try_external: bool,
) -> Result<Conn, Failure> {
    let Opened {
        mut conn,
        stream_id,
        features,
        cert_valid,
    } = open(fed, local, remote).await?;
    set(status, |s| {
        s.state = "authenticating".into();
        s.tls = conn.tls_version();
        s.cert_valid = cert_valid;
        s.peer = conn.peer.to_string();
    });
    let policy = fed.config.policy(remote);
    if policy == Policy::Certificate && !cert_valid {
        conn.close_with_error(
            local,
            StreamError::PolicyViolation,
            "your certificate is not valid for your domain",
        )
        .await;
        return Err(Failure::Policy(format!(
            "the certificate of {remote} is not valid for it"
        )));
    }
    let offers_external = features.get_child("mechanisms", ns::SASL).is_some_and(|m| {
        m.elements()
            .any(|c| c.name == "mechanism" && c.text_content() == "EXTERNAL")
    });
    // EXTERNAL only with a certificate that our own trust anchors accept
    // for our domain: a self-signed one would be refused anyway.
    let ours_valid = fed
        .host
        .certificate(local)
        .is_some_and(|k| fed.tls.valid_for(&k.cert, local));
    if offers_external && try_external && ours_valid {
        // XEP-0178 §3: the authorization identity is our domain.
        use base64::Engine;
        let authzid = base64::engine::general_purpose::STANDARD.encode(local);
        conn.send(
            &Element::new("auth", ns::SASL)
                .attr("mechanism", "EXTERNAL")
                .text(authzid),
        )
        .await?;
        let answer = conn.next_element().await?;
        if answer.is("success", ns::SASL) {
            conn.reset();
            restart(&mut conn, local, remote).await?;
            set(status, |s| s.auth = AuthMethod::External);
            return Ok(conn);
        }
        tracing::info!(%local, %remote, "SASL EXTERNAL refused; trying dialback on a new stream");
        if policy == Policy::Certificate {
            return Err(Failure::Auth(format!("{remote} refused our certificate")));
        }
        conn.close().await;
        return Err(Failure::ExternalRefused);
    }
    let Some(secret) = fed.host.dialback_secret() else {
        return Err(Failure::Auth("no dialback secret yet".into()));
    };
    let key = dialback::key(&secret, remote, local, &stream_id);
    conn.send(
        &Element::new("result", dialback::NS)
            .attr("from", local)
            .attr("to", remote)
            .text(key),
    )
    .await?;
    loop {
        let e = conn.next_element().await?;
        if !e.is("result", dialback::NS) {
            continue;
        }
        match e.get_attr("type") {
            Some("valid") => {
                set(status, |s| s.auth = AuthMethod::Dialback);
                return Ok(conn);
            }
            Some("error") => {
                let why = e
                    .get_child("error", ns::SERVER)
                    .and_then(|err| err.elements().next().map(|c| c.name.clone()))
                    .unwrap_or_else(|| "error".into());
                return Err(Failure::Auth(format!(
                    "{remote} answered dialback with {why}"
                )));
            }
            _ => {
                return Err(Failure::Auth(format!(
                    "{remote} found our dialback key invalid"
                )))
            }
        }
    }
}

/// The receiving server's question to `originating`'s authoritative
/// server: did you issue `key` for the stream `stream_id` to us?
pub(crate) async fn verify(
    fed: &Federation,
    receiving: &str,
    originating: &str,
    stream_id: &str,
    key: &str,
) -> Result<bool, Failure> {
    let work = async {
        let Opened { mut conn, .. } = open(fed, receiving, originating).await?;
        let id = stream_id.to_owned();
        conn.send(
            &Element::new("verify", dialback::NS)
                .attr("from", receiving)
                .attr("to", originating)
                .attr("id", id.as_str())
                .text(key),
        )
        .await?;
        loop {
            let e = conn.next_element().await?;
            if e.is("verify", dialback::NS) && e.get_attr("id") == Some(&id) {
                let valid = e.get_attr("type") == Some("valid");
                conn.close().await;
                return Ok(valid);
            }
        }
    };
    tokio::time::timeout(fed.config.negotiation_timeout, work)
        .await
        .unwrap_or(Err(Failure::Timeout))
}
