//! What replicas and `status` read from the ledger.

use sqlx::postgres::PgConnection;

use super::{
    AttemptRow, CONTRACT_STEP, ContractState, Ledger, NOT_COUNTED, Newer, Outcome, ReadKey, Seen,
    Stale, contract_step,
};
use crate::lock::{Proof, format_held, lock_held};
use crate::schema::StoredKey;
use crate::sql::{Cols, is_missing_relation, lit, one_row, query, query_if_exists, query_scalar};

impl Ledger {
    /// Whether `release` is recorded done (`None` when the ledger does not exist yet), and
    /// whether the server is a read-only standby: one round trip, the whole fast path. The same
    /// statement finds the newest release done after this one (the older-release check), the
    /// newest contract step of another release done after it ([`CONTRACT_STEP`]) and, with
    /// [`Ledger::read_env_key`], the `--same-env` key.
    pub(crate) async fn is_done(
        &self,
        conn: &mut PgConnection,
        release: &str,
        read_key: ReadKey,
    ) -> Result<Seen, sqlx::Error> {
        // A ledger made by an older gate has no key table yet: then read without it.
        for with_key in [self.env_key && read_key == ReadKey::IfCompared, false] {
            let sql = self.is_done_statement(release, with_key);
            match query(conn, sql).await {
                Ok(rows) => {
                    let row = one_row(&rows)?;
                    let text = |i: usize| row.opt(i);
                    // Three columns from `first`: release, holder, time.
                    let newer_at = |first: usize| -> Result<Option<Newer>, sqlx::Error> {
                        Ok(match (text(first)?, text(first + 1)?, text(first + 2)?) {
                            (Some(release), Some(holder), finished_at) => Some(Newer {
                                release,
                                holder,
                                finished_at: finished_at.unwrap_or_default(),
                            }),
                            _ => None,
                        })
                    };
                    let (newer, contracted) = (newer_at(2)?, newer_at(6)?);
                    return Ok(Seen {
                        done: Some(text(0)?.as_deref() == Some("true")),
                        standby: text(1)?.as_deref() == Some("true"),
                        newer,
                        contracted,
                        app: text(5)?,
                        env_key: if with_key {
                            text(9)?.map(StoredKey)
                        } else {
                            None
                        },
                    });
                }
                Err(e) if is_missing_relation(&e) && with_key => continue,
                Err(e) if is_missing_relation(&e) => break,
                Err(e) => return Err(e),
            }
        }
        Ok(Seen {
            done: None,
            standby: query_scalar(conn, "SELECT pg_is_in_recovery()::text".into())
                .await?
                .as_deref()
                == Some("true"),
            ..Seen::default()
        })
    }

    /// How many attempts were left `running` by a holder that vanished, how long to wait
    /// before migrating, and whether our lock session still holds the lock (`proof`): until the
    /// latest vanished holder's last heartbeat plus its fencing time (heartbeat timeout + kill
    /// grace), by which point a holder that merely lost its session has surely stopped its
    /// migration. A holder killed outright took its migration with it (the guard), but we cannot
    /// tell the two apart from here. Nothing is marked yet: a taker-over that dies while it waits
    /// leaves the rows `running`, so the next one waits too ([`Ledger::abandon_stale`] marks
    /// them after the wait).
    pub(crate) async fn stale(
        &self,
        conn: &mut PgConnection,
        proof: &Proof,
    ) -> Result<Stale, sqlx::Error> {
        let sql = self.stale_statement(proof);
        let rows = query(conn, sql).await?;
        let row = one_row(&rows)?;
        Ok(Stale {
            running: row.parse(0)?,
            wait_secs: row.parse(1)?,
            held: row.parse(2)?,
        })
    }

