//! The engine against a naive reference model: for random sequences of asks, bids, cancels,
//! replaces and clock advances both give the same fills, the same errors and the same book.
//! Plus invariants on every fill: no unit sold twice, no fill above the bid's limit or below
//! the ask's price, no expired or cancelled order filled, no self-trade.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use hashgrid_market::book::REMEMBER_MS;
use hashgrid_market::*;
use hashgrid_protocol::*;
use proptest::prelude::*;
use std::collections::HashMap;

/// Live (order, remaining units) of each side, sorted.
type BookState = (Vec<(OrderRef, u32)>, Vec<(OrderRef, u32)>);

fn owner(i: u8) -> PublicKey {
    static KEYS: std::sync::OnceLock<Vec<PublicKey>> = std::sync::OnceLock::new();
    KEYS.get_or_init(|| {
        (0..6u8)
            .map(|s| Keypair::from_secret_bytes([s; 32]).public())
            .collect()
    })[i as usize]
}

fn rep(pk: &PublicKey) -> i64 {
    i64::from(pk.0[0] % 3)
}

const REGIONS: [&str; 3] = ["eu", "us", "asia"];

fn gpu(mem: u8, flops: u8, backend: bool) -> GpuProfile {
    GpuProfile {
        name: "gpu".into(),
        vendor: 0,
        device: 0,
        backend: if backend {
            Backend::Vulkan
        } else {
            Backend::Metal
        },
        device_type: DeviceType::DiscreteGpu,
        driver: String::new(),
        memory_bytes: [1u64 << 30, 1 << 33, 1 << 36][mem as usize],
        limits: GpuLimits::default(),
        bench: Benchmark {
            matmul_mflops: [1_000, 100_000, 10_000_000][flops as usize],
            copy_mbps: 1,
        },
    }
}

#[derive(Debug, Clone)]
enum Op {
    Ask {
        o: u8,
        id: u8,
        seq: u8,
        units: u32,
        price: u64,
        mem: u8,
        flops: u8,
        vk: bool,
        region: u8,
        secs: u32,
        ttl: u64,
    },
    Bid {
        o: u8,
        id: u8,
        seq: u8,
        units: u32,
        max_price: u64,
        mem: u8,
        flops: u8,
        regions: Vec<u8>,
        vk: Option<bool>,
        secs: u32,
        ttl: u64,
    },
    Cancel {
        o: u8,
        id: u8,
        seq: u8,
        ttl: u64,
    },
    Tick(u64),
    Expire,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..4, 0u8..3, 1u8..6, 1u32..5, 1u64..10, 0u8..3, 0u8..3, any::<bool>(), 0u8..3, prop_oneof![Just(10u32), Just(100)], 1u64..60)
            .prop_map(|(o, id, seq, units, price, mem, flops, vk, region, secs, ttl)| Op::Ask { o, id, seq, units, price, mem, flops, vk, region, secs, ttl }),
        4 => (0u8..4, 0u8..3, 1u8..6, 1u32..6, 1u64..10, 0u8..3, 0u8..3, proptest::collection::vec(0u8..3, 0..3), proptest::option::of(any::<bool>()), prop_oneof![Just(10u32), Just(100)], 1u64..60)
            .prop_map(|(o, id, seq, units, max_price, mem, flops, regions, vk, secs, ttl)| Op::Bid { o, id, seq, units, max_price, mem, flops, regions, vk, secs, ttl }),
        1 => (0u8..4, 0u8..3, 1u8..7, 1u64..60).prop_map(|(o, id, seq, ttl)| Op::Cancel { o, id, seq, ttl }),
        2 => (0u64..20).prop_map(Op::Tick),
        1 => Just(Op::Expire),
    ]
}

