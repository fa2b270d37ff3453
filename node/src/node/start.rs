//! [`NodeBuilder::start`]: opens the store, builds the swarm, listens, dials, and spawns the swarm task.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use futures::StreamExt;
use hashgrid_protocol::Keypair;
use libp2p::gossipsub::IdentTopic;
use libp2p::multiaddr::Protocol;
use libp2p::swarm::SwarmEvent;
use libp2p::{Multiaddr, noise, tcp, yamux};
use tokio::sync::{broadcast, mpsc};
use tracing::{Instrument, info, info_span, warn};

use crate::DataDir;
use crate::error::StartError;
use crate::event::NodeEvent;
use crate::jobs::provider::Provider;
use crate::jobs::service::{PROVIDER_QUEUE, Queues};
use crate::jobs::{JobRecord, JobState};
use crate::network::validate::Validator;
use crate::network::{Behaviour, BehaviourSettings, peer_score_params};
use crate::settle::Settlement;
use crate::store::{JobTree, OwnOrder, Store, StoreSlot};
use hashgrid_protocol::ContentId;

use super::addr::{dial_addr, dial_known, short_peer, with_peer};
use super::builder::NodeBuilder;
use super::handle::{Inner, NodeHandle};
use super::settings::{COMMAND_QUEUE, EVENT_QUEUE, INTERNAL_QUEUE, LISTEN_TIMEOUT, MIN_ORDER_TTL};
use super::state::{NodeLoop, Redial};

impl NodeBuilder {
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
        let libp2p_key = key.to_libp2p();
        let peer_id = libp2p_key.public().to_peer_id();
        let span = info_span!("node", peer = %short_peer(&peer_id));
        let inbound = Arc::new(crate::network::exchange::InboundBudget::default());
        let lag = Arc::new(super::lag::LoopLag::default());
        let metrics = Arc::new(crate::ops::Metrics::new(&crate::ops::NodeIdentity {
            peer_id: peer_id.to_string(),
            region: self.region.clone(),
            network: self.network.to_string(),
            settlement: match self.settle.mode {
                crate::settle::SettleMode::Ledger => "ledger",
                crate::settle::SettleMode::Onchain(_) => "onchain",
                crate::settle::SettleMode::Lightning(_) => "lightning",
            },
        }));
        if let Some(exec) = &self.executor {
            metrics.set_adapter(&exec.profile().name);
        }
        let settings = BehaviourSettings {
            heartbeat: self.heartbeat,
            mdns: self.mdns,
            dht_server: self.dht_server,
            inbound: inbound.clone(),
        };
        let link_delays = self.link_delays.clone();
        let mut swarm = libp2p::SwarmBuilder::with_existing_identity(libp2p_key)
            .with_tokio()
            .with_quic()
            // TCP with noise and yamux, as `with_tcp` builds it, plus a handshake timeout
            // (`with_tcp` has none of its own: a silent socket would hold a slot until the
            // peer gave up), dialling from fresh ports (`network::tcp`).
            .with_other_transport(|key| {
                use libp2p::Transport as _;
                let noise = noise::Config::new(key)
                    .map_err(Box::<dyn std::error::Error + Send + Sync>::from)?;
                Ok(crate::network::tcp::FreshPortTcp::with_delays(
                    tcp::Config::default().nodelay(true),
                    link_delays,
                )
                .upgrade(libp2p::core::upgrade::Version::V1Lazy)
                .authenticate(noise)
                .multiplex(yamux::Config::default())
                .timeout(crate::network::HANDSHAKE_TIMEOUT))
            })
            .map_err(|e| StartError::Network(format!("tcp: {e}")))?
            .with_behaviour(|k| {
                Behaviour::new(k, &settings)
                    .map_err(Box::<dyn std::error::Error + Send + Sync>::from)
            })
            .map_err(|e| StartError::Network(e.to_string()))?
            .with_swarm_config(|c| {
                c.with_idle_connection_timeout(crate::network::IDLE_CONNECTION_TIMEOUT)
                    // A substream that proposes one protocol (every request-response
                    // exchange) sends its request with the proposal instead of waiting a
                    // round trip for the answer: across regions each exchange cost two
                    // round trips instead of one (docs/PERFORMANCE.md, regional latency).
                    .with_substream_upgrade_protocol_override(
                        libp2p::core::upgrade::Version::V1Lazy,
                    )
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
        span.in_scope(|| dial_known(&mut swarm, peer_id, known));

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
        for m in std::mem::take(&mut self.preload_models) {
            match m.validate() {
                Ok(()) => inputs.learn_model(m),
                Err(e) => warn!(error = %e, "a preloaded model's manifest is invalid; not listed"),
            }
        }
        let inputs = Arc::new(inputs);
        let mut provider = Provider::new(
            crate::jobs::provider::Runs {
                executor: self.executor.clone(),
                inputs: inputs.clone(),
                metrics: metrics.clone(),
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
            if rec.state.is_terminal() {
                continue;
            }
            rec.state = if rec.receipt.is_some() {
                // Verified and countersigned before the stop: done.
                JobState::Done
            } else {
                JobState::Failed {
                    kind: crate::jobs::FailKind::Interrupted,
                    reason: "this node stopped before the job finished; submit it again".into(),
                }
            };
            store.put(JobTree::BuyerJobs, rec.id.as_bytes(), &rec)?;
            store.push_event(&crate::event::DurableEvent::JobEnded {
                job: rec.id,
                state: rec.state.clone(),
                provider: rec.provider,
            })?;
        }
        store.flush()?;
        // This node's experience of providers, as a buyer (ranks its jobs).
        let reputation = Arc::new(crate::jobs::reputation::Reputations::load(&store)?);
        // The provider answers on its own thread (see `jobs::service`).
        let (provider_tx, provider_rx) = mpsc::channel(PROVIDER_QUEUE);
        let (responses_tx, responses_rx) = mpsc::channel(PROVIDER_QUEUE);
        let provider_done = crate::jobs::service::spawn(
            provider,
            Queues {
                requests: provider_rx,
                internal: internal_rx,
                responses: responses_tx.clone(),
                commands: cmd_tx.downgrade(),
            },
            self.sweep_interval,
            span.clone(),
        )
        .map_err(|e| StartError::Network(format!("cannot start the provider thread: {e}")))?;
        let mut state = NodeLoop {
            swarm,
            key: key.clone(),
            public: key.public(),
            peer_id,
            network: self.network.clone(),
            store,
            book: hashgrid_market::GossipBook::new(),
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
            provider: Some(provider_tx),
            responses: responses_rx,
            responses_tx,
            reputation: reputation.clone(),
            provider_done: Some(provider_done),
            inputs: inputs.clone(),
            warm_announced: Default::default(),
            cmd_weak: cmd_tx.downgrade(),
            placing: 0,
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
            lag: lag.clone(),
            metrics: metrics.clone(),
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
                reputation,
                inputs,
                inbound,
                lag,
                metrics,
            }),
        })
    }
}

/// libp2p's TCP listeners set `SO_REUSEPORT`, so a second node could silently share a port
/// with the first (and the kernel would split connections between them). Binding the port
/// once without it first turns that into a clear [`StartError::AddrInUse`].
pub(super) fn probe_port(addr: &Multiaddr) -> Result<(), StartError> {
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

pub(super) fn listen_error(
    addr: &Multiaddr,
    e: &libp2p::TransportError<std::io::Error>,
) -> StartError {
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
