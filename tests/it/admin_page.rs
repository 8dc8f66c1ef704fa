//! The key-management web page: its security headers, and the whole journey in headless
//! Chromium (sign in, create a key shown once, use it, revoke it in the page, 401).

use crate::support;

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::routing::get;
use fantoccini::Locator;
use http::StatusCode;
use support::browser::Browser;
use support::{Recorder, client, get as get_req, send, spawn_axum};
use tower_gateway_auth::keys::{IssuedKey, KeyManager, LastUsed, NewKey};
use tower_gateway_auth::store::MemoryStore;
use tower_gateway_auth::{Identity, InboundApiKeyLayer, ManagementApi, RejectionLayer};

struct Site {
    addr: std::net::SocketAddr,
    admin: IssuedKey,
    uses: LastUsed,
    seen: Recorder,
}

/// A gateway-shaped app on loopback: the page outside the inbound layer, the API and a
/// route `/v1/whoami` inside it.
async fn site() -> Site {
    let store = Arc::new(MemoryStore::new());
    let manager = KeyManager::new(store.clone());
    let admin = manager
        .issue(NewKey::named("operator").scopes(["admin"]))
        .await
        .unwrap();
    let uses = LastUsed::builder(store.clone())
        .flush_every(Duration::from_secs(3600))
        .build();
    let seen = Recorder::default();
    let recorder = seen.clone();
    let api = ManagementApi::new(manager);
    let app = Router::new().merge(api.page("/admin")).merge(
        Router::new()
            .nest("/admin", api.router())
            .route(
                "/v1/whoami",
                get(move |req: axum::extract::Request| async move {
                    recorder.record(&req);
                    req.extensions()
                        .get::<Identity>()
                        .unwrap()
                        .name()
                        .to_owned()
                }),
            )
            .layer(InboundApiKeyLayer::from_shared(store).last_used(&uses))
            .layer(RejectionLayer::new().realm("gateway")),
    );
    let addr = spawn_axum(app).await;
    Site {
        addr,
        admin,
        uses,
        seen,
    }
}

