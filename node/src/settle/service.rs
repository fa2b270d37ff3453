//! The settlement service: credit checks, accrual, invoicing, the chain watch, payments and
//! notices.
//!
//! Over 800 lines on purpose: `Settlement` is one service whose provider and buyer halves
//! share its ledger, wallets and store under its locks; its types and records are in
//! `super::records`, its config section in `super::section`.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use hashgrid_lightning::bind::{Bill, description_hash};
use hashgrid_lightning::{Expected, LightningBackend, LnEvent, PaymentHash, PaymentStatus};
use hashgrid_market::settlement::{
    CreditDenied, InvoiceDraft, InvoiceRecord, InvoiceState, ProviderLedger, SettleError,
};
use hashgrid_protocol::exchange::{InvoiceStatus, SettleReply, SettleRequest};
use hashgrid_protocol::{
    ContentId, Invoice, InvoicePayment, Keypair, Msat, Network, PaymentProof, PublicKey, Receipt,
    Signed, Timestamp,
};
use libp2p::PeerId;
use serde::Serialize;
use tracing::{debug, info, warn};

use crate::jobs::{JobRecord, peer_of};
use crate::node::command::Net;
use crate::store::{JobTree, Store, StoreError, StoreSlot};
use crate::wallet::{ChainSource, Wallet, WalletError, bip21, bitcoin};

use super::records::{
    InInvoice, LedgerEvent, OutInvoice, PayState, Position, SettleMode, SettlementConfig,
    SettlementError, apply, purchases, replay,
};

/// Most provider rounds in one pass while receipts keep making invoices due (the rest wait for
/// the next pass).
const MAX_ROUNDS: usize = 4;

pub(super) struct LedgerState {
    pub(super) ledger: ProviderLedger,
    pub(super) next_key: u64,
}

/// The node's settlement service, shared by the swarm task (credit checks, accruals, inbound
/// requests) and the settlement task (invoicing, chain watching, deliveries, payments).
pub(crate) struct Settlement {
    pub(super) cfg: SettlementConfig,
    pub(super) key: Keypair,
    pub(super) network: Network,
    /// The node's store; closed (with the wallets) when the node stops, so its lock is free.
    pub(super) slot: StoreSlot,
    pub(super) state: Mutex<LedgerState>,
    /// What this node owes each provider (countersigned receipts as buyer).
    pub(super) purchases: Mutex<BTreeMap<PublicKey, Msat>>,
    pub(super) payout: Mutex<Option<Arc<Mutex<Wallet>>>>,
    pub(super) wallet: Mutex<Option<Arc<Mutex<Wallet>>>>,
    pub(super) chain: Option<Arc<dyn ChainSource>>,
    /// Opens the channels `[settle] lightning_channels` asks for.
    pub(super) keeper: Arc<super::channels::ChannelKeeper>,
    /// Woken when a countersigned receipt makes a Lightning invoice due, so the invoice
    /// follows the receipt instead of waiting for the next pass.
    pub(super) due: Arc<tokio::sync::Notify>,
    /// Set with `due`; a pass repeats its provider side while it is set.
    pub(super) invoice_due: AtomicBool,
}

impl std::fmt::Debug for Settlement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Settlement")
            .field("mode", &self.cfg.mode)
            .finish_non_exhaustive()
    }
}

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The wall clock as BOLT11 expiry checks want it.
fn now_since_epoch() -> Duration {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
}

/// How long a buyer's pass waits for a Lightning payment to complete before leaving it to
/// the next pass.
const LN_PAY_WAIT: Duration = Duration::from_secs(10);

pub(super) fn outpoint_str(op: &bitcoin::OutPoint) -> String {
    format!("{}:{}", op.txid, op.vout)
}

impl Settlement {
    /// Replays the ledger and opens the wallets.
    pub(crate) fn open(
        cfg: SettlementConfig,
        key: Keypair,
        network: Network,
        store: Store,
        slot: StoreSlot,
    ) -> Result<Settlement, SettlementError> {
        let (ledger, next_key) = replay(&store)?;
        let purchases = purchases(&store)?;
        let (mut payout, mut wallet, mut chain) = (None, None, None);
        if let SettleMode::Onchain(o) = &cfg.mode {
            if let Some(d) = &o.payout_descriptor {
                let w = Wallet::open(store.wallet_tree("payout")?, d, None, o.network)?;
                payout = Some(Arc::new(Mutex::new(w)));
            }
            if let Some(k) = &o.wallet {
                let w = Wallet::open(
                    store.wallet_tree("buyer")?,
                    &k.external,
                    Some(&k.internal),
                    o.network,
                )?;
                wallet = Some(Arc::new(Mutex::new(w)));
            }
            chain = Some(o.chain.clone());
        }
        let mut cfg = cfg;
        if matches!(cfg.mode, SettleMode::Lightning(_)) {
            // Lightning pays msat exactly: a batch is billed to the msat.
            cfg.invoice.unit = Msat(1);
        }
        let s = Settlement {
            cfg,
            key,
            network,
            slot,
            state: Mutex::new(LedgerState { ledger, next_key }),
            purchases: Mutex::new(purchases),
            payout: Mutex::new(payout),
            wallet: Mutex::new(wallet),
            chain,
            keeper: Arc::default(),
            due: Arc::default(),
            invoice_due: AtomicBool::new(false),
        };
        // A receipt countersigned just before a crash may not have reached the ledger.
        for cs in store.all::<hashgrid_protocol::Countersigned<Receipt>>(JobTree::Countersigned)? {
            s.accrue(&cs.signed);
        }
        Ok(s)
    }

    /// The store, while the node runs.
    fn store(&self) -> Result<Store, StoreError> {
        self.slot
            .with(|s| Ok(s.clone()))
            .map_err(|e| e.unwrap_or(StoreError::Closed))
    }

