//! The standing book a node keeps from gossip: one [`OrderBook`] holding every live ask and
//! bid it has verified, plus what the network needs beside the orders.
//!
//! The orders themselves live only in the engine: they enter with [`OrderBook::rest_ask`] /
//! [`OrderBook::rest_bid`] (indexed at the time they arrived here, never traded against each
//! other), leave by its cancel and expiry, and a buyer's job is ranked on it directly
//! ([`GossipBook::orders`] → [`OrderBook::candidates_fair_except`]). Beside them this keeps:
//! - the **signed envelope** each order arrived in, so a peer can be given the exact signed
//!   bytes (book sync) and re-verify them itself;
//! - providers' **capacity ads**, one per provider, replaced by higher sequence numbers;
//! - the distinction the network layer scores peers by: a harmless duplicate, a stale copy of
//!   a replaced order, or a late copy of a cancelled one ([`BookReject`]).
//!
//! Cancels stick through the engine's memory of retired orders ([`OrderBook::retired_seq`]),
//! for as long as any copy of the cancelled order could still be valid. Everything is bounded:
//! [`MAX_BOOK_ORDERS`] live orders, [`MAX_BOOK_PROVIDERS`] capacity ads, [`MAX_TOMBSTONES`]
//! remembered cancels (the one due to be forgotten soonest goes first).
//!
//! Callers verify signatures and validity before anything reaches this type; it trusts its
//! input and only orders it. Time is passed in.

use std::collections::HashMap;

use hashgrid_protocol::{
    Ask, Bid, Cancel, CapacityAd, GossipMessage, OrderRef, PublicKey, Signed, Timestamp,
};

use crate::book::{BookError, Limits, OrderBook, Side};

/// Most orders (asks plus bids) the book holds. A flood of valid orders from many keys beyond
/// this is refused rather than growing memory without limit; 100 000 orders of ~1 KiB is
/// ~100 MiB, far above what a healthy network of a few thousand sites produces.
pub const MAX_BOOK_ORDERS: usize = 100_000;

/// Most capacity ads held (one per provider).
pub const MAX_BOOK_PROVIDERS: usize = 20_000;

/// Most cancels remembered. A cancel is remembered until no copy of its order can still be
/// valid; beyond this many the one due to be forgotten soonest is forgotten first.
pub const MAX_TOMBSTONES: usize = 100_000;

/// Whether an order is an ask or a bid.
pub type OrderKind = Side;

/// Why an order left the book.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemoveReason {
    /// Its owner cancelled it.
    Cancelled,
    /// It expired.
    Expired,
}

/// What applying a message changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BookChange {
    /// A new order entered the book.
    Added(OrderKind, OrderRef),
    /// An order was replaced by a newer sequence number.
    Replaced(OrderKind, OrderRef),
    /// An order was removed by a cancel.
    Cancelled(OrderKind, OrderRef),
    /// A cancel for an order this node does not hold was recorded (so the order cannot come
    /// back from a late copy).
    CancelRecorded(OrderRef),
    /// A provider's capacity ad was added or replaced.
    Capacity(PublicKey),
}

/// Why the book refused a message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BookReject {
    /// A copy with the same sequence number is already held (a harmless duplicate).
    #[error("duplicate: sequence {seq} already held")]
    Duplicate {
        /// The sequence number.
        seq: u64,
    },
    /// The book holds a newer sequence number for this order or provider (a replay).
    #[error("stale sequence {seq}: {latest} already held")]
    Stale {
        /// The sequence number received.
        seq: u64,
        /// The newer one held.
        latest: u64,
    },
    /// The order was cancelled.
    #[error("order was cancelled (cancel sequence {cancel_seq})")]
    Cancelled {
        /// The cancel's sequence number.
        cancel_seq: u64,
    },
    /// The book is full.
    #[error("book is full ({0} entries)")]
    Full(usize),
    /// The order had expired by the time it arrived.
    #[error("order expired")]
    Expired,
    /// The engine refused the order for another reason (no units, too many regions).
    #[error("{0}")]
    Refused(BookError),
}

impl From<BookError> for BookReject {
    fn from(e: BookError) -> BookReject {
        match e {
            BookError::Stale { seq, latest } => BookReject::Stale { seq, latest },
            BookError::Full(n) => BookReject::Full(n),
            BookError::Expired => BookReject::Expired,
            e => BookReject::Refused(e),
        }
    }
}

