//! The libp2p side of the node: the composed behaviour, the gossipsub configuration and
//! peer-scoring parameters, and the `/hashgrid/sync/1` book-sync protocol.
//!
//! # Transports and protocols
//! TCP (dialling from fresh ports, see [`tcp`]) and QUIC (v1), noise, yamux; identify (`/hashgrid/id/1.0.0`), ping, Kademlia
//! (`/hashgrid/kad/1.0.0`: client mode unless the node is a seed, `NodeBuilder::dht_server`;
//! bootstrap peers plus a periodic random walk),
//! optional mDNS, connection limits, gossipsub and the sync request-response protocol.
//!
//! # Gossipsub
//! Two topics per network, `hashgrid/1/<network>/capacity` and `hashgrid/1/<network>/orders`.
//! Messages are **anonymous and content-addressed** (as Ethereum's consensus layer runs
//! gossipsub): no gossipsub-level author, sequence number or signature
//! ([`ValidationMode::Anonymous`](libp2p::gossipsub::ValidationMode::Anonymous)), and the
//! message id is the blake3 hash of the payload ([`message_id`]). Every payload is already a
//! signed envelope whose author the application checks; a second, gossipsub-level signature
//! cost one ed25519 signing per publish and one verification per *copy* received (a message
//! arrives from several mesh peers), which was the largest CPU cost of a network starting up.
//! Then `validate_messages()` (nothing is forwarded before the application accepted it), and
//! a transmit limit of
//! [`MAX_GOSSIP_BYTES`] plus [`GOSSIP_FRAME_OVERHEAD`], so messages a little over the
//! application limit still reach validation and cost their sender score.
//!
//! # Peer scoring (the parameters and why)
//! Order traffic is sparse (a site re-announces a handful of orders every few minutes), so the
//! delivery-rate components of gossipsub scoring would punish honest quiet peers; we score
//! almost only on *invalid messages*:
//!
//! | parameter | value | why |
//! |---|---|---|
//! | `topic_weight` | 1.0 | both topics matter equally |
//! | P1 `time_in_mesh_weight` / quantum / cap | 0.0027 / 1 s / 3600 | at most +10 after an hour in the mesh: a small bonus for long-lived peers that one burst of invalid messages still outweighs |
//! | P2 `first_message_deliveries_weight` / decay / cap | 0.5 / decay to 1% in 10 min / 20 | at most +10 for peers that bring us new valid orders first |
//! | P3, P3b (mesh delivery rate, mesh failure) | 0 (off) | sparse traffic: a quiet honest peer must not lose score |
//! | P4 `invalid_message_deliveries_weight` | -1.0 | applied to the *square* of the count: 1 invalid message costs 1 (a clock-skewed honest peer survives), 4 put a peer below the gossip threshold, 8 below the publish threshold, 9 graylist it |
//! | P4 `invalid_message_deliveries_decay` | decays to 1% in 1 hour | misbehaviour is remembered for a long time |
//! | P5 app-specific | weight 1.0; set to minus the square of the number of invalid messages a peer put in its `/hashgrid/sync/1` responses | a sync response is not gossip, so gossipsub cannot count its invalid entries; this makes poisoning the book through sync cost the same as through gossip |
//! | P6 IP colocation | -5.0 above 10 peers per IP, loopback whitelisted | a sybil farm on one address loses score; local tests and several nodes on one host are allowed |
//! | P7 behaviour penalty | -10.0 above 6, decay to 1% in 10 min | gossipsub protocol misbehaviour (e.g. broken promises) |
//! | thresholds gossip / publish / graylist | -10 / -50 / -80 | the libp2p defaults, matching the P4 steps above |
//! | accept PX / opportunistic graft | 10 / 5 | PX only from peers with a positive history |
//!
//! What the application reports: `Reject` (P4 penalty) for undecodable, oversized, forged,
//! wrong-network, structurally invalid, long-expired, lifetime-violating and replayed (older
//! sequence) messages, and messages on the wrong topic; `Ignore` (no penalty) for duplicates
//! (same sequence), messages that expired less than [`EXPIRED_GRACE_MS`] ago (an honest relay
//! can race the expiry), authors over the rate limit (the relay is not to blame) and a full
//! book.

pub mod delay;
pub mod exchange;
pub mod pending;
pub mod sync;
pub mod tcp;
pub mod validate;

pub use sync::{SyncCodec, SyncRequest, SyncResponse};

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::time::Duration;

