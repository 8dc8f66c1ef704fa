//! The cost of authentication per request, against the floor: `cargo bench --bench overhead`.
//!
//! Every function in group `inbound` handles the same pre-built requests: `Authorization:
//! Bearer` with one of 10,000 distinct valid keys, cycling. Futures are polled once with a
//! no-op waker: everything here completes synchronously, so no runtime cost is measured.
//!
//! - `bare`: the inner service alone.
//! - `tower_http_bearer`: tower-http's `ValidateRequestHeaderLayer::bearer`, one token.
//! - `floor`: SHA-256 of the presented key plus one lookup in a 1,000,000-entry `HashMap`
//!   keyed by digest, no service: the unavoidable work when keys are hashed at rest. It reads
//!   the key from the same requests, so it pays the same cache misses the others do.
//! - `inbound_1m`: `InboundApiKeyLayer` over a `MemoryStore` of 1,000,000 keys.
//! - `full_stack`: the reference gateway's route stack on the same store: inbound, then
//!   `UpstreamAuthLayer` (OpenAI preset, a fixed credential), then `HeaderInjectLayer` (a
//!   request id and an organization header).
//! - `full_stack_no_echo`: `full_stack` without echoing the request id, the stack 5e8137a's
//!   bench measured, for comparing with it.
//! - `tower_http_same_job`: tower-http's own layers doing the header work `full_stack` adds
//!   after the key check (`SetRequestHeader` overriding `authorization` with the provider
//!   credential and setting `openai-organization`, `SetRequestId` with its UUID maker,
//!   `PropagateRequestId`), no key check: the peer `full_stack − inbound_1m` is set against.
//! - `gateway_route`: `full_stack` inside the `RejectionLayer` every gateway route has, as
//!   `cargo run --example gateway` builds it (no `before` exists for it: the layers rendered
//!   their own rejections before there was a `RejectionLayer`).
//! - `access_log_filtered`: `AccessLogLayer` around `inbound_1m`, its target filtered out (no
//!   subscriber): what the layer costs when nobody reads the log.
//! - `jwt_cached`: the same layer given a `JwtVerifier` (a static RS256 key), 1,000 distinct
//!   RS256 user tokens cycling, each verified once and then served from the verifier's
//!   cache: the bar is at most 1.5 × `inbound_1m`, same run.
//! - `jwt_first`: every request a full RS256 verification (two tokens alternating in a
//!   cache of one).
//!
//! Benches build the crate with feature `metrics` (the dev-dependencies enable it), so the
//! cases above include the store-lookup timing, recorded into the facade's no-op recorder.
//! Then a Prometheus recorder (the gateway's exporter) is installed, process-wide, and:
//!
//! - `inbound_1m_prometheus`: `inbound_1m` again, its lookup histogram now recorded;
//! - `metrics_layer`: `MetricsLayer` (route name, no per-key labels) around that;
//! - `metrics_layer_per_key`: the same with per-key labels bounded at 1,000 (the 10,000 keys
//!   cycle, so most fold into `other`).

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{HeaderMap, Uri};
use sha2::{Digest, Sha256};
use tower::{Layer, ServiceBuilder};
use tower_gateway_auth::access_log::AccessLogLayer;
use tower_gateway_auth::keys::{KeyFormat, KeyHasher, KeyId, KeyRecord};
use tower_gateway_auth::metrics::MetricsLayer;
use tower_gateway_auth::store::MemoryStore;
use tower_gateway_auth::{InboundApiKeyLayer, RejectionLayer};

const STORE_KEYS: usize = 1_000_000;
/// Requests are built in batches small enough to stay in cache, as a request a server just
/// parsed is: larger batches would measure cache misses on the requests themselves.
const BATCH: BatchSize = BatchSize::NumIterations(256);
const ACTIVE_KEYS: usize = 10_000;

mod support;
use support::{
    Bare, FloorMap, bearer_request, floor_check, full_stack, full_stack_echoing, next, serve,
    tower_http_same_job,
};

struct Fixture {
    keys: Vec<String>,
    requests: Vec<(Uri, HeaderMap)>,
    store: MemoryStore,
}

