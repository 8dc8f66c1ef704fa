//! The verified caller, as handed to the inner service in the request extensions.

use std::fmt;
use std::sync::Arc;

use crate::clock::Timestamp;
use crate::keys::{KeyId, KeyRecord, Metadata, Scopes};

/// Who a verified key belongs to: its id, name, scopes and metadata. Never the key or its
/// digest.
///
/// [`InboundApiKeyLayer`](crate::InboundApiKeyLayer) puts one into the request extensions
/// when a key is accepted. With the `axum` feature it is also an extractor: `Identity` for
/// handlers behind the layer, `Option<Identity>` where anonymous requests are let through.
///
/// ```
/// # use tower_gateway_auth::Identity;
/// fn handler(req: http::Request<()>) -> String {
///     match req.extensions().get::<Identity>() {
///         Some(who) => format!("hello {} ({})", who.name(), who.id()),
///         None => "hello stranger".to_owned(),
///     }
/// }
/// # assert_eq!(handler(http::Request::new(())), "hello stranger");
/// ```
#[derive(Clone)]
pub struct Identity(Arc<KeyRecord>);

impl Identity {
    /// The identity of the key in `record`.
    pub fn new(record: Arc<KeyRecord>) -> Self {
        Identity(record)
    }

    /// The key's public id.
    pub fn id(&self) -> KeyId {
        self.0.id()
    }

    /// The key's name.
    pub fn name(&self) -> &str {
        self.0.name()
    }

    /// The key's scopes.
    pub fn scopes(&self) -> &Scopes {
        self.0.scopes()
    }

    /// Whether the key has `scope`.
    pub fn has_scope(&self, scope: &str) -> bool {
        self.0.scopes().contains(scope)
    }

    /// The key's metadata.
    pub fn metadata(&self) -> &Metadata {
        self.0.metadata()
    }

    /// When the key expires, if ever.
    pub fn expires_at(&self) -> Option<Timestamp> {
        self.0.expires_at()
    }

    /// The key this one was minted from, for ephemeral keys.
    pub fn parent(&self) -> Option<KeyId> {
        self.0.parent()
    }

    /// The key's own limits, if any (see [`RateLimitLayer`](crate::RateLimitLayer)).
    pub fn limits(&self) -> Option<&crate::limit::Limits> {
        self.0.limits()
    }

    /// The models the key is restricted to, if any (see
    /// [`ModelAccessLayer`](crate::limit::ModelAccessLayer)).
    pub fn models(&self) -> Option<&crate::limit::ModelList> {
        self.0.models()
    }

    /// The first key of the line this key continues, through rotations and minting (see
    /// [`KeyRecord::origin`]); its own id for a key that continues none.
    pub fn origin(&self) -> KeyId {
        self.0.origin()
    }
}

impl fmt::Debug for Identity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Identity")
            .field("id", &self.id())
            .field("name", &self.name())
            .field("scopes", self.scopes())
            .finish_non_exhaustive()
    }
}

#[cfg(feature = "axum")]
mod extract {
    use axum::extract::{FromRequestParts, OptionalFromRequestParts};
    use axum::response::{IntoResponse, Response};
    use http::StatusCode;
    use http::request::Parts;

    use super::Identity;

    /// The rejection of the [`Identity`] extractor: the request reached the handler without a
    /// verified key (anonymous mode, or the layer is missing).
    #[derive(Debug, Clone, Copy)]
    pub struct MissingIdentity;

    impl IntoResponse for MissingIdentity {
        fn into_response(self) -> Response {
            (
                StatusCode::UNAUTHORIZED,
                "An API key is required for this endpoint.",
            )
                .into_response()
        }
    }

    impl<S: Send + Sync> FromRequestParts<S> for Identity {
        type Rejection = MissingIdentity;

        async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
            parts
                .extensions
                .get::<Identity>()
                .cloned()
                .ok_or(MissingIdentity)
        }
    }

    impl<S: Send + Sync> OptionalFromRequestParts<S> for Identity {
        type Rejection = std::convert::Infallible;

        async fn from_request_parts(
            parts: &mut Parts,
            _: &S,
        ) -> Result<Option<Self>, Self::Rejection> {
            Ok(parts.extensions.get::<Identity>().cloned())
        }
    }
}

#[cfg(feature = "axum")]
pub use extract::MissingIdentity;
