//! Receipts: offline verification of receipt files, outputs, agreements and hash chains.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::key;
use hashgrid_protocol::*;
use std::collections::BTreeMap;

fn gpu() -> GpuProfile {
    GpuProfile {
        name: "llvmpipe".into(),
        vendor: 0x10005,
        device: 0,
        backend: Backend::Vulkan,
        device_type: DeviceType::Cpu,
        driver: "Mesa".into(),
        memory_bytes: 1 << 30,
        limits: GpuLimits::default(),
        bench: Benchmark::default(),
    }
}

struct World {
    net: Network,
    provider: Keypair,
    buyer: Keypair,
    agreement: Agreement,
    agreement_id: ContentId,
}

fn world() -> World {
    let net = Network::new("lab").unwrap();
    let provider = key(1);
    let buyer = key(2);
    let agreement = Agreement {
        buyer: buyer.public(),
        provider: provider.public(),
        bid: OrderRef {
            owner: buyer.public(),
            order_id: 1,
        },
        ask: OrderRef {
            owner: provider.public(),
            order_id: 9,
        },
        units: 2,
        price: Msat(1_000),
        max_seconds: 10,
        max_charge: Msat(20_000),
        spec_id: ContentId::of(b"spec"),
        nonce: 1,
        created_at: Timestamp(0),
        expires_at: Timestamp(60_000),
    };
    let agreement_id = Signed::sign(&provider, &net, &agreement).id();
    World {
        net,
        provider,
        buyer,
        agreement,
        agreement_id,
    }
}

fn receipt(w: &World, seq: u64, prev: Option<ContentId>, out: &[u8]) -> Receipt {
    Receipt {
        job_id: ContentId::of(&seq.to_le_bytes()),
        agreement_id: w.agreement_id,
        buyer: w.buyer.public(),
        provider: w.provider.public(),
        spec_id: w.agreement.spec_id,
        inputs: vec![ContentId::of(b"in")],
        outputs: vec![OutputRecord {
            name: "out".into(),
            id: ContentId::of(out),
            bytes: out.len() as u64,
        }],
        adapter: gpu(),
        started_at: Timestamp(1_000),
        finished_at: Timestamp(1_500),
        gpu_time_us: 500_000,
        charge: Msat(1_000), // 1000 msat/s × 2 units × 0.5 s
        chain_seq: seq,
        prev_receipt: prev,
    }
}

#[test]
fn receipt_file_verifies_offline_and_detects_tampering() {
    let w = world();
    let r = receipt(&w, 0, None, b"result");
    let cs = Signed::sign(&w.provider, &w.net, &r).countersign(&w.buyer, &w.net);
    let file = ReceiptFile {
        network: w.net.clone(),
        receipt: cs,
        agreement: None,
    };
    let json = file.to_json();
    let (back, verified) = verify_receipt_file(json.as_bytes()).unwrap();
    assert_eq!(back, file);
    assert_eq!(verified, r);
    check_outputs(
        &verified,
        &BTreeMap::from([("out".to_string(), b"result".to_vec())]),
    )
    .unwrap();
    check_against_agreement(&verified, w.agreement_id, &w.agreement).unwrap();

    // Another network in the file: the signatures no longer verify.
    let other = json.replace("\"network\": \"lab\"", "\"network\": \"main\"");
    assert_ne!(other, json);
    assert!(matches!(
        verify_receipt_file(other.as_bytes()),
        Err(ReceiptError::Signature(_))
    ));

    // A flipped hex digit anywhere in the body.
    let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
    let body = v["receipt"]["signed"]["body"].as_str().unwrap().to_string();
    let flipped = format!(
        "{}{}",
        &body[..10],
        if &body[10..11] == "0" { "1" } else { "0" }
    ) + &body[11..];
    v["receipt"]["signed"]["body"] = serde_json::Value::String(flipped);
    let e = verify_receipt_file(v.to_string().as_bytes()).unwrap_err();
    assert!(
        matches!(e, ReceiptError::Signature(SignedError::BadSignature { .. })),
        "{e}"
    );

    // Not a receipt at all.
    assert!(matches!(
        verify_receipt_file(b"{}"),
        Err(ReceiptError::Format(_))
    ));
    assert!(matches!(
        verify_receipt_file(&[0xff; 10]),
        Err(ReceiptError::Format(_))
    ));
}

