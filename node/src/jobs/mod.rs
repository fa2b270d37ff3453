//! The job lifecycle between real nodes: negotiate, dispatch, execute, receipt.
//!
//! # Buyer side ([`crate::JobsHandle::submit`])
//! 1. The job is checked locally ([`crate::executor::check_offline`]): bad WGSL, bindings or
//!    input files fail before any network traffic.
//! 2. **Match**: the buyer signs a bid and ranks the asks in its book with the market engine
//!    ([`hashgrid_market::OrderBook::candidates`]: price, then earliest, then reputation),
//!    skipping providers it has marked down.
//! 3. **Negotiate** (`/hashgrid/negotiate/1`): it proposes to the best ask; the provider
//!    re-checks its free units, the terms and the job (naga validation against its adapter) and
//!    signs an [`Agreement`](hashgrid_protocol::Agreement) or rejects; rejected → next ask.
//! 4. **Dispatch** (`/hashgrid/job/1`): the countersigned agreement, the spec and the inputs
//!    up to [`MAX_INLINE_BYTES`](hashgrid_protocol::exchange::MAX_INLINE_BYTES) inline; the
//!    provider fetches larger inputs over `/hashgrid/blob/1` in chunks, hashing them as they
//!    arrive and refusing any that does not hash to its id.
//! 5. **Progress**: a long poll (`Await`) answered on every phase change (queued, fetching,
//!    running, done) or every [`AWAIT_HOLD`](crate::network::AWAIT_HOLD).
//! 6. **Receipt**: the provider signs a receipt chained to its previous one; the buyer fetches
//!    large outputs by id, checks the signature, the job and agreement ids, the charge against
//!    the agreement, and every output's hash and size, then stores outputs and the
//!    countersigned receipt (flushed) and sends the countersignature back. Anything wrong →
//!    `Dispute`, nothing countersigned, the provider marked down, and the job re-matched.
//!
//! A provider that disconnects, loses the job (restart) or passes the agreed time is marked
//! down for [`DEFAULT_DOWN_FOR`] and the job re-matched, at most
//! [`JobOptions::max_attempts`] times.
//!
//! # Provider side
//! The node's task answers proposals and dispatches; jobs run on the [`crate::Executor`]
//! given to [`crate::NodeBuilder::executor`] in spawned tasks. Every state change the buyer
//! relies on is flushed to sled before it is acknowledged: an accepted dispatch before the
//! `Queued` answer, a signed receipt (with its outputs) before any status names it, a
//! countersignature before the `Ack`. After a crash, jobs that were queued or running are
//! failed (the buyer re-matches them); signed receipts, the chain head and undelivered
//! outputs are all still there.

pub(crate) mod blobs;
pub(crate) mod buyer;
pub mod cache;
pub(crate) mod provider;
pub(crate) mod purchase;
pub mod record;
pub mod reputation;
pub(crate) mod run;
pub(crate) mod service;
pub(crate) mod stream;

pub use record::{Attempt, FailKind, JobRecord, JobState};

pub use crate::executor::{IntoSharedInputs, SharedInputs};

use std::collections::BTreeMap;
use std::time::Duration;

use hashgrid_protocol::{
    ContentId, Countersigned, JobSpec, ModelManifest, Msat, PublicKey, Receipt, Requirements,
};
use serde::Serialize;

/// How long a buyer avoids a provider that failed it (disconnected, lost a job, timed out,
/// or sent a receipt that did not verify).
pub const DEFAULT_DOWN_FOR: Duration = Duration::from_secs(600);

/// How long a provider holds units for an agreement that has not been dispatched yet.
pub const AGREEMENT_TTL_MS: u64 = 30_000;

/// Extra time a buyer waits beyond the agreed run time (queueing, transfers) before it gives
/// up on a provider.
pub const DEADLINE_GRACE: Duration = Duration::from_secs(30);

