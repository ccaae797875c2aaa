//! Where the database is: `--database-url`, `--database-url-file`, with a preset the app's own
//! settings (Open WebUI's `DATABASE_*` parts, else its `DATABASE_URL`), `DATABASE_URL` or
//! libpq's environment, turned into the plain [`Target`] the rest of the gate receives.

use tracing::info;

use super::*;
use crate::db::redact_url;
use crate::preflight::Problem;

impl DbArgs {
    /// Checks the connection and lock flags; `app`: the preset whose app's own database
    /// settings come right after the gate's own URL.
    pub(crate) fn target(&self, app: Option<Preset>) -> Result<Target> {
        let database_url = self.resolve_database_url(app)?;
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
        schema_name(&self.schema)?;
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

    /// The URL, and says where it came from (never the password).
    fn resolve_database_url(&self, app: Option<Preset>) -> Result<String> {
        let (url, source) = self.find_database_url(app)?;
        info!(database = %redact_url(&url), "database from {source}");
        Ok(url)
    }

    /// The URL and where it came from: `--database-url-file`, `--database-url` (or
    /// `MIGRATIONS_GATE_DATABASE_URL`), the app's own settings (with a preset that reads them),
    /// `DATABASE_URL`, libpq's environment.
    fn find_database_url(&self, app: Option<Preset>) -> Result<(String, String)> {
        let over_app = app
            .map(|p| {
                format!(
                    " (it wins over the app's own settings, --preset {})",
                    p.name()
                )
            })
            .unwrap_or_default();
        if let Some(path) = &self.database_url_file {
            let text = crate::files::read_text(path, crate::files::SETTINGS_LIMIT).map_err(|e| {
                Error::Usage(format!(
                    "cannot read --database-url-file {}: {e}; it must be a file holding one connection string",
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
            if url.lines().count() > 1 || url.contains('\0') {
                return Err(Error::Usage(format!(
                    "--database-url-file {} holds more than one line (or a NUL byte): it must hold one connection string",
                    path.display()
                )));
            }
            return Ok((
                url.to_string(),
                format!("--database-url-file {}{over_app}", path.display()),
            ));
        }
        if let Some(url) = self.database_url.as_deref().filter(|u| !u.is_empty()) {
            return Ok((
                url.to_string(),
                format!("--database-url or MIGRATIONS_GATE_DATABASE_URL{over_app}"),
            ));
        }
        let env = |name: &str| std::env::var_os(name).map(|v| v.to_string_lossy().into_owned());
        if let Some((preset, db)) = app.and_then(|p| p.database(&env).map(|db| (p, db))) {
            return match db.conninfo {
                Ok(conninfo) => Ok((conninfo, db.source.describe().to_string())),
                Err(Problem::NotPostgres(why) | Problem::Misread(why)) => Err(Error::Config(
                    format!("--preset {}: the app's own database: {why}", preset.name()),
                )),
            };
        }
        match std::env::var("DATABASE_URL") {
            Ok(url) if !url.is_empty() => Ok((url, "DATABASE_URL".into())),
            _ if libpq_environment_is_set() => Ok((
                String::new(),
                "libpq's environment (PGHOST, PGPORT, PGDATABASE, PGUSER, ...)".into(),
            )),
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

/// PostgreSQL's `NAMEDATALEN` - 1: a longer identifier is silently cut to this many bytes
/// ("Identifiers and Key Words"), so two different `--schema` names would share one ledger.
const MAX_IDENTIFIER_BYTES: usize = 63;

/// A `--schema` the gate can own: not empty, at most 63 bytes, no NUL, and not a schema of the
/// system's (`pg_catalog`, `information_schema`, `pg_toast`, any `pg_*`: names PostgreSQL reserves,
/// "Schemas"; `pg_temp` is per session and vanishes with it).
fn schema_name(schema: &str) -> Result<()> {
    let refuse = |why: &str| Err(Error::Usage(format!("--schema {schema:?} {why}")));
    if schema.is_empty() {
        return refuse("must not be empty");
    }
    if schema.contains('\0') {
        return refuse("contains a NUL byte");
    }
    if schema.len() > MAX_IDENTIFIER_BYTES {
        return refuse(&format!(
            "is {} bytes: PostgreSQL cuts names to {MAX_IDENTIFIER_BYTES} bytes, so two longer names would share one ledger; choose a shorter one",
            schema.len()
        ));
    }
    let lower = schema.to_ascii_lowercase();
    if lower.starts_with("pg_") || lower == "information_schema" {
        return refuse(
            "is a system schema (pg_* and information_schema belong to PostgreSQL; pg_temp vanishes with the session): choose a schema of your own, e.g. migrations_gate",
        );
    }
    Ok(())
}
