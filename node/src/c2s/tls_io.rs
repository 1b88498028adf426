//! TLS for client connections over rustls's unbuffered API, so that a
//! connection owns its buffers and an idle one holds none.
//!
//! rustls's buffered connection (what tokio-rustls wraps) keeps a 4 KiB
//! record buffer for a connection's whole life: a third of what an idle
//! authenticated session costs. Here ciphertext is read into a buffer of
//! the thread's, processed at once, and only an incomplete record's bytes
//! are kept (in a buffer of their exact size). What is encrypted is queued
//! until the flush that follows and freed once written. Decrypted bytes go
//! straight into the reader's buffer; what does not fit waits in one of
//! the connection's, freed when read.
//!
//! The handshake is processed inside [`Handshake::observe`], where the
//! host chosen by SNI and the exporter secret are noted for channel
//! binding ([`crate::tls::Tls::bindings`]).

use std::cell::Cell;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncodeTlsData, EncryptError, InsufficientSizeError,
    UnbufferedStatus, WriteTraffic,
};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

use crate::tls::Handshake;

/// What one read asks of the socket at least: a whole TLS record.
const READ_CHUNK: usize = 16 * 1024 + 512;
/// Ciphertext queued beyond this makes a writer wait for the socket.
const WRITE_HIGH: usize = 64 * 1024;
/// The thread's read buffer is kept when no larger than this.
const SCRATCH_KEEP: usize = 64 * 1024;
/// Bytes of incomplete records kept at most: a handshake message of the
/// largest size rustls accepts (64 KiB) joined across records, and one
/// more record. rustls's buffered API refuses more too; without a bound a
/// client could claim a large message and send it a byte per record.
const MAX_PARTIAL: usize = 0xffff + 16 * 1024 + 2048 + 5;

thread_local! {
    /// Where ciphertext is read and processed, shared by the connections
    /// served on this thread (a poll uses it without yielding).
    static SCRATCH: Cell<Vec<u8>> = const { Cell::new(Vec::new()) };
}

/// A server-side TLS connection over TCP.
pub struct TlsIo {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Bytes of records not yet complete (or of a handshake message still
    /// being joined), which the next read continues.
    partial: Vec<u8>,
    /// Ciphertext queued for the socket; `outgoing[..sent]` is written.
    outgoing: Vec<u8>,
    sent: usize,
    /// Plaintext that did not fit the reader's buffer; `plain[..taken]`
    /// is read.
    plain: Vec<u8>,
    taken: usize,
    /// The client sent close_notify or closed its side: reads end.
    eof: bool,
    /// Our close_notify is queued.
    close_queued: bool,
    /// rustls failed: it is not called again (its state refers to input
    /// that is gone), and everything fails at once.
    failed: bool,
}

/// Where processing stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Application data can flow; more records need more bytes.
    Traffic,
    /// The handshake needs more bytes from the client.
    Handshake,
    /// Both sides closed.
    Closed,
}

/// What to do once the traffic state is reached.
enum Want<'d> {
    Nothing,
    Encrypt(&'d [u8]),
    CloseNotify,
}

/// Accepts a TLS connection on `tcp` and completes its handshake; what the
/// handshake showed is noted into `seen`.
pub async fn accept(
    tcp: TcpStream,
    config: Arc<rustls::ServerConfig>,
    seen: &mut Handshake,
) -> io::Result<TlsIo> {
    let conn = UnbufferedServerConnection::new(config).map_err(io::Error::other)?;
    let mut io = TlsIo {
        tcp,
        conn,
        partial: Vec::new(),
        outgoing: Vec::new(),
        sent: 0,
        plain: Vec::new(),
        taken: 0,
        eof: false,
        close_queued: false,
        failed: false,
    };
    std::future::poll_fn(|cx| io.poll_handshake(cx, seen)).await?;
    Ok(io)
}

fn tls_error(e: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

fn failed_before() -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, "the TLS connection failed")
}

/// Appends what `encode` writes to `out`, growing it to the size asked.
fn append(
    out: &mut Vec<u8>,
    guess: usize,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, InsufficientSizeError>,
) -> usize {
    let start = out.len();
    let mut size = guess;
    loop {
        out.resize(start + size, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return n;
            }
            Err(InsufficientSizeError { required_size }) => size = required_size,
        }
    }
}

