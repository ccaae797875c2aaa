//! The TCP connections a child's process group holds, read from `/proc` (proc(5):
//! `/proc/<pid>/fd` links name socket inodes; `/proc/net/tcp` and `tcp6` map inodes to
//! addresses). The holder uses them to find the database sessions of a migration client that
//! does not send the gate's `PGAPPNAME` tag (see [`crate::sessions`]).

use std::collections::BTreeSet;

use procfs::net::TcpState;
use procfs::process::FDTarget;

/// Local ports of the established TCP connections of every process in group `pgid`. Best
/// effort: a process that ends while we read it is skipped, and without `/proc` the list is
/// empty.
pub(crate) fn local_tcp_ports(pgid: i32) -> BTreeSet<u16> {
    let mut inodes = BTreeSet::new();
    let Ok(processes) = procfs::process::all_processes() else {
        return BTreeSet::new();
    };
    for process in processes.flatten() {
        let in_group = process.stat().map(|s| s.pgrp == pgid).unwrap_or(false);
        if !in_group {
            continue;
        }
        let Ok(fds) = process.fd() else { continue };
        for fd in fds.flatten() {
            if let FDTarget::Socket(inode) = fd.target {
                inodes.insert(inode);
            }
        }
    }
    if inodes.is_empty() {
        return BTreeSet::new();
    }
    // The child shares the gate's network namespace: our own table is its table.
    let v4 = procfs::net::tcp().unwrap_or_default();
    let v6 = procfs::net::tcp6().unwrap_or_default();
    v4.into_iter()
        .chain(v6)
        .filter(|e| e.state == TcpState::Established && inodes.contains(&e.inode))
        .map(|e| e.local_address.port())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_local_port_of_a_connection_held_by_our_own_group() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let client =
            std::net::TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (_server, _) = listener.accept().expect("accept");
        // SAFETY: plain system call.
        let pgid = unsafe { libc::getpgrp() };
        let port = client.local_addr().expect("addr").port();
        assert!(local_tcp_ports(pgid).contains(&port));
        assert!(!local_tcp_ports(pgid + 1_000_000).contains(&port));
    }
}
