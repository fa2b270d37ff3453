//! The test vectors of docs/PROTOCOL.md: the receipt file printed there verifies, has the id
//! and fields printed there, and is exactly what signing the documented receipt with the
//! documented keys produces.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use hashgrid_protocol::*;

fn vector_receipt() -> Receipt {
    Receipt {
        job_id: ContentId::of(b"hashgrid test vector: job"),
        agreement_id: ContentId::of(b"hashgrid test vector: agreement"),
        buyer: Keypair::from_secret_bytes([2; 32]).public(),
        provider: Keypair::from_secret_bytes([1; 32]).public(),
        spec_id: ContentId::of(b"hashgrid test vector: spec"),
        inputs: vec![ContentId::of(b"input bytes")],
        outputs: vec![OutputRecord {
            name: "out".into(),
            id: ContentId::of(b"output bytes"),
            bytes: 12,
        }],
        adapter: GpuProfile {
            name: "llvmpipe".into(),
            vendor: 0x10005,
            device: 0,
            backend: Backend::Vulkan,
            device_type: DeviceType::Cpu,
            driver: "Mesa".into(),
            memory_bytes: 1 << 30,
            limits: GpuLimits::default(),
            bench: Benchmark {
                matmul_mflops: 1000,
                copy_mbps: 2000,
            },
        },
        started_at: Timestamp(1_700_000_000_000),
        finished_at: Timestamp(1_700_000_001_500),
        gpu_time_us: 1_250_000,
        charge: Msat(125),
        chain_seq: 0,
        prev_receipt: None,
    }
}

fn vector_file() -> ReceiptFile {
    let net = Network::test();
    let signed = Signed::sign(
        &Keypair::from_secret_bytes([1; 32]),
        &net,
        &vector_receipt(),
    );
    ReceiptFile {
        network: net.clone(),
        receipt: signed.countersign(&Keypair::from_secret_bytes([2; 32]), &net),
        agreement: None,
    }
}

fn doc() -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/PROTOCOL.md");
    std::fs::read_to_string(path).unwrap()
}

/// The first fenced block after `marker`.
fn block_after(doc: &str, marker: &str) -> String {
    let at = doc
        .find(marker)
        .unwrap_or_else(|| panic!("no {marker:?} in PROTOCOL.md"));
    let rest = &doc[at..];
    let start = rest.find("```").unwrap();
    let body = &rest[start..];
    let first_nl = body.find('\n').unwrap();
    let end = body[first_nl..].find("```").unwrap();
    body[first_nl + 1..first_nl + end].to_string()
}

/// The backquoted value of the list item starting with `label`.
fn item(doc: &str, label: &str) -> String {
    let line = doc
        .lines()
        .find(|l| l.starts_with(&format!("- {label}: `")))
        .unwrap_or_else(|| panic!("no item {label:?} in PROTOCOL.md"));
    line.split('`').nth(1).unwrap().to_string()
}

#[test]
fn the_documented_receipt_file_verifies_and_is_reproducible() {
    let doc = doc();
    let json = block_after(&doc, "<!-- vector: receipt-file -->");
    let (file, receipt) = verify_receipt_file(json.as_bytes()).unwrap();
    // The documented fields.
    assert_eq!(receipt, vector_receipt());
    // The documented keys and id.
    assert_eq!(
        item(&doc, "provider key"),
        Keypair::from_secret_bytes([1; 32]).public().to_string()
    );
    assert_eq!(
        item(&doc, "buyer key"),
        Keypair::from_secret_bytes([2; 32]).public().to_string()
    );
    assert_eq!(
        item(&doc, "receipt id"),
        file.receipt.signed.id().to_string()
    );
    assert_eq!(
        file.receipt.signed.id(),
        ContentId::of(&codec::encode(&file.receipt.signed)),
        "the id is blake3 of the postcard envelope"
    );
    // Signing the documented receipt with the documented keys gives exactly this file
    // (ed25519 is deterministic).
    assert_eq!(json.trim_end(), vector_file().to_json());
    // The field-by-field layout adds up to the body.
    let layout: String = block_after(&doc, "The body, 287 bytes")
        .lines()
        .map(|l| l.split("  ").next().unwrap().replace(' ', ""))
        .collect();
    assert_eq!(layout, hex::encode(file.receipt.signed.body_bytes()));
    assert_eq!(file.receipt.signed.body_bytes().len(), 287);
    // The signed input is the tag, a zero byte and the body.
    let mut input = b"hashgrid/1/test/receipt".to_vec();
    input.push(0);
    input.extend_from_slice(file.receipt.signed.body_bytes());
    assert!(
        file.receipt
            .signed
            .signer()
            .verify_raw(&input, &file.receipt.signed.signature())
    );
    let mut cs_input = b"hashgrid/1/test/receipt/countersign".to_vec();
    cs_input.push(0);
    cs_input.extend_from_slice(file.receipt.signed.id().as_bytes());
    assert!(
        file.receipt
            .countersigner
            .verify_raw(&cs_input, &file.receipt.countersignature)
    );
}
