//! A node with a large book: N live asks (signed, from gossip) in a node's standing book, and the
//! matching step a buyer's job runs on it (rank the asks for one bid, skipping providers it
//! already tried), against the step as it was before the standing book: a market book rebuilt
//! from every live ask for each job. Also the book's memory per 10k asks.
//!
//! `cargo bench -p hashgrid-tests --bench bigbook -- [--asks N] [--queries Q] [--json]`

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use hashgrid_market::{Fairness, GossipBook, NoLoad, NoReputation, NoWarm, OrderBook};
use hashgrid_protocol::{
    Ask, Backend, Bid, Keypair, Msat, Network, PublicKey, Requirements, Signed, Timestamp,
};

/// The allocator the node binaries use (jemalloc), so time and memory are the node's.
#[cfg(not(hashgrid_system_alloc))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

const REGIONS: [&str; 8] = [
    "us-east",
    "us-west",
    "eu-west",
    "eu-central",
    "ap-south",
    "ap-east",
    "sa-east",
    "af-south",
];
const MEMORY_GIB: [u64; 4] = [16, 24, 48, 80];
/// Asks per provider key (one site offers a few GPU classes).
const ASKS_PER_PROVIDER: u64 = 4;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

fn micros(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

struct Args {
    asks: usize,
    queries: usize,
    json: bool,
}

fn args() -> anyhow::Result<Args> {
    let mut a = Args {
        asks: 100_000,
        queries: 2_000,
        json: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(arg) = it.next() {
        match arg.as_str() {
            "--asks" => a.asks = it.next().context("--asks N")?.parse()?,
            "--queries" => a.queries = it.next().context("--queries Q")?.parse()?,
            "--json" => a.json = true,
            "--bench" => {}
            other => bail!("unknown argument {other}"),
        }
    }
    Ok(a)
}

fn main() -> anyhow::Result<()> {
    let a = args()?;
    let net = Network::new("bigbook")?;
    let mut rng = Rng(42);
    let now = Timestamp::now();
    let providers = (a.asks as u64).div_ceil(ASKS_PER_PROVIDER);
    let keys: Vec<Keypair> = (0..providers)
        .map(|i| {
            let mut secret = [7u8; 32];
            secret[..8].copy_from_slice(&i.to_le_bytes());
            Keypair::from_secret_bytes(secret)
        })
        .collect();
    // Sign everything first: the book is measured holding what gossip delivers.
    let mut signed: Vec<(Signed<Ask>, Ask)> = Vec::with_capacity(a.asks);
    for n in 0..a.asks as u64 {
        let key = &keys[(n / ASKS_PER_PROVIDER) as usize];
        let tier = rng.below(4) as usize;
        let mut gpu = hashgrid_tests::gpu("bench-gpu");
        gpu.memory_bytes = MEMORY_GIB[tier] << 30;
        gpu.backend = if rng.below(4) == 0 {
            Backend::Metal
        } else {
            Backend::Vulkan
        };
        let ask = Ask {
            provider: key.public(),
            order_id: n % ASKS_PER_PROVIDER + 1,
            seq: 1,
            units: 1 + rng.below(8) as u32,
            price: Msat(40 + 45 * tier as u64 + rng.below(40)),
            gpu,
            region: REGIONS[rng.below(REGIONS.len() as u64) as usize].into(),
            max_seconds: 3600,
            created_at: now,
            expires_at: now.plus_ms(3_600_000),
        };
        signed.push((Signed::sign(key, &net, &ask), ask));
    }
    let before = rss_bytes();
    let mut book = GossipBook::new();
    let t = Instant::now();
    for (s, ask) in signed {
        book.insert_ask(s, ask, now)
            .map_err(|e| anyhow::anyhow!("insert: {e:?}"))?;
    }
    let insert = t.elapsed();
    let rss_per_10k = rss_bytes().saturating_sub(before) as f64 / (a.asks as f64 / 10_000.0);

    // The buyer's bids: a memory floor or none, a region or none; two providers skipped.
    let buyer = Keypair::from_secret_bytes([9; 32]).public();
    let bid = |rng: &mut Rng| {
        let mut req = Requirements::default();
        if rng.below(2) == 0 {
            req.min_memory_bytes = MEMORY_GIB[rng.below(4) as usize] << 30;
        }
        if rng.below(2) == 0 {
            req.regions = vec![REGIONS[rng.below(REGIONS.len() as u64) as usize].into()];
        }
        Bid {
            buyer,
            order_id: 1,
            seq: 1,
            units: 1,
            requirements: req,
            max_price: Msat(u64::MAX),
            max_seconds: 60,
            created_at: now,
            expires_at: now.plus_ms(60_000),
            model: None,
        }
    };
    let fair = Fairness {
        rep: &NoReputation,
        load: &NoLoad,
        seed: 7,
        warm: &NoWarm,
    };
    let skipped: Vec<PublicKey> = (0..2)
        .map(|_| keys[rng.below(providers) as usize].public())
        .collect();
    let skip = |x: &Ask| skipped.contains(&x.provider);
    let at = Timestamp::now().0;

    // Now: the standing engine.
    let mut standing = Vec::with_capacity(a.queries);
    let mut found = 0usize;
    for _ in 0..a.queries {
        let b = bid(&mut rng);
        let t = Instant::now();
        let c = book
            .orders()
            .candidates_fair_except(&b, at, &fair, 8, &skip);
        standing.push(t.elapsed());
        found += c.len();
    }
    standing.sort();

    // Before: a market book rebuilt from every live ask (less the skipped) for each job.
    let rebuild_queries = (a.queries / 100).clamp(5, 20);
    let asks = book.snapshot().asks;
    let mut rebuilt = Vec::with_capacity(rebuild_queries);
    for _ in 0..rebuild_queries {
        let b = bid(&mut rng);
        let t = Instant::now();
        let mut ob = OrderBook::new();
        for x in asks.iter().filter(|x| !skip(x)) {
            let _ = ob.submit_ask(x.clone(), at, &NoReputation);
        }
        let c = ob.candidates_fair(&b, at, &fair, 8);
        rebuilt.push(t.elapsed());
        std::hint::black_box(c);
    }
    rebuilt.sort();

    let report = serde_json::json!({
        "asks": a.asks,
        "providers": providers,
        "insert_us_per_ask": micros(insert) / a.asks as f64,
        "rss_bytes_per_10k_asks": rss_per_10k,
        "standing": {
            "queries": a.queries,
            "p50_us": micros(percentile(&standing, 0.5)),
            "p99_us": micros(percentile(&standing, 0.99)),
            "max_us": micros(standing.last().copied().unwrap_or_default()),
            "candidates_per_query": found as f64 / a.queries as f64,
        },
        "rebuilt_per_job": {
            "queries": rebuild_queries,
            "p50_us": micros(percentile(&rebuilt, 0.5)),
            "p99_us": micros(percentile(&rebuilt, 0.99)),
        },
    });
    if a.json {
        println!("{report}");
    } else {
        println!(
            "{} asks from {} providers: inserted at {:.1} µs each; the book holds {:.1} MiB per 10k asks",
            a.asks,
            providers,
            micros(insert) / a.asks as f64,
            rss_per_10k / (1 << 20) as f64
        );
        println!(
            "matching step, standing book: p50 {:.1} µs, p99 {:.1} µs, max {:.1} µs ({} queries, {:.1} candidates each)",
            micros(percentile(&standing, 0.5)),
            micros(percentile(&standing, 0.99)),
            micros(standing.last().copied().unwrap_or_default()),
            a.queries,
            found as f64 / a.queries as f64
        );
        println!(
            "matching step, book rebuilt per job (before): p50 {:.0} µs, p99 {:.0} µs ({} queries)",
            micros(percentile(&rebuilt, 0.5)),
            micros(percentile(&rebuilt, 0.99)),
            rebuild_queries
        );
    }
    Ok(())
}
