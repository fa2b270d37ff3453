//! This node's view of the order book, built from verified gossip.
//!
//! This is the one file that connects the network to the order book. It keeps what the
//! network needs: asks and bids replaced by higher sequence numbers, cancels that stick
//! (tombstones until the cancel itself expires), capacity ads per provider, expiry, a
//! snapshot, and the signed copies for sync. Beside them it keeps the live asks in a
//! **standing** `hashgrid_market::OrderBook` (the engine: indexed by region, backend and
//! tiers, entered at the time they arrived here), updated with every change of the view, so
//! that ranking a buyer's job ([`Book::engine`], `candidates_fair_except`) and the CLI's
//! offers query it directly instead of rebuilding a book from every ask.
//!
//! Every entry keeps the signed envelope it arrived in, so a peer can be given the exact
//! signed bytes (the `/hashgrid/sync/1` protocol) and re-verify them itself.

use std::collections::{BTreeMap, HashMap};

use hashgrid_protocol::{
    Ask, Bid, Cancel, CapacityAd, GossipMessage, OrderRef, PublicKey, Signed, Timestamp,
};

/// Most orders (asks plus bids) the book holds. A flood of valid orders from many keys beyond
/// this is refused rather than growing memory without limit; 100 000 orders of ~1 KiB is
/// ~100 MiB, far above what a healthy network of a few thousand sites produces.
pub const MAX_BOOK_ORDERS: usize = 100_000;

/// Most capacity ads held (one per provider).
pub const MAX_BOOK_PROVIDERS: usize = 20_000;

/// Most cancel tombstones held. Tombstones only live until the cancel expires.
pub const MAX_TOMBSTONES: usize = 100_000;

/// Whether an order is an ask or a bid.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OrderKind {
    /// A provider's ask.
    Ask,
    /// A buyer's bid.
    Bid,
}

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
}

#[derive(Clone)]
struct Entry<T> {
    signed: Signed<T>,
    body: T,
}

/// A snapshot of the book at one instant.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BookSnapshot {
    /// Live asks, ordered by owner and order id.
    pub asks: Vec<Ask>,
    /// Live bids, ordered by owner and order id.
    pub bids: Vec<Bid>,
    /// Live capacity ads, one per provider.
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

/// This node's view of the book (see the module docs).
#[derive(Default)]
pub struct Book {
    asks: BTreeMap<OrderRef, Entry<Ask>>,
    bids: BTreeMap<OrderRef, Entry<Bid>>,
    capacity: HashMap<PublicKey, Entry<CapacityAd>>,
    /// Cancelled orders: cancel seq and when the tombstone may be forgotten.
    tombstones: HashMap<OrderRef, (u64, Timestamp)>,
    /// The live asks in the market engine (kept in step with `asks`).
    engine: hashgrid_market::OrderBook,
}

impl std::fmt::Debug for Book {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Book")
            .field("asks", &self.asks.len())
            .field("bids", &self.bids.len())
            .field("capacity", &self.capacity.len())
            .field("tombstones", &self.tombstones.len())
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

impl Book {
    /// An empty book.
    pub fn new() -> Book {
        Book::default()
    }

    fn order_count(&self) -> usize {
        self.asks.len() + self.bids.len()
    }

    fn check_tombstone(&self, order: &OrderRef, seq: u64) -> Result<(), BookReject> {
        match self.tombstones.get(order) {
            Some(&(cancel_seq, _)) if seq <= cancel_seq => {
                Err(BookReject::Cancelled { cancel_seq })
            }
            _ => Ok(()),
        }
    }

    /// Adds or replaces an ask (already verified by the caller).
    pub fn insert_ask(&mut self, signed: Signed<Ask>, ask: Ask) -> Result<BookChange, BookReject> {
        let order = ask.order_ref();
        self.check_tombstone(&order, ask.seq)?;
        check_seq(self.asks.get(&order).map(|e| e.body.seq), ask.seq)?;
        let replaced = self.asks.contains_key(&order);
        if !replaced && self.order_count() >= MAX_BOOK_ORDERS {
            return Err(BookReject::Full(MAX_BOOK_ORDERS));
        }
        self.tombstones.remove(&order);
        self.engine_insert(ask.clone());
        self.asks.insert(order, Entry { signed, body: ask });
        Ok(if replaced {
            BookChange::Replaced(OrderKind::Ask, order)
        } else {
            BookChange::Added(OrderKind::Ask, order)
        })
    }

