//! HTTP File Upload (XEP-0363): the `upload.<vhost>` component.
//!
//! A local user asks the component for a slot (file name, size, content
//! type); the slot is a replicated record ([`Command::UploadSlot`], where
//! the per-user quota is decided) with a random id of 192 bits, which is
//! all the authorisation the PUT and GET URLs carry. The client PUTs the
//! file to any node's HTTP listener (`http::upload`); the node that takes
//! it keeps it on its disk and commits [`Command::UploadStored`] naming
//! itself, so every node knows where each file lives and serves a GET
//! from its own disk (a shared `[upload] dir`) or from that node over the
//! inter-node gRPC (`Peer/ReadUpload`).
//!
//! Files and unused slots expire: the leader commits [`Command::UploadDelete`]
//! for what is due, and every node deletes its copy when that applies
//! ([`Effect::UploadDeleted`]). Each node also removes, now and then, files
//! in its directory that no record names (a delete it missed while it
//! was away and caught up from a snapshot, an upload cut off by a crash).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures_util::Stream;
use rand::Rng as _;
use tokio::io::AsyncReadExt as _;
use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::forms::{self, Field};
use xmpp::jid::{FullJid, Jid};
use xmpp::stanza::{error_reply, iq_result, ns};

use super::{BoxFuture, Module};
use crate::cluster::state_machine::{ApplyError, Command, Effect, Refusal};
use crate::store::UploadRecord;
use crate::Server;

pub const NS: &str = "urn:xmpp:http:upload:0";

/// Longest file name accepted in a slot request, in bytes (a common file
/// system limit for one path component).
const MAX_FILENAME_BYTES: usize = 255;
/// Longest content type accepted.
const MAX_CONTENT_TYPE_BYTES: usize = 255;
/// What a slot request without a content type stores, and a GET serves.
pub const DEFAULT_CONTENT_TYPE: &str = "application/octet-stream";
/// How often the leader looks for expired uploads.
const SWEEP_EVERY: Duration = Duration::from_secs(30);
/// Expired uploads deleted per log entry.
const SWEEP_BATCH: usize = 256;
/// How often each node looks for files in its directory that no record
/// names, and how old such a file must be to go (a file another node just
/// stored in a shared directory may not have reached this node's state).
const ORPHANS_EVERY: Duration = Duration::from_secs(600);
const ORPHAN_AGE: Duration = Duration::from_secs(3600);
/// Bytes per read when a file is streamed (HTTP body or gRPC chunk).
const CHUNK: usize = 64 * 1024;

pub struct Upload;

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A new slot id: 24 random bytes in lower-case hex.
fn new_slot_id() -> String {
    let bytes: [u8; 24] = rand::thread_rng().gen();
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Whether `slot` has the form of a slot id (and so is safe as a file name).
pub fn valid_slot(slot: &str) -> bool {
    slot.len() == 48
        && slot
            .bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// Where a slot's file lives in `dir`; `None` for what is not a slot id.
pub fn file_path(dir: &Path, slot: &str) -> Option<PathBuf> {
    valid_slot(slot).then(|| dir.join(slot))
}

/// A file name as a slot request gives it, checked: it becomes part of a
/// URL path and of a `Content-Disposition` header, so no path separators,
/// no control or direction-override characters, and a bounded length.
pub fn check_filename(name: &str) -> Result<&str, &'static str> {
    if name.is_empty() || name == "." || name == ".." {
        return Err("the file name is empty");
    }
    if name.len() > MAX_FILENAME_BYTES {
        return Err("the file name is longer than 255 bytes");
    }
    if name.contains(['/', '\\']) {
        return Err("the file name must not contain / or \\");
    }
    let bidi = |c: char| matches!(c, '\u{200e}' | '\u{200f}' | '\u{202a}'..='\u{202e}' | '\u{2066}'..='\u{2069}');
    if name.chars().any(|c| c.is_control() || bidi(c)) {
        return Err("the file name must not contain control or text-direction characters");
    }
    Ok(name)
}

/// A content type as `type/subtype` with optional parameters, printable
/// ASCII only; absent means [`DEFAULT_CONTENT_TYPE`].
pub fn check_content_type(value: Option<&str>) -> Result<String, &'static str> {
    let Some(v) = value.map(str::trim).filter(|v| !v.is_empty()) else {
        return Ok(DEFAULT_CONTENT_TYPE.to_owned());
    };
    let essence = v.split(';').next().unwrap_or("").trim();
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&b))
    };
    let well_formed = essence
        .split_once('/')
        .is_some_and(|(t, s)| token(t) && token(s));
    if v.len() > MAX_CONTENT_TYPE_BYTES
        || !well_formed
        || !v.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        return Err("the content type is not of the form type/subtype");
    }
    Ok(v.to_owned())
}

