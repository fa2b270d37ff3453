//! The swarm task's state ([`NodeLoop`]); its behaviour is in `run`, `commands`, `gossip` and `swarm`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use hashgrid_protocol::{CapacityAd, GossipMessage, Keypair, Network, PublicKey};
use libp2p::gossipsub::IdentTopic;
use libp2p::{Multiaddr, PeerId, Swarm};
use tokio::sync::{broadcast, mpsc};

use crate::event::NodeEvent;
use crate::jobs::service::{ProviderRequest, Response};
use crate::network::Behaviour;
use crate::network::validate::Validator;
use crate::settle::Settlement;
use crate::store::{OwnOrder, Store, StoreSlot};
use hashgrid_market::GossipBook;
use hashgrid_protocol::ContentId;
use hashgrid_protocol::exchange::{BlobReply, JobReply, NegotiateReply, SettleReply};

use super::builder::NodeBuilder;
use super::command::{Command, Pending};

pub(super) struct NodeLoop {
    pub(super) swarm: Swarm<Behaviour>,
    pub(super) key: Keypair,
    pub(super) public: PublicKey,
    pub(super) peer_id: PeerId,
    pub(super) network: Network,
    pub(super) store: Store,
    pub(super) book: GossipBook,
    pub(super) validator: Validator,
    pub(super) own: HashMap<u64, OwnOrder>,
    /// Own orders stored and waiting for their flush before they are kept and announced.
    pub(super) placing: usize,
    /// Own messages whose publish failed, retried every [`PUBLISH_RETRY_INTERVAL`].
    pub(super) unpublished: Vec<GossipMessage>,
    pub(super) capacity_topic: IdentTopic,
    pub(super) orders_topic: IdentTopic,
    pub(super) events: broadcast::Sender<NodeEvent>,
    pub(super) listen_addrs: Vec<Multiaddr>,
    /// Peers whose book was requested during their current connection.
    pub(super) synced: HashSet<PeerId>,
    /// Invalid messages each connected peer put in its sync responses (feeds the P5
    /// application score; forgotten when the peer disconnects).
    pub(super) bad_sync: HashMap<PeerId, u32>,
    /// Extra, unchecked messages served in sync responses (testing hook).
    #[cfg(feature = "testing")]
    pub(super) serve_in_sync: Vec<GossipMessage>,
    /// The provider service's request queue (`None` once the node stops).
    pub(super) provider: Option<mpsc::Sender<ProviderRequest>>,
    /// The provider service's answers (and settlement requests'), for the swarm task to send.
    pub(super) responses: mpsc::Receiver<Response>,
    /// For settlement requests answered on the blocking pool.
    pub(super) responses_tx: mpsc::Sender<Response>,
    /// This node's experience of each provider (ranks its jobs among equal prices).
    pub(super) reputation: Arc<crate::jobs::reputation::Reputations>,
    /// Completes once the provider service has stopped.
    pub(super) provider_done: Option<tokio::sync::oneshot::Receiver<()>>,
    /// The provider's input cache (its ids are the capacity ad's warm list).
    pub(super) inputs: Arc<crate::jobs::cache::InputCache>,
    /// The warm list last announced.
    pub(super) warm_announced: Warm,
    /// Weak, so the node still stops when the last handle is dropped.
    pub(super) cmd_weak: mpsc::WeakSender<Command>,
    /// Callers waiting for the answers to this node's outbound requests.
    pub(super) pending_negotiate: Pending<NegotiateReply>,
    pub(super) pending_job: Pending<JobReply>,
    pub(super) pending_blob: Pending<BlobReply>,
    pub(super) pending_settle: Pending<SettleReply>,
    /// Settlement (ledger, invoices, wallets).
    pub(super) settlement: Arc<Settlement>,
    /// The running settlement pass.
    pub(super) settle_task: Option<tokio::task::JoinHandle<()>>,
    /// Input blobs this node (as a buyer) serves, and the provider allowed to fetch each.
    pub(super) served: HashMap<ContentId, Arc<Vec<u8>>>,
    /// Which provider may fetch which served blob, per job.
    pub(super) served_to: crate::jobs::BlobHolders,
    /// Providers that failed this node's jobs, and until when they are avoided.
    pub(super) down: HashMap<PublicKey, tokio::time::Instant>,
    /// The handles' view of the store, closed at shutdown.
    pub(super) slot: Option<StoreSlot>,
    /// When the bootstrap peers are dialled again while this node has no peer.
    pub(super) redial: Redial,
    /// How late the swarm task polls (its stalls).
    pub(super) lag: std::sync::Arc<super::lag::LoopLag>,
    /// Counters for Prometheus (gossip outcomes, refusals, libp2p's own).
    pub(super) metrics: Arc<crate::ops::Metrics>,
    pub(super) settings: NodeBuilder,
}

