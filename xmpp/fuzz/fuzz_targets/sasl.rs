//! The SASL server (PLAIN, SCRAM-SHA-1/256 with and without -PLUS, the
//! GS2 header): arbitrary client messages never panic. The input is split
//! at the first 0xff byte into the first and the final client message.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xmpp::sasl::{ChannelBindings, HashAlg, Mechanism, ScramCredentials, ServerSession, Step};

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    let mech = match which % 5 {
        0 => Mechanism::Plain,
        1 => Mechanism::Scram(HashAlg::Sha1),
        2 => Mechanism::Scram(HashAlg::Sha256),
        3 => Mechanism::ScramPlus(HashAlg::Sha256),
        _ => Mechanism::ScramPlus(HashAlg::Sha1),
    };
    let (first, last) = match rest.iter().position(|&b| b == 0xff) {
        Some(i) => (&rest[..i], &rest[i + 1..]),
        None => (rest, &[][..]),
    };
    let cb = ChannelBindings {
        tls_exporter: Some(vec![7; 32]),
        tls_server_end_point: Some(vec![9; 32]),
    };
    // Few iterations: the fuzzer should spend its time on parsing.
    let lookup = |_: &str, h: HashAlg| ScramCredentials::derive(h, "pencil", b"salt", 1).ok();
    let mut s = ServerSession::new(mech, cb, which & 0x80 != 0, "servernonce123456".into());
    if let Step::Challenge(_) = s.step(first, &lookup) {
        let _ = s.step(last, &lookup);
    }
});
