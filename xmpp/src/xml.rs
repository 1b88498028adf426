//! Incremental XMPP stream parser.
//!
//! An XMPP stream (RFC 6120 §4) is one long XML document whose root element,
//! `<stream:stream>`, stays open for the life of the connection; the
//! interesting units are its children ("first-level elements", §4.1).
//!
//! The parser works in two layers:
//!
//! 1. A hand-written **framer** scans the bytes as they arrive and only
//!    tracks enough lexical state (tags, quotes, CDATA, depth) to find where
//!    the stream header ends and where each first-level element ends. It
//!    keeps its position and state between calls, so a stanza trickling in one
//!    byte at a time is still scanned once. It also enforces the size limit
//!    while an element is still incomplete, and rejects what RFC 6120 §11.1
//!    forbids (comments, processing instructions, DTDs) as soon as it sees it.
//! 2. Each complete slice is handed to `quick_xml::Reader` (over the
//!    in-memory slice), and the events are turned into an owned [`Element`]
//!    with namespaces resolved against the declarations in scope, including
//!    those made on the stream root.

use std::borrow::Cow;

use quick_xml::events::{BytesStart, Event as XmlEvent};
use quick_xml::Reader;

use crate::element::{Element, Node};
use crate::error::StreamError;
use crate::stanza::ns;

/// The namespace bound to the `xml` prefix by definition (Namespaces in XML §3).
const XML_NS: &str = "http://www.w3.org/XML/1998/namespace";

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

fn not_well_formed(msg: impl Into<String>) -> XmlError {
    XmlError::NotWellFormed(msg.into())
}

fn restricted(msg: impl Into<String>) -> XmlError {
    XmlError::RestrictedXml(msg.into())
}

/// Where the stream as a whole is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the `<stream:stream>` open tag (after start or `reset`).
    Prolog,
    /// Inside the stream root: first-level elements follow.
    Stream,
    /// `</stream:stream>` was seen; nothing more is parsed.
    Closed,
}

/// The framer's lexical state at the scan position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    /// Character data (or inter-stanza whitespace at depth 0).
    Text,
    /// Just after `<`.
    Lt,
    /// Inside a start tag; `quote` is the open quote byte (0 outside a
    /// value), `slash` whether the previous byte was a `/` (self-closing).
    StartTag { quote: u8, slash: bool },
    /// Inside an end tag.
    EndTag,
    /// After `<!`, with this many bytes of `[CDATA[` matched.
    Bang(u8),
    /// Inside a CDATA section, with this many consecutive `]` just seen.
    CData(u8),
    /// Inside `<?…?>` in the prolog; whether the previous byte was `?`.
    Decl(bool),
}

/// A complete unit found by the framer; it always starts at `StreamParser::start`
/// and ends (exclusive) at the given offset.
enum Frame {
    Header { end: usize, self_closing: bool },
    Stanza { end: usize },
    Close { end: usize },
}

const CDATA_OPEN: &[u8; 7] = b"[CDATA[";

/// Buffers bytes from the wire and yields stream events.
pub struct StreamParser {
    limits: Limits,
    buf: Vec<u8>,
    /// Offset of the first unconsumed byte in `buf`.
    start: usize,
    /// Offset of the next byte the framer has not looked at (`>= start`).
    scan: usize,
    lex: Lex,
    /// Element depth inside the stream root: 0 between stanzas.
    depth: usize,
    /// Where the name of the tag being scanned begins, relative to `start`.
    tag: usize,
    /// The names of the elements open inside the current stanza, as
    /// (offset relative to `start`, length): an end tag that does not match
    /// its start tag fails when it arrives, not when the stanza would end.
    open: Vec<(usize, usize)>,
    phase: Phase,
    seen_decl: bool,
    /// A self-closed `<stream:stream/>` still owes a `StreamClose`.
    pending_close: bool,
    /// Namespace declarations made on the stream root (prefix, uri); prefix
    /// "" is the default namespace. In scope for every stanza.
    root_scope: Vec<(String, String)>,
    /// The root's qualified name, which `</…>` must repeat.
    root_qname: String,
    /// After an error the stream is dead; keep reporting the same error.
    failed: Option<XmlError>,
}

/// Buffers that grew this large for one big stanza are given back once empty,
/// so an idle connection does not pin the memory of its largest stanza.
const SHRINK_ABOVE: usize = 64 * 1024;
const SHRINK_TO: usize = 8 * 1024;

impl StreamParser {
    pub fn new(limits: Limits) -> Self {
        StreamParser {
            limits,
            buf: Vec::new(),
            start: 0,
            scan: 0,
            lex: Lex::Text,
            depth: 0,
            tag: 0,
            open: Vec::new(),
            phase: Phase::Prolog,
            seen_decl: false,
            pending_close: false,
            root_scope: Vec::new(),
            root_qname: String::new(),
            failed: None,
        }
    }

    /// Appends bytes received from the peer.
    pub fn feed(&mut self, bytes: &[u8]) {
        // Drop consumed bytes before growing. Compacting only once at least
        // half the buffer is consumed keeps the copying amortised O(1) per byte.
        if self.start == self.buf.len() {
            self.buf.clear();
            if self.buf.capacity() > SHRINK_ABOVE {
                self.buf.shrink_to(SHRINK_TO);
            }
            self.scan = 0;
            self.start = 0;
        } else if self.start > 0 && self.start >= self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.scan -= self.start;
            self.start = 0;
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The next complete event, `Ok(None)` if more bytes are needed.
    pub fn next_event(&mut self) -> Result<Option<Event>, XmlError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let result = self.next_event_inner();
        if let Err(e) = &result {
            self.failed = Some(e.clone());
        }
        result
    }

    /// Forgets the stream root (RFC 6120 §4.3.3: after STARTTLS and SASL
    /// success both sides start a new stream) but keeps buffered bytes, since
    /// the peer may already have pipelined the new header.
    pub fn reset(&mut self) {
        // Bytes after `start` may have been scanned as part of the old stream
        // (e.g. the new header taken for a stanza start); rescan them.
        self.scan = self.start;
        self.lex = Lex::Text;
        self.depth = 0;
        self.open.clear();
        self.phase = Phase::Prolog;
        self.seen_decl = false;
        self.pending_close = false;
        self.root_scope.clear();
        self.root_qname.clear();
        // `failed` is kept: a stream that broke stays broken.
    }

    /// Whether the parser waits for a stream header (at the start, or after
    /// [`reset`](Self::reset)): framed transports open and restart streams
    /// with elements of their own, allowed only then.
    pub fn awaiting_header(&self) -> bool {
        matches!(self.phase, Phase::Prolog)
    }

