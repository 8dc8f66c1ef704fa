//! A verified token's claims as the record an [`Identity`](crate::Identity) is made of.

use serde_json::Value;
use sha2::{Digest, Sha256};

use crate::clock::Timestamp;
use crate::keys::{KeyDigest, KeyId, KeyRecord, Metadata};
use crate::rejection::Rejection;

/// Which claims make the identity.
#[derive(Debug, Clone, Default)]
pub(crate) struct Mapping {
    pub(crate) name_claim: Option<String>,
    pub(crate) scope_claim: Option<String>,
    pub(crate) metadata: Vec<String>,
    /// Required claims jsonwebtoken does not check itself (it knows only the registered
    /// ones).
    pub(crate) required: Vec<String>,
}

/// The id of subject `sub` of issuer `iss`: both length-prefixed, so that no two
/// (issuer, subject) pairs hash the same input, under a separator no key id uses.
pub(crate) fn subject_id(iss: &str, sub: &str) -> KeyId {
    let mut hash = Sha256::new();
    hash.update(b"tower-gateway-auth jwt subject v1\0");
    for part in [iss, sub] {
        hash.update((part.len() as u64).to_be_bytes());
        hash.update(part.as_bytes());
    }
    let bytes: [u8; 8] = hash.finalize()[..8].try_into().expect("8 of 32 bytes");
    KeyId::from_u64(u64::from_be_bytes(bytes).max(1))
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

impl Mapping {
    /// The record of a token whose claims are `claims`, digest `digest`, valid until `exp`.
    pub(crate) fn record(
        &self,
        claims: &Value,
        digest: KeyDigest,
        exp: u64,
    ) -> Result<KeyRecord, Rejection> {
        for claim in &self.required {
            if claims.get(claim).is_none_or(Value::is_null) {
                return Err(super::invalid("The token lacks a required claim."));
            }
        }
        let iss = claims.get("iss").and_then(Value::as_str).unwrap_or("");
        let Some(sub) = claims.get("sub").and_then(Value::as_str) else {
            return Err(super::invalid("The token has no subject (sub)."));
        };
        let name = self
            .name_claim
            .as_deref()
            .and_then(|c| claims.get(c))
            .or_else(|| claims.get("name"))
            .and_then(Value::as_str)
            .unwrap_or(sub);
        let scopes = match &self.scope_claim {
            Some(claim) => scopes(claims.get(claim)),
            None => match claims.get("scope") {
                Some(scope) => scopes(Some(scope)),
                None => scopes(claims.get("scp")),
            },
        };
        let mut metadata = Metadata::new();
        metadata.insert("iss".into(), iss.to_owned());
        metadata.insert("sub".into(), sub.to_owned());
        for claim in &self.metadata {
            if let Some(value) = claims.get(claim).filter(|v| !v.is_null()) {
                metadata.insert(claim.clone(), text(value));
            }
        }
        let created = claims
            .get("iat")
            .and_then(Value::as_u64)
            .map_or(Timestamp::EPOCH, Timestamp::from_unix_secs);
        Ok(KeyRecord::new(subject_id(iss, sub), digest)
            .with_name(name)
            .with_hint("jwt")
            .with_scopes(scopes)
            .with_metadata(metadata)
            .with_created_at(created)
            .with_expires_at(Some(Timestamp::from_unix_secs(exp))))
    }
}

/// Scopes from a space-separated string or an array of strings.
fn scopes(value: Option<&Value>) -> Vec<String> {
    match value {
        Some(Value::String(s)) => s.split_whitespace().map(str::to_owned).collect(),
        Some(Value::Array(items)) => items
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_owned)
            .collect(),
        _ => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subjects_of_two_issuers_do_not_meet() {
        assert_ne!(subject_id("a", "bc"), subject_id("ab", "c"));
        assert_ne!(subject_id("https://a", "1"), subject_id("https://b", "1"));
        assert_eq!(subject_id("https://a", "1"), subject_id("https://a", "1"));
    }

    #[test]
    fn scopes_read_strings_and_arrays() {
        let m = Mapping::default();
        let digest = crate::keys::KeyHasher::sha256().digest(b"t");
        let r = m
            .record(
                &serde_json::json!({"sub":"u","scope":"chat  admin"}),
                digest,
                9,
            )
            .unwrap();
        assert!(r.scopes().contains("chat") && r.scopes().contains("admin"));
        let r = m
            .record(&serde_json::json!({"sub":"u","scp":["x","y"]}), digest, 9)
            .unwrap();
        assert!(r.scopes().contains("y"));
        assert!(
            m.record(&serde_json::json!({"iss":"i"}), digest, 9)
                .is_err()
        );
    }
}
