//! Offline messages (XEP-0160): `chat` and `normal` messages to a user with
//! no available resource are stored, stamped with `<delay/>` (XEP-0203),
//! and delivered when the user next sends initial presence with a
//! non-negative priority. The queue is bounded per user
//! (`limits.offline_max_messages`); beyond it the sender gets an error.

use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::jid::{BareJid, FullJid};
use xmpp::stanza::{error_reply, ns};

use super::{BoxFuture, Module};
use crate::cluster::state_machine::{ApplyError, Command, Refusal, Response};
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
            let cmd = Command::StoreOffline {
                user: to.to_string(),
                stanza: stored.to_string_in(ns::CLIENT),
                max: u32::try_from(server.config.limits.offline_max_messages).unwrap_or(u32::MAX),
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

/// Takes `session`'s user's stored messages and hands them to that
/// session (or puts them back, in order, if it went away meanwhile).
pub async fn deliver_stored(server: &Server, session: &FullJid) {
    let Some(res) = server.sessions.get(session) else {
        return;
    };
    let user = session.bare();
    match server.store().offline_count(user) {
        Ok(0) => return,
        Ok(_) => {}
        Err(e) => {
            tracing::error!(error = %e, %user, "cannot read offline queue");
            return;
        }
    }
    match server
        .cluster
        .write(Command::TakeOffline {
            user: user.to_string(),
        })
        .await
    {
        Ok(Response::Offline(messages)) if !messages.is_empty() => {
            tracing::debug!(%session, count = messages.len(), "delivering offline messages");
            // One queue entry for the lot: this runs inside the
            // session's own task, which cannot drain its queue
            // until this returns.
            let all = Outbound::Batch(messages.iter().map(|m| Arc::from(m.as_str())).collect());
            if res.tx.send(all).is_err() {
                // The session went away while we read the queue:
                // put the messages back, in order, rather than lose them.
                let back = Command::Batch(
                    messages
                        .into_iter()
                        .map(|stanza| Command::StoreOffline {
                            user: user.to_string(),
                            stanza,
                            max: u32::MAX,
                        })
                        .collect(),
                );
                if let Err(e) = server.cluster.write(back).await {
                    tracing::error!(error = %e, %user, "lost offline messages");
                }
            }
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, %user, "cannot take offline messages"),
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
