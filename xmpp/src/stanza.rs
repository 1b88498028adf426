//! Typed views over the three stanza kinds, the namespaces we speak, and
//! error replies built from a request (RFC 6120 §8.3.1).

use crate::element::Element;
use crate::error::StanzaError;

/// Namespace URIs, by the name the specs use.
pub mod ns {
    pub const CLIENT: &str = "jabber:client";
    pub const SERVER: &str = "jabber:server";
    pub const STREAM: &str = "http://etherx.jabber.org/streams";
    pub const STREAMS: &str = "urn:ietf:params:xml:ns:xmpp-streams";
    pub const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
    pub const TLS: &str = "urn:ietf:params:xml:ns:xmpp-tls";
    pub const SASL: &str = "urn:ietf:params:xml:ns:xmpp-sasl";
    pub const BIND: &str = "urn:ietf:params:xml:ns:xmpp-bind";
    pub const SESSION: &str = "urn:ietf:params:xml:ns:xmpp-session";
    pub const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";
    pub const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
    pub const PING: &str = "urn:xmpp:ping";
    pub const VERSION: &str = "jabber:iq:version";
    pub const REGISTER: &str = "jabber:iq:register";
    pub const REGISTER_FEATURE: &str = "http://jabber.org/features/iq-register";
    pub const ROSTER: &str = "jabber:iq:roster";
    pub const DELAY: &str = "urn:xmpp:delay";
    pub const SASL_CB: &str = "urn:xmpp:sasl-cb:0";
    pub const OFFLINE: &str = "msgoffline";
}

/// Which stanza an element is, if any.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StanzaKind {
    Message,
    Presence,
    Iq,
}

impl StanzaKind {
    /// Classifies a top-level element of a `jabber:client`/`jabber:server` stream.
    pub fn of(e: &Element) -> Option<StanzaKind> {
        if e.ns != ns::CLIENT && e.ns != ns::SERVER {
            return None;
        }
        match e.name.as_str() {
            "message" => Some(StanzaKind::Message),
            "presence" => Some(StanzaKind::Presence),
            "iq" => Some(StanzaKind::Iq),
            _ => None,
        }
    }
}

/// Message types (RFC 6121 §5.2.2); an absent or unknown type is `normal`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageType {
    Chat,
    Error,
    Groupchat,
    Headline,
    Normal,
}

impl MessageType {
    pub fn of(e: &Element) -> MessageType {
        match e.get_attr("type") {
            Some("chat") => MessageType::Chat,
            Some("error") => MessageType::Error,
            Some("groupchat") => MessageType::Groupchat,
            Some("headline") => MessageType::Headline,
            _ => MessageType::Normal,
        }
    }
}

/// IQ types (RFC 6120 §8.2.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IqType {
    Get,
    Set,
    Result,
    Error,
}

impl IqType {
    pub fn of(e: &Element) -> Option<IqType> {
        match e.get_attr("type")? {
            "get" => Some(IqType::Get),
            "set" => Some(IqType::Set),
            "result" => Some(IqType::Result),
            "error" => Some(IqType::Error),
            _ => None,
        }
    }

    pub fn is_request(self) -> bool {
        matches!(self, IqType::Get | IqType::Set)
    }
}

/// Presence types (RFC 6121 §4.7.1); no type attribute means available.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresenceType {
    Available,
    Unavailable,
    Subscribe,
    Subscribed,
    Unsubscribe,
    Unsubscribed,
    Probe,
    Error,
}

impl PresenceType {
    /// `None` for a type RFC 6121 does not define (a `bad-request`).
    pub fn of(e: &Element) -> Option<PresenceType> {
        Some(match e.get_attr("type") {
            None => PresenceType::Available,
            Some("unavailable") => PresenceType::Unavailable,
            Some("subscribe") => PresenceType::Subscribe,
            Some("subscribed") => PresenceType::Subscribed,
            Some("unsubscribe") => PresenceType::Unsubscribe,
            Some("unsubscribed") => PresenceType::Unsubscribed,
            Some("probe") => PresenceType::Probe,
            Some("error") => PresenceType::Error,
            Some(_) => return None,
        })
    }
}

