//! What handles and job tasks send to the swarm task: [`Command`], and [`Net`], the job tasks' line to it.

use std::collections::HashMap;
use std::sync::Arc;

#[cfg(feature = "testing")]
use hashgrid_protocol::GossipMessage;
use hashgrid_protocol::{Ask, Bid, GpuProfile, Msat, OrderRef, PublicKey, Requirements};
use libp2p::request_response;
use libp2p::{Multiaddr, PeerId};
use tokio::sync::{mpsc, oneshot};
use tracing::debug;

use crate::error::NodeError;
use crate::store::OwnOrder;
use hashgrid_market::BookSnapshot;
use hashgrid_protocol::ContentId;
use hashgrid_protocol::exchange::{
    BlobReply, BlobRequest, JobMessage, JobReply, NegotiateReply, Propose, SettleReply,
    SettleRequest,
};

use super::settings::{DIAL_RETRIES, DIAL_RETRY_AFTER, UNREACHABLE};

/// What a provider sells in one ask (the node fills in its key, order id, sequence number,
/// region and lifetime).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AskSpec {
    /// The GPU offered.
    pub gpu: GpuProfile,
    /// Units offered.
    pub units: u32,
    /// Msat per GPU-second.
    pub price: Msat,
    /// Longest job accepted, in seconds.
    pub max_seconds: u32,
}

/// What a buyer wants in one bid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BidSpec {
    /// Units wanted.
    pub units: u32,
    /// Requirements on the GPU.
    pub requirements: Requirements,
    /// Highest msat per GPU-second.
    pub max_price: Msat,
    /// Longest run, in seconds.
    pub max_seconds: u32,
    /// The model the work runs ([`ModelManifest::id`](hashgrid_protocol::ModelManifest::id)),
    /// if any.
    pub model: Option<ContentId>,
}

/// A peer met before and the addresses it was met at.
pub type KnownPeer = (PeerId, Vec<Multiaddr>);

