//! The node's tunables and limits (public constants).

use std::time::Duration;

/// Commands queued from handles to the swarm task. Handles wait for the reply, so a small
/// queue is enough; a full queue makes callers wait (back-pressure), never drops.
pub const COMMAND_QUEUE: usize = 64;

/// Events buffered per subscriber. A subscriber that falls further behind loses the oldest
/// events (it sees `RecvError::Lagged`); the node never blocks on a slow subscriber.
pub const EVENT_QUEUE: usize = 1024;

/// Default lifetime of this node's orders and capacity ad. Ten minutes: a vanished provider's
/// asks leave every book within ten minutes, and re-announcing every TTL/3 costs one message
/// per order per 200 s.
pub const DEFAULT_ORDER_TTL: Duration = Duration::from_secs(600);

/// Shortest order TTL accepted (tests use a few seconds; below 1 s the re-announcement
/// interval would approach gossip latency).
pub const MIN_ORDER_TTL: Duration = Duration::from_secs(1);

/// Default gossipsub heartbeat (mesh maintenance and gossip emission): the libp2p default.
pub const DEFAULT_HEARTBEAT: Duration = Duration::from_secs(1);

/// How often expired orders are swept from the book. One second: an expired order is gone
/// within a second of its expiry.
pub const DEFAULT_SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// A node re-announces its ad and orders this many heartbeats after it starts (besides at
/// start and every TTL/3): what a node publishes while it is in nobody's gossipsub mesh yet
/// spreads only by IHAVE/IWANT gossip, a few heartbeats per hop; re-announcing once meshes have
/// formed reaches every book in milliseconds. Two extra messages per order at start-up.
pub const EARLY_REANNOUNCE_HEARTBEATS: [u32; 2] = [2, 5];

/// Anti-entropy: besides the sync on every new connection, a node pulls the book of one
/// random connected peer this often, so a message that gossip did not deliver (published
/// before the meshes formed, or lost) arrives anyway.
pub const ANTI_ENTROPY_INTERVAL: Duration = Duration::from_secs(30);

/// During its first [`ANTI_ENTROPY_FAST_FOR`] a node pulls a random peer's book this often: a
/// network that is starting up has no gossipsub meshes yet. Cheap: entries the book already
/// holds are skipped before any signature check.
pub const ANTI_ENTROPY_FAST: Duration = Duration::from_millis(500);

/// How long the fast anti-entropy phase lasts after start.
pub const ANTI_ENTROPY_FAST_FOR: Duration = Duration::from_secs(15);

/// How often unpublished own messages are retried: right after start, gossipsub has no
/// subscribed peers yet and publishing fails with `NoPeersSubscribedToTopic`.
pub const PUBLISH_RETRY_INTERVAL: Duration = Duration::from_millis(200);

/// How often the node looks up a random key in the DHT to discover more peers.
pub const DEFAULT_KAD_WALK_INTERVAL: Duration = Duration::from_secs(30);

/// A message learnt by sync is gossiped on by the node that learnt it when it was signed at
/// most this long ago: a site that just joined is known quickly everywhere, old orders are
/// left to anti-entropy.
pub const RELAY_FRESH: Duration = Duration::from_secs(5);

/// How many peers a node keeps connected by dialling sites from their capacity ads (the way a
/// Bitcoin node keeps eight outbound connections from the addresses it has heard of): enough
/// for gossipsub's mesh (6) and a spare, few enough that a network starting together does not
/// connect every pair of nodes. Inbound connections are not limited by it.
pub const DEFAULT_TARGET_PEERS: usize = 8;

/// Start of the error of a request whose peer could not be dialled. A dial also fails at once
/// when another dial to the same peer is in flight, or while a restarted peer's new address is
/// still on its way: job requests to an agreed provider are tried again [`DIAL_RETRIES`] times,
/// after [`DIAL_RETRY_AFTER`] and twice that; a buyer tries an unreachable provider's ask again
/// (as often, as late) only once no other ask is left.
pub(crate) const UNREACHABLE: &str = "cannot reach the peer: ";

/// How often a request whose dial failed is tried again.
pub const DIAL_RETRIES: u32 = 2;

/// The first wait before trying a request whose dial failed again.
pub const DIAL_RETRY_AFTER: Duration = Duration::from_millis(300);

/// How long `start` waits for its listeners to report an address.
pub const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Most live orders of its own one node may hold (each is re-announced every TTL/3).
pub const MAX_OWN_ORDERS: usize = 256;

/// Most messages waiting for a retry of a failed publish (newest kept).
pub const MAX_UNPUBLISHED: usize = 2 * MAX_OWN_ORDERS + 1;

/// Most known peers dialled at start from the store.
pub const MAX_KNOWN_PEER_DIALS: usize = 16;

/// How often a provider checks whether its input cache's warm list (blobs, models held)
/// changed, and re-announces its capacity ad if it did.
pub(super) const WARM_ANNOUNCE_EVERY: Duration = Duration::from_secs(5);

/// Messages from job tasks waiting for the node's task.
pub const INTERNAL_QUEUE: usize = 256;
