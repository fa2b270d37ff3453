//! `OrderBook::candidates_fair`: price always first; among equal prices, work spreads by free
//! units, the buyer's recent load, reputation and a per-buyer random tie-break.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use std::collections::HashMap;

use hashgrid_market::*;
use hashgrid_protocol::*;
use proptest::prelude::*;

const NOW: u64 = 1_000_000;

fn key(i: u8) -> PublicKey {
    Keypair::from_secret_bytes([i.wrapping_add(1); 32]).public()
}

fn gpu() -> GpuProfile {
    GpuProfile {
        name: "gpu".into(),
        vendor: 0,
        device: 0,
        backend: Backend::Vulkan,
        device_type: DeviceType::DiscreteGpu,
        driver: String::new(),
        memory_bytes: 8 << 30,
        limits: GpuLimits::default(),
        bench: Benchmark {
            matmul_mflops: 1_000_000,
            copy_mbps: 1,
        },
    }
}

fn ask(owner: u8, price: u64, units: u32) -> Ask {
    Ask {
        provider: key(owner),
        order_id: 1,
        seq: 1,
        units,
        price: Msat(price),
        gpu: gpu(),
        region: "eu".into(),
        max_seconds: 3600,
        created_at: Timestamp(NOW),
        expires_at: Timestamp(NOW + 60_000),
    }
}

fn bid(units: u32, max_price: u64) -> Bid {
    Bid {
        buyer: key(200),
        order_id: 9,
        seq: 1,
        units,
        requirements: Requirements::default(),
        max_price: Msat(max_price),
        max_seconds: 60,
        created_at: Timestamp(NOW),
        expires_at: Timestamp(NOW + 60_000),
        model: None,
    }
}

fn book(asks: &[(u8, u64, u32)]) -> OrderBook {
    let mut b = OrderBook::new();
    // Arrival order is owner order: the order an unfair book would always pick.
    for &(o, p, u) in asks {
        b.submit_ask(ask(o, p, u), NOW, &NoReputation).unwrap();
    }
    b
}

fn first(b: &OrderBook, fair: &Fairness<'_>) -> PublicKey {
    b.candidates_fair(&bid(1, 1_000), NOW, fair, 3)[0]
        .ask
        .provider
}

#[test]
fn equal_prices_are_shared_by_the_random_tie_break() {
    let b = book(&[(0, 100, 1), (1, 100, 1), (2, 100, 1)]);
    let mut wins: HashMap<PublicKey, u32> = HashMap::new();
    for seed in 0..3000 {
        let fair = Fairness {
            rep: &NoReputation,
            load: &NoLoad,
            seed,
            warm: &NoWarm,
        };
        *wins.entry(first(&b, &fair)).or_default() += 1;
    }
    assert_eq!(wins.len(), 3, "{wins:?}");
    for n in wins.values() {
        assert!(
            (800..1200).contains(n),
            "each comes first ~1000 times: {wins:?}"
        );
    }
}

