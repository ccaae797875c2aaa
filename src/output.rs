//! What the gate writes: its results on standard output, which must never be lost silently,
//! and its text log lines on standard error, which a value must never forge.

use std::io::{ErrorKind, Write};

use crate::error::{Error, Result};

/// Writes `text` (and a newline) to standard output. A closed pipe (`status | head -1`) is a
/// normal end; any other failure (a full disk: `> /dev/full`) is an error naming it, so that a
/// result is never lost with exit 0.
pub(crate) fn print(text: &str) -> Result<()> {
    let mut out = std::io::stdout().lock();
    let written = out
        .write_all(text.as_bytes())
        .and_then(|()| out.write_all(b"\n"))
        .and_then(|()| out.flush());
    match written {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::Output(format!(
            "cannot write to standard output: {e}; the result was not written: check where standard output goes"
        ))),
    }
}

/// [`fn@print`] for bytes that are not text (a man page is; completions are): same rules.
pub(crate) fn print_bytes(bytes: &[u8]) -> Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(Error::Output(format!(
            "cannot write to standard output: {e}; the result was not written: check where standard output goes"
        ))),
    }
}

/// Standard error for text logs, escaping control characters inside a line: tracing writes one
/// event per `write`, ending in a newline, and a field's value (`--lock "$(printf 'a\nforged')"`)
/// must not start a line of its own. `ansi`: the colours tracing adds on a terminal are kept.
#[derive(Clone, Copy)]
pub(crate) struct LogWriter {
    pub(crate) ansi: bool,
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        std::io::stderr()
            .lock()
            .write_all(&escape(buf, self.ansi))?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

/// One event as [`LogWriter`] writes it: control characters before its final newline escaped
/// (`\n`, `\r`, `\xNN`), tabs kept, and ESC kept only for the terminal's colours (`ansi`).
fn escape(buf: &[u8], ansi: bool) -> Vec<u8> {
    let (body, end) = match buf.strip_suffix(b"\n") {
        Some(body) => (body, &b"\n"[..]),
        None => (buf, &b""[..]),
    };
    let mut line = Vec::with_capacity(buf.len() + 8);
    for &b in body {
        match b {
            b'\n' => line.extend_from_slice(b"\\n"),
            b'\r' => line.extend_from_slice(b"\\r"),
            b'\t' => line.push(b),
            0x1b if ansi => line.push(b),
            0x00..=0x1f | 0x7f => line.extend_from_slice(format!("\\x{b:02x}").as_bytes()),
            _ => line.push(b),
        }
    }
    line.extend_from_slice(end);
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn escaped(input: &[u8], ansi: bool) -> String {
        String::from_utf8(escape(input, ansi)).unwrap()
    }

    #[test]
    fn a_value_cannot_start_a_log_line_of_its_own() {
        assert_eq!(escaped(b"lock=l\nforged x\n", false), "lock=l\\nforged x\n");
        assert_eq!(
            escaped(b"a\x1b[31mred\r\tb\n", false),
            "a\\x1b[31mred\\r\tb\n"
        );
        assert_eq!(escaped(b"a\x1b[31mred\n", true), "a\x1b[31mred\n");
        assert_eq!(escaped("é\u{7f}".as_bytes(), false), "é\\x7f");
    }
}
