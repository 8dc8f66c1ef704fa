//! The upstream layer in a real gateway: client → gateway on loopback (the layers over a
//! forwarding proxy) → a recording provider stand-in on loopback. Each test checks exactly
//! what the provider received.

use crate::support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Request, Response, StatusCode};
use http_body_util::Full;
use support::{
    Recorder, client, forward_to, get, pairs, read, send, spawn_service, spawn_upstream, store_with,
};
use tokio::task::JoinSet;
use tower::{Service, ServiceBuilder, ServiceExt};
use tower_gateway_auth::inbound::KeySource;
use tower_gateway_auth::keys::{KeyId, KeyRecord, Metadata};
use tower_gateway_auth::rejection::{ErrorFormat, RejectionKind};
use tower_gateway_auth::store::{KeyStore, MemoryStore};
use tower_gateway_auth::upstream::{
    Credential, CredentialSource, KeyPool, PerIdentity, Provider, RefreshingToken, Token,
};
use tower_gateway_auth::{InboundApiKeyLayer, UpstreamAuthLayer};

/// A gateway on loopback: `upstream` over a proxy to a fresh recording provider.
async fn gateway<C: CredentialSource>(
    upstream: UpstreamAuthLayer<C>,
) -> (std::net::SocketAddr, Recorder) {
    let (provider, seen) = spawn_upstream().await;
    let stack = ServiceBuilder::new()
        .map_request(support::with_identity)
        .layer(upstream)
        .service(forward_to(provider));
    (spawn_service(stack).await, seen)
}

fn cred(secret: &str) -> Credential {
    Credential::new(secret).unwrap()
}

struct Case {
    provider: Provider,
    secret: &'static str,
    path: &'static str,
    sent: &'static [(&'static str, &'static str)],
    expected_uri: &'static str,
    expected: &'static [(&'static str, &'static str)],
}