#[test]
fn load_then_free_units_then_reputation_order_equal_prices() {
    let b = book(&[(0, 100, 2), (1, 100, 2), (2, 100, 2)]);
    // The buyer placed two jobs on 0 and one on 1 lately: 2 is first, then 1, then 0.
    let load = |p: &PublicKey| match p {
        p if *p == key(0) => 2,
        p if *p == key(1) => 1,
        _ => 0,
    };
    for seed in 0..50 {
        let fair = Fairness {
            rep: &NoReputation,
            load: &load,
            seed,
            warm: &NoWarm,
        };
        let order: Vec<PublicKey> = b
            .candidates_fair(&bid(1, 1_000), NOW, &fair, 3)
            .iter()
            .map(|r| r.ask.provider)
            .collect();
        assert_eq!(order, vec![key(2), key(1), key(0)]);
    }
    // More free units first: a 4-unit site takes work before a 1-unit one at the same price.
    let b = book(&[(0, 100, 1), (1, 100, 4)]);
    let fair = Fairness {
        rep: &NoReputation,
        load: &NoLoad,
        seed: 7,
        warm: &NoWarm,
    };
    assert_eq!(first(&b, &fair), key(1));
    // Equal free units and load: reputation decides.
    let b = book(&[(0, 100, 1), (1, 100, 1)]);
    let rep = |p: &PublicKey| i64::from(*p == key(0));
    for seed in 0..50 {
        let fair = Fairness {
            rep: &rep,
            load: &NoLoad,
            seed,
            warm: &NoWarm,
        };
        assert_eq!(first(&b, &fair), key(0));
    }
    // A provider in bad standing (negative reputation) comes after the others at its price,
    // however lightly loaded, but still before a dearer one.
    let b = book(&[(0, 100, 4), (1, 100, 1), (2, 101, 4)]);
    let rep = |p: &PublicKey| if *p == key(0) { -16 } else { 0 };
    let load = |p: &PublicKey| u64::from(*p == key(1)) * 3;
    for seed in 0..50 {
        let fair = Fairness {
            rep: &rep,
            load: &load,
            seed,
            warm: &NoWarm,
        };
        let order: Vec<PublicKey> = b
            .candidates_fair(&bid(1, 1_000), NOW, &fair, 3)
            .iter()
            .map(|r| r.ask.provider)
            .collect();
        assert_eq!(order, vec![key(1), key(0), key(2)]);
    }
}

#[test]
fn no_ask_at_the_best_price_is_cut_off_by_arrival_order() {
    // Ten sites at one price, a limit of 3: over many seeds every site is proposed to.
    let asks: Vec<(u8, u64, u32)> = (0..10).map(|o| (o, 100, 1)).collect();
    let b = book(&asks);
    let mut seen = std::collections::HashSet::new();
    for seed in 0..200 {
        let fair = Fairness {
            rep: &NoReputation,
            load: &NoLoad,
            seed,
            warm: &NoWarm,
        };
        for r in b.candidates_fair(&bid(1, 1_000), NOW, &fair, 3) {
            seen.insert(r.ask.provider);
        }
    }
    assert_eq!(seen.len(), 10);
}

proptest! {
    /// Whatever the load, reputation and seed: prices never decrease down the list, every ask
    /// listed can take the whole bid and is within its price, and no cheaper ask that could
    /// take it is left out while a dearer one is listed.
    #[test]
    fn price_always_comes_first(
        asks in proptest::collection::vec((0u8..12, 1u64..6, 0u32..4), 1..24),
        loads in proptest::collection::vec(0u64..5, 12),
        reps in proptest::collection::vec(-3i64..3, 12),
        units in 1u32..3,
        max_price in 1u64..6,
        limit in 1usize..6,
        seed in any::<u64>(),
    ) {
        let mut b = OrderBook::new();
        for (seq, &(o, p, u)) in asks.iter().enumerate() {
            let mut a = ask(o, p, u);
            a.seq = seq as u64 + 1;
            // A zero-unit ask is refused; a later one replaces the owner's earlier one.
            let _ = b.submit_ask(a, NOW, &NoReputation);
        }
        // The truth is what the book holds (`offers`).
        let idx = |p: &PublicKey| (0..12u8).position(|i| key(i) == *p).unwrap();
        let load = |p: &PublicKey| loads[idx(p)];
        let rep = |p: &PublicKey| reps[idx(p)];
        let fair = Fairness { rep: &rep, load: &load, seed, warm: &NoWarm };
        let got = b.candidates_fair(&bid(units, max_price), NOW, &fair, limit);
        prop_assert!(got.len() <= limit);
        for w in got.windows(2) {
            prop_assert!(w[0].ask.price <= w[1].ask.price);
        }
        for r in &got {
            prop_assert!(r.ask.price.0 <= max_price && r.remaining >= units);
        }
        if let Some(worst) = got.last() {
            let eligible_cheaper = b
                .offers(&OfferQuery { limit: 0, ..Default::default() }, NOW)
                .into_iter()
                .filter(|r| r.remaining >= units && r.ask.price < worst.ask.price)
                .count();
            let listed_cheaper = got.iter().filter(|r| r.ask.price < worst.ask.price).count();
            prop_assert_eq!(eligible_cheaper, listed_cheaper);
        } else {
            let any = b
                .offers(&OfferQuery { limit: 0, ..Default::default() }, NOW)
                .into_iter()
                .any(|r| r.remaining >= units && r.ask.price.0 <= max_price);
            prop_assert!(!any);
        }
    }
}

