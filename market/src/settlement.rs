//! Settlement bookkeeping on the provider's side: countersigned receipts accrue per buyer,
//! invoices are issued by policy and move through issued → paid → confirmed → settled (or
//! expired), and a credit policy decides whether a buyer may open new agreements.
//!
//! Pure and deterministic: time, confirmations and payments are passed in; the node's wallet
//! and chain source (issue 8) observe the chain and call these transitions.
//!
//! # Rounding (msat → sat)
//! Receipts charge integer msat; on-chain payments are whole sats. An invoice bills the
//! largest multiple of the policy's [`InvoicePolicy::unit`] not above what has accrued
//! (`floor`): 1000 msat (whole sats) for on-chain payments, so the sub-sat remainder stays
//! accrued for the next invoice; 1 msat for Lightning, which pays msat exactly, so a batch
//! of sub-sat charges is billed to the msat. Nothing is rounded away: at every moment
//! `accrued + invoiced (open) + paid + confirmed + settled == sum of receipts` per buyer, in msat.

use std::collections::BTreeMap;

use hashgrid_protocol::{ContentId, Msat, PublicKey, Timestamp};

/// Default amount at which accrued receipts are invoiced: 10,000 sat. Below this, the
/// on-chain fee would be a large share of the payment.
pub const DEFAULT_INVOICE_MIN_MSAT: u64 = 10_000_000;

/// Default age after which accrued receipts are invoiced even below the minimum: 24 hours, so
/// a small buyer still settles daily.
pub const DEFAULT_INVOICE_MAX_AGE_MS: u64 = 24 * 60 * 60 * 1000;

/// Whole sats: the smallest amount an on-chain invoice bills in.
pub const SAT_MSAT: Msat = Msat(1000);

/// Default time a buyer has to pay an invoice: 1 hour.
pub const DEFAULT_INVOICE_TTL_MS: u64 = 60 * 60 * 1000;

/// Default most a buyer may owe (accrued + unpaid invoices) before new agreements are
/// refused: 100,000 sat (about a day of one mid-range GPU at typical prices).
pub const DEFAULT_CREDIT_LIMIT_MSAT: u64 = 100_000_000;

/// Default age of the oldest unpaid invoice after which new agreements are refused: 2 hours
/// (twice the invoice TTL: an honest buyer has paid by then).
pub const DEFAULT_CREDIT_MAX_UNPAID_AGE_MS: u64 = 2 * 60 * 60 * 1000;

/// When accrued receipts become an invoice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InvoicePolicy {
    /// Invoice once this much has accrued.
    pub min_amount: Msat,
    /// Or once the oldest accrued receipt is this old (ms).
    pub max_age_ms: u64,
    /// How long an invoice stays payable (ms).
    pub ttl_ms: u64,
    /// Invoices bill a multiple of this ([`SAT_MSAT`] on chain, `Msat(1)` over Lightning);
    /// zero is taken as one msat.
    pub unit: Msat,
}

impl Default for InvoicePolicy {
    fn default() -> Self {
        InvoicePolicy {
            min_amount: Msat(DEFAULT_INVOICE_MIN_MSAT),
            max_age_ms: DEFAULT_INVOICE_MAX_AGE_MS,
            ttl_ms: DEFAULT_INVOICE_TTL_MS,
            unit: SAT_MSAT,
        }
    }
}

/// Confirmations required before a payment counts, by amount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfirmationPolicy {
    /// `(amount up to and including, confirmations)`, ascending by amount; amounts above the
    /// last tier need `above`.
    pub tiers: Vec<(u64, u32)>,
    /// Confirmations for amounts above every tier.
    pub above: u32,
}

impl Default for ConfirmationPolicy {
    /// Up to 100,000 sat: 1 confirmation; up to 1,000,000 sat: 3; above: 6 (the usual
    /// merchant practice: reversal cost grows with depth, risk grows with amount).
    fn default() -> Self {
        ConfirmationPolicy {
            tiers: vec![(100_000, 1), (1_000_000, 3)],
            above: 6,
        }
    }
}

impl ConfirmationPolicy {
    /// Confirmations required for a payment of `amount_sat`.
    pub fn required(&self, amount_sat: u64) -> u32 {
        self.tiers
            .iter()
            .find(|(upto, _)| amount_sat <= *upto)
            .map_or(self.above, |&(_, c)| c)
    }
}