fn build(op: &Op, now: u64) -> (Option<Ask>, Option<Bid>, Option<Cancel>) {
    match op {
        Op::Ask {
            o,
            id,
            seq,
            units,
            price,
            mem,
            flops,
            vk,
            region,
            secs,
            ttl,
        } => (
            Some(Ask {
                provider: owner(*o),
                order_id: u64::from(*id),
                seq: u64::from(*seq),
                units: *units,
                price: Msat(*price),
                gpu: gpu(*mem, *flops, *vk),
                region: REGIONS[*region as usize].into(),
                max_seconds: *secs,
                created_at: Timestamp(now),
                expires_at: Timestamp(now + ttl),
            }),
            None,
            None,
        ),
        Op::Bid {
            o,
            id,
            seq,
            units,
            max_price,
            mem,
            flops,
            regions,
            vk,
            secs,
            ttl,
        } => (
            None,
            Some(Bid {
                buyer: owner(*o),
                order_id: u64::from(*id) + 100,
                seq: u64::from(*seq),
                units: *units,
                requirements: Requirements {
                    min_memory_bytes: gpu(*mem, 0, true).memory_bytes,
                    min_mflops: gpu(0, *flops, true).bench.matmul_mflops,
                    regions: regions
                        .iter()
                        .map(|r| REGIONS[*r as usize].to_string())
                        .collect(),
                    backends: vk
                        .map(|v| vec![if v { Backend::Vulkan } else { Backend::Metal }])
                        .unwrap_or_default(),
                },
                max_price: Msat(*max_price),
                max_seconds: *secs,
                created_at: Timestamp(now),
                expires_at: Timestamp(now + ttl),
                model: None,
            }),
            None,
        ),
        Op::Cancel { o, id, seq, ttl } => (
            None,
            None,
            // Cancel ids 0..3 hit asks, the bid ids are offset by 100: alternate by seq parity.
            Some(Cancel {
                owner: owner(*o),
                order_id: u64::from(*id) + if seq % 2 == 0 { 100 } else { 0 },
                seq: u64::from(*seq),
                created_at: Timestamp(now),
                expires_at: Timestamp(now + ttl),
            }),
        ),
        _ => (None, None, None),
    }
}

/// The naive model: vectors scanned and sorted on every call.
#[derive(Default)]
struct Model {
    asks: Vec<(Ask, u32, u64, u64)>, // ask, remaining, time, arrival
    bids: Vec<(Bid, u32, u64, u64)>,
    retired: HashMap<OrderRef, (u64, u64)>,
    arrival: u64,
}

impl Model {
    fn stale(&self, r: &OrderRef, seq: u64, live: Option<u64>) -> Option<BookError> {
        if let Some(l) = live.filter(|l| seq <= *l) {
            return Some(BookError::Stale { seq, latest: l });
        }
        if let Some(&(l, _)) = self.retired.get(r).filter(|(l, _)| seq <= *l) {
            return Some(BookError::Stale { seq, latest: l });
        }
        None
    }
    fn remember(&mut self, r: OrderRef, seq: u64, until: u64) {
        let e = self.retired.entry(r).or_insert((seq, until));
        if seq > e.0 {
            *e = (seq, until);
        }
    }

    fn submit_bid(&mut self, bid: Bid, now: u64) -> Result<Vec<Fill>, BookError> {
        let r = bid.order_ref();
        let live = self
            .bids
            .iter()
            .find(|b| b.0.order_ref() == r)
            .map(|b| b.0.seq);
        if let Some(e) = self.stale(&r, bid.seq, live) {
            return Err(e);
        }
        if bid.expires_at.0 <= now {
            return Err(BookError::Expired);
        }
        self.bids.retain(|b| b.0.order_ref() != r);
        self.arrival += 1;
        let arrival = self.arrival;
        let mut idx: Vec<usize> = (0..self.asks.len())
            .filter(|&i| {
                let (a, rem, ..) = &self.asks[i];
                *rem > 0
                    && a.price <= bid.max_price
                    && a.expires_at.0 > now
                    && bid.requirements.accepts(&a.gpu, &a.region)
                    && a.max_seconds >= bid.max_seconds
                    && a.provider != bid.buyer
            })
            .collect();
        idx.sort_by_key(|&i| {
            let (a, _, t, arr) = &self.asks[i];
            (a.price.0, *t, std::cmp::Reverse(rep(&a.provider)), *arr)
        });
        let mut left = bid.units;
        let mut fills = Vec::new();
        for i in idx {
            if left == 0 {
                break;
            }
            let (a, rem, ..) = &mut self.asks[i];
            let take = (*rem).min(left);
            *rem -= take;
            left -= take;
            fills.push(Fill {
                ask: a.order_ref(),
                ask_seq: a.seq,
                bid: r,
                bid_seq: bid.seq,
                units: take,
                price: a.price,
            });
        }
        let done: Vec<(OrderRef, u64, u64)> = self
            .asks
            .iter()
            .filter(|a| a.1 == 0)
            .map(|a| (a.0.order_ref(), a.0.seq, a.2 + REMEMBER_MS))
            .collect();
        for (r, s, u) in done {
            self.remember(r, s, u);
        }
        self.asks.retain(|a| a.1 > 0);
        if left > 0 {
            self.bids.push((bid, left, now, arrival));
        } else {
            self.remember(r, bid.seq, now + REMEMBER_MS);
        }
        Ok(fills)
    }