/// Holds all of a job's 100 MB of inputs at some providers.
struct Holds(Vec<PublicKey>);

impl Warm for Holds {
    fn held(&self, owner: &PublicKey) -> u64 {
        if self.0.contains(owner) {
            100_000_000
        } else {
            0
        }
    }
    fn total(&self) -> u64 {
        100_000_000
    }
}

#[test]
fn a_provider_holding_the_inputs_wins_within_the_warm_discount_and_loses_beyond_it() {
    let fair = |warm: &'static Holds| Fairness {
        rep: &NoReputation,
        load: &NoLoad,
        seed: 1,
        warm,
    };
    // 20% off 120 is 96 < 100: the warm provider at 120 ranks before the cold one at 100.
    static WARM_1: std::sync::LazyLock<Holds> = std::sync::LazyLock::new(|| Holds(vec![key(1)]));
    let b = book(&[(0, 100, 4), (1, 120, 4), (2, 110, 4)]);
    let order: Vec<PublicKey> = b
        .candidates_fair(&bid(1, 1_000), NOW, &fair(&WARM_1), 1)
        .into_iter()
        .map(|r| r.ask.provider)
        .collect();
    assert_eq!(
        order,
        vec![key(1)],
        "the warm ask must not be cut off at limit 1"
    );
    // 20% off 130 is 104 > 100: beyond the discount, price wins.
    let b = book(&[(0, 100, 4), (1, 130, 4)]);
    let order: Vec<PublicKey> = b
        .candidates_fair(&bid(1, 1_000), NOW, &fair(&WARM_1), 2)
        .into_iter()
        .map(|r| r.ask.provider)
        .collect();
    assert_eq!(order, vec![key(0), key(1)]);
    // Holding half the inputs is half the discount: 10% off 115 is 103.5 > 100.
    assert!(ranked_price(Msat(115), 50, 100) > ranked_price(Msat(100), 0, 100));
    assert!(ranked_price(Msat(105), 50, 100) < ranked_price(Msat(100), 0, 100));
    // Fills are not affected: the discount only ranks.
    assert_eq!(ranked_price(Msat(100), 0, 0), 100 * 10_000);
}

#[test]
fn skipped_asks_take_no_place_among_the_first_candidates() {
    let fair = Fairness {
        rep: &NoReputation,
        load: &NoLoad,
        seed: 1,
        warm: &hashgrid_market::NoWarm,
    };
    let b = book(&[(0, 100, 4), (1, 110, 4), (2, 120, 4), (3, 130, 4)]);
    let ranked = |skip: &dyn Fn(&hashgrid_protocol::Ask) -> bool| -> Vec<PublicKey> {
        b.candidates_fair_except(&bid(1, 1_000), NOW, &fair, 2, skip)
            .into_iter()
            .map(|r| r.ask.provider)
            .collect()
    };
    assert_eq!(ranked(&|_| false), vec![key(0), key(1)]);
    // The two cheapest skipped: the next two, not fewer.
    assert_eq!(
        ranked(&|a| a.provider == key(0) || a.provider == key(1)),
        vec![key(2), key(3)]
    );
    assert!(ranked(&|_| true).is_empty());
    // Without a skip it is candidates_fair.
    let plain: Vec<PublicKey> = b
        .candidates_fair(&bid(1, 1_000), NOW, &fair, 2)
        .into_iter()
        .map(|r| r.ask.provider)
        .collect();
    assert_eq!(plain, ranked(&|_| false));
}
