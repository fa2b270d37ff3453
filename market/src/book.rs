//! The order book and matching engine.
//!
//! # Priority
//! Asks are served best price first (lowest `price`), then earliest, then by the reputation
//! of the provider (highest first, through [`Reputation`]), then by arrival order in this book.
//! Bids are served highest `max_price` first, then earliest, then reputation, then arrival.
//! "Earliest" is the time the order entered *this* book (the `now` passed to
//! [`OrderBook::submit_ask`] / [`OrderBook::submit_bid`], in ms), not the `created_at` the
//! owner signed: a peer could backdate its own timestamp to jump the queue, but not our clock.
//! That clock never runs back: an order's time is at least that of every order that arrived
//! before it (a `now` earlier than one already seen counts as the latest seen), so a clock
//! stepped back cannot put a later order ahead, and time order is arrival order.
//! Orders that arrive in the same millisecond tie on time, and reputation breaks the tie.
//! A replacement (higher `seq`) is a new arrival and loses its old time priority.
//!
//! # Order ids
//! An owner's order ids are one space across both sides: `Cancel` names `(owner, order_id)`
//! without a side, so an owner must not use the same id for an ask and a bid (the node takes
//! both from one counter). A cancel removes whichever live order has that id.
//!
//! # Fills
//! A fill is always at the ask's price: providers set prices, a bid's `max_price` is a limit.
//! Fills are partial across orders with several units; what is left of the incoming order
//! rests in the book. The same owner key never trades with itself (its orders are skipped,
//! not cancelled). The same sequence of calls always gives the same fills.
//!
//! # Indexing
//! Asks live in buckets keyed by (region, backend, memory tier, GFLOP/s tier), each ordered by
//! priority, held in one compact list with each bucket's best ask cached. A bid merges the
//! buckets its constraints allow (k-way, lazily: every bucket enters the merge with its cached
//! best, and a bucket's tree is only walked once the merge takes from it, stopping at the
//! bid's price limit), so a bid that wants a few units touches a few trees however many
//! buckets it allows. Resting bids are bucketed by (region or any, backend or any,
//! memory-floor tier, GFLOP/s-floor tier) the same way, so an incoming ask reads the cached
//! best of each bucket whose bids it could serve and walks only those that cross its price.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap};

use hashgrid_protocol::limits::{MAX_CLOCK_SKEW_MS, MAX_TTL_MS};
use hashgrid_protocol::{Ask, Backend, Bid, Cancel, Msat, OrderRef, PublicKey, Requirements};

/// Most live orders (asks plus bids) one book holds; beyond this new orders are refused.
/// 1,000,000 orders of about 0.5 KiB is ~0.5 GiB: the bound is there so that a flood of valid
/// orders cannot exhaust a node's memory, far above what a real network posts.
pub const MAX_ORDERS: usize = 1_000_000;

/// Most remembered sequence numbers of orders that left the book (filled or cancelled), so
/// that a late copy of an old order cannot come back. Oldest-expiring are forgotten first.
pub const MAX_RETIRED: usize = 1_000_000;

/// How long the book remembers an order that left it (filled or cancelled): the longest any
/// version of it could still be live. An order lives at most [`MAX_TTL_MS`] after it was
/// created, and was created at most [`MAX_CLOCK_SKEW_MS`] ahead of our clock, so no copy of an
/// order older than a cancel can still be valid after this long.
pub const REMEMBER_MS: u64 = MAX_TTL_MS + MAX_CLOCK_SKEW_MS;

/// Most distinct region names a book interns. Regions are a handful of names per network.
pub const MAX_REGIONS: usize = 4096;

/// The reputation of order owners, supplied by the node. Higher is better. It only breaks
/// ties between orders at the same price that arrived in the same millisecond.
pub trait Reputation {
    /// The score of `owner`.
    fn score(&self, owner: &PublicKey) -> i64;
}

/// Every owner has the same reputation.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoReputation;

impl Reputation for NoReputation {
    fn score(&self, _: &PublicKey) -> i64 {
        0
    }
}

impl<F: Fn(&PublicKey) -> i64> Reputation for F {
    fn score(&self, owner: &PublicKey) -> i64 {
        self(owner)
    }
}

/// What a buyer knows of each provider's recent load: how many of its own jobs it placed
/// there lately (a buyer sees only its own traffic; that is enough to spread it).
pub trait Load {
    /// Recent jobs placed with `owner`.
    fn load(&self, owner: &PublicKey) -> u64;
}

/// No load known.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoLoad;

impl Load for NoLoad {
    fn load(&self, _: &PublicKey) -> u64 {
        0
    }
}

impl<F: Fn(&PublicKey) -> u64> Load for F {
    fn load(&self, owner: &PublicKey) -> u64 {
        self(owner)
    }
}

/// What each provider already holds of a job's inputs (the warm input ids of its capacity
/// ad): a provider holding a model's weights starts the job without an upload.
pub trait Warm {
    /// Bytes of the job's inputs that `owner` holds.
    fn held(&self, owner: &PublicKey) -> u64;
    /// Bytes of the job's inputs in all (0: nothing to weigh).
    fn total(&self) -> u64;
}

/// Nothing is known to be held.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoWarm;

impl Warm for NoWarm {
    fn held(&self, _: &PublicKey) -> u64 {
        0
    }
    fn total(&self) -> u64 {
        0
    }
}

/// The most an ask is discounted in ranking, in basis points of its price, when its provider
/// holds all of the job's inputs: 20%, so a buyer pays at most 25% more per GPU-second to
/// skip uploading a model's weights (~100 MB for a small model, GBs for a large one). The
/// discount is in proportion to the bytes held; fills stay at the ask's own price.
pub const WARM_DISCOUNT_BP: u64 = 2_000;

/// An ask's price as [`OrderBook::candidates_fair`] ranks it: `price` in units of 1/10 000
/// msat, less [`WARM_DISCOUNT_BP`] times the share of the job's inputs its provider holds.
pub fn ranked_price(price: Msat, held: u64, total: u64) -> u128 {
    let full = u128::from(price.0) * 10_000;
    if total == 0 {
        return full;
    }
    let off = u128::from(held.min(total)) * u128::from(WARM_DISCOUNT_BP) / u128::from(total);
    u128::from(price.0) * (10_000 - off)
}

/// How [`OrderBook::candidates_fair`] ranks asks at the same price.
pub struct Fairness<'a> {
    /// Reputation of each provider.
    pub rep: &'a dyn Reputation,
    /// Recent load the buyer put on each provider.
    pub load: &'a dyn Load,
    /// The buyer's random tie-break seed (per buyer and per job, so no provider is every
    /// buyer's favourite).
    pub seed: u64,
    /// What each provider holds of the job's inputs ([`NoWarm`]: price alone).
    pub warm: &'a dyn Warm,
}

/// A provider's place in the random tie-break for `seed`: a keyed mix of its public key
/// (splitmix64 steps), uniform enough that each of n tied providers comes first for ~1/n of
/// the seeds.
pub fn tie_break(seed: u64, owner: &PublicKey) -> u64 {
    fn mix(mut z: u64) -> u64 {
        z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    owner.0.chunks(8).fold(mix(seed), |h, c| {
        let mut w = [0u8; 8];
        w[..c.len()].copy_from_slice(c);
        mix(h ^ u64::from_le_bytes(w))
    })
}

/// One trade: `units` of the ask sold to the bid at the ask's price.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    /// The ask.
    pub ask: OrderRef,
    /// The ask's sequence number.
    pub ask_seq: u64,
    /// The bid.
    pub bid: OrderRef,
    /// The bid's sequence number.
    pub bid_seq: u64,
    /// Units traded.
    pub units: u32,
    /// Price in msat per GPU-second (the ask's).
    pub price: Msat,
}

/// Why the book refused an order or cancel.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum BookError {
    /// A newer (or the same) version of this order was seen already.
    #[error("stale order: sequence {seq} is not newer than {latest}")]
    Stale {
        /// The sequence number received.
        seq: u64,
        /// The newest seen.
        latest: u64,
    },
    /// The order expired before it arrived.
    #[error("order expired")]
    Expired,
    /// The order has no units.
    #[error("order has no units")]
    NoUnits,
    /// The book is full (it holds its most orders, [`Limits::max_orders`]).
    #[error("book is full ({0} orders)")]
    Full(usize),
    /// Too many distinct regions.
    #[error("too many distinct regions ({MAX_REGIONS})")]
    TooManyRegions,
}

/// Which side an order is on.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Side {
    /// A provider's ask.
    Ask,
    /// A buyer's bid.
    Bid,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct BucketKey {
    region: u16,
    backend: u8,
    mem_tier: u8,
    flops_tier: u8,
}

/// Where resting bids are indexed: a region (or any), a backend (or any), and the tiers of
/// the bid's memory and GFLOP/s floors. An ask can only serve bids in buckets whose region
/// and backend are its own or "any" and whose tiers are at most its own.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct BidBucket {
    region: Option<u16>,
    backend: Option<u8>,
    mem_tier: u8,
    flops_tier: u8,
}

/// An ask's priority, ascending = best first: its price in the high 64 bits, its arrival in
/// the low. Time needs no place of its own: the book's clock never runs back, so (price,
/// time, arrival) and (price, arrival) order the same, and one 128-bit compare is what the
/// bucket trees and merges make instead of a three-field one.
type AskPrio = u128;
/// A bid's priority, ascending = best first: `!max_price` (highest limit first) in the high
/// 64 bits, its arrival in the low.
type BidPrio = u128;

/// The priority of an order at `high` (an ask's price, a bid's inverted limit) that arrived
/// `arrival`-th, and the most a priority at `high` can be.
fn prio(high: u64, arrival: u64) -> u128 {
    u128::from(high) << 64 | u128::from(arrival)
}

fn prio_max(high: u64) -> u128 {
    prio(high, u64::MAX)
}

#[derive(Debug, Clone)]
struct AskEntry {
    ask: Ask,
    remaining: u32,
    time: u64,
    arrival: u64,
    bucket: BucketKey,
}

impl AskEntry {
    fn prio(&self) -> AskPrio {
        prio(self.ask.price.0, self.arrival)
    }
}

#[derive(Debug, Clone)]
struct BidEntry {
    bid: Bid,
    remaining: u32,
    time: u64,
    arrival: u64,
    /// The buckets this bid is indexed in (one per allowed region × backend).
    buckets: BidBuckets,
}