use hashgrid_protocol::limits::MAX_GOSSIP_BYTES;
use libp2p::gossipsub::{self, PeerScoreParams, PeerScoreThresholds, TopicScoreParams};
use libp2p::request_response::{self, ProtocolSupport};
use libp2p::swarm::NetworkBehaviour;
use libp2p::swarm::behaviour::toggle::Toggle;
use libp2p::{StreamProtocol, connection_limits, identify, kad, mdns, ping};

/// Room for the gossipsub envelope (protobuf framing, topic, source, sequence number,
/// libp2p signature and key) around an application message of [`MAX_GOSSIP_BYTES`].
pub const GOSSIP_FRAME_OVERHEAD: usize = 4 * 1024;

/// Delay before the first gossipsub heartbeat. The libp2p default (5 s) leaves a fresh node
/// without a mesh for 5 s: messages it receives in that time are validated but forwarded to
/// nobody. 100 ms forms the mesh as soon as the first peers' subscriptions are known.
pub const HEARTBEAT_INITIAL_DELAY: Duration = Duration::from_millis(100);

/// How long after its expiry a message is *ignored* rather than *rejected*: an honest relay
/// may forward a message that expires while in flight. 10 s covers propagation and skew.
pub const EXPIRED_GRACE_MS: u64 = 10_000;

/// Most connections in total. A site node talks to a few dozen peers; 256 leaves room for
/// buyers while bounding file descriptors and memory.
pub const MAX_ESTABLISHED_CONNECTIONS: u32 = 256;

/// Most connections to one peer (one TCP and one QUIC during a transport switch).
pub const MAX_CONNECTIONS_PER_PEER: u32 = 2;

/// Most half-open connections in each direction: bounds the cost of a dial or SYN flood.
pub const MAX_PENDING_CONNECTIONS: u32 = 64;

/// A connection with no protocol activity is closed after this long. Gossipsub keeps mesh
/// connections busy; this only closes connections opened for a one-off lookup.
pub const IDLE_CONNECTION_TIMEOUT: Duration = Duration::from_secs(60);

/// Most signed messages in one `/hashgrid/sync/1` response: the whole book of a network of a
/// few thousand sites fits; a larger book is synced over the following re-announcements.
pub const MAX_SYNC_MESSAGES: usize = 8192;

/// Largest `/hashgrid/sync/1` response: one direct message
/// ([`MAX_DIRECT_MESSAGE_BYTES`](hashgrid_protocol::limits::MAX_DIRECT_MESSAGE_BYTES)), about a
/// thousand typical (~1 KiB) orders. A responder sends what fits ([`sync::fit`]); a larger
/// book reaches a new peer through the following re-announcements.
pub const MAX_SYNC_RESPONSE_BYTES: u64 = hashgrid_protocol::limits::MAX_DIRECT_MESSAGE_BYTES as u64;

/// Largest `/hashgrid/sync/1` request (it is a tiny struct).
pub const MAX_SYNC_REQUEST_BYTES: u64 = 1024;

/// How long a sync request may take before it is abandoned.
pub const SYNC_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The Kademlia protocol of hashgrid networks (separate from the public IPFS DHT).
pub const KAD_PROTOCOL: StreamProtocol = StreamProtocol::new("/hashgrid/kad/1.0.0");

/// The book-sync protocol.
pub const SYNC_PROTOCOL: StreamProtocol = StreamProtocol::new("/hashgrid/sync/1");

/// The negotiation protocol (propose → agreement or reject).
pub const NEGOTIATE_PROTOCOL: StreamProtocol = StreamProtocol::new("/hashgrid/negotiate/1");

/// The job protocol (dispatch, progress, receipt).
pub const JOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/hashgrid/job/1");

/// The blob protocol (chunked transfer of inputs and outputs by blake3 id).
pub const BLOB_PROTOCOL: StreamProtocol = StreamProtocol::new("/hashgrid/blob/1");

/// The settlement protocol (invoices, payment proofs, settlement notices).
pub const SETTLE_PROTOCOL: StreamProtocol = StreamProtocol::new("/hashgrid/settle/1");

/// How long a settlement request may take (answered from local state).
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(20);

/// How long a proposal may take (the provider answers at once: it validates and signs).
pub const NEGOTIATE_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a job request may take. A long poll ([`hashgrid_protocol::exchange::JobMessage::Await`])
/// is answered within [`AWAIT_HOLD`], well inside this.
pub const JOB_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How long a provider holds a long poll before answering with the unchanged status.
pub const AWAIT_HOLD: Duration = Duration::from_secs(10);

