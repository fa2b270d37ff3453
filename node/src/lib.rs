//! # hashgrid-node
//!
//! The node library that the `hashgrid-node` site daemon and the `hashgrid` buyer CLI are thin
//! wrappers around. Today it holds the data-dir layout and identity handling; the network
//! (issue 5), executor (issue 3), job lifecycle (issue 6) and wallet (issue 8) are built on it.
//!
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let paths = hashgrid_node::DataDir::new(dir.path());
//! let key = paths.load_or_create_identity().unwrap();
//! // The same key again on the next start: the PeerId is stable.
//! assert_eq!(paths.load_or_create_identity().unwrap().peer_id(), key.peer_id());
//! ```

pub mod datadir;
pub mod executor;

pub use datadir::DataDir;
pub use executor::{ExecConfig, ExecError, Executor, JobOutput};
