//! Account operations shared by `clusterctl` (through the admin service)
//! and in-band registration: passwords become SCRAM credentials here, and
//! only the credentials enter the state machine.

use rand::RngCore;
use xmpp::jid::BareJid;
use xmpp::sasl::{HashAlg, ScramCredentials};

use crate::cluster::state_machine::{ApplyError, Command, Response};
use crate::Server;

#[derive(Debug, thiserror::Error)]
pub enum AccountError {
    #[error("`{0}` is not a valid user JID ({1}); use user@domain")]
    BadJid(String, String),
    #[error("`{0}` is not a virtual host of this node; serve it with --vhost or [[vhosts]]")]
    UnknownHost(String),
    #[error("the password is empty or contains characters SASLprep forbids")]
    BadPassword,
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Parses `user@vhost`, requiring a localpart and a served domain.
pub fn parse_user(server: &Server, jid: &str) -> Result<BareJid, AccountError> {
    let bare =
        BareJid::parse(jid).map_err(|e| AccountError::BadJid(jid.to_owned(), e.to_string()))?;
    if bare.node().is_none() {
        return Err(AccountError::BadJid(jid.to_owned(), "no localpart".into()));
    }
    if !server.config.is_local_domain(bare.domain()) {
        return Err(AccountError::UnknownHost(bare.domain().to_owned()));
    }
    Ok(bare)
}

/// Where PBKDF2 runs: on tokio's blocking threads, at most one job per
/// core at a time, never on the async workers. A flood of PLAIN logins
/// with wrong passwords, or of registrations, then queues here while
/// every other session keeps being served.
pub struct KdfPool {
    permits: tokio::sync::Semaphore,
}

impl Default for KdfPool {
    fn default() -> Self {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        KdfPool {
            permits: tokio::sync::Semaphore::new(cores),
        }
    }
}

impl KdfPool {
    /// Runs `f` on the pool; `None` if the runtime is shutting down.
    pub async fn run<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Option<T> {
        let _permit = self.permits.acquire().await.ok()?;
        tokio::task::spawn_blocking(f).await.ok()
    }
}

/// [`credentials`] on the node's [`KdfPool`].
async fn credentials_off_workers(
    server: &Server,
    password: &str,
) -> Result<Vec<ScramCredentials>, AccountError> {
    let iterations = server.config.auth.scram_iterations;
    let password = password.to_owned();
    server
        .kdf
        .run(move || credentials(&password, iterations))
        .await
        .ok_or_else(|| AccountError::Internal("the node is shutting down".into()))?
}

/// SCRAM credentials for every hash we offer, each with its own random salt.
pub fn credentials(password: &str, iterations: u32) -> Result<Vec<ScramCredentials>, AccountError> {
    if password.is_empty() {
        return Err(AccountError::BadPassword);
    }
    let mut rng = rand::thread_rng();
    HashAlg::ALL
        .iter()
        .map(|&h| {
            let mut salt = [0u8; 16];
            rng.fill_bytes(&mut salt);
            ScramCredentials::derive(h, password, &salt, iterations)
                .map_err(|_| AccountError::BadPassword)
        })
        .collect()
}

pub async fn create(server: &Server, user: &BareJid, password: &str) -> Result<(), AccountError> {
    let credentials = credentials_off_workers(server, password).await?;
    server
        .cluster
        .write(Command::CreateAccount {
            user: user.to_string(),
            credentials,
        })
        .await?;
    Ok(())
}

pub async fn set_password(
    server: &Server,
    user: &BareJid,
    password: &str,
) -> Result<(), AccountError> {
    let credentials = credentials_off_workers(server, password).await?;
    server
        .cluster
        .write(Command::SetPassword {
            user: user.to_string(),
            credentials,
        })
        .await?;
    Ok(())
}

/// Deletes the account and closes its sessions with `<not-authorized/>`.
/// Every local contact first loses the account from their roster, as if
/// the user had removed them (RFC 6121 §2.5.2): subscriptions cancelled
/// both ways (the contact gets `unsubscribed` and `unavailable`), the item
/// removed with a roster push; so a name registered again later inherits
/// no one's subscription.
pub async fn delete(server: &Server, user: &BareJid) -> Result<(), AccountError> {
    let roster = server
        .store()
        .roster(&user.to_string())
        .map_err(|e| AccountError::Internal(e.to_string()))?;
    for (c, item) in roster {
        let Ok(contact) = BareJid::parse(&c) else {
            continue;
        };
        if !server.config.is_local_domain(contact.domain()) {
            continue;
        }
        crate::modules::roster::cancel_subscriptions(server, user, &contact, &item).await;
        match server
            .cluster
            .write(
                Command::RosterRemove {
                    user: c.clone(),
                    contact: user.to_string(),
                }
                .limited(&server.config.limits),
            )
            .await
        {
            Ok(Response::Roster { ver, .. }) => {
                crate::modules::roster::push(server, &contact, ver, &user.to_string(), None);
            }
            Ok(_) | Err(ApplyError::Refused(_)) => {}
            Err(e) => return Err(e.into()),
        }
    }
    let deleted = server
        .cluster
        .write(Command::DeleteAccount {
            user: user.to_string(),
        })
        .await?;
    if let Response::Unblocked(entries) = deleted {
        for (blocker, jid) in entries {
            if let Ok(b) = BareJid::parse(&blocker) {
                crate::modules::blocking::push(server, &b, false, &[jid]);
            }
        }
    }
    server.sessions.close_user(
        user,
        xmpp::error::StreamError::NotAuthorized,
        "account deleted",
    );
    Ok(())
}

/// Creates many accounts in batches through the state machine.
pub async fn import(
    server: &Server,
    users: Vec<(BareJid, String)>,
    update_existing: bool,
) -> Result<(u64, u64, u64), AccountError> {
    let iterations = server.config.auth.scram_iterations;
    let (mut c, mut u, mut s) = (0, 0, 0);
    // 500 per command keeps each log entry small enough to replicate.
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());
    for chunk in users.chunks(500) {
        // PBKDF2 is the expensive part: spread it over every core, off the
        // async workers.
        let per_worker = chunk.len().div_ceil(workers).max(1);
        let jobs: Vec<_> = chunk
            .chunks(per_worker)
            .map(|part| {
                let part = part.to_vec();
                tokio::task::spawn_blocking(move || {
                    part.into_iter()
                        .map(|(jid, pw)| {
                            credentials(&pw, iterations).map(|cr| (jid.to_string(), cr))
                        })
                        .collect::<Result<Vec<_>, _>>()
                })
            })
            .collect();
        let mut accounts = Vec::with_capacity(chunk.len());
        for job in jobs {
            accounts.extend(
                job.await
                    .map_err(|e| AccountError::Internal(e.to_string()))??,
            );
        }
        if let Response::Imported {
            created,
            updated,
            skipped,
        } = server
            .cluster
            .write(Command::ImportAccounts {
                accounts,
                update_existing,
            })
            .await?
        {
            c += created;
            u += updated;
            s += skipped;
        }
    }
    Ok((c, u, s))
}
