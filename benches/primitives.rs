//! Two per-request primitives, each against the alternatives in the same run:
//! `cargo bench --bench primitives`.
//!
//! - group `clock`: reading the current second. `cached_atomic` is what the crate did until
//!   it stopped starting a thread of its own (a second kept fresh in an atomic by a
//!   background thread: one load per read); `system_time` reads `SystemTime::now()`;
//!   `instant` reads `Instant::now()`, what a "has a second passed" check would cost before
//!   it saved anything; `realtime_coarse` reads `CLOCK_REALTIME_COARSE` (Linux);
//!   `system_clock` is [`SystemClock::now`] as shipped.
//! - group `request_id`: making one 36-byte UUID text. `handrolled` is the crate's former
//!   generator (a keyed SipHash of a counter, formatted by hand); `siphash_uuid` the same
//!   bytes formatted by the `uuid` crate (what ships); `uuid_new_v4` is `Uuid::new_v4()`,
//!   which asks the operating system for 16 bytes each time. `layer_none` and
//!   `layer_request_id` put the shipped generator in context: a `HeaderInjectLayer` request
//!   without and with a request id.

use std::hash::{BuildHasher, RandomState};
use std::hint::black_box;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::Request;
use tower::Layer;
use tower_gateway_auth::HeaderInjectLayer;
use tower_gateway_auth::clock::{Clock, SystemClock};
use tower_gateway_auth::inject::RequestId;

fn clock(c: &mut Criterion) {
    let mut group = c.benchmark_group("clock");
    static SECS: AtomicU64 = AtomicU64::new(0);
    SECS.store(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs(),
        Ordering::Relaxed,
    );
    group.bench_function("cached_atomic", |b| {
        b.iter(|| black_box(SECS.load(Ordering::Relaxed)))
    });
    group.bench_function("system_time", |b| {
        b.iter(|| {
            black_box(
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs()),
            )
        })
    });
    group.bench_function("instant", |b| b.iter(|| black_box(Instant::now())));
    group.bench_function("realtime_coarse", |b| {
        b.iter(|| {
            black_box(rustix::time::clock_gettime(
                rustix::time::ClockId::RealtimeCoarse,
            ))
        })
    });
    group.bench_function("system_clock", |b| b.iter(|| black_box(SystemClock.now())));
    group.finish();
}

/// The crate's request id generator before it used the `uuid` crate, verbatim.
fn handrolled() -> [u8; 36] {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let key = KEY.get_or_init(RandomState::new);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&key.hash_one((n, 0u8)).to_le_bytes());
    bytes[8..].copy_from_slice(&key.hash_one((n, 1u8)).to_le_bytes());
    bytes[6] = (bytes[6] & 0x0f) | 0x40;
    bytes[8] = (bytes[8] & 0x3f) | 0x80;
    const DIGIT_AT: [usize; 32] = {
        let mut at = [0; 32];
        let mut i = 0;
        while i < 32 {
            at[i] = i
                + (i >= 8) as usize
                + (i >= 12) as usize
                + (i >= 16) as usize
                + (i >= 20) as usize;
            i += 1;
        }
        at
    };
    let mut text = *b"00000000-0000-0000-0000-000000000000";
    for (i, b) in bytes.iter().enumerate() {
        text[DIGIT_AT[2 * i]] = HEX[usize::from(b >> 4)];
        text[DIGIT_AT[2 * i + 1]] = HEX[usize::from(b & 0xf)];
    }
    text
}

/// The same bytes, formatted by the `uuid` crate (as `src/inject/request_id.rs` does).
fn siphash_uuid() -> [u8; 36] {
    static KEY: OnceLock<RandomState> = OnceLock::new();
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let key = KEY.get_or_init(RandomState::new);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let mut bytes = [0u8; 16];
    bytes[..8].copy_from_slice(&key.hash_one((n, 0u8)).to_le_bytes());
    bytes[8..].copy_from_slice(&key.hash_one((n, 1u8)).to_le_bytes());
    let mut text = [0u8; 36];
    uuid::Builder::from_random_bytes(bytes)
        .into_uuid()
        .hyphenated()
        .encode_lower(&mut text);
    text
}

fn uuid_new_v4() -> [u8; 36] {
    let mut text = [0u8; 36];
    uuid::Uuid::new_v4().hyphenated().encode_lower(&mut text);
    text
}

mod support;
use support::{Bare, serve};

fn request_id(c: &mut Criterion) {
    let mut group = c.benchmark_group("request_id");
    group.bench_function("handrolled", |b| b.iter(|| black_box(handrolled())));
    group.bench_function("siphash_uuid", |b| b.iter(|| black_box(siphash_uuid())));
    group.bench_function("uuid_new_v4", |b| b.iter(|| black_box(uuid_new_v4())));

    let request = || {
        Request::get("/v1/chat/completions")
            .header("content-type", "application/json")
            .body(())
            .unwrap()
    };
    let mut none = HeaderInjectLayer::new().layer(Bare);
    group.bench_function("layer_none", |b| {
        b.iter_batched(request, |req| serve(&mut none, req), BatchSize::SmallInput)
    });
    let mut ids = HeaderInjectLayer::new()
        .request_id(RequestId::new())
        .layer(Bare);
    group.bench_function("layer_request_id", |b| {
        b.iter_batched(request, |req| serve(&mut ids, req), BatchSize::SmallInput)
    });
    group.finish();
}

criterion_group!(benches, clock, request_id);
criterion_main!(benches);
