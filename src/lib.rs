//! Tower layers that put API-gateway authentication in front of any axum, tonic or hyper
//! service.
//!
//! # The modules, in the order a request meets them
//!
//! | module | what it holds |
//! |---|---|
//! | [`proxy`] (feature `proxy`) | [`StripHopByHopLayer`](proxy::StripHopByHopLayer), outermost: a client's `Connection` header cannot remove what the layers below set |
//! | [`access_log`] | [`AccessLogLayer`](access_log::AccessLogLayer), outermost of a route: one `tracing` event per request, when its response body ends |
//! | `metrics` (feature `metrics`) | `MetricsLayer`, beside the [`RejectionLayer`]: requests by route and outcome through the `metrics` facade; the other layers' counters and histograms |
//! | [`rejection`] | [`RejectionLayer`]: renders every refusal of the layers inside it in one dialect ([`ErrorFormat`](rejection::ErrorFormat)) and realm; the typed [`Rejection`] |
//! | [`cors`] | [`CorsLayer`](cors::CorsLayer), before the inbound layer: CORS preflights answered by the gateway (never forwarded, no key needed), CORS headers on every answer to an allowed origin (refusals included), WebSocket upgrades from other origins refused |
//! | [`inbound`] | [`InboundApiKeyLayer`]: finds the client's key (header, `Authorization: Bearer`, query, a WebSocket subprotocol), verifies it against a [`KeyStore`](store::KeyStore) and hands the caller's [`Identity`] on; [`RequireScopesLayer`] for per-route scopes |
//! | [`store`] | where keys live, as digests only: [`MemoryStore`](store::MemoryStore), [`FileStore`](store::FileStore), [`CachedStore`](store::CachedStore) and, with feature `redis`, `RedisStore` (Redis or Redis Cluster) |
//! | [`limit`] | [`RateLimitLayer`]: each key's request rate (GCRA) and requests in flight, 429 with the providers' rate-limit headers, counted by [`MemoryLimiter`](limit::MemoryLimiter) or, with feature `redis`, `RedisLimiter` (shared by replicas); [`ModelAccessLayer`](limit::ModelAccessLayer): the models a key may use (403) |
//! | [`tokens`] | [`UsageBody`](tokens::UsageBody): each response's token usage (OpenAI, Anthropic, Gemini; JSON and SSE) read as it streams through unchanged, for token limits |
//! | [`keys`] | a key's life: its format and digest, the [`KeyRecord`](keys::KeyRecord) a store keeps, [`KeyManager`](keys::KeyManager) (issue, rotate, revoke, ephemeral keys) and, with feature `axum`, the [`ManagementApi`] |
//! | [`upstream`] | [`UpstreamAuthLayer`]: strips every client credential and sets the provider's ([`Provider`](upstream::Provider)) from a [`CredentialSource`](upstream::CredentialSource) |
//! | [`inject`] | [`HeaderInjectLayer`]: header rules and request ids |
//! | [`proxy`] (feature `proxy`) | [`Forward`](proxy::Forward), innermost: the streaming forwarding proxy; with feature `websocket`, WebSockets relayed frame by frame |
//! | [`socket`] | [`SocketLease`](socket::SocketLease): what an open WebSocket holds for as long as it is open (its concurrency permit) and what closes it (its key revoked, a shutdown) |
//! | [`response`], [`clock`] | what every layer answers with (and [`UpstreamOutcome`](response::UpstreamOutcome), what the upstream answered); the injectable clock key validity reads |
//!
//! A gateway stacks them in that order: client → hop-by-hop → access log → metrics →
//! rejections → CORS → inbound → limits → upstream → inject → proxy.
//!
//! # Browser clients
//!
//! A page calls a route from the browser once the route has a [`CorsLayer`](cors::CorsLayer);
//! a realtime API's WebSocket goes through [`Forward`](proxy::Forward) (feature
//! `websocket`) with its key in the subprotocol list, the one place besides the URL a
//! browser's `WebSocket` lets a page put it ([`KeySource::Subprotocol`](inbound::KeySource::Subprotocol),
//! OpenAI's `openai-insecure-api-key.<key>`). Give such a page an ephemeral key
//! ([`KeyManager::mint_ephemeral`](keys::KeyManager::mint_ephemeral)), never a long-lived
//! one: the [`inbound`](inbound#which-sources-are-weaker) docs say why the query string
//! and the subprotocol are weaker places for a key than a header. An open socket's key is
//! checked again while it is open ([`inbound`](inbound#open-sockets)), and a WebRTC
//! session's signalling (an SDP offer `POST`ed as `application/sdp`) is an ordinary request
//! and passes byte for byte.
//!
//! # One way to refuse a request
//!
//! Every refusal, from any layer, is a typed [`Rejection`]: why ([`RejectionKind`](rejection::RejectionKind)),
//! status, challenge, message and `Retry-After` where it applies. The layer that refuses
//! renders it at once in the default dialect (OpenAI, realm `api`, or a gRPC status when the
//! request is gRPC) and puts the `Rejection` in the response's extensions. One
//! [`RejectionLayer`] outside the stack reads it back and renders it again in the dialect and
//! realm the route was given, so that setting lives in exactly one place: no layer has
//! dialect or realm settings of its own, and a route cannot answer 401 in one realm and 403 in
//! another. Tracing, metrics and any outer layer read the same extension instead of parsing
//! bodies. An outer layer was chosen over a value handed to each layer because a layer
//! written by someone else (or a handler returning a `Rejection`) is covered too, and
//! because the common path, an accepted request, then costs one extensions lookup on the
//! response and nothing else.
//!
//! ```
//! use axum::{Router, routing::get};
//! use tower_gateway_auth::{Identity, InboundApiKeyLayer, RejectionLayer};
//! use tower_gateway_auth::keys::{KeyId, KeyRecord};
//! use tower_gateway_auth::rejection::ErrorFormat;
//! use tower_gateway_auth::store::{KeyStore, MemoryStore};
//!
//! let store = MemoryStore::new();
//! let digest = store.hasher().digest(b"gw_example-key");
//! store.insert(KeyRecord::new(KeyId::random(), digest).with_name("alice"));
//!
//! let app: Router = Router::new()
//!     .route("/whoami", get(|who: Identity| async move { who.name().to_owned() }))
//!     .layer(InboundApiKeyLayer::new(store))
//!     .layer(RejectionLayer::new().error_format(ErrorFormat::Anthropic).realm("gateway"));
//! ```
//!
//! # Features
//! - `axum`: [`Identity`] as an extractor (and `Option<Identity>`), [`Rejection`] as a
//!   response, and the [`ManagementApi`].
//! - `admin-ui`: the management API's web page ([`ManagementApi::page`]), embedded in the
//!   crate.
//! - `proxy`: [`proxy::Forward`], a streaming forwarding proxy (hyper-util client, rustls),
//!   and [`proxy::StripHopByHopLayer`].
//! - `websocket` (with `proxy`): WebSocket upgrades relayed by `Forward`, frame-aware
//!   (tokio-tungstenite), with message-size, idle and lifetime limits.
//! - `redis`: `store::RedisStore`, keys shared by several replicas, with revocation fan-out to
//!   their [`CachedStore`](store::CachedStore)s, and `limit::RedisLimiter`, one limit per key
//!   across replicas; both on standalone Redis or Redis Cluster.
//! - `jwt`: `jwt::JwtVerifier`, user tokens (JWT, OIDC discovery, JWKS) verified by the
//!   inbound layer beside keys, and `upstream::ClientCredentials`, OAuth2 tokens for
//!   upstreams.
//! - `metrics`: `metrics::MetricsLayer` and the crate's counters and histograms (store
//!   lookups, cache events, token refreshes, upstream answers) through the `metrics` facade,
//!   for any exporter. Off, none of that code is compiled in.
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![deny(unreachable_pub)]
#![warn(missing_debug_implementations)]
#![cfg_attr(docsrs, feature(doc_cfg))]

