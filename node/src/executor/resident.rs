//! Resident blobs: read-only input buffers (model weights) kept on the device between jobs,
//! keyed by content id, least recently used first out, under a byte budget. A job that names a
//! resident blob binds the kept buffer instead of uploading the bytes again.
//!
//! Only buffers that no pass of the job can write are kept (the validator reflects every
//! binding's access), so one job can never change what a later job reads.

use std::collections::VecDeque;

use hashgrid_protocol::ContentId;

/// The resident set of one device.
pub(crate) struct Resident {
    budget: u64,
    used: u64,
    /// Most recently used last.
    entries: VecDeque<(ContentId, wgpu::Buffer, u64)>,
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

    /// The buffer holding blob `id`, marking it most recently used.
    pub(crate) fn get(&mut self, id: &ContentId) -> Option<wgpu::Buffer> {
        let i = self.entries.iter().position(|(k, _, _)| k == id)?;
        let e = self.entries.remove(i)?;
        let buf = e.1.clone();
        self.entries.push_back(e);
        Some(buf)
    }

    /// Keeps `buf` (holding blob `id`, `size` bytes), evicting the least recently used entries
    /// until it fits. A buffer larger than the whole budget is not kept.
    pub(crate) fn insert(&mut self, id: ContentId, buf: wgpu::Buffer, size: u64) {
        if size > self.budget || self.entries.iter().any(|(k, _, _)| *k == id) {
            return;
        }
        while self.used + size > self.budget {
            match self.entries.pop_front() {
                Some((_, _, s)) => self.used -= s,
                None => break,
            }
        }
        self.used += size;
        self.entries.push_back((id, buf, size));
    }
}
