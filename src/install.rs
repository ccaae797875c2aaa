//! `migrations-gate install DIR`: copy this static binary into a shared volume or another image,
//! for the entrypoint-wrapper pattern (the gate must run inside the app's container).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use tracing::info;

use crate::error::{Error, Result};

/// Copies the running executable to `DIR/migrations-gate`, atomically (temp file + rename), so
/// replicas already running a previous copy from the same volume are never disturbed (writing
/// over a running binary fails with ETXTBSY).
pub(crate) fn install(dir: &Path) -> Result<PathBuf> {
    let source = std::env::current_exe()
        .or_else(|_| std::env::args().next().map(PathBuf::from).ok_or(()))
        .map_err(|_| Error::Internal("cannot find our own executable".into()))?;
    // A directory that cannot be made or written is no usage error: the command line was right.
    std::fs::create_dir_all(dir).map_err(|e| {
        Error::Output(format!(
            "cannot create {}: {e}; mount a writable volume there (an emptyDir shared with the app container)",
            dir.display()
        ))
    })?;
    let target = dir.join("migrations-gate");
    let temp = dir.join(format!(".migrations-gate.{}.tmp", std::process::id()));
    let copy = || -> std::io::Result<()> {
        std::fs::copy(&source, &temp)?;
        std::fs::set_permissions(&temp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::rename(&temp, &target)
    };
    copy().map_err(|e| {
        let _ = std::fs::remove_file(&temp);
        Error::Output(format!(
            "cannot install into {}: {e}; is the directory writable by this user (and not a read-only filesystem)?",
            dir.display()
        ))
    })?;
    info!(target = %target.display(), "installed");
    Ok(target)
}
