//! The HTTP listeners (`listen.http`, and `listen.https` with the vhosts'
//! certificates chosen by SNI): BOSH at `/http-bind` ([`bosh`]), WebSocket
//! at `/xmpp-websocket` ([`ws`]), XEP-0156 discovery at
//! `/.well-known/host-meta` and `host-meta.json`, file upload (XEP-0363)
//! at `/upload/` ([`upload`]), and for operators `/metrics`, `/healthz`
//! and `/readyz` ([`crate::metrics`]). Both transports are thin adapters
//! over the c2s session core (`c2s::serve`).

pub mod bosh;
pub mod upload;
pub mod ws;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use axum::body::Body;
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, Method, Request, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Extension, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceExt as _;
use xmpp::sasl::ChannelBindings;

use crate::Server;

/// What a handler knows of the connection its request came on.
#[derive(Clone)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// HTTPS, or plain HTTP with `http.consider_secure`.
    pub secure: bool,
    /// The TLS connection's channel bindings (WebSocket only: a BOSH
    /// session spans connections).
    pub cb: ChannelBindings,
}

/// Shared by the handlers.
pub struct Http {
    pub server: Arc<Server>,
    pub bosh: Arc<bosh::Registry>,
    /// Uploads in progress on this node.
    pub uploads: upload::InFlight,
}

/// The listeners, bound before anything starts so a port in use fails
/// the start with a clear message.
pub struct Listeners {
    plain: TcpListener,
    tls: Option<TcpListener>,
}

pub async fn bind(config: &crate::config::Config) -> anyhow::Result<Option<Listeners>> {
    if !config.http.enabled {
        return Ok(None);
    }
    let plain = TcpListener::bind(config.listen.http)
        .await
        .with_context(|| format!("cannot listen on HTTP address {}", config.listen.http))?;
    let tls = match config.listen.https {
        Some(a) => Some(
            TcpListener::bind(a)
                .await
                .with_context(|| format!("cannot listen on HTTPS address {a}"))?,
        ),
        None => None,
    };
    Ok(Some(Listeners { plain, tls }))
}

pub fn start(server: &Arc<Server>, listeners: Option<Listeners>) {
    let Some(l) = listeners else { return };
    let http = Arc::new(Http {
        server: server.clone(),
        bosh: bosh::Registry::new(),
        uploads: upload::InFlight::default(),
    });
    let router = router(http);
    tracing::info!(
        http = %server.config.listen.http,
        https = ?server.config.listen.https,
        "HTTP transports (BOSH, WebSocket) listening"
    );
    tokio::spawn(listen(server.clone(), l.plain, false, router.clone()));
    if let Some(t) = l.tls {
        tokio::spawn(listen(server.clone(), t, true, router));
    }
}

fn router(http: Arc<Http>) -> Router {
    Router::new()
        .route(
            "/http-bind",
            get(bosh::info).post(bosh::request).options(preflight),
        )
        .route(
            "/http-bind/",
            get(bosh::info).post(bosh::request).options(preflight),
        )
        .route("/xmpp-websocket", get(ws::upgrade))
        .route(
            "/upload/{slot}/{name}",
            get(upload::get).put(upload::put).options(upload::preflight),
        )
        .route("/.well-known/host-meta", get(host_meta).options(preflight))
        .route(
            "/.well-known/host-meta.json",
            get(host_meta_json).options(preflight),
        )
        .route("/metrics", get(metrics))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(http)
}

async fn listen(server: Arc<Server>, listener: TcpListener, tls: bool, router: Router) {
    let mut shutdown = server.shutdown.subscribe();
    let errors = crate::fds::AcceptErrors::new(if tls { "https" } else { "http" });
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    tokio::spawn(connection(server.clone(), tcp, peer, tls, router.clone()));
                }
                Err(e) => {
                    errors.failed(&e);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            _ = shutdown.changed() => return,
        }
    }
}

async fn connection(
    server: Arc<Server>,
    tcp: TcpStream,
    peer: SocketAddr,
    tls: bool,
    router: Router,
) {
    let _ = tcp.set_nodelay(true);
    let timeout = server.config.limits.negotiation_timeout();
    let secure = tls || server.config.http.consider_secure;
    if tls {
        // The same TLS as the XMPP client listeners: a held WebSocket or
        // BOSH connection keeps no TLS buffers while idle.
        let mut seen = crate::tls::Handshake::default();
        let accept = crate::c2s::tls_io::accept(tcp, server.tls.c2s.clone(), &mut seen);
        let stream = match tokio::time::timeout(timeout, Box::pin(accept)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "HTTPS handshake failed");
                return;
            }
            Err(_) => return,
        };
        let cb = server.tls.bindings(stream.common(), seen);
        serve_http(
            TokioIo::new(stream),
            ConnInfo { peer, secure, cb },
            router,
            timeout,
        )
        .await;
    } else {
        let info = ConnInfo {
            peer,
            secure,
            cb: ChannelBindings::default(),
        };
        serve_http(TokioIo::new(tcp), info, router, timeout).await;
    }
}

