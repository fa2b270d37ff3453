//! The provider's cache of input blobs (model weights, mostly), keyed by content id, so that a
//! model's weights cross the network once per provider rather than once per request.
//!
//! Two layers, both least-recently-used within a byte budget: the most recent blobs in memory
//! (no disk read, no re-hash), and, when the node has a data dir, every cached blob as a file
//! `<data dir>/inputs/<id>`, kept across restarts. A file is re-hashed when read: one that no
//! longer hashes to its name (a disk error, a hand edit) is deleted and the blob fetched again.
//! Only blobs of at least [`MIN_CACHED_BYTES`] are cached: small ones (a prompt, parameters)
//! cost less to fetch than to track.
//!
//! Beside the blobs, the cache keeps the **manifests of the models** it has been told about
//! (by a dispatch that names its model, or by a site's preload): a model whose every blob of
//! at least [`MIN_CACHED_BYTES`] is cached is *held*, and its id goes into the capacity ad
//! instead of its blobs' ids. Manifests are files `<data dir>/inputs/models/<model id>`
//! (postcard, re-hashed when read), at most [`MAX_KNOWN_MODELS`] of them.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use hashgrid_protocol::{ContentId, ModelManifest};
use tracing::{debug, warn};

/// Smallest blob cached.
pub const MIN_CACHED_BYTES: usize = 64 * 1024;
/// Default bytes of blobs kept on disk: 8 GiB (a few 7B models at 4 bits).
pub const DEFAULT_DISK_BYTES: u64 = 8 << 30;
/// Default bytes of blobs kept in memory: 1 GiB.
pub const DEFAULT_MEMORY_BYTES: u64 = 1 << 30;
/// Most model manifests kept: past it, the ones with the fewest blobs held go first.
pub const MAX_KNOWN_MODELS: usize = 256;
/// Largest manifest file read back (a manifest of the most blobs is about 11 KiB).
const MAX_MANIFEST_FILE: u64 = 64 * 1024;

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
    /// Known model manifests by model id.
    models: HashMap<ContentId, ModelManifest>,
}

impl State {
    /// Whether every blob of `m` that the cache would keep is cached.
    fn holds(&self, m: &ModelManifest) -> bool {
        m.blobs
            .iter()
            .filter(|b| b.len >= MIN_CACHED_BYTES as u64)
            .all(|b| self.entries.contains_key(&b.id))
    }

    /// Blobs of `m` cached.
    fn held_blobs(&self, m: &ModelManifest) -> usize {
        m.blobs
            .iter()
            .filter(|b| self.entries.contains_key(&b.id))
            .count()
    }

    /// When `m` was last used: its most recently used cached blob.
    fn last_used(&self, m: &ModelManifest) -> u64 {
        m.blobs
            .iter()
            .filter_map(|b| self.entries.get(&b.id).map(|e| e.used))
            .max()
            .unwrap_or(0)
    }
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
        if let Some(d) = &dir {
            state.models = read_manifests(&d.join("models"));
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

    fn manifest_path(&self, model: &ContentId) -> Option<PathBuf> {
        self.dir
            .as_ref()
            .map(|d| d.join("models").join(model.to_string()))
    }

    /// Remembers `manifest` (the caller checked it) so that the model is listed as held once
    /// its blobs are cached; kept across restarts with a data dir. Blocking: writes a file.
    pub fn learn_model(&self, manifest: ModelManifest) {
        let id = manifest.id();
        let mut dropped = Vec::new();
        {
            let mut s = self.lock();
            if s.models.contains_key(&id) {
                return;
            }
            s.models.insert(id, manifest.clone());
            while s.models.len() > MAX_KNOWN_MODELS {
                // The model holding the fewest blobs goes (not the one just learned).
                let Some(worst) = s
                    .models
                    .iter()
                    .filter(|(m, _)| **m != id)
                    .min_by_key(|(m, man)| (s.held_blobs(man), s.last_used(man), **m))
                    .map(|(m, _)| *m)
                else {
                    break;
                };
                s.models.remove(&worst);
                dropped.push(worst);
            }
        }
        for m in dropped {
            if let Some(p) = self.manifest_path(&m) {
                let _ = std::fs::remove_file(p);
            }
        }
        if let Some(path) = self.manifest_path(&id) {
            let bytes = hashgrid_protocol::codec::encode(&manifest);
            let tmp = path.with_extension("part");
            let written = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| std::fs::write(&tmp, &bytes))
                .and_then(|()| std::fs::rename(&tmp, &path));
            if let Err(e) = written {
                let _ = std::fs::remove_file(&tmp);
                warn!(file = %path.display(), error = %e, "cannot keep a model manifest on disk");
            }
        }
    }