/// A snapshot of the book at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BookSnapshot {
    /// Live asks, ordered by owner and order id.
    pub asks: Vec<Ask>,
    /// Live bids, ordered by owner and order id.
    pub bids: Vec<Bid>,
    /// Live capacity ads, one per provider, ordered by provider.
    pub capacity: Vec<CapacityAd>,
}

impl BookSnapshot {
    /// Whether the book holds a live ask with this identity.
    pub fn has_ask(&self, order: &OrderRef) -> bool {
        self.asks.iter().any(|a| a.order_ref() == *order)
    }

    /// Whether the book holds a live bid with this identity.
    pub fn has_bid(&self, order: &OrderRef) -> bool {
        self.bids.iter().any(|b| b.order_ref() == *order)
    }
}

type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// A node's standing book (see the module docs).
pub struct GossipBook {
    orders: OrderBook,
    /// The signed envelope of every live ask in `orders`.
    signed_asks: Map<OrderRef, Signed<Ask>>,
    /// The signed envelope of every live bid in `orders`.
    signed_bids: Map<OrderRef, Signed<Bid>>,
    capacity: Map<PublicKey, (Signed<CapacityAd>, CapacityAd)>,
}

impl Default for GossipBook {
    fn default() -> GossipBook {
        GossipBook {
            orders: OrderBook::with_limits(Limits {
                max_orders: MAX_BOOK_ORDERS,
                max_retired: MAX_TOMBSTONES,
            }),
            signed_asks: Map::default(),
            signed_bids: Map::default(),
            capacity: Map::default(),
        }
    }
}

impl std::fmt::Debug for GossipBook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GossipBook")
            .field("asks", &self.orders.ask_count())
            .field("bids", &self.orders.bid_count())
            .field("capacity", &self.capacity.len())
            .finish()
    }
}

fn check_seq(held: Option<u64>, seq: u64) -> Result<(), BookReject> {
    match held {
        Some(latest) if seq == latest => Err(BookReject::Duplicate { seq }),
        Some(latest) if seq < latest => Err(BookReject::Stale { seq, latest }),
        _ => Ok(()),
    }
}

impl GossipBook {
    /// An empty book.
    pub fn new() -> GossipBook {
        GossipBook::default()
    }

    /// A cancel at `cancel_seq` or later covers this copy of the order.
    fn check_cancelled(&self, r: &OrderRef, seq: u64) -> Result<(), BookReject> {
        match self.orders.retired_seq(r) {
            Some(cancel_seq) if seq <= cancel_seq => Err(BookReject::Cancelled { cancel_seq }),
            _ => Ok(()),
        }
    }

    /// Adds or replaces an ask (already verified by the caller), arriving at `now`.
    pub fn insert_ask(
        &mut self,
        signed: Signed<Ask>,
        ask: Ask,
        now: Timestamp,
    ) -> Result<BookChange, BookReject> {
        let r = ask.order_ref();
        self.check_cancelled(&r, ask.seq)?;
        check_seq(self.orders.ask_seq(&r), ask.seq)?;
        let replaced = self.orders.rest_ask(ask, now.0)?;
        self.signed_asks.insert(r, signed);
        Ok(if replaced {
            BookChange::Replaced(Side::Ask, r)
        } else {
            BookChange::Added(Side::Ask, r)
        })
    }

    /// Adds or replaces a bid (already verified by the caller), arriving at `now`.
    pub fn insert_bid(
        &mut self,
        signed: Signed<Bid>,
        bid: Bid,
        now: Timestamp,
    ) -> Result<BookChange, BookReject> {
        let r = bid.order_ref();
        self.check_cancelled(&r, bid.seq)?;
        check_seq(self.orders.bid_seq(&r), bid.seq)?;
        let replaced = self.orders.rest_bid(bid, now.0)?;
        self.signed_bids.insert(r, signed);
        Ok(if replaced {
            BookChange::Replaced(Side::Bid, r)
        } else {
            BookChange::Added(Side::Bid, r)
        })
    }

    /// Applies a cancel (already verified by the caller): removes the order if the cancel's
    /// sequence number is higher than the order's, and remembers the cancel for as long as a
    /// copy of the order could still be valid.
    pub fn cancel(
        &mut self,
        signed: Signed<Cancel>,
        cancel: Cancel,
        now: Timestamp,
    ) -> Result<BookChange, BookReject> {
        // The cancel's own envelope is not kept: it travels by gossip, and a sync brings the
        // orders that are still live.
        drop(signed);
        let r = OrderRef {
            owner: cancel.owner,
            order_id: cancel.order_id,
        };
        if let Some(cancel_seq) = self.orders.retired_seq(&r) {
            check_seq(Some(cancel_seq), cancel.seq)?;
        }
        let removed = self.orders.cancel(&cancel, now.0)?;
        Ok(match removed {
            Some(kind) => {
                self.forget_envelope(kind, &r);
                BookChange::Cancelled(kind, r)
            }
            None => BookChange::CancelRecorded(r),
        })
    }

