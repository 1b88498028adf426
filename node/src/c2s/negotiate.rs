//! Stream negotiation up to a bound resource (RFC 6120 §5 TLS, §6 SASL,
//! §7 resource binding), one stream restart after each of TLS and SASL.

use std::time::Instant;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::RngCore;
use xmpp::element::Element;
use xmpp::error::{StanzaError, StreamError};
use xmpp::jid::{nodeprep, resourceprep, BareJid, FullJid};
use xmpp::sasl::{HashAlg, Mechanism, SaslFailure, ServerSession, Step};
use xmpp::stanza::{error_reply, iq_result, ns, IqType, StanzaKind};
use xmpp::xml::Event;

use super::io::Io;
use super::sasl2;
use super::stream::{ConnError, Stream};

/// Mechanism refusals (not password failures) tolerated on one stream.
const MAX_REFUSALS: u32 = 10;

/// The outcome of negotiation: the bound full JID and the request to answer.
pub struct Bound {
    pub jid: FullJid,
    pub reply: BindReply,
}

/// What asked for the binding, and so how it is answered.
pub enum BindReply {
    /// RFC 6120 §7: an `<iq><bind/></iq>`.
    Iq(Element),
    /// Bind2 inside SASL2: `<success/>` (to which `<bound/>` is added) and
    /// what the client asked to enable with it.
    Sasl2 {
        success: Element,
        bind: sasl2::BindRequest,
    },
}

/// Runs TLS (unless already on TLS), SASL, and binding.
pub async fn negotiate(s: &mut Stream) -> Result<Negotiated, ConnError> {
    let auth = authenticate(s).await?;
    match auth.sasl2 {
        None => {
            s.open().await?;
            bind(s, auth.user).await
        }
        Some((req, additional)) => sasl2_complete(s, auth.user, req, additional).await,
    }
}

/// A negotiated stream: a new session, or one to resume (XEP-0198 §5).
pub enum Negotiated {
    Bound(Bound),
    Resume {
        tx: super::sm::HandoffTx,
        h: u32,
        /// Resumed inside SASL2: the `<success/>` that carries `<resumed/>`.
        sasl2: Option<Element>,
    },
    /// The session was on another node, which handed it over.
    Migrated {
        state: Box<super::sm::Migrated>,
        h: u32,
        sasl2: Option<Element>,
    },
}

/// Who authenticated, and for SASL2 what they asked inline with the
/// server's additional data.
struct Authenticated {
    user: BareJid,
    sasl2: Option<(sasl2::Request, Option<Vec<u8>>)>,
}

/// Which SASL profile an exchange runs in: RFC 6120's, or XEP-0388's.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Wire {
    Sasl1,
    Sasl2,
}

impl Wire {
    fn ns(self) -> &'static str {
        match self {
            Wire::Sasl1 => ns::SASL,
            Wire::Sasl2 => sasl2::NS,
        }
    }

    fn failure(self, f: SaslFailure, text: Option<&str>) -> Element {
        match self {
            Wire::Sasl1 => sasl_failure(f, text),
            Wire::Sasl2 => sasl2::failure(f, text),
        }
    }
}

async fn next_element(s: &mut Stream) -> Result<Element, ConnError> {
    match s.next_event().await? {
        Event::Element(e) => Ok(e),
        Event::StreamClose => Err(ConnError::Closed),
        Event::StreamOpen(_) => Err(ConnError::stream(
            StreamError::NotWellFormed,
            "unexpected stream header",
        )),
    }
}

/// The SASL mechanisms offered on this stream, strongest first.
fn mechanisms(s: &Stream) -> Vec<Mechanism> {
    let mut m = Vec::new();
    let tls = s.io.is_tls();
    if tls && (s.cb.tls_exporter.is_some() || s.cb.tls_server_end_point.is_some()) {
        m.extend([
            Mechanism::ScramPlus(HashAlg::Sha512),
            Mechanism::ScramPlus(HashAlg::Sha256),
            Mechanism::ScramPlus(HashAlg::Sha1),
        ]);
    }
    m.extend([
        Mechanism::Scram(HashAlg::Sha512),
        Mechanism::Scram(HashAlg::Sha256),
        Mechanism::Scram(HashAlg::Sha1),
    ]);
    // PLAIN sends the password itself: only inside TLS.
    if tls {
        m.push(Mechanism::Plain);
    }
    m
}