/// Room for `len` bytes of application data once encrypted: a record per
/// 16 KiB, each with its header, type byte, explicit nonce and tag.
fn sealed_size(len: usize) -> usize {
    len + (len / 16384 + 1) * 40
}

impl TlsIo {
    /// The rustls connection, for the negotiated version and suite.
    pub fn common(&self) -> &rustls::CommonState {
        &self.conn
    }

    /// Runs rustls over the ciphertext `input` until it needs more bytes:
    /// plaintext goes to `dest` while it fits and then to `plain`,
    /// handshake records and alerts to `outgoing`. `want` is done on
    /// reaching the traffic state. Returns where it stopped and how many
    /// bytes of `input` are used up.
    fn process(
        &mut self,
        input: &mut [u8],
        mut dest: Option<&mut ReadBuf<'_>>,
        mut want: Want<'_>,
    ) -> io::Result<(Next, usize)> {
        if self.failed {
            return Err(failed_before());
        }
        let mut used = 0;
        loop {
            let mut extra = 0;
            let UnbufferedStatus { discard, state } =
                self.conn.process_tls_records(&mut input[used..]);
            let next = match state {
                Err(e) => {
                    used += discard;
                    self.queue_alert(&mut input[used..]);
                    self.failed = true;
                    return Err(tls_error(e));
                }
                Ok(ConnectionState::ReadTraffic(mut records)) => {
                    while let Some(record) = records.next_record() {
                        let record = record.map_err(tls_error)?;
                        extra += record.discard;
                        let payload = record.payload;
                        match dest.as_deref_mut() {
                            Some(d) if self.plain.is_empty() && d.remaining() >= payload.len() => {
                                d.put_slice(payload)
                            }
                            _ => self.plain.extend_from_slice(payload),
                        }
                    }
                    None
                }
                Ok(ConnectionState::EncodeTlsData(mut data)) => {
                    encode(&mut data, &mut self.outgoing);
                    None
                }
                // The records stay queued in `outgoing`, ahead of anything
                // encrypted later, and go out with the next flush.
                Ok(ConnectionState::TransmitTlsData(t)) => {
                    t.done();
                    None
                }
                Ok(ConnectionState::BlockedHandshake) => Some(Next::Handshake),
                Ok(ConnectionState::WriteTraffic(mut w)) => {
                    match std::mem::replace(&mut want, Want::Nothing) {
                        Want::Nothing => {}
                        Want::Encrypt(data) => encrypt(&mut w, &mut self.outgoing, data)?,
                        Want::CloseNotify => {
                            append(&mut self.outgoing, 64, |b| {
                                w.queue_close_notify(b).or_else(|e| match e {
                                    EncryptError::InsufficientSize(e) => Err(e),
                                    EncryptError::EncryptExhausted => Ok(0),
                                })
                            });
                        }
                    }
                    Some(Next::Traffic)
                }
                Ok(ConnectionState::PeerClosed) => {
                    self.eof = true;
                    None
                }
                Ok(ConnectionState::Closed) => {
                    self.eof = true;
                    Some(Next::Closed)
                }
                // No early data is accepted (`max_early_data_size` is 0).
                Ok(ConnectionState::ReadEarlyData(mut records)) => {
                    while records.next_record().is_some() {}
                    None
                }
                Ok(other) => {
                    return Err(io::Error::other(format!("unexpected TLS state {other:?}")));
                }
            };
            used += discard + extra;
            if let Some(next) = next {
                return Ok((next, used));
            }
        }
    }

    /// After an error, queues the alert rustls prepared and tries to send
    /// it without waiting. One call only: the alert is popped before any
    /// input is looked at, and a second call would process the input that
    /// failed once more. (Should the failing message have queued records
    /// of its own first, those go instead of the alert: best effort.)
    fn queue_alert(&mut self, input: &mut [u8]) {
        if let Ok(ConnectionState::EncodeTlsData(mut data)) =
            self.conn.process_tls_records(input).state
        {
            encode(&mut data, &mut self.outgoing);
        }
        if let Some(rest) = self.outgoing.get(self.sent..) {
            if let Ok(n) = self.tcp.try_write(rest) {
                self.sent += n;
            }
        }
    }

