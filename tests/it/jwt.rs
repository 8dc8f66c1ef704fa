//! User tokens (issue 16) against a real JWKS served on loopback, with tokens signed by a
//! real signing library (jsonwebtoken's encoder, RSA and ECDSA keys made by openssl): what
//! passes, every way a token is refused (with its RFC 6750 `error` and
//! `error_description`, nothing reaching the inner service), key rotation, a flood of
//! unknown `kid`s costing one fetch, the endpoint down, and OIDC discovery.

use crate::support;

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::StatusCode;
use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value, json};
use support::{Recorder, client, get, send};
use tower::ServiceBuilder;
use tower_gateway_auth::jwt::{Accept, Algorithm, JwtVerifier};
use tower_gateway_auth::keys::{KeyId, KeyRecord};
use tower_gateway_auth::store::{KeyStore, MemoryStore};
use tower_gateway_auth::{InboundApiKeyLayer, RejectionLayer, RequireScopesLayer};

const RSA1: &[u8] = include_bytes!("../fixtures/jwt/rsa1.key.pem");
const RSA1_PUB: &[u8] = include_bytes!("../fixtures/jwt/rsa1.pub.pem");
const RSA2: &[u8] = include_bytes!("../fixtures/jwt/rsa2.key.pem");
const EC1: &[u8] = include_bytes!("../fixtures/jwt/ec1.key.pem");
pub(crate) const JWK1: &str = include_str!("../fixtures/jwt/rsa1.jwk.json");
const JWK2: &str = include_str!("../fixtures/jwt/rsa2.jwk.json");
const JWK_EC: &str = include_str!("../fixtures/jwt/ec1.jwk.json");
pub(crate) const AUDIENCE: &str = "https://api.example.test";
const API_KEY: &str = "gw_jwt-test-api-key-0001";

/// A JWKS endpoint (and OIDC discovery document) on loopback whose key set, `max-age` and
/// health the test controls; it counts the fetches of the set.
#[derive(Clone)]
pub(crate) struct Jwks {
    addr: std::net::SocketAddr,
    keys: Arc<Mutex<Vec<&'static str>>>,
    fetches: Arc<AtomicU64>,
    /// 0: healthy; otherwise the status every answer gets.
    failing: Arc<AtomicU16>,
    max_age: Arc<AtomicU64>,
}

impl Jwks {
    pub(crate) async fn start(keys: &[&'static str]) -> Jwks {
        let jwks = Jwks {
            addr: "127.0.0.1:0".parse().unwrap(),
            keys: Arc::new(Mutex::new(keys.to_vec())),
            fetches: Arc::default(),
            failing: Arc::default(),
            max_age: Arc::new(AtomicU64::new(300)),
        };
        let state = jwks.clone();
        let app = axum::Router::new().fallback(move |uri: http::Uri, headers: http::HeaderMap| {
            let state = state.clone();
            async move {
                let failing = state.failing.load(Ordering::SeqCst);
                if failing != 0 {
                    if uri.path() == "/jwks" {
                        state.fetches.fetch_add(1, Ordering::SeqCst);
                    }
                    return (StatusCode::from_u16(failing).unwrap(), String::new()).into_response();
                }
                match uri.path() {
                    "/jwks" => {
                        state.fetches.fetch_add(1, Ordering::SeqCst);
                        let keys: Vec<Value> = state
                            .keys
                            .lock()
                            .unwrap()
                            .iter()
                            .map(|k| serde_json::from_str(k).unwrap())
                            .collect();
                        let max_age = state.max_age.load(Ordering::SeqCst);
                        (
                            [("cache-control", format!("public, max-age={max_age}"))],
                            axum::Json(json!({ "keys": keys })),
                        )
                            .into_response()
                    }
                    "/.well-known/openid-configuration" => {
                        let host = headers["host"].to_str().unwrap();
                        let issuer = format!("http://{host}");
                        axum::Json(json!({
                            "issuer": issuer,
                            "jwks_uri": format!("{issuer}/jwks"),
                        }))
                        .into_response()
                    }
                    _ => StatusCode::NOT_FOUND.into_response(),
                }
            }
        });
        let addr = support::spawn_axum(app).await;
        Jwks { addr, ..jwks }
    }

    pub(crate) fn issuer(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub(crate) fn url(&self) -> String {
        format!("{}/jwks", self.issuer())
    }

    fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::SeqCst)
    }
}