fn pre_auth_features(s: &Stream) -> Element {
    let config = &s.server.config;
    let mut f = Element::new("features", ns::STREAM);
    let tls = s.io.is_tls();
    if !tls && s.io.can_starttls() {
        let mut starttls = Element::new("starttls", ns::TLS);
        if config.tls.require_c2s {
            starttls = starttls.child(Element::new("required", ns::TLS));
        }
        f = f.child(starttls);
        if config.tls.require_c2s {
            return f;
        }
    }
    let offered = mechanisms(s);
    let mut mechs = Element::new("mechanisms", ns::SASL);
    for m in &offered {
        mechs = mechs.child(Element::new("mechanism", ns::SASL).text(m.name()));
    }
    f = f.child(mechs);
    // XEP-0388: the same mechanisms in SASL2, with Bind2 and FAST inline.
    f = f.child(sasl2::feature(s, &offered));
    // XEP-0440: which channel-binding types this connection can do.
    let mut cb = Element::new("sasl-channel-binding", ns::SASL_CB);
    if s.cb.tls_exporter.is_some() {
        cb = cb.child(Element::new("channel-binding", ns::SASL_CB).attr("type", "tls-exporter"));
    }
    if s.cb.tls_server_end_point.is_some() {
        cb = cb.child(
            Element::new("channel-binding", ns::SASL_CB).attr("type", "tls-server-end-point"),
        );
    }
    if !cb.children.is_empty() {
        f = f.child(cb);
    }
    if config.auth.allow_registration {
        f = f.child(Element::new("register", ns::REGISTER_FEATURE));
    }
    f
}

fn sasl_failure(f: SaslFailure, text: Option<&str>) -> Element {
    let mut e = Element::new("failure", ns::SASL).child(Element::new(f.condition(), ns::SASL));
    if let Some(t) = text {
        e = e.child(Element::new("text", ns::SASL).text(t));
    }
    e
}

async fn authenticate(s: &mut Stream) -> Result<Authenticated, ConnError> {
    let mut failures = 0u32;
    let mut refusals = 0u32;
    let mut plus_refused = false;
    loop {
        s.open().await?;
        if !s.io.is_tls() && !s.io.can_starttls() && s.server.config.tls.require_c2s {
            // An HTTP transport cannot start TLS: it is HTTPS, or a proxy
            // the operator vouches for (`http.consider_secure`), or nothing.
            return Err(ConnError::stream(
                StreamError::PolicyViolation,
                "encryption is required: connect over HTTPS",
            ));
        }
        let features = pre_auth_features(s);
        s.send(&features).await?;
        loop {
            let e = next_element(s).await?;
            let tls_needed = !s.io.is_tls() && s.server.config.tls.require_c2s;
            if e.is("starttls", ns::TLS) && s.io.can_starttls() {
                s.send(&Element::new("proceed", ns::TLS)).await?;
                // RFC 6120 §5.4.3.3: nothing sent before the handshake counts;
                // drop it so plaintext cannot be injected into the TLS stream.
                s.parser.discard_buffer();
                s.parser.reset();
                upgrade(s).await?;
                break;
            } else if e.is("auth", ns::SASL) {
                if tls_needed {
                    s.send(&sasl_failure(SaslFailure::EncryptionRequired, None))
                        .await?;
                    continue;
                }
                let outcome = sasl(
                    s,
                    Wire::Sasl1,
                    e.get_attr("mechanism"),
                    decode(&e),
                    &mut plus_refused,
                )
                .await?;
                if let SaslOutcome::Success(user, additional) = outcome {
                    let mut ok = Element::new("success", ns::SASL);
                    if let Some(d) = additional {
                        ok = ok.text(B64.encode(d));
                    }
                    s.send(&ok).await?;
                    s.parser.reset();
                    return Ok(Authenticated { user, sasl2: None });
                }
                count_failure(s, &outcome, &mut failures, &mut refusals)?;
            } else if e.is("authenticate", sasl2::NS) {
                if tls_needed {
                    s.send(&sasl2::failure(SaslFailure::EncryptionRequired, None))
                        .await?;
                    continue;
                }
                let mut req = sasl2::parse(&e);
                // RFC 6120 §6.4.2 as in SASL1: `=` or nothing is empty.
                let initial = match e.get_child("initial-response", sasl2::NS) {
                    Some(i) => decode(i),
                    None => Some(Vec::new()),
                };
                let mech = e.get_attr("mechanism");
                let outcome = match mech.and_then(xmpp::fast::HtMechanism::from_name) {
                    Some(ht) if sasl2::fast_mechanisms(s).contains(&ht) => {
                        fast(s, ht, initial, &mut req).await?
                    }
                    _ => sasl(s, Wire::Sasl2, mech, initial, &mut plus_refused).await?,
                };
                if let SaslOutcome::Success(user, additional) = outcome {
                    return Ok(Authenticated {
                        user,
                        sasl2: Some((req, additional)),
                    });
                }
                count_failure(s, &outcome, &mut failures, &mut refusals)?;
            } else if StanzaKind::of(&e) == Some(StanzaKind::Iq)
                && e.get_child("query", ns::REGISTER).is_some()
                && !tls_needed
            {
                let vhost = s.vhost.clone();
                let server = s.server.clone();
                let reply =
                    crate::modules::register::preauth(&server, &vhost, s.peer.ip(), &e).await;
                s.send(&reply).await?;
            } else {
                // RFC 6120 §6.4.1: nothing but negotiation before authentication.
                return Err(ConnError::stream(
                    StreamError::NotAuthorized,
                    if tls_needed {
                        "TLS is required: send <starttls/> first"
                    } else {
                        "authenticate first"
                    },
                ));
            }
        }
    }
}

