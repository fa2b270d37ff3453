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

/// The longest prefix of `messages` whose [`SyncResponse`] encodes within
/// [`super::MAX_SYNC_RESPONSE_BYTES`] (the rest would make the response one the peer refuses).
pub fn fit(mut messages: Vec<GossipMessage>) -> Vec<GossipMessage> {
    // The vector's length prefix is at most 5 bytes; a message's encoding is its own size.
    let mut used = 5usize;
    let mut keep = 0usize;
    for m in &messages {
        let len = postcard::to_stdvec(m)
            .map(|b| b.len())
            .unwrap_or(usize::MAX);
        if used.saturating_add(len) > super::MAX_SYNC_RESPONSE_BYTES as usize {
            break;
        }
        used += len;
        keep += 1;
    }
    messages.truncate(keep);
    messages
}

#[cfg(test)]
mod tests {
    use super::*;
    use hashgrid_protocol::{
        Ask, Backend, Benchmark, DeviceType, GpuLimits, GpuProfile, Keypair, Msat, Network, Signed,
        Timestamp,
    };

    fn ask(key: &Keypair, order_id: u64, region_len: usize) -> GossipMessage {
        let ask = Ask {
            provider: key.public(),
            order_id,
            seq: 1,
            units: 1,
            price: Msat(100),
            gpu: GpuProfile {
                name: "gpu".into(),
                vendor: 0,
                device: 0,
                backend: Backend::Vulkan,
                device_type: DeviceType::DiscreteGpu,
                driver: "d".into(),
                memory_bytes: 1 << 30,
                limits: GpuLimits::default(),
                bench: Benchmark {
                    matmul_mflops: 1,
                    copy_mbps: 1,
                },
            },
            region: "r".repeat(region_len),
            max_seconds: 60,
            created_at: Timestamp(0),
            expires_at: Timestamp(1),
        };
        GossipMessage::Ask(Signed::sign(key, &Network::test(), &ask))
    }

    #[test]
    fn a_sync_response_keeps_what_fits_one_message() {
        let key = Keypair::from_secret_bytes([7; 32]);
        // Small books go whole.
        let small: Vec<_> = (0..10).map(|i| ask(&key, i, 8)).collect();
        assert_eq!(fit(small.clone()).len(), 10);
        // 4000 messages of ~1 KiB do not fit: the response keeps a prefix that encodes within
        // the limit, and one more message would not.
        let big: Vec<_> = (0..4000).map(|i| ask(&key, i, 800)).collect();
        let kept = fit(big.clone());
        assert!(kept.len() > 500 && kept.len() < 4000, "{}", kept.len());
        assert_eq!(kept[..], big[..kept.len()]);
        let len = |m: Vec<GossipMessage>| {
            postcard::to_stdvec(&SyncResponse { messages: m })
                .unwrap()
                .len()
        };
        assert!(len(kept.clone()) <= super::super::MAX_SYNC_RESPONSE_BYTES as usize);
        assert!(len(big[..=kept.len()].to_vec()) > super::super::MAX_SYNC_RESPONSE_BYTES as usize);
    }
}