use axum::response::IntoResponse;

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims of a token for `issuer`, valid for an hour, with `extra` on top.
pub(crate) fn claims(issuer: &str, extra: Value) -> Value {
    let mut claims = json!({
        "iss": issuer,
        "sub": "user-42",
        "aud": AUDIENCE,
        "exp": now() + 3600,
        "iat": now(),
        "name": "Ada Lovelace",
        "scope": "chat embeddings",
        "org_id": "org-7",
    });
    for (k, v) in extra.as_object().unwrap() {
        claims[k] = v.clone();
    }
    claims
}

fn sign(alg: Algorithm, kid: Option<&str>, pem: &[u8], claims: &Value) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    let key = match alg {
        Algorithm::ES256 => EncodingKey::from_ec_pem(pem).unwrap(),
        _ => EncodingKey::from_rsa_pem(pem).unwrap(),
    };
    encode(&header, claims, &key).unwrap()
}

pub(crate) fn rs256(kid: &str, claims: &Value) -> String {
    sign(Algorithm::RS256, Some(kid), RSA1, claims)
}

/// base64url without padding (RFC 7515 §2).
fn b64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..=chunk.len() {
            out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
        }
    }
    out
}

/// A verifier on `jwks` for its issuer and the test audience.
fn verifier(jwks: &Jwks) -> tower_gateway_auth::jwt::JwtVerifierBuilder {
    JwtVerifier::builder()
        .issuer(jwks.issuer())
        .audience(AUDIENCE)
        .jwks_url(&jwks.url())
        .algorithms([Algorithm::RS256, Algorithm::ES256])
        .metadata_claims(["org_id"])
}

/// A stack taking keys and tokens (`accept`), one API key in its store, scope `chat`
/// required, and a recording inner service.
async fn stack(verifier: JwtVerifier, accept: Accept) -> (std::net::SocketAddr, Recorder) {
    let store = MemoryStore::new();
    store.insert(
        KeyRecord::new(KeyId::random(), store.hasher().digest(API_KEY.as_bytes()))
            .with_name("service-account")
            .with_scopes(["chat"]),
    );
    let rec = Recorder::default();
    let service = ServiceBuilder::new()
        .layer(RejectionLayer::new().realm("gateway"))
        .layer(
            InboundApiKeyLayer::new(store)
                .tokens(verifier)
                .accept(accept),
        )
        .layer(RequireScopesLayer::new(["chat"]))
        .service(rec.service());
    (support::spawn_service(service).await, rec)
}

async fn bearer(addr: std::net::SocketAddr, token: &str) -> support::Answer {
    send(
        &client(),
        get(
            addr,
            "/v1/chat",
            &[("authorization", &format!("Bearer {token}"))],
        ),
    )
    .await
}

/// A refusal with `status`, RFC 6750 `error` and a description containing `why`.
fn refused(answer: &support::Answer, status: StatusCode, error: &str, why: &str) {
    assert_eq!(answer.status, status, "{:?}", answer.body);
    let challenge = answer.headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains(&format!("error=\"{error}\"")),
        "{challenge}"
    );
    assert!(challenge.contains("realm=\"gateway\""), "{challenge}");
    if !why.is_empty() {
        assert!(
            challenge.contains("error_description=\"") && challenge.contains(why),
            "{challenge} lacks {why}"
        );
    }
}