    /// Lets go of the store and the wallets (the node is stopping).
    pub(crate) fn close(&self) {
        lock(&self.payout).take();
        lock(&self.wallet).take();
        if let SettleMode::Lightning(l) = &self.cfg.mode
            && l.stop_with_node
            && let Err(e) = l.backend.stop()
        {
            warn!(error = %e, "stopping the Lightning node");
        }
    }

    fn payout(&self) -> Option<Arc<Mutex<Wallet>>> {
        lock(&self.payout).clone()
    }

    pub(crate) fn interval(&self) -> Duration {
        self.cfg.interval
    }

    fn onchain(&self) -> bool {
        matches!(self.cfg.mode, SettleMode::Onchain(_))
    }

    /// The Lightning node, in Lightning mode.
    fn ln(&self) -> Option<Arc<dyn LightningBackend>> {
        match &self.cfg.mode {
            SettleMode::Lightning(l) => Some(l.backend.clone()),
            _ => None,
        }
    }

    /// The Lightning node's channels and balances, for metrics (`None` in other modes).
    pub(crate) async fn lightning_readings(&self) -> Option<crate::ops::LightningReadings> {
        let ln = self.ln()?;
        tokio::task::spawn_blocking(move || {
            let channels = ln.channels();
            let b = ln.balances();
            let usable = channels.iter().filter(|c| c.usable).count() as u64;
            crate::ops::LightningReadings {
                channels_usable: usable,
                channels_other: channels.len() as u64 - usable,
                outbound_msat: b.outbound_msat,
                inbound_msat: b.inbound_msat,
                onchain_sat: b.onchain_sat,
            }
        })
        .await
        .ok()
    }

    /// What a buyer expects of the Lightning request in `inv`: its network, the invoice's
    /// amount to the msat, and the description hash binding the invoice's receipts.
    fn ln_expected(&self, inv: &Invoice) -> Option<Expected> {
        let SettleMode::Lightning(l) = &self.cfg.mode else {
            return None;
        };
        Some(Expected {
            network: l.network.to_bitcoin(),
            amount: inv.amount,
            description_hash: description_hash(&Bill {
                provider: &inv.provider,
                buyer: &inv.buyer,
                seq: inv.seq,
                amount: inv.amount,
                receipts: &inv.receipts,
            }),
        })
    }

    /// Applies a transition and logs it (flushed). Nothing is logged if it does not apply.
    ///
    /// The market's transitions change nothing when they fail, so the event is applied in
    /// place; if it cannot be logged, the ledger is rebuilt from the log, which stays the truth.
    fn record(&self, ev: LedgerEvent) -> Result<(), SettlementError> {
        let mut st = lock(&self.state);
        apply(&mut st.ledger, &ev)?;
        let key = st.next_key;
        let logged = self.store().and_then(|store| {
            store.put(JobTree::SettleLog, &key.to_be_bytes(), &ev)?;
            if let Some(d) = ev.durable() {
                store.push_event(&d)?;
            }
            store.flush()
        });
        match logged {
            Ok(()) => {
                st.next_key = key + 1;
                Ok(())
            }
            Err(e) => {
                if let Ok((ledger, next)) = self
                    .store()
                    .map_err(SettlementError::from)
                    .and_then(|s| replay(&s))
                {
                    st.ledger = ledger;
                    st.next_key = next;
                }
                Err(e.into())
            }
        }
    }

    /// Writes one record and flushes it (before anything that depends on it is acknowledged).
    fn save<T: Serialize>(&self, t: JobTree, id: &ContentId, value: &T) -> Result<(), StoreError> {
        self.save_reporting(t, id, value, None)
    }

    /// [`save`](Self::save), with a durable event for the application in the same flush.
    fn save_reporting<T: Serialize>(
        &self,
        t: JobTree,
        id: &ContentId,
        value: &T,
        event: Option<crate::event::DurableEvent>,
    ) -> Result<(), StoreError> {
        let store = self.store()?;
        store.put(t, id.as_bytes(), value)?;
        if let Some(ev) = &event {
            store.push_event(ev)?;
        }
        store.flush()
    }

    /// Whether `buyer` may open a new agreement now. In ledger mode the debt is netted against
    /// what this node owes the buyer for its own purchases.
    pub(crate) fn check_credit(&self, buyer: &PublicKey) -> Result<(), CreditDenied> {
        let now = Timestamp::now();
        let st = lock(&self.state);
        if self.onchain() {
            return st.ledger.check_credit(buyer, now, &self.cfg.credit);
        }
        let owed = st
            .ledger
            .earnings(buyer)
            .outstanding()
            .unwrap_or(Msat(u64::MAX));
        let ours = lock(&self.purchases)
            .get(buyer)
            .copied()
            .unwrap_or(Msat::ZERO);
        let net = Msat(owed.0.saturating_sub(ours.0));
        if net > self.cfg.credit.limit {
            return Err(CreditDenied::OverLimit {
                owed: net,
                limit: self.cfg.credit.limit,
            });
        }
        Ok(())
    }

    /// Provider side: a receipt was countersigned.
    pub(crate) fn accrue(&self, receipt: &Signed<Receipt>) {
        let Ok(r) = receipt.decode_unverified() else {
            return;
        };
        let ev = LedgerEvent::Accrue {
            receipt: receipt.id(),
            buyer: r.buyer,
            charge: r.charge,
            at: Timestamp::now(),
        };
        match self.record(ev) {
            Ok(()) => {
                // Over Lightning the invoice follows the receipt: one per receipt, or per
                // batch once the accrued msat reach the threshold.
                let due = matches!(self.cfg.mode, SettleMode::Lightning(_))
                    && lock(&self.state).ledger.accrued(&r.buyer)
                        >= self.cfg.invoice.min_amount.max(Msat(1));
                if due {
                    self.invoice_due.store(true, Ordering::SeqCst);
                    self.due.notify_one();
                }
            }
            Err(SettlementError::Ledger(SettleError::DuplicateReceipt(_))) => {}
            Err(e) => warn!(error = %e, "could not accrue a countersigned receipt"),
        }
    }