/// The URL of a slot's file under `base`: `<base>/upload/<slot>/<name>`,
/// the name percent-encoded (everything but RFC 3986 unreserved characters).
pub fn url(base: &str, slot: &str, filename: &str) -> String {
    const KEEP: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    format!(
        "{base}/upload/{slot}/{}",
        percent_encoding::utf8_percent_encode(filename, KEEP)
    )
}

/// A file's bytes from the start, `CHUNK` at a time.
pub fn read_chunks(
    file: tokio::fs::File,
) -> impl Stream<Item = std::io::Result<Vec<u8>>> + Send + 'static {
    futures_util::stream::unfold(Some(file), |state| async move {
        let mut file = state?;
        let mut buf = vec![0u8; CHUNK];
        match file.read(&mut buf).await {
            Ok(0) => None,
            Ok(n) => {
                buf.truncate(n);
                Some((Ok(buf), Some(file)))
            }
            Err(e) => Some((Err(e), None)),
        }
    })
}

/// XEP-0363 §2: the service's identity, feature and size limit.
fn disco_info(server: &Server) -> Element {
    let form = forms::build(
        "result",
        Some(NS),
        vec![Field::new("max-file-size", "text-single")
            .value(server.config.upload.max_file_size.to_string())],
    );
    Element::new("query", ns::DISCO_INFO)
        .child(
            Element::new("identity", ns::DISCO_INFO)
                .attr("category", "store")
                .attr("type", "file")
                .attr("name", "HTTP File Upload"),
        )
        .child(Element::new("feature", ns::DISCO_INFO).attr("var", ns::DISCO_INFO))
        .child(Element::new("feature", ns::DISCO_INFO).attr("var", NS))
        .child(form)
}

/// An error reply with an application-specific condition in `<error/>`.
fn error_with(iq: &Element, condition: StanzaError, text: &str, extra: Element) -> Option<Element> {
    let mut reply = error_reply(iq, condition, Some(text))?;
    if let Some(err) = reply.get_child_mut("error", &iq.ns) {
        err.children.push(xmpp::element::Node::Element(extra));
    }
    Some(reply)
}

impl Upload {
    async fn iq(
        &self,
        server: &Server,
        iq: &Element,
        from: &FullJid,
        host: &str,
    ) -> Option<Element> {
        let kind = iq.get_attr("type");
        if !matches!(kind, Some("get") | Some("set")) {
            return None;
        }
        let Some(payload) = xmpp::stanza::iq_payload(iq) else {
            return error_reply(iq, StanzaError::BadRequest, None);
        };
        let get = kind == Some("get");
        match (payload.ns.as_str(), payload.name.as_str()) {
            (ns::DISCO_INFO, "query") if get => {
                if payload.get_attr("node").is_some() {
                    return error_reply(iq, StanzaError::ItemNotFound, None);
                }
                Some(iq_result(iq).child(disco_info(server)))
            }
            (ns::DISCO_ITEMS, "query") if get => {
                Some(iq_result(iq).child(Element::new("query", ns::DISCO_ITEMS)))
            }
            (ns::PING, "ping") if get => Some(iq_result(iq)),
            (NS, "request") if get => self.request(server, iq, payload, from, host).await,
            _ => error_reply(iq, StanzaError::ServiceUnavailable, None),
        }
    }