#[tokio::test]
async fn a_valid_token_passes_with_its_claims_as_the_identity() {
    let jwks = Jwks::start(&[JWK1, JWK_EC]).await;
    let (addr, rec) = stack(verifier(&jwks).build().unwrap(), Accept::Both).await;
    let token = rs256("k1", &claims(&jwks.issuer(), json!({})));
    let answer = bearer(addr, &token).await;
    assert_eq!(answer.status, StatusCode::OK, "{:?}", answer.body);
    let seen = rec.last();
    let who = seen.identity.expect("an identity");
    assert_eq!(who.name(), "Ada Lovelace");
    assert!(who.scopes().contains("chat") && who.scopes().contains("embeddings"));
    assert_eq!(who.metadata()["org_id"], "org-7");
    assert_eq!(who.metadata()["sub"], "user-42");
    assert_eq!(who.metadata()["iss"], jwks.issuer());
    assert!(
        !seen.headers.contains_key("authorization"),
        "the token does not go upstream"
    );
    // The same subject is the same identity on every token; ES256 works too.
    let again = sign(
        Algorithm::ES256,
        Some("e1"),
        EC1,
        &claims(&jwks.issuer(), json!({"jti": "another"})),
    );
    assert_eq!(bearer(addr, &again).await.status, StatusCode::OK);
    assert_eq!(rec.last().identity.unwrap().id(), who.id());
    // An API key in the same header still works.
    assert_eq!(bearer(addr, API_KEY).await.status, StatusCode::OK);
    assert_eq!(rec.last().identity.unwrap().name(), "service-account");
    assert_eq!(jwks.fetches(), 1, "one fetch serves every token");
}

