//! Which application a release was migrated for. Two applications on one database with the
//! gate's defaults (one lock name, one ledger schema) share one release namespace, and release
//! IDs repeat across applications (`1.4.0`, `latest`): without more, the second application
//! would find "its" release done and start without its migration ever running.
//!
//! The holder records, in its attempt row (`<schema>.ledger.app`), a fingerprint of what makes
//! its application: the command that migrates (`migrate -- CMD`, `run --migrate CMD`, or the app
//! itself for `run -- APP` without `--migrate`), or the name given with `--app`. A replica about
//! to follow a done release compares its own; a different one is another application's release,
//! and the replica refuses (exit 78) instead of starting unmigrated. Replicas of one release run
//! one command, so they agree without any flag; a new command comes with a new release, whose
//! row records it anew. A row without a fingerprint (written by a gate before 0.2, or in a ledger
//! the role may not alter) is not compared.
//!
//! The fingerprint is `<salt>:<hash>`: 8 random bytes and the first 8 bytes of
//! SHA-256(salt ‖ identity), in hex. The command's words never reach the database, and the salt
//! keeps equal commands of different rows from looking alike.

use sha2::{Digest, Sha256};

/// What identifies an application for its release's record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Application {
    /// `command` or `app`, NUL, then the command's words (each followed by NUL) or the name.
    identity: Vec<u8>,
    /// For messages: what the identity is made of.
    source: Source,
}

/// What an [`Application`] was made from.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Source {
    Command,
    Name(String),
}

/// A recorded fingerprint compared with this replica's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Compared {
    /// The same application.
    Same,
    /// Another application recorded the release.
    Other,
    /// Nothing to compare: no fingerprint recorded, or one this gate cannot read.
    Unknown,
}

impl Application {
    /// The application that migrates with `argv`.
    pub(crate) fn of_command(argv: &[String]) -> Application {
        let mut identity = b"command\0".to_vec();
        for word in argv {
            identity.extend_from_slice(word.as_bytes());
            identity.push(0);
        }
        Application {
            identity,
            source: Source::Command,
        }
    }

    /// The application named `name` (`--app`).
    pub(crate) fn named(name: &str) -> Application {
        let mut identity = b"app\0".to_vec();
        identity.extend_from_slice(name.as_bytes());
        Application {
            identity,
            source: Source::Name(name.to_string()),
        }
    }

    /// A fresh fingerprint for the ledger: a new salt every time.
    pub(crate) fn fingerprint(&self) -> String {
        let salt = fastrand::u64(..).to_be_bytes();
        format!("{}:{}", hex::encode(salt), self.hash(&salt))
    }

    /// Compares with a fingerprint the ledger recorded (`None`: none recorded).
    pub(crate) fn compare(&self, recorded: Option<&str>) -> Compared {
        let Some((salt, hash)) = recorded.and_then(|r| r.split_once(':')) else {
            return Compared::Unknown;
        };
        match hex::decode(salt) {
            Ok(salt) if salt.len() == 8 && hash.len() == 16 => {
                if self.hash(&salt) == hash {
                    Compared::Same
                } else {
                    Compared::Other
                }
            }
            _ => Compared::Unknown,
        }
    }

    /// What this replica's identity is, for the refusal: its command, or its `--app` name.
    pub(crate) fn describe(&self) -> String {
        match &self.source {
            Source::Command => "this replica's migration command".into(),
            Source::Name(n) => format!("this replica's --app {n:?}"),
        }
    }

    fn hash(&self, salt: &[u8]) -> String {
        let mut h = Sha256::new();
        h.update(salt);
        h.update(&self.identity);
        hex::encode(&h.finalize()[..8])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &[&str]) -> Vec<String> {
        s.iter().map(|w| w.to_string()).collect()
    }

    #[test]
    fn the_same_command_matches_and_another_does_not() {
        let x = Application::of_command(&words(&["psql", "-c", "create table app_x ()"]));
        let y = Application::of_command(&words(&["psql", "-c", "create table app_y ()"]));
        let recorded = x.fingerprint();
        assert_eq!(x.compare(Some(&recorded)), Compared::Same);
        assert_eq!(y.compare(Some(&recorded)), Compared::Other);
        // Salted: the same command never records the same text twice.
        assert_ne!(recorded, x.fingerprint());
        // Word boundaries count: "a b" is not "a" "b".
        let joined = Application::of_command(&words(&["a b"]));
        let split = Application::of_command(&words(&["a", "b"]));
        assert_eq!(split.compare(Some(&joined.fingerprint())), Compared::Other);
    }

    #[test]
    fn a_name_is_not_a_command_and_nothing_recorded_is_not_compared() {
        let named = Application::named("shop");
        let cmd = Application::of_command(&words(&["shop"]));
        assert_eq!(cmd.compare(Some(&named.fingerprint())), Compared::Other);
        assert_eq!(named.compare(None), Compared::Unknown);
        assert_eq!(named.compare(Some("garbage")), Compared::Unknown);
        assert_eq!(named.compare(Some("zz:0011")), Compared::Unknown);
    }
}
