//! Features as modules, the way Prosody's `mod_*` and ejabberd's `gen_mod`
//! work: each module declares the IQ namespaces it answers, the disco
//! features and identities it adds, and the hooks it wants. The router
//! knows no feature by name; disco#info is assembled from these
//! declarations, never hand-listed.
//!
//! A new XEP is a new file here plus one line in [`all`].

mod adhoc;
pub(crate) mod blocking;
pub(crate) mod carbons;
mod disco;
mod extdisco;
mod last;
pub(crate) mod mam;
pub(crate) mod muc;
pub(crate) mod offline;
pub(crate) mod pep;
mod ping;
pub mod presence;
mod private;
mod push;
pub mod register;
pub mod roster;
mod session;
mod time;
pub(crate) mod upload;
mod vcard;
mod version;

pub use roster::ROSTERVER_FEATURE;

use std::future::Future;
use std::pin::Pin;

use xmpp::element::Element;
use xmpp::error::StanzaError;
use xmpp::jid::{BareJid, FullJid, Jid};

use crate::Server;

pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Whom an IQ request is addressed to (RFC 6120 §10.3, §10.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IqTarget {
    /// The server itself: `to` is a served domain.
    Server(String),
    /// An account, answered by the server on its behalf: `to` is a bare JID
    /// of a local user, or absent.
    Account(BareJid),
}

/// An IQ request of type get or set, with the sender's true full JID.
pub struct IqRequest<'a> {
    pub iq: &'a Element,
    pub payload: &'a Element,
    pub from: &'a FullJid,
    pub target: IqTarget,
}

impl IqRequest<'_> {
    pub fn is_set(&self) -> bool {
        self.iq.get_attr("type") == Some("set")
    }

    /// Addressed to the sender's own account (its bare JID, or no `to`).
    pub fn to_own_account(&self) -> bool {
        matches!(&self.target, IqTarget::Account(t) if t == self.from.bare())
    }
}

/// The error reply to an IQ get or set (which always has one).
pub(crate) fn iq_error(iq: &Element, condition: StanzaError, text: Option<&str>) -> Element {
    xmpp::stanza::error_reply(iq, condition, text).unwrap_or_else(|| xmpp::stanza::iq_result(iq))
}

/// A module's verdict on a stanza about to be routed.
pub enum RouteCheck {
    Pass,
    /// Drop silently.
    Drop,
    /// Answer the sender with this error (plus an application-specific condition).
    Refuse(StanzaError, Option<Element>),
}

/// A disco identity (XEP-0030 §3.1).
pub struct Identity {
    pub category: &'static str,
    pub kind: &'static str,
    pub name: &'static str,
}

pub trait Module: Send + Sync {
    fn name(&self) -> &'static str;

    /// Payload namespaces this module answers, and for which targets.
    fn handles(&self, _ns: &str, _target: &IqTarget) -> bool {
        false
    }

