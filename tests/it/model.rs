//! The key lifecycle against a model, on every store: random sequences of issue, import,
//! mint (from normal, ephemeral and dead keys), revoke, disable, enable, rotate with grace,
//! delete, model-list changes (cascading to ephemeral keys), clock steps, purge and cache
//! invalidations. After every step, every key ever
//! issued gets the answer (pass / 401 / 403) the model predicts from the invariant in
//! DESIGN.md: a key is usable only if it and every key it descends from are usable now.
//!
//! `MODEL_CASES` sets the number of cases per store (default 1000, what CI runs).

use crate::support;

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response, StatusCode};
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tower::ServiceExt;
use tower_gateway_auth::clock::{ManualClock, Timestamp};
use tower_gateway_auth::keys::{
    AccessChange, ApiKey, AuditAction, AuditEvent, AuditOutcome, Ephemeral, KeyDigest, KeyHasher,
    KeyManager, ManageError, NewKey, Scopes,
};
use tower_gateway_auth::limit::{ModelAccessLayer, ModelList, ReplayBody};
use tower_gateway_auth::store::{CachedStore, FileStore, KeyAdmin, KeyStore, MemoryStore};
use tower_gateway_auth::{Identity, InboundApiKeyLayer, RequireScopesLayer};

/// Far enough ahead of the real clock that Redis never expires a record before the model
/// says it has expired (Redis expires ephemeral records at their expiry, in real time).
const T0: u64 = 1_900_000_000;
/// Live ephemeral keys per parent, small so that sequences reach the cap.
const CAP: usize = 3;

#[derive(Debug, Clone)]
enum Op {
    Issue {
        ttl: Option<u64>,
        chat: bool,
    },
    Import {
        ttl: Option<u64>,
        chat: bool,
    },
    Mint {
        from: usize,
        ttl: u64,
        scopes: Option<bool>,
    },
    Revoke(usize),
    Disable(usize),
    Enable(usize),
    Rotate {
        key: usize,
        grace: u64,
    },
    Delete(usize),
    /// Gives the key a model list (`true`) or removes it.
    ChangeAccess {
        key: usize,
        restrict: bool,
    },
    Advance(u64),
    Purge,
    Invalidate(usize),
    InvalidateAll,
}

