//! The load generator's own client: connect, TLS, SASL, bind, roster get,
//! initial presence, as RFC 6120/6121 describe them, against any server.
//!
//! It is separate from the test client (`crate::client`) because it serves
//! a different purpose: negotiation happens once per connection and may
//! build elements, but what follows must stay cheap, so a logged-in
//! [`Session`] hands over its socket and a [`Framer`] holding any bytes the
//! server already sent; the scenarios frame and scan those bytes
//! themselves.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use rand::Rng as _;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use xmpp::element::{escape, Element};
use xmpp::sasl::client::{
    plain_initial_response, ClientChannelBinding, SaltedPasswords, ScramClient,
};
use xmpp::sasl::HashAlg;
use xmpp::stanza::ns;
use xmpp::xml::{Event, Limits, StreamParser};

use super::framer::{Frame, Framer};
use super::io::{Io, Raw, WsIo};
use super::Account;
use crate::tls::AcceptAnyCert;

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum TlsMode {
    /// Plain TCP, then `<starttls/>` (RFC 6120 §5), the standard c2s port.
    Starttls,
    /// TLS from the first byte (XEP-0368), the "direct TLS" port; with
    /// `--transport websocket`, `wss://` on an HTTPS port.
    Direct,
    /// No TLS at all: `ws://` on a plain HTTP port (behind a TLS proxy),
    /// or TCP to a server that does not require TLS.
    None,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// XMPP over TCP (RFC 6120).
    Tcp,
    /// XMPP over WebSocket (RFC 7395) at `--ws-path` of an HTTP(S) port.
    Websocket,
}

#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
pub enum Mech {
    #[value(name = "plain")]
    #[serde(rename = "PLAIN")]
    Plain,
    #[value(name = "scram-sha-1")]
    #[serde(rename = "SCRAM-SHA-1")]
    ScramSha1,
    #[value(name = "scram-sha-256")]
    #[serde(rename = "SCRAM-SHA-256")]
    ScramSha256,
    /// SASL2 (XEP-0388) with Bind2: each user's first login is
    /// SCRAM-SHA-256 asking for a FAST token (XEP-0484), every later one
    /// HT-SHA-256-NONE with that token, in one round trip.
    #[value(name = "fast")]
    #[serde(rename = "FAST")]
    Fast,
}

impl Mech {
    pub fn name(self) -> &'static str {
        match self {
            Mech::Plain => "PLAIN",
            Mech::ScramSha1 => "SCRAM-SHA-1",
            Mech::ScramSha256 => "SCRAM-SHA-256",
            Mech::Fast => "HT-SHA-256-NONE",
        }
    }
}

