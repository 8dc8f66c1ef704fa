//! No key, digest, pepper or upstream credential ever shows up in a log line, a `Debug`
//! print or an answer to the client.

#[path = "it/support/mod.rs"]
mod support;

use std::sync::Arc;

use http::{HeaderName, HeaderValue, Request};
use support::{Recorder, read};
use tower::{ServiceBuilder, ServiceExt};
use tower_gateway_auth::inject::HeaderRule;
use tower_gateway_auth::keys::{KeyDigest, KeyHasher, KeyId, KeyRecord, KeyStatus, Metadata};
use tower_gateway_auth::store::{BoxLookup, KeyStore, MemoryStore, StoreError};
use tower_gateway_auth::upstream::{
    Credential, CredentialSource, FetchError, KeyPool, PerIdentity, Provider, RefreshingToken,
    Token, TokenFetcher,
};
use tower_gateway_auth::{HeaderInjectLayer, InboundApiKeyLayer, UpstreamAuthLayer};

struct Failing;

impl KeyStore for Failing {
    type Lookup = BoxLookup;
    fn lookup(&self, _: &KeyDigest) -> BoxLookup {
        Box::pin(async { Err(StoreError::new("redis unreachable")) })
    }
}

#[tokio::test]
async fn logs_and_debug_prints_name_keys_only_by_id_or_fingerprint() {
    let (logs, _guard) = support::capture_logs();

    let pepper = b"pepper-that-must-stay-secret";
    let store = Arc::new(MemoryStore::with_hasher(KeyHasher::with_pepper(pepper)));
    let good = "gw_good-secret-key";
    let revoked = "gw_revoked-secret-key";
    let unknown = "gw_unknown-secret-key";
    let good_record = store.insert(
        KeyRecord::new(KeyId::random(), store.hasher().digest(good.as_bytes())).with_name("good"),
    );
    let revoked_record = store.insert(
        KeyRecord::new(KeyId::random(), store.hasher().digest(revoked.as_bytes()))
            .with_status(KeyStatus::Revoked),
    );
    let layer = InboundApiKeyLayer::from_shared(store.clone())
        .identity_header(HeaderName::from_static("x-consumer-id"));
    let rec = Recorder::default();
    let svc = ServiceBuilder::new()
        .layer(layer.clone())
        .service(rec.service());
    for key in [good, revoked, unknown] {
        let req = Request::builder()
            .header("x-api-key", key)
            .body(())
            .unwrap();
        read(svc.clone().oneshot(req).await.unwrap()).await;
    }
    let failing = ServiceBuilder::new()
        .layer(InboundApiKeyLayer::new(Failing))
        .service(rec.service());
    let req = Request::builder()
        .header("authorization", format!("Bearer {good}"))
        .body(())
        .unwrap();
    let failed = read(failing.oneshot(req).await.unwrap()).await;

    let identity = rec.last().identity.unwrap();
    let debug = format!(
        "{identity:?} {good_record:?} {revoked_record:?} {store:?} {layer:?} {:?} {:?}",
        store.hasher(),
        store.hasher().digest(good.as_bytes()),
    );
    let logs = logs.text();
    let unknown_digest = store.hasher().digest(unknown.as_bytes());

    for (what, text) in [
        ("logs", &logs),
        ("debug", &debug),
        ("503 body", &failed.text().to_owned()),
    ] {
        for secret in [good, revoked, unknown, "pepper-that-must-stay-secret"] {
            assert!(!text.contains(secret), "{what} hold a secret: {text}");
        }
        for digest in [
            good_record.digest(),
            revoked_record.digest(),
            &unknown_digest,
        ] {
            assert!(
                !text.contains(&digest.to_hex()),
                "{what} hold a digest: {text}"
            );
            assert!(
                !text.contains(&digest.to_hex()[..16]),
                "{what} hold part of a digest: {text}"
            );
        }
    }
    // What the logs do say: which key, by id or fingerprint, and why.
    assert!(logs.contains(&good_record.id().to_string()), "{logs}");
    assert!(logs.contains(&revoked_record.id().to_string()), "{logs}");
    assert!(logs.contains("revoked_api_key"), "{logs}");
    assert!(
        logs.contains(&unknown_digest.fingerprint().to_string()),
        "{logs}"
    );
    assert!(logs.contains("redis unreachable"), "{logs}");
}

/// A token fetcher holding a client secret of its own.
#[derive(Debug)]
struct Idp {
    client_secret: &'static str,
    up: bool,
}

