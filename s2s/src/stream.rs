//! One s2s connection: the socket (plain, or TLS as either end), the
//! parser, and writing headers, elements and stream errors.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use rand::RngCore;
use rustls_pki_types::CertificateDer;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use xmpp::element::{escape_into, Element};
use xmpp::error::StreamError;
use xmpp::stanza::ns;
use xmpp::xml::{Event, StreamHeader, StreamParser};

pub enum Io {
    Plain(TcpStream),
    Server(Box<tokio_rustls::server::TlsStream<TcpStream>>),
    Client(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Upgrading,
}

fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "connection is being upgraded")
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Server(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Client(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Upgrading => Poll::Ready(Err(gone())),
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
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Server(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Client(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Server(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Client(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Upgrading => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Server(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Client(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Upgrading => Poll::Ready(Ok(())),
        }
    }
}

/// Why a stream ended.
#[derive(Debug, thiserror::Error)]
pub enum StreamEnd {
    /// We close with this stream error (written to the peer first).
    #[error("stream error <{cond}/>: {1}", cond = .0.condition())]
    Error(StreamError, String),
    /// The peer sent a stream error.
    #[error("the peer sent <{0}/>{1}")]
    PeerError(String, String),
    #[error("closed by the peer")]
    Closed,
    #[error("connection lost")]
    Lost,
    #[error("i/o: {0}")]
    Io(#[from] io::Error),
    #[error("{0}")]
    Failed(String),
}

impl StreamEnd {
    pub fn err(e: StreamError, text: impl Into<String>) -> StreamEnd {
        StreamEnd::Error(e, text.into())
    }
}

pub struct Conn {
    pub io: Io,
    pub parser: StreamParser,
    pub peer: SocketAddr,
    write_timeout: Duration,
    header_sent: bool,
    dead: bool,
    out: String,
}

pub fn new_stream_id() -> String {
    let mut id = [0u8; 16];
    rand::thread_rng().fill_bytes(&mut id);
    id.iter().map(|b| format!("{b:02x}")).collect()
}

impl Conn {
    pub fn new(
        io: Io,
        peer: SocketAddr,
        limits: xmpp::xml::Limits,
        write_timeout: Duration,
    ) -> Conn {
        Conn {
            io,
            parser: StreamParser::new(limits),
            peer,
            write_timeout,
            header_sent: false,
            dead: false,
            out: String::new(),
        }
    }

    pub fn is_tls(&self) -> bool {
        matches!(self.io, Io::Server(_) | Io::Client(_))
    }

    /// The negotiated TLS version, empty before TLS.
    pub fn tls_version(&self) -> String {
        let v = match &self.io {
            Io::Server(s) => s.get_ref().1.protocol_version(),
            Io::Client(s) => s.get_ref().1.protocol_version(),
            _ => None,
        };
        v.map(|v| format!("{v:?}")).unwrap_or_default()
    }

    /// The peer's certificate chain, leaf first.
    pub fn peer_chain(&self) -> Vec<CertificateDer<'static>> {
        let certs = match &self.io {
            Io::Server(s) => s.get_ref().1.peer_certificates(),
            Io::Client(s) => s.get_ref().1.peer_certificates(),
            _ => None,
        };
        certs
            .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
            .unwrap_or_default()
    }

    pub async fn next_event(&mut self) -> Result<Event, StreamEnd> {
        loop {
            match self.parser.next_event() {
                Ok(Some(ev)) => return Ok(ev),
                Ok(None) => {}
                Err(e) => return Err(StreamEnd::Error(e.stream_error(), e.to_string())),
            }
            self.fill().await?;
        }
    }

    /// The next element (stream errors and closes become `Err`).
    pub async fn next_element(&mut self) -> Result<Element, StreamEnd> {
        match self.next_event().await? {
            Event::Element(e) if e.is("error", ns::STREAM) => Err(peer_error(&e)),
            Event::Element(e) => Ok(e),
            Event::StreamClose => Err(StreamEnd::Closed),
            Event::StreamOpen(_) => Err(StreamEnd::err(
                StreamError::NotWellFormed,
                "a second stream header without a restart",
            )),
        }
    }

    pub async fn next_header(&mut self) -> Result<StreamHeader, StreamEnd> {
        match self.next_event().await? {
            Event::StreamOpen(h) => Ok(h),
            Event::StreamClose => Err(StreamEnd::Closed),
            Event::Element(e) if e.is("error", ns::STREAM) => Err(peer_error(&e)),
            Event::Element(_) => Err(StreamEnd::err(
                StreamError::NotWellFormed,
                "expected a stream header",
            )),
        }
    }

    async fn fill(&mut self) -> Result<(), StreamEnd> {
        let mut scratch = [0u8; 4096];
        let n = tokio::io::AsyncReadExt::read(&mut self.io, &mut scratch).await?;
        if n == 0 {
            return Err(StreamEnd::Lost);
        }
        self.parser.feed(&scratch[..n]);
        Ok(())
    }

    /// Our stream header (RFC 6120 §4.7), with the dialback namespace
    /// declared (XEP-0220 §2.1) and a `version` so features follow.
    pub async fn write_header(
        &mut self,
        from: &str,
        to: Option<&str>,
        id: Option<&str>,
    ) -> Result<(), StreamEnd> {
        let mut s = String::with_capacity(256);
        s.push_str("<?xml version='1.0'?><stream:stream xmlns='");
        s.push_str(ns::SERVER);
        s.push_str("' xmlns:stream='");
        s.push_str(ns::STREAM);
        s.push_str("' xmlns:db='");
        s.push_str(crate::dialback::NS);
        s.push_str("' from='");
        escape_into(&mut s, from, true);
        s.push('\'');
        if let Some(to) = to {
            s.push_str(" to='");
            escape_into(&mut s, to, true);
            s.push('\'');
        }
        if let Some(id) = id {
            s.push_str(" id='");
            escape_into(&mut s, id, true);
            s.push('\'');
        }
        s.push_str(" version='1.0' xml:lang='en'>");
        self.header_sent = true;
        self.write_raw(&s).await
    }

    /// After `<proceed/>`: nothing received in plaintext survives into
    /// the TLS stream (RFC 6120 §5.3.4).
    pub fn reset_for_tls(&mut self) {
        self.parser.discard_buffer();
        self.reset();
    }

    pub fn reset(&mut self) {
        self.parser.reset();
        self.header_sent = false;
    }

    /// Writes elements, serialised for a `jabber:server` stream.
    pub async fn send(&mut self, e: &Element) -> Result<(), StreamEnd> {
        self.out.clear();
        // `<stream:features/>` and `<db:result/>` keep the prefixes our
        // header declared: ejabberd matches dialback elements by their
        // prefixed name, not by namespace.
        let prefix = match e.ns.as_str() {
            ns::STREAM => Some("stream"),
            crate::dialback::NS => Some("db"),
            _ => None,
        };
        if let Some(prefix) = prefix {
            write_prefixed(&mut self.out, prefix, e);
        } else {
            e.write_to(&mut self.out, ns::SERVER);
        }
        let out = std::mem::take(&mut self.out);
        let r = self.write_raw(&out).await;
        self.out = out;
        r
    }

    pub async fn write_raw(&mut self, s: &str) -> Result<(), StreamEnd> {
        if self.dead {
            return Err(StreamEnd::Lost);
        }
        let io = &mut self.io;
        let write = async move {
            io.write_all(s.as_bytes()).await?;
            io.flush().await
        };
        match tokio::time::timeout(self.write_timeout, write).await {
            Ok(r) => Ok(r?),
            Err(_) => {
                self.dead = true;
                Err(StreamEnd::err(
                    StreamError::ConnectionTimeout,
                    "the peer stopped reading",
                ))
            }
        }
    }

    /// Closes with a stream error (RFC 6120 §4.9.1.1), our header first if
    /// the peer never saw one.
    pub async fn close_with_error(&mut self, from: &str, error: StreamError, text: &str) {
        if !self.header_sent {
            let _ = self.write_header(from, None, None).await;
        }
        let mut s = error.to_xml(Some(text));
        s.push_str("</stream:stream>");
        let _ = self.write_raw(&s).await;
        self.shutdown().await;
    }

    pub async fn close(&mut self) {
        let _ = self.write_raw("</stream:stream>").await;
        self.shutdown().await;
    }

    pub async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(Duration::from_secs(2), self.io.shutdown()).await;
    }
}

/// `e` as `<prefix:name …>` with the default namespace `jabber:server`
/// in scope for its children.
fn write_prefixed(out: &mut String, prefix: &str, e: &Element) {
    out.push('<');
    out.push_str(prefix);
    out.push(':');
    out.push_str(&e.name);
    for (k, v) in &e.attrs {
        out.push(' ');
        out.push_str(k);
        out.push_str("='");
        escape_into(out, v, true);
        out.push('\'');
    }
    if e.children.is_empty() {
        out.push_str("/>");
        return;
    }
    out.push('>');
    for n in &e.children {
        match n {
            xmpp::element::Node::Element(c) => c.write_to(out, ns::SERVER),
            xmpp::element::Node::Text(t) => escape_into(out, t, false),
        }
    }
    out.push_str("</");
    out.push_str(prefix);
    out.push(':');
    out.push_str(&e.name);
    out.push('>');
}

/// A `<stream:error/>` the peer sent, as a `StreamEnd`.
pub fn peer_error(e: &Element) -> StreamEnd {
    let condition = e
        .elements()
        .find(|c| c.ns == ns::STREAMS && c.name != "text")
        .map(|c| c.name.clone())
        .unwrap_or_else(|| "undefined-condition".into());
    let text = e
        .child_text("text", ns::STREAMS)
        .map(|t| format!(" ({t})"))
        .unwrap_or_default();
    StreamEnd::PeerError(condition, text)
}
