//! Between the session core's byte-stream view of XMPP and the framed
//! transports (WebSocket, RFC 7395; BOSH, XEP-0206), where there is no
//! `<stream:stream>` root: every element carries its own namespace
//! declarations, and opening, restarting and closing the stream are
//! elements or attributes of their own.
//!
//! Inbound, a transport turns its frames into the bytes the stream parser
//! expects (a stream header built from values, the elements as they came,
//! the closing tag), so negotiation, limits and the session loop are the
//! same code for every transport. Outbound, [`split`] cuts what the session
//! core writes back into top-level elements; it only ever sees our own
//! serialiser's output, which escapes `<` and `>` everywhere and writes no
//! comments, CDATA or processing instructions.

use xmpp::element::escape_into;
use xmpp::stanza::ns;

/// RFC 7395 §3.3.2: the framing namespace of `<open/>` and `<close/>`.
pub const FRAMING: &str = "urn:ietf:params:xml:ns:xmpp-framing";

/// What opens a stream, as values: the session core renders it for each
/// transport (a `<stream:stream>` tag, an `<open/>` element, BOSH
/// session attributes).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Header {
    pub id: String,
    pub from: String,
    pub to: Option<String>,
    pub version: &'static str,
    pub lang: &'static str,
}

impl Header {
    /// The RFC 6120 §4.7 stream header of a TCP stream.
    pub fn stream_tag(&self, out: &mut String) {
        out.push_str("<?xml version='1.0'?><stream:stream xmlns='");
        out.push_str(ns::CLIENT);
        out.push_str("' xmlns:stream='");
        out.push_str(ns::STREAM);
        self.attrs(out);
        out.push('>');
    }

    /// The RFC 7395 §3.3.2 `<open/>` of a WebSocket stream.
    pub fn open_element(&self, out: &mut String) {
        out.push_str("<open xmlns='");
        out.push_str(FRAMING);
        self.attrs(out);
        out.push_str("/>");
    }

    fn attrs(&self, out: &mut String) {
        out.push_str("' id='");
        escape_into(out, &self.id, true);
        out.push_str("' from='");
        escape_into(out, &self.from, true);
        out.push('\'');
        if let Some(to) = &self.to {
            out.push_str(" to='");
            escape_into(out, to, true);
            out.push('\'');
        }
        out.push_str(" version='");
        out.push_str(self.version);
        out.push_str("' xml:lang='");
        out.push_str(self.lang);
        out.push('\'');
    }
}

/// The stream header a framed transport feeds the parser when its client
/// opens (or restarts) a stream: the attributes of `<open/>`, or of the
/// BOSH `<body/>`, re-escaped.
pub fn synthetic_header(
    to: Option<&str>,
    from: Option<&str>,
    version: Option<&str>,
    lang: Option<&str>,
) -> String {
    let mut out = String::with_capacity(192);
    out.push_str("<stream:stream xmlns='");
    out.push_str(ns::CLIENT);
    out.push_str("' xmlns:stream='");
    out.push_str(ns::STREAM);
    out.push('\'');
    for (name, value) in [
        ("to", to),
        ("from", from),
        ("version", version),
        ("xml:lang", lang),
    ] {
        if let Some(v) = value {
            out.push(' ');
            out.push_str(name);
            out.push_str("='");
            escape_into(&mut out, v, true);
            out.push('\'');
        }
    }
    out.push('>');
    out
}

/// The stream's closing tag, as the parser expects it.
pub const STREAM_CLOSE: &str = "</stream:stream>";

/// One piece of what the session core wrote.
#[derive(Debug, PartialEq, Eq)]
pub enum Frame<'a> {
    /// A top-level element, as serialised (namespaces not yet declared).
    Element(&'a str),
    /// `</stream:stream>`: the stream ends.
    Close,
}

/// Cuts serialised output into top-level elements and stream closes.
pub fn split(s: &str) -> Split<'_> {
    Split { s, pos: 0 }
}

pub struct Split<'a> {
    s: &'a str,
    pos: usize,
}

impl<'a> Iterator for Split<'a> {
    type Item = Frame<'a>;

    fn next(&mut self) -> Option<Frame<'a>> {
        let bytes = self.s.as_bytes();
        // Whitespace (keepalives) between elements carries nothing here.
        let start = self.pos + bytes[self.pos..].iter().position(|&b| b == b'<')?;
        let mut depth = 0usize;
        let mut i = start;
        while i < bytes.len() {
            let open = i + bytes[i..].iter().position(|&b| b == b'<')?;
            let close = open + bytes[open..].iter().position(|&b| b == b'>')?;
            i = close + 1;
            if bytes[open + 1] == b'/' {
                if depth == 0 {
                    // A closing tag at the top is the stream's own.
                    self.pos = i;
                    return Some(Frame::Close);
                }
                depth -= 1;
            } else if bytes[close - 1] != b'/' {
                depth += 1;
            }
            if depth == 0 {
                self.pos = i;
                return Some(Frame::Element(&self.s[start..i]));
            }
        }
        // An element cut short is not ours to send.
        self.pos = bytes.len();
        None
    }
}