    /// The manifest of `model`, if known.
    pub fn manifest(&self, model: &ContentId) -> Option<ModelManifest> {
        self.lock().models.get(model).cloned()
    }

    /// Ids of the models held (every blob the cache keeps is cached), most recently used
    /// first.
    pub fn held_models(&self) -> Vec<(ContentId, ModelManifest)> {
        let s = self.lock();
        let mut v: Vec<(u64, ContentId, &ModelManifest)> = s
            .models
            .iter()
            .filter(|(_, m)| s.holds(m))
            .map(|(id, m)| (s.last_used(m), *id, m))
            .collect();
        v.sort_by_key(|e| std::cmp::Reverse((e.0, e.1)));
        v.into_iter().map(|(_, id, m)| (id, m.clone())).collect()
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

/// The manifests under `dir`: a file that is too large, undecodable, invalid or not named by
/// its manifest's id is deleted.
fn read_manifests(dir: &Path) -> HashMap<ContentId, ModelManifest> {
    let mut out = HashMap::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.flatten() {
        let path = e.path();
        let Some(id) = e
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<ContentId>().ok())
        else {
            continue;
        };
        let read = match e.metadata() {
            Ok(m) if m.is_file() && m.len() <= MAX_MANIFEST_FILE => std::fs::read(&path).ok(),
            _ => None,
        };
        let manifest = read
            .and_then(|b| {
                hashgrid_protocol::codec::decode::<ModelManifest>(
                    &b,
                    MAX_MANIFEST_FILE as usize,
                    "model manifest",
                )
                .ok()
            })
            .filter(|m| m.validate().is_ok() && m.id() == id);
        match manifest {
            Some(m) if out.len() < MAX_KNOWN_MODELS => {
                out.insert(id, m);
            }
            _ => {
                warn!(file = %path.display(), "dropping a damaged or surplus model manifest");
                let _ = std::fs::remove_file(&path);
            }
        }
    }
    out
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
    fn a_model_is_held_once_its_large_blobs_are_cached_and_its_manifest_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let (a, ab) = blob(100_000, 1);
        let (b, bb) = blob(100_000, 2);
        let (small, sb) = blob(1000, 3); // too small to cache: travels inline
        let m = ModelManifest::new([(a, 100_000), (b, 100_000), (small, 1000)]);
        let id = m.id();
        {
            let c = InputCache::open(Some(dir.path()), 1 << 30, 1 << 30);
            c.learn_model(m.clone());
            c.put(a, Arc::new(ab.clone()));
            assert!(
                c.held_models().is_empty(),
                "half the weights are not the model"
            );
            c.put(b, Arc::new(bb.clone()));
            c.put(small, Arc::new(sb));
            assert_eq!(c.held_models(), vec![(id, m.clone())]);
        }
        // A new process: the manifest and the blobs are read back.
        let c = InputCache::open(Some(dir.path()), 1 << 30, 1 << 30);
        assert_eq!(c.held_models(), vec![(id, m.clone())]);
        // A blob lost: the model is no longer held, but still known.
        std::fs::write(dir.path().join(b.to_string()), b"garbage").unwrap();
        assert!(c.get(&b).is_none());
        assert!(c.held_models().is_empty());
        assert_eq!(c.manifest(&id), Some(m.clone()));
        // A damaged manifest file is dropped at the next start, not believed.
        let path = dir.path().join("models").join(id.to_string());
        std::fs::write(&path, b"\xff\xff\xff").unwrap();
        let c = InputCache::open(Some(dir.path()), 1 << 30, 1 << 30);
        assert_eq!(c.manifest(&id), None);
        assert!(!path.exists());
        // A manifest filed under another model's id is dropped too.
        let other = ModelManifest::new([(a, 100_000)]);
        std::fs::write(&path, hashgrid_protocol::codec::encode(&other)).unwrap();
        let c = InputCache::open(Some(dir.path()), 1 << 30, 1 << 30);
        assert_eq!(c.manifest(&id), None);
    }

    #[test]
    fn the_known_models_are_bounded_and_the_emptiest_go_first() {
        let c = InputCache::open(None, 0, 1 << 30);
        let (a, ab) = blob(100_000, 1);
        c.put(a, Arc::new(ab));
        let held = ModelManifest::new([(a, 100_000)]);
        c.learn_model(held.clone());
        for i in 0..MAX_KNOWN_MODELS as u64 {
            let mut id = [7u8; 32];
            id[..8].copy_from_slice(&i.to_le_bytes());
            c.learn_model(ModelManifest::new([(ContentId(id), 100_000)]));
        }
        assert_eq!(c.lock().models.len(), MAX_KNOWN_MODELS);
        assert_eq!(c.held_models(), vec![(held.id(), held)]);
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