    /// Adds or replaces a bid (already verified by the caller).
    pub fn insert_bid(&mut self, signed: Signed<Bid>, bid: Bid) -> Result<BookChange, BookReject> {
        let order = bid.order_ref();
        self.check_tombstone(&order, bid.seq)?;
        check_seq(self.bids.get(&order).map(|e| e.body.seq), bid.seq)?;
        let replaced = self.bids.contains_key(&order);
        if !replaced && self.order_count() >= MAX_BOOK_ORDERS {
            return Err(BookReject::Full(MAX_BOOK_ORDERS));
        }
        self.tombstones.remove(&order);
        self.bids.insert(order, Entry { signed, body: bid });
        Ok(if replaced {
            BookChange::Replaced(OrderKind::Bid, order)
        } else {
            BookChange::Added(OrderKind::Bid, order)
        })
    }

    /// Applies a cancel (already verified by the caller): removes the order if the cancel's
    /// sequence number is higher than the order's, and remembers the cancel until it expires.
    pub fn cancel(
        &mut self,
        signed: Signed<Cancel>,
        cancel: Cancel,
    ) -> Result<BookChange, BookReject> {
        let _ = signed;
        let order = OrderRef {
            owner: cancel.owner,
            order_id: cancel.order_id,
        };
        if let Some(&(cancel_seq, _)) = self.tombstones.get(&order) {
            check_seq(Some(cancel_seq), cancel.seq)?;
        }
        let held = self
            .asks
            .get(&order)
            .map(|e| (OrderKind::Ask, e.body.seq))
            .or_else(|| self.bids.get(&order).map(|e| (OrderKind::Bid, e.body.seq)));
        if let Some((_, seq)) = held
            && cancel.seq <= seq
        {
            return Err(BookReject::Stale {
                seq: cancel.seq,
                latest: seq,
            });
        }
        if !self.tombstones.contains_key(&order) && self.tombstones.len() >= MAX_TOMBSTONES {
            return Err(BookReject::Full(MAX_TOMBSTONES));
        }
        self.tombstones
            .insert(order, (cancel.seq, cancel.expires_at));
        Ok(match held {
            Some((kind, _)) => {
                self.asks.remove(&order);
                self.bids.remove(&order);
                self.engine.withdraw(&order);
                BookChange::Cancelled(kind, order)
            }
            None => BookChange::CancelRecorded(order),
        })
    }

    /// Adds or replaces a provider's capacity ad (already verified by the caller).
    pub fn insert_capacity(
        &mut self,
        signed: Signed<CapacityAd>,
        ad: CapacityAd,
    ) -> Result<BookChange, BookReject> {
        let provider = ad.provider;
        check_seq(self.capacity.get(&provider).map(|e| e.body.seq), ad.seq)?;
        if !self.capacity.contains_key(&provider) && self.capacity.len() >= MAX_BOOK_PROVIDERS {
            return Err(BookReject::Full(MAX_BOOK_PROVIDERS));
        }
        self.capacity.insert(provider, Entry { signed, body: ad });
        Ok(BookChange::Capacity(provider))
    }

    /// Drops everything that expired at or before `now`; returns the orders removed.
    pub fn expire(&mut self, now: Timestamp) -> Vec<(OrderKind, OrderRef)> {
        let mut removed = Vec::new();
        self.asks.retain(|order, e| {
            let keep = e.body.expires_at > now;
            if !keep {
                removed.push((OrderKind::Ask, *order));
            }
            keep
        });
        self.bids.retain(|order, e| {
            let keep = e.body.expires_at > now;
            if !keep {
                removed.push((OrderKind::Bid, *order));
            }
            keep
        });
        self.capacity.retain(|_, e| e.body.expires_at > now);
        self.tombstones.retain(|_, &mut (_, until)| until > now);
        self.engine.expire(now.0);
        removed
    }