    /// Drops every buffered, unparsed byte. Used when the TLS layer starts:
    /// anything received in plaintext after `<starttls/>` must not be
    /// processed as if it came over TLS (RFC 6120 §5.3.4, injection attacks).
    pub fn discard_buffer(&mut self) {
        self.buf.clear();
        self.start = 0;
        self.scan = 0;
        self.lex = Lex::Text;
        // A partially received stanza went with the bytes.
        self.depth = 0;
        self.open.clear();
    }

    /// Frees the buffer if everything in it has been consumed. An idle
    /// connection then holds no parse buffer at all; the next `feed`
    /// allocates again. Servers call this before waiting on a quiet socket.
    pub fn release_memory(&mut self) {
        if self.start == self.buf.len() {
            self.buf = Vec::new();
            self.start = 0;
            self.scan = 0;
        }
    }

    /// Whether [`next_event`](Self::next_event) may have something to say
    /// without more input: bytes not yet consumed, or a close to report.
    pub fn has_pending(&self) -> bool {
        self.pending_close || self.buffered() > 0
    }

    /// Number of received bytes not yet consumed by an event.
    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    fn next_event_inner(&mut self) -> Result<Option<Event>, XmlError> {
        if self.pending_close {
            self.pending_close = false;
            self.phase = Phase::Closed;
            return Ok(Some(Event::StreamClose));
        }
        if self.phase == Phase::Closed {
            return Ok(None);
        }
        let Some(frame) = self.scan()? else {
            return Ok(None);
        };
        match frame {
            Frame::Header { end, self_closing } => {
                let text = as_xml_str(&self.buf[self.start..end])?;
                let root = parse_header(text, &self.limits)?;
                self.root_scope = root.scope;
                // Kept for the stream's life: no spare room.
                self.root_scope.shrink_to_fit();
                self.root_qname = root.qname;
                self.phase = Phase::Stream;
                self.depth = 0;
                self.start = end;
                self.pending_close = self_closing;
                Ok(Some(Event::StreamOpen(root.header)))
            }
            Frame::Stanza { end } => {
                let text = as_xml_str(&self.buf[self.start..end])?;
                let element = build_element(text, &self.root_scope, &self.limits)?;
                self.start = end;
                Ok(Some(Event::Element(element)))
            }
            Frame::Close { end } => {
                // `</` name whitespace? `>`
                let name = self.buf[self.start + 2..end - 1].trim_ascii_end();
                if name != self.root_qname.as_bytes() {
                    return Err(not_well_formed(format!(
                        "end tag '{}' does not match the stream root '{}'",
                        String::from_utf8_lossy(name),
                        self.root_qname
                    )));
                }
                self.start = end;
                self.phase = Phase::Closed;
                Ok(Some(Event::StreamClose))
            }
        }
    }

    /// Advances the framer over newly buffered bytes until a unit completes.
    fn scan(&mut self) -> Result<Option<Frame>, XmlError> {
        let buf = &self.buf[..];
        let phase = self.phase;
        let mut pos = self.scan;
        let mut lex = self.lex;
        let mut depth = self.depth;
        let mut start = self.start;
        let mut tag = self.tag;

        let result = loop {
            let Some(&b) = buf.get(pos) else {
                break Ok(None);
            };
            match lex {
                Lex::Text if depth > 0 => {
                    // Character data inside a stanza: only `<` matters here;
                    // entities and characters are checked by the element builder.
                    match buf[pos..].iter().position(|&c| c == b'<') {
                        Some(i) => {
                            pos += i + 1;
                            lex = Lex::Lt;
                        }
                        None => pos = buf.len(),
                    }
                }
                Lex::Text => {
                    match b {
                        b'<' => lex = Lex::Lt,
                        // Whitespace between first-level elements (keepalives,
                        // RFC 6120 §4.6.1) is consumed right away so it never
                        // accumulates in the buffer.
                        b' ' | b'\t' | b'\r' | b'\n' => start = pos + 1,
                        _ => break Err(not_well_formed("character data at stream level")),
                    }
                    pos += 1;
                }
                Lex::Lt => {
                    match b {
                        b'/' if depth == 0 && phase == Phase::Prolog => {
                            break Err(not_well_formed("end tag before the stream header"));
                        }
                        b'/' => {
                            lex = Lex::EndTag;
                            tag = pos + 1 - start;
                        }
                        b'!' => lex = Lex::Bang(0),
                        // Only the XML declaration, once, before the root.
                        b'?' if phase == Phase::Prolog && !self.seen_decl => lex = Lex::Decl(false),
                        // RFC 6120 §11.1: processing instructions are prohibited.
                        b'?' => break Err(restricted("processing instruction")),
                        b'>' | b' ' | b'\t' | b'\r' | b'\n' => {
                            break Err(not_well_formed("missing element name"))
                        }
                        _ => {
                            lex = Lex::StartTag {
                                quote: 0,
                                slash: false,
                            };
                            tag = pos - start;
                        }
                    }
                    pos += 1;
                }
                Lex::StartTag { quote, .. } if quote != 0 => {
                    // Inside an attribute value: skip to the closing quote. A
                    // `<` is never allowed in a value (XML 1.0 §3.1 [WFC: No <
                    // in Attribute Values]); failing here also stops a
                    // missing quote from swallowing the rest of the stream.
                    match buf[pos..].iter().position(|&c| c == quote || c == b'<') {
                        Some(i) if buf[pos + i] == b'<' => {
                            break Err(not_well_formed("'<' in attribute value"));
                        }
                        Some(i) => {
                            pos += i + 1;
                            lex = Lex::StartTag {
                                quote: 0,
                                slash: false,
                            };
                        }
                        None => pos = buf.len(),
                    }
                }
                Lex::StartTag { slash, .. } => {
                    match b {
                        b'"' | b'\'' => {
                            lex = Lex::StartTag {
                                quote: b,
                                slash: false,
                            }
                        }
                        b'<' => break Err(not_well_formed("'<' inside a tag")),
                        b'>' => {
                            pos += 1;
                            lex = Lex::Text;
                            if phase == Phase::Prolog {
                                break Ok(Some(Frame::Header {
                                    end: pos,
                                    self_closing: slash,
                                }));
                            }
                            if !slash {
                                depth += 1;
                                let name = &buf[start + tag..pos];
                                let len = name
                                    .iter()
                                    .position(|&c| {
                                        matches!(c, b' ' | b'\t' | b'\r' | b'\n' | b'/' | b'>')
                                    })
                                    .unwrap_or(name.len());
                                self.open.push((tag, len));
                            } else if depth == 0 {
                                break Ok(Some(Frame::Stanza { end: pos }));
                            }
                            continue;
                        }
                        _ => {
                            lex = Lex::StartTag {
                                quote: 0,
                                slash: b == b'/',
                            }
                        }
                    }
                    pos += 1;
                }
                Lex::EndTag => match buf[pos..].iter().position(|&c| c == b'>' || c == b'<') {
                    Some(i) if buf[pos + i] == b'<' => {
                        break Err(not_well_formed("'<' inside an end tag"));
                    }
                    Some(i) => {
                        let name = buf[start + tag..pos + i].trim_ascii_end();
                        pos += i + 1;
                        lex = Lex::Text;
                        if depth == 0 {
                            break Ok(Some(Frame::Close { end: pos }));
                        }
                        let matches = self
                            .open
                            .pop()
                            .is_some_and(|(at, len)| &buf[start + at..start + at + len] == name);
                        if !matches {
                            break Err(not_well_formed(format!(
                                "end tag </{}> does not match the open element",
                                String::from_utf8_lossy(name)
                            )));
                        }
                        depth -= 1;
                        if depth == 0 {
                            break Ok(Some(Frame::Stanza { end: pos }));
                        }
                    }
                    None => pos = buf.len(),
                },
                Lex::Bang(0) => {
                    match b {
                        // RFC 6120 §11.1: comments are prohibited.
                        b'-' => break Err(restricted("comment")),
                        b'[' if depth == 0 => {
                            break Err(not_well_formed("CDATA at stream level"));
                        }
                        b'[' => lex = Lex::Bang(1),
                        // <!DOCTYPE, <!ENTITY, <!ELEMENT, <!ATTLIST, <!NOTATION:
                        // RFC 6120 §11.1 prohibits DTDs and entity declarations.
                        b'A'..=b'Z' => break Err(restricted("document type declaration")),
                        _ => break Err(not_well_formed("malformed markup declaration")),
                    }
                    pos += 1;
                }
                Lex::Bang(n) => {
                    if b != CDATA_OPEN[usize::from(n)] {
                        break Err(not_well_formed("malformed CDATA section"));
                    }
                    lex = if usize::from(n) + 1 == CDATA_OPEN.len() {
                        Lex::CData(0)
                    } else {
                        Lex::Bang(n + 1)
                    };
                    pos += 1;
                }
                Lex::CData(0) => match buf[pos..].iter().position(|&c| c == b']') {
                    Some(i) => {
                        pos += i + 1;
                        lex = Lex::CData(1);
                    }
                    None => pos = buf.len(),
                },
                Lex::CData(n) => {
                    lex = match b {
                        b']' => Lex::CData(2),
                        b'>' if n >= 2 => Lex::Text,
                        _ => Lex::CData(0),
                    };
                    pos += 1;
                }
                Lex::Decl(question) => {
                    pos += 1;
                    if b == b'>' && question {
                        // `<?xml` must be followed by whitespace: `<?xml-foo?>`
                        // is a processing instruction, not the declaration.
                        let decl = &buf[start..pos];
                        let is_decl = decl.starts_with(b"<?xml")
                            && decl.get(5).is_some_and(|c| c.is_ascii_whitespace());
                        if !is_decl {
                            break Err(restricted("processing instruction"));
                        }
                        self.seen_decl = true;
                        start = pos;
                        lex = Lex::Text;
                    } else {
                        lex = Lex::Decl(b == b'?');
                    }
                }
            }
        };

        self.scan = pos;
        self.lex = lex;
        self.depth = depth;
        self.start = start;
        self.tag = tag;

        let frame = result?;
        let end = match &frame {
            None => pos,
            Some(Frame::Header { end, .. } | Frame::Stanza { end } | Frame::Close { end }) => *end,
        };
        // Checked on incomplete units too, so a peer cannot make us buffer an
        // unbounded element (or header) that never closes.
        if end - start > self.limits.max_stanza_bytes {
            return Err(XmlError::PolicyViolation(format!(
                "element larger than {} bytes",
                self.limits.max_stanza_bytes
            )));
        }
        Ok(frame)
    }
}

