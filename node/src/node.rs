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
//!    with [`NodeError::Stopped`];
//! 2. publish nothing more: the loop exits, so no timer fires again;
//! 3. flush the store;
//! 4. close the swarm: dropping it closes every listener and connection;
//! 5. answer the shutdown call. Nothing else runs in the background: the swarm task was the
//!    only task.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use hashgrid_protocol::{
    Ask, Bid, Cancel, CapacityAd, GossipMessage, GpuProfile, Keypair, Msat, Network, OrderRef,
    PublicKey, Requirements, SettlementMethod, Signed, Timestamp, VerifiedGossip,
};
use libp2p::gossipsub::{self, IdentTopic, MessageAcceptance, TopicHash};
use libp2p::multiaddr::Protocol;
use libp2p::request_response;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, PeerId, Swarm, identify, kad, mdns, noise, tcp, yamux};
use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{Instrument, debug, info, info_span, warn};

use crate::DataDir;
use crate::book::{Book, BookChange, BookReject, BookSnapshot, RemoveReason};
use crate::error::{NodeError, StartError};
use crate::event::NodeEvent;
use crate::executor::Executor;
use crate::jobs::buyer::{BuyerCtx, BuyerJob, Candidate};
use crate::jobs::provider::{Answer, Internal, Provider, chunk_of};
use crate::jobs::{JobOptions, JobRecord, JobResult, JobState, Submission};
use crate::network::validate::{TopicKind, Validator, Verdict};
use crate::network::{
    Behaviour, BehaviourEvent, BehaviourSettings, HEARTBEAT_INITIAL_DELAY, MAX_SYNC_MESSAGES,
    SyncRequest, SyncResponse, peer_score_params,
};
use crate::settle::{InInvoice, OutInvoice, Position, Settlement, SettlementConfig};
use crate::store::{JobTree, OwnOrder, Store, StoreError, StoreSlot};
use hashgrid_protocol::ContentId;
use hashgrid_protocol::exchange::{
    BlobReply, BlobRequest, JobMessage, JobReply, NegotiateReply, Propose, SettleReply,
    SettleRequest,
};

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

/// Start of the error of a request whose peer could not be dialled. A dial also fails at once
/// when another dial to the same peer is in flight, or while a restarted peer's new address is
/// still on its way: negotiation and job requests try again [`DIAL_RETRIES`] times, after
/// [`DIAL_RETRY_AFTER`] and twice that, before the provider counts as unreachable.
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

/// Entry point of the node library.
///
/// ```no_run
/// # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
/// use hashgrid_node::Node;
/// let node = Node::builder()
///     .network(hashgrid_protocol::Network::test())
///     .listen("/ip4/0.0.0.0/tcp/4001".parse()?)
///     .start()
///     .await?;
/// println!("{:?}", node.listen_addrs().await?);
/// node.shutdown().await;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct Node;

impl Node {
    /// A builder with the defaults (network `main`, no data dir: a fresh in-memory identity
    /// and store, no listen addresses, mDNS on).
    pub fn builder() -> NodeBuilder {
        NodeBuilder::default()
    }
}

/// What a provider sells in one ask (the node fills in its key, order id, sequence number,
/// region and lifetime).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AskSpec {
    /// The GPU offered.
    pub gpu: GpuProfile,
    /// Units offered.
    pub units: u32,
    /// Msat per GPU-second.
    pub price: Msat,
    /// Longest job accepted, in seconds.
    pub max_seconds: u32,
}

/// What a buyer wants in one bid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BidSpec {
    /// Units wanted.
    pub units: u32,
    /// Requirements on the GPU.
    pub requirements: Requirements,
    /// Highest msat per GPU-second.
    pub max_price: Msat,
    /// Longest run, in seconds.
    pub max_seconds: u32,
}

/// Configures and starts a node. Every setting has a documented default.
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    network: Network,
    data_dir: Option<PathBuf>,
    input_cache: (u64, u64),
    preload: Vec<(ContentId, Vec<u8>)>,
    keypair: Option<Keypair>,
    listen: Vec<Multiaddr>,
    bootstrap: Vec<Multiaddr>,
    region: String,
    mdns: bool,
    gpus: Vec<GpuProfile>,
    units: u32,
    settlement: Vec<SettlementMethod>,
    order_ttl: Duration,
    heartbeat: Duration,
    sweep_interval: Duration,
    kad_walk_interval: Duration,
    executor: Option<Executor>,
    down_for: Duration,
    settle: SettlementConfig,
    #[cfg(feature = "testing")]
    lie: Option<crate::jobs::Lie>,
}

impl Default for NodeBuilder {
    fn default() -> Self {
        NodeBuilder {
            network: Network::main(),
            data_dir: None,
            input_cache: (
                crate::jobs::cache::DEFAULT_DISK_BYTES,
                crate::jobs::cache::DEFAULT_MEMORY_BYTES,
            ),
            preload: Vec::new(),
            keypair: None,
            listen: Vec::new(),
            bootstrap: Vec::new(),
            region: "unknown".into(),
            mdns: true,
            gpus: Vec::new(),
            units: 1,
            settlement: vec![SettlementMethod::Ledger],
            order_ttl: DEFAULT_ORDER_TTL,
            heartbeat: DEFAULT_HEARTBEAT,
            sweep_interval: DEFAULT_SWEEP_INTERVAL,
            kad_walk_interval: DEFAULT_KAD_WALK_INTERVAL,
            executor: None,
            down_for: crate::jobs::DEFAULT_DOWN_FOR,
            settle: SettlementConfig::default(),
            #[cfg(feature = "testing")]
            lie: None,
        }
    }
}

impl NodeBuilder {
    /// The network to join (default `main`).
    pub fn network(mut self, network: Network) -> Self {
        self.network = network;
        self
    }

    /// Bytes of job inputs (model weights) a provider keeps between jobs, on disk under
    /// `<data dir>/inputs` and in memory (defaults: 8 GiB and 1 GiB; without a data dir,
    /// memory only). 0 and 0 turn the cache off.
    pub fn input_cache(mut self, disk_bytes: u64, memory_bytes: u64) -> Self {
        self.input_cache = (disk_bytes, memory_bytes);
        self
    }

    /// Blobs to put in the provider's input cache at start (a site's preloaded models), so
    /// its first capacity ad lists them as warm. Each must hash to its id; others are
    /// dropped with a warning.
    pub fn preload_inputs(mut self, blobs: Vec<(ContentId, Vec<u8>)>) -> Self {
        self.preload = blobs;
        self
    }