/// Why a login failed. [`LoginError::cause`] is the short key the report
/// counts errors by; `Display` is the sentence an operator reads.
#[derive(Debug, thiserror::Error)]
pub enum LoginError {
    #[error("cannot connect to {addr}: connection refused — is the server running?")]
    Refused { addr: SocketAddr },
    #[error("cannot bind to the source address {ip}: {source} (is it an address of this machine? every 127.0.0.0/8 address is, on Linux)")]
    Bind { ip: IpAddr, source: std::io::Error },
    #[error("cannot connect to {addr}: {source}")]
    Unreachable {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TLS with {addr} failed: {detail}")]
    Tls { addr: SocketAddr, detail: String },
    #[error("authentication failed for {jid}: {condition}{}", auth_hint(condition))]
    Auth { jid: String, condition: String },
    #[error("the server closed the stream with a stream error: {condition}{}", text.as_deref().map(|t| format!(" ({t})")).unwrap_or_default())]
    Stream {
        condition: String,
        text: Option<String>,
    },
    #[error("timed out after {0:?} waiting for {1}")]
    Timeout(Duration, &'static str),
    #[error("connection lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol: {0}")]
    Protocol(String),
}

fn auth_hint(condition: &str) -> &'static str {
    match condition {
        "not-authorized" => " — wrong password or unknown account",
        "invalid-mechanism" => " — the server does not allow this mechanism; try --mechanism",
        _ => "",
    }
}

impl LoginError {
    pub fn cause(&self) -> String {
        match self {
            LoginError::Refused { .. } => "connection-refused".into(),
            LoginError::Bind { .. } => "bind".into(),
            LoginError::Unreachable { .. } => "unreachable".into(),
            LoginError::Tls { .. } => "tls".into(),
            LoginError::Auth { condition, .. } => format!("auth:{condition}"),
            LoginError::Stream { condition, .. } => format!("stream-error:{condition}"),
            LoginError::Timeout(_, what) => format!("timeout:{what}"),
            LoginError::Io(_) => "connection-lost".into(),
            LoginError::Protocol(_) => "protocol".into(),
        }
    }
}

/// Where and how to log in; shared by every connection of a run.
pub struct Target {
    /// The servers; user i logs in to `addrs[i % addrs.len()]`.
    pub addrs: Vec<SocketAddr>,
    /// The first of `domains`.
    pub domain: String,
    /// The users' domains; user i is of `domains[i % domains.len()]`
    /// (one per server: servers of different domains federate).
    pub domains: Vec<String>,
    pub tls: TlsMode,
    pub transport: Transport,
    /// The WebSocket endpoint's path.
    pub ws_path: String,
    pub mech: Mech,
    /// Each negotiation step must answer within this time.
    pub step_timeout: Duration,
    /// Send `<presence/>` after the roster get.
    pub initial_presence: bool,
    connector: tokio_rustls::TlsConnector,
    server_names: Vec<ServerName<'static>>,
    /// `--source-ips`: connections bind to these in turn (empty: the
    /// kernel picks the source address).
    pub source_ips: Vec<IpAddr>,
    next_source: AtomicUsize,
    /// Connections made from each local address (with `--source-ips`), as
    /// the kernel reports them after connecting.
    by_source: std::sync::Mutex<BTreeMap<IpAddr, u64>>,
    /// `--mechanism fast`: each user's current FAST token, by user index.
    fast_tokens: std::sync::Mutex<std::collections::HashMap<usize, String>>,
}

impl Target {
    /// The server of the `i`-th user.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.addrs[i % self.addrs.len()]
    }

    /// Connections made from each local address, with `--source-ips`.
    pub fn connections_by_source(&self) -> BTreeMap<String, u64> {
        let m = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
        m.iter().map(|(ip, n)| (ip.to_string(), *n)).collect()
    }

