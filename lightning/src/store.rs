//! ldk-node's SQLite store, watched: every completed write of the channel manager is counted,
//! so that [`crate::LdkBackend::pay`] can return only once the manager that knows of the new
//! payment is on disk.
//!
//! Why: ldk-node persists a channel's monitor before it sends each update, but the channel
//! manager a moment later from a background task. A process killed in between restarts with a
//! manager older than its monitors, and LDK then force-closes the channel. Waiting for the next
//! manager write after a payment is sent closes that window for the moment a caller records the
//! payment as made (the later round trips of the same payment still have short ones).

use ldk_node::bitcoin::io;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ldk_node::io::sqlite_store::SqliteStore;
use ldk_node::lightning::util::async_poll::AsyncResult;
use ldk_node::lightning::util::persist::{
    CHANNEL_MANAGER_PERSISTENCE_KEY, CHANNEL_MANAGER_PERSISTENCE_PRIMARY_NAMESPACE,
    CHANNEL_MANAGER_PERSISTENCE_SECONDARY_NAMESPACE, KVStore, KVStoreSync,
};

/// Counts completed channel-manager writes.
#[derive(Debug, Default)]
pub(crate) struct ManagerWrites {
    count: Mutex<u64>,
    changed: Condvar,
}

impl ManagerWrites {
    fn lock(&self) -> std::sync::MutexGuard<'_, u64> {
        self.count.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Writes so far.
    pub(crate) fn count(&self) -> u64 {
        *self.lock()
    }

    fn bump(&self) {
        *self.lock() += 1;
        self.changed.notify_all();
    }

    /// Waits until more than `seen` writes completed, at most `limit`; whether they did.
    pub(crate) fn wait_past(&self, seen: u64, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut n = self.lock();
        while *n <= seen {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            n = self
                .changed
                .wait_timeout(n, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

/// The SQLite store ldk-node would build for itself (same file and table), with manager
/// writes counted.
pub(crate) struct WatchedStore {
    inner: Arc<SqliteStore>,
    writes: Arc<ManagerWrites>,
}

impl WatchedStore {
    pub(crate) fn open(
        dir: &std::path::Path,
    ) -> std::io::Result<(WatchedStore, Arc<ManagerWrites>)> {
        std::fs::create_dir_all(dir)?;
        let inner = SqliteStore::new(
            dir.to_path_buf(),
            Some(ldk_node::io::sqlite_store::SQLITE_DB_FILE_NAME.to_string()),
            Some(ldk_node::io::sqlite_store::KV_TABLE_NAME.to_string()),
        )?;
        let writes = Arc::new(ManagerWrites::default());
        Ok((
            WatchedStore {
                inner: Arc::new(inner),
                writes: writes.clone(),
            },
            writes,
        ))
    }
}

fn is_manager(primary: &str, secondary: &str, key: &str) -> bool {
    primary == CHANNEL_MANAGER_PERSISTENCE_PRIMARY_NAMESPACE
        && secondary == CHANNEL_MANAGER_PERSISTENCE_SECONDARY_NAMESPACE
        && key == CHANNEL_MANAGER_PERSISTENCE_KEY
}

impl KVStoreSync for WatchedStore {
    fn read(&self, primary: &str, secondary: &str, key: &str) -> io::Result<Vec<u8>> {
        KVStoreSync::read(&*self.inner, primary, secondary, key)
    }

    fn write(&self, primary: &str, secondary: &str, key: &str, buf: Vec<u8>) -> io::Result<()> {
        KVStoreSync::write(&*self.inner, primary, secondary, key, buf)?;
        if is_manager(primary, secondary, key) {
            self.writes.bump();
        }
        Ok(())
    }

    fn remove(&self, primary: &str, secondary: &str, key: &str, lazy: bool) -> io::Result<()> {
        KVStoreSync::remove(&*self.inner, primary, secondary, key, lazy)
    }

    fn list(&self, primary: &str, secondary: &str) -> io::Result<Vec<String>> {
        KVStoreSync::list(&*self.inner, primary, secondary)
    }
}

impl KVStore for WatchedStore {
    fn read(
        &self,
        primary: &str,
        secondary: &str,
        key: &str,
    ) -> AsyncResult<'static, Vec<u8>, io::Error> {
        KVStore::read(&*self.inner, primary, secondary, key)
    }

    fn write(
        &self,
        primary: &str,
        secondary: &str,
        key: &str,
        buf: Vec<u8>,
    ) -> AsyncResult<'static, (), io::Error> {
        let write = KVStore::write(&*self.inner, primary, secondary, key, buf);
        let watch = is_manager(primary, secondary, key).then(|| self.writes.clone());
        Box::pin(async move {
            write.await?;
            if let Some(w) = watch {
                w.bump();
            }
            Ok(())
        })
    }

    fn remove(
        &self,
        primary: &str,
        secondary: &str,
        key: &str,
        lazy: bool,
    ) -> AsyncResult<'static, (), io::Error> {
        KVStore::remove(&*self.inner, primary, secondary, key, lazy)
    }

    fn list(&self, primary: &str, secondary: &str) -> AsyncResult<'static, Vec<String>, io::Error> {
        KVStore::list(&*self.inner, primary, secondary)
    }
}