    /// Woken when an invoice is due before the next pass (see [`Settlement::accrue`]).
    pub(crate) fn due_signal(&self) -> Arc<tokio::sync::Notify> {
        self.due.clone()
    }

    /// Buyer side: this node countersigned a receipt (it owes the provider).
    pub(crate) fn purchased(&self, receipt: &Receipt) {
        let mut p = lock(&self.purchases);
        let e = p.entry(receipt.provider).or_insert(Msat::ZERO);
        *e = Msat(e.0.saturating_add(receipt.charge.0));
    }

    /// Per-counterparty positions.
    pub(crate) fn positions(&self) -> BTreeMap<PublicKey, Position> {
        let st = lock(&self.state);
        let mut out: BTreeMap<PublicKey, Position> = BTreeMap::new();
        for b in st.ledger.buyers() {
            out.entry(*b).or_default().as_buyer = st.ledger.earnings(b).into();
        }
        for (p, owed) in lock(&self.purchases).iter() {
            out.entry(*p).or_default().owed_to_it = *owed;
        }
        out
    }

    /// The ledger's record of an invoice.
    pub(crate) fn invoice_record(&self, id: &ContentId) -> Option<InvoiceRecord> {
        lock(&self.state).ledger.invoice(id).cloned()
    }

    /// The buyer's wallet.
    pub(crate) fn buyer_wallet(&self) -> Option<Arc<Mutex<Wallet>>> {
        lock(&self.wallet).clone()
    }

    /// The chain backend.
    pub(crate) fn chain(&self) -> Option<Arc<dyn ChainSource>> {
        self.chain.clone()
    }

    // ---- inbound requests (answered on the blocking pool: local reads and flushed writes) ----

    pub(crate) fn on_request(
        self: &Arc<Self>,
        peer: PeerId,
        req: SettleRequest,
        net: &Net,
    ) -> SettleReply {
        match req {
            SettleRequest::Invoice(s) => self.on_invoice(peer, s, net),
            SettleRequest::Proof(p) => self.on_proof(peer, p),
            SettleRequest::Settled {
                invoice_id,
                outpoint,
            } => self.on_settled(peer, invoice_id, outpoint),
            SettleRequest::Status { invoice_id } => {
                SettleReply::Status(self.status_for(peer, &invoice_id))
            }
        }
    }

    fn status_for(&self, peer: PeerId, id: &ContentId) -> InvoiceStatus {
        let Ok(Some(out)) = self
            .store()
            .and_then(|st| st.get::<OutInvoice>(JobTree::InvoicesOut, id.as_bytes()))
        else {
            return InvoiceStatus::Unknown;
        };
        let Some(rec) = self.invoice_record(id) else {
            return InvoiceStatus::Unknown;
        };
        if peer_of(&rec.buyer) != Some(peer) {
            return InvoiceStatus::Unknown;
        }
        let required = self.cfg.confirmations.required(rec.amount_sat());
        match rec.state {
            InvoiceState::Issued => InvoiceStatus::Issued {
                seen_sat: out.seen_sat,
                problem: out.problem,
            },
            InvoiceState::Paid {
                outpoint,
                confirmations,
            } => InvoiceStatus::Paid {
                outpoint,
                confirmations,
                required,
            },
            InvoiceState::Confirmed { outpoint } => InvoiceStatus::Confirmed { outpoint },
            InvoiceState::Settled { outpoint } => InvoiceStatus::Settled { outpoint },
            InvoiceState::Expired => InvoiceStatus::Expired,
        }
    }

    /// Buyer side: an invoice arrives. Accepted only if it bills receipts this node
    /// countersigned with that provider and, with every other invoice from it that is not
    /// refused or superseded, does not exceed what they charged.
    fn on_invoice(self: &Arc<Self>, peer: PeerId, s: Signed<Invoice>, net: &Net) -> SettleReply {
        let inv = match s.verify(&self.network) {
            Ok(i) => i,
            Err(e) => return SettleReply::Refused(format!("invoice: {e}")),
        };
        if inv.buyer != self.key.public() {
            return SettleReply::Refused("the invoice is not addressed to this node".into());
        }
        if peer_of(&inv.provider) != Some(peer) {
            return SettleReply::Refused("the invoice is not signed by the sending peer".into());
        }
        let id = s.id();
        if let Ok(Some(_)) = self
            .store()
            .and_then(|st| st.get::<InInvoice>(JobTree::InvoicesIn, id.as_bytes()))
        {
            return SettleReply::Ack;
        }
        match self.check_invoice(&inv) {
            Ok(superseded) => {
                let rec = InInvoice {
                    invoice: s,
                    state: PayState::Unpaid,
                    received_at: Timestamp::now(),
                };
                let res = (|| {
                    for mut old in superseded {
                        old.state = PayState::Superseded;
                        self.store()?.put(
                            JobTree::InvoicesIn,
                            old.invoice.id().as_bytes(),
                            &old,
                        )?;
                    }
                    self.save(JobTree::InvoicesIn, &id, &rec)
                })();
                if let Err(e) = res {
                    return SettleReply::Refused(format!("buyer store: {e}"));
                }
                info!(invoice = %id.short(), amount_msat = inv.amount.0, "invoice received");
                if self.cfg.auto_pay && (self.buyer_wallet().is_some() || self.ln().is_some()) {
                    let me = self.clone();
                    let net = net.clone();
                    tokio::spawn(async move { me.pay_invoice(id, &net).await });
                }
                SettleReply::Ack
            }
            Err(reason) => {
                warn!(invoice = %id.short(), %reason, "invoice refused");
                let rec = InInvoice {
                    invoice: s,
                    state: PayState::Refused(reason.clone()),
                    received_at: Timestamp::now(),
                };
                let _ = self.save(JobTree::InvoicesIn, &id, &rec);
                SettleReply::Refused(reason)
            }
        }
    }

