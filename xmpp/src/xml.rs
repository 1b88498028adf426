//! Incremental XMPP stream parser. STUB: API only, being implemented.

use crate::element::Element;
use crate::error::StreamError;

/// Limits enforced while parsing; values come from the node's config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest top-level element (stanza) in bytes, as received.
    pub max_stanza_bytes: usize,
    /// Deepest nesting inside a stanza (the stanza itself is depth 1).
    pub max_depth: usize,
    /// Most attributes on one element.
    pub max_attrs: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_bytes: 256 * 1024,
            max_depth: 32,
            max_attrs: 64,
        }
    }
}

/// The attributes of a `<stream:stream>` open tag.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StreamHeader {
    pub to: Option<String>,
    pub from: Option<String>,
    pub id: Option<String>,
    pub version: Option<String>,
    pub lang: Option<String>,
    /// The default namespace declared on the root (`jabber:client`, `jabber:server`).
    pub default_ns: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    StreamOpen(StreamHeader),
    Element(Element),
    StreamClose,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum XmlError {
    #[error("not well-formed: {0}")]
    NotWellFormed(String),
    #[error("restricted XML: {0}")]
    RestrictedXml(String),
    #[error("policy violation: {0}")]
    PolicyViolation(String),
    #[error("invalid namespace: {0}")]
    InvalidNamespace(String),
    #[error("bad namespace prefix: {0}")]
    BadNamespacePrefix(String),
}

impl XmlError {
    pub fn stream_error(&self) -> StreamError {
        match self {
            XmlError::NotWellFormed(_) => StreamError::NotWellFormed,
            XmlError::RestrictedXml(_) => StreamError::RestrictedXml,
            XmlError::PolicyViolation(_) => StreamError::PolicyViolation,
            XmlError::InvalidNamespace(_) => StreamError::InvalidNamespace,
            XmlError::BadNamespacePrefix(_) => StreamError::BadNamespacePrefix,
        }
    }
}

pub struct StreamParser {
    _limits: Limits,
}

impl StreamParser {
    pub fn new(limits: Limits) -> Self {
        StreamParser { _limits: limits }
    }
    pub fn feed(&mut self, _bytes: &[u8]) {
        todo!()
    }
    pub fn next_event(&mut self) -> Result<Option<Event>, XmlError> {
        todo!()
    }
    pub fn reset(&mut self) {
        todo!()
    }
    pub fn discard_buffer(&mut self) {
        todo!()
    }
    pub fn buffered(&self) -> usize {
        todo!()
    }
}

pub fn parse_element(_xml: &str, _default_ns: &str) -> Result<Element, XmlError> {
    todo!()
}