    /// The data dir: identity key, store and input cache live there (default: none, an
    /// in-memory store and the key from [`NodeBuilder::keypair`] or a fresh one; nothing
    /// survives a restart).
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = Some(dir.into());
        self
    }

    /// Uses this key instead of the data dir's key file.
    pub fn keypair(mut self, key: Keypair) -> Self {
        self.keypair = Some(key);
        self
    }

    /// Adds a listen address, e.g. `/ip4/0.0.0.0/tcp/4001` or `/ip4/0.0.0.0/udp/4001/quic-v1`.
    pub fn listen(mut self, addr: Multiaddr) -> Self {
        self.listen.push(addr);
        self
    }

    /// Adds a bootstrap peer (with `/p2p/<PeerId>` it also seeds the DHT).
    pub fn bootstrap(mut self, addr: Multiaddr) -> Self {
        self.bootstrap.push(addr);
        self
    }

    /// The region this node's asks and ad name (default `unknown`).
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = region.into();
        self
    }

    /// mDNS discovery on the local network (default on).
    pub fn mdns(mut self, on: bool) -> Self {
        self.mdns = on;
        self
    }

    /// Makes the node a provider advertising these GPUs in its capacity ad (default: none, a
    /// buyer-only node that publishes no ad). The site daemon fills these from the detected
    /// adapter (`SiteConfig::detect_gpu`) or the config's `[[gpus]]`.
    pub fn gpu_profiles(mut self, gpus: Vec<GpuProfile>) -> Self {
        self.gpus = gpus;
        self
    }

    /// GPU units this provider offers in total (default 1).
    pub fn units(mut self, units: u32) -> Self {
        self.units = units;
        self
    }

    /// Settlement methods advertised (default ledger).
    pub fn settlement(mut self, methods: Vec<SettlementMethod>) -> Self {
        self.settlement = methods;
        self
    }

    /// Lifetime of this node's orders and ad; they are re-announced every third of it
    /// (default [`DEFAULT_ORDER_TTL`], at least [`MIN_ORDER_TTL`]).
    pub fn order_ttl(mut self, ttl: Duration) -> Self {
        self.order_ttl = ttl;
        self
    }

    /// Gossipsub heartbeat (default [`DEFAULT_HEARTBEAT`]; tests use less).
    pub fn heartbeat(mut self, every: Duration) -> Self {
        self.heartbeat = every;
        self
    }

    /// How often expired orders are swept (default [`DEFAULT_SWEEP_INTERVAL`]).
    pub fn sweep_interval(mut self, every: Duration) -> Self {
        self.sweep_interval = every;
        self
    }

    /// How often the DHT random walk runs (default [`DEFAULT_KAD_WALK_INTERVAL`]).
    pub fn kad_walk_interval(mut self, every: Duration) -> Self {
        self.kad_walk_interval = every;
        self
    }

    /// Serves jobs on this executor: the node answers proposals against its own asks and runs
    /// dispatched jobs (default: none, the node rejects proposals).
    pub fn executor(mut self, exec: Executor) -> Self {
        self.executor = Some(exec);
        self
    }

    /// How long this node, as a buyer, avoids a provider that failed one of its jobs
    /// (default [`crate::jobs::DEFAULT_DOWN_FOR`]).
    pub fn provider_down_for(mut self, d: Duration) -> Self {
        self.down_for = d;
        self
    }

    /// How this node settles, as a provider and as a buyer (default: ledger mode with the
    /// market's default invoice, confirmation and credit policies).
    pub fn settle(mut self, cfg: SettlementConfig) -> Self {
        self.settle = cfg;
        self
    }

    /// Makes this provider lie in its receipts (bad-provider tests only; cargo feature
    /// `testing`).
    #[cfg(feature = "testing")]
    pub fn lie(mut self, lie: crate::jobs::Lie) -> Self {
        self.lie = Some(lie);
        self
    }

    /// Starts the node: loads or creates its identity, opens its store, listens, dials the
    /// bootstrap and known peers, and re-announces the orders it still offers.
    pub async fn start(mut self) -> Result<NodeHandle, StartError> {
        if self.order_ttl < MIN_ORDER_TTL
            || self.order_ttl.as_millis() > u128::from(hashgrid_protocol::limits::MAX_TTL_MS)
        {
            return Err(StartError::Config(format!(
                "order TTL {:?} must be between {MIN_ORDER_TTL:?} and 24 h",
                self.order_ttl
            )));
        }
        if self.heartbeat.is_zero()
            || self.sweep_interval.is_zero()
            || self.kad_walk_interval.is_zero()
        {
            return Err(StartError::Config("intervals must be non-zero".into()));
        }
        hashgrid_protocol::validate::check_str(
            "region",
            &self.region,
            hashgrid_protocol::limits::MAX_REGION_LEN,
        )
        .map_err(|e| StartError::Config(e.to_string()))?;

        let (key, store) = match &self.data_dir {
            Some(dir) => {
                let dir = DataDir::new(dir);
                let key = match &self.keypair {
                    Some(k) => k.clone(),
                    None => dir.load_or_create_identity()?,
                };
                (key, Store::open(&dir.root().join("store"))?)
            }
            None => {
                let key = match &self.keypair {
                    Some(k) => k.clone(),
                    None => Keypair::generate()?,
                };
                (key, Store::temporary()?)
            }
        };
        let libp2p_key = libp2p_keypair(&key)?;
        let peer_id = libp2p_key.public().to_peer_id();
        let span = info_span!("node", peer = %short_peer(&peer_id));
        let inbound = Arc::new(crate::network::exchange::InboundBudget::default());
        let settings = BehaviourSettings {
            heartbeat: self.heartbeat,
            mdns: self.mdns,
            inbound: inbound.clone(),
        };
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(libp2p_key)
            .with_tokio()
            .with_quic()
            // TCP with noise and yamux, as `with_tcp` builds it, plus a handshake timeout
            // (`with_tcp` has none of its own: a silent socket would hold a slot until the
            // peer gave up).
            .with_other_transport(|key| {
                use libp2p::Transport as _;
                let noise = noise::Config::new(key)
                    .map_err(Box::<dyn std::error::Error + Send + Sync>::from)?;
                Ok(
                    tcp::tokio::Transport::new(tcp::Config::default().nodelay(true))
                        .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                        .authenticate(noise)
                        .multiplex(yamux::Config::default())
                        .timeout(crate::network::HANDSHAKE_TIMEOUT),
                )
            })
            .map_err(|e| StartError::Network(format!("tcp: {e}")))?
            .with_behaviour(|k| {
                Behaviour::new(k, &settings)
                    .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
            })
            .map_err(|e| StartError::Network(e.to_string()))?
            .with_swarm_config(|c| {
                c.with_idle_connection_timeout(crate::network::IDLE_CONNECTION_TIMEOUT)
            })
            .build();

        let capacity_topic = IdentTopic::new(self.network.topic("capacity"));
        let orders_topic = IdentTopic::new(self.network.topic("orders"));
        let gs = &mut swarm.behaviour_mut().gossipsub;
        for t in [&capacity_topic, &orders_topic] {
            gs.subscribe(t)
                .map_err(|e| StartError::Network(format!("subscribe: {e}")))?;
        }
        let (params, thresholds) = peer_score_params(&[capacity_topic.hash(), orders_topic.hash()]);
        gs.with_peer_score(params, thresholds)
            .map_err(StartError::Network)?;

        // Listen, and wait until every listener has an address (or failed).
        let mut pending = HashMap::new();
        for addr in &self.listen {
            probe_port(addr)?;
            match swarm.listen_on(addr.clone()) {
                Ok(id) => {
                    pending.insert(id, addr.clone());
                }
                Err(e) => return Err(listen_error(addr, &e)),
            }
        }
        let mut listen_addrs = Vec::new();
        let wait = async {
            while !pending.is_empty() {
                match swarm.select_next_some().await {
                    SwarmEvent::NewListenAddr {
                        listener_id,
                        address,
                    } => {
                        pending.remove(&listener_id);
                        listen_addrs.push(address);
                    }
                    SwarmEvent::ListenerClosed {
                        listener_id,
                        reason: Err(e),
                        ..
                    }
                    | SwarmEvent::ListenerError {
                        listener_id,
                        error: e,
                    } => {
                        if let Some(addr) = pending.remove(&listener_id) {
                            return Err(StartError::Listen {
                                addr,
                                reason: e.to_string(),
                            });
                        }
                    }
                    _ => {}
                }
            }
            Ok(())
        };
        tokio::time::timeout(LISTEN_TIMEOUT, wait)
            .await
            .map_err(|_| StartError::ListenTimeout(LISTEN_TIMEOUT))??;
        for a in &listen_addrs {
            let full = with_peer(a, peer_id);
            span.in_scope(|| info!(addr = %full, "listening"));
        }

        // Dial bootstrap peers and peers met before.
        let known = store.known_peers()?;
        for addr in &self.bootstrap {
            dial_addr(&mut swarm, addr.clone());
        }
        for (peer, addrs) in known.into_iter().take(MAX_KNOWN_PEER_DIALS) {
            if peer == peer_id {
                continue;
            }
            for a in &addrs {
                swarm.behaviour_mut().kad.add_address(&peer, a.clone());
            }
            let opts = libp2p::swarm::dial_opts::DialOpts::peer_id(peer)
                .addresses(addrs)
                .build();
            if let Err(e) = swarm.dial(opts) {
                span.in_scope(|| debug!(%peer, error = %e, "dial of known peer failed"));
            }
        }

        let own: HashMap<u64, OwnOrder> = store
            .own_orders()?
            .into_iter()
            .map(|o| (o.order_id(), o))
            .collect();
        let (cmd_tx, cmd_rx) = mpsc::channel(COMMAND_QUEUE);
        let (events, _) = broadcast::channel(EVENT_QUEUE);
        let (internal_tx, internal_rx) = mpsc::channel(INTERNAL_QUEUE);
        #[allow(unused_mut)]
        let inputs = match &self.executor {
            Some(_) => crate::jobs::cache::InputCache::open(
                self.data_dir.as_ref().map(|d| d.join("inputs")).as_deref(),
                self.input_cache.0,
                self.input_cache.1,
            ),
            None => crate::jobs::cache::InputCache::open(None, 0, 0),
        };
        for (id, bytes) in std::mem::take(&mut self.preload) {
            if ContentId::of(&bytes) == id {
                inputs.put(id, Arc::new(bytes));
            } else {
                warn!(%id, "a preloaded input does not hash to its id; not cached");
            }
        }
        let inputs = Arc::new(inputs);
        let mut provider = Provider::new(
            crate::jobs::provider::Runs {
                executor: self.executor.clone(),
                inputs: inputs.clone(),
            },
            key.clone(),
            self.network.clone(),
            store.clone(),
            events.clone(),
            internal_tx,
            self.units,
        )?;
        #[cfg(feature = "testing")]
        {
            provider.lie = self.lie;
        }
        let slot = StoreSlot::new(store.clone());
        let settlement = Arc::new(
            Settlement::open(
                self.settle.clone(),
                key.clone(),
                self.network.clone(),
                store.clone(),
                slot.clone(),
            )
            .map_err(|e| StartError::Config(format!("settlement: {e}")))?,
        );
        provider.settlement = Some(settlement.clone());
        // Jobs this node submitted before a restart cannot resume (their inputs were in
        // memory): fail them so nobody waits for them.
        for mut rec in store.all::<JobRecord>(JobTree::BuyerJobs)? {
            if !rec.state.is_terminal() && rec.receipt.is_some() {
                // Verified and countersigned before the stop: done.
                rec.state = JobState::Done;
                store.put(JobTree::BuyerJobs, rec.id.as_bytes(), &rec)?;
            } else if !rec.state.is_terminal() {
                rec.state = JobState::Failed {
                    kind: crate::jobs::FailKind::Interrupted,
                    reason: "this node stopped before the job finished; submit it again".into(),
                };
                store.put(JobTree::BuyerJobs, rec.id.as_bytes(), &rec)?;
            }
        }
        store.flush()?;
        let mut state = NodeLoop {
            swarm,
            key: key.clone(),
            public: key.public(),
            peer_id,
            network: self.network.clone(),
            store,
            book: Book::new(),
            validator: Validator::new(self.network.clone()),
            own,
            unpublished: Vec::new(),
            capacity_topic,
            orders_topic,
            events: events.clone(),
            listen_addrs: listen_addrs.clone(),
            synced: HashSet::new(),
            bad_sync: HashMap::new(),
            #[cfg(feature = "testing")]
            serve_in_sync: Vec::new(),
            provider,
            inputs: inputs.clone(),
            warm_announced: Vec::new(),
            internal_rx,
            cmd_weak: cmd_tx.downgrade(),
            pending_negotiate: HashMap::new(),
            pending_job: HashMap::new(),
            pending_blob: HashMap::new(),
            pending_settle: HashMap::new(),
            settlement: settlement.clone(),
            settle_task: None,
            served: HashMap::new(),
            served_to: crate::jobs::BlobHolders::default(),
            down: HashMap::new(),
            slot: None,
            redial: Redial::default(),
            settings: self,
        };
        for a in &listen_addrs {
            let _ = events.send(NodeEvent::Listening(with_peer(a, peer_id)));
        }
        if !state.own.is_empty() {
            span.in_scope(|| info!(orders = state.own.len(), "re-announcing stored orders"));
        }
        // First announcement of the ad and of stored orders (queued until peers subscribe).
        state.announce_all();
        let state_network = state.network.clone();
        state.slot = Some(slot.clone());
        tokio::spawn(state.run(cmd_rx).instrument(span));
        Ok(NodeHandle {
            inner: Arc::new(Inner {
                peer_id,
                public: key.public(),
                key,
                network: state_network,
                store: slot,
                tasks: std::sync::Mutex::new(HashMap::new()),
                settlement,
                cmd: cmd_tx,
                events,
                placements: Default::default(),
                inputs,
                inbound,
            }),
        })
    }
}

/// The node key as a libp2p identity. The protocol crate's `Keypair::to_libp2p` targets
/// libp2p-identity 0.2 while libp2p 0.57 uses 0.3, so the 32-byte secret is converted here
/// (the PeerId is the same).
fn libp2p_keypair(key: &Keypair) -> Result<libp2p::identity::Keypair, StartError> {
    libp2p::identity::Keypair::ed25519_from_bytes(key.secret_bytes())
        .map_err(|e| StartError::Network(format!("identity: {e}")))
}

/// libp2p's TCP listeners set `SO_REUSEPORT`, so a second node could silently share a port
/// with the first (and the kernel would split connections between them). Binding the port
/// once without it first turns that into a clear [`StartError::AddrInUse`].
fn probe_port(addr: &Multiaddr) -> Result<(), StartError> {
    let mut ip = None;
    let mut tcp = None;
    let mut udp = None;
    for p in addr.iter() {
        match p {
            Protocol::Ip4(a) => ip = Some(std::net::IpAddr::V4(a)),
            Protocol::Ip6(a) => ip = Some(std::net::IpAddr::V6(a)),
            Protocol::Tcp(port) => tcp = Some(port),
            Protocol::Udp(port) => udp = Some(port),
            _ => {}
        }
    }
    let Some(ip) = ip else { return Ok(()) };
    let in_use = |e: std::io::Error| {
        if e.kind() == std::io::ErrorKind::AddrInUse {
            StartError::AddrInUse { addr: addr.clone() }
        } else {
            StartError::Listen {
                addr: addr.clone(),
                reason: e.to_string(),
            }
        }
    };
    match (tcp, udp) {
        (Some(port), _) if port != 0 => {
            std::net::TcpListener::bind((ip, port)).map_err(in_use)?;
        }
        (None, Some(port)) if port != 0 => {
            std::net::UdpSocket::bind((ip, port)).map_err(in_use)?;
        }
        _ => {}
    }
    Ok(())
}

