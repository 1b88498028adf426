//! JIDs (RFC 7622). STUB: API only, being implemented.

use std::fmt;

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

impl BareJid {
    pub fn parse(_s: &str) -> Result<BareJid, JidError> {
        todo!()
    }
    pub fn new(_node: Option<&str>, _domain: &str) -> Result<BareJid, JidError> {
        todo!()
    }
    pub fn node(&self) -> Option<&str> {
        self.node.as_deref()
    }
    pub fn domain(&self) -> &str {
        &self.domain
    }
    pub fn domain_jid(&self) -> BareJid {
        todo!()
    }
    pub fn with_resource(&self, _resource: &str) -> Result<FullJid, JidError> {
        todo!()
    }
}

impl FullJid {
    pub fn parse(_s: &str) -> Result<FullJid, JidError> {
        todo!()
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
    pub fn parse(_s: &str) -> Result<Jid, JidError> {
        todo!()
    }
    pub fn bare(&self) -> &BareJid {
        todo!()
    }
    pub fn resource(&self) -> Option<&str> {
        todo!()
    }
    pub fn domain(&self) -> &str {
        todo!()
    }
    pub fn node(&self) -> Option<&str> {
        todo!()
    }
}

pub fn nodeprep(_s: &str) -> Result<String, JidError> {
    todo!()
}
pub fn resourceprep(_s: &str) -> Result<String, JidError> {
    todo!()
}
pub fn nameprep(_s: &str) -> Result<String, JidError> {
    todo!()
}

impl fmt::Display for BareJid {
    fn fmt(&self, _f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
    }
}
impl fmt::Display for FullJid {
    fn fmt(&self, _f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
    }
}
impl fmt::Display for Jid {
    fn fmt(&self, _f: &mut fmt::Formatter<'_>) -> fmt::Result {
        todo!()
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
