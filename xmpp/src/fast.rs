//! The Hashed Token SASL mechanisms (draft-ietf-kitten-sasl-ht) that
//! FAST (XEP-0484) logs in with: one round trip, and no PBKDF2.
//!
//! The client proves it holds a token the server issued:
//! `initial-response = authcid NUL HMAC(token, "Initiator" || cb-data)`;
//! the server proves it knows the token too with the additional data of
//! its success, `HMAC(token, "Responder" || cb-data)`. `cb-data` is the
//! channel binding the mechanism names (`-EXPR` tls-exporter, `-ENDP`
//! tls-server-end-point), or nothing for `-NONE`.
//!
//! Pure functions: issuing, storing and expiring tokens is the server's.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

use crate::sasl::ChannelBindings;

/// Which channel binding an HT mechanism mixes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HtBinding {
    /// `-EXPR`: tls-exporter (RFC 9266).
    Exporter,
    /// `-ENDP`: tls-server-end-point (RFC 5929).
    EndPoint,
    /// `-NONE`.
    None,
}

/// An HT mechanism; only SHA-256 is defined for FAST so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HtMechanism(pub HtBinding);

impl HtMechanism {
    pub const ALL: [HtMechanism; 3] = [
        HtMechanism(HtBinding::Exporter),
        HtMechanism(HtBinding::EndPoint),
        HtMechanism(HtBinding::None),
    ];

    pub fn name(self) -> &'static str {
        match self.0 {
            HtBinding::Exporter => "HT-SHA-256-EXPR",
            HtBinding::EndPoint => "HT-SHA-256-ENDP",
            HtBinding::None => "HT-SHA-256-NONE",
        }
    }

    pub fn from_name(name: &str) -> Option<HtMechanism> {
        HtMechanism::ALL.into_iter().find(|m| m.name() == name)
    }

    /// The channel-binding data this mechanism needs on a connection
    /// with `cb`: `None` when the connection cannot provide it (then the
    /// mechanism is not offered there).
    pub fn binding_data(self, cb: &ChannelBindings) -> Option<&[u8]> {
        match self.0 {
            HtBinding::Exporter => cb.tls_exporter.as_deref(),
            HtBinding::EndPoint => cb.tls_server_end_point.as_deref(),
            HtBinding::None => Some(&[]),
        }
    }
}

fn hmac(token: &[u8], label: &[u8], cb_data: &[u8]) -> Vec<u8> {
    // HMAC takes keys of any length, so this cannot fail on input.
    let mut m =
        <Hmac<Sha256> as Mac>::new_from_slice(token).expect("HMAC accepts keys of any length");
    m.update(label);
    m.update(cb_data);
    m.finalize().into_bytes().to_vec()
}

/// What the client sends: `authcid NUL initiator-hashed-token`.
pub fn client_initial(authcid: &str, token: &[u8], cb_data: &[u8]) -> Vec<u8> {
    let mut out = authcid.as_bytes().to_vec();
    out.push(0);
    out.extend(hmac(token, b"Initiator", cb_data));
    out
}

/// The server's proof, sent as the success's additional data.
pub fn responder(token: &[u8], cb_data: &[u8]) -> Vec<u8> {
    hmac(token, b"Responder", cb_data)
}

/// The client's initial response split into the authentication identity
/// and its proof; `None` when it is not of that shape.
pub fn parse_initial(input: &[u8]) -> Option<(String, &[u8])> {
    let nul = input.iter().position(|&b| b == 0)?;
    let (user, rest) = input.split_at(nul);
    let proof = rest.get(1..)?;
    let user = std::str::from_utf8(user).ok()?;
    if user.is_empty() || proof.len() != 32 {
        return None;
    }
    Some((user.to_owned(), proof))
}

/// Whether `proof` is the initiator's HMAC for `token` (constant time).
pub fn verify(token: &[u8], cb_data: &[u8], proof: &[u8]) -> bool {
    let want = hmac(token, b"Initiator", cb_data);
    want.ct_eq(proof).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_proof_verifies_with_its_token_and_binding_only() {
        let token = b"secret-token:fast-abc";
        let cb = b"exporter-bytes";
        let initial = client_initial("juliet", token, cb);
        let (user, proof) = parse_initial(&initial).expect("well formed");
        assert_eq!(user, "juliet");
        assert!(verify(token, cb, proof));
        assert!(!verify(b"another token", cb, proof));
        assert!(!verify(token, b"another channel", proof));
        assert!(!verify(token, b"", proof));
    }

    #[test]
    fn the_responder_proof_differs_from_the_initiator_proof() {
        let token = b"t";
        let initial = client_initial("u", token, b"");
        let (_, proof) = parse_initial(&initial).expect("well formed");
        assert_ne!(proof, responder(token, b"").as_slice());
        assert_eq!(responder(token, b"").len(), 32);
    }

    #[test]
    fn malformed_initial_responses_are_refused() {
        assert!(parse_initial(b"no separator").is_none());
        assert!(parse_initial(b"\0aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa").is_none());
        assert!(parse_initial(b"user\0short").is_none());
        let mut bad = b"u\xff\0".to_vec();
        bad.extend([0u8; 32]);
        assert!(parse_initial(&bad).is_none());
    }

    #[test]
    fn names_round_trip_and_bindings_come_from_the_connection() {
        for m in HtMechanism::ALL {
            assert_eq!(HtMechanism::from_name(m.name()), Some(m));
        }
        assert_eq!(HtMechanism::from_name("HT-SHA-256-UNIQ"), None);
        let cb = ChannelBindings {
            tls_exporter: None,
            tls_server_end_point: Some(vec![1, 2]),
        };
        assert!(HtMechanism(HtBinding::Exporter).binding_data(&cb).is_none());
        assert_eq!(
            HtMechanism(HtBinding::EndPoint).binding_data(&cb),
            Some(&[1u8, 2][..])
        );
        assert_eq!(
            HtMechanism(HtBinding::None).binding_data(&cb),
            Some(&[][..])
        );
    }
}
