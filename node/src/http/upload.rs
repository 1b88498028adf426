//! HTTP File Upload (XEP-0363), the HTTP half: `PUT` and `GET`/`HEAD` on
//! `/upload/<slot>/<name>`, on every node's HTTP listeners (the slots come
//! from `modules::upload`).
//!
//! A PUT streams the body into a temporary file in `[upload] dir`, checks
//! that exactly the declared bytes came, commits `UploadStored` naming
//! this node, and only then moves the file into place: of two PUTs racing
//! for one slot (on two nodes sharing a directory, say) the one the log
//! refuses never touches the stored file. A GET is served from this
//! node's disk when the file is there (it was PUT here, or the directory
//! is shared), else fetched from the node that stored it over the
//! inter-node gRPC and streamed on, so a client may use any node.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt as _;
use rand::Rng as _;
use tokio::io::AsyncWriteExt as _;

use super::Http;
use crate::cluster::state_machine::{ApplyError, Command, Refusal};
use crate::modules::upload::{file_path, now_secs, read_chunks, DEFAULT_CONTENT_TYPE};
use crate::store::UploadRecord;
use crate::Server;

/// Slots with a PUT in progress on this node: a second PUT to one of
/// them is refused at once rather than raced.
#[derive(Default)]
pub struct InFlight(Mutex<HashSet<String>>);

/// A slot taken in [`InFlight`], and the partial file while there is one;
/// dropping it (however the PUT ends) releases both.
struct Claim<'a> {
    set: &'a InFlight,
    slot: String,
    temp: Option<PathBuf>,
}

impl InFlight {
    fn claim(&self, slot: &str) -> Option<Claim<'_>> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(slot.to_owned()).then(|| Claim {
            set: self,
            slot: slot.to_owned(),
            temp: None,
        })
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if let Some(t) = self.temp.take() {
            let _ = std::fs::remove_file(t);
        }
        self.set
            .0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.slot);
    }
}

fn plain(status: StatusCode, text: &str) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        format!("{text}\n"),
    )
        .into_response()
}

/// CORS for web clients (their pages PUT the file and fetch it, e.g. to
/// decrypt it), from the origins `http.allowed_origins` lets in.
fn with_cors(http: &Http, headers: &HeaderMap, mut r: Response) -> Response {
    let Some(origin) = headers.get(header::ORIGIN) else {
        return r;
    };
    if !origin
        .to_str()
        .is_ok_and(|o| http.server.config.http.origin_allowed(o))
    {
        return r;
    }
    let h = r.headers_mut();
    h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, HEAD, PUT, OPTIONS"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("Content-Type"),
    );
    h.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Content-Length, Content-Type, Content-Disposition"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    r
}

pub async fn preflight(State(http): State<Arc<Http>>, headers: HeaderMap) -> Response {
    with_cors(&http, &headers, StatusCode::NO_CONTENT.into_response())
}

/// The slot's record, if `name` is its file name. A slot just handed out,
/// or a file just stored, through another node may not have reached this
/// one yet: when the record is missing (or, with `stored`, says the file
/// is not there yet), this node first catches up with the leader.
async fn record(
    server: &Server,
    slot: &str,
    name: &str,
    stored: bool,
) -> Result<Option<UploadRecord>, Response> {
    let failed = |e: crate::store::StoreError| {
        tracing::warn!(%slot, error = %e, "cannot read an upload record");
        plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot read the upload")
    };
    let mut r = server.store().upload(slot).map_err(failed)?;
    if r.as_ref().is_none_or(|r| stored && r.stored_on.is_none()) {
        server.cluster.read_barrier().await;
        r = server.store().upload(slot).map_err(failed)?;
    }
    Ok(r.filter(|r| r.filename == name))
}