    /// Reads what the socket has and processes it. Bytes of an incomplete
    /// record are read onto the end of their own buffer; otherwise the
    /// thread's buffer is used, and only what is left incomplete is kept.
    fn poll_receive(
        &mut self,
        cx: &mut Context<'_>,
        dest: Option<&mut ReadBuf<'_>>,
    ) -> Poll<io::Result<Next>> {
        if self.failed {
            return Poll::Ready(Err(failed_before()));
        }
        let kept = !self.partial.is_empty();
        let mut buf = if kept {
            std::mem::take(&mut self.partial)
        } else {
            SCRATCH.with(Cell::take)
        };
        if buf.capacity() - buf.len() < READ_CHUNK {
            buf.reserve(READ_CHUNK);
        }
        let read = loop {
            match self.tcp.poll_read_ready(cx) {
                Poll::Pending => break Poll::Pending,
                Poll::Ready(Err(e)) => break Poll::Ready(Err(e)),
                Poll::Ready(Ok(())) => {}
            }
            match self.tcp.try_read_buf(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                r => break Poll::Ready(r),
            }
        };
        let outcome = match read {
            Poll::Pending => Poll::Pending,
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Ready(Ok(0)) => {
                // Closed without close_notify: the end of what it sent.
                self.eof = true;
                Poll::Ready(Ok((Next::Closed, buf.len())))
            }
            Poll::Ready(Ok(_)) => Poll::Ready(self.process(&mut buf, dest, Want::Nothing)),
        };
        // What of `buf` is done with: nothing while waiting, all of it
        // after an error.
        let used = match &outcome {
            Poll::Pending => 0,
            Poll::Ready(Ok((_, used))) => (*used).min(buf.len()),
            Poll::Ready(Err(_)) => buf.len(),
        };
        let rest = buf.len() - used;
        if kept {
            if rest > 0 {
                buf.drain(..used);
                buf.shrink_to_fit();
                self.partial = buf;
            }
        } else {
            if rest > 0 {
                self.partial = buf[used..].to_vec();
            }
            // Decrypted in place: no connection's plaintext stays behind.
            buf.fill(0);
            buf.clear();
            if buf.capacity() <= SCRATCH_KEEP {
                SCRATCH.with(|s| s.set(buf));
            }
        }
        if rest > MAX_PARTIAL {
            self.failed = true;
            self.partial = Vec::new();
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("more than {MAX_PARTIAL} bytes of incomplete TLS records"),
            )));
        }
        outcome.map(|r| r.map(|(next, _)| next))
    }

    /// Writes the queued ciphertext, then lets its buffer go.
    fn poll_send(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.outgoing.len() {
            ready!(self.tcp.poll_write_ready(cx))?;
            match self.tcp.try_write(&self.outgoing[self.sent..]) {
                Ok(0) => return Poll::Ready(Err(io::ErrorKind::WriteZero.into())),
                Ok(n) => self.sent += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
        self.outgoing = Vec::new();
        self.sent = 0;
        Poll::Ready(Ok(()))
    }

    fn poll_handshake(
        &mut self,
        cx: &mut Context<'_>,
        seen: &mut Handshake,
    ) -> Poll<io::Result<()>> {
        loop {
            ready!(self.poll_send(cx))?;
            if !self.conn.is_handshaking() {
                return Poll::Ready(Ok(()));
            }
            let next = ready!(seen.observe(|| self.poll_receive(cx, None)))?;
            if next == Next::Closed {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the client closed the connection during the TLS handshake",
                )));
            }
        }
    }

    /// Processes the kept partial bytes (nothing new is read) with `want`.
    fn act(&mut self, want: Want<'_>) -> io::Result<Next> {
        let mut partial = std::mem::take(&mut self.partial);
        let r = self.process(&mut partial, None, want);
        if let Ok((_, used)) = r {
            partial.drain(..used.min(partial.len()));
            self.partial = partial;
        }
        r.map(|(next, _)| next)
    }
}

/// Appends a handshake or alert record rustls prepared to `out`.
fn encode(data: &mut EncodeTlsData<'_, ServerConnectionData>, out: &mut Vec<u8>) {
    append(out, 512, |b| match data.encode(b) {
        Ok(n) => Ok(n),
        Err(EncodeError::InsufficientSize(e)) => Err(e),
        // Encoded already: nothing more to add.
        Err(EncodeError::AlreadyEncoded) => Ok(0),
    });
}

