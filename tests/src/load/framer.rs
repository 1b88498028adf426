//! Finds where each first-level element of an XMPP stream ends, without
//! building anything.
//!
//! During negotiation the few stanzas are parsed for real (the framed bytes
//! go through [`xmpp::xml::StreamParser`]); once a session is up, the hot
//! path only needs to know where a stanza starts and ends and to scan it for
//! the load generator's marker, so building an element tree for each of
//! hundreds of thousands of messages per second would be wasted work.
//!
//! The framer keeps its lexical state between reads, so a stanza split over
//! several reads is scanned once. It trusts the server to be well formed
//! (it is the server under test, not an attacker): it tracks only tags,
//! quotes, `<?…?>`/`<!…>` and CDATA sections, enough to count depth.

/// A complete unit, as a byte range of [`Framer::buffer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// The `<stream:stream …>` open tag, with any XML declaration before it.
    Header(usize, usize),
    /// One first-level element (a stanza or a negotiation element).
    Stanza(usize, usize),
    /// `</stream:stream>`.
    Close,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lex {
    Text,
    /// Just after `<`.
    Lt,
    /// Inside a start tag; the open quote (0 outside a value) and whether
    /// the last byte was `/`.
    StartTag {
        quote: u8,
        slash: bool,
    },
    EndTag,
    /// `<?…?>` or `<!…>` other than CDATA: skipped to the next `>`.
    Special,
    /// After `<!`, this many bytes of `[CDATA[` matched.
    Bang(u8),
    /// Inside CDATA, with this many `]` just seen.
    CData(u8),
}

const CDATA_OPEN: &[u8] = b"[CDATA[";

/// Keep at most this much consumed space before compacting the buffer.
const COMPACT_ABOVE: usize = 64 * 1024;

pub struct Framer {
    /// Always initialised; bytes `..end` are data.
    buf: Vec<u8>,
    end: usize,
    /// Start of the unit being scanned (first unconsumed byte).
    start: usize,
    /// Next byte to look at.
    pos: usize,
    lex: Lex,
    /// 0 outside the stream root, 1 between stanzas, 2+ inside one.
    depth: usize,
}

impl Default for Framer {
    fn default() -> Self {
        Self::new()
    }
}

impl Framer {
    pub fn new() -> Framer {
        Framer {
            buf: vec![0; 4096],
            end: 0,
            start: 0,
            pos: 0,
            lex: Lex::Text,
            depth: 0,
        }
    }

    /// The bytes frames refer to; valid until the next [`Framer::read_buf`].
    pub fn buffer(&self) -> &[u8] {
        &self.buf[..self.end]
    }

