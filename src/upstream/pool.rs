//! [`KeyPool`]: several provider keys, used in turn.

use std::fmt;
use std::future::{Ready, ready};
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::identity::Identity;
use crate::rejection::Rejection;
use crate::upstream::credential::{Credential, CredentialError, CredentialSource, Problem};

/// Several credentials for one provider, handed out round-robin, e.g. to spread load over
/// per-key rate limits.
///
/// Each request takes the next key: over `n * len` requests every key serves exactly `n`,
/// however many requests run at once.
///
/// ```
/// use tower_gateway_auth::upstream::{Credential, CredentialSource, KeyPool};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let pool = KeyPool::new(["sk-one", "sk-two"].map(|k| Credential::new(k).unwrap())).unwrap();
/// let mut turns = Vec::new();
/// for _ in 0..3 {
///     turns.push(pool.credential(None).await.unwrap().value().clone());
/// }
/// assert_eq!(turns, ["sk-one", "sk-two", "sk-one"]);
/// # });
/// ```
pub struct KeyPool {
    keys: Box<[Credential]>,
    next: AtomicUsize,
}

impl KeyPool {
    /// A pool of `keys`, used in this order.
    ///
    /// # Errors
    /// When `keys` is empty.
    pub fn new(keys: impl IntoIterator<Item = Credential>) -> Result<Self, CredentialError> {
        let keys: Box<[Credential]> = keys.into_iter().collect();
        if keys.is_empty() {
            return Err(CredentialError::new(Problem::EmptyPool));
        }
        Ok(KeyPool {
            keys,
            next: AtomicUsize::new(0),
        })
    }

    /// How many keys the pool holds.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Always `false`: a pool holds at least one key.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl CredentialSource for KeyPool {
    type Future = Ready<Result<Credential, Rejection>>;

    fn credential(&self, _: Option<&Identity>) -> Self::Future {
        // Relaxed is enough: the counter only has to hand out each number once.
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        ready(Ok(self.keys[turn % self.keys.len()].clone()))
    }

    fn label(&self) -> &str {
        "pool"
    }
}

impl fmt::Debug for KeyPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyPool")
            .field("keys", &self.keys)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_pool_is_refused() {
        let err = KeyPool::new([]).unwrap_err();
        assert_eq!(err.to_string(), "the key pool holds no credential");
    }
}