    fn submit_ask(&mut self, ask: Ask, now: u64) -> Result<Vec<Fill>, BookError> {
        let r = ask.order_ref();
        let live = self
            .asks
            .iter()
            .find(|a| a.0.order_ref() == r)
            .map(|a| a.0.seq);
        if let Some(e) = self.stale(&r, ask.seq, live) {
            return Err(e);
        }
        if ask.expires_at.0 <= now {
            return Err(BookError::Expired);
        }
        self.asks.retain(|a| a.0.order_ref() != r);
        self.arrival += 1;
        let arrival = self.arrival;
        let mut idx: Vec<usize> = (0..self.bids.len())
            .filter(|&i| {
                let (b, rem, ..) = &self.bids[i];
                *rem > 0
                    && ask.price <= b.max_price
                    && b.expires_at.0 > now
                    && b.requirements.accepts(&ask.gpu, &ask.region)
                    && ask.max_seconds >= b.max_seconds
                    && ask.provider != b.buyer
            })
            .collect();
        idx.sort_by_key(|&i| {
            let (b, _, t, arr) = &self.bids[i];
            (
                std::cmp::Reverse(b.max_price.0),
                *t,
                std::cmp::Reverse(rep(&b.buyer)),
                *arr,
            )
        });
        let mut left = ask.units;
        let mut fills = Vec::new();
        for i in idx {
            if left == 0 {
                break;
            }
            let (b, rem, ..) = &mut self.bids[i];
            let take = (*rem).min(left);
            *rem -= take;
            left -= take;
            fills.push(Fill {
                ask: r,
                ask_seq: ask.seq,
                bid: b.order_ref(),
                bid_seq: b.seq,
                units: take,
                price: ask.price,
            });
        }
        let done: Vec<(OrderRef, u64, u64)> = self
            .bids
            .iter()
            .filter(|b| b.1 == 0)
            .map(|b| (b.0.order_ref(), b.0.seq, b.2 + REMEMBER_MS))
            .collect();
        for (r, s, u) in done {
            self.remember(r, s, u);
        }
        self.bids.retain(|b| b.1 > 0);
        if left > 0 {
            self.asks.push((ask, left, now, arrival));
        } else {
            self.remember(r, ask.seq, now + REMEMBER_MS);
        }
        Ok(fills)
    }

    fn cancel(&mut self, c: &Cancel, now: u64) -> Result<Option<Side>, BookError> {
        let r = OrderRef {
            owner: c.owner,
            order_id: c.order_id,
        };
        let live = self
            .asks
            .iter()
            .find(|a| a.0.order_ref() == r)
            .map(|a| (Side::Ask, a.0.seq, a.0.expires_at.0))
            .or_else(|| {
                self.bids
                    .iter()
                    .find(|b| b.0.order_ref() == r)
                    .map(|b| (Side::Bid, b.0.seq, b.0.expires_at.0))
            });
        if let Some((_, s, _)) = live.filter(|l| c.seq <= l.1) {
            return Err(BookError::Stale {
                seq: c.seq,
                latest: s,
            });
        }
        self.asks.retain(|a| a.0.order_ref() != r);
        self.bids.retain(|b| b.0.order_ref() != r);
        let until = live
            .map_or(0, |l| l.2)
            .max(c.expires_at.0)
            .max(now + REMEMBER_MS);
        self.remember(r, c.seq, until);
        Ok(live.map(|l| l.0))
    }

    fn expire(&mut self, now: u64) {
        self.asks.retain(|a| a.0.expires_at.0 > now);
        self.bids.retain(|b| b.0.expires_at.0 > now);
        self.retired.retain(|_, v| v.1 > now);
    }

