//! One replica's view of the database, the lock and the ledger ([`Replica`]): what every step of
//! the protocol shares, from the waiter's first read ([`crate::waiting`]) to the holder's last
//! write ([`crate::holding`]).

use std::time::Duration;

use tracing::info;

use crate::application::Application;
use crate::db::{self, Conn, Db, Failure, OwnEnd};
use crate::error::{Error, Result};
use crate::identity::Identity;
use crate::ledger::{Ledger, Outcome};
use crate::lock::{self, LockKey, Scope};
use crate::route::{self, Route};

/// The start of the gate's default `application_name` (`migrations-gate/<hostname>`).
pub(crate) const GATE_NAME_PREFIX: &str = "migrations-gate/";

/// Ends the transaction of a [`Replica::create_ledger`] whose DDL was denied.
const ROLLBACK: &str = "ROLLBACK";

/// Who holds the lock, for messages.
#[derive(Debug, Clone)]
pub(crate) struct HolderNote {
    /// The holder, and what to do when it is not a gate.
    pub(crate) text: String,
    /// The backend PID of a holder that is not a gate.
    pub(crate) foreign: Option<i32>,
}

impl HolderNote {
    fn plain(text: String) -> HolderNote {
        HolderNote {
            text,
            foreign: None,
        }
    }
}

/// Where the database and the lock are, as the command line gave them (validated by the CLI),
/// shared by every command.
#[derive(Debug, Clone)]
pub(crate) struct Target {
    /// The database URL, exactly as given (never logged; see [`crate::db::redact_url`]).
    pub(crate) database_url: String,
    /// The advisory lock.
    pub(crate) lock: LockKey,
    /// Schema of the ledger.
    pub(crate) schema: String,
    /// How long to keep retrying a database that is not up yet (`--connect-timeout`).
    pub(crate) connect_timeout: Duration,
    /// application_name of our connections.
    pub(crate) application_name: String,
    /// How the lock is held (`--lock-scope`).
    pub(crate) lock_scope: Scope,
}

/// This machine's host name (the pod name in Kubernetes), for `application_name` and the ledger.
pub(crate) fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".into())
}

/// One replica's view of the lock and the ledger.
pub(crate) struct Replica {
    pub(crate) target: Target,
    pub(crate) db: Db,
    pub(crate) ledger: Ledger,
    pub(crate) release: Option<String>,
    /// The application it migrates for (`migrate`, `run`), recorded with each attempt and
    /// compared before following a done release ([`crate::application`]).
    pub(crate) application: Option<Application>,
    /// The release its attempts' and apps' sessions are tagged with, when not its own: a
    /// contract step (`contract:R`) tags with `R`, so that its sessions count as `R`'s
    /// ([`crate::contract`]).
    pub(crate) tag_release: Option<String>,
    host: String,
}

impl Replica {
    /// Prepares this replica's view; fails on a malformed URL.
    pub(crate) fn new(target: Target, release: Option<String>) -> Result<Replica> {
        let db = Db::new(
            &target.database_url,
            &target.application_name,
            target.connect_timeout,
        )?;
        let ledger = Ledger::new(&target.schema, &target.lock);
        Ok(Replica {
            application: None,
            tag_release: None,
            target,
            db,
            ledger,
            release,
            host: hostname(),
        })
    }

    /// This replica may take the lock (`migrate`, `run`, `reset`): on a host list it connects
    /// to the read-write host ([`Db::for_holder`]); `wait` and `status` go where the URL says.
    pub(crate) fn for_holder(mut self) -> Replica {
        self.db = self.db.for_holder();
        self
    }

    pub(crate) fn lock(&self) -> &LockKey {
        &self.target.lock
    }

    /// What this gate treats as its own: its lock's full key and its ledger.
    pub(crate) fn identity(&self) -> &Identity {
        self.ledger.identity()
    }

    /// This machine's host name, for the records.
    pub(crate) fn host(&self) -> &str {
        &self.host
    }

    pub(crate) fn release(&self) -> Option<&str> {
        self.release.as_deref()
    }

    /// The release its sessions' tags carry ([`Replica::tag_release`], else its own).
    pub(crate) fn tagged_release(&self) -> Option<&str> {
        self.tag_release.as_deref().or(self.release())
    }

    /// What a waiter waits for, for messages.
    pub(crate) fn waiting_for(&self) -> String {
        match self.release() {
            Some(r) if self.tag_release.is_some() => {
                format!("the contract step ({r:?}) to run")
            }
            Some(r) => format!("release {r:?} to be migrated"),
            None => "our turn to migrate".into(),
        }
    }

