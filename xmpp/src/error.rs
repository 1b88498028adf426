//! Stream errors (RFC 6120 §4.9) and stanza errors (RFC 6120 §8.3).

use crate::element::Element;
use crate::stanza::ns;

/// The defined stream error conditions (RFC 6120 §4.9.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StreamError {
    BadFormat,
    BadNamespacePrefix,
    Conflict,
    ConnectionTimeout,
    HostGone,
    HostUnknown,
    ImproperAddressing,
    InternalServerError,
    InvalidFrom,
    InvalidNamespace,
    InvalidXml,
    NotAuthorized,
    NotWellFormed,
    PolicyViolation,
    RemoteConnectionFailed,
    Reset,
    ResourceConstraint,
    RestrictedXml,
    SeeOtherHost,
    SystemShutdown,
    UndefinedCondition,
    UnsupportedEncoding,
    UnsupportedFeature,
    UnsupportedStanzaType,
    UnsupportedVersion,
}

impl StreamError {
    /// The element name of the condition, as RFC 6120 spells it.
    pub fn condition(self) -> &'static str {
        use StreamError::*;
        match self {
            BadFormat => "bad-format",
            BadNamespacePrefix => "bad-namespace-prefix",
            Conflict => "conflict",
            ConnectionTimeout => "connection-timeout",
            HostGone => "host-gone",
            HostUnknown => "host-unknown",
            ImproperAddressing => "improper-addressing",
            InternalServerError => "internal-server-error",
            InvalidFrom => "invalid-from",
            InvalidNamespace => "invalid-namespace",
            InvalidXml => "invalid-xml",
            NotAuthorized => "not-authorized",
            NotWellFormed => "not-well-formed",
            PolicyViolation => "policy-violation",
            RemoteConnectionFailed => "remote-connection-failed",
            Reset => "reset",
            ResourceConstraint => "resource-constraint",
            RestrictedXml => "restricted-xml",
            SeeOtherHost => "see-other-host",
            SystemShutdown => "system-shutdown",
            UndefinedCondition => "undefined-condition",
            UnsupportedEncoding => "unsupported-encoding",
            UnsupportedFeature => "unsupported-feature",
            UnsupportedStanzaType => "unsupported-stanza-type",
            UnsupportedVersion => "unsupported-version",
        }
    }

    /// `<stream:error>` with this condition and an optional human text,
    /// serialized for a stream whose `stream` prefix is bound.
    pub fn to_xml(self, text: Option<&str>) -> String {
        let mut s = String::from("<stream:error><");
        s.push_str(self.condition());
        s.push_str(" xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>");
        if let Some(t) = text {
            s.push_str("<text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>");
            crate::element::escape_into(&mut s, t, false);
            s.push_str("</text>");
        }
        s.push_str("</stream:error>");
        s
    }
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.condition())
    }
}

/// The error type attribute of a stanza error (RFC 6120 §8.3.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    Auth,
    Cancel,
    Continue,
    Modify,
    Wait,
}

impl ErrorType {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorType::Auth => "auth",
            ErrorType::Cancel => "cancel",
            ErrorType::Continue => "continue",
            ErrorType::Modify => "modify",
            ErrorType::Wait => "wait",
        }
    }
}

/// The defined stanza error conditions (RFC 6120 §8.3.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StanzaError {
    BadRequest,
    Conflict,
    FeatureNotImplemented,
    Forbidden,
    Gone,
    InternalServerError,
    ItemNotFound,
    JidMalformed,
    NotAcceptable,
    NotAllowed,
    NotAuthorized,
    PolicyViolation,
    RecipientUnavailable,
    Redirect,
    RegistrationRequired,
    RemoteServerNotFound,
    RemoteServerTimeout,
    ResourceConstraint,
    ServiceUnavailable,
    SubscriptionRequired,
    UndefinedCondition,
    UnexpectedRequest,
}

