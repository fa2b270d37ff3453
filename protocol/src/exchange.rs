//! The direct (request-response) messages between a buyer's node and a provider's node
//! (DESIGN.md "Messages"):
//!
//! - `/hashgrid/negotiate/1`: [`Propose`] → [`NegotiateReply`] (a provider-signed
//!   [`Agreement`] or a [`Reject`]).
//! - `/hashgrid/job/1`: [`JobMessage`] → [`JobReply`]: dispatch a job under a countersigned
//!   agreement, wait for its progress (long poll), countersign or reject its receipt.
//! - `/hashgrid/blob/1`: [`BlobRequest`] → [`BlobReply`]: fetch a blob by its blake3 id in
//!   chunks (inputs and outputs too large to travel inline).
//!
//! Every message is postcard-encoded and read up to its protocol's size limit before it is
//! decoded. The signed parts (bid, agreement, receipt) are verified by the receiver; nothing
//! here is trusted because of the connection it arrived on, except that the peer's identity
//! (its `PeerId`, authenticated by noise) must be the party the message claims to speak for.

use serde::{Deserialize, Serialize};

use crate::id::ContentId;
use crate::job::JobSpec;
use crate::limits::{MAX_CHUNK_BYTES, MAX_DIRECT_MESSAGE_BYTES, MAX_MESSAGE_BYTES};
use crate::messages::{Agreement, Bid, OrderRef, Receipt};
use crate::money::Msat;
use crate::signed::{Bytes, Countersigned, Signed};

/// Most bytes of blobs carried inline in one [`Dispatch`] or [`JobStatus::Done`]; larger
/// inputs and outputs are fetched over `/hashgrid/blob/1` in [`MAX_CHUNK_BYTES`] chunks.
/// Senders also keep the whole message within [`MAX_DIRECT_MESSAGE_BYTES`]
/// ([`inline_budget`]): a dispatch with a large spec carries fewer bytes inline.
pub const MAX_INLINE_BYTES: usize = 512 * 1024;

/// Framing allowance on top of the payload limits (signatures, ids, lengths).
pub const EXCHANGE_OVERHEAD: usize = 64 * 1024;

/// Largest `/hashgrid/negotiate/1` request: a spec of [`MAX_MESSAGE_BYTES`] plus the bid.
pub const MAX_NEGOTIATE_REQUEST: usize = MAX_MESSAGE_BYTES + EXCHANGE_OVERHEAD;
/// Largest `/hashgrid/negotiate/1` reply (an agreement or a reject).
pub const MAX_NEGOTIATE_REPLY: usize = EXCHANGE_OVERHEAD;
/// Largest `/hashgrid/job/1` request: a dispatch with its spec and inline inputs.
pub const MAX_JOB_REQUEST: usize = MAX_DIRECT_MESSAGE_BYTES;
/// Largest `/hashgrid/job/1` reply: a receipt with inline outputs.
pub const MAX_JOB_REPLY: usize = MAX_DIRECT_MESSAGE_BYTES;
/// Largest `/hashgrid/blob/1` request.
pub const MAX_BLOB_REQUEST: usize = 1024;
/// Largest `/hashgrid/blob/1` reply: one chunk.
pub const MAX_BLOB_REPLY: usize = MAX_CHUNK_BYTES + 1024;

// Every direct message fits under the 1 MiB frame limit (see `MAX_DIRECT_MESSAGE_BYTES`).
const _: () = {
    assert!(MAX_NEGOTIATE_REQUEST <= MAX_DIRECT_MESSAGE_BYTES);
    assert!(MAX_BLOB_REPLY <= MAX_DIRECT_MESSAGE_BYTES);
    assert!(MAX_SETTLE_REQUEST <= MAX_DIRECT_MESSAGE_BYTES);
    assert!(MAX_MESSAGE_BYTES + EXCHANGE_OVERHEAD <= MAX_JOB_REQUEST);
};

/// Most blob bytes a sender may carry inline in a job message (a [`Dispatch`] or a
/// [`JobStatus::Done`]) beside `fixed` bytes of signed content (the dispatch's spec, the
/// receipt), so that the whole message stays within [`MAX_DIRECT_MESSAGE_BYTES`]: at most
/// [`MAX_INLINE_BYTES`], and less when `fixed` is large. [`EXCHANGE_OVERHEAD`] covers the
/// agreement, the ids and the length prefixes.
pub fn inline_budget(fixed: usize) -> usize {
    MAX_INLINE_BYTES.min(MAX_DIRECT_MESSAGE_BYTES.saturating_sub(EXCHANGE_OVERHEAD + fixed))
}

