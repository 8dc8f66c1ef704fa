//! User tokens beside API keys: JWTs (and OIDC ID or access tokens) verified by the
//! [`InboundApiKeyLayer`](crate::InboundApiKeyLayer) (feature `jwt`).
//!
//! A `Bearer` value shaped like a JWT (three base64url parts, the first a JSON header) goes
//! to the layer's [`JwtVerifier`], anything else to its key store; which of the two a layer
//! takes is [`Accept`]. Both produce the same [`Identity`](crate::Identity), so
//! [`RequireScopesLayer`](crate::RequireScopesLayer), per-identity upstream credentials,
//! limits and metrics treat a token user exactly like a key user.
//!
//! ```no_run
//! use std::time::Duration;
//! use tower_gateway_auth::InboundApiKeyLayer;
//! use tower_gateway_auth::jwt::{Accept, Algorithm, JwtVerifier};
//! use tower_gateway_auth::store::MemoryStore;
//!
//! let verifier = JwtVerifier::builder()
//!     .issuer("https://login.example.com/")
//!     .audience("https://api.example.com")
//!     .discover() // the JWKS from the issuer's /.well-known/openid-configuration
//!     .algorithms([Algorithm::RS256, Algorithm::ES256])
//!     .metadata_claims(["org_id"])
//!     .build()
//!     .unwrap();
//! let layer = InboundApiKeyLayer::new(MemoryStore::new())
//!     .tokens(verifier)
//!     .accept(Accept::Both);
//! ```
//!
//! # What is checked
//!
//! - **Algorithms are pinned**: a token whose `alg` is not in [`algorithms`](JwtVerifierBuilder::algorithms)
//!   is refused before any key is looked at (`alg: none` never parses). A key is used only
//!   with algorithms of its own family, so an HS256 token "signed" with an RSA public key
//!   finds no key. HMAC algorithms need a configured [`secret`](JwtVerifierBuilder::hmac_secret);
//!   an HMAC key in a JWKS is ignored.
//! - `exp` always (required), `nbf` when present, `iss` and `aud` when configured, each
//!   with a leeway (default 30 s); further required claims by name.
//! - A token longer than 8 KiB is a 400, before anything is decoded.
//!
//! Refusals are 401 with `WWW-Authenticate: Bearer error="invalid_token",
//! error_description="…"` (RFC 6750), the description saying why (expired, not yet valid,
//! wrong issuer or audience, bad signature, unknown key, malformed); 503 when no key set
//! could ever be fetched (fail closed).
//!
//! # Keys
//!
//! Static keys ([`key_pem`](JwtVerifierBuilder::key_pem), [`jwk`](JwtVerifierBuilder::jwk)), or
//! a JWKS from a URL or found through OIDC discovery, fetched on first use and cached for
//! the answer's `max-age` within bounds (default 1 minute to 1 day), refreshed in the
//! background at 90 % of that. A token with an unknown `kid` refetches the set at most
//! once per [`refetch_interval`](JwtVerifierBuilder::refetch_interval) (default 60 s): a
//! flood of tokens with random `kid`s costs one fetch per interval. While the endpoint is
//! down the set held is used for up to [`stale_for`](JwtVerifierBuilder::stale_for) past
//! its expiry (default 1 hour).
//!
//! # Claims to identity
//!
//! - The id is derived from `iss` and `sub` (a SHA-256 of both, length-prefixed, under a
//!   domain separator of its own, cut to 64 bits): two issuers' subjects cannot be confused,
//!   and a token user's id meets a key's random id only with a 2⁻⁶⁴ chance per pair.
//! - The name is [`name_claim`](JwtVerifierBuilder::name_claim) (default `name`, else `sub`).
//! - Scopes from `scope` (space-separated), or `scp` (an array or a string), or a claim of
//!   your choosing ([`scope_claim`](JwtVerifierBuilder::scope_claim)).
//! - `iss`, `sub` and the [`metadata_claims`](JwtVerifierBuilder::metadata_claims) (such as
//!   `org_id` or a tenant) go into the identity's metadata.
//! - The identity expires with the token.
//!
//! # Cost
//!
//! A verified token is cached by its signature until its `exp` (at most
//! [`cache_capacity`](JwtVerifierBuilder::cache_capacity) tokens, 10,000 by default), so the
//! same token again costs a hash and a table lookup, about what a key lookup costs.

