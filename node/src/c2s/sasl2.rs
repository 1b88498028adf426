//! SASL2 (XEP-0388) with Bind2 (XEP-0386) and FAST (XEP-0484): a phone
//! that reconnects authenticates, binds its resource (the same one each
//! time, from its user-agent id), enables or resumes stream management and
//! turns on carbons in one round trip, and with a FAST token it skips
//! PBKDF2 too.
//!
//! The exchange is SASL's own (the mechanisms of [`super::negotiate`]), in
//! SASL2's elements and without the stream restart; what is asked inline
//! is answered inside `<success/>`. FAST tokens are durable state: issued
//! and revoked through the cluster (`Command::FastIssue`/`FastRevoke`), so
//! a token works on every node, and a password change revokes them all.

use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD as B64, URL_SAFE_NO_PAD as B64URL};
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use xmpp::element::Element;
use xmpp::error::StreamError;
use xmpp::fast::{self, HtMechanism};
use xmpp::jid::{resourceprep, BareJid, FullJid};
use xmpp::sasl::SaslFailure;
use xmpp::stanza::ns;

use super::stream::{ConnError, Stream};
use crate::cluster::state_machine::Command;
use crate::store::FastToken;

pub const NS: &str = "urn:xmpp:sasl:2";
pub const BIND2: &str = "urn:xmpp:bind:0";
pub const FAST: &str = "urn:xmpp:fast:0";
const CARBONS: &str = "urn:xmpp:carbons:2";
const CSI: &str = "urn:xmpp:csi:0";

/// Longest user-agent id and Bind2 tag taken from a client.
const MAX_AGENT_ID: usize = 128;
const MAX_TAG: usize = 32;

/// What an `<authenticate/>` asks for besides authentication.
#[derive(Debug, Default)]
pub struct Request {
    /// `<user-agent id=…>`: which installation this is (a UUID).
    pub agent: Option<String>,
    /// Bind2's `<bind/>`.
    pub bind: Option<BindRequest>,
    /// Inline stream resumption (XEP-0198 §5 inside SASL2): previd and h.
    pub resume: Option<(String, Option<u32>)>,
    /// FAST: the client wants a token for this mechanism.
    pub request_token: Option<HtMechanism>,
    /// FAST: `<fast invalidate='true'/>`: the token used is to be forgotten.
    pub invalidate: bool,
    /// Set by a FAST login: the token used, when it is due for rotation.
    pub rotate: Option<HtMechanism>,
    /// Set by a FAST login: the token used.
    pub used_token: Option<String>,
}

/// Bind2's `<bind/>`: a tag naming the client, and what to enable.
#[derive(Debug, Default)]
pub struct BindRequest {
    pub tag: Option<String>,
    /// `Some(resume)` when stream management is to be enabled.
    pub sm: Option<bool>,
    pub carbons: bool,
    /// `<inactive xmlns='urn:xmpp:csi:0'/>`: start inactive (XEP-0352).
    pub inactive: bool,
}

/// Reads the parts of an `<authenticate/>` that are not SASL.
pub fn parse(e: &Element) -> Request {
    let mut r = Request {
        agent: e
            .get_child("user-agent", NS)
            .and_then(|u| u.get_attr("id"))
            .map(|id| id.trim().chars().take(MAX_AGENT_ID).collect::<String>())
            .filter(|id| !id.is_empty()),
        ..Request::default()
    };
    if let Some(b) = e.get_child("bind", BIND2) {
        r.bind = Some(BindRequest {
            tag: b
                .child_text("tag", BIND2)
                .map(|t| t.trim().chars().take(MAX_TAG).collect::<String>())
                .filter(|t| !t.is_empty()),
            sm: b
                .get_child("enable", super::sm::NS)
                .map(|en| matches!(en.get_attr("resume"), Some("true" | "1"))),
            carbons: b.get_child("enable", CARBONS).is_some(),
            inactive: b.get_child("inactive", CSI).is_some(),
        });
    }
    if let Some(res) = e.get_child("resume", super::sm::NS) {
        if let Some(id) = res.get_attr("previd") {
            r.resume = Some((id.to_owned(), super::sm::h_of(res)));
        }
    }
    r.request_token = e
        .get_child("request-token", FAST)
        .and_then(|t| t.get_attr("mechanism"))
        .and_then(HtMechanism::from_name);
    r.invalidate = e
        .get_child("fast", FAST)
        .is_some_and(|f| matches!(f.get_attr("invalidate"), Some("true" | "1")));
    r
}

/// The FAST mechanisms this connection can do: those whose channel
/// binding it has.
pub fn fast_mechanisms(s: &Stream) -> Vec<HtMechanism> {
    if !s.server.config.auth.fast {
        return Vec::new();
    }
    HtMechanism::ALL
        .into_iter()
        .filter(|m| m.binding_data(&s.cb).is_some())
        .collect()
}

