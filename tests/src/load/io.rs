//! The byte stream a load-generator connection reads and writes: TLS or
//! plain TCP, or XMPP over WebSocket (RFC 7395) on either.
//!
//! Over WebSocket the rest of xmpp-load still sees a byte stream: what it
//! writes as a stream header becomes `<open/>`, `</stream:stream>` becomes
//! `<close/>`, and every other top-level element goes out as a text frame
//! of its own (one element per frame, as RFC 7395 §3.3.3 asks and as
//! browser clients send); the server's `<open/>` and `<close/>` frames are
//! read back as a stream header and a stream end, so the framer and the
//! scenarios are the same for every transport.

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

const FRAMING_NS: &str = "urn:ietf:params:xml:ns:xmpp-framing";

/// A socket, with or without TLS.
pub enum Raw {
    Tcp(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

/// What a logged-in session reads and writes.
pub enum Io {
    Raw(Raw),
    Ws(Box<WsIo>),
}

/// XMPP over a WebSocket, as a byte stream (see the module comment).
pub struct WsIo {
    ws: WebSocketStream<Raw>,
    domain: String,
    /// Received bytes not yet read, from `pos` on.
    unread: Vec<u8>,
    pos: usize,
}

impl WsIo {
    /// The WebSocket handshake at `path` with the `xmpp` subprotocol, over
    /// `raw`, for `domain` (the `Host` the request names).
    pub async fn connect(raw: Raw, domain: &str, path: &str, tls: bool) -> io::Result<WsIo> {
        let scheme = if tls { "wss" } else { "ws" };
        let mut request = format!("{scheme}://{domain}{path}")
            .into_client_request()
            .map_err(io::Error::other)?;
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("xmpp"));
        let (ws, response) = tokio_tungstenite::client_async(request, raw)
            .await
            .map_err(|e| io::Error::other(format!("WebSocket handshake at {path}: {e}")))?;
        // RFC 7395 §3.1: the server must agree to `xmpp`.
        if response
            .headers()
            .get("Sec-WebSocket-Protocol")
            .and_then(|v| v.to_str().ok())
            != Some("xmpp")
        {
            return Err(io::Error::other(
                "the server did not select the `xmpp` WebSocket subprotocol",
            ));
        }
        Ok(WsIo {
            ws,
            domain: domain.to_owned(),
            unread: Vec::new(),
            pos: 0,
        })
    }

    fn poll_read(&mut self, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        while self.pos == self.unread.len() {
            let frame = match ready!(Pin::new(&mut self.ws).poll_next(cx)) {
                // The end of the stream: a read of 0 bytes.
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Err(e)) => return Poll::Ready(Err(io::Error::other(e))),
                Some(Ok(Message::Text(t))) => t,
                // Pings are answered by the codec; nothing else is XMPP.
                Some(Ok(_)) => continue,
            };
            self.unread.clear();
            self.pos = 0;
            let t = frame.as_str();
            if t.starts_with("<open") {
                self.unread.extend_from_slice(
                    format!(
                        "<stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' from='{}' version='1.0'>",
                        xmpp::element::escape(&self.domain)
                    )
                    .as_bytes(),
                );
            } else if t.starts_with("<close") {
                self.unread.extend_from_slice(b"</stream:stream>");
            } else {
                self.unread.extend_from_slice(t.as_bytes());
            }
        }
        let n = buf.remaining().min(self.unread.len() - self.pos);
        buf.put_slice(&self.unread[self.pos..self.pos + n]);
        self.pos += n;
        Poll::Ready(Ok(()))
    }

    /// Sends the first element of `buf` as one frame; returns its length.
    fn poll_write(&mut self, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let (len, text) = match first_element(buf) {
            Some(Element::Header(n)) => (
                n,
                format!(
                    "<open xmlns='{FRAMING_NS}' to='{}' version='1.0'/>",
                    xmpp::element::escape(&self.domain)
                ),
            ),
            Some(Element::Close(n)) => (n, format!("<close xmlns='{FRAMING_NS}'/>")),
            Some(Element::Other(n)) => (
                n,
                std::str::from_utf8(&buf[..n])
                    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "not UTF-8"))?
                    .to_owned(),
            ),
            None => {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "a WebSocket write must hold whole elements",
                )))
            }
        };
        let mut ws = Pin::new(&mut self.ws);
        ready!(ws.as_mut().poll_ready(cx)).map_err(io::Error::other)?;
        ws.start_send(Message::text(text))
            .map_err(io::Error::other)?;
        Poll::Ready(Ok(len))
    }
}

