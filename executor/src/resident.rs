//! Resident blobs: read-only input buffers (model weights) kept on the device between jobs,
//! keyed by content id, least recently used first out, under a byte budget. A job that names a
//! resident blob binds the kept buffer instead of uploading the bytes again; a job that reads
//! a range of it as a texture reuses the texture made for that range.
//!
//! Only buffers that no pass of the job can write are kept (the validator reflects every
//! binding's access), so one job can never change what a later job reads.

use std::collections::VecDeque;

use hashgrid_protocol::{BufferRange, ContentId};

/// What is kept: a blob's buffer, or the texture made from a byte range of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Key {
    /// The blob.
    pub(crate) blob: ContentId,
    /// `None`: the blob's buffer; `Some(range)`: the texture of those bytes.
    pub(crate) texture: Option<BufferRange>,
}

/// A kept buffer or texture.
#[derive(Debug, Clone)]
pub(crate) enum Kept {
    Buffer(wgpu::Buffer),
    Texture(wgpu::TextureView),
}

/// The resident set of one device.
pub(crate) struct Resident {
    budget: u64,
    used: u64,
    /// Most recently used last.
    entries: VecDeque<(Key, Kept, u64)>,
}

impl Resident {
    /// An empty set holding at most `budget` bytes (0 keeps nothing).
    pub(crate) fn new(budget: u64) -> Resident {
        Resident {
            budget,
            used: 0,
            entries: VecDeque::new(),
        }
    }

    /// Whether blob `id` is kept as a buffer (without marking it used).
    pub(crate) fn holds(&self, id: &ContentId) -> bool {
        self.entries.iter().any(|(k, kept, _)| {
            k.blob == *id && k.texture.is_none() && matches!(kept, Kept::Buffer(_))
        })
    }

    /// The entry for `key`, marking it most recently used.
    pub(crate) fn get(&mut self, key: &Key) -> Option<Kept> {
        let i = self.entries.iter().position(|(k, _, _)| k == key)?;
        let e = self.entries.remove(i)?;
        let kept = e.1.clone();
        self.entries.push_back(e);
        Some(kept)
    }

    /// The buffer holding blob `id`, marking it most recently used.
    pub(crate) fn buffer(&mut self, id: &ContentId) -> Option<wgpu::Buffer> {
        match self.get(&Key {
            blob: *id,
            texture: None,
        })? {
            Kept::Buffer(b) => Some(b),
            Kept::Texture(_) => None,
        }
    }

    /// Keeps `kept` (`size` bytes) under `key`, evicting the least recently used entries until
    /// it fits. An entry larger than the whole budget is not kept. Whether it was kept.
    pub(crate) fn insert(&mut self, key: Key, kept: Kept, size: u64) -> bool {
        if size > self.budget || self.entries.iter().any(|(k, _, _)| *k == key) {
            return false;
        }
        while self.used + size > self.budget {
            match self.entries.pop_front() {
                Some((_, _, s)) => self.used -= s,
                None => break,
            }
        }
        self.used += size;
        self.entries.push_back((key, kept, size));
        true
    }
}
