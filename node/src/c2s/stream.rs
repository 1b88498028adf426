//! One client connection's stream: the socket, the parser's buffer, and
//! writing stream headers, elements and stream errors (RFC 6120 §4).

use std::net::SocketAddr;
use std::sync::Arc;

use rand::RngCore;
use tokio::io::{AsyncRead, AsyncWriteExt};
use xmpp::element::Element;
use xmpp::error::StreamError;
use xmpp::stanza::ns;
use xmpp::xml::{Event, StreamHeader, StreamParser};

use super::framing::Header;
use super::io::Io;
use crate::Server;

/// Why a connection ended.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// We close the stream with this error (written to the peer first).
    #[error("stream error {0}: {1:?}")]
    Stream(StreamError, Option<String>),
    /// The peer closed its stream.
    #[error("closed by peer")]
    Closed,
    /// The connection ended without a stream close (EOF, reset): with
    /// stream management, the session may be resumed.
    #[error("connection lost")]
    Lost,
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
}

impl ConnError {
    pub fn stream(e: StreamError, text: impl Into<String>) -> ConnError {
        ConnError::Stream(e, Some(text.into()))
    }
}

/// Read buffer size: one TLS record's worth.
const READ_CHUNK: usize = 4096;

pub struct Stream {
    pub server: Arc<Server>,
    pub io: Io,
    pub parser: StreamParser,
    pub peer: SocketAddr,
    /// The virtual host this stream is for (from the client's `to`).
    pub vhost: String,
    /// Channel-binding data of the TLS connection, once there is one.
    pub cb: xmpp::sasl::ChannelBindings,
    /// A write timed out: nothing more is written to this peer.
    write_dead: bool,
    /// Whether our stream header is out (a stream error must follow one).
    header_sent: bool,
    /// The client's stream open, kept for the `to` of our reply header.
    client_from: Option<String>,
    /// Counted in `xmpp_connections` while the stream lives.
    pub counted: crate::metrics::Connection,
}

impl Stream {
    pub fn new(server: Arc<Server>, io: Io, peer: SocketAddr) -> Stream {
        let limits = server.config.limits.parser();
        let counted = server.metrics.connection(io.kind());
        Stream {
            server,
            io,
            parser: StreamParser::new(limits),
            peer,
            vhost: String::new(),
            cb: Default::default(),
            write_dead: false,
            header_sent: false,
            client_from: None,
            counted,
        }
    }

    /// Reads until the parser yields an event. Cancel-safe: bytes read are
    /// in the parser before the next await.
    pub async fn next_event(&mut self) -> Result<Event, ConnError> {
        loop {
            if let Some(ev) = self.parse_buffered()? {
                return Ok(ev);
            }
            self.fill().await?;
        }
    }

    /// The next event already in the buffer, if any.
    pub fn parse_buffered(&mut self) -> Result<Option<Event>, ConnError> {
        self.parser.next_event().map_err(|e| {
            let text = e.to_string();
            ConnError::Stream(e.stream_error(), Some(text))
        })
    }

    /// Reads once from the socket into the parser.
    ///
    /// The read goes through a buffer on the stack of the poll, not one
    /// kept per connection: an idle connection holds no read buffer of its
    /// own (rustls keeps its 4 KiB record buffer anyway).
    pub async fn fill(&mut self) -> Result<(), ConnError> {
        match &mut self.io {
            Io::Ws(ws) => return ws.fill(&mut self.parser).await,
            Io::Bosh(b) => return b.fill(&mut self.parser).await,
            _ => {}
        }
        let n = std::future::poll_fn(|cx| {
            let mut scratch = [0u8; READ_CHUNK];
            let mut buf = tokio::io::ReadBuf::new(&mut scratch);
            match std::pin::Pin::new(&mut self.io).poll_read(cx, &mut buf) {
                std::task::Poll::Ready(Ok(())) => {
                    let n = buf.filled().len();
                    self.parser.feed(buf.filled());
                    std::task::Poll::Ready(Ok(n))
                }
                std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
                std::task::Poll::Pending => std::task::Poll::Pending,
            }
        })
        .await?;
        if n == 0 {
            return Err(ConnError::Lost);
        }
        Ok(())
    }

    /// Waits for the client's stream header and answers with ours (RFC 6120
    /// §4.2, §4.7); checks the namespace, version and virtual host.
    pub async fn open(&mut self) -> Result<(), ConnError> {
        self.header_sent = false;
        let header = match self.next_event().await? {
            Event::StreamOpen(h) => h,
            Event::StreamClose => return Err(ConnError::Closed),
            Event::Element(_) => {
                return Err(ConnError::stream(
                    StreamError::NotWellFormed,
                    "expected a stream header",
                ))
            }
        };
        self.check_header(&header)?;
        self.write_header().await
    }

