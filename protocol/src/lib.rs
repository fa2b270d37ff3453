//! # hashgrid-protocol
//!
//! What hashgrid nodes say to each other and how it is signed: wire types, the canonical
//! encoding, ed25519 identities (also libp2p `PeerId`s), `Signed<T>` with domain separation,
//! blake3 content ids, validation rules and size limits, and the TOML job file format.
//! No tokio, no networking; the only I/O is reading key and job files.
//!
//! ```
//! use hashgrid_protocol::{Ask, Backend, Benchmark, DeviceType, GpuLimits, GpuProfile, Keypair,
//!     Msat, Network, Signed, Timestamp};
//!
//! let key = Keypair::from_secret_bytes([7; 32]);
//! let net = Network::test();
//! let now = Timestamp(1_700_000_000_000);
//! let ask = Ask {
//!     provider: key.public(),
//!     order_id: 1,
//!     seq: 1,
//!     units: 4,
//!     price: Msat(50),
//!     gpu: GpuProfile {
//!         name: "example GPU".into(), vendor: 0, device: 0, backend: Backend::Vulkan,
//!         device_type: DeviceType::DiscreteGpu, driver: String::new(), memory_bytes: 1 << 34,
//!         limits: GpuLimits::default(), bench: Benchmark { matmul_mflops: 10_000_000, copy_mbps: 900_000 },
//!     },
//!     region: "us-east".into(),
//!     max_seconds: 3600,
//!     created_at: now,
//!     expires_at: now.plus_ms(60_000),
//! };
//! let signed = Signed::sign(&key, &net, &ask);
//! assert_eq!(signed.verify(&net).unwrap(), ask);
//! // A signature for one network never verifies on another.
//! assert!(signed.verify(&Network::main()).is_err());
//! ```

pub mod codec;
pub mod exchange;
pub mod gossip;
pub mod id;
pub mod identity;
pub mod job;
pub mod jobfile;
pub mod limits;
pub mod messages;
pub mod model;
pub mod money;
pub mod receipt;
pub mod signed;
pub mod time;
pub mod validate;
pub mod verify;

pub use codec::DecodeError;
pub use gossip::{GossipError, GossipMessage, VerifiedGossip};
pub use id::{ContentId, ParseIdError};
pub use identity::{BadPublicKey, KeyFileError, Keypair, PublicKey, Signature};
pub use job::{
    Binding, BufferInit, BufferRange, BufferSpec, JobLimits, JobSpec, JobSpecError, LoopSpec,
    PassSpec, ShaderSource,
};
pub use jobfile::{JobFileError, JobFileErrorKind, LoadedJob, load_job_file, parse_job};
pub use messages::{
    Agreement, Ask, Backend, Benchmark, Bid, Cancel, CapacityAd, DeviceType, GpuLimits, GpuProfile,
    Invoice, InvoicePayment, OrderRef, OutputRecord, PaymentProof, Receipt, Requirements,
    SettlementMethod,
};
pub use model::{ModelBlob, ModelManifest};
pub use money::Msat;
pub use receipt::{
    ChainAuditor, ReceiptError, ReceiptFile, check_against_agreement, check_outputs,
    verify_receipt_file,
};
pub use signed::{
    BadNetwork, Bytes, Countersignable, Countersigned, Network, PROTOCOL_VERSION, Signed,
    SignedError, SignedMessage,
};
pub use time::Timestamp;
pub use validate::{Expiring, ReplayGuard, ValidationError};
pub use verify::{
    EvidenceError, EvidenceFacts, FraudEvidence, Mismatch, TokenCompare, Tolerance, Verification,
    VerifyMode, compare_outputs, compare_runs,
};
