//! A host list (libpq, "Specifying Multiple Hosts"): the hosts are tried in the order given (or
//! shuffled, with `load_balance_hosts=random`) until one connects and suits
//! `target_session_attrs`. A refused password ends the search at once, as in libpq; any other
//! failure moves on to the next host. sqlx connects to one host, so the list is the gate's loop.

use super::*;

/// What a connected server is, for `target_session_attrs`.
#[derive(Debug, Clone, Copy)]
struct ServerState {
    /// `pg_is_in_recovery()`: a standby.
    in_recovery: bool,
    /// `transaction_read_only` of a new session (libpq's read-write test: `SHOW
    /// transaction_read_only`, so `default_transaction_read_only=on` counts as read-only).
    read_only: bool,
}

impl ServerState {
    fn describe(self) -> &'static str {
        match (self.in_recovery, self.read_only) {
            (true, _) => "a standby",
            (false, true) => "a primary with default_transaction_read_only on",
            (false, false) => "read-write",
        }
    }
}

impl SessionAttrs {
    /// Whether a server in `state` suits these attributes (libpq's rules).
    fn accepts(self, state: ServerState) -> bool {
        match self {
            SessionAttrs::Any => true,
            SessionAttrs::ReadWrite => !state.read_only,
            SessionAttrs::ReadOnly => state.read_only,
            SessionAttrs::Primary => !state.in_recovery,
            SessionAttrs::Standby | SessionAttrs::PreferStandby => state.in_recovery,
        }
    }
}

impl Db {
    /// The `target_session_attrs` this gate connects with: a replica that may migrate needs a
    /// read-write host of a list, whatever the URL says (the app's own sessions may go where the
    /// URL says). On one host, the URL's own setting stands, except that a would-be holder leaves
    /// a standby to the waiting loop, which says so at once and retries.
    fn wanted(&self) -> SessionAttrs {
        match (self.hosts.len(), self.for_holder) {
            (1, true) => SessionAttrs::Any,
            (_, true) => SessionAttrs::ReadWrite,
            (_, false) => self.attrs,
        }
    }

    /// The hosts' indices in the order to try them.
    fn order(&self) -> Vec<usize> {
        let mut order: Vec<usize> = (0..self.hosts.len()).collect();
        if self.load_balance {
            fastrand::shuffle(&mut order);
        }
        order
    }

    /// One connection attempt on the host list: the first host, in order, that connects and
    /// suits [`Db::wanted`]; each host's attempt is bounded by `limit` (and by
    /// [`Db::connect_try_timeout`]).
    pub(crate) async fn connect_once(&self, limit: Duration) -> Result<Conn, Failure> {
        let wanted = self.wanted();
        // prefer-standby: a standby if there is one, else any host (a second pass).
        let passes: &[SessionAttrs] = match wanted {
            SessionAttrs::PreferStandby => &[SessionAttrs::Standby, SessionAttrs::Any],
            _ => std::slice::from_ref(&wanted),
        };
        let order = self.order();
        let mut skipped: Vec<String> = Vec::new();
        let mut unsuitable = false;
        for (pass_no, pass) in passes.iter().enumerate() {
            for &i in &order {
                let host = &self.hosts[i];
                let mut conn = match self.connect_host(i, limit).await {
                    Ok(conn) => conn,
                    Err(Failure::Retry(reason)) if self.hosts.len() == 1 => {
                        skipped.push(reason);
                        continue;
                    }
                    Err(Failure::Retry(reason)) => {
                        if pass_no == 0 {
                            skipped.push(format!("{}: {reason}", host.shown));
                        }
                        continue;
                    }
                    Err(fatal) => return Err(fatal),
                };
                if *pass != SessionAttrs::Any {
                    match server_state(&mut conn).await {
                        Ok(state) if pass.accepts(state) => {}
                        Ok(state) => {
                            unsuitable = true;
                            skipped.push(format!("{}: {}", host.shown, state.describe()));
                            super::close(conn).await;
                            continue;
                        }
                        Err(e) => {
                            skipped.push(format!("{}: {e}", host.shown));
                            continue;
                        }
                    }
                }
                self.remember(i, why(self.hosts.len(), wanted, self.for_holder, &skipped));
                return Ok(conn);
            }
        }
        let reason = match (self.hosts.len(), wanted) {
            (1, _) => skipped.concat(),
            (n, SessionAttrs::Any) => {
                format!("none of the {n} hosts answered ({})", skipped.join("; "))
            }
            (n, w) => format!(
                "none of the {n} hosts is {} ({})",
                w.name(),
                skipped.join("; ")
            ),
        };
        if unsuitable
            && !self
                .said_no_host
                .swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            warn!(
                "{reason}: retrying for up to {} (--connect-timeout) in case a failover is under way",
                short(self.connect_timeout)
            );
        }
        Err(Failure::Retry(reason))
    }
}

/// Why the host at the end of `skipped` was chosen, for `check` and the log.
fn why(hosts: usize, wanted: SessionAttrs, for_holder: bool, skipped: &[String]) -> String {
    let mut why = match (hosts, wanted) {
        (1, _) => "the only host".to_string(),
        (n, SessionAttrs::Any) => format!("the first of {n} hosts that answered"),
        (n, w) => format!("the first of {n} hosts that is {}", w.name()),
    };
    if hosts > 1 && for_holder {
        why.push_str(" (a replica that may migrate needs the primary)");
    }
    if !skipped.is_empty() {
        why.push_str(&format!("; skipped {}", skipped.join("; ")));
    }
    why
}

/// Whether the server is a standby and whether a new session is read-only: libpq's tests for
/// `target_session_attrs`, in one round trip.
async fn server_state(conn: &mut Conn) -> Result<ServerState, sqlx::Error> {
    let c = conn.pg().await?;
    let (in_recovery, read_only): (bool, bool) = deadline(
        ROUND_TRIP_TIMEOUT,
        sqlx::query_as(
            "SELECT pg_is_in_recovery(), current_setting('transaction_read_only') = 'on'",
        )
        .fetch_one(c),
    )
    .await?;
    Ok(ServerState {
        in_recovery,
        read_only,
    })
}
