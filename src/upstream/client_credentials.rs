//! [`ClientCredentials`]: OAuth2 access tokens for an upstream, by the client-credentials
//! grant (RFC 6749 §4.4), for a [`RefreshingToken`](super::RefreshingToken) (feature `jwt`).

use std::fmt;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Uri};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use super::refresh::{FetchError, Token, TokenFetcher};
use crate::http_fetch::Fetcher;

/// How the client authenticates to the token endpoint (RFC 6749 §2.3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ClientAuth {
    /// `Authorization: Basic` with the form-encoded id and secret (the default, which
    /// every server must support).
    #[default]
    Basic,
    /// `client_id` and `client_secret` in the request body.
    Body,
}

/// Fetches tokens from an OAuth2 token endpoint with the client-credentials grant: Azure
/// Entra ID (scope `https://cognitiveservices.azure.com/.default`), Okta, Auth0 (with an
/// `audience`), Keycloak and most enterprise identity providers. Put it in a
/// [`RefreshingToken`](super::RefreshingToken), which makes one fetch at a time, refreshes
/// ahead of expiry and answers 503 while no token can be had.
///
/// The secret appears in no log line, error or `Debug` output; errors name the endpoint's
/// host, its status and the OAuth2 `error` code it sent.
///
/// ```no_run
/// use tower_gateway_auth::UpstreamAuthLayer;
/// use tower_gateway_auth::upstream::{ClientAuth, ClientCredentials, Provider, RefreshingToken};
///
/// let fetcher = ClientCredentials::builder(
///     "https://login.microsoftonline.com/TENANT/oauth2/v2.0/token",
///     "client-id",
///     std::env::var("AZURE_CLIENT_SECRET").unwrap(),
/// )
/// .scope("https://cognitiveservices.azure.com/.default")
/// .auth(ClientAuth::Body)
/// .build()
/// .unwrap();
/// let layer = UpstreamAuthLayer::new(Provider::openai(), RefreshingToken::new(fetcher));
/// ```
pub struct ClientCredentials {
    token_url: Uri,
    client_id: String,
    client_secret: String,
    scope: Option<String>,
    audience: Option<String>,
    auth: ClientAuth,
    default_lifetime: Duration,
    fetcher: Fetcher,
}

/// Options for [`ClientCredentials`], from [`ClientCredentials::builder`].
pub struct ClientCredentialsBuilder {
    token_url: String,
    client_id: String,
    client_secret: String,
    scope: Option<String>,
    audience: Option<String>,
    auth: ClientAuth,
    default_lifetime: Duration,
    timeout: Duration,
}

impl ClientCredentials {
    /// How the client authenticates.
    pub fn auth_kind(&self) -> ClientAuth {
        self.auth
    }

    /// A fetcher for `token_url` as client `client_id` with `client_secret`: Basic
    /// authentication, no scope, a 5-minute lifetime for answers without `expires_in`.
    pub fn builder(
        token_url: impl Into<String>,
        client_id: impl Into<String>,
        client_secret: impl Into<String>,
    ) -> ClientCredentialsBuilder {
        ClientCredentialsBuilder {
            token_url: token_url.into(),
            client_id: client_id.into(),
            client_secret: client_secret.into(),
            scope: None,
            audience: None,
            auth: ClientAuth::Basic,
            default_lifetime: Duration::from_secs(300),
            timeout: Duration::from_secs(10),
        }
    }
}

impl ClientCredentialsBuilder {
    /// The `scope` asked for (space-separated when several).
    pub fn scope(mut self, scope: impl Into<String>) -> Self {
        self.scope = Some(scope.into());
        self
    }

    /// The `audience` asked for (Auth0 and others that name the API this way).
    pub fn audience(mut self, audience: impl Into<String>) -> Self {
        self.audience = Some(audience.into());
        self
    }

    /// How the client authenticates (default: Basic).
    pub fn auth(mut self, auth: ClientAuth) -> Self {
        self.auth = auth;
        self
    }

    /// The lifetime assumed for answers without `expires_in` (default 5 minutes).
    pub fn default_lifetime(mut self, lifetime: Duration) -> Self {
        self.default_lifetime = lifetime;
        self
    }

