//! The provider's cache of input blobs (model weights, mostly), keyed by content id, so that a
//! model's weights cross the network once per provider rather than once per request.
//!
//! Two layers, both least-recently-used within a byte budget: the most recent blobs in memory
//! (no disk read, no re-hash), and, when the node has a data dir, every cached blob as a file
//! `<data dir>/inputs/<id>`, kept across restarts. A file is re-hashed when read: one that no
//! longer hashes to its name (a disk error, a hand edit) is deleted and the blob fetched again.
//! Only blobs of at least [`MIN_CACHED_BYTES`] are cached: small ones (a prompt, parameters)
//! cost less to fetch than to track.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hashgrid_protocol::ContentId;
use tracing::{debug, warn};

/// Smallest blob cached.
pub const MIN_CACHED_BYTES: usize = 64 * 1024;
/// Default bytes of blobs kept on disk: 8 GiB (a few 7B models at 4 bits).
pub const DEFAULT_DISK_BYTES: u64 = 8 << 30;
/// Default bytes of blobs kept in memory: 1 GiB.
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;

struct Entry {
    size: u64,
    used: u64,
    on_disk: bool,
    mem: Option<Arc<Vec<u8>>>,
}

#[derive(Default)]
struct State {
    entries: HashMap<ContentId, Entry>,
    tick: u64,
    disk_bytes: u64,
    mem_bytes: u64,
}

/// The input cache. Cheap to share (`Arc`); its methods block on disk I/O, so async callers
/// run them on the blocking pool.
pub struct InputCache {
    dir: Option<PathBuf>,
    disk_budget: u64,
    mem_budget: u64,
    state: Mutex<State>,
}

fn hash(bytes: &[u8]) -> ContentId {
    if bytes.len() < 1 << 20 {
        return ContentId::of(bytes);
    }
    let mut h = blake3::Hasher::new();
    h.update_rayon(bytes);
    ContentId::from(h.finalize())
}

impl InputCache {
    /// A cache in `dir` (created if missing; its files from an earlier run are indexed, oldest
    /// first) or memory only.
    pub fn open(dir: Option<&Path>, disk_budget: u64, mem_budget: u64) -> InputCache {
        let mut state = State::default();
        let dir = dir.map(Path::to_path_buf);
        if let Some(d) = &dir {
            if let Err(e) = std::fs::create_dir_all(d) {
                warn!(dir = %d.display(), error = %e, "cannot create the input cache; caching in memory only");
                return InputCache {
                    dir: None,
                    disk_budget: 0,
                    mem_budget,
                    state: Mutex::new(state),
                };
            }
            let mut found: Vec<(std::time::SystemTime, ContentId, u64)> = Vec::new();
            if let Ok(rd) = std::fs::read_dir(d) {
                for e in rd.flatten() {
                    let name = e.file_name();
                    let Some(id) = name.to_str().and_then(|n| n.parse::<ContentId>().ok()) else {
                        continue;
                    };
                    if let Ok(m) = e.metadata()
                        && m.is_file()
                    {
                        let t = m.modified().unwrap_or(std::time::UNIX_EPOCH);
                        found.push((t, id, m.len()));
                    }
                }
            }
            found.sort();
            for (_, id, size) in found {
                state.tick += 1;
                state.disk_bytes += size;
                state.entries.insert(
                    id,
                    Entry {
                        size,
                        used: state.tick,
                        on_disk: true,
                        mem: None,
                    },
                );
            }
        }
        let c = InputCache {
            dir,
            disk_budget,
            mem_budget,
            state: Mutex::new(state),
        };
        c.evict();
        c
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    fn path(&self, id: &ContentId) -> Option<PathBuf> {
        self.dir.as_ref().map(|d| d.join(id.to_string()))
    }

    /// The blob, if cached and intact (blocking: may read and hash a file). Shared, not
    /// copied: a copy of a model's weights costs more than the job's setup.
    pub fn get(&self, id: &ContentId) -> Option<Arc<Vec<u8>>> {
        {
            let mut s = self.lock();
            s.tick += 1;
            let tick = s.tick;
            let e = s.entries.get_mut(id)?;
            e.used = tick;
            if let Some(m) = &e.mem {
                return Some(m.clone());
            }
            if !e.on_disk {
                return None;
            }
        }
        let path = self.path(id)?;
        let bytes = match std::fs::read(&path) {
            Ok(b) if hash(&b) == *id => b,
            Ok(_) => {
                warn!(file = %path.display(), "a cached input no longer matches its id; deleting it");
                self.forget(id);
                return None;
            }
            Err(e) => {
                debug!(file = %path.display(), error = %e, "cached input unreadable");
                self.forget(id);
                return None;
            }
        };
        let shared = Arc::new(bytes);
        {
            let mut s = self.lock();
            let mut added = 0;
            if let Some(e) = s.entries.get_mut(id)
                && e.mem.is_none()
            {
                e.mem = Some(shared.clone());
                added = e.size;
            }
            s.mem_bytes += added;
        }
        self.evict();
        Some(shared)
    }

    /// Whether the blob is cached (without reading it).
    pub fn contains(&self, id: &ContentId) -> bool {
        self.lock().entries.contains_key(id)
    }

    /// Caches a blob that hashes to `id` (the caller checked), keeping `bytes` itself in
    /// memory. Blocking: writes a file.
    pub fn put(&self, id: ContentId, bytes: Arc<Vec<u8>>) {
        if bytes.len() < MIN_CACHED_BYTES || self.contains(&id) {
            return;
        }
        let size = bytes.len() as u64;
        let mut on_disk = false;
        if let Some(path) = self.path(&id)
            && size <= self.disk_budget
        {
            // Written under a temporary name and renamed: a crash leaves no partial blob.
            let tmp = path.with_extension("part");
            match std::fs::write(&tmp, bytes.as_slice()).and_then(|()| std::fs::rename(&tmp, &path))
            {
                Ok(()) => on_disk = true,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    warn!(file = %path.display(), error = %e, "cannot cache an input on disk");
                }
            }
        }
        let mem = (size <= self.mem_budget).then_some(bytes);
        if !on_disk && mem.is_none() {
            return;
        }
        {
            let mut s = self.lock();
            s.tick += 1;
            let tick = s.tick;
            if on_disk {
                s.disk_bytes += size;
            }
            if mem.is_some() {
                s.mem_bytes += size;
            }
            s.entries.insert(
                id,
                Entry {
                    size,
                    used: tick,
                    on_disk,
                    mem,
                },
            );
        }
        self.evict();
    }

