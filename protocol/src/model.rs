//! A model as the market names it: the list of its weight blobs, and the id of that list.
//!
//! A compiled model job carries its weights as content-addressed input blobs (one per layer,
//! for a language model). The **model id** is the blake3 hash of the manifest below, so a
//! buyer's compiler and a site that preloads the same file compute the same id without
//! agreeing on anything but the layout. Bids name a model by this id, capacity ads list the
//! ids of the models their provider holds in full, and a dispatch carries the manifest so the
//! provider learns which of the job's blobs make up the model.

use serde::{Deserialize, Serialize};

use crate::ContentId;
use crate::job::{BufferInit, JobSpec, MAX_BUFFERS};
use crate::validate::{ValidationError, check_len};

/// Most blobs one model may have: a job has at most [`MAX_BUFFERS`] buffers.
pub const MAX_MODEL_BLOBS: usize = MAX_BUFFERS;

/// The domain tag hashed in front of a manifest (see [`ModelManifest::id`]).
pub const MODEL_ID_TAG: &[u8] = b"hashgrid/1/model";

/// One weight blob of a model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct ModelBlob {
    /// The blob's content id.
    pub id: ContentId,
    /// Its length in bytes.
    pub len: u64,
}

/// The weight blobs of a model, in the compiler's order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ModelManifest {
    /// The blobs, each named once.
    pub blobs: Vec<ModelBlob>,
}

impl ModelManifest {
    /// A manifest of `blobs` (id and length), in their order.
    pub fn new(blobs: impl IntoIterator<Item = (ContentId, u64)>) -> ModelManifest {
        ModelManifest {
            blobs: blobs
                .into_iter()
                .map(|(id, len)| ModelBlob { id, len })
                .collect(),
        }
    }

    /// The model id: `blake3(MODEL_ID_TAG || 0x00 || count as u32 LE || for each blob: its
    /// 32-byte id || its length as u64 LE)`.
    pub fn id(&self) -> ContentId {
        let mut h = blake3::Hasher::new();
        h.update(MODEL_ID_TAG);
        h.update(&[0]);
        h.update(
            &u32::try_from(self.blobs.len())
                .unwrap_or(u32::MAX)
                .to_le_bytes(),
        );
        for b in &self.blobs {
            h.update(b.id.as_bytes());
            h.update(&b.len.to_le_bytes());
        }
        ContentId::from(h.finalize())
    }

    /// The weights' bytes in all.
    pub fn bytes(&self) -> u64 {
        self.blobs
            .iter()
            .map(|b| b.len)
            .fold(0, u64::saturating_add)
    }

    /// Whether the manifest names `id`.
    pub fn contains(&self, id: &ContentId) -> bool {
        self.blobs.iter().any(|b| b.id == *id)
    }

    /// Structure: 1 to [`MAX_MODEL_BLOBS`] blobs, each named once, none empty.
    pub fn validate(&self) -> Result<(), ValidationError> {
        check_len("model.blobs", self.blobs.len(), MAX_MODEL_BLOBS)?;
        if self.blobs.is_empty() {
            return Err(ValidationError::OutOfRange {
                field: "model.blobs",
                reason: "a model has at least one blob".into(),
            });
        }
        let mut ids: Vec<&ContentId> = self.blobs.iter().map(|b| &b.id).collect();
        ids.sort();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return Err(ValidationError::OutOfRange {
                field: "model.blobs",
                reason: "a blob is named twice".into(),
            });
        }
        if self.blobs.iter().any(|b| b.len == 0) {
            return Err(ValidationError::OutOfRange {
                field: "model.blobs[].len",
                reason: "a blob is empty".into(),
            });
        }
        Ok(())
    }

    /// [`validate`](Self::validate), and every blob is an input of `spec` of the same size:
    /// what a provider checks before it believes a dispatch's manifest.
    pub fn check_against(&self, spec: &JobSpec) -> Result<(), ValidationError> {
        self.validate()?;
        for b in &self.blobs {
            let used = spec
                .buffers
                .iter()
                .any(|s| s.init == BufferInit::Blob(b.id) && s.size == b.len);
            if !used {
                return Err(ValidationError::OutOfRange {
                    field: "model.blobs",
                    reason: format!(
                        "blob {} ({} bytes) is not an input of the job",
                        b.id.short(),
                        b.len
                    ),
                });
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(blobs: &[(u8, u64)]) -> ModelManifest {
        ModelManifest::new(blobs.iter().map(|(b, n)| (ContentId([*b; 32]), *n)))
    }

    #[test]
    fn the_id_covers_every_blob_its_length_and_the_order() {
        let a = m(&[(1, 100), (2, 200)]);
        assert_eq!(a.id(), m(&[(1, 100), (2, 200)]).id());
        assert_ne!(a.id(), m(&[(2, 200), (1, 100)]).id());
        assert_ne!(a.id(), m(&[(1, 100), (2, 201)]).id());
        assert_ne!(a.id(), m(&[(1, 100)]).id());
        assert_ne!(a.id(), m(&[(1, 100), (3, 200)]).id());
        assert_eq!(a.bytes(), 300);
    }

    #[test]
    fn empty_duplicated_and_oversized_manifests_are_refused() {
        assert!(m(&[(1, 10)]).validate().is_ok());
        assert!(m(&[]).validate().is_err());
        assert!(m(&[(1, 10), (1, 10)]).validate().is_err());
        assert!(m(&[(1, 0)]).validate().is_err());
        let big = ModelManifest::new((0..=MAX_MODEL_BLOBS).map(|i| {
            let mut id = [0u8; 32];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            (ContentId(id), 1)
        }));
        assert!(big.validate().is_err());
    }
}
