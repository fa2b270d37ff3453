//! The node's errors: one enum per operation.

use libp2p::Multiaddr;

use crate::store::StoreError;

/// Starting a node failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The identity key could not be loaded or created.
    #[error(transparent)]
    Identity(#[from] hashgrid_protocol::KeyFileError),
    /// The store could not be opened.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The address is already in use.
    #[error(
        "{addr}: address already in use: pass --listen with another port (or stop the other process)"
    )]
    AddrInUse {
        /// The address.
        addr: Multiaddr,
    },
    /// Listening failed for another reason.
    #[error(
        "cannot listen on {addr}: {reason}: pass --listen with an address of this host, e.g. /ip4/0.0.0.0/tcp/4001"
    )]
    Listen {
        /// The address.
        addr: Multiaddr,
        /// Why.
        reason: String,
    },
    /// No listener reported an address in time.
    #[error("no listen address came up within {0:?}: check the --listen addresses")]
    ListenTimeout(std::time::Duration),
    /// The libp2p stack could not be built.
    #[error("network setup failed: {0}")]
    Network(String),
    /// A setting is invalid.
    #[error("invalid setting: {0}")]
    Config(String),
}

/// A request to a running node failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NodeError {
    /// The node has stopped (shut down, or its task ended).
    #[error("the node has stopped; start a new one")]
    Stopped,
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The order is not one of this node's live orders.
    #[error("order {0} is not a live order of this node")]
    UnknownOrder(u64),
    /// The order is invalid.
    #[error("invalid order: {0}")]
    InvalidOrder(String),
    /// This node holds too many orders of its own.
    #[error("this node already has {0} live orders; cancel some first")]
    TooManyOrders(usize),
    /// Publishing raw bytes failed (testing hook).
    #[error("publish failed: {0}")]
    Publish(String),
    /// The job is invalid (checked before any network traffic).
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// No job with this id was submitted by this node.
    #[error("no job {0} in this node's store")]
    UnknownJob(hashgrid_protocol::ContentId),
    /// A request to a peer failed (testing hooks).
    #[error("request failed: {0}")]
    Request(String),
    /// Dialling failed.
    #[error("dial failed: {0}")]
    Dial(String),
}
