//! What a key becomes once presented: a digest, never the key itself.
//!
//! Stores keep only [`KeyDigest`]s. A [`KeyHasher`] turns a presented key into its digest:
//! plain SHA-256 by default, or HMAC-SHA-256 under a server-side pepper so that a leaked store
//! is useless without the pepper.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// The digest of an API key: what stores keep and look keys up by.
///
/// Its `Debug` shows nothing of the bytes; to name a key in a log line use the record's id or
/// [`KeyDigest::fingerprint`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyDigest([u8; 32]);

impl KeyDigest {
    /// Wraps raw digest bytes, e.g. read back from a store.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        KeyDigest(bytes)
    }

    /// The raw digest bytes, for a store to persist.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Lower-case hex, for a store to persist.
    pub fn to_hex(&self) -> String {
        let mut out = String::with_capacity(64);
        for b in self.0 {
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 0x0f)]));
        }
        out
    }

    /// Parses 64 hex digits (either case).
    pub fn from_hex(hex: &str) -> Option<Self> {
        let hex = hex.as_bytes();
        if hex.len() != 64 {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, pair) in hex.chunks_exact(2).enumerate() {
            out[i] = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
        }
        Some(KeyDigest(out))
    }

    /// Constant-time equality, for comparing a presented key's digest with a stored one.
    pub fn ct_eq(&self, other: &KeyDigest) -> bool {
        self.0.ct_eq(&other.0).into()
    }

    /// A short, one-way tag of this digest that is safe to log (8 hex digits).
    ///
    /// It is a hash of the digest, not a piece of it, so log lines reveal nothing the store
    /// holds; it lets an operator tell repeated attempts with one unknown key apart from many.
    pub fn fingerprint(&self) -> Fingerprint {
        let tag = Sha256::new()
            .chain_update(b"tower-gateway-auth fingerprint\0")
            .chain_update(self.0)
            .finalize();
        Fingerprint([tag[0], tag[1], tag[2], tag[3]])
    }

    /// The first eight bytes, as a hash-table hash. The digest is already uniformly
    /// distributed, so hashing it again would only cost time.
    pub(crate) fn table_hash(&self) -> u64 {
        let mut first = [0u8; 8];
        first.copy_from_slice(&self.0[..8]);
        u64::from_le_bytes(first)
    }
}

impl fmt::Debug for KeyDigest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("KeyDigest(<redacted>)")
    }
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    }
}

/// A short tag derived from a key's digest, safe to log. See [`KeyDigest::fingerprint`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 4]);

impl fmt::Display for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({self})")
    }
}

/// Turns a presented key into the [`KeyDigest`] a store looks up.
///
/// Every component that issues or verifies keys for one store must use the same hasher; a
/// store carries its own (see [`KeyStore::hasher`](crate::KeyStore::hasher)).
///
/// ```
/// use tower_gateway_auth::KeyHasher;
///
/// let plain = KeyHasher::sha256();
/// let peppered = KeyHasher::with_pepper(b"server-side secret, 32 bytes or more!");
/// assert_ne!(plain.digest(b"gw_key"), peppered.digest(b"gw_key"));
/// assert_eq!(plain.digest(b"gw_key"), plain.digest(b"gw_key"));
/// ```
#[derive(Clone, Default)]
pub struct KeyHasher {
    pepper: Option<Hmac<Sha256>>,
}

impl KeyHasher {
    /// Plain SHA-256 of the key.
    pub const fn sha256() -> Self {
        KeyHasher { pepper: None }
    }

    /// HMAC-SHA-256 of the key under `pepper`, a server-side secret kept apart from the store.
    pub fn with_pepper(pepper: &[u8]) -> Self {
        let mac = Hmac::<Sha256>::new_from_slice(pepper).expect("HMAC accepts keys of any length");
        KeyHasher { pepper: Some(mac) }
    }

    /// Whether a pepper is in use.
    pub fn is_peppered(&self) -> bool {
        self.pepper.is_some()
    }

    /// The digest of `key`.
    pub fn digest(&self, key: &[u8]) -> KeyDigest {
        match &self.pepper {
            None => KeyDigest(Sha256::digest(key).into()),
            // The keyed state is computed once; each digest clones it (two compressions).
            Some(mac) => KeyDigest(mac.clone().chain_update(key).finalize().into_bytes().into()),
        }
    }
}

impl fmt::Debug for KeyHasher {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pepper {
            None => f.write_str("KeyHasher::Sha256"),
            Some(_) => f.write_str("KeyHasher::HmacSha256(<redacted pepper>)"),
        }
    }
}

/// The base62 alphabet GitHub-style tokens use: digits, upper case, lower case.
pub(crate) const BASE62: &[u8; 62] =
    b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// Writes `value` as exactly `width` (at most 22) base62 digits, most significant first.
pub(crate) fn base62_fixed(mut value: u128, width: usize, out: &mut String) {
    let mut digits = [b'0'; 22];
    for slot in digits[..width].iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    out.extend(digits[..width].iter().map(|&b| char::from(b)));
}

/// Parses base62 digits; `None` on a character outside the alphabet or on overflow.
pub(crate) fn base62_parse(digits: &str) -> Option<u128> {
    digits.bytes().try_fold(0u128, |acc, c| {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'Z' => c - b'A' + 10,
            b'a'..=b'z' => c - b'a' + 36,
            _ => return None,
        };
        acc.checked_mul(62)?.checked_add(u128::from(d))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip() {
        let d = KeyHasher::sha256().digest(b"abc");
        assert_eq!(
            d.to_hex(),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(KeyDigest::from_hex(&d.to_hex()), Some(d));
        assert_eq!(KeyDigest::from_hex(&d.to_hex().to_uppercase()), Some(d));
        assert_eq!(KeyDigest::from_hex("zz"), None);
        assert_eq!(KeyDigest::from_hex(&"g".repeat(64)), None);
    }

    #[test]
    fn debug_redacts() {
        let d = KeyHasher::sha256().digest(b"abc");
        assert_eq!(format!("{d:?}"), "KeyDigest(<redacted>)");
        let h = KeyHasher::with_pepper(b"pepper");
        assert!(!format!("{h:?}").contains("pepper\""));
    }

    #[test]
    fn fingerprint_is_not_a_prefix_of_the_digest() {
        let d = KeyHasher::sha256().digest(b"abc");
        let fp = d.fingerprint().to_string();
        assert_eq!(fp.len(), 8);
        assert!(!d.to_hex().contains(&fp));
    }

    #[test]
    fn base62_round_trip() {
        for v in [0u128, 1, 61, 62, u64::MAX as u128, u128::from(u32::MAX)] {
            let mut s = String::new();
            base62_fixed(v, 22, &mut s);
            assert_eq!(s.len(), 22);
            assert_eq!(base62_parse(&s), Some(v));
        }
        assert_eq!(base62_parse("a-b"), None);
    }
}