/// How much credit a buyer gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditPolicy {
    /// Most a buyer may owe (accrued + invoiced but not yet confirmed).
    pub limit: Msat,
    /// Oldest an unpaid invoice may be (ms) before new agreements are refused.
    pub max_unpaid_age_ms: u64,
}

impl Default for CreditPolicy {
    fn default() -> Self {
        CreditPolicy {
            limit: Msat(DEFAULT_CREDIT_LIMIT_MSAT),
            max_unpaid_age_ms: DEFAULT_CREDIT_MAX_UNPAID_AGE_MS,
        }
    }
}

/// Where an invoice stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum InvoiceState {
    /// Sent to the buyer, not paid.
    Issued,
    /// A payment of at least the amount was seen (unconfirmed or shallow).
    Paid {
        /// The payment's outpoint, as `txid:vout`.
        outpoint: String,
        /// Confirmations so far.
        confirmations: u32,
    },
    /// The payment has the confirmations the policy requires.
    Confirmed {
        /// The payment's outpoint.
        outpoint: String,
    },
    /// Closed: confirmed and acknowledged to the buyer.
    Settled {
        /// The payment's outpoint.
        outpoint: String,
    },
    /// Not paid in time; its amount went back to accrued, to be invoiced again.
    Expired,
}

/// An invoice as the provider tracks it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceRecord {
    /// The buyer.
    pub buyer: PublicKey,
    /// The receipts billed.
    pub receipts: Vec<ContentId>,
    /// Amount in msat (a multiple of the policy's unit when issued).
    pub amount: Msat,
    /// When it was issued.
    pub issued_at: Timestamp,
    /// When it stops being payable.
    pub expires_at: Timestamp,
    /// State.
    pub state: InvoiceState,
}

impl InvoiceRecord {
    /// Amount in sats.
    pub fn amount_sat(&self) -> u64 {
        self.amount.0 / 1000
    }
}

/// Per-buyer totals in msat. They always add up to the buyer's receipts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Earnings {
    /// Countersigned receipts not yet invoiced (including sub-sat remainders).
    pub accrued: Msat,
    /// In invoices that are issued and unpaid.
    pub invoiced: Msat,
    /// In invoices whose payment was seen but is not confirmed.
    pub paid: Msat,
    /// In invoices whose payment is confirmed.
    pub confirmed: Msat,
    /// In settled invoices.
    pub settled: Msat,
}

impl Earnings {
    /// Everything owed, paid or not: the sum of the buyer's receipts.
    pub fn total(&self) -> Option<Msat> {
        self.accrued
            .checked_add(self.invoiced)?
            .checked_add(self.paid)?
            .checked_add(self.confirmed)?
            .checked_add(self.settled)
    }

    /// Owed and not yet confirmed: what counts against credit.
    pub fn outstanding(&self) -> Option<Msat> {
        self.accrued
            .checked_add(self.invoiced)?
            .checked_add(self.paid)
    }
}

/// A settlement operation that cannot be applied.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SettleError {
    /// The receipt was already accrued.
    #[error("receipt {0} is already accounted for")]
    DuplicateReceipt(ContentId),
    /// No invoice with this id.
    #[error("no invoice {0}")]
    UnknownInvoice(ContentId),
    /// An invoice with this id exists already.
    #[error("invoice {0} exists already")]
    DuplicateInvoice(ContentId),
    /// The transition does not apply in the invoice's current state.
    #[error("invoice {id}: cannot {action} an invoice that is {state}")]
    BadTransition {
        /// The invoice.
        id: ContentId,
        /// What was attempted.
        action: &'static str,
        /// Its state.
        state: &'static str,
    },
    /// The payment is smaller than the invoice.
    #[error("invoice {id}: paid {paid_sat} sat, {amount_sat} sat are due")]
    Underpaid {
        /// The invoice.
        id: ContentId,
        /// Paid.
        paid_sat: u64,
        /// Due.
        amount_sat: u64,
    },
    /// An amount overflowed.
    #[error("amount overflow")]
    Overflow,
}

