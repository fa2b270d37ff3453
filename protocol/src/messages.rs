//! The messages of DESIGN.md: capacity ads and orders (gossip), agreements, receipts,
//! invoices and payment proofs (request-response).

use serde::{Deserialize, Serialize};

use crate::id::ContentId;
use crate::identity::PublicKey;
use crate::limits::*;
use crate::money::Msat;
use crate::signed::{Countersignable, SignedMessage};
use crate::time::Timestamp;
use crate::validate::{Expiring, ValidationError, check_len, check_str};

/// The graphics API an adapter is driven through.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// Vulkan (Linux, Windows, Android; lavapipe on CPUs).
    Vulkan,
    /// Apple Metal.
    Metal,
    /// Direct3D 12.
    Dx12,
    /// OpenGL / OpenGL ES.
    Gl,
    /// WebGPU in a browser.
    BrowserWebGpu,
    /// Anything else.
    Other,
}

/// What kind of device an adapter is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceType {
    /// A discrete GPU card.
    DiscreteGpu,
    /// A GPU integrated with the CPU.
    IntegratedGpu,
    /// A virtualised GPU.
    VirtualGpu,
    /// A software rasteriser on the CPU (e.g. lavapipe).
    Cpu,
    /// Unknown.
    Other,
}

/// The compute limits of an adapter that matter for jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct GpuLimits {
    /// Largest buffer, in bytes.
    pub max_buffer_size: u64,
    /// Largest storage buffer binding, in bytes.
    pub max_storage_buffer_binding_size: u64,
    /// Largest uniform buffer binding, in bytes.
    pub max_uniform_buffer_binding_size: u64,
    /// Most workgroups in one dimension of a dispatch.
    pub max_compute_workgroups_per_dimension: u32,
    /// Most invocations in one workgroup.
    pub max_compute_invocations_per_workgroup: u32,
    /// Workgroup shared memory, in bytes.
    pub max_compute_workgroup_storage_size: u32,
    /// Storage buffers one shader stage may bind.
    pub max_storage_buffers_per_shader_stage: u32,
}

/// Measured performance, as integers so that ads sign and compare deterministically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Benchmark {
    /// MFLOP/s of the reference tiled f32 matmul.
    pub matmul_mflops: u64,
    /// MB/s of the copy kernel (bytes read plus bytes written, per second).
    pub copy_mbps: u64,
}

/// One GPU (wgpu adapter) as advertised.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GpuProfile {
    /// Adapter name, e.g. `NVIDIA H100` or `llvmpipe (LLVM 15.0.6, 256 bits)`.
    pub name: String,
    /// PCI vendor id (0 if unknown).
    pub vendor: u32,
    /// PCI device id (0 if unknown).
    pub device: u32,
    /// Backend.
    pub backend: Backend,
    /// Device type.
    pub device_type: DeviceType,
    /// Driver name and version.
    pub driver: String,
    /// Memory available to jobs, in bytes.
    pub memory_bytes: u64,
    /// Compute limits.
    pub limits: GpuLimits,
    /// Measured benchmark.
    pub bench: Benchmark,
}

impl GpuProfile {
    fn validate(&self) -> Result<(), ValidationError> {
        check_str("gpu.name", &self.name, MAX_STRING_LEN)?;
        if self.driver.len() > MAX_STRING_LEN {
            return Err(ValidationError::BadString {
                field: "gpu.driver",
                len: self.driver.len(),
                max: MAX_STRING_LEN,
            });
        }
        Ok(())
    }
}

/// How a provider accepts payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SettlementMethod {
    /// Countersigned receipts as signed IOUs, netted per counterparty (private testnets).
    Ledger,
    /// On-chain BTC invoices.
    Onchain,
    /// BOLT11 invoices paid over Lightning, to the msat.
    Lightning,
}

