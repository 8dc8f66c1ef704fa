//! Per-key limits in the reference gateway with `redis_url`: replicas that share a Redis
//! (or a 3-master Redis Cluster) hold one limit, `[limiter] on_redis_error` does what it
//! says, and the management API changes limits (`PATCH`) and shows usage.

use super::{app, call, config, get_key, start};
use crate::support;

use std::sync::Arc;
use std::time::Duration;

use http::{Method, StatusCode};
use support::redis::{RedisCluster, RedisServer, namespace};
use support::spawn_upstream;
use tower_gateway_auth::keys::{KeyManager, NewKey};
use tower_gateway_auth::limit::{Limits, Rate};
use tower_gateway_auth::store::RedisStore;

/// The gateway config of `gateway.rs` on Redis at `urls` (a TOML value), namespace `ns`,
/// with `extra` top-level lines.
fn on_redis(upstream: std::net::SocketAddr, urls: &str, ns: &str, extra: &str) -> String {
    config(std::path::Path::new("unused"), upstream)
        .replace(
            "keys_file = \"unused\"",
            &format!("redis_url = {urls}\nredis_namespace = \"{ns}\""),
        )
        // A table of its own: after every top-level key, before the routes.
        .replacen("\n[[route]]", &format!("\n{extra}\n[[route]]"), 1)
}

/// A key issued on the Redis at `url` as keygen issues it, with `limits`.
async fn issue(url: &str, ns: &str, limits: Limits) -> String {
    let store = RedisStore::builder(url)
        .namespace(ns)
        .connect()
        .await
        .unwrap();
    let issued = KeyManager::new(Arc::new(store))
        .issue(NewKey::named("limited").scopes(["openai"]).limits(limits))
        .await
        .unwrap();
    issued.key.expose().to_owned()
}

/// Sends 60 requests alternating between two replicas of a gateway on `urls`, for a key
/// limited to 30 a minute: exactly 30 pass in total and reach the upstream.
async fn two_replicas_hold_one_limit(seed: &str, urls: &str) {
    let ns = namespace();
    let (upstream, seen) = spawn_upstream().await;
    let key = issue(seed, &ns, Limits::new().with_rate(Rate::per_minute(30))).await;
    let text = on_redis(upstream, urls, &ns, "");
    let (a, b) = (start(&text).await, start(&text).await);
    super::ops::wait_until_ready(a.addr, Duration::from_secs(5)).await;
    super::ops::wait_until_ready(b.addr, Duration::from_secs(5)).await;
    let (mut passed, mut refused) = (0, 0);
    for i in 0..60 {
        let addr = if i % 2 == 0 { a.addr } else { b.addr };
        let answer = get_key(addr, "/openai/v1/models", &key).await;
        match answer.status {
            StatusCode::OK => {
                passed += 1;
                assert_eq!(answer.headers["x-ratelimit-limit-requests"], "30");
                assert_eq!(
                    answer.headers["x-ratelimit-remaining-requests"],
                    (30 - passed).to_string().as_str()
                );
            }
            StatusCode::TOO_MANY_REQUESTS => {
                refused += 1;
                assert_eq!(answer.json()["error"]["code"], "rate_limit_exceeded");
                let retry: u64 = answer.headers["retry-after"]
                    .to_str()
                    .unwrap()
                    .parse()
                    .unwrap();
                assert!((1..=2).contains(&retry), "{retry}");
                assert_eq!(
                    answer.headers["anthropic-ratelimit-requests-remaining"],
                    "0"
                );
            }
            other => panic!("request {i}: {other} {:?}", answer.body),
        }
    }
    assert_eq!((passed, refused), (30, 30));
    assert_eq!(seen.count(), 30, "the upstream saw only what passed");
}

#[tokio::test]
async fn two_gateway_replicas_on_one_redis_pass_30_of_60_requests_at_30_a_minute() {
    let Some(server) = RedisServer::start() else {
        return;
    };
    two_replicas_hold_one_limit(&server.url(), &format!("\"{}\"", server.url())).await;
}