    /// How long one call to the endpoint may take (default 10 s).
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// The fetcher; fails when the token URL is not an absolute `http(s)` URL or the id or
    /// secret is empty.
    pub fn build(self) -> Result<ClientCredentials, FetchError> {
        let token_url: Uri = self
            .token_url
            .parse()
            .map_err(|_| FetchError::new("the token URL is not a URL"))?;
        if !matches!(token_url.scheme_str(), Some("http" | "https")) || token_url.host().is_none() {
            return Err(FetchError::new(
                "the token URL is not an absolute http(s) URL",
            ));
        }
        if self.client_id.is_empty() || self.client_secret.is_empty() {
            return Err(FetchError::new(
                "the client id and secret must not be empty",
            ));
        }
        Ok(ClientCredentials {
            token_url,
            client_id: self.client_id,
            client_secret: self.client_secret,
            scope: self.scope,
            audience: self.audience,
            auth: self.auth,
            default_lifetime: self.default_lifetime,
            fetcher: Fetcher::new(self.timeout),
        })
    }
}

/// What `application/x-www-form-urlencoded` leaves as it is (the WHATWG set).
const FORM: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'*')
    .remove(b'-')
    .remove(b'.')
    .remove(b'_');

fn form(value: &str) -> String {
    utf8_percent_encode(value, FORM).to_string()
}

impl TokenFetcher for ClientCredentials {
    async fn fetch(&self) -> Result<Token, FetchError> {
        let mut body = String::from("grant_type=client_credentials");
        for (name, value) in [("scope", &self.scope), ("audience", &self.audience)] {
            if let Some(value) = value {
                body.push_str(&format!("&{name}={}", form(value)));
            }
        }
        let mut headers: Vec<(HeaderName, HeaderValue)> = Vec::new();
        match self.auth {
            ClientAuth::Body => body.push_str(&format!(
                "&client_id={}&client_secret={}",
                form(&self.client_id),
                form(&self.client_secret)
            )),
            ClientAuth::Basic => {
                let pair = format!("{}:{}", form(&self.client_id), form(&self.client_secret));
                let mut value = HeaderValue::try_from(format!("Basic {}", base64(pair.as_bytes())))
                    .map_err(|_| FetchError::new("the client credentials make no header"))?;
                value.set_sensitive(true);
                headers.push((http::header::AUTHORIZATION, value));
            }
        }
        let answer = self
            .fetcher
            .post_form(&self.token_url, body, &headers)
            .await
            .map_err(FetchError::new)?;
        if !answer.status.is_success() {
            // RFC 6749 §5.2: `error` is a code from a fixed set; the description is left
            // out, as servers may quote the request in it.
            let code = serde_json::from_slice::<serde_json::Value>(&answer.body)
                .ok()
                .and_then(|v| v.get("error")?.as_str().map(str::to_owned))
                .filter(|c| c.len() <= 64 && c.bytes().all(|b| b.is_ascii_graphic()));
            let host = self.token_url.host().unwrap_or("?");
            return Err(FetchError::new(match code {
                Some(code) => format!(
                    "the token endpoint {host} answered {}: {code}",
                    answer.status
                ),
                None => format!("the token endpoint {host} answered {}", answer.status),
            }));
        }
        Token::from_oauth2_json(&answer.body, self.default_lifetime)
    }
}

/// Standard base64 with padding (RFC 4648 §4), for `Basic`.
fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// The secret is left out.
impl fmt::Debug for ClientCredentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentials")
            .field("token_url", &self.token_url.host())
            .field("client_id", &self.client_id)
            .field("scope", &self.scope)
            .field("audience", &self.audience)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

/// The secret is left out.
impl fmt::Debug for ClientCredentialsBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientCredentialsBuilder")
            .field("client_id", &self.client_id)
            .field("auth", &self.auth)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_as_rfc_4648_writes_it() {
        for (input, expected) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), expected);
        }
    }

    #[test]
    fn form_encoding_escapes_what_a_form_must() {
        assert_eq!(form("a b&c=d/é"), "a%20b%26c%3Dd%2F%C3%A9");
        assert_eq!(
            form("https://x.example/.default"),
            "https%3A%2F%2Fx.example%2F.default"
        );
    }
}