/// Parses one standalone element (e.g. a stored stanza), with `default_ns`
/// as the default namespace in scope unless the element declares its own.
pub fn parse_element(xml: &str, default_ns: &str) -> Result<Element, XmlError> {
    let scope = [(String::new(), default_ns.to_owned())];
    build_element(xml, &scope, &Limits::default())
}

/// Checks UTF-8 (RFC 6120 §11.6) and the XML Char production for the ASCII
/// range: C0 controls other than tab, LF and CR are never allowed.
fn as_xml_str(bytes: &[u8]) -> Result<&str, XmlError> {
    let s = std::str::from_utf8(bytes).map_err(|_| not_well_formed("invalid UTF-8"))?;
    check_chars(s)?;
    Ok(s)
}

fn check_chars(s: &str) -> Result<(), XmlError> {
    if s.bytes()
        .any(|b| b < 0x20 && !matches!(b, b'\t' | b'\n' | b'\r'))
    {
        return Err(not_well_formed("control character"));
    }
    Ok(())
}

fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r' | '\u{20}'..='\u{D7FF}' | '\u{E000}'..='\u{FFFD}' | '\u{10000}'..)
}

/// A conservative check of an XML qualified name: `prefix:local` or `local`,
/// each part a plausible NCName. Non-ASCII letters are accepted as-is.
fn check_qname(name: &str) -> Result<(), XmlError> {
    let part_ok = |p: &str| {
        let bytes = p.as_bytes();
        !bytes.is_empty()
            && !matches!(bytes[0], b'0'..=b'9' | b'-' | b'.')
            && bytes
                .iter()
                .all(|&b| b >= 0x80 || b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_'))
    };
    let ok = match name.split_once(':') {
        Some((prefix, local)) => part_ok(prefix) && part_ok(local),
        None => part_ok(name),
    };
    if ok {
        Ok(())
    } else {
        Err(not_well_formed(format!("invalid name '{name}'")))
    }
}

/// Resolves a reference (`lt`, `#60`, `#x3C`) to its character. Only the five
/// predefined entities exist: with DTDs banned (RFC 6120 §11.1), any other
/// name is undeclared, a well-formedness error (XML 1.0 §4.1 [WFC: Entity Declared]).
fn resolve_ref(name: &str) -> Result<char, XmlError> {
    let c = match name {
        "lt" => '<',
        "gt" => '>',
        "amp" => '&',
        "apos" => '\'',
        "quot" => '"',
        _ => {
            let Some(num) = name.strip_prefix('#') else {
                return Err(not_well_formed(format!("undeclared entity '&{name};'")));
            };
            let (digits, radix) = match num.strip_prefix('x') {
                Some(hex) => (hex, 16),
                None => (num, 10),
            };
            // from_str_radix would accept a leading '+'.
            let code = if !digits.is_empty() && digits.chars().all(|c| c.is_digit(radix)) {
                u32::from_str_radix(digits, radix).ok()
            } else {
                None
            };
            match code.and_then(char::from_u32) {
                Some(c) if is_xml_char(c) => c,
                _ => {
                    return Err(not_well_formed(format!(
                        "invalid character reference '&{name};'"
                    )))
                }
            }
        }
    };
    Ok(c)
}

/// Unescapes an attribute value and applies attribute-value normalisation
/// (XML 1.0 §3.3.3: literal tab, CR, LF become a space; CRLF counts once).
fn unescape_attr(raw: &str) -> Result<Cow<'_, str>, XmlError> {
    if !raw
        .bytes()
        .any(|b| matches!(b, b'&' | b'<' | b'\t' | b'\n' | b'\r'))
    {
        return Ok(Cow::Borrowed(raw));
    }
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(i) = rest.find(['&', '<', '\t', '\n', '\r']) {
        out.push_str(&rest[..i]);
        let special = rest.as_bytes()[i];
        rest = &rest[i + 1..];
        match special {
            b'<' => return Err(not_well_formed("'<' in attribute value")),
            b'&' => {
                let Some(end) = rest.find(';') else {
                    return Err(not_well_formed("unterminated entity reference"));
                };
                out.push(resolve_ref(&rest[..end])?);
                rest = &rest[end + 1..];
            }
            b'\r' => {
                out.push(' ');
                rest = rest.strip_prefix('\n').unwrap_or(rest);
            }
            _ => out.push(' '),
        }
    }
    out.push_str(rest);
    Ok(Cow::Owned(out))
}