    /// Space to read into (at least `min` bytes); call [`Framer::filled`]
    /// with the count read. Consumed bytes are dropped here, so frame
    /// ranges from before are invalid afterwards.
    pub fn read_buf(&mut self, min: usize) -> &mut [u8] {
        if self.start == self.end {
            self.end = 0;
            self.pos = 0;
            self.start = 0;
        } else if self.start > COMPACT_ABOVE || self.buf.len() - self.end < min {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.pos -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < min {
            // Zero-filled once per growth; the space is reused afterwards.
            self.buf.resize(self.end + min.max(self.buf.len()), 0);
        }
        &mut self.buf[self.end..]
    }

    /// Records `n` bytes written into [`Framer::read_buf`].
    pub fn filled(&mut self, n: usize) {
        self.end += n;
        assert!(self.end <= self.buf.len());
    }

    /// Appends bytes (for tests and for callers without a reader).
    pub fn feed(&mut self, bytes: &[u8]) {
        let dst = self.read_buf(bytes.len());
        dst[..bytes.len()].copy_from_slice(bytes);
        self.filled(bytes.len());
    }

    /// A new stream starts (after STARTTLS or SASL success); bytes already
    /// buffered are kept and rescanned.
    pub fn restart(&mut self) {
        self.pos = self.start;
        self.lex = Lex::Text;
        self.depth = 0;
    }

    /// Drops everything buffered (the plaintext stream ends at STARTTLS).
    pub fn clear(&mut self) {
        self.end = 0;
        self.start = 0;
        self.restart();
    }

    /// Whether unconsumed bytes are buffered.
    pub fn has_partial(&self) -> bool {
        self.start < self.end
    }

    /// The next complete unit, or `None` when more bytes are needed.
    pub fn next_frame(&mut self) -> Option<Frame> {
        let buf = &self.buf[..self.end];
        let mut i = self.pos;
        while i < buf.len() {
            let b = buf[i];
            i += 1;
            match self.lex {
                Lex::Text => {
                    if b == b'<' {
                        self.lex = Lex::Lt;
                    } else if self.depth <= 1 && self.start == i - 1 {
                        // Whitespace between stanzas belongs to no frame.
                        self.start = i;
                    }
                }
                Lex::Lt => {
                    self.lex = match b {
                        b'/' => Lex::EndTag,
                        b'?' => Lex::Special,
                        b'!' => Lex::Bang(0),
                        _ => Lex::StartTag {
                            quote: 0,
                            slash: false,
                        },
                    }
                }
                Lex::StartTag { quote, slash } => {
                    if quote != 0 {
                        if b == quote {
                            self.lex = Lex::StartTag {
                                quote: 0,
                                slash: false,
                            };
                        }
                    } else if b == b'"' || b == b'\'' {
                        self.lex = Lex::StartTag { quote: b, slash };
                    } else if b == b'>' {
                        self.lex = Lex::Text;
                        if self.depth == 0 {
                            self.depth = 1;
                            return Some(self.emit(i, true));
                        }
                        if slash {
                            if self.depth == 1 {
                                return Some(self.emit(i, false));
                            }
                        } else {
                            self.depth += 1;
                        }
                    } else {
                        self.lex = Lex::StartTag {
                            quote: 0,
                            slash: b == b'/',
                        };
                    }
                }
                Lex::EndTag => {
                    if b == b'>' {
                        self.lex = Lex::Text;
                        self.depth = self.depth.saturating_sub(1);
                        match self.depth {
                            0 => {
                                self.start = i;
                                self.pos = i;
                                return Some(Frame::Close);
                            }
                            1 => return Some(self.emit(i, false)),
                            _ => {}
                        }
                    }
                }
                Lex::Special => {
                    if b == b'>' {
                        self.lex = Lex::Text;
                    }
                }
                Lex::Bang(n) => {
                    if b == CDATA_OPEN[n as usize] {
                        self.lex = if n as usize + 1 == CDATA_OPEN.len() {
                            Lex::CData(0)
                        } else {
                            Lex::Bang(n + 1)
                        };
                    } else {
                        self.lex = if b == b'>' { Lex::Text } else { Lex::Special };
                    }
                }
                Lex::CData(n) => {
                    self.lex = match b {
                        b']' => Lex::CData((n + 1).min(2)),
                        b'>' if n == 2 => Lex::Text,
                        _ => Lex::CData(0),
                    };
                }
            }
        }
        self.pos = i;
        None
    }

    fn emit(&mut self, end: usize, header: bool) -> Frame {
        let start = self.start;
        self.start = end;
        self.pos = end;
        if header {
            Frame::Header(start, end)
        } else {
            Frame::Stanza(start, end)
        }
    }
}

/// Where `needle` first occurs in `hay`.
pub fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    let (&first, rest) = needle.split_first()?;
    let mut from = 0;
    while let Some(p) = hay[from..].iter().position(|&b| b == first) {
        let at = from + p;
        if hay[at + 1..].starts_with(rest) {
            return Some(at);
        }
        from = at + 1;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(f: &mut Framer) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(fr) = f.next_frame() {
            out.push(match fr {
                Frame::Header(s, e) => format!("H:{}", String::from_utf8_lossy(&f.buffer()[s..e])),
                Frame::Stanza(s, e) => format!("S:{}", String::from_utf8_lossy(&f.buffer()[s..e])),
                Frame::Close => "C".into(),
            });
        }
        out
    }

    #[test]
    fn frames_header_stanzas_and_close() {
        let mut f = Framer::new();
        f.feed(b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' id='a>b'> <a/>\n<message to='x'><body>1 &lt; 2 <![CDATA[</body>]]></body></message></stream:stream>");
        assert_eq!(
            frames(&mut f),
            vec![
                "H:<?xml version='1.0'?><stream:stream xmlns='jabber:client' id='a>b'>".to_owned(),
                "S:<a/>".into(),
                "S:<message to='x'><body>1 &lt; 2 <![CDATA[</body>]]></body></message>".into(),
                "C".into(),
            ]
        );
    }

    #[test]
    fn a_stanza_split_byte_by_byte_is_framed_once() {
        let text = b"<stream:stream><iq type='result' id='1'><x a=\"/>\"/></iq><p/>";
        let mut f = Framer::new();
        let mut got = Vec::new();
        for b in text {
            f.feed(&[*b]);
            got.extend(frames(&mut f));
        }
        assert_eq!(
            got,
            vec![
                "H:<stream:stream>".to_owned(),
                "S:<iq type='result' id='1'><x a=\"/>\"/></iq>".into(),
                "S:<p/>".into()
            ]
        );
    }

    #[test]
    fn restart_rescans_buffered_bytes_as_a_new_stream() {
        let mut f = Framer::new();
        f.feed(b"<stream:stream><success/><stream:stream><features/>");
        assert_eq!(frames(&mut f)[..2], ["H:<stream:stream>", "S:<success/>"]);
        // The framer saw the second header as a stanza start; after a
        // restart the same bytes are a header.
        f.restart();
        assert_eq!(frames(&mut f), ["H:<stream:stream>", "S:<features/>"]);
    }

    #[test]
    fn find_locates_needles() {
        assert_eq!(find(b"abc~xl~12", b"~xl~"), Some(3));
        assert_eq!(find(b"~x~xl", b"~xl~"), None);
        assert_eq!(find(b"", b"a"), None);
    }
}
