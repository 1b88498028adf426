//! JID parsing (RFC 7622 with the stringprep profiles): never panics, and
//! what parses prints as something that parses to the same JID.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xmpp::jid::Jid;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(j) = Jid::parse(s) {
        let printed = j.to_string();
        let again = Jid::parse(&printed).expect("a printed JID parses");
        assert_eq!(again, j, "{s:?} -> {printed:?}");
    }
});