/// Dialling the bootstrap peers and the peers met before (the store's, as at start) again
/// while a node has no connection at all (the first dials failed: the peers were restarting,
/// a handshake timed out on a loaded host), backing off from [`REDIAL_FIRST`] to
/// [`REDIAL_MAX`]. Without it a node whose first dials failed would stay alone until
/// something dialled it.
pub(super) struct Redial {
    pub(super) next: tokio::time::Instant,
    pub(super) backoff: Duration,
}

/// First wait before dialling the bootstrap and known peers again.
pub const REDIAL_FIRST: Duration = Duration::from_secs(1);

/// Longest wait between dials of the bootstrap and known peers by a node that has no peer.
pub const REDIAL_MAX: Duration = Duration::from_secs(60);

impl Default for Redial {
    fn default() -> Self {
        Redial {
            next: tokio::time::Instant::now() + REDIAL_FIRST,
            backoff: REDIAL_FIRST,
        }
    }
}

/// What a queued own message is about: the ad, an order id, or one piece of evidence (by
/// its id). Cancels share the order's key, so a queued re-announcement never follows its
/// cancel.
pub(super) fn queue_key(msg: &GossipMessage) -> (u8, Option<u64>) {
    match msg {
        GossipMessage::Capacity(_) => (0, None),
        GossipMessage::Ask(s) => (1, s.decode_unverified().ok().map(|a| a.order_id)),
        GossipMessage::Bid(s) => (1, s.decode_unverified().ok().map(|b| b.order_id)),
        GossipMessage::Cancel(s) => (1, s.decode_unverified().ok().map(|c| c.order_id)),
        GossipMessage::Evidence(s) => {
            let id = s.id();
            (2, id.0.first_chunk().map(|b| u64::from_le_bytes(*b)))
        }
    }
}

pub(super) fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// What a capacity ad says the provider holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Warm {
    /// Models held in full.
    pub(super) models: Vec<ContentId>,
    /// Cached blobs outside those models.
    pub(super) blobs: Vec<ContentId>,
}

/// What each provider holds of one job's inputs, from its capacity ad: the blobs it lists as
/// warm, and every blob of the bid's model when it lists that model.
pub(super) struct WarmInputs<'a> {
    pub(super) book: &'a GossipBook,
    pub(super) inputs: &'a [(ContentId, u64)],
    pub(super) total: u64,
    /// The bid's model and which of the inputs are its blobs.
    pub(super) model: Option<(ContentId, &'a [ContentId])>,
}

impl WarmInputs<'_> {
    /// The job's inputs that `ad`'s provider holds.
    pub(super) fn held_inputs<'s>(
        &'s self,
        ad: &'s CapacityAd,
    ) -> impl Iterator<Item = &'s (ContentId, u64)> + 's {
        let model_blobs = match self.model {
            Some((m, blobs)) if ad.models.contains(&m) => blobs,
            _ => &[],
        };
        let warm: std::collections::HashSet<&ContentId> =
            ad.warm.iter().chain(model_blobs).collect();
        self.inputs.iter().filter(move |(id, _)| warm.contains(id))
    }
}

impl hashgrid_market::Warm for WarmInputs<'_> {
    fn held(&self, owner: &PublicKey) -> u64 {
        let Some(ad) = self.book.capacity(owner) else {
            return 0;
        };
        self.held_inputs(ad).map(|(_, n)| n).sum()
    }
    fn total(&self) -> u64 {
        self.total
    }
}