/// A bid's buckets: up to two inline (a bid names at most two regions and one backend in the
/// common case, so entering one allocates nothing for them), more on the heap.
#[derive(Debug, Clone)]
enum BidBuckets {
    Inline(u8, [BidBucket; 2]),
    Heap(Vec<BidBucket>),
}

impl BidBuckets {
    fn as_slice(&self) -> &[BidBucket] {
        match self {
            BidBuckets::Inline(n, ks) => &ks[..usize::from(*n)],
            BidBuckets::Heap(ks) => ks,
        }
    }

    /// Adds `k` unless it is there already.
    fn add(&mut self, k: BidBucket) {
        if self.as_slice().contains(&k) {
            return;
        }
        match self {
            BidBuckets::Inline(n, ks) if usize::from(*n) < ks.len() => {
                ks[usize::from(*n)] = k;
                *n += 1;
            }
            BidBuckets::Inline(_, ks) => {
                let mut v = ks.to_vec();
                v.push(k);
                *self = BidBuckets::Heap(v);
            }
            BidBuckets::Heap(ks) => ks.push(k),
        }
    }
}

impl BidEntry {
    fn prio(&self) -> BidPrio {
        prio(!self.bid.max_price.0, self.arrival)
    }
}

/// The book's hash maps: foldhash, seeded per process (keys are attacker-chosen public keys
/// and order ids; an unpredictable seed keeps them from aiming at one bucket), several times
/// faster than SipHash on the 40-byte order keys.
type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

/// An ask as the book holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestingAsk {
    /// The ask as signed.
    pub ask: Ask,
    /// Units not yet filled in this book.
    pub remaining: u32,
}

/// A bid as the book holds it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestingBid {
    /// The bid as signed.
    pub bid: Bid,
    /// Units not yet filled in this book.
    pub remaining: u32,
}

/// How to sort offers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OfferSort {
    /// Lowest price per GPU-second first (then priority).
    #[default]
    Price,
    /// Lowest price per GFLOP/s of measured matmul throughput first.
    PricePerGflop,
}

/// A query for the CLI's `offers` table.
#[derive(Debug, Clone, Default)]
pub struct OfferQuery {
    /// What the GPU must meet.
    pub requirements: Requirements,
    /// Highest price per GPU-second, if any.
    pub max_price: Option<Msat>,
    /// The sort order.
    pub sort: OfferSort,
    /// Most offers returned (0 = no limit).
    pub limit: usize,
}

/// Offers in one region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RegionDepth {
    /// Number of asks.
    pub asks: usize,
    /// Units on offer.
    pub units: u64,
    /// Lowest price.
    pub best_price: Option<Msat>,
}

/// The ids (regions or backends) a filter allows: any, or a list (empty: none). Up to
/// [`Allowed::INLINE`] are kept inline, so that building a bid's filter allocates nothing in
/// the common case (a bid names one or two regions, at most one backend).
#[derive(Debug, Clone)]
enum Allowed<T> {
    Any,
    Few(u8, [T; Allowed::<()>::INLINE]),
    Many(Vec<T>),
}

impl<T> Allowed<T> {
    const INLINE: usize = 6;
}

impl<T: Copy + PartialEq + Default> Allowed<T> {
    /// `Any` when `ids` is `None`, else the ids (repeats kept: they cost a comparison).
    fn of(ids: Option<impl Iterator<Item = T>>) -> Allowed<T> {
        let Some(ids) = ids else {
            return Allowed::Any;
        };
        let mut few = [T::default(); Allowed::<()>::INLINE];
        let mut n = 0usize;
        let mut many: Vec<T> = Vec::new();
        for id in ids {
            if n < few.len() {
                few[n] = id;
                n += 1;
            } else {
                if many.is_empty() {
                    many.extend_from_slice(&few);
                }
                many.push(id);
            }
        }
        if many.is_empty() {
            Allowed::Few(n as u8, few)
        } else {
            Allowed::Many(many)
        }
    }

    #[inline]
    fn allows(&self, id: T) -> bool {
        match self {
            Allowed::Any => true,
            Allowed::Few(n, ids) => ids.iter().take(usize::from(*n)).any(|&x| x == id),
            Allowed::Many(ids) => ids.contains(&id),
        }
    }
}

/// The filter an ask must pass to serve a bid (or a query), with regions interned.
struct AskFilter {
    max_price: u64,
    /// Regions (a name no order has used cannot match), with a bit for each allowed id below
    /// 64 (all bits for any region), so that the check of a bucket, made for every bucket
    /// head a bid's merge passes, is a shift in the common case.
    regions: Allowed<u16>,
    region_bits: u64,
    /// A bit per allowed backend id ([`backend_id`]: 0 to 5).
    backend_bits: u8,
    min_mem: u64,
    min_mflops: u64,
    /// `tier(min_mem)` and `tier(min_mflops)`, worked out once per filter.
    mem_tier: u8,
    flops_tier: u8,
    min_seconds: u32,
    exclude: Option<PublicKey>,
    now: u64,
}

impl AskFilter {
    #[inline(always)]
    fn bucket_ok(&self, k: &BucketKey) -> bool {
        (k.mem_tier >= self.mem_tier)
            & (k.flops_tier >= self.flops_tier)
            & (self.backend_bits >> (k.backend & 7) & 1 != 0)
            && if k.region < 64 {
                self.region_bits >> k.region & 1 != 0
            } else {
                self.regions.allows(k.region)
            }
    }

    fn accepts(&self, e: &AskEntry) -> bool {
        let a = &e.ask;
        e.remaining > 0
            && a.price.0 <= self.max_price
            && a.expires_at.0 > self.now
            && a.gpu.memory_bytes >= self.min_mem
            && a.gpu.bench.matmul_mflops >= self.min_mflops
            && a.max_seconds >= self.min_seconds
            && self.exclude != Some(a.provider)
            && self.bucket_ok(&e.bucket)
    }
}

/// Capability tier: quarter-octaves, floor(4·log2(x)) + 1 (0 for 0), so tiers are a factor
/// of about 1.19 apart. Fine tiers keep the one bucket a threshold falls inside (whose asks
/// are checked one by one) small; every tier above it qualifies whole.
fn tier(x: u64) -> u8 {
    if x == 0 {
        return 0;
    }
    let msb = 63 - x.leading_zeros();
    // The two bits after the most significant one: which quarter of the octave.
    let quarter = if msb >= 2 {
        (x >> (msb - 2)) & 0b11
    } else {
        (x << (2 - msb)) & 0b11
    };
    // At most 63·4 + 3 + 1 = 256 for x near 2^64: saturate into the top tier.
    u8::try_from(msb * 4 + quarter as u32 + 1).unwrap_or(u8::MAX)
}

/// A bit for each id below 64 in `ids`.
fn bits(ids: &[u16]) -> u64 {
    ids.iter()
        .filter(|&&id| id < 64)
        .fold(0, |m, &id| m | 1 << id)
}

fn backend_id(b: Backend) -> u8 {
    match b {
        Backend::Vulkan => 0,
        Backend::Metal => 1,
        Backend::Dx12 => 2,
        Backend::Gl => 3,
        Backend::BrowserWebGpu => 4,
        Backend::Other => 5,
    }
}

/// Turns a stream of candidate orders, in priority order without reputation, into a plan:
/// candidates tied on (price, time) are collected and reordered by reputation (highest first,
/// then arrival) before units are taken. Shared by both sides of the book.
struct Planner {
    /// (slot of the order, units taken from it).
    plan: Vec<(Slot, u32)>,
    /// Units still wanted (unit mode).
    left: u32,
    /// Most orders wanted (count mode, for queries); 0 = unit mode.
    limit: usize,
    /// The candidates tied on `group_key`: the first inline, the rest (rare: a tie on price
    /// and time) in a vector, so that an untied candidate allocates nothing.
    first: Option<(i64, u64, Slot, u32)>,
    group: Vec<(i64, u64, Slot, u32)>,
    group_key: Option<(u64, u64)>,
}

impl Planner {
    /// A plan for `want` units, written into `plan` (emptied first: a book reuses one
    /// vector for every incoming order's plan).
    fn units(want: u32, mut plan: Vec<(Slot, u32)>) -> Planner {
        plan.clear();
        Planner {
            plan,
            left: want,
            limit: 0,
            first: None,
            group: Vec::new(),
            group_key: None,
        }
    }

    fn orders(limit: usize) -> Planner {
        Planner {
            limit: limit.max(1),
            ..Planner::units(0, Vec::new())
        }
    }

    fn done(&self) -> bool {
        if self.limit > 0 {
            self.plan.len() >= self.limit
        } else {
            self.left == 0
        }
    }

    fn flush(&mut self) {
        let Some(first) = self.first.take() else {
            return;
        };
        if self.group.is_empty() {
            self.take(first.2, first.3);
            return;
        }
        self.group.push(first);
        self.group
            .sort_by_key(|&(score, arrival, _, _)| (Reverse(score), arrival));
        let group = std::mem::take(&mut self.group);
        for &(_, _, r, rem) in &group {
            self.take(r, rem);
        }
        self.group = group;
        self.group.clear();
    }

    /// Plans the next candidate in order, while the plan wants more.
    fn take(&mut self, r: Slot, rem: u32) {
        if self.limit > 0 {
            if self.plan.len() < self.limit {
                self.plan.push((r, rem));
            }
        } else if self.left > 0 {
            let take = rem.min(self.left);
            self.left -= take;
            self.plan.push((r, take));
        }
    }

    /// Offers the next candidate; returns false once the plan is complete (stop scanning).
    fn offer(&mut self, key: (u64, u64), score: i64, arrival: u64, r: Slot, rem: u32) -> bool {
        if self.group_key != Some(key) {
            self.flush();
            if self.done() {
                return false;
            }
            self.group_key = Some(key);
        }
        if self.first.is_none() {
            self.first = Some((score, arrival, r, rem));
        } else {
            self.group.push((score, arrival, r, rem));
        }
        true
    }

    fn finish(mut self) -> Vec<(Slot, u32)> {
        self.flush();
        self.plan
    }
}

/// The orders of one bucket by priority, with the best cached for the merges.
#[derive(Debug)]
struct Bucket<P> {
    /// Slot indices in the side's [`Slab`], by priority.
    orders: BTreeMap<P, Slot>,
    best: Option<(P, Slot)>,
}