    /// What this ledger holds, for an operator whose `reset` found nothing: this lock's newest
    /// releases, and the other locks recorded in the same ledger. One line.
    pub(crate) async fn holds(&self, conn: &mut PgConnection) -> Result<String, sqlx::Error> {
        let rows = query_if_exists(conn, self.holds_statement()).await?;
        let Some(row) = rows.first() else {
            return Ok("the ledger does not exist".into());
        };
        let row = Cols(row);
        let (releases, others) = (row.text(0)?, row.text(1)?);
        let mut seen = if releases.is_empty() {
            "no release recorded for this lock".to_string()
        } else {
            format!("this lock's newest releases: {releases}")
        };
        if !others.is_empty() {
            seen.push_str(&format!("; other locks in this ledger: {others}"));
        }
        Ok(seen)
    }

    /// The failed attempts of `release` that count against `--max-failures`, newest first, at
    /// most `limit`: **only a migration's own failure counts**. An attempt whose `detail` starts
    /// with one of [`NOT_COUNTED`]'s prefixes ended for a reason that says nothing about the
    /// migration, and does not count: fenced (the holder lost its connection), refused (the
    /// migration never started: a preflight refusal, `--other-releases`, a wait the gate gave
    /// up, a command it could not start), interrupted (the platform stopped the gate: a pod
    /// deleted, a rollout, a drain). Neither do `abandoned` attempts (a crash), nor, for ledgers
    /// written before the prefixes, exit 78 (a refusal). What counts: the migration exited
    /// non-zero on its own, ran past `--migration-timeout`, or (`run` with a probe) the app
    /// exited or was not ready within `--ready-timeout`. `reset --release R` removes the
    /// attempts, and the count starts again.
    pub(crate) async fn failures(
        &self,
        conn: &mut PgConnection,
        release: &str,
        limit: u32,
    ) -> Result<Vec<AttemptRow>, sqlx::Error> {
        let failed = Self::counted_failure();
        let rows = self
            .attempts_where(conn, Some(release), &failed, limit)
            .await?;
        Ok(rows)
    }

    /// The newest `limit` attempts (of `release` only, if given), newest first. An absent
    /// ledger has none.
    pub(crate) async fn attempts(
        &self,
        conn: &mut PgConnection,
        release: Option<&str>,
        limit: u32,
    ) -> Result<Vec<AttemptRow>, sqlx::Error> {
        self.attempts_where(conn, release, "true", limit).await
    }

    /// The attempts of `release` (all without one) whose row meets the SQL condition `cond`,
    /// newest first, at most `limit`.
    async fn attempts_where(
        &self,
        conn: &mut PgConnection,
        release: Option<&str>,
        cond: &str,
        limit: u32,
    ) -> Result<Vec<AttemptRow>, sqlx::Error> {
        let sql = self.attempts_statement(release, cond, limit);
        query_if_exists(conn, sql)
            .await?
            .iter()
            .map(|r| {
                let row = Cols(r);
                let t = |i: usize| row.text(i);
                Ok(AttemptRow {
                    id: row.parse(0)?,
                    release: Some(t(1)?).filter(|s| !s.is_empty()),
                    outcome: row.parse(2)?,
                    holder: t(3)?,
                    host: t(4)?,
                    pid: row.parse(5)?,
                    started_at: t(6)?,
                    finished_at: Some(t(7)?).filter(|s| !s.is_empty()),
                    duration_secs: row.parse_opt(8)?,
                    exit_code: row.parse_opt(9)?,
                    detail: t(10)?,
                })
            })
            .collect()
    }

    /// The statement of [`Ledger::stale`].
    pub(super) fn stale_statement(&self, proof: &Proof) -> String {
        format_held!(
            proof,
            concat!(
                "SELECT count(*)::text, \
                        coalesce(greatest(0, extract(epoch FROM max(coalesce(heartbeat_at, started_at) \
                            + make_interval(secs => fence_secs)) - clock_timestamp())), 0)::float8::text, \
                        (",
                lock_held!(),
                ")::text \
                 FROM {table} WHERE lock_key = {key} AND outcome = 'running'"
            ),
            table = self.table(),
            key = self.lock.key,
        )
    }

