//! Push Notifications (XEP-0357): a phone's client registers an app server
//! (its vendor's push relay) and the node wakes the phone through it when a
//! message arrives while no session of the user can take it live: every
//! session is hibernated (XEP-0198, waiting for the client to resume) or
//! gone (the message went to offline storage).
//!
//! Registrations are replicated; the notification is sent once, by the node
//! that stored the message or holds the hibernated session. The summary
//! (XEP-0357 §5) names the sender and a count, and the body only when
//! `push.include_body` says so. An app server that answers with an error
//! loses its registration (§6).

use rand::Rng as _;
use xmpp::element::{escape, Element};
use xmpp::error::StanzaError;
use xmpp::forms::{self, Submitted};
use xmpp::jid::{BareJid, FullJid, Jid};
use xmpp::stanza::{iq_result, ns};

use super::{iq_error, BoxFuture, IqRequest, IqTarget, Module};
use crate::cluster::state_machine::Command;
use crate::Server;

pub const NS: &str = "urn:xmpp:push:0";
const PUBSUB: &str = "http://jabber.org/protocol/pubsub";
const PUBLISH_OPTIONS: &str = "http://jabber.org/protocol/pubsub#publish-options";
const SUMMARY: &str = "urn:xmpp:push:summary";

pub struct Push;

/// The sender and body of a message worth waking a phone for.
fn worth_a_push(m: &Element) -> Option<(String, Option<String>)> {
    if !super::mam::archivable(m) {
        return None;
    }
    let from = m.get_attr("from")?.to_owned();
    Some((from, m.child_text("body", ns::CLIENT)))
}

/// Notifies every app server `user` registered (XEP-0357 §5).
fn notify(server: &Server, user: &BareJid, sender: &str, body: Option<&str>) {
    let regs = match server.store().push_registrations(&user.to_string()) {
        Ok(r) => r,
        Err(e) => return tracing::warn!(error = %e, %user, "push registrations unreadable"),
    };
    for reg in regs {
        let Ok(to) = Jid::parse(&reg.jid) else {
            continue;
        };
        let mut summary = format!(
            "<x xmlns='{}' type='submit'><field var='FORM_TYPE'><value>{SUMMARY}</value></field><field var='message-count'><value>1</value></field><field var='last-message-sender'><value>{}</value></field>",
            forms::NS,
            escape(sender)
        );
        if let (true, Some(b)) = (server.config.push.include_body, body) {
            summary.push_str(&format!(
                "<field var='last-message-body'><value>{}</value></field>",
                escape(b)
            ));
        }
        summary.push_str("</x>");
        let mut options = String::new();
        if !reg.options.is_empty() {
            options.push_str(&format!(
                "<publish-options><x xmlns='{}' type='submit'><field var='FORM_TYPE'><value>{PUBLISH_OPTIONS}</value></field>",
                forms::NS
            ));
            for (var, value) in &reg.options {
                options.push_str(&format!(
                    "<field var='{}'><value>{}</value></field>",
                    escape(var),
                    escape(value)
                ));
            }
            options.push_str("</x></publish-options>");
        }
        let id = format!("push{:016x}", rand::thread_rng().gen::<u64>());
        let xml = format!(
            "<iq type='set' from='{}' to='{}' id='{id}'><pubsub xmlns='{PUBSUB}'><publish node='{}'><item><notification xmlns='{NS}'>{summary}</notification></item></publish>{options}</pubsub></iq>",
            escape(&user.to_string()),
            escape(&reg.jid),
            escape(&reg.node)
        );
        let Ok(iq) = xmpp::xml::parse_element(&xml, ns::CLIENT) else {
            continue;
        };
        tracing::debug!(%user, app = %reg.jid, "push notification");
        if server.config.is_local_domain(to.domain()) {
            if let Jid::Full(full) = &to {
                crate::router::deliver_reply_xml(server, full, xml.into());
            } else {
                let server = server.arc();
                tokio::spawn(async move {
                    if let Some(s) = server {
                        crate::router::route(&s, iq).await;
                    }
                });
            }
        } else {
            crate::federation::route_remote(server, iq, to.domain());
        }
    }
}

