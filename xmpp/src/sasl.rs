//! SASL mechanisms as pure state machines. STUB: API only, being implemented.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HashAlg {
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlg {
    pub const ALL: [HashAlg; 3] = [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512];
}

/// What the server stores per account and hash: never the password.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ScramCredentials {
    pub hash: HashAlg,
    pub salt: Vec<u8>,
    pub iterations: u32,
    pub stored_key: Vec<u8>,
    pub server_key: Vec<u8>,
}

impl ScramCredentials {
    /// Derives the stored keys from a password (SASLprep'd first).
    pub fn derive(
        _hash: HashAlg,
        _password: &str,
        _salt: &[u8],
        _iterations: u32,
    ) -> Result<Self, SaslError> {
        todo!()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    Plain,
    Scram(HashAlg),
    ScramPlus(HashAlg),
    External,
}

impl Mechanism {
    pub fn name(self) -> &'static str {
        todo!()
    }
    pub fn from_name(_s: &str) -> Option<Mechanism> {
        todo!()
    }
}

/// Channel-binding data the server can offer on this connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelBindings {
    pub tls_exporter: Option<Vec<u8>>,
    pub tls_server_end_point: Option<Vec<u8>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaslFailure {
    Aborted,
    AccountDisabled,
    CredentialsExpired,
    EncryptionRequired,
    IncorrectEncoding,
    InvalidAuthzid,
    InvalidMechanism,
    MalformedRequest,
    MechanismTooWeak,
    NotAuthorized,
    TemporaryAuthFailure,
}

impl SaslFailure {
    pub fn condition(self) -> &'static str {
        todo!()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("password fails SASLprep")]
    Prep,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    Challenge(Vec<u8>),
    Success {
        username: String,
        additional_data: Option<Vec<u8>>,
    },
    Failure {
        failure: SaslFailure,
        username: Option<String>,
    },
}

pub struct ServerSession {
    _m: Mechanism,
}

impl ServerSession {
    pub fn new(
        mechanism: Mechanism,
        _cb: ChannelBindings,
        _plus_offered: bool,
        _nonce: String,
    ) -> Self {
        ServerSession { _m: mechanism }
    }
    pub fn step(
        &mut self,
        _input: &[u8],
        _lookup: &dyn Fn(&str, HashAlg) -> Option<ScramCredentials>,
    ) -> Step {
        todo!()
    }
}