/// Counts a failed exchange; too many close the stream (RFC 6120
/// §6.4.5). Refusals are bounded too, so a client cannot loop forever.
fn count_failure(
    s: &Stream,
    outcome: &SaslOutcome,
    failures: &mut u32,
    refusals: &mut u32,
) -> Result<(), ConnError> {
    match outcome {
        SaslOutcome::BadCredentials => *failures += 1,
        SaslOutcome::Refused => *refusals += 1,
        SaslOutcome::Success(..) => {}
    }
    if *failures >= s.server.config.auth.max_attempts_per_stream || *refusals > MAX_REFUSALS {
        return Err(ConnError::stream(
            StreamError::PolicyViolation,
            "too many failed authentication attempts",
        ));
    }
    Ok(())
}

async fn upgrade(s: &mut Stream) -> Result<(), ConnError> {
    let Io::Plain(tcp) = std::mem::replace(&mut s.io, Io::Upgrading) else {
        return Err(ConnError::stream(
            StreamError::UndefinedCondition,
            "TLS is already on",
        ));
    };
    let mut seen = crate::tls::Handshake::default();
    let tls = Box::pin(super::tls_io::accept(
        tcp,
        s.server.tls.c2s.clone(),
        &mut seen,
    ))
    .await?;
    s.cb = s.server.tls.bindings(tls.common(), seen);
    s.io = Io::Tls(Box::new(tls));
    s.counted.retransport(&s.server.metrics, s.io.kind());
    Ok(())
}

/// Decodes the base64 payload of `<auth/>` or `<response/>` (RFC 6120 §6.4.2: `=` is empty).
fn decode(e: &Element) -> Option<Vec<u8>> {
    let t = e.text_content();
    let t = t.trim();
    if t.is_empty() || t == "=" {
        return Some(Vec::new());
    }
    B64.decode(t).ok()
}

/// How a SASL exchange ended.
enum SaslOutcome {
    /// Authenticated, with the server's additional data (sent by the caller).
    Success(BareJid, Option<Vec<u8>>),
    /// Wrong credentials: counts towards the per-stream and per-address limits.
    BadCredentials,
    /// A protocol-level refusal (unknown mechanism, unsupported channel
    /// binding, abort): the client may try another mechanism; no delay.
    Refused,
}

