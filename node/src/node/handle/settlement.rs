//! [`SettlementHandle`]: positions, invoices, wallets.

use std::sync::Arc;

use hashgrid_protocol::PublicKey;

use crate::error::NodeError;
use crate::settle::{InInvoice, OutInvoice, Position};
use crate::store::JobTree;

use super::NodeHandle;

/// Settlement: positions, invoices, wallets, a pass on demand ([`NodeHandle::settlement`]).
#[derive(Clone, Copy)]
pub struct SettlementHandle<'a> {
    pub(super) node: &'a NodeHandle,
}

impl<'a> SettlementHandle<'a> {
    /// Settlement positions per counterparty: what each owes this node as a buyer (by invoice
    /// state) and what this node owes it for its own purchases.
    pub fn positions(&self) -> std::collections::BTreeMap<PublicKey, Position> {
        self.node.inner.settlement.positions()
    }

    /// Invoices this node issued as a provider, with the ledger's record of each.
    pub fn invoices_issued(
        &self,
    ) -> Result<
        Vec<(
            OutInvoice,
            Option<hashgrid_market::settlement::InvoiceRecord>,
        )>,
        NodeError,
    > {
        let out: Vec<OutInvoice> = self.node.store(|s| s.all(JobTree::InvoicesOut))?;
        Ok(out
            .into_iter()
            .map(|o| {
                let rec = self.node.inner.settlement.invoice_record(&o.invoice.id());
                (o, rec)
            })
            .collect())
    }

    /// Invoices this node received as a buyer.
    pub fn invoices_received(&self) -> Result<Vec<InInvoice>, NodeError> {
        self.node.store(|s| s.all(JobTree::InvoicesIn))
    }

    /// Runs one settlement pass now (invoicing, chain checks, deliveries, payments) instead
    /// of waiting for the next interval.
    pub async fn pass_now(&self) {
        self.node.inner.settlement.pass(&self.node.net()).await;
    }

    /// This node's buyer wallet (on-chain mode with wallet keys).
    pub fn wallet(&self) -> Option<Arc<std::sync::Mutex<crate::wallet::Wallet>>> {
        self.node.inner.settlement.buyer_wallet()
    }

    /// The chain backend (on-chain mode).
    pub fn chain(&self) -> Option<Arc<dyn crate::wallet::ChainSource>> {
        self.node.inner.settlement.chain()
    }
}