/// Default most providers a job is run on before it fails.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Most asks proposed to per attempt (rejections move on to the next).
pub const MAX_PROPOSALS_PER_ATTEMPT: usize = 16;

/// How long a proposal may go unanswered before the buyer proposes to the next candidate as
/// well (the first agreement wins; later ones are released). A provider answers in a few ms;
/// one that does not within this is restarting, dialled at a dead address, or stuck behind a
/// busy CPU, and waiting for it cost a job up to the negotiation timeout.
pub const HEDGE_AFTER: Duration = Duration::from_millis(250);

/// Most proposals of one job out at once.
pub const HEDGE_MAX: usize = 3;

/// Blob chunk requests in flight at once per transfer.
pub const BLOB_WINDOW: usize = 4;

/// How long a job placed with a provider counts towards its load in this buyer's ranking.
pub const LOAD_WINDOW: Duration = Duration::from_secs(120);

/// Jobs this node placed with each provider in the last [`LOAD_WINDOW`]: the "recent load" of
/// [`hashgrid_market::OrderBook::candidates_fair`], so that a buyer's jobs spread over
/// providers at the same price instead of all going to one.
#[derive(Clone, Default)]
pub(crate) struct Placements(
    std::sync::Arc<std::sync::Mutex<std::collections::HashMap<PublicKey, Vec<std::time::Instant>>>>,
);

impl Placements {
    /// Counts a job placed with `provider` now.
    pub(crate) fn record(&self, provider: PublicKey) {
        if let Ok(mut m) = self.0.lock() {
            let now = std::time::Instant::now();
            m.retain(|_, v| {
                v.retain(|t| now.duration_since(*t) < LOAD_WINDOW);
                !v.is_empty()
            });
            m.entry(provider).or_default().push(now);
        }
    }

    /// Recent jobs per provider.
    pub(crate) fn snapshot(&self) -> std::collections::HashMap<PublicKey, u64> {
        let now = std::time::Instant::now();
        self.0
            .lock()
            .map(|m| {
                m.iter()
                    .map(|(p, v)| {
                        let n = v.iter().filter(|t| now.duration_since(**t) < LOAD_WINDOW);
                        (*p, n.count() as u64)
                    })
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The libp2p identity of a key (`None` for bytes that are not an ed25519 point; keys inside
/// verified messages always are).
pub(crate) fn peer_of(pk: &PublicKey) -> Option<libp2p::PeerId> {
    pk.try_to_peer_id().ok()
}

/// What a buyer asks of the market for one job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobOptions {
    /// GPU units wanted (default 1).
    pub units: u32,
    /// Highest price in msat per GPU-second (default: any).
    pub max_price: Option<Msat>,
    /// Longest run in seconds (default 60); also the cap on the charge.
    pub max_seconds: u32,
    /// Requirements on the GPU (default: none).
    pub requirements: Requirements,
    /// Most providers tried after an agreement failed (default [`DEFAULT_MAX_ATTEMPTS`]).
    pub max_attempts: u32,
    /// How long to keep re-matching while every provider that could take the job refuses
    /// it as busy (no free units): the job waits for capacity, as a queue would, instead of
    /// failing at once (default zero: fail at once).
    pub wait_for_capacity: Duration,
    /// The model whose weights are among the job's inputs (default none): the bid names it,
    /// matching prefers providers whose capacity ads list it (no upload of the weights), and
    /// the provider learns the manifest so it lists the model once it holds the weights.
    /// Every blob it names must be an input of the spec.
    pub model: Option<ModelManifest>,
    /// Verification by re-execution on independent providers (default: none), and how float
    /// outputs compare (see [`hashgrid_protocol::verify`]).
    pub verify: hashgrid_protocol::Verification,
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            units: 1,
            max_price: None,
            max_seconds: 60,
            requirements: Requirements::default(),
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            wait_for_capacity: Duration::ZERO,
            model: None,
            verify: hashgrid_protocol::Verification::default(),
        }
    }
}

/// A finished job's verified outputs with its record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobResult {
    /// The record (state [`JobState::Done`], with the countersigned receipt).
    pub record: JobRecord,
    /// The output buffers by name, each verified against the receipt.
    pub outputs: BTreeMap<String, Vec<u8>>,
}

/// A job's progress, reported as [`crate::NodeEvent::Job`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobUpdate {
    /// The job.
    pub job: ContentId,
    /// Its new state.
    pub state: JobState,
    /// The provider involved, if any.
    pub provider: Option<PublicKey>,
}