    fn forget(&self, id: &ContentId) {
        let mut s = self.lock();
        if let Some(e) = s.entries.remove(id) {
            if e.on_disk {
                s.disk_bytes -= e.size;
            }
            if e.mem.is_some() {
                s.mem_bytes -= e.size;
            }
        }
        drop(s);
        if let Some(p) = self.path(id) {
            let _ = std::fs::remove_file(p);
        }
    }

    /// Drops least recently used blobs until both layers fit their budgets.
    fn evict(&self) {
        let mut gone = Vec::new();
        {
            let mut s = self.lock();
            let mut order: Vec<(u64, ContentId)> =
                s.entries.iter().map(|(id, e)| (e.used, *id)).collect();
            order.sort();
            for (_, id) in order {
                if s.mem_bytes <= self.mem_budget && s.disk_bytes <= self.disk_budget {
                    break;
                }
                let (over_mem, over_disk) = (
                    s.mem_bytes > self.mem_budget,
                    s.disk_bytes > self.disk_budget,
                );
                let Some(e) = s.entries.get_mut(&id) else {
                    continue;
                };
                let size = e.size;
                let mut freed_mem = false;
                let mut freed_disk = false;
                if over_mem && e.mem.is_some() {
                    e.mem = None;
                    freed_mem = true;
                }
                if over_disk && e.on_disk {
                    e.on_disk = false;
                    freed_disk = true;
                    gone.push(id);
                }
                let empty = e.mem.is_none() && !e.on_disk;
                if freed_mem {
                    s.mem_bytes -= size;
                }
                if freed_disk {
                    s.disk_bytes -= size;
                }
                if empty {
                    s.entries.remove(&id);
                }
            }
        }
        for id in gone {
            if let Some(p) = self.path(&id) {
                let _ = std::fs::remove_file(p);
            }
        }
    }

    /// Ids cached, most recently used first.
    pub fn ids(&self) -> Vec<ContentId> {
        let s = self.lock();
        let mut v: Vec<(u64, ContentId)> = s.entries.iter().map(|(id, e)| (e.used, *id)).collect();
        v.sort_by(|a, b| b.cmp(a));
        v.into_iter().map(|(_, id)| id).collect()
    }

    /// Bytes cached (on disk, in memory).
    pub fn bytes(&self) -> (u64, u64) {
        let s = self.lock();
        (s.disk_bytes, s.mem_bytes)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn blob(n: usize, seed: u8) -> (ContentId, Vec<u8>) {
        let b: Vec<u8> = (0..n).map(|i| (i as u8).wrapping_mul(31) ^ seed).collect();
        (ContentId::of(&b), b)
    }

    #[test]
    fn blobs_survive_a_restart_and_corrupt_files_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let (a, ab) = blob(100_000, 1);
        let (b, bb) = blob(100_000, 2);
        {
            let c = InputCache::open(Some(dir.path()), 1 << 30, 1 << 30);
            c.put(a, Arc::new(ab.clone()));
            c.put(b, Arc::new(bb.clone()));
            assert_eq!(*c.get(&a).unwrap(), ab);
        }
        // A new process: the files are indexed and read back.
        let c = InputCache::open(Some(dir.path()), 1 << 30, 1 << 30);
        assert_eq!(*c.get(&a).unwrap(), ab);
        // A file that no longer matches its name is deleted, not served.
        std::fs::write(dir.path().join(b.to_string()), b"garbage").unwrap();
        assert!(c.get(&b).is_none());
        assert!(!dir.path().join(b.to_string()).exists());
        assert!(!c.contains(&b));
    }

    #[test]
    fn least_recently_used_blobs_go_first_and_small_ones_are_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let c = InputCache::open(Some(dir.path()), 250_000, 150_000);
        let (a, ab) = blob(100_000, 1);
        let (b, bb) = blob(100_000, 2);
        let (x, xb) = blob(100_000, 3);
        c.put(a, Arc::new(ab.clone()));
        c.put(b, Arc::new(bb.clone()));
        c.get(&a).unwrap(); // a is now more recent than b
        c.put(x, Arc::new(xb.clone()));
        // Disk holds two of three: b, the least recently used, went.
        assert!(c.contains(&a) && c.contains(&x) && !c.contains(&b));
        assert!(!dir.path().join(b.to_string()).exists());
        let (disk, mem) = c.bytes();
        assert!(disk <= 250_000 && mem <= 150_000, "{disk} {mem}");
        let (s, sb) = blob(1000, 4);
        c.put(s, Arc::new(sb.clone()));
        assert!(!c.contains(&s));
        // Memory only (no data dir) works within its budget.
        let m = InputCache::open(None, 0, 150_000);
        m.put(a, Arc::new(ab.clone()));
        m.put(b, Arc::new(bb.clone()));
        assert!(!m.contains(&a) && *m.get(&b).unwrap() == bb);
    }
}
