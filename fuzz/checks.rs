//! The properties the fuzz targets check, in one file shared by the nightly fuzz targets
//! (`fuzz/fuzz_targets/*.rs`, through `#[path]`) and the stable corpus replay
//! (`tests/fuzz_corpus.rs`), so that CI runs exactly the checks the fuzzer ran over every
//! input it kept.
//!
//! Every function takes arbitrary bytes and panics when a property fails. Everything goes
//! through the crate's public API.
//!
//! Input shapes (text-friendly, so seeds can be written by hand):
//! - [`extract`]: `flags`, `picks`, then lines: method, URI, `name:value` headers. In the
//!   URI and header values `$K` is the valid key, `$R` a revoked one, `$E` the valid key
//!   percent-encoded byte by byte.
//! - [`query_rewrite`]: `flags`, then the raw query (same `$` templates).
//! - [`parse`]: any bytes, read as (lossy) UTF-8 and fed to every parser.
//! - [`admin_json`]: `route`, `caller`, `id`, then the body; when `id` picks a fuzzed id,
//!   the body's first line is the path id.
//! - [`model_body`]: `flags`, read cuts up to a `0xff`, then a request body sent by a key
//!   limited to `gpt-4o*`.
//! - [`usage_scan`]: `flags`, read cuts up to a `0xff`, then a response body.
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::{Future, Ready, ready};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, SEC_WEBSOCKET_PROTOCOL};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full};
use tower::{Layer, ServiceExt};
use tower_gateway_auth::clock::{ManualClock, Timestamp};
use tower_gateway_auth::inbound::{DEFAULT_SUBPROTOCOL_PREFIX, KeySource};
use tower_gateway_auth::keys::{
    Checksum, DEFAULT_MAX_EPHEMERAL_TTL, KeyDigest, KeyFormat, KeyId, KeyManager, KeyRecord,
    KeyStatus,
};
use tower_gateway_auth::rejection::{ErrorFormat, Realm, RejectionKind, is_grpc};
use tower_gateway_auth::store::{KeyStore, MemoryStore};
use tower_gateway_auth::tokens::{Framing, TokenUsage, UsageBody};
use tower_gateway_auth::upstream::Placement;
use tower_gateway_auth::upstream::Provider;
use tower_gateway_auth::{Identity, InboundApiKeyLayer, ManagementApi, Rejection, RejectionLayer};

/// A valid `gw` key (its checksum holds), known to the stores below.
pub const GOOD_KEY: &str = "gw_FuzzGoodKey000000000003Kimlu";
/// A valid `gw` key whose record is revoked.
pub const REVOKED_KEY: &str = "gw_FuzzRevokedKey0000000004cB2t";
const GOOD_ID: KeyId = KeyId::from_u64(1);
const REVOKED_ID: KeyId = KeyId::from_u64(2);

// ---------------------------------------------------------------------------------------
// Shared plumbing

/// Runs `f` to completion on this thread's current-thread runtime (built once per thread).
fn block_on<F: Future>(f: F) -> F::Output {
    thread_local! {
        static RT: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("a current-thread runtime");
    }
    RT.with(|rt| rt.block_on(f))
}

/// What the inner service saw of one request.
#[derive(Clone)]
struct Seen {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    identity: Option<Identity>,
}

/// An inner service that records what it received and marks its answer `x-inner: 1`.
#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<Seen>>>);

impl tower::Service<Request<()>> for Recorder {
    type Response = Response<Full<Bytes>>;
    type Error = Infallible;
    type Future = Ready<Result<Self::Response, Infallible>>;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<()>) -> Self::Future {
        self.0.lock().unwrap().push(Seen {
            method: req.method().clone(),
            uri: req.uri().clone(),
            headers: req.headers().clone(),
            identity: req.extensions().get::<Identity>().cloned(),
        });
        let response = Response::builder()
            .header("x-inner", "1")
            .body(Full::new(Bytes::from_static(b"inner")))
            .unwrap();
        ready(Ok(response))
    }
}

/// The parts of a request the layer reads.
#[derive(Clone)]
struct Raw {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
}

impl Raw {
    fn request(&self) -> Request<()> {
        let mut req = Request::builder()
            .method(self.method.clone())
            .uri(self.uri.clone())
            .body(())
            .unwrap();
        *req.headers_mut() = self.headers.clone();
        req
    }
}

/// Sends `raw` through `layer` over a recording inner service: what the inner service saw
/// (if it was called) and the response.
fn send(
    layer: &InboundApiKeyLayer<MemoryStore>,
    format: &ErrorFormat,
    raw: &Raw,
) -> (Option<Seen>, http::response::Parts, Bytes) {
    let recorder = Recorder::default();
    // The rejections in `format`, as a stack renders them.
    let service = RejectionLayer::new()
        .error_format(format.clone())
        .layer(layer.layer(recorder.clone()));
    let response = block_on(service.oneshot(raw.request())).unwrap();
    let (parts, body) = response.into_parts();
    let body = block_on(body.collect()).unwrap().to_bytes();
    let mut seen = recorder.0.lock().unwrap().clone();
    assert!(
        seen.len() <= 1,
        "the inner service was called {} times",
        seen.len()
    );
    let seen = seen.pop();
    assert_eq!(
        seen.is_some(),
        parts.headers.contains_key("x-inner"),
        "the inner service was called but its answer was not returned, or the reverse"
    );
    (seen, parts, body)
}

/// The store behind [`extract`] and [`query_rewrite`]: the valid key (scope `chat`) and the
/// revoked one.
fn store() -> Arc<MemoryStore> {
    static STORE: OnceLock<Arc<MemoryStore>> = OnceLock::new();
    STORE
        .get_or_init(|| {
            let store = MemoryStore::new();
            let digest = store.hasher().digest(GOOD_KEY.as_bytes());
            store.insert(
                KeyRecord::new(GOOD_ID, digest)
                    .with_name("good")
                    .with_scopes(["chat"]),
            );
            let digest = store.hasher().digest(REVOKED_KEY.as_bytes());
            store.insert(
                KeyRecord::new(REVOKED_ID, digest)
                    .with_name("revoked")
                    .with_scopes(["chat"])
                    .with_status(KeyStatus::Revoked),
            );
            Arc::new(store)
        })
        .clone()
}

/// `raw` with the `$` templates expanded (see the module docs).
fn expand(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 32);
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'$' && i + 1 < raw.len() {
            match raw[i + 1] {
                b'K' => out.extend_from_slice(GOOD_KEY.as_bytes()),
                b'R' => out.extend_from_slice(REVOKED_KEY.as_bytes()),
                b'E' => {
                    for b in GOOD_KEY.bytes() {
                        out.extend_from_slice(format!("%{b:02X}").as_bytes());
                    }
                }
                _ => {
                    out.push(raw[i]);
                    i += 1;
                    continue;
                }
            }
            i += 2;
            continue;
        }
        out.push(raw[i]);
        i += 1;
    }
    out
}

fn hex_digit(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

/// Percent-decoding as URIs have it (written here independently of the crate): `%XY` with
/// two hex digits is a byte, anything else stands for itself; `+` stays `+`.
fn pct_decode(s: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(s.len());
    let mut i = 0;
    while i < s.len() {
        if s[i] == b'%'
            && i + 2 < s.len()
            && let (Some(h), Some(l)) = (hex_digit(s[i + 1]), hex_digit(s[i + 2]))
        {
            out.push(h << 4 | l);
            i += 3;
            continue;
        }
        out.push(s[i]);
        i += 1;
    }
    out
}

/// A query's `&`-separated segments with their decoded names and values.
fn segments(query: &str) -> impl Iterator<Item = (&str, Vec<u8>, Vec<u8>)> {
    query.split('&').map(|segment| {
        let (name, value) = segment.split_once('=').unwrap_or((segment, ""));
        (
            segment,
            pct_decode(name.as_bytes()),
            pct_decode(value.as_bytes()),
        )
    })
}

/// The query the inner service must see once the parameters named in `removed` are
/// hidden: `None` (no `?`) when nothing is left, the original untouched when nothing was
/// removed, else the other segments byte for byte, in order.
fn expected_query<'q>(
    query: Option<&'q str>,
    removed: &[&str],
) -> Option<std::borrow::Cow<'q, str>> {
    let q = query?;
    let named = |name: &[u8]| removed.iter().any(|r| r.as_bytes() == name);
    if !segments(q).any(|(_, name, _)| named(&name)) {
        return Some(q.into());
    }
    let kept: Vec<&str> = segments(q)
        .filter(|(_, name, _)| !named(name))
        .map(|(segment, _, _)| segment)
        .collect();
    let kept = kept.join("&");
    (!kept.is_empty()).then_some(kept.into())
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    // Byte by byte rather than slice equality: libFuzzer intercepts every `memcmp`, which
    // made this search the costliest part of a run.
    let Some((&first, rest)) = needle.split_first() else {
        return true;
    };
    haystack
        .windows(needle.len())
        .any(|w| w[0] == first && w[1..].iter().zip(rest).all(|(a, b)| a == b))
}

