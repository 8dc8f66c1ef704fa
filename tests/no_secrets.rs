//! No key, digest or pepper ever shows up in a log line or a `Debug` print.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex};

use http::{HeaderName, Request};
use support::{Recorder, read};
use tower::{ServiceBuilder, ServiceExt};
use tower_gateway_auth::{
    BoxLookup, InboundApiKeyLayer, KeyDigest, KeyHasher, KeyId, KeyRecord, KeyStatus, KeyStore,
    MemoryStore, StoreError,
};

#[derive(Clone, Default)]
struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Buffer {
    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }
}

struct Failing;

impl KeyStore for Failing {
    type Lookup = BoxLookup;
    fn lookup(&self, _: &KeyDigest) -> BoxLookup {
        Box::pin(async { Err(StoreError::new("redis unreachable")) })
    }
}

#[tokio::test]
async fn logs_and_debug_prints_name_keys_only_by_id_or_fingerprint() {
    let logs = Buffer::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::TRACE)
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    let _guard = tracing::subscriber::set_default(subscriber);

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
