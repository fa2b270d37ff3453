//! Lightning payments for hashgrid's settlement layer.
//!
//! Inference requests cost a few to a few thousand msat: too little for an on-chain payment
//! (fees and dust limits), exactly right for Lightning. This crate holds what settlement needs
//! from a Lightning node, independent of which node it is:
//!
//! - [`bind`]: how a BOLT11 invoice is bound to the receipts it bills. The invoice's
//!   description hash is the SHA-256 of a canonical text naming the provider, the buyer, the
//!   hashgrid invoice's sequence number, the exact amount in msat and every receipt id, so a
//!   buyer who countersigned those receipts can recompute it and pay for nothing else.
//! - [`invoice`]: parsing and checking a BOLT11 invoice against what the buyer expects
//!   (network, amount to the msat, description hash, expiry) and checking a preimage.
//! - [`LightningBackend`]: the operations settlement calls (invoice, pay, look up a payment,
//!   balances, channels, events). [`LdkBackend`] implements it with an embedded
//!   [ldk-node](https://docs.rs/ldk-node) whose seed and state live in the node's data dir;
//!   docs/LIGHTNING.md says what an external node (LND's REST API, Core Lightning) would take.
//!
//! Every call on a backend blocks (a Lightning node does I/O); async callers run them on a
//! blocking thread (`tokio::task::spawn_blocking`).

pub mod bind;
pub mod invoice;

mod backend;
mod error;
mod ldk;
mod store;

pub use backend::{
    Balances, ChannelInfo, ChannelRef, LightningBackend, LnEvent, PaymentDirection, PaymentInfo,
    PaymentStatus, PeerAddr,
};
pub use error::LnError;
pub use invoice::{Expected, InvoiceError, PaymentHash, Preimage};
pub use ldk::{LdkBackend, LdkConfig, LnChain, SEED_FILE};

/// The Bitcoin types this crate's API uses (the workspace's one copy of `bitcoin`).
pub use ldk_node::bitcoin;
/// A parsed BOLT11 payment request, as [`invoice::parse`] and [`LightningBackend::invoice`] return it.
pub use ldk_node::lightning_invoice::Bolt11Invoice;