/// How long one blob chunk may take (512 KiB even over a slow link).
pub const BLOB_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The codec of `/hashgrid/negotiate/1`.
pub type NegotiateCodec = exchange::ExchangeCodec<
    hashgrid_protocol::exchange::Propose,
    hashgrid_protocol::exchange::NegotiateReply,
    { hashgrid_protocol::exchange::MAX_NEGOTIATE_REQUEST },
    { hashgrid_protocol::exchange::MAX_NEGOTIATE_REPLY },
>;

/// The codec of `/hashgrid/job/1`.
pub type JobCodec = exchange::ExchangeCodec<
    hashgrid_protocol::exchange::JobMessage,
    hashgrid_protocol::exchange::JobReply,
    { hashgrid_protocol::exchange::MAX_JOB_REQUEST },
    { hashgrid_protocol::exchange::MAX_JOB_REPLY },
>;

/// The codec of `/hashgrid/blob/1`.
pub type BlobCodec = exchange::ExchangeCodec<
    hashgrid_protocol::exchange::BlobRequest,
    hashgrid_protocol::exchange::BlobReply,
    { hashgrid_protocol::exchange::MAX_BLOB_REQUEST },
    { hashgrid_protocol::exchange::MAX_BLOB_REPLY },
>;

/// The codec of `/hashgrid/settle/1`.
pub type SettleCodec = exchange::ExchangeCodec<
    hashgrid_protocol::exchange::SettleRequest,
    hashgrid_protocol::exchange::SettleReply,
    { hashgrid_protocol::exchange::MAX_SETTLE_REQUEST },
    { hashgrid_protocol::exchange::MAX_SETTLE_REPLY },
>;

/// Most `/hashgrid/sync/1` streams open at once on one connection (both directions).
pub const MAX_SYNC_STREAMS: usize = 8;

/// Most `/hashgrid/negotiate/1` streams open at once on one connection: a buyer proposes to
/// one provider for each of its jobs being placed.
pub const MAX_NEGOTIATE_STREAMS: usize = 64;

/// Most `/hashgrid/job/1` streams open at once on one connection: a buyer parks a status long
/// poll and a stream long poll for each of its jobs at the provider.
pub const MAX_JOB_STREAMS: usize = 256;

/// Most `/hashgrid/blob/1` streams open at once on one connection:
/// [`BLOB_WINDOW`](crate::jobs::BLOB_WINDOW) chunks for each of 32 transfers.
pub const MAX_BLOB_STREAMS: usize = 128;

/// Most `/hashgrid/settle/1` streams open at once on one connection.
pub const MAX_SETTLE_STREAMS: usize = 32;

/// The identify protocol version string.
pub const IDENTIFY_PROTOCOL: &str = "/hashgrid/id/1.0.0";

/// How long an inbound or outbound connection may take to finish its TCP handshake
/// (multistream, noise, yamux: about four round trips, 2.4 s over a 600 ms satellite link to a
/// remote site), while every pending connection holds one of [`MAX_PENDING_CONNECTIONS`]
/// slots until it ends.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// The composed libp2p behaviour.
#[derive(NetworkBehaviour)]
pub(crate) struct Behaviour {
    /// First, so that a host over its allowance is refused before any other behaviour counts
    /// the connection.
    pub(crate) per_ip: pending::PendingPerIp,
    pub(crate) limits: connection_limits::Behaviour,
    pub(crate) gossipsub: gossipsub::Behaviour,
    pub(crate) kad: kad::Behaviour<kad::store::MemoryStore>,
    pub(crate) identify: identify::Behaviour,
    pub(crate) ping: ping::Behaviour,
    pub(crate) mdns: Toggle<mdns::tokio::Behaviour>,
    pub(crate) sync: request_response::Behaviour<SyncCodec>,
    pub(crate) negotiate: request_response::Behaviour<NegotiateCodec>,
    pub(crate) job: request_response::Behaviour<JobCodec>,
    pub(crate) blob: request_response::Behaviour<BlobCodec>,
    pub(crate) settle: request_response::Behaviour<SettleCodec>,
}

/// Settings the behaviour is built from.
pub(crate) struct BehaviourSettings {
    pub(crate) heartbeat: Duration,
    pub(crate) mdns: bool,
    /// Answer Kademlia queries (a seed), or only ask them.
    pub(crate) dht_server: bool,
    /// Shared by the codecs of every request-response protocol.
    pub(crate) inbound: std::sync::Arc<exchange::InboundBudget>,
}

