//! Key lifecycle: issuing, expiry, not-before, rotation grace, ephemeral keys, checksums,
//! imports and peppers — each checked through the inbound layer, on an injectable clock.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::{Request, StatusCode};
use support::{Recorder, read};
use tower::{ServiceBuilder, ServiceExt};
use tower_gateway_auth::clock::{ManualClock, Timestamp};
use tower_gateway_auth::keys::{
    ApiKey, Ephemeral, KeyDigest, KeyFormat, KeyHasher, KeyManager, KeyStatus, Lifetime,
    ManageError, NewKey, Scopes,
};
use tower_gateway_auth::store::{KeyAdmin, KeyStore, MemoryStore};
use tower_gateway_auth::{Identity, InboundApiKeyLayer};

const T0: u64 = 1_800_000_000;
const DAY: u64 = 86_400;

fn t(secs: u64) -> Timestamp {
    Timestamp::from_unix_secs(secs)
}

struct Fixture {
    clock: ManualClock,
    store: Arc<MemoryStore>,
    manager: KeyManager<MemoryStore>,
}

fn fixture() -> Fixture {
    let clock = ManualClock::new(t(T0));
    let store = Arc::new(MemoryStore::new());
    let manager = KeyManager::new(store.clone()).clock(clock.clone());
    Fixture {
        clock,
        store,
        manager,
    }
}

impl Fixture {
    /// The status and error code a request with `key` gets right now.
    async fn try_key(&self, key: &ApiKey) -> (StatusCode, Option<Identity>, String) {
        let rec = Recorder::default();
        let layer = InboundApiKeyLayer::from_shared(self.store.clone())
            .clock(self.clock.clone())
            .key_formats([KeyFormat::new("gw").unwrap()]);
        let svc = ServiceBuilder::new().layer(layer).service(rec.service());
        let req = Request::builder()
            .header("x-api-key", key.expose())
            .body(())
            .unwrap();
        let a = read(svc.oneshot(req).await.unwrap()).await;
        let code = if a.status == StatusCode::OK {
            String::new()
        } else {
            a.json()["error"]["code"]
                .as_str()
                .unwrap_or_default()
                .to_owned()
        };
        let who = (a.status == StatusCode::OK).then(|| rec.last().identity.unwrap());
        (a.status, who, code)
    }
}

#[tokio::test]
async fn an_issued_key_is_shown_once_lives_90_days_and_then_expires() {
    let f = fixture();
    let issued = f
        .manager
        .issue(NewKey::named("alice").scopes(["chat"]))
        .await
        .unwrap();
    let key = issued.key.expose();
    assert!(key.starts_with("gw_") && key.len() == 31, "{key}");
    assert_eq!(issued.record.hint(), &key[..7]);
    assert_eq!(issued.record.expires_at(), Some(t(T0 + 90 * DAY)));
    assert_eq!(issued.record.created_at(), t(T0));
    // The store holds the digest, never the key.
    let stored = f.store.by_id(issued.record.id()).unwrap();
    assert_eq!(stored.digest(), &KeyHasher::sha256().digest(key.as_bytes()));
    assert!(!format!("{stored:?}").contains(key));

    let (status, who, _) = f.try_key(&issued.key).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(who.unwrap().name(), "alice");
    f.clock.set(t(T0 + 90 * DAY - 1));
    assert_eq!(f.try_key(&issued.key).await.0, StatusCode::OK);
    f.clock.set(t(T0 + 90 * DAY));
    let (status, _, code) = f.try_key(&issued.key).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "expired_api_key")
    );
}

#[tokio::test]
async fn custom_lifetimes_never_and_not_before() {
    let f = fixture();
    let never = f
        .manager
        .issue(NewKey::named("n").never_expires())
        .await
        .unwrap();
    assert_eq!(never.record.expires_at(), None);
    let week = f
        .manager
        .issue(NewKey::named("w").expires_in(Duration::from_secs(7 * DAY)))
        .await
        .unwrap();
    assert_eq!(week.record.expires_at(), Some(t(T0 + 7 * DAY)));
    let later = f
        .manager
        .issue(
            NewKey::named("l")
                .not_before(t(T0 + 100))
                .lifetime(Lifetime::Until(t(T0 + 200))),
        )
        .await
        .unwrap();
    let (status, _, code) = f.try_key(&later.key).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "api_key_not_yet_valid")
    );
    f.clock.set(t(T0 + 100));
    assert_eq!(f.try_key(&later.key).await.0, StatusCode::OK);
    f.clock.set(t(T0 + 200));
    assert_eq!(f.try_key(&later.key).await.0, StatusCode::UNAUTHORIZED);
    f.clock.set(t(T0 + 10_000 * DAY));
    assert_eq!(f.try_key(&never.key).await.0, StatusCode::OK);
}