/// Why a buyer may not open a new agreement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CreditDenied {
    /// The buyer owes too much.
    #[error("buyer owes {owed} unpaid, over the credit limit of {limit}; pay open invoices first")]
    OverLimit {
        /// Outstanding amount.
        owed: Msat,
        /// The limit.
        limit: Msat,
    },
    /// An invoice has been unpaid for too long.
    #[error("invoice {invoice} has been unpaid for {age_ms} ms (limit {max_ms} ms); pay it first")]
    Overdue {
        /// The oldest unpaid invoice.
        invoice: ContentId,
        /// Its age.
        age_ms: u64,
        /// The limit.
        max_ms: u64,
    },
}

/// An invoice the policy says is due now: the provider signs an `Invoice` for it (with a
/// fresh address) and records it with [`ProviderLedger::issue`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceDraft {
    /// The buyer.
    pub buyer: PublicKey,
    /// The receipts to bill.
    pub receipts: Vec<ContentId>,
    /// Whole sats, in msat.
    pub amount: Msat,
}

#[derive(Debug, Clone, Default)]
struct BuyerAccount {
    /// Receipts not yet invoiced, in accrual order, with their charge and time.
    pending: Vec<(ContentId, Msat, Timestamp)>,
    /// Sum of `pending` charges plus sub-sat carry from earlier invoices.
    accrued: Msat,
}

/// A provider's settlement book: every buyer's receipts and invoices.
#[derive(Debug, Clone, Default)]
pub struct ProviderLedger {
    buyers: BTreeMap<PublicKey, BuyerAccount>,
    invoices: BTreeMap<ContentId, InvoiceRecord>,
    seen: std::collections::BTreeSet<ContentId>,
}

fn state_name(s: &InvoiceState) -> &'static str {
    match s {
        InvoiceState::Issued => "issued",
        InvoiceState::Paid { .. } => "paid",
        InvoiceState::Confirmed { .. } => "confirmed",
        InvoiceState::Settled { .. } => "settled",
        InvoiceState::Expired => "expired",
    }
}

impl ProviderLedger {
    /// An empty ledger.
    pub fn new() -> ProviderLedger {
        ProviderLedger::default()
    }

    /// Records a countersigned receipt's charge against its buyer. Each receipt counts once.
    pub fn accrue(
        &mut self,
        receipt: ContentId,
        buyer: PublicKey,
        charge: Msat,
        at: Timestamp,
    ) -> Result<(), SettleError> {
        if self.seen.contains(&receipt) {
            return Err(SettleError::DuplicateReceipt(receipt));
        }
        let acct = self.buyers.entry(buyer).or_default();
        acct.accrued = acct
            .accrued
            .checked_add(charge)
            .ok_or(SettleError::Overflow)?;
        acct.pending.push((receipt, charge, at));
        self.seen.insert(receipt);
        Ok(())
    }

    /// The invoices due at `now` under `policy`: one per buyer whose accrued amount reached
    /// the minimum, or whose oldest pending receipt is older than the maximum age (and who is
    /// owed at least one [`InvoicePolicy::unit`]).
    pub fn due(&self, now: Timestamp, policy: &InvoicePolicy) -> Vec<InvoiceDraft> {
        let unit = policy.unit.0.max(1);
        let mut out = Vec::new();
        for (buyer, acct) in &self.buyers {
            let whole = Msat(acct.accrued.0 - acct.accrued.0 % unit);
            if whole == Msat::ZERO || acct.pending.is_empty() {
                continue;
            }
            let oldest = acct.pending.iter().map(|p| p.2).min().unwrap_or(now);
            if acct.accrued >= policy.min_amount || now.since(oldest) >= policy.max_age_ms {
                out.push(InvoiceDraft {
                    buyer: *buyer,
                    receipts: acct.pending.iter().map(|p| p.0).collect(),
                    amount: whole,
                });
            }
        }
        out
    }

    /// Records an issued invoice for `draft` (the signed `Invoice`'s id is `id`): its amount
    /// leaves accrued, and its sub-sat remainder stays there.
    pub fn issue(
        &mut self,
        id: ContentId,
        draft: &InvoiceDraft,
        now: Timestamp,
        policy: &InvoicePolicy,
    ) -> Result<(), SettleError> {
        if self.invoices.contains_key(&id) {
            return Err(SettleError::DuplicateInvoice(id));
        }
        let acct = self.buyers.entry(draft.buyer).or_default();
        let rest = acct
            .accrued
            .checked_sub(draft.amount)
            .ok_or(SettleError::Overflow)?;
        acct.accrued = rest;
        acct.pending.retain(|p| !draft.receipts.contains(&p.0));
        self.invoices.insert(
            id,
            InvoiceRecord {
                buyer: draft.buyer,
                receipts: draft.receipts.clone(),
                amount: draft.amount,
                issued_at: now,
                expires_at: now.plus_ms(policy.ttl_ms),
                state: InvoiceState::Issued,
            },
        );
        Ok(())
    }

