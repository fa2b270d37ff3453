//! Buffers of finished jobs, kept for the next job that needs the same size and usage.
//!
//! A new buffer costs more than its allocation: on a CPU adapter (lavapipe) its memory is fresh
//! host memory, and the first write to each page faults (measured on the 2-core VM: a copy into
//! fresh memory runs at ~1.4 GB/s, into touched memory at ~10 GB/s). Reusing buffers makes a
//! job's upload a plain copy. A reused buffer never carries one job's bytes into another: the
//! device overwrites a reused input buffer entirely (its blob, then zeros) and clears every
//! other reused buffer before any pass runs.

use std::collections::VecDeque;

/// Idle buffers of one device, least recently returned first out, under a byte budget.
pub(crate) struct Pool {
    budget: u64,
    used: u64,
    /// (allocated size, usage, buffer); most recently returned last.
    idle: VecDeque<(u64, wgpu::BufferUsages, wgpu::Buffer)>,
}

impl Pool {
    /// An empty pool holding at most `budget` bytes (0 keeps nothing).
    pub(crate) fn new(budget: u64) -> Pool {
        Pool {
            budget,
            used: 0,
            idle: VecDeque::new(),
        }
    }

    /// An idle buffer of exactly `size` bytes and `usage`, taken out of the pool.
    pub(crate) fn take(&mut self, size: u64, usage: wgpu::BufferUsages) -> Option<wgpu::Buffer> {
        let i = self
            .idle
            .iter()
            .rposition(|(s, u, _)| *s == size && *u == usage)?;
        let (s, _, buf) = self.idle.remove(i)?;
        self.used -= s;
        Some(buf)
    }

    /// Whether an idle buffer of exactly `size` bytes and `usage` is here.
    pub(crate) fn holds(&self, size: u64, usage: wgpu::BufferUsages) -> bool {
        self.idle.iter().any(|(s, u, _)| *s == size && *u == usage)
    }

    /// Returns a buffer that no pending work uses, evicting the oldest idle buffers until it
    /// fits. A buffer larger than the whole budget is dropped.
    pub(crate) fn put(&mut self, size: u64, usage: wgpu::BufferUsages, buf: wgpu::Buffer) {
        if size > self.budget {
            return;
        }
        while self.used + size > self.budget {
            match self.idle.pop_front() {
                Some((s, _, _)) => self.used -= s,
                None => break,
            }
        }
        self.used += size;
        self.idle.push_back((size, usage, buf));
    }
}