#[tokio::test]
async fn the_page_and_its_assets_carry_the_security_headers_and_embed_no_key() {
    let site = site().await;
    let http = client();
    let redirect = send(&http, get_req(site.addr, "/admin", &[])).await;
    assert_eq!(redirect.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(redirect.headers["location"], "/admin/");

    for (path, kind) in [
        ("/admin/", "text/html"),
        ("/admin/ui/app.js", "text/javascript"),
        ("/admin/ui/app.css", "text/css"),
    ] {
        let answer = send(&http, get_req(site.addr, path, &[])).await;
        assert_eq!(answer.status, StatusCode::OK, "{path}");
        let h = &answer.headers;
        assert!(
            h["content-type"].to_str().unwrap().starts_with(kind),
            "{path}"
        );
        let csp = h["content-security-policy"].to_str().unwrap();
        for directive in [
            "default-src 'self'",
            "script-src 'self'",
            "frame-ancestors 'none'",
            "require-trusted-types-for 'script'",
        ] {
            assert!(csp.contains(directive), "{path}: {csp}");
        }
        assert!(
            !csp.contains("unsafe-inline") && !csp.contains("unsafe-eval"),
            "{csp}"
        );
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert_eq!(h["cache-control"], "no-store", "{path}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        // No key in any page: not the admin key, nor anything in the keys' format.
        let body = answer.text();
        assert!(!body.contains(site.admin.key.expose()), "{path}");
        assert!(!body.contains(&site.admin.key.expose()[..12]), "{path}");
        if kind == "text/html" {
            assert!(!body.contains("<script>"), "no inline script");
            assert!(!body.contains("style="), "no inline style");
        }
    }
    // The API itself is not open to the page's visitors: it still wants a key.
    let list = send(&http, get_req(site.addr, "/admin/keys", &[])).await;
    assert_eq!(list.status, StatusCode::UNAUTHORIZED);
    assert!(
        list.headers["www-authenticate"]
            .to_str()
            .unwrap()
            .contains("realm=\"gateway\"")
    );
}

async fn key_status(site: &Site, key: &str) -> StatusCode {
    let http = client();
    let auth = format!("Bearer {key}");
    send(
        &http,
        get_req(site.addr, "/v1/whoami", &[("authorization", &auth)]),
    )
    .await
    .status
}

#[tokio::test]
async fn in_chromium_an_operator_creates_sees_once_uses_and_revokes_a_key() {
    let Some(browser) = Browser::start().await else {
        return;
    };
    let site = site().await;
    let c = &browser.client;
    c.goto(&format!("http://{}/admin", site.addr))
        .await
        .unwrap();
    browser.find("#admin-key").await;
    assert!(c.current_url().await.unwrap().as_str().ends_with("/admin/"));
    browser.screenshot("admin-ui-sign-in").await;

    // A wrong admin key: the API's own words.
    browser.type_into("#admin-key", "gw_not-a-real-key").await;
    browser.click("#sign-in-form button[type=submit]").await;
    browser.wait_text("#error", "Invalid API key").await;
    browser.screenshot("admin-ui-wrong-key").await;

    // The right one.
    browser
        .type_into("#admin-key", site.admin.key.expose())
        .await;
    browser.click("#sign-in-form button[type=submit]").await;
    browser
        .until("!document.getElementById('manage').hidden")
        .await;
    browser.wait_text("#keys tbody", "operator").await;
    // Kept in sessionStorage only: no cookie, no localStorage, nothing in the URL.
    let kept = c
        .execute(
            "return [sessionStorage.getItem('tga-admin-key'), localStorage.length, document.cookie, location.href];",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(kept[0], site.admin.key.expose());
    assert_eq!(kept[1], 0);
    assert_eq!(kept[2], "");
    assert!(!kept[3].as_str().unwrap().contains(site.admin.key.expose()));

    // Create a key: shown once, with the warning.
    browser.type_into("#create-name", "browser-key").await;
    browser.type_into("#create-scopes", "chat").await;
    browser.type_into("#create-rpm", "120").await;
    browser.click("#create-form button[type=submit]").await;
    browser
        .until("!document.getElementById('new-key').hidden")
        .await;
    let key = browser
        .find("#new-key-value")
        .await
        .prop("value")
        .await
        .unwrap()
        .unwrap();
    assert!(key.len() > 20, "{key}");
    browser
        .wait_text("#new-key", "The full key will not be shown again")
        .await;
    browser.wait_text("#keys tbody", "browser-key").await;
    browser.screenshot("admin-ui-new-key").await;

    // Exactly once: after dismissing, the page holds the hint, never the key.
    browser.click("#dismiss-key").await;
    browser
        .until("document.getElementById('new-key').hidden")
        .await;
    browser.click("#refresh").await;
    let table = browser.wait_text("#keys tbody", "browser-key").await;
    let html = browser.html().await;
    assert!(!html.contains(&key), "the key is still in the page");
    // The hint is the key's first characters (`gw_` and four more).
    let hint = &key[..7];
    assert!(table.contains(hint), "the list shows the hint: {table}");
    assert!(table.contains("120 req / 60 s"), "{table}");

    // The key works on a route, and its use shows as last used.
    assert_eq!(key_status(&site, &key).await, StatusCode::OK);
    assert_eq!(
        site.seen.last().identity.unwrap().name(),
        "browser-key",
        "the route saw the new key's identity"
    );
    site.uses.flush().await.unwrap();
    browser.click("#refresh").await;
    browser.until("[...document.querySelectorAll('#keys tbody tr')].some(r => r.textContent.includes('browser-key') && !r.querySelector('td[data-label=\"Last used\"]').textContent.includes('never'))",
    )
    .await;
    c.execute("window.scrollTo(0, 0);", vec![]).await.unwrap();
    browser.screenshot("admin-ui-list").await;

    // Revoke it in the page, after the confirmation.
    let row = c
        .find(Locator::XPath(
            "//tr[td[contains(., 'browser-key')]]//button[text()='Revoke']",
        ))
        .await
        .unwrap();
    row.click().await.unwrap();
    let question = c.get_alert_text().await.unwrap();
    assert!(question.contains("Revoke"), "{question}");
    c.accept_alert().await.unwrap();
    browser.until("[...document.querySelectorAll('#keys tbody tr')].some(r => r.textContent.includes('browser-key') && r.textContent.includes('revoked'))",
    )
    .await;
    c.execute("window.scrollTo(0, 0);", vec![]).await.unwrap();
    browser.screenshot("admin-ui-revoked").await;
    assert_eq!(key_status(&site, &key).await, StatusCode::UNAUTHORIZED);
    let calls = site.seen.count();
    assert_eq!(key_status(&site, &key).await, StatusCode::UNAUTHORIZED);
    assert_eq!(site.seen.count(), calls, "nothing reached the route");

    browser.close().await;
}