fn listen_error(addr: &Multiaddr, e: &libp2p::TransportError<std::io::Error>) -> StartError {
    // The io error is wrapped by the transport stack (OrTransport, boxing): walk the chain.
    let mut reasons = Vec::new();
    let mut cur: Option<&(dyn std::error::Error + 'static)> = match e {
        libp2p::TransportError::Other(io) => Some(io),
        libp2p::TransportError::MultiaddrNotSupported(_) => None,
    };
    while let Some(err) = cur {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            if io.kind() == std::io::ErrorKind::AddrInUse {
                return StartError::AddrInUse { addr: addr.clone() };
            }
            if let Some(inner) = io.get_ref() {
                cur = Some(inner);
                let s = inner.to_string();
                if !s.is_empty() {
                    reasons.push(s);
                }
                continue;
            }
        }
        if let Some(libp2p::TransportError::Other(io)) =
            err.downcast_ref::<libp2p::TransportError<std::io::Error>>()
        {
            cur = Some(io);
            continue;
        }
        let s = err.to_string();
        if !s.is_empty() {
            reasons.push(s);
        }
        cur = err.source();
    }
    // Some layers only keep the OS error's text; recognise the OS messages for EADDRINUSE
    // (Linux, macOS) and WSAEADDRINUSE (Windows).
    if reasons.iter().any(|r| {
        r.contains("Address already in use") || r.contains("Only one usage of each socket address")
    }) {
        return StartError::AddrInUse { addr: addr.clone() };
    }
    StartError::Listen {
        addr: addr.clone(),
        reason: if reasons.is_empty() {
            e.to_string()
        } else {
            reasons.join(": ")
        },
    }
}

fn dial_addr(swarm: &mut Swarm<Behaviour>, addr: Multiaddr) {
    if let Some(Protocol::P2p(peer)) = addr.iter().last() {
        swarm.behaviour_mut().kad.add_address(&peer, addr.clone());
    }
    if let Err(e) = swarm.dial(addr.clone()) {
        warn!(%addr, error = %e, "cannot dial bootstrap peer");
    }
}

fn with_peer(addr: &Multiaddr, peer: PeerId) -> Multiaddr {
    if matches!(addr.iter().last(), Some(Protocol::P2p(_))) {
        addr.clone()
    } else {
        addr.clone().with(Protocol::P2p(peer))
    }
}

fn short_peer(p: &PeerId) -> String {
    let s = p.to_string();
    s[s.len().saturating_sub(8)..].to_string()
}

pub(crate) enum Command {
    Negotiate(
        PeerId,
        Vec<Multiaddr>,
        Box<Propose>,
        oneshot::Sender<Result<NegotiateReply, String>>,
    ),
    Job(
        PeerId,
        JobMessage,
        oneshot::Sender<Result<JobReply, String>>,
    ),
    Blob(
        PeerId,
        BlobRequest,
        oneshot::Sender<Result<BlobReply, String>>,
    ),
    Settle(
        PeerId,
        SettleRequest,
        oneshot::Sender<Result<SettleReply, String>>,
    ),
    Candidates(Box<CandidateQuery>, oneshot::Sender<Vec<Candidate>>),
    MarkDown(PublicKey, oneshot::Sender<()>),
    Offers(Box<hashgrid_market::OfferQuery>, oneshot::Sender<Vec<Ask>>),
    ServeBlobs(PeerId, Vec<(ContentId, Arc<Vec<u8>>)>, oneshot::Sender<()>),
    UnserveBlobs(PeerId, Vec<ContentId>, oneshot::Sender<()>),
    PostAsk(AskSpec, oneshot::Sender<Result<OrderRef, NodeError>>),
    PostBid(BidSpec, oneshot::Sender<Result<OrderRef, NodeError>>),
    Cancel(u64, oneshot::Sender<Result<(), NodeError>>),
    Book(oneshot::Sender<BookSnapshot>),
    Peers(oneshot::Sender<Vec<PeerId>>),
    OwnOrders(oneshot::Sender<Vec<OwnOrder>>),
    GossipPeers(oneshot::Sender<Vec<PeerId>>),
    ListenAddrs(oneshot::Sender<Vec<Multiaddr>>),
    PeerScore(PeerId, oneshot::Sender<Option<f64>>),
    Dial(Multiaddr, oneshot::Sender<Result<(), NodeError>>),
    #[cfg(feature = "testing")]
    PublishRaw(RawTopic, Vec<u8>, oneshot::Sender<Result<(), NodeError>>),
    #[cfg(feature = "testing")]
    ServeInSync(Vec<GossipMessage>, oneshot::Sender<()>),
    Shutdown(oneshot::Sender<()>),
}

/// Which topic [`NodeHandle::publish_raw`] publishes on (testing only).
#[cfg(feature = "testing")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawTopic {
    /// The `capacity` topic.
    Capacity,
    /// The `orders` topic.
    Orders,
}

struct Inner {
    peer_id: PeerId,
    public: PublicKey,
    key: Keypair,
    network: Network,
    store: StoreSlot,
    tasks: std::sync::Mutex<HashMap<ContentId, tokio::task::AbortHandle>>,
    settlement: Arc<Settlement>,
    cmd: mpsc::Sender<Command>,
    events: broadcast::Sender<NodeEvent>,
    /// Jobs this node placed with each provider lately (fair ranking).
    placements: crate::jobs::Placements,
    /// The provider's input cache.
    inputs: Arc<crate::jobs::cache::InputCache>,
    /// Bytes of inbound requests being read.
    inbound: Arc<crate::network::exchange::InboundBudget>,
}

/// A buyer job's request for candidates.
pub(crate) struct CandidateQuery {
    /// The job's bid.
    pub(crate) bid: Bid,
    /// Providers already tried.
    pub(crate) excluded: Vec<PublicKey>,
    /// Jobs this node placed with each provider lately.
    pub(crate) load: HashMap<PublicKey, u64>,
    /// The random tie-break among equals (from the buyer's key and the job).
    pub(crate) seed: u64,
    /// The job's input blobs and their sizes (weighed against providers' warm caches).
    pub(crate) inputs: Vec<(ContentId, u64)>,
}

/// What each provider holds of one job's inputs, from the warm ids of its capacity ad.
struct WarmInputs<'a> {
    book: &'a crate::book::Book,
    inputs: &'a [(ContentId, u64)],
    total: u64,
}

impl hashgrid_market::Warm for WarmInputs<'_> {
    fn held(&self, owner: &PublicKey) -> u64 {
        let Some(ad) = self.book.capacity(owner) else {
            return 0;
        };
        if ad.warm.is_empty() {
            return 0;
        }
        let warm: std::collections::HashSet<&ContentId> = ad.warm.iter().collect();
        self.inputs
            .iter()
            .filter(|(id, _)| warm.contains(id))
            .map(|(_, n)| n)
            .sum()
    }
    fn total(&self) -> u64 {
        self.total
    }
}

/// How often a provider whose input cache gained blobs re-announces its capacity ad.
const WARM_ANNOUNCE_EVERY: Duration = Duration::from_secs(5);

/// Messages from job tasks waiting for the node's task.
pub const INTERNAL_QUEUE: usize = 256;

/// A job task's line to the node's task: requests to peers and book lookups.
#[derive(Clone)]
pub(crate) struct Net {
    tx: mpsc::Sender<Command>,
}

impl Net {
    async fn call<T>(&self, make: impl FnOnce(oneshot::Sender<T>) -> Command) -> Result<T, String> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(make(tx))
            .await
            .map_err(|_| "the node has stopped".to_string())?;
        rx.await.map_err(|_| "the node has stopped".to_string())
    }

    pub(crate) async fn negotiate(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        p: Propose,
    ) -> Result<NegotiateReply, String> {
        let mut tries = 0;
        loop {
            let (addrs, p) = (addrs.clone(), Box::new(p.clone()));
            match self.call(|r| Command::Negotiate(peer, addrs, p, r)).await? {
                Err(e) if e.starts_with(UNREACHABLE) && tries < DIAL_RETRIES => {
                    tries += 1;
                    tokio::time::sleep(DIAL_RETRY_AFTER * tries).await;
                }
                reply => return reply,
            }
        }
    }

    pub(crate) async fn job(&self, peer: PeerId, m: JobMessage) -> Result<JobReply, String> {
        let mut tries = 0;
        loop {
            let msg = m.clone();
            match self.call(|r| Command::Job(peer, msg, r)).await? {
                Err(e) if e.starts_with(UNREACHABLE) && tries < DIAL_RETRIES => {
                    tries += 1;
                    tokio::time::sleep(DIAL_RETRY_AFTER * tries).await;
                }
                reply => return reply,
            }
        }
    }

    pub(crate) async fn settle(
        &self,
        peer: PeerId,
        req: SettleRequest,
    ) -> Result<SettleReply, String> {
        self.call(|r| Command::Settle(peer, req, r)).await?
    }

    pub(crate) async fn blob(&self, peer: PeerId, req: BlobRequest) -> Result<BlobReply, String> {
        self.call(|r| Command::Blob(peer, req, r)).await?
    }

    pub(crate) async fn candidates(&self, q: CandidateQuery) -> Result<Vec<Candidate>, String> {
        self.call(|r| Command::Candidates(Box::new(q), r)).await
    }

    pub(crate) async fn mark_down(&self, p: PublicKey) {
        let _ = self.call(|r| Command::MarkDown(p, r)).await;
    }

    pub(crate) async fn serve_blobs(&self, peer: PeerId, blobs: Vec<(ContentId, Arc<Vec<u8>>)>) {
        let _ = self.call(|r| Command::ServeBlobs(peer, blobs, r)).await;
    }

    /// A guard that stops serving `ids` to `peer` when dropped (without waiting: dropping
    /// happens in synchronous code, e.g. when a cancelled job's task is aborted).
    pub(crate) fn unserve_on_drop(&self, peer: PeerId, ids: Vec<ContentId>) -> UnserveGuard {
        UnserveGuard {
            tx: self.tx.clone(),
            peer,
            ids,
        }
    }
}

/// See [`Net::unserve_on_drop`].
pub(crate) struct UnserveGuard {
    tx: mpsc::Sender<Command>,
    peer: PeerId,
    ids: Vec<ContentId>,
}

