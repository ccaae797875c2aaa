//! Reading a file the gate is given (`--database-url-file`, a service file, the files of
//! `--release-from`): regular files only, and at most a bound, so that a FIFO nobody writes to
//! never blocks the gate and `/dev/zero` never fills its memory.

use std::io::Read;
use std::path::Path;

/// The most the gate reads of a file holding a connection string or settings: 64 KiB.
pub(crate) const SETTINGS_LIMIT: u64 = 64 * 1024;

/// The bytes of `path`, a regular file (symbolic links followed) of at most `limit` bytes.
/// `Err` is the reason, for a line that names the file: not a regular file, too large, or the
/// system's error.
pub(crate) fn read_bounded(path: &Path, limit: u64) -> Result<Vec<u8>, String> {
    let meta = std::fs::metadata(path).map_err(|e| e.to_string())?;
    if !meta.is_file() {
        return Err(format!(
            "it is not a regular file ({})",
            kind(&meta.file_type())
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let mut bytes = Vec::new();
    // Read one byte past the bound: a file that grew since `metadata` is caught too.
    file.take(limit + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| e.to_string())?;
    if bytes.len() as u64 > limit {
        return Err(format!("it is larger than {limit} bytes"));
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub(crate) fn read_text(path: &Path, limit: u64) -> Result<String, String> {
    String::from_utf8(read_bounded(path, limit)?).map_err(|_| "it is not UTF-8 text".into())
}

fn kind(t: &std::fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "not a file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_and_oversized_files_are_refused_with_their_reason() {
        let zero = read_bounded(Path::new("/dev/zero"), 10).unwrap_err();
        assert!(zero.contains("a character device"), "{zero}");
        let dir = read_bounded(Path::new("/"), 10).unwrap_err();
        assert!(dir.contains("a directory"), "{dir}");
        let path = std::env::temp_dir().join(format!("mg-files-{}", std::process::id()));
        std::fs::write(&path, "0123456789").unwrap();
        assert_eq!(read_bounded(&path, 10).unwrap().len(), 10);
        let big = read_bounded(&path, 9).unwrap_err();
        assert!(big.contains("larger than 9 bytes"), "{big}");
        let _ = std::fs::remove_file(&path);
    }
}