/// Namespace bindings in scope while building one element tree.
struct Scope<'a> {
    /// Bindings from outside the tree (the stream root), never modified.
    outer: &'a [(String, String)],
    /// Bindings made inside the tree, innermost last; popped by length marks.
    local: Vec<(String, String)>,
}

impl Scope<'_> {
    /// The namespace bound to `prefix` ("" for the default namespace).
    fn resolve(&self, prefix: &str) -> Result<&str, XmlError> {
        let found = self
            .local
            .iter()
            .rev()
            .chain(self.outer.iter().rev())
            .find(|(p, _)| p == prefix);
        match (found, prefix) {
            (Some((_, uri)), _) => Ok(uri),
            (None, "xml") => Ok(XML_NS),
            // No default namespace declared anywhere: the name is in no namespace.
            (None, "") => Ok(""),
            (None, _) => Err(XmlError::BadNamespacePrefix(format!(
                "undeclared prefix '{prefix}'"
            ))),
        }
    }
}

fn utf8(bytes: &[u8]) -> Result<&str, XmlError> {
    std::str::from_utf8(bytes).map_err(|_| not_well_formed("invalid UTF-8"))
}

/// Reads a start tag: pushes its namespace declarations onto `scope` and
/// returns the element with its name resolved. The default `xmlns` is not
/// kept as an attribute (it is `ns`); `xmlns:p` declarations are.
fn open_element(
    e: &BytesStart<'_>,
    scope: &mut Scope<'_>,
    limits: &Limits,
) -> Result<Element, XmlError> {
    let qname = utf8(e.name().into_inner())?;
    check_qname(qname)?;
    let mut attrs: Vec<(String, String)> = Vec::new();
    let mut count = 0;
    // `attributes()` checks syntax (quoting, `=`) and duplicate names.
    for attr in e.attributes() {
        let attr = attr.map_err(|err| not_well_formed(err.to_string()))?;
        count += 1;
        if count > limits.max_attrs {
            return Err(XmlError::PolicyViolation(format!(
                "more than {} attributes on <{qname}>",
                limits.max_attrs
            )));
        }
        let key = utf8(attr.key.into_inner())?;
        let value = unescape_attr(utf8(&attr.value)?)?;
        if key == "xmlns" {
            scope.local.push((String::new(), value.into_owned()));
            continue;
        }
        check_qname(key)?;
        if let Some(prefix) = key.strip_prefix("xmlns:") {
            // Namespaces in XML §3: prefixes cannot be undeclared, and
            // `xmlns`/`xml` cannot be rebound.
            if value.is_empty() {
                return Err(not_well_formed(format!("empty namespace for '{key}'")));
            }
            if prefix == "xmlns" || (prefix == "xml") != (value == XML_NS) {
                return Err(XmlError::BadNamespacePrefix(format!(
                    "cannot bind '{prefix}'"
                )));
            }
            scope
                .local
                .push((prefix.to_owned(), value.clone().into_owned()));
        }
        attrs.push((key.to_owned(), value.into_owned()));
    }
    // Attribute prefixes may be declared anywhere on the same tag, so check
    // them once all of this tag's declarations are in scope. A prefix
    // declared further out (on the stream root, or an ancestor) is declared
    // again on this element: it is serialised, stored and forwarded on its
    // own, into streams where that outer declaration does not exist.
    let mut redeclare: Vec<(String, String)> = Vec::new();
    for (key, _) in &attrs {
        if let Some((prefix, _)) = key.split_once(':') {
            if prefix == "xmlns" {
                continue;
            }
            let uri = scope.resolve(prefix)?;
            if prefix == "xml" {
                continue;
            }
            let decl = format!("xmlns:{prefix}");
            let declared = attrs.iter().chain(&redeclare).any(|(k, _)| *k == decl);
            if !declared {
                redeclare.push((decl, uri.to_owned()));
            }
        }
    }
    attrs.extend(redeclare);
    let (prefix, local) = qname.split_once(':').unwrap_or(("", qname));
    if prefix == "xmlns" {
        return Err(XmlError::BadNamespacePrefix(
            "element with prefix 'xmlns'".into(),
        ));
    }
    let ns = scope.resolve(prefix)?.to_owned();
    Ok(Element {
        name: local.to_owned(),
        ns,
        attrs,
        children: Vec::new(),
    })
}

fn push_text(element: &mut Element, text: &str) {
    if text.is_empty() {
        return;
    }
    match element.children.last_mut() {
        Some(Node::Text(t)) => t.push_str(text),
        _ => element.children.push(Node::Text(text.to_owned())),
    }
}

fn is_xml_whitespace(s: &str) -> bool {
    s.bytes().all(|b| matches!(b, b' ' | b'\t' | b'\n' | b'\r'))
}

fn xml_err(err: impl std::fmt::Display) -> XmlError {
    not_well_formed(err.to_string())
}

