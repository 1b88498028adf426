//! Federation with other XMPP domains.
//!
//! **Not built yet.** This crate is a placeholder so that the workspace has
//! the shape DESIGN.md draws; federation (SRV lookup, TLS, dialback
//! XEP-0220, SASL EXTERNAL, the outbound pool) arrives with its own issue.
//! Until then the node answers stanzas for remote domains with
//! `remote-server-not-found`, and `--s2s-addr` is parsed but nothing listens.
//!
//! The boundary it will keep: `s2s` knows nothing of Raft or sessions. It
//! hands inbound stanzas to the node through [`InboundHandler`] and takes
//! outbound stanzas through a handle.

use xmpp::element::Element;

/// What the node implements to receive stanzas that arrive over s2s streams.
pub trait InboundHandler: Send + Sync + 'static {
    /// A stanza from a remote domain, already authenticated for its `from` domain.
    fn inbound(&self, stanza: Element);
}
