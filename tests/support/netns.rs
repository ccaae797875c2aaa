//! A network namespace of the test's own, joined to ours by a veth pair on a private /30
//! (10.213.X.Y/30): lets a pooler listen on the same port number as the PostgreSQL it forwards
//! to. Only the namespace and the veth pair made here are touched; both go on drop, also when
//! the test fails.

use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

static COUNTER: AtomicUsize = AtomicUsize::new(0);

/// A network namespace and the veth pair that joins it to ours, removed on drop.
pub struct NetNs {
    /// The namespace's name (`ip netns exec NAME ...`).
    pub name: String,
    /// Our end's interface.
    host_if: String,
    /// Our end's address (the other end's gateway).
    pub host_ip: String,
    /// The namespace's end's address.
    pub ns_ip: String,
}

impl NetNs {
    /// Makes the namespace and the veth pair; `Err` says why `ip netns` is unusable here (not
    /// root, no `ip`, no permission to make namespaces).
    pub fn create() -> Result<NetNs, String> {
        if !super::running_as_root() {
            return Err("not running as root".into());
        }
        let n = COUNTER.fetch_add(1, Ordering::SeqCst) % 64;
        let pid = std::process::id();
        let third = pid % 250;
        let base = n * 4;
        let ns = NetNs {
            name: format!("mg-{pid}-{n}"),
            // Interface names have at most 15 bytes.
            host_if: format!("mgh{}x{n}", pid % 100_000),
            host_ip: format!("10.213.{third}.{}", base + 1),
            ns_ip: format!("10.213.{third}.{}", base + 2),
        };
        let ns_if = format!("mgn{}x{n}", pid % 100_000);
        // Made before any command runs, so that a failure half-way is cleaned up too.
        ns.ip(&["netns", "add", &ns.name])?;
        ns.ip(&[
            "link",
            "add",
            &ns.host_if,
            "type",
            "veth",
            "peer",
            "name",
            &ns_if,
            "netns",
            &ns.name,
        ])?;
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/30", ns.host_ip),
            "dev",
            &ns.host_if,
        ])?;
        ns.ip(&["link", "set", &ns.host_if, "up"])?;
        ns.ip(&[
            "-n",
            &ns.name,
            "addr",
            "add",
            &format!("{}/30", ns.ns_ip),
            "dev",
            &ns_if,
        ])?;
        ns.ip(&["-n", &ns.name, "link", "set", &ns_if, "up"])?;
        ns.ip(&["-n", &ns.name, "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The /30 both ends are on, for `pg_hba.conf`.
    pub fn subnet(&self) -> String {
        let (prefix, last) = self.host_ip.rsplit_once('.').expect("an IPv4 address");
        let last: u32 = last.parse().expect("a number");
        format!("{prefix}.{}/30", last - 1)
    }

    fn ip(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new("ip")
            .args(args)
            .output()
            .map_err(|e| format!("cannot run `ip`: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "`ip {}` failed: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            ))
        }
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth pair, and with it ours; ours is
        // deleted explicitly too in case the namespace was half made.
        let _ = self.ip(&["netns", "del", &self.name]);
        let _ = Command::new("ip")
            .args(["link", "del", &self.host_if])
            .stderr(std::process::Stdio::null())
            .status();
    }
}