/// A submitted job's streamed buffers as its provider read them back while it runs,
/// reported as [`crate::NodeEvent::JobStream`] (e.g. the tokens a model has generated so far).
///
/// Streamed bytes are what the provider says, not yet verified: only the outputs named by the
/// countersigned receipt are. A caller that shows them early (a chat gateway) must check that
/// the final outputs extend what it showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobStream {
    /// The job.
    pub job: ContentId,
    /// The provider running it.
    pub provider: PublicKey,
    /// Iterations of the streaming loop run at the check.
    pub iterations: u32,
    /// The streamed buffers, whole, by name.
    pub buffers: Vec<(String, Vec<u8>)>,
}

/// Whether a job's streamed buffers fit one reply
/// ([`MAX_STREAM_BYTES`](hashgrid_protocol::exchange::MAX_STREAM_BYTES)), and so stream to the
/// buyer while it runs; the buffers named, with their sizes.
pub(crate) fn network_streams(spec: &JobSpec) -> Option<Vec<(String, u64)>> {
    let mut out: Vec<(String, u64)> = Vec::new();
    for l in &spec.loops {
        for &b in &l.stream {
            let buf = spec.buffers.get(b as usize)?;
            if !out.iter().any(|(n, _)| *n == buf.name) {
                out.push((buf.name.clone(), buf.size));
            }
        }
    }
    let total: u64 = out.iter().map(|(_, s)| *s).sum();
    (!out.is_empty() && total <= hashgrid_protocol::exchange::MAX_STREAM_BYTES as u64)
        .then_some(out)
}

/// What happened to a job this node serves, reported as [`crate::NodeEvent::Provider`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum ProviderEvent {
    /// This node signed an agreement.
    Agreed {
        /// The agreement.
        agreement: ContentId,
        /// The buyer.
        buyer: PublicKey,
    },
    /// A proposal was rejected.
    Rejected {
        /// The buyer.
        buyer: PublicKey,
        /// Why.
        reason: String,
    },
    /// A job was dispatched and accepted.
    Accepted {
        /// The agreement.
        agreement: ContentId,
    },
    /// A job's inputs are all here: `fetched_bytes` came from the buyer over the network,
    /// `cached_bytes` from this provider's input cache (a model's weights, after its first
    /// request).
    InputsReady {
        /// The agreement.
        agreement: ContentId,
        /// Bytes fetched from the buyer (inline inputs not counted).
        fetched_bytes: u64,
        /// Bytes taken from the cache.
        cached_bytes: u64,
    },
    /// A job started on the GPU.
    Running {
        /// The agreement.
        agreement: ContentId,
    },
    /// A job finished and its receipt was signed and stored.
    Finished {
        /// The agreement.
        agreement: ContentId,
        /// The receipt's id.
        receipt: ContentId,
        /// Its position in this provider's chain.
        chain_seq: u64,
        /// The charge.
        charge: Msat,
    },
    /// A job failed (nothing is charged).
    Failed {
        /// The agreement.
        agreement: ContentId,
        /// Why.
        reason: String,
    },
    /// The buyer countersigned the receipt.
    Countersigned {
        /// The agreement.
        agreement: ContentId,
        /// The receipt's id.
        receipt: ContentId,
    },
    /// The buyer refused the receipt.
    Disputed {
        /// The agreement.
        agreement: ContentId,
        /// The buyer's reason.
        reason: String,
    },
}