/// The `<priority/>` of a presence, clamped to -128..=127; 0 when absent
/// or unparsable (RFC 6121 §4.7.2.3).
pub fn presence_priority(e: &Element) -> i8 {
    e.child_text("priority", &e.ns)
        .and_then(|t| t.trim().parse::<i32>().ok())
        .map(|p| p.clamp(-128, 127) as i8)
        .unwrap_or(0)
}

/// The first child element of an IQ: its payload, which names what is asked.
pub fn iq_payload(iq: &Element) -> Option<&Element> {
    iq.elements().next()
}

/// Builds the error reply to `request` (RFC 6120 §8.3.1): `to`/`from`
/// swapped, `type='error'`, the original payload kept, an `<error/>` added.
/// Returns `None` for an error stanza, which must never be answered with
/// another error (§8.3.1, avoiding loops).
pub fn error_reply(
    request: &Element,
    condition: StanzaError,
    text: Option<&str>,
) -> Option<Element> {
    if request.get_attr("type") == Some("error") {
        return None;
    }
    let mut reply = Element::new(request.name.clone(), request.ns.clone());
    if let Some(id) = request.get_attr("id") {
        reply.set_attr("id", id);
    }
    if let Some(from) = request.get_attr("from") {
        reply.set_attr("to", from);
    }
    if let Some(to) = request.get_attr("to") {
        reply.set_attr("from", to);
    }
    reply.set_attr("type", "error");
    // Keep the payload for IQs (so the requester sees what failed); for
    // messages and presence, the error alone is enough and avoids
    // echoing a large body back.
    if request.name == "iq" {
        if let Some(p) = iq_payload(request) {
            reply
                .children
                .push(crate::element::Node::Element(p.clone()));
        }
    }
    let mut err = condition.to_element(text);
    err.ns = request.ns.clone();
    reply.children.push(crate::element::Node::Element(err));
    Some(reply)
}

/// An empty `type='result'` reply to an IQ request.
pub fn iq_result(request: &Element) -> Element {
    let mut reply = Element::new("iq", request.ns.clone()).attr("type", "result");
    if let Some(id) = request.get_attr("id") {
        reply.set_attr("id", id);
    }
    if let Some(from) = request.get_attr("from") {
        reply.set_attr("to", from);
    }
    if let Some(to) = request.get_attr("to") {
        reply.set_attr("from", to);
    }
    reply
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reply_swaps_addresses_and_keeps_iq_payload() {
        let req = Element::new("iq", ns::CLIENT)
            .attr("id", "q1")
            .attr("type", "get")
            .attr("from", "a@x/r")
            .attr("to", "x")
            .child(Element::new("query", "urn:unknown"));
        let r = error_reply(&req, StanzaError::ServiceUnavailable, None).expect("reply");
        assert_eq!(r.get_attr("type"), Some("error"));
        assert_eq!(r.get_attr("to"), Some("a@x/r"));
        assert_eq!(r.get_attr("from"), Some("x"));
        assert_eq!(r.get_attr("id"), Some("q1"));
        assert!(r.has_child("query", "urn:unknown"));
        let err = r.get_child("error", ns::CLIENT).expect("error child");
        assert!(err.has_child("service-unavailable", ns::STANZAS));
    }

    #[test]
    fn errors_are_never_answered_with_errors() {
        let req = Element::new("message", ns::CLIENT).attr("type", "error");
        assert!(error_reply(&req, StanzaError::ServiceUnavailable, None).is_none());
    }

    #[test]
    fn priority_is_clamped_and_defaults_to_zero() {
        let p = |t: &str| {
            presence_priority(
                &Element::new("presence", ns::CLIENT)
                    .child(Element::new("priority", ns::CLIENT).text(t)),
            )
        };
        assert_eq!(p("10"), 10);
        assert_eq!(p("-5"), -5);
        assert_eq!(p("1000"), 127);
        assert_eq!(p("junk"), 0);
        assert_eq!(presence_priority(&Element::new("presence", ns::CLIENT)), 0);
    }
}
