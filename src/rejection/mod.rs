//! Why a request was turned away, and how that is told to the client: status,
//! `WWW-Authenticate` (RFC 6750) and a body in the client's dialect, or a gRPC status.
//!
//! Every refusal of every layer is a [`Rejection`]: a value saying why (its
//! [`RejectionKind`], which fixes the status), a message, the scopes a 403 wanted and a
//! `Retry-After` where it applies. A layer that refuses renders it in the default dialect
//! (OpenAI, realm `api`) and puts the rejection itself into the response's extensions. One
//! [`RejectionLayer`] outside the stack is where a route sets its dialect and realm: it
//! renders every rejection that comes out of the layers inside it again, once, in those.
//! Tracing, metrics and outer layers read why from the extensions, never from the body.

mod layer;

pub use layer::{RejectionLayer, RejectionResponse, Rejections};

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderMap, HeaderValue, Response, StatusCode};
use percent_encoding::{AsciiSet, CONTROLS, utf8_percent_encode};
use serde_json::json;

/// What went wrong, in a form a program can match on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum RejectionKind {
    /// No key was presented.
    MissingKey,
    /// A credential was presented but is not well formed.
    MalformedKey,
    /// Several different keys were presented.
    AmbiguousKey,
    /// The presented key is longer than the configured bound.
    KeyTooLong,
    /// The key is unknown, or fails its checksum.
    InvalidKey,
    /// The key has expired.
    ExpiredKey,
    /// The key's not-before time has not come yet.
    KeyNotYetValid,
    /// The key was revoked.
    RevokedKey,
    /// The key is disabled.
    DisabledKey,
    /// The key lacks a scope the route requires.
    InsufficientScope,
    /// The key store failed or timed out.
    StoreUnavailable,
    /// No upstream credential is configured for this caller.
    NoUpstreamCredential,
    /// The upstream credential could not be obtained (e.g. the token endpoint is down).
    UpstreamCredentialUnavailable,
    /// The path holds `.` or `..` segments (raw or percent-encoded): 400.
    InvalidPath,
    /// The upstream could not be reached or failed to answer: 502.
    UpstreamUnreachable,
    /// The upstream did not answer in time: 504.
    UpstreamTimeout,
    /// No route or resource here (404).
    NotFound,
    /// The management API knows no key with this id (404).
    KeyNotFound,
    /// The request body is not the JSON asked for (400).
    InvalidJson,
    /// The request asks for something that cannot be done (400).
    InvalidRequest,
    /// The caller may not do this, whatever its scopes (403), e.g. an ephemeral key managing keys.
    Forbidden,
    /// The record changed concurrently too many times; try again (409).
    Conflict,
    /// The key has as many live ephemeral keys as it may (429).
    TooManyEphemeralKeys,
    /// The request body stopped arriving (408).
    RequestBodyTimeout,
    /// The key's request rate is used up for now (429, `rate_limit_exceeded`, with
    /// `Retry-After`); see [`RateLimitLayer`](crate::RateLimitLayer).
    RateLimited,
    /// The key has as many requests in flight as it may (429,
    /// `concurrency_limit_exceeded`); see [`RateLimitLayer`](crate::RateLimitLayer).
    ConcurrencyLimited,
    /// The key may not use the model the request names (403, `model_not_allowed`); see
    /// [`ModelAccessLayer`](crate::limit::ModelAccessLayer).
    ModelNotAllowed,
    /// The rate limiter's backend failed, so no decision could be made (503,
    /// `limiter_unavailable`): fails closed, as the key store does.
    LimiterUnavailable,
    /// The key's token rate is used up for now (429, `rate_limit_exceeded` of type
    /// `tokens`, with `Retry-After`).
    TokensLimited,
    /// The key's token budget for the period is spent (429, OpenAI's `insufficient_quota`,
    /// with `Retry-After` until the period ends when it does).
    BudgetExhausted,
    /// The request body is larger than the gateway reads (413, `request_too_large`).
    RequestTooLarge,
    /// A user token (JWT) that does not verify: expired, not yet valid, wrong issuer or
    /// audience, bad signature, unknown key, malformed (401, `invalid_token`).
    InvalidToken,
    /// A user token longer than the gateway reads (400, `token_too_long`).
    TokenTooLong,
}