impl Behaviour {
    pub(crate) fn new(
        key: &libp2p::identity::Keypair,
        settings: &BehaviourSettings,
    ) -> Result<Behaviour, String> {
        let peer_id = key.public().to_peer_id();
        let gossip_config =
            gossip_config(settings.heartbeat).map_err(|e| format!("gossipsub config: {e}"))?;
        let gossipsub =
            gossipsub::Behaviour::new(gossipsub::MessageAuthenticity::Anonymous, gossip_config)
                .map_err(|e| format!("gossipsub: {e}"))?;

        let mut kad_config = kad::Config::new(KAD_PROTOCOL);
        // The node runs its own random walk (see `KAD_WALK_INTERVAL` in the node loop).
        kad_config.set_periodic_bootstrap_interval(None);
        let mut kad =
            kad::Behaviour::with_config(peer_id, kad::store::MemoryStore::new(peer_id), kad_config);
        // DHT servers are set explicitly (a seed's operator says so; without it, nodes that
        // have not confirmed an external address, e.g. on loopback, would not answer either).
        // Everyone else is a client: it asks the servers for peers but is not asked, so a
        // network of clients does not turn every lookup into a connection to every node.
        kad.set_mode(Some(if settings.dht_server {
            kad::Mode::Server
        } else {
            kad::Mode::Client
        }));

        let mdns = if settings.mdns {
            Some(
                mdns::tokio::Behaviour::new(mdns::Config::default(), peer_id)
                    .map_err(|e| format!("mdns: {e}"))?,
            )
        } else {
            None
        };

        let budget = &settings.inbound;
        let direct = |p: StreamProtocol, timeout: Duration, streams: usize| {
            (
                [(p, ProtocolSupport::Full)],
                request_response::Config::default()
                    .with_request_timeout(timeout)
                    .with_max_concurrent_streams(streams),
            )
        };
        let (p, c) = direct(SYNC_PROTOCOL, SYNC_REQUEST_TIMEOUT, MAX_SYNC_STREAMS);
        let sync = request_response::Behaviour::with_codec(SyncCodec::new(budget.clone()), p, c);
        let (p, c) = direct(NEGOTIATE_PROTOCOL, NEGOTIATE_TIMEOUT, MAX_NEGOTIATE_STREAMS);
        let negotiate =
            request_response::Behaviour::with_codec(NegotiateCodec::new(budget.clone()), p, c);
        let (p, c) = direct(JOB_PROTOCOL, JOB_REQUEST_TIMEOUT, MAX_JOB_STREAMS);
        let job = request_response::Behaviour::with_codec(JobCodec::new(budget.clone()), p, c);
        let (p, c) = direct(BLOB_PROTOCOL, BLOB_REQUEST_TIMEOUT, MAX_BLOB_STREAMS);
        let blob = request_response::Behaviour::with_codec(BlobCodec::new(budget.clone()), p, c);
        let (p, c) = direct(SETTLE_PROTOCOL, SETTLE_TIMEOUT, MAX_SETTLE_STREAMS);
        let settle =
            request_response::Behaviour::with_codec(SettleCodec::new(budget.clone()), p, c);

        Ok(Behaviour {
            per_ip: pending::PendingPerIp::default(),
            limits: connection_limits::Behaviour::new(
                connection_limits::ConnectionLimits::default()
                    .with_max_established(Some(MAX_ESTABLISHED_CONNECTIONS))
                    .with_max_established_per_peer(Some(MAX_CONNECTIONS_PER_PEER))
                    .with_max_pending_incoming(Some(MAX_PENDING_CONNECTIONS))
                    .with_max_pending_outgoing(Some(MAX_PENDING_CONNECTIONS)),
            ),
            gossipsub,
            kad,
            identify: identify::Behaviour::new(
                identify::Config::new(IDENTIFY_PROTOCOL.into(), key.public())
                    .with_agent_version(format!("hashgrid-node/{}", env!("CARGO_PKG_VERSION"))),
            ),
            ping: ping::Behaviour::default(),
            mdns: Toggle::from(mdns),
            sync,
            negotiate,
            job,
            blob,
            settle,
        })
    }
}

/// A gossip message's id: the blake3 hash of its payload (docs/PROTOCOL.md, "Gossip"). The
/// same signed envelope is the same message whoever relays it; a re-announcement is a new
/// envelope (a new sequence number), so a new message.
pub fn message_id(m: &gossipsub::Message) -> gossipsub::MessageId {
    gossipsub::MessageId::new(blake3::hash(&m.data).as_bytes())
}

