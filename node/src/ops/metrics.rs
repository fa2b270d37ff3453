//! The node's Prometheus metrics ([`Metrics`]): counters the node's tasks increment where things
//! happen (a receipt signed, a proposal refused, a gossip message judged), gauges read at each
//! scrape from the swarm task and the store, and libp2p's own metrics (`libp2p_*`, through
//! libp2p-metrics). Rendered in the OpenMetrics text format, which Prometheus scrapes.
//!
//! Every label has a bounded set of values (reasons are enum names, never free text; the
//! adapter and settlement method are fixed per node), so a node's series count stays small
//! whatever its peers send.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use hashgrid_protocol::exchange::RejectReason;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

/// One label pair; label sets are short vectors of these.
type Labels = Vec<(&'static str, String)>;

fn label(k: &'static str, v: impl Into<String>) -> Labels {
    vec![(k, v.into())]
}

/// What identifies a node in its `hashgrid_node_info` series.
#[derive(Debug, Clone)]
pub struct NodeIdentity {
    /// Its libp2p PeerId.
    pub peer_id: String,
    /// Its region.
    pub region: String,
    /// The network it joined.
    pub network: String,
    /// How it settles (`ledger` or `onchain`): the `method` label of money metrics.
    pub settlement: &'static str,
}

/// Gauges refreshed at each scrape (see [`Metrics::set_gauges`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GaugeReadings {
    /// Live asks in the book.
    pub book_asks: u64,
    /// Live bids in the book.
    pub book_bids: u64,
    /// Providers with a live capacity ad.
    pub book_providers: u64,
    /// Connected peers.
    pub peers: u64,
    /// Peers in this node's gossip mesh.
    pub gossip_peers: u64,
    /// Requests waiting in the provider service's queue.
    pub provider_queue: u64,
    /// Bytes the store takes on disk.
    pub store_bytes: u64,
    /// Input cache: bytes on disk and in memory.
    pub cache_disk_bytes: u64,
    /// See `cache_disk_bytes`.
    pub cache_mem_bytes: u64,
    /// Models the input cache holds whole.
    pub models_held: u64,
    /// Longest stall of the swarm task so far, in microseconds.
    pub swarm_max_stall_us: u64,
    /// Buyers' debts to this node by state (accrued, invoiced, paid, confirmed, settled).
    pub owed_to_us_msat: [u64; 5],
    /// What this node owes its providers for countersigned receipts.
    pub owed_by_us_msat: u64,
    /// Its Lightning node, in lightning mode.
    pub lightning: Option<LightningReadings>,
}

/// A Lightning node's figures at a scrape.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LightningReadings {
    /// Channels payments can use now.
    pub channels_usable: u64,
    /// Channels opening, closing, or with the peer away.
    pub channels_other: u64,
    /// What it could send now over usable channels, msat.
    pub outbound_msat: u64,
    /// What it could receive now, msat.
    pub inbound_msat: u64,
    /// Its on-chain wallet (funds channels, receives closes), sats.
    pub onchain_sat: u64,
}

/// The `protocol` label of refusals counted across every request protocol.
const ANY_PROTOCOL: &str = "any";

/// Names of [`GaugeReadings::owed_to_us_msat`]'s states, in order.
pub const DEBT_STATES: [&str; 5] = ["accrued", "invoiced", "paid", "confirmed", "settled"];