/// Appends `element` with the namespace declarations a frame of its own
/// needs: `jabber:client` unless it declares a default namespace, and the
/// `stream` prefix for `<stream:features/>` and `<stream:error/>`
/// (RFC 7395 §3.3.3, XEP-0206 §4).
pub fn declare_into(out: &mut String, element: &str) {
    let name_end = element
        .bytes()
        .position(|b| b == b' ' || b == b'>' || b == b'/')
        .unwrap_or(element.len());
    let tag_end = element.find('>').unwrap_or(element.len());
    let start_tag = &element[..tag_end];
    out.push_str(&element[..name_end]);
    if element[1..name_end].starts_with("stream:") {
        if !start_tag.contains(" xmlns:stream=") {
            out.push_str(" xmlns:stream='");
            out.push_str(ns::STREAM);
            out.push('\'');
        }
    } else if !start_tag.contains(" xmlns=") {
        out.push_str(" xmlns='");
        out.push_str(ns::CLIENT);
        out.push('\'');
    }
    out.push_str(&element[name_end..]);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_finds_top_level_elements_and_the_close() {
        let s = "<message to='a@b'><body>x &lt;y&gt;</body><x/></message> <r xmlns='urn:xmpp:sm:3'/><stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error></stream:stream>";
        let frames: Vec<_> = split(s).collect();
        assert_eq!(
            frames,
            vec![
                Frame::Element("<message to='a@b'><body>x &lt;y&gt;</body><x/></message>"),
                Frame::Element("<r xmlns='urn:xmpp:sm:3'/>"),
                Frame::Element(
                    "<stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>"
                ),
                Frame::Close,
            ]
        );
    }

    #[test]
    fn an_element_cut_short_is_not_a_frame() {
        assert_eq!(split("<message><body>").count(), 0);
        assert_eq!(split(" \n ").count(), 0);
    }

    #[test]
    fn declarations_are_added_only_where_missing() {
        let mut out = String::new();
        declare_into(&mut out, "<message to='a@b'><body>x</body></message>");
        assert_eq!(
            out,
            "<message xmlns='jabber:client' to='a@b'><body>x</body></message>"
        );
        out.clear();
        declare_into(&mut out, "<iq/>");
        assert_eq!(out, "<iq xmlns='jabber:client'/>");
        out.clear();
        declare_into(&mut out, "<r xmlns='urn:xmpp:sm:3'/>");
        assert_eq!(out, "<r xmlns='urn:xmpp:sm:3'/>");
        out.clear();
        declare_into(
            &mut out,
            "<stream:features><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>",
        );
        assert_eq!(out, "<stream:features xmlns:stream='http://etherx.jabber.org/streams'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></stream:features>");
        // Parsed back on its own, each frame is namespace-well-formed.
        for frame in ["<iq xmlns='jabber:client'/>", &out] {
            xmpp::xml::parse_element(frame, "").expect("a frame parses on its own");
        }
    }

    #[test]
    fn headers_are_rendered_from_values_and_escaped() {
        let h = Header {
            id: "abc".into(),
            from: "example.com".into(),
            to: Some("u@example.com'".into()),
            version: "1.0",
            lang: "en",
        };
        let mut tag = String::new();
        h.stream_tag(&mut tag);
        assert!(tag.starts_with("<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' id='abc' from='example.com' to='u@example.com&apos;'"));
        let mut open = String::new();
        h.open_element(&mut open);
        let e = xmpp::xml::parse_element(&open, "").expect("open parses");
        assert!(e.is("open", FRAMING));
        assert_eq!(e.get_attr("to"), Some("u@example.com'"));
        let synth = synthetic_header(Some("example.com"), None, Some("1.0"), Some("en"));
        let mut p = xmpp::xml::StreamParser::new(Default::default());
        p.feed(synth.as_bytes());
        match p.next_event() {
            Ok(Some(xmpp::xml::Event::StreamOpen(h))) => {
                assert_eq!(h.to.as_deref(), Some("example.com"));
                assert_eq!(h.default_ns, ns::CLIENT);
            }
            other => panic!("expected a stream header, got {other:?}"),
        }
    }
}