#[tokio::test]
async fn each_preset_sends_exactly_its_headers_and_query() {
    let cases = [
        Case {
            provider: Provider::openai()
                .organization(HeaderValue::from_static("org-gateway"))
                .project(HeaderValue::from_static("proj_gateway")),
            secret: "sk-proj-upstream-1",
            path: "/v1/chat/completions",
            sent: &[
                ("authorization", "Bearer gw_client"),
                ("openai-organization", "org-client"),
                ("openai-project", "proj_client"),
                ("content-type", "application/json"),
                ("x-trace", "t1"),
            ],
            expected_uri: "/v1/chat/completions",
            expected: &[
                ("authorization", "Bearer sk-proj-upstream-1"),
                ("content-type", "application/json"),
                ("openai-organization", "org-gateway"),
                ("openai-project", "proj_gateway"),
                ("x-trace", "t1"),
            ],
        },
        Case {
            // The client may not choose which of the gateway key's accounts pays.
            provider: Provider::openai(),
            secret: "sk-upstream-2",
            path: "/v1/models",
            sent: &[
                ("authorization", "Bearer gw_client"),
                ("openai-organization", "org-client"),
            ],
            expected_uri: "/v1/models",
            expected: &[("authorization", "Bearer sk-upstream-2")],
        },
        Case {
            provider: Provider::anthropic(),
            secret: "sk-ant-api03-upstream",
            path: "/v1/messages",
            sent: &[
                ("x-api-key", "gw_client"),
                ("anthropic-beta", "prompt-caching-2024-07-31"),
            ],
            expected_uri: "/v1/messages",
            expected: &[
                ("anthropic-beta", "prompt-caching-2024-07-31"),
                ("anthropic-version", "2023-06-01"),
                ("x-api-key", "sk-ant-api03-upstream"),
            ],
        },
        Case {
            provider: Provider::anthropic(),
            secret: "sk-ant-api03-upstream",
            path: "/v1/messages",
            sent: &[
                ("authorization", "Bearer gw_client"),
                ("anthropic-version", "2023-01-01"),
            ],
            expected_uri: "/v1/messages",
            expected: &[
                ("anthropic-version", "2023-01-01"),
                ("x-api-key", "sk-ant-api03-upstream"),
            ],
        },
        Case {
            provider: Provider::gemini(),
            secret: "AIzaUpstream",
            path: "/v1beta/models/gemini-pro:streamGenerateContent?key=gw_client&alt=sse",
            sent: &[("x-goog-api-key", "gw_client")],
            expected_uri: "/v1beta/models/gemini-pro:streamGenerateContent?alt=sse",
            expected: &[("x-goog-api-key", "AIzaUpstream")],
        },
        Case {
            provider: Provider::gemini_query(),
            secret: "AIzaUpstream",
            path: "/v1beta/models/gemini-pro:streamGenerateContent?alt=sse",
            sent: &[("x-goog-api-key", "gw_client")],
            expected_uri: "/v1beta/models/gemini-pro:streamGenerateContent?alt=sse&key=AIzaUpstream",
            expected: &[],
        },
        Case {
            provider: Provider::azure().api_version("2024-10-21"),
            secret: "azure-upstream-key",
            path: "/openai/deployments/gpt-4o/chat/completions?api-version=2023-05-15&x=1",
            sent: &[("api-key", "gw_client")],
            expected_uri: "/openai/deployments/gpt-4o/chat/completions?x=1&api-version=2024-10-21",
            expected: &[("api-key", "azure-upstream-key")],
        },
        Case {
            provider: Provider::azure(),
            secret: "azure-upstream-key",
            path: "/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01",
            sent: &[("authorization", "Bearer gw_client")],
            expected_uri: "/openai/deployments/gpt-4o/chat/completions?api-version=2024-06-01",
            expected: &[("api-key", "azure-upstream-key")],
        },
        Case {
            provider: Provider::mistral(),
            secret: "mistral-upstream",
            path: "/v1/chat/completions",
            sent: &[("x-api-key", "gw_client")],
            expected_uri: "/v1/chat/completions",
            expected: &[("authorization", "Bearer mistral-upstream")],
        },
        Case {
            provider: Provider::cohere(),
            secret: "cohere-upstream",
            path: "/v2/chat",
            sent: &[("authorization", "Bearer gw_client")],
            expected_uri: "/v2/chat",
            expected: &[("authorization", "Bearer cohere-upstream")],
        },
        Case {
            provider: Provider::hugging_face(),
            secret: "hf_upstream",
            path: "/models/gpt2?wait_for_model=true",
            sent: &[("api-key", "gw_client")],
            expected_uri: "/models/gpt2?wait_for_model=true",
            expected: &[("authorization", "Bearer hf_upstream")],
        },
        Case {
            provider: "header:x-portkey-api-key".parse().unwrap(),
            secret: "pk-upstream",
            path: "/v1/x",
            sent: &[
                ("x-portkey-api-key", "client-own"),
                ("authorization", "Bearer gw_client"),
            ],
            expected_uri: "/v1/x",
            expected: &[("x-portkey-api-key", "pk-upstream")],
        },
        Case {
            provider: "query:api_key".parse().unwrap(),
            secret: "q-upstream",
            path: "/v1/x?api_key=client-own&key=gw_client&z=%7E",
            sent: &[],
            expected_uri: "/v1/x?z=%7E&api_key=q-upstream",
            expected: &[],
        },
    ];

    let http = client();
    for case in cases {
        let name = case.provider.name().to_owned();
        let (addr, seen) = gateway(UpstreamAuthLayer::new(case.provider, cred(case.secret))).await;
        let answer = send(&http, get(addr, case.path, case.sent)).await;
        assert_eq!(answer.status, StatusCode::OK, "{name}");
        assert_eq!(answer.text(), "upstream ok", "{name}");
        let received = seen.last();
        assert_eq!(received.uri, case.expected_uri, "{name}");
        assert_eq!(received.header_pairs(), pairs(case.expected), "{name}");
        assert!(!received.everything().contains("gw_client"), "{name}");
        assert!(!received.everything().contains("client-own"), "{name}");
        // And the provider's credential does not come back to the client.
        assert!(!format!("{:?}{}", answer.headers, answer.text()).contains(case.secret));
    }
}

/// Every preset, by its configuration name, with the upstream credential expected where.
fn every_preset() -> Vec<(Provider, Expect)> {
    [
        ("openai", Expect::Header("authorization", "Bearer ")),
        ("anthropic", Expect::Header("x-api-key", "")),
        ("gemini", Expect::Header("x-goog-api-key", "")),
        ("gemini-query", Expect::Query("key")),
        ("azure", Expect::Header("api-key", "")),
        ("mistral", Expect::Header("authorization", "Bearer ")),
        ("cohere", Expect::Header("authorization", "Bearer ")),
        ("huggingface", Expect::Header("authorization", "Bearer ")),
        ("bearer", Expect::Header("authorization", "Bearer ")),
        ("header:x-gateway-key", Expect::Header("x-gateway-key", "")),
        ("query:gw_key", Expect::Query("gw_key")),
    ]
    .into_iter()
    .map(|(name, expect)| (name.parse().unwrap(), expect))
    .collect()
}

