//! Entity Time (XEP-0202): the server's clock, in UTC.

use std::time::SystemTime;

use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::stanza::iq_result;

use super::{iq_error, BoxFuture, IqRequest, IqTarget, Module};
use crate::modules::offline::utc_stamp;
use crate::Server;

pub const NS: &str = "urn:xmpp:time";

pub struct Time;

impl Module for Time {
    fn name(&self) -> &'static str {
        "time"
    }

    fn handles(&self, namespace: &str, target: &IqTarget) -> bool {
        namespace == NS && matches!(target, IqTarget::Server(_))
    }

    fn features(&self) -> &'static [&'static str] {
        &[NS]
    }

    fn handle_iq<'a>(
        &'a self,
        _server: &'a Server,
        req: IqRequest<'a>,
    ) -> BoxFuture<'a, Option<Element>> {
        let reply = if req.is_set() {
            iq_error(req.iq, StanzaError::BadRequest, None)
        } else {
            iq_result(req.iq).child(
                Element::new("time", NS)
                    .child(Element::new("tzo", NS).text("+00:00"))
                    .child(Element::new("utc", NS).text(utc_stamp(SystemTime::now()))),
            )
        };
        Box::pin(async move { Some(reply) })
    }
}
