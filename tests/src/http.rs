//! The client side of the HTTP transports, for the tests: a minimal
//! HTTP/1.1 request (one connection per request, as a browser behind a
//! proxy may well do), and adapters that let [`crate::client::Client`]
//! speak XMPP over WebSocket (RFC 7395) and BOSH (XEP-0124/0206) with the
//! same byte-stream interface it uses over TCP: what the client writes as
//! a stream header becomes `<open/>` or a BOSH session creation/restart,
//! and what the server sends is turned back into a stream the client's
//! parser reads.

use std::net::SocketAddr;

use anyhow::{anyhow, bail, Context as _};
use futures_util::stream::FuturesOrdered;
use futures_util::{SinkExt as _, StreamExt as _};
use rand::Rng as _;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest as _;
use tokio_tungstenite::tungstenite::Message;
use xmpp::element::Element;
use xmpp::stanza::ns;
use xmpp::xml::{Event, Limits, StreamParser};

pub const BOSH_NS: &str = "http://jabber.org/protocol/httpbind";
pub const XBOSH_NS: &str = "urn:xmpp:xbosh";
pub const FRAMING_NS: &str = "urn:ietf:params:xml:ns:xmpp-framing";

/// An HTTP response, read to the end.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTP/1.1 request on a connection of its own (`Connection: close`).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> anyhow::Result<Response> {
    let mut tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    tcp.write_all(head.as_bytes()).await?;
    tcp.write_all(body.as_bytes()).await?;
    let mut raw = Vec::new();
    tcp.read_to_end(&mut raw).await?;
    parse_response(&raw)
}

/// An HTTP response whose body is kept as bytes (files, not XML).
#[derive(Debug, Clone)]
pub struct BytesResponse {
    pub status: u16,
    /// Header names in lower case.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl BytesResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// One HTTPS/1.1 request on a connection of its own, to `addr` with the
/// TLS server name and `Host` `host` (any certificate accepted). A
/// `Content-Length` of the body's length is sent unless `headers` has one.
pub async fn https_request(
    addr: SocketAddr,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> anyhow::Result<BytesResponse> {
    use std::sync::Arc;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(crate::tls::AcceptAnyCert(provider)))
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr)
        .await
        .with_context(|| format!("cannot connect to {addr}"))?;
    let name = rustls::pki_types::ServerName::try_from(host.to_owned())?;
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .context("TLS handshake")?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    if !headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("content-length"))
    {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    for (n, v) in headers {
        head.push_str(&format!("{n}: {v}\r\n"));
    }
    head.push_str("\r\n");
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(body).await?;
    tls.flush().await?;
    let mut raw = Vec::new();
    // A server that answers early and closes may reset the connection
    // under the rest of our upload: what was read before counts.
    if let Err(e) = tls.read_to_end(&mut raw).await {
        if raw.is_empty() {
            return Err(e.into());
        }
    }
    let (status, headers, body) = parse_parts(&raw)?;
    Ok(BytesResponse {
        status,
        headers,
        body,
    })
}

fn parse_response(raw: &[u8]) -> anyhow::Result<Response> {
    let (status, headers, body) = parse_parts(raw)?;
    Ok(Response {
        status,
        headers,
        body: String::from_utf8(body)?,
    })
}

type Parts = (u16, Vec<(String, String)>, Vec<u8>);

fn parse_parts(raw: &[u8]) -> anyhow::Result<Parts> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .context("no end of the response head")?;
    let head = std::str::from_utf8(&raw[..split])?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line {status_line:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(n, v)| n == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok((status, headers, body))
}