impl<P> Default for Bucket<P> {
    fn default() -> Self {
        Bucket {
            orders: BTreeMap::new(),
            best: None,
        }
    }
}

/// A slot in a [`Slab`].
type Slot = u32;

/// What is left of an order taken out of the book: enough to remember it.
struct Gone {
    r: OrderRef,
    /// `r`'s hash ([`Index::hash`]).
    h: u64,
    seq: u64,
    time: u64,
}

/// An entry knows its order's identity (so that a slot need not hold a copy of it).
trait Identity {
    fn order_ref(&self) -> OrderRef;
}

impl Identity for AskEntry {
    fn order_ref(&self) -> OrderRef {
        self.ask.order_ref()
    }
}

impl Identity for BidEntry {
    fn order_ref(&self) -> OrderRef {
        self.bid.order_ref()
    }
}

/// One side's live entries in slots of a vector. The buckets' trees, the expiry queue and
/// the book's index by order identity ([`Known`]) hold 4-byte slot numbers (not 40-byte order
/// identities), so a merge or an expiry reads an entry by its slot without hashing its key. A
/// freed slot is reused; a tree entry is removed with its order, so no tree ever names a
/// freed slot (the expiry queue checks the entry's arrival, which no other order shares).
#[derive(Debug)]
struct Slab<E> {
    slots: Vec<Option<E>>,
    free: Vec<Slot>,
    len: usize,
}

impl<E> Default for Slab<E> {
    fn default() -> Self {
        Slab {
            slots: Vec::new(),
            free: Vec::new(),
            len: 0,
        }
    }
}

impl<E: Identity> Slab<E> {
    fn len(&self) -> usize {
        self.len
    }

    fn at(&self, i: Slot) -> Option<&E> {
        self.slots.get(i as usize)?.as_ref()
    }

    fn at_mut(&mut self, i: Slot) -> Option<&mut E> {
        self.slots.get_mut(i as usize)?.as_mut()
    }

    /// The order identity and entry in slot `i`, the entry mutable.
    fn entry_mut(&mut self, i: Slot) -> Option<(OrderRef, &mut E)> {
        let e = self.slots.get_mut(i as usize)?.as_mut()?;
        Some((e.order_ref(), e))
    }

    /// Stores an entry and returns its slot.
    fn insert(&mut self, e: E) -> Slot {
        self.len += 1;
        match self.free.pop() {
            Some(i) => {
                self.slots[i as usize] = Some(e);
                i
            }
            None => {
                // At most `Limits::max_orders` live entries, far below u32::MAX.
                let i = Slot::try_from(self.slots.len()).unwrap_or(Slot::MAX);
                self.slots.push(Some(e));
                i
            }
        }
    }

    /// The order identity and entry in slot `i`.
    fn entry(&self, i: Slot) -> Option<(OrderRef, &E)> {
        let e = self.slots.get(i as usize)?.as_ref()?;
        Some((e.order_ref(), e))
    }

    /// Empties slot `i`, dropping its entry where it lies (an entry is a few hundred bytes:
    /// moving it out only to drop it would copy them).
    fn free(&mut self, i: Slot) {
        if let Some(s) = self.slots.get_mut(i as usize)
            && s.is_some()
        {
            *s = None;
            self.free.push(i);
            self.len -= 1;
        }
    }

    fn values(&self) -> impl Iterator<Item = &E> {
        self.slots.iter().filter_map(Option::as_ref)
    }
}

/// What the book knows of one order identity: the slot of its live ask or bid (an owner should
/// not use one id on both sides, but a book holds what it is sent), and what it remembers of
/// versions that left the book. One hash lookup answers every question an incoming order,
/// cancel or fill asks of an identity.
///
/// With the 40-byte identity an entry of the index is 64 bytes.
#[derive(Debug, Clone, Copy)]
struct Known {
    /// Slot of the live ask, or [`NO_SLOT`].
    ask: Slot,
    /// Slot of the live bid, or [`NO_SLOT`].
    bid: Slot,
    /// The highest sequence number remembered since a version left the book.
    retired_seq: u64,
    /// The key of that memory in `retired_queue` (unique, from the arrival counter); 0 when
    /// nothing is remembered.
    retired_key: u64,
}

/// No slot: [`Slab::insert`] never hands it out (the book holds fewer orders).
const NO_SLOT: Slot = Slot::MAX;

impl Default for Known {
    fn default() -> Known {
        Known {
            ask: NO_SLOT,
            bid: NO_SLOT,
            retired_seq: 0,
            retired_key: 0,
        }
    }
}

impl Known {
    fn ask(&self) -> Option<Slot> {
        (self.ask != NO_SLOT).then_some(self.ask)
    }

    fn bid(&self) -> Option<Slot> {
        (self.bid != NO_SLOT).then_some(self.bid)
    }

    /// (highest seq, key) of what is remembered, if anything.
    fn retired(&self) -> Option<(u64, u64)> {
        (self.retired_key != 0).then_some((self.retired_seq, self.retired_key))
    }

    fn is_empty(&self) -> bool {
        self.ask == NO_SLOT && self.bid == NO_SLOT && self.retired_key == 0
    }
}

/// The book's index by order identity: one hash table of (identity, [`Known`]), probed with a
/// hash the caller works out once per operation ([`Index::hash`]) and passes to every lookup
/// of that identity the operation makes (an incoming ask looks its identity up, may take out
/// the version it replaces and then writes its slot; a cancel looks up, takes out and
/// remembers), where a map would hash the 40-byte key again for each.
///
/// The hash is foldhash's, seeded per process (keys are attacker-chosen public keys and order
/// ids; an unpredictable seed keeps them from aiming at one bucket), fed the identity as five
/// 64-bit words.
#[derive(Debug, Default)]
struct Index {
    table: hashbrown::HashTable<(OrderRef, Known)>,
    state: foldhash::fast::RandomState,
}

fn hash_ref(state: &foldhash::fast::RandomState, r: &OrderRef) -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = state.build_hasher();
    let (words, _) = r.owner.0.as_chunks::<8>();
    for w in words {
        h.write_u64(u64::from_le_bytes(*w));
    }
    h.write_u64(r.order_id);
    h.finish()
}

impl Index {
    fn hash(&self, r: &OrderRef) -> u64 {
        hash_ref(&self.state, r)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.len()
    }

    /// What is known of `r`, whose hash is `h`.
    fn get(&self, h: u64, r: &OrderRef) -> Option<&Known> {
        self.table.find(h, |e| e.0 == *r).map(|e| &e.1)
    }

    fn get_mut(&mut self, h: u64, r: &OrderRef) -> Option<&mut Known> {
        self.table.find_mut(h, |e| e.0 == *r).map(|e| &mut e.1)
    }

    /// The entry of `r`, made empty if there was none.
    fn get_or_default(&mut self, h: u64, r: OrderRef) -> &mut Known {
        let state = &self.state;
        &mut self
            .table
            .entry(h, |e| e.0 == r, |e| hash_ref(state, &e.0))
            .or_insert((r, Known::default()))
            .into_mut()
            .1
    }

    fn remove(&mut self, h: u64, r: &OrderRef) {
        if let Ok(e) = self.table.find_entry(h, |e| e.0 == *r) {
            e.remove();
        }
    }
}

/// Every non-empty bucket of one side in one compact list, with an index by key and the
/// buckets ordered by their best order (`by_best`), so that a merge ([`Buckets::merge`])
/// reads buckets best first and stops once it has what it needs, instead of looking at every
/// bucket's head for every bid.
#[derive(Debug)]
struct Buckets<K, P> {
    index: Map<K, usize>,
    keys: Vec<K>,
    buckets: Vec<Bucket<P>>,
    /// (best priority, bucket index) of every bucket, sorted: a flat array, because a merge
    /// reads it from the front for every order (a tree's iterator cost ~30 instructions a
    /// step) while it changes only when a bucket's best does, and it holds one entry per
    /// bucket (around a hundred). Each entry carries its bucket's key, so that a merge
    /// checks a head against its filter without reading `keys`.
    by_best: Vec<(P, usize, K)>,
}

impl<K, P> Default for Buckets<K, P> {
    fn default() -> Self {
        Buckets {
            index: Map::default(),
            keys: Vec::new(),
            buckets: Vec::new(),
            by_best: Vec::new(),
        }
    }
}

impl<K: Copy + Eq + std::hash::Hash, P: Copy + Ord> Buckets<K, P> {
    fn rank(&mut self, e: (P, usize)) {
        let at = self.by_best.partition_point(|x| (x.0, x.1) < e);
        self.by_best.insert(at, (e.0, e.1, self.keys[e.1]));
    }

    fn unrank(&mut self, e: (P, usize)) {
        if let Ok(at) = self.by_best.binary_search_by(|x| (x.0, x.1).cmp(&e)) {
            self.by_best.remove(at);
        }
    }

    /// Bucket `i`'s best went from `old` to `new`: its entry moves to its new place in one
    /// rotation of the entries between (a fill moves the best a few places back; a remove and
    /// an insert would shift the whole tail twice).
    fn rerank(&mut self, i: usize, old: P, new: P) {
        let Ok(from) = self.by_best.binary_search_by(|x| (x.0, x.1).cmp(&(old, i))) else {
            self.rank((new, i));
            return;
        };
        let e = (new, i, self.keys[i]);
        let to = self.by_best.partition_point(|x| (x.0, x.1) < (new, i));
        if to > from {
            // Later: the entries between move up one.
            self.by_best[from..to].rotate_left(1);
            self.by_best[to - 1] = e;
        } else {
            self.by_best[to..=from].rotate_right(1);
            self.by_best[to] = e;
        }
    }

    fn insert(&mut self, key: K, prio: P, r: Slot) {
        let i = match self.index.get(&key) {
            Some(&i) => i,
            None => {
                self.keys.push(key);
                self.buckets.push(Bucket::default());
                self.index.insert(key, self.keys.len() - 1);
                self.keys.len() - 1
            }
        };
        let b = &mut self.buckets[i];
        b.orders.insert(prio, r);
        if b.best.is_none_or(|(p, _)| prio < p) {
            match b.best.replace((prio, r)) {
                Some((old, _)) => self.rerank(i, old, prio),
                None => self.rank((prio, i)),
            }
        }
    }

