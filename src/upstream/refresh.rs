//! [`RefreshingToken`]: an access token fetched on demand (OAuth2 client credentials and
//! the like), cached, and refreshed ahead of its expiry by one fetch at a time.

use std::borrow::Cow;
use std::error::Error;
use std::fmt;
use std::future::Future;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use crate::clock::{Clock, SystemClock, Timestamp};
use crate::error_detail::ErrorDetail;
use crate::identity::Identity;
use crate::ready_or_boxed::ReadyOrBoxed;
use crate::rejection::{Rejection, RejectionKind};
use crate::upstream::credential::{Credential, CredentialSource};

/// How long before expiry a token is refreshed, by default.
pub const DEFAULT_REFRESH_MARGIN: Duration = Duration::from_secs(60);
/// How long after a failed fetch no new fetch is started, by default.
pub const DEFAULT_RETRY_BACKOFF: Duration = Duration::from_secs(5);
/// How long a fetch may take before it counts as failed, by default.
pub const DEFAULT_FETCH_TIMEOUT: Duration = Duration::from_secs(10);

/// A freshly fetched access token and how long it is valid.
#[derive(Debug, Clone)]
pub struct Token {
    credential: Credential,
    lifetime: Duration,
}

impl Token {
    /// A token valid for `lifetime` from the moment its fetch started.
    pub fn new(credential: Credential, lifetime: Duration) -> Self {
        Token {
            credential,
            lifetime,
        }
    }

    /// Reads an OAuth2 token response (RFC 6749 §5.1):
    /// `{"access_token": "…", "token_type": "Bearer", "expires_in": 3599}`.
    ///
    /// `expires_in` may be a number or a numeric string (some identity providers send one);
    /// when it is absent, `default_lifetime` applies. A `token_type` other than `Bearer`
    /// (case-insensitive) is refused.
    ///
    /// # Errors
    /// When the body is not such a response. The error never quotes the body.
    ///
    /// ```
    /// use std::time::Duration;
    /// use tower_gateway_auth::upstream::Token;
    ///
    /// let body = br#"{"access_token":"eyJ0eXAi.x.y","token_type":"bearer","expires_in":"3599"}"#;
    /// let token = Token::from_oauth2_json(body, Duration::from_secs(300)).unwrap();
    /// assert_eq!(token.lifetime(), Duration::from_secs(3599));
    /// assert_eq!(token.credential().value(), "eyJ0eXAi.x.y");
    /// ```
    pub fn from_oauth2_json(body: &[u8], default_lifetime: Duration) -> Result<Self, FetchError> {
        let json: serde_json::Value = serde_json::from_slice(body)
            .map_err(|_| FetchError::new("the token response is not JSON"))?;
        let access_token = json
            .get("access_token")
            .and_then(|t| t.as_str())
            .ok_or_else(|| FetchError::new("the token response has no access_token"))?;
        match json.get("token_type").and_then(|t| t.as_str()) {
            Some(kind) if !kind.eq_ignore_ascii_case("bearer") => {
                return Err(FetchError::new(
                    "the token response's token_type is not Bearer",
                ));
            }
            _ => {}
        }
        let lifetime = match json.get("expires_in") {
            None | Some(serde_json::Value::Null) => default_lifetime,
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(Duration::from_secs).ok_or_else(|| {
                    FetchError::new("the token response's expires_in is not a whole number")
                })?
            }
            Some(serde_json::Value::String(s)) => {
                s.trim().parse().map(Duration::from_secs).map_err(|_| {
                    FetchError::new("the token response's expires_in is not a number")
                })?
            }
            Some(_) => {
                return Err(FetchError::new(
                    "the token response's expires_in is not a number",
                ));
            }
        };
        let credential = Credential::new(access_token).map_err(|e| {
            FetchError::new(format!(
                "the token response's access_token is unusable: {e}"
            ))
        })?;
        Ok(Token::new(credential, lifetime))
    }

    /// The token.
    pub fn credential(&self) -> &Credential {
        &self.credential
    }

    /// How long it is valid.
    pub fn lifetime(&self) -> Duration {
        self.lifetime
    }
}