#[tokio::test]
async fn every_bad_token_is_refused_with_its_reason_and_reaches_nothing() {
    let jwks = Jwks::start(&[JWK1]).await;
    let (addr, rec) = stack(verifier(&jwks).build().unwrap(), Accept::Both).await;
    let iss = jwks.issuer();
    let unauthorized = StatusCode::UNAUTHORIZED;
    let cases: Vec<(&str, String, StatusCode, &str, &str)> = vec![
        (
            "expired",
            rs256("k1", &claims(&iss, json!({"exp": now() - 120}))),
            unauthorized,
            "invalid_token",
            "expired",
        ),
        (
            "nbf in the future",
            rs256("k1", &claims(&iss, json!({"nbf": now() + 600}))),
            unauthorized,
            "invalid_token",
            "not valid yet",
        ),
        (
            "wrong issuer",
            rs256("k1", &claims("https://evil.example", json!({}))),
            unauthorized,
            "invalid_token",
            "issuer",
        ),
        (
            "wrong audience",
            rs256("k1", &claims(&iss, json!({"aud": "https://other.example"}))),
            unauthorized,
            "invalid_token",
            "audience",
        ),
        (
            "bad signature",
            sign(Algorithm::RS256, Some("k1"), RSA2, &claims(&iss, json!({}))),
            unauthorized,
            "invalid_token",
            "signature",
        ),
        (
            "alg none",
            format!(
                "{}.{}.",
                b64(br#"{"alg":"none","typ":"JWT","kid":"k1"}"#),
                b64(claims(&iss, json!({})).to_string().as_bytes())
            ),
            unauthorized,
            "invalid_token",
            "",
        ),
        (
            "HS256 signed with the RSA public key",
            {
                let mut header = Header::new(Algorithm::HS256);
                header.kid = Some("k1".into());
                encode(
                    &header,
                    &claims(&iss, json!({})),
                    &EncodingKey::from_secret(RSA1_PUB).unwrap(),
                )
                .unwrap()
            },
            unauthorized,
            "invalid_token",
            "algorithm",
        ),
        (
            "no exp",
            rs256("k1", &{
                let mut c = claims(&iss, json!({}));
                c.as_object_mut().unwrap().remove("exp");
                c
            }),
            unauthorized,
            "invalid_token",
            "",
        ),
        (
            "exp of the wrong type (CVE-2026-25537)",
            rs256("k1", &claims(&iss, json!({"exp": "9999999999"}))),
            unauthorized,
            "invalid_token",
            "",
        ),
        (
            "no subject",
            rs256("k1", &{
                let mut c = claims(&iss, json!({}));
                c.as_object_mut().unwrap().remove("sub");
                c
            }),
            unauthorized,
            "invalid_token",
            "subject",
        ),
        (
            "malformed",
            // The header is cut short: `{"alg":`.
            format!("{}.e30.c2ln", b64(br#"{"alg":"#)),
            unauthorized,
            "invalid_token",
            "malformed",
        ),
        (
            "oversized",
            format!("eyJhbGciOiJSUzI1NiJ9.{}.sig", "A".repeat(9000)),
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "",
        ),
    ];
    for (name, token, status, error, why) in &cases {
        let answer = bearer(addr, token).await;
        refused(&answer, *status, error, why);
        assert!(
            !answer.text().contains(token.as_str()),
            "{name}: the token echoed"
        );
        assert_eq!(rec.count(), 0, "{name} reached the inner service");
    }
    // A JWT in X-API-Key is a key: unknown, 401.
    let token = rs256("k1", &claims(&iss, json!({})));
    let answer = send(&client(), get(addr, "/v1/chat", &[("x-api-key", &token)])).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.json()["error"]["code"], "invalid_api_key");
    assert_eq!(rec.count(), 0);
    // And the right scope is still required of a token user.
    let unscoped = rs256("k1", &claims(&iss, json!({"scope": "embeddings"})));
    let answer = bearer(addr, &unscoped).await;
    refused(&answer, StatusCode::FORBIDDEN, "insufficient_scope", "");
    assert_eq!(rec.count(), 0);
}

#[tokio::test]
async fn a_rotated_key_is_fetched_once_and_a_flood_of_unknown_kids_costs_one_fetch() {
    let jwks = Jwks::start(&[JWK1]).await;
    let verifier = verifier(&jwks)
        .refetch_interval(Duration::from_secs(3600))
        .build()
        .unwrap();
    let (addr, _rec) = stack(verifier.clone(), Accept::Both).await;
    let iss = jwks.issuer();
    assert_eq!(
        bearer(addr, &rs256("k1", &claims(&iss, json!({}))))
            .await
            .status,
        200
    );
    assert_eq!(jwks.fetches(), 1);
    // The issuer rotates to k2: the first k2 token refetches and passes.
    jwks.keys.lock().unwrap().push(JWK2);
    let rotated = sign(Algorithm::RS256, Some("k2"), RSA2, &claims(&iss, json!({})));
    assert_eq!(bearer(addr, &rotated).await.status, 200);
    assert_eq!(jwks.fetches(), 2);
    // A flood of random kids within the interval: refused, and no more fetches.
    for i in 0..50 {
        let kid = format!("random-{i}");
        let token = sign(Algorithm::RS256, Some(&kid), RSA1, &claims(&iss, json!({})));
        refused(
            &bearer(addr, &token).await,
            StatusCode::UNAUTHORIZED,
            "invalid_token",
            "unknown",
        );
    }
    assert_eq!(
        jwks.fetches(),
        2,
        "50 unknown kids, no fetch within the interval"
    );
    assert_eq!(verifier.key_set_fetches(), 2);
}

#[tokio::test]
async fn the_endpoint_down_serves_the_held_set_and_never_loaded_fails_closed() {
    let jwks = Jwks::start(&[JWK1]).await;
    jwks.max_age.store(1, Ordering::SeqCst);
    let verifier = verifier(&jwks)
        .key_set_ttl(Duration::from_secs(1), Duration::from_secs(1))
        .refetch_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let (addr, _) = stack(verifier.clone(), Accept::Both).await;
    let iss = jwks.issuer();
    assert_eq!(
        bearer(addr, &rs256("k1", &claims(&iss, json!({}))))
            .await
            .status,
        200
    );
    // Refreshed in the background before it goes stale, with no request asking.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(jwks.fetches() >= 2, "fetches: {}", jwks.fetches());
    // Down: the held set keeps serving (within `stale_for`, an hour by default).
    jwks.failing.store(500, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let fresh = rs256("k1", &claims(&iss, json!({"jti": "new"})));
    assert_eq!(bearer(addr, &fresh).await.status, 200);

    // A verifier that never loaded a set: 503, not a pass and not a 401.
    let down = Jwks::start(&[JWK1]).await;
    down.failing.store(503, Ordering::SeqCst);
    let (addr, rec) = stack(verifier_for(&down), Accept::Both).await;
    let token = rs256("k1", &claims(&down.issuer(), json!({})));
    let answer = bearer(addr, &token).await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.json()["error"]["code"], "auth_unavailable");
    assert_eq!(rec.count(), 0);
}

fn verifier_for(jwks: &Jwks) -> JwtVerifier {
    verifier(jwks).build().unwrap()
}

#[tokio::test]
async fn oidc_discovery_finds_the_key_set_from_the_issuer() {
    let jwks = Jwks::start(&[JWK1]).await;
    let verifier = JwtVerifier::builder()
        .issuer(jwks.issuer())
        .audience(AUDIENCE)
        .discover()
        .build()
        .unwrap();
    let (addr, rec) = stack(verifier, Accept::Tokens).await;
    let token = rs256("k1", &claims(&jwks.issuer(), json!({})));
    assert_eq!(bearer(addr, &token).await.status, 200);
    assert_eq!(jwks.fetches(), 1);
    // Tokens only: an API key is refused.
    let answer = bearer(addr, API_KEY).await;
    refused(
        &answer,
        StatusCode::UNAUTHORIZED,
        "invalid_token",
        "user token",
    );
    assert_eq!(rec.count(), 1);
}

#[tokio::test]
async fn keys_only_treats_a_jwt_as_a_key_and_static_keys_need_no_fetch() {
    let verifier = JwtVerifier::builder()
        .issuer("https://static.example")
        .jwk(JWK1)
        .build()
        .unwrap();
    let (addr, rec) = stack(verifier.clone(), Accept::Keys).await;
    let token = rs256(
        "k1",
        &claims("https://static.example", json!({"aud": null})),
    );
    let answer = bearer(addr, &token).await;
    assert_eq!(answer.status, StatusCode::UNAUTHORIZED);
    assert_eq!(answer.json()["error"]["code"], "invalid_api_key");
    let (addr, _) = stack(verifier, Accept::Both).await;
    assert_eq!(bearer(addr, &token).await.status, StatusCode::OK);
    assert_eq!(rec.count(), 0);
    // HMAC without a configured secret cannot be configured, and a short secret is refused.
    assert!(
        JwtVerifier::builder()
            .algorithms([Algorithm::HS256])
            .jwk(JWK1)
            .build()
            .is_err()
    );
    assert!(
        JwtVerifier::builder()
            .hmac_secret(b"short")
            .build()
            .is_err()
    );
}

/// A WebSocket opened with a user token is closed once the token expires: the recheck
/// verifies the token again while the socket is open.
#[tokio::test]
async fn a_token_authenticated_socket_closes_when_the_token_expires() {
    use futures_util::SinkExt;
    use tokio_tungstenite::tungstenite::Message;
    use tower_gateway_auth::UpstreamAuthLayer;
    use tower_gateway_auth::proxy::{Forward, StripHopByHopLayer};
    use tower_gateway_auth::upstream::{Credential, Provider};

    let jwks = Jwks::start(&[JWK1]).await;
    let verifier = verifier(&jwks).leeway(Duration::ZERO).build().unwrap();
    let (echo, sessions) = support::ws::spawn_echo().await;
    let inbound = InboundApiKeyLayer::new(MemoryStore::new())
        .tokens(verifier)
        .accept(Accept::Tokens)
        .recheck_sockets_every(Duration::from_millis(100));
    let upstream = UpstreamAuthLayer::new(Provider::openai(), Credential::new("sk-up").unwrap())
        .strip_inbound(&inbound);
    let stack = ServiceBuilder::new()
        .layer(StripHopByHopLayer::new())
        .layer(inbound)
        .layer(upstream)
        .service(Forward::new(&format!("ws://{echo}")).unwrap());
    let gw = support::spawn_service(stack).await;

    let token = rs256("k1", &claims(&jwks.issuer(), json!({"exp": now() + 2})));
    let (mut socket, _) = support::ws::connect(
        gw,
        "/v1/realtime",
        &[("authorization", &format!("Bearer {token}"))],
    )
    .await
    .expect("a valid token opens the socket");
    socket.send(Message::text("hi")).await.unwrap();
    assert_eq!(support::ws::next_text(&mut socket).await, "hi");
    assert_eq!(sessions.last().headers["authorization"], "Bearer sk-up");
    let (code, reason) = support::ws::close_of(&mut socket, Duration::from_secs(5)).await;
    assert_eq!(code, 1008, "{reason}");
    assert!(reason.to_lowercase().contains("expired"), "{reason}");
}
