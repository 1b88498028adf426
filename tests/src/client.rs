//! A small XMPP client for the end-to-end tests: it speaks exactly the
//! client side of what `xmpp-node` serves, over real sockets and real TLS,
//! and doubles as a readable walk through the protocol:
//!
//! 1. TCP, open a stream, read `<stream:features/>` (RFC 6120 §4.2, §4.3).
//! 2. `<starttls/>` → `<proceed/>` → TLS handshake → a new stream (§5.4);
//!    or TLS from the first byte on the direct-TLS port (XEP-0368).
//! 3. SASL: `<auth mechanism=…>` → `<challenge/>`/`<response/>` rounds →
//!    `<success/>` or `<failure/>` (§6.4), then a new stream again.
//! 4. Resource binding: an IQ set with `<bind/>`; the result names the full JID (§7).
//!
//! Everything after that is stanzas. Received elements that a test did not
//! ask for yet are kept in order ([`Client::recv_until`] skips past them
//! without losing them).

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _};
use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::Rng as _;
use rustls::pki_types::ServerName;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use xmpp::element::Element;
use xmpp::sasl::client::{plain_initial_response, ClientChannelBinding, ScramClient};
use xmpp::sasl::HashAlg;
use xmpp::stanza::ns;
use xmpp::xml::{Event, Limits, StreamParser};

use crate::node::TestNode;
use crate::tls::AcceptAnyCert;

/// How long to wait for something that must arrive. Generous: the machine
/// running the tests is shared and noisy.
pub const WAIT: Duration = Duration::from_secs(5);

/// How long to watch for something that must *not* arrive.
pub const QUIET: Duration = Duration::from_millis(500);

const SASL2: &str = "urn:xmpp:sasl:2";
const BIND2: &str = "urn:xmpp:bind:0";
const FAST: &str = "urn:xmpp:fast:0";
const SM: &str = "urn:xmpp:sm:3";

/// How a SASL2 login proves who it is.
#[derive(Debug, Clone, Copy)]
pub enum Sasl2Auth<'a> {
    Plain(&'a str),
    Scram(HashAlg, &'a str),
    /// FAST (XEP-0484): an HT mechanism name and the token.
    Fast {
        mechanism: &'a str,
        token: &'a str,
    },
}

/// What a SASL2 login asks for inline.
#[derive(Debug, Clone, Default)]
pub struct Sasl2Options {
    /// `<user-agent id=…/>`.
    pub agent: Option<String>,
    /// Bind2 (XEP-0386), with this tag.
    pub bind: bool,
    pub tag: Option<String>,
    /// Enable stream management in the bind (`Some(resume)`).
    pub sm: Option<bool>,
    pub carbons: bool,
    /// Resume this stream (previd, h).
    pub resume: Option<(String, u32)>,
    /// Ask for a FAST token for this mechanism.
    pub request_token: Option<String>,
    /// `<fast invalidate='true'/>`.
    pub invalidate: bool,
}

/// A SASL2 success.
#[derive(Debug)]
pub struct Sasl2Outcome {
    pub success: Element,
    /// Messages sent that waited for an answer (one for FAST).
    pub round_trips: u32,
    pub authzid: String,
    /// A FAST token issued with the success.
    pub token: Option<String>,
}

/// How the client authenticates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    /// PLAIN (RFC 4616): the password itself, only ever inside TLS.
    Plain,
    /// SCRAM without channel binding (RFC 5802, RFC 7677).
    Scram(HashAlg),
    /// SCRAM-*-PLUS bound to the TLS channel with tls-exporter (RFC 9266).
    ScramPlusExporter(HashAlg),
    /// SCRAM-*-PLUS bound with tls-server-end-point (RFC 5929 §4).
    ScramPlusEndPoint(HashAlg),
    /// SCRAM with exactly this channel-binding choice, e.g. deliberately
    /// wrong binding data, to test refusals.
    ScramWith(HashAlg, ClientChannelBinding),
}

/// The socket under the stream, before and after TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while STARTTLS swaps one for the other.
    Upgrading,
    Ws(Box<crate::http::WsConn>),
    Bosh(Box<crate::http::BoshConn>),
}

impl Conn {
    async fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf).await,
            Conn::Tls(s) => s.read(buf).await,
            Conn::Upgrading => Ok(0),
            Conn::Ws(w) => w.read(buf).await,
            Conn::Bosh(b) => b.read(buf).await,
        }
    }

    async fn write_all(&mut self, data: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Conn::Tls(s) => {
                s.write_all(data).await?;
                s.flush().await
            }
            Conn::Upgrading => Err(std::io::ErrorKind::NotConnected.into()),
            Conn::Ws(w) => w.write_all(data).await,
            Conn::Bosh(b) => b.write_all(data).await,
        }
    }
}