/// The node's metrics. Counters are atomics: incrementing one costs a few nanoseconds and
/// takes no lock the swarm task waits on.
pub struct Metrics {
    registry: Registry,
    identity: NodeIdentity,
    method: &'static str,
    adapter: std::sync::OnceLock<String>,
    // Provider.
    proposals: Family<Labels, Counter>,
    jobs: Family<Labels, Counter>,
    jobs_now: Family<Labels, Gauge>,
    units_total: Gauge,
    units_busy: Gauge,
    receipts: Counter,
    countersigned: Counter,
    charged_msat: Counter,
    earned_msat: Family<Labels, Counter>,
    gpu_busy: Family<Labels, Counter<f64, AtomicU64>>,
    job_gpu_seconds: Histogram,
    tokens: Counter,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_hit_bytes: Counter,
    cache_fetched_bytes: Counter,
    resident_hits: Counter,
    resident_bytes: Counter,
    // Buyer.
    buyer_jobs: Family<Labels, Counter>,
    spent_msat: Family<Labels, Counter>,
    verifications: Family<Labels, Counter>,
    evidence: Family<Labels, Counter>,
    // Network.
    gossip: Family<Labels, Counter>,
    refused: Family<Labels, Counter>,
    /// The inbound budget's refusals already counted in `refused`.
    inbound_seen: AtomicU64,
    // Read at scrape.
    book_orders: Family<Labels, Gauge>,
    book_providers: Gauge,
    peers: Gauge,
    gossip_peers: Gauge,
    queue: Gauge,
    store_bytes: Gauge,
    cache_bytes: Family<Labels, Gauge>,
    models_held: Gauge,
    swarm_stall: Gauge,
    debts: Family<Labels, Gauge>,
    owed_by_us: Gauge,
    ln_channels: Family<Labels, Gauge>,
    ln_capacity: Family<Labels, Gauge>,
    ln_onchain: Family<Labels, Gauge>,
    libp2p: libp2p::metrics::Metrics,
    activity: super::activity::Activity,
}

/// Snake-case name of a refusal reason (a label value).
pub fn reject_reason_label(r: &RejectReason) -> &'static str {
    match r {
        RejectReason::UnknownAsk => "unknown_ask",
        RejectReason::NoCapacity => "no_capacity",
        RejectReason::Terms => "terms",
        RejectReason::BadBid => "bad_bid",
        RejectReason::InvalidJob => "invalid_job",
        RejectReason::CreditLimit => "credit_limit",
        RejectReason::NotAProvider => "not_a_provider",
        _ => "other",
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Metrics")
            .field("identity", &self.identity)
            .finish_non_exhaustive()
    }
}