#[tokio::test]
async fn rotation_keeps_the_old_key_for_exactly_the_grace_period() {
    let f = fixture();
    let old = f
        .manager
        .issue(
            NewKey::named("svc")
                .scopes(["chat"])
                .metadata("tenant", "acme"),
        )
        .await
        .unwrap();
    f.clock.set(t(T0 + 1_000));
    let new = f
        .manager
        .rotate(old.record.id(), Duration::from_secs(600))
        .await
        .unwrap();
    assert_ne!(new.key, old.key);
    assert_eq!(new.record.name(), "svc");
    assert_eq!(new.record.scopes(), old.record.scopes());
    assert_eq!(new.record.metadata()["tenant"], "acme");
    // Same lifetime length as the old key: 90 days from the rotation.
    assert_eq!(new.record.expires_at(), Some(t(T0 + 1_000 + 90 * DAY)));

    f.clock.set(t(T0 + 1_599));
    assert_eq!(
        f.try_key(&old.key).await.0,
        StatusCode::OK,
        "inside the grace period"
    );
    assert_eq!(f.try_key(&new.key).await.0, StatusCode::OK);
    f.clock.set(t(T0 + 1_600));
    let (status, _, code) = f.try_key(&old.key).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "expired_api_key")
    );
    assert_eq!(f.try_key(&new.key).await.0, StatusCode::OK);

    // A grace longer than the key had left does not extend it.
    let short = f
        .manager
        .issue(NewKey::named("s").expires_in(Duration::from_secs(50)))
        .await
        .unwrap();
    f.manager
        .rotate(short.record.id(), Duration::from_secs(3_600))
        .await
        .unwrap();
    assert_eq!(
        f.store.by_id(short.record.id()).unwrap().expires_at(),
        Some(t(T0 + 1_650))
    );

    // Revoked keys cannot be rotated back to life.
    f.manager.revoke(new.record.id()).await.unwrap();
    assert!(matches!(
        f.manager.rotate(new.record.id(), Duration::ZERO).await,
        Err(ManageError::Invalid(_))
    ));
}

#[tokio::test]
async fn ephemeral_keys_narrow_scopes_expire_and_are_purged() {
    let f = fixture();
    let parent = f
        .manager
        .issue(
            NewKey::named("app")
                .scopes(["chat", "realtime"])
                .metadata("tenant", "t1"),
        )
        .await
        .unwrap();
    let who = f.try_key(&parent.key).await.1.unwrap();

    let eph = f
        .manager
        .mint_ephemeral(&who, Ephemeral::new().scopes(Scopes::new(["realtime"])))
        .await
        .unwrap();
    assert_eq!(eph.record.expires_at(), Some(t(T0 + 60)), "60 s by default");
    assert_eq!(eph.record.parent(), Some(who.id()));
    assert_eq!(eph.record.metadata()["tenant"], "t1");
    let (status, eph_who, _) = f.try_key(&eph.key).await;
    assert_eq!(status, StatusCode::OK);
    let eph_who = eph_who.unwrap();
    assert!(eph_who.has_scope("realtime") && !eph_who.has_scope("chat"));

    // Wider scopes than the parent's, and keys minted from ephemeral keys, are refused.
    let wider = f
        .manager
        .mint_ephemeral(
            &who,
            Ephemeral::new().scopes(Scopes::new(["admin", "chat"])),
        )
        .await;
    assert!(
        matches!(wider, Err(ManageError::Invalid(ref m)) if m.contains("admin") && !m.contains("chat"))
    );
    assert!(matches!(
        f.manager.mint_ephemeral(&eph_who, Ephemeral::new()).await,
        Err(ManageError::Forbidden(_))
    ));
    assert!(matches!(
        f.manager
            .mint_ephemeral(&who, Ephemeral::new().ttl(Duration::from_secs(7_200)))
            .await,
        Err(ManageError::Invalid(_))
    ));

    f.clock.set(t(T0 + 59));
    assert_eq!(f.try_key(&eph.key).await.0, StatusCode::OK);
    f.clock.set(t(T0 + 60));
    assert_eq!(f.try_key(&eph.key).await.2, "expired_api_key");

    let live = f
        .manager
        .mint_ephemeral(&who, Ephemeral::new().ttl(Duration::from_secs(600)))
        .await
        .unwrap();
    assert_eq!(f.store.len(), 3);
    assert_eq!(f.manager.purge_expired().await.unwrap(), 1);
    assert!(f.store.by_id(eph.record.id()).is_none());
    assert!(f.store.by_id(live.record.id()).is_some());
    assert!(
        f.store.by_id(parent.record.id()).is_some(),
        "only ephemeral keys are purged"
    );

    // Revoking the parent revokes what it minted.
    f.manager.revoke(parent.record.id()).await.unwrap();
    assert_eq!(
        f.store.by_id(live.record.id()).unwrap().status(),
        KeyStatus::Revoked
    );
    assert_eq!(f.try_key(&live.key).await.2, "revoked_api_key");
}

