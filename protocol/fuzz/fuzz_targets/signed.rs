//! Request-response bodies: agreements, receipts (countersigned), invoices, payment proofs.
#![no_main]
use hashgrid_protocol::codec::decode;
use hashgrid_protocol::limits::MAX_MESSAGE_BYTES;
use hashgrid_protocol::{Agreement, Countersigned, Invoice, Network, PaymentProof, Receipt, Signed};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let net = Network::test();
    let Some((&which, rest)) = data.split_first() else { return };
    match which % 5 {
        0 => {
            if let Ok(s) = decode::<Signed<Agreement>>(rest, MAX_MESSAGE_BYTES, "f") {
                let _ = s.verify(&net);
                let _ = s.id();
            }
        }
        1 => {
            if let Ok(s) = decode::<Countersigned<Receipt>>(rest, MAX_MESSAGE_BYTES, "f") {
                let _ = s.verify(&net);
            }
        }
        2 => {
            if let Ok(s) = decode::<Countersigned<Agreement>>(rest, MAX_MESSAGE_BYTES, "f") {
                let _ = s.verify(&net);
            }
        }
        3 => {
            if let Ok(s) = decode::<Signed<Invoice>>(rest, MAX_MESSAGE_BYTES, "f") {
                let _ = s.verify(&net);
            }
        }
        _ => {
            if let Ok(s) = decode::<Signed<PaymentProof>>(rest, MAX_MESSAGE_BYTES, "f") {
                let _ = s.verify(&net);
            }
        }
    }
});
