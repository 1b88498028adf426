//! vcard-temp (XEP-0054): each user's vCard, readable by anyone, written
//! only by its owner. Pidgin and others fetch it at login.

use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::stanza::iq_result;

use super::{iq_error, BoxFuture, IqRequest, IqTarget, Module};
use crate::cluster::state_machine::Command;
use crate::Server;

pub const NS: &str = "vcard-temp";

pub struct VCard;

impl Module for VCard {
    fn name(&self) -> &'static str {
        "vcard"
    }

    fn handles(&self, namespace: &str, _target: &IqTarget) -> bool {
        namespace == NS
    }

    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }

    fn handle_iq<'a>(
        &'a self,
        server: &'a Server,
        req: IqRequest<'a>,
    ) -> BoxFuture<'a, Option<Element>> {
        Box::pin(async move {
            if !req.payload.is("vCard", NS) {
                return Some(iq_error(req.iq, StanzaError::BadRequest, None));
            }
            let owner = match &req.target {
                IqTarget::Account(u) => u.clone(),
                // The server has no vCard of its own.
                IqTarget::Server(_) => {
                    return Some(if req.is_set() {
                        iq_error(req.iq, StanzaError::NotAllowed, None)
                    } else {
                        iq_result(req.iq).child(Element::new("vCard", NS))
                    })
                }
            };
            if req.is_set() {
                if &owner != req.from.bare() {
                    return Some(iq_error(req.iq, StanzaError::Forbidden, None));
                }
                // An empty vCard element removes it.
                let vcard =
                    (!req.payload.children.is_empty()).then(|| req.payload.to_string_in(""));
                let max = server.config.limits.max_vcard_bytes;
                if vcard.as_ref().is_some_and(|v| v.len() > max) {
                    return Some(iq_error(
                        req.iq,
                        StanzaError::NotAcceptable,
                        Some(&format!("a vCard may take at most {max} bytes")),
                    ));
                }
                let cmd = Command::SetVcard {
                    user: owner.to_string(),
                    vcard,
                };
                return Some(match server.cluster.write(cmd).await {
                    Ok(_) => iq_result(req.iq),
                    Err(e) => {
                        tracing::error!(error = %e, "vCard store failed");
                        iq_error(req.iq, StanzaError::InternalServerError, None)
                    }
                });
            }
            let stored = server.store().vcard(&owner.to_string()).ok().flatten();
            let vcard = match stored.and_then(|x| xmpp::xml::parse_element(&x, NS).ok()) {
                Some(v) => v,
                // XEP-0054 §3.1: no vCard yet is an empty one.
                None => Element::new("vCard", NS),
            };
            Some(iq_result(req.iq).child(vcard))
        })
    }
}
