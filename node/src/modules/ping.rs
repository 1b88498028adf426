//! XMPP Ping (XEP-0199): the server answers pings to itself and, on the
//! user's behalf, to the user's bare JID.

use xmpp::element::Element;
use xmpp::stanza::{iq_result, ns};

use super::{BoxFuture, IqRequest, IqTarget, Module};
use crate::Server;

pub struct Ping;

impl Module for Ping {
    fn name(&self) -> &'static str {
        "ping"
    }

    fn handles(&self, namespace: &str, _target: &IqTarget) -> bool {
        namespace == ns::PING
    }

    fn features(&self) -> &'static [&'static str] {
        &[ns::PING]
    }

    fn handle_iq<'a>(
        &'a self,
        _server: &'a Server,
        req: IqRequest<'a>,
    ) -> BoxFuture<'a, Option<Element>> {
        let reply = iq_result(req.iq);
        Box::pin(async move { Some(reply) })
    }
}
