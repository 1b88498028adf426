//! In-band registration (XEP-0077), off unless `auth.allow_registration`.
//!
//! Before authentication a client may create an account on the stream's
//! virtual host; after it, change its password or remove its account.

use std::net::IpAddr;
use std::time::Instant;

use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::jid::{nodeprep, BareJid};
use xmpp::stanza::{iq_result, ns, IqType};

use super::{iq_error, BoxFuture, IqRequest, IqTarget, Module};
use crate::accounts::{self, AccountError};
use crate::cluster::state_machine::{ApplyError, Refusal};
use crate::Server;

pub struct Register;

fn form(registered: Option<&str>) -> Element {
    let q = Element::new("query", ns::REGISTER);
    match registered {
        Some(user) => q
            .child(Element::new("registered", ns::REGISTER))
            .child(Element::new("username", ns::REGISTER).text(user)),
        None => q
            .child(
                Element::new("instructions", ns::REGISTER).text("Choose a username and password."),
            )
            .child(Element::new("username", ns::REGISTER))
            .child(Element::new("password", ns::REGISTER)),
    }
}

/// Handles a `jabber:iq:register` IQ on a not yet authenticated stream.
pub async fn preauth(server: &Server, vhost: &str, peer: IpAddr, iq: &Element) -> Element {
    if !server.config.auth.allow_registration {
        return iq_error(
            iq,
            StanzaError::ServiceUnavailable,
            Some("registration is disabled on this server"),
        );
    }
    let Some(query) = iq.get_child("query", ns::REGISTER) else {
        return iq_error(iq, StanzaError::BadRequest, None);
    };
    match IqType::of(iq) {
        Some(IqType::Get) => iq_result(iq).child(form(None)),
        Some(IqType::Set) => {
            let (Some(user), Some(password)) = (
                query.child_text("username", ns::REGISTER),
                query.child_text("password", ns::REGISTER),
            ) else {
                return iq_error(
                    iq,
                    StanzaError::NotAcceptable,
                    Some("username and password are required"),
                );
            };
            let Ok(node) = nodeprep(&user) else {
                return iq_error(
                    iq,
                    StanzaError::JidMalformed,
                    Some("that username is not allowed"),
                );
            };
            let Ok(jid) = BareJid::new(Some(&node), vhost) else {
                return iq_error(
                    iq,
                    StanzaError::JidMalformed,
                    Some("that username is not allowed"),
                );
            };
            // A taken name is answered as such, without using up a turn.
            if server.store().account_exists(&jid).unwrap_or(false) {
                return iq_error(iq, StanzaError::Conflict, Some("that username is taken"));
            }
            if let Err(wait) = server.registrations.reserve(peer, Instant::now()) {
                return iq_error(
                    iq,
                    StanzaError::ResourceConstraint,
                    Some(&format!(
                        "one registration per address every {} seconds; try again in {} seconds",
                        server.config.auth.registration_interval_secs,
                        wait.as_secs().max(1)
                    )),
                );
            }
            let created = accounts::create(server, &jid, &password).await;
            if created.is_err() {
                server.registrations.release(peer);
            }
            match created {
                Ok(()) => {
                    tracing::info!(user = %jid, "account registered in-band");
                    iq_result(iq)
                }
                Err(AccountError::Apply(ApplyError::Refused(Refusal::AccountExists(_)))) => {
                    iq_error(iq, StanzaError::Conflict, Some("that username is taken"))
                }
                Err(AccountError::BadPassword) => {
                    iq_error(iq, StanzaError::NotAcceptable, Some("unusable password"))
                }
                Err(e) => {
                    tracing::error!(error = %e, "in-band registration failed");
                    iq_error(iq, StanzaError::InternalServerError, None)
                }
            }
        }
        _ => iq_error(iq, StanzaError::BadRequest, None),
    }
}

impl Module for Register {
    fn name(&self) -> &'static str {
        "register"
    }

    fn handles(&self, namespace: &str, target: &IqTarget) -> bool {
        namespace == ns::REGISTER && matches!(target, IqTarget::Server(_))
    }

    fn features(&self) -> &'static [&'static str] {
        &[ns::REGISTER]
    }

    fn handle_iq<'a>(
        &'a self,
        server: &'a Server,
        req: IqRequest<'a>,
    ) -> BoxFuture<'a, Option<Element>> {
        Box::pin(async move {
            let reply: Element = async move {
                let user = req.from.bare();
                if !req.is_set() {
                    return iq_result(req.iq).child(form(user.node()));
                }
                // XEP-0077 §3.2: cancel the registration.
                if req.payload.has_child("remove", ns::REGISTER) {
                    // Answer first: the stream is closed once the account is gone.
                    let reply = iq_result(req.iq);
                    if let Err(e) = accounts::delete(server, user).await {
                        tracing::error!(error = %e, %user, "cannot remove account");
                        return iq_error(req.iq, StanzaError::InternalServerError, None);
                    }
                    return reply;
                }
                // XEP-0077 §3.3: change password.
                let Some(password) = req.payload.child_text("password", ns::REGISTER) else {
                    return iq_error(req.iq, StanzaError::BadRequest, None);
                };
                if req
                    .payload
                    .child_text("username", ns::REGISTER)
                    .is_some_and(|u| nodeprep(&u).ok().as_deref() != user.node())
                {
                    return iq_error(req.iq, StanzaError::NotAuthorized, None);
                }
                match accounts::set_password(server, user, &password).await {
                    Ok(()) => iq_result(req.iq),
                    Err(AccountError::BadPassword) => {
                        iq_error(req.iq, StanzaError::NotAcceptable, None)
                    }
                    Err(e) => {
                        tracing::error!(error = %e, %user, "cannot change password");
                        iq_error(req.iq, StanzaError::InternalServerError, None)
                    }
                }
            }
            .await;
            Some(reply)
        })
    }
}
