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
        // Four words rather than 32 bytes: subtle's per-element barrier is the cost here.
        let words = |d: &[u8; 32]| -> [u64; 4] {
            std::array::from_fn(|i| {
                u64::from_le_bytes(d[i * 8..i * 8 + 8].try_into().expect("8 bytes"))
            })
        };
        words(&self.0).ct_eq(&words(&other.0)).into()
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

/// Lower-case hex digits.
pub(crate) const HEX: &[u8; 16] = b"0123456789abcdef";

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
/// store carries its own (see [`KeyStore::hasher`](crate::store::KeyStore::hasher)).
///
/// ```
/// use tower_gateway_auth::keys::KeyHasher;
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
    ///
    /// Use at least 32 random bytes: a file store records a check value of the pepper (to
    /// refuse a wrong one at start-up), so a guessable pepper could be found from the file.
    pub fn with_pepper(pepper: &[u8]) -> Self {
        let mac = Hmac::<Sha256>::new_from_slice(pepper).expect("HMAC accepts keys of any length");
        KeyHasher { pepper: Some(mac) }
    }

    /// Whether a pepper is in use.
    pub fn is_peppered(&self) -> bool {
        self.pepper.is_some()
    }

    /// The hasher's name as stores record it: `sha256` or `hmac-sha256`.
    pub(crate) fn name(&self) -> &'static str {
        if self.is_peppered() {
            "hmac-sha256"
        } else {
            "sha256"
        }
    }

    /// What a store records to tell, on opening, whether its digests were made under this
    /// pepper: the digest of a fixed text (it reveals nothing of the pepper). `None` unpeppered.
    pub(crate) fn pepper_check(&self) -> Option<String> {
        self.is_peppered()
            .then(|| self.digest(b"tower-gateway-auth pepper check").to_hex())
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

/// An API key in the clear: what a client presents, and what issuing a key returns exactly
/// once. `Debug` and `Display` never show it; [`ApiKey::expose`] does, on purpose.
#[derive(Clone, PartialEq, Eq)]
pub struct ApiKey(Box<str>);

impl ApiKey {
    /// Wraps a key issued elsewhere (for import).
    pub fn new(key: impl Into<String>) -> Self {
        ApiKey(key.into().into())
    }

    /// The key itself. Call this only to hand the key to its owner.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for ApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ApiKey(<redacted>)")
    }
}

/// The shape of keys this crate generates: `<prefix>_<random><checksum>`.
///
/// The random part is 128 bits from the operating system's generator in 22 base62 digits;
/// the checksum is the CRC32 of everything before it, in 6 base62 digits, as GitHub's tokens
/// have. The checksum lets a mistyped or truncated key be rejected without a store lookup,
/// and the prefix makes secret scanning exact.
///
/// ```
/// use tower_gateway_auth::keys::{Checksum, KeyFormat};
///
/// let format = KeyFormat::new("gw").unwrap();
/// let key = format.generate();
/// assert!(key.expose().starts_with("gw_"));
/// assert_eq!(key.expose().len(), 3 + 22 + 6);
/// assert_eq!(format.check(key.expose()), Checksum::Valid);
///
/// let mut typo = key.expose().to_owned();
/// typo.replace_range(5..6, if &typo[5..6] == "a" { "b" } else { "a" });
/// assert_eq!(format.check(&typo), Checksum::Invalid);
/// assert_eq!(format.check("sk-imported-elsewhere"), Checksum::NotThisFormat);
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyFormat {
    prefix: Box<str>,
}

/// What [`KeyFormat::check`] says of a presented key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Checksum {
    /// The key has this format and its checksum holds.
    Valid,
    /// The key has this format's prefix and shape but its checksum fails: a typo or a forgery.
    Invalid,
    /// The key does not have this format (e.g. it was issued elsewhere and imported).
    NotThisFormat,
}

impl KeyFormat {
    const RANDOM_DIGITS: usize = 22;
    const CHECKSUM_DIGITS: usize = 6;