    fn state(&self) -> BookState {
        let mut a: Vec<_> = self.asks.iter().map(|a| (a.0.order_ref(), a.1)).collect();
        let mut b: Vec<_> = self.bids.iter().map(|b| (b.0.order_ref(), b.1)).collect();
        a.sort();
        b.sort();
        (a, b)
    }
}

fn engine_state(book: &OrderBook) -> BookState {
    let mut a: Vec<_> = book
        .asks()
        .into_iter()
        .map(|a| (a.ask.order_ref(), a.remaining))
        .collect();
    let mut b: Vec<_> = book
        .bids()
        .into_iter()
        .map(|b| (b.bid.order_ref(), b.remaining))
        .collect();
    a.sort();
    b.sort();
    (a, b)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(400))]

    #[test]
    fn engine_matches_model(ops in proptest::collection::vec(op(), 1..80)) {
        let mut book = OrderBook::new();
        let mut model = Model::default();
        let mut now = 1_000u64;
        // Every order version ever submitted, to check fills against.
        let mut asks_seen: HashMap<(OrderRef, u64), Ask> = HashMap::new();
        let mut bids_seen: HashMap<(OrderRef, u64), Bid> = HashMap::new();
        let mut sold: HashMap<(OrderRef, u64), u32> = HashMap::new();
        let mut bought: HashMap<(OrderRef, u64), u32> = HashMap::new();
        let mut cancelled_at: HashMap<OrderRef, u64> = HashMap::new();
        for op in &ops {
            let (ask, bid, cancel) = build(op, now);
            let fills = match (ask, bid, cancel) {
                (Some(a), _, _) => {
                    let m = model.submit_ask(a.clone(), now);
                    if m.is_ok() {
                        // A version the book accepted starts with nothing sold (an owner may
                        // reuse a seq once the book has forgotten the expired original).
                        asks_seen.insert((a.order_ref(), a.seq), a.clone());
                        sold.remove(&(a.order_ref(), a.seq));
                    }
                    let e = book.submit_ask(a, now, &rep);
                    prop_assert_eq!(&e, &m);
                    e.unwrap_or_default()
                }
                (_, Some(b), _) => {
                    let m = model.submit_bid(b.clone(), now);
                    if m.is_ok() {
                        bids_seen.insert((b.order_ref(), b.seq), b.clone());
                        bought.remove(&(b.order_ref(), b.seq));
                    }
                    let e = book.submit_bid(b, now, &rep);
                    prop_assert_eq!(&e, &m);
                    e.unwrap_or_default()
                }
                (_, _, Some(c)) => {
                    let m = model.cancel(&c, now);
                    let e = book.cancel(&c, now);
                    prop_assert_eq!(&e, &m);
                    if e.is_ok() {
                        let r = OrderRef { owner: c.owner, order_id: c.order_id };
                        let prev = cancelled_at.entry(r).or_insert(0);
                        *prev = (*prev).max(c.seq);
                    }
                    Vec::new()
                }
                _ => {
                    match op {
                        Op::Tick(dt) => now += dt,
                        _ => {
                            book.expire(now);
                            model.expire(now);
                        }
                    }
                    Vec::new()
                }
            };
            for f in &fills {
                let a = &asks_seen[&(f.ask, f.ask_seq)];
                let b = &bids_seen[&(f.bid, f.bid_seq)];
                prop_assert!(f.price >= a.price && f.price <= b.max_price, "price outside limits");
                prop_assert!(a.expires_at.0 > now && b.expires_at.0 > now, "expired order filled");
                prop_assert!(a.provider != b.buyer, "self-trade");
                prop_assert!(b.requirements.accepts(&a.gpu, &a.region));
                prop_assert!(cancelled_at.get(&f.ask).is_none_or(|s| *s < f.ask_seq), "cancelled ask filled");
                prop_assert!(cancelled_at.get(&f.bid).is_none_or(|s| *s < f.bid_seq), "cancelled bid filled");
                let s = sold.entry((f.ask, f.ask_seq)).or_default();
                *s += f.units;
                prop_assert!(*s <= a.units, "ask unit sold twice");
                let s = bought.entry((f.bid, f.bid_seq)).or_default();
                *s += f.units;
                prop_assert!(*s <= b.units, "bid overfilled");
            }
            // Price-time priority: fills of one incoming order come best price first.
            for w in fills.windows(2) {
                if w[0].bid == w[1].bid {
                    prop_assert!(w[0].price <= w[1].price);
                }
            }
            prop_assert_eq!(engine_state(&book), model.state());
        }
    }
}

