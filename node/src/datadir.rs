//! The node's data directory: where its identity, store and caches live.

use std::path::{Path, PathBuf};

use hashgrid_protocol::{KeyFileError, Keypair};

/// The layout of a node's data directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    /// A data dir rooted at `root` (created on first use).
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    /// The default: `$XDG_DATA_HOME/hashgrid`, else `$HOME/.local/share/hashgrid`, else
    /// `./hashgrid-data`.
    pub fn default_root() -> PathBuf {
        if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(x).join("hashgrid");
        }
        if let Some(h) = std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            return PathBuf::from(h).join(".local/share/hashgrid");
        }
        PathBuf::from("hashgrid-data")
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The node's ed25519 secret key (32 bytes, mode 0600).
    pub fn identity_path(&self) -> PathBuf {
        self.root.join("identity.key")
    }

    /// The executor's benchmark cache: JSON, adapter key -> measured benchmark.
    pub fn bench_cache_path(&self) -> PathBuf {
        self.root.join("bench-cache.json")
    }

    /// Loads the node's key, creating it (and the data dir) on first start.
    pub fn load_or_create_identity(&self) -> Result<Keypair, KeyFileError> {
        Keypair::load_or_generate(&self.identity_path())
    }
}
