//! What settlement needs from a Lightning node.

use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use hashgrid_protocol::Msat;
use ldk_node::bitcoin::secp256k1::PublicKey as NodeId;
use ldk_node::lightning_invoice::Bolt11Invoice;
use serde::Serialize;

use crate::error::LnError;
use crate::invoice::{Expected, PaymentHash, Preimage};

/// A Lightning peer: its node id and where it listens (`NODE_ID@HOST:PORT`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerAddr {
    /// The peer's node id.
    pub node_id: NodeId,
    /// Its address.
    pub addr: SocketAddr,
}

impl FromStr for PeerAddr {
    type Err = LnError;
    fn from_str(s: &str) -> Result<PeerAddr, LnError> {
        let bad = || LnError::BadPeer(s.to_string());
        let (id, addr) = s.split_once('@').ok_or_else(bad)?;
        Ok(PeerAddr {
            node_id: NodeId::from_str(id).map_err(|_| bad())?,
            addr: addr.parse().map_err(|_| bad())?,
        })
    }
}

impl std::fmt::Display for PeerAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.node_id, self.addr)
    }
}

/// A channel, as the operations that act on one name it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChannelRef {
    /// The local id (stable across restarts).
    pub id: u128,
    /// The counterparty.
    pub peer: NodeId,
}

/// Balances, on chain and in channels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct Balances {
    /// The on-chain wallet, confirmed and unconfirmed (sats).
    pub onchain_sat: u64,
    /// Of which spendable now (sats; excludes the reserve kept for anchor channels).
    pub onchain_spendable_sat: u64,
    /// What this node could send now over its usable channels (msat).
    pub outbound_msat: u64,
    /// What it could receive now (msat).
    pub inbound_msat: u64,
    /// Its share of every channel, open or closing, as it would be on closing (sats).
    pub lightning_sat: u64,
}

/// One channel.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChannelInfo {
    /// The local id, for `close`.
    pub id: String,
    /// The counterparty's node id.
    pub peer: String,
    /// Funding transaction output (`txid:vout`), once known.
    pub funding: Option<String>,
    /// Channel size (sats).
    pub capacity_sat: u64,
    /// What this side can send (msat).
    pub outbound_msat: u64,
    /// What this side can receive (msat).
    pub inbound_msat: u64,
    /// Confirmed deeply enough and handshaken.
    pub ready: bool,
    /// Ready and the peer is connected: payments can use it now.
    pub usable: bool,
    /// This node opened (funded) it.
    pub opened_here: bool,
}

/// Which way a payment went.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum PaymentDirection {
    /// We paid.
    Outbound,
    /// We were paid.
    Inbound,
}

/// Where a payment stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PaymentStatus {
    /// In flight (or, inbound, invoice not paid yet).
    Pending,
    /// Done; the preimage proves it.
    Succeeded(Preimage),
    /// Failed (outbound: no route or rejected; inbound: invoice expired unpaid).
    Failed,
}

/// A payment this node knows of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PaymentInfo {
    /// Its hash.
    pub hash: PaymentHash,
    /// Which way.
    pub direction: PaymentDirection,
    /// Amount (msat), excluding routing fees.
    pub amount: Option<Msat>,
    /// Routing fees paid (outbound, msat).
    pub fee_msat: Option<u64>,
    /// State.
    pub status: PaymentStatus,
}

/// Something that happened, for settlement to act on. Delivered at least once: the backend
/// repeats an event until [`LightningBackend::event_handled`] is called, across restarts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LnEvent {
    /// An invoice of ours was paid.
    Received {
        /// The invoice's payment hash.
        hash: PaymentHash,
        /// What arrived (at least the invoice's amount).
        amount: Msat,
    },
    /// A payment of ours completed.
    Sent {
        /// Its hash.
        hash: PaymentHash,
        /// The proof.
        preimage: Preimage,
        /// Routing fees (msat).
        fee_msat: u64,
    },
    /// A payment of ours failed; it may be retried.
    SendFailed {
        /// Its hash, when known.
        hash: Option<PaymentHash>,
        /// Why.
        reason: String,
    },
    /// A channel's funding transaction was signed and broadcast; it waits for confirmations.
    ChannelPending {
        /// The channel.
        channel: ChannelRef,
        /// The funding output, `txid:vout`.
        funding: String,
    },
    /// A channel became usable.
    ChannelReady {
        /// The channel.
        channel: ChannelRef,
    },
    /// A channel closed.
    ChannelClosed {
        /// The channel.
        channel: ChannelRef,
        /// Why.
        reason: String,
    },
    /// Anything else (forwarding, splices, claimable payments), for logs.
    Other(String),
}

/// The operations hashgrid's settlement uses. Every method blocks.
pub trait LightningBackend: Send + Sync {
    /// This node's id.
    fn node_id(&self) -> NodeId;

    /// Where peers reach this node, when it listens.
    fn listen_addr(&self) -> Option<PeerAddr>;

    /// A fresh on-chain address of this node's wallet, for funding channels.
    fn new_address(&self) -> Result<String, LnError>;

    /// Brings the on-chain wallet and channel state up to date with the chain source.
    fn sync(&self) -> Result<(), LnError>;

    /// A payment request for exactly `amount` whose description hash is `description_hash`
    /// ([`crate::bind`]), payable for `expiry`.
    fn invoice(
        &self,
        amount: Msat,
        description_hash: [u8; 32],
        expiry: Duration,
    ) -> Result<Bolt11Invoice, LnError>;

    /// Checks `invoice` against `expected` ([`crate::invoice::check`]) and pays it. Paying an
    /// invoice that is already paid or in flight does nothing and returns its hash again, so
    /// a retry after a crash pays once.
    fn pay(&self, invoice: &Bolt11Invoice, expected: &Expected) -> Result<PaymentHash, LnError>;

    /// A payment by its hash.
    fn payment(&self, hash: &PaymentHash) -> Option<PaymentInfo>;

    /// Balances.
    fn balances(&self) -> Balances;

    /// Channels.
    fn channels(&self) -> Vec<ChannelInfo>;

    /// Connects to `peer` and opens a channel of `amount_sat` funded from the on-chain wallet,
    /// giving the peer `push_msat` of it at once.
    fn open_channel(
        &self,
        peer: &PeerAddr,
        amount_sat: u64,
        push_msat: u64,
    ) -> Result<ChannelRef, LnError>;

    /// Closes a channel: cooperatively (funds return on chain once the close confirms), or
    /// with `force` by broadcasting this node's latest commitment, for a peer that is gone
    /// (this node's own funds then wait out the channel's `to_self_delay`).
    fn close_channel(&self, channel: &ChannelRef, force: bool) -> Result<(), LnError>;

    /// The next event, if one is waiting. The same event is returned until it is handled.
    fn next_event(&self) -> Option<LnEvent>;

    /// Marks the event last returned by [`LightningBackend::next_event`] as handled.
    fn event_handled(&self) -> Result<(), LnError>;

    /// Stops the node (state is persisted as it changes; stopping only ends its tasks).
    fn stop(&self) -> Result<(), LnError>;
}
