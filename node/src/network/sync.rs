//! The `/hashgrid/sync/1` wire format: a postcard-encoded [`SyncRequest`] answered by a
//! postcard-encoded [`SyncResponse`], each read up to its size limit and then decoded. The
//! messages inside are signed gossip messages that the receiver re-verifies one by one.

use serde::{Deserialize, Serialize};

use hashgrid_protocol::GossipMessage;

/// A request for the peer's current book.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncRequest {
    /// Most messages wanted (the responder caps it at [`super::MAX_SYNC_MESSAGES`]).
    pub max: u32,
}

/// The signed messages a peer holds; each is re-verified on receipt like gossip.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SyncResponse {
    /// Capacity ads, asks and bids, as their authors signed them.
    pub messages: Vec<GossipMessage>,
}

/// The postcard codec of `/hashgrid/sync/1`.
pub type SyncCodec = super::exchange::ExchangeCodec<
    SyncRequest,
    SyncResponse,
    { super::MAX_SYNC_REQUEST_BYTES as usize },
    { super::MAX_SYNC_RESPONSE_BYTES as usize },
>;
