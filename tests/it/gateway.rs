//! The reference gateway (examples/gateway) end to end over real loopback sockets: a real
//! client, the gateway as `cargo run --example gateway` builds it, and a recording upstream.

#[allow(dead_code)]
#[path = "../../examples/gateway/app/mod.rs"]
mod app;
/// Limits on Redis and the Redis Cluster, and managing them.
mod limits;
mod ops;
/// Browser clients: CORS and realtime WebSockets.
mod realtime;
/// User tokens beside keys.
mod users;
use crate::support;

/// Metrics and the access log, end to end.
pub(crate) mod telemetry;

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
use tower_gateway_auth::keys::{ApiKey, KeyManager, NewKey};
use tower_gateway_auth::store::FileStore;

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

/// A running gateway on 127.0.0.1:0, served by the gateway's own serve loop (with its
/// connection limits), as `cargo run --example gateway` serves it.
struct Running {
    addr: SocketAddr,
    /// Send to shut down; `served` then ends.
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    served: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
    _gateway: app::Gateway,
}

async fn start(config: &str) -> Running {
    let gateway = app::build(app::Config::from_toml(config).unwrap(), &env)
        .await
        .unwrap();
    Running::serve(gateway).await
}

impl Running {
    /// Serves a gateway already built.
    async fn serve(gateway: app::Gateway) -> Running {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let served = tokio::spawn(app::serve(listener, gateway.serving(), async {
            let _ = stop.await;
        }));
        Running {
            addr,
            shutdown: Some(shutdown),
            served: Some(served),
            _gateway: gateway,
        }
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
        (
            good.replace(
                "headers = { \"OpenAI-Organization\" = \"org-123\" }\n",
                "headers = { \"OpenAI-Organization\" = \"org-123\" }\n[route.limits]\nrequests_per_minute = 0\n",
            ),
            "route[0].limits.requests_per_minute",
        ),
        (
            good.replace(
                "headers = { \"OpenAI-Organization\" = \"org-123\" }\n",
                "headers = { \"OpenAI-Organization\" = \"org-123\" }\n[route.limits]\nburst = 5\n",
            ),
            "route[0].limits.burst",
        ),
        (
            good.replace(
                "headers = { \"OpenAI-Organization\" = \"org-123\" }\n",
                "headers = { \"OpenAI-Organization\" = \"org-123\" }\n[route.limits]\nmax_concurrent = 0\n",
            ),
            "route[0].limits.max_concurrent",
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

    let zero_cap = good.replace(
        "reload_ms = 100",
        "reload_ms = 100\nmax_ephemeral_per_key = 0",
    );
    let plan = app::Config::from_toml(&zero_cap).unwrap().plan(&env);
    assert_eq!(plan.err().unwrap().field, "max_ephemeral_per_key");

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
        tower_gateway_auth::store::RedisStore::builder(&url)
            .namespace(&ns)
            .connect()
            .await
            .unwrap(),
    );
    let issued = KeyManager::new(keygen.clone())
        .issue(NewKey::named("replicated").scopes(["openai"]))
        .await
        .unwrap();
    let gw = start(&text).await;
    // Keys are served once revocations can reach this replica.
    ops::wait_until_ready(gw.addr, Duration::from_secs(5)).await;
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

/// `config(..)` with a `[server]` table of `limits` (`key = value` lines).
fn with_server(config: &str, limits: &str) -> String {
    format!("{config}\n[server]\n{limits}\n")
}

/// Reads until the peer closes the connection (EOF or reset); the time that took, or `None`
/// if it was still open after `limit`. What was read is returned too.
async fn until_closed(
    stream: &mut tokio::net::TcpStream,
    limit: Duration,
) -> (Option<Duration>, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let started = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at((started + limit).into(), stream.read(&mut buf)).await {
            Err(_) => return (None, got),
            Ok(Ok(0)) | Ok(Err(_)) => return (Some(started.elapsed()), got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// Reads one whole response with a `Content-Length` body from a kept-alive connection.
async fn read_response(stream: &mut tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let text = String::from_utf8_lossy(&got).into_owned();
        if let Some((head, body)) = text.split_once("\r\n\r\n") {
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().parse::<usize>().unwrap())
                })
                .expect("a content-length");
            if body.len() >= length {
                return text;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
            .await
            .expect("a response within 5 s")
            .unwrap();
        assert!(n > 0, "closed before the response was complete: {text}");
        got.extend_from_slice(&buf[..n]);
    }
}

async fn connect(addr: SocketAddr) -> tokio::net::TcpStream {
    tokio::net::TcpStream::connect(addr).await.unwrap()
}

async fn write(stream: &mut tokio::net::TcpStream, bytes: &[u8]) {
    use tokio::io::AsyncWriteExt;
    stream.write_all(bytes).await.unwrap();
}

#[tokio::test]
async fn two_hundred_half_sent_request_lines_are_closed_at_the_header_read_timeout() {
    let dir = TempDir::new("gw-slowloris");
    let (upstream, seen) = spawn_upstream().await;
    let gw = start(&with_server(
        &config(&dir.file(), upstream),
        "header_read_timeout_secs = 1\nidle_timeout_secs = 30",
    ))
    .await;
    let mut held = Vec::new();
    for _ in 0..200 {
        let mut stream = connect(gw.addr).await;
        write(&mut stream, b"GET /openai/v1/mo").await;
        held.push(stream);
    }
    // One more that keeps sending a byte now and then: bytes do not restart the clock.
    let mut trickle = connect(gw.addr).await;
    let trickling = tokio::spawn(async move {
        use tokio::io::AsyncWriteExt;
        let started = Instant::now();
        for byte in b"GET /openai/v1/models HTTP/1.1\r\nhost: x\r\n"
            .iter()
            .cycle()
        {
            if trickle.write_all(&[*byte]).await.is_err() {
                return started.elapsed();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            if started.elapsed() > Duration::from_secs(10) {
                break;
            }
        }
        panic!("a trickled request head was held for 10 s");
    });
    let started = Instant::now();
    for (i, stream) in held.iter_mut().enumerate() {
        let limit = Duration::from_secs(5).saturating_sub(started.elapsed());
        let (closed, _) = until_closed(stream, limit).await;
        assert!(closed.is_some(), "connection {i} still open after 5 s");
    }
    let all_closed = started.elapsed();
    assert!(
        all_closed >= Duration::from_millis(900) && all_closed < Duration::from_secs(4),
        "closed after {all_closed:?}, not at the 1 s header read timeout"
    );
    let trickled = trickling.await.unwrap();
    assert!(
        trickled < Duration::from_secs(4),
        "trickled head held {trickled:?}"
    );
    assert_eq!(seen.count(), 0);
}

/// The connection's one timer is moved only when a deadline comes nearer: after requests
/// have pushed the idle deadline on, a half-sent head must still be cut at the header read
/// timeout counted from its own first byte, on the same connection.
#[tokio::test]
async fn a_half_sent_head_after_served_requests_is_closed_at_the_header_read_timeout() {
    let dir = TempDir::new("gw-late-slowloris");
    let (upstream, seen) = spawn_upstream().await;
    let (key, _) = issue(&dir.file(), "alice", &["openai"]).await;
    let gw = start(&with_server(
        &config(&dir.file(), upstream),
        "header_read_timeout_secs = 1\nidle_timeout_secs = 30",
    ))
    .await;
    let request = format!(
        "GET /openai/v1/models HTTP/1.1\r\nhost: gw\r\nx-api-key: {}\r\n\r\n",
        key.expose()
    );
    let mut stream = connect(gw.addr).await;
    // Requests spread over longer than the header read timeout: the timer set for the
    // first head goes off early while the connection is idle, and is set again.
    for _ in 0..3 {
        write(&mut stream, request.as_bytes()).await;
        assert!(read_response(&mut stream).await.starts_with("HTTP/1.1 200"));
        tokio::time::sleep(Duration::from_millis(600)).await;
    }
    assert_eq!(seen.count(), 3);
    write(&mut stream, b"GET /openai/v1/mo").await;
    let (closed, _) = until_closed(&mut stream, Duration::from_secs(5)).await;
    let closed = closed.expect("a half-sent head was held past 5 s");
    assert!(
        closed >= Duration::from_millis(800) && closed < Duration::from_secs(3),
        "closed after {closed:?}, not at the 1 s header read timeout"
    );
    assert_eq!(seen.count(), 3);
}

#[tokio::test]
async fn idle_keep_alive_connections_close_at_the_idle_timeout_but_busy_ones_do_not() {
    let dir = TempDir::new("gw-idle");
    let (upstream, seen) = spawn_upstream().await;
    // An upstream that takes longer than the idle timeout to answer.
    let slow = spawn_axum(Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_millis(2500)).await;
        "slow but sure"
    }))
    .await;
    let (key, _) = issue(&dir.file(), "alice", &["openai"]).await;
    let text = with_server(
        &config(&dir.file(), upstream),
        "header_read_timeout_secs = 10\nidle_timeout_secs = 1",
    )
    .replace(
        &format!("upstream = \"http://{upstream}/base\""),
        &format!("upstream = \"http://{slow}\""),
    );
    let gw = start(&text).await;
    let request = format!(
        "GET /openai/v1/models HTTP/1.1\r\nhost: gw\r\nx-api-key: {}\r\n\r\n",
        key.expose()
    );

    // A connection that never sends a byte is idle from the start.
    let mut silent = connect(gw.addr).await;
    // A kept-alive connection: two requests half a second apart are both served...
    let mut kept = connect(gw.addr).await;
    write(&mut kept, request.as_bytes()).await;
    assert!(read_response(&mut kept).await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    write(&mut kept, request.as_bytes()).await;
    assert!(read_response(&mut kept).await.starts_with("HTTP/1.1 200"));
    // ...and once idle for the idle timeout (well before the header read timeout) it closes.
    let (closed, _) = until_closed(&mut kept, Duration::from_secs(5)).await;
    let closed = closed.expect("an idle connection was kept past 5 s");
    assert!(
        closed >= Duration::from_millis(800),
        "closed after {closed:?}"
    );
    let (closed, _) = until_closed(&mut silent, Duration::from_secs(1)).await;
    assert!(
        closed.is_some(),
        "a silent connection was kept past the idle timeout"
    );
    assert_eq!(seen.count(), 2);

    // A request whose upstream answers after 2.5 s is being served, not idle.
    let mut busy = connect(gw.addr).await;
    write(
        &mut busy,
        format!(
            "POST /anthropic/v1/messages HTTP/1.1\r\nhost: gw\r\nx-api-key: {}\r\ncontent-length: 2\r\n\r\n{{}}",
            key.expose()
        )
        .as_bytes(),
    )
    .await;
    let answer = read_response(&mut busy).await;
    assert!(
        answer.starts_with("HTTP/1.1 200") && answer.ends_with("slow but sure"),
        "{answer}"
    );
}

#[tokio::test]
async fn a_stalled_request_body_is_answered_408_and_the_connection_closed() {
    let dir = TempDir::new("gw-stall");
    // An upstream that records the length of every body it received whole.
    let complete = Arc::new(std::sync::Mutex::new(Vec::new()));
    let bodies = complete.clone();
    let upstream = spawn_axum(Router::new().fallback(move |req: axum::extract::Request| {
        let bodies = bodies.clone();
        async move {
            if let Ok(body) = axum::body::to_bytes(req.into_body(), 1 << 20).await {
                bodies.lock().unwrap().push(body.len());
            }
            "upstream ok"
        }
    }))
    .await;
    let (key, _) = issue(&dir.file(), "alice", &["openai"]).await;
    let gw = start(&with_server(
        &config(&dir.file(), upstream),
        "body_timeout_secs = 1",
    ))
    .await;
    let head = format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nhost: gw\r\nx-api-key: {}\r\ncontent-length: 100\r\n\r\n",
        key.expose()
    );

    // Ten bytes of a hundred, then nothing.
    let mut stalled = connect(gw.addr).await;
    write(&mut stalled, head.as_bytes()).await;
    write(&mut stalled, b"{\"model\":").await;
    let (closed, answer) = until_closed(&mut stalled, Duration::from_secs(5)).await;
    let answer = String::from_utf8_lossy(&answer);
    let closed = closed.unwrap_or_else(|| panic!("a stalled body was waited on for 5 s: {answer}"));
    assert!(closed >= Duration::from_millis(900), "{closed:?}");
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("request_body_timeout"), "{answer}");
    assert!(
        complete.lock().unwrap().is_empty(),
        "the upstream got a whole body"
    );

