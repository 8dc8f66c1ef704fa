//! The key-management web page (feature `admin-ui`): one HTML page, a script and a style
//! sheet, embedded in the crate and served with a strict security policy.

use axum::Router;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use http::{HeaderValue, header};

const INDEX: &str = include_str!("page/index.html");
const SCRIPT: &str = include_str!("page/app.js");
const STYLE: &str = include_str!("page/app.css");

/// No inline script or style, nothing from elsewhere, no framing, no forms posting away,
/// and DOM sinks closed to strings (the script sets text, never HTML).
const POLICY: &str = "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; \
    connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; \
    frame-ancestors 'none'; require-trusted-types-for 'script'; trusted-types 'none'";

/// The page's routes under `at` (e.g. `/admin`): `{at}/` the page, `{at}/ui/app.js` and
/// `{at}/ui/app.css` its assets, `{at}` a redirect to `{at}/` (the page calls the API by
/// relative paths, so it must be loaded from the API's own prefix).
pub(crate) fn routes(at: &str) -> Router {
    let at = at.trim_end_matches('/');
    let page = format!("{at}/");
    let mut router = Router::new()
        .route(
            &page,
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            &format!("{at}/ui/app.js"),
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            &format!("{at}/ui/app.css"),
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        );
    if !at.is_empty() {
        router = router.route(at, get(move || async move { Redirect::permanent(&page) }));
    }
    router
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut response = body.into_response();
    let headers = response.headers_mut();
    let set = [
        (header::CONTENT_TYPE, content_type),
        (header::CONTENT_SECURITY_POLICY, POLICY),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::CACHE_CONTROL, "no-store"),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::REFERRER_POLICY, "no-referrer"),
    ];
    for (name, value) in set {
        headers.insert(name, HeaderValue::from_static(value));
    }
    headers.insert(
        header::HeaderName::from_static("cross-origin-opener-policy"),
        HeaderValue::from_static("same-origin"),
    );
    response
}