fn same_type(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

pub async fn put(
    State(http): State<Arc<Http>>,
    Path((slot, name)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let r = store_put(&http, &slot, &name, &headers, body).await;
    with_cors(&http, &headers, r)
}

async fn store_put(
    http: &Http,
    slot: &str,
    name: &str,
    headers: &HeaderMap,
    body: Body,
) -> Response {
    let server = &http.server;
    let config = &server.config.upload;
    let dir = config.dir(&server.config.data_dir);
    let Some(path) = file_path(&dir, slot) else {
        return plain(StatusCode::NOT_FOUND, "no such upload slot");
    };
    let rec = match record(server, slot, name, false).await {
        Ok(Some(r)) => r,
        Ok(None) => return plain(StatusCode::NOT_FOUND, "no such upload slot"),
        Err(r) => return r,
    };
    if rec.stored_on.is_some() {
        return plain(StatusCode::CONFLICT, "this slot has been used already");
    }
    let now = now_secs();
    if now >= rec.put_by {
        return plain(StatusCode::GONE, "this slot has lapsed; ask for a new one");
    }
    // XEP-0363 §4: exactly the size and type the slot was asked for.
    let length = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    match length {
        None => {
            return plain(
                StatusCode::LENGTH_REQUIRED,
                "Content-Length is required and must be the size given in the slot request",
            )
        }
        Some(n) if n != rec.size => {
            return plain(
                if n > rec.size {
                    StatusCode::PAYLOAD_TOO_LARGE
                } else {
                    StatusCode::BAD_REQUEST
                },
                &format!(
                    "Content-Length is {n}; the slot was asked for {} bytes",
                    rec.size
                ),
            )
        }
        Some(_) => {}
    }
    let sent_type = headers
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().unwrap_or("\u{0}"));
    let type_ok = match sent_type {
        Some(t) => same_type(t, &rec.content_type),
        None => rec.content_type == DEFAULT_CONTENT_TYPE,
    };
    if !type_ok {
        return plain(
            StatusCode::BAD_REQUEST,
            &format!(
                "Content-Type must be {:?}, as given in the slot request",
                rec.content_type
            ),
        );
    }
    let Some(mut claim) = http.uploads.claim(slot) else {
        return plain(StatusCode::CONFLICT, "this slot is being uploaded already");
    };
    if let Err(e) = tokio::fs::create_dir_all(&dir).await {
        tracing::error!(dir = %dir.display(), error = %e, "cannot create the upload directory");
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot store files now");
    }
    let temp = dir.join(format!(
        ".{slot}.{}.{:016x}.part",
        server.cluster.id,
        rand::thread_rng().gen::<u64>()
    ));
    let file = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temp)
        .await;
    let mut file = match file {
        Ok(f) => f,
        Err(e) => return io_failure(slot, &e),
    };
    claim.temp = Some(temp.clone());
    // A PUT may take `transfer_secs` in all, and not beyond the slot's
    // end (after which the sweep may remove it); a client that sends
    // nothing for as long as a stream may take to negotiate is gone.
    let left = rec.expires.saturating_sub(now).min(config.transfer_secs);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(left);
    let idle = server.config.limits.negotiation_timeout();
    let mut stream = body.into_data_stream();
    let mut got: u64 = 0;
    loop {
        let next = tokio::time::timeout_at(deadline, tokio::time::timeout(idle, stream.next()));
        let chunk = match next.await {
            Ok(Ok(Some(Ok(c)))) => c,
            Ok(Ok(None)) => break,
            Ok(Ok(Some(Err(e)))) => {
                tracing::debug!(%slot, error = %e, "upload body ended early");
                return plain(StatusCode::BAD_REQUEST, "the upload was cut off");
            }
            Ok(Err(_)) => return plain(StatusCode::REQUEST_TIMEOUT, "the upload stalled"),
            Err(_) => {
                return plain(
                    StatusCode::REQUEST_TIMEOUT,
                    "the upload took longer than the server allows",
                )
            }
        };
        got += chunk.len() as u64;
        if got > rec.size {
            return plain(
                StatusCode::PAYLOAD_TOO_LARGE,
                "more bytes than the slot was asked for",
            );
        }
        if let Err(e) = file.write_all(&chunk).await {
            return io_failure(slot, &e);
        }
    }
    if got != rec.size {
        return plain(
            StatusCode::BAD_REQUEST,
            &format!("{got} bytes came; the slot was asked for {}", rec.size),
        );
    }
    if let Err(e) = file.sync_all().await {
        return io_failure(slot, &e);
    }
    drop(file);
    let expires = match config.expire_days {
        0 => u64::MAX,
        d => now_secs().saturating_add(d.saturating_mul(86_400)),
    };
    let cmd = Command::UploadStored {
        slot: slot.to_owned(),
        node: server.cluster.id,
        expires,
    };
    match server.cluster.write(cmd).await {
        Ok(_) => {}
        Err(ApplyError::Refused(Refusal::UploadSlotUsed(_))) => {
            return plain(StatusCode::CONFLICT, "this slot has been used already")
        }
        Err(ApplyError::Refused(Refusal::NoUploadSlot(_))) => {
            return plain(
                StatusCode::GONE,
                "this slot lapsed during the upload; ask for a new one",
            )
        }
        Err(e) => {
            tracing::warn!(%slot, error = %e, "upload not recorded");
            let mut r = plain(
                StatusCode::SERVICE_UNAVAILABLE,
                "cannot record the upload now; try again",
            );
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            return r;
        }
    }
    if let Err(e) = tokio::fs::rename(&temp, &path).await {
        // Recorded as stored here, but not in place: the link is dead
        // until the record expires.
        tracing::error!(%slot, error = %e, "cannot move a received upload into place");
        return plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot store the file");
    }
    claim.temp = None;
    tracing::info!(%slot, owner = %rec.owner, size = rec.size, "upload stored");
    plain(StatusCode::CREATED, "stored")
}

