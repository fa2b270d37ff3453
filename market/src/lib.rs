//! # hashgrid-market
//!
//! The pure, deterministic heart of the exchange: the order book and matching engine
//! ([`book`]), charges ([`charge`](mod@charge)) and settlement bookkeeping ([`settlement`]). No tokio, no
//! network, no clock of its own: time is passed in.
//!
//! ```
//! use hashgrid_market::{NoReputation, OrderBook};
//! use hashgrid_protocol::*;
//!
//! let provider = Keypair::from_secret_bytes([1; 32]).public();
//! let buyer = Keypair::from_secret_bytes([2; 32]).public();
//! let gpu = GpuProfile {
//!     name: "H100".into(), vendor: 0x10de, device: 0x2330, backend: Backend::Vulkan,
//!     device_type: DeviceType::DiscreteGpu, driver: String::new(), memory_bytes: 80 << 30,
//!     limits: GpuLimits::default(), bench: Benchmark { matmul_mflops: 50_000_000, copy_mbps: 2_000_000 },
//! };
//! let now = 1_000;
//! let mut book = OrderBook::new();
//! let ask = Ask { provider, order_id: 1, seq: 1, units: 4, price: Msat(40), gpu,
//!     region: "us-east".into(), max_seconds: 3600, created_at: Timestamp(now),
//!     expires_at: Timestamp(now + 60_000) };
//! assert!(book.submit_ask(ask, now, &NoReputation).unwrap().is_empty());
//! let bid = Bid { buyer, order_id: 7, seq: 1, units: 1,
//!     requirements: Requirements { min_memory_bytes: 40 << 30, ..Default::default() },
//!     max_price: Msat(50), max_seconds: 60, created_at: Timestamp(now),
//!     expires_at: Timestamp(now + 60_000), model: None };
//! let fills = book.submit_bid(bid, now, &NoReputation).unwrap();
//! assert_eq!((fills[0].units, fills[0].price), (1, Msat(40)));
//! assert_eq!(book.ask(&fills[0].ask).unwrap().remaining, 3);
//! ```
//!
//! ## Matching and fairness
//!
//! Crossing orders inside the book ([`OrderBook::submit_bid`], [`OrderBook::submit_ask`]) is
//! price-time priority with reputation between orders of the same price and time, as in an
//! exchange. A buyer that proposes directly to providers ranks asks with
//! [`OrderBook::candidates_fair`] instead: price first, always; among asks at the same price,
//! providers in bad standing (negative reputation) last, and among the others most free units (the ask's remaining units minus the buyer's recent load there), then the
//! least recent load ([`Load`]: jobs it placed there lately), then reputation, then a random
//! tie-break seeded per buyer and per job ([`tie_break`]). Without it a book that orders equal
//! asks by arrival sends every job to one site of a company's forty at one price.

pub mod book;
pub mod charge;
pub mod gossip;
pub mod settlement;

pub use book::{
    BookError, Fairness, Fill, Limits, Load, NoLoad, NoReputation, NoWarm, OfferQuery, OfferSort,
    OrderBook, RegionDepth, Reputation, RestingAsk, RestingBid, Side, WARM_DISCOUNT_BP, Warm,
    ranked_price, tie_break,
};
pub use charge::{charge, charge_us, max_charge};
pub use gossip::{BookChange, BookReject, BookSnapshot, GossipBook, OrderKind, RemoveReason};
