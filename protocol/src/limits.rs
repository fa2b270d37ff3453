//! Size and count limits for everything decoded from outside.
//!
//! Every decoder of untrusted bytes checks the input length against one of these constants
//! *before* it allocates or parses anything, and every decoded message is then checked field
//! by field ([`crate::SignedMessage::validate`]). Sites can lower the job limits (see
//! [`crate::job::JobLimits`]); they can never raise the wire limits, because peers would drop
//! their messages.

/// Largest gossip message (capacity ad, ask, bid, cancel), encoded.
///
/// An ad with [`MAX_GPUS_PER_AD`] full profiles is about 4 KiB; 64 KiB leaves room for long
/// adapter and driver names while keeping a flood of maximal messages cheap to reject.
pub const MAX_GOSSIP_BYTES: usize = 64 * 1024;

/// Largest message on any direct (request-response) protocol, in either direction, encoded.
///
/// Under 1 MiB on purpose: rust-yamux refuses a data frame over 1 MiB and closes the whole
/// connection, and other implementations (js-libp2p's yamux) send a message as one frame as
/// large as the stream's window allows. A message of at most this size never makes a frame
/// over 1 MiB, with room for a multistream-select header sent in the same frame. Anything
/// larger travels over `/hashgrid/blob/1` in [`MAX_CHUNK_BYTES`] chunks.
pub const MAX_DIRECT_MESSAGE_BYTES: usize = 1024 * 1024 - 16 * 1024;

/// Largest signed body that is not a blob chunk (agreements, receipts, invoices, job specs with
/// their WGSL sources). It fits one direct message with room for the framing around it.
///
/// A job spec carries its shader sources inline; 768 KiB holds dozens of large kernels (a
/// language model's whole job spec is tens of KiB: its weights are blobs).
pub const MAX_MESSAGE_BYTES: usize = 768 * 1024;

/// Largest blob chunk sent over `/hashgrid/blob/1`. Blobs larger than this are chunked; a
/// chunk and its reply framing fit one direct message.
pub const MAX_CHUNK_BYTES: usize = 512 * 1024;

/// Longest free-text string in a message (names, regions, entry points, driver strings).
pub const MAX_STRING_LEN: usize = 256;

/// Longest region name. Regions are short identifiers like `us-east` or `nordics`.
pub const MAX_REGION_LEN: usize = 64;

/// Most GPU profiles one capacity ad may list. A site with more GPUs sends several ads.
pub const MAX_GPUS_PER_AD: usize = 64;

/// Most listen addresses one capacity ad may carry.
pub const MAX_ADDRS_PER_AD: usize = 16;

/// Most warm input ids (cached model weights) one capacity ad may list: 16 KiB of ids, a few
/// dozen models at one blob per layer.
pub const MAX_WARM_PER_AD: usize = 512;

/// Most model ids one capacity ad may list.
pub const MAX_MODELS_PER_AD: usize = 64;

/// Most regions or backends one bid may name.
pub const MAX_REQUIREMENT_ITEMS: usize = 32;

/// Most receipts one invoice may cover.
pub const MAX_RECEIPTS_PER_INVOICE: usize = 4096;

/// Longest Lightning payment request in an invoice (characters). BOLT11 requests are a few
/// hundred; route hints can make them longer.
pub const MAX_PAYMENT_REQUEST_LEN: usize = 4096;

/// Longest time-to-live of a gossiped order or ad: 24 hours. Orders are re-announced long
/// before this, so a longer TTL would only keep stale orders alive after a provider vanished.
pub const MAX_TTL_MS: u64 = 24 * 60 * 60 * 1000;

/// Largest clock skew tolerated between peers: a message created up to 30 s "in the future"
/// is accepted. NTP keeps honest sites well inside this.
pub const MAX_CLOCK_SKEW_MS: u64 = 30 * 1000;

/// Longest network name: `main`, `test`, or a private testnet name.
pub const MAX_NETWORK_LEN: usize = 32;

/// Largest TOML job file read from disk. Job files are small; data lives in the files they name.
pub const MAX_JOB_FILE_BYTES: u64 = 1024 * 1024;

/// Largest WGSL shader file read from disk (a job spec holding it must still fit
/// [`MAX_MESSAGE_BYTES`]).
pub const MAX_SHADER_BYTES: u64 = 512 * 1024;

/// Largest key file read from disk (a key file is exactly 32 bytes).
pub const MAX_KEY_FILE_BYTES: u64 = 4096;
