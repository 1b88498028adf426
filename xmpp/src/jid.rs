//! JIDs (RFC 7622 syntax, RFC 6122 stringprep normalisation).
//!
//! We normalise with the stringprep profiles of RFC 6122 (Nodeprep,
//! Nameprep, Resourceprep) rather than PRECIS (RFC 7622 §3): that is what
//! deployed servers still do, and on ordinary addresses the two agree.
//! Preparation is done with the `stringprep` crate directly: the `jid`
//! crate runs the domain through IDNA/UTS-46, whose rules differ from the
//! Nameprep we want here, and gives no per-part errors.
//!
//! Splitting follows RFC 7622 §3.1: the first '/' starts the resourcepart
//! (which may itself contain '@' and '/'); in what comes before it, the
//! first '@' ends the localpart.

use std::fmt;
use std::net::{Ipv4Addr, Ipv6Addr};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JidError {
    #[error("empty domain")]
    EmptyDomain,
    #[error("empty localpart")]
    EmptyNode,
    #[error("empty resource")]
    EmptyResource,
    #[error("{0} longer than 1023 bytes")]
    TooLong(&'static str),
    #[error("{0} fails stringprep")]
    Prep(&'static str),
}

/// RFC 7622 §3.2–3.4 (and RFC 6122 §2): each part is 1 to 1023 octets
/// once prepared.
const MAX_PART: usize = 1023;

/// `node@domain` or `domain`, normalised.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct BareJid {
    node: Option<String>,
    domain: String,
}

/// `node@domain/resource` or `domain/resource`, normalised.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FullJid {
    bare: BareJid,
    resource: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Jid {
    Bare(BareJid),
    Full(FullJid),
}

/// Splits a JID string into (localpart, domainpart, resourcepart) without
/// preparing anything. RFC 7622 §3.1: resource first, then localpart.
fn split(s: &str) -> (Option<&str>, &str, Option<&str>) {
    let (rest, resource) = match s.split_once('/') {
        Some((rest, res)) => (rest, Some(res)),
        None => (s, None),
    };
    let (node, domain) = match rest.split_once('@') {
        Some((node, domain)) => (Some(node), domain),
        None => (None, rest),
    };
    (node, domain, resource)
}

impl BareJid {
    /// Parses `node@domain` or `domain`. A resource is an error here: a
    /// caller asking for a bare JID must not silently lose it.
    pub fn parse(s: &str) -> Result<BareJid, JidError> {
        match Jid::parse(s)? {
            Jid::Bare(b) => Ok(b),
            // Reuse an existing variant rather than growing the error type:
            // the resource is present but not allowed here.
            Jid::Full(_) => Err(JidError::Prep("resourcepart")),
        }
    }

    /// Builds a bare JID from separate parts, normalising each.
    pub fn new(node: Option<&str>, domain: &str) -> Result<BareJid, JidError> {
        let node = match node {
            Some(n) => Some(nodeprep(n)?),
            None => None,
        };
        let domain = nameprep(domain)?;
        Ok(BareJid { node, domain })
    }

    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The domain on its own, e.g. the server's JID for a user's JID.
    pub fn domain_jid(&self) -> BareJid {
        BareJid {
            node: None,
            domain: self.domain.clone(),
        }
    }

    pub fn with_resource(&self, resource: &str) -> Result<FullJid, JidError> {
        Ok(FullJid {
            bare: self.clone(),
            resource: resourceprep(resource)?,
        })
    }
}

impl FullJid {
    /// Parses `[node@]domain/resource`; a JID without a resource fails
    /// with [`JidError::EmptyResource`].
    pub fn parse(s: &str) -> Result<FullJid, JidError> {
        match Jid::parse(s)? {
            Jid::Full(f) => Ok(f),
            Jid::Bare(_) => Err(JidError::EmptyResource),
        }
    }

    pub fn bare(&self) -> &BareJid {
        &self.bare
    }

    pub fn resource(&self) -> &str {
        &self.resource
    }

    pub fn node(&self) -> Option<&str> {
        self.bare.node()
    }

    pub fn domain(&self) -> &str {
        self.bare.domain()
    }
}

impl Jid {
    /// Parses any JID: [`Jid::Full`] if it has a resourcepart, else
    /// [`Jid::Bare`].
    pub fn parse(s: &str) -> Result<Jid, JidError> {
        let (node, domain, resource) = split(s);
        // Check parts in reading order so errors point at the first bad part.
        let bare = BareJid::new(node, domain)?;
        match resource {
            Some(r) => bare.with_resource(r).map(Jid::Full),
            None => Ok(Jid::Bare(bare)),
        }
    }

    pub fn bare(&self) -> &BareJid {
        match self {
            Jid::Bare(b) => b,
            Jid::Full(f) => f.bare(),
        }
    }

    pub fn resource(&self) -> Option<&str> {
        match self {
            Jid::Bare(_) => None,
            Jid::Full(f) => Some(f.resource()),
        }
    }

    pub fn domain(&self) -> &str {
        self.bare().domain()
    }

    pub fn node(&self) -> Option<&str> {
        self.bare().node()
    }
}

fn check_len(prepared: &str, what: &'static str) -> Result<(), JidError> {
    if prepared.len() > MAX_PART {
        return Err(JidError::TooLong(what));
    }
    Ok(())
}

/// Nodeprep (RFC 6122 Appendix A): case-folds, NFKC, and forbids spaces,
/// controls and `"&'/:<>@`. Empty input or output is an error.
pub fn nodeprep(s: &str) -> Result<String, JidError> {
    if s.is_empty() {
        return Err(JidError::EmptyNode);
    }
    // ASCII fast path (every JID on a hot path looks like this): on ASCII,
    // Nodeprep is case folding plus the prohibited controls, space and
    // `"&'/:<>@` (RFC 3920 Appendix A.5). Same result, no tables.
    if s.bytes()
        .all(|b| (0x21..0x7f).contains(&b) && !b"\"&'/:<>@".contains(&b))
    {
        check_len(s, "localpart")?;
        return Ok(s.to_ascii_lowercase());
    }
    let out = to_fixed_point(s, |x| stringprep::nodeprep(x).map(|c| c.into_owned()))
        .map_err(|_| JidError::Prep("localpart"))?;
    // Mapping can delete characters (e.g. U+00AD soft hyphen), so check again.
    if out.is_empty() {
        return Err(JidError::EmptyNode);
    }
    check_len(&out, "localpart")?;
    Ok(out)
}

/// Resourceprep (RFC 6122 Appendix B): NFKC, case preserved, spaces and
/// '@' and '/' allowed. Empty input or output is an error.
pub fn resourceprep(s: &str) -> Result<String, JidError> {
    if s.is_empty() {
        return Err(JidError::EmptyResource);
    }
    // ASCII fast path: Resourceprep keeps case and only prohibits the
    // ASCII controls (RFC 3920 Appendix B).
    if s.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        check_len(s, "resourcepart")?;
        return Ok(s.to_owned());
    }
    let out = stringprep::resourceprep(s).map_err(|_| JidError::Prep("resourcepart"))?;
    if out.is_empty() {
        return Err(JidError::EmptyResource);
    }
    check_len(&out, "resourcepart")?;
    Ok(out.into_owned())
}