impl Drop for UnserveGuard {
    fn drop(&mut self) {
        if self.ids.is_empty() {
            return;
        }
        let (reply, _) = oneshot::channel();
        let ids = std::mem::take(&mut self.ids);
        // A full queue (or a stopped node) leaves them served until the node stops.
        let _ = self
            .tx
            .try_send(Command::UnserveBlobs(self.peer, ids, reply));
    }
}

/// A cheap, cloneable handle to a running node. When the last handle is dropped, the node
/// shuts down (see the module docs for the order).
#[derive(Clone)]
pub struct NodeHandle {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NodeHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeHandle({})", self.inner.peer_id)
    }
}

impl NodeHandle {
    async fn request<T>(
        &self,
        make: impl FnOnce(oneshot::Sender<T>) -> Command,
    ) -> Result<T, NodeError> {
        let (tx, rx) = oneshot::channel();
        self.inner
            .cmd
            .send(make(tx))
            .await
            .map_err(|_| NodeError::Stopped)?;
        rx.await.map_err(|_| NodeError::Stopped)
    }

    /// This node's libp2p `PeerId` (derived from its ed25519 key).
    pub fn peer_id(&self) -> PeerId {
        self.inner.peer_id
    }

    /// This node's public key (signs its orders and receipts).
    pub fn public_key(&self) -> PublicKey {
        self.inner.public
    }

    /// The addresses the node listens on, each ending in `/p2p/<PeerId>` (dialable as is).
    pub async fn listen_addrs(&self) -> Result<Vec<Multiaddr>, NodeError> {
        self.request(Command::ListenAddrs).await
    }

    /// Signs, stores (flushed) and publishes an ask; returns its identity. The ask is
    /// re-announced until it is cancelled, also after a restart with the same data dir.
    pub async fn post_ask(&self, spec: AskSpec) -> Result<OrderRef, NodeError> {
        self.request(|r| Command::PostAsk(spec, r)).await?
    }

    /// Signs, stores (flushed) and publishes a bid; returns its identity.
    pub async fn post_bid(&self, spec: BidSpec) -> Result<OrderRef, NodeError> {
        self.request(|r| Command::PostBid(spec, r)).await?
    }

    /// Cancels one of this node's orders: forgets it (flushed), removes it from the book and
    /// publishes a signed `Cancel`.
    pub async fn cancel(&self, order_id: u64) -> Result<(), NodeError> {
        self.request(|r| Command::Cancel(order_id, r)).await?
    }

    /// This node's own live orders (as stored; the announced copies carry a fresh sequence
    /// number and expiry), ordered by order id.
    pub async fn own_orders(&self) -> Result<Vec<OwnOrder>, NodeError> {
        self.request(Command::OwnOrders).await
    }

    /// Makes this node's asks exactly `wanted`: keeps own asks equal to a wanted one (same
    /// GPU, units, price and longest job; they keep their order ids), cancels the others and
    /// posts what is missing. A restarted site with an unchanged config keeps its orders.
    pub async fn set_asks(&self, wanted: &[AskSpec]) -> Result<Vec<OrderRef>, NodeError> {
        let mut missing: Vec<AskSpec> = wanted.to_vec();
        let mut kept = Vec::new();
        for order in self.own_orders().await? {
            let OwnOrder::Ask(a) = order else { continue };
            let same = |s: &AskSpec| {
                s.gpu == a.gpu
                    && s.units == a.units
                    && s.price == a.price
                    && s.max_seconds == a.max_seconds
            };
            if let Some(i) = missing.iter().position(same) {
                missing.remove(i);
                kept.push(a.order_ref());
            } else {
                self.cancel(a.order_id).await?;
            }
        }
        for spec in missing {
            kept.push(self.post_ask(spec).await?);
        }
        Ok(kept)
    }

    /// A snapshot of this node's view of the book.
    pub async fn book(&self) -> Result<BookSnapshot, NodeError> {
        self.request(Command::Book).await
    }

    /// Peers with at least one open connection.
    pub async fn peers(&self) -> Result<Vec<PeerId>, NodeError> {
        self.request(Command::Peers).await
    }

    /// Peers known to be subscribed to this network's `orders` topic: those a publish reaches
    /// directly.
    pub async fn gossip_peers(&self) -> Result<Vec<PeerId>, NodeError> {
        self.request(Command::GossipPeers).await
    }

    /// The gossipsub score this node gives `peer` (`None` if it is not known to gossipsub).
    pub async fn peer_score(&self, peer: PeerId) -> Result<Option<f64>, NodeError> {
        self.request(|r| Command::PeerScore(peer, r)).await
    }

    /// Dials an address (with `/p2p/<PeerId>` it is also added to the DHT).
    pub async fn dial(&self, addr: Multiaddr) -> Result<(), NodeError> {
        self.request(|r| Command::Dial(addr, r)).await?
    }

    /// Subscribes to the node's events. A subscriber more than [`EVENT_QUEUE`] events behind
    /// loses the oldest ones.
    pub fn events(&self) -> broadcast::Receiver<NodeEvent> {
        self.inner.events.subscribe()
    }

    /// Publishes raw bytes on a topic, bypassing signing and validation. For bad-input tests
    /// only (cargo feature `testing`).
    #[cfg(feature = "testing")]
    pub async fn publish_raw(&self, topic: RawTopic, data: Vec<u8>) -> Result<(), NodeError> {
        self.request(|r| Command::PublishRaw(topic, data, r))
            .await?
    }

    /// Adds `messages`, unchecked, to every sync response this node serves (replacing earlier
    /// ones). For bad-input tests only (cargo feature `testing`).
    #[cfg(feature = "testing")]
    pub async fn serve_in_sync(&self, messages: Vec<GossipMessage>) -> Result<(), NodeError> {
        self.request(|r| Command::ServeInSync(messages, r)).await
    }

    /// Submits a job to the market and returns its id at once; the job runs in the
    /// background (follow it with [`NodeHandle::events`] or [`NodeHandle::wait`]). The job
    /// is checked first ([`crate::executor::check_offline`]): invalid WGSL, bindings, limits
    /// or inputs fail here, before any network traffic.
    pub async fn submit(&self, sub: Submission) -> Result<ContentId, NodeError> {
        crate::executor::check_offline(&sub.spec, Some(&sub.inputs))
            .map_err(|e| NodeError::InvalidJob(e.to_string()))?;
        check_options(&sub.options)?;
        let now = Timestamp::now();
        let spec_id = sub.spec.id();
        let mut seed = Vec::with_capacity(80);
        seed.extend_from_slice(&self.inner.public.0);
        seed.extend_from_slice(spec_id.as_bytes());
        seed.extend_from_slice(&now.0.to_be_bytes());
        seed.extend_from_slice(&self.store(|s| s.next_order_id())?.to_be_bytes());
        let id = ContentId::of(&seed);
        let record = JobRecord {
            id,
            name: sub.spec.name.clone(),
            spec_id,
            submitted_at: now,
            state: JobState::Matching,
            provider: None,
            attempts: Vec::new(),
            receipt: None,
            finished_at: None,
            agreement: None,
        };
        self.store(|s| {
            s.put(JobTree::BuyerJobs, id.as_bytes(), &record)?;
            s.flush()
        })?;
        let ctx = BuyerCtx {
            net: Net {
                tx: self.inner.cmd.clone(),
            },
            key: self.inner.key.clone(),
            network: self.inner.network.clone(),
            store: self.inner.store.clone(),
            events: self.inner.events.clone(),
            settlement: self.inner.settlement.clone(),
            placements: self.inner.placements.clone(),
        };
        let task = tokio::spawn(BuyerJob::new(ctx, sub, record).run().in_current_span());
        if let Ok(mut tasks) = self.inner.tasks.lock() {
            tasks.retain(|_, t| !t.is_finished());
            tasks.insert(id, task.abort_handle());
        }
        Ok(id)
    }

    fn store<T>(&self, f: impl FnOnce(&Store) -> Result<T, StoreError>) -> Result<T, NodeError> {
        self.inner.store.with(f).map_err(|e| match e {
            Some(e) => NodeError::Store(e),
            None => NodeError::Stopped,
        })
    }

    /// A submitted job's record, from the store.
    pub fn job(&self, id: &ContentId) -> Result<Option<JobRecord>, NodeError> {
        self.store(|s| crate::jobs::read_job(s, id))
    }

    /// Every job this node submitted, oldest first.
    pub fn jobs(&self) -> Result<Vec<JobRecord>, NodeError> {
        self.store(crate::jobs::read_jobs)
    }

    /// A finished job's verified outputs and record; `None` while it runs or if it failed
    /// (see [`NodeHandle::job`] for its state).
    pub fn result(&self, id: &ContentId) -> Result<Option<JobResult>, NodeError> {
        self.store(|s| crate::jobs::read_result(s, id))
    }

    /// Cancels a submitted job that has not finished: its task stops and the job is recorded
    /// as failed ([`crate::jobs::FailKind::Interrupted`]). A provider already running it may
    /// finish and sign a receipt, which is never countersigned (nothing is owed for it).
    pub fn cancel_job(&self, id: &ContentId) -> Result<(), NodeError> {
        if let Ok(mut tasks) = self.inner.tasks.lock()
            && let Some(t) = tasks.remove(id)
        {
            t.abort();
        }
        let Some(mut rec) = self.job(id)? else {
            return Err(NodeError::UnknownJob(*id));
        };
        if rec.state.is_terminal() {
            return Ok(());
        }
        rec.state = JobState::Failed {
            kind: crate::jobs::FailKind::Interrupted,
            reason: "cancelled".into(),
        };
        rec.finished_at = Some(Timestamp::now());
        self.store(|s| {
            s.put(JobTree::BuyerJobs, id.as_bytes(), &rec)?;
            s.flush()
        })?;
        let _ = self
            .inner
            .events
            .send(NodeEvent::Job(crate::jobs::JobUpdate {
                job: *id,
                state: rec.state,
                provider: rec.provider,
            }));
        Ok(())
    }

    /// The input blobs (model weights) this provider holds in its cache, most recently used
    /// first: what its capacity ad lists as warm.
    pub fn warm_inputs(&self) -> Vec<ContentId> {
        self.inner.inputs.ids()
    }

    /// Bytes in this provider's input cache: on disk, in memory.
    pub fn input_cache_bytes(&self) -> (u64, u64) {
        self.inner.inputs.bytes()
    }

    /// The budget for bytes of inbound requests being read: its use now, its peak and how
    /// many requests it refused.
    pub fn inbound_budget(&self) -> &crate::network::exchange::InboundBudget {
        &self.inner.inbound
    }

    /// The live asks meeting `query`, sorted as asked (the market engine's `offers`).
    pub async fn offers(&self, query: hashgrid_market::OfferQuery) -> Result<Vec<Ask>, NodeError> {
        self.request(|r| Command::Offers(Box::new(query), r)).await
    }

