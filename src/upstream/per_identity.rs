//! [`PerIdentity`]: the upstream credential chosen by who is calling.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use crate::identity::Identity;
use crate::keys::KeyId;
use crate::rejection::{Rejection, RejectionKind};
use crate::upstream::credential::{Credential, CredentialSource};

/// Picks the upstream credential from the caller's [`Identity`] (set by
/// [`InboundApiKeyLayer`](crate::InboundApiKeyLayer)).
///
/// Tried in order:
/// 1. the caller's key id ([`for_key`](Self::for_key)): bring-your-own-key, where a client's
///    gateway key maps to that client's own provider key. An entry for a key also serves
///    the ephemeral keys minted from it and its rotated successors (tried in this order:
///    the key's own id, its parent's, its [`origin`](crate::keys::KeyRecord::origin));
/// 2. a metadata field of the key, e.g. `tenant` ([`by_metadata`](Self::by_metadata),
///    [`for_value`](Self::for_value));
/// 3. the [`fallback`](Self::fallback).
///
/// When nothing fits (or the request has no identity and there is no fallback), the
/// request is refused with 401 [`NoUpstreamCredential`](RejectionKind::NoUpstreamCredential)
/// and never forwarded. Each entry is itself a [`CredentialSource`] (by default a
/// [`Credential`]; a [`KeyPool`](super::KeyPool) per tenant works too).
///
/// ```
/// use tower_gateway_auth::keys::KeyId;
/// use tower_gateway_auth::upstream::{Credential, PerIdentity};
///
/// let byok_client: KeyId = "key_0000000000A".parse().unwrap();
/// let source = PerIdentity::new()
///     .for_key(byok_client, Credential::new("sk-their-own").unwrap())
///     .by_metadata("tenant")
///     .for_value("acme", Credential::new("sk-acme").unwrap())
///     .for_value("globex", Credential::new("sk-globex").unwrap())
///     .fallback(Credential::new("sk-shared").unwrap());
/// # let _ = source;
/// ```
pub struct PerIdentity<C = Credential> {
    by_key: HashMap<KeyId, C>,
    field: Option<String>,
    by_value: HashMap<String, C>,
    fallback: Option<C>,
}

impl<C: CredentialSource> PerIdentity<C> {
    /// A source with no mapping yet: every request is refused until entries are added.
    pub fn new() -> Self {
        PerIdentity {
            by_key: HashMap::new(),
            field: None,
            by_value: HashMap::new(),
            fallback: None,
        }
    }

    /// Requests made with the gateway key `id` use `source`.
    pub fn for_key(mut self, id: KeyId, source: C) -> Self {
        self.by_key.insert(id, source);
        self
    }

    /// The key metadata field whose value selects an entry added with
    /// [`for_value`](Self::for_value), e.g. `tenant`.
    pub fn by_metadata(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    /// Keys whose metadata field (see [`by_metadata`](Self::by_metadata)) is `value` use
    /// `source`.
    pub fn for_value(mut self, value: impl Into<String>, source: C) -> Self {
        self.by_value.insert(value.into(), source);
        self
    }

    /// Requests nothing else fits use `source` (anonymous ones too, where the upstream
    /// layer lets them through with
    /// [`credential_without_identity`](crate::UpstreamAuthLayer::credential_without_identity)).
    pub fn fallback(mut self, source: C) -> Self {
        self.fallback = Some(source);
        self
    }

    fn select(&self, identity: Option<&Identity>) -> Option<&C> {
        let Some(who) = identity else {
            return self.fallback.as_ref();
        };
        let own_line = [Some(who.id()), who.parent(), Some(who.origin())];
        own_line
            .into_iter()
            .flatten()
            .find_map(|id| self.by_key.get(&id))
            .or_else(|| {
                let field = self.field.as_deref()?;
                self.by_value.get(who.metadata().get(field)?)
            })
            .or(self.fallback.as_ref())
    }
}

impl<C: CredentialSource> Default for PerIdentity<C> {
    fn default() -> Self {
        Self::new()
    }
}

impl<C: CredentialSource> CredentialSource for PerIdentity<C> {
    type Future = PerIdentityFuture<C::Future>;

    fn credential(&self, identity: Option<&Identity>) -> Self::Future {
        match self.select(identity) {
            Some(source) => PerIdentityFuture::Selected(source.credential(identity)),
            None => {
                tracing::info!(
                    target: "tower_gateway_auth::upstream",
                    key_id = identity.map(|who| tracing::field::display(who.id())),
                    "no upstream credential for this caller"
                );
                PerIdentityFuture::NoMatch(Some(Rejection::new(
                    RejectionKind::NoUpstreamCredential,
                    "No upstream credential is configured for this API key.",
                )))
            }
        }
    }

    fn label(&self) -> &str {
        "per-identity"
    }
}

impl<C: fmt::Debug> fmt::Debug for PerIdentity<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PerIdentity")
            .field("by_key", &self.by_key)
            .field("field", &self.field)
            .field("by_value", &self.by_value)
            .field("fallback", &self.fallback)
            .finish()
    }
}

/// The future of [`PerIdentity`]: the selected source's, or a refusal ready at once.
#[derive(Debug)]
pub enum PerIdentityFuture<F> {
    /// The selected source is answering.
    Selected(F),
    /// Nothing fits this caller.
    NoMatch(Option<Rejection>),
}

impl<F> Future for PerIdentityFuture<F>
where
    F: Future<Output = Result<Credential, Rejection>> + Unpin,
{
    type Output = Result<Credential, Rejection>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            PerIdentityFuture::Selected(future) => Pin::new(future).poll(cx),
            PerIdentityFuture::NoMatch(rejection) => Poll::Ready(Err(rejection
                .take()
                .expect("PerIdentityFuture polled after completion"))),
        }
    }
}