async fn serve_http<I>(io: TokioIo<I>, info: ConnInfo, router: Router, header_timeout: Duration)
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let peer = info.peer;
    let service = hyper::service::service_fn(move |mut req: Request<hyper::body::Incoming>| {
        req.extensions_mut().insert(info.clone());
        router.clone().oneshot(req.map(Body::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(header_timeout)
        .serve_connection(io, service)
        .with_upgrades();
    if let Err(e) = conn.await {
        tracing::debug!(%peer, error = %e, "HTTP connection ended");
    }
}

/// CORS headers for a page from `origin`, if it may use the transports.
pub fn cors(
    config: &crate::config::Http,
    headers: &HeaderMap,
) -> Vec<(header::HeaderName, HeaderValue)> {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Vec::new();
    };
    let allowed = origin.to_str().is_ok_and(|o| config.origin_allowed(o));
    if !allowed {
        return Vec::new();
    }
    vec![
        (header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone()),
        (header::VARY, HeaderValue::from_static("Origin")),
        (
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        ),
        (
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static("Content-Type"),
        ),
        (
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("86400"),
        ),
    ]
}

async fn preflight(State(http): State<Arc<Http>>, headers: HeaderMap) -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    for (k, v) in cors(&http.server.config.http, &headers) {
        r.headers_mut().insert(k, v);
    }
    r
}

/// Prometheus scrapes this (README, "Metrics and health").
async fn metrics(State(http): State<Arc<Http>>) -> Response {
    let body = http.server.metrics.render(&http.server);
    ([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], body).into_response()
}

/// Liveness: the process answers. It never asks the cluster, so a node
/// cut off from its peers is not restarted for it.
async fn healthz() -> Response {
    "ok\n".into_response()
}

/// Readiness: a caught-up voting member of a cluster with a leader;
/// otherwise 503 and why, in one line.
async fn readyz(State(http): State<Arc<Http>>) -> Response {
    match crate::metrics::readiness(&http.server).await {
        Ok(()) => "ready\n".into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
            .into_response(),
    }
}

/// The base URL the discovery links point under: `http.public_url`, or
/// the request's own scheme and `Host` (checked to be a host name).
fn base_url(http: &Http, info: &ConnInfo, headers: &HeaderMap) -> Option<(String, String)> {
    if let Some(u) = &http.server.config.http.public_url {
        let u = u.trim_end_matches('/');
        let ws = if let Some(rest) = u.strip_prefix("https://") {
            format!("wss://{rest}")
        } else if let Some(rest) = u.strip_prefix("http://") {
            format!("ws://{rest}")
        } else {
            return None;
        };
        return Some((u.to_owned(), ws));
    }
    let host = headers.get(header::HOST)?.to_str().ok()?;
    let valid = !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-.:[]".contains(&b));
    if !valid {
        return None;
    }
    let (h, w) = if info.secure {
        ("https", "wss")
    } else {
        ("http", "ws")
    };
    Some((format!("{h}://{host}"), format!("{w}://{host}")))
}

const XBOSH_REL: &str = "urn:xmpp:alt-connections:xbosh";
const WS_REL: &str = "urn:xmpp:alt-connections:websocket";

/// XEP-0156 §3: both endpoints, for whichever host the request names.
async fn host_meta(
    State(http): State<Arc<Http>>,
    Extension(info): Extension<ConnInfo>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let _ = method;
    let Some((base, ws)) = base_url(&http, &info, &headers) else {
        return (StatusCode::BAD_REQUEST, "no valid Host header\n").into_response();
    };
    let mut body = String::from(
        "<?xml version='1.0' encoding='utf-8'?>\n<XRD xmlns='http://docs.oasis-open.org/ns/xri/xrd-1.0'>\n",
    );
    for (rel, href) in [
        (XBOSH_REL, format!("{base}/http-bind")),
        (WS_REL, format!("{ws}/xmpp-websocket")),
    ] {
        body.push_str("  <Link rel='");
        body.push_str(rel);
        body.push_str("' href='");
        xmpp::element::escape_into(&mut body, &href, true);
        body.push_str("'/>\n");
    }
    body.push_str("</XRD>\n");
    discovery_response(&http, &headers, "application/xrd+xml; charset=utf-8", body)
}

async fn host_meta_json(
    State(http): State<Arc<Http>>,
    Extension(info): Extension<ConnInfo>,
    headers: HeaderMap,
) -> Response {
    let Some((base, ws)) = base_url(&http, &info, &headers) else {
        return (StatusCode::BAD_REQUEST, "no valid Host header\n").into_response();
    };
    let body = serde_json::json!({
        "links": [
            { "rel": XBOSH_REL, "href": format!("{base}/http-bind") },
            { "rel": WS_REL, "href": format!("{ws}/xmpp-websocket") },
        ]
    })
    .to_string();
    discovery_response(&http, &headers, "application/json", body)
}

fn discovery_response(
    http: &Http,
    headers: &HeaderMap,
    content_type: &'static str,
    body: String,
) -> Response {
    let mut r = ([(header::CONTENT_TYPE, content_type)], body).into_response();
    // XEP-0156 §3.2: pages of other origins read it (it names no secret).
    if headers.contains_key(header::ORIGIN) {
        r.headers_mut().insert(
            header::ACCESS_CONTROL_ALLOW_ORIGIN,
            HeaderValue::from_static("*"),
        );
    }
    let _ = http;
    r
}
