//! SASL mechanisms as pure state machines: no I/O, no clock, and all
//! randomness (nonces) supplied by the caller.
//!
//! Server side: [`ServerSession`] runs PLAIN (RFC 4616) and SCRAM
//! (RFC 5802, RFC 7677 for SHA-256, with `-PLUS` channel binding per
//! RFC 5929 / RFC 9266) against stored [`ScramCredentials`]; the password
//! itself is never stored.
//!
//! Client side: [`client`] has a PLAIN initial-response builder and a SCRAM
//! client, for the test client and the load generator.
//!
//! Everything here works on *decoded* SASL data: base64 on the XMPP wire
//! (RFC 6120 §6.4.2) is the caller's job.

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha1::{Digest, Sha1};
use sha2::{Sha256, Sha512};
use subtle::ConstantTimeEq;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum HashAlg {
    Sha1,
    Sha256,
    Sha512,
}

impl HashAlg {
    pub const ALL: [HashAlg; 3] = [HashAlg::Sha1, HashAlg::Sha256, HashAlg::Sha512];

    /// Digest size in bytes: the length of every key and proof.
    pub fn output_len(self) -> usize {
        match self {
            HashAlg::Sha1 => 20,
            HashAlg::Sha256 => 32,
            HashAlg::Sha512 => 64,
        }
    }

    /// H() of RFC 5802 §2.2.
    fn digest(self, data: &[u8]) -> Vec<u8> {
        match self {
            HashAlg::Sha1 => Sha1::digest(data).to_vec(),
            HashAlg::Sha256 => Sha256::digest(data).to_vec(),
            HashAlg::Sha512 => Sha512::digest(data).to_vec(),
        }
    }

    /// HMAC() of RFC 5802 §2.2 (RFC 2104).
    fn hmac(self, key: &[u8], data: &[u8]) -> Vec<u8> {
        // HMAC takes keys of any length (long ones are hashed, RFC 2104 §2),
        // so `new_from_slice` cannot fail: the expect is not reachable from
        // input.
        macro_rules! mac {
            ($h:ty) => {{
                let mut m = <Hmac<$h> as Mac>::new_from_slice(key)
                    .expect("HMAC accepts keys of any length");
                m.update(data);
                m.finalize().into_bytes().to_vec()
            }};
        }
        match self {
            HashAlg::Sha1 => mac!(Sha1),
            HashAlg::Sha256 => mac!(Sha256),
            HashAlg::Sha512 => mac!(Sha512),
        }
    }

    /// Hi() of RFC 5802 §2.2, which is PBKDF2 (RFC 8018) with HMAC as PRF
    /// and one block of output.
    fn pbkdf2(self, password: &[u8], salt: &[u8], iterations: u32) -> Vec<u8> {
        let mut out = vec![0u8; self.output_len()];
        match self {
            HashAlg::Sha1 => pbkdf2::pbkdf2_hmac::<Sha1>(password, salt, iterations, &mut out),
            HashAlg::Sha256 => pbkdf2::pbkdf2_hmac::<Sha256>(password, salt, iterations, &mut out),
            HashAlg::Sha512 => pbkdf2::pbkdf2_hmac::<Sha512>(password, salt, iterations, &mut out),
        }
        out
    }
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

/// SaltedPassword := Hi(Normalize(password), salt, i) (RFC 5802 §3), with
/// Normalize = SASLprep (RFC 4013).
fn salted_password(
    hash: HashAlg,
    password: &str,
    salt: &[u8],
    iterations: u32,
) -> Result<Vec<u8>, SaslError> {
    // RFC 5802 §5.1: "i" is a positive number; 0 would silently mean 1
    // round in the pbkdf2 crate.
    if iterations == 0 {
        return Err(SaslError::InvalidIterations);
    }
    let prepped = stringprep::saslprep(password).map_err(|_| SaslError::Prep)?;
    Ok(hash.pbkdf2(prepped.as_bytes(), salt, iterations))
}

impl ScramCredentials {
    /// Derives the stored keys from a password (SASLprep'd first).
    ///
    /// RFC 5802 §3: ClientKey = HMAC(SaltedPassword, "Client Key"),
    /// StoredKey = H(ClientKey), ServerKey = HMAC(SaltedPassword, "Server Key").
    pub fn derive(
        hash: HashAlg,
        password: &str,
        salt: &[u8],
        iterations: u32,
    ) -> Result<Self, SaslError> {
        let salted = salted_password(hash, password, salt, iterations)?;
        let client_key = hash.hmac(&salted, b"Client Key");
        Ok(ScramCredentials {
            hash,
            salt: salt.to_vec(),
            iterations,
            stored_key: hash.digest(&client_key),
            server_key: hash.hmac(&salted, b"Server Key"),
        })
    }

    /// Whether these credentials can be used for `hash` without a length
    /// mismatch later (a corrupt or mislabelled record counts as absent).
    fn usable_for(&self, hash: HashAlg) -> bool {
        self.hash == hash
            && self.iterations > 0
            && self.stored_key.len() == hash.output_len()
            && self.server_key.len() == hash.output_len()
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
    /// The IANA-registered SASL mechanism name.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Scram(HashAlg::Sha1) => "SCRAM-SHA-1",
            Mechanism::Scram(HashAlg::Sha256) => "SCRAM-SHA-256",
            Mechanism::Scram(HashAlg::Sha512) => "SCRAM-SHA-512",
            Mechanism::ScramPlus(HashAlg::Sha1) => "SCRAM-SHA-1-PLUS",
            Mechanism::ScramPlus(HashAlg::Sha256) => "SCRAM-SHA-256-PLUS",
            Mechanism::ScramPlus(HashAlg::Sha512) => "SCRAM-SHA-512-PLUS",
            Mechanism::External => "EXTERNAL",
        }
    }

    /// Inverse of [`Mechanism::name`]. Exact match: mechanism names are
    /// upper case on the wire (RFC 4422 §3.1).
    pub fn from_name(s: &str) -> Option<Mechanism> {
        Some(match s {
            "PLAIN" => Mechanism::Plain,
            "SCRAM-SHA-1" => Mechanism::Scram(HashAlg::Sha1),
            "SCRAM-SHA-256" => Mechanism::Scram(HashAlg::Sha256),
            "SCRAM-SHA-512" => Mechanism::Scram(HashAlg::Sha512),
            "SCRAM-SHA-1-PLUS" => Mechanism::ScramPlus(HashAlg::Sha1),
            "SCRAM-SHA-256-PLUS" => Mechanism::ScramPlus(HashAlg::Sha256),
            "SCRAM-SHA-512-PLUS" => Mechanism::ScramPlus(HashAlg::Sha512),
            "EXTERNAL" => Mechanism::External,
            _ => return None,
        })
    }
}

/// Channel-binding data the server can offer on this connection.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ChannelBindings {
    pub tls_exporter: Option<Vec<u8>>,
    pub tls_server_end_point: Option<Vec<u8>>,
}