/// Prepares a domainpart (RFC 6122 §2.2, RFC 7622 §3.2): an IP literal is
/// kept as is (IPv6 in brackets, RFC 3986 §3.2.2), anything else goes
/// through Nameprep (RFC 3491, which case-folds) and one trailing dot is
/// removed.
/// Applies a stringprep profile until its output no longer changes. The
/// `stringprep` crate case-folds before NFKC, without RFC 3454's B.2
/// table for compatibility characters: `㉐` becomes `PTE`, which a second
/// pass folds to `pte`. Prepping to a fixed point makes a prepared JID
/// prepare to itself, so two spellings never name two accounts (found by
/// the `jid` fuzz target).
fn to_fixed_point<E>(s: &str, prep: impl Fn(&str) -> Result<String, E>) -> Result<String, E> {
    let mut out = prep(s)?;
    for _ in 0..4 {
        let again = prep(&out)?;
        if again == out {
            break;
        }
        out = again;
    }
    Ok(out)
}

pub fn nameprep(s: &str) -> Result<String, JidError> {
    if s.is_empty() {
        return Err(JidError::EmptyDomain);
    }
    if let Some(inner) = s.strip_prefix('[').and_then(|r| r.strip_suffix(']')) {
        // Lowercase so `[::A]` and `[::a]` compare equal; the address
        // itself is printed as written otherwise (no re-compression).
        return match inner.parse::<Ipv6Addr>() {
            Ok(_) => Ok(s.to_ascii_lowercase()),
            Err(_) => Err(JidError::Prep("domainpart")),
        };
    }
    if s.parse::<Ipv4Addr>().is_ok() {
        return Ok(s.to_owned());
    }
    let prepped: String = if s.is_ascii() {
        // ASCII fast path: Nameprep on ASCII is case folding; the host
        // name rules below do the rest.
        s.to_ascii_lowercase()
    } else {
        // RFC 3490 §3.1: the ideographic full stop and its variants are label
        // separators too; map them to '.' so trailing-dot removal sees them.
        let dotted: String = s
            .chars()
            .map(|c| match c {
                '\u{3002}' | '\u{ff0e}' | '\u{ff61}' => '.',
                c => c,
            })
            .collect();
        to_fixed_point(&dotted, |x| stringprep::nameprep(x).map(|c| c.into_owned()))
            .map_err(|_| JidError::Prep("domainpart"))?
    };
    // RFC 7622 §3.2: a final label separator MUST be stripped. Only one:
    // "example.com.." is not a fully qualified name, it has an empty label.
    let out = prepped.strip_suffix('.').unwrap_or(&prepped);
    if out.is_empty() {
        return Err(JidError::EmptyDomain);
    }
    // Nameprep alone allows ASCII that can never appear in a host name
    // (IDNA applies the STD3 rules on top of it, RFC 3490 §4.1). Keep to
    // letters, digits, '-', '_' (seen in practice, e.g. service names) and
    // '.', with no empty labels. Non-ASCII is left to Nameprep.
    if out
        .chars()
        .any(|c| c.is_ascii() && !(c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')))
    {
        return Err(JidError::Prep("domainpart"));
    }
    if out.split('.').any(str::is_empty) {
        return Err(JidError::Prep("domainpart"));
    }
    check_len(out, "domainpart")?;
    Ok(out.to_owned())
}

impl fmt::Display for BareJid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.node {
            Some(n) => write!(f, "{}@{}", n, self.domain),
            None => f.write_str(&self.domain),
        }
    }
}