    fn remove(&mut self, key: &K, prio: &P) {
        let Some(&i) = self.index.get(key) else {
            return;
        };
        let b = &mut self.buckets[i];
        b.orders.remove(prio);
        if b.best.is_some_and(|(p, _)| p == *prio) {
            b.best = b.orders.first_key_value().map(|(p, r)| (*p, *r));
            match b.best {
                Some((new, _)) => self.rerank(i, *prio, new),
                None => self.unrank((*prio, i)),
            }
        }
        if self.buckets[i].orders.is_empty() {
            self.index.remove(key);
            self.keys.swap_remove(i);
            self.buckets.swap_remove(i);
            if let Some(moved) = self.keys.get(i) {
                self.index.insert(*moved, i);
                // The bucket that was last is now at `i`.
                let last = self.keys.len();
                if let Some((p, _)) = self.buckets[i].best {
                    // Same priority, a new index: it may sort elsewhere among equal ones.
                    self.unrank((p, last));
                    self.rank((p, i));
                }
            }
        }
    }

    /// Visits the orders of the buckets `ok` accepts, best first, up to `hi` inclusive,
    /// until `visit` returns false: a lazy k-way merge that takes bucket heads in the order
    /// of `by_best` and opens a bucket's tree only once it has taken that bucket's best.
    fn merge(&self, hi: P, ok: impl Fn(&K) -> bool, mut visit: impl FnMut(P, Slot) -> bool) {
        let mut heads = self
            .by_best
            .iter()
            .take_while(|(p, ..)| *p <= hi)
            .filter(|(.., k)| ok(k))
            .map(|&(p, i, _)| (p, i));
        let mut next_head = heads.next();
        // The next order of every opened bucket.
        let mut heap: BinaryHeap<Reverse<(P, usize, Slot)>> = BinaryHeap::new();
        let mut open: Vec<(usize, std::collections::btree_map::Range<'_, P, Slot>)> = Vec::new();
        // A bucket whose head was just taken: its tree is opened only if the merge goes on
        // (most merges stop at their first order, and then allocate nothing).
        let mut taken: Option<(P, usize)> = None;
        loop {
            if let Some((p, i)) = taken.take() {
                let mut it = self.buckets[i].orders.range(p..=hi);
                it.next();
                if let Some((p2, r2)) = it.next() {
                    heap.push(Reverse((*p2, i, *r2)));
                }
                open.push((i, it));
            }
            let from_head = match (next_head, heap.peek()) {
                (Some((p, _)), Some(Reverse((q, ..)))) => p < *q,
                (Some(_), None) => true,
                (None, Some(_)) => false,
                (None, None) => return,
            };
            let (p, r) = if from_head {
                let Some((p, i)) = next_head else { return };
                next_head = heads.next();
                let Some((_, r)) = self.buckets[i].best else {
                    continue;
                };
                taken = Some((p, i));
                (p, r)
            } else {
                let Some(Reverse((p, i, r))) = heap.pop() else {
                    return;
                };
                if let Some((_, it)) = open.iter_mut().find(|(j, _)| *j == i)
                    && let Some((p2, r2)) = it.next()
                {
                    heap.push(Reverse((*p2, i, *r2)));
                }
                (p, r)
            };
            if !visit(p, r) {
                return;
            }
        }
    }
}

/// How much one book holds: bounds on what gossip from outside can make it remember.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Most live orders (asks plus bids); new ones beyond it are refused ([`BookError::Full`]).
    pub max_orders: usize,
    /// Most remembered sequence numbers of orders that left the book; beyond it the one due
    /// to be forgotten soonest is forgotten first.
    pub max_retired: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_orders: MAX_ORDERS,
            max_retired: MAX_RETIRED,
        }
    }
}

/// The order book: every live ask and bid, indexed for matching.
///
/// Orders enter in one of two ways. [`submit_ask`](Self::submit_ask) /
/// [`submit_bid`](Self::submit_bid) cross the incoming order with what rests, as an exchange
/// does. [`rest_ask`](Self::rest_ask) / [`rest_bid`](Self::rest_bid) only index it: a node's
/// view of the market from gossip ([`crate::GossipBook`]) holds everyone's orders without
/// trading them against each other (buyers propose to providers directly), so such a book can
/// be crossed.
#[derive(Debug, Default)]
pub struct OrderBook {
    limits: Limits,
    /// Every order identity the book holds live or remembers.
    known: Index,
    asks: Slab<AskEntry>,
    bids: Slab<BidEntry>,
    ask_buckets: Buckets<BucketKey, AskPrio>,
    /// Resting bids by bucket.
    bid_index: Buckets<BidBucket, BidPrio>,
    /// Live orders by (expiry, arrival, side, slot), earliest on top. Entries of orders that
    /// left the book early (filled, cancelled, replaced) are not removed then, but skipped by
    /// `expire` (the slot no longer holds an entry of that arrival) and swept out once they
    /// outnumber the live orders. A heap, not a tree: a push is a sift in one array of 24-byte
    /// entries, where a tree insert allocates.
    expiry: BinaryHeap<Reverse<(u64, u64, Side, Slot)>>,
    /// Entries of `expiry` whose order left the book.
    stale_expiry: usize,
    /// Identities in `known` that remember a version that left the book.
    retired: usize,
    /// Remembered identities by (until, key), soonest on top; an entry whose order was
    /// remembered again since is stale (its key no longer matches) and skipped, and stale
    /// entries are swept out once they outnumber the live ones.
    retired_queue: BinaryHeap<Reverse<(u64, u64, OrderRef)>>,
    regions: Map<String, u16>,
    region_names: Vec<String>,
    arrival: u64,
    /// The latest time an order entered at.
    clock: u64,
    /// The vector an incoming order's plan is written into, kept between orders.
    plan_buf: Vec<(Slot, u32)>,
}

impl OrderBook {
    /// An empty book.
    pub fn new() -> OrderBook {
        OrderBook::default()
    }

    /// An empty book with these bounds.
    pub fn with_limits(limits: Limits) -> OrderBook {
        OrderBook {
            limits: Limits {
                // Slots are u32 and one value means "none".
                max_orders: limits.max_orders.min(NO_SLOT as usize / 2),
                ..limits
            },
            ..OrderBook::default()
        }
    }

    fn lookup(&self, r: &OrderRef) -> Option<&Known> {
        self.known.get(self.known.hash(r), r)
    }

    fn live_ask(&self, r: &OrderRef) -> Option<&AskEntry> {
        self.asks.at(self.lookup(r)?.ask()?)
    }

    fn live_bid(&self, r: &OrderRef) -> Option<&BidEntry> {
        self.bids.at(self.lookup(r)?.bid()?)
    }

    /// The sequence number of the live ask `r`.
    pub fn ask_seq(&self, r: &OrderRef) -> Option<u64> {
        self.live_ask(r).map(|e| e.ask.seq)
    }

    /// The sequence number of the live bid `r`.
    pub fn bid_seq(&self, r: &OrderRef) -> Option<u64> {
        self.live_bid(r).map(|e| e.bid.seq)
    }

    /// The highest sequence number remembered for `r` since it left the book (filled or
    /// cancelled): no copy of it at or below this sequence number enters again.
    pub fn retired_seq(&self, r: &OrderRef) -> Option<u64> {
        self.lookup(r)?.retired().map(|(seq, _)| seq)
    }

    /// Live asks.
    pub fn ask_count(&self) -> usize {
        self.asks.len()
    }

    /// Live bids.
    pub fn bid_count(&self) -> usize {
        self.bids.len()
    }

    /// A live ask.
    pub fn ask(&self, r: &OrderRef) -> Option<RestingAsk> {
        self.live_ask(r).map(|e| RestingAsk {
            ask: e.ask.clone(),
            remaining: e.remaining,
        })
    }

    /// A live bid.
    pub fn bid(&self, r: &OrderRef) -> Option<RestingBid> {
        self.live_bid(r).map(|e| RestingBid {
            bid: e.bid.clone(),
            remaining: e.remaining,
        })
    }

    fn region_id(&self, name: &str) -> Option<u16> {
        self.regions.get(name).copied()
    }

    fn intern(&mut self, name: &str) -> Result<u16, BookError> {
        if let Some(id) = self.regions.get(name) {
            return Ok(*id);
        }
        if self.region_names.len() >= MAX_REGIONS {
            return Err(BookError::TooManyRegions);
        }
        let id = self.region_names.len() as u16;
        self.region_names.push(name.to_owned());
        self.regions.insert(name.to_owned(), id);
        Ok(id)
    }

    fn check_new(
        &self,
        known: &Known,
        seq: u64,
        live_seq: Option<u64>,
        units: u32,
        expires: u64,
        now: u64,
    ) -> Result<(), BookError> {
        if let Some(latest) = live_seq.filter(|&l| seq <= l) {
            return Err(BookError::Stale { seq, latest });
        }
        if let Some((latest, _)) = known.retired().filter(|&(l, _)| seq <= l) {
            return Err(BookError::Stale { seq, latest });
        }
        if units == 0 {
            return Err(BookError::NoUnits);
        }
        if expires <= now {
            return Err(BookError::Expired);
        }
        if live_seq.is_none() && self.asks.len() + self.bids.len() >= self.limits.max_orders {
            return Err(BookError::Full(self.limits.max_orders));
        }
        Ok(())
    }

    /// The next arrival number, and its time: `now_ms`, or the latest time already given if
    /// the caller's clock went back (see the module's "Priority").
    /// Keeps `plan`'s vector for the next order's plan, unless one huge order grew it.
    fn keep_plan_buf(&mut self, plan: Vec<(Slot, u32)>) {
        if plan.capacity() <= 1024 {
            self.plan_buf = plan;
        }
    }

    fn next_arrival(&mut self, now_ms: u64) -> (u64, u64) {
        self.arrival += 1;
        self.clock = self.clock.max(now_ms);
        (self.arrival, self.clock)
    }