    /// The statement of [`Ledger::is_done`]: done, standby, the newer release (release,
    /// holder, time), the done row's app, the newer contract step (its release, holder, time)
    /// and, `with_key`, the `--same-env` key.
    pub(super) fn is_done_statement(&self, release: &str, with_key: bool) -> String {
        // A contract step counts only for a release done after this one (a step run late, after
        // a newer release, contracts nothing this one's successors need), and never this
        // release's own step.
        format!(
            "SELECT EXISTS (SELECT 1 FROM {table} WHERE lock_key = {key} AND release = {release} AND outcome = 'done')::text, \
                    pg_is_in_recovery()::text, n.release, n.holder, n.finished_at, \
                    (SELECT to_jsonb(d) ->> 'app' FROM {table} d WHERE d.lock_key = {key} AND d.release = {release} AND d.outcome = 'done'), \
                    c.release, c.holder, c.finished_at{key_column} \
             FROM (SELECT 1) one LEFT JOIN LATERAL ( \
                 SELECT release, holder, to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"') AS finished_at \
                 FROM {table} WHERE lock_key = {key} AND outcome = 'done' AND release IS NOT NULL \
                 AND NOT starts_with(release, {step}) \
                 AND id > (SELECT id FROM {table} WHERE lock_key = {key} AND release = {release} AND outcome = 'done') \
                 ORDER BY id DESC LIMIT 1) n ON true \
             LEFT JOIN LATERAL ( \
                 SELECT substr(release, {after_step}) AS release, holder, \
                        to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS \"UTC\"') AS finished_at \
                 FROM {table} s WHERE lock_key = {key} AND outcome = 'done' AND starts_with(release, {step}) \
                 AND release <> {own_step} \
                 AND EXISTS (SELECT 1 FROM {table} x WHERE x.lock_key = {key} AND x.outcome = 'done' \
                             AND x.release = substr(s.release, {after_step}) \
                             AND x.id > (SELECT id FROM {table} WHERE lock_key = {key} AND release = {release} AND outcome = 'done')) \
                 ORDER BY id DESC LIMIT 1) c ON true",
            table = self.table(),
            key = self.lock.key,
            release = lit(release),
            step = lit(CONTRACT_STEP),
            after_step = CONTRACT_STEP.len() + 1,
            own_step = lit(&contract_step(release)),
            key_column = if with_key {
                format!(
                    ", (SELECT encode(key, 'hex') FROM {})",
                    self.tables.env_key()
                )
            } else {
                String::new()
            },
        )
    }

    /// The releases of this lock first recorded after `release` was done (none if it is not
    /// done), contract steps left out: the releases newer than it, done or under way.
    pub(crate) async fn newer_than(
        &self,
        conn: &mut PgConnection,
        release: &str,
    ) -> Result<Vec<String>, sqlx::Error> {
        query_if_exists(conn, self.newer_than_statement(release))
            .await?
            .iter()
            .map(|r| Cols(r).text(0))
            .collect()
    }

    /// The contract step of `release` (else of the newest release done), when this lock's
    /// ledger has ever recorded a contract step or that release's step has a row: `None` for a
    /// lock that never used `contract`, so that `status` and `check` stay quiet there.
    pub(crate) async fn contract_state(
        &self,
        conn: &mut PgConnection,
        release: Option<&str>,
    ) -> Result<Option<ContractState>, sqlx::Error> {
        let rows = query_if_exists(conn, self.contract_state_statement(release)).await?;
        let Some(row) = rows.first() else {
            return Ok(None);
        };
        let row = Cols(row);
        let (Some(release), used) = (row.opt(0)?, row.parse::<bool>(1)?) else {
            return Ok(None);
        };
        let last: Option<Outcome> = row.parse_opt(2)?;
        if last.is_none() && !used {
            return Ok(None);
        }
        let done = row.parse::<bool>(3)?;
        let state = match last {
            Some(outcome) => outcome.as_str(),
            None if done => "pending",
            None => "waiting for its release",
        };
        Ok(Some(ContractState {
            step: contract_step(&release),
            release,
            state: state.to_string(),
        }))
    }

    /// The statement of [`Ledger::contract_state`]: the release, whether this lock ever ran a
    /// contract step, the outcome of the newest attempt of its step, whether it is done.
    pub(super) fn contract_state_statement(&self, release: Option<&str>) -> String {
        format!(
            "WITH r AS (SELECT coalesce({release}, (SELECT release FROM {table} WHERE lock_key = {key} AND outcome = 'done' \
                                                     AND release IS NOT NULL AND NOT starts_with(release, {step}) \
                                                     ORDER BY id DESC LIMIT 1)) AS release) \
             SELECT r.release, \
                    EXISTS (SELECT 1 FROM {table} WHERE lock_key = {key} AND starts_with(release, {step}))::text, \
                    (SELECT outcome FROM {table} WHERE lock_key = {key} AND release = {step} || r.release ORDER BY id DESC LIMIT 1), \
                    EXISTS (SELECT 1 FROM {table} WHERE lock_key = {key} AND release = r.release AND outcome = 'done')::text \
             FROM r",
            release = release.map(lit).unwrap_or_else(|| "NULL::text".into()),
            table = self.table(),
            key = self.lock.key,
            step = lit(CONTRACT_STEP),
        )
    }

    /// The statement of [`Ledger::newer_than`].
    pub(super) fn newer_than_statement(&self, release: &str) -> String {
        format!(
            "SELECT release FROM {table} WHERE lock_key = {key} AND release IS NOT NULL \
               AND NOT starts_with(release, {step}) \
             GROUP BY release \
             HAVING min(id) > (SELECT id FROM {table} WHERE lock_key = {key} AND release = {release} AND outcome = 'done') \
             ORDER BY min(id)",
            table = self.table(),
            key = self.lock.key,
            release = lit(release),
            step = lit(CONTRACT_STEP),
        )
    }

    /// The statement of [`Ledger::attempts_where`]; `cond` is [`Ledger::failures`]' condition
    /// or `true`.
    pub(super) fn attempts_statement(
        &self,
        release: Option<&str>,
        cond: &str,
        limit: u32,
    ) -> String {
        let filter = release
            .map(|r| format!(" AND release = {}", lit(r)))
            .unwrap_or_default();
        format!(
            "SELECT id::text, coalesce(release, ''), outcome, holder, host, pid::text, \
                    coalesce(to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), started_at::text), \
                    coalesce(to_char(finished_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), finished_at::text, ''), \
                    coalesce(CASE WHEN isfinite(started_at) AND isfinite(coalesce(finished_at, clock_timestamp())) \
                             THEN extract(epoch FROM coalesce(finished_at, clock_timestamp()) - started_at)::float8::text END, ''), \
                    coalesce(exit_code::text, ''), coalesce(detail, '') \
             FROM {} WHERE lock_key = {}{filter} AND ({cond}) ORDER BY id DESC LIMIT {limit}",
            self.table(),
            self.lock.key
        )
    }

    /// The statement of [`Ledger::holds`].
    pub(super) fn holds_statement(&self) -> String {
        format!(
            "SELECT coalesce((SELECT string_agg(release, ', ') FROM (SELECT release FROM {table} \
                               WHERE lock_key = {key} AND release IS NOT NULL \
                               GROUP BY release ORDER BY max(id) DESC LIMIT 5) r), ''), \
                    coalesce((SELECT string_agg(DISTINCT lock_name, ', ') FROM {table} WHERE lock_key <> {key}), '')",
            table = self.table(),
            key = self.lock.key
        )
    }

    /// The condition of [`Ledger::failures`]: a failed attempt that counts.
    pub(super) fn counted_failure() -> String {
        let not_counted: String = NOT_COUNTED
            .iter()
            .map(|p| {
                format!(
                    " AND NOT starts_with(coalesce(detail, ''), {})",
                    lit(p.prefix())
                )
            })
            .collect();
        format!(
            "outcome = 'failed'{not_counted} AND coalesce(exit_code, 0) <> {}",
            crate::error::EXIT_CONFIG
        )
    }
}
