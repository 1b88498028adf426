//! Service Discovery (XEP-0030). The server's identities and features are
//! collected from what every enabled module declares.

use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::stanza::{error_reply, iq_result, ns};

use super::{BoxFuture, Identity, IqRequest, IqTarget, Module};
use crate::Server;

pub struct Disco;

/// XEP-0157: the server's contact addresses as a `serverinfo` form, when
/// any are configured.
fn contact_addresses(c: &crate::config::Contact) -> Option<Element> {
    let lists = [
        ("abuse-addresses", &c.abuse),
        ("admin-addresses", &c.admin),
        ("feedback-addresses", &c.feedback),
        ("sales-addresses", &c.sales),
        ("security-addresses", &c.security),
        ("support-addresses", &c.support),
    ];
    if lists.iter().all(|(_, l)| l.is_empty()) {
        return None;
    }
    let fields = lists
        .iter()
        .filter(|(_, l)| !l.is_empty())
        .map(|(var, l)| {
            l.iter()
                .fold(xmpp::forms::Field::new(var, "list-multi"), |f, v| {
                    f.value(v.as_str())
                })
        })
        .collect();
    Some(xmpp::forms::build(
        "result",
        Some("http://jabber.org/network/serverinfo"),
        fields,
    ))
}

const SERVER_IDENTITY: Identity = Identity {
    category: "server",
    kind: "im",
    name: "xmpp-node",
};

fn identity(i: &Identity) -> Element {
    Element::new("identity", ns::DISCO_INFO)
        .attr("category", i.category)
        .attr("type", i.kind)
        .attr("name", i.name)
}

impl Module for Disco {
    fn name(&self) -> &'static str {
        "disco"
    }

    fn handles(&self, namespace: &str, _target: &IqTarget) -> bool {
        namespace == ns::DISCO_INFO || namespace == ns::DISCO_ITEMS
    }

    fn features(&self) -> &'static [&'static str] {
        &[ns::DISCO_INFO, ns::DISCO_ITEMS]
    }

    fn handle_iq<'a>(
        &'a self,
        server: &'a Server,
        req: IqRequest<'a>,
    ) -> BoxFuture<'a, Option<Element>> {
        Box::pin(async move {
            let reply: Element = async move {
                if req.is_set() {
                    return error_reply(req.iq, StanzaError::BadRequest, None)
                        .unwrap_or_else(|| iq_result(req.iq));
                }
                // Nodes (XEP-0030 §3.2): items of the server's nodes come
                // from the module that owns them (the ad-hoc command list).
                if let Some(node) = req.payload.get_attr("node") {
                    let items = (req.payload.ns == ns::DISCO_ITEMS
                        && matches!(req.target, IqTarget::Server(_)))
                    .then(|| {
                        server
                            .modules
                            .iter()
                            .find_map(|m| m.disco_items(server, req.from, node))
                    })
                    .flatten();
                    return match items {
                        Some(items) => iq_result(req.iq).child(items.into_iter().fold(
                            Element::new("query", ns::DISCO_ITEMS).attr("node", node),
                            Element::child,
                        )),
                        None => error_reply(req.iq, StanzaError::ItemNotFound, None)
                            .unwrap_or_else(|| iq_result(req.iq)),
                    };
                }
                let mut query = Element::new("query", req.payload.ns.clone());
                // The server's items: its components (XEP-0030 §4).
                if req.payload.ns == ns::DISCO_ITEMS {
                    if let IqTarget::Server(_) = &req.target {
                        for m in server.modules.iter() {
                            for item in m.disco_items(server, req.from, "").unwrap_or_default() {
                                query = query.child(item);
                            }
                        }
                    }
                }
                if req.payload.ns == ns::DISCO_INFO {
                    match &req.target {
                        IqTarget::Server(_) => {
                            query = query.child(identity(&SERVER_IDENTITY));
                            let mut features: Vec<&str> = Vec::new();
                            for m in server.modules.iter() {
                                for i in m.identities() {
                                    query = query.child(identity(i));
                                }
                                features.extend(m.features());
                            }
                            features.sort_unstable();
                            features.dedup();
                            for f in features {
                                query = query
                                    .child(Element::new("feature", ns::DISCO_INFO).attr("var", f));
                            }
                            if let Some(form) = contact_addresses(&server.config.contact) {
                                query = query.child(form);
                            }
                        }
                        IqTarget::Account(_) => {
                            // XEP-0030 §3.1: an account answers with its
                            // registered identity, and the modules add
                            // theirs (the PEP service, the archive).
                            query = query.child(identity(&Identity {
                                category: "account",
                                kind: "registered",
                                name: "",
                            }));
                            let mut features: Vec<&str> = vec![ns::DISCO_INFO];
                            for m in server.modules.iter() {
                                for i in m.account_identities() {
                                    query = query.child(identity(i));
                                }
                                features.extend(m.account_features());
                            }
                            features.sort_unstable();
                            features.dedup();
                            for f in features {
                                query = query
                                    .child(Element::new("feature", ns::DISCO_INFO).attr("var", f));
                            }
                        }
                    }
                }
                iq_result(req.iq).child(query)
            }
            .await;
            Some(reply)
        })
    }
}
