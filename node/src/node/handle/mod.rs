//! [`NodeHandle`]: the cloneable facade over the swarm task. It holds the node's identity,
//! its broadcast events and shutdown; everything else is in a sub-handle by concern, borrowed
//! from it for a call: [`jobs`](JobsHandle::list), [`market`](NodeHandle::market),
//! [`peers`](PeersHandle::connected), [`settlement`](NodeHandle::settlement),
//! [`provider`](NodeHandle::provider), [`durable`](NodeHandle::durable),
//! [`ops`](NodeHandle::ops) (and `testing` for bad-input tests).

mod jobs;
mod market;
mod ops;
mod peers;
mod settlement;

pub use jobs::JobsHandle;
pub use market::MarketHandle;
pub use ops::{DurableHandle, OpsHandle, ProviderHandle};
pub use peers::PeersHandle;
#[cfg(feature = "testing")]
pub use peers::TestingHandle;
pub use settlement::SettlementHandle;

use std::collections::HashMap;
use std::sync::Arc;

use hashgrid_protocol::{ContentId, Keypair, Network, PublicKey};
use libp2p::PeerId;
use tokio::sync::{broadcast, mpsc, oneshot};

use crate::error::NodeError;
use crate::event::NodeEvent;
use crate::settle::Settlement;
use crate::store::{Store, StoreError, StoreSlot};

use super::command::{Command, Net};

pub(super) struct Inner {
    pub(super) peer_id: PeerId,
    pub(super) public: PublicKey,
    pub(super) key: Keypair,
    pub(super) network: Network,
    pub(super) store: StoreSlot,
    pub(super) tasks: std::sync::Mutex<HashMap<ContentId, tokio::task::AbortHandle>>,
    pub(super) settlement: Arc<Settlement>,
    pub(super) cmd: mpsc::Sender<Command>,
    pub(super) events: broadcast::Sender<NodeEvent>,
    /// Jobs this node placed with each provider lately (fair ranking).
    pub(super) placements: crate::jobs::Placements,
    /// This node's experience of each provider (ranking; persisted).
    pub(super) reputation: Arc<crate::jobs::reputation::Reputations>,
    /// The provider's input cache.
    pub(super) inputs: Arc<crate::jobs::cache::InputCache>,
    /// Bytes of inbound requests being read.
    pub(super) inbound: Arc<crate::network::exchange::InboundBudget>,
    /// The swarm task's stalls.
    pub(super) lag: Arc<super::lag::LoopLag>,
    /// The node's Prometheus metrics.
    pub(super) metrics: Arc<crate::ops::Metrics>,
}

/// A cheap, cloneable handle to a running node. When the last handle is dropped, the node
/// shuts down (see the module docs for the order).
#[derive(Clone)]
pub struct NodeHandle {
    pub(super) inner: Arc<Inner>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeHandle({})", self.inner.peer_id)
    }
}

impl NodeHandle {
    pub(super) async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(make(tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// This node's libp2p `PeerId` (derived from its ed25519 key).
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// This node's public key (signs its orders and receipts).
    pub fn public_key(&self) -> PublicKey {
        self.inner.public
    }

    /// Subscribes to the node's events. A subscriber more than [`EVENT_QUEUE`](crate::node::EVENT_QUEUE) events behind
    /// loses the oldest ones.
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.inner.events.subscribe()
    }

    pub(super) fn store<T>(
        &self,
        f: impl FnOnce(&Store) -> Result<T, StoreError>,
    ) -> Result<T, NodeError> {
        self.inner.store.with(f).map_err(|e| match e {
            Some(e) => NodeError::Store(e),
            None => NodeError::Stopped,
        })
    }

    pub(super) fn net(&self) -> Net {
        Net {
            tx: self.inner.cmd.clone(),
        }
    }

    /// Its buyer jobs: submit, follow, read, cancel.
    pub fn jobs(&self) -> JobsHandle<'_> {
        JobsHandle { node: self }
    }

    /// Its orders and its book of the market.
    pub fn market(&self) -> MarketHandle<'_> {
        MarketHandle { node: self }
    }

    /// Its connections.
    pub fn peers(&self) -> PeersHandle<'_> {
        PeersHandle { node: self }
    }

    /// Its settlement: positions, invoices, wallets.
    pub fn settlement(&self) -> SettlementHandle<'_> {
        SettlementHandle { node: self }
    }

    /// What it holds as a provider.
    pub fn provider(&self) -> ProviderHandle<'_> {
        ProviderHandle { node: self }
    }

    /// Its durable events, delivered at least once across restarts (unlike
    /// [`events`](Self::events)).
    pub fn durable(&self) -> DurableHandle<'_> {
        DurableHandle { node: self }
    }

    /// Figures for operating it.
    pub fn ops(&self) -> OpsHandle<'_> {
        OpsHandle { node: self }
    }

    /// Raw access for bad-input tests (cargo feature `testing`).
    #[cfg(feature = "testing")]
    pub fn testing(&self) -> TestingHandle<'_> {
        TestingHandle { node: self }
    }

    /// Shuts the node down in the documented order and waits until it has stopped. Other
    /// handles get [`NodeError::Stopped`] afterwards. Returns at once if it already stopped.
    pub async fn shutdown(&self) {
        let _ = self.request(Command::Shutdown).await;
    }
}
