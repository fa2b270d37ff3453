//! Settlement's records and views: modes and config, the ledger's events, invoices on both sides, positions, earnings, and readers of them from a store.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use hashgrid_market::settlement::{
    ConfirmationPolicy, CreditPolicy, Earnings, InvoiceDraft, InvoicePolicy, InvoiceRecord,
    ProviderLedger, SettleError,
};
use hashgrid_protocol::{ContentId, Invoice, Msat, PublicKey, Signed, Timestamp};
use serde::{Deserialize, Serialize};

use crate::jobs::JobRecord;
use crate::store::{JobTree, Store, StoreError};
use crate::wallet::{BtcNetwork, ChainSource, WalletError, WalletKeys};

/// Default time between settlement passes (invoicing, chain checks, deliveries).
pub const DEFAULT_SETTLE_INTERVAL: Duration = Duration::from_secs(30);
/// Default fee rate of a buyer's payments, sat/vB.
pub const DEFAULT_FEE_RATE_SAT_VB: u64 = 2;

/// How a node settles.
#[derive(Debug, Clone)]
pub enum SettleMode {
    /// Countersigned receipts are signed IOUs, netted per counterparty; no chain.
    Ledger,
    /// Invoices paid on chain.
    Onchain(Onchain),
    /// Invoices paid over Lightning, to the msat.
    Lightning(LightningSettle),
}

/// Lightning settlement settings.
#[derive(Clone)]
pub struct LightningSettle {
    /// The Bitcoin network its channels are on.
    pub network: BtcNetwork,
    /// The Lightning node that invoices (as a provider) and pays (as a buyer). The caller
    /// starts it (e.g. `hashgrid_lightning::LdkBackend::start`) and keeps it for the node's
    /// lifetime; settlement drains its events.
    pub backend: Arc<dyn hashgrid_lightning::LightningBackend>,
    /// Stop the Lightning node when the hashgrid node stops (a clean stop persists its channel
    /// state); false when the caller shares it beyond one node's life.
    pub stop_with_node: bool,
    /// Channels to keep open (`[settle] lightning_channels`): each pass opens any that has no
    /// channel with its peer, funded from the Lightning node's on-chain wallet.
    pub channels: Vec<super::channels::ChannelPlan>,
}

impl std::fmt::Debug for LightningSettle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LightningSettle")
            .field("network", &self.network)
            .field("node_id", &self.backend.node_id())
            .finish()
    }
}

/// On-chain settlement settings.
#[derive(Debug, Clone)]
pub struct Onchain {
    /// The Bitcoin network (mainnet only with an explicit opt-in, checked when built).
    pub network: BtcNetwork,
    /// Where the wallets sync and broadcast.
    pub chain: Arc<dyn ChainSource>,
    /// A provider's payout descriptor (public keys are enough: a watch-only wallet).
    pub payout_descriptor: Option<String>,
    /// A buyer's wallet keys (from `wallet.json`).
    pub wallet: Option<WalletKeys>,
}

/// Settlement configuration.
#[derive(Debug, Clone)]
pub struct SettlementConfig {
    /// Ledger or on-chain.
    pub mode: SettleMode,
    /// When accrued receipts become an invoice.
    pub invoice: InvoicePolicy,
    /// Confirmations by amount.
    pub confirmations: ConfirmationPolicy,
    /// Credit given to each buyer.
    pub credit: CreditPolicy,
    /// Time between settlement passes.
    pub interval: Duration,
    /// A buyer pays valid invoices without being asked.
    pub auto_pay: bool,
    /// Fee rate of a buyer's payments.
    pub fee_rate_sat_vb: u64,
}

impl Default for SettlementConfig {
    fn default() -> Self {
        SettlementConfig {
            mode: SettleMode::Ledger,
            invoice: InvoicePolicy::default(),
            confirmations: ConfirmationPolicy::default(),
            credit: CreditPolicy::default(),
            interval: DEFAULT_SETTLE_INTERVAL,
            auto_pay: true,
            fee_rate_sat_vb: DEFAULT_FEE_RATE_SAT_VB,
        }
    }
}

/// A ledger transition, as logged. Replaying the log rebuilds the ledger exactly.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) enum LedgerEvent {
    Accrue {
        receipt: ContentId,
        buyer: PublicKey,
        charge: Msat,
        at: Timestamp,
    },
    Issue {
        id: ContentId,
        buyer: PublicKey,
        receipts: Vec<ContentId>,
        amount: Msat,
        at: Timestamp,
        ttl_ms: u64,
    },
    PaymentSeen {
        id: ContentId,
        outpoint: String,
        paid_sat: u64,
        confirmations: u32,
        required: u32,
    },
    Confirmations {
        id: ContentId,
        confirmations: u32,
        required: u32,
    },
    Vanished {
        id: ContentId,
    },
    Settle {
        id: ContentId,
    },
    Expire {
        now: Timestamp,
    },
}