/// Encrypts `data` into `out` as application-data records.
fn encrypt(
    w: &mut WriteTraffic<'_, ServerConnectionData>,
    out: &mut Vec<u8>,
    data: &[u8],
) -> io::Result<()> {
    let mut exhausted = false;
    append(out, sealed_size(data.len()), |b| match w.encrypt(data, b) {
        Ok(n) => Ok(n),
        Err(EncryptError::InsufficientSize(e)) => Err(e),
        Err(EncryptError::EncryptExhausted) => {
            exhausted = true;
            Ok(0)
        }
    });
    if exhausted {
        return Err(io::Error::other("TLS keys exhausted"));
    }
    Ok(())
}

impl AsyncRead for TlsIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.taken < this.plain.len() {
                let n = buf.remaining().min(this.plain.len() - this.taken);
                buf.put_slice(&this.plain[this.taken..this.taken + n]);
                this.taken += n;
                if this.taken == this.plain.len() {
                    this.plain = Vec::new();
                    this.taken = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.eof || buf.remaining() == 0 {
                return Poll::Ready(Ok(()));
            }
            // What rustls queues while reading (a warning alert refusing a
            // renegotiation) goes out with the next write; a key update's
            // reply goes ahead of the next record rustls encrypts.
            let before = buf.filled().len();
            ready!(this.poll_receive(cx, Some(&mut *buf)))?;
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
        }
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.outgoing.len() - this.sent >= WRITE_HIGH {
            ready!(this.poll_send(cx))?;
        }
        // At most WRITE_HIGH at a time: `outgoing` stays under twice that.
        let data = &data[..data.len().min(WRITE_HIGH)];
        match this.act(Want::Encrypt(data))? {
            Next::Traffic => Poll::Ready(Ok(data.len())),
            Next::Handshake | Next::Closed => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.get_mut().poll_send(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_queued && !this.failed {
            this.close_queued = true;
            // Should that fail, the TCP side is closed all the same.
            let _ = this.act(Want::CloseNotify);
        }
        ready!(this.poll_send(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, VHost};
    use crate::tls::Tls;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    type Client = tokio_rustls::client::TlsStream<TcpStream>;

    fn load(dir: &std::path::Path) -> Tls {
        load_hosts(dir, &["example.org"])
    }

    fn load_hosts(dir: &std::path::Path, hosts: &[&str]) -> Tls {
        let config = Config {
            data_dir: dir.to_owned(),
            vhosts: hosts
                .iter()
                .map(|h| VHost {
                    name: (*h).into(),
                    tls_cert: None,
                    tls_key: None,
                })
                .collect(),
            ..Config::default()
        };
        Tls::load(&config).expect("TLS loads")
    }

    fn end_point_of(dir: &std::path::Path, host: &str) -> Vec<u8> {
        let pem = std::fs::read(dir.join(format!("certs/{host}.crt"))).unwrap();
        let der = rustls_pki_types::CertificateDer::from_pem_slice(&pem).unwrap();
        crate::tls::end_point_hash(der.as_ref())
    }

    /// A client trusting the host's self-signed certificate, offering only
    /// `suites` (all of the provider's when empty).
    fn connector(
        dir: &std::path::Path,
        suites: &[rustls::SupportedCipherSuite],
    ) -> tokio_rustls::TlsConnector {
        connector_for(dir, &["example.org"], suites)
    }

    fn connector_for(
        dir: &std::path::Path,
        hosts: &[&str],
        suites: &[rustls::SupportedCipherSuite],
    ) -> tokio_rustls::TlsConnector {
        let mut provider = rustls::crypto::ring::default_provider();
        if !suites.is_empty() {
            provider.cipher_suites = suites.to_vec();
        }
        let mut roots = rustls::RootCertStore::empty();
        for host in hosts {
            let pem = dir.join(format!("certs/{host}.crt"));
            for c in rustls_pki_types::CertificateDer::pem_file_iter(&pem).unwrap() {
                roots.add(c.unwrap()).unwrap();
            }
        }
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        tokio_rustls::TlsConnector::from(Arc::new(config))
    }

    use rustls_pki_types::pem::PemObject;

    /// A server-side connection and the client's, with what the server's
    /// handshake showed.
    async fn pair(
        tls: &Tls,
        connector: &tokio_rustls::TlsConnector,
    ) -> (TlsIo, xmpp::sasl::ChannelBindings, Client) {
        pair_for(tls, connector, "example.org").await
    }

    async fn pair_for(
        tls: &Tls,
        connector: &tokio_rustls::TlsConnector,
        host: &str,
    ) -> (TlsIo, xmpp::sasl::ChannelBindings, Client) {
        let (addr, server) = serve_one(tls).await;
        let client = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            let name = rustls_pki_types::ServerName::try_from(host.to_owned()).unwrap();
            connector.connect(name, tcp).await.unwrap()
        };
        let ((io, seen), client) = tokio::join!(server, client);
        let io = io.unwrap();
        let cb = tls.bindings(io.common(), seen);
        (io, cb, client)
    }

    /// A listener on a free loopback port, and the accepting of one TLS
    /// connection there with what its handshake showed.
    async fn serve_one(
        tls: &Tls,
    ) -> (
        std::net::SocketAddr,
        impl std::future::Future<Output = (io::Result<TlsIo>, Handshake)>,
    ) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let config = tls.c2s.clone();
        let server = async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut seen = Handshake::default();
            let io = accept(tcp, config, &mut seen).await;
            (io, seen)
        };
        (addr, server)
    }