/// A job to submit: the spec and its input blobs by id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Submission {
    /// The job.
    pub spec: JobSpec,
    /// Input blobs by id (every [`hashgrid_protocol::BufferInit::Blob`] of the spec), shared:
    /// a buyer that keeps a model's weights hands the same bytes to every request
    /// (`.into_shared()` makes owned blobs shared without copying them).
    pub inputs: SharedInputs,
    /// Market terms.
    pub options: JobOptions,
}

/// A receipt verification lie a test provider tells (cargo feature `testing`).
#[cfg(feature = "testing")]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lie {
    /// Sends outputs that do not hash to the ids in its receipt.
    WrongOutput,
    /// Signs the receipt with another key.
    ForeignKey,
    /// Charges more than the agreement allows.
    Overcharge,
    /// Corrupts the first byte of every output of one job in `one_in` (its receipt
    /// positions 0, N, 2N, …) before hashing and signing: the receipt and outputs verify,
    /// only re-execution catches it.
    Cheat {
        /// One job in this many is corrupted.
        one_in: u32,
    },
    /// Not a lie: flips the lowest bit of every 4-byte word of every output (one ulp of
    /// each f32), as an adapter that rounds differently would; honest within a tolerance.
    Rounding,
}

/// A provider's receipt chain as its store holds it, audited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    /// Receipts signed (the chain's length).
    pub receipts: u64,
    /// Receipts the buyer countersigned.
    pub countersigned: u64,
    /// The chain head's id.
    pub head: Option<ContentId>,
    /// Sum of all charges, in msat.
    pub total_charged_msat: u64,
    /// Sum of countersigned charges, in msat (what settlement can claim).
    pub countersigned_msat: u64,
    /// Every receipt's id, in chain order.
    pub receipt_ids: Vec<ContentId>,
}

/// Why a provider's receipt chain failed its audit ([`audit_receipts`]).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum AuditError {
    /// The store could not be read.
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    /// A receipt does not verify or does not link to the one before it.
    #[error(transparent)]
    Chain(#[from] hashgrid_protocol::ReceiptError),
    /// A countersigned copy does not verify.
    #[error("countersigned receipt {id}: {source}")]
    Countersignature {
        /// The countersigned receipt's id.
        id: ContentId,
        /// What failed.
        source: hashgrid_protocol::SignedError,
    },
    /// A countersigned copy is not the receipt the chain holds at its position.
    #[error("countersigned receipt {id} is not the receipt signed at chain position {seq}")]
    Mismatch {
        /// The countersigned receipt's id.
        id: ContentId,
        /// The chain position it names.
        seq: u64,
    },
}

/// Reads a provider's receipts from its store and checks that they form one unbroken chain
/// signed by `provider` on `network`, and that every countersigned copy matches its receipt.
pub fn audit_receipts(
    store: &crate::store::Store,
    provider: PublicKey,
    network: &hashgrid_protocol::Network,
) -> Result<ChainReport, AuditError> {
    use crate::store::JobTree;
    use hashgrid_protocol::{ChainAuditor, Signed};
    let receipts: Vec<Signed<Receipt>> = store.all(JobTree::Receipts)?;
    let mut audit = ChainAuditor::new(provider, network.clone());
    let mut receipt_ids = Vec::with_capacity(receipts.len());
    for r in &receipts {
        audit.push(r)?;
        receipt_ids.push(r.id());
    }
    let mut countersigned = 0u64;
    let mut countersigned_msat = 0u64;
    let all: Vec<Countersigned<Receipt>> = store.all(JobTree::Countersigned)?;
    for cs in all {
        let r = cs
            .verify(network)
            .map_err(|source| AuditError::Countersignature {
                id: cs.id(),
                source,
            })?;
        let ours = usize::try_from(r.chain_seq)
            .ok()
            .and_then(|i| receipts.get(i));
        if ours != Some(&cs.signed) {
            return Err(AuditError::Mismatch {
                id: cs.id(),
                seq: r.chain_seq,
            });
        }
        countersigned += 1;
        countersigned_msat = countersigned_msat.saturating_add(r.charge.0);
    }
    Ok(ChainReport {
        receipts: audit.len(),
        countersigned,
        head: audit.head(),
        total_charged_msat: audit.total_charged().0,
        countersigned_msat,
        receipt_ids,
    })
}

