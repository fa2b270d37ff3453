//! Order book benchmark: a mixed stream of adds, cancels and matches at 10k and 100k resting
//! orders; operations per second and match latency percentiles.
//!
//! `cargo bench -p hashgrid-market --bench book [-- --json] [--ops N] [--runs N] [--breakdown]
//! [--whole-stream]`

use std::time::Instant;

use hashgrid_market::{NoReputation, OrderBook};
use hashgrid_protocol::*;

/// The allocator the node binaries use (jemalloc; docs/PERFORMANCE.md "Market": the order
/// book runs ~1.2× faster on it than on glibc's malloc).
#[cfg(not(hashgrid_system_alloc))]
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// splitmix64: a tiny deterministic PRNG, so every run replays the same workload.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

const REGIONS: [&str; 8] = [
    "us-east",
    "us-west",
    "eu-north",
    "eu-west",
    "asia-east",
    "asia-south",
    "latam",
    "africa",
];
const MEMORY: [u64; 4] = [16 << 30, 24 << 30, 48 << 30, 80 << 30];
const MFLOPS: [u64; 4] = [5_000_000, 20_000_000, 60_000_000, 200_000_000];
const TTL: u64 = 3_600_000;

enum Op {
    Ask(Ask),
    Cancel(Cancel),
    Bid(Bid),
}

struct Workload {
    providers: Vec<PublicKey>,
    buyers: Vec<PublicKey>,
    rng: Rng,
    next_id: u64,
    live: Vec<OrderRef>,
}

impl Workload {
    fn new(seed: u64) -> Workload {
        Workload {
            providers: (0..2000u32).map(|i| key(i, 1)).collect(),
            buyers: (0..500u32).map(|i| key(i, 2)).collect(),
            rng: Rng(seed),
            next_id: 0,
            live: Vec::new(),
        }
    }

    fn ask(&mut self, now: u64) -> Ask {
        let r = &mut self.rng;
        let tier = r.below(4) as usize;
        let provider = self.providers[r.below(self.providers.len() as u64) as usize];
        self.next_id += 1;
        let ask = Ask {
            provider,
            order_id: self.next_id,
            seq: 1,
            units: 1 + r.below(8) as u32,
            // Price grows with the tier, with noise: 10..~200 msat per GPU-second.
            price: Msat(10 + 40 * tier as u64 + r.below(60)),
            gpu: GpuProfile {
                name: ["RTX 4090", "L40S", "A100", "H100"][tier].into(),
                vendor: 0x10de,
                device: tier as u32,
                backend: if r.below(10) < 8 {
                    Backend::Vulkan
                } else {
                    Backend::Dx12
                },
                device_type: DeviceType::DiscreteGpu,
                driver: String::new(),
                memory_bytes: MEMORY[tier],
                limits: GpuLimits::default(),
                bench: Benchmark {
                    matmul_mflops: MFLOPS[tier] + r.below(1_000_000),
                    copy_mbps: 1_000_000,
                },
            },
            region: REGIONS[r.below(8) as usize].into(),
            max_seconds: 3600,
            created_at: Timestamp(now),
            expires_at: Timestamp(now + TTL),
        };
        self.live.push(ask.order_ref());
        ask
    }

    fn cancel(&mut self, now: u64) -> Option<Cancel> {
        if self.live.is_empty() {
            return None;
        }
        let i = self.rng.below(self.live.len() as u64) as usize;
        let r = self.live.swap_remove(i);
        Some(Cancel {
            owner: r.owner,
            order_id: r.order_id,
            seq: 2,
            created_at: Timestamp(now),
            expires_at: Timestamp(now + TTL),
        })
    }

