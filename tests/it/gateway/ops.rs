//! Operating the gateway: the health probes, graceful shutdown of the real binary on
//! SIGTERM, and request ids end to end.

use super::{app, call, config, env, issue, start};
use crate::support;

use std::convert::Infallible;
use std::io::BufRead;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::Body;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use support::{ReceiverStream, TempDir, client, spawn_axum, spawn_upstream};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::mpsc;
use tower_gateway_auth::keys::{KeyManager, NewKey};

/// The gateway example's binary, next to this test binary's directory
/// (`target/<profile>/deps/it-…` → `target/<profile>/examples/gateway`). `cargo test` builds
/// the examples before it runs the tests; `cargo test --test it` alone does not.
fn gateway_binary() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    let profile = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("the test binary lives in target/<profile>/deps");
    let bin = profile
        .join("examples")
        .join(format!("gateway{}", std::env::consts::EXE_SUFFIX));
    assert!(
        bin.is_file(),
        "{} is missing: run `cargo test` (which builds the examples) or `cargo build --example gateway`",
        bin.display()
    );
    bin
}

/// A gateway process; killed if the test fails before it exits.
struct Process {
    child: Child,
    addr: SocketAddr,
    /// Its stdout, line by line (the log goes there too).
    lines: std::sync::mpsc::Receiver<String>,
}

impl Process {
    /// Starts the binary with `config`, waits for it to listen.
    fn start(config: &str, dir: &TempDir) -> Process {
        let path = dir.0.join("gateway.toml");
        std::fs::write(&path, config).unwrap();
        let mut child = Command::new(gateway_binary())
            .arg("--config")
            .arg(&path)
            .env("OPENAI_API_KEY", super::OPENAI_SECRET)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut process = Process {
            child,
            addr: "127.0.0.1:9".parse().unwrap(),
            lines,
        };
        let line = process.wait_for_line("gateway listening on http://");
        process.addr = line
            .rsplit("http://")
            .next()
            .unwrap()
            .trim()
            .parse()
            .unwrap_or_else(|e| panic!("{line:?}: {e}"));
        process
    }

    /// The first line (from now on) that contains `text`; panics after 10 s or at EOF.
    fn wait_for_line(&mut self, text: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if line.contains(text) => return line,
                Ok(_) => {}
                Err(e) => panic!("no line with {text:?} from the gateway: {e}"),
            }
        }
    }

    fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.child.id().to_string())
            .status()
            .unwrap();
        assert!(status.success(), "kill -{name} failed");
    }

    /// The exit status, within `limit`; panics otherwise.
    fn exit_within(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the gateway still runs {limit:?} after the signal"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An OpenAI-like upstream that streams `events` server-sent events, `every` apart.
async fn spawn_slow_sse(events: usize, every: Duration) -> SocketAddr {
    spawn_axum(Router::new().fallback(move || async move {
        let (tx, rx) = mpsc::channel::<Result<Bytes, Infallible>>(1);
        tokio::spawn(async move {
            for i in 0..events {
                if i > 0 {
                    tokio::time::sleep(every).await;
                }
                let event = format!("data: {{\"n\":{i}}}\n\n");
                if tx.send(Ok(Bytes::from(event))).await.is_err() {
                    return;
                }
            }
        });
        http::Response::builder()
            .header("content-type", "text/event-stream")
            .body(Body::from_stream(ReceiverStream(rx)))
            .unwrap()
    }))
    .await
}

/// A gateway config for the binary: one `/openai` route to `upstream`, `grace` seconds to
/// drain.
fn binary_config(keys_file: &std::path::Path, upstream: SocketAddr, grace: u64) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
keys_file = "{keys}"
workers = 2

[server]
shutdown_grace_secs = {grace}

[[route]]
prefix = "/openai"
upstream = "http://{upstream}"
provider = "openai"
credential_env = "OPENAI_API_KEY"
"#,
        keys = keys_file.display()
    )
}