impl RejectionKind {
    /// The HTTP status for this kind.
    pub fn status(self) -> StatusCode {
        use RejectionKind::*;
        match self {
            MalformedKey | AmbiguousKey | KeyTooLong | InvalidPath | InvalidJson
            | InvalidRequest | TokenTooLong => StatusCode::BAD_REQUEST,
            RequestTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            InsufficientScope | Forbidden | ModelNotAllowed => StatusCode::FORBIDDEN,
            StoreUnavailable | UpstreamCredentialUnavailable | LimiterUnavailable => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            MissingKey | InvalidKey | ExpiredKey | KeyNotYetValid | RevokedKey | DisabledKey
            | NoUpstreamCredential | InvalidToken => StatusCode::UNAUTHORIZED,
            UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            NotFound | KeyNotFound => StatusCode::NOT_FOUND,
            Conflict => StatusCode::CONFLICT,
            TooManyEphemeralKeys | RateLimited | ConcurrencyLimited | TokensLimited
            | BudgetExhausted => StatusCode::TOO_MANY_REQUESTS,
            RequestBodyTimeout => StatusCode::REQUEST_TIMEOUT,
        }
    }

    /// A stable machine-readable code, e.g. `invalid_api_key`.
    pub fn code(self) -> &'static str {
        use RejectionKind::*;
        match self {
            MissingKey => "missing_api_key",
            MalformedKey => "malformed_api_key",
            AmbiguousKey => "ambiguous_api_key",
            KeyTooLong => "api_key_too_long",
            InvalidKey => "invalid_api_key",
            ExpiredKey => "expired_api_key",
            KeyNotYetValid => "api_key_not_yet_valid",
            RevokedKey => "revoked_api_key",
            DisabledKey => "disabled_api_key",
            InsufficientScope => "insufficient_scope",
            StoreUnavailable => "auth_unavailable",
            NoUpstreamCredential => "no_upstream_credential",
            UpstreamCredentialUnavailable => "upstream_credential_unavailable",
            InvalidPath => "invalid_path",
            UpstreamUnreachable => "upstream_unreachable",
            UpstreamTimeout => "upstream_timeout",
            NotFound => "not_found",
            KeyNotFound => "key_not_found",
            InvalidJson => "invalid_json",
            InvalidRequest => "invalid_request",
            Forbidden => "forbidden",
            Conflict => "conflict",
            TooManyEphemeralKeys => "too_many_ephemeral_keys",
            RequestBodyTimeout => "request_body_timeout",
            RateLimited => "rate_limit_exceeded",
            ConcurrencyLimited => "concurrency_limit_exceeded",
            ModelNotAllowed => "model_not_allowed",
            LimiterUnavailable => "limiter_unavailable",
            TokensLimited => "rate_limit_exceeded",
            BudgetExhausted => "insufficient_quota",
            RequestTooLarge => "request_too_large",
            InvalidToken => "invalid_token",
            TokenTooLong => "token_too_long",
        }
    }

    /// The coarse outcome that metrics and the access log name this refusal by, e.g.
    /// `missing`, `invalid`, `revoked`, `forbidden`, `store_unavailable`; an accepted
    /// request is `allowed`. Several kinds share one outcome (a malformed, ambiguous or
    /// oversized credential are all `malformed`), so that a dashboard has few series;
    /// [`code`](Self::code) tells them apart.
    ///
    /// | outcome | kinds |
    /// |---|---|
    /// | `missing` | `MissingKey` |
    /// | `malformed` | `MalformedKey`, `AmbiguousKey`, `KeyTooLong`, `TokenTooLong` |
    /// | `invalid` | `InvalidKey`, `InvalidToken` |
    /// | `expired` | `ExpiredKey` |
    /// | `not_yet_valid` | `KeyNotYetValid` |
    /// | `revoked` | `RevokedKey` |
    /// | `disabled` | `DisabledKey` |
    /// | `forbidden` | `InsufficientScope`, `Forbidden`, `ModelNotAllowed` |
    /// | `rate_limited` | `RateLimited`, `ConcurrencyLimited`, `TokensLimited`, `TooManyEphemeralKeys` |
    /// | `budget_exhausted` | `BudgetExhausted` |
    /// | `store_unavailable` | `StoreUnavailable`, `LimiterUnavailable` |
    /// | `upstream_credential` | `NoUpstreamCredential`, `UpstreamCredentialUnavailable` |
    /// | `upstream_error` | `UpstreamUnreachable` |
    /// | `upstream_timeout` | `UpstreamTimeout` |
    /// | `bad_request` | `InvalidPath`, `InvalidJson`, `InvalidRequest`, `RequestTooLarge` |
    /// | `not_found` | `NotFound`, `KeyNotFound` |
    /// | `conflict` | `Conflict` |
    /// | `request_timeout` | `RequestBodyTimeout` |
    ///
    /// ```
    /// use tower_gateway_auth::rejection::RejectionKind;
    ///
    /// assert_eq!(RejectionKind::InsufficientScope.outcome(), "forbidden");
    /// assert_eq!(RejectionKind::KeyTooLong.outcome(), "malformed");
    /// ```
    pub fn outcome(self) -> &'static str {
        use RejectionKind::*;
        match self {
            MissingKey => "missing",
            MalformedKey | AmbiguousKey | KeyTooLong | TokenTooLong => "malformed",
            InvalidKey | InvalidToken => "invalid",
            ExpiredKey => "expired",
            KeyNotYetValid => "not_yet_valid",
            RevokedKey => "revoked",
            DisabledKey => "disabled",
            InsufficientScope | Forbidden | ModelNotAllowed => "forbidden",
            RateLimited | ConcurrencyLimited | TokensLimited | TooManyEphemeralKeys => {
                "rate_limited"
            }
            BudgetExhausted => "budget_exhausted",
            StoreUnavailable | LimiterUnavailable => "store_unavailable",
            NoUpstreamCredential | UpstreamCredentialUnavailable => "upstream_credential",
            UpstreamUnreachable => "upstream_error",
            UpstreamTimeout => "upstream_timeout",
            InvalidPath | InvalidJson | InvalidRequest | RequestTooLarge => "bad_request",
            NotFound | KeyNotFound => "not_found",
            Conflict => "conflict",
            RequestBodyTimeout => "request_timeout",
        }
    }

    /// The RFC 6750 challenge for `WWW-Authenticate`: `None` for refusals that are not
    /// about the credential, `Some(None)` for a challenge without an `error` attribute.
    fn challenge(self) -> Option<Option<&'static str>> {
        use RejectionKind::*;
        match self {
            MissingKey => Some(None),
            MalformedKey | AmbiguousKey | KeyTooLong | TokenTooLong => {
                Some(Some("invalid_request"))
            }
            InsufficientScope => Some(Some("insufficient_scope")),
            InvalidKey | ExpiredKey | KeyNotYetValid | RevokedKey | DisabledKey
            | NoUpstreamCredential | InvalidToken => Some(Some("invalid_token")),
            StoreUnavailable
            | UpstreamCredentialUnavailable
            | InvalidPath
            | UpstreamUnreachable
            | UpstreamTimeout
            | NotFound
            | KeyNotFound
            | InvalidJson
            | InvalidRequest
            | Forbidden
            | Conflict
            | TooManyEphemeralKeys
            | RequestBodyTimeout
            | RateLimited
            | ConcurrencyLimited
            | ModelNotAllowed
            | LimiterUnavailable
            | TokensLimited
            | BudgetExhausted
            | RequestTooLarge => None,
        }
    }

    /// The `error.type` of an OpenAI-dialect body: OpenAI names the exhausted quota
    /// (`requests`) for its own rate limits, and writes one type per status class otherwise.
    fn openai_type(self) -> &'static str {
        match self {
            RejectionKind::RateLimited | RejectionKind::ConcurrencyLimited => "requests",
            RejectionKind::TokensLimited => "tokens",
            RejectionKind::BudgetExhausted => "insufficient_quota",
            _ if self.status().is_server_error() => "server_error",
            _ => "invalid_request_error",
        }
    }

    /// The gRPC status code for this kind.
    fn grpc_status(self) -> &'static str {
        match self.status() {
            StatusCode::BAD_REQUEST => "3",       // INVALID_ARGUMENT
            StatusCode::NOT_FOUND => "5",         // NOT_FOUND
            StatusCode::FORBIDDEN => "7",         // PERMISSION_DENIED
            StatusCode::TOO_MANY_REQUESTS => "8", // RESOURCE_EXHAUSTED
            StatusCode::CONFLICT => "10",         // ABORTED
            StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => "4", // DEADLINE_EXCEEDED
            StatusCode::SERVICE_UNAVAILABLE | StatusCode::BAD_GATEWAY => "14", // UNAVAILABLE
            _ => "16",                            // UNAUTHENTICATED
        }
    }
}

