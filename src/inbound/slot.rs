//! [`KeyIdSlot`]: how a layer outside [`InboundApiKeyLayer`](super::InboundApiKeyLayer)
//! learns whose key a request carried.

use std::sync::{Arc, OnceLock};

use crate::keys::KeyId;

/// A place for the id of the key a request presented, put into the request's extensions by
/// a layer outside [`InboundApiKeyLayer`](super::InboundApiKeyLayer) (the
/// [`AccessLogLayer`](crate::access_log::AccessLogLayer), `MetricsLayer` with per-key
/// labels) and filled by it once the presented key matched a record, whether the key is then
/// accepted or refused (revoked, expired, lacking a scope). An unknown key leaves it empty.
///
/// An outer layer cannot read the request's extensions once the inner service has the
/// request, and the [`Identity`](crate::Identity) travels down, not back up: so the outer
/// layer hands this shared slot down and reads it when the response comes back. A request
/// without one costs the inbound layer one failed extensions lookup, nothing more.
///
/// ```
/// use std::convert::Infallible;
/// use tower::{ServiceBuilder, ServiceExt};
/// use tower_gateway_auth::InboundApiKeyLayer;
/// use tower_gateway_auth::inbound::KeyIdSlot;
/// use tower_gateway_auth::keys::{KeyId, KeyRecord};
/// use tower_gateway_auth::store::{KeyStore, MemoryStore};
///
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// let store = MemoryStore::new();
/// let id = KeyId::random();
/// store.insert(KeyRecord::new(id, store.hasher().digest(b"gw_slot-demo")));
/// let service = ServiceBuilder::new()
///     .layer(InboundApiKeyLayer::new(store))
///     .service_fn(|_req: http::Request<()>| async {
///         Ok::<_, Infallible>(http::Response::new(String::new()))
///     });
///
/// let mut req = http::Request::builder().header("x-api-key", "gw_slot-demo").body(()).unwrap();
/// let slot = KeyIdSlot::attach(req.extensions_mut());
/// service.oneshot(req).await.unwrap();
/// assert_eq!(slot.get(), Some(id));
/// # });
/// ```
#[derive(Debug, Clone, Default)]
pub struct KeyIdSlot(Arc<OnceLock<KeyId>>);

impl KeyIdSlot {
    /// An empty slot.
    pub fn new() -> Self {
        Self::default()
    }

    /// The slot already in `extensions` (another outer layer put it there), or a new one put
    /// there now.
    pub fn attach(extensions: &mut http::Extensions) -> Self {
        if let Some(slot) = extensions.get::<KeyIdSlot>() {
            return slot.clone();
        }
        let slot = KeyIdSlot::new();
        extensions.insert(slot.clone());
        slot
    }

    /// The key's id, once the inbound layer found its record.
    pub fn get(&self) -> Option<KeyId> {
        self.0.get().copied()
    }

    /// Records `id`; the first id set stays (the presented key's, not an ancestor's).
    pub(crate) fn fill(&self, id: KeyId) {
        let _ = self.0.set(id);
    }
}