/// Builds one element from text holding exactly one element (plus optional
/// surrounding whitespace), with `outer` bindings in scope.
fn build_element(
    xml: &str,
    outer: &[(String, String)],
    limits: &Limits,
) -> Result<Element, XmlError> {
    check_chars(xml)?;
    let mut reader = Reader::from_str(xml);
    let mut scope = Scope {
        outer,
        local: Vec::new(),
    };
    // Open elements with the scope length to restore when each closes.
    let mut stack: Vec<(Element, usize)> = Vec::new();
    let mut root: Option<Element> = None;

    loop {
        let event = reader.read_event().map_err(xml_err)?;
        let (start, empty) = match event {
            XmlEvent::Start(e) => (e, false),
            XmlEvent::Empty(e) => (e, true),
            XmlEvent::End(_) => {
                // quick-xml has already checked the name matches.
                let (element, mark) = stack
                    .pop()
                    .ok_or_else(|| not_well_formed("unexpected end tag"))?;
                scope.local.truncate(mark);
                match stack.last_mut() {
                    Some((parent, _)) => parent.children.push(Node::Element(element)),
                    None => root = Some(element),
                }
                continue;
            }
            XmlEvent::Text(t) => {
                let text = t.xml10_content().map_err(xml_err)?;
                match stack.last_mut() {
                    Some((parent, _)) => push_text(parent, &text),
                    None if is_xml_whitespace(&text) => {}
                    None => return Err(not_well_formed("text outside the element")),
                }
                continue;
            }
            XmlEvent::CData(t) => {
                let text = t.xml10_content().map_err(xml_err)?;
                let (parent, _) = stack
                    .last_mut()
                    .ok_or_else(|| not_well_formed("CDATA outside the element"))?;
                push_text(parent, &text);
                continue;
            }
            XmlEvent::GeneralRef(r) => {
                let c = resolve_ref(&r.decode().map_err(xml_err)?)?;
                let (parent, _) = stack
                    .last_mut()
                    .ok_or_else(|| not_well_formed("reference outside the element"))?;
                push_text(parent, c.encode_utf8(&mut [0; 4]));
                continue;
            }
            // RFC 6120 §11.1.
            XmlEvent::Comment(_) => return Err(restricted("comment")),
            XmlEvent::PI(_) | XmlEvent::Decl(_) => {
                return Err(restricted("processing instruction"))
            }
            XmlEvent::DocType(_) => return Err(restricted("document type declaration")),
            XmlEvent::Eof => break,
        };
        if root.is_some() {
            return Err(not_well_formed("more than one element"));
        }
        if stack.len() + 1 > limits.max_depth {
            return Err(XmlError::PolicyViolation(format!(
                "elements nested deeper than {}",
                limits.max_depth
            )));
        }
        let mark = scope.local.len();
        let element = open_element(&start, &mut scope, limits)?;
        if empty {
            scope.local.truncate(mark);
            match stack.last_mut() {
                Some((parent, _)) => parent.children.push(Node::Element(element)),
                None => root = Some(element),
            }
        } else {
            stack.push((element, mark));
        }
    }
    if !stack.is_empty() {
        return Err(not_well_formed("unclosed element"));
    }
    root.ok_or_else(|| not_well_formed("no element"))
}

struct Root {
    header: StreamHeader,
    scope: Vec<(String, String)>,
    qname: String,
}