/// A provider's advertisement of a site's GPUs (topic `capacity`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CapacityAd {
    /// The provider's key.
    pub provider: PublicKey,
    /// Region, e.g. `us-east`.
    pub region: String,
    /// The GPUs on offer.
    pub gpus: Vec<GpuProfile>,
    /// GPU units in total.
    pub units_total: u32,
    /// GPU units free now.
    pub units_free: u32,
    /// Accepted settlement methods.
    pub settlement: Vec<SettlementMethod>,
    /// Multiaddrs the provider can be dialled on.
    pub addrs: Vec<String>,
    /// Sequence number; a higher one replaces.
    pub seq: u64,
    /// Creation time.
    pub created_at: Timestamp,
    /// Expiry.
    pub expires_at: Timestamp,
    /// Input blobs (model weights) the provider holds in its input cache, most recently used
    /// first (at most [`MAX_WARM_PER_AD`]): a job naming them
    /// starts without uploading them, which buyers weigh against price when matching.
    /// Blobs of a model listed in `models` are not repeated here.
    pub warm: Vec<ContentId>,
    /// Ids of the models ([`ModelManifest::id`](crate::ModelManifest::id)) whose every
    /// weight blob the provider holds, most recently used first (at most
    /// [`MAX_MODELS_PER_AD`]): a bid naming one of them
    /// starts without an upload.
    pub models: Vec<ContentId>,
}

/// The identity of an order across replacements: its owner and the owner's order id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct OrderRef {
    /// The provider (asks) or buyer (bids).
    pub owner: PublicKey,
    /// Chosen by the owner; unique among its live orders.
    pub order_id: u64,
}

/// A provider sells `units` GPUs of one profile at `price` msat per GPU-second (topic `orders`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ask {
    /// The provider.
    pub provider: PublicKey,
    /// The provider's id for this order.
    pub order_id: u64,
    /// Sequence number; a higher one from the same provider and order id replaces.
    pub seq: u64,
    /// GPU units offered.
    pub units: u32,
    /// Price in msat per GPU-second.
    pub price: Msat,
    /// The GPU offered (one profile per ask).
    pub gpu: GpuProfile,
    /// Region.
    pub region: String,
    /// The longest job, in seconds, the provider accepts under this ask.
    pub max_seconds: u32,
    /// Creation time.
    pub created_at: Timestamp,
    /// Expiry.
    pub expires_at: Timestamp,
}

impl Ask {
    /// This order's identity.
    pub fn order_ref(&self) -> OrderRef {
        OrderRef {
            owner: self.provider,
            order_id: self.order_id,
        }
    }
}

/// What a buyer needs from a GPU. Empty lists mean "any".
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
pub struct Requirements {
    /// Least memory, in bytes.
    pub min_memory_bytes: u64,
    /// Least matmul MFLOP/s.
    pub min_mflops: u64,
    /// Allowed regions (empty: any).
    pub regions: Vec<String>,
    /// Allowed backends (empty: any).
    pub backends: Vec<Backend>,
}

impl Requirements {
    /// Whether `gpu` in `region` meets these requirements.
    pub fn accepts(&self, gpu: &GpuProfile, region: &str) -> bool {
        gpu.memory_bytes >= self.min_memory_bytes
            && gpu.bench.matmul_mflops >= self.min_mflops
            && (self.regions.is_empty() || self.regions.iter().any(|r| r == region))
            && (self.backends.is_empty() || self.backends.contains(&gpu.backend))
    }

    fn validate(&self) -> Result<(), ValidationError> {
        check_len(
            "requirements.regions",
            self.regions.len(),
            MAX_REQUIREMENT_ITEMS,
        )?;
        check_len(
            "requirements.backends",
            self.backends.len(),
            MAX_REQUIREMENT_ITEMS,
        )?;
        for r in &self.regions {
            check_str("requirements.regions[]", r, MAX_REGION_LEN)?;
        }
        Ok(())
    }
}