fn fixture() -> Fixture {
    let format = KeyFormat::new("gw").unwrap();
    let keys: Vec<String> = (0..ACTIVE_KEYS)
        .map(|_| format.generate().expose().to_owned())
        .collect();
    let store = MemoryStore::new();
    let hasher = KeyHasher::sha256();
    for (i, key) in keys.iter().enumerate() {
        store.insert(
            KeyRecord::new(KeyId::random(), hasher.digest(key.as_bytes()))
                .with_name(format!("active-{i}")),
        );
    }
    for i in ACTIVE_KEYS..STORE_KEYS {
        let digest = hasher.digest(format!("filler-{i}").as_bytes());
        store.insert(KeyRecord::new(KeyId::random(), digest).with_name(format!("filler-{i}")));
    }
    let requests = keys.iter().map(|key| bearer_request(key)).collect();
    Fixture {
        keys,
        requests,
        store,
    }
}

fn inbound(c: &mut Criterion) {
    let f = fixture();
    let mut group = c.benchmark_group("inbound");

    let mut svc = Bare;
    let mut i = 0;
    group.bench_function("bare", |b| {
        b.iter_batched(
            || next(&f.requests, &mut i),
            |req| serve(&mut svc, req),
            BATCH,
        )
    });

    #[allow(deprecated)]
    let mut svc =
        tower_http::validate_request::ValidateRequestHeaderLayer::bearer(&f.keys[0]).layer(Bare);
    let mut i = 0;
    group.bench_function("tower_http_bearer", |b| {
        b.iter_batched(
            || next(&f.requests, &mut i),
            |req| serve(&mut svc, req),
            BATCH,
        )
    });

    let map: FloorMap = (0..STORE_KEYS as u32)
        .map(|i| {
            let key = match f.keys.get(i as usize) {
                Some(key) => key.clone(),
                None => format!("filler-{i}"),
            };
            (Sha256::digest(key.as_bytes()).into(), i)
        })
        .collect();
    let mut i = 0;
    group.bench_function("floor", |b| {
        b.iter_batched(
            || next(&f.requests, &mut i),
            |req| {
                floor_check(&map, &req);
                // Returned, so that dropping it falls outside the measurement: the floor is
                // the hash and the lookup only.
                req
            },
            BATCH,
        )
    });
    drop(map);

    let store = std::sync::Arc::new(f.store);
    assert_eq!(store.len(), STORE_KEYS);
    let mut svc = InboundApiKeyLayer::from_shared(store.clone()).layer(Bare);
    let mut i = 0;
    group.bench_function("inbound_1m", |b| {
        b.iter_batched(
            || next(&f.requests, &mut i),
            |req| assert_eq!(serve(&mut svc, req), 200),
            BATCH,
        )
    });

    let stack = full_stack(store.clone());
    let mut svc = stack.clone();
    let mut i = 0;
    group.bench_function("full_stack", |b| {
        b.iter_batched(
            || next(&f.requests, &mut i),
            |req| assert_eq!(serve(&mut svc, req), 200),
            BATCH,
        )
    });

    // The same stack without echoing the request id: what 5e8137a's `full_stack` did (it
    // could not echo), for the before-and-after of the redesign.
    let mut svc = full_stack_echoing(store.clone(), false);
    let mut i = 0;
    group.bench_function("full_stack_no_echo", |b| {
        b.iter_batched(
            || next(&f.requests, &mut i),
            |req| assert_eq!(serve(&mut svc, req), 200),
            BATCH,
        )
    });

    let mut svc = tower_http_same_job();
    let mut i = 0;
    group.bench_function("tower_http_same_job", |b| {
        b.iter_batched(
            || next(&f.requests, &mut i),
            |req| assert_eq!(serve(&mut svc, req), 200),
            BATCH,
        )
    });

    let (tokens, verifier) = jwt_fixture(1_000, 10_000);
    let mut svc = InboundApiKeyLayer::from_shared(store.clone())
        .tokens(verifier)
        .layer(Bare);
    // Each token verified once before measuring: the case is the cache.
    let mut i = 0;
    for _ in 0..tokens.len() {
        assert_eq!(serve(&mut svc, next(&tokens, &mut i)), 200);
    }
    group.bench_function("jwt_cached", |b| {
        b.iter_batched(
            || next(&tokens, &mut i),
            |req| assert_eq!(serve(&mut svc, req), 200),
            BATCH,
        )
    });
    let (two, verifier) = jwt_fixture(2, 1);
    let mut svc = InboundApiKeyLayer::from_shared(store.clone())
        .tokens(verifier)
        .layer(Bare);
    group.bench_function("jwt_first", |b| {
        b.iter_batched(
            || next(&two, &mut i),
            |req| assert_eq!(serve(&mut svc, req), 200),
            BatchSize::SmallInput,
        )
    });

    let mut svc = RejectionLayer::new().realm("gateway").layer(stack);
    group.bench_function("gateway_route", |b| {
        b.iter_batched(
            || next(&f.requests, &mut i),
            |req| assert_eq!(serve(&mut svc, req), 200),
            BATCH,
        )
    });

    assert!(
        !tracing::enabled!(target: tower_gateway_auth::access_log::TARGET, tracing::Level::INFO)
    );
    let mut svc = ServiceBuilder::new()
        .layer(AccessLogLayer::new().route("bench"))
        .layer(InboundApiKeyLayer::from_shared(store.clone()))
        .service(Bare);
    let mut i = 0;
    group.bench_function("access_log_filtered", |b| {
        b.iter_batched(
            || next(&f.requests, &mut i),
            |req| assert_eq!(serve(&mut svc, req), 200),
            BATCH,
        )
    });

    // From here on, every metric is recorded, as in the gateway with `metrics_listen`.
    let prometheus = metrics_exporter_prometheus::PrometheusBuilder::new()
        .install_recorder()
        .unwrap();
    let mut svc = InboundApiKeyLayer::from_shared(store.clone()).layer(Bare);
    let mut i = 0;
    group.bench_function("inbound_1m_prometheus", |b| {
        b.iter_batched(
            || next(&f.requests, &mut i),
            |req| assert_eq!(serve(&mut svc, req), 200),
            BATCH,
        )
    });
    for (name, layer) in [
        ("metrics_layer", MetricsLayer::new().route("bench")),
        (
            "metrics_layer_per_key",
            MetricsLayer::new().route("bench").per_key_labels(1_000),
        ),
    ] {
        let mut svc = ServiceBuilder::new()
            .layer(layer)
            .layer(InboundApiKeyLayer::from_shared(store.clone()))
            .service(Bare);
        let mut i = 0;
        // One request first, so that the metric checked below exists whichever functions a
        // filter (`scripts/bench_ratios.sh`) leaves to run.
        assert_eq!(serve(&mut svc, next(&f.requests, &mut i)), 200);
        group.bench_function(name, |b| {
            b.iter_batched(
                || next(&f.requests, &mut i),
                |req| assert_eq!(serve(&mut svc, req), 200),
                BATCH,
            )
        });
    }
    // The histograms were drained as they would be by a scrape: what was recorded is there.
    assert!(prometheus.render().contains("gateway_auth_requests_total"));
    group.finish();
}