    fn invoice_mut(&mut self, id: ContentId) -> Result<&mut InvoiceRecord, SettleError> {
        self.invoices
            .get_mut(&id)
            .ok_or(SettleError::UnknownInvoice(id))
    }

    /// A payment to the invoice's address was seen with `confirmations` so far. Underpayment
    /// is refused and the invoice stays issued. Applies the confirmation policy at once.
    pub fn payment_seen(
        &mut self,
        id: ContentId,
        outpoint: String,
        paid_sat: u64,
        confirmations: u32,
        policy: &ConfirmationPolicy,
    ) -> Result<&InvoiceState, SettleError> {
        let inv = self
            .invoices
            .get(&id)
            .ok_or(SettleError::UnknownInvoice(id))?;
        let was_expired = match inv.state {
            InvoiceState::Issued => false,
            // A payment may arrive after expiry: the money is real, so accept it as long as
            // the invoice's receipts have not been billed again meanwhile.
            InvoiceState::Expired => true,
            ref s => {
                return Err(SettleError::BadTransition {
                    id,
                    action: "record a payment for",
                    state: state_name(s),
                });
            }
        };
        if paid_sat < inv.amount_sat() {
            return Err(SettleError::Underpaid {
                id,
                paid_sat,
                amount_sat: inv.amount_sat(),
            });
        }
        if was_expired {
            let (buyer, amount, receipts) = (inv.buyer, inv.amount, inv.receipts.clone());
            let acct = self.buyers.entry(buyer).or_default();
            let all_pending = receipts
                .iter()
                .all(|r| acct.pending.iter().any(|p| p.0 == *r));
            if !all_pending || acct.accrued < amount {
                return Err(SettleError::BadTransition {
                    id,
                    action: "record a payment for",
                    state: "expired and billed again",
                });
            }
            // Expiry had returned the amount to accrued; the payment claims it back.
            acct.accrued = Msat(acct.accrued.0 - amount.0);
            acct.pending.retain(|p| !receipts.contains(&p.0));
        }
        let inv = self.invoice_mut(id)?;
        inv.state = InvoiceState::Paid {
            outpoint,
            confirmations,
        };
        self.confirmations(id, confirmations, policy)
    }

    /// The payment now has `confirmations`; moves Paid → Confirmed once the policy is met, and
    /// Confirmed → Paid when a reorganisation left it below the policy. Settled is final.
    pub fn confirmations(
        &mut self,
        id: ContentId,
        confirmations: u32,
        policy: &ConfirmationPolicy,
    ) -> Result<&InvoiceState, SettleError> {
        let inv = self.invoice_mut(id)?;
        let need = policy.required(inv.amount_sat());
        match &mut inv.state {
            InvoiceState::Paid {
                outpoint,
                confirmations: c,
            } => {
                *c = confirmations;
                if confirmations >= need {
                    let outpoint = std::mem::take(outpoint);
                    inv.state = InvoiceState::Confirmed { outpoint };
                }
            }
            // A reorganisation made the payment shallower than the policy again.
            InvoiceState::Confirmed { outpoint } if confirmations < need => {
                let outpoint = std::mem::take(outpoint);
                inv.state = InvoiceState::Paid {
                    outpoint,
                    confirmations,
                };
            }
            InvoiceState::Confirmed { .. } | InvoiceState::Settled { .. } => {}
            s => {
                return Err(SettleError::BadTransition {
                    id,
                    action: "confirm",
                    state: state_name(s),
                });
            }
        }
        Ok(&inv.state)
    }

    /// The payment disappeared from the chain (double-spent or reorganised out): the invoice
    /// goes back to issued (payable again; it keeps its original expiry).
    pub fn payment_vanished(&mut self, id: ContentId) -> Result<(), SettleError> {
        let inv = self.invoice_mut(id)?;
        match inv.state {
            InvoiceState::Paid { .. } | InvoiceState::Confirmed { .. } => {
                inv.state = InvoiceState::Issued;
                Ok(())
            }
            ref s => Err(SettleError::BadTransition {
                id,
                action: "unwind the payment of",
                state: state_name(s),
            }),
        }
    }