fn ask(o: u8, id: u64, price: u64, units: u32, now: u64) -> Ask {
    Ask {
        provider: owner(o),
        order_id: id,
        seq: 1,
        units,
        price: Msat(price),
        gpu: gpu(2, 2, true),
        region: "eu".into(),
        max_seconds: 100,
        created_at: Timestamp(now),
        expires_at: Timestamp(now + 1_000),
    }
}

fn bid(o: u8, units: u32, max_price: u64, now: u64) -> Bid {
    Bid {
        buyer: owner(o),
        order_id: 500,
        seq: 1,
        units,
        requirements: Requirements::default(),
        max_price: Msat(max_price),
        max_seconds: 10,
        created_at: Timestamp(now),
        expires_at: Timestamp(now + 1_000),
        model: None,
    }
}

#[test]
fn partial_fills_across_asks_best_price_first() {
    let mut book = OrderBook::new();
    book.submit_ask(ask(1, 1, 30, 2, 0), 0, &NoReputation)
        .unwrap();
    book.submit_ask(ask(2, 1, 10, 1, 1), 1, &NoReputation)
        .unwrap();
    book.submit_ask(ask(3, 1, 20, 5, 2), 2, &NoReputation)
        .unwrap();
    let fills = book.submit_bid(bid(0, 4, 25, 3), 3, &NoReputation).unwrap();
    let got: Vec<(u64, u32)> = fills.iter().map(|f| (f.price.0, f.units)).collect();
    assert_eq!(got, [(10, 1), (20, 3)]);
    assert_eq!(
        book.ask(&OrderRef {
            owner: owner(3),
            order_id: 1
        })
        .unwrap()
        .remaining,
        2
    );
    assert!(
        book.ask(&OrderRef {
            owner: owner(2),
            order_id: 1
        })
        .is_none(),
        "filled ask leaves"
    );
    // The filled ask cannot come back from a late copy.
    assert!(matches!(
        book.submit_ask(ask(2, 1, 10, 1, 1), 4, &NoReputation),
        Err(BookError::Stale { .. })
    ));
}

#[test]
fn reputation_breaks_ties_only_within_the_same_millisecond() {
    let mut book = OrderBook::new();
    // Same price, same arrival ms: the higher-reputation provider wins.
    book.submit_ask(ask(1, 1, 10, 1, 5), 5, &NoReputation)
        .unwrap();
    book.submit_ask(ask(2, 1, 10, 1, 5), 5, &NoReputation)
        .unwrap();
    let high = |pk: &PublicKey| if *pk == owner(2) { 10 } else { 0 };
    let fills = book.submit_bid(bid(0, 1, 10, 6), 6, &high).unwrap();
    assert_eq!(fills[0].ask.owner, owner(2));
    // An earlier ask beats a later one whatever the reputation.
    let mut book = OrderBook::new();
    book.submit_ask(ask(1, 1, 10, 1, 5), 5, &NoReputation)
        .unwrap();
    book.submit_ask(ask(2, 1, 10, 1, 6), 6, &NoReputation)
        .unwrap();
    let fills = book.submit_bid(bid(0, 1, 10, 7), 7, &high).unwrap();
    assert_eq!(fills[0].ask.owner, owner(1));
}

#[test]
fn expiry_boundaries() {
    let mut book = OrderBook::new();
    let a = ask(1, 1, 10, 1, 0); // expires at 1000
    assert_eq!(
        book.submit_ask(a.clone(), 1_000, &NoReputation),
        Err(BookError::Expired)
    );
    book.submit_ask(a, 999, &NoReputation).unwrap();
    // At exactly expires_at the ask is dead: it neither fills nor stays.
    assert!(
        book.submit_bid(bid(0, 1, 10, 1_000), 1_000, &NoReputation)
            .unwrap()
            .is_empty()
    );
    assert_eq!(book.expire(999), vec![]);
    // The sweep drops the ask (expires 1000), not the resting bid (expires 2000).
    assert_eq!(
        book.expire(1_000),
        vec![(
            Side::Ask,
            OrderRef {
                owner: owner(1),
                order_id: 1
            }
        )]
    );
    assert_eq!(book.bid_count(), 1);
}