fn tls_connector() -> anyhow::Result<tokio_rustls::TlsConnector> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
        .with_no_client_auth();
    Ok(tokio_rustls::TlsConnector::from(Arc::new(config)))
}

/// A random SCRAM client nonce: printable ASCII without ','.
fn nonce() -> String {
    let bytes: [u8; 18] = rand::thread_rng().gen();
    B64.encode(bytes)
}

/// The name of the defined condition inside a stream error, a SASL
/// `<failure/>` or a stanza `<error/>`: its first child that is not `<text/>`.
pub fn condition(e: &Element) -> Option<String> {
    e.elements()
        .find(|c| c.name != "text")
        .map(|c| c.name.clone())
}

/// The condition of a stanza's `<error/>` child, if it is an error.
pub fn stanza_error(stanza: &Element) -> Option<String> {
    if stanza.get_attr("type") != Some("error") {
        return None;
    }
    stanza.get_child("error", &stanza.ns).and_then(condition)
}

/// One client connection.
pub struct Client {
    conn: Conn,
    parser: StreamParser,
    read_buf: Vec<u8>,
    /// The domain we opened the stream to (and the TLS server name).
    pub domain: String,
    /// The features of the current stream (RFC 6120 §4.3.2).
    pub features: Element,
    /// Our full JID once bound.
    pub jid: Option<String>,
    /// Elements received but not yet handed to the test.
    pending: VecDeque<Element>,
    /// Whether the server closed its stream (or the connection).
    closed: bool,
    /// Channel-binding data of this TLS connection (RFC 9266), if TLS 1.3.
    tls_exporter: Option<Vec<u8>>,
    /// SHA-256 of the server's leaf certificate (RFC 5929 §4.1).
    tls_server_end_point: Option<Vec<u8>>,
    next_id: u64,
    /// Extra attributes for our `<stream:stream>` open tag, e.g.
    /// ` xmlns:x='urn:x'` (namespace declarations on the root).
    pub header_extra: String,
}

impl Client {
    /// TCP only, no TLS: for testing what the server refuses before STARTTLS.
    pub async fn connect_plain(addr: SocketAddr, domain: &str) -> anyhow::Result<Client> {
        let mut c = Client::connect_tcp(addr, domain).await?;
        c.open_stream().await?;
        Ok(c)
    }