pub(crate) enum Command {
    Negotiate(
        PeerId,
        Vec<Multiaddr>,
        Box<Propose>,
        oneshot::Sender<Result<NegotiateReply, String>>,
    ),
    Job(
        PeerId,
        JobMessage,
        oneshot::Sender<Result<JobReply, String>>,
    ),
    Blob(
        PeerId,
        BlobRequest,
        oneshot::Sender<Result<BlobReply, String>>,
    ),
    Settle(
        PeerId,
        SettleRequest,
        oneshot::Sender<Result<SettleReply, String>>,
    ),
    Candidates(Box<CandidateQuery>, oneshot::Sender<Vec<Candidate>>),
    MarkDown(PublicKey, oneshot::Sender<()>),
    /// Publishes a message this node signed (fraud evidence) on its topic.
    Publish(Box<hashgrid_protocol::GossipMessage>, oneshot::Sender<()>),
    Offers(Box<hashgrid_market::OfferQuery>, oneshot::Sender<Vec<Ask>>),
    ServeBlobs(PeerId, Vec<(ContentId, Arc<Vec<u8>>)>, oneshot::Sender<()>),
    UnserveBlobs(PeerId, Vec<ContentId>, oneshot::Sender<()>),
    PostAsk(AskSpec, oneshot::Sender<Result<OrderRef, NodeError>>),
    PostBid(BidSpec, oneshot::Sender<Result<OrderRef, NodeError>>),
    Cancel(u64, oneshot::Sender<Result<(), NodeError>>),
    /// The store flush an own-order change waited for is done (sent by the node to itself).
    Flushed(Box<AfterFlush>, Result<(), NodeError>),
    Book(oneshot::Sender<BookSnapshot>),
    Stats(oneshot::Sender<NodeStats>),
    Peers(oneshot::Sender<Vec<PeerId>>),
    KnownPeers(oneshot::Sender<Result<Vec<KnownPeer>, NodeError>>),
    OwnOrders(oneshot::Sender<Vec<OwnOrder>>),
    GossipPeers(oneshot::Sender<Vec<PeerId>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    PeerScore(PeerId, oneshot::Sender<Option<f64>>),
    Dial(Multiaddr, oneshot::Sender<Result<(), NodeError>>),
    #[cfg(feature = "testing")]
    PublishRaw(RawTopic, Vec<u8>, oneshot::Sender<Result<(), NodeError>>),
    #[cfg(feature = "testing")]
    ServeInSync(Vec<GossipMessage>, oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// What the swarm task does once an own order's store write is on disk: it flushes off the
/// task (on the blocking pool) and comes back with [`Command::Flushed`], so that no fsync
/// stalls the swarm loop and nothing is announced or acknowledged before it is durable.
pub(crate) enum AfterFlush {
    /// Announce a new order and tell the caller its identity.
    Placed(Box<OwnOrder>, oneshot::Sender<Result<OrderRef, NodeError>>),
    /// Publish the cancel of an order and tell the caller.
    Cancelled(u64, oneshot::Sender<Result<(), NodeError>>),
}

/// Which topic [`TestingHandle::publish_raw`](crate::node::TestingHandle::publish_raw) publishes on (testing only).
#[cfg(feature = "testing")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawTopic {
    /// The `capacity` topic.
    Capacity,
    /// The `orders` topic.
    Orders,
}

/// What the swarm task knows right now, in figures (cheap to read every second, whatever the
/// book's size: see [`OpsHandle::stats`](crate::OpsHandle::stats)).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct NodeStats {
    /// Live asks in the book.
    pub asks: u64,
    /// Live bids in the book.
    pub bids: u64,
    /// Providers with a live capacity ad.
    pub providers: u64,
    /// Providers per region (from their capacity ads).
    pub regions: std::collections::BTreeMap<String, u64>,
    /// Connected peers, with the region of those that sell (from their capacity ads).
    pub peers: Vec<(String, Option<String>)>,
    /// Peers in the gossip mesh of the orders topic.
    pub gossip_peers: u64,
    /// Requests waiting for the provider service.
    pub provider_queue: u64,
}

/// A buyer job's request for candidates.
pub(crate) struct CandidateQuery {
    /// The job's bid.
    pub(crate) bid: Bid,
    /// Providers already tried.
    pub(crate) excluded: Vec<PublicKey>,
    /// Jobs this node placed with each provider lately.
    pub(crate) load: HashMap<PublicKey, u64>,
    /// The random tie-break among equals (from the buyer's key and the job).
    pub(crate) seed: u64,
    /// The job's input blobs and their sizes (weighed against providers' warm caches).
    pub(crate) inputs: Vec<(ContentId, u64)>,
    /// Which of those are the weights of the model the bid names (`bid.model`): a provider
    /// whose ad lists the model holds them.
    pub(crate) model_blobs: Vec<ContentId>,
}

/// A job task's line to the node's task: requests to peers and book lookups.
#[derive(Clone)]
pub(crate) struct Net {
    pub(super) tx: mpsc::Sender<Command>,
}

impl Net {
    /// A line to the node's task while it runs (`None` once it has stopped).
    pub(crate) fn upgrade(weak: &mpsc::WeakSender<Command>) -> Option<Net> {
        weak.upgrade().map(|tx| Net { tx })
    }

    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| "the node has stopped".to_string())?;
        rx.await.map_err(|_| "the node has stopped".to_string())
    }

    pub(crate) async fn negotiate(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        p: Propose,
    ) -> Result<NegotiateReply, String> {
        self.call(|r| Command::Negotiate(peer, addrs, Box::new(p), r))
            .await?
    }

    pub(crate) async fn job(&self, peer: PeerId, m: JobMessage) -> Result<JobReply, String> {
        let mut tries = 0;
        loop {
            let msg = m.clone();
            match self.call(|r| Command::Job(peer, msg, r)).await? {
                Err(e) if e.starts_with(UNREACHABLE) && tries < DIAL_RETRIES => {
                    tries += 1;
                    tokio::time::sleep(DIAL_RETRY_AFTER * tries).await;
                }
                reply => return reply,
            }
        }
    }

    pub(crate) async fn settle(
        &self,
        peer: PeerId,
        req: SettleRequest,
    ) -> Result<SettleReply, String> {
        self.call(|r| Command::Settle(peer, req, r)).await?
    }

    pub(crate) async fn blob(&self, peer: PeerId, req: BlobRequest) -> Result<BlobReply, String> {
        self.call(|r| Command::Blob(peer, req, r)).await?
    }

    pub(crate) async fn candidates(&self, q: CandidateQuery) -> Result<Vec<Candidate>, String> {
        self.call(|r| Command::Candidates(Box::new(q), r)).await
    }

    /// Publishes `msg` (signed by this node) on its topic.
    pub(crate) async fn publish(&self, msg: hashgrid_protocol::GossipMessage) {
        let _ = self.call(|r| Command::Publish(Box::new(msg), r)).await;
    }

    pub(crate) async fn mark_down(&self, p: PublicKey) {
        let _ = self.call(|r| Command::MarkDown(p, r)).await;
    }

    pub(crate) async fn serve_blobs(&self, peer: PeerId, blobs: Vec<(ContentId, Arc<Vec<u8>>)>) {
        let _ = self.call(|r| Command::ServeBlobs(peer, blobs, r)).await;
    }

    /// A guard that stops serving `ids` to `peer` when dropped (without waiting: dropping
    /// happens in synchronous code, e.g. when a cancelled job's task is aborted).
    pub(crate) fn unserve_on_drop(&self, peer: PeerId, ids: Vec<ContentId>) -> UnserveGuard {
        UnserveGuard {
            tx: self.tx.clone(),
            peer,
            ids,
        }
    }
}