/// Gets a new access token, e.g. with an OAuth2 client-credentials request.
///
/// The crate has no HTTP client: bring your own (hyper, reqwest …). Any `Fn() -> Future`
/// closure is a fetcher too.
///
/// ```
/// use std::time::Duration;
/// use tower_gateway_auth::upstream::{Credential, FetchError, RefreshingToken, Token, TokenFetcher};
///
/// struct ClientCredentials { token_url: String, client_id: String, client_secret: String }
///
/// impl TokenFetcher for ClientCredentials {
///     async fn fetch(&self) -> Result<Token, FetchError> {
///         // POST grant_type=client_credentials to self.token_url with your HTTP client,
///         // then: Token::from_oauth2_json(&body, Duration::from_secs(300))
///         # let _ = (&self.token_url, &self.client_id, &self.client_secret);
///         Err(FetchError::new("left to the reader"))
///     }
/// }
///
/// let from_a_closure = RefreshingToken::new(|| async {
///     Ok(Token::new(Credential::new("tok")?, Duration::from_secs(3600)))
/// });
/// # let _ = from_a_closure;
/// ```
pub trait TokenFetcher: Send + Sync + 'static {
    /// Fetches a new token. The error's message is logged, so it must not hold a secret.
    fn fetch(&self) -> impl Future<Output = Result<Token, FetchError>> + Send;
}

impl<F, Fut> TokenFetcher for F
where
    F: Fn() -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<Token, FetchError>> + Send,
{
    fn fetch(&self) -> impl Future<Output = Result<Token, FetchError>> + Send {
        self()
    }
}

/// Why a token could not be fetched. It is logged: its message must not hold a secret.
pub struct FetchError(Box<ErrorDetail>);

impl FetchError {
    /// A failure described by `message`.
    pub fn new(message: impl Into<Cow<'static, str>>) -> Self {
        FetchError(ErrorDetail::new(message, None))
    }

    /// A failure described by `message`, caused by `source`.
    pub fn with_source(
        message: impl Into<Cow<'static, str>>,
        source: impl Into<Box<dyn Error + Send + Sync + 'static>>,
    ) -> Self {
        FetchError(ErrorDetail::new(message, Some(source.into())))
    }

    /// The description.
    pub fn message(&self) -> &str {
        self.0.message()
    }
}

impl From<crate::upstream::CredentialError> for FetchError {
    fn from(e: crate::upstream::CredentialError) -> Self {
        FetchError::with_source("the fetched token is unusable", e)
    }
}

impl fmt::Debug for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.debug("FetchError", f)
    }
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0, f)
    }
}

impl Error for FetchError {
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.0.source()
    }
}

/// A token from a [`TokenFetcher`], cached and refreshed before it expires.
///
/// - The first request (or [`credential`](CredentialSource::credential) call at start-up, to
///   fail early) fetches a token; requests arriving meanwhile wait for that same fetch.
/// - Once the token is within the refresh margin of its expiry (default 60 s, at most half
///   its lifetime), the next request starts a refresh in the background and every request
///   keeps using the current token until the new one arrives.
/// - However many requests arrive, only one fetch runs at a time.
/// - A failed or timed-out fetch (default timeout 10 s) is not retried for a backoff
///   (default 5 s). Meanwhile a still-valid token keeps being used; without one, requests
///   are refused with 503 [`UpstreamCredentialUnavailable`](RejectionKind::UpstreamCredentialUnavailable)
///   and never forwarded.
///
/// Fetches run on the Tokio runtime of the request that starts them. Times come from a
/// [`Clock`] in whole seconds (default: the system clock), so tests can move time.
///
/// ```
/// use std::time::Duration;
/// use tower_gateway_auth::upstream::{Credential, CredentialSource, RefreshingToken, Token};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let source = RefreshingToken::builder(|| async {
///     Ok(Token::new(Credential::new("eyJ-access-token")?, Duration::from_secs(3600)))
/// })
/// .name("azure-ad")
/// .refresh_margin(Duration::from_secs(300))
/// .build();
///
/// // At start-up: fail early when the token endpoint cannot be reached.
/// let token = source.credential(None).await.expect("token endpoint reachable");
/// assert_eq!(token.value(), "eyJ-access-token");
/// # });
/// ```
pub struct RefreshingToken<F> {
    shared: Arc<Shared<F>>,
}

impl<F> Clone for RefreshingToken<F> {
    fn clone(&self) -> Self {
        RefreshingToken {
            shared: self.shared.clone(),
        }
    }
}

struct Shared<F> {
    fetcher: F,
    settings: Settings,
    state: Mutex<State>,
    /// Bumped after every fetch, successful or not, to wake the requests waiting on it.
    fetched: watch::Sender<u64>,
}

struct Settings {
    name: Cow<'static, str>,
    refresh_margin: Duration,
    retry_backoff: Duration,
    fetch_timeout: Duration,
    clock: Arc<dyn Clock>,
}

