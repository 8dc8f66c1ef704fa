//! The refreshing token source against a real OAuth2 client-credentials token endpoint on
//! loopback, fetched with a real HTTP client; the gateway forwards to a recording provider.
//! Time is a `ManualClock` (or Tokio's paused clock where no I/O runs), never a wait.

use crate::support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use axum::routing::post;
use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use support::{
    Recorder, client, forward_to, get, read, send, spawn_axum, spawn_service, spawn_upstream,
};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_gateway_auth::UpstreamAuthLayer;
use tower_gateway_auth::clock::{ManualClock, Timestamp};
use tower_gateway_auth::upstream::{
    Credential, CredentialSource, FetchError, Provider, RefreshingToken, Token, TokenFetcher,
};

const CLIENT_ID: &str = "gateway";
const CLIENT_SECRET: &str = "client-secret-never-logged";
const LIFETIME: u64 = 3600;
const T0: u64 = 1_700_000_000;

/// A token endpoint: checks the client credentials, waits at its gate (one permit per
/// answer, so a test can hold a fetch in flight), then issues `tok-1`, `tok-2` … or, while
/// down, answers 503.
struct TokenEndpoint {
    gate: Semaphore,
    down: AtomicBool,
    hits: AtomicUsize,
    issued: AtomicUsize,
}

impl TokenEndpoint {
    /// Up, with its gate closed.
    fn new() -> Arc<Self> {
        Arc::new(TokenEndpoint {
            gate: Semaphore::new(0),
            down: AtomicBool::new(false),
            hits: AtomicUsize::new(0),
            issued: AtomicUsize::new(0),
        })
    }

    async fn spawn(self: &Arc<Self>) -> String {
        let endpoint = self.clone();
        let app = axum::Router::new().route(
            "/oauth2/token",
            post(move |body: String| {
                let endpoint = endpoint.clone();
                async move { endpoint.answer(&body).await }
            }),
        );
        format!("http://{}/oauth2/token", spawn_axum(app).await)
    }

    async fn answer(&self, form: &str) -> (StatusCode, String) {
        self.hits.fetch_add(1, Ordering::SeqCst);
        let fields: Vec<&str> = form.split('&').collect();
        let expected = [
            "grant_type=client_credentials".to_owned(),
            format!("client_id={CLIENT_ID}"),
            format!("client_secret={CLIENT_SECRET}"),
        ];
        if !expected.iter().all(|f| fields.contains(&f.as_str())) {
            return (
                StatusCode::UNAUTHORIZED,
                r#"{"error":"invalid_client"}"#.into(),
            );
        }
        self.gate.acquire().await.unwrap().forget();
        if self.down.load(Ordering::SeqCst) {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                r#"{"error":"temporarily_unavailable"}"#.into(),
            );
        }
        let n = self.issued.fetch_add(1, Ordering::SeqCst) + 1;
        let body = serde_json::json!({
            "access_token": format!("tok-{n}"),
            "token_type": "Bearer",
            "expires_in": LIFETIME,
        });
        (StatusCode::OK, body.to_string())
    }

    fn open(&self, answers: usize) {
        self.gate.add_permits(answers);
    }
}

/// The built-in OAuth2 client-credentials fetcher (`upstream::ClientCredentials`, body
/// style, as this endpoint checks), counting its attempts.
struct ClientCredentials {
    inner: tower_gateway_auth::upstream::ClientCredentials,
    attempts: Arc<AtomicUsize>,
}

impl ClientCredentials {
    fn new(token_url: String) -> Self {
        ClientCredentials {
            inner: tower_gateway_auth::upstream::ClientCredentials::builder(
                token_url,
                CLIENT_ID,
                CLIENT_SECRET,
            )
            .auth(tower_gateway_auth::upstream::ClientAuth::Body)
            .build()
            .unwrap(),
            attempts: Arc::default(),
        }
    }
}

impl TokenFetcher for ClientCredentials {
    async fn fetch(&self) -> Result<Token, FetchError> {
        self.attempts.fetch_add(1, Ordering::SeqCst);
        self.inner.fetch().await
    }
}

fn clock() -> ManualClock {
    ManualClock::new(Timestamp::from_unix_secs(T0))
}

