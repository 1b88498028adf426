//! Service Administration (XEP-0133) over Ad-Hoc Commands (XEP-0050):
//! the accounts named in `auth.admins` add and delete users, change passwords
//! and send an announcement to everyone online, from any client that
//! speaks ad-hoc commands (Gajim, Psi, Converse.js).
//!
//! Each command is two steps: `execute` answers with a form, and the
//! submitted form does the work. Nothing is kept between the steps (the
//! form carries everything), so either step may reach any node.

use rand::Rng as _;
use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::forms::{self, Field, Submitted};
use xmpp::jid::BareJid;
use xmpp::stanza::{iq_result, ns};

use super::{iq_error, BoxFuture, IqRequest, IqTarget, Module};
use crate::accounts;
use crate::Server;

pub const NS: &str = "http://jabber.org/protocol/commands";
const ADMIN: &str = "http://jabber.org/protocol/admin";

pub struct Adhoc;

/// The commands: node, name.
const COMMANDS: &[(&str, &str)] = &[
    ("http://jabber.org/protocol/admin#add-user", "Add a user"),
    (
        "http://jabber.org/protocol/admin#delete-user",
        "Delete users",
    ),
    (
        "http://jabber.org/protocol/admin#change-user-password",
        "Change a user's password",
    ),
    (
        "http://jabber.org/protocol/admin#announce",
        "Send an announcement to online users",
    ),
];

fn is_admin(server: &Server, who: &BareJid) -> bool {
    let me = who.to_string();
    server.config.auth.admins.contains(&me)
}

fn form_for(node: &str) -> Option<Vec<Field>> {
    let f = |var: &str, kind: &'static str, label: &str| Field::new(var, kind).label(label);
    Some(
        match node.strip_prefix("http://jabber.org/protocol/admin#")? {
            "add-user" => vec![
                f(
                    "accountjid",
                    "jid-single",
                    "The Jabber ID for the account to be added",
                ),
                f("password", "text-private", "The password for this account"),
                f("password-verify", "text-private", "Retype password"),
            ],
            "delete-user" => vec![f("accountjids", "jid-multi", "The Jabber ID(s) to delete")],
            "change-user-password" => vec![
                f("accountjid", "jid-single", "The Jabber ID for this account"),
                f("password", "text-private", "The password for this account"),
            ],
            "announce" => vec![
                f("subject", "text-single", "Subject"),
                f("announcement", "text-multi", "Announcement"),
            ],
            _ => return None,
        },
    )
}

fn command(node: &str, sessionid: &str, status: &str) -> Element {
    Element::new("command", NS)
        .attr("node", node)
        .attr("sessionid", sessionid)
        .attr("status", status)
}

fn completed(req: &IqRequest<'_>, node: &str, sessionid: &str, note: &str) -> Element {
    iq_result(req.iq).child(
        command(node, sessionid, "completed")
            .child(Element::new("note", NS).attr("type", "info").text(note)),
    )
}

impl Module for Adhoc {
    fn name(&self) -> &'static str {
        "adhoc"
    }

    fn handles(&self, namespace: &str, target: &IqTarget) -> bool {
        namespace == NS && matches!(target, IqTarget::Server(_))
    }

    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }

    fn disco_items(
        &self,
        server: &Server,
        from: &xmpp::jid::FullJid,
        node: &str,
    ) -> Option<Vec<Element>> {
        if node != NS {
            return None;
        }
        // Only admins see the commands; others see an empty list.
        let domain = from.domain().to_owned();
        let items = if is_admin(server, from.bare()) {
            COMMANDS
                .iter()
                .map(|(n, name)| {
                    Element::new("item", ns::DISCO_ITEMS)
                        .attr("jid", domain.as_str())
                        .attr("node", *n)
                        .attr("name", *name)
                })
                .collect()
        } else {
            Vec::new()
        };
        Some(items)
    }

    fn handle_iq<'a>(
        &'a self,
        server: &'a Server,
        req: IqRequest<'a>,
    ) -> BoxFuture<'a, Option<Element>> {
        Box::pin(async move { Some(execute(server, &req).await.unwrap_or_else(|e| e)) })
    }
}