    /// A TCP connection on which not even our stream header is sent yet.
    pub async fn connect_tcp(addr: SocketAddr, domain: &str) -> anyhow::Result<Client> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        Ok(Client::new(Conn::Plain(tcp), domain))
    }

    fn new(conn: Conn, domain: &str) -> Client {
        Client {
            conn,
            parser: StreamParser::new(Self::limits()),
            read_buf: vec![0; 16 * 1024],
            domain: domain.to_owned(),
            features: Element::new("features", ns::STREAM),
            jid: None,
            pending: VecDeque::new(),
            closed: false,
            tls_exporter: None,
            tls_server_end_point: None,
            next_id: 0,
            header_extra: String::new(),
        }
    }

    /// The standard port: plain TCP, then `<starttls/>` (RFC 6120 §5).
    pub async fn connect_starttls(addr: SocketAddr, domain: &str) -> anyhow::Result<Client> {
        let mut c = Client::connect_plain(addr, domain).await?;
        c.starttls().await?;
        Ok(c)
    }

    /// The direct-TLS port (XEP-0368): TLS from the first byte.
    pub async fn connect_direct_tls(addr: SocketAddr, domain: &str) -> anyhow::Result<Client> {
        let tcp = TcpStream::connect(addr)
            .await
            .with_context(|| format!("cannot connect to {addr}"))?;
        tcp.set_nodelay(true)?;
        let mut c = Client::new(Conn::Upgrading, domain);
        c.handshake(tcp).await?;
        c.open_stream().await?;
        Ok(c)
    }

    /// XMPP over WebSocket (RFC 7395) at `http://addr/xmpp-websocket`.
    pub async fn connect_websocket(addr: SocketAddr, domain: &str) -> anyhow::Result<Client> {
        let ws = crate::http::WsConn::connect(addr, domain).await?;
        let mut c = Client::new(Conn::Ws(Box::new(ws)), domain);
        c.open_stream().await?;
        Ok(c)
    }

    /// XMPP over BOSH (XEP-0124/0206) at `http://addr/http-bind`.
    pub async fn connect_bosh(addr: SocketAddr, domain: &str) -> anyhow::Result<Client> {
        let bosh = crate::http::BoshConn::connect(addr, domain);
        let mut c = Client::new(Conn::Bosh(Box::new(bosh)), domain);
        c.open_stream().await?;
        Ok(c)
    }

    /// Connects with STARTTLS, logs in with SCRAM-SHA-256 and binds `resource`.
    pub async fn login_bound(
        node: &TestNode,
        user: &str,
        password: &str,
        resource: &str,
    ) -> anyhow::Result<Client> {
        Client::login_at(node.c2s, &node.domain, user, password, resource).await
    }

    /// [`Client::login_bound`] by address.
    pub async fn login_at(
        addr: SocketAddr,
        domain: &str,
        user: &str,
        password: &str,
        resource: &str,
    ) -> anyhow::Result<Client> {
        let mut c = Client::connect_starttls(addr, domain).await?;
        c.login(user, password, Mechanism::Scram(HashAlg::Sha256))
            .await?;
        c.bind(Some(resource)).await?;
        Ok(c)
    }

    /// Elements received but not yet taken by a `recv`.
    pub fn take_pending(&mut self) -> Vec<Element> {
        self.pending.drain(..).collect()
    }

    /// The client parser accepts anything the server may send.
    fn limits() -> Limits {
        Limits {
            max_stanza_bytes: 16 * 1024 * 1024,
            ..Limits::default()
        }
    }

    /// Our full JID; panics before binding (a test bug).
    pub fn full_jid(&self) -> &str {
        self.jid.as_deref().expect("bind() first")
    }

    /// Our bare JID; panics before binding.
    pub fn bare_jid(&self) -> &str {
        let full = self.full_jid();
        full.split_once('/').map_or(full, |(bare, _)| bare)
    }

    /// A fresh stanza id.
    pub fn id(&mut self) -> String {
        self.next_id += 1;
        format!("t{}", self.next_id)
    }

    /// Sends our stream header and reads the server's header and features
    /// (RFC 6120 §4.2, §4.3.2). Used at the start and after each restart.
    async fn open_stream(&mut self) -> anyhow::Result<()> {
        self.send_stream_header().await?;
        let features = self
            .recv(WAIT)
            .await
            .context("waiting for stream features")?;
        if !features.is("features", ns::STREAM) {
            bail!(
                "expected <stream:features/>, got {}",
                features.to_string_in(ns::CLIENT)
            );
        }
        self.features = features;
        Ok(())
    }

    /// Sends our `<stream:stream>` open tag to [`Client::domain`].
    pub async fn send_stream_header(&mut self) -> anyhow::Result<()> {
        let header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='{}' xmlns:stream='{}' to='{}' version='1.0'{}>",
            ns::CLIENT,
            ns::STREAM,
            xmpp::element::escape(&self.domain),
            self.header_extra
        );
        self.send_raw(&header).await
    }

    /// The SASL mechanisms offered in the current features.
    pub fn mechanisms(&self) -> Vec<String> {
        self.features
            .get_child("mechanisms", ns::SASL)
            .map(|m| m.elements().map(Element::text_content).collect())
            .unwrap_or_default()
    }

    /// RFC 6120 §5.4.2: `<starttls/>`, `<proceed/>`, handshake, new stream.
    pub async fn starttls(&mut self) -> anyhow::Result<()> {
        self.send(&Element::new("starttls", ns::TLS)).await?;
        let reply = self.recv(WAIT).await.context("waiting for <proceed/>")?;
        if !reply.is("proceed", ns::TLS) {
            bail!("STARTTLS refused: {}", reply.to_string_in(ns::CLIENT));
        }
        let Conn::Plain(tcp) = std::mem::replace(&mut self.conn, Conn::Upgrading) else {
            bail!("TLS is already on");
        };
        self.handshake(tcp).await?;
        self.open_stream().await
    }

    async fn handshake(&mut self, tcp: TcpStream) -> anyhow::Result<()> {
        let name = ServerName::try_from(self.domain.clone())
            .with_context(|| format!("{} is not a TLS server name", self.domain))?;
        let tls = tls_connector()?
            .connect(name, tcp)
            .await
            .context("TLS handshake failed")?;
        let conn = tls.get_ref().1;
        // RFC 9266: tls-exporter exists for TLS 1.3 only; the same call on
        // both ends yields the same bytes.
        self.tls_exporter = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => Some(
                conn.export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", Some(b""))?
                    .to_vec(),
            ),
            _ => None,
        };
        // RFC 5929 §4.1: the hash of the server's certificate (SHA-256 for
        // SHA-1/SHA-256-signed certificates, which ours are).
        self.tls_server_end_point = conn
            .peer_certificates()
            .and_then(|c| c.first())
            .map(|leaf| Sha256::digest(leaf.as_ref()).to_vec());
        self.conn = Conn::Tls(Box::new(tls));
        // Anything buffered belonged to the plaintext stream.
        self.parser = StreamParser::new(Self::limits());
        Ok(())
    }

    /// Whether the stream runs over TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.conn, Conn::Tls(_))
    }

    /// The tls-exporter channel-binding data of this connection.
    pub fn tls_exporter(&self) -> Option<Vec<u8>> {
        self.tls_exporter.clone()
    }

    /// Authenticates; fails unless the server answers `<success/>`.
    pub async fn login(
        &mut self,
        user: &str,
        password: &str,
        mech: Mechanism,
    ) -> anyhow::Result<()> {
        match self.try_login(user, password, mech.clone()).await? {
            Ok(()) => Ok(()),
            Err(cond) => bail!("{mech:?} login of {user} failed: {cond}"),
        }
    }

    /// One SASL exchange (RFC 6120 §6.4). The outer error is a protocol or
    /// I/O problem; the inner `Err` is the condition of the server's
    /// `<failure/>` (e.g. `not-authorized`). On success the stream is
    /// restarted and the new features read.
    pub async fn try_login(
        &mut self,
        user: &str,
        password: &str,
        mech: Mechanism,
    ) -> anyhow::Result<Result<(), String>> {
        let (hash, cbind) = match mech {
            Mechanism::Plain => {
                let initial = plain_initial_response(None, user, password);
                self.send(&Self::auth("PLAIN", &initial)).await?;
                return self.sasl_outcome(None).await;
            }
            Mechanism::Scram(h) => (h, ClientChannelBinding::None),
            Mechanism::ScramPlusExporter(h) => (
                h,
                ClientChannelBinding::TlsExporter(
                    self.tls_exporter
                        .clone()
                        .context("no tls-exporter data: not TLS 1.3")?,
                ),
            ),
            Mechanism::ScramPlusEndPoint(h) => (
                h,
                ClientChannelBinding::TlsServerEndPoint(
                    self.tls_server_end_point
                        .clone()
                        .context("no server certificate")?,
                ),
            ),
            Mechanism::ScramWith(h, cb) => (h, cb),
        };
        let mut scram = ScramClient::new(hash, user, password, cbind, nonce())
            .map_err(|e| anyhow!("SCRAM client: {e:?}"))?;
        let name = scram.mechanism().name();
        self.send(&Self::auth(name, &scram.client_first())).await?;
        let reply = self
            .recv(WAIT)
            .await
            .context("waiting for SASL challenge")?;
        if reply.is("failure", ns::SASL) {
            return Ok(Err(condition(&reply).unwrap_or_default()));
        }
        if !reply.is("challenge", ns::SASL) {
            bail!(
                "expected <challenge/>, got {}",
                reply.to_string_in(ns::CLIENT)
            );
        }
        let server_first = B64.decode(reply.text_content().trim())?;
        let client_final = scram
            .handle_server_first(&server_first)
            .map_err(|e| anyhow!("server-first: {e:?}"))?;
        self.send(&Element::new("response", ns::SASL).text(B64.encode(client_final)))
            .await?;
        self.sasl_outcome(Some(&scram)).await
    }

    fn auth(mechanism: &str, initial: &[u8]) -> Element {
        // RFC 6120 §6.4.2: an empty initial response is "=".
        let data = if initial.is_empty() {
            "=".to_owned()
        } else {
            B64.encode(initial)
        };
        Element::new("auth", ns::SASL)
            .attr("mechanism", mechanism)
            .text(data)
    }

    async fn sasl_outcome(
        &mut self,
        scram: Option<&ScramClient>,
    ) -> anyhow::Result<Result<(), String>> {
        let reply = self.recv(WAIT).await.context("waiting for SASL outcome")?;
        if reply.is("failure", ns::SASL) {
            return Ok(Err(condition(&reply).unwrap_or_default()));
        }
        if !reply.is("success", ns::SASL) {
            bail!(
                "expected <success/>, got {}",
                reply.to_string_in(ns::CLIENT)
            );
        }
        if let Some(scram) = scram {
            // RFC 5802 §3: the server proves it knew the credentials too.
            let data = B64.decode(reply.text_content().trim())?;
            scram
                .verify_server_final(&data)
                .map_err(|e| anyhow!("server signature: {e:?}"))?;
        }
        // RFC 6120 §6.4.6: a new stream after success.
        self.parser = StreamParser::new(Self::limits());
        self.open_stream().await?;
        Ok(Ok(()))
    }

    /// SASL2 (XEP-0388) with whatever `opts` asks inline (Bind2, stream
    /// management, FAST). The outer error is a protocol or I/O problem; the
    /// inner `Err` is the condition of the server's `<failure/>`. On
    /// success the features that follow are in `self.features`, and a
    /// bound JID in `self.jid`.
    pub async fn sasl2_login(
        &mut self,
        user: &str,
        auth: Sasl2Auth<'_>,
        opts: &Sasl2Options,
    ) -> anyhow::Result<Result<Sasl2Outcome, String>> {
        enum Check {
            Scram(Box<ScramClient>),
            Fast(Vec<u8>),
            Nothing,
        }
        let (mechanism, initial, mut check) = match auth {
            Sasl2Auth::Plain(password) => (
                "PLAIN".to_owned(),
                plain_initial_response(None, user, password),
                Check::Nothing,
            ),
            Sasl2Auth::Scram(hash, password) => {
                let scram =
                    ScramClient::new(hash, user, password, ClientChannelBinding::None, nonce())
                        .map_err(|e| anyhow!("SCRAM client: {e:?}"))?;
                (
                    scram.mechanism().name().to_owned(),
                    scram.client_first(),
                    Check::Scram(Box::new(scram)),
                )
            }
            Sasl2Auth::Fast { mechanism, token } => {
                let m = xmpp::fast::HtMechanism::from_name(mechanism)
                    .with_context(|| format!("unknown HT mechanism {mechanism}"))?;
                let cb = match m.0 {
                    xmpp::fast::HtBinding::Exporter => self.tls_exporter.clone(),
                    xmpp::fast::HtBinding::EndPoint => self.tls_server_end_point.clone(),
                    xmpp::fast::HtBinding::None => Some(Vec::new()),
                }
                .context("no channel-binding data for that mechanism")?;
                let initial = xmpp::fast::client_initial(user, token.as_bytes(), &cb);
                let responder = xmpp::fast::responder(token.as_bytes(), &cb);
                (mechanism.to_owned(), initial, Check::Fast(responder))
            }
        };
        let mut authenticate = Element::new("authenticate", SASL2)
            .attr("mechanism", mechanism.as_str())
            .child(Element::new("initial-response", SASL2).text(B64.encode(&initial)));
        if let Some(agent) = &opts.agent {
            authenticate = authenticate.child(
                Element::new("user-agent", SASL2)
                    .attr("id", agent.as_str())
                    .child(Element::new("software", SASL2).text("xmpp-tests")),
            );
        }
        if opts.bind {
            let mut bind = Element::new("bind", BIND2);
            if let Some(tag) = &opts.tag {
                bind = bind.child(Element::new("tag", BIND2).text(tag.as_str()));
            }
            if let Some(resume) = opts.sm {
                let mut en = Element::new("enable", SM);
                if resume {
                    en = en.attr("resume", "true");
                }
                bind = bind.child(en);
            }
            if opts.carbons {
                bind = bind.child(Element::new("enable", "urn:xmpp:carbons:2"));
            }
            authenticate = authenticate.child(bind);
        }
        if let Some((previd, h)) = &opts.resume {
            authenticate = authenticate.child(
                Element::new("resume", SM)
                    .attr("previd", previd.as_str())
                    .attr("h", h.to_string()),
            );
        }
        if let Some(m) = &opts.request_token {
            authenticate = authenticate
                .child(Element::new("request-token", FAST).attr("mechanism", m.as_str()));
        }
        if opts.invalidate {
            authenticate =
                authenticate.child(Element::new("fast", FAST).attr("invalidate", "true"));
        }
        self.send(&authenticate).await?;
        let mut round_trips = 1;
        let success = loop {
            let reply = self.recv(WAIT).await.context("waiting for SASL2 answer")?;
            if reply.is("failure", SASL2) {
                return Ok(Err(condition(&reply).unwrap_or_default()));
            }
            if reply.is("success", SASL2) {
                break reply;
            }
            if !reply.is("challenge", SASL2) {
                bail!(
                    "expected a SASL2 answer, got {}",
                    reply.to_string_in(ns::CLIENT)
                );
            }
            let Check::Scram(scram) = &mut check else {
                bail!("a challenge for a one-message mechanism");
            };
            let server_first = B64.decode(reply.text_content().trim())?;
            let client_final = scram
                .handle_server_first(&server_first)
                .map_err(|e| anyhow!("server-first: {e:?}"))?;
            self.send(&Element::new("response", SASL2).text(B64.encode(client_final)))
                .await?;
            round_trips += 1;
        };
        let additional = success
            .child_text("additional-data", SASL2)
            .map(|d| B64.decode(d.trim()))
            .transpose()?;
        match (&check, additional) {
            (Check::Scram(scram), Some(data)) => scram
                .verify_server_final(&data)
                .map_err(|e| anyhow!("server signature: {e:?}"))?,
            (Check::Fast(want), Some(data)) => {
                if &data != want {
                    bail!("the server's FAST proof is wrong");
                }
            }
            (Check::Nothing, _) => {}
            (_, None) => bail!("no additional data to prove the server knew the secret"),
        }
        let authzid = success
            .child_text("authorization-identifier", SASL2)
            .context("no authorization-identifier")?;
        if authzid.contains('/') {
            self.jid = Some(authzid.clone());
        }
        // No stream restart (XEP-0388): the new features follow at once.
        let features = self
            .recv(WAIT)
            .await
            .context("features after SASL2 success")?;
        if !features.is("features", ns::STREAM) {
            bail!(
                "expected features after success, got {}",
                features.to_string_in(ns::CLIENT)
            );
        }
        self.features = features;
        Ok(Ok(Sasl2Outcome {
            token: success
                .get_child("token", FAST)
                .and_then(|t| t.get_attr("token"))
                .map(str::to_owned),
            success,
            round_trips,
            authzid,
        }))
    }

    /// XEP-0198 §5: resumes stream `previd` having handled `h` stanzas;
    /// returns the server's `<resumed/>` or `<failed/>`.
    pub async fn resume(&mut self, previd: &str, h: u32) -> anyhow::Result<Element> {
        let resume = Element::new("resume", SM)
            .attr("previd", previd)
            .attr("h", h.to_string());
        self.send(&resume).await?;
        self.recv_until(
            |e| e.ns == SM && (e.name == "resumed" || e.name == "failed"),
            WAIT,
        )
        .await
    }

    /// RFC 6120 §7: binds a resource (or asks the server for one); returns
    /// the full JID.
    pub async fn bind(&mut self, resource: Option<&str>) -> anyhow::Result<String> {
        let mut bind = Element::new("bind", ns::BIND);
        if let Some(r) = resource {
            bind = bind.child(Element::new("resource", ns::BIND).text(r));
        }
        let id = self.id();
        let iq = Element::new("iq", ns::CLIENT)
            .attr("type", "set")
            .attr("id", id.as_str())
            .child(bind);
        let reply = self.iq(iq).await?;
        let jid = reply
            .get_child("bind", ns::BIND)
            .and_then(|b| b.child_text("jid", ns::BIND))
            .with_context(|| format!("bind failed: {}", reply.to_string_in(ns::CLIENT)))?;
        self.jid = Some(jid.clone());
        Ok(jid)
    }

    /// Sends an IQ and waits for the reply with its id (a result or an
    /// error; both are returned).
    pub async fn iq(&mut self, iq: Element) -> anyhow::Result<Element> {
        let id = iq.get_attr("id").context("IQ without id")?.to_owned();
        self.send(&iq).await?;
        self.recv_until(
            |e| {
                e.name == "iq"
                    && e.get_attr("id") == Some(id.as_str())
                    && matches!(e.get_attr("type"), Some("result" | "error"))
            },
            WAIT,
        )
        .await
        .with_context(|| format!("waiting for the reply to IQ {id}"))
    }

    /// Builds an IQ get/set with a fresh id and `payload`.
    pub fn make_iq(&mut self, kind: &str, to: Option<&str>, payload: Element) -> Element {
        let mut iq = Element::new("iq", ns::CLIENT)
            .attr("type", kind)
            .attr("id", self.id());
        if let Some(to) = to {
            iq = iq.attr("to", to);
        }
        iq.child(payload)
    }

    /// XEP-0199 ping to our server, waiting for the answer. Since the
    /// session handles our stanzas in order, once this returns everything
    /// sent before it has been processed.
    pub async fn sync(&mut self) -> anyhow::Result<()> {
        let domain = self.domain.clone();
        let iq = self.make_iq("get", Some(&domain), Element::new("ping", ns::PING));
        let reply = self.iq(iq).await?;
        if reply.get_attr("type") != Some("result") {
            bail!("ping failed: {}", reply.to_string_in(ns::CLIENT));
        }
        Ok(())
    }

    /// Sends available presence with this priority (RFC 6121 §4.2) and
    /// waits until the server has taken it into account.
    pub async fn presence(&mut self, priority: i8) -> anyhow::Result<()> {
        let p = Element::new("presence", ns::CLIENT)
            .child(Element::new("priority", ns::CLIENT).text(priority.to_string()));
        self.send(&p).await?;
        self.sync().await
    }

    /// Sends a `chat` message with a body.
    pub async fn chat(&mut self, to: &str, body: &str) -> anyhow::Result<()> {
        let id = self.id();
        let m = message(to, body).attr("id", id);
        self.send(&m).await
    }

    pub async fn send(&mut self, e: &Element) -> anyhow::Result<()> {
        self.send_raw(&e.to_string_in(ns::CLIENT)).await
    }

    /// Writes bytes as they are: for malformed-XML tests.
    pub async fn send_raw(&mut self, data: &str) -> anyhow::Result<()> {
        self.conn
            .write_all(data.as_bytes())
            .await
            .context("write failed")
    }

    /// Reads until the parser yields an event; `Ok(None)` at EOF.
    async fn read_event(&mut self) -> anyhow::Result<Option<Event>> {
        loop {
            if let Some(ev) = self
                .parser
                .next_event()
                .map_err(|e| anyhow!("the server sent bad XML: {e}"))?
            {
                return Ok(Some(ev));
            }
            let n = match self.conn.read(&mut self.read_buf).await {
                Ok(n) => n,
                // A peer closing TLS without close_notify, or a reset, is a close too.
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::UnexpectedEof
                            | std::io::ErrorKind::ConnectionReset
                            | std::io::ErrorKind::BrokenPipe
                    ) =>
                {
                    0
                }
                Err(e) => return Err(e.into()),
            };
            if n == 0 {
                return Ok(None);
            }
            self.parser.feed(&self.read_buf[..n]);
        }
    }

    /// The next element from the socket (skipping stream headers), or an
    /// error once the stream is closed.
    async fn read_element(&mut self) -> anyhow::Result<Element> {
        loop {
            if self.closed {
                bail!("the server closed the stream");
            }
            match self.read_event().await? {
                Some(Event::Element(e)) => return Ok(e),
                Some(Event::StreamOpen(_)) => continue,
                Some(Event::StreamClose) | None => self.closed = true,
            }
        }
    }

    /// The next element, waiting at most `timeout`.
    pub async fn recv(&mut self, timeout: Duration) -> anyhow::Result<Element> {
        if let Some(e) = self.pending.pop_front() {
            return Ok(e);
        }
        tokio::time::timeout(timeout, self.read_element())
            .await
            .map_err(|_| anyhow!("nothing received within {timeout:?}"))?
    }

    /// The first element matching `pred`, waiting at most `timeout`;
    /// elements before it are kept for later `recv`s.
    pub async fn recv_until(
        &mut self,
        mut pred: impl FnMut(&Element) -> bool,
        timeout: Duration,
    ) -> anyhow::Result<Element> {
        if let Some(i) = self.pending.iter().position(&mut pred) {
            return Ok(self.pending.remove(i).expect("index is in range"));
        }
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let e = tokio::time::timeout_at(deadline, self.read_element())
                .await
                .map_err(|_| {
                    anyhow!(
                        "no matching element within {timeout:?}; got instead: {:?}",
                        self.pending
                            .iter()
                            .map(|e| e.to_string_in(ns::CLIENT))
                            .collect::<Vec<_>>()
                    )
                })??;
            if pred(&e) {
                return Ok(e);
            }
            self.pending.push_back(e);
        }
    }

    /// The next `<message/>` (skipping and keeping anything else).
    pub async fn recv_message(&mut self, timeout: Duration) -> anyhow::Result<Element> {
        self.recv_until(|e| e.name == "message", timeout).await
    }

    /// Asserts that no element arrives within `window`, not even presence.
    pub async fn expect_nothing(&mut self, window: Duration) -> anyhow::Result<()> {
        self.expect_none(|_| true, window).await
    }

    /// Asserts that no `<message/>` arrives within `window` (presence
    /// broadcasts and the like may; they are kept).
    pub async fn expect_no_message(&mut self, window: Duration) -> anyhow::Result<()> {
        self.expect_none(|e| e.name == "message", window).await
    }

    /// Asserts that no element matching `pred` is pending or arrives within
    /// `window`; others are kept for later `recv`s.
    pub async fn expect_none(
        &mut self,
        mut pred: impl FnMut(&Element) -> bool,
        window: Duration,
    ) -> anyhow::Result<()> {
        if let Some(e) = self.pending.iter().find(|e| pred(e)) {
            bail!("unexpected element: {}", e.to_string_in(ns::CLIENT));
        }
        let deadline = tokio::time::Instant::now() + window;
        loop {
            match tokio::time::timeout_at(deadline, self.read_element()).await {
                Err(_) => return Ok(()),
                Ok(Ok(e)) if pred(&e) => {
                    bail!("unexpected element: {}", e.to_string_in(ns::CLIENT))
                }
                Ok(Ok(e)) => self.pending.push_back(e),
                Ok(Err(e)) => return Err(e.context("expected a quiet, open stream")),
            }
        }
    }

    /// Waits for a stream error (RFC 6120 §4.9), checks that the server
    /// then closes the stream, and returns the condition, e.g. `conflict`.
    pub async fn expect_stream_error(&mut self, timeout: Duration) -> anyhow::Result<String> {
        let e = self
            .recv_until(|e| e.is("error", ns::STREAM), timeout)
            .await
            .context("waiting for a stream error")?;
        let cond = e
            .elements()
            .find(|c| c.ns == ns::STREAMS && c.name != "text")
            .map(|c| c.name.clone())
            .with_context(|| {
                format!(
                    "stream error without condition: {}",
                    e.to_string_in(ns::CLIENT)
                )
            })?;
        self.expect_closed(timeout)
            .await
            .with_context(|| format!("after stream error {cond}"))?;
        Ok(cond)
    }

    /// Waits until the server closes the stream or the connection; fails
    /// if a stanza arrives first.
    pub async fn expect_closed(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        while !self.closed {
            match tokio::time::timeout_at(deadline, self.read_event()).await {
                Err(_) => bail!("the stream is still open after {timeout:?}"),
                Ok(Err(e)) => return Err(e),
                Ok(Ok(Some(Event::Element(e)))) => {
                    bail!(
                        "expected the stream to close, got {}",
                        e.to_string_in(ns::CLIENT)
                    )
                }
                Ok(Ok(Some(Event::StreamOpen(_)))) => {}
                Ok(Ok(Some(Event::StreamClose) | None)) => self.closed = true,
            }
        }
        Ok(())
    }

    /// Sends available presence announcing entity capabilities (XEP-0115)
    /// for `notify` (`NODE+notify` each), and answers the server's
    /// disco#info query about them if one comes (the server asks once per
    /// `ver`). With `lie`, the answer lists more than the hash stands for.
    pub async fn presence_with_caps(&mut self, notify: &[&str], lie: bool) -> anyhow::Result<()> {
        let info = caps_disco_info(notify);
        let ver = xmpp::caps::ver("sha-1", &info).context("sha-1")?;
        let presence = Element::new("presence", ns::CLIENT).child(
            Element::new("c", xmpp::caps::NS)
                .attr("hash", "sha-1")
                .attr("node", CAPS_NODE)
                .attr("ver", ver.as_str()),
        );
        self.send(&presence).await?;
        let asked = self
            .recv_until(
                |e| {
                    e.name == "iq"
                        && e.get_attr("type") == Some("get")
                        && e.has_child("query", ns::DISCO_INFO)
                },
                QUIET,
            )
            .await;
        if let Ok(q) = asked {
            let node = q
                .get_child("query", ns::DISCO_INFO)
                .and_then(|x| x.get_attr("node"))
                .unwrap_or_default()
                .to_owned();
            if node != format!("{CAPS_NODE}#{ver}") {
                bail!("the server asked about node {node:?}");
            }
            let mut answer = if lie {
                let mut all = notify.to_vec();
                all.extend([
                    "http://jabber.org/protocol/nick",
                    "eu.siacs.conversations.axolotl.devicelist",
                    "urn:xmpp:bookmarks:1",
                    "urn:xmpp:avatar:metadata",
                ]);
                caps_disco_info(&all)
            } else {
                info
            };
            answer.set_attr("node", node);
            let reply = Element::new("iq", ns::CLIENT)
                .attr("type", "result")
                .attr("id", q.get_attr("id").unwrap_or_default())
                .attr("to", q.get_attr("from").unwrap_or_default())
                .child(answer);
            self.send(&reply).await?;
        }
        self.sync().await
    }

    /// Closes our stream politely.
    pub async fn close(mut self) -> anyhow::Result<()> {
        self.send_raw("</stream:stream>").await
    }
}

const CAPS_NODE: &str = "https://tests.example/caps";

/// The disco#info of a client interested in `notify` (`NODE+notify` each).
pub fn caps_disco_info(notify: &[&str]) -> Element {
    let mut q = Element::new("query", ns::DISCO_INFO).child(
        Element::new("identity", ns::DISCO_INFO)
            .attr("category", "client")
            .attr("type", "pc")
            .attr("name", "tests"),
    );
    for f in [ns::DISCO_INFO, xmpp::caps::NS] {
        q = q.child(Element::new("feature", ns::DISCO_INFO).attr("var", f));
    }
    for n in notify {
        q = q.child(Element::new("feature", ns::DISCO_INFO).attr("var", format!("{n}+notify")));
    }
    q
}

/// A `chat` message with a body.
pub fn message(to: &str, body: &str) -> Element {
    Element::new("message", ns::CLIENT)
        .attr("to", to)
        .attr("type", "chat")
        .child(Element::new("body", ns::CLIENT).text(body))
}

/// A stanza as text, for assertion messages.
pub fn show(e: &Element) -> String {
    e.to_string_in(ns::CLIENT)
}

/// The `<body/>` text of a message.
pub fn body(m: &Element) -> Option<String> {
    m.child_text("body", &m.ns)
}