#[tokio::test]
async fn an_ephemeral_key_never_outlives_its_parent() {
    let f = fixture();
    let parent = f
        .manager
        .issue(NewKey::named("p").expires_in(Duration::from_secs(30)))
        .await
        .unwrap();
    let who = f.try_key(&parent.key).await.1.unwrap();
    let eph = f
        .manager
        .mint_ephemeral(&who, Ephemeral::new().ttl(Duration::from_secs(600)))
        .await
        .unwrap();
    assert_eq!(eph.record.expires_at(), Some(t(T0 + 30)));
}

#[tokio::test(start_paused = true)]
async fn the_purge_task_cleans_up_by_itself() {
    let f = fixture();
    let parent = f.manager.issue(NewKey::named("p")).await.unwrap();
    let who = f.try_key(&parent.key).await.1.unwrap();
    f.manager
        .mint_ephemeral(&who, Ephemeral::new())
        .await
        .unwrap();
    let task = f.manager.spawn_purge(Duration::from_secs(30));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(f.store.len(), 2, "not expired yet");
    f.clock.advance(Duration::from_secs(61));
    tokio::time::sleep(Duration::from_secs(31)).await;
    assert_eq!(f.store.len(), 1);
    task.abort();
}

/// Counts lookups, to show a checksum typo never reaches the store.
struct Counting {
    inner: Arc<MemoryStore>,
    lookups: Arc<AtomicUsize>,
}

impl KeyStore for Counting {
    type Lookup = <MemoryStore as KeyStore>::Lookup;
    fn lookup(&self, digest: &KeyDigest) -> Self::Lookup {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.inner.lookup(digest)
    }
}

#[tokio::test]
async fn a_checksum_typo_is_rejected_with_zero_store_calls() {
    let f = fixture();
    let issued = f.manager.issue(NewKey::named("alice")).await.unwrap();
    let imported = ApiKey::new("sk-proj-imported-from-elsewhere-0123456789");
    f.manager
        .import(&imported, NewKey::named("legacy"))
        .await
        .unwrap();
    let lookups = Arc::new(AtomicUsize::new(0));
    let store = Counting {
        inner: f.store.clone(),
        lookups: lookups.clone(),
    };
    let layer = InboundApiKeyLayer::new(store).key_formats([KeyFormat::new("gw").unwrap()]);
    let rec = Recorder::default();
    let svc = ServiceBuilder::new().layer(layer).service(rec.service());
    let send = |key: String| {
        let svc = svc.clone();
        async move {
            let req = Request::builder()
                .header("x-api-key", key)
                .body(())
                .unwrap();
            read(svc.oneshot(req).await.unwrap()).await
        }
    };

    let key = issued.key.expose().to_owned();
    let mut typo = key.clone().into_bytes();
    typo[10] = if typo[10] == b'x' { b'y' } else { b'x' };
    let a = send(String::from_utf8(typo).unwrap()).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json()["error"]["code"], "invalid_api_key");
    assert_eq!(
        lookups.load(Ordering::SeqCst),
        0,
        "a typo must not reach the store"
    );

    assert_eq!(send(key).await.status, StatusCode::OK);
    assert_eq!(
        send(imported.expose().to_owned()).await.status,
        StatusCode::OK,
        "imported keys still verify"
    );
    assert_eq!(lookups.load(Ordering::SeqCst), 2);
    assert_eq!(rec.count(), 2);
}