/// The buyer asks a provider to run a job under one of its asks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Propose {
    /// The buyer's bid, signed by the buyer (its key must be the requesting peer's).
    pub bid: Signed<Bid>,
    /// The provider's ask being taken.
    pub ask: OrderRef,
    /// Units wanted (at most the ask's and the bid's).
    pub units: u32,
    /// Price in msat per GPU-second: the ask's price (fills are at the ask price).
    pub price: Msat,
    /// Longest run, in seconds.
    pub max_seconds: u32,
    /// The job, so the provider can validate it (WGSL, limits) before agreeing.
    pub spec: JobSpec,
    /// Makes the agreement unique.
    pub nonce: u64,
}

/// Why a provider refused a proposal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub enum RejectReason {
    /// The ask is not a live ask of this provider (cancelled, expired, replaced).
    UnknownAsk,
    /// Not enough free units right now.
    NoCapacity,
    /// Price, units or duration do not match the ask or the bid.
    Terms,
    /// The bid is invalid or not signed by the requesting peer.
    BadBid,
    /// The job fails validation (WGSL, bindings, limits).
    InvalidJob,
    /// The buyer is over its credit limit with this provider.
    CreditLimit,
    /// This node sells no GPU time.
    NotAProvider,
}

/// A provider's refusal, with a reason a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reject {
    /// The class of refusal.
    pub reason: RejectReason,
    /// Details.
    pub detail: String,
}

/// The provider's answer to a [`Propose`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NegotiateReply {
    /// Accepted: the agreement, signed by the provider, for the buyer to countersign.
    Agreed(Signed<Agreement>),
    /// Refused.
    Reject(Reject),
}

/// A blob carried inline.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InlineBlob {
    /// blake3 of `bytes` (checked by the receiver).
    pub id: ContentId,
    /// The bytes.
    pub bytes: Bytes,
}

/// The buyer hands the job to the provider under a countersigned agreement.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispatch {
    /// The buyer's id of the job (the receipt names it).
    pub job_id: ContentId,
    /// The agreement, signed by the provider and countersigned by the buyer.
    pub agreement: Countersigned<Agreement>,
    /// The job (its id must be the agreement's `spec_id`).
    pub spec: JobSpec,
    /// Small inputs inline; the rest the provider fetches from the buyer by id.
    pub inputs: Vec<InlineBlob>,
    /// Which of the job's input blobs are the weights of the model its bid names: once it
    /// holds them all, the provider lists the model's id in its capacity ads.
    pub model: Option<crate::ModelManifest>,
}

/// A job's state as the provider reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobPhase {
    /// The provider knows no such job.
    Unknown,
    /// Accepted, waiting for inputs or the GPU.
    Queued,
    /// Fetching input blobs from the buyer.
    Fetching,
    /// Running on the GPU.
    Running,
    /// Finished: a receipt is ready.
    Done,
    /// Failed (see the reason).
    Failed,
}

/// A job's state with what goes with it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobStatus {
    /// The provider knows no such job (never dispatched, or forgotten).
    Unknown,
    /// Accepted, waiting.
    Queued,
    /// Fetching inputs.
    Fetching,
    /// Running.
    Running,
    /// Finished: the signed receipt, and the outputs small enough to travel inline (the rest
    /// are fetched by id over `/hashgrid/blob/1`).
    Done {
        /// The provider's signed receipt.
        receipt: Signed<Receipt>,
        /// Inline outputs.
        outputs: Vec<InlineBlob>,
    },
    /// The job failed; nothing is charged.
    Failed {
        /// Why.
        reason: String,
    },
}

impl JobStatus {
    /// The phase this status is in.
    pub fn phase(&self) -> JobPhase {
        match self {
            JobStatus::Unknown => JobPhase::Unknown,
            JobStatus::Queued => JobPhase::Queued,
            JobStatus::Fetching => JobPhase::Fetching,
            JobStatus::Running => JobPhase::Running,
            JobStatus::Done { .. } => JobPhase::Done,
            JobStatus::Failed { .. } => JobPhase::Failed,
        }
    }
}

/// A request on `/hashgrid/job/1` (buyer → provider).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobMessage {
    /// Run this job. Answered once the provider has durably accepted it (or refused).
    Dispatch(Box<Dispatch>),
    /// Long poll: answered as soon as the job's phase differs from `seen`, or after a while
    /// with the current status.
    Await {
        /// The agreement the job runs under.
        agreement: ContentId,
        /// The phase the buyer last saw.
        seen: JobPhase,
    },
    /// The buyer accepts the receipt: its countersigned copy.
    Countersign(Countersigned<Receipt>),
    /// The buyer refuses the receipt (outputs do not match, wrong signer, overcharge).
    Dispute {
        /// The agreement the job ran under.
        agreement: ContentId,
        /// What is wrong.
        reason: String,
    },
    /// Long poll for a running job's streamed buffers (a loop's `stream` list, e.g. the tokens
    /// generated so far): answered as soon as the provider has read back a check past `seen`
    /// iterations, when the job is no longer running, or after a while with what it has.
    /// Streamed bytes are provisional: only the receipt's outputs are verified.
    Stream {
        /// The agreement the job runs under.
        agreement: ContentId,
        /// Iterations the buyer has already seen (0 at first).
        seen: u32,
    },
    /// The buyer will not dispatch this agreement (it took another provider's, e.g. after
    /// proposing to two at once): the provider frees the units it held for it. Answered
    /// `Ack`, or `Refused` when no such undispatched agreement of this buyer exists.
    Release {
        /// The agreement to let go.
        agreement: ContentId,
    },
}