    /// Adds (or replaces, by higher `seq`) an ask and matches it against resting bids.
    /// Returns the fills; what is left rests in the book.
    pub fn submit_ask(
        &mut self,
        ask: Ask,
        now_ms: u64,
        rep: &dyn Reputation,
    ) -> Result<Vec<Fill>, BookError> {
        let (r, h, slot, _) = self.enter_ask(ask, now_ms)?;
        // Match against resting bids, best first.
        let buf = std::mem::take(&mut self.plan_buf);
        let plan = match self.asks.at(slot) {
            Some(e) => self.plan_for_ask(e, e.bucket.region, now_ms, rep, buf),
            None => buf,
        };
        let mut fills = Vec::with_capacity(plan.len());
        for &(bid_slot, units) in &plan {
            let (Some((bid_ref, b)), Some(a)) =
                (self.bids.entry_mut(bid_slot), self.asks.at_mut(slot))
            else {
                continue;
            };
            b.remaining -= units;
            a.remaining -= units;
            fills.push(Fill {
                ask: r,
                ask_seq: a.ask.seq,
                bid: bid_ref,
                bid_seq: b.bid.seq,
                units,
                price: a.ask.price,
            });
            if b.remaining == 0 {
                self.retire_bid(bid_slot);
            }
        }
        match self.asks.at(slot) {
            Some(a) if a.remaining == 0 => {
                let seq = a.ask.seq;
                self.asks.free(slot);
                self.remember(r, h, seq, now_ms.saturating_add(REMEMBER_MS));
            }
            _ => self.index_ask(r, h, slot),
        }
        self.keep_plan_buf(plan);
        Ok(fills)
    }

    /// Adds (or replaces, by higher `seq`) an ask without matching it: it rests whole, at
    /// the time `now_ms`. Returns whether it replaced a live version.
    pub fn rest_ask(&mut self, ask: Ask, now_ms: u64) -> Result<bool, BookError> {
        let (r, h, slot, replaced) = self.enter_ask(ask, now_ms)?;
        self.index_ask(r, h, slot);
        Ok(replaced)
    }

    /// Checks a new ask, removes the version it replaces and puts its entry in a slot, not
    /// yet indexed (an ask nearly always rests, and the entry of a few hundred bytes is then
    /// written once, where it stays). Returns its identity, the identity's hash
    /// ([`Index::hash`]), the slot and whether it replaced a live version.
    fn enter_ask(
        &mut self,
        ask: Ask,
        now_ms: u64,
    ) -> Result<(OrderRef, u64, Slot, bool), BookError> {
        let r = ask.order_ref();
        let h = self.known.hash(&r);
        let known = self.known.get(h, &r).copied().unwrap_or_default();
        let live = known
            .ask()
            .and_then(|slot| Some((slot, self.asks.at(slot)?.ask.seq)));
        self.check_new(
            &known,
            ask.seq,
            live.map(|l| l.1),
            ask.units,
            ask.expires_at.0,
            now_ms,
        )?;
        let region = self.intern(&ask.region)?;
        if let Some((slot, _)) = live {
            self.remove_ask(slot, true, Some(h));
        }
        let (arrival, time) = self.next_arrival(now_ms);
        let bucket = BucketKey {
            region,
            backend: backend_id(ask.gpu.backend),
            mem_tier: tier(ask.gpu.memory_bytes),
            flops_tier: tier(ask.gpu.bench.matmul_mflops),
        };
        let slot = self.asks.insert(AskEntry {
            remaining: ask.units,
            ask,
            time,
            arrival,
            bucket,
        });
        Ok((r, h, slot, live.is_some()))
    }

    /// Indexes the ask entered in `slot` (its bucket, its expiry, its identity): it rests.
    fn index_ask(&mut self, r: OrderRef, h: u64, slot: Slot) {
        let Some(e) = self.asks.at(slot) else {
            return;
        };
        let (prio, bucket) = (e.prio(), e.bucket);
        let (expires, arrival) = (e.ask.expires_at.0, e.arrival);
        self.expiry
            .push(Reverse((expires, arrival, Side::Ask, slot)));
        self.ask_buckets.insert(bucket, prio, slot);
        self.known.get_or_default(h, r).ask = slot;
    }

    /// Adds (or replaces, by higher `seq`) a bid and matches it against resting asks.
    /// Returns the fills; what is left rests in the book.
    pub fn submit_bid(
        &mut self,
        bid: Bid,
        now_ms: u64,
        rep: &dyn Reputation,
    ) -> Result<Vec<Fill>, BookError> {
        let (r, h, mut entry, _) = self.enter_bid(bid, now_ms)?;
        let filter = self.filter_for_bid(&entry.bid, now_ms);
        let buf = std::mem::take(&mut self.plan_buf);
        let plan = self.plan_asks(&filter, entry.remaining, 0, rep, buf);
        let mut fills = Vec::with_capacity(plan.len());
        for &(slot, units) in &plan {
            let Some((ask_ref, a)) = self.asks.entry_mut(slot) else {
                continue;
            };
            a.remaining -= units;
            entry.remaining -= units;
            fills.push(Fill {
                ask: ask_ref,
                ask_seq: a.ask.seq,
                bid: r,
                bid_seq: entry.bid.seq,
                units,
                price: a.ask.price,
            });
            if a.remaining == 0 {
                self.retire_ask(slot);
            }
        }
        self.keep_plan_buf(plan);
        if entry.remaining > 0 {
            self.rest_bid_entry(r, h, entry);
        } else {
            self.remember(r, h, entry.bid.seq, now_ms.saturating_add(REMEMBER_MS));
        }
        Ok(fills)
    }

    /// Adds (or replaces, by higher `seq`) a bid without matching it: it rests whole, at the
    /// time `now_ms`. Returns whether it replaced a live version.
    pub fn rest_bid(&mut self, bid: Bid, now_ms: u64) -> Result<bool, BookError> {
        let (r, h, entry, replaced) = self.enter_bid(bid, now_ms)?;
        self.rest_bid_entry(r, h, entry);
        Ok(replaced)
    }

    /// Checks a new bid, removes the version it replaces and makes its entry (not indexed).
    fn enter_bid(
        &mut self,
        bid: Bid,
        now_ms: u64,
    ) -> Result<(OrderRef, u64, BidEntry, bool), BookError> {
        let r = bid.order_ref();
        let h = self.known.hash(&r);
        let known = self.known.get(h, &r).copied().unwrap_or_default();
        let live = known
            .bid()
            .and_then(|slot| Some((slot, self.bids.at(slot)?.bid.seq)));
        self.check_new(
            &known,
            bid.seq,
            live.map(|l| l.1),
            bid.units,
            bid.expires_at.0,
            now_ms,
        )?;
        let (mem_tier, flops_tier) = (
            tier(bid.requirements.min_memory_bytes),
            tier(bid.requirements.min_mflops),
        );
        // One bucket per allowed region × backend ("any" for an empty list), repeats dropped.
        let req = &bid.requirements;
        let none = BidBucket {
            region: None,
            backend: None,
            mem_tier,
            flops_tier,
        };
        let mut buckets = BidBuckets::Inline(0, [none; 2]);
        let add = |buckets: &mut BidBuckets, region: Option<u16>| {
            let backends = req.backends.iter().map(|b| Some(backend_id(*b)));
            let none = req.backends.is_empty().then_some(None);
            for backend in backends.chain(none) {
                buckets.add(BidBucket {
                    region,
                    backend,
                    mem_tier,
                    flops_tier,
                });
            }
        };
        if req.regions.is_empty() {
            add(&mut buckets, None);
        }
        for name in &req.regions {
            let id = self.intern(name)?;
            add(&mut buckets, Some(id));
        }
        if let Some((slot, _)) = live {
            self.remove_bid(slot, true, Some(h));
        }
        let (arrival, time) = self.next_arrival(now_ms);
        let entry = BidEntry {
            remaining: bid.units,
            bid,
            time,
            arrival,
            buckets,
        };
        Ok((r, h, entry, live.is_some()))
    }

    fn rest_bid_entry(&mut self, r: OrderRef, h: u64, entry: BidEntry) {
        let prio = entry.prio();
        let (expires, arrival) = (entry.bid.expires_at.0, entry.arrival);
        let slot = self.bids.insert(entry);
        self.expiry
            .push(Reverse((expires, arrival, Side::Bid, slot)));
        if let Some(e) = self.bids.at(slot) {
            for b in e.buckets.as_slice() {
                self.bid_index.insert(*b, prio, slot);
            }
        }
        self.known.get_or_default(h, r).bid = slot;
    }

    /// Applies a cancel: removes the order if the cancel is newer than it, and remembers the
    /// cancel so that older copies of the order cannot enter later. Returns the side of the
    /// order removed, if one was live.
    pub fn cancel(&mut self, c: &Cancel, now_ms: u64) -> Result<Option<Side>, BookError> {
        let r = OrderRef {
            owner: c.owner,
            order_id: c.order_id,
        };
        let h = self.known.hash(&r);
        let known = self.known.get(h, &r).copied().unwrap_or_default();
        let live = known
            .ask()
            .and_then(|s| {
                let e = self.asks.at(s)?;
                Some((Side::Ask, s, e.ask.seq, e.ask.expires_at.0))
            })
            .or_else(|| {
                known.bid().and_then(|s| {
                    let e = self.bids.at(s)?;
                    Some((Side::Bid, s, e.bid.seq, e.bid.expires_at.0))
                })
            });
        if let Some((.., seq, _)) = live.filter(|&(.., seq, _)| c.seq <= seq) {
            return Err(BookError::Stale {
                seq: c.seq,
                latest: seq,
            });
        }
        let until = live
            .map_or(0, |l| l.3)
            .max(c.expires_at.0)
            .max(now_ms.saturating_add(REMEMBER_MS));
        let removed = match live {
            Some((Side::Ask, slot, ..)) => {
                self.remove_ask(slot, true, Some(h));
                Some(Side::Ask)
            }
            Some((Side::Bid, slot, ..)) => {
                self.remove_bid(slot, true, Some(h));
                Some(Side::Bid)
            }
            None => None,
        };
        self.remember(r, h, c.seq, until);
        Ok(removed)
    }

    /// Removes a live order without remembering it (unlike [`cancel`](Self::cancel)): for a
    /// book that mirrors another view and must drop what that view dropped. Returns its side.
    pub fn withdraw(&mut self, r: &OrderRef) -> Option<Side> {
        let h = self.known.hash(r);
        let known = self.known.get(h, r).copied()?;
        if let Some(slot) = known.ask() {
            self.remove_ask(slot, false, Some(h));
            Some(Side::Ask)
        } else if let Some(slot) = known.bid() {
            self.remove_bid(slot, false, Some(h));
            Some(Side::Bid)
        } else {
            None
        }
    }

