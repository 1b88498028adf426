//! Test support for the end-to-end tests in `tests/tests/`: start a real
//! `xmpp-node` process ([`node`]) and talk XMPP to it over real TLS
//! ([`client`]).

pub mod client;
pub mod load;
pub mod node;
