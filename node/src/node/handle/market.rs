//! [`MarketHandle`]: this node's orders and its book.

use hashgrid_market::{BookSnapshot, OfferQuery, OfferSort};
use hashgrid_protocol::{Ask, DeviceType, Msat, OrderRef, Requirements};

use crate::error::NodeError;
use crate::store::OwnOrder;

use super::super::command::{AskSpec, BidSpec, Command};
use super::NodeHandle;

/// This node's orders and its view of the market ([`NodeHandle::market`]).
#[derive(Clone, Copy)]
pub struct MarketHandle<'a> {
    pub(super) node: &'a NodeHandle,
}

impl<'a> MarketHandle<'a> {
    /// Signs, stores (flushed) and publishes an ask; returns its identity. The ask is
    /// re-announced until it is cancelled, also after a restart with the same data dir.
    pub async fn post_ask(&self, spec: AskSpec) -> Result<OrderRef, NodeError> {
        self.node.request(|r| Command::PostAsk(spec, r)).await?
    }

    /// Signs, stores (flushed) and publishes a bid; returns its identity.
    pub async fn post_bid(&self, spec: BidSpec) -> Result<OrderRef, NodeError> {
        self.node.request(|r| Command::PostBid(spec, r)).await?
    }

    /// Cancels one of this node's orders: forgets it (flushed), removes it from the book and
    /// publishes a signed `Cancel`.
    pub async fn cancel(&self, order_id: u64) -> Result<(), NodeError> {
        self.node.request(|r| Command::Cancel(order_id, r)).await?
    }

    /// This node's own live orders (as stored; the announced copies carry a fresh sequence
    /// number and expiry), ordered by order id.
    pub async fn own_orders(&self) -> Result<Vec<OwnOrder>, NodeError> {
        self.node.request(Command::OwnOrders).await
    }

    /// Makes this node's asks exactly `wanted`: keeps own asks equal to a wanted one (same
    /// GPU, units, price and longest job; they keep their order ids), cancels the others and
    /// posts what is missing. A restarted site with an unchanged config keeps its orders.
    pub async fn set_asks(&self, wanted: &[AskSpec]) -> Result<Vec<OrderRef>, NodeError> {
        let mut missing: Vec<AskSpec> = wanted.to_vec();
        let mut kept = Vec::new();
        for order in self.own_orders().await? {
            let OwnOrder::Ask(a) = order else { continue };
            let same = |s: &AskSpec| {
                s.gpu == a.gpu
                    && s.units == a.units
                    && s.price == a.price
                    && s.max_seconds == a.max_seconds
            };
            if let Some(i) = missing.iter().position(same) {
                missing.remove(i);
                kept.push(a.order_ref());
            } else {
                self.cancel(a.order_id).await?;
            }
        }
        for spec in missing {
            kept.push(self.post_ask(spec).await?);
        }
        Ok(kept)
    }

    /// A snapshot of this node's view of the book.
    pub async fn book(&self) -> Result<BookSnapshot, NodeError> {
        self.node.request(Command::Book).await
    }

    /// The live asks meeting `query`, sorted as asked (the market engine's `offers`).
    pub async fn offers(&self, query: hashgrid_market::OfferQuery) -> Result<Vec<Ask>, NodeError> {
        self.node
            .request(|r| Command::Offers(Box::new(query), r))
            .await
    }

    /// The kind of device of the cheapest live ask of another node that meets
    /// `requirements` at `max_price` or less: where a job on these terms most likely runs
    /// (buyers propose cheapest first), so that a language model's kernels can be shaped for
    /// it before the job is matched (`hashgrid_infer::Target::for_device`). `None` while no
    /// such ask is in the book.
    pub async fn likely_device(
        &self,
        requirements: &Requirements,
        max_price: Option<Msat>,
    ) -> Result<Option<DeviceType>, NodeError> {
        let me = self.node.public_key();
        // This node's own asks come first only if they are the cheapest; a few more than one
        // leave room to skip them.
        let asks = self
            .offers(OfferQuery {
                requirements: requirements.clone(),
                max_price,
                sort: OfferSort::Price,
                limit: 64,
            })
            .await?;
        Ok(asks
            .iter()
            .find(|a| a.provider != me)
            .map(|a| a.gpu.device_type))
    }
}
