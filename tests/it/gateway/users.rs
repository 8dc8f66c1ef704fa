//! User tokens in the reference gateway: one route takes a JWT user and an API key user,
//! forwards each one's identity, and applies its scope to both; a keys-only route refuses
//! the token. The key set is served on loopback.

use super::{app, call, config, issue, start};
use crate::jwt::{AUDIENCE, JWK1, Jwks, claims, rs256};
use crate::support::{TempDir, spawn_upstream};

use http::{Method, StatusCode};
use serde_json::json;

fn with_jwt(keys_file: &std::path::Path, upstream: std::net::SocketAddr, jwks: &Jwks) -> String {
    config(keys_file, upstream)
        .replacen(
            "\n[[route]]",
            &format!(
                "identity_header = \"x-consumer-id\"\n\n[jwt]\nissuer = \"{}\"\naudience = \"{AUDIENCE}\"\njwks_url = \"{}\"\nmetadata_claims = [\"org_id\"]\n\n[[route]]",
                jwks.issuer(),
                jwks.url()
            ),
            1,
        )
        // The Anthropic route takes keys only.
        .replace(
            "error_format = \"anthropic\"",
            "error_format = \"anthropic\"\naccept = \"keys\"",
        )
}

#[tokio::test]
async fn one_route_takes_a_token_user_and_a_key_user_forwards_who_and_scopes_both() {
    let dir = TempDir::new("gw-users");
    let (upstream, seen) = spawn_upstream().await;
    let jwks = Jwks::start(&[JWK1]).await;
    let (key, key_id) = issue(&dir.file(), "service", &["openai"]).await;
    let gw = start(&with_jwt(&dir.file(), upstream, &jwks)).await;
    let iss = jwks.issuer();
    let token = rs256("k1", &claims(&iss, json!({"scope": "openai"})));
    let bearer = |credential: &str| format!("Bearer {credential}");

    let by_token = call(
        gw.addr,
        Method::GET,
        "/openai/v1/models",
        &[("authorization", &bearer(&token))],
        "",
    )
    .await;
    assert_eq!(by_token.status, StatusCode::OK, "{:?}", by_token.body);
    let by_key = call(
        gw.addr,
        Method::GET,
        "/openai/v1/models",
        &[("authorization", &bearer(key.expose()))],
        "",
    )
    .await;
    assert_eq!(by_key.status, StatusCode::OK);
    let all = seen.all();
    let (token_seen, key_seen) = (&all[0], &all[1]);
    // Each one's identity goes upstream, and neither credential does.
    assert_eq!(key_seen.headers["x-consumer-id"], key_id.as_str());
    let token_user = token_seen.headers["x-consumer-id"].to_str().unwrap();
    assert!(
        token_user.starts_with("key_") && token_user != key_id,
        "{token_user}"
    );
    for s in &all {
        let auth = s.headers["authorization"].to_str().unwrap();
        assert!(auth.starts_with("Bearer sk-provider-openai"), "{auth}");
        assert!(!auth.contains(&token) && !auth.contains(key.expose()));
    }

    // The route's scope is required of a token user as of a key user.
    let unscoped = rs256("k1", &claims(&iss, json!({"scope": "embeddings"})));
    let refused = call(
        gw.addr,
        Method::GET,
        "/openai/v1/models",
        &[("authorization", &bearer(&unscoped))],
        "",
    )
    .await;
    assert_eq!(refused.status, StatusCode::FORBIDDEN);
    assert_eq!(refused.json()["error"]["code"], "insufficient_scope");
    // An expired token: 401 invalid_token with its description, in the route's realm.
    let expired = rs256(
        "k1",
        &claims(&iss, json!({"scope": "openai", "exp": 1_000})),
    );
    let refused = call(
        gw.addr,
        Method::GET,
        "/openai/v1/models",
        &[("authorization", &bearer(&expired))],
        "",
    )
    .await;
    assert_eq!(refused.status, StatusCode::UNAUTHORIZED);
    let challenge = refused.headers["www-authenticate"].to_str().unwrap();
    assert!(
        challenge.contains("realm=\"gateway\"") && challenge.contains("expired"),
        "{challenge}"
    );
    // The keys-only route treats the token as a key: unknown.
    let keys_only = call(
        gw.addr,
        Method::POST,
        "/anthropic/v1/messages",
        &[("x-api-key", &token)],
        "{}",
    )
    .await;
    assert_eq!(keys_only.status, StatusCode::UNAUTHORIZED);
    assert_eq!(seen.count(), 2, "nothing refused went upstream");
}