#[macro_use]
mod macros;

pub mod access_log;
pub mod clock;
pub mod cors;
mod error_detail;
#[cfg(feature = "jwt")]
mod http_fetch;
#[cfg(any(feature = "proxy", feature = "jwt"))]
mod https_client;
mod identity;
pub mod inbound;
pub mod inject;
mod json_escape;
#[cfg(feature = "jwt")]
pub mod jwt;
pub mod keys;
pub mod limit;
#[cfg(feature = "metrics")]
pub mod metrics;
#[cfg(feature = "proxy")]
pub mod proxy;
mod query_string;
mod ready_or_boxed;
#[cfg(feature = "redis")]
mod redis_connection;
pub mod rejection;
mod remove_headers;
pub mod response;
pub mod socket;
pub mod store;
pub mod tokens;
pub mod upstream;
mod wait_then_call;

pub use identity::Identity;
#[cfg(feature = "axum")]
pub use identity::MissingIdentity;
pub use inbound::{InboundApiKeyLayer, RequireScopesLayer};
pub use inject::HeaderInjectLayer;
#[cfg(feature = "axum")]
pub use keys::ManagementApi;
pub use limit::RateLimitLayer;
pub use rejection::{Rejection, RejectionLayer};
pub use upstream::UpstreamAuthLayer;

/// The README's examples, compiled and run as doctests.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