/// Whether an `Authorization` value uses the Bearer scheme (RFC 9110: case-insensitive).
fn is_bearer(value: &[u8]) -> bool {
    let value = value.trim_ascii();
    let end = value
        .iter()
        .position(|&b| b == b' ' || b == b'\t')
        .unwrap_or(value.len());
    value[..end].eq_ignore_ascii_case(b"bearer")
}

fn values<'a>(headers: &'a HeaderMap, name: &HeaderName) -> Vec<&'a [u8]> {
    headers
        .get_all(name)
        .iter()
        .map(HeaderValue::as_bytes)
        .collect()
}

/// Neither the response's headers nor its body hold `key`.
fn assert_not_in_response(parts: &http::response::Parts, body: &[u8], key: &str, what: &str) {
    assert!(
        !contains(body, key.as_bytes()),
        "{what} in the response body"
    );
    for (name, value) in &parts.headers {
        assert!(
            !contains(value.as_bytes(), key.as_bytes()),
            "{what} in response header {name}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// extract: key extraction from arbitrary headers and URIs, with and without hiding

const IDENTITY_HEADER: &str = "x-consumer-id";

/// The layer configuration an [`extract`] input picks.
struct Case {
    sources: Vec<KeySource>,
    hide: bool,
    anonymous: bool,
    preflight: bool,
    identity_header: bool,
    formats: bool,
    scope: Option<&'static str>,
    max_len: usize,
    format: ErrorFormat,
}

impl Case {
    fn new(flags: u8, picks: u8) -> Self {
        let all = [
            KeySource::header(HeaderName::from_static("x-api-key")),
            KeySource::Bearer,
            KeySource::query("key"),
            KeySource::header(HeaderName::from_static("api-key")),
            KeySource::query("api_key"),
        ];
        let mut sources: Vec<KeySource> = all
            .into_iter()
            .enumerate()
            .filter(|(i, _)| picks & (1 << i) != 0)
            .map(|(_, s)| s)
            .collect();
        // The fifth pick brings the WebSocket subprotocol source along (no bit is free).
        if picks & 0x10 != 0 {
            sources.push(KeySource::subprotocol(DEFAULT_SUBPROTOCOL_PREFIX));
        }
        if sources.is_empty() {
            // The layer's default.
            sources = vec![
                KeySource::header(HeaderName::from_static("x-api-key")),
                KeySource::Bearer,
            ];
        }
        if picks & 0x20 != 0 {
            sources.reverse();
        }
        Case {
            sources,
            hide: flags & 1 != 0,
            anonymous: flags & 2 != 0,
            preflight: flags & 4 != 0,
            identity_header: flags & 8 != 0,
            formats: flags & 0x10 != 0,
            scope: match (flags >> 5) & 3 {
                1 => Some("chat"),
                2 => Some("admin"),
                _ => None,
            },
            max_len: if flags & 0x80 != 0 { 40 } else { 1024 },
            format: match picks >> 6 {
                0 => ErrorFormat::OpenAi,
                1 => ErrorFormat::Anthropic,
                2 => ErrorFormat::CodeMsg,
                _ => ErrorFormat::Problem,
            },
        }
    }

    fn layer(&self) -> InboundApiKeyLayer<MemoryStore> {
        let mut layer = InboundApiKeyLayer::from_shared(store());
        let default = [
            KeySource::header(HeaderName::from_static("x-api-key")),
            KeySource::Bearer,
        ];
        if self.sources != default {
            layer = layer.sources(self.sources.iter().cloned());
        }
        layer = layer
            .hide_credentials(self.hide)
            .allow_anonymous(self.anonymous)
            .allow_preflight(self.preflight)
            .max_key_len(self.max_len);
        if self.identity_header {
            layer = layer.identity_header(HeaderName::from_static(IDENTITY_HEADER));
        }
        if self.formats {
            layer = layer.key_formats([KeyFormat::new("gw").unwrap()]);
        }
        if let Some(scope) = self.scope {
            layer = layer.require_scopes([scope]);
        }
        layer
    }

    fn header_sources(&self) -> impl Iterator<Item = &HeaderName> {
        self.sources.iter().filter_map(KeySource::header_name)
    }

    fn query_sources(&self) -> impl Iterator<Item = &str> {
        self.sources.iter().filter_map(KeySource::query_name)
    }
}

/// Method, URI and headers from the lines of `rest`; `None` when the URI is not one.
fn raw_request(rest: &[u8]) -> Option<Raw> {
    let mut lines = rest.split(|&b| b == b'\n');
    let method = match lines.next() {
        None | Some(b"") => Method::GET,
        Some(m) => Method::from_bytes(m).ok()?,
    };
    let uri = match lines.next() {
        None | Some(b"") => Uri::from_static("/"),
        Some(line) => Uri::try_from(expand(line)).ok()?,
    };
    let mut headers = HeaderMap::new();
    for line in lines {
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let (name, value) = (&line[..colon], &line[colon + 1..]);
        let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(name),
            HeaderValue::from_bytes(&expand(value)),
        ) else {
            continue;
        };
        headers.append(name, value);
    }
    Some(Raw {
        method,
        uri,
        headers,
    })
}

/// Headers equal name by name, value by value, in order, ignoring `except`.
fn assert_same_headers(seen: &HeaderMap, original: &HeaderMap, except: &[&HeaderName]) {
    for name in seen.keys().chain(original.keys()) {
        if except.contains(&name) {
            continue;
        }
        assert_eq!(
            values(seen, name),
            values(original, name),
            "header {name} changed on its way to the inner service"
        );
    }
}

/// Properties of one request through [`InboundApiKeyLayer`], whatever its headers and URI:
/// no panic; a rejection never reaches the inner service, has an expected status, and holds
/// no key; only the valid key is ever accepted; with hiding on, no configured source still
/// carries a credential when the inner service sees the request, and everything else is
/// untouched; with hiding off, nothing but the identity header changes.
pub fn extract(data: &[u8]) {
    let [flags, picks, rest @ ..] = data else {
        return;
    };
    let case = Case::new(*flags, *picks);
    let Some(raw) = raw_request(rest) else {
        return;
    };
    let identity_header = HeaderName::from_static(IDENTITY_HEADER);
    let (seen, parts, body) = send(&case.layer(), &case.format, &raw);
    let Some(seen) = seen else {
        check_rejection(&case, &raw, &parts, &body);
        return;
    };
    assert_eq!(parts.status, StatusCode::OK, "the inner service's status");

    let Some(identity) = &seen.identity else {
        // Let through without a key: a preflight, or an anonymous request carrying none.
        let preflight = case.preflight
            && raw.method == Method::OPTIONS
            && raw.headers.contains_key(http::header::ORIGIN)
            && raw
                .headers
                .contains_key(http::header::ACCESS_CONTROL_REQUEST_METHOD);
        assert!(
            preflight || case.anonymous,
            "passed without an identity although neither preflight nor anonymous"
        );
        if !preflight {
            let code = probe_code(&case, &raw);
            assert_eq!(
                code.as_deref(),
                Some("missing_api_key"),
                "passed anonymously although a key was presented"
            );
        }
        assert_eq!(seen.uri, raw.uri, "URI changed on an unauthenticated pass");
        assert_same_headers(&seen.headers, &raw.headers, &[&identity_header]);
        if case.identity_header {
            assert!(
                !seen.headers.contains_key(&identity_header),
                "a client-supplied identity header reached the inner service"
            );
        } else {
            assert_eq!(
                values(&seen.headers, &identity_header),
                values(&raw.headers, &identity_header)
            );
        }
        return;
    };

    assert_eq!(
        identity.id(),
        GOOD_ID,
        "a key other than the valid one was accepted"
    );
    assert_ne!(
        case.scope,
        Some("admin"),
        "accepted without the required scope"
    );
    if case.identity_header {
        assert_eq!(
            values(&seen.headers, &identity_header),
            vec![GOOD_ID.to_string().as_bytes()],
            "the identity header is not exactly the key id"
        );
    } else {
        assert_eq!(
            values(&seen.headers, &identity_header),
            values(&raw.headers, &identity_header)
        );
    }

    if !case.hide {
        assert_eq!(seen.uri, raw.uri, "URI changed with hiding off");
        assert_same_headers(&seen.headers, &raw.headers, &[&identity_header]);
        return;
    }

    // Hiding on. Header sources: each is either gone (it carried the key) or untouched
    // (it carried nothing), and none still holds the key or a Bearer credential.
    let source_headers: Vec<&HeaderName> = case.header_sources().collect();
    for name in &source_headers {
        let now = values(&seen.headers, name);
        assert!(
            now.is_empty() || now == values(&raw.headers, name),
            "source header {name} was changed rather than removed"
        );
        for value in now {
            if **name == AUTHORIZATION {
                // Another scheme (`Basic …`, `!Bearer …`) is not ours to judge or remove.
                assert!(!is_bearer(value), "a Bearer credential is still there");
            } else {
                assert!(
                    !contains(value, GOOD_KEY.as_bytes()),
                    "the key is still in header {name}"
                );
            }
        }
    }
    let mut except = source_headers.clone();
    except.push(&identity_header);
    // The subprotocol source: its entries are gone, every other entry stays in order; a
    // header with none of them is untouched.
    if let Some(prefix) = case.sources.iter().find_map(KeySource::subprotocol_prefix) {
        let entries = |h: &HeaderMap| -> Vec<Vec<u8>> {
            h.get_all(SEC_WEBSOCKET_PROTOCOL)
                .iter()
                .flat_map(|v| v.as_bytes().split(|&b| b == b','))
                .map(|e| e.trim_ascii().to_vec())
                .filter(|e| !e.is_empty())
                .collect()
        };
        let before = entries(&raw.headers);
        let ours = |e: &Vec<u8>| e.starts_with(prefix.as_bytes());
        if before.iter().any(ours) {
            let kept: Vec<Vec<u8>> = before.into_iter().filter(|e| !ours(e)).collect();
            assert_eq!(
                entries(&seen.headers),
                kept,
                "subprotocols other than the key's changed"
            );
        } else {
            assert_eq!(
                values(&seen.headers, &SEC_WEBSOCKET_PROTOCOL),
                values(&raw.headers, &SEC_WEBSOCKET_PROTOCOL),
                "a subprotocol list without a key was changed"
            );
        }
        except.push(&SEC_WEBSOCKET_PROTOCOL);
    }
    assert_same_headers(&seen.headers, &raw.headers, &except);

    // Query sources: the ones that carried a value are gone, every other parameter stays.
    let carriers: Vec<&str> = case
        .query_sources()
        .filter(|name| {
            raw.uri
                .query()
                .is_some_and(|q| segments(q).any(|(_, n, v)| n == name.as_bytes() && !v.is_empty()))
        })
        .collect();
    assert_uri_rewrite(&seen.uri, &raw.uri, &carriers);

    // Nothing a source reads is left: the same request, replayed through a layer with the
    // same sources that lets keyless requests through, carries no key at all.
    let replay = Raw {
        method: seen.method.clone(),
        uri: seen.uri.clone(),
        headers: seen.headers.clone(),
    };
    let relaxed = InboundApiKeyLayer::from_shared(store())
        .sources(case.sources.iter().cloned())
        .allow_anonymous(true)
        .hide_credentials(false)
        .max_key_len(case.max_len);
    let (again, _, _) = send(&relaxed, &ErrorFormat::OpenAi, &replay);
    let again = again.expect("the replayed request was rejected: a credential was left in it");
    assert!(
        again.identity.is_none(),
        "the replayed request still carried the key"
    );
}

/// The inner URI is the original with the `removed` query parameters hidden.
fn assert_uri_rewrite(seen: &Uri, original: &Uri, removed: &[&str]) {
    assert_eq!(seen.scheme(), original.scheme(), "scheme changed");
    assert_eq!(seen.authority(), original.authority(), "authority changed");
    assert_eq!(seen.path(), original.path(), "path changed");
    let expected = expected_query(original.query(), removed);
    assert_eq!(
        seen.query(),
        expected.as_deref(),
        "query not rewritten as expected (hidden: {removed:?})"
    );
}

/// The machine code a strict layer (same sources, no pass-throughs, problem+json) gives
/// `raw` (its content type dropped so that the answer is JSON, not gRPC).
fn probe_code(case: &Case, raw: &Raw) -> Option<String> {
    let strict = InboundApiKeyLayer::from_shared(store())
        .sources(case.sources.iter().cloned())
        .max_key_len(case.max_len);
    let mut raw = raw.clone();
    raw.headers.remove(CONTENT_TYPE);
    let (seen, _, body) = send(&strict, &ErrorFormat::Problem, &raw);
    if seen.is_some() {
        return None;
    }
    let json: serde_json::Value = serde_json::from_slice(&body).ok()?;
    json["code"].as_str().map(str::to_owned)
}

/// A rejection: the expected status (or gRPC status), a challenge, a well-formed body, and
/// no key in any of it.
fn check_rejection(case: &Case, raw: &Raw, parts: &http::response::Parts, body: &[u8]) {
    if is_grpc(&raw.headers) {
        assert_eq!(parts.status, StatusCode::OK, "gRPC rejections are HTTP 200");
        assert_eq!(parts.headers[CONTENT_TYPE], "application/grpc");
        let status = parts.headers["grpc-status"].as_bytes();
        assert!(
            status == b"16" || (status == b"7" && case.scope == Some("admin")),
            "grpc-status {status:?}"
        );
        assert!(body.is_empty(), "a trailers-only gRPC answer has no body");
    } else {
        match parts.status.as_u16() {
            400 | 401 => {}
            403 => assert_eq!(case.scope, Some("admin"), "403 without a missing scope"),
            other => panic!("unexpected rejection status {other}"),
        }
        let challenge = parts
            .headers
            .get(http::header::WWW_AUTHENTICATE)
            .expect("a 4xx rejection carries WWW-Authenticate");
        assert!(challenge.as_bytes().starts_with(b"Bearer realm=\"api\""));
        let json: serde_json::Value =
            serde_json::from_slice(body).expect("a rejection body is JSON");
        assert!(json.is_object());
    }
    assert_not_in_response(parts, body, GOOD_KEY, "the valid key");
    assert_not_in_response(parts, body, REVOKED_KEY, "the revoked key");
}

// ---------------------------------------------------------------------------------------
// query_rewrite: the key in a query parameter, hidden, every other parameter intact

/// What the layer must answer for a query, by an independent model of the extraction
/// rules: `Err(status)` for a rejection, `Ok(carriers)` when the valid key is accepted.
fn model_query(
    query: Option<&str>,
    header_key: bool,
    names: &[&'static str],
    max_len: usize,
) -> Result<Vec<&'static str>, u16> {
    let mut candidate: Option<Vec<u8>> = header_key.then(|| GOOD_KEY.as_bytes().to_vec());
    let mut carriers = Vec::new();
    for &name in names {
        let Some(q) = query else { continue };
        for segment in q.split('&') {
            let (raw_name, raw_value) = segment.split_once('=').unwrap_or((segment, ""));
            if pct_decode(raw_name.as_bytes()) != name.as_bytes() {
                continue;
            }
            if raw_value.len() > max_len * 3 {
                return Err(400);
            }
            let value = pct_decode(raw_value.as_bytes());
            if value.is_empty() {
                continue;
            }
            if value.len() > max_len || !value.iter().all(u8::is_ascii_graphic) {
                return Err(400);
            }
            match &candidate {
                Some(c) if *c != value => return Err(400),
                Some(_) => {}
                None => candidate = Some(value),
            }
            if !carriers.contains(&name) {
                carriers.push(name);
            }
        }
    }
    match candidate {
        Some(key) if key == GOOD_KEY.as_bytes() => Ok(carriers),
        _ => Err(401),
    }
}

/// The query rewrite: with the key in query parameters (and maybe also in a header), the
/// answer is exactly what a model of the extraction rules says, and when the key is accepted
/// and hidden the inner service sees every parameter that is not a credential byte for byte,
/// in order, and the rest of the URI unchanged.
pub fn query_rewrite(data: &[u8]) {
    let [flags, rest @ ..] = data else {
        return;
    };
    let header_key = flags & 1 != 0;
    let names: &[&'static str] = if flags & 2 != 0 {
        &["key", "api_key"]
    } else {
        &["key"]
    };
    let hide = flags & 8 == 0;
    let max_len = 64;
    let mut text = if flags & 4 != 0 {
        b"http://gw.test:8080/v1/x?".to_vec()
    } else {
        b"/v1/x?".to_vec()
    };
    text.extend_from_slice(&expand(rest));
    let Ok(uri) = Uri::try_from(text) else {
        return;
    };
    let mut sources = vec![KeySource::header(HeaderName::from_static("x-api-key"))];
    sources.extend(names.iter().map(|&n| KeySource::query(n)));
    let layer = InboundApiKeyLayer::from_shared(store())
        .sources(sources)
        .hide_credentials(hide)
        .max_key_len(max_len);
    let mut headers = HeaderMap::new();
    if header_key {
        headers.insert("x-api-key", HeaderValue::from_static(GOOD_KEY));
    }
    headers.insert("x-other", HeaderValue::from_static("kept"));
    let raw = Raw {
        method: Method::GET,
        uri,
        headers,
    };
    let (seen, parts, body) = send(&layer, &ErrorFormat::Problem, &raw);
    let expected = model_query(raw.uri.query(), header_key, names, max_len);
    match (&seen, expected) {
        (None, Err(status)) => {
            assert_eq!(
                parts.status.as_u16(),
                status,
                "rejected with another status"
            );
            assert_not_in_response(&parts, &body, GOOD_KEY, "the valid key");
        }
        (Some(seen), Ok(carriers)) => {
            let who = seen
                .identity
                .as_ref()
                .expect("accepted without an identity");
            assert_eq!(who.id(), GOOD_ID);
            assert_eq!(seen.headers["x-other"], "kept");
            if hide {
                assert!(!seen.headers.contains_key("x-api-key"));
                assert_uri_rewrite(&seen.uri, &raw.uri, &carriers);
            } else {
                assert_eq!(seen.uri, raw.uri, "URI changed with hiding off");
            }
        }
        (None, Ok(_)) => panic!(
            "the model accepts, the layer answered {}: {}",
            parts.status,
            String::from_utf8_lossy(&body)
        ),
        (Some(_), Err(status)) => panic!("the model answers {status}, the layer accepted"),
    }
}

// ---------------------------------------------------------------------------------------
// parse: KeySource, Provider, ErrorFormat, KeyFormat, KeyId, KeyDigest, realm, messages

/// Every parser on arbitrary text: no panic, each agrees with a model of what it accepts,
/// and where a configuration syntax is printed back (`Debug` for sources, placements and
/// provider names; `Display` for key ids and digests) printing then parsing gives the same
/// value. Generated keys pass their own check and every one-character typo fails it.
/// Rejection rendering keeps any message intact (JSON bodies, gRPC's percent-encoding) and
/// any realm yields a valid `WWW-Authenticate`.
pub fn parse(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let s: &str = &text;
    key_source(s);
    provider(s);
    error_format(s, data);
    key_format(s, data);
    key_id(s, data);
    key_digest(s);
}

fn key_source(s: &str) {
    let expected = if s.eq_ignore_ascii_case("bearer") {
        Some(KeySource::Bearer)
    } else if let Some(name) = s.strip_prefix("header:") {
        HeaderName::try_from(name).ok().map(KeySource::header)
    } else if let Some(name) = s.strip_prefix("query:") {
        (!name.is_empty()).then(|| KeySource::query(name))
    } else {
        None
    };
    let parsed = s.parse::<KeySource>();
    assert_eq!(parsed.as_ref().ok(), expected.as_ref(), "KeySource {s:?}");
    match parsed {
        Ok(source) => {
            let printed = format!("{source:?}");
            assert_eq!(
                printed.parse::<KeySource>(),
                Ok(source.clone()),
                "{printed:?}"
            );
            assert!(!source.to_string().is_empty());
            assert!(source.header_name().is_some() != source.query_name().is_some());
        }
        Err(e) => assert!(e.to_string().contains(s), "the error names the input"),
    }
}

const PRESETS: [&str; 9] = [
    "openai",
    "anthropic",
    "gemini",
    "gemini-query",
    "azure",
    "mistral",
    "cohere",
    "huggingface",
    "bearer",
];

fn provider(s: &str) {
    let expected: Option<(String, Placement)> = match s.split_once(':') {
        Some(("header", name)) => HeaderName::try_from(name)
            .ok()
            .map(|h| ("custom".to_owned(), Placement::Header(h))),
        Some(("query", name)) if !name.is_empty() => {
            Some(("custom".to_owned(), Placement::Query(name.into())))
        }
        Some(_) => None,
        None => PRESETS
            .iter()
            .find(|p| p.eq_ignore_ascii_case(s))
            .map(|p| ((*p).to_owned(), preset_placement(p))),
    };
    let parsed = s.parse::<Provider>();
    let got = parsed
        .as_ref()
        .ok()
        .map(|p| (p.name().to_owned(), p.placement().clone()));
    assert_eq!(got, expected, "Provider {s:?}");
    if let Ok(p) = parsed {
        // Printed back in configuration syntax, the provider parses to the same placement.
        let printed = if p.name() == "custom" {
            format!("{:?}", p.placement())
        } else {
            p.name().to_owned()
        };
        let again: Provider = printed.parse().expect("a printed provider parses");
        assert_eq!(again.placement(), p.placement(), "{printed:?}");
        if p.name() != "custom" {
            assert_eq!(again.name(), p.name());
        }
    } else if let Err(e) = parsed {
        assert!(e.to_string().contains(s), "the error names the input");
    }
}

fn preset_placement(name: &str) -> Placement {
    match name {
        "anthropic" => Placement::Header(HeaderName::from_static("x-api-key")),
        "gemini" => Placement::Header(HeaderName::from_static("x-goog-api-key")),
        "gemini-query" => Placement::Query("key".into()),
        "azure" => Placement::Header(HeaderName::from_static("api-key")),
        _ => Placement::Bearer,
    }
}

const KINDS: [RejectionKind; 13] = [
    RejectionKind::MissingKey,
    RejectionKind::MalformedKey,
    RejectionKind::AmbiguousKey,
    RejectionKind::KeyTooLong,
    RejectionKind::InvalidKey,
    RejectionKind::ExpiredKey,
    RejectionKind::KeyNotYetValid,
    RejectionKind::RevokedKey,
    RejectionKind::DisabledKey,
    RejectionKind::InsufficientScope,
    RejectionKind::StoreUnavailable,
    RejectionKind::NoUpstreamCredential,
    RejectionKind::UpstreamCredentialUnavailable,
];

fn error_format(s: &str, data: &[u8]) {
    let expected = match s {
        "openai" => Some("OpenAi"),
        "anthropic" => Some("Anthropic"),
        "json" => Some("CodeMsg"),
        "problem" => Some("Problem"),
        _ => None,
    };
    let parsed = s.parse::<ErrorFormat>();
    assert_eq!(
        parsed.as_ref().ok().map(|f| format!("{f:?}")).as_deref(),
        expected,
        "ErrorFormat {s:?}"
    );
    if let Err(e) = &parsed {
        assert!(e.to_string().contains(s), "the error names the input");
    }

    // Any message survives every dialect's body, and gRPC's percent-encoding.
    let pick = data.first().copied().unwrap_or(0);
    let format = match pick % 4 {
        0 => ErrorFormat::OpenAi,
        1 => ErrorFormat::Anthropic,
        2 => ErrorFormat::CodeMsg,
        _ => ErrorFormat::Problem,
    };
    let status = StatusCode::from_u16(400 + u16::from(pick) % 200).unwrap();
    let response = format.error_response(status, Some("fuzz_code"), s);
    assert_eq!(response.status(), status);
    let json: serde_json::Value =
        serde_json::from_slice(response.body()).expect("an error body is JSON");
    let message = match pick % 4 {
        0 | 1 => &json["error"]["message"],
        2 => &json["msg"],
        _ => &json["detail"],
    };
    assert_eq!(message.as_str(), Some(s), "the message changed in the body");

    let kind = KINDS[usize::from(pick) % KINDS.len()];
    let rejection = Rejection::new(kind, s.to_owned());
    let realm = Realm::new(s);
    let mut grpc = HeaderMap::new();
    grpc.insert(CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    let response = format.respond(&rejection, &realm, &grpc);
    let sent = response.headers()["grpc-message"].as_bytes();
    assert_eq!(
        pct_decode(sent),
        s.as_bytes(),
        "grpc-message does not decode to the message"
    );

    let clean: String = s
        .chars()
        .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '"' && *c != '\\')
        .collect();
    let response = format.respond(&rejection, &realm, &HeaderMap::new());
    assert_eq!(response.status(), kind.status());
    let challenge = response.headers().get(http::header::WWW_AUTHENTICATE);
    if kind.status() == StatusCode::SERVICE_UNAVAILABLE {
        assert!(challenge.is_none());
    } else {
        let challenge = challenge.expect("every 4xx rejection has a challenge");
        let start = format!("Bearer realm=\"{clean}\"");
        assert!(
            challenge.as_bytes().starts_with(start.as_bytes()),
            "{challenge:?} for realm {s:?}"
        );
    }
}

/// The base62 digits of the crate's key format, parsed independently.
fn base62(digits: &[u8]) -> Option<u128> {
    digits.iter().try_fold(0u128, |acc, &c| {
        let d = match c {
            b'0'..=b'9' => c - b'0',
            b'A'..=b'Z' => c - b'A' + 10,
            b'a'..=b'z' => c - b'a' + 36,
            _ => return None,
        };
        acc.checked_mul(62)?.checked_add(u128::from(d))
    })
}

/// What `KeyFormat::check` must say, by the documented format: `<prefix>_`, 22 base62
/// random digits, 6 base62 digits of the CRC32 of everything before them.
fn model_check(prefix: &str, key: &str) -> Checksum {
    let Some(rest) = key.strip_prefix(prefix).and_then(|r| r.strip_prefix('_')) else {
        return Checksum::NotThisFormat;
    };
    if rest.len() != 28 || !rest.bytes().all(|b| b.is_ascii_alphanumeric()) {
        return Checksum::NotThisFormat;
    }
    let body = &key.as_bytes()[..key.len() - 6];
    if base62(&key.as_bytes()[key.len() - 6..]) == Some(u128::from(crc32fast::hash(body))) {
        Checksum::Valid
    } else {
        Checksum::Invalid
    }
}

fn key_format(s: &str, data: &[u8]) {
    let gw = KeyFormat::new("gw").unwrap();
    assert_eq!(gw.check(s), model_check("gw", s), "check {s:?}");
    assert_eq!(gw.check(GOOD_KEY), Checksum::Valid);

    // The first line is a prefix, the rest a key to check against it.
    let (prefix, key) = s.split_once('\n').unwrap_or((s, ""));
    let valid = (1..=10).contains(&prefix.len())
        && prefix
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let format = match KeyFormat::new(prefix) {
        Ok(format) => {
            assert!(valid, "prefix {prefix:?} accepted");
            format
        }
        Err(e) => {
            assert!(!valid, "prefix {prefix:?} refused");
            assert!(e.to_string().contains(prefix));
            return;
        }
    };
    assert_eq!(format.prefix(), prefix);
    assert_eq!(format.check(key), model_check(prefix, key), "check {key:?}");

    let issued = format.generate();
    let issued = issued.expose();
    assert_eq!(issued.len(), prefix.len() + 1 + 28);
    assert!(issued.starts_with(prefix) && issued[prefix.len()..].starts_with('_'));
    assert_eq!(format.check(issued), Checksum::Valid);
    let hint = format.hint(&tower_gateway_auth::keys::ApiKey::new(issued));
    assert!(issued.starts_with(&hint) && hint.len() == prefix.len() + 5);
    // Any single-character change after the prefix is caught: another base62 digit fails
    // the checksum (CRC32 catches every burst of up to 32 bits), anything else the shape.
    let at = prefix.len() + 1 + usize::from(data.get(1).copied().unwrap_or(0)) % 28;
    let by = data.get(2).copied().unwrap_or(b'x');
    if by != issued.as_bytes()[at] && by.is_ascii() {
        let mut typo = issued.as_bytes().to_vec();
        typo[at] = by;
        let typo = String::from_utf8(typo).unwrap();
        let want = if by.is_ascii_alphanumeric() {
            Checksum::Invalid
        } else {
            Checksum::NotThisFormat
        };
        assert_eq!(format.check(&typo), want, "typo {typo:?}");
    }
    assert_eq!(
        format.check(&issued[..issued.len() - 1]),
        Checksum::NotThisFormat
    );
}

fn key_id(s: &str, data: &[u8]) {
    let expected = s
        .strip_prefix("key_")
        .filter(|d| d.len() == 11)
        .and_then(|d| base62(d.as_bytes()))
        .and_then(|n| u64::try_from(n).ok());
    let parsed = s.parse::<KeyId>();
    assert_eq!(
        parsed.as_ref().ok().map(|id| id.as_u64()),
        expected,
        "KeyId {s:?}"
    );
    if let Ok(id) = parsed {
        assert_eq!(id.to_string(), s, "a key id prints as it was written");
        let json = serde_json::to_string(&id).unwrap();
        assert_eq!(serde_json::from_str::<KeyId>(&json).unwrap(), id);
    }
    // Any number prints as a key id that parses back to it.
    let mut n = [0u8; 8];
    for (slot, b) in n.iter_mut().zip(data) {
        *slot = *b;
    }
    let id = KeyId::from_u64(u64::from_le_bytes(n));
    let printed = id.to_string();
    assert_eq!(printed.len(), 15);
    assert_eq!(printed.parse::<KeyId>(), Ok(id), "{printed}");
    // JSON: a key id as a string, anything else refused without a panic.
    let _ = serde_json::from_slice::<KeyId>(data);
}

fn key_digest(s: &str) {
    let valid = s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit());
    match KeyDigest::from_hex(s) {
        Some(d) => {
            assert!(valid, "digest {s:?} accepted");
            assert_eq!(d.to_hex(), s.to_ascii_lowercase());
            assert_eq!(format!("{d:?}"), "KeyDigest(<redacted>)");
        }
        None => assert!(!valid, "digest {s:?} refused"),
    }
}

// ---------------------------------------------------------------------------------------
// admin_json: the management API's JSON bodies

const ADMIN_KEY: &str = "gw_FuzzAdminKey00000000003qRPp7";
const USER_KEY: &str = "gw_FuzzUserKey000000000002a6wgO";
const EPHEMERAL_KEY: &str = "gw_FuzzEphemeralKey0000003dVCG6";
const REVOKED_ADMIN_KEY: &str = "gw_FuzzRevokedAdmin0000003Y4KPn";
const ADMIN_ID: KeyId = KeyId::from_u64(11);
const USER_ID: KeyId = KeyId::from_u64(12);
const EPHEMERAL_ID: KeyId = KeyId::from_u64(13);
const REVOKED_ADMIN_ID: KeyId = KeyId::from_u64(14);
/// An ephemeral child of the admin key that still holds the admin scope, as children minted
/// before issue 11 did: it must manage nothing.
const ADMIN_CHILD_KEY: &str = "gw_FuzzAdminChildKey00000000000";
const ADMIN_CHILD_ID: KeyId = KeyId::from_u64(15);
const UNKNOWN_ID: KeyId = KeyId::from_u64(99);
const NOW: u64 = 1_800_000_000;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Route {
    Create,
    Rotate,
    Ephemeral,
    Show,
    Revoke,
    Disable,
    Enable,
    Delete,
    List,
    Patch,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Caller {
    Admin,
    AdminBearer,
    User,
    Ephemeral,
    RevokedAdmin,
    AdminChild,
    Nobody,
}

impl Caller {
    fn key(self) -> Option<(&'static str, KeyId)> {
        match self {
            Caller::Admin | Caller::AdminBearer => Some((ADMIN_KEY, ADMIN_ID)),
            Caller::User => Some((USER_KEY, USER_ID)),
            Caller::Ephemeral => Some((EPHEMERAL_KEY, EPHEMERAL_ID)),
            Caller::RevokedAdmin => Some((REVOKED_ADMIN_KEY, REVOKED_ADMIN_ID)),
            Caller::AdminChild => Some((ADMIN_CHILD_KEY, ADMIN_CHILD_ID)),
            Caller::Nobody => None,
        }
    }
}

/// A fresh store with the five keys above, the management API over it behind the inbound
/// layer, all on one manual clock.
fn build_admin_app() -> (Arc<MemoryStore>, axum::Router) {
    let store = Arc::new(MemoryStore::new());
    let h = store.hasher().clone();
    let at = Timestamp::from_unix_secs(NOW);
    let record = |id, key: &str, name: &str| {
        KeyRecord::new(id, h.digest(key.as_bytes()))
            .with_name(name)
            .with_hint(&key[..7])
            .with_created_at(at)
    };
    store.insert(record(ADMIN_ID, ADMIN_KEY, "root").with_scopes(["admin", "chat"]));
    store.insert(
        record(USER_ID, USER_KEY, "user")
            .with_scopes(["chat", "embed"])
            .with_metadata([("team".to_owned(), "a".to_owned())].into()),
    );
    store.insert(
        record(EPHEMERAL_ID, EPHEMERAL_KEY, "ephemeral:user")
            .with_scopes(["chat"])
            .with_parent(&record(USER_ID, USER_KEY, "user"))
            .with_expires_at(Some(at + Duration::from_secs(600))),
    );
    store.insert(
        record(ADMIN_CHILD_ID, ADMIN_CHILD_KEY, "ephemeral:root")
            .with_scopes(["admin", "chat"])
            .with_parent(&record(ADMIN_ID, ADMIN_KEY, "root"))
            .with_expires_at(Some(at + Duration::from_secs(600))),
    );
    store.insert(
        record(REVOKED_ADMIN_ID, REVOKED_ADMIN_KEY, "old-root")
            .with_scopes(["admin"])
            .with_status(KeyStatus::Revoked),
    );
    let clock = ManualClock::new(at);
    let manager = KeyManager::new(store.clone()).clock(clock.clone());
    let app = ManagementApi::new(manager)
        .clock(clock.clone())
        .router()
        .layer(InboundApiKeyLayer::from_shared(store.clone()).clock(clock));
    (store, app)
}

/// The app of [`build_admin_app`] with its store reset to the five keys: built once per
/// thread and every 10,000 uses (building costs more than the request; the store's scope
/// interning, which no reset clears, stays bounded).
fn admin_app() -> (Arc<MemoryStore>, axum::Router) {
    type Cached = (u32, Arc<MemoryStore>, axum::Router, Vec<Arc<KeyRecord>>);
    thread_local! {
        static APP: std::cell::RefCell<Option<Cached>> = const { std::cell::RefCell::new(None) };
    }
    APP.with_borrow_mut(|app| {
        if app.as_ref().is_none_or(|(uses, ..)| *uses >= 10_000) {
            let (store, router) = build_admin_app();
            let initial = store.records();
            *app = Some((0, store, router, initial));
        }
        let (uses, store, router, initial) = app.as_mut().expect("built above");
        *uses += 1;
        store.replace_all(initial.iter().cloned());
        (store.clone(), router.clone())
    })
}

/// A path segment, percent-encoded but for RFC 3986's unreserved characters.
fn path_segment(raw: &[u8]) -> String {
    let mut out = String::with_capacity(raw.len() * 3);
    for &b in raw {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Every `gw_` + 28 base62 characters in `bytes`: the shape of a key this API issues.
fn key_shaped(bytes: &[u8]) -> Vec<&[u8]> {
    let mut found = Vec::new();
    let mut i = 0;
    while i + 31 <= bytes.len() {
        if &bytes[i..i + 3] == b"gw_" && bytes[i + 3..i + 31].iter().all(u8::is_ascii_alphanumeric)
        {
            found.push(&bytes[i..i + 31]);
            i += 31;
        } else {
            i += 1;
        }
    }
    found
}

/// The management API with arbitrary JSON bodies (and path ids) on its routes, from every
/// kind of caller: no panic and never a 5xx; callers without a usable key get 401 and
/// non-admins 403 on admin routes; no answer holds a stored key, a digest or a key-shaped
/// string the request did not carry, except a 201's newly issued key; a 201 is only ever the
/// right caller's, its key is well formed, new and stored under the id shown, and an
/// ephemeral key stays within its parent's scopes and the maximum lifetime; a refused
/// create, rotate or mint changes nothing in the store.
pub fn admin_json(data: &[u8]) {
    let [route, caller, id_pick, rest @ ..] = data else {
        return;
    };
    let route = [
        Route::Create,
        Route::Rotate,
        Route::Ephemeral,
        Route::Show,
        Route::Revoke,
        Route::Disable,
        Route::Enable,
        Route::Delete,
        Route::List,
        Route::Patch,
    ][usize::from(*route) % 10];
    let caller = [
        Caller::Admin,
        Caller::AdminBearer,
        Caller::User,
        Caller::Ephemeral,
        Caller::RevokedAdmin,
        Caller::AdminChild,
        Caller::Nobody,
    ][usize::from(*caller) % 7];
    let (id, body) = match id_pick % 6 {
        0 => (ADMIN_ID.to_string(), rest),
        1 => (USER_ID.to_string(), rest),
        2 => (EPHEMERAL_ID.to_string(), rest),
        3 => (REVOKED_ADMIN_ID.to_string(), rest),
        4 => (UNKNOWN_ID.to_string(), rest),
        _ => {
            let (id, body) = match rest.iter().position(|&b| b == b'\n') {
                Some(at) => (&rest[..at], &rest[at + 1..]),
                None => (rest, &b""[..]),
            };
            (path_segment(id), body)
        }
    };
    let (method, path) = match route {
        Route::Create => (Method::POST, "/keys".to_owned()),
        Route::Rotate => (Method::POST, format!("/keys/{id}/rotate")),
        Route::Ephemeral => (Method::POST, "/ephemeral".to_owned()),
        Route::Show => (Method::GET, format!("/keys/{id}")),
        Route::Revoke => (Method::POST, format!("/keys/{id}/revoke")),
        Route::Disable => (Method::POST, format!("/keys/{id}/disable")),
        Route::Enable => (Method::POST, format!("/keys/{id}/enable")),
        Route::Delete => (Method::DELETE, format!("/keys/{id}")),
        Route::List => (Method::GET, "/keys".to_owned()),
        Route::Patch => (Method::PATCH, format!("/keys/{id}")),
    };
    let mut req = Request::builder()
        .method(method)
        .uri(&path)
        .header(CONTENT_TYPE, "application/json");
    match (caller, caller.key()) {
        (Caller::AdminBearer, Some((key, _))) => {
            req = req.header(AUTHORIZATION, format!("Bearer {key}"));
        }
        (_, Some((key, _))) => req = req.header("x-api-key", key),
        (_, None) => {}
    }
    let req = req
        .body(Full::new(Bytes::copy_from_slice(body)))
        .expect("an encoded path is a valid URI");

    let (store, app) = admin_app();
    let before = store.records();
    let response = block_on(app.oneshot(req)).unwrap();
    let (parts, body) = response.into_parts();
    let body = block_on(body.collect()).unwrap().to_bytes();
    let status = parts.status;
    let shown = || String::from_utf8_lossy(&body).into_owned();

    assert!(
        !status.is_server_error(),
        "{status} for {route:?}: {}",
        shown()
    );
    assert!(
        matches!(
            status.as_u16(),
            200 | 201 | 204 | 400 | 401 | 403 | 404 | 409 | 413 | 422
        ),
        "unexpected {status} for {route:?}: {}",
        shown()
    );
    let admin_route = !matches!(route, Route::Ephemeral);
    match caller {
        Caller::Nobody | Caller::RevokedAdmin => {
            assert_eq!(status, StatusCode::UNAUTHORIZED, "{caller:?}: {}", shown());
        }
        // An empty id matches no route: 404 before any scope check.
        Caller::User | Caller::Ephemeral | Caller::AdminChild if admin_route => {
            assert!(
                status == StatusCode::FORBIDDEN
                    || (status == StatusCode::NOT_FOUND && id.is_empty()),
                "{status} for {caller:?} on {route:?}: {}",
                shown()
            );
        }
        // An ephemeral key never mints.
        Caller::Ephemeral | Caller::AdminChild => {
            assert_eq!(
                status,
                StatusCode::FORBIDDEN,
                "{caller:?} minting: {}",
                shown()
            );
        }
        _ => {}
    }

    // Nothing secret in the answer unless the fuzzed input itself holds it.
    let mut answer = body.to_vec();
    for (name, value) in &parts.headers {
        answer.extend_from_slice(name.as_str().as_bytes());
        answer.push(b':');
        answer.extend_from_slice(value.as_bytes());
        answer.push(b'\n');
    }
    for key in [ADMIN_KEY, USER_KEY, EPHEMERAL_KEY, REVOKED_ADMIN_KEY] {
        if !contains(data, key.as_bytes()) {
            assert!(
                !contains(&answer, key.as_bytes()),
                "a stored key in the answer"
            );
        }
        let digest = store.hasher().digest(key.as_bytes()).to_hex();
        if !contains(data, digest.as_bytes()) {
            assert!(
                !contains(&answer, digest.as_bytes()),
                "a digest in the answer"
            );
        }
    }
    let json: Option<serde_json::Value> = serde_json::from_slice(&body).ok();
    let issued = if status == StatusCode::CREATED {
        let json = json.as_ref().expect("a 201 body is JSON");
        Some(check_issued(route, caller, &id, json, &parts, &store))
    } else {
        if let Some(json) = &json {
            assert!(json.get("key").is_none(), "a key field outside a 201");
        }
        None
    };
    for found in key_shaped(&answer) {
        assert!(
            issued.as_deref().map(str::as_bytes) == Some(found) || contains(data, found),
            "a key-shaped string that is neither new nor the client's: {}",
            String::from_utf8_lossy(found)
        );
    }
    let refused = match route {
        Route::Create | Route::Rotate | Route::Ephemeral => status != StatusCode::CREATED,
        Route::Patch => status != StatusCode::OK,
        _ => false,
    };
    if refused {
        let mut after = store.records();
        let mut before = before;
        after.sort_by_key(|r| r.id());
        before.sort_by_key(|r| r.id());
        assert!(after == before, "a refused {route:?} changed the store");
    }
}

/// Checks a 201 and returns the issued key.
fn check_issued(
    route: Route,
    caller: Caller,
    id: &str,
    json: &serde_json::Value,
    parts: &http::response::Parts,
    store: &MemoryStore,
) -> String {
    assert!(
        matches!(route, Route::Create | Route::Rotate | Route::Ephemeral),
        "201 from {route:?}"
    );
    assert_eq!(parts.headers[http::header::CACHE_CONTROL], "no-store");
    let key = json["key"]
        .as_str()
        .expect("a 201 holds the key")
        .to_owned();
    assert_eq!(KeyFormat::new("gw").unwrap().check(&key), Checksum::Valid);
    assert!(
        ![ADMIN_KEY, USER_KEY, EPHEMERAL_KEY, REVOKED_ADMIN_KEY].contains(&key.as_str()),
        "an old key issued again"
    );
    let new_id: KeyId = json["id"]
        .as_str()
        .expect("an id")
        .parse()
        .expect("a key id");
    let record = store.by_id(new_id).expect("the issued key is stored");
    assert!(
        record
            .digest()
            .ct_eq(&store.hasher().digest(key.as_bytes())),
        "the stored digest is not the issued key's"
    );
    assert!(
        key.starts_with(json["hint"].as_str().expect("a hint")),
        "the hint is not the key's start"
    );
    match route {
        Route::Create => {
            assert!(matches!(caller, Caller::Admin | Caller::AdminBearer));
            assert_eq!(record.parent(), None);
        }
        Route::Rotate => {
            assert!(matches!(caller, Caller::Admin | Caller::AdminBearer));
            let old: KeyId = id.parse().expect("rotated a key with a valid id");
            assert!(
                old == ADMIN_ID || old == USER_ID,
                "rotated {old}, which is revoked, ephemeral or unknown"
            );
            let old = store.by_id(old).expect("the old key is kept");
            assert_eq!(record.name(), old.name());
            assert_eq!(record.scopes(), old.scopes());
            assert_eq!(record.parent(), None);
        }
        Route::Ephemeral => {
            let (_, parent) = caller.key().expect("a caller with a key");
            assert!(matches!(
                caller,
                Caller::Admin | Caller::AdminBearer | Caller::User
            ));
            assert_eq!(record.parent(), Some(parent));
            let parent = store.by_id(parent).expect("the parent is stored");
            assert!(
                record.scopes().is_subset_of(parent.scopes()),
                "scopes beyond the parent's"
            );
            let end = record.expires_at().expect("an ephemeral key expires");
            assert!(end <= Timestamp::from_unix_secs(NOW) + DEFAULT_MAX_EPHEMERAL_TTL);
            assert!(end > Timestamp::from_unix_secs(NOW));
        }
        _ => unreachable!(),
    }
    key
}

/// A request body delivered in the given chunks, as a client's arrives in reads.
struct Chunks(std::collections::VecDeque<Bytes>);

impl http_body::Body for Chunks {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Infallible>>> {
        std::task::Poll::Ready(
            self.0
                .pop_front()
                .map(|chunk| Ok(http_body::Frame::data(chunk))),
        )
    }
}

/// `model_body`: `flags` (bit 0: unknown models allowed; bits 1–3: the buffer bound, 16 to
/// 128 bytes), `cuts` (where the body is split into reads: each byte a cut at that offset
/// modulo the length, up to the first `0xff`), then the body, sent by a key that may use
/// only `gpt-4o*`. Whatever the bytes, the layer never panics and the upstream gets the body
/// byte for byte, or nothing (403, 400), or a body broken with an error naming the model;
/// when it gets a whole body, whatever the rule, that body names no top-level model the key
/// may not use.
pub fn model_body(data: &[u8]) {
    use tower_gateway_auth::limit::{ModelAccessLayer, ModelList, ReplayBody, UnknownModel};
    let [flags, rest @ ..] = data else {
        return;
    };
    let (cuts, body) = match rest.iter().position(|&b| b == 0xff) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (&[][..], rest),
    };
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) % (body.len() + 1))
        .collect();
    points.sort_unstable();
    let mut parts = std::collections::VecDeque::new();
    let mut from = 0;
    for p in points.into_iter().chain([body.len()]) {
        parts.push_back(Bytes::copy_from_slice(&body[from..p]));
        from = p;
    }
    let allow = flags & 1 == 1;
    let bound = 16 * (1 + usize::from((flags >> 1) & 7));
    let rule = if allow {
        UnknownModel::Allow
    } else {
        UnknownModel::Refuse
    };
    let record = KeyRecord::new(
        KeyId::random(),
        tower_gateway_auth::keys::KeyHasher::sha256().digest(b"gw_fuzz"),
    )
    .with_models(ModelList::new(["gpt-4o*"]));
    // Tokens counted: the body may also be asked for its stream's usage.
    let counted = flags & 16 == 16;
    let record = if counted {
        record.with_limits(tower_gateway_auth::limit::Limits::new().with_budget(
            tower_gateway_auth::limit::Budget::new(
                u64::MAX,
                tower_gateway_auth::limit::BudgetPeriod::Never,
            ),
        ))
    } else {
        record
    };
    let mut req = Request::builder()
        .method(Method::POST)
        .uri("/v1/chat/completions")
        .header(CONTENT_TYPE, "application/json")
        .body(Chunks(parts))
        .expect("a valid request");
    req.extensions_mut()
        .insert(tower_gateway_auth::Identity::new(Arc::new(record)));
    let seen: Arc<Mutex<Vec<Result<Bytes, String>>>> = Arc::default();
    let upstream = {
        let seen = seen.clone();
        tower::service_fn(move |req: Request<ReplayBody<Chunks>>| {
            let seen = seen.clone();
            async move {
                let body = req.into_body().collect().await;
                seen.lock()
                    .unwrap()
                    .push(body.map(|b| b.to_bytes()).map_err(|e| e.to_string()));
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }
        })
    };
    let layer = ModelAccessLayer::new()
        .unknown_model(rule)
        .max_buffer(bound)
        .usage_buffer(bound * 4);
    let status = if counted {
        let limiter = tower_gateway_auth::limit::MemoryLimiter::new();
        let service = tower_gateway_auth::RateLimitLayer::new(limiter).layer(layer.layer(upstream));
        block_on(service.oneshot(req)).expect("infallible").status()
    } else {
        block_on(layer.layer(upstream).oneshot(req))
            .expect("infallible")
            .status()
    };
    match seen.lock().unwrap().as_slice() {
        [] => assert!(
            status == StatusCode::FORBIDDEN
                || status == StatusCode::BAD_REQUEST
                || (counted && status == StatusCode::PAYLOAD_TOO_LARGE),
            "refused with {status}"
        ),
        [Ok(passed)] if counted && &passed[..] != body => {
            // Rewritten: the same JSON with `stream_options.include_usage` set, and only
            // for a stream.
            let parse = |b: &[u8]| serde_json::from_slice::<serde_json::Value>(b);
            let mut original = parse(body).expect("only a JSON body is rewritten");
            let sent = parse(passed).expect("the rewritten body is JSON");
            assert_eq!(original["stream"], true, "a non-stream was rewritten");
            assert_ne!(original["stream_options"]["include_usage"], true);
            let options = original
                .as_object_mut()
                .unwrap()
                .entry("stream_options")
                .or_insert_with(|| serde_json::json!({}));
            if options.is_null() {
                *options = serde_json::json!({});
            }
            options["include_usage"] = serde_json::Value::Bool(true);
            assert_eq!(
                sent, original,
                "the rewrite changed more than include_usage"
            );
        }
        [Ok(passed)] => {
            assert_eq!(&passed[..], body, "the body changed on its way");
            // Whatever the rule for bodies without a readable model, a model the key may
            // not use never gets through whole.
            let model = serde_json::from_slice::<serde_json::Value>(body)
                .ok()
                .and_then(|v| v.get("model").and_then(|m| m.as_str()).map(str::to_owned));
            if let Some(model) = model {
                assert!(
                    model.starts_with("gpt-4o"),
                    "{model:?} reached the upstream"
                );
            }
        }
        [Err(error)] => assert!(
            error.contains("model"),
            "broken for another reason: {error}"
        ),
        more => panic!("{} upstream requests for one", more.len()),
    }
}

// ---------------------------------------------------------------------------------------
// usage_scan: the token-usage reader over any bytes, in any reads

/// One SSE event as a client reads it (WHATWG), written independently of the crate: where
/// its first line starts, where the terminator of the empty line that ends it ends (`None`:
/// the input ended first), and its data.
struct SseEvent {
    start: usize,
    end: Option<usize>,
    data: Vec<u8>,
}

fn sse_events(bytes: &[u8]) -> Vec<SseEvent> {
    let mut events = Vec::new();
    let mut i = if bytes.starts_with(b"\xEF\xBB\xBF") {
        3
    } else {
        0
    };
    let mut start = None;
    let mut data: Option<Vec<u8>> = None;
    while i < bytes.len() {
        let line_start = i;
        while i < bytes.len() && bytes[i] != b'\r' && bytes[i] != b'\n' {
            i += 1;
        }
        let line = &bytes[line_start..i];
        if i < bytes.len() {
            i += if bytes[i] == b'\r' && bytes.get(i + 1) == Some(&b'\n') {
                2
            } else {
                1
            };
        } else {
            // A last line without its end: part of an event that never ended.
            if !line.is_empty() {
                start.get_or_insert(line_start);
                read_field(line, &mut data);
            }
            break;
        }
        if line.is_empty() {
            if let Some(s) = start.take() {
                events.push(SseEvent {
                    start: s,
                    end: Some(i),
                    data: data.take().unwrap_or_default(),
                });
            }
            data = None;
            continue;
        }
        start.get_or_insert(line_start);
        read_field(line, &mut data);
    }
    if let Some(s) = start {
        events.push(SseEvent {
            start: s,
            end: None,
            data: data.unwrap_or_default(),
        });
    }
    events
}

fn read_field(line: &[u8], data: &mut Option<Vec<u8>>) {
    if line[0] == b':' {
        return;
    }
    let (name, value) = match line.iter().position(|&b| b == b':') {
        Some(c) => (
            &line[..c],
            line[c + 1..].strip_prefix(b" ").unwrap_or(&line[c + 1..]),
        ),
        None => (line, &b""[..]),
    };
    if name == b"data" {
        match data {
            Some(d) => {
                d.push(b'\n');
                d.extend_from_slice(value);
            }
            None => *data = Some(value.to_vec()),
        }
    }
}

/// The module docs' rules over `serde_json` values, written again: usage objects at
/// `usage`, `usageMetadata`, `message.usage`, `response.usage` of each document (an object,
/// or each object of an array); each field's last `u64` value; then `TokenUsage`'s table.
fn reference_usage(docs: &[serde_json::Value]) -> Option<TokenUsage> {
    use serde_json::Value;
    let numbers = [
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "input_tokens",
        "output_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
        "promptTokenCount",
        "candidatesTokenCount",
        "totalTokenCount",
        "cachedContentTokenCount",
        "thoughtsTokenCount",
        "toolUsePromptTokenCount",
    ];
    let details = [
        ("prompt_tokens_details", "cached_tokens"),
        ("input_tokens_details", "cached_tokens"),
        ("completion_tokens_details", "reasoning_tokens"),
        ("output_tokens_details", "reasoning_tokens"),
    ];
    let mut seen = false;
    let mut fields = std::collections::HashMap::new();
    let objects = docs.iter().flat_map(|d| match d {
        Value::Array(items) => items.iter().filter(|i| i.is_object()).collect(),
        Value::Object(_) => vec![d],
        _ => vec![],
    });
    for doc in objects {
        for path in [
            "/usage",
            "/usageMetadata",
            "/message/usage",
            "/response/usage",
        ] {
            let Some(Value::Object(usage)) = doc.pointer(path) else {
                continue;
            };
            seen = true;
            for name in numbers {
                if let Some(n) = usage.get(name).and_then(Value::as_u64) {
                    fields.insert(name.to_owned(), n);
                }
            }
            for (d, key) in details {
                if let Some(n) = usage
                    .get(d)
                    .and_then(|v| v.get(key))
                    .and_then(Value::as_u64)
                {
                    fields.insert(format!("{d}.{key}"), n);
                }
            }
        }
    }
    if !seen {
        return None;
    }
    let get = |k: &str| fields.get(k).copied();
    let sum = |ks: &[&str]| {
        ks.iter()
            .filter_map(|k| get(k))
            .fold(0u64, u64::saturating_add)
    };
    let anthropic = [
        "input_tokens",
        "cache_creation_input_tokens",
        "cache_read_input_tokens",
    ];
    let prompt = match get("prompt_tokens") {
        Some(p) => p,
        None if anthropic.iter().any(|k| get(k).is_some()) => sum(&anthropic),
        None => sum(&["promptTokenCount", "toolUsePromptTokenCount"]),
    };
    let completion = get("completion_tokens")
        .or(get("output_tokens"))
        .unwrap_or_else(|| sum(&["candidatesTokenCount", "thoughtsTokenCount"]));
    let mut usage = TokenUsage::new(prompt, completion)
        .with_cached(
            get("prompt_tokens_details.cached_tokens")
                .or(get("input_tokens_details.cached_tokens"))
                .or(get("cache_read_input_tokens"))
                .or(get("cachedContentTokenCount"))
                .unwrap_or(0),
        )
        .with_reasoning(
            get("completion_tokens_details.reasoning_tokens")
                .or(get("output_tokens_details.reasoning_tokens"))
                .or(get("thoughtsTokenCount"))
                .unwrap_or(0),
        )
        .with_cache_creation(get("cache_creation_input_tokens").unwrap_or(0));
    if let Some(total) = get("total_tokens").or(get("totalTokenCount")) {
        usage = usage.with_total(total);
    }
    Some(usage)
}

/// A plain `"usage"` key: the literal, then spaces and a colon or a line end (the only way
/// the scanner's fast path finds an event's usage).
fn plain_usage_key(event: &[u8]) -> bool {
    let needle = b"\"usage";
    (0..event.len().saturating_sub(needle.len() - 1)).any(|i| {
        let mut j = i + needle.len();
        if event[i..j] != needle[..] {
            return false;
        }
        match event.get(j) {
            Some(b'"') => j += 1,
            Some(b'M') if event[j..].starts_with(b"Metadata\"") => j += 9,
            _ => return false,
        }
        while matches!(event.get(j), Some(b' ' | b'\t')) {
            j += 1;
        }
        matches!(event.get(j), None | Some(b':' | b'\r' | b'\n'))
    })
}

/// Runs `UsageBody` over `parts`: what the client got and every report.
fn usage_body(
    parts: std::collections::VecDeque<Bytes>,
    framing: Framing,
    hide: bool,
) -> (Vec<u8>, Vec<Option<TokenUsage>>) {
    let reports: Arc<Mutex<Vec<Option<TokenUsage>>>> = Arc::default();
    let sink = {
        let reports = reports.clone();
        move |usage| reports.lock().unwrap().push(usage)
    };
    let body = UsageBody::new(Chunks(parts), framing, sink).hide_usage_chunk(hide);
    let out = block_on(body.collect())
        .expect("infallible")
        .to_bytes()
        .to_vec();
    let reports = reports.lock().unwrap().clone();
    (out, reports)
}

/// `usage_scan`: `flags` (bits 0–1: the framing, auto, JSON, SSE, SSE; bit 2: hide the
/// usage-only chunk), read cuts up to a `0xff`, then a response body. Whatever the bytes:
/// no panic; the sink hears once; where the reads fall changes neither the bytes out nor
/// the usage; the bytes out are the bytes in, less (when hiding an SSE stream) exactly the
/// complete usage-only chunks (`"choices":[]` and a `usage` object, the key written plainly);
/// and the usage is what `serde_json` reads. Those last two are checked when every
/// document that names `"usage` is valid JSON and nothing is escaped with `\u`.
pub fn usage_scan(data: &[u8]) {
    let [flags, rest @ ..] = data else {
        return;
    };
    let (cuts, body) = match rest.iter().position(|&b| b == 0xff) {
        Some(at) => (&rest[..at], &rest[at + 1..]),
        None => (&[][..], rest),
    };
    let framing = match flags & 3 {
        0 => Framing::Auto,
        1 => Framing::Json,
        _ => Framing::Sse,
    };
    let hide = flags & 4 != 0;
    let mut points: Vec<usize> = cuts
        .iter()
        .map(|&c| usize::from(c) * 7 % (body.len() + 1))
        .collect();
    points.sort_unstable();
    let mut parts = std::collections::VecDeque::new();
    let mut from = 0;
    for p in points.into_iter().chain([body.len()]) {
        parts.push_back(Bytes::copy_from_slice(&body[from..p]));
        from = p;
    }
    let whole = std::collections::VecDeque::from([Bytes::copy_from_slice(body)]);

    let (out, reports) = usage_body(parts, framing, hide);
    assert_eq!(reports.len(), 1, "the sink heard {} times", reports.len());
    let (out_whole, reports_whole) = usage_body(whole, framing, hide);
    assert_eq!(out, out_whole, "the reads changed the bytes out");
    assert_eq!(reports, reports_whole, "the reads changed the usage");
    let usage = reports[0];

    let hiding = hide && framing == Framing::Sse;
    if !hiding {
        assert_eq!(out, body, "the body changed on its way");
    }
    match framing {
        Framing::Json => {
            if let Ok(value) = serde_json::from_slice::<serde_json::Value>(body) {
                assert_eq!(
                    usage,
                    reference_usage(&[value]),
                    "not what serde_json reads"
                );
            }
        }
        Framing::Sse => {
            let events = sse_events(body);
            let valid = |e: &SseEvent| serde_json::from_slice::<serde_json::Value>(&e.data).ok();
            let raw = |e: &SseEvent| &body[e.start..e.end.unwrap_or(body.len())];
            // Only an event with a plain `"usage` can be hidden: exact when all of those are
            // JSON and no key hides behind an escape.
            let checkable = events
                .iter()
                .all(|e| !contains(raw(e), b"\"usage") || valid(e).is_some())
                && !contains(body, b"\\u");
            if hiding && checkable {
                let mut expected = Vec::new();
                let mut at = 0;
                for e in &events {
                    let Some(end) = e.end else { continue };
                    let usage_only = valid(e).is_some_and(|v| {
                        v.get("choices") == Some(&serde_json::Value::Array(vec![]))
                            && v.get("usage").is_some_and(serde_json::Value::is_object)
                    });
                    if usage_only && plain_usage_key(raw(e)) {
                        expected.extend_from_slice(&body[at..e.start]);
                        at = end;
                    }
                }
                expected.extend_from_slice(&body[at..]);
                assert!(
                    out == expected,
                    "not exactly the usage-only chunks hidden: {:?}",
                    String::from_utf8_lossy(&out)
                );
            }
            if checkable {
                let docs: Vec<_> = events.iter().filter_map(valid).collect();
                assert_eq!(usage, reference_usage(&docs), "not what serde_json reads");
            }
        }
        _ => {}
    }
}
