//! Events a node reports to its handles ([`crate::NodeHandle::events`]).

use hashgrid_protocol::{OrderRef, PublicKey};
use libp2p::{Multiaddr, PeerId};

pub use hashgrid_market::{OrderKind, RemoveReason};

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

/// An event that matters to the application (money earned, owed or paid; a job's outcome),
/// persisted in the node's store in the same flush as the state change it reports, and kept
/// until the application acknowledges it: delivered at least once, across restarts
/// ([`crate::DurableHandle::next`], [`crate::DurableHandle::wait_next`],
/// [`crate::DurableHandle::handled`]). An application that handles an event and then
/// crashes before acknowledging it sees it again, so handling should be idempotent (each
/// event names the agreement, receipt, invoice or job it is about).
///
/// Stored as postcard: new variants go at the end and existing ones keep their fields, so
/// an older store's events still read.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[non_exhaustive]
pub enum DurableEvent {
    /// Provider: a job finished and its receipt was signed, chained and stored.
    ReceiptSigned {
        /// The agreement.
        agreement: hashgrid_protocol::ContentId,
        /// The receipt's id.
        receipt: hashgrid_protocol::ContentId,
        /// Its position in this provider's chain.
        chain_seq: u64,
        /// The buyer.
        buyer: PublicKey,
        /// The charge.
        charge: hashgrid_protocol::Msat,
    },
    /// Provider: an accepted job failed (nothing is charged).
    ProviderJobFailed {
        /// The agreement.
        agreement: hashgrid_protocol::ContentId,
        /// Why.
        reason: String,
    },
    /// Provider: the buyer countersigned a receipt (the charge is owed).
    ReceiptCountersigned {
        /// The agreement.
        agreement: hashgrid_protocol::ContentId,
        /// The receipt's id.
        receipt: hashgrid_protocol::ContentId,
    },
    /// Provider: the buyer disputed a receipt.
    ReceiptDisputed {
        /// The agreement.
        agreement: hashgrid_protocol::ContentId,
        /// The buyer's reason.
        reason: String,
    },
    /// Provider: an invoice was issued to a buyer.
    InvoiceIssued {
        /// The invoice's id.
        invoice: hashgrid_protocol::ContentId,
        /// The buyer.
        buyer: PublicKey,
        /// The amount.
        amount: hashgrid_protocol::Msat,
    },
    /// Provider: a payment of an invoice was seen on chain.
    InvoicePaymentSeen {
        /// The invoice's id.
        invoice: hashgrid_protocol::ContentId,
        /// The paying output (`txid:vout`).
        outpoint: String,
        /// Satoshis paid to the invoice's address.
        paid_sat: u64,
        /// Confirmations so far.
        confirmations: u32,
        /// Confirmations required.
        required: u32,
    },
    /// Provider: an invoice is settled (paid with the confirmations required, or the ledger
    /// netted it).
    InvoiceSettled {
        /// The invoice's id.
        invoice: hashgrid_protocol::ContentId,
    },
    /// Provider: a payment seen earlier left the chain (a reorganisation); the invoice is open
    /// again.
    InvoicePaymentVanished {
        /// The invoice's id.
        invoice: hashgrid_protocol::ContentId,
    },
    /// Buyer: a payment of an invoice was made (recorded before it is broadcast; a restart
    /// rebroadcasts the same transaction, never pays twice).
    PaymentSent {
        /// The invoice's id.
        invoice: hashgrid_protocol::ContentId,
        /// The provider paid.
        provider: PublicKey,
        /// The paying transaction.
        txid: String,
        /// Satoshis paid.
        amount_sat: u64,
    },
    /// Buyer: an invoice was paid over Lightning; the preimage proves it.
    LightningPaid {
        /// The invoice's id.
        invoice: hashgrid_protocol::ContentId,
        /// The provider paid.
        provider: PublicKey,
        /// The payment hash, hex.
        hash: String,
        /// The preimage, hex.
        preimage: String,
        /// Msat paid (the invoice's amount; routing fees are extra).
        amount_msat: u64,
    },
    /// Buyer: the provider says an invoice this node paid is settled.
    PaymentSettled {
        /// The invoice's id.
        invoice: hashgrid_protocol::ContentId,
        /// The paying output (`txid:vout`).
        outpoint: String,
    },
    /// Buyer: a job this node submitted ended.
    JobEnded {
        /// The job's id.
        job: hashgrid_protocol::ContentId,
        /// Done (its receipt verified and countersigned) or failed, and why.
        state: crate::jobs::JobState,
        /// The provider that ran it, if one did.
        provider: Option<PublicKey>,
    },
}