impl TokenFetcher for Idp {
    async fn fetch(&self) -> Result<Token, FetchError> {
        if !self.up {
            return Err(FetchError::new("the token endpoint answered 401"));
        }
        let _ = self.client_secret;
        Ok(Token::new(
            Credential::new("tok-refreshed-secret")?,
            std::time::Duration::from_secs(3600),
        ))
    }
}

#[tokio::test]
async fn upstream_credentials_stay_out_of_logs_debug_and_answers() {
    const CLIENT_KEY: &str = "gw_client-secret-key";
    const STATIC: &str = "sk-static-upstream-secret";
    const POOLED: [&str; 2] = ["sk-pool-secret-a", "sk-pool-secret-b"];
    const TENANT: &str = "sk-tenant-secret";
    const TOKEN: &str = "tok-refreshed-secret";
    const IDP_SECRET: &str = "idp-client-secret";
    const INJECTED: &str = "injected-header-secret";

    let (logs, _guard) = support::capture_logs();

    let store = Arc::new(MemoryStore::new());
    let mut acme = Metadata::new();
    acme.insert("tenant".into(), "acme".into());
    store.insert(
        KeyRecord::new(
            KeyId::random(),
            store.hasher().digest(CLIENT_KEY.as_bytes()),
        )
        .with_metadata(acme),
    );
    let stranger = "gw_stranger-secret-key";
    store.insert(KeyRecord::new(
        KeyId::random(),
        store.hasher().digest(stranger.as_bytes()),
    ));
    let inbound = InboundApiKeyLayer::from_shared(store.clone());
    let rec = Recorder::default();
    let mut answers = String::new();
    let mut note = |a: support::Answer| answers.push_str(&format!("{a:?}\n"));
    let request = |key: &str| {
        Request::builder()
            .uri("/v1/x?key=k&keep=1")
            .header("authorization", format!("Bearer {key}"))
            .body(())
            .unwrap()
    };

    let fixed = UpstreamAuthLayer::new(Provider::openai(), Credential::new(STATIC).unwrap())
        .strip_inbound(&inbound);
    let fixed_svc = ServiceBuilder::new()
        .map_request(support::with_identity)
        .layer(fixed.clone())
        .layer(HeaderInjectLayer::new().overwrite(
            HeaderName::from_static("x-internal"),
            HeaderValue::from_static(INJECTED),
        ))
        .service(rec.service());
    note(read(fixed_svc.oneshot(request(CLIENT_KEY)).await.unwrap()).await);

    let pool = KeyPool::new(POOLED.map(|k| Credential::new(k).unwrap())).unwrap();
    let pooled = UpstreamAuthLayer::new(Provider::gemini_query(), pool);
    let pooled_svc = ServiceBuilder::new()
        .map_request(support::with_identity)
        .layer(pooled.clone())
        .service(rec.service());
    for _ in 0..2 {
        note(
            read(
                pooled_svc
                    .clone()
                    .oneshot(request(CLIENT_KEY))
                    .await
                    .unwrap(),
            )
            .await,
        );
    }

    let per_tenant = UpstreamAuthLayer::new(
        Provider::anthropic(),
        PerIdentity::new()
            .by_metadata("tenant")
            .for_value("acme", Credential::new(TENANT).unwrap()),
    );
    let per_tenant_svc = ServiceBuilder::new()
        .layer(inbound.clone())
        .layer(per_tenant.clone())
        .service(rec.service());
    note(
        read(
            per_tenant_svc
                .clone()
                .oneshot(request(CLIENT_KEY))
                .await
                .unwrap(),
        )
        .await,
    );
    note(
        read(
            per_tenant_svc
                .clone()
                .oneshot(request(stranger))
                .await
                .unwrap(),
        )
        .await,
    );

    let tokens = RefreshingToken::builder(Idp {
        client_secret: IDP_SECRET,
        up: true,
    })
    .name("test-idp")
    .build();
    let refreshing = UpstreamAuthLayer::new(Provider::bearer(), tokens.clone());
    let refreshing_svc = ServiceBuilder::new()
        .map_request(support::with_identity)
        .layer(refreshing.clone())
        .service(rec.service());
    note(read(refreshing_svc.oneshot(request(CLIENT_KEY)).await.unwrap()).await);
    let down = RefreshingToken::builder(Idp {
        client_secret: IDP_SECRET,
        up: false,
    })
    .name("down-idp")
    .build();
    let down_svc = ServiceBuilder::new()
        .map_request(support::with_identity)
        .layer(UpstreamAuthLayer::new(Provider::bearer(), down.clone()))
        .service(rec.service());
    note(read(down_svc.oneshot(request(CLIENT_KEY)).await.unwrap()).await);

    // Everything the provider got carried an upstream credential, and no client key.
    assert_eq!(rec.count(), 5);
    for seen in rec.all() {
        assert!(!seen.everything().contains(CLIENT_KEY));
    }

    let token = tokens.credential(None).await.unwrap();
    // A service over a fresh inner: the test recorder's own Debug shows what it recorded.
    let fixed_svc = tower::Layer::layer(&fixed, Recorder::default().service());
    let debug = format!(
        "{fixed:?}\n{fixed_svc:?}\n{pooled:?}\n{per_tenant:?}\n{refreshing:?}\n{tokens:?}\n\
         {down:?}\n{token:?}\n{:?}\n{:?}\n{:?}\n{:?}\n{:?}",
        Token::new(token.clone(), std::time::Duration::from_secs(1)),
        Provider::openai().organization(HeaderValue::from_static("org-x")),
        HeaderRule::overwrite(
            HeaderName::from_static("x-internal"),
            HeaderValue::from_static(INJECTED)
        ),
        tokens.credential(None),
        Credential::new("sk-bad secret").unwrap_err(),
    );
    let logs = logs.text();
    for (what, text) in [("logs", &logs), ("debug", &debug), ("answers", &answers)] {
        for secret in [
            STATIC, POOLED[0], POOLED[1], TENANT, TOKEN, IDP_SECRET, INJECTED, CLIENT_KEY,
        ] {
            assert!(!text.contains(secret), "{what} hold {secret}:\n{text}");
        }
        assert!(
            !text.contains("sk-bad"),
            "{what} hold part of a bad credential"
        );
    }
    // What the logs do say: which provider and source, and which credential by fingerprint.
    let fixed_fingerprint = Credential::new(STATIC).unwrap().fingerprint().to_string();
    for expected in [
        "provider=\"openai\"",
        "source=\"pool\"",
        "source=\"per-identity\"",
        "source=\"test-idp\"",
        "upstream token fetched",
        "the token endpoint answered 401",
        "no_upstream_credential",
        &fixed_fingerprint,
    ] {
        assert!(logs.contains(expected), "logs lack {expected}:\n{logs}");
    }
}

