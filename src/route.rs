//! What sits between the gate and PostgreSQL: the server itself (proven), a transaction pooler,
//! or anything else (a session pooler, a proxy). It decides the lock scope for `auto` and whether
//! waiters may keep their connection.

use std::net::{IpAddr, SocketAddr};

use sqlx::postgres::PgConnection;

use crate::db::OwnEnd;
use crate::lock::Scope;
use crate::sql::{one_row, query, query_scalar};

/// What sits between the gate and PostgreSQL, as far as the gate can tell. It decides the lock
/// scope for `auto` and whether waiters may keep their connection. Only [`Route::Direct`] needs
/// proof ([`judge_route`]); anything not proven direct is a pooler or a proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Route {
    /// The server itself, proven: a connection is a server session.
    Direct,
    /// Transaction pooling, proven by a backend PID that changed between two transactions:
    /// a client connection costs no server connection while idle.
    TransactionPooling,
    /// Not proven direct: a pooler or proxy of unknown kind, such as a session pooler or a TCP
    /// proxy (HAProxy), where every client connection holds a server connection, or a
    /// transaction pooler that happened to keep the same backend.
    Middlebox,
}

impl Route {
    /// The lock scope `auto` picks: a session lock needs a connection that is its own server
    /// session for as long as it lives; only a direct connection proves that.
    pub(crate) fn scope(self) -> Scope {
        match self {
            Route::Direct => Scope::Session,
            Route::TransactionPooling | Route::Middlebox => Scope::Transaction,
        }
    }
}

/// The server's half of the route proof: what the backend says about itself and about its
/// client, in the first of two transactions, and its PID in the second.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ServerSide {
    /// `pg_backend_pid()` in the first transaction.
    pub(crate) pid: i32,
    /// `pg_backend_pid()` in the second.
    pub(crate) again: i32,
    /// `inet_client_addr()` and `inet_client_port()`: `None` for a Unix-socket client.
    pub(crate) client: Option<(IpAddr, u16)>,
}

/// The first statement of [`server_side`]: the backend's PID, and its client's address and port
/// (NULL for a Unix socket).
const SERVER_SIDE: &str =
    "SELECT pg_backend_pid()::text, host(inet_client_addr()), inet_client_port()::text";

/// The second statement of [`server_side`], in a transaction of its own: the backend's PID.
const BACKEND_PID: &str = "SELECT pg_backend_pid()::text";

/// Reads [`ServerSide`]: two short queries, as many round trips as the PID comparison alone
/// needs. Only would-be holders and waiters ask (a follower never does).
pub(crate) async fn server_side(conn: &mut PgConnection) -> Result<ServerSide, sqlx::Error> {
    let rows = query(conn, SERVER_SIDE.into()).await?;
    let row = one_row(&rows)?;
    let pid = row.parse(0)?;
    let client = match (row.opt(1)?, row.opt(2)?) {
        (Some(addr), Some(port)) => {
            let addr: IpAddr = addr.parse().map_err(|e| {
                crate::sql::invariant(format!("inet_client_addr() {addr:?} unreadable: {e}"))
            })?;
            let port = port.parse().map_err(|e| {
                crate::sql::invariant(format!("inet_client_port() {port:?} unreadable: {e}"))
            })?;
            Some((addr.to_canonical(), port))
        }
        _ => None,
    };
    let again = query_scalar(conn, BACKEND_PID.into())
        .await?
        .and_then(|p| p.parse().ok())
        .unwrap_or(0);
    Ok(ServerSide { pid, again, client })
}

/// Decides the route from both halves of the proof, and says why. Direct needs positive proof
/// that the server's session is the other end of our own socket:
/// - over TCP, the server sees our socket's own local address and port as its client (a
///   Kubernetes Service only rewrites the destination, so it passes; a pooler or proxy
///   connects from its own socket, so it fails, whatever port it listens on);
/// - over a Unix socket, the backend is a child of the process that listens on the socket we
///   dialled (`backend_parent`: the backend's parent PID, when visible): PostgreSQL forks a
///   backend per connection, a pooler does not;
/// - and the backend PID is the same in two transactions (else: transaction pooling).
///
/// sqlx keeps the `BackendKeyData` PID (which a pooler replaces with its own) private, so
/// the socket's identity is the proof. Anything not proven is [`Route::Middlebox`].
pub(crate) fn judge_route(
    server: &ServerSide,
    own: &OwnEnd,
    backend_parent: Option<i32>,
) -> (Route, String) {
    let ServerSide { pid, again, client } = server;
    if pid != again {
        return (
            Route::TransactionPooling,
            format!(
                "not direct: the backend PID changed between transactions ({pid} then {again}): transaction pooling"
            ),
        );
    }
    match (own, client) {
        (OwnEnd::Tcp(mine), Some((addr, port))) => {
            let seen = SocketAddr::new(*addr, *port);
            if mine.contains(&seen) {
                (
                    Route::Direct,
                    format!(
                        "direct, proven: the server (backend PID {pid}) sees our own socket {seen} as its client"
                    ),
                )
            } else {
                (
                    Route::Middlebox,
                    format!(
                        "not proven direct: the server sees the client {seen}, which is not our own socket ({}): a pooler or proxy sits between",
                        list(mine)
                    ),
                )
            }
        }
        (OwnEnd::Tcp(_), None) => (
            Route::Middlebox,
            "not proven direct: we connected over TCP but the server sees a Unix-socket client: a pooler or proxy sits between".into(),
        ),
        (OwnEnd::Unix { path, .. }, Some((addr, port))) => (
            Route::Middlebox,
            format!(
                "not proven direct: we connected to the Unix socket {} but the server sees the TCP client {}: a pooler or proxy sits between",
                path.display(),
                SocketAddr::new(*addr, *port)
            ),
        ),
        (OwnEnd::Unix { path, listener }, None) => match (listener, backend_parent) {
            (Some(l), Some(p)) if l == &p => (
                Route::Direct,
                format!(
                    "direct, proven: backend PID {pid} is a child of the process listening on {} (PID {l})",
                    path.display()
                ),
            ),
            (Some(l), Some(p)) => (
                Route::Middlebox,
                format!(
                    "not proven direct: the process listening on {} (PID {l}) is not the parent of backend PID {pid} (PID {p}): a pooler or proxy sits between",
                    path.display()
                ),
            ),
            _ => (
                Route::Middlebox,
                format!(
                    "not proven direct: the process listening on {} or backend PID {pid} is not visible from here (another PID namespace), so nothing proves that no pooler sits between",
                    path.display()
                ),
            ),
        },
    }
}

