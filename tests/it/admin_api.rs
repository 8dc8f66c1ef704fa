//! The management API over a real loopback server: create → use → list (hints only) →
//! revoke → rejected; plus rotation, ephemeral keys and every error in the dialect.

use crate::support;

use std::sync::Arc;

use axum::Router;
use axum::routing::get;
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::Full;
use serde_json::{Value, json};
use support::{Answer, HttpClient, client, send, spawn_axum};
use tower_gateway_auth::keys::{KeyFormat, KeyManager, NewKey};
use tower_gateway_auth::rejection::ErrorFormat;
use tower_gateway_auth::store::MemoryStore;
use tower_gateway_auth::{Identity, InboundApiKeyLayer, ManagementApi, RejectionLayer};

/// Unix seconds of an RFC 3339 time in an answer (the API shows times that way).
fn secs(time: &Value) -> i64 {
    let text = time
        .as_str()
        .unwrap_or_else(|| panic!("not an RFC 3339 string: {time}"));
    assert!(text.ends_with('Z'), "shown in UTC: {text}");
    time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .unwrap_or_else(|e| panic!("{text}: {e}"))
        .unix_timestamp()
}

struct Api {
    http: HttpClient,
    base: String,
}

impl Api {
    async fn call(
        &self,
        method: Method,
        path: &str,
        key: Option<&str>,
        body: Option<Value>,
    ) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base));
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        let body = body.map_or(Bytes::new(), |b| Bytes::from(b.to_string()));
        send(
            &self.http,
            req.header("content-type", "application/json")
                .body(Full::new(body))
                .unwrap(),
        )
        .await
    }

    async fn raw(&self, method: Method, path: &str, key: &str, body: &'static str) -> Answer {
        let req = Request::builder()
            .method(method)
            .uri(format!("{}{path}", self.base))
            .header("x-api-key", key)
            .body(Full::new(Bytes::from_static(body.as_bytes())))
            .unwrap();
        send(&self.http, req).await
    }
}

/// A gateway-shaped app: `/admin` (the management API) and `/v1/whoami`, behind one inbound
/// layer on one store. Returns the API handle and a bootstrap admin key.
async fn start(format: ErrorFormat) -> (Api, String) {
    let store = Arc::new(MemoryStore::new());
    let manager = KeyManager::new(store.clone());
    let admin = manager
        .issue(NewKey::named("root").scopes(["admin", "chat"]))
        .await
        .unwrap();
    let app = Router::new()
        .route(
            "/v1/whoami",
            get(|who: Identity| async move { who.name().to_owned() }),
        )
        .nest("/admin", ManagementApi::new(manager).router())
        .layer(InboundApiKeyLayer::from_shared(store).key_formats([KeyFormat::new("gw").unwrap()]))
        .layer(RejectionLayer::new().error_format(format));
    let addr = spawn_axum(app).await;
    let api = Api {
        http: client(),
        base: format!("http://{addr}"),
    };
    (api, admin.key.expose().to_owned())
}

