//! What a gate treats as its own: its lock's full 64-bit key *and* the ledger it writes (its
//! schema). A database is often shared by several applications, each with its own lock and
//! ledger; everything the gate ends, waits for, refuses because of or prunes is matched on this
//! whole identity, never on a part of either (a `--lock-id` below 2^32 has a zero high half, and
//! attempt numbers start at 1 in every ledger).
//!
//! | what | form |
//! |---|---|
//! | a child's session tag (`application_name`) | `mgate:<key>:<ledger>:<release>:<attempt>` |
//! | the `LISTEN`/`NOTIFY` channel | `migrations_gate_<key as u64>_<ledger>` |
//! | the waiting slots (two-int advisory locks) | first key: 32 bits of SHA-256 of key and schema |
//! | a shared directory's markers | `.migrations-gate-<key>-<ledger>-<release>` |
//!
//! `<key>` is the lock key in 16 hex digits (`pg_locks.classid` then `objid`, each 8 digits);
//! `<ledger>` the first 32 bits of SHA-256 of the schema's name, in hex.

use sha2::{Digest, Sha256};

use crate::lock::LockKey;

/// A gate's lock and the ledger it writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Identity {
    lock: LockKey,
    schema: String,
}

impl Identity {
    /// The identity of the gate that holds `lock` and writes its ledger in `schema`.
    pub(crate) fn new(lock: &LockKey, schema: &str) -> Identity {
        Identity {
            lock: lock.clone(),
            schema: schema.to_string(),
        }
    }

    /// The lock key in 16 hex digits: `pg_locks.classid` and `objid`, 8 digits each.
    pub(crate) fn key_hex(&self) -> String {
        format!("{:016x}", self.lock.key as u64)
    }

    /// The ledger: the first 32 bits of SHA-256 of the schema's name, in hex.
    pub(crate) fn ledger_hex(&self) -> String {
        hex::encode(&Sha256::digest(self.schema.as_bytes())[..4])
    }

    /// `<key>:<ledger>`, the identity's part of a session tag.
    pub(crate) fn tag_field(&self) -> String {
        format!("{}:{}", self.key_hex(), self.ledger_hex())
    }

    /// The `LISTEN`/`NOTIFY` channel on which the holder announces that an attempt ended (an
    /// identifier of at most 45 bytes: within `NAMEDATALEN`).
    pub(crate) fn channel(&self) -> String {
        format!(
            "migrations_gate_{}_{}",
            self.lock.key as u64,
            self.ledger_hex()
        )
    }

    /// The first key of the two-int advisory locks that count waiting connections (two-int
    /// locks never collide with bigint ones): 32 bits of SHA-256 of the key and the schema.
    pub(crate) fn slot_space(&self) -> i32 {
        let mut h = Sha256::new();
        h.update(self.lock.key.to_be_bytes());
        h.update(self.schema.as_bytes());
        let d = h.finalize();
        i32::from_be_bytes([d[0], d[1], d[2], d[3]])
    }

    /// The start of the names of this identity's shared-directory markers.
    pub(crate) fn marker_prefix(&self) -> String {
        format!(".migrations-gate-{}-{}-", self.key_hex(), self.ledger_hex())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_lock_ids_and_other_ledgers_never_share_an_identity() {
        let a = Identity::new(&LockKey::from_id(11), "iso_a");
        let b = Identity::new(&LockKey::from_id(12), "iso_b");
        let c = Identity::new(&LockKey::from_id(11), "iso_b");
        for (x, y) in [(&a, &b), (&a, &c), (&b, &c)] {
            assert_ne!(x.tag_field(), y.tag_field());
            assert_ne!(x.channel(), y.channel());
            assert_ne!(x.marker_prefix(), y.marker_prefix());
            assert_ne!(x.slot_space(), y.slot_space());
        }
        assert_eq!(a.key_hex(), "000000000000000b");
        let named = Identity::new(&LockKey::from_name("migrations-gate"), "migrations_gate");
        assert_eq!(named.key_hex().len(), 16);
        assert!(named.channel().len() <= 45, "{}", named.channel());
        assert!(
            Identity::new(&LockKey::from_id(-1), "s").channel().len() <= 45,
            "a negative key is read as u64"
        );
    }
}