#[test]
fn receipt_signed_by_another_key_is_refused() {
    let w = world();
    let r = receipt(&w, 0, None, b"result");
    let liar = key(3);
    let forged = Signed::sign(&liar, &w.net, &r).countersign(&w.buyer, &w.net);
    let file = ReceiptFile {
        network: w.net.clone(),
        receipt: forged,
        agreement: None,
    };
    let e = verify_receipt_file(file.to_json().as_bytes()).unwrap_err();
    assert!(
        matches!(e, ReceiptError::Signature(SignedError::WrongSigner { .. })),
        "{e}"
    );
    // Countersigned by someone other than the buyer.
    let bad = Signed::sign(&w.provider, &w.net, &r).countersign(&liar, &w.net);
    let file = ReceiptFile {
        network: w.net.clone(),
        receipt: bad,
        agreement: None,
    };
    let e = verify_receipt_file(file.to_json().as_bytes()).unwrap_err();
    assert!(
        matches!(
            e,
            ReceiptError::Signature(SignedError::BadCountersignature { .. })
        ),
        "{e}"
    );
}

#[test]
fn outputs_must_match_exactly() {
    let w = world();
    let r = receipt(&w, 0, None, b"result");
    let out = |pairs: &[(&str, &[u8])]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_vec()))
            .collect::<BTreeMap<_, _>>()
    };
    let e = check_outputs(&r, &out(&[("out", b"resulT")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("`out`") && e.contains("hashes to"), "{e}");
    let e = check_outputs(&r, &out(&[("out", b"result!")]))
        .unwrap_err()
        .to_string();
    assert!(e.contains("7 bytes"), "{e}");
    let e = check_outputs(&r, &out(&[])).unwrap_err().to_string();
    assert!(e.contains("not received"), "{e}");
    let e = check_outputs(&r, &out(&[("out", b"result"), ("extra", b"x")]))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("`extra`") && e.contains("not in the receipt"),
        "{e}"
    );
}

#[test]
fn charges_beyond_the_agreement_are_refused() {
    let w = world();
    let mut r = receipt(&w, 0, None, b"x");
    check_against_agreement(&r, w.agreement_id, &w.agreement).unwrap();
    r.charge = Msat(1_001); // one msat over price × units × time
    let e = check_against_agreement(&r, w.agreement_id, &w.agreement)
        .unwrap_err()
        .to_string();
    assert!(e.contains("more than price × units × GPU time"), "{e}");
    r.gpu_time_us = 11_000_000;
    r.charge = Msat(20_001);
    let e = check_against_agreement(&r, w.agreement_id, &w.agreement)
        .unwrap_err()
        .to_string();
    assert!(e.contains("over the agreed maximum"), "{e}");
    let mut r = receipt(&w, 0, None, b"x");
    r.spec_id = ContentId::of(b"other spec");
    assert!(check_against_agreement(&r, w.agreement_id, &w.agreement).is_err());
    let r = receipt(&w, 0, None, b"x");
    assert!(check_against_agreement(&r, ContentId::of(b"other"), &w.agreement).is_err());
}

#[test]
fn chain_auditor_follows_the_hash_chain() {
    let w = world();
    let mut chain = Vec::new();
    let mut prev = None;
    for seq in 0..5 {
        let s = Signed::sign(&w.provider, &w.net, &receipt(&w, seq, prev, &[seq as u8]));
        prev = Some(s.id());
        chain.push(s);
    }
    let mut a = ChainAuditor::new(w.provider.public(), w.net.clone());
    for s in &chain {
        a.push(s).unwrap();
    }
    assert_eq!(a.len(), 5);
    assert_eq!(a.head(), Some(chain[4].id()));
    assert_eq!(a.total_charged(), Msat(5_000));

    // A missing receipt.
    let mut a = ChainAuditor::new(w.provider.public(), w.net.clone());
    a.push(&chain[0]).unwrap();
    let e = a.push(&chain[2]).unwrap_err().to_string();
    assert!(e.contains("expected chain_seq 1, got 2"), "{e}");

    // A fork: a second receipt 1 that links to receipt 0 but is not the one that receipt 2
    // links to.
    let fork = Signed::sign(
        &w.provider,
        &w.net,
        &receipt(&w, 1, Some(chain[0].id()), b"fork"),
    );
    let mut a = ChainAuditor::new(w.provider.public(), w.net.clone());
    a.push(&chain[0]).unwrap();
    a.push(&fork).unwrap();
    let e = a.push(&chain[2]).unwrap_err().to_string();
    assert!(e.contains("links to"), "{e}");

    // Another provider's receipt in the chain.
    let other = key(4);
    let mut r = receipt(&w, 0, None, b"x");
    r.provider = other.public();
    let s = Signed::sign(&other, &w.net, &r);
    let mut a = ChainAuditor::new(w.provider.public(), w.net.clone());
    assert!(matches!(a.push(&s), Err(ReceiptError::Chain { .. })));
}