impl ChannelBindings {
    /// The data for a channel-binding type name (RFC 5056 §2.1 registry),
    /// if we support the type and have the data on this connection.
    fn get(&self, name: &str) -> Option<&[u8]> {
        match name {
            "tls-exporter" => self.tls_exporter.as_deref(),
            "tls-server-end-point" => self.tls_server_end_point.as_deref(),
            _ => None,
        }
    }
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
    /// The element name in `<failure xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>`
    /// (RFC 6120 §6.5).
    pub fn condition(self) -> &'static str {
        match self {
            SaslFailure::Aborted => "aborted",
            SaslFailure::AccountDisabled => "account-disabled",
            SaslFailure::CredentialsExpired => "credentials-expired",
            SaslFailure::EncryptionRequired => "encryption-required",
            SaslFailure::IncorrectEncoding => "incorrect-encoding",
            SaslFailure::InvalidAuthzid => "invalid-authzid",
            SaslFailure::InvalidMechanism => "invalid-mechanism",
            SaslFailure::MalformedRequest => "malformed-request",
            SaslFailure::MechanismTooWeak => "mechanism-too-weak",
            SaslFailure::NotAuthorized => "not-authorized",
            SaslFailure::TemporaryAuthFailure => "temporary-auth-failure",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SaslError {
    #[error("password fails SASLprep")]
    Prep,
    /// An iteration count of 0 (or, client side, absurdly large).
    #[error("invalid SCRAM iteration count")]
    InvalidIterations,
    /// The peer sent something that is not valid for this step (client
    /// side), or the client was misused (e.g. steps out of order).
    #[error("SASL protocol error: {0}")]
    Protocol(String),
    /// Server-final `v=` did not match: the server does not know our
    /// credentials (or a man in the middle is present).
    #[error("SCRAM server signature mismatch")]
    ServerSignatureMismatch,
    /// Server-final carried `e=<server-error-value>` (RFC 5802 §7).
    #[error("SCRAM server error: {0}")]
    ServerError(String),
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

fn fail(failure: SaslFailure, username: Option<&str>) -> Step {
    Step::Failure {
        failure,
        username: username.map(str::to_owned),
    }
}

/// RFC 5802 §7 `printable`: %x21-2B / %x2D-7E, i.e. visible ASCII but ','.
fn is_printable(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|b| (0x21..=0x7e).contains(&b) && b != b',')
}

/// Decodes a `saslname` (RFC 5802 §7): ',' and '=' appear as "=2C" and
/// "=3D"; any other '=' is malformed. Empty names are malformed too.
fn unescape_saslname(s: &str) -> Option<String> {
    if s.is_empty() {
        return None;
    }
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('=') {
        out.push_str(rest.get(..i)?);
        let tail = rest.get(i..)?;
        if let Some(r) = tail.strip_prefix("=2C") {
            out.push(',');
            rest = r;
        } else if let Some(r) = tail.strip_prefix("=3D") {
            out.push('=');
            rest = r;
        } else {
            return None;
        }
    }
    out.push_str(rest);
    Some(out)
}

/// Inverse of [`unescape_saslname`].
fn escape_saslname(s: &str) -> String {
    s.replace('=', "=3D").replace(',', "=2C")
}

/// Checks the syntax of trailing optional attributes (RFC 5802 §7
/// `extensions`: `attr-val` = ALPHA "=" value). Unknown ones are ignored,
/// as §5.1 allows for anything but a leading `m=`.
fn extensions_ok<'a>(mut attrs: impl Iterator<Item = &'a str>) -> bool {
    attrs.all(|a| {
        let b = a.as_bytes();
        b.len() >= 2 && b.first().is_some_and(u8::is_ascii_alphabetic) && b.get(1) == Some(&b'=')
    })
}

/// The gs2-cbind-flag of the GS2 header (RFC 5802 §7, RFC 5801 §4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CbFlag<'a> {
    /// "n": client does not support channel binding.
    No,
    /// "y": client supports it but believes the server does not.
    SupportedNotUsed,
    /// "p=<cb-name>": client uses this binding.
    Used(&'a str),
}

/// A parsed client-first-message.
struct ClientFirst<'a> {
    flag: CbFlag<'a>,
    /// Unescaped `a=` value, if present.
    authzid: Option<String>,
    /// gs2-header verbatim (with its trailing ','), echoed in `c=`.
    gs2_header: &'a str,
    /// client-first-message-bare verbatim, part of AuthMessage.
    bare: &'a str,
    /// Unescaped, not yet SASLprep'd.
    username: String,
    nonce: &'a str,
}

fn parse_client_first(msg: &str) -> Option<ClientFirst<'_>> {
    // gs2-header = gs2-cbind-flag "," [ authzid ] ","
    let (flag, rest) = msg.split_once(',')?;
    let (authz, bare) = rest.split_once(',')?;
    let gs2_header = msg.get(..flag.len() + authz.len() + 2)?;

    let flag = match flag {
        "n" => CbFlag::No,
        "y" => CbFlag::SupportedNotUsed,
        f => {
            // cb-name = 1*(ALPHA / DIGIT / "." / "-")
            let name = f.strip_prefix("p=")?;
            let valid = !name.is_empty()
                && name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
            if !valid {
                return None;
            }
            CbFlag::Used(name)
        }
    };
    let authzid = match authz {
        "" => None,
        a => Some(unescape_saslname(a.strip_prefix("a=")?)?),
    };

    // client-first-message-bare = [reserved-mext ","] username "," nonce
    //                             ["," extensions]
    // A leading "m=" is a mandatory extension we don't know: RFC 5802 §5.1
    // says authentication MUST fail, and it fails here because the first
    // attribute must be "n=".
    let mut attrs = bare.split(',');
    let username = unescape_saslname(attrs.next()?.strip_prefix("n=")?)?;
    let nonce = attrs.next()?.strip_prefix("r=")?;
    if !is_printable(nonce) || !extensions_ok(attrs) {
        return None;
    }
    Some(ClientFirst {
        flag,
        authzid,
        gs2_header,
        bare,
        username,
        nonce,
    })
}

/// State kept between server-first and client-final.
struct ScramPending {
    hash: HashAlg,
    username: String,
    /// False when the user has no credentials: we ran the exchange with
    /// fake ones and must fail at the end whatever the proof.
    known: bool,
    creds: ScramCredentials,
    /// Expected `c=` content: gs2-header plus channel-binding data for p=.
    cbind_input: Vec<u8>,
    channel_bound: bool,
    client_first_bare: String,
    server_first: String,
    nonce: String,
}

enum State {
    Start,
    /// We answered an empty initial response with an empty challenge; the
    /// next input must be the real first message.
    AwaitingInitial,
    ScramFinal(Box<ScramPending>),
    Done,
}

/// Iteration count for fake credentials unless the caller says otherwise;
/// the RFC 5802 §5.1 / RFC 7677 §4 recommended minimum.
const DEFAULT_FAKE_ITERATIONS: u32 = 4096;

/// Server side of one SASL exchange.
///
/// Feed each decoded client message to [`ServerSession::step`] until it
/// returns [`Step::Success`] or [`Step::Failure`]; any call after that
/// fails with malformed-request.
///
/// EXTERNAL is not implemented (c2s does not offer it): a session for it
/// fails at once with invalid-mechanism.
pub struct ServerSession {
    mechanism: Mechanism,
    cb: ChannelBindings,
    plus_offered: bool,
    nonce: String,
    fake_secret: Option<Vec<u8>>,
    fake_iterations: u32,
    state: State,
}

impl ServerSession {
    /// `nonce` is the server's random part of the SCRAM nonce: it should be
    /// at least 16 random printable ASCII characters without ','
    /// (RFC 5802 §5.1). Characters outside that set are dropped rather
    /// than corrupting the message.
    ///
    /// `plus_offered`: whether any SCRAM-*-PLUS mechanism was advertised on
    /// this stream, for downgrade detection (RFC 5802 §6, gs2 flag "y").
    pub fn new(
        mechanism: Mechanism,
        cb: ChannelBindings,
        plus_offered: bool,
        nonce: String,
    ) -> Self {
        let nonce: String = nonce
            .chars()
            .filter(|&c| c.is_ascii_graphic() && c != ',')
            .collect();
        debug_assert!(!nonce.is_empty(), "SCRAM server nonce must not be empty");
        ServerSession {
            mechanism,
            cb,
            plus_offered,
            nonce,
            fake_secret: None,
            fake_iterations: DEFAULT_FAKE_ITERATIONS,
            state: State::Start,
        }
    }

    /// How to fake credentials for users that do not exist, so SCRAM's
    /// server-first (salt, iteration count) does not reveal that.
    ///
    /// `secret` should be a per-server random value kept across sessions,
    /// making an unknown user's fake salt stable like a real one;
    /// `iterations` should match what real accounts use. Without this the
    /// fake salt is derived from the session nonce, which hides existence
    /// from a single attempt but not from two.
    pub fn with_unknown_user_params(mut self, secret: Vec<u8>, iterations: u32) -> Self {
        self.fake_secret = Some(secret);
        self.fake_iterations = iterations.max(1);
        self
    }

    /// Runs one step. `input` is the decoded client data (empty for an
    /// absent initial response). `lookup(username, hash)` returns the
    /// stored credentials of that user for that hash; the username given
    /// to it is the SASLprep'd authentication identity.
    pub fn step(
        &mut self,
        input: &[u8],
        lookup: &dyn Fn(&str, HashAlg) -> Option<ScramCredentials>,
    ) -> Step {
        let state = std::mem::replace(&mut self.state, State::Done);
        match (self.mechanism, state) {
            (_, State::Done) => fail(SaslFailure::MalformedRequest, None),
            (Mechanism::External, _) => fail(SaslFailure::InvalidMechanism, None),
            // RFC 4422 §5 / RFC 6120 §6.4.2: no initial response means we
            // send an empty challenge and the client's response carries
            // what the initial response would have.
            (_, State::Start) if input.is_empty() => {
                self.state = State::AwaitingInitial;
                Step::Challenge(Vec::new())
            }
            (Mechanism::Plain, State::Start | State::AwaitingInitial) => self.plain(input, lookup),
            (
                Mechanism::Scram(h) | Mechanism::ScramPlus(h),
                State::Start | State::AwaitingInitial,
            ) => self.scram_first(h, input, lookup),
            (Mechanism::Scram(_) | Mechanism::ScramPlus(_), State::ScramFinal(p)) => {
                self.scram_final(*p, input)
            }
            (Mechanism::Plain, State::ScramFinal(_)) => fail(SaslFailure::MalformedRequest, None),
        }
    }