/// `<authentication/>` for the pre-auth stream features (XEP-0388 §2.1):
/// the same mechanisms as SASL, and what may be asked inline.
pub fn feature(s: &Stream, mechanisms: &[xmpp::sasl::Mechanism]) -> Element {
    let mut auth = Element::new("authentication", NS);
    for m in mechanisms {
        auth = auth.child(Element::new("mechanism", NS).text(m.name()));
    }
    let bind_inline = Element::new("inline", BIND2)
        .child(Element::new("feature", BIND2).attr("var", super::sm::NS))
        .child(Element::new("feature", BIND2).attr("var", CARBONS))
        .child(Element::new("feature", BIND2).attr("var", CSI));
    let mut inline = Element::new("inline", NS)
        .child(Element::new("bind", BIND2).child(bind_inline))
        .child(Element::new("sm", super::sm::NS));
    let fast = fast_mechanisms(s);
    if !fast.is_empty() {
        let mut f = Element::new("fast", FAST);
        for m in fast {
            f = f.child(Element::new("mechanism", FAST).text(m.name()));
        }
        inline = inline.child(f);
    }
    auth.child(inline)
}

/// `<failure/>` of SASL2: a SASL condition, and text.
pub fn failure(f: SaslFailure, text: Option<&str>) -> Element {
    let mut e = Element::new("failure", NS).child(Element::new(f.condition(), ns::SASL));
    if let Some(t) = text {
        e = e.child(Element::new("text", NS).text(t));
    }
    e
}

/// `<success/>` of SASL2, before the inline answers are added.
pub fn success(additional: Option<&[u8]>, authzid: &str) -> Element {
    let mut e = Element::new("success", NS);
    if let Some(d) = additional {
        e = e.child(Element::new("additional-data", NS).text(B64.encode(d)));
    }
    e.child(Element::new("authorization-identifier", NS).text(authzid))
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}

