//! The store's two small trees that outlive a job: durable events waiting for the
//! application's acknowledgement ([`crate::event::DurableEvent`]) and the buyer's experience of
//! each provider ([`crate::jobs::reputation`]). Generic over the stored types, so the store
//! imports nothing above it.

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{Store, StoreError, TREE_EVENTS, TREE_REPUTATION};

/// Most durable events kept unacknowledged: past it the oldest go (with a warning), so an
/// application that never acknowledges cannot fill the disk.
pub const MAX_UNHANDLED_EVENTS: usize = 100_000;

impl Store {
    /// Queues a durable event. Not flushed: it becomes durable with the caller's next flush,
    /// the one that makes the state change it reports durable.
    /// (`T` is [`crate::event::DurableEvent`]; generic so that the store imports nothing above
    /// it.)
    pub fn push_event<T: Serialize>(&self, ev: &T) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(ev).map_err(|e| StoreError::Corrupt {
            tree: TREE_EVENTS,
            reason: e.to_string(),
        })?;
        let id = self.db.generate_id()?;
        self.events.insert(id.to_be_bytes(), bytes)?;
        while self.events.len() > MAX_UNHANDLED_EVENTS {
            let Some((k, _)) = self.events.pop_min()? else {
                break;
            };
            tracing::warn!(
                event = ?k.as_ref(),
                "dropping the oldest unacknowledged event: {MAX_UNHANDLED_EVENTS} are waiting"
            );
        }
        self.events_pushed.notify_waiters();
        Ok(())
    }

    /// The oldest unacknowledged durable event and its id.
    pub fn next_event<T: DeserializeOwned>(&self) -> Result<Option<(u64, T)>, StoreError> {
        let Some((k, v)) = self.events.first()? else {
            return Ok(None);
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            tree: TREE_EVENTS,
            reason,
        };
        let id = k
            .as_ref()
            .try_into()
            .map(u64::from_be_bytes)
            .map_err(|_| corrupt("key is not 8 bytes".into()))?;
        let ev = postcard::from_bytes(&v).map_err(|e| corrupt(e.to_string()))?;
        Ok(Some((id, ev)))
    }

    /// Acknowledges the event `id` (removed, flushed); false if it was not waiting.
    pub fn event_handled(&self, id: u64) -> Result<bool, StoreError> {
        let was = self.events.remove(id.to_be_bytes())?.is_some();
        self.db.flush()?;
        Ok(was)
    }

    /// Every stored provider experience: raw key bytes and postcard value.
    pub(crate) fn reputations(&self) -> Result<Vec<(sled::IVec, sled::IVec)>, StoreError> {
        Ok(self.reputation.iter().collect::<Result<Vec<_>, _>>()?)
    }

    /// Stores a provider's experience (not flushed).
    pub(crate) fn put_reputation<T: Serialize>(
        &self,
        provider: &hashgrid_protocol::PublicKey,
        e: &T,
    ) -> Result<(), StoreError> {
        let bytes = postcard::to_stdvec(e).map_err(|err| StoreError::Corrupt {
            tree: TREE_REPUTATION,
            reason: err.to_string(),
        })?;
        self.reputation.insert(provider.0, bytes)?;
        Ok(())
    }

    /// Forgets a provider's experience (not flushed).
    pub(crate) fn remove_reputation(
        &self,
        provider: &hashgrid_protocol::PublicKey,
    ) -> Result<(), StoreError> {
        self.reputation.remove(provider.0)?;
        Ok(())
    }

    /// Woken whenever an event is pushed.
    pub(crate) fn events_pushed(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.events_pushed.clone()
    }
}
