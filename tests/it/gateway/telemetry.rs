//! The gateway's metrics listener and access log over real sockets: counts scraped from
//! `/metrics` as Prometheus would.

use std::collections::BTreeMap;
use std::sync::Arc;

use http::{Method, StatusCode};
use tower_gateway_auth::keys::KeyManager;
use tower_gateway_auth::store::FileStore;

use super::{OPENAI_SECRET, call, get_key, issue, start};
use crate::support::{TempDir, client, get, send, spawn_upstream};

/// A gateway with one route, `prefix`, whose keys need scope `scope`, and a metrics
/// listener on a free port. The prefix is unique to each test: every gateway in this
/// process records into the one global recorder.
fn config(keys_file: &std::path::Path, upstream: std::net::SocketAddr, prefix: &str) -> String {
    format!(
        r#"
listen = "127.0.0.1:0"
keys_file = "{keys}"
reload_ms = 100
metrics_listen = "127.0.0.1:0"
metrics_key_labels = 10

[[route]]
prefix = "/{prefix}"
upstream = "http://{upstream}"
provider = "openai"
credential_env = "OPENAI_API_KEY"
scope = "{prefix}"
"#,
        keys = keys_file.display()
    )
}

/// The samples of `name` in a Prometheus text exposition, by their label sets.
pub fn samples(text: &str, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .filter_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, labels) = match series.split_once('{') {
                Some((metric, labels)) => (metric, labels.strip_suffix('}')?),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let labels = labels
                .split(',')
                .filter(|l| !l.is_empty())
                .map(|l| {
                    let (k, v) = l.split_once('=').expect("label=value");
                    (k.to_owned(), v.trim_matches('"').to_owned())
                })
                .collect();
            Some((labels, value.parse().ok()?))
        })
        .collect()
}

/// The value of the one sample of `name` with exactly `labels`, if any.
fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let wanted: BTreeMap<String, String> = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    samples(text, name)
        .into_iter()
        .find(|(l, _)| *l == wanted)
        .map(|(_, v)| v)
}

async fn scrape(addr: std::net::SocketAddr, path: &str) -> (StatusCode, String) {
    let answer = send(&client(), get(addr, path, &[])).await;
    (answer.status, answer.text().to_owned())
}

#[tokio::test]
async fn metrics_count_each_refusal_and_each_allowed_request_under_the_route() {
    let route = "metrics-counted";
    let dir = TempDir::new("gw-metrics");
    let (upstream, seen) = spawn_upstream().await;
    let (good, good_id) = issue(&dir.file(), "good", &[route]).await;
    let (unscoped, _) = issue(&dir.file(), "unscoped", &["elsewhere"]).await;
    let (revoked, revoked_id) = issue(&dir.file(), "revoked", &[route]).await;
    let store = Arc::new(
        FileStore::builder(dir.file())
            .reload_every(None)
            .open()
            .unwrap(),
    );
    KeyManager::new(store)
        .revoke(revoked_id.parse().unwrap())
        .await
        .unwrap();
    let gw = start(&config(&dir.file(), upstream, route)).await;
    let metrics = gw._gateway.metrics.expect("metrics_listen is set");
    let path = format!("/{route}/v1/models");

    const ALLOWED: usize = 4;
    for _ in 0..ALLOWED {
        assert_eq!(get_key(gw.addr, &path, good.expose()).await.status, 200);
    }
    let mut refused = 0;
    for (key, status, times) in [
        (None, StatusCode::UNAUTHORIZED, 3),
        (Some("gw_not-a-key-at-all"), StatusCode::UNAUTHORIZED, 2),
        (Some(revoked.expose()), StatusCode::UNAUTHORIZED, 2),
        (Some(unscoped.expose()), StatusCode::FORBIDDEN, 1),
    ] {
        for _ in 0..times {
            let answer = match key {
                Some(key) => get_key(gw.addr, &path, key).await,
                None => call(gw.addr, Method::GET, &path, &[], "").await,
            };
            assert_eq!(answer.status, status);
            refused += 1;
        }
    }
    assert_eq!(seen.count(), ALLOWED, "only the allowed ones went upstream");

    let (status, text) = scrape(metrics, "/metrics").await;
    assert_eq!(status, StatusCode::OK);
    let requests = |outcome: &str| {
        sample(
            &text,
            "gateway_auth_requests_total",
            &[("route", route), ("outcome", outcome)],
        )
    };
    assert_eq!(requests("allowed"), Some(ALLOWED as f64), "{text}");
    assert_eq!(requests("missing"), Some(3.0));
    assert_eq!(requests("invalid"), Some(2.0));
    assert_eq!(requests("revoked"), Some(2.0));
    assert_eq!(requests("forbidden"), Some(1.0));
    let counted: f64 = samples(&text, "gateway_auth_requests_total")
        .iter()
        .filter(|(labels, _)| labels.get("route").map(String::as_str) == Some(route))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(
        counted,
        (ALLOWED + refused) as f64,
        "no other outcome: {text}"
    );

    // What the upstream answered, and by key: the allowed ones under the key's id.
    assert_eq!(
        sample(
            &text,
            "gateway_auth_upstream_responses_total",
            &[("route", route), ("class", "2xx")]
        ),
        Some(ALLOWED as f64)
    );
    assert_eq!(
        sample(
            &text,
            "gateway_auth_key_requests_total",
            &[("route", route), ("key", &good_id), ("outcome", "allowed")]
        ),
        Some(ALLOWED as f64)
    );
    assert_eq!(
        sample(
            &text,
            "gateway_auth_key_requests_total",
            &[
                ("route", route),
                ("key", &revoked_id),
                ("outcome", "revoked")
            ]
        ),
        Some(2.0)
    );
    assert!(
        samples(&text, "gateway_auth_upstream_seconds_count")
            .iter()
            .any(|(l, n)| l.get("route").map(String::as_str) == Some(route) && *n == ALLOWED as f64),
        "{text}"
    );
    // The keys file answers from memory, at once: no lookup waited, none was timed (the
    // store-lookup histogram is for stores a network hop away).
    assert!(!text.contains(good.expose()) && !text.contains(OPENAI_SECRET));

    // Only /metrics is served there.
    assert_eq!(scrape(metrics, "/").await.0, StatusCode::NOT_FOUND);
    assert_eq!(scrape(metrics, "/metrics/x").await.0, StatusCode::NOT_FOUND);
    // And the client listener does not serve it.
    assert_eq!(scrape(gw.addr, "/metrics").await.0, StatusCode::NOT_FOUND);
}

#[test]
fn telemetry_mistakes_name_the_field() {
    let base = r#"
[[route]]
prefix = "/x"
upstream = "echo"
provider = "openai"
"#;
    for (line, field) in [
        (r#"log_format = "xml""#, "log_format"),
        (r#"metrics_listen = "localhost""#, "metrics_listen"),
        ("metrics_key_labels = 10", "metrics_key_labels"),
    ] {
        let config = super::app::Config::from_toml(&format!("{line}\n{base}")).unwrap();
        let error = config.plan(&|_| None).err().expect(line);
        assert_eq!(error.field, field, "{line}: {}", error.message);
    }
    let config = super::app::Config::from_toml(&format!(
        "log_format = \"json\"\nmetrics_listen = \"127.0.0.1:9464\"\n{base}"
    ))
    .unwrap();
    assert_eq!(
        config.log_format().unwrap(),
        super::app::config::LogFormat::Json
    );
    assert!(config.plan(&|_| None).is_ok());
}
