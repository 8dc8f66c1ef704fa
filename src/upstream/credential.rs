//! The provider's credential, and the trait every source of one implements.

use std::fmt;
use std::future::{Future, Ready, ready};
use std::sync::Arc;

use http::HeaderValue;

use crate::identity::Identity;
use crate::keys::{Fingerprint, KeyHasher};
use crate::rejection::Rejection;

/// A provider credential (API key or access token), ready to be placed in a request.
///
/// The secret is held as sensitive [`HeaderValue`]s (HTTP/2 never indexes them), both bare
/// and in its `Bearer` form, so placing it costs no allocation. `Debug` shows only a
/// [`Fingerprint`], which is also what the layer logs.
///
/// A credential is at most 8 KiB of visible ASCII: what API keys and OAuth tokens are, and
/// what a header value and a `Bearer` token can carry unchanged.
///
/// ```
/// use tower_gateway_auth::upstream::Credential;
///
/// let credential = Credential::new("sk-live-123").unwrap();
/// assert!(!format!("{credential:?}").contains("sk-live-123"));
/// assert!(Credential::new("two words").is_err());
/// ```
#[derive(Clone)]
pub struct Credential {
    // Shared: sources hand out a clone per request.
    inner: Arc<Secret>,
}

struct Secret {
    value: HeaderValue,
    bearer: HeaderValue,
    fingerprint: Fingerprint,
}

/// The longest credential accepted: far beyond any real key or JWT, far below header limits.
const MAX_CREDENTIAL_LEN: usize = 8 * 1024;

impl Credential {
    /// A credential holding `secret`.
    ///
    /// # Errors
    /// When `secret` is empty, longer than 8 KiB, or holds anything but visible ASCII
    /// (whitespace, control or non-ASCII characters). The error never repeats the secret.
    pub fn new(secret: &str) -> Result<Self, CredentialError> {
        let bytes = secret.as_bytes();
        if bytes.is_empty() {
            return Err(CredentialError::new(Problem::Empty));
        }
        if bytes.len() > MAX_CREDENTIAL_LEN {
            return Err(CredentialError::new(Problem::TooLong));
        }
        if !bytes.iter().all(u8::is_ascii_graphic) {
            return Err(CredentialError::new(Problem::InvalidCharacters));
        }
        let sensitive = |bytes: &[u8]| {
            let mut value =
                HeaderValue::from_bytes(bytes).expect("visible ASCII is a valid header value");
            value.set_sensitive(true);
            value
        };
        Ok(Credential {
            inner: Arc::new(Secret {
                value: sensitive(bytes),
                bearer: sensitive(&[b"Bearer ", bytes].concat()),
                fingerprint: KeyHasher::sha256().digest(bytes).fingerprint(),
            }),
        })
    }

    /// The credential in the environment variable `var`, read now (at start-up), surrounding
    /// whitespace trimmed.
    ///
    /// # Errors
    /// When the variable is unset, not Unicode, or does not hold a valid credential; the
    /// error names the variable, never its value.
    ///
    /// ```
    /// use tower_gateway_auth::upstream::Credential;
    ///
    /// let missing = Credential::from_env("SURELY_NOT_SET_ANYWHERE_42").unwrap_err();
    /// assert_eq!(
    ///     missing.to_string(),
    ///     "environment variable `SURELY_NOT_SET_ANYWHERE_42` is not set"
    /// );
    /// ```
    pub fn from_env(var: &str) -> Result<Self, CredentialError> {
        Self::new(env_value(var)?.trim()).map_err(|e| e.in_variable(var))
    }

    /// The secret as a header value (sensitive), for a header or query placement.
    pub fn value(&self) -> &HeaderValue {
        &self.inner.value
    }

    /// `Bearer <secret>` (sensitive), for `Authorization`.
    pub fn bearer(&self) -> &HeaderValue {
        &self.inner.bearer
    }

    /// A short one-way tag of the secret, safe to log: it tells credentials apart (which key
    /// of a pool served a request) without revealing them.
    pub fn fingerprint(&self) -> Fingerprint {
        self.inner.fingerprint
    }
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Credential({}, <redacted>)", self.inner.fingerprint)
    }
}

/// The value of `var`, or an error naming it.
pub(crate) fn env_value(var: &str) -> Result<String, CredentialError> {
    std::env::var(var).map_err(|e| {
        let problem = match e {
            std::env::VarError::NotPresent => Problem::MissingVariable,
            std::env::VarError::NotUnicode(_) => Problem::InvalidCharacters,
        };
        CredentialError::new(problem).in_variable(var)
    })
}

/// Why a credential could not be made.
#[derive(Clone, PartialEq, Eq)]
pub struct CredentialError {
    problem: Problem,
    variable: Option<Arc<str>>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Problem {
    Empty,
    TooLong,
    InvalidCharacters,
    MissingVariable,
    EmptyPool,
}

impl CredentialError {
    pub(crate) fn new(problem: Problem) -> Self {
        CredentialError {
            problem,
            variable: None,
        }
    }

    pub(crate) fn in_variable(mut self, var: &str) -> Self {
        self.variable = Some(var.into());
        self
    }

    /// The environment variable the credential was read from, if any.
    pub fn variable(&self) -> Option<&str> {
        self.variable.as_deref()
    }

