//! The `--same-env` fingerprints: HMAC-SHA256 of a variable's name and value under the
//! per-ledger key, so that a fingerprint kept in the database does not reveal a short secret.

use sha2::{Digest, Sha256};

/// The per-ledger HMAC key. Its `Debug` never shows the bytes.
#[derive(Clone)]
pub(crate) struct EnvKey(Vec<u8>);

impl std::fmt::Debug for EnvKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EnvKey(..)")
    }
}

impl EnvKey {
    /// From the hex text the database returns.
    pub(crate) fn from_hex(hex: &str) -> Option<EnvKey> {
        let hex = hex.trim();
        if hex.is_empty() || !hex.len().is_multiple_of(2) {
            return None;
        }
        (0..hex.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok())
            .collect::<Option<Vec<u8>>>()
            .map(EnvKey)
    }

    /// The fingerprint of variable `name` as this process sees it: HMAC-SHA256 over the name and
    /// the value's bytes, with "unset" and "empty" distinct.
    pub(super) fn fingerprint(&self, name: &str) -> String {
        use std::os::unix::ffi::OsStrExt;
        let value = std::env::var_os(name);
        let mut message = name.as_bytes().to_vec();
        message.push(0);
        match &value {
            None => message.push(0),
            Some(v) => {
                message.push(1);
                message.extend_from_slice(v.as_bytes());
            }
        }
        hex(&hmac_sha256(&self.0, &message))
    }
}

/// HMAC-SHA256 (RFC 2104) with the `sha2` the crate already uses.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| k.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

pub(super) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// 32 bytes from the kernel's CSPRNG (`getrandom(2)`).
pub(super) fn random_key() -> std::io::Result<[u8; 32]> {
    let mut buf = [0u8; 32];
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: writes at most `buf.len() - filled` bytes into the rest of `buf`.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex(&mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let long_key = [0xaau8; 131];
        let mac = hmac_sha256(
            &long_key,
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex(&mac),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn key_round_trips_through_hex_and_hides_itself() {
        let k = EnvKey::from_hex("00ff10").unwrap();
        assert_eq!(k.0, vec![0, 255, 16]);
        assert_eq!(format!("{k:?}"), "EnvKey(..)");
        assert!(EnvKey::from_hex("abc").is_none());
    }
}
