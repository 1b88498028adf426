//! External Service Discovery (XEP-0215, `urn:xmpp:extdisco:2`): the STUN
//! and TURN servers clients use for calls, with TURN credentials valid
//! for a while (the TURN REST scheme coturn's `static-auth-secret`
//! checks: user name `EXPIRY:JID`, password base64(HMAC-SHA1(secret, name))).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac as _};
use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::stanza::iq_result;

use super::{iq_error, BoxFuture, IqRequest, IqTarget, Module};
use crate::config::ExtService;
use crate::modules::offline::utc_stamp;
use crate::Server;

pub const NS: &str = "urn:xmpp:extdisco:2";

pub struct ExtDisco;

/// The `<service/>` element for `user`, with fresh credentials where the
/// service has a shared secret.
pub fn service(s: &ExtService, user: &str, now: SystemTime) -> Element {
    let mut e = Element::new("service", NS)
        .attr("type", s.kind.as_str())
        .attr("host", s.host.as_str())
        .attr("port", s.port.to_string())
        .attr("transport", s.transport.as_str());
    if let Some(secret) = &s.secret {
        let expires = now + Duration::from_secs(s.ttl_secs);
        let expiry = expires
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let username = format!("{expiry}:{user}");
        let Ok(mut mac) = Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()) else {
            return e;
        };
        mac.update(username.as_bytes());
        let password = B64.encode(mac.finalize().into_bytes());
        e = e
            .attr("restricted", "1")
            .attr("username", username)
            .attr("password", password)
            .attr("expires", utc_stamp(expires));
    }
    e
}

impl Module for ExtDisco {
    fn name(&self) -> &'static str {
        "extdisco"
    }

    fn handles(&self, namespace: &str, target: &IqTarget) -> bool {
        namespace == NS && matches!(target, IqTarget::Server(_))
    }

    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }

    fn handle_iq<'a>(
        &'a self,
        server: &'a Server,
        req: IqRequest<'a>,
    ) -> BoxFuture<'a, Option<Element>> {
        Box::pin(async move {
            // Our own users only: credentials are not for passers-by.
            if req.is_set() || !server.config.is_local_domain(req.from.domain()) {
                return Some(iq_error(req.iq, StanzaError::Forbidden, None));
            }
            let wanted = req.payload.get_attr("type");
            let user = req.from.bare().to_string();
            let now = SystemTime::now();
            let mut out = Element::new(req.payload.name.clone(), NS);
            if let Some(t) = wanted {
                out = out.attr("type", t);
            }
            for s in &server.config.extdisco {
                if wanted.is_none_or(|t| t == s.kind) {
                    out = out.child(service(s, &user, now));
                }
            }
            Some(iq_result(req.iq).child(out))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn turn_credentials_follow_the_rest_scheme() {
        let s = ExtService {
            kind: "turn".into(),
            host: "turn.example.com".into(),
            port: 3478,
            transport: "udp".into(),
            secret: Some("north".into()),
            ttl_secs: 3600,
        };
        let e = service(
            &s,
            "alice@example.com",
            UNIX_EPOCH + Duration::from_secs(1_700_000_000),
        );
        assert_eq!(e.get_attr("username"), Some("1700003600:alice@example.com"));
        // base64(HMAC-SHA1("north", "1700003600:alice@example.com")),
        // computed independently with Python's hmac module.
        assert_eq!(e.get_attr("password"), Some("VRPQNhy7K5wsWYjKwNdXCKp+sPA="));
        assert_eq!(e.get_attr("restricted"), Some("1"));
        assert_eq!(e.get_attr("expires"), Some("2023-11-14T23:13:20.000Z"));
    }
}
