//! The replicated state machine: every write to the node's durable state is
//! a [`Command`] value, applied by one [`apply`] function.
//!
//! `apply` is deterministic: it reads and writes only the store, takes no
//! clock and no randomness (salts, timestamps and ids are inside the
//! command, chosen by whoever proposed it). That is what lets the Raft issue
//! put this exact function under consensus, replaying the same log on every
//! node to the same state.

use serde::{Deserialize, Serialize};
use xmpp::sasl::ScramCredentials;

use crate::store::{keys, Account, Batch, Store, StoreError};

/// A state change, as it will travel in the Raft log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    /// Create `user` (a normalised bare JID). Fails if it exists.
    CreateAccount {
        user: String,
        credentials: Vec<ScramCredentials>,
    },
    /// Create many accounts at once; existing ones are replaced when
    /// `update_existing`, skipped otherwise.
    ImportAccounts {
        accounts: Vec<(String, Vec<ScramCredentials>)>,
        update_existing: bool,
    },
    SetPassword {
        user: String,
        credentials: Vec<ScramCredentials>,
    },
    /// Remove the account and everything stored for it.
    DeleteAccount { user: String },
    /// Queue a message (already stamped with `<delay/>`) for an offline
    /// user; refused when the queue holds `max` messages (XEP-0160).
    StoreOffline {
        user: String,
        stanza: String,
        max: u32,
    },
    /// Remove and return the user's queued messages, oldest first.
    TakeOffline { user: String },
}

/// What a successfully applied command reports back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Response {
    Done,
    Imported {
        created: u64,
        updated: u64,
        skipped: u64,
    },
    Offline(Vec<String>),
}

