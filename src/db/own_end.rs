//! The gate's own end of its connections: its sockets (read by walking its own file
//! descriptors, as sqlx does not expose them), for client-side keepalives and the route proof.

use super::*;

/// Sets client-side keepalives and `TCP_USER_TIMEOUT` on the gate's TCP sockets: all of them
/// are the gate's own database connections or short-lived probes, for which the settings are
/// right too.
pub(super) fn set_client_keepalives() {
    let set = |fd: libc::c_int, level: libc::c_int, name: libc::c_int, value: libc::c_int| {
        // SAFETY: setsockopt with a pointer to a live c_int and its size.
        unsafe {
            libc::setsockopt(
                fd,
                level,
                name,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    };
    for (fd, domain) in own_stream_sockets() {
        if !matches!(domain, libc::AF_INET | libc::AF_INET6) {
            continue;
        }
        set(fd, libc::SOL_SOCKET, libc::SO_KEEPALIVE, 1);
        set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPIDLE, KEEPALIVE_IDLE_S);
        set(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_KEEPINTVL,
            KEEPALIVE_INTERVAL_S,
        );
        set(fd, libc::IPPROTO_TCP, libc::TCP_KEEPCNT, KEEPALIVE_COUNT);
        set(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_USER_TIMEOUT,
            USER_TIMEOUT_MS,
        );
    }
}

/// The process's stream sockets, as (descriptor, address family). sqlx opens its sockets itself
/// and does not expose them, so this walks the process's few descriptors (allocated lowest
/// first), stopping after a run of descriptors that are not sockets.
pub(super) fn own_stream_sockets() -> Vec<(libc::c_int, libc::c_int)> {
    let get = |fd: libc::c_int, name: libc::c_int| -> Option<libc::c_int> {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: getsockopt with a pointer to a live c_int and its size.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_SOCKET,
                name,
                (&mut value as *mut libc::c_int).cast(),
                &mut len,
            )
        };
        (rc == 0).then_some(value)
    };
    let mut found = Vec::new();
    let mut misses = 0;
    for fd in 3..1024 {
        let Some(kind) = get(fd, libc::SO_TYPE) else {
            misses += 1;
            if misses > 32 {
                break;
            }
            continue;
        };
        misses = 0;
        if kind != libc::SOCK_STREAM {
            continue;
        }
        if let Some(domain) = get(fd, libc::SO_DOMAIN) {
            found.push((fd, domain));
        }
    }
    found
}

/// The local address and port of each of the gate's TCP sockets (`getsockname`), IPv4-mapped
/// IPv6 addresses written as IPv4 (as PostgreSQL shows them).
pub(super) fn own_tcp_addresses() -> Vec<SocketAddr> {
    own_stream_sockets()
        .into_iter()
        .filter(|(_, domain)| matches!(*domain, libc::AF_INET | libc::AF_INET6))
        .filter_map(|(fd, _)| {
            // SAFETY: sockaddr_storage is plain data; all zeroes is a valid value.
            let mut addr: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
            // SAFETY: getsockname writes at most `len` bytes into the live `addr`.
            let rc = unsafe {
                libc::getsockname(
                    fd,
                    (&mut addr as *mut libc::sockaddr_storage).cast(),
                    &mut len,
                )
            };
            (rc == 0).then(|| socket_addr(&addr)).flatten()
        })
        .collect()
}

/// A `sockaddr_storage` filled in for AF_INET or AF_INET6, as a [`SocketAddr`].
pub(super) fn socket_addr(addr: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match addr.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the kernel wrote a sockaddr_in (ss_family says so); storage is larger.
            let v4 =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            let ip = std::net::Ipv4Addr::from(u32::from_be(v4.sin_addr.s_addr));
            Some(SocketAddr::new(IpAddr::V4(ip), u16::from_be(v4.sin_port)))
        }
        libc::AF_INET6 => {
            // SAFETY: the kernel wrote a sockaddr_in6 (ss_family says so); storage is larger.
            let v6 =
                unsafe { &*(addr as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            let ip = std::net::Ipv6Addr::from(v6.sin6_addr.s6_addr);
            Some(SocketAddr::new(
                ip.to_canonical(),
                u16::from_be(v6.sin6_port),
            ))
        }
        _ => None,
    }
}

/// The PID of the process listening on the Unix socket at `path`, from the gate's own
/// connection to it (`SO_PEERCRED` gives the listener's credentials); `None` when no connection
/// of ours goes there or the listener is not visible in our PID namespace.
pub(super) fn unix_listener_pid(path: &Path) -> Option<i32> {
    let wanted = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str());
    own_stream_sockets()
        .into_iter()
        .filter(|(_, domain)| *domain == libc::AF_UNIX)
        .find_map(|(fd, _)| {
            // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
            let mut peer: libc::sockaddr_un = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::sockaddr_un>() as libc::socklen_t;
            // SAFETY: getpeername writes at most `len` bytes into the live `peer`.
            let rc = unsafe {
                libc::getpeername(fd, (&mut peer as *mut libc::sockaddr_un).cast(), &mut len)
            };
            if rc != 0 {
                return None;
            }
            let name: Vec<u8> = peer
                .sun_path
                .iter()
                .take_while(|&&c| c != 0)
                .map(|&c| c as u8)
                .collect();
            if name != wanted {
                return None;
            }
            // SAFETY: ucred is plain data; all zeroes is a valid value.
            let mut cred: libc::ucred = unsafe { std::mem::zeroed() };
            let mut len = std::mem::size_of::<libc::ucred>() as libc::socklen_t;
            // SAFETY: getsockopt(SO_PEERCRED) writes at most `len` bytes into the live `cred`.
            let rc = unsafe {
                libc::getsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_PEERCRED,
                    (&mut cred as *mut libc::ucred).cast(),
                    &mut len,
                )
            };
            (rc == 0 && cred.pid > 0).then_some(cred.pid)
        })
}

/// The parent of process `pid` in our PID namespace (`/proc/PID/stat`), if it is visible.
pub(crate) fn parent_pid(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // "PID (comm) STATE PPID ...": comm may hold spaces and parentheses; it ends at the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(1)?.parse().ok()
}
