//! The reference gateway (examples/gateway) end to end over real loopback sockets: a real
//! client, the gateway as `cargo run --example gateway` builds it, and a recording upstream.

#[allow(dead_code)]
#[path = "../examples/gateway/app/mod.rs"]
mod app;
mod support;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{Answer, ReceiverStream, TempDir, client, send, spawn_axum, spawn_upstream};
use tokio::sync::{Notify, mpsc};
use tower_gateway_auth::{ApiKey, FileStore, KeyManager, NewKey};

const OPENAI_SECRET: &str = "sk-provider-openai-0123456789";
const ANTHROPIC_SECRET: &str = "sk-ant-provider-abcdefghij";

fn env(var: &str) -> Option<String> {
    let vars = HashMap::from([
        ("OPENAI_API_KEY", OPENAI_SECRET),
        ("ANTHROPIC_API_KEY", ANTHROPIC_SECRET),
    ]);
    vars.get(var).map(|v| (*v).to_owned())
}

fn config(keys_file: &std::path::Path, upstream: SocketAddr) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
keys_file = "{keys}"
sources = ["header:x-api-key", "bearer", "query:key"]
error_format = "openai"
admin_scope = "admin"
reload_ms = 100

[[route]]
prefix = "/openai"
upstream = "http://{upstream}"
provider = "openai"
credential_env = "OPENAI_API_KEY"
scope = "openai"
headers = {{ "OpenAI-Organization" = "org-123" }}

[[route]]
prefix = "/anthropic"
upstream = "http://{upstream}/base"
provider = "anthropic"
credential_env = "ANTHROPIC_API_KEY"
error_format = "anthropic"
"#,
        keys = keys_file.display()
    )
}

/// A running gateway on 127.0.0.1:0.
struct Running {
    addr: SocketAddr,
    _gateway: app::Gateway,
}

async fn start(config: &str) -> Running {
    let gateway = app::build(app::Config::from_toml(config).unwrap(), &env)
        .await
        .unwrap();
    let addr = spawn_axum(gateway.service.clone()).await;
    Running {
        addr,
        _gateway: gateway,
    }
}

/// Issues a key into the keys file, as the keygen example does.
async fn issue(file: &std::path::Path, name: &str, scopes: &[&str]) -> (ApiKey, String) {
    let store = Arc::new(FileStore::builder(file).reload_every(None).open().unwrap());
    let issued = KeyManager::new(store)
        .issue(NewKey::named(name).scopes(scopes.iter().copied()))
        .await
        .unwrap();
    (issued.key, issued.record.id().to_string())
}

/// A GET with `key` in `x-api-key`.
async fn get_key(addr: SocketAddr, path: &str, key: &str) -> Answer {
    call(addr, Method::GET, path, &[("x-api-key", key)], "").await
}