    /// Key for deriving fake credentials.
    fn fake_key(&self) -> &[u8] {
        match &self.fake_secret {
            Some(s) => s,
            None => self.nonce.as_bytes(),
        }
    }

    /// Deterministic fake credentials for an unknown user. The keys are
    /// not derived from any password, so no proof can match them; they
    /// only have to look and cost the same as real ones.
    fn fake_credentials(&self, hash: HashAlg, username: &str) -> ScramCredentials {
        let key = self.fake_key();
        let mut salt = HashAlg::Sha256.hmac(key, format!("salt\0{username}").as_bytes());
        salt.truncate(16);
        ScramCredentials {
            hash,
            salt,
            iterations: self.fake_iterations,
            stored_key: hash.hmac(key, format!("stored\0{username}").as_bytes()),
            server_key: hash.hmac(key, format!("server\0{username}").as_bytes()),
        }
    }

    /// PLAIN (RFC 4616 §2): `[authzid] NUL authcid NUL passwd`.
    fn plain(
        &self,
        input: &[u8],
        lookup: &dyn Fn(&str, HashAlg) -> Option<ScramCredentials>,
    ) -> Step {
        let Ok(msg) = std::str::from_utf8(input) else {
            return fail(SaslFailure::MalformedRequest, None);
        };
        let mut parts = msg.split('\0');
        let (Some(authzid), Some(authcid), Some(passwd), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return fail(SaslFailure::MalformedRequest, None);
        };
        if authcid.is_empty() || passwd.is_empty() {
            return fail(SaslFailure::MalformedRequest, None);
        }
        // RFC 4616 §2: the server prepares authcid (and passwd, in derive)
        // with SASLprep.
        let username = match stringprep::saslprep(authcid) {
            Ok(u) if !u.is_empty() => u.into_owned(),
            _ => return fail(SaslFailure::MalformedRequest, None),
        };
        // We cannot know the bare JID here, so the only authzid that
        // authorises nothing beyond authcid is authcid itself.
        if !authzid.is_empty()
            && stringprep::saslprep(authzid).ok().as_deref() != Some(username.as_str())
        {
            return fail(SaslFailure::InvalidAuthzid, Some(&username));
        }

        // Prefer SHA-256 (the likeliest to exist and the strongest cheap
        // one), then SHA-1, then SHA-512.
        let creds = [HashAlg::Sha256, HashAlg::Sha1, HashAlg::Sha512]
            .into_iter()
            .find_map(|h| lookup(&username, h).filter(|c| c.usable_for(h)));
        match creds {
            Some(c) => {
                let ok = ScramCredentials::derive(c.hash, passwd, &c.salt, c.iterations)
                    .map(|d| bool::from(d.stored_key.ct_eq(&c.stored_key)))
                    .unwrap_or(false);
                if ok {
                    Step::Success {
                        username,
                        additional_data: None,
                    }
                } else {
                    fail(SaslFailure::NotAuthorized, Some(&username))
                }
            }
            None => {
                // Spend the same PBKDF2 time as for a real user so response
                // time does not reveal whether the account exists.
                let fake = self.fake_credentials(HashAlg::Sha256, &username);
                let _ = ScramCredentials::derive(fake.hash, passwd, &fake.salt, fake.iterations);
                fail(SaslFailure::NotAuthorized, Some(&username))
            }
        }
    }

    /// Client-first → server-first (RFC 5802 §5.1, §7).
    fn scram_first(
        &mut self,
        hash: HashAlg,
        input: &[u8],
        lookup: &dyn Fn(&str, HashAlg) -> Option<ScramCredentials>,
    ) -> Step {
        let Some(cf) = std::str::from_utf8(input).ok().and_then(parse_client_first) else {
            return fail(SaslFailure::MalformedRequest, None);
        };
        // RFC 5802 §5.1: the username is SASLprep'd (clients SHOULD send it
        // prepared; preparing again is idempotent).
        let username = match stringprep::saslprep(&cf.username) {
            Ok(u) if !u.is_empty() => u.into_owned(),
            _ => return fail(SaslFailure::MalformedRequest, None),
        };
        if let Some(a) = &cf.authzid {
            if stringprep::saslprep(a).ok().as_deref() != Some(username.as_str()) {
                return fail(SaslFailure::InvalidAuthzid, Some(&username));
            }
        }

        // Channel binding negotiation, RFC 5802 §6.
        let plus = matches!(self.mechanism, Mechanism::ScramPlus(_));
        let cb_data: &[u8] = match (plus, cf.flag) {
            (false, CbFlag::No) => &[],
            (false, CbFlag::SupportedNotUsed) => {
                // The client could bind but thinks we can't. If we did
                // offer -PLUS, someone stripped it from the feature list:
                // a downgrade attack, so we MUST fail.
                if self.plus_offered {
                    return fail(SaslFailure::NotAuthorized, Some(&username));
                }
                &[]
            }
            // Binding requested under a non-PLUS name, or a -PLUS
            // mechanism without binding: inconsistent request.
            (false, CbFlag::Used(_)) | (true, CbFlag::No | CbFlag::SupportedNotUsed) => {
                return fail(SaslFailure::MalformedRequest, Some(&username));
            }
            (true, CbFlag::Used(name)) => match self.cb.get(name) {
                Some(d) => d,
                // A type we don't support or have no data for on this
                // connection: we cannot authenticate the channel.
                None => return fail(SaslFailure::NotAuthorized, Some(&username)),
            },
        };
        let mut cbind_input = cf.gs2_header.as_bytes().to_vec();
        cbind_input.extend_from_slice(cb_data);

        let (creds, known) = match lookup(&username, hash).filter(|c| c.usable_for(hash)) {
            Some(c) => (c, true),
            // Carry on with fake credentials and fail at the proof, so the
            // exchange looks the same for existing and missing users.
            None => (self.fake_credentials(hash, &username), false),
        };

        let nonce = format!("{}{}", cf.nonce, self.nonce);
        let server_first = format!(
            "r={},s={},i={}",
            nonce,
            B64.encode(&creds.salt),
            creds.iterations
        );
        self.state = State::ScramFinal(Box::new(ScramPending {
            hash,
            username,
            known,
            creds,
            cbind_input,
            channel_bound: matches!(cf.flag, CbFlag::Used(_)),
            client_first_bare: cf.bare.to_owned(),
            server_first: server_first.clone(),
            nonce,
        }));
        Step::Challenge(server_first.into_bytes())
    }

    /// Client-final → server-final (RFC 5802 §3, §5.1, §7).
    fn scram_final(&mut self, p: ScramPending, input: &[u8]) -> Step {
        let user = Some(p.username.as_str());
        let Ok(msg) = std::str::from_utf8(input) else {
            return fail(SaslFailure::MalformedRequest, user);
        };
        // client-final-message = client-final-message-without-proof "," proof
        // The proof is the last attribute; base64 never contains ','.
        let Some(idx) = msg.rfind(",p=") else {
            return fail(SaslFailure::MalformedRequest, user);
        };
        let (Some(without_proof), Some(proof_b64)) = (msg.get(..idx), msg.get(idx + 3..)) else {
            return fail(SaslFailure::MalformedRequest, user);
        };
        let mut attrs = without_proof.split(',');
        let cbind = attrs.next().and_then(|a| a.strip_prefix("c="));
        let nonce = attrs.next().and_then(|a| a.strip_prefix("r="));
        let (Some(cbind), Some(nonce)) = (cbind, nonce) else {
            return fail(SaslFailure::MalformedRequest, user);
        };
        if !extensions_ok(attrs) {
            return fail(SaslFailure::MalformedRequest, user);
        }
        let (Ok(cbind), Ok(proof)) = (B64.decode(cbind), B64.decode(proof_b64)) else {
            return fail(SaslFailure::MalformedRequest, user);
        };
        if nonce != p.nonce || proof.len() != p.hash.output_len() {
            return fail(SaslFailure::MalformedRequest, user);
        }
        // RFC 5802 §6: c= must be exactly gs2-header + cb-data. For a bound
        // channel a mismatch means the client sees a different TLS session
        // (a man in the middle): an authentication failure. Otherwise it
        // is just a broken message.
        if !bool::from(cbind.ct_eq(&p.cbind_input)) {
            let f = if p.channel_bound {
                SaslFailure::NotAuthorized
            } else {
                SaslFailure::MalformedRequest
            };
            return fail(f, user);
        }

        // AuthMessage := client-first-message-bare + "," +
        //                server-first-message + "," +
        //                client-final-message-without-proof
        let auth_message = format!(
            "{},{},{}",
            p.client_first_bare, p.server_first, without_proof
        );
        // ClientSignature := HMAC(StoredKey, AuthMessage)
        // ClientKey := ClientProof XOR ClientSignature
        // valid iff H(ClientKey) == StoredKey
        let signature = p.hash.hmac(&p.creds.stored_key, auth_message.as_bytes());
        let client_key: Vec<u8> = proof.iter().zip(&signature).map(|(a, b)| a ^ b).collect();
        let matches = bool::from(p.hash.digest(&client_key).ct_eq(&p.creds.stored_key));
        if !(matches && p.known) {
            return fail(SaslFailure::NotAuthorized, user);
        }
        // ServerSignature := HMAC(ServerKey, AuthMessage); sent as v=.
        let server_sig = p.hash.hmac(&p.creds.server_key, auth_message.as_bytes());
        Step::Success {
            username: p.username,
            additional_data: Some(format!("v={}", B64.encode(server_sig)).into_bytes()),
        }
    }
}