#[tokio::test]
async fn two_gateway_replicas_on_a_3_master_cluster_pass_30_of_60_at_30_a_minute() {
    let Some(cluster) = RedisCluster::start() else {
        return;
    };
    let list: Vec<String> = cluster
        .urls()
        .split(',')
        .map(|u| format!("\"{u}\""))
        .collect();
    two_replicas_hold_one_limit(&cluster.urls(), &format!("[{}]", list.join(", "))).await;
}

/// A gateway with `on_redis_error = policy` whose key has been used once (so the key store's
/// cache holds it), then Redis killed; answers `count` more requests.
async fn after_redis_dies(policy: &str, count: usize) -> (Vec<support::Answer>, usize) {
    let mut server = RedisServer::start().expect("checked by the caller");
    let ns = namespace();
    let (upstream, seen) = spawn_upstream().await;
    let key = issue(
        &server.url(),
        &ns,
        Limits::new().with_rate(Rate::per_minute(3)),
    )
    .await;
    let text = on_redis(
        upstream,
        &format!("\"{}\"", server.url()),
        &ns,
        &format!("[limiter]\non_redis_error = \"{policy}\"\ntimeout_ms = 200\n"),
    );
    let gw = start(&text).await;
    super::ops::wait_until_ready(gw.addr, Duration::from_secs(5)).await;
    assert_eq!(
        get_key(gw.addr, "/openai/v1/models", &key).await.status,
        200
    );
    server.kill();
    let before = seen.count();
    let mut answers = Vec::new();
    for _ in 0..count {
        answers.push(get_key(gw.addr, "/openai/v1/models", &key).await);
    }
    (answers, seen.count() - before)
}

#[tokio::test]
async fn redis_down_with_on_redis_error_refuse_is_503_and_nothing_reaches_the_upstream() {
    if RedisServer::start().is_none() {
        return;
    }
    let (answers, reached) = after_redis_dies("refuse", 3).await;
    for a in &answers {
        assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{:?}", a.body);
        assert_eq!(a.json()["error"]["code"], "limiter_unavailable");
        assert!(!a.text().contains("127.0.0.1"), "{}", a.text());
    }
    assert_eq!(reached, 0);
}

#[tokio::test]
async fn redis_down_with_on_redis_error_allow_passes_everything_without_quota_headers() {
    if RedisServer::start().is_none() {
        return;
    }
    let (answers, reached) = after_redis_dies("allow", 6).await;
    for a in &answers {
        assert_eq!(a.status, StatusCode::OK);
        assert!(!a.headers.contains_key("x-ratelimit-remaining-requests"));
    }
    assert_eq!(
        reached, 6,
        "more than the 3 a minute: limits are off while Redis is"
    );
}

#[tokio::test]
async fn redis_down_with_on_redis_error_local_limits_in_the_replicas_memory() {
    if RedisServer::start().is_none() {
        return;
    }
    let (answers, reached) = after_redis_dies("local", 6).await;
    let statuses: Vec<u16> = answers.iter().map(|a| a.status.as_u16()).collect();
    // This replica's memory has seen none of the key's requests: 3 more pass, then 429.
    assert_eq!(statuses, [200, 200, 200, 429, 429, 429]);
    assert_eq!(reached, 3);
}