impl Metrics {
    /// Registers every metric of a node with identity `id`.
    pub fn new(id: &NodeIdentity) -> Metrics {
        let mut registry = Registry::default();
        let info = Info::new(vec![
            ("peer_id", id.peer_id.clone()),
            ("region", id.region.clone()),
            ("network", id.network.clone()),
            ("version", env!("CARGO_PKG_VERSION").to_string()),
        ]);
        // libp2p-metrics names its own (`libp2p_*`).
        let libp2p = libp2p::metrics::Metrics::new(&mut registry);
        let r = registry.sub_registry_with_prefix("hashgrid");
        r.register("node", "This node's identity", info);

        fn reg<M: prometheus_client::registry::Metric + Clone>(
            r: &mut Registry,
            name: &str,
            help: &str,
            m: M,
        ) -> M {
            r.register(name, help, m.clone());
            m
        }
        fn reg_unit<M: prometheus_client::registry::Metric + Clone>(
            r: &mut Registry,
            name: &str,
            help: &str,
            unit: Unit,
            m: M,
        ) -> M {
            r.register_with_unit(name, help, unit, m.clone());
            m
        }
        let msat = || Unit::Other("msat".into());
        let proposals = reg(
            r,
            "provider_proposals",
            "Proposals answered, by outcome (agreed, or the refusal's reason)",
            Family::default(),
        );
        let jobs = reg(
            r,
            "provider_jobs",
            "Jobs this provider finished, by outcome (done, failed, disputed)",
            Family::default(),
        );
        let jobs_now = reg(
            r,
            "provider_jobs_in_state",
            "Jobs this provider holds now, by state (reserved, accepted, fetching, running)",
            Family::default(),
        );
        let units_total = reg(
            r,
            "provider_units",
            "GPU units this provider sells",
            Gauge::default(),
        );
        let units_busy = reg(
            r,
            "provider_units_busy",
            "GPU units reserved or running jobs now",
            Gauge::default(),
        );
        let receipts = reg(
            r,
            "provider_receipts",
            "Receipts signed",
            Counter::default(),
        );
        let countersigned = reg(
            r,
            "provider_receipts_countersigned",
            "Receipts the buyer countersigned",
            Counter::default(),
        );
        let charged_msat = reg_unit(
            r,
            "provider_charged",
            "Charges of the receipts signed",
            msat(),
            Counter::default(),
        );
        let earned_msat = reg_unit(
            r,
            "provider_earned",
            "Charges of countersigned receipts (owed to this site), by settlement method",
            msat(),
            Family::default(),
        );
        let gpu_busy = reg_unit(
            r,
            "gpu_busy",
            "GPU time of finished jobs, by adapter",
            Unit::Seconds,
            Family::default(),
        );
        let job_gpu_seconds = reg_unit(
            r,
            "provider_job_gpu",
            "GPU time per finished job",
            Unit::Seconds,
            Histogram::new(exponential_buckets(0.001, 4.0, 10)),
        );
        let tokens = reg(
            r,
            "provider_tokens_generated",
            "Loop iterations of jobs that name a model: one per token a language model generated",
            Counter::default(),
        );
        let cache_hits = reg(
            r,
            "cache_hits",
            "Input blobs taken from the input cache",
            Counter::default(),
        );
        let cache_misses = reg(
            r,
            "cache_misses",
            "Input blobs fetched from the buyer",
            Counter::default(),
        );
        let cache_hit_bytes = reg_unit(
            r,
            "cache_hit",
            "Input bytes taken from the input cache",
            Unit::Bytes,
            Counter::default(),
        );
        let cache_fetched_bytes = reg_unit(
            r,
            "cache_fetched",
            "Input bytes fetched from buyers",
            Unit::Bytes,
            Counter::default(),
        );
        let resident_hits = reg(
            r,
            "gpu_resident_hits",
            "Input buffers already resident in GPU memory (not uploaded)",
            Counter::default(),
        );
        let resident_bytes = reg_unit(
            r,
            "gpu_resident_hit",
            "Bytes of input buffers already resident in GPU memory",
            Unit::Bytes,
            Counter::default(),
        );
        let buyer_jobs = reg(
            r,
            "buyer_jobs",
            "Jobs this node submitted that ended, by outcome (done, failed, cancelled)",
            Family::default(),
        );
        let verifications = reg(
            r,
            "buyer_verifications",
            "Verified jobs (spot or replicate) by what the comparison found (not-drawn, agreed, overruled, incomplete, no-majority)",
            Family::default(),
        );
        let evidence = reg(
            r,
            "fraud_evidence",
            "Fraud evidence: sent by this node as a buyer, or received from others and counted (once per reporter and provider) or already counted",
            Family::default(),
        );
        let spent_msat = reg_unit(
            r,
            "buyer_spent",
            "Charges of receipts this node countersigned as a buyer, by settlement method",
            msat(),
            Family::default(),
        );
        let gossip = reg(
            r,
            "gossip_messages",
            "Gossip messages validated, by topic and outcome (accept, ignore, reject)",
            Family::default(),
        );
        let refused = reg(
            r,
            "requests_refused",
            "Inbound requests refused, by protocol and reason",
            Family::default(),
        );
        let book_orders = reg(
            r,
            "book_orders",
            "Live orders in this node's book, by kind",
            Family::default(),
        );
        let book_providers = reg(
            r,
            "book_providers",
            "Providers with a live capacity ad",
            Gauge::default(),
        );
        let peers = reg(r, "peers", "Connected peers", Gauge::default());
        let gossip_peers = reg(
            r,
            "gossip_mesh_peers",
            "Peers in this node's gossip mesh",
            Gauge::default(),
        );
        let queue = reg(
            r,
            "provider_queue_depth",
            "Requests waiting for the provider service",
            Gauge::default(),
        );
        let store_bytes = reg_unit(
            r,
            "store_size",
            "Size of the node's store on disk",
            Unit::Bytes,
            Gauge::default(),
        );
        let cache_bytes = reg_unit(
            r,
            "cache_size",
            "Input cache size, by tier (disk, memory)",
            Unit::Bytes,
            Family::default(),
        );
        let models_held = reg(
            r,
            "cache_models",
            "Models whose weights the input cache holds whole (advertised as warm)",
            Gauge::default(),
        );
        let swarm_stall = reg(
            r,
            "swarm_max_stall_microseconds",
            "Longest stall of the swarm task since start",
            Gauge::default(),
        );
        let debts = reg_unit(
            r,
            "settlement_owed_to_us",
            "What buyers owe this site for countersigned receipts, by state",
            msat(),
            Family::default(),
        );
        let owed_by_us = reg_unit(
            r,
            "settlement_owed_by_us",
            "What this node owes providers for countersigned receipts, not yet paid",
            msat(),
            Gauge::default(),
        );
        // Lightning mode only: families, so a node without a Lightning node shows no series.
        let ln_channels = reg(
            r,
            "lightning_channels",
            "The Lightning node's channels: usable now, or not (opening, closing, peer away)",
            Family::default(),
        );
        let ln_capacity = reg_unit(
            r,
            "lightning_capacity",
            "What the Lightning node could send (outbound) or receive (inbound) now",
            msat(),
            Family::default(),
        );
        let ln_onchain = reg_unit(
            r,
            "lightning_onchain",
            "The Lightning node's on-chain wallet (funds channels, receives closes)",
            Unit::Other("sat".into()),
            Family::default(),
        );
        Metrics {
            registry,
            identity: id.clone(),
            method: id.settlement,
            adapter: std::sync::OnceLock::new(),
            proposals,
            jobs,
            jobs_now,
            units_total,
            units_busy,
            receipts,
            countersigned,
            charged_msat,
            earned_msat,
            gpu_busy,
            job_gpu_seconds,
            tokens,
            cache_hits,
            cache_misses,
            cache_hit_bytes,
            cache_fetched_bytes,
            resident_hits,
            resident_bytes,
            buyer_jobs,
            spent_msat,
            verifications,
            evidence,
            gossip,
            refused,
            inbound_seen: AtomicU64::new(0),
            book_orders,
            book_providers,
            peers,
            gossip_peers,
            queue,
            store_bytes,
            cache_bytes,
            models_held,
            swarm_stall,
            debts,
            owed_by_us,
            ln_channels,
            ln_capacity,
            ln_onchain,
            libp2p,
            activity: Default::default(),
        }
    }

