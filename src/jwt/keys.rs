//! The keys tokens are verified with: static ones, or a JWKS fetched (from a URL, or found
//! through OIDC discovery), cached, refreshed before it goes stale and refetched for an
//! unknown `kid` at most once per interval.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError, RwLock, Weak};
use std::time::{Duration, Instant};

use http::Uri;
use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{AlgorithmFamily, DecodingKey};

use crate::http_fetch::{Fetcher, max_age};

/// One verification key: its family (RSA, EC, Ed, HMAC) decides which algorithms may use it.
#[derive(Clone)]
pub(crate) struct VerifyKey {
    pub(crate) key: DecodingKey,
    pub(crate) family: AlgorithmFamily,
}

/// Keys by `kid`; a key without one is filed under `""`.
#[derive(Clone, Default)]
pub(crate) struct KeySet(HashMap<String, VerifyKey>);

impl KeySet {
    pub(crate) fn insert(&mut self, kid: Option<String>, key: VerifyKey) {
        self.0.insert(kid.unwrap_or_default(), key);
    }

    /// The key for `kid`, or with none the only key of the set.
    pub(crate) fn find(&self, kid: Option<&str>) -> Option<&VerifyKey> {
        match kid {
            Some(kid) => self.0.get(kid),
            None if self.0.len() == 1 => self.0.values().next(),
            None => self.0.get(""),
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }

    /// A JWKS document's usable keys: signature keys (`use` absent or `sig`) of a kind this
    /// crate verifies; others are skipped, with the count returned.
    pub(crate) fn from_jwks(body: &[u8]) -> Result<(KeySet, usize), String> {
        let set: JwkSet = serde_json::from_slice(body).map_err(|e| {
            format!(
                "not a JWK set ({:?} error at column {})",
                e.classify(),
                e.column()
            )
        })?;
        let mut keys = KeySet::default();
        let mut skipped = 0;
        for jwk in &set.keys {
            match verify_key(jwk) {
                Some(key) => keys.insert(jwk.common.key_id.clone(), key),
                None => skipped += 1,
            }
        }
        Ok((keys, skipped))
    }
}

/// A JWK as a verification key, if it is one: public signature keys only (an HMAC secret
/// in a JWKS would let anyone who reads the set sign tokens).
pub(crate) fn verify_key(jwk: &Jwk) -> Option<VerifyKey> {
    use jsonwebtoken::jwk::{AlgorithmParameters, PublicKeyUse};
    if matches!(jwk.common.public_key_use, Some(ref u) if *u != PublicKeyUse::Signature) {
        return None;
    }
    let family = match &jwk.algorithm {
        AlgorithmParameters::RSA(_) => AlgorithmFamily::Rsa,
        AlgorithmParameters::EllipticCurve(_) => AlgorithmFamily::Ec,
        AlgorithmParameters::OctetKeyPair(_) => AlgorithmFamily::Ed,
        _ => return None,
    };
    let key = DecodingKey::from_jwk(jwk).ok()?;
    Some(VerifyKey { key, family })
}

/// How long a fetched key set is kept, and how it is refetched.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    /// Bounds on the answer's `max-age` (and what is used without one: the lower bound ×4,
    /// within the bounds).
    pub(crate) min_ttl: Duration,
    pub(crate) max_ttl: Duration,
    /// An unknown `kid` refetches at most once per this.
    pub(crate) refetch_interval: Duration,
    /// How long past its expiry a set is still used while the endpoint cannot be reached.
    pub(crate) stale_for: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            min_ttl: Duration::from_secs(60),
            max_ttl: Duration::from_secs(24 * 3600),
            refetch_interval: Duration::from_secs(60),
            stale_for: Duration::from_secs(3600),
        }
    }
}

/// Where a remote key set is.
#[derive(Debug, Clone)]
pub(crate) enum Location {
    Jwks(Uri),
    /// The issuer: its `/.well-known/openid-configuration` names the set's URL.
    Discovery(String),
}

/// A key set fetched over HTTP, shared by every clone of a verifier.
pub(crate) struct Remote {
    location: Location,
    fetcher: Fetcher,
    timing: Timing,
    state: RwLock<Option<Loaded>>,
    /// One fetch at a time; waiters then read what it loaded.
    fetching: tokio::sync::Mutex<()>,
    /// The last fetch of any kind: while none can be had, requests try at most once per
    /// refetch interval.
    last_attempt: Mutex<Option<Instant>>,
    /// The last fetch made for an unknown `kid`: at most one per refetch interval.
    last_kid_refetch: Mutex<Option<Instant>>,
    /// Fetches made (answered or not), for tests and metrics.
    fetches: std::sync::atomic::AtomicU64,
    refresher: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

struct Loaded {
    keys: Arc<KeySet>,
    fetched: Instant,
    expires: Instant,
}

/// What asking for a key found.
pub(crate) enum Found {
    Key(VerifyKey),
    /// The set holds no such key (after a refetch, or with one made too recently).
    Unknown,
    /// No set could be had: none was ever loaded, or the one held is too stale.
    Unavailable(String),
}

impl Remote {
    pub(crate) fn new(location: Location, fetcher: Fetcher, timing: Timing) -> Arc<Self> {
        Arc::new(Remote {
            location,
            fetcher,
            timing,
            state: RwLock::new(None),
            fetching: tokio::sync::Mutex::new(()),
            last_attempt: Mutex::new(None),
            last_kid_refetch: Mutex::new(None),
            fetches: Default::default(),
            refresher: Mutex::new(None),
        })
    }

