//! A directory every replica must share (`--shared-dir`, and Open WebUI's `DATA_DIR` under the
//! preset): uploads written through one replica must be readable through the others.
//!
//! Each replica looks for the release's marker in its directory, a file named
//! `.migrations-gate-<key>-<ledger>-<release>` (the gate's whole [`Identity`], then the release
//! hash the session tag uses) holding a random token. A replica that finds none creates it: the
//! token is written and synced to a temporary file first, then linked into place (`link(2)` fails
//! if the name exists, so two replicas on one volume agree on one token, and a crash never leaves
//! a marker without its token). The token is then compared across the release's
//! replicas as a `--same-env` variable is (a keyed fingerprint in the database, the first replica's
//! as the reference): replicas that share the directory read the same token; a replica with a
//! directory of its own made its own token, which differs. One replica alone always passes. A new
//! release's marker replaces the older ones of the same identity: the two newest are kept (the new
//! release's, and the one before it for its replicas still starting during a rolling upgrade).
//! Another application's markers in the same directory (another lock or another ledger) are never
//! read or removed.
//!
//! The file work runs on a thread of its own, bounded by [`FILE_TIMEOUT`]: a hung network mount
//! must not stall the runtime's only thread, where a holder's heartbeats run.

use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::identity::Identity;
use crate::sessions::release_hash;

/// Markers of this identity kept in a directory: the newest release's and the one before it.
const KEEP: usize = 2;

/// How long the marker's file work may take (a directory on a hung network mount).
pub(super) const FILE_TIMEOUT: Duration = Duration::from_secs(10);

/// The path of `release`'s marker in `dir`.
fn marker(dir: &Path, identity: &Identity, release: &str) -> PathBuf {
    dir.join(format!(
        "{}{}",
        identity.marker_prefix(),
        release_hash(release)
    ))
}

/// The token of this release's marker in `dir`, read or created, on a thread of its own within
/// [`FILE_TIMEOUT`]. `Err` is one line naming the directory and what is wrong with it (missing,
/// not a directory, read-only, not answering).
pub(super) async fn token(
    dir: &Path,
    identity: &Identity,
    release: &str,
) -> Result<String, String> {
    let (d, i, r) = (dir.to_path_buf(), identity.clone(), release.to_string());
    off_runtime(dir, move || token_now(&d, &i, &r)).await
}

/// Runs `work` on a thread of its own and waits at most [`FILE_TIMEOUT`] for it. A thread stuck
/// in the kernel on a hung mount cannot be stopped; it is left behind, and the process's `exec`
/// or exit ends it.
async fn off_runtime<F>(dir: &Path, work: F) -> Result<String, String>
where
    F: FnOnce() -> Result<String, String> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    let spawned = std::thread::Builder::new()
        .name("shared-dir".into())
        .spawn(move || {
            let _ = tx.send(work());
        });
    if let Err(e) = spawned {
        return Err(format!("no thread to look at {}: {e}", dir.display()));
    }
    match tokio::time::timeout(FILE_TIMEOUT, rx).await {
        Ok(Ok(result)) => result,
        Ok(Err(_)) => Err(format!("{} could not be looked at", dir.display())),
        Err(_) => Err(format!(
            "{} did not answer within {} s (a hung network mount?)",
            dir.display(),
            FILE_TIMEOUT.as_secs()
        )),
    }
}

fn token_now(dir: &Path, identity: &Identity, release: &str) -> Result<String, String> {
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
    let path = marker(dir, identity, release);
    if let Some(token) = read(&path)? {
        return Ok(token);
    }
    let fresh = hex::encode(random_bytes().map_err(|e| format!("no random token: {e}"))?);
    let temporary = dir.join(format!(
        ".migrations-gate-tmp-{}-{}",
        std::process::id(),
        &fresh[..8]
    ));
    let written = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&temporary)
        .and_then(|mut f| {
            f.write_all(fresh.as_bytes())?;
            f.sync_all()
        });
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temporary);
        return Err(if is_read_only(&e) {
            format!(
                "{} is read-only ({e}): replicas cannot write the files they must share",
                dir.display()
            )
        } else {
            format!("{} cannot be written: {e}", dir.display())
        });
    }
    let linked = match std::fs::hard_link(&temporary, &path) {
        // An empty marker (an older gate crashed between creating and writing it) is no marker:
        // replaced whole, by a rename that never shows a reader an empty file.
        Err(e) if e.kind() == ErrorKind::AlreadyExists && read(&path)?.is_none() => {
            std::fs::rename(&temporary, &path).map(|()| true)
        }
        other => other.map(|()| true),
    };
    let _ = std::fs::remove_file(&temporary);
    match linked {
        Ok(_) => {
            prune(dir, identity);
            // Read back: whoever linked first (or renamed last) holds the name.
            read(&path)?.ok_or_else(|| format!("{} stays empty", path.display()))
        }
        Err(e) if e.kind() == ErrorKind::AlreadyExists => {
            read(&path)?.ok_or_else(|| format!("{} stays empty", path.display()))
        }
        Err(e) => Err(format!("{} cannot be written: {e}", path.display())),
    }
}

/// The token in a marker; `None` when there is none, or it is empty.
fn read(path: &Path) -> Result<Option<String>, String> {
    match std::fs::read_to_string(path) {
        Ok(t) if !t.trim().is_empty() => Ok(Some(t.trim().to_string())),
        Ok(_) => Ok(None),
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
        Err(e) => Err(format!("{} cannot be read: {e}", path.display())),
    }
}

fn is_read_only(e: &std::io::Error) -> bool {
    e.kind() == ErrorKind::ReadOnlyFilesystem || e.kind() == ErrorKind::PermissionDenied
}

/// Removes this identity's markers in `dir` but the [`KEEP`] newest; another lock's or
/// another ledger's are never looked at. Best effort: a marker that cannot be removed costs a
/// few bytes.
fn prune(dir: &Path, identity: &Identity) {
    let prefix = identity.marker_prefix();
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
/// `release`'s marker (on a thread of its own within [`FILE_TIMEOUT`]).
pub(super) async fn look(dir: &Path, identity: &Identity, release: Option<&str>) -> String {
    let (d, i, r) = (
        dir.to_path_buf(),
        identity.clone(),
        release.map(str::to_string),
    );
    off_runtime(dir, move || Ok(look_now(&d, &i, r.as_deref())))
        .await
        .unwrap_or_else(|why| why)
}

fn look_now(dir: &Path, identity: &Identity, release: Option<&str>) -> String {
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
    if read(&marker(dir, identity, release))
        .ok()
        .flatten()
        .is_some()
    {
        format!("holds release {release:?}'s marker")
    } else {
        format!(
            "holds no marker of release {release:?} yet (its first replica leaves one; a later replica that finds none does not share the directory)"
        )
    }
}
