//! Small HTTP calls the crate makes itself (feature `jwt`): fetching a JWKS or an OIDC
//! discovery document, asking an OAuth2 token endpoint for a token. Bounded in time and in
//! size; errors name the URL's host only, never its query or credentials.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

/// The most of an answer read: key sets and token answers are a few KiB.
const MAX_BODY: usize = 1024 * 1024;

/// A client for `http://` and `https://` URLs (public roots), with a timeout per call.
#[derive(Clone)]
pub(crate) struct Fetcher {
    client: Client<HttpsConnector<HttpConnector>, Full<Bytes>>,
    timeout: Duration,
}

/// An answer: status, headers and the body (at most 1 MiB).
pub(crate) struct Answer {
    pub(crate) status: StatusCode,
    pub(crate) headers: HeaderMap,
    pub(crate) body: Bytes,
}

impl Fetcher {
    pub(crate) fn new(timeout: Duration) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_connect_timeout(Some(timeout));
        let https = crate::https_client::connector_builder(&[]).wrap_connector(http);
        Fetcher {
            client: Client::builder(TokioExecutor::new()).build(https),
            timeout,
        }
    }

    /// `GET url`.
    pub(crate) async fn get(&self, url: &Uri) -> Result<Answer, String> {
        let req = Request::get(url.clone())
            .header(http::header::ACCEPT, "application/json")
            .body(Full::new(Bytes::new()))
            .map_err(|e| e.to_string())?;
        self.send(req, url).await
    }

    /// `POST url` with a form body and extra headers.
    pub(crate) async fn post_form(
        &self,
        url: &Uri,
        form: String,
        headers: &[(http::HeaderName, http::HeaderValue)],
    ) -> Result<Answer, String> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(url.clone())
            .header(http::header::ACCEPT, "application/json")
            .header(
                http::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            );
        for (name, value) in headers {
            req = req.header(name, value);
        }
        let req = req
            .body(Full::new(Bytes::from(form)))
            .map_err(|e| e.to_string())?;
        self.send(req, url).await
    }

    async fn send(&self, req: Request<Full<Bytes>>, url: &Uri) -> Result<Answer, String> {
        let host = url.host().unwrap_or("?").to_owned();
        let call = async {
            let response = self
                .client
                .request(req)
                .await
                .map_err(|e| format!("cannot reach {host}: {}", error_chain(&e)))?;
            let (parts, body) = response.into_parts();
            let body = Limited::new(body, MAX_BODY)
                .collect()
                .await
                .map_err(|_| {
                    format!("{host} sent a body that could not be read in full (at most 1 MiB)")
                })?
                .to_bytes();
            Ok(Answer {
                status: parts.status,
                headers: parts.headers,
                body,
            })
        };
        tokio::time::timeout(self.timeout, call)
            .await
            .map_err(|_| format!("{host} did not answer within {:?}", self.timeout))?
    }
}

/// An error and its sources, on one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

impl std::fmt::Debug for Fetcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fetcher")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The `max-age` of a `Cache-Control` header, if any.
pub(crate) fn max_age(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(http::header::CACHE_CONTROL)?.to_str().ok()?;
    value.split(',').find_map(|part| {
        let (name, secs) = part.trim().split_once('=')?;
        name.eq_ignore_ascii_case("max-age")
            .then(|| secs.trim().parse().ok().map(Duration::from_secs))
            .flatten()
    })
}
