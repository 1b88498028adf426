//! Stream parser throughput on a realistic mix of client stanzas, fed in
//! 4 KiB chunks the way the connection read loop hands them over.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use xmpp::xml::{Event, Limits, StreamParser};

const HEADER: &str = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
    xmlns:stream='http://etherx.jabber.org/streams' to='example.com' version='1.0' xml:lang='en'>";

const WORDS: &[&str] = &[
    "hello", "are", "you", "coming", "tonight", "?", "the", "meeting", "moved", "to", "room", "4",
    "héllo", "☃", "😀", "ok", "see", "you", "there", "&amp;", "&lt;3", "thanks",
];

/// Deterministic pseudo-random numbers, so every run parses the same input.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self, bound: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((self.0 >> 33) as usize) % bound
    }
}

fn body(rng: &mut Lcg) -> String {
    // Mostly short chat lines, occasionally a long paste.
    let words = match rng.next(10) {
        0 => 200 + rng.next(400),
        1..=3 => 20 + rng.next(40),
        _ => 1 + rng.next(12),
    };
    let mut s = String::new();
    for i in 0..words {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(WORDS[rng.next(WORDS.len())]);
    }
    s
}

fn stanza(rng: &mut Lcg, n: usize) -> String {
    match rng.next(10) {
        0..=4 => format!(
            "<message from='juliet@example.com/balcony' to='romeo@example.net' type='chat' \
             id='msg{n}'><body>{}</body><active xmlns='http://jabber.org/protocol/chatstates'/>\
             <request xmlns='urn:xmpp:receipts'/></message>",
            body(rng)
        ),
        5..=6 => format!(
            "<presence id='p{n}'><show>away</show><status>{}</status><priority>5</priority>\
             <c xmlns='http://jabber.org/protocol/caps' hash='sha-1' \
             node='http://example.org/client' ver='QgayPKawpkPSDYmwT/WM94uAlu0='/></presence>",
            body(rng)
        ),
        7 => format!(
            "<iq type='get' id='ping{n}' to='example.com'><ping xmlns='urn:xmpp:ping'/></iq>"
        ),
        8 => format!(
            "<iq type='get' id='disco{n}' to='example.com'>\
             <query xmlns='http://jabber.org/protocol/disco#info' node='x&amp;y'/></iq>"
        ),
        _ => {
            let mut s = format!("<iq type='set' id='roster{n}'><query xmlns='jabber:iq:roster'>");
            for i in 0..1 + rng.next(4) {
                s.push_str(&format!(
                    "<item jid='friend{i}@example.net' name='Friend &quot;{i}&quot;' \
                     subscription='both'><group>Friends</group></item>"
                ));
            }
            s.push_str("</query></iq>");
            s
        }
    }
}

/// About 1 MB of stream after the header, stanzas separated by occasional keepalives.
fn generate() -> (String, usize) {
    let mut rng = Lcg(42);
    let mut s = String::from(HEADER);
    let mut count = 0;
    while s.len() < 1024 * 1024 {
        s.push_str(&stanza(&mut rng, count));
        if rng.next(8) == 0 {
            s.push(' ');
        }
        count += 1;
    }
    (s, count)
}

fn parse(input: &[u8]) -> usize {
    let mut parser = StreamParser::new(Limits::default());
    let mut elements = 0;
    for chunk in input.chunks(4096) {
        parser.feed(chunk);
        while let Some(event) = parser.next_event().expect("valid stream") {
            if let Event::Element(e) = event {
                black_box(&e);
                elements += 1;
            }
        }
    }
    elements
}

fn bench_parser(c: &mut Criterion) {
    let (input, count) = generate();
    assert_eq!(parse(input.as_bytes()), count);
    let mut group = c.benchmark_group("stream_parser");
    group.throughput(Throughput::Bytes(input.len() as u64));
    group.bench_function("mixed_stanzas_4k_chunks", |b| {
        b.iter(|| parse(black_box(input.as_bytes())))
    });
    group.finish();
}

criterion_group!(benches, bench_parser);
criterion_main!(benches);
