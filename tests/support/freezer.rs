//! A cgroup (v1) freezer of the test's own, the mechanism `docker pause` uses: every process in
//! it stops at once and thaws at once, unlike SIGSTOP/SIGCONT sent to one process group after
//! another. Its processes go back to the root cgroup and the cgroup is removed on drop, also
//! when the test fails.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const ROOT: &str = "/sys/fs/cgroup/freezer";

static COUNTER: AtomicUsize = AtomicUsize::new(0);

pub struct Freezer {
    dir: PathBuf,
}

impl Freezer {
    /// A new, empty freezer cgroup, or why there can be none here.
    pub fn create() -> Result<Freezer, String> {
        let dir = PathBuf::from(ROOT).join(format!(
            "mg-test-{}-{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir(&dir).map_err(|e| format!("mkdir {}: {e}", dir.display()))?;
        Ok(Freezer { dir })
    }

    /// Moves `pid` and all its descendants into the freezer (later children inherit it).
    pub fn add_tree(&self, pid: i32) {
        for p in descendants(pid).into_iter().chain([pid]) {
            // A process may have exited meanwhile.
            let _ = std::fs::write(self.dir.join("cgroup.procs"), p.to_string());
        }
    }

    pub fn freeze(&self) {
        self.set("FROZEN");
    }

    pub fn thaw(&self) {
        self.set("THAWED");
    }

    fn set(&self, state: &str) {
        std::fs::write(self.dir.join("freezer.state"), state).expect("write freezer.state");
        let start = Instant::now();
        while std::fs::read_to_string(self.dir.join("freezer.state"))
            .unwrap_or_default()
            .trim()
            != state
        {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the freezer did not reach {state}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Freezer {
    fn drop(&mut self) {
        let _ = std::fs::write(self.dir.join("freezer.state"), "THAWED");
        let procs = std::fs::read_to_string(self.dir.join("cgroup.procs")).unwrap_or_default();
        for p in procs.lines() {
            let _ = std::fs::write(PathBuf::from(ROOT).join("cgroup.procs"), p);
        }
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// Every descendant of `pid`, from `/proc/*/stat` (field 4 is the parent's PID).
pub fn descendants(pid: i32) -> Vec<i32> {
    let parents: Vec<(i32, i32)> = std::fs::read_dir("/proc")
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter_map(|p| {
                    let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).ok()?;
                    // The command name may hold spaces: the fields after it follow the last ')'.
                    let rest = &stat[stat.rfind(')')? + 2..];
                    let ppid = rest.split(' ').nth(1)?.parse().ok()?;
                    Some((p, ppid))
                })
                .collect()
        })
        .unwrap_or_default();
    let mut found = vec![];
    let mut frontier = vec![pid];
    while let Some(parent) = frontier.pop() {
        for &(p, pp) in &parents {
            if pp == parent && !found.contains(&p) {
                found.push(p);
                frontier.push(p);
            }
        }
    }
    found
}
