//! [`Node`] and [`NodeBuilder`]: every setting with its default.

use std::path::PathBuf;
use std::time::Duration;

use hashgrid_protocol::{GpuProfile, Keypair, Network, SettlementMethod};
use libp2p::Multiaddr;

use crate::executor::Executor;
use crate::settle::SettlementConfig;
use hashgrid_protocol::ContentId;

use super::settings::{
    DEFAULT_HEARTBEAT, DEFAULT_KAD_WALK_INTERVAL, DEFAULT_ORDER_TTL, DEFAULT_SWEEP_INTERVAL,
    DEFAULT_TARGET_PEERS,
};

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
/// println!("{:?}", node.peers().listen_addrs().await?);
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

/// Configures and starts a node. Every setting has a documented default.
#[derive(Debug, Clone)]
pub struct NodeBuilder {
    pub(super) network: Network,
    pub(super) data_dir: Option<PathBuf>,
    pub(super) input_cache: (u64, u64),
    pub(super) preload: Vec<(ContentId, Vec<u8>)>,
    pub(super) preload_models: Vec<hashgrid_protocol::ModelManifest>,
    pub(super) keypair: Option<Keypair>,
    pub(super) listen: Vec<Multiaddr>,
    pub(super) bootstrap: Vec<Multiaddr>,
    pub(super) region: String,
    pub(super) mdns: bool,
    pub(super) gpus: Vec<GpuProfile>,
    pub(super) units: u32,
    pub(super) settlement: Vec<SettlementMethod>,
    pub(super) order_ttl: Duration,
    pub(super) heartbeat: Duration,
    pub(super) sweep_interval: Duration,
    pub(super) kad_walk_interval: Duration,
    pub(super) dht_server: bool,
    pub(super) target_peers: usize,
    pub(super) executor: Option<Executor>,
    pub(super) down_for: Duration,
    pub(super) settle: SettlementConfig,
    pub(super) link_delays: std::sync::Arc<crate::network::delay::LinkDelays>,
    #[cfg(feature = "testing")]
    pub(super) lie: Option<crate::jobs::Lie>,
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
            preload_models: Vec::new(),
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
            dht_server: false,
            target_peers: DEFAULT_TARGET_PEERS,
            executor: None,
            down_for: crate::jobs::DEFAULT_DOWN_FOR,
            settle: SettlementConfig::default(),
            link_delays: std::sync::Arc::default(),
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
        self.preload.extend(blobs);
        self
    }

    /// A model's weight blobs, in the compiler's order, to put in the input cache at start:
    /// as [`preload_inputs`](Self::preload_inputs), and the first capacity ad lists the
    /// model's id ([`ModelManifest::id`](hashgrid_protocol::ModelManifest::id)), so bids
    /// naming the model prefer this site.
    pub fn preload_model(mut self, blobs: Vec<(ContentId, Vec<u8>)>) -> Self {
        let manifest = hashgrid_protocol::ModelManifest::new(
            blobs.iter().map(|(id, b)| (*id, b.len() as u64)),
        );
        self.preload_models.push(manifest);
        self.preload.extend(blobs);
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
    /// (default [`DEFAULT_ORDER_TTL`], at least [`MIN_ORDER_TTL`](crate::node::MIN_ORDER_TTL)).
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

    /// Answers Kademlia queries (default: no). A seed that others bootstrap from serves the
    /// DHT; other nodes only ask it. When every node served it, each node's lookups reached
    /// every other node, so a network that starts together opened a connection between every
    /// pair (1,046 among 42 nodes in the testnet, most of the CPU of its start).
    pub fn dht_server(mut self, serve: bool) -> Self {
        self.dht_server = serve;
        self
    }

    /// How many peers the node keeps connected, dialling sites from their capacity ads while
    /// it has fewer (default [`DEFAULT_TARGET_PEERS`]; 0 turns it off).
    pub fn target_peers(mut self, n: usize) -> Self {
        self.target_peers = n;
        self
    }

    /// Serves jobs on this executor: the node answers proposals against its own asks and runs
    /// dispatched jobs (default: none, the node rejects proposals).
    pub fn executor(mut self, exec: Executor) -> Self {
        self.executor = Some(exec);
        self
    }

    /// Emulated latency on the TCP connections this node dials to the addresses listed (see
    /// [`crate::network::delay`]): for measuring a grid across regions on one machine.
    pub fn link_delays(mut self, delays: crate::network::delay::LinkDelays) -> Self {
        self.link_delays = std::sync::Arc::new(delays);
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
}