/// One SASL exchange, in either profile. `initial` is the decoded
/// initial response (`None`: it was not valid base64).
async fn sasl(
    s: &mut Stream,
    wire: Wire,
    mechanism: Option<&str>,
    initial: Option<Vec<u8>>,
    plus_refused: &mut bool,
) -> Result<SaslOutcome, ConnError> {
    let offered = mechanisms(s);
    let Some(mech) = mechanism
        .and_then(Mechanism::from_name)
        .filter(|m| offered.contains(m))
    else {
        s.send(&wire.failure(SaslFailure::InvalidMechanism, None))
            .await?;
        return Ok(SaslOutcome::Refused);
    };
    // RFC 5802 §6: flag `y` after we offered -PLUS means someone stripped
    // -PLUS from our features, unless this client already tried -PLUS with
    // a binding type we lack (tls-unique, which TLS 1.3 does not have, as
    // slixmpp does). Such a client supports binding, just not ours: its `y`
    // is honest, and refusing it would leave it only PLAIN. Operators who
    // prefer the strict reading set `auth.strict_channel_binding`.
    let tolerate_y = *plus_refused && !s.server.config.auth.strict_channel_binding;
    let plus_offered = offered.iter().any(|m| matches!(m, Mechanism::ScramPlus(_))) && !tolerate_y;
    let mut nonce = [0u8; 18];
    rand::thread_rng().fill_bytes(&mut nonce);
    let mut session = ServerSession::new(mech, s.cb.clone(), plus_offered, B64.encode(nonce))
        .with_unknown_user_params(
            s.server.sasl_secret.clone(),
            s.server.config.auth.scram_iterations,
        );
    let Some(mut input) = initial else {
        s.send(&wire.failure(SaslFailure::IncorrectEncoding, None))
            .await?;
        return Ok(SaslOutcome::Refused);
    };
    let server = s.server.clone();
    // An account created through another node a moment ago is here too.
    server.cluster.read_barrier().await;
    let vhost = s.vhost.clone();
    let lookup = |username: &str, hash: HashAlg| credentials_of(&server, &vhost, username, hash);
    // Whether the client has proven anything yet: a failure before any
    // proof (a SCRAM client-first refused) is not a password guess.
    let mut proof_checked = mech == Mechanism::Plain;
    loop {
        // The failure delay runs from here, so the work of checking counts
        // against it rather than adding to it.
        let began = Instant::now();
        let step = if mech == Mechanism::Plain {
            // PLAIN derives the salted password (PBKDF2): off the workers.
            let (server, vhost, data) = (server.clone(), vhost.clone(), input.clone());
            let mut moved = session;
            let done = s
                .server
                .kdf
                .run(move || {
                    let lookup = |u: &str, h: HashAlg| credentials_of(&server, &vhost, u, h);
                    let step = moved.step(&data, &lookup);
                    (moved, step)
                })
                .await;
            let Some((back, step)) = done else {
                return Err(ConnError::stream(
                    StreamError::SystemShutdown,
                    "the node is shutting down",
                ));
            };
            session = back;
            step
        } else {
            session.step(&input, &lookup)
        };
        match step {
            Step::Challenge(data) => {
                s.send(&Element::new("challenge", wire.ns()).text(B64.encode(data)))
                    .await?;
                let e = next_element(s).await?;
                if e.is("abort", wire.ns()) {
                    s.send(&wire.failure(SaslFailure::Aborted, None)).await?;
                    return Ok(SaslOutcome::Refused);
                }
                if !e.is("response", wire.ns()) {
                    return Err(ConnError::stream(
                        StreamError::NotAuthorized,
                        "expected a SASL <response/>",
                    ));
                }
                proof_checked = true;
                match decode(&e) {
                    Some(d) => input = d,
                    None => {
                        s.send(&wire.failure(SaslFailure::IncorrectEncoding, None))
                            .await?;
                        return Ok(SaslOutcome::Refused);
                    }
                }
            }
            Step::Success {
                username,
                additional_data,
            } => {
                let jid = nodeprep(&username)
                    .ok()
                    .and_then(|n| BareJid::new(Some(&n), &s.vhost).ok());
                let Some(jid) = jid else {
                    s.send(&wire.failure(SaslFailure::NotAuthorized, None))
                        .await?;
                    return Ok(SaslOutcome::Refused);
                };
                if !quorum_or_refuse(s, wire).await? {
                    return Ok(SaslOutcome::Refused);
                }
                tracing::info!(user = %jid, peer = %s.peer, mechanism = mech.name(), "authenticated");
                s.server.metrics.login(mech.name());
                return Ok(SaslOutcome::Success(jid, additional_data));
            }
            Step::Failure { failure, username } => {
                if !proof_checked {
                    if matches!(mech, Mechanism::ScramPlus(_)) {
                        *plus_refused = true;
                    }
                    tracing::debug!(user = ?username, peer = %s.peer, mechanism = mech.name(), condition = failure.condition(), "SASL refused");
                    s.send(&wire.failure(failure, None)).await?;
                    return Ok(SaslOutcome::Refused);
                }
                // By the account as stored: case and width variants of
                // one name count together.
                let account = username
                    .as_deref()
                    .and_then(|u| nodeprep(u).ok())
                    .map(|n| format!("{n}@{}", s.vhost));
                failed_login(s, wire, failure, account.as_deref(), mech.name(), began).await?;
                return Ok(SaslOutcome::BadCredentials);
            }
        }
    }
}

