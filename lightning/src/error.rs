//! Errors of the Lightning layer.

use crate::invoice::InvoiceError;

/// Why a Lightning operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LnError {
    /// The seed file cannot be used (missing directory, wrong size, readable by others).
    #[error("lightning seed {path}: {reason}")]
    Seed {
        /// The file.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// The node could not be built or started (bad config, unreadable state, port in use).
    #[error("lightning node could not start: {0}")]
    Start(String),
    /// An invoice did not pass the buyer's checks; nothing was paid.
    #[error("invoice refused: {0}")]
    Invoice(#[from] InvoiceError),
    /// The node refused or failed an operation (no route, not enough liquidity, peer offline,
    /// chain source unreachable).
    #[error("lightning {op} failed: {reason}")]
    Node {
        /// The operation.
        op: &'static str,
        /// ldk-node's reason.
        reason: String,
    },
    /// No channel with this id and peer.
    #[error("no channel {0}")]
    UnknownChannel(String),
    /// A peer address that does not parse (`NODE_ID@HOST:PORT`).
    #[error("bad peer address {0:?}: expected NODE_ID@HOST:PORT")]
    BadPeer(String),
}

impl LnError {
    pub(crate) fn node(op: &'static str, e: impl std::fmt::Display) -> LnError {
        LnError::Node {
            op,
            reason: e.to_string(),
        }
    }
}
