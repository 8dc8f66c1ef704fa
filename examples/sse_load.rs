//! A load client for `scripts/streamtest.sh`: opens many concurrent server-sent-event
//! streams to one URL, each on its own HTTP/1.1 connection, reads every one to its end and
//! counts the events (blank-line separated) that arrived.
//!
//! ```text
//! cargo run --release --example sse_load -- --url http://127.0.0.1:8080/v1/stream \
//!     [--key KEY] [--streams 1000] [--ramp-ms 2000] [--expect 100]
//! ```
//!
//! Prints one line: `streams N ok N errors N events N expected N lost N`, where an error is
//! a stream that failed to connect, answered other than 200 or broke off, and `lost` counts
//! the events expected (`--expect` per stream) that never came. The streams are opened
//! evenly over `--ramp-ms` so that the listener's backlog never overflows. Loopback only:
//! the URL must be `http://127.0.0.1:…` or `http://localhost:…`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;

#[derive(Default)]
struct Totals {
    ok: AtomicU64,
    errors: AtomicU64,
    events: AtomicU64,
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mut url = None;
    let mut key = None;
    let mut streams = 1000u64;
    let mut ramp_ms = 2000u64;
    let mut expect = 100u64;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{arg} needs a value"));
        match arg.as_str() {
            "--url" => url = Some(value()),
            "--key" => key = Some(value()),
            "--streams" => streams = value().parse().expect("a count"),
            "--ramp-ms" => ramp_ms = value().parse().expect("milliseconds"),
            "--expect" => expect = value().parse().expect("a count"),
            other => panic!("unknown argument {other}"),
        }
    }
    let uri: http::Uri = url.expect("--url").parse().expect("a URL");
    let host = uri.host().expect("a host").to_owned();
    assert!(
        host == "127.0.0.1" || host == "localhost",
        "sse_load sends traffic to loopback only"
    );
    let addr = format!("{host}:{}", uri.port_u16().unwrap_or(80));
    let totals = Arc::new(Totals::default());
    let mut tasks = tokio::task::JoinSet::new();
    let gap = Duration::from_micros(ramp_ms * 1000 / streams.max(1));
    let mut pace = tokio::time::interval(gap.max(Duration::from_micros(1)));
    for _ in 0..streams {
        pace.tick().await;
        let (addr, uri, key, totals) = (addr.clone(), uri.clone(), key.clone(), totals.clone());
        tasks.spawn(async move {
            match stream(&addr, uri, key.as_deref()).await {
                Ok(events) => {
                    totals.ok.fetch_add(1, Ordering::Relaxed);
                    totals.events.fetch_add(events, Ordering::Relaxed);
                }
                Err((events, why)) => {
                    if totals.errors.fetch_add(1, Ordering::Relaxed) < 5 {
                        eprintln!("stream failed: {why}");
                    }
                    totals.events.fetch_add(events, Ordering::Relaxed);
                }
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let events = totals.events.load(Ordering::Relaxed);
    let expected = streams * expect;
    println!(
        "streams {streams} ok {} errors {} events {events} expected {expected} lost {}",
        totals.ok.load(Ordering::Relaxed),
        totals.errors.load(Ordering::Relaxed),
        expected.saturating_sub(events)
    );
}

/// One stream: the events it delivered, or those and why it failed.
async fn stream(addr: &str, uri: http::Uri, key: Option<&str>) -> Result<u64, (u64, String)> {
    let fail = |events, why: String| (events, why);
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| fail(0, format!("connect: {e}")))?;
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .map_err(|e| fail(0, format!("handshake: {e}")))?;
    tokio::spawn(conn);
    let mut req = http::Request::get(uri.path())
        .header("host", addr)
        .header("accept", "text/event-stream");
    if let Some(key) = key {
        req = req.header("authorization", format!("Bearer {key}"));
    }
    let res = send
        .send_request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .map_err(|e| fail(0, format!("request: {e}")))?;
    if res.status() != http::StatusCode::OK {
        return Err(fail(0, format!("status {}", res.status())));
    }
    let mut body = res.into_body();
    let (mut events, mut newline) = (0u64, false);
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| fail(events, format!("body: {e}")))?;
        if let Some(data) = frame.data_ref() {
            // An event ends at a blank line: two newlines in a row, whichever chunks they
            // came in.
            for &b in data.iter() {
                if b == b'\n' {
                    if newline {
                        events += 1;
                    }
                    newline = !newline;
                } else if b != b'\r' {
                    newline = false;
                }
            }
        }
    }
    Ok(events)
}