    /// Waits until a submitted job finishes and returns its final record.
    pub async fn wait(&self, id: &ContentId) -> Result<JobRecord, NodeError> {
        let mut events = self.events();
        loop {
            match self.job(id)? {
                Some(r) if r.state.is_terminal() => return Ok(r),
                Some(_) => {}
                None => return Err(NodeError::UnknownJob(*id)),
            }
            loop {
                match events.recv().await {
                    Ok(NodeEvent::Job(u)) if u.job == *id && u.state.is_terminal() => break,
                    Ok(_) => {}
                    // Lagged: re-read the store.
                    Err(broadcast::error::RecvError::Lagged(_)) => break,
                    Err(broadcast::error::RecvError::Closed) => return Err(NodeError::Stopped),
                }
            }
        }
    }

    /// Sends a raw proposal to `peer` (bad-input tests only; cargo feature `testing`).
    #[cfg(feature = "testing")]
    pub async fn raw_propose(
        &self,
        peer: PeerId,
        addrs: Vec<Multiaddr>,
        p: Propose,
    ) -> Result<NegotiateReply, NodeError> {
        self.net()
            .negotiate(peer, addrs, p)
            .await
            .map_err(NodeError::Request)
    }

    /// Sends a raw job request to `peer` (bad-input tests only; cargo feature `testing`).
    #[cfg(feature = "testing")]
    pub async fn raw_job(&self, peer: PeerId, m: JobMessage) -> Result<JobReply, NodeError> {
        self.net().job(peer, m).await.map_err(NodeError::Request)
    }

    /// Sends a raw blob request to `peer` (bad-input tests only; cargo feature `testing`).
    #[cfg(feature = "testing")]
    pub async fn raw_blob(&self, peer: PeerId, r: BlobRequest) -> Result<BlobReply, NodeError> {
        self.net().blob(peer, r).await.map_err(NodeError::Request)
    }

    /// Signs a message body with this node's key (bad-input tests only; cargo feature
    /// `testing`).
    #[cfg(feature = "testing")]
    pub fn sign<T: hashgrid_protocol::SignedMessage>(&self, body: &T) -> Signed<T> {
        Signed::sign(&self.inner.key, &self.inner.network, body)
    }

    /// Countersigns with this node's key (bad-input tests only; cargo feature `testing`).
    #[cfg(feature = "testing")]
    pub fn countersign<T: hashgrid_protocol::Countersignable>(
        &self,
        s: &Signed<T>,
    ) -> hashgrid_protocol::Countersigned<T> {
        s.countersign(&self.inner.key, &self.inner.network)
    }

    #[cfg(feature = "testing")]
    fn net(&self) -> Net {
        Net {
            tx: self.inner.cmd.clone(),
        }
    }

    /// Settlement positions per counterparty: what each owes this node as a buyer (by invoice
    /// state) and what this node owes it for its own purchases.
    pub fn positions(&self) -> std::collections::BTreeMap<PublicKey, Position> {
        self.inner.settlement.positions()
    }

    /// Invoices this node issued as a provider, with the ledger's record of each.
    pub fn invoices_issued(
        &self,
    ) -> Result<
        Vec<(
            OutInvoice,
            Option<hashgrid_market::settlement::InvoiceRecord>,
        )>,
        NodeError,
    > {
        let out: Vec<OutInvoice> = self.store(|s| s.all(JobTree::InvoicesOut))?;
        Ok(out
            .into_iter()
            .map(|o| {
                let rec = self.inner.settlement.invoice_record(&o.invoice.id());
                (o, rec)
            })
            .collect())
    }

    /// Invoices this node received as a buyer.
    pub fn invoices_received(&self) -> Result<Vec<InInvoice>, NodeError> {
        self.store(|s| s.all(JobTree::InvoicesIn))
    }

    /// Runs one settlement pass now (invoicing, chain checks, deliveries, payments) instead
    /// of waiting for the next interval.
    pub async fn settle_now(&self) {
        let net = Net {
            tx: self.inner.cmd.clone(),
        };
        self.inner.settlement.pass(&net).await;
    }

    /// This node's buyer wallet (on-chain mode with wallet keys).
    pub fn wallet(&self) -> Option<Arc<std::sync::Mutex<crate::wallet::Wallet>>> {
        self.inner.settlement.buyer_wallet()
    }

    /// The chain backend (on-chain mode).
    pub fn chain(&self) -> Option<Arc<dyn crate::wallet::ChainSource>> {
        self.inner.settlement.chain()
    }

    /// Shuts the node down in the documented order and waits until it has stopped. Other
    /// handles get [`NodeError::Stopped`] afterwards. Returns at once if it already stopped.
    pub async fn shutdown(&self) {
        let _ = self.request(Command::Shutdown).await;
    }
}

fn check_options(o: &JobOptions) -> Result<(), NodeError> {
    if o.units == 0 || o.max_seconds == 0 {
        return Err(NodeError::InvalidJob(
            "units and max_seconds must be at least 1".into(),
        ));
    }
    Ok(())
}

struct NodeLoop {
    swarm: Swarm<Behaviour>,
    key: Keypair,
    public: PublicKey,
    peer_id: PeerId,
    network: Network,
    store: Store,
    book: Book,
    validator: Validator,
    own: HashMap<u64, OwnOrder>,
    /// Own messages whose publish failed, retried every [`PUBLISH_RETRY_INTERVAL`].
    unpublished: Vec<GossipMessage>,
    capacity_topic: IdentTopic,
    orders_topic: IdentTopic,
    events: broadcast::Sender<NodeEvent>,
    listen_addrs: Vec<Multiaddr>,
    /// Peers whose book was requested during their current connection.
    synced: HashSet<PeerId>,
    /// Invalid messages each connected peer put in its sync responses (feeds the P5
    /// application score; forgotten when the peer disconnects).
    bad_sync: HashMap<PeerId, u32>,
    /// Extra, unchecked messages served in sync responses (testing hook).
    #[cfg(feature = "testing")]
    serve_in_sync: Vec<GossipMessage>,
    /// The provider side of the job lifecycle.
    provider: Provider,
    /// The provider's input cache (its ids are the capacity ad's warm list).
    inputs: Arc<crate::jobs::cache::InputCache>,
    /// The warm list last announced.
    warm_announced: Vec<ContentId>,
    internal_rx: mpsc::Receiver<Internal>,
    /// Weak, so the node still stops when the last handle is dropped.
    cmd_weak: mpsc::WeakSender<Command>,
    /// Callers waiting for the answers to this node's outbound requests.
    pending_negotiate: Pending<NegotiateReply>,
    pending_job: Pending<JobReply>,
    pending_blob: Pending<BlobReply>,
    pending_settle: Pending<SettleReply>,
    /// Settlement (ledger, invoices, wallets).
    settlement: Arc<Settlement>,
    /// The running settlement pass.
    settle_task: Option<tokio::task::JoinHandle<()>>,
    /// Input blobs this node (as a buyer) serves, and the provider allowed to fetch each.
    served: HashMap<ContentId, Arc<Vec<u8>>>,
    /// Which provider may fetch which served blob, per job.
    served_to: crate::jobs::BlobHolders,
    /// Providers that failed this node's jobs, and until when they are avoided.
    down: HashMap<PublicKey, tokio::time::Instant>,
    /// The handles' view of the store, closed at shutdown.
    slot: Option<StoreSlot>,
    /// When the bootstrap peers are dialled again while this node has no peer.
    redial: Redial,
    settings: NodeBuilder,
}

/// Dialling the bootstrap peers again while a node has no connection at all (the first dial
/// failed: the peer was restarting, a handshake timed out on a loaded host), backing off from
/// [`REDIAL_FIRST`] to [`REDIAL_MAX`]. Without it a node whose first dials failed would stay
/// alone until something dialled it.
struct Redial {
    next: tokio::time::Instant,
    backoff: Duration,
}

/// First wait before dialling the bootstrap peers again.
pub const REDIAL_FIRST: Duration = Duration::from_secs(1);

/// Longest wait between dials of the bootstrap peers by a node that has no peer.
pub const REDIAL_MAX: Duration = Duration::from_secs(60);

impl Default for Redial {
    fn default() -> Self {
        Redial {
            next: tokio::time::Instant::now() + REDIAL_FIRST,
            backoff: REDIAL_FIRST,
        }
    }
}