    /// A slot request (XEP-0363 §4), answered with the slot or the reason.
    async fn request(
        &self,
        server: &Server,
        iq: &Element,
        req: &Element,
        from: &FullJid,
        host: &str,
    ) -> Option<Element> {
        let config = &server.config.upload;
        if from.domain() != host {
            return error_reply(
                iq,
                StanzaError::Forbidden,
                Some(&format!("only users of {host} may upload files here")),
            );
        }
        let filename = match req.get_attr("filename").map(check_filename) {
            Some(Ok(f)) => f.to_owned(),
            Some(Err(why)) => return error_reply(iq, StanzaError::BadRequest, Some(why)),
            None => {
                return error_reply(iq, StanzaError::BadRequest, Some("a filename is required"))
            }
        };
        let size = match req.get_attr("size").map(|s| s.trim().parse::<u64>()) {
            Some(Ok(n)) if n > 0 => n,
            _ => {
                return error_reply(
                    iq,
                    StanzaError::BadRequest,
                    Some("size must be the file's length in bytes, at least 1"),
                )
            }
        };
        let content_type = match check_content_type(req.get_attr("content-type")) {
            Ok(c) => c,
            Err(why) => return error_reply(iq, StanzaError::BadRequest, Some(why)),
        };
        let max = config.max_file_size;
        if size > max {
            // §5: the maximum goes in <file-too-large/>.
            return error_with(
                iq,
                StanzaError::NotAcceptable,
                &format!("File too large. The maximum file size is {max} bytes"),
                Element::new("file-too-large", NS)
                    .child(Element::new("max-file-size", NS).text(max.to_string())),
            );
        }
        let now = now_secs();
        let put_by = now.saturating_add(config.slot_expire_secs);
        let slot = new_slot_id();
        let owner = from.bare().to_string();
        let cmd = Command::UploadSlot {
            slot: slot.clone(),
            record: UploadRecord {
                owner: owner.clone(),
                filename: filename.clone(),
                size,
                content_type,
                created: now,
                put_by,
                expires: put_by.saturating_add(config.transfer_secs),
                stored_on: None,
            },
            quota: config.quota_per_user,
        };
        match server.cluster.write(cmd).await {
            Ok(_) => {}
            Err(ApplyError::Refused(Refusal::UploadQuota { quota, used, .. })) => {
                return error_reply(
                    iq,
                    StanzaError::ResourceConstraint,
                    Some(&format!(
                        "Quota reached: your uploads hold {used} bytes and the quota is {quota} bytes per user; wait until older files expire"
                    )),
                );
            }
            Err(ApplyError::Refused(Refusal::NoSuchAccount(_))) => {
                return error_reply(iq, StanzaError::Forbidden, Some("no such account"));
            }
            Err(e) => {
                tracing::warn!(error = %e, user = %owner, "upload slot not handed out");
                return error_reply(
                    iq,
                    StanzaError::ResourceConstraint,
                    Some("cannot hand out a slot now, try again"),
                );
            }
        }
        let base = config.base_url(host, &server.config.listen);
        let link = url(&base, &slot, &filename);
        tracing::info!(user = %owner, %slot, size, "upload slot handed out");
        Some(
            iq_result(iq).child(
                Element::new("slot", NS)
                    .child(Element::new("put", NS).attr("url", link.as_str()))
                    .child(Element::new("get", NS).attr("url", link.as_str())),
            ),
        )
    }
}

impl Module for Upload {
    fn name(&self) -> &'static str {
        "upload"
    }

    fn owns_domain(&self, server: &Server, domain: &str) -> bool {
        server
            .config
            .upload
            .host_of(domain, &server.config)
            .is_some()
    }

    fn disco_items(&self, server: &Server, from: &FullJid, node: &str) -> Option<Vec<Element>> {
        let sub = &server.config.upload.subdomain;
        super::component_item(server, from, node, sub, "HTTP File Upload")
    }

    fn on_applied(&self, server: &Server, effect: &Effect) {
        let Effect::UploadDeleted { slot, node } = effect else {
            return;
        };
        // The node that stored it holds it, and so does every node when the
        // directory is shared: each one tries.
        let dir = server.config.upload.dir(&server.config.data_dir);
        let Some(path) = file_path(&dir, slot) else {
            return;
        };
        let (slot, node) = (slot.clone(), *node);
        tokio::spawn(async move {
            match tokio::fs::remove_file(&path).await {
                Ok(()) => tracing::info!(%slot, "expired upload deleted"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => {
                    tracing::warn!(%slot, ?node, path = %path.display(), error = %e, "cannot delete an expired upload")
                }
            }
        });
    }

    fn handle_component<'a>(
        &'a self,
        server: &'a Server,
        stanza: Element,
        from: Jid,
        to: Jid,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(host) = server.config.upload.host_of(to.domain(), &server.config) else {
                return;
            };
            let reply = match (stanza.name.as_str(), &from) {
                ("iq", Jid::Full(from)) => self.iq(server, &stanza, from, host).await,
                ("iq" | "message", _) => {
                    error_reply(&stanza, StanzaError::ServiceUnavailable, None)
                }
                _ => None,
            };
            if let Some(r) = reply {
                crate::router::deliver_reply(server, r);
            }
        })
    }
}