async fn call(
    addr: SocketAddr,
    method: Method,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Answer {
    let mut req = Request::builder()
        .method(method)
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    send(
        &client(),
        req.body(Full::new(Bytes::from(body.to_owned()))).unwrap(),
    )
    .await
}

#[tokio::test]
async fn openai_and_anthropic_routes_carry_the_providers_credential_and_none_of_the_clients() {
    let dir = TempDir::new("gw-routes");
    let (upstream, seen) = spawn_upstream().await;
    let (key, _) = issue(&dir.file(), "alice", &["openai"]).await;
    let gw = start(&config(&dir.file(), upstream)).await;
    let key = key.expose();
    let bearer = format!("Bearer {key}");

    let a = call(
        gw.addr,
        Method::POST,
        &format!("/openai/v1/chat/completions?key={key}&stream=true&x=%2F"),
        &[
            ("authorization", &bearer),
            ("x-api-key", key),
            ("openai-organization", "org-client"),
            ("content-type", "application/json"),
        ],
        r#"{"model":"gpt","messages":[]}"#,
    )
    .await;
    assert_eq!((a.status, a.text()), (StatusCode::OK, "upstream ok"));
    assert!(a.headers.contains_key("x-request-id"));
    let got = seen.last();
    assert_eq!(got.uri, "/v1/chat/completions?stream=true&x=%2F");
    assert_eq!(
        got.headers["authorization"],
        format!("Bearer {OPENAI_SECRET}")
    );
    assert_eq!(got.headers["openai-organization"], "org-123");
    assert!(got.headers.get("x-api-key").is_none());
    assert!(
        !got.everything().contains(key),
        "the client's key reached the upstream:\n{}",
        got.everything()
    );

    let a = call(
        gw.addr,
        Method::POST,
        "/anthropic/v1/messages",
        &[("x-api-key", key), ("anthropic-beta", "tools-2024")],
        "{}",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let got = seen.last();
    assert_eq!(got.uri, "/base/v1/messages");
    assert_eq!(got.headers["x-api-key"], ANTHROPIC_SECRET);
    assert_eq!(got.headers["anthropic-version"], "2023-06-01");
    assert_eq!(got.headers["anthropic-beta"], "tools-2024");
    assert!(got.headers.get("authorization").is_none());
    assert!(!got.everything().contains(key));
    assert_eq!(seen.count(), 2);

    // The provider's credential never travels back to the client either.
    assert!(
        !a.text().contains(ANTHROPIC_SECRET)
            && !format!("{:?}", a.headers).contains(ANTHROPIC_SECRET)
    );
}

#[tokio::test]
async fn rejections_speak_each_routes_dialect_and_reach_nothing() {
    let dir = TempDir::new("gw-reject");
    let (upstream, seen) = spawn_upstream().await;
    let (chat_only, _) = issue(&dir.file(), "bob", &["chat"]).await;
    let gw = start(&config(&dir.file(), upstream)).await;

    let a = call(
        gw.addr,
        Method::GET,
        "/openai/v1/models",
        &[("x-api-key", chat_only.expose())],
        "",
    )
    .await;
    assert_eq!(
        a.status,
        StatusCode::FORBIDDEN,
        "a key without the route's scope"
    );
    assert_eq!(a.json()["error"]["code"], "insufficient_scope");
    let a = call(gw.addr, Method::GET, "/anthropic/v1/models", &[], "").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(a.json()["error"]["type"], "authentication_error");
    let mut typo = chat_only.expose().to_owned();
    typo.pop();
    typo.push(if chat_only.expose().ends_with('A') {
        'B'
    } else {
        'A'
    });
    let a = get_key(gw.addr, "/anthropic/v1/models", &typo).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = call(
        gw.addr,
        Method::GET,
        "/nowhere",
        &[("x-api-key", chat_only.expose())],
        "",
    )
    .await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    assert_eq!(a.json()["error"]["code"], "not_found");
    assert_eq!(seen.count(), 0);
}

#[tokio::test]
async fn paths_go_to_the_longest_whole_segment_prefix_with_it_stripped() {
    let dir = TempDir::new("gw-prefix");
    let (short, short_seen) = spawn_upstream().await;
    let (long, long_seen) = spawn_upstream().await;
    let (key, _) = issue(&dir.file(), "carol", &[]).await;
    let config = format!(
        r#"
listen = "127.0.0.1:0"
keys_file = "{keys}"

[[route]]
prefix = "/v1"
upstream = "http://{short}/base"
provider = "openai"
credential_env = "OPENAI_API_KEY"

[[route]]
prefix = "/v1/beta/"
upstream = "http://{long}"
provider = "openai"
credential_env = "OPENAI_API_KEY"
"#,
        keys = dir.file().display()
    );
    let gw = start(&config).await;
    let key = key.expose();
    for (path, seen, expected) in [
        ("/v1/chat?x=1", &short_seen, "/base/chat?x=1"),
        ("/v1", &short_seen, "/base/"),
        ("/v1?x=%2F", &short_seen, "/base/?x=%2F"),
        ("/v1/betamax", &short_seen, "/base/betamax"),
        ("/v1/beta/files", &long_seen, "/files"),
        ("/v1/beta", &long_seen, "/"),
    ] {
        let a = get_key(gw.addr, path, key).await;
        assert_eq!(a.status, StatusCode::OK, "{path}");
        assert_eq!(seen.last().uri, expected, "{path}");
    }
    let before = (short_seen.count(), long_seen.count());
    for path in ["/v1x/chat", "/", "/V1/chat", "/admin/keys"] {
        let a = get_key(gw.addr, path, key).await;
        assert_eq!(a.status, StatusCode::NOT_FOUND, "{path}");
        assert_eq!(a.json()["error"]["code"], "not_found", "{path}");
    }
    assert_eq!((short_seen.count(), long_seen.count()), before);
}

#[tokio::test]
async fn a_key_revoked_through_the_management_api_or_keygen_is_rejected_without_a_restart() {
    let dir = TempDir::new("gw-revoke");
    let (upstream, _seen) = spawn_upstream().await;
    let (admin, _) = issue(&dir.file(), "root", &["admin"]).await;
    let (first, first_id) = issue(&dir.file(), "first", &["openai"]).await;
    let gw = start(&config(&dir.file(), upstream)).await;
    let use_key =
        |key: String| async move { get_key(gw.addr, "/openai/v1/models", &key).await.status };
    assert_eq!(use_key(first.expose().to_owned()).await, StatusCode::OK);
    let a = call(
        gw.addr,
        Method::POST,
        &format!("/admin/keys/{first_id}/revoke"),
        &[("x-api-key", admin.expose())],
        "",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(
        use_key(first.expose().to_owned()).await,
        StatusCode::UNAUTHORIZED
    );

    // Issued and then revoked by another writer of the keys file (what keygen does): the
    // running gateway picks both up by itself.
    let (second, second_id) = issue(&dir.file(), "second", &["openai"]).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while use_key(second.expose().to_owned()).await != StatusCode::OK {
        assert!(
            Instant::now() < deadline,
            "a key added by keygen was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let store = Arc::new(
        FileStore::builder(dir.file())
            .reload_every(None)
            .open()
            .unwrap(),
    );
    KeyManager::new(store)
        .revoke(second_id.parse().unwrap())
        .await
        .unwrap();
    let revoked_at = Instant::now();
    while use_key(second.expose().to_owned()).await == StatusCode::OK {
        assert!(
            revoked_at.elapsed() < Duration::from_secs(10),
            "a key revoked by keygen still works"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_restarted_gateway_accepts_the_same_keys() {
    let dir = TempDir::new("gw-restart");
    let (upstream, seen) = spawn_upstream().await;
    let (admin, _) = issue(&dir.file(), "root", &["admin", "openai"]).await;
    let created = {
        let gw = start(&config(&dir.file(), upstream)).await;
        let a = call(
            gw.addr,
            Method::POST,
            "/admin/keys",
            &[("x-api-key", admin.expose())],
            r#"{"name":"made-over-http","scopes":["openai"]}"#,
        )
        .await;
        assert_eq!(a.status, StatusCode::CREATED);
        a.json()["key"].as_str().unwrap().to_owned()
    };
    let gw = start(&config(&dir.file(), upstream)).await;
    for key in [admin.expose(), created.as_str()] {
        let a = call(
            gw.addr,
            Method::GET,
            "/openai/v1/models",
            &[("authorization", &format!("Bearer {key}"))],
            "",
        )
        .await;
        assert_eq!(a.status, StatusCode::OK);
    }
    assert_eq!(seen.count(), 2);
}

#[tokio::test]
async fn server_sent_events_reach_the_client_before_the_upstream_finishes() {
    let dir = TempDir::new("gw-sse");
    let go_on = Arc::new(Notify::new());
    let release = go_on.clone();
    let upstream = spawn_axum(Router::new().fallback(move || {
        let go_on = go_on.clone();
        async move {
            let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(4);
            tokio::spawn(async move {
                tx.send(Ok(Bytes::from_static(
                    b"data: {\"choices\":[{\"delta\":{\"content\":\"Hel\"}}]}\n\n",
                )))
                .await
                .unwrap();
                go_on.notified().await;
                tx.send(Ok(Bytes::from_static(b"data: [DONE]\n\n")))
                    .await
                    .unwrap();
            });
            http::Response::builder()
                .header("content-type", "text/event-stream")
                .body(Body::from_stream(ReceiverStream(rx)))
                .unwrap()
        }
    }))
    .await;
    let (key, _) = issue(&dir.file(), "streamer", &["openai"]).await;
    let gw = start(&config(&dir.file(), upstream)).await;
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{}/openai/v1/chat/completions", gw.addr))
        .header("authorization", format!("Bearer {}", key.expose()))
        .body(Full::new(Bytes::from_static(br#"{"stream":true}"#)))
        .unwrap();
    let response = client().request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert!(first.starts_with(b"data: {\"choices\""), "{first:?}");
    // Only now may the upstream send its last event.
    release.notify_one();
    let rest = body.collect().await.unwrap().to_bytes();
    assert_eq!(rest, "data: [DONE]\n\n");
}

#[tokio::test]
async fn an_unreachable_upstream_is_a_clear_502() {
    let dir = TempDir::new("gw-502");
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let (key, _) = issue(&dir.file(), "k", &["openai"]).await;
    let gw = start(&config(&dir.file(), closed)).await;
    let a = call(
        gw.addr,
        Method::GET,
        "/anthropic/v1/models",
        &[("x-api-key", key.expose())],
        "",
    )
    .await;
    assert_eq!(a.status, StatusCode::BAD_GATEWAY);
    assert_eq!(a.json()["error"]["type"], "api_error");
}

#[tokio::test]
async fn the_demo_shows_the_rewrite_with_its_own_echo_upstream() {
    let gateway = app::build(app::Config::demo(), &|_| None).await.unwrap();
    let key = gateway.first_key.clone().expect("the demo prints one key");
    assert!(gateway.echo.is_some());
    let addr = spawn_axum(gateway.service.clone()).await;
    let a = call(
        addr,
        Method::POST,
        "/openai/v1/chat/completions?model=x",
        &[("authorization", &format!("Bearer {}", key.expose()))],
        "{}",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let echo = a.json();
    assert_eq!(echo["path"], "/v1/chat/completions");
    assert_eq!(echo["query"], "model=x");
    assert_eq!(
        echo["headers"]["authorization"],
        "Bearer sk-echo-upstream-credential"
    );
    assert!(!a.text().contains(key.expose()));
    let a = call(
        addr,
        Method::POST,
        "/anthropic/v1/messages",
        &[("x-api-key", key.expose())],
        "{}",
    )
    .await;
    assert_eq!(
        a.json()["headers"]["x-api-key"],
        "sk-echo-upstream-credential"
    );
    let a = call(addr, Method::POST, "/anthropic/v1/messages", &[], "{}").await;
    assert_eq!(a.json()["error"]["type"], "authentication_error");
}

#[test]
fn configuration_mistakes_name_the_field() {
    let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let good = config(std::path::Path::new("/tmp/unused.json"), upstream);
    let cases = [
        (
            good.replace("provider = \"openai\"", "provider = \"openia\""),
            "route[0].provider",
        ),
        (good.replace("\"bearer\"", "\"cookie:x\""), "sources[1]"),
        (
            good.replace("error_format = \"openai\"", "error_format = \"xml\""),
            "error_format",
        ),
        (
            good.replace("error_format = \"anthropic\"", "error_format = \"soap\""),
            "route[1].error_format",
        ),
        (
            good.replace("OPENAI_API_KEY", "NOT_SET_ANYWHERE"),
            "route[0].credential_env",
        ),
        (
            good.replace("prefix = \"/openai\"", "prefix = \"openai\""),
            "route[0].prefix",
        ),
        (
            good.replace("prefix = \"/anthropic\"", "prefix = \"/openai\""),
            "route[1].prefix",
        ),
        (
            good.replace(
                &format!("upstream = \"http://{upstream}\""),
                "upstream = \"api.openai.com\"",
            ),
            "route[0].upstream",
        ),
        (
            good.replace("listen = \"127.0.0.1:0\"", "listen = \"localhost\""),
            "listen",
        ),
        (
            good.replace(
                "\"OpenAI-Organization\" = \"org-123\"",
                "\"bad header\" = \"x\"",
            ),
            "route[0].headers.bad header",
        ),
    ];
    for (text, field) in cases {
        let err = app::Config::from_toml(&text)
            .unwrap()
            .plan(&env)
            .err()
            .unwrap_or_else(|| panic!("{field} accepted"));
        assert_eq!(err.field, field, "{err}");
    }
    let err = app::Config::from_toml(&good.replace("admin_scope", "admin_scopes")).unwrap_err();
    assert!(
        err.to_string().contains("line 6") && err.message.contains("admin_scopes"),
        "{err}"
    );
    let err = app::Config::from_toml(&good.replace("reload_ms = 100", "reload_ms = \"fast\""))
        .unwrap_err();
    assert!(err.to_string().contains("line 7"), "{err}");

    let workers = |n: &str| {
        app::Config::from_toml(&good.replace(
            "reload_ms = 100",
            &format!("reload_ms = 100\nworkers = {n}"),
        ))
        .unwrap()
        .runtime()
    };
    for bad in ["0", "1025"] {
        assert_eq!(workers(bad).expect_err(bad).field, "workers");
    }
    use tokio::runtime::RuntimeFlavor;
    assert_eq!(
        workers("1").unwrap().handle().runtime_flavor(),
        RuntimeFlavor::CurrentThread
    );
    assert_eq!(
        workers("2").unwrap().handle().runtime_flavor(),
        RuntimeFlavor::MultiThread
    );
}

#[tokio::test]
async fn a_corrupt_keys_file_stops_start_up() {
    let dir = TempDir::new("gw-corrupt");
    std::fs::write(dir.file(), b"{not json").unwrap();
    let text = config(&dir.file(), "127.0.0.1:9".parse().unwrap());
    let err = app::build(app::Config::from_toml(&text).unwrap(), &env)
        .await
        .err()
        .expect("a corrupt keys file must stop start-up");
    assert_eq!(err.field, "keys_file");
    assert!(err.message.contains("corrupt"), "{err}");
}

#[test]
fn the_shipped_example_config_is_valid() {
    let text = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/examples/gateway.toml"
    ))
    .unwrap();
    let config = app::Config::from_toml(&text).unwrap();
    let any = |_: &str| Some("sk-test-credential".to_owned());
    config.plan(&any).unwrap();
}

#[tokio::test]
async fn with_redis_a_key_revoked_by_keygen_is_rejected_within_a_second() {
    let Some((url, _server)) = support::redis::redis_url() else {
        return;
    };
    let ns = support::redis::namespace();
    let (upstream, seen) = spawn_upstream().await;
    let text = config(std::path::Path::new("unused"), upstream).replace(
        "keys_file = \"unused\"",
        &format!("redis_url = \"{url}\"\nredis_namespace = \"{ns}\""),
    );
    // What keygen --redis-url does: a plain RedisStore and a KeyManager.
    let keygen = Arc::new(
        tower_gateway_auth::RedisStore::connect_with(
            &url,
            &ns,
            tower_gateway_auth::KeyHasher::sha256(),
        )
        .await
        .unwrap(),
    );
    let issued = KeyManager::new(keygen.clone())
        .issue(NewKey::named("replicated").scopes(["openai"]))
        .await
        .unwrap();
    let gw = start(&text).await;
    let key = issued.key.expose();
    let a = get_key(gw.addr, "/openai/v1/models", key).await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(seen.count(), 1);

    KeyManager::new(keygen)
        .revoke(issued.record.id())
        .await
        .unwrap();
    let revoked = Instant::now();
    loop {
        let a = get_key(gw.addr, "/openai/v1/models", key).await;
        if a.status == StatusCode::UNAUTHORIZED {
            assert_eq!(a.json()["error"]["code"], "revoked_api_key");
            break;
        }
        assert!(
            revoked.elapsed() < Duration::from_secs(1),
            "still accepted after a second"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // Requests in the propagation window may have passed; none after the rejection.
    let passed = seen.count();
    let a = get_key(gw.addr, "/openai/v1/models", key).await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(seen.count(), passed);
}

#[test]
fn an_upstream_url_with_credentials_is_refused_without_showing_them() {
    let good = config(
        std::path::Path::new("/tmp/k.json"),
        "127.0.0.1:9".parse().unwrap(),
    );
    let text = good.replace(
        "upstream = \"http://127.0.0.1:9\"",
        "upstream = \"https://u:sk-in-url@api.example.com\"",
    );
    let err = app::Config::from_toml(&text)
        .unwrap()
        .plan(&env)
        .err()
        .unwrap();
    assert_eq!(err.field, "route[0].upstream");
    assert!(!err.to_string().contains("sk-in-url"), "{err}");
}

#[test]
fn keys_file_and_redis_url_exclude_each_other() {
    let good = config(
        std::path::Path::new("/tmp/k.json"),
        "127.0.0.1:9".parse().unwrap(),
    );
    let field = |text: String| {
        app::Config::from_toml(&text)
            .unwrap()
            .plan(&env)
            .err()
            .unwrap()
            .field
    };
    let both = good.replace(
        "reload_ms = 100",
        "reload_ms = 100\nredis_url = \"redis://127.0.0.1:6379\"",
    );
    assert_eq!(field(both), "redis_url");
    let not_redis = good.replace(
        "keys_file = \"/tmp/k.json\"",
        "redis_url = \"http://127.0.0.1:6379\"",
    );
    assert_eq!(field(not_redis), "redis_url");
}

// --- Issue 11: the proxy and the server ----------------------------------------------------

#[tokio::test]
async fn a_client_cannot_delete_the_injected_credential_or_organization() {
    let dir = TempDir::new("gw-hop");
    let (upstream, seen) = spawn_upstream().await;
    let (key, _) = issue(&dir.file(), "alice", &["openai"]).await;
    let gw = start(&config(&dir.file(), upstream)).await;
    let a = call(
        gw.addr,
        Method::POST,
        "/openai/v1/chat/completions",
        &[
            ("x-api-key", key.expose()),
            (
                "connection",
                "authorization, openai-organization, openai-project, x-request-id, x-client-hop",
            ),
            ("x-client-hop", "for the next hop only"),
        ],
        "{}",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    let got = seen.last();
    assert_eq!(
        got.headers
            .get("authorization")
            .map(|v| v.to_str().unwrap()),
        Some(format!("Bearer {OPENAI_SECRET}").as_str()),
        "{}",
        got.everything()
    );
    assert_eq!(got.headers["openai-organization"], "org-123");
    assert_eq!(got.headers["x-request-id"], a.headers["x-request-id"]);
    assert!(
        got.headers.get("x-client-hop").is_none(),
        "a header the client named in Connection went on"
    );
}

#[tokio::test]
async fn dot_segments_never_leave_the_routes_base() {
    let dir = TempDir::new("gw-dots");
    let (upstream, seen) = spawn_upstream().await;
    let (key, _) = issue(&dir.file(), "alice", &["openai"]).await;
    let gw = start(&config(&dir.file(), upstream)).await;
    let key = key.expose();
    // (target, the dialect the 400 must speak: the route's, or the gateway's default)
    let cases = [
        ("/anthropic/../../other-deployment/v1/messages", "anthropic"),
        ("/anthropic/v1/../../../other", "anthropic"),
        ("/anthropic/%2e%2e/%2e%2e/other", "anthropic"),
        ("/anthropic/%2E%2E/other", "anthropic"),
        ("/anthropic/.%2e/other", "anthropic"),
        ("/anthropic/%2e./other", "anthropic"),
        ("/anthropic/..%2fother", "anthropic"),
        ("/anthropic/..%5Cother", "anthropic"),
        ("/anthropic/..\\other", "anthropic"),
        ("/anthropic/..;/other", "anthropic"),
        ("/anthropic/./v1/messages", "anthropic"),
        ("/openai/../anthropic/v1/messages", "openai"),
        ("/openai/%2e%2e/admin/keys", "openai"),
        ("/nowhere/../openai/v1/models", "openai"),
        ("/%2e%2e/openai/v1/models", "openai"),
    ];
    for (target, dialect) in cases {
        let request = format!(
            "GET {target} HTTP/1.1\r\nhost: gw\r\nx-api-key: {key}\r\nconnection: close\r\n\r\n"
        );
        let answer = support::raw_exchange(gw.addr, request.as_bytes()).await;
        assert_eq!(support::raw_status(&answer), 400, "{target}: {answer}");
        let body: serde_json::Value = serde_json::from_str(support::raw_body(&answer))
            .unwrap_or_else(|e| panic!("{target}: {e}: {answer}"));
        match dialect {
            "anthropic" => assert_eq!(body["error"]["type"], "invalid_request_error", "{target}"),
            _ => assert_eq!(body["error"]["code"], "invalid_path", "{target}: {body}"),
        }
    }
    assert_eq!(
        seen.count(),
        0,
        "a request left its route's base: {:?}",
        seen.all()
            .iter()
            .map(|s| s.uri.to_string())
            .collect::<Vec<_>>()
    );
}

/// Before the fix: the gateway served as main.rs served it keeps a half-sent request line
/// open with no limit.
#[tokio::test]
async fn probe_before_fix_a_half_request_line_is_held() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = TempDir::new("gw-probe");
    let (upstream, _) = spawn_upstream().await;
    let gw = start(&config(&dir.file(), upstream)).await;
    let mut stream = tokio::net::TcpStream::connect(gw.addr).await.unwrap();
    stream.write_all(b"GET /openai/v1/mo").await.unwrap();
    let mut buf = [0u8; 64];
    let closed = tokio::time::timeout(Duration::from_secs(3), stream.read(&mut buf)).await;
    assert!(
        matches!(closed, Ok(Ok(0)) | Ok(Err(_))),
        "after 3 s the half request line is still held open: {closed:?}"
    );
}