    /// Returns the earlier unpaid invoices this one re-bills (expired ones).
    fn check_invoice(&self, inv: &Invoice) -> Result<Vec<InInvoice>, String> {
        let mut charged: BTreeMap<ContentId, Msat> = BTreeMap::new();
        let records = self
            .store()
            .and_then(|st| st.all::<JobRecord>(JobTree::BuyerJobs))
            .map_err(|e| format!("buyer store: {e}"))?;
        for rec in records {
            if let Some(cs) = &rec.receipt
                && let Ok(r) = cs.signed.decode_unverified()
                && r.provider == inv.provider
            {
                charged.insert(cs.id(), r.charge);
            }
        }
        for r in &inv.receipts {
            if !charged.contains_key(r) {
                return Err(format!(
                    "receipt {} is not one this node countersigned with this provider",
                    r.short()
                ));
            }
        }
        match (&inv.payment, &self.cfg.mode) {
            (InvoicePayment::Onchain { amount_sat, .. }, SettleMode::Onchain(_))
                if *amount_sat * 1000 == inv.amount.0 => {}
            (InvoicePayment::Onchain { .. }, SettleMode::Onchain(_)) => {
                return Err("the on-chain amount differs from the invoice amount".into());
            }
            (InvoicePayment::Ledger, SettleMode::Ledger) => {}
            (InvoicePayment::Lightning { request }, SettleMode::Lightning(_)) => {
                let expected = self.ln_expected(inv).ok_or("not in Lightning mode")?;
                let req = hashgrid_lightning::invoice::parse(request)
                    .map_err(|e| format!("lightning request: {e}"))?;
                hashgrid_lightning::invoice::check(&req, &expected, now_since_epoch())
                    .map_err(|e| format!("lightning request: {e}"))?;
            }
            _ => return Err("the invoice's payment method is not this node's".into()),
        }
        if !matches!(inv.payment, InvoicePayment::Lightning { .. })
            && !inv.amount.0.is_multiple_of(1000)
        {
            return Err("the amount is not a whole number of sats".into());
        }
        let now = Timestamp::now();
        let mut committed = 0u64;
        let mut superseded = Vec::new();
        for old in self
            .store()
            .and_then(|st| st.all::<InInvoice>(JobTree::InvoicesIn))
            .map_err(|e| format!("buyer store: {e}"))?
        {
            let Some(b) = old.body() else { continue };
            if b.provider != inv.provider {
                continue;
            }
            match old.state {
                PayState::Refused(_) | PayState::Superseded => {}
                PayState::Unpaid
                    if b.expires_at <= now
                        && b.receipts.iter().any(|r| inv.receipts.contains(r)) =>
                {
                    superseded.push(old);
                }
                _ => committed = committed.saturating_add(b.amount.0),
            }
        }
        let total: u64 = charged.values().map(|m| m.0).sum();
        if committed.saturating_add(inv.amount.0) > total {
            return Err(format!(
                "with earlier invoices it bills {} msat, more than the {} msat of countersigned receipts",
                committed.saturating_add(inv.amount.0),
                total
            ));
        }
        Ok(superseded)
    }

    /// Provider side: a buyer says it paid. Recorded; the chain decides on the next pass.
    fn on_proof(&self, peer: PeerId, s: Signed<PaymentProof>) -> SettleReply {
        let proof = match s.verify(&self.network) {
            Ok(p) => p,
            Err(e) => return SettleReply::Refused(format!("payment proof: {e}")),
        };
        if peer_of(&proof.buyer) != Some(peer) || proof.provider != self.key.public() {
            return SettleReply::Refused("the proof is not from this invoice's buyer".into());
        }
        let Ok(Some(mut out)) = self
            .store()
            .and_then(|st| st.get::<OutInvoice>(JobTree::InvoicesOut, proof.invoice_id.as_bytes()))
        else {
            return SettleReply::Status(InvoiceStatus::Unknown);
        };
        let claim = format!("{}:{}", proof.txid, proof.vout);
        if out
            .problem
            .as_deref()
            .is_none_or(|p| !p.starts_with(&claim))
        {
            out.problem = Some(format!("{claim} claimed, not yet seen"));
            if let Err(e) = self.save(JobTree::InvoicesOut, &proof.invoice_id, &out) {
                return SettleReply::Refused(format!("provider store: {e}"));
            }
        }
        SettleReply::Status(self.status_for(peer, &proof.invoice_id))
    }

    /// Buyer side: the provider settled an invoice.
    fn on_settled(&self, peer: PeerId, id: ContentId, outpoint: String) -> SettleReply {
        let Ok(Some(mut rec)) = self
            .store()
            .and_then(|st| st.get::<InInvoice>(JobTree::InvoicesIn, id.as_bytes()))
        else {
            return SettleReply::Refused("unknown invoice".into());
        };
        if rec.body().and_then(|b| peer_of(&b.provider)) != Some(peer) {
            return SettleReply::Refused("unknown invoice".into());
        }
        // Reported once: a provider repeating the notice adds no events.
        let event = (!matches!(rec.state, PayState::Settled { .. })).then(|| {
            crate::event::DurableEvent::PaymentSettled {
                invoice: id,
                outpoint: outpoint.clone(),
            }
        });
        rec.state = match std::mem::replace(&mut rec.state, PayState::Unpaid) {
            PayState::LnPaid { hash, preimage } | PayState::LnSettled { hash, preimage } => {
                PayState::LnSettled { hash, preimage }
            }
            _ => PayState::Settled { outpoint },
        };
        match self.save_reporting(JobTree::InvoicesIn, &id, &rec, event) {
            Ok(()) => SettleReply::Ack,
            Err(e) => SettleReply::Refused(format!("buyer store: {e}")),
        }
    }

    // ---- the settlement task ----