    fn holds_no_buffers(io: &TlsIo) -> bool {
        io.partial.capacity() == 0 && io.outgoing.capacity() == 0 && io.plain.capacity() == 0
    }

    /// Reads exactly `n` bytes through `TlsIo` with a small reader buffer,
    /// so records that do not fit wait in the connection.
    async fn read_n(io: &mut TlsIo, n: usize) -> Vec<u8> {
        let mut got = Vec::new();
        let mut buf = [0u8; 1000];
        while got.len() < n {
            let k = io.read(&mut buf).await.unwrap();
            assert!(k > 0, "end of stream after {} of {n} bytes", got.len());
            got.extend_from_slice(&buf[..k]);
        }
        got
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    #[tokio::test]
    async fn data_flows_both_ways_and_an_idle_connection_holds_no_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let tls = load(dir.path());
        let (mut io, _, mut client) = pair(&tls, &connector(dir.path(), &[])).await;
        assert!(holds_no_buffers(&io));
        // Several records in one read, some larger than the reader's buffer.
        let up = pattern(70_000, 1);
        client.write_all(&up[..10]).await.unwrap();
        client.write_all(&up[10..]).await.unwrap();
        client.flush().await.unwrap();
        assert_eq!(read_n(&mut io, up.len()).await, up);
        // More than the write high-water mark, in uneven writes.
        let down = pattern(200_000, 7);
        let writer = async {
            // One write of more than the high-water mark, then uneven ones.
            io.write_all(&down[..150_000]).await.unwrap();
            for chunk in down[150_000..].chunks(7_000) {
                io.write_all(chunk).await.unwrap();
            }
            io.flush().await.unwrap();
            io
        };
        let reader = async {
            let mut got = vec![0u8; down.len()];
            client.read_exact(&mut got).await.unwrap();
            (client, got)
        };
        let (io2, (c, got)) = tokio::join!(writer, reader);
        let (mut io, mut client) = (io2, c);
        assert_eq!(got, down);
        assert!(holds_no_buffers(&io), "idle after traffic");
        // A clean close from our side: the client sees close_notify.
        io.shutdown().await.unwrap();
        let mut rest = Vec::new();
        assert_eq!(client.read_to_end(&mut rest).await.unwrap(), 0);
        // And from the client's: the server reads the end of the stream.
        client.shutdown().await.unwrap();
        let mut buf = [0u8; 16];
        assert_eq!(io.read(&mut buf).await.unwrap(), 0);
    }

    #[tokio::test]
    async fn the_exporter_and_end_point_match_the_clients_for_every_tls13_suite() {
        let dir = tempfile::tempdir().unwrap();
        let tls = load(dir.path());
        let end_point = end_point_of(dir.path(), "example.org");
        let tls13 = rustls::crypto::ring::default_provider()
            .cipher_suites
            .into_iter()
            .filter(|s| matches!(s, rustls::SupportedCipherSuite::Tls13(_)));
        let mut tried = 0;
        for suite in tls13 {
            let (_io, cb, client) = pair(&tls, &connector(dir.path(), &[suite])).await;
            let conn = client.get_ref().1;
            assert_eq!(conn.negotiated_cipher_suite(), Some(suite));
            let expected = conn
                .export_keying_material([0u8; 32], b"EXPORTER-Channel-Binding", Some(b""))
                .unwrap();
            assert_eq!(cb.tls_exporter.as_deref(), Some(&expected[..]), "{suite:?}");
            assert_eq!(cb.tls_server_end_point.as_deref(), Some(&end_point[..]));
            tried += 1;
        }
        assert_eq!(tried, 3, "the ring provider's TLS 1.3 suites");
        // TLS 1.2 has no tls-exporter (RFC 9266), only the end point.
        let tls12 = rustls::crypto::ring::default_provider()
            .cipher_suites
            .into_iter()
            .find(|s| matches!(s, rustls::SupportedCipherSuite::Tls12(_)))
            .unwrap();
        let (_io, cb, client) = pair(&tls, &connector(dir.path(), &[tls12])).await;
        assert_eq!(
            client.get_ref().1.protocol_version(),
            Some(rustls::ProtocolVersion::TLSv1_2)
        );
        assert_eq!(cb.tls_exporter, None);
        assert_eq!(cb.tls_server_end_point.as_deref(), Some(&end_point[..]));
    }