    /// Who holds the lock, for messages. A holder whose `application_name` is not a gate's
    /// (neither [`GATE_NAME_PREFIX`] nor ours) while no attempt is `running` is not a gate: a
    /// leftover `psql` holding the same key, say. The message says so, and how to end it.
    pub(crate) async fn describe_holder(&self, conn: &mut Conn) -> HolderNote {
        let c = match conn.pg().await {
            Ok(c) => c,
            Err(e) => return HolderNote::plain(format!("unknown ({e})")),
        };
        let h = match lock::holder(c, self.lock()).await {
            Ok(Some(h)) => h,
            Ok(None) => return HolderNote::plain("nobody (about to be taken)".into()),
            Err(e) => return HolderNote::plain(format!("unknown ({e})")),
        };
        let named_like_a_gate = h.application_name.starts_with(GATE_NAME_PREFIX)
            || h.application_name == self.target.application_name;
        // A gate with another --application-name (a pod name) has its attempt `running`, or
        // is about to record one (a taker-over waiting out a vanished holder), or held this
        // lock under that name before; no ledger yet means no gate ever held this lock here.
        let gate = named_like_a_gate
            || self.ledger.attempts(c, None, 20).await.is_ok_and(|a| {
                a.first().is_some_and(|a| a.outcome == Outcome::Running)
                    || a.iter().any(|a| a.holder == h.application_name)
            });
        if gate {
            return HolderNote::plain(h.to_string());
        }
        HolderNote {
            text: format!(
                "{h}, which does not look like a migrations-gate (its application_name is not a gate's, no attempt is running, and no recent attempt was held under that name): a session holding the same advisory lock key, such as a leftover psql; if it should not hold it, end it with `SELECT pg_terminate_backend({})`",
                h.pid
            ),
            foreign: Some(h.pid),
        }
    }

    /// What sits between us and PostgreSQL ([`route::judge_route`]: direct only when proven), and
    /// the lock scope it implies (unless `--lock-scope` fixes it).
    pub(crate) async fn detect_route(
        &self,
        conn: &mut Conn,
    ) -> Result<(Route, Scope), sqlx::Error> {
        let (route, scope, why) = self.judge_route(conn).await?;
        info!(?route, ?scope, why, "connection route detected");
        Ok((route, scope))
    }

    /// [`Replica::detect_route`] without the log line, with why: the proof, or which part of it
    /// failed (`check` shows it).
    pub(crate) async fn judge_route(
        &self,
        conn: &mut Conn,
    ) -> Result<(Route, Scope, String), sqlx::Error> {
        let server = route::server_side(conn.pg().await?).await?;
        let own = self.db.own_end();
        let backend_parent = match own {
            OwnEnd::Unix { .. } => db::parent_pid(server.pid),
            OwnEnd::Tcp(_) => None,
        };
        let (route, why) = route::judge_route(&server, &own, backend_parent);
        let scope = match self.target.lock_scope {
            Scope::Auto => route.scope(),
            fixed => fixed,
        };
        Ok((route, scope, why))
    }

    /// Creates what is missing of the ledger ([`crate::schema::Tables::create_ledger`]); a
    /// missing privilege gets the grants to ask for.
    pub(crate) async fn create_ledger(&self, conn: &mut Conn) -> Result<(), Failure> {
        let c = conn.pg().await.map_err(|e| self.db.classify(&e))?;
        match self.ledger.tables().create_ledger(c).await {
            Ok(()) => Ok(()),
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501") => {
                // The DDL ran in one transaction, now aborted: end it, then see what was
                // missing. Only the index missing means the table is there but not ours.
                let tables = self.ledger.tables();
                let only_index = crate::sql::query(c, ROLLBACK.into()).await.is_ok()
                    && tables
                        .inspect(c)
                        .await
                        .is_ok_and(|f| f.schema && f.table && !f.index);
                let (role, at) = (self.db.username(), &self.db.redacted_url);
                Err(Failure::Fatal(Error::Auth(if only_index {
                    tables.index_grants(role, at, db.message())
                } else {
                    tables.ledger_grants(role, at, db.message())
                })))
            }
            Err(e) => Err(self.db.classify(&e)),
        }
    }
}

#[cfg(test)]
mod tests {
    /// Effect: tests/privileges.rs (a ledger that lost its index names the CREATE INDEX its
    /// owner must run: the denied DDL's transaction is ended, then the ledger inspected).
    #[test]
    fn rollback_after_denied_ddl() {
        insta::assert_snapshot!(super::ROLLBACK);
    }
}
