//! A small owned element tree and its serializer.
//!
//! Elements carry their *resolved* namespace, never a prefix: the parser
//! resolves prefixes against the declarations in scope, and the serializer
//! writes an `xmlns='…'` wherever an element's namespace differs from its
//! parent's. Attributes keep their qualified name (`xml:lang`, or `p:attr`
//! together with the `xmlns:p` declaration they came with).

/// A child of an element: another element or character data (unescaped).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Node {
    Element(Element),
    Text(String),
}

/// An XML element with its resolved namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    /// Local name, without prefix.
    pub name: String,
    /// Resolved namespace URI (empty when none is in scope).
    pub ns: String,
    /// Attributes in document order, by qualified name, values unescaped.
    /// Never contains the default `xmlns` declaration (that is `ns`).
    pub attrs: Vec<(String, String)>,
    pub children: Vec<Node>,
}

impl Element {
    pub fn new(name: impl Into<String>, ns: impl Into<String>) -> Self {
        Element {
            name: name.into(),
            ns: ns.into(),
            attrs: Vec::new(),
            children: Vec::new(),
        }
    }

    /// Builder: set an attribute.
    pub fn attr(mut self, name: &str, value: impl Into<String>) -> Self {
        self.set_attr(name, value);
        self
    }

    /// Builder: append a child element.
    pub fn child(mut self, child: Element) -> Self {
        self.children.push(Node::Element(child));
        self
    }

    /// Builder: append character data.
    pub fn text(mut self, text: impl Into<String>) -> Self {
        self.children.push(Node::Text(text.into()));
        self
    }

    pub fn is(&self, name: &str, ns: &str) -> bool {
        self.name == name && self.ns == ns
    }

    pub fn get_attr(&self, name: &str) -> Option<&str> {
        self.attrs
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn set_attr(&mut self, name: &str, value: impl Into<String>) {
        let value = value.into();
        match self.attrs.iter_mut().find(|(k, _)| k == name) {
            Some((_, v)) => *v = value,
            None => self.attrs.push((name.to_owned(), value)),
        }
    }

    pub fn remove_attr(&mut self, name: &str) -> Option<String> {
        let pos = self.attrs.iter().position(|(k, _)| k == name)?;
        Some(self.attrs.remove(pos).1)
    }

    /// Child elements, in order.
    pub fn elements(&self) -> impl Iterator<Item = &Element> {
        self.children.iter().filter_map(|n| match n {
            Node::Element(e) => Some(e),
            Node::Text(_) => None,
        })
    }

    /// The first child element with this name and namespace.
    pub fn get_child(&self, name: &str, ns: &str) -> Option<&Element> {
        self.elements().find(|e| e.is(name, ns))
    }

    pub fn get_child_mut(&mut self, name: &str, ns: &str) -> Option<&mut Element> {
        self.children.iter_mut().find_map(|n| match n {
            Node::Element(e) if e.is(name, ns) => Some(e),
            _ => None,
        })
    }

    pub fn has_child(&self, name: &str, ns: &str) -> bool {
        self.get_child(name, ns).is_some()
    }

    /// Removes every child element with this name and namespace.
    pub fn remove_children(&mut self, name: &str, ns: &str) {
        self.children
            .retain(|n| !matches!(n, Node::Element(e) if e.is(name, ns)));
    }

    /// The concatenated character data directly inside this element.
    pub fn text_content(&self) -> String {
        let mut s = String::new();
        for n in &self.children {
            if let Node::Text(t) = n {
                s.push_str(t);
            }
        }
        s
    }

    /// The text of a child element, if the child exists.
    pub fn child_text(&self, name: &str, ns: &str) -> Option<String> {
        self.get_child(name, ns).map(Element::text_content)
    }

    /// Serializes as a top-level element of a stream whose default namespace
    /// is `parent_ns` (e.g. `jabber:client`): no `xmlns` is written for
    /// elements in that namespace.
    pub fn write_to(&self, out: &mut String, parent_ns: &str) {
        out.push('<');
        out.push_str(&self.name);
        if self.ns != parent_ns {
            out.push_str(" xmlns='");
            escape_into(out, &self.ns, true);
            out.push('\'');
        }
        for (k, v) in &self.attrs {
            out.push(' ');
            out.push_str(k);
            out.push_str("='");
            escape_into(out, v, true);
            out.push('\'');
        }
        if self.children.is_empty() {
            out.push_str("/>");
            return;
        }
        out.push('>');
        for n in &self.children {
            match n {
                Node::Element(e) => e.write_to(out, &self.ns),
                Node::Text(t) => escape_into(out, t, false),
            }
        }
        out.push_str("</");
        out.push_str(&self.name);
        out.push('>');
    }

    /// Serializes with a given default namespace in scope (see [`Element::write_to`]).
    pub fn to_string_in(&self, parent_ns: &str) -> String {
        let mut s = String::with_capacity(128);
        self.write_to(&mut s, parent_ns);
        s
    }
}

impl std::fmt::Display for Element {
    /// Standalone serialization: the root always declares its namespace.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_string_in(""))
    }
}

/// Escapes character data or an attribute value (single-quoted) into `out`.
pub fn escape_into(out: &mut String, s: &str, attr: bool) {
    let mut last = 0;
    for (i, b) in s.bytes().enumerate() {
        let rep = match b {
            b'<' => "&lt;",
            b'>' => "&gt;",
            b'&' => "&amp;",
            b'\'' if attr => "&apos;",
            b'"' if attr => "&quot;",
            _ => continue,
        };
        out.push_str(&s[last..i]);
        out.push_str(rep);
        last = i + 1;
    }
    out.push_str(&s[last..]);
}

/// Escapes a string for use in XML (attribute-safe).
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    escape_into(&mut out, s, true);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializer_escapes_text_and_attributes() {
        let e = Element::new("message", "jabber:client")
            .attr("to", "a'b\"c@x")
            .child(Element::new("body", "jabber:client").text("1 < 2 & 3 > 2"));
        assert_eq!(
            e.to_string_in("jabber:client"),
            "<message to='a&apos;b&quot;c@x'><body>1 &lt; 2 &amp; 3 &gt; 2</body></message>"
        );
    }

    #[test]
    fn serializer_declares_namespace_where_it_changes() {
        let e = Element::new("iq", "jabber:client")
            .attr("type", "result")
            .child(
                Element::new("query", "jabber:iq:version")
                    .child(Element::new("name", "jabber:iq:version").text("x")),
            );
        assert_eq!(
            e.to_string_in("jabber:client"),
            "<iq type='result'><query xmlns='jabber:iq:version'><name>x</name></query></iq>"
        );
        assert!(e.to_string().starts_with("<iq xmlns='jabber:client'"));
    }

    #[test]
    fn attribute_helpers() {
        let mut e = Element::new("presence", "jabber:client").attr("from", "a@b");
        e.set_attr("from", "c@d");
        assert_eq!(e.get_attr("from"), Some("c@d"));
        assert_eq!(e.remove_attr("from").as_deref(), Some("c@d"));
        assert_eq!(e.get_attr("from"), None);
    }
}