    /// Drops every order that expired at or before `now_ms` (and forgets retired orders that
    /// can no longer come back). Returns the orders dropped, in expiry order.
    pub fn expire(&mut self, now_ms: u64) -> Vec<(Side, OrderRef)> {
        let mut out = Vec::new();
        while let Some(&Reverse((at, arrival, side, slot))) = self.expiry.peek() {
            if at > now_ms {
                break;
            }
            self.expiry.pop();
            let gone = match side {
                Side::Ask if self.asks.at(slot).is_some_and(|e| e.arrival == arrival) => {
                    self.take_ask(slot, false, None).map(|g| g.r)
                }
                Side::Bid if self.bids.at(slot).is_some_and(|e| e.arrival == arrival) => {
                    self.take_bid(slot, false, None).map(|g| g.r)
                }
                _ => {
                    self.stale_expiry = self.stale_expiry.saturating_sub(1);
                    continue;
                }
            };
            out.extend(gone.map(|r| (side, r)));
        }
        while let Some(&Reverse((until, n, r))) = self.retired_queue.peek() {
            if until > now_ms {
                break;
            }
            self.retired_queue.pop();
            self.forget_retired(&r, n);
        }
        out
    }

    /// Forgets what is remembered of `r` if its queue entry (`key`) is still current.
    fn forget_retired(&mut self, r: &OrderRef, key: u64) -> bool {
        let h = self.known.hash(r);
        let Some(k) = self.known.get_mut(h, r) else {
            return false;
        };
        if k.retired_key != key {
            return false;
        }
        k.retired_key = 0;
        self.retired -= 1;
        if k.is_empty() {
            self.known.remove(h, r);
        }
        true
    }

    /// Remembers that `r` (hash `h`) left the book at sequence number `seq`, until `until`.
    fn remember(&mut self, r: OrderRef, h: u64, seq: u64, until: u64) {
        // One lookup when the identity's entry exists (an order that just left keeps it for
        // this write: see `take_ask`) and nothing must be forgotten first.
        let done = match self.known.get_mut(h, &r) {
            Some(k) => match k.retired() {
                // Its queue entry goes stale: the key below no longer matches it.
                Some((old_seq, ..)) if old_seq >= seq => return,
                Some(_) => {
                    self.arrival += 1;
                    (k.retired_seq, k.retired_key) = (seq, self.arrival);
                    true
                }
                None if self.retired < self.limits.max_retired => {
                    self.arrival += 1;
                    self.retired += 1;
                    (k.retired_seq, k.retired_key) = (seq, self.arrival);
                    true
                }
                None => false,
            },
            None => false,
        };
        if !done {
            // Nothing of `r` is remembered here.
            if self.retired >= self.limits.max_retired {
                // Forget the one due soonest (skipping stale entries).
                while let Some(Reverse((_, k, victim))) = self.retired_queue.pop() {
                    if self.forget_retired(&victim, k) {
                        break;
                    }
                }
            }
            self.arrival += 1;
            let k = self.known.get_or_default(h, r);
            self.retired += 1;
            (k.retired_seq, k.retired_key) = (seq, self.arrival);
        }
        self.retired_queue.push(Reverse((until, self.arrival, r)));
        if self.retired_queue.len() > 2 * self.retired + 1024 {
            let known = &self.known;
            self.retired_queue.retain(|&Reverse((_, n, r))| {
                known
                    .get(known.hash(&r), &r)
                    .is_some_and(|k| k.retired_key == n)
            });
        }
    }

    /// An order left the book before it expired: its expiry entry is now stale. Once stale
    /// entries outnumber the live orders (plus a margin), they are swept out in one pass, so
    /// the index stays within about twice the live orders at O(1) amortised per removal.
    fn left_early(&mut self) {
        self.stale_expiry += 1;
        if self.stale_expiry > self.asks.len() + self.bids.len() + 1024 {
            let (asks, bids) = (&self.asks, &self.bids);
            self.expiry
                .retain(|&Reverse((_, arrival, side, slot))| match side {
                    Side::Ask => asks.at(slot).is_some_and(|e| e.arrival == arrival),
                    Side::Bid => bids.at(slot).is_some_and(|e| e.arrival == arrival),
                });
            self.stale_expiry = 0;
        }
    }

    /// A filled ask leaves the book and is remembered.
    fn retire_ask(&mut self, slot: Slot) {
        if let Some(g) = self.take_ask(slot, true, None) {
            self.left_early();
            self.remember(g.r, g.h, g.seq, g.time.saturating_add(REMEMBER_MS));
        }
    }

    /// A filled bid leaves the book and is remembered.
    fn retire_bid(&mut self, slot: Slot) {
        if let Some(g) = self.take_bid(slot, true, None) {
            self.left_early();
            self.remember(g.r, g.h, g.seq, g.time.saturating_add(REMEMBER_MS));
        }
    }

    /// A live ask leaves the book before it expires (cancelled, replaced, withdrawn). `keep`
    /// and `h`: as for [`take_ask`](Self::take_ask).
    fn remove_ask(&mut self, slot: Slot, keep: bool, h: Option<u64>) {
        if self.take_ask(slot, keep, h).is_some() {
            self.left_early();
        }
    }

    /// A live bid leaves the book before it expires.
    fn remove_bid(&mut self, slot: Slot, keep: bool, h: Option<u64>) {
        if self.take_bid(slot, keep, h).is_some() {
            self.left_early();
        }
    }

    /// Takes the ask in `slot` out of its bucket, `known` and its slab.
    ///
    /// `keep`: the caller is about to write this identity's index entry again (remember the
    /// version that left, or put its replacement there), so an entry left empty stays for it
    /// instead of being removed and inserted again (two hash-table operations on a key whose
    /// entry is a cache miss away). `h`: the identity's hash, if the caller has it.
    fn take_ask(&mut self, slot: Slot, keep: bool, h: Option<u64>) -> Option<Gone> {
        let (r, e) = self.asks.entry(slot)?;
        let gone = Gone {
            r,
            h: h.unwrap_or_else(|| self.known.hash(&r)),
            seq: e.ask.seq,
            time: e.time,
        };
        self.ask_buckets.remove(&e.bucket, &e.prio());
        self.asks.free(slot);
        self.forget_live(&gone, Side::Ask, keep);
        Some(gone)
    }

    /// Takes the bid in `slot` out of its buckets, `known` and its slab.
    fn take_bid(&mut self, slot: Slot, keep: bool, h: Option<u64>) -> Option<Gone> {
        let (r, e) = self.bids.entry(slot)?;
        let gone = Gone {
            r,
            h: h.unwrap_or_else(|| self.known.hash(&r)),
            seq: e.bid.seq,
            time: e.time,
        };
        let prio = e.prio();
        for k in e.buckets.as_slice() {
            self.bid_index.remove(k, &prio);
        }
        self.bids.free(slot);
        self.forget_live(&gone, Side::Bid, keep);
        Some(gone)
    }

    /// `r` no longer has a live order on `side`; its index entry goes once empty, unless
    /// `keep` (see [`take_ask`](Self::take_ask)).
    fn forget_live(&mut self, g: &Gone, side: Side, keep: bool) {
        if let Some(k) = self.known.get_mut(g.h, &g.r) {
            match side {
                Side::Ask => k.ask = NO_SLOT,
                Side::Bid => k.bid = NO_SLOT,
            }
            if !keep && k.is_empty() {
                self.known.remove(g.h, &g.r);
            }
        }
    }

    fn filter_for_bid(&self, bid: &Bid, now_ms: u64) -> AskFilter {
        self.filter(
            &bid.requirements,
            bid.max_price.0,
            bid.max_seconds,
            Some(bid.buyer),
            now_ms,
        )
    }

    fn filter(
        &self,
        req: &Requirements,
        max_price: u64,
        min_seconds: u32,
        exclude: Option<PublicKey>,
        now_ms: u64,
    ) -> AskFilter {
        let regions = Allowed::of(
            (!req.regions.is_empty()).then(|| req.regions.iter().filter_map(|n| self.region_id(n))),
        );
        let region_bits = match &regions {
            Allowed::Any => u64::MAX,
            Allowed::Few(n, ids) => bits(&ids[..usize::from(*n)]),
            Allowed::Many(ids) => bits(ids),
        };
        let backend_bits = if req.backends.is_empty() {
            u8::MAX
        } else {
            req.backends
                .iter()
                .fold(0u8, |m, b| m | 1 << backend_id(*b))
        };
        AskFilter {
            max_price,
            regions,
            region_bits,
            backend_bits,
            min_mem: req.min_memory_bytes,
            min_mflops: req.min_mflops,
            mem_tier: tier(req.min_memory_bytes),
            flops_tier: tier(req.min_mflops),
            min_seconds,
            exclude,
            now: now_ms,
        }
    }

    /// Visits qualifying asks in priority order (price, time, arrival) until `visit` says stop.
    fn scan_asks<'a>(&'a self, f: &AskFilter, mut visit: impl FnMut(Slot, &'a AskEntry) -> bool) {
        let hi = prio_max(f.max_price);
        let mut check = |slot: Slot| -> bool {
            match self.asks.at(slot) {
                Some(e) if f.accepts(e) => visit(slot, e),
                _ => true,
            }
        };
        self.ask_buckets
            .merge(hi, |k| f.bucket_ok(k), |_, slot| check(slot));
    }

    /// Plans which asks serve `want` units, honouring the reputation tie-break within groups
    /// of equal (price, time). `limit` > 0 caps the number of asks instead of units.
    fn plan_asks(
        &self,
        f: &AskFilter,
        want: u32,
        limit: usize,
        rep: &dyn Reputation,
        buf: Vec<(Slot, u32)>,
    ) -> Vec<(Slot, u32)> {
        let mut planner = if limit > 0 {
            Planner::orders(limit)
        } else {
            Planner::units(want, buf)
        };
        self.scan_asks(f, |slot, e| {
            planner.offer(
                (e.ask.price.0, e.time),
                rep.score(&e.ask.provider),
                e.arrival,
                slot,
                e.remaining,
            )
        });
        planner.finish()
    }

