//! [`StoreSlot`]: the store as handles and job tasks share it, closed at shutdown.

use super::{Store, StoreError};

/// The store as handles and job tasks see it: closed by the node at shutdown, so that the
/// sled lock is released as soon as [`crate::NodeHandle::shutdown`] returns even while handles
/// live on. Operations run under a read lock; closing waits for them.
#[derive(Clone, Debug)]
pub(crate) struct StoreSlot(std::sync::Arc<std::sync::RwLock<Option<Store>>>);

impl StoreSlot {
    pub(crate) fn new(store: Store) -> StoreSlot {
        StoreSlot(std::sync::Arc::new(std::sync::RwLock::new(Some(store))))
    }

    /// Runs `f` on the open store; `Err(None)` once the node has stopped.
    pub(crate) fn with<T>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError>,
    ) -> Result<T, Option<StoreError>> {
        let guard = self.0.read().map_err(|_| None)?;
        match &*guard {
            Some(s) => f(s).map_err(Some),
            None => Err(None),
        }
    }

    /// Closes the store for every holder of this slot.
    pub(crate) fn close(&self) {
        let mut guard = match self.0.write() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        };
        *guard = None;
    }
}