/// `n` RS256 user tokens (requests carrying them) and a verifier with the key that signed
/// them, caching at most `cache` tokens.
fn jwt_fixture(
    n: usize,
    cache: usize,
) -> (Vec<(Uri, HeaderMap)>, tower_gateway_auth::jwt::JwtVerifier) {
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    let key =
        EncodingKey::from_rsa_pem(include_bytes!("../tests/fixtures/jwt/rsa1.key.pem")).unwrap();
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 24 * 3600;
    let requests = (0..n)
        .map(|i| {
            let claims = serde_json::json!({
                "iss": "https://login.example.test", "sub": format!("user-{i}"),
                "aud": "https://api.example.test", "exp": exp, "scope": "chat",
                "name": "Bench User", "org_id": "org-1",
            });
            let mut header = Header::new(Algorithm::RS256);
            header.kid = Some("k1".into());
            support::bearer_request(&encode(&header, &claims, &key).unwrap())
        })
        .collect();
    let verifier = tower_gateway_auth::jwt::JwtVerifier::builder()
        .issuer("https://login.example.test")
        .audience("https://api.example.test")
        .jwk(include_str!("../tests/fixtures/jwt/rsa1.jwk.json"))
        .metadata_claims(["org_id"])
        .cache_capacity(cache)
        .build()
        .unwrap();
    (requests, verifier)
}

criterion_group!(benches, inbound);
criterion_main!(benches);