#[test]
fn limiter_settings_are_checked() {
    let upstream = "127.0.0.1:9".parse().unwrap();
    let field = |extra: &str, urls: &str| {
        let text = on_redis(upstream, urls, "ns", extra);
        match app::Config::from_toml(&text) {
            Err(e) => e.field,
            Ok(config) => config
                .plan(&super::env)
                .err()
                .map(|e| e.field)
                .unwrap_or_default(),
        }
    };
    let redis = "\"redis://127.0.0.1:6379\"";
    assert!(field("[limiter]\non_redis_error = \"maybe\"\n", redis).starts_with("line "));
    assert_eq!(
        field("[limiter]\nbackend = \"etcd\"\n", redis),
        "limiter.backend"
    );
    assert_eq!(field("[limiter]\nbackend = \"memory\"\n", redis), "");
    assert_eq!(
        field(
            "",
            "[\"redis://127.0.0.1:7000\", \"http://u:sk-pw@127.0.0.1:7001\"]"
        ),
        "redis_url"
    );
    let text = on_redis(
        upstream,
        "[\"redis://a:1\", \"http://u:sk-pw@b:2\"]",
        "ns",
        "",
    );
    let error = app::Config::from_toml(&text)
        .unwrap()
        .plan(&super::env)
        .err()
        .unwrap();
    assert!(!error.to_string().contains("sk-pw"), "{error}");
    // A redis backend without Redis.
    let memory = config(std::path::Path::new("/tmp/k.json"), upstream).replace(
        "reload_ms = 100",
        "reload_ms = 100\n[limiter]\nbackend = \"redis\"",
    );
    let error = app::Config::from_toml(&memory)
        .unwrap()
        .plan(&super::env)
        .err()
        .unwrap();
    assert_eq!(error.field, "limiter.backend");
}

/// The in-memory gateway with its first (admin) key, and a route limit of none.
async fn admin_gateway() -> (super::Running, String, support::Recorder) {
    let (upstream, seen) = spawn_upstream().await;
    let text =
        config(std::path::Path::new("unused"), upstream).replace("keys_file = \"unused\"\n", "");
    let gateway = app::build(app::Config::from_toml(&text).unwrap(), &super::env)
        .await
        .unwrap();
    let admin = gateway.first_key.as_ref().unwrap().expose().to_owned();
    (super::Running::serve(gateway).await, admin, seen)
}

async fn admin(
    gw: &super::Running,
    admin_key: &str,
    method: Method,
    path: &str,
    body: &str,
) -> support::Answer {
    call(
        gw.addr,
        method,
        &format!("/admin{path}"),
        &[
            ("x-api-key", admin_key),
            ("content-type", "application/json"),
        ],
        body,
    )
    .await
}