#[derive(Default)]
struct State {
    current: Option<Current>,
    fetching: bool,
    /// Set by a failed fetch: no new fetch starts before then.
    retry_at: Option<Timestamp>,
}

struct Current {
    credential: Credential,
    expires_at: Timestamp,
    refresh_at: Timestamp,
}

/// Configures a [`RefreshingToken`]; see [`RefreshingToken::builder`].
pub struct RefreshingTokenBuilder<F> {
    fetcher: F,
    settings: Settings,
}

impl<F: TokenFetcher> RefreshingToken<F> {
    /// A source fetching tokens with `fetcher`, with the defaults above.
    pub fn new(fetcher: F) -> Self {
        Self::builder(fetcher).build()
    }

    /// A builder for a source fetching tokens with `fetcher`.
    pub fn builder(fetcher: F) -> RefreshingTokenBuilder<F> {
        RefreshingTokenBuilder {
            fetcher,
            settings: Settings {
                name: Cow::Borrowed("refreshing"),
                refresh_margin: DEFAULT_REFRESH_MARGIN,
                retry_backoff: DEFAULT_RETRY_BACKOFF,
                fetch_timeout: DEFAULT_FETCH_TIMEOUT,
                clock: Arc::new(SystemClock),
            },
        }
    }

    /// The fetcher.
    pub fn fetcher(&self) -> &F {
        &self.shared.fetcher
    }
}

impl<F: TokenFetcher> RefreshingTokenBuilder<F> {
    /// The name logs give this source (default `refreshing`).
    pub fn name(mut self, name: impl Into<Cow<'static, str>>) -> Self {
        self.settings.name = name.into();
        self
    }

    /// How long before expiry a refresh starts (default 60 s); at most half the token's
    /// lifetime is used, so short-lived tokens are not refreshed on every request.
    pub fn refresh_margin(mut self, margin: Duration) -> Self {
        self.settings.refresh_margin = margin;
        self
    }

    /// How long after a failed fetch no new one starts (default 5 s), so a token endpoint
    /// that is down is not hammered.
    pub fn retry_backoff(mut self, backoff: Duration) -> Self {
        self.settings.retry_backoff = backoff;
        self
    }

    /// How long a fetch may take before it counts as failed (default 10 s).
    pub fn fetch_timeout(mut self, timeout: Duration) -> Self {
        self.settings.fetch_timeout = timeout;
        self
    }

    /// The clock expiry is judged by (default: the system clock).
    pub fn clock(mut self, clock: impl Clock) -> Self {
        self.settings.clock = Arc::new(clock);
        self
    }

    /// The source.
    pub fn build(self) -> RefreshingToken<F> {
        RefreshingToken {
            shared: Arc::new(Shared {
                fetcher: self.fetcher,
                settings: self.settings,
                state: Mutex::new(State::default()),
                fetched: watch::Sender::new(0),
            }),
        }
    }
}

fn unavailable() -> Rejection {
    Rejection::new(
        RejectionKind::UpstreamCredentialUnavailable,
        "The upstream credential cannot be obtained right now; try again shortly.",
    )
}

impl<F> Shared<F> {
    fn state(&self) -> MutexGuard<'_, State> {
        // Nothing panics while holding the lock; a poisoned state is still consistent.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The cached token if it is still valid now.
    fn current_credential(&self) -> Result<Credential, Rejection> {
        let now = self.settings.clock.now();
        self.state()
            .current
            .as_ref()
            .filter(|current| now < current.expires_at)
            .map(|current| current.credential.clone())
            .ok_or_else(unavailable)
    }

    /// Records a fetch's outcome and wakes the requests waiting on it.
    fn finish(&self, started: Timestamp, result: Result<Token, FetchError>) {
        let settings = &self.settings;
        let result = result.and_then(|token| {
            if token.lifetime < Duration::from_secs(1) {
                Err(FetchError::new(
                    "the token endpoint returned an expired token",
                ))
            } else {
                Ok(token)
            }
        });
        #[cfg(feature = "metrics")]
        crate::metrics::credential_refresh(&settings.name, result.is_ok());
        let mut state = self.state();
        state.fetching = false;
        match result {
            Ok(token) => {
                let expires_at = started + token.lifetime;
                let lead = settings.refresh_margin.min(token.lifetime / 2);
                tracing::info!(
                    target: "tower_gateway_auth::upstream",
                    source = &*settings.name,
                    fingerprint = %token.credential.fingerprint(),
                    lifetime_secs = token.lifetime.as_secs(),
                    "upstream token fetched"
                );
                state.current = Some(Current {
                    credential: token.credential,
                    expires_at,
                    refresh_at: expires_at.saturating_sub(lead),
                });
                state.retry_at = None;
            }
            Err(error) => {
                let now = settings.clock.now();
                tracing::warn!(
                    target: "tower_gateway_auth::upstream",
                    source = &*settings.name,
                    %error,
                    retry_in_secs = settings.retry_backoff.as_secs(),
                    still_valid = state.current.as_ref().is_some_and(|c| now < c.expires_at),
                    "upstream token fetch failed"
                );
                state.retry_at = Some(now + settings.retry_backoff);
            }
        }
        drop(state);
        self.fetched.send_modify(|n| *n = n.wrapping_add(1));
    }
}

