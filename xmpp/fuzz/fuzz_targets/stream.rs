//! The stream parser and framer, fed in chunks (the first byte picks the
//! chunk size), and the stanza views of every element it yields.
#![no_main]

use libfuzzer_sys::fuzz_target;
use xmpp::stanza::{presence_priority, IqType, MessageType, PresenceType, StanzaKind};
use xmpp::xml::{Event, Limits, StreamParser};

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, rest)) = data.split_first() else {
        return;
    };
    let chunk = usize::from(chunk).max(1);
    let mut p = StreamParser::new(Limits {
        max_stanza_bytes: 64 * 1024,
        max_depth: 32,
        max_attrs: 64,
    });
    for part in rest.chunks(chunk) {
        p.feed(part);
        loop {
            match p.next_event() {
                Ok(Some(Event::Element(e))) => {
                    let _ = StanzaKind::of(&e);
                    let _ = MessageType::of(&e);
                    let _ = IqType::of(&e);
                    let _ = PresenceType::of(&e);
                    let _ = presence_priority(&e);
                    let _ = xmpp::stanza::error_reply(&e, xmpp::error::StanzaError::BadRequest, None);
                    // What we serialise parses again, on its own.
                    let s = e.to_string_in(xmpp::stanza::ns::CLIENT);
                    if let Err(err) = xmpp::xml::parse_element(&s, xmpp::stanza::ns::CLIENT) {
                        panic!("serialised element does not parse: {err}: {s}");
                    }
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
                Err(_) => return,
            }
        }
        p.release_memory();
    }
});
