//! The transport under a client connection: plain TCP until STARTTLS,
//! then TLS; TLS from the first byte on the direct-TLS listener; or one
//! of the HTTP transports (WebSocket, BOSH), whose frames
//! [`super::stream::Stream`] translates with [`super::framing`].

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use super::tls_io::TlsIo;

pub enum Io {
    Plain(TcpStream),
    Tls(Box<TlsIo>),
    /// Between taking the TCP stream for the TLS handshake and getting it back.
    Upgrading,
    /// RFC 7395: one element per text frame.
    Ws(Box<crate::http::ws::WsIo>),
    /// XEP-0206: elements in `<body/>` wrappers of HTTP requests.
    Bosh(Box<crate::http::bosh::Link>),
}

impl Io {
    /// Whether what the client sends is encrypted: TLS here, or HTTPS (or
    /// a TLS-terminating proxy the operator vouches for) under HTTP.
    pub fn is_tls(&self) -> bool {
        match self {
            Io::Tls(_) => true,
            Io::Ws(w) => w.secure,
            Io::Bosh(b) => b.secure,
            Io::Plain(_) | Io::Upgrading => false,
        }
    }

    /// Whether `<starttls/>` can be offered: only on a plain TCP stream.
    pub fn can_starttls(&self) -> bool {
        matches!(self, Io::Plain(_))
    }

    /// Whether the transport carries frames rather than a byte stream.
    pub fn is_framed(&self) -> bool {
        matches!(self, Io::Ws(_) | Io::Bosh(_))
    }

    /// What the transport is, for logs and `clusterctl sessions`.
    pub fn kind(&self) -> &'static str {
        match self {
            Io::Plain(_) | Io::Upgrading => "tcp",
            Io::Tls(_) => "tls",
            Io::Ws(_) => "websocket",
            Io::Bosh(_) => "bosh",
        }
    }
}

/// The byte-stream interface is for TCP and TLS; the framed transports are
/// read and written by `Stream` itself.
fn gone() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "not a byte stream")
}

impl AsyncRead for Io {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Io::Upgrading | Io::Ws(_) | Io::Bosh(_) => Poll::Ready(Err(gone())),
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
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Io::Upgrading | Io::Ws(_) | Io::Bosh(_) => Poll::Ready(Err(gone())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Io::Upgrading | Io::Ws(_) | Io::Bosh(_) => Poll::Ready(Err(gone())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Io::Upgrading | Io::Ws(_) | Io::Bosh(_) => Poll::Ready(Ok(())),
        }
    }
}