    fn check_header(&mut self, h: &StreamHeader) -> Result<(), ConnError> {
        self.client_from = h.from.clone();
        // Pick the host first, so that any stream error below comes from it.
        let to = h.to.as_deref().and_then(|t| xmpp::jid::nameprep(t).ok());
        match to {
            Some(t) if self.server.config.is_local_domain(&t) => {
                if !self.vhost.is_empty() && self.vhost != t {
                    // A restarted stream (after TLS or SASL) must keep its host.
                    return Err(ConnError::stream(
                        StreamError::HostUnknown,
                        "the host changed on a stream restart",
                    ));
                }
                self.vhost = t;
            }
            other => {
                if self.vhost.is_empty() {
                    self.vhost = self.server.config.vhosts[0].name.clone();
                }
                let text = match other {
                    Some(t) => format!("this server does not serve {t}"),
                    None => "the stream header has no valid 'to'".into(),
                };
                return Err(ConnError::Stream(StreamError::HostUnknown, Some(text)));
            }
        }
        if h.default_ns != ns::CLIENT {
            return Err(ConnError::stream(
                StreamError::InvalidNamespace,
                "client streams use the jabber:client namespace",
            ));
        }
        // RFC 6120 §4.7.5: we speak 1.0; a missing version means 0.9.
        let major = h
            .version
            .as_deref()
            .and_then(|v| v.split('.').next()?.parse::<u32>().ok());
        if major != Some(1) {
            return Err(ConnError::stream(
                StreamError::UnsupportedVersion,
                "XMPP version 1.0 is required",
            ));
        }
        Ok(())
    }

    async fn write_header(&mut self) -> Result<(), ConnError> {
        let mut id = [0u8; 12];
        rand::thread_rng().fill_bytes(&mut id);
        let header = Header {
            id: id.iter().map(|b| format!("{b:02x}")).collect(),
            from: self.vhost.clone(),
            to: self.client_from.clone(),
            version: "1.0",
            lang: "en",
        };
        self.header_sent = true;
        let mut s = String::with_capacity(256);
        match &mut self.io {
            Io::Ws(_) => header.open_element(&mut s),
            // BOSH: the session's attributes carry it; nothing is written.
            Io::Bosh(b) => {
                b.header(&header);
                return Ok(());
            }
            _ => header.stream_tag(&mut s),
        }
        self.write_raw(&s).await
    }

    /// A keepalive for a client that has been silent: a WebSocket ping
    /// frame where there is one (browsers answer it themselves), else the
    /// XMPP-level `ping` the session built.
    pub async fn keepalive(&mut self, xmpp_ping: &str) -> Result<(), ConnError> {
        if let Io::Ws(ws) = &mut self.io {
            let timeout = self.server.config.limits.write_timeout();
            return ws.ping(timeout).await;
        }
        self.write_raw(xmpp_ping).await
    }

    /// Writes one element (a stanza or a negotiation element).
    pub async fn send(&mut self, e: &Element) -> Result<(), ConnError> {
        // Made per element: a buffer kept here would hold the largest
        // element ever sent (a roster, the features) while the connection idles.
        let mut out = String::new();
        e.write_to(&mut out, ns::CLIENT);
        self.write_raw(&out).await
    }

    /// Writes and flushes, within `limits.write_timeout_secs`: a peer that
    /// stops reading must not hold a task (and its session) forever. After
    /// a timed-out write the stream is dead: later writes fail at once.
    pub async fn write_raw(&mut self, s: &str) -> Result<(), ConnError> {
        if self.write_dead {
            return Err(ConnError::Lost);
        }
        let timeout = self.server.config.limits.write_timeout();
        let framed = match &mut self.io {
            Io::Ws(ws) => Some(ws.write(s, timeout).await),
            Io::Bosh(b) => Some(b.write(s, timeout).await),
            _ => None,
        };
        if let Some(r) = framed {
            if r.is_err() {
                self.write_dead = true;
            }
            return r;
        }
        let io = &mut self.io;
        let write = async move {
            io.write_all(s.as_bytes()).await?;
            io.flush().await
        };
        match tokio::time::timeout(timeout, write).await {
            Ok(r) => Ok(r?),
            Err(_) => {
                self.write_dead = true;
                Err(ConnError::Stream(
                    StreamError::ConnectionTimeout,
                    Some("the client stopped reading".into()),
                ))
            }
        }
    }

    /// Closes the stream with an error (RFC 6120 §4.9.1.1), sending our
    /// header first when the client never saw one (§4.9.1.2).
    pub async fn close_with_error(&mut self, error: StreamError, text: Option<&str>) {
        if !self.header_sent {
            if self.vhost.is_empty() {
                self.vhost = self.server.config.vhosts[0].name.clone();
            }
            let _ = self.write_header().await;
        }
        if let (StreamError::SystemShutdown, Io::Ws(ws)) = (&error, &mut self.io) {
            // RFC 7395 §3.6: a draining node points the client elsewhere.
            if let Some(uri) = self.server.config.http.see_other_uri.clone() {
                let timeout = self.server.config.limits.write_timeout();
                let _ = ws.close_see_other(&uri, timeout).await;
                self.shutdown().await;
                return;
            }
        }
        let mut s = match (&error, &self.server.config.cluster.see_other_host) {
            // RFC 6120 §4.9.3.19: a draining node sends its TCP clients to
            // a live one (`cluster.see_other_host`, e.g. the service name).
            (StreamError::SystemShutdown, Some(host)) if !self.io.is_framed() => format!(
                "<stream:error><see-other-host xmlns='urn:ietf:params:xml:ns:xmpp-streams'>{}</see-other-host></stream:error>",
                xmpp::element::escape(host)
            ),
            _ => error.to_xml(text),
        };
        s.push_str("</stream:stream>");
        let _ = self.write_raw(&s).await;
        self.shutdown().await;
    }

    /// Ends the stream cleanly from our side.
    pub async fn close(&mut self) {
        let _ = self.write_raw("</stream:stream>").await;
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        match &mut self.io {
            Io::Ws(ws) => return ws.shutdown().await,
            Io::Bosh(b) => return b.shutdown(),
            _ => {}
        }
        let _ = tokio::time::timeout(std::time::Duration::from_secs(2), self.io.shutdown()).await;
    }
}