    /// The node these metrics describe.
    pub fn identity(&self) -> &NodeIdentity {
        &self.identity
    }

    /// The dashboard's view of recent jobs and history.
    pub fn activity(&self) -> &super::activity::Activity {
        &self.activity
    }

    /// Metrics for a node nobody scrapes (tests, tools): same counters, unnamed node.
    pub fn detached() -> Arc<Metrics> {
        Arc::new(Metrics::new(&NodeIdentity {
            peer_id: String::new(),
            region: String::new(),
            network: String::new(),
            settlement: "ledger",
        }))
    }

    /// The adapter label of GPU metrics (the first call wins: a node runs one executor).
    pub fn set_adapter(&self, name: &str) {
        let _ = self.adapter.set(name.to_string());
    }

    fn adapter(&self) -> String {
        self.adapter.get().cloned().unwrap_or_default()
    }

    /// libp2p's own metrics, for the swarm task to record its events into.
    pub(crate) fn libp2p(&self) -> &libp2p::metrics::Metrics {
        &self.libp2p
    }

    /// A proposal was answered: agreed (`None`) or refused for `reason`.
    pub(crate) fn proposal(&self, refused: Option<&RejectReason>) {
        let outcome = refused.map_or("agreed", reject_reason_label);
        self.proposals
            .get_or_create(&label("outcome", outcome))
            .inc();
    }

    /// A receipt was signed for a finished job.
    /// `tokens`: loop iterations of a job that names a model; `resident`: input buffers (and
    /// their bytes) already in GPU memory.
    pub(crate) fn receipt_signed(
        &self,
        charge_msat: u64,
        gpu_us: u64,
        tokens: u64,
        resident: (u64, u64),
    ) {
        self.receipts.inc();
        self.charged_msat.inc_by(charge_msat);
        self.jobs.get_or_create(&label("outcome", "done")).inc();
        let secs = gpu_us as f64 / 1e6;
        let adapter = self.adapter();
        self.gpu_busy
            .get_or_create(&label("adapter", adapter))
            .inc_by(secs);
        self.job_gpu_seconds.observe(secs);
        self.tokens.inc_by(tokens);
        self.resident_hits.inc_by(resident.0);
        self.resident_bytes.inc_by(resident.1);
    }

