//! The release ID of `--release-from PATH`: a content hash of the files under PATH (e.g. the
//! migrations folder), so that a release is "done" exactly for the files that were migrated.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// The most the gate reads of one file under `--release-from`: 256 MiB (migrations are text; a
/// larger file is most likely the wrong PATH).
const RELEASE_FILE_LIMIT: u64 = 256 * 1024 * 1024;

/// The release ID for `--release-from PATH`: `sha256:` and the first 32 hex digits of a hash over
/// every regular file under PATH (relative path and contents, in sorted path order), so the ID
/// changes exactly when a file is added, removed, renamed or edited.
pub(crate) fn release_from_path(root: &Path) -> Result<String> {
    let mut files = Vec::new();
    collect_files(root, root, &mut files)?;
    if files.is_empty() {
        return Err(Error::Usage(format!(
            "--release-from {}: no files found",
            root.display()
        )));
    }
    files.sort();
    let mut hasher = Sha256::new();
    for (rel, full) in &files {
        let bytes = crate::files::read_bounded(full, RELEASE_FILE_LIMIT).map_err(|e| {
            Error::Usage(format!(
                "--release-from: cannot read {}: {e}",
                full.display()
            ))
        })?;
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update([0u8]);
        hasher.update((bytes.len() as u64).to_be_bytes());
        hasher.update(&bytes);
    }
    let digest = hasher.finalize();
    Ok(format!("sha256:{}", hex::encode(&digest[..16])))
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<(PathBuf, PathBuf)>) -> Result<()> {
    let meta = std::fs::metadata(dir)
        .map_err(|e| Error::Usage(format!("--release-from {}: {e}", dir.display())))?;
    if meta.is_file() {
        // A single file: hash it under its own name.
        let name = dir.file_name().map(PathBuf::from).unwrap_or_default();
        out.push((name, dir.to_path_buf()));
        return Ok(());
    }
    let entries = std::fs::read_dir(dir)
        .map_err(|e| Error::Usage(format!("--release-from {}: {e}", dir.display())))?;
    for entry in entries {
        let entry =
            entry.map_err(|e| Error::Usage(format!("--release-from {}: {e}", dir.display())))?;
        // A Kubernetes ConfigMap or Secret volume keeps its files in `..data` and a per-pod
        // `..2026_...` folder, with the visible names as symlinks into them: hashing those would
        // give every pod its own release. The visible names (followed) are the content.
        if entry.file_name().to_string_lossy().starts_with("..") {
            continue;
        }
        let path = entry.path();
        let meta = std::fs::metadata(&path)
            .map_err(|e| Error::Usage(format!("--release-from {}: {e}", path.display())))?;
        if meta.is_dir() {
            collect_files(root, &path, out)?;
        } else if meta.is_file() {
            let rel = path.strip_prefix(root).unwrap_or(&path).to_path_buf();
            out.push((rel, path));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh, empty directory for one test.
    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("mg-release-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn a_configmap_volume_hashes_its_visible_files_only() {
        // As the kubelet lays it out: the files live in a timestamped folder, `..data` points
        // at it, and the visible names point into `..data`.
        let a = scratch("configmap-a");
        let b = scratch("configmap-b");
        for (dir, stamp) in [(&a, "..2026_01_01"), (&b, "..2026_02_02")] {
            std::fs::create_dir(dir.join(stamp)).unwrap();
            std::fs::write(dir.join(stamp).join("001.sql"), "CREATE TABLE t (id int);").unwrap();
            std::os::unix::fs::symlink(stamp, dir.join("..data")).unwrap();
            std::os::unix::fs::symlink("..data/001.sql", dir.join("001.sql")).unwrap();
        }
        assert_eq!(
            release_from_path(&a).unwrap(),
            release_from_path(&b).unwrap()
        );
        let _ = std::fs::remove_dir_all(&a);
        let _ = std::fs::remove_dir_all(&b);
    }

    #[test]
    fn same_files_same_id_and_any_change_gives_another() {
        let dir = scratch("changes");
        std::fs::create_dir(dir.join("versions")).unwrap();
        std::fs::write(
            dir.join("versions/001_init.sql"),
            "CREATE TABLE t (id int);",
        )
        .unwrap();
        std::fs::write(dir.join("env.py"), "print('env')").unwrap();
        let first = release_from_path(&dir).unwrap();
        assert!(
            first.starts_with("sha256:") && first.len() == "sha256:".len() + 32,
            "{first}"
        );
        assert_eq!(
            release_from_path(&dir).unwrap(),
            first,
            "same files, same ID"
        );

        let mut seen = vec![first];
        let mut expect_new = |what: &str| {
            let id = release_from_path(&dir).unwrap();
            assert!(!seen.contains(&id), "{what} must change the ID");
            seen.push(id);
        };
        std::fs::write(
            dir.join("versions/002_more.sql"),
            "ALTER TABLE t ADD x int;",
        )
        .unwrap();
        expect_new("adding a file");
        std::fs::write(
            dir.join("versions/002_more.sql"),
            "ALTER TABLE t ADD y int;",
        )
        .unwrap();
        expect_new("editing a file");
        std::fs::rename(
            dir.join("versions/002_more.sql"),
            dir.join("versions/003_more.sql"),
        )
        .unwrap();
        expect_new("renaming a file");
        std::fs::remove_file(dir.join("versions/003_more.sql")).unwrap();
        assert_eq!(
            release_from_path(&dir).unwrap(),
            seen[0],
            "back to the same files"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn an_empty_or_missing_path_is_a_usage_error() {
        let dir = scratch("empty");
        std::fs::create_dir(dir.join("only-a-subdir")).unwrap();
        let e = release_from_path(&dir).unwrap_err();
        assert_eq!(e.exit_code(), 64);
        assert!(e.to_string().contains("no files found"), "{e}");
        let e = release_from_path(&dir.join("missing")).unwrap_err();
        assert_eq!(e.exit_code(), 64);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
