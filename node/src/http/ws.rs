//! XMPP over WebSocket (RFC 7395) at `/xmpp-websocket`: one text frame per
//! element, `<open/>` and `<close/>` in place of the stream root. The
//! session task owns the socket itself (no relay task, no channel): a held
//! WebSocket session costs what a TCP one does, plus the WebSocket codec.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::SinkExt;
use xmpp::error::StreamError;
use xmpp::xml::StreamParser;

use super::{ConnInfo, Http};
use crate::c2s::framing::{self, Frame, FRAMING};
use crate::c2s::io::Io;
use crate::c2s::stream::ConnError;

/// Room for the framing around the largest stanza: a bigger frame drops
/// the connection in the codec; up to this, the stream parser's limits
/// answer with the right stream error.
const FRAME_SLACK: usize = 16 * 1024;
/// What the WebSocket codec reads at once, and allocates per connection.
const WS_READ_BUFFER: usize = 4 * 1024;
/// Frames collect up to this before they are written without a flush.
const WS_WRITE_BUFFER: usize = 16 * 1024;

pub struct WsIo {
    socket: WebSocket,
    /// HTTPS, or plain HTTP behind a proxy the operator vouches for.
    pub secure: bool,
}

/// `GET /xmpp-websocket`: the upgrade, then the session core.
pub async fn upgrade(
    State(http): State<Arc<Http>>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let server = http.server.clone();
    // RFC 7395 §3.1: the client asks for the `xmpp` subprotocol.
    let ws = ws.protocols(["xmpp"]);
    if ws.selected_protocol().is_none() {
        return (
            StatusCode::BAD_REQUEST,
            "ask for the `xmpp` WebSocket subprotocol (RFC 7395 section 3.1)\n",
        )
            .into_response();
    }
    if let Some(origin) = headers.get("origin").and_then(|o| o.to_str().ok()) {
        if !server.config.http.origin_allowed(origin) {
            tracing::info!(peer = %info.peer, origin, "WebSocket from an origin not allowed");
            return (StatusCode::FORBIDDEN, "origin not allowed\n").into_response();
        }
    }
    let admitted = match server.admission.admit(info.peer.ip()) {
        Ok(a) => a,
        Err((error, text)) => {
            tracing::info!(peer = %info.peer, %error, "WebSocket refused: {text}");
            return (StatusCode::SERVICE_UNAVAILABLE, format!("{text}\n")).into_response();
        }
    };
    let max = server.config.limits.max_stanza_bytes + FRAME_SLACK;
    // The codec's defaults are a 128 KiB read buffer allocated up front
    // and 128 KiB of write buffering: 150 KiB per held session. Reads grow
    // the buffer for a larger frame when one comes; writes still go out
    // in batches (the session flushes after each batch it sends).
    ws.max_message_size(max)
        .max_frame_size(max)
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(WS_WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            let io = Io::Ws(Box::new(WsIo {
                socket,
                secure: info.secure,
            }));
            Box::pin(crate::c2s::serve(server, io, info.peer, info.cb, admitted)).await;
        })
}

fn lost<E>(_: E) -> ConnError {
    ConnError::Lost
}

impl WsIo {
    /// Waits for one frame and gives the parser what it stands for.
    /// Cancel-safe: a frame is either taken whole or not at all.
    pub async fn fill(&mut self, parser: &mut StreamParser) -> Result<(), ConnError> {
        match self.socket.recv().await {
            Some(Ok(Message::Text(t))) => inbound(t.as_str(), parser),
            Some(Ok(Message::Binary(_))) => Err(ConnError::stream(
                StreamError::UnsupportedEncoding,
                "XMPP over WebSocket is sent in text frames (RFC 7395 section 3.2)",
            )),
            // A pong (or the client's own ping) shows the link is alive.
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => Ok(()),
            Some(Ok(Message::Close(_))) | Some(Err(_)) | None => Err(ConnError::Lost),
        }
    }

    /// Writes what the session core wrote, one element per frame, flushed
    /// once for the batch.
    pub async fn write(&mut self, s: &str, timeout: Duration) -> Result<(), ConnError> {
        let socket = &mut self.socket;
        let write = async move {
            for frame in framing::split(s) {
                let text = match frame {
                    Frame::Element(e) => {
                        let mut out = String::with_capacity(e.len() + 48);
                        framing::declare_into(&mut out, e);
                        out
                    }
                    Frame::Close => close_element(None),
                };
                socket.feed(Message::text(text)).await.map_err(lost)?;
            }
            socket.flush().await.map_err(lost)
        };
        with_timeout(timeout, write).await
    }

