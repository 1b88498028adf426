//! Test support: start a real `xmpp-node`, and a small XMPP client over real TLS.