/// Client side: PLAIN and SCRAM, for the test client and load generator.
///
/// ```
/// use xmpp::sasl::client::{ClientChannelBinding, ScramClient};
/// use xmpp::sasl::HashAlg;
/// let mut c = ScramClient::new(
///     HashAlg::Sha256, "user", "pencil", ClientChannelBinding::None,
///     "rOprNGfwEbeRWgbNEkqO".into(),
/// ).unwrap();
/// let first = c.client_first(); // send in <auth mechanism=c.mechanism().name()>
/// # let _ = first;
/// // let final_ = c.handle_server_first(&challenge)?; // send in <response>
/// // c.verify_server_final(&success_data)?;            // from <success>
/// ```
pub mod client {
    use super::*;

    /// Client upper bound on the server's iteration count, so a hostile
    /// server cannot make us spin for hours. Far above any sane setting.
    pub const MAX_ITERATIONS: u32 = 1 << 24;

    /// How the client does channel binding (RFC 5802 §6).
    #[derive(Debug, Clone, PartialEq, Eq)]
    pub enum ClientChannelBinding {
        /// gs2 flag "n": no channel binding support.
        None,
        /// gs2 flag "y": we could bind, but the server offered no -PLUS.
        SupportedButNotOffered,
        /// gs2 flag "p=tls-exporter" (RFC 9266) with the exporter output.
        TlsExporter(Vec<u8>),
        /// gs2 flag "p=tls-server-end-point" (RFC 5929 §4) with the
        /// certificate hash.
        TlsServerEndPoint(Vec<u8>),
    }

    /// PLAIN initial response (RFC 4616 §2): `[authzid] NUL authcid NUL
    /// passwd`. Strings are sent as given (the server SASLpreps); they must
    /// not contain NUL.
    pub fn plain_initial_response(authzid: Option<&str>, authcid: &str, password: &str) -> Vec<u8> {
        format!("{}\0{}\0{}", authzid.unwrap_or(""), authcid, password).into_bytes()
    }

    enum ClientState {
        Initial,
        SentFinal { server_signature: Vec<u8> },
    }

    /// SaltedPassword by (hash, password, salt, iteration count), for
    /// [`ScramClient::handle_server_first_cached`].
    #[derive(Default)]
    pub struct SaltedPasswords(std::collections::HashMap<(HashAlg, String, Vec<u8>, u32), Vec<u8>>);

    impl SaltedPasswords {
        /// How many SaltedPasswords are kept.
        pub fn len(&self) -> usize {
            self.0.len()
        }

        pub fn is_empty(&self) -> bool {
            self.0.is_empty()
        }
    }

    /// SCRAM client state machine: `client_first`, then
    /// `handle_server_first`, then `verify_server_final`.
    pub struct ScramClient {
        hash: HashAlg,
        plus: bool,
        gs2_header: String,
        cb_data: Vec<u8>,
        /// SASLprep'd.
        password: String,
        nonce: String,
        client_first_bare: String,
        state: ClientState,
    }

    impl ScramClient {
        /// `nonce`: the client nonce, random printable ASCII without ','
        /// (at least 16 characters recommended). Fails if the username or
        /// password fails SASLprep or the nonce has invalid characters.
        pub fn new(
            hash: HashAlg,
            username: &str,
            password: &str,
            cbind: ClientChannelBinding,
            nonce: String,
        ) -> Result<ScramClient, SaslError> {
            if !is_printable(&nonce) {
                return Err(SaslError::Protocol(
                    "client nonce must be printable ASCII without ','".into(),
                ));
            }
            let user = stringprep::saslprep(username).map_err(|_| SaslError::Prep)?;
            if user.is_empty() {
                return Err(SaslError::Protocol("empty username".into()));
            }
            let password = stringprep::saslprep(password)
                .map_err(|_| SaslError::Prep)?
                .into_owned();
            let (gs2_header, cb_data, plus) = match cbind {
                ClientChannelBinding::None => ("n,,", Vec::new(), false),
                ClientChannelBinding::SupportedButNotOffered => ("y,,", Vec::new(), false),
                ClientChannelBinding::TlsExporter(d) => ("p=tls-exporter,,", d, true),
                ClientChannelBinding::TlsServerEndPoint(d) => ("p=tls-server-end-point,,", d, true),
            };
            let client_first_bare = format!("n={},r={}", escape_saslname(&user), nonce);
            Ok(ScramClient {
                hash,
                plus,
                gs2_header: gs2_header.to_owned(),
                cb_data,
                password,
                nonce,
                client_first_bare,
                state: ClientState::Initial,
            })
        }

        /// The mechanism to ask for: SCRAM-*-PLUS when binding a channel.
        pub fn mechanism(&self) -> Mechanism {
            if self.plus {
                Mechanism::ScramPlus(self.hash)
            } else {
                Mechanism::Scram(self.hash)
            }
        }

        /// client-first-message (the initial response).
        pub fn client_first(&self) -> Vec<u8> {
            format!("{}{}", self.gs2_header, self.client_first_bare).into_bytes()
        }

        /// Takes server-first-message, returns client-final-message.
        pub fn handle_server_first(&mut self, server_first: &[u8]) -> Result<Vec<u8>, SaslError> {
            self.handle_server_first_cached(server_first, None)
        }

        /// As [`ScramClient::handle_server_first`], looking the
        /// SaltedPassword up in `cache` first, as real clients do (the
        /// PBKDF2 rounds are the expensive part of a login, and the same
        /// salt and count come back every time).
        pub fn handle_server_first_cached(
            &mut self,
            server_first: &[u8],
            cache: Option<&mut SaltedPasswords>,
        ) -> Result<Vec<u8>, SaslError> {
            let proto = |m: &str| SaslError::Protocol(m.to_owned());
            if !matches!(self.state, ClientState::Initial) {
                return Err(proto("server-first already handled"));
            }
            let msg = std::str::from_utf8(server_first)
                .map_err(|_| proto("server-first is not UTF-8"))?;
            // server-first-message = [reserved-mext ","] nonce "," salt ","
            //                        iteration-count ["," extensions]
            let mut attrs = msg.split(',');
            let nonce = attrs
                .next()
                .and_then(|a| a.strip_prefix("r="))
                .ok_or_else(|| proto("server-first: expected r= first"))?;
            let salt = attrs
                .next()
                .and_then(|a| a.strip_prefix("s="))
                .ok_or_else(|| proto("server-first: expected s="))?;
            let iterations = attrs
                .next()
                .and_then(|a| a.strip_prefix("i="))
                .ok_or_else(|| proto("server-first: expected i="))?;
            if !extensions_ok(attrs) {
                return Err(proto("server-first: bad extension"));
            }
            // RFC 5802 §5.1: the combined nonce starts with ours and the
            // server must have added something.
            if !is_printable(nonce)
                || !nonce.starts_with(&self.nonce)
                || nonce.len() == self.nonce.len()
            {
                return Err(proto("server-first: bad nonce"));
            }
            let salt = B64
                .decode(salt)
                .map_err(|_| proto("server-first: bad salt"))?;
            if salt.is_empty() {
                return Err(proto("server-first: empty salt"));
            }
            let iterations: u32 = iterations
                .parse()
                .map_err(|_| proto("server-first: bad iteration count"))?;
            if iterations > MAX_ITERATIONS {
                return Err(SaslError::InvalidIterations);
            }

            let h = self.hash;
            let salted = match cache {
                Some(cache) => {
                    let key = (h, self.password.clone(), salt, iterations);
                    match cache.0.get(&key) {
                        Some(s) => s.clone(),
                        None => {
                            let s = salted_password(h, &self.password, &key.2, iterations)?;
                            cache.0.insert(key, s.clone());
                            s
                        }
                    }
                }
                None => salted_password(h, &self.password, &salt, iterations)?,
            };
            let client_key = h.hmac(&salted, b"Client Key");
            let stored_key = h.digest(&client_key);
            let mut cbind_input = self.gs2_header.as_bytes().to_vec();
            cbind_input.extend_from_slice(&self.cb_data);
            let without_proof = format!("c={},r={}", B64.encode(&cbind_input), nonce);
            let auth_message = format!("{},{},{}", self.client_first_bare, msg, without_proof);
            let client_sig = h.hmac(&stored_key, auth_message.as_bytes());
            let proof: Vec<u8> = client_key
                .iter()
                .zip(&client_sig)
                .map(|(a, b)| a ^ b)
                .collect();
            let server_key = h.hmac(&salted, b"Server Key");
            self.state = ClientState::SentFinal {
                server_signature: h.hmac(&server_key, auth_message.as_bytes()),
            };
            Ok(format!("{},p={}", without_proof, B64.encode(proof)).into_bytes())
        }