    // A body that keeps coming, slowly, is not stalled: 100 bytes over 2.5 s.
    let mut slow = connect(gw.addr).await;
    write(&mut slow, head.as_bytes()).await;
    for _ in 0..5 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        write(&mut slow, &[b' '; 20]).await;
    }
    let answer = read_response(&mut slow).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(*complete.lock().unwrap(), [100]);
}

#[tokio::test]
async fn connections_past_the_limit_wait_until_one_ends() {
    let dir = TempDir::new("gw-cap");
    let (upstream, seen) = spawn_upstream().await;
    let (key, _) = issue(&dir.file(), "alice", &["openai"]).await;
    let gw = start(&with_server(
        &config(&dir.file(), upstream),
        "max_connections = 2\nidle_timeout_secs = 30",
    ))
    .await;
    let first = connect(gw.addr).await;
    let _second = connect(gw.addr).await;
    // Let the server take both before the third arrives.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = connect(gw.addr).await;
    write(
        &mut third,
        format!(
            "GET /openai/v1/models HTTP/1.1\r\nhost: gw\r\nx-api-key: {}\r\n\r\n",
            key.expose()
        )
        .as_bytes(),
    )
    .await;
    let waited = tokio::time::timeout(Duration::from_millis(800), read_response(&mut third)).await;
    assert!(
        waited.is_err(),
        "a third connection was served past max_connections = 2"
    );
    assert_eq!(seen.count(), 0);
    drop(first);
    let answer = tokio::time::timeout(Duration::from_secs(3), read_response(&mut third))
        .await
        .expect("the waiting connection was served once a slot freed");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(seen.count(), 1);
}

