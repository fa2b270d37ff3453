//! Settlement between nodes (`/hashgrid/settle/1`): a provider's countersigned receipts accrue
//! per buyer in the market's [`ProviderLedger`](hashgrid_market::settlement::ProviderLedger); in `onchain` mode the provider issues signed
//! invoices to a fresh payout address, the buyer's wallet pays them, and the provider's watch
//! wallet follows the payment to confirmation (and back, on a reorganisation); in `lightning`
//! mode the invoice carries a BOLT11 request for the exact msat, bound to its receipts, which
//! the buyer's Lightning node pays and the provider's sees arrive (see docs/LIGHTNING.md); in
//! `ledger` mode receipts stay signed IOUs netted per counterparty. In both modes a buyer whose debt is over
//! the credit policy gets `Reject { CreditLimit }` on its next proposal.
//!
//! Durability: the ledger is event-sourced (every transition is appended to a sled tree and
//! flushed before it is acted on or acknowledged, and replayed at start); invoices on both
//! sides are records in sled; a buyer records a payment transaction (flushed) *before* it
//! broadcasts it, so a restart rebroadcasts the same transaction instead of paying twice.
//!
//! Rounding: receipts charge msat; an on-chain invoice bills whole sats, rounded down, and the
//! sub-sat remainder stays accrued for the next invoice; a Lightning invoice bills the exact
//! msat (see `hashgrid_market::settlement`).

mod channels;
mod lncmd;
mod records;
mod section;
mod service;

pub use channels::{ChannelPlan, ChannelSection, MIN_CHANNEL_SAT, OPEN_RETRY};
pub use hashgrid_lightning::LightningBackend;
pub use hashgrid_market::settlement::{
    ConfirmationPolicy, CreditPolicy, InvoicePolicy, InvoiceRecord, InvoiceState,
};
pub use lncmd::{LnCommand, ln_command, ln_render};
pub use records::*;
pub use section::{LIGHTNING_DIR, SettleModeName, SettleSection};
pub(crate) use service::Settlement;