/// A submitted job's record from a buyer's store.
pub fn read_job(
    store: &crate::store::Store,
    id: &ContentId,
) -> Result<Option<JobRecord>, crate::store::StoreError> {
    store.get(crate::store::JobTree::BuyerJobs, id.as_bytes())
}

/// Every job in a buyer's store, oldest first.
pub fn read_jobs(store: &crate::store::Store) -> Result<Vec<JobRecord>, crate::store::StoreError> {
    let mut all: Vec<JobRecord> = store.all(crate::store::JobTree::BuyerJobs)?;
    all.sort_by_key(|r| r.submitted_at);
    Ok(all)
}

/// What a buyer's store remembers of each provider ([`reputation::Experience`]), most jobs
/// first (the node must be stopped, or this be its own store).
pub fn read_experience(
    store: &crate::store::Store,
) -> Result<Vec<(PublicKey, reputation::Experience)>, crate::store::StoreError> {
    let mut v = reputation::Reputations::load(store)?.all();
    v.sort_by_key(|(p, e)| (std::cmp::Reverse(e.completed + e.failed + e.lied), *p));
    Ok(v)
}

/// A done job's outputs and record from a buyer's store (`None` unless it is done).
pub fn read_result(
    store: &crate::store::Store,
    id: &ContentId,
) -> Result<Option<JobResult>, crate::store::StoreError> {
    let Some(record) = read_job(store, id)? else {
        return Ok(None);
    };
    let Some(receipt) = record
        .receipt
        .as_ref()
        .filter(|_| record.state == JobState::Done)
        .and_then(|r| r.signed.decode_unverified().ok())
    else {
        return Ok(None);
    };
    let mut outputs = BTreeMap::new();
    for o in &receipt.outputs {
        let Some(bytes) = store.blob(&o.id)? else {
            return Err(crate::store::StoreError::Corrupt {
                tree: "blobs",
                reason: format!("output {} of job {id} is missing", o.name),
            });
        };
        outputs.insert(o.name.clone(), bytes.to_vec());
    }
    Ok(Some(JobResult { record, outputs }))
}

/// Who may fetch which blob, counted per job: blobs are content-addressed, so two jobs (of
/// the same or different peers) can share one; a blob is released only when no job needs it.
#[derive(Debug, Default)]
pub(crate) struct BlobHolders(
    std::collections::HashMap<ContentId, std::collections::HashMap<libp2p::PeerId, usize>>,
);

impl BlobHolders {
    /// One more job of `peer` needs `id`.
    pub(crate) fn add(&mut self, id: ContentId, peer: libp2p::PeerId) {
        *self.0.entry(id).or_default().entry(peer).or_insert(0) += 1;
    }

    /// One job of `peer` no longer needs `id`; true when no job needs it any more.
    pub(crate) fn release(&mut self, id: &ContentId, peer: &libp2p::PeerId) -> bool {
        let Some(peers) = self.0.get_mut(id) else {
            return true;
        };
        if let Some(n) = peers.get_mut(peer) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                peers.remove(peer);
            }
        }
        if peers.is_empty() {
            self.0.remove(id);
            return true;
        }
        false
    }

    /// Whether `peer` may fetch `id`.
    pub(crate) fn allows(&self, id: &ContentId, peer: &libp2p::PeerId) -> bool {
        self.0.get(id).is_some_and(|p| p.contains_key(peer))
    }
}
