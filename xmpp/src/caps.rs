//! Entity capabilities (XEP-0115): the verification string of a disco#info
//! answer, so a `ver` seen in presence can be trusted once, for everyone
//! who announces it.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use sha1::{Digest as _, Sha1};

use crate::element::Element;
use crate::forms::{self, Submitted};

pub const NS: &str = "http://jabber.org/protocol/caps";
const DISCO_INFO: &str = "http://jabber.org/protocol/disco#info";

/// A `<c/>` element of presence: `node`, `ver`, `hash`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caps {
    pub node: String,
    pub ver: String,
    pub hash: String,
}

impl Caps {
    /// The capabilities a presence stanza announces, if any.
    pub fn of(presence: &Element) -> Option<Caps> {
        let c = presence.get_child("c", NS)?;
        Some(Caps {
            node: c.get_attr("node").unwrap_or_default().to_owned(),
            ver: c.get_attr("ver")?.to_owned(),
            hash: c.get_attr("hash").unwrap_or("sha-1").to_owned(),
        })
    }
}

/// A form's fields: `var` and its values.
type Fields = Vec<(String, Vec<String>)>;

/// XEP-0115 §5.1: the string hashed into `ver`, from a disco#info `<query/>`.
pub fn input(query: &Element) -> String {
    let mut ids: Vec<String> = query
        .elements()
        .filter(|e| e.is("identity", DISCO_INFO))
        .map(|e| {
            format!(
                "{}/{}/{}/{}<",
                e.get_attr("category").unwrap_or_default(),
                e.get_attr("type").unwrap_or_default(),
                e.get_attr("xml:lang").unwrap_or_default(),
                e.get_attr("name").unwrap_or_default()
            )
        })
        .collect();
    ids.sort();
    let mut features = features(query);
    features.sort();
    let mut s: String = ids.concat();
    for f in &features {
        s.push_str(f);
        s.push('<');
    }
    let mut extended: Vec<(String, Fields)> = query
        .elements()
        .filter(|e| e.is("x", forms::NS))
        .filter_map(Submitted::read)
        .filter_map(|f| {
            let ty = f.form_type()?.to_owned();
            let mut fields: Fields = f
                .fields
                .into_iter()
                .filter(|(v, _)| v != "FORM_TYPE")
                .map(|(v, mut values)| {
                    values.sort();
                    (v, values)
                })
                .collect();
            fields.sort();
            Some((ty, fields))
        })
        .collect();
    extended.sort();
    for (ty, fields) in extended {
        s.push_str(&ty);
        s.push('<');
        for (var, values) in fields {
            s.push_str(&var);
            s.push('<');
            for v in values {
                s.push_str(&v);
                s.push('<');
            }
        }
    }
    s
}

/// The features a disco#info `<query/>` lists.
pub fn features(query: &Element) -> Vec<String> {
    query
        .elements()
        .filter(|e| e.is("feature", DISCO_INFO))
        .filter_map(|e| e.get_attr("var").map(str::to_owned))
        .collect()
}

/// The `ver` of a disco#info answer under `hash` (`sha-1` or `sha-256`).
pub fn ver(hash: &str, query: &Element) -> Option<String> {
    let s = input(query);
    match hash {
        "sha-1" => Some(B64.encode(Sha1::digest(s.as_bytes()))),
        "sha-256" => Some(B64.encode(sha2::Sha256::digest(s.as_bytes()))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn feature(v: &str) -> Element {
        Element::new("feature", DISCO_INFO).attr("var", v)
    }

    #[test]
    fn the_simple_example_of_xep_0115() {
        // XEP-0115 §5.2.
        let q = Element::new("query", DISCO_INFO)
            .child(
                Element::new("identity", DISCO_INFO)
                    .attr("category", "client")
                    .attr("type", "pc")
                    .attr("name", "Exodus 0.9.1"),
            )
            .child(feature("http://jabber.org/protocol/caps"))
            .child(feature("http://jabber.org/protocol/disco#info"))
            .child(feature("http://jabber.org/protocol/disco#items"))
            .child(feature("http://jabber.org/protocol/muc"));
        assert_eq!(
            ver("sha-1", &q).as_deref(),
            Some("QgayPKawpkPSDYmwT/WM94uAlu0=")
        );
        assert_eq!(ver("md5", &q), None);
    }

    #[test]
    fn the_complex_example_of_xep_0115() {
        // XEP-0115 §5.3: two identities, an extended form.
        let id = |lang: &str, name: &str| {
            Element::new("identity", DISCO_INFO)
                .attr("xml:lang", lang)
                .attr("category", "client")
                .attr("name", name)
                .attr("type", "pc")
        };
        let field = |var: &str, values: &[&str]| {
            values
                .iter()
                .fold(Element::new("field", forms::NS).attr("var", var), |f, v| {
                    f.child(Element::new("value", forms::NS).text(*v))
                })
        };
        let q = Element::new("query", DISCO_INFO)
            .child(id("en", "Psi 0.11"))
            .child(id("el", "Ψ 0.11"))
            .child(feature("http://jabber.org/protocol/caps"))
            .child(feature("http://jabber.org/protocol/disco#info"))
            .child(feature("http://jabber.org/protocol/disco#items"))
            .child(feature("http://jabber.org/protocol/muc"))
            .child(
                Element::new("x", forms::NS)
                    .attr("type", "result")
                    .child(field("FORM_TYPE", &["urn:xmpp:dataforms:softwareinfo"]))
                    .child(field("ip_version", &["ipv4", "ipv6"]))
                    .child(field("os", &["Mac"]))
                    .child(field("os_version", &["10.5.1"]))
                    .child(field("software", &["Psi"]))
                    .child(field("software_version", &["0.11"])),
            );
        assert_eq!(
            ver("sha-1", &q).as_deref(),
            Some("q07IKJEyjvHSyhy//CH0CxmKi8w=")
        );
    }
}