    fn forget_envelope(&mut self, kind: Side, r: &OrderRef) {
        match kind {
            Side::Ask => {
                self.signed_asks.remove(r);
            }
            Side::Bid => {
                self.signed_bids.remove(r);
            }
        }
    }

    /// Adds or replaces a provider's capacity ad (already verified by the caller).
    pub fn insert_capacity(
        &mut self,
        signed: Signed<CapacityAd>,
        ad: CapacityAd,
    ) -> Result<BookChange, BookReject> {
        let provider = ad.provider;
        check_seq(self.capacity.get(&provider).map(|(_, a)| a.seq), ad.seq)?;
        if !self.capacity.contains_key(&provider) && self.capacity.len() >= MAX_BOOK_PROVIDERS {
            return Err(BookReject::Full(MAX_BOOK_PROVIDERS));
        }
        self.capacity.insert(provider, (signed, ad));
        Ok(BookChange::Capacity(provider))
    }

    /// Drops everything that expired at or before `now`; returns the orders removed, in
    /// expiry order.
    pub fn expire(&mut self, now: Timestamp) -> Vec<(OrderKind, OrderRef)> {
        let removed = self.orders.expire(now.0);
        for (kind, r) in &removed {
            self.forget_envelope(*kind, r);
        }
        self.capacity.retain(|_, (_, ad)| ad.expires_at > now);
        removed
    }

    /// The live orders, indexed for ranking and queries.
    pub fn orders(&self) -> &OrderBook {
        &self.orders
    }

    /// Whether the book already holds `msg` or something newer from its author (same order
    /// or ad at an equal or higher sequence number, or a cancel at least that new). Reads the
    /// body without verifying it: a message that claims a higher sequence number still goes
    /// through full verification, one that claims a lower or equal one changes nothing anyway.
    pub fn holds(&self, msg: &GossipMessage) -> bool {
        let cancelled =
            |r: &OrderRef, seq: u64| self.orders.retired_seq(r).is_some_and(|c| seq <= c);
        match msg {
            GossipMessage::Ask(s) => s.decode_unverified().is_ok_and(|a| {
                let r = a.order_ref();
                cancelled(&r, a.seq) || self.orders.ask_seq(&r).is_some_and(|held| a.seq <= held)
            }),
            GossipMessage::Bid(s) => s.decode_unverified().is_ok_and(|b| {
                let r = b.order_ref();
                cancelled(&r, b.seq) || self.orders.bid_seq(&r).is_some_and(|held| b.seq <= held)
            }),
            // Evidence is not kept in the book.
            GossipMessage::Evidence(_) => false,
            GossipMessage::Cancel(s) => s.decode_unverified().is_ok_and(|c| {
                cancelled(
                    &OrderRef {
                        owner: c.owner,
                        order_id: c.order_id,
                    },
                    c.seq,
                )
            }),
            GossipMessage::Capacity(s) => s.decode_unverified().is_ok_and(|c| {
                self.capacity
                    .get(&c.provider)
                    .is_some_and(|(_, held)| c.seq <= held.seq)
            }),
        }
    }

    /// Live asks, live bids, and providers with a live capacity ad.
    pub fn counts(&self) -> (usize, usize, usize) {
        (
            self.orders.ask_count(),
            self.orders.bid_count(),
            self.capacity.len(),
        )
    }

    /// The live capacity ads.
    pub fn capacity_ads(&self) -> impl Iterator<Item = &CapacityAd> {
        self.capacity.values().map(|(_, ad)| ad)
    }

    /// A provider's live capacity ad.
    pub fn capacity(&self, provider: &PublicKey) -> Option<&CapacityAd> {
        self.capacity.get(provider).map(|(_, ad)| ad)
    }

    /// The current book.
    pub fn snapshot(&self) -> BookSnapshot {
        let mut asks: Vec<Ask> = self.orders.asks().into_iter().map(|r| r.ask).collect();
        asks.sort_by_key(Ask::order_ref);
        let mut bids: Vec<Bid> = self.orders.bids().into_iter().map(|r| r.bid).collect();
        bids.sort_by_key(Bid::order_ref);
        let mut capacity: Vec<CapacityAd> = self.capacity_ads().cloned().collect();
        capacity.sort_by_key(|ad| ad.provider);
        BookSnapshot {
            asks,
            bids,
            capacity,
        }
    }