fn dechunk(mut data: &[u8]) -> anyhow::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = data
            .windows(2)
            .position(|w| w == b"\r\n")
            .context("bad chunk")?;
        let size_text = std::str::from_utf8(&data[..eol])?;
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)?;
        data = &data[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            bail!("truncated chunk");
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Parses one XML document (a BOSH `<body/>`) into an element.
pub fn parse_element(text: &str) -> anyhow::Result<Element> {
    let mut p = StreamParser::new(Limits {
        max_stanza_bytes: 64 * 1024 * 1024,
        ..Limits::default()
    });
    p.feed(
        format!(
            "<stream:stream xmlns='{}' xmlns:stream='{}'>",
            ns::CLIENT,
            ns::STREAM
        )
        .as_bytes(),
    );
    p.feed(text.as_bytes());
    loop {
        match p
            .next_event()
            .map_err(|e| anyhow!("bad XML {text:?}: {e}"))?
        {
            Some(Event::StreamOpen(_)) => continue,
            Some(Event::Element(e)) => return Ok(e),
            _ => bail!("not one element: {text:?}"),
        }
    }
}

/// A POST to `/http-bind`, answered with a parsed `<body/>`.
pub async fn bosh_post(addr: SocketAddr, body: String) -> anyhow::Result<Element> {
    let r = request(
        addr,
        "POST",
        "/http-bind",
        &[("Content-Type", "text/xml; charset=utf-8")],
        &body,
    )
    .await?;
    if r.status != 200 {
        bail!("HTTP {} for {body}: {}", r.status, r.body);
    }
    parse_element(&r.body)
}

/// The synthetic stream header the client's parser reads where a
/// transport has no stream of its own.
fn stream_header(domain: &str) -> String {
    format!(
        "<stream:stream xmlns='{}' xmlns:stream='{}' from='{}' version='1.0'>",
        ns::CLIENT,
        ns::STREAM,
        xmpp::element::escape(domain)
    )
}

/// What the client wrote, as the transport sees it.
enum Written {
    Header,
    Close,
    Stanzas(String),
}

fn classify(data: &[u8]) -> Written {
    let s = String::from_utf8_lossy(data);
    if s.contains("<stream:stream") {
        Written::Header
    } else if s.trim() == "</stream:stream>" {
        Written::Close
    } else {
        Written::Stanzas(s.into_owned())
    }
}

type WsStream = tokio_tungstenite::WebSocketStream<TcpStream>;

/// XMPP over a WebSocket (RFC 7395), read and written as a byte stream.
pub struct WsConn {
    ws: WsStream,
    domain: String,
    unread: Vec<u8>,
}

impl WsConn {
    /// Connects to `/xmpp-websocket` with the `xmpp` subprotocol.
    pub async fn connect(addr: SocketAddr, domain: &str) -> anyhow::Result<WsConn> {
        let ws = ws_connect(
            addr,
            "/xmpp-websocket",
            &[("Sec-WebSocket-Protocol", "xmpp")],
        )
        .await?;
        Ok(WsConn {
            ws,
            domain: domain.to_owned(),
            unread: Vec::new(),
        })
    }

    pub async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.unread.is_empty() {
            let frame = match self.ws.next().await {
                None | Some(Err(_)) => return Ok(0),
                Some(Ok(f)) => f,
            };
            match frame {
                Message::Text(t) => {
                    let t = t.as_str();
                    if t.starts_with("<open") {
                        self.unread = stream_header(&self.domain).into_bytes();
                    } else if t.starts_with("<close") {
                        self.unread = b"</stream:stream>".to_vec();
                    } else {
                        self.unread = t.as_bytes().to_vec();
                    }
                }
                Message::Close(_) => return Ok(0),
                _ => {}
            }
        }
        let n = buf.len().min(self.unread.len());
        buf[..n].copy_from_slice(&self.unread[..n]);
        self.unread.drain(..n);
        Ok(n)
    }

    pub async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        let text = match classify(data) {
            Written::Header => format!(
                "<open xmlns='{FRAMING_NS}' to='{}' version='1.0'/>",
                xmpp::element::escape(&self.domain)
            ),
            Written::Close => format!("<close xmlns='{FRAMING_NS}'/>"),
            Written::Stanzas(s) => s,
        };
        self.ws
            .send(Message::Text(text.into()))
            .await
            .map_err(std::io::Error::other)
    }
}

/// A WebSocket handshake to `path` with extra request headers.
pub async fn ws_connect(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> anyhow::Result<WsStream> {
    let mut req = format!("ws://{addr}{path}").into_client_request()?;
    for (n, v) in headers {
        req.headers_mut().insert(
            http_name(n)?,
            v.parse().map_err(|_| anyhow!("bad header value {v}"))?,
        );
    }
    let tcp = TcpStream::connect(addr).await?;
    let (ws, _) = tokio_tungstenite::client_async(req, tcp)
        .await
        .context("WebSocket handshake")?;
    Ok(ws)
}

fn http_name(n: &str) -> anyhow::Result<tokio_tungstenite::tungstenite::http::HeaderName> {
    n.parse().map_err(|_| anyhow!("bad header name {n}"))
}

enum BoshOut {
    Open,
    Close,
    Stanzas(String),
}

/// XMPP over BOSH, read and written as a byte stream: a task keeps one
/// request held at the server (`hold='1'`) and sends what the client
/// writes in a second one, answering responses in `rid` order.
pub struct BoshConn {
    out: mpsc::UnboundedSender<BoshOut>,
    input: mpsc::UnboundedReceiver<Vec<u8>>,
    unread: Vec<u8>,
    driver: tokio::task::JoinHandle<()>,
}

impl BoshConn {
    pub fn connect(addr: SocketAddr, domain: &str) -> BoshConn {
        let (out, out_rx) = mpsc::unbounded_channel();
        let (in_tx, input) = mpsc::unbounded_channel();
        let driver = tokio::spawn(bosh_driver(addr, domain.to_owned(), out_rx, in_tx));
        BoshConn {
            out,
            input,
            unread: Vec::new(),
            driver,
        }
    }

    pub async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.unread.is_empty() {
            match self.input.recv().await {
                None => return Ok(0),
                Some(b) => self.unread = b,
            }
        }
        let n = buf.len().min(self.unread.len());
        buf[..n].copy_from_slice(&self.unread[..n]);
        self.unread.drain(..n);
        Ok(n)
    }

    pub async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        let out = match classify(data) {
            Written::Header => BoshOut::Open,
            Written::Close => BoshOut::Close,
            Written::Stanzas(s) => BoshOut::Stanzas(s),
        };
        self.out
            .send(out)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::BrokenPipe))
    }
}

