//! InboundApiKeyLayer behaviour, request by request: what the inner service receives, and
//! what a rejected client is told.

use crate::support;

use std::future::{Ready, ready};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, Request, Response, StatusCode};
use serde_json::json;
use support::{Recorder, read, store_with};
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_gateway_auth::clock::{ManualClock, Timestamp};
use tower_gateway_auth::inbound::KeySource;
use tower_gateway_auth::keys::{KeyDigest, KeyId, KeyRecord, KeyStatus};
use tower_gateway_auth::rejection::{ErrorFormat, RejectionKind};
use tower_gateway_auth::store::{BoxLookup, KeyStore, LookupResult, MemoryStore, StoreError};
use tower_gateway_auth::{InboundApiKeyLayer, RejectionLayer, RequireScopesLayer};

const KEY: &str = "gw_test-key-0001";

fn req(uri: &str, headers: &[(&str, &str)]) -> Request<()> {
    let mut r = Request::builder().uri(uri);
    for (k, v) in headers {
        r = r.header(*k, *v);
    }
    r.body(()).unwrap()
}

async fn call<K>(layer: InboundApiKeyLayer<K>, rec: &Recorder, r: Request<()>) -> support::Answer
where
    K: KeyStore,
{
    call_in(RejectionLayer::new(), layer, rec, r).await
}

/// [`call`], with the rejections rendered by `responder`.
async fn call_in<K>(
    responder: RejectionLayer,
    layer: InboundApiKeyLayer<K>,
    rec: &Recorder,
    r: Request<()>,
) -> support::Answer
where
    K: KeyStore,
    K::Lookup: Unpin,
{
    let svc = ServiceBuilder::new()
        .layer(responder)
        .layer(layer)
        .service(rec.service());
    read(svc.oneshot(r).await.unwrap()).await
}

fn dialect(format: ErrorFormat) -> RejectionLayer {
    RejectionLayer::new().error_format(format)
}

fn layer() -> InboundApiKeyLayer<Arc<MemoryStore>> {
    InboundApiKeyLayer::new(store_with(&[("alice", KEY, &["chat"])]))
}