fn io_failure(slot: &str, e: &std::io::Error) -> Response {
    tracing::error!(%slot, error = %e, "cannot write an upload");
    if e.raw_os_error() == Some(28) {
        // ENOSPC
        return plain(
            StatusCode::INSUFFICIENT_STORAGE,
            "the server's disk is full",
        );
    }
    plain(StatusCode::INTERNAL_SERVER_ERROR, "cannot store the file")
}

/// `inline` for what browsers show without running it, else `attachment`;
/// the name as ASCII and, exactly, as UTF-8 (RFC 6266, RFC 8187).
fn disposition(filename: &str, content_type: &str) -> String {
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    let inline = (essence.starts_with("image/") && essence != "image/svg+xml")
        || essence.starts_with("audio/")
        || essence.starts_with("video/")
        || essence == "text/plain";
    let ascii: String = filename
        .chars()
        .map(|c| {
            if (c.is_ascii_graphic() || c == ' ') && c != '"' && c != '\\' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let exact = percent_encoding::utf8_percent_encode(filename, percent_encoding::NON_ALPHANUMERIC);
    format!(
        "{}; filename=\"{ascii}\"; filename*=UTF-8''{exact}",
        if inline { "inline" } else { "attachment" }
    )
}

pub async fn get(
    State(http): State<Arc<Http>>,
    Path((slot, name)): Path<(String, String)>,
    method: Method,
    headers: HeaderMap,
) -> Response {
    let r = serve_get(&http, &slot, &name, method == Method::HEAD).await;
    with_cors(&http, &headers, r)
}

async fn serve_get(http: &Http, slot: &str, name: &str, head: bool) -> Response {
    let server = &http.server;
    let dir = server.config.upload.dir(&server.config.data_dir);
    let Some(path) = file_path(&dir, slot) else {
        return plain(StatusCode::NOT_FOUND, "no such file");
    };
    let rec = match record(server, slot, name, true).await {
        Ok(Some(r)) => r,
        Ok(None) => return plain(StatusCode::NOT_FOUND, "no such file"),
        Err(r) => return r,
    };
    let Some(node) = rec.stored_on.filter(|_| rec.expires > now_secs()) else {
        return plain(StatusCode::NOT_FOUND, "no such file");
    };
    let content_type = HeaderValue::from_str(&rec.content_type)
        .unwrap_or_else(|_| HeaderValue::from_static(DEFAULT_CONTENT_TYPE));
    let disposition = HeaderValue::from_str(&disposition(&rec.filename, &rec.content_type))
        .unwrap_or_else(|_| HeaderValue::from_static("attachment"));
    let body = if head {
        Body::empty()
    } else {
        match local_or_remote(server, slot, &path, node, rec.size).await {
            Ok(b) => b,
            Err(r) => return r,
        }
    };
    let mut r = Response::new(body);
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, content_type);
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(rec.size));
    h.insert(header::CONTENT_DISPOSITION, disposition);
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Whatever the file says, it runs nothing in our origin.
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; sandbox"),
    );
    // A slot's file never changes.
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("private, max-age=86400, immutable"),
    );
    r
}