impl From<crate::keys::KeyUnusable> for RejectionKind {
    fn from(why: crate::keys::KeyUnusable) -> Self {
        use crate::keys::KeyUnusable;
        match why {
            KeyUnusable::Revoked => RejectionKind::RevokedKey,
            KeyUnusable::Disabled => RejectionKind::DisabledKey,
            KeyUnusable::Expired => RejectionKind::ExpiredKey,
            KeyUnusable::NotYetValid => RejectionKind::KeyNotYetValid,
        }
    }
}

/// A request turned away: its kind and a message for the client.
///
/// Messages never contain the key, its digest or any upstream credential.
#[derive(Clone, PartialEq, Eq)]
pub struct Rejection {
    kind: RejectionKind,
    message: Cow<'static, str>,
    scopes: Option<Arc<str>>,
    retry_after: Option<u64>,
    describe: bool,
}

impl Rejection {
    /// A rejection of `kind` with `message` for the client.
    pub fn new(kind: RejectionKind, message: impl Into<Cow<'static, str>>) -> Self {
        Rejection {
            kind,
            message: message.into(),
            scopes: None,
            retry_after: None,
            describe: false,
        }
    }

    /// Also puts the message into `WWW-Authenticate` as RFC 6750's `error_description`
    /// (characters it does not allow dropped): for refusals of a token whose reason helps
    /// the client and tells an attacker nothing the token's own claims do not.
    pub fn with_description(mut self) -> Self {
        self.describe = true;
        self
    }

