//! What the gateway tells its operator: Prometheus metrics on a listener of their own
//! (`metrics_listen`), and the log format (`log_format`).
//!
//! The metrics are the library's (feature `metrics`; see `tower_gateway_auth::metrics`),
//! recorded through the `metrics` facade into one process-wide Prometheus recorder and
//! rendered at `GET /metrics` on `metrics_listen`. That listener is separate from the
//! client-facing one so that it can stay on a private address, and it answers nothing but
//! `/metrics` (404 elsewhere). Latencies (`*_seconds`) are Prometheus histograms, which
//! several replicas' scrapes can be summed into.

use std::convert::Infallible;
use std::io::IsTerminal;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body_util::Full;
use hyper::server::conn::http1;
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use super::config::LogFormat;

/// Histogram buckets of the `_seconds` metrics: a cached key check takes microseconds, a
/// model's answer minutes.
const BUCKETS: &[f64] = &[
    0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0, 120.0, 300.0,
];

/// How often the recorder's histograms are drained when nobody scrapes.
const UPKEEP: Duration = Duration::from_secs(5);

/// The process's Prometheus recorder, installed as the `metrics` global recorder on first
/// use. There is one per process (the facade has one global recorder), so every gateway
/// built in one process (tests) shares it; its upkeep runs on the runtime that first asked.
pub fn prometheus() -> Result<PrometheusHandle, String> {
    static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let handle = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), BUCKETS)
                .and_then(|builder| builder.install_recorder())
                .map_err(|e| format!("cannot install the Prometheus recorder: {e}"))?;
            let upkeep = handle.clone();
            tokio::spawn(async move {
                let mut every = tokio::time::interval(UPKEEP);
                loop {
                    every.tick().await;
                    upkeep.run_upkeep();
                }
            });
            Ok(handle)
        })
        .clone()
}

/// Serves `GET /metrics` on `listener` until the task is aborted.
pub async fn serve_metrics(listener: TcpListener, handle: PrometheusHandle) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "metrics listener: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let handle = handle.clone();
        let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
            let handle = handle.clone();
            async move { Ok::<_, Infallible>(answer(&req, &handle)) }
        });
        tokio::spawn(async move {
            // A scraper that hangs only holds its own connection.
            let conn = http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(Duration::from_secs(10))
                .serve_connection(TokioIo::new(stream), service);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "metrics connection ended with an error");
            }
        });
    }
}

fn answer<B>(req: &Request<B>, handle: &PrometheusHandle) -> Response<Full<Bytes>> {
    let plain = |status: StatusCode, body: String| {
        Response::builder()
            .status(status)
            .header(
                header::CONTENT_TYPE,
                "text/plain; version=0.0.4; charset=utf-8",
            )
            .body(Full::new(Bytes::from(body)))
            .expect("static status and headers are valid")
    };
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/metrics") => plain(StatusCode::OK, handle.render()),
        (_, "/metrics") => plain(StatusCode::METHOD_NOT_ALLOWED, "GET only\n".into()),
        _ => plain(StatusCode::NOT_FOUND, "not found: try /metrics\n".into()),
    }
}

/// Installs the process's log subscriber: `format`, to stdout, ANSI colours only when
/// stdout is a terminal (a file or a log collector gets none of the escape codes). `RUST_LOG`
/// set to a level (`off`, `error`, `warn`, `info`, `debug`, `trace`) is the most verbose
/// level logged; unset or anything else, `info`, access lines included.
pub fn init_logging(format: LogFormat) {
    let ansi = std::io::stdout().is_terminal();
    let level = std::env::var("RUST_LOG")
        .ok()
        .and_then(|v| {
            v.trim()
                .parse::<tracing_subscriber::filter::LevelFilter>()
                .ok()
        })
        .unwrap_or(tracing_subscriber::filter::LevelFilter::INFO);
    let builder = tracing_subscriber::fmt()
        .with_ansi(ansi)
        .with_max_level(level);
    match format {
        LogFormat::Text => builder.with_target(false).init(),
        // One JSON object a line; the target tells access lines (`gateway_auth::access`)
        // from the rest.
        LogFormat::Json => builder.json().with_target(true).init(),
    }
}
