//! libpq's connection service file, `pg_service.conf` (libpq, "The Connection Service File"):
//! named sections of `key=value` connection settings, chosen by `service=NAME` or `PGSERVICE`.

use std::path::PathBuf;

use crate::error::{Error, Result};

/// Where libpq's Debian build looks for the system-wide file when `PGSYSCONFDIR` is unset
/// (`pg_config --sysconfdir` of Debian's libpq5).
const DEBIAN_SYSCONFDIR: &str = "/etc/postgresql-common";

/// The files libpq reads, in its order: the per-user file (`PGSERVICEFILE`, else
/// `~/.pg_service.conf`), then the system-wide one (`PGSYSCONFDIR/pg_service.conf`). The first
/// that defines the service wins.
fn files() -> Vec<PathBuf> {
    let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
    let user = var("PGSERVICEFILE")
        .map(PathBuf::from)
        .or_else(|| var("HOME").map(|home| PathBuf::from(home).join(".pg_service.conf")));
    let system = var("PGSYSCONFDIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEBIAN_SYSCONFDIR))
        .join("pg_service.conf");
    user.into_iter().chain([system]).collect()
}

/// The settings of service `name`, as libpq would read them. Errors name the file, the service
/// and the key, never a value (a section may hold a password).
pub(super) fn section(name: &str) -> Result<Vec<(String, String)>> {
    // libpq takes a value as it stands: no quotes, no escapes.
    let options = || ini::ParseOption {
        enabled_quote: false,
        enabled_escape: false,
        ..Default::default()
    };
    let searched = files();
    for path in &searched {
        if !path.exists() {
            continue;
        }
        let text = crate::files::read_text(path, crate::files::SETTINGS_LIMIT).map_err(|e| {
            Error::Usage(format!(
                "cannot read the service file {}: {e}",
                path.display()
            ))
        })?;
        let file = ini::Ini::load_from_str_opt(&text, options()).map_err(|e| {
            Error::Usage(format!(
                "the service file {} is malformed at line {}: write [SERVICE] headers and key=value lines",
                path.display(),
                e.line
            ))
        })?;
        let Some(section) = file.section(Some(name)) else {
            continue;
        };
        let pairs: Vec<(String, String)> = section
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        if pairs.iter().any(|(k, _)| k == "service") {
            return Err(Error::Usage(format!(
                "service {name:?} in {} sets service= itself: libpq does not support nested services; give the settings in the section",
                path.display()
            )));
        }
        return Ok(pairs);
    }
    let searched: Vec<String> = searched.iter().map(|p| p.display().to_string()).collect();
    Err(Error::Usage(format!(
        "definition of service {name:?} not found (searched {}): add a [{name}] section, set PGSERVICEFILE to the file that has it, or give the connection settings in the URL",
        searched.join(", ")
    )))
}
