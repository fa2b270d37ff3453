//! Tampering, wrong domains, expiry and oversized input all fail verification.

mod common;
use common::*;
use hashgrid_protocol::*;
use proptest::prelude::*;

fn net() -> Network {
    Network::test()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Flipping any bit of any byte of the encoded envelope (body, signer or signature) makes
    /// it either undecodable or unverifiable: never a valid message.
    #[test]
    fn any_flipped_byte_fails(ask in arb_ask(), bit in 0u8..8) {
        let signed = Signed::sign(&signer_of(ask.provider), &net(), &ask);
        let wire = codec::encode(&signed);
        for i in 0..wire.len() {
            let mut bad = wire.clone();
            bad[i] ^= 1 << bit;
            if let Ok(s) = codec::decode::<Signed<Ask>>(&bad, usize::MAX, "t") {
                prop_assert!(s.verify(&net()).is_err(), "flipping byte {} bit {} still verified", i, bit);
            }
        }
    }

    /// Flipping any byte of the body or signature fails with `BadSignature` specifically.
    #[test]
    fn flipped_body_or_signature_is_bad_signature(r in arb_receipt(), pos in any::<prop::sample::Index>()) {
        let signed = Signed::sign(&signer_of(r.provider), &net(), &r);
        let mut body = signed.body_bytes().to_vec();
        let i = pos.index(body.len());
        body[i] ^= 0x55;
        let forged = Signed::<Receipt>::from_parts(body, signed.signer(), signed.signature());
        prop_assert_eq!(forged.verify(&net()), Err(SignedError::BadSignature { kind: "receipt" }));

        let mut sig = signed.signature();
        sig.0[pos.index(64)] ^= 0x01;
        let forged = Signed::<Receipt>::from_parts(signed.body_bytes().to_vec(), signed.signer(), sig);
        prop_assert_eq!(forged.verify(&net()), Err(SignedError::BadSignature { kind: "receipt" }));
    }

    /// A signature for one network never verifies on another.
    #[test]
    fn wrong_network_fails(bid in arb_bid(), other in "[a-z0-9-]{1,32}") {
        prop_assume!(other != "test");
        let signed = Signed::sign(&signer_of(bid.buyer), &net(), &bid);
        let other = Network::new(&other).unwrap();
        prop_assert_eq!(signed.verify(&other), Err(SignedError::BadSignature { kind: "bid" }));
    }

    #[test]
    fn expired_fails_and_live_passes(ask in arb_ask()) {
        let signed = Signed::sign(&signer_of(ask.provider), &net(), &ask);
        let msg = GossipMessage::Ask(signed);
        prop_assert!(msg.verify(&net(), ask.created_at).is_ok());
        let expired = msg.verify(&net(), ask.expires_at);
        let is_expired = matches!(expired, Err(GossipError::Time { source: ValidationError::Expired { .. }, .. }));
        prop_assert!(is_expired);
    }
}

/// The same bytes and signature presented as another message kind do not verify, even when the
/// body happens to decode as that kind.
#[test]
fn wrong_message_kind_fails() {
    let k = key(9);
    let cancel = Cancel {
        owner: k.public(),
        order_id: 1,
        seq: 2,
        created_at: Timestamp(1000),
        expires_at: Timestamp(2000),
    };
    let signed = Signed::sign(&k, &net(), &cancel);
    assert!(signed.verify(&net()).is_ok());
    // Re-label the envelope as a capacity ad / ask / bid.
    let as_ad = Signed::<CapacityAd>::from_parts(
        signed.body_bytes().to_vec(),
        signed.signer(),
        signed.signature(),
    );
    assert_eq!(
        as_ad.verify(&net()),
        Err(SignedError::BadSignature { kind: "capacity" })
    );
    let as_bid = Signed::<Bid>::from_parts(
        signed.body_bytes().to_vec(),
        signed.signer(),
        signed.signature(),
    );
    assert_eq!(
        as_bid.verify(&net()),
        Err(SignedError::BadSignature { kind: "bid" })
    );
}

/// An agreement signed by someone other than its provider is refused even though the signature
/// itself is valid.
#[test]
fn signer_must_be_author() {
    let provider = key(1);
    let impostor = key(2);
    let buyer = key(3);
    let a = Agreement {
        buyer: buyer.public(),
        provider: provider.public(),
        bid: OrderRef {
            owner: buyer.public(),
            order_id: 1,
        },
        ask: OrderRef {
            owner: provider.public(),
            order_id: 1,
        },
        units: 1,
        price: Msat(10),
        max_seconds: 60,
        max_charge: Msat(600),
        spec_id: ContentId::of(b"spec"),
        nonce: 7,
        created_at: Timestamp(0),
        expires_at: Timestamp(60_000),
    };
    let forged = Signed::sign(&impostor, &net(), &a);
    assert!(matches!(
        forged.verify(&net()),
        Err(SignedError::WrongSigner { .. })
    ));
    let good = Signed::sign(&provider, &net(), &a);
    assert!(good.verify(&net()).is_ok());
    // Countersigned by the buyer: valid; by anyone else: refused.
    assert!(good.countersign(&buyer, &net()).verify(&net()).is_ok());
    assert!(matches!(
        good.countersign(&impostor, &net()).verify(&net()),
        Err(SignedError::BadCountersignature { .. })
    ));
    // A countersignature made on another network does not verify here.
    assert!(matches!(
        good.countersign(&buyer, &Network::main()).verify(&net()),
        Err(SignedError::BadCountersignature { .. })
    ));
    // A countersignature cannot be moved to another agreement.
    let mut b = a.clone();
    b.nonce = 8;
    let other = Signed::sign(&provider, &net(), &b);
    let mut moved = good.countersign(&buyer, &net());
    moved.signed = other;
    assert!(matches!(
        moved.verify(&net()),
        Err(SignedError::BadCountersignature { .. })
    ));
}