/// Starts the expiry sweeps (the leader's deletes, each node's orphans).
pub fn start(server: &Arc<Server>) {
    if server.modules.iter().all(|m| m.name() != "upload") {
        return;
    }
    tokio::spawn(sweep(server.clone()));
}

async fn sweep(server: Arc<Server>) {
    let mut shutdown = server.shutdown.subscribe();
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last_orphans: Option<tokio::time::Instant> = None;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        if server
            .cluster
            .leader()
            .is_some_and(|(id, _)| id == server.cluster.id)
        {
            expire(&server).await;
        }
        if last_orphans.is_none_or(|t| t.elapsed() >= ORPHANS_EVERY) {
            last_orphans = Some(tokio::time::Instant::now());
            let dir = server.config.upload.dir(&server.config.data_dir);
            let server = server.clone();
            let swept = tokio::task::spawn_blocking(move || remove_orphans(&server, &dir)).await;
            if let Err(e) = swept {
                tracing::warn!(error = %e, "upload directory sweep failed");
            }
        }
    }
}

/// On the leader: deletes what expired, a batch per log entry.
async fn expire(server: &Server) {
    loop {
        let now = now_secs();
        let due = match server.store().uploads_due(now, SWEEP_BATCH) {
            Ok(d) => d,
            Err(e) => return tracing::warn!(error = %e, "cannot read upload expiries"),
        };
        if due.is_empty() {
            return;
        }
        let full = due.len() == SWEEP_BATCH;
        let n = due.len();
        match server
            .cluster
            .write_as_leader(Command::UploadDelete { slots: due, now })
            .await
        {
            Ok(_) => tracing::info!(count = n, "expired uploads and slots removed"),
            Err(e) => return tracing::warn!(error = %e, "cannot commit upload expiry yet"),
        }
        if !full {
            return;
        }
    }
}

