//! The legacy session establishment IQ (RFC 3921 §3, dropped by RFC 6121):
//! clients that still send it get an empty result, a no-op, as the
//! `<session><optional/></session>` stream feature promises.

use xmpp::element::Element;
use xmpp::stanza::{iq_result, ns};

use super::{BoxFuture, IqRequest, IqTarget, Module};
use crate::Server;

pub struct LegacySession;

impl Module for LegacySession {
    fn name(&self) -> &'static str {
        "session"
    }

    fn handles(&self, namespace: &str, _target: &IqTarget) -> bool {
        namespace == ns::SESSION
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