#[derive(Clone, Copy)]
enum Expect {
    Header(&'static str, &'static str),
    Query(&'static str),
}

#[tokio::test]
async fn no_client_credential_reaches_the_upstream_whatever_the_preset() {
    const CLIENT_KEY: &str = "gw_matrix-client-key-0001";
    const UPSTREAM: &str = "upstream-secret-0002";
    // The inbound layer reads its own names and does not hide the key: the upstream layer
    // alone must take every copy out.
    let inbound = InboundApiKeyLayer::from_shared(store_with(&[("client", CLIENT_KEY, &[])]))
        .sources([
            KeySource::header(HeaderName::from_static("x-gateway-key")),
            KeySource::Bearer,
            KeySource::query("gw_key"),
        ])
        .hide_credentials(false);
    let bearer = format!("Bearer {CLIENT_KEY}");
    let everywhere: [(&str, &str); 5] = [
        ("authorization", &bearer),
        ("x-api-key", CLIENT_KEY),
        ("api-key", CLIENT_KEY),
        ("x-goog-api-key", CLIENT_KEY),
        ("x-gateway-key", CLIENT_KEY),
    ];
    let path = format!(
        "/v1/x?key={CLIENT_KEY}&keep=1&gw_key={CLIENT_KEY}&k%65y={CLIENT_KEY}&key={CLIENT_KEY}&also=%20"
    );

    let http = client();
    for (provider, expect) in every_preset() {
        let name = format!("{provider:?}");
        let (upstream_addr, seen) = spawn_upstream().await;
        let stack = ServiceBuilder::new()
            .layer(inbound.clone())
            .layer(UpstreamAuthLayer::new(provider, cred(UPSTREAM)).strip_inbound(&inbound))
            .service(forward_to(upstream_addr));
        let addr = spawn_service(stack).await;

        let answer = send(&http, get(addr, &path, &everywhere)).await;
        assert_eq!(answer.status, StatusCode::OK, "{name}: {}", answer.text());
        let received = seen.last();
        let text = received.everything();
        assert!(
            !text.contains(CLIENT_KEY),
            "{name} leaked the client key:\n{text}"
        );
        assert!(
            !text.contains("matrix-client"),
            "{name} leaked part of it:\n{text}"
        );
        let query = received.uri.query().unwrap();
        match expect {
            Expect::Header(header, prefix) => {
                assert_eq!(query, "keep=1&also=%20", "{name}");
                let values: Vec<_> = received.headers.get_all(header).iter().collect();
                assert_eq!(values, [format!("{prefix}{UPSTREAM}").as_str()], "{name}");
                // No other credential header survived.
                let left: Vec<_> = [
                    "authorization",
                    "x-api-key",
                    "api-key",
                    "x-goog-api-key",
                    "x-gateway-key",
                ]
                .into_iter()
                .filter(|h| *h != header && received.headers.contains_key(*h))
                .collect();
                assert!(left.is_empty(), "{name} kept {left:?}");
            }
            Expect::Query(param) => {
                assert_eq!(
                    query,
                    format!("keep=1&also=%20&{param}={UPSTREAM}"),
                    "{name}"
                );
                for header in [
                    "authorization",
                    "x-api-key",
                    "api-key",
                    "x-goog-api-key",
                    "x-gateway-key",
                ] {
                    assert!(
                        !received.headers.contains_key(header),
                        "{name} kept {header}"
                    );
                }
            }
        }
    }
}

#[tokio::test]
async fn query_placement_edge_cases_keep_every_other_byte() {
    // Reserved characters in the credential must not break the query apart.
    const SECRET: &str = "AIza+/=&?#%key~._-";
    const ENCODED: &str = "AIza%2B%2F%3D%26%3F%23%25key~._-";
    let (addr, seen) = gateway(UpstreamAuthLayer::new(
        Provider::gemini_query(),
        cred(SECRET),
    ))
    .await;
    let http = client();
    let cases = [
        ("/m", format!("/m?key={ENCODED}")),
        ("/m?", format!("/m?key={ENCODED}")),
        ("/m?key=client", format!("/m?key={ENCODED}")),
        ("/m?key=a&key=b&KEY=c", format!("/m?KEY=c&key={ENCODED}")),
        (
            "/m?a=1&a=2&key=x&a=3",
            format!("/m?a=1&a=2&a=3&key={ENCODED}"),
        ),
        (
            "/m?q=%E2%9C%93&x=a+b&y=%2f&&flag&key=x",
            format!("/m?q=%E2%9C%93&x=a+b&y=%2f&&flag&key={ENCODED}"),
        ),
        ("/m?%6Bey=sneaky&z", format!("/m?z&key={ENCODED}")),
    ];
    for (sent, expected) in cases {
        let answer = send(&http, get(addr, sent, &[])).await;
        assert_eq!(answer.status, StatusCode::OK, "{sent}");
        let received = seen.last();
        assert_eq!(received.uri, expected.as_str(), "{sent}");
        // What the provider decodes is exactly the credential.
        let raw = received.uri.query().unwrap().rsplit_once("key=").unwrap().1;
        let decoded = percent_encoding::percent_decode_str(raw)
            .decode_utf8()
            .unwrap();
        assert_eq!(decoded, SECRET);
    }

    // A header placement leaves the query alone unless it carries a client credential.
    let (addr, seen) = gateway(UpstreamAuthLayer::new(Provider::gemini(), cred("AIza1"))).await;
    for (sent, expected) in [
        ("/m?", "/m?"),
        ("/m?a=%2f&&b", "/m?a=%2f&&b"),
        ("/m?key=x", "/m"),
        ("/m?a=1&key=x&key=y&a=2", "/m?a=1&a=2"),
    ] {
        send(&http, get(addr, sent, &[])).await;
        assert_eq!(seen.last().uri, expected, "{sent}");
    }
}

#[tokio::test]
async fn a_pool_spreads_requests_evenly_over_its_keys() {
    let keys = ["sk-pool-a", "sk-pool-b", "sk-pool-c"];
    let pool = KeyPool::new(keys.map(cred)).unwrap();
    let (addr, seen) = gateway(UpstreamAuthLayer::new(Provider::openai(), pool)).await;
    let http = client();

    // In turn, one after the other…
    let mut order = Vec::new();
    for _ in 0..6 {
        send(&http, get(addr, "/v1/models", &[])).await;
        order.push(seen.last().headers["authorization"].clone());
    }
    let expected: Vec<_> = keys
        .iter()
        .cycle()
        .take(6)
        .map(|k| format!("Bearer {k}"))
        .collect();
    assert_eq!(order, expected);

    // …and evenly when many run at once.
    for _ in 0..3 {
        let mut batch = JoinSet::new();
        for _ in 0..98 {
            let http = http.clone();
            batch.spawn(async move { send(&http, get(addr, "/v1/models", &[])).await.status });
        }
        while let Some(status) = batch.join_next().await {
            assert_eq!(status.unwrap(), StatusCode::OK);
        }
    }
    let mut per_key: BTreeMap<String, usize> = BTreeMap::new();
    for received in seen.all() {
        let auth = received.headers["authorization"]
            .to_str()
            .unwrap()
            .to_owned();
        *per_key.entry(auth).or_default() += 1;
    }
    assert_eq!(
        per_key,
        keys.iter().map(|k| (format!("Bearer {k}"), 100)).collect()
    );
}

fn record_with(key: &str, store: &MemoryStore, tenant: Option<&str>) -> KeyId {
    let mut metadata = Metadata::new();
    if let Some(tenant) = tenant {
        metadata.insert("tenant".into(), tenant.into());
    }
    let id = KeyId::random();
    store.insert(
        KeyRecord::new(id, store.hasher().digest(key.as_bytes()))
            .with_name(key)
            .with_metadata(metadata),
    );
    id
}

#[tokio::test]
async fn per_identity_picks_by_key_then_tenant_then_fallback_else_refuses() {
    let store = Arc::new(MemoryStore::new());
    record_with("gw_alice", &store, Some("acme"));
    record_with("gw_bob", &store, Some("globex"));
    let carol = record_with("gw_carol", &store, Some("acme"));
    record_with("gw_dave", &store, Some("initech"));
    record_with("gw_erin", &store, None);

    let mapping = || {
        PerIdentity::new()
            .for_key(carol, cred("sk-carol-own"))
            .by_metadata("tenant")
            .for_value("acme", cred("sk-acme"))
            .for_value("globex", cred("sk-globex"))
    };
    let inbound = InboundApiKeyLayer::from_shared(store.clone()).allow_anonymous(true);
    let http = client();
    let who = |key: &'static str| -> Vec<(&'static str, &'static str)> {
        if key.is_empty() {
            vec![]
        } else {
            vec![("x-api-key", key)]
        }
    };

