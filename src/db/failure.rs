//! Sorting a failed connection or query into "retry" and "give up", with messages that name
//! the database safely and say what to do.

use super::*;

impl Db {
    /// The error after `--connect-timeout` of transient failures, the last one being `reason`.
    pub(crate) fn gave_up(&self, reason: &str) -> Error {
        Error::Unavailable(format!(
            "database unavailable at {} after {}: {reason}; check that PostgreSQL is running and reachable, or raise --connect-timeout",
            self.redacted_url,
            short(self.connect_timeout),
        ))
    }

    /// Sorts an error into retry or give up, with a message that names the URL safely.
    pub(crate) fn classify(&self, e: &sqlx::Error) -> Failure {
        let at = &self.redacted_url;
        match e {
            sqlx::Error::Database(db) => {
                let code = db.code().map(|c| c.to_string()).unwrap_or_default();
                let msg = db.message().to_string();
                match code.as_str() {
                    "28P01" | "28000" => Failure::Fatal(Error::Auth(format!(
                        "authentication refused by {at}: {msg}; check the user name and password"
                    ))),
                    "42501" => Failure::Fatal(Error::Auth(format!(
                        "permission denied at {at}: {msg}; see \"Privileges\" in the README for the grants the gate's role needs"
                    ))),
                    "3D000" => Failure::Fatal(Error::Unavailable(format!(
                        "{msg} at {at}; create the database or fix the URL"
                    ))),
                    "25006" => Failure::Fatal(Error::Unavailable(format!(
                        "the server at {at} is read-only ({msg}): a hot standby, or default_transaction_read_only is on; point the gate at the primary"
                    ))),
                    // Too many connections, server starting or shutting down, connection
                    // failures, crash recovery: all pass.
                    // A column, function, type or kind of object the gate's statements expect
                    // is not there: its tables are not the shape it made (another
                    // application's table or view under the gate's schema, or a hand edit).
                    // Retrying cannot change that; it is configuration, not availability.
                    c @ ("42703" | "42883" | "42804" | "42809" | "55000") => {
                        Failure::Fatal(Error::Config(format!(
                            "the gate's tables at {at} are not the shape the gate made ({msg}, SQLSTATE {c}): another application's table or view where the gate keeps its ledger? pass --schema naming a schema of the gate's own (docs/guide.md, \"A shared database\")"
                        )))
                    }
                    // statement_timeout from the URL's options or the role's settings: the
                    // gate bounds its own round trips, and a retry would time out again.
                    "57014" if msg.contains("statement timeout") => {
                        Failure::Fatal(Error::Config(format!(
                            "the server at {at} cancelled the gate's statement ({msg}): the gate bounds its own round trips; remove statement_timeout from the URL's options, or `ALTER ROLE <role> RESET statement_timeout` for the gate's role"
                        )))
                    }
                    c if c.starts_with("53") || c.starts_with("57") || c.starts_with("08") => {
                        Failure::Retry(format!("{msg} (SQLSTATE {c})"))
                    }
                    c => Failure::Fatal(Error::Unavailable(format!(
                        "database error at {at}: {msg} (SQLSTATE {c})"
                    ))),
                }
            }
            // rustls reports a rejected certificate (and every other handshake failure) as an
            // io::Error of kind InvalidData wrapping a rustls::Error: retrying cannot fix it.
            sqlx::Error::Io(io) if is_tls_failure(io) => Failure::Fatal(Error::Unavailable(
                format!("TLS connection to {at} failed: {io}; check sslmode and sslrootcert"),
            )),
            sqlx::Error::Io(io) => Failure::Retry(io.to_string()),
            sqlx::Error::Tls(t) => Failure::Fatal(Error::Unavailable(format!(
                "TLS connection to {at} failed: {t}; check sslmode and sslrootcert"
            ))),
            sqlx::Error::Configuration(c) => {
                Failure::Fatal(Error::Usage(format!("bad database URL {at}: {c}")))
            }
            // What the gate could not read in an answer: a bug of ours, or a table edited by
            // hand; retrying until --connect-timeout would only hide it.
            sqlx::Error::Decode(e) => Failure::Fatal(Error::Internal(format!(
                "internal error reading {at}: {e}; please report it"
            ))),
            sqlx::Error::ColumnDecode { index, source } => {
                Failure::Fatal(Error::Internal(format!(
                    "internal error reading column {index} at {at}: {source}; please report it"
                )))
            }
            sqlx::Error::ColumnNotFound(_)
            | sqlx::Error::ColumnIndexOutOfBounds { .. }
            | sqlx::Error::TypeNotFound { .. } => Failure::Fatal(Error::Internal(format!(
                "internal error reading {at}: {e}; please report it"
            ))),
            // A message the wire did not expect (a pooler restarting mid-answer): passes.
            sqlx::Error::Protocol(p) => Failure::Retry(format!("protocol error: {p}")),
            other => Failure::Retry(other.to_string()),
        }
    }

    /// The error for a database call that failed after retries were no longer an option.
    pub(crate) fn fail(&self, e: &sqlx::Error, doing: &str) -> Error {
        match self.classify(e) {
            Failure::Fatal(err) => err,
            Failure::Retry(reason) => Error::Unavailable(format!(
                "lost the database connection {doing} at {}: {reason}",
                self.redacted_url
            )),
        }
    }
}

/// Fails with a usage error naming the path when a TLS file named in the URL (or
/// `PGSSLROOTCERT`) cannot be read: sqlx would report a bare "No such file or directory", and
/// retrying cannot create the file.
pub(super) fn check_tls_files(url: &str) -> Result<()> {
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    let mut files: Vec<(String, String)> = parsed
        .query_pairs()
        .filter(|(k, _)| matches!(k.as_ref(), "sslrootcert" | "sslcert" | "sslkey"))
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect();
    if !files.iter().any(|(k, _)| k == "sslrootcert")
        && let Ok(path) = std::env::var("PGSSLROOTCERT")
    {
        files.push(("PGSSLROOTCERT".into(), path));
    }
    for (name, path) in files {
        if let Err(e) = std::fs::File::open(&path) {
            return Err(Error::Usage(format!(
                "cannot read {name} file {path:?}: {e}"
            )));
        }
    }
    Ok(())
}

/// Whether an I/O error is a TLS handshake failure (bad certificate, wrong host, no common
/// protocol) rather than a network problem.
fn is_tls_failure(io: &std::io::Error) -> bool {
    io.kind() == std::io::ErrorKind::InvalidData
        && io
            .get_ref()
            .is_some_and(|e| e.downcast_ref::<rustls::Error>().is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_broken_invariant_exits_70_at_once_and_a_wire_hiccup_is_retried() {
        let db = Db::new(
            "postgresql://app:pw@127.0.0.1:1/app",
            "migrations-gate/test",
            Duration::from_secs(1),
        )
        .expect("a valid URL");
        match db.classify(&crate::sql::invariant("the query returned no row")) {
            Failure::Fatal(e) => assert_eq!(e.exit_code(), 70, "{e}"),
            Failure::Retry(r) => panic!("a bug of ours was retried: {r}"),
        }
        assert!(matches!(
            db.classify(&sqlx::Error::Protocol("unexpected message".into())),
            Failure::Retry(_)
        ));
    }
}