fn source(fetcher: ClientCredentials, clock: &ManualClock) -> RefreshingToken<ClientCredentials> {
    RefreshingToken::builder(fetcher)
        .name("test-idp")
        .clock(clock.clone())
        .build()
}

/// A gateway putting `tokens`' credential on requests for `provider`, in front of `upstream`.
async fn token_gateway<F: TokenFetcher>(
    provider: Provider,
    tokens: RefreshingToken<F>,
    upstream: std::net::SocketAddr,
) -> std::net::SocketAddr {
    spawn_service(
        ServiceBuilder::new()
            .map_request(support::with_identity)
            .layer(UpstreamAuthLayer::new(provider, tokens))
            .service(forward_to(upstream)),
    )
    .await
}

fn authorizations(seen: &Recorder) -> Vec<String> {
    seen.all()
        .iter()
        .map(|s| s.headers["authorization"].to_str().unwrap().to_owned())
        .collect()
}

#[tokio::test]
async fn a_hundred_requests_waiting_for_the_first_token_share_one_fetch() {
    let endpoint = TokenEndpoint::new();
    let fetcher = ClientCredentials::new(endpoint.spawn().await);
    let attempts = fetcher.attempts.clone();
    let (provider, seen) = spawn_upstream().await;
    let stack = ServiceBuilder::new()
        .map_request(support::with_identity)
        .layer(UpstreamAuthLayer::new(
            Provider::openai(),
            source(fetcher, &clock()),
        ))
        .service(forward_to(provider));

    // `call` asks the source synchronously, so once these hundred calls have returned,
    // every one of them is waiting on the fetch, which the closed gate holds in flight.
    let mut requests = JoinSet::new();
    for _ in 0..100 {
        let mut svc = stack.clone();
        ServiceExt::<Request<Full<Bytes>>>::ready(&mut svc)
            .await
            .unwrap();
        let req = Request::get("/v1/models")
            .body(Full::new(Bytes::new()))
            .unwrap();
        requests.spawn(svc.call(req));
    }
    assert_eq!(seen.count(), 0);
    endpoint.open(1);
    while let Some(response) = requests.join_next().await {
        let answer = read(response.unwrap().unwrap()).await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    assert_eq!(endpoint.hits.load(Ordering::SeqCst), 1);
    assert_eq!(attempts.load(Ordering::SeqCst), 1);
    assert_eq!(authorizations(&seen), vec!["Bearer tok-1"; 100]);
}

#[tokio::test]
async fn a_refresh_ahead_of_expiry_is_one_fetch_while_the_current_token_keeps_serving() {
    let endpoint = TokenEndpoint::new();
    let fetcher = ClientCredentials::new(endpoint.spawn().await);
    let attempts = fetcher.attempts.clone();
    let clock = clock();
    let tokens = source(fetcher, &clock);
    let (provider, seen) = spawn_upstream().await;
    let gateway = token_gateway(Provider::openai(), tokens.clone(), provider).await;
    let http = client();

    // Start-up: fetch the first token before serving.
    endpoint.open(1);
    assert_eq!(tokens.credential(None).await.unwrap().value(), "tok-1");

    // Within the 60 s margin: the first request starts a refresh, which the closed gate
    // holds; all hundred are served at once with the current token.
    clock.advance(Duration::from_secs(LIFETIME - 59));
    let mut requests = JoinSet::new();
    for _ in 0..100 {
        let http = http.clone();
        requests.spawn(async move { send(&http, get(gateway, "/v1/models", &[])).await.status });
    }
    while let Some(status) = requests.join_next().await {
        assert_eq!(status.unwrap(), StatusCode::OK);
    }
    assert_eq!(authorizations(&seen), vec!["Bearer tok-1"; 100]);

    // Past tok-1's expiry, the next request gets the refreshed token: it waits for the
    // fetch in flight or finds its result, and no other fetch was ever started.
    endpoint.open(1);
    clock.advance(Duration::from_secs(60));
    let answer = send(&http, get(gateway, "/v1/models", &[])).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(seen.last().headers["authorization"], "Bearer tok-2");
    assert_eq!(endpoint.hits.load(Ordering::SeqCst), 2);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn a_token_endpoint_that_hangs_up_gives_503_backs_off_and_forwards_nothing() {
    // An endpoint that hangs up on every connection. (A port released for the purpose
    // could be taken by another test's server meanwhile.)
    let broken = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}/oauth2/token", broken.local_addr().unwrap());
    tokio::spawn(async move {
        loop {
            let (connection, _) = broken.accept().await.unwrap();
            drop(connection);
        }
    });
    let fetcher = ClientCredentials::new(url);
    let attempts = fetcher.attempts.clone();
    let clock = clock();
    let (provider, seen) = spawn_upstream().await;
    let gateway = token_gateway(Provider::openai(), source(fetcher, &clock), provider).await;
    let http = client();

    let refused = |answer: &support::Answer| {
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(answer.json()["error"]["type"], "server_error");
        assert_eq!(
            answer.json()["error"]["code"],
            "upstream_credential_unavailable"
        );
        assert!(answer.headers.get("www-authenticate").is_none());
    };
    let with_client_key = [("authorization", "Bearer gw_client-key")];
    refused(&send(&http, get(gateway, "/v1/models", &with_client_key)).await);
    assert_eq!(attempts.load(Ordering::SeqCst), 1);

    // Within the backoff: refused at once, the endpoint is left alone.
    for _ in 0..5 {
        refused(&send(&http, get(gateway, "/v1/models", &with_client_key)).await);
    }
    assert_eq!(attempts.load(Ordering::SeqCst), 1);

    clock.advance(Duration::from_secs(5));
    refused(&send(&http, get(gateway, "/v1/models", &with_client_key)).await);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);
    assert_eq!(
        seen.count(),
        0,
        "nothing reaches the provider without a credential"
    );
}