/// A buyer wants `units` GPUs meeting `requirements` at up to `max_price` msat per GPU-second,
/// for at most `max_seconds` (topic `orders`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Bid {
    /// The buyer.
    pub buyer: PublicKey,
    /// The buyer's id for this order.
    pub order_id: u64,
    /// Sequence number; a higher one from the same buyer and order id replaces.
    pub seq: u64,
    /// GPU units wanted.
    pub units: u32,
    /// Requirements.
    pub requirements: Requirements,
    /// Highest price in msat per GPU-second.
    pub max_price: Msat,
    /// Longest run, in seconds.
    pub max_seconds: u32,
    /// Creation time.
    pub created_at: Timestamp,
    /// Expiry.
    pub expires_at: Timestamp,
    /// The model the job runs ([`ModelManifest::id`](crate::ModelManifest::id)), if any:
    /// matching prefers a provider whose capacity ad lists it (no upload of its weights).
    pub model: Option<ContentId>,
}

impl Bid {
    /// This order's identity.
    pub fn order_ref(&self) -> OrderRef {
        OrderRef {
            owner: self.buyer,
            order_id: self.order_id,
        }
    }
}

/// The owner withdraws an order (topic `orders`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Cancel {
    /// The order's owner.
    pub owner: PublicKey,
    /// The order.
    pub order_id: u64,
    /// Must be higher than the cancelled order's `seq`.
    pub seq: u64,
    /// Creation time.
    pub created_at: Timestamp,
    /// After this the cancel need not be relayed (the order has expired by then).
    pub expires_at: Timestamp,
}

/// The provider's signed agreement to run a buyer's job; the buyer countersigns it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Agreement {
    /// The buyer.
    pub buyer: PublicKey,
    /// The provider.
    pub provider: PublicKey,
    /// The bid matched.
    pub bid: OrderRef,
    /// The ask matched.
    pub ask: OrderRef,
    /// GPU units agreed.
    pub units: u32,
    /// Agreed price in msat per GPU-second.
    pub price: Msat,
    /// Longest run, in seconds.
    pub max_seconds: u32,
    /// The most the buyer can be charged.
    pub max_charge: Msat,
    /// The job spec that will run.
    pub spec_id: ContentId,
    /// Makes every agreement unique.
    pub nonce: u64,
    /// Creation time.
    pub created_at: Timestamp,
    /// The job must be dispatched before this.
    pub expires_at: Timestamp,
}

/// One output buffer as recorded in a receipt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputRecord {
    /// Buffer name from the job spec.
    pub name: String,
    /// blake3 of its bytes.
    pub id: ContentId,
    /// Length in bytes.
    pub bytes: u64,
}

/// What the provider did and charged, signed by the provider and countersigned by the buyer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Receipt {
    /// The job.
    pub job_id: ContentId,
    /// The agreement it ran under.
    pub agreement_id: ContentId,
    /// The buyer.
    pub buyer: PublicKey,
    /// The provider.
    pub provider: PublicKey,
    /// The job spec's id.
    pub spec_id: ContentId,
    /// The input blobs' ids.
    pub inputs: Vec<ContentId>,
    /// The outputs.
    pub outputs: Vec<OutputRecord>,
    /// The adapter that ran it.
    pub adapter: GpuProfile,
    /// Start of execution.
    pub started_at: Timestamp,
    /// End of execution.
    pub finished_at: Timestamp,
    /// Measured GPU time, in microseconds.
    pub gpu_time_us: u64,
    /// The charge.
    pub charge: Msat,
    /// Position in the provider's receipt chain (0 for the first).
    pub chain_seq: u64,
    /// Id of the provider's previous receipt (`None` only for `chain_seq == 0`).
    pub prev_receipt: Option<ContentId>,
}

