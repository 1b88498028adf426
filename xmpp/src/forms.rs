//! Data forms (XEP-0004) as far as the server needs them: reading a
//! submitted form's fields and building a form to send.

use crate::element::Element;

pub const NS: &str = "jabber:x:data";

/// A submitted form: each field's `var` with its values, in order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Submitted {
    pub fields: Vec<(String, Vec<String>)>,
}

impl Submitted {
    /// Reads `<x xmlns='jabber:x:data'>`; `None` if `x` is not a form.
    pub fn read(x: &Element) -> Option<Submitted> {
        if !x.is("x", NS) {
            return None;
        }
        let fields = x
            .elements()
            .filter(|f| f.is("field", NS))
            .filter_map(|f| {
                let var = f.get_attr("var")?.to_owned();
                let values = f
                    .elements()
                    .filter(|v| v.is("value", NS))
                    .map(Element::text_content)
                    .collect();
                Some((var, values))
            })
            .collect();
        Some(Submitted { fields })
    }

    /// The first value of a field.
    pub fn value(&self, var: &str) -> Option<&str> {
        self.values(var).first().map(String::as_str)
    }

    /// All values of a field (none when it is absent).
    pub fn values(&self, var: &str) -> &[String] {
        self.fields
            .iter()
            .find(|(v, _)| v == var)
            .map_or(&[], |(_, values)| values.as_slice())
    }

    /// The hidden `FORM_TYPE` field (XEP-0068).
    pub fn form_type(&self) -> Option<&str> {
        self.value("FORM_TYPE")
    }

    /// Fields other than `FORM_TYPE`.
    pub fn vars(&self) -> impl Iterator<Item = &str> {
        self.fields
            .iter()
            .map(|(v, _)| v.as_str())
            .filter(|v| *v != "FORM_TYPE")
    }
}

/// A field of a form being built.
pub struct Field {
    pub var: String,
    pub kind: &'static str,
    pub label: Option<String>,
    pub values: Vec<String>,
}

impl Field {
    pub fn new(var: &str, kind: &'static str) -> Field {
        Field {
            var: var.to_owned(),
            kind,
            label: None,
            values: Vec::new(),
        }
    }

    pub fn label(mut self, label: &str) -> Field {
        self.label = Some(label.to_owned());
        self
    }

    pub fn value(mut self, value: impl Into<String>) -> Field {
        self.values.push(value.into());
        self
    }
}

/// `<x xmlns='jabber:x:data' type=kind>` with a hidden `FORM_TYPE` first
/// (when given) and the fields.
pub fn build(kind: &str, form_type: Option<&str>, fields: Vec<Field>) -> Element {
    let mut x = Element::new("x", NS).attr("type", kind);
    if let Some(t) = form_type {
        x = x.child(
            Element::new("field", NS)
                .attr("var", "FORM_TYPE")
                .attr("type", "hidden")
                .child(Element::new("value", NS).text(t)),
        );
    }
    for f in fields {
        let mut e = Element::new("field", NS)
            .attr("var", f.var.as_str())
            .attr("type", f.kind);
        if let Some(l) = f.label {
            e = e.attr("label", l);
        }
        for v in f.values {
            e = e.child(Element::new("value", NS).text(v));
        }
        x = x.child(e);
    }
    x
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_built_form_reads_back() {
        let x = build(
            "submit",
            Some("urn:xmpp:mam:2"),
            vec![
                Field::new("with", "jid-single").value("juliet@capulet.lit"),
                Field::new("ids", "text-multi").value("a").value("b"),
            ],
        );
        let s = Submitted::read(&x).expect("a form");
        assert_eq!(s.form_type(), Some("urn:xmpp:mam:2"));
        assert_eq!(s.value("with"), Some("juliet@capulet.lit"));
        assert_eq!(s.values("ids"), ["a", "b"]);
        assert!(s.values("start").is_empty());
        assert_eq!(s.vars().collect::<Vec<_>>(), ["with", "ids"]);
        assert!(Submitted::read(&Element::new("x", "other")).is_none());
    }
}