const UPSTREAM_SECRET: &str = "sk-upstream-secret-for-a-502";

#[tokio::test]
async fn an_upstream_failure_is_logged_with_the_upstream_and_told_with_the_request_id() {
    use http_body_util::{BodyExt, Full};
    let (logs, _guard) = support::capture_logs();
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let stack = ServiceBuilder::new()
        .map_request(support::with_identity)
        .layer(UpstreamAuthLayer::new(
            Provider::openai(),
            Credential::new(UPSTREAM_SECRET).unwrap(),
        ))
        .layer(HeaderInjectLayer::new().request_id(tower_gateway_auth::inject::RequestId::new()))
        .service(support::forward_to(closed));
    let response = stack
        .oneshot(Request::new(Full::new(bytes::Bytes::new())))
        .await
        .unwrap();
    assert_eq!(response.status(), 502);
    let body = response.into_body().collect().await.unwrap().to_bytes();
    let body = String::from_utf8_lossy(&body);
    let logged = logs.text();
    let warn = logged
        .lines()
        .find(|line| line.contains("WARN") && line.contains("upstream request failed"))
        .unwrap_or_else(|| panic!("no warning logged:\n{logged}"));
    assert!(warn.contains(&closed.to_string()), "{warn}");
    // The request id ties the client's report to the log line.
    let id = warn
        .split("request_id=")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no request id in {warn}"))
        .trim_matches('"');
    assert!(body.contains(id), "{body}");
    assert!(!body.contains(&closed.to_string()), "{body}");
    assert!(!logged.contains(UPSTREAM_SECRET) && !body.contains(UPSTREAM_SECRET));
}

/// The reference gateway, as `cargo run --example gateway` builds it.
#[allow(dead_code)]
#[path = "../examples/gateway/app/mod.rs"]
mod app;