/// Parses the `<stream:stream …>` open tag (RFC 6120 §4.7).
fn parse_header(text: &str, limits: &Limits) -> Result<Root, XmlError> {
    let mut reader = Reader::from_str(text);
    let start = match reader.read_event().map_err(xml_err)? {
        XmlEvent::Start(e) | XmlEvent::Empty(e) => e,
        _ => return Err(not_well_formed("expected the stream header")),
    };
    let mut scope = Scope {
        outer: &[],
        local: Vec::new(),
    };
    let root = open_element(&start, &mut scope, limits)?;
    // §4.8.1: the root must be `stream` in the streams namespace.
    if root.name != "stream" || root.ns != ns::STREAM {
        return Err(XmlError::InvalidNamespace(format!(
            "root element '{}' in namespace '{}'",
            root.name, root.ns
        )));
    }
    let qname = utf8(start.name().into_inner())?.to_owned();
    let attr = |name: &str| root.get_attr(name).map(str::to_owned);
    let header = StreamHeader {
        to: attr("to"),
        from: attr("from"),
        id: attr("id"),
        version: attr("version"),
        lang: attr("xml:lang"),
        default_ns: scope
            .local
            .iter()
            .rev()
            .find(|(p, _)| p.is_empty())
            .map(|(_, uri)| uri.clone())
            .unwrap_or_default(),
    };
    Ok(Root {
        header,
        scope: scope.local,
        qname,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEADER: &str = "<stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0'>";

    const CLIENT_STREAM: &str = "<?xml version='1.0'?>\n\
        <stream:stream to='example.com' xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' version='1.0' xml:lang='en'>\n\
        <starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>\n\
        <auth xmlns=\"urn:ietf:params:xml:ns:xmpp-sasl\" mechanism=\"PLAIN\">AGp1bGlldABwYXNz</auth>\
        <iq type='set' id='b1'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'>\
        <resource>balcony</resource></bind></iq> \n\t \n\
        <message to='romeo@example.net/orchard' type='chat' id='m&amp;1'>\
        <body>héllo ☃ 😀 &lt;3 &amp; &#x263A;&#60;&quot;&apos;&gt;</body>\
        <body xml:lang='fr'><![CDATA[<b>bonjour</b> & ]]]]></body></message>  \
        <presence><show>away</show><status>a \"quoted\" status 😀</status>\
        <c xmlns='http://jabber.org/protocol/caps' hash='sha-1' node='http://x' ver='v=&#61;'/>\
        </presence>\n \
        </stream:stream>";

    /// Feeds the chunks in order, draining all events after each.
    fn run(limits: Limits, chunks: &[&[u8]]) -> Result<Vec<Event>, XmlError> {
        let mut p = StreamParser::new(limits);
        let mut events = Vec::new();
        for chunk in chunks {
            p.feed(chunk);
            while let Some(ev) = p.next_event()? {
                events.push(ev);
            }
        }
        Ok(events)
    }

    fn parse_all(input: &str) -> Result<Vec<Event>, XmlError> {
        run(Limits::default(), &[input.as_bytes()])
    }

    /// The error for a stream `HEADER` + `body`.
    fn stream_err(body: &str) -> XmlError {
        parse_all(&format!("{HEADER}{body}")).unwrap_err()
    }

    /// The single stanza in a stream `HEADER` + `body`.
    fn stanza(body: &str) -> Element {
        let events = parse_all(&format!("{HEADER}{body}")).unwrap();
        match events.as_slice() {
            [Event::StreamOpen(_), Event::Element(e)] => e.clone(),
            other => panic!("unexpected events {other:?}"),
        }
    }

    fn expected_client_events() -> Vec<Event> {
        let header = StreamHeader {
            to: Some("example.com".into()),
            from: None,
            id: None,
            version: Some("1.0".into()),
            lang: Some("en".into()),
            default_ns: "jabber:client".into(),
        };
        let message = Element::new("message", "jabber:client")
            .attr("to", "romeo@example.net/orchard")
            .attr("type", "chat")
            .attr("id", "m&1")
            .child(Element::new("body", "jabber:client").text("héllo ☃ 😀 <3 & ☺<\"'>"))
            .child(
                Element::new("body", "jabber:client")
                    .attr("xml:lang", "fr")
                    .text("<b>bonjour</b> & ]]"),
            );
        let presence = Element::new("presence", "jabber:client")
            .child(Element::new("show", "jabber:client").text("away"))
            .child(Element::new("status", "jabber:client").text("a \"quoted\" status 😀"))
            .child(
                Element::new("c", "http://jabber.org/protocol/caps")
                    .attr("hash", "sha-1")
                    .attr("node", "http://x")
                    .attr("ver", "v=="),
            );
        vec![
            Event::StreamOpen(header),
            Event::Element(Element::new("starttls", ns::TLS)),
            Event::Element(
                Element::new("auth", ns::SASL)
                    .attr("mechanism", "PLAIN")
                    .text("AGp1bGlldABwYXNz"),
            ),
            Event::Element(
                Element::new("iq", "jabber:client")
                    .attr("type", "set")
                    .attr("id", "b1")
                    .child(
                        Element::new("bind", ns::BIND)
                            .child(Element::new("resource", ns::BIND).text("balcony")),
                    ),
            ),
            Event::Element(message),
            Event::Element(presence),
            Event::StreamClose,
        ]
    }

    #[test]
    fn parses_realistic_client_stream() {
        assert_eq!(parse_all(CLIENT_STREAM).unwrap(), expected_client_events());
    }

    #[test]
    fn same_events_when_split_at_every_byte_boundary() {
        let bytes = CLIENT_STREAM.as_bytes();
        let expected = expected_client_events();
        for i in 0..=bytes.len() {
            let (a, b) = bytes.split_at(i);
            assert_eq!(
                run(Limits::default(), &[a, b]).unwrap(),
                expected,
                "split at {i}"
            );
        }
    }

    #[test]
    fn same_events_when_fed_one_byte_at_a_time() {
        let chunks: Vec<&[u8]> = CLIENT_STREAM.as_bytes().chunks(1).collect();
        assert_eq!(
            run(Limits::default(), &chunks).unwrap(),
            expected_client_events()
        );
    }

    #[test]
    fn release_memory_frees_only_a_fully_consumed_buffer() {
        let mut p = StreamParser::new(Limits::default());
        p.feed(b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' version='1.0'><message><body>hi</body></message><presence");
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
        assert!(matches!(p.next_event(), Ok(Some(Event::Element(_)))));
        assert_eq!(p.next_event(), Ok(None));
        // Half a stanza is still buffered: nothing may be freed.
        p.release_memory();
        assert_eq!(p.buffered(), "<presence".len());
        p.feed(b"/>");
        assert!(matches!(p.next_event(), Ok(Some(Event::Element(e))) if e.name == "presence"));
        p.release_memory();
        assert_eq!(p.buffered(), 0);
        assert_eq!(p.buf.capacity(), 0);
        p.feed(b"<iq type='get' id='1'/>");
        assert!(matches!(p.next_event(), Ok(Some(Event::Element(e))) if e.name == "iq"));
    }

    #[test]
    fn consumed_bytes_are_released() {
        let mut p = StreamParser::new(Limits::default());
        p.feed(HEADER.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
        assert_eq!(p.buffered(), 0);
        p.feed(b"<presence/>   <message><bo");
        assert!(matches!(p.next_event(), Ok(Some(Event::Element(_)))));
        assert_eq!(p.next_event(), Ok(None));
        // The keepalive whitespace is consumed too; only the partial stanza stays.
        assert_eq!(p.buffered(), "<message><bo".len());
        p.feed(b"dy>x</body></message>");
        assert!(matches!(p.next_event(), Ok(Some(Event::Element(_)))));
        assert_eq!(p.buffered(), 0);
    }

    #[test]
    fn whitespace_keepalives_are_skipped() {
        let events = parse_all(&format!("{HEADER} \n \n<presence/>\n\n ")).unwrap();
        assert_eq!(events.len(), 2);
    }

    #[test]
    fn text_at_stream_level_is_not_well_formed() {
        assert!(matches!(
            stream_err("hello<presence/>"),
            XmlError::NotWellFormed(_)
        ));
    }

    #[test]
    fn header_without_declaration_and_without_default_ns() {
        let events = parse_all(
            "<stream:stream xmlns:stream='http://etherx.jabber.org/streams' from='a' id='x1'>",
        )
        .unwrap();
        let [Event::StreamOpen(h)] = events.as_slice() else {
            panic!("{events:?}")
        };
        assert_eq!(h.from.as_deref(), Some("a"));
        assert_eq!(h.id.as_deref(), Some("x1"));
        assert_eq!(h.default_ns, "");
    }

    #[test]
    fn stream_features_are_in_the_streams_namespace() {
        let e = stanza(
            "<stream:features><starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'><required/>\
             </starttls></stream:features>",
        );
        assert!(e.is("features", ns::STREAM));
        let tls = e.get_child("starttls", ns::TLS).unwrap();
        assert!(tls.has_child("required", ns::TLS));
    }

    #[test]
    fn prefixed_child_element_resolves_and_keeps_declaration() {
        let e = stanza(
            "<message><x:data xmlns:x='urn:x' x:kind='k'><x:item/><plain/></x:data></message>",
        );
        let data = e.get_child("data", "urn:x").unwrap();
        assert_eq!(data.get_attr("xmlns:x"), Some("urn:x"));
        assert_eq!(data.get_attr("x:kind"), Some("k"));
        assert!(data.has_child("item", "urn:x"));
        assert!(data.has_child("plain", "jabber:client"));
    }

    #[test]
    fn attribute_prefix_declared_on_the_root_is_declared_on_the_element() {
        let events = parse_all(
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' xmlns:x='urn:x'>\
             <message x:a='1'><body>hi</body><c x:b='2'/></message>",
        )
        .expect("well-formed");
        let Event::Element(m) = &events[1] else {
            panic!("{events:?}")
        };
        assert_eq!(m.get_attr("xmlns:x"), Some("urn:x"));
        let alone = m.to_string_in(ns::CLIENT);
        // On its own, in a stream that never declared x, it still parses.
        let again = parse_element(&alone, ns::CLIENT).expect("self-contained");
        assert_eq!(again.get_attr("x:a"), Some("1"));
        let child = m.elements().nth(1).expect("c").to_string_in(ns::CLIENT);
        assert!(child.contains("xmlns:x='urn:x'"), "{child}");
        parse_element(&child, ns::CLIENT).expect("the child alone parses too");
    }

    #[test]
    fn nested_default_namespace_change_applies_to_subtree_only() {
        let e = stanza(
            "<iq type='result'><query xmlns='jabber:iq:roster'><item jid='a@b'>\
             <group>G</group></item></query><after/></iq>",
        );
        let query = e.get_child("query", ns::ROSTER).unwrap();
        assert!(query.attrs.is_empty(), "default xmlns is not an attribute");
        let item = query.get_child("item", ns::ROSTER).unwrap();
        assert_eq!(item.child_text("group", ns::ROSTER).as_deref(), Some("G"));
        assert!(e.has_child("after", "jabber:client"));
    }

    #[test]
    fn undeclared_prefix_is_bad_namespace_prefix() {
        assert!(matches!(
            stream_err("<message><foo:bar/></message>"),
            XmlError::BadNamespacePrefix(_)
        ));
        assert!(matches!(
            stream_err("<message foo:bar='x'/>"),
            XmlError::BadNamespacePrefix(_)
        ));
    }

    #[test]
    fn root_in_wrong_namespace_is_invalid_namespace() {
        let err = parse_all("<stream:stream xmlns:stream='urn:wrong' xmlns='jabber:client'>");
        assert!(matches!(err, Err(XmlError::InvalidNamespace(_))));
        let err = parse_all("<stream xmlns='jabber:client'>");
        assert!(matches!(err, Err(XmlError::InvalidNamespace(_))));
    }

    #[test]
    fn root_with_undeclared_prefix_is_bad_namespace_prefix() {
        let err = parse_all("<stream:stream xmlns='jabber:client'>");
        assert!(matches!(err, Err(XmlError::BadNamespacePrefix(_))));
    }

    #[test]
    fn doctype_is_restricted() {
        let err = parse_all("<?xml version='1.0'?><!DOCTYPE stream>");
        assert!(matches!(err, Err(XmlError::RestrictedXml(_))));
    }

    #[test]
    fn entity_declaration_is_restricted() {
        assert!(matches!(
            stream_err("<!ENTITY x 'y'>"),
            XmlError::RestrictedXml(_)
        ));
        assert!(matches!(
            stream_err("<message><!ENTITY x 'y'></message>"),
            XmlError::RestrictedXml(_)
        ));
    }

    #[test]
    fn processing_instruction_in_stanza_is_restricted() {
        assert!(matches!(
            stream_err("<message><?php echo 1; ?></message>"),
            XmlError::RestrictedXml(_)
        ));
        assert!(matches!(
            stream_err("<?xml version='1.0'?>"),
            XmlError::RestrictedXml(_)
        ));
        let err = parse_all("<?xml-stylesheet href='x'?>");
        assert!(matches!(err, Err(XmlError::RestrictedXml(_))));
    }

    #[test]
    fn comment_is_restricted() {
        assert!(matches!(
            stream_err("<message><!-- hi --></message>"),
            XmlError::RestrictedXml(_)
        ));
        assert!(matches!(
            stream_err("<!-- hi -->"),
            XmlError::RestrictedXml(_)
        ));
    }

    #[test]
    fn undefined_entities_are_not_well_formed() {
        for body in [
            "<message><body>&foo;</body></message>",
            "<message><body>&nbsp;</body></message>",
            "<message><body>a & b</body></message>",
            "<message to='&foo;'/>",
            "<message to='a & b'/>",
            "<message><body>&#0;</body></message>",
            "<message to='&#x1;'/>",
            "<message><body>&#xD800;</body></message>",
            "<message><body>&#+60;</body></message>",
        ] {
            assert!(
                matches!(stream_err(body), XmlError::NotWellFormed(_)),
                "{body}"
            );
        }
    }

    #[test]
    fn mismatched_end_tag_is_not_well_formed() {
        assert!(matches!(
            stream_err("<message><body></message></body>"),
            XmlError::NotWellFormed(_)
        ));
        assert!(matches!(
            stream_err("<presence/></stream:streamx>"),
            XmlError::NotWellFormed(_)
        ));
    }

    #[test]
    fn mismatched_end_tag_fails_when_it_arrives() {
        // The stanza is not complete (depth 1 is still open), yet the end
        // tag cannot match: the stream fails now instead of waiting forever.
        let mut p = StreamParser::new(Limits::default());
        p.feed(b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>");
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
        for b in b"<message><body xml:lang='en'>x</message>" {
            p.feed(std::slice::from_ref(b));
            match p.next_event() {
                Ok(None) => {}
                Err(XmlError::NotWellFormed(m)) => {
                    assert!(m.contains("</message>"), "{m}");
                    return;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        panic!("the mismatched end tag was not reported");
    }

    #[test]
    fn matching_end_tags_with_prefixes_and_whitespace_pass() {
        let events = parse_all(
            "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams'>\
             <iq type='get' id='1'><q:query xmlns:q='jabber:iq:roster'><item/></q:query  ></iq>",
        )
        .expect("well-formed");
        assert_eq!(events.len(), 2, "{events:?}");
    }

    #[test]
    fn malformed_attributes_are_not_well_formed() {
        for body in [
            "<message to='a' to='b'/>",
            "<message to='a<b'/>",
            "<message to=a/>",
            "<message to/>",
            "<message><body>\u{1}</body></message>",
            "<1message/>",
        ] {
            assert!(
                matches!(stream_err(body), XmlError::NotWellFormed(_)),
                "{body}"
            );
        }
    }

    #[test]
    fn invalid_utf8_is_not_well_formed() {
        let err = run(
            Limits::default(),
            &[
                HEADER.as_bytes(),
                b"<message><body>\xff\xfe</body></message>",
            ],
        );
        assert!(matches!(err, Err(XmlError::NotWellFormed(_))));
    }

    /// A header within `small_limits()` (one attribute, under 100 bytes).
    const SHORT_HEADER: &str = "<stream:stream xmlns:stream='http://etherx.jabber.org/streams'>";

    fn small_limits() -> Limits {
        Limits {
            max_stanza_bytes: 100,
            max_depth: 3,
            max_attrs: 2,
        }
    }

    #[test]
    fn stanza_over_size_limit_is_policy_violation() {
        let big = format!("<message><body>{}</body></message>", "a".repeat(200));
        let err = run(small_limits(), &[SHORT_HEADER.as_bytes(), big.as_bytes()]);
        assert!(matches!(err, Err(XmlError::PolicyViolation(_))));
    }

    #[test]
    fn incomplete_stanza_over_size_limit_is_detected_while_buffering() {
        let mut p = StreamParser::new(small_limits());
        p.feed(SHORT_HEADER.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
        p.feed(b"<message><body>");
        assert_eq!(p.next_event(), Ok(None));
        let mut fed = 0;
        let err = loop {
            p.feed(&[b'a'; 16]);
            fed += 16;
            assert!(fed < 1000, "limit never enforced");
            match p.next_event() {
                Ok(None) => {}
                Ok(Some(ev)) => panic!("unexpected {ev:?}"),
                Err(e) => break e,
            }
        };
        assert!(matches!(err, XmlError::PolicyViolation(_)));
        assert!(p.buffered() <= 100 + 16);
        // Never-closing attribute value too.
        let mut p = StreamParser::new(small_limits());
        p.feed(SHORT_HEADER.as_bytes());
        p.feed(b"<message to='");
        p.feed(&[b'x'; 200]);
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
        assert!(matches!(p.next_event(), Err(XmlError::PolicyViolation(_))));
    }

    #[test]
    fn oversized_stream_header_is_policy_violation() {
        let mut p = StreamParser::new(small_limits());
        p.feed(b"<stream:stream to='");
        p.feed(&[b'x'; 200]);
        assert!(matches!(p.next_event(), Err(XmlError::PolicyViolation(_))));
    }

    #[test]
    fn nesting_beyond_depth_limit_is_policy_violation() {
        let ok = run(
            small_limits(),
            &[SHORT_HEADER.as_bytes(), b"<a><b><c/></b></a>"],
        );
        assert!(ok.is_ok());
        let err = run(
            small_limits(),
            &[SHORT_HEADER.as_bytes(), b"<a><b><c><d/></c></b></a>"],
        );
        assert!(matches!(err, Err(XmlError::PolicyViolation(_))));
    }

    #[test]
    fn too_many_attributes_is_policy_violation() {
        let ok = run(
            small_limits(),
            &[SHORT_HEADER.as_bytes(), b"<a x='1' y='2'/>"],
        );
        assert!(ok.is_ok());
        let err = run(
            small_limits(),
            &[SHORT_HEADER.as_bytes(), b"<a x='1' y='2' z='3'/>"],
        );
        assert!(matches!(err, Err(XmlError::PolicyViolation(_))));
    }

    #[test]
    fn errors_are_sticky() {
        let mut p = StreamParser::new(Limits::default());
        p.feed(b"<!-- x -->");
        let err = p.next_event().unwrap_err();
        assert_eq!(err.stream_error(), StreamError::RestrictedXml);
        assert_eq!(p.next_event(), Err(err));
    }

    #[test]
    fn reset_keeps_pipelined_bytes_for_the_new_stream() {
        let mut p = StreamParser::new(Limits::default());
        p.feed(HEADER.as_bytes());
        p.feed(b"<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='PLAIN'>AA==</auth>");
        p.feed(b"<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='b.example'>");
        p.feed(b"<iq type='set' id='1'/>");
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
        assert!(matches!(p.next_event(), Ok(Some(Event::Element(e))) if e.is("auth", ns::SASL)));
        // The old stream context scans the new header as an unfinished stanza.
        assert_eq!(p.next_event(), Ok(None));
        p.reset();
        match p.next_event() {
            Ok(Some(Event::StreamOpen(h))) => assert_eq!(h.to.as_deref(), Some("b.example")),
            other => panic!("unexpected {other:?}"),
        }
        assert!(
            matches!(p.next_event(), Ok(Some(Event::Element(e))) if e.is("iq", "jabber:client"))
        );
        assert_eq!(p.next_event(), Ok(None));
    }

    #[test]
    fn reset_accepts_a_new_xml_declaration() {
        let mut p = StreamParser::new(Limits::default());
        p.feed(
            format!(
                "<?xml version='1.0'?>{HEADER}<success xmlns='{}'/>",
                ns::SASL
            )
            .as_bytes(),
        );
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
        assert!(matches!(p.next_event(), Ok(Some(Event::Element(_)))));
        p.reset();
        p.feed(format!("<?xml version='1.0'?>{HEADER}").as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
    }

    #[test]
    fn discard_buffer_drops_unparsed_bytes() {
        let mut p = StreamParser::new(Limits::default());
        p.feed(HEADER.as_bytes());
        p.feed(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/><message><body>inj");
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
        assert!(matches!(p.next_event(), Ok(Some(Event::Element(_)))));
        assert_eq!(p.next_event(), Ok(None));
        assert!(p.buffered() > 0);
        p.discard_buffer();
        assert_eq!(p.buffered(), 0);
        p.reset();
        p.feed(HEADER.as_bytes());
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamOpen(_)))));
    }

    #[test]
    fn self_closing_stream_header_opens_and_closes() {
        let events =
            parse_all("<stream:stream xmlns:stream='http://etherx.jabber.org/streams'/>").unwrap();
        assert!(matches!(
            events.as_slice(),
            [Event::StreamOpen(_), Event::StreamClose]
        ));
    }

    #[test]
    fn parse_element_round_trips() {
        let xml = "<message to='a@b' type='chat'><body>1 &lt; 2 &amp; 3 &gt; 2</body>\
                   <x xmlns='urn:x'><y a='&apos;'/></x></message>";
        let e = parse_element(xml, "jabber:client").unwrap();
        assert!(e.is("message", "jabber:client"));
        assert_eq!(
            e.child_text("body", "jabber:client").as_deref(),
            Some("1 < 2 & 3 > 2")
        );
        assert_eq!(e.to_string_in("jabber:client"), xml);
        let again = parse_element(&e.to_string(), "").unwrap();
        assert_eq!(again, e);
    }

    #[test]
    fn parse_element_applies_restrictions() {
        assert!(matches!(
            parse_element("<a><!-- c --></a>", "jabber:client"),
            Err(XmlError::RestrictedXml(_))
        ));
        assert!(matches!(
            parse_element("<a>&foo;</a>", "jabber:client"),
            Err(XmlError::NotWellFormed(_))
        ));
        assert!(matches!(
            parse_element("<a/><b/>", "jabber:client"),
            Err(XmlError::NotWellFormed(_))
        ));
        assert!(matches!(
            parse_element("<a>", "jabber:client"),
            Err(XmlError::NotWellFormed(_))
        ));
    }

    #[test]
    fn attribute_values_are_normalised() {
        let e = parse_element("<a v='x\r\ny\tz&#10;'/>", "").unwrap();
        assert_eq!(e.get_attr("v"), Some("x y z\n"));
    }
}