    pub(crate) fn fetches(&self) -> u64 {
        self.fetches.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The key for `kid` if the set held now has it, without waiting.
    pub(crate) fn find_now(&self, kid: Option<&str>) -> Option<VerifyKey> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        let loaded = state.as_ref()?;
        if Instant::now() > loaded.expires + self.timing.stale_for {
            return None;
        }
        loaded.keys.find(kid).cloned()
    }

    /// The key for `kid`: from the set held, or after a fetch when none is held, it is
    /// stale, or it lacks `kid` and no fetch was made within the refetch interval.
    pub(crate) async fn find(self: &Arc<Self>, kid: Option<&str>) -> Found {
        if let Some(key) = self.find_now(kid) {
            return Found::Key(key);
        }
        let _one = self.fetching.lock().await;
        // Someone else may have just fetched.
        if let Some(key) = self.find_now(kid) {
            return Found::Key(key);
        }
        let now = Instant::now();
        let within = |at: &Mutex<Option<Instant>>| {
            at.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .is_some_and(|at| now.duration_since(at) < self.timing.refetch_interval)
        };
        if self.usable_state() {
            // A set is held and lacks `kid`: a rotation, or a made-up kid.
            if within(&self.last_kid_refetch) {
                return Found::Unknown;
            }
            *self
                .last_kid_refetch
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(now);
        } else if within(&self.last_attempt) {
            return Found::Unavailable("the token signing keys could not be fetched".into());
        }
        match self.fetch().await {
            Ok(()) => match self.find_now(kid) {
                Some(key) => Found::Key(key),
                None => Found::Unknown,
            },
            Err(_) if self.usable_state() => Found::Unknown,
            Err(error) => Found::Unavailable(error),
        }
    }

    /// Whether a set is held that may still be used.
    fn usable_state(&self) -> bool {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state
            .as_ref()
            .is_some_and(|l| Instant::now() <= l.expires + self.timing.stale_for)
    }

    /// Fetches the set once (the caller holds `fetching`), keeping the one held on failure.
    async fn fetch(self: &Arc<Self>) -> Result<(), String> {
        *self
            .last_attempt
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(Instant::now());
        self.fetches
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let result = self.fetch_set().await;
        match &result {
            Ok((keys, ttl)) => {
                let now = Instant::now();
                tracing::debug!(target: "tower_gateway_auth::jwt", keys = keys.len(), ttl = ?ttl, "token signing keys fetched");
                *self.state.write().unwrap_or_else(PoisonError::into_inner) = Some(Loaded {
                    keys: Arc::new(keys.clone()),
                    fetched: now,
                    expires: now + *ttl,
                });
                self.schedule_refresh(*ttl);
            }
            Err(error) => {
                tracing::warn!(target: "tower_gateway_auth::jwt", %error, "cannot fetch the token signing keys");
            }
        }
        result.map(|_| ())
    }

    async fn fetch_set(&self) -> Result<(KeySet, Duration), String> {
        let url = match &self.location {
            Location::Jwks(url) => url.clone(),
            Location::Discovery(issuer) => self.discover(issuer).await?,
        };
        let answer = self.fetcher.get(&url).await?;
        if !answer.status.is_success() {
            return Err(format!("the key set URL answered {}", answer.status));
        }
        let (keys, skipped) = KeySet::from_jwks(&answer.body)?;
        if skipped > 0 {
            tracing::debug!(target: "tower_gateway_auth::jwt", skipped, "JWKS keys of other kinds skipped");
        }
        if keys.len() == 0 {
            return Err("the key set holds no signature key this gateway can use".into());
        }
        let ttl = max_age(&answer.headers)
            .unwrap_or(self.timing.min_ttl * 4)
            .clamp(self.timing.min_ttl, self.timing.max_ttl);
        Ok((keys, ttl))
    }

    async fn discover(&self, issuer: &str) -> Result<Uri, String> {
        let url: Uri = format!(
            "{}/.well-known/openid-configuration",
            issuer.trim_end_matches('/')
        )
        .parse()
        .map_err(|_| "the issuer is not a URL".to_owned())?;
        let answer = self.fetcher.get(&url).await?;
        if !answer.status.is_success() {
            return Err(format!("OIDC discovery answered {}", answer.status));
        }
        #[derive(serde::Deserialize)]
        struct Discovery {
            issuer: String,
            jwks_uri: String,
        }
        let doc: Discovery = serde_json::from_slice(&answer.body)
            .map_err(|_| "the OIDC discovery document has no issuer and jwks_uri".to_owned())?;
        // OpenID Connect Discovery 1.0 §4.3: the document must be the issuer's own.
        if doc.issuer.trim_end_matches('/') != issuer.trim_end_matches('/') {
            return Err("the OIDC discovery document names another issuer".into());
        }
        doc.jwks_uri
            .parse()
            .map_err(|_| "the discovery document's jwks_uri is not a URL".to_owned())
    }

    /// Refetches a little before `ttl` runs out, in a task that ends with the key set.
    fn schedule_refresh(self: &Arc<Self>, ttl: Duration) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let weak: Weak<Self> = Arc::downgrade(self);
        // At 90 % of the lifetime, so that requests never wait on a routine refresh.
        let wait = ttl.mul_f64(0.9);
        let task = runtime.spawn(async move {
            tokio::time::sleep(wait).await;
            let Some(remote) = weak.upgrade() else { return };
            let _one = remote.fetching.lock().await;
            let _ = remote.fetch().await;
        });
        let previous = self
            .refresher
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .replace(task);
        if let Some(previous) = previous {
            previous.abort();
        }
    }

    /// How old the held set is, if one is held.
    pub(crate) fn age(&self) -> Option<Duration> {
        let state = self.state.read().unwrap_or_else(PoisonError::into_inner);
        state.as_ref().map(|l| l.fetched.elapsed())
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        if let Some(task) = self
            .refresher
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            task.abort();
        }
    }
}
