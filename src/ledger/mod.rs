//! The release ledger: one row per migration attempt, in `<schema>.ledger` (created by the gate:
//! its DDL is in [`crate::schema`]). [`rows`] are its row types, [`reads`] what replicas and
//! `status` read, [`transitions`] every write.
//!
//! A release is done when a row with outcome `done` exists for its lock key and release ID. Only
//! the lock holder writes rows, and it commits the `done` row before it frees the lock, so a
//! replica that reads `done` knows the migration it depends on has committed. A unique index
//! makes a second `done` row for the same release impossible.
//!
//! # Who writes which outcome
//! | outcome | written by | in | under the lock's proof |
//! |---|---|---|---|
//! | `running` | the holder, once it holds the lock and reads the release not done | [`Ledger::begin`] | yes, same statement |
//! | `done`, `failed` | the holder, before it frees the lock | [`Ledger::finish`] | yes, same statement |
//! | `failed` (`fenced: ...`) | a holder that lost its lock session, from a new connection | [`Ledger::record_fenced`] | no: only a row still `running` |
//! | `abandoned` | the next holder, after the fencing wait and once the sessions are gone | [`Ledger::abandon_stale`] | yes, same statement |
//! | (rows removed) | `reset` | [`Ledger::forget`] | no: an operator's act |
//!
//! A row that is not `running` is never overwritten.

use crate::identity::Identity;
use crate::lock::LockKey;
use crate::schema::Tables;

mod reads;
mod rows;
mod transitions;

pub(crate) use rows::*;

/// The ledger of one lock in one schema.
#[derive(Debug)]
pub(crate) struct Ledger {
    tables: Tables,
    lock: LockKey,
    /// The lock and this schema: the channel the holder notifies on.
    identity: Identity,
    /// Whether [`Ledger::is_done`] also reads the `--same-env` key ([`Ledger::read_env_key`]).
    env_key: bool,
}

impl Ledger {
    /// The ledger for `lock` in `schema`.
    pub(crate) fn new(schema: &str, lock: &LockKey) -> Ledger {
        Ledger {
            tables: Tables::new(schema),
            lock: lock.clone(),
            identity: Identity::new(lock, schema),
            env_key: false,
        }
    }

    /// Makes [`Ledger::is_done`] read the `--same-env` key too (same statement, no extra round
    /// trip), for replicas that compare variables.
    pub(crate) fn read_env_key(&mut self) {
        self.env_key = true;
    }

    /// Its lock and schema: what the gate treats as its own ([`crate::identity`]).
    pub(crate) fn identity(&self) -> &Identity {
        &self.identity
    }

    /// The tables of its schema (the ledger is created with [`Tables::create_ledger`]).
    pub(crate) fn tables(&self) -> &Tables {
        &self.tables
    }

    fn table(&self) -> String {
        self.tables.ledger()
    }
}

#[cfg(test)]
mod tests;