/// The file's bytes from this node's disk, or from `node`'s over gRPC.
async fn local_or_remote(
    server: &Server,
    slot: &str,
    path: &std::path::Path,
    node: u64,
    size: u64,
) -> Result<Body, Response> {
    match tokio::fs::File::open(path).await {
        Ok(f) => match f.metadata().await {
            Ok(m) if m.len() == size => return Ok(Body::from_stream(read_chunks(f))),
            Ok(m) => {
                tracing::warn!(%slot, have = m.len(), want = size, "local upload has the wrong size")
            }
            Err(e) => tracing::warn!(%slot, error = %e, "cannot read a local upload"),
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(%slot, error = %e, "cannot open a local upload"),
    }
    if node == server.cluster.id {
        tracing::warn!(%slot, "an upload recorded as stored here is missing from disk");
        return Err(plain(StatusCode::NOT_FOUND, "no such file"));
    }
    let unreachable = || {
        let mut r = plain(
            StatusCode::BAD_GATEWAY,
            "the node that holds this file cannot be reached; try again later",
        );
        r.headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("30"));
        r
    };
    let Some(addr) = server.cluster.addr_of(node) else {
        tracing::warn!(%slot, node, "an upload is on a node that is no longer a member");
        return Err(plain(StatusCode::NOT_FOUND, "no such file"));
    };
    let mut client = server.cluster.channels.get(&addr).map_err(|e| {
        tracing::warn!(%slot, node, error = %e, "cannot reach the node holding an upload");
        unreachable()
    })?;
    let req = proto::ReadUploadRequest {
        slot: slot.to_owned(),
        size,
    };
    match client.read_upload(req).await {
        Ok(stream) => {
            tracing::debug!(%slot, node, "serving an upload from its node");
            let chunks = stream.into_inner().map(|c| {
                c.map(|c| c.data)
                    .map_err(|s| std::io::Error::other(s.message().to_owned()))
            });
            Ok(Body::from_stream(chunks))
        }
        Err(s) if s.code() == tonic::Code::NotFound => {
            tracing::warn!(%slot, node, message = s.message(), "the node holding an upload does not have it");
            Err(plain(StatusCode::NOT_FOUND, "no such file"))
        }
        Err(s) => {
            tracing::warn!(%slot, node, error = %s, "cannot fetch an upload from its node");
            Err(unreachable())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_harmless_types_are_shown_inline() {
        assert!(disposition("a.png", "image/png").starts_with("inline;"));
        assert!(disposition("a.svg", "image/svg+xml").starts_with("attachment;"));
        assert!(disposition("a.html", "text/html").starts_with("attachment;"));
        assert_eq!(
            disposition("\"ü\".txt", "text/plain"),
            "inline; filename=\"___.txt\"; filename*=UTF-8''%22%C3%BC%22%2Etxt"
        );
    }

    #[test]
    fn a_slot_is_claimed_once_at_a_time() {
        let set = InFlight::default();
        let first = set.claim("s").expect("free");
        assert!(set.claim("s").is_none());
        drop(first);
        assert!(set.claim("s").is_some());
    }
}