/// What a queued own message is about: the ad (`None`) or an order id. Cancels share the
/// order's key, so a queued re-announcement never follows its cancel.
fn queue_key(msg: &GossipMessage) -> Option<u64> {
    match msg {
        GossipMessage::Capacity(_) => None,
        GossipMessage::Ask(s) => s.decode_unverified().ok().map(|a| a.order_id),
        GossipMessage::Bid(s) => s.decode_unverified().ok().map(|b| b.order_id),
        GossipMessage::Cancel(s) => s.decode_unverified().ok().map(|c| c.order_id),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl NodeLoop {
    fn emit(&self, ev: NodeEvent) {
        // Err only means nobody is subscribed.
        let _ = self.events.send(ev);
    }

    async fn run(mut self, mut cmd_rx: mpsc::Receiver<Command>) {
        let reannounce_every = self.settings.order_ttl / 3;
        // A changed warm list is announced at most this often (the cache write happens beside
        // the job; a check a few seconds later sees it).
        let mut warm_check = tokio::time::interval(WARM_ANNOUNCE_EVERY);
        warm_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut warm_changed = false;
        let mut reannounce = tokio::time::interval_at(
            tokio::time::Instant::now() + reannounce_every,
            reannounce_every,
        );
        let mut sweep = tokio::time::interval(self.settings.sweep_interval);
        let mut retry = tokio::time::interval(PUBLISH_RETRY_INTERVAL);
        let mut walk = tokio::time::interval(self.settings.kad_walk_interval);
        let mut entropy = tokio::time::interval_at(
            tokio::time::Instant::now() + ANTI_ENTROPY_FAST,
            ANTI_ENTROPY_FAST,
        );
        let mut entropy_slow = false;
        let every = self.settlement.interval();
        let mut settle_tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        for t in [
            &mut settle_tick,
            &mut reannounce,
            &mut sweep,
            &mut retry,
            &mut walk,
            &mut entropy,
        ] {
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        }
        // Early re-announcements (see the module docs): after the first meshes have formed.
        let hb = self.settings.heartbeat;
        let started = tokio::time::Instant::now();
        let mut early: std::collections::VecDeque<tokio::time::Instant> =
            EARLY_REANNOUNCE_HEARTBEATS
                .iter()
                .map(|n| started + hb * *n + HEARTBEAT_INITIAL_DELAY)
                .collect();
        let shutdown_reply = loop {
            tokio::select! {
                ev = self.swarm.select_next_some() => self.on_swarm_event(ev),
                cmd = cmd_rx.recv() => match cmd {
                    None => break None,
                    Some(Command::Shutdown(reply)) => break Some(reply),
                    Some(cmd) => self.on_command(cmd),
                },
                Some(msg) = self.internal_rx.recv() => {
                    let fetched = matches!(msg, Internal::Inputs(_, f, _) if f > 0);
                    let answers = self.provider.on_internal(msg);
                    self.answer(answers);
                    if fetched {
                        // New weights in the cache: say so before the next periodic ad.
                        warm_changed = true;
                    }
                }
                _ = warm_check.tick(), if warm_changed => {
                    warm_changed = false;
                    if self.warm_ids() != self.warm_announced
                        && let Err(e) = self.announce_capacity()
                    {
                        warn!(error = %e, "cannot announce capacity");
                    }
                }
                _ = reannounce.tick() => self.announce_all(),
                _ = entropy.tick() => {
                    self.redial_bootstrap();
                    self.pull_random_peer();
                    if !entropy_slow && started.elapsed() >= ANTI_ENTROPY_FAST_FOR {
                        entropy_slow = true;
                        entropy = tokio::time::interval_at(
                            tokio::time::Instant::now() + ANTI_ENTROPY_INTERVAL,
                            ANTI_ENTROPY_INTERVAL,
                        );
                        entropy.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    }
                }
                _ = tokio::time::sleep_until(early.front().copied().unwrap_or(started)), if !early.is_empty() => {
                    early.pop_front();
                    self.announce_all();
                }
                _ = sweep.tick() => {
                    self.sweep();
                    let answers = self.provider.tick();
                    self.answer(answers);
                }
                _ = settle_tick.tick() => self.spawn_settle_pass(),
                _ = retry.tick(), if !self.unpublished.is_empty() => self.retry_publish(),
                _ = walk.tick() => {
                    self.swarm.behaviour_mut().kad.get_closest_peers(PeerId::random());
                }
            }
        };
        // 1. Stop accepting commands; answer the queued ones. A settlement pass in flight
        // stops at its next await (every state it wrote was flushed as it went).
        if let Some(t) = self.settle_task.take() {
            t.abort();
        }
        cmd_rx.close();
        while let Ok(cmd) = cmd_rx.try_recv() {
            if let Command::Shutdown(r) = cmd {
                let _ = r.send(());
            }
            // Other replies are dropped: their callers see NodeError::Stopped.
        }
        // 2. Nothing more is published: the loop and its timers are gone.
        // 3. Flush the store.
        if let Err(e) = self.store.flush() {
            warn!(error = %e, "store flush at shutdown failed");
        }
        // 4. Close the swarm (listeners and connections).
        let NodeLoop {
            swarm,
            store,
            provider,
            slot,
            settlement,
            ..
        } = self;
        drop(swarm);
        drop(provider);
        settlement.close();
        if let Some(slot) = slot {
            slot.close();
        }
        drop(store);
        info!("node stopped");
        // 5. Answer the shutdown call.
        if let Some(r) = shutdown_reply {
            let _ = r.send(());
        }
    }

    /// Pulls the book of one random connected peer (anti-entropy).
    /// Dials the bootstrap peers again if this node has no peer (see [`Redial`]).
    fn redial_bootstrap(&mut self) {
        let now = tokio::time::Instant::now();
        if self.swarm.connected_peers().next().is_some() {
            self.redial = Redial::default();
            return;
        }
        let dialling = self
            .swarm
            .network_info()
            .connection_counters()
            .num_pending_outgoing()
            > 0;
        if self.settings.bootstrap.is_empty() || dialling || now < self.redial.next {
            return;
        }
        debug!(after = ?self.redial.backoff, "no peers: dialling the bootstrap peers again");
        self.redial.backoff = (self.redial.backoff * 2).min(REDIAL_MAX);
        self.redial.next = now + self.redial.backoff;
        for addr in self.settings.bootstrap.clone() {
            dial_addr(&mut self.swarm, addr);
        }
    }

    fn pull_random_peer(&mut self) {
        let peers: Vec<PeerId> = self.swarm.connected_peers().copied().collect();
        if peers.is_empty() {
            return;
        }
        let pick = usize::try_from(Timestamp::now().0 % peers.len() as u64).unwrap_or(0);
        let peer = peers[pick];
        self.swarm.behaviour_mut().sync.send_request(
            &peer,
            SyncRequest {
                max: MAX_SYNC_MESSAGES as u32,
            },
        );
    }

    fn answer(&mut self, answers: Vec<Answer>) {
        for (channel, reply) in answers {
            // Err: the buyer went away; it polls again or re-matches.
            let _ = self.swarm.behaviour_mut().job.send_response(channel, reply);
        }
    }

    fn is_down(&self, p: &PublicKey) -> bool {
        self.down
            .get(p)
            .is_some_and(|until| *until > tokio::time::Instant::now())
    }

    /// The asks that could take all of the query's bid, best first, without excluded or down
    /// providers, each with its provider's advertised addresses: price first, and among equal
    /// prices the market engine's fair ranking (free units, this buyer's recent load there,
    /// then the query's random tie-break), so equal-priced providers share the work.
    fn candidates(&self, q: &CandidateQuery) -> Vec<Candidate> {
        let now = Timestamp::now().0;
        let book = self.ask_book(now, |a| {
            q.excluded.contains(&a.provider) || self.is_down(&a.provider)
        });
        let load = |p: &PublicKey| q.load.get(p).copied().unwrap_or(0);
        let warm = WarmInputs {
            book: &self.book,
            inputs: &q.inputs,
            total: q.inputs.iter().map(|(_, n)| n).sum(),
        };
        let fair = hashgrid_market::Fairness {
            rep: &hashgrid_market::NoReputation,
            load: &load,
            seed: q.seed,
            warm: &warm,
        };
        book.candidates_fair(&q.bid, now, &fair, crate::jobs::MAX_PROPOSALS_PER_ATTEMPT)
            .into_iter()
            .filter_map(|r| {
                let peer = crate::jobs::peer_of(&r.ask.provider)?;
                let ad = self.book.capacity(&r.ask.provider);
                let addrs = ad
                    .map(|ad| ad.addrs.iter().filter_map(|a| a.parse().ok()).collect())
                    .unwrap_or_default();
                let warm = ad
                    .map(|ad| {
                        q.inputs
                            .iter()
                            .filter(|(id, _)| ad.warm.contains(id))
                            .map(|(id, _)| *id)
                            .collect()
                    })
                    .unwrap_or_default();
                Some(Candidate {
                    ask: r.ask,
                    peer,
                    addrs,
                    warm,
                })
            })
            .collect()
    }

    /// The live asks of this node's view, except those `skip` names, in the market engine for
    /// ranking. Only asks go in, so nothing trades: the engine only orders them.
    fn ask_book(&self, now: u64, skip: impl Fn(&Ask) -> bool) -> hashgrid_market::OrderBook {
        let mut book = hashgrid_market::OrderBook::new();
        for ask in self.book.asks().filter(|a| !skip(a)) {
            let _ = book.submit_ask(ask.clone(), now, &hashgrid_market::NoReputation);
        }
        book
    }

    fn net(&self) -> Option<Net> {
        self.cmd_weak.upgrade().map(|tx| Net { tx })
    }

    fn on_command(&mut self, cmd: Command) {
        match cmd {
            Command::Negotiate(peer, addrs, propose, r) => {
                if peer == self.peer_id {
                    let _ = r.send(Err("cannot trade with itself".into()));
                    return;
                }
                let id = self
                    .swarm
                    .behaviour_mut()
                    .negotiate
                    .send_request_with_addresses(&peer, *propose, addrs);
                self.pending_negotiate.insert(id, r);
            }
            Command::Job(peer, msg, r) => {
                let id = self.swarm.behaviour_mut().job.send_request(&peer, msg);
                self.pending_job.insert(id, r);
            }
            Command::Blob(peer, req, r) => {
                let id = self.swarm.behaviour_mut().blob.send_request(&peer, req);
                self.pending_blob.insert(id, r);
            }
            Command::Settle(peer, req, r) => {
                let id = self.swarm.behaviour_mut().settle.send_request(&peer, req);
                self.pending_settle.insert(id, r);
            }
            Command::Candidates(q, r) => {
                let _ = r.send(self.candidates(&q));
            }
            Command::Offers(q, r) => {
                let now = Timestamp::now().0;
                let book = self.ask_book(now, |_| false);
                let _ = r.send(book.offers(&q, now).into_iter().map(|o| o.ask).collect());
            }
            Command::MarkDown(p, r) => {
                let until = tokio::time::Instant::now() + self.settings.down_for;
                self.down.insert(p, until);
                let now = tokio::time::Instant::now();
                self.down.retain(|_, u| *u > now);
                let _ = r.send(());
            }
            Command::ServeBlobs(peer, blobs, r) => {
                for (id, bytes) in blobs {
                    self.served.insert(id, bytes);
                    self.served_to.add(id, peer);
                }
                let _ = r.send(());
            }
            Command::UnserveBlobs(peer, ids, r) => {
                for id in ids {
                    if self.served_to.release(&id, &peer) {
                        self.served.remove(&id);
                    }
                }
                let _ = r.send(());
            }
            Command::PostAsk(spec, r) => {
                let _ = r.send(self.post_ask(spec));
            }
            Command::PostBid(spec, r) => {
                let _ = r.send(self.post_bid(spec));
            }
            Command::Cancel(id, r) => {
                let _ = r.send(self.cancel(id));
            }
            Command::Book(r) => {
                let _ = r.send(self.book.snapshot());
            }
            Command::GossipPeers(r) => {
                let topic = self.orders_topic.hash();
                let peers = self
                    .swarm
                    .behaviour()
                    .gossipsub
                    .all_peers()
                    .filter(|(_, topics)| topics.contains(&&topic))
                    .map(|(p, _)| *p)
                    .collect();
                let _ = r.send(peers);
            }
            Command::OwnOrders(r) => {
                let mut orders: Vec<OwnOrder> = self.own.values().cloned().collect();
                orders.sort_by_key(OwnOrder::order_id);
                let _ = r.send(orders);
            }
            Command::Peers(r) => {
                let _ = r.send(self.swarm.connected_peers().copied().collect());
            }
            Command::ListenAddrs(r) => {
                let addrs = self
                    .listen_addrs
                    .iter()
                    .map(|a| with_peer(a, self.peer_id))
                    .collect();
                let _ = r.send(addrs);
            }
            Command::PeerScore(p, r) => {
                let _ = r.send(self.swarm.behaviour().gossipsub.peer_score(&p));
            }
            Command::Dial(addr, r) => {
                if let Some(Protocol::P2p(peer)) = addr.iter().last() {
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                }
                let res = self
                    .swarm
                    .dial(addr)
                    .map_err(|e| NodeError::Dial(e.to_string()));
                let _ = r.send(res);
            }
            #[cfg(feature = "testing")]
            Command::PublishRaw(topic, data, r) => {
                let t = match topic {
                    RawTopic::Capacity => self.capacity_topic.clone(),
                    RawTopic::Orders => self.orders_topic.clone(),
                };
                let res = self
                    .swarm
                    .behaviour_mut()
                    .gossipsub
                    .publish(t, data)
                    .map(|_| ())
                    .map_err(|e| NodeError::Publish(e.to_string()));
                let _ = r.send(res);
            }
            #[cfg(feature = "testing")]
            Command::ServeInSync(msgs, r) => {
                self.serve_in_sync = msgs;
                let _ = r.send(());
            }
            Command::Shutdown(_) => {} // handled in `run`
        }
    }

    fn now_and_expiry(&self) -> (Timestamp, Timestamp) {
        let now = Timestamp::now();
        (now, now.plus_ms(ms(self.settings.order_ttl)))
    }

    fn check_room(&self) -> Result<(), NodeError> {
        if self.own.len() >= MAX_OWN_ORDERS {
            return Err(NodeError::TooManyOrders(MAX_OWN_ORDERS));
        }
        Ok(())
    }

    fn post_ask(&mut self, spec: AskSpec) -> Result<OrderRef, NodeError> {
        self.check_room()?;
        let (now, expires_at) = self.now_and_expiry();
        let ask = Ask {
            provider: self.public,
            order_id: 0,
            seq: 0,
            units: spec.units,
            price: spec.price,
            gpu: spec.gpu,
            region: self.settings.region.clone(),
            max_seconds: spec.max_seconds,
            created_at: now,
            expires_at,
        };
        // Check the structure before spending an order id.
        let probe = Signed::sign(&self.key, &self.network, &ask);
        probe
            .verify(&self.network)
            .map_err(|e| NodeError::InvalidOrder(e.to_string()))?;
        let order_id = self.store.next_order_id()?;
        let order = OwnOrder::Ask(Ask { order_id, ..ask });
        self.store.put_own_order(&order)?;
        self.own.insert(order_id, order.clone());
        self.announce_orders(&[order])?;
        Ok(OrderRef {
            owner: self.public,
            order_id,
        })
    }

    fn post_bid(&mut self, spec: BidSpec) -> Result<OrderRef, NodeError> {
        self.check_room()?;
        let (now, expires_at) = self.now_and_expiry();
        let bid = Bid {
            buyer: self.public,
            order_id: 0,
            seq: 0,
            units: spec.units,
            requirements: spec.requirements,
            max_price: spec.max_price,
            max_seconds: spec.max_seconds,
            created_at: now,
            expires_at,
        };
        let probe = Signed::sign(&self.key, &self.network, &bid);
        probe
            .verify(&self.network)
            .map_err(|e| NodeError::InvalidOrder(e.to_string()))?;
        let order_id = self.store.next_order_id()?;
        let order = OwnOrder::Bid(Bid { order_id, ..bid });
        self.store.put_own_order(&order)?;
        self.own.insert(order_id, order.clone());
        self.announce_orders(&[order])?;
        Ok(OrderRef {
            owner: self.public,
            order_id,
        })
    }

    fn cancel(&mut self, order_id: u64) -> Result<(), NodeError> {
        if !self.own.contains_key(&order_id) {
            return Err(NodeError::UnknownOrder(order_id));
        }
        self.store.remove_own_order(order_id)?;
        self.own.remove(&order_id);
        let (now, expires_at) = self.now_and_expiry();
        let cancel = Cancel {
            owner: self.public,
            order_id,
            seq: self.store.next_seq(now.0)?,
            created_at: now,
            expires_at,
        };
        let signed = Signed::sign(&self.key, &self.network, &cancel);
        let msg = GossipMessage::Cancel(signed.clone());
        self.fold_own(msg.clone(), VerifiedGossip::Cancel(cancel));
        // A queued re-announcement of the cancelled order must not go out after the cancel.
        self.unpublished.retain(|m| queue_key(m) != Some(order_id));
        self.publish(msg);
        Ok(())
    }

    /// Re-signs `orders` with one fresh sequence number and expiry, folds and publishes them.
    fn announce_orders(&mut self, orders: &[OwnOrder]) -> Result<(), NodeError> {
        if orders.is_empty() {
            return Ok(());
        }
        let (now, expires_at) = self.now_and_expiry();
        let seq = self.store.next_seq(now.0)?;
        for order in orders {
            let (msg, verified) = match order {
                OwnOrder::Ask(a) => {
                    let a = Ask {
                        seq,
                        created_at: now,
                        expires_at,
                        region: self.settings.region.clone(),
                        ..a.clone()
                    };
                    (
                        GossipMessage::Ask(Signed::sign(&self.key, &self.network, &a)),
                        VerifiedGossip::Ask(a),
                    )
                }
                OwnOrder::Bid(b) => {
                    let b = Bid {
                        seq,
                        created_at: now,
                        expires_at,
                        ..b.clone()
                    };
                    (
                        GossipMessage::Bid(Signed::sign(&self.key, &self.network, &b)),
                        VerifiedGossip::Bid(b),
                    )
                }
            };
            self.fold_own(msg.clone(), verified);
            self.publish(msg);
        }
        Ok(())
    }

    /// Announces the capacity ad (providers only) and every live own order.
    fn announce_all(&mut self) {
        if !self.settings.gpus.is_empty()
            && let Err(e) = self.announce_capacity()
        {
            warn!(error = %e, "cannot announce capacity");
        }
        let orders: Vec<OwnOrder> = self.own.values().cloned().collect();
        if let Err(e) = self.announce_orders(&orders) {
            warn!(error = %e, "cannot re-announce orders");
        }
    }

    /// The input ids the capacity ad lists as warm.
    fn warm_ids(&self) -> Vec<ContentId> {
        let mut ids = self.inputs.ids();
        ids.truncate(hashgrid_protocol::limits::MAX_WARM_PER_AD);
        ids
    }

    fn announce_capacity(&mut self) -> Result<(), NodeError> {
        let (now, expires_at) = self.now_and_expiry();
        let addrs = self
            .listen_addrs
            .iter()
            .take(hashgrid_protocol::limits::MAX_ADDRS_PER_AD)
            .map(|a| with_peer(a, self.peer_id).to_string())
            .collect();
        let warm = self.warm_ids();
        self.warm_announced = warm.clone();
        let ad = CapacityAd {
            warm,
            provider: self.public,
            region: self.settings.region.clone(),
            gpus: self.settings.gpus.clone(),
            units_total: self.settings.units,
            units_free: self.settings.units,
            settlement: self.settings.settlement.clone(),
            addrs,
            seq: self.store.next_seq(now.0)?,
            created_at: now,
            expires_at,
        };
        let signed = Signed::sign(&self.key, &self.network, &ad);
        signed
            .verify(&self.network)
            .map_err(|e| NodeError::InvalidOrder(format!("capacity ad: {e}")))?;
        let msg = GossipMessage::Capacity(signed);
        self.fold_own(msg.clone(), VerifiedGossip::Capacity(ad));
        self.publish(msg);
        Ok(())
    }

    fn topic_for(&self, msg: &GossipMessage) -> IdentTopic {
        match msg {
            GossipMessage::Capacity(_) => self.capacity_topic.clone(),
            _ => self.orders_topic.clone(),
        }
    }

    fn publish(&mut self, msg: GossipMessage) {
        let topic = self.topic_for(&msg);
        match self
            .swarm
            .behaviour_mut()
            .gossipsub
            .publish(topic, msg.encode())
        {
            Ok(_) => {}
            Err(gossipsub::PublishError::Duplicate) => {}
            Err(e) => {
                debug!(error = %e, "publish failed; will retry");
                // A newer copy of the same order or ad supersedes a queued one: sending both
                // could deliver the older one last, which peers reject as a replay.
                let key = queue_key(&msg);
                self.unpublished.retain(|m| queue_key(m) != key);
                if self.unpublished.len() >= MAX_UNPUBLISHED {
                    self.unpublished.remove(0);
                }
                self.unpublished.push(msg);
            }
        }
    }

    fn retry_publish(&mut self) {
        let now = Timestamp::now();
        let queued = std::mem::take(&mut self.unpublished);
        for msg in queued {
            // Messages that expired while waiting are not worth sending.
            if msg.verify(&self.network, now).is_ok() {
                self.publish(msg);
            }
        }
    }

    fn fold_own(&mut self, msg: GossipMessage, verified: VerifiedGossip) {
        self.validator.record_own(&verified);
        let _ = self.fold(msg, verified);
    }

    /// Folds a verified message into the book and reports the change as an event.
    fn fold(&mut self, msg: GossipMessage, verified: VerifiedGossip) -> Result<(), BookReject> {
        let change = match (msg, verified) {
            (GossipMessage::Ask(s), VerifiedGossip::Ask(a)) => self.book.insert_ask(s, a)?,
            (GossipMessage::Bid(s), VerifiedGossip::Bid(b)) => self.book.insert_bid(s, b)?,
            (GossipMessage::Cancel(s), VerifiedGossip::Cancel(c)) => self.book.cancel(s, c)?,
            (GossipMessage::Capacity(s), VerifiedGossip::Capacity(c)) => {
                self.book.insert_capacity(s, c)?
            }
            // `verify` returns the variant of the message it verified.
            _ => return Ok(()),
        };
        match change {
            BookChange::Added(kind, order) => self.emit(NodeEvent::OrderAdded { kind, order }),
            BookChange::Cancelled(kind, order) => self.emit(NodeEvent::OrderRemoved {
                kind,
                order,
                reason: RemoveReason::Cancelled,
            }),
            BookChange::Capacity(p) => self.emit(NodeEvent::CapacityUpdated(p)),
            BookChange::Replaced(..) | BookChange::CancelRecorded(_) => {}
        }
        Ok(())
    }

    fn sweep(&mut self) {
        for (kind, order) in self.book.expire(Timestamp::now()) {
            debug!(?kind, order = order.order_id, owner = %order.owner.short(), "order expired");
            self.emit(NodeEvent::OrderRemoved {
                kind,
                order,
                reason: RemoveReason::Expired,
            });
        }
    }

    fn topic_kind(&self, hash: &TopicHash) -> TopicKind {
        if *hash == self.capacity_topic.hash() {
            TopicKind::Capacity
        } else if *hash == self.orders_topic.hash() {
            TopicKind::Orders
        } else {
            TopicKind::Unknown
        }
    }

    fn on_gossip(&mut self, from: PeerId, id: gossipsub::MessageId, message: gossipsub::Message) {
        let topic = self.topic_kind(&message.topic);
        let verdict = self
            .validator
            .check_bytes(topic, &message.data, Timestamp::now(), true);
        let acceptance = match verdict {
            Verdict::Accept(accepted) => match self.fold(accepted.0, accepted.1) {
                Ok(()) => MessageAcceptance::Accept,
                Err(BookReject::Stale { .. } | BookReject::Cancelled { .. }) => {
                    self.reject(from, "stale copy of a replaced or cancelled order".into());
                    MessageAcceptance::Reject
                }
                Err(e) => {
                    debug!(%from, reason = %e, "gossip ignored");
                    MessageAcceptance::Ignore
                }
            },
            Verdict::Ignore(reason) => {
                debug!(%from, %reason, "gossip ignored");
                MessageAcceptance::Ignore
            }
            Verdict::Reject(reason) => {
                self.reject(from, reason);
                MessageAcceptance::Reject
            }
        };
        self.swarm
            .behaviour_mut()
            .gossipsub
            .report_message_validation_result(&id, &from, acceptance);
    }

    fn reject(&self, from: PeerId, reason: String) {
        info!(%from, %reason, "message rejected");
        self.emit(NodeEvent::MessageRejected { from, reason });
    }

    fn on_sync_response(&mut self, from: PeerId, resp: SyncResponse) {
        let now = Timestamp::now();
        let total = resp.messages.len();
        let mut added = 0usize;
        for msg in resp.messages.into_iter().take(MAX_SYNC_MESSAGES) {
            // Anti-entropy pulls mostly bring what the book already holds: skip those before
            // the signature check.
            if self.book.holds(&msg) {
                continue;
            }
            match self.validator.check_message(msg, now, false) {
                Verdict::Accept(accepted) => {
                    if self.fold(accepted.0, accepted.1).is_ok() {
                        added += 1;
                    }
                }
                Verdict::Ignore(_) => {}
                Verdict::Reject(reason) => {
                    self.reject(from, format!("sync response: {reason}"));
                    let n = self.bad_sync.entry(from).or_insert(0);
                    *n = n.saturating_add(1);
                    let score = -f64::from(*n).powi(2);
                    self.swarm
                        .behaviour_mut()
                        .gossipsub
                        .set_application_score(&from, score);
                }
            }
        }
        debug!(%from, total, added, "book sync");
    }

    fn on_swarm_event(&mut self, ev: SwarmEvent<BehaviourEvent>) {
        match ev {
            SwarmEvent::NewListenAddr { address, .. } if !self.listen_addrs.contains(&address) => {
                info!(addr = %with_peer(&address, self.peer_id), "listening");
                self.listen_addrs.push(address.clone());
                self.emit(NodeEvent::Listening(with_peer(&address, self.peer_id)));
            }
            SwarmEvent::ExpiredListenAddr { address, .. } => {
                self.listen_addrs.retain(|a| *a != address);
            }
            SwarmEvent::ConnectionEstablished {
                peer_id,
                num_established,
                endpoint,
                ..
            } => {
                if num_established.get() == 1 {
                    debug!(peer = %peer_id, addr = %endpoint.get_remote_address(), "connected");
                    self.emit(NodeEvent::PeerConnected(peer_id));
                }
                if self.synced.insert(peer_id) {
                    self.swarm.behaviour_mut().sync.send_request(
                        &peer_id,
                        SyncRequest {
                            max: MAX_SYNC_MESSAGES as u32,
                        },
                    );
                }
            }
            SwarmEvent::ConnectionClosed {
                peer_id,
                num_established: 0,
                ..
            } => {
                self.synced.remove(&peer_id);
                self.bad_sync.remove(&peer_id);
                debug!(peer = %peer_id, "disconnected");
                self.emit(NodeEvent::PeerDisconnected(peer_id));
            }
            SwarmEvent::Behaviour(ev) => self.on_behaviour_event(ev),
            _ => {}
        }
    }

    fn on_behaviour_event(&mut self, ev: BehaviourEvent) {
        match ev {
            BehaviourEvent::Gossipsub(gossipsub::Event::Message {
                propagation_source,
                message_id,
                message,
            }) => self.on_gossip(propagation_source, message_id, message),
            BehaviourEvent::Sync(request_response::Event::Message { peer, message, .. }) => {
                match message {
                    request_response::Message::Request {
                        request, channel, ..
                    } => {
                        let max = (request.max as usize).min(MAX_SYNC_MESSAGES);
                        #[allow(unused_mut)]
                        let mut messages = self.book.signed_messages(max);
                        #[cfg(feature = "testing")]
                        messages.extend(self.serve_in_sync.iter().cloned());
                        let resp = SyncResponse {
                            messages: crate::network::sync::fit(messages),
                        };
                        // Err: the peer went away; nothing to do.
                        let _ = self.swarm.behaviour_mut().sync.send_response(channel, resp);
                    }
                    request_response::Message::Response { response, .. } => {
                        self.on_sync_response(peer, response)
                    }
                }
            }
            // A peer subscribed: messages queued for lack of subscribers can go out now
            // rather than at the next retry tick.
            BehaviourEvent::Gossipsub(gossipsub::Event::Subscribed { .. })
                if !self.unpublished.is_empty() =>
            {
                self.retry_publish();
            }
            BehaviourEvent::Negotiate(ev) => self.on_negotiate_event(ev),
            BehaviourEvent::Job(ev) => self.on_job_event(ev),
            BehaviourEvent::Blob(ev) => self.on_blob_event(ev),
            BehaviourEvent::Settle(ev) => self.on_settle_event(ev),
            BehaviourEvent::Sync(request_response::Event::OutboundFailure {
                peer, error, ..
            }) => {
                debug!(%peer, %error, "book sync request failed");
            }
            BehaviourEvent::Identify(identify::Event::Received { peer_id, info, .. }) => {
                if info.protocols.contains(&crate::network::KAD_PROTOCOL) {
                    for a in &info.listen_addrs {
                        self.swarm
                            .behaviour_mut()
                            .kad
                            .add_address(&peer_id, a.clone());
                    }
                }
                if let Err(e) = self.store.put_peer_addrs(&peer_id, &info.listen_addrs) {
                    warn!(error = %e, "cannot store peer addresses");
                }
            }
            BehaviourEvent::Mdns(mdns::Event::Discovered(found)) => {
                for (peer, addr) in found {
                    if peer == self.peer_id {
                        continue;
                    }
                    self.swarm
                        .behaviour_mut()
                        .kad
                        .add_address(&peer, addr.clone());
                    if !self.swarm.is_connected(&peer) {
                        let _ = self.swarm.dial(addr);
                    }
                }
            }
            BehaviourEvent::Kad(kad::Event::OutboundQueryProgressed {
                result: kad::QueryResult::GetClosestPeers(Ok(ok)),
                ..
            }) => {
                debug!(found = ok.peers.len(), "random walk done");
            }
            _ => {}
        }
    }
}

/// Handlers of the direct job protocols.
impl NodeLoop {
    fn own_ask(&self, order_id: u64) -> Option<Ask> {
        match self.own.get(&order_id) {
            Some(OwnOrder::Ask(a)) => Some(Ask {
                region: self.settings.region.clone(),
                ..a.clone()
            }),
            _ => None,
        }
    }

    fn on_negotiate_event(&mut self, ev: request_response::Event<Propose, NegotiateReply>) {
        let Some((peer, request, channel)) =
            split_event(&mut self.pending_negotiate, ev, "proposal")
        else {
            return;
        };
        let ask = self.own_ask(request.ask.order_id);
        let reply = self.provider.on_propose(peer, request, ask);
        let _ = self
            .swarm
            .behaviour_mut()
            .negotiate
            .send_response(channel, reply);
    }

    fn on_job_event(&mut self, ev: request_response::Event<JobMessage, JobReply>) {
        let Some((peer, request, channel)) = split_event(&mut self.pending_job, ev, "job request")
        else {
            return;
        };
        let reply = match request {
            JobMessage::Dispatch(d) => match self.net() {
                Some(net) => self.provider.on_dispatch(peer, *d, &net),
                None => JobReply::Refused("the node is stopping".into()),
            },
            JobMessage::Await { agreement, seen } => {
                if let Some(answer) = self.provider.on_await(peer, agreement, seen, channel) {
                    self.answer(vec![answer]);
                }
                return;
            }
            JobMessage::Stream { agreement, seen } => {
                if let Some(answer) = self.provider.on_stream(peer, agreement, seen, channel) {
                    self.answer(vec![answer]);
                }
                return;
            }
            JobMessage::Countersign(cs) => self.provider.on_countersign(peer, cs),
            JobMessage::Dispute { agreement, reason } => {
                self.provider.on_dispute(peer, agreement, reason)
            }
        };
        let _ = self.swarm.behaviour_mut().job.send_response(channel, reply);
    }

    fn on_blob_event(&mut self, ev: request_response::Event<BlobRequest, BlobReply>) {
        let Some((peer, request, channel)) =
            split_event(&mut self.pending_blob, ev, "blob request")
        else {
            return;
        };
        let reply = match self.served.get(&request.id) {
            Some(bytes) if self.served_to.allows(&request.id, &peer) => chunk_of(bytes, &request),
            _ => self
                .provider
                .serve_blob(peer, &request)
                .unwrap_or(BlobReply::NotFound),
        };
        let _ = self
            .swarm
            .behaviour_mut()
            .blob
            .send_response(channel, reply);
    }
}

impl NodeLoop {
    fn on_settle_event(&mut self, ev: request_response::Event<SettleRequest, SettleReply>) {
        let Some((peer, request, channel)) =
            split_event(&mut self.pending_settle, ev, "settle request")
        else {
            return;
        };
        let Some(tx) = self.cmd_weak.upgrade() else {
            return;
        };
        let reply = self.settlement.on_request(peer, request, &Net { tx });
        let _ = self
            .swarm
            .behaviour_mut()
            .settle
            .send_response(channel, reply);
    }

    /// Starts a settlement pass unless one is still running.
    fn spawn_settle_pass(&mut self) {
        if self.settle_task.as_ref().is_some_and(|t| !t.is_finished()) {
            return;
        }
        let Some(tx) = self.cmd_weak.upgrade() else {
            return;
        };
        let s = self.settlement.clone();
        self.settle_task = Some(tokio::spawn(
            async move { s.pass(&Net { tx }).await }.in_current_span(),
        ));
    }
}

type Pending<T> = HashMap<request_response::OutboundRequestId, oneshot::Sender<Result<T, String>>>;

/// Routes responses and failures of this node's outbound requests to their waiting callers and
/// returns inbound requests for the caller to answer.
fn split_event<Req, Resp>(
    pending: &mut Pending<Resp>,
    ev: request_response::Event<Req, Resp>,
    what: &str,
) -> Option<(PeerId, Req, request_response::ResponseChannel<Resp>)> {
    match ev {
        request_response::Event::Message { peer, message, .. } => match message {
            request_response::Message::Request {
                request, channel, ..
            } => Some((peer, request, channel)),
            request_response::Message::Response {
                request_id,
                response,
            } => {
                if let Some(r) = pending.remove(&request_id) {
                    let _ = r.send(Ok(response));
                }
                None
            }
        },
        request_response::Event::OutboundFailure {
            request_id, error, ..
        } => {
            if let Some(r) = pending.remove(&request_id) {
                let e = match error {
                    request_response::OutboundFailure::DialFailure => {
                        format!("{UNREACHABLE}{error}")
                    }
                    _ => error.to_string(),
                };
                let _ = r.send(Err(e));
            }
            None
        }
        request_response::Event::InboundFailure { peer, error, .. } => {
            debug!(%peer, %error, "inbound {what} failed");
            None
        }
        request_response::Event::ResponseSent { .. } => None,
    }
}