#[tokio::test]
async fn create_use_list_revoke() {
    let (api, admin) = start(ErrorFormat::OpenAi).await;
    let created = api
        .call(Method::POST, "/admin/keys", Some(&admin), Some(json!({"name": "alice", "scopes": ["chat"], "ttl_days": 30, "metadata": {"tenant": "acme"}})))
        .await;
    assert_eq!(created.status, StatusCode::CREATED);
    assert_eq!(created.headers["cache-control"], "no-store");
    let body = created.json();
    let key = body["key"].as_str().unwrap().to_owned();
    let id = body["id"].as_str().unwrap().to_owned();
    assert!(key.starts_with("gw_"));
    assert_eq!(body["hint"], key[..7]);
    assert_eq!(body["scopes"], json!(["chat"]));
    assert_eq!(body["state"], "usable");
    assert_eq!(body["metadata"]["tenant"], "acme");
    assert_eq!(
        secs(&body["expires_at"]) - secs(&body["created_at"]),
        30 * 86_400
    );

    let who = api.call(Method::GET, "/v1/whoami", Some(&key), None).await;
    assert_eq!((who.status, who.text()), (StatusCode::OK, "alice"));

    let list = api
        .call(Method::GET, "/admin/keys", Some(&admin), None)
        .await;
    assert_eq!(list.status, StatusCode::OK);
    assert!(!list.text().contains(&key), "a listing showed a key");
    assert!(!list.text().contains(&admin), "a listing showed a key");
    assert!(!list.text().contains("digest"));
    let keys = list.json()["keys"].as_array().unwrap().clone();
    assert_eq!(keys.len(), 2);
    let alice = keys.iter().find(|k| k["id"] == id.as_str()).unwrap();
    assert_eq!(alice["hint"], key[..7]);
    assert!(alice.get("key").is_none());

    let shown = api
        .call(
            Method::GET,
            &format!("/admin/keys/{id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(shown.json()["name"], "alice");

    let revoked = api
        .call(
            Method::POST,
            &format!("/admin/keys/{id}/revoke"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::OK);
    assert_eq!(revoked.json()["status"], "revoked");
    let who = api.call(Method::GET, "/v1/whoami", Some(&key), None).await;
    assert_eq!(who.status, StatusCode::UNAUTHORIZED);
    assert_eq!(who.json()["error"]["code"], "revoked_api_key");
}

#[tokio::test]
async fn rotate_disable_enable_delete_over_http() {
    let (api, admin) = start(ErrorFormat::OpenAi).await;
    let created = api
        .call(
            Method::POST,
            "/admin/keys",
            Some(&admin),
            Some(json!({"name": "svc", "never_expires": true})),
        )
        .await
        .json();
    let (old_key, id) = (
        created["key"].as_str().unwrap().to_owned(),
        created["id"].as_str().unwrap().to_owned(),
    );
    assert!(created.get("expires_at").is_none());
    assert!(created.get("not_before").is_none());

    let rotated = api
        .call(
            Method::POST,
            &format!("/admin/keys/{id}/rotate"),
            Some(&admin),
            Some(json!({"grace_seconds": 0})),
        )
        .await;
    assert_eq!(rotated.status, StatusCode::CREATED);
    let new_key = rotated.json()["key"].as_str().unwrap().to_owned();
    assert_ne!(new_key, old_key);
    assert_eq!(
        api.call(Method::GET, "/v1/whoami", Some(&old_key), None)
            .await
            .json()["error"]["code"],
        "expired_api_key"
    );
    assert_eq!(
        api.call(Method::GET, "/v1/whoami", Some(&new_key), None)
            .await
            .text(),
        "svc"
    );

    let new_id = rotated.json()["id"].as_str().unwrap().to_owned();
    api.call(
        Method::POST,
        &format!("/admin/keys/{new_id}/disable"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(
        api.call(Method::GET, "/v1/whoami", Some(&new_key), None)
            .await
            .json()["error"]["code"],
        "disabled_api_key"
    );
    api.call(
        Method::POST,
        &format!("/admin/keys/{new_id}/enable"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(
        api.call(Method::GET, "/v1/whoami", Some(&new_key), None)
            .await
            .status,
        StatusCode::OK
    );
    let deleted = api
        .call(
            Method::DELETE,
            &format!("/admin/keys/{new_id}"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(deleted.status, StatusCode::NO_CONTENT);
    assert_eq!(
        api.call(
            Method::GET,
            &format!("/admin/keys/{new_id}"),
            Some(&admin),
            None
        )
        .await
        .status,
        StatusCode::NOT_FOUND
    );
}

#[tokio::test]
async fn any_key_mints_ephemeral_keys_within_its_scopes() {
    let (api, admin) = start(ErrorFormat::OpenAi).await;
    let app_key = api
        .call(
            Method::POST,
            "/admin/keys",
            Some(&admin),
            Some(json!({"name": "app", "scopes": ["chat", "realtime"]})),
        )
        .await
        .json()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    let minted = api
        .call(
            Method::POST,
            "/admin/ephemeral",
            Some(&app_key),
            Some(json!({"scopes": ["realtime"], "ttl_seconds": 30})),
        )
        .await;
    assert_eq!(minted.status, StatusCode::CREATED);
    let body = minted.json();
    assert_eq!(body["scopes"], json!(["realtime"]));
    assert_eq!(secs(&body["expires_at"]) - secs(&body["created_at"]), 30);
    let eph = body["key"].as_str().unwrap();
    assert_eq!(
        api.call(Method::GET, "/v1/whoami", Some(eph), None)
            .await
            .text(),
        "ephemeral:app"
    );

    let wider = api
        .call(
            Method::POST,
            "/admin/ephemeral",
            Some(&app_key),
            Some(json!({"scopes": ["chat", "billing"]})),
        )
        .await;
    assert_eq!(wider.status, StatusCode::BAD_REQUEST);
    assert!(
        wider.json()["error"]["message"]
            .as_str()
            .unwrap()
            .contains("billing")
    );
    // The app key is no admin.
    assert_eq!(
        api.call(Method::GET, "/admin/keys", Some(&app_key), None)
            .await
            .status,
        StatusCode::FORBIDDEN
    );
}

/// Method, path, key, body, expected status, expected Anthropic error type.
type Case<'a> = (
    Method,
    &'a str,
    Option<&'a str>,
    &'static str,
    StatusCode,
    &'a str,
);

#[tokio::test]
async fn not_before_is_taken_as_rfc3339_or_unix_seconds_and_shown_as_rfc3339() {
    let (api, admin) = start(ErrorFormat::OpenAi).await;
    let create = |not_before: Value| {
        api.call(
            Method::POST,
            "/admin/keys",
            Some(&admin),
            Some(json!({"name": "later", "not_before": not_before})),
        )
    };
    for (sent, shown) in [
        (json!("2030-01-01T00:00:00Z"), "2030-01-01T00:00:00Z"),
        (json!("2030-01-01T01:00:00.5+01:00"), "2030-01-01T00:00:00Z"),
        (json!(1_893_456_000u64), "2030-01-01T00:00:00Z"),
    ] {
        let created = create(sent.clone()).await;
        assert_eq!(created.status, StatusCode::CREATED, "{sent}");
        let body = created.json();
        assert_eq!(body["not_before"], shown, "{sent}");
        assert_eq!(body["state"], "not_yet_valid");
        let id = body["id"].as_str().unwrap();
        let shown_again = api
            .call(
                Method::GET,
                &format!("/admin/keys/{id}"),
                Some(&admin),
                None,
            )
            .await
            .json();
        assert_eq!(shown_again["not_before"], shown);
        secs(&shown_again["created_at"]);
    }
    for bad in [json!("next tuesday"), json!("2030-01-01"), json!(-5)] {
        let refused = create(bad.clone()).await;
        assert_eq!(refused.status, StatusCode::BAD_REQUEST, "{bad}");
    }
}

#[tokio::test]
async fn errors_come_in_the_configured_dialect_and_nothing_changes() {
    let (api, admin) = start(ErrorFormat::Anthropic).await;
    let cases: Vec<Case> = vec![
        (
            Method::GET,
            "/admin/keys",
            None,
            "",
            StatusCode::UNAUTHORIZED,
            "authentication_error",
        ),
        (
            Method::POST,
            "/admin/keys",
            Some(admin.as_str()),
            "{not json",
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        ),
        (
            Method::POST,
            "/admin/keys",
            Some(admin.as_str()),
            r#"{"name": ""}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        ),
        (
            Method::POST,
            "/admin/keys",
            Some(admin.as_str()),
            r#"{"name": "x", "ttl_days": 0}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        ),
        (
            Method::POST,
            "/admin/keys",
            Some(admin.as_str()),
            r#"{"name": "x", "ttl_days": 1, "never_expires": true}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        ),
        (
            Method::POST,
            "/admin/keys",
            Some(admin.as_str()),
            r#"{"name": "x", "unknown_field": 1}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        ),
        (
            Method::GET,
            "/admin/keys/key_00000000000",
            Some(admin.as_str()),
            "",
            StatusCode::NOT_FOUND,
            "not_found_error",
        ),
        (
            Method::POST,
            "/admin/keys/not-an-id/revoke",
            Some(admin.as_str()),
            "",
            StatusCode::NOT_FOUND,
            "not_found_error",
        ),
        (
            Method::POST,
            "/admin/keys/key_00000000000/rotate",
            Some(admin.as_str()),
            r#"{"grace_seconds": -1}"#,
            StatusCode::BAD_REQUEST,
            "invalid_request_error",
        ),
    ];
    for (method, path, key, body, status, kind) in cases {
        let a = match key {
            Some(key) => api.raw(method.clone(), path, key, body).await,
            None => api.call(method.clone(), path, None, None).await,
        };
        assert_eq!(a.status, status, "{method} {path} {body}");
        assert_eq!(a.json()["type"], "error", "{method} {path} {body}");
        assert_eq!(a.json()["error"]["type"], kind, "{method} {path} {body}");
    }
    let list = api
        .call(Method::GET, "/admin/keys", Some(&admin), None)
        .await
        .json();
    assert_eq!(
        list["keys"].as_array().unwrap().len(),
        1,
        "a rejected request changed the store"
    );
}

// ---- Attacks (issue 11) --------------------------------------------------------------------

/// Starts the API on a real listener and returns its address with an admin key.
async fn start_raw() -> (std::net::SocketAddr, Api, String) {
    let (api, admin) = start(ErrorFormat::OpenAi).await;
    let addr = api.base.trim_start_matches("http://").parse().unwrap();
    (addr, api, admin)
}

#[tokio::test]
async fn an_ephemeral_key_never_manages_keys() {
    let (api, admin) = start(ErrorFormat::OpenAi).await;
    // With no scopes asked, the child of an admin key must not carry the admin scope's power.
    let minted = api
        .call(
            Method::POST,
            "/admin/ephemeral",
            Some(&admin),
            Some(json!({"ttl_seconds": 600})),
        )
        .await;
    assert_eq!(minted.status, StatusCode::CREATED);
    let child = minted.json()["key"].as_str().unwrap().to_owned();
    let root_id = api
        .call(Method::GET, "/admin/keys", Some(&admin), None)
        .await
        .json()["keys"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let before = api
        .call(Method::GET, "/admin/keys", Some(&admin), None)
        .await
        .json()["keys"]
        .as_array()
        .unwrap()
        .len();
    for (method, path, body) in [
        (
            Method::POST,
            "/admin/keys".to_owned(),
            json!({"name": "forever", "scopes": ["admin"], "never_expires": true}),
        ),
        (Method::GET, "/admin/keys".to_owned(), json!({})),
        (
            Method::POST,
            format!("/admin/keys/{root_id}/rotate"),
            json!({"grace_seconds": 0}),
        ),
        (
            Method::POST,
            format!("/admin/keys/{root_id}/revoke"),
            json!({}),
        ),
        (Method::POST, "/admin/ephemeral".to_owned(), json!({})),
    ] {
        let answer = api
            .call(method.clone(), &path, Some(&child), Some(body))
            .await;
        assert_eq!(
            answer.status,
            StatusCode::FORBIDDEN,
            "{method} {path}: {}",
            answer.text()
        );
        assert!(!answer.text().contains("\"key\":"), "{}", answer.text());
    }
    // Asking for the admin scope explicitly is refused too.
    let explicit = api
        .call(
            Method::POST,
            "/admin/ephemeral",
            Some(&admin),
            Some(json!({"scopes": ["admin"]})),
        )
        .await;
    assert_eq!(
        explicit.status,
        StatusCode::FORBIDDEN,
        "{}",
        explicit.text()
    );
    // Nothing changed: the root key still works and no key was added.
    let after = api
        .call(Method::GET, "/admin/keys", Some(&admin), None)
        .await;
    assert_eq!(after.status, StatusCode::OK);
    assert_eq!(after.json()["keys"].as_array().unwrap().len(), before);
}

#[tokio::test]
async fn a_key_revoked_while_its_mint_request_body_is_in_flight_mints_nothing() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let (addr, api, admin) = start_raw().await;
    let app = api
        .call(
            Method::POST,
            "/admin/keys",
            Some(&admin),
            Some(json!({"name": "app"})),
        )
        .await
        .json();
    let (app_key, app_id) = (
        app["key"].as_str().unwrap().to_owned(),
        app["id"].as_str().unwrap().to_owned(),
    );
    let body = r#"{"ttl_seconds": 3600}"#;
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "POST /admin/ephemeral HTTP/1.1\r\nhost: x\r\nx-api-key: {app_key}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).await.unwrap();
    slow.write_all(&body.as_bytes()[..1]).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let revoked = api
        .call(
            Method::POST,
            &format!("/admin/keys/{app_id}/revoke"),
            Some(&admin),
            None,
        )
        .await;
    assert_eq!(revoked.status, StatusCode::OK);
    slow.write_all(&body.as_bytes()[1..]).await.unwrap();
    let mut answer = vec![0; 4096];
    let n = slow.read(&mut answer).await.unwrap();
    let answer = String::from_utf8_lossy(&answer[..n]).into_owned();
    assert!(!answer.starts_with("HTTP/1.1 201"), "{answer}");
    assert!(!answer.contains("\"key\":"), "{answer}");
    // Whatever the answer, no live key descends from the revoked one.
    let keys = api
        .call(Method::GET, "/admin/keys", Some(&admin), None)
        .await
        .json();
    for k in keys["keys"].as_array().unwrap() {
        if k["parent"] == json!(app_id) {
            assert_ne!(k["state"], "usable", "{k}");
        }
    }
}

#[tokio::test]
async fn past_the_cap_minting_answers_429_in_the_dialect() {
    let (api, admin) = start(ErrorFormat::OpenAi).await;
    let app_key = api
        .call(
            Method::POST,
            "/admin/keys",
            Some(&admin),
            Some(json!({"name": "app"})),
        )
        .await
        .json()["key"]
        .as_str()
        .unwrap()
        .to_owned();
    for i in 0..100 {
        let ok = api
            .call(Method::POST, "/admin/ephemeral", Some(&app_key), None)
            .await;
        assert_eq!(ok.status, StatusCode::CREATED, "mint {i}");
    }
    let refused = api
        .call(Method::POST, "/admin/ephemeral", Some(&app_key), None)
        .await;
    assert_eq!(
        refused.status,
        StatusCode::TOO_MANY_REQUESTS,
        "{}",
        refused.text()
    );
    assert!(refused.headers.get("retry-after").is_some());
    let body = refused.json();
    assert_eq!(body["error"]["code"], "too_many_ephemeral_keys", "{body}");
}

#[tokio::test]
async fn an_ephemeral_keys_state_shows_its_parents() {
    let (api, admin) = start(ErrorFormat::OpenAi).await;
    let app = api
        .call(
            Method::POST,
            "/admin/keys",
            Some(&admin),
            Some(json!({"name": "app"})),
        )
        .await
        .json();
    let (app_key, app_id) = (app["key"].as_str().unwrap(), app["id"].as_str().unwrap());
    let child = api
        .call(Method::POST, "/admin/ephemeral", Some(app_key), None)
        .await
        .json();
    let child_id = child["id"].as_str().unwrap();
    let state = |body: Value| body["state"].as_str().unwrap().to_owned();
    let show = format!("/admin/keys/{child_id}");
    assert_eq!(
        state(
            api.call(Method::GET, &show, Some(&admin), None)
                .await
                .json()
        ),
        "usable"
    );
    api.call(
        Method::POST,
        &format!("/admin/keys/{app_id}/disable"),
        Some(&admin),
        None,
    )
    .await;
    assert_eq!(
        state(
            api.call(Method::GET, &show, Some(&admin), None)
                .await
                .json()
        ),
        "disabled"
    );
    let listed = api
        .call(Method::GET, "/admin/keys", Some(&admin), None)
        .await
        .json();
    let row = listed["keys"]
        .as_array()
        .unwrap()
        .iter()
        .find(|k| k["id"] == child_id)
        .unwrap()
        .clone();
    assert_eq!(state(row), "disabled");
    let who = api
        .call(
            Method::GET,
            "/v1/whoami",
            Some(child["key"].as_str().unwrap()),
            None,
        )
        .await;
    assert_eq!(who.status, StatusCode::UNAUTHORIZED);
}