    fn plan_for_ask(
        &self,
        a: &AskEntry,
        region: u16,
        now_ms: u64,
        rep: &dyn Reputation,
        buf: Vec<(Slot, u32)>,
    ) -> Vec<(Slot, u32)> {
        let ask = &a.ask;
        let accepts = |e: &BidEntry| {
            let b = &e.bid;
            e.remaining > 0
                && b.expires_at.0 > now_ms
                && b.buyer != ask.provider
                && b.max_seconds <= ask.max_seconds
                && b.requirements.min_memory_bytes <= ask.gpu.memory_bytes
                && b.requirements.min_mflops <= ask.gpu.bench.matmul_mflops
                && (b.requirements.backends.is_empty()
                    || b.requirements.backends.contains(&ask.gpu.backend))
        };
        let hi = prio_max(!ask.price.0);
        let (backend, mem_tier, flops_tier) =
            (a.bucket.backend, a.bucket.mem_tier, a.bucket.flops_tier);
        // The same lazy merge as `scan_asks`, over the bid buckets this ask could serve:
        // most asks cross no resting bid, and cost one look at the best bucket heads.
        let mut planner = Planner::units(a.remaining, buf);
        self.bid_index.merge(
            hi,
            |k| {
                k.region.is_none_or(|r| r == region)
                    && k.backend.is_none_or(|b| b == backend)
                    && k.mem_tier <= mem_tier
                    && k.flops_tier <= flops_tier
            },
            |_, slot| {
                let Some(e) = self.bids.at(slot) else {
                    return true;
                };
                !accepts(e)
                    || planner.offer(
                        (e.bid.max_price.0, e.time),
                        rep.score(&e.bid.buyer),
                        e.arrival,
                        slot,
                        e.remaining,
                    )
            },
        );
        planner.finish()
    }

    /// The asks that could serve `bid` now, best first, without changing the book: what a
    /// buyer's node proposes to, in order (DESIGN.md "Matching"). At most `limit` asks.
    pub fn candidates(
        &self,
        bid: &Bid,
        now_ms: u64,
        rep: &dyn Reputation,
        limit: usize,
    ) -> Vec<RestingAsk> {
        let f = self.filter_for_bid(bid, now_ms);
        self.plan_asks(&f, 0, limit.max(1), rep, Vec::new())
            .into_iter()
            .filter_map(|(slot, _)| {
                self.asks.at(slot).map(|e| RestingAsk {
                    ask: e.ask.clone(),
                    remaining: e.remaining,
                })
            })
            .collect()
    }

    /// The asks that can take all of `bid` (each with at least `bid.units` remaining), best
    /// first, for a buyer that will propose to them in turn: price first, where a provider
    /// that holds the job's inputs is ranked at its [`ranked_price`] (up to
    /// [`WARM_DISCOUNT_BP`] off); among asks at the same ranked price, a provider with a
    /// negative reputation (one that failed the buyer more than it served it) comes after
    /// every other, whatever its load: spreading work is for providers in good standing.
    /// Among the rest, work spreads instead of going to the oldest or lowest-keyed ask: most
    /// free units (remaining minus the buyer's recent load there) first, then least recent
    /// load, then highest reputation, then the buyer's random [`tie_break`]. Every ask that could rank among the first `limit` is
    /// ranked before the list is cut, so a provider at the best price is never cut off by the
    /// order asks arrived in.
    pub fn candidates_fair(
        &self,
        bid: &Bid,
        now_ms: u64,
        fair: &Fairness<'_>,
        limit: usize,
    ) -> Vec<RestingAsk> {
        self.candidates_fair_except(bid, now_ms, fair, limit, &|_| false)
    }

    /// [`candidates_fair`](Self::candidates_fair) without the asks `skip` names (providers a
    /// buyer already tried, or knows to be down): a standing book ranks for every job without
    /// being rebuilt. Skipped asks take no place among the first `limit`.
    pub fn candidates_fair_except(
        &self,
        bid: &Bid,
        now_ms: u64,
        fair: &Fairness<'_>,
        limit: usize,
        skip: &dyn Fn(&Ask) -> bool,
    ) -> Vec<RestingAsk> {
        let f = self.filter_for_bid(bid, now_ms);
        let limit = limit.max(1);
        let mut found: Vec<&AskEntry> = Vec::new();
        let total = fair.warm.total();
        // Once `limit` asks are found, the limit-th price bounds what can still rank among
        // them: that price itself, or up to the warm discount above it.
        let mut cutoff: Option<u128> = None;
        self.scan_asks(&f, |_, e| {
            if let Some(c) = cutoff
                && ranked_price(e.ask.price, total, total) > c
            {
                return false;
            }
            if e.remaining >= bid.units && !skip(&e.ask) {
                found.push(e);
                if found.len() == limit {
                    cutoff = Some(u128::from(e.ask.price.0) * 10_000);
                }
            }
            true
        });
        let mut ranked: Vec<_> = found
            .into_iter()
            .map(|e| {
                let p = &e.ask.provider;
                let load = fair.load.load(p);
                let free = u64::from(e.remaining).saturating_sub(load);
                let score = fair.rep.score(p);
                let key = (
                    ranked_price(e.ask.price, fair.warm.held(p), total),
                    score < 0,
                    Reverse(free),
                    load,
                    Reverse(score),
                    tie_break(fair.seed, p),
                );
                (key, e)
            })
            .collect();
        ranked.sort_by_key(|(k, _)| *k);
        ranked
            .into_iter()
            .take(limit)
            .map(|(_, e)| RestingAsk {
                ask: e.ask.clone(),
                remaining: e.remaining,
            })
            .collect()
    }

    /// Offers for the CLI: asks meeting the query, sorted as asked.
    pub fn offers(&self, q: &OfferQuery, now_ms: u64) -> Vec<RestingAsk> {
        let f = self.filter(
            &q.requirements,
            q.max_price.map_or(u64::MAX, |m| m.0),
            0,
            None,
            now_ms,
        );
        let limit = if q.limit == 0 { usize::MAX } else { q.limit };
        let mut out = Vec::new();
        match q.sort {
            OfferSort::Price => self.scan_asks(&f, |_, e| {
                out.push(RestingAsk {
                    ask: e.ask.clone(),
                    remaining: e.remaining,
                });
                out.len() < limit
            }),
            OfferSort::PricePerGflop => {
                let mut all: Vec<&AskEntry> = Vec::new();
                self.scan_asks(&f, |_, e| {
                    all.push(e);
                    true
                });
                // price / mflops ascending, compared exactly by cross-multiplying; an ask with
                // no measured throughput sorts last.
                all.sort_by(|a, b| {
                    let (pa, fa) = (
                        u128::from(a.ask.price.0),
                        u128::from(a.ask.gpu.bench.matmul_mflops),
                    );
                    let (pb, fb) = (
                        u128::from(b.ask.price.0),
                        u128::from(b.ask.gpu.bench.matmul_mflops),
                    );
                    (fa == 0)
                        .cmp(&(fb == 0))
                        .then((pa * fb).cmp(&(pb * fa)))
                        .then(a.prio().cmp(&b.prio()))
                });
                out.extend(all.into_iter().take(limit).map(|e| RestingAsk {
                    ask: e.ask.clone(),
                    remaining: e.remaining,
                }));
            }
        }
        out
    }

    /// Depth per region for asks meeting `req` (any price).
    pub fn depth(&self, req: &Requirements, now_ms: u64) -> BTreeMap<String, RegionDepth> {
        let f = self.filter(req, u64::MAX, 0, None, now_ms);
        let mut out: BTreeMap<String, RegionDepth> = BTreeMap::new();
        self.scan_asks(&f, |_, e| {
            let d = out.entry(e.ask.region.clone()).or_default();
            d.asks += 1;
            d.units += u64::from(e.remaining);
            d.best_price = Some(d.best_price.map_or(e.ask.price, |p| p.min(e.ask.price)));
            true
        });
        out
    }

    /// All live asks in priority order.
    pub fn asks(&self) -> Vec<RestingAsk> {
        let mut all: Vec<&AskEntry> = self.asks.values().collect();
        all.sort_by_key(|e| e.prio());
        all.into_iter()
            .map(|e| RestingAsk {
                ask: e.ask.clone(),
                remaining: e.remaining,
            })
            .collect()
    }

