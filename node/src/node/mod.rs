//! [`Node`], [`NodeBuilder`] and [`NodeHandle`]: one task owns the libp2p `Swarm` and runs a
//! `select!` loop over swarm events, commands from handles, and timers (re-announcement,
//! expiry sweep, publish retry, Kademlia random walk). Handles are cheap clones that send
//! `Command { .., reply: oneshot::Sender }` over a bounded channel.
//!
//! # Book sync for late joiners
//! Two mechanisms, both documented in docs/ARCHITECTURE.md:
//! - **Direct sync**: on the first connection to a peer, the node sends it a
//!   `/hashgrid/sync/1` request and folds the answer (the exact signed messages the peer holds,
//!   each re-verified like gossip) into its book. A late joiner has the whole book as soon as
//!   its first connection is up (milliseconds on a LAN).
//! - **Re-announcement**: every node re-signs and re-publishes its own live orders and its
//!   capacity ad every `order_ttl / 3` with a fresh sequence number and expiry, so orders
//!   survive lost messages and expire a TTL after their owner vanished; and twice early on
//!   ([`EARLY_REANNOUNCE_HEARTBEATS`]), once the gossipsub meshes have formed.
//!
//! # Shutdown order
//! [`NodeHandle::shutdown`] (or dropping the last handle):
//! 1. stop accepting commands: the command channel is closed and queued commands are answered
//!    with [`NodeError::Stopped`](crate::error::NodeError::Stopped);
//! 2. publish nothing more: the loop exits, so no timer fires again;
//! 3. flush the store;
//! 4. close the swarm: dropping it closes every listener and connection;
//! 5. answer the shutdown call. Nothing else runs in the background: the swarm task was the
//!    only task.

mod addr;
mod builder;
pub(crate) mod command;
mod commands;
mod gossip;
mod handle;
mod lag;
mod run;
pub(crate) mod settings;
mod start;
mod state;
mod swarm;

pub use builder::{Node, NodeBuilder};
#[cfg(feature = "testing")]
pub use command::RawTopic;
pub use command::{AskSpec, BidSpec, KnownPeer, NodeStats};
#[cfg(feature = "testing")]
pub use handle::TestingHandle;
pub use handle::{
    DurableHandle, JobsHandle, MarketHandle, NodeHandle, OpsHandle, PeersHandle, ProviderHandle,
    SettlementHandle,
};
pub use lag::{LAG_PROBE_EVERY, LagSnapshot, LoopLag};
pub use settings::*;
pub use state::{REDIAL_FIRST, REDIAL_MAX};