    /// One pass: expire, invoice, watch the chain, deliver, pay.
    pub(crate) async fn pass(self: &Arc<Self>, net: &Net) {
        // A receipt that made an invoice due while this pass ran is invoiced by another round
        // (the signal that started the pass then found it busy).
        for _ in 0..MAX_ROUNDS {
            self.invoice_due.store(false, Ordering::SeqCst);
            if let Err(e) = self.provider_pass(net).await {
                warn!(error = %e, "settlement pass (provider side) failed");
            }
            if !self.invoice_due.load(Ordering::SeqCst) {
                break;
            }
        }
        // After the provider side, which drained the Lightning node's events (a funded
        // channel lets the keeper open the next one).
        self.keep_channels().await;
        if let Err(e) = self.buyer_pass(net).await {
            warn!(error = %e, "settlement pass (buyer side) failed");
        }
    }

    async fn provider_pass(self: &Arc<Self>, net: &Net) -> Result<(), SettlementError> {
        let now = Timestamp::now();
        let due_to_expire = lock(&self.state)
            .ledger
            .invoices()
            .any(|(_, i)| i.state == InvoiceState::Issued && i.expires_at <= now);
        if due_to_expire {
            self.record(LedgerEvent::Expire { now })?;
        }
        if let Some(ln) = self.ln() {
            self.lightning_pass(&ln, now).await?;
        } else {
            let Some(payout) = self.payout() else {
                return Ok(());
            };
            let Some(chain) = self.chain.clone() else {
                return Ok(());
            };
            self.onchain_pass(&payout, &chain, now).await?;
        }
        self.deliver(net).await
    }

    /// Lightning: open the configured channels that are missing (at start, and after a
    /// close or force-close), so that an invoice whose payment failed with its channel is paid
    /// over the new one at a later pass.
    async fn keep_channels(&self) {
        let SettleMode::Lightning(l) = &self.cfg.mode else {
            return;
        };
        if l.channels.is_empty() {
            return;
        }
        let (ln, plans, keeper) = (l.backend.clone(), l.channels.clone(), self.keeper.clone());
        if let Err(e) = tokio::task::spawn_blocking(move || keeper.keep(&*ln, &plans)).await {
            warn!(error = %e, "lightning: the channel keeper's task failed");
        }
    }

    /// Lightning, provider side: issue the invoices due (each with a payment request from the
    /// Lightning node), then apply the payments it received. Each event is acknowledged only
    /// after the ledger recorded it (flushed), so a crash in between replays it.
    async fn lightning_pass(
        self: &Arc<Self>,
        ln: &Arc<dyn LightningBackend>,
        now: Timestamp,
    ) -> Result<(), SettlementError> {
        let drafts = lock(&self.state).ledger.due(now, &self.cfg.invoice);
        for d in drafts {
            let seq = self.store()?.next_seq(now.0)?;
            let provider = self.key.public();
            let hash = description_hash(&Bill {
                provider: &provider,
                buyer: &d.buyer,
                seq,
                amount: d.amount,
                receipts: &d.receipts,
            });
            let (l, amount) = (ln.clone(), d.amount);
            let ttl = Duration::from_millis(self.cfg.invoice.ttl_ms);
            let request = tokio::task::spawn_blocking(move || l.invoice(amount, hash, ttl))
                .await
                .map_err(|e| SettlementError::Replay(0, format!("lightning task: {e}")))??;
            let payment = InvoicePayment::Lightning {
                request: request.to_string(),
            };
            self.record_issued(d, seq, payment, None, now)?;
        }
        loop {
            let l = ln.clone();
            let Ok(Some(event)) = tokio::task::spawn_blocking(move || l.next_event()).await else {
                break;
            };
            match event {
                LnEvent::Received { hash, amount } => self.lightning_received(hash, amount)?,
                LnEvent::ChannelPending { channel, funding } => {
                    self.keeper.funded(&channel.peer.to_string());
                    info!(peer = %channel.peer, channel = channel.id, %funding, "lightning channel funded; waiting for confirmations");
                }
                LnEvent::ChannelReady { channel } => {
                    info!(peer = %channel.peer, channel = channel.id, "lightning channel ready");
                }
                LnEvent::ChannelClosed { channel, reason } => {
                    self.keeper.funded(&channel.peer.to_string());
                    warn!(peer = %channel.peer, channel = channel.id, %reason, "lightning channel closed");
                }
                LnEvent::SendFailed { hash, reason } => {
                    warn!(hash = ?hash.map(|h| h.to_string()), %reason, "lightning payment failed; the invoice is retried at the next pass");
                }
                other => debug!(event = ?other, "lightning event"),
            }
            let l = ln.clone();
            tokio::task::spawn_blocking(move || l.event_handled())
                .await
                .map_err(|e| SettlementError::Replay(0, format!("lightning task: {e}")))??;
        }
        Ok(())
    }

    /// A payment arrived for one of this node's payment requests: the invoice is paid and,
    /// Lightning needing no confirmations, confirmed.
    fn lightning_received(&self, hash: PaymentHash, amount: Msat) -> Result<(), SettlementError> {
        let found = self
            .store()?
            .all::<OutInvoice>(JobTree::InvoicesOut)?
            .into_iter()
            .find(|out| {
                let Ok(inv) = out.invoice.decode_unverified() else {
                    return false;
                };
                let InvoicePayment::Lightning { request } = &inv.payment else {
                    return false;
                };
                hashgrid_lightning::invoice::parse(request)
                    .is_ok_and(|r| hashgrid_lightning::invoice::payment_hash(&r) == hash)
            });
        let Some(out) = found else {
            debug!(%hash, "a Lightning payment for no invoice of ours");
            return Ok(());
        };
        let id = out.invoice.id();
        let open = self
            .invoice_record(&id)
            .is_some_and(|r| matches!(r.state, InvoiceState::Issued | InvoiceState::Expired));
        if !open {
            return Ok(());
        }
        let outpoint = format!("lightning:{hash}");
        match self.record(LedgerEvent::PaymentSeen {
            id,
            outpoint: outpoint.clone(),
            paid_sat: amount.0 / 1000,
            confirmations: 0,
            required: 0,
        }) {
            Ok(()) => {
                info!(invoice = %id.short(), amount_msat = amount.0, %outpoint, "paid over lightning")
            }
            Err(e) => warn!(invoice = %id.short(), error = %e, "lightning payment not applied"),
        }
        Ok(())
    }