mod claims;
mod keys;

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use http::Uri;
pub use jsonwebtoken::Algorithm;
use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{AlgorithmFamily, DecodingKey, Validation};

use crate::clock::{Clock, SystemClock};
use crate::http_fetch::Fetcher;
use crate::keys::{KeyDigest, KeyHasher, KeyRecord};
use crate::rejection::{Rejection, RejectionKind};
use claims::Mapping;
use keys::{Found, KeySet, Location, Remote, Timing, VerifyKey};

/// The longest token taken (RFC 6750 sets none; 8 KiB is far past any real token).
pub const MAX_TOKEN_LEN: usize = 8 * 1024;

/// Which credentials an inbound layer takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Accept {
    /// API keys from the store only (the default of a layer without a verifier).
    Keys,
    /// JWTs only: a `Bearer` value that is not a JWT, and any key in another source, is
    /// refused.
    Tokens,
    /// Either: a JWT-shaped `Bearer` value is verified as a token, anything else as a key
    /// (the default of a layer given a verifier).
    #[default]
    Both,
}

/// Verifies JWTs for an [`InboundApiKeyLayer`](crate::InboundApiKeyLayer); see the
/// [module docs](self). Cheap to clone (one shared state).
#[derive(Clone)]
pub struct JwtVerifier {
    inner: Arc<Inner>,
}

struct Inner {
    algorithms: Vec<Algorithm>,
    validation: Validation,
    statics: KeySet,
    hmac: Option<DecodingKey>,
    remote: Option<Arc<Remote>>,
    mapping: Mapping,
    cache: Mutex<Cache>,
    capacity: usize,
    clock: Arc<dyn Clock>,
    hasher: KeyHasher,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("algorithms", &self.inner.algorithms)
            .field("issuer", &self.inner.validation.iss)
            .field("audience", &self.inner.validation.aud)
            .field("static_keys", &self.inner.statics.len())
            .field("remote_keys", &self.inner.remote.is_some())
            .finish_non_exhaustive()
    }
}

/// Why a verifier cannot be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JwtConfigError(String);

impl std::fmt::Display for JwtConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for JwtConfigError {}

/// Options for a [`JwtVerifier`], from [`JwtVerifier::builder`].
pub struct JwtVerifierBuilder {
    issuers: Vec<String>,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    leeway: Duration,
    required: Vec<String>,
    statics: KeySet,
    hmac: Option<DecodingKey>,
    location: Option<Location>,
    discover: bool,
    timing: Timing,
    fetch_timeout: Duration,
    mapping: Mapping,
    capacity: usize,
    clock: Arc<dyn Clock>,
    errors: Vec<String>,
}

impl std::fmt::Debug for JwtVerifierBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifierBuilder")
            .field("issuers", &self.issuers)
            .field("audiences", &self.audiences)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

impl JwtVerifier {
    /// Options: RS256 only, leeway 30 s, no issuer or audience checked until set, no keys
    /// until given.
    pub fn builder() -> JwtVerifierBuilder {
        JwtVerifierBuilder {
            issuers: Vec::new(),
            audiences: Vec::new(),
            algorithms: vec![Algorithm::RS256],
            leeway: Duration::from_secs(30),
            required: Vec::new(),
            statics: KeySet::default(),
            hmac: None,
            location: None,
            discover: false,
            timing: Timing::default(),
            fetch_timeout: Duration::from_secs(5),
            mapping: Mapping::default(),
            capacity: 10_000,
            clock: Arc::new(SystemClock),
            errors: Vec::new(),
        }
    }

    /// How many times the key set was fetched (answered or not): a flood of unknown `kid`s
    /// shows here as one fetch per interval.
    pub fn key_set_fetches(&self) -> u64 {
        self.inner.remote.as_ref().map_or(0, |r| r.fetches())
    }