/// Socket addresses for a message.
fn list(addrs: &[SocketAddr]) -> String {
    if addrs.is_empty() {
        return "none found".into();
    }
    addrs
        .iter()
        .map(SocketAddr::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Effect: tests/check.rs (through PgBouncer the route is not direct, and check says why)
    /// and tests/poolers.rs (a pooler on the same port number is not taken for the server).
    #[test]
    fn server_side_statements() {
        insta::assert_snapshot!("server_side", crate::sql::pretty(SERVER_SIDE));
        insta::assert_snapshot!("backend_pid", crate::sql::pretty(BACKEND_PID));
    }

    fn tcp(addr: &str) -> SocketAddr {
        addr.parse().expect("test address")
    }

    fn seen(pid: i32, again: i32, client: Option<&str>) -> ServerSide {
        ServerSide {
            pid,
            again,
            client: client.map(|c| {
                let a = tcp(c);
                (a.ip(), a.port())
            }),
        }
    }

    #[test]
    fn direct_over_tcp_needs_the_server_to_see_our_own_socket() {
        let own = OwnEnd::Tcp(vec![tcp("10.0.0.7:40001"), tcp("10.0.0.7:40002")]);
        // A Kubernetes Service (DNAT): the server sees our own address and port.
        let (route, why) = judge_route(&seen(10, 10, Some("10.0.0.7:40002")), &own, None);
        assert_eq!(route, Route::Direct, "{why}");
        assert!(why.contains("10.0.0.7:40002"), "{why}");
        // A pooler on the same port number: the server sees the pooler's own socket.
        let (route, why) = judge_route(&seen(10, 10, Some("10.213.0.2:51000")), &own, None);
        assert_eq!(route, Route::Middlebox, "{why}");
        assert!(
            why.contains("10.213.0.2:51000") && why.contains("not proven"),
            "{why}"
        );
        // Same address, another port: a pooler on the same host.
        let (route, _) = judge_route(&seen(10, 10, Some("10.0.0.7:40003")), &own, None);
        assert_eq!(route, Route::Middlebox);
        // A pooler that reaches the server over a Unix socket.
        let (route, why) = judge_route(&seen(10, 10, None), &own, None);
        assert_eq!(route, Route::Middlebox, "{why}");
    }

    #[test]
    fn a_backend_pid_that_changes_is_transaction_pooling_whatever_the_addresses_say() {
        let own = OwnEnd::Tcp(vec![tcp("127.0.0.1:40001")]);
        let (route, why) = judge_route(&seen(10, 11, Some("127.0.0.1:40001")), &own, None);
        assert_eq!(route, Route::TransactionPooling, "{why}");
        assert!(why.contains("10 then 11"), "{why}");
    }

    #[test]
    fn direct_over_a_unix_socket_needs_the_backend_to_be_a_child_of_its_listener() {
        let own = |listener| OwnEnd::Unix {
            path: "/run/postgresql/.s.PGSQL.5432".into(),
            listener,
        };
        assert_eq!(
            judge_route(&seen(10, 10, None), &own(Some(1)), Some(1)).0,
            Route::Direct
        );
        // PgBouncer listens; the backend's parent is the postmaster.
        let (route, why) = judge_route(&seen(10, 10, None), &own(Some(2)), Some(1));
        assert_eq!(route, Route::Middlebox, "{why}");
        // Not visible (another PID namespace): not proven.
        assert_eq!(
            judge_route(&seen(10, 10, None), &own(None), None).0,
            Route::Middlebox
        );
        assert_eq!(
            judge_route(&seen(10, 10, None), &own(Some(1)), None).0,
            Route::Middlebox
        );
        // The server sees a TCP client: a pooler reaching it over TCP.
        let (route, _) = judge_route(
            &seen(10, 10, Some("127.0.0.1:5000")),
            &own(Some(1)),
            Some(1),
        );
        assert_eq!(route, Route::Middlebox);
    }
}