impl fmt::Display for FullJid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.bare, self.resource)
    }
}

impl fmt::Display for Jid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Jid::Bare(b) => b.fmt(f),
            Jid::Full(j) => j.fmt(f),
        }
    }
}

impl From<FullJid> for Jid {
    fn from(j: FullJid) -> Jid {
        Jid::Full(j)
    }
}

impl From<BareJid> for Jid {
    fn from(j: BareJid) -> Jid {
        Jid::Bare(j)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compatibility_characters_prepare_to_a_fixed_point() {
        let j = Jid::parse("kai\u{3250}ali").expect("parses");
        assert_eq!(j.to_string(), "kaipteali");
        assert_eq!(Jid::parse(&j.to_string()).expect("again"), j);
        let n = BareJid::parse("\u{3250}@example.org").expect("node");
        assert_eq!(n.to_string(), "pte@example.org");
    }

    #[test]
    fn ascii_fast_paths_agree_with_stringprep() {
        let samples = [
            "Juliet",
            "juliet",
            "a.b-c_d",
            "ROMEO99",
            "x~y",
            "a b",
            "a@b",
            "a/b",
            "a:b",
            "Home Office",
            "\u{7f}x",
            "tab\there",
        ];
        let printable: Vec<String> = (0x20u8..0x80).map(|b| format!("a{}b", b as char)).collect();
        for s in samples
            .iter()
            .copied()
            .chain(printable.iter().map(String::as_str))
        {
            let slow_node = stringprep::nodeprep(s).map(|c| c.into_owned()).ok();
            assert_eq!(nodeprep(s).ok(), slow_node, "nodeprep {s:?}");
            let slow_res = stringprep::resourceprep(s).map(|c| c.into_owned()).ok();
            assert_eq!(resourceprep(s).ok(), slow_res, "resourceprep {s:?}");
            if let Ok(slow) = stringprep::nameprep(s) {
                let fast = s.to_ascii_lowercase();
                assert_eq!(fast, slow, "nameprep mapping {s:?}");
            }
        }
    }

    fn roundtrip(s: &str) -> String {
        Jid::parse(s)
            .unwrap_or_else(|e| panic!("{s:?}: {e}"))
            .to_string()
    }

    /// RFC 7622 §3.5 examples of valid JIDs on which stringprep and PRECIS
    /// agree; each is already normalised so it prints back unchanged.
    #[test]
    fn rfc7622_valid_examples() {
        for s in [
            "juliet@example.com",
            "juliet@example.com/foo",
            "juliet@example.com/foo bar",
            "juliet@example.com/foo@bar",
            "foo\\20bar@example.com",
            "fussball@example.com",
            "π@example.com",
            "example.com",
            "example.com/foobar",
            "a.example.com/b@example.net",
        ] {
            assert_eq!(roundtrip(s), s);
        }
    }

    #[test]
    fn parts_are_split_as_specified() {
        let j = Jid::parse("a.example.com/b@example.net").unwrap();
        assert_eq!(j.node(), None);
        assert_eq!(j.domain(), "a.example.com");
        assert_eq!(j.resource(), Some("b@example.net"));

        let j = FullJid::parse("juliet@example.com/a/b@c").unwrap();
        assert_eq!(j.node(), Some("juliet"));
        assert_eq!(j.domain(), "example.com");
        assert_eq!(j.resource(), "a/b@c");
        assert_eq!(j.bare().to_string(), "juliet@example.com");
    }

    #[test]
    fn case_folding() {
        assert_eq!(
            roundtrip("Juliet@Example.COM/Foo"),
            "juliet@example.com/Foo"
        );
        // Nodeprep folds beyond ASCII: 'ß' → "ss" (RFC 3454 table B.2).
        assert_eq!(roundtrip("Fußball@example.com"), "fussball@example.com");
        assert_eq!(roundtrip("Π@EXAMPLE.com"), "π@example.com");
        assert_eq!(
            BareJid::new(Some("ROMEO"), "Example.NET")
                .unwrap()
                .to_string(),
            "romeo@example.net"
        );
    }

    #[test]
    fn trailing_dot_and_ip_literals() {
        assert_eq!(roundtrip("juliet@example.com./r"), "juliet@example.com/r");
        assert_eq!(roundtrip("example.com."), "example.com");
        assert_eq!(roundtrip("user@[::1]/r"), "user@[::1]/r");
        assert_eq!(roundtrip("[2001:DB8::1]"), "[2001:db8::1]");
        assert_eq!(roundtrip("user@127.0.0.1"), "user@127.0.0.1");
        assert!(Jid::parse("[not-ip]").is_err());
        assert!(Jid::parse("example.com..").is_err());
        assert!(Jid::parse(".").is_err());
        assert!(Jid::parse("a..b").is_err());
    }

    #[test]
    fn rfc7622_invalid_examples() {
        for s in [
            "\"juliet\"@example.com",
            "foo bar@example.com",
            "@example.com",
            "juliet@",
            "juliet@example.com/",
            "example.com/",
            "",
            "/res",
            "a@b@c",
            "exa mple.com",
            "exa:mple.com",
            "juliet@<x>.com",
            "jul:iet@example.com",
        ] {
            assert!(Jid::parse(s).is_err(), "{s:?} accepted");
        }
        assert_eq!(Jid::parse("@example.com"), Err(JidError::EmptyNode));
        assert_eq!(Jid::parse("juliet@"), Err(JidError::EmptyDomain));
        assert_eq!(Jid::parse("b/"), Err(JidError::EmptyResource));
        // A soft hyphen is mapped to nothing, leaving an empty localpart.
        assert_eq!(Jid::parse("\u{ad}@example.com"), Err(JidError::EmptyNode));
    }

    #[test]
    fn length_limits() {
        let ok = "a".repeat(1023);
        let long = "a".repeat(1024);
        assert!(Jid::parse(&format!("{ok}@example.com")).is_ok());
        assert_eq!(
            Jid::parse(&format!("{long}@example.com")),
            Err(JidError::TooLong("localpart"))
        );
        assert_eq!(
            Jid::parse(&format!("example.com/{long}")),
            Err(JidError::TooLong("resourcepart"))
        );
        assert!(Jid::parse(&format!("example.com/{ok}")).is_ok());
        let long_domain = format!("{}comm", "a.".repeat(510));
        assert_eq!(long_domain.len(), 1024);
        assert_eq!(
            Jid::parse(&long_domain),
            Err(JidError::TooLong("domainpart"))
        );
        // The limit applies after preparation: 'ﬀ' (3 bytes) becomes "ff".
        let lig = "\u{fb00}".repeat(400);
        assert!(Jid::parse(&format!("{lig}@example.com")).is_ok());
    }

    #[test]
    fn typed_parsers() {
        assert!(FullJid::parse("juliet@example.com").is_err());
        assert!(BareJid::parse("juliet@example.com/r").is_err());
        let b = BareJid::parse("Juliet@Example.com").unwrap();
        assert_eq!(b.domain_jid().to_string(), "example.com");
        let f = b.with_resource("Balcony").unwrap();
        assert_eq!(f.to_string(), "juliet@example.com/Balcony");
        assert_eq!(Jid::from(f.clone()).bare(), &b);
        assert_eq!(Jid::from(b.clone()).resource(), None);
        assert!(b.with_resource("").is_err());
        assert!(BareJid::new(Some(""), "example.com").is_err());
        // Resourceprep keeps case but still applies NFKC: 'ﬀ' → "ff".
        assert_eq!(b.with_resource("A\u{fb00}").unwrap().resource(), "Aff");
        // Equality is on the normalised form.
        assert_eq!(
            Jid::parse("ROMEO@example.net/x").unwrap(),
            Jid::parse("romeo@EXAMPLE.net./x").unwrap()
        );
    }

    /// Our node/resource normalisation agrees with the `jid` crate, which
    /// uses the same stringprep profiles (its domain handling is IDNA, so
    /// only ASCII-lowercase domains are compared).
    #[test]
    fn agrees_with_jid_crate() {
        for s in [
            "Juliet@example.com/Foo",
            "Fußball@example.com",
            "Π@example.com/ﬀ",
            "foo\\20bar@example.com/a b",
            "example.com/x@y/z",
        ] {
            let ours = Jid::parse(s).unwrap().to_string();
            let theirs = jid::Jid::new(s).unwrap().to_string();
            assert_eq!(ours, theirs, "{s:?}");
        }
    }
}
