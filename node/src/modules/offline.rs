//! Offline messages (XEP-0160): `chat` and `normal` messages to a user with
//! no available resource are stored, stamped with `<delay/>` (XEP-0203),
//! and delivered when the user next sends initial presence with a
//! non-negative priority. The queue is bounded per user in messages and
//! bytes (`limits.offline_max_messages`, `limits.offline_max_bytes`);
//! beyond either the sender gets an error. Storing, counting and taking
//! cost the same however long the queue is (see `OfflineMeta`), and the
//! messages leave storage only once the client has them.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use tokio::sync::oneshot;

use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::jid::{BareJid, FullJid};
use xmpp::stanza::{error_reply, ns};

use super::{BoxFuture, Module};
use crate::cluster::state_machine::{ApplyError, Command, Refusal};
use crate::sessions::Outbound;
use crate::Server;

pub struct Offline;

impl Module for Offline {
    fn name(&self) -> &'static str {
        "offline"
    }

    fn features(&self) -> &'static [&'static str] {
        &[ns::OFFLINE]
    }

    fn on_message_offline<'a>(
        &'a self,
        server: &'a Server,
        to: &'a BareJid,
        message: &'a Element,
    ) -> BoxFuture<'a, Option<Result<(), Element>>> {
        Box::pin(async move {
            let mut stored = message.clone();
            // A message stored before (then requeued from a session that
            // died) keeps its first stamp.
            if !stored.has_child("delay", ns::DELAY) {
                stored.children.push(xmpp::element::Node::Element(
                    Element::new("delay", ns::DELAY)
                        .attr("from", to.domain())
                        .attr("stamp", utc_stamp(SystemTime::now())),
                ));
            }
            let cmd = Command::PushOffline {
                user: to.to_string(),
                stanza: stored.to_string_in(ns::CLIENT),
                max: u32::try_from(server.config.limits.offline_max_messages).unwrap_or(u32::MAX),
                max_bytes: server.config.limits.offline_max_bytes,
            };
            match server.cluster.write(cmd).await {
                Ok(_) => Some(Ok(())),
                Err(ApplyError::Refused(Refusal::OfflineFull { max, .. })) => {
                    let text = format!("{to} is offline and their message store is full ({max} messages); try later");
                    Some(Err(error_reply(
                        message,
                        StanzaError::ServiceUnavailable,
                        Some(&text),
                    )?))
                }
                Err(ApplyError::Refused(Refusal::OfflineBytesFull { max_bytes, .. })) => {
                    let text = format!("{to} is offline and their message store is full ({max_bytes} bytes); try later");
                    Some(Err(error_reply(
                        message,
                        StanzaError::ServiceUnavailable,
                        Some(&text),
                    )?))
                }
                Err(e) => {
                    tracing::error!(error = %e, user = %to, "cannot store offline message");
                    Some(Err(error_reply(
                        message,
                        StanzaError::InternalServerError,
                        None,
                    )?))
                }
            }
        })
    }

    fn on_presence_available<'a>(
        &'a self,
        server: &'a Server,
        session: &'a FullJid,
        initial: bool,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let Some(res) = server.sessions.get(session) else {
                return;
            };
            // XEP-0160 §3: deliver on initial presence of non-negative priority.
            if !initial || res.priority < 0 {
                return;
            }
            deliver_stored(server, session).await;
        })
    }
}

/// Stored messages handed to a session at once, at most.
const PAGE_MESSAGES: usize = 100;
const PAGE_BYTES: usize = 256 * 1024;

/// Users whose stored messages this node is handing to a session now, and
/// whether more were stored meanwhile (then it goes round again).
#[derive(Default)]
pub struct Deliveries {
    busy: Mutex<HashMap<BareJid, bool>>,
}

impl Deliveries {
    /// True when the caller should deliver; false when a delivery for the
    /// user is already running (it is told to look again).
    fn start(&self, user: &BareJid) -> bool {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        match busy.get_mut(user) {
            Some(again) => {
                *again = true;
                false
            }
            None => {
                busy.insert(user.clone(), false);
                true
            }
        }
    }

    /// True when more were stored while delivering: go round again.
    fn finish(&self, user: &BareJid) -> bool {
        let mut busy = self.busy.lock().unwrap_or_else(|p| p.into_inner());
        match busy.get_mut(user) {
            Some(again) if *again => {
                *again = false;
                true
            }
            _ => {
                busy.remove(user);
                false
            }
        }
    }
}

/// Hands `session`'s user's stored messages to that session, a page at a
/// time (so one login never builds one huge write), in a task of its own.
/// A page leaves storage only once the client has it (the write flushed,
/// or acknowledged under XEP-0198): a connection that drops, or a node
/// killed, in between loses nothing; the page comes again at the next
/// login (at-least-once).
pub async fn deliver_stored(server: &Server, session: &FullJid) {
    let user = session.bare().clone();
    match server.store().offline_count(&user) {
        Ok(0) => return,
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, %user, "cannot read offline queue");
            return;
        }
    }
    let Some(server) = server.arc() else {
        return;
    };
    if !server.offline.start(&user) {
        return;
    }
    let session = session.clone();
    tokio::spawn(async move {
        loop {
            deliver_pages(&server, &session).await;
            if !server.offline.finish(&user) {
                break;
            }
        }
    });
}

async fn deliver_pages(server: &Server, session: &FullJid) {
    let user = session.bare().to_string();
    loop {
        let page = match server.store().offline_page(&user, PAGE_MESSAGES) {
            Ok(p) => p,
            Err(e) => {
                tracing::error!(error = %e, %user, "cannot read offline queue");
                return;
            }
        };
        let Some(&(last, _)) = page.last() else {
            return;
        };
        let mut stanzas = Vec::with_capacity(page.len());
        let mut bytes = 0;
        let mut upto = last + 1;
        for (seq, xml) in page {
            if bytes > 0 && bytes + xml.len() > PAGE_BYTES {
                upto = seq;
                break;
            }
            bytes += xml.len();
            stanzas.push(Arc::from(xml.as_str()));
        }
        let Some(res) = server.sessions.get(session) else {
            return;
        };
        tracing::debug!(%session, count = stanzas.len(), "delivering offline messages");
        let (done, delivered) = oneshot::channel();
        if res.tx.send(Outbound::Stored(stanzas, done)).is_err() {
            return;
        }
        // The session ended first: they stay stored, for the next login.
        if delivered.await.is_err() {
            return;
        }
        if let Err(e) = server
            .cluster
            .write(Command::AckOffline {
                user: user.clone(),
                upto,
            })
            .await
        {
            // Delivered but still stored: they come again at the next
            // login, which is the safe side.
            tracing::warn!(error = %e, %user, "cannot remove delivered offline messages");
            return;
        }
    }
}

/// XEP-0082 DateTime in UTC, e.g. `2026-11-25T21:00:00.123Z`.
pub fn utc_stamp(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs();
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Days since 1970-01-01 to a civil date (proleptic Gregorian).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        d.subsec_millis()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn stamps_are_xep_0082_utc() {
        assert_eq!(utc_stamp(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        // 2000-02-29 is a leap day; 951782400 s after the epoch.
        assert_eq!(
            utc_stamp(UNIX_EPOCH + Duration::from_millis(951_782_400_250)),
            "2000-02-29T00:00:00.250Z"
        );
        assert_eq!(
            utc_stamp(UNIX_EPOCH + Duration::from_secs(1_795_640_458)),
            "2026-11-25T21:00:58.000Z"
        );
    }
}
