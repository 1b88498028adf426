//! Test support for the end-to-end tests in `tests/tests/`: start a real
//! `xmpp-node` process ([`node`]) and talk XMPP to it over real TLS
//! ([`client`]); and the `xmpp-load` load generator ([`load`]).

pub mod checker;
pub mod client;
pub mod dns;
pub mod ejabberd;
pub mod faultnet;
pub mod hosts;
pub mod http;
pub mod load;
pub mod node;
pub mod prosody;
pub mod tls;
