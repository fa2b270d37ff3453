//! # hashgrid-node
//!
//! The node library that the `hashgrid-node` site daemon and the `hashgrid` buyer CLI are thin
//! wrappers around: a libp2p node ([`Node::builder`] → [`NodeHandle`]) that gossips signed,
//! expiring capacity ads and orders, validates everything it hears, and keeps one standing
//! order book from it; a sled store for its own orders and known peers; and the site config
//! with its declarative pricing policy.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use hashgrid_node::Node;
//! let dir = tempfile::tempdir()?;
//! let node = Node::builder()
//!     .network(hashgrid_protocol::Network::test())
//!     .data_dir(dir.path())
//!     .listen("/ip4/127.0.0.1/tcp/0".parse()?)
//!     .mdns(false)
//!     .start()
//!     .await?;
//! let book = node.market().book().await?;
//! assert!(book.asks.is_empty());
//! node.shutdown().await;
//! # Ok(()) }
//! ```
//!
//! An application that must not miss what the node earned, paid or finished reads the durable
//! events ([`DurableEvent`]) and acknowledges each once it has handled it; an event not yet
//! acknowledged is there again after a restart:
//!
//! ```no_run
//! # async fn demo(node: hashgrid_node::NodeHandle) -> Result<(), hashgrid_node::NodeError> {
//! use hashgrid_node::DurableEvent;
//! loop {
//!     let (id, event) = node.durable().wait_next().await?;
//!     match event {
//!         DurableEvent::ReceiptCountersigned { receipt, .. } => println!("owed for {receipt}"),
//!         DurableEvent::InvoiceSettled { invoice } => println!("paid: {invoice}"),
//!         other => println!("{other:?}"),
//!     }
//!     node.durable().handled(id)?;
//! }
//! # }
//! ```
//!
//! The data-dir layout keeps the identity stable across restarts:
//!
//! ```
//! let dir = tempfile::tempdir().unwrap();
//! let paths = hashgrid_node::DataDir::new(dir.path());
//! let key = paths.load_or_create_identity().unwrap();
//! assert_eq!(paths.load_or_create_identity().unwrap().peer_id(), key.peer_id());
//! ```

pub mod client;
pub mod config;
pub mod datadir;
pub mod error;
pub mod event;
pub mod gateway;
pub use hashgrid_executor as executor;
pub mod jobs;
pub mod network;
pub mod node;
pub mod ops;
pub mod settle;
pub mod site;
pub mod store;
pub mod wallet;

pub use datadir::DataDir;
pub use error::{NodeError, StartError};
pub use event::{DurableEvent, NodeEvent};
pub use executor::{ExecConfig, ExecError, Executor, JobOutput};
pub use hashgrid_market::{BookSnapshot, OrderKind, RemoveReason};
pub use hashgrid_market::{OfferQuery, OfferSort};
pub use jobs::{
    FailKind, JobOptions, JobRecord, JobResult, JobState, JobStream, JobUpdate, ProviderEvent,
    Submission,
};
pub use libp2p::{Multiaddr, PeerId};
#[cfg(feature = "testing")]
pub use node::RawTopic;
pub use node::{
    AskSpec, BidSpec, DurableHandle, JobsHandle, MarketHandle, Node, NodeBuilder, NodeHandle,
    OpsHandle, PeersHandle, ProviderHandle, SettlementHandle,
};
pub use settle::{
    InInvoice, LightningSettle, Onchain, OutInvoice, PayState, Position, SettleMode,
    SettlementConfig,
};
pub use store::OwnOrder;