/// Why a command was refused. Deterministic refusals are part of the
/// replicated outcome; `Store` errors are local faults.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("account {0} already exists")]
    AccountExists(String),
    #[error("no account {0}")]
    NoSuchAccount(String),
    #[error("offline queue of {user} is full ({max} messages)")]
    OfflineFull { user: String, max: u32 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

fn encode(account: &Account) -> Vec<u8> {
    // Serializing a plain struct into a Vec cannot fail.
    postcard::to_allocvec(account).unwrap_or_default()
}

/// Applies one command at log position `index`.
pub fn apply(store: &Store, index: u64, cmd: Command) -> Result<Response, ApplyError> {
    let mut batch = Batch::default();
    batch.put(keys::APPLIED, &index.to_be_bytes());
    let result = match cmd {
        Command::CreateAccount { user, credentials } => {
            let key = keys::account(&user);
            if store.get(&key)?.is_some() {
                Err(ApplyError::AccountExists(user))
            } else {
                batch.put(&key, &encode(&Account { credentials }));
                Ok(Response::Done)
            }
        }
        Command::ImportAccounts {
            accounts,
            update_existing,
        } => {
            let (mut created, mut updated, mut skipped) = (0, 0, 0);
            let mut seen = std::collections::HashSet::new();
            for (user, credentials) in accounts {
                let key = keys::account(&user);
                let exists = store.get(&key)?.is_some() || !seen.insert(user);
                match (exists, update_existing) {
                    (true, false) => skipped += 1,
                    (true, true) => updated += 1,
                    (false, _) => created += 1,
                }
                if !exists || update_existing {
                    batch.put(&key, &encode(&Account { credentials }));
                }
            }
            Ok(Response::Imported {
                created,
                updated,
                skipped,
            })
        }
        Command::SetPassword { user, credentials } => {
            let key = keys::account(&user);
            if store.get(&key)?.is_none() {
                Err(ApplyError::NoSuchAccount(user))
            } else {
                batch.put(&key, &encode(&Account { credentials }));
                Ok(Response::Done)
            }
        }
        Command::DeleteAccount { user } => {
            let key = keys::account(&user);
            if store.get(&key)?.is_none() {
                Err(ApplyError::NoSuchAccount(user))
            } else {
                batch.delete(&key);
                for kv in store.scan_prefix(&keys::offline_prefix(&user)) {
                    batch.delete(&kv?.0);
                }
                Ok(Response::Done)
            }
        }
        Command::StoreOffline { user, stanza, max } => {
            let prefix = keys::offline_prefix(&user);
            let count = store.scan_prefix(&prefix).count();
            if count >= max as usize {
                Err(ApplyError::OfflineFull { user, max })
            } else {
                // Sequence numbers continue after the newest stored message,
                // so order is kept without a counter of its own.
                let next = match store.last_with_prefix(&prefix)? {
                    Some(k) => k
                        .get(prefix.len()..)
                        .and_then(|s| <[u8; 8]>::try_from(s).ok())
                        .map_or(0, |b| u64::from_be_bytes(b) + 1),
                    None => 0,
                };
                batch.put(&keys::offline(&user, next), stanza.as_bytes());
                Ok(Response::Done)
            }
        }
        Command::TakeOffline { user } => {
            let mut out = Vec::new();
            for kv in store.scan_prefix(&keys::offline_prefix(&user)) {
                let (k, v) = kv?;
                batch.delete(&k);
                out.push(String::from_utf8_lossy(&v).into_owned());
            }
            Ok(Response::Offline(out))
        }
    };
    // A refused command still advances the applied index, as a Raft entry would.
    if result.is_err() {
        let mut only_index = Batch::default();
        only_index.put(keys::APPLIED, &index.to_be_bytes());
        store.apply(only_index)?;
    } else {
        store.apply(batch)?;
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use xmpp::jid::BareJid;
    use xmpp::sasl::HashAlg;

    fn creds(pw: &str) -> Vec<ScramCredentials> {
        vec![
            ScramCredentials::derive(HashAlg::Sha256, pw, b"0123456789abcdef", 4096)
                .expect("derive"),
        ]
    }

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = Store::open(dir.path()).expect("open");
        (dir, s)
    }

    #[test]
    fn account_lifecycle_is_applied_in_order() {
        let (_d, s) = store();
        let alice = BareJid::parse("alice@example.com").expect("jid");
        let user = alice.to_string();
        apply(
            &s,
            1,
            Command::CreateAccount {
                user: user.clone(),
                credentials: creds("a"),
            },
        )
        .expect("create");
        assert!(matches!(
            apply(
                &s,
                2,
                Command::CreateAccount {
                    user: user.clone(),
                    credentials: creds("b")
                }
            ),
            Err(ApplyError::AccountExists(_))
        ));
        assert_eq!(
            s.account(&alice)
                .expect("read")
                .expect("exists")
                .credentials,
            creds("a")
        );
        apply(
            &s,
            3,
            Command::SetPassword {
                user: user.clone(),
                credentials: creds("c"),
            },
        )
        .expect("passwd");
        assert_eq!(
            s.account(&alice)
                .expect("read")
                .expect("exists")
                .credentials,
            creds("c")
        );
        apply(&s, 4, Command::DeleteAccount { user: user.clone() }).expect("delete");
        assert!(s.account(&alice).expect("read").is_none());
        assert_eq!(s.applied_index().expect("index"), 4);
    }

    #[test]
    fn offline_queue_is_ordered_bounded_and_drained() {
        let (_d, s) = store();
        let user = "bob@example.com".to_string();
        for i in 0..3 {
            apply(
                &s,
                i + 1,
                Command::StoreOffline {
                    user: user.clone(),
                    stanza: format!("<m{i}/>"),
                    max: 3,
                },
            )
            .expect("store");
        }
        assert!(matches!(
            apply(
                &s,
                4,
                Command::StoreOffline {
                    user: user.clone(),
                    stanza: "<x/>".into(),
                    max: 3
                }
            ),
            Err(ApplyError::OfflineFull { max: 3, .. })
        ));
        let got = apply(&s, 5, Command::TakeOffline { user: user.clone() }).expect("take");
        assert_eq!(
            got,
            Response::Offline(vec!["<m0/>".into(), "<m1/>".into(), "<m2/>".into()])
        );
        assert_eq!(
            apply(&s, 6, Command::TakeOffline { user }).expect("take"),
            Response::Offline(vec![])
        );
    }

    #[test]
    fn import_counts_created_updated_and_skipped() {
        let (_d, s) = store();
        apply(
            &s,
            1,
            Command::CreateAccount {
                user: "a@x".into(),
                credentials: creds("1"),
            },
        )
        .expect("create");
        let accounts = vec![
            ("a@x".to_string(), creds("2")),
            ("b@x".to_string(), creds("2")),
        ];
        let r = apply(
            &s,
            2,
            Command::ImportAccounts {
                accounts: accounts.clone(),
                update_existing: false,
            },
        )
        .expect("import");
        assert_eq!(
            r,
            Response::Imported {
                created: 1,
                updated: 0,
                skipped: 1
            }
        );
        let r = apply(
            &s,
            3,
            Command::ImportAccounts {
                accounts,
                update_existing: true,
            },
        )
        .expect("import");
        assert_eq!(
            r,
            Response::Imported {
                created: 0,
                updated: 2,
                skipped: 0
            }
        );
    }

    #[test]
    fn same_log_gives_same_state() {
        let log = [
            Command::CreateAccount {
                user: "a@x".into(),
                credentials: creds("1"),
            },
            Command::StoreOffline {
                user: "a@x".into(),
                stanza: "<m/>".into(),
                max: 10,
            },
            Command::CreateAccount {
                user: "a@x".into(),
                credentials: creds("2"),
            },
        ];
        let dump = |s: &Store| {
            s.scan_prefix(b"")
                .collect::<Result<Vec<_>, _>>()
                .expect("scan")
        };
        let (_d1, s1) = store();
        let (_d2, s2) = store();
        for (i, c) in log.iter().enumerate() {
            let _ = apply(&s1, i as u64 + 1, c.clone());
            let _ = apply(&s2, i as u64 + 1, c.clone());
        }
        assert_eq!(dump(&s1), dump(&s2));
    }
}