#[test]
fn jwt_settings_are_checked() {
    let upstream = "127.0.0.1:9".parse().unwrap();
    let base = config(std::path::Path::new("/tmp/k.json"), upstream);
    let field = |text: String| match app::Config::from_toml(&text) {
        Err(e) => e.field,
        Ok(config) => config
            .plan(&super::env)
            .err()
            .map(|e| e.field)
            .unwrap_or_default(),
    };
    let jwt =
        |table: &str| base.replacen("\n[[route]]", &format!("\n[jwt]\n{table}\n\n[[route]]"), 1);
    assert_eq!(
        field(jwt(
            "issuer = \"https://i.example\"\nalgorithms = [\"none\"]"
        )),
        "jwt.algorithms"
    );
    assert_eq!(
        field(jwt(
            "issuer = \"https://i.example\"\nalgorithms = [\"HS256\"]"
        )),
        "jwt"
    );
    assert_eq!(
        field(jwt(
            "issuer = \"https://i.example\"\njwks_url = \"not a url\""
        )),
        "jwt"
    );
    assert_eq!(
        field(jwt("issuer = \"https://i.example\"")),
        "",
        "discovery from the issuer"
    );
    // `accept` without `[jwt]`.
    let accept = base.replace(
        "scope = \"openai\"",
        "scope = \"openai\"\naccept = \"tokens\"",
    );
    assert_eq!(field(accept), "route[0].accept");
    let bad_accept = jwt("issuer = \"https://i.example\"").replace(
        "scope = \"openai\"",
        "scope = \"openai\"\naccept = \"users\"",
    );
    assert_eq!(field(bad_accept), "route[0].accept");
}

#[tokio::test]
async fn a_route_with_an_oauth2_credential_sends_the_fetched_token_upstream() {
    let dir = TempDir::new("gw-oauth2");
    let (upstream, seen) = spawn_upstream().await;
    let fetches = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counted = fetches.clone();
    let idp = axum::Router::new().route(
        "/token",
        axum::routing::post(move |headers: http::HeaderMap, body: String| {
            let counted = counted.clone();
            async move {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                // Basic, as the config asks by default: "svc:s3cret-value" form-encoded.
                assert_eq!(headers["authorization"], "Basic c3ZjOnMzY3JldC12YWx1ZQ==");
                assert!(
                    body.contains("scope=https%3A%2F%2Fcognitiveservices.azure.com%2F.default")
                );
                r#"{"access_token":"tok-from-idp","token_type":"Bearer","expires_in":3600}"#
            }
        }),
    );
    let idp = crate::support::spawn_axum(idp).await;
    let (key, _) = issue(&dir.file(), "service", &["openai"]).await;
    let text = config(&dir.file(), upstream).replacen(
        "credential_env = \"OPENAI_API_KEY\"",
        &format!(
            "credential = {{ oauth2 = {{ token_url = \"http://{idp}/token\", client_id_env = \"IDP_CLIENT\", client_secret_env = \"IDP_SECRET\", scope = \"https://cognitiveservices.azure.com/.default\" }} }}"
        ),
        1,
    );
    let env = |var: &str| match var {
        "IDP_CLIENT" => Some("svc".to_owned()),
        "IDP_SECRET" => Some("s3cret-value".to_owned()),
        other => super::env(other),
    };
    let gateway = app::build(app::Config::from_toml(&text).unwrap(), &env)
        .await
        .unwrap();
    let gw = super::Running::serve(gateway).await;
    for _ in 0..3 {
        let answer = call(
            gw.addr,
            Method::GET,
            "/openai/v1/models",
            &[("x-api-key", key.expose())],
            "",
        )
        .await;
        assert_eq!(answer.status, StatusCode::OK);
    }
    for s in seen.all() {
        assert_eq!(s.headers["authorization"], "Bearer tok-from-idp");
    }
    assert_eq!(
        fetches.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one token serves all"
    );
    // A missing secret variable stops start-up, naming the field.
    let missing = |var: &str| if var == "IDP_SECRET" { None } else { env(var) };
    let error = app::Config::from_toml(&text)
        .unwrap()
        .plan(&missing)
        .err()
        .unwrap();
    assert_eq!(error.field, "route[0].credential.oauth2.client_secret_env");
}