    /// How old the fetched key set is, if one was fetched.
    pub fn key_set_age(&self) -> Option<Duration> {
        self.inner.remote.as_ref().and_then(|r| r.age())
    }

    /// Verifies `token`: the identity's record, or the refusal.
    pub(crate) fn verify(&self, token: &str) -> TokenCheck {
        if token.len() > MAX_TOKEN_LEN {
            return TokenCheck::ready(Err(Rejection::new(
                RejectionKind::TokenTooLong,
                format!("The token is longer than {MAX_TOKEN_LEN} bytes."),
            )));
        }
        let now = self.inner.clock.now().as_unix_secs();
        if let Some(record) = self.inner.cached(signature(token), now) {
            return TokenCheck::ready(Ok(record));
        }
        let digest = self.inner.hasher.digest(token.as_bytes());
        let header = match jsonwebtoken::decode_header(token) {
            Ok(header) => header,
            Err(_) => return TokenCheck::ready(Err(invalid("The token is malformed."))),
        };
        if !self.inner.algorithms.contains(&header.alg) {
            return TokenCheck::ready(Err(invalid(format!(
                "The token's algorithm {:?} is not accepted.",
                header.alg
            ))));
        }
        let kid = header.kid.as_deref();
        if header.alg.family() == AlgorithmFamily::Hmac {
            let outcome = match &self.inner.hmac {
                Some(secret) => self.inner.check(token, header.alg, secret, digest, now),
                None => Err(invalid("The token's signing key is unknown.")),
            };
            return TokenCheck::ready(outcome);
        }
        if let Some(key) = self.inner.statics.find(kid) {
            return TokenCheck::ready(self.inner.with_key(token, header.alg, key, digest, now));
        }
        let Some(remote) = &self.inner.remote else {
            return TokenCheck::ready(Err(invalid("The token's signing key is unknown.")));
        };
        if let Some(key) = remote.find_now(kid) {
            return TokenCheck::ready(self.inner.with_key(token, header.alg, &key, digest, now));
        }
        let inner = self.inner.clone();
        let remote = remote.clone();
        let token = token.to_owned();
        let kid = header.kid.clone();
        let alg = header.alg;
        TokenCheck::boxed(async move {
            match remote.find(kid.as_deref()).await {
                Found::Key(key) => {
                    let now = inner.clock.now().as_unix_secs();
                    inner.with_key(&token, alg, &key, digest, now)
                }
                Found::Unknown => Err(invalid("The token's signing key is unknown.")),
                Found::Unavailable(why) => {
                    tracing::warn!(target: "tower_gateway_auth::jwt", error = %why, "token refused: no signing keys");
                    Err(Rejection::new(
                        RejectionKind::StoreUnavailable,
                        "Tokens cannot be verified right now; try again shortly.",
                    ))
                }
            }
        })
    }
}

opaque_ready_or_boxed! {
    /// A token's verification: ready at once for a cached token or a key held in memory,
    /// boxed while the key set is fetched.
    pub struct TokenCheck => Result<Arc<KeyRecord>, Rejection>;
}

impl TokenCheck {
    fn ready(outcome: Result<Arc<KeyRecord>, Rejection>) -> Self {
        TokenCheck(crate::ready_or_boxed::ReadyOrBoxed::ready(outcome))
    }

    fn boxed(
        future: impl std::future::Future<Output = Result<Arc<KeyRecord>, Rejection>> + Send + 'static,
    ) -> Self {
        TokenCheck(crate::ready_or_boxed::ReadyOrBoxed::boxed(future))
    }
}

/// A refused token: 401 `invalid_token`, saying why.
fn invalid(why: impl Into<std::borrow::Cow<'static, str>>) -> Rejection {
    Rejection::new(RejectionKind::InvalidToken, why).with_description()
}

impl Inner {
    fn cached(&self, signature: &str, now: u64) -> Option<Arc<KeyRecord>> {
        let cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        let (record, exp) = cache.map.get(signature)?;
        (now < *exp).then(|| record.clone())
    }