#[tokio::test]
async fn oversized_heads_and_too_many_headers_are_431_and_reach_nothing() {
    let dir = TempDir::new("gw-431");
    let (upstream, seen) = spawn_upstream().await;
    let (key, _) = issue(&dir.file(), "alice", &["openai"]).await;
    let gw = start(&with_server(
        &config(&dir.file(), upstream),
        "max_header_bytes = 2048\nmax_headers = 16",
    ))
    .await;
    let request = |extra: &str| {
        format!(
            "GET /openai/v1/models HTTP/1.1\r\nhost: gw\r\nx-api-key: {}\r\n{extra}connection: close\r\n\r\n",
            key.expose()
        )
    };
    let big = format!("x-big: {}\r\n", "a".repeat(3000));
    let many: String = (0..20).map(|i| format!("x-h{i}: 1\r\n")).collect();
    for (what, extra) in [("a 3 KB header", big), ("20 headers", many)] {
        let answer = support::raw_exchange(gw.addr, request(&extra).as_bytes()).await;
        assert_eq!(support::raw_status(&answer), 431, "{what}: {answer}");
    }
    assert_eq!(seen.count(), 0);
    let within: String = (0..10)
        .map(|i| format!("x-h{i}: {}\r\n", "b".repeat(100)))
        .collect();
    let answer = support::raw_exchange(gw.addr, request(&within).as_bytes()).await;
    assert_eq!(support::raw_status(&answer), 200, "{answer}");
    assert_eq!(seen.count(), 1);
}