impl LedgerEvent {
    /// What the application hears of this transition, if anything (see
    /// [`crate::event::DurableEvent`]).
    pub(super) fn durable(&self) -> Option<crate::event::DurableEvent> {
        use crate::event::DurableEvent as D;
        match self {
            LedgerEvent::Issue {
                id, buyer, amount, ..
            } => Some(D::InvoiceIssued {
                invoice: *id,
                buyer: *buyer,
                amount: *amount,
            }),
            LedgerEvent::PaymentSeen {
                id,
                outpoint,
                paid_sat,
                confirmations,
                required,
            } => Some(D::InvoicePaymentSeen {
                invoice: *id,
                outpoint: outpoint.clone(),
                paid_sat: *paid_sat,
                confirmations: *confirmations,
                required: *required,
            }),
            LedgerEvent::Settle { id } => Some(D::InvoiceSettled { invoice: *id }),
            LedgerEvent::Vanished { id } => Some(D::InvoicePaymentVanished { invoice: *id }),
            LedgerEvent::Accrue { .. }
            | LedgerEvent::Confirmations { .. }
            | LedgerEvent::Expire { .. } => None,
        }
    }
}

pub(super) fn apply(ledger: &mut ProviderLedger, ev: &LedgerEvent) -> Result<(), SettleError> {
    let exactly = |required: u32| ConfirmationPolicy {
        tiers: Vec::new(),
        above: required,
    };
    match ev {
        LedgerEvent::Accrue {
            receipt,
            buyer,
            charge,
            at,
        } => ledger.accrue(*receipt, *buyer, *charge, *at),
        LedgerEvent::Issue {
            id,
            buyer,
            receipts,
            amount,
            at,
            ttl_ms,
        } => ledger.issue(
            *id,
            &InvoiceDraft {
                buyer: *buyer,
                receipts: receipts.clone(),
                amount: *amount,
            },
            *at,
            &InvoicePolicy {
                ttl_ms: *ttl_ms,
                ..InvoicePolicy::default()
            },
        ),
        LedgerEvent::PaymentSeen {
            id,
            outpoint,
            paid_sat,
            confirmations,
            required,
        } => ledger
            .payment_seen(
                *id,
                outpoint.clone(),
                *paid_sat,
                *confirmations,
                &exactly(*required),
            )
            .map(|_| ()),
        LedgerEvent::Confirmations {
            id,
            confirmations,
            required,
        } => ledger
            .confirmations(*id, *confirmations, &exactly(*required))
            .map(|_| ()),
        LedgerEvent::Vanished { id } => ledger.payment_vanished(*id),
        LedgerEvent::Settle { id } => ledger.settle(*id),
        LedgerEvent::Expire { now } => {
            ledger.expire(*now);
            Ok(())
        }
    }
}

/// A provider's invoice, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutInvoice {
    /// The signed invoice.
    pub invoice: Signed<Invoice>,
    /// Payout address index (on-chain invoices).
    pub address_index: Option<u32>,
    /// The buyer acknowledged it.
    pub delivered: bool,
    /// The buyer acknowledged the settlement notice.
    pub settled_acked: bool,
    /// Received at the address so far (sat), if less than due.
    pub seen_sat: u64,
    /// A payment the buyer claimed and what is wrong with it.
    pub problem: Option<String>,
}

/// Where a received invoice stands on the buyer's side.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PayState {
    /// Accepted, not paid.
    Unpaid,
    /// Refused (not owed), with the reason.
    Refused(String),
    /// Superseded: expired unpaid and billed again in a later invoice.
    Superseded,
    /// A payment was signed and recorded; it is (re)broadcast until the provider sees it.
    Paying {
        /// The signed transaction.
        tx: Vec<u8>,
        /// Its id.
        txid: String,
        /// The output paying the invoice.
        vout: u32,
    },
    /// The provider acknowledged the payment proof.
    Paid {
        /// The payment, `txid:vout`.
        outpoint: String,
    },
    /// The provider confirmed and settled it.
    Settled {
        /// The payment, `txid:vout`.
        outpoint: String,
    },
    /// A Lightning payment was started (recorded before it is sent; paying the same
    /// request again sends nothing, so a restart never pays twice).
    LnPaying {
        /// The payment hash, hex.
        hash: String,
    },
    /// Paid over Lightning; the preimage proves it.
    LnPaid {
        /// The payment hash, hex.
        hash: String,
        /// The preimage, hex.
        preimage: String,
    },
    /// Paid over Lightning and settled by the provider.
    LnSettled {
        /// The payment hash, hex.
        hash: String,
        /// The preimage, hex.
        preimage: String,
    },
}