    // With a fallback, everyone gets a credential.
    let (provider, seen) = spawn_upstream().await;
    let with_fallback = spawn_service(
        ServiceBuilder::new()
            .layer(inbound.clone())
            .layer(UpstreamAuthLayer::new(
                Provider::anthropic(),
                mapping().fallback(cred("sk-shared")),
            ))
            .service(forward_to(provider)),
    )
    .await;
    for (key, expected) in [
        ("gw_alice", "sk-acme"),
        ("gw_bob", "sk-globex"),
        ("gw_carol", "sk-carol-own"), // her own key beats her tenant's
        ("gw_dave", "sk-shared"),
        ("gw_erin", "sk-shared"),
    ] {
        let answer = send(&http, get(with_fallback, "/v1/messages", &who(key))).await;
        assert_eq!(answer.status, StatusCode::OK, "{key}");
        let received = seen.last();
        assert_eq!(received.headers["x-api-key"], expected, "{key}");
        assert!(!received.everything().contains("gw_"), "{key}");
    }

    // An anonymous caller gets no credential, not even the fallback...
    let answer = send(&http, get(with_fallback, "/v1/messages", &[])).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        seen.count(),
        5,
        "the anonymous request reached the provider"
    );
    // ...unless the layer is told so: then the fallback is the anonymous caller's.
    let (provider, seen) = spawn_upstream().await;
    let public = spawn_service(
        ServiceBuilder::new()
            .layer(inbound.clone())
            .layer(
                UpstreamAuthLayer::new(
                    Provider::anthropic(),
                    mapping().fallback(cred("sk-shared")),
                )
                .credential_without_identity(true),
            )
            .service(forward_to(provider)),
    )
    .await;
    let answer = send(&http, get(public, "/v1/messages", &[])).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(seen.last().headers["x-api-key"], "sk-shared");

    // Without one, callers nothing fits are refused, in the configured dialect.
    let (provider, seen) = spawn_upstream().await;
    let strict = spawn_service(
        ServiceBuilder::new()
            .layer(
                tower_gateway_auth::RejectionLayer::new()
                    .error_format(ErrorFormat::Anthropic)
                    .realm("llm-gateway"),
            )
            .layer(inbound)
            .layer(UpstreamAuthLayer::new(Provider::anthropic(), mapping()))
            .service(forward_to(provider)),
    )
    .await;
    let answer = send(&http, get(strict, "/v1/messages", &who("gw_alice"))).await;
    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(seen.count(), 1);
    let answer = send(&http, get(strict, "/v1/messages", &[])).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "anonymous");
    assert_eq!(
        answer.json(),
        serde_json::json!({"type": "error", "error": {
            "type": "authentication_error",
            "message": "An API key is required for this route."
        }})
    );
    assert_eq!(
        answer.headers["www-authenticate"],
        "Bearer realm=\"llm-gateway\""
    );
    for key in ["gw_dave", "gw_erin"] {
        let answer = send(&http, get(strict, "/v1/messages", &who(key))).await;
        assert_eq!(answer.status, StatusCode::UNAUTHORIZED, "{key}");
        assert_eq!(
            answer.json(),
            serde_json::json!({"type": "error", "error": {
                "type": "authentication_error",
                "message": "No upstream credential is configured for this API key."
            }})
        );
        assert_eq!(
            answer.headers["www-authenticate"],
            "Bearer realm=\"llm-gateway\", error=\"invalid_token\""
        );
    }
    assert_eq!(seen.count(), 1, "refused requests never reach the provider");

    // gRPC clients get a gRPC status instead.
    let grpc = send(
        &http,
        get(
            strict,
            "/pkg.Svc/Call",
            &[
                ("x-api-key", "gw_dave"),
                ("content-type", "application/grpc"),
            ],
        ),
    )
    .await;
    assert_eq!(grpc.status, StatusCode::OK);
    assert_eq!(grpc.headers["grpc-status"], "16");
    assert!(grpc.body.is_empty());
    assert_eq!(seen.count(), 1);
}