    /// Checks `token` with `key`, which must be of the algorithm's family.
    fn with_key(
        &self,
        token: &str,
        alg: Algorithm,
        key: &VerifyKey,
        digest: KeyDigest,
        now: u64,
    ) -> Result<Arc<KeyRecord>, Rejection> {
        if key.family != alg.family() {
            return Err(invalid("The token's signing key is unknown."));
        }
        self.check(token, alg, &key.key, digest, now)
    }

    fn check(
        &self,
        token: &str,
        alg: Algorithm,
        key: &DecodingKey,
        digest: KeyDigest,
        now: u64,
    ) -> Result<Arc<KeyRecord>, Rejection> {
        let mut validation = self.validation.clone();
        validation.algorithms = vec![alg];
        let data = jsonwebtoken::decode::<serde_json::Value>(token, key, &validation)
            .map_err(|e| refusal(e.kind()))?;
        // jsonwebtoken reads its own clock; the verifier's (a manual one in tests) has the
        // last word, with the same leeway.
        let leeway = validation.leeway;
        let exp = data.claims.get("exp").and_then(serde_json::Value::as_u64);
        match exp {
            Some(exp) if now < exp.saturating_add(leeway) => {}
            Some(_) => return Err(invalid("The token has expired.")),
            None => return Err(invalid("The token has no valid exp claim.")),
        }
        if let Some(nbf) = data.claims.get("nbf").and_then(serde_json::Value::as_u64)
            && now.saturating_add(leeway) < nbf
        {
            return Err(invalid("The token is not valid yet."));
        }
        let exp = exp.expect("checked above").saturating_add(leeway);
        let record = Arc::new(self.mapping.record(&data.claims, digest, exp)?);
        self.remember(signature(token), record.clone(), exp);
        Ok(record)
    }

    fn remember(&self, signature: &str, record: Arc<KeyRecord>, exp: u64) {
        let mut cache = self.cache.lock().unwrap_or_else(PoisonError::into_inner);
        if cache.map.len() >= self.capacity {
            // Expired ones first; if the cache is full of live tokens, start over: bounded
            // memory matters more than the hit rate of a cache under a flood.
            let now = self.clock.now().as_unix_secs();
            cache.map.retain(|_, (_, exp)| *exp > now);
            if cache.map.len() >= self.capacity {
                cache.map.clear();
            }
        }
        cache.map.insert(signature.into(), (record, exp));
    }
}

/// Verified tokens by their signature: a signature that verified once stands for the
/// claims it was verified with. A token with the same signature and other claims (the only
/// way to meet an entry without its token, and only by someone who has seen the token)
/// gets the identity of the token that was verified, never the claims it carries, so the
/// cache forges nothing; and a lookup costs a fast hash of the signature instead of a
/// SHA-256 of the whole token.
#[derive(Default)]
struct Cache {
    map: hashbrown::HashMap<Box<str>, (Arc<KeyRecord>, u64)>,
}

/// The signature part of a JWT (its last segment).
fn signature(token: &str) -> &str {
    token.rsplit('.').next().unwrap_or(token)
}

/// What jsonwebtoken's refusal means for the client.
fn refusal(kind: &ErrorKind) -> Rejection {
    let why = match kind {
        ErrorKind::ExpiredSignature => "The token has expired.",
        ErrorKind::ImmatureSignature => "The token is not valid yet.",
        ErrorKind::InvalidIssuer => "The token's issuer is not accepted.",
        ErrorKind::InvalidAudience => "The token is not meant for this audience.",
        ErrorKind::InvalidSignature => "The token's signature is invalid.",
        ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => {
            "The token's algorithm is not accepted."
        }
        ErrorKind::MissingRequiredClaim(_) => "The token lacks a required claim.",
        ErrorKind::InvalidKeyFormat | ErrorKind::InvalidEcdsaKey | ErrorKind::InvalidRsaKey(_) => {
            "The token's signing key is unknown."
        }
        _ => "The token is malformed.",
    };
    invalid(why)
}

impl JwtVerifierBuilder {
    /// Accepts tokens from `issuer` (its `iss`); call again for several. Also the issuer
    /// whose discovery document [`discover`](Self::discover) reads.
    pub fn issuer(mut self, issuer: impl Into<String>) -> Self {
        self.issuers.push(issuer.into());
        self
    }

