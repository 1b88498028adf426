//! A logged-in connection on the hot path: an output buffer written
//! without blocking reads, and received bytes framed into stanzas that a
//! scenario scans in place.
//!
//! Reads and writes are polled side by side from one `poll_fn`, never one
//! awaited after the other: a client that stops reading while its write is
//! stuck can deadlock with a server that does the same.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::framer::{find, Frame, Framer};
use super::io::Io;
use super::session::Session;

/// At most this many reads per poll, so one busy connection cannot starve
/// the others driven by the same task.
const READS_PER_POLL: usize = 16;
const READ_CHUNK: usize = 16 * 1024;

pub struct Conn {
    io: Io,
    framer: Framer,
    /// Bytes to send; `out_pos` of them are already written.
    pub out: Vec<u8>,
    out_pos: usize,
    flushing: bool,
}

impl Conn {
    pub fn new(s: Session) -> Conn {
        Conn {
            io: s.io,
            framer: s.framer,
            out: Vec::with_capacity(4096),
            out_pos: 0,
            flushing: false,
        }
    }

    /// Writes what is queued in [`Conn::out`]; `Ready(Ok)` once all of it
    /// reached the socket.
    pub fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_pos < self.out.len() {
            match Pin::new(&mut self.io).poll_write(cx, &self.out[self.out_pos..]) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Poll::Ready(Ok(n)) => {
                    self.out_pos += n;
                    self.flushing = true;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
        self.out.clear();
        self.out_pos = 0;
        if self.flushing {
            // TLS records accepted by rustls may still wait for the socket.
            match Pin::new(&mut self.io).poll_flush(cx) {
                Poll::Ready(Ok(())) => self.flushing = false,
                other => return other,
            }
        }
        Poll::Ready(Ok(()))
    }

    /// Reads what the socket has and calls `on_stanza` with each complete
    /// stanza and the output buffer (for replies). `Pending` when the socket
    /// is drained; `Ready(Err)` when the server closed the stream or failed.
    pub fn poll_recv(
        &mut self,
        cx: &mut Context<'_>,
        mut on_stanza: impl FnMut(&[u8], &mut Vec<u8>),
    ) -> Poll<io::Result<()>> {
        let mut reads = 0;
        loop {
            while let Some(frame) = self.framer.next_frame() {
                match frame {
                    Frame::Stanza(s, e) => {
                        let stanza = &self.framer.buffer()[s..e];
                        if stanza.starts_with(b"<stream:error") {
                            return Poll::Ready(Err(io::Error::other(format!(
                                "stream error from the server: {}",
                                String::from_utf8_lossy(stanza)
                            ))));
                        }
                        on_stanza(stanza, &mut self.out);
                    }
                    Frame::Header(..) => {}
                    Frame::Close => {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the server closed the stream",
                        )))
                    }
                }
            }
            if reads == READS_PER_POLL {
                cx.waker().wake_by_ref();
                return Poll::Pending;
            }
            reads += 1;
            let mut rb = ReadBuf::new(self.framer.read_buf(READ_CHUNK));
            match Pin::new(&mut self.io).poll_read(cx, &mut rb) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {
                    let n = rb.filled().len();
                    if n == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "the server closed the connection",
                        )));
                    }
                    self.framer.filled(n);
                }
            }
        }
    }

    /// Drives reads and writes until an error; used by idle connections.
    pub async fn idle(&mut self) -> io::Error {
        std::future::poll_fn(|cx| {
            if let Poll::Ready(Err(e)) = self.poll_recv(cx, answer_iq) {
                return Poll::Ready(e);
            }
            if let Poll::Ready(Err(e)) = self.poll_send(cx) {
                return Poll::Ready(e);
            }
            Poll::Pending
        })
        .await
    }
}

/// The start tag of a stanza (up to its first `>`).
pub fn head(stanza: &[u8]) -> &[u8] {
    match stanza.iter().position(|&b| b == b'>') {
        Some(p) => &stanza[..p],
        None => stanza,
    }
}

/// An attribute value in a start tag, either quote style (no unescaping:
/// values copied back into a reply stay escaped).
pub fn attr<'a>(head: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let mut from = 0;
    while let Some(p) = find(&head[from..], name.as_bytes()) {
        let at = from + p;
        let after = at + name.len();
        let boundary = at > 0 && head[at - 1].is_ascii_whitespace();
        if boundary && head.get(after) == Some(&b'=') {
            let q = *head.get(after + 1)?;
            let rest = &head[after + 2..];
            let end = rest.iter().position(|&b| b == q)?;
            return Some(&rest[..end]);
        }
        from = after;
    }
    None
}

/// RFC 6120 §8.2.3: an IQ get or set must be answered. Pings (XEP-0199)
/// get a result, anything else `service-unavailable`; results are ignored.
pub fn answer_iq(stanza: &[u8], out: &mut Vec<u8>) {
    if !stanza.starts_with(b"<iq") {
        return;
    }
    let h = head(stanza);
    match attr(h, "type") {
        Some(b"get") | Some(b"set") => {}
        _ => return,
    }
    let ping = find(stanza, b"urn:xmpp:ping").is_some();
    out.extend_from_slice(if ping {
        b"<iq type='result'"
    } else {
        b"<iq type='error'"
    });
    for (name, key) in [("id", &b" id='"[..]), ("from", &b" to='"[..])] {
        if let Some(v) = attr(h, name) {
            out.extend_from_slice(key);
            // Values never contain `'` unescaped (the server escaped them).
            out.extend_from_slice(v);
            out.push(b'\'');
        }
    }
    if ping {
        out.extend_from_slice(b"/>");
    } else {
        out.extend_from_slice(b"><error type='cancel'><service-unavailable xmlns='urn:ietf:params:xml:ns:xmpp-stanzas'/></error></iq>");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attributes_in_either_quote_style() {
        let h = head(b"<message xml:id='x' id=\"a1\" from='u@d/r' type='chat'><body/></message>");
        assert_eq!(attr(h, "id"), Some(&b"a1"[..]));
        assert_eq!(attr(h, "from"), Some(&b"u@d/r"[..]));
        assert_eq!(attr(h, "type"), Some(&b"chat"[..]));
        assert_eq!(attr(h, "to"), None);
    }

    #[test]
    fn pings_are_answered_and_results_ignored() {
        let mut out = Vec::new();
        answer_iq(
            b"<iq from='localhost' id='p1' type='get'><ping xmlns='urn:xmpp:ping'/></iq>",
            &mut out,
        );
        assert_eq!(out, b"<iq type='result' id='p1' to='localhost'/>");
        out.clear();
        answer_iq(b"<iq id='r' type='result'/>", &mut out);
        assert!(out.is_empty());
        answer_iq(
            b"<iq id='q' type='get'><query xmlns='jabber:iq:version'/></iq>",
            &mut out,
        );
        assert!(out.starts_with(b"<iq type='error' id='q'>"));
    }
}