/// An inner service that counts its clones.
#[derive(Debug)]
struct CountingClones {
    clones: Arc<AtomicUsize>,
    rec: Recorder,
}

impl Clone for CountingClones {
    fn clone(&self) -> Self {
        self.clones.fetch_add(1, Ordering::SeqCst);
        CountingClones {
            clones: self.clones.clone(),
            rec: self.rec.clone(),
        }
    }
}

impl<B> Service<Request<B>> for CountingClones {
    type Response = Response<Full<Bytes>>;
    type Error = std::convert::Infallible;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        Service::<Request<B>>::poll_ready(&mut self.rec.service(), cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.rec.service().call(req)
    }
}

#[tokio::test]
async fn ready_sources_cost_no_clone_and_waiting_ones_call_the_readied_service() {
    // A static credential is placed in `call`: the inner service is never cloned.
    let clones = Arc::new(AtomicUsize::new(0));
    let rec = Recorder::default();
    let mut svc = ServiceBuilder::new()
        .layer(UpstreamAuthLayer::new(Provider::openai(), cred("sk-fast")))
        .service(CountingClones {
            clones: clones.clone(),
            rec: rec.clone(),
        });
    for _ in 0..3 {
        let ready = ServiceExt::<Request<()>>::ready(&mut svc).await.unwrap();
        let answer = read(
            ready
                .call(support::with_identity(Request::new(())))
                .await
                .unwrap(),
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    assert_eq!(clones.load(Ordering::SeqCst), 0);
    assert_eq!(rec.count(), 3);
    assert_eq!(rec.last().headers["authorization"], "Bearer sk-fast");

    // A source that must wait: tower-test's mock panics if a clone that was not polled
    // ready is the one called.
    let source = RefreshingToken::new(|| async {
        tokio::task::yield_now().await;
        Ok(Token::new(
            Credential::new("tok-slow")?,
            std::time::Duration::from_secs(3600),
        ))
    });
    let (mock, mut handle) = tower_test::mock::pair::<Request<()>, Response<Full<Bytes>>>();
    let mut svc = ServiceBuilder::new()
        .layer(UpstreamAuthLayer::new(Provider::bearer(), source))
        .service(mock);
    handle.allow(1);
    let pending = svc
        .ready()
        .await
        .unwrap()
        .call(support::with_identity(Request::new(())));
    let answer = tokio::spawn(pending);
    let (req, respond) = handle.next_request().await.unwrap();
    assert_eq!(req.headers()["authorization"], "Bearer tok-slow");
    respond.send_response(Response::new(Full::new(Bytes::from_static(b"done"))));
    let answer = read(answer.await.unwrap().unwrap()).await;
    assert_eq!(answer.text(), "done");
}

#[tokio::test]
async fn a_source_refusal_kind_sets_the_status() {
    // A custom source's own rejection is answered as it says, and nothing is forwarded.
    struct Closed;
    impl CredentialSource for Closed {
        type Future = std::future::Ready<Result<Credential, tower_gateway_auth::Rejection>>;
        fn credential(&self, _: Option<&tower_gateway_auth::Identity>) -> Self::Future {
            std::future::ready(Err(tower_gateway_auth::Rejection::new(
                RejectionKind::UpstreamCredentialUnavailable,
                "Provider account suspended.",
            )))
        }
    }
    let (addr, seen) = gateway(UpstreamAuthLayer::new(Provider::openai(), Closed)).await;
    let answer = send(
        &client(),
        get(addr, "/v1/models", &[("authorization", "Bearer gw_x")]),
    )
    .await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(
        answer.json()["error"]["code"],
        "upstream_credential_unavailable"
    );
    assert_eq!(
        answer.json()["error"]["message"],
        "Provider account suspended."
    );
    assert!(answer.headers.get("www-authenticate").is_none());
    assert_eq!(seen.count(), 0);
}

#[test]
fn credentials_from_the_environment_fail_clearly() {
    // Cargo sets these for every test run, so no test has to touch the environment.
    let name = Credential::from_env("CARGO_PKG_NAME").unwrap();
    assert_eq!(name.value(), "tower-gateway-auth");

    let missing = Credential::from_env("TOWER_GATEWAY_AUTH_SURELY_UNSET").unwrap_err();
    assert!(missing.is_missing_variable());
    assert_eq!(
        missing.to_string(),
        "environment variable `TOWER_GATEWAY_AUTH_SURELY_UNSET` is not set"
    );
    let spaces = Credential::from_env("CARGO_PKG_DESCRIPTION").unwrap_err();
    assert_eq!(spaces.variable(), Some("CARGO_PKG_DESCRIPTION"));
    assert!(spaces.to_string().starts_with(
        "environment variable `CARGO_PKG_DESCRIPTION` holds characters a credential cannot have"
    ));
    assert!(
        !spaces.to_string().contains("Tower layers"),
        "never the value"
    );
    let empty = Credential::from_env("CARGO_PKG_HOMEPAGE").unwrap_err();
    assert_eq!(
        empty.to_string(),
        "environment variable `CARGO_PKG_HOMEPAGE` is empty"
    );
}

#[tokio::test]
async fn the_stripped_names_are_the_defaults_plus_the_inbound_ones() {
    let inbound = InboundApiKeyLayer::new(MemoryStore::new()).sources([
        KeySource::header(HeaderName::from_static("x-gw-key")),
        KeySource::Bearer,
        KeySource::query("apikey"),
        KeySource::query("key"),
    ]);
    let layer = UpstreamAuthLayer::new(Provider::openai(), cred("sk"))
        .strip_inbound(&inbound)
        .strip_header(HeaderName::from_static("proxy-authorization"))
        .strip_query("token");
    let headers: Vec<&str> = layer
        .stripped_headers()
        .iter()
        .map(|h| h.as_str())
        .collect();
    assert_eq!(
        headers,
        [
            "authorization",
            "x-api-key",
            "api-key",
            "x-goog-api-key",
            "x-gw-key",
            "proxy-authorization"
        ]
    );
    assert_eq!(
        layer.stripped_query().collect::<Vec<_>>(),
        ["key", "apikey", "token"]
    );

    let (addr, seen) = gateway(layer).await;
    send(
        &client(),
        get(
            addr,
            "/v1?apikey=1&token=2&ok=3",
            &[("proxy-authorization", "Basic x"), ("x-gw-key", "k")],
        ),
    )
    .await;
    let received = seen.last();
    assert_eq!(received.uri, "/v1?ok=3");
    assert_eq!(
        received.header_pairs(),
        pairs(&[("authorization", "Bearer sk")])
    );
}

// --- Issue 11, item 12: no identity, no provider credential -------------------------------

#[tokio::test]
async fn requests_let_through_without_an_identity_get_no_provider_credential() {
    let store = store_with(&[("client", "gw_client_key", &[])]);
    let inbound = InboundApiKeyLayer::from_shared(store)
        .allow_preflight(true)
        .allow_anonymous(true);
    let (provider, seen) = spawn_upstream().await;
    let addr = spawn_service(
        ServiceBuilder::new()
            .layer(inbound)
            .layer(UpstreamAuthLayer::new(
                Provider::openai(),
                cred("sk-provider"),
            ))
            .service(forward_to(provider)),
    )
    .await;
    let http = client();

    let preflight = Request::builder()
        .method("OPTIONS")
        .uri(format!("http://{addr}/v1/anything?x=1"))
        .header("origin", "https://evil.example")
        .header("access-control-request-method", "POST")
        .body(Full::new(Bytes::from_static(b"a body")))
        .unwrap();
    let anonymous = get(addr, "/v1/chat/completions", &[]);
    for (what, req) in [("preflight", preflight), ("anonymous", anonymous)] {
        let a = send(&http, req).await;
        assert_eq!(a.status, StatusCode::UNAUTHORIZED, "{what}: {}", a.text());
        assert_eq!(a.json()["error"]["type"], "invalid_request_error", "{what}");
        assert!(!a.text().contains("sk-provider"), "{what}");
    }
    assert_eq!(
        seen.count(),
        0,
        "a request without an identity reached the provider: {:?}",
        seen.all()
            .iter()
            .map(|s| s.everything())
            .collect::<Vec<_>>()
    );

    // A caller with a key still gets through.
    let a = send(
        &http,
        get(addr, "/v1/models", &[("x-api-key", "gw_client_key")]),
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(seen.last().headers["authorization"], "Bearer sk-provider");
}
