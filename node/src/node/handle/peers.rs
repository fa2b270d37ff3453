//! [`PeersHandle`]: connections; [`TestingHandle`]: raw access for bad-input tests.

#[cfg(feature = "testing")]
use hashgrid_protocol::exchange::{
    BlobReply, BlobRequest, JobMessage, JobReply, NegotiateReply, Propose,
};
#[cfg(feature = "testing")]
use hashgrid_protocol::{GossipMessage, Signed};
use libp2p::{Multiaddr, PeerId};

use crate::error::NodeError;

#[cfg(feature = "testing")]
use super::super::command::RawTopic;
use super::super::command::{Command, KnownPeer};
use super::NodeHandle;

/// This node's connections ([`PeersHandle::connected`]).
#[derive(Clone, Copy)]
pub struct PeersHandle<'a> {
    pub(super) node: &'a NodeHandle,
}

impl<'a> PeersHandle<'a> {
    /// The addresses the node listens on, each ending in `/p2p/<PeerId>` (dialable as is).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        self.node.request(Command::ListenAddrs).await
    }

    /// Peers with at least one open connection.
    pub async fn connected(&self) -> Result<Vec<PeerId>, NodeError> {
        self.node.request(Command::Peers).await
    }

    /// The peers this node has met, with their addresses (from their identify info and the
    /// addresses its dials reached, kept in the store): what a restarted node dials, and dials
    /// again while it has no peer.
    pub async fn known(&self) -> Result<Vec<KnownPeer>, NodeError> {
        self.node.request(Command::KnownPeers).await?
    }

    /// Peers known to be subscribed to this network's `orders` topic: those a publish reaches
    /// directly.
    pub async fn gossip(&self) -> Result<Vec<PeerId>, NodeError> {
        self.node.request(Command::GossipPeers).await
    }

    /// The gossipsub score this node gives `peer` (`None` if it is not known to gossipsub).
    pub async fn score(&self, peer: PeerId) -> Result<Option<f64>, NodeError> {
        self.node.request(|r| Command::PeerScore(peer, r)).await
    }

    /// Dials an address (with `/p2p/<PeerId>` it is also added to the DHT).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NodeError> {
        self.node.request(|r| Command::Dial(addr, r)).await?
    }
}

/// Raw access for bad-input tests: unsigned publishes, raw requests, signing with the node's key (cargo feature `testing`; [`NodeHandle::testing`]).
#[cfg(feature = "testing")]
#[derive(Clone, Copy)]
pub struct TestingHandle<'a> {
    pub(super) node: &'a NodeHandle,
}

#[cfg(feature = "testing")]
impl<'a> TestingHandle<'a> {
    /// Publishes raw bytes on a topic, bypassing signing and validation. For bad-input tests
    /// only (cargo feature `testing`).
    pub async fn publish_raw(&self, topic: RawTopic, data: Vec<u8>) -> Result<(), NodeError> {
        self.node
            .request(|r| Command::PublishRaw(topic, data, r))
            .await?
    }

    /// Adds `messages`, unchecked, to every sync response this node serves (replacing earlier
    /// ones). For bad-input tests only (cargo feature `testing`).
    pub async fn serve_in_sync(&self, messages: Vec<GossipMessage>) -> Result<(), NodeError> {
        self.node
            .request(|r| Command::ServeInSync(messages, r))
            .await
    }

    /// Sends a raw proposal to `peer` (bad-input tests only; cargo feature `testing`).
    pub async fn raw_propose(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        p: Propose,
    ) -> Result<NegotiateReply, NodeError> {
        self.node
            .net()
            .negotiate(peer, addrs, p)
            .await
            .map_err(NodeError::Request)
    }

    /// Sends a raw job request to `peer` (bad-input tests only; cargo feature `testing`).
    pub async fn raw_job(&self, peer: PeerId, m: JobMessage) -> Result<JobReply, NodeError> {
        self.node
            .net()
            .job(peer, m)
            .await
            .map_err(NodeError::Request)
    }

    /// Sends a raw blob request to `peer` (bad-input tests only; cargo feature `testing`).
    pub async fn raw_blob(&self, peer: PeerId, r: BlobRequest) -> Result<BlobReply, NodeError> {
        self.node
            .net()
            .blob(peer, r)
            .await
            .map_err(NodeError::Request)
    }

    /// Signs a message body with this node's key (bad-input tests only; cargo feature
    /// `testing`).
    pub fn sign<T: hashgrid_protocol::SignedMessage>(&self, body: &T) -> Signed<T> {
        Signed::sign(&self.node.inner.key, &self.node.inner.network, body)
    }

    /// Countersigns with this node's key (bad-input tests only; cargo feature `testing`).
    pub fn countersign<T: hashgrid_protocol::Countersignable>(
        &self,
        s: &Signed<T>,
    ) -> hashgrid_protocol::Countersigned<T> {
        s.countersign(&self.node.inner.key, &self.node.inner.network)
    }
}