/// The default limit of 100 headers is hyper's own (the gateway leaves hyper's default in
/// place rather than setting the same number): 101 headers are refused, 90 are served.
#[tokio::test]
async fn the_default_header_count_limit_is_100() {
    let dir = TempDir::new("gw-431-default");
    let (upstream, seen) = spawn_upstream().await;
    let (key, _) = issue(&dir.file(), "alice", &["openai"]).await;
    let gw = start(&config(&dir.file(), upstream)).await;
    let request = |count: usize| {
        let extra: String = (0..count).map(|i| format!("x-h{i}: 1\r\n")).collect();
        format!(
            "GET /openai/v1/models HTTP/1.1\r\nhost: gw\r\nx-api-key: {}\r\n{extra}connection: close\r\n\r\n",
            key.expose()
        )
    };
    // host, x-api-key and connection are three of them.
    let answer = support::raw_exchange(gw.addr, request(98).as_bytes()).await;
    assert_eq!(support::raw_status(&answer), 431, "101 headers: {answer}");
    assert_eq!(seen.count(), 0);
    let answer = support::raw_exchange(gw.addr, request(87).as_bytes()).await;
    assert_eq!(support::raw_status(&answer), 200, "90 headers: {answer}");
    assert_eq!(seen.count(), 1);
}