    /// On chain, provider side: issue the invoices due and follow their addresses.
    async fn onchain_pass(
        self: &Arc<Self>,
        payout: &Arc<Mutex<Wallet>>,
        chain: &Arc<dyn ChainSource>,
        now: Timestamp,
    ) -> Result<(), SettlementError> {
        let (payout, chain) = (payout.clone(), chain.clone());
        // Invoices the policy says are due.
        let drafts = lock(&self.state).ledger.due(now, &self.cfg.invoice);
        for d in drafts {
            self.issue(&payout, d, now)?;
        }
        // Follow every open invoice's address on the chain.
        let open: Vec<(ContentId, InvoiceRecord, OutInvoice)> = {
            let st = lock(&self.state);
            st.ledger
                .invoices()
                .filter(|(_, i)| !matches!(i.state, InvoiceState::Settled { .. }))
                .filter_map(|(id, i)| {
                    self.store()
                        .ok()?
                        .get::<OutInvoice>(JobTree::InvoicesOut, id.as_bytes())
                        .ok()
                        .flatten()
                        .map(|o| (*id, i.clone(), o))
                })
                .collect()
        };
        if !open.is_empty() {
            let p = payout.clone();
            let c = chain.clone();
            let synced = tokio::task::spawn_blocking(move || lock(&p).sync(&*c)).await;
            match synced {
                Ok(Ok(())) => {
                    for (id, rec, out) in &open {
                        self.watch(&payout, &chain, *id, rec, out.clone()).await?;
                    }
                }
                Ok(Err(e)) => warn!(error = %e, "payout wallet sync failed"),
                Err(e) => warn!(error = %e, "payout wallet sync panicked"),
            }
        }
        Ok(())
    }

    /// Deliveries: invoices the buyer has not acknowledged, settlements not yet told.
    async fn deliver(self: &Arc<Self>, net: &Net) -> Result<(), SettlementError> {
        for mut out in self.store()?.all::<OutInvoice>(JobTree::InvoicesOut)? {
            let id = out.invoice.id();
            let Some(rec) = self.invoice_record(&id) else {
                continue;
            };
            let Some(peer) = peer_of(&rec.buyer) else {
                continue;
            };
            if !out.delivered && rec.state == InvoiceState::Issued {
                match net
                    .settle(peer, SettleRequest::Invoice(out.invoice.clone()))
                    .await
                {
                    Ok(SettleReply::Ack) => {
                        out.delivered = true;
                        self.save(JobTree::InvoicesOut, &id, &out)?;
                    }
                    Ok(other) => {
                        warn!(invoice = %id.short(), reply = ?other, "buyer did not accept the invoice")
                    }
                    Err(e) => {
                        debug!(invoice = %id.short(), error = %e, "invoice not delivered yet")
                    }
                }
            }
            if let InvoiceState::Confirmed { outpoint } = &rec.state {
                let req = SettleRequest::Settled {
                    invoice_id: id,
                    outpoint: outpoint.clone(),
                };
                if let Ok(SettleReply::Ack) = net.settle(peer, req).await {
                    self.record(LedgerEvent::Settle { id })?;
                    out.settled_acked = true;
                    self.save(JobTree::InvoicesOut, &id, &out)?;
                    info!(invoice = %id.short(), %outpoint, "invoice settled");
                }
            }
        }
        Ok(())
    }

    fn issue(
        &self,
        payout: &Arc<Mutex<Wallet>>,
        d: InvoiceDraft,
        now: Timestamp,
    ) -> Result<(), SettlementError> {
        // The address index is persisted before the invoice exists: never reused.
        let (index, address) = lock(payout).reveal_address()?;
        let amount_sat = d.amount.0 / 1000;
        let seq = self.store()?.next_seq(now.0)?;
        let payment = InvoicePayment::Onchain {
            address: address.to_string(),
            amount_sat,
        };
        let id = self.record_issued(d, seq, payment, Some(index), now)?;
        info!(
            invoice = %id.short(),
            uri = %bip21(&address.to_string(), amount_sat, &format!("hashgrid invoice {}", id.short())),
            "on-chain invoice issued"
        );
        Ok(())
    }

    /// Signs and stores an invoice for `d` and records it in the ledger (flushed).
    fn record_issued(
        &self,
        d: InvoiceDraft,
        seq: u64,
        payment: InvoicePayment,
        address_index: Option<u32>,
        now: Timestamp,
    ) -> Result<ContentId, SettlementError> {
        let invoice = Invoice {
            provider: self.key.public(),
            buyer: d.buyer,
            seq,
            receipts: d.receipts.clone(),
            amount: d.amount,
            payment,
            created_at: now,
            expires_at: now.plus_ms(self.cfg.invoice.ttl_ms),
        };
        let signed = Signed::sign(&self.key, &self.network, &invoice);
        let id = signed.id();
        let out = OutInvoice {
            invoice: signed,
            address_index,
            delivered: false,
            settled_acked: false,
            seen_sat: 0,
            problem: None,
        };
        self.store()?
            .put(JobTree::InvoicesOut, id.as_bytes(), &out)?;
        self.record(LedgerEvent::Issue {
            id,
            buyer: d.buyer,
            receipts: d.receipts,
            amount: d.amount,
            at: now,
            ttl_ms: self.cfg.invoice.ttl_ms,
        })?;
        info!(
            invoice = %id.short(),
            buyer = %d.buyer.short(),
            amount_msat = d.amount.0,
            "invoice issued"
        );
        Ok(id)
    }

