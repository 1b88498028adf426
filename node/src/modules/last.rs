//! Last Activity (XEP-0012): the server's uptime, and how long ago a
//! contact was last online, for those who may see their presence.
//!
//! The time of a user's last logout (and the status text of that last
//! `unavailable`) is replicated, so every node answers alike.

use std::time::{SystemTime, UNIX_EPOCH};

use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::jid::{FullJid, Jid};
use xmpp::stanza::iq_result;

use super::{iq_error, BoxFuture, IqRequest, IqTarget, Module};
use crate::cluster::state_machine::Command;
use crate::Server;

pub const NS: &str = "jabber:iq:last";

pub struct Last;

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Module for Last {
    fn name(&self) -> &'static str {
        "last"
    }

    fn handles(&self, namespace: &str, _target: &IqTarget) -> bool {
        namespace == NS
    }

    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }

    fn on_unavailable<'a>(
        &'a self,
        server: &'a Server,
        session: &'a FullJid,
        status: Option<String>,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async move {
            let user = session.bare();
            let others = server.cluster.table.with_user(user, |entries| {
                entries
                    .iter()
                    .any(|(r, e)| e.available && r.as_str() != session.resource())
            });
            if others {
                return;
            }
            let cmd = Command::SetLastActivity {
                user: user.to_string(),
                secs: now_secs(),
                status,
            };
            if let Err(e) = server.cluster.write(cmd).await {
                tracing::debug!(error = %e, %user, "last activity not recorded");
            }
        })
    }

    fn handle_iq<'a>(
        &'a self,
        server: &'a Server,
        req: IqRequest<'a>,
    ) -> BoxFuture<'a, Option<Element>> {
        Box::pin(async move {
            if req.is_set() {
                return Some(iq_error(req.iq, StanzaError::BadRequest, None));
            }
            let seconds = |s: u64| Element::new("query", NS).attr("seconds", s.to_string());
            let user = match &req.target {
                // §5: the server's own uptime.
                IqTarget::Server(_) => {
                    return Some(
                        iq_result(req.iq).child(seconds(server.started.elapsed().as_secs())),
                    )
                }
                IqTarget::Account(u) => u,
            };
            // §4: only for those subscribed to the user's presence (and
            // the user).
            let me = req.from.bare();
            if me != user
                && (!super::presence::has_from(server, user, me)
                    || super::blocking::blocks(server, user, &Jid::Bare(me.clone())))
            {
                return Some(iq_error(req.iq, StanzaError::Forbidden, None));
            }
            let online = server
                .cluster
                .table
                .with_user(user, |entries| entries.iter().any(|(_, e)| e.available));
            if online {
                return Some(iq_result(req.iq).child(seconds(0)));
            }
            server.cluster.read_barrier().await;
            match server.store().last_activity(&user.to_string()) {
                Ok(Some((secs, status))) => {
                    let mut q = seconds(now_secs().saturating_sub(secs));
                    if let Some(s) = status {
                        q = q.text(s);
                    }
                    Some(iq_result(req.iq).child(q))
                }
                Ok(None) => Some(iq_error(req.iq, StanzaError::ServiceUnavailable, None)),
                Err(_) => Some(iq_error(req.iq, StanzaError::InternalServerError, None)),
            }
        })
    }
}