#[tokio::test]
async fn shutdown_stops_accepting_and_lets_the_request_in_progress_finish() {
    let dir = TempDir::new("gw-shutdown");
    let slow = spawn_axum(Router::new().fallback(|| async {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        "finished"
    }))
    .await;
    let (key, _) = issue(&dir.file(), "alice", &["openai"]).await;
    let mut gw = start(&config(&dir.file(), slow)).await;
    let mut idle = connect(gw.addr).await;
    let mut busy = connect(gw.addr).await;
    write(
        &mut busy,
        format!(
            "GET /openai/v1/models HTTP/1.1\r\nhost: gw\r\nx-api-key: {}\r\n\r\n",
            key.expose()
        )
        .as_bytes(),
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    gw.shutdown.take().unwrap().send(()).unwrap();
    // The idle connection closes at once; the busy one gets its whole answer.
    let (closed, _) = until_closed(&mut idle, Duration::from_millis(500)).await;
    assert!(closed.is_some(), "an idle connection outlived the shutdown");
    let answer = read_response(&mut busy).await;
    assert!(answer.ends_with("finished"), "{answer}");
    let served = tokio::time::timeout(Duration::from_secs(3), gw.served.take().unwrap())
        .await
        .expect("serve returned after the last request");
    served.unwrap().unwrap();
    assert!(tokio::net::TcpStream::connect(gw.addr).await.is_err());
}

#[test]
fn server_limit_mistakes_name_the_field() {
    let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let good = config(std::path::Path::new("/tmp/unused.json"), upstream);
    for (limit, field) in [
        (
            "header_read_timeout_secs = 0",
            "server.header_read_timeout_secs",
        ),
        (
            "header_read_timeout_secs = 301",
            "server.header_read_timeout_secs",
        ),
        ("idle_timeout_secs = 0", "server.idle_timeout_secs"),
        ("body_timeout_secs = 0", "server.body_timeout_secs"),
        ("send_timeout_secs = 0", "server.send_timeout_secs"),
        ("max_connections = 0", "server.max_connections"),
        ("max_header_bytes = 100", "server.max_header_bytes"),
        ("max_header_bytes = 2000000", "server.max_header_bytes"),
        ("max_headers = 0", "server.max_headers"),
    ] {
        let err = app::Config::from_toml(&with_server(&good, limit))
            .unwrap()
            .plan(&env)
            .err()
            .unwrap_or_else(|| panic!("{limit} accepted"));
        assert_eq!(err.field, field, "{err}");
    }
    let err = app::Config::from_toml(&with_server(&good, "read_timeout_secs = 5")).unwrap_err();
    assert!(err.message.contains("read_timeout_secs"), "{err}");
    // The defaults are safe ones.
    let plan = app::Config::from_toml(&good).unwrap().plan(&env).unwrap();
    assert!(plan.limits.header_read_timeout <= Duration::from_secs(30));
    assert!(plan.limits.idle_timeout <= Duration::from_secs(120));
    assert!(plan.limits.body_timeout <= Duration::from_secs(60));
    assert!(plan.limits.send_timeout <= Duration::from_secs(120));
    assert!(plan.limits.max_connections <= 10_000);
    assert!(plan.limits.max_header_bytes <= 64 * 1024);
    assert!(plan.limits.max_headers <= 100);
}

#[tokio::test]
async fn a_client_that_stops_reading_is_cut_off_at_the_send_timeout() {
    let dir = TempDir::new("gw-send");
    // An upstream whose answer never ends, as fast as it is taken.
    let endless = spawn_axum(Router::new().fallback(|| async {
        let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
        Body::from_stream(Repeat(chunk))
    }))
    .await;
    let (key, _) = issue(&dir.file(), "alice", &["openai"]).await;
    let gw = start(&with_server(
        &config(&dir.file(), endless),
        "send_timeout_secs = 1\nidle_timeout_secs = 30",
    ))
    .await;
    let mut reader = connect(gw.addr).await;
    write(
        &mut reader,
        format!(
            "GET /openai/v1/models HTTP/1.1\r\nhost: gw\r\nx-api-key: {}\r\n\r\n",
            key.expose()
        )
        .as_bytes(),
    )
    .await;
    // Not reading: the socket buffers fill, the gateway's writes block, then it gives up.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (closed, got) = until_closed(&mut reader, Duration::from_secs(5)).await;
    assert!(
        closed.is_some(),
        "still streaming to a client that stopped reading ({} bytes read)",
        got.len()
    );
}

/// A stream repeating one chunk forever.
struct Repeat(Bytes);

impl futures_core::Stream for Repeat {
    type Item = Result<Bytes, Infallible>;
    fn poll_next(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        std::task::Poll::Ready(Some(Ok(self.0.clone())))
    }
}

#[tokio::test]
async fn bodies_keep_their_framing_through_the_server_limits() {
    // The stalled-body timer wraps every request body: it must not turn a sized body (or
    // none) into a chunked one on the way to the upstream.
    let dir = TempDir::new("gw-framing");
    let (upstream, seen) = spawn_upstream().await;
    let (key, _) = issue(&dir.file(), "alice", &["openai"]).await;
    let gw = start(&config(&dir.file(), upstream)).await;
    let key = key.expose();
    let a = call(
        gw.addr,
        Method::POST,
        "/openai/v1/chat/completions",
        &[("x-api-key", key)],
        "{}",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let got = seen.last();
    assert_eq!(
        got.headers.get("content-length").map(|v| v.as_bytes()),
        Some(&b"2"[..])
    );
    assert!(
        got.headers.get("transfer-encoding").is_none(),
        "{:?}",
        got.headers
    );
    let a = call(
        gw.addr,
        Method::GET,
        "/openai/v1/models",
        &[("x-api-key", key)],
        "",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let got = seen.last();
    assert!(
        got.headers.get("transfer-encoding").is_none(),
        "{:?}",
        got.headers
    );
    assert!(
        got.headers.get("content-length").is_none_or(|v| v == "0"),
        "{:?}",
        got.headers
    );
}

#[tokio::test]
async fn every_refusal_of_a_route_names_one_realm_and_carries_its_reason() {
    let dir = TempDir::new("gw-realm");
    let (upstream, seen) = spawn_upstream().await;
    let (user, _) = issue(&dir.file(), "user", &["openai"]).await;
    let gw = start(&config(&dir.file(), upstream)).await;
    // /admin: 401 without a key, 403 with a key that is no admin, one realm for both.
    let missing = call(gw.addr, Method::GET, "/admin/keys", &[], "").await;
    let forbidden = get_key(gw.addr, "/admin/keys", user.expose()).await;
    assert_eq!(missing.status, StatusCode::UNAUTHORIZED);
    assert_eq!(forbidden.status, StatusCode::FORBIDDEN);
    assert_eq!(
        missing.headers["www-authenticate"],
        "Bearer realm=\"gateway\""
    );
    assert_eq!(
        forbidden.headers["www-authenticate"],
        "Bearer realm=\"gateway\", error=\"insufficient_scope\", scope=\"admin\""
    );
    // Each route in its dialect, whichever layer refuses: the inbound layer's 401 on the
    // Anthropic route, the scope layer's 403 on the OpenAI one; one realm everywhere.
    let a = call(gw.addr, Method::GET, "/anthropic/v1/models", &[], "").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    assert_eq!(
        a.json()["error"]["type"],
        "authentication_error",
        "{}",
        a.text()
    );
    assert_eq!(a.headers["www-authenticate"], "Bearer realm=\"gateway\"");
    let (other, _) = issue(&dir.file(), "no-scope", &[]).await;
    tokio::time::sleep(Duration::from_millis(250)).await;
    let a = get_key(gw.addr, "/openai/v1/models", other.expose()).await;
    assert_eq!(a.status, StatusCode::FORBIDDEN);
    assert_eq!(
        a.json()["error"]["code"],
        "insufficient_scope",
        "{}",
        a.text()
    );
    assert!(
        a.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .starts_with("Bearer realm=\"gateway\"")
    );
    // A path no route serves: the gateway's dialect, no challenge.
    let a = call(gw.addr, Method::GET, "/nowhere", &[], "").await;
    assert_eq!(
        (a.status, a.json()["error"]["code"].as_str()),
        (StatusCode::NOT_FOUND, Some("not_found"))
    );
    assert!(!a.headers.contains_key("www-authenticate"));
    assert_eq!(seen.count(), 0);
}

/// The audit file's events, one JSON object per line.
fn audit_lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.ends_with('\n'), "every event is a whole line");
    text.lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|e| panic!("{line}: {e}")))
        .collect()
}