/// The answer on `/hashgrid/job/1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum JobReply {
    /// The job's status.
    Status(JobStatus),
    /// The request was refused.
    Refused(String),
    /// Recorded.
    Ack,
    /// The streamed buffers, answering [`JobMessage::Stream`].
    Stream(StreamChunk),
}

/// Most bytes of streamed buffers a job may stream over the network: every chunk carries the
/// whole buffers, so they must fit one reply. A job that streams more still runs; its buyer
/// gets its outputs with the receipt only.
pub const MAX_STREAM_BYTES: usize = MAX_INLINE_BYTES;

/// One streamed buffer's contents at a check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamedBytes {
    /// The buffer's name (one of the loop's streamed outputs).
    pub name: String,
    /// Its whole contents at the check.
    pub bytes: Bytes,
}

/// A running job's streamed buffers, as of its latest check.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamChunk {
    /// Iterations run at the check the buffers were read at (0 and no buffers: none yet).
    pub iterations: u32,
    /// The streamed buffers, whole.
    pub buffers: Vec<StreamedBytes>,
    /// The job is no longer running (done, failed or unknown): no later chunk will come, and
    /// the outputs arrive with the receipt.
    pub finished: bool,
}

/// A request for part of a blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobRequest {
    /// The blob's blake3 id.
    pub id: ContentId,
    /// First byte wanted.
    pub offset: u64,
    /// Bytes wanted (the server sends at most [`MAX_CHUNK_BYTES`]).
    pub len: u32,
}

/// The answer to a [`BlobRequest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BlobReply {
    /// Bytes from the requested offset.
    Chunk {
        /// The blob's total length.
        total: u64,
        /// The bytes.
        bytes: Bytes,
    },
    /// This peer does not hold the blob, or will not serve it to the requester.
    NotFound,
}

/// Largest `/hashgrid/settle/1` request: a signed invoice (at most one message).
pub const MAX_SETTLE_REQUEST: usize = MAX_MESSAGE_BYTES + EXCHANGE_OVERHEAD;
/// Largest `/hashgrid/settle/1` reply.
pub const MAX_SETTLE_REPLY: usize = EXCHANGE_OVERHEAD;

/// A request on `/hashgrid/settle/1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SettleRequest {
    /// Provider → buyer: an invoice for countersigned receipts.
    Invoice(Signed<crate::messages::Invoice>),
    /// Buyer → provider: the invoice was paid by this output.
    Proof(Signed<crate::messages::PaymentProof>),
    /// Provider → buyer: the payment is confirmed under the provider's policy; the invoice is
    /// settled.
    Settled {
        /// The invoice.
        invoice_id: ContentId,
        /// The payment, `txid:vout`.
        outpoint: String,
    },
    /// Buyer → provider: where does this invoice stand?
    Status {
        /// The invoice.
        invoice_id: ContentId,
    },
}

/// Where an invoice stands, as the provider sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum InvoiceStatus {
    /// No such invoice for the asking buyer.
    Unknown,
    /// Not paid (yet). `seen_sat` is what the invoice's address has received so far (an
    /// underpayment when non-zero); `problem` says what is wrong with a claimed payment.
    Issued {
        /// Received at the address so far.
        seen_sat: u64,
        /// Why a claimed payment does not count (e.g. it pays another address).
        problem: Option<String>,
    },
    /// Paid, waiting for confirmations.
    Paid {
        /// The payment.
        outpoint: String,
        /// Confirmations so far.
        confirmations: u32,
        /// Confirmations required.
        required: u32,
    },
    /// Confirmed (and being settled).
    Confirmed {
        /// The payment.
        outpoint: String,
    },
    /// Settled.
    Settled {
        /// The payment.
        outpoint: String,
    },
    /// Expired unpaid; its receipts are billed again.
    Expired,
}

/// A reply on `/hashgrid/settle/1`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SettleReply {
    /// Recorded (and flushed).
    Ack,
    /// Refused, with the reason.
    Refused(String),
    /// An invoice's status.
    Status(InvoiceStatus),
}
