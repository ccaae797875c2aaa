//! Where the database is: `--database-url`, `--database-url-file`, `DATABASE_URL` or libpq's
//! environment, turned into the plain [`Target`] the rest of the gate receives.

use super::*;

impl DbArgs {
    /// Checks the connection and lock flags.
    pub(crate) fn target(&self) -> Result<Target> {
        let database_url = self.resolve_database_url()?;
        let application_name = self.application_name(&database_url);
        let lock = match self.lock_id {
            Some(id) => LockKey::from_id(id),
            None => {
                if self.lock.is_empty() {
                    return Err(Error::Usage("--lock must not be empty".into()));
                }
                LockKey::from_name(&self.lock)
            }
        };
        if self.schema.is_empty() {
            return Err(Error::Usage("--schema must not be empty".into()));
        }
        Ok(Target {
            database_url,
            lock,
            schema: self.schema.clone(),
            connect_timeout: self.connect_timeout,
            application_name,
            lock_scope: self.lock_scope,
        })
    }

    /// The gate's `application_name`: `--application-name`, else the database URL's
    /// `application_name=`, else `migrations-gate/<hostname>`.
    fn application_name(&self, database_url: &str) -> String {
        self.application_name
            .clone()
            .or_else(|| {
                ConnUrl::parse(database_url)
                    .ok()
                    .and_then(|u| u.application_name)
            })
            .unwrap_or_else(|| format!("{GATE_NAME_PREFIX}{}", hostname()))
    }

    fn resolve_database_url(&self) -> Result<String> {
        if let Some(path) = &self.database_url_file {
            let text = std::fs::read_to_string(path).map_err(|e| {
                Error::Usage(format!(
                    "cannot read --database-url-file {}: {e}",
                    path.display()
                ))
            })?;
            let url = text.trim();
            if url.is_empty() {
                return Err(Error::Usage(format!(
                    "--database-url-file {} is empty",
                    path.display()
                )));
            }
            return Ok(url.to_string());
        }
        if let Some(url) = self.database_url.as_deref().filter(|u| !u.is_empty()) {
            return Ok(url.to_string());
        }
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => Ok(url),
            _ if libpq_environment_is_set() => Ok(String::new()),
            _ => Err(Error::Usage(
                "no database URL: set --database-url, MIGRATIONS_GATE_DATABASE_URL, DATABASE_URL or --database-url-file (or libpq's PGHOST, PGPORT, PGDATABASE, PGUSER)"
                    .into(),
            )),
        }
    }
}

/// Whether libpq's environment names a database without a URL (as psql connects with it): the
/// empty URL then means "the environment alone" ([`ConnUrl::parse`]).
fn libpq_environment_is_set() -> bool {
    [
        "PGHOST",
        "PGHOSTADDR",
        "PGPORT",
        "PGDATABASE",
        "PGUSER",
        "PGSERVICE",
    ]
    .iter()
    .any(|name| std::env::var(name).is_ok_and(|v| !v.is_empty()))
}