    async fn watch(
        &self,
        payout: &Arc<Mutex<Wallet>>,
        chain: &Arc<dyn ChainSource>,
        id: ContentId,
        rec: &InvoiceRecord,
        mut out: OutInvoice,
    ) -> Result<(), SettlementError> {
        let Some(index) = out.address_index else {
            return Ok(());
        };
        let (received, address) = {
            let w = lock(payout);
            let a = w.address_at(index);
            (w.received_at(&a.script_pubkey()), a)
        };
        let total: u64 = received.iter().map(|r| r.amount_sat).sum();
        let confs = received.iter().map(|r| r.confirmations).min().unwrap_or(0);
        let required = self.cfg.confirmations.required(rec.amount_sat());
        let paid_enough = total >= rec.amount_sat() && !received.is_empty();
        match (&rec.state, paid_enough) {
            (InvoiceState::Issued | InvoiceState::Expired, true) => {
                let outpoint = outpoint_str(&received[0].outpoint);
                match self.record(LedgerEvent::PaymentSeen {
                    id,
                    outpoint: outpoint.clone(),
                    paid_sat: total,
                    confirmations: confs,
                    required,
                }) {
                    Ok(()) => {
                        info!(invoice = %id.short(), %outpoint, confirmations = confs, "payment seen")
                    }
                    Err(e) => warn!(invoice = %id.short(), error = %e, "payment not applied"),
                }
                out.seen_sat = total;
                out.problem = None;
            }
            (InvoiceState::Paid { .. } | InvoiceState::Confirmed { .. }, true) => {
                self.record(LedgerEvent::Confirmations {
                    id,
                    confirmations: confs,
                    required,
                })?;
            }
            (InvoiceState::Paid { .. } | InvoiceState::Confirmed { .. }, false) => {
                warn!(invoice = %id.short(), "payment left the chain (reorganised out or double-spent); invoice open again");
                self.record(LedgerEvent::Vanished { id })?;
                out.seen_sat = total;
            }
            (InvoiceState::Issued | InvoiceState::Expired, false) => {
                if total > 0 && total != out.seen_sat {
                    warn!(invoice = %id.short(), paid_sat = total, due_sat = rec.amount_sat(), "invoice underpaid");
                }
                out.seen_sat = total;
                // A claimed payment that does not show up at the address: find out why.
                if let Some(claim) = out.problem.clone().filter(|p| p.ends_with("not yet seen"))
                    && let Some((txid, vout)) =
                        claim.split_once(' ').and_then(|(op, _)| op.split_once(':'))
                    && let (Ok(txid), Ok(vout)) =
                        (txid.parse::<bitcoin::Txid>(), vout.parse::<usize>())
                {
                    let c = chain.clone();
                    let tx = tokio::task::spawn_blocking(move || c.transaction(&txid))
                        .await
                        .ok()
                        .and_then(|r| r.ok())
                        .flatten();
                    if let Some(tx) = tx {
                        out.problem = Some(match tx.output.get(vout) {
                            None => format!("{txid}:{vout} has no such output"),
                            Some(o) if o.script_pubkey != address.script_pubkey() => format!(
                                "{txid}:{vout} pays another address, not the invoice's {address}"
                            ),
                            Some(o) if o.value.to_sat() < rec.amount_sat() => format!(
                                "{txid}:{vout} pays {} sat, {} sat are due",
                                o.value.to_sat(),
                                rec.amount_sat()
                            ),
                            Some(_) => claim.clone(),
                        });
                    }
                }
            }
            _ => {}
        }
        self.save(JobTree::InvoicesOut, &id, &out)?;
        Ok(())
    }