    /// A TCP connection to `addr`, from the next `--source-ips` address if
    /// any. The source port is left to `connect` (`IP_BIND_ADDRESS_NO_PORT`),
    /// so each source address has its full ephemeral range towards every
    /// destination instead of sharing one range over all of them.
    async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, LoginError> {
        let connect = async {
            if self.source_ips.is_empty() {
                return TcpStream::connect(addr).await.map_err(|e| (None, e));
            }
            let n = self.next_source.fetch_add(1, Ordering::Relaxed);
            let ip = self.source_ips[n % self.source_ips.len()];
            let bind = || {
                let socket = match ip {
                    IpAddr::V4(_) => TcpSocket::new_v4()?,
                    IpAddr::V6(_) => TcpSocket::new_v6()?,
                };
                bind_address_no_port(&socket);
                socket.bind(SocketAddr::new(ip, 0))?;
                Ok(socket)
            };
            let socket = bind().map_err(|e| (Some(ip), e))?;
            let stream = socket.connect(addr).await.map_err(|e| (None, e))?;
            if let Ok(local) = stream.local_addr() {
                let mut m = self.by_source.lock().unwrap_or_else(|p| p.into_inner());
                *m.entry(local.ip()).or_default() += 1;
            }
            Ok(stream)
        };
        match tokio::time::timeout(self.step_timeout, connect).await {
            Err(_) => Err(LoginError::Timeout(self.step_timeout, "TCP connect")),
            Ok(Err((Some(ip), source))) => Err(LoginError::Bind { ip, source }),
            Ok(Err((None, e))) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                Err(LoginError::Refused { addr })
            }
            Ok(Err((None, source))) => Err(LoginError::Unreachable { addr, source }),
            Ok(Ok(s)) => Ok(s),
        }
    }

    /// How many users hold a FAST token (`--mechanism fast`).
    pub fn fast_tokens_held(&self) -> usize {
        self.tokens().len()
    }

    fn tokens(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<usize, String>> {
        self.fast_tokens.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The domain of the `i`-th user.
    pub fn domain_of(&self, i: usize) -> &str {
        &self.domains[i % self.domains.len()]
    }

    pub fn new(
        addrs: Vec<SocketAddr>,
        domain: &str,
        tls: TlsMode,
        transport: Transport,
        mech: Mech,
    ) -> anyhow::Result<Target> {
        anyhow::ensure!(
            !(transport == Transport::Websocket && tls == TlsMode::Starttls),
            "WebSocket has no STARTTLS: use --tls direct (wss://, an HTTPS port) or --tls none (ws://, an HTTP port)"
        );
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        // Benchmark servers run with self-signed certificates, so any
        // certificate is accepted: this tool measures, it does not protect.
        let config = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AcceptAnyCert(provider)))
            .with_no_client_auth();
        let domains: Vec<String> = domain.split(',').map(|d| d.trim().to_owned()).collect();
        let server_names = domains
            .iter()
            .map(|d| {
                ServerName::try_from(d.clone())
                    .map_err(|_| anyhow::anyhow!("{d} is not a valid domain name"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        anyhow::ensure!(!addrs.is_empty(), "no server address");
        anyhow::ensure!(
            domains.len() == 1 || domains.len() == addrs.len(),
            "give one domain, or one per server ({} servers, {} domains)",
            addrs.len(),
            domains.len()
        );
        Ok(Target {
            addrs,
            domain: domains[0].clone(),
            domains,
            tls,
            transport,
            ws_path: "/xmpp-websocket".into(),
            mech,
            step_timeout: Duration::from_secs(30),
            initial_presence: true,
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            server_names,
            source_ips: Vec::new(),
            next_source: AtomicUsize::new(0),
            by_source: Default::default(),
            fast_tokens: Default::default(),
        })
    }
}

/// Linux's `IP_BIND_ADDRESS_NO_PORT`: a socket bound to an address with
/// port 0 gets its port at `connect`, per destination. Best effort: without
/// it, `bind` takes a port from the one range shared by all destinations.
fn bind_address_no_port(socket: &TcpSocket) {
    use std::os::fd::AsRawFd as _;
    let one: libc::c_int = 1;
    // SAFETY: setsockopt on an open socket with a pointer to a local int
    // and its size.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A logged-in, bound session whose roster was fetched.
pub struct Session {
    pub io: Io,
    /// Holds whatever the server sent after the roster result.
    pub framer: Framer,
    pub jid: String,
}

impl Session {
    /// Connects and logs in `account`, the `i`-th user, at its server.
    pub async fn login(t: &Target, i: usize, account: &Account) -> Result<Session, LoginError> {
        let addr = t.addr(i);
        let tcp = t.connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut n = Negotiator {
            t,
            domain: t.domain_of(i),
            framer: Framer::new(),
            parser: StreamParser::new(Limits::default()),
        };
        let tls = |tcp| async move {
            let io = t
                .connector
                .connect(t.server_names[i % t.server_names.len()].clone(), tcp)
                .await
                .map_err(|e| LoginError::Tls {
                    addr,
                    detail: e.to_string(),
                })?;
            Ok::<_, LoginError>(Raw::Tls(Box::new(io)))
        };
        let raw = match t.tls {
            TlsMode::None => Raw::Tcp(tcp),
            TlsMode::Direct => tls(tcp).await?,
            TlsMode::Starttls => {
                let mut tcp = tcp;
                let features = n.open_stream(&mut tcp).await.map_err(|e| match e {
                    LoginError::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                        LoginError::Protocol(format!(
                            "{} closed the connection before sending a stream header: is it a direct-TLS port? (try --tls direct)",
                            addr
                        ))
                    }
                    e => e,
                })?;
                if !features.has_child("starttls", ns::TLS) {
                    return Err(LoginError::Protocol(
                        "the server does not offer STARTTLS on this port (direct TLS port? use --tls direct)".into(),
                    ));
                }
                tcp.write_all(b"<starttls xmlns='urn:ietf:params:xml:ns:xmpp-tls'/>")
                    .await?;
                let reply = n.recv(&mut tcp, "<proceed/>").await?;
                if !reply.is("proceed", ns::TLS) {
                    return Err(LoginError::Tls {
                        addr,
                        detail: "STARTTLS refused by the server".into(),
                    });
                }
                // RFC 6120 §5.4.3.3: nothing from the plaintext stream carries over.
                n.framer.clear();
                tls(tcp).await?
            }
        };
        let mut io = match t.transport {
            Transport::Tcp => Io::Raw(raw),
            Transport::Websocket => {
                let secure = matches!(raw, Raw::Tls(_));
                let connect = WsIo::connect(raw, n.domain, &t.ws_path, secure);
                match tokio::time::timeout(t.step_timeout, connect).await {
                    Err(_) => {
                        return Err(LoginError::Timeout(
                            t.step_timeout,
                            "the WebSocket handshake",
                        ))
                    }
                    Ok(Err(e)) => return Err(LoginError::Protocol(e.to_string())),
                    Ok(Ok(ws)) => Io::Ws(Box::new(ws)),
                }
            }
        };
        let features = n.open_stream(&mut io).await?;
        if t.mech == Mech::Fast {
            let jid = n.sasl2(&mut io, &features, i, account).await?;
            return n.finish(io, jid).await;
        }
        n.authenticate(&mut io, &features, account).await?;
        // RFC 6120 §6.4.6: a new stream after SASL success.
        let features = n.open_stream(&mut io).await?;
        if !features.has_child("bind", ns::BIND) {
            return Err(LoginError::Protocol(
                "no resource binding offered after authentication".into(),
            ));
        }
        io.write_all(
            b"<iq type='set' id='xl-bind'><bind xmlns='urn:ietf:params:xml:ns:xmpp-bind'/></iq>",
        )
        .await?;
        let reply = n.recv_iq(&mut io, "xl-bind", "the bind result").await?;
        let jid = reply
            .get_child("bind", ns::BIND)
            .and_then(|b| b.child_text("jid", ns::BIND))
            .ok_or_else(|| {
                LoginError::Protocol(format!("bind failed: {}", reply.to_string_in(ns::CLIENT)))
            })?;
        // RFC 3921 session establishment, only where a server still requires it.
        if let Some(s) = features.get_child("session", ns::SESSION) {
            if !s.has_child("optional", ns::SESSION) {
                io.write_all(b"<iq type='set' id='xl-sess'><session xmlns='urn:ietf:params:xml:ns:xmpp-session'/></iq>")
                    .await?;
                n.recv_iq(&mut io, "xl-sess", "the session result").await?;
            }
        }
        n.finish(io, jid).await
    }
}

struct Negotiator<'a> {
    t: &'a Target,
    domain: &'a str,
    framer: Framer,
    parser: StreamParser,
}

impl Negotiator<'_> {
    /// RFC 6121 §2.2 roster get, then initial presence (§4.2), pipelined:
    /// the server answers the roster get first.
    async fn finish(mut self, mut io: Io, jid: String) -> Result<Session, LoginError> {
        let mut req: &[u8] =
            b"<iq type='get' id='xl-roster'><query xmlns='jabber:iq:roster'/></iq><presence/>";
        if !self.t.initial_presence {
            req = &req[..req.len() - b"<presence/>".len()];
        }
        io.write_all(req).await?;
        self.recv_iq(&mut io, "xl-roster", "the roster result")
            .await?;
        Ok(Session {
            io,
            framer: self.framer,
            jid,
        })
    }

    /// SASL2 with Bind2 (`--mechanism fast`): FAST with the user's token
    /// when it has one (one round trip), else SCRAM-SHA-256 asking for a
    /// token. Returns the bound JID.
    async fn sasl2<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        features: &Element,
        i: usize,
        account: &Account,
    ) -> Result<String, LoginError> {
        const SASL2: &str = "urn:xmpp:sasl:2";
        const FAST: &str = "urn:xmpp:fast:0";
        if features.get_child("authentication", SASL2).is_none() {
            return Err(LoginError::Protocol(
                "the server does not offer SASL2 (XEP-0388), which --mechanism fast needs".into(),
            ));
        }
        let jid = format!("{}@{}", account.user, self.domain);
        let failed = |reply: &Element| auth_failure(&jid, reply);
        let token = self.t.tokens().get(&i).cloned();
        // The same id each time: the server gives the user's token, and its
        // resource, back to it.
        let inline = format!(
            "<user-agent id='xmpp-load-{}'/><bind xmlns='urn:xmpp:bind:0'><tag>load</tag></bind>",
            escape(&account.user)
        );
        let nonce = B64.encode(rand::thread_rng().gen::<[u8; 18]>());
        let mut scram = None;
        let first = match &token {
            Some(token) => {
                let initial = xmpp::fast::client_initial(&account.user, token.as_bytes(), b"");
                format!(
                    "<authenticate xmlns='{SASL2}' mechanism='HT-SHA-256-NONE'><initial-response>{}</initial-response>{inline}</authenticate>",
                    B64.encode(initial)
                )
            }
            None => {
                let c = ScramClient::new(
                    HashAlg::Sha256,
                    &account.user,
                    &account.password,
                    ClientChannelBinding::None,
                    nonce,
                )
                .map_err(|e| LoginError::Protocol(format!("SCRAM: {e:?}")))?;
                let first = format!(
                    "<authenticate xmlns='{SASL2}' mechanism='SCRAM-SHA-256'><initial-response>{}</initial-response>{inline}<request-token xmlns='{FAST}' mechanism='HT-SHA-256-NONE'/></authenticate>",
                    B64.encode(c.client_first())
                );
                scram = Some(c);
                first
            }
        };
        io.write_all(first.as_bytes()).await?;
        let mut reply = self.recv(io, "the SASL2 answer").await?;
        if let Some(c) = &mut scram {
            if !reply.is("challenge", SASL2) {
                return Err(failed(&reply));
            }
            let server_first = B64
                .decode(reply.text_content().trim())
                .map_err(|_| LoginError::Protocol("challenge is not base64".into()))?;
            let client_final = c
                .handle_server_first(&server_first)
                .map_err(|e| LoginError::Protocol(format!("SCRAM server-first: {e:?}")))?;
            io.write_all(
                format!(
                    "<response xmlns='{SASL2}'>{}</response>",
                    B64.encode(client_final)
                )
                .as_bytes(),
            )
            .await?;
            reply = self.recv(io, "the SASL2 outcome").await?;
        }
        if !reply.is("success", SASL2) {
            if token.is_some() {
                // Revoked or expired: the next login gets a new one.
                self.t.tokens().remove(&i);
            }
            return Err(failed(&reply));
        }
        if let Some(t) = reply
            .get_child("token", FAST)
            .and_then(|t| t.get_attr("token"))
        {
            self.t.tokens().insert(i, t.to_owned());
        }
        let bound = reply
            .child_text("authorization-identifier", SASL2)
            .filter(|j| j.contains('/'))
            .ok_or_else(|| LoginError::Protocol("SASL2 success without a bound JID".into()))?;
        // No restart (XEP-0388): the features follow the success.
        let features = self.recv(io, "the features after SASL2").await?;
        if !features.is("features", ns::STREAM) {
            return Err(LoginError::Protocol(format!(
                "expected features after SASL2 success, got {}",
                features.to_string_in(ns::CLIENT)
            )));
        }
        Ok(bound)
    }

    /// Sends our stream header and reads the server's header and features.
    async fn open_stream<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
    ) -> Result<Element, LoginError> {
        let header = format!(
            "<?xml version='1.0'?><stream:stream xmlns='jabber:client' xmlns:stream='http://etherx.jabber.org/streams' to='{}' version='1.0' xml:lang='en'>",
            escape(self.domain)
        );
        io.write_all(header.as_bytes()).await?;
        self.framer.restart();
        self.parser = StreamParser::new(Limits::default());
        let features = self.recv(io, "<stream:features/>").await?;
        if !features.is("features", ns::STREAM) {
            return Err(LoginError::Protocol(format!(
                "expected <stream:features/>, got {}",
                features.to_string_in(ns::CLIENT)
            )));
        }
        Ok(features)
    }

    async fn authenticate<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        features: &Element,
        account: &Account,
    ) -> Result<(), LoginError> {
        let offered: Vec<String> = features
            .get_child("mechanisms", ns::SASL)
            .map(|m| m.elements().map(Element::text_content).collect())
            .unwrap_or_default();
        let mech = self.t.mech;
        if !offered.iter().any(|m| m == mech.name()) {
            return Err(LoginError::Protocol(format!(
                "the server does not offer {}; it offers {}",
                mech.name(),
                offered.join(", ")
            )));
        }
        let jid = format!("{}@{}", account.user, self.domain);
        let auth_failed = |reply: &Element| auth_failure(&jid, reply);
        let hash = match mech {
            Mech::Plain => {
                let initial = plain_initial_response(None, &account.user, &account.password);
                io.write_all(auth(mech.name(), &initial).as_bytes()).await?;
                let reply = self.recv(io, "the SASL outcome").await?;
                if reply.is("success", ns::SASL) {
                    return Ok(());
                }
                return Err(auth_failed(&reply));
            }
            Mech::ScramSha1 => HashAlg::Sha1,
            Mech::ScramSha256 => HashAlg::Sha256,
            Mech::Fast => {
                return Err(LoginError::Protocol(
                    "FAST runs over SASL2, not this exchange".into(),
                ))
            }
        };
        let nonce = B64.encode(rand::thread_rng().gen::<[u8; 18]>());
        let mut scram = ScramClient::new(
            hash,
            &account.user,
            &account.password,
            ClientChannelBinding::None,
            nonce,
        )
        .map_err(|e| LoginError::Protocol(format!("SCRAM: {e:?}")))?;
        io.write_all(auth(mech.name(), &scram.client_first()).as_bytes())
            .await?;
        let reply = self.recv(io, "the SASL challenge").await?;
        if !reply.is("challenge", ns::SASL) {
            return Err(auth_failed(&reply));
        }
        let server_first = B64
            .decode(reply.text_content().trim())
            .map_err(|_| LoginError::Protocol("challenge is not base64".into()))?;
        // Like a real client, keep the SaltedPassword: the PBKDF2 rounds
        // would otherwise make xmpp-load, not the server, the bottleneck of
        // a SCRAM login run. One cache per worker thread, no lock.
        thread_local! {
            static SALTED: std::cell::RefCell<SaltedPasswords> = std::cell::RefCell::default();
        }
        let client_final = SALTED
            .with(|c| scram.handle_server_first_cached(&server_first, Some(&mut c.borrow_mut())))
            .map_err(|e| LoginError::Protocol(format!("SCRAM server-first: {e:?}")))?;
        io.write_all(
            format!(
                "<response xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>{}</response>",
                B64.encode(client_final)
            )
            .as_bytes(),
        )
        .await?;
        let reply = self.recv(io, "the SASL outcome").await?;
        if !reply.is("success", ns::SASL) {
            return Err(auth_failed(&reply));
        }
        let data = B64
            .decode(reply.text_content().trim())
            .map_err(|_| LoginError::Protocol("success data is not base64".into()))?;
        // RFC 5802 §3: the server proves it knows the credentials too.
        scram
            .verify_server_final(&data)
            .map_err(|e| LoginError::Protocol(format!("SCRAM server signature: {e:?}")))
    }

    /// Waits for the IQ reply with this id; other stanzas are skipped.
    async fn recv_iq<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        id: &str,
        what: &'static str,
    ) -> Result<Element, LoginError> {
        loop {
            let e = self.recv(io, what).await?;
            if e.name == "iq" && e.get_attr("id") == Some(id) {
                if e.get_attr("type") == Some("error") {
                    return Err(LoginError::Protocol(format!(
                        "{what} is an error: {}",
                        e.to_string_in(ns::CLIENT)
                    )));
                }
                return Ok(e);
            }
        }
    }

    /// The next first-level element, the stream header being skipped.
    async fn recv<S: AsyncRead + AsyncWrite + Unpin>(
        &mut self,
        io: &mut S,
        what: &'static str,
    ) -> Result<Element, LoginError> {
        // What was written must be on its way before we wait for the answer
        // (a WebSocket codec buffers frames until flushed).
        io.flush().await?;
        let limit = self.t.step_timeout;
        tokio::time::timeout(limit, self.recv_inner(io))
            .await
            .map_err(|_| LoginError::Timeout(limit, what))?
    }

    async fn recv_inner<S: AsyncRead + Unpin>(
        &mut self,
        io: &mut S,
    ) -> Result<Element, LoginError> {
        loop {
            while let Some(frame) = self.framer.next_frame() {
                let (s, e) = match frame {
                    Frame::Header(s, e) | Frame::Stanza(s, e) => (s, e),
                    Frame::Close => {
                        return Err(LoginError::Protocol("the server closed the stream".into()))
                    }
                };
                self.parser.feed(&self.framer.buffer()[s..e]);
                while let Some(ev) = self
                    .parser
                    .next_event()
                    .map_err(|e| LoginError::Protocol(format!("server sent bad XML: {e}")))?
                {
                    match ev {
                        Event::StreamOpen(_) => {}
                        Event::StreamClose => {
                            return Err(LoginError::Protocol("the server closed the stream".into()))
                        }
                        Event::Element(el) if el.is("error", ns::STREAM) => {
                            return Err(LoginError::Stream {
                                condition: el
                                    .elements()
                                    .find(|c| c.name != "text")
                                    .map(|c| c.name.clone())
                                    .unwrap_or_default(),
                                text: el.child_text("text", ns::STREAMS),
                            });
                        }
                        Event::Element(el) => return Ok(el),
                    }
                }
            }
            let buf = self.framer.read_buf(4096);
            let n = io.read(buf).await?;
            if n == 0 {
                return Err(LoginError::Io(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server closed the connection",
                )));
            }
            self.framer.filled(n);
        }
    }
}

/// A SASL `<failure/>` as the error that names its condition.
fn auth_failure(jid: &str, reply: &Element) -> LoginError {
    LoginError::Auth {
        jid: jid.to_owned(),
        condition: reply
            .elements()
            .find(|c| c.name != "text")
            .map(|c| c.name.clone())
            .unwrap_or_else(|| "failure".into()),
    }
}

fn auth(mechanism: &str, initial: &[u8]) -> String {
    // RFC 6120 §6.4.2: an empty initial response is "=".
    let data = if initial.is_empty() {
        "=".to_owned()
    } else {
        B64.encode(initial)
    };
    format!("<auth xmlns='urn:ietf:params:xml:ns:xmpp-sasl' mechanism='{mechanism}'>{data}</auth>")
}