    /// Tells the client to try again after `wait` (`Retry-After`, whole seconds, at least 1).
    pub fn with_retry_after(mut self, wait: std::time::Duration) -> Self {
        self.retry_after = Some(wait.as_secs().max(1));
        self
    }

    /// How long the client is told to wait, if at all.
    pub fn retry_after(&self) -> Option<std::time::Duration> {
        self.retry_after.map(std::time::Duration::from_secs)
    }

    /// The response in the default dialect (OpenAI, realm `api`), or a gRPC status for a
    /// gRPC request, carrying this rejection in its extensions. A [`RejectionLayer`]
    /// outside renders it again in its own dialect and realm.
    pub fn to_response(&self, request_headers: &HeaderMap) -> Response<Bytes> {
        ErrorFormat::OpenAi.respond(self, &Realm::default(), request_headers)
    }

    /// A 403 for a key lacking some of `required` (space-separated in `WWW-Authenticate`).
    pub fn insufficient_scope<'a>(required: impl IntoIterator<Item = &'a str>) -> Self {
        let scopes = required.into_iter().collect::<Vec<_>>().join(" ");
        Rejection {
            kind: RejectionKind::InsufficientScope,
            message: format!("This API key lacks the scope this endpoint requires: {scopes}.")
                .into(),
            scopes: Some(scopes.into()),
            retry_after: None,
            describe: false,
        }
    }

    /// What went wrong.
    pub fn kind(&self) -> RejectionKind {
        self.kind
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        self.kind.status()
    }

    /// The machine-readable code.
    pub fn code(&self) -> &'static str {
        self.kind.code()
    }

    /// The message for the client.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// The `WWW-Authenticate` value RFC 6750 asks for, or `None` for refusals that are not
    /// about the credential (503, 404, 502 …).
    pub fn www_authenticate(&self, realm: &Realm) -> Option<HeaderValue> {
        let error = self.kind.challenge()?;
        let mut value = format!("Bearer realm=\"{}\"", realm.0);
        if let Some(error) = error {
            value.push_str(", error=\"");
            value.push_str(error);
            value.push('"');
        }
        if let Some(scopes) = &self.scopes {
            value.push_str(", scope=\"");
            value.push_str(scopes);
            value.push('"');
        }
        if self.describe {
            // RFC 6750 §3: %x20-21 / %x23-5B / %x5D-7E, so no quote and no backslash.
            value.push_str(", error_description=\"");
            value.extend(
                self.message
                    .chars()
                    .filter(|c| matches!(c, ' '..='~') && *c != '"' && *c != '\\'),
            );
            value.push('"');
        }
        HeaderValue::try_from(value).ok()
    }
}