/// How an invoice is to be paid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InvoicePayment {
    /// Pay `amount_sat` to `address` on chain.
    Onchain {
        /// Bitcoin address (fresh per invoice).
        address: String,
        /// Amount in sats.
        amount_sat: u64,
    },
    /// Settled in the ledger (netted IOUs).
    Ledger,
    /// Pay this BOLT11 payment request over Lightning. Its amount is the invoice's, to the
    /// msat, and its description hash binds the invoice's provider, buyer, sequence number,
    /// amount and receipts (see `hashgrid_lightning::bind`).
    Lightning {
        /// The payment request (`lnbc…`, `lntb…`, `lnbcrt…`).
        request: String,
    },
}

/// The provider bills a buyer for countersigned receipts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Invoice {
    /// The provider.
    pub provider: PublicKey,
    /// The buyer.
    pub buyer: PublicKey,
    /// Per provider-buyer pair, increasing.
    pub seq: u64,
    /// The receipts billed.
    pub receipts: Vec<ContentId>,
    /// Their total.
    pub amount: Msat,
    /// How to pay.
    pub payment: InvoicePayment,
    /// Creation time.
    pub created_at: Timestamp,
    /// Pay before this.
    pub expires_at: Timestamp,
}

/// The buyer's claim that an invoice was paid.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PaymentProof {
    /// The invoice.
    pub invoice_id: ContentId,
    /// The buyer.
    pub buyer: PublicKey,
    /// The provider.
    pub provider: PublicKey,
    /// Transaction id, 64 hex digits, as Bitcoin displays it.
    pub txid: String,
    /// The output paying the invoice.
    pub vout: u32,
    /// Amount in sats.
    pub amount_sat: u64,
    /// Creation time.
    pub created_at: Timestamp,
}

macro_rules! expiring {
    ($($ty:ty),*) => {$(
        impl Expiring for $ty {
            fn created_at(&self) -> Timestamp { self.created_at }
            fn expires_at(&self) -> Timestamp { self.expires_at }
        }
    )*};
}
expiring!(CapacityAd, Ask, Bid, Cancel, Agreement, Invoice);

impl SignedMessage for CapacityAd {
    const KIND: &'static str = "capacity";
    const MAX_BYTES: usize = MAX_GOSSIP_BYTES;
    fn author(&self) -> PublicKey {
        self.provider
    }
    fn validate(&self) -> Result<(), ValidationError> {
        check_str("region", &self.region, MAX_REGION_LEN)?;
        check_len("gpus", self.gpus.len(), MAX_GPUS_PER_AD)?;
        check_len("addrs", self.addrs.len(), MAX_ADDRS_PER_AD)?;
        check_len("warm", self.warm.len(), crate::limits::MAX_WARM_PER_AD)?;
        check_len(
            "models",
            self.models.len(),
            crate::limits::MAX_MODELS_PER_AD,
        )?;
        check_len("settlement", self.settlement.len(), 4)?;
        for a in &self.addrs {
            check_str("addrs[]", a, MAX_STRING_LEN)?;
        }
        for g in &self.gpus {
            g.validate()?;
        }
        if self.units_free > self.units_total {
            return Err(ValidationError::OutOfRange {
                field: "units_free",
                reason: format!("{} free of {} total", self.units_free, self.units_total),
            });
        }
        Ok(())
    }
}

impl SignedMessage for Ask {
    const KIND: &'static str = "ask";
    const MAX_BYTES: usize = MAX_GOSSIP_BYTES;
    fn author(&self) -> PublicKey {
        self.provider
    }
    fn validate(&self) -> Result<(), ValidationError> {
        check_str("region", &self.region, MAX_REGION_LEN)?;
        self.gpu.validate()?;
        positive("units", self.units.into())?;
        positive("max_seconds", self.max_seconds.into())
    }
}

impl SignedMessage for Bid {
    const KIND: &'static str = "bid";
    const MAX_BYTES: usize = MAX_GOSSIP_BYTES;
    fn author(&self) -> PublicKey {
        self.buyer
    }
    fn validate(&self) -> Result<(), ValidationError> {
        self.requirements.validate()?;
        positive("units", self.units.into())?;
        positive("max_seconds", self.max_seconds.into())
    }
}