impl Drop for BoshConn {
    /// The client vanishes without a word, as a closed browser tab does.
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Stanzas the client wrote for a `jabber:client` stream, declared so
/// inside a `<body/>` (whose default namespace is BOSH's), as browsers'
/// clients send them; what does not parse goes as it is.
fn in_body(stanzas: &str) -> String {
    let mut p = StreamParser::new(Limits {
        max_stanza_bytes: 64 * 1024 * 1024,
        ..Limits::default()
    });
    p.feed(stream_header("x").as_bytes());
    p.feed(stanzas.as_bytes());
    let mut out = String::new();
    loop {
        match p.next_event() {
            Ok(Some(Event::StreamOpen(_))) => {}
            Ok(Some(Event::Element(e))) => e.write_to(&mut out, BOSH_NS),
            Ok(None) if p.buffered() == 0 => return out,
            _ => return stanzas.to_owned(),
        }
    }
}

async fn bosh_driver(
    addr: SocketAddr,
    domain: String,
    mut out_rx: mpsc::UnboundedReceiver<BoshOut>,
    input: mpsc::UnboundedSender<Vec<u8>>,
) {
    let mut rid: u64 = rand::thread_rng().gen_range(1_000_000..1_000_000_000);
    let mut sid: Option<String> = None;
    let mut in_flight = FuturesOrdered::new();
    let mut open = true;
    loop {
        tokio::select! {
            out = out_rx.recv(), if in_flight.len() < 2 && open => {
                let Some(out) = out else { return };
                rid += 1;
                let body = match (&out, &sid) {
                    (BoshOut::Open, None) => format!(
                        "<body xmlns='{BOSH_NS}' xmlns:xmpp='{XBOSH_NS}' content='text/xml; charset=utf-8' hold='1' rid='{rid}' to='{}' ver='1.11' wait='10' xml:lang='en' xmpp:version='1.0'/>",
                        xmpp::element::escape(&domain)
                    ),
                    (BoshOut::Open, Some(s)) => format!(
                        "<body xmlns='{BOSH_NS}' xmlns:xmpp='{XBOSH_NS}' rid='{rid}' sid='{s}' to='{}' xml:lang='en' xmpp:restart='true'/>",
                        xmpp::element::escape(&domain)
                    ),
                    (BoshOut::Close, Some(s)) => {
                        open = false;
                        format!("<body xmlns='{BOSH_NS}' rid='{rid}' sid='{s}' type='terminate'/>")
                    }
                    (BoshOut::Stanzas(x), Some(s)) => {
                        let x = in_body(x);
                        format!("<body xmlns='{BOSH_NS}' rid='{rid}' sid='{s}'>{x}</body>")
                    }
                    (_, None) => return,
                };
                if matches!(out, BoshOut::Open) {
                    // The server's answer to a creation or restart is the
                    // new stream's features.
                    if input.send(stream_header(&domain).into_bytes()).is_err() {
                        return;
                    }
                }
                in_flight.push_back(bosh_post(addr, body));
            }
            Some(answer) = in_flight.next(), if !in_flight.is_empty() => {
                let body = match answer {
                    Ok(b) => b,
                    Err(e) => {
                        // The client sees its stream end; the reason goes to the test's output.
                        eprintln!("BOSH request failed: {e:#}");
                        return;
                    }
                };
                if sid.is_none() {
                    match body.get_attr("sid") {
                        Some(s) => sid = Some(s.to_owned()),
                        None => return,
                    }
                }
                let mut bytes = String::new();
                for child in body.elements() {
                    child.write_to(&mut bytes, ns::CLIENT);
                }
                let terminated = body.get_attr("type") == Some("terminate");
                if terminated {
                    eprintln!("BOSH session terminated: {}", body.to_string_in(BOSH_NS));
                    bytes.push_str("</stream:stream>");
                }
                if !bytes.is_empty() && input.send(bytes.into_bytes()).is_err() {
                    return;
                }
                if terminated {
                    return;
                }
                if in_flight.is_empty() && open {
                    if let Some(s) = &sid {
                        rid += 1;
                        in_flight.push_back(bosh_post(
                            addr,
                            format!("<body xmlns='{BOSH_NS}' rid='{rid}' sid='{s}'/>"),
                        ));
                    }
                }
            }
            else => return,
        }
    }
}