impl fmt::Debug for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rejection")
            .field("kind", &self.kind)
            .field("message", &self.message)
            .finish()
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Rejection {}

#[cfg(feature = "axum")]
impl axum::response::IntoResponse for Rejection {
    /// The default rendering (see [`Rejection::to_response`]); a [`RejectionLayer`] around
    /// the router renders it in the route's dialect and realm.
    fn into_response(self) -> axum::response::Response {
        self.to_response(&HeaderMap::new())
            .map(axum::body::Body::from)
    }
}

/// The realm named in `WWW-Authenticate`, checked to be a safe quoted-string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Realm(Arc<str>);

impl Realm {
    /// `realm`, with characters that cannot stand in a quoted-string dropped.
    pub fn new(realm: &str) -> Self {
        let clean: String = realm
            .chars()
            .filter(|c| c.is_ascii() && !c.is_ascii_control() && *c != '"' && *c != '\\')
            .collect();
        Realm(clean.into())
    }
}

impl Default for Realm {
    fn default() -> Self {
        Realm("api".into())
    }
}

type CustomFn = dyn Fn(&Rejection) -> Response<Bytes> + Send + Sync;

/// The dialect rejection bodies are written in.
///
/// Whatever the dialect, a gRPC request (`content-type: application/grpc…`) gets a
/// trailers-only gRPC status instead, so tonic clients see a proper `Status`.
///
/// ```
/// use tower_gateway_auth::rejection::ErrorFormat;
///
/// let format: ErrorFormat = "anthropic".parse().unwrap();
/// assert!(matches!(format, ErrorFormat::Anthropic));
/// assert!("xml".parse::<ErrorFormat>().is_err());
/// ```
#[derive(Clone, Default)]
#[non_exhaustive]
pub enum ErrorFormat {
    /// `{"error":{"message","type","param","code"}}`, as OpenAI's API answers.
    #[default]
    OpenAi,
    /// `{"type":"error","error":{"type","message"}}`, as Anthropic's API answers.
    Anthropic,
    /// `{"code":-1,"msg":"…"}`.
    CodeMsg,
    /// RFC 9457 `application/problem+json`.
    Problem,
    /// A response of your own making. `WWW-Authenticate` is added when it lacks one.
    Custom(Arc<CustomFn>),
}

impl ErrorFormat {
    /// A dialect of your own: `respond` writes the whole response.
    pub fn custom(respond: impl Fn(&Rejection) -> Response<Bytes> + Send + Sync + 'static) -> Self {
        ErrorFormat::Custom(Arc::new(respond))
    }

    /// The response for `rejection` to a request with `request_headers`.
    pub fn respond(
        &self,
        rejection: &Rejection,
        realm: &Realm,
        request_headers: &HeaderMap,
    ) -> Response<Bytes> {
        let mut response = if is_grpc(request_headers) {
            grpc_response(rejection)
        } else {
            let mut response = match self {
                ErrorFormat::Custom(respond) => respond(rejection),
                _ => self.json_response(rejection),
            };
            if let Some(challenge) = rejection.www_authenticate(realm) {
                response
                    .headers_mut()
                    .entry(WWW_AUTHENTICATE)
                    .or_insert(challenge);
            }
            response
        };
        if let Some(secs) = rejection.retry_after {
            response
                .headers_mut()
                .insert(http::header::RETRY_AFTER, HeaderValue::from(secs));
        }
        response.extensions_mut().insert(rejection.clone());
        response
    }

