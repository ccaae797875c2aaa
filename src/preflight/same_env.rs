//! The same-env round trip: after the ledger read, a replica records its fingerprints and
//! reads the release's reference in one statement, then says in one line what differs. Kept
//! apart from [`super::compile`] because this is the part that connects, writes and may meet a
//! read-only standby or a missing privilege.

use tracing::{info, warn};

use super::fingerprint::EnvKey;
use super::presets::Level;
use super::store::{Reference, Store};
use super::{Compared, OnMismatch, Preflight, budget, names, shared_dir};
use crate::db::{Conn, close};
use crate::error::{Error, Result};
use crate::ledger::Seen;
use crate::replica::Replica;
use crate::schema::Tables;
use crate::sql::{is_missing_relation, is_read_only};

impl Preflight {
    /// A follower (or `wait`) whose release is done: the contract check and the older-release
    /// check on what the ledger read saw, then the variables. With no `--same-env` and no
    /// preset this costs nothing: no connection, no round trip.
    pub(crate) async fn follower(
        &self,
        replica: &Replica,
        seen: Seen,
        conn: Option<Conn>,
    ) -> Result<()> {
        // A newer release's contract step ([`crate::contract`]) removed what this release's code
        // may need: refused also with `--allow-older-release`; a rollback past a contract needs
        // the schema from before it (restored with the database, which takes the step's ledger
        // row back too).
        if let (Some(contracted), Some(release)) = (&seen.contracted, replica.release()) {
            return Err(Error::Config(format!(
                "release {release:?} is older than release {:?}, whose contract step ran on this database at {} (by {}): \
                 the schema was contracted for {:?}, and {release:?}'s code may need what it removed; \
                 roll forward to {:?} or later, or restore the database from before that contract step",
                contracted.release,
                contracted.finished_at,
                contracted.holder,
                contracted.release,
                contracted.release,
            )));
        }
        if let (Some(newer), Some(release)) = (&seen.newer, replica.release()) {
            let line = format!(
                "release {release:?} is older than release {:?}, which was migrated after it on this database \
                 (by {} at {}): an old replica must not start on a schema that moved on. Deploy {:?} everywhere \
                 (stop the old replicas: Kubernetes strategy Recreate, Swarm stop-first); for a deliberate rollback \
                 after restoring the database, pass --allow-older-release",
                newer.release, newer.holder, newer.finished_at, newer.release
            );
            if !self.allow_older {
                return Err(Error::Config(line));
            }
            warn!("--allow-older-release: starting anyway; {line}");
        }
        let key = seen.env_key.and_then(|k| EnvKey::from_hex(&k.0));
        self.compare(replica, key, conn).await
    }

    /// The holder, before it migrates: the variables only (its release is not done, so it is
    /// the newest).
    pub(crate) async fn holder(&self, replica: &Replica) -> Result<()> {
        self.compare(replica, None, None).await
    }

    /// Records this replica's fingerprints and compares them with the release's reference.
    async fn compare(
        &self,
        replica: &Replica,
        key: Option<EnvKey>,
        conn: Option<Conn>,
    ) -> Result<()> {
        if self.compared.is_empty() {
            return Ok(());
        }
        let Some(release) = replica.release() else {
            return Ok(());
        };
        let tokens = self.marker_tokens(replica, release).await?;
        let store = Store::new(&replica.target.schema, replica.lock());
        let mut conn = match conn {
            Some(c) => c,
            None => replica.db.connect().await?,
        };
        let result = async {
            let c = conn.pg().await?;
            let mut key = key;
            let mut ensured = false;
            loop {
                let k = match key.take() {
                    Some(k) => k,
                    None => {
                        if !ensured {
                            store.ensure(c).await?;
                            ensured = true;
                        }
                        store.env_key(c).await?
                    }
                };
                let mine = self.fingerprints(&k, &tokens);
                match store
                    .record(c, release, &mine, &replica.target.application_name, replica.host())
                    .await
                {
                    // A read-only standby (followers may start there): compare, record nothing.
                    Err(e) if is_read_only(&e) => {
                        info!(
                            "read-only standby: comparing with the release's reference without recording"
                        );
                        return store.compare_without_recording(c, release, &mine).await;
                    }
                    Err(e) if is_missing_relation(&e) && !ensured => continue,
                    Ok(references) => {
                        self.report_budget(c, &store, release).await;
                        return Ok(references);
                    }
                    Err(e) => return Err(e),
                }
            }
        }
        .await;
        close(conn).await;
        let references = match result {
            Ok(references) => references,
            Err(e) if is_read_only(&e) => {
                warn!("read-only standby without a --same-env record yet: variables not compared");
                return Ok(());
            }
            Err(sqlx::Error::Database(db)) if db.code().as_deref() == Some("42501") => {
                let tables = Tables::new(&replica.target.schema);
                return Err(Error::Auth(tables.preflight_grants(db.message())));
            }
            Err(e) => {
                return Err(replica
                    .db
                    .fail(&e, "while comparing --same-env fingerprints"));
            }
        };
        self.judge(release, &references)
    }

