//! Every message round-trips through the canonical encoding and through JSON, and through
//! `Signed<T>` sign → encode → decode → verify.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

mod common;
use common::*;
use hashgrid_protocol::*;
use proptest::prelude::*;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;

fn roundtrip<T: Serialize + DeserializeOwned + PartialEq + Debug>(v: &T) {
    let bytes = codec::encode(v);
    let back: T = codec::decode(&bytes, usize::MAX, "test").unwrap();
    assert_eq!(&back, v);
    let json = serde_json::to_string(v).unwrap();
    let back: T = serde_json::from_str(&json).unwrap();
    assert_eq!(&back, v);
}

fn signed_roundtrip<T: SignedMessage + PartialEq + Debug>(v: &T, key_seed: Option<u8>) {
    let net = Network::new("lab-1").unwrap();
    // Sign with the author's key: the strategies derive keys from a seed we can recover by
    // searching the 256 candidate seeds.
    let author = v.author();
    let key = match key_seed {
        Some(s) => key(s),
        None => signer_of(author),
    };
    let signed = Signed::sign(&key, &net, v);
    let wire = codec::encode(&signed);
    let back: Signed<T> = codec::decode(&wire, usize::MAX, "test").unwrap();
    assert_eq!(back, signed);
    assert_eq!(&back.verify(&net).unwrap(), v);
    assert_eq!(back.id(), signed.id());
    let json = serde_json::to_string(&signed).unwrap();
    let back: Signed<T> = serde_json::from_str(&json).unwrap();
    assert_eq!(&back.verify(&net).unwrap(), v);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn capacity_ad(v in arb_ad()) { roundtrip(&v); signed_roundtrip(&v, None); }

    #[test]
    fn ask(v in arb_ask()) { roundtrip(&v); signed_roundtrip(&v, None); }

    #[test]
    fn bid(v in arb_bid()) { roundtrip(&v); signed_roundtrip(&v, None); }

    #[test]
    fn cancel(v in arb_cancel()) { roundtrip(&v); signed_roundtrip(&v, None); }

    #[test]
    fn agreement(v in arb_agreement()) { roundtrip(&v); signed_roundtrip(&v, None); }

    #[test]
    fn receipt(v in arb_receipt()) { roundtrip(&v); signed_roundtrip(&v, None); }

    #[test]
    fn invoice(v in arb_invoice()) { roundtrip(&v); signed_roundtrip(&v, None); }

    #[test]
    fn payment_proof(v in arb_payment()) { roundtrip(&v); signed_roundtrip(&v, None); }

    #[test]
    fn job_spec(v in arb_job_spec()) {
        roundtrip(&v);
        prop_assert_eq!(JobSpec::decode(&v.encode()).unwrap(), v.clone());
        prop_assert_eq!(v.id(), ContentId::of(&v.encode()));
    }

    #[test]
    fn gossip_message(ask in arb_ask(), bid in arb_bid(), ad in arb_ad(), cancel in arb_cancel()) {
        let net = Network::test();
        let k = signer_of;
        for msg in [
            GossipMessage::Ask(Signed::sign(&k(ask.provider), &net, &ask)),
            GossipMessage::Bid(Signed::sign(&k(bid.buyer), &net, &bid)),
            GossipMessage::Capacity(Signed::sign(&k(ad.provider), &net, &ad)),
            GossipMessage::Cancel(Signed::sign(&k(cancel.owner), &net, &cancel)),
        ] {
            let back = GossipMessage::decode(&msg.encode()).unwrap();
            prop_assert_eq!(&back, &msg);
            // Valid at its own creation time.
            let created = match &back.verify(&net, Timestamp(u64::MAX)) {
                Err(GossipError::Time { .. }) => true,
                other => panic!("expected expiry error at the end of time, got {other:?}"),
            };
            prop_assert!(created);
        }
    }

    #[test]
    fn content_id_text(id in arb_id()) {
        let s = id.to_string();
        prop_assert_eq!(s.len(), 64);
        prop_assert_eq!(s.parse::<ContentId>().unwrap(), id);
    }

    #[test]
    fn countersigned_receipt(v in arb_receipt()) {
        let net = Network::test();
        let provider = signer_of(v.provider);
        let buyer = signer_of(v.buyer);
        let cs = Signed::sign(&provider, &net, &v).countersign(&buyer, &net);
        let wire = codec::encode(&cs);
        let back: Countersigned<Receipt> = codec::decode(&wire, usize::MAX, "t").unwrap();
        prop_assert_eq!(back.verify(&net).unwrap(), v);
        let json = serde_json::to_string_pretty(&cs).unwrap();
        let back: Countersigned<Receipt> = serde_json::from_str(&json).unwrap();
        prop_assert!(back.verify(&net).is_ok());
    }
}