/// Starts a streaming chat request through the gateway; returns the body once the first
/// event has arrived, and that event.
async fn start_stream(addr: SocketAddr, key: &str) -> (hyper::body::Incoming, Bytes) {
    let req = Request::builder()
        .method(Method::POST)
        .uri(format!("http://{addr}/openai/v1/chat/completions"))
        .header("authorization", format!("Bearer {key}"))
        .body(Full::new(Bytes::from_static(br#"{"stream":true}"#)))
        .unwrap();
    let response = client().request(req).await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let mut body = response.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    (body, first)
}

fn events(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .split("\n\n")
        .filter(|e| !e.is_empty())
        .map(str::to_owned)
        .collect()
}

/// Whether a fresh connection to `addr` is refused, or accepted and closed without any
/// response to a request.
async fn refused(addr: SocketAddr) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return true;
    };
    let _ = stream
        .write_all(b"GET /healthz HTTP/1.1\r\nhost: gw\r\n\r\n")
        .await;
    let mut got = Vec::new();
    match tokio::time::timeout(Duration::from_secs(2), stream.read_to_end(&mut got)).await {
        Ok(_) => got.is_empty(),
        Err(_) => false,
    }
}

#[tokio::test]
async fn sigterm_lets_a_stream_finish_refuses_new_connections_and_exits_0() {
    let dir = TempDir::new("gw-sigterm");
    let upstream = spawn_slow_sse(10, Duration::from_millis(200)).await;
    let (key, _) = issue(&dir.file(), "streamer", &["openai"]).await;
    let mut gw = Process::start(&binary_config(&dir.file(), upstream, 10), &dir);
    let addr = gw.addr;
    let (body, first) = start_stream(addr, key.expose()).await;
    assert_eq!(events(&first), [r#"data: {"n":0}"#]);
    // A probe whose head is not complete yet is a request in progress: it is answered
    // after the signal, and says the gateway is going away.
    let mut probe = tokio::net::TcpStream::connect(addr).await.unwrap();
    probe
        .write_all(b"GET /readyz HTTP/1.1\r\nhost: gw\r\n")
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;

    gw.signal("TERM");
    let signalled = Instant::now();
    gw.wait_for_line("gateway: shutting down");
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(
        refused(addr).await,
        "a connection made after SIGTERM was served"
    );

    probe.write_all(b"\r\n").await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), probe.read_to_end(&mut answer))
        .await
        .expect("the probe was answered and its connection closed")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer).into_owned();
    assert_eq!(support::raw_status(&answer), 503, "{answer}");
    assert!(
        support::raw_body(&answer).contains(r#""reason":"shutting down""#),
        "{answer}"
    );

    let rest = body.collect().await.expect("the stream was cut").to_bytes();
    let mut all = events(&first);
    all.extend(events(&rest));
    let expected: Vec<String> = (0..10).map(|i| format!("data: {{\"n\":{i}}}")).collect();
    assert_eq!(all, expected);

    let status = gw.exit_within(Duration::from_secs(10));
    assert_eq!(status.code(), Some(0), "{status}");
    // The stream had about 1.8 s left: the gateway waited for it, not for the grace period.
    let took = signalled.elapsed();
    assert!(took < Duration::from_secs(5), "exit took {took:?}");
}

#[tokio::test]
async fn past_the_grace_period_a_long_stream_is_cut_and_the_gateway_still_exits_0() {
    let dir = TempDir::new("gw-grace");
    let upstream = spawn_slow_sse(10, Duration::from_millis(500)).await;
    let (key, _) = issue(&dir.file(), "streamer", &["openai"]).await;
    let mut gw = Process::start(&binary_config(&dir.file(), upstream, 1), &dir);
    let (mut body, first) = start_stream(gw.addr, key.expose()).await;
    let mut got = events(&first);

    gw.signal("INT");
    let signalled = Instant::now();
    let cut = loop {
        match body.frame().await {
            Some(Ok(frame)) => got.extend(events(&frame.into_data().unwrap())),
            Some(Err(e)) => break Some(e),
            None => break None,
        }
    };
    let cut_after = signalled.elapsed();
    assert!(cut.is_some(), "the stream ended cleanly after {got:?}");
    assert!(
        (2..10).contains(&got.len()),
        "events before the cut: {got:?}"
    );
    assert!(
        cut_after >= Duration::from_millis(900) && cut_after < Duration::from_secs(4),
        "cut {cut_after:?} after the signal, with a 1 s grace period"
    );
    let status = gw.exit_within(Duration::from_secs(4));
    assert_eq!(status.code(), Some(0), "{status}");
}

#[tokio::test]
async fn probes_need_no_key_never_reach_the_upstream_and_are_never_cached() {
    let dir = TempDir::new("gw-probes");
    let (upstream, seen) = spawn_upstream().await;
    let (key, _) = issue(&dir.file(), "alice", &["openai"]).await;
    let gw = start(&config(&dir.file(), upstream)).await;

    for path in ["/healthz", "/readyz", "/readyz?verbose=1"] {
        // A wrong key changes nothing: the probe is not an authentication attempt.
        for headers in [&[][..], &[("x-api-key", "gw_wrong-key")]] {
            let a = call(gw.addr, Method::GET, path, headers, "").await;
            assert_eq!(a.status, StatusCode::OK, "{path}: {}", a.text());
            assert_eq!(a.json(), serde_json::json!({"status": "ok"}));
            assert_eq!(a.headers["cache-control"], "no-store");
            assert_eq!(a.headers["content-type"], "application/json");
            assert!(a.headers.get("www-authenticate").is_none());
        }
        let a = call(gw.addr, Method::HEAD, path, &[], "").await;
        assert_eq!((a.status, a.body.len()), (StatusCode::OK, 0));
        for method in [Method::POST, Method::PUT, Method::DELETE] {
            let a = call(gw.addr, method.clone(), path, &[], "{}").await;
            assert_eq!(a.status, StatusCode::METHOD_NOT_ALLOWED, "{method} {path}");
            assert_eq!(a.headers["allow"], "GET, HEAD");
            assert_eq!(a.headers["cache-control"], "no-store");
        }
    }
    assert_eq!(seen.count(), 0, "a probe reached the upstream");
    // Only those exact paths are probes; the routes still ask for a key.
    let a = call(gw.addr, Method::GET, "/healthz/x", &[], "").await;
    assert_eq!(a.status, StatusCode::NOT_FOUND);
    let a = call(gw.addr, Method::GET, "/openai/healthz", &[], "").await;
    assert_eq!(a.status, StatusCode::UNAUTHORIZED);
    let a = call(
        gw.addr,
        Method::GET,
        "/openai/healthz",
        &[("x-api-key", key.expose())],
        "",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    assert_eq!(seen.last().uri, "/healthz");
}

#[test]
fn probe_paths_cannot_be_route_prefixes_and_the_grace_period_is_checked() {
    let upstream: SocketAddr = "127.0.0.1:9".parse().unwrap();
    let good = config(std::path::Path::new("/tmp/unused.json"), upstream);
    for probe in ["/healthz", "/readyz"] {
        let text = good.replace("prefix = \"/anthropic\"", &format!("prefix = \"{probe}\""));
        let err = app::Config::from_toml(&text)
            .unwrap()
            .plan(&env)
            .err()
            .unwrap();
        assert_eq!(err.field, "route[1].prefix", "{err}");
        assert!(err.message.contains("probe"), "{err}");
    }
    let text = format!("{good}\n[server]\nshutdown_grace_secs = 3601\n");
    let err = app::Config::from_toml(&text)
        .unwrap()
        .plan(&env)
        .err()
        .unwrap();
    assert_eq!(err.field, "server.shutdown_grace_secs", "{err}");
    let text = format!("{good}\n[server]\nshutdown_grace_secs = 0\n");
    let plan = app::Config::from_toml(&text).unwrap().plan(&env).unwrap();
    assert_eq!(plan.limits.shutdown_grace, Duration::ZERO);
    let plan = app::Config::from_toml(&good).unwrap().plan(&env).unwrap();
    assert_eq!(plan.limits.shutdown_grace, Duration::from_secs(30));
    assert!(plan.keep_client_request_id);
}

/// Polls `/readyz` until it answers 200; panics after `limit`.
pub(super) async fn wait_until_ready(addr: SocketAddr, limit: Duration) {
    let started = Instant::now();
    loop {
        let a = call(addr, Method::GET, "/readyz", &[], "").await;
        if a.status == StatusCode::OK {
            assert_eq!(a.json(), serde_json::json!({"status": "ok"}));
            return;
        }
        assert!(
            started.elapsed() < limit,
            "still not ready after {limit:?}: {}",
            a.text()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// `url` with `user:password@` in it.
fn with_user(url: &str, user: &str, password: &str) -> String {
    let rest = url
        .strip_prefix("redis://")
        .expect("a redis:// URL without credentials");
    format!("redis://{user}:{password}@{rest}")
}

#[tokio::test]
async fn with_redis_readyz_is_503_until_the_invalidation_listener_subscribes() {
    let Some((url, _server)) = support::redis::redis_url() else {
        return;
    };
    let ns = support::redis::namespace();
    // A Redis user that may do everything but subscribe: the gateway connects and loads,
    // but its invalidation listener is refused until the test grants it the channels.
    let user = format!("gw-{ns}");
    let password = "probe-test-password";
    let admin = redis::Client::open(url.as_str()).unwrap();
    let mut con = admin.get_multiplexed_async_connection().await.unwrap();
    let acl = |args: &[&str]| {
        let mut cmd = redis::cmd("ACL");
        cmd.arg("SETUSER").arg(&user).arg(args);
        cmd
    };
    let _: () = acl(&[
        "reset",
        "on",
        &format!(">{password}"),
        "~*",
        "resetchannels",
        "+@all",
    ])
    .query_async(&mut con)
    .await
    .unwrap();

    let keygen = std::sync::Arc::new(
        tower_gateway_auth::store::RedisStore::builder(&url)
            .namespace(&ns)
            .connect()
            .await
            .unwrap(),
    );
    let issued = KeyManager::new(keygen)
        .issue(NewKey::named("replicated").scopes(["openai"]))
        .await
        .unwrap();
    let (upstream, seen) = spawn_upstream().await;
    let text = config(std::path::Path::new("unused"), upstream).replace(
        "keys_file = \"unused\"",
        &format!(
            "redis_url = \"{}\"\nredis_namespace = \"{ns}\"",
            with_user(&url, &user, password)
        ),
    );
    let gw = start(&text).await;
    let key = issued.key.expose();

    // Long enough for several subscription attempts to have been refused.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let a = call(gw.addr, Method::GET, "/readyz", &[], "").await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
    assert_eq!(
        a.json(),
        serde_json::json!({"status": "not ready", "reason": "redis invalidation listener not subscribed"})
    );
    assert_eq!(a.headers["cache-control"], "no-store");
    let a = call(gw.addr, Method::GET, "/healthz", &[], "").await;
    assert_eq!(a.status, StatusCode::OK, "alive while not ready");
    // Keys are not served before revocations can reach this replica.
    let a = call(
        gw.addr,
        Method::GET,
        "/openai/v1/models",
        &[("x-api-key", key)],
        "",
    )
    .await;
    assert_eq!(a.status, StatusCode::SERVICE_UNAVAILABLE, "{}", a.text());
    assert_eq!(a.json()["error"]["code"], "auth_unavailable");
    assert_eq!(seen.count(), 0);

    let _: () = acl(&["allchannels"]).query_async(&mut con).await.unwrap();
    // The listener retries at most 2 s apart.
    wait_until_ready(gw.addr, Duration::from_secs(5)).await;
    let a = call(
        gw.addr,
        Method::GET,
        "/openai/v1/models",
        &[("x-api-key", key)],
        "",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK, "{}", a.text());
    assert_eq!(seen.count(), 1);
    let _: () = redis::cmd("ACL")
        .arg("DELUSER")
        .arg(&user)
        .query_async(&mut con)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_well_formed_client_request_id_reaches_the_upstream_and_comes_back() {
    let dir = TempDir::new("gw-request-id");
    let (upstream, seen) = spawn_upstream().await;
    let (key, _) = issue(&dir.file(), "alice", &["openai"]).await;
    let gw = start(&config(&dir.file(), upstream)).await;
    let key = key.expose();
    let is_fresh =
        |id: &str| id.len() == 36 && id.as_bytes()[14] == b'4' && id.matches('-').count() == 4;

    let id = "trace-01HZX:7.a_b";
    let a = call(
        gw.addr,
        Method::GET,
        "/openai/v1/models",
        &[("x-api-key", key), ("x-request-id", id)],
        "",
    )
    .await;
    assert_eq!(a.status, StatusCode::OK);
    let got = seen.last();
    assert_eq!(
        got.headers
            .get_all("x-request-id")
            .iter()
            .collect::<Vec<_>>(),
        [id]
    );
    // The gateway's id replaces the upstream's own on the way back: the client sees its own.
    assert_eq!(a.headers["x-request-id"], id);

    let long = "x".repeat(129);
    for bad in ["two words", "a/b", "{\"json\":1}", &long] {
        let a = call(
            gw.addr,
            Method::GET,
            "/openai/v1/models",
            &[("x-api-key", key), ("x-request-id", bad)],
            "",
        )
        .await;
        let got = seen.last();
        let sent: Vec<_> = got.headers.get_all("x-request-id").iter().collect();
        assert_eq!(sent.len(), 1, "{bad}");
        let fresh = sent[0].to_str().unwrap();
        assert!(is_fresh(fresh), "{bad:?} became {fresh:?}");
        assert_eq!(a.headers["x-request-id"], fresh);
        assert!(!got.everything().contains(bad), "{bad:?} passed on");
    }

    // Configured otherwise, even a good id is replaced.
    let text = config(&dir.file(), upstream).replace(
        "reload_ms = 100",
        "reload_ms = 100\nkeep_client_request_id = false",
    );
    let gw = start(&text).await;
    let a = call(
        gw.addr,
        Method::GET,
        "/openai/v1/models",
        &[("x-api-key", key), ("x-request-id", id)],
        "",
    )
    .await;
    let sent = seen.last().headers["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(is_fresh(&sent), "{sent}");
    assert_eq!(a.headers["x-request-id"], sent.as_str());
}
