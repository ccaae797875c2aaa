//! The `--same-env` fingerprints: HMAC-SHA256 of a variable's name and value under the
//! per-ledger key, so that a fingerprint kept in the database does not reveal a short secret.

use hmac::{Hmac, Mac};
use sha2::Sha256;

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
    pub(crate) fn from_hex(text: &str) -> Option<EnvKey> {
        hex::decode(text.trim())
            .ok()
            .filter(|k| !k.is_empty())
            .map(EnvKey)
    }

    /// The fingerprint of variable `name` as this process sees it: HMAC-SHA256 over the name and
    /// the value's bytes, with "unset" and "empty" distinct.
    pub(super) fn fingerprint(&self, name: &str) -> String {
        use std::os::unix::ffi::OsStrExt;
        let value = std::env::var_os(name);
        self.fingerprint_of(name, value.as_ref().map(|v| v.as_bytes()))
    }

    /// The fingerprint of `name` with `value` (`None`: unset), as [`EnvKey::fingerprint`].
    pub(super) fn fingerprint_of(&self, name: &str, value: Option<&[u8]>) -> String {
        let mut message = name.as_bytes().to_vec();
        message.push(0);
        match value {
            None => message.push(0),
            Some(v) => {
                message.push(1);
                message.extend_from_slice(v);
            }
        }
        hex::encode(hmac_sha256(&self.0, &message))
    }
}

/// HMAC-SHA256 (RFC 2104), from RustCrypto's `hmac` over the `sha2` the crate already uses.
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    // HMAC takes a key of any length (RFC 2104, section 3): this never fails.
    let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(key)
        .unwrap_or_else(|_| unreachable!("HMAC accepts keys of any length"));
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// 32 bytes from the kernel's CSPRNG (`getrandom(2)`, through the `getrandom` crate, which
/// retries an interrupted call). An OS error keeps its errno.
pub(super) fn random_key() -> std::io::Result<[u8; 32]> {
    let mut buf = [0u8; 32];
    getrandom::getrandom(&mut buf).map_err(|e| match e.raw_os_error() {
        Some(errno) => std::io::Error::from_raw_os_error(errno),
        None => std::io::Error::other(e.to_string()),
    })?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231_test_case_2() {
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(
            hex::encode(mac),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let long_key = [0xaau8; 131];
        let mac = hmac_sha256(
            &long_key,
            b"Test Using Larger Than Block-Size Key - Hash Key First",
        );
        assert_eq!(
            hex::encode(mac),
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