    pub async fn ping(&mut self, timeout: Duration) -> Result<(), ConnError> {
        let ping = self.socket.send(Message::Ping(Bytes::from_static(b"xmpp")));
        with_timeout(timeout, async { ping.await.map_err(lost) }).await
    }

    /// RFC 7395 §3.6: close, sending the client to another endpoint.
    pub async fn close_see_other(&mut self, uri: &str, timeout: Duration) -> Result<(), ConnError> {
        let close = self.socket.send(Message::text(close_element(Some(uri))));
        with_timeout(timeout, async { close.await.map_err(lost) }).await
    }

    /// The WebSocket closing handshake, bounded in time.
    pub async fn shutdown(&mut self) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.socket.send(Message::Close(None)),
        )
        .await;
    }
}

async fn with_timeout(
    timeout: Duration,
    f: impl std::future::Future<Output = Result<(), ConnError>>,
) -> Result<(), ConnError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(r) => r,
        Err(_) => Err(ConnError::Stream(
            StreamError::ConnectionTimeout,
            Some("the client stopped reading".into()),
        )),
    }
}

fn close_element(see_other: Option<&str>) -> String {
    let mut s = String::from("<close xmlns='");
    s.push_str(FRAMING);
    s.push('\'');
    if let Some(uri) = see_other {
        s.push_str(" see-other-uri='");
        xmpp::element::escape_into(&mut s, uri, true);
        s.push('\'');
    }
    s.push_str("/>");
    s
}

/// One frame from the client, as the stream parser expects it: `<open/>`
/// becomes a stream header (only where one is due), `<close/>` the
/// stream's end, anything else goes in as it came.
fn inbound(text: &str, parser: &mut StreamParser) -> Result<(), ConnError> {
    let t = text.trim_start();
    if t.starts_with("<open") || t.starts_with("<close") {
        let e = xmpp::xml::parse_element(t, "")
            .map_err(|e| ConnError::Stream(StreamError::NotWellFormed, Some(e.to_string())))?;
        if e.is("open", FRAMING) {
            if !parser.awaiting_header() {
                return Err(ConnError::stream(
                    StreamError::NotWellFormed,
                    "<open/> is allowed only at the start and after a stream restart",
                ));
            }
            let header = framing::synthetic_header(
                e.get_attr("to"),
                e.get_attr("from"),
                e.get_attr("version"),
                e.get_attr("xml:lang"),
            );
            parser.feed(header.as_bytes());
            return Ok(());
        }
        if e.is("close", FRAMING) {
            parser.feed(framing::STREAM_CLOSE.as_bytes());
            return Ok(());
        }
    }
    if parser.awaiting_header() {
        return Err(ConnError::stream(
            StreamError::NotWellFormed,
            "a WebSocket stream starts with <open xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>",
        ));
    }
    parser.feed(text.as_bytes());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use xmpp::xml::Event;

    #[test]
    fn open_frames_become_headers_and_stanzas_pass_through() {
        let mut p = StreamParser::new(Default::default());
        // A stanza before <open/> is refused.
        assert!(inbound("<message/>", &mut p).is_err());
        inbound(
            "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='example.com' version='1.0'/>",
            &mut p,
        )
        .expect("open");
        match p.next_event() {
            Ok(Some(Event::StreamOpen(h))) => {
                assert_eq!(h.to.as_deref(), Some("example.com"));
                assert_eq!(h.version.as_deref(), Some("1.0"));
            }
            other => panic!("expected a header, got {other:?}"),
        }
        // A second <open/> without a restart is refused.
        assert!(inbound(
            "<open xmlns='urn:ietf:params:xml:ns:xmpp-framing' to='example.com' version='1.0'/>",
            &mut p
        )
        .is_err());
        inbound(
            "<message xmlns='jabber:client' to='a@example.com'><body>hi</body></message>",
            &mut p,
        )
        .expect("stanza");
        match p.next_event() {
            Ok(Some(Event::Element(e))) => {
                assert!(e.is("message", "jabber:client"));
                assert_eq!(e.get_attr("to"), Some("a@example.com"));
            }
            other => panic!("expected the message, got {other:?}"),
        }
        inbound(
            "<close xmlns='urn:ietf:params:xml:ns:xmpp-framing'/>",
            &mut p,
        )
        .expect("close");
        assert!(matches!(p.next_event(), Ok(Some(Event::StreamClose))));
    }
}