    fn json_response(&self, rejection: &Rejection) -> Response<Bytes> {
        // OpenAI leaves `code` null when no key was sent at all.
        let openai_missing =
            matches!(self, ErrorFormat::OpenAi) && rejection.kind() == RejectionKind::MissingKey;
        let code = (!openai_missing).then(|| rejection.code());
        if let ErrorFormat::OpenAi = self {
            let body = json!({"error": {
                "message": rejection.message(),
                "type": rejection.kind().openai_type(),
                "param": null,
                "code": code,
            }});
            return Response::builder()
                .status(rejection.status())
                .header(CONTENT_TYPE, HeaderValue::from_static("application/json"))
                .body(Bytes::from(body.to_string()))
                .expect("static status and headers are valid");
        }
        self.error_response(rejection.status(), code, rejection.message())
    }

    /// An error response of any status in this dialect, for errors that are not
    /// [`Rejection`]s (e.g. the management API's 404s). [`ErrorFormat::Custom`] answers in
    /// problem+json here.
    pub fn error_response(
        &self,
        status: StatusCode,
        code: Option<&str>,
        message: &str,
    ) -> Response<Bytes> {
        let (content_type, body) = match self {
            ErrorFormat::OpenAi => {
                let kind = if status.is_server_error() {
                    "server_error"
                } else {
                    "invalid_request_error"
                };
                let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
                ("application/json", body)
            }
            ErrorFormat::Anthropic => {
                let kind = match status {
                    StatusCode::UNAUTHORIZED => "authentication_error",
                    StatusCode::FORBIDDEN => "permission_error",
                    StatusCode::NOT_FOUND => "not_found_error",
                    StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
                    s if s.is_client_error() => "invalid_request_error",
                    _ => "api_error",
                };
                let body = json!({"type": "error", "error": {"type": kind, "message": message}});
                ("application/json", body)
            }
            ErrorFormat::CodeMsg => ("application/json", json!({"code": -1, "msg": message})),
            ErrorFormat::Problem | ErrorFormat::Custom(_) => {
                let body = json!({
                    "type": "about:blank",
                    "title": status.canonical_reason().unwrap_or("Error"),
                    "status": status.as_u16(),
                    "detail": message,
                    "code": code,
                });
                ("application/problem+json", body)
            }
        };
        Response::builder()
            .status(status)
            .header(CONTENT_TYPE, HeaderValue::from_static(content_type))
            .body(Bytes::from(body.to_string()))
            .expect("static status and headers are valid")
    }
}

impl fmt::Debug for ErrorFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ErrorFormat::OpenAi => "OpenAi",
            ErrorFormat::Anthropic => "Anthropic",
            ErrorFormat::CodeMsg => "CodeMsg",
            ErrorFormat::Problem => "Problem",
            ErrorFormat::Custom(_) => "Custom(..)",
        })
    }
}

/// The error when a string names no [`ErrorFormat`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownErrorFormat(String);

impl fmt::Display for UnknownErrorFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "unknown error format `{}`: expected openai, anthropic, json or problem",
            self.0
        )
    }
}

impl std::error::Error for UnknownErrorFormat {}

impl FromStr for ErrorFormat {
    type Err = UnknownErrorFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "openai" => Ok(ErrorFormat::OpenAi),
            "anthropic" => Ok(ErrorFormat::Anthropic),
            "json" => Ok(ErrorFormat::CodeMsg),
            "problem" => Ok(ErrorFormat::Problem),
            other => Err(UnknownErrorFormat(other.to_owned())),
        }
    }
}

/// Whether the request speaks gRPC (`content-type: application/grpc`, `+proto`, `+json` …).
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers.get(CONTENT_TYPE).is_some_and(|ct| {
        let ct = ct.as_bytes();
        ct.len() >= 16 && ct[..16].eq_ignore_ascii_case(b"application/grpc")
    })
}

/// gRPC's percent-encoding of `grpc-message`: everything outside printable ASCII, and `%`.
const GRPC_MESSAGE: &AsciiSet = &CONTROLS.add(b'%');

