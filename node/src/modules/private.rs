//! Private XML Storage (XEP-0049): a user stores elements under their
//! namespace and reads them back; nobody else can. Bookmarks of older
//! clients live here.

use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::stanza::iq_result;

use super::{iq_error, BoxFuture, IqRequest, IqTarget, Module};
use crate::cluster::state_machine::{ApplyError, Command, Refusal};
use crate::Server;

pub const NS: &str = "jabber:iq:private";

pub struct Private;

impl Module for Private {
    fn name(&self) -> &'static str {
        "private"
    }

    fn handles(&self, namespace: &str, target: &IqTarget) -> bool {
        namespace == NS && matches!(target, IqTarget::Account(_))
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
            let user = req.from.bare();
            // XEP-0049 §3: only one's own storage.
            if !req.to_own_account() {
                return Some(iq_error(req.iq, StanzaError::Forbidden, None));
            }
            let children: Vec<&Element> = req.payload.elements().collect();
            let [child] = children.as_slice() else {
                return Some(iq_error(req.iq, StanzaError::BadRequest, None));
            };
            // §3: the jabber:* namespaces are reserved.
            if child.ns.starts_with("jabber:") || child.ns.is_empty() {
                return Some(iq_error(req.iq, StanzaError::NotAcceptable, None));
            }
            let u = user.to_string();
            if req.is_set() {
                let cmd = Command::SetPrivate {
                    user: u,
                    namespace: child.ns.clone(),
                    xml: child.to_string_in(""),
                }
                .limited(&server.config.limits);
                return Some(match server.cluster.write(cmd).await {
                    Ok(_) => iq_result(req.iq),
                    Err(ApplyError::Refused(Refusal::PrivateFull { max_bytes, .. })) => iq_error(
                        req.iq,
                        StanzaError::ResourceConstraint,
                        Some(&format!(
                            "private storage is limited to {max_bytes} bytes per account"
                        )),
                    ),
                    Err(e) => {
                        tracing::error!(error = %e, "private storage failed");
                        iq_error(req.iq, StanzaError::InternalServerError, None)
                    }
                });
            }
            let stored = server
                .store()
                .private(&u, &child.ns)
                .ok()
                .flatten()
                .and_then(|x| xmpp::xml::parse_element(&x, &child.ns).ok());
            // Nothing stored: the empty element asked for comes back.
            let data = stored.unwrap_or_else(|| Element::new(child.name.clone(), child.ns.clone()));
            Some(iq_result(req.iq).child(Element::new("query", NS).child(data)))
        })
    }
}