/// DESIGN.md, partitions: a node cut off from the quorum cannot bind the
/// session, so the login fails now, plainly. Whether it may go on.
async fn quorum_or_refuse(s: &mut Stream, wire: Wire) -> Result<bool, ConnError> {
    if s.server.cluster.has_quorum() {
        return Ok(true);
    }
    let text = "this server cannot reach a majority of its cluster; try again shortly or another server address";
    s.send(&wire.failure(SaslFailure::TemporaryAuthFailure, Some(text)))
        .await?;
    Ok(false)
}

/// Answers wrong credentials after the delay the throttle asks for
/// (counted per address and per account).
async fn failed_login(
    s: &mut Stream,
    wire: Wire,
    failure: SaslFailure,
    account: Option<&str>,
    mechanism: &str,
    began: Instant,
) -> Result<(), ConnError> {
    let delay = s
        .server
        .throttle
        .fail_login(s.peer.ip(), account, Instant::now());
    tracing::info!(user = ?account, peer = %s.peer, mechanism, delay_ms = delay.as_millis() as u64, "authentication failed");
    s.server.metrics.auth_failure(mechanism);
    tokio::time::sleep_until((began + delay).into()).await;
    s.send(&wire.failure(failure, None)).await
}

/// A FAST login (XEP-0484): one message, checked against the stored
/// tokens of the client's user-agent id.
async fn fast(
    s: &mut Stream,
    mech: xmpp::fast::HtMechanism,
    initial: Option<Vec<u8>>,
    req: &mut sasl2::Request,
) -> Result<SaslOutcome, ConnError> {
    let began = Instant::now();
    let Some(initial) = initial else {
        s.send(&sasl2::failure(SaslFailure::IncorrectEncoding, None))
            .await?;
        return Ok(SaslOutcome::Refused);
    };
    // A token issued through another node a moment ago is here too.
    s.server.cluster.read_barrier().await;
    match sasl2::fast_login(s, mech, &initial, req) {
        sasl2::FastOutcome::Success { user, additional } => {
            if !quorum_or_refuse(s, Wire::Sasl2).await? {
                return Ok(SaslOutcome::Refused);
            }
            tracing::info!(%user, peer = %s.peer, mechanism = mech.name(), "authenticated");
            s.server.metrics.login(mech.name());
            Ok(SaslOutcome::Success(user, Some(additional)))
        }
        sasl2::FastOutcome::BadCredentials { account } => {
            let f = SaslFailure::NotAuthorized;
            failed_login(s, Wire::Sasl2, f, account.as_deref(), mech.name(), began).await?;
            Ok(SaslOutcome::BadCredentials)
        }
        sasl2::FastOutcome::Refused(f, text) => {
            s.send(&sasl2::failure(f, Some(text))).await?;
            Ok(SaslOutcome::Refused)
        }
    }
}