/// A trailers-only gRPC response: HTTP 200, the status in the headers, no body.
fn grpc_response(rejection: &Rejection) -> Response<Bytes> {
    let message = utf8_percent_encode(rejection.message(), GRPC_MESSAGE).to_string();
    Response::builder()
        .status(StatusCode::OK)
        .header(CONTENT_TYPE, HeaderValue::from_static("application/grpc"))
        .header(
            "grpc-status",
            HeaderValue::from_static(rejection.kind.grpc_status()),
        )
        .header(
            "grpc-message",
            HeaderValue::try_from(message).unwrap_or_else(|_| HeaderValue::from_static("")),
        )
        .body(Bytes::new())
        .expect("static status and headers are valid")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(r: &Response<Bytes>) -> serde_json::Value {
        serde_json::from_slice(r.body()).unwrap()
    }

    #[test]
    fn www_authenticate_follows_rfc_6750() {
        let realm = Realm::new("gate\"way");
        let missing = Rejection::new(RejectionKind::MissingKey, "m");
        assert_eq!(
            missing.www_authenticate(&realm).unwrap(),
            "Bearer realm=\"gateway\""
        );
        let invalid = Rejection::new(RejectionKind::InvalidKey, "m");
        assert_eq!(
            invalid.www_authenticate(&realm).unwrap(),
            "Bearer realm=\"gateway\", error=\"invalid_token\""
        );
        let scope = Rejection::insufficient_scope(["a", "b"]);
        assert_eq!(
            scope.www_authenticate(&realm).unwrap(),
            "Bearer realm=\"gateway\", error=\"insufficient_scope\", scope=\"a b\""
        );
        let down = Rejection::new(RejectionKind::StoreUnavailable, "m");
        assert!(down.www_authenticate(&realm).is_none());
    }

    #[test]
    fn dialects() {
        let r = Rejection::new(RejectionKind::InvalidKey, "Invalid API key.");
        let h = HeaderMap::new();
        let realm = Realm::default();
        let openai = ErrorFormat::OpenAi.respond(&r, &realm, &h);
        assert_eq!(openai.status(), 401);
        assert_eq!(
            body(&openai),
            json!({"error":{"message":"Invalid API key.","type":"invalid_request_error","param":null,"code":"invalid_api_key"}})
        );
        let anthropic = ErrorFormat::Anthropic.respond(&r, &realm, &h);
        assert_eq!(
            body(&anthropic),
            json!({"type":"error","error":{"type":"authentication_error","message":"Invalid API key."}})
        );
        let code = ErrorFormat::CodeMsg.respond(&r, &realm, &h);
        assert_eq!(body(&code), json!({"code":-1,"msg":"Invalid API key."}));
        let problem = ErrorFormat::Problem.respond(&r, &realm, &h);
        assert_eq!(problem.headers()[CONTENT_TYPE], "application/problem+json");
        assert_eq!(body(&problem)["status"], 401);
        assert_eq!(body(&problem)["title"], "Unauthorized");
        let forbidden = Rejection::insufficient_scope(["admin"]);
        let anthropic = ErrorFormat::Anthropic.respond(&forbidden, &realm, &h);
        assert_eq!(anthropic.status(), 403);
        assert_eq!(body(&anthropic)["error"]["type"], "permission_error");
    }

    #[test]
    fn custom_gets_www_authenticate_added() {
        let f = ErrorFormat::custom(|r| {
            Response::builder()
                .status(r.status())
                .body(Bytes::from_static(b"nope"))
                .unwrap()
        });
        let r = Rejection::new(RejectionKind::MissingKey, "m");
        let resp = f.respond(&r, &Realm::default(), &HeaderMap::new());
        assert_eq!(resp.body(), "nope");
        assert_eq!(resp.headers()[WWW_AUTHENTICATE], "Bearer realm=\"api\"");
    }

    #[test]
    fn grpc_is_trailers_only() {
        let mut h = HeaderMap::new();
        h.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        let r = Rejection::new(RejectionKind::StoreUnavailable, "down 100%\n");
        let resp = ErrorFormat::OpenAi.respond(&r, &Realm::default(), &h);
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.headers()["grpc-status"], "14");
        assert_eq!(resp.headers()["grpc-message"], "down 100%25%0A");
        assert!(resp.body().is_empty());
    }
}