#[test]
fn receipt_files_say_nothing_their_signatures_do_not_cover() {
    let w = world();
    let r = receipt(&w, 0, None, b"result");
    let cs = Signed::sign(&w.provider, &w.net, &r).countersign(&w.buyer, &w.net);
    let json = ReceiptFile {
        network: w.net.clone(),
        receipt: cs,
        agreement: None,
    }
    .to_json();
    assert!(verify_receipt_file(json.as_bytes()).is_ok());
    // An added key at any level is refused, not ignored.
    for path in [&[][..], &["receipt"][..], &["receipt", "signed"][..]] {
        let mut v: serde_json::Value = serde_json::from_str(&json).unwrap();
        let mut at = &mut v;
        for k in path {
            at = &mut at[*k];
        }
        at["charge"] = serde_json::json!(999_999);
        let e = verify_receipt_file(v.to_string().as_bytes()).unwrap_err();
        assert!(
            matches!(&e, ReceiptError::Format(m) if m.contains("unknown field")),
            "{path:?}: {e}"
        );
    }
}

#[test]
fn output_names_are_plain_names_never_paths() {
    let w = world();
    for bad in ["../escape", "a/b", "a\\b", ".hidden", "", "C:x", "sp ace"] {
        let mut r = receipt(&w, 0, None, b"result");
        r.outputs[0].name = bad.into();
        let cs = Signed::sign(&w.provider, &w.net, &r).countersign(&w.buyer, &w.net);
        let json = ReceiptFile {
            network: w.net.clone(),
            receipt: cs,
            agreement: None,
        }
        .to_json();
        assert!(
            verify_receipt_file(json.as_bytes()).is_err(),
            "{bad:?} is refused"
        );
    }
    for good in ["out", "blk.0", "k_cache", "x-1.bin"] {
        assert!(hashgrid_protocol::validate::is_plain_name(good), "{good}");
    }
}

#[test]
fn only_the_canonical_encoding_decodes() {
    use hashgrid_protocol::codec::decode;
    assert_eq!(decode::<u64>(&[0x01], 16, "n").unwrap(), 1);
    // 1 as a two-byte varint: same value, another encoding.
    assert!(matches!(
        decode::<u64>(&[0x81, 0x00], 16, "n"),
        Err(DecodeError::NonCanonical { .. })
    ));
    // A signed receipt whose body re-encodes a varint non-minimally: refused, so one content
    // can never have two ids.
    let w = world();
    let r = receipt(&w, 0, None, b"result");
    let body = hashgrid_protocol::codec::encode(&r);
    // The body ends with chain_seq (0) and prev_receipt (None): make chain_seq `0x80 0x00`.
    let mut long = body[..body.len() - 2].to_vec();
    long.extend_from_slice(&[0x80, 0x00, 0x00]);
    assert!(matches!(
        decode::<Receipt>(&long, 1 << 20, "receipt"),
        Err(DecodeError::NonCanonical { .. })
    ));
    assert_eq!(decode::<Receipt>(&body, 1 << 20, "receipt").unwrap(), r);
}

#[test]
fn a_receipt_file_with_its_agreement_checks_the_charge_offline() {
    let w = world();
    let signed_agreement = Signed::sign(&w.provider, &w.net, &w.agreement);
    let agreement = signed_agreement.countersign(&w.buyer, &w.net);
    let file = |r: &Receipt, agreement: Option<Countersigned<Agreement>>| {
        ReceiptFile {
            network: w.net.clone(),
            receipt: Signed::sign(&w.provider, &w.net, r).countersign(&w.buyer, &w.net),
            agreement,
        }
        .to_json()
    };
    let r = receipt(&w, 0, None, b"result");
    let (back, _) = verify_receipt_file(file(&r, Some(agreement.clone())).as_bytes()).unwrap();
    assert_eq!(back.agreement, Some(agreement.clone()));
    // A charge above price × units × GPU time: refused, from the file alone.
    let mut dear = r.clone();
    dear.charge = Msat(r.charge.0 + 1);
    let e = verify_receipt_file(file(&dear, Some(agreement.clone())).as_bytes()).unwrap_err();
    assert!(matches!(e, ReceiptError::Agreement(_)), "{e}");
    // Without the agreement the same file verifies (files written before it was kept).
    assert!(verify_receipt_file(file(&dear, None).as_bytes()).is_ok());
    // An agreement the buyer never countersigned is refused.
    let forged = signed_agreement.countersign(&w.provider, &w.net);
    assert!(verify_receipt_file(file(&r, Some(forged)).as_bytes()).is_err());
    // Another agreement than the one the receipt names is refused.
    let mut other = w.agreement.clone();
    other.nonce += 1;
    let other = Signed::sign(&w.provider, &w.net, &other).countersign(&w.buyer, &w.net);
    let e = verify_receipt_file(file(&r, Some(other)).as_bytes()).unwrap_err();
    assert!(matches!(e, ReceiptError::Agreement(_)), "{e}");
}