/// The gossipsub configuration (see the module docs). The message id is gossipsub's default,
/// documented in docs/PROTOCOL.md for other implementations: the source's PeerId in base58
/// followed by the sequence number in decimal.
pub fn gossip_config(
    heartbeat: Duration,
) -> Result<gossipsub::Config, gossipsub::ConfigBuilderError> {
    gossipsub::ConfigBuilder::default()
        .heartbeat_interval(heartbeat)
        .heartbeat_initial_delay(HEARTBEAT_INITIAL_DELAY.min(heartbeat))
        .validation_mode(gossipsub::ValidationMode::Anonymous)
        .message_id_fn(message_id)
        .validate_messages()
        .max_transmit_size(MAX_GOSSIP_BYTES + GOSSIP_FRAME_OVERHEAD)
        .build()
}

fn decay(over: Duration, decay_interval: Duration) -> f64 {
    // The per-interval factor that takes a counter to 1% over `over`.
    let ticks = over.as_secs_f64() / decay_interval.as_secs_f64();
    0.01f64.powf(1.0 / ticks.max(1.0))
}

/// The topic scoring parameters (see the module docs for the reasoning).
pub fn topic_score_params() -> TopicScoreParams {
    let interval = Duration::from_secs(1);
    TopicScoreParams {
        topic_weight: 1.0,
        time_in_mesh_weight: 0.0027,
        time_in_mesh_quantum: Duration::from_secs(1),
        time_in_mesh_cap: 3600.0,
        first_message_deliveries_weight: 0.5,
        first_message_deliveries_decay: decay(Duration::from_secs(600), interval),
        first_message_deliveries_cap: 20.0,
        mesh_message_deliveries_weight: 0.0,
        mesh_failure_penalty_weight: 0.0,
        invalid_message_deliveries_weight: -1.0,
        invalid_message_deliveries_decay: decay(Duration::from_secs(3600), interval),
        ..TopicScoreParams::default()
    }
}

/// The peer scoring parameters and thresholds for `topics` (see the module docs).
pub fn peer_score_params(
    topics: &[gossipsub::TopicHash],
) -> (PeerScoreParams, PeerScoreThresholds) {
    let interval = Duration::from_secs(1);
    let whitelist: HashSet<IpAddr> = [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ]
    .into_iter()
    .collect();
    let params = PeerScoreParams {
        topics: topics
            .iter()
            .map(|t| (t.clone(), topic_score_params()))
            .collect(),
        topic_score_cap: 20.0,
        app_specific_weight: 1.0,
        ip_colocation_factor_weight: -5.0,
        ip_colocation_factor_threshold: 10.0,
        ip_colocation_factor_whitelist: whitelist,
        behaviour_penalty_weight: -10.0,
        behaviour_penalty_threshold: 6.0,
        behaviour_penalty_decay: decay(Duration::from_secs(600), interval),
        decay_interval: interval,
        decay_to_zero: 0.01,
        retain_score: Duration::from_secs(3600),
        ..PeerScoreParams::default()
    };
    let thresholds = PeerScoreThresholds {
        gossip_threshold: -10.0,
        publish_threshold: -50.0,
        graylist_threshold: -80.0,
        accept_px_threshold: 10.0,
        opportunistic_graft_threshold: 5.0,
    };
    (params, thresholds)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gossip_message_ids_are_the_documented_function() {
        // docs/PROTOCOL.md, "Gossip": the blake3 hash of the payload, 32 raw bytes.
        let cfg = gossip_config(Duration::from_secs(1)).unwrap();
        let msg = gossipsub::Message {
            source: None,
            data: b"an encoded GossipMessage".to_vec(),
            sequence_number: None,
            topic: gossipsub::TopicHash::from_raw("hashgrid/1/test/orders"),
        };
        let id = cfg.message_id(&msg);
        assert_eq!(id.0, blake3::hash(b"an encoded GossipMessage").as_bytes());
        // The id is the payload's alone: relayed by anyone, the same envelope is the same
        // message; other bytes are another message.
        let relayed = gossipsub::Message {
            source: Some(libp2p::PeerId::random()),
            sequence_number: Some(7),
            ..msg.clone()
        };
        assert_eq!(cfg.message_id(&relayed), id);
        let other = gossipsub::Message {
            data: b"other bytes".to_vec(),
            ..msg.clone()
        };
        assert_ne!(cfg.message_id(&other), id);
    }

    #[test]
    fn score_params_are_accepted_by_gossipsub() {
        let topics = [gossipsub::IdentTopic::new("t").hash()];
        let (p, t) = peer_score_params(&topics);
        p.validate().unwrap();
        t.validate().unwrap();
        topic_score_params().validate().unwrap();
    }
}