    /// Confirmed → Settled, once the provider has acknowledged the payment to the buyer.
    pub fn settle(&mut self, id: ContentId) -> Result<(), SettleError> {
        let inv = self.invoice_mut(id)?;
        match &mut inv.state {
            InvoiceState::Confirmed { outpoint } => {
                let outpoint = std::mem::take(outpoint);
                inv.state = InvoiceState::Settled { outpoint };
                Ok(())
            }
            s => Err(SettleError::BadTransition {
                id,
                action: "settle",
                state: state_name(s),
            }),
        }
    }

    /// Issued invoices past their expiry become expired; their amount returns to the buyer's
    /// accrued balance (to be invoiced again). Returns the ids expired.
    pub fn expire(&mut self, now: Timestamp) -> Vec<ContentId> {
        let mut expired = Vec::new();
        for (id, inv) in &mut self.invoices {
            if inv.state == InvoiceState::Issued && inv.expires_at <= now {
                inv.state = InvoiceState::Expired;
                expired.push(*id);
                let acct = self.buyers.entry(inv.buyer).or_default();
                // Cannot overflow: the amount was taken out of accrued when issued.
                acct.accrued = Msat(acct.accrued.0.saturating_add(inv.amount.0));
                for r in &inv.receipts {
                    acct.pending.push((*r, Msat::ZERO, inv.issued_at));
                }
            }
        }
        expired
    }

    /// Whether `buyer` may open a new agreement at `now`.
    pub fn check_credit(
        &self,
        buyer: &PublicKey,
        now: Timestamp,
        policy: &CreditPolicy,
    ) -> Result<(), CreditDenied> {
        let e = self.earnings(buyer);
        let owed = e.outstanding().unwrap_or(Msat(u64::MAX));
        if owed > policy.limit {
            return Err(CreditDenied::OverLimit {
                owed,
                limit: policy.limit,
            });
        }
        let oldest = self
            .invoices
            .iter()
            .filter(|(_, i)| {
                &i.buyer == buyer && matches!(i.state, InvoiceState::Issued | InvoiceState::Expired)
            })
            .min_by_key(|(_, i)| i.issued_at);
        if let Some((id, inv)) = oldest {
            let age = now.since(inv.issued_at);
            if age > policy.max_unpaid_age_ms {
                return Err(CreditDenied::Overdue {
                    invoice: *id,
                    age_ms: age,
                    max_ms: policy.max_unpaid_age_ms,
                });
            }
        }
        Ok(())
    }

    /// What `buyer`'s countersigned receipts accrued and no invoice billed yet (O(1), unlike
    /// [`ProviderLedger::earnings`], which walks the invoices).
    pub fn accrued(&self, buyer: &PublicKey) -> Msat {
        self.buyers.get(buyer).map_or(Msat::ZERO, |a| a.accrued)
    }

    /// A buyer's totals.
    pub fn earnings(&self, buyer: &PublicKey) -> Earnings {
        let mut e = Earnings {
            accrued: self.accrued(buyer),
            ..Earnings::default()
        };
        for inv in self.invoices.values().filter(|i| &i.buyer == buyer) {
            let slot = match inv.state {
                InvoiceState::Issued => &mut e.invoiced,
                InvoiceState::Paid { .. } => &mut e.paid,
                InvoiceState::Confirmed { .. } => &mut e.confirmed,
                InvoiceState::Settled { .. } => &mut e.settled,
                // Counted in accrued again.
                InvoiceState::Expired => continue,
            };
            *slot = Msat(slot.0.saturating_add(inv.amount.0));
        }
        e
    }

    /// Every buyer with an account, in key order.
    pub fn buyers(&self) -> impl Iterator<Item = &PublicKey> {
        self.buyers.keys()
    }

    /// An invoice.
    pub fn invoice(&self, id: &ContentId) -> Option<&InvoiceRecord> {
        self.invoices.get(id)
    }

    /// All invoices, by id.
    pub fn invoices(&self) -> impl Iterator<Item = (&ContentId, &InvoiceRecord)> {
        self.invoices.iter()
    }
}