    /// The connection budget of the release's replicas seen so far ([`budget`]): a warning when
    /// over it, an INFO line otherwise. Best effort: it only informs.
    async fn report_budget(&self, c: &mut sqlx::PgConnection, store: &Store, release: &str) {
        let Some((per, workers)) = &self.budget else {
            return;
        };
        match store.replicas_and_limit(c, release).await {
            Ok((replicas, limit)) => match budget::judge(per, *workers, replicas, limit) {
                Ok(line) => info!(release, "{line}"),
                Err(line) => warn!(release, "preset open-webui: {line}"),
            },
            Err(e) => warn!(error = %e, "could not read the connection budget"),
        }
    }

    /// The token of the release's marker in each shared directory, read or created
    /// ([`shared_dir`]). A directory that is missing, not a directory or read-only is named in
    /// one line: an error (78) under `--require-shared-dir`, else a warning, and not compared.
    async fn marker_tokens(
        &self,
        replica: &Replica,
        release: &str,
    ) -> Result<Vec<(String, String)>> {
        let mut tokens = Vec::new();
        for c in &self.compared {
            let Some(dir) = &c.shared_dir else { continue };
            match shared_dir::token(dir, replica.identity(), release).await {
                Ok(token) => tokens.push((c.name.clone(), token)),
                Err(why) => {
                    let line = format!(
                        "the shared directory {} must be shared by every replica of release {release:?}, but {why}; \
                         mount one shared volume there on every replica (a ReadWriteMany PersistentVolumeClaim, or one shared mount)",
                        dir.display()
                    );
                    match c.level {
                        Level::Fail => return Err(Error::Config(line)),
                        Level::Warn => warn!(release, "{line}"),
                    }
                }
            }
        }
        Ok(tokens)
    }

    /// This replica's fingerprint of each compared variable and shared directory (by its
    /// marker's token; a directory without one in `tokens` is not compared).
    fn fingerprints(&self, key: &EnvKey, tokens: &[(String, String)]) -> Vec<(String, String)> {
        self.compared
            .iter()
            .filter_map(|c| match &c.shared_dir {
                None => Some((c.name.clone(), key.fingerprint(&c.name))),
                Some(_) => tokens
                    .iter()
                    .find(|(n, _)| *n == c.name)
                    .map(|(n, t)| (n.clone(), key.fingerprint_of(n, Some(t.as_bytes())))),
            })
            .collect()
    }

    /// Turns the comparison into the one line an operator acts on.
    fn judge(&self, release: &str, references: &[Reference]) -> Result<()> {
        let differ: Vec<(&Compared, &Reference)> = self
            .compared
            .iter()
            .filter_map(|c| {
                references
                    .iter()
                    .find(|r| r.variable == c.name && !r.agrees)
                    .map(|r| (c, r))
            })
            .collect();
        if differ.is_empty() {
            info!(
                release,
                variables = %names(&self.compared),
                "same environment as the release's first replica"
            );
            return Ok(());
        }
        let describe = |list: &[&(&Compared, &Reference)]| -> String {
            let what: Vec<String> = list
                .iter()
                .map(|(c, r)| {
                    if let Some(dir) = &c.shared_dir {
                        return format!(
                            "the shared directory {} is not the one release {release:?} first started with (on {} at {}): \
                             it holds another marker, so files written through one replica are missing on the others; \
                             mount one shared volume there on every replica (a ReadWriteMany PersistentVolumeClaim, or one shared mount)",
                            dir.display(), r.replica, r.set_at
                        );
                    }
                    let why = c
                        .rule
                        .map(|(preset, rule)| format!("; preset {preset}: {}", rule.why))
                        .unwrap_or_default();
                    format!(
                        "{} differs from the value release {release:?} first started with (on {} at {}{why})",
                        c.name, r.replica, r.set_at
                    )
                })
                .collect();
            let vars: Vec<&str> = list.iter().map(|(c, _)| c.name.as_str()).collect();
            format!(
                "{}: set the same {} on every replica; if you changed it on purpose, deploy it as a new release \
                 or run `migrations-gate reset --release {release} --env`",
                what.join(", "),
                vars.join(", ")
            )
        };
        let (fail, warn_only): (Vec<_>, Vec<_>) = differ
            .iter()
            .partition(|(c, _)| c.level == Level::Fail && self.on_mismatch == OnMismatch::Fail);
        if !warn_only.is_empty() {
            warn!(release, "{}", describe(&warn_only));
        }
        if fail.is_empty() {
            return Ok(());
        }
        Err(Error::Config(describe(&fail)))
    }
}