#[tokio::test]
async fn every_management_action_is_in_the_audit_file_with_who_did_it_and_no_key_material() {
    let dir = TempDir::new("gw-audit");
    let audit = dir.0.join("audit.jsonl");
    let (upstream, _seen) = spawn_upstream().await;
    let (admin, admin_id) = issue(&dir.file(), "root", &["admin", "openai"]).await;
    let with_audit = format!(
        "audit_file = \"{}\"\n{}",
        audit.display(),
        config(&dir.file(), upstream)
    );
    let gw = start(&with_audit).await;
    let admin_call = |method: Method, path: String, body: &'static str| {
        let admin = admin.expose().to_owned();
        async move { call(gw.addr, method, &path, &[("x-api-key", &admin)], body).await }
    };

    let created = admin_call(Method::POST, "/admin/keys".into(), r#"{"name":"alice"}"#).await;
    assert_eq!(created.status, StatusCode::CREATED);
    let alice_key = created.json()["key"].as_str().unwrap().to_owned();
    let alice = created.json()["id"].as_str().unwrap().to_owned();
    for action in ["disable", "enable"] {
        let a = admin_call(Method::POST, format!("/admin/keys/{alice}/{action}"), "").await;
        assert_eq!(a.status, StatusCode::OK, "{action}");
    }
    let rotated = admin_call(Method::POST, format!("/admin/keys/{alice}/rotate"), "{}").await;
    assert_eq!(rotated.status, StatusCode::CREATED);
    let successor = rotated.json()["id"].as_str().unwrap().to_owned();
    let successor_key = rotated.json()["key"].as_str().unwrap().to_owned();
    let minted = admin_call(Method::POST, "/admin/ephemeral".into(), "{}").await;
    assert_eq!(minted.status, StatusCode::CREATED);
    let child = minted.json()["id"].as_str().unwrap().to_owned();
    let child_key = minted.json()["key"].as_str().unwrap().to_owned();
    // An ephemeral key may not mint: refused by the API's own rule, and still audited.
    let refused = call(
        gw.addr,
        Method::POST,
        "/admin/ephemeral",
        &[("x-api-key", &child_key)],
        "{}",
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    let revoked = admin_call(Method::POST, format!("/admin/keys/{successor}/revoke"), "").await;
    assert_eq!(revoked.status, StatusCode::OK);
    let deleted = admin_call(Method::DELETE, format!("/admin/keys/{alice}"), "").await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    let unknown = "key_00000000000";
    let missing = admin_call(Method::POST, format!("/admin/keys/{unknown}/revoke"), "").await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);

    let events = audit_lines(&audit);
    let summary: Vec<(String, String, String, String)> = events
        .iter()
        .map(|e| {
            let text = |field: &str| e[field].as_str().unwrap_or("null").to_owned();
            (
                text("actor"),
                text("action"),
                text("target"),
                text("outcome"),
            )
        })
        .collect();
    let by_admin = format!("key:{admin_id}");
    let row = |actor: &str, action: &str, target: &str, outcome: &str| {
        (
            actor.to_owned(),
            action.to_owned(),
            target.to_owned(),
            outcome.to_owned(),
        )
    };
    assert_eq!(
        summary,
        vec![
            row(&by_admin, "issue", &alice, "ok"),
            row(&by_admin, "disable", &alice, "ok"),
            row(&by_admin, "enable", &alice, "ok"),
            row(&by_admin, "rotate", &alice, "ok"),
            row(&by_admin, "mint_ephemeral", &child, "ok"),
            row(&format!("key:{child}"), "mint_ephemeral", "null", "refused"),
            row(&by_admin, "revoke", &successor, "ok"),
            row(&by_admin, "delete", &alice, "ok"),
            row(&by_admin, "revoke", unknown, "refused"),
        ]
    );
    assert_eq!(events[3]["successor"], successor.as_str());
    assert_eq!(events[5]["reason"], "forbidden");
    assert_eq!(events[8]["reason"], "not_found");
    for event in &events {
        let time = event["time"].as_str().unwrap();
        assert!(
            time.ends_with('Z') && time.len() == 20,
            "RFC 3339 UTC: {time}"
        );
    }

    // No key, digest or hint of any key involved is in the trail.
    let trail = std::fs::read_to_string(&audit).unwrap();
    let store = FileStore::builder(dir.file())
        .reload_every(None)
        .open()
        .unwrap();
    for key in [admin.expose(), &alice_key, &successor_key, &child_key] {
        use tower_gateway_auth::store::KeyStore;
        let digest = store.hasher().digest(key.as_bytes());
        for secret in [
            key.to_owned(),
            digest.to_hex(),
            format!("{digest:?}"),
            key[..12].to_owned(),
        ] {
            assert!(!trail.contains(&secret), "the audit file holds {secret}");
        }
    }
}