    /// All live bids in priority order (a bid allowing several regions appears once).
    pub fn bids(&self) -> Vec<RestingBid> {
        let mut all: Vec<&BidEntry> = self.bids.values().collect();
        all.sort_by_key(|e| e.prio());
        all.into_iter()
            .map(|e| RestingBid {
                bid: e.bid.clone(),
                remaining: e.remaining,
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use hashgrid_protocol::{
        Backend, Benchmark, DeviceType, GpuLimits, GpuProfile, Requirements, Timestamp,
    };

    const NOW: u64 = 1_700_000_000_000;

    fn ask(owner: u8, id: u64, seq: u64, expires_in: u64) -> Ask {
        Ask {
            provider: PublicKey([owner; 32]),
            order_id: id,
            seq,
            units: 1,
            price: Msat(10),
            gpu: GpuProfile {
                name: "g".into(),
                vendor: 0,
                device: 0,
                backend: Backend::Vulkan,
                device_type: DeviceType::DiscreteGpu,
                driver: String::new(),
                memory_bytes: 1 << 34,
                limits: GpuLimits::default(),
                bench: Benchmark {
                    matmul_mflops: 1_000_000,
                    copy_mbps: 1,
                },
            },
            region: "eu".into(),
            max_seconds: 60,
            created_at: Timestamp(NOW),
            expires_at: Timestamp(NOW + expires_in),
        }
    }

    /// A bid for one unit at up to `max_price`, any GPU, live for a minute.
    fn test_bid(owner: u8, id: u64, max_price: u64) -> Bid {
        Bid {
            buyer: PublicKey([owner; 32]),
            order_id: id,
            seq: 1,
            units: 1,
            requirements: Requirements::default(),
            max_price: Msat(max_price),
            max_seconds: 60,
            created_at: Timestamp(NOW),
            expires_at: Timestamp(NOW + 60_000),
            model: None,
        }
    }

    fn cancel(owner: u8, id: u64, seq: u64, expires_in: u64) -> Cancel {
        Cancel {
            owner: PublicKey([owner; 32]),
            order_id: id,
            seq,
            created_at: Timestamp(NOW),
            expires_at: Timestamp(NOW + expires_in),
        }
    }

    /// Every way an order leaves (filled resting, filled on arrival, replaced, cancelled)
    /// leaves at most its memory in the index by identity, and expiry forgets that too.
    #[test]
    fn orders_that_leave_keep_only_their_memory_until_it_is_due() {
        let bid = |owner: u8, id: u64| test_bid(owner, id, 100);
        let mut b = OrderBook::new();
        // A resting ask filled by an arriving bid.
        b.submit_ask(ask(1, 1, 1, 60_000), NOW, &NoReputation)
            .unwrap();
        assert_eq!(
            b.submit_bid(bid(9, 1), NOW, &NoReputation).unwrap().len(),
            1
        );
        // A resting bid filled by an arriving ask.
        b.rest_bid(bid(9, 2), NOW).unwrap();
        assert_eq!(
            b.submit_ask(ask(2, 1, 1, 60_000), NOW, &NoReputation)
                .unwrap()
                .len(),
            1
        );
        // An ask replaced by a newer version, then cancelled.
        b.submit_ask(ask(3, 1, 1, 60_000), NOW, &NoReputation)
            .unwrap();
        b.submit_ask(ask(3, 1, 2, 60_000), NOW, &NoReputation)
            .unwrap();
        assert_eq!(b.ask_seq(&ask(3, 1, 2, 0).order_ref()), Some(2));
        assert_eq!(b.cancel(&cancel(3, 1, 3, 1_000), NOW), Ok(Some(Side::Ask)));
        assert_eq!((b.ask_count(), b.bid_count()), (0, 0));
        // Five versions remembered, one index entry each, nothing else.
        assert_eq!((b.retired, b.known.len()), (5, 5));
        b.expire(NOW + REMEMBER_MS + 120_000);
        assert_eq!((b.retired, b.known.len()), (0, 0));
    }

    #[test]
    fn the_memory_of_retired_orders_is_bounded_and_forgets_the_soonest_due_first() {
        let mut b = OrderBook::with_limits(Limits {
            max_orders: 4,
            max_retired: 3,
        });
        // Five cancels, each remembered until later than the one before.
        for id in 1..=5u64 {
            b.submit_ask(ask(1, id, 1, 60_000), NOW, &NoReputation)
                .unwrap();
            let until = REMEMBER_MS + id * 1_000;
            assert_eq!(b.cancel(&cancel(1, id, 2, until), NOW), Ok(Some(Side::Ask)));
        }
        assert_eq!(b.ask_count(), 0);
        assert_eq!(b.retired, 3);
        let r = |id| OrderRef {
            owner: PublicKey([1; 32]),
            order_id: id,
        };
        // The two due soonest were forgotten: a late copy of either enters again; the three
        // remembered stay out.
        assert_eq!(b.retired_seq(&r(1)), None);
        assert_eq!(b.retired_seq(&r(2)), None);
        for id in 3..=5 {
            assert_eq!(b.retired_seq(&r(id)), Some(2));
            assert_eq!(
                b.rest_ask(ask(1, id, 1, 60_000), NOW),
                Err(BookError::Stale { seq: 1, latest: 2 })
            );
        }
        assert_eq!(b.rest_ask(ask(1, 1, 1, 60_000), NOW), Ok(false));
        // A newer version of a remembered order is live, and still remembered beside it.
        assert_eq!(b.rest_ask(ask(1, 4, 3, 60_000), NOW), Ok(false));
        assert_eq!((b.ask_seq(&r(4)), b.retired_seq(&r(4))), (Some(3), Some(2)));
        // Room for four orders: the fifth is refused, a replacement is not.
        b.rest_ask(ask(2, 1, 1, 60_000), NOW).unwrap();
        b.rest_ask(ask(2, 2, 1, 60_000), NOW).unwrap();
        assert_eq!(
            b.rest_ask(ask(2, 3, 1, 60_000), NOW),
            Err(BookError::Full(4))
        );
        assert_eq!(b.rest_ask(ask(2, 2, 2, 60_000), NOW), Ok(true));
        // Expiry drops the live orders, then forgets the remembered ones when they are due.
        assert_eq!(b.expire(NOW + 60_000).len(), 4);
        assert_eq!(b.retired_seq(&r(5)), Some(2));
        b.expire(NOW + REMEMBER_MS + 5_000);
        assert_eq!((b.retired, b.known.len()), (0, 0));
    }

    #[test]
    fn expiry_entries_of_orders_gone_early_are_skipped_and_swept() {
        let mut b = OrderBook::new();
        // A replaced ask's old expiry entry must not drop the new version.
        b.submit_ask(ask(1, 1, 1, 1_000), NOW, &NoReputation)
            .unwrap();
        b.submit_ask(ask(1, 1, 2, 5_000), NOW, &NoReputation)
            .unwrap();
        assert!(b.expire(NOW + 2_000).is_empty());
        assert_eq!(b.ask_count(), 1);
        assert_eq!(b.expire(NOW + 6_000).len(), 1);
        assert_eq!(b.ask_count(), 0);
        // Churn: orders that come and go leave at most about as many stale entries as live
        // orders (plus the margin) in the index.
        for i in 0..20_000u64 {
            b.submit_ask(ask(2, 100 + i, 1, 3_600_000), NOW, &NoReputation)
                .unwrap();
            let c = Cancel {
                owner: PublicKey([2; 32]),
                order_id: 100 + i,
                seq: 2,
                created_at: Timestamp(NOW),
                expires_at: Timestamp(NOW + 3_600_000),
            };
            b.cancel(&c, NOW).unwrap();
        }
        assert_eq!(b.ask_count(), 0);
        assert!(b.expiry.len() <= 1_025, "{} expiry entries", b.expiry.len());
        // A bid that matches nothing rests and expires normally among stale entries.
        let bid = Bid {
            buyer: PublicKey([3; 32]),
            order_id: 1,
            seq: 1,
            units: 1,
            requirements: Requirements::default(),
            max_price: Msat(1),
            max_seconds: 60,
            created_at: Timestamp(NOW),
            expires_at: Timestamp(NOW + 10),
            model: None,
        };
        b.submit_bid(bid, NOW, &NoReputation).unwrap();
        assert_eq!(b.expire(NOW + 20), vec![(Side::Bid, bid_ref())]);
        fn bid_ref() -> OrderRef {
            OrderRef {
                owner: PublicKey([3; 32]),
                order_id: 1,
            }
        }
    }

    /// A bid's filter checks a bucket's region and backend by bits for the first 64 region
    /// ids and by the list past them: asks in 70 regions, every other one on another
    /// backend, and bids naming regions on both sides of 64.
    #[test]
    fn region_and_backend_filters_hold_past_the_first_64_regions() {
        let mut b = OrderBook::new();
        for i in 0..70u8 {
            let mut a = ask(i, 1, 1, 60_000);
            a.region = format!("r{i}");
            a.price = Msat(100 + u64::from(i));
            if i % 2 == 1 {
                a.gpu.backend = Backend::Dx12;
            }
            b.rest_ask(a, NOW).unwrap();
        }
        let found = |regions: &[&str], backends: &[Backend]| -> Vec<u8> {
            let bid = Bid {
                requirements: Requirements {
                    regions: regions.iter().map(|r| r.to_string()).collect(),
                    backends: backends.to_vec(),
                    ..Requirements::default()
                },
                ..test_bid(200, 1, 1_000)
            };
            b.candidates(&bid, NOW, &NoReputation, 100)
                .iter()
                .map(|a| a.ask.provider.0[0])
                .collect()
        };
        assert_eq!(found(&["r69", "r3"], &[]), vec![3, 69]);
        assert_eq!(found(&["r68", "r3", "r65"], &[Backend::Dx12]), vec![3, 65]);
        assert_eq!(found(&["r68", "r3", "r65"], &[Backend::Vulkan]), vec![68]);
        assert_eq!(found(&["r63", "r64"], &[]), vec![63, 64]);
        assert_eq!(found(&["nowhere"], &[]), Vec::<u8>::new());
        assert_eq!(found(&[], &[Backend::Metal]), Vec::<u8>::new());
        assert_eq!(found(&[], &[]).len(), 70);
        // Seven named regions: the list is kept on the heap.
        let many = ["r1", "r2", "r66", "r67", "r0", "r5", "r69"];
        assert_eq!(found(&many, &[Backend::Dx12]), vec![1, 5, 67, 69]);
        // A resting bid in 3 regions × 2 backends (six buckets, past the two kept inline) is
        // found by an ask of any of them, and leaves every bucket when filled.
        let bid = Bid {
            units: 2,
            requirements: Requirements {
                regions: vec!["r80".into(), "r81".into(), "r3".into()],
                backends: vec![Backend::Vulkan, Backend::Dx12],
                ..Requirements::default()
            },
            ..test_bid(201, 2, 1_000)
        };
        b.rest_bid(bid, NOW).unwrap();
        let mut a = ask(150, 1, 1, 60_000);
        a.region = "r81".into();
        a.gpu.backend = Backend::Dx12;
        assert_eq!(b.submit_ask(a, NOW, &NoReputation).unwrap().len(), 1);
        let mut a = ask(151, 1, 1, 60_000);
        a.region = "r80".into();
        assert_eq!(b.submit_ask(a, NOW, &NoReputation).unwrap().len(), 1);
        assert_eq!(b.bid_count(), 0);
        let mut a = ask(152, 1, 1, 60_000);
        a.region = "r3".into();
        assert!(b.submit_ask(a, NOW, &NoReputation).unwrap().is_empty());
    }

    /// The book's clock never runs back: an ask entered with an earlier `now` than one already
    /// resting at the same price does not go ahead of it; it takes the latest time seen, so
    /// the two tie on time and reputation decides.
    #[test]
    fn a_clock_stepped_back_does_not_put_a_later_order_first() {
        let mut b = OrderBook::new();
        b.rest_ask(ask(1, 1, 1, 60_000), NOW + 10).unwrap();
        b.rest_ask(ask(2, 1, 1, 60_000), NOW).unwrap();
        let order: Vec<u8> = b.asks().iter().map(|a| a.ask.provider.0[0]).collect();
        assert_eq!(order, vec![1, 2]);
        let bid = test_bid(9, 1, 100);
        // Provider 2 has the better reputation: at equal time it is served first.
        let rep = |pk: &PublicKey| i64::from(pk.0[0]);
        let fills = b.submit_bid(bid, NOW + 11, &rep).unwrap();
        assert_eq!(fills.len(), 1);
        assert_eq!(fills[0].ask.owner, PublicKey([2; 32]));
        // Without a tie on time, arrival order holds whatever the reputation.
        let mut b = OrderBook::new();
        b.rest_ask(ask(2, 1, 1, 60_000), NOW).unwrap();
        b.rest_ask(ask(1, 1, 1, 60_000), NOW + 1).unwrap();
        let order: Vec<u8> = b.asks().iter().map(|a| a.ask.provider.0[0]).collect();
        assert_eq!(order, vec![2, 1]);
    }
}