#[test]
fn cancel_before_order_keeps_it_out() {
    let mut book = OrderBook::new();
    let c = Cancel {
        owner: owner(1),
        order_id: 1,
        seq: 5,
        created_at: Timestamp(0),
        expires_at: Timestamp(2_000),
    };
    assert_eq!(book.cancel(&c, 0), Ok(None));
    let mut a = ask(1, 1, 10, 1, 0);
    a.seq = 4;
    assert!(matches!(
        book.submit_ask(a.clone(), 0, &NoReputation),
        Err(BookError::Stale { seq: 4, latest: 5 })
    ));
    a.seq = 6;
    assert!(
        book.submit_ask(a, 0, &NoReputation).is_ok(),
        "a newer order after the cancel is fine"
    );
}

#[test]
fn charges_round_up_and_respect_the_cap() {
    assert_eq!(
        charge_us(Msat(1_000), 1, 1_000_000, Msat(u64::MAX)),
        Msat(1_000)
    );
    assert_eq!(
        charge_us(Msat(1), 1, 1, Msat(u64::MAX)),
        Msat(1),
        "any time costs at least 1 msat"
    );
    assert_eq!(charge_us(Msat(3), 2, 500_000, Msat(u64::MAX)), Msat(3));
    assert_eq!(charge_us(Msat(7), 1, 0, Msat(u64::MAX)), Msat(0));
    assert_eq!(
        charge_us(Msat(1_000), 4, 10_000_000, Msat(30_000)),
        Msat(30_000)
    );
    // The limits: no overflow, saturating at the cap.
    assert_eq!(
        charge_us(Msat(u64::MAX), u32::MAX, u64::MAX, Msat(123)),
        Msat(123)
    );
    assert_eq!(
        charge_us(Msat(u64::MAX), 1, 1_000_000, Msat(u64::MAX)),
        Msat(u64::MAX)
    );
    assert_eq!(charge(Msat(2_000), 1_500, Msat(u64::MAX)), Msat(3_000));
    assert_eq!(charge(Msat(u64::MAX), u64::MAX, Msat(9)), Msat(9));
    assert_eq!(max_charge(Msat(10), 2, 60), Some(Msat(1_200)));
    assert_eq!(max_charge(Msat(u64::MAX), 2, 1), None);
}

#[test]
fn offers_sorted_by_price_per_gflop_and_depth_by_region() {
    let mut book = OrderBook::new();
    let mut a = ask(1, 1, 100, 2, 0);
    a.gpu.bench.matmul_mflops = 10_000_000; // 10 msat per TFLOP/s-second… cheap per flop
    book.submit_ask(a, 0, &NoReputation).unwrap();
    let mut b = ask(2, 1, 20, 3, 0);
    b.gpu.bench.matmul_mflops = 1_000_000;
    b.region = "us".into();
    book.submit_ask(b, 0, &NoReputation).unwrap();
    let by_price = book.offers(&OfferQuery::default(), 1);
    assert_eq!(
        by_price.iter().map(|o| o.ask.price.0).collect::<Vec<_>>(),
        [20, 100]
    );
    let by_flop = book.offers(
        &OfferQuery {
            sort: OfferSort::PricePerGflop,
            ..Default::default()
        },
        1,
    );
    assert_eq!(
        by_flop.iter().map(|o| o.ask.price.0).collect::<Vec<_>>(),
        [100, 20]
    );
    let q = OfferQuery {
        max_price: Some(Msat(50)),
        ..Default::default()
    };
    assert_eq!(book.offers(&q, 1).len(), 1);
    let q = OfferQuery {
        requirements: Requirements {
            regions: vec!["mars".into()],
            ..Default::default()
        },
        ..Default::default()
    };
    assert!(book.offers(&q, 1).is_empty());
    let d = book.depth(&Requirements::default(), 1);
    assert_eq!(
        d["eu"],
        RegionDepth {
            asks: 1,
            units: 2,
            best_price: Some(Msat(100))
        }
    );
    assert_eq!(
        d["us"],
        RegionDepth {
            asks: 1,
            units: 3,
            best_price: Some(Msat(20))
        }
    );
    // Candidates for a bid do not change the book.
    let c = book.candidates(&bid(0, 1, 1_000, 1), 1, &NoReputation, 10);
    assert_eq!(c.len(), 2);
    assert_eq!(book.ask_count(), 2);
}