    #[tokio::test]
    async fn the_end_point_is_the_certificate_sni_chose() {
        let dir = tempfile::tempdir().unwrap();
        let hosts = ["example.org", "chat.example.net"];
        let tls = load_hosts(dir.path(), &hosts);
        let connector = connector_for(dir.path(), &hosts, &[]);
        for host in hosts {
            let (_io, cb, _client) = pair_for(&tls, &connector, host).await;
            let expected = end_point_of(dir.path(), host);
            assert_eq!(
                cb.tls_server_end_point.as_deref(),
                Some(&expected[..]),
                "{host}"
            );
        }
        assert_ne!(
            end_point_of(dir.path(), hosts[0]),
            end_point_of(dir.path(), hosts[1])
        );
    }

    #[tokio::test]
    async fn a_key_update_is_answered_and_traffic_goes_on() {
        let dir = tempfile::tempdir().unwrap();
        let tls = load(dir.path());
        let (mut io, _, mut client) = pair(&tls, &connector(dir.path(), &[])).await;
        for round in 0..3u8 {
            client.get_mut().1.refresh_traffic_keys().unwrap();
            client.write_all(&[round; 100]).await.unwrap();
            client.flush().await.unwrap();
            assert_eq!(read_n(&mut io, 100).await, [round; 100]);
            io.write_all(&[round + 100; 50]).await.unwrap();
            io.flush().await.unwrap();
            let mut got = [0u8; 50];
            client.read_exact(&mut got).await.unwrap();
            assert_eq!(got, [round + 100; 50]);
        }
        assert!(holds_no_buffers(&io));
    }

    #[tokio::test]
    async fn a_handshake_message_dribbled_a_byte_a_record_is_cut_off() {
        let dir = tempfile::tempdir().unwrap();
        let tls = load(dir.path());
        let (addr, server) = serve_one(&tls).await;
        let client = async {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            // A ClientHello claiming 65,535 bytes, sent one byte per
            // handshake record: rustls keeps every record until the message
            // is whole, so the kept bytes are what must be bounded.
            let mut bytes = Vec::new();
            for b in [1u8, 0x00, 0xff, 0xff]
                .into_iter()
                .chain(std::iter::repeat_n(0, 20_000))
            {
                bytes.extend_from_slice(&[22, 3, 1, 0, 1, b]);
            }
            for chunk in bytes.chunks(4096) {
                if tcp.write_all(chunk).await.is_err() {
                    break;
                }
            }
        };
        let ((r, _), ()) = tokio::join!(server, client);
        let err = r.err().expect("the handshake fails");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        assert!(err.to_string().contains("incomplete TLS records"), "{err}");
    }

    #[tokio::test]
    async fn plaintext_on_the_tls_port_fails_the_handshake_with_an_alert() {
        let dir = tempfile::tempdir().unwrap();
        let tls = load(dir.path());
        let (addr, server) = serve_one(&tls).await;
        let client = async {
            let mut tcp = TcpStream::connect(addr).await.unwrap();
            tcp.write_all(b"<?xml version='1.0'?><stream:stream to='example.org'>")
                .await
                .unwrap();
            let mut got = Vec::new();
            let _ = tcp.read_to_end(&mut got).await;
            got
        };
        let ((r, _), got) = tokio::join!(server, client);
        let err = r.err().expect("the handshake fails");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData, "{err}");
        // A TLS alert record (content type 21) came back before the close.
        assert_eq!(got.first(), Some(&21), "{got:?}");
    }
}