fn op() -> impl Strategy<Value = Op> {
    let ttl = prop_oneof![Just(None), (1u64..400).prop_map(Some)];
    prop_oneof![
        3 => (ttl.clone(), any::<bool>()).prop_map(|(ttl, chat)| Op::Issue { ttl, chat }),
        1 => (ttl, any::<bool>()).prop_map(|(ttl, chat)| Op::Import { ttl, chat }),
        5 => (any::<usize>(), 1u64..300, prop_oneof![Just(None), any::<bool>().prop_map(Some)])
            .prop_map(|(from, ttl, scopes)| Op::Mint { from, ttl, scopes }),
        2 => any::<usize>().prop_map(Op::Revoke),
        2 => any::<usize>().prop_map(Op::Disable),
        2 => any::<usize>().prop_map(Op::Enable),
        2 => (any::<usize>(), prop_oneof![Just(0u64), 1u64..200])
            .prop_map(|(key, grace)| Op::Rotate { key, grace }),
        1 => any::<usize>().prop_map(Op::Delete),
        3 => (any::<usize>(), any::<bool>())
            .prop_map(|(key, restrict)| Op::ChangeAccess { key, restrict }),
        3 => prop_oneof![1u64..30, 30u64..400].prop_map(Op::Advance),
        1 => Just(Op::Purge),
        1 => any::<usize>().prop_map(Op::Invalidate),
        1 => Just(Op::InvalidateAll),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Active,
    Disabled,
    Revoked,
}

/// What the model knows of one key.
#[derive(Debug, Clone)]
struct Key {
    secret: ApiKey,
    digest: KeyDigest,
    status: Status,
    created: u64,
    expires: Option<u64>,
    parent: Option<usize>,
    chat: bool,
    /// Has a model list: a request naming no model is then refused (403).
    restricted: bool,
    deleted: bool,
}

impl Key {
    fn new(
        secret: ApiKey,
        status: Status,
        now: u64,
        expires: Option<u64>,
        parent: Option<usize>,
        chat: bool,
    ) -> Self {
        Key {
            digest: KeyHasher::sha256().digest(secret.expose().as_bytes()),
            secret,
            status,
            created: now,
            expires,
            parent,
            chat,
            restricted: false,
            deleted: false,
        }
    }
}

#[derive(Debug, Default)]
struct Model {
    now: u64,
    keys: Vec<Key>,
}

impl Model {
    fn usable_itself(&self, k: &Key) -> bool {
        !k.deleted && k.status == Status::Active && k.expires.is_none_or(|e| self.now < e)
    }

    /// The invariant: usable, and so is every key it descends from.
    fn usable(&self, i: usize) -> bool {
        let k = &self.keys[i];
        self.usable_itself(k) && k.parent.is_none_or(|p| self.usable(p))
    }

    fn answer(&self, i: usize) -> StatusCode {
        if !self.usable(i) {
            StatusCode::UNAUTHORIZED
        } else if !self.keys[i].chat || self.keys[i].restricted {
            StatusCode::FORBIDDEN
        } else {
            StatusCode::OK
        }
    }

    fn live_children(&self, parent: usize) -> usize {
        self.keys
            .iter()
            .filter(|k| k.parent == Some(parent) && !k.deleted && k.status != Status::Revoked)
            .filter(|k| k.expires.is_none_or(|e| self.now < e))
            .count()
    }

    fn pick(&self, n: usize) -> Option<usize> {
        (!self.keys.is_empty()).then(|| n % self.keys.len())
    }
}

/// Tells a cache to forget one digest (`Some`) or everything (`None`).
type Invalidate = Box<dyn Fn(Option<&KeyDigest>) + Send + Sync>;

/// Everything one case runs against: the store, the manager on it, the clock, and how to
/// tell the store's cache (if any) to forget a digest.
struct System<A> {
    store: Arc<A>,
    manager: KeyManager<A>,
    clock: ManualClock,
    invalidate: Invalidate,
}

async fn run_case<A>(system: System<A>, ops: Vec<Op>) -> Result<(), TestCaseError>
where
    A: KeyAdmin,
{
    let System {
        store,
        manager,
        clock,
        invalidate,
    } = system;
    let trail = Arc::new(std::sync::Mutex::new(Vec::<AuditEvent>::new()));
    let sink = trail.clone();
    let manager =
        manager.audit_to(move |event: &AuditEvent| sink.lock().unwrap().push(event.clone()));
    let mut model = Model {
        now: T0,
        keys: Vec::new(),
    };
    let mut ids = Vec::new();
    let uses = tower_gateway_auth::keys::LastUsed::builder(store.clone())
        .clock(clock.clone())
        .flush_every(Duration::from_secs(3600))
        .build();
    // The minute each key was last accepted in, as the model sees it.
    let mut last_used: Vec<Option<u64>> = Vec::new();
    let gate = InboundApiKeyLayer::from_shared(store.clone())
        .clock(clock.clone())
        .last_used(&uses);
    let service = tower::ServiceBuilder::new()
        .layer(gate)
        .layer(RequireScopesLayer::new(["chat"]))
        .layer(ModelAccessLayer::new())
        .service(tower::service_fn(|_: Request<ReplayBody<String>>| async {
            Ok::<_, Infallible>(Response::new(String::new()))
        }));
    for (step, op) in ops.iter().enumerate() {
        let got: Result<Option<(ApiKey, bool, Option<usize>)>, ManageError> = match op.clone() {
            Op::Issue { ttl, chat } | Op::Import { ttl, chat } => {
                let mut spec = NewKey::named("k").scopes(chat.then_some("chat"));
                spec = match ttl {
                    Some(secs) => spec.expires_in(Duration::from_secs(secs)),
                    None => spec.never_expires(),
                };
                if matches!(op, Op::Import { .. }) {
                    let secret = ApiKey::new(format!("imported-{}-{step}", model.keys.len()));
                    manager.import(&secret, spec).await.map(|r| {
                        ids.push(r.id());
                        Some((secret, chat, None))
                    })
                } else {
                    manager.issue(spec).await.map(|issued| {
                        ids.push(issued.record.id());
                        Some((issued.key, chat, None))
                    })
                }
            }
            Op::Mint { from, ttl, scopes } => {
                let Some(p) = model.pick(from) else { continue };
                // What the caller's request was verified as, maybe long ago: the manager
                // must read the parent again.
                let who = Identity::new(Arc::new(tower_gateway_auth::keys::KeyRecord::new(
                    ids[p],
                    model.keys[p].digest,
                )));
                let scopes = scopes.map(|chat| Scopes::new(chat.then_some("chat")));
                let child_chat = match &scopes {
                    None => model.keys[p].chat,
                    Some(s) => s.contains("chat"),
                };
                let spec = Ephemeral::new().ttl(Duration::from_secs(ttl));
                let spec = match scopes {
                    Some(scopes) => spec.scopes(scopes),
                    None => spec,
                };
                manager.mint_ephemeral(&who, spec).await.map(|issued| {
                    ids.push(issued.record.id());
                    Some((issued.key, child_chat, Some(p)))
                })
            }
            Op::Revoke(i) => match model.pick(i) {
                Some(i) => manager.revoke(ids[i]).await.map(|_| None),
                None => continue,
            },
            Op::Disable(i) | Op::Enable(i) => match model.pick(i) {
                Some(i) => manager
                    .set_enabled(ids[i], matches!(op, Op::Enable(_)))
                    .await
                    .map(|_| None),
                None => continue,
            },
            Op::Rotate { key, grace } => match model.pick(key) {
                Some(i) => manager
                    .rotate(ids[i], Duration::from_secs(grace))
                    .await
                    .map(|issued| {
                        ids.push(issued.record.id());
                        Some((issued.key, model.keys[i].chat, None))
                    }),
                None => continue,
            },
            Op::Delete(i) => match model.pick(i) {
                Some(i) => manager.delete(ids[i]).await.map(|_| None),
                None => continue,
            },
            Op::ChangeAccess { key, restrict } => match model.pick(key) {
                Some(i) => {
                    let models = restrict.then(|| ModelList::new(["gpt-4o*"]));
                    manager
                        .change_access(ids[i], AccessChange::new().models(models))
                        .await
                        .map(|_| None)
                }
                None => continue,
            },
            Op::Advance(secs) => {
                model.now += secs;
                clock.set(Timestamp::from_unix_secs(model.now));
                Ok(None)
            }
            Op::Purge => manager.purge_expired().await.map(|_| None),
            Op::Invalidate(i) => {
                if let Some(i) = model.pick(i) {
                    invalidate(Some(&model.keys[i].digest));
                }
                Ok(None)
            }
            Op::InvalidateAll => {
                invalidate(None);
                Ok(None)
            }
        };
        let events = std::mem::take(&mut *trail.lock().unwrap());
        audited(op, &got, &events, step)?;
        apply(&mut model, op, got, step)?;
        for i in 0..model.keys.len() {
            let req = Request::builder()
                .header("x-api-key", model.keys[i].secret.expose())
                .body(String::new())
                .unwrap();
            let status = service.clone().oneshot(req).await.unwrap().status();
            let expected = model.answer(i);
            last_used.resize(model.keys.len(), None);
            if model.usable(i) {
                last_used[i] = Some(model.now / 60 * 60);
            }
            prop_assert_eq!(
                status,
                expected,
                "after step {} ({:?}), key #{} {:?}",
                step,
                op,
                i,
                model.keys[i]
            );
        }
        // Every accepted key's last use reaches the store, to the minute; a key's last use
        // goes with its record. (Checked every few steps: a file store's write is synced.)
        if step % 4 != 3 && step + 1 != ops.len() {
            continue;
        }
        uses.flush()
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        let stored = store
            .last_used(ids.clone())
            .await
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
        for (i, key) in model.keys.iter().enumerate() {
            if key.deleted {
                continue;
            }
            prop_assert_eq!(
                stored[i].map(|t| t.as_unix_secs()),
                last_used[i],
                "last use of key #{} after step {} ({:?})",
                i,
                step,
                op
            );
        }
    }
    Ok(())
}

/// Checks the manager's outcome against the model's and moves the model along.
/// Every management action is one audit event, naming the outcome it had; nothing else
/// (time passing, purges, cache invalidation) is.
fn audited<T>(
    op: &Op,
    got: &Result<T, ManageError>,
    events: &[AuditEvent],
    step: usize,
) -> Result<(), TestCaseError> {
    let action = match op {
        Op::Issue { .. } => Some(AuditAction::Issue),
        Op::Import { .. } => Some(AuditAction::Import),
        Op::Mint { .. } => Some(AuditAction::MintEphemeral),
        Op::Revoke(_) => Some(AuditAction::Revoke),
        Op::Disable(_) => Some(AuditAction::Disable),
        Op::Enable(_) => Some(AuditAction::Enable),
        Op::Rotate { .. } => Some(AuditAction::Rotate),
        Op::Delete(_) => Some(AuditAction::Delete),
        Op::ChangeAccess { .. } => Some(AuditAction::ChangeAccess),
        Op::Advance(_) | Op::Purge | Op::Invalidate(_) | Op::InvalidateAll => None,
    };
    let seen: Vec<_> = events
        .iter()
        .map(|e| (e.action, e.outcome == AuditOutcome::Ok))
        .collect();
    let expected: Vec<_> = action.map(|a| (a, got.is_ok())).into_iter().collect();
    prop_assert_eq!(seen, expected, "audit trail after step {} ({:?})", step, op);
    Ok(())
}

fn apply(
    model: &mut Model,
    op: &Op,
    got: Result<Option<(ApiKey, bool, Option<usize>)>, ManageError>,
    step: usize,
) -> Result<(), TestCaseError> {
    let now = model.now;
    let fail = |why: String| Err(TestCaseError::fail(format!("step {step} {op:?}: {why}")));
    let pick = |n: usize| n % model.keys.len().max(1);
    match (op, got) {
        (Op::Issue { ttl, .. } | Op::Import { ttl, .. }, Ok(Some((secret, chat, _)))) => {
            let expires = ttl.map(|t| now + t);
            model
                .keys
                .push(Key::new(secret, Status::Active, now, expires, None, chat));
        }
        (Op::Mint { from, ttl, scopes }, got) => {
            let p = pick(*from);
            let parent = &model.keys[p];
            let scopes_ok = !matches!(scopes, Some(true)) || parent.chat;
            let may = !parent.deleted
                && parent.parent.is_none()
                && model.usable_itself(parent)
                && scopes_ok
                && model.live_children(p) < CAP;
            match got {
                Ok(Some((secret, chat, _))) if may => {
                    let end = parent.expires.map_or(now + ttl, |e| e.min(now + ttl));
                    let restricted = parent.restricted;
                    let mut child = Key::new(secret, Status::Active, now, Some(end), Some(p), chat);
                    child.restricted = restricted;
                    model.keys.push(child);
                }
                Err(_) if !may => {}
                got => {
                    return fail(format!(
                        "mint from {parent:?}: expected allowed={may}, got {got:?}"
                    ));
                }
            }
        }
        (Op::Revoke(i), got) => {
            let i = pick(*i);
            match got {
                Ok(_) if !model.keys[i].deleted => {
                    for k in 0..model.keys.len() {
                        let key = &mut model.keys[k];
                        if (k == i || key.parent == Some(i)) && !key.deleted {
                            key.status = Status::Revoked;
                        }
                    }
                }
                Err(ManageError::NotFound(_)) if model.keys[i].deleted => {}
                got => return fail(format!("revoke: {got:?}")),
            }
        }
        (Op::Disable(i) | Op::Enable(i), got) => {
            let i = pick(*i);
            let key = &mut model.keys[i];
            match got {
                Ok(_) if !key.deleted && key.status != Status::Revoked => {
                    key.status = if matches!(op, Op::Enable(_)) {
                        Status::Active
                    } else {
                        Status::Disabled
                    };
                }
                Err(ManageError::NotFound(_)) if key.deleted => {}
                Err(ManageError::Invalid(_)) if key.status == Status::Revoked => {}
                got => return fail(format!("enable/disable {key:?}: {got:?}")),
            }
        }
        (Op::Rotate { key, grace }, got) => {
            let i = pick(*key);
            let old = model.keys[i].clone();
            match got {
                Ok(Some((secret, chat, _)))
                    if !old.deleted && old.parent.is_none() && old.status != Status::Revoked =>
                {
                    let expires = old.expires.map(|e| now + (e - old.created));
                    let mut successor = Key::new(secret, old.status, now, expires, None, chat);
                    successor.restricted = old.restricted;
                    model.keys.push(successor);
                    let retired = &mut model.keys[i];
                    retired.expires = Some(old.expires.map_or(now + grace, |e| e.min(now + grace)));
                }
                Err(ManageError::NotFound(_)) if old.deleted => {}
                Err(ManageError::Forbidden(_)) if old.parent.is_some() => {}
                Err(ManageError::Invalid(_)) if old.status == Status::Revoked => {}
                got => return fail(format!("rotate {old:?}: {got:?}")),
            }
        }
        (Op::Delete(i), got) => {
            let i = pick(*i);
            match got {
                Ok(_) if !model.keys[i].deleted => {
                    for k in 0..model.keys.len() {
                        if k == i || model.keys[k].parent == Some(i) {
                            model.keys[k].deleted = true;
                        }
                    }
                }
                Err(ManageError::NotFound(_)) if model.keys[i].deleted => {}
                got => return fail(format!("delete: {got:?}")),
            }
        }
        (Op::ChangeAccess { key, restrict }, got) => {
            let i = pick(*key);
            let target = model.keys[i].clone();
            match got {
                Ok(_)
                    if !target.deleted
                        && target.parent.is_none()
                        && target.status != Status::Revoked =>
                {
                    model.keys[i].restricted = *restrict;
                    // Children take a new list, and keep one of their own when the parent's
                    // is removed.
                    for child in &mut model.keys {
                        if child.parent == Some(i)
                            && !child.deleted
                            && child.status != Status::Revoked
                        {
                            child.restricted |= *restrict;
                        }
                    }
                }
                Err(ManageError::NotFound(_)) if target.deleted => {}
                Err(ManageError::Forbidden(_)) if target.parent.is_some() => {}
                Err(ManageError::Invalid(_)) if target.status == Status::Revoked => {}
                got => return fail(format!("change access {target:?}: {got:?}")),
            }
        }
        (Op::Purge, Ok(_)) => {
            for key in &mut model.keys {
                if key.parent.is_some() && key.expires.is_some_and(|e| e <= now) {
                    key.deleted = true;
                }
            }
        }
        (Op::Advance(_) | Op::Invalidate(_) | Op::InvalidateAll, Ok(_)) => {}
        (_, got) => return fail(format!("unexpected outcome {got:?}")),
    }
    Ok(())
}

fn cases() -> u32 {
    std::env::var("MODEL_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

/// Runs `cases()` random sequences, each on a fresh system from `make`.
fn check<A, F, Fut>(name: &str, make: F)
where
    A: KeyAdmin,
    F: Fn(ManualClock) -> Fut,
    Fut: std::future::Future<Output = System<A>>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut runner = TestRunner::new(Config {
        cases: cases(),
        failure_persistence: None,
        ..Config::default()
    });
    let started = std::time::Instant::now();
    let result = runner.run(&proptest::collection::vec(op(), 1..40), |ops| {
        let clock = ManualClock::new(Timestamp::from_unix_secs(T0));
        runtime.block_on(async { run_case(make(clock).await, ops).await })
    });
    eprintln!(
        "model {name}: {} cases in {:.1?}",
        cases(),
        started.elapsed()
    );
    if let Err(e) = result {
        panic!("{name}: {e}");
    }
}

fn system<A: KeyAdmin>(store: Arc<A>, clock: ManualClock, invalidate: Invalidate) -> System<A> {
    System {
        manager: KeyManager::new(store.clone())
            .clock(clock.clone())
            .max_live_ephemeral(CAP),
        store,
        clock,
        invalidate,
    }
}

fn nothing_to_invalidate() -> Invalidate {
    Box::new(|_| {})
}

fn invalidating<K: KeyStore>(cache: &CachedStore<K>) -> Invalidate {
    let cache = cache.clone();
    Box::new(move |digest| match digest {
        Some(d) => cache.invalidate(d),
        None => cache.invalidate_all(),
    })
}

fn cached<K: KeyStore>(store: K, clock: &ManualClock) -> CachedStore<K> {
    CachedStore::builder(store).clock(clock.clone()).build()
}

/// A key file on a memory-backed file system where there is one: the model writes often.
fn key_file() -> (support::TempDir, std::path::PathBuf) {
    let dir = support::TempDir::new("model");
    let file = dir.file();
    (dir, file)
}

fn file_store(file: &std::path::Path) -> FileStore {
    FileStore::builder(file).reload_every(None).open().unwrap()
}

#[test]
fn memory_store_follows_the_model() {
    check("MemoryStore", async |clock| {
        system(Arc::new(MemoryStore::new()), clock, nothing_to_invalidate())
    });
}

#[test]
fn cached_memory_store_follows_the_model() {
    check("CachedStore<MemoryStore>", async |clock| {
        let cache = cached(MemoryStore::new(), &clock);
        let invalidate = invalidating(&cache);
        system(Arc::new(cache), clock, invalidate)
    });
}

#[test]
fn file_store_follows_the_model() {
    let (_dir, file) = key_file();
    check("FileStore", async |clock| {
        let _ = std::fs::remove_file(&file);
        system(Arc::new(file_store(&file)), clock, nothing_to_invalidate())
    });
}

#[test]
fn cached_file_store_follows_the_model() {
    let (_dir, file) = key_file();
    check("CachedStore<FileStore>", async |clock| {
        let _ = std::fs::remove_file(&file);
        let cache = cached(file_store(&file), &clock);
        let invalidate = invalidating(&cache);
        system(Arc::new(cache), clock, invalidate)
    });
}

#[test]
fn redis_store_follows_the_model() {
    let Some((url, _server)) = support::redis::redis_url() else {
        return;
    };
    check("RedisStore", async |clock| {
        system(Arc::new(redis(&url).await), clock, nothing_to_invalidate())
    });
}

#[test]
fn cached_redis_store_follows_the_model() {
    let Some((url, _server)) = support::redis::redis_url() else {
        return;
    };
    check("CachedStore<RedisStore>", async |clock| {
        let cache = cached(redis(&url).await, &clock);
        let invalidate = invalidating(&cache);
        system(Arc::new(cache), clock, invalidate)
    });
}

/// A store on a namespace of its own.
async fn redis(url: &str) -> tower_gateway_auth::store::RedisStore {
    let ns = support::redis::namespace();
    tower_gateway_auth::store::RedisStore::builder(url)
        .namespace(ns)
        .connect()
        .await
        .unwrap()
}