impl Module for Push {
    fn name(&self) -> &'static str {
        "push"
    }

    fn handles(&self, namespace: &str, target: &IqTarget) -> bool {
        namespace == NS && matches!(target, IqTarget::Account(_))
    }

    fn account_features(&self) -> &'static [&'static str] {
        &[NS]
    }

    fn on_offline_stored(&self, server: &Server, user: &BareJid, message: &Element) {
        if let Some((from, body)) = worth_a_push(message) {
            notify(server, user, &from, body.as_deref());
        }
    }

    fn on_message_held(&self, server: &Server, session: &FullJid, xml: &str) {
        let Ok(m) = xmpp::xml::parse_element(xml, ns::CLIENT) else {
            return;
        };
        // The session that took it sleeps; its client learns of the
        // message when the phone wakes and resumes.
        let user = session.bare();
        if let Some((from, body)) = worth_a_push(&m) {
            notify(server, user, &from, body.as_deref());
        }
    }

    fn on_iq_response<'a>(&'a self, server: &'a Server, iq: &'a Element) -> BoxFuture<'a, bool> {
        Box::pin(async move {
            let Some(id) = iq.get_attr("id").filter(|i| i.starts_with("push")) else {
                return false;
            };
            if iq.get_attr("type") != Some("error") {
                return id.len() == 20;
            }
            // §6: the app server refused; this registration is no more.
            let (Some(user), Some(app)) = (
                iq.get_attr("to").and_then(|t| BareJid::parse(t).ok()),
                iq.get_attr("from"),
            ) else {
                return true;
            };
            let cmd = Command::PushDisable {
                user: user.to_string(),
                jid: app.to_owned(),
                node: None,
            };
            match server.cluster.write(cmd).await {
                Ok(_) => {
                    tracing::info!(%user, app, "app server refused a push; registration removed")
                }
                Err(e) => tracing::warn!(error = %e, "push registration not removed"),
            }
            true
        })
    }

    fn handle_iq<'a>(
        &'a self,
        server: &'a Server,
        req: IqRequest<'a>,
    ) -> BoxFuture<'a, Option<Element>> {
        Box::pin(async move {
            if !req.to_own_account() || !req.is_set() {
                return Some(iq_error(req.iq, StanzaError::Forbidden, None));
            }
            let p = req.payload;
            let Some(jid) = p.get_attr("jid").filter(|j| Jid::parse(j).is_ok()) else {
                return Some(iq_error(
                    req.iq,
                    StanzaError::BadRequest,
                    Some("a jid is required"),
                ));
            };
            let user = req.from.bare().to_string();
            let cmd = match p.name.as_str() {
                "enable" => {
                    let Some(node) = p.get_attr("node").filter(|n| !n.is_empty()) else {
                        return Some(iq_error(
                            req.iq,
                            StanzaError::BadRequest,
                            Some("a node is required"),
                        ));
                    };
                    let options = p
                        .get_child("x", forms::NS)
                        .and_then(Submitted::read)
                        .map(|f| {
                            f.fields
                                .into_iter()
                                .filter(|(v, _)| v != "FORM_TYPE")
                                .filter_map(|(v, vals)| vals.into_iter().next().map(|x| (v, x)))
                                .collect()
                        })
                        .unwrap_or_default();
                    Command::PushEnable {
                        user,
                        jid: jid.to_owned(),
                        node: node.to_owned(),
                        options,
                    }
                }
                "disable" => Command::PushDisable {
                    user,
                    jid: jid.to_owned(),
                    node: p.get_attr("node").map(str::to_owned),
                },
                _ => return Some(iq_error(req.iq, StanzaError::BadRequest, None)),
            };
            Some(match server.cluster.write(cmd).await {
                Ok(_) => iq_result(req.iq),
                Err(e) => {
                    tracing::warn!(error = %e, "push registration not saved");
                    iq_error(
                        req.iq,
                        StanzaError::ResourceConstraint,
                        Some("cannot save now, try again"),
                    )
                }
            })
        })
    }
}