enum Element {
    /// An XML declaration and/or a `<stream:stream>` open tag.
    Header(usize),
    /// `</stream:stream>`.
    Close(usize),
    Other(usize),
}

/// Where the first top-level element of `buf` ends (whitespace before it
/// included). Only for what xmpp-load itself writes: no comments, CDATA or
/// `>` inside attribute values matter beyond quotes.
fn first_element(buf: &[u8]) -> Option<Element> {
    let start = buf.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = &buf[start..];
    if rest.starts_with(b"<?xml") || rest.starts_with(b"<stream:stream") {
        let open = super::framer::find(rest, b"<stream:stream")?;
        let end = open + tag_end(&rest[open..])?;
        return Some(Element::Header(start + end));
    }
    if rest.starts_with(b"</stream:stream>") {
        return Some(Element::Close(start + b"</stream:stream>".len()));
    }
    let mut depth = 0usize;
    let mut i = 0;
    while i < rest.len() {
        if rest[i] != b'<' {
            i += 1;
            continue;
        }
        let end = i + tag_end(&rest[i..])?;
        let tag = &rest[i..end];
        if tag.starts_with(b"</") {
            depth = depth.checked_sub(1)?;
        } else if !tag.ends_with(b"/>") {
            depth += 1;
        }
        i = end;
        if depth == 0 {
            return Some(Element::Other(start + end));
        }
    }
    None
}

/// The length of the tag `buf` starts with, through its `>` (quotes skipped).
fn tag_end(buf: &[u8]) -> Option<usize> {
    let mut quote = None;
    for (i, &b) in buf.iter().enumerate() {
        match quote {
            Some(q) if b == q => quote = None,
            Some(_) => {}
            None if b == b'\'' || b == b'"' => quote = Some(b),
            None if b == b'>' => return Some(i + 1),
            None => {}
        }
    }
    None
}

impl AsyncRead for Raw {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Raw::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Raw::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Raw {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Raw::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Raw::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Raw::Tcp(s) => Pin::new(s).poll_flush(cx),
            Raw::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Raw::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Raw::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Raw(s) => Pin::new(s).poll_read(cx, buf),
            Io::Ws(w) => w.poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Io {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Io::Raw(s) => Pin::new(s).poll_write(cx, buf),
            Io::Ws(w) => w.poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Raw(s) => Pin::new(s).poll_flush(cx),
            Io::Ws(w) => Pin::new(&mut w.ws).poll_flush(cx).map_err(io::Error::other),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Raw(s) => Pin::new(s).poll_shutdown(cx),
            Io::Ws(w) => Pin::new(&mut w.ws).poll_close(cx).map_err(io::Error::other),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lens(mut buf: &[u8]) -> Vec<String> {
        let mut out = Vec::new();
        while !buf.is_empty() {
            let (n, kind) = match first_element(buf).expect("an element") {
                Element::Header(n) => (n, "H"),
                Element::Close(n) => (n, "C"),
                Element::Other(n) => (n, "E"),
            };
            out.push(format!(
                "{kind}:{}",
                String::from_utf8_lossy(&buf[..n]).trim()
            ));
            buf = &buf[n..];
        }
        out
    }

    #[test]
    fn writes_split_into_one_element_each() {
        assert_eq!(
            lens(b"<?xml version='1.0'?><stream:stream xmlns='jabber:client' to='a>b'>"),
            ["H:<?xml version='1.0'?><stream:stream xmlns='jabber:client' to='a>b'>"]
        );
        assert_eq!(
            lens(b"<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq><presence/>"),
            [
                "E:<iq type='get' id='r'><query xmlns='jabber:iq:roster'/></iq>",
                "E:<presence/>"
            ]
        );
        assert_eq!(
            lens(b"<message to='u@d' id=\"x/>\"><body>a &lt; b</body></message> </stream:stream>"),
            [
                "E:<message to='u@d' id=\"x/>\"><body>a &lt; b</body></message>",
                "C:</stream:stream>"
            ]
        );
        // Half an element is not a frame.
        assert!(first_element(b"<message><body>hi</body>").is_none());
    }
}
