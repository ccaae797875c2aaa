//! A directory every replica must share (`--shared-dir`, and Open WebUI's `DATA_DIR` under the
//! preset): uploads written through one replica must be readable through the others.
//!
//! Each replica looks for the release's marker in its directory, a file named
//! `.migrations-gate-<lock>-<release>` (the lock's `pg_locks.classid` and the release hash the
//! session tag uses) holding a random token. A replica that finds none creates it (`O_EXCL`: two
//! replicas on one volume agree on one token). The token is then compared across the release's
//! replicas as a `--same-env` variable is (a keyed fingerprint in the database, the first replica's
//! as the reference): replicas that share the directory read the same token; a replica with a
//! directory of its own made its own token, which differs. One replica alone always passes. A new
//! release's marker replaces the older ones: the two newest are kept (the new release's, and the
//! one before it for its replicas still starting during a rolling upgrade).

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};

use crate::lock::LockKey;
use crate::sessions::release_hash;

/// Markers of this lock kept in a directory: the newest release's and the one before it.
const KEEP: usize = 2;

/// The prefix of this lock's marker files.
fn prefix(lock: &LockKey) -> String {
    format!(".migrations-gate-{:08x}-", lock.classid())
}

/// The token of this release's marker in `dir`: read, or created. `Err` is one line naming
/// the directory and what is wrong with it (missing, not a directory, read-only).
pub(super) fn token(dir: &Path, lock: &LockKey, release: &str) -> Result<String, String> {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return Err(format!("{} is not a directory", dir.display())),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return Err(format!(
                "{} does not exist (is the volume mounted?)",
                dir.display()
            ));
        }
        Err(e) => return Err(format!("{} cannot be read: {e}", dir.display())),
    }
    let path = dir.join(format!("{}{}", prefix(lock), release_hash(release)));
    let fresh = hex::encode(random_bytes().map_err(|e| format!("no random token: {e}"))?);
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)
    {
        Ok(mut f) => {
            f.write_all(fresh.as_bytes())
                .and_then(|()| f.sync_all())
                .map_err(|e| format!("{} cannot be written: {e}", path.display()))?;
            prune(dir, lock);
            Ok(fresh)
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => read(&path),
        Err(e) if is_read_only(&e) => Err(format!(
            "{} is read-only ({e}): replicas cannot write the files they must share",
            dir.display()
        )),
        Err(e) => Err(format!("{} cannot be written: {e}", dir.display())),
    }
}

/// The token in an existing marker. A marker another replica is creating this instant may be
/// empty for a moment: looked at again for up to a second.
fn read(path: &Path) -> Result<String, String> {
    for _ in 0..20 {
        match std::fs::read_to_string(path) {
            Ok(t) if !t.trim().is_empty() => return Ok(t.trim().to_string()),
            Ok(_) => std::thread::sleep(std::time::Duration::from_millis(50)),
            Err(e) => return Err(format!("{} cannot be read: {e}", path.display())),
        }
    }
    Err(format!("{} stays empty", path.display()))
}

fn is_read_only(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::ReadOnlyFilesystem || e.kind() == ErrorKind::PermissionDenied
}

/// Removes this lock's markers in `dir` but the [`KEEP`] newest. Best effort: a marker that
/// cannot be removed costs a few bytes.
fn prune(dir: &Path, lock: &LockKey) {
    let prefix = prefix(lock);
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    let mut markers: Vec<(std::time::SystemTime, PathBuf)> = entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .filter_map(|e| Some((e.metadata().ok()?.modified().ok()?, e.path())))
        .collect();
    markers.sort_by_key(|m| std::cmp::Reverse(m.0));
    for (_, old) in markers.into_iter().skip(KEEP) {
        let _ = std::fs::remove_file(old);
    }
}

fn random_bytes() -> std::io::Result<[u8; 16]> {
    let key = super::fingerprint::random_key()?;
    let mut out = [0u8; 16];
    out.copy_from_slice(&key[..16]);
    Ok(out)
}

/// Open WebUI's data directory as its `env.py` resolves it: `DATA_DIR`, else `BACKEND_DIR/data`,
/// which is `/app/backend/data` in its image. `None` when neither is set nor there (a pip
/// install keeps it beside the package, which the gate cannot see).
pub(super) fn open_webui_data_dir(var: &dyn Fn(&str) -> Option<String>) -> Option<PathBuf> {
    if let Some(dir) = var("DATA_DIR").filter(|d| !d.is_empty()) {
        let path = PathBuf::from(dir);
        // `Path(...).resolve()`: relative to the working directory.
        return Some(if path.is_absolute() {
            path
        } else {
            std::env::current_dir()
                .map(|d| d.join(&path))
                .unwrap_or(path)
        });
    }
    let image = PathBuf::from("/app/backend/data");
    image.is_dir().then_some(image)
}

/// What `check` says of `dir`, without writing: whether it is a directory, and whether it holds
/// `release`'s marker.
pub(super) fn look(dir: &Path, lock: &LockKey, release: Option<&str>) -> String {
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return "not a directory".into(),
        Err(e) if e.kind() == ErrorKind::NotFound => {
            return "does not exist (is the volume mounted?)".into();
        }
        Err(e) => return format!("cannot be read: {e}"),
    }
    let Some(release) = release else {
        return "a directory (pass --release to look for its marker)".into();
    };
    let marker = dir.join(format!("{}{}", prefix(lock), release_hash(release)));
    if marker.exists() {
        format!("holds release {release:?}'s marker")
    } else {
        format!(
            "holds no marker of release {release:?} yet (its first replica leaves one; a later replica that finds none does not share the directory)"
        )
    }
}