#[tokio::test]
async fn a_failing_endpoint_recovers_and_an_expired_token_is_never_sent() {
    let endpoint = TokenEndpoint::new();
    endpoint.open(1000);
    endpoint.down.store(true, Ordering::SeqCst);
    let fetcher = ClientCredentials::new(endpoint.spawn().await);
    let attempts = fetcher.attempts.clone();
    let clock = clock();
    let (provider, seen) = spawn_upstream().await;
    let gateway = token_gateway(Provider::mistral(), source(fetcher, &clock), provider).await;
    let http = client();
    let status = |path: &'static str| {
        let http = http.clone();
        async move { send(&http, get(gateway, path, &[])).await.status }
    };

    assert_eq!(status("/a").await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(attempts.load(Ordering::SeqCst), 1);

    // Back up, and the backoff over: the next request fetches and is served.
    endpoint.down.store(false, Ordering::SeqCst);
    clock.advance(Duration::from_secs(5));
    assert_eq!(status("/b").await, StatusCode::OK);
    assert_eq!(attempts.load(Ordering::SeqCst), 2);

    // Down again. Inside the margin the refresh fails in the background and the still
    // valid token keeps serving…
    endpoint.down.store(true, Ordering::SeqCst);
    clock.advance(Duration::from_secs(LIFETIME - 30));
    assert_eq!(status("/c").await, StatusCode::OK);
    // …but once it has expired, requests are refused rather than sent with it.
    clock.advance(Duration::from_secs(31));
    assert_eq!(status("/d").await, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(status("/e").await, StatusCode::SERVICE_UNAVAILABLE);

    let paths: Vec<String> = seen.all().iter().map(|s| s.uri.to_string()).collect();
    assert_eq!(paths, ["/b", "/c"]);
    assert_eq!(authorizations(&seen), ["Bearer tok-1", "Bearer tok-1"]);
}

/// Asks a gateway using `source` once; what status the client got.
async fn status_with<F: TokenFetcher>(rec: &Recorder, source: RefreshingToken<F>) -> StatusCode {
    let svc = ServiceBuilder::new()
        .map_request(support::with_identity)
        .layer(UpstreamAuthLayer::new(Provider::bearer(), source))
        .service(rec.service());
    read(svc.oneshot(Request::new(())).await.unwrap())
        .await
        .status
}

#[tokio::test(start_paused = true)]
async fn a_hanging_panicking_or_useless_fetch_ends_in_503_not_a_hang() {
    let rec = Recorder::default();

    // Never answers: the fetch times out (Tokio's paused clock jumps the 10 s).
    let hanging = RefreshingToken::new(std::future::pending::<Result<Token, FetchError>>);
    assert_eq!(
        status_with(&rec, hanging).await,
        StatusCode::SERVICE_UNAVAILABLE
    );

    let panicking = RefreshingToken::new(|| async {
        if true {
            panic!("a bug in the fetcher");
        }
        Err::<Token, _>(FetchError::new("unreachable"))
    });
    assert_eq!(
        status_with(&rec, panicking).await,
        StatusCode::SERVICE_UNAVAILABLE
    );

    let expired = RefreshingToken::new(|| async {
        Ok::<_, FetchError>(Token::new(Credential::new("tok-dead")?, Duration::ZERO))
    });
    assert_eq!(
        status_with(&rec, expired).await,
        StatusCode::SERVICE_UNAVAILABLE
    );

    assert_eq!(rec.count(), 0);
}

#[tokio::test]
async fn the_built_in_fetcher_authenticates_with_basic_asks_scope_and_audience_and_never_quotes_its_secret()
 {
    use tower_gateway_auth::upstream::{ClientAuth, ClientCredentials as Builtin};
    let seen = Arc::new(std::sync::Mutex::new(Vec::<(String, String)>::new()));
    let record = seen.clone();
    let wrong = Arc::new(AtomicBool::new(false));
    let refuse = wrong.clone();
    let app = axum::Router::new().route(
        "/token",
        post(move |headers: http::HeaderMap, body: String| {
            let record = record.clone();
            let refuse = refuse.clone();
            async move {
                let auth = headers["authorization"].to_str().unwrap().to_owned();
                record.lock().unwrap().push((auth, body));
                if refuse.load(Ordering::SeqCst) {
                    return (
                        StatusCode::UNAUTHORIZED,
                        format!(r#"{{"error":"invalid_client","error_description":"{CLIENT_SECRET} is wrong"}}"#),
                    );
                }
                (
                    StatusCode::OK,
                    r#"{"access_token":"tok-basic","token_type":"bearer","expires_in":"120"}"#.into(),
                )
            }
        }),
    );
    let url = format!("http://{}/token", spawn_axum(app).await);
    let fetcher = Builtin::builder(&url, "my app", CLIENT_SECRET)
        .scope("https://cognitiveservices.azure.com/.default")
        .audience("https://api.example")
        .build()
        .unwrap();
    assert_eq!(fetcher.auth_kind(), ClientAuth::Basic);
    let token = fetcher.fetch().await.unwrap();
    assert_eq!(token.credential().value(), "tok-basic");
    assert_eq!(token.lifetime(), Duration::from_secs(120));
    let (auth, body) = seen.lock().unwrap()[0].clone();
    // RFC 6749 §2.3.1: the id and secret are form-encoded, then joined and base64-encoded.
    // base64("my%20app:client-secret-never-logged"), by Python's base64 module.
    assert_eq!(
        auth,
        "Basic bXklMjBhcHA6Y2xpZW50LXNlY3JldC1uZXZlci1sb2dnZWQ="
    );
    assert_eq!(
        body,
        "grant_type=client_credentials&scope=https%3A%2F%2Fcognitiveservices.azure.com%2F.default&audience=https%3A%2F%2Fapi.example"
    );
    assert!(
        !body.contains(CLIENT_SECRET),
        "Basic keeps the secret out of the body"
    );

    wrong.store(true, Ordering::SeqCst);
    let error = fetcher.fetch().await.unwrap_err().to_string();
    assert!(
        error.contains("401") && error.contains("invalid_client"),
        "{error}"
    );
    assert!(!error.contains(CLIENT_SECRET), "{error}");
    assert!(!format!("{fetcher:?}").contains(CLIENT_SECRET));

    // Down: an error naming the host, not a hang.
    let down = Builtin::builder("http://127.0.0.1:9/token", "id", "secret-2")
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let error = down.fetch().await.unwrap_err().to_string();
    assert!(error.contains("127.0.0.1"), "{error}");
    assert!(Builtin::builder("not a url", "id", "s").build().is_err());
}
