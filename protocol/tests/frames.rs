//! Every direct message an honest sender builds fits one yamux frame (1 MiB): a dispatch with
//! the largest spec, the largest model manifest and as many inline inputs as [`inline_budget`]
//! allows, a receipt with the
//! most outputs and inline output bytes, a blob chunk. Implementations that send a message
//! as one frame (js-libp2p's yamux) must never make rust-yamux close the connection.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use hashgrid_protocol::codec::encode;
use hashgrid_protocol::exchange::*;
use hashgrid_protocol::job::MAX_BUFFERS;
use hashgrid_protocol::limits::{MAX_CHUNK_BYTES, MAX_DIRECT_MESSAGE_BYTES, MAX_MESSAGE_BYTES};
use hashgrid_protocol::*;

const YAMUX_MAX_FRAME_BODY: usize = 1024 * 1024;

/// A message of `len` bytes is within its protocol's `limit`, and with a multistream-select
/// header in front (protocol name and varints, well under 1 KiB) still one frame.
fn fits(len: usize, limit: usize) {
    assert!(len <= limit, "{len} bytes is over the limit of {limit}");
    assert!(limit <= MAX_DIRECT_MESSAGE_BYTES, "{limit}");
    assert!(len + 1024 <= YAMUX_MAX_FRAME_BODY, "{len} bytes");
}

fn net() -> Network {
    Network::test()
}

/// A spec of exactly `bytes` encoded bytes (one shader padded with a comment).
fn spec_of(bytes: usize) -> JobSpec {
    let mut spec = JobSpec {
        name: "big".into(),
        buffers: vec![BufferSpec {
            name: "out".into(),
            size: 4,
            init: BufferInit::Zeroed,
            output: true,
        }],
        shaders: vec![ShaderSource {
            name: "k.wgsl".into(),
            wgsl: String::new(),
        }],
        passes: vec![PassSpec {
            shader: 0,
            entry: "main".into(),
            workgroups: [1, 1, 1],
            bindings: vec![Binding::whole(0, 0)],
        }],
        loops: Vec::new(),
    };
    let base = "@group(0) @binding(0) var<storage, read_write> out: array<u32>;\n\
                @compute @workgroup_size(1) fn main() { out[0] = 1u; }\n//";
    spec.shaders[0].wgsl = base.into();
    // The length prefix grows with the text; settle in a few steps.
    for _ in 0..4 {
        let have = spec.encode().len();
        let want = spec.shaders[0].wgsl.len() + bytes - have;
        spec.shaders[0].wgsl = format!("{base}{}", "x".repeat(want - base.len()));
    }
    assert_eq!(spec.encode().len(), bytes);
    spec
}

fn agreement(spec_id: ContentId) -> Countersigned<Agreement> {
    let (p, b) = (
        Keypair::from_secret_bytes([1; 32]),
        Keypair::from_secret_bytes([2; 32]),
    );
    let r = |owner: &Keypair| OrderRef {
        owner: owner.public(),
        order_id: u64::MAX,
    };
    let a = Agreement {
        buyer: b.public(),
        provider: p.public(),
        bid: r(&b),
        ask: r(&p),
        units: u32::MAX,
        price: Msat(u64::MAX),
        max_seconds: u32::MAX,
        max_charge: Msat(u64::MAX),
        spec_id,
        nonce: u64::MAX,
        created_at: Timestamp(u64::MAX),
        expires_at: Timestamp(u64::MAX),
    };
    Signed::sign(&p, &net(), &a).countersign(&b, &net())
}

/// `total` bytes in `count` inline blobs.
fn inline(total: usize, count: usize) -> Vec<InlineBlob> {
    (0..count)
        .map(|i| {
            let len = total / count + usize::from(i < total % count);
            let bytes = vec![0xa5; len];
            InlineBlob {
                id: ContentId::of(&bytes),
                bytes: Bytes(bytes),
            }
        })
        .collect()
}

#[test]
fn a_dispatch_with_the_largest_spec_and_its_inline_budget_fits_a_frame() {
    for spec_bytes in [1024, 300 * 1024, MAX_MESSAGE_BYTES] {
        let spec = spec_of(spec_bytes);
        spec.validate(&JobLimits::default()).unwrap();
        let budget = inline_budget(spec_bytes);
        assert!(budget <= MAX_INLINE_BYTES);
        // The largest manifest: every buffer a weight blob of the longest length.
        let model = ModelManifest::new((0..MAX_BUFFERS).map(|i| {
            let mut id = [0xffu8; 32];
            id[..8].copy_from_slice(&(i as u64).to_le_bytes());
            (ContentId(id), u64::MAX)
        }));
        for count in [1, MAX_BUFFERS] {
            let d = JobMessage::Dispatch(Box::new(Dispatch {
                job_id: ContentId::of(b"job"),
                agreement: agreement(spec.id()),
                spec: spec.clone(),
                inputs: inline(budget, count),
                model: Some(model.clone()),
            }));
            let len = encode(&d).len();
            fits(len, MAX_JOB_REQUEST);
        }
    }
    // A spec over the limit is refused before it is ever sent.
    let err = spec_of(MAX_MESSAGE_BYTES + 1)
        .validate(&JobLimits::default())
        .unwrap_err();
    assert!(err.to_string().contains("over the limit"), "{err}");
}

#[test]
fn a_receipt_with_the_most_outputs_and_inline_outputs_fits_a_frame() {
    let p = Keypair::from_secret_bytes([1; 32]);
    let receipt = Receipt {
        job_id: ContentId::of(b"job"),
        agreement_id: ContentId::of(b"agreement"),
        buyer: Keypair::from_secret_bytes([2; 32]).public(),
        provider: p.public(),
        spec_id: ContentId::of(b"spec"),
        inputs: (0..MAX_BUFFERS as u32)
            .map(|i| ContentId::of(&i.to_le_bytes()))
            .collect(),
        outputs: (0..MAX_BUFFERS)
            .map(|i| OutputRecord {
                name: format!("{i:0>255}"),
                id: ContentId::of(&i.to_le_bytes()),
                bytes: u64::MAX,
            })
            .collect(),
        adapter: GpuProfile {
            name: "n".repeat(256),
            vendor: 0,
            device: 0,
            backend: Backend::Vulkan,
            device_type: DeviceType::Cpu,
            driver: "d".repeat(256),
            memory_bytes: u64::MAX,
            limits: GpuLimits::default(),
            bench: Benchmark {
                matmul_mflops: u64::MAX,
                copy_mbps: u64::MAX,
            },
        },
        started_at: Timestamp(0),
        finished_at: Timestamp(u64::MAX),
        gpu_time_us: u64::MAX,
        charge: Msat(u64::MAX),
        chain_seq: u64::MAX,
        prev_receipt: Some(ContentId::of(b"prev")),
    };
    let signed = Signed::sign(&p, &net(), &receipt);
    let budget = inline_budget(signed.body_bytes().len());
    assert!(budget > 256 * 1024, "{budget}");
    let reply = JobReply::Status(JobStatus::Done {
        receipt: signed,
        outputs: inline(budget, MAX_BUFFERS),
    });
    let len = encode(&reply).len();
    fits(len, MAX_JOB_REPLY);
}

#[test]
fn a_blob_chunk_fits_a_frame() {
    let reply = BlobReply::Chunk {
        total: u64::MAX,
        bytes: Bytes(vec![1; MAX_CHUNK_BYTES]),
    };
    let len = encode(&reply).len();
    fits(len, MAX_BLOB_REPLY);
}