    fn bid(&mut self, now: u64) -> Bid {
        let r = &mut self.rng;
        let buyer = self.buyers[r.below(self.buyers.len() as u64) as usize];
        self.next_id += 1;
        // A realistic mix: half the bids name one or two regions, a third a backend, most a
        // memory or throughput floor.
        let regions = match r.below(4) {
            0 | 1 => Vec::new(),
            2 => vec![REGIONS[r.below(8) as usize].to_string()],
            _ => vec![
                REGIONS[r.below(8) as usize].to_string(),
                REGIONS[r.below(8) as usize].to_string(),
            ],
        };
        let backends = if r.below(3) == 0 {
            vec![Backend::Vulkan]
        } else {
            Vec::new()
        };
        let tier = r.below(4) as usize;
        Bid {
            buyer,
            order_id: self.next_id,
            seq: 1,
            units: 1 + r.below(3) as u32,
            requirements: Requirements {
                min_memory_bytes: if r.below(2) == 0 { MEMORY[tier] } else { 0 },
                min_mflops: if r.below(2) == 0 {
                    MFLOPS[r.below(4) as usize]
                } else {
                    0
                },
                regions,
                backends,
            },
            max_price: Msat(40 + 45 * tier as u64 + r.below(40)),
            max_seconds: 60,
            created_at: Timestamp(now),
            // Short-lived: what a buyer cannot fill now expires (its node re-posts or moves on)
            // instead of piling up. 200 ms here is 20,000 operations of the stream.
            expires_at: Timestamp(now + 200),
            model: None,
        }
    }
}

fn key(i: u32, kind: u8) -> PublicKey {
    // Distinct keys without deriving real ed25519 keys (the book never verifies signatures).
    let mut b = [kind; 32];
    b[..4].copy_from_slice(&i.to_le_bytes());
    PublicKey(b)
}

struct RunResult {
    ops_per_sec: f64,
    match_p50_ns: u64,
    match_p99_ns: u64,
    fills: usize,
    final_orders: usize,
}

/// Operations built and then timed together (a few hundred KiB of them: they are in the cache
/// when the book takes them, as a node's freshly received messages are).
const CHUNK: usize = 1024;