    /// An accepted job failed (`disputed`: the buyer refused its receipt).
    pub(crate) fn provider_job_failed(&self, disputed: bool) {
        let outcome = if disputed { "disputed" } else { "failed" };
        self.jobs.get_or_create(&label("outcome", outcome)).inc();
    }

    /// A buyer countersigned a receipt with `charge_msat`.
    pub(crate) fn countersigned(&self, charge_msat: u64) {
        self.countersigned.inc();
        self.earned_msat
            .get_or_create(&label("method", self.method))
            .inc_by(charge_msat);
    }

    /// A job's inputs are here: blobs and bytes from the cache and from the buyer.
    pub(crate) fn inputs(&self, hits: u64, hit_bytes: u64, misses: u64, fetched_bytes: u64) {
        self.cache_hits.inc_by(hits);
        self.cache_hit_bytes.inc_by(hit_bytes);
        self.cache_misses.inc_by(misses);
        self.cache_fetched_bytes.inc_by(fetched_bytes);
    }

    /// The provider's jobs by state and its units, after a change.
    pub(crate) fn provider_state(&self, counts: &[(&'static str, u64)], busy: u64, total: u64) {
        for (state, n) in counts {
            self.jobs_now
                .get_or_create(&label("state", *state))
                .set(i64::try_from(*n).unwrap_or(i64::MAX));
        }
        self.units_busy.set(i64::try_from(busy).unwrap_or(i64::MAX));
        self.units_total
            .set(i64::try_from(total).unwrap_or(i64::MAX));
    }

    /// A job this node submitted ended with `outcome` (`done`, `failed`, `cancelled`).
    pub(crate) fn buyer_job(&self, outcome: &'static str) {
        self.buyer_jobs
            .get_or_create(&label("outcome", outcome))
            .inc();
    }

    /// A verified job's comparison ended with `outcome` ([`VerifyOutcome::name`](crate::jobs::record::VerifyOutcome::name)).
    pub(crate) fn verification(&self, outcome: &'static str) {
        self.verifications
            .get_or_create(&label("outcome", outcome))
            .inc();
    }

    /// Fraud evidence `event`: `sent`, `counted` or `repeated`.
    pub(crate) fn fraud_evidence(&self, event: &'static str) {
        self.evidence.get_or_create(&label("event", event)).inc();
    }

    /// This node countersigned a receipt as a buyer.
    pub(crate) fn spent(&self, charge_msat: u64) {
        self.spent_msat
            .get_or_create(&label("method", self.method))
            .inc_by(charge_msat);
    }

    /// A gossip message on `topic` was judged `outcome` (`accept`, `ignore`, `reject`).
    pub(crate) fn gossip(&self, topic: &'static str, outcome: &'static str) {
        self.gossip
            .get_or_create(&vec![("topic", topic.into()), ("outcome", outcome.into())])
            .inc();
    }

    /// An inbound request on `protocol` was refused for `reason`.
    pub(crate) fn refused(&self, protocol: &'static str, reason: &'static str) {
        self.refused
            .get_or_create(&vec![
                ("protocol", protocol.into()),
                ("reason", reason.into()),
            ])
            .inc();
    }

    /// Brings the count of requests refused for want of inbound budget (counted by the
    /// codecs) up to `total`.
    pub(crate) fn sync_inbound_refusals(&self, total: u64) {
        let seen = self
            .inbound_seen
            .fetch_max(total, std::sync::atomic::Ordering::Relaxed);
        if total > seen {
            self.refused
                .get_or_create(&vec![
                    ("protocol", ANY_PROTOCOL.into()),
                    ("reason", "inbound_budget".into()),
                ])
                .inc_by(total - seen);
        }
    }

    /// Sets the gauges read at scrape time.
    pub fn set_gauges(&self, g: &GaugeReadings) {
        let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.book_orders
            .get_or_create(&label("kind", "ask"))
            .set(i(g.book_asks));
        self.book_orders
            .get_or_create(&label("kind", "bid"))
            .set(i(g.book_bids));
        self.book_providers.set(i(g.book_providers));
        self.peers.set(i(g.peers));
        self.gossip_peers.set(i(g.gossip_peers));
        self.queue.set(i(g.provider_queue));
        self.store_bytes.set(i(g.store_bytes));
        self.cache_bytes
            .get_or_create(&label("tier", "disk"))
            .set(i(g.cache_disk_bytes));
        self.cache_bytes
            .get_or_create(&label("tier", "memory"))
            .set(i(g.cache_mem_bytes));
        self.models_held.set(i(g.models_held));
        self.swarm_stall.set(i(g.swarm_max_stall_us));
        for (state, v) in DEBT_STATES.iter().zip(g.owed_to_us_msat) {
            self.debts.get_or_create(&label("state", *state)).set(i(v));
        }
        self.owed_by_us.set(i(g.owed_by_us_msat));
        if let Some(l) = &g.lightning {
            for (state, v) in [("usable", l.channels_usable), ("other", l.channels_other)] {
                self.ln_channels
                    .get_or_create(&label("state", state))
                    .set(i(v));
            }
            for (dir, v) in [("outbound", l.outbound_msat), ("inbound", l.inbound_msat)] {
                self.ln_capacity
                    .get_or_create(&label("direction", dir))
                    .set(i(v));
            }
            self.ln_onchain
                .get_or_create(&Vec::new())
                .set(i(l.onchain_sat));
        }
    }

    /// Appends every metric in the OpenMetrics text format, without the closing `# EOF`
    /// (so that a gateway's metrics can follow; see [`finish`]).
    pub fn encode_into(&self, out: &mut String) {
        // Writing into a String cannot fail.
        let _ = encode_registry(out, &self.registry);
    }

    /// The figures the dashboard shows, read from the counters.
    pub fn totals(&self) -> Totals {
        let one = |f: &Family<Labels, Counter>, k: &'static str, v: &str| {
            f.get(&label(k, v)).map_or(0, |c| c.get())
        };
        let adapter = self.adapter();
        Totals {
            jobs_done: one(&self.jobs, "outcome", "done"),
            jobs_failed: one(&self.jobs, "outcome", "failed")
                + one(&self.jobs, "outcome", "disputed"),
            receipts: self.receipts.get(),
            charged_msat: self.charged_msat.get(),
            earned_msat: one(&self.earned_msat, "method", self.method),
            spent_msat: one(&self.spent_msat, "method", self.method),
            gpu_busy_seconds: self
                .gpu_busy
                .get(&label("adapter", adapter))
                .map_or(0.0, |c| c.get()),
            tokens: self.tokens.get(),
            cache_hits: self.cache_hits.get(),
            cache_misses: self.cache_misses.get(),
            units_busy: u64::try_from(self.units_busy.get()).unwrap_or(0),
            units_total: u64::try_from(self.units_total.get()).unwrap_or(0),
        }
    }
}

/// The running totals the dashboard plots (see [`Metrics::totals`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct Totals {
    /// Jobs finished with a receipt.
    pub jobs_done: u64,
    /// Jobs failed or disputed.
    pub jobs_failed: u64,
    /// Receipts signed.
    pub receipts: u64,
    /// Charges of the receipts signed.
    pub charged_msat: u64,
    /// Charges of countersigned receipts.
    pub earned_msat: u64,
    /// Charges this node countersigned as a buyer.
    pub spent_msat: u64,
    /// GPU time of finished jobs.
    pub gpu_busy_seconds: f64,
    /// Tokens generated.
    pub tokens: u64,
    /// Input blobs from the cache.
    pub cache_hits: u64,
    /// Input blobs fetched.
    pub cache_misses: u64,
    /// Units busy now.
    pub units_busy: u64,
    /// Units sold.
    pub units_total: u64,
}

/// Closes an OpenMetrics exposition built with [`Metrics::encode_into`].
pub fn finish(out: &mut String) {
    let _ = encode_eof(out);
}