async fn execute(server: &Server, req: &IqRequest<'_>) -> Result<Element, Element> {
    let iq = req.iq;
    if !req.is_set() || req.payload.name != "command" {
        return Err(iq_error(iq, StanzaError::BadRequest, None));
    }
    let node = req.payload.get_attr("node").unwrap_or("").to_owned();
    let Some(fields) = form_for(&node) else {
        return Err(iq_error(
            iq,
            StanzaError::ItemNotFound,
            Some("no such command"),
        ));
    };
    if !is_admin(server, req.from.bare()) {
        return Err(iq_error(
            iq,
            StanzaError::Forbidden,
            Some("for server administrators"),
        ));
    }
    let action = req.payload.get_attr("action").unwrap_or("execute");
    let sessionid = req
        .payload
        .get_attr("sessionid")
        .map(str::to_owned)
        .unwrap_or_else(|| format!("{:016x}", rand::thread_rng().gen::<u64>()));
    if action == "cancel" {
        return Ok(iq_result(iq).child(command(&node, &sessionid, "canceled")));
    }
    let submitted = req
        .payload
        .get_child("x", forms::NS)
        .filter(|x| x.get_attr("type") == Some("submit"))
        .and_then(Submitted::read);
    let Some(form) = submitted else {
        // Step one: the form to fill in.
        let title = COMMANDS
            .iter()
            .find(|(n, _)| *n == node)
            .map_or("", |(_, t)| t);
        let x = forms::build("form", Some(ADMIN), fields)
            .child(Element::new("title", forms::NS).text(title));
        return Ok(iq_result(iq).child(
            command(&node, &sessionid, "executing")
                .child(
                    Element::new("actions", NS)
                        .attr("execute", "complete")
                        .child(Element::new("complete", NS)),
                )
                .child(x),
        ));
    };
    let bad = |text: &str| iq_error(iq, StanzaError::BadRequest, Some(text));
    let account = |var: &str| -> Result<BareJid, Element> {
        let v = form
            .value(var)
            .ok_or_else(|| bad(&format!("{var} is required")))?;
        accounts::parse_user(server, v).map_err(|e| bad(&e.to_string()))
    };
    let failed =
        |e: accounts::AccountError| iq_error(iq, StanzaError::NotAcceptable, Some(&e.to_string()));
    match node.rsplit('#').next().unwrap_or("") {
        "add-user" => {
            let user = account("accountjid")?;
            let pw = form.value("password").unwrap_or("");
            if pw.is_empty() || form.value("password-verify").is_some_and(|v| v != pw) {
                return Err(bad("the passwords are empty or differ"));
            }
            accounts::create(server, &user, pw).await.map_err(failed)?;
            Ok(completed(req, &node, &sessionid, &format!("{user} added")))
        }
        "delete-user" => {
            let mut done = Vec::new();
            for v in form.values("accountjids") {
                let user = accounts::parse_user(server, v).map_err(|e| bad(&e.to_string()))?;
                accounts::delete(server, &user).await.map_err(failed)?;
                done.push(user.to_string());
            }
            Ok(completed(
                req,
                &node,
                &sessionid,
                &format!("deleted: {}", done.join(", ")),
            ))
        }
        "change-user-password" => {
            let user = account("accountjid")?;
            let pw = form
                .value("password")
                .filter(|p| !p.is_empty())
                .ok_or_else(|| bad("password is required"))?;
            accounts::set_password(server, &user, pw)
                .await
                .map_err(failed)?;
            Ok(completed(
                req,
                &node,
                &sessionid,
                &format!("password of {user} changed"),
            ))
        }
        "announce" => {
            let text = form.values("announcement").join("\n");
            if text.trim().is_empty() {
                return Err(bad("the announcement is empty"));
            }
            let subject = form.value("subject").unwrap_or("").to_owned();
            let domain = req.from.domain().to_owned();
            let users = announce_targets(server);
            let n = users.len();
            for user in users {
                let mut m = Element::new("message", ns::CLIENT)
                    .attr("from", domain.as_str())
                    .attr("to", user)
                    .attr("type", "headline");
                if !subject.is_empty() {
                    m = m.child(Element::new("subject", ns::CLIENT).text(subject.as_str()));
                }
                m = m.child(Element::new("body", ns::CLIENT).text(text.as_str()));
                crate::router::route(server, m).await;
            }
            Ok(completed(
                req,
                &node,
                &sessionid,
                &format!("sent to {n} online users"),
            ))
        }
        _ => Err(iq_error(iq, StanzaError::ItemNotFound, None)),
    }
}

/// Every user with an available session anywhere in the cluster, once.
fn announce_targets(server: &Server) -> Vec<String> {
    let mut users: Vec<String> = server
        .store()
        .sessions()
        .unwrap_or_default()
        .into_iter()
        .filter(|(_, e)| e.available)
        .filter_map(|(full, _)| full.split_once('/').map(|(b, _)| b.to_owned()))
        .collect();
    users.sort();
    users.dedup();
    users
}