/// After a SASL2 success: tokens, inline resumption, Bind2, or (nothing
/// inline) `<success/>` followed by the features for RFC 6120 binding.
async fn sasl2_complete(
    s: &mut Stream,
    user: BareJid,
    mut req: sasl2::Request,
    additional: Option<Vec<u8>>,
) -> Result<Negotiated, ConnError> {
    let mut tokens = Vec::new();
    let server = s.server.clone();
    if let Some(agent) = req.agent.clone() {
        if req.invalidate {
            if let Some(t) = req.used_token.take() {
                sasl2::revoke_token(&server, &user, &agent, &t).await;
            }
        } else if let Some(m) = req.request_token.or(req.rotate) {
            if let Some(t) = sasl2::issue_token(&server, &user, &agent, m).await {
                tokens.push(t);
            }
        }
    }
    let with_tokens = |mut success: Element| {
        for t in &tokens {
            success = success.child(t.clone());
        }
        success
    };
    if let Some((previd, h)) = req.resume.take() {
        let found = s.server.resumable.find(&previd, &user);
        if let (Some(tx), Some(h)) = (found, h) {
            let success = with_tokens(sasl2::success(additional.as_deref(), &user.to_string()));
            return Ok(Negotiated::Resume {
                tx,
                h,
                sasl2: Some(success),
            });
        }
        if let Some(h) = h {
            if let Some(state) = super::moved::take(&server, &previd, &user, h).await {
                let success = with_tokens(sasl2::success(additional.as_deref(), &user.to_string()));
                return Ok(Negotiated::Migrated {
                    state: Box::new(state),
                    h,
                    sasl2: Some(success),
                });
            }
        }
        if req.bind.is_none() {
            // XEP-0198 §5: the client learns why, and binds anew.
            let success = with_tokens(sasl2::success(additional.as_deref(), &user.to_string()))
                .child(super::sm::failed("item-not-found"));
            s.send(&success).await?;
            return bind(s, user).await;
        }
    }
    match req.bind.take() {
        Some(bind) => {
            let jid = sasl2::resource(s, &user, &req, &bind)?;
            let max = s.server.config.limits.max_sessions_per_account;
            let others = other_sessions(s, &jid);
            if others >= max {
                let text = format!("{user} already has {others} sessions (at most {max})");
                s.send(&sasl2::failure(
                    SaslFailure::TemporaryAuthFailure,
                    Some(&text),
                ))
                .await?;
                return Err(ConnError::Closed);
            }
            let success = with_tokens(sasl2::success(additional.as_deref(), &jid.to_string()));
            Ok(Negotiated::Bound(Bound {
                jid,
                reply: BindReply::Sasl2 { success, bind },
            }))
        }
        None => {
            let success = with_tokens(sasl2::success(additional.as_deref(), &user.to_string()));
            s.send(&success).await?;
            bind(s, user).await
        }
    }
}

/// Sessions of the user other than on this resource, in the whole cluster.
fn other_sessions(s: &Stream, jid: &FullJid) -> usize {
    s.server.cluster.table.with_user(jid.bare(), |list| {
        list.iter()
            .filter(|(r, _)| r.as_str() != jid.resource())
            .count()
    })
}

/// The stored credentials of `username` (SASLprep'd) on `vhost`.
fn credentials_of(
    server: &crate::Server,
    vhost: &str,
    username: &str,
    hash: HashAlg,
) -> Option<xmpp::sasl::ScramCredentials> {
    let node = nodeprep(username).ok()?;
    let jid = BareJid::new(Some(&node), vhost).ok()?;
    server
        .store()
        .account(&jid)
        .ok()??
        .credentials(hash)
        .cloned()
}

/// The features after authentication, for a client that binds its
/// resource itself (RFC 6120 §7).
fn bind_features() -> Element {
    Element::new("features", ns::STREAM)
        .child(Element::new("bind", ns::BIND))
        // RFC 6121 is silent on it; RFC 3921 clients wait for it: offer it as optional.
        .child(Element::new("session", ns::SESSION).child(Element::new("optional", ns::SESSION)))
        // RFC 6121 §2.6.1: roster versioning.
        .child(Element::new("ver", crate::modules::ROSTERVER_FEATURE))
        // RFC 6121 §3.4.1: subscription pre-approval.
        .child(Element::new("sub", "urn:xmpp:features:pre-approval"))
        // XEP-0198: acknowledgements and resumption.
        .child(Element::new("sm", super::sm::NS))
        // XEP-0352: client state indication.
        .child(Element::new("csi", "urn:xmpp:csi:0"))
}

