//! Key management, in the order a key lives: its format and digest ([`ApiKey`],
//! [`KeyFormat`], [`KeyHasher`], [`KeyDigest`]), what a store keeps of it ([`KeyRecord`]),
//! the lifecycle operations on a store ([`KeyManager`]: issue, rotate, revoke, mint
//! ephemeral keys) with its audit trail ([`AuditEvent`]), when each key was last used ([`LastUsed`]), and the HTTP API over them ([`ManagementApi`], feature `axum`).

#[cfg(feature = "axum")]
mod api;
mod audit;
mod format;
mod last_used;
mod manager;
#[cfg(feature = "admin-ui")]
mod page;
mod record;

#[cfg(feature = "axum")]
pub use api::ManagementApi;
pub use audit::{Actor, AuditAction, AuditEvent, AuditFile, AuditOutcome, AuditSink};
pub use format::{ApiKey, Checksum, Fingerprint, InvalidPrefix, KeyDigest, KeyFormat, KeyHasher};
pub use last_used::{DEFAULT_FLUSH_EVERY, LastUsed, LastUsedBuilder};
pub use manager::{
    AccessChange, DEFAULT_EPHEMERAL_TTL, DEFAULT_MAX_EPHEMERAL_TTL, DEFAULT_MAX_LIVE_EPHEMERAL,
    DEFAULT_TTL, Ephemeral, IssuedKey, KeyManager, Lifetime, ManageError, NewKey,
};
pub use record::{KeyId, KeyRecord, KeyStatus, KeyUnusable, Metadata, ParseKeyIdError, Scopes};