    async fn buyer_pass(self: &Arc<Self>, net: &Net) -> Result<(), SettlementError> {
        if self.buyer_wallet().is_none() && self.ln().is_none() {
            return Ok(());
        }
        for rec in self.store()?.all::<InInvoice>(JobTree::InvoicesIn)? {
            let id = rec.invoice.id();
            match rec.state {
                PayState::Unpaid if self.cfg.auto_pay => self.pay_invoice(id, net).await,
                PayState::Paying { .. } | PayState::LnPaying { .. } => {
                    self.pay_invoice(id, net).await
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Pays an accepted invoice (or finishes paying it): sign and record the transaction
    /// (flushed), broadcast it, send the proof. Safe to call again at any point.
    pub(crate) async fn pay_invoice(self: &Arc<Self>, id: ContentId, net: &Net) {
        if let Err(e) = self.try_pay(id, net).await {
            warn!(invoice = %id.short(), error = %e, "paying the invoice failed; will retry");
        }
    }

    /// A received invoice's record, as stored.
    fn received_invoice(&self, id: &ContentId) -> Result<InInvoice, String> {
        self.store()
            .map_err(|e| e.to_string())?
            .get::<InInvoice>(JobTree::InvoicesIn, id.as_bytes())
            .map_err(|e| e.to_string())?
            .ok_or_else(|| "unknown invoice".to_string())
    }

    async fn try_pay(self: &Arc<Self>, id: ContentId, net: &Net) -> Result<(), String> {
        if let Some(ln) = self.ln() {
            return self.try_pay_lightning(&ln, id).await;
        }
        let (Some(wallet), Some(chain)) = (self.buyer_wallet(), self.chain.clone()) else {
            return Err("no wallet".into());
        };
        let get = || self.received_invoice(&id);
        let rec = get()?;
        let inv = rec.body().ok_or("undecodable invoice")?;
        let InvoicePayment::Onchain {
            address,
            amount_sat,
        } = inv.payment.clone()
        else {
            return Ok(());
        };
        let (tx, vout) = match &rec.state {
            PayState::Unpaid => {
                let fee = self.cfg.fee_rate_sat_vb;
                let w = wallet.clone();
                let c = chain.clone();
                let made = tokio::task::spawn_blocking(move || -> Result<_, WalletError> {
                    let mut w = lock(&w);
                    w.sync(&*c)?;
                    let to = w.parse_address(&address)?;
                    let tx = w.pay(&to, amount_sat, fee)?;
                    let vout = tx
                        .output
                        .iter()
                        .position(|o| {
                            o.script_pubkey == to.script_pubkey() && o.value.to_sat() == amount_sat
                        })
                        .unwrap_or(0) as u32;
                    Ok((tx, vout))
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
                // Recorded before it is broadcast: a restart rebroadcasts, never pays twice.
                let mut rec = get()?;
                if rec.state != PayState::Unpaid {
                    return Ok(());
                }
                let txid = made.0.compute_txid().to_string();
                rec.state = PayState::Paying {
                    tx: bitcoin::consensus::encode::serialize(&made.0),
                    txid: txid.clone(),
                    vout: made.1,
                };
                let event = crate::event::DurableEvent::PaymentSent {
                    invoice: id,
                    provider: inv.provider,
                    txid,
                    amount_sat,
                };
                self.save_reporting(JobTree::InvoicesIn, &id, &rec, Some(event))
                    .map_err(|e| e.to_string())?;
                made
            }
            PayState::Paying { tx, vout, .. } => {
                let tx: bitcoin::Transaction =
                    bitcoin::consensus::encode::deserialize(tx).map_err(|e| e.to_string())?;
                (tx, *vout)
            }
            _ => return Ok(()),
        };
        let c = chain.clone();
        let t = tx.clone();
        tokio::task::spawn_blocking(move || c.broadcast(&t))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("broadcast: {e}"))?;
        let txid = tx.compute_txid().to_string();
        info!(invoice = %id.short(), %txid, amount_sat, "invoice paid");
        let proof = PaymentProof {
            invoice_id: id,
            buyer: self.key.public(),
            provider: inv.provider,
            txid: txid.clone(),
            vout,
            amount_sat,
            created_at: Timestamp::now(),
        };
        let signed = Signed::sign(&self.key, &self.network, &proof);
        let peer = peer_of(&inv.provider).ok_or("bad provider key")?;
        match net.settle(peer, SettleRequest::Proof(signed)).await {
            Ok(SettleReply::Status(_) | SettleReply::Ack) => {
                let mut rec = get()?;
                if matches!(rec.state, PayState::Paying { .. }) {
                    rec.state = PayState::Paid {
                        outpoint: format!("{txid}:{vout}"),
                    };
                    self.save(JobTree::InvoicesIn, &id, &rec)
                        .map_err(|e| e.to_string())?;
                }
                Ok(())
            }
            Ok(SettleReply::Refused(r)) => Err(format!("provider refused the proof: {r}")),
            Err(e) => Err(format!("proof not delivered: {e}")),
        }
    }

    /// Pays an accepted Lightning invoice (or finds out how its payment went): the intent is
    /// recorded (flushed) before the request is paid, the request is checked again against the
    /// receipts it bills, and the preimage is stored once the payment completes. Paying the
    /// same request twice sends nothing, so this is safe to call again at any point.
    async fn try_pay_lightning(
        self: &Arc<Self>,
        ln: &Arc<dyn LightningBackend>,
        id: ContentId,
    ) -> Result<(), String> {
        let get = || self.received_invoice(&id);
        let mut rec = get()?;
        let inv = rec.body().ok_or("undecodable invoice")?;
        let InvoicePayment::Lightning { request } = &inv.payment else {
            return Err("not a Lightning invoice".into());
        };
        let request = hashgrid_lightning::invoice::parse(request).map_err(|e| e.to_string())?;
        let expected = self.ln_expected(&inv).ok_or("not in Lightning mode")?;
        let hash = hashgrid_lightning::invoice::payment_hash(&request);
        match &rec.state {
            PayState::Unpaid => {
                rec.state = PayState::LnPaying {
                    hash: hash.to_string(),
                };
                self.save(JobTree::InvoicesIn, &id, &rec)
                    .map_err(|e| e.to_string())?;
            }
            PayState::LnPaying { .. } => {}
            _ => return Ok(()),
        }
        let l = ln.clone();
        tokio::task::spawn_blocking(move || l.pay(&request, &expected))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        let started = std::time::Instant::now();
        loop {
            let l = ln.clone();
            let status = tokio::task::spawn_blocking(move || l.payment(&hash))
                .await
                .map_err(|e| e.to_string())?
                .map(|p| p.status);
            match status {
                Some(PaymentStatus::Succeeded(preimage)) => {
                    if !preimage.matches(&hash) {
                        return Err("the node reported a preimage that does not match".into());
                    }
                    let mut rec = get()?;
                    if !matches!(rec.state, PayState::LnPaying { .. }) {
                        return Ok(());
                    }
                    rec.state = PayState::LnPaid {
                        hash: hash.to_string(),
                        preimage: preimage.to_string(),
                    };
                    let event = crate::event::DurableEvent::LightningPaid {
                        invoice: id,
                        provider: inv.provider,
                        hash: hash.to_string(),
                        preimage: preimage.to_string(),
                        amount_msat: inv.amount.0,
                    };
                    self.save_reporting(JobTree::InvoicesIn, &id, &rec, Some(event))
                        .map_err(|e| e.to_string())?;
                    info!(invoice = %id.short(), amount_msat = inv.amount.0, %hash, "invoice paid over lightning");
                    return Ok(());
                }
                Some(PaymentStatus::Failed) => {
                    // Back to unpaid: the next pass tries again (a failed payment may be
                    // retried; a completed one cannot be repeated).
                    let mut rec = get()?;
                    if matches!(rec.state, PayState::LnPaying { .. }) {
                        rec.state = PayState::Unpaid;
                        self.save(JobTree::InvoicesIn, &id, &rec)
                            .map_err(|e| e.to_string())?;
                    }
                    return Err("the Lightning payment failed".into());
                }
                Some(PaymentStatus::Pending) | None => {
                    if started.elapsed() > LN_PAY_WAIT {
                        return Ok(());
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}