impl SignedMessage for Cancel {
    const KIND: &'static str = "cancel";
    const MAX_BYTES: usize = MAX_GOSSIP_BYTES;
    fn author(&self) -> PublicKey {
        self.owner
    }
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

impl SignedMessage for Agreement {
    const KIND: &'static str = "agreement";
    const MAX_BYTES: usize = MAX_MESSAGE_BYTES;
    fn author(&self) -> PublicKey {
        self.provider
    }
    fn validate(&self) -> Result<(), ValidationError> {
        positive("units", self.units.into())?;
        positive("max_seconds", self.max_seconds.into())?;
        if self.buyer == self.provider {
            return Err(ValidationError::OutOfRange {
                field: "buyer",
                reason: "buyer and provider are the same key".into(),
            });
        }
        Ok(())
    }
}

impl Countersignable for Agreement {
    fn counterparty(&self) -> PublicKey {
        self.buyer
    }
}

impl SignedMessage for Receipt {
    const KIND: &'static str = "receipt";
    const MAX_BYTES: usize = MAX_MESSAGE_BYTES;
    fn author(&self) -> PublicKey {
        self.provider
    }
    fn validate(&self) -> Result<(), ValidationError> {
        self.adapter.validate()?;
        check_len("inputs", self.inputs.len(), crate::job::MAX_BUFFERS)?;
        check_len("outputs", self.outputs.len(), crate::job::MAX_BUFFERS)?;
        for o in &self.outputs {
            crate::validate::check_name("outputs[].name", &o.name)?;
        }
        if self.finished_at < self.started_at {
            return Err(ValidationError::OutOfRange {
                field: "finished_at",
                reason: "finished before it started".into(),
            });
        }
        if (self.chain_seq == 0) != self.prev_receipt.is_none() {
            return Err(ValidationError::OutOfRange {
                field: "prev_receipt",
                reason: "only the first receipt of a chain (chain_seq 0) has no previous receipt"
                    .into(),
            });
        }
        Ok(())
    }
}

impl Countersignable for Receipt {
    fn counterparty(&self) -> PublicKey {
        self.buyer
    }
}

impl SignedMessage for Invoice {
    const KIND: &'static str = "invoice";
    const MAX_BYTES: usize = MAX_MESSAGE_BYTES;
    fn author(&self) -> PublicKey {
        self.provider
    }
    fn validate(&self) -> Result<(), ValidationError> {
        check_len("receipts", self.receipts.len(), MAX_RECEIPTS_PER_INVOICE)?;
        match &self.payment {
            InvoicePayment::Onchain { address, .. } => {
                check_str("payment.address", address, MAX_STRING_LEN)?
            }
            InvoicePayment::Lightning { request } => {
                check_str("payment.request", request, MAX_PAYMENT_REQUEST_LEN)?
            }
            InvoicePayment::Ledger => {}
        }
        Ok(())
    }
}

impl SignedMessage for PaymentProof {
    const KIND: &'static str = "payment";
    const MAX_BYTES: usize = MAX_GOSSIP_BYTES;
    fn author(&self) -> PublicKey {
        self.buyer
    }
    fn validate(&self) -> Result<(), ValidationError> {
        let ok = self.txid.len() == 64 && self.txid.bytes().all(|b| b.is_ascii_hexdigit());
        if !ok {
            return Err(ValidationError::OutOfRange {
                field: "txid",
                reason: "a transaction id is 64 hex digits".into(),
            });
        }
        Ok(())
    }
}

fn positive(field: &'static str, v: u64) -> Result<(), ValidationError> {
    if v == 0 {
        return Err(ValidationError::OutOfRange {
            field,
            reason: "must be at least 1".into(),
        });
    }
    Ok(())
}