        /// Checks server-final-message (the `<success>` data): `v=` must be
        /// the ServerSignature, proving the server knows our credentials.
        pub fn verify_server_final(&self, server_final: &[u8]) -> Result<(), SaslError> {
            let ClientState::SentFinal { server_signature } = &self.state else {
                return Err(SaslError::Protocol(
                    "server-final before server-first".into(),
                ));
            };
            let msg = std::str::from_utf8(server_final)
                .map_err(|_| SaslError::Protocol("server-final is not UTF-8".into()))?;
            // server-final-message = (server-error / verifier) ["," extensions]
            let first = msg.split(',').next().unwrap_or("");
            if let Some(e) = first.strip_prefix("e=") {
                return Err(SaslError::ServerError(e.to_owned()));
            }
            let v = first
                .strip_prefix("v=")
                .and_then(|v| B64.decode(v).ok())
                .ok_or_else(|| SaslError::Protocol("server-final: expected v=".into()))?;
            if bool::from(v.ct_eq(server_signature)) {
                Ok(())
            } else {
                Err(SaslError::ServerSignatureMismatch)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::client::*;
    use super::*;

    #[test]
    fn cached_salted_password_gives_the_same_proof() {
        let server_first =
            b"r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096";
        let client = || {
            ScramClient::new(
                HashAlg::Sha1,
                "user",
                "pencil",
                ClientChannelBinding::None,
                "fyko+d2lbbFgONRv9qkxdawL".into(),
            )
            .expect("client")
        };
        let plain = client()
            .handle_server_first(server_first)
            .expect("uncached");
        let mut cache = SaltedPasswords::default();
        let first = client()
            .handle_server_first_cached(server_first, Some(&mut cache))
            .expect("miss");
        let second = client()
            .handle_server_first_cached(server_first, Some(&mut cache))
            .expect("hit");
        assert_eq!(plain, first);
        assert_eq!(first, second);
        assert_eq!(cache.len(), 1);
    }

    type Lookup = Box<dyn Fn(&str, HashAlg) -> Option<ScramCredentials>>;

    /// Lookup knowing one user with one password, derived for every hash.
    fn lookup_for(user: &'static str, password: &str, salt: &[u8], iterations: u32) -> Lookup {
        let creds: Vec<ScramCredentials> = HashAlg::ALL
            .iter()
            .map(|&h| ScramCredentials::derive(h, password, salt, iterations).unwrap())
            .collect();
        Box::new(move |u, h| {
            (u == user)
                .then(|| creds.iter().find(|c| c.hash == h).cloned())
                .flatten()
        })
    }

    fn challenge(s: Step) -> Vec<u8> {
        match s {
            Step::Challenge(c) => c,
            other => panic!("expected challenge, got {other:?}"),
        }
    }

    fn failure(s: Step) -> SaslFailure {
        match s {
            Step::Failure { failure, .. } => failure,
            other => panic!("expected failure, got {other:?}"),
        }
    }

    fn no_users(_: &str, _: HashAlg) -> Option<ScramCredentials> {
        None
    }

    const SALT: &[u8] = b"0123456789abcdef";

    struct Vector {
        hash: HashAlg,
        cnonce: &'static str,
        snonce: &'static str,
        salt_b64: &'static str,
        client_first: &'static str,
        server_first: &'static str,
        client_final: &'static str,
        server_final: &'static str,
    }

    /// RFC 5802 §5.
    const RFC5802: Vector = Vector {
        hash: HashAlg::Sha1,
        cnonce: "fyko+d2lbbFgONRv9qkxdawL",
        snonce: "3rfcNHYJY1ZVvWVs7j",
        salt_b64: "QSXCR+Q6sek8bf92",
        client_first: "n,,n=user,r=fyko+d2lbbFgONRv9qkxdawL",
        server_first: "r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,s=QSXCR+Q6sek8bf92,i=4096",
        client_final:
            "c=biws,r=fyko+d2lbbFgONRv9qkxdawL3rfcNHYJY1ZVvWVs7j,p=v0X8v3Bz2T0CJGbJQyF0X+HI4Ts=",
        server_final: "v=rmF9pqV8S7suAoZWja4dJRkFsKQ=",
    };

    /// RFC 7677 §3.
    const RFC7677: Vector = Vector {
        hash: HashAlg::Sha256,
        cnonce: "rOprNGfwEbeRWgbNEkqO",
        snonce: "%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0",
        salt_b64: "W22ZaJ0SNY7soEsUEjb6gQ==",
        client_first: "n,,n=user,r=rOprNGfwEbeRWgbNEkqO",
        server_first: "r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,s=W22ZaJ0SNY7soEsUEjb6gQ==,i=4096",
        client_final: "c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        server_final: "v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
    };

    fn run_vector_server(v: &Vector) {
        let creds =
            ScramCredentials::derive(v.hash, "pencil", &B64.decode(v.salt_b64).unwrap(), 4096)
                .unwrap();
        let lookup =
            move |u: &str, h: HashAlg| (u == "user" && h == creds.hash).then(|| creds.clone());
        let mut s = ServerSession::new(
            Mechanism::Scram(v.hash),
            ChannelBindings::default(),
            false,
            v.snonce.into(),
        );
        assert_eq!(
            challenge(s.step(v.client_first.as_bytes(), &lookup)),
            v.server_first.as_bytes()
        );
        assert_eq!(
            s.step(v.client_final.as_bytes(), &lookup),
            Step::Success {
                username: "user".into(),
                additional_data: Some(v.server_final.as_bytes().to_vec()),
            }
        );
        // Nothing more after success.
        assert_eq!(failure(s.step(b"", &lookup)), SaslFailure::MalformedRequest);
    }

    fn run_vector_client(v: &Vector) {
        let mut c = ScramClient::new(
            v.hash,
            "user",
            "pencil",
            ClientChannelBinding::None,
            v.cnonce.into(),
        )
        .unwrap();
        assert_eq!(c.mechanism(), Mechanism::Scram(v.hash));
        assert_eq!(c.client_first(), v.client_first.as_bytes());
        assert_eq!(
            c.handle_server_first(v.server_first.as_bytes()).unwrap(),
            v.client_final.as_bytes()
        );
        c.verify_server_final(v.server_final.as_bytes()).unwrap();
        // A wrong signature (last base64 char changed) is caught.
        let mut bad = v.server_final.to_owned();
        bad.replace_range(3..4, if &bad[3..4] == "A" { "B" } else { "A" });
        assert_eq!(
            c.verify_server_final(bad.as_bytes()),
            Err(SaslError::ServerSignatureMismatch)
        );
        assert_eq!(
            c.verify_server_final(b"e=invalid-proof"),
            Err(SaslError::ServerError("invalid-proof".into()))
        );
    }

    #[test]
    fn rfc5802_sha1_vector_server() {
        run_vector_server(&RFC5802);
    }

    #[test]
    fn rfc5802_sha1_vector_client() {
        run_vector_client(&RFC5802);
    }

    #[test]
    fn rfc7677_sha256_vector_server() {
        run_vector_server(&RFC7677);
    }

    #[test]
    fn rfc7677_sha256_vector_client() {
        run_vector_client(&RFC7677);
    }

    /// Runs client against server; returns the server's final step.
    fn exchange(
        client: &mut ScramClient,
        server: &mut ServerSession,
        lookup: &dyn Fn(&str, HashAlg) -> Option<ScramCredentials>,
    ) -> Step {
        let sf = match server.step(&client.client_first(), lookup) {
            Step::Challenge(c) => c,
            other => return other,
        };
        let cf = client.handle_server_first(&sf).unwrap();
        let result = server.step(&cf, lookup);
        if let Step::Success {
            additional_data: Some(v),
            ..
        } = &result
        {
            client.verify_server_final(v).unwrap();
        }
        result
    }

    fn client(h: HashAlg, user: &str, pw: &str, cb: ClientChannelBinding) -> ScramClient {
        ScramClient::new(h, user, pw, cb, "clientnonce0123456789".into()).unwrap()
    }

    fn server(m: Mechanism, cb: ChannelBindings, plus_offered: bool) -> ServerSession {
        ServerSession::new(m, cb, plus_offered, "servernonce/ABCDEF".into())
    }

    #[test]
    fn roundtrip_all_hashes() {
        let lookup = lookup_for("romeo", "secret", SALT, 16);
        for h in HashAlg::ALL {
            let mut c = client(h, "romeo", "secret", ClientChannelBinding::None);
            let mut s = server(Mechanism::Scram(h), ChannelBindings::default(), false);
            assert!(
                matches!(exchange(&mut c, &mut s, &lookup), Step::Success { ref username, .. } if username == "romeo"),
                "{h:?}"
            );
        }
    }

    #[test]
    fn sha512_roundtrip_and_wrong_password() {
        let lookup = lookup_for("romeo", "secret", SALT, 32);
        let mut c = client(
            HashAlg::Sha512,
            "romeo",
            "secret",
            ClientChannelBinding::None,
        );
        let mut s = server(
            Mechanism::Scram(HashAlg::Sha512),
            ChannelBindings::default(),
            false,
        );
        let Step::Success {
            username,
            additional_data,
        } = exchange(&mut c, &mut s, &lookup)
        else {
            panic!("SHA-512 exchange failed");
        };
        assert_eq!(username, "romeo");
        assert!(additional_data.unwrap().starts_with(b"v="));

        let mut c = client(
            HashAlg::Sha512,
            "romeo",
            "wrong",
            ClientChannelBinding::None,
        );
        let mut s = server(
            Mechanism::Scram(HashAlg::Sha512),
            ChannelBindings::default(),
            false,
        );
        assert_eq!(
            exchange(&mut c, &mut s, &lookup),
            Step::Failure {
                failure: SaslFailure::NotAuthorized,
                username: Some("romeo".into())
            }
        );
    }

    #[test]
    fn unknown_user_fails_only_at_the_end() {
        let lookup = lookup_for("romeo", "secret", SALT, 16);
        let mut c = client(
            HashAlg::Sha256,
            "nobody",
            "secret",
            ClientChannelBinding::None,
        );
        let mut s = server(
            Mechanism::Scram(HashAlg::Sha256),
            ChannelBindings::default(),
            false,
        );
        let sf = String::from_utf8(challenge(s.step(&c.client_first(), &lookup))).unwrap();
        assert!(
            sf.starts_with("r=clientnonce0123456789servernonce/ABCDEF,s="),
            "{sf}"
        );
        assert!(sf.ends_with(",i=4096"), "{sf}");
        let cf = c.handle_server_first(sf.as_bytes()).unwrap();
        assert_eq!(
            s.step(&cf, &lookup),
            Step::Failure {
                failure: SaslFailure::NotAuthorized,
                username: Some("nobody".into())
            }
        );
    }

    #[test]
    fn fake_salt_is_stable_with_a_secret() {
        let sf = |nonce: &str| {
            let mut s = ServerSession::new(
                Mechanism::Scram(HashAlg::Sha1),
                ChannelBindings::default(),
                false,
                nonce.into(),
            )
            .with_unknown_user_params(b"server secret".to_vec(), 10000);
            let c = String::from_utf8(challenge(s.step(b"n,,n=ghost,r=abc", &no_users))).unwrap();
            c.split_once(",s=").unwrap().1.to_owned()
        };
        assert_eq!(sf("nonce1"), sf("nonce2"));
        assert!(sf("nonce1").ends_with(",i=10000"));
    }

    #[test]
    fn username_escaping_and_saslprep() {
        // ',' and '=' travel as =2C and =3D; the server unescapes.
        let lookup = lookup_for("a,b=c", "pw", SALT, 8);
        let mut c = client(HashAlg::Sha1, "a,b=c", "pw", ClientChannelBinding::None);
        assert!(String::from_utf8(c.client_first())
            .unwrap()
            .contains("n=a=2Cb=3Dc,"));
        let mut s = server(
            Mechanism::Scram(HashAlg::Sha1),
            ChannelBindings::default(),
            false,
        );
        assert!(
            matches!(exchange(&mut c, &mut s, &lookup), Step::Success { ref username, .. } if username == "a,b=c")
        );

        // RFC 4013 §3: "I<U+00AD>X" prepares to "IX"; prohibited → Prep.
        assert_eq!(
            ScramCredentials::derive(HashAlg::Sha1, "I\u{ad}X", SALT, 2),
            ScramCredentials::derive(HashAlg::Sha1, "IX", SALT, 2)
        );
        assert_eq!(
            ScramCredentials::derive(HashAlg::Sha1, "\u{7}", SALT, 2),
            Err(SaslError::Prep)
        );
        assert_eq!(
            ScramCredentials::derive(HashAlg::Sha1, "x", SALT, 0),
            Err(SaslError::InvalidIterations)
        );
        // Password prepared the same way on both sides.
        let lookup = lookup_for("u", "I\u{ad}X", SALT, 8);
        let mut c = client(HashAlg::Sha256, "u", "IX", ClientChannelBinding::None);
        let mut s = server(
            Mechanism::Scram(HashAlg::Sha256),
            ChannelBindings::default(),
            false,
        );
        assert!(matches!(
            exchange(&mut c, &mut s, &lookup),
            Step::Success { .. }
        ));
    }

    #[test]
    fn channel_binding() {
        let lookup = lookup_for("romeo", "secret", SALT, 16);
        let cb = ChannelBindings {
            tls_exporter: Some(b"exporter-bytes".to_vec()),
            tls_server_end_point: Some(b"cert-hash".to_vec()),
        };
        let plus = Mechanism::ScramPlus(HashAlg::Sha256);

        // Matching tls-exporter and tls-server-end-point data.
        for binding in [
            ClientChannelBinding::TlsExporter(b"exporter-bytes".to_vec()),
            ClientChannelBinding::TlsServerEndPoint(b"cert-hash".to_vec()),
        ] {
            let mut c = client(HashAlg::Sha256, "romeo", "secret", binding);
            assert_eq!(c.mechanism(), plus);
            let mut s = server(plus, cb.clone(), true);
            assert!(matches!(
                exchange(&mut c, &mut s, &lookup),
                Step::Success { .. }
            ));
        }

        // Different data (a MITM terminating TLS) → not-authorized.
        let mut c = client(
            HashAlg::Sha256,
            "romeo",
            "secret",
            ClientChannelBinding::TlsExporter(b"other".to_vec()),
        );
        let mut s = server(plus, cb.clone(), true);
        assert_eq!(
            failure(exchange(&mut c, &mut s, &lookup)),
            SaslFailure::NotAuthorized
        );

        // Binding type the server has no data for.
        let mut c = client(
            HashAlg::Sha256,
            "romeo",
            "secret",
            ClientChannelBinding::TlsExporter(b"x".to_vec()),
        );
        let only_endpoint = ChannelBindings {
            tls_exporter: None,
            ..cb.clone()
        };
        let mut s = server(plus, only_endpoint, true);
        assert_eq!(
            failure(exchange(&mut c, &mut s, &lookup)),
            SaslFailure::NotAuthorized
        );
        let mut s = server(plus, cb.clone(), true);
        assert_eq!(
            failure(s.step(b"p=tls-unique,,n=romeo,r=abc", &lookup)),
            SaslFailure::NotAuthorized
        );

        // -PLUS without binding, or binding under a non-PLUS name.
        let mut s = server(plus, cb.clone(), true);
        assert_eq!(
            failure(s.step(b"n,,n=romeo,r=abc", &lookup)),
            SaslFailure::MalformedRequest
        );
        let mut s = server(plus, cb.clone(), true);
        assert_eq!(
            failure(s.step(b"y,,n=romeo,r=abc", &lookup)),
            SaslFailure::MalformedRequest
        );
        let mut s = server(Mechanism::Scram(HashAlg::Sha256), cb.clone(), true);
        assert_eq!(
            failure(s.step(b"p=tls-exporter,,n=romeo,r=abc", &lookup)),
            SaslFailure::MalformedRequest
        );
    }

    #[test]
    fn downgrade_flag_y() {
        let lookup = lookup_for("romeo", "secret", SALT, 16);
        // We offered -PLUS but the client says it thinks we didn't.
        let mut c = client(
            HashAlg::Sha1,
            "romeo",
            "secret",
            ClientChannelBinding::SupportedButNotOffered,
        );
        let mut s = server(
            Mechanism::Scram(HashAlg::Sha1),
            ChannelBindings::default(),
            true,
        );
        assert_eq!(
            exchange(&mut c, &mut s, &lookup),
            Step::Failure {
                failure: SaslFailure::NotAuthorized,
                username: Some("romeo".into())
            }
        );
        // We really didn't offer it: fine, and c= is "y,,".
        let mut c = client(
            HashAlg::Sha1,
            "romeo",
            "secret",
            ClientChannelBinding::SupportedButNotOffered,
        );
        let mut s = server(
            Mechanism::Scram(HashAlg::Sha1),
            ChannelBindings::default(),
            false,
        );
        assert!(matches!(
            exchange(&mut c, &mut s, &lookup),
            Step::Success { .. }
        ));
    }

    #[test]
    fn authzid() {
        let lookup = lookup_for("romeo", "secret", SALT, 16);
        let mut s = server(
            Mechanism::Scram(HashAlg::Sha1),
            ChannelBindings::default(),
            false,
        );
        assert!(matches!(
            s.step(b"n,a=romeo,n=romeo,r=abc", &lookup),
            Step::Challenge(_)
        ));
        let mut s = server(
            Mechanism::Scram(HashAlg::Sha1),
            ChannelBindings::default(),
            false,
        );
        assert_eq!(
            failure(s.step(b"n,a=juliet,n=romeo,r=abc", &lookup)),
            SaslFailure::InvalidAuthzid
        );

        let mut s = server(Mechanism::Plain, ChannelBindings::default(), false);
        assert!(matches!(
            s.step(b"romeo\0romeo\0secret", &lookup),
            Step::Success { .. }
        ));
        let mut s = server(Mechanism::Plain, ChannelBindings::default(), false);
        assert_eq!(
            failure(s.step(b"juliet\0romeo\0secret", &lookup)),
            SaslFailure::InvalidAuthzid
        );
    }

    #[test]
    fn plain() {
        let lookup = lookup_for("romeo", "secret", SALT, 16);
        let run = |input: &[u8]| {
            server(Mechanism::Plain, ChannelBindings::default(), false).step(input, &lookup)
        };
        assert_eq!(
            run(&plain_initial_response(None, "romeo", "secret")),
            Step::Success {
                username: "romeo".into(),
                additional_data: None
            }
        );
        assert_eq!(
            run(&plain_initial_response(None, "romeo", "wrong")),
            Step::Failure {
                failure: SaslFailure::NotAuthorized,
                username: Some("romeo".into())
            }
        );
        assert_eq!(
            run(&plain_initial_response(None, "nobody", "secret")),
            Step::Failure {
                failure: SaslFailure::NotAuthorized,
                username: Some("nobody".into())
            }
        );
        for bad in [
            &b"romeo\0secret"[..],
            b"\0\0",
            b"\0romeo\0",
            b"\0\0secret",
            b"a\0b\0c\0d",
            b"\xff\0romeo\0secret",
        ] {
            assert_eq!(failure(run(bad)), SaslFailure::MalformedRequest, "{bad:?}");
        }

        // Only a SHA-1 entry stored: PLAIN falls back to it.
        let sha1_only = ScramCredentials::derive(HashAlg::Sha1, "secret", SALT, 8).unwrap();
        let lookup1 = move |u: &str, h: HashAlg| {
            (u == "romeo" && h == HashAlg::Sha1).then(|| sha1_only.clone())
        };
        let mut s = server(Mechanism::Plain, ChannelBindings::default(), false);
        assert!(matches!(
            s.step(b"\0romeo\0secret", &lookup1),
            Step::Success { .. }
        ));

        // No initial response: empty challenge, then the real message.
        let mut s = server(Mechanism::Plain, ChannelBindings::default(), false);
        assert_eq!(challenge(s.step(b"", &lookup)), b"");
        assert!(matches!(
            s.step(b"\0romeo\0secret", &lookup),
            Step::Success { .. }
        ));
        let mut s = server(Mechanism::Plain, ChannelBindings::default(), false);
        assert_eq!(challenge(s.step(b"", &lookup)), b"");
        assert_eq!(failure(s.step(b"", &lookup)), SaslFailure::MalformedRequest);
    }

    #[test]
    fn scram_without_initial_response() {
        let lookup = lookup_for("romeo", "secret", SALT, 16);
        let mut c = client(
            HashAlg::Sha256,
            "romeo",
            "secret",
            ClientChannelBinding::None,
        );
        let mut s = server(
            Mechanism::Scram(HashAlg::Sha256),
            ChannelBindings::default(),
            false,
        );
        assert_eq!(challenge(s.step(b"", &lookup)), b"");
        assert!(matches!(
            exchange(&mut c, &mut s, &lookup),
            Step::Success { .. }
        ));
    }

    #[test]
    fn external_is_not_supported() {
        let mut s = server(Mechanism::External, ChannelBindings::default(), false);
        assert_eq!(
            failure(s.step(b"", &no_users)),
            SaslFailure::InvalidMechanism
        );
    }

    #[test]
    fn malformed_client_first() {
        let lookup = lookup_for("romeo", "secret", SALT, 16);
        for bad in [
            &b"garbage"[..],
            b"\xff\xfe",
            b"n,,",
            b"n,,n=romeo",
            b"n,,r=abc,n=romeo",
            b"n,,n=,r=abc",
            b"n,,n=romeo,r=",
            b"n,,n=romeo,r=a\x01b",
            b"n,,n=ro=mo,r=abc",
            b"n,,n=romeo,r=abc,junk",
            b"n,,m=ext,n=romeo,r=abc",
            b"x,,n=romeo,r=abc",
            b"p=,,n=romeo,r=abc",
            b"n,b=romeo,n=romeo,r=abc",
            b"n,a=,n=romeo,r=abc",
            b"n,,n=\x07,r=abc",
        ] {
            let mut s = server(
                Mechanism::Scram(HashAlg::Sha1),
                ChannelBindings::default(),
                false,
            );
            assert_eq!(
                failure(s.step(bad, &lookup)),
                SaslFailure::MalformedRequest,
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        // Unknown optional extensions are ignored.
        let mut s = server(
            Mechanism::Scram(HashAlg::Sha1),
            ChannelBindings::default(),
            false,
        );
        assert!(matches!(
            s.step(b"n,,n=romeo,r=abc,x=1", &lookup),
            Step::Challenge(_)
        ));
    }

    #[test]
    fn malformed_client_final() {
        let lookup = lookup_for("romeo", "secret", SALT, 16);
        let setup = || {
            let mut c = client(HashAlg::Sha1, "romeo", "secret", ClientChannelBinding::None);
            let mut s = server(
                Mechanism::Scram(HashAlg::Sha1),
                ChannelBindings::default(),
                false,
            );
            let sf = challenge(s.step(&c.client_first(), &lookup));
            let cf = String::from_utf8(c.handle_server_first(&sf).unwrap()).unwrap();
            (s, cf)
        };
        let (_, good) = setup();
        let (c, rest) = good.split_once(",r=").unwrap();
        let (nonce, proof) = rest.split_once(",p=").unwrap();
        let cases = [
            format!("c=biws,r={nonce}x,p={proof}"),         // wrong nonce
            format!("c=biws,r={},p={proof}", &nonce[..10]), // truncated nonce
            format!("c=eSws,r={nonce},p={proof}"),          // c= says "y,,"
            format!("{c},r={nonce}"),                       // no proof
            format!("{c},r={nonce},p=!!!"),                 // bad base64
            format!("{c},r={nonce},p=AAAA"),                // short proof
            format!("r={nonce},{c},p={proof}"),             // order
            format!("{c},p={proof}"),                       // no nonce
            format!("{c},r={nonce},junk,p={proof}"),        // bad extension
            String::new(),
            "\u{0}".into(),
        ];
        for bad in cases {
            let (mut s, _) = setup();
            assert_eq!(
                failure(s.step(bad.as_bytes(), &lookup)),
                SaslFailure::MalformedRequest,
                "{bad}"
            );
        }
        // A bad proof of the right length is not-authorized.
        let (mut s, _) = setup();
        let zero = B64.encode([0u8; 20]);
        assert_eq!(
            failure(s.step(format!("{c},r={nonce},p={zero}").as_bytes(), &lookup)),
            SaslFailure::NotAuthorized
        );
        // Every truncation and a few byte flips: never a panic, never success.
        for i in 0..good.len() {
            let (mut s, _) = setup();
            assert!(
                matches!(s.step(&good.as_bytes()[..i], &lookup), Step::Failure { .. }),
                "prefix {i}"
            );
        }
        for i in 0..good.len() {
            let mut b = good.clone().into_bytes();
            b[i] ^= 0x01;
            let (mut s, _) = setup();
            assert!(
                matches!(s.step(&b, &lookup), Step::Failure { .. }),
                "flip {i}"
            );
        }
        // The good message still works (sanity check of the harness).
        let (mut s, _) = setup();
        assert!(matches!(
            s.step(good.as_bytes(), &lookup),
            Step::Success { .. }
        ));
    }

    #[test]
    fn truncated_client_first_never_panics() {
        let lookup = lookup_for("romeo", "secret", SALT, 16);
        let msg = "p=tls-exporter,a=romeo,n=romeo,r=abcdef,x=y";
        let cb = ChannelBindings {
            tls_exporter: Some(b"e".to_vec()),
            tls_server_end_point: None,
        };
        for i in 0..=msg.len() {
            for m in [
                Mechanism::ScramPlus(HashAlg::Sha1),
                Mechanism::Scram(HashAlg::Sha1),
                Mechanism::Plain,
            ] {
                let mut s = server(m, cb.clone(), true);
                let _ = s.step(&msg.as_bytes()[..i], &lookup);
                let _ = s.step(&msg.as_bytes()[..i], &lookup);
            }
        }
    }

    #[test]
    fn client_rejects_bad_server_first() {
        let mk = || client(HashAlg::Sha1, "romeo", "secret", ClientChannelBinding::None);
        for bad in [
            &b""[..],
            b"r=other,s=QSXCR+Q6sek8bf92,i=4096",
            b"r=clientnonce0123456789,s=QSXCR+Q6sek8bf92,i=4096", // nothing added
            b"r=clientnonce0123456789X,s=!!,i=4096",
            b"r=clientnonce0123456789X,s=,i=4096",
            b"r=clientnonce0123456789X,s=QSXCR+Q6sek8bf92,i=0",
            b"r=clientnonce0123456789X,s=QSXCR+Q6sek8bf92,i=-1",
            b"r=clientnonce0123456789X,s=QSXCR+Q6sek8bf92,i=99999999999",
            b"r=clientnonce0123456789X,s=QSXCR+Q6sek8bf92,i=4294967295",
            b"m=x,r=clientnonce0123456789X,s=QSXCR+Q6sek8bf92,i=1",
            b"r=clientnonce0123456789X,i=1",
        ] {
            assert!(
                mk().handle_server_first(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let c = mk();
        assert!(c.verify_server_final(b"v=AAAA").is_err());
        assert!(ScramClient::new(
            HashAlg::Sha1,
            "u",
            "p",
            ClientChannelBinding::None,
            "a,b".into()
        )
        .is_err());
        assert!(ScramClient::new(
            HashAlg::Sha1,
            "",
            "p",
            ClientChannelBinding::None,
            "ab".into()
        )
        .is_err());
    }

    #[test]
    fn names() {
        for m in [
            Mechanism::Plain,
            Mechanism::External,
            Mechanism::Scram(HashAlg::Sha1),
            Mechanism::Scram(HashAlg::Sha256),
            Mechanism::Scram(HashAlg::Sha512),
            Mechanism::ScramPlus(HashAlg::Sha1),
            Mechanism::ScramPlus(HashAlg::Sha256),
            Mechanism::ScramPlus(HashAlg::Sha512),
        ] {
            assert_eq!(Mechanism::from_name(m.name()), Some(m));
        }
        assert_eq!(
            Mechanism::ScramPlus(HashAlg::Sha256).name(),
            "SCRAM-SHA-256-PLUS"
        );
        assert_eq!(Mechanism::from_name("scram-sha-1"), None);
        assert_eq!(Mechanism::from_name("DIGEST-MD5"), None);
        assert_eq!(SaslFailure::NotAuthorized.condition(), "not-authorized");
        assert_eq!(
            SaslFailure::TemporaryAuthFailure.condition(),
            "temporary-auth-failure"
        );
        assert_eq!(SaslFailure::InvalidAuthzid.condition(), "invalid-authzid");
    }
}

/// Interoperability with an independent implementation (the `rsasl`
/// crate, dev-dependency only): its client against our server, and our
/// client against its server.
#[cfg(test)]
mod rsasl_interop {
    use super::client::*;
    use super::*;
    use rsasl::callback::{Context, Request, SessionCallback, SessionData};
    use rsasl::mechanisms::scram::properties::ScramStoredPassword;
    use rsasl::prelude::{Mechname, SASLClient, SASLConfig, SASLServer, SessionError};
    use rsasl::property::AuthId;
    use rsasl::validate::NoValidation;

    const SALT: &[u8] = b"interop salt";
    const ITER: u32 = 64;

    fn lookup(user: &str, h: HashAlg) -> Option<ScramCredentials> {
        (user == "romeo").then(|| ScramCredentials::derive(h, "secret", SALT, ITER).unwrap())
    }

    /// rsasl client → our server; returns our server's final step.
    fn rsasl_client_vs_ours(mech: Mechanism, password: &str) -> Step {
        let config =
            SASLConfig::with_credentials(None, "romeo".to_string(), password.to_string()).unwrap();
        let name = Mechname::parse(mech.name().as_bytes()).unwrap();
        let mut c = SASLClient::new(config).start_suggested(&[name]).unwrap();
        let mut s = ServerSession::new(
            mech,
            ChannelBindings::default(),
            false,
            "srvnonce123".into(),
        );
        let mut out = Vec::new();
        c.step(None, &mut out).unwrap();
        loop {
            match s.step(&out, &lookup) {
                Step::Challenge(ch) => {
                    out.clear();
                    c.step(Some(&ch), &mut out).unwrap();
                }
                Step::Success {
                    username,
                    additional_data,
                } => {
                    if let Some(v) = &additional_data {
                        // rsasl must accept our server signature.
                        out.clear();
                        let state = c.step(Some(v), &mut out).unwrap();
                        assert!(!state.is_running());
                    }
                    return Step::Success {
                        username,
                        additional_data,
                    };
                }
                f @ Step::Failure { .. } => return f,
            }
        }
    }

    #[test]
    fn rsasl_client_against_our_server() {
        for mech in [
            Mechanism::Plain,
            Mechanism::Scram(HashAlg::Sha1),
            Mechanism::Scram(HashAlg::Sha256),
        ] {
            assert!(
                matches!(rsasl_client_vs_ours(mech, "secret"), Step::Success { ref username, .. } if username == "romeo"),
                "{mech:?}"
            );
            assert!(
                matches!(
                    rsasl_client_vs_ours(mech, "wrong"),
                    Step::Failure {
                        failure: SaslFailure::NotAuthorized,
                        ..
                    }
                ),
                "{mech:?}"
            );
        }
    }

    /// Serves our stored credentials to rsasl's SCRAM server.
    struct Stored(ScramCredentials);

    impl SessionCallback for Stored {
        fn callback(
            &self,
            _session_data: &SessionData,
            context: &Context,
            request: &mut Request,
        ) -> Result<(), SessionError> {
            if context.get_ref::<AuthId>() == Some("romeo") {
                request.satisfy::<ScramStoredPassword>(&ScramStoredPassword::new(
                    self.0.iterations,
                    &self.0.salt,
                    &self.0.stored_key,
                    &self.0.server_key,
                ))?;
            }
            Ok(())
        }
    }

    /// Our client → rsasl server, which verifies with keys from our
    /// `ScramCredentials::derive`. Returns whether our client accepted
    /// the server signature.
    fn ours_vs_rsasl_server(hash: HashAlg, name: &str, password: &str) -> bool {
        let creds = ScramCredentials::derive(hash, "secret", SALT, ITER).unwrap();
        let config = SASLConfig::builder()
            .with_defaults()
            .with_callback(Stored(creds))
            .unwrap();
        let mut s = SASLServer::<NoValidation>::new(config)
            .start_suggested(Mechname::parse(name.as_bytes()).unwrap())
            .unwrap();
        let mut c = ScramClient::new(
            hash,
            "romeo",
            password,
            ClientChannelBinding::None,
            "clinonce456".into(),
        )
        .unwrap();
        let mut server_first = Vec::new();
        s.step(Some(&c.client_first()), &mut server_first).unwrap();
        let client_final = c.handle_server_first(&server_first).unwrap();
        let mut server_final = Vec::new();
        if s.step(Some(&client_final), &mut server_final).is_err() {
            return false;
        }
        c.verify_server_final(&server_final).is_ok()
    }

    #[test]
    fn our_client_against_rsasl_server() {
        assert!(ours_vs_rsasl_server(HashAlg::Sha1, "SCRAM-SHA-1", "secret"));
        assert!(ours_vs_rsasl_server(
            HashAlg::Sha256,
            "SCRAM-SHA-256",
            "secret"
        ));
        assert!(!ours_vs_rsasl_server(
            HashAlg::Sha256,
            "SCRAM-SHA-256",
            "wrong"
        ));
    }
}
