//! `hashgrid receipt verify` against the real binary: valid, tampered, wrong outputs, garbage.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use hashgrid_protocol::*;
use std::path::Path;
use std::process::Command;

fn receipt_file(dir: &Path, output: &[u8]) -> std::path::PathBuf {
    let net = Network::new("lab").unwrap();
    let provider = Keypair::from_secret_bytes([1; 32]);
    let buyer = Keypair::from_secret_bytes([2; 32]);
    let r = Receipt {
        job_id: ContentId::of(b"job"),
        agreement_id: ContentId::of(b"agreement"),
        buyer: buyer.public(),
        provider: provider.public(),
        spec_id: ContentId::of(b"spec"),
        inputs: vec![],
        outputs: vec![OutputRecord {
            name: "out".into(),
            id: ContentId::of(output),
            bytes: output.len() as u64,
        }],
        adapter: GpuProfile {
            name: "llvmpipe".into(),
            vendor: 0,
            device: 0,
            backend: Backend::Vulkan,
            device_type: DeviceType::Cpu,
            driver: String::new(),
            memory_bytes: 0,
            limits: GpuLimits::default(),
            bench: Benchmark::default(),
        },
        started_at: Timestamp(1),
        finished_at: Timestamp(2),
        gpu_time_us: 1000,
        charge: Msat(5),
        chain_seq: 0,
        prev_receipt: None,
    };
    let rf = ReceiptFile {
        network: net.clone(),
        receipt: Signed::sign(&provider, &net, &r).countersign(&buyer, &net),
        agreement: None,
    };
    let path = dir.join("receipt.json");
    std::fs::write(&path, rf.to_json()).unwrap();
    path
}

fn hashgrid(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_hashgrid"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap(),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

#[test]
fn verify_receipt_file_offline() {
    let dir = tempfile::tempdir().unwrap();
    let path = receipt_file(dir.path(), b"the output");
    let p = path.to_str().unwrap();

    let (code, out, err) = hashgrid(&["receipt", "verify", p]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("valid receipt"), "{out}");

    let (code, out, _) = hashgrid(&["receipt", "verify", p, "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["valid"], true);
    assert_eq!(v["network"], "lab");

    // Outputs that match, then outputs that do not.
    let outs = dir.path().join("out");
    std::fs::create_dir(&outs).unwrap();
    std::fs::write(outs.join("out.bin"), b"the output").unwrap();
    let (code, out, err) = hashgrid(&["receipt", "verify", p, "--outputs", outs.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("matches"), "{out}");
    std::fs::write(outs.join("out.bin"), b"the 0utput").unwrap();
    let (code, _, err) = hashgrid(&["receipt", "verify", p, "--outputs", outs.to_str().unwrap()]);
    assert_eq!(code, 5, "{err}");
    assert!(err.contains("hashes to"), "{err}");

    // A tampered receipt: exit 5 with the reason.
    let text = std::fs::read_to_string(&path).unwrap();
    let tampered = text.replace("\"network\": \"lab\"", "\"network\": \"main\"");
    std::fs::write(&path, tampered).unwrap();
    let (code, _, err) = hashgrid(&["receipt", "verify", p]);
    assert_eq!(code, 5);
    assert!(err.contains("bad signature"), "{err}");

    // Not a receipt / not a file: exit 2.
    std::fs::write(&path, "{\"hello\": 1}").unwrap();
    let (code, _, err) = hashgrid(&["receipt", "verify", p]);
    assert_eq!(code, 2);
    assert!(err.contains("not a receipt file"), "{err}");
    let (code, _, err) = hashgrid(&["receipt", "verify", "/nonexistent.json"]);
    assert_eq!(code, 2);
    assert!(err.contains("cannot read"), "{err}");
}