#[tokio::test]
async fn route_limits_and_model_lists_hold_in_the_gateway_and_keys_bring_their_own() {
    let dir = TempDir::new("gw-limits");
    let (upstream, seen) = spawn_upstream().await;
    let (paced, _) = issue(&dir.file(), "paced", &["openai"]).await;
    let (modeled, _) = issue(&dir.file(), "modeled", &["openai"]).await;
    let (admin, _) = issue(&dir.file(), "root", &["admin", "openai"]).await;
    let limited = config(&dir.file(), upstream).replace(
        "headers = { \"OpenAI-Organization\" = \"org-123\" }\n",
        "headers = { \"OpenAI-Organization\" = \"org-123\" }\n[route.limits]\nrequests_per_minute = 2\nmodels = [\"gpt-4o*\"]\n",
    );
    assert_ne!(
        limited,
        config(&dir.file(), upstream),
        "the limits are in the config"
    );
    let gw = start(&limited).await;
    let chat = |key: String, model: &'static str| async move {
        call(
            gw.addr,
            Method::POST,
            "/openai/v1/chat/completions",
            &[("authorization", &format!("Bearer {key}"))],
            &format!(r#"{{"model":"{model}","messages":[]}}"#),
        )
        .await
    };

    // The route's rate: 2 a minute, then 429 with the provider's headers and Retry-After.
    let mut statuses = Vec::new();
    for _ in 0..3 {
        let answer = chat(paced.expose().to_owned(), "gpt-4o-mini").await;
        statuses.push(answer.status.as_u16());
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            assert_eq!(answer.json()["error"]["code"], "rate_limit_exceeded");
            assert!(answer.headers.contains_key("retry-after"));
            assert_eq!(answer.headers["x-ratelimit-limit-requests"], "2");
            assert_eq!(answer.headers["x-ratelimit-remaining-requests"], "0");
        }
    }
    assert_eq!(statuses, [200, 200, 429]);
    assert_eq!(seen.count(), 2, "the refused request reached nothing");

    // The route's models: another model is 403 and never reaches the upstream.
    let refused = chat(modeled.expose().to_owned(), "o1").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.json()["error"]["code"], "model_not_allowed");
    assert_eq!(seen.count(), 2);

    // A key created with limits of its own through the management API: they show, and hold.
    let created = call(
        gw.addr,
        Method::POST,
        "/admin/keys",
        &[("x-api-key", admin.expose())],
        r#"{"name":"ci","scopes":["openai"],"limits":{"requests_per_period":1,"period":60},"models":["gpt-4o"]}"#,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{}", created.text());
    let body = created.json();
    assert_eq!(body["limits"]["requests_per_period"], 1);
    assert_eq!(body["models"], serde_json::json!(["gpt-4o"]));
    let own = body["key"].as_str().unwrap().to_owned();
    let first = chat(own.clone(), "gpt-4o").await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(
        first.headers["x-ratelimit-limit-requests"], "1",
        "the key's own rate"
    );
    assert_eq!(
        chat(own.clone(), "gpt-4o").await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(seen.count(), 3);

    // A misspelt limit is refused, not taken as no limit.
    let typo = call(
        gw.addr,
        Method::POST,
        "/admin/keys",
        &[("x-api-key", admin.expose())],
        r#"{"name":"typo","limits":{"rpm":1}}"#,
    )
    .await;
    assert_eq!(typo.status, StatusCode::BAD_REQUEST, "{}", typo.text());
}

#[tokio::test]
async fn the_gateway_serves_the_key_page_without_a_key_and_its_api_only_with_one() {
    let dir = TempDir::new("gw-page");
    let (upstream, _seen) = spawn_upstream().await;
    let (admin, _) = issue(&dir.file(), "root", &["admin"]).await;
    let gw = start(&config(&dir.file(), upstream)).await;
    let page = call(gw.addr, Method::GET, "/admin/", &[], "").await;
    assert_eq!(page.status, StatusCode::OK);
    assert!(page.text().contains("<title>API Keys</title>"));
    assert!(
        page.headers["content-security-policy"]
            .to_str()
            .unwrap()
            .starts_with("default-src 'self'")
    );
    assert_eq!(page.headers["x-frame-options"], "DENY");
    assert_eq!(page.headers["cache-control"], "no-store");
    let script = call(gw.addr, Method::GET, "/admin/ui/app.js", &[], "").await;
    assert_eq!(script.status, StatusCode::OK);
    let redirect = call(gw.addr, Method::GET, "/admin", &[], "").await;
    assert_eq!(redirect.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(redirect.headers["location"], "/admin/");

    let anonymous = call(gw.addr, Method::GET, "/admin/keys", &[], "").await;
    assert_eq!(anonymous.status, StatusCode::UNAUTHORIZED);
    let listed = get_key(gw.addr, "/admin/keys", admin.expose()).await;
    assert_eq!(listed.status, StatusCode::OK);
    assert!(!listed.text().contains(admin.expose()));
}

#[tokio::test]
async fn bodies_and_heads_larger_than_the_connection_buffers_pass_whole() {
    // The gateway bounds hyper's connection buffers (48 KiB past the head limit on the
    // client's side, 64 KiB towards the upstream) and flattens its writes to the client into
    // one buffer: bodies larger than either, and heads up to their limits, pass byte for byte.
    let dir = TempDir::new("gw-big");
    let received = Arc::new(std::sync::Mutex::new((0, Bytes::new())));
    let answer_body: Vec<u8> = (0..(1usize << 20) + 7).map(|i| (i % 251) as u8).collect();
    let upstream = spawn_axum(Router::new().fallback({
        let received = received.clone();
        let answer_body = answer_body.clone();
        move |headers: http::HeaderMap, body: Bytes| async move {
            let pad = headers.get("x-pad").map_or(0, |v| v.len());
            *received.lock().unwrap() = (pad, body);
            ([("x-long", "h".repeat(40_000))], answer_body)
        }
    }))
    .await;
    let (key, _) = issue(&dir.file(), "alice", &["openai"]).await;
    let gw = start(&with_server(
        &config(&dir.file(), upstream),
        "max_header_bytes = 131072",
    ))
    .await;
    let sent: String = (0..(1usize << 20) + 3)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    // A 120 KB request header: within `max_header_bytes`, past 64 KiB of buffer.
    let pad = "p".repeat(120_000);
    let a = call(
        gw.addr,
        Method::POST,
        "/openai/v1/files",
        &[("x-api-key", key.expose()), ("x-pad", &pad)],
        &sent,
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{:?}", a.headers);
    assert_eq!(a.body.len(), answer_body.len());
    assert!(
        a.body[..] == answer_body[..],
        "the response body changed on the way"
    );
    assert_eq!(a.headers["x-long"].len(), 40_000);
    let (pad_len, got) = received.lock().unwrap().clone();
    assert_eq!(pad_len, pad.len());
    assert_eq!(got.len(), sent.len());
    assert!(
        got[..] == *sent.as_bytes(),
        "the request body changed on the way"
    );
}