/// RFC 6120 §7: after the SASL restart, offer binding and wait for the
/// bind request (or a resumption).
async fn bind(s: &mut Stream, user: BareJid) -> Result<Negotiated, ConnError> {
    s.send(&bind_features()).await?;
    bind_loop(s, user).await
}

async fn bind_loop(s: &mut Stream, user: BareJid) -> Result<Negotiated, ConnError> {
    loop {
        let e = next_element(s).await?;
        if e.is("resume", super::sm::NS) {
            let found = e
                .get_attr("previd")
                .and_then(|id| s.server.resumable.find(id, &user));
            match (found, super::sm::h_of(&e)) {
                (Some(tx), Some(h)) => return Ok(Negotiated::Resume { tx, h, sasl2: None }),
                (None, Some(h)) if e.get_attr("previd").is_some() => {
                    // Perhaps on another node (a load balancer sent the
                    // new connection here): it hands the session over.
                    let previd = e.get_attr("previd").unwrap_or_default().to_owned();
                    let server = s.server.clone();
                    if let Some(state) = super::moved::take(&server, &previd, &user, h).await {
                        return Ok(Negotiated::Migrated {
                            state: Box::new(state),
                            h,
                            sasl2: None,
                        });
                    }
                    s.send(&super::sm::failed("item-not-found")).await?;
                    continue;
                }
                _ => {
                    // XEP-0198 §5: unknown or expired; the client binds anew.
                    s.send(&super::sm::failed("item-not-found")).await?;
                    continue;
                }
            }
        }
        if e.is("enable", super::sm::NS) {
            // XEP-0198 §3: only after binding.
            s.send(&super::sm::failed("unexpected-request")).await?;
            continue;
        }
        if StanzaKind::of(&e) != Some(StanzaKind::Iq) {
            return Err(ConnError::stream(
                StreamError::NotAuthorized,
                "bind a resource first",
            ));
        }
        let Some(request) = e.get_child("bind", ns::BIND) else {
            let reply = error_reply(&e, StanzaError::NotAllowed, Some("bind a resource first"));
            if let Some(r) = reply {
                s.send(&r).await?;
            }
            continue;
        };
        if IqType::of(&e) != Some(IqType::Set) {
            if let Some(r) = error_reply(&e, StanzaError::BadRequest, None) {
                s.send(&r).await?;
            }
            continue;
        }
        let wanted = request
            .child_text("resource", ns::BIND)
            .filter(|r| !r.trim().is_empty());
        let jid = match wanted {
            Some(r) => match resourceprep(r.trim()).and_then(|r| user.with_resource(&r)) {
                Ok(j) => j,
                Err(_) => {
                    // RFC 6120 §7.7.2.1: a resource that fails resourceprep.
                    if let Some(r) =
                        error_reply(&e, StanzaError::BadRequest, Some("invalid resource"))
                    {
                        s.send(&r).await?;
                    }
                    continue;
                }
            },
            None => {
                // RFC 6120 §7.6: the server generates a unique resource.
                let mut id = [0u8; 9];
                rand::thread_rng().fill_bytes(&mut id);
                let r = B64.encode(id).replace(['+', '/'], "x");
                match user.with_resource(&r) {
                    Ok(j) => j,
                    Err(_) => {
                        return Err(ConnError::stream(
                            StreamError::InternalServerError,
                            "cannot make a resource",
                        ))
                    }
                }
            }
        };
        // One account, at most so many sessions (in the whole cluster);
        // rebinding a resource that is online replaces it.
        let max = s.server.config.limits.max_sessions_per_account;
        let others = other_sessions(s, &jid);
        if others >= max {
            let text = format!("{user} already has {others} sessions (at most {max})");
            if let Some(r) = error_reply(&e, StanzaError::ResourceConstraint, Some(&text)) {
                s.send(&r).await?;
            }
            continue;
        }
        return Ok(Negotiated::Bound(Bound {
            jid,
            reply: BindReply::Iq(e),
        }));
    }
}

/// The result of a bind request (RFC 6120 §7.6.1).
pub fn bind_result(bind_iq: &Element, jid: &FullJid) -> Element {
    iq_result(bind_iq).child(
        Element::new("bind", ns::BIND).child(Element::new("jid", ns::BIND).text(jid.to_string())),
    )
}