/// Files in `dir` that no record names (old enough not to be in flight),
/// and partial uploads older than any PUT may take.
fn remove_orphans(server: &Server, dir: &Path) {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
        Err(e) => {
            return tracing::warn!(dir = %dir.display(), error = %e, "cannot list the upload directory")
        }
    };
    let transfer = Duration::from_secs(server.config.upload.transfer_secs);
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let age = entry
            .metadata()
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok())
            .unwrap_or_default();
        let orphan = if name.ends_with(".part") {
            age > transfer + ORPHAN_AGE
        } else if valid_slot(&name) {
            age > ORPHAN_AGE && matches!(server.store().upload(&name), Ok(None))
        } else {
            false
        };
        if orphan {
            match std::fs::remove_file(entry.path()) {
                Ok(()) => tracing::info!(file = %name, "upload no record names removed"),
                Err(e) => {
                    tracing::warn!(file = %name, error = %e, "cannot remove an orphaned upload")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_that_cannot_be_served_safely_are_refused() {
        assert!(check_filename("photo 1.jpg").is_ok());
        assert!(check_filename("résumé.pdf").is_ok());
        for bad in ["", ".", "..", "a/b", "a\\b", "a\nb", "x\u{202e}gpj.exe"] {
            assert!(check_filename(bad).is_err(), "{bad:?}");
        }
        assert!(check_filename(&"a".repeat(256)).is_err());
        assert!(check_filename(&"a".repeat(255)).is_ok());
    }

    #[test]
    fn content_types_are_type_slash_subtype() {
        assert_eq!(check_content_type(None).unwrap(), DEFAULT_CONTENT_TYPE);
        assert_eq!(
            check_content_type(Some("text/plain; charset=utf-8")).unwrap(),
            "text/plain; charset=utf-8"
        );
        for bad in ["text", "/plain", "text/pl ain", "image/png\r\nX: y"] {
            assert!(check_content_type(Some(bad)).is_err(), "{bad:?}");
        }
    }

    /// The replicated rules: the quota counts slots and files until they
    /// expire, a slot is stored once, a sweep deletes only what expired.
    #[test]
    fn quota_single_use_and_expiry_are_decided_in_the_log() {
        use crate::cluster::state_machine::apply;
        use crate::store::Store;
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(dir.path()).expect("open");
        let creds = xmpp::sasl::ScramCredentials::derive(
            xmpp::sasl::HashAlg::Sha256,
            "pw",
            b"0123456789abcdef",
            4096,
        )
        .expect("derive");
        let mut index = 0;
        let mut run = |cmd: Command| {
            index += 1;
            apply(&store, index, cmd)
        };
        run(Command::CreateAccount {
            user: "a@x".into(),
            credentials: vec![creds],
        })
        .expect("account");
        let slot = |id: &str, size: u64, created: u64| Command::UploadSlot {
            slot: id.into(),
            record: UploadRecord {
                owner: "a@x".into(),
                filename: "f".into(),
                size,
                content_type: DEFAULT_CONTENT_TYPE.into(),
                created,
                put_by: created + 10,
                expires: created + 20,
                stored_on: None,
            },
            quota: 100,
        };
        run(slot("s1", 60, 1000)).expect("fits");
        assert!(matches!(
            run(slot("s2", 50, 1005)),
            Err(ApplyError::Refused(Refusal::UploadQuota {
                used: 60,
                quota: 100,
                ..
            }))
        ));
        assert!(matches!(
            run(slot("s1", 1, 1005)),
            Err(ApplyError::Refused(Refusal::UploadSlotUsed(_)))
        ));
        let stored = |node| Command::UploadStored {
            slot: "s1".into(),
            node,
            expires: 5000,
        };
        run(stored(2)).expect("stored");
        assert!(matches!(
            run(stored(3)),
            Err(ApplyError::Refused(Refusal::UploadSlotUsed(_)))
        ));
        // The unused slot's time would be up, the file's is not.
        run(slot("s2", 40, 1005)).expect("fits beside the file");
        assert_eq!(store.uploads_due(1100, 10).expect("due"), vec!["s2"]);
        run(Command::UploadDelete {
            slots: vec!["s1".into(), "s2".into()],
            now: 1100,
        })
        .expect("sweep");
        assert!(store.upload("s2").expect("read").is_none());
        let r = store.upload("s1").expect("read").expect("the file stays");
        assert_eq!((r.stored_on, r.expires), (Some(2), 5000));
        // The stored file counts until it expires.
        assert!(run(slot("s3", 50, 4999)).is_err());
        run(slot("s3", 50, 5000)).expect("the file's time is up");
        assert!(matches!(
            run(Command::UploadStored {
                slot: "gone".into(),
                node: 1,
                expires: 1,
            }),
            Err(ApplyError::Refused(Refusal::NoUploadSlot(_)))
        ));
        run(Command::DeleteAccount { user: "a@x".into() }).expect("delete");
        assert!(store.upload("s1").expect("read").is_none());
        assert!(store.uploads_due(u64::MAX, 10).expect("due").is_empty());
    }

    #[test]
    fn urls_carry_the_slot_and_the_encoded_name() {
        let slot = new_slot_id();
        assert!(valid_slot(&slot));
        assert!(!valid_slot("../../etc/passwd"));
        assert!(file_path(Path::new("/d"), "..").is_none());
        assert_eq!(
            url("https://h:1", &slot, "a b/ü?.txt"),
            format!("https://h:1/upload/{slot}/a%20b%2F%C3%BC%3F.txt")
        );
    }
}