#[tokio::test]
async fn the_gateways_metrics_and_access_log_hold_no_key_digest_pepper_or_credential() {
    use tracing_subscriber::layer::SubscriberExt;

    const PEPPER: &str = "pepper-of-the-metrics-test-0123";
    const UPSTREAM_SECRET: &str = "sk-upstream-metrics-test-9876543210";
    let text_logs = support::LogBuffer::default();
    let json_logs = support::LogBuffer::default();
    let (text_writer, json_writer) = (text_logs.clone(), json_logs.clone());
    // Both formats the gateway writes (`log_format`), at every level.
    let subscriber = tracing_subscriber::registry()
        .with(
            tracing_subscriber::fmt::layer()
                .with_ansi(false)
                .with_writer(move || text_writer.clone()),
        )
        .with(
            tracing_subscriber::fmt::layer()
                .json()
                .with_writer(move || json_writer.clone()),
        )
        .with(tracing_subscriber::filter::LevelFilter::TRACE);
    let _guard = tracing::subscriber::set_default(subscriber);

    let dir = support::TempDir::new("no-secrets-gateway");
    let hasher = KeyHasher::with_pepper(PEPPER.as_bytes());
    let keys = Arc::new(
        tower_gateway_auth::store::FileStore::builder(dir.file())
            .hasher(hasher.clone())
            .reload_every(None)
            .open()
            .unwrap(),
    );
    let manager = tower_gateway_auth::keys::KeyManager::new(keys);
    let issue = |name: &'static str| {
        let manager = manager.clone();
        async move {
            manager
                .issue(tower_gateway_auth::keys::NewKey::named(name).scopes(["chat"]))
                .await
                .unwrap()
        }
    };
    let good = issue("good").await;
    let revoked = issue("revoked").await;
    manager.revoke(revoked.record.id()).await.unwrap();
    let unknown = "gw_unknown-key-of-the-metrics-test";

    let (upstream, seen) = support::spawn_upstream().await;
    let config = format!(
        r#"
listen = "127.0.0.1:0"
keys_file = "{keys}"
pepper_env = "PEPPER"
sources = ["header:x-api-key", "bearer", "query:key"]
metrics_listen = "127.0.0.1:0"
metrics_key_labels = 10
log_format = "json"

[[route]]
prefix = "/chat"
upstream = "http://{upstream}"
provider = "openai"
credential_env = "UPSTREAM_KEY"
scope = "chat"
"#,
        keys = dir.file().display()
    );
    let env = |var: &str| match var {
        "PEPPER" => Some(PEPPER.to_owned()),
        "UPSTREAM_KEY" => Some(UPSTREAM_SECRET.to_owned()),
        _ => None,
    };
    let gateway = app::build(app::Config::from_toml(&config).unwrap(), &env)
        .await
        .unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(app::serve(listener, gateway.serving(), async {
        let _ = stopped.await;
    }));

    let client = support::client();
    let good_key = good.key.expose();
    let bearer = format!("Bearer {good_key}");
    let with_query = format!("/chat/v1/chat?key={good_key}&stream=true");
    let mut answers = Vec::new();
    for (path, headers) in [
        ("/chat/v1/models", vec![("x-api-key", good_key)]),
        ("/chat/v1/models", vec![("authorization", bearer.as_str())]),
        (with_query.as_str(), vec![]),
        ("/chat/v1/models", vec![("x-api-key", revoked.key.expose())]),
        ("/chat/v1/models", vec![("x-api-key", unknown)]),
        ("/chat/v1/models", vec![]),
        ("/nowhere", vec![("x-api-key", good_key)]),
    ] {
        answers.push(
            support::send(&client, support::get(addr, path, &headers))
                .await
                .status,
        );
    }
    assert_eq!(answers, [200, 200, 200, 401, 401, 401, 404]);
    assert_eq!(seen.count(), 3);
    assert!(
        seen.all()
            .iter()
            .all(|s| s.everything().contains(UPSTREAM_SECRET)),
        "the upstream got its credential"
    );

    let metrics_addr = gateway.metrics.expect("metrics_listen is set");
    let scraped = support::send(&client, support::get(metrics_addr, "/metrics", &[])).await;
    assert_eq!(scraped.status, 200);
    let metrics = scraped.text().to_owned();
    let _ = stop.send(());
    served.await.unwrap().unwrap();
    drop(gateway);

    let text = text_logs.text();
    let json = json_logs.text();
    // What was captured is the run: every request's access line, and the metrics.
    let access = json
        .lines()
        .filter(|l| l.contains(r#""target":"gateway_auth::access""#))
        .count();
    assert_eq!(access, 7, "{json}");
    assert!(json.contains(&format!(r#""key_id":"{}""#, good.record.id())));
    assert!(metrics.contains("gateway_auth_requests_total"));
    assert!(metrics.contains(&good.record.id().to_string()));

    let mut secrets = vec![
        PEPPER.to_owned(),
        UPSTREAM_SECRET.to_owned(),
        unknown.to_owned(),
    ];
    for key in [good_key, revoked.key.expose(), unknown] {
        secrets.push(key.to_owned());
        // The digests in every encoding the crate writes them (lower-case hex for stores and
        // serde; `Debug` is redacted), upper-case too, and a prefix of each; and the plain
        // SHA-256, had the pepper been skipped somewhere.
        for digest in [
            hasher.digest(key.as_bytes()),
            KeyHasher::sha256().digest(key.as_bytes()),
        ] {
            let hex = digest.to_hex();
            secrets.push(hex.to_uppercase());
            secrets.push(hex[..16].to_owned());
            secrets.push(hex);
            secrets.push(
                serde_json::to_string(&KeyRecord::new(KeyId::random(), digest))
                    .unwrap()
                    .split("\"digest\":\"")
                    .nth(1)
                    .unwrap()
                    .split('"')
                    .next()
                    .unwrap()
                    .to_owned(),
            );
        }
    }
    for (what, captured) in [
        ("metrics", &metrics),
        ("text logs", &text),
        ("json logs", &json),
    ] {
        for secret in &secrets {
            assert!(
                !captured.contains(secret.as_str()),
                "{what} hold `{secret}`:\n{captured}"
            );
        }
    }
}

/// A realtime session with the key in the subprotocol, closed when the key is revoked:
/// neither the key, its digest nor the provider's credential shows up in the log (every
/// level), the close reason, the upstream's view, or a `Debug` print of the parts.
#[tokio::test]
async fn a_websocket_session_and_its_revocation_log_no_key_or_credential() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    use tower_gateway_auth::inbound::KeySource;
    use tower_gateway_auth::proxy::{Forward, StripHopByHopLayer};

    const UPSTREAM_SECRET: &str = "sk-upstream-websocket-test-13579";
    let (logs, _guard) = support::capture_logs();
    let store = Arc::new(MemoryStore::new());
    let manager = tower_gateway_auth::keys::KeyManager::new(store.clone());
    let issued = manager
        .issue(tower_gateway_auth::keys::NewKey::named("socket"))
        .await
        .unwrap();
    let key = issued.key.expose().to_owned();
    let digest = issued.record.digest().to_hex();

    let (echo, sessions) = support::ws::spawn_echo().await;
    let inbound = InboundApiKeyLayer::from_shared(store)
        .sources(["subprotocol".parse::<KeySource>().unwrap()])
        .recheck_sockets_every(std::time::Duration::from_millis(50));
    let upstream = UpstreamAuthLayer::new(
        Provider::openai(),
        Credential::new(UPSTREAM_SECRET).unwrap(),
    )
    .strip_inbound(&inbound);
    let debug = format!("{inbound:?} {upstream:?}");
    let stack = ServiceBuilder::new()
        .layer(StripHopByHopLayer::new())
        .layer(inbound)
        .layer(upstream)
        .service(Forward::new(&format!("ws://{echo}")).unwrap());
    let gw = support::spawn_service(stack).await;

    let offer = format!("realtime, openai-insecure-api-key.{key}");
    let (mut socket, head) =
        support::ws::connect(gw, "/v1/realtime", &[("sec-websocket-protocol", &offer)])
            .await
            .unwrap();
    socket.send(Message::text("hello")).await.unwrap();
    assert_eq!(support::ws::next_text(&mut socket).await, "hello");
    manager.revoke(issued.record.id()).await.unwrap();
    let (code, reason) =
        support::ws::close_of(&mut socket, std::time::Duration::from_secs(3)).await;
    assert_eq!(code, 1008);
    let seen = sessions.ended().await;

    let everything = format!(
        "{}\n{debug}\n{head:?}\n{reason}\n{:?}\n{:?}",
        logs.text(),
        seen.headers,
        seen.close
    );
    assert!(logs.text().contains("WebSocket closed"), "{}", logs.text());
    for secret in [key.as_str(), digest.as_str()] {
        assert!(
            !everything.contains(secret),
            "{secret} leaked:\n{everything}"
        );
    }
    let without_upstream_view = everything.replace(&format!("{:?}", seen.headers), "");
    assert!(
        !without_upstream_view.contains(UPSTREAM_SECRET),
        "the provider credential leaked:\n{without_upstream_view}"
    );
}
