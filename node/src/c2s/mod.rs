//! Client-to-server listeners: TCP with STARTTLS (5222) and direct TLS
//! (5223, XEP-0368). Each accepted connection is one task that negotiates
//! the stream ([`negotiate`]) and then runs the session ([`session`]).
//! The HTTP transports (`crate::http`) enter the same core through
//! [`serve`] with a transport of their own ([`Io`]).

pub mod admission;
pub mod framing;
pub(crate) mod io;
pub mod moved;
mod negotiate;
mod sasl2;
pub mod session;
pub mod sm;
pub(crate) mod stream;
pub mod throttle;
pub mod tls_io;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use xmpp::error::StreamError;

use io::Io;
use negotiate::Negotiated;
use stream::{ConnError, Stream};

use crate::Server;

pub async fn listen(server: Arc<Server>, listener: TcpListener, direct_tls: bool) {
    let mut shutdown = server.shutdown.subscribe();
    let errors = crate::fds::AcceptErrors::new(if direct_tls { "c2s_tls" } else { "c2s" });
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    tokio::spawn(connection(server.clone(), tcp, peer, direct_tls));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off, don't spin.
                    errors.failed(&e);
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

/// One accepted connection's task: admission and TLS, negotiation, then
/// the session. The first two are a boxed future dropped once the session
/// starts (see [`serve`]).
fn connection(
    server: Arc<Server>,
    tcp: TcpStream,
    peer: SocketAddr,
    direct_tls: bool,
) -> impl std::future::Future<Output = ()> + Send {
    let opening: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
        Box::pin(open(server, tcp, peer, direct_tls));
    async move {
        if let Some(session) = opening.await {
            session.await
        }
    }
}

/// Admission, TLS on the direct-TLS port, and negotiation.
async fn open(
    server: Arc<Server>,
    tcp: TcpStream,
    peer: SocketAddr,
    direct_tls: bool,
) -> Option<SessionFuture> {
    let _ = tcp.set_nodelay(true);
    let keepalive = server.config.limits.tcp_keepalive_secs;
    if keepalive > 0 {
        let ka = socket2::TcpKeepalive::new()
            .with_time(std::time::Duration::from_secs(keepalive))
            .with_interval(std::time::Duration::from_secs(keepalive.div_ceil(4).max(1)))
            .with_retries(4);
        let _ = socket2::SockRef::from(&tcp).set_tcp_keepalive(&ka);
    }
    // Held until a resource is bound (or the connection ends).
    let admitted = match server.admission.admit(peer.ip()) {
        Ok(a) => a,
        Err((error, text)) => {
            tracing::info!(%peer, %error, "connection refused: {text}");
            // On the TLS port, no handshake is spent on it.
            if !direct_tls {
                let mut s = Stream::new(server.clone(), Io::Plain(tcp), peer);
                Box::pin(s.close_with_error(error, Some(&text))).await;
            }
            return None;
        }
    };
    let timeout = server.config.limits.negotiation_timeout();
    let mut cb = xmpp::sasl::ChannelBindings::default();
    let io = if direct_tls {
        let mut seen = crate::tls::Handshake::default();
        let accept = tls_io::accept(tcp, server.tls.c2s.clone(), &mut seen);
        match tokio::time::timeout(timeout, Box::pin(accept)).await {
            Ok(Ok(tls)) => {
                cb = server.tls.bindings(tls.common(), seen);
                Io::Tls(Box::new(tls))
            }
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "TLS handshake failed");
                return None;
            }
            Err(_) => return None,
        }
    } else {
        Io::Plain(tcp)
    };
    negotiation(server, io, peer, cb, admitted).await
}

/// A session's future, boxed: what a connection's task runs once the
/// stream is negotiated.
type SessionFuture = std::pin::Pin<Box<dyn std::future::Future<Output = ()> + Send>>;

/// The session core over any transport: negotiation within
/// `limits.negotiation_timeout_secs`, then the session (or a resumption
/// handed to the session waiting for it, whatever its old transport).
///
/// Negotiation is one boxed future and the session another, made in plain
/// fns: an async fn is as large as its largest state, and rustc keeps room
/// for a future made inside one even when it is boxed at once. This task
/// lives as long as the connection; built this way it holds only the
/// future it is in (STYLE.md habit 9; measured per held connection by
/// `xmpp-load hold`).
pub(crate) fn serve(
    server: Arc<Server>,
    io: Io,
    peer: SocketAddr,
    cb: xmpp::sasl::ChannelBindings,
    admitted: admission::Unbound,
) -> impl std::future::Future<Output = ()> + Send {
    let negotiation: std::pin::Pin<Box<dyn std::future::Future<Output = _> + Send>> =
        Box::pin(negotiation(server, io, peer, cb, admitted));
    async move {
        if let Some(session) = negotiation.await {
            session.await
        }
    }
}

/// Negotiates the stream; gives back the session to run, if one was bound.
async fn negotiation(
    server: Arc<Server>,
    io: Io,
    peer: SocketAddr,
    cb: xmpp::sasl::ChannelBindings,
    admitted: admission::Unbound,
) -> Option<SessionFuture> {
    let timeout = server.config.limits.negotiation_timeout();
    let mut s = Box::new(Stream::new(server.clone(), io, peer));
    s.cb = cb;
    let negotiated =
        match tokio::time::timeout(timeout, Box::pin(negotiate::negotiate(&mut s))).await {
            Ok(r) => r,
            Err(_) => Err(ConnError::stream(
                StreamError::ConnectionTimeout,
                "no resource bound in time",
            )),
        };
    drop(admitted);
    match negotiated {
        Ok(Negotiated::Bound(bound)) => Some(Box::pin(session::run(s, bound))),
        Ok(Negotiated::Resume { tx, h, sasl2 }) => {
            // The waiting session takes the stream over (XEP-0198 §5).
            let inline = sasl2.is_some();
            if let Err(mpsc::error::SendError(handoff)) = tx
                .send(Box::new(sm::Handoff::Resume {
                    stream: s,
                    h,
                    sasl2,
                }))
                .await
            {
                let sm::Handoff::Resume { stream: mut s, .. } = *handoff else {
                    return None;
                };
                // Gone between the lookup and now: as unknown as expired.
                let failed = if inline {
                    sasl2::failure(
                        xmpp::sasl::SaslFailure::TemporaryAuthFailure,
                        Some("the session to resume has just ended; log in again"),
                    )
                } else {
                    sm::failed("item-not-found")
                };
                let _ = Box::pin(s.send(&failed)).await;
                Box::pin(finish(&mut s, Err(ConnError::Closed))).await;
            }
            None
        }
        Ok(Negotiated::Migrated { state, h, sasl2 }) => {
            Some(Box::pin(session::run_migrated(s, *state, h, sasl2)))
        }
        Err(e) => {
            Box::pin(finish(&mut s, Err(e))).await;
            None
        }
    }
}

/// Ends a stream the way its result asks: a stream error, a clean close,
/// or nothing for a connection that is already gone.
pub(crate) async fn finish(s: &mut Stream, result: Result<(), ConnError>) {
    let peer = s.peer;
    match result {
        Ok(()) | Err(ConnError::Closed) => s.close().await,
        Err(ConnError::Stream(e, text)) => {
            tracing::debug!(%peer, error = %e, text = ?text, "closing stream with error");
            s.close_with_error(e, text.as_deref()).await;
        }
        Err(ConnError::Lost) => tracing::debug!(%peer, "connection lost"),
        Err(ConnError::Io(e)) => tracing::debug!(%peer, error = %e, "connection lost"),
    }
}