impl<F: TokenFetcher> Shared<F> {
    /// Runs a fetch in the background. Called without the state lock held: a task the
    /// runtime drops at once ends (through its guard) in `finish`, which takes the lock.
    fn start_fetch(self: &Arc<Self>) {
        let guard = FetchGuard {
            shared: Some(self.clone()),
            started: self.settings.clock.now(),
        };
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            guard.finish(Err(FetchError::new(
                "there is no Tokio runtime to fetch the token on",
            )));
            return;
        };
        runtime.spawn(async move {
            let shared = guard.shared.as_deref().expect("set until finished");
            let timeout = shared.settings.fetch_timeout;
            let result = match tokio::time::timeout(timeout, shared.fetcher.fetch()).await {
                Ok(result) => result,
                Err(_) => Err(FetchError::new(format!(
                    "the token fetch took longer than {timeout:?}"
                ))),
            };
            guard.finish(result);
        });
    }
}

/// Makes sure a fetch that never finishes normally (its task panicked or was dropped with
/// its runtime) still ends as a failure, so the requests waiting on it are answered.
struct FetchGuard<F> {
    shared: Option<Arc<Shared<F>>>,
    started: Timestamp,
}

impl<F> FetchGuard<F> {
    fn finish(mut self, result: Result<Token, FetchError>) {
        if let Some(shared) = self.shared.take() {
            shared.finish(self.started, result);
        }
    }
}

impl<F> Drop for FetchGuard<F> {
    fn drop(&mut self) {
        if let Some(shared) = self.shared.take() {
            shared.finish(
                self.started,
                Err(FetchError::new("the token fetch was abandoned")),
            );
        }
    }
}

impl<F: TokenFetcher> CredentialSource for RefreshingToken<F> {
    type Future = RefreshFuture;

    fn credential(&self, _: Option<&Identity>) -> Self::Future {
        let shared = &self.shared;
        let now = shared.settings.clock.now();
        let mut state = shared.state();
        let usable = state
            .current
            .as_ref()
            .filter(|current| now < current.expires_at)
            .map(|current| (current.credential.clone(), now >= current.refresh_at));
        let wants_fetch = usable.as_ref().is_none_or(|(_, due)| *due);
        let start = wants_fetch && !state.fetching && state.retry_at.is_none_or(|at| now >= at);
        state.fetching |= start;
        let answer = match usable {
            Some((credential, _)) => ReadyOrBoxed::ready(Ok(credential)),
            None if !state.fetching => ReadyOrBoxed::ready(Err(unavailable())),
            None => {
                // Subscribed under the lock: the fetch cannot finish unseen in between.
                let mut fetched = shared.fetched.subscribe();
                let shared = shared.clone();
                ReadyOrBoxed::boxed(async move {
                    // An error would mean the sender is gone: not while `shared` lives.
                    let _ = fetched.changed().await;
                    shared.current_credential()
                })
            }
        };
        drop(state);
        if start {
            shared.start_fetch();
        }
        RefreshFuture(answer)
    }

    fn label(&self) -> &str {
        &self.shared.settings.name
    }
}

impl<F> fmt::Debug for RefreshingToken<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let settings = &self.shared.settings;
        let state = self.shared.state();
        f.debug_struct("RefreshingToken")
            .field("name", &settings.name)
            .field("refresh_margin", &settings.refresh_margin)
            .field("retry_backoff", &settings.retry_backoff)
            .field("current", &state.current.as_ref().map(|c| &c.credential))
            .field("expires_at", &state.current.as_ref().map(|c| c.expires_at))
            .field("fetching", &state.fetching)
            .finish_non_exhaustive()
    }
}

impl<F> fmt::Debug for RefreshingTokenBuilder<F> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RefreshingTokenBuilder")
            .field("name", &self.settings.name)
            .finish_non_exhaustive()
    }
}