    /// Whether the environment variable was not set at all.
    pub fn is_missing_variable(&self) -> bool {
        self.problem == Problem::MissingVariable
    }
}

impl fmt::Display for CredentialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match self.problem {
            Problem::MissingVariable => "is not set",
            Problem::Empty => "is empty",
            Problem::TooLong => "is longer than 8 KiB",
            Problem::InvalidCharacters => {
                "holds characters a credential cannot have (whitespace, control or non-ASCII characters)"
            }
            Problem::EmptyPool => "holds no credential",
        };
        match &self.variable {
            Some(var) => write!(f, "environment variable `{var}` {what}"),
            None if self.problem == Problem::EmptyPool => write!(f, "the key pool {what}"),
            None => write!(f, "the credential {what}"),
        }
    }
}

impl fmt::Debug for CredentialError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CredentialError({self})")
    }
}

impl std::error::Error for CredentialError {}

/// Where the upstream credential for a request comes from.
///
/// A source answers with a [`Credential`], or with a [`Rejection`] the layer sends back to
/// the client: [`NoUpstreamCredential`] (401) when nothing fits this caller,
/// [`UpstreamCredentialUnavailable`] (503) when the credential cannot be had right now. A
/// request is never forwarded without a credential.
///
/// The future is named and `Unpin` so that sources answering at once (a static credential,
/// a [`KeyPool`](super::KeyPool)) return [`std::future::Ready`]: the layer then places the
/// credential and calls the inner service in `call`, with no allocation and no clone of the
/// inner service. A source that must wait can box its future.
///
/// [`NoUpstreamCredential`]: crate::rejection::RejectionKind::NoUpstreamCredential
/// [`UpstreamCredentialUnavailable`]: crate::rejection::RejectionKind::UpstreamCredentialUnavailable
///
/// ```
/// use std::future::{Ready, ready};
/// use tower_gateway_auth::{Identity, Rejection};
/// use tower_gateway_auth::rejection::RejectionKind;
/// use tower_gateway_auth::upstream::{Credential, CredentialSource};
///
/// /// Only keys with the `premium` scope may use the provider.
/// struct PremiumOnly(Credential);
///
/// impl CredentialSource for PremiumOnly {
///     type Future = Ready<Result<Credential, Rejection>>;
///
///     fn credential(&self, identity: Option<&Identity>) -> Self::Future {
///         ready(match identity {
///             Some(who) if who.has_scope("premium") => Ok(self.0.clone()),
///             _ => Err(Rejection::new(RejectionKind::NoUpstreamCredential, "Premium only.")),
///         })
///     }
///
///     fn label(&self) -> &str {
///         "premium-only"
///     }
/// }
/// ```
pub trait CredentialSource: Send + Sync + 'static {
    /// The future [`credential`](Self::credential) returns.
    type Future: Future<Output = Result<Credential, Rejection>> + Send + Unpin + 'static;

    /// The credential for a request from `identity` (`None` for an anonymous request, or
    /// when no inbound layer runs first).
    fn credential(&self, identity: Option<&Identity>) -> Self::Future;

    /// What kind of source this is, for logs (never a secret).
    fn label(&self) -> &str {
        "custom"
    }
}

impl<T: CredentialSource> CredentialSource for Arc<T> {
    type Future = T::Future;

    fn credential(&self, identity: Option<&Identity>) -> Self::Future {
        (**self).credential(identity)
    }

    fn label(&self) -> &str {
        (**self).label()
    }
}

/// A fixed credential (from code, a config file or [`Credential::from_env`]).
impl CredentialSource for Credential {
    type Future = Ready<Result<Credential, Rejection>>;

    fn credential(&self, _: Option<&Identity>) -> Self::Future {
        ready(Ok(self.clone()))
    }

    fn label(&self) -> &str {
        "static"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_visible_ascii_only() {
        let c = Credential::new("sk-ant-api03_AbC+/=~").unwrap();
        assert_eq!(c.value(), "sk-ant-api03_AbC+/=~");
        assert_eq!(c.bearer(), "Bearer sk-ant-api03_AbC+/=~");
        assert!(c.value().is_sensitive() && c.bearer().is_sensitive());

        for (bad, message) in [
            ("", "the credential is empty"),
            (" sk", "the credential holds characters"),
            ("sk\n", "the credential holds characters"),
            ("sk\u{e9}", "the credential holds characters"),
        ] {
            let err = Credential::new(bad).unwrap_err();
            assert!(err.to_string().starts_with(message), "{bad:?}: {err}");
        }
        let long = "k".repeat(MAX_CREDENTIAL_LEN + 1);
        assert_eq!(
            Credential::new(&long).unwrap_err().to_string(),
            "the credential is longer than 8 KiB"
        );
        assert!(Credential::new(&long[1..]).is_ok());
    }

    #[test]
    fn fingerprints_tell_credentials_apart_without_showing_them() {
        let a = Credential::new("sk-a").unwrap();
        let b = Credential::new("sk-b").unwrap();
        assert_ne!(a.fingerprint(), b.fingerprint());
        assert_eq!(
            a.fingerprint(),
            Credential::new("sk-a").unwrap().fingerprint()
        );
        let debug = format!("{a:?}");
        assert!(!debug.contains("sk-a"), "{debug}");
        assert!(debug.contains(&a.fingerprint().to_string()), "{debug}");
    }
}