impl PayState {
    /// Short name for tables.
    pub fn name(&self) -> &'static str {
        match self {
            PayState::Unpaid => "unpaid",
            PayState::Refused(_) => "refused",
            PayState::Superseded => "superseded",
            PayState::Paying { .. } | PayState::LnPaying { .. } => "paying",
            PayState::Paid { .. } | PayState::LnPaid { .. } => "paid",
            PayState::Settled { .. } | PayState::LnSettled { .. } => "settled",
        }
    }

    /// Whether the buyer still owes it.
    pub fn is_unpaid(&self) -> bool {
        matches!(
            self,
            PayState::Unpaid | PayState::Paying { .. } | PayState::LnPaying { .. }
        )
    }
}

/// An invoice a buyer received.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InInvoice {
    /// The signed invoice.
    pub invoice: Signed<Invoice>,
    /// Where it stands.
    pub state: PayState,
    /// When it arrived.
    pub received_at: Timestamp,
}

impl InInvoice {
    /// The decoded body (verified when it was accepted).
    pub fn body(&self) -> Option<Invoice> {
        self.invoice.decode_unverified().ok()
    }
}

/// One counterparty's position.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Position {
    /// What it owes this node as a buyer, by invoice state.
    pub as_buyer: EarningsView,
    /// What this node owes it for countersigned receipts (this node as buyer).
    pub owed_to_it: Msat,
}

/// [`Earnings`] in a serialisable shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct EarningsView {
    /// Accrued, not invoiced.
    pub accrued: Msat,
    /// Invoiced, unpaid.
    pub invoiced: Msat,
    /// Paid, not confirmed.
    pub paid: Msat,
    /// Confirmed.
    pub confirmed: Msat,
    /// Settled.
    pub settled: Msat,
}

impl From<Earnings> for EarningsView {
    fn from(e: Earnings) -> Self {
        EarningsView {
            accrued: e.accrued,
            invoiced: e.invoiced,
            paid: e.paid,
            confirmed: e.confirmed,
            settled: e.settled,
        }
    }
}

/// A settlement operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SettlementError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A wallet failed.
    #[error(transparent)]
    Wallet(#[from] WalletError),
    /// The ledger refused a transition.
    #[error(transparent)]
    Ledger(#[from] SettleError),
    /// The stored ledger log does not replay.
    #[error("settlement log entry {0} does not replay: {1}")]
    Replay(u64, String),
    /// The Lightning node failed.
    #[error(transparent)]
    Lightning(#[from] hashgrid_lightning::LnError),
}

/// Reads the settlement view of a store (for commands that run while the node is stopped).
pub fn earnings_from_store(
    store: &Store,
) -> Result<BTreeMap<PublicKey, Position>, SettlementError> {
    let ledger = replay(store)?.0;
    let mut out: BTreeMap<PublicKey, Position> = BTreeMap::new();
    for b in ledger.buyers() {
        out.entry(*b).or_default().as_buyer = ledger.earnings(b).into();
    }
    for (p, owed) in purchases(store)? {
        out.entry(p).or_default().owed_to_it = owed;
    }
    Ok(out)
}

/// Invoices this node issued (provider side), with the ledger's state of each.
pub fn issued_from_store(
    store: &Store,
) -> Result<Vec<(OutInvoice, Option<InvoiceRecord>)>, SettlementError> {
    let ledger = replay(store)?.0;
    Ok(store
        .all::<OutInvoice>(JobTree::InvoicesOut)?
        .into_iter()
        .map(|o| {
            let rec = ledger.invoice(&o.invoice.id()).cloned();
            (o, rec)
        })
        .collect())
}

/// Invoices this node received (buyer side).
pub fn received_from_store(store: &Store) -> Result<Vec<InInvoice>, SettlementError> {
    Ok(store.all::<InInvoice>(JobTree::InvoicesIn)?)
}

pub(super) fn replay(store: &Store) -> Result<(ProviderLedger, u64), SettlementError> {
    let mut ledger = ProviderLedger::new();
    let mut next = 0u64;
    for (key, ev) in store.entries::<LedgerEvent>(JobTree::SettleLog)? {
        apply(&mut ledger, &ev).map_err(|e| SettlementError::Replay(key, e.to_string()))?;
        next = key + 1;
    }
    Ok((ledger, next))
}

/// Countersigned purchases by provider (this node as buyer), from the job records.
pub(super) fn purchases(store: &Store) -> Result<BTreeMap<PublicKey, Msat>, SettlementError> {
    let mut out: BTreeMap<PublicKey, Msat> = BTreeMap::new();
    for rec in store.all::<JobRecord>(JobTree::BuyerJobs)? {
        if let Some(r) = rec
            .receipt
            .as_ref()
            .and_then(|cs| cs.signed.decode_unverified().ok())
        {
            let e = out.entry(r.provider).or_insert(Msat::ZERO);
            *e = Msat(e.0.saturating_add(r.charge.0));
        }
    }
    Ok(out)
}