opaque_ready_or_boxed! {
    /// The future of a [`RefreshingToken`]: ready at once unless a fetch must be waited for.
    pub struct RefreshFuture => Result<Credential, Rejection>;
}

#[cfg(test)]
mod tests {
    use std::pin::Pin;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::{Context, Poll, Waker};

    use super::*;
    use crate::clock::ManualClock;

    /// A source whose fetches are counted and issue `tok-1`, `tok-2` … valid for 60 s.
    fn counted(clock: &ManualClock) -> (RefreshingToken<impl TokenFetcher>, Arc<AtomicUsize>) {
        let fetches = Arc::new(AtomicUsize::new(0));
        let counter = fetches.clone();
        let source = RefreshingToken::builder(move || {
            let n = counter.fetch_add(1, Ordering::SeqCst) + 1;
            async move {
                Ok(Token::new(
                    Credential::new(&format!("tok-{n}"))?,
                    Duration::from_secs(60),
                ))
            }
        })
        .clock(clock.clone())
        .build();
        (source, fetches)
    }

    async fn value(source: &RefreshingToken<impl TokenFetcher>) -> String {
        let credential = source.credential(None).await.unwrap();
        credential.value().to_str().unwrap().to_owned()
    }

    #[tokio::test]
    async fn a_short_lived_token_is_refreshed_at_half_its_life_not_on_every_request() {
        let clock = ManualClock::new(Timestamp::from_unix_secs(1000));
        let (source, fetches) = counted(&clock);
        assert_eq!(value(&source).await, "tok-1");
        // The 60 s default margin is the whole lifetime: half of it is used instead.
        clock.advance(Duration::from_secs(29));
        for _ in 0..10 {
            assert_eq!(value(&source).await, "tok-1");
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 1);
        clock.advance(Duration::from_secs(1));
        assert_eq!(value(&source).await, "tok-1", "served while refreshing");
        clock.advance(Duration::from_secs(30));
        assert_eq!(value(&source).await, "tok-2");
        assert_eq!(fetches.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn without_a_runtime_the_answer_is_503_not_a_panic() {
        let clock = ManualClock::new(Timestamp::from_unix_secs(1000));
        let (source, fetches) = counted(&clock);
        let mut answer = source.credential(None);
        let polled = Pin::new(&mut answer).poll(&mut Context::from_waker(Waker::noop()));
        match polled {
            Poll::Ready(Err(rejection)) => {
                assert_eq!(
                    rejection.kind(),
                    RejectionKind::UpstreamCredentialUnavailable
                )
            }
            other => panic!("expected a 503 at once, got {other:?}"),
        }
        assert_eq!(fetches.load(Ordering::SeqCst), 0);
        // And the backoff holds: no fetch is attempted again right away.
        let mut again = source.credential(None);
        let polled = Pin::new(&mut again).poll(&mut Context::from_waker(Waker::noop()));
        assert!(matches!(polled, Poll::Ready(Err(_))));
        assert!(format!("{again:?}").contains("Ready"));
    }

    #[test]
    fn oauth2_responses() {
        let default = Duration::from_secs(300);
        let ok = |body: &str| Token::from_oauth2_json(body.as_bytes(), default);
        let t = ok(r#"{"access_token":"a.b.c","token_type":"Bearer","expires_in":120}"#).unwrap();
        assert_eq!(
            (t.credential().value().as_bytes(), t.lifetime()),
            (&b"a.b.c"[..], Duration::from_secs(120))
        );
        assert_eq!(ok(r#"{"access_token":"a"}"#).unwrap().lifetime(), default);
        assert_eq!(
            ok(r#"{"access_token":"a","expires_in":null}"#)
                .unwrap()
                .lifetime(),
            default
        );

        for (body, message) in [
            ("not json", "the token response is not JSON"),
            (r#"{"token":"a"}"#, "the token response has no access_token"),
            (
                r#"{"access_token":"a","token_type":"mac"}"#,
                "the token response's token_type is not Bearer",
            ),
            (
                r#"{"access_token":"a","expires_in":-5}"#,
                "the token response's expires_in is not a whole number",
            ),
            (
                r#"{"access_token":"a","expires_in":"soon"}"#,
                "the token response's expires_in is not a number",
            ),
            (
                r#"{"access_token":"a","expires_in":[1]}"#,
                "the token response's expires_in is not a number",
            ),
        ] {
            assert_eq!(ok(body).unwrap_err().to_string(), message, "{body}");
        }
        let err = ok(r#"{"access_token":"has space secret"}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("the token response's access_token is unusable"),
            "{err}"
        );
        assert!(!err.contains("secret"), "{err}");
    }
}