    /// Accepts tokens for `audience` (one of their `aud`); call again for several.
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audiences.push(audience.into());
        self
    }

    /// The algorithms taken (default RS256 only). HS256/384/512 also need
    /// [`hmac_secret`](Self::hmac_secret).
    pub fn algorithms(mut self, algorithms: impl IntoIterator<Item = Algorithm>) -> Self {
        self.algorithms = algorithms.into_iter().collect();
        self
    }

    /// The clock skew allowed on `exp` and `nbf` (default 30 s).
    pub fn leeway(mut self, leeway: Duration) -> Self {
        self.leeway = leeway;
        self
    }

    /// Claims a token must have (besides `exp`, always required): e.g. `sub`, `iat`, or
    /// any claim of your own.
    pub fn required_claims<I, S>(mut self, claims: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.required.extend(claims.into_iter().map(Into::into));
        self
    }

    /// A static public key in PEM (RSA, EC or Ed25519), for tokens with key id `kid` (or
    /// any token, when it is the only key and tokens carry no `kid`).
    pub fn key_pem(mut self, kid: Option<&str>, pem: &[u8]) -> Self {
        let parsed = [
            (DecodingKey::from_rsa_pem(pem), AlgorithmFamily::Rsa),
            (DecodingKey::from_ec_pem(pem), AlgorithmFamily::Ec),
            (DecodingKey::from_ed_pem(pem), AlgorithmFamily::Ed),
        ]
        .into_iter()
        .find_map(|(key, family)| key.ok().map(|key| VerifyKey { key, family }));
        match parsed {
            Some(key) => self.statics.insert(kid.map(str::to_owned), key),
            None => self
                .errors
                .push("a static key is not a PEM public key".into()),
        }
        self
    }

    /// A static public key as a JWK (JSON), filed under its `kid`.
    pub fn jwk(mut self, jwk: &str) -> Self {
        match serde_json::from_str::<jsonwebtoken::jwk::Jwk>(jwk)
            .ok()
            .and_then(|jwk| keys::verify_key(&jwk).map(|key| (jwk.common.key_id, key)))
        {
            Some((kid, key)) => self.statics.insert(kid, key),
            None => self
                .errors
                .push("a static JWK is not a public signature key".into()),
        }
        self
    }

    /// The secret of HS256/384/512 tokens (at least 32 bytes). Only with this do HMAC
    /// algorithms verify anything.
    pub fn hmac_secret(mut self, secret: &[u8]) -> Self {
        if secret.len() < 32 {
            self.errors
                .push("an HMAC secret must be at least 32 bytes".into());
        } else {
            self.hmac = DecodingKey::from_secret(secret).ok();
        }
        self
    }

    /// Fetches the key set from `url` (a JWKS).
    pub fn jwks_url(mut self, url: &str) -> Self {
        match url.parse::<Uri>() {
            Ok(uri) if uri.scheme().is_some() && uri.host().is_some() => {
                self.location = Some(Location::Jwks(uri));
            }
            _ => self.errors.push("jwks_url is not an absolute URL".into()),
        }
        self
    }

    /// Finds the key set through OIDC discovery from the (first) [`issuer`](Self::issuer).
    pub fn discover(mut self) -> Self {
        self.discover = true;
        self
    }

    /// An unknown `kid` refetches the key set at most once per `interval` (default 60 s).
    pub fn refetch_interval(mut self, interval: Duration) -> Self {
        self.timing.refetch_interval = interval;
        self
    }

    /// Bounds on how long a fetched key set is kept (its `max-age` within them; default 1
    /// minute to 1 day).
    pub fn key_set_ttl(mut self, min: Duration, max: Duration) -> Self {
        self.timing.min_ttl = min;
        self.timing.max_ttl = max.max(min);
        self
    }

    /// How long past its expiry a key set is still used while it cannot be fetched
    /// (default 1 hour).
    pub fn stale_for(mut self, stale: Duration) -> Self {
        self.timing.stale_for = stale;
        self
    }

    /// The name of the claim the identity's name comes from (default `name`, then `sub`).
    pub fn name_claim(mut self, claim: impl Into<String>) -> Self {
        self.mapping.name_claim = Some(claim.into());
        self
    }

    /// The claim scopes come from (default `scope`, then `scp`): a space-separated string
    /// or an array of strings.
    pub fn scope_claim(mut self, claim: impl Into<String>) -> Self {
        self.mapping.scope_claim = Some(claim.into());
        self
    }

    /// Claims copied into the identity's metadata (such as `org_id` or a tenant).
    pub fn metadata_claims<I, S>(mut self, claims: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.mapping.metadata = claims.into_iter().map(Into::into).collect();
        self
    }

    /// How many verified tokens are cached (default 10,000).
    pub fn cache_capacity(mut self, capacity: usize) -> Self {
        self.capacity = capacity.max(1);
        self
    }

    /// The clock `exp` and `nbf` are read against (e.g. a
    /// [`ManualClock`](crate::clock::ManualClock) in tests).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.clock = Arc::new(clock);
        self
    }

    /// How long one fetch of the key set may take (default 5 s).
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.fetch_timeout = timeout;
        self
    }

    /// The verifier, or why the options cannot make one.
    pub fn build(self) -> Result<JwtVerifier, JwtConfigError> {
        if let Some(error) = self.errors.into_iter().next() {
            return Err(JwtConfigError(error));
        }
        if self.algorithms.is_empty() {
            return Err(JwtConfigError("no algorithm is accepted".into()));
        }
        if self
            .algorithms
            .iter()
            .any(|a| a.family() == AlgorithmFamily::Hmac)
            && self.hmac.is_none()
        {
            return Err(JwtConfigError(
                "HS256/384/512 need an explicitly configured secret".into(),
            ));
        }
        let location = match (self.location, self.discover) {
            (Some(_), true) => {
                return Err(JwtConfigError(
                    "give jwks_url or discovery from the issuer, not both".into(),
                ));
            }
            (location, false) => location,
            (None, true) => match self.issuers.first() {
                Some(issuer) => Some(Location::Discovery(issuer.clone())),
                None => return Err(JwtConfigError("discovery needs an issuer".into())),
            },
        };
        if location.is_none() && self.statics.len() == 0 && self.hmac.is_none() {
            return Err(JwtConfigError(
                "no keys: give a JWKS URL, discovery, static keys or an HMAC secret".into(),
            ));
        }
        let mut validation = Validation::new(self.algorithms[0]);
        validation.algorithms = self.algorithms.clone();
        validation.leeway = self.leeway.as_secs();
        validation.validate_nbf = true;
        let mut required: Vec<String> = vec!["exp".into()];
        required.extend(self.required);
        if !self.issuers.is_empty() {
            validation.set_issuer(&self.issuers);
            required.push("iss".into());
        }
        if self.audiences.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&self.audiences);
            required.push("aud".into());
        }
        validation.set_required_spec_claims(&required);
        let mut mapping = self.mapping;
        mapping.required = required
            .into_iter()
            .filter(|c| !["exp", "nbf", "aud", "iss", "sub"].contains(&c.as_str()))
            .collect();
        let remote =
            location.map(|l| Remote::new(l, Fetcher::new(self.fetch_timeout), self.timing));
        Ok(JwtVerifier {
            inner: Arc::new(Inner {
                algorithms: self.algorithms,
                validation,
                statics: self.statics,
                hmac: self.hmac,
                remote,
                mapping,
                cache: Mutex::new(Cache::default()),
                capacity: self.capacity,
                clock: self.clock,
                hasher: KeyHasher::sha256(),
            }),
        })
    }
}

/// Whether `value` is shaped like a JWT: three parts split by dots, the first starting as
/// base64url of a JSON object (`eyJ` is `{"`). API keys of this crate's format never are.
/// Cheap on purpose (it runs on every Bearer value); the verifier checks the rest.
pub fn looks_like_jwt(value: &str) -> bool {
    value.starts_with("eyJ") && memchr::memchr_iter(b'.', value.as_bytes()).count() == 2
}