#[tokio::test]
async fn a_valid_key_reaches_the_inner_service_as_an_identity_and_is_removed() {
    let rec = Recorder::default();
    let a = call(
        layer(),
        &rec,
        req("/v1/x?a=1", &[("x-api-key", KEY), ("x-other", "kept")]),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let seen = rec.last();
    let who = seen.identity.expect("identity in extensions");
    assert_eq!(who.name(), "alice");
    assert!(who.has_scope("chat"));
    assert!(
        seen.headers.get("x-api-key").is_none(),
        "credential reached the inner service"
    );
    assert_eq!(seen.headers["x-other"], "kept");
    assert_eq!(seen.uri, "/v1/x?a=1");
}

#[tokio::test]
async fn bearer_scheme_is_matched_case_insensitively() {
    for value in [
        format!("Bearer {KEY}"),
        format!("bearer {KEY}"),
        format!("BEARER  {KEY} "),
    ] {
        let rec = Recorder::default();
        let a = call(layer(), &rec, req("/", &[("authorization", &value)])).await;
        assert_eq!(a.status, StatusCode::OK, "{value}");
        assert!(rec.last().headers.get("authorization").is_none());
    }
}

#[tokio::test]
async fn a_query_key_is_decoded_and_removed_with_every_other_byte_kept() {
    let rec = Recorder::default();
    let layer = layer().sources([KeySource::query("key")]);
    let encoded = KEY.replace('_', "%5F");
    let uri = format!("/p?z=%2F%20&key={encoded}&b=c+d&&e");
    let a = call(layer, &rec, req(&uri, &[])).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(rec.last().uri, "/p?z=%2F%20&b=c+d&&e");

    let rec = Recorder::default();
    let a = call(layer_query(), &rec, req(&format!("/p?key={KEY}"), &[])).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(rec.last().uri, "/p", "an emptied query leaves no `?`");
}

fn layer_query() -> InboundApiKeyLayer<Arc<MemoryStore>> {
    layer().sources([KeySource::query("key")])
}

#[tokio::test]
async fn hide_credentials_can_be_turned_off() {
    let rec = Recorder::default();
    let layer = layer().hide_credentials(false);
    call(layer, &rec, req("/", &[("x-api-key", KEY)])).await;
    assert_eq!(rec.last().headers["x-api-key"], KEY);
}

#[tokio::test]
async fn no_key_gets_a_bearer_challenge_without_an_error_code() {
    let rec = Recorder::default();
    let a = call_in(
        RejectionLayer::new().realm("gateway"),
        layer(),
        &rec,
        req("/", &[]),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.headers["www-authenticate"], "Bearer realm=\"gateway\"");
    let body = a.json();
    assert_eq!(body["error"]["code"], serde_json::Value::Null);
    let message = body["error"]["message"].as_str().unwrap();
    assert!(message.contains("x-api-key header"), "{message}");
    assert!(message.contains("Bearer"), "{message}");
    assert_eq!(rec.count(), 0);
}

#[tokio::test]
async fn an_unknown_key_is_invalid_token() {
    let rec = Recorder::default();
    let a = call(layer(), &rec, req("/", &[("x-api-key", "gw_wrong")])).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        a.headers["www-authenticate"],
        "Bearer realm=\"api\", error=\"invalid_token\""
    );
    assert_eq!(
        a.json(),
        json!({"error":{"message":"Invalid API key.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}})
    );
    assert_eq!(rec.count(), 0);
}

#[tokio::test]
async fn ambiguous_credentials_are_rejected_and_never_resolved() {
    let cases: Vec<(&str, Vec<(&str, &str)>)> = vec![
        ("/", vec![("x-api-key", KEY), ("x-api-key", "gw_other")]),
        (
            "/",
            vec![("x-api-key", KEY), ("authorization", "Bearer gw_other")],
        ),
        ("/?key=a&key=b", vec![]),
        ("/?key=gw_other", vec![("x-api-key", KEY)]),
    ];
    for (uri, headers) in cases {
        let rec = Recorder::default();
        let layer = layer()
            .sources(["header:x-api-key", "bearer", "query:key"].map(|s| s.parse().unwrap()));
        let a = call(layer, &rec, req(uri, &headers)).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{uri} {headers:?}");
        assert_eq!(
            a.headers["www-authenticate"],
            "Bearer realm=\"api\", error=\"invalid_request\""
        );
        assert!(
            a.json()["error"]["message"]
                .as_str()
                .unwrap()
                .contains("exactly one")
        );
        assert_eq!(rec.count(), 0);
    }
}

#[tokio::test]
async fn the_same_key_in_several_places_is_accepted_and_removed_everywhere() {
    let rec = Recorder::default();
    let layer =
        layer().sources(["header:x-api-key", "bearer", "query:key"].map(|s| s.parse().unwrap()));
    let bearer = format!("Bearer {KEY}");
    let a = call(
        layer,
        &rec,
        req(
            &format!("/?key={KEY}&q=1"),
            &[("x-api-key", KEY), ("authorization", &bearer)],
        ),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let seen = rec.last();
    assert!(seen.headers.get("x-api-key").is_none());
    assert!(seen.headers.get("authorization").is_none());
    assert_eq!(seen.uri, "/?q=1");
}

#[tokio::test]
async fn malformed_credentials_get_400_and_never_reach_the_inner_service() {
    let long = "k".repeat(1025);
    let cases: Vec<Vec<(&str, &[u8])>> = vec![
        vec![("authorization", b"Bearer")],
        vec![("authorization", b"Bearer two tokens")],
        vec![("x-api-key", b"has space")],
        vec![("x-api-key", b"caf\xc3\xa9")],
        vec![("x-api-key", b"\x80\x81")],
        vec![("x-api-key", long.as_bytes())],
    ];
    for headers in cases {
        let rec = Recorder::default();
        let mut r = Request::builder().uri("/");
        for (k, v) in &headers {
            r = r.header(*k, http::HeaderValue::from_bytes(v).unwrap());
        }
        let a = call(layer(), &rec, r.body(()).unwrap()).await;
        assert_eq!(a.status, StatusCode::BAD_REQUEST, "{headers:?}");
        assert_eq!(rec.count(), 0);
    }
}

/// Counts lookups, to show what never reaches the store.
struct Counting<K> {
    inner: K,
    lookups: Arc<AtomicUsize>,
}

impl<K: KeyStore> KeyStore for Counting<K> {
    type Lookup = K::Lookup;
    fn lookup(&self, digest: &KeyDigest) -> Self::Lookup {
        self.lookups.fetch_add(1, Ordering::SeqCst);
        self.inner.lookup(digest)
    }
}

#[tokio::test]
async fn an_oversized_key_is_rejected_before_any_store_call() {
    let lookups = Arc::new(AtomicUsize::new(0));
    let store = Counting {
        inner: MemoryStore::new(),
        lookups: lookups.clone(),
    };
    let rec = Recorder::default();
    let layer = InboundApiKeyLayer::new(store).max_key_len(64);
    let a = call(
        layer.clone(),
        &rec,
        req("/", &[("x-api-key", &"a".repeat(65))]),
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_REQUEST);
    assert_eq!(a.json()["error"]["code"], "api_key_too_long");
    let a = call(layer, &rec, req("/", &[("x-api-key", &"a".repeat(64))])).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        lookups.load(Ordering::SeqCst),
        1,
        "only the 64-byte key was looked up"
    );
}

#[tokio::test]
async fn expired_revoked_disabled_and_not_yet_valid_keys_each_say_why() {
    let t = Timestamp::from_unix_secs;
    let clock = ManualClock::new(t(1_000));
    let store = MemoryStore::new();
    let add = |key: &str, f: &dyn Fn(KeyRecord) -> KeyRecord| {
        let digest = store.hasher().digest(key.as_bytes());
        store.insert(f(KeyRecord::new(KeyId::random(), digest)));
    };
    add("k-expired", &|r| r.with_expires_at(Some(t(1_000))));
    add("k-future", &|r| r.with_not_before(Some(t(1_001))));
    add("k-revoked", &|r| r.with_status(KeyStatus::Revoked));
    add("k-disabled", &|r| r.with_status(KeyStatus::Disabled));
    add("k-good", &|r| {
        r.with_not_before(Some(t(1_000)))
            .with_expires_at(Some(t(1_001)))
    });
    let layer = InboundApiKeyLayer::new(store).clock(clock.clone());
    for (key, code) in [
        ("k-expired", "expired_api_key"),
        ("k-future", "api_key_not_yet_valid"),
        ("k-revoked", "revoked_api_key"),
        ("k-disabled", "disabled_api_key"),
    ] {
        let rec = Recorder::default();
        let a = call(layer.clone(), &rec, req("/", &[("x-api-key", key)])).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{key}");
        assert_eq!(a.json()["error"]["code"], code);
        assert_eq!(rec.count(), 0);
    }
    let rec = Recorder::default();
    assert_eq!(
        call(layer.clone(), &rec, req("/", &[("x-api-key", "k-good")]))
            .await
            .status,
        200
    );
    clock.advance(Duration::from_secs(1));
    assert_eq!(
        call(layer.clone(), &rec, req("/", &[("x-api-key", "k-good")]))
            .await
            .status,
        401
    );
    assert_eq!(
        call(layer, &rec, req("/", &[("x-api-key", "k-future")]))
            .await
            .status,
        200
    );
}

#[tokio::test]
async fn missing_scopes_get_403_insufficient_scope() {
    let rec = Recorder::default();
    let a = call(
        layer().require_scopes(["admin"]),
        &rec,
        req("/", &[("x-api-key", KEY)]),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(
        a.headers["www-authenticate"],
        "Bearer realm=\"api\", error=\"insufficient_scope\", scope=\"admin\""
    );
    assert_eq!(rec.count(), 0);
    let a = call(
        layer().require_scopes(["chat"]),
        &rec,
        req("/", &[("x-api-key", KEY)]),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
}

#[tokio::test]
async fn per_route_scopes_with_require_scopes_layer() {
    let rec = Recorder::default();
    let svc = ServiceBuilder::new()
        .layer(dialect(ErrorFormat::Anthropic))
        .layer(layer())
        .layer(RequireScopesLayer::new(["admin"]))
        .service(rec.service());
    let a = read(
        svc.clone()
            .oneshot(req("/", &[("x-api-key", KEY)]))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(a.json()["error"]["type"], "permission_error");
    assert_eq!(rec.count(), 0);

    // Without the inbound layer in front, there is no identity: 401, not a pass.
    let bare = ServiceBuilder::new()
        .layer(RequireScopesLayer::new(["admin"]))
        .service(rec.service());
    let a = read(bare.oneshot(req("/", &[])).await.unwrap()).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(rec.count(), 0);
}

/// A store that always fails, or never answers.
#[derive(Clone)]
enum Broken {
    Fails,
    Hangs,
}

impl KeyStore for Broken {
    type Lookup = BoxLookup;
    fn lookup(&self, _: &KeyDigest) -> BoxLookup {
        match self {
            Broken::Fails => Box::pin(async { Err(StoreError::new("connection refused")) }),
            Broken::Hangs => Box::pin(std::future::pending()),
        }
    }
}

#[tokio::test]
async fn a_failing_store_fails_closed_with_503() {
    let rec = Recorder::default();
    let a = call(
        InboundApiKeyLayer::new(Broken::Fails),
        &rec,
        req("/", &[("x-api-key", KEY)]),
    )
    .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(a.headers.get("www-authenticate").is_none());
    assert_eq!(a.json()["error"]["type"], "server_error");
    assert_eq!(rec.count(), 0);
}

#[tokio::test(start_paused = true)]
async fn a_store_that_hangs_times_out_with_503() {
    let rec = Recorder::default();
    let layer =
        InboundApiKeyLayer::new(Broken::Hangs).store_timeout(Some(Duration::from_millis(250)));
    let a = call(layer, &rec, req("/", &[("x-api-key", KEY)])).await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(rec.count(), 0);
}

#[tokio::test]
async fn the_identity_header_is_set_and_a_spoofed_copy_never_passes() {
    let consumer = HeaderName::from_static("x-consumer-id");
    let rec = Recorder::default();
    let layer = layer()
        .identity_header(consumer.clone())
        .allow_anonymous(true);
    call(
        layer.clone(),
        &rec,
        req("/", &[("x-api-key", KEY), ("x-consumer-id", "key_admin")]),
    )
    .await;
    let seen = rec.last();
    let id = seen.identity.unwrap().id().to_string();
    let values: Vec<_> = seen.headers.get_all(&consumer).iter().collect();
    assert_eq!(values, [id.as_str()]);

    call(layer, &rec, req("/", &[("x-consumer-id", "key_admin")])).await;
    let seen = rec.last();
    assert!(seen.identity.is_none());
    assert!(
        seen.headers.get(&consumer).is_none(),
        "a spoofed identity reached the inner service"
    );
}

#[tokio::test]
async fn anonymous_mode_passes_keyless_requests_but_still_rejects_bad_keys() {
    let rec = Recorder::default();
    let layer = layer().allow_anonymous(true);
    assert_eq!(call(layer.clone(), &rec, req("/", &[])).await.status, 200);
    assert!(rec.last().identity.is_none());
    assert_eq!(
        call(layer.clone(), &rec, req("/", &[("x-api-key", "nope")]))
            .await
            .status,
        401
    );
    assert_eq!(
        call(layer, &rec, req("/", &[("authorization", "Bearer")]))
            .await
            .status,
        400
    );
    assert_eq!(rec.count(), 1);
}

#[tokio::test]
async fn preflight_passes_only_when_allowed() {
    let preflight = || {
        Request::builder()
            .method("OPTIONS")
            .uri("/")
            .header("origin", "https://app.example")
            .header("access-control-request-method", "POST")
            .body(())
            .unwrap()
    };
    let rec = Recorder::default();
    assert_eq!(call(layer(), &rec, preflight()).await.status, 401);
    assert_eq!(
        call(layer().allow_preflight(true), &rec, preflight())
            .await
            .status,
        200
    );
    // A plain OPTIONS without the preflight headers still needs a key.
    let plain = Request::builder()
        .method("OPTIONS")
        .uri("/")
        .body(())
        .unwrap();
    assert_eq!(
        call(layer().allow_preflight(true), &rec, plain)
            .await
            .status,
        401
    );
    assert_eq!(rec.count(), 1);
}

#[tokio::test]
async fn every_dialect_and_a_custom_responder() {
    let rec = Recorder::default();
    let bad = || req("/", &[("x-api-key", "wrong")]);
    let a = call_in(dialect(ErrorFormat::Anthropic), layer(), &rec, bad()).await;
    assert_eq!(
        a.json(),
        json!({"type":"error","error":{"type":"authentication_error","message":"Invalid API key."}})
    );
    let a = call_in(dialect(ErrorFormat::CodeMsg), layer(), &rec, bad()).await;
    assert_eq!(a.json(), json!({"code":-1,"msg":"Invalid API key."}));
    let a = call_in(dialect(ErrorFormat::Problem), layer(), &rec, bad()).await;
    assert_eq!(a.headers["content-type"], "application/problem+json");
    assert_eq!(a.json()["detail"], "Invalid API key.");
    let custom = ErrorFormat::custom(|r| {
        let text = if r.kind() == RejectionKind::InvalidKey {
            "go away"
        } else {
            "other"
        };
        Response::builder()
            .status(r.status())
            .body(Bytes::from(text))
            .unwrap()
    });
    let a = call_in(dialect(custom), layer(), &rec, bad()).await;
    assert_eq!((a.status, a.text()), (StatusCode::UNAUTHORIZED, "go away"));
    assert!(a.headers.contains_key("www-authenticate"));
    assert_eq!(rec.count(), 0);
}

#[tokio::test]
async fn grpc_requests_get_a_trailers_only_status() {
    let rec = Recorder::default();
    let grpc = |key: &str| {
        req(
            "/grpc.health.v1.Health/Check",
            &[("content-type", "application/grpc"), ("x-api-key", key)],
        )
    };
    let a = call(layer(), &rec, grpc("wrong")).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(a.headers["grpc-status"], "16");
    assert_eq!(a.headers["grpc-message"], "Invalid API key.");
    assert!(a.body.is_empty());
    let a = call(layer().require_scopes(["admin"]), &rec, grpc(KEY)).await;
    assert_eq!(a.headers["grpc-status"], "7");
    let a = call(InboundApiKeyLayer::new(Broken::Fails), &rec, grpc(KEY)).await;
    assert_eq!(a.headers["grpc-status"], "14");
    assert_eq!(rec.count(), 0);
}

/// A store whose lookups complete on the second poll, so the layer must keep the request
/// and the readied inner service in its future.
struct Slow(Arc<MemoryStore>);

impl KeyStore for Slow {
    type Lookup = BoxLookup;
    fn lookup(&self, digest: &KeyDigest) -> BoxLookup {
        let found = self.0.lookup_now(digest);
        Box::pin(async move {
            tokio::task::yield_now().await;
            Ok(found)
        })
    }
}

#[tokio::test]
async fn the_readied_inner_service_is_the_one_called() {
    // tower-test's mock panics when a clone that was not polled ready is called.
    let (mock, mut handle) =
        tower_test::mock::pair::<Request<()>, Response<http_body_util::Full<Bytes>>>();
    let store = store_with(&[("alice", KEY, &[])]);
    let mut svc = ServiceBuilder::new()
        .layer(InboundApiKeyLayer::new(Slow(store)))
        .service(mock);
    handle.allow(1);
    svc.ready().await.unwrap();
    let future = svc.call(req("/", &[("x-api-key", KEY)]));
    let serve = tokio::spawn(async move {
        let (request, respond) = handle.next_request().await.unwrap();
        assert!(request.headers().get("x-api-key").is_none());
        assert!(
            request
                .extensions()
                .get::<tower_gateway_auth::Identity>()
                .is_some()
        );
        respond.send_response(Response::new(http_body_util::Full::new(
            Bytes::from_static(b"hi"),
        )));
    });
    let a = read(future.await.unwrap()).await;
    serve.await.unwrap();
    assert_eq!((a.status, a.text()), (StatusCode::OK, "hi"));
}

#[tokio::test]
async fn a_store_that_answers_for_another_digest_is_not_trusted() {
    struct Liar(Arc<KeyRecord>);
    impl KeyStore for Liar {
        type Lookup = Ready<LookupResult>;
        fn lookup(&self, _: &KeyDigest) -> Self::Lookup {
            ready(Ok(Some(self.0.clone())))
        }
    }
    let digest = MemoryStore::new().hasher().digest(b"the real key");
    let liar = Liar(Arc::new(KeyRecord::new(KeyId::random(), digest)));
    let rec = Recorder::default();
    let a = call(
        InboundApiKeyLayer::new(liar),
        &rec,
        req("/", &[("x-api-key", "another-key")]),
    )
    .await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(rec.count(), 0);
}

#[tokio::test]
async fn every_refusal_carries_its_typed_rejection_and_the_layer_outside_renders_it() {
    use tower_gateway_auth::upstream::{Credential, Provider};
    use tower_gateway_auth::{Rejection, UpstreamAuthLayer};
    let rec = Recorder::default();
    let stack = || {
        ServiceBuilder::new()
            .layer(dialect(ErrorFormat::Anthropic).realm("edge"))
            .layer(layer().allow_anonymous(true))
            .layer(RequireScopesLayer::new(["chat"]))
            .layer(UpstreamAuthLayer::new(
                Provider::openai(),
                Credential::new("sk-up").unwrap(),
            ))
            .service(rec.service())
    };
    // Refused by the inbound layer, by the scope layer (anonymous: no identity), and passed.
    for (headers, kind) in [
        (
            vec![("x-api-key", "wrong")],
            Some(RejectionKind::InvalidKey),
        ),
        (vec![], Some(RejectionKind::MissingKey)),
        (vec![("x-api-key", KEY)], None),
    ] {
        let response = stack().oneshot(req("/", &headers)).await.unwrap();
        let why = response
            .extensions()
            .get::<Rejection>()
            .map(Rejection::kind);
        assert_eq!(why, kind);
        if kind.is_some() {
            assert!(
                response.headers()["www-authenticate"]
                    .to_str()
                    .unwrap()
                    .contains("realm=\"edge\"")
            );
            let a = read(response).await;
            assert_eq!(
                a.json()["type"],
                "error",
                "Anthropic's dialect: {}",
                a.text()
            );
        }
    }
    assert_eq!(rec.count(), 1, "only the accepted request went in");
}