#[tokio::test]
async fn patch_changes_a_keys_limits_and_models_and_get_shows_its_usage() {
    let (gw, root, seen) = admin_gateway().await;
    let created = admin(
        &gw,
        &root,
        Method::POST,
        "/keys",
        r#"{"name":"app","scopes":["openai"]}"#,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED);
    let (id, key) = (
        created.json()["id"].as_str().unwrap().to_owned(),
        created.json()["key"].as_str().unwrap().to_owned(),
    );
    // No limits yet: usage shows only what is in flight.
    let shown = admin(&gw, &root, Method::GET, &format!("/keys/{id}"), "").await;
    assert_eq!(shown.json()["usage"], serde_json::json!({"in_flight": 0}));

    let patched = admin(
        &gw,
        &root,
        Method::PATCH,
        &format!("/keys/{id}"),
        r#"{"limits":{"requests_per_period":2,"period":60,"max_concurrent":4}}"#,
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK, "{:?}", patched.body);
    assert_eq!(patched.json()["limits"]["requests_per_period"], 2);
    assert!(patched.json().get("models").is_none());
    assert!(patched.json().get("key").is_none(), "no key in a view");

    for _ in 0..2 {
        assert_eq!(
            get_key(gw.addr, "/openai/v1/models", &key).await.status,
            200
        );
    }
    let third = get_key(gw.addr, "/openai/v1/models", &key).await;
    assert_eq!(third.status, StatusCode::TOO_MANY_REQUESTS);
    let shown = admin(&gw, &root, Method::GET, &format!("/keys/{id}"), "")
        .await
        .json();
    assert_eq!(shown["usage"]["in_flight"], 0);
    assert_eq!(shown["usage"]["requests_in_window"], 2);
    assert_eq!(shown["usage"]["remaining_requests"], 0);
    let reset = shown["usage"]["reset_seconds"].as_f64().unwrap();
    assert!(reset > 50.0 && reset <= 60.0, "{reset}");

    let chat = |model: &'static str| chat(gw.addr, key.clone(), model);
    // `null` removes the limits (the route has none): requests pass again; now models count.
    let patched = admin(
        &gw,
        &root,
        Method::PATCH,
        &format!("/keys/{id}"),
        r#"{"limits":null,"models":["gpt-4o*"]}"#,
    )
    .await;
    assert_eq!(patched.status, StatusCode::OK);
    assert!(patched.json().get("limits").is_none());
    assert_eq!(patched.json()["models"], serde_json::json!(["gpt-4o*"]));
    let before = seen.count();
    assert_eq!(chat("gpt-4o-mini").await.status, 200);
    let refused = chat("gpt-3.5-turbo").await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.json()["error"]["code"], "model_not_allowed");
    assert_eq!(
        seen.count(),
        before + 1,
        "the refused model reached nothing"
    );

    for (body, status) in [
        ("{}", StatusCode::BAD_REQUEST),
        (r#"{"limits":{"rpm":5}}"#, StatusCode::BAD_REQUEST),
        (r#"{"scopes":["admin"]}"#, StatusCode::BAD_REQUEST),
        ("not json", StatusCode::BAD_REQUEST),
    ] {
        let answer = admin(&gw, &root, Method::PATCH, &format!("/keys/{id}"), body).await;
        assert_eq!(answer.status, status, "{body}: {:?}", answer.body);
    }
    let missing = admin(
        &gw,
        &root,
        Method::PATCH,
        "/keys/key_0000000000000000",
        r#"{"models":null}"#,
    )
    .await;
    assert_eq!(missing.status, StatusCode::NOT_FOUND);
    // Only admins: the key itself may not lift its own limits.
    let own = call(
        gw.addr,
        Method::PATCH,
        &format!("/admin/keys/{id}"),
        &[("x-api-key", key.as_str())],
        r#"{"models":null}"#,
    )
    .await;
    assert_eq!(own.status, StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn an_ephemeral_key_can_only_narrow_its_parents_models() {
    let (gw, root, seen) = admin_gateway().await;
    let created = admin(
        &gw,
        &root,
        Method::POST,
        "/keys",
        r#"{"name":"parent","scopes":["openai"],"models":["gpt-4o*","o1"]}"#,
    )
    .await;
    let parent = created.json()["key"].as_str().unwrap().to_owned();
    let mint = |body: &'static str| {
        let parent = parent.clone();
        async move {
            call(
                gw.addr,
                Method::POST,
                "/admin/ephemeral",
                &[("x-api-key", parent.as_str())],
                body,
            )
            .await
        }
    };
    for wider in [
        r#"{"models":["gpt-*"]}"#,
        r#"{"models":["o1","claude-3-opus"]}"#,
        r#"{"models":["*"]}"#,
    ] {
        let refused = mint(wider).await;
        assert_eq!(
            refused.status,
            StatusCode::BAD_REQUEST,
            "{wider}: {:?}",
            refused.body
        );
        assert!(
            refused.text().contains("models its parent may not use"),
            "{}",
            refused.text()
        );
    }
    let narrowed = mint(r#"{"models":["gpt-4o-mini*"]}"#).await;
    assert_eq!(narrowed.status, StatusCode::CREATED, "{:?}", narrowed.body);
    assert_eq!(
        narrowed.json()["models"],
        serde_json::json!(["gpt-4o-mini*"])
    );
    let child = narrowed.json()["key"].as_str().unwrap().to_owned();
    let chat = |key: String, model: &'static str| chat(gw.addr, key, model);
    let before = seen.count();
    assert_eq!(
        chat(child.clone(), "gpt-4o-mini-2024-07-18").await.status,
        200
    );
    assert_eq!(
        chat(child.clone(), "gpt-4o").await.status,
        StatusCode::FORBIDDEN
    );
    assert_eq!(chat(parent.clone(), "gpt-4o").await.status, 200);
    assert_eq!(seen.count(), before + 2);
    // Without `models` a child gets the parent's list.
    let inherited = mint("{}").await;
    assert_eq!(
        inherited.json()["models"],
        serde_json::json!(["gpt-4o*", "o1"])
    );
}

/// A chat completion for `model` with `key`.
async fn chat(addr: std::net::SocketAddr, key: String, model: &str) -> support::Answer {
    call(
        addr,
        Method::POST,
        "/openai/v1/chat/completions",
        &[
            ("x-api-key", key.as_str()),
            ("content-type", "application/json"),
        ],
        &format!(r#"{{"model":"{model}","messages":[]}}"#),
    )
    .await
}

const OPENAI_SSE: &[u8] = include_bytes!("../../fixtures/usage/openai_chat.sse");

/// The in-memory gateway with its first (admin) key in front of an upstream streaming the
/// recorded OpenAI chat completion (53 tokens), with `route_limits` under the route and a
/// metrics listener.
async fn token_gateway(
    route_limits: &str,
    prefix: &str,
) -> (
    super::Running,
    String,
    std::sync::Arc<std::sync::Mutex<Vec<support::Received>>>,
) {
    let (upstream, seen) = support::spawn_canned("text/event-stream", OPENAI_SSE, 9).await;
    let text = config(std::path::Path::new("unused"), upstream)
        .replace("keys_file = \"unused\"\n", "metrics_listen = \"127.0.0.1:0\"\n")
        // Metrics go to one recorder per process: a route of its own per test.
        .replace("prefix = \"/openai\"", &format!("prefix = \"/{prefix}\""))
        .replacen(
            "headers = { \"OpenAI-Organization\" = \"org-123\" }\n",
            &format!("headers = {{ \"OpenAI-Organization\" = \"org-123\" }}\n[route.limits]\n{route_limits}\n"),
            1,
        );
    let gateway = app::build(app::Config::from_toml(&text).unwrap(), &super::env)
        .await
        .unwrap();
    let admin = gateway.first_key.as_ref().unwrap().expose().to_owned();
    (super::Running::serve(gateway).await, admin, seen)
}

fn stream_body() -> &'static str {
    r#"{"model":"gpt-4o-mini","stream":true,"messages":[{"role":"user","content":"hi"}]}"#
}

#[tokio::test]
async fn a_keys_token_budget_set_by_the_api_is_charged_shown_and_enforced_through_the_gateway() {
    let (gw, root, seen) = token_gateway("", "tok-budget").await;
    let created = admin(
        &gw,
        &root,
        Method::POST,
        "/keys",
        r#"{"name":"budgeted","scopes":["openai"],"limits":{"token_budget":100,"budget_period":"day","tokens_per_period":1000}}"#,
    )
    .await;
    assert_eq!(created.status, StatusCode::CREATED, "{:?}", created.body);
    assert_eq!(created.json()["limits"]["token_budget"], 100);
    assert_eq!(created.json()["limits"]["budget_period"], "day");
    let (id, key) = (
        created.json()["id"].as_str().unwrap().to_owned(),
        created.json()["key"].as_str().unwrap().to_owned(),
    );
    let bearer = format!("Bearer {key}");
    let chat = || stream_chat(gw.addr, "tok-budget", ("authorization", bearer.as_str()));
    let first = chat().await;
    assert_eq!(first.status, StatusCode::OK);
    assert!(
        !first.text().contains("\"choices\":[]"),
        "the added usage chunk is hidden"
    );
    assert_eq!(first.headers["x-ratelimit-limit-tokens"], "100");
    let sent: serde_json::Value =
        serde_json::from_slice(&seen.lock().unwrap().last().unwrap().body).unwrap();
    assert_eq!(sent["stream_options"]["include_usage"], true);

    // The charge lands as the stream ends on the gateway's side.
    let mut shown = serde_json::Value::Null;
    for _ in 0..200 {
        shown = admin(&gw, &root, Method::GET, &format!("/keys/{id}"), "")
            .await
            .json();
        if shown["usage"]["budget_used"] == 53 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(shown["usage"]["budget_used"], 53, "{shown}");
    assert_eq!(shown["usage"]["budget_remaining"], 47);
    assert_eq!(shown["usage"]["tokens_remaining"], 947);
    assert!(
        shown["usage"]["budget_resets_at"]
            .as_str()
            .unwrap()
            .ends_with("T00:00:00Z")
    );

    assert_eq!(
        chat().await.status,
        StatusCode::OK,
        "47 left: one more passes"
    );
    let mut refused = None;
    for _ in 0..200 {
        let answer = chat().await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = refused.expect("the budget was never spent");
    assert_eq!(refused.json()["error"]["code"], "insufficient_quota");
    assert!(refused.headers.contains_key("retry-after"));

    // The route's tokens, by kind: 19 prompt and 34 completion a request.
    let metrics = gw._gateway.metrics.expect("metrics_listen is set");
    let text = support::send(&support::client(), support::get(metrics, "/metrics", &[]))
        .await
        .text()
        .to_owned();
    let count = |kind: &str| {
        super::telemetry::samples(&text, "gateway_auth_tokens_total")
            .into_iter()
            .find(|(labels, _)| labels["route"] == "tok-budget" && labels["kind"] == kind)
            .map(|(_, v)| v)
    };
    let passed = (seen.lock().unwrap().len()) as f64;
    assert_eq!(count("prompt"), Some(19.0 * passed), "{text}");
    assert_eq!(count("completion"), Some(34.0 * passed));
}

#[tokio::test]
async fn route_token_limits_hold_for_keys_without_their_own() {
    let (gw, root, _) = token_gateway("tokens_per_minute = 50\n", "tok-route").await;
    let created = admin(
        &gw,
        &root,
        Method::POST,
        "/keys",
        r#"{"name":"plain","scopes":["openai"]}"#,
    )
    .await;
    let key = created.json()["key"].as_str().unwrap().to_owned();
    let chat = || stream_chat(gw.addr, "tok-route", ("x-api-key", key.as_str()));
    let first = chat().await;
    assert_eq!(first.status, StatusCode::OK);
    assert_eq!(first.headers["x-ratelimit-limit-tokens"], "50");
    let mut refused = None;
    for _ in 0..200 {
        let answer = chat().await;
        if answer.status == StatusCode::TOO_MANY_REQUESTS {
            refused = Some(answer);
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let refused = refused.expect("53 tokens spend 50 a minute");
    assert_eq!(refused.json()["error"]["type"], "tokens");
    assert_eq!(refused.json()["error"]["code"], "rate_limit_exceeded");
}

#[test]
fn route_token_settings_are_checked() {
    let upstream = "127.0.0.1:9".parse().unwrap();
    let field = |limits: &str| {
        let text = config(std::path::Path::new("/tmp/k.json"), upstream).replacen(
            "headers = { \"OpenAI-Organization\" = \"org-123\" }\n",
            &format!(
                "headers = {{ \"OpenAI-Organization\" = \"org-123\" }}\n[route.limits]\n{limits}\n"
            ),
            1,
        );
        match app::Config::from_toml(&text) {
            Err(e) => e.field,
            Ok(config) => config
                .plan(&super::env)
                .err()
                .map(|e| e.field)
                .unwrap_or_default(),
        }
    };
    assert_eq!(
        field("tokens_per_minute = 0"),
        "route[0].limits.tokens_per_minute"
    );
    assert_eq!(
        field("token_budget = 10\nbudget_period = \"year\""),
        "route[0].limits.budget_period"
    );
    assert_eq!(
        field("budget_period = \"day\""),
        "route[0].limits.budget_period"
    );
    assert_eq!(
        field("token_budget = 10\nbudget_period = \"week\"\ntokens_per_minute = 5"),
        ""
    );
}

/// A streamed chat completion with the credential header `auth`.
async fn stream_chat(
    addr: std::net::SocketAddr,
    prefix: &str,
    auth: (&str, &str),
) -> support::Answer {
    call(
        addr,
        Method::POST,
        &format!("/{prefix}/v1/chat/completions"),
        &[auth, ("content-type", "application/json")],
        stream_body(),
    )
    .await
}