/// The outcome of a FAST login.
pub enum FastOutcome {
    Success {
        user: BareJid,
        additional: Vec<u8>,
    },
    /// Unknown user, token or client, expired token, wrong proof.
    BadCredentials {
        account: Option<String>,
    },
    /// Not a FAST exchange this stream can run (no user-agent id, a
    /// binding this connection lacks, malformed data).
    Refused(SaslFailure, &'static str),
}

/// Checks a FAST (HT-*) initial response against the tokens of the
/// client's user-agent id. `req` learns which token was used.
pub fn fast_login(s: &Stream, mech: HtMechanism, initial: &[u8], req: &mut Request) -> FastOutcome {
    let Some(cb) = mech.binding_data(&s.cb).map(<[u8]>::to_vec) else {
        return FastOutcome::Refused(
            SaslFailure::InvalidMechanism,
            "this connection cannot provide that channel binding",
        );
    };
    let Some(agent) = req.agent.clone() else {
        return FastOutcome::Refused(
            SaslFailure::MalformedRequest,
            "FAST needs the <user-agent id=…/> the token was issued to",
        );
    };
    let Some((username, proof)) = fast::parse_initial(initial) else {
        return FastOutcome::Refused(SaslFailure::MalformedRequest, "malformed HT response");
    };
    let user = xmpp::jid::nodeprep(&username)
        .ok()
        .and_then(|n| BareJid::new(Some(&n), &s.vhost).ok());
    let Some(user) = user else {
        return FastOutcome::BadCredentials { account: None };
    };
    let account = Some(user.to_string());
    let Ok(held) = s.server.store().fast_tokens(&user.to_string(), &agent) else {
        return FastOutcome::BadCredentials { account };
    };
    let now = now_secs();
    // Newest first: after a rotation that is the one in use.
    let found = held
        .tokens
        .iter()
        .rev()
        // A token is good for the mechanism it was issued for only: one
        // bound to the channel cannot be replayed unbound.
        .find(|t| {
            t.expiry > now
                && t.mechanism == mech.name()
                && fast::verify(t.token.as_bytes(), &cb, proof)
        });
    let Some(t) = found else {
        return FastOutcome::BadCredentials { account };
    };
    let rotate_after = s.server.config.auth.fast_rotate_hours.saturating_mul(3600);
    if now.saturating_sub(t.issued) >= rotate_after {
        req.rotate = Some(mech);
    }
    req.used_token = Some(t.token.clone());
    FastOutcome::Success {
        user,
        additional: fast::responder(t.token.as_bytes(), &cb),
    }
}

/// Issues a FAST token for the client (replicated before the client sees
/// it); `None` when the cluster cannot commit it now, which costs the
/// client only the token, not the login.
pub async fn issue_token(
    server: &crate::Server,
    user: &BareJid,
    agent: &str,
    mech: HtMechanism,
) -> Option<Element> {
    let mut raw = [0u8; 32];
    rand::thread_rng().fill_bytes(&mut raw);
    let secret = format!("fast-{}", B64URL.encode(raw));
    let issued = now_secs();
    let days = server.config.auth.fast_token_days;
    let expiry = issued.saturating_add(days.saturating_mul(86_400));
    let cmd = Command::FastIssue {
        user: user.to_string(),
        agent: agent.to_owned(),
        token: FastToken {
            token: secret.clone(),
            mechanism: mech.name().to_owned(),
            issued,
            expiry,
        },
    };
    if let Err(e) = server.cluster.write(cmd).await {
        tracing::warn!(%user, error = %e, "cannot issue a FAST token");
        return None;
    }
    let stamp =
        crate::modules::offline::utc_stamp(UNIX_EPOCH + std::time::Duration::from_secs(expiry));
    Some(
        Element::new("token", FAST)
            .attr("expiry", stamp)
            .attr("token", secret),
    )
}

/// Forgets the token a client used with `<fast invalidate='true'/>`.
pub async fn revoke_token(server: &crate::Server, user: &BareJid, agent: &str, token: &str) {
    let cmd = Command::FastRevoke {
        user: user.to_string(),
        agent: Some(agent.to_owned()),
        token: Some(token.to_owned()),
    };
    if let Err(e) = server.cluster.write(cmd).await {
        tracing::warn!(%user, error = %e, "cannot revoke a FAST token");
    }
}

/// The resource Bind2 gives a client (XEP-0386 §3): its tag, and a
/// suffix that is stable for one user-agent id (so a reconnecting client
/// gets its resource back, and the old session is replaced) or random
/// without one.
pub fn resource(
    s: &Stream,
    user: &BareJid,
    req: &Request,
    bind: &BindRequest,
) -> Result<FullJid, ConnError> {
    let suffix = match &req.agent {
        Some(agent) => {
            // Keyed by the node's secret: the resource does not reveal the id.
            let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&s.server.sasl_secret)
                .expect("HMAC accepts keys of any length");
            m.update(user.to_string().as_bytes());
            m.update(b"\0");
            m.update(agent.as_bytes());
            let d = m.finalize().into_bytes();
            d.iter()
                .take(4)
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        }
        None => {
            let mut raw = [0u8; 4];
            rand::thread_rng().fill_bytes(&mut raw);
            raw.iter().map(|b| format!("{b:02x}")).collect()
        }
    };
    let tag = bind
        .tag
        .as_deref()
        .and_then(|t| resourceprep(t).ok())
        .filter(|t| !t.is_empty());
    let name = match tag {
        Some(t) => format!("{t}.{suffix}"),
        None => suffix,
    };
    user.with_resource(&name)
        .map_err(|_| ConnError::stream(StreamError::InternalServerError, "cannot make a resource"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn element(xml: &str) -> Element {
        xmpp::xml::parse_element(xml, "jabber:client").expect("well formed")
    }

    #[test]
    fn an_authenticate_with_everything_inline_is_read() {
        let e = element(
            "<authenticate xmlns='urn:xmpp:sasl:2' mechanism='HT-SHA-256-NONE'>\
             <initial-response>AA==</initial-response>\
             <user-agent id='d4565fa7-4d72-4749-b3d3-740edbf87770'><software>X</software></user-agent>\
             <bind xmlns='urn:xmpp:bind:0'><tag>Phone</tag>\
             <enable xmlns='urn:xmpp:carbons:2'/><enable xmlns='urn:xmpp:sm:3' resume='true'/>\
             <inactive xmlns='urn:xmpp:csi:0'/></bind>\
             <resume xmlns='urn:xmpp:sm:3' previd='abc' h='7'/>\
             <request-token xmlns='urn:xmpp:fast:0' mechanism='HT-SHA-256-EXPR'/>\
             <fast xmlns='urn:xmpp:fast:0' invalidate='true'/>\
             </authenticate>",
        );
        let r = parse(&e);
        assert_eq!(
            r.agent.as_deref(),
            Some("d4565fa7-4d72-4749-b3d3-740edbf87770")
        );
        let b = r.bind.expect("bind");
        assert_eq!(b.tag.as_deref(), Some("Phone"));
        assert_eq!(b.sm, Some(true));
        assert!(b.carbons && b.inactive);
        assert_eq!(r.resume, Some(("abc".into(), Some(7))));
        assert_eq!(
            r.request_token,
            Some(HtMechanism(xmpp::fast::HtBinding::Exporter))
        );
        assert!(r.invalidate);
    }

    #[test]
    fn a_bare_authenticate_asks_for_nothing_inline() {
        let e = element("<authenticate xmlns='urn:xmpp:sasl:2' mechanism='PLAIN'/>");
        let r = parse(&e);
        assert!(r.agent.is_none() && r.bind.is_none() && r.resume.is_none());
        assert!(r.request_token.is_none() && !r.invalidate);
    }
}