impl StanzaError {
    pub fn condition(self) -> &'static str {
        use StanzaError::*;
        match self {
            BadRequest => "bad-request",
            Conflict => "conflict",
            FeatureNotImplemented => "feature-not-implemented",
            Forbidden => "forbidden",
            Gone => "gone",
            InternalServerError => "internal-server-error",
            ItemNotFound => "item-not-found",
            JidMalformed => "jid-malformed",
            NotAcceptable => "not-acceptable",
            NotAllowed => "not-allowed",
            NotAuthorized => "not-authorized",
            PolicyViolation => "policy-violation",
            RecipientUnavailable => "recipient-unavailable",
            Redirect => "redirect",
            RegistrationRequired => "registration-required",
            RemoteServerNotFound => "remote-server-not-found",
            RemoteServerTimeout => "remote-server-timeout",
            ResourceConstraint => "resource-constraint",
            ServiceUnavailable => "service-unavailable",
            SubscriptionRequired => "subscription-required",
            UndefinedCondition => "undefined-condition",
            UnexpectedRequest => "unexpected-request",
        }
    }

    /// The error type RFC 6120 §8.3.3 gives for each condition.
    pub fn default_type(self) -> ErrorType {
        use StanzaError::*;
        match self {
            BadRequest | JidMalformed | NotAcceptable | PolicyViolation | Redirect => {
                ErrorType::Modify
            }
            Forbidden | NotAuthorized | RegistrationRequired | SubscriptionRequired => {
                ErrorType::Auth
            }
            RecipientUnavailable | RemoteServerTimeout | ResourceConstraint
            | InternalServerError => ErrorType::Wait,
            _ => ErrorType::Cancel,
        }
    }

    /// The `<error/>` child for a stanza error, with optional text.
    pub fn to_element(self, text: Option<&str>) -> Element {
        let mut e = Element::new("error", ns::CLIENT)
            .attr("type", self.default_type().as_str())
            .child(Element::new(self.condition(), ns::STANZAS));
        if let Some(t) = text {
            e = e.child(Element::new("text", ns::STANZAS).text(t));
        }
        e
    }

    /// Reads the condition out of an `<error/>` element.
    pub fn from_element(error: &Element) -> Option<StanzaError> {
        use StanzaError::*;
        const ALL: [StanzaError; 22] = [
            BadRequest,
            Conflict,
            FeatureNotImplemented,
            Forbidden,
            Gone,
            InternalServerError,
            ItemNotFound,
            JidMalformed,
            NotAcceptable,
            NotAllowed,
            NotAuthorized,
            PolicyViolation,
            RecipientUnavailable,
            Redirect,
            RegistrationRequired,
            RemoteServerNotFound,
            RemoteServerTimeout,
            ResourceConstraint,
            ServiceUnavailable,
            SubscriptionRequired,
            UndefinedCondition,
            UnexpectedRequest,
        ];
        let child = error
            .elements()
            .find(|c| c.ns == ns::STANZAS && c.name != "text")?;
        ALL.into_iter().find(|c| c.condition() == child.name)
    }
}

impl std::fmt::Display for StanzaError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.condition())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_error_serializes_with_condition_and_text() {
        let x = StreamError::NotWellFormed.to_xml(Some("bad <tag>"));
        assert_eq!(
            x,
            "<stream:error><not-well-formed xmlns='urn:ietf:params:xml:ns:xmpp-streams'/>\
             <text xmlns='urn:ietf:params:xml:ns:xmpp-streams'>bad &lt;tag&gt;</text></stream:error>"
        );
    }

    #[test]
    fn stanza_error_round_trips_and_has_rfc_type() {
        let e = StanzaError::ServiceUnavailable.to_element(None);
        assert_eq!(e.get_attr("type"), Some("cancel"));
        assert_eq!(
            StanzaError::from_element(&e),
            Some(StanzaError::ServiceUnavailable)
        );
        assert_eq!(StanzaError::NotAuthorized.default_type(), ErrorType::Auth);
        assert_eq!(StanzaError::BadRequest.default_type(), ErrorType::Modify);
    }
}