#[tokio::test]
async fn a_peppered_store_verifies_its_keys_and_stores_hmac_digests() {
    let store = Arc::new(MemoryStore::with_hasher(KeyHasher::with_pepper(
        b"a long server-side pepper",
    )));
    let clock = ManualClock::new(t(T0));
    let manager = KeyManager::new(store.clone()).clock(clock.clone());
    let issued = manager.issue(NewKey::named("p")).await.unwrap();
    let plain = KeyHasher::sha256().digest(issued.key.expose().as_bytes());
    assert_ne!(
        issued.record.digest(),
        &plain,
        "the digest must depend on the pepper"
    );
    let f = Fixture {
        clock,
        store,
        manager,
    };
    assert_eq!(f.try_key(&issued.key).await.0, StatusCode::OK);
}

#[tokio::test]
async fn disable_enable_and_delete() {
    let f = fixture();
    let issued = f.manager.issue(NewKey::named("d")).await.unwrap();
    let id = issued.record.id();
    f.manager.set_enabled(id, false).await.unwrap();
    assert_eq!(f.try_key(&issued.key).await.2, "disabled_api_key");
    f.manager.set_enabled(id, true).await.unwrap();
    assert_eq!(f.try_key(&issued.key).await.0, StatusCode::OK);
    f.manager.delete(id).await.unwrap();
    assert_eq!(f.try_key(&issued.key).await.2, "invalid_api_key");
    assert!(matches!(
        f.manager.get(id).await,
        Err(ManageError::NotFound(_))
    ));
    assert!(matches!(
        f.manager.revoke(id).await,
        Err(ManageError::NotFound(_))
    ));
}

#[tokio::test]
async fn a_stale_write_is_a_conflict_not_a_lost_update() {
    let f = fixture();
    let issued = f.manager.issue(NewKey::named("c")).await.unwrap();
    let stale = issued.record.clone();
    f.manager.set_enabled(stale.id(), false).await.unwrap();
    // A writer still holding the old record cannot overwrite the newer one.
    let result = f
        .store
        .apply(vec![tower_gateway_auth::store::Write::Replace {
            old: stale.clone(),
            new: (*stale).clone().with_name("renamed"),
        }])
        .await;
    assert!(matches!(
        result,
        Err(tower_gateway_auth::store::WriteError::Conflict)
    ));
    assert_eq!(
        f.store.by_id(stale.id()).unwrap().status(),
        KeyStatus::Disabled
    );
}

// ---- Attacks on the key lifecycle (issue 11) ----------------------------------------------

/// A parent key, an identity for it as the inbound layer made it, and a live ephemeral child.
async fn parent_and_child(
    f: &Fixture,
    scopes: &[&str],
) -> (
    tower_gateway_auth::keys::IssuedKey,
    Identity,
    tower_gateway_auth::keys::IssuedKey,
) {
    let parent = f
        .manager
        .issue(NewKey::named("parent").scopes(scopes.iter().copied()))
        .await
        .unwrap();
    let who = f.try_key(&parent.key).await.1.unwrap();
    let child = f
        .manager
        .mint_ephemeral(&who, Ephemeral::new().ttl(Duration::from_secs(600)))
        .await
        .unwrap();
    assert_eq!(f.try_key(&child.key).await.0, StatusCode::OK);
    (parent, who, child)
}

/// Changes a stored record behind the manager's back, as a write that cascades nowhere.
async fn overwrite(
    f: &Fixture,
    id: tower_gateway_auth::keys::KeyId,
    change: impl Fn(tower_gateway_auth::keys::KeyRecord) -> tower_gateway_auth::keys::KeyRecord,
) {
    let old = f.store.by_id(id).unwrap();
    let new = change((*old).clone());
    f.store
        .apply(vec![tower_gateway_auth::store::Write::Replace { old, new }])
        .await
        .unwrap();
}

