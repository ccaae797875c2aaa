//! The termination message: the gate's final one-line outcome, written where Kubernetes looks
//! for it (`/dev/termination-log`, shown by `kubectl describe pod` and in the pod's status), so
//! an operator sees why an init container or a gated container stopped without reading logs.
//!
//! Written only when the file exists and is writable (never created: outside Kubernetes the
//! path means nothing), truncated to stay under Kubernetes' 4 KiB limit, and never holding more
//! than the error line already printed (which never contains a password or a value).
//! `MIGRATIONS_GATE_TERMINATION_LOG` names another file (tests, other orchestrators).
//!
//! A gate that `exec`s the app writes nothing on success: the app owns the file from then on.

use std::io::Write;

use crate::error::EXIT_OK;

/// Where Kubernetes reads the message by default (`terminationMessagePath`).
const DEFAULT_PATH: &str = "/dev/termination-log";
/// The variable naming another file.
pub(crate) const PATH_VAR: &str = "MIGRATIONS_GATE_TERMINATION_LOG";
/// Kubernetes keeps at most 4096 bytes of the message; stay below.
const LIMIT: usize = 4000;

/// A failure: `exit N: <the error line>`.
pub(crate) fn write_failure(code: i32, message: &str) {
    write(&format!("exit {code}: {message}"));
}

/// A success that ends the gate: `exit 0: <summary>`.
pub(crate) fn write_success(summary: &str) {
    write(&format!("exit {EXIT_OK}: {summary}"));
}

fn write(message: &str) {
    let path = std::env::var_os(PATH_VAR)
        .filter(|p| !p.is_empty())
        .unwrap_or_else(|| DEFAULT_PATH.into());
    // Never created: only an existing, writable file is a termination log.
    let Ok(mut file) = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
    else {
        return;
    };
    let _ = file.write_all(clip(message).as_bytes());
    let _ = file.write_all(b"\n");
}

/// One line, at most [`LIMIT`] bytes, cut at a character boundary.
fn clip(message: &str) -> &str {
    let line = message.lines().next().unwrap_or("").trim_end();
    if line.len() <= LIMIT {
        return line;
    }
    let mut end = LIMIT;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clip_keeps_one_line_under_the_limit_on_a_char_boundary() {
        assert_eq!(clip("one\ntwo"), "one");
        let long = "é".repeat(3000);
        let c = clip(&long);
        assert!(c.len() <= LIMIT && c.len() >= LIMIT - 1);
        assert!(c.chars().all(|ch| ch == 'é'));
    }
}