/// A body over the kind's size limit is refused before its signature is even checked.
#[test]
fn oversized_body_rejected_before_verification() {
    let k = key(4);
    let huge = vec![0u8; limits::MAX_GOSSIP_BYTES + 1];
    let s = Signed::<Ask>::from_parts(huge, k.public(), k.sign_raw(b"whatever"));
    assert_eq!(
        s.verify(&net()),
        Err(SignedError::TooLarge {
            kind: "ask",
            len: limits::MAX_GOSSIP_BYTES + 1,
            max: limits::MAX_GOSSIP_BYTES
        })
    );
    let bytes = vec![0u8; limits::MAX_GOSSIP_BYTES + 1];
    assert!(matches!(
        GossipMessage::decode(&bytes),
        Err(DecodeError::TooLarge { .. })
    ));
}

#[test]
fn garbage_and_trailing_bytes_are_errors() {
    assert!(matches!(
        GossipMessage::decode(&[0xff, 0xff, 0xff]),
        Err(DecodeError::Malformed { .. })
    ));
    assert!(matches!(
        GossipMessage::decode(&[]),
        Err(DecodeError::Malformed { .. })
    ));
    let k = key(5);
    let c = Cancel {
        owner: k.public(),
        order_id: 1,
        seq: 1,
        created_at: Timestamp(0),
        expires_at: Timestamp(1),
    };
    let mut wire = GossipMessage::Cancel(Signed::sign(&k, &net(), &c)).encode();
    wire.push(0);
    assert!(matches!(
        GossipMessage::decode(&wire),
        Err(DecodeError::TrailingBytes { extra: 1, .. })
    ));
}

#[test]
fn lifetime_rules() {
    let k = key(6);
    let mk = |created: u64, expires: u64| Cancel {
        owner: k.public(),
        order_id: 1,
        seq: 1,
        created_at: Timestamp(created),
        expires_at: Timestamp(expires),
    };
    let now = Timestamp(1_000_000);
    assert!(mk(1_000_000, 1_000_001).check_time(now).is_ok());
    // Expiry is exclusive: at `expires_at` the message is dead.
    assert!(matches!(
        mk(0, 1_000_000).check_time(now),
        Err(ValidationError::Expired { .. })
    ));
    // Created too far in the future.
    let skew = limits::MAX_CLOCK_SKEW_MS;
    assert!(mk(1_000_000 + skew, 2_000_000).check_time(now).is_ok());
    assert!(matches!(
        mk(1_000_001 + skew, 2_000_000).check_time(now),
        Err(ValidationError::BadLifetime { .. })
    ));
    // Lifetime over the maximum.
    let ttl = limits::MAX_TTL_MS;
    assert!(mk(1_000_000, 1_000_000 + ttl).check_time(now).is_ok());
    assert!(matches!(
        mk(1_000_000, 1_000_001 + ttl).check_time(now),
        Err(ValidationError::BadLifetime { .. })
    ));
}

#[test]
fn replay_guard_accepts_only_newer_sequences() {
    let mut g = ReplayGuard::new(4);
    assert!(g.check_and_record("a", 5).is_ok());
    assert_eq!(
        g.check_and_record("a", 5),
        Err(ValidationError::Replayed { seq: 5, latest: 5 })
    );
    assert_eq!(
        g.check_and_record("a", 4),
        Err(ValidationError::Replayed { seq: 4, latest: 5 })
    );
    assert!(g.check_and_record("a", 6).is_ok());
    assert!(g.check_and_record("b", 0).is_ok());
    // Bounded: a flood of new keys never grows the guard past its capacity.
    for i in 0..100u32 {
        let key: &'static str = Box::leak(format!("k{i}").into_boxed_str());
        g.check_and_record(key, 1).unwrap();
        assert!(g.len() <= 4);
    }
}

#[test]
fn structural_validation_runs_after_signature() {
    let k = key(7);
    let mut ask = Ask {
        provider: k.public(),
        order_id: 1,
        seq: 1,
        units: 1,
        price: Msat(1),
        gpu: GpuProfile {
            name: "x".repeat(limits::MAX_STRING_LEN + 1),
            vendor: 0,
            device: 0,
            backend: Backend::Vulkan,
            device_type: DeviceType::Cpu,
            driver: String::new(),
            memory_bytes: 0,
            limits: GpuLimits::default(),
            bench: Benchmark::default(),
        },
        region: "eu".into(),
        max_seconds: 1,
        created_at: Timestamp(0),
        expires_at: Timestamp(1),
    };
    let s = Signed::sign(&k, &net(), &ask);
    assert!(matches!(
        s.verify(&net()),
        Err(SignedError::Invalid { kind: "ask", .. })
    ));
    ask.gpu.name = "ok".into();
    ask.units = 0;
    assert!(matches!(
        Signed::sign(&k, &net(), &ask).verify(&net()),
        Err(SignedError::Invalid { .. })
    ));
}
