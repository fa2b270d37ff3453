//! BDK wallet persistence in a sled tree: each change set is appended under an increasing key
//! and flushed; loading merges them in order. Many small change sets are compacted into one
//! on load.

use bdk_wallet::chain::Merge;
use bdk_wallet::{ChangeSet, WalletPersister};

/// Change sets beyond which loading compacts the log into one entry.
const COMPACT_AFTER: usize = 64;

/// The persister failed.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    /// sled failed.
    #[error("sled: {0}")]
    Sled(#[from] sled::Error),
    /// A stored change set does not decode.
    #[error("stored wallet change set {key} is corrupt: {reason}")]
    Corrupt {
        /// Its key.
        key: u64,
        /// Why.
        reason: String,
    },
}

/// A sled tree holding a wallet's change-set log.
#[derive(Debug, Clone)]
pub struct SledPersister {
    tree: sled::Tree,
}

impl SledPersister {
    /// Persists into `tree` (one tree per wallet).
    pub fn new(tree: sled::Tree) -> SledPersister {
        SledPersister { tree }
    }

    fn next_key(&self) -> Result<u64, PersistError> {
        Ok(match self.tree.last()? {
            Some((k, _)) => key_of(&k).saturating_add(1),
            None => 0,
        })
    }
}

fn key_of(k: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if k.len() == 8 {
        b.copy_from_slice(k);
    }
    u64::from_be_bytes(b)
}

impl WalletPersister for SledPersister {
    type Error = PersistError;

    fn initialize(persister: &mut Self) -> Result<ChangeSet, Self::Error> {
        let mut merged = ChangeSet::default();
        let mut count = 0usize;
        let mut last = 0u64;
        for item in persister.tree.iter() {
            let (k, v) = item?;
            let key = key_of(&k);
            let cs: ChangeSet = serde_json::from_slice(&v).map_err(|e| PersistError::Corrupt {
                key,
                reason: e.to_string(),
            })?;
            merged.merge(cs);
            count += 1;
            last = key;
        }
        if count > COMPACT_AFTER {
            // One entry replaces the log, atomically.
            let bytes = serde_json::to_vec(&merged).map_err(|e| PersistError::Corrupt {
                key: last,
                reason: e.to_string(),
            })?;
            let mut batch = sled::Batch::default();
            for item in persister.tree.iter() {
                let (k, _) = item?;
                batch.remove(k);
            }
            batch.insert(&last.to_be_bytes(), bytes);
            persister.tree.apply_batch(batch)?;
            persister.tree.flush()?;
        }
        Ok(merged)
    }

    fn persist(persister: &mut Self, changeset: &ChangeSet) -> Result<(), Self::Error> {
        if changeset.is_empty() {
            return Ok(());
        }
        let key = persister.next_key()?;
        let bytes = serde_json::to_vec(changeset).map_err(|e| PersistError::Corrupt {
            key,
            reason: e.to_string(),
        })?;
        persister.tree.insert(key.to_be_bytes(), bytes)?;
        persister.tree.flush()?;
        Ok(())
    }
}
