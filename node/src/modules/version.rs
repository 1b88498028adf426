//! Software Version (XEP-0092): name and version of the server. The OS is
//! left out on purpose (XEP-0092 §4 lets a server withhold it).

use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::stanza::{error_reply, iq_result, ns};

use super::{BoxFuture, IqRequest, IqTarget, Module};
use crate::Server;

pub struct Version;

impl Module for Version {
    fn name(&self) -> &'static str {
        "version"
    }

    fn handles(&self, namespace: &str, target: &IqTarget) -> bool {
        namespace == ns::VERSION && matches!(target, IqTarget::Server(_))
    }

    fn features(&self) -> &'static [&'static str] {
        &[ns::VERSION]
    }

    fn handle_iq<'a>(
        &'a self,
        _server: &'a Server,
        req: IqRequest<'a>,
    ) -> BoxFuture<'a, Option<Element>> {
        let reply = if req.is_set() {
            error_reply(req.iq, StanzaError::BadRequest, None).unwrap_or_else(|| iq_result(req.iq))
        } else {
            iq_result(req.iq).child(
                Element::new("query", ns::VERSION)
                    .child(Element::new("name", ns::VERSION).text("xmpp-node"))
                    .child(Element::new("version", ns::VERSION).text(env!("CARGO_PKG_VERSION"))),
            )
        };
        Box::pin(async move { Some(reply) })
    }
}
