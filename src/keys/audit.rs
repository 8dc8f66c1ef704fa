//! The audit trail of key management: every issue, import, revoke, disable, enable, rotate,
//! delete and ephemeral mint a [`KeyManager`](super::KeyManager) attempts becomes one
//! [`AuditEvent`] (who, what, which key, when, how it ended), handed to each of its
//! [`AuditSink`]s.
//!
//! An event names keys by id only: never a key, a digest or a hint.

use std::borrow::Cow;
use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::Path;
use std::sync::Mutex;

use serde::ser::{Serialize, SerializeMap, Serializer};

use super::manager::ManageError;
use super::record::KeyId;
use crate::clock::Timestamp;
use crate::identity::Identity;

/// Who asked for a key-management action.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    /// An authenticated caller, by key id (the management API's callers).
    Key(KeyId),
    /// A tool or operator named by the program, such as `keygen`.
    Named(Cow<'static, str>),
    /// Nobody was named: a [`KeyManager`](super::KeyManager) used without
    /// [`acting_as`](super::KeyManager::acting_as). Shown as `-`.
    Unknown,
}

impl Actor {
    /// An actor named by the program (`keygen`, `migration`, an operator's login).
    pub fn named(name: impl Into<Cow<'static, str>>) -> Self {
        Actor::Named(name.into())
    }

    /// The caller behind `identity`, or [`Actor::Unknown`].
    pub fn of(identity: Option<&Identity>) -> Self {
        identity.map_or(Actor::Unknown, |who| Actor::Key(who.id()))
    }
}

impl fmt::Display for Actor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Actor::Key(id) => write!(f, "key:{id}"),
            Actor::Named(name) => f.write_str(name),
            Actor::Unknown => f.write_str("-"),
        }
    }
}

/// What was attempted.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AuditAction {
    /// A key was issued ([`KeyManager::issue`](super::KeyManager::issue)).
    Issue,
    /// A key made elsewhere was stored by digest.
    Import,
    /// A key (and its ephemeral keys) revoked.
    Revoke,
    /// A key disabled.
    Disable,
    /// A key enabled again.
    Enable,
    /// A key given a successor, the old one kept for a grace period.
    Rotate,
    /// A key's record (and its ephemeral keys') removed.
    Delete,
    /// An ephemeral key minted from the caller's key.
    MintEphemeral,
    /// A key's limits or models changed (and its ephemeral keys' with it).
    ChangeAccess,
}

impl AuditAction {
    /// The action's name in logs and files: `issue`, `import`, `revoke`, `disable`,
    /// `enable`, `rotate`, `delete`, `mint_ephemeral`, `change_access`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditAction::Issue => "issue",
            AuditAction::Import => "import",
            AuditAction::Revoke => "revoke",
            AuditAction::Disable => "disable",
            AuditAction::Enable => "enable",
            AuditAction::Rotate => "rotate",
            AuditAction::Delete => "delete",
            AuditAction::MintEphemeral => "mint_ephemeral",
            AuditAction::ChangeAccess => "change_access",
        }
    }
}

/// How an attempt ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuditOutcome {
    /// Done.
    Ok,
    /// Refused for what was asked (`not_found`, `invalid`, `forbidden`, `unusable`,
    /// `too_many_ephemeral`).
    Refused(&'static str),
    /// Not done for a fault of the system (`conflict`, `store_unavailable`).
    Failed(&'static str),
}

impl AuditOutcome {
    /// `ok`, `refused` or `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            AuditOutcome::Ok => "ok",
            AuditOutcome::Refused(_) => "refused",
            AuditOutcome::Failed(_) => "failed",
        }
    }

    /// Why it was refused or failed.
    pub fn reason(self) -> Option<&'static str> {
        match self {
            AuditOutcome::Ok => None,
            AuditOutcome::Refused(why) | AuditOutcome::Failed(why) => Some(why),
        }
    }

    pub(crate) fn of<T>(result: &Result<T, ManageError>) -> Self {
        result
            .as_ref()
            .err()
            .map_or(AuditOutcome::Ok, Self::of_error)
    }

    pub(crate) fn of_error(error: &ManageError) -> Self {
        match error {
            ManageError::NotFound(_) => AuditOutcome::Refused("not_found"),
            ManageError::Invalid(_) => AuditOutcome::Refused("invalid"),
            ManageError::Forbidden(_) => AuditOutcome::Refused("forbidden"),
            ManageError::Unusable(..) => AuditOutcome::Refused("unusable"),
            ManageError::TooManyEphemeral { .. } => AuditOutcome::Refused("too_many_ephemeral"),
            ManageError::Conflict => AuditOutcome::Failed("conflict"),
            ManageError::Store(_) => AuditOutcome::Failed("store_unavailable"),
        }
    }
}