    /// Keys starting with `prefix_`. The prefix is 1 to 10 ASCII letters, digits or `-`.
    pub fn new(prefix: &str) -> Result<Self, InvalidPrefix> {
        let ok = (1..=10).contains(&prefix.len())
            && prefix
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err(InvalidPrefix(prefix.to_owned()));
        }
        Ok(KeyFormat {
            prefix: prefix.into(),
        })
    }

    /// The prefix, without the `_`.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A fresh key.
    pub fn generate(&self) -> ApiKey {
        let mut random = [0u8; 16];
        getrandom::fill(&mut random).expect("the OS random number generator failed");
        let mut key = String::with_capacity(self.prefix.len() + 1 + 28);
        key.push_str(&self.prefix);
        key.push('_');
        base62_fixed(u128::from_le_bytes(random), Self::RANDOM_DIGITS, &mut key);
        let checksum = crc32fast::hash(key.as_bytes());
        base62_fixed(u128::from(checksum), Self::CHECKSUM_DIGITS, &mut key);
        ApiKey(key.into())
    }

    /// Whether `key` has this format and a valid checksum. Costs a CRC32 of ~30 bytes.
    pub fn check(&self, key: &str) -> Checksum {
        let Some(rest) = key
            .strip_prefix(&*self.prefix)
            .and_then(|r| r.strip_prefix('_'))
        else {
            return Checksum::NotThisFormat;
        };
        if rest.len() != Self::RANDOM_DIGITS + Self::CHECKSUM_DIGITS
            || !rest.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Checksum::NotThisFormat;
        }
        let (body, checksum) = key.split_at(key.len() - Self::CHECKSUM_DIGITS);
        match base62_parse(checksum) {
            Some(c) if c == u128::from(crc32fast::hash(body.as_bytes())) => Checksum::Valid,
            _ => Checksum::Invalid,
        }
    }

    /// The hint shown in listings: the prefix and the first four random characters, e.g.
    /// `gw_AbC4`. It identifies a key to its owner without weakening it meaningfully.
    pub fn hint(&self, key: &ApiKey) -> String {
        let start = self.prefix.len() + 1;
        let end = (start + 4).min(key.0.len());
        key.0[..end].to_owned()
    }
}

/// The error when a key prefix is not 1 to 10 ASCII letters, digits or `-`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidPrefix(String);

impl fmt::Display for InvalidPrefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "invalid key prefix `{}`: use 1 to 10 ASCII letters, digits or `-`",
            self.0
        )
    }
}

impl std::error::Error for InvalidPrefix {}

#[cfg(test)]
mod format_tests {
    use super::*;

    #[test]
    fn every_single_character_typo_is_caught() {
        let format = KeyFormat::new("gw").unwrap();
        let key = format.generate();
        let key = key.expose();
        for i in 3..key.len() {
            for replacement in ['0', 'Z', 'z'] {
                let mut typo: Vec<u8> = key.as_bytes().to_vec();
                if typo[i] == replacement as u8 {
                    continue;
                }
                typo[i] = replacement as u8;
                let typo = String::from_utf8(typo).unwrap();
                assert_eq!(format.check(&typo), Checksum::Invalid, "{i}");
            }
        }
        assert_eq!(format.check(&key[..key.len() - 1]), Checksum::NotThisFormat);
    }

    #[test]
    fn keys_are_distinct_and_hints_short() {
        let format = KeyFormat::new("sk-test").unwrap();
        let a = format.generate();
        let b = format.generate();
        assert_ne!(a, b);
        assert_eq!(format.hint(&a).len(), "sk-test_".len() + 4);
        assert!(a.expose().starts_with(&format.hint(&a)));
        assert_eq!(format!("{a:?}"), "ApiKey(<redacted>)");
    }

    #[test]
    fn prefixes_are_checked() {
        assert!(KeyFormat::new("").is_err());
        assert!(KeyFormat::new("a_b").is_err());
        assert!(KeyFormat::new("x".repeat(11).as_str()).is_err());
        assert!(KeyFormat::new("x".repeat(10).as_str()).is_ok());
        assert!(KeyFormat::new("lbk").is_ok());
    }
}

#[cfg(test)]
mod ct_tests {
    use super::*;

    #[test]
    fn ct_eq_tells_every_byte() {
        let a = KeyHasher::sha256().digest(b"a");
        assert!(a.ct_eq(&a));
        for i in 0..32 {
            let mut bytes = *a.as_bytes();
            bytes[i] ^= 0x80;
            assert!(!a.ct_eq(&KeyDigest::from_bytes(bytes)), "byte {i}");
        }
    }
}