    /// Up to `max` signed messages that reproduce this book on another node (capacity ads
    /// first, then asks, then bids).
    pub fn signed_messages(&self, max: usize) -> Vec<GossipMessage> {
        self.capacity
            .values()
            .map(|(s, _)| GossipMessage::Capacity(s.clone()))
            .chain(self.signed_asks.values().cloned().map(GossipMessage::Ask))
            .chain(self.signed_bids.values().cloned().map(GossipMessage::Bid))
            .take(max)
            .collect()
    }

    /// Number of live asks.
    pub fn ask_count(&self) -> usize {
        self.orders.ask_count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hashgrid_protocol::{
        Backend, Benchmark, DeviceType, GpuLimits, GpuProfile, Keypair, Msat, Network, Requirements,
    };

    fn ask(key: &Keypair, id: u64, seq: u64, now: Timestamp) -> (Signed<Ask>, Ask) {
        let ask = Ask {
            provider: key.public(),
            order_id: id,
            seq,
            units: 1,
            price: Msat(10),
            gpu: GpuProfile {
                name: "gpu".into(),
                vendor: 0,
                device: 0,
                backend: Backend::Vulkan,
                device_type: DeviceType::Cpu,
                driver: String::new(),
                memory_bytes: 1,
                limits: GpuLimits::default(),
                bench: Benchmark::default(),
            },
            region: "eu".into(),
            max_seconds: 10,
            created_at: now,
            expires_at: now.plus_ms(1000),
        };
        (Signed::sign(key, &Network::test(), &ask), ask)
    }

    fn bid(key: &Keypair, id: u64, seq: u64, now: Timestamp) -> (Signed<Bid>, Bid) {
        let bid = Bid {
            buyer: key.public(),
            order_id: id,
            seq,
            units: 1,
            requirements: Requirements::default(),
            max_price: Msat(1_000),
            max_seconds: 10,
            created_at: now,
            expires_at: now.plus_ms(2000),
            model: None,
        };
        (Signed::sign(key, &Network::test(), &bid), bid)
    }

    fn cancel(key: &Keypair, id: u64, seq: u64, now: Timestamp) -> (Signed<Cancel>, Cancel) {
        let c = Cancel {
            owner: key.public(),
            order_id: id,
            seq,
            created_at: now,
            expires_at: now.plus_ms(5000),
        };
        (Signed::sign(key, &Network::test(), &c), c)
    }

    #[test]
    fn holds_what_it_has_and_nothing_newer() {
        let key = Keypair::from_secret_bytes([2; 32]);
        let now = Timestamp(1_000_000);
        let mut book = GossipBook::new();
        let (s5, a5) = ask(&key, 1, 5, now);
        let msg = |s: &Signed<Ask>| GossipMessage::Ask(s.clone());
        assert!(!book.holds(&msg(&s5)), "empty book");
        book.insert_ask(s5.clone(), a5, now).unwrap();
        assert!(book.holds(&msg(&s5)), "same seq");
        assert!(book.holds(&msg(&ask(&key, 1, 4, now).0)), "older seq");
        assert!(
            !book.holds(&msg(&ask(&key, 1, 6, now).0)),
            "newer seq is checked"
        );
        assert!(!book.holds(&msg(&ask(&key, 2, 1, now).0)), "another order");
        let (cs, c) = cancel(&key, 1, 9, now);
        book.cancel(cs.clone(), c, now).unwrap();
        assert!(book.holds(&GossipMessage::Cancel(cs)));
        assert!(book.holds(&msg(&ask(&key, 1, 8, now).0)), "cancelled at 9");
    }

    #[test]
    fn replace_by_seq_cancel_and_expiry() {
        let key = Keypair::from_secret_bytes([1; 32]);
        let now = Timestamp(1_000_000);
        let mut book = GossipBook::new();
        let (s, a) = ask(&key, 1, 5, now);
        assert!(matches!(
            book.insert_ask(s, a, now),
            Ok(BookChange::Added(..))
        ));
        let (s, a) = ask(&key, 1, 4, now);
        assert!(matches!(
            book.insert_ask(s, a, now),
            Err(BookReject::Stale { .. })
        ));
        let (s, a) = ask(&key, 1, 5, now);
        assert!(matches!(
            book.insert_ask(s, a, now),
            Err(BookReject::Duplicate { .. })
        ));
        let (s, a) = ask(&key, 1, 6, now);
        assert!(matches!(
            book.insert_ask(s, a, now),
            Ok(BookChange::Replaced(..))
        ));
        assert_eq!(book.snapshot().asks[0].seq, 6);

        let (s, c) = cancel(&key, 1, 7, now);
        assert!(matches!(
            book.cancel(s.clone(), c.clone(), now),
            Ok(BookChange::Cancelled(..))
        ));
        assert!(book.snapshot().asks.is_empty());
        assert!(matches!(
            book.cancel(s, c, now),
            Err(BookReject::Duplicate { seq: 7 })
        ));
        // A late copy of the cancelled order does not come back.
        let (s, a) = ask(&key, 1, 6, now);
        assert!(matches!(
            book.insert_ask(s, a, now),
            Err(BookReject::Cancelled { cancel_seq: 7 })
        ));
        // A cancel for an order not held sticks as well.
        let (s, c) = cancel(&key, 3, 2, now);
        assert_eq!(
            book.cancel(s, c, now),
            Ok(BookChange::CancelRecorded(OrderRef {
                owner: key.public(),
                order_id: 3
            }))
        );
        let (s, a) = ask(&key, 3, 1, now);
        assert!(book.insert_ask(s, a, now).is_err());

        let (s, a) = ask(&key, 2, 1, now);
        book.insert_ask(s, a, now).unwrap();
        assert_eq!(book.expire(now.plus_ms(999)), vec![]);
        assert_eq!(book.expire(now.plus_ms(1000)).len(), 1);
        assert!(book.snapshot().asks.is_empty());
        assert!(book.signed_messages(10).is_empty(), "envelopes leave too");
        // An ask that expired before it arrived is refused, not kept.
        let (s, a) = ask(&key, 4, 1, now);
        assert_eq!(
            book.insert_ask(s, a, now.plus_ms(1000)),
            Err(BookReject::Expired)
        );
    }

    #[test]
    fn one_book_holds_every_live_order_and_crossing_orders_rest() {
        let provider = Keypair::from_secret_bytes([3; 32]);
        let buyer = Keypair::from_secret_bytes([4; 32]);
        let now = Timestamp(5_000_000);
        let mut book = GossipBook::new();
        let (s, a) = ask(&provider, 1, 1, now);
        book.insert_ask(s, a, now).unwrap();
        // The bid crosses the ask (1000 msat limit against 10): in a gossip book nothing
        // trades; both rest whole and are ranked as they are.
        let (s, b) = bid(&buyer, 1, 1, now);
        book.insert_bid(s, b.clone(), now).unwrap();
        assert_eq!(book.counts(), (1, 1, 0));
        let r = OrderRef {
            owner: provider.public(),
            order_id: 1,
        };
        assert_eq!(book.orders().ask(&r).unwrap().remaining, 1);
        let fair = crate::Fairness {
            rep: &crate::NoReputation,
            load: &crate::NoLoad,
            seed: 1,
            warm: &crate::NoWarm,
        };
        let ranked = book.orders().candidates_fair(&b, now.0, &fair, 8);
        assert_eq!(ranked.len(), 1);
        assert_eq!(ranked[0].ask.order_ref(), r);
        // Every message needed to rebuild the book elsewhere, signed as it arrived.
        let msgs = book.signed_messages(10);
        assert_eq!(msgs.len(), 2);
        let mut other = GossipBook::new();
        for m in msgs {
            match m {
                GossipMessage::Ask(s) => {
                    let a = s.verify(&Network::test()).unwrap();
                    other.insert_ask(s, a, now).unwrap();
                }
                GossipMessage::Bid(s) => {
                    let b = s.verify(&Network::test()).unwrap();
                    other.insert_bid(s, b, now).unwrap();
                }
                m => panic!("unexpected {m:?}"),
            }
        }
        assert_eq!(other.snapshot(), book.snapshot());
        // A cancel of the bid removes it from the index and its envelope from the sync.
        let (s, c) = cancel(&buyer, 1, 2, now);
        assert_eq!(
            book.cancel(s, c, now),
            Ok(BookChange::Cancelled(
                Side::Bid,
                OrderRef {
                    owner: buyer.public(),
                    order_id: 1
                }
            ))
        );
        assert_eq!(book.counts(), (1, 0, 0));
        assert_eq!(book.signed_messages(10).len(), 1);
        // Expiry empties the index and the envelopes together.
        assert_eq!(book.expire(now.plus_ms(1000)), vec![(Side::Ask, r)]);
        assert_eq!(book.counts(), (0, 0, 0));
        assert!(book.signed_messages(10).is_empty());
    }
}