/// One key-management attempt, as the audit trail keeps it.
///
/// Serialized (for [`AuditFile`]) as one JSON object:
/// `{"time":"2026-12-01T10:00:00Z","actor":"key:…","action":"revoke","target":"…","outcome":"ok"}`,
/// with `"successor"` after a rotation and `"reason"` when refused or failed.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct AuditEvent {
    /// When it was attempted.
    pub time: Timestamp,
    /// Who asked.
    pub actor: Actor,
    /// What was asked.
    pub action: AuditAction,
    /// The key acted on: the one named, or the one issued, imported or minted (`None` when
    /// a key to be created never was).
    pub target: Option<KeyId>,
    /// A rotation's new key.
    pub successor: Option<KeyId>,
    /// How it ended.
    pub outcome: AuditOutcome,
}

impl Serialize for AuditEvent {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let mut map = serializer.serialize_map(None)?;
        map.serialize_entry("time", &self.time.to_string())?;
        map.serialize_entry("actor", &self.actor.to_string())?;
        map.serialize_entry("action", self.action.as_str())?;
        map.serialize_entry("target", &self.target.map(|id| id.to_string()))?;
        if let Some(successor) = self.successor {
            map.serialize_entry("successor", &successor.to_string())?;
        }
        map.serialize_entry("outcome", self.outcome.as_str())?;
        if let Some(reason) = self.outcome.reason() {
            map.serialize_entry("reason", reason)?;
        }
        map.end()
    }
}

/// Where audit events go. Every [`KeyManager`](super::KeyManager) writes each event to the
/// log (target `tower_gateway_auth::audit`, level INFO); sinks added with
/// [`KeyManager::audit_to`](super::KeyManager::audit_to) get it too.
///
/// A sink is called on the task doing the change, after the change, so it should be quick;
/// it cannot fail the change (a key revoked stays revoked if the trail cannot be written).
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use tower_gateway_auth::keys::{AuditEvent, KeyManager, NewKey};
/// use tower_gateway_auth::store::MemoryStore;
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let seen = Arc::new(Mutex::new(Vec::new()));
/// let trail = seen.clone();
/// let manager = KeyManager::new(Arc::new(MemoryStore::new()))
///     .audit_to(move |event: &AuditEvent| trail.lock().unwrap().push(event.clone()));
/// manager.issue(NewKey::named("alice")).await.unwrap();
/// assert_eq!(seen.lock().unwrap()[0].action.as_str(), "issue");
/// # });
/// ```
pub trait AuditSink: Send + Sync + 'static {
    /// Records `event`.
    fn record(&self, event: &AuditEvent);
}

impl<F: Fn(&AuditEvent) + Send + Sync + 'static> AuditSink for F {
    fn record(&self, event: &AuditEvent) {
        self(event)
    }
}

/// Writes the event to the log, as every manager does.
pub(crate) fn log(event: &AuditEvent) {
    tracing::info!(
        target: "tower_gateway_auth::audit",
        actor = %event.actor,
        action = event.action.as_str(),
        target_key = %event.target.map_or_else(|| "-".to_owned(), |id| id.to_string()),
        successor = %event.successor.map_or_else(|| "-".to_owned(), |id| id.to_string()),
        outcome = event.outcome.as_str(),
        reason = event.outcome.reason().unwrap_or("-"),
        "key management",
    );
}

/// Appends each event to a file as one line of JSON, written and flushed per event, so
/// that a crash loses none that were reported done.
///
/// ```no_run
/// use std::sync::Arc;
/// use tower_gateway_auth::keys::{AuditFile, KeyManager};
/// use tower_gateway_auth::store::MemoryStore;
///
/// let manager = KeyManager::new(Arc::new(MemoryStore::new()))
///     .audit_to(AuditFile::open("audit.jsonl")?);
/// # Ok::<(), std::io::Error>(())
/// ```
pub struct AuditFile {
    file: Mutex<File>,
    path: Box<Path>,
}

impl AuditFile {
    /// Opens `path` for appending, creating it when missing.
    pub fn open(path: impl AsRef<Path>) -> std::io::Result<Self> {
        let path = path.as_ref();
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(AuditFile {
            file: Mutex::new(file),
            path: path.into(),
        })
    }
}

impl AuditSink for AuditFile {
    fn record(&self, event: &AuditEvent) {
        let mut line = serde_json::to_vec(event).expect("an audit event always serializes");
        line.push(b'\n');
        // One write per line on an append-mode file: concurrent writers never interleave
        // within a line.
        let mut file = self
            .file
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(error) = file.write_all(&line).and_then(|()| file.flush()) {
            tracing::error!(
                target: "tower_gateway_auth::audit",
                path = %self.path.display(),
                %error,
                "cannot append to the audit file",
            );
        }
    }
}

impl fmt::Debug for AuditFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AuditFile")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}