#[tokio::test]
async fn a_parent_revoked_after_it_was_verified_cannot_mint() {
    let f = fixture();
    let parent = f.manager.issue(NewKey::named("p")).await.unwrap();
    // The identity was captured when the headers arrived; the key is revoked before the body.
    let who = f.try_key(&parent.key).await.1.unwrap();
    f.manager.revoke(parent.record.id()).await.unwrap();
    let minted = f.manager.mint_ephemeral(&who, Ephemeral::new()).await;
    assert!(minted.is_err(), "a revoked parent minted {minted:?}");
    assert_eq!(f.store.len(), 1, "nothing was stored");
    // Disabled and expired parents cannot mint either.
    let parent = f
        .manager
        .issue(NewKey::named("q").expires_in(Duration::from_secs(10)))
        .await
        .unwrap();
    let who = f.try_key(&parent.key).await.1.unwrap();
    f.manager
        .set_enabled(parent.record.id(), false)
        .await
        .unwrap();
    assert!(
        f.manager
            .mint_ephemeral(&who, Ephemeral::new())
            .await
            .is_err()
    );
    f.manager
        .set_enabled(parent.record.id(), true)
        .await
        .unwrap();
    f.clock.set(t(T0 + 10));
    assert!(
        f.manager
            .mint_ephemeral(&who, Ephemeral::new())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn a_child_the_revocation_missed_is_refused_because_its_parent_is() {
    let f = fixture();
    let (parent, _, child) = parent_and_child(&f, &["chat"]).await;
    // As if the child had been minted between revoke's listing and its write: only the
    // parent's record says revoked.
    overwrite(&f, parent.record.id(), |r| {
        r.with_status(KeyStatus::Revoked)
    })
    .await;
    assert_eq!(
        f.store.by_id(child.record.id()).unwrap().status(),
        KeyStatus::Active
    );
    let (status, _, code) = f.try_key(&child.key).await;
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::UNAUTHORIZED, "revoked_api_key")
    );
}

