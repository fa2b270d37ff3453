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
//!     expires_at: Timestamp(now + 60_000) };
//! let fills = book.submit_bid(bid, now, &NoReputation).unwrap();
//! assert_eq!((fills[0].units, fills[0].price), (1, Msat(40)));
//! assert_eq!(book.ask(&fills[0].ask).unwrap().remaining, 3);
//! ```

pub mod book;
pub mod charge;
pub mod settlement;

pub use book::{
    BookError, Fill, NoReputation, OfferQuery, OfferSort, OrderBook, RegionDepth, Reputation,
    RestingAsk, RestingBid, Side,
};
pub use charge::{charge, charge_us, max_charge};
