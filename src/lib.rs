//! Tower layers that put API-gateway authentication in front of any axum, tonic or hyper
//! service.
//!
//! - [`InboundApiKeyLayer`] finds the client's API key (a header, `Authorization: Bearer`,
//!   or a query parameter), verifies it against a [`KeyStore`] that holds only digests, hands
//!   the caller's [`Identity`] to the inner service, and otherwise rejects the request with
//!   the right status, `WWW-Authenticate` and a body in the client's dialect
//!   ([`ErrorFormat`]) or a gRPC status.
//! - [`RequireScopesLayer`] adds per-route scope requirements.
//! - [`UpstreamAuthLayer`] strips every client credential and gives the request the
//!   provider's instead, placed as the [`Provider`] wants it (OpenAI, Anthropic, Gemini,
//!   Azure OpenAI, Mistral, Cohere, Hugging Face or a header/query of your own), from a
//!   [`CredentialSource`]: a fixed [`Credential`], a [`KeyPool`], a per-caller choice
//!   ([`PerIdentity`]) or a [`RefreshingToken`].
//! - [`HeaderInjectLayer`] overwrites, appends, defaults or removes request headers, adds
//!   provider headers and gives each request an id ([`RequestId`]).
//!
//! - [`RejectionLayer`], outermost, renders every refusal of the layers inside it in one
//!   dialect and realm. Each refusal is a typed [`Rejection`] (why, status, challenge,
//!   message, `Retry-After`), rendered where it happens in the default dialect and carried in
//!   the response's extensions, where this layer (and tracing, metrics or any outer layer)
//!   reads it: no layer has dialect or realm settings of its own, so a route cannot answer
//!   401 in one realm and 403 in another.
//!
//! A gateway stacks them in that order: client → rejections → inbound → upstream → inject →
//! proxy.
//!
//! ```
//! use axum::{Router, routing::get};
//! use tower_gateway_auth::{Identity, InboundApiKeyLayer, KeyId, KeyRecord, KeyStore, MemoryStore};
//!
//! let store = MemoryStore::new();
//! let digest = store.hasher().digest(b"gw_example-key");
//! store.insert(KeyRecord::new(KeyId::random(), digest).with_name("alice"));
//!
//! let app: Router = Router::new()
//!     .route("/whoami", get(|who: Identity| async move { who.name().to_owned() }))
//!     .layer(InboundApiKeyLayer::new(store));
//! ```
//!
//! # Features
//! - `axum`: [`Identity`] as an extractor (and `Option<Identity>`), and [`ManagementApi`].
//! - `proxy`: [`proxy::Forward`], a streaming forwarding proxy (hyper-util client, rustls),
//!   and [`proxy::StripHopByHopLayer`], which goes outermost so that a client's `Connection`
//!   header cannot remove what the layers set.
//! - `redis`: [`RedisStore`], keys shared by several replicas, with revocation fan-out to
//!   their [`CachedStore`]s.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![deny(unreachable_pub)]
#![warn(missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[macro_use]
mod macros;

pub mod body;
mod fault;
pub mod future;
mod headers;
mod identity;
pub mod inbound;
pub mod inject;
mod keys;
#[cfg(feature = "proxy")]
pub mod proxy;
mod query;
pub mod rejection;
pub mod store;
mod time;
pub mod upstream;

pub use identity::Identity;
#[cfg(feature = "axum")]
pub use identity::MissingIdentity;
pub use inbound::{InboundApiKeyLayer, KeySource, RequireScopesLayer};
pub use inject::{HeaderInjectLayer, HeaderRule, RequestHead, RequestId};
#[cfg(feature = "axum")]
pub use keys::api::ManagementApi;
pub use keys::format::{
    ApiKey, Checksum, Fingerprint, InvalidPrefix, KeyDigest, KeyFormat, KeyHasher,
};
pub use keys::manager::{
    DEFAULT_EPHEMERAL_TTL, DEFAULT_MAX_EPHEMERAL_TTL, DEFAULT_MAX_LIVE_EPHEMERAL, DEFAULT_TTL,
    IssuedKey, KeyManager, Lifetime, ManageError, NewKey,
};
pub use keys::record::{
    KeyId, KeyRecord, KeyStatus, KeyUnusable, Metadata, ParseKeyIdError, Scopes,
};
pub use rejection::{
    ErrorFormat, Realm, Rejection, RejectionKind, RejectionLayer, UnknownErrorFormat, is_grpc,
};
#[cfg(feature = "redis")]
pub use store::RedisStore;
pub use store::{
    BoxLookup, CachedStore, FileStore, FileStoreBuilder, KeyAdmin, KeyStore, LookupResult,
    MemoryStore, StoreError, Write, WriteError,
};
pub use time::{Clock, ManualClock, SystemClock, Timestamp};
pub use upstream::{
    Credential, CredentialError, CredentialSource, FetchError, KeyPool, PerIdentity, Provider,
    RefreshingToken, Token, TokenFetcher, UpstreamAuthLayer,
};

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