    /// Enters (or replaces) an ask in the engine. The view has accepted it; if the engine
    /// refuses it (it cannot index a 257th region), the ask's older copy leaves the engine too,
    /// so that the engine never ranks what the view no longer holds.
    fn engine_insert(&mut self, ask: Ask) {
        let order = ask.order_ref();
        let now = Timestamp::now().0;
        if let Err(e) = self
            .engine
            .submit_ask(ask, now, &hashgrid_market::NoReputation)
        {
            tracing::debug!(%e, owner = %order.owner.short(), order_id = order.order_id, "the market engine refused an ask the view holds");
            self.engine.withdraw(&order);
        }
    }

    /// The live asks in the market engine, for ranking and queries.
    pub fn engine(&self) -> &hashgrid_market::OrderBook {
        &self.engine
    }

    /// Whether the book already holds `msg` or something newer from its author (same order
    /// or ad at an equal or higher sequence number, or a cancel at least that new). Reads the
    /// body without verifying it: a message that claims a higher sequence number still goes
    /// through full verification, one that claims a lower or equal one changes nothing anyway.
    pub fn holds(&self, msg: &GossipMessage) -> bool {
        let tomb = |r: &OrderRef, seq: u64| self.tombstones.get(r).is_some_and(|(c, _)| seq <= *c);
        match msg {
            GossipMessage::Ask(s) => s.decode_unverified().is_ok_and(|a| {
                let r = a.order_ref();
                tomb(&r, a.seq) || self.asks.get(&r).is_some_and(|e| a.seq <= e.body.seq)
            }),
            GossipMessage::Bid(s) => s.decode_unverified().is_ok_and(|b| {
                let r = b.order_ref();
                tomb(&r, b.seq) || self.bids.get(&r).is_some_and(|e| b.seq <= e.body.seq)
            }),
            // Evidence is not kept in the book.
            GossipMessage::Evidence(_) => false,
            GossipMessage::Cancel(s) => s.decode_unverified().is_ok_and(|c| {
                tomb(
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
                    .is_some_and(|e| c.seq <= e.body.seq)
            }),
        }
    }

    /// The live asks, ordered by owner and order id.
    pub fn asks(&self) -> impl Iterator<Item = &Ask> {
        self.asks.values().map(|e| &e.body)
    }

    /// Live asks, live bids, and providers with a live capacity ad.
    pub fn counts(&self) -> (usize, usize, usize) {
        (self.asks.len(), self.bids.len(), self.capacity.len())
    }

    /// The live capacity ads.
    pub fn capacity_ads(&self) -> impl Iterator<Item = &CapacityAd> {
        self.capacity.values().map(|e| &e.body)
    }

    /// A provider's live capacity ad.
    pub fn capacity(&self, provider: &PublicKey) -> Option<&CapacityAd> {
        self.capacity.get(provider).map(|e| &e.body)
    }

    /// The current view.
    pub fn snapshot(&self) -> BookSnapshot {
        BookSnapshot {
            asks: self.asks.values().map(|e| e.body.clone()).collect(),
            bids: self.bids.values().map(|e| e.body.clone()).collect(),
            capacity: self.capacity.values().map(|e| e.body.clone()).collect(),
        }
    }

    /// Up to `max` signed messages that reproduce this book on another node (capacity ads
    /// first, then asks, then bids).
    pub fn signed_messages(&self, max: usize) -> Vec<GossipMessage> {
        self.capacity
            .values()
            .map(|e| GossipMessage::Capacity(e.signed.clone()))
            .chain(
                self.asks
                    .values()
                    .map(|e| GossipMessage::Ask(e.signed.clone())),
            )
            .chain(
                self.bids
                    .values()
                    .map(|e| GossipMessage::Bid(e.signed.clone())),
            )
            .take(max)
            .collect()
    }

    /// Number of live asks.
    pub fn ask_count(&self) -> usize {
        self.asks.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hashgrid_protocol::{
        Backend, Benchmark, DeviceType, GpuLimits, GpuProfile, Keypair, Msat, Network,
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
        let mut book = Book::new();
        let (s5, a5) = ask(&key, 1, 5, now);
        let msg = |s: &Signed<Ask>| GossipMessage::Ask(s.clone());
        assert!(!book.holds(&msg(&s5)), "empty book");
        book.insert_ask(s5.clone(), a5).unwrap();
        assert!(book.holds(&msg(&s5)), "same seq");
        assert!(book.holds(&msg(&ask(&key, 1, 4, now).0)), "older seq");
        assert!(
            !book.holds(&msg(&ask(&key, 1, 6, now).0)),
            "newer seq is checked"
        );
        assert!(!book.holds(&msg(&ask(&key, 2, 1, now).0)), "another order");
        let (cs, c) = cancel(&key, 1, 9, now);
        book.cancel(cs.clone(), c).unwrap();
        assert!(book.holds(&GossipMessage::Cancel(cs)));
        assert!(book.holds(&msg(&ask(&key, 1, 8, now).0)), "cancelled at 9");
    }

    #[test]
    fn replace_by_seq_cancel_and_expiry() {
        let key = Keypair::from_secret_bytes([1; 32]);
        let now = Timestamp(1_000_000);
        let mut book = Book::new();
        let (s, a) = ask(&key, 1, 5, now);
        assert!(matches!(book.insert_ask(s, a), Ok(BookChange::Added(..))));
        let (s, a) = ask(&key, 1, 4, now);
        assert!(matches!(
            book.insert_ask(s, a),
            Err(BookReject::Stale { .. })
        ));
        let (s, a) = ask(&key, 1, 5, now);
        assert!(matches!(
            book.insert_ask(s, a),
            Err(BookReject::Duplicate { .. })
        ));
        let (s, a) = ask(&key, 1, 6, now);
        assert!(matches!(
            book.insert_ask(s, a),
            Ok(BookChange::Replaced(..))
        ));
        assert_eq!(book.snapshot().asks[0].seq, 6);

        let (s, c) = cancel(&key, 1, 7, now);
        assert!(matches!(book.cancel(s, c), Ok(BookChange::Cancelled(..))));
        assert!(book.snapshot().asks.is_empty());
        // A late copy of the cancelled order does not come back.
        let (s, a) = ask(&key, 1, 6, now);
        assert!(matches!(
            book.insert_ask(s, a),
            Err(BookReject::Cancelled { .. })
        ));

        let (s, a) = ask(&key, 2, 1, now);
        book.insert_ask(s, a).unwrap();
        assert_eq!(book.expire(now.plus_ms(999)), vec![]);
        assert_eq!(book.expire(now.plus_ms(1000)).len(), 1);
        assert!(book.snapshot().asks.is_empty());
    }

    #[test]
    fn the_engine_holds_exactly_the_live_asks_of_the_view() {
        let key = Keypair::from_secret_bytes([3; 32]);
        let other = Keypair::from_secret_bytes([4; 32]);
        let now = Timestamp::now();
        let mut book = Book::new();
        let engine_seq = |b: &Book, k: &Keypair, id: u64| {
            b.engine()
                .ask(&OrderRef {
                    owner: k.public(),
                    order_id: id,
                })
                .map(|r| r.ask.seq)
        };
        let (s, a) = ask(&key, 1, 5, now);
        book.insert_ask(s, a).unwrap();
        let (s, a) = ask(&other, 1, 1, now);
        book.insert_ask(s, a).unwrap();
        assert_eq!(book.engine().ask_count(), 2);
        // A replacement replaces, a stale copy changes nothing.
        let (s, a) = ask(&key, 1, 6, now);
        book.insert_ask(s, a).unwrap();
        let (s, a) = ask(&key, 1, 4, now);
        assert!(book.insert_ask(s, a).is_err());
        assert_eq!(engine_seq(&book, &key, 1), Some(6));
        // A cancel removes it from both.
        let (s, c) = cancel(&key, 1, 7, now);
        book.cancel(s, c).unwrap();
        assert_eq!(engine_seq(&book, &key, 1), None);
        assert_eq!(book.engine().ask_count(), 1);
        // Expiry removes it from both.
        book.expire(now.plus_ms(1000));
        assert_eq!(book.engine().ask_count(), 0);
        assert!(book.snapshot().asks.is_empty());
        // An ask the engine refuses (already expired by its clock) is not left behind in it.
        let (s, a) = ask(&other, 2, 1, Timestamp(1_000_000));
        book.insert_ask(s, a).unwrap();
        assert_eq!(book.engine().ask_count(), 0);
    }
}