fn run(resting: usize, ops: usize, seed: u64, breakdown: bool, whole: bool) -> RunResult {
    let mut w = Workload::new(seed);
    let mut book = OrderBook::new();
    let mut now = 1_000_000u64;
    for i in 0..resting {
        // Orders reach a node over time (gossip), a few per millisecond.
        if i % 10 == 0 {
            now += 1;
        }
        let a = w.ask(now);
        book.submit_ask(a, now, &NoReputation)
            .expect("fill the book");
    }
    // The stream is built ahead of the clock, so that only the book is timed: a chunk of
    // `CHUNK` operations at a time (with `whole`, all of them first, as before 2026-12-04:
    // 300,000 operations are ~90 MB, and taking each from memory was timed too). The same
    // operations either way. Adds and cancels balance, so the book stays near `resting`
    // orders while matches consume units.
    let mut lat = Vec::with_capacity(ops / 3);
    let mut fills = 0usize;
    // Time spent in adds, cancels and expiry (bids are `lat`), when asked for.
    let mut spent = [0u64; 3];
    let mut clock = |t: Option<Instant>, i: usize| {
        spent[i] += t.map_or(0, |t| t.elapsed().as_nanos() as u64);
    };
    let mut secs = 0.0;
    let mut done = 0;
    while done < ops {
        let n = if whole { ops } else { CHUNK.min(ops - done) };
        let mut stream = Vec::with_capacity(n);
        for i in done..done + n {
            if i % 100 == 0 {
                now += 1;
            }
            match w.rng.below(10) {
                0..=3 => stream.push((now, Op::Ask(w.ask(now)))),
                4..=6 => match w.cancel(now) {
                    Some(c) => stream.push((now, Op::Cancel(c))),
                    None => stream.push((now, Op::Ask(w.ask(now)))),
                },
                _ => stream.push((now, Op::Bid(w.bid(now)))),
            }
        }
        let start = Instant::now();
        for (j, (now, op)) in stream.into_iter().enumerate() {
            let i = done + j;
            match op {
                Op::Ask(a) => {
                    let t = breakdown.then(Instant::now);
                    fills += book
                        .submit_ask(a, now, &NoReputation)
                        .map_or(0, |f| f.len());
                    clock(t, 0);
                }
                Op::Cancel(c) => {
                    let t = breakdown.then(Instant::now);
                    let _ = book.cancel(&c, now);
                    clock(t, 1);
                }
                Op::Bid(b) => {
                    let t = Instant::now();
                    fills += book
                        .submit_bid(b, now, &NoReputation)
                        .map_or(0, |f| f.len());
                    lat.push(t.elapsed().as_nanos() as u64);
                }
            }
            if i % 1_000 == 0 {
                let t = breakdown.then(Instant::now);
                book.expire(now);
                clock(t, 2);
            }
        }
        secs += start.elapsed().as_secs_f64();
        done += n;
    }
    if breakdown {
        let ms = |ns: u64| ns as f64 / 1e6;
        eprintln!(
            "  {resting} resting: {:.0} ms timed; adds {:.0} ms, cancels {:.0} ms, bids {:.0} ms, expiry {:.0} ms",
            secs * 1e3,
            ms(spent[0]),
            ms(spent[1]),
            ms(lat.iter().sum()),
            ms(spent[2]),
        );
    }
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p) as usize];
    RunResult {
        ops_per_sec: ops as f64 / secs,
        match_p50_ns: pct(0.50),
        match_p99_ns: pct(0.99),
        fills,
        final_orders: book.ask_count() + book.bid_count(),
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let json = args.iter().any(|a| a == "--json");
    // Time each kind of operation (adds two clock reads to each, so the total grows a little).
    let breakdown = args.iter().any(|a| a == "--breakdown");
    // Build the whole stream before the clock starts (the harness before 2026-12-04).
    let whole = args.iter().any(|a| a == "--whole-stream");
    let arg = |name: &str, default: usize| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let ops = arg("--ops", 300_000);
    let runs = arg("--runs", 5);
    let mut rows = Vec::new();
    for resting in [10_000usize, 100_000] {
        let results: Vec<RunResult> = (0..runs)
            .map(|i| run(resting, ops, 42 + i as u64, breakdown, whole))
            .collect();
        let row = (
            resting,
            median(results.iter().map(|r| r.ops_per_sec).collect()),
            median(results.iter().map(|r| r.match_p50_ns as f64).collect()),
            median(results.iter().map(|r| r.match_p99_ns as f64).collect()),
            results[0].fills,
            results[0].final_orders,
        );
        rows.push(row);
    }
    if json {
        let items: Vec<String> = rows
            .iter()
            .map(|(n, ops_s, p50, p99, fills, fin)| {
                format!(
                    "{{\"resting_orders\":{n},\"mixed_ops_per_sec\":{ops_s:.0},\"match_p50_us\":{:.3},\"match_p99_us\":{:.3},\"fills_per_run\":{fills},\"orders_at_end\":{fin}}}",
                    p50 / 1000.0,
                    p99 / 1000.0
                )
            })
            .collect();
        println!(
            "{{\"bench\":\"market/book\",\"ops_per_run\":{ops},\"runs\":{runs},\"stream\":\"{}\",\"statistic\":\"median of runs\",\"results\":[{}]}}",
            if whole { "whole" } else { "chunks of 1024" },
            items.join(",")
        );
    } else {
        println!(
            "order book: mixed stream 40% add / 30% cancel / 30% match, {ops} ops x {runs} runs (medians)"
        );
        println!(
            "{:>10} {:>16} {:>14} {:>14} {:>10}",
            "resting", "mixed ops/s", "match p50 µs", "match p99 µs", "fills"
        );
        for (n, ops_s, p50, p99, fills, _) in &rows {
            println!(
                "{n:>10} {ops_s:>16.0} {:>14.2} {:>14.2} {fills:>10}",
                p50 / 1000.0,
                p99 / 1000.0
            );
        }
    }
}