    /// Disco#info features this module adds to the server.
    fn features(&self) -> &'static [&'static str] {
        &[]
    }

    fn identities(&self) -> &'static [Identity] {
        &[]
    }

    /// Disco#info features of every account (a user's bare JID), such as
    /// its archive or its PEP service.
    fn account_features(&self) -> &'static [&'static str] {
        &[]
    }

    /// Disco#info identities of every account.
    fn account_identities(&self) -> &'static [Identity] {
        &[]
    }

    /// Answers an IQ request this module `handles`; returns the reply
    /// (a result or an error), which the router sends back, or `None` when
    /// the module has sent its answer itself.
    fn handle_iq<'a>(
        &'a self,
        _server: &'a Server,
        req: IqRequest<'a>,
    ) -> BoxFuture<'a, Option<Element>> {
        let reply = xmpp::stanza::error_reply(req.iq, StanzaError::ServiceUnavailable, None);
        Box::pin(async move { reply })
    }

    /// Hook: a message reached these resources of a local user.
    fn on_message_delivered(
        &self,
        _server: &Server,
        _message: &Element,
        _user: &BareJid,
        _resources: &[&str],
    ) {
    }

    /// Hook: a message is about to be routed for the first time (routing
    /// checks passed; `from` is its true sender, local or remote, `to` its
    /// recipient). A module may add to it (a stanza id) and record it (an
    /// archive) before it goes anywhere.
    fn before_message_routed<'a>(
        &'a self,
        _server: &'a Server,
        _message: &'a mut Element,
        _from: &'a Jid,
        _to: &'a Jid,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Hook: a presence stanza is being routed for the first time, from its
    /// true sender (a local session's directed presence, or any presence
    /// from another domain).
    fn on_presence_routed(&self, _server: &Server, _stanza: &Element, _from: &Jid, _to: &Jid) {}

    /// Hook: a session became unavailable (an `unavailable` broadcast, or
    /// the end of an available session), with its status text.
    fn on_unavailable<'a>(
        &'a self,
        _server: &'a Server,
        _session: &'a FullJid,
        _status: Option<String>,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Disco#items of a node of the server (XEP-0030 §4.2), such as the
    /// ad-hoc command list; `None` when the node is not this module's.
    fn disco_items(&self, _server: &Server, _from: &FullJid, _node: &str) -> Option<Vec<Element>> {
        None
    }

    /// Hook: a message for `user` went to offline storage.
    fn on_offline_stored(&self, _server: &Server, _user: &BareJid, _message: &Element) {}

    /// Hook: a message reached a session whose connection is gone and
    /// that waits for its client to resume (XEP-0198).
    fn on_message_held(&self, _server: &Server, _session: &FullJid, _xml: &str) {}

    /// Whether this module is the component serving `domain` (XEP-0045's
    /// `conference.<vhost>`): the router hands it every stanza for it.
    fn owns_domain(&self, _server: &Server, _domain: &str) -> bool {
        false
    }

    /// A stanza for a domain this module owns, with its true sender.
    fn handle_component<'a>(
        &'a self,
        _server: &'a Server,
        _stanza: Element,
        _from: Jid,
        _to: Jid,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Hook: an IQ result or error addressed to the server or an account.
    /// `true` when it answered a request of this module's (and the module
    /// has done what the answer calls for).
    fn on_iq_response<'a>(&'a self, _server: &'a Server, _iq: &'a Element) -> BoxFuture<'a, bool> {
        Box::pin(async { false })
    }

    /// Hook: an entry applied on this node had this effect (every node of
    /// the cluster sees every effect, in log order).
    fn on_applied(&self, _server: &Server, _effect: &crate::cluster::state_machine::Effect) {}

    /// Hook: a local session sent a message (after routing checks passed).
    fn on_message_sent(&self, _server: &Server, _from: &FullJid, _message: &Element) {}

    /// Hook: may a stanza from `from` go to `to`? Asked by the router for
    /// every stanza it carries.
    fn check_route(
        &self,
        _server: &Server,
        _stanza: &Element,
        _from: &Jid,
        _to: &Jid,
    ) -> RouteCheck {
        RouteCheck::Pass
    }

    /// Hook: a session sent available presence (`initial` for the first).
    fn on_presence_available<'a>(
        &'a self,
        _server: &'a Server,
        _session: &'a FullJid,
        _initial: bool,
    ) -> BoxFuture<'a, ()> {
        Box::pin(async {})
    }

    /// Hook: a `chat`/`normal` message to an existing user has no available
    /// resource. `Some(Ok)` when the module took it, `Some(Err(reply))` when
    /// it refused it with that error reply, `None` when it does not care.
    fn on_message_offline<'a>(
        &'a self,
        _server: &'a Server,
        _to: &'a BareJid,
        _message: &'a Element,
    ) -> BoxFuture<'a, Option<Result<(), Element>>> {
        Box::pin(async { None })
    }
}

/// The module list: the only place features are registered; those an
/// operator can turn off are left out when the config says so.
/// The server's disco#items entry for a component on
/// `<subdomain>.<vhost>`, offered to the vhost's own users (XEP-0030).
pub fn component_item(
    server: &Server,
    from: &FullJid,
    node: &str,
    subdomain: &str,
    name: &str,
) -> Option<Vec<Element>> {
    if !node.is_empty() || !server.config.is_local_domain(from.domain()) {
        return None;
    }
    let service = format!("{subdomain}.{}", from.domain());
    Some(vec![Element::new("item", xmpp::stanza::ns::DISCO_ITEMS)
        .attr("jid", service)
        .attr("name", name)])
}

pub fn all(config: &crate::config::Config) -> Vec<Box<dyn Module>> {
    let mut modules: Vec<Box<dyn Module>> = vec![
        Box::new(disco::Disco),
        Box::new(ping::Ping),
        Box::new(version::Version),
        Box::new(offline::Offline),
        Box::new(register::Register),
        Box::new(roster::Roster),
        Box::new(presence::Presence),
        Box::new(blocking::Blocking),
        Box::new(vcard::VCard),
        Box::new(private::Private),
        Box::new(session::LegacySession),
        Box::new(carbons::Carbons),
        Box::new(time::Time),
        Box::new(last::Last),
        Box::new(adhoc::Adhoc),
    ];
    if !config.extdisco.is_empty() {
        modules.push(Box::new(extdisco::ExtDisco));
    }
    if config.mam.enabled {
        modules.push(Box::new(mam::Mam::default()));
    }
    if config.pep.enabled {
        modules.push(Box::new(pep::Pep::default()));
    }
    if config.muc.enabled {
        modules.push(Box::new(muc::Muc::default()));
    }
    if config.push.enabled {
        modules.push(Box::new(push::Push));
    }
    // Files go up and down through the HTTP listeners.
    if config.upload.enabled && config.http.enabled {
        modules.push(Box::new(upload::Upload));
    }
    modules
}