#[tokio::test]
async fn ephemeral_keys_die_with_a_disabled_rotated_expired_or_deleted_parent() {
    // Disabled: the child stops, and works again when the parent is enabled again.
    let f = fixture();
    let (parent, _, child) = parent_and_child(&f, &[]).await;
    f.manager
        .set_enabled(parent.record.id(), false)
        .await
        .unwrap();
    assert_eq!(f.try_key(&child.key).await.2, "disabled_api_key");
    f.manager
        .set_enabled(parent.record.id(), true)
        .await
        .unwrap();
    assert_eq!(f.try_key(&child.key).await.0, StatusCode::OK);

    // Rotated with no grace: the old key is expired at once, and so is its child.
    let f = fixture();
    let (parent, _, child) = parent_and_child(&f, &[]).await;
    f.manager
        .rotate(parent.record.id(), Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(f.try_key(&child.key).await.2, "expired_api_key");

    // Expired: the parent's expiry moved before the child's.
    let f = fixture();
    let (parent, _, child) = parent_and_child(&f, &[]).await;
    overwrite(&f, parent.record.id(), |r| {
        r.with_expires_at(Some(t(T0 + 5)))
    })
    .await;
    assert_eq!(f.try_key(&child.key).await.0, StatusCode::OK);
    f.clock.set(t(T0 + 5));
    assert_eq!(f.try_key(&child.key).await.2, "expired_api_key");

    // Not yet valid: a parent moved into the future takes its child along.
    let f = fixture();
    let (parent, _, child) = parent_and_child(&f, &[]).await;
    overwrite(&f, parent.record.id(), |r| {
        r.with_not_before(Some(t(T0 + 100)))
    })
    .await;
    assert_eq!(f.try_key(&child.key).await.0, StatusCode::UNAUTHORIZED);

    // Deleted: through the manager (which cascades) and behind its back (which does not).
    let f = fixture();
    let (parent, _, child) = parent_and_child(&f, &[]).await;
    f.manager.delete(parent.record.id()).await.unwrap();
    assert_eq!(f.try_key(&child.key).await.0, StatusCode::UNAUTHORIZED);
    let f = fixture();
    let (parent, _, child) = parent_and_child(&f, &[]).await;
    f.store.remove(parent.record.id()).unwrap();
    assert_eq!(f.try_key(&child.key).await.0, StatusCode::UNAUTHORIZED);
}

#[tokio::test]
async fn rotating_a_disabled_key_gives_a_disabled_successor() {
    let f = fixture();
    let issued = f.manager.issue(NewKey::named("off")).await.unwrap();
    f.manager
        .set_enabled(issued.record.id(), false)
        .await
        .unwrap();
    let next = f
        .manager
        .rotate(issued.record.id(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(next.record.status(), KeyStatus::Disabled);
    assert_eq!(f.try_key(&next.key).await.2, "disabled_api_key");
    f.manager.set_enabled(next.record.id(), true).await.unwrap();
    assert_eq!(f.try_key(&next.key).await.0, StatusCode::OK);
}

#[tokio::test]
async fn bring_your_own_key_follows_ephemeral_children_and_rotated_successors() {
    use tower_gateway_auth::upstream::{Credential, CredentialSource, PerIdentity};
    let f = fixture();
    let (parent, _, child) = parent_and_child(&f, &[]).await;
    let source = PerIdentity::new()
        .for_key(parent.record.id(), Credential::new("sk-their-own").unwrap())
        .fallback(Credential::new("sk-shared").unwrap());
    let resolve = |who: Identity| {
        let source = &source;
        async move {
            let credential = source.credential(Some(&who)).await.unwrap();
            format!("{credential:?}")
        }
    };
    let own = resolve(f.try_key(&parent.key).await.1.unwrap()).await;
    let shared = resolve(Identity::new(Arc::new(
        tower_gateway_auth::keys::KeyRecord::new(
            tower_gateway_auth::keys::KeyId::random(),
            KeyHasher::sha256().digest(b"x"),
        ),
    )))
    .await;
    assert_ne!(own, shared);
    assert_eq!(
        resolve(f.try_key(&child.key).await.1.unwrap()).await,
        own,
        "ephemeral child"
    );
    let next = f
        .manager
        .rotate(parent.record.id(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        resolve(f.try_key(&next.key).await.1.unwrap()).await,
        own,
        "rotated successor"
    );
    let who_next = f.try_key(&next.key).await.1.unwrap();
    let grandchild = f
        .manager
        .mint_ephemeral(&who_next, Ephemeral::new())
        .await
        .unwrap();
    assert_eq!(
        resolve(f.try_key(&grandchild.key).await.1.unwrap()).await,
        own,
        "the successor's child"
    );
    let after = f
        .manager
        .rotate(next.record.id(), Duration::from_secs(60))
        .await
        .unwrap();
    assert_eq!(
        resolve(f.try_key(&after.key).await.1.unwrap()).await,
        own,
        "rotated twice"
    );
}

#[tokio::test]
async fn live_ephemeral_keys_per_parent_are_capped() {
    let f = fixture();
    let parent = f.manager.issue(NewKey::named("flood")).await.unwrap();
    let who = f.try_key(&parent.key).await.1.unwrap();
    let mut minted = 0;
    for _ in 0..150 {
        if f.manager
            .mint_ephemeral(&who, Ephemeral::new().ttl(Duration::from_secs(60)))
            .await
            .is_ok()
        {
            minted += 1;
        }
    }
    assert_eq!(minted, 100, "the default cap");
    // Expired and revoked children leave room again.
    f.clock.set(t(T0 + 60));
    assert!(
        f.manager
            .mint_ephemeral(&who, Ephemeral::new())
            .await
            .is_ok()
    );
}

#[allow(dead_code)]
#[path = "../../examples/keygen.rs"]
mod keygen;

#[tokio::test]
async fn keygen_issues_under_the_gateways_pepper_and_names_a_wrong_one() {
    let dir = support::TempDir::new("keygen-pepper");
    let file = dir.file();
    let path = file.to_str().unwrap().to_owned();
    let pepper = "a-pepper-of-at-least-sixteen-bytes";
    let env = |var: &str| (var == "GATEWAY_KEY_PEPPER").then(|| pepper.to_owned());
    let args = |extra: &[&str]| {
        let mut all = vec!["--keys-file", &path];
        all.extend_from_slice(extra);
        keygen::parse(all.into_iter().map(str::to_owned)).unwrap()
    };
    let key = keygen::run(
        args(&["--pepper-env", "GATEWAY_KEY_PEPPER", "--name", "alice"]),
        &env,
    )
    .await
    .unwrap()
    .unwrap();
    // The gateway opens the file with the pepper it reads from `pepper_env`.
    let store = tower_gateway_auth::store::FileStore::builder(&file)
        .hasher(KeyHasher::with_pepper(pepper.as_bytes()))
        .reload_every(None)
        .open()
        .unwrap();
    assert_eq!(
        support::key_status(store, key.expose()).await,
        StatusCode::OK
    );
    // Without the pepper, keygen says what is wrong instead of writing unverifiable keys.
    let error = keygen::run(args(&["--name", "bob"]), &env)
        .await
        .unwrap_err();
    assert!(error.contains("pepper"), "{error}");
    let error = keygen::run(args(&["--pepper-env", "UNSET", "--name", "bob"]), &env)
        .await
        .unwrap_err();
    assert!(error.contains("UNSET"), "{error}");
}

#[tokio::test]
async fn keygen_actions_are_audited_as_keygen() {
    let dir = support::TempDir::new("keygen-audit");
    let path = dir.file().to_str().unwrap().to_owned();
    let audit = dir.0.join("audit.jsonl");
    let audit_path = audit.to_str().unwrap().to_owned();
    let args = |extra: &[&str]| {
        let mut all = vec!["--keys-file", &path, "--audit-file", &audit_path];
        all.extend_from_slice(extra);
        keygen::parse(all.into_iter().map(str::to_owned)).unwrap()
    };
    let no_env = |_: &str| None;
    let key = keygen::run(args(&["--name", "alice"]), &no_env)
        .await
        .unwrap()
        .unwrap();
    let store = tower_gateway_auth::store::FileStore::builder(dir.file())
        .reload_every(None)
        .open()
        .unwrap();
    let id = tower_gateway_auth::store::KeyAdmin::list(&store)
        .await
        .unwrap()[0]
        .id()
        .to_string();
    keygen::run(args(&["--revoke", &id]), &no_env)
        .await
        .unwrap();

    let text = std::fs::read_to_string(&audit).unwrap();
    let events: Vec<serde_json::Value> = text
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(events.len(), 2, "{text}");
    for (event, action) in events.iter().zip(["issue", "revoke"]) {
        assert_eq!(event["actor"], "keygen");
        assert_eq!(event["action"], action);
        assert_eq!(event["target"], id.as_str());
        assert_eq!(event["outcome"], "ok");
    }
    assert!(!text.contains(key.expose()));
}

#[tokio::test(flavor = "current_thread")]
async fn imports_and_refusals_reach_every_sink_and_the_log_without_the_key() {
    use std::sync::Mutex;
    use tower_gateway_auth::keys::{Actor, ApiKey, AuditEvent, AuditOutcome};

    let seen = Arc::new(Mutex::new(Vec::<AuditEvent>::new()));
    let trail = seen.clone();
    let clock = ManualClock::new(Timestamp::from_unix_secs(1_800_000_000));
    let manager = KeyManager::new(Arc::new(MemoryStore::new()))
        .clock(clock)
        .audit_to(move |event: &AuditEvent| trail.lock().unwrap().push(event.clone()))
        .acting_as(Actor::named("migration"));
    let key = ApiKey::new("sk-legacy-key-from-another-system-0001");
    let (logs, guard) = support::capture_logs();
    let record = manager.import(&key, NewKey::named("legacy")).await.unwrap();
    let again = manager.import(&key, NewKey::named("legacy")).await;
    assert!(again.is_err(), "the same key twice is refused");
    let unknown = manager
        .revoke(tower_gateway_auth::keys::KeyId::random())
        .await;
    assert!(unknown.is_err());
    drop(guard);

    let seen = seen.lock().unwrap();
    let outcomes: Vec<_> = seen
        .iter()
        .map(|e| (e.action.as_str(), e.outcome))
        .collect();
    assert_eq!(
        outcomes,
        [
            ("import", AuditOutcome::Ok),
            ("import", AuditOutcome::Refused("invalid")),
            ("revoke", AuditOutcome::Refused("not_found")),
        ]
    );
    assert_eq!(seen[0].target, Some(record.id()));
    assert_eq!(seen[1].target, None, "no key was created");
    assert!(seen.iter().all(|e| e.actor == Actor::named("migration")));
    assert_eq!(seen[0].time, Timestamp::from_unix_secs(1_800_000_000));

    let logs = logs.text();
    assert_eq!(logs.matches("key management").count(), 3, "{logs}");
    for event in [
        "actor=migration",
        "action=\"import\"",
        "outcome=\"refused\"",
        "reason=\"not_found\"",
    ] {
        assert!(logs.contains(event), "{event} not in {logs}");
    }
    assert!(!logs.contains(key.expose()), "{logs}");
    assert!(!logs.contains(&record.digest().to_hex()), "{logs}");
}

#[tokio::test]
async fn keygen_gives_a_key_its_rate_concurrency_and_models() {
    let dir = support::TempDir::new("keygen-limits");
    let path = dir.file().to_str().unwrap().to_owned();
    let no_env = |_: &str| None;
    let run = |extra: &[&str]| {
        let mut all = vec!["--keys-file", path.as_str(), "--name", "ci"];
        all.extend_from_slice(extra);
        keygen::parse(all.into_iter().map(str::to_owned))
    };
    let args = run(&[
        "--rpm",
        "60",
        "--burst",
        "10",
        "--max-concurrent",
        "2",
        "--model",
        "gpt-4o*",
        "--model",
        "claude-3-5-haiku-latest",
    ])
    .unwrap();
    keygen::run(args, &no_env).await.unwrap().unwrap();
    let store = tower_gateway_auth::store::FileStore::builder(dir.file())
        .reload_every(None)
        .open()
        .unwrap();
    let record = tower_gateway_auth::store::KeyAdmin::list(&store)
        .await
        .unwrap()[0]
        .clone();
    let rate = record.limits().and_then(|l| l.rate()).expect("a rate");
    assert_eq!(
        (rate.requests(), rate.period().as_secs(), rate.burst()),
        (60, 60, 10)
    );
    assert_eq!(record.limits().unwrap().max_concurrent(), Some(2));
    let models: Vec<&str> = record.models().unwrap().iter().collect();
    assert_eq!(models, ["gpt-4o*", "claude-3-5-haiku-latest"]);

    for bad in [
        &["--rpm", "0"][..],
        &["--max-concurrent", "x"],
        &["--burst"],
    ] {
        assert!(run(bad).is_err(), "{bad:?}");
    }
    let error = keygen::run(run(&["--burst", "5"]).unwrap(), &no_env)
        .await
        .unwrap_err();
    assert!(error.contains("--rpm"), "{error}");
}

#[tokio::test]
async fn keygen_gives_a_key_its_token_rate_and_budget() {
    let dir = support::TempDir::new("keygen-tokens");
    let path = dir.file().to_str().unwrap().to_owned();
    let no_env = |_: &str| None;
    let run = |extra: &[&str]| {
        let mut all = vec!["--keys-file", path.as_str(), "--name", "team"];
        all.extend_from_slice(extra);
        keygen::parse(all.into_iter().map(str::to_owned))
    };
    let args = run(&[
        "--tpm",
        "100000",
        "--token-budget",
        "5000000",
        "--budget-period",
        "week",
    ])
    .unwrap();
    keygen::run(args, &no_env).await.unwrap().unwrap();
    let store = tower_gateway_auth::store::FileStore::builder(dir.file())
        .reload_every(None)
        .open()
        .unwrap();
    let record = tower_gateway_auth::store::KeyAdmin::list(&store)
        .await
        .unwrap()[0]
        .clone();
    let limits = record.limits().expect("limits");
    let tokens = limits.tokens().expect("a token rate");
    assert_eq!(
        (tokens.requests(), tokens.period().as_secs()),
        (100_000, 60)
    );
    let budget = limits.budget().expect("a budget");
    assert_eq!(
        (budget.tokens(), budget.period()),
        (5_000_000, tower_gateway_auth::limit::BudgetPeriod::Week)
    );
    // In the file: the documented names.
    let file: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.file()).unwrap()).unwrap();
    let stored = &file["keys"][0]["limits"];
    assert_eq!(stored["tokens_per_period"], 100_000, "{file}");
    assert_eq!(stored["token_budget"], 5_000_000);
    assert_eq!(stored["budget_period"], "week");

    for bad in [
        &["--tpm", "0"][..],
        &["--token-budget", "lots"],
        &["--token-budget", "5", "--budget-period", "year"],
    ] {
        assert!(run(bad).is_err(), "{bad:?}");
    }
    let error = keygen::run(run(&["--budget-period", "day"]).unwrap(), &no_env)
        .await
        .unwrap_err();
    assert!(error.contains("--token-budget"), "{error}");
    // Without a period, a month.
    let args = run(&["--token-budget", "10"]).unwrap();
    keygen::run(args, &no_env).await.unwrap().unwrap();
}