/// See [`Net::unserve_on_drop`].
pub(crate) struct UnserveGuard {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) peer: PeerId,
    pub(super) ids: Vec<ContentId>,
}

impl Drop for UnserveGuard {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let (reply, _) = oneshot::channel();
        let ids = std::mem::take(&mut self.ids);
        // A full queue (or a stopped node) leaves them served until the node stops.
        let _ = self
            .tx
            .try_send(Command::UnserveBlobs(self.peer, ids, reply));
    }
}

/// An ask the buyer may propose to, with the provider's advertised addresses.
#[derive(Debug, Clone)]
pub(crate) struct Candidate {
    pub(crate) ask: Ask,
    pub(crate) peer: PeerId,
    pub(crate) addrs: Vec<Multiaddr>,
    /// The job's inputs the provider's capacity ad lists as warm (not sent inline: it has
    /// them, and fetches them only if it evicted them since).
    pub(crate) warm: Vec<ContentId>,
}

pub(super) type Pending<T> =
    HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<T, String>>>;

/// Routes responses and failures of this node's outbound requests to their waiting callers and
/// returns inbound requests for the caller to answer.
pub(super) fn split_event<Req, Resp>(
    pending: &mut Pending<Resp>,
    ev: request_response::Event<Req, Resp>,
    what: &str,
) -> Option<(PeerId, Req, request_response::ResponseChannel<Resp>)> {
    match ev {
        request_response::Event::Message { peer, message, .. } => match message {
            request_response::Message::Request {
                request, channel, ..
            } => Some((peer, request, channel)),
            request_response::Message::Response {
                request_id,
                response,
            } => {
                if let Some(r) = pending.remove(&request_id) {
                    let _ = r.send(Ok(response));
                }
                None
            }
        },
        request_response::Event::OutboundFailure {
            request_id, error, ..
        } => {
            if let Some(r) = pending.remove(&request_id) {
                let e = match error {
                    request_response::OutboundFailure::DialFailure => {
                        format!("{UNREACHABLE}{error}")
                    }
                    _ => error.to_string(),
                };
                let _ = r.send(Err(e));
            }
            None
        }
        request_response::Event::InboundFailure { peer, error, .. } => {
            debug!(%peer, %error, "inbound {what} failed");
            None
        }
        request_response::Event::ResponseSent { .. } => None,
    }
}
