//! Events a node reports to its handles ([`crate::NodeHandle::events`]).

use hashgrid_protocol::{OrderRef, PublicKey};
use libp2p::{Multiaddr, PeerId};

pub use crate::book::{OrderKind, RemoveReason};

/// Something that happened in the node.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum NodeEvent {
    /// The node listens on a new address (with `/p2p/<PeerId>`).
    Listening(Multiaddr),
    /// The first connection to a peer was established.
    PeerConnected(PeerId),
    /// The last connection to a peer closed.
    PeerDisconnected(PeerId),
    /// An order entered the book (from gossip, a sync response, or this node).
    OrderAdded {
        /// Ask or bid.
        kind: OrderKind,
        /// The order.
        order: OrderRef,
    },
    /// An order left the book.
    OrderRemoved {
        /// Ask or bid.
        kind: OrderKind,
        /// The order.
        order: OrderRef,
        /// Cancelled or expired.
        reason: RemoveReason,
    },
    /// A provider's capacity ad was added or replaced.
    CapacityUpdated(PublicKey),
    /// A job this node submitted changed state.
    Job(crate::jobs::JobUpdate),
    /// A running job this node submitted streamed its buffers (provisional until the
    /// receipt verifies: see [`crate::jobs::JobStream`]).
    JobStream(crate::jobs::JobStream),
    /// Something happened to a job this node serves as a provider.
    Provider(crate::jobs::ProviderEvent),
    /// A message was refused as invalid and its sender penalised.
    MessageRejected {
        /// The peer that sent it to us (not necessarily its author).
        from: PeerId,
        /// Why.
        reason: String,
    },
}
