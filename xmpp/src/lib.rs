//! The XMPP protocol core: everything about the protocol that can be said
//! without a socket, a clock, a config file or storage.
//!
//! - [`xml`]: the incremental stream parser (bytes in, whole elements out).
//! - [`element`]: the owned element tree and its serializer.
//! - [`stanza`]: typed views over message/presence/iq, namespaces, error replies.
//! - [`caps`]: entity capabilities (XEP-0115) verification strings.
//! - [`forms`]: data forms (XEP-0004), read and built.
//! - [`error`]: stream errors (RFC 6120 §4.9) and stanza errors (§8.3).
//! - [`jid`]: bare and full JIDs with stringprep normalisation.
//! - [`roster`]: the presence subscription state machine (RFC 6121 §3).
//! - [`sasl`]: SCRAM (with channel binding) and PLAIN as pure state machines.
//! - [`fast`]: the Hashed Token mechanisms of FAST (XEP-0484).

pub mod caps;
pub mod element;
pub mod error;
pub mod fast;
pub mod forms;
pub mod jid;
pub mod roster;
pub mod sasl;
pub mod stanza;
pub mod xml;
